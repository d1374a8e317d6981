//! The pod's shim and its Checkpoint service. containerd places a pod's shim socket at a path
//! derived from its own address, the namespace and the sandbox id; any runtime that serves our
//! Checkpoint service there can be driven by stasisctl.

use std::path::Path;

use anyhow::{anyhow, Result};
use sha2::{Digest, Sha256};
use stasis_api::checkpoint_ttrpc::CheckpointClient;

/// The shim socket containerd uses for `sandbox_id` (same rule as containerd's shim manager).
pub fn socket_path(containerd_address: &str, namespace: &str, sandbox_id: &str) -> String {
    let key = Path::new(containerd_address)
        .join(namespace)
        .join(sandbox_id);
    let digest = Sha256::digest(key.display().to_string());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("/run/containerd/s/{hex}")
}

pub async fn checkpoint_client(
    containerd_address: &str,
    namespace: &str,
    sandbox_id: &str,
    handler: &str,
) -> Result<CheckpointClient> {
    let path = socket_path(containerd_address, namespace, sandbox_id);
    if !Path::new(&path).exists() {
        return Err(anyhow!(
            "pod {sandbox_id} has no shim socket at {path}: its runtime (handler {handler:?}) does not serve the stasis Checkpoint service (use a handler with runtime_type io.containerd.stasis.v2 or io.containerd.stasis-<backend>.v2 and sandboxer = \"shim\")"
        ));
    }
    let client = ttrpc::r#async::Client::connect(&format!("unix://{path}"))
        .await
        .map_err(|e| anyhow!("connect to the shim of pod {sandbox_id} at {path}: {e}"))?;
    Ok(CheckpointClient::new(client))
}

/// The words `explain` uses when a pod's runtime has no Checkpoint service.
pub const NO_CHECKPOINT_SERVICE: &str = "does not serve the stasis Checkpoint service";

/// Turns "unknown service" answers into a message saying what is wrong.
pub fn explain(e: ttrpc::Error, sandbox_id: &str, handler: &str) -> anyhow::Error {
    match &e {
        ttrpc::Error::RpcStatus(s)
            if s.code() == ttrpc::Code::UNIMPLEMENTED
                || s.code() == ttrpc::Code::NOT_FOUND
                    && (s.message.contains("not supported")
                        || s.message.contains("service")
                        || s.message.contains("method")) =>
        {
            anyhow!("pod {sandbox_id}: its runtime (handler {handler:?}) does not serve the stasis Checkpoint service ({})", s.message)
        }
        ttrpc::Error::RpcStatus(s) => anyhow!("{} ({:?})", s.message, s.code()),
        _ => anyhow!("pod {sandbox_id}: {e}"),
    }
}
