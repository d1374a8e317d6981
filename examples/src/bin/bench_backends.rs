//! Benchmark: the plug-in comparison. The same pod workloads through CRI runtime handlers
//! `stasis` (runc + CRIU), `stasis-gvisor` (runsc) and containerd's own `runc`, on a private
//! containerd, printed by `stasisctl bench` as one table with ratios against the first
//! handler.
//!
//!     sudo scripts/bench.sh backends [--containers 1,4] [--runs 3] [--format json]
//!         [--handler stasis --handler stasis-gvisor …]

use anyhow::{ensure, Result};
use stasis_e2e::Containerd;

fn main() -> Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("bench_backends [stasisctl bench flags]: compare runtime handlers on a private containerd (default: --handler stasis --handler stasis-gvisor --handler runc --containers 1,4)");
        return Ok(());
    }
    if !args.iter().any(|a| a == "--handler") {
        for h in ["stasis", "stasis-gvisor", "runc"] {
            args.extend(["--handler".to_string(), h.to_string()]);
        }
    }
    let c = Containerd::start("bench-backends")?;
    let image = c.import_busybox_for_cri()?;
    let work = c.dir.join("bench");
    let mut cmd = c.stasisctl_command()?;
    cmd.arg("bench")
        .args(["--image", image])
        .arg("--work-dir")
        .arg(&work)
        .args(&args);
    let status = cmd.status()?;
    ensure!(status.success(), "stasisctl bench failed");
    Ok(())
}
