//! Wire contracts of stasis: containerd's Task and Sandbox APIs (re-exported from
//! `containerd-shim-protos`) and our pod Checkpoint service (`proto/stasis/checkpoint/v1`).

pub use containerd_shim_protos as containerd;

pub mod layout;
pub mod private;
pub mod tarbound;

pub use layout::RESTORE_ANNOTATION;

#[allow(warnings, clippy::all)]
pub mod checkpoint {
    include!(concat!(env!("OUT_DIR"), "/checkpoint/checkpoint.rs"));
}

#[allow(warnings, clippy::all)]
pub mod checkpoint_ttrpc {
    include!(concat!(env!("OUT_DIR"), "/checkpoint/checkpoint_ttrpc.rs"));
}
