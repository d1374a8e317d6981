//! One ttrpc server on the shim's socket, carrying every service the pod's shim offers.

use std::{collections::HashMap, sync::Arc};

use containerd_shim_protos::{
    sandbox_async::create_sandbox,
    shim_async::create_task,
    ttrpc::r#async::{transport::Listener, Server, Service},
};

use crate::{checkpoint::pod::PodCheckpointService, sandbox::SandboxService, task::TaskService};

/// containerd 2.x speaks Task v3; older clients and tools still ask for v2. Same handler.
fn task_services(task: TaskService) -> Vec<HashMap<String, Service>> {
    let v3 = create_task(Arc::new(task.clone()));
    let v2 = create_task(Arc::new(task))
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
    task: TaskService,
) -> std::io::Result<Server> {
    let listener = Listener::try_from(listener)?;
    let mut server = Server::new().add_listener(listener);
    let sandbox = SandboxService {
        tasks: task.tasks.clone(),
    };
    server = server.register_service(create_sandbox(Arc::new(sandbox)));
    let checkpoint = PodCheckpointService::new(task.tasks.clone());
    server = server.register_service(stasis_api::checkpoint_ttrpc::create_checkpoint(Arc::new(
        checkpoint,
    )));
    for svc in task_services(task) {
        server = server.register_service(svc);
    }
    Ok(server)
}
