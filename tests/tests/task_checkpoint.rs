//! Consistent live checkpoint and restore of single containers through the standard Task API
//! (`ctr`, and CRI's CheckpointContainer), with real CRIU.

use std::{path::Path, time::Duration};

use anyhow::{ensure, Context, Result};
use stasis_e2e::{Containerd, STASIS_RUNTIME};

/// The loop after Podman's regression test (`stasis_e2e::cri::counter_loop`): a counter in
/// memory; on every step the file must not be ahead of memory (else a violation is recorded on
/// the root file system); plus a token that only its memory holds.
use stasis_e2e::cri::counter_loop;

fn exec(c: &Containerd, id: &str, cmd: &[&str]) -> Result<(bool, String)> {
    c.exec_in(id, cmd)
}

fn memory_token(c: &Containerd, id: &str, file: &str) -> Result<String> {
    c.memory_token(id, file)
}

fn read_counter(c: &Containerd, id: &str, file: &str, n: usize) -> Result<u64> {
    // The loop rewrites the file (truncate, then write): retry a read that fell in between.
    let mut last = String::new();
    for attempt in 0..20 {
        let out = c.ctr_ok(&[
            "tasks",
            "exec",
            "--exec-id",
            &format!("read{n}-{attempt}"),
            id,
            "cat",
            file,
        ])?;
        if let Ok(v) = out.trim().parse() {
            return Ok(v);
        }
        last = out;
        std::thread::sleep(Duration::from_millis(20));
    }
    anyhow::bail!("counter {file} in {id} unreadable: {last:?}")
}

/// What the consistency loop logged; a failed exec is an error, never "no violations".
fn violations(c: &Containerd, id: &str) -> Result<String> {
    let (ok, out) = exec(
        c,
        id,
        &[
            "sh",
            "-c",
            "if [ -e /violations ]; then cat /violations; fi",
        ],
    )?;
    ensure!(ok, "{id}: cannot read /violations");
    Ok(out.trim().to_string())
}

fn remove(c: &Containerd, id: &str) -> Result<()> {
    c.remove_task(id)
}

/// Runs the chain: checkpoint live, remove the original, restore into a fresh container, check
/// the counter continued and no violation was recorded; `rounds` times.
fn checkpoint_chain(
    c: &Containerd,
    name: &str,
    extra: &[&str],
    file: &str,
    rounds: usize,
) -> Result<()> {
    let image = c.import_busybox()?;
    let mut cur = format!("{name}0");
    let script = counter_loop(file);
    let mut args = vec!["run", "-d", "--runtime", STASIS_RUNTIME];
    args.extend(extra);
    args.extend([image, cur.as_str(), "sh", "-c", script.as_str()]);
    c.ctr_ok(&args)?;
    wait_for_progress(c, &cur, file)?;
    for round in 0..rounds {
        let token = memory_token(c, &cur, file)?;
        let before = read_counter(c, &cur, file, round)?;
        let ck = format!("{name}-ck{round}");
        c.ctr_ok(&["containers", "checkpoint", "--task", "--rw", &cur, &ck])
            .with_context(|| format!("round {round}: checkpoint"))?;
        ensure!(
            c.task_status(&cur)?.as_deref() == Some("RUNNING"),
            "round {round}: original not running after a live checkpoint"
        );
        remove(c, &cur)?;
        let next = format!("{name}{}", round + 1);
        c.ctr_ok(&["containers", "restore", "--live", "--rw", &next, &ck])
            .with_context(|| format!("round {round}: restore"))?;
        c.wait_for(&format!("{next} running"), Duration::from_secs(10), || {
            Ok(c.task_status(&next)?.as_deref() == Some("RUNNING"))
        })?;
        let restored_token = memory_token(c, &next, file)?;
        ensure!(
            restored_token == token,
            "round {round}: memory token {restored_token} != checkpointed {token}: not restored from memory"
        );
        let after = read_counter(c, &next, file, round)?;
        ensure!(
            after >= before,
            "round {round}: counter went back from {before} to {after}: memory not restored"
        );
        // One loop step after the restore has compared file and memory.
        wait_for_progress(c, &next, file)?;
        let v = violations(c, &next)?;
        ensure!(
            v.trim().is_empty(),
            "round {round}: consistency violations: {v}"
        );
        let _ = c.ctr(&["images", "rm", &ck]);
        cur = next;
    }
    remove(c, &cur)
}

#[test]
fn checkpoint_restore_continues_from_memory_and_files() -> Result<()> {
    let c = Containerd::start("ck-basic")?;
    let image = c.import_busybox()?;
    c.ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        STASIS_RUNTIME,
        image,
        "c1",
        "sh",
        "-c",
        &format!("echo kept > /marker; {}", counter_loop("/count")),
    ])?;
    wait_for_progress(&c, "c1", "/count")?;
    let token = memory_token(&c, "c1", "/count")?;
    let before = read_counter(&c, "c1", "/count", 0)?;
    c.ctr_ok(&["containers", "checkpoint", "--task", "--rw", "c1", "ck1"])?;
    remove(&c, "c1")?;
    c.ctr_ok(&["containers", "restore", "--live", "--rw", "c1", "ck1"])?;
    // `ctr c restore --live` creates and starts the task; `ctr t start` then finds it running.
    let _ = c.ctr(&["tasks", "start", "-d", "c1"]);
    c.wait_for("c1 running", Duration::from_secs(10), || {
        Ok(c.task_status("c1")?.as_deref() == Some("RUNNING"))
    })?;
    let restored = memory_token(&c, "c1", "/count")?;
    ensure!(
        restored == token,
        "memory token {restored} != checkpointed {token}: the process was not restored from memory"
    );
    let after = read_counter(&c, "c1", "/count", 1)?;
    ensure!(after >= before, "counter restarted: {after} < {before}");
    wait_for_progress(&c, "c1", "/count")?;
    let marker = c.ctr_ok(&["tasks", "exec", "--exec-id", "m", "c1", "cat", "/marker"])?;
    ensure!(marker.trim() == "kept", "rootfs file lost: {marker:?}");
    remove(&c, "c1")?;
    c.finish()
}

#[test]
fn thirty_live_checkpoints_are_consistent_on_the_rootfs() -> Result<()> {
    let c = Containerd::start("ck-consist")?;
    checkpoint_chain(&c, "rf", &[], "/counter", 30)?;
    c.finish()
}

#[test]
fn thirty_live_checkpoints_are_consistent_on_a_volume() -> Result<()> {
    let c = Containerd::start("ck-volume")?;
    let vol = c.dir.join("volume");
    std::fs::create_dir_all(&vol)?;
    let mount = format!(
        "type=bind,src={},dst=/state,options=rbind:rw",
        vol.display()
    );
    let extra = [
        "--mount",
        mount.as_str(),
        "--annotation",
        "io.stasis.checkpoint.volumes=/state",
    ];
    checkpoint_chain(&c, "vol", &extra, "/state/counter", 30)?;
    ensure!(vol.join("counter").exists(), "the volume was not used");
    c.finish()
}

/// Task.Checkpoint of a running task that nobody paused (containerd's daemon passes the call
/// straight to the shim; only its client library pauses first): the shim's own freeze holds
/// memory and the captured volume at one instant. Restored from each checkpoint in turn, the
/// loop finds file and memory equal, and the memory token is the one checkpointed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unpaused_task_checkpoint_is_consistent_on_a_volume() -> Result<()> {
    let c = Containerd::start("ck-unpaused")?;
    let image = c.import_busybox()?;
    let vol = c.dir.join("volume");
    std::fs::create_dir_all(&vol)?;
    let mount = format!(
        "type=bind,src={},dst=/state,options=rbind:rw",
        vol.display()
    );
    let file = "/state/counter";
    c.ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        STASIS_RUNTIME,
        "--mount",
        &mount,
        "--annotation",
        "io.stasis.checkpoint.volumes=/state",
        image,
        "tu",
        "sh",
        "-c",
        &counter_loop(file),
    ])?;
    wait_for_progress(&c, "tu", file)?;
    for round in 0..5 {
        let token = memory_token(&c, "tu", file)?;
        let before = read_counter(&c, "tu", file, round)?;
        let images =
            stasis_e2e::api::checkpoint_task_unpaused(&c.socket(), &c.namespace, "tu").await?;
        ensure!(
            c.task_status("tu")?.as_deref() == Some("RUNNING"),
            "round {round}: not running after a live checkpoint"
        );
        c.ctr_ok(&["tasks", "kill", "-s", "KILL", "tu"])?;
        c.wait_for("tu stopped", Duration::from_secs(10), || {
            Ok(c.task_status("tu")?.as_deref() == Some("STOPPED"))
        })?;
        c.ctr_ok(&["tasks", "delete", "tu"])?;
        stasis_e2e::api::restore_task_from_descriptor(
            &c.socket(),
            &c.namespace,
            "tu",
            images,
            Some(&c.dir),
        )
        .await?;
        c.wait_for("tu running", Duration::from_secs(10), || {
            Ok(c.task_status("tu")?.as_deref() == Some("RUNNING"))
        })?;
        let restored = memory_token(&c, "tu", file)?;
        ensure!(
            restored == token,
            "round {round}: memory token {restored} != checkpointed {token}"
        );
        let after = read_counter(&c, "tu", file, round + 100)?;
        ensure!(
            after >= before,
            "round {round}: counter went back: {before} -> {after}"
        );
        // One loop step after the restore has compared file and memory.
        wait_for_progress(&c, "tu", file)?;
        let v = violations(&c, "tu")?;
        ensure!(
            v.is_empty(),
            "round {round}: volume and memory captured at different instants: {v}"
        );
    }
    remove(&c, "tu")?;
    c.finish()
}

#[test]
fn paused_stays_paused_and_running_stays_running() -> Result<()> {
    let c = Containerd::start("ck-paused")?;
    let image = c.import_busybox()?;
    let freezer = |id: &str| {
        std::fs::read_to_string(
            Path::new("/sys/fs/cgroup/freezer")
                .join(&c.namespace)
                .join(id)
                .join("freezer.state"),
        )
        .unwrap_or_default()
    };
    for id in ["p1", "r1"] {
        c.ctr_ok(&[
            "run",
            "-d",
            "--runtime",
            STASIS_RUNTIME,
            image,
            id,
            "sleep",
            "100000",
        ])?;
    }
    c.ctr_ok(&["tasks", "pause", "p1"])?;
    c.ctr_ok(&[
        "tasks",
        "checkpoint",
        "--image-path",
        c.dir.join("img-p1").to_str().unwrap(),
        "p1",
    ])?;
    std::thread::sleep(Duration::from_millis(1100)); // checkpoint refs are named by the second
    c.ctr_ok(&[
        "tasks",
        "checkpoint",
        "--image-path",
        c.dir.join("img-r1").to_str().unwrap(),
        "r1",
    ])?;
    ensure!(
        c.task_status("p1")?.as_deref() == Some("PAUSED"),
        "paused container not paused after checkpoint"
    );
    ensure!(
        freezer("p1").trim() == "FROZEN",
        "p1 cgroup: {}",
        freezer("p1")
    );
    ensure!(
        c.task_status("r1")?.as_deref() == Some("RUNNING"),
        "running container not running after checkpoint"
    );
    ensure!(
        freezer("r1").trim() == "THAWED",
        "r1 cgroup: {}",
        freezer("r1")
    );
    for img in ["img-p1", "img-r1"] {
        ensure!(
            c.dir.join(img).join("inventory.img").exists(),
            "{img}: no CRIU images"
        );
        ensure!(
            c.dir.join(img).join("dump.log").exists(),
            "{img}: no dump.log beside the images"
        );
    }
    c.ctr_ok(&["tasks", "resume", "p1"])?;
    remove(&c, "p1")?;
    remove(&c, "r1")?;
    c.finish()
}

#[test]
fn failed_dump_reports_criu_reason_and_leaves_nothing() -> Result<()> {
    let c = Containerd::start("ck-fail")?;
    let image = c.import_busybox()?;
    // An established TCP connection inside the container, which CRIU refuses without open_tcp.
    c.ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        STASIS_RUNTIME,
        image,
        "tcp1",
        "sh",
        "-c",
        stasis_e2e::cri::TCP_WORKLOAD,
    ])?;
    c.wait_for(
        "an established TCP connection in tcp1",
        Duration::from_secs(10),
        || {
            let (_, tcp) = exec(&c, "tcp1", &["cat", "/proc/net/tcp"])?;
            Ok(tcp
                .lines()
                .skip(1)
                .any(|l| l.split_whitespace().nth(3) == Some("01")))
        },
    )?;
    let dest = c.dir.join("img-tcp");
    let out = c.ctr(&[
        "tasks",
        "checkpoint",
        "--image-path",
        dest.to_str().unwrap(),
        "tcp1",
    ])?;
    ensure!(
        !out.status.success(),
        "dump with an established TCP connection should fail"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        err.contains("tcp1"),
        "error does not name the container: {err}"
    );
    ensure!(
        err.contains("CRIU:") && err.to_lowercase().contains("tcp"),
        "error lacks CRIU's reason: {err}"
    );
    ensure!(
        c.task_status("tcp1")?.as_deref() == Some("RUNNING"),
        "container not running after a failed dump"
    );
    let state = std::fs::read_to_string(
        Path::new("/sys/fs/cgroup/freezer")
            .join(&c.namespace)
            .join("tcp1/freezer.state"),
    )?;
    ensure!(state.trim() == "THAWED", "container left {state}");
    let left: Vec<_> = std::fs::read_dir(&dest)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    ensure!(
        left.is_empty(),
        "half-written images left at the destination: {left:?}"
    );
    remove(&c, "tcp1")?;
    c.finish()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cri_checkpoint_container_is_readable_by_checkpointctl() -> Result<()> {
    use stasis_e2e::cri::{container_config, cri, pod_config};
    let c = Containerd::start("ck-cri")?;
    let image = c.import_busybox_for_cri()?;
    let mut client = c.cri().await?;
    let pod = pod_config("ckpod", &c.dir.join("logs"));
    let pod_id = client.run_pod(&pod).await?;
    let id = client
        .run_container(
            &pod_id,
            &pod,
            container_config("counter", image, &["sh", "-c", &counter_loop("/counter")]),
        )
        .await?;
    stasis_e2e::cri::wait_counter_moving(&mut client, &id, "/counter").await?;
    let archive = c.dir.join("counter-checkpoint.tar");
    client
        .runtime
        .checkpoint_container(cri::CheckpointContainerRequest {
            container_id: id.clone(),
            location: archive.display().to_string(),
            timeout: 60,
        })
        .await
        .context("CRI CheckpointContainer")?;
    ensure!(archive.exists(), "no archive at {}", archive.display());
    let show = std::process::Command::new("checkpointctl")
        .arg("show")
        .arg(&archive)
        .output()?;
    let text = String::from_utf8_lossy(&show.stdout);
    ensure!(
        show.status.success(),
        "checkpointctl show failed: {}{}",
        text,
        String::from_utf8_lossy(&show.stderr)
    );
    ensure!(
        text.contains("counter") || text.contains(&id[..12]),
        "checkpointctl show does not list the container:\n{text}"
    );
    let tree = std::process::Command::new("checkpointctl")
        .args(["inspect", "--ps-tree"])
        .arg(&archive)
        .output()?;
    let tree_text = String::from_utf8_lossy(&tree.stdout);
    ensure!(
        tree.status.success(),
        "checkpointctl inspect --ps-tree failed: {}{}",
        tree_text,
        String::from_utf8_lossy(&tree.stderr)
    );
    ensure!(
        tree_text.contains("sh"),
        "process tree lacks the shell:\n{tree_text}"
    );
    let st = client.container_status(&id).await?;
    ensure!(
        st.state == cri::ContainerState::ContainerRunning as i32,
        "container not running after CRI checkpoint"
    );
    client.stop_and_remove_pod(&pod_id).await?;
    c.finish()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_with_exit_stops_the_task_and_restores() -> Result<()> {
    let c = Containerd::start("ck-exit")?;
    let image = c.import_busybox()?;
    c.ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        STASIS_RUNTIME,
        image,
        "x1",
        "sh",
        "-c",
        &counter_loop("/count"),
    ])?;
    wait_for_progress(&c, "x1", "/count")?;
    let token = memory_token(&c, "x1", "/count")?;
    let before = read_counter(&c, "x1", "/count", 0)?;
    c.checkpoint_exit_and_restore("x1").await?;
    let restored = memory_token(&c, "x1", "/count")?;
    ensure!(
        restored == token,
        "memory token {restored} != checkpointed {token}: not restored from memory"
    );
    let after = read_counter(&c, "x1", "/count", 1)?;
    ensure!(after >= before, "restored counter {after} < {before}");
    wait_for_progress(&c, "x1", "/count")?;
    let v = violations(&c, "x1")?;
    ensure!(
        v.is_empty(),
        "file and memory disagree after the restore: {v}"
    );
    remove(&c, "x1")?;
    c.finish()
}

fn wait_for_progress(c: &Containerd, id: &str, file: &str) -> Result<()> {
    c.wait_counter_moving(id, file).map(drop)
}

/// A CRI CheckpointContainer archive restores through CRI itself: CreateContainer names the
/// archive as its image, containerd brings the base image back from the registry the archive
/// records (a real one on loopback here), and the shim's Task.Create restores the processes
/// from the archive's images: the same memory (token), the same files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cri_checkpoint_container_archive_restores_through_cri() -> Result<()> {
    use stasis_e2e::cri::{
        container_config, cri, memory_token, pod_config, read_counter, violations,
        wait_counter_above,
    };
    let c = Containerd::start("ck-cri-restore")?;
    let local = c.import_busybox_for_cri()?;
    let registry = stasis_e2e::registry::Registry::start(&c.dir)?;
    let remote = format!("{}/stasis/busybox:test", registry.host);
    let ctr_k8s = |args: &[&str]| -> Result<String> {
        let out = std::process::Command::new("ctr")
            .arg("--address")
            .arg(c.socket())
            .args(["-n", "k8s.io"])
            .args(args)
            .output()?;
        ensure!(
            out.status.success(),
            "ctr {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    ctr_k8s(&["images", "tag", local, &remote])?;
    ctr_k8s(&["images", "push", "--plain-http", &remote])?;
    ctr_k8s(&["images", "rm", &remote])?;
    // Pulled through CRI, the image carries the registry digest a checkpoint records.
    let mut images = k8s_cri::v1::image_service_client::ImageServiceClient::new(
        stasis_controller::cri::channel(&c.socket()).await?,
    );
    images
        .pull_image(cri::PullImageRequest {
            image: Some(cri::ImageSpec {
                image: remote.clone(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .context("CRI PullImage from the loopback registry")?;

    let mut client = c.cri().await?;
    let pod = pod_config("crick", &c.dir.join("logs"));
    let pod_id = client.run_pod(&pod).await?;
    let id = client
        .run_container(
            &pod_id,
            &pod,
            container_config("counter", &remote, &["sh", "-c", &counter_loop("/counter")]),
        )
        .await?;
    client
        .exec_ok(&id, &["sh", "-c", "echo kept > /in-rootfs"])
        .await?;
    stasis_e2e::cri::wait_counter_moving(&mut client, &id, "/counter").await?;
    let token = memory_token(&mut client, &id, "/counter").await?;
    let before = read_counter(&mut client, &id, "/counter").await?;
    let archive = c.dir.join("cri-checkpoint.tar");
    client
        .runtime
        .checkpoint_container(cri::CheckpointContainerRequest {
            container_id: id.clone(),
            location: archive.display().to_string(),
            timeout: 60,
        })
        .await
        .context("CRI CheckpointContainer")?;
    client.stop_and_remove_pod(&pod_id).await?;

    let pod2 = pod_config("crick-restored", &c.dir.join("logs"));
    let pod2_id = client.run_pod(&pod2).await?;
    let restored = client
        .run_container(
            &pod2_id,
            &pod2,
            container_config("counter", &archive.display().to_string(), &[]),
        )
        .await
        .context("CRI CreateContainer from the checkpoint archive")?;
    let now_token = memory_token(&mut client, &restored, "/counter").await?;
    ensure!(
        now_token == token,
        "restored memory token {now_token} != checkpointed {token}"
    );
    let now = read_counter(&mut client, &restored, "/counter").await?;
    ensure!(now >= before, "counter {now} < {before} at the checkpoint");
    wait_counter_above(&mut client, &restored, "/counter", now).await?;
    let v = violations(&mut client, &restored).await?;
    ensure!(v.is_empty(), "file and memory disagree: {v}");
    let kept = client.exec_ok(&restored, &["cat", "/in-rootfs"]).await?;
    ensure!(kept.trim() == "kept", "rootfs file lost: {kept:?}");
    client.stop_and_remove_pod(&pod2_id).await?;
    drop(registry);
    c.finish()
}
