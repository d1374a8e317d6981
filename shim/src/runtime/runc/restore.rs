//! What runc's restore needs beyond its command line: CRIU told to leave the restored tasks
//! stopped, and the read-only root runc's restore does not make.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// A CRIU configuration file saying `leave-stopped`, named by the bundle's spec for one
/// restore. The spec and the file are put back as they were right after the restore: runc
/// keeps the annotation for the container's later checkpoints, and CRIU ignores a
/// configuration file that is not there, so a later checkpoint runs as it always did.
pub(super) struct LeaveStopped {
    spec: PathBuf,
    original: Vec<u8>,
    conf: PathBuf,
}

impl LeaveStopped {
    const ANNOTATION: &'static str = "org.criu.config";

    pub(super) fn set_up(id: &str, bundle: &Path, work: &Path) -> Result<Self> {
        let conf = work.join(format!(
            "leave-stopped-{}.conf",
            crate::util::random_suffix().map_err(|e| Error::io(
                id,
                "name a CRIU configuration",
                e
            ))?
        ));
        crate::util::write_private(&conf, "leave-stopped\n")
            .map_err(|e| Error::io(id, format!("write {}", conf.display()), e))?;
        let spec = bundle.join("config.json");
        let original = std::fs::read(&spec)
            .map_err(|e| Error::io(id, format!("read {}", spec.display()), e))?;
        let mut value: serde_json::Value = serde_json::from_slice(&original)
            .map_err(|e| Error::invalid(id, format!("{}: {e}", spec.display())))?;
        let Some(object) = value.as_object_mut() else {
            return Err(Error::invalid(
                id,
                format!("{} is not an object", spec.display()),
            ));
        };
        // Whatever the spec named (a user's annotation) is replaced for the restore: the
        // node decides how CRIU restores, not the container's configuration.
        let annotations = object
            .entry("annotations")
            .or_insert_with(|| serde_json::json!({}));
        if !annotations.is_object() {
            *annotations = serde_json::json!({});
        }
        annotations[Self::ANNOTATION] = serde_json::Value::String(conf.display().to_string());
        let text = serde_json::to_vec(&value)
            .map_err(|e| Error::invalid(id, format!("{}: {e}", spec.display())))?;
        let set = Self {
            spec,
            original,
            conf,
        };
        if let Err(e) = std::fs::write(&set.spec, text) {
            set.tear_down();
            return Err(Error::io(id, "name the CRIU configuration in the spec", e));
        }
        Ok(set)
    }

    pub(super) fn tear_down(self) {
        if let Err(e) = std::fs::write(&self.spec, &self.original) {
            log::warn!("put {} back: {e}", self.spec.display());
        }
        let _ = std::fs::remove_file(&self.conf);
    }
}

/// Remounts `/` read-only in the mount namespace of `pid`, keeping its other flags. setns into
/// a mount namespace is refused to a multi-threaded process, so a forked child does it.
pub(super) fn remount_root_readonly(pid: i32) -> std::io::Result<()> {
    use nix::{
        mount::MsFlags,
        sys::{statvfs::FsFlags, wait::WaitStatus},
        unistd::ForkResult,
    };
    let ns = std::fs::File::open(format!("/proc/{pid}/ns/mnt"))?;
    // Only async-signal-safe system calls in the child: setns, statvfs, mount, _exit.
    match unsafe { nix::unistd::fork() }.map_err(std::io::Error::from)? {
        ForkResult::Child => {
            let code = (|| -> nix::Result<()> {
                nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNS)?;
                let have = nix::sys::statvfs::statvfs("/")?.flags();
                let mut flags = MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY;
                for (st, ms) in [
                    (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
                    (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
                    (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
                    (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
                    (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
                    (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
                ] {
                    if have.contains(st) {
                        flags |= ms;
                    }
                }
                nix::mount::mount(None::<&str>, "/", None::<&str>, flags, None::<&str>)
            })()
            .map(|()| 0)
            .unwrap_or_else(|e| e as i32);
            unsafe { libc::_exit(code) }
        }
        ForkResult::Parent { child } => match nix::sys::wait::waitpid(child, None)? {
            WaitStatus::Exited(_, 0) => Ok(()),
            WaitStatus::Exited(_, errno) => Err(std::io::Error::from_raw_os_error(errno)),
            other => Err(std::io::Error::other(format!(
                "remount helper ended: {other:?}"
            ))),
        },
    }
}
