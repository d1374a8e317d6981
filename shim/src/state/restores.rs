//! How each restored container's restore ended, for the Checkpoint service's RestoreStatus:
//! a lazily restored container is pending until every page is in (or it was stopped short).

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use stasis_api::checkpoint::RestoreState;

use crate::runtime::pages::PageCounters;

/// The outcome of one container's restore.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub state: RestoreState,
    /// Why a restore failed.
    pub reason: String,
    /// A lazy restore that completed: how long after its start the last page was in.
    pub pages_in: Option<Duration>,
}

/// Every restored container's outcome, by container id, and a wake-up for those who wait
/// for the pending ones.
#[derive(Default)]
pub struct RestoreOutcomes {
    by_id: Mutex<BTreeMap<String, Outcome>>,
    /// Containers restored through the page server for an eager restore: the pod resumes
    /// only once each has every page.
    before_resume: Mutex<std::collections::BTreeSet<String>>,
    /// What the page server of each container served from the archive has sent so far.
    served: Mutex<BTreeMap<String, Arc<PageCounters>>>,
    changed: tokio::sync::Notify,
}

impl RestoreOutcomes {
    /// Records (or replaces) container `id`'s outcome.
    pub fn record(&self, id: &str, state: RestoreState, reason: impl Into<String>) {
        self.put(
            id,
            Outcome {
                state,
                reason: reason.into(),
                pages_in: None,
            },
        );
    }

    /// Container `id`'s lazy restore got its last page, `after` its start.
    pub fn complete(&self, id: &str, after: Duration) {
        self.put(
            id,
            Outcome {
                state: RestoreState::RESTORE_COMPLETE,
                reason: String::new(),
                pages_in: Some(after),
            },
        );
    }

    fn put(&self, id: &str, outcome: Outcome) {
        self.by_id
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_string(), outcome);
        self.changed.notify_waiters();
    }

    /// Container `id` must have every page before its pod resumes.
    pub fn hold_for_pages(&self, id: &str) {
        self.pages_first().insert(id.to_string());
    }

    /// Whether container `id` must have every page before its pod resumes.
    pub fn is_held_for_pages(&self, id: &str) -> bool {
        self.pages_first().contains(id)
    }

    /// The containers that must have every page before their pod resumes.
    pub fn held_for_pages(&self) -> Vec<String> {
        self.pages_first().iter().cloned().collect()
    }

    fn pages_first(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeSet<String>> {
        self.before_resume.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Container `id`'s pages come from the shim's page server, which counts into `c`.
    pub fn count_pages(&self, id: &str, c: Arc<PageCounters>) {
        self.counted().insert(id.to_string(), c);
    }

    /// (bytes sent, of total, in requests) by container `id`'s page server; zeros when
    /// CRIU reads its pages itself.
    pub fn pages_sent(&self, id: &str) -> (u64, u64, u64) {
        self.counted().get(id).map_or((0, 0, 0), |c| c.read())
    }

    fn counted(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Arc<PageCounters>>> {
        self.served.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Forgets a deleted container.
    pub fn forget(&self, id: &str) {
        self.counted().remove(id);
        self.pages_first().remove(id);
        self.by_id
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        self.changed.notify_waiters();
    }

    /// What is known now.
    pub fn snapshot(&self) -> BTreeMap<String, Outcome> {
        self.by_id.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Waits until no container is pending, at most `limit`; returns what is known then.
    pub async fn settled(&self, limit: Duration) -> BTreeMap<String, Outcome> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            // Registered before the look, so a record between the two is not missed.
            let changed = self.changed.notified();
            let now = self.snapshot();
            if now
                .values()
                .all(|o| o.state != RestoreState::RESTORE_PENDING)
            {
                return now;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return self.snapshot();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn waiting_ends_when_the_last_pending_restore_ends() {
        let r = Arc::new(RestoreOutcomes::default());
        r.record("a", RestoreState::RESTORE_EAGER, "");
        r.record("b", RestoreState::RESTORE_PENDING, "");
        let waiter = tokio::spawn({
            let r = r.clone();
            async move { r.settled(Duration::from_secs(10)).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        r.record(
            "b",
            RestoreState::RESTORE_FAILED,
            "criu lazy-pages ended with status 1",
        );
        let got = waiter.await.unwrap();
        assert_eq!(got["a"].state, RestoreState::RESTORE_EAGER);
        assert_eq!(got["b"].state, RestoreState::RESTORE_FAILED);
        assert_eq!(got["b"].reason, "criu lazy-pages ended with status 1");
    }

    #[tokio::test]
    async fn waiting_is_bounded_and_deleted_containers_are_forgotten() {
        let r = RestoreOutcomes::default();
        r.record("a", RestoreState::RESTORE_PENDING, "");
        let got = r.settled(Duration::from_millis(30)).await;
        assert_eq!(got["a"].state, RestoreState::RESTORE_PENDING);
        r.forget("a");
        assert!(r.settled(Duration::from_secs(10)).await.is_empty());
    }
}
