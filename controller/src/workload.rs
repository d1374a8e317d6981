//! The pod workloads the tests and `stasisctl bench` run: CRI configs for a pod with its own
//! network and for busybox containers, and the consistency loop.

use std::{path::Path, time::Duration};

use anyhow::{bail, Context, Result};

use crate::cri::{api as cri, Runtime};

/// Network, PID and IPC namespaces shared by the whole pod.
fn pod_namespaces() -> cri::NamespaceOption {
    cri::NamespaceOption {
        network: cri::NamespaceMode::Pod as i32,
        pid: cri::NamespaceMode::Pod as i32,
        ipc: cri::NamespaceMode::Pod as i32,
        ..Default::default()
    }
}

/// A pod with its own network (CNI), sharing PID/IPC/UTS namespaces among its containers.
pub fn pod_config(name: &str, log_dir: &Path) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.to_string(),
            uid: format!("uid-{name}-{}", std::process::id()),
            namespace: "default".to_string(),
            attempt: 0,
        }),
        hostname: format!("{name}-host"),
        log_directory: log_dir.join(name).display().to_string(),
        linux: Some(cri::LinuxPodSandboxConfig {
            security_context: Some(cri::LinuxSandboxSecurityContext {
                namespace_options: Some(pod_namespaces()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A busybox container running `cmd`.
pub fn container_config(name: &str, image: &str, cmd: &[&str]) -> cri::ContainerConfig {
    cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: name.to_string(),
            attempt: 0,
        }),
        image: Some(cri::ImageSpec {
            image: image.to_string(),
            ..Default::default()
        }),
        command: cmd.iter().map(|s| s.to_string()).collect(),
        log_path: format!("{name}.log"),
        linux: Some(cri::LinuxContainerConfig {
            security_context: Some(cri::LinuxContainerSecurityContext {
                namespace_options: Some(pod_namespaces()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The consistency loop of the checkpoint tests: a memory counter written to a file; after a
/// restore the file must never be ahead of memory (a violation is logged to /violations).
/// The loop also holds a token that exists only in its memory (a random value never written
/// to disk unless asked with SIGUSR1, see `memory_token`): a process restarted from the files
/// instead of restored from memory would answer a different one. Its pid is in `<file>.pid`.
pub fn counter_loop(file: &str) -> String {
    format!(
        "t=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'); echo $$ > {file}.pid; \
         trap 'echo $t > {file}.token.tmp; mv {file}.token.tmp {file}.token' USR1; \
         i=0; while true; do v=$(cat {file} 2>/dev/null || echo 0); \
         if [ \"$v\" != \"$i\" ]; then echo \"file=$v memory=$i\" >> /violations; fi; \
         i=$((i+1)); echo $i > {file}; sleep 0.01; done"
    )
}

/// The in-memory token of the `counter_loop` writing `file` in container `id`: the loop is
/// asked for it (SIGUSR1), the answer read and removed again, so it is never in a checkpoint's
/// files.
pub async fn memory_token(rt: &mut Runtime, id: &str, file: &str) -> Result<String> {
    let ask = format!("rm -f {file}.token; kill -USR1 $(cat {file}.pid)");
    let (code, out) = exec(rt, id, &["sh", "-c", &ask]).await?;
    if code != 0 {
        bail!("ask the counter loop in {id} for its token: exit {code}: {out}");
    }
    for _ in 0..100 {
        let (code, out) = exec(
            rt,
            id,
            &["sh", "-c", &format!("cat {file}.token && rm {file}.token")],
        )
        .await?;
        if code == 0 && !out.trim().is_empty() {
            return Ok(out.trim().to_string());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bail!("the counter loop in {id} never answered with its token")
}

/// The violations the consistency loop logged in container `id` (empty when none); fails if
/// the container could not be asked, so a dead container never reads as "no violations".
pub async fn violations(rt: &mut Runtime, id: &str) -> Result<String> {
    let (code, out) = exec(
        rt,
        id,
        &[
            "sh",
            "-c",
            "if [ -e /violations ]; then cat /violations; fi",
        ],
    )
    .await?;
    if code != 0 {
        bail!("read /violations in {id}: exit {code}: {out}");
    }
    Ok(out.trim().to_string())
}

/// A container holding `mib` MiB of touched memory (a shell variable) that a dump must copy;
/// it writes /ready once the memory is filled (see `wait_ready`). The shell then waits on a
/// child it started before touching the memory: a loop of `sleep 1` forked the big shell
/// every second, and a dump that met the child between its fork and its exec found the
/// memory twice (seen: a 1 GiB pod's archive of 2 GiB).
pub fn memory_hog(mib: u64) -> String {
    format!(
        "sleep 2147483647 & a=$(head -c {} /dev/zero | tr '\\0' x); echo ready > /ready; wait",
        mib << 20
    )
}

/// Waits until `file` exists in container `id` (a hog's /ready), for up to `timeout`.
pub async fn wait_ready(rt: &mut Runtime, id: &str, file: &str, timeout: Duration) -> Result<()> {
    let deadline = std::time::Instant::now() + timeout;
    while exec(rt, id, &["cat", file]).await?.0 != 0 {
        if std::time::Instant::now() > deadline {
            bail!("{id}: {file} did not appear within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// ExecSync of `cmd` in container `id`: exit code and stdout.
pub async fn exec(rt: &mut Runtime, id: &str, cmd: &[&str]) -> Result<(i32, String)> {
    let r = rt
        .exec_sync(cri::ExecSyncRequest {
            container_id: id.to_string(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            timeout: 20,
        })
        .await
        .with_context(|| format!("exec {cmd:?} in {id}"))?
        .into_inner();
    Ok((r.exit_code, String::from_utf8_lossy(&r.stdout).into_owned()))
}

/// The value of a counter file the consistency loop writes (it may be caught mid-write).
pub async fn read_counter(rt: &mut Runtime, id: &str, file: &str) -> Result<u64> {
    let mut last = String::new();
    for _ in 0..50 {
        let (_, out) = exec(rt, id, &["cat", file]).await?;
        if let Ok(v) = out.trim().parse() {
            return Ok(v);
        }
        last = out;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bail!("counter {file} in {id} unreadable: {last:?}")
}
