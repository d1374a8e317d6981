//! The pod checkpoint: every selected container of a pod captured at one instant, into an
//! existing empty directory. This file is the runtime-independent part (which containers, in
//! which directories, one checkpoint at a time, metadata after the thaw, nothing left on
//! failure); how the containers are held still and saved is the backend's `checkpoint_pod`.

pub mod metadata;
pub mod source;

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use log::{info, warn};
use stasis_api::checkpoint::{
    CheckpointPodRequest, CheckpointPodResponse, ContainerInfo, Timings as WireTimings,
};

use crate::{
    error::{Error, Result},
    runtime::{ContainerTarget, PodCheckpoint},
    state::{Container, Shim, State},
    util::{self, empty_dir},
};

/// Serialises pod checkpoints: a second one of the same pod is refused, not queued.
#[derive(Default)]
pub struct CheckpointGate(tokio::sync::Mutex<()>);

pub async fn checkpoint_pod(
    shim: &Shim,
    gate: &CheckpointGate,
    req: CheckpointPodRequest,
) -> Result<CheckpointPodResponse> {
    let pod = shim.require_pod(&req.sandbox_id)?;
    let _busy = gate.0.try_lock().map_err(|_| {
        Error::precondition(
            &req.sandbox_id,
            "a checkpoint of this pod is already running",
        )
    })?;
    let out = PathBuf::from(&req.output_path);
    if !out.is_dir() {
        return Err(Error::precondition(
            &req.sandbox_id,
            format!("output path {} is not an existing directory", out.display()),
        ));
    }
    if std::fs::read_dir(&out)
        .map(|mut d| d.next().is_some())
        .unwrap_or(true)
    {
        return Err(Error::precondition(
            &req.sandbox_id,
            format!("output path {} is not empty", out.display()),
        ));
    }
    let opts = req.options.clone().unwrap_or_default();
    let mut infos: HashMap<String, ContainerInfo> = req
        .containers
        .iter()
        .map(|c| (c.id.clone(), c.clone()))
        .collect();
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
    // Hold every selected container's operations for the whole capture, in a fixed order:
    // nothing starts, stops, pauses or execs in them meanwhile.
    let mut selected: Vec<Arc<Container>> = Vec::new();
    for id in &ids {
        selected.push(shim.get(id)?);
    }
    let mut guards = Vec::new();
    for c in &selected {
        guards.push(c.op.lock().await);
    }
    let mut targets = Vec::new();
    let mut names = Vec::new();
    for c in &selected {
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
    let unselected_running: Vec<String> = shim
        .all()
        .into_iter()
        .filter(|c| !ids.contains(&c.id) && c.state().can_checkpoint())
        .map(|c| c.id.clone())
        .collect();

    let start = Instant::now();
    let job = PodCheckpoint {
        pod_id: &pod.id,
        pod_cgroup: &pod.cgroup,
        pod_pid: pod.pid(),
        out: &out,
        containers: &targets,
        unselected_running: &unselected_running,
        leave_running: opts.leave_running,
        tcp_established: opts.tcp_established,
        file_locks: opts.file_locks,
        timeout: (opts.timeout_secs > 0).then(|| Duration::from_secs(opts.timeout_secs as u64)),
    };
    let engine = shim.runtime.name().to_string();
    let written = async {
        let capture = shim.runtime.checkpoint_pod(&job).await?;
        // Metadata and sizes: after the thaw, nothing here needs the pod still. File work,
        // so on the blocking pool.
        let (targets, names, pod, out, engine) = (
            targets.clone(),
            names.clone(),
            pod.clone(),
            out.clone(),
            engine.clone(),
        );
        let per = capture.containers.clone();
        let last_pid = capture.last_pid;
        let leave_running = opts.leave_running;
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
        Ok::<_, Error>((capture, results))
    }
    .await;
    drop(guards);
    let (capture, results) = match written {
        Ok(r) => r,
        Err(e) => {
            empty_dir(&out);
            warn!("pod {}: checkpoint failed: {e}", pod.id);
            return Err(e);
        }
    };
    let total = start.elapsed();
    info!(
        "pod {}: checkpoint of {} container(s) to {}: frozen {:?}, total {:?}",
        pod.id,
        results.len(),
        out.display(),
        capture.frozen,
        total
    );
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
    Ok(CheckpointPodResponse {
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
    })
}
