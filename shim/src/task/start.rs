//! Start: runs a created container (or restores one created from a checkpoint), or starts an
//! exec process.

use containerd_shim_protos::{
    api::{self, Status},
    events::task::{TaskExecStarted, TaskStart},
    topics,
};
use log::info;

use super::{exec_name, restore, watch};
use crate::{
    error::{Error, Result},
    process::stdio,
    state::{Shim, State, Transition},
};

pub async fn start(shim: &Shim, req: api::StartRequest) -> Result<api::StartResponse> {
    let container = shim.get(&req.id)?;
    let _op = container.op.lock().await;
    if !req.exec_id.is_empty() {
        return start_exec(shim, &req).await;
    }
    let pid = match container.state() {
        State::Created => {
            shim.runtime.start(&req.id).await?;
            // The process may already have exited (and the watcher said so): keep STOPPED.
            if container.state() == State::Created {
                container.transition(Transition::Start)?;
            }
            container.live().init.pid
        }
        State::Restorable { image } => restore::restore_init(shim, &container, &image).await?,
        other => {
            return Err(Error::precondition(
                &req.id,
                format!("cannot start a container that is {other}"),
            ))
        }
    };
    shim.events
        .publish(
            topics::TASK_START_EVENT_TOPIC,
            Box::new(TaskStart {
                container_id: req.id.clone(),
                pid: pid as u32,
                ..Default::default()
            }),
        )
        .await;
    info!("{}: started", req.id);
    Ok(api::StartResponse {
        pid: pid as u32,
        ..Default::default()
    })
}

async fn start_exec(shim: &Shim, req: &api::StartRequest) -> Result<api::StartResponse> {
    let container = shim.get(&req.id)?;
    let name = exec_name(&req.id, &req.exec_id);
    container.require(|s| s.can_exec(), &format!("start exec {} in", req.exec_id))?;
    let (spec_path, stdio_cfg, bundle) = {
        let live = container.live();
        let exec = live
            .execs
            .get(&req.exec_id)
            .ok_or_else(|| Error::not_found("exec", &name))?;
        if exec.status != Status::CREATED {
            return Err(Error::precondition(&name, "exec process already started"));
        }
        (
            exec.spec_path.clone().unwrap_or_default(),
            exec.stdio.clone(),
            container.bundle.clone(),
        )
    };
    let mut prepared = stdio::prepare(&req.id, &stdio_cfg).await?;
    let pid_file = super::exec_pid_file(&bundle, &req.exec_id);
    let since = std::time::Instant::now();
    let runtime_io = prepared.take_runtime();
    if let Err(e) = shim
        .runtime
        .exec(&req.id, &spec_path, runtime_io, &pid_file)
        .await
    {
        prepared.io.copies.abort().await;
        return Err(e);
    }
    let io = prepared.finish(&req.id).await?;
    let pid = stdio::read_pid(&req.id, &pid_file)?;
    let _ = std::fs::remove_file(&pid_file);
    {
        let mut live = container.live();
        let exec = live
            .execs
            .get_mut(&req.exec_id)
            .ok_or_else(|| Error::not_found("exec", &name))?;
        exec.pid = pid;
        exec.io = io;
        exec.status = Status::RUNNING;
    }
    watch::exit(shim, container.clone(), req.exec_id.clone(), pid, since);
    shim.events
        .publish(
            topics::TASK_EXEC_STARTED_EVENT_TOPIC,
            Box::new(TaskExecStarted {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                pid: pid as u32,
                ..Default::default()
            }),
        )
        .await;
    Ok(api::StartResponse {
        pid: pid as u32,
        ..Default::default()
    })
}
