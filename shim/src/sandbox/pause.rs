//! The pod's pause process: the first process of the pod's PID namespace, holding the pod's
//! IPC, UTS, PID and network namespaces for its containers. It is this binary re-executed with
//! the `pause` action, so a pod needs no image.

use std::{
    fs::File,
    io::{BufRead, BufReader},
    os::{fd::AsRawFd, unix::process::CommandExt},
    process::{Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
};

use std::os::fd::{AsFd, FromRawFd};

use nix::{
    poll::{poll, PollFd, PollFlags, PollTimeout},
    sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal},
    sys::wait::{waitpid, WaitPidFlag, WaitStatus},
    unistd::{fork, ForkResult, Pid},
};

use crate::error::{Error, Result};

const HOSTNAME_ENV: &str = "STASIS_POD_HOSTNAME";
/// The pod's sysctls (JSON), written by the launcher in the pod's new namespaces.
const SYSCTLS_ENV: &str = "STASIS_POD_SYSCTLS";
/// What the launcher prints instead of a pid when a sysctl cannot be set.
const SYSCTL_FAILED: &str = "sysctl-failed: ";
/// A restored pod's last checkpointed PID: the pause process, PID 1 of the new namespace,
/// makes the namespace allocate above it before anything else runs there (CRIU gives restored
/// processes their saved PIDs; a container restored first must not fork onto one the next
/// needs). Done in the pause process, it costs nothing; an `nsenter` afterwards took ~35 ms
/// of every restore's downtime.
const LAST_PID_ENV: &str = "STASIS_POD_LAST_PID";

/// The namespaces the pause process makes for its pod; without, the pod shares the node's.
#[derive(Debug, Clone, Copy)]
pub struct Own {
    pub ipc: bool,
    pub pid: bool,
}

/// The descriptor on which the pause process holds the read end of its lifeline: a pipe whose
/// only write end is the shim's. When the shim dies, however it dies, the pipe hangs up and
/// the pause process exits, taking the pod's PID namespace (every container process) with it.
/// A parent-death signal would not do: it follows the thread that forked, and the launcher in
/// between exits at once.
const LIFELINE_FD: i32 = 3;

/// The shim's end of every lifeline: never closed while the shim lives, close-on-exec so no
/// runtime helper inherits it.
static LIFELINES: std::sync::Mutex<Vec<std::os::fd::OwnedFd>> = std::sync::Mutex::new(Vec::new());

/// Starts the pause process in a new UTS namespace, and new IPC and PID namespaces unless the
/// pod shares the node's (hostIPC, hostPID), joined to `netns` (if any), with `hostname` and `sysctls` set;
/// returns its pid (as seen from the shim). A sysctl the kernel refuses fails the pod.
pub fn spawn(
    pod: &str,
    netns: &str,
    hostname: &str,
    own: Own,
    sysctls: &[super::sysctls::Setting],
    reserve_above: Option<u32>,
) -> Result<i32> {
    let netns_file = if netns.is_empty() {
        None
    } else {
        Some(File::open(netns).map_err(|e| Error::io(pod, format!("open netns {netns}"), e))?)
    };
    let exe = std::env::current_exe().map_err(|e| Error::io(pod, "find own binary", e))?;
    let mut cmd = Command::new(exe);
    cmd.arg("pause")
        .env(HOSTNAME_ENV, hostname)
        .env(
            SYSCTLS_ENV,
            serde_json::to_string(sysctls).unwrap_or_else(|_| "[]".into()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    if let Some(last) = reserve_above.filter(|_| own.pid) {
        cmd.env(LAST_PID_ENV, last.to_string());
    }
    let netns_fd = netns_file.as_ref().map(|f| f.as_raw_fd());
    let (life_read, life_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| Error::io(pod, "create pause lifeline", e.into()))?;
    let life_fd = life_read.as_raw_fd();
    let mut flags = libc::CLONE_NEWUTS;
    if own.ipc {
        flags |= libc::CLONE_NEWIPC;
    }
    if own.pid {
        flags |= libc::CLONE_NEWPID;
    }
    // SAFETY: only async-signal-safe calls (dup2, setns, unshare) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            // dup2 leaves the copy open across exec (no close-on-exec flag).
            if libc::dup2(life_fd, LIFELINE_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(fd) = netns_fd {
                if libc::setns(fd, libc::CLONE_NEWNET) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if libc::unshare(flags) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| Error::io(pod, "start pause process", e))?;
    drop(life_read);
    keep_lifeline(life_write);
    let mut line = String::new();
    let stdout = child.stdout.take().expect("piped stdout");
    BufReader::new(stdout)
        .read_line(&mut line)
        .map_err(|e| Error::io(pod, "read pause pid", e))?;
    // The launcher exits right away; the reaper collects it.
    drop(child);
    if let Some(why) = line.trim().strip_prefix(SYSCTL_FAILED) {
        return Err(Error::invalid(pod, why.to_string()));
    }
    // "<pid>", or "<pid> <why the PID reservation failed>".
    let (pid, reserve_failed) = match line.trim().split_once(' ') {
        Some((pid, why)) => (pid, Some(why)),
        None => (line.trim(), None),
    };
    if let Some(why) = reserve_failed {
        log::warn!("pod {pod}: cannot keep new PIDs above the restored ones: {why}");
    }
    pid.parse()
        .map_err(|_| Error::other(pod, "start pause process", format!("bad pid {line:?}")))
}

/// Keeps `write` (the shim's end of a lifeline) open as long as the shim lives.
pub(crate) fn keep_lifeline(write: std::os::fd::OwnedFd) {
    LIFELINES
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(write);
}

/// An empty, read-only root in a mount namespace of its own, no capabilities (none to gain:
/// no_new_privs), not dumpable (its /proc files closed to others).
fn confine() -> std::io::Result<()> {
    use nix::mount::{mount, umount2, MntFlags, MsFlags};
    let err = |e: nix::Error| std::io::Error::from(e);
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).map_err(err)?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(err)?;
    // Any directory will do as the mount point: in this private namespace it only becomes
    // the new root.
    let at = ["/mnt", "/tmp", "/run"]
        .into_iter()
        .find(|d| std::path::Path::new(d).is_dir())
        .unwrap_or("/tmp");
    mount(
        Some("stasis-pause"),
        at,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("size=4k,mode=0555"),
    )
    .map_err(err)?;
    nix::unistd::chdir(at).map_err(err)?;
    // pivot_root(".", "."): the old root ends up stacked on the new one, then detached.
    nix::unistd::pivot_root(".", ".").map_err(err)?;
    umount2(".", MntFlags::MNT_DETACH).map_err(err)?;
    nix::unistd::chdir("/").map_err(err)?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY,
        None::<&str>,
    )
    .map_err(err)?;
    // SAFETY: prctl and capset with constant arguments and a local, well-formed buffer.
    unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
            || libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        let _ = libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        );
        // Past the last capability the kernel knows, the drop fails harmlessly.
        for cap in 0..64 {
            libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0);
        }
        // capset(2), version 3: every set empty.
        #[repr(C)]
        struct Header {
            version: u32,
            pid: i32,
        }
        #[repr(C)]
        #[derive(Clone, Copy)]
        struct Data {
            effective: u32,
            permitted: u32,
            inheritable: u32,
        }
        let header = Header {
            version: 0x2008_0522,
            pid: 0,
        };
        let data = [Data {
            effective: 0,
            permitted: 0,
            inheritable: 0,
        }; 2];
        if libc::syscall(libc::SYS_capset, &header, data.as_ptr()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

static TERMINATE: AtomicBool = AtomicBool::new(false);

extern "C" fn on_terminate(_: libc::c_int) {
    TERMINATE.store(true, Ordering::SeqCst);
}

extern "C" fn on_child(_: libc::c_int) {}

/// The launcher's fork: the parent prints the child's pid (once the child said whether it
/// could reserve the restored PIDs) and exits; the child, PID 1 of the new namespace, returns.
fn fork_pause() {
    let reserve: Option<u32> = std::env::var(LAST_PID_ENV)
        .ok()
        .and_then(|v| v.parse().ok());
    // The child says (then closes) whether it could reserve; the pid is printed only after,
    // so the shim restores nothing before the reservation holds.
    let (said_r, said_w) = match nix::unistd::pipe() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("pause: pipe: {e}");
            std::process::exit(1);
        }
    };
    // SAFETY: single-threaded here (called first thing from main).
    match unsafe { fork() } {
        Ok(ForkResult::Parent { child }) => {
            drop(said_w);
            let mut why = String::new();
            let _ = std::io::Read::read_to_string(&mut File::from(said_r), &mut why);
            match why.trim() {
                "" => println!("{child}"),
                why => println!("{child} {why}"),
            }
            std::process::exit(0);
        }
        Ok(ForkResult::Child) => {}
        Err(e) => {
            eprintln!("pause: fork: {e}");
            std::process::exit(1);
        }
    }
    drop(said_r);
    let mut said = File::from(said_w);
    if let Some(last) = reserve {
        // The sysctl acts on the writer's own PID namespace: ours, as its PID 1.
        if let Err(e) = std::fs::write("/proc/sys/kernel/ns_last_pid", last.to_string()) {
            let _ = std::io::Write::write_all(&mut said, format!("ns_last_pid: {e}").as_bytes());
        }
    }
    // Closed here, whatever was said: the launcher waits for the end.
    drop(said);
}

/// `containerd-shim-stasis-v2 pause`: runs in the new namespaces set up by [`spawn`]. Forks
/// the real pause (PID 1 of the new PID namespace), prints its pid and exits.
pub fn main() -> ! {
    // The launcher is in the pod's network and IPC namespaces already: their sysctls are set
    // here, before the pod's first process exists.
    let sysctls = match std::env::var(SYSCTLS_ENV) {
        Ok(j) => serde_json::from_str::<Vec<super::sysctls::Setting>>(&j)
            .map_err(|e| format!("the shim's sysctl list: {e}")),
        Err(_) => Ok(Vec::new()),
    };
    if let Err(why) = sysctls.and_then(|s| super::sysctls::apply(&s)) {
        println!("{SYSCTL_FAILED}{why}");
        std::process::exit(1);
    }
    fork_pause();
    let _ = nix::unistd::setsid();
    if let Ok(h) = std::env::var(HOSTNAME_ENV) {
        if !h.is_empty() {
            let _ = nix::unistd::sethostname(&h);
        }
    }
    // PID 1 of the pod, reachable from every container (`/proc/1/root`, `nsenter -t 1`): it
    // must give nothing of the host away.
    if let Err(e) = confine() {
        eprintln!("pause: confine: {e}");
        std::process::exit(1);
    }
    // PID 1 only receives signals it has handlers for.
    let term = SigAction::new(
        SigHandler::Handler(on_terminate),
        SaFlags::empty(),
        SigSet::empty(),
    );
    let chld = SigAction::new(
        SigHandler::Handler(on_child),
        SaFlags::SA_NOCLDSTOP,
        SigSet::empty(),
    );
    // SAFETY: the handlers only touch an atomic.
    unsafe {
        let _ = sigaction(Signal::SIGTERM, &term);
        let _ = sigaction(Signal::SIGINT, &term);
        let _ = sigaction(Signal::SIGCHLD, &chld);
    }
    // SAFETY: the lifeline descriptor was opened for us by `spawn` and is owned here alone.
    let lifeline = unsafe { std::os::fd::OwnedFd::from_raw_fd(LIFELINE_FD) };
    // Containers' processes may be reparented here: reap them. Signals interrupt the poll.
    loop {
        if TERMINATE.load(Ordering::SeqCst) {
            std::process::exit(0);
        }
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(_) => continue,
            }
        }
        let mut fds = [PollFd::new(lifeline.as_fd(), PollFlags::POLLIN)];
        if poll(&mut fds, PollTimeout::NONE).is_ok()
            && fds[0].revents().is_some_and(|r| !r.is_empty())
        {
            // The shim is gone (the pipe never carries data): end the pod's processes.
            std::process::exit(0);
        }
    }
}
