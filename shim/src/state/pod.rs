//! The pod this shim serves, once containerd created it through the Sandbox API.

use std::{
    path::{Path, PathBuf},
    sync::{Mutex, MutexGuard},
};

use k8s_cri::v1::PodSandboxConfig;
use tokio::sync::watch;

use crate::process::reaper::Exit;

pub struct Pod {
    pub id: String,
    pub bundle: PathBuf,
    pub netns: String,
    /// The CRI PodSandboxConfig as containerd sent it (kept for the pod checkpoint).
    pub config_bytes: Vec<u8>,
    pub config: PodSandboxConfig,
    /// The pod's cgroup (cgroupfs path); containers go below it.
    pub cgroup: String,
    run: Mutex<PodRun>,
    exited: watch::Sender<Option<Exit>>,
    /// Created from a checkpoint and not yet released by FinishRestore: every container
    /// created meanwhile must come from the checkpoint too.
    restoring: std::sync::atomic::AtomicBool,
    /// Host directories of volumes already restored for this pod (a shared volume once).
    restored_volumes: Mutex<std::collections::HashSet<PathBuf>>,
}

/// Where the pod is in its life; behind a plain mutex, never held across an await.
#[derive(Default, Clone)]
pub struct PodRun {
    pub pid: i32,
    /// StartSandbox is under way (it runs without holding the lock).
    pub starting: bool,
    pub started: bool,
    pub created_at: Option<time::OffsetDateTime>,
    pub shm: Option<ShmMount>,
    pub files: Vec<PathBuf>,
    pub shut_down: bool,
    /// The runtime runs the pod's root itself (a gVisor sandbox), not our pause process.
    pub root_by_runtime: bool,
}

/// The pod's /dev/shm tmpfs: where it was mounted, and the kernel's id of that mount (which
/// finds it after the directories above it were renamed).
#[derive(Debug, Clone)]
pub struct ShmMount {
    pub path: PathBuf,
    pub id: Option<u64>,
}

/// What a pod holds on the host, kept in its bundle (`stasis-pod.json`) from StartSandbox on,
/// so that `containerd-shim-stasis-v2 delete`, run by containerd after the shim died, can
/// remove it all: processes, cgroups (thawed first), the /dev/shm mount, the pod files.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct PodRecord {
    pub pid: i32,
    pub cgroup: String,
    pub shm: Option<PathBuf>,
    /// The kernel's id of the shm mount (it finds the mount after containerd renamed the
    /// bundle it is in).
    #[serde(default)]
    pub shm_mount_id: Option<u64>,
    pub files: Vec<PathBuf>,
    /// The pod's containers, whose runtime state must go too.
    #[serde(default)]
    pub containers: Vec<String>,
}

impl PodRecord {
    /// The pod's shm mount as recorded.
    pub fn shm_mount(&self) -> Option<ShmMount> {
        self.shm.clone().map(|path| ShmMount {
            path,
            id: self.shm_mount_id,
        })
    }

    pub const FILE: &'static str = "stasis-pod.json";
    /// Where a copy of each record lives (`<id>.json`): containerd may remove a dead shim's
    /// bundle before (or while) the clean-up reads the record there.
    pub const COPIES: &'static str = "/run/stasis/pods";

    fn copy_path(id: &str) -> Option<std::path::PathBuf> {
        stasis_api::layout::is_plain_name(id)
            .then(|| Path::new(Self::COPIES).join(format!("{id}.json")))
    }

    pub fn save(&self, bundle: &Path, id: &str) -> std::io::Result<()> {
        let text = serde_json::to_vec(self).map_err(std::io::Error::other)?;
        let mut places = vec![bundle.to_path_buf()];
        if let Some(copy) = Self::copy_path(id) {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(Self::COPIES)?;
            places.push(copy.parent().map(Path::to_path_buf).unwrap_or_default());
        }
        for (i, dir) in places.iter().enumerate() {
            let name = if i == 0 {
                Self::FILE.to_string()
            } else {
                format!("{id}.json")
            };
            let tmp = dir.join(format!("{name}.tmp"));
            std::fs::write(&tmp, &text)?;
            std::fs::rename(tmp, dir.join(name))?;
        }
        Ok(())
    }

    /// The record of pod `id`: from its bundle, else from the copy.
    pub fn load(bundle: &Path, id: &str) -> Option<Self> {
        let text = std::fs::read(bundle.join(Self::FILE))
            .ok()
            .or_else(|| std::fs::read(Self::copy_path(id)?).ok())?;
        serde_json::from_slice(&text).ok()
    }

    /// Removes the record (and its copy): the pod is gone.
    pub fn remove(bundle: &Path, id: &str) {
        let _ = std::fs::remove_file(bundle.join(Self::FILE));
        if let Some(copy) = Self::copy_path(id) {
            let _ = std::fs::remove_file(copy);
        }
    }
}

impl Pod {
    pub fn new(
        id: String,
        bundle: PathBuf,
        netns: String,
        config_bytes: Vec<u8>,
        config: PodSandboxConfig,
        cgroup: String,
    ) -> Self {
        Pod {
            id,
            bundle,
            netns,
            config_bytes,
            cgroup,
            restoring: std::sync::atomic::AtomicBool::new(
                config
                    .annotations
                    .contains_key(stasis_api::layout::RESTORE_ANNOTATION),
            ),
            config,
            restored_volumes: Mutex::default(),
            run: Mutex::new(PodRun::default()),
            exited: watch::channel(None).0,
        }
    }

    /// Whether the volume at `host_dir` is still to be restored for this pod; claims it.
    pub fn claim_volume(&self, host_dir: &Path) -> bool {
        self.restored_volumes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(host_dir.to_path_buf())
    }

    pub fn is_restoring(&self) -> bool {
        self.restoring.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// FinishRestore: the pod is whole again; later containers are ordinary ones.
    pub fn restore_finished(&self) {
        self.restoring
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }

    /// The pod shares the node's PID namespace (hostPID).
    pub fn host_pid(&self) -> bool {
        self.config
            .linux
            .as_ref()
            .and_then(|l| l.security_context.as_ref())
            .and_then(|s| s.namespace_options.as_ref())
            .is_some_and(|n| n.pid == k8s_cri::v1::NamespaceMode::Node as i32)
    }

    /// Refuses `what` (a checkpoint, a restore) for a hostPID pod: its processes live among
    /// the node's, and CRIU restores a process tree only into a PID namespace of its own.
    pub fn require_own_pid_ns(&self, what: &str) -> crate::error::Result<()> {
        if self.host_pid() {
            return Err(crate::error::Error::precondition(
                &self.id,
                format!(
                    "pod {} ({}) shares the node's PID namespace (hostPID): {what} is not possible, its processes are not the pod's alone",
                    self.name(),
                    self.id
                ),
            ));
        }
        Ok(())
    }

    pub fn run(&self) -> MutexGuard<'_, PodRun> {
        self.run.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn pid(&self) -> i32 {
        self.run().pid
    }

    pub fn exit(&self) -> Option<Exit> {
        *self.exited.borrow()
    }

    pub fn wait_exit(&self) -> watch::Receiver<Option<Exit>> {
        self.exited.subscribe()
    }

    pub fn record_exit(&self, exit: Exit) {
        self.exited.send_replace(Some(exit));
    }

    /// Keeps the pod's record current (after StartSandbox, and as containers come and go).
    pub fn save_record(&self, containers: Vec<String>) {
        let run = self.run();
        if !run.started {
            return;
        }
        let record = PodRecord {
            pid: run.pid,
            cgroup: self.cgroup.clone(),
            shm: run.shm.as_ref().map(|m| m.path.clone()),
            shm_mount_id: run.shm.as_ref().and_then(|m| m.id),
            files: run.files.clone(),
            containers,
        };
        drop(run);
        if let Err(e) = record.save(&self.bundle, &self.id) {
            log::warn!(
                "pod {}: cannot keep its record for a cleanup after a crash: {e}",
                self.id
            );
        }
    }

    pub fn name(&self) -> &str {
        self.config
            .metadata
            .as_ref()
            .map(|m| m.name.as_str())
            .unwrap_or("")
    }

    /// containerd's state and root dirs, from the sandbox bundle
    /// `<state>/io.containerd.runtime.v2.task/<ns>/<id>` and its `work` link into `<root>`.
    pub fn containerd_dirs(&self) -> (Option<PathBuf>, Option<PathBuf>) {
        let up3 = |p: &Path| p.ancestors().nth(3).map(Path::to_path_buf);
        let state = up3(&self.bundle);
        let root = std::fs::read_link(self.bundle.join("work"))
            .ok()
            .and_then(|w| up3(&w));
        (state, root)
    }

    /// The cgroupsPath a container of this pod gets: below the pod cgroup.
    pub fn container_cgroup(&self, container_id: &str) -> String {
        format!("{}/{}", self.cgroup.trim_end_matches('/'), container_id)
    }

    /// Whether `path` is already below the pod cgroup.
    pub fn holds_cgroup(&self, path: &str) -> bool {
        path.starts_with(&format!("{}/", self.cgroup.trim_end_matches('/')))
    }
}
