//! Faults during a checkpoint: whatever ends it, the pod is left running and thawed, nothing of
//! the runtime or CRIU keeps working on it, and nothing is left at or beside the output.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use stasis_e2e::{
    cri::{
        container_config, counter_loop, memory_hog, pod_config, pod_freezer_state,
        wait_counter_moving, wait_ready, CriClient,
    },
    sampler::{pids_of_exe, Sampler},
    Containerd,
};

/// The ending every fault test shares: each of `ids` is THAWED, the counter in `counter_id`
/// moves, then the pod is stopped and removed.
async fn expect_pod_runs_on(
    cri: &mut CriClient,
    pod_id: &str,
    ids: &[&str],
    counter_id: &str,
) -> Result<()> {
    for id in ids {
        let state = pod_freezer_state(pod_id, id)?;
        ensure!(state == "THAWED", "{id} is {state}");
    }
    wait_counter_moving(cri, counter_id, "/counter").await?;
    cri.stop_and_remove_pod(pod_id).await
}

/// A pod of two containers: one holding `mib` MiB of touched memory (its dump takes a while:
/// about 250 MB/s here), one running the counter loop; returns once both run.
async fn hog_and_counter_pod(
    c: &Containerd,
    cri: &mut CriClient,
    image: &str,
    name: &str,
    mib: u64,
) -> Result<(String, String, String)> {
    let logs = c.dir.join("logs");
    stasis_e2e::cri::hog_and_counter_pod(cri, &logs, image, name, &memory_hog(mib)).await
}

/// The tests of this file look at runc and CRIU host-wide: they run one at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Processes of runc or CRIU still running (any, on this host: these tests run alone).
fn runtime_helpers() -> Vec<String> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let exe = std::fs::read_link(e.path().join("exe")).unwrap_or_default();
        let name = exe.file_name().map(|n| n.to_string_lossy().into_owned());
        if let Some(n) = name.filter(|n| n == "criu" || n == "runc") {
            let cmd = std::fs::read(e.path().join("cmdline"))
                .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
                .unwrap_or_default();
            if cmd.contains("checkpoint") || n == "criu" {
                found.push(format!("{} {n}: {cmd}", e.file_name().to_string_lossy()));
            }
        }
    }
    found
}

/// A container of many processes: CRIU's work grows with each (seize, parasite, images), so
/// a dump of it outlasts a one-second bound on any machine, whatever its memory bandwidth.
const SWARM: &str = "i=0; while [ $i -lt 1500 ]; do sleep 100000 & i=$((i+1)); done; \
                     echo ready > /ready; wait";

/// What the sampler records during a timed-out checkpoint: each container's freezer state and
/// the CRIU processes alive at that instant.
type Look = (Vec<String>, Vec<i32>);

/// A checkpoint past its bound: the call fails saying so, CRIU is stopped before any
/// container is thawed (watched every few milliseconds while the call runs, not judged by
/// the end state), and the pod runs on thawed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_pod_checkpoint_stops_criu_and_leaves_the_pod_thawed() -> Result<()> {
    let _alone = ONE_AT_A_TIME.lock().await;
    let c = Containerd::start("fault-timeout")?;
    let image = c.import_busybox_for_cri()?;
    let mut cri = c.cri().await?;
    let (pod_id, big_id, counter_id) =
        hog_and_counter_pod(&c, &mut cri, image, "slow", 1024).await?;
    let pod = pod_config("slow", &c.dir.join("logs"));
    let swarm_id = cri
        .run_container(
            &pod_id,
            &pod,
            container_config("swarm", image, &["sh", "-c", SWARM]),
        )
        .await?;
    wait_ready(&mut cri, &swarm_id, "/ready", Duration::from_secs(120)).await?;
    let ids = [big_id.clone(), counter_id.clone(), swarm_id.clone()];

    let out_dir = c.dir.join("out");
    std::fs::create_dir_all(&out_dir)?;
    let archive = out_dir.join("slow.tar");
    let (watch_pod, watch_ids) = (pod_id.clone(), ids.clone());
    let sampler = Sampler::start(Duration::from_millis(2), move || -> Look {
        let states = watch_ids
            .iter()
            .map(|id| pod_freezer_state(&watch_pod, id).unwrap_or_default())
            .collect();
        (states, pids_of_exe("criu"))
    });
    let started = Instant::now();
    let out = c.stasisctl(&[
        "pod",
        "checkpoint",
        "slow",
        "--leave-running",
        "--timeout",
        "1",
        "--output",
        archive.to_str().unwrap(),
    ])?;
    let took = started.elapsed();
    let samples = sampler.stop();
    eprintln!(
        "timed-out checkpoint returned after {took:?}; {} samples",
        samples.len()
    );
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success(),
        "the checkpoint did not time out ({took:?})"
    );
    ensure!(
        err.contains("timed out after 1 s"),
        "the error does not say it timed out: {err}"
    );
    // The bound was reached inside the dump: CRIU was seen at work during the call. (CRIU
    // thaws a frozen cgroup itself once it has seized its tasks, so "CRIU alive" with a
    // container THAWED is normal; what must hold is that none outlives the call, below.)
    ensure!(
        samples.iter().any(|(_, (_, criu))| !criu.is_empty()),
        "no CRIU was ever seen running: the bound was not reached inside the dump"
    );
    let (_, (states, criu)) = samples.last().context("no samples")?;
    ensure!(
        criu.is_empty() && states.iter().all(|s| s == "THAWED"),
        "right after the call: CRIU {criu:?}, containers {states:?}"
    );
    // When the call returns, runc and CRIU are gone already (killed and waited for).
    let helpers = runtime_helpers();
    ensure!(
        helpers.is_empty(),
        "runtime helpers still running: {helpers:?}"
    );
    let left: Vec<_> = std::fs::read_dir(&out_dir)?
        .flatten()
        .map(|e| e.path())
        .collect();
    ensure!(left.is_empty(), "files at or beside --output: {left:?}");
    // And it stays so: never frozen again, both containers run, for a while.
    let watch_until = Instant::now() + Duration::from_secs(15);
    while Instant::now() < watch_until {
        for id in &ids {
            let state = pod_freezer_state(&pod_id, id)?;
            ensure!(state == "THAWED", "{id} is {state} after the timeout");
        }
        ensure!(runtime_helpers().is_empty(), "a runtime helper came back");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    wait_counter_moving(&mut cri, &counter_id, "/counter").await?;
    ensure!(
        cri.exec(&big_id, &["true"]).await?.0 == 0,
        "the big container does not answer"
    );
    // The same pod checkpoints fine with time enough.
    let ok = c.stasisctl(&[
        "pod",
        "checkpoint",
        "slow",
        "--leave-running",
        "--output",
        archive.to_str().unwrap(),
    ])?;
    ensure!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    cri.stop_and_remove_pod(&pod_id).await?;
    c.finish()
}

/// Writes zeros into a new file at `path` until its file system is full (a file in a
/// subdirectory: the interceptor holding the archive's creation watches only the top).
fn fill_up(path: &std::path::Path) {
    use std::io::Write;
    let Ok(mut f) = std::fs::File::create(path) else {
        return;
    };
    let block = vec![0u8; 1 << 20];
    while f.write_all(&block).is_ok() {}
    // The last partial block: byte by byte up to the very end.
    while f.write_all(&[0]).is_ok() {}
}

/// A full disk while the images are written (the output's file system holds the staging
/// directory) and while the archive is packaged: the checkpoint fails saying so, the pod runs
/// on thawed, and nothing is left on that file system.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_the_checkpoint_cleanly() -> Result<()> {
    let _alone = ONE_AT_A_TIME.lock().await;
    let c = Containerd::start("fault-enospc")?;
    let image = c.import_busybox_for_cri()?;
    let mut cri = c.cri().await?;
    let (pod_id, big_id, counter_id) = hog_and_counter_pod(&c, &mut cri, image, "full", 64).await?;
    // 16 MiB: the dump itself runs out of space. 100 MiB: the dump fits; the file system is
    // filled up the moment the archive file is created (written in place of the staged copy,
    // file by file, the archive alone might fit). A stopping checkpoint holds the pod frozen until
    // its archive is safe: it never is here, so the pod runs on. The early estimate would
    // refuse the 16 MiB ones; it is skipped to reach the late faults, and checked on its own
    // last (60 MiB: less than the hog's memory alone).
    for (size, phase, stopping) in [
        ("16m", "dump", false),
        ("16m", "dump", true),
        ("100m", "packaging", false),
        ("100m", "packaging", true),
        ("60m", "estimate", false),
    ] {
        let fs = c.dir.join(format!("small-{phase}-{stopping}"));
        std::fs::create_dir_all(&fs)?;
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&fs)
            .status()?;
        ensure!(mounted.success(), "mount a {size} tmpfs");
        let archive = fs.join("full.tar");
        let mut args = vec![
            "pod",
            "checkpoint",
            "full",
            "--output",
            archive.to_str().unwrap(),
        ];
        if !stopping {
            args.push("--leave-running");
        }
        if phase != "estimate" {
            args.push("--skip-space-check");
        }
        let filler = fs.join("filler");
        let fill = if phase == "packaging" {
            std::fs::create_dir(&filler)?;
            let zeros = filler.join("zeros");
            Some(stasis_e2e::fanotify::OpenInterceptor::start_matching(
                &fs,
                |n| n.starts_with(".full.tar.partial-"),
                move |_| fill_up(&zeros),
            )?)
        } else {
            None
        };
        let out = c.stasisctl(&args)?;
        if let Some(fill) = fill {
            let filled = fill.stop()?;
            ensure!(filled == 1, "the archive file was created {filled} time(s)");
            std::fs::remove_dir_all(&filler)?;
        }
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        eprintln!("{phase} (stopping: {stopping}): {err}");
        let left: Vec<_> = std::fs::read_dir(&fs)?
            .flatten()
            .map(|e| e.path())
            .collect();
        let _ = std::process::Command::new("umount").arg(&fs).status();
        ensure!(
            !out.status.success(),
            "{phase}: the checkpoint succeeded on a full disk"
        );
        // Which step ran out of space, and where, said exactly.
        let said = match phase {
            // The shim's dump of the big container: CRIU's own ENOSPC, with the container.
            // The dumps run in parallel: whichever container's dump meets the full disk first
            // is the one named.
            "dump" => {
                // CRIU's own "No space left on device", or, when only a helper of CRIU (tar of
                // a tmpfs) met the full disk and CRIU says just "exited", the shim's ENOSPC
                // naming the dump's file system.
                // The full disk may also be met by the shim's capture of a writable layer,
                // which names the container by id and the file it was writing.
                let named = err.contains("container big (")
                    || err.contains("container counter (")
                    || err.contains(&format!("{big_id}: "))
                    || err.contains(&format!("{counter_id}: "));
                named
                    && (err.contains("dump failed") || err.contains("rootfs-diff.tar"))
                    && (err.contains("No space left on device")
                        || err.contains(&format!(
                            "no space left on the file system of {}/.full.tar.stasis-",
                            fs.display()
                        )))
            }
            // stasisctl writing the archive, after every dump succeeded.
            "packaging" => {
                !err.contains("dump failed")
                    && err.contains(&format!(
                        "no space left on the file system of {}; nothing was left there",
                        archive.display()
                    ))
            }
            _ => {
                err.contains("the checkpoint needs ~")
                    && err.contains(&format!("on the file system of {}", fs.display()))
                    && err.contains("it has 60.0 MiB free")
            }
        };
        ensure!(
            said,
            "{phase}: the error does not say that this step ran out of space: {err}"
        );
        if stopping {
            ensure!(
                err.contains("runs on"),
                "{phase}: the stopping checkpoint does not say the pod runs on: {err}"
            );
        }
        ensure!(
            left.is_empty(),
            "{phase}: files left on the full file system: {left:?}"
        );
        for id in [&big_id, &counter_id] {
            let state = pod_freezer_state(&pod_id, id)?;
            ensure!(state == "THAWED", "{phase}: {id} is {state}");
        }
        ensure!(
            runtime_helpers().is_empty(),
            "{phase}: runtime helpers left"
        );
        wait_counter_moving(&mut cri, &counter_id, "/counter").await?;
    }
    cri.stop_and_remove_pod(&pod_id).await?;
    c.finish()
}

/// The pod's shim SIGKILLed, at rest and in the middle of a checkpoint (containers frozen,
/// CRIU dumping): once the pod is stopped and removed through CRI, nothing of it is left, no
/// cgroup frozen (the harness's leak check covers processes, mounts, cgroups in every
/// hierarchy, sockets and runtime state).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_pod_shim_leaves_nothing_once_the_pod_is_removed() -> Result<()> {
    let _alone = ONE_AT_A_TIME.lock().await;
    let c = Containerd::start("fault-shimkill")?;
    let image = c.import_busybox_for_cri()?;
    let mut cri = c.cri().await?;
    // At rest; while CRIU dumps (containers frozen); and while stasisctl packages the archive
    // of a stopping checkpoint (containers held frozen until the archive is safe).
    for name in ["idle", "dumping", "holding"] {
        let (pod_id, big_id, _) = hog_and_counter_pod(&c, &mut cri, image, name, 1024).await?;
        let shim = stasis_e2e::processes_matching(&[
            "containerd-shim-stasis-v2",
            &c.socket().display().to_string(),
            &format!("-id {pod_id} "),
        ]);
        ensure!(shim.len() == 1, "the pod's shim: {shim:?}");
        let mut checkpoint = None;
        let out_dir = c.dir.join(format!("out-{name}"));
        std::fs::create_dir_all(&out_dir)?;
        let archive = out_dir.join(format!("{name}.tar"));
        // How many of the pod's containers are frozen and whether CRIU runs, from before the
        // checkpoint to the kill: the shim must die in the middle, not after a thaw.
        let watched_pod = pod_id.clone();
        let sampler = Sampler::start(Duration::from_millis(2), move || {
            (
                stasis_e2e::cri::pod_frozen_containers(&watched_pod).len(),
                !pids_of_exe("criu").is_empty(),
            )
        });
        if name != "idle" {
            let mut cmd = c.stasisctl_command()?;
            cmd.args(["pod", "checkpoint", name, "--output"])
                .arg(&archive)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped());
            if name == "dumping" {
                cmd.arg("--leave-running");
            }
            checkpoint = Some(cmd.spawn()?);
        }
        if name == "dumping" {
            // The big container's dump, not the counter's short one: its runc checkpoint runs
            // and a CRIU is at work.
            let deadline = Instant::now() + Duration::from_secs(30);
            // CRIU itself, the child of big's `runc checkpoint` (the counter's CRIU, or the
            // moment before runc starts big's, would end before the kill).
            let big_dumping = || {
                let runc: Vec<i32> = pids_of_exe("runc")
                    .into_iter()
                    .filter(|p| {
                        let cmd = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
                        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
                        cmd.contains(" checkpoint ") && cmd.contains(&big_id)
                    })
                    .collect();
                pids_of_exe("criu").into_iter().any(|p| {
                    let status = std::fs::read_to_string(format!("/proc/{p}/status"));
                    status.unwrap_or_default().lines().any(|l| {
                        l.strip_prefix("PPid:")
                            .and_then(|v| v.trim().parse::<i32>().ok())
                            .is_some_and(|pp| runc.contains(&pp))
                    })
                })
            };
            while !big_dumping() {
                ensure!(
                    Instant::now() < deadline,
                    "the big container's dump never began"
                );
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        if name == "holding" {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let packaging = std::fs::read_dir(&out_dir)?
                    .flatten()
                    .any(|e| e.file_name().to_string_lossy().contains(".partial-"));
                if packaging {
                    break;
                }
                ensure!(
                    Instant::now() < deadline,
                    "stasisctl never started packaging"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        // (The sampler's last look comes after this stop returns, before the kill.)
        let samples = sampler.stop();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(shim[0]),
            nix::sys::signal::Signal::SIGKILL,
        )?;
        let (_, (frozen_at_kill, criu_at_kill)) = *samples.last().context("no samples")?;
        match name {
            "dumping" => {
                ensure!(
                    samples.iter().any(|(_, (frozen, _))| *frozen == 2),
                    "dumping: the two containers were never seen frozen together"
                );
                // In the middle: CRIU still at work, or its dump just done but the pod not
                // yet thawed (this machine dumps fast; the kill can come a moment late).
                ensure!(
                    criu_at_kill || frozen_at_kill == 2,
                    "dumping: CRIU was no longer running and the pod already thawed at the kill"
                );
            }
            "holding" => ensure!(
                frozen_at_kill == 2,
                "holding: {frozen_at_kill} of 2 containers frozen at the kill"
            ),
            _ => ensure!(
                frozen_at_kill == 0 && !criu_at_kill,
                "idle: {frozen_at_kill} frozen, CRIU running: {criu_at_kill}"
            ),
        }
        if let Some(child) = checkpoint {
            let out = child.wait_with_output()?;
            let err = String::from_utf8_lossy(&out.stderr);
            eprintln!("{name}: checkpoint with its shim killed: {err}");
            ensure!(
                !out.status.success(),
                "the checkpoint succeeded although its shim died"
            );
            if name == "holding" {
                // The archive was safe before anything was to be stopped: it stays, complete.
                ensure!(
                    err.contains("is complete"),
                    "holding: stasisctl does not say the archive is complete: {err}"
                );
                stasis_controller::archive::inspect(&archive)?;
            }
        }
        // Before anybody removes the pod: containerd's clean-up of the dead shim (`delete`)
        // thaws what the checkpoint froze, on its own.
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let frozen = stasis_e2e::cri::pod_frozen_containers(&pod_id);
            if frozen.is_empty() {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "{name}: containers still frozen 15 s after their shim died: {frozen:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        remove_pod_of_a_gone_shim(&mut cri, &pod_id, name).await?;
    }
    c.finish()
}

/// What kubelet does with a pod whose shim is gone: stop and remove it, retrying while
/// containerd is still taking note of the dead shim.
async fn remove_pod_of_a_gone_shim(
    cri: &mut stasis_e2e::cri::CriClient,
    pod_id: &str,
    name: &str,
) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match cri.stop_and_remove_pod(pod_id).await {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() < deadline => {
                eprintln!("{name}: retrying stop/remove: {e:#}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e.context(format!("{name}: stop and remove the pod"))),
        }
    }
}

/// A shim asked to exit (SIGTERM, as on a node's shutdown) while CRIU dumps its pod: it
/// finishes the checkpoint first (alive in every sample in which CRIU is), so the archive is
/// complete and restores, and only then exits; nothing is left frozen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shim_asked_to_exit_finishes_its_checkpoint_first() -> Result<()> {
    let _alone = ONE_AT_A_TIME.lock().await;
    let c = Containerd::start("fault-shimterm")?;
    let image = c.import_busybox_for_cri()?;
    let mut cri = c.cri().await?;
    let (pod_id, _, counter_id) = hog_and_counter_pod(&c, &mut cri, image, "leaving", 512).await?;
    let token = stasis_e2e::cri::memory_token(&mut cri, &counter_id, "/counter").await?;
    let shim = stasis_e2e::processes_matching(&[
        "containerd-shim-stasis-v2",
        &c.socket().display().to_string(),
        &format!("-id {pod_id} "),
    ]);
    ensure!(shim.len() == 1, "the pod's shim: {shim:?}");
    let shim_proc = std::path::PathBuf::from(format!("/proc/{}", shim[0]));
    // The shim runs in the sandbox bundle, where `start` left its address.
    let bundle = std::fs::read_link(shim_proc.join("cwd"))?;
    let address =
        std::fs::read_to_string(bundle.join("address")).context("the pod shim's address")?;
    let socket = address.trim().trim_start_matches("unix://").to_string();
    let watched = shim_proc.clone();
    let sampler = Sampler::start(Duration::from_millis(2), move || {
        (!pids_of_exe("criu").is_empty(), watched.exists())
    });
    let archive = c.dir.join("leaving.tar");
    let checkpoint = checkpoint_in_background(&c, "leaving", &archive)?;
    wait_for_criu().await?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(shim[0]),
        nix::sys::signal::Signal::SIGTERM,
    )?;
    let out = checkpoint.wait_with_output()?;
    let done = Instant::now();
    let deadline = done + Duration::from_secs(60);
    let mut still_open = None;
    while shim_proc.exists() {
        ensure!(
            Instant::now() < deadline,
            "the shim did not exit within 60 s of SIGTERM"
        );
        // containerd's `delete` runs as soon as the shim's connections close and cleans up
        // only when nothing answers on the socket: an exiting shim must stop answering first.
        if done.elapsed() > Duration::from_millis(500)
            && std::os::unix::net::UnixStream::connect(&socket).is_ok()
        {
            still_open.get_or_insert(done.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if let Some(after) = still_open {
        anyhow::bail!(
            "the exiting shim still took connections {after:?} after its checkpoint was done"
        );
    }
    let samples = sampler.stop();
    ensure!(
        out.status.success(),
        "the checkpoint failed although its shim was only asked to exit: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dumping: Vec<_> = samples.iter().filter(|(_, (criu, _))| *criu).collect();
    ensure!(!dumping.is_empty(), "CRIU was never seen");
    ensure!(
        dumping.iter().all(|(_, (_, shim_alive))| *shim_alive),
        "the shim exited while CRIU was still dumping"
    );
    ensure!(
        !samples.last().context("no samples")?.1 .1,
        "the shim never exited"
    );
    let frozen = stasis_e2e::cri::pod_frozen_containers(&pod_id);
    ensure!(
        frozen.is_empty(),
        "frozen after the shim's exit: {frozen:?}"
    );
    remove_pod_of_a_gone_shim(&mut cri, &pod_id, "leaving").await?;
    // The archive is whole: the pod comes back from it, memory included.
    let restored = c
        .stasisctl_ok(&["pod", "restore", archive.to_str().unwrap()])?
        .trim()
        .to_string();
    let counter = stasis_e2e::cri::containers_by_name(&mut cri, &restored)
        .await?
        .into_iter()
        .find(|(name, _, _)| name == "counter")
        .context("no counter container in the restored pod")?
        .1;
    let now = stasis_e2e::cri::memory_token(&mut cri, &counter, "/counter").await?;
    ensure!(
        now == token,
        "memory token {now} is not the checkpointed {token}"
    );
    cri.stop_and_remove_pod(&restored).await?;
    c.finish()
}

/// stasisctl interrupted in the middle of a restore (a container restored and held, the rest
/// not yet): SIGINT removes the half-restored pod and the unpacked checkpoint; after SIGKILL
/// its watchdog does. (The shim's hold bound, 3 s here, thaws a held container meanwhile.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_restore_leaves_nothing_frozen() -> Result<()> {
    let _alone = ONE_AT_A_TIME.lock().await;
    use std::io::BufRead;
    let c = Containerd::start("fault-restore")?;
    // This test's shims give a restore 3 s to finish (the default is 120 s).
    std::fs::create_dir_all(c.config_dir())?;
    std::fs::write(c.config_dir().join("runc.toml"), "restore_hold_secs = 3\n")?;
    let image = c.import_busybox_for_cri()?;
    let mut cri = c.cri().await?;
    let pod = pod_config("held", &c.dir.join("logs"));
    let pod_id = cri.run_pod(&pod).await?;
    for name in ["one", "two", "three"] {
        let id = cri
            .run_container(
                &pod_id,
                &pod,
                container_config(name, image, &["sh", "-c", &counter_loop("/counter")]),
            )
            .await?;
        wait_counter_moving(&mut cri, &id, "/counter").await?;
    }
    let archive = c.dir.join("held.tar");
    c.stasisctl_ok(&[
        "pod",
        "checkpoint",
        "held",
        "--leave-running",
        "--output",
        archive.to_str().unwrap(),
    ])?;
    cri.stop_and_remove_pod(&pod_id).await?;

    // SIGSTOP: stasisctl is alive but never comes back; the shim's hold bound (3 s here)
    // gives the held container up on its own (stopped, not left frozen), then SIGKILL lets
    // the watchdog clean up as for a plain SIGKILL.
    for signal in [
        nix::sys::signal::Signal::SIGINT,
        nix::sys::signal::Signal::SIGKILL,
        nix::sys::signal::Signal::SIGSTOP,
    ] {
        let mut child = c
            .stasisctl_command()?
            .args(["pod", "restore"])
            .arg(&archive)
            .args(["--name", &format!("held-{signal}")])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        let stderr = child.stderr.take().context("stderr")?;
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                let _ = tx.send(line);
            }
        });
        // Interrupt once the first container is back and held.
        let mut said = Vec::new();
        loop {
            let line = rx
                .recv_timeout(Duration::from_secs(60))
                .with_context(|| format!("{signal}: no container was restored; said {said:?}"))?;
            let held = line.contains("restored container");
            said.push(line);
            if held {
                break;
            }
        }
        let name = format!("held-{signal}");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), signal)?;
        if signal == nix::sys::signal::Signal::SIGSTOP {
            expect_hold_given_up(&mut cri, &name).await?;
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGKILL,
            )?;
        }
        let status = child.wait()?;
        // Everything it printed, up to its end of output.
        let mut rest = Vec::new();
        while let Ok(line) = rx.recv_timeout(Duration::from_secs(5)) {
            rest.push(line);
        }
        ensure!(!status.success(), "{signal}: the restore succeeded");
        let restored = cri.pods().await?.into_iter().find(|p| {
            p.metadata
                .as_ref()
                .is_some_and(|m| m.name == format!("held-{signal}"))
        });
        if signal == nix::sys::signal::Signal::SIGINT {
            ensure!(
                rest.iter()
                    .any(|l| l.contains("interrupted") && l.contains("removed")),
                "SIGINT: stasisctl did not say it removed the pod: {rest:?}"
            );
            ensure!(
                restored.is_none(),
                "SIGINT: the half-restored pod is still there"
            );
            let id = stasis_e2e::restore_id(&said.join("\n")).context("the restore id")?;
            let left = stasis_e2e::restore_leftovers(&id);
            ensure!(
                left.is_empty(),
                "SIGINT: the unpacked checkpoint is left: {left:?}"
            );
        } else {
            // stasisctl could not clean up itself: its watchdog (in its own session) removes
            // the half-restored pod and the unpacked checkpoint.
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let pods = cri.pods().await?;
                let left = pods.iter().any(|p| {
                    p.metadata
                        .as_ref()
                        .is_some_and(|m| m.name == format!("held-{signal}"))
                });
                let unpacked = stasis_e2e::restore_leftovers(
                    &stasis_e2e::restore_id(&said.join("\n")).context("the restore id")?,
                );
                if !left && unpacked.is_empty() {
                    break;
                }
                ensure!(
                    Instant::now() < deadline,
                    "SIGKILL: 30 s later the pod is {} and the work dir holds {unpacked:?}",
                    if left { "still there" } else { "gone" }
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            let mut said = rest;
            while let Ok(line) = rx.recv_timeout(Duration::from_secs(2)) {
                said.push(line);
            }
            ensure!(
                said.iter().any(|l| l.contains("removed the new pod")),
                "SIGKILL: the watchdog did not say it removed the pod: {said:?}"
            );
            let _ = restored;
        }
    }
    c.finish()
}

/// The restored pod `name` has one container held frozen; once the hold bound passes with
/// no FinishRestore, the shim stops it and nothing of the pod stays frozen.
async fn expect_hold_given_up(cri: &mut stasis_e2e::cri::CriClient, name: &str) -> Result<()> {
    let pod_id = cri
        .pods()
        .await?
        .into_iter()
        .find(|p| p.metadata.as_ref().is_some_and(|m| m.name == name))
        .with_context(|| format!("{name}: the restored pod is not there"))?
        .id;
    // (A second container may be coming back already: a request stasisctl sent before it
    // was stopped goes on.)
    let held = stasis_e2e::cri::pod_frozen_containers(&pod_id);
    ensure!(
        !held.is_empty(),
        "{name}: right after the first container came back, none is held frozen"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let frozen = stasis_e2e::cri::pod_frozen_containers(&pod_id);
        let states: Vec<i32> = stasis_e2e::cri::containers_by_name(cri, &pod_id)
            .await?
            .into_iter()
            .map(|(_, _, state)| state)
            .collect();
        let exited = stasis_e2e::cri::cri::ContainerState::ContainerExited as i32;
        let running = stasis_e2e::cri::cri::ContainerState::ContainerRunning as i32;
        if frozen.is_empty() && states.contains(&exited) && !states.contains(&running) {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "{name}: 30 s on, with no FinishRestore and a 3 s hold: frozen {frozen:?}, \
             container states {states:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until CRIU is dumping (somewhere on this host: these tests run alone).
async fn wait_for_criu() -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !runtime_helpers().iter().any(|h| h.contains("criu")) {
        ensure!(Instant::now() < deadline, "CRIU never started dumping");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Waits until no runc or CRIU runs any more.
async fn wait_helpers_gone(within: Duration) -> Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let left = runtime_helpers();
        if left.is_empty() {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "runtime helpers still running: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `stasisctl pod checkpoint POD --leave-running --output ARCHIVE` started in the background.
fn checkpoint_in_background(
    c: &Containerd,
    pod: &str,
    archive: &std::path::Path,
) -> Result<std::process::Child> {
    Ok(c.stasisctl_command()?
        .args(["pod", "checkpoint", pod, "--leave-running", "--output"])
        .arg(archive)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?)
}

/// A caller of the shim's Checkpoint service whose deadline passes in the middle of the dump:
/// the checkpoint is not cut off half-way (nothing stays frozen, CRIU ends), and as nobody
/// will hear of it, the output directory is emptied again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callers_deadline_passing_mid_dump_leaves_the_pod_thawed() -> Result<()> {
    let _alone = ONE_AT_A_TIME.lock().await;
    let c = Containerd::start("fault-deadline")?;
    let image = c.import_busybox_for_cri()?;
    let mut cri = c.cri().await?;
    let (pod_id, big_id, counter_id) =
        hog_and_counter_pod(&c, &mut cri, image, "deadline", 512).await?;
    let out = c.dir.join("deadline-out");
    std::fs::create_dir(&out)?;
    let client = stasis_controller::shim::checkpoint_client(
        &c.socket().display().to_string(),
        "k8s.io",
        &pod_id,
        "stasis",
    )
    .await?;
    let req = stasis_api::checkpoint::CheckpointPodRequest {
        sandbox_id: pod_id.clone(),
        output_path: out.display().to_string(),
        options: Some(stasis_api::checkpoint::CheckpointOptions {
            leave_running: true,
            ..Default::default()
        })
        .into(),
        ..Default::default()
    };
    // Short enough that the dump outlasts it on a fast node (a 512 MiB dump took 260 ms in
    // one CI run): the deadline passes while the shim freezes or dumps.
    let started = Instant::now();
    let answer = client
        .checkpoint_pod(ttrpc::context::with_timeout(100_000_000), &req)
        .await;
    eprintln!(
        "caller with a 100 ms deadline answered after {:?}: {answer:?}",
        started.elapsed()
    );
    ensure!(answer.is_err(), "the checkpoint finished within 100 ms");
    // The dump goes on in the shim after the caller left: CRIU is seen at work now (a shim
    // that cut the checkpoint off at the caller's deadline would have none running).
    wait_for_criu()
        .await
        .context("no CRIU after the caller's deadline: the checkpoint was cut off")?;
    // It runs to its end; then everything is as before.
    wait_helpers_gone(Duration::from_secs(60)).await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left: Vec<_> = std::fs::read_dir(&out)?
            .flatten()
            .map(|e| e.path())
            .collect();
        if left.is_empty() {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the abandoned checkpoint's output is left: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for _ in 0..10 {
        for id in [&big_id, &counter_id] {
            let state = pod_freezer_state(&pod_id, id)?;
            ensure!(
                state == "THAWED",
                "{id} is {state} after the abandoned call"
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    expect_pod_runs_on(&mut cri, &pod_id, &[&big_id, &counter_id], &counter_id).await?;
    c.finish()
}

/// CRI stop, a task kill and an exec against containers of a pod while it is being
/// checkpointed: none deadlocks; each waits for the capture and then happens, and the
/// archive holds every container as it was at the checkpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_kill_and_exec_during_a_pod_checkpoint_wait_for_it() -> Result<()> {
    let _alone = ONE_AT_A_TIME.lock().await;
    let c = Containerd::start("fault-concurrent")?;
    let image = c.import_busybox_for_cri()?;
    let mut cri = c.cri().await?;
    let (pod_id, big_id, counter_id) =
        hog_and_counter_pod(&c, &mut cri, image, "busy", 768).await?;
    let pod = pod_config("busy", &c.dir.join("logs"));
    let mut extra = Vec::new();
    for name in ["stopped", "killed"] {
        let id = cri
            .run_container(
                &pod_id,
                &pod,
                container_config(name, image, &["sh", "-c", &counter_loop("/counter")]),
            )
            .await?;
        wait_counter_moving(&mut cri, &id, "/counter").await?;
        extra.push(id);
    }
    let archive = c.dir.join("busy.tar");
    // Every container's freezer and whether CRIU runs, sampled from before the checkpoint
    // to its end. A container's thaw by the checkpoint is its first THAWED sample after the
    // last CRIU ends (CRIU itself thaws and re-freezes while it seizes; runc freezes a
    // container again for a moment when it kills all its processes, after the kill).
    let all = [
        big_id.clone(),
        counter_id.clone(),
        extra[0].clone(),
        extra[1].clone(),
    ];
    let watched_pod = pod_id.clone();
    let sampler = Sampler::start(Duration::from_millis(2), move || -> (Vec<bool>, bool) {
        let frozen = all
            .iter()
            .map(|id| pod_freezer_state(&watched_pod, id).is_ok_and(|s| s != "THAWED"))
            .collect();
        (frozen, !pids_of_exe("criu").is_empty())
    });
    let checkpoint = checkpoint_in_background(&c, "busy", &archive)?;
    wait_for_criu().await?;
    let bound = Duration::from_secs(60);
    let mut stopper = c.cri().await?;
    let stop = async {
        let r = stopper
            .runtime
            // A grace period longer than the delete that follows the exit: the shim's unmount
            // of the container's rootfs waits over a second for the kernel while CRIU dumps
            // the big container, and containerd 2.1.9, whose exit handling deletes the task
            // before the status says EXITED, would send its SIGKILL on a connection its own
            // Delete then closes ("failed to kill container …: ttrpc: closed").
            .stop_container(stasis_e2e::cri::cri::StopContainerRequest {
                container_id: extra[0].clone(),
                timeout: 10,
            })
            .await;
        (r, Instant::now())
    };
    let kill = tokio::task::spawn_blocking({
        let mut cmd = std::process::Command::new("ctr");
        cmd.arg("--address").arg(c.socket()).args([
            "--namespace",
            "k8s.io",
            "tasks",
            "kill",
            "-s",
            "KILL",
            &extra[1],
        ]);
        move || (cmd.output(), Instant::now())
    });
    let mut execer = c.cri().await?;
    let exec = async {
        let r = execer.exec(&counter_id, &["cat", "/counter"]).await;
        (r, Instant::now())
    };
    let issued = Instant::now();
    let ((stopped, stop_done), killed, (execed, exec_done)) =
        tokio::time::timeout(bound, async { tokio::join!(stop, kill, exec) })
            .await
            .context("stop, kill and exec did not all return within 60 s: a deadlock")?;
    if let Err(e) = stopped {
        anyhow::bail!(
            "CRI StopContainer during the checkpoint: {e}\ncontainerd's log about it:\n{}",
            c.log_about(std::slice::from_ref(&extra[0]), 60)
        );
    }
    let (killed, kill_done) = killed?;
    let killed = killed?;
    ensure!(
        killed.status.success(),
        "ctr tasks kill: {}",
        String::from_utf8_lossy(&killed.stderr)
    );
    let (code, _, _) = execed.context("exec during the checkpoint")?;
    ensure!(code == 0, "exec during the checkpoint exited {code}");
    let out = checkpoint.wait_with_output()?;
    let issued_at = sampler.at(issued);
    // Each request with the index (in `all`) of the container it is about.
    let done_at = [
        ("stop", 2, sampler.at(stop_done)),
        ("kill", 3, sampler.at(kill_done)),
        ("exec", 1, sampler.at(exec_done)),
    ];
    let samples = sampler.stop();
    ensure!(
        out.status.success(),
        "the checkpoint failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The order is the claim: each request was made while CRIU was dumping, and returned
    // only after the checkpoint thawed its container.
    let dump_end = samples
        .iter()
        .filter(|(_, (_, criu))| *criu)
        .map(|(t, _)| *t)
        .max()
        .context("CRIU was never seen during the checkpoint")?;
    ensure!(
        issued_at < dump_end,
        "stop, kill and exec were issued at {issued_at:?}, after the dump ended at {dump_end:?}"
    );
    for (what, index, done) in done_at {
        let thawed_at = samples
            .iter()
            .find(|(t, (frozen, _))| *t > dump_end && !frozen[index])
            .map(|(t, _)| *t)
            .with_context(|| format!("{what}: its container was never seen thawed"))?;
        ensure!(
            done >= thawed_at,
            "{what} returned at {done:?}, before its container's thaw at {thawed_at:?} \
             (the dump ended at {dump_end:?})"
        );
    }
    let summary = stasis_controller::archive::inspect(&archive)?;
    ensure!(
        summary.containers.len() == 4,
        "the archive holds {} containers, not 4",
        summary.containers.len()
    );
    for id in &extra {
        let state = cri.container_status(id).await?.state;
        ensure!(
            state == stasis_e2e::cri::cri::ContainerState::ContainerExited as i32,
            "{id} is not EXITED after its stop/kill"
        );
    }
    expect_pod_runs_on(&mut cri, &pod_id, &[&big_id, &counter_id], &counter_id).await?;
    c.finish()
}

/// containerd restarted while a pod is being checkpointed: the checkpoint (between stasisctl
/// and the shim) completes or fails cleanly, and the pod is usable afterwards through CRI.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_restarted_during_a_checkpoint() -> Result<()> {
    let _alone = ONE_AT_A_TIME.lock().await;
    let mut c = Containerd::start("fault-ctrd-restart")?;
    let image = c.import_busybox_for_cri()?;
    let mut cri = c.cri().await?;
    let (pod_id, big_id, counter_id) =
        hog_and_counter_pod(&c, &mut cri, image, "restarted", 768).await?;
    let archive = c.dir.join("restarted.tar");
    let checkpoint = checkpoint_in_background(&c, "restarted", &archive)?;
    wait_for_criu().await?;
    c.restart()?;
    let out = checkpoint.wait_with_output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!(
        "checkpoint across a containerd restart: {:?}: {err}",
        out.status
    );
    if out.status.success() {
        let summary = stasis_controller::archive::inspect(&archive)?;
        ensure!(summary.containers.len() == 2, "incomplete archive");
    } else {
        ensure!(
            !archive.exists(),
            "a failed checkpoint left {}",
            archive.display()
        );
    }
    wait_helpers_gone(Duration::from_secs(60)).await?;
    let mut cri = c.cri().await?;
    for id in [&big_id, &counter_id] {
        let state = pod_freezer_state(&pod_id, id)?;
        ensure!(state == "THAWED", "{id} is {state}");
    }
    wait_counter_moving(&mut cri, &counter_id, "/counter").await?;
    ensure!(
        cri.exec(&big_id, &["true"]).await?.0 == 0,
        "the pod does not answer after the restart"
    );
    // The shim's events reach the restarted containerd (its publisher reconnects).
    let plain = c.import_busybox()?;
    let mut events = stasis_e2e::EventWatch::start(&c, plain)?;
    cri.runtime
        .stop_container(stasis_e2e::cri::cri::StopContainerRequest {
            container_id: counter_id.clone(),
            timeout: 1,
        })
        .await?;
    events.wait("/tasks/exit", &counter_id, Duration::from_secs(15))?;
    // And it checkpoints and restores again: nothing the pod's containers mount went stale
    // (containerd's restart removed CRI's copies of the pod's files).
    let again = c.dir.join("again.tar");
    c.stasisctl_ok(&[
        "pod",
        "checkpoint",
        "restarted",
        "--leave-running",
        "--output",
        again.to_str().unwrap(),
    ])?;
    cri.stop_and_remove_pod(&pod_id).await?;
    let restored = c
        .stasisctl_ok(&["pod", "restore", again.to_str().unwrap()])?
        .trim()
        .to_string();
    cri.stop_and_remove_pod(&restored).await?;
    c.finish()
}

/// A stopping checkpoint checks its archive (the file written, its size, its tar index and
/// manifest) before it stops anything: an archive changed between its writing and that check
/// (cut to half its length while the check's open is held by fanotify) fails the checkpoint,
/// the pod runs on, and nothing is left at the output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_checkpoint_whose_archive_reads_back_wrong_leaves_the_pod_running() -> Result<()>
{
    let _alone = ONE_AT_A_TIME.lock().await;
    let c = Containerd::start("fault-readback")?;
    let image = c.import_busybox_for_cri()?;
    let mut cri = c.cri().await?;
    let (pod_id, big_id, counter_id) =
        hog_and_counter_pod(&c, &mut cri, image, "readback", 64).await?;
    let out_dir = c.dir.join("readback-out");
    std::fs::create_dir(&out_dir)?;
    let archive = out_dir.join("readback.tar");
    let cut = stasis_e2e::fanotify::OpenInterceptor::start(&out_dir, "readback.tar", |f| {
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        if let Err(e) = f.set_len(len / 2) {
            eprintln!("cut the archive: {e}");
        }
    })?;
    let out = c.stasisctl(&[
        "pod",
        "checkpoint",
        "readback",
        "--output",
        archive.to_str().unwrap(),
    ])?;
    let cuts = cut.stop()?;
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("stopping checkpoint with its archive cut before the read-back: {err}");
    ensure!(
        cuts == 1,
        "the archive was opened {cuts} time(s), not once for its check"
    );
    ensure!(
        !out.status.success(),
        "the stopping checkpoint succeeded with its archive cut in half"
    );
    ensure!(
        err.contains("the pod was not stopped and runs on")
            && (err.contains("read back") || err.contains("reads back"))
            && err.contains(&*archive.to_string_lossy()),
        "the error does not say the read-back of the archive failed and the pod runs on: {err}"
    );
    let left: Vec<_> = std::fs::read_dir(&out_dir)?
        .flatten()
        .map(|e| e.path())
        .collect();
    ensure!(left.is_empty(), "left at the output: {left:?}");
    for id in [&big_id, &counter_id] {
        let status = cri.container_status(id).await?;
        ensure!(
            status.state == stasis_e2e::cri::cri::ContainerState::ContainerRunning as i32,
            "{id} is not running"
        );
    }
    expect_pod_runs_on(&mut cri, &pod_id, &[&big_id, &counter_id], &counter_id).await?;
    c.finish()
}

/// A Task API checkpoint, which containerd sends with no bound, past the engine settings'
/// `checkpoint_timeout_secs` (1 s here), through containerd's gRPC on a running task (the
/// shim's own freeze): it fails saying it timed out, runc and CRIU are stopped before the
/// container is thawed (sampled while the call runs), and the container runs on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_api_checkpoint_past_its_bound_stops_criu_and_runs_on() -> Result<()> {
    let _alone = ONE_AT_A_TIME.lock().await;
    let c = Containerd::start("fault-task-timeout")?;
    std::fs::create_dir_all(c.config_dir())?;
    std::fs::write(
        c.config_dir().join("runc.toml"),
        "checkpoint_timeout_secs = 1\n",
    )?;
    let image = c.import_busybox()?;
    c.ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        stasis_e2e::STASIS_RUNTIME,
        image,
        "swarm",
        "sh",
        "-c",
        SWARM,
    ])?;
    c.wait_for("the swarm ready", Duration::from_secs(120), || {
        Ok(c.exec_in("swarm", &["test", "-e", "/ready"])?.0)
    })?;
    let freezer = std::path::Path::new("/sys/fs/cgroup/freezer")
        .join(&c.namespace)
        .join("swarm")
        .join("freezer.state");
    let watched = freezer.clone();
    let sampler = Sampler::start(Duration::from_millis(2), move || {
        let state = std::fs::read_to_string(&watched).unwrap_or_default();
        (state.trim().to_string(), !pids_of_exe("criu").is_empty())
    });
    let started = Instant::now();
    let answer =
        stasis_e2e::api::checkpoint_task_unpaused(&c.socket(), &c.namespace, "swarm").await;
    let took = started.elapsed();
    let samples = sampler.stop();
    let err = match answer {
        Ok(_) => anyhow::bail!("the checkpoint of 1,500 processes finished within 1 s ({took:?})"),
        Err(e) => format!("{e:#}"),
    };
    eprintln!("Task API checkpoint past its bound, after {took:?}: {err}");
    ensure!(
        err.contains("swarm") && err.contains("timed out after 1 s"),
        "the error does not say the checkpoint of swarm timed out: {err}"
    );
    ensure!(
        samples.iter().any(|(_, (state, _))| state == "FROZEN"),
        "the container was never seen frozen by the shim"
    );
    ensure!(
        samples.iter().any(|(_, (_, criu))| *criu),
        "no CRIU was ever seen: the bound was not reached inside the dump"
    );
    let (_, (state, criu)) = samples.last().context("no samples")?;
    ensure!(
        !*criu && state == "THAWED",
        "right after the call: CRIU running {criu}, the container {state}"
    );
    ensure!(
        runtime_helpers().is_empty(),
        "runtime helpers still running: {:?}",
        runtime_helpers()
    );
    ensure!(
        c.task_status("swarm")?.as_deref() == Some("RUNNING"),
        "the container does not run on"
    );
    ensure!(
        c.exec_in("swarm", &["true"])?.0,
        "the container does not answer an exec"
    );
    c.ctr_ok(&["tasks", "kill", "-s", "KILL", "swarm"])?;
    c.wait_for("swarm stopped", Duration::from_secs(30), || {
        Ok(c.task_status("swarm")?.as_deref() == Some("STOPPED"))
    })?;
    c.ctr_ok(&["tasks", "delete", "swarm"])?;
    c.ctr_ok(&["containers", "delete", "swarm"])?;
    c.finish()
}
