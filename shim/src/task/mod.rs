//! containerd's Task API as operations on the shim's state: one file per operation, each
//! checking the container's lifecycle (`state::lifecycle`) before it calls the runtime, and
//! never holding the container's state across a runtime call.

mod checkpoint;
mod create;
mod delete;
mod exec;
mod kill;
mod pause;
mod query;
mod restore;
mod restore_pages;
mod start;
mod watch;

#[cfg(test)]
mod tests;

pub use checkpoint::checkpoint;
pub use create::create;
pub use delete::delete;
pub use exec::exec;
pub use kill::{kill, kill_all};
pub use pause::{pause, resume};
pub use query::{close_io, connect_pid, pids, resize_pty, state, stats, update, wait};
pub use restore::finish_restore;
pub use start::start;

use std::path::Path;

use log::warn;

/// Unmounts everything at `target` (a rootfs may carry several layers of mounts).
pub fn unmount(target: &Path) {
    for _ in 0..8 {
        match nix::mount::umount2(target, nix::mount::MntFlags::MNT_DETACH) {
            Ok(()) => continue,
            Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => return,
            Err(e) => {
                warn!("unmount {}: {e}", target.display());
                return;
            }
        }
    }
}

/// `id/exec` as errors name an exec process.
fn exec_name(id: &str, exec_id: &str) -> String {
    format!("{id}/{exec_id}")
}

/// Where an exec's runtime writes its pid (backends may keep files beside it).
fn exec_pid_file(bundle: &std::path::Path, exec_id: &str) -> std::path::PathBuf {
    bundle.join(format!("{exec_id}.pid"))
}
