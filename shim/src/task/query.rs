//! The Task API's questions and small requests: State, Pids, Wait, Stats, Update, ResizePty,
//! CloseIO, and the pid Connect reports. Each also answers for the pod's sandbox id where
//! containerd asks about it (after a restart). None of them waits for a running operation.

use std::collections::HashMap;

use containerd_shim_protos::{
    api::{self, Status},
    protobuf::MessageField,
};
use protobuf::well_known_types::any::Any;

use super::exec_name;
use crate::{
    cgroup,
    error::{Error, Result},
    process::stdio,
    state::{timestamp, Shim},
};

pub async fn state(shim: &Shim, req: api::StateRequest) -> Result<api::StateResponse> {
    if let Some(pod) = shim.pod_named(&req.id) {
        let exit = pod.exit();
        return Ok(api::StateResponse {
            id: req.id.clone(),
            bundle: pod.bundle.display().to_string(),
            pid: pod.pid() as u32,
            status: if exit.is_some() {
                Status::STOPPED
            } else {
                Status::RUNNING
            }
            .into(),
            exit_status: exit.map(|e| e.status as u32).unwrap_or_default(),
            exited_at: exit.map(|e| timestamp(e.at)).into(),
            ..Default::default()
        });
    }
    let container = shim.get(&req.id)?;
    let live = container.live();
    let p = live
        .process(&req.exec_id)
        .ok_or_else(|| Error::not_found("exec", exec_name(&req.id, &req.exec_id)))?;
    let status = live.status_of(&req.exec_id).unwrap_or(Status::UNKNOWN);
    Ok(api::StateResponse {
        id: req.id.clone(),
        bundle: container.bundle.display().to_string(),
        pid: p.pid as u32,
        status: status.into(),
        stdin: p.stdio.stdin.clone(),
        stdout: p.stdio.stdout.clone(),
        stderr: p.stdio.stderr.clone(),
        terminal: p.stdio.terminal,
        exit_status: p.exit_status(),
        exited_at: p.exited_at().into(),
        exec_id: req.exec_id.clone(),
        ..Default::default()
    })
}

pub async fn pids(shim: &Shim, id: &str) -> Result<api::PidsResponse> {
    if let Some(pod) = shim.pod_named(id) {
        return Ok(api::PidsResponse {
            processes: vec![api::ProcessInfo {
                pid: pod.pid() as u32,
                ..Default::default()
            }],
            ..Default::default()
        });
    }
    let container = shim.get(id)?;
    let exec_pids: HashMap<u32, String> = container
        .live()
        .execs
        .values()
        .map(|p| (p.pid as u32, p.exec_id.clone()))
        .collect();
    let pids = shim.runtime.pids(id).await?;
    let processes = pids
        .into_iter()
        .map(|pid| {
            let mut info = api::ProcessInfo {
                pid,
                ..Default::default()
            };
            if let Some(exec_id) = exec_pids.get(&pid) {
                let details = containerd_shim_protos::shim::oci::ProcessDetails {
                    exec_id: exec_id.clone(),
                    ..Default::default()
                };
                if let Ok(any) = Any::pack(&details) {
                    info.info = MessageField::some(any);
                }
            }
            info
        })
        .collect();
    Ok(api::PidsResponse {
        processes,
        ..Default::default()
    })
}

pub async fn wait(shim: &Shim, req: api::WaitRequest) -> Result<api::WaitResponse> {
    let mut rx = if let Some(pod) = shim.pod_named(&req.id) {
        pod.wait_exit()
    } else {
        let container = shim.get(&req.id)?;
        let live = container.live();
        live.process(&req.exec_id)
            .ok_or_else(|| Error::not_found("exec", exec_name(&req.id, &req.exec_id)))?
            .exited
            .subscribe()
    };
    let exit = loop {
        if let Some(exit) = *rx.borrow_and_update() {
            break exit;
        }
        if rx.changed().await.is_err() {
            return Err(Error::not_found("process", format!("{} (deleted)", req.id)));
        }
    };
    Ok(api::WaitResponse {
        exit_status: exit.status as u32,
        exited_at: MessageField::some(timestamp(exit.at)),
        ..Default::default()
    })
}

pub async fn stats(shim: &Shim, id: &str) -> Result<api::StatsResponse> {
    let path = shim.get(id)?.cgroup_path.clone();
    let stats = cgroup::metrics(id, &path)?;
    Ok(api::StatsResponse {
        stats: MessageField::some(stats),
        ..Default::default()
    })
}

pub async fn update(shim: &Shim, req: api::UpdateTaskRequest) -> Result<()> {
    let container = shim.get(&req.id)?;
    let _op = container.op.lock().await;
    let resources = req
        .resources
        .as_ref()
        .ok_or_else(|| Error::invalid(&req.id, "update without resources"))?;
    shim.runtime.update(&req.id, &resources.value).await
}

pub async fn resize_pty(shim: &Shim, req: api::ResizePtyRequest) -> Result<()> {
    let container = shim.get(&req.id)?;
    let live = container.live();
    let p = live
        .process(&req.exec_id)
        .ok_or_else(|| Error::not_found("exec", exec_name(&req.id, &req.exec_id)))?;
    let pty =
        p.io.pty
            .as_ref()
            .ok_or_else(|| Error::precondition(&req.id, "process has no terminal"))?;
    stdio::resize(pty, req.width, req.height).map_err(|e| Error::io(&req.id, "resize terminal", e))
}

pub async fn close_io(shim: &Shim, req: api::CloseIORequest) -> Result<()> {
    let container = shim.get(&req.id)?;
    let live = container.live();
    let p = live
        .process(&req.exec_id)
        .ok_or_else(|| Error::not_found("exec", exec_name(&req.id, &req.exec_id)))?;
    if req.stdin {
        p.io.copies.close_input();
    }
    Ok(())
}

/// The pid of a container's init (or of the pod's pause process), for Connect.
pub async fn connect_pid(shim: &Shim, id: &str) -> Result<u32> {
    if let Some(pod) = shim.pod_named(id) {
        return Ok(pod.pid() as u32);
    }
    Ok(shim.get(id)?.live().init.pid as u32)
}
