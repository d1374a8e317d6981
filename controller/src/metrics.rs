//! `stasisctl metrics serve`: stasis's events on this node, counted and timed in the
//! Prometheus text format. The numbers come from containerd's event service, not from the
//! shims: a pod's shim lives only as long as its pod, and one endpoint per node is what a
//! cluster scrapes. What happened while the endpoint was not running is not counted (as with
//! any exporter that follows events).

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::{Context, Result};
use futures::StreamExt;
use http_body_util::Full;
use hyper::{body::Bytes, server::conn::http1, service::service_fn, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::{
    encoding::{text::encode, EncodeLabelSet},
    metrics::{
        counter::Counter,
        family::Family,
        histogram::{exponential_buckets, Histogram},
    },
    registry::Registry,
};
use stasis_api::events::PodEvent;

use crate::events::{follow, Received};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    /// The event's phase that ended the operation: finished, running, failed, ...
    result: String,
    engine: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Topic {
    topic: String,
}

/// What the endpoint exposes.
pub struct Metrics {
    registry: Registry,
    events: Family<Topic, Counter>,
    checkpoints: Family<Outcome, Counter>,
    restores: Family<Outcome, Counter>,
    migrations: Family<Outcome, Counter>,
    frozen: Histogram,
    dump: Histogram,
    checkpoint: Histogram,
    archive_bytes: Histogram,
    pages_in: Histogram,
    downtime: Histogram,
    pages_served: Counter,
    page_requests: Counter,
}

/// Seconds from 10 ms to about 80 s.
fn seconds() -> impl Iterator<Item = f64> {
    exponential_buckets(0.01, 2.0, 14)
}

impl Default for Metrics {
    fn default() -> Self {
        let mut m = Metrics {
            registry: Registry::with_prefix("stasis"),
            events: Default::default(),
            checkpoints: Default::default(),
            restores: Default::default(),
            migrations: Default::default(),
            frozen: Histogram::new(seconds()),
            dump: Histogram::new(seconds()),
            checkpoint: Histogram::new(seconds()),
            // 1 MiB to 64 GiB.
            archive_bytes: Histogram::new(exponential_buckets(1048576.0, 4.0, 9)),
            pages_in: Histogram::new(seconds()),
            downtime: Histogram::new(seconds()),
            pages_served: Default::default(),
            page_requests: Default::default(),
        };
        let r = &mut m.registry;
        r.register("events", "stasis events seen, by topic", m.events.clone());
        r.register(
            "restore_pages_served_bytes",
            "Memory the shims' page servers sent to restored containers (lazy restores, and eager ones that read pages from the checkpoint)",
            m.pages_served.clone(),
        );
        r.register(
            "restore_page_requests",
            "Page requests the shims' page servers answered: faults and background fetches alike (CRIU's page-server protocol does not tell them apart)",
            m.page_requests.clone(),
        );
        for (name, help, family) in [
            (
                "checkpoints",
                "Pod checkpoints taken by a shim, by result (finished or failed) and engine",
                &m.checkpoints,
            ),
            (
                "restores",
                "Pod restores, by result (running or failed) and engine",
                &m.restores,
            ),
            (
                "migrations",
                "Pod migrations seen from the source node, by result",
                &m.migrations,
            ),
        ] {
            r.register(name, help, family.clone());
        }
        for (name, help, histogram) in [
            (
                "checkpoint_frozen_seconds",
                "How long a pod checkpoint kept the pod frozen",
                &m.frozen,
            ),
            (
                "checkpoint_dump_seconds",
                "The slowest container's dump of a pod checkpoint",
                &m.dump,
            ),
            (
                "checkpoint_seconds",
                "A pod checkpoint in its shim, from the request to the written capture",
                &m.checkpoint,
            ),
            (
                "checkpoint_archive_bytes",
                "Size of a written checkpoint (archive, directory or image)",
                &m.archive_bytes,
            ),
            (
                "restore_pages_in_seconds",
                "From a lazy restore's start until a container has every page",
                &m.pages_in,
            ),
            (
                "migration_downtime_seconds",
                "From the freeze on the source until the pod runs on the target",
                &m.downtime,
            ),
        ] {
            r.register(name, help, histogram.clone());
        }
        m
    }
}

impl Metrics {
    /// Counts one event.
    pub fn record(&self, r: &Received) {
        let e: &PodEvent = &r.event;
        self.events
            .get_or_create(&Topic {
                topic: r.topic.clone(),
            })
            .inc();
        let outcome = Outcome {
            result: e.phase.clone(),
            engine: e.engine.clone(),
        };
        match (e.operation.as_str(), e.phase.as_str()) {
            ("checkpoint", "finished") => {
                self.checkpoints.get_or_create(&outcome).inc();
                self.frozen.observe(e.frozen_ms / 1000.0);
                self.dump.observe(e.dump_ms / 1000.0);
                self.checkpoint.observe(e.total_ms / 1000.0);
            }
            ("checkpoint", "failed") => {
                self.checkpoints.get_or_create(&outcome).inc();
            }
            ("checkpoint", "written") => self.archive_bytes.observe(e.bytes as f64),
            ("restore", "running" | "failed") => {
                self.restores.get_or_create(&outcome).inc();
            }
            ("restore", phase @ ("pages-in" | "pages-failed")) => {
                if phase == "pages-in" {
                    self.pages_in.observe(e.pages_in_ms / 1000.0);
                }
                self.pages_served.inc_by(e.bytes);
                self.page_requests.inc_by(e.page_requests);
            }
            ("migrate", "finished") => {
                self.migrations.get_or_create(&outcome).inc();
                self.downtime.observe(e.downtime_ms / 1000.0);
            }
            ("migrate", "failed") => {
                self.migrations.get_or_create(&outcome).inc();
            }
            _ => {}
        }
    }

    /// The Prometheus text exposition of everything counted so far.
    pub fn text(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// Follows containerd's events into `metrics`, subscribing again whenever the stream ends
/// (a containerd restart).
async fn count(address: String, metrics: Arc<Metrics>) {
    loop {
        match follow(&address).await {
            Ok(stream) => {
                futures::pin_mut!(stream);
                while let Some(item) = stream.next().await {
                    match item {
                        Ok(r) => metrics.record(&r),
                        Err(e) => {
                            eprintln!("stasisctl metrics: {e:#}; subscribing again");
                            break;
                        }
                    }
                }
            }
            Err(e) => eprintln!("stasisctl metrics: {e:#}; trying again in 1 s"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Serves `GET /metrics` on `listen` until the process ends.
pub async fn serve(address: &str, listen: SocketAddr) -> Result<()> {
    let metrics = Arc::new(Metrics::default());
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("listen on {listen}"))?;
    eprintln!(
        "serving stasis metrics on http://{}/metrics (events of containerd at {address})",
        listener.local_addr()?
    );
    tokio::spawn(count(address.to_string(), metrics.clone()));
    // A bounded number of connections, each for a bounded time: idle clients cannot use up
    // the process's files and end the endpoint.
    let slots = Arc::new(tokio::sync::Semaphore::new(64));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("stasisctl metrics: accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            eprintln!("stasisctl metrics: {peer} refused: 64 connections open");
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let answer = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let metrics = metrics.clone();
                async move { Ok::<_, std::convert::Infallible>(respond(&metrics, &req)) }
            });
            let conn = http1::Builder::new()
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), answer);
            let _ = tokio::time::timeout(Duration::from_secs(10), conn).await;
        });
    }
}

fn respond<B>(metrics: &Metrics, req: &hyper::Request<B>) -> Response<Full<Bytes>> {
    let (status, body, kind) = if req.uri().path() == "/metrics" {
        (
            StatusCode::OK,
            metrics.text(),
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )
    } else {
        (
            StatusCode::NOT_FOUND,
            "not found: the metrics are at /metrics\n".to_string(),
            "text/plain; charset=utf-8",
        )
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    if let Ok(v) = kind.parse() {
        resp.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn received(operation: &str, phase: &str, fill: impl FnOnce(&mut PodEvent)) -> Received {
        let mut event = PodEvent {
            operation: operation.into(),
            phase: phase.into(),
            engine: "runc".into(),
            ..Default::default()
        };
        fill(&mut event);
        Received {
            at: 0.0,
            namespace: "k8s.io".into(),
            topic: format!("/stasis/{operation}/{phase}"),
            event,
        }
    }

    #[test]
    fn events_become_counters_and_histograms() {
        let m = Metrics::default();
        m.record(&received("checkpoint", "finished", |e| {
            e.frozen_ms = 250.0;
            e.dump_ms = 200.0;
        }));
        m.record(&received("checkpoint", "failed", |_| {}));
        m.record(&received("checkpoint", "written", |e| e.bytes = 5 << 20));
        m.record(&received("migrate", "finished", |e| e.downtime_ms = 400.0));
        m.record(&received("restore", "pages-in", |e| {
            e.bytes = 8192;
            e.page_requests = 2;
        }));
        m.record(&received("restore", "pages-failed", |e| {
            e.bytes = 4096;
            e.page_requests = 1;
        }));
        let text = m.text();
        for line in [
            r#"stasis_checkpoints_total{result="finished",engine="runc"} 1"#,
            r#"stasis_checkpoints_total{result="failed",engine="runc"} 1"#,
            "stasis_checkpoint_frozen_seconds_sum 0.25",
            "stasis_checkpoint_frozen_seconds_count 1",
            "stasis_checkpoint_archive_bytes_count 1",
            "stasis_migration_downtime_seconds_sum 0.4",
            r#"stasis_events_total{topic="/stasis/checkpoint/written"} 1"#,
            "stasis_restore_pages_served_bytes_total 12288",
            "stasis_restore_page_requests_total 3",
            "stasis_restore_pages_in_seconds_count 1",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
    }
}
