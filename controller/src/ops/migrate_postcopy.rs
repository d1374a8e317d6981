//! The target's side of a post-copy migration: the pod's files (without its pages) are
//! received, a relay for the shims' page requests is started over the same session, and the
//! pod is restored lazily with its pages fetched from the source, which stays frozen until the
//! target says every page is in. The source learns "running" (the end of its downtime) as
//! soon as the pod runs, and "done" (or why not) once the last page is in; a pod that could
//! not get all of its memory is removed here, and the source then runs on.

use std::{
    os::unix::net::UnixListener,
    path::{Path, PathBuf},
    sync::mpsc,
    time::Instant,
};

use anyhow::{Context, Result};

use super::{
    ms, remove_pod,
    restore::{self, Source},
    ListenArgs, Target,
};
use crate::{
    files,
    ops::guard::RestoreGuard,
    seal::Opening,
    stream::{Channel, Offer, Outcome, PagesDone},
};

/// Private scratch of one post-copy restore: the received files and the relay's socket;
/// removed on every exit, by the watchdog if stasisctl is killed.
struct Scratch {
    dir: PathBuf,
    guard: Option<RestoreGuard>,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
        if let Some(g) = self.guard.take() {
            g.done();
        }
    }
}

/// Receives and restores one post-copy migration; reports on stderr (and the pod's id on
/// stdout), as the other migrations do.
pub async fn receive(t: &Target, a: &ListenArgs, channel: Channel, peer: &str, offer: Offer) {
    let started = Instant::now();
    eprintln!("receiving pod {} from {peer} (post-copy)", offer.pod);
    match run(t, a, channel, peer, offer, started).await {
        Ok(id) => {
            println!("{id}");
            eprintln!(
                "restored a pod from {peer} as {id}; every page in after {:.0} ms",
                ms(started.elapsed())
            );
        }
        Err(e) => eprintln!("migration from {peer} failed: {e:#}"),
    }
}

async fn run(
    t: &Target,
    a: &ListenArgs,
    channel: Channel,
    peer: &str,
    offer: Offer,
    started: Instant,
) -> Result<String> {
    let root = files::private_root(Path::new(files::CHECKPOINT_STAGING))?;
    let dir = root.join(format!("postcopy-{}", files::random_id()?));
    let guard = RestoreGuard::start(&t.address, &dir)?;
    let scratch = Scratch {
        dir,
        guard: Some(guard),
    };
    files::create_private_dir(&scratch.dir)?;
    let (pod_dir, socket) = (scratch.dir.join("pod"), scratch.dir.join("pages.sock"));
    // A node that names trusted signers takes only signed migrations too.
    let opening = Opening {
        identities: Vec::new(),
        verify: a.policy.signers()?,
    };
    let channel = receive_files(channel, &pod_dir, &opening, peer).await?;
    let listener =
        UnixListener::bind(&socket).with_context(|| format!("bind {}", socket.display()))?;
    let (control, answers) = mpsc::channel::<Vec<u8>>();
    let relay = std::thread::spawn(move || channel.relay_target(listener, answers));
    let args = super::restore_args(a, &offer, opening, Some(socket));
    let restored = restore::restore(t, &args, Source::Dir(pod_dir)).await;
    let outcome = match &restored {
        Ok(r) => Outcome {
            pod_id: Some(r.pod_id.clone()),
            error: None,
            restore_ms: ms(started.elapsed()),
        },
        Err(e) => Outcome {
            error: Some(format!("{e:#}")),
            ..Default::default()
        },
    };
    let _ = control.send(serde_json::to_vec(&outcome)?);
    let restored = match restored {
        Ok(r) => r,
        Err(e) => {
            drop(control);
            let _ = tokio::task::spawn_blocking(move || relay.join()).await;
            return Err(e);
        }
    };
    let pod_id = restored.pod_id.clone();
    eprintln!(
        "pod {pod_id} runs after {:.0} ms; its pages come from {peer}",
        ms(started.elapsed())
    );
    // Every page in, or the pod goes (finish removes a pod whose containers lost memory).
    let finished = restored.finish(t).await;
    let done = match &finished {
        Ok(_) => PagesDone {
            ok: true,
            error: None,
        },
        Err(e) => PagesDone {
            ok: false,
            error: Some(format!("{e:#}")),
        },
    };
    let _ = control.send(serde_json::to_vec(&done)?);
    let relayed = tokio::task::spawn_blocking(move || relay.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the page relay panicked"))?;
    let id = finished?;
    if let Err(e) = relayed {
        // The source may not have heard that every page is in: it then thaws its pod, and
        // two copies must not run.
        remove_pod(t, &id).await;
        return Err(e.context(format!(
            "pod {id} got every page, but the source did not hear so; the pod was removed"
        )));
    }
    Ok(id)
}

/// The pod's files (checked as an archive is) into `dir`; the peer hears why if they fail.
async fn receive_files(
    mut channel: Channel,
    dir: &Path,
    opening: &Opening,
    peer: &str,
) -> Result<Channel> {
    let (dir, opening, peer) = (dir.to_path_buf(), opening.clone(), peer.to_string());
    tokio::task::spawn_blocking(move || match channel.receive_pod(&dir, &opening, &peer) {
        Ok(_) => Ok(channel),
        Err(e) => {
            let _ = channel.send_json(&Outcome {
                error: Some(format!("{e:#}")),
                ..Default::default()
            });
            Err(e)
        }
    })
    .await?
}
