//! Benchmark: how a pod checkpoint scales, in one run and one table: pods of 1, 4 and 16
//! containers (small, and 64 MiB of touched memory each), one pod or four checkpointed at the
//! same time (live, to uncompressed archive files), then restored at the same time. Peers in
//! the same run: the sum of per-container live checkpoints through containerd's runc-v2
//! (`ctr c checkpoint --task --rw`) and, when installed, Podman's `container checkpoint
//! --export` of the same workloads.
//!
//!     sudo scripts/bench.sh scale [--containers 1,4,16] [--memory 0,64] [--pods 1,4]

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use stasis_e2e::{
    cri::{container_config, pod_config, CriClient},
    Containerd,
};
use stasis_examples::{
    human, median,
    peers::{checkpoint_report, runc_v2_checkpoint_sum, Podman},
    print_table,
};

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

/// A stasis pod `name` of `n` containers running the memory workload, every one ready.
async fn start_pod(
    c: &Containerd,
    cri: &mut CriClient,
    name: &str,
    image: &str,
    n: u64,
    mib: u64,
) -> Result<String> {
    let pod = pod_config(name, &c.dir.join("logs"));
    let pod_id = cri.run_pod(&pod).await?;
    let workload = stasis_examples::memory_workload(mib);
    let mut ids = Vec::new();
    for k in 0..n {
        let cfg = container_config(&format!("c{k}"), image, &["sh", "-c", &workload]);
        ids.push(cri.run_container(&pod_id, &pod, cfg).await?);
    }
    for id in &ids {
        stasis_e2e::cri::wait_ready(cri, id, "/ready", Duration::from_secs(300)).await?;
    }
    Ok(pod_id)
}

/// `stasisctl ARGS…` for every element of `each` at the same time; how long until the last
/// one ended, and their outputs.
fn at_once(
    c: &Containerd,
    each: &[Vec<String>],
    log: bool,
) -> Result<(Duration, Vec<std::process::Output>)> {
    let t = Instant::now();
    let children = each
        .iter()
        .map(|args| {
            let mut cmd = c.stasisctl_command()?;
            if log {
                cmd.env("STASIS_LOG", "debug");
            }
            cmd.args(args)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped());
            Ok(cmd.spawn()?)
        })
        .collect::<Result<Vec<_>>>()?;
    let outs = children
        .into_iter()
        .map(|ch| ch.wait_with_output())
        .collect::<std::io::Result<Vec<_>>>()?;
    Ok((t.elapsed(), outs))
}

/// One row: `pods` pods of `n` containers checkpointed at once, then restored at once.
struct Row {
    frozen: Duration,
    checkpoint: Duration,
    written: u64,
    archive: u64,
    restore: Duration,
}

async fn measure(
    c: &Containerd,
    cri: &mut CriClient,
    image: &str,
    (n, mib, pods): (u64, u64, u64),
) -> Result<Row> {
    let mut ids = Vec::new();
    for p in 0..pods {
        ids.push(start_pod(c, cri, &format!("s{mib}-{n}-{p}"), image, n, mib).await?);
    }
    let archives: Vec<_> = (0..pods)
        .map(|p| c.dir.join(format!("s{mib}-{n}-{p}.tar")))
        .collect();
    let args: Vec<Vec<String>> = ids
        .iter()
        .zip(&archives)
        .map(|(id, a)| {
            [
                "pod",
                "checkpoint",
                id,
                "--leave-running",
                "--format",
                "json",
                "-o",
            ]
            .iter()
            .map(|s| s.to_string())
            .chain([a.display().to_string()])
            .collect()
        })
        .collect();
    let (checkpoint, outs) = at_once(c, &args, true)?;
    let reports = outs
        .iter()
        .map(checkpoint_report)
        .collect::<Result<Vec<_>>>()?;
    let mut frozen: Vec<Duration> = reports
        .iter()
        .map(|r| Duration::from_secs_f64(r.frozen_ms / 1000.0))
        .collect();
    for id in &ids {
        cri.stop_and_remove_pod(id).await?;
    }
    stasis_examples::drop_caches();
    let args: Vec<Vec<String>> = archives
        .iter()
        .map(|a| vec!["pod".into(), "restore".into(), a.display().to_string()])
        .collect();
    let (restore, outs) = at_once(c, &args, false)?;
    for (o, a) in outs.iter().zip(&archives) {
        let id = String::from_utf8_lossy(&o.stdout).trim().to_string();
        anyhow::ensure!(
            o.status.success(),
            "restore {}: {}",
            a.display(),
            String::from_utf8_lossy(&o.stderr)
        );
        cri.stop_and_remove_pod(&id).await?;
        std::fs::remove_file(a)?;
    }
    Ok(Row {
        frozen: median(&mut frozen),
        checkpoint,
        written: reports.iter().map(|r| r.written).sum(),
        archive: reports.iter().map(|r| r.bytes).sum(),
        restore,
    })
}

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("bench_scale [--containers 1,4,16] [--memory 0,64] [--pods 1,4]: pod checkpoint and restore at scale vs runc-v2 and Podman per-container checkpoints");
        return Ok(());
    }
    let sizes = stasis_examples::numbers(&args, "--containers", "1,4,16")?;
    let memories = stasis_examples::numbers(&args, "--memory", "0,64")?;
    let pod_counts = stasis_examples::numbers(&args, "--pods", "1,4")?;
    let c = Containerd::start("bench-scale")?;
    let image = c.import_busybox_for_cri()?;
    let plain_image = c.import_busybox()?;
    let podman = Podman::new(&c.dir)?;
    let mut cri = c.cri().await?;
    let mut rows = vec![vec![
        "containers".to_string(),
        "pods at once".into(),
        "frozen (median pod)".into(),
        "checkpoint (all)".into(),
        "per container".into(),
        "stasisctl wrote".into(),
        "archives".into(),
        "restore (all)".into(),
        "runc-v2 sum".into(),
        "frozen / runc-v2 sum (<=0.5 at 16)".into(),
        "podman sum".into(),
    ]];
    for &mib in &memories {
        for &n in &sizes {
            let shape = format!(
                "{n} x {}",
                if mib == 0 {
                    "small".to_string()
                } else {
                    format!("{mib} MiB")
                }
            );
            let runc = runc_v2_checkpoint_sum(&c, plain_image, n as usize, mib)?;
            let podman_sum = match &podman {
                Some(p) => {
                    let mut sum = Duration::ZERO;
                    for k in 0..n {
                        let name = format!("p{mib}-{n}-{k}");
                        p.start(&name, mib)?;
                        sum += p.checkpoint(&name, &c.dir.join(format!("{name}.tar")))?.0;
                        p.run(&["rm", "-f", "-t", "0", &name])?;
                    }
                    ms(sum)
                }
                None => "-".into(),
            };
            for &pods in &pod_counts {
                let r = measure(&c, &mut cri, image, (n, mib, pods))
                    .await
                    .with_context(|| format!("{shape}, {pods} pod(s)"))?;
                // The peers checkpoint one pod's containers; with more pods at once, as many
                // times that.
                let runc_all = runc * pods as u32;
                rows.push(vec![
                    shape.clone(),
                    pods.to_string(),
                    ms(r.frozen),
                    ms(r.checkpoint),
                    ms(r.checkpoint / (n * pods) as u32),
                    human(r.written),
                    human(r.archive),
                    ms(r.restore),
                    ms(runc_all),
                    format!("{:.2}x", r.frozen.as_secs_f64() / runc.as_secs_f64()),
                    if pods == 1 {
                        podman_sum.clone()
                    } else {
                        "-".into()
                    },
                ]);
                eprintln!("{:?}", rows.last().unwrap());
            }
        }
    }
    print_table(&rows);
    println!("runc-v2 sum: one pod's containers checkpointed one by one, times the pods at once; the frozen ratio compares one pod's window with one pod's sum");
    if let Some(p) = &podman {
        p.reset();
    }
    c.finish()
}
