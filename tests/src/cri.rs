//! A small CRI client over containerd's socket (the `k8s-cri` types through tonic), and
//! builders for the pod and container configs the tests use.

use std::{collections::HashMap, path::Path};

use anyhow::{Context, Result};
pub use k8s_cri::v1 as cri;
/// The workload builders stasisctl bench uses too.
pub use stasis_controller::workload::{container_config, counter_loop, memory_hog, pod_config};

/// The runtime handler the harness configures for stasis.
pub const STASIS_HANDLER: &str = "stasis";

#[derive(Clone)]
pub struct CriClient {
    pub runtime: stasis_controller::cri::Runtime,
}

impl CriClient {
    /// The same connection stasisctl uses.
    pub async fn connect(socket: &Path) -> Result<Self> {
        Ok(CriClient {
            runtime: stasis_controller::cri::connect(socket).await?,
        })
    }

    /// RunPodSandbox with the stasis handler; returns the pod id.
    pub async fn run_pod(&mut self, config: &cri::PodSandboxConfig) -> Result<String> {
        self.run_pod_with(config, STASIS_HANDLER).await
    }

    /// Runs a pod under another CRI runtime handler (`stasis-gvisor`, `stasis-crun`, `runc`).
    pub async fn run_pod_with(
        &mut self,
        config: &cri::PodSandboxConfig,
        handler: &str,
    ) -> Result<String> {
        let resp = self
            .runtime
            .run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: handler.to_string(),
            })
            .await
            .with_context(|| format!("RunPodSandbox (handler {handler})"))?;
        Ok(resp.into_inner().pod_sandbox_id)
    }

    /// CreateContainer + StartContainer; returns the container id.
    pub async fn run_container(
        &mut self,
        pod_id: &str,
        pod: &cri::PodSandboxConfig,
        config: cri::ContainerConfig,
    ) -> Result<String> {
        let name = config
            .metadata
            .as_ref()
            .map(|m| m.name.clone())
            .unwrap_or_default();
        let id = self
            .runtime
            .create_container(cri::CreateContainerRequest {
                pod_sandbox_id: pod_id.to_string(),
                config: Some(config),
                sandbox_config: Some(pod.clone()),
            })
            .await
            .with_context(|| format!("CreateContainer {name}"))?
            .into_inner()
            .container_id;
        self.runtime
            .start_container(cri::StartContainerRequest {
                container_id: id.clone(),
            })
            .await
            .with_context(|| format!("StartContainer {name}"))?;
        Ok(id)
    }

    /// ExecSync: (exit code, stdout, stderr).
    pub async fn exec(
        &mut self,
        container_id: &str,
        cmd: &[&str],
    ) -> Result<(i32, String, String)> {
        let request = cri::ExecSyncRequest {
            container_id: container_id.to_string(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            timeout: 20,
        };
        let mut attempt = 0;
        let r = loop {
            match self.runtime.exec_sync(request.clone()).await {
                Ok(r) => break r.into_inner(),
                // runc's init occasionally dies before its first message on this loaded
                // 2-core host ("read init-p: connection reset by peer", also seen with plain
                // `ctr run`): the process never started, so it is run again, at most twice.
                Err(e) if e.message().contains("read init-p") && attempt < 2 => {
                    attempt += 1;
                    eprintln!(
                        "ExecSync {cmd:?} in {container_id}: runc failed transiently ({}), again",
                        e.message()
                    );
                }
                Err(e) => {
                    return Err(anyhow::Error::from(e)
                        .context(format!("ExecSync {cmd:?} in {container_id}")))
                }
            }
        };
        Ok((
            r.exit_code,
            String::from_utf8_lossy(&r.stdout).into_owned(),
            String::from_utf8_lossy(&r.stderr).into_owned(),
        ))
    }

    /// ExecSync that must succeed; returns trimmed stdout.
    pub async fn exec_ok(&mut self, container_id: &str, cmd: &[&str]) -> Result<String> {
        let (code, out, err) = self.exec(container_id, cmd).await?;
        anyhow::ensure!(
            code == 0,
            "{cmd:?} in {container_id} exited {code}: {err}{out}"
        );
        Ok(out.trim().to_string())
    }

    /// Every pod CRI lists.
    pub async fn pods(&mut self) -> Result<Vec<cri::PodSandbox>> {
        Ok(self
            .runtime
            .list_pod_sandbox(cri::ListPodSandboxRequest::default())
            .await?
            .into_inner()
            .items)
    }

    pub async fn pod_state(&mut self, pod_id: &str) -> Result<(i32, HashMap<String, String>)> {
        let r = self
            .runtime
            .pod_sandbox_status(cri::PodSandboxStatusRequest {
                pod_sandbox_id: pod_id.to_string(),
                verbose: true,
            })
            .await
            .context("PodSandboxStatus")?
            .into_inner();
        Ok((r.status.map(|s| s.state).unwrap_or(-1), r.info))
    }

    pub async fn container_status(&mut self, id: &str) -> Result<cri::ContainerStatus> {
        self.runtime
            .container_status(cri::ContainerStatusRequest {
                container_id: id.to_string(),
                verbose: false,
            })
            .await
            .context("ContainerStatus")?
            .into_inner()
            .status
            .context("no status")
    }

    pub async fn stop_and_remove_pod(&mut self, pod_id: &str) -> Result<()> {
        let stop = cri::StopPodSandboxRequest {
            pod_sandbox_id: pod_id.to_string(),
        };
        if let Err(e) = self.runtime.stop_pod_sandbox(stop.clone()).await {
            // containerd 2.1 can lose the race between its own handling of a container's exit
            // and this stop ("failed to kill container …: ttrpc: closed"); kubelet retries the
            // stop, and so do we, once.
            if !e.message().contains("ttrpc: closed") {
                return Err(e).context("StopPodSandbox");
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            self.runtime
                .stop_pod_sandbox(stop)
                .await
                .context("StopPodSandbox (retried)")?;
        }
        self.runtime
            .remove_pod_sandbox(cri::RemovePodSandboxRequest {
                pod_sandbox_id: pod_id.to_string(),
            })
            .await
            .context("RemovePodSandbox")?;
        Ok(())
    }
}

pub async fn read_counter(cri: &mut CriClient, id: &str, file: &str) -> Result<u64> {
    stasis_controller::workload::read_counter(&mut cri.runtime, id, file).await
}

/// Waits (up to 10 s) until the counter `file` in `id` passes `value`: its loop runs.
pub async fn wait_counter_above(
    cri: &mut CriClient,
    id: &str,
    file: &str,
    value: u64,
) -> Result<()> {
    for _ in 0..200 {
        if read_counter(cri, id, file).await? > value {
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    anyhow::bail!("{id}: {file} stuck at or below {value} for 10 s: the loop does not run")
}

/// Waits until the counter `file` in `id` moves (read it, then see it pass that value).
pub async fn wait_counter_moving(cri: &mut CriClient, id: &str, file: &str) -> Result<u64> {
    let now = read_counter(cri, id, file).await?;
    wait_counter_above(cri, id, file, now).await?;
    Ok(now)
}

/// Waits (up to 10 s) until container `id` has an established TCP connection (state 01 in
/// /proc/net/tcp), rather than sleeping and hoping.
pub async fn wait_tcp_established(cri: &mut CriClient, id: &str) -> Result<()> {
    for _ in 0..200 {
        let (_, out, _) = cri.exec(id, &["cat", "/proc/net/tcp"]).await?;
        if out
            .lines()
            .skip(1)
            .any(|l| l.split_whitespace().nth(3) == Some("01"))
        {
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    anyhow::bail!("{id}: no established TCP connection within 10 s")
}

/// A container workload holding an established loopback TCP connection (a server and a
/// client that retries until it is connected).
pub const TCP_WORKLOAD: &str = "nc -ll -p 9000 -e cat & while true; do \
    (while true; do echo hi; sleep 1; done) | nc 127.0.0.1 9000; sleep 0.1; done";

/// Waits until `file` exists in container `id` (a `memory_hog`'s /ready).
pub async fn wait_ready(
    cri: &mut CriClient,
    id: &str,
    file: &str,
    timeout: std::time::Duration,
) -> Result<()> {
    stasis_controller::workload::wait_ready(&mut cri.runtime, id, file, timeout).await
}

/// The kernel's freezer state (cgroup v1 `freezer.state`) of container `id` of a stasis pod
/// (the pod cgroup is /stasis/<pod id>, each container below it).
pub fn pod_freezer_state(pod_id: &str, id: &str) -> Result<String> {
    let path = std::path::Path::new("/sys/fs/cgroup/freezer/stasis")
        .join(pod_id)
        .join(id)
        .join("freezer.state");
    std::fs::read_to_string(&path)
        .map(|s| s.trim().to_string())
        .with_context(|| format!("read {}", path.display()))
}

/// The containers of pod `pod_id` whose freezer is not THAWED, as "<id> <state>".
pub fn pod_frozen_containers(pod_id: &str) -> Vec<String> {
    let dir = std::path::Path::new("/sys/fs/cgroup/freezer/stasis").join(pod_id);
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter_map(|e| {
                    let state = std::fs::read_to_string(e.path().join("freezer.state")).ok()?;
                    (state.trim() != "THAWED")
                        .then(|| format!("{} {}", e.file_name().to_string_lossy(), state.trim()))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The token only the counter loop's memory holds (see `counter_loop`).
pub async fn memory_token(cri: &mut CriClient, id: &str, file: &str) -> Result<String> {
    stasis_controller::workload::memory_token(&mut cri.runtime, id, file).await
}

/// What the consistency loop logged as violations; an exec failure is an error.
pub async fn violations(cri: &mut CriClient, id: &str) -> Result<String> {
    stasis_controller::workload::violations(&mut cri.runtime, id).await
}

pub async fn containers_by_name(
    cri: &mut CriClient,
    pod_id: &str,
) -> Result<Vec<(String, String, i32)>> {
    let list = cri
        .runtime
        .list_containers(cri::ListContainersRequest {
            filter: Some(cri::ContainerFilter {
                pod_sandbox_id: pod_id.to_string(),
                ..Default::default()
            }),
        })
        .await?
        .into_inner()
        .containers;
    Ok(list
        .into_iter()
        .map(|c| {
            (
                c.metadata.map(|m| m.name).unwrap_or_default(),
                c.id,
                c.state,
            )
        })
        .collect())
}

/// A container holding `mib` MiB of random bytes in a shell variable (NUL bytes, which a
/// variable cannot hold, become 1s); on SIGUSR1 it writes the MD5 of that memory to /sum.
/// It writes /ready once the memory is filled.
pub fn checksum_hog(mib: u64) -> String {
    format!(
        "a=$(head -c {} /dev/urandom | tr '\\0' '\\1'); \
         trap 'printf %s \"$a\" | md5sum > /sum.tmp; mv /sum.tmp /sum' USR1; \
         echo $$ > /hog.pid; echo ready > /ready; while true; do sleep 1; done",
        mib << 20
    )
}

/// Asks the hog for the MD5 of the memory it holds (computed by the process itself, from
/// its own variable) and returns it.
pub async fn memory_sum(cri: &mut CriClient, id: &str) -> Result<String> {
    cri.exec_ok(id, &["sh", "-c", "rm -f /sum; kill -USR1 $(cat /hog.pid)"])
        .await?;
    for _ in 0..600 {
        let (code, out, _) = cri.exec(id, &["cat", "/sum"]).await?;
        if code == 0 && !out.trim().is_empty() {
            return Ok(out
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_string());
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    anyhow::bail!("{id}: no memory checksum within 60 s")
}

/// A pod `name` of a container "big" running `hog` (a shell command that writes /ready once
/// its memory is filled) and a container "counter" running [`counter_loop`], both ready.
/// Returns the pod's, big's and counter's ids.
pub async fn hog_and_counter_pod(
    cri: &mut CriClient,
    logs: &Path,
    image: &str,
    name: &str,
    hog: &str,
) -> Result<(String, String, String)> {
    let pod = pod_config(name, logs);
    let pod_id = cri.run_pod(&pod).await?;
    let big = cri
        .run_container(
            &pod_id,
            &pod,
            container_config("big", image, &["sh", "-c", hog]),
        )
        .await?;
    let counter = counter_in(cri, &pod_id, &pod, image).await?;
    wait_ready(cri, &big, "/ready", std::time::Duration::from_secs(120)).await?;
    Ok((pod_id, big, counter))
}

/// A pod `name` of one container "counter" running [`counter_loop`], counting. Returns the
/// pod's and the container's ids.
pub async fn counter_pod(
    cri: &mut CriClient,
    logs: &Path,
    image: &str,
    name: &str,
) -> Result<(String, String)> {
    counter_pod_in(cri, logs, image, "default", name).await
}

/// [`counter_pod`] in Kubernetes namespace `namespace`.
pub async fn counter_pod_in(
    cri: &mut CriClient,
    logs: &Path,
    image: &str,
    namespace: &str,
    name: &str,
) -> Result<(String, String)> {
    let mut pod = pod_config(name, logs);
    if namespace != "default" {
        // A pod of the same name elsewhere must not share its uid or its logs.
        if let Some(m) = pod.metadata.as_mut() {
            m.namespace = namespace.to_string();
            m.uid = format!("{}-{namespace}", m.uid);
        }
        pod.log_directory = logs
            .join(format!("{namespace}-{name}"))
            .display()
            .to_string();
    }
    let pod_id = cri.run_pod(&pod).await?;
    let counter = counter_in(cri, &pod_id, &pod, image).await?;
    Ok((pod_id, counter))
}

/// A container "counter" in `pod_id`, once its counter moves.
async fn counter_in(
    cri: &mut CriClient,
    pod_id: &str,
    pod: &cri::PodSandboxConfig,
    image: &str,
) -> Result<String> {
    let id = cri
        .run_container(
            pod_id,
            pod,
            container_config("counter", image, &["sh", "-c", &counter_loop("/counter")]),
        )
        .await?;
    wait_counter_moving(cri, &id, "/counter").await?;
    Ok(id)
}
