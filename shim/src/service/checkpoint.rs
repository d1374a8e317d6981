//! Our pod Checkpoint service (`api/proto/stasis/checkpoint/v1`).

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use async_trait::async_trait;
use containerd_shim_protos::ttrpc::{self, r#async::TtrpcContext};
use stasis_api::{
    checkpoint::{
        CheckpointPodRequest, CheckpointPodResponse, ContainerRestore, FinishCheckpointRequest,
        FinishCheckpointResponse, FinishRestoreRequest, FinishRestoreResponse,
        RestoreStatusRequest, RestoreStatusResponse, ValidateRestoreRequest,
        ValidateRestoreResponse,
    },
    checkpoint_ttrpc::Checkpoint,
};

use tracing::Instrument;

use super::{rpc, traced};
use crate::{
    checkpoint::{self, source, CheckpointGate},
    error::Result,
    runtime::OciRuntime,
    state::Shim,
    task, util,
};

pub struct CheckpointService {
    shim: Arc<Shim>,
    gate: Arc<CheckpointGate>,
}

impl CheckpointService {
    pub fn new(shim: Arc<Shim>) -> Self {
        CheckpointService {
            shim,
            gate: Arc::default(),
        }
    }
}

async fn validate(shim: &Shim, req: &ValidateRestoreRequest) -> Result<ValidateRestoreResponse> {
    let path = PathBuf::from(&req.checkpoint_path);
    let runtime = shim.runtime.clone();
    // Reads every container's rootfs diff: off the async threads.
    util::blocking("restore", "validate checkpoint", move || {
        validate_dir(&path, runtime.as_ref())
    })
    .await
}

fn validate_dir(path: &Path, runtime: &dyn OciRuntime) -> Result<ValidateRestoreResponse> {
    let (_, dirs) = source::check_pod_dir("restore", path, runtime.name())?;
    for d in dirs {
        source::check_container_dir("restore", &d, runtime)?;
    }
    Ok(ValidateRestoreResponse {
        engine: runtime.name().to_string(),
        ..Default::default()
    })
}

/// The result of work spawned so that it outlives its request.
pub(super) async fn detached<T>(work: tokio::task::JoinHandle<Result<T>>) -> Result<T> {
    work.await.map_err(|e| {
        crate::error::Error::other("checkpoint", "run", format!("worker failed: {e}"))
    })?
}

#[async_trait]
impl Checkpoint for CheckpointService {
    async fn checkpoint_pod(
        &self,
        _ctx: &TtrpcContext,
        req: CheckpointPodRequest,
    ) -> ttrpc::Result<CheckpointPodResponse> {
        // Its own task: a caller that gives up (deadline, cancelled request) does not stop
        // the checkpoint half-way; it runs to its end, thaw and clean-up included.
        let (shim, gate) = (self.shim.clone(), self.gate.clone());
        let (reply, answer) = tokio::sync::oneshot::channel();
        let span = tracing::info_span!("rpc", op = "pod-checkpoint");
        shim.clone()
            .work
            .spawn(checkpoint::run(shim, gate, req, reply).instrument(span));
        rpc(answer.await.unwrap_or_else(|_| {
            Err(crate::error::Error::other(
                "checkpoint",
                "run",
                "the checkpoint worker ended without an answer",
            ))
        }))
    }

    async fn finish_checkpoint(
        &self,
        _ctx: &TtrpcContext,
        req: FinishCheckpointRequest,
    ) -> ttrpc::Result<FinishCheckpointResponse> {
        rpc(self.shim.require_pod(&req.sandbox_id))?;
        let finish = checkpoint::finish(&self.gate, &req.sandbox_id, req.stop);
        let ids = traced("finish-checkpoint", "", finish).await?;
        Ok(FinishCheckpointResponse {
            container_ids: ids,
            ..Default::default()
        })
    }

    async fn finish_restore(
        &self,
        _ctx: &TtrpcContext,
        req: FinishRestoreRequest,
    ) -> ttrpc::Result<FinishRestoreResponse> {
        rpc(self.shim.require_pod(&req.sandbox_id))?;
        let ids = traced("finish-restore", "", task::finish_restore(&self.shim)).await?;
        Ok(FinishRestoreResponse {
            container_ids: ids,
            ..Default::default()
        })
    }

    async fn validate_restore(
        &self,
        _ctx: &TtrpcContext,
        req: ValidateRestoreRequest,
    ) -> ttrpc::Result<ValidateRestoreResponse> {
        rpc(validate(&self.shim, &req).await)
    }

    async fn restore_status(
        &self,
        ctx: &TtrpcContext,
        req: RestoreStatusRequest,
    ) -> ttrpc::Result<RestoreStatusResponse> {
        rpc(self.shim.require_pod(&req.sandbox_id))?;
        let outcomes = if req.wait {
            // Never longer than the caller waits (its deadline), nor than an hour.
            let limit = match ctx.timeout_nano {
                n if n > 0 => std::time::Duration::from_nanos(n as u64),
                _ => std::time::Duration::from_secs(3600),
            };
            self.shim
                .restores
                .settled(limit.min(std::time::Duration::from_secs(3600)))
                .await
        } else {
            self.shim.restores.snapshot()
        };
        Ok(RestoreStatusResponse {
            containers: outcomes
                .into_iter()
                .map(|(id, o)| {
                    let (bytes_in, bytes_total, page_requests) = self.shim.restores.pages_sent(&id);
                    ContainerRestore {
                        container_id: id,
                        state: o.state.into(),
                        reason: o.reason,
                        pages_in_ms: o.pages_in.map_or(0, |d| d.as_millis() as u64),
                        bytes_in,
                        bytes_total,
                        page_requests,
                        ..Default::default()
                    }
                })
                .collect(),
            ..Default::default()
        })
    }
}
