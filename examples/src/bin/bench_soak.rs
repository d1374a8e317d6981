//! Soak: many pod round trips (checkpoint, remove, restore, verify), live and stopping, of a
//! 4-container pod, under heavy CPU and I/O load from outside the pod, with a random fault
//! injected into about one round in five. It counts what must stay zero (pods left frozen,
//! pods lost, archives missing or unreadable, consistency violations) and how long each fault
//! took to recover from. A first set of rounds without load or faults is the baseline the
//! round-trip times are compared with.
//!
//!     sudo scripts/bench.sh soak [--rounds 200] [--baseline 10] [--seed N]
//!
//! The pod: `rootfs` (a counter in memory and in its writable layer), `writer` (the same in a
//! shared volume captured with the memory), `reader` (another container following the shared
//! counter, logging it ever going backwards: the volume must come from the same instant as
//! the reader's memory), `fsync` (a counter written and synced to disk every round of its loop).

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use stasis_e2e::{
    cri::{containers_by_name, cri, pod_freezer_state, violations, CriClient},
    Containerd,
};
use stasis_examples::{flag, median, print_table, Dice};

use stasis_examples::consistency;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    /// A caller of the Checkpoint service whose deadline passes mid-checkpoint.
    Deadline,
    /// The output on a file system too small for it.
    FullDisk,
    /// stasisctl interrupted (SIGINT) during a checkpoint.
    InterruptCheckpoint,
    /// stasisctl interrupted (SIGINT) during a restore.
    InterruptRestore,
    /// The pod's shim SIGKILLed during a checkpoint (the pod dies with it: recovered from the
    /// last archive).
    ShimKill,
    /// containerd restarted during a checkpoint.
    ContainerdRestart,
}

const FAULTS: [Fault; 6] = [
    Fault::Deadline,
    Fault::FullDisk,
    Fault::InterruptCheckpoint,
    Fault::InterruptRestore,
    Fault::ShimKill,
    Fault::ContainerdRestart,
];

#[derive(Default)]
struct Counts {
    live: usize,
    stopping: usize,
    frozen_left: usize,
    pods_lost: usize,
    archives_bad: usize,
    violations: Vec<String>,
    faults: Vec<(Fault, Duration)>,
    round_trips: Vec<Duration>,
    failed_rounds: Vec<String>,
}

struct Soak {
    c: Containerd,
    cri: CriClient,
    image: &'static str,
    volume: PathBuf,
    pod_id: String,
    /// The newest archive known good (restored and verified): what a lost pod comes back from.
    last_good: Option<PathBuf>,
}

impl Soak {
    async fn start_pod(&mut self) -> Result<()> {
        self.pod_id = consistency::start_pod(
            &mut self.cri,
            &self.c.dir.join("logs"),
            self.image,
            ("soak", Some(&self.volume)),
            0,
        )
        .await?;
        Ok(())
    }

    async fn containers(&mut self) -> Result<Vec<(String, String, i32)>> {
        containers_by_name(&mut self.cri, &self.pod_id).await
    }

    /// Every container of the pod running and thawed, or why not.
    async fn check_running(&mut self) -> Result<()> {
        let list = self.containers().await?;
        ensure!(list.len() == 4, "pod has {} containers", list.len());
        for (name, id, state) in &list {
            ensure!(
                *state == cri::ContainerState::ContainerRunning as i32,
                "{name} is not running"
            );
            let f = pod_freezer_state(&self.pod_id, id)?;
            ensure!(f == "THAWED", "{name} is {f}");
        }
        Ok(())
    }

    /// How many of the pod's containers are frozen (checked a little after a fault); each is
    /// reported.
    fn frozen(&self) -> usize {
        let frozen = stasis_e2e::cri::pod_frozen_containers(&self.pod_id);
        for f in &frozen {
            eprintln!("frozen: pod {} container {f}", self.pod_id);
        }
        frozen.len()
    }

    /// New violations logged in any container (cleared once read, so each is counted once).
    async fn take_violations(&mut self) -> Result<Vec<String>> {
        let mut found = Vec::new();
        for (name, id, _) in self.containers().await? {
            // containerd waits for an exec's output without end ("drain_exec_sync_io_timeout"
            // is 0): bound it here, so a stuck exec fails the round instead of the soak.
            let v = tokio::time::timeout(Duration::from_secs(60), violations(&mut self.cri, &id))
                .await
                .with_context(|| format!("an exec in {name} did not return within 60 s"))??;
            if !v.trim().is_empty() {
                found.push(format!("{name}: {}", v.trim()));
                let _ = self.cri.exec(&id, &["rm", "-f", "/violations"]).await;
            }
        }
        Ok(found)
    }

    fn stasisctl(&self) -> Result<Command> {
        self.c.stasisctl_command()
    }

    fn checkpoint_command(&self, archive: &Path, live: bool) -> Result<Command> {
        let mut cmd = self.stasisctl()?;
        cmd.args(["pod", "checkpoint", &self.pod_id, "--output"])
            .arg(archive);
        if live {
            cmd.arg("--leave-running");
        }
        Ok(cmd)
    }

    fn restore_command(&self, archive: &Path) -> Result<Command> {
        let mut cmd = self.stasisctl()?;
        // The shared volume still holds what the removed pod wrote.
        cmd.args(["pod", "restore", "--replace-volumes"])
            .arg(archive);
        Ok(cmd)
    }

    async fn remove_pod(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match self.cri.stop_and_remove_pod(&self.pod_id).await {
                Ok(()) => return Ok(()),
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(300)).await
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Restores `archive` as the pod, and checks it runs and stayed consistent.
    async fn restore(&mut self, archive: &Path, counts: &mut Counts) -> Result<()> {
        let out = self.restore_command(archive)?.output()?;
        if !out.status.success() {
            bail!(
                "restore failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        self.pod_id = String::from_utf8_lossy(&out.stdout).trim().to_string();
        self.check_running().await?;
        counts.violations.extend(self.take_violations().await?);
        Ok(())
    }

    /// One round trip: checkpoint (live or stopping), remove, restore, verify.
    async fn round_trip(&mut self, round: usize, live: bool, counts: &mut Counts) -> Result<()> {
        let started = Instant::now();
        let archive = self.c.dir.join(format!("soak-{round}.tar"));
        let out = self.checkpoint_command(&archive, live)?.output()?;
        if !out.status.success() {
            bail!(
                "checkpoint failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        if !archive.exists() || stasis_controller::archive::inspect(&archive).is_err() {
            counts.archives_bad += 1;
            bail!(
                "checkpoint succeeded but {} is missing or unreadable",
                archive.display()
            );
        }
        self.remove_pod().await?;
        self.restore(&archive, counts).await?;
        if let Some(old) = self.last_good.replace(archive) {
            let _ = std::fs::remove_file(old);
        }
        counts.round_trips.push(started.elapsed());
        Ok(())
    }

    /// After a fault that must not hurt the pod: it runs, thawed. Otherwise (the pod is gone
    /// or broken) it is recovered from the last good archive, or counted lost.
    async fn settle(&mut self, counts: &mut Counts) -> Result<()> {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if self.shim_pid().is_some() {
            // A living pod must be thawed by now, whatever the fault did.
            counts.frozen_left += self.frozen();
            if self.check_running().await.is_ok() {
                return Ok(());
            }
        }
        // Its shim is dead (or the pod broken): once removed, nothing of it may stay frozen.
        let _ = self.remove_pod().await;
        counts.frozen_left += self.frozen();
        match self.last_good.clone() {
            Some(archive) => self.restore(&archive, counts).await,
            None => {
                counts.pods_lost += 1;
                self.start_pod().await
            }
        }
    }

    /// The pod's serving shim (not the `delete` containerd runs after one died).
    fn shim_pid(&self) -> Option<i32> {
        stasis_e2e::processes_matching(&[
            "containerd-shim-stasis-v2",
            &self.c.socket().display().to_string(),
            &format!("-id {} ", self.pod_id),
        ])
        .into_iter()
        .find(|pid| {
            !std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
                .unwrap_or_default()
                .contains(" delete")
        })
    }

    async fn inject(&mut self, fault: Fault, dice: &mut Dice, counts: &mut Counts) -> Result<()> {
        let started = Instant::now();
        let live = dice.below(2) == 0;
        let archive = self.c.dir.join("fault.tar");
        let _ = std::fs::remove_file(&archive);
        // Somewhere in the first ~0.6 s of the operation.
        let delay = Duration::from_millis(50 + dice.below(550));
        match fault {
            Fault::Deadline => {
                let out = self.c.dir.join("deadline-out");
                let _ = std::fs::remove_dir_all(&out);
                std::fs::create_dir(&out)?;
                let client = stasis_controller::shim::checkpoint_client(
                    &self.c.socket().display().to_string(),
                    "k8s.io",
                    &self.pod_id,
                    "stasis",
                )
                .await?;
                let req = stasis_api::checkpoint::CheckpointPodRequest {
                    sandbox_id: self.pod_id.clone(),
                    output_path: out.display().to_string(),
                    options: Some(stasis_api::checkpoint::CheckpointOptions {
                        leave_running: live,
                        hold_secs: 30,
                        ..Default::default()
                    })
                    .into(),
                    ..Default::default()
                };
                let nanos = delay.as_nanos() as i64 / 4;
                let answer = client
                    .checkpoint_pod(ttrpc::context::with_timeout(nanos), &req)
                    .await;
                if answer.is_ok() && !live {
                    // It finished in time: the hold is ours to end; let the pod run on.
                    let _ = client
                        .finish_checkpoint(
                            ttrpc::context::with_timeout(30_000_000_000),
                            &stasis_api::checkpoint::FinishCheckpointRequest {
                                sandbox_id: self.pod_id.clone(),
                                stop: false,
                                ..Default::default()
                            },
                        )
                        .await;
                }
                // The shim finishes the abandoned checkpoint on its own.
                tokio::time::sleep(Duration::from_secs(2)).await;
                let _ = std::fs::remove_dir_all(&out);
            }
            Fault::FullDisk => {
                let fs = self.c.dir.join("small");
                std::fs::create_dir_all(&fs)?;
                let ok = Command::new("mount")
                    .args(["-t", "tmpfs", "-o", "size=2m", "tmpfs"])
                    .arg(&fs)
                    .status()?
                    .success();
                ensure!(ok, "mount a small tmpfs");
                let out = self
                    .checkpoint_command(&fs.join("full.tar"), live)?
                    .arg("--skip-space-check")
                    .output()?;
                let left = std::fs::read_dir(&fs)?.count();
                let _ = Command::new("umount").arg(&fs).status();
                ensure!(!out.status.success(), "a checkpoint fit in 2 MiB");
                ensure!(left == 0, "{left} files left on the full file system");
            }
            Fault::InterruptCheckpoint => {
                let mut child = self
                    .checkpoint_command(&archive, live)?
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()?;
                tokio::time::sleep(delay).await;
                signal(&child, nix::sys::signal::Signal::SIGINT);
                let status = child.wait()?;
                if status.success() {
                    // It finished first: a normal checkpoint; a stopping one stopped the pod.
                    if !live {
                        self.remove_pod().await?;
                        self.restore(&archive, counts).await?;
                    }
                } else {
                    let beside = std::fs::read_dir(&self.c.dir)?
                        .flatten()
                        .filter(|e| e.file_name().to_string_lossy().starts_with(".fault.tar"))
                        .count();
                    ensure!(
                        !archive.exists() && beside == 0,
                        "an interrupted checkpoint left files"
                    );
                }
            }
            Fault::InterruptRestore => {
                let Some(good) = self.last_good.clone() else {
                    return Ok(());
                };
                self.remove_pod().await?;
                let child: Child = self
                    .restore_command(&good)?
                    .stdout(Stdio::piped())
                    .stderr(Stdio::null())
                    .spawn()?;
                tokio::time::sleep(delay).await;
                signal(&child, nix::sys::signal::Signal::SIGINT);
                let out = child.wait_with_output()?;
                if out.status.success() {
                    self.pod_id = String::from_utf8_lossy(&out.stdout).trim().to_string();
                } else {
                    // Interrupted: nothing of the new pod is left; restore it for real.
                    self.restore(&good, counts).await?;
                }
            }
            Fault::ShimKill => {
                let mut child = self
                    .checkpoint_command(&archive, live)?
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()?;
                tokio::time::sleep(delay / 4).await;
                if let Some(pid) = self.shim_pid() {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                let _ = child.wait()?;
                let _ = std::fs::remove_file(&archive);
            }
            Fault::ContainerdRestart => {
                let mut child = self
                    .checkpoint_command(&archive, true)?
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()?;
                tokio::time::sleep(delay / 4).await;
                self.c.restart()?;
                self.cri = self.c.cri().await?;
                let _ = child.wait()?;
                let _ = std::fs::remove_file(&archive);
            }
        }
        self.settle(counts).await?;
        counts.faults.push((fault, started.elapsed()));
        Ok(())
    }
}

fn signal(child: &Child, sig: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), sig);
}

/// Heavy CPU and I/O load from outside the pod: two busy loops per core and a writer that
/// keeps syncing 256 MiB files.
fn start_load(dir: &Path) -> Result<Vec<Child>> {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let mut load = Vec::new();
    for _ in 0..2 * cores {
        load.push(
            Command::new("sh")
                .args(["-c", "while :; do :; done"])
                .spawn()?,
        );
    }
    let file = dir.join("io-load");
    load.push(
        Command::new("sh")
            .arg("-c")
            .arg(format!(
                "while :; do dd if=/dev/zero of={} bs=1M count=256 conv=fsync 2>/dev/null; done",
                file.display()
            ))
            .spawn()?,
    );
    Ok(load)
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("bench_soak [--rounds 200] [--baseline 10] [--seed N]: pod round trips under load with random faults");
        return Ok(());
    }
    let rounds: usize = flag(&args, "--rounds").map_or(Ok(200), |v| v.parse())?;
    let baseline: usize = flag(&args, "--baseline").map_or(Ok(10), |v| v.parse())?;
    let seed = stasis_examples::seed_from(&args)?;
    eprintln!("soak: {rounds} rounds after {baseline} baseline rounds, seed {seed}");
    let c = Containerd::start("bench-soak")?;
    let image = c.import_busybox_for_cri()?;
    let cri = c.cri().await?;
    let volume = c.dir.join("shared-volume");
    std::fs::create_dir_all(&volume)?;
    let mut soak = Soak {
        c,
        cri,
        image,
        volume,
        pod_id: String::new(),
        last_good: None,
    };
    soak.start_pod().await?;
    let mut dice = Dice(seed);

    let mut base = Counts::default();
    for round in 0..baseline {
        soak.round_trip(round, round % 2 == 0, &mut base)
            .await
            .with_context(|| format!("baseline round {round}"))?;
    }
    let mut load = start_load(&soak.c.dir)?;
    let mut counts = Counts::default();
    let started = Instant::now();
    for round in 0..rounds {
        let live = dice.below(2) == 0;
        if dice.below(5) == 0 {
            let fault = FAULTS[dice.below(FAULTS.len() as u64) as usize];
            eprintln!("round {round}: fault {fault:?}");
            if let Err(e) = soak.inject(fault, &mut dice, &mut counts).await {
                eprintln!("round {round}: after fault {fault:?}: {e:#}");
                counts
                    .failed_rounds
                    .push(format!("{round} ({fault:?}): {e:#}"));
                soak.settle(&mut counts).await?;
            }
        }
        if live {
            counts.live += 1;
        } else {
            counts.stopping += 1;
        }
        if let Err(e) = soak.round_trip(baseline + round, live, &mut counts).await {
            eprintln!("round {round}: {e:#}");
            counts.failed_rounds.push(format!("{round}: {e:#}"));
            soak.settle(&mut counts).await?;
        }
        if round % 10 == 9 {
            eprintln!(
                "{} rounds, {:?}; violations {}, frozen {}, lost {}",
                round + 1,
                started.elapsed(),
                counts.violations.len(),
                counts.frozen_left,
                counts.pods_lost
            );
        }
    }
    for mut l in load.drain(..) {
        let _ = l.kill();
        let _ = l.wait();
    }
    let _ = std::fs::remove_file(soak.c.dir.join("io-load"));
    soak.remove_pod().await?;

    let base_rt = median(&mut base.round_trips.clone());
    let load_rt = median(&mut counts.round_trips.clone());
    let mut rows = vec![vec!["what".to_string(), "value".into(), "must be".into()]];
    let mut row = |what: &str, value: String, must: &str| {
        rows.push(vec![what.to_string(), value, must.to_string()])
    };
    row(
        "round trips (live / stopping)",
        format!(
            "{} ({} / {})",
            counts.round_trips.len(),
            counts.live,
            counts.stopping
        ),
        &format!("{rounds}"),
    );
    row(
        "faults injected",
        counts.faults.len().to_string(),
        "~1 in 5",
    );
    row("pods left frozen", counts.frozen_left.to_string(), "0");
    row("pods lost", counts.pods_lost.to_string(), "0");
    row(
        "archives missing or unreadable",
        counts.archives_bad.to_string(),
        "0",
    );
    row(
        "consistency violations",
        counts.violations.len().to_string(),
        "0",
    );
    row("failed rounds", counts.failed_rounds.len().to_string(), "0");
    row(
        "round trip, median: baseline (no load) / under load",
        format!(
            "{} / {} ({:.2}x)",
            ms(base_rt),
            ms(load_rt),
            load_rt.as_secs_f64() / base_rt.as_secs_f64().max(1e-9)
        ),
        "",
    );
    print_table(&rows);
    let mut rows = vec![vec![
        "fault".to_string(),
        "injected".into(),
        "recovered, median".into(),
        "max".into(),
    ]];
    for f in FAULTS {
        let mut times: Vec<Duration> = counts
            .faults
            .iter()
            .filter(|(k, _)| *k == f)
            .map(|(_, t)| *t)
            .collect();
        if times.is_empty() {
            continue;
        }
        let max = times.iter().max().copied().unwrap_or_default();
        rows.push(vec![
            format!("{f:?}"),
            times.len().to_string(),
            ms(median(&mut times)),
            ms(max),
        ]);
    }
    println!();
    print_table(&rows);
    for v in &counts.violations {
        println!("violation: {v}");
    }
    for f in &counts.failed_rounds {
        println!("failed: {f}");
    }
    soak.c.finish()?;
    let bad = counts.frozen_left
        + counts.pods_lost
        + counts.archives_bad
        + counts.violations.len()
        + counts.failed_rounds.len();
    ensure!(bad == 0, "the soak found {bad} problem(s)");
    Ok(())
}
