//! Pod checkpoint and restore: the shim's Checkpoint service driven by `stasisctl`, real CRI,
//! runc and CRIU.

use std::time::Duration;

use anyhow::{ensure, Result};
use stasis_e2e::{
    cri::{
        container_config, containers_by_name, counter_loop, cri, memory_hog, pod_config,
        pod_freezer_state, read_counter, violations, wait_counter_above, wait_counter_moving,
        wait_ready, wait_tcp_established, TCP_WORKLOAD,
    },
    sampler::{pids_of_exe, Sampler},
    Containerd,
};

/// Which of `ids` have a `runc checkpoint` running for them right now.
fn dumping(ids: &[String]) -> Vec<String> {
    let mut found = Vec::new();
    for pid in pids_of_exe("runc") {
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if !cmd.contains(" checkpoint ") {
            continue;
        }
        for id in ids {
            if cmd.trim_end().ends_with(id.as_str()) && !found.contains(id) {
                found.push(id.clone());
            }
        }
    }
    found
}

// The plain two-container round trip (checkpoint, inspect, restore, counters continue) is
// `tests/tests/backends.rs`, run through every backend with the same code.

fn shared_mount(host: &std::path::Path) -> cri::Mount {
    cri::Mount {
        container_path: "/shared".into(),
        host_path: host.display().to_string(),
        ..Default::default()
    }
}

/// A container config that keeps `/shared` (a pod volume) in its checkpoints.
fn with_volume(mut cfg: cri::ContainerConfig, host: &std::path::Path) -> cri::ContainerConfig {
    cfg.mounts.push(shared_mount(host));
    cfg.annotations
        .insert("io.stasis.checkpoint.volumes".into(), "/shared".into());
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_live_pod_checkpoints_restore_consistently() -> Result<()> {
    let c = Containerd::start("podck-twenty")?;
    let image = c.import_busybox_for_cri()?;
    let mut cri = c.cri().await?;
    let vol = c.dir.join("shared-volume");
    std::fs::create_dir_all(&vol)?;
    let pod = pod_config("chain", &c.dir.join("logs"));
    let mut pod_id = cri.run_pod(&pod).await?;
    let rootfs_id = cri
        .run_container(
            &pod_id,
            &pod,
            container_config("rootfs", image, &["sh", "-c", &counter_loop("/counter")]),
        )
        .await?;
    cri.run_container(
        &pod_id,
        &pod,
        with_volume(
            container_config(
                "volume",
                image,
                &["sh", "-c", &counter_loop("/shared/counter")],
            ),
            &vol,
        ),
    )
    .await?;
    for (_, id, _) in containers_by_name(&mut cri, &pod_id).await? {
        let file = if id == rootfs_id {
            "/counter"
        } else {
            "/shared/counter"
        };
        wait_counter_moving(&mut cri, &id, file).await?;
    }
    for round in 0..20 {
        let names = containers_by_name(&mut cri, &pod_id).await?;
        let mut before = std::collections::HashMap::new();
        for (name, id, _) in &names {
            let file = if name == "volume" {
                "/shared/counter"
            } else {
                "/counter"
            };
            before.insert(name.clone(), read_counter(&mut cri, id, file).await?);
        }
        let archive = c.dir.join(format!("chain-{round}.tar"));
        c.stasisctl_ok(&[
            "pod",
            "checkpoint",
            &pod_id,
            "--leave-running",
            "--output",
            archive.to_str().unwrap(),
        ])?;
        cri.stop_and_remove_pod(&pod_id).await?;
        // The volume directory still holds what the pod wrote: replacing it is asked for.
        pod_id = c
            .stasisctl_ok(&[
                "pod",
                "restore",
                archive.to_str().unwrap(),
                "--replace-volumes",
            ])?
            .trim()
            .to_string();
        std::fs::remove_file(&archive)?;
        let restored = containers_by_name(&mut cri, &pod_id).await?;
        ensure!(restored.len() == 2, "round {round}: restored {restored:?}");
        for (name, id, state) in &restored {
            ensure!(
                *state == cri::ContainerState::ContainerRunning as i32,
                "round {round}: {name} not running"
            );
            let file = if name == "volume" {
                "/shared/counter"
            } else {
                "/counter"
            };
            let now = read_counter(&mut cri, id, file).await?;
            ensure!(
                now >= before[name],
                "round {round}: {name} counter {now} < {}",
                before[name]
            );
            // And it runs on: a restored container left stopped would pass the check above.
            wait_counter_above(&mut cri, id, file, now).await?;
            let v = violations(&mut cri, id).await?;
            ensure!(v.is_empty(), "round {round}: {name} violations: {v}");
        }
    }
    cri.stop_and_remove_pod(&pod_id).await?;
    c.finish()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_instant_for_the_whole_pod() -> Result<()> {
    one_instant("podck-instant", "stasis").await
}

/// gVisor saves the whole sandbox itself; the same cross-container property must hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_instant_for_the_whole_pod_under_gvisor() -> Result<()> {
    one_instant("podck-instant-gvisor", "stasis-gvisor").await
}

/// A counts and publishes each value on a shared volume; B copies what it reads into its own
/// memory and rootfs and logs any value going backwards. If the pod were not captured at one
/// instant, B could hold a value A had not reached yet in the checkpoint: the archive would
/// show it (runc: B's rootfs copy ahead of A's captured volume), and after a restore A would
/// publish smaller values than B last saw, which B logs.
async fn one_instant(name: &str, handler: &str) -> Result<()> {
    let gvisor = handler == "stasis-gvisor";
    let c = Containerd::start(name)?;
    let image = c.import_busybox_for_cri()?;
    let mut cri = c.cri().await?;
    let vol = c.dir.join("shared");
    std::fs::create_dir_all(&vol)?;
    let pod = pod_config("instant", &c.dir.join("logs"));
    let pod_id = cri.run_pod_with(&pod, handler).await?;
    // Values are renamed into place, so a capture always holds a whole number.
    let a = "i=0; while true; do i=$((i+1)); echo $i > /shared/a.tmp; mv /shared/a.tmp /shared/a; sleep 0.005; done";
    let b = "last=0; while true; do v=$(cat /shared/a 2>/dev/null); \
             if [ -n \"$v\" ]; then if [ \"$v\" -lt \"$last\" ]; then echo \"went back: $v < $last\" >> /violations; fi; \
             last=$v; echo $v > /seen.tmp; mv /seen.tmp /seen; fi; sleep 0.003; done";
    let a_id = cri
        .run_container(
            &pod_id,
            &pod,
            with_volume(container_config("a", image, &["sh", "-c", a]), &vol),
        )
        .await?;
    cri.run_container(
        &pod_id,
        &pod,
        with_volume(container_config("b", image, &["sh", "-c", b]), &vol),
    )
    .await?;
    let rounds = if gvisor { 2 } else { 5 };
    for round in 0..rounds {
        // A publishes before each checkpoint (its counter moves).
        let start = read_counter(&mut cri, &a_id, "/shared/a").await?;
        wait_counter_above(&mut cri, &a_id, "/shared/a", start + 20).await?;
        let archive = c.dir.join(format!("instant-{round}.tar"));
        c.stasisctl_ok(&[
            "pod",
            "checkpoint",
            "instant",
            "--leave-running",
            "--output",
            archive.to_str().unwrap(),
        ])?;
        if !gvisor {
            check_archive_instant(&c, &archive, round)?;
        }
        if round == rounds - 1 {
            // The original shares the volume's host directory: it must be gone first.
            cri.stop_and_remove_pod(&pod_id).await?;
            restore_and_check_b(&c, &mut cri, &archive, handler, round).await?;
        }
    }
    c.finish()
}

/// runc: B's copy on its rootfs (in rootfs-diff.tar) never exceeds A's value on the volume
/// (in the volume capture), and both are there.
fn check_archive_instant(c: &Containerd, archive: &std::path::Path, round: usize) -> Result<()> {
    let unpack = c.dir.join(format!("instant-{round}"));
    std::fs::create_dir_all(&unpack)?;
    tar::Archive::new(std::fs::File::open(archive)?).unpack(&unpack)?;
    let opts: serde_json::Value =
        serde_json::from_slice(&std::fs::read(unpack.join("pod.options"))?)?;
    let dir_of = |n: &str| unpack.join(opts["containers"][n].as_str().unwrap_or_default());
    let mut seen = String::new();
    let mut diff = tar::Archive::new(std::fs::File::open(dir_of("b").join("rootfs-diff.tar"))?);
    for e in diff.entries()? {
        let mut e = e?;
        if e.path()?.to_string_lossy() == "seen" {
            std::io::Read::read_to_string(&mut e, &mut seen)?;
        }
    }
    let mut a_value = String::new();
    let mut vol_tar = tar::Archive::new(std::fs::File::open(
        dir_of("a").join("checkpoint/volumes/0.tar"),
    )?);
    for e in vol_tar.entries()? {
        let mut e = e?;
        if e.path()?.to_string_lossy().trim_start_matches("./") == "a" {
            std::io::Read::read_to_string(&mut e, &mut a_value)?;
        }
    }
    // Both values must be there: a missing one would make the comparison meaningless.
    let seen: u64 = seen.trim().parse().map_err(|_| {
        anyhow::anyhow!(
            "round {round}: B's /seen missing or not a number in its rootfs diff: {seen:?}"
        )
    })?;
    let a_value: u64 = a_value.trim().parse().map_err(|_| {
        anyhow::anyhow!(
            "round {round}: A's value missing or not a number in the volume capture: {a_value:?}"
        )
    })?;
    ensure!(seen > 0, "round {round}: B never copied a value");
    ensure!(
        seen <= a_value,
        "round {round}: B had copied {seen} but A's captured value is {a_value}"
    );
    std::fs::remove_dir_all(&unpack)?;
    Ok(())
}

/// Restores the archive as a new pod, lets A publish a while, and requires that B never saw a
/// value go backwards (A's restored memory behind B's), then removes the new pod.
async fn restore_and_check_b(
    c: &Containerd,
    cri: &mut stasis_e2e::cri::CriClient,
    archive: &std::path::Path,
    handler: &str,
    round: usize,
) -> Result<()> {
    let new_pod = c
        .stasisctl_ok(&[
            "pod",
            "restore",
            archive.to_str().unwrap(),
            "--name",
            &format!("instant-restored-{round}"),
            "--runtime-handler",
            handler,
            "--replace-volumes",
        ])?
        .trim()
        .to_string();
    let restored = containers_by_name(cri, &new_pod).await?;
    let a = restored
        .iter()
        .find(|(n, _, _)| n == "a")
        .map(|(_, id, _)| id.clone())
        .ok_or_else(|| anyhow::anyhow!("no container a after restore: {restored:?}"))?;
    let now = read_counter(cri, &a, "/shared/a").await?;
    wait_counter_above(cri, &a, "/shared/a", now + 50).await?;
    for (name, id, _) in &restored {
        let v = violations(cri, id).await?;
        ensure!(v.is_empty(), "round {round}: {name} after restore: {v}");
    }
    cri.stop_and_remove_pod(&new_pod).await?;
    Ok(())
}

/// The containers of a pod are dumped in parallel: seen from outside, both containers'
/// `runc checkpoint` processes are alive at one instant (each dump has real memory to write).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_are_dumped_in_parallel() -> Result<()> {
    let c = Containerd::start("podck-parallel")?;
    let image = c.import_busybox_for_cri()?;
    let mut cri = c.cri().await?;
    let pod = pod_config("parallel", &c.dir.join("logs"));
    let pod_id = cri.run_pod(&pod).await?;
    let hog = memory_hog(96);
    let mut ids = Vec::new();
    for n in ["one", "two"] {
        ids.push(
            cri.run_container(
                &pod_id,
                &pod,
                container_config(n, image, &["sh", "-c", &hog]),
            )
            .await?,
        );
    }
    for id in &ids {
        wait_ready(&mut cri, id, "/ready", Duration::from_secs(30)).await?;
    }
    let archive = c.dir.join("parallel.tar");
    let watched = ids.clone();
    let sampler = Sampler::start(Duration::from_millis(2), move || dumping(&watched));
    c.stasisctl_ok(&[
        "pod",
        "checkpoint",
        "parallel",
        "--leave-running",
        "--output",
        archive.to_str().unwrap(),
    ])?;
    let samples = sampler.stop();
    let most = samples.iter().map(|(_, d)| d.len()).max().unwrap_or(0);
    let seen: std::collections::BTreeSet<&String> =
        samples.iter().flat_map(|(_, d)| d.iter()).collect();
    ensure!(
        seen.len() == 2,
        "the dumps of both containers were not both seen ({} samples): {seen:?}",
        samples.len()
    );
    ensure!(
        most == 2,
        "the two containers' dumps never ran at the same instant ({} samples): not parallel",
        samples.len()
    );
    cri.stop_and_remove_pod(&pod_id).await?;
    c.finish()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_checkpoint_and_paused_containers() -> Result<()> {
    let c = Containerd::start("podck-stop")?;
    let image = c.import_busybox_for_cri()?;
    let mut cri = c.cri().await?;
    let pod = pod_config("stp", &c.dir.join("logs"));
    let pod_id = cri.run_pod(&pod).await?;
    let p = cri
        .run_container(
            &pod_id,
            &pod,
            container_config("paused", image, &["sh", "-c", &counter_loop("/counter")]),
        )
        .await?;
    let r = cri
        .run_container(
            &pod_id,
            &pod,
            container_config("running", image, &["sh", "-c", &counter_loop("/counter")]),
        )
        .await?;
    let started = read_counter(&mut cri, &p, "/counter").await?;
    wait_counter_above(&mut cri, &p, "/counter", started).await?;
    // CRI has no pause; the Task API does (this is what `ctr t pause` sends to the shim).
    let ctr = |args: &[&str]| {
        std::process::Command::new("ctr")
            .arg("--address")
            .arg(c.socket())
            .args(["-n", "k8s.io"])
            .args(args)
            .output()
    };
    ensure!(ctr(&["tasks", "pause", &p])?.status.success(), "pause");
    let live = c.dir.join("live.tar");
    c.stasisctl_ok(&[
        "pod",
        "checkpoint",
        "stp",
        "--leave-running",
        "--output",
        live.to_str().unwrap(),
    ])?;
    // The kernel's word, not the shim's: the freezer state of each container's cgroup (the
    // pod cgroup is /stasis/<pod id>, each container below it).
    let freezer = |id: &str| pod_freezer_state(&pod_id, id);
    ensure!(
        freezer(&p)? == "FROZEN",
        "the paused container after a live checkpoint is {}",
        freezer(&p)?
    );
    ensure!(
        freezer(&r)? == "THAWED",
        "the running container after a live checkpoint is {}",
        freezer(&r)?
    );
    let moved = read_counter(&mut cri, &r, "/counter").await?;
    wait_counter_above(&mut cri, &r, "/counter", moved).await?;
    ensure!(ctr(&["tasks", "resume", &p])?.status.success(), "resume");

    // Without --leave-running the containers stop; the restore brings them back running.
    let before = read_counter(&mut cri, &r, "/counter").await?;
    let stopped = c.dir.join("stopped.tar");
    c.stasisctl_ok(&[
        "pod",
        "checkpoint",
        "stp",
        "--output",
        stopped.to_str().unwrap(),
    ])?;
    let mut exited = false;
    for _ in 0..50 {
        let states: Vec<i32> = containers_by_name(&mut cri, &pod_id)
            .await?
            .into_iter()
            .map(|x| x.2)
            .collect();
        if states
            .iter()
            .all(|s| *s == cri::ContainerState::ContainerExited as i32)
        {
            exited = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ensure!(
        exited,
        "containers still running after a stopping checkpoint"
    );
    cri.stop_and_remove_pod(&pod_id).await?;
    let new_pod = c
        .stasisctl_ok(&["pod", "restore", stopped.to_str().unwrap()])?
        .trim()
        .to_string();
    for (name, id, state) in containers_by_name(&mut cri, &new_pod).await? {
        ensure!(
            state == cri::ContainerState::ContainerRunning as i32,
            "{name} not running after restore"
        );
        if name == "running" {
            let now = read_counter(&mut cri, &id, "/counter").await?;
            ensure!(now >= before, "counter {now} < {before}");
        }
    }
    cri.stop_and_remove_pod(&new_pod).await?;
    c.finish()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_dump_fails_the_pod_checkpoint_cleanly() -> Result<()> {
    let c = Containerd::start("podck-fail")?;
    let image = c.import_busybox_for_cri()?;
    let mut cri = c.cri().await?;
    let pod = pod_config("fl", &c.dir.join("logs"));
    let pod_id = cri.run_pod(&pod).await?;
    let mut ids = Vec::new();
    for (name, cmd) in [
        ("one", counter_loop("/counter")),
        ("tcp", TCP_WORKLOAD.to_string()),
        ("three", counter_loop("/counter")),
    ] {
        ids.push(
            cri.run_container(
                &pod_id,
                &pod,
                container_config(name, image, &["sh", "-c", &cmd]),
            )
            .await?,
        );
    }
    wait_tcp_established(&mut cri, &ids[1]).await?;
    for id in [&ids[0], &ids[2]] {
        wait_counter_moving(&mut cri, id, "/counter").await?;
    }
    let archive = c.dir.join("fail.tar");
    let out = c.stasisctl(&[
        "pod",
        "checkpoint",
        "fl",
        "--leave-running",
        "--output",
        archive.to_str().unwrap(),
    ])?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "checkpoint should fail");
    ensure!(
        err.contains("tcp") && err.contains(&ids[1]),
        "error does not name the failing container: {err}"
    );
    ensure!(err.contains("CRIU"), "error lacks CRIU's reason: {err}");
    ensure!(!archive.exists(), "an archive was left at --output");
    let leftovers: Vec<_> = std::fs::read_dir(&c.dir)?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("fail.tar"))
        .collect();
    ensure!(leftovers.is_empty(), "partial files left: {leftovers:?}");
    for id in &ids {
        ensure!(
            cri.container_status(id).await?.state == cri::ContainerState::ContainerRunning as i32,
            "{id} not running"
        );
        let state = pod_freezer_state(&pod_id, id)?;
        ensure!(state == "THAWED", "{id} left {state}");
    }
    // It still counts.
    wait_counter_moving(&mut cri, &ids[0], "/counter").await?;
    cri.stop_and_remove_pod(&pod_id).await?;
    c.finish()
}
