//! stasisctl's own log: `tracing` events inside spans that name the operation and the pod
//! (`checkpoint{pod=web pod_id=…}`), on stderr, at the level `STASIS_LOG` asks for: warnings
//! when unset; a level alone (`debug`, `info`) is stasisctl's own events at that level; a
//! list of `target=level` (`STASIS_LOG=warn,stasis_controller=debug,h2=debug`) what it says,
//! the libraries' too. Progress and results are reported apart from it (`progress`).

use tracing_subscriber::{filter::Targets, layer::SubscriberExt, util::SubscriberInitExt};

/// The environment variable that sets the log's levels.
pub const LOG_ENV: &str = "STASIS_LOG";

/// Starts the log; a filter that does not parse is said once and the default used.
pub fn init() {
    let wanted = std::env::var(LOG_ENV).unwrap_or_default();
    let quiet = Targets::new().with_default(tracing::Level::WARN);
    let filter = match wanted.trim() {
        "" => quiet,
        w => {
            match (w.parse::<tracing::Level>(), w.parse::<Targets>()) {
                (Ok(level), _) => quiet.with_target("stasis_controller", level),
                (_, Ok(targets)) => targets,
                (_, Err(e)) => {
                    eprintln!("stasisctl: {LOG_ENV}={w:?} is not a log filter ({e}); logging warnings only");
                    quiet
                }
            }
        }
    };
    let format = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_target(false);
    let _ = tracing_subscriber::registry()
        .with(format)
        .with(filter)
        .try_init();
}

/// Logs (debug) what this command read and wrote through the kernel, from `/proc/self/io`:
/// `rchar`/`wchar` count every byte passed by read and write calls (page cache included),
/// `read_bytes`/`write_bytes` what reached the disk. How a benchmark counts copies.
pub fn io_summary() {
    if !tracing::enabled!(tracing::Level::DEBUG) {
        return;
    }
    let Ok(text) = std::fs::read_to_string("/proc/self/io") else {
        return;
    };
    let field = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| {
                l.strip_prefix(name)?
                    .strip_prefix(": ")?
                    .trim()
                    .parse()
                    .ok()
            })
            .unwrap_or_default()
    };
    tracing::debug!(
        rchar = field("rchar"),
        wchar = field("wchar"),
        read_bytes = field("read_bytes"),
        write_bytes = field("write_bytes"),
        "io of this command"
    );
}
