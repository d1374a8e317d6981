//! `stasisctl pod restore`: a checkpoint from a [`Source`] becomes a new running pod.
//!
//! The steps, each undone when a later one fails: the checkpoint is unpacked into a fresh
//! restore directory (`unpack`), everything it asks for is checked against the node's policy
//! before anything is created (`admit`), then the pod and its containers are created through
//! CRI and released together by the shim (`create`). A lazy restore's directory keeps serving
//! pages until [`Restored::finish`].

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, Result};

use super::{guard::RestoreGuard, ms, Interrupt, Target};
use crate::{cri, files, image::RegistryAccess, policy::Policy, progress, seal::Opening};

mod admit;
mod create;
pub mod lazy;
mod unpack;

pub use unpack::Source;

pub struct RestoreArgs {
    /// How to reach the registry when an image (or a base image) must be pulled.
    pub registry: RegistryAccess,
    pub name: Option<String>,
    /// CRI runtime handler for the new pod (the operator's choice); None: the one the
    /// archive records, else "stasis".
    pub runtime_handler: Option<String>,
    /// The handler a migration peer asks for: checked against the policy like the one an
    /// archive records.
    pub offered_runtime_handler: Option<String>,
    /// What the archive may ask for (node policy widened by the operator's flags).
    pub policy: Policy,
    /// Replace the contents of non-empty host volumes with the captured ones.
    pub replace_volumes: bool,
    /// Identities to decrypt the archive; a key it must be signed by.
    pub opening: Opening,
    /// Let containers run before their memory is in (served on demand, pulled in the
    /// background).
    pub lazy: bool,
    /// A lazy restore returns only once every page is in (else once the pod runs, and the
    /// restore's watchdog waits for the pages).
    pub wait_pages: bool,
    /// Post-copy: the lazy pages come from the migration's source through this relay socket
    /// (the images are copied whole: they hold only the pages CRIU restores eagerly).
    pub remote_pages: Option<PathBuf>,
}

/// What a restore leaves on the node until it ends: the restore directory, its options and
/// claim-token files, and the watchdog that removes them (and the new pod) should stasisctl
/// die. Dropping it removes the files and dismisses the watchdog: every exit, once.
struct Leftovers {
    dir: PathBuf,
    files: Vec<PathBuf>,
    guard: Option<RestoreGuard>,
    /// Handed over to the watchdog, which removes them once every page is in.
    handed_over: bool,
}

impl Drop for Leftovers {
    fn drop(&mut self) {
        if self.handed_over {
            return;
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        for f in &self.files {
            let _ = std::fs::remove_file(f);
        }
        if let Some(g) = self.guard.take() {
            g.done();
        }
    }
}

/// A restored pod whose restore directory may still be in use: its lazily restored
/// containers pull pages from it until [`Restored::finish`].
pub struct Restored {
    pub pod_id: String,
    created: create::Created,
    lazy: bool,
    wait_pages: bool,
    started: Instant,
    running: Duration,
    leftovers: Leftovers,
}

/// Restores the checkpoint `source` as a new pod; returns once the pod runs (see
/// [`Restored`]).
#[tracing::instrument(name = "restore", skip_all, fields(source = %source.label(), pod_id = tracing::field::Empty))]
pub async fn restore(t: &Target, a: &RestoreArgs, source: Source<'_>) -> Result<Restored> {
    let started = Instant::now();
    let mut interrupt = Interrupt::listen()?;
    let store = files::private_root(Path::new(stasis_api::layout::RESTORE_STORE))?;
    let restore_id = files::random_id()?;
    let dir = store.join(&restore_id);
    let source = source.prepare(t, a).await?;
    progress::step(
        "unpacking",
        format!("unpacking {} as restore {restore_id}", source.label()),
    );
    // Cleans up if this process is killed outright from here on.
    let mut leftovers = Leftovers {
        guard: Some(RestoreGuard::start(&t.address, &dir)?),
        dir: dir.clone(),
        files: Vec::new(),
        handed_over: false,
    };
    // Everything about the archive is checked before anything is created.
    let label = source.label();
    let (options, page_source) = source
        .unpack(t, a, &dir)
        .map_err(|e| e.context(format!("cannot restore {label}")))?;
    let token = unpack::write_restore_files(
        &store,
        &restore_id,
        (a.lazy, a.remote_pages.clone()),
        page_source,
        &mut leftovers.files,
    )?;
    let admitted = admit::admit(t, a, &dir, &options, (&restore_id, &token)).await?;
    let guard = leftovers.guard.as_mut().expect("the watchdog runs");
    let mut node = create::CriNode::connect(t, &admitted.handler).await?;
    node.pages_before_resume = !a.lazy;
    let created = create::create(&mut node, admitted, &mut interrupt, |id| {
        tracing::Span::current().record("pod_id", tracing::field::display(id));
        progress::pod(id, a.name.as_deref().unwrap_or_default());
        guard.pod(id)
    })
    .await?;
    let running = started.elapsed();
    if a.lazy && a.wait_pages {
        progress::step(
            "running",
            format!(
                "running after {:.0} ms; its memory is still coming in",
                ms(running)
            ),
        );
    }
    Ok(Restored {
        pod_id: created.pod_id.clone(),
        created,
        lazy: a.lazy,
        wait_pages: a.wait_pages,
        started,
        running,
        leftovers,
    })
}

impl Restored {
    /// Waits until every page of a lazy restore is in, then removes the restore directory.
    /// An error if a container stopped before its memory was all in. A lazy restore not
    /// asked to wait for its pages leaves that to its watchdog and returns at once.
    #[tracing::instrument(name = "restore", skip_all, fields(pod_id = %self.pod_id))]
    pub async fn finish(mut self, t: &Target) -> Result<String> {
        if self.lazy && !self.wait_pages {
            let c = &self.created;
            if let Some(guard) = self.leftovers.guard.take() {
                // Should the hand-over fail, this guard was not dismissed: its pipe closes
                // with stasisctl and it removes the pod, as after any interrupted restore.
                guard.follow(&t.namespace, &c.pod_id, &c.handler, &c.containers)?;
                self.leftovers.handed_over = true;
            }
            progress::step(
                "restored",
                format!(
                    "restored: running after {:.0} ms; its memory is still coming in (`stasisctl pod pages {}` shows when the last page is in)",
                    ms(self.running),
                    self.pod_id
                ),
            );
            return Ok(self.pod_id.clone());
        }
        let mut lost = Vec::new();
        if self.lazy {
            // The restore directory serves the lazy-pages daemons: kept until the shim says
            // how each container's restore ended (it stops one whose pages could not all be
            // served: a changed archive, a failed daemon).
            let c = &self.created;
            let at = (c.pod_id.as_str(), c.handler.as_str());
            lost =
                lazy::with_pages_progress(t, at, lazy::lost_containers(t, at, &c.containers), true)
                    .await;
        }
        if !lost.is_empty() {
            // Not the pod that was checkpointed: it goes, as after any failed restore.
            let removed = match cri::connect(Path::new(&t.address)).await {
                Ok(mut rt) => cri::remove_pod(&mut rt, &self.pod_id).await,
                Err(e) => Err(e),
            };
            drop(self.leftovers);
            bail!(
                "pod {}: {} stopped before all of its memory was restored (the shim's log says why); {}",
                self.pod_id,
                lost.join(", "),
                match removed {
                    Ok(()) => "the pod was removed".to_string(),
                    Err(e) => format!("removing the pod failed: {e:#}"),
                }
            );
        }
        drop(self.leftovers);
        if self.lazy {
            progress::step(
                "restored",
                format!(
                    "restored: running after {:.0} ms, every page in after {:.0} ms",
                    ms(self.running),
                    ms(self.started.elapsed())
                ),
            );
        } else {
            progress::step(
                "restored",
                format!("restored in {:.0} ms", ms(self.running)),
            );
        }
        Ok(self.pod_id)
    }
}

/// [`restore`], then [`Restored::finish`]: returns the new pod's id once every page is in.
pub async fn restore_pod(t: &Target, a: &RestoreArgs, source: Source<'_>) -> Result<String> {
    restore(t, a, source).await?.finish(t).await
}
