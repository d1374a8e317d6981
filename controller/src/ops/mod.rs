//! What stasisctl does to pods, one operation a module: list, checkpoint (to an archive, a
//! directory, an image or a migration stream), restore (from the same four), migrate (a
//! checkpoint to a stream on one node, a restore from it on the other). Operations talk to
//! containerd (CRI) and the pod's shim; they print progress on stderr and leave the printing
//! of results to the command line.

use anyhow::{Context, Result};

pub mod checkpoint;
pub mod guard;
pub mod inspect;
pub mod ls;
pub mod migrate;
pub mod restore;
pub mod store;

/// Where stasisctl talks to containerd.
pub struct Target {
    pub address: String,
    pub namespace: String,
}

/// A ttrpc deadline of `secs` seconds.
fn ttrpc_ctx(secs: u64) -> ttrpc::context::Context {
    ttrpc::context::with_timeout((secs as i64) * 1_000_000_000)
}

/// Milliseconds of a duration, as the tables show them.
fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// SIGINT or SIGTERM while an operation runs: noticed, so that a half-done checkpoint or
/// restore is undone (the pod thawed, the half-restored pod and its files removed) instead of
/// left behind.
struct Interrupt {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
}

impl Interrupt {
    fn listen() -> Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Interrupt {
            int: signal(SignalKind::interrupt()).context("listen for SIGINT")?,
            term: signal(SignalKind::terminate()).context("listen for SIGTERM")?,
        })
    }

    async fn received(&mut self) -> &'static str {
        tokio::select! {
            _ = self.int.recv() => "SIGINT",
            _ = self.term.recv() => "SIGTERM",
        }
    }
}
