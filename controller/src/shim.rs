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
    tracing::debug!(pod_id = sandbox_id, handler, socket = %path, "connected to the pod's shim");
    Ok(CheckpointClient::new(client))
}

/// The words `explain` uses when a pod's runtime has no Checkpoint service.
pub const NO_CHECKPOINT_SERVICE: &str = "does not serve the stasis Checkpoint service";

/// What a ttrpc error from a pod's shim means to stasisctl, by its code.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    /// The runtime serves no Checkpoint service (or not this method of it).
    NoCheckpointService,
    /// Any other status the service answered with.
    Status(ttrpc::Code),
    /// No answer: the connection failed or closed.
    Transport,
}

/// Classifies a shim's error. A peer without our service answers by its ttrpc library:
/// UNIMPLEMENTED (Go's ttrpc, and Rust's for an unknown method), INVALID_ARGUMENT "… service
/// does not exist" (Rust's for an unknown service), NOT_FOUND "… is not supported" (the
/// default body Rust's generated code gives a method the service does not implement). The
/// stasis shim implements every method and answers NOT_FOUND only for unknown ids.
pub fn classify(e: &ttrpc::Error) -> Answer {
    let ttrpc::Error::RpcStatus(s) = e else {
        return Answer::Transport;
    };
    let code = s.code();
    let no_service = code == ttrpc::Code::UNIMPLEMENTED
        || code == ttrpc::Code::INVALID_ARGUMENT && s.message.ends_with(" service does not exist")
        || code == ttrpc::Code::NOT_FOUND && s.message.ends_with(" is not supported");
    if no_service {
        Answer::NoCheckpointService
    } else {
        Answer::Status(code)
    }
}

/// Turns a shim's error into a message saying what is wrong, naming the pod.
pub fn explain(e: ttrpc::Error, sandbox_id: &str, handler: &str) -> anyhow::Error {
    match (classify(&e), &e) {
        (Answer::NoCheckpointService, ttrpc::Error::RpcStatus(s)) => {
            anyhow!(
                "pod {sandbox_id}: its runtime (handler {handler:?}) {NO_CHECKPOINT_SERVICE} ({})",
                s.message
            )
        }
        (Answer::Status(code), ttrpc::Error::RpcStatus(s)) => anyhow!("{} ({code:?})", s.message),
        _ => anyhow!("pod {sandbox_id}: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: ttrpc::Code, message: &str) -> ttrpc::Error {
        ttrpc::Error::RpcStatus(ttrpc::get_status(code, message))
    }

    #[test]
    fn a_missing_service_is_told_from_the_codes_of_either_ttrpc() {
        for e in [
            status(
                ttrpc::Code::UNIMPLEMENTED,
                "service stasis.checkpoint.v1.Checkpoint",
            ),
            status(ttrpc::Code::UNIMPLEMENTED, "RestoreStatus method"),
            status(
                ttrpc::Code::INVALID_ARGUMENT,
                "stasis.checkpoint.v1.Checkpoint service does not exist",
            ),
            status(
                ttrpc::Code::NOT_FOUND,
                "/stasis.checkpoint.v1.Checkpoint/RestoreStatus is not supported",
            ),
        ] {
            assert_eq!(classify(&e), Answer::NoCheckpointService, "{e:?}");
        }
        let e = explain(status(ttrpc::Code::UNIMPLEMENTED, "x"), "p1", "runc");
        assert!(
            e.to_string()
                .contains("handler \"runc\") does not serve the stasis Checkpoint service"),
            "{e}"
        );
    }

    #[test]
    fn the_stasis_shims_own_answers_keep_their_code() {
        let e = status(ttrpc::Code::NOT_FOUND, "pod p1: container c1 not found");
        assert_eq!(classify(&e), Answer::Status(ttrpc::Code::NOT_FOUND));
        let e = status(
            ttrpc::Code::FAILED_PRECONDITION,
            "a checkpoint of this service's pod runs",
        );
        assert_eq!(
            classify(&e),
            Answer::Status(ttrpc::Code::FAILED_PRECONDITION)
        );
        assert_eq!(
            explain(e, "p1", "stasis").to_string(),
            "a checkpoint of this service's pod runs (FAILED_PRECONDITION)"
        );
        assert_eq!(classify(&ttrpc::Error::LocalClosed), Answer::Transport);
    }
}
