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

use super::rpc;
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
        rpc(task::state(&self.0, req).await)
    }

    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> ttrpc::Result<api::CreateTaskResponse> {
        rpc(task::create(&self.0, req).await)
    }

    async fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> ttrpc::Result<api::StartResponse> {
        rpc(task::start(&self.0, req).await)
    }

    async fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> ttrpc::Result<api::DeleteResponse> {
        rpc(task::delete(&self.0, req).await)
    }

    async fn pids(
        &self,
        _ctx: &TtrpcContext,
        req: api::PidsRequest,
    ) -> ttrpc::Result<api::PidsResponse> {
        rpc(task::pids(&self.0, &req.id).await)
    }

    async fn pause(&self, _ctx: &TtrpcContext, req: api::PauseRequest) -> ttrpc::Result<Empty> {
        rpc(task::pause(&self.0, &req.id).await.map(|_| Empty::new()))
    }

    async fn resume(&self, _ctx: &TtrpcContext, req: api::ResumeRequest) -> ttrpc::Result<Empty> {
        rpc(task::resume(&self.0, &req.id).await.map(|_| Empty::new()))
    }

    async fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        req: api::CheckpointTaskRequest,
    ) -> ttrpc::Result<Empty> {
        // Its own task: a caller that gives up does not stop the checkpoint half-way.
        let shim = self.0.clone();
        let work = shim
            .clone()
            .work
            .spawn(async move { task::checkpoint(&shim, req).await });
        rpc(super::checkpoint::detached(work)
            .await
            .map(|_| Empty::new()))
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> ttrpc::Result<Empty> {
        rpc(task::kill(&self.0, req).await.map(|_| Empty::new()))
    }

    async fn exec(
        &self,
        _ctx: &TtrpcContext,
        req: api::ExecProcessRequest,
    ) -> ttrpc::Result<Empty> {
        rpc(task::exec(&self.0, req).await.map(|_| Empty::new()))
    }

    async fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> ttrpc::Result<Empty> {
        rpc(task::resize_pty(&self.0, req).await.map(|_| Empty::new()))
    }

    async fn close_io(
        &self,
        _ctx: &TtrpcContext,
        req: api::CloseIORequest,
    ) -> ttrpc::Result<Empty> {
        rpc(task::close_io(&self.0, req).await.map(|_| Empty::new()))
    }

    async fn update(
        &self,
        _ctx: &TtrpcContext,
        req: api::UpdateTaskRequest,
    ) -> ttrpc::Result<Empty> {
        rpc(task::update(&self.0, req).await.map(|_| Empty::new()))
    }

    async fn wait(
        &self,
        _ctx: &TtrpcContext,
        req: api::WaitRequest,
    ) -> ttrpc::Result<api::WaitResponse> {
        rpc(task::wait(&self.0, req).await)
    }

    async fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> ttrpc::Result<api::StatsResponse> {
        rpc(task::stats(&self.0, &req.id).await)
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> ttrpc::Result<api::ConnectResponse> {
        let task_pid = rpc(task::connect_pid(&self.0, &req.id).await)?;
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
