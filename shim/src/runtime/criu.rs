//! The default checkpoint of a backend whose containers are host processes (runc, crun):
//! the cgroup freezer holds them still, CRIU (through the runtime's `checkpoint`) dumps them,
//! their files are captured while still frozen, then they are thawed. Design notes: CRIU
//! cannot seize tasks below a frozen parent, so a pod is frozen as a whole for one instant,
//! each container then by its own cgroup, and the pod cgroup thawed before the dumps.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use log::{info, warn};
use stasis_api::layout::{CHECKPOINT_DIR, DUMP_LOG, STATS_DUMP};

use tokio_util::sync::CancellationToken;

use super::{
    cancel_after, past_bound, postcopy, timed_out, CheckpointHooks, CheckpointOpts,
    ContainerTarget, HeldPod, PodCapture, PodCheckpoint, Timings, DEFAULT_CHECKPOINT_TIMEOUT,
};
use crate::{
    cgroup::freezer::{self, Freezer},
    error::{Error, Result},
    fscapture::{rootfs, volumes},
    process::pidns,
    util::blocking,
};

type SharedFreezer = std::sync::Arc<dyn Freezer>;

fn freezer_of(id: &str, cgroup: &str) -> Result<SharedFreezer> {
    Ok(std::sync::Arc::from(freezer::for_cgroup(id, cgroup)?))
}

async fn freeze(id: &str, f: &SharedFreezer) -> Result<()> {
    let f = f.clone();
    blocking(id, "freeze", move || f.freeze()).await
}

async fn thaw(id: &str, f: &SharedFreezer) -> Result<()> {
    let f = f.clone();
    blocking(id, "thaw", move || f.thaw()).await
}

/// The cgroups this checkpoint froze and has not thawed yet. Whatever ends the checkpoint
/// (an error, a panic, its future dropped), dropping the guard thaws them: a thaw is one
/// write, quick enough to do right there.
#[derive(Default)]
struct Frozen(Vec<(String, SharedFreezer)>);

impl Frozen {
    async fn freeze(&mut self, id: &str, f: &SharedFreezer) -> Result<()> {
        // Held before the freeze is asked for: a freeze cut short must still be undone.
        self.0.push((id.to_string(), f.clone()));
        freeze(id, f).await
    }

    async fn thaw(&mut self, id: &str) -> Result<()> {
        let Some(i) = self.0.iter().position(|(held, _)| held == id) else {
            return Ok(());
        };
        let (id, f) = self.0.remove(i);
        thaw(&id, &f).await
    }

    async fn thaw_all(&mut self) {
        while let Some((id, _)) = self.0.first().cloned() {
            if let Err(e) = self.thaw(&id).await {
                warn!("{id}: thaw: {e}");
            }
        }
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        for (id, f) in self.0.drain(..) {
            warn!("{id}: checkpoint ended early, thawing");
            if let Err(e) = f.thaw() {
                log::error!("{id}: thaw after an interrupted checkpoint: {e}");
            }
        }
    }
}

/// One container (Task API): freeze → dump (live) → volumes → synced, then stop it if asked,
/// thaw. The dump is always taken live under our freeze: a stopping checkpoint ends the
/// container only once the images and volumes are complete on disk, so a failure at any step
/// leaves it running (or paused, as it was).
pub async fn checkpoint_container<R: CheckpointHooks + ?Sized>(
    runtime: &R,
    target: &ContainerTarget,
    opts: &CheckpointOpts,
) -> Result<Timings> {
    let id = target.id.as_str();
    let start = Instant::now();
    let freezer = freezer_of(id, &target.cgroup_path)?;
    let frozen_at = Instant::now();
    let mut held = Frozen::default();
    if !target.paused {
        held.freeze(id, &freezer).await?;
    }
    let stop = !opts.leave_running;
    // The bound containerd does not set: a dump past it is stopped before the thaw.
    let mut opts = opts.clone();
    opts.leave_running = true;
    let cancel = opts
        .cancel
        .get_or_insert_with(CancellationToken::new)
        .clone();
    let limit = opts.timeout.unwrap_or(DEFAULT_CHECKPOINT_TIMEOUT);
    let bound_from = Instant::now();
    let timer = cancel_after(&cancel, limit);
    let opts = &opts;
    let result = async {
        let t = Instant::now();
        runtime.checkpoint(id, opts).await?;
        let dump = t.elapsed();
        let t = Instant::now();
        let spec = target.spec.clone();
        let image = opts.image_path.clone();
        let owned = id.to_string();
        blocking(id, "capture volumes", move || {
            volumes::capture(&owned, &spec, &image)?;
            // Complete on disk before a stopping checkpoint ends the container. A live one
            // is not synced inside the frozen window: the container runs on whatever
            // happens, and containerd syncs the blob it makes of the images when it commits.
            if stop {
                crate::util::sync_fs(&owned, &image)?;
            }
            Ok(())
        })
        .await?;
        Ok::<_, Error>((dump, t.elapsed()))
    }
    .await;
    drop(timer);
    // Past the bound runc and CRIU were killed and waited for (before the thaw below).
    let result = match result {
        Err(_) if past_bound(&cancel, bound_from, limit) => Err(timed_out(id, "checkpoint", limit)),
        r => r,
    };
    if stop && result.is_ok() {
        // Killed while frozen: nothing runs between the capture and the end.
        if let Err(e) = runtime.kill(id, libc::SIGKILL as u32, true).await {
            warn!("{id}: stop after checkpoint: {e}");
        }
        if target.paused {
            thaw(id, &freezer).await?;
        }
    }
    let thawed = held.thaw(id).await;
    let frozen = if target.paused {
        Duration::ZERO
    } else {
        frozen_at.elapsed()
    };
    thawed?;
    let (dump, files) = result?;
    // The dump log belongs with the images (checkpointctl and people read it there).
    let _ = crate::util::copy_private(
        &opts.work_path.join(DUMP_LOG),
        &opts.image_path.join(DUMP_LOG),
    );
    Ok(Timings {
        frozen,
        dump,
        files,
        total: start.elapsed(),
    })
}

/// A pod: freeze the pod cgroup (one instant for all), freeze each running container's own
/// cgroup, thaw the pod cgroup, dump every container in parallel and capture its files, then
/// thaw, or keep them frozen for a stopping checkpoint (`job.hold`). Any failure thaws what
/// was frozen.
pub async fn checkpoint_pod<R: CheckpointHooks + ?Sized>(
    runtime: &R,
    job: &PodCheckpoint<'_>,
) -> Result<PodCapture> {
    let pod_freezer = freezer_of(job.pod_id, job.pod_cgroup)?;
    let mut freezers = Vec::new();
    for c in job.containers {
        freezers.push(freezer_of(&c.id, &c.cgroup_path)?);
    }
    let mut held = Frozen::default();
    held.freeze(job.pod_id, &pod_freezer).await?;
    let frozen_at = Instant::now();
    let mut failed = None;
    for (i, c) in job.containers.iter().enumerate() {
        if c.paused {
            continue;
        }
        if let Err(e) = held.freeze(&c.id, &freezers[i]).await {
            failed = Some(e);
            break;
        }
    }
    // CRIU cannot seize tasks below a frozen parent; the containers stay frozen by their own.
    let thawed_pod = held.thaw(job.pod_id).await;
    if let Some(e) = failed.or(thawed_pod.err()) {
        held.thaw_all().await;
        return Err(e);
    }
    (job.on_phase)("frozen");

    let work = match crate::util::private_dir(job.pod_id, "pod-dump") {
        Ok(w) => w,
        Err(e) => {
            held.thaw_all().await;
            (job.on_phase)("thawed");
            return Err(e);
        }
    };
    // Past the bound, every dump is stopped (runc and CRIU killed and waited for) before
    // anything is thawed: a CRIU still running could otherwise re-freeze or write later.
    let limit = job.timeout.unwrap_or(DEFAULT_CHECKPOINT_TIMEOUT);
    let cancel = CancellationToken::new();
    let timer = cancel_after(&cancel, limit);
    let dumps = job
        .containers
        .iter()
        .map(|c| dump_one(runtime, c, &work, job, &cancel));
    // The pod's last PID is read while the dumps run (it took ~35 ms, in the frozen window of
    // a held checkpoint when read after): nothing in the pod forks while its containers are
    // frozen, so every PID the images hold is at most what is read here.
    let (mut outcome, last_pid) = tokio::join!(
        futures::future::join_all(dumps),
        pidns::last_pid(job.pod_id, job.pod_pid)
    );
    drop(timer);
    if cancel.is_cancelled() {
        outcome.insert(0, Err(timed_out(job.pod_id, "checkpoint", limit)));
    }
    let mut lazy: Vec<postcopy::LazyDump> = Vec::new();
    for (_, dump) in outcome.iter_mut().flatten() {
        lazy.extend(dump.take());
    }
    if job.hold && outcome.iter().all(|r| r.is_ok()) {
        // The hold passes to the caller (`stop_held` or `release_held` ends it).
        held.0.clear();
    } else {
        // A post-copy dump lets go of its tasks before they are thawed.
        for dump in lazy.drain(..) {
            dump.end().await;
        }
        held.thaw_all().await;
        (job.on_phase)("thawed");
    }
    let frozen = frozen_at.elapsed();
    // A post-copy dump's CRIU logs into its work directory until it ends (and removes it).
    if lazy.is_empty() {
        let _ = std::fs::remove_dir_all(&work);
    }
    let mut containers = Vec::new();
    for r in outcome {
        let (mut t, _) = r?;
        t.frozen = frozen;
        containers.push(t);
    }
    let last_pid = last_pid.map_err(|e| warn!("pod {}: {e}", job.pod_id)).ok();
    info!(
        "pod {}: {} container(s) dumped, frozen {frozen:?}",
        job.pod_id,
        containers.len()
    );
    Ok(PodCapture {
        frozen,
        containers,
        last_pid,
        lazy,
    })
}

/// Stops the containers a stopping pod checkpoint held: killed while still frozen, then
/// thawed so that the kill lands (containers the user had paused too: their processes go).
pub async fn stop_held<R: CheckpointHooks + ?Sized>(runtime: &R, held: &HeldPod) -> Result<()> {
    let mut first = None;
    for c in &held.containers {
        if let Err(e) = runtime.kill(&c.id, libc::SIGKILL as u32, true).await {
            warn!("{}: stop after checkpoint: {e}", c.id);
        }
    }
    for c in &held.containers {
        let thawed = match freezer_of(&c.id, &c.cgroup_path) {
            Ok(f) => thaw(&c.id, &f).await,
            Err(e) => Err(e),
        };
        if let Err(e) = thawed {
            first.get_or_insert(e);
        }
    }
    first.map_or(Ok(()), Err)
}

/// Ends a hold without stopping: every held container thawed (paused ones were not held).
pub async fn release_held<R: CheckpointHooks + ?Sized>(_runtime: &R, held: &HeldPod) -> Result<()> {
    let mut first = None;
    for c in held.containers.iter().filter(|c| !c.paused) {
        let thawed = match freezer_of(&c.id, &c.cgroup_path) {
            Ok(f) => thaw(&c.id, &f).await,
            Err(e) => Err(e),
        };
        if let Err(e) = thawed {
            log::error!("{}: release after checkpoint: {e}", c.id);
            first.get_or_insert(e);
        }
    }
    first.map_or(Ok(()), Err)
}

/// CRIU does not always say that a dump failed for lack of space (a helper of it just
/// "exited, status=2"): checked right away, while the partial images still fill the disk.
fn with_full_disk(message: String, out: &Path) -> String {
    if message.contains("No space left") {
        return message;
    }
    match nix::sys::statvfs::statvfs(out) {
        Ok(st) if (st.blocks_available() as u128) * (st.fragment_size() as u128) < 4 << 20 => {
            format!(
                "{message}; no space left on the file system of {} (ENOSPC)",
                out.display()
            )
        }
        _ => message,
    }
}

/// Dumps one frozen container of a pod into its directory and captures its files.
async fn dump_one<R: CheckpointHooks + ?Sized>(
    runtime: &R,
    c: &ContainerTarget,
    work: &Path,
    job: &PodCheckpoint<'_>,
    cancel: &CancellationToken,
) -> Result<(Timings, Option<postcopy::LazyDump>)> {
    let copts = CheckpointOpts {
        image_path: c.dir.join(CHECKPOINT_DIR),
        work_path: work.join(&c.id),
        // Always dumped live under our freeze; a stopping checkpoint ends them once its output
        // is safe (runc would otherwise wait for frozen processes to die).
        leave_running: true,
        tcp_established: job.tcp_established,
        file_locks: job.file_locks,
        shell_job: c.terminal,
        cancel: Some(cancel.clone()),
        ..Default::default()
    };
    let t = Instant::now();
    std::fs::create_dir_all(&copts.image_path)
        .map_err(|e| Error::io(&c.id, "create checkpoint dir", e))?;
    std::fs::create_dir_all(&copts.work_path)
        .map_err(|e| Error::io(&c.id, "create work dir", e))?;
    let dumped = if let Some(serve_within) = job.post_copy {
        let copts = CheckpointOpts {
            timeout: Some(serve_within),
            ..copts.clone()
        };
        runtime.checkpoint_lazy(&c.id, &copts).await.map(Some)
    } else {
        runtime.checkpoint(&c.id, &copts).await.map(|_| None)
    };
    let lazy = dumped.map_err(|e| Error::Runtime {
        id: c.label.clone(),
        step: "dump".into(),
        message: with_full_disk(e.to_string(), job.out),
    })?;
    let dump = t.elapsed();
    let t = Instant::now();
    let (id, upper, spec, dir, image) = (
        c.id.clone(),
        c.rootfs_upper.clone(),
        c.spec.clone(),
        c.dir.clone(),
        copts.image_path.clone(),
    );
    blocking(&c.id, "capture files", move || {
        if let Some(upper) = upper {
            rootfs::capture(&id, &upper, &dir)?;
        }
        volumes::capture(&id, &spec, &image).map(drop)
    })
    .await?;
    for f in [DUMP_LOG, STATS_DUMP] {
        let _ = crate::util::copy_private(&copts.work_path.join(f), &c.dir.join(f));
    }
    Ok((
        Timings {
            dump,
            files: t.elapsed(),
            ..Default::default()
        },
        lazy,
    ))
}
