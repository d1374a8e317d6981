//! `stasisctl events` and `stasisctl metrics serve`: what stasis does on this node, followed
//! through containerd's event service.

use std::net::SocketAddr;

use anyhow::Result;
use clap::Subcommand;
use futures::StreamExt;
use stasis_api::events::PodEvent;

use super::args::Format;
use crate::{display::human, events::Received, ops::Target};

#[derive(Subcommand)]
pub(super) enum MetricsCommand {
    /// Serve Prometheus metrics at http://LISTEN/metrics: pod checkpoints and restores by
    /// result, frozen window, dump time, checkpoint size, lazy restores' time to every page,
    /// migrations and their downtime. Counted from containerd's events while this runs.
    Serve {
        /// Address and port to listen on (keep it on loopback or a node-local network).
        #[arg(long, default_value = "127.0.0.1:9464")]
        listen: SocketAddr,
    },
}

pub(super) async fn metrics(t: &Target, command: MetricsCommand) -> Result<()> {
    match command {
        MetricsCommand::Serve { listen } => crate::metrics::serve(&t.address, listen).await,
    }
}

/// Prints stasis's events as they come, in every namespace, until stopped (or `count`).
pub(super) async fn events(t: &Target, format: Format, count: u32) -> Result<()> {
    let stream = crate::events::follow(&t.address).await?;
    futures::pin_mut!(stream);
    let mut seen = 0;
    while let Some(item) = stream.next().await {
        let r = item?;
        match format {
            Format::Json => println!("{}", serde_json::to_string(&as_json(&r))?),
            Format::Table => println!("{}", line(&r)),
        }
        seen += 1;
        if count > 0 && seen >= count {
            break;
        }
    }
    Ok(())
}

/// The stable JSON form of one event (`--format json`): one object per line.
fn as_json(r: &Received) -> serde_json::Value {
    let e: &PodEvent = &r.event;
    serde_json::json!({
        "time": r.at,
        "namespace": r.namespace,
        "topic": r.topic,
        "operation": e.operation,
        "phase": e.phase,
        "pod_id": e.sandbox_id,
        "pod_name": e.pod_name,
        "container_ids": e.container_ids,
        "error": e.error,
        "leave_running": e.leave_running,
        "frozen_ms": e.frozen_ms,
        "dump_ms": e.dump_ms,
        "total_ms": e.total_ms,
        "bytes": e.bytes,
        "downtime_ms": e.downtime_ms,
        "pages_in_ms": e.pages_in_ms,
        "page_requests": e.page_requests,
        "engine": e.engine,
    })
}

/// One line for people: the topic, the pod and what the event measured.
fn line(r: &Received) -> String {
    let e = &r.event;
    let when = time::OffsetDateTime::from_unix_timestamp_nanos((r.at * 1e9) as i128)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default();
    let pod = match (e.pod_name.as_str(), e.sandbox_id.get(..12)) {
        ("", Some(id)) => id.to_string(),
        (name, Some(id)) => format!("{name} ({id})"),
        (name, None) => name.to_string(),
    };
    // Names and errors come from pods and archives: control characters are shown escaped.
    let pod = pod.escape_debug();
    let mut out = format!(
        "{when} {} {} pod {pod}",
        r.namespace,
        r.topic.escape_debug()
    );
    if !e.container_ids.is_empty() {
        out += &format!(", {} container(s)", e.container_ids.len());
    }
    for (label, v) in [
        ("frozen", e.frozen_ms),
        ("dump", e.dump_ms),
        ("total", e.total_ms),
        ("downtime", e.downtime_ms),
        ("pages in after", e.pages_in_ms),
    ] {
        if v > 0.0 {
            out += &format!(", {label} {v:.0} ms");
        }
    }
    if e.bytes > 0 {
        out += &format!(", {}", human(e.bytes));
    }
    if !e.error.is_empty() {
        out += &format!(": {}", e.error.escape_debug());
    }
    out
}
