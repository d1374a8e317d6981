//! What the shim knows: its pod, its containers (each with a typed lifecycle), the runtime
//! backend it drives and where events go. Operations (`task`, `sandbox`, `checkpoint`) work on
//! this state; the ttrpc services (`service`) only translate requests to operations.

pub mod container;
pub mod lifecycle;
pub mod pod;
pub mod restores;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use tokio_util::sync::CancellationToken;

pub use container::{timestamp, Container, Live, Process};
pub use lifecycle::{State, Transition};
pub use pod::Pod;

use crate::{
    error::{Error, Result},
    events::Events,
    runtime::OciRuntime,
};

pub struct Shim {
    containers: Mutex<HashMap<String, Arc<Container>>>,
    pod: Mutex<Option<Arc<Pod>>>,
    pub runtime: Arc<dyn OciRuntime>,
    pub events: Events,
    /// Cancelled when the shim should exit.
    pub shutdown: CancellationToken,
    /// Work that must finish even if its request goes away (checkpoints): the shim waits for
    /// it before exiting.
    pub work: tokio_util::task::TaskTracker,
    /// How long a restored container waits, frozen, for its pod's FinishRestore.
    pub restore_hold: std::time::Duration,
    /// The bound on a checkpoint whose caller sets none.
    pub checkpoint_bound: std::time::Duration,
    /// Where restores are prepared; restore annotations name ids in it.
    pub restore_store: std::path::PathBuf,
    /// How each restored container's restore ended (lazy ones: once every page is in).
    pub restores: Arc<restores::RestoreOutcomes>,
}

impl Shim {
    pub fn new(runtime: Arc<dyn OciRuntime>, events: Events) -> Arc<Self> {
        Self::with_bounds(runtime, events, &Default::default())
    }

    /// A shim under its backend's bounds (restore hold, checkpoint timeout).
    pub fn with_bounds(
        runtime: Arc<dyn OciRuntime>,
        events: Events,
        backend: &crate::runtime::config::BackendConfig,
    ) -> Arc<Self> {
        let shim = Shim {
            containers: Default::default(),
            pod: Default::default(),
            runtime,
            events,
            shutdown: CancellationToken::new(),
            work: tokio_util::task::TaskTracker::new(),
            restore_hold: backend.restore_hold(),
            checkpoint_bound: backend.checkpoint_bound(),
            restore_store: stasis_api::layout::RESTORE_STORE.into(),
            restores: Arc::default(),
        };
        Arc::new(shim)
    }

    /// A shim whose restores come from `store` (tests; the real one is fixed).
    #[cfg(test)]
    pub fn with_restore_store(
        runtime: Arc<dyn OciRuntime>,
        events: Events,
        store: std::path::PathBuf,
    ) -> Arc<Self> {
        let mut shim = Arc::into_inner(Self::new(runtime, events)).expect("a fresh shim");
        shim.restore_store = store;
        Arc::new(shim)
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Container>>> {
        self.containers.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn get(&self, id: &str) -> Result<Arc<Container>> {
        self.map()
            .get(id)
            .cloned()
            .ok_or_else(|| Error::not_found("container", id))
    }

    /// Registers a new container, refusing an id already in use.
    pub fn insert(&self, c: Arc<Container>) -> Result<()> {
        let mut map = self.map();
        if map.contains_key(&c.id) {
            return Err(Error::AlreadyExists {
                kind: "container",
                id: c.id.clone(),
            });
        }
        map.insert(c.id.clone(), c);
        Ok(())
    }

    pub fn contains(&self, id: &str) -> bool {
        self.map().contains_key(id)
    }

    pub fn remove(&self, id: &str) {
        self.map().remove(id);
    }

    pub fn ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.map().keys().cloned().collect();
        ids.sort();
        ids
    }

    pub fn all(&self) -> Vec<Arc<Container>> {
        self.map().values().cloned().collect()
    }

    pub fn is_empty(&self) -> bool {
        self.map().is_empty()
    }

    pub fn pod(&self) -> Option<Arc<Pod>> {
        self.pod.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Sets the pod unless one is set already; returns the pod this shim serves.
    pub fn set_pod(&self, pod: Pod) -> Arc<Pod> {
        let mut slot = self.pod.lock().unwrap_or_else(|e| e.into_inner());
        slot.get_or_insert_with(|| Arc::new(pod)).clone()
    }

    /// The pod, if `id` is its sandbox id.
    pub fn pod_named(&self, id: &str) -> Option<Arc<Pod>> {
        self.pod().filter(|p| p.id == id)
    }

    /// The pod named `id`, or NotFound.
    pub fn require_pod(&self, id: &str) -> Result<Arc<Pod>> {
        self.pod_named(id)
            .ok_or_else(|| Error::not_found("sandbox", id))
    }
}
