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

/// Events on containerd's event service: the topics and the one message they carry.
#[allow(warnings, clippy::all)]
pub mod events {
    include!(concat!(env!("OUT_DIR"), "/checkpoint/events.rs"));

    /// The topic of `operation`'s `phase` (`/stasis/checkpoint/frozen`).
    pub fn topic(operation: &str, phase: &str) -> String {
        format!("/stasis/{operation}/{phase}")
    }

    /// What every subscriber of stasis's events filters on.
    pub const TOPIC_FILTER: &str = r#"topic~="^/stasis/""#;
}

#[allow(warnings, clippy::all)]
pub mod checkpoint_ttrpc {
    include!(concat!(env!("OUT_DIR"), "/checkpoint/checkpoint_ttrpc.rs"));
}
