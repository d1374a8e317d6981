//! Task events to containerd. Operations publish through the `EventSink` trait; the shim
//! wires in `Publisher` (containerd's ttrpc event service at TTRPC_ADDRESS), unit tests a
//! recorder.

use std::sync::Arc;

use async_trait::async_trait;
use containerd_shim::{publisher::RemotePublisher, Context};
use log::warn;
use protobuf::MessageDyn;

#[async_trait]
pub trait EventSink: Send + Sync {
    /// Publishes one event; a failure is logged, never returned: events must not fail the
    /// operation that produced them.
    async fn publish(&self, topic: &str, event: Box<dyn MessageDyn>);
}

pub type Events = Arc<dyn EventSink>;

/// containerd's event service, or nothing when the shim runs without one (`delete`, by hand).
pub struct Publisher {
    remote: Option<RemotePublisher>,
    namespace: String,
}

impl Publisher {
    pub async fn connect(ttrpc_address: Option<&str>, namespace: &str) -> Events {
        let remote = match ttrpc_address {
            Some(addr) if !addr.is_empty() => match RemotePublisher::new(addr).await {
                Ok(p) => Some(p),
                Err(e) => {
                    warn!("cannot connect to containerd events at {addr}: {e}");
                    None
                }
            },
            _ => None,
        };
        Arc::new(Publisher {
            remote,
            namespace: namespace.to_string(),
        })
    }
}

#[async_trait]
impl EventSink for Publisher {
    async fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        let Some(p) = &self.remote else { return };
        if let Err(e) = p
            .publish(Context::default(), topic, &self.namespace, event)
            .await
        {
            warn!("publish {topic} failed: {e}");
        }
    }
}
