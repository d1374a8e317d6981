//! containerd's Task service (registered as both `containerd.task.v3` and `v2`).

use std::sync::Arc;

use async_trait::async_trait;
use containerd_shim_protos::{
    api,
    protobuf::well_known_types::empty::Empty,
    shim_async::Task,
    ttrpc::{self, r#async::TtrpcContext},
};
use log::info;

use tracing::Instrument;

use super::traced;
use crate::{state::Shim, task};

#[derive(Clone)]
pub struct TaskService(pub Arc<Shim>);

#[async_trait]
impl Task for TaskService {
    async fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> ttrpc::Result<api::StateResponse> {
        traced("state", &req.id.clone(), task::state(&self.0, req)).await
    }

    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> ttrpc::Result<api::CreateTaskResponse> {
        traced("create", &req.id.clone(), task::create(&self.0, req)).await
    }

    async fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> ttrpc::Result<api::StartResponse> {
        traced("start", &req.id.clone(), task::start(&self.0, req)).await
    }

    async fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> ttrpc::Result<api::DeleteResponse> {
        traced("delete", &req.id.clone(), task::delete(&self.0, req)).await
    }

    async fn pids(
        &self,
        _ctx: &TtrpcContext,
        req: api::PidsRequest,
    ) -> ttrpc::Result<api::PidsResponse> {
        traced("pids", &req.id.clone(), task::pids(&self.0, &req.id)).await
    }

    async fn pause(&self, _ctx: &TtrpcContext, req: api::PauseRequest) -> ttrpc::Result<Empty> {
        traced("pause", &req.id.clone(), async {
            task::pause(&self.0, &req.id).await.map(|_| Empty::new())
        })
        .await
    }

    async fn resume(&self, _ctx: &TtrpcContext, req: api::ResumeRequest) -> ttrpc::Result<Empty> {
        traced("resume", &req.id.clone(), async {
            task::resume(&self.0, &req.id).await.map(|_| Empty::new())
        })
        .await
    }

    async fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        req: api::CheckpointTaskRequest,
    ) -> ttrpc::Result<Empty> {
        // Its own task: a caller that gives up does not stop the checkpoint half-way.
        let (shim, id) = (self.0.clone(), req.id.clone());
        let span = tracing::info_span!("rpc", op = "checkpoint", container = %id);
        let work = shim
            .clone()
            .work
            .spawn(async move { task::checkpoint(&shim, req).await }.instrument(span));
        traced("checkpoint", &id, async {
            super::checkpoint::detached(work)
                .await
                .map(|_| Empty::new())
        })
        .await
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> ttrpc::Result<Empty> {
        traced("kill", &req.id.clone(), async {
            task::kill(&self.0, req).await.map(|_| Empty::new())
        })
        .await
    }

    async fn exec(
        &self,
        _ctx: &TtrpcContext,
        req: api::ExecProcessRequest,
    ) -> ttrpc::Result<Empty> {
        traced("exec", &req.id.clone(), async {
            task::exec(&self.0, req).await.map(|_| Empty::new())
        })
        .await
    }

    async fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> ttrpc::Result<Empty> {
        traced("resize_pty", &req.id.clone(), async {
            task::resize_pty(&self.0, req).await.map(|_| Empty::new())
        })
        .await
    }

    async fn close_io(
        &self,
        _ctx: &TtrpcContext,
        req: api::CloseIORequest,
    ) -> ttrpc::Result<Empty> {
        traced("close_io", &req.id.clone(), async {
            task::close_io(&self.0, req).await.map(|_| Empty::new())
        })
        .await
    }

    async fn update(
        &self,
        _ctx: &TtrpcContext,
        req: api::UpdateTaskRequest,
    ) -> ttrpc::Result<Empty> {
        traced("update", &req.id.clone(), async {
            task::update(&self.0, req).await.map(|_| Empty::new())
        })
        .await
    }

    async fn wait(
        &self,
        _ctx: &TtrpcContext,
        req: api::WaitRequest,
    ) -> ttrpc::Result<api::WaitResponse> {
        traced("wait", &req.id.clone(), task::wait(&self.0, req)).await
    }

    async fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> ttrpc::Result<api::StatsResponse> {
        traced("stats", &req.id.clone(), task::stats(&self.0, &req.id)).await
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> ttrpc::Result<api::ConnectResponse> {
        let task_pid = traced(
            "connect_pid",
            &req.id.clone(),
            task::connect_pid(&self.0, &req.id),
        )
        .await?;
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: containerd_shim_protos::TASK_API_VERSION.to_string(),
            ..Default::default()
        })
    }

    async fn shutdown(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ShutdownRequest,
    ) -> ttrpc::Result<Empty> {
        // One shim serves a whole group: it ends only once its last container is gone.
        if self.0.is_empty() && self.0.pod().is_none() {
            info!("last container gone, shim shutting down");
            self.0.shutdown.cancel();
        }
        Ok(Empty::new())
    }
}
