//! Benchmark: the same workloads through containerd's own `io.containerd.runc.v2` and through
//! `io.containerd.stasis.v2`, in one run on one private containerd. Prints a table with ratios.
//!
//!     sudo scripts/bench.sh runtime [--runs N]

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use stasis_e2e::{processes_matching, Containerd, RUNC_RUNTIME, STASIS_RUNTIME};
use stasis_examples::{median, print_table, rss_kib};

fn main() -> Result<()> {
    let mut runs = 20usize;
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--runs") {
        runs = args.get(i + 1).context("--runs N")?.parse()?;
    }
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("bench_runtime [--runs N]: start-to-exit latency (median of N `ctr run --rm … true`) and shim RSS, runc-v2 vs stasis");
        return Ok(());
    }
    let c = Containerd::start("bench-runtime")?;
    let image = c.import_busybox()?;
    let runtimes = [RUNC_RUNTIME, STASIS_RUNTIME];
    let mut latency = Vec::new();
    let mut rss = Vec::new();
    for rt in runtimes {
        // One warm-up run so both pay for a cold page cache equally.
        run_once(&c, rt, image, "warm")?;
        let mut samples = Vec::new();
        for i in 0..runs {
            samples.push(run_once(&c, rt, image, &format!("lat{i}"))?);
        }
        let p50 = median(&mut samples);
        let p90 = samples[samples.len() * 9 / 10 - usize::from(samples.len() >= 10)];
        latency.push((p50, p90));
        eprintln!("{rt}: median {p50:?} over {runs} runs");

        let id = format!("rss-{}", rt.replace('.', "-"));
        c.ctr_ok(&["run", "-d", "--runtime", rt, image, &id, "sleep", "1000"])?;
        std::thread::sleep(Duration::from_millis(500));
        let binary = if rt == RUNC_RUNTIME {
            "containerd-shim-runc-v2"
        } else {
            "containerd-shim-stasis-v2"
        };
        let pid = *processes_matching(&[binary, &c.namespace])
            .first()
            .with_context(|| format!("no {binary} process"))?;
        rss.push(rss_kib(pid).context("read shim RSS")?);
        c.ctr_ok(&["tasks", "kill", "-s", "KILL", &id])?;
        std::thread::sleep(Duration::from_millis(300));
        let _ = c.ctr(&["tasks", "delete", &id]);
        c.ctr_ok(&["containers", "delete", &id])?;
    }
    let ms = |d: Duration| format!("{:.1} ms", d.as_secs_f64() * 1000.0);
    let ratio = |a: f64, b: f64| format!("{:.2}x", a / b);
    let rows = vec![
        vec![
            "metric".into(),
            "runc-v2 (baseline)".into(),
            "stasis".into(),
            "stasis / runc-v2".into(),
            "target".into(),
        ],
        vec![
            format!("start-to-exit latency, median of {runs}"),
            ms(latency[0].0),
            ms(latency[1].0),
            ratio(latency[1].0.as_secs_f64(), latency[0].0.as_secs_f64()),
            "<= 1.0x".into(),
        ],
        vec![
            format!("start-to-exit latency, p90 of {runs}"),
            ms(latency[0].1),
            ms(latency[1].1),
            ratio(latency[1].1.as_secs_f64(), latency[0].1.as_secs_f64()),
            "-".into(),
        ],
        vec![
            "shim RSS, one running container".into(),
            format!("{:.1} MiB", rss[0] as f64 / 1024.0),
            format!("{:.1} MiB", rss[1] as f64 / 1024.0),
            ratio(rss[1] as f64, rss[0] as f64),
            "<= 0.5x".into(),
        ],
    ];
    print_table(&rows);
    Ok(())
}

fn run_once(c: &Containerd, runtime: &str, image: &str, id: &str) -> Result<Duration> {
    let start = Instant::now();
    let out = c.ctr(&["run", "--rm", "--runtime", runtime, image, id, "true"])?;
    let took = start.elapsed();
    if !out.status.success() {
        bail!(
            "{runtime}: ctr run failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(took)
}
