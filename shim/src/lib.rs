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

/// Where runc keeps container state for a containerd namespace. Outside the bundle so that a
/// `delete` for a grouped container still finds it.
pub fn runtime_root(namespace: &str) -> std::path::PathBuf {
    std::path::Path::new("/run/stasis/runc").join(namespace)
}
