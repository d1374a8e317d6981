//! Restore at Start: a task created from a checkpoint gets its volumes back, then its
//! processes from the images; a container of a pod being restored is held until the pod's
//! FinishRestore.

use std::{path::Path, sync::Arc};

use log::{error, info, warn};
use stasis_api::{
    checkpoint::RestoreState,
    events::PodEvent,
    layout::{DumpRecord, CHECKPOINT_DIR},
};

use super::{
    restore_pages::{
        start_lazy_restore, stop_lazy_pages, wait_for_pages, watch_lazy_pages, PAGES_WITHIN,
    },
    watch,
};
use crate::{
    error::{Error, Result},
    events::{pod_event, restore_event},
    fscapture::volumes,
    process::stdio,
    runtime::{images, restored, CheckpointOpts},
    state::{Container, Shim, State, Transition},
    util::blocking,
};

/// Brings the processes of a `Restorable` container back; returns the init pid.
pub(super) async fn restore_init(
    shim: &Shim,
    container: &Arc<Container>,
    image: &Path,
) -> Result<i32> {
    let id = container.id.clone();
    let start = std::time::Instant::now();
    let recorded = DumpRecord::read(image);
    restore_volumes(shim, container, image).await?;
    // The images' record of how they were dumped comes from the archive: only options that
    // restore the process's own state are taken from it (its TCP connections, its file
    // locks), never one that reaches outside the container.
    if recorded.ext_unix_sk {
        return Err(Error::invalid(
            &id,
            "the checkpoint asks to restore unix sockets connected outside the container (external_unix_sockets); a restore never grants that",
        ));
    }
    let stdio_cfg = container.live().init.stdio.clone();
    let mut opts = CheckpointOpts {
        image_path: image.to_path_buf(),
        work_path: container.bundle.join("criu-restore-work"),
        shell_job: stdio_cfg.terminal,
        tcp_established: recorded.tcp_established,
        file_locks: recorded.file_locks,
        ..Default::default()
    };
    std::fs::create_dir_all(&opts.work_path)
        .map_err(|e| Error::io(&id, "create restore work dir", e))?;
    let lazy = start_lazy_restore(shim, container, image, &mut opts).await?;
    let lazy_pid = lazy.as_ref().map(|l| l.0);
    let mut prepared = match stdio::prepare(&id, &stdio_cfg).await {
        Ok(p) => p,
        Err(e) => {
            stop_lazy_pages(lazy_pid);
            return Err(e);
        }
    };
    let pid_file = container.bundle.join("init.pid");
    let since = std::time::Instant::now();
    let runtime_io = prepared.take_runtime();
    if let Err(e) = shim
        .runtime
        .hooks()
        .restore(&id, &container.bundle, &opts, runtime_io, &pid_file)
        .await
    {
        undo_restore(shim, &id, Undo::Restore, &mut prepared, lazy_pid).await;
        return Err(e);
    }
    let held = match check_restored(shim, container, image).await {
        Ok(held) => held,
        Err((e, undo)) => {
            undo_restore(shim, &id, undo, &mut prepared, lazy_pid).await;
            return Err(e);
        }
    };
    if let Some(lazy) = lazy {
        watch_lazy_pages(shim, container, lazy, start);
    }
    // A failure from here on must not leave the container frozen (held) with no watchdog.
    let held_in = held.then_some(container.cgroup_path.as_str());
    let (io, pid) = match stdio_and_pid(prepared, &id, &pid_file).await {
        Ok(done) => done,
        Err(e) => {
            abandon_restored(shim, &id, held_in, lazy_pid).await;
            return Err(e);
        }
    };
    {
        let mut live = container.live();
        live.init.pid = pid;
        live.init.io = io;
    }
    container.transition(Transition::Restore { held })?;
    if held {
        watch_hold(shim, container.clone());
    }
    watch::oom(shim, &id, &container.cgroup_path);
    watch::exit(shim, container.clone(), String::new(), pid, since);
    info!(
        "{id}: restored from {} in {:?}, pid {pid}{}",
        image.display(),
        start.elapsed(),
        if held { ", held for its pod" } else { "" }
    );
    Ok(pid)
}

/// Puts the container's volumes back from its checkpoint before any of its processes is.
async fn restore_volumes(shim: &Shim, container: &Container, image: &Path) -> Result<()> {
    // A pod checkpoint keeps volumes in the container's own checkpoint/ (the images may be the
    // whole sandbox's, elsewhere); a Task API checkpoint keeps them with the images.
    let volumes_dir = container
        .restore_dir
        .as_ref()
        .map(|d| d.join(CHECKPOINT_DIR))
        .unwrap_or_else(|| image.to_path_buf());
    let (id, spec) = (container.id.clone(), container.spec.clone());
    // Containers of a pod share its volumes: each host directory is restored once.
    let pod = container.restore_dir.as_ref().and_then(|_| shim.pod());
    // A directory another container already mounts cannot be swapped under it: that
    // container would keep the old, deleted one.
    let mounted: Vec<(String, std::path::PathBuf)> = shim
        .all()
        .into_iter()
        .filter(|c| c.id != container.id)
        .flat_map(|c| {
            c.spec
                .mounts()
                .iter()
                .filter_map(|m| m.source().clone())
                .map(|s| (c.id.clone(), s))
                .collect::<Vec<_>>()
        })
        .collect();
    blocking(&id.clone(), "restore volumes", move || {
        volumes::restore(&id, &spec, &volumes_dir, |dir| {
            if !pod.as_ref().is_none_or(|p| p.claim_volume(dir)) {
                return Ok(false);
            }
            if let Some((other, _)) = mounted.iter().find(|(_, s)| s == dir) {
                return Err(Error::precondition(
                    &id,
                    format!(
                        "volume {} is mounted by container {other} already; restore the containers that capture volumes before the others that mount them",
                        dir.display()
                    ),
                ));
            }
            Ok(true)
        })
    })
    .await
}

/// How far a failed restore got, which says what must end before its container is deleted.
enum Undo<'a> {
    /// `runc restore` itself failed.
    Restore,
    /// Restored tasks exist: they are killed first.
    Tasks,
    /// The restored tasks are held (frozen) for the pod too, in this cgroup: killed, then
    /// thawed, as SIGKILL waits while they are frozen.
    Held(&'a str),
}

/// The restored init's stdio, handed over from the restore, and its pid.
async fn stdio_and_pid(
    prepared: stdio::PreparedIo,
    id: &str,
    pid_file: &Path,
) -> Result<(stdio::ProcessIo, i32)> {
    let io = prepared.finish(id).await?;
    match stdio::read_pid(id, pid_file) {
        Ok(pid) => Ok((io, pid)),
        Err(e) => {
            io.copies.abort().await;
            Err(e)
        }
    }
}

/// [`undo_restore`] once the stdio is no longer the restore's: kills the restored tasks,
/// thaws them if they were held (in `held_in`), deletes the container and stops its daemon.
async fn abandon_restored(shim: &Shim, id: &str, held_in: Option<&str>, lazy_pid: Option<i32>) {
    let _ = shim.runtime.kill(id, libc::SIGKILL as u32, true).await;
    if let Some(cgroup) = held_in {
        let _ = shim.runtime.hooks().release_restored(id, cgroup).await;
    }
    let _ = shim.runtime.delete(id, true).await;
    stop_lazy_pages(lazy_pid);
}

/// Removes what a restore that failed after `runc restore` left: its tasks (as `undo` says),
/// the stdio copies, the container, and the lazy-pages daemon.
async fn undo_restore(
    shim: &Shim,
    id: &str,
    undo: Undo<'_>,
    prepared: &mut stdio::PreparedIo,
    lazy_pid: Option<i32>,
) {
    prepared.io.copies.abort().await;
    match undo {
        Undo::Restore => {
            let _ = shim.runtime.delete(id, true).await;
            stop_lazy_pages(lazy_pid);
        }
        Undo::Tasks => abandon_restored(shim, id, None, lazy_pid).await,
        Undo::Held(cgroup) => abandon_restored(shim, id, Some(cgroup), lazy_pid).await,
    }
}

/// Holds the restored container for its pod (when it belongs to a pod restore) and, when the
/// runtime restores host tasks, checks them against the spec before any of them runs.
/// Returns whether the container is held; a failure says how far the restore must be undone.
async fn check_restored<'a>(
    shim: &Shim,
    container: &'a Container,
    image: &Path,
) -> std::result::Result<bool, (Error, Undo<'a>)> {
    let id = &container.id;
    // The images are the archive's word: what CRIU made of them is checked against the spec
    // before any restored task runs. CRIU backends leave every task stopped; a pod's
    // container is held (frozen) too, and the check's SIGCONT takes effect at the thaw.
    let host_tasks = shim.runtime.hooks().restores_host_tasks();
    if host_tasks {
        let (owned, cgroup) = (id.clone(), container.cgroup_path.clone());
        if let Err(e) = blocking(id, "hold the restored tasks", move || {
            restored::await_stopped(&owned, &cgroup, std::time::Duration::from_secs(5))
        })
        .await
        {
            error!("{id}: {e}");
            return Err((e, Undo::Tasks));
        }
    }
    let pod_restore = container.restore_dir.is_some();
    let held = pod_restore
        && shim
            .runtime
            .hooks()
            .hold_restored(id, &container.cgroup_path)
            .await
            .unwrap_or_else(|e| {
                warn!("{id}: cannot hold the restored container until the pod is complete: {e}");
                false
            });
    // An eager restore through the page server must not run before its pages are in: without
    // the hold it would.
    if pod_restore && !held && shim.restores.is_held_for_pages(id) {
        return Err((
            Error::other(
                id,
                "restore",
                "the restored container could not be held until its pages are in; nothing runs",
            ),
            Undo::Tasks,
        ));
    }
    if host_tasks {
        let (owned, cgroup) = (id.clone(), container.cgroup_path.clone());
        let expected = images::Expected::of(&container.spec);
        let images_dir = image.to_path_buf();
        if let Err(e) = blocking(id, "check the restored tasks", move || {
            restored::verify(&owned, &cgroup, &expected.bounds, |table| {
                images::mountinfo_excess(table, &expected)
            })?;
            let keep = images::stopped_at_dump(&owned, &images_dir)?;
            restored::continue_tasks(&owned, &cgroup, &keep)
        })
        .await
        {
            error!("{id}: {e}");
            let undo = if held {
                Undo::Held(&container.cgroup_path)
            } else {
                Undo::Tasks
            };
            return Err((e, undo));
        }
    }
    Ok(held)
}

/// A held container is never frozen indefinitely: if its pod's FinishRestore has not come
/// within the hold bound (the restore's driver died, say), the restore is given up and the
/// container stopped, so that nothing of a half-restored pod runs or stays frozen.
fn watch_hold(shim: &Shim, container: Arc<Container>) {
    let runtime = shim.runtime.clone();
    let restores = shim.restores.clone();
    let hold = shim.restore_hold;
    tokio::spawn(async move {
        tokio::time::sleep(hold).await;
        // An eager restore through the page server is held while its pages come in: the hold
        // runs from the last page (at most PAGES_WITHIN later), not from the restore.
        if restores.is_held_for_pages(&container.id) {
            restores.settled(PAGES_WITHIN).await;
            tokio::time::sleep(hold).await;
        }
        let _op = container.op.lock().await;
        if container.state() != State::Held {
            return;
        }
        let id = &container.id;
        warn!("{id}: FinishRestore did not come within {hold:?}; stopping the held container");
        if restores.is_held_for_pages(id) {
            restores.record(
                id,
                RestoreState::RESTORE_FAILED,
                "held past the hold bound; stopped",
            );
        }
        if let Err(e) = runtime.kill(id, libc::SIGKILL as u32, true).await {
            warn!("{id}: stop the held container: {e}");
        }
        // SIGKILL reaches frozen processes only once they are thawed.
        if let Err(e) = runtime
            .hooks()
            .release_restored(id, &container.cgroup_path)
            .await
        {
            warn!("{id}: thaw the held container: {e}");
        }
    });
}

/// Queues a `/stasis/restore/<phase>` event of the shim's pod.
fn announce_restore(shim: &Shim, phase: &str, ids: &[String], fill: impl FnOnce(&mut PodEvent)) {
    let pod_id = shim.pod().map(|p| p.id.clone()).unwrap_or_default();
    let mut event = restore_event(&pod_id, shim.runtime.name(), phase, ids);
    fill(&mut event);
    pod_event(&shim.events, event);
}

/// Lets every container held after a pod restore run. Returns their ids.
pub async fn finish_restore(shim: &Shim) -> Result<Vec<String>> {
    match resume_restored(shim).await {
        Ok(resumed) => {
            announce_restore(shim, "running", &resumed, |_| {});
            Ok(resumed)
        }
        Err(e) => {
            announce_restore(shim, "failed", &[], |ev| ev.error = e.to_string());
            Err(e)
        }
    }
}

async fn resume_restored(shim: &Shim) -> Result<Vec<String>> {
    wait_for_pages(shim).await?;
    if let Some(pod) = shim.pod() {
        pod.restore_finished();
    }
    let mut resumed = Vec::new();
    let mut containers = shim.all();
    containers.sort_by(|a, b| a.id.cmp(&b.id));
    for c in containers {
        let _op = c.op.lock().await;
        if c.state() != State::Held {
            continue;
        }
        shim.runtime
            .hooks()
            .release_restored(&c.id, &c.cgroup_path)
            .await?;
        c.transition(Transition::Release)?;
        resumed.push(c.id.clone());
    }
    info!("resumed restored containers {resumed:?}");
    Ok(resumed)
}
