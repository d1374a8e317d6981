//! Exec: registers an extra process in a running container; Start runs it.

use containerd_shim::asynchronous::io::Stdio;
use containerd_shim_protos::{api, events::task::TaskExecAdded, topics};

use super::exec_name;
use crate::{
    error::{Error, Result},
    state::{Process, Shim},
};

pub async fn exec(shim: &Shim, req: api::ExecProcessRequest) -> Result<()> {
    let container = shim.get(&req.id)?;
    let name = exec_name(&req.id, &req.exec_id);
    if req.exec_id.is_empty() {
        return Err(Error::invalid(&req.id, "exec id is empty"));
    }
    let spec = req
        .spec
        .as_ref()
        .ok_or_else(|| Error::invalid(&name, "exec without a process spec"))?;
    serde_json::from_slice::<serde_json::Value>(&spec.value)
        .map_err(|e| Error::invalid(&name, format!("process spec is not valid JSON: {e}")))?;
    {
        let mut live = container.live();
        if live.execs.contains_key(&req.exec_id) {
            return Err(Error::AlreadyExists {
                kind: "exec",
                id: name,
            });
        }
        if !live.state.can_exec() {
            return Err(Error::precondition(
                &name,
                format!("container is {}", live.state),
            ));
        }
        let spec_path = container
            .bundle
            .join(format!("{}.process.json", req.exec_id));
        std::fs::write(&spec_path, &spec.value)
            .map_err(|e| Error::io(&name, "write exec process spec", e))?;
        let mut p = Process::new(
            &req.exec_id,
            Stdio::new(&req.stdin, &req.stdout, &req.stderr, req.terminal),
        );
        p.spec_path = Some(spec_path);
        live.execs.insert(req.exec_id.clone(), p);
    }
    shim.events
        .publish(
            topics::TASK_EXEC_ADDED_EVENT_TOPIC,
            Box::new(TaskExecAdded {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                ..Default::default()
            }),
        )
        .await;
    Ok(())
}
