//! A process's stdio: pipes (or a terminal) between the OCI runtime and containerd's fifos.

use std::{
    fs::File,
    os::fd::{AsRawFd, OwnedFd},
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use containerd_shim::asynchronous::io::{IoTasks, Pty, Stdio};
use nix::{fcntl::OFlag, unistd::pipe2};
use tokio::net::unix::pipe;

use crate::error::{Error, Result};

/// How long an output copy waits for containerd's reader of its fifo before it starts
/// without it.
const READER_WITHIN: Duration = Duration::from_secs(2);

/// Waits until the fifo at `path` has a reader (containerd's) and returns a writer of ours
/// that keeps it connected: hold it until the copy's own writer is open. containerd opens its
/// reader on a thread of its own, and that open blocks until a writer is there; a process
/// that ended before it (a quick exec on a busy node) left containerd waiting for a writer
/// for good, its ExecSync hung (seen here: `cat` exited in 40 ms, containerd's two opens
/// never returned). None (a warning) when no reader came in time: the copy then starts
/// alone, as before.
async fn reader_connected(id: &str, path: &str) -> Option<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let deadline = Instant::now() + READER_WITHIN;
    loop {
        let opened = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path);
        match opened {
            Ok(f) => return Some(f),
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            Err(e) => {
                log::warn!("{id}: output fifo {path} has no reader ({e}); copying without one");
                return None;
            }
        }
    }
}

/// The stdio a new process gets: the ends of the pipes the shim copies to containerd's fifos.
/// With a terminal, the runtime hands the pty master back through `console_socket` instead.
#[derive(Default)]
pub struct ProcessStdio {
    pub stdin: Option<OwnedFd>,
    pub stdout: Option<OwnedFd>,
    pub stderr: Option<OwnedFd>,
    pub console_socket: Option<std::path::PathBuf>,
}

impl ProcessStdio {
    /// Duplicates the descriptors (a runtime that hands stdio over later keeps a copy).
    pub fn try_clone(&self, id: &str) -> Result<ProcessStdio> {
        let dup = |fd: &Option<OwnedFd>| -> Result<_> {
            fd.as_ref()
                .map(|f| f.try_clone())
                .transpose()
                .map_err(|e| Error::io(id, "duplicate stdio", e))
        };
        Ok(ProcessStdio {
            stdin: dup(&self.stdin)?,
            stdout: dup(&self.stdout)?,
            stderr: dup(&self.stderr)?,
            console_socket: self.console_socket.clone(),
        })
    }
}

/// The shim's side of a process's stdio once it runs.
#[derive(Clone, Default)]
pub struct ProcessIo {
    pub copies: IoTasks,
    pub pty: Option<Pty>,
}

/// Built before the runtime is called: the runtime's ends and the shim's pending side.
pub struct PreparedIo {
    pub runtime: ProcessStdio,
    pub io: ProcessIo,
    console: Option<ConsoleSocket>,
    stdio: Stdio,
}

struct ConsoleSocket {
    path: PathBuf,
    listener: std::os::unix::net::UnixListener,
}

impl Drop for ConsoleSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn cloexec_pipe(id: &str) -> Result<(OwnedFd, OwnedFd)> {
    pipe2(OFlag::O_CLOEXEC).map_err(|e| Error::io(id, "create stdio pipe", e.into()))
}

fn console_socket_path() -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    // Short on purpose: unix socket paths are limited to 108 bytes.
    std::env::temp_dir().join(format!(
        "stasis-pty-{}-{}.sock",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}

/// Prepares pipes (or a console socket) for a process with containerd's `stdio`.
pub async fn prepare(id: &str, stdio: &Stdio) -> Result<PreparedIo> {
    let mut runtime = ProcessStdio::default();
    let io = ProcessIo::default();
    let mut console = None;
    if stdio.terminal {
        let path = console_socket_path();
        let _ = std::fs::remove_file(&path);
        let listener = std::os::unix::net::UnixListener::bind(&path)
            .map_err(|e| Error::io(id, format!("bind console socket {}", path.display()), e))?;
        runtime.console_socket = Some(path.clone());
        console = Some(ConsoleSocket { path, listener });
    } else {
        if !stdio.stdin.is_empty() {
            let (r, w) = cloexec_pipe(id)?;
            runtime.stdin = Some(r);
            let sender = pipe::Sender::from_owned_fd(w)
                .map_err(|e| Error::io(id, "register stdin pipe", e))?;
            io.copies
                .copy_from_fifo(&stdio.stdin, sender)
                .map_err(|e| Error::other(id, "open stdin fifo", e))?;
        }
        for (path, slot) in [
            (&stdio.stdout, &mut runtime.stdout),
            (&stdio.stderr, &mut runtime.stderr),
        ] {
            if path.is_empty() {
                continue;
            }
            let (r, w) = cloexec_pipe(id)?;
            *slot = Some(w);
            let receiver = pipe::Receiver::from_owned_fd(r)
                .map_err(|e| Error::io(id, "register output pipe", e))?;
            let connected = reader_connected(id, path).await;
            io.copies
                .copy_to_fifo(receiver, path)
                .map_err(|e| Error::other(id, format!("open fifo {path}"), e))?;
            drop(connected);
        }
    }
    Ok(PreparedIo {
        runtime: std::mem::take(&mut runtime),
        io,
        console,
        stdio: stdio.clone(),
    })
}

impl PreparedIo {
    /// The runtime's ends, to hand to it; the shim keeps its own side.
    pub fn take_runtime(&mut self) -> ProcessStdio {
        std::mem::take(&mut self.runtime)
    }

    /// After the runtime created the process: receive the terminal, if any, and start copying.
    pub async fn finish(self, id: &str) -> Result<ProcessIo> {
        let Some(console) = self.console else {
            return Ok(self.io);
        };
        let id_owned = id.to_string();
        let master = tokio::task::spawn_blocking(move || receive_console(&id_owned, &console))
            .await
            .map_err(|e| Error::other(id, "receive console", e))??;
        let pty = Pty::new(master).map_err(|e| Error::other(id, "register console", e))?;
        let mut io = self.io;
        if !self.stdio.stdin.is_empty() {
            io.copies
                .copy_from_fifo(&self.stdio.stdin, pty.clone())
                .map_err(|e| Error::other(id, "open stdin fifo", e))?;
        }
        if !self.stdio.stdout.is_empty() {
            let connected = reader_connected(id, &self.stdio.stdout).await;
            io.copies
                .copy_to_fifo(pty.clone(), &self.stdio.stdout)
                .map_err(|e| Error::other(id, "open stdout fifo", e))?;
            drop(connected);
        }
        io.pty = Some(pty);
        Ok(io)
    }
}

/// The runtime connected to the console socket during create and sent the pty master.
fn receive_console(id: &str, console: &ConsoleSocket) -> Result<File> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    console
        .listener
        .set_nonblocking(false)
        .map_err(|e| Error::io(id, "console socket", e))?;
    let (stream, _) = console
        .listener
        .accept()
        .map_err(|e| Error::io(id, "accept console connection", e))?;
    let mut buf = [0u8; 4096];
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let msg = recvmsg::<()>(
        stream.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(|e| Error::io(id, "receive console fd", e.into()))?;
    for c in msg
        .cmsgs()
        .map_err(|e| Error::io(id, "console cmsg", e.into()))?
    {
        if let ControlMessageOwned::ScmRights(fds) = c {
            if let Some(fd) = fds.first() {
                // SAFETY: the kernel just gave us this descriptor; nobody else owns it.
                return Ok(unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(*fd) });
            }
        }
    }
    Err(Error::other(
        id,
        "receive console",
        "no terminal fd received",
    ))
}

/// Sets the terminal size of a process's pty.
pub fn resize(pty: &Pty, width: u32, height: u32) -> std::io::Result<()> {
    use std::os::fd::AsFd;
    let ws = libc::winsize {
        ws_row: height as u16,
        ws_col: width as u16,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize from the pointer we pass.
    let rc = unsafe { libc::ioctl(pty.as_fd().as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

pub fn read_pid(id: &str, path: &Path) -> Result<i32> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::io(id, format!("read pid file {}", path.display()), e))?;
    text.trim()
        .parse()
        .map_err(|e| Error::other(id, format!("parse pid file {}", path.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// containerd's reader of an output fifo comes late (its blocking open on a thread of
    /// its own); the process writes and ends before that. The reader must still get the
    /// output and its end, not wait for a writer for good.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn output_reaches_a_reader_that_opens_after_the_process_ended() {
        let dir = std::env::temp_dir().join(format!("stasis-stdio-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("out");
        let _ = std::fs::remove_file(&fifo);
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let path = fifo.to_str().unwrap().to_string();
        let (tx, rx) = std::sync::mpsc::channel();
        let reader_path = fifo.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            // A blocking open for reading, as containerd's.
            let mut f = std::fs::File::open(&reader_path).unwrap();
            let mut got = String::new();
            f.read_to_string(&mut got).unwrap();
            let _ = tx.send(got);
        });
        let mut prepared = prepare("c1", &Stdio::new("", &path, "", false))
            .await
            .unwrap();
        let runtime = prepared.take_runtime();
        // The process: writes, ends (its end of the pipe closes).
        let mut out = std::fs::File::from(runtime.stdout.unwrap());
        out.write_all(b"hello\n").unwrap();
        drop(out);
        let got = tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(10)))
            .await
            .unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(
            got.as_deref(),
            Ok("hello\n"),
            "the late reader got no output or no end"
        );
    }
}
