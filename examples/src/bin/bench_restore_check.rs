//! Benchmark: what checking a container's CRIU images against its spec (before CRIU reads
//! them, `shim/src/runtime/images.rs`) costs against the eager restore it guards, in one run:
//! a pod with the runtime's default seccomp profile and no_new_privs (the costliest check:
//! its filter is run for every system call) and 0 or 256 MiB of touched memory is
//! checkpointed to a directory; the check runs in this process on that directory (release
//! build, as the shim runs it) and `stasisctl pod restore` restores from it.
//!
//!     sudo scripts/bench.sh restore_check [--memory 0,256] [--runs N]

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use stasis_e2e::{
    cri::{container_config, cri, pod_config},
    Containerd,
};
use stasis_examples::{median, memory_workload, print_table, timed};

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

/// A pod `name` whose one container runs [`memory_workload`] under the default seccomp
/// profile with no_new_privs; returns the pod id once the workload is ready.
async fn start_pod(c: &Containerd, name: &str, image: &str, mib: u64) -> Result<String> {
    let mut client = c.cri().await?;
    let pod = pod_config(name, &c.dir.join("logs"));
    let pod_id = client.run_pod(&pod).await?;
    let mut cfg = container_config("app", image, &["sh", "-c", &memory_workload(mib)]);
    let sc = cfg
        .linux
        .as_mut()
        .and_then(|l| l.security_context.as_mut())
        .context("security context")?;
    sc.no_new_privs = true;
    sc.seccomp = Some(cri::SecurityProfile {
        profile_type: cri::security_profile::ProfileType::RuntimeDefault as i32,
        ..Default::default()
    });
    let id = client.run_container(&pod_id, &pod, cfg).await?;
    stasis_e2e::cri::wait_ready(&mut client, &id, "/ready", Duration::from_secs(300)).await?;
    Ok(pod_id)
}

/// Runs the shim's image check on every container directory of the checkpoint `dir`.
fn check_all(dir: &std::path::Path) -> Result<usize> {
    let mut checked = 0;
    for e in std::fs::read_dir(dir)? {
        let d = e?.path();
        let images = d.join("checkpoint");
        if !images.join("inventory.img").exists() {
            continue;
        }
        let spec = stasis_shim::spec::ContainerSpec::parse(
            "bench",
            "spec.dump",
            &std::fs::read(d.join("spec.dump"))?,
        )?;
        let expected = stasis_shim::runtime::images::Expected::of(&spec);
        stasis_shim::runtime::images::check("bench", &images, &expected)?;
        checked += 1;
    }
    ensure!(checked > 0, "no container images in {}", dir.display());
    Ok(checked)
}

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("bench_restore_check [--memory 0,256] [--runs N]: the CRIU image check's cost against an eager pod restore");
        return Ok(());
    }
    let flag = |name: &str| stasis_examples::flag(&args, name);
    let memories: Vec<u64> = flag("--memory")
        .unwrap_or_else(|| "0,256".into())
        .split(',')
        .map(|s| s.parse())
        .collect::<Result<_, _>>()?;
    let runs: usize = flag("--runs").map(|r| r.parse()).transpose()?.unwrap_or(3);
    let c = Containerd::start("bench-restore-check")?;
    let image = c.import_busybox_for_cri()?;
    let mut client = c.cri().await?;
    let mut rows = vec![vec![
        "pod memory".to_string(),
        "eager restore (median)".into(),
        "image check (median)".into(),
        "check / restore (<= 5%)".into(),
    ]];
    for &mib in &memories {
        let name = format!("check-{mib}");
        let pod_id = start_pod(&c, &name, image, mib).await?;
        let dir = c.dir.join(format!("{name}.ckpt"));
        let dir_arg = format!("{}/", dir.display());
        c.stasisctl_ok(&[
            "pod",
            "checkpoint",
            &name,
            "--leave-running",
            "--output",
            &dir_arg,
        ])?;
        client.stop_and_remove_pod(&pod_id).await?;
        let (mut restores, mut checks) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            let (_, t) = timed(|| check_all(&dir))?;
            checks.push(t);
            let (pod, t) = timed(|| c.stasisctl_ok(&["pod", "restore", &dir_arg]))?;
            restores.push(t);
            client.stop_and_remove_pod(pod.trim()).await?;
        }
        let (restore, check) = (median(&mut restores), median(&mut checks));
        rows.push(vec![
            format!("{mib} MiB"),
            ms(restore),
            ms(check),
            format!(
                "{:.2}%",
                100.0 * check.as_secs_f64() / restore.as_secs_f64()
            ),
        ]);
    }
    print_table(&rows);
    c.finish()
}
