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
    let _alone = ONE_AT_A_TIME.lock().await;
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

/// The containerd tests of this file run one at a time: the store probe looks only while
/// its test is the only one alive.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Leaks planted on purpose, each of a kind the product could leave: `finish` must fail
/// naming it. A restore's options file left in the restore store; a stasisctl helper still
/// running against this containerd; a cgroup of a pod the test had removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finish_fails_on_each_planted_leak() -> Result<()> {
    let _alone = ONE_AT_A_TIME.lock().await;
    let store = Path::new(stasis_api::layout::RESTORE_STORE);

    let c = Containerd::start("leak-planted-store")?;
    std::fs::create_dir_all(store)?;
    let planted = store.join(format!("{:032x}.options", std::process::id() as u128 * 31));
    std::fs::write(&planted, br#"{"lazy":false,"page_source":null}"#)?;
    let err = format!(
        "{:#}",
        c.finish().expect_err("a planted store entry passed")
    );
    let _ = std::fs::remove_file(&planted);
    ensure!(
        err.contains(&planted.display().to_string()),
        "finish does not name the planted store entry: {err}"
    );

    let c = Containerd::start("leak-planted-helper")?;
    // The restore watchdog, started by hand: it waits on its pipe for ever.
    let mut helper = c
        .stasisctl_command()?
        .arg("__restore-guard")
        .stdin(std::process::Stdio::piped())
        .spawn()?;
    let stdin = helper.stdin.take();
    let outcome = c.finish();
    drop(stdin);
    let _ = helper.kill();
    let _ = helper.wait();
    let err = format!(
        "{:#}",
        outcome.expect_err("a running stasisctl helper passed")
    );
    ensure!(
        err.contains("__restore-guard"),
        "finish does not name the stasisctl helper: {err}"
    );

    let c = Containerd::start("leak-planted-cgroup")?;
    let image = c.import_busybox_for_cri()?;
    let mut cri = c.cri().await?;
    let pod = pod_config("gone", &c.dir.join("logs"));
    let pod_id = cri.run_pod(&pod).await?;
    cri.run_container(
        &pod_id,
        &pod,
        container_config("app", image, &["sleep", "1000"]),
    )
    .await?;
    cri.stop_and_remove_pod(&pod_id).await?;
    let cgroup = Path::new("/sys/fs/cgroup/freezer/stasis").join(&pod_id);
    std::fs::create_dir(&cgroup)?;
    let outcome = c.finish();
    let _ = std::fs::remove_dir(&cgroup);
    let err = format!("{:#}", outcome.expect_err("a removed pod's cgroup passed"));
    ensure!(
        err.contains("what the test itself removed") && err.contains(&pod_id),
        "finish does not name the removed pod's cgroup: {err}"
    );
    Ok(())
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
        // Helpers that start containerds and hand them back (`fn two_nodes(…) -> Result<(
        // Containerd, Containerd, …)>`): a call to one counts as that many starts.
        let helpers: Vec<(String, usize)> = text
            .lines()
            .filter(|l| l.starts_with("fn ") || l.starts_with("async fn "))
            .filter_map(|l| {
                let (head, ret) = l.split_once("->")?;
                let n = ret.matches("Containerd").count();
                let name = head
                    .split("fn ")
                    .nth(1)?
                    .split('(')
                    .next()?
                    .trim()
                    .to_string();
                (n > 0).then_some((name, n))
            })
            .collect();
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
                    if helpers
                        .iter()
                        .any(|(h, _)| name.contains(&format!("fn {h}(")))
                        || name.contains("fn every_test_ends_with_the_leak_check(")
                    {
                        continue;
                    }
                    // A pair is two containerds, each to be finished.
                    let started = body.matches("Containerd::start(").count()
                        + body.matches("Containerd::start_with_cri_settings(").count()
                        + 2 * body.matches("Containerd::start_pair(").count()
                        + helpers
                            .iter()
                            .map(|(h, n)| n * calls(&body, h))
                            .sum::<usize>();
                    if started > 0 {
                        seen += 1;
                        let finished = body.matches(".finish()").count();
                        if finished < started {
                            missing.push(format!(
                                "{}: {name} ({started} started, {finished} finished)",
                                e.path().display()
                            ));
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

/// Calls of function `name` in `text` (not names that merely end in it).
fn calls(text: &str, name: &str) -> usize {
    text.match_indices(&format!("{name}("))
        .filter(|(i, _)| {
            !text[..*i]
                .chars()
                .next_back()
                .is_some_and(|c| c.is_alphanumeric() || c == '_')
        })
        .count()
}
