//! Talking to a shim directly, bypassing containerd.

use anyhow::{Context, Result};

use crate::Containerd;

/// A direct ttrpc client to the shim serving container `id`, bypassing containerd: for the
/// cases containerd itself would refuse before the shim sees them.
pub fn shim_task_client(c: &Containerd, id: &str) -> Result<containerd_shim_protos::TaskClient> {
    Ok(containerd_shim_protos::TaskClient::new(shim_connection(
        c, id,
    )?))
}

/// A raw ttrpc connection to the shim serving container `id` (in the test namespace).
pub fn shim_connection(c: &Containerd, id: &str) -> Result<containerd_shim_protos::ttrpc::Client> {
    let bundle = c
        .dir
        .join("state/io.containerd.runtime.v2.task")
        .join(&c.namespace)
        .join(id);
    let address = std::fs::read_to_string(bundle.join("address"))
        .with_context(|| format!("read shim address of {id}"))?;
    containerd_shim_protos::ttrpc::Client::connect(address.trim())
        .with_context(|| format!("connect to shim at {address}"))
}
