//! The restore's watchdog. A stasisctl killed outright (SIGKILL, the OOM killer, a lost
//! terminal) cannot clean up after itself, so before a restore creates anything it starts a
//! small helper: this binary again, in its own session (a Ctrl-C to the terminal does not
//! reach it), reading a pipe from its parent. The parent says which pod it created and, at
//! its end, that nothing is left to do. When the pipe closes without that word, the parent
//! died half-way: the helper removes the new pod through CRI and the unpacked checkpoint.

use std::{
    io::{BufRead, Write},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
};

use anyhow::{Context, Result};

use crate::cri::{self, api};

/// The hidden subcommand the helper runs as.
pub const SUBCOMMAND: &str = "__restore-guard";

pub struct RestoreGuard {
    tell: ChildStdin,
    child: Child,
}

impl RestoreGuard {
    /// Starts the helper for a restore unpacking into `dir` against containerd at `address`.
    pub fn start(address: &str, dir: &Path) -> Result<Self> {
        let exe = std::env::current_exe().context("find stasisctl's own binary")?;
        let mut cmd = Command::new(exe);
        // The directory names the restore id: it goes through the pipe, never on a command
        // line every local user can read.
        cmd.arg("--address")
            .arg(address)
            .arg(SUBCOMMAND)
            .stdin(Stdio::piped())
            .stdout(Stdio::null());
        // SAFETY: setsid is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                nix::unistd::setsid().map_err(std::io::Error::from)?;
                Ok(())
            });
        }
        let mut child = cmd.spawn().context("start the restore watchdog")?;
        let mut tell = child.stdin.take().context("watchdog pipe")?;
        writeln!(tell, "dir {}", dir.display()).context("tell the restore watchdog")?;
        Ok(RestoreGuard { tell, child })
    }

    /// The pod the restore created: removed by the helper if stasisctl dies.
    pub fn pod(&mut self, id: &str) {
        let _ = writeln!(self.tell, "pod {id}");
    }

    /// Nothing left for the helper to do (the restore succeeded or cleaned up itself).
    pub fn done(mut self) {
        let _ = writeln!(self.tell, "done");
        drop(self.tell);
        let _ = self.child.wait();
    }
}

/// The helper: waits for its parent's pipe to close, then cleans up unless told it is done.
pub async fn run(address: &str) -> Result<()> {
    let (mut pod, mut done, mut dir) = (None, false, None);
    let lines = tokio::task::spawn_blocking(|| {
        std::io::stdin()
            .lock()
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<_>>()
    })
    .await?;
    for line in lines {
        if let Some(d) = line.strip_prefix("dir ") {
            dir = Some(PathBuf::from(d));
        } else if let Some(id) = line.strip_prefix("pod ") {
            pod = Some(id.to_string());
        } else if line == "done" {
            done = true;
        }
    }
    if done {
        return Ok(());
    }
    let Some(dir) = dir else {
        return Ok(());
    };
    if let Some(id) = &pod {
        let mut rt = cri::connect(Path::new(address)).await?;
        let mut removed = false;
        // containerd may still be taking note of a container the restore was creating.
        for _ in 0..10 {
            let _ = rt
                .stop_pod_sandbox(api::StopPodSandboxRequest {
                    pod_sandbox_id: id.clone(),
                })
                .await;
            if rt
                .remove_pod_sandbox(api::RemovePodSandboxRequest {
                    pod_sandbox_id: id.clone(),
                })
                .await
                .is_ok()
            {
                removed = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
        eprintln!(
            "stasisctl: the restore was killed half-way; {} the new pod {id}",
            if removed {
                "removed"
            } else {
                "could not remove"
            }
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    // The files beside it: the restore's options, claim and token.
    if let (Some(parent), Some(name)) = (dir.parent(), dir.file_name()) {
        for suffix in [
            stasis_api::layout::RESTORE_OPTIONS_SUFFIX,
            ".pod",
            stasis_api::layout::RESTORE_TOKEN_SUFFIX,
        ] {
            let _ =
                std::fs::remove_file(parent.join(format!("{}{suffix}", name.to_string_lossy())));
        }
    }
    Ok(())
}
