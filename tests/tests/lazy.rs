//! Lazy local restore: containers run before their memory is in; CRIU's lazy-pages daemon
//! serves pages over userfaultfd and pulls the rest in the background.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use stasis_e2e::{
    cri::{
        checksum_hog, container_config, containers_by_name, counter_loop, memory_sum, pod_config,
        read_counter, violations, wait_counter_above, wait_counter_moving, wait_ready,
    },
    Containerd,
};

/// A pod with 512 MiB of random memory and a counter, checkpointed live and restored with
/// `--lazy`: the memory's own checksum is the same, the counter continues, the lazy-pages
/// daemon did serve the restore, and nothing of it is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lazy_restore_brings_every_page_back() -> Result<()> {
    let c = Containerd::start("lazy")?;
    let image = c.import_busybox_for_cri()?;
    let mut cri = c.cri().await?;
    let pod = pod_config("lazy", &c.dir.join("logs"));
    let pod_id = cri.run_pod(&pod).await?;
    let hog = cri
        .run_container(
            &pod_id,
            &pod,
            container_config("hog", image, &["sh", "-c", &checksum_hog(512)]),
        )
        .await?;
    let counter = cri
        .run_container(
            &pod_id,
            &pod,
            container_config("counter", image, &["sh", "-c", &counter_loop("/counter")]),
        )
        .await?;
    wait_ready(&mut cri, &hog, "/ready", Duration::from_secs(120)).await?;
    wait_counter_moving(&mut cri, &counter, "/counter").await?;
    let before = memory_sum(&mut cri, &hog).await?;
    let archive = c.dir.join("lazy.tar");
    c.stasisctl_ok(&[
        "pod",
        "checkpoint",
        "lazy",
        "--leave-running",
        "--output",
        archive.to_str().unwrap(),
    ])?;
    let counted = read_counter(&mut cri, &counter, "/counter").await?;
    cri.stop_and_remove_pod(&pod_id).await?;

    let out = c.stasisctl(&["pod", "restore", archive.to_str().unwrap(), "--lazy"])?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.success(), "lazy restore failed: {err}");
    eprintln!("{err}");
    ensure!(
        err.contains("every page in after"),
        "the restore reports no time to the last page: {err}"
    );
    let new_pod = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let restored = containers_by_name(&mut cri, &new_pod).await?;
    let id_of = |name: &str| {
        restored
            .iter()
            .find(|(n, _, _)| n == name)
            .map(|(_, id, _)| id.clone())
            .with_context(|| format!("no {name} in {restored:?}"))
    };
    let (hog, counter) = (id_of("hog")?, id_of("counter")?);
    // The restore was served by a lazy-pages daemon (its log is in the restore work dir).
    let log = c
        .dir
        .join("state/io.containerd.runtime.v2.task/k8s.io")
        .join(&hog)
        .join("criu-restore-work/lazy-pages.log");
    let text = std::fs::read_to_string(&log)
        .with_context(|| format!("no lazy-pages log at {}", log.display()))?;
    ensure!(!text.is_empty(), "the lazy-pages log is empty");
    let after = memory_sum(&mut cri, &hog).await?;
    ensure!(after == before, "memory changed: md5 {before} -> {after}");
    let now = read_counter(&mut cri, &counter, "/counter").await?;
    ensure!(now >= counted.min(1), "the counter restarted: {now}");
    wait_counter_above(&mut cri, &counter, "/counter", now).await?;
    let v = violations(&mut cri, &counter).await?;
    ensure!(v.is_empty(), "{v}");
    ensure!(
        !stasis_e2e::processes_matching(&["criu", "lazy-pages"])
            .iter()
            .any(|p| std::fs::read_to_string(format!("/proc/{p}/cmdline"))
                .map(|c| c.contains(&new_pod) || c.contains(&hog))
                .unwrap_or(false)),
        "a lazy-pages daemon is left"
    );
    cri.stop_and_remove_pod(&new_pod).await?;
    c.finish()
}
