//! The end of a test: the leak check (`Containerd::finish`) and the forced cleanup (`Drop`)
//! that leaves nothing behind even when a test failed.

use std::{
    collections::BTreeSet,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Result};

use crate::{cri, leaks, mounts_under, Containerd};

/// How long what a test removed may take to be gone: a shim told to shut down lets its
/// helpers go for up to 2 s before it exits and removes its socket.
const REMOVED_BOUND: Duration = Duration::from_secs(5);

pub(crate) fn cleanup_dir(dir: &Path) {
    let mut mounts = mounts_under(dir);
    mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for m in mounts {
        let _ = nix::mount::umount2(m.as_str(), nix::mount::MntFlags::MNT_DETACH);
    }
    // STASIS_E2E_KEEP_LOGS=1 keeps containerd's log (with the shims' lines) for a look.
    if std::env::var_os("STASIS_E2E_KEEP_LOGS").is_some() {
        let log = dir.join("containerd.log");
        let kept = std::path::PathBuf::from(format!("{}.log", dir.display()));
        let _ = std::fs::copy(&log, &kept);
    }
    let _ = std::fs::remove_dir_all(dir);
}

impl Containerd {
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

    /// Runs `f` with a CRI client of this containerd on a runtime of its own (teardown runs
    /// outside any test runtime); `T::default()` if CRI does not answer.
    fn on_cri<T, F, Fut>(&self, f: F) -> T
    where
        T: Default + Send + 'static,
        F: FnOnce(cri::CriClient) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = T>,
    {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return T::default();
        };
        let socket = self.socket();
        std::thread::spawn(move || {
            rt.block_on(async {
                match cri::CriClient::connect(&socket).await {
                    Ok(c) => f(c).await,
                    Err(_) => T::default(),
                }
            })
        })
        .join()
        .unwrap_or_default()
    }

    /// The CRI pods of this containerd (none if CRI does not answer).
    fn cri_pod_ids(&self) -> Vec<String> {
        self.on_cri(|mut c| async move {
            c.pods()
                .await
                .map(|pods| pods.into_iter().map(|p| p.id).collect())
                .unwrap_or_default()
        })
    }

    /// Stops and removes every CRI pod (best effort, for teardown).
    fn remove_cri_pods(&self) {
        self.on_cri(|mut c| async move {
            for p in c.pods().await.unwrap_or_default() {
                let _ = c.stop_and_remove_pod(&p.id).await;
            }
        })
    }
}

impl Containerd {
    /// Every pod and container id this containerd's log names (see `leaks::ids_in_log`).
    pub fn ids_seen(&self) -> std::collections::BTreeSet<String> {
        leaks::ids_in_log(
            &std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default(),
        )
    }

    /// What is left of this test's pods and containers right now: processes (stasisctl's
    /// helpers among them), mounts, cgroups (every hierarchy), shim sockets, runtime state, and
    /// entries of stasis's stores (see `leaks::store_leftovers`).
    pub fn leftovers(&self) -> Vec<String> {
        let ids = self.ids_seen();
        let mut left = self.leftovers_of(&ids, true);
        left.extend(leaks::store_leftovers(&ids));
        left
    }

    /// What is left of `ids`; with `everything`, also any process of ours (shims, pause
    /// processes, helpers) and any mount under our directory, whoever it belongs to.
    fn leftovers_of(&self, ids: &BTreeSet<String>, everything: bool) -> Vec<String> {
        let containerd = self.child.as_ref().map(|c| c.id() as i32);
        let named = |l: &String| everything || ids.iter().any(|id| l.contains(id.as_str()));
        let mut left: Vec<String> = leaks::processes(
            &self.dir,
            ids,
            &self.namespace,
            &containerd.into_iter().collect::<Vec<_>>(),
        )
        .into_iter()
        .filter(|l| named(l) || l.contains("stasisctl"))
        .collect();
        left.extend(
            mounts_under(&self.dir)
                .into_iter()
                .map(|m| format!("mount {m}"))
                .filter(named),
        );
        left.extend(leaks::cgroups(ids, &self.namespace));
        left.extend(leaks::sockets(&self.socket(), ids, &self.namespace));
        left.extend(leaks::runtime_state(ids, &self.namespace));
        left
    }

    /// Ends the test. First, what the test removed itself must be gone already (within the
    /// bound a shim has to exit once told to); then what is still there is removed the way a
    /// user would (tasks and containers through containerd, pods through CRI) and must go too.
    /// Fails listing anything left behind. Every test that starts a containerd ends with this.
    pub fn finish(mut self) -> Result<()> {
        let listed = self.listed_ids();
        let removed: BTreeSet<String> = self.ids_seen().difference(&listed).cloned().collect();
        let left = self.settled(|| self.leftovers_of(&removed, false), REMOVED_BOUND);
        if !left.is_empty() {
            bail!(
                "left behind by what the test itself removed ({} s after it was removed):\n  {}\ncontainerd log lines about them:\n{}",
                REMOVED_BOUND.as_secs(),
                left.join("\n  "),
                self.log_about(&left, 60),
            );
        }
        self.remove_through_apis();
        let left = self.settled(|| self.leftovers(), Duration::from_secs(15));
        if left.is_empty() {
            return Ok(());
        }
        bail!(
            "the test left behind after its pods and containers were removed:\n  {}\ncontainerd log lines about them:\n{}\ncontainerd log tail:\n{}",
            left.join("\n  "),
            self.log_about(&left, 60),
            self.log_tail(30)
        )
    }

    /// `probe` once it reports nothing, or what it still reports after `bound`.
    fn settled(&self, probe: impl Fn() -> Vec<String>, bound: Duration) -> Vec<String> {
        let deadline = Instant::now() + bound;
        let mut left = probe();
        while !left.is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
            left = probe();
        }
        left
    }

    /// The ids containerd still lists: tasks and containers in both namespaces, CRI pods.
    fn listed_ids(&self) -> BTreeSet<String> {
        let mut ids = BTreeSet::new();
        for what in ["tasks", "containers"] {
            let args = [what, "ls", "-q"];
            for out in [self.ctr(&args), self.ctr_k8s(&args)].into_iter().flatten() {
                if out.status.success() {
                    let text = String::from_utf8_lossy(&out.stdout);
                    ids.extend(text.lines().map(|l| l.trim().to_string()));
                }
            }
        }
        ids.extend(self.cri_pod_ids());
        ids
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
        leaks::remove_store_leftovers();
        leaks::leave();
        if std::env::var_os("STASIS_KEEP").is_none() {
            cleanup_dir(&self.dir);
        }
    }
}
