//! The OCI runtime behind the shim. The Task service speaks only this trait, so runc, crun and
//! runsc differ here and nowhere else.

pub mod config;
mod crun;
mod runc;
mod runsc;

use std::{
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    sync::Arc,
};

use async_trait::async_trait;

pub use runc::Runc;
pub use runsc::Runsc;

use config::{BackendConfig, Engine};

use crate::error::Result;

/// The stdio a new process gets: the ends of the pipes the shim copies to containerd's fifos.
/// With a terminal, the runtime hands the pty master back through `console_socket` instead.
#[derive(Default)]
pub struct ProcessStdio {
    pub stdin: Option<OwnedFd>,
    pub stdout: Option<OwnedFd>,
    pub stderr: Option<OwnedFd>,
    pub console_socket: Option<std::path::PathBuf>,
}

/// What the runtime says about a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeState {
    pub status: String,
    pub pid: i32,
}

/// How to dump (or restore) a container with CRIU through the runtime.
#[derive(Debug, Clone, Default)]
pub struct CheckpointOpts {
    pub image_path: std::path::PathBuf,
    pub work_path: std::path::PathBuf,
    /// Keep the container running after the dump (else CRIU stops it).
    pub leave_running: bool,
    pub tcp_established: bool,
    pub ext_unix_sk: bool,
    pub shell_job: bool,
    pub file_locks: bool,
    pub empty_ns: Vec<String>,
    pub cgroups_mode: String,
}

/// Where a runtime that checkpoints whole sandboxes puts the pod's one image, beside the
/// containers' directories of a pod checkpoint.
pub const SANDBOX_IMAGE_DIR: &str = "sandbox";

/// What a runtime needs to start a pod of its own (see `OciRuntime::start_pod`).
#[derive(Debug, Clone)]
pub struct PodRoot {
    pub id: String,
    /// The sandbox bundle (the shim's working directory); the runtime may write below it.
    pub bundle: PathBuf,
    pub netns: String,
    pub hostname: String,
    pub cgroup: String,
    /// Restore the pod's sandbox from this image instead of starting it fresh.
    pub restore_image: Option<PathBuf>,
}

/// Where a backend keeps container state for a containerd namespace. Outside the bundle, so a
/// new shim process or the `delete` action of a grouped container still finds it.
pub fn root(engine: Engine, namespace: &str) -> PathBuf {
    Path::new("/run/stasis").join(engine.name()).join(namespace)
}

/// The backend a shim drives, as its handler's options chose it.
pub fn build(config: &BackendConfig, namespace: &str) -> Arc<dyn OciRuntime> {
    let root = root(config.engine, namespace);
    let binary = config.binary();
    let args = config.args();
    match config.engine {
        Engine::Runc => Arc::new(Runc::new(binary, root).with_args(args)),
        Engine::Crun => Arc::new(crun::new(binary, root, args)),
        Engine::Runsc => Arc::new(Runsc::new(binary, root, args)),
    }
}

#[async_trait]
pub trait OciRuntime: Send + Sync {
    /// Short name for logs and errors ("runc").
    fn name(&self) -> &str {
        self.engine().name()
    }

    fn engine(&self) -> Engine;

    /// True for runtimes that run a pod as one sandbox of their own and checkpoint all its
    /// containers at one instant themselves (runsc): the shim then calls `checkpoint` once,
    /// with the pod id, instead of freezing cgroups and dumping container by container.
    fn checkpoints_whole_sandbox(&self) -> bool {
        false
    }

    /// Starts the pod's root (the process that holds the pod) if this runtime runs pods itself,
    /// returning its host pid; `None` means the shim's own pause process holds the pod.
    async fn start_pod(&self, _pod: &PodRoot) -> Result<Option<i32>> {
        Ok(None)
    }

    /// Adjusts a container's spec before `create` (runsc drops host namespace paths).
    fn adapt_container_spec(&self, _spec: &mut serde_json::Value) {}

    /// Waits for a container's init process to end. Host processes are reaped by the shim.
    async fn wait_init(&self, _id: &str, pid: i32) -> crate::reaper::Exit {
        crate::reaper::wait(pid).await
    }

    /// Where the images of a container checkpointed into `container_dir` (a pod checkpoint) are.
    fn restore_image(&self, container_dir: &Path) -> PathBuf {
        container_dir.join("checkpoint")
    }

    /// Whether `image` holds images this runtime can restore from.
    fn has_image(&self, image: &Path) -> bool {
        image.join("inventory.img").exists()
    }

    /// Creates the container from `bundle` and writes its init pid to `pid_file`.
    async fn create(
        &self,
        id: &str,
        bundle: &Path,
        stdio: ProcessStdio,
        pid_file: &Path,
    ) -> Result<()>;

    async fn start(&self, id: &str) -> Result<()>;

    /// Starts an extra process described by the runtime-spec Process JSON at `process_json`.
    async fn exec(
        &self,
        id: &str,
        process_json: &Path,
        stdio: ProcessStdio,
        pid_file: &Path,
    ) -> Result<()>;

    async fn kill(&self, id: &str, signal: u32, all: bool) -> Result<()>;
    async fn delete(&self, id: &str, force: bool) -> Result<()>;
    async fn pause(&self, id: &str) -> Result<()>;
    async fn resume(&self, id: &str) -> Result<()>;
    async fn pids(&self, id: &str) -> Result<Vec<u32>>;
    async fn state(&self, id: &str) -> Result<RuntimeState>;
    /// Applies runtime-spec LinuxResources (JSON) to a running container.
    async fn update(&self, id: &str, resources_json: &[u8]) -> Result<()>;

    /// Dumps the container's processes into `opts.image_path`. A failure carries CRIU's reason.
    async fn checkpoint(&self, id: &str, opts: &CheckpointOpts) -> Result<()>;

    /// Recreates container `id` from `bundle` with its processes restored from
    /// `opts.image_path`, detached, writing the init pid to `pid_file`.
    async fn restore(
        &self,
        id: &str,
        bundle: &Path,
        opts: &CheckpointOpts,
        stdio: ProcessStdio,
        pid_file: &Path,
    ) -> Result<()>;
}
