//! The shim is a child subreaper: every container process ends up as its child. One task reaps
//! them all on SIGCHLD and hands each exit to whoever waits for that pid. Helper commands
//! (runc, criu) are waited for through the same table, so no second `waitpid` races it.

use std::{
    collections::HashMap,
    process::{Command, Stdio},
    sync::{Mutex, OnceLock},
    time::{Duration, Instant},
};

use log::{debug, warn};
use nix::{
    errno::Errno,
    sys::wait::{waitpid, WaitPidFlag, WaitStatus},
    unistd::Pid,
};
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::oneshot,
};
use tokio_util::sync::CancellationToken;

/// How long an exit nobody has asked for yet is kept: long enough for a caller that learns a
/// pid from a pid file after the process already died.
const UNCLAIMED_TTL: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, Copy)]
pub struct Exit {
    pub pid: i32,
    /// Exit code, or 128 + signal for a process killed by a signal (as shells and containerd do).
    pub status: i32,
    pub at: time::OffsetDateTime,
}

#[derive(Default)]
struct Table {
    waiters: HashMap<i32, Vec<oneshot::Sender<Exit>>>,
    unclaimed: HashMap<i32, (Exit, Instant)>,
}

static TABLE: OnceLock<Mutex<Table>> = OnceLock::new();

fn table() -> &'static Mutex<Table> {
    TABLE.get_or_init(Default::default)
}

/// Makes the shim a subreaper and starts the reaping task. Call once, inside the runtime.
pub fn start() -> std::io::Result<()> {
    nix::sys::prctl::set_child_subreaper(true).map_err(std::io::Error::from)?;
    let mut sigchld = signal(SignalKind::child())?;
    tokio::spawn(async move {
        loop {
            reap_all();
            if sigchld.recv().await.is_none() {
                break;
            }
        }
    });
    Ok(())
}

fn reap_all() {
    loop {
        let exit = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) => Exit {
                pid: pid.as_raw(),
                status: code,
                at: time::OffsetDateTime::now_utc(),
            },
            Ok(WaitStatus::Signaled(pid, sig, _)) => Exit {
                pid: pid.as_raw(),
                status: 128 + sig as i32,
                at: time::OffsetDateTime::now_utc(),
            },
            Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
            Ok(_) => continue,
            Err(Errno::EINTR) => continue,
            Err(e) => {
                warn!("waitpid failed: {e}");
                return;
            }
        };
        debug!("reaped pid {} status {}", exit.pid, exit.status);
        deliver(exit);
    }
}

fn deliver(exit: Exit) {
    let mut t = table().lock().unwrap();
    if let Some(waiters) = t.waiters.remove(&exit.pid) {
        let mut delivered = false;
        for w in waiters {
            delivered |= w.send(exit).is_ok();
        }
        // A waiter that gave up (its future dropped) must not swallow the exit: whoever asks
        // next still gets it.
        if delivered {
            return;
        }
    }
    let now = Instant::now();
    t.unclaimed
        .retain(|_, (_, seen)| now.duration_since(*seen) < UNCLAIMED_TTL);
    t.unclaimed.insert(exit.pid, (exit, now));
}

/// Waits for `pid` (a child or adopted process) to exit, even if it already has.
pub async fn wait(pid: i32) -> Exit {
    wait_inner(pid, None).await
}

/// Waits for the process `pid` that was started at or after `since`: an exit of an earlier
/// process that had the same pid (pids are reused) is stale and never returned.
pub async fn wait_since(pid: i32, since: Instant) -> Exit {
    wait_inner(pid, Some(since)).await
}

async fn wait_inner(pid: i32, since: Option<Instant>) -> Exit {
    let rx = {
        let mut t = table().lock().unwrap();
        if let Some((exit, seen)) = t.unclaimed.remove(&pid) {
            match since {
                Some(since) if seen < since => {
                    debug!("pid {pid}: ignoring the exit of an earlier process with that pid");
                }
                _ => return exit,
            }
        }
        let (tx, rx) = oneshot::channel();
        t.waiters.entry(pid).or_default().push(tx);
        rx
    };
    // The sender lives in the static table, so it is never dropped unanswered.
    rx.await.expect("reaper table dropped a waiter")
}

/// What a helper command left behind.
#[derive(Debug)]
pub struct Output {
    pub status: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl Output {
    pub fn success(&self) -> bool {
        self.status == 0
    }
}

/// Runs `cmd` with its stdout and stderr captured (stdin from /dev/null unless set), waiting
/// for it through the reaper.
pub async fn run(mut cmd: Command) -> std::io::Result<Output> {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    run_with_stdio(cmd, true).await
}

/// Runs `cmd` with whatever stdio it was given; `capture` says stdout/stderr are pipes to read.
pub async fn run_with_stdio(cmd: Command, capture: bool) -> std::io::Result<Output> {
    run_cancellable(cmd, capture, None).await
}

/// Like `run_with_stdio`, but the command runs in a process group of its own and `cancel`
/// stops it: the whole group (a runtime and the CRIU it started) is killed and waited for
/// before this returns `ErrorKind::Interrupted`, so nothing of it can act afterwards.
pub async fn run_cancellable(
    mut cmd: Command,
    capture: bool,
    cancel: Option<&CancellationToken>,
) -> std::io::Result<Output> {
    let Some(cancel) = cancel else {
        return run_to_end(cmd, capture).await;
    };
    use std::os::unix::process::CommandExt;
    cmd.process_group(0);
    let (pid_tx, pid_rx) = oneshot::channel();
    let run = run_reporting_pid(cmd, capture, pid_tx);
    tokio::pin!(run);
    tokio::select! {
        r = &mut run => r,
        _ = cancel.cancelled() => {
            // No pid means it never started: nothing to stop.
            if let Ok(pid) = pid_rx.await {
                kill_group_and_wait(pid).await;
            }
            Err(std::io::Error::new(std::io::ErrorKind::Interrupted, "cancelled"))
        }
    }
}

/// SIGKILLs process group `pgid` and waits (bounded) until its leader is reaped and no member
/// is left.
pub async fn kill_group_and_wait(pgid: i32) {
    use nix::sys::signal::{killpg, Signal};
    let group = Pid::from_raw(pgid);
    let _ = killpg(group, Signal::SIGKILL);
    let _ = tokio::time::timeout(Duration::from_secs(10), wait(pgid)).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while killpg(group, None).is_ok() && Instant::now() < deadline {
        let _ = killpg(group, Signal::SIGKILL);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if killpg(group, None).is_ok() {
        warn!("process group {pgid} still has members 10 s after SIGKILL");
    }
}

pub async fn run_reporting_pid(
    cmd: Command,
    capture: bool,
    pid: oneshot::Sender<i32>,
) -> std::io::Result<Output> {
    run_inner(cmd, capture, Some(pid)).await
}

async fn run_to_end(cmd: Command, capture: bool) -> std::io::Result<Output> {
    run_inner(cmd, capture, None).await
}

async fn run_inner(
    mut cmd: Command,
    capture: bool,
    report: Option<oneshot::Sender<i32>>,
) -> std::io::Result<Output> {
    let since = Instant::now();
    let mut child = cmd.spawn()?;
    if let Some(tx) = report {
        let _ = tx.send(child.id() as i32);
    }
    let pid = child.id() as i32;
    let (stdout, stderr) = if capture {
        let out = child.stdout.take();
        let err = child.stderr.take();
        let read = |p: Option<Box<dyn std::io::Read + Send>>| {
            tokio::task::spawn_blocking(move || {
                let mut buf = Vec::new();
                if let Some(mut p) = p {
                    let _ = p.read_to_end(&mut buf);
                }
                buf
            })
        };
        let o = read(out.map(|p| Box::new(p) as Box<dyn std::io::Read + Send>));
        let e = read(err.map(|p| Box::new(p) as Box<dyn std::io::Read + Send>));
        (o.await.unwrap_or_default(), e.await.unwrap_or_default())
    } else {
        (Vec::new(), Vec::new())
    };
    // `child` is dropped without wait(): std never reaps on drop, the reaper does.
    drop(child);
    let exit = wait_since(pid, since).await;
    Ok(Output {
        status: exit.status,
        stdout,
        stderr,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn runs_commands_and_reports_exit_codes() {
        start().unwrap();
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo out; echo err >&2; exit 3"]);
        let out = run(cmd).await.unwrap();
        assert_eq!(out.status, 3);
        assert_eq!(out.stdout, b"out\n");
        assert_eq!(out.stderr, b"err\n");

        let mut cmd = Command::new("sh");
        cmd.args(["-c", "kill -9 $$"]);
        assert_eq!(run(cmd).await.unwrap().status, 128 + 9);
    }

    #[tokio::test]
    async fn a_cancelled_command_and_its_children_are_gone_when_it_returns() {
        start().unwrap();
        let cancel = CancellationToken::new();
        let mut cmd = Command::new("sh");
        // A child of its own in the same group, like CRIU under runc.
        cmd.args(["-c", "sleep 4321.5 & sleep 4321.5"]);
        cmd.stdout(Stdio::null()).stderr(Stdio::null());
        let c2 = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            c2.cancel();
        });
        let started = Instant::now();
        let r = run_cancellable(cmd, false, Some(&cancel)).await;
        assert_eq!(r.unwrap_err().kind(), std::io::ErrorKind::Interrupted);
        assert!(started.elapsed() < Duration::from_secs(5));
        // No `sleep 4321.5` of that group is left.
        let left = std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter(|e| {
                std::fs::read(e.path().join("cmdline"))
                    .map(|c| c == b"sleep\x004321.5\x00")
                    .unwrap_or(false)
            })
            .count();
        assert_eq!(left, 0, "the command's children outlived the cancel");
    }

    #[tokio::test]
    async fn a_stale_exit_of_a_reused_pid_is_not_delivered() {
        // An exit nobody claimed, for a pid no real process here has.
        let pid = i32::MAX - 7;
        deliver(Exit {
            pid,
            status: 9,
            at: time::OffsetDateTime::now_utc(),
        });
        let since = Instant::now();
        let later = tokio::time::timeout(Duration::from_millis(200), wait_since(pid, since)).await;
        assert!(later.is_err(), "a process started later got the old exit");
        // An exit after `since` is delivered.
        let waiter = tokio::spawn(wait_since(pid, since));
        tokio::time::sleep(Duration::from_millis(50)).await;
        deliver(Exit {
            pid,
            status: 3,
            at: time::OffsetDateTime::now_utc(),
        });
        assert_eq!(waiter.await.unwrap().status, 3);
    }

    #[tokio::test]
    async fn an_exit_before_the_wait_is_kept() {
        start().unwrap();
        #[allow(clippy::zombie_processes)] // reaped by the reaper, which is what this tests
        let child = Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(wait(pid).await.status, 0);
    }
}
