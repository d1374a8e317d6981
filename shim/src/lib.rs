//! containerd-shim-stasis-v2: a containerd shim that runs containers through an OCI runtime
//! and owns the pod so it can be checkpointed as one.

pub mod bootstrap;
pub mod cgroup;
pub mod checkpoint;
pub mod error;
pub mod events;
pub mod reaper;
pub mod runtime;
pub mod sandbox;
pub mod server;
pub mod task;
