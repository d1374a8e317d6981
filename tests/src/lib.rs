//! The end-to-end harness: a private containerd (own root, state, sockets and namespace under
//! a temp dir) with the freshly built stasis shim first on its PATH, images built from busybox,
//! and a teardown that leaves nothing behind even when a test panics: `containerd.rs` (the
//! daemon and how tests talk to it), `teardown.rs` (the leak check and the forced cleanup),
//! `leaks.rs` (the probes), `cri.rs`, `events.rs`, `pty.rs`, `shim_client.rs`, `registry.rs`,
//! `image.rs` (busybox images built locally), `sampler.rs` (ordering claims watched from
//! outside).

pub mod api;
pub mod cri;
pub mod image;
pub mod leaks;
pub mod migration;
pub mod registry;
pub mod sampler;

mod containerd;
pub mod events;
pub mod fanotify;
mod pty;
mod shim_client;
mod teardown;

pub use containerd::{mounts_under, processes_matching, Containerd, Footprint};
pub use events::EventWatch;
pub use pty::run_on_pty;
pub use shim_client::{shim_connection, shim_task_client};

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

pub const STASIS_RUNTIME: &str = "io.containerd.stasis.v2";
pub const RUNC_RUNTIME: &str = "io.containerd.runc.v2";
pub const SHIM_BINARY: &str = "containerd-shim-stasis-v2";

/// Fails (never skips) when something the end-to-end tests need is missing.
pub fn require_prerequisites() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("end-to-end tests must run as root (containerd, runc and mounts need it)");
    }
    for tool in ["containerd", "ctr", "runc"] {
        if which(tool).is_none() {
            bail!("{tool} not found on PATH: run scripts/install-deps.sh");
        }
    }
    Ok(())
}

pub fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(tool))
            .find(|p| p.is_file())
    })
}

/// The workspace's target dir, where `cargo build` put the shim.
pub fn target_dir() -> PathBuf {
    if let Ok(t) = std::env::var("CARGO_TARGET_DIR") {
        return PathBuf::from(t);
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target")
}

/// The newest workspace build of binary `name` (debug or release), or the build of the
/// profile `STASIS_BUILD_PROFILE` names: the benches and the demo ask for release, since
/// the newest build of a binary whose code did not change can be a debug one.
pub fn built_binary(name: &str) -> Result<PathBuf> {
    let profiles: Vec<String> = match std::env::var("STASIS_BUILD_PROFILE") {
        Ok(p) if !p.is_empty() => vec![p],
        _ => vec!["debug".into(), "release".into()],
    };
    let candidates: Vec<PathBuf> = profiles
        .iter()
        .map(|p| target_dir().join(p).join(name))
        .collect();
    candidates
        .iter()
        .filter(|p| p.exists())
        .max_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .cloned()
        .with_context(|| {
            format!(
                "{name} not built: run `cargo build --workspace` first (looked in {candidates:?})"
            )
        })
}

/// The shim binary under test: $STASIS_SHIM, else the workspace's newest build.
pub fn shim_binary() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("STASIS_SHIM") {
        return Ok(PathBuf::from(p));
    }
    built_binary(SHIM_BINARY)
}

/// The restore id stasisctl printed ("unpacking … as restore <id>"), if any.
pub fn restore_id(stderr: &str) -> Option<String> {
    stderr.lines().find_map(|l| {
        l.split_once(" as restore ")
            .map(|(_, id)| id.trim().to_string())
    })
}

/// What a restore left in the restore store under `id` (its directory and its claim).
pub fn restore_leftovers(id: &str) -> Vec<std::path::PathBuf> {
    let store = std::path::Path::new(stasis_api::layout::RESTORE_STORE);
    [
        store.join(id),
        store.join(format!("{id}.pod")),
        store.join(format!(
            "{id}{}",
            stasis_api::layout::RESTORE_OPTIONS_SUFFIX
        )),
        store.join(format!("{id}{}", stasis_api::layout::RESTORE_TOKEN_SUFFIX)),
    ]
    .into_iter()
    .filter(|p| p.symlink_metadata().is_ok())
    .collect()
}
