//! containerd's Sandbox service (`containerd.runtime.sandbox.v1.Sandbox`).

use std::sync::Arc;

use async_trait::async_trait;
use containerd_shim_protos::{
    protobuf::MessageField,
    sandbox_api as sb,
    sandbox_async::Sandbox,
    ttrpc::{self, r#async::TtrpcContext},
    types::platform::Platform,
};

use super::{rpc, traced};
use crate::{
    sandbox,
    state::{timestamp, Shim},
};

pub struct SandboxService(pub Arc<Shim>);

#[async_trait]
impl Sandbox for SandboxService {
    async fn create_sandbox(
        &self,
        _ctx: &TtrpcContext,
        req: sb::CreateSandboxRequest,
    ) -> ttrpc::Result<sb::CreateSandboxResponse> {
        traced("create-sandbox", "", async {
            sandbox::create(&self.0, req)
                .await
                .map(|_| Default::default())
        })
        .await
    }

    async fn start_sandbox(
        &self,
        _ctx: &TtrpcContext,
        req: sb::StartSandboxRequest,
    ) -> ttrpc::Result<sb::StartSandboxResponse> {
        traced(
            "start-sandbox",
            "",
            sandbox::start(&self.0, &req.sandbox_id),
        )
        .await
    }

    async fn platform(
        &self,
        _ctx: &TtrpcContext,
        req: sb::PlatformRequest,
    ) -> ttrpc::Result<sb::PlatformResponse> {
        rpc(self.0.require_pod(&req.sandbox_id))?;
        Ok(sb::PlatformResponse {
            platform: MessageField::some(Platform {
                os: "linux".into(),
                architecture: std::env::consts::ARCH
                    .replace("x86_64", "amd64")
                    .replace("aarch64", "arm64"),
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    async fn stop_sandbox(
        &self,
        _ctx: &TtrpcContext,
        req: sb::StopSandboxRequest,
    ) -> ttrpc::Result<sb::StopSandboxResponse> {
        traced("stop-sandbox", "", async {
            sandbox::stop(&self.0, &req.sandbox_id, req.timeout_secs)
                .await
                .map(|_| Default::default())
        })
        .await
    }

    async fn wait_sandbox(
        &self,
        _ctx: &TtrpcContext,
        req: sb::WaitSandboxRequest,
    ) -> ttrpc::Result<sb::WaitSandboxResponse> {
        let pod = rpc(self.0.require_pod(&req.sandbox_id))?;
        let mut rx = pod.wait_exit();
        let exit = rx
            .wait_for(|e| e.is_some())
            .await
            .map(|e| e.expect("waited for Some"))
            .map_err(|_| ttrpc::Error::Others(format!("{}: sandbox gone", req.sandbox_id)))?;
        Ok(sb::WaitSandboxResponse {
            exit_status: exit.status as u32,
            exited_at: MessageField::some(timestamp(exit.at)),
            ..Default::default()
        })
    }

    async fn sandbox_status(
        &self,
        _ctx: &TtrpcContext,
        req: sb::SandboxStatusRequest,
    ) -> ttrpc::Result<sb::SandboxStatusResponse> {
        rpc(sandbox::status(&self.0, &req.sandbox_id, req.verbose).await)
    }

    async fn ping_sandbox(
        &self,
        _ctx: &TtrpcContext,
        req: sb::PingRequest,
    ) -> ttrpc::Result<sb::PingResponse> {
        rpc(self.0.require_pod(&req.sandbox_id))?;
        Ok(Default::default())
    }

    async fn shutdown_sandbox(
        &self,
        _ctx: &TtrpcContext,
        req: sb::ShutdownSandboxRequest,
    ) -> ttrpc::Result<sb::ShutdownSandboxResponse> {
        traced("shutdown-sandbox", "", async {
            sandbox::shutdown(&self.0, &req.sandbox_id)
                .await
                .map(|_| Default::default())
        })
        .await
    }

    async fn sandbox_metrics(
        &self,
        _ctx: &TtrpcContext,
        req: sb::SandboxMetricsRequest,
    ) -> ttrpc::Result<sb::SandboxMetricsResponse> {
        rpc(sandbox::metrics(&self.0, &req.sandbox_id))
    }
}
