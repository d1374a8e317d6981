//! Pod checkpoint and restore: the shim's Checkpoint service driven by `stasisctl`, real CRI,
//! runc and CRIU.

use std::time::Duration;

use anyhow::{ensure, Result};
use stasis_e2e::{
    cri::{container_config, cri, pod_config, CriClient},
    Containerd,
};

/// The consistency loop: memory counter, file must never be ahead of memory.
fn counter_loop(file: &str) -> String {
    format!(
        "i=0; while true; do v=$(cat {file} 2>/dev/null || echo 0); \
         if [ \"$v\" -gt \"$i\" ]; then echo \"file=$v memory=$i\" >> /violations; fi; \
         i=$((i+1)); echo $i > {file}; sleep 0.01; done"
    )
}

async fn read_counter(cri: &mut CriClient, id: &str, file: &str) -> Result<u64> {
    let mut last = String::new();
    for _ in 0..30 {
        let out = cri.exec_ok(id, &["cat", file]).await?;
        if let Ok(v) = out.trim().parse() {
            return Ok(v);
        }
        last = out;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    anyhow::bail!("counter {file} in {id} unreadable: {last:?}")
}

async fn containers_by_name(
    cri: &mut CriClient,
    pod_id: &str,
) -> Result<Vec<(String, String, i32)>> {
    let list = cri
        .runtime
        .list_containers(cri::ListContainersRequest {
            filter: Some(cri::ContainerFilter {
                pod_sandbox_id: pod_id.to_string(),
                ..Default::default()
            }),
        })
        .await?
        .into_inner()
        .containers;
    Ok(list
        .into_iter()
        .map(|c| {
            (
                c.metadata.map(|m| m.name).unwrap_or_default(),
                c.id,
                c.state,
            )
        })
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_container_pod_checkpoint_and_restore() -> Result<()> {
    let c = Containerd::start("podck-basic")?;
    let image = c.import_busybox_for_cri()?;
    let mut cri = c.cri().await?;
    let pod = pod_config("ck", &c.dir.join("logs"));
    let pod_id = cri.run_pod(&pod).await?;
    let a = cri
        .run_container(
            &pod_id,
            &pod,
            container_config("a", image, &["sh", "-c", &counter_loop("/counter")]),
        )
        .await?;
    let b = cri
        .run_container(
            &pod_id,
            &pod,
            container_config("b", image, &["sh", "-c", &counter_loop("/counter")]),
        )
        .await?;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let before_a = read_counter(&mut cri, &a, "/counter").await?;
    let before_b = read_counter(&mut cri, &b, "/counter").await?;
    let archive = c.dir.join("pod.tar");
    let out = c.stasisctl_ok(&[
        "pod",
        "checkpoint",
        "ck",
        "--leave-running",
        "--output",
        archive.to_str().unwrap(),
    ])?;
    ensure!(
        out.contains("frozen window"),
        "no frozen window in output:\n{out}"
    );
    ensure!(archive.exists(), "no archive");
    let inspect = c.stasisctl_ok(&["inspect", archive.to_str().unwrap(), "--format", "json"])?;
    let summary: serde_json::Value = serde_json::from_str(&inspect)?;
    ensure!(
        summary["containers"].as_array().map(|a| a.len()) == Some(2),
        "inspect: {inspect}"
    );
    // The original keeps running.
    ensure!(cri.container_status(&a).await?.state == cri::ContainerState::ContainerRunning as i32);
    cri.stop_and_remove_pod(&pod_id).await?;

    let new_pod = c
        .stasisctl_ok(&[
            "pod",
            "restore",
            archive.to_str().unwrap(),
            "--name",
            "ck-restored",
        ])?
        .trim()
        .to_string();
    let restored = containers_by_name(&mut cri, &new_pod).await?;
    ensure!(restored.len() == 2, "restored containers: {restored:?}");
    for (name, id, state) in &restored {
        ensure!(
            *state == cri::ContainerState::ContainerRunning as i32,
            "{name} not running"
        );
        let now = read_counter(&mut cri, id, "/counter").await?;
        let before = if name == "a" { before_a } else { before_b };
        ensure!(
            now >= before,
            "{name}: counter {now} < {before}: memory not restored"
        );
        let (_, v, _) = cri.exec(id, &["cat", "/violations"]).await?;
        ensure!(v.trim().is_empty(), "{name}: violations {v}");
    }
    cri.stop_and_remove_pod(&new_pod).await?;
    Ok(())
}
