//! runc driven by its command line. crun speaks the same command line, so its backend is this
//! one with crun's name and its few differences (`crun.rs`).

mod restore;

use std::{
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use async_trait::async_trait;
use log::debug;

use super::{
    config::Engine,
    postcopy::{self, LazyDump},
    CheckpointHooks, CheckpointOpts, OciRuntime, ProcessStdio, RuntimeState,
};
use crate::{
    error::{Error, Result},
    process::reaper,
};
use restore::{remount_root_readonly, LeaveStopped};

pub struct Runc {
    engine: Engine,
    binary: PathBuf,
    root: PathBuf,
    /// Global flags from the handler's options, before every subcommand.
    args: Vec<String>,
    /// Whether `checkpoint`/`restore` take `--empty-ns` (crun's do not).
    empty_ns: bool,
    /// One lock per container: its kills run one at a time. `kill --all` freezes the cgroup
    /// while it signals, and a kill of the same container meeting that frozen cgroup fails
    /// ("invalid state transition from stopped to paused").
    kills:
        std::sync::Mutex<std::collections::HashMap<String, std::sync::Arc<tokio::sync::Mutex<()>>>>,
}

impl Runc {
    /// `root` holds runc's state; it must outlive the shim so a new shim process (or the
    /// `delete` subcommand) finds the containers again.
    pub fn new(binary: impl Into<PathBuf>, root: impl Into<PathBuf>) -> Self {
        Runc {
            engine: Engine::Runc,
            binary: binary.into(),
            root: root.into(),
            args: Vec::new(),
            empty_ns: true,
            kills: Default::default(),
        }
    }

    /// The lock that serialises the kills of container `id`.
    fn kill_lock(&self, id: &str) -> std::sync::Arc<tokio::sync::Mutex<()>> {
        let mut kills = self.kills.lock().unwrap_or_else(|e| e.into_inner());
        kills.entry(id.to_string()).or_default().clone()
    }

    /// Where the runtime keeps its state.
    pub fn state_root(&self) -> &Path {
        &self.root
    }

    pub fn with_args(mut self, args: Vec<String>) -> Self {
        self.args = args;
        self
    }

    /// The same CLI under another runtime's name (see `crun.rs`).
    pub(super) fn dialect(mut self, engine: Engine, empty_ns: bool) -> Self {
        self.engine = engine;
        self.empty_ns = empty_ns;
        self
    }

    /// The runtime binary could not even be started: not NOT_FOUND (containerd would take
    /// that for "the container is gone"), but the runtime's failure, with the path.
    fn spawn_failed(&self, id: &str, step: &str, e: std::io::Error) -> Error {
        Error::other(
            id,
            format!("{} {step}", self.engine),
            format!("cannot run {}: {e}", self.binary.display()),
        )
    }

    pub(super) fn command(&self) -> Command {
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--root").arg(&self.root);
        cmd.args(&self.args);
        cmd.stdin(Stdio::null());
        cmd
    }

    /// A log of this one call: two execs of one container at once (probes, `kubectl exec`)
    /// must not remove or mix each other's words.
    fn log_path(&self, id: &str, step: &str) -> PathBuf {
        let unique = stasis_api::private::random_suffix().unwrap_or_default();
        self.root
            .join(format!("{id}.{}.{unique}.log", step.replace(' ', "-")))
    }

    /// Runs a command whose output we can read, turning a failure into an error that carries
    /// runc's own words.
    pub(super) async fn run(&self, id: &str, step: &str, cmd: Command) -> Result<Vec<u8>> {
        self.run_cancellable(id, step, cmd, None).await
    }

    /// `run`, stopped (the runtime's whole process group killed and waited for) if `cancel`
    /// fires first.
    pub(super) async fn run_cancellable(
        &self,
        id: &str,
        step: &str,
        mut cmd: Command,
        cancel: Option<&tokio_util::sync::CancellationToken>,
    ) -> Result<Vec<u8>> {
        debug!("{}: {step}: {:?}", id, cmd);
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let out = match reaper::run_cancellable(cmd, true, cancel).await {
            Ok(out) => out,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {
                return Err(Error::other(
                    id,
                    format!("{} {step}", self.engine),
                    "cancelled; the runtime and its helpers were stopped",
                ))
            }
            Err(e) => return Err(self.spawn_failed(id, step, e)),
        };
        if !out.success() {
            return Err(Error::Runtime {
                id: id.to_string(),
                step: format!("{} {step}", self.engine),
                message: clean_message(&out.stderr, &out.stdout),
            });
        }
        Ok(out.stdout)
    }

    /// Runs a command whose stdio belongs to the container; errors come from runc's log file.
    pub(super) async fn run_with_process_stdio(
        &self,
        id: &str,
        step: &str,
        cmd: Command,
        stdio: ProcessStdio,
    ) -> Result<()> {
        let log = self.log_path(id, step);
        let _ = std::fs::remove_file(&log);
        // --log must come before the subcommand; rebuild the command with it in front.
        let args: Vec<_> = cmd.get_args().map(|a| a.to_owned()).collect();
        let mut full = Command::new(&self.binary);
        full.arg("--log").arg(&log).arg("--log-format").arg("json");
        full.args(args);
        let io = |fd: Option<OwnedFd>| fd.map(Stdio::from).unwrap_or_else(Stdio::null);
        full.stdin(io(stdio.stdin));
        full.stdout(io(stdio.stdout));
        full.stderr(io(stdio.stderr));
        drop(cmd);
        debug!("{}: {step}: {:?}", id, full);
        let out = reaper::run_with_stdio(full, false)
            .await
            .map_err(|e| self.spawn_failed(id, step, e))?;
        let result = if out.success() {
            Ok(())
        } else {
            Err(Error::Runtime {
                id: id.to_string(),
                step: format!("{} {step}", self.engine),
                message: last_log_error(&log)
                    .unwrap_or_else(|| format!("exit status {}", out.status)),
            })
        };
        let _ = std::fs::remove_file(&log);
        result
    }
}

/// runc's stderr, trimmed to its message (it prefixes "time=… level=error msg=…" at times).
fn clean_message(stderr: &[u8], stdout: &[u8]) -> String {
    let text = String::from_utf8_lossy(if stderr.is_empty() { stdout } else { stderr });
    let text = text.trim();
    if let Some(i) = text.rfind("msg=") {
        return text[i + 4..].trim_matches('"').to_string();
    }
    text.to_string()
}

/// The last error-level message of a runc JSON log; failing that, its last line of any kind
/// (runsc may exit 128 having logged no error), so a failure never reads as a bare status.
fn last_log_error(log: &Path) -> Option<String> {
    let text = std::fs::read_to_string(log).ok()?;
    let entries: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let message = |v: &serde_json::Value| v["msg"].as_str().map(str::to_string);
    entries
        .iter()
        .rev()
        .find(|v| v["level"] == "error" || v["level"] == "fatal")
        .and_then(message)
        .or_else(|| {
            let last = text.lines().rev().find(|l| !l.trim().is_empty())?;
            let said = serde_json::from_str(last).ok().and_then(|v| message(&v));
            Some(format!(
                "no error logged; last line: {}",
                said.unwrap_or(last.to_string())
            ))
        })
}

#[async_trait]
impl OciRuntime for Runc {
    fn engine(&self) -> Engine {
        self.engine
    }

    /// `runc features` (and crun's): what the runtime supports, recursive read-only mounts
    /// among its mount options.
    fn features(&self) -> Option<Vec<u8>> {
        let out = std::process::Command::new(&self.binary)
            .arg("features")
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .ok()?;
        let valid = out.status.success()
            && serde_json::from_slice::<serde_json::Value>(&out.stdout).is_ok();
        valid.then_some(out.stdout)
    }

    async fn create(
        &self,
        id: &str,
        bundle: &Path,
        stdio: ProcessStdio,
        pid_file: &Path,
    ) -> Result<()> {
        std::fs::create_dir_all(&self.root)
            .map_err(|e| Error::io(id, format!("create {}", self.root.display()), e))?;
        let mut cmd = self.command();
        cmd.arg("create").arg("--bundle").arg(bundle);
        cmd.arg("--pid-file").arg(pid_file);
        if let Some(sock) = &stdio.console_socket {
            cmd.arg("--console-socket").arg(sock);
        }
        cmd.arg(id);
        self.run_with_process_stdio(id, "create", cmd, stdio).await
    }

    async fn start(&self, id: &str) -> Result<()> {
        let mut cmd = self.command();
        cmd.args(["start", id]);
        self.run(id, "start", cmd).await.map(drop)
    }

    async fn exec(
        &self,
        id: &str,
        process_json: &Path,
        stdio: ProcessStdio,
        pid_file: &Path,
    ) -> Result<()> {
        let mut cmd = self.command();
        cmd.arg("exec").arg("--detach");
        cmd.arg("--process").arg(process_json);
        cmd.arg("--pid-file").arg(pid_file);
        if let Some(sock) = &stdio.console_socket {
            cmd.arg("--console-socket").arg(sock);
        }
        cmd.arg(id);
        self.run_with_process_stdio(id, "exec", cmd, stdio).await
    }

    async fn kill(&self, id: &str, signal: u32, all: bool) -> Result<()> {
        let mut cmd = self.command();
        cmd.arg("kill");
        if all {
            cmd.arg("--all");
        }
        cmd.arg(id).arg(signal.to_string());
        let lock = self.kill_lock(id);
        let _one_at_a_time = lock.lock().await;
        match self.run(id, "kill", cmd).await {
            // The process ended between the shim's look and the runtime's.
            Err(Error::Runtime { message, .. }) if is_finished(&message) => {
                Err(Error::ProcessFinished { id: id.to_string() })
            }
            other => other.map(drop),
        }
    }

    async fn delete(&self, id: &str, force: bool) -> Result<()> {
        let mut cmd = self.command();
        cmd.arg("delete");
        if force {
            cmd.arg("--force");
        }
        cmd.arg(id);
        let deleted = match self.run(id, "delete", cmd).await {
            Err(Error::Runtime { message, .. }) if is_not_exist(&message) => Ok(()),
            other => other.map(drop),
        };
        if deleted.is_ok() {
            self.kills
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(id);
        }
        deleted
    }

    async fn pause(&self, id: &str) -> Result<()> {
        let mut cmd = self.command();
        cmd.args(["pause", id]);
        self.run(id, "pause", cmd).await.map(drop)
    }

    async fn resume(&self, id: &str) -> Result<()> {
        let mut cmd = self.command();
        cmd.args(["resume", id]);
        self.run(id, "resume", cmd).await.map(drop)
    }

    async fn pids(&self, id: &str) -> Result<Vec<u32>> {
        let mut cmd = self.command();
        cmd.args(["ps", "--format", "json", id]);
        let out = self.run(id, "ps", cmd).await?;
        serde_json::from_slice::<Option<Vec<u32>>>(&out)
            .map(Option::unwrap_or_default)
            .map_err(|e| Error::other(id, "parse runc ps", e))
    }

    async fn state(&self, id: &str) -> Result<RuntimeState> {
        let mut cmd = self.command();
        cmd.args(["state", id]);
        let out = match self.run(id, "state", cmd).await {
            Err(Error::Runtime { message, .. }) if is_not_exist(&message) => {
                return Err(Error::not_found("container", id))
            }
            other => other?,
        };
        let v: serde_json::Value =
            serde_json::from_slice(&out).map_err(|e| Error::other(id, "parse runc state", e))?;
        Ok(RuntimeState {
            status: v["status"].as_str().unwrap_or_default().to_string(),
            pid: v["pid"].as_i64().unwrap_or_default() as i32,
        })
    }

    async fn update(&self, id: &str, resources_json: &[u8]) -> Result<()> {
        let path = self.root.join(format!("{id}.resources.json"));
        std::fs::write(&path, resources_json)
            .map_err(|e| Error::io(id, "write resources for runc update", e))?;
        let mut cmd = self.command();
        cmd.arg("update").arg("--resources").arg(&path).arg(id);
        let result = self.run(id, "update", cmd).await.map(drop);
        let _ = std::fs::remove_file(&path);
        result
    }

    fn hooks(&self) -> &dyn CheckpointHooks {
        self
    }
}

#[async_trait]
impl CheckpointHooks for Runc {
    async fn checkpoint(&self, id: &str, opts: &CheckpointOpts) -> Result<()> {
        let mut cmd = self.command();
        cmd.arg("checkpoint");
        self.criu_args(id, &mut cmd, opts)?;
        if opts.leave_running {
            cmd.arg("--leave-running");
        }
        cmd.arg(id);
        self.run_cancellable(id, "checkpoint", cmd, opts.cancel.as_ref())
            .await
            .map(drop)
            .map_err(|e| with_criu_reason(e, &opts.work_path.join("dump.log"), self.engine))
    }

    async fn checkpoint_lazy(&self, id: &str, opts: &CheckpointOpts) -> Result<LazyDump> {
        // crun's checkpoint has no status descriptor to say when CRIU serves the pages.
        if self.engine != Engine::Runc {
            return Err(Error::precondition(
                id,
                format!("{} cannot checkpoint for post-copy (runc can)", self.engine),
            ));
        }
        let mut runc = self.command();
        runc.arg("checkpoint");
        self.criu_args(id, &mut runc, opts)?;
        runc.arg("--leave-running")
            .arg("--lazy-pages")
            .arg("--page-server")
            .arg(format!("127.0.0.1:{}", postcopy::PAGE_SERVER_PORT))
            .args(["--status-fd", "3"]);
        runc.arg(id);
        // Bounded on its own: the dump outlives a shim that dies while the pages cross (the
        // target may run the pod already), so nothing but this ends it then.
        let bound = opts
            .timeout
            .unwrap_or(postcopy::SERVE_AT_MOST)
            .as_secs()
            .max(1);
        let mut cmd = Command::new("timeout");
        cmd.args(["-k", "5", &bound.to_string()])
            .arg(runc.get_program())
            .args(runc.get_args())
            .stdin(Stdio::null());
        postcopy::start(id, cmd, &opts.work_path, opts.cancel.as_ref()).await
    }

    async fn restore(
        &self,
        id: &str,
        bundle: &Path,
        opts: &CheckpointOpts,
        stdio: ProcessStdio,
        pid_file: &Path,
    ) -> Result<()> {
        std::fs::create_dir_all(&self.root)
            .map_err(|e| Error::io(id, format!("create {}", self.root.display()), e))?;
        let mut cmd = self.command();
        cmd.arg("restore")
            .arg("--detach")
            .arg("--bundle")
            .arg(bundle);
        cmd.arg("--pid-file").arg(pid_file);
        self.criu_args(id, &mut cmd, opts)?;
        if let Some(sock) = &stdio.console_socket {
            cmd.arg("--console-socket").arg(sock);
        }
        cmd.arg(id);
        // The restored tasks must not run before the shim has checked what CRIU made of the
        // images: CRIU leaves them stopped (leave-stopped, through the CRIU configuration
        // file runc and crun take from the `org.criu.config` annotation), and the shim
        // continues them after the check.
        let stopped = LeaveStopped::set_up(id, bundle, &opts.work_path)?;
        let restored = self.run_with_process_stdio(id, "restore", cmd, stdio).await;
        stopped.tear_down();
        restored
            .map_err(|e| with_criu_reason(e, &opts.work_path.join("restore.log"), self.engine))?;
        // runc makes a read-only root only when it creates a container, not when CRIU restores
        // one (the root comes back writable): do what its create does.
        let readonly = crate::spec::ContainerSpec::load(id, bundle)?
            .typed()
            .root()
            .as_ref()
            .and_then(|r| r.readonly())
            .unwrap_or(false);
        if readonly {
            let pid = crate::process::stdio::read_pid(id, pid_file)?;
            if let Err(e) = remount_root_readonly(pid) {
                let _ = self.delete(id, true).await;
                return Err(Error::io(
                    id,
                    "make the restored root file system read-only",
                    e,
                ));
            }
        }
        Ok(())
    }
}

/// CRIU's own error lines from a dump.log or restore.log, the last few of them.
pub fn criu_errors(log: &Path) -> Option<String> {
    let text = std::fs::read_to_string(log).ok()?;
    let errors: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("Error (") || l.contains("Error:"))
        .map(str::trim)
        .collect();
    if errors.is_empty() {
        return None;
    }
    // The first error is usually the reason; the last says where the dump gave up.
    let mut picked: Vec<&str> = errors.iter().take(2).copied().collect();
    if let Some(last) = errors.last() {
        if !picked.contains(last) {
            picked.push(last);
        }
    }
    Some(picked.join(" | "))
}

/// Adds CRIU's own reason (from its log) to a failed runc checkpoint/restore.
fn with_criu_reason(e: Error, log: &Path, engine: Engine) -> Error {
    match e {
        Error::Runtime { id, step, message } => Error::Runtime {
            id,
            step,
            message: match criu_errors(log) {
                Some(criu) => format!("CRIU: {criu} ({engine}: {message})"),
                None => message,
            },
        },
        other => other,
    }
}

impl Runc {
    pub(super) fn criu_args(
        &self,
        id: &str,
        cmd: &mut Command,
        opts: &CheckpointOpts,
    ) -> Result<()> {
        if !opts.empty_ns.is_empty() && !self.empty_ns {
            return Err(Error::invalid(
                id,
                format!(
                    "{} cannot leave namespaces out of a checkpoint (--empty-ns)",
                    self.engine
                ),
            ));
        }
        criu_args(cmd, opts);
        Ok(())
    }
}

fn criu_args(cmd: &mut Command, opts: &CheckpointOpts) {
    cmd.arg("--image-path").arg(&opts.image_path);
    cmd.arg("--work-path").arg(&opts.work_path);
    if opts.tcp_established {
        cmd.arg("--tcp-established");
    }
    if opts.ext_unix_sk {
        cmd.arg("--ext-unix-sk");
    }
    if opts.shell_job {
        cmd.arg("--shell-job");
    }
    if opts.file_locks {
        cmd.arg("--file-locks");
    }
    for ns in &opts.empty_ns {
        cmd.arg("--empty-ns").arg(ns);
    }
    if !opts.cgroups_mode.is_empty() {
        cmd.arg("--manage-cgroups-mode").arg(&opts.cgroups_mode);
    }
    if opts.lazy_pages {
        cmd.arg("--lazy-pages");
    }
}

/// What runc, crun and runsc say when asked to signal a process that is gone
/// (runc: "container not running", or "unable to signal init: os: process
/// already finished" when init exits between runc's look and its signal).
fn is_finished(message: &str) -> bool {
    let message = message.to_ascii_lowercase();
    message.contains("not running")
        || message.contains("no such process")
        || message.contains("process already finished")
}

/// runc and runsc say "… does not exist", crun "…: No such file or directory".
fn is_not_exist(message: &str) -> bool {
    message.contains("not exist") || message.contains("No such file or directory")
}

#[cfg(test)]
mod tests;
