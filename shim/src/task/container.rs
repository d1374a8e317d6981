//! A container and its processes, as the shim tracks them.

use std::{collections::HashMap, path::PathBuf};

use containerd_shim::asynchronous::io::Stdio;
use containerd_shim_protos::api::Status;
use protobuf::well_known_types::timestamp::Timestamp;
use tokio::sync::watch;

use super::stdio::ProcessIo;
use crate::reaper::Exit;

pub struct Process {
    pub exec_id: String,
    pub pid: i32,
    pub status: Status,
    pub stdio: Stdio,
    pub io: ProcessIo,
    /// Some(exit) once the process has exited; `Wait` watches it.
    pub exited: watch::Sender<Option<Exit>>,
    /// For an exec: the runtime-spec Process JSON it will be started with.
    pub spec_path: Option<PathBuf>,
}

impl Process {
    pub fn new(exec_id: &str, stdio: Stdio) -> Self {
        Process {
            exec_id: exec_id.to_string(),
            pid: 0,
            status: Status::CREATED,
            stdio,
            io: ProcessIo::default(),
            exited: watch::channel(None).0,
            spec_path: None,
        }
    }

    pub fn exit(&self) -> Option<Exit> {
        *self.exited.borrow()
    }

    pub fn exit_status(&self) -> u32 {
        self.exit().map(|e| e.status as u32).unwrap_or_default()
    }

    pub fn exited_at(&self) -> Option<Timestamp> {
        self.exit().map(|e| timestamp(e.at))
    }
}

pub fn timestamp(t: time::OffsetDateTime) -> Timestamp {
    let mut ts = Timestamp::new();
    ts.seconds = t.unix_timestamp();
    ts.nanos = t.nanosecond() as i32;
    ts
}

pub struct Container {
    pub id: String,
    pub bundle: PathBuf,
    /// Where the shim mounted the rootfs containerd passed, to unmount on delete.
    pub rootfs_mount: Option<PathBuf>,
    /// The container's cgroup (runtime-spec `linux.cgroupsPath`), for stats.
    pub cgroup_path: String,
    pub init: Process,
    pub execs: HashMap<String, Process>,
    /// The overlay upper directory of the rootfs: the container's writable layer.
    pub rootfs_upper: Option<PathBuf>,
    /// The runtime spec (config.json) as the container was created.
    pub spec: serde_json::Value,
    /// Set when the task was created from a checkpoint: Start restores from these images.
    pub restore_from: Option<PathBuf>,
    /// Restored from a pod checkpoint and held frozen until the pod's FinishRestore.
    pub resume_pending: bool,
}

impl Container {
    pub fn process(&self, exec_id: &str) -> Option<&Process> {
        if exec_id.is_empty() {
            Some(&self.init)
        } else {
            self.execs.get(exec_id)
        }
    }

    pub fn process_mut(&mut self, exec_id: &str) -> Option<&mut Process> {
        if exec_id.is_empty() {
            Some(&mut self.init)
        } else {
            self.execs.get_mut(exec_id)
        }
    }
}
