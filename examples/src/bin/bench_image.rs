//! Benchmark: pod checkpoints as OCI images against archive files, in one run on two nodes
//! (private containerd daemons) with a loopback registry (Debian's docker-registry):
//! checkpoint to an image vs to a file, push, pull on a node that never had the image,
//! restore there by reference vs from the file (page cache dropped), image size vs archive
//! size, for pods with 0 and 256 MiB of touched memory.
//!
//!     sudo scripts/bench.sh image [--memory 0,256] [--runs N]

use std::time::Duration;

use anyhow::{ensure, Result};
use stasis_e2e::{registry::Registry, Containerd};
use stasis_examples::{human, median, print_table, start_memory_pod, timed};

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

fn ratio(a: Duration, b: Duration) -> String {
    format!("{:.2}x", a.as_secs_f64() / b.as_secs_f64())
}

/// `stasisctl ARGS` that must succeed; returns its stdout.
fn ok(c: &Containerd, args: &[&str]) -> Result<String> {
    let out = c
        .stasisctl_command()?
        .env("STASIS_LOG", "debug")
        .args(args)
        .output()?;
    // Where a checkpoint's writing time goes (stasisctl's debug log).
    for line in String::from_utf8_lossy(&out.stderr).lines() {
        if line.contains("sent_ms") || line.contains("write_ms") {
            eprintln!("  {line}");
        }
    }
    ensure!(
        out.status.success(),
        "stasisctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// `ctr` in CRI's namespace, where stasisctl keeps images.
fn ctr_k8s(c: &Containerd, args: &[&str]) -> Result<()> {
    let out = c.ctr_k8s(args)?;
    ensure!(
        out.status.success(),
        "ctr {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("bench_image [--memory 0,256] [--runs N]: checkpoint images vs archive files (checkpoint, push, pull, restore, size)");
        return Ok(());
    }
    let flag = |name: &str| stasis_examples::flag(&args, name);
    let memories: Vec<u64> = flag("--memory")
        .unwrap_or_else(|| "0,256".into())
        .split(',')
        .map(|s| s.parse())
        .collect::<Result<_, _>>()?;
    let runs: usize = flag("--runs").map(|r| r.parse()).transpose()?.unwrap_or(1);
    // Node c checkpoints and pushes; node b has never seen the image: it pulls and restores
    // (from the file, copied over, and by reference).
    let (c, b) = Containerd::start_pair("bench-image")?;
    let image = c.import_busybox_for_cri()?;
    b.import_busybox_for_cri()?;
    let registry = Registry::start(&c.dir)?;
    let mut rows = vec![vec![
        "pod memory".to_string(),
        "ckpt to file".into(),
        "ckpt to image".into(),
        "image / file (<=1.1)".into(),
        "push".into(),
        "pull".into(),
        "restore from file".into(),
        "restore from ref".into(),
        "ref / file".into(),
        "archive".into(),
        "image".into(),
    ]];
    for &mib in &memories {
        let mut s: [Vec<Duration>; 6] = Default::default();
        let (mut archive_bytes, mut image_bytes) = (0, 0);
        for run in 0..runs {
            let name = format!("i{mib}-{run}");
            let pod = start_memory_pod(&c, &name, image, mib).await?;
            let file = c.dir.join(format!("{name}.tar"));
            let reference = format!("{}/bench/{name}:1", registry.host);
            let (_, t) = timed(|| {
                ok(
                    &c,
                    &[
                        "pod",
                        "checkpoint",
                        &pod,
                        "--leave-running",
                        "-o",
                        file.to_str().unwrap(),
                    ],
                )
            })?;
            s[0].push(t);
            let (_, t) = timed(|| {
                ok(
                    &c,
                    &[
                        "pod",
                        "checkpoint",
                        &pod,
                        "--leave-running",
                        "--image",
                        &reference,
                    ],
                )
            })?;
            s[1].push(t);
            c.cri().await?.stop_and_remove_pod(&pod).await?;
            let (_, t) = timed(|| ok(&c, &["image", "push", &reference, "--plain-http"]))?;
            s[2].push(t);
            image_bytes = stasis_controller::image::summary(
                c.socket().to_str().unwrap(),
                "k8s.io",
                &reference,
            )
            .await?
            .size;
            ctr_k8s(&c, &["images", "rm", "--sync", &reference])?;
            let (_, t) = timed(|| ok(&b, &["image", "pull", &reference, "--plain-http"]))?;
            s[3].push(t);
            let copy = b.dir.join(format!("{name}.tar"));
            std::fs::copy(&file, &copy)?;
            // Alternating which goes first: neither always follows the other's teardown.
            let sources = [(4, copy.to_str().unwrap()), (5, reference.as_str())];
            let order = if run % 2 == 0 {
                [sources[0], sources[1]]
            } else {
                [sources[1], sources[0]]
            };
            for (column, source) in order {
                stasis_examples::drop_caches();
                let (restored, t) = timed(|| ok(&b, &["pod", "restore", source]))?;
                s[column].push(t);
                b.cri().await?.stop_and_remove_pod(&restored).await?;
            }
            archive_bytes = std::fs::metadata(&file)?.len();
            std::fs::remove_file(&file)?;
            std::fs::remove_file(&copy)?;
            ctr_k8s(&b, &["images", "rm", "--sync", &reference])?;
        }
        let m: Vec<Duration> = s.iter_mut().map(|v| median(v)).collect();
        rows.push(vec![
            format!("{mib} MiB"),
            ms(m[0]),
            ms(m[1]),
            ratio(m[1], m[0]),
            ms(m[2]),
            ms(m[3]),
            ms(m[4]),
            ms(m[5]),
            ratio(m[5], m[4]),
            human(archive_bytes),
            human(image_bytes),
        ]);
    }
    print_table(&rows);
    drop(registry);
    c.finish()?;
    b.finish()
}
