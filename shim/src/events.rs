//! Task events to containerd, through its ttrpc event service (TTRPC_ADDRESS).

use containerd_shim::{publisher::RemotePublisher, Context};
use log::warn;
use protobuf::MessageDyn;

#[derive(Clone)]
pub struct EventSink {
    publisher: Option<std::sync::Arc<RemotePublisher>>,
    namespace: String,
}

impl EventSink {
    /// Connects to containerd's event service; without one (tests, `delete`) events are dropped.
    pub async fn connect(ttrpc_address: Option<&str>, namespace: &str) -> Self {
        let publisher = match ttrpc_address {
            Some(addr) if !addr.is_empty() => match RemotePublisher::new(addr).await {
                Ok(p) => Some(std::sync::Arc::new(p)),
                Err(e) => {
                    warn!("cannot connect to containerd events at {addr}: {e}");
                    None
                }
            },
            _ => None,
        };
        EventSink {
            publisher,
            namespace: namespace.to_string(),
        }
    }

    pub async fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        let Some(p) = &self.publisher else { return };
        if let Err(e) = p
            .publish(Context::default(), topic, &self.namespace, event)
            .await
        {
            warn!("publish {topic} failed: {e}");
        }
    }
}
