//! The ttrpc face of the shim: thin adapters from containerd's Task and Sandbox services and
//! our Checkpoint service to the operations, all served on one socket.

mod checkpoint;
mod sandbox;
mod task;

use std::{collections::HashMap, sync::Arc};

use containerd_shim_protos::{
    sandbox_async::create_sandbox,
    shim_async::create_task,
    ttrpc::{
        self,
        r#async::{transport::Listener, Server, Service},
    },
};
use log::warn;

use crate::{error::Result, state::Shim};

/// An operation's result as ttrpc wants it; failures are logged once, here.
fn rpc<T>(r: Result<T>) -> ttrpc::Result<T> {
    r.map_err(|e| {
        warn!("{e}");
        e.into()
    })
}

/// Runs one operation inside its span: every line it logs (its failure included) carries
/// `op` and `container` beside the shim's pod.
async fn traced<T>(
    op: &'static str,
    container: &str,
    work: impl std::future::Future<Output = Result<T>>,
) -> ttrpc::Result<T> {
    use tracing::Instrument;
    let span = tracing::info_span!("rpc", op, container);
    async move { rpc(work.await) }.instrument(span).await
}

/// containerd 2.x speaks Task v3; older clients and tools still ask for v2. Same handler.
fn task_services(shim: &Arc<Shim>) -> Vec<HashMap<String, Service>> {
    let v3 = create_task(Arc::new(task::TaskService(shim.clone())));
    let v2 = create_task(Arc::new(task::TaskService(shim.clone())))
        .into_iter()
        .map(|(name, svc)| {
            (
                name.replace("containerd.task.v3.", "containerd.task.v2."),
                svc,
            )
        })
        .collect();
    vec![v3, v2]
}

pub fn build(
    listener: std::os::unix::net::UnixListener,
    shim: Arc<Shim>,
) -> std::io::Result<Server> {
    let listener = Listener::try_from(listener)?;
    let mut server = Server::new()
        .add_listener(listener)
        .register_service(create_sandbox(Arc::new(sandbox::SandboxService(
            shim.clone(),
        ))))
        .register_service(stasis_api::checkpoint_ttrpc::create_checkpoint(Arc::new(
            checkpoint::CheckpointService::new(shim.clone()),
        )));
    for svc in task_services(&shim) {
        server = server.register_service(svc);
    }
    Ok(server)
}
