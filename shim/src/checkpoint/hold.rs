//! A stopping checkpoint's hold: the captured containers kept still until the output is
//! safe (then stopped) or given up (then thawed).

use std::sync::Arc;

use log::{info, warn};
use tokio::sync::OwnedMutexGuard;

use super::{announce::Announce, serve_pages};
use crate::{error::Result, runtime::HeldPod};

/// A stopping checkpoint's containers, kept still after their capture until its output is
/// safe. It owns the pod's checkpoint slot and the containers' operation locks while it
/// lasts; dropped without an end (a panic), it lets the containers run on.
pub struct Hold {
    runtime: Arc<dyn crate::runtime::OciRuntime>,
    pod: Option<HeldPod>,
    announce: Announce,
    /// Whether `stop` announces `stopped` itself (not when the stop comes before the
    /// checkpoint's `finished`, which must be announced first).
    pub(super) announce_stop: bool,
    /// Post-copy: the pages CRIU still serves; ended before the containers are touched.
    pub(super) pages: Option<serve_pages::PageService>,
    _busy: OwnedMutexGuard<()>,
    _ops: Vec<OwnedMutexGuard<()>>,
}

impl Hold {
    pub(super) fn new(
        runtime: Arc<dyn crate::runtime::OciRuntime>,
        pod: HeldPod,
        announce: Announce,
        (busy, ops): (OwnedMutexGuard<()>, Vec<OwnedMutexGuard<()>>),
    ) -> Hold {
        Hold {
            runtime,
            pod: Some(pod),
            announce,
            announce_stop: true,
            pages: None,
            _busy: busy,
            _ops: ops,
        }
    }

    fn ids(p: &HeldPod) -> Vec<String> {
        p.containers.iter().map(|c| c.id.clone()).collect()
    }

    /// Post-copy: where the pages are served.
    pub fn page_socket(&self) -> Option<String> {
        self.pages.as_ref().map(|p| p.socket.display().to_string())
    }

    /// Resolves once a post-copy transfer broke (never for other holds).
    pub fn pages_broken(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        match &self.pages {
            Some(p) => Box::pin(p.broken()),
            None => Box::pin(std::future::pending()),
        }
    }

    /// The output is safe: the held containers are stopped.
    pub async fn stop(mut self) -> Result<Vec<String>> {
        if let Some(pages) = self.pages.take() {
            pages.end().await;
        }
        let pod = self.pod.take().expect("a hold ends once");
        match self.runtime.hooks().stop_held(&pod).await {
            Ok(()) => {
                info!("pod {}: stopped after its checkpoint", pod.pod_id);
                if self.announce_stop {
                    self.announce.phase("stopped");
                }
                Ok(Self::ids(&pod))
            }
            Err(e) => {
                // Whatever the stop did not end runs on rather than staying frozen.
                if self.runtime.hooks().release_held(&pod).await.is_ok() {
                    self.announce.phase("resumed");
                }
                Err(e)
            }
        }
    }

    /// The containers run on, thawed (a failed or abandoned stopping checkpoint).
    pub async fn release(mut self) -> Result<Vec<String>> {
        if let Some(pages) = self.pages.take() {
            pages.end().await;
        }
        let pod = self.pod.take().expect("a hold ends once");
        self.runtime.hooks().release_held(&pod).await?;
        info!("pod {}: left running after its checkpoint", pod.pod_id);
        self.announce.phase("resumed");
        Ok(Self::ids(&pod))
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        if let Some(pod) = self.pod.take() {
            warn!("pod {}: checkpoint hold dropped, resuming", pod.pod_id);
            let (runtime, pages) = (self.runtime.clone(), self.pages.take());
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    if let Some(pages) = pages {
                        pages.end().await;
                    }
                    runtime.hooks().release_held(&pod).await
                });
            }
        }
    }
}
