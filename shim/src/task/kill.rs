//! Kill: signals a container's processes (or one exec), and stopping every container when the
//! pod stops.

use std::time::Duration;

use containerd_shim_protos::api::{self, Status};
use log::warn;

use super::exec_name;
use crate::{
    error::{Error, Result},
    state::{Shim, State},
};

pub async fn kill(shim: &Shim, req: api::KillRequest) -> Result<()> {
    let container = shim.get(&req.id)?;
    let _op = container.op.lock().await;
    if req.exec_id.is_empty() {
        if container.state() == State::Stopped && !req.all {
            return Err(Error::ProcessFinished { id: req.id.clone() });
        }
        return shim.runtime.kill(&req.id, req.signal, req.all).await;
    }
    let name = exec_name(&req.id, &req.exec_id);
    let pid = {
        let live = container.live();
        let p = live
            .execs
            .get(&req.exec_id)
            .ok_or_else(|| Error::not_found("exec", &name))?;
        if p.status != Status::RUNNING {
            return Err(Error::ProcessFinished { id: name });
        }
        p.pid
    };
    let pid_file = super::exec_pid_file(&container.bundle, &req.exec_id);
    shim.runtime
        .kill_exec(&req.id, pid, &pid_file, req.signal)
        .await
}

/// Kills every container's processes (the pod stops) and waits up to `timeout` for their
/// inits to exit.
pub async fn kill_all(shim: &Shim, timeout: Duration) {
    let mut waits = Vec::new();
    for container in shim.all() {
        let _op = container.op.lock().await;
        let (state, pid, exited) = {
            let live = container.live();
            (
                live.state.clone(),
                live.init.pid,
                live.init.exited.subscribe(),
            )
        };
        if !state.has_process() || pid == 0 {
            continue;
        }
        if state == State::Paused {
            let _ = shim.runtime.resume(&container.id).await;
        }
        match shim.runtime.stop_for_pod(&container.id).await {
            Ok(true) => waits.push(exited),
            Ok(false) => {}
            Err(e) => {
                warn!("{}: kill: {e}", container.id);
                waits.push(exited);
            }
        }
    }
    let all = async {
        for mut rx in waits {
            let _ = rx.wait_for(|e| e.is_some()).await;
        }
    };
    if tokio::time::timeout(timeout, all).await.is_err() {
        warn!("containers did not all exit within {timeout:?}");
    }
}
