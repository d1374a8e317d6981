//! The pod checkpoint: every selected container of a pod captured at one instant, into an
//! existing empty directory. This file is the runtime-independent part (which containers, in
//! which directories, one checkpoint at a time, metadata after the thaw, nothing left on
//! failure); how the containers are held still and saved is the backend's `checkpoint_pod`.

mod announce;
mod hold;
pub mod metadata;
mod serve_pages;
pub mod source;

use announce::Announce;
pub use hold::Hold;

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
type FinishTx = oneshot::Sender<FinishAsk>;
/// FinishCheckpoint's word: stop (true) or release, and where the outcome goes.
type FinishAsk = (bool, oneshot::Sender<Result<Vec<String>>>);

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
    // Post-copy: a transfer over for its holder (stasisctl gone, say) ends the hold without
    // waiting for the bound.
    let broken = hold.pages_broken();
    let mut rx = rx;
    tokio::select! {
        asked = &mut rx => finish_asked(asked, hold).await,
        _ = tokio::time::sleep(bound) => {
            gate.finish_slot().take();
            warn!("pod {pod_id}: no FinishCheckpoint within {bound:?}; left running");
            let _ = hold.release().await;
        }
        _ = broken => {
            // A caller that is still there says so itself a moment later: its word first.
            match tokio::time::timeout(Duration::from_secs(3), &mut rx).await {
                Ok(asked) => finish_asked(asked, hold).await,
                Err(_) => {
                    gate.finish_slot().take();
                    warn!("pod {pod_id}: its post-copy transfer ended without a FinishCheckpoint; left running");
                    let _ = hold.release().await;
                }
            }
        }
        _ = shim.shutdown.cancelled() => {
            gate.finish_slot().take();
            warn!("pod {pod_id}: shim shutting down during a checkpoint hold; left running");
            let _ = hold.release().await;
        }
    }
}

/// Ends a hold as FinishCheckpoint asked (its caller gone: released).
async fn finish_asked(
    asked: std::result::Result<FinishAsk, oneshot::error::RecvError>,
    hold: Hold,
) {
    match asked {
        Ok((stop, done)) => {
            let outcome = if stop {
                hold.stop().await
            } else {
                hold.release().await
            };
            let _ = done.send(outcome);
        }
        Err(_) => {
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
    if opts.post_copy {
        check_post_copy(shim, &req.sandbox_id, &opts)?;
    }
    let ids = selected_ids(shim, &req)?;
    announce.selected(&ids);
    // Hold every selected container's operations for the whole capture, in a fixed order:
    // nothing starts, stops, pauses or execs in them meanwhile.
    let (selected, guards) = lock_selected(shim, &ids).await?;
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
        post_copy: opts
            .post_copy
            .then(|| Duration::from_secs(opts.hold_secs as u64).min(MAX_HOLD)),
        timeout: Some(match opts.timeout_secs {
            0 => shim.checkpoint_bound,
            secs => Duration::from_secs(secs as u64),
        }),
        on_phase: &on_phase,
    };
    let engine = shim.runtime.name().to_string();
    let captured = shim.runtime.hooks().checkpoint_pod(&job).await;
    // From here a stopping checkpoint's containers are held still (its hold must end).
    let mut hold = match &captured {
        Ok(_) if !opts.leave_running => Some(Hold::new(
            shim.runtime.clone(),
            HeldPod {
                pod_id: pod.id.clone(),
                containers: targets.clone(),
            },
            announce.clone(),
            (busy, guards),
        )),
        _ => {
            drop(guards);
            None
        }
    };
    let written = match captured {
        Ok(c) => write_capture(&job, (&pod, &names, &engine), c, hold.as_mut()).await,
        Err(e) => Err(e),
    };
    if written.is_err() {
        // Whatever failed after the capture (the metadata on a full disk, the page
        // service), the held containers run on.
        if let Some(h) = hold.take() {
            let _ = h.release().await;
        }
    }
    let page_socket = hold.as_ref().and_then(Hold::page_socket);
    let after = after_capture(hold, opts.hold_secs, &pod.id, &out).await?;
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
    let mut resp = response(&capture, results, total, engine);
    resp.page_socket = page_socket.unwrap_or_default();
    Ok((resp, after))
}

/// What follows the capture: nothing (a live checkpoint), the pod held for FinishCheckpoint,
/// or (no hold asked for) the pod stopped once the output is synced.
async fn after_capture(
    hold: Option<Hold>,
    hold_secs: u32,
    pod_id: &str,
    out: &Path,
) -> Result<After> {
    match hold {
        Some(mut h) if hold_secs == 0 => {
            // Nobody will say the output is safe: it is, once synced; then the pod stops
            // (announced by `run`, after the checkpoint's `finished`).
            h.announce_stop = false;
            if let Err(e) = stop_once_synced(pod_id, out, h).await {
                empty_dir(out);
                return Err(e);
            }
            Ok(After::Stopped)
        }
        Some(h) => Ok(After::Held(Box::new(h))),
        None => Ok(After::Nothing),
    }
}

/// The selected containers, each one's operation lock taken in a fixed order: nothing
/// starts, stops, pauses or execs in them during the capture.
async fn lock_selected(
    shim: &Shim,
    ids: &[String],
) -> Result<(Vec<Arc<Container>>, Vec<OwnedMutexGuard<()>>)> {
    let mut selected: Vec<Arc<Container>> = Vec::new();
    for id in ids {
        selected.push(shim.get(id)?);
    }
    let mut guards = Vec::new();
    for c in &selected {
        guards.push(c.op.clone().lock_owned().await);
    }
    Ok((selected, guards))
}

/// Post-copy holds the pod until the target has its pages, through a CRIU backend, on a
/// node whose pipes CRIU's page server can grow.
fn check_post_copy(
    shim: &Shim,
    pod_id: &str,
    opts: &stasis_api::checkpoint::CheckpointOptions,
) -> Result<()> {
    if opts.leave_running || opts.hold_secs == 0 {
        return Err(Error::invalid(
            pod_id,
            "post-copy is a stopping checkpoint with a hold (leave_running false, hold_secs > 0)",
        ));
    }
    if !shim.runtime.hooks().supports_lazy_restore() {
        return Err(Error::precondition(
            pod_id,
            format!(
                "{} cannot serve pages after the checkpoint (post-copy needs a CRIU runtime)",
                shim.runtime.name()
            ),
        ));
    }
    crate::runtime::postcopy::check_node(pod_id)
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

/// After the backend's capture: post-copy's page service started (in the hold, which ends
/// it), then each container's and the pod's metadata written.
async fn write_capture(
    job: &PodCheckpoint<'_>,
    (pod, names, engine): (&Arc<Pod>, &[(String, ContainerInfo)], &str),
    mut capture: PodCapture,
    hold: Option<&mut Hold>,
) -> Result<(PodCapture, Vec<ContainerResult>)> {
    let dumps = std::mem::take(&mut capture.lazy);
    match hold {
        Some(h) if !dumps.is_empty() => {
            h.pages = Some(serve_pages::PageService::start(
                &pod.id,
                job.containers,
                dumps,
            )?)
        }
        _ => drop(dumps),
    }
    let leave_running = !job.hold;
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
