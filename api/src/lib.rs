//! Wire contracts of stasis: containerd's Task and Sandbox APIs (re-exported from
//! `containerd-shim-protos`) and our pod Checkpoint service (`proto/stasis/checkpoint/v1`).

pub use containerd_shim_protos as containerd;

/// Annotation on a container that makes the shim restore it from a per-container checkpoint
/// directory instead of creating it.
pub const RESTORE_ANNOTATION: &str = "io.stasis.restore-from";

#[allow(warnings, clippy::all)]
pub mod checkpoint {
    include!(concat!(env!("OUT_DIR"), "/checkpoint/checkpoint.rs"));
}

#[allow(warnings, clippy::all)]
pub mod checkpoint_ttrpc {
    include!(concat!(env!("OUT_DIR"), "/checkpoint/checkpoint_ttrpc.rs"));
}
