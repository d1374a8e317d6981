//! The pod checkpoint's events on containerd's event service (`/stasis/checkpoint/*`): queued,
//! never awaited, so announcing costs nothing inside the frozen window.

use stasis_api::{checkpoint::CheckpointPodResponse, events::PodEvent};

use crate::events::{pod_event, Events};

/// One pod checkpoint's announcer: what every event of it carries.
#[derive(Clone)]
pub struct Announce {
    events: Events,
    base: PodEvent,
}

impl Announce {
    pub fn new(
        events: Events,
        engine: &str,
        pod_id: &str,
        ids: &[String],
        leave_running: bool,
    ) -> Self {
        Announce {
            events,
            base: PodEvent {
                sandbox_id: pod_id.to_string(),
                operation: "checkpoint".into(),
                container_ids: ids.to_vec(),
                leave_running,
                engine: engine.to_string(),
                ..Default::default()
            },
        }
    }

    fn send(&self, phase: &str, fill: impl FnOnce(&mut PodEvent)) {
        let mut event = self.base.clone();
        event.phase = phase.to_string();
        fill(&mut event);
        pod_event(&self.events, event);
    }

    /// The checkpoint passed its checks and takes these containers: `started`.
    pub fn selected(&mut self, ids: &[String]) {
        self.base.container_ids = ids.to_vec();
        self.phase("started");
    }

    /// What a backend tells of the frozen window (`PodCheckpoint::on_phase`).
    pub fn phase_sink(&self) -> impl Fn(&'static str) + Send + Sync {
        let a = self.clone();
        move |phase| a.phase(phase)
    }

    /// started, frozen, thawed, stopped, resumed: nothing to add.
    pub fn phase(&self, phase: &str) {
        self.send(phase, |_| {});
    }

    pub fn finished(&self, resp: &CheckpointPodResponse) {
        self.send("finished", |e| {
            if let Some(t) = resp.timings.as_ref() {
                e.frozen_ms = t.frozen_ms;
                e.dump_ms = t.dump_ms;
                e.total_ms = t.total_ms;
            }
        });
    }

    pub fn failed(&self, error: &dyn std::fmt::Display) {
        self.send("failed", |e| e.error = error.to_string());
    }
}
