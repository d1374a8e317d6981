//! The harness's leak check (`Containerd::finish`, probes in `tests/src/leaks.rs`) must be
//! able to fail: each probe is first shown to see a live pod and a live container, then to see
//! nothing once they were removed. And every test that starts a containerd ends with it.

use std::{collections::BTreeSet, path::Path, time::Duration};

use anyhow::{ensure, Result};
use stasis_e2e::{
    cri::{container_config, pod_config},
    leaks, Containerd, STASIS_RUNTIME,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_probe_sees_a_live_pod_then_nothing() -> Result<()> {
    let c = Containerd::start("leak-probes")?;
    let cri_image = c.import_busybox_for_cri()?;
    let image = c.import_busybox()?;
    let mut cri = c.cri().await?;
    let pod = pod_config("probe", &c.dir.join("logs"));
    let pod_id = cri.run_pod(&pod).await?;
    let cid = cri
        .run_container(
            &pod_id,
            &pod,
            container_config("app", cri_image, &["sleep", "1000"]),
        )
        .await?;
    c.ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        STASIS_RUNTIME,
        image,
        "task1",
        "sleep",
        "1000",
    ])?;

    let ids = c.ids_seen();
    for id in [&pod_id, &cid, &"task1".to_string()] {
        ensure!(ids.contains(id), "the log does not name {id}: {ids:?}");
    }
    let left = c.leftovers();
    let has = |prefix: &str| left.iter().any(|l| l.starts_with(prefix));
    let report = left.join("\n");
    ensure!(
        has("process ") && left.iter().any(|l| l.contains(" pause")),
        "no shim/pause process seen:\n{report}"
    );
    ensure!(
        left.iter()
            .any(|l| l.starts_with("process ") && l.contains("sleep 1000")),
        "no container process seen:\n{report}"
    );
    ensure!(has("mount "), "no rootfs or shm mount seen:\n{report}");
    for hierarchy in ["freezer", "memory", "unified"] {
        let root = format!("cgroup /sys/fs/cgroup/{hierarchy}/");
        if Path::new("/sys/fs/cgroup").join(hierarchy).exists() {
            ensure!(
                left.iter()
                    .any(|l| l.starts_with(&root) && l.contains(&pod_id)),
                "no pod cgroup seen in {hierarchy}:\n{report}"
            );
        }
    }
    ensure!(
        left.iter()
            .any(|l| l.starts_with("cgroup ") && l.ends_with("/task1")),
        "no container cgroup of the ctr task seen:\n{report}"
    );
    ensure!(
        left.iter()
            .any(|l| l.starts_with("shim socket") && l.contains(&pod_id)),
        "no pod shim socket seen:\n{report}"
    );
    ensure!(
        left.iter()
            .any(|l| l.starts_with("shim socket") && l.contains("task1")),
        "no task shim socket seen:\n{report}"
    );
    ensure!(
        left.iter()
            .any(|l| l.starts_with("runc state of ") && l.contains(&cid)),
        "no runc state seen:\n{report}"
    );

    cri.stop_and_remove_pod(&pod_id).await?;
    c.ctr_ok(&["tasks", "kill", "-s", "KILL", "task1"])?;
    c.wait_for("task1 stopped", Duration::from_secs(10), || {
        Ok(c.task_status("task1")?.as_deref() != Some("RUNNING"))
    })?;
    c.ctr_ok(&["tasks", "delete", "task1"])?;
    c.ctr_ok(&["containers", "delete", "task1"])?;
    c.finish()
}

#[test]
fn the_log_scan_finds_shim_and_cri_ids() {
    let log = concat!(
        "time=\"x\" level=info msg=\"pod 3f2a: created (name \\\"web\\\")\" runtime=io.containerd.stasis.v2\n",
        "time=\"x\" level=info msg=\"c9: created, pid 41\"\n",
        "time=\"x\" level=info msg=\"RunPodSandbox for &PodSandboxMetadata{Name:a,} returns sandbox id \\\"77aa\\\"\"\n",
        "time=\"x\" level=info msg=\"CreateContainer within sandbox \\\"77aa\\\" returns container id \\\"88bb\\\"\"\n",
        "time=\"x\" level=info msg=\"unrelated: created elsewhere\"\n",
    );
    let ids = leaks::ids_in_log(log);
    let want: BTreeSet<String> = ["3f2a", "c9", "77aa", "88bb"]
        .into_iter()
        .map(String::from)
        .collect();
    assert_eq!(ids, want);
}

/// Every test function that starts a containerd ends with `finish()`, so no test can leak
/// without failing.
#[test]
fn every_test_ends_with_the_leak_check() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests");
    let mut missing = Vec::new();
    let mut seen = 0;
    for e in std::fs::read_dir(&dir).unwrap().flatten() {
        let text = std::fs::read_to_string(e.path()).unwrap();
        let mut current: Option<(String, String)> = None;
        for line in text.lines() {
            let trimmed = line.trim_start();
            if line == trimmed && (line.starts_with("fn ") || line.starts_with("async fn ")) {
                current = Some((line.to_string(), String::new()));
            }
            if let Some((_, body)) = current.as_mut() {
                body.push_str(line);
                body.push('\n');
            }
            if line == "}" {
                if let Some((name, body)) = current.take() {
                    if body.contains("Containerd::start(") {
                        seen += 1;
                        if !body.contains(".finish()") {
                            missing.push(format!("{}: {name}", e.path().display()));
                        }
                    }
                }
            }
        }
    }
    assert!(
        seen > 20,
        "only {seen} tests start a containerd: is the scan reading them?"
    );
    assert!(
        missing.is_empty(),
        "tests without the leak check:\n{}",
        missing.join("\n")
    );
}
