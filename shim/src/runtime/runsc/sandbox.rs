//! gVisor's pod rules. A pod is one gVisor sandbox: `runsc checkpoint` of its root saves every
//! container at one instant (their writable layers live in the sandbox's memory), so there is
//! no freezer and no CRIU. What follows from that lives here: which operations gVisor cannot
//! do on one container of a pod, how a pod and a plain container are checkpointed (named
//! volumes, which live on the host, are copied with the sandbox paused), and where a pod's
//! sandbox image is.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use log::warn;
use stasis_api::layout::{CHECKPOINT_DIR, SANDBOX_IMAGE_DIR};

use super::Runsc;
use crate::{
    error::{Error, Result},
    fscapture::volumes,
    runtime::{
        cancel_after, past_bound, timed_out, CheckpointHooks, CheckpointOpts, ContainerTarget,
        HeldPod, OciRuntime, Operation, PodCapture, PodCheckpoint, Timings,
        DEFAULT_CHECKPOINT_TIMEOUT,
    },
    util::blocking,
};

pub fn check_operation(engine: &str, id: &str, op: Operation, in_pod: bool) -> Result<()> {
    if !in_pod {
        return Ok(());
    }
    match op {
        // runsc pauses the whole sandbox kernel, not one container of it.
        Operation::Pause => Err(Error::precondition(
            id,
            format!(
                "{engine} cannot pause one container of a pod, it would pause the whole pod (containerd pauses a task before checkpointing it: to checkpoint, checkpoint the pod with stasisctl pod checkpoint)"
            ),
        )),
        Operation::Checkpoint => Err(Error::precondition(
            id,
            format!(
                "{engine} saves a pod's sandbox as a whole, not one container of it: checkpoint the pod (stasisctl pod checkpoint)"
            ),
        )),
    }
}

/// A container of a gVisor sandbox that cannot be signalled (created, never started) ends
/// with the sandbox itself: not worth waiting for.
pub async fn stop_for_pod(runsc: &Runsc, id: &str) -> Result<bool> {
    match runsc.kill(id, libc::SIGKILL as u32, true).await {
        Ok(()) => Ok(true),
        Err(e) => {
            warn!("{id}: kill: {e}; it ends with its sandbox");
            Ok(false)
        }
    }
}

pub fn pod_restore_image(runsc: &Runsc, pod_id: &str, dir: &Path) -> Result<PathBuf> {
    let image = dir.join(SANDBOX_IMAGE_DIR);
    if !runsc.has_image(&image) {
        return Err(Error::invalid(
            pod_id,
            format!("{} holds no {} sandbox image", dir.display(), runsc.name()),
        ));
    }
    Ok(image)
}

async fn capture_volumes(target: &ContainerTarget, image: &Path) -> Result<()> {
    let (id, spec, image) = (target.id.clone(), target.spec.clone(), image.to_path_buf());
    blocking(&target.id, "capture volumes", move || {
        volumes::capture(&id, &spec, &image).map(drop)
    })
    .await
}

/// Stops the containers of a sandbox a stopping checkpoint held paused. runsc refuses to
/// signal a paused sandbox, so the kills follow the resume at once (the one moment gVisor
/// runs between a stopping checkpoint and its end).
pub async fn stop_held(runsc: &Runsc, held: &HeldPod) -> Result<()> {
    let resumed = resume_sandbox(runsc, &held.pod_id).await;
    for c in &held.containers {
        if let Err(e) = runsc.kill(&c.id, libc::SIGKILL as u32, true).await {
            warn!("{}: stop after checkpoint: {e}", c.id);
        }
    }
    resumed
}

/// Ends a hold without stopping: the sandbox resumes.
pub async fn release_held(runsc: &Runsc, held: &HeldPod) -> Result<()> {
    resume_sandbox(runsc, &held.pod_id).await
}

/// Resumes a sandbox paused for a volume copy. Never leaves it paused silently: retries
/// once, and an error the caller returns if the checkpoint itself succeeded.
async fn resume_sandbox(runsc: &Runsc, id: &str) -> Result<()> {
    let mut resumed = runsc.resume(id).await;
    if let Err(e) = &resumed {
        warn!("{id}: resume after checkpoint: {e}; retrying");
        tokio::time::sleep(Duration::from_millis(200)).await;
        resumed = runsc.resume(id).await;
    }
    resumed
}

/// A plain gVisor container (its own sandbox): `runsc checkpoint`, with the sandbox paused
/// around it when named volumes must match the saved memory.
pub async fn checkpoint_container(
    runsc: &Runsc,
    target: &ContainerTarget,
    opts: &CheckpointOpts,
) -> Result<Timings> {
    let id = target.id.as_str();
    let start = Instant::now();
    // A stopping checkpoint is taken live with the sandbox paused and ends the container only
    // once the image and volumes are on disk: a failure leaves it running.
    let stop = !opts.leave_running;
    let pause = !target.paused && (stop || volumes::wanted(&target.spec));
    if pause {
        runsc.pause(id).await?;
    }
    // The bound containerd does not set: past it runsc is killed and waited for.
    let limit = opts.timeout.unwrap_or(DEFAULT_CHECKPOINT_TIMEOUT);
    let cancel = opts.cancel.clone().unwrap_or_default();
    let (bound_from, timer) = (Instant::now(), cancel_after(&cancel, limit));
    let live = CheckpointOpts {
        leave_running: true,
        cancel: Some(cancel.clone()),
        ..opts.clone()
    };
    let result = async {
        let t = Instant::now();
        runsc.checkpoint(id, &live).await?;
        let dump = t.elapsed();
        let t = Instant::now();
        capture_volumes(target, &opts.image_path).await?;
        if stop {
            // Complete on disk before the container ends (a live one runs on; containerd
            // syncs the blob it makes of the images).
            let (owned, image) = (id.to_string(), opts.image_path.clone());
            blocking(id, "sync", move || crate::util::sync_fs(&owned, &image)).await?;
        }
        Ok::<_, Error>((dump, t.elapsed()))
    }
    .await;
    drop(timer);
    let result = match result {
        Err(_) if past_bound(&cancel, bound_from, limit) => Err(timed_out(id, "checkpoint", limit)),
        r => r,
    };
    let stopping = stop && result.is_ok();
    let frozen = if pause || stopping {
        let resumed = resume_sandbox(runsc, id).await;
        if stopping {
            // runsc refuses to signal a paused sandbox ("cannot signal container in state
            // paused"): the kill follows the resume at once, whoever had paused it.
            if let Err(e) = runsc.kill(id, libc::SIGKILL as u32, true).await {
                warn!("{id}: stop after checkpoint: {e}");
            }
        }
        let window = start.elapsed();
        if result.is_ok() {
            resumed?;
        }
        window
    } else {
        Duration::ZERO
    };
    let (dump, files) = result?;
    Ok(Timings {
        frozen,
        dump,
        files,
        total: start.elapsed(),
    })
}

/// A pod: one `runsc checkpoint` of the sandbox root into `<out>/sandbox`, then each
/// container's volumes into its own `checkpoint/`; the sandbox paused around both if any
/// volume is captured.
pub async fn checkpoint_pod(runsc: &Runsc, job: &PodCheckpoint<'_>) -> Result<PodCapture> {
    let pod_id = job.pod_id;
    refuse_uncapturable(runsc, job)?;
    for c in job.containers {
        std::fs::create_dir_all(&c.dir)
            .map_err(|e| Error::io(&c.id, "create checkpoint dir", e))?;
    }
    let copts = CheckpointOpts {
        image_path: job.out.join(SANDBOX_IMAGE_DIR),
        // Stopping is done after the capture, container by container.
        leave_running: true,
        ..Default::default()
    };
    std::fs::create_dir_all(&copts.image_path)
        .map_err(|e| Error::io(pod_id, "create sandbox image dir", e))?;
    // Volumes live on the host, outside gVisor's image: capturing them at the same instant
    // needs the whole sandbox paused around the checkpoint and the copy.
    let with_volumes = job.containers.iter().any(|c| volumes::wanted(&c.spec));
    // Paused for volumes, and for a stopping checkpoint's hold.
    let pause = with_volumes || job.hold;
    let t = Instant::now();
    if pause {
        runsc.pause(pod_id).await?;
    }
    // Unpaused, runsc stops the sandbox's world itself for its save.
    (job.on_phase)("frozen");
    let captured = capture_sandbox(runsc, job, copts, with_volumes).await;
    // A hold keeps the sandbox paused until `stop_held` or `release_held`.
    if pause && !(job.hold && captured.is_ok()) {
        let resumed = resume_sandbox(runsc, pod_id).await;
        if captured.is_ok() {
            resumed?;
        }
    }
    if !(job.hold && captured.is_ok()) {
        (job.on_phase)("thawed");
    }
    captured?;
    let frozen = t.elapsed();
    Ok(PodCapture {
        frozen,
        containers: job
            .containers
            .iter()
            .map(|_| Timings {
                frozen,
                dump: frozen,
                ..Default::default()
            })
            .collect(),
        // gVisor's PID namespace is its own: the restore needs no reservation.
        last_pid: None,
        lazy: Vec::new(),
    })
}

/// Refuses a pod checkpoint gVisor's whole-sandbox image cannot take (or could not restore).
fn refuse_uncapturable(runsc: &Runsc, job: &PodCheckpoint<'_>) -> Result<()> {
    let pod_id = job.pod_id;
    // Every live container of the sandbox is in its image, so all must be selected.
    if let Some(other) = job.unselected_running.first() {
        return Err(Error::precondition(
            pod_id,
            format!(
                "{} saves the whole sandbox: container {other} runs too, so select every running container of the pod (or none)",
                runsc.name()
            ),
        ));
    }
    if job.tcp_established || job.file_locks {
        return Err(Error::invalid(
            pod_id,
            format!(
                "{} has no --tcp-established or --file-locks: gVisor saves sockets and locks itself",
                runsc.name()
            ),
        ));
    }
    // gVisor saves an exec'd process with host stdio it cannot reopen at restore: such an
    // image would not restore, so refuse before taking it.
    for c in job.containers {
        if let Some(exec) = c.running_execs.first() {
            return Err(Error::precondition(
                &c.id,
                format!(
                    "exec {exec} is still running; {} cannot restore a sandbox saved with exec processes, wait for them to end",
                    runsc.name()
                ),
            ));
        }
    }
    Ok(())
}

/// `runsc checkpoint` of the sandbox into `copts.image_path`, within the job's bound, then
/// (`with_volumes`) each container's volumes.
async fn capture_sandbox(
    runsc: &Runsc,
    job: &PodCheckpoint<'_>,
    copts: CheckpointOpts,
    with_volumes: bool,
) -> Result<()> {
    let pod_id = job.pod_id;
    let limit = job.timeout.unwrap_or(DEFAULT_CHECKPOINT_TIMEOUT);
    let cancel = tokio_util::sync::CancellationToken::new();
    let _timer = cancel_after(&cancel, limit);
    let copts = CheckpointOpts {
        cancel: Some(cancel.clone()),
        ..copts
    };
    let dumped = runsc.checkpoint(pod_id, &copts).await;
    // Past the bound runsc was killed and waited for: say so plainly.
    let dumped = if cancel.is_cancelled() {
        Err(timed_out(pod_id, "checkpoint", limit))
    } else {
        dumped
    };
    dumped.map_err(|e| Error::Runtime {
        id: format!("pod {pod_id}"),
        step: "sandbox checkpoint".into(),
        message: e.to_string(),
    })?;
    if with_volumes {
        for c in job.containers {
            capture_volumes(c, &c.dir.join(CHECKPOINT_DIR)).await?;
        }
    }
    Ok(())
}

/// Removes what runsc keeps for a deleted sandbox root `id` and every container of its
/// sandbox (`<container>_sandbox:<sandbox>.state|.lock`, the root's own being
/// `<id>_sandbox:<id>`): a runsc call that races a container's or the sandbox's end (a kill
/// right after a held sandbox's resume, a pod stop right after a container's delete) loads a
/// state file that is gone and leaves its lock file behind for good.
pub(super) fn forget_sandbox(root: &Path, id: &str) {
    let of_sandbox = format!("_sandbox:{id}.");
    let own = format!("{id}_sandbox:");
    for entry in std::fs::read_dir(root).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.contains(&of_sandbox) || name.starts_with(&own) {
            log::debug!("{id}: remove runsc's {}", entry.path().display());
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sandboxs_end_removes_its_containers_state_too() {
        let dir = std::env::temp_dir().join(format!("stasis-runsc-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for name in [
            "pod_sandbox:pod.state",
            "pod_sandbox:pod.lock",
            "app_sandbox:pod.lock",
            "app_sandbox:other.lock",
            "podx_sandbox:podx.state",
        ] {
            std::fs::write(dir.join(name), b"").unwrap();
        }
        forget_sandbox(&dir, "pod");
        let mut left: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(left, ["app_sandbox:other.lock", "podx_sandbox:podx.state"]);
    }
}
