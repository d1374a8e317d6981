//! Benchmark: what a pod checkpoint to an archive file costs next to a checkpoint directory
//! (the staged files renamed: the floor for stasis) and next to Podman's
//! `container checkpoint --export` of the same one-container workload (uncompressed both),
//! with the bytes stasisctl moved through read and write calls per archive byte (its
//! `/proc/self/io`, logged at debug): how many times a page byte is copied after CRIU wrote it.
//!
//!     sudo scripts/bench.sh archive [--memory 0,256,1024] [--runs N]
//!
//! Podman (Debian trixie's, run with runc: crun refuses this machine's hybrid cgroups) is
//! installed by `scripts/bench.sh`, never by CI; without it its columns say "-".

use std::{path::Path, process::Command, time::Duration};

use anyhow::{ensure, Context, Result};
use stasis_e2e::{image, Containerd};
use stasis_examples::{human, median, print_table, start_memory_pod, timed};

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

fn ratio(a: Duration, b: Option<Duration>) -> String {
    match b {
        Some(b) => format!("{:.2}x", a.as_secs_f64() / b.as_secs_f64()),
        None => "-".into(),
    }
}

/// One `pod checkpoint --leave-running -o OUT --format json`: its result, and the bytes it
/// read and wrote through the kernel.
struct Ckpt {
    wall: Duration,
    frozen_ms: f64,
    bytes: u64,
    moved: u64,
}

fn checkpoint(c: &Containerd, pod: &str, out: &Path) -> Result<Ckpt> {
    let (o, wall) = timed(|| {
        Ok(c.stasisctl_command()?
            .env("STASIS_LOG", "debug")
            .args([
                "pod",
                "checkpoint",
                pod,
                "--leave-running",
                "--format",
                "json",
            ])
            .arg("-o")
            .arg(out)
            .output()?)
    })?;
    let stdout = String::from_utf8_lossy(&o.stdout);
    let stderr = String::from_utf8_lossy(&o.stderr);
    ensure!(
        o.status.success(),
        "checkpoint to {}: {stderr}",
        out.display()
    );
    let result: serde_json::Value = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["event"] == "result")
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
    Ok(Ckpt {
        wall,
        frozen_ms: result["frozen_ms"].as_f64().unwrap_or_default(),
        bytes: result["bytes"].as_u64().unwrap_or_default(),
        moved: field("rchar") + field("wchar"),
    })
}

/// Podman on private storage under `dir`, with runc and no systemd.
struct Podman {
    root: std::path::PathBuf,
}

impl Podman {
    fn new(dir: &Path) -> Option<Podman> {
        let found = Command::new("podman").arg("--version").output().ok()?;
        found.status.success().then(|| Podman {
            root: dir.join("podman"),
        })
    }

    fn run(&self, args: &[&str]) -> Result<String> {
        let out = Command::new("podman")
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

    /// A container running the same workload as the pods, ready.
    fn start(&self, name: &str, mib: u64) -> Result<()> {
        let workload = stasis_examples::memory_workload(mib);
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
}

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("bench_archive [--memory 0,256,1024] [--runs N]: pod checkpoint to a file vs to a directory vs Podman's --export, with stasisctl's bytes moved per archive byte");
        return Ok(());
    }
    let flag = |name: &str| stasis_examples::flag(&args, name);
    let memories: Vec<u64> = flag("--memory")
        .unwrap_or_else(|| "0,256,1024".into())
        .split(',')
        .map(|s| s.parse())
        .collect::<Result<_, _>>()?;
    let runs: usize = flag("--runs").map(|r| r.parse()).transpose()?.unwrap_or(3);
    let c = Containerd::start("bench-archive")?;
    let busybox = c.import_busybox_for_cri()?;
    let podman = Podman::new(&c.dir);
    if let Some(p) = &podman {
        let archive = c.dir.join("busybox-podman.oci.tar");
        image::write_busybox_archive(&archive, image::BUSYBOX_REF)?;
        p.run(&["load", "-i", archive.to_str().unwrap()])?;
    } else {
        eprintln!("podman is not installed: its columns say \"-\" (scripts/bench.sh installs it)");
    }
    let mut rows = vec![vec![
        "pod memory".to_string(),
        "ckpt to dir".into(),
        "ckpt to file".into(),
        "file / dir (<=1.15)".into(),
        "podman --export".into(),
        "file / podman (<=1.0)".into(),
        "frozen (file)".into(),
        "archive".into(),
        "stasisctl read+written / archive".into(),
    ]];
    for &mib in &memories {
        let name = format!("a{mib}");
        let pod = start_memory_pod(&c, &name, busybox, mib).await?;
        if let Some(p) = &podman {
            p.start(&name, mib)?;
        }
        let (mut dir, mut file, mut pm) = (Vec::new(), Vec::new(), Vec::new());
        let (mut frozen, mut bytes, mut moved) = (Vec::new(), 0, 0);
        for run in 0..runs {
            // Alternating which goes first: neither always meets the other's page cache.
            let d = c.dir.join(format!("{name}-{run}-dir/"));
            let f = c.dir.join(format!("{name}-{run}.tar"));
            let order: [&Path; 2] = if run % 2 == 0 { [&d, &f] } else { [&f, &d] };
            for out in order {
                let r = checkpoint(&c, &pod, out)?;
                if out == f.as_path() {
                    file.push(r.wall);
                    frozen.push(Duration::from_secs_f64(r.frozen_ms / 1000.0));
                    (bytes, moved) = (r.bytes, r.moved);
                } else {
                    dir.push(r.wall);
                }
            }
            std::fs::remove_file(&f)?;
            std::fs::remove_dir_all(&d)?;
            if let Some(p) = &podman {
                let export = c.dir.join(format!("{name}-{run}.podman.tar"));
                let (_, t) = timed(|| {
                    p.run(&[
                        "container",
                        "checkpoint",
                        "--leave-running",
                        "--compress",
                        "none",
                        "--export",
                        export.to_str().unwrap(),
                        &name,
                    ])
                })?;
                pm.push(t);
                std::fs::remove_file(&export)?;
            }
        }
        c.cri().await?.stop_and_remove_pod(&pod).await?;
        if let Some(p) = &podman {
            p.run(&["rm", "-f", &name])?;
        }
        let (d, f) = (median(&mut dir), median(&mut file));
        let p = (!pm.is_empty()).then(|| median(&mut pm));
        rows.push(vec![
            format!("{mib} MiB"),
            ms(d),
            ms(f),
            ratio(f, Some(d)),
            p.map(ms).unwrap_or_else(|| "-".into()),
            ratio(f, p),
            ms(median(&mut frozen)),
            human(bytes),
            format!("{:.2}", moved as f64 / bytes.max(1) as f64),
        ]);
    }
    print_table(&rows);
    if let Some(p) = &podman {
        let _ = p.run(&["system", "reset", "--force"]);
    }
    c.finish()
}
