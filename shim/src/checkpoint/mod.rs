//! The pod checkpoint: every selected container of a pod captured at one instant, into an
//! existing empty directory. This file is the runtime-independent part (which containers, in
//! which directories, one checkpoint at a time, metadata after the thaw, nothing left on
//! failure); how the containers are held still and saved is the backend's `checkpoint_pod`.

mod announce;
pub mod metadata;
pub mod source;

use announce::Announce;

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use log::{info, warn};
use stasis_api::checkpoint::{
    CheckpointPodRequest, CheckpointPodResponse, ContainerInfo, ContainerResult,
    Timings as WireTimings,
};
use tokio::sync::{oneshot, OwnedMutexGuard};

use crate::{
    error::{Error, Result},
    runtime::{ContainerTarget, HeldPod, PodCapture, PodCheckpoint},
    state::{Container, Pod, Shim, State},
    util::{self, empty_dir},
};

/// How a held stopping checkpoint is told to end: stop (true) or release (false), and where
/// the outcome goes.
type FinishTx = oneshot::Sender<(bool, oneshot::Sender<Result<Vec<String>>>)>;

/// Serialises pod checkpoints (a second one of the same pod is refused, not queued) and
/// carries the finish channel of a stopping checkpoint that holds the pod.
#[derive(Default)]
pub struct CheckpointGate {
    busy: Arc<tokio::sync::Mutex<()>>,
    finish: std::sync::Mutex<Option<FinishTx>>,
}

impl CheckpointGate {
    /// The pod's checkpoint slot, or a refusal when a checkpoint of it is running.
    fn take_busy(&self, pod_id: &str) -> Result<OwnedMutexGuard<()>> {
        self.busy
            .clone()
            .try_lock_owned()
            .map_err(|_| Error::precondition(pod_id, "a checkpoint of this pod is already running"))
    }

    fn finish_slot(&self) -> std::sync::MutexGuard<'_, Option<FinishTx>> {
        self.finish.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The longest a stopping checkpoint keeps a pod frozen waiting for FinishCheckpoint.
pub const MAX_HOLD: Duration = Duration::from_secs(3600);

/// A stopping checkpoint's containers, kept still after their capture until its output is
/// safe. It owns the pod's checkpoint slot and the containers' operation locks while it
/// lasts; dropped without an end (a panic), it lets the containers run on.
pub struct Hold {
    runtime: Arc<dyn crate::runtime::OciRuntime>,
    pod: Option<HeldPod>,
    announce: Announce,
    /// Whether `stop` announces `stopped` itself (not when the stop comes before the
    /// checkpoint's `finished`, which must be announced first).
    announce_stop: bool,
    _busy: OwnedMutexGuard<()>,
    _ops: Vec<OwnedMutexGuard<()>>,
}

impl Hold {
    fn ids(p: &HeldPod) -> Vec<String> {
        p.containers.iter().map(|c| c.id.clone()).collect()
    }

    /// The output is safe: the held containers are stopped.
    pub async fn stop(mut self) -> Result<Vec<String>> {
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
            let runtime = self.runtime.clone();
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move { runtime.hooks().release_held(&pod).await });
            }
        }
    }
}

/// Runs a pod checkpoint to its end, whatever happens to the request: the response goes to
/// `reply` once the capture is written; a stopping checkpoint with a hold then keeps the pod
/// frozen until FinishCheckpoint, its hold bound, the shim's shutdown, or the caller vanishing
/// before the reply (each but the first lets the pod run on).
pub async fn run(
    shim: Arc<Shim>,
    gate: Arc<CheckpointGate>,
    req: CheckpointPodRequest,
    reply: oneshot::Sender<Result<CheckpointPodResponse>>,
) {
    let pod_id = req.sandbox_id.clone();
    let out = PathBuf::from(&req.output_path);
    let bound = Duration::from_secs(
        req.options
            .as_ref()
            .map(|o| o.hold_secs as u64)
            .unwrap_or_default(),
    )
    .min(MAX_HOLD);
    let leave_running = req.options.as_ref().is_some_and(|o| o.leave_running);
    let mut announce = Announce::new(
        shim.events.clone(),
        shim.runtime.name(),
        &pod_id,
        &[],
        leave_running,
    );
    let (resp, after) = match checkpoint_pod(&shim, &gate, req, &mut announce).await {
        Ok(r) => r,
        Err(e) => {
            announce.failed(&e);
            let _ = reply.send(Err(e));
            return;
        }
    };
    announce.finished(&resp);
    let hold = match after {
        After::Held(hold) => Some(*hold),
        After::Stopped => {
            announce.phase("stopped");
            None
        }
        After::Nothing => None,
    };
    let Some(hold) = hold else {
        if reply.send(Ok(resp)).is_err() {
            // Nobody learns of this checkpoint: it would only leave the pod's memory behind.
            warn!("pod {pod_id}: the checkpoint's caller is gone; its output removed");
            empty_dir(&out);
        }
        return;
    };
    let (tx, rx) = oneshot::channel();
    *gate.finish_slot() = Some(tx);
    if reply.send(Ok(resp)).is_err() {
        gate.finish_slot().take();
        warn!("pod {pod_id}: the checkpoint's caller is gone; output removed, left running");
        empty_dir(&out);
        let _ = hold.release().await;
        return;
    }
    tokio::select! {
        asked = rx => match asked {
            Ok((stop, done)) => {
                let outcome = if stop { hold.stop().await } else { hold.release().await };
                let _ = done.send(outcome);
            }
            Err(_) => {
                let _ = hold.release().await;
            }
        },
        _ = tokio::time::sleep(bound) => {
            gate.finish_slot().take();
            warn!("pod {pod_id}: no FinishCheckpoint within {bound:?}; left running");
            let _ = hold.release().await;
        }
        _ = shim.shutdown.cancelled() => {
            gate.finish_slot().take();
            warn!("pod {pod_id}: shim shutting down during a checkpoint hold; left running");
            let _ = hold.release().await;
        }
    }
}

/// Ends the hold of a stopping checkpoint (FinishCheckpoint).
pub async fn finish(gate: &CheckpointGate, pod_id: &str, stop: bool) -> Result<Vec<String>> {
    let tx = gate.finish_slot().take().ok_or_else(|| {
        Error::precondition(
            pod_id,
            "no checkpoint of this pod is waiting to finish (a hold that passed its bound left the pod running)",
        )
    })?;
    let (done, outcome) = oneshot::channel();
    tx.send((stop, done)).map_err(|_| {
        Error::precondition(
            pod_id,
            "the checkpoint hold ended meanwhile; the pod runs on",
        )
    })?;
    outcome.await.map_err(|_| {
        Error::other(
            pod_id,
            "finish checkpoint",
            "the hold ended without an outcome",
        )
    })?
}

/// What follows a written checkpoint.
pub enum After {
    /// A live checkpoint: the pod ran on.
    Nothing,
    /// A stopping checkpoint without a hold: its containers were stopped once the output
    /// was synced.
    Stopped,
    /// A stopping checkpoint held until FinishCheckpoint.
    Held(Box<Hold>),
}

/// Captures the selected containers; a stopping checkpoint returns its [`Hold`] when the
/// request asked for one (else the containers are stopped here, once the output is synced).
pub async fn checkpoint_pod(
    shim: &Shim,
    gate: &CheckpointGate,
    req: CheckpointPodRequest,
    announce: &mut Announce,
) -> Result<(CheckpointPodResponse, After)> {
    let pod = shim.require_pod(&req.sandbox_id)?;
    pod.require_own_pid_ns("a checkpoint")?;
    let busy = gate.take_busy(&req.sandbox_id)?;
    let out = PathBuf::from(&req.output_path);
    require_empty_output(&req.sandbox_id, &out)?;
    let opts = req.options.clone().unwrap_or_default();
    let ids = selected_ids(shim, &req)?;
    announce.selected(&ids);
    // Hold every selected container's operations for the whole capture, in a fixed order:
    // nothing starts, stops, pauses or execs in them meanwhile.
    let mut selected: Vec<Arc<Container>> = Vec::new();
    for id in &ids {
        selected.push(shim.get(id)?);
    }
    let mut guards = Vec::new();
    for c in &selected {
        guards.push(c.op.clone().lock_owned().await);
    }
    let (targets, names) = targets_of(&selected, &req, &out)?;
    let unselected_running: Vec<String> = shim
        .all()
        .into_iter()
        .filter(|c| !ids.contains(&c.id) && c.state().can_checkpoint())
        .map(|c| c.id.clone())
        .collect();

    let start = Instant::now();
    let on_phase = announce.phase_sink();
    let job = PodCheckpoint {
        pod_id: &pod.id,
        pod_cgroup: &pod.cgroup,
        pod_pid: pod.pid(),
        out: &out,
        containers: &targets,
        unselected_running: &unselected_running,
        hold: !opts.leave_running,
        tcp_established: opts.tcp_established,
        file_locks: opts.file_locks,
        timeout: Some(match opts.timeout_secs {
            0 => shim.checkpoint_bound,
            secs => Duration::from_secs(secs as u64),
        }),
        on_phase: &on_phase,
    };
    let engine = shim.runtime.name().to_string();
    let written = capture_and_write(shim, &job, &pod, &names, &engine, opts.leave_running).await;
    // From here a stopping checkpoint's containers are held still (its hold must end).
    let hold = match &written {
        Ok(_) if !opts.leave_running => Some(Hold {
            runtime: shim.runtime.clone(),
            pod: Some(HeldPod {
                pod_id: pod.id.clone(),
                containers: targets.clone(),
            }),
            announce: announce.clone(),
            announce_stop: true,
            _busy: busy,
            _ops: guards,
        }),
        _ => {
            drop(guards);
            None
        }
    };
    let after = match hold {
        Some(mut h) if opts.hold_secs == 0 => {
            // Nobody will say the output is safe: it is, once synced; then the pod stops
            // (announced by `run`, after the checkpoint's `finished`).
            h.announce_stop = false;
            if let Err(e) = stop_once_synced(&pod.id, &out, h).await {
                empty_dir(&out);
                return Err(e);
            }
            After::Stopped
        }
        Some(h) => After::Held(Box::new(h)),
        None => After::Nothing,
    };
    let (capture, results) = match written {
        Ok(r) => r,
        Err(e) => {
            empty_dir(&out);
            warn!("pod {}: checkpoint failed: {e}", pod.id);
            return Err(e);
        }
    };
    let total = start.elapsed();
    let (n, frozen) = (results.len(), capture.frozen);
    info!(
        "pod {}: checkpoint of {n} container(s) to {out:?}: frozen {frozen:?}, total {total:?}",
        pod.id
    );
    Ok((response(&capture, results, total, engine), after))
}

/// A pod checkpoint writes into an existing, empty directory only.
fn require_empty_output(pod_id: &str, out: &Path) -> Result<()> {
    if !out.is_dir() {
        return Err(Error::precondition(
            pod_id,
            format!("output path {} is not an existing directory", out.display()),
        ));
    }
    if std::fs::read_dir(out)
        .map(|mut d| d.next().is_some())
        .unwrap_or(true)
    {
        return Err(Error::precondition(
            pod_id,
            format!("output path {} is not empty", out.display()),
        ));
    }
    Ok(())
}

/// The ids of the containers the request selects (all of the pod's when it names none),
/// sorted: the fixed order their locks are taken in.
fn selected_ids(shim: &Shim, req: &CheckpointPodRequest) -> Result<Vec<String>> {
    let mut ids: Vec<String> = if req.containers.is_empty() {
        shim.ids()
    } else {
        req.containers.iter().map(|c| c.id.clone()).collect()
    };
    ids.sort();
    ids.dedup();
    if ids.is_empty() {
        return Err(Error::precondition(
            &req.sandbox_id,
            "the pod has no containers to checkpoint",
        ));
    }
    Ok(ids)
}

/// The selected containers as the backend captures them, with each one's name and info.
type Selected = (Vec<ContainerTarget>, Vec<(String, ContainerInfo)>);

/// Each selected container as the backend captures it, and its name and info for the
/// metadata; refuses a container that cannot be checkpointed in its state.
fn targets_of(
    selected: &[Arc<Container>],
    req: &CheckpointPodRequest,
    out: &Path,
) -> Result<Selected> {
    let mut infos: HashMap<String, ContainerInfo> = req
        .containers
        .iter()
        .map(|c| (c.id.clone(), c.clone()))
        .collect();
    let mut targets = Vec::new();
    let mut names = Vec::new();
    for c in selected {
        let state = c.require(|s| s.can_checkpoint(), "checkpoint")?;
        let info = infos.remove(&c.id).unwrap_or_else(|| ContainerInfo {
            id: c.id.clone(),
            ..Default::default()
        });
        let name = metadata::name_of(&c.id, &info);
        let (terminal, running_execs) = {
            let live = c.live();
            (live.init.stdio.terminal, live.running_execs())
        };
        targets.push(ContainerTarget {
            id: c.id.clone(),
            label: if info.name.is_empty() {
                c.id.clone()
            } else {
                format!("container {} ({})", info.name, c.id)
            },
            cgroup_path: c.cgroup_path.clone(),
            spec: c.spec.clone(),
            paused: state == State::Paused,
            terminal,
            rootfs_upper: c.rootfs_upper.clone(),
            running_execs,
            dir: out.join(metadata::dir_name(&c.id, &name)),
        });
        names.push((name, info));
    }
    Ok((targets, names))
}

/// Has the backend capture the pod, then writes each container's and the pod's metadata.
async fn capture_and_write(
    shim: &Shim,
    job: &PodCheckpoint<'_>,
    pod: &Arc<Pod>,
    names: &[(String, ContainerInfo)],
    engine: &str,
    leave_running: bool,
) -> Result<(PodCapture, Vec<ContainerResult>)> {
    let capture = shim.runtime.hooks().checkpoint_pod(job).await?;
    // Metadata and sizes: after the thaw, nothing here needs the pod still. File work,
    // so on the blocking pool.
    let (targets, names, pod, out, engine) = (
        job.containers.to_vec(),
        names.to_vec(),
        pod.clone(),
        job.out.to_path_buf(),
        engine.to_string(),
    );
    let per = capture.containers.clone();
    let last_pid = capture.last_pid;
    let results = util::blocking(&pod.id.clone(), "write metadata", move || {
        let mut results = Vec::new();
        for ((t, (_, info)), timings) in targets.iter().zip(&names).zip(&per) {
            results.push(metadata::write_container(
                t,
                info,
                timings,
                leave_running,
                &engine,
            )?);
        }
        let named: Vec<(String, &ContainerTarget)> = names
            .iter()
            .map(|(n, _)| n.clone())
            .zip(targets.iter())
            .collect();
        metadata::write_pod(&out, &pod, &named, &engine, last_pid)?;
        Ok(results)
    })
    .await?;
    Ok((capture, results))
}

/// Ends the hold of a stopping checkpoint nobody will finish: the pod stops once the output
/// is synced (else it runs on).
async fn stop_once_synced(pod_id: &str, out: &Path, hold: Hold) -> Result<()> {
    let (id, dir) = (pod_id.to_string(), out.to_path_buf());
    let synced = util::blocking(pod_id, "sync checkpoint", move || util::sync_fs(&id, &dir)).await;
    match synced {
        Ok(()) => hold.stop().await.map(|_| ()),
        Err(e) => {
            let _ = hold.release().await;
            Err(e)
        }
    }
}

/// The reply: each container's result and the pod's timings (dump and file times are the
/// slowest container's).
fn response(
    capture: &PodCapture,
    results: Vec<ContainerResult>,
    total: Duration,
    engine: String,
) -> CheckpointPodResponse {
    let dump = capture
        .containers
        .iter()
        .map(|t| t.dump)
        .max()
        .unwrap_or_default();
    let files = capture
        .containers
        .iter()
        .map(|t| t.files)
        .max()
        .unwrap_or_default();
    CheckpointPodResponse {
        containers: results,
        timings: Some(WireTimings {
            frozen_ms: metadata::ms(capture.frozen),
            dump_ms: metadata::ms(dump),
            rootfs_ms: metadata::ms(files),
            total_ms: metadata::ms(total),
            ..Default::default()
        })
        .into(),
        engine,
        ..Default::default()
    }
}
