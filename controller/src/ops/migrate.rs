//! Moving a running pod to another node: `pod migrate` on the source streams the pod's
//! checkpoint to `migrate listen` on the target, which restores it; no archive is written on
//! either side.
//!
//! Order of events, so that a failure never loses the pod: the source pod is frozen and
//! captured (held frozen by its shim), its files streamed; the target restores and lets the
//! new pod run; only when the target says so is the source stopped and removed. Any failure
//! before that thaws the source (it runs on) and removes whatever the target created.

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{bail, Context, Result};
use stasis_api::events::PodEvent;

use super::{
    checkpoint::{self, CheckpointArgs, Destination},
    ms,
    restore::{self, RestoreArgs, Restored, Source},
    Target,
};
use crate::{
    cri,
    policy::Policy,
    seal::Opening,
    stream::{self, Channel, Offer, Outcome, HOLD_SECS, MAX_HANDSHAKES},
};

pub struct MigrateArgs {
    pub pod: String,
    pub to: String,
    pub key: PathBuf,
    pub name: Option<String>,
    pub runtime_handler: Option<String>,
    pub timeout: u32,
    pub lazy: bool,
    /// Post-copy: the target's pod runs before the pages cross; the source stays frozen (CRIU
    /// serving its pages) until the target has them all.
    pub post_copy: bool,
    /// Signs the streamed checkpoint's manifest (for targets that require signatures).
    pub sign: Option<ed25519_dalek::SigningKey>,
}

/// What a migration did, for the caller to print.
pub struct Migrated {
    /// The pod's id here, before it was removed.
    pub source_pod: String,
    pub target_pod: String,
    pub downtime_ms: f64,
    pub total_ms: f64,
    pub bytes_sent: u64,
}

/// Moves pod `a.pod` to the receiver at `a.to`: a stopping checkpoint whose destination is
/// the stream (the source is stopped only once the target runs the pod), then the stopped
/// source pod is removed.
#[tracing::instrument(name = "migrate", skip_all, fields(pod = %a.pod, to = %a.to))]
pub async fn migrate(t: &Target, a: MigrateArgs) -> Result<Migrated> {
    let (pod, to) = (a.pod.clone(), a.to.clone());
    let moved = migrate_pod(t, a).await;
    let mut event = PodEvent {
        pod_name: pod,
        operation: "migrate".into(),
        ..Default::default()
    };
    match &moved {
        Ok(m) => {
            event.phase = "finished".into();
            event.downtime_ms = m.downtime_ms;
            event.total_ms = m.total_ms;
            event.bytes = m.bytes_sent;
            event.sandbox_id = m.source_pod.clone();
        }
        Err(e) => {
            event.phase = "failed".into();
            event.error = format!("{e:#} (to {to})");
        }
    }
    crate::events::publish(&t.address, &t.namespace, event).await;
    moved
}

async fn migrate_pod(t: &Target, a: MigrateArgs) -> Result<Migrated> {
    let started = Instant::now();
    let key = stream::load_key(&a.key)?;
    // The peer and the key are checked before anything of the pod is touched.
    let to = a.to.clone();
    let mut channel = tokio::task::spawn_blocking(move || Channel::connect(&to, &key)).await??;
    channel.send_json(&Offer {
        pod: a.pod.clone(),
        name: a.name.clone(),
        runtime_handler: a.runtime_handler.clone(),
        lazy: a.lazy || a.post_copy,
        post_copy: a.post_copy,
    })?;
    let frozen_at = Instant::now();
    let o = checkpoint::checkpoint_pod(
        t,
        CheckpointArgs {
            pod: a.pod.clone(),
            destination: Destination::Stream {
                channel: Box::new(channel),
                to: a.to.clone(),
                post_copy: a.post_copy,
                page_socket: None,
            },
            leave_running: false,
            containers: Vec::new(),
            tcp_established: false,
            file_locks: false,
            timeout: a.timeout,
            space_check: true,
            sign: a.sign.clone(),
            hold_secs: Some(HOLD_SECS),
        },
    )
    .await
    .with_context(|| format!("migration of pod {} to {} failed", a.pod, a.to))?;
    let target_pod = o
        .delivered
        .peer_pod
        .context("the receiver's answer was lost")?;
    // Post-copy's downtime ends when the target runs the pod, before its pages came.
    let downtime_ms = ms(o
        .delivered
        .running_at
        .unwrap_or_else(Instant::now)
        .duration_since(frozen_at));
    // The target runs and the source was stopped (its containers killed while frozen): now
    // the source pod goes.
    let mut rt = cri::connect(Path::new(&t.address)).await?;
    cri::remove_pod(&mut rt, &o.pod_id).await.with_context(|| {
        format!(
            "pod {} runs on {} as {target_pod}, but removing the stopped source pod failed",
            a.pod, a.to
        )
    })?;
    Ok(Migrated {
        source_pod: o.pod_id.clone(),
        target_pod,
        downtime_ms,
        total_ms: ms(started.elapsed()),
        bytes_sent: o.delivered.bytes,
    })
}

#[path = "migrate_postcopy.rs"]
mod postcopy;

pub struct ListenArgs {
    pub listen: String,
    pub key: PathBuf,
    pub policy: Policy,
    pub replace_volumes: bool,
    /// Stop after this many migrations (0: serve until stopped).
    pub count: u32,
}

/// Receives migrations one at a time and restores them into this node's containerd.
pub async fn listen(t: &Target, a: ListenArgs) -> Result<()> {
    let key = stream::load_key(&a.key)?;
    let listener =
        TcpListener::bind(&a.listen).with_context(|| format!("listen on {}", a.listen))?;
    eprintln!(
        "waiting for migrations on {} (restoring into {})",
        listener.local_addr()?,
        t.address
    );
    let mut arrivals = accept_proven(&listener, key)?;
    let mut served = 0;
    loop {
        let Some((mut channel, peer)) = arrivals.recv().await else {
            bail!("the listener stopped accepting connections");
        };
        let started = Instant::now();
        let offer = match channel.recv_json::<Offer>() {
            Ok(o) if o.post_copy => {
                postcopy::receive(t, &a, channel, &peer.to_string(), o).await;
                served += 1;
                match a.count > 0 && served >= a.count {
                    true => return Ok(()),
                    false => continue,
                }
            }
            Ok(o) => o,
            Err(e) => {
                eprintln!("migration from {peer} failed: {e:#}");
                continue;
            }
        };
        let restored = receive(t, &a, &mut channel, &peer.to_string(), offer).await;
        let result = restored.as_ref().map(|r| r.pod_id.clone());
        let answer = match &result {
            Ok(id) => Outcome {
                pod_id: Some(id.clone()),
                error: None,
                restore_ms: ms(started.elapsed()),
            },
            Err(e) => Outcome {
                pod_id: None,
                error: Some(format!("{e:#}")),
                restore_ms: 0.0,
            },
        };
        let sent = channel.send_json(&answer);
        match (&result, sent) {
            (Ok(id), Ok(())) => {
                println!("{id}");
                eprintln!(
                    "restored a pod from {peer} as {id} in {:.0} ms",
                    ms(started.elapsed())
                );
            }
            (Ok(id), Err(e)) => {
                // The source never learns its pod moved: it lets its pod run on, so this copy
                // must go.
                eprintln!("{peer} is gone before it heard of pod {id} ({e}); removing it");
                remove_pod(t, id).await;
            }
            (Err(e), _) => eprintln!("migration from {peer} failed: {e:#}"),
        }
        // The source has its answer (its downtime ends with it); a lazily restored pod
        // pulls the rest of its memory from the received images meanwhile.
        if let Ok(restored) = restored {
            if let Err(e) = restored.finish(t).await {
                eprintln!("{e:#}");
            }
        }
        served += 1;
        if a.count > 0 && served >= a.count {
            return Ok(());
        }
    }
}

/// Handshakes run side by side, each within its deadline, so peers without the key cannot
/// hold the door; the channels that proved the key come out one at a time, in arrival order.
fn accept_proven(
    listener: &TcpListener,
    key: [u8; 32],
) -> Result<tokio::sync::mpsc::Receiver<(Channel, std::net::SocketAddr)>> {
    let (proven, arrivals) = tokio::sync::mpsc::channel::<(Channel, std::net::SocketAddr)>(1);
    let busy = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    let listener = listener.try_clone()?;
    let runtime = tokio::runtime::Handle::current();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(stream) = conn else { continue };
            let peer = stream
                .peer_addr()
                .unwrap_or_else(|_| ([0, 0, 0, 0], 0).into());
            let Ok(permit) = busy.clone().try_acquire_owned() else {
                eprintln!("refused {peer}: {MAX_HANDSHAKES} handshakes under way already");
                continue;
            };
            let proven = proven.clone();
            runtime.spawn_blocking(move || {
                let _permit = permit;
                match Channel::accept(stream, &key) {
                    Ok(c) => {
                        let _ = proven.blocking_send((c, peer));
                    }
                    Err(e) => eprintln!("refused {peer}: {e:#}"),
                }
            });
        }
    });
    Ok(arrivals)
}

async fn remove_pod(t: &Target, id: &str) {
    if let Ok(mut rt) = cri::connect(Path::new(&t.address)).await {
        let _ = cri::remove_pod(&mut rt, id).await;
    }
}

/// How a migration offered with `offer` is restored here; post-copy's pages come through
/// `remote_pages`. The migration reports its downtime and end only once every page is in.
fn restore_args(
    a: &ListenArgs,
    offer: &Offer,
    opening: Opening,
    remote_pages: Option<PathBuf>,
) -> RestoreArgs {
    RestoreArgs {
        registry: Default::default(),
        name: offer.name.clone(),
        runtime_handler: None,
        offered_runtime_handler: offer.runtime_handler.clone(),
        policy: a.policy.clone(),
        replace_volumes: a.replace_volumes,
        opening,
        lazy: offer.lazy || remote_pages.is_some(),
        wait_pages: true,
        remote_pages,
    }
}

/// One migration: the offer, the pod's files into the restore store, the restore.
#[tracing::instrument(name = "receive", skip_all, fields(peer = %peer))]
async fn receive(
    t: &Target,
    a: &ListenArgs,
    channel: &mut Channel,
    peer: &str,
    offer: Offer,
) -> Result<Restored> {
    eprintln!("receiving pod {} from {peer}", offer.pod);
    let args = restore_args(a, &offer, Opening::default(), None);
    let source = Source::Stream {
        channel,
        peer: peer.to_string(),
        pod: offer.pod,
    };
    restore::restore(t, &args, source).await
}
