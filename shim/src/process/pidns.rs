//! The pod's PID namespace across a restore. CRIU gives every restored process its saved PID
//! in the new pod's namespace, and containers are restored one after the other: a container
//! already back may fork a child that takes a PID the next container needs ("Can't fork for
//! 42: File exists"). The checkpoint records the namespace's last allocated PID; a restored
//! pod starts its allocator above it, so new children never take a saved PID.

use std::process::Command;

use super::reaper;
use crate::error::{Error, Result};

/// Runs `sh -c script` inside the PID namespace of `pid` (nsenter forks after joining it, so
/// the shell sees that namespace's `ns_last_pid`).
async fn in_pid_ns(pod: &str, pid: i32, script: &str) -> Result<String> {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--pid=/proc/{pid}/ns/pid"))
        .args(["--", "sh", "-c", script]);
    // Through the reaper: it owns waitpid for every child of the shim.
    let out = reaper::run(cmd)
        .await
        .map_err(|e| Error::io(pod, "run nsenter", e))?;
    if !out.success() {
        return Err(Error::other(
            pod,
            "pod PID namespace",
            String::from_utf8_lossy(&out.stderr).trim(),
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The last PID allocated in the PID namespace of `pid`.
pub async fn last_pid(pod: &str, pid: i32) -> Result<u32> {
    let text = in_pid_ns(pod, pid, "cat /proc/sys/kernel/ns_last_pid").await?;
    text.parse()
        .map_err(|e| Error::other(pod, "read ns_last_pid", e))
}

/// Makes the PID namespace of `pid` allocate above `last`.
pub async fn reserve(pod: &str, pid: i32, last: u32) -> Result<()> {
    in_pid_ns(
        pod,
        pid,
        &format!("echo {last} > /proc/sys/kernel/ns_last_pid"),
    )
    .await
    .map(drop)
}
