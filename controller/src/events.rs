//! stasis's events on containerd's event service: stasisctl publishes what only it knows (an
//! archive's size, a migration's downtime) beside what the pod's shim publishes, and follows
//! them all (`stasisctl events`, the metrics endpoint).

use std::path::Path;

use anyhow::{Context, Result};
use containerd_client::services::v1::{
    events_client::EventsClient, PublishRequest, SubscribeRequest,
};
use futures::{Stream, StreamExt};
use protobuf::{Message, MessageFull};
use stasis_api::events::{topic, PodEvent, TOPIC_FILTER};
use tonic::Request;

/// One stasis event as containerd delivered it.
#[derive(Debug, Clone)]
pub struct Received {
    /// Seconds since the epoch, as containerd stamped it.
    pub at: f64,
    pub namespace: String,
    pub topic: String,
    pub event: PodEvent,
}

/// Publishes `event` under its topic in `namespace`. Best effort: an event must never fail
/// the operation it reports, so a failure is only logged on stderr.
pub async fn publish(address: &str, namespace: &str, event: PodEvent) {
    let bounded = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        try_publish(address, namespace, &event),
    );
    let published = bounded
        .await
        .unwrap_or_else(|_| Err(anyhow::anyhow!("containerd did not answer within 5 s")));
    if let Err(e) = published {
        eprintln!(
            "stasisctl: event {} not published: {e:#}",
            topic(&event.operation, &event.phase)
        );
    }
}

async fn try_publish(address: &str, namespace: &str, event: &PodEvent) -> Result<()> {
    let channel = crate::cri::channel(Path::new(address)).await?;
    let value = event.write_to_bytes().context("encode the event")?;
    let mut req = Request::new(PublishRequest {
        topic: topic(&event.operation, &event.phase),
        event: Some(prost_types::Any {
            type_url: PodEvent::descriptor().full_name().to_string(),
            value,
        }),
    });
    req.metadata_mut()
        .insert("containerd-namespace", namespace.parse()?);
    EventsClient::new(channel)
        .publish(req)
        .await
        .context("containerd's event service")?;
    Ok(())
}

/// Every stasis event from now on, in every namespace, until containerd goes away. Events of
/// other types under stasis's topics are skipped.
pub async fn follow(address: &str) -> Result<impl Stream<Item = Result<Received>>> {
    let channel = crate::cri::channel(Path::new(address)).await?;
    let stream = EventsClient::new(channel)
        .subscribe(SubscribeRequest {
            filters: vec![TOPIC_FILTER.to_string()],
        })
        .await
        .context("subscribe to containerd's events")?
        .into_inner();
    Ok(stream.filter_map(|item| async move {
        let envelope = match item {
            Ok(e) => e,
            Err(e) => return Some(Err(anyhow::Error::from(e).context("containerd's events"))),
        };
        let any = envelope.event?;
        let event = PodEvent::parse_from_bytes(&any.value).ok()?;
        let at = envelope
            .timestamp
            .map(|t| t.seconds as f64 + t.nanos as f64 / 1e9)
            .unwrap_or_default();
        Some(Ok(Received {
            at,
            namespace: envelope.namespace,
            topic: envelope.topic,
            event,
        }))
    }))
}
