//! containerd's CRI over its socket.

use std::path::Path;

use anyhow::{bail, Context, Result};
use hyper_util::rt::TokioIo;
pub use k8s_cri::v1 as api;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::{Channel, Endpoint, Uri};

pub type Runtime = RuntimeServiceClient<Channel>;
pub type Images = k8s_cri::v1::image_service_client::ImageServiceClient<Channel>;

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
                || p.metadata.as_ref().map(|m| m.name.as_str()) == Some(pod)
        })
        .collect();
    match matches.len() {
        0 => bail!("pod {pod:?} not found"),
        1 => Ok(matches.into_iter().next().unwrap()),
        n => bail!("{n} pods match {pod:?}; give the pod id"),
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
    let _ = rt
        .stop_pod_sandbox(api::StopPodSandboxRequest {
            pod_sandbox_id: id.to_string(),
        })
        .await;
    rt.remove_pod_sandbox(api::RemovePodSandboxRequest {
        pod_sandbox_id: id.to_string(),
    })
    .await
    .with_context(|| format!("remove pod {id}"))?;
    Ok(())
}
