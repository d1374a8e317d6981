//! The new pod, made through CRI: the sandbox, the shim's check that it can restore this
//! checkpoint, each container (restored and held stopped by the shim), then all released at
//! one instant. A failure or an interrupt removes the new pod.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use stasis_api::{
    checkpoint::{FinishRestoreRequest, ValidateRestoreRequest},
    checkpoint_ttrpc::CheckpointClient,
};

use super::admit::Admitted;
use crate::{
    cri::{self, api},
    ops::{ttrpc_ctx, Interrupt, Target},
    policy, progress, shim,
};

/// A pod made from a checkpoint: its id, its runtime handler, and each container's name and
/// id.
pub(super) struct Created {
    pub pod_id: String,
    pub handler: String,
    pub containers: Vec<(String, String)>,
}

/// What a restore asks of the node: CRI for the pod and its containers, the pod's shim for
/// its check and the release. [`CriNode`] talks to containerd; the tests use a fake.
pub(super) trait Node {
    /// Creates and starts the pod sandbox; its id.
    async fn run_pod(&mut self, pod: &api::PodSandboxConfig, handler: &str) -> Result<String>;
    /// The engine of the pod's runtime, once it has checked the checkpoint in `dir`.
    async fn validate(&mut self, pod_id: &str, dir: &Path) -> Result<String>;
    /// Creates a container; its id.
    async fn create_container(
        &mut self,
        pod_id: &str,
        config: &api::ContainerConfig,
        pod: &api::PodSandboxConfig,
    ) -> Result<String>;
    /// Starts (restores) a container.
    async fn start_container(&mut self, id: &str) -> Result<()>;
    /// Lets every restored container of the pod run.
    async fn finish_restore(&mut self, pod_id: &str) -> Result<()>;
    /// Removes the pod and whatever of it exists.
    async fn remove_pod(&mut self, pod_id: &str) -> Result<()>;
}

/// The node through containerd's CRI and the pod's shim.
pub(super) struct CriNode<'a> {
    t: &'a Target,
    rt: cri::Runtime,
    handler: String,
    client: Option<CheckpointClient>,
    /// An eager restore: the pod resumes once every page is in (progress reported meanwhile).
    pub(super) pages_before_resume: bool,
}

impl<'a> CriNode<'a> {
    pub(super) async fn connect(t: &'a Target, handler: &str) -> Result<CriNode<'a>> {
        Ok(CriNode {
            t,
            rt: cri::connect(Path::new(&t.address)).await?,
            handler: handler.to_string(),
            client: None,
            pages_before_resume: false,
        })
    }

    async fn client(&mut self, pod_id: &str) -> Result<&CheckpointClient> {
        if self.client.is_none() {
            let (t, h) = (self.t, &self.handler);
            let c = shim::checkpoint_client(&t.address, &t.namespace, pod_id, h).await?;
            self.client = Some(c);
        }
        Ok(self.client.as_ref().expect("connected above"))
    }
}

impl Node for CriNode<'_> {
    async fn run_pod(&mut self, pod: &api::PodSandboxConfig, handler: &str) -> Result<String> {
        let name = pod.metadata.as_ref().map(|m| m.name.as_str()).unwrap_or("");
        Ok(self
            .rt
            .run_pod_sandbox(api::RunPodSandboxRequest {
                config: Some(pod.clone()),
                runtime_handler: handler.to_string(),
            })
            .await
            .with_context(|| format!("create pod {name} (handler {handler})"))?
            .into_inner()
            .pod_sandbox_id)
    }

    async fn validate(&mut self, pod_id: &str, dir: &Path) -> Result<String> {
        let handler = self.handler.clone();
        let req = ValidateRestoreRequest {
            checkpoint_path: dir.display().to_string(),
            ..Default::default()
        };
        let v = self
            .client(pod_id)
            .await?
            .validate_restore(ttrpc_ctx(60), &req)
            .await
            .map_err(|e| shim::explain(e, pod_id, &handler))?;
        Ok(v.engine)
    }

    async fn create_container(
        &mut self,
        pod_id: &str,
        config: &api::ContainerConfig,
        pod: &api::PodSandboxConfig,
    ) -> Result<String> {
        Ok(self
            .rt
            .create_container(api::CreateContainerRequest {
                pod_sandbox_id: pod_id.to_string(),
                config: Some(config.clone()),
                sandbox_config: Some(pod.clone()),
            })
            .await?
            .into_inner()
            .container_id)
    }

    async fn start_container(&mut self, id: &str) -> Result<()> {
        self.rt
            .start_container(api::StartContainerRequest {
                container_id: id.to_string(),
            })
            .await?;
        Ok(())
    }

    async fn finish_restore(&mut self, pod_id: &str) -> Result<()> {
        let handler = self.handler.clone();
        let req = FinishRestoreRequest {
            sandbox_id: pod_id.to_string(),
            ..Default::default()
        };
        // An eager restore through the page server answers once every page is in (reported
        // as it comes); the shim bounds that wait by its restore hold (120 s unless
        // configured).
        let (t, eager) = (self.t, self.pages_before_resume);
        let client = self.client(pod_id).await?;
        let finish = client.finish_restore(ttrpc_ctx(3600), &req);
        let answer = match eager {
            true => super::lazy::with_pages_progress(t, (pod_id, &handler), finish, false).await,
            false => finish.await,
        };
        answer.map_err(|e| shim::explain(e, pod_id, &handler))?;
        Ok(())
    }

    async fn remove_pod(&mut self, pod_id: &str) -> Result<()> {
        cri::remove_pod(&mut self.rt, pod_id).await
    }
}

/// Creates the admitted pod and its containers; returns once the pod runs. `created_pod`
/// hears the pod's id as soon as it exists (the watchdog removes it should stasisctl die).
pub(super) async fn create(
    node: &mut impl Node,
    admitted: Admitted,
    interrupt: &mut Interrupt,
    mut created_pod: impl FnMut(&str),
) -> Result<Created> {
    let pod_name = admitted
        .pod
        .metadata
        .as_ref()
        .map(|m| m.name.clone())
        .unwrap_or_default();
    let pod_id = node.run_pod(&admitted.pod, &admitted.handler).await?;
    created_pod(&pod_id);
    let mut containers = Vec::new();
    let outcome = tokio::select! {
        r = fill_pod(node, &admitted, &pod_id, &mut containers) => r,
        signal = interrupt.received() => Err(anyhow!("interrupted by {signal}")),
    };
    if let Err(e) = outcome {
        let _ = node.remove_pod(&pod_id).await;
        return Err(e.context(format!(
            "restore of pod {pod_name} failed; the new pod was removed"
        )));
    }
    Ok(Created {
        pod_id,
        handler: admitted.handler,
        containers,
    })
}

/// Everything after the sandbox: the shim's check, the containers, their release.
async fn fill_pod(
    node: &mut impl Node,
    admitted: &Admitted,
    pod_id: &str,
    created: &mut Vec<(String, String)>,
) -> Result<()> {
    let engine = node
        .validate(pod_id, &admitted.dir)
        .await
        .with_context(|| format!("archive written by the {} backend", admitted.engine))?;
    if engine != admitted.engine {
        bail!(
            "archive was written by the {} backend; runtime handler {:?} uses {engine}",
            admitted.engine,
            admitted.handler,
        );
    }
    for (name, config) in &admitted.configs {
        policy::check_host_paths_resolve(name, &admitted.pod.log_directory, config)?;
        let id = node
            .create_container(pod_id, config, &admitted.pod)
            .await
            .with_context(|| format!("create container {name}"))?;
        node.start_container(&id)
            .await
            .with_context(|| format!("restore container {name} ({id})"))?;
        progress::step(
            "restoring",
            format!(
                "restored container {name} ({}), stopped until the pod is complete",
                &id[..id.len().min(12)]
            ),
        );
        created.push((name.clone(), id));
    }
    // Every container is back: let them all run at one instant.
    node.finish_restore(pod_id)
        .await
        .context("resume the restored containers")
}

#[cfg(test)]
#[path = "create_tests.rs"]
mod tests;
