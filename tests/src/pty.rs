//! Programs run on a pseudo-terminal, as a person at a terminal would run them.

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Result};

/// Runs `cmd` on a new pseudo-terminal (as a controlling terminal), writes `input` to it,
/// and returns everything printed and the exit status.
pub fn run_on_pty(mut cmd: Command, input: &[u8], timeout: Duration) -> Result<(String, i32)> {
    use std::{
        io::{Read, Write},
        os::{fd::AsRawFd, unix::process::CommandExt},
    };
    let pty = nix::pty::openpty(None, None)?;
    let slave = pty.slave;
    let slave_fd = slave.as_raw_fd();
    cmd.stdin(Stdio::from(slave.try_clone()?))
        .stdout(Stdio::from(slave.try_clone()?))
        .stderr(Stdio::from(slave.try_clone()?));
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 || libc::ioctl(slave_fd, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    // Every copy of the slave must close, or reading the master never ends.
    drop(cmd);
    drop(slave);
    let mut master = std::fs::File::from(pty.master);
    let mut reader = master.try_clone()?;
    let printed = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = printed.clone();
    let collector = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    });
    // Type only once the program is there to read: it has printed something (a prompt).
    let ready = Instant::now() + Duration::from_secs(20);
    while printed.lock().unwrap().is_empty() {
        if Instant::now() > ready {
            let _ = child.kill();
            bail!("the program on the pty printed nothing within 20 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    master.write_all(input)?;
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("command on pty did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    drop(master);
    let _ = collector.join();
    let out = printed.lock().unwrap().clone();
    Ok((
        String::from_utf8_lossy(&out).into_owned(),
        status.code().unwrap_or(-1),
    ))
}
