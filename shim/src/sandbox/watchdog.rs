//! A pod's dead-man switch. A small process outside the pod holds the read end of a pipe
//! whose only write end is the shim's; when the shim dies, however it dies, the pipe hangs
//! up and the watchdog at once stops the runtime calls the shim left running (a checkpoint's
//! runc and CRIU) and thaws every cgroup of the pod, so that the pod's processes (killed with
//! its PID namespace as the pause process exits) can die; then it runs the shim's own
//! `delete` for the pod, which removes what is left (cgroups, mounts, runtime state). It does
//! not wait for containerd's clean-up of a dead shim, which here came late or failed in about
//! one run in ten; containerd's `delete`, when it comes, finds nothing left to do. A shim that
//! shuts down normally removes the pod's record first: the watchdog then does nothing.

use std::{
    os::fd::{AsFd, AsRawFd, FromRawFd},
    os::unix::process::CommandExt,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use crate::{
    error::{Error, Result},
    state::pod::PodRecord,
};

/// The descriptor on which the watchdog holds the read end of its lifeline.
const LIFELINE_FD: i32 = 3;

/// The shim's flags, for the watchdog's `delete` (JSON list; in the environment, so that the
/// watchdog's command line does not look like the shim's).
const FLAGS_ENV: &str = "STASIS_WATCHDOG_SHIM_FLAGS";

/// Starts the watchdog of pod `pod`, whose record lives in `bundle`. It is given this
/// shim's own flags (namespace, id, containerd's address), to run `delete` with them.
pub fn spawn(pod: &str, bundle: &Path) -> Result<()> {
    let exe = std::env::current_exe().map_err(|e| Error::io(pod, "find own binary", e))?;
    let flags = std::env::args()
        .skip(1)
        .filter(|a| a != "serve")
        .collect::<Vec<_>>();
    let mut cmd = Command::new(exe);
    cmd.arg("watchdog")
        .arg(pod)
        .arg(bundle)
        .env(FLAGS_ENV, serde_json::to_string(&flags).unwrap_or_default())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let (life_read, life_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| Error::io(pod, "create watchdog lifeline", e.into()))?;
    let life_fd = life_read.as_raw_fd();
    // SAFETY: only async-signal-safe calls (dup2, setsid) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(life_fd, LIFELINE_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // Its own session: whatever signals the shim's process group spares it.
            libc::setsid();
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .map_err(|e| Error::io(pod, "start the pod watchdog", e))?;
    drop(life_read);
    super::pause::keep_lifeline(life_write);
    // The reaper collects it when it exits.
    drop(child);
    Ok(())
}

/// `containerd-shim-stasis-v2 watchdog POD BUNDLE`: waits for the shim to go, then thaws the
/// pod and runs `delete` for it with the shim's flags.
pub fn main(args: &[std::ffi::OsString]) -> ! {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let bundle = args.get(3).map(Path::new).unwrap_or(Path::new("."));
    // SAFETY: the descriptor was set up by `spawn` and is used by nothing else.
    let lifeline = unsafe { std::os::fd::OwnedFd::from_raw_fd(LIFELINE_FD) };
    loop {
        let mut fds = [PollFd::new(lifeline.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) if fds[0].revents().is_some_and(|r| !r.is_empty()) => break,
            _ => continue,
        }
    }
    // A normal shutdown removed the record: nothing to do.
    let pod = args
        .get(2)
        .map(|a| a.to_string_lossy().into_owned())
        .unwrap_or_default();
    let Some(record) = PodRecord::load(bundle, &pod) else {
        std::process::exit(0);
    };
    // The host mount first (it waits for nothing): containerd renames a dead shim's bundle
    // when the pod is removed, which may come before this watchdog's `delete`.
    if let Some(shm) = record.shm_mount() {
        super::files::remove_shm(&shm);
    }
    super::stop_orphaned_runtime_calls(&record.containers);
    // Until two passes in a row find nothing frozen (a runtime call ending as it is stopped
    // may freeze once more), for 5 s at most.
    let until = Instant::now() + Duration::from_secs(5);
    let mut quiet = 0;
    while quiet < 2 && Instant::now() < until {
        quiet = if crate::cgroup::thaw_tree(&record.cgroup) == 0 {
            quiet + 1
        } else {
            0
        };
        std::thread::sleep(Duration::from_millis(100));
    }
    // The rest of the clean-up, exactly as containerd would have it done.
    // containerd may have removed the bundle by now: the record's copy in the state root
    // is what this `delete` goes by then.
    let flags: Vec<String> = std::env::var(FLAGS_ENV)
        .ok()
        .and_then(|f| serde_json::from_str(&f).ok())
        .unwrap_or_default();
    if let (Ok(exe), false) = (std::env::current_exe(), flags.is_empty()) {
        let _ = Command::new(exe)
            .args(&flags)
            .env_remove(FLAGS_ENV)
            .arg("-bundle")
            .arg(bundle)
            .arg("delete")
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
    std::process::exit(0)
}
