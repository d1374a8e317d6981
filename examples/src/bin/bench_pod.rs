//! Benchmark: pod checkpoint and restore through stasis (`stasisctl`) for pods of 1, 2, 4 and 8
//! containers, small and with 256 MiB of touched memory each, next to (same run) the sum of
//! per-container live checkpoints of the same workloads through `io.containerd.runc.v2`
//! (`ctr c checkpoint --task --rw`) and a plain parallel `runc checkpoint --leave-running` of
//! the pod's own containers.
//!
//!     sudo scripts/bench.sh pod [--sizes 1,2,4,8] [--memory 0,256]

use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use stasis_e2e::{
    cri::{container_config, pod_config},
    Containerd,
};
use stasis_examples::print_table;

fn workload(mib: u64) -> String {
    if mib == 0 {
        "i=0; while true; do i=$((i+1)); echo $i > /count; sleep 0.01; done; ".to_string()
    } else {
        stasis_controller::workload::memory_hog(mib)
    }
}

fn ready_file(mib: u64) -> &'static str {
    if mib == 0 {
        "/count"
    } else {
        "/ready"
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("bench_pod [--sizes 1,2,4,8] [--memory 0,256]: pod checkpoint/restore vs per-container runc-v2 checkpoints");
        return Ok(());
    }
    let sizes = stasis_examples::numbers(&args, "--sizes", "1,2,4,8")?;
    let memories = stasis_examples::numbers(&args, "--memory", "0,256")?;
    let c = Containerd::start("bench-pod")?;
    let image = c.import_busybox_for_cri()?;
    let plain_image = c.import_busybox()?;
    let mut cri = c.cri().await?;
    let mut rows = vec![vec![
        "pod".to_string(),
        "frozen window".into(),
        "plain parallel dump".into(),
        "frozen / plain (<=1.2)".into(),
        "pod checkpoint".into(),
        "runc-v2 per-container sum".into(),
        "pod / sum (<=0.8)".into(),
        "archive".into(),
        "restore".into(),
    ]];
    let mut totals = Vec::new();
    for &mib in &memories {
        for &n in &sizes {
            let label = format!(
                "{n} x {}",
                if mib == 0 {
                    "small".to_string()
                } else {
                    format!("{mib} MiB")
                }
            );
            // The stasis pod.
            let name = format!("bench-{mib}-{n}");
            let pod = pod_config(&name, &c.dir.join("logs"));
            let pod_id = cri.run_pod(&pod).await?;
            let mut ids = Vec::new();
            for k in 0..n {
                ids.push(
                    cri.run_container(
                        &pod_id,
                        &pod,
                        container_config(&format!("c{k}"), image, &["sh", "-c", &workload(mib)]),
                    )
                    .await?,
                );
            }
            for id in &ids {
                let deadline = Instant::now() + Duration::from_secs(120);
                while cri
                    .exec(id, &["cat", ready_file(mib)])
                    .await
                    .map(|r| r.0 != 0)
                    .unwrap_or(true)
                {
                    if Instant::now() > deadline {
                        bail!("{id} not ready");
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
            // Plain parallel runc dumps of the same containers (baseline for the frozen window).
            let root = Path::new("/run/stasis/runc/k8s.io");
            let t = Instant::now();
            let dumps: Vec<_> = ids
                .iter()
                .map(|id| {
                    let dir = c.dir.join(format!("plain-{id}"));
                    Command::new("runc")
                        .arg("--root")
                        .arg(root)
                        .args(["checkpoint", "--leave-running", "--image-path"])
                        .arg(dir.join("img"))
                        .arg("--work-path")
                        .arg(dir.join("work"))
                        .arg(id)
                        .spawn()
                })
                .collect::<Result<_, _>>()?;
            for mut d in dumps {
                if !d.wait()?.success() {
                    bail!("plain runc checkpoint failed");
                }
            }
            let plain = t.elapsed();
            for id in &ids {
                let _ = std::fs::remove_dir_all(c.dir.join(format!("plain-{id}")));
            }
            let archive = c.dir.join(format!("{name}.tar"));
            let t = Instant::now();
            let out = c.stasisctl_ok(&[
                "pod",
                "checkpoint",
                &pod_id,
                "--leave-running",
                "--output",
                archive.to_str().unwrap(),
            ])?;
            let pod_ckpt = t.elapsed();
            let frozen: f64 = out
                .lines()
                .find_map(|l| l.strip_prefix("frozen window "))
                .and_then(|l| l.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .context("frozen window in stasisctl output")?;
            let size = std::fs::metadata(&archive)?.len();
            cri.stop_and_remove_pod(&pod_id).await?;
            let t = Instant::now();
            let restored = c
                .stasisctl_ok(&["pod", "restore", archive.to_str().unwrap()])?
                .trim()
                .to_string();
            let restore = t.elapsed();
            cri.stop_and_remove_pod(&restored).await?;
            std::fs::remove_file(&archive)?;

            // The same containers through containerd's runc shim, checkpointed one by one.
            let sum =
                stasis_examples::peers::runc_v2_checkpoint_sum(&c, plain_image, n as usize, mib)?;
            eprintln!(
                "{label}: frozen {frozen:.0} ms, plain {:.0} ms, pod {:.0} ms, sum {:.0} ms",
                ms(plain),
                ms(pod_ckpt),
                ms(sum)
            );
            totals.push((mib, n, pod_ckpt));
            rows.push(vec![
                label,
                format!("{frozen:.0} ms"),
                format!("{:.0} ms", ms(plain)),
                format!("{:.2}x", frozen / ms(plain)),
                format!("{:.0} ms", ms(pod_ckpt)),
                format!("{:.0} ms", ms(sum)),
                format!("{:.2}x", ms(pod_ckpt) / ms(sum)),
                stasis_examples::human(size),
                format!("{:.0} ms", ms(restore)),
            ]);
        }
    }
    print_table(&rows);
    for &mib in &memories {
        let one = totals.iter().find(|t| t.0 == mib && t.1 == 1).map(|t| t.2);
        let eight = totals.iter().find(|t| t.0 == mib && t.1 == 8).map(|t| t.2);
        if let (Some(one), Some(eight)) = (one, eight) {
            println!(
                "{}: 8-container pod checkpoint / 1-container = {:.2}x (target <= 4x)",
                if mib == 0 {
                    "small".to_string()
                } else {
                    format!("{mib} MiB")
                },
                ms(eight) / ms(one)
            );
        }
    }
    Ok(())
}
