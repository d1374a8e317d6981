//! Benchmark: moving a pod between two nodes (two private containerd daemons on this machine,
//! the stream on loopback), streamed by `stasisctl pod migrate` (eager, `--lazy`, and
//! `--post-copy`: the pod runs on the target before its pages cross) against
//! the archive route in the same run (`pod checkpoint` to a file, copy the file, `pod restore`
//! on the target), for pods with 0, 256 and 1024 MiB of touched memory; and a second table:
//! eager against lazy (`--lazy`) local restore of the same uncompressed archive, page cache
//! dropped before each, next to `ctr c restore` of the same workload through runc-v2.
//!
//!     sudo scripts/bench.sh migrate [--memory 0,256,1024] [--runs N]
//!
//! Downtime is from the start of the capture (the pod freezes a moment later) until the pod
//! runs on the target; "total" also counts removing the source.

use std::{
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use stasis_e2e::Containerd;
use stasis_examples::{human, median, print_table};

fn workload(mib: u64) -> String {
    stasis_examples::memory_workload(mib)
}

async fn start_pod(c: &Containerd, name: &str, image: &str, mib: u64) -> Result<String> {
    stasis_examples::start_memory_pod(c, name, image, mib).await
}

/// One streamed migration a → b.
struct Moved {
    /// As `pod migrate` reports it: frozen here until running there.
    downtime: Duration,
    total: Duration,
    bytes: u64,
    /// From the command's start until a container of the moved pod answers an exec on b,
    /// seen from outside.
    answers: Duration,
    /// The pod's id on b.
    pod: String,
}

/// Moves pod `pod` (named `name`) from a to b with `pod migrate`.
async fn streamed(
    a: &Containerd,
    b: &Containerd,
    (pod, name): (&str, &str),
    key: &std::path::Path,
    extra: &[&str],
) -> Result<Moved> {
    let mut listen = stasis_e2e::migration::listen(b.stasisctl_command()?, key, 1, &[], false)?;
    let addr = listen.addr.clone();
    let t0 = Instant::now();
    let child = a
        .stasisctl_command()?
        .args(["pod", "migrate", pod, "--to", &addr, "--key-file"])
        .arg(key)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let seen = stasis_examples::answered_while(b, name, child, t0).await;
    if seen.is_err() {
        let _ = listen.child.kill();
    }
    let (answers, out, total) = seen?;
    let _ = listen.child.wait();
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.success(), "migrate failed: {err}");
    // "… downtime 1234 ms (…), 12.3 MiB sent, …"
    let number_before = |marker: &str| -> Option<f64> {
        let i = err.find(marker)?;
        err[..i].split_whitespace().last()?.parse().ok()
    };
    let downtime = number_before(" ms (frozen").context("downtime in the report")?;
    let sent = err
        .split(", ")
        .find(|p| p.ends_with(" sent"))
        .map(|p| p.trim_end_matches(" sent").to_string())
        .unwrap_or_default();
    let bytes = parse_human(&sent);
    Ok(Moved {
        downtime: Duration::from_secs_f64(downtime / 1000.0),
        total,
        bytes,
        answers,
        pod: String::from_utf8_lossy(&out.stdout).trim().to_string(),
    })
}

fn parse_human(s: &str) -> u64 {
    let mut it = s.split_whitespace();
    let v: f64 = it.next().and_then(|v| v.parse().ok()).unwrap_or(0.0);
    let unit = match it.next().unwrap_or("B") {
        "KiB" => 1u64 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        _ => 1,
    };
    (v * unit as f64) as u64
}

/// The archive route a → b: stopping checkpoint to a file, copy, restore on b.
fn through_archive(a: &Containerd, b: &Containerd, pod: &str) -> Result<(Duration, u64, String)> {
    let file = a.dir.join(format!("{pod}.tar"));
    let copy = b.dir.join(format!("{pod}.tar"));
    let t0 = Instant::now();
    a.stasisctl_ok(&["pod", "checkpoint", pod, "--output", file.to_str().unwrap()])?;
    std::fs::copy(&file, &copy)?;
    let new_pod = b
        .stasisctl_ok(&["pod", "restore", copy.to_str().unwrap()])?
        .trim()
        .to_string();
    let downtime = t0.elapsed();
    let bytes = std::fs::metadata(&file)?.len();
    std::fs::remove_file(&file)?;
    std::fs::remove_file(&copy)?;
    Ok((downtime, bytes, new_pod))
}

/// One memory size's samples of the migration table.
#[derive(Default)]
struct Medians {
    down: Vec<Duration>,
    total: Vec<Duration>,
    lazy_down: Vec<Duration>,
    post_down: Vec<Duration>,
    post_answers: Vec<Duration>,
    /// Post-copy's `pod migrate` returned: the target had every page, the source was gone.
    post_total: Vec<Duration>,
    via_archive: Vec<Duration>,
}

/// A restore's times, from the command's start.
struct RestoreTimes {
    /// stasisctl returned.
    returned: f64,
    /// A container of the restored pod answered an exec (seen from outside).
    answers: f64,
    /// The last page was in (`pod pages --wait` returned); for an eager restore, `returned`.
    all_in: f64,
}

impl RestoreTimes {
    /// Each time's median over `runs`, apart.
    fn median(runs: &[RestoreTimes]) -> RestoreTimes {
        let pick =
            |f: fn(&RestoreTimes) -> f64| median_f64(&mut runs.iter().map(f).collect::<Vec<_>>());
        RestoreTimes {
            returned: pick(|r| r.returned),
            answers: pick(|r| r.answers),
            all_in: pick(|r| r.all_in),
        }
    }
}

fn median_f64(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Restores `file` (pod `pod_name`) on `node` with the page cache dropped first (the archive
/// read from disk, as after a copy from another node), removes the pod again.
async fn timed_restore(
    node: &Containerd,
    file: &std::path::Path,
    pod_name: &str,
    lazy: bool,
) -> Result<RestoreTimes> {
    stasis_examples::drop_caches();
    let mut args = vec!["pod", "restore", file.to_str().unwrap()];
    if lazy {
        args.push("--lazy");
    }
    let started = Instant::now();
    let child = node
        .stasisctl_command()?
        .args(&args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let (answers, out, returned) =
        stasis_examples::answered_while(node, pod_name, child, started).await?;
    let answers = answers.as_secs_f64() * 1000.0;
    let returned = returned.as_secs_f64() * 1000.0;
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    ensure!(out.status.success(), "restore failed: {err}");
    let new_pod = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let all_in = if lazy {
        node.stasisctl_ok(&["pod", "pages", &new_pod, "--wait"])?;
        started.elapsed().as_secs_f64() * 1000.0
    } else {
        returned
    };
    node.cri().await?.stop_and_remove_pod(&new_pod).await?;
    Ok(RestoreTimes {
        returned,
        answers,
        all_in,
    })
}

/// containerd's own path for the same workload: a container through runc-v2, checkpointed
/// live with `ctr c checkpoint --task --rw`, removed, then (page cache dropped) restored with
/// `ctr c restore --live --rw`; returns the restore's milliseconds until `ctr` returned (the
/// task runs then) and until an exec in it answered (`ctr t exec` right after: measured from
/// outside like stasis's answers, which include an exec too).
fn runc_v2_restore(c: &Containerd, image: &str, id: &str, mib: u64) -> Result<(f64, f64)> {
    stasis_examples::ctr_start(
        c,
        stasis_e2e::RUNC_RUNTIME,
        image,
        id,
        &workload(mib),
        "/ready",
    )?;
    let ck = format!("ck-{id}");
    c.ctr_ok(&["containers", "checkpoint", "--task", "--rw", id, &ck])?;
    stasis_examples::ctr_remove(c, id);
    stasis_examples::drop_caches();
    let restored = format!("r-{id}");
    let t = Instant::now();
    c.ctr_ok(&["containers", "restore", "--live", "--rw", &restored, &ck])?;
    let ms = t.elapsed().as_secs_f64() * 1000.0;
    c.ctr_ok(&["tasks", "exec", "--exec-id", "answer", &restored, "true"])?;
    let answered = t.elapsed().as_secs_f64() * 1000.0;
    stasis_examples::ctr_remove(c, &restored);
    // Synchronously: containerd's collection of a GiB blob would fall into the next
    // measurement.
    let _ = c.ctr(&["images", "rm", "--sync", &ck]);
    Ok((ms, answered))
}

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("bench_migrate [--memory 0,256,1024] [--runs N] [--restore-only]: streamed pod migration vs checkpoint+copy+restore through an archive, then eager and lazy restores vs containerd runc-v2's (medians of N; --restore-only: only the restore table)");
        return Ok(());
    }
    let flag = |name: &str| stasis_examples::flag(&args, name);
    let memories: Vec<u64> = flag("--memory")
        .unwrap_or_else(|| "0,256,1024".into())
        .split(',')
        .map(|s| s.parse())
        .collect::<Result<_, _>>()?;
    let runs: usize = flag("--runs").map(|r| r.parse()).transpose()?.unwrap_or(1);
    let restore_only = args.iter().any(|a| a == "--restore-only");
    let a = Containerd::start("bench-mig-a")?;
    let b = Containerd::start("bench-mig-b")?;
    let image = a.import_busybox_for_cri()?;
    b.import_busybox_for_cri()?;
    let key = a.dir.join("migration.key");
    a.stasisctl_ok(&["migrate", "keygen", "--output", key.to_str().unwrap()])?;
    let mut rows = vec![vec![
        "pod memory".to_string(),
        "migrate downtime".into(),
        "migrate total".into(),
        "sent".into(),
        "--lazy downtime".into(),
        "--post-copy downtime".into(),
        "--post-copy: answers there".into(),
        "--post-copy: every page in".into(),
        "archive route downtime".into(),
        "archive".into(),
        "post-copy downtime / archive route (<=0.1 at 1 GiB)".into(),
        "post-copy downtime / 0 MiB's (<=1.5)".into(),
    ]];
    let ms = |d: Duration| format!("{:.0} ms", d.as_secs_f64() * 1000.0);
    let mut post_at_zero = None;
    for &mib in memories.iter().filter(|_| !restore_only) {
        let mut m = Medians::default();
        let (mut sent, mut archive_bytes) = (0, 0);
        for run in 0..runs {
            let moved = |tag: &str| format!("{tag}{mib}-{run}");
            let name = moved("m");
            let pod = start_pod(&a, &name, image, mib).await?;
            let e = streamed(&a, &b, (&pod, &name), &key, &[]).await?;
            b.cri().await?.stop_and_remove_pod(&e.pod).await?;
            m.down.push(e.downtime);
            m.total.push(e.total);
            sent = e.bytes;
            let name = moved("z");
            let pod = start_pod(&a, &name, image, mib).await?;
            let l = streamed(&a, &b, (&pod, &name), &key, &["--lazy"]).await?;
            b.cri().await?.stop_and_remove_pod(&l.pod).await?;
            m.lazy_down.push(l.downtime);
            let name = moved("p");
            let pod = start_pod(&a, &name, image, mib).await?;
            let p = streamed(&a, &b, (&pod, &name), &key, &["--post-copy"]).await?;
            b.cri().await?.stop_and_remove_pod(&p.pod).await?;
            m.post_down.push(p.downtime);
            m.post_answers.push(p.answers);
            m.post_total.push(p.total);
            let name = moved("f");
            let pod = start_pod(&a, &name, image, mib).await?;
            let (d, bytes, restored) = through_archive(&a, &b, &pod)?;
            a.cri().await?.stop_and_remove_pod(&pod).await?;
            b.cri().await?.stop_and_remove_pod(&restored).await?;
            m.via_archive.push(d);
            archive_bytes = bytes;
        }
        let (post, via) = (median(&mut m.post_down), median(&mut m.via_archive));
        if mib == 0 {
            post_at_zero = Some(post);
        }
        rows.push(vec![
            format!("{mib} MiB"),
            ms(median(&mut m.down)),
            ms(median(&mut m.total)),
            human(sent),
            ms(median(&mut m.lazy_down)),
            ms(post),
            ms(median(&mut m.post_answers)),
            ms(median(&mut m.post_total)),
            ms(via),
            human(archive_bytes),
            format!("{:.2}x", post.as_secs_f64() / via.as_secs_f64()),
            post_at_zero
                .map(|zero| format!("{:.2}x", post.as_secs_f64() / zero.as_secs_f64()))
                .unwrap_or_else(|| "-".into()),
        ]);
    }
    if !restore_only {
        print_table(&rows);
        println!();
    }
    let mut rows = vec![vec![
        "pod memory".to_string(),
        "eager: returned / answers".into(),
        "lazy: returned / answers".into(),
        "lazy: every page in".into(),
        "lazy answers / 0 MiB's (<=1.2)".into(),
        "runc-v2 `ctr c restore`: returned / answers".into(),
        "eager / runc-v2, returned (<=1.0)".into(),
        "eager / runc-v2, answers (<=1.0)".into(),
    ]];
    let ctr_image = a.import_busybox()?;
    let mut lazy_at_zero = None;
    for &mib in &memories {
        let (mut eager, mut lazy) = (Vec::new(), Vec::new());
        let (mut runc, mut runc_answers) = (Vec::new(), Vec::new());
        for run in 0..runs {
            let name = format!("l{mib}-{run}");
            let pod = start_pod(&a, &name, image, mib).await?;
            let file = a.dir.join(format!("{name}.tar"));
            a.stasisctl_ok(&[
                "pod",
                "checkpoint",
                &pod,
                "--output",
                file.to_str().unwrap(),
            ])?;
            a.cri().await?.stop_and_remove_pod(&pod).await?;
            // runc-v2 and the eager restore alternate which goes first: whichever follows
            // the other's teardown may meet its writeback.
            let runc_id = format!("c{mib}-{run}");
            let mut runc_run = || -> Result<()> {
                let (returned, answered) = runc_v2_restore(&a, ctr_image, &runc_id, mib)?;
                runc.push(returned);
                runc_answers.push(answered);
                Ok(())
            };
            if run % 2 == 1 {
                runc_run()?;
            }
            eager.push(timed_restore(&a, &file, &name, false).await?);
            if run % 2 == 0 {
                runc_run()?;
            }
            lazy.push(timed_restore(&a, &file, &name, true).await?);
            std::fs::remove_file(&file)?;
        }
        let eager = RestoreTimes::median(&eager);
        let lazy = RestoreTimes::median(&lazy);
        let (runc, runc_answers) = (median_f64(&mut runc), median_f64(&mut runc_answers));
        if mib == 0 {
            lazy_at_zero = Some(lazy.answers);
        }
        rows.push(vec![
            format!("{mib} MiB"),
            format!("{:.0} / {:.0} ms", eager.returned, eager.answers),
            format!("{:.0} / {:.0} ms", lazy.returned, lazy.answers),
            format!("{:.0} ms", lazy.all_in),
            lazy_at_zero
                .map(|z| format!("{:.2}x", lazy.answers / z))
                .unwrap_or_else(|| "-".into()),
            format!("{runc:.0} / {runc_answers:.0} ms"),
            format!("{:.2}x", eager.returned / runc),
            format!("{:.2}x", eager.answers / runc_answers),
        ]);
    }
    print_table(&rows);
    println!("{}", gvisor_background_restore());
    a.finish()?;
    b.finish()
}

/// Whether the installed runsc restores in the background (pages loaded after it runs), the
/// gVisor counterpart of a lazy restore; stasis restores gVisor pods eagerly without it.
fn gvisor_background_restore() -> String {
    let version = std::process::Command::new("runsc")
        .arg("--version")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_string()
        })
        .unwrap_or_else(|e| format!("runsc not found ({e})"));
    let help = std::process::Command::new("runsc")
        .args(["restore", "--help"])
        .output()
        .map(|o| {
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            )
        })
        .unwrap_or_default();
    if help.contains("-background") {
        format!("gVisor ({version}): runsc has restore --background")
    } else {
        format!("gVisor ({version}): no restore --background in this runsc; gVisor pods restore eagerly (no lazy row)")
    }
}
