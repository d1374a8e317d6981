//! Benchmark: what streaming a dump's pages out of CRIU costs inside the frozen window. The
//! same container is dumped live (`runc checkpoint --leave-running`) with its page images
//! written to files, as stasis dumps today, and with its pages sent to CRIU's own page server
//! over a loopback socket (what "pages go to the archive once" through a page-server dump
//! would do), the server keeping them on disk or in tmpfs. CRIU's frozen time is read from
//! its dump.log (first seize to "Unfreezing tasks"), next to runc's wall time.
//!
//!     sudo scripts/bench.sh page_server [--memory 0,256,1024] [--runs 3]

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use stasis_e2e::{Containerd, STASIS_RUNTIME};
use stasis_examples::{median, print_table};

struct Dump {
    wall: Duration,
    frozen: Duration,
}

/// CRIU's frozen time in a dump.log: from the first line that seizes or freezes tasks to
/// "Unfreezing tasks" (lines start with "(seconds.micros)").
fn criu_frozen(log: &Path) -> Result<Duration> {
    let text = std::fs::read_to_string(log).with_context(|| format!("read {}", log.display()))?;
    let (mut seized, mut thawed) = (None, None);
    for line in text.lines() {
        let Some(stamp) = line
            .strip_prefix('(')
            .and_then(|l| l.split_once(')'))
            .and_then(|(t, _)| t.trim().parse::<f64>().ok())
        else {
            continue;
        };
        let low = line.to_ascii_lowercase();
        if seized.is_none() && (low.contains("seiz") || low.contains("freez")) {
            seized = Some(stamp);
        }
        if low.contains("unfreezing tasks") {
            thawed = Some(stamp);
        }
    }
    match (seized, thawed) {
        (Some(s), Some(t)) if t >= s => Ok(Duration::from_secs_f64(t - s)),
        _ => bail!("{}: no seize/unfreeze lines", log.display()),
    }
}

/// Whether something listens on loopback TCP `port` (read from /proc/net/tcp: connecting to
/// CRIU's page server would use up its one connection).
fn listening(port: u16) -> bool {
    let needle = format!("0100007F:{port:04X}");
    std::fs::read_to_string("/proc/net/tcp").is_ok_and(|t| {
        t.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[1] == needle && f[3] == "0A"
        })
    })
}

/// One live `runc checkpoint` of stasis's container `id` under `dir` (removed after); its
/// page images in the image directory (stasis's dump), or, given `page_server`, sent to
/// CRIU's page server, which keeps them there.
fn dump(c: &Containerd, id: &str, dir: &Path, page_server: Option<&Path>) -> Result<Dump> {
    let (images, work) = (dir.join("images"), dir.join("work"));
    std::fs::create_dir_all(&images)?;
    std::fs::create_dir_all(&work)?;
    let mut cmd = Command::new("runc");
    cmd.arg("--root")
        .arg(Path::new("/run/stasis/runc").join(&c.namespace))
        .args(["checkpoint", "--leave-running", "--image-path"])
        .arg(&images)
        .arg("--work-path")
        .arg(&work);
    let server = match page_server {
        None => None,
        Some(pages_dir) => {
            std::fs::create_dir_all(pages_dir)?;
            let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
            let child = Command::new("criu")
                .arg("page-server")
                .arg("--images-dir")
                .arg(pages_dir)
                .args(["--address", "127.0.0.1", "--port", &port.to_string()])
                .arg("-o")
                .arg(dir.join("page-server.log"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("start criu page-server")?;
            let deadline = Instant::now() + Duration::from_secs(10);
            while !listening(port) {
                ensure!(Instant::now() < deadline, "criu page-server never listened");
                std::thread::sleep(Duration::from_millis(10));
            }
            cmd.arg("--page-server").arg(format!("127.0.0.1:{port}"));
            Some(child)
        }
    };
    let t = Instant::now();
    let out = cmd.arg(id).output()?;
    let wall = t.elapsed();
    if let Some(mut s) = server {
        let deadline = Instant::now() + Duration::from_secs(30);
        while s.try_wait()?.is_none() {
            if Instant::now() > deadline {
                let _ = s.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = s.wait();
    }
    ensure!(
        out.status.success(),
        "runc checkpoint: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let frozen = criu_frozen(&work.join("dump.log"))?;
    let _ = std::fs::remove_dir_all(dir);
    if let Some(pages_dir) = page_server {
        let _ = std::fs::remove_dir_all(pages_dir);
    }
    Ok(Dump { wall, frozen })
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

fn ratio(a: Duration, b: Duration) -> String {
    format!("{:.2}x", a.as_secs_f64() / b.as_secs_f64().max(1e-9))
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("bench_page_server [--memory 0,256,1024] [--runs N]: a live CRIU dump with its pages written to files vs sent to CRIU's page server (on disk, in tmpfs): runc's time and CRIU's frozen time");
        return Ok(());
    }
    let flag = |name: &str| stasis_examples::flag(&args, name);
    let memories = stasis_examples::numbers(&args, "--memory", "0,256,1024")?;
    let runs: usize = flag("--runs").map(|r| r.parse()).transpose()?.unwrap_or(3);
    let c = Containerd::start("bench-page-server")?;
    let image = c.import_busybox()?;
    let shm: PathBuf =
        Path::new("/dev/shm").join(format!("stasis-bench-pages-{}", std::process::id()));
    let mut rows = vec![vec![
        "memory".to_string(),
        "to files: runc / frozen".into(),
        "page server on disk: runc / frozen".into(),
        "page server in tmpfs: runc / frozen".into(),
        "frozen: page server (disk) / files".into(),
        "frozen: page server (tmpfs) / files".into(),
    ]];
    for &mib in &memories {
        let id = format!("ps-{mib}");
        // Both workloads keep writing or have written /ready.
        stasis_examples::ctr_start(
            &c,
            STASIS_RUNTIME,
            image,
            &id,
            &stasis_examples::memory_workload(mib),
            "/ready",
        )?;
        let mut got: [Vec<Dump>; 3] = Default::default();
        for run in 0..runs {
            // Rotating which goes first: none always meets the others' writeback.
            for k in 0..3 {
                let which = (k + run) % 3;
                let dir = c.dir.join(format!("ps-{mib}-{run}-{which}"));
                let on_disk = c.dir.join(format!("pages-{mib}-{run}"));
                let page_server = match which {
                    0 => None,
                    1 => Some(on_disk.as_path()),
                    _ => Some(shm.as_path()),
                };
                got[which].push(dump(&c, &id, &dir, page_server)?);
                // Each starts with the disk's writeback of the others done.
                Command::new("sync").status()?;
            }
        }
        stasis_examples::ctr_remove(&c, &id);
        let med = |v: &[Dump]| {
            let mut w: Vec<Duration> = v.iter().map(|d| d.wall).collect();
            let mut f: Vec<Duration> = v.iter().map(|d| d.frozen).collect();
            (median(&mut w), median(&mut f))
        };
        let (fw, ff) = med(&got[0]);
        let (dw, df) = med(&got[1]);
        let (tw, tf) = med(&got[2]);
        rows.push(vec![
            format!("{mib} MiB"),
            format!("{} / {}", ms(fw), ms(ff)),
            format!("{} / {}", ms(dw), ms(df)),
            format!("{} / {}", ms(tw), ms(tf)),
            ratio(df, ff),
            ratio(tf, ff),
        ]);
        eprintln!("{:?}", rows.last().unwrap());
    }
    let _ = std::fs::remove_dir_all(&shm);
    println!("median of {runs} runs; runc = `runc checkpoint --leave-running` wall time, frozen = CRIU's dump.log from seizing to unfreezing");
    print_table(&rows);
    c.finish()
}
