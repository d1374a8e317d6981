//! Delete: removes an exec process, or a container whose processes are gone.

use containerd_shim_protos::{
    api::{self, Status},
    events::task::TaskDelete,
    topics,
};
use log::info;

use super::{exec_name, unmount};
use crate::{
    error::{Error, Result},
    state::Shim,
    util::blocking,
};

pub async fn delete(shim: &Shim, req: api::DeleteRequest) -> Result<api::DeleteResponse> {
    let container = shim.get(&req.id)?;
    let _op = container.op.lock().await;
    if !req.exec_id.is_empty() {
        let name = exec_name(&req.id, &req.exec_id);
        let p = {
            let mut live = container.live();
            let p = live
                .execs
                .get(&req.exec_id)
                .ok_or_else(|| Error::not_found("exec", &name))?;
            if p.status == Status::RUNNING {
                return Err(Error::precondition(
                    &name,
                    "cannot delete a running exec process",
                ));
            }
            live.execs.remove(&req.exec_id).expect("checked above")
        };
        p.io.copies.shutdown().await;
        if let Some(spec) = &p.spec_path {
            let _ = std::fs::remove_file(spec);
        }
        shim.runtime
            .forget_exec(&super::exec_pid_file(&container.bundle, &req.exec_id));
        return Ok(api::DeleteResponse {
            pid: p.pid as u32,
            exit_status: p.exit_status(),
            exited_at: p.exited_at().into(),
            ..Default::default()
        });
    }
    let state = container.state();
    if !state.can_delete() {
        return Err(Error::precondition(
            &req.id,
            format!("cannot delete a container that is {state}; kill it first"),
        ));
    }
    shim.runtime.delete(&req.id, true).await?;
    // A container deleted while only created has no exit yet: its init was killed by the
    // forced delete above, and its watcher records that.
    let (init_io, exec_ios, mount) = {
        let mut live = container.live();
        (
            live.init.io.copies.clone(),
            live.execs
                .values()
                .map(|p| p.io.copies.clone())
                .collect::<Vec<_>>(),
            live.rootfs_mount.take(),
        )
    };
    init_io.shutdown().await;
    if let Some(target) = mount {
        // Off the async workers: an unmount waits for the kernel (over a second here while
        // CRIU dumps another container of the pod), and must not stall every other call.
        // Best effort, like the unmount itself: the delete goes on whatever happens here.
        let _ = blocking(&req.id, "unmount the rootfs", move || {
            unmount(&target);
            Ok(())
        })
        .await;
    }
    let _ = std::fs::remove_file(container.bundle.join("init.pid"));
    for io in exec_ios {
        io.abort().await;
    }
    let resp = {
        let live = container.live();
        api::DeleteResponse {
            pid: live.init.pid as u32,
            exit_status: live.init.exit_status(),
            exited_at: live.init.exited_at().into(),
            ..Default::default()
        }
    };
    shim.remove(&req.id);
    shim.restores.forget(&req.id);
    if let Some(pod) = shim.pod() {
        pod.save_record(shim.ids());
    }
    shim.events
        .publish(
            topics::TASK_DELETE_EVENT_TOPIC,
            Box::new(TaskDelete {
                container_id: req.id.clone(),
                pid: resp.pid,
                exit_status: resp.exit_status,
                exited_at: resp.exited_at.clone(),
                id: req.id.clone(),
                ..Default::default()
            }),
        )
        .await;
    info!("{}: deleted", req.id);
    Ok(resp)
}
