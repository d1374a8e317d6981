//! Shared pieces of the demo and the benchmarks.

use std::time::Duration;

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

/// The value after `--name` on the command line.
pub fn flag(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
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
