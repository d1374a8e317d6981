//! stasisctl's own log: `tracing` events inside spans that name the operation and the pod
//! (`checkpoint{pod=web pod_id=…}`), on stderr, at the level `STASIS_LOG` asks for (`warn`
//! when unset; `debug` shows every step, `STASIS_LOG=stasis_controller=debug` only
//! stasisctl's own). Progress and results are reported apart from it (`progress`).

use tracing_subscriber::{filter::Targets, layer::SubscriberExt, util::SubscriberInitExt};

/// The environment variable that sets the log's levels.
pub const LOG_ENV: &str = "STASIS_LOG";

/// Starts the log; a filter that does not parse is said once and the default used.
pub fn init() {
    let wanted = std::env::var(LOG_ENV).unwrap_or_default();
    let filter = match wanted.trim() {
        "" => Targets::new().with_default(tracing::Level::WARN),
        w => w.parse::<Targets>().unwrap_or_else(|e| {
            eprintln!(
                "stasisctl: {LOG_ENV}={w:?} is not a log filter ({e}); logging warnings only"
            );
            Targets::new().with_default(tracing::Level::WARN)
        }),
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
