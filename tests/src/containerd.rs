//! The private containerd a test runs against: its configuration, start and restart, and the
//! ways a test talks to it (ctr, CRI, stasisctl).

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::{
    api, built_binary, cri, image, require_prerequisites, shim_binary, teardown::cleanup_dir,
    SHIM_BINARY,
};

pub struct Containerd {
    pub dir: PathBuf,
    pub namespace: String,
    pub(crate) child: Option<Child>,
    pub(crate) shim_dir: PathBuf,
}

impl Containerd {
    /// Starts a private containerd for the test `name`.
    pub fn start(name: &str) -> Result<Self> {
        Self::start_with_cri_settings(name, "")
    }

    /// A private containerd whose CRI runtime plugin gets `settings` (TOML lines) too.
    pub fn start_with_cri_settings(name: &str, settings: &str) -> Result<Self> {
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
        // Counted from here: `Drop` uncounts it.
        crate::leaks::enter();
        let mut c = Containerd {
            namespace: format!("e2e-{name}"),
            child: None,
            shim_dir,
            dir,
        };
        c.write_config(settings)?;
        c.spawn()?;
        Ok(c)
    }

    /// Two private containerds, `<name>-a` and `<name>-b`: two "nodes" on this machine, each
    /// with its own root, state, sockets, CNI bridge and subnet. The test ends both with
    /// `finish`.
    pub fn start_pair(name: &str) -> Result<(Self, Self)> {
        Ok((
            Self::start(&format!("{name}-a"))?,
            Self::start(&format!("{name}-b"))?,
        ))
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

    fn write_config(&self, cri_settings: &str) -> Result<()> {
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
{cri_settings}
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
    /// busybox for CRI as image `name`, whose configured user is `user` (`uid:gid`).
    pub fn import_image_for_cri_as(&self, name: &str, user: &str) -> Result<()> {
        let archive = self.dir.join("user.oci.tar");
        image::write_image_archive_as(&archive, name, &["sh"], user)?;
        self.import_for_cri(&archive, name)
    }

    /// `ctr images import` of `archive` into CRI's namespace.
    fn import_for_cri(&self, archive: &Path, name: &str) -> Result<()> {
        let out = Command::new("ctr")
            .arg("--address")
            .arg(self.socket())
            .args(["--namespace", "k8s.io", "images", "import"])
            .arg(archive)
            .output()?;
        if !out.status.success() {
            bail!(
                "import {name} into k8s.io: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

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
            self.import_for_cri(&archive, name)?;
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
        // containerd 2.1.9 unpacks each Task API restore's checkpoint into a fresh
        // $XDG_RUNTIME_DIR/ctrd-checkpoint* (default /tmp) and never removes it (runc-v2
        // restores too): kept under this containerd's directory, they go with it.
        let xdg = self.dir.join("xdg-run");
        std::fs::create_dir_all(&xdg)?;
        let child = Command::new("containerd")
            .arg("--config")
            .arg(self.dir.join("config.toml"))
            .env("PATH", self.path_env())
            .env("XDG_RUNTIME_DIR", &xdg)
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

    /// The last `lines` lines of containerd's log that name one of the 64-hex ids found in
    /// `leftovers` (what containerd did about a leaked pod or container).
    pub fn log_about(&self, leftovers: &[String], lines: usize) -> String {
        let ids: std::collections::BTreeSet<&str> = leftovers
            .iter()
            .flat_map(|l| l.split(|c: char| !c.is_ascii_hexdigit()))
            .filter(|w| w.len() == 64)
            .collect();
        let text = std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default();
        let about: Vec<&str> = text
            .lines()
            .filter(|l| ids.iter().any(|id| l.contains(id)))
            .collect();
        about[about.len().saturating_sub(lines)..].join("\n")
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

    /// `ctr` in CRI's namespace (k8s.io), where CRI pods' images and stasisctl's live.
    pub fn ctr_k8s(&self, args: &[&str]) -> Result<Output> {
        Command::new("ctr")
            .arg("--address")
            .arg(self.socket())
            .args(["-n", "k8s.io"])
            .args(args)
            .env("PATH", self.path_env())
            .stdin(Stdio::null())
            .output()
            .context("run ctr")
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
        let out = self.stasisctl_command()?.args(args).output()?;
        Ok(out)
    }

    /// This node's restore policy with `extra` keys added, written to `<dir>/<name>`.
    pub fn policy_file(&self, name: &str, extra: serde_json::Value) -> Result<PathBuf> {
        // Every test "node" keeps pod logs below /tmp/stasis-e2e, as every real node does
        // below /var/log/pods: a pod moved between two nodes keeps its log dir.
        let mut policy = serde_json::json!({
            "host_path_prefixes": [self.dir],
            "log_directory_prefixes": ["/tmp/stasis-e2e"],
        });
        if let (Some(p), serde_json::Value::Object(more)) = (policy.as_object_mut(), extra) {
            p.extend(more);
        }
        let path = self.dir.join(name);
        std::fs::write(&path, policy.to_string())?;
        Ok(path)
    }

    /// `stasisctl --address <this containerd> --namespace k8s.io`, under this node's restore
    /// policy: host paths below the harness directory are the node's volume directory.
    pub fn stasisctl_command(&self) -> Result<Command> {
        let policy = self.dir.join("restore-policy.json");
        if !policy.exists() {
            self.policy_file("restore-policy.json", serde_json::json!({}))?;
        }
        let mut cmd = Command::new(built_binary("stasisctl")?);
        cmd.env("STASIS_RESTORE_POLICY", &policy)
            .arg("--address")
            .arg(self.socket())
            .args(["--namespace", "k8s.io"]);
        Ok(cmd)
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

/// Pods, containers and shims of a containerd (see `Containerd::footprint`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Footprint {
    pub pods: usize,
    pub containers: usize,
    pub shims: usize,
}
