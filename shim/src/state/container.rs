//! A container and its processes, as the shim tracks them.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, Mutex, MutexGuard},
};

use containerd_shim::asynchronous::io::Stdio;
use containerd_shim_protos::api::Status;
use protobuf::well_known_types::timestamp::Timestamp;
use tokio::sync::watch;

use super::lifecycle::{State, Transition};
use crate::{
    error::{Error, Result},
    process::{reaper::Exit, stdio::ProcessIo},
    spec::ContainerSpec,
};

pub struct Process {
    pub exec_id: String,
    pub pid: i32,
    /// For execs; a container's init follows the container's `State`.
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

/// What changes over a container's life; behind a plain mutex, never held across an await.
pub struct Live {
    pub state: State,
    pub init: Process,
    pub execs: HashMap<String, Process>,
    /// Where the shim mounted the rootfs containerd passed, to unmount on delete.
    pub rootfs_mount: Option<PathBuf>,
}

impl Live {
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

    /// An exec's status, or the container's for its init.
    pub fn status_of(&self, exec_id: &str) -> Option<Status> {
        if exec_id.is_empty() {
            Some(self.state.status())
        } else {
            self.execs.get(exec_id).map(|p| p.status)
        }
    }

    pub fn running_execs(&self) -> Vec<String> {
        self.execs
            .iter()
            .filter(|(_, p)| p.status == Status::RUNNING)
            .map(|(id, _)| id.clone())
            .collect()
    }
}

pub struct Container {
    pub id: String,
    pub bundle: PathBuf,
    /// The container's cgroup (runtime-spec `linux.cgroupsPath`).
    pub cgroup_path: String,
    /// The runtime spec as the container was created (after the shim's adaptations).
    pub spec: Arc<ContainerSpec>,
    /// The overlay upper directory of the rootfs: the container's writable layer.
    pub rootfs_upper: Option<PathBuf>,
    /// The pod checkpoint directory this container is restored from, if any.
    pub restore_dir: Option<PathBuf>,
    /// Serialises the operations that change the container (start, pause, resume, exec,
    /// checkpoint, kill, delete). Queries never take it, so a long restore or dump does not
    /// stall State, Pids, Wait or Connect.
    /// Shared so that a pod checkpoint can keep it across requests while it holds the pod.
    pub op: Arc<tokio::sync::Mutex<()>>,
    live: Mutex<Live>,
}

impl Container {
    pub fn new(
        id: String,
        bundle: PathBuf,
        spec: Arc<ContainerSpec>,
        state: State,
        init: Process,
    ) -> Self {
        Container {
            id,
            bundle,
            cgroup_path: spec.cgroups_path(),
            spec,
            rootfs_upper: None,
            restore_dir: None,
            op: Arc::default(),
            live: Mutex::new(Live {
                state,
                init,
                execs: HashMap::new(),
                rootfs_mount: None,
            }),
        }
    }

    pub fn live(&self) -> MutexGuard<'_, Live> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn state(&self) -> State {
        self.live().state.clone()
    }

    /// Applies a lifecycle transition, or says (naming the container) why it is refused.
    pub fn transition(&self, t: Transition) -> Result<State> {
        let mut live = self.live();
        let next = live
            .state
            .apply(t)
            .map_err(|why| Error::precondition(&self.id, why))?;
        live.state = next.clone();
        Ok(next)
    }

    /// Fails unless the container is in a state `ok` accepts; the error names the state.
    pub fn require(&self, ok: impl Fn(&State) -> bool, action: &str) -> Result<State> {
        let state = self.state();
        if ok(&state) {
            Ok(state)
        } else {
            Err(Error::precondition(
                &self.id,
                format!("cannot {action} a container that is {state}"),
            ))
        }
    }
}
