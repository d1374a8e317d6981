//! containerd's CRI over its socket.

use std::path::Path;

use anyhow::{bail, Context, Result};
use hyper_util::rt::TokioIo;
pub use k8s_cri::v1 as api;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::{Channel, Endpoint, Uri};

pub type Runtime = RuntimeServiceClient<Channel>;
pub type Images = k8s_cri::v1::image_service_client::ImageServiceClient<Channel>;

mod gojson;

pub use gojson::{config_from_info, from_go_json};

pub async fn connect(socket: &Path) -> Result<Runtime> {
    Ok(RuntimeServiceClient::new(channel(socket).await?))
}

/// A gRPC channel to containerd's socket, for any CRI service.
pub async fn channel(socket: &Path) -> Result<Channel> {
    let path = socket.to_path_buf();
    let channel = Endpoint::try_from("http://[::]:50051")?
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await
        .with_context(|| format!("connect to containerd at {}", socket.display()))?;
    Ok(channel)
}

/// Finds a pod by id, unique id prefix, or name.
pub async fn find_pod(rt: &mut Runtime, pod: &str) -> Result<api::PodSandbox> {
    let pods = rt
        .list_pod_sandbox(api::ListPodSandboxRequest::default())
        .await
        .context("list pods")?
        .into_inner()
        .items;
    let matches: Vec<_> = pods
        .into_iter()
        .filter(|p| {
            p.id == pod
                || (pod.len() >= 6 && p.id.starts_with(pod))
                || p.metadata.as_ref().is_some_and(|m| {
                    m.name == pod || pod.split_once('/') == Some((&m.namespace, &m.name))
                })
        })
        .collect();
    match matches.len() {
        0 => bail!("pod {pod:?} not found"),
        1 => Ok(matches.into_iter().next().unwrap()),
        n => bail!("{n} pods match {pod:?}; give NAMESPACE/NAME or the pod id"),
    }
}

pub async fn pod_containers(rt: &mut Runtime, pod_id: &str) -> Result<Vec<api::Container>> {
    Ok(rt
        .list_containers(api::ListContainersRequest {
            filter: Some(api::ContainerFilter {
                pod_sandbox_id: pod_id.to_string(),
                ..Default::default()
            }),
        })
        .await
        .context("list containers")?
        .into_inner()
        .containers)
}

pub fn state_name(state: i32) -> &'static str {
    match api::ContainerState::try_from(state) {
        Ok(api::ContainerState::ContainerCreated) => "CREATED",
        Ok(api::ContainerState::ContainerRunning) => "RUNNING",
        Ok(api::ContainerState::ContainerExited) => "EXITED",
        _ => "UNKNOWN",
    }
}

/// Stops (whatever that says) and removes pod `id`; the removal's error is returned.
pub async fn remove_pod(rt: &mut Runtime, id: &str) -> Result<()> {
    // containerd 2.1.9 can answer "failed to kill container …: ttrpc: closed" for a container
    // whose exit it is still handling (the task's connection is closed by the delete that
    // follows the exit, before the container is marked exited); a moment later the stop
    // goes through. Seen once in ten migrations of a stopped source pod. After a pod's shim
    // died, the removal is refused ("container is still running, to stop first") until
    // containerd has handled the dead shim: retried for up to 10 s.
    let transient = |m: &str| m.contains("ttrpc: closed") || m.contains("still running");
    let mut attempt = 0;
    loop {
        attempt += 1;
        let stopped = rt
            .stop_pod_sandbox(api::StopPodSandboxRequest {
                pod_sandbox_id: id.to_string(),
            })
            .await;
        if matches!(&stopped, Err(e) if transient(e.message()) && attempt < 50) {
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            continue;
        }
        match rt
            .remove_pod_sandbox(api::RemovePodSandboxRequest {
                pod_sandbox_id: id.to_string(),
            })
            .await
        {
            Err(e) if transient(e.message()) && attempt < 50 => {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            removed => {
                removed.with_context(|| format!("remove pod {id}"))?;
                return Ok(());
            }
        }
    }
}

/// The runtime handlers containerd's CRI runs with stasis (runtime types
/// `io.containerd.stasis.v2` and `io.containerd.stasis-<backend>.v2`), read from its verbose
/// status as `crictl info` shows it.
pub async fn stasis_handlers(rt: &mut Runtime) -> Result<Vec<String>> {
    let status = rt
        .status(api::StatusRequest { verbose: true })
        .await
        .context("ask containerd for its CRI configuration")?
        .into_inner();
    let config: serde_json::Value = status
        .info
        .get("config")
        .map(|c| serde_json::from_str(c))
        .transpose()
        .context("containerd's CRI configuration is not JSON")?
        .context("containerd's verbose CRI status has no configuration")?;
    Ok(handlers_of_type(&config, |t| {
        t == "io.containerd.stasis.v2"
            || t.strip_prefix("io.containerd.stasis-")
                .and_then(|r| r.strip_suffix(".v2"))
                .is_some_and(|backend| !backend.is_empty() && !backend.contains('.'))
    }))
}

fn handlers_of_type(config: &serde_json::Value, stasis: impl Fn(&str) -> bool) -> Vec<String> {
    config
        .pointer("/containerd/runtimes")
        .and_then(|r| r.as_object())
        .map(|runtimes| {
            runtimes
                .iter()
                .filter(|(_, r)| r["runtimeType"].as_str().is_some_and(&stasis))
                .map(|(name, _)| name.clone())
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #[test]
    fn handlers_are_picked_by_runtime_type() {
        let config = serde_json::json!({"containerd": {"runtimes": {
            "runc": {"runtimeType": "io.containerd.runc.v2"},
            "stasis": {"runtimeType": "io.containerd.stasis.v2"},
            "stasis-gvisor": {"runtimeType": "io.containerd.stasis-gvisor.v2"},
        }}});
        assert_eq!(
            super::handlers_of_type(&config, |t| t.starts_with("io.containerd.stasis")),
            ["stasis", "stasis-gvisor"]
        );
    }
}
