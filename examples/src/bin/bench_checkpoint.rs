//! Benchmark: live checkpoint and restore of one container through containerd's
//! `io.containerd.runc.v2` and through `io.containerd.stasis.v2`, in one run, plus stasis's
//! frozen window next to a plain `runc checkpoint --leave-running` of the same container.
//!
//!     sudo scripts/bench.sh checkpoint [--runs N] [--sizes 0,256,1024]

use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use containerd_shim_protos::{api, protobuf::Message, shim::oci::CheckpointOptions, ttrpc};
use stasis_e2e::{Containerd, RUNC_RUNTIME, STASIS_RUNTIME};
use stasis_examples::{median, print_table};

fn workload(mib: u64) -> String {
    if mib == 0 {
        "i=0; while true; do i=$((i+1)); echo $i > /count; sleep 0.01; done".to_string()
    } else {
        stasis_controller::workload::memory_hog(mib)
    }
}

fn start(c: &Containerd, runtime: &str, image: &str, id: &str, mib: u64) -> Result<()> {
    let probe = if mib == 0 { "/count" } else { "/ready" };
    stasis_examples::ctr_start(c, runtime, image, id, &workload(mib), probe)
}

fn remove(c: &Containerd, id: &str) {
    stasis_examples::ctr_remove(c, id)
}

fn timed(f: impl FnOnce() -> Result<()>) -> Result<Duration> {
    let t = Instant::now();
    f()?;
    Ok(t.elapsed())
}

/// stasis's own freeze → dump → thaw, asked of the shim directly (containerd's client would
/// pause the task itself first); returns the frozen window the shim recorded.
fn stasis_frozen_window(c: &Containerd, id: &str, dir: &Path) -> Result<f64> {
    let client = stasis_e2e::shim_task_client(c, id)?;
    let opts = CheckpointOptions {
        image_path: dir.join("images").display().to_string(),
        work_path: dir.join("work").display().to_string(),
        ..Default::default()
    };
    let req = api::CheckpointTaskRequest {
        id: id.to_string(),
        path: opts.image_path.clone(),
        options: protobuf::MessageField::some(protobuf::well_known_types::any::Any {
            type_url: "containerd.runc.v1.CheckpointOptions".into(),
            value: opts.write_to_bytes()?,
            ..Default::default()
        }),
        ..Default::default()
    };
    client.checkpoint(ttrpc::context::with_timeout(600_000_000_000), &req)?;
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("images/stasis-dump.json"))?)?;
    let size: u64 = std::fs::read_dir(dir.join("images"))?
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum();
    eprintln!("  stasis {id}: {record} images {} MiB", size >> 20);
    let _ = std::fs::remove_dir_all(dir);
    record["frozen_ms"].as_f64().context("frozen_ms")
}

/// A plain `runc checkpoint --leave-running` of the same (stasis-run) container.
fn plain_runc_dump(c: &Containerd, id: &str, dir: &Path) -> Result<Duration> {
    let root = Path::new("/run/stasis/runc").join(&c.namespace);
    let took = timed(|| {
        let out = Command::new("runc")
            .arg("--root")
            .arg(&root)
            .args(["checkpoint", "--leave-running", "--image-path"])
            .arg(dir.join("images"))
            .arg("--work-path")
            .arg(dir.join("work"))
            .arg(id)
            .output()?;
        if !out.status.success() {
            bail!("runc checkpoint: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    })?;
    let _ = std::fs::remove_dir_all(dir);
    Ok(took)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("bench_checkpoint [--runs N] [--sizes MiB,MiB,...]: live checkpoint/restore latency runc-v2 vs stasis, and stasis's frozen window vs a plain runc dump");
        return Ok(());
    }
    let flag = |name: &str| stasis_examples::flag(&args, name);
    let runs: usize = flag("--runs").map(|v| v.parse()).transpose()?.unwrap_or(5);
    let sizes: Vec<u64> = flag("--sizes")
        .unwrap_or_else(|| "0,256,1024".into())
        .split(',')
        .map(|s| s.parse())
        .collect::<Result<_, _>>()?;
    let c = Containerd::start("bench-checkpoint")?;
    let image = c.import_busybox()?;
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let mut rows = vec![vec![
        "workload".to_string(),
        "ckpt runc-v2".into(),
        "ckpt stasis".into(),
        "ratio (<=1.0)".into(),
        "restore runc-v2".into(),
        "restore stasis".into(),
        "ratio".into(),
        "stasis frozen".into(),
        "plain runc dump".into(),
        "ratio (<=1.1)".into(),
    ]];
    for mib in sizes {
        let reps = runs.max(1);
        let mut ckpt = [Vec::new(), Vec::new()];
        let mut restore = [Vec::new(), Vec::new()];
        let runtimes = [RUNC_RUNTIME, STASIS_RUNTIME];
        for r in 0..reps {
            // Alternating which goes first, each starting with the disk's writeback of the
            // other's checkpoint done: neither always meets the other's (containerd writes a
            // checkpoint into its content store and syncs it).
            let order = if r % 2 == 0 { [0, 1] } else { [1, 0] };
            for k in order {
                let rt = runtimes[k];
                let id = format!("b{k}-{mib}-{r}");
                start(&c, rt, image, &id, mib)?;
                let ck = format!("ck-{id}");
                Command::new("sync").status()?;
                ckpt[k].push(timed(|| {
                    c.ctr_ok(&["containers", "checkpoint", "--task", "--rw", &id, &ck])
                        .map(drop)
                })?);
                remove(&c, &id);
                let restored = format!("r-{id}");
                restore[k].push(timed(|| {
                    c.ctr_ok(&["containers", "restore", "--live", "--rw", &restored, &ck])
                        .map(drop)
                })?);
                remove(&c, &restored);
                let _ = c.ctr(&["images", "rm", "--sync", &ck]);
                eprintln!(
                    "{rt} {mib} MiB run {r}: checkpoint {:?}, restore {:?}",
                    ckpt[k].last().unwrap(),
                    restore[k].last().unwrap()
                );
            }
        }
        // Frozen window vs plain dump, alternating on one stasis container.
        let id = format!("fw-{mib}");
        start(&c, STASIS_RUNTIME, image, &id, mib)?;
        let mut frozen = Vec::new();
        let mut plain = Vec::new();
        for r in 0..reps {
            plain.push(plain_runc_dump(&c, &id, &c.dir.join(format!("plain-{r}")))?);
            frozen.push(Duration::from_secs_f64(
                stasis_frozen_window(&c, &id, &c.dir.join(format!("fw-{r}")))? / 1000.0,
            ));
        }
        remove(&c, &id);
        let (cr, cs) = (median(&mut ckpt[0]), median(&mut ckpt[1]));
        let (rr, rs) = (median(&mut restore[0]), median(&mut restore[1]));
        let (fz, pl) = (median(&mut frozen), median(&mut plain));
        rows.push(vec![
            if mib == 0 {
                "small counter".into()
            } else {
                format!("{mib} MiB touched")
            },
            format!("{:.0} ms", ms(cr)),
            format!("{:.0} ms", ms(cs)),
            format!("{:.2}x", ms(cs) / ms(cr)),
            format!("{:.0} ms", ms(rr)),
            format!("{:.0} ms", ms(rs)),
            format!("{:.2}x", ms(rs) / ms(rr)),
            format!("{:.0} ms", ms(fz)),
            format!("{:.0} ms", ms(pl)),
            format!("{:.2}x", ms(fz) / ms(pl)),
        ]);
    }
    println!("median of {runs} runs, alternating which runtime goes first; ckpt = `ctr c checkpoint --task --rw`, restore = `ctr c restore --live --rw`");
    print_table(&rows);
    Ok(())
}
