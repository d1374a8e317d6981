//! The source side of post-copy: a container dumped without its memory pages, whose CRIU
//! keeps the tasks seized and serves their pages to the target's lazy-pages daemon.
//!
//! CRIU's page server speaks plain TCP and takes the first connection that comes, so each
//! dump runs in a network namespace of its own holding only loopback: no other process of the
//! node can reach the listener, and the shim connects from a thread that joins that namespace.
//! The dump runs with `--leave-running`: however the transfer ends (finished, cut, or never
//! begun), CRIU lets go of the tasks and they stay frozen by the pod's freezer until the hold
//! stops them (the target has every page) or thaws them (the source runs on).

use std::{
    fs::File,
    io::Read,
    net::TcpStream,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use log::{info, warn};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::{
    error::{Error, Result},
    process::reaper::{self, Output},
};

/// The port CRIU's page server listens on, inside the dump's own network namespace (nothing
/// else is there, so any port is free).
pub const PAGE_SERVER_PORT: u16 = 27_183;
/// What `fs.pipe-max-size` must allow: CRIU grows a pipe to the size of its largest page
/// pipe when it serves lazy pages and does not check that it could (root here lacks
/// CAP_SYS_RESOURCE, so the default 1 MiB bound applies); the first page request then fails.
pub const PIPE_MAX_SIZE: u64 = 4 << 20;
/// The longest a dump serves pages when nobody says otherwise (a shim's longest hold).
pub const SERVE_AT_MOST: Duration = Duration::from_secs(3600);
/// How long a dump may take to write its images (without the pages) and start serving.
const READY_WITHIN: Duration = Duration::from_secs(120);
/// How long CRIU gets to let go of the tasks once its transfer ended.
const END_WITHIN: Duration = Duration::from_secs(10);

/// One container's dump that serves its pages until it is ended.
pub struct LazyDump {
    pub id: String,
    /// The runtime's process group (runc and CRIU).
    pgid: i32,
    /// The dump's network namespace, where its page server listens.
    netns: File,
    run: JoinHandle<std::io::Result<Output>>,
    /// Set once the runtime exits: whether CRIU finished the transfer.
    ended: tokio::sync::watch::Receiver<Option<bool>>,
    work: PathBuf,
}

/// Refuses post-copy on a node where CRIU's page server would fail at the first request.
pub fn check_node(id: &str) -> Result<()> {
    let max = std::fs::read_to_string("/proc/sys/fs/pipe-max-size")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(0);
    if max < PIPE_MAX_SIZE {
        return Err(Error::precondition(
            id,
            format!(
                "post-copy needs fs.pipe-max-size of at least {PIPE_MAX_SIZE} on the source node (it is {max}): CRIU's page server cannot serve pages otherwise; run `sysctl fs.pipe-max-size={PIPE_MAX_SIZE}`"
            ),
        ));
    }
    Ok(())
}

/// Brings up loopback in the calling process's (new) network namespace.
/// Async-signal-safe: socket and ioctl only.
fn loopback_up() -> std::io::Result<()> {
    // SAFETY: plain syscalls on a zeroed ifreq that names "lo"; the socket is closed here.
    unsafe {
        let sk = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if sk < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut ifr: libc::ifreq = std::mem::zeroed();
        for (i, b) in b"lo".iter().enumerate() {
            ifr.ifr_name[i] = *b as libc::c_char;
        }
        let mut r = libc::ioctl(sk, libc::SIOCGIFFLAGS, &mut ifr);
        if r == 0 {
            ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            r = libc::ioctl(sk, libc::SIOCSIFFLAGS, &ifr);
        }
        let err = std::io::Error::last_os_error();
        libc::close(sk);
        if r != 0 {
            return Err(err);
        }
    }
    Ok(())
}

/// Starts `cmd` (a runtime's `checkpoint --lazy-pages --page-server 127.0.0.1:PORT
/// --status-fd 3`) in a network namespace of its own and waits until CRIU has written the
/// images and serves the pages (a byte on the status pipe). A failure, the bound or `cancel`
/// stops the runtime and CRIU and returns an error carrying `dump.log`'s reason.
pub async fn start(
    id: &str,
    mut cmd: Command,
    work: &Path,
    cancel: Option<&CancellationToken>,
) -> Result<LazyDump> {
    use std::os::unix::process::CommandExt;
    let (ready_r, ready_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| Error::io(id, "create the status pipe", e.into()))?;
    let w = ready_w.as_raw_fd();
    cmd.process_group(0);
    // SAFETY: between fork and exec: unshare, dup2, fcntl and the ioctls of loopback_up are
    // async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            if libc::unshare(libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            loopback_up()?;
            if w == 3 {
                if libc::fcntl(3, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(w, 3) != 3 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let (pid_tx, pid_rx) = tokio::sync::oneshot::channel();
    let (ended_tx, ended) = tokio::sync::watch::channel(None);
    let run = tokio::spawn(async move {
        let out = reaper::run_reporting_pid(cmd, true, pid_tx).await;
        let _ = ended_tx.send(Some(matches!(&out, Ok(o) if o.success())));
        out
    });
    let Ok(pgid) = pid_rx.await else {
        drop(ready_w);
        let why = match run.await {
            Ok(Err(e)) => e.to_string(),
            _ => "it did not start".into(),
        };
        return Err(Error::other(id, "start the post-copy dump", why));
    };
    drop(ready_w);
    // The namespace is the runtime's from its exec on (pre_exec ran before it).
    let netns = match File::open(format!("/proc/{pgid}/ns/net")) {
        Ok(f) => f,
        Err(e) => {
            reaper::kill_group_and_wait(pgid).await;
            return Err(Error::io(id, "open the dump's network namespace", e));
        }
    };
    let mut dump = LazyDump {
        id: id.to_string(),
        pgid,
        netns,
        run,
        ended,
        work: work.to_path_buf(),
    };
    let mut status = File::from(ready_r);
    let read = tokio::task::spawn_blocking(move || {
        let mut b = [0u8; 1];
        status.read(&mut b).unwrap_or(0)
    });
    let never = CancellationToken::new();
    let cancelled = cancel.unwrap_or(&never);
    let ready = tokio::select! {
        r = read => r.unwrap_or(0) > 0,
        _ = tokio::time::sleep(READY_WITHIN) => false,
        _ = cancelled.cancelled() => false,
    };
    if ready {
        info!("{id}: dumped for post-copy; CRIU serves its pages");
        return Ok(dump);
    }
    let why = if cancelled.is_cancelled() {
        "cancelled".to_string()
    } else if dump.run.is_finished() {
        match (&mut dump.run).await {
            Ok(Ok(out)) => String::from_utf8_lossy(&out.stderr).trim().to_string(),
            Ok(Err(e)) => e.to_string(),
            Err(e) => e.to_string(),
        }
    } else {
        format!("CRIU did not start serving pages within {READY_WITHIN:?}")
    };
    dump.stop().await;
    Err(Error::other(
        id,
        "post-copy dump",
        format!("{why} (see {})", dump.work.join("dump.log").display()),
    ))
}

impl std::fmt::Debug for LazyDump {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LazyDump({}, pgid {})", self.id, self.pgid)
    }
}

/// Connects to one dump's page server.
pub struct Connector {
    netns: File,
}

impl Connector {
    /// Connects from a thread that joins the dump's namespace (the socket stays in that
    /// namespace after the thread is gone).
    pub fn connect(&self) -> std::io::Result<TcpStream> {
        let ns = self.netns.try_clone()?;
        std::thread::spawn(move || -> std::io::Result<TcpStream> {
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(std::io::Error::from)?;
            TcpStream::connect_timeout(
                &(std::net::Ipv4Addr::LOCALHOST, PAGE_SERVER_PORT).into(),
                Duration::from_secs(5),
            )
        })
        .join()
        .map_err(|_| std::io::Error::other("the connecting thread panicked"))?
    }
}

impl LazyDump {
    /// Resolves once this dump ended without finishing its transfer (the connection to the
    /// target's daemon closed early, CRIU failed or was killed); never on success.
    pub fn broken(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut ended = self.ended.clone();
        async move {
            loop {
                if *ended.borrow_and_update() == Some(false) {
                    return;
                }
                if ended.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        }
    }

    /// What connects to this dump's page server (from any thread, later).
    pub fn connector(&self) -> std::io::Result<Connector> {
        Ok(Connector {
            netns: self.netns.try_clone()?,
        })
    }

    /// Ends the dump once its transfer is over (or never began): CRIU is asked to stop
    /// serving (a connection closed at once ends a page server nobody reached) and given
    /// END_WITHIN to let go of the tasks; past that it is killed. Returns whether CRIU said
    /// the transfer finished.
    pub async fn end(mut self) -> bool {
        let waited = tokio::time::timeout(Duration::from_millis(200), &mut self.run).await;
        let out = match waited {
            Ok(r) => r,
            Err(_) => {
                // Still serving: a page server nobody reached waits in accept(). (The
                // connect joins a thread: off the async workers.)
                if let Ok(c) = self.connector() {
                    let _ = tokio::task::spawn_blocking(move || drop(c.connect())).await;
                }
                match tokio::time::timeout(END_WITHIN, &mut self.run).await {
                    Ok(r) => r,
                    Err(_) => {
                        warn!(
                            "{}: CRIU still served pages {END_WITHIN:?} after the transfer ended; stopping it",
                            self.id
                        );
                        self.stop().await;
                        return false;
                    }
                }
            }
        };
        match out {
            Ok(Ok(o)) if o.success() => true,
            Ok(Ok(o)) => {
                warn!(
                    "{}: the post-copy dump ended with status {}: {}",
                    self.id,
                    o.status,
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                false
            }
            _ => false,
        }
    }

    /// Kills the runtime and CRIU (the tasks, no longer traced, stay frozen by the freezer).
    async fn stop(&mut self) {
        if self.run.is_finished() {
            // runc was reaped already: only a CRIU it left could remain in its group.
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(self.pgid),
                nix::sys::signal::Signal::SIGKILL,
            );
        } else {
            reaper::kill_group_and_wait(self.pgid).await;
            self.run.abort();
        }
    }
}

impl Drop for LazyDump {
    /// A dump dropped before its end (a failure after it started) must not keep the tasks
    /// seized: CRIU killed, the kernel lets go of them (the freezer still holds them).
    fn drop(&mut self) {
        if !self.run.is_finished() {
            warn!(
                "{}: post-copy dump dropped while serving; stopping CRIU",
                self.id
            );
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(self.pgid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = std::fs::remove_dir_all(&self.work);
        if let Some(parent) = self.work.parent() {
            // The pod's dump directory goes with its last container's.
            let _ = std::fs::remove_dir(parent);
        }
    }
}
