//! Pieces of a migration between two nodes that the migration tests and benches share: a
//! running `migrate listen`, and a loopback relay that meddles with the stream.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{Shutdown, TcpListener, TcpStream},
    path::Path,
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

use crate::Containerd;

/// A running `migrate listen`: the process, its address, and its log lines as they come.
pub struct Listener {
    pub child: Child,
    pub addr: String,
    pub log: mpsc::Receiver<String>,
}

/// Starts `stasisctl migrate listen` from `stasisctl` (a command with its global options)
/// on a free loopback port for `count` migrations. Its log is read from then on (it must
/// never block on a full pipe); `echo` also copies it to our stderr, tagged.
pub fn listen(
    mut stasisctl: Command,
    key: &Path,
    count: u32,
    extra: &[&str],
    echo: bool,
) -> Result<Listener> {
    let mut child = stasisctl
        .args(["migrate", "listen", "--listen", "127.0.0.1:0", "--key-file"])
        .arg(key)
        .args(["--count", &count.to_string()])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("start stasisctl migrate listen")?;
    let mut stderr = BufReader::new(child.stderr.take().context("stderr")?);
    let mut line = String::new();
    stderr.read_line(&mut line)?;
    let addr = line
        .split_whitespace()
        .find(|w| w.starts_with("127.0.0.1:"))
        .with_context(|| format!("no address in {line:?}"))?
        .to_string();
    let (tx, log) = mpsc::channel();
    std::thread::spawn(move || {
        for l in stderr.lines().map_while(Result::ok) {
            if echo {
                eprintln!("[listen] {l}");
            }
            let _ = tx.send(l);
        }
    });
    Ok(Listener { child, addr, log })
}

/// What a relay does to the sender's bytes at an offset.
#[derive(Clone, Copy)]
pub enum Meddle {
    /// Flips a bit of that byte.
    Flip,
    /// Cuts the connection both ways (post-copy's pages flow from the sender).
    Cut,
}

/// A TCP relay on loopback to `to` for one connection that does `how` once the sender sent
/// `at` bytes; returns its address and whether it did.
pub fn meddling_relay(to: &str, at: u64, how: Meddle) -> Result<(String, JoinHandle<bool>)> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?.to_string();
    let to = to.to_string();
    let handle = std::thread::spawn(move || {
        let Ok((mut from_sender, _)) = listener.accept() else {
            return false;
        };
        let Ok(mut to_target) = TcpStream::connect(&to) else {
            return false;
        };
        let (Ok(mut back_from), Ok(mut back_to)) = (to_target.try_clone(), from_sender.try_clone())
        else {
            return false;
        };
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut back_from, &mut back_to);
            let _ = back_to.shutdown(Shutdown::Write);
        });
        let (mut seen, mut done) = (0u64, false);
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match from_sender.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if !done && seen + n as u64 > at {
                done = true;
                if let Meddle::Cut = how {
                    let _ = from_sender.shutdown(Shutdown::Both);
                    let _ = to_target.shutdown(Shutdown::Both);
                    return true;
                }
                buf[(at - seen) as usize] ^= 0x40;
            }
            seen += n as u64;
            if to_target.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = to_target.shutdown(Shutdown::Write);
        done
    });
    Ok((addr, handle))
}

/// The target pod's id once the listener's `log` says it runs ("pod <id> runs after …"),
/// waiting at most `within`; None if it never did (or the listener ended).
pub fn target_runs(log: &mpsc::Receiver<String>, within: Duration) -> Option<String> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        match log.recv_timeout(Duration::from_secs(1)) {
            Ok(l) if l.contains(" runs after ") => {
                return l.split_whitespace().nth(1).map(str::to_string)
            }
            Ok(_) | Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(_) => return None,
        }
    }
    None
}

/// SIGKILLs the shim of pod `pod` on `node`; returns the pids it killed.
pub fn kill_pod_shim(node: &Containerd, pod: &str) -> Vec<i32> {
    let pids = crate::processes_matching(&[
        "containerd-shim-stasis-v2",
        &node.socket().display().to_string(),
        &format!("-id {pod} "),
    ]);
    for pid in &pids {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    pids
}
