//! Watchers started with a process: its exit (recorded, output drained, containerd told) and
//! the OOM events of its cgroup.

use std::{sync::Arc, time::Instant};

use containerd_shim_protos::{
    api::Status,
    events::task::{TaskExit, TaskOOM},
    protobuf::MessageField,
    topics,
};
use log::{debug, warn};

use crate::{
    cgroup,
    process::reaper,
    state::{timestamp, Container, Shim, Transition},
};

pub fn oom(shim: &Shim, id: &str, cgroup_path: &str) {
    let events = shim.events.clone();
    let handle = tokio::runtime::Handle::current();
    let container_id = id.to_string();
    let watched = cgroup::watch_oom(id, cgroup_path, move || {
        let events = events.clone();
        let container_id = container_id.clone();
        handle.spawn(async move {
            events
                .publish(
                    topics::TASK_OOM_EVENT_TOPIC,
                    Box::new(TaskOOM {
                        container_id,
                        ..Default::default()
                    }),
                )
                .await;
        });
    });
    if let Err(e) = watched {
        warn!("{id}: no OOM events: {e}");
    }
}

/// Waits for a process to exit, then records it, drains its output and tells containerd.
/// `since`: when the process was started (a pid's earlier owner's exit is not its exit).
pub fn exit(shim: &Shim, container: Arc<Container>, exec_id: String, pid: i32, since: Instant) {
    let events = shim.events.clone();
    let runtime = shim.runtime.clone();
    tokio::spawn(async move {
        let id = container.id.clone();
        let exit = if exec_id.is_empty() {
            runtime.wait_init(&id, pid, since).await
        } else {
            reaper::wait_since(pid, since).await
        };
        debug!("{id}/{exec_id}: pid {pid} exited with {}", exit.status);
        // In the pod's PID namespace the container's other processes outlive its init (the
        // kernel ends them only with the namespace's own init): end them as containerd's runc
        // shim does, before the exit is reported. They would otherwise run on unseen, and
        // hold the output pipes open so that the output drain waits out its timeout.
        if exec_id.is_empty() && container.spec.shares_pid_namespace() {
            if let Err(e) = runtime.kill(&id, libc::SIGKILL as u32, true).await {
                debug!("{id}: kill the processes left after its init: {e}");
            }
        }
        // Deliver all output before containerd hears of the exit.
        let io = container
            .live()
            .process(&exec_id)
            .map(|p| p.io.copies.clone());
        if let Some(io) = io {
            io.shutdown().await;
        }
        {
            let mut live = container.live();
            // The state first: whoever Wait wakes must already see STOPPED.
            if exec_id.is_empty() {
                if let Ok(next) = live.state.apply(Transition::Exit) {
                    live.state = next;
                }
            }
            let Some(p) = live.process_mut(&exec_id) else {
                return;
            };
            p.status = Status::STOPPED;
            p.exited.send_replace(Some(exit));
        }
        events
            .publish(
                topics::TASK_EXIT_EVENT_TOPIC,
                Box::new(TaskExit {
                    container_id: id.clone(),
                    id: if exec_id.is_empty() {
                        id.clone()
                    } else {
                        exec_id.clone()
                    },
                    pid: pid as u32,
                    exit_status: exit.status as u32,
                    exited_at: MessageField::some(timestamp(exit.at)),
                    ..Default::default()
                }),
            )
            .await;
    });
}
