//! Benchmark: what a pod checkpoint to an archive file costs next to a checkpoint directory
//! (the staged files renamed: the floor for stasis) and next to Podman's
//! `container checkpoint --export` of the same one-container workload (uncompressed both),
//! with the bytes stasisctl moved through read and write calls per archive byte (its
//! `/proc/self/io`, logged at debug): how many times a page byte is copied after CRIU wrote it.
//!
//!     sudo scripts/bench.sh archive [--memory 0,256,1024] [--runs N]
//!
//! Podman (Debian trixie's, run with runc: crun refuses this machine's hybrid cgroups) is
//! unpacked privately by `scripts/bench.sh`, never by CI; without it its columns say "-".
//! Podman returns with its export in the page cache, stasis with its archive fsynced: the
//! "podman + fsync" column adds what an fsync of Podman's export takes right after.

use std::{path::Path, time::Duration};

use anyhow::Result;
use stasis_e2e::Containerd;
use stasis_examples::{
    human, median,
    peers::{checkpoint_report, CheckpointReport, Podman},
    print_table, start_memory_pod, timed,
};

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

fn ratio(a: Duration, b: Option<Duration>) -> String {
    match b {
        Some(b) => format!("{:.2}x", a.as_secs_f64() / b.as_secs_f64()),
        None => "-".into(),
    }
}

/// One `pod checkpoint --leave-running -o OUT --format json`: how long it took and what it
/// says of itself.
fn checkpoint(c: &Containerd, pod: &str, out: &Path) -> Result<(Duration, CheckpointReport)> {
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
    // Where the packaging time goes (stasisctl's debug log of the archive write).
    for line in String::from_utf8_lossy(&o.stderr).lines() {
        if line.contains("write_ms") {
            eprintln!("  {}: {line}", out.display());
        }
    }
    Ok((wall, checkpoint_report(&o)?))
}

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("bench_archive [--memory 0,256,1024] [--runs N]: pod checkpoint to a file vs to a directory vs Podman's --export, with stasisctl's bytes moved per archive byte");
        return Ok(());
    }
    let flag = |name: &str| stasis_examples::flag(&args, name);
    let memories = stasis_examples::numbers(&args, "--memory", "0,256,1024")?;
    let runs: usize = flag("--runs").map(|r| r.parse()).transpose()?.unwrap_or(3);
    let c = Containerd::start("bench-archive")?;
    let busybox = c.import_busybox_for_cri()?;
    let podman = Podman::new(&c.dir)?;
    let mut rows = vec![vec![
        "pod memory".to_string(),
        "ckpt to dir".into(),
        "ckpt to file".into(),
        "file / dir (<=1.15)".into(),
        "podman --export".into(),
        "file / podman (<=1.0)".into(),
        "podman + fsync".into(),
        "file / (podman + fsync)".into(),
        "frozen (file)".into(),
        "packaging (dir / file)".into(),
        "archive".into(),
        "stasisctl read+written / archive".into(),
    ]];
    for &mib in &memories {
        let name = format!("a{mib}");
        // stasis's pod first, alone, then Podman's container alone: neither's memory, page
        // cache or writeback is there while the other is measured.
        let pod = start_memory_pod(&c, &name, busybox, mib).await?;
        let (mut dir, mut file, mut pm, mut pm_synced) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut frozen, mut bytes, mut moved) = (Vec::new(), 0, 0);
        let (mut pack_dir, mut pack_file) = (Vec::new(), Vec::new());
        for run in 0..runs {
            // Alternating which goes first: neither always meets the other's page cache.
            let d = c.dir.join(format!("{name}-{run}-dir/"));
            let f = c.dir.join(format!("{name}-{run}.tar"));
            let order: [&Path; 2] = if run % 2 == 0 { [&d, &f] } else { [&f, &d] };
            for out in order {
                let (wall, r) = checkpoint(&c, &pod, out)?;
                if out == f.as_path() {
                    file.push(wall);
                    pack_file.push(Duration::from_secs_f64(r.packaging_ms / 1000.0));
                    frozen.push(Duration::from_secs_f64(r.frozen_ms / 1000.0));
                    (bytes, moved) = (r.bytes, r.moved);
                } else {
                    dir.push(wall);
                    pack_dir.push(Duration::from_secs_f64(r.packaging_ms / 1000.0));
                }
            }
            std::fs::remove_file(&f)?;
            std::fs::remove_dir_all(&d)?;
        }
        c.cri().await?.stop_and_remove_pod(&pod).await?;
        if let Some(p) = &podman {
            p.start(&name, mib)?;
            for run in 0..runs {
                let export = c.dir.join(format!("{name}-{run}.podman.tar"));
                let (t, sync) = p.checkpoint(&name, &export)?;
                pm.push(t);
                pm_synced.push(t + sync);
            }
            p.run(&["rm", "-f", "-t", "0", &name])?;
        }
        let (d, f) = (median(&mut dir), median(&mut file));
        let p = (!pm.is_empty()).then(|| median(&mut pm));
        let ps = (!pm_synced.is_empty()).then(|| median(&mut pm_synced));
        rows.push(vec![
            format!("{mib} MiB"),
            ms(d),
            ms(f),
            ratio(f, Some(d)),
            p.map(ms).unwrap_or_else(|| "-".into()),
            ratio(f, p),
            ps.map(ms).unwrap_or_else(|| "-".into()),
            ratio(f, ps),
            ms(median(&mut frozen)),
            format!(
                "{} / {}",
                ms(median(&mut pack_dir)),
                ms(median(&mut pack_file))
            ),
            human(bytes),
            format!("{:.2}", moved as f64 / bytes.max(1) as f64),
        ]);
    }
    print_table(&rows);
    if let Some(p) = &podman {
        p.reset();
    }
    c.finish()
}
