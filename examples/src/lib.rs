//! Shared pieces of the demo and the benchmarks.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use stasis_e2e::Containerd;

pub mod consistency;
pub mod peers;

/// Median of a set of durations.
pub fn median(samples: &mut [Duration]) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

/// Resident set size of a process in KiB, from /proc.
pub fn rss_kib(pid: i32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// Prints a table with a header row (the same renderer as `stasisctl bench`).
pub fn print_table(rows: &[Vec<String>]) {
    print!("{}", stasis_controller::bench::render_table(rows));
}

/// The comma-separated numbers after `--name` on the command line, else those of `default`.
pub fn numbers(args: &[String], name: &str, default: &str) -> Result<Vec<u64>> {
    Ok(flag(args, name)
        .unwrap_or_else(|| default.to_string())
        .split(',')
        .map(|s| s.parse())
        .collect::<Result<_, _>>()?)
}

/// The value after `--name` on the command line.
pub fn flag(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

/// The soaks' `--seed N`, or one from the clock (printed by the soak, so a run can be
/// repeated).
pub fn seed_from(args: &[String]) -> Result<u64> {
    Ok(match flag(args, "--seed") {
        Some(s) => s.parse()?,
        None => {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_nanos() as u64
                | 1
        }
    })
}

/// xorshift64*: reproducible choices from a printed seed (nothing secret).
pub struct Dice(pub u64);

impl Dice {
    /// A number below `n` (0 for n = 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n.max(1)
    }
}

/// Bytes in KiB/MiB/GiB.
pub fn human(bytes: u64) -> String {
    let v = bytes as f64;
    if v >= 1024.0 * 1024.0 * 1024.0 {
        format!("{:.1} GiB", v / (1024.0 * 1024.0 * 1024.0))
    } else if v >= 1024.0 * 1024.0 {
        format!("{:.1} MiB", v / (1024.0 * 1024.0))
    } else {
        format!("{:.1} KiB", v / 1024.0)
    }
}

/// Runs `sh -c script` as container `id` through ctr with `runtime` and waits until the
/// file `probe` inside it is not empty.
pub fn ctr_start(
    c: &Containerd,
    runtime: &str,
    image: &str,
    id: &str,
    script: &str,
    probe: &str,
) -> Result<()> {
    c.ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        runtime,
        image,
        id,
        "sh",
        "-c",
        script,
    ])?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let out = c.ctr(&["tasks", "exec", "--exec-id", "probe", id, "cat", probe])?;
        if out.status.success() && !out.stdout.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{id}: workload not ready");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Kills and deletes a container started through ctr.
pub fn ctr_remove(c: &Containerd, id: &str) {
    let _ = c.ctr(&["tasks", "kill", "-s", "KILL", id]);
    for _ in 0..50 {
        if c.ctr(&["tasks", "delete", id])
            .map(|o| o.status.success())
            .unwrap_or(false)
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = c.ctr(&["containers", "delete", id]);
}

/// A workload that touches `mib` MiB of memory and then writes /ready (0: a counter that
/// writes /ready from the start).
pub fn memory_workload(mib: u64) -> String {
    if mib == 0 {
        "i=0; while true; do i=$((i+1)); echo $i > /ready; sleep 0.01; done".to_string()
    } else {
        stasis_controller::workload::memory_hog(mib)
    }
}

/// A stasis pod `name` with one container "app" running [`memory_workload`], ready.
pub async fn start_memory_pod(c: &Containerd, name: &str, image: &str, mib: u64) -> Result<String> {
    use stasis_e2e::cri::{container_config, pod_config};
    let mut cri = c.cri().await?;
    let pod = pod_config(name, &c.dir.join("logs"));
    let pod_id = cri.run_pod(&pod).await?;
    let id = cri
        .run_container(
            &pod_id,
            &pod,
            container_config("app", image, &["sh", "-c", &memory_workload(mib)]),
        )
        .await?;
    stasis_e2e::cri::wait_ready(&mut cri, &id, "/ready", Duration::from_secs(300)).await?;
    Ok(pod_id)
}

/// Runs `f`, returning how long it took.
pub fn timed<T>(f: impl FnOnce() -> Result<T>) -> Result<(T, Duration)> {
    let t = Instant::now();
    let v = f()?;
    Ok((v, t.elapsed()))
}

/// Time from `started` until a running container of the pod named `pod_name` on `node`
/// answers an exec, polled through CRI from outside stasisctl (at most `limit`).
pub async fn first_answer(
    node: &Containerd,
    pod_name: &str,
    started: Instant,
    limit: Duration,
) -> Result<Duration> {
    let mut cri = node.cri().await?;
    // Every refused exec costs containerd and the shim CPU that the restore being timed shares
    // (2 cores here): the probe starts every 10 ms and backs off to every 25 ms.
    let mut pause = Duration::from_millis(10);
    loop {
        if started.elapsed() > limit {
            bail!("no container of pod {pod_name} answered within {limit:?}");
        }
        for pod in cri.pods().await? {
            if pod.metadata.as_ref().map(|m| m.name.as_str()) != Some(pod_name) {
                continue;
            }
            let running = stasis_e2e::cri::containers_by_name(&mut cri, &pod.id).await?;
            for (_, id, state) in running {
                // 1: CONTAINER_RUNNING. A restored container refuses execs until its whole
                // pod is restored, so the first answer is the time to running.
                if state == 1 && matches!(cri.exec(&id, &["true"]).await, Ok((0, _, _))) {
                    return Ok(started.elapsed());
                }
            }
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 3 / 2).min(Duration::from_millis(25));
    }
}

/// Waits for `child` (a restore or migration started at `started`) and for the first answer
/// of its pod `pod_name` on `node`; returns (answered, the command's output, its end). A
/// command that fails before any answer ends the wait at once.
pub async fn answered_while(
    node: &Containerd,
    pod_name: &str,
    child: std::process::Child,
    started: Instant,
) -> Result<(Duration, std::process::Output, Duration)> {
    let mut ended = tokio::task::spawn_blocking(move || {
        let out = child.wait_with_output();
        (out, started.elapsed())
    });
    let answer = first_answer(node, pod_name, started, Duration::from_secs(300));
    tokio::pin!(answer);
    tokio::select! {
        a = &mut answer => {
            let answered = a?;
            let (out, returned) = ended.await?;
            Ok((answered, out?, returned))
        }
        r = &mut ended => {
            let (out, returned) = r?;
            let out = out?;
            if !out.status.success() {
                bail!(
                    "{pod_name}: the command failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            Ok((answer.await?, out, returned))
        }
    }
}

/// Empties the page cache so that the next read of a file comes from disk. Dirty pages are
/// written back first: drop_caches drops only clean ones, so a file written just before
/// (an archive copied over) would otherwise be read from memory while others come from disk.
pub fn drop_caches() {
    let _ = std::process::Command::new("sync").status();
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}
