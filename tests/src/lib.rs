//! The end-to-end harness: a private containerd (own root, state, sockets and namespace under
//! a temp dir) with the freshly built stasis shim first on its PATH, images built from busybox,
//! and a teardown that leaves nothing behind even when a test panics.

pub mod api;
pub mod cri;
pub mod image;
pub mod leaks;
pub mod registry;

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

pub const STASIS_RUNTIME: &str = "io.containerd.stasis.v2";
pub const RUNC_RUNTIME: &str = "io.containerd.runc.v2";
pub const SHIM_BINARY: &str = "containerd-shim-stasis-v2";

/// Fails (never skips) when something the end-to-end tests need is missing.
pub fn require_prerequisites() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("end-to-end tests must run as root (containerd, runc and mounts need it)");
    }
    for tool in ["containerd", "ctr", "runc"] {
        if which(tool).is_none() {
            bail!("{tool} not found on PATH: run scripts/install-deps.sh");
        }
    }
    Ok(())
}

pub fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(tool))
            .find(|p| p.is_file())
    })
}

/// The workspace's target dir, where `cargo build` put the shim.
pub fn target_dir() -> PathBuf {
    if let Ok(t) = std::env::var("CARGO_TARGET_DIR") {
        return PathBuf::from(t);
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target")
}

/// The newest workspace build of binary `name` (debug or release).
pub fn built_binary(name: &str) -> Result<PathBuf> {
    let candidates = ["debug", "release"].map(|p| target_dir().join(p).join(name));
    candidates
        .iter()
        .filter(|p| p.exists())
        .max_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .cloned()
        .with_context(|| {
            format!(
                "{name} not built: run `cargo build --workspace` first (looked in {candidates:?})"
            )
        })
}

/// The shim binary under test: $STASIS_SHIM, else the workspace's newest build.
pub fn shim_binary() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("STASIS_SHIM") {
        return Ok(PathBuf::from(p));
    }
    built_binary(SHIM_BINARY)
}

pub struct Containerd {
    pub dir: PathBuf,
    pub namespace: String,
    child: Option<Child>,
    shim_dir: PathBuf,
}

impl Containerd {
    /// Starts a private containerd for the test `name`.
    pub fn start(name: &str) -> Result<Self> {
        require_prerequisites()?;
        let dir = PathBuf::from(format!("/tmp/stasis-e2e/{name}-{}", std::process::id()));
        if dir.exists() {
            cleanup_dir(&dir);
        }
        std::fs::create_dir_all(&dir)?;
        let shim_dir = dir.join("bin");
        std::fs::create_dir_all(&shim_dir)?;
        std::fs::copy(shim_binary()?, shim_dir.join(SHIM_BINARY))
            .context("copy the shim into the private PATH")?;
        // The names containerd runs for handlers stasis-gvisor and stasis-crun; the name picks
        // the backend.
        for backend in ["gvisor", "crun"] {
            std::os::unix::fs::symlink(
                SHIM_BINARY,
                shim_dir.join(format!("containerd-shim-stasis-{backend}-v2")),
            )
            .context("link the backend shim names")?;
        }
        let mut c = Containerd {
            namespace: format!("e2e-{name}"),
            child: None,
            shim_dir,
            dir,
        };
        c.write_config()?;
        c.spawn()?;
        Ok(c)
    }

    /// Where the shims of this containerd look for `<engine>.toml` (empty unless a test writes).
    pub fn config_dir(&self) -> PathBuf {
        self.dir.join("etc-stasis")
    }

    /// `ctr tasks checkpoint --exit` of task `id` (which must stop it), then the task deleted
    /// and created again from that checkpoint image through containerd's Tasks API, until it
    /// runs.
    pub async fn checkpoint_exit_and_restore(&self, id: &str) -> Result<()> {
        let reference = self
            .ctr_ok(&["tasks", "checkpoint", "--exit", id])?
            .trim()
            .to_string();
        // The exit is reported as it happens, possibly just after the checkpoint returned
        // (gVisor's sandbox process ends after `runsc checkpoint` does).
        self.wait_for(
            &format!("{id} stopped by checkpoint --exit"),
            Duration::from_secs(10),
            || Ok(self.task_status(id)?.as_deref() == Some("STOPPED")),
        )?;
        self.ctr_ok(&["tasks", "delete", id])?;
        api::restore_task_from_checkpoint(&self.socket(), &self.namespace, id, &reference).await?;
        self.wait_for(&format!("{id} running"), Duration::from_secs(10), || {
            Ok(self.task_status(id)?.as_deref() == Some("RUNNING"))
        })
    }

    /// How many pods CRI lists.
    pub async fn pod_count(&self) -> Result<usize> {
        let mut cri = self.cri().await?;
        Ok(cri
            .runtime
            .list_pod_sandbox(cri::cri::ListPodSandboxRequest::default())
            .await?
            .into_inner()
            .items
            .len())
    }

    /// What exists, counted from every side: CRI pods, CRI containers, shim processes. A
    /// refused operation must leave all three as they were, not just the pod count.
    pub async fn footprint(&self) -> Result<Footprint> {
        let mut cri = self.cri().await?;
        let containers = cri
            .runtime
            .list_containers(cri::cri::ListContainersRequest::default())
            .await?
            .into_inner()
            .containers
            .len();
        Ok(Footprint {
            pods: self.pod_count().await?,
            containers,
            shims: self.shim_pids().len(),
        })
    }

    /// The footprint once it is steady: every pod has its one shim and no removed pod's shim
    /// is still on its way out (all pods of these tests are stasis pods).
    pub async fn settled_footprint(&self) -> Result<Footprint> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let now = self.footprint().await?;
            if now.shims == now.pods || Instant::now() > deadline {
                return Ok(now);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits (up to 15 s: a removed pod's shim exits a moment later) for the footprint to be
    /// `expected`; fails showing what differs.
    pub async fn expect_footprint(&self, expected: Footprint) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let now = self.footprint().await?;
            if now == expected {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("expected {expected:?}, found {now:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("containerd.sock")
    }

    fn write_config(&self) -> Result<()> {
        let pause = image::PAUSE_REF;
        let d = self.dir.display();
        let config = format!(
            r#"version = 3
root = "{d}/root"
state = "{d}/state"
disabled_plugins = ["io.containerd.nri.v1.nri"]

[grpc]
  address = "{d}/containerd.sock"

[ttrpc]
  address = "{d}/containerd.sock.ttrpc"

[debug]
  address = "{d}/debug.sock"
  level = "debug"

[plugins.'io.containerd.cri.v1.images'.pinned_images]
  sandbox = "{pause}"

[plugins.'io.containerd.cri.v1.runtime']
  restrict_oom_score_adj = true
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = ["/usr/lib/cni"]
    conf_dir = "{d}/cni"
  [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.stasis]
    runtime_type = "io.containerd.stasis.v2"
    sandboxer = "shim"
    container_annotations = ["io.stasis.*"]
  [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.stasis-gvisor]
    runtime_type = "io.containerd.stasis-gvisor.v2"
    sandboxer = "shim"
    container_annotations = ["io.stasis.*"]
  [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.stasis-crun]
    runtime_type = "io.containerd.stasis-crun.v2"
    sandboxer = "shim"
    container_annotations = ["io.stasis.*"]
  # stasis without io.stasis.* container annotations: what a restore must refuse loudly.
  [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.stasis-plain]
    runtime_type = "io.containerd.stasis.v2"
    sandboxer = "shim"
  [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
"#
        );
        std::fs::create_dir_all(self.dir.join("cni"))?;
        let (bridge, subnet) = self.network();
        let cni = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": bridge,
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": bridge,
                    "isGateway": true,
                    "ipMasq": false,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": subnet}]],
                        "dataDir": self.dir.join("cni-ipam").display().to_string()
                    }
                },
                {"type": "loopback"}
            ]
        });
        std::fs::write(
            self.dir.join("cni/10-stasis.conflist"),
            serde_json::to_vec_pretty(&cni)?,
        )?;
        std::fs::write(self.dir.join("config.toml"), config)?;
        Ok(())
    }

    /// This containerd's private CNI bridge name and subnet, derived from its directory so that
    /// concurrent test containerds never share one.
    pub fn network(&self) -> (String, String) {
        use sha2::{Digest, Sha256};
        let h = Sha256::digest(self.dir.display().to_string());
        (
            format!("stb{:02x}{:02x}{:02x}", h[0], h[1], h[2]),
            format!("10.{}.{}.0/24", 200 + h[3] % 50, h[4]),
        )
    }

    /// A CRI client on this containerd's socket, once CRI answers (after a restart containerd
    /// serves ctr before its CRI plugin has finished initialising).
    pub async fn cri(&self) -> Result<cri::CriClient> {
        let mut client = cri::CriClient::connect(&self.socket()).await?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = client
                .runtime
                .status(cri::cri::StatusRequest { verbose: false })
                .await;
            match ready {
                Ok(_) => return Ok(client),
                Err(e) if Instant::now() > deadline => bail!("CRI not ready after 30 s: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// Builds the busybox image and imports it where CRI finds images (namespace k8s.io).
    pub fn import_busybox_for_cri(&self) -> Result<&'static str> {
        // The pause image goes in too: pods of handlers that are not stasis need it.
        for (file, name, cmd) in [
            ("busybox.oci.tar", image::BUSYBOX_REF, &["sh"][..]),
            (
                "pause.oci.tar",
                image::PAUSE_REF,
                &["sleep", "2147483647"][..],
            ),
        ] {
            let archive = self.dir.join(file);
            image::write_image_archive(&archive, name, cmd)?;
            let out = Command::new("ctr")
                .arg("--address")
                .arg(self.socket())
                .args(["--namespace", "k8s.io", "images", "import"])
                .arg(&archive)
                .output()?;
            if !out.status.success() {
                bail!(
                    "import {name} into k8s.io: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        Ok(image::BUSYBOX_REF)
    }

    fn path_env(&self) -> String {
        format!(
            "{}:{}",
            self.shim_dir.display(),
            std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into())
        )
    }

    fn spawn(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("containerd.log"))?;
        let child = Command::new("containerd")
            .arg("--config")
            .arg(self.dir.join("config.toml"))
            .env("PATH", self.path_env())
            // Backend settings come from this test's own directory, never the host's /etc.
            .env("STASIS_CONFIG_DIR", self.config_dir())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("start containerd")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if self.socket().exists()
                && self
                    .ctr(&["version"])
                    .map(|o| o.status.success())
                    .unwrap_or(false)
            {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!(
            "containerd did not come up in 30 s; log:\n{}",
            self.log_tail(40)
        )
    }

    /// Stops containerd (not its shims, which must survive) and starts it again.
    pub fn restart(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = child.wait();
        }
        let _ = std::fs::remove_file(self.socket());
        self.spawn()
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default();
        let all: Vec<_> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// `ctr` against this containerd, in the test namespace.
    pub fn ctr_command(&self) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address")
            .arg(self.socket())
            .arg("--namespace")
            .arg(&self.namespace)
            .env("PATH", self.path_env());
        cmd
    }

    pub fn ctr(&self, args: &[&str]) -> Result<Output> {
        let out = self
            .ctr_command()
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("run ctr")?;
        Ok(out)
    }

    /// Runs `ctr`, failing with its stderr unless it succeeds; returns stdout.
    pub fn ctr_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.ctr(args)?;
        if !out.status.success() {
            bail!(
                "ctr {} failed ({}): {}{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&out.stdout)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Builds the busybox image and imports it; returns its reference.
    pub fn import_busybox(&self) -> Result<&'static str> {
        let archive = self.dir.join("busybox.oci.tar");
        image::write_busybox_archive(&archive, image::BUSYBOX_REF)?;
        self.ctr_ok(&["images", "import", archive.to_str().unwrap()])?;
        Ok(image::BUSYBOX_REF)
    }

    /// Status column of `ctr t ls` for a task, if listed.
    pub fn task_status(&self, id: &str) -> Result<Option<String>> {
        let out = self.ctr_ok(&["tasks", "ls"])?;
        Ok(out.lines().skip(1).find_map(|l| {
            let cols: Vec<_> = l.split_whitespace().collect();
            (cols.first() == Some(&id)).then(|| cols.last().unwrap_or(&"").to_string())
        }))
    }

    /// Waits until `f` holds, for up to `timeout`.
    pub fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        mut f: impl FnMut() -> Result<bool>,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if f()? {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("timed out after {timeout:?} waiting for {what}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Kills task `id`, waits for it to stop, deletes it and its container.
    pub fn remove_task(&self, id: &str) -> Result<()> {
        let _ = self.ctr(&["tasks", "kill", "-s", "KILL", id]);
        self.wait_for(&format!("{id} stopped"), Duration::from_secs(10), || {
            Ok(matches!(
                self.task_status(id)?.as_deref(),
                None | Some("STOPPED")
            ))
        })?;
        let _ = self.ctr(&["tasks", "delete", id]);
        self.ctr_ok(&["containers", "delete", id])?;
        Ok(())
    }

    /// `ctr tasks exec` of `cmd` in task `id` with a fresh exec id: (succeeded, stdout).
    pub fn exec_in(&self, id: &str, cmd: &[&str]) -> Result<(bool, String)> {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let exec_id = format!(
            "x{}",
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let mut args = vec!["tasks", "exec", "--exec-id", exec_id.as_str(), id];
        args.extend(cmd);
        let out = self.ctr(&args)?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        ))
    }

    /// The value of a counter file in task `id` (retried: the writer may be mid-write).
    pub fn counter(&self, id: &str, file: &str) -> Result<u64> {
        let mut last = String::new();
        for _ in 0..50 {
            let (_, out) = self.exec_in(id, &["cat", file])?;
            if let Ok(v) = out.trim().parse() {
                return Ok(v);
            }
            last = out;
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!("counter {file} in {id} unreadable: {last:?}")
    }

    /// Waits (up to 10 s) until the counter `file` in task `id` moves; returns where it was.
    pub fn wait_counter_moving(&self, id: &str, file: &str) -> Result<u64> {
        let first = self.counter(id, file)?;
        self.wait_for(&format!("{id} counting"), Duration::from_secs(10), || {
            Ok(self.counter(id, file)? > first)
        })?;
        Ok(first)
    }

    /// The in-memory token of the `cri::counter_loop` writing `file` in task `id` (asked with
    /// SIGUSR1, the answer removed again so it is never in a checkpoint's files).
    pub fn memory_token(&self, id: &str, file: &str) -> Result<String> {
        let ask = format!("rm -f {file}.token; kill -USR1 $(cat {file}.pid)");
        let (ok, out) = self.exec_in(id, &["sh", "-c", &ask])?;
        if !ok {
            bail!("{id}: cannot signal the counter loop: {out}");
        }
        for _ in 0..100 {
            let (ok, out) = self.exec_in(
                id,
                &["sh", "-c", &format!("cat {file}.token && rm {file}.token")],
            )?;
            if ok && !out.trim().is_empty() {
                return Ok(out.trim().to_string());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!("{id}: the counter loop never answered with its token")
    }

    /// Pids of stasis shims serving this containerd.
    pub fn shim_pids(&self) -> Vec<i32> {
        processes_matching(&[SHIM_BINARY, &self.socket().display().to_string()])
    }
}

impl Containerd {
    /// `stasisctl` (the workspace's build) against this containerd's CRI namespace.
    pub fn stasisctl(&self, args: &[&str]) -> Result<Output> {
        let exe = built_binary("stasisctl")?;
        let out = Command::new(exe)
            .arg("--address")
            .arg(self.socket())
            .args(["--namespace", "k8s.io"])
            .args(args)
            .output()?;
        Ok(out)
    }

    /// `stasisctl` that must succeed; returns stdout.
    pub fn stasisctl_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.stasisctl(args)?;
        if !out.status.success() {
            bail!(
                "stasisctl {} failed: {}{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&out.stdout)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// Pids whose command line contains all `needles`.
pub fn processes_matching(needles: &[&str]) -> Vec<i32> {
    let mut pids = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for e in entries.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if needles.iter().all(|n| cmdline.contains(n)) {
            pids.push(pid);
        }
    }
    pids
}

/// Mount points at or below `dir`.
pub fn mounts_under(dir: &Path) -> Vec<String> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let prefix = dir.display().to_string();
    text.lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .filter(|m| m.starts_with(&prefix))
        .map(str::to_string)
        .collect()
}

fn cleanup_dir(dir: &Path) {
    let mut mounts = mounts_under(dir);
    mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for m in mounts {
        let _ = nix::mount::umount2(m.as_str(), nix::mount::MntFlags::MNT_DETACH);
    }
    let _ = std::fs::remove_dir_all(dir);
}

impl Containerd {
    /// Stops and removes every CRI pod (best effort, for teardown).
    /// gVisor sandboxes of this containerd's pods that a failed test left behind (their state
    /// lives in the shared runsc root, their bundles below our directory).
    fn remove_gvisor_sandboxes(&self) {
        let root = "/run/stasis/runsc/k8s.io";
        let Ok(out) = Command::new("runsc")
            .args(["--root", root, "list", "-format=json"])
            .output()
        else {
            return;
        };
        let list: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let mine = self.dir.display().to_string();
        for c in list {
            let (Some(id), Some(bundle)) = (c["id"].as_str(), c["bundle"].as_str()) else {
                continue;
            };
            if bundle.starts_with(&mine) {
                let _ = Command::new("runsc")
                    .args(["--root", root, "delete", "-force", id])
                    .stderr(Stdio::null())
                    .status();
            }
        }
    }

    fn remove_cri_pods(&self) {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        let socket = self.socket();
        let _ = std::thread::spawn(move || {
            rt.block_on(async {
                let Ok(mut c) = cri::CriClient::connect(&socket).await else {
                    return;
                };
                let Ok(pods) = c
                    .runtime
                    .list_pod_sandbox(cri::cri::ListPodSandboxRequest::default())
                    .await
                else {
                    return;
                };
                for p in pods.into_inner().items {
                    let _ = c.stop_and_remove_pod(&p.id).await;
                }
            })
        })
        .join();
    }
}

impl Containerd {
    /// Every pod and container id this containerd's log names (see `leaks::ids_in_log`).
    pub fn ids_seen(&self) -> std::collections::BTreeSet<String> {
        leaks::ids_in_log(
            &std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default(),
        )
    }

    /// What is left of this test's pods and containers right now: processes, mounts, cgroups
    /// (every hierarchy), shim sockets, runtime state.
    pub fn leftovers(&self) -> Vec<String> {
        let ids = self.ids_seen();
        let containerd = self.child.as_ref().map(|c| c.id() as i32);
        let mut left = leaks::processes(
            &self.dir,
            &ids,
            &self.namespace,
            &containerd.into_iter().collect::<Vec<_>>(),
        );
        left.extend(
            mounts_under(&self.dir)
                .into_iter()
                .map(|m| format!("mount {m}")),
        );
        left.extend(leaks::cgroups(&ids, &self.namespace));
        left.extend(leaks::sockets(&self.socket(), &ids, &self.namespace));
        left.extend(leaks::runtime_state(&ids, &self.namespace));
        left
    }

    /// Ends the test: removes what is still there the way a user would (tasks and containers
    /// through containerd, pods through CRI), waits for the shims to go, then fails listing
    /// anything left behind. Every test that starts a containerd ends with this.
    pub fn finish(mut self) -> Result<()> {
        self.remove_through_apis();
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut left = self.leftovers();
        while !left.is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
            left = self.leftovers();
        }
        if left.is_empty() {
            return Ok(());
        }
        bail!(
            "the test left behind after its pods and containers were removed:\n  {}\ncontainerd log tail:\n{}",
            left.join("\n  "),
            self.log_tail(30)
        )
    }

    /// Tasks first, through containerd, so shims clean up after themselves; then CRI pods.
    fn remove_through_apis(&mut self) {
        if self.child.is_none() {
            return;
        }
        if let Ok(out) = self.ctr_ok(&["tasks", "ls", "-q"]) {
            for id in out.lines() {
                let _ = self.ctr(&["tasks", "kill", "-s", "KILL", id]);
                let _ = self.ctr(&["tasks", "delete", "-f", id]);
            }
        }
        if let Ok(out) = self.ctr_ok(&["containers", "ls", "-q"]) {
            for id in out.lines() {
                let _ = self.ctr(&["containers", "delete", id]);
            }
        }
        self.remove_cri_pods();
    }

    /// After a failed test: whatever of its ids is left in the shared places (cgroups, runtime
    /// state), removed so the next test starts clean.
    fn force_remove_ids(&self) {
        let ids = self.ids_seen();
        for root in leaks::cgroup_roots() {
            for id in &ids {
                for dir in [
                    root.join("stasis").join(id),
                    root.join(&self.namespace).join(id),
                ] {
                    remove_cgroup_tree(&dir);
                }
            }
            let _ = std::fs::remove_dir(root.join(&self.namespace));
        }
        for engine in ["runc", "crun"] {
            for ns in leaks::namespaces(&self.namespace) {
                for id in &ids {
                    let _ = std::fs::remove_dir_all(
                        Path::new("/run/stasis").join(engine).join(&ns).join(id),
                    );
                }
            }
        }
        let _ = std::fs::remove_dir_all(Path::new("/run/stasis/runc").join(&self.namespace));
        let _ = std::fs::remove_dir_all(Path::new("/run/stasis/crun").join(&self.namespace));
    }
}

/// Removes a cgroup and its children (deepest first), thawing frozen ones so their processes
/// can be killed by whoever owns them.
fn remove_cgroup_tree(dir: &Path) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        if e.path().is_dir() {
            remove_cgroup_tree(&e.path());
        }
    }
    let _ = std::fs::write(dir.join("freezer.state"), "THAWED");
    let _ = std::fs::write(dir.join("cgroup.freeze"), "0");
    if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        for pid in procs.lines().filter_map(|p| p.trim().parse::<i32>().ok()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
    for _ in 0..20 {
        if std::fs::remove_dir(dir).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Containerd {
    /// The forced cleanup, whether or not the test passed: nothing of it may outlive the test
    /// (a leak is reported by `finish`, not hidden here: `finish` runs first).
    fn drop(&mut self) {
        self.remove_through_apis();
        if let Some(mut child) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = child.wait();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.network().0])
            .stderr(Stdio::null())
            .status();
        for pid in self.shim_pids() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        self.remove_gvisor_sandboxes();
        self.force_remove_ids();
        if std::env::var_os("STASIS_KEEP").is_none() {
            cleanup_dir(&self.dir);
        }
    }
}

/// Pods, containers and shims of a containerd (see `Containerd::footprint`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Footprint {
    pub pods: usize,
    pub containers: usize,
    pub shims: usize,
}

/// `ctr events` of a containerd, read as it arrives, so a test waits for the event itself.
pub struct EventWatch {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl EventWatch {
    /// Starts `ctr events` and returns once it is subscribed: a throwaway container's start
    /// event has come through (no fixed wait).
    pub fn start(c: &Containerd, image: &str) -> Result<EventWatch> {
        let mut child = c
            .ctr_command()
            .arg("events")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let stdout = child.stdout.take().context("events stdout")?;
        let (tx, lines) = std::sync::mpsc::channel::<String>();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut w = EventWatch {
            child,
            lines,
            seen: Vec::new(),
        };
        for attempt in 0..5 {
            let id = format!("subscribed{attempt}");
            c.ctr_ok(&[
                "run",
                "--rm",
                "--runtime",
                STASIS_RUNTIME,
                image,
                &id,
                "true",
            ])?;
            if w.wait("/tasks/start", &id, Duration::from_secs(5)).is_ok() {
                return Ok(w);
            }
        }
        bail!("ctr events never delivered anything")
    }

    /// Waits until an event of `topic` mentioning `needle` has arrived.
    pub fn wait(&mut self, topic: &str, needle: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self
                .seen
                .iter()
                .find(|l| l.contains(topic) && l.contains(needle))
            {
                return Ok(l.clone());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!(
                    "no {topic} event for {needle} within {timeout:?}; saw:\n{}",
                    self.seen.join("\n")
                );
            }
            if let Ok(l) = self.lines.recv_timeout(left) {
                self.seen.push(l);
            }
        }
    }
}

impl Drop for EventWatch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A direct ttrpc client to the shim serving container `id`, bypassing containerd: for the
/// cases containerd itself would refuse before the shim sees them.
pub fn shim_task_client(c: &Containerd, id: &str) -> Result<containerd_shim_protos::TaskClient> {
    Ok(containerd_shim_protos::TaskClient::new(shim_connection(
        c, id,
    )?))
}

/// A raw ttrpc connection to the shim serving container `id` (in the test namespace).
pub fn shim_connection(c: &Containerd, id: &str) -> Result<containerd_shim_protos::ttrpc::Client> {
    let bundle = c
        .dir
        .join("state/io.containerd.runtime.v2.task")
        .join(&c.namespace)
        .join(id);
    let address = std::fs::read_to_string(bundle.join("address"))
        .with_context(|| format!("read shim address of {id}"))?;
    containerd_shim_protos::ttrpc::Client::connect(address.trim())
        .with_context(|| format!("connect to shim at {address}"))
}

/// Runs `cmd` on a new pseudo-terminal (as a controlling terminal), writes `input` to it,
/// and returns everything printed and the exit status.
pub fn run_on_pty(mut cmd: Command, input: &[u8], timeout: Duration) -> Result<(String, i32)> {
    use std::{
        io::{Read, Write},
        os::{fd::AsRawFd, unix::process::CommandExt},
    };
    let pty = nix::pty::openpty(None, None)?;
    let slave = pty.slave;
    let slave_fd = slave.as_raw_fd();
    cmd.stdin(Stdio::from(slave.try_clone()?))
        .stdout(Stdio::from(slave.try_clone()?))
        .stderr(Stdio::from(slave.try_clone()?));
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 || libc::ioctl(slave_fd, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    // Every copy of the slave must close, or reading the master never ends.
    drop(cmd);
    drop(slave);
    let mut master = std::fs::File::from(pty.master);
    let mut reader = master.try_clone()?;
    let printed = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = printed.clone();
    let collector = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    });
    // Type only once the program is there to read: it has printed something (a prompt).
    let ready = Instant::now() + Duration::from_secs(20);
    while printed.lock().unwrap().is_empty() {
        if Instant::now() > ready {
            let _ = child.kill();
            bail!("the program on the pty printed nothing within 20 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    master.write_all(input)?;
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("command on pty did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    drop(master);
    let _ = collector.join();
    let out = printed.lock().unwrap().clone();
    Ok((
        String::from_utf8_lossy(&out).into_owned(),
        status.code().unwrap_or(-1),
    ))
}
