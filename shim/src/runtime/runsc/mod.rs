//! gVisor's runsc. A pod is one gVisor sandbox: its root container (the pod's pause) is
//! created first, every container of the pod joins it (runsc reads CRI's container-type and
//! sandbox-id annotations), and gVisor checkpoints the whole sandbox, all containers at one
//! instant, without CRIU or a cgroup freezer. The command line is runc's for the most part, so
//! the plain subcommands go through the runc CLI driver under runsc's name. How such a pod is
//! checkpointed, and what gVisor refuses, is in `sandbox.rs`.

mod sandbox;

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Mutex,
};

use async_trait::async_trait;
use serde_json::json;

use super::{
    config::Engine, CheckpointHooks, CheckpointOpts, ContainerTarget, HeldPod, OciRuntime,
    Operation, PodCapture, PodCheckpoint, PodRoot, ProcessStdio, Runc, RuntimeState, Timings,
};
use crate::{
    error::{Error, Result},
    process::reaper::{self, Exit},
    spec::ContainerSpec,
};

/// The gVisor image file a sandbox checkpoint writes.
pub const STATE_FILE: &str = "checkpoint.img";

pub struct Runsc {
    cli: Runc,
    /// A container of a sandbox gets its stdio when it starts, not when it is created: the
    /// stdio handed to `create` is kept here for `start`.
    start_stdio: Mutex<HashMap<String, ProcessStdio>>,
    /// Containers that joined a sandbox (as opposed to roots, whose sandbox process is theirs).
    joined: Mutex<std::collections::HashSet<String>>,
}

/// Where runsc writes the pid an exec has inside the sandbox.
fn internal_pid_file(pid_file: &Path) -> PathBuf {
    pid_file.with_extension("internal-pid")
}

impl Runsc {
    pub fn new(binary: PathBuf, root: PathBuf, args: Vec<String>) -> Self {
        Runsc {
            cli: Runc::new(binary, root)
                .with_args(args)
                .dialect(Engine::Runsc, false),
            start_stdio: Mutex::new(HashMap::new()),
            joined: Mutex::new(Default::default()),
        }
    }
}

/// Whether the bundle's container joins a pod's sandbox (CRI's container-type annotation).
fn joins_sandbox(id: &str, bundle: &Path) -> bool {
    ContainerSpec::load(id, bundle).is_ok_and(|s| s.joins_pod())
}

/// The root container's spec: the pod's namespaces (gVisor's own kernel provides PID, IPC and
/// UTS; the network namespace is CRI's), its cgroup, and a static busybox that sleeps.
fn pod_root_spec(pod: &PodRoot) -> serde_json::Value {
    let mut namespaces = vec![
        json!({"type": "pid"}),
        json!({"type": "ipc"}),
        json!({"type": "uts"}),
        json!({"type": "mount"}),
    ];
    if pod.netns.is_empty() {
        namespaces.push(json!({"type": "network"}));
    } else {
        namespaces.push(json!({"type": "network", "path": pod.netns}));
    }
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "user": {"uid": 0, "gid": 0},
            "args": ["/busybox", "sleep", "2147483647"],
            "env": ["PATH=/"],
            "cwd": "/",
            "capabilities": {"bounding": [], "effective": [], "permitted": []},
            "noNewPrivileges": true
        },
        "root": {"path": "rootfs", "readonly": true},
        "hostname": pod.hostname,
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]}
        ],
        "annotations": {
            "io.kubernetes.cri.container-type": "sandbox",
            "io.kubernetes.cri.sandbox-id": pod.id,
        },
        "linux": {
            "cgroupsPath": pod.cgroup,
            "namespaces": namespaces
        }
    })
}

/// Writes the root container's bundle: config.json and a rootfs holding only a static busybox.
fn write_pod_root_bundle(pod: &PodRoot) -> Result<PathBuf> {
    let bundle = pod.bundle.join("gvisor-root");
    let rootfs = bundle.join("rootfs");
    std::fs::create_dir_all(&rootfs).map_err(|e| Error::io(&pod.id, "create root bundle", e))?;
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.exists())
        .ok_or_else(|| {
            Error::precondition(
                &pod.id,
                "the gVisor pod root needs a static busybox at /bin/busybox (busybox-static)",
            )
        })?;
    std::fs::copy(busybox, rootfs.join("busybox"))
        .map_err(|e| Error::io(&pod.id, "copy busybox into the pod root", e))?;
    let spec = serde_json::to_vec_pretty(&pod_root_spec(pod))
        .map_err(|e| Error::other(&pod.id, "encode root spec", e))?;
    std::fs::write(bundle.join("config.json"), spec)
        .map_err(|e| Error::io(&pod.id, "write root config.json", e))?;
    Ok(bundle)
}

/// `runsc ps --format json`: the container's PIDs (inside gVisor), as numbers (or, in some
/// versions, process objects with a `PID`).
fn parse_ps(id: &str, out: &[u8]) -> Result<Vec<u32>> {
    let v: Option<Vec<serde_json::Value>> =
        serde_json::from_slice(out).map_err(|e| Error::other(id, "parse runsc ps", e))?;
    Ok(v.unwrap_or_default()
        .iter()
        .filter_map(|p| p.as_u64().or_else(|| p["PID"].as_u64()).map(|n| n as u32))
        .collect())
}

#[async_trait]
impl OciRuntime for Runsc {
    /// runsc keeps sandbox state of its own: an id without a directory may still be its.
    fn keeps_container_dirs(&self) -> bool {
        false
    }

    fn engine(&self) -> Engine {
        Engine::Runsc
    }

    async fn create(
        &self,
        id: &str,
        bundle: &Path,
        stdio: ProcessStdio,
        pid_file: &Path,
    ) -> Result<()> {
        let kept = stdio.try_clone(id)?;
        if joins_sandbox(id, bundle) {
            self.joined.lock().unwrap().insert(id.to_string());
        }
        self.cli.create(id, bundle, stdio, pid_file).await?;
        self.start_stdio
            .lock()
            .unwrap()
            .insert(id.to_string(), kept);
        Ok(())
    }

    async fn start(&self, id: &str) -> Result<()> {
        let stdio = self.start_stdio.lock().unwrap().remove(id);
        match stdio {
            Some(stdio) => {
                let mut cmd = self.cli.command();
                cmd.args(["start", id]);
                self.cli
                    .run_with_process_stdio(id, "start", cmd, stdio)
                    .await
            }
            // runsc hands start's stdio to the container: never pipes we would wait on.
            None => {
                let mut cmd = self.cli.command();
                cmd.args(["start", id]);
                self.cli
                    .run_with_process_stdio(id, "start", cmd, ProcessStdio::default())
                    .await
            }
        }
    }

    async fn exec(
        &self,
        id: &str,
        process_json: &Path,
        stdio: ProcessStdio,
        pid_file: &Path,
    ) -> Result<()> {
        // The host pid runsc leaves is its own waiting process, not the sandboxed one: a
        // SIGKILL to it would leave the exec running in the sandbox. The pid inside the
        // sandbox is kept beside the pid file, for `kill_exec`.
        let mut cmd = self.cli.command();
        cmd.arg("exec").arg("--detach");
        cmd.arg("--process").arg(process_json);
        cmd.arg("--pid-file").arg(pid_file);
        cmd.arg("--internal-pid-file")
            .arg(internal_pid_file(pid_file));
        if let Some(sock) = &stdio.console_socket {
            cmd.arg("--console-socket").arg(sock);
        }
        cmd.arg(id);
        self.cli
            .run_with_process_stdio(id, "exec", cmd, stdio)
            .await
    }

    async fn kill_exec(&self, id: &str, pid: i32, pid_file: &Path, signal: u32) -> Result<()> {
        let inner = std::fs::read_to_string(internal_pid_file(pid_file))
            .ok()
            .and_then(|t| t.trim().parse::<u32>().ok());
        let Some(inner) = inner else {
            return crate::runtime::signal_host_process(id, pid, signal);
        };
        let mut cmd = self.cli.command();
        cmd.args(["kill", "--pid", &inner.to_string(), id, &signal.to_string()]);
        self.cli.run(id, "kill exec", cmd).await.map(|_| ())
    }

    fn forget_exec(&self, pid_file: &Path) {
        let _ = std::fs::remove_file(internal_pid_file(pid_file));
    }

    async fn kill(&self, id: &str, signal: u32, all: bool) -> Result<()> {
        self.cli.kill(id, signal, all).await
    }

    async fn delete(&self, id: &str, force: bool) -> Result<()> {
        self.start_stdio.lock().unwrap().remove(id);
        let joined = self.joined.lock().unwrap().remove(id);
        let deleted = self.cli.delete(id, force).await;
        // Only once the root is gone (a not-found counts as gone): the state of a sandbox
        // that still runs is what lets runsc stop it.
        if !joined && deleted.is_ok() {
            sandbox::forget_sandbox(self.cli.state_root(), id);
        }
        deleted
    }

    async fn pause(&self, id: &str) -> Result<()> {
        self.cli.pause(id).await
    }

    async fn resume(&self, id: &str) -> Result<()> {
        self.cli.resume(id).await
    }

    async fn pids(&self, id: &str) -> Result<Vec<u32>> {
        let mut cmd = self.cli.command();
        cmd.args(["ps", "--format", "json", id]);
        let out = self.cli.run(id, "ps", cmd).await?;
        parse_ps(id, &out)
    }

    async fn state(&self, id: &str) -> Result<RuntimeState> {
        self.cli.state(id).await
    }

    async fn update(&self, id: &str, _resources_json: &[u8]) -> Result<()> {
        Err(Error::precondition(
            id,
            "runsc cannot change the resources of a running container",
        ))
    }

    /// The container's processes live in gVisor's kernel, not on the host: `runsc wait`
    /// reports how the container's init ended.
    async fn wait_init(&self, id: &str, pid: i32, since: std::time::Instant) -> Exit {
        // A root container's sandbox process is the shim's child and ends with the root's
        // exit status (once it is gone `runsc wait` cannot tell it any more): reap it.
        if !self.joined.lock().unwrap().contains(id) {
            return reaper::wait_since(pid, since).await;
        }
        let status = loop {
            let mut cmd = self.cli.command();
            cmd.args(["wait", id]);
            match self.cli.run(id, "wait", cmd).await {
                Ok(out) => {
                    break serde_json::from_slice::<serde_json::Value>(&out)
                        .ok()
                        .and_then(|v| v["exitStatus"].as_i64())
                        .unwrap_or(255) as i32
                }
                // The watch begins at create; runsc only waits on a started container.
                Err(Error::Runtime { message, .. }) if message.contains("not started") => {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
                // A failed wait is no exit: only a container that is gone or stopped ended.
                Err(e) => match self.state(id).await {
                    Ok(st) if st.status != "stopped" => {
                        log::warn!("{e}; {id} is {}, waiting again", st.status);
                        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                    }
                    _ => {
                        log::warn!("{e}");
                        break 255;
                    }
                },
            }
        };
        Exit {
            pid,
            status,
            at: time::OffsetDateTime::now_utc(),
        }
    }

    fn adapt_container_spec(&self, spec: &mut ContainerSpec) {
        // Containers of a pod join the sandbox's kernel; the host namespace paths CRI filled in
        // (those of the sandbox process) mean nothing inside gVisor. A container sharing the
        // pod's PID namespace (CRI gave it the sandbox's path) gets no PID namespace of its
        // own: gVisor then runs it in the sandbox's root one, whose PID 1 is the pod's root
        // container, as the pause process is under runc. One with a PID namespace of its own
        // (no path) keeps it. A container that starts a sandbox of its own keeps its paths
        // (its network namespace above all).
        if spec.joins_pod() {
            spec.leave_joined_namespace("pid");
            spec.clear_namespace_paths(&[]);
        }
    }

    async fn start_pod(&self, pod: &PodRoot) -> Result<Option<i32>> {
        // A gVisor sandbox is its own kernel: saying yes would silently give a private one.
        for (asked, what) in [
            (pod.host_pid, "PID namespace (hostPID)"),
            (pod.host_ipc, "IPC namespace (hostIPC)"),
        ] {
            if asked {
                return Err(Error::invalid(
                    &pod.id,
                    format!(
                        "the pod asks for the node's {what}, which a gVisor sandbox cannot share"
                    ),
                ));
            }
        }
        let bundle = write_pod_root_bundle(pod)?;
        let pid_file = bundle.join("init.pid");
        let opts;
        let result = match &pod.restore_image {
            Some(image) => {
                opts = CheckpointOpts {
                    image_path: image.clone(),
                    ..Default::default()
                };
                self.restore(&pod.id, &bundle, &opts, ProcessStdio::default(), &pid_file)
                    .await
            }
            None => {
                match self
                    .create(&pod.id, &bundle, ProcessStdio::default(), &pid_file)
                    .await
                {
                    Ok(()) => self.start(&pod.id).await,
                    Err(e) => Err(e),
                }
            }
        };
        let pid = result.and_then(|()| crate::process::stdio::read_pid(&pod.id, &pid_file));
        if pid.is_err() {
            let _ = self.delete(&pod.id, true).await;
        }
        pid.map(Some)
    }

    /// runsc (20240729) ignores `linux.sysctl`: asked for `net.ipv4.ip_local_port_range`
    /// 20000 30000, a sandbox reads 16000 65535; some namespaced sysctls do not exist in it.
    fn applies_sysctls(&self) -> bool {
        false
    }

    fn check_operation(&self, id: &str, op: Operation, in_pod: bool) -> Result<()> {
        sandbox::check_operation(self.name(), id, op, in_pod)
    }

    async fn stop_for_pod(&self, id: &str) -> Result<bool> {
        sandbox::stop_for_pod(self, id).await
    }

    fn hooks(&self) -> &dyn CheckpointHooks {
        self
    }
}

#[async_trait]
impl CheckpointHooks for Runsc {
    /// The sandbox's processes are the sentry's, not the host's: nothing to check there.
    fn restores_host_tasks(&self) -> bool {
        false
    }

    /// gVisor restores a sandbox's memory itself, from its own image.
    fn supports_lazy_restore(&self) -> bool {
        false
    }

    /// Checkpoints the whole sandbox `id` (the pod's root container) into `opts.image_path`.
    async fn checkpoint(&self, id: &str, opts: &CheckpointOpts) -> Result<()> {
        let mut cmd = self.cli.command();
        cmd.arg("checkpoint")
            .arg("--image-path")
            .arg(&opts.image_path);
        if opts.leave_running {
            cmd.arg("--leave-running");
        }
        cmd.arg(id);
        self.cli
            .run_cancellable(id, "checkpoint", cmd, opts.cancel.as_ref())
            .await
            .map(drop)
    }

    async fn restore(
        &self,
        id: &str,
        bundle: &Path,
        opts: &CheckpointOpts,
        stdio: ProcessStdio,
        pid_file: &Path,
    ) -> Result<()> {
        if joins_sandbox(id, bundle) {
            self.joined.lock().unwrap().insert(id.to_string());
        }
        let mut cmd = self.cli.command();
        cmd.arg("restore")
            .arg("--detach")
            .arg("--bundle")
            .arg(bundle)
            .arg("--image-path")
            .arg(&opts.image_path)
            .arg("--pid-file")
            .arg(pid_file);
        if let Some(sock) = &stdio.console_socket {
            cmd.arg("--console-socket").arg(sock);
        }
        cmd.arg(id);
        self.cli
            .run_with_process_stdio(id, "restore", cmd, stdio)
            .await
    }

    fn restore_image(&self, container_dir: &Path) -> PathBuf {
        // One image for the whole sandbox, beside the containers' directories.
        container_dir
            .parent()
            .unwrap_or(container_dir)
            .join(stasis_api::layout::SANDBOX_IMAGE_DIR)
    }

    fn has_image(&self, image: &Path) -> bool {
        image.join(STATE_FILE).exists()
    }

    fn pod_restore_image(&self, pod_id: &str, dir: &Path) -> Result<Option<PathBuf>> {
        sandbox::pod_restore_image(self, pod_id, dir).map(Some)
    }

    /// gVisor restores a pod's containers into one sandbox and resumes it when the last is
    /// back: nothing runs early, so nothing needs holding.
    async fn hold_restored(&self, _id: &str, _cgroup_path: &str) -> Result<bool> {
        Ok(false)
    }

    async fn checkpoint_container(
        &self,
        target: &ContainerTarget,
        opts: &CheckpointOpts,
    ) -> Result<Timings> {
        sandbox::checkpoint_container(self, target, opts).await
    }

    async fn checkpoint_pod(&self, job: &PodCheckpoint<'_>) -> Result<PodCapture> {
        sandbox::checkpoint_pod(self, job).await
    }

    async fn stop_held(&self, held: &HeldPod) -> Result<()> {
        sandbox::stop_held(self, held).await
    }

    async fn release_held(&self, held: &HeldPod) -> Result<()> {
        sandbox::release_held(self, held).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_spec_and_ps() {
        let pod = PodRoot {
            id: "pod1".into(),
            bundle: PathBuf::from("/tmp/x"),
            netns: "/var/run/netns/cni-1".into(),
            hostname: "web".into(),
            cgroup: "/stasis/pod1".into(),
            host_pid: false,
            host_ipc: false,
            restore_image: None,
        };
        let spec = pod_root_spec(&pod);
        assert_eq!(
            spec["annotations"]["io.kubernetes.cri.container-type"],
            "sandbox"
        );
        assert_eq!(
            spec["linux"]["namespaces"][4]["path"],
            "/var/run/netns/cni-1"
        );
        assert_eq!(spec["hostname"], "web");
        let pids = parse_ps(
            "c",
            br#"[{"UID":0,"PID":1,"PPID":0},{"UID":0,"PID":7,"PPID":1}]"#,
        )
        .unwrap();
        assert_eq!(pids, vec![1, 7]);
        assert_eq!(parse_ps("c", b"[1,7]").unwrap(), vec![1, 7]);
        assert_eq!(parse_ps("c", b"null").unwrap(), Vec::<u32>::new());

        let r = Runsc::new(
            "runsc".into(),
            "/run/x".into(),
            vec!["--platform=systrap".into()],
        );
        let cmd = r.cli.command();
        let args: Vec<_> = cmd.get_args().map(|a| a.to_string_lossy()).collect();
        assert_eq!(args, ["--root", "/run/x", "--platform=systrap"]);

        let doc = |annotations: serde_json::Value| {
            json!({"process": {"user": {"uid": 0, "gid": 0}, "cwd": "/"}, "root": {"path": "rootfs"},
                   "annotations": annotations,
                   "linux": {"namespaces": [{"type": "pid", "path": "/proc/9/ns/pid"},
                                            {"type": "network", "path": "/proc/9/ns/net"}]}})
            .to_string()
        };
        let mut spec = ContainerSpec::parse("c", "config.json", doc(json!({})).as_bytes()).unwrap();
        let own = spec.clone();
        r.adapt_container_spec(&mut spec);
        assert_eq!(spec, own, "a container of its own keeps its namespaces");
        let mut spec = ContainerSpec::parse(
            "c",
            "config.json",
            doc(json!({"io.kubernetes.cri.container-type": "container"})).as_bytes(),
        )
        .unwrap();
        r.adapt_container_spec(&mut spec);
        // The pod's PID namespace is the sandbox's root one: no entry of its own.
        assert_eq!(
            spec.document()["linux"]["namespaces"],
            json!([{"type": "network"}])
        );
    }
}
