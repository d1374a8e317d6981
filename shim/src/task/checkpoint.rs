//! Task.Checkpoint: one container, consistently (the backend's `checkpoint_container` hook),
//! into the image path containerd gives. On failure nothing new is left there.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use containerd_shim_protos::{
    api, events::task::TaskCheckpointed, protobuf::Message as _, shim::oci::CheckpointOptions,
    topics,
};
use log::info;
use stasis_api::layout::{DumpRecord, DUMP_RECORD};

use crate::{
    error::{Error, Result},
    runtime::{CheckpointOpts, ContainerTarget, Operation, Timings},
    state::{Shim, State},
};

pub async fn checkpoint(shim: &Shim, req: api::CheckpointTaskRequest) -> Result<()> {
    shim.runtime
        .check_operation(&req.id, Operation::Checkpoint, shim.pod().is_some())?;
    let container = shim.get(&req.id)?;
    if let Some(pod) = shim.pod() {
        pod.require_own_pid_ns(&format!("a checkpoint of container {}", req.id))?;
    }
    let _op = container.op.lock().await;
    let state = container.require(|s| s.can_checkpoint(), "checkpoint")?;
    let o = checkpoint_options(&req)?;
    let image_path = if o.image_path.is_empty() {
        req.path.clone()
    } else {
        o.image_path.clone()
    };
    if image_path.is_empty() {
        return Err(Error::invalid(&req.id, "checkpoint without an image path"));
    }
    let work_path = if o.work_path.is_empty() {
        container.bundle.join("criu-work")
    } else {
        PathBuf::from(&o.work_path)
    };
    let (terminal, running_execs) = {
        let live = container.live();
        (live.init.stdio.terminal, live.running_execs())
    };
    let opts = CheckpointOpts {
        image_path: PathBuf::from(&image_path),
        work_path,
        leave_running: !o.exit,
        tcp_established: o.open_tcp,
        ext_unix_sk: o.external_unix_sockets,
        shell_job: o.terminal || terminal,
        file_locks: o.file_locks,
        empty_ns: o.empty_namespaces.clone(),
        cgroups_mode: o.cgroups_mode.clone(),
        cancel: None,
        lazy_pages: false,
        // containerd's Task API carries no bound: the backend's settings give it.
        timeout: Some(shim.checkpoint_bound),
    };
    let target = ContainerTarget {
        id: req.id.clone(),
        label: req.id.clone(),
        cgroup_path: container.cgroup_path.clone(),
        spec: container.spec.clone(),
        paused: state == State::Paused,
        terminal,
        rootfs_upper: container.rootfs_upper.clone(),
        running_execs,
        dir: opts.image_path.clone(),
    };
    let timings = dump(shim, &target, &opts).await?;
    record(&opts, &timings);
    info!(
        "{}: checkpoint to {}: frozen {:?} (dump {:?}, files {:?}), total {:?}{}",
        req.id,
        opts.image_path.display(),
        timings.frozen,
        timings.dump,
        timings.files,
        timings.total,
        if opts.leave_running {
            ", left running"
        } else {
            ", stopped"
        }
    );
    shim.events
        .publish(
            topics::TASK_CHECKPOINTED_EVENT_TOPIC,
            Box::new(TaskCheckpointed {
                container_id: req.id.clone(),
                checkpoint: image_path,
                ..Default::default()
            }),
        )
        .await;
    Ok(())
}

/// The request's `CheckpointOptions` (the defaults when it carries none).
fn checkpoint_options(req: &api::CheckpointTaskRequest) -> Result<CheckpointOptions> {
    let mut o = CheckpointOptions::default();
    if let Some(any) = req.options.as_ref() {
        if any.type_url.ends_with("CheckpointOptions") {
            o = CheckpointOptions::parse_from_bytes(&any.value)
                .map_err(|e| Error::invalid(&req.id, format!("checkpoint options: {e}")))?;
        }
    }
    Ok(o)
}

/// Dumps `target` into `opts.image_path` (created if need be); a failed dump leaves nothing
/// new there.
async fn dump(shim: &Shim, target: &ContainerTarget, opts: &CheckpointOpts) -> Result<Timings> {
    let id = &target.id;
    let created = !opts.image_path.exists();
    std::fs::create_dir_all(&opts.image_path).map_err(|e| {
        Error::io(
            id,
            format!("create image path {}", opts.image_path.display()),
            e,
        )
    })?;
    let before = entries(&opts.image_path);
    std::fs::create_dir_all(&opts.work_path).map_err(|e| {
        Error::io(
            id,
            format!("create work path {}", opts.work_path.display()),
            e,
        )
    })?;
    match shim
        .runtime
        .hooks()
        .checkpoint_container(target, opts)
        .await
    {
        Ok(t) => Ok(t),
        Err(e) => {
            remove_partial(&opts.image_path, &before, created);
            Err(e)
        }
    }
}

/// Keeps the options (the restore must match them) and the timings beside the images.
fn record(o: &CheckpointOpts, t: &Timings) {
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let record = DumpRecord {
        tcp_established: o.tcp_established,
        ext_unix_sk: o.ext_unix_sk,
        file_locks: o.file_locks,
        frozen_ms: ms(t.frozen),
        dump_ms: ms(t.dump),
        files_ms: ms(t.files),
        total_ms: ms(t.total),
    };
    if let Ok(text) = serde_json::to_vec(&record) {
        let _ = crate::util::write_private(&o.image_path.join(DUMP_RECORD), text);
    }
}

/// Lists a directory's entries, to remove exactly what a failed dump added.
fn entries(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

/// Removes what appeared in `dir` since `before` (and `dir` itself if we created it).
fn remove_partial(dir: &Path, before: &[PathBuf], created: bool) {
    if created {
        let _ = std::fs::remove_dir_all(dir);
        return;
    }
    for p in entries(dir) {
        if !before.contains(&p) {
            crate::util::remove_any(&p);
        }
    }
}
