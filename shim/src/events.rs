//! Task events to containerd. Operations publish through the `EventSink` trait; the shim
//! wires in `Publisher` (containerd's ttrpc event service at TTRPC_ADDRESS), unit tests a
//! recorder.

use std::sync::Arc;

use async_trait::async_trait;
use containerd_shim_protos::{
    protobuf::well_known_types::{any::Any, timestamp::Timestamp},
    shim::{event::Envelope, events::ForwardRequest},
    shim_async::EventsClient,
    ttrpc,
};
use log::warn;
use protobuf::MessageDyn;
use tokio::sync::mpsc;

#[async_trait]
pub trait EventSink: Send + Sync {
    /// Publishes one event; a failure is logged, never returned: events must not fail the
    /// operation that produced them.
    async fn publish(&self, topic: &str, event: Box<dyn MessageDyn>);

    /// Queues one event without waiting (dropped with a warning when the queue is full): for
    /// callers inside a frozen window or in synchronous code.
    fn emit(&self, topic: &str, event: Box<dyn MessageDyn>);
}

/// Queues a stasis pod event under its topic (`/stasis/<operation>/<phase>`).
pub fn pod_event(events: &Events, event: stasis_api::events::PodEvent) {
    let topic = stasis_api::events::topic(&event.operation, &event.phase);
    events.emit(&topic, Box::new(event));
}

/// A pod restore's event (`/stasis/restore/<phase>`) about containers `ids`, for the caller
/// to fill in and queue with [`pod_event`].
pub fn restore_event(
    pod_id: &str,
    engine: &str,
    phase: &str,
    ids: &[String],
) -> stasis_api::events::PodEvent {
    stasis_api::events::PodEvent {
        sandbox_id: pod_id.to_string(),
        operation: "restore".into(),
        phase: phase.into(),
        container_ids: ids.to_vec(),
        engine: engine.to_string(),
        ..Default::default()
    }
}

pub type Events = Arc<dyn EventSink>;

/// containerd's event service, or nothing when the shim runs without one (`delete`, by hand).
/// Events go out in order from one queue; a failed forward reconnects and tries again. (The
/// upstream publisher reconnects only on some errors: after a containerd restart its forwards
/// fail with "channel closed" until the events are dropped.)
pub struct Publisher {
    queue: Option<mpsc::Sender<Envelope>>,
    namespace: String,
}

/// Tries per event before it is dropped (with a warning), over about 10 s.
const DELIVERY_TRIES: u32 = 8;

impl Publisher {
    pub async fn connect(ttrpc_address: Option<&str>, namespace: &str) -> Events {
        let queue = match ttrpc_address {
            Some(addr) if !addr.is_empty() => {
                let (tx, rx) = mpsc::channel(1024);
                tokio::spawn(deliver(addr.to_string(), rx));
                Some(tx)
            }
            _ => None,
        };
        Arc::new(Publisher {
            queue,
            namespace: namespace.to_string(),
        })
    }
}

async fn connect(addr: &str) -> Option<EventsClient> {
    let address = if addr.starts_with("unix://") {
        addr.to_string()
    } else {
        format!("unix://{addr}")
    };
    match ttrpc::r#async::Client::connect(&address).await {
        Ok(c) => Some(EventsClient::new(c)),
        Err(e) => {
            warn!("connect to containerd events at {addr}: {e}");
            None
        }
    }
}

async fn deliver(addr: String, mut rx: mpsc::Receiver<Envelope>) {
    let mut client = connect(&addr).await;
    while let Some(envelope) = rx.recv().await {
        let mut req = ForwardRequest::new();
        req.set_envelope(envelope);
        let mut delivered = false;
        for attempt in 0..DELIVERY_TRIES {
            if client.is_none() {
                client = connect(&addr).await;
            }
            if let Some(c) = &client {
                match c
                    .forward(ttrpc::context::with_timeout(5_000_000_000), &req)
                    .await
                {
                    Ok(_) => {
                        delivered = true;
                        break;
                    }
                    Err(e) => {
                        warn!(
                            "forward {} to containerd: {e}; reconnecting",
                            req.envelope.topic
                        );
                        client = None;
                    }
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(250 * (attempt as u64 + 1))).await;
        }
        if !delivered {
            warn!(
                "event {} dropped: containerd unreachable",
                req.envelope.topic
            );
        }
    }
}

impl Publisher {
    fn envelope(&self, topic: &str, event: Box<dyn MessageDyn>) -> Option<Envelope> {
        let mut any = Any::new();
        if let Err(e) = event.write_to_vec_dyn(&mut any.value) {
            warn!("encode {topic}: {e}");
            return None;
        }
        any.type_url = event.descriptor_dyn().full_name().to_string();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let mut envelope = Envelope::new();
        envelope.set_topic(topic.to_string());
        envelope.set_namespace(self.namespace.clone());
        envelope.timestamp = Some(Timestamp {
            seconds: now.as_secs() as i64,
            nanos: now.subsec_nanos() as i32,
            ..Default::default()
        })
        .into();
        envelope.event = Some(any).into();
        Some(envelope)
    }
}

#[async_trait]
impl EventSink for Publisher {
    async fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        let Some(queue) = &self.queue else { return };
        let Some(envelope) = self.envelope(topic, event) else {
            return;
        };
        if queue.send(envelope).await.is_err() {
            warn!("publish {topic}: the event queue is gone");
        }
    }

    fn emit(&self, topic: &str, event: Box<dyn MessageDyn>) {
        let Some(queue) = &self.queue else { return };
        let Some(envelope) = self.envelope(topic, event) else {
            return;
        };
        if let Err(e) = queue.try_send(envelope) {
            warn!("event {topic} dropped: {e}");
        }
    }
}
