//! The runtime-agnostic side of stasis: what a CRI implementation would do for pod
//! checkpoint/restore. It talks to containerd (CRI) and to the pod shim's Checkpoint service;
//! it never runs CRIU or touches cgroups.

pub mod archive;
pub mod bench;
pub mod cli;
pub mod cri;
pub mod display;
pub mod events;
pub mod files;
pub mod image;
pub mod logging;
pub mod metrics;
pub mod ops;
pub mod policy;
pub mod progress;
pub mod seal;
pub mod shim;
pub mod stream;
pub mod workload;
