//! Our pod Checkpoint service (`api/proto/stasis/checkpoint/v1`).

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use async_trait::async_trait;
use containerd_shim_protos::ttrpc::{self, r#async::TtrpcContext};
use stasis_api::{
    checkpoint::{
        CheckpointPodRequest, CheckpointPodResponse, FinishRestoreRequest, FinishRestoreResponse,
        ValidateRestoreRequest, ValidateRestoreResponse,
    },
    checkpoint_ttrpc::Checkpoint,
};

use super::rpc;
use crate::{
    checkpoint::{self, source, CheckpointGate},
    error::Result,
    runtime::OciRuntime,
    state::Shim,
    task, util,
};

pub struct CheckpointService {
    shim: Arc<Shim>,
    gate: CheckpointGate,
}

impl CheckpointService {
    pub fn new(shim: Arc<Shim>) -> Self {
        CheckpointService {
            shim,
            gate: CheckpointGate::default(),
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

#[async_trait]
impl Checkpoint for CheckpointService {
    async fn checkpoint_pod(
        &self,
        _ctx: &TtrpcContext,
        req: CheckpointPodRequest,
    ) -> ttrpc::Result<CheckpointPodResponse> {
        rpc(checkpoint::checkpoint_pod(&self.shim, &self.gate, req).await)
    }

    async fn finish_restore(
        &self,
        _ctx: &TtrpcContext,
        req: FinishRestoreRequest,
    ) -> ttrpc::Result<FinishRestoreResponse> {
        rpc(self.shim.require_pod(&req.sandbox_id))?;
        let ids = rpc(task::finish_restore(&self.shim).await)?;
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
}
