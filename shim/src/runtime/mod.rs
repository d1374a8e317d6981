//! The OCI runtime behind the shim, and the one place backends differ. Operations speak only
//! the `OciRuntime` trait (the OCI lifecycle every backend implements, with hooks whose
//! defaults fit host processes) and its `CheckpointHooks` (checkpoint and restore, with
//! defaults for containers checkpointed by CRIU under the cgroup freezer: `criu.rs`). A backend that runs pods its own way (gVisor: `runsc/`)
//! overrides the hooks it needs; nothing outside `runtime/` asks which backend it is.

pub mod config;
pub mod criu;
pub mod criu_image;
mod crun;
pub mod images;
pub mod pages;
pub mod postcopy;
pub mod restored;
mod runc;
mod runsc;
pub mod seccomp;

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use async_trait::async_trait;

pub use crate::process::stdio::ProcessStdio;
pub use runc::Runc;
pub use runsc::Runsc;

use config::{BackendConfig, Engine};

use crate::{
    cgroup::freezer,
    error::{Error, Result},
    process::reaper::{self, Exit},
    spec::ContainerSpec,
};

pub use stasis_api::layout::SANDBOX_IMAGE_DIR;

/// What the runtime says about a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeState {
    pub status: String,
    pub pid: i32,
}

/// How to dump (or restore) a container with CRIU through the runtime.
#[derive(Debug, Clone, Default)]
pub struct CheckpointOpts {
    pub image_path: PathBuf,
    pub work_path: PathBuf,
    /// Keep the container running after the dump (else CRIU stops it).
    pub leave_running: bool,
    pub tcp_established: bool,
    pub ext_unix_sk: bool,
    pub shell_job: bool,
    pub file_locks: bool,
    pub empty_ns: Vec<String>,
    pub cgroups_mode: String,
    /// Restore with memory served on demand by a `criu lazy-pages` daemon in `work_path`.
    pub lazy_pages: bool,
    /// Stops the dump: the runtime and CRIU are killed and waited for before `checkpoint`
    /// returns, so nothing of them can freeze, thaw or write afterwards.
    pub cancel: Option<tokio_util::sync::CancellationToken>,
    /// The bound on a one-container checkpoint (Task API); `None`: the default bound.
    pub timeout: Option<Duration>,
}

/// What a runtime needs to start a pod of its own (see `OciRuntime::start_pod`).
#[derive(Debug, Clone)]
pub struct PodRoot {
    pub id: String,
    /// The sandbox bundle (the shim's working directory); the runtime may write below it.
    pub bundle: PathBuf,
    pub netns: String,
    pub hostname: String,
    pub cgroup: String,
    /// The pod asks for the node's PID namespace (hostPID).
    pub host_pid: bool,
    /// The pod asks for the node's IPC namespace (hostIPC).
    pub host_ipc: bool,
    /// Restore the pod's sandbox from this image instead of starting it fresh.
    pub restore_image: Option<PathBuf>,
}

/// One container as a checkpoint sees it.
#[derive(Debug, Clone)]
pub struct ContainerTarget {
    pub id: String,
    /// How errors name it: "container web (3f2a…)", or the id.
    pub label: String,
    pub cgroup_path: String,
    pub spec: Arc<ContainerSpec>,
    /// The user paused it: it stays paused and is never frozen or thawed by us.
    pub paused: bool,
    pub terminal: bool,
    /// The overlay upper directory: the writable layer to capture.
    pub rootfs_upper: Option<PathBuf>,
    /// Exec processes still running in it.
    pub running_execs: Vec<String>,
    /// Where a pod checkpoint puts this container's files.
    pub dir: PathBuf,
}

/// How long each step of a checkpoint took.
#[derive(Debug, Default, Clone, Copy)]
pub struct Timings {
    /// From the freeze until the thaw (zero when nothing was frozen).
    pub frozen: Duration,
    pub dump: Duration,
    pub files: Duration,
    pub total: Duration,
}

/// A pod checkpoint as the backend carries it out.
pub struct PodCheckpoint<'a> {
    pub pod_id: &'a str,
    pub pod_cgroup: &'a str,
    /// The process holding the pod's namespaces.
    pub pod_pid: i32,
    pub out: &'a Path,
    /// The selected containers, in a fixed order.
    pub containers: &'a [ContainerTarget],
    /// Running containers of the pod that were not selected.
    pub unselected_running: &'a [String],
    /// Keep the captured containers still (frozen, or paused) when the capture succeeds: a
    /// stopping checkpoint stops them only once its output is safe (`stop_held`), or lets
    /// them run on (`release_held`). Without it they are thawed right after the capture.
    /// A backend never stops containers within `checkpoint_pod`.
    pub hold: bool,
    pub tcp_established: bool,
    pub file_locks: bool,
    /// Post-copy (with `hold`): the pages are not written; CRIU serves them
    /// (`PodCapture::lazy`) until the hold ends, and at most this long.
    pub post_copy: Option<Duration>,
    /// Gives up (thawing everything) past this bound.
    pub timeout: Option<Duration>,
    /// Told "frozen" once every selected container is still, "thawed" when they run again
    /// (not for a hold). Queues an event: it never waits.
    pub on_phase: &'a (dyn Fn(&'static str) + Send + Sync),
}

/// What a pod checkpoint captured.
#[derive(Debug, Default)]
pub struct PodCapture {
    pub frozen: Duration,
    /// One per selected container, in order.
    pub containers: Vec<Timings>,
    /// The last PID of the pod's PID namespace, when the restore must allocate above it.
    pub last_pid: Option<u32>,
    /// Post-copy: each container's dump, serving its pages until the hold ends.
    pub lazy: Vec<postcopy::LazyDump>,
}

/// The containers a stopping checkpoint keeps still after their capture.
#[derive(Clone)]
pub struct HeldPod {
    pub pod_id: String,
    pub containers: Vec<ContainerTarget>,
}

/// Operations a backend may refuse for a container (see `check_operation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Pause,
    /// A Task API checkpoint of one container.
    Checkpoint,
}

/// Where a backend keeps container state for a containerd namespace. Outside the bundle, so a
/// new shim process or the `delete` action of a grouped container still finds it.
pub fn root(engine: Engine, namespace: &str) -> PathBuf {
    Path::new("/run/stasis").join(engine.name()).join(namespace)
}

/// The programs (base names) of every backend's runtime and of CRIU: the processes that may
/// still work on a container whose shim is gone.
pub fn programs() -> impl Iterator<Item = &'static str> {
    Engine::ALL.into_iter().map(Engine::name).chain(["criu"])
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

/// The OCI lifecycle every backend implements, with hooks for how it holds pods and runs
/// processes (the defaults fit host processes). Its checkpoint side is [`CheckpointHooks`],
/// reached through [`OciRuntime::hooks`]: callers hold one `Arc<dyn OciRuntime>`.
#[async_trait]
pub trait OciRuntime: Send + Sync {
    /// Short name for logs, errors and archives ("runc").
    fn name(&self) -> &str {
        self.engine().name()
    }

    fn engine(&self) -> Engine;

    /// The backend's checkpoint and restore side (implementations return `self`).
    fn hooks(&self) -> &dyn CheckpointHooks;

    // --- The OCI lifecycle -------------------------------------------------------------

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

    /// Signals the container's init (or all its processes). A process that already ended is
    /// `Error::ProcessFinished`.
    async fn kill(&self, id: &str, signal: u32, all: bool) -> Result<()>;
    async fn delete(&self, id: &str, force: bool) -> Result<()>;
    async fn pause(&self, id: &str) -> Result<()>;
    async fn resume(&self, id: &str) -> Result<()>;
    async fn pids(&self, id: &str) -> Result<Vec<u32>>;
    async fn state(&self, id: &str) -> Result<RuntimeState>;
    /// Applies runtime-spec LinuxResources (JSON) to a running container.
    async fn update(&self, id: &str, resources_json: &[u8]) -> Result<()>;

    // --- Hooks: the defaults fit host processes -------------------------------------------

    /// Starts the pod's root (the process that holds the pod) if this runtime runs pods itself,
    /// returning its host pid; `None` means the shim's own pause process holds the pod.
    async fn start_pod(&self, _pod: &PodRoot) -> Result<Option<i32>> {
        Ok(None)
    }

    /// Signals an exec'd process: `pid` is the host pid its `exec` left (in `pid_file`, gone
    /// by now; backends may keep files beside it). Host processes are signalled directly.
    async fn kill_exec(&self, id: &str, pid: i32, _pid_file: &Path, signal: u32) -> Result<()> {
        signal_host_process(id, pid, signal)
    }

    /// The exec whose pid file was `pid_file` is deleted: what the backend kept beside it goes.
    fn forget_exec(&self, _pid_file: &Path) {}

    /// Whether the runtime keeps a directory per container below its state root
    /// ([`root`]): then an id without one was never run by it, and needs no delete.
    fn keeps_container_dirs(&self) -> bool {
        true
    }

    /// Whether the pod's sysctls take effect: the shim writes them in the namespaces of its
    /// pause process. A runtime that holds the pod itself and ignores them says no, and pods
    /// asking for sysctls are refused rather than silently left without.
    fn applies_sysctls(&self) -> bool {
        true
    }

    /// The OCI runtime's `features` document (JSON), which `-info` hands to containerd.
    /// Called from the short-lived `-info` process only.
    fn features(&self) -> Option<Vec<u8>> {
        None
    }

    /// Adjusts a container's spec before `create`.
    fn adapt_container_spec(&self, _spec: &mut ContainerSpec) {}

    /// Waits for a container's init process (started at or after `since`) to end. Host
    /// processes are reaped by the shim.
    async fn wait_init(&self, _id: &str, pid: i32, since: std::time::Instant) -> Exit {
        reaper::wait_since(pid, since).await
    }

    /// Refuses an operation this backend cannot do on one container (`in_pod`: the container
    /// belongs to the shim's pod).
    fn check_operation(&self, _id: &str, _op: Operation, _in_pod: bool) -> Result<()> {
        Ok(())
    }

    /// Stops a container because its pod stops. Returns whether its exit is worth waiting
    /// for (a container that could not be signalled may end only with its sandbox).
    async fn stop_for_pod(&self, id: &str) -> Result<bool> {
        self.kill(id, libc::SIGKILL as u32, true).await?;
        Ok(true)
    }
}

/// A backend's checkpoint and restore: the dump and restore of one container, and hooks
/// whose defaults fit host processes checkpointed by CRIU under the cgroup freezer
/// (`criu.rs`); they build on the backend's lifecycle.
#[async_trait]
pub trait CheckpointHooks: OciRuntime {
    /// Dumps the container's processes into `opts.image_path`. A failure carries CRIU's reason.
    async fn checkpoint(&self, id: &str, opts: &CheckpointOpts) -> Result<()>;

    /// Dumps the container's processes without their memory pages (post-copy, always
    /// leaving them running under the freezer): returns once CRIU serves the pages.
    async fn checkpoint_lazy(
        &self,
        id: &str,
        _opts: &CheckpointOpts,
    ) -> Result<postcopy::LazyDump> {
        Err(Error::precondition(
            id,
            format!("{} cannot checkpoint a pod for post-copy", self.name()),
        ))
    }

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

    /// Whether the tasks `restore` brings back are host processes in the container's cgroup
    /// for the shim to check against the spec ([`restored`]). CRIU backends say yes, and
    /// their `restore` leaves every task stopped until the shim has checked and continued
    /// it; a runtime whose processes live in its own sandbox says no.
    fn restores_host_tasks(&self) -> bool {
        true
    }

    /// Whether `restore` can take memory on demand from a `criu lazy-pages` daemon
    /// (`CheckpointOpts::lazy_pages`). A runtime that says no restores eagerly.
    fn supports_lazy_restore(&self) -> bool {
        true
    }

    /// Where the images of a container checkpointed into `container_dir` (a pod checkpoint) are.
    fn restore_image(&self, container_dir: &Path) -> PathBuf {
        container_dir.join(stasis_api::layout::CHECKPOINT_DIR)
    }

    /// Whether `image` holds images this runtime can restore from.
    fn has_image(&self, image: &Path) -> bool {
        image.join("inventory.img").exists()
    }

    /// For a pod restored from the pod checkpoint `dir`: the image its sandbox restores from
    /// at start, if the runtime restores sandboxes whole (else containers restore one by one).
    fn pod_restore_image(&self, _pod_id: &str, _dir: &Path) -> Result<Option<PathBuf>> {
        Ok(None)
    }

    /// Holds a container just restored from a pod checkpoint until the whole pod is back:
    /// a container that ran now could change files another container still has to restore.
    /// Returns whether it is held (then `release_restored` lets it go).
    async fn hold_restored(&self, id: &str, cgroup_path: &str) -> Result<bool> {
        let f = freezer::for_cgroup(id, cgroup_path)?;
        crate::util::blocking(id, "hold restored container", move || f.freeze()).await?;
        Ok(true)
    }

    async fn release_restored(&self, id: &str, cgroup_path: &str) -> Result<()> {
        let f = freezer::for_cgroup(id, cgroup_path)?;
        crate::util::blocking(id, "release restored container", move || f.thaw()).await
    }

    /// Checkpoints one container consistently (Task API): its processes and named volumes
    /// from one instant. On failure the container is left running (or paused, as it was).
    async fn checkpoint_container(
        &self,
        target: &ContainerTarget,
        opts: &CheckpointOpts,
    ) -> Result<Timings> {
        criu::checkpoint_container(self, target, opts).await
    }

    /// Checkpoints the selected containers of a pod at one instant into `job.out`: images,
    /// writable layers and named volumes, each container into its `dir`. On failure every
    /// container is left as it was (running, or paused by the user).
    async fn checkpoint_pod(&self, job: &PodCheckpoint<'_>) -> Result<PodCapture> {
        criu::checkpoint_pod(self, job).await
    }

    /// Stops the containers a stopping checkpoint held, its output being safe now.
    async fn stop_held(&self, held: &HeldPod) -> Result<()> {
        criu::stop_held(self, held).await
    }

    /// Ends a hold without stopping: the containers run on (those the user paused stay so).
    async fn release_held(&self, held: &HeldPod) -> Result<()> {
        criu::release_held(self, held).await
    }
}

/// Sends `signal` to host process `pid` (an exec of container `id`).
pub fn signal_host_process(id: &str, pid: i32, signal: u32) -> Result<()> {
    let sig = nix::sys::signal::Signal::try_from(signal as i32)
        .map_err(|_| Error::invalid(id, format!("unknown signal {signal}")))?;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig)
        .map_err(|e| Error::io(id, "signal exec", e.into()))
}

/// The error for a step that ran past its bound.
pub fn timed_out(id: &str, step: &str, after: Duration) -> Error {
    Error::other(
        id,
        step,
        format!(
            "timed out after {} s (the runtime and CRIU were stopped before anything was thawed)",
            after.as_secs()
        ),
    )
}

/// Whether a dump cancelled through `cancel` was stopped by its bound (`limit`, counted from
/// `since`) rather than by someone else.
pub fn past_bound(
    cancel: &tokio_util::sync::CancellationToken,
    since: std::time::Instant,
    limit: Duration,
) -> bool {
    cancel.is_cancelled() && since.elapsed() >= limit
}

/// How long a checkpoint may take when the caller sets no bound of its own.
pub const DEFAULT_CHECKPOINT_TIMEOUT: Duration = Duration::from_secs(600);

/// Cancels `token` once `limit` has passed (unless the returned guard is dropped first).
pub fn cancel_after(
    token: &tokio_util::sync::CancellationToken,
    limit: Duration,
) -> tokio_util::sync::DropGuard {
    let timer = tokio_util::sync::CancellationToken::new();
    let (t, stop) = (token.clone(), timer.clone());
    tokio::spawn(async move {
        tokio::select! {
            _ = tokio::time::sleep(limit) => t.cancel(),
            _ = stop.cancelled() => {}
        }
    });
    timer.drop_guard()
}
