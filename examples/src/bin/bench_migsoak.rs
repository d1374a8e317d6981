//! Soak: one pod moved back and forth between two nodes (two private containerd daemons on
//! this machine) with `pod migrate --post-copy`: the consistency containers of the soak (a
//! counter in memory and in the writable layer, a synced counter) beside a container holding
//! `--memory` MiB. Not the shared volume's pair: both "nodes" here are one machine, so a
//! target that restores a volume (`--replace-volumes`) would replace the very directory the
//! source pod still has mounted. About one round in `--every` gets a
//! fault at a random point of the page transfer: the connection cut after a random number of
//! bytes, or the target's or the source's pod shim killed a random moment after the target's
//! pod runs. After each round it counts where the pod runs: exactly one copy, running and
//! thawed, with no consistency violation, is the only good outcome; a failed round must leave
//! the source running and the target empty.
//!
//!     sudo scripts/bench.sh migsoak [--rounds 50] [--memory 256] [--every 5] [--seed N]

use std::{
    path::Path,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::Result;
use stasis_e2e::{
    cri::{containers_by_name, cri, pod_frozen_containers, violations, CriClient},
    migration::{self, Listener, Meddle},
    Containerd,
};
use stasis_examples::{consistency, flag, median, print_table, Dice};

const POD: &str = "migsoak";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    None,
    /// The migration's connection cut after a random number of bytes from the source.
    Cut,
    /// The target pod's shim SIGKILLed while the pages cross.
    TargetShim,
    /// The source pod's shim SIGKILLed while the pages cross.
    SourceShim,
}

const FAULTS: [Fault; 3] = [Fault::Cut, Fault::TargetShim, Fault::SourceShim];

/// What the rounds of one fault kind came to.
#[derive(Default)]
struct Tally {
    rounds: u32,
    moved: u32,
    /// Failed, with the pod running on the source and nothing on the target.
    kept: u32,
    lost: u32,
    twice: u32,
    /// Failed, with the target not empty afterwards.
    target_left: u32,
    frozen: u32,
    violations: u32,
}

struct Node {
    c: Containerd,
    cri: CriClient,
}

/// The pod's running copy on `cri` (every container running, none frozen is checked later),
/// and whether any other copy of it (not running) is there.
async fn copy_on(cri: &mut CriClient, containers: usize) -> Result<(Option<String>, bool)> {
    let (mut running, mut other) = (None, false);
    for p in cri.pods().await? {
        if p.metadata.as_ref().map(|m| m.name.as_str()) != Some(POD) {
            continue;
        }
        let list = containers_by_name(cri, &p.id).await.unwrap_or_default();
        let all_running = list.len() == containers
            && list
                .iter()
                .all(|(_, _, s)| *s == cri::ContainerState::ContainerRunning as i32);
        if p.state == cri::PodSandboxState::SandboxReady as i32 && all_running {
            running = Some(p.id.clone());
        } else {
            other = true;
        }
    }
    Ok((running, other))
}

/// One round src → dst with `fault`: the fault it really got, whether `pod migrate` said it
/// moved, its downtime. A shim kill drawn for after the last page was in is not made (the
/// move is over by then: killing the target's shim would kill a pod that moved), and the
/// round counts as a plain one.
async fn round(
    (src, dst): (&Node, &Node),
    key: &Path,
    (mut fault, dice): (Fault, &mut Dice),
    (source_pod, mib): (&str, u64),
) -> Result<(Fault, bool, Option<f64>)> {
    let Listener {
        child: mut listener,
        addr,
        log,
    } = migration::listen(dst.c.stasisctl_command()?, key, 1, &[], false)?;
    let to = match fault {
        // Somewhere in the pages (the pod's files are a few hundred KiB).
        Fault::Cut => {
            let at = (1 << 20) + dice.below(mib.max(2) << 20);
            migration::meddling_relay(&addr, at, Meddle::Cut)?.0
        }
        _ => addr,
    };
    let mut migrate = src
        .c
        .stasisctl_command()?
        .args([
            "pod",
            "migrate",
            POD,
            "--to",
            &to,
            "--post-copy",
            "--key-file",
        ])
        .arg(key)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    if matches!(fault, Fault::TargetShim | Fault::SourceShim) {
        if let Some(target_pod) = migration::target_runs(&log, Duration::from_secs(120)) {
            tokio::time::sleep(Duration::from_millis(dice.below(1500))).await;
            let over = log.try_iter().any(|l| l.contains("every page in"))
                || migrate.try_wait()?.is_some();
            match fault {
                _ if over => fault = Fault::None,
                Fault::TargetShim => drop(migration::kill_pod_shim(&dst.c, &target_pod)),
                _ => drop(migration::kill_pod_shim(&src.c, source_pod)),
            }
        }
    }
    let out = migrate.wait_with_output()?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while listener.try_wait()?.is_none() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = listener.kill();
    let _ = listener.wait();
    let err = String::from_utf8_lossy(&out.stderr);
    let downtime = err
        .find(" ms (frozen")
        .and_then(|i| err[..i].split_whitespace().last()?.parse().ok());
    if !out.status.success() {
        println!("  {fault:?}: {}", err.lines().last().unwrap_or_default());
    }
    Ok((fault, out.status.success(), downtime))
}

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("bench_migsoak [--rounds 50] [--memory 256] [--every 5] [--seed N]: post-copy migrations back and forth between two private containerds, a fault (connection cut, target shim killed, source shim killed) in about one round in N; counts pods lost, running twice, left frozen, consistency violations");
        return Ok(());
    }
    let num = |name: &str, default: u64| -> Result<u64> {
        Ok(flag(&args, name)
            .map(|v| v.parse())
            .transpose()?
            .unwrap_or(default))
    };
    let (rounds, mib, every) = (
        num("--rounds", 50)?,
        num("--memory", 256)?,
        num("--every", 5)?,
    );
    let seed = stasis_examples::seed_from(&args)?;
    println!("migration soak: {rounds} rounds, {mib} MiB, a fault in ~1 of {every}, seed {seed}");
    let mut dice = Dice(seed);
    let (a, b) = Containerd::start_pair("migsoak")?;
    let image = a.import_busybox_for_cri()?;
    b.import_busybox_for_cri()?;
    let key = a.dir.join("migration.key");
    a.stasisctl_ok(&["migrate", "keygen", "--output", key.to_str().unwrap()])?;
    let logs = a.dir.join("logs");
    let mut nodes = [
        Node {
            cri: a.cri().await?,
            c: a,
        },
        Node {
            cri: b.cri().await?,
            c: b,
        },
    ];
    // rootfs and fsync, and the hog.
    let containers = 2 + usize::from(mib > 0);
    let mut pod = consistency::start_pod(&mut nodes[0].cri, &logs, image, (POD, None), mib).await?;
    let (mut at, mut downtimes) = (0usize, Vec::new());
    let mut tallies: Vec<(Fault, Tally)> = [Fault::None]
        .into_iter()
        .chain(FAULTS)
        .map(|f| (f, Tally::default()))
        .collect();
    for r in 0..rounds {
        let drawn = match dice.below(every) {
            0 => FAULTS[dice.below(3) as usize],
            _ => Fault::None,
        };
        let (src, dst) = (at, 1 - at);
        let (fault, moved, downtime) = round(
            (&nodes[src], &nodes[dst]),
            &key,
            (drawn, &mut dice),
            (&pod, mib),
        )
        .await?;
        if fault != drawn {
            println!("round {r}: {drawn:?} drawn after every page was in: not made");
        }
        // Let containerd take note of a dead shim before the count.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (on_src, left_src) = copy_on(&mut nodes[src].cri, containers).await?;
        let (on_dst, left_dst) = copy_on(&mut nodes[dst].cri, containers).await?;
        let t = &mut tallies
            .iter_mut()
            .find(|(f, _)| *f == fault)
            .expect("listed")
            .1;
        t.rounds += 1;
        match (&on_src, &on_dst) {
            (Some(_), Some(_)) => t.twice += 1,
            (None, None) => t.lost += 1,
            _ => {}
        }
        if moved && on_dst.is_some() {
            t.moved += 1;
            if fault == Fault::None {
                downtimes.extend(downtime.map(|d| Duration::from_secs_f64(d / 1000.0)));
            }
        } else if !moved && on_src.is_some() && on_dst.is_none() && !left_dst {
            t.kept += 1;
        } else if !moved && (on_dst.is_some() || left_dst) {
            t.target_left += 1;
        }
        // Carry on from wherever the pod runs; a lost pod starts again on the source.
        let (node, id) = match (on_src, on_dst) {
            (_, Some(id)) if moved => (dst, id),
            (Some(id), _) => (src, id),
            (None, Some(id)) => (dst, id),
            (None, None) => {
                for n in [src, dst] {
                    let stale: Vec<String> = nodes[n]
                        .cri
                        .pods()
                        .await?
                        .into_iter()
                        .map(|p| p.id)
                        .collect();
                    for id in stale {
                        let _ = nodes[n].cri.stop_and_remove_pod(&id).await;
                    }
                }
                let id =
                    consistency::start_pod(&mut nodes[src].cri, &logs, image, (POD, None), mib)
                        .await?;
                (src, id)
            }
        };
        if left_src && node != src {
            println!("  round {r}: a stopped copy is left on the source");
        }
        if !pod_frozen_containers(&id).is_empty() {
            t.frozen += 1;
        }
        for (name, cid, _) in containers_by_name(&mut nodes[node].cri, &id).await? {
            let v = violations(&mut nodes[node].cri, &cid)
                .await
                .unwrap_or_default();
            if !v.is_empty() {
                println!("  round {r}: {name}: {v}");
                t.violations += 1;
            }
        }
        println!(
            "round {r}: {fault:?}: {}",
            if moved { "moved" } else { "not moved" }
        );
        (at, pod) = (node, id);
    }
    let mut rows = vec![vec![
        "fault".to_string(),
        "rounds".into(),
        "moved".into(),
        "failed: source runs, target empty".into(),
        "pods lost".into(),
        "pods running twice".into(),
        "failed: target not empty".into(),
        "left frozen".into(),
        "consistency violations".into(),
    ]];
    for (f, t) in &tallies {
        rows.push(vec![
            format!("{f:?}"),
            t.rounds.to_string(),
            t.moved.to_string(),
            t.kept.to_string(),
            t.lost.to_string(),
            t.twice.to_string(),
            t.target_left.to_string(),
            t.frozen.to_string(),
            t.violations.to_string(),
        ]);
    }
    print_table(&rows);
    if !downtimes.is_empty() {
        println!(
            "median downtime of the rounds without a fault: {:.0} ms",
            median(&mut downtimes).as_secs_f64() * 1000.0
        );
    }
    nodes[at].cri.stop_and_remove_pod(&pod).await?;
    let [a, b] = nodes;
    a.c.finish()?;
    b.c.finish()
}
