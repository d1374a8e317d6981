//! What the checkpoint benchmarks read of stasisctl, and Podman as a peer.

use std::{path::Path, process::Command, time::Duration};

use anyhow::{ensure, Context, Result};
use stasis_e2e::image;

/// What `stasisctl pod checkpoint --format json`, run with `STASIS_LOG=debug`, says of itself.
pub struct CheckpointReport {
    pub frozen_ms: f64,
    pub packaging_ms: f64,
    /// The archive's size.
    pub bytes: u64,
    /// Bytes it moved through read and write calls (its `/proc/self/io` rchar + wchar).
    pub moved: u64,
    /// Bytes it wrote through write calls (wchar).
    pub written: u64,
}

/// The report of a finished `stasisctl pod checkpoint --format json` (`STASIS_LOG=debug`).
pub fn checkpoint_report(out: &std::process::Output) -> Result<CheckpointReport> {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.success(), "checkpoint: {stderr}");
    let result: serde_json::Value = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["phase"] == "result")
        .context("no result line")?;
    let io = stderr
        .lines()
        .find(|l| l.contains("io of this command"))
        .context("no io line (STASIS_LOG=debug)")?;
    let field = |name: &str| -> u64 {
        io.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{name}="))?.parse().ok())
            .unwrap_or_default()
    };
    Ok(CheckpointReport {
        frozen_ms: result["frozen_ms"].as_f64().unwrap_or_default(),
        packaging_ms: result["packaging_ms"].as_f64().unwrap_or_default(),
        bytes: result["bytes"].as_u64().unwrap_or_default(),
        moved: field("rchar") + field("wchar"),
        written: field("wchar"),
    })
}

/// Podman on private storage under a directory, with runc (crun refuses this machine's
/// hybrid cgroups) and no systemd; busybox loaded as the tests build it.
pub struct Podman {
    program: std::ffi::OsString,
    root: std::path::PathBuf,
}

impl Podman {
    /// Podman, when there is one: `$STASIS_PODMAN` (what `scripts/bench.sh` unpacks for the
    /// benches that want it; CI never does), else `podman` on the PATH.
    pub fn new(dir: &Path) -> Result<Option<Podman>> {
        let program = std::env::var_os("STASIS_PODMAN").unwrap_or_else(|| "podman".into());
        let found = Command::new(&program).arg("--version").output();
        if !found.is_ok_and(|o| o.status.success()) {
            eprintln!(
                "podman is not installed: its columns say \"-\" (scripts/bench.sh unpacks it)"
            );
            return Ok(None);
        }
        let p = Podman {
            program,
            root: dir.join("podman"),
        };
        let archive = dir.join("busybox-podman.oci.tar");
        image::write_busybox_archive(&archive, image::BUSYBOX_REF)?;
        p.run(&["load", "-i", archive.to_str().unwrap()])?;
        Ok(Some(p))
    }

    pub fn run(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(&self.program)
            .arg("--root")
            .arg(self.root.join("root"))
            .arg("--runroot")
            .arg(self.root.join("run"))
            .args([
                "--runtime",
                "runc",
                "--cgroup-manager",
                "cgroupfs",
                "--events-backend",
                "file",
            ])
            .args(args)
            .output()?;
        ensure!(
            out.status.success(),
            "podman {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// A container `name` running [`crate::memory_workload`], ready.
    pub fn start(&self, name: &str, mib: u64) -> Result<()> {
        let workload = crate::memory_workload(mib);
        self.run(&[
            "run",
            "-d",
            "--network",
            "none",
            "--name",
            name,
            image::BUSYBOX_REF,
            "sh",
            "-c",
            &workload,
        ])?;
        let deadline = std::time::Instant::now() + Duration::from_secs(300);
        while self.run(&["exec", name, "test", "-e", "/ready"]).is_err() {
            ensure!(
                std::time::Instant::now() < deadline,
                "podman {name} never ready"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// `podman container checkpoint --leave-running --export` of `name`, uncompressed, into
    /// `out` (removed after): how long it took, and how long an fsync of the export takes
    /// after (Podman leaves the archive in the page cache; stasis's is durable on return).
    pub fn checkpoint(&self, name: &str, out: &Path) -> Result<(Duration, Duration)> {
        let t = std::time::Instant::now();
        self.run(&[
            "container",
            "checkpoint",
            "--leave-running",
            "--compress",
            "none",
            "--export",
            out.to_str().unwrap(),
            name,
        ])?;
        let took = t.elapsed();
        let t = std::time::Instant::now();
        std::fs::File::open(out)?.sync_all()?;
        let synced = t.elapsed();
        std::fs::remove_file(out)?;
        // Podman keeps the CRIU images it exported in its storage, unsynced: written back now,
        // not during whatever is measured next.
        Command::new("sync").status()?;
        Ok((took, synced))
    }

    /// Removes every container and image of this private store, and the cgroups Podman's
    /// cgroupfs manager leaves behind (`libpod_parent` in every hierarchy).
    pub fn reset(&self) {
        let _ = self.run(&["system", "reset", "--force"]);
        let Ok(hierarchies) = std::fs::read_dir("/sys/fs/cgroup") else {
            return;
        };
        for h in hierarchies.flatten() {
            remove_cgroup_tree(&h.path().join("libpod_parent"));
        }
        // Podman (as root) always makes its network run directory here; left only if empty
        // (another Podman's state stays).
        let _ = std::fs::remove_dir("/run/containers/networks");
        let _ = std::fs::remove_dir("/run/containers");
    }
}

/// Removes an empty cgroup and the empty ones below it (a cgroup is removed by `rmdir`; one
/// that still holds a process stays).
fn remove_cgroup_tree(dir: &Path) {
    if let Ok(children) = std::fs::read_dir(dir) {
        for c in children.flatten() {
            if c.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&c.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// The sum of `n` live checkpoints (`ctr c checkpoint --task --rw`), one after the other, of
/// containers running [`crate::memory_workload`] through containerd's `io.containerd.runc.v2`,
/// each removed after; `image` is busybox in containerd's default namespace.
pub fn runc_v2_checkpoint_sum(
    c: &stasis_e2e::Containerd,
    image: &str,
    n: usize,
    mib: u64,
) -> Result<Duration> {
    let mut sum = Duration::ZERO;
    for k in 0..n {
        let id = format!("rv2-{mib}-{n}-{k}");
        c.ctr_ok(&[
            "run",
            "-d",
            "--runtime",
            stasis_e2e::RUNC_RUNTIME,
            image,
            &id,
            "sh",
            "-c",
            &crate::memory_workload(mib),
        ])?;
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        let probe = ["tasks", "exec", "--exec-id", "probe", &id, "cat", "/ready"];
        while !c.ctr(&probe)?.status.success() {
            ensure!(std::time::Instant::now() < deadline, "{id} not ready");
            std::thread::sleep(Duration::from_millis(200));
        }
        let t = std::time::Instant::now();
        c.ctr_ok(&[
            "containers",
            "checkpoint",
            "--task",
            "--rw",
            &id,
            &format!("ck-{id}"),
        ])?;
        sum += t.elapsed();
        let _ = c.ctr(&["tasks", "kill", "-s", "KILL", &id]);
        std::thread::sleep(Duration::from_millis(200));
        let _ = c.ctr(&["tasks", "delete", &id]);
        let _ = c.ctr(&["containers", "delete", &id]);
        let _ = c.ctr(&["images", "rm", &format!("ck-{id}")]);
    }
    Ok(sum)
}
