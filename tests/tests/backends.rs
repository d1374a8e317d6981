//! One controller, several runtimes: the same pod checkpoint round trip through the runc
//! backend (handler `stasis`) and the gVisor backend (handler `stasis-gvisor`), archives
//! refused by the other backend, and crun where this host lets it run.

use std::time::Duration;

const NAMES: [&str; 4] = ["a", "b", "c", "d"];

use anyhow::{bail, ensure, Context, Result};
use stasis_e2e::{
    cri::{
        container_config, containers_by_name, counter_loop, cri, memory_token, pod_config,
        read_counter, violations, wait_counter_above, wait_counter_moving,
    },
    Containerd,
};

/// Runs a four-container pod under `handler`, checks which kernel runs it, checkpoints it live
/// with stasisctl, restores it as a new pod, and checks memory and files continue. Nothing in
/// here depends on the runtime except the kernel check.
async fn pod_round_trip(name: &str, handler: &str, gvisor: bool) -> Result<()> {
    let c = Containerd::start(name)?;
    let image = c.import_busybox_for_cri()?;
    let mut cri = c.cri().await?;
    let pod = pod_config("rt", &c.dir.join("logs"));
    let pod_id = cri.run_pod_with(&pod, handler).await?;
    let mut ids = Vec::new();
    // Four containers in one PID namespace: a restore brings them back one after the other
    // with their saved PIDs, which new children of the earlier ones must not take.
    for n in NAMES {
        let cfg = container_config(n, image, &["sh", "-c", &counter_loop("/counter")]);
        ids.push(cri.run_container(&pod_id, &pod, cfg).await?);
    }
    // Exec, and which kernel answers: gVisor's own, or the host's.
    let (code, dmesg, err) = cri.exec(&ids[0], &["busybox", "dmesg"]).await?;
    ensure!(code == 0 || !gvisor, "dmesg in gVisor exited {code}: {err}");
    ensure!(
        dmesg.contains("gVisor") == gvisor,
        "handler {handler}: dmesg says {dmesg:?}"
    );
    let hostname = cri.exec_ok(&ids[1], &["hostname"]).await?;
    ensure!(hostname.trim() == "rt-host", "hostname {hostname:?}");
    let mut before = Vec::new();
    let mut tokens = Vec::new();
    for id in &ids {
        // Running: the counter moves.
        let first = read_counter(&mut cri, id, "/counter").await?;
        wait_counter_above(&mut cri, id, "/counter", first).await?;
        tokens.push(memory_token(&mut cri, id, "/counter").await?);
        before.push(read_counter(&mut cri, id, "/counter").await?);
    }
    let pids_before = loop_pids(&mut cri, &ids[0]).await?;
    // runc pods share one PID namespace (all four loops visible); a gVisor container may see
    // only its own.
    ensure!(
        if gvisor {
            !pids_before.is_empty()
        } else {
            pids_before.len() == NAMES.len()
        },
        "counter loops visible in the pod's PID namespace: {pids_before:?}"
    );

    let archive = c.dir.join("pod.tar");
    let out = c.stasisctl_ok(&[
        "pod",
        "checkpoint",
        "rt",
        "--leave-running",
        "--output",
        archive.to_str().unwrap(),
    ])?;
    ensure!(out.contains("frozen window"), "stasisctl said:\n{out}");
    let inspect = c.stasisctl_ok(&["inspect", archive.to_str().unwrap(), "--format", "json"])?;
    let summary: serde_json::Value = serde_json::from_str(&inspect)?;
    let engine = if gvisor { "runsc" } else { "runc" };
    ensure!(summary["engine"] == engine, "inspect: {inspect}");
    ensure!(
        (summary["sandbox_image_bytes"].as_u64().unwrap_or(0) > 0) == gvisor,
        "sandbox image size: {inspect}"
    );
    // A live checkpoint leaves the pod running.
    for id in &ids {
        let st = cri.container_status(id).await?;
        ensure!(
            st.state == cri::ContainerState::ContainerRunning as i32,
            "{id} stopped"
        );
    }
    let live = read_counter(&mut cri, &ids[0], "/counter").await?;
    wait_counter_above(&mut cri, &ids[0], "/counter", live).await?;
    cri.stop_and_remove_pod(&pod_id).await?;

    // No --runtime-handler: the archive records the handler the pod ran under.
    let new_pod = c
        .stasisctl_ok(&[
            "pod",
            "restore",
            archive.to_str().unwrap(),
            "--name",
            "rt-restored",
        ])?
        .trim()
        .to_string();
    let restored = containers_by_name(&mut cri, &new_pod).await?;
    ensure!(
        restored.len() == NAMES.len(),
        "restored containers: {restored:?}"
    );
    let pod_status = cri
        .runtime
        .pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: new_pod.clone(),
            verbose: false,
        })
        .await?
        .into_inner()
        .status
        .context("restored pod status")?;
    let restored_name = pod_status.metadata.map(|m| m.name).unwrap_or_default();
    ensure!(
        restored_name == "rt-restored",
        "--name ignored: {restored_name}"
    );
    for (name, id, state) in &restored {
        ensure!(
            *state == cri::ContainerState::ContainerRunning as i32,
            "{name} not running after restore"
        );
        let i = NAMES
            .iter()
            .position(|n| n == name)
            .with_context(|| format!("unknown container {name}"))?;
        // A value that only ever lived in the loop's memory: a process started afresh from
        // the restored files would hold another one.
        let token = memory_token(&mut cri, id, "/counter").await?;
        ensure!(
            token == tokens[i],
            "{name}: memory token {token} differs from the checkpointed {}: not restored from memory",
            tokens[i]
        );
        let now = read_counter(&mut cri, id, "/counter").await?;
        ensure!(
            now >= before[i],
            "{name}: counter {now} < {}: memory not restored",
            before[i]
        );
        // One loop step after the restore has compared file and memory before it is asked.
        wait_counter_above(&mut cri, id, "/counter", now).await?;
        let v = violations(&mut cri, id).await?;
        ensure!(v.is_empty(), "{name}: file and memory disagree: {v}");
    }
    // CRIU (and gVisor) give every process its saved PID back.
    let pids_after = loop_pids(&mut cri, &restored[0].1).await?;
    ensure!(
        pids_after == pids_before,
        "PIDs of the counter loops changed: {pids_before:?} before, {pids_after:?} after"
    );
    let (_, dmesg, _) = cri.exec(&restored[0].1, &["busybox", "dmesg"]).await?;
    ensure!(
        dmesg.contains("gVisor") == gvisor,
        "restored pod: dmesg {dmesg:?}"
    );
    cri.stop_and_remove_pod(&new_pod).await?;
    c.finish()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gvisor_pod_checkpoint_and_restore() -> Result<()> {
    pod_round_trip("backend-gvisor", "stasis-gvisor", true).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runc_pod_checkpoint_and_restore_same_test() -> Result<()> {
    pod_round_trip("backend-runc", "stasis", false).await
}

/// Checkpoints a one-container pod under `handler` into `archive`.
async fn checkpoint_pod(
    c: &Containerd,
    handler: &str,
    pod_name: &str,
) -> Result<std::path::PathBuf> {
    let image = c.import_busybox_for_cri()?;
    let mut cri = c.cri().await?;
    let pod = pod_config(pod_name, &c.dir.join("logs"));
    let pod_id = cri.run_pod_with(&pod, handler).await?;
    let cfg = container_config("app", image, &["sh", "-c", &counter_loop("/counter")]);
    let id = cri.run_container(&pod_id, &pod, cfg).await?;
    let archive = c.dir.join(format!("{pod_name}.tar"));
    c.stasisctl_ok(&[
        "pod",
        "checkpoint",
        pod_name,
        "--output",
        archive.to_str().unwrap(),
    ])?;
    // A checkpoint without --leave-running stops the pod's containers. (Waiting for CRI to
    // see that also keeps StopPodSandbox from racing containerd's own handling of the exit,
    // which can fail it with "ttrpc: closed".)
    let mut state = 0;
    for _ in 0..100 {
        state = cri.container_status(&id).await?.state;
        if state == cri::ContainerState::ContainerExited as i32 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ensure!(
        state == cri::ContainerState::ContainerExited as i32,
        "{handler}: container still {state} after a stopping checkpoint"
    );
    cri.stop_and_remove_pod(&pod_id).await?;
    Ok(archive)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archive_of_one_backend_is_refused_by_the_other() -> Result<()> {
    let c = Containerd::start("backend-mismatch")?;
    let runc_archive = checkpoint_pod(&c, "stasis", "from-runc").await?;
    let gvisor_archive = checkpoint_pod(&c, "stasis-gvisor", "from-gvisor").await?;
    // containerd's own events show whether anything was created, not a count taken after.
    let plain = c.import_busybox()?;
    let mut events = stasis_e2e::EventWatch::start(&c, plain)?;
    for (archive, handler, written_by, runs_on) in [
        (&runc_archive, "stasis-gvisor", "runc", "runsc"),
        (&gvisor_archive, "stasis", "runsc", "runc"),
    ] {
        let pods = c.settled_footprint().await?;
        events.mark(&c, plain)?;
        let out = c.stasisctl(&[
            "pod",
            "restore",
            archive.to_str().unwrap(),
            "--runtime-handler",
            handler,
        ])?;
        let during = events.mark(&c, plain)?;
        eprintln!("{handler}: events during the refused restore: {during:#?}");
        stasis_e2e::events::expect_no_creation(&during)
            .with_context(|| format!("the {written_by} archive under {handler}"))?;
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(
            !out.status.success(),
            "{written_by} archive restored under {handler}"
        );
        ensure!(
            err.contains(&format!("written by the {written_by} backend"))
                && err.contains(&format!("runs on the {runs_on} backend")),
            "error does not name both backends: {err}"
        );
        c.expect_footprint(pods)
            .await
            .with_context(|| format!("a pod was left behind: {err}"))?;
        eprintln!("refused as expected: {}", err.lines().last().unwrap_or(""));
    }
    c.finish()
}

/// crun's own answer on this host, from a container run straight through crun.
fn crun_can_run(c: &Containerd) -> Result<Result<(), String>> {
    let bundle = c.dir.join("crun-probe");
    let rootfs = bundle.join("rootfs");
    std::fs::create_dir_all(rootfs.join("bin"))?;
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox"))?;
    // crun's own default spec, running `true` without a terminal.
    let made = std::process::Command::new("crun")
        .arg("spec")
        .current_dir(&bundle)
        .status()
        .context("crun spec")?;
    ensure!(made.success(), "crun spec failed");
    let mut spec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(bundle.join("config.json"))?)?;
    spec["process"]["args"] = serde_json::json!(["/bin/busybox", "true"]);
    spec["process"]["terminal"] = serde_json::json!(false);
    std::fs::write(bundle.join("config.json"), serde_json::to_vec(&spec)?)?;
    let out = std::process::Command::new("crun")
        .arg("--root")
        .arg(c.dir.join("crun-probe-root"))
        .args(["run", "--bundle"])
        .arg(&bundle)
        .arg("stasis-crun-probe")
        .output()
        .context("run crun")?;
    if out.status.success() {
        return Ok(Ok(()));
    }
    Ok(Err(String::from_utf8_lossy(&out.stderr).trim().to_string()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crun_backend_runs_pods_or_says_why_not() -> Result<()> {
    let c = Containerd::start("backend-crun")?;
    match crun_can_run(&c)? {
        Ok(()) => {
            pod_round_trip("backend-crun-pod", "stasis-crun", false).await?;
            c.finish()
        }
        Err(reason) => {
            // The backend must carry crun's own refusal to CRI, naming the container, and
            // leave nothing running.
            let image = c.import_busybox_for_cri()?;
            let mut cri = c.cri().await?;
            let pod = pod_config("crun", &c.dir.join("logs"));
            let pod_id = cri.run_pod_with(&pod, "stasis-crun").await?;
            let cfg = container_config("app", image, &["sleep", "1000"]);
            let err = match cri.run_container(&pod_id, &pod, cfg).await {
                Ok(id) => {
                    bail!("crun ran container {id} although it refused to run here: {reason}")
                }
                Err(e) => format!("{e:#}"),
            };
            let first_line = reason.lines().next().unwrap_or_default();
            let crun_words = first_line.rsplit(": ").next().unwrap_or(first_line);
            ensure!(
                err.contains("crun") && err.contains(crun_words),
                "the error does not carry crun's reason {crun_words:?}: {err}"
            );
            cri.stop_and_remove_pod(&pod_id).await?;
            eprintln!("crun cannot run on this host: {reason}");
            eprintln!("stasis-crun reported: {err}");
            c.finish()
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_compares_handlers_in_one_table() -> Result<()> {
    let c = Containerd::start("backend-bench")?;
    let image = c.import_busybox_for_cri()?;
    let work = c.dir.join("bench");
    let base = [
        "bench",
        "--handler",
        "stasis",
        "--handler",
        "stasis-gvisor",
        "--handler",
        "runc",
        "--image",
        image,
        "--work-dir",
        work.to_str().unwrap(),
    ];
    let json =
        c.stasisctl_ok(&[&base[..], &["--containers", "1,2", "--format", "json"]].concat())?;
    let rows: Vec<serde_json::Value> = serde_json::from_str(&json)?;
    ensure!(rows.len() == 6, "rows: {json}");
    for r in &rows {
        let handler = r["handler"].as_str().unwrap_or_default();
        ensure!(r["pod_start_ms"].as_f64().unwrap_or(0.0) > 0.0, "{r}");
        ensure!(r["checkpoint_ms"].as_f64().unwrap_or(0.0) > 0.0, "{r}");
        ensure!(r["archive_bytes"].as_u64().unwrap_or(0) > 0, "{r}");
        if handler == "runc" {
            // containerd's own shim has no Checkpoint service: CRI, container by container.
            ensure!(r["restore_ms"].is_null() && r["frozen_ms"].is_null(), "{r}");
        } else {
            ensure!(r["consistency"] == "held", "{handler}: {r}");
            ensure!(r["restore_ms"].as_f64().unwrap_or(0.0) > 0.0, "{r}");
            let engine = if handler == "stasis" { "runc" } else { "runsc" };
            ensure!(r["engine"] == engine, "{r}");
        }
    }
    // The same run as a table, with ratios against the first handler.
    let table = c.stasisctl_ok(&[&base[..], &["--containers", "1"]].concat())?;
    ensure!(
        table.contains("| stasis-gvisor")
            && table.contains("(1.00x)")
            && table.contains("ratios against stasis"),
        "table:\n{table}"
    );
    eprintln!("{table}");
    // Nothing left behind by the bench.
    c.expect_footprint(stasis_e2e::Footprint::default())
        .await
        .context("the bench left pods, containers or shims behind")?;
    c.finish()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gvisor_pod_volume_is_captured_with_the_sandbox() -> Result<()> {
    let c = Containerd::start("backend-gvisor-vol")?;
    let image = c.import_busybox_for_cri()?;
    let mut cri = c.cri().await?;
    let vol = c.dir.join("volume");
    std::fs::create_dir_all(&vol)?;
    let pod = pod_config("gv", &c.dir.join("logs"));
    let pod_id = cri.run_pod_with(&pod, "stasis-gvisor").await?;
    let mut cfg = container_config(
        "vol",
        image,
        &["sh", "-c", &counter_loop("/shared/counter")],
    );
    cfg.mounts.push(cri::Mount {
        container_path: "/shared".into(),
        host_path: vol.display().to_string(),
        ..Default::default()
    });
    cfg.annotations
        .insert("io.stasis.checkpoint.volumes".into(), "/shared".into());
    let id = cri.run_container(&pod_id, &pod, cfg).await?;
    wait_counter_moving(&mut cri, &id, "/shared/counter").await?;
    let before = read_counter(&mut cri, &id, "/shared/counter").await?;
    let archive = c.dir.join("gv.tar");
    c.stasisctl_ok(&[
        "pod",
        "checkpoint",
        "gv",
        "--leave-running",
        "--output",
        archive.to_str().unwrap(),
    ])?;
    // The pod ran on after the checkpoint (the sandbox was paused only around it).
    wait_counter_above(&mut cri, &id, "/shared/counter", before).await?;
    cri.stop_and_remove_pod(&pod_id).await?;
    // The volume moves on without the pod: the restore must put back what the memory saw.
    std::fs::write(vol.join("counter"), "999999\n")?;
    let new_pod = c
        .stasisctl_ok(&[
            "pod",
            "restore",
            archive.to_str().unwrap(),
            "--runtime-handler",
            "stasis-gvisor",
            "--replace-volumes",
        ])?
        .trim()
        .to_string();
    let restored = containers_by_name(&mut cri, &new_pod).await?;
    let id = &restored.first().context("no restored container")?.1;
    let now = read_counter(&mut cri, id, "/shared/counter").await?;
    ensure!(
        now >= before && now < 999999,
        "volume not restored: counter {now}"
    );
    wait_counter_above(&mut cri, id, "/shared/counter", now).await?;
    let v = violations(&mut cri, id).await?;
    ensure!(
        v.trim().is_empty(),
        "volume file and memory disagree after the restore: {v}"
    );
    cri.stop_and_remove_pod(&new_pod).await?;
    c.finish()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gvisor_refuses_checkpoints_it_could_not_restore() -> Result<()> {
    let c = Containerd::start("backend-gvisor-refuse")?;
    let image = c.import_busybox_for_cri()?;
    let mut cri = c.cri().await?;
    let pod = pod_config("gr", &c.dir.join("logs"));
    let pod_id = cri.run_pod_with(&pod, "stasis-gvisor").await?;
    let cfg = container_config("app", image, &["sh", "-c", &counter_loop("/counter")]);
    let id = cri.run_container(&pod_id, &pod, cfg).await?;
    // The containers of a gVisor pod share its one network stack: localhost reaches across.
    let server = container_config(
        "server",
        image,
        &["sh", "-c", "nc -ll -p 8080 -e echo pong-from-server"],
    );
    cri.run_container(&pod_id, &pod, server).await?;
    let mut answer = String::new();
    for _ in 0..50 {
        let (_, out, _) = cri
            .exec(&id, &["sh", "-c", "nc 127.0.0.1 8080 </dev/null"])
            .await?;
        answer = out;
        if answer.contains("pong-from-server") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ensure!(
        answer.contains("pong-from-server"),
        "app could not reach server on localhost: {answer:?}"
    );
    let archive = c.dir.join("gr.tar");
    let checkpoint = |c: &Containerd| {
        c.stasisctl(&[
            "pod",
            "checkpoint",
            "gr",
            "--leave-running",
            "--output",
            archive.to_str().unwrap(),
        ])
    };

    // One container of a gVisor pod through CRI's per-container checkpoint.
    let err = cri
        .runtime
        .checkpoint_container(cri::CheckpointContainerRequest {
            container_id: id.clone(),
            location: c.dir.join("one.tar").display().to_string(),
            timeout: 60,
        })
        .await
        .err()
        .context("CRI checkpointed one container of a gVisor pod")?;
    ensure!(
        err.message().contains("checkpoint the pod"),
        "unclear error: {err}"
    );

    // Pausing one container would pause the whole sandbox: refused, and it keeps running.
    let out = std::process::Command::new("ctr")
        .arg("--address")
        .arg(c.socket())
        .args(["-n", "k8s.io", "tasks", "pause", &id])
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && err.contains("cannot pause one container of a pod"),
        "pausing one container of a gVisor pod: {err}"
    );
    // Resources cannot change under gVisor: refused through CRI with runsc's reason.
    let err = cri
        .runtime
        .update_container_resources(cri::UpdateContainerResourcesRequest {
            container_id: id.clone(),
            linux: Some(cri::LinuxContainerResources {
                memory_limit_in_bytes: 64 << 20,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .err()
        .context("CRI updated the resources of a gVisor container")?;
    ensure!(
        err.message().contains("cannot change the resources"),
        "unclear update error: {err}"
    );
    // gVisor saves sockets and locks itself: CRIU's options are refused by name, each.
    for flag in ["--tcp-established", "--file-locks"] {
        let out = c.stasisctl(&[
            "pod",
            "checkpoint",
            "gr",
            "--leave-running",
            flag,
            "--output",
            archive.to_str().unwrap(),
        ])?;
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(
            !out.status.success()
                && err.contains("has no --tcp-established or --file-locks")
                && err.contains("gVisor saves sockets and locks itself"),
            "{flag} under gVisor: {err}"
        );
        ensure!(
            !archive.exists(),
            "{flag}: a refused checkpoint left an archive"
        );
    }
    let now = read_counter(&mut cri, &id, "/counter").await?;
    wait_counter_above(&mut cri, &id, "/counter", now).await?;

    // An exec still running: gVisor would write an image it cannot restore.
    let mut other = cri.clone();
    let exec_id = id.clone();
    let exec = tokio::spawn(async move {
        other
            .exec(&exec_id, &["sh", "-c", "touch /exec-running; sleep 3"])
            .await
    });
    let mut running = false;
    for _ in 0..100 {
        if cri.exec(&id, &["test", "-e", "/exec-running"]).await?.0 == 0 {
            running = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ensure!(running, "the exec never started");
    let out = checkpoint(&c)?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && err.contains("is still running"),
        "checkpoint with a running exec: {err}"
    );
    ensure!(!archive.exists(), "an archive was left at --output");
    exec.await??;

    // Once the exec is over the same checkpoint works, and the pod kept running throughout.
    let out = checkpoint(&c)?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st = cri.container_status(&id).await?;
    ensure!(
        st.state == cri::ContainerState::ContainerRunning as i32,
        "stopped"
    );
    cri.stop_and_remove_pod(&pod_id).await?;
    c.finish()
}

/// Plain containers (Task API, no pod) run on gVisor too: one sandbox each.
#[test]
fn gvisor_runs_plain_containers_through_the_task_api() -> Result<()> {
    let c = Containerd::start("backend-gvisor-ctr")?;
    let image = c.import_busybox()?;
    let runtime = "io.containerd.stasis-gvisor.v2";
    let out = c.ctr_ok(&[
        "run",
        "--rm",
        "--runtime",
        runtime,
        image,
        "g1",
        "busybox",
        "dmesg",
    ])?;
    ensure!(out.contains("gVisor"), "not a gVisor kernel: {out}");
    let out = c.ctr(&[
        "run",
        "--rm",
        "--runtime",
        runtime,
        image,
        "g2",
        "sh",
        "-c",
        "echo bye >&2; exit 3",
    ])?;
    ensure!(out.status.code() == Some(3), "exit status {:?}", out.status);
    ensure!(
        String::from_utf8_lossy(&out.stderr).contains("bye"),
        "stderr lost"
    );
    c.finish()
}

/// A plain gVisor container checkpointed and restored through containerd's Task API (`ctr t
/// checkpoint --exit`, then a task created from the image): runsc checkpoint and restore.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gvisor_task_checkpoint_and_restore() -> Result<()> {
    let c = Containerd::start("backend-gvisor-task")?;
    let image = c.import_busybox()?;
    let runtime = "io.containerd.stasis-gvisor.v2";
    let loop_ = counter_loop("/count");
    c.ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        runtime,
        image,
        "g1",
        "sh",
        "-c",
        &loop_,
    ])?;
    c.wait_counter_moving("g1", "/count")?;
    let token = c.memory_token("g1", "/count")?;
    let before = c.counter("g1", "/count")?;
    c.checkpoint_exit_and_restore("g1").await?;
    let restored = c.memory_token("g1", "/count")?;
    ensure!(
        restored == token,
        "memory token {restored} != checkpointed {token}: not restored from memory"
    );
    let after = c.counter("g1", "/count")?;
    ensure!(
        after >= before,
        "restored counter {after} < {before}: memory not restored"
    );
    c.wait_counter_moving("g1", "/count")?;
    c.ctr_ok(&["tasks", "kill", "-s", "KILL", "g1"])?;
    c.finish()
}

/// PIDs (in the pod's shared PID namespace) of the counter loops, sorted.
async fn loop_pids(cri: &mut stasis_e2e::cri::CriClient, id: &str) -> Result<Vec<u32>> {
    // The pattern is split so this shell's own command line does not match it.
    // A loop's `$(…)` subshells share its command line for a moment: keep only processes
    // whose parent is not a loop too (pid and ppid from /proc/<pid>/stat).
    let script = r#"for p in /proc/[0-9]*; do if grep -q "/dev/uran""dom" $p/cmdline 2>/dev/null; then cut -d' ' -f1,4 $p/stat; fi; done"#;
    let out = cri.exec_ok(id, &["sh", "-c", script]).await?;
    let pairs: Vec<(u32, u32)> = out
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace().map(|v| v.parse::<u32>());
            Some((f.next()?.ok()?, f.next()?.ok()?))
        })
        .collect();
    let mut pids: Vec<u32> = pairs
        .iter()
        .filter(|(_, ppid)| !pairs.iter().any(|(p, _)| p == ppid))
        .map(|(p, _)| *p)
        .collect();
    pids.sort();
    Ok(pids)
}

/// A handler whose containerd config does not pass `io.stasis.*` container annotations cannot
/// restore: its containers would start fresh and the checkpoint would be silently lost. The
/// restore must fail saying why, and leave no pod.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_without_annotations_fails_clearly() -> Result<()> {
    let c = Containerd::start("backend-no-annotations")?;
    let archive = checkpoint_pod(&c, "stasis", "plain").await?;
    let pods = c.settled_footprint().await?;
    let out = c.stasisctl(&[
        "pod",
        "restore",
        archive.to_str().unwrap(),
        "--runtime-handler",
        "stasis-plain",
    ])?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success(),
        "the restore succeeded without annotations: {err}"
    );
    ensure!(
        err.contains("io.stasis.restore-from") && err.contains("container_annotations"),
        "the error does not say what is missing: {err}"
    );
    c.expect_footprint(pods)
        .await
        .context("the failed restore left a pod behind")?;
    // The same archive restores under a handler that passes the annotations.
    let new_pod = c
        .stasisctl_ok(&["pod", "restore", archive.to_str().unwrap()])?
        .trim()
        .to_string();
    let mut cri = c.cri().await?;
    let restored = containers_by_name(&mut cri, &new_pod).await?;
    ensure!(restored.len() == 1, "restored: {restored:?}");
    cri.stop_and_remove_pod(&new_pod).await?;
    c.finish()
}

/// A restored runc pod's pause process, PID 1 of the pod's new PID namespace, makes that
/// namespace allocate above the checkpoint's last PID before it answers the shim (so before
/// anything is restored into it): the next process there gets the PID after it. Without, a
/// container restored first could fork onto a PID a later container needs.
#[test]
fn a_restored_pods_pid_namespace_allocates_above_the_checkpoints_last_pid() -> Result<()> {
    use std::{
        io::{BufRead, BufReader},
        os::{fd::AsRawFd, unix::process::CommandExt},
        process::{Command, Stdio},
    };
    let shim = stasis_e2e::shim_binary()?;
    // The pause process's lifeline (it exits when our end closes; close-on-exec, so that
    // only the copy made at fd 3 reaches it).
    let (life_read, life_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let life_fd = life_read.as_raw_fd();
    // `unshare --pid` without --fork: the launcher stays outside, its child (the pause
    // process) is PID 1 of the new namespace, as the shim sets it up.
    let mut cmd = Command::new("unshare");
    cmd.arg("--pid")
        .arg(&shim)
        .arg("pause")
        .env("STASIS_POD_LAST_PID", "5000")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    // SAFETY: dup2 and fcntl only, between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            // dup2 onto itself would keep close-on-exec: clear it by hand then.
            let ok = if life_fd == 3 {
                libc::fcntl(3, libc::F_SETFD, 0) >= 0
            } else {
                libc::dup2(life_fd, 3) >= 0
            };
            if !ok {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut launcher = cmd.spawn()?;
    drop(life_read);
    let mut line = String::new();
    BufReader::new(launcher.stdout.take().context("stdout")?).read_line(&mut line)?;
    launcher.wait()?;
    ensure!(
        !line.trim().contains(' '),
        "the pause process could not reserve: {line:?}"
    );
    let pause: i32 = line.trim().parse().context("the pause pid")?;
    let probe = Command::new("nsenter")
        .arg(format!("--pid=/proc/{pause}/ns/pid"))
        .args(["sh", "-c", "echo $$"])
        .output()?;
    drop(life_write);
    // The pause process goes with its lifeline (a leak otherwise).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::path::Path::new(&format!("/proc/{pause}")).exists() {
        ensure!(
            std::time::Instant::now() < deadline,
            "pause process {pause} outlived its lifeline"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let next = String::from_utf8_lossy(&probe.stdout).trim().to_string();
    ensure!(
        next == "5001",
        "the first process after the reservation got PID {next:?} (nsenter: {})",
        String::from_utf8_lossy(&probe.stderr).trim()
    );
    Ok(())
}
