//! containerd-shim-stasis-v2: a containerd shim that runs containers through an OCI runtime
//! and owns the pod so it can be checkpointed as one.
//!
//! Modules depend one way, from the bottom up (ARCHITECTURE.md draws it):
//! `error`, `util` → `spec`, `events`, `process`, `cgroup`, `fscapture` → `runtime` →
//! `state` → `checkpoint` → `task` → `sandbox` → `service` → `bootstrap`.

pub mod bootstrap;
pub mod cgroup;
pub mod checkpoint;
pub mod error;
pub mod events;
pub mod fscapture;
pub mod logging;
pub mod process;
pub mod runtime;
pub mod sandbox;
pub mod service;
pub mod spec;
pub mod state;
pub mod task;
pub mod util;
