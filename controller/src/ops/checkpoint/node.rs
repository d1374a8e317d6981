//! What a pod checkpoint asks of the node: CRI for the pod, its containers and their stats;
//! the pod's shim for the checkpoint and its end. [`CriNode`] talks to containerd and the
//! shim; the tests use a fake.

use std::path::Path;

use anyhow::Result;
use stasis_api::{
    checkpoint::{
        CheckpointPodRequest, CheckpointPodResponse, ContainerInfo, FinishCheckpointRequest,
    },
    checkpoint_ttrpc::CheckpointClient,
};

use super::{select, space};
use crate::{
    cri::{self, api},
    ops::{ttrpc_ctx, Target},
    shim,
};

pub(super) trait Node {
    /// The pod named by id, id prefix or name.
    async fn find_pod(&mut self, pod: &str) -> Result<api::PodSandbox>;
    /// Its containers.
    async fn containers(&mut self, pod_id: &str) -> Result<Vec<api::Container>>;
    /// What the Checkpoint service wants to know of a container.
    async fn container_info(&mut self, c: &api::Container) -> Result<ContainerInfo>;
    /// What the containers will need on disk.
    async fn estimate(&mut self, containers: &[ContainerInfo]) -> space::SpaceEstimate;
    /// Reaches the pod's shim (an error if it serves no Checkpoint service).
    async fn connect_shim(&mut self, pod: &api::PodSandbox) -> Result<()>;
    /// The shim's CheckpointPod, waiting at most `secs`.
    async fn checkpoint(
        &mut self,
        req: &CheckpointPodRequest,
        secs: u64,
    ) -> Result<CheckpointPodResponse, ttrpc::Error>;
    /// The shim's FinishCheckpoint: stop the held pod, or let it run on.
    async fn finish(&mut self, pod_id: &str, stop: bool) -> Result<(), ttrpc::Error>;
}

/// The node through containerd's CRI and the pod's shim.
pub(super) struct CriNode<'a> {
    t: &'a Target,
    rt: cri::Runtime,
    client: Option<CheckpointClient>,
}

impl<'a> CriNode<'a> {
    pub(super) async fn connect(t: &'a Target) -> Result<CriNode<'a>> {
        Ok(CriNode {
            t,
            rt: cri::connect(Path::new(&t.address)).await?,
            client: None,
        })
    }

    fn client(&self) -> Result<&CheckpointClient, ttrpc::Error> {
        self.client
            .as_ref()
            .ok_or_else(|| ttrpc::Error::Others("the shim was not reached".into()))
    }
}

impl Node for CriNode<'_> {
    async fn find_pod(&mut self, pod: &str) -> Result<api::PodSandbox> {
        cri::find_pod(&mut self.rt, pod).await
    }

    async fn containers(&mut self, pod_id: &str) -> Result<Vec<api::Container>> {
        cri::pod_containers(&mut self.rt, pod_id).await
    }

    async fn container_info(&mut self, c: &api::Container) -> Result<ContainerInfo> {
        select::container_info(&mut self.rt, c).await
    }

    async fn estimate(&mut self, containers: &[ContainerInfo]) -> space::SpaceEstimate {
        space::estimate(&mut self.rt, containers).await
    }

    async fn connect_shim(&mut self, pod: &api::PodSandbox) -> Result<()> {
        let t = self.t;
        let client =
            shim::checkpoint_client(&t.address, &t.namespace, &pod.id, &pod.runtime_handler)
                .await?;
        self.client = Some(client);
        Ok(())
    }

    async fn checkpoint(
        &mut self,
        req: &CheckpointPodRequest,
        secs: u64,
    ) -> Result<CheckpointPodResponse, ttrpc::Error> {
        self.client()?.checkpoint_pod(ttrpc_ctx(secs), req).await
    }

    async fn finish(&mut self, pod_id: &str, stop: bool) -> Result<(), ttrpc::Error> {
        let req = FinishCheckpointRequest {
            sandbox_id: pod_id.to_string(),
            stop,
            ..Default::default()
        };
        self.client()?
            .finish_checkpoint(ttrpc_ctx(120), &req)
            .await
            .map(|_| ())
    }
}
