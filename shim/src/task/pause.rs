//! Pause and Resume of a container, through the runtime (the cgroup freezer for runc).

use containerd_shim_protos::{
    events::task::{TaskPaused, TaskResumed},
    topics,
};

use crate::{
    error::Result,
    runtime::Operation,
    state::{Shim, Transition},
};

pub async fn pause(shim: &Shim, id: &str) -> Result<()> {
    shim.runtime
        .check_operation(id, Operation::Pause, shim.pod().is_some())?;
    let container = shim.get(id)?;
    let _op = container.op.lock().await;
    // Checked before the runtime acts, applied after it did.
    container.require(|s| s.apply(Transition::Pause).is_ok(), "pause")?;
    shim.runtime.pause(id).await?;
    container.transition(Transition::Pause)?;
    shim.events
        .publish(
            topics::TASK_PAUSED_EVENT_TOPIC,
            Box::new(TaskPaused {
                container_id: id.to_string(),
                ..Default::default()
            }),
        )
        .await;
    Ok(())
}

pub async fn resume(shim: &Shim, id: &str) -> Result<()> {
    let container = shim.get(id)?;
    let _op = container.op.lock().await;
    container.require(|s| s.apply(Transition::Resume).is_ok(), "resume")?;
    shim.runtime.resume(id).await?;
    container.transition(Transition::Resume)?;
    shim.events
        .publish(
            topics::TASK_RESUMED_EVENT_TOPIC,
            Box::new(TaskResumed {
                container_id: id.to_string(),
                ..Default::default()
            }),
        )
        .await;
    Ok(())
}
