//! The OCI runtime behind the shim. The Task service speaks only this trait, so runc, crun and
//! runsc differ here and nowhere else.

mod runc;

use std::{os::fd::OwnedFd, path::Path};

use async_trait::async_trait;

pub use runc::Runc;

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

#[async_trait]
pub trait OciRuntime: Send + Sync {
    /// Short name for logs and errors ("runc").
    fn name(&self) -> &str;

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
