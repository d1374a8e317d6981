//! The new pod, made through CRI: the sandbox, the shim's check that it can restore this
//! checkpoint, each container (restored and held stopped by the shim), then all released at
//! one instant. A failure or an interrupt removes the new pod.

use anyhow::{anyhow, bail, Context, Result};
use stasis_api::checkpoint::{FinishRestoreRequest, ValidateRestoreRequest};

use super::admit::Admitted;
use crate::{
    cri::{self, api},
    ops::{guard::RestoreGuard, ttrpc_ctx, Interrupt, Target},
    policy, shim,
};

/// A pod made from a checkpoint: its id, its runtime handler, and each container's name and
/// id.
pub(super) struct Created {
    pub pod_id: String,
    pub handler: String,
    pub containers: Vec<(String, String)>,
}

/// Creates the admitted pod and its containers; returns once the pod runs.
pub(super) async fn create(
    t: &Target,
    admitted: Admitted,
    interrupt: &mut Interrupt,
    guard: &mut RestoreGuard,
) -> Result<Created> {
    let mut rt = cri::Runtime::new(admitted.channel.clone());
    let pod = &admitted.pod;
    let pod_name = pod
        .metadata
        .as_ref()
        .map(|m| m.name.clone())
        .unwrap_or_default();
    let handler = &admitted.handler;
    let pod_id = rt
        .run_pod_sandbox(api::RunPodSandboxRequest {
            config: Some(pod.clone()),
            runtime_handler: handler.clone(),
        })
        .await
        .with_context(|| format!("create pod {pod_name} (handler {handler})"))?
        .into_inner()
        .pod_sandbox_id;
    guard.pod(&pod_id);
    let mut containers = Vec::new();
    let outcome = tokio::select! {
        r = fill_pod(t, &mut rt, &admitted, &pod_id, &mut containers) => r,
        signal = interrupt.received() => Err(anyhow!("interrupted by {signal}")),
    };
    if let Err(e) = outcome {
        let _ = cri::remove_pod(&mut rt, &pod_id).await;
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
    t: &Target,
    rt: &mut cri::Runtime,
    admitted: &Admitted,
    pod_id: &str,
    created: &mut Vec<(String, String)>,
) -> Result<()> {
    let handler = &admitted.handler;
    let client = shim::checkpoint_client(&t.address, &t.namespace, pod_id, handler).await?;
    let v = client
        .validate_restore(
            ttrpc_ctx(60),
            &ValidateRestoreRequest {
                checkpoint_path: admitted.dir.display().to_string(),
                ..Default::default()
            },
        )
        .await
        .map_err(|e| shim::explain(e, pod_id, handler))
        .with_context(|| format!("archive written by the {} backend", admitted.engine))?;
    if v.engine != admitted.engine {
        bail!(
            "archive was written by the {} backend; runtime handler {:?} uses {}",
            admitted.engine,
            handler,
            v.engine
        );
    }
    for (name, config) in &admitted.configs {
        policy::check_host_paths_resolve(name, &admitted.pod.log_directory, config)?;
        let id = rt
            .create_container(api::CreateContainerRequest {
                pod_sandbox_id: pod_id.to_string(),
                config: Some(config.clone()),
                sandbox_config: Some(admitted.pod.clone()),
            })
            .await
            .with_context(|| format!("create container {name}"))?
            .into_inner()
            .container_id;
        rt.start_container(api::StartContainerRequest {
            container_id: id.clone(),
        })
        .await
        .with_context(|| format!("restore container {name} ({id})"))?;
        eprintln!(
            "restored container {name} ({}), stopped until the pod is complete",
            &id[..12]
        );
        created.push((name.clone(), id));
    }
    // Every container is back: let them all run at one instant.
    client
        .finish_restore(
            ttrpc_ctx(60),
            &FinishRestoreRequest {
                sandbox_id: pod_id.to_string(),
                ..Default::default()
            },
        )
        .await
        .map_err(|e| shim::explain(e, pod_id, handler))
        .context("resume the restored containers")?;
    Ok(())
}
