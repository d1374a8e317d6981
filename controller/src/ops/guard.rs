//! The restore's watchdog. A stasisctl killed outright (SIGKILL, the OOM killer, a lost
//! terminal) cannot clean up after itself, so before a restore creates anything it starts a
//! small helper: this binary again, in its own session (a Ctrl-C to the terminal does not
//! reach it), reading a pipe from its parent. The parent says which pod it created and, at
//! its end, that nothing is left to do. When the pipe closes without that word, the parent
//! died half-way: the helper removes the new pod through CRI and the unpacked checkpoint.
//!
//! A lazy restore that returns once its pod runs hands its end over to the helper
//! ([`RestoreGuard::follow`]): it waits until the shim says every page is in, then removes
//! the restore directory; a container that did not get all of its memory takes the pod with
//! it, as when stasisctl waits itself.

use std::{
    io::{BufRead, Write},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
};

use anyhow::{Context, Result};

use crate::{
    cri::{self, api},
    ops::{restore::lazy, Target},
};

/// What a watchdog following a lazy restore needs: where the pod is, and its containers
/// (name, id) as the restore created them.
#[derive(serde::Serialize, serde::Deserialize)]
struct Follow {
    namespace: String,
    pod: String,
    handler: String,
    containers: Vec<(String, String)>,
}

/// The hidden subcommand the helper runs as.
pub const SUBCOMMAND: &str = "__restore-guard";

pub struct RestoreGuard {
    tell: ChildStdin,
    child: Child,
    address: String,
    dir: PathBuf,
}

impl RestoreGuard {
    /// Starts the helper for a restore unpacking into `dir` against containerd at `address`.
    pub fn start(address: &str, dir: &Path) -> Result<Self> {
        Self::spawn(address, dir, Stdio::inherit())
    }

    fn spawn(address: &str, dir: &Path, stderr: Stdio) -> Result<Self> {
        let exe = std::env::current_exe().context("find stasisctl's own binary")?;
        let mut cmd = Command::new(exe);
        // The directory names the restore id: it goes through the pipe, never on a command
        // line every local user can read.
        cmd.arg("--address")
            .arg(address)
            .arg(SUBCOMMAND)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(stderr);
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
        Ok(RestoreGuard {
            tell,
            child,
            address: address.to_string(),
            dir: dir.to_path_buf(),
        })
    }

    /// The pod the restore created: removed by the helper if stasisctl dies.
    pub fn pod(&mut self, id: &str) {
        let _ = writeln!(self.tell, "pod {id}");
    }

    /// The restore returns with pages still coming in: a fresh helper waits for them (see
    /// the module's text), then removes what the restore left; it runs on after stasisctl
    /// ends. It is started before this one is dismissed, so the pod is never unwatched.
    /// It keeps stasisctl's stderr for what it has to say, unless that is a pipe: a caller
    /// reading the pipe to its end would otherwise wait for the last page.
    pub fn follow(
        self,
        namespace: &str,
        pod_id: &str,
        handler: &str,
        containers: &[(String, String)],
    ) -> Result<()> {
        let stderr = if stderr_is_a_pipe() {
            Stdio::null()
        } else {
            Stdio::inherit()
        };
        let context = || {
            format!("pod {pod_id}: hand the lazy restore to a watchdog (the restore's own watchdog removes the pod)")
        };
        let mut follower = Self::spawn(&self.address, &self.dir, stderr).with_context(context)?;
        // One JSON line: names come from the archive, and must not be able to add lines.
        let follow = Follow {
            namespace: namespace.to_string(),
            pod: pod_id.to_string(),
            handler: handler.to_string(),
            containers: containers.to_vec(),
        };
        writeln!(follower.tell, "follow {}", serde_json::to_string(&follow)?)
            .with_context(context)?;
        // Closing the pipe starts the follower's wait; its exit is not ours to wait for.
        drop(follower.tell);
        self.done();
        Ok(())
    }

    /// Nothing left for the helper to do (the restore succeeded or cleaned up itself).
    pub fn done(mut self) {
        let _ = writeln!(self.tell, "done");
        drop(self.tell);
        let _ = self.child.wait();
    }
}

fn stderr_is_a_pipe() -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata("/proc/self/fd/2")
        .map(|m| m.file_type().is_fifo() || m.file_type().is_socket())
        .unwrap_or(false)
}

/// The helper: waits for its parent's pipe to close, then cleans up unless told it is done.
pub async fn run(address: &str) -> Result<()> {
    let (mut pod, mut done, mut dir) = (None, false, None);
    let mut follow: Option<Follow> = None;
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
            // The first says which restore this is; nothing later changes it.
            dir.get_or_insert_with(|| PathBuf::from(d));
        } else if let Some(id) = line.strip_prefix("pod ") {
            pod = Some(id.to_string());
        } else if line == "done" {
            done = true;
        } else if let Some(json) = line.strip_prefix("follow ") {
            follow = serde_json::from_str(json).ok();
        }
    }
    if done {
        return Ok(());
    }
    let Some(dir) = dir else {
        return Ok(());
    };
    let mut lost = Vec::new();
    if let Some(f) = follow {
        let t = Target {
            address: address.to_string(),
            namespace: f.namespace,
        };
        lost = lazy::lost_containers(&t, (&f.pod, &f.handler), &f.containers).await;
        // A pod removed meanwhile (by its user, say) has nothing left to lose.
        let gone = match cri::connect(Path::new(address)).await {
            Ok(mut rt) => cri::find_pod(&mut rt, &f.pod).await.is_err(),
            Err(_) => false,
        };
        if lost.is_empty() || gone {
            remove_restore_files(&dir);
            return Ok(());
        }
        pod = Some(f.pod);
    }
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
        remove_restore_files(&dir);
        let outcome = if removed {
            "removed"
        } else {
            "could not remove"
        };
        // stasisctl may be long gone, and its terminal with it: a failed write is no reason
        // to stop.
        let _ = if lost.is_empty() {
            writeln!(
                std::io::stderr(),
                "stasisctl: the restore was killed half-way; {outcome} the new pod {id}"
            )
        } else {
            writeln!(
                std::io::stderr(),
                "stasisctl: pod {id}: {} stopped before all of its memory was restored; {outcome} the pod",
                lost.join(", ")
            )
        };
        return Ok(());
    }
    remove_restore_files(&dir);
    Ok(())
}

/// The restore directory and the files beside it: the restore's options, claim and token.
fn remove_restore_files(dir: &Path) {
    let _ = std::fs::remove_dir_all(dir);
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
}
