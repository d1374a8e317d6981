//! How a lazy restore ended, container by container, as the pod's shim says through the
//! Checkpoint service's RestoreStatus.

use anyhow::Result;
use stasis_api::checkpoint::{RestoreState, RestoreStatusRequest};

use crate::{ops::Target, shim};

/// How long a lazy restore may take to bring every page in.
const ALL_PAGES_WITHIN_SECS: u64 = 3600;

/// Waits until the shim of pod `pod_id` says how the restore of each of `containers` (name,
/// id) ended; returns the ones that did not get all of their memory, with why. A shim that
/// cannot be asked, or does not know a container, counts as a failure: no word is no proof.
pub(super) async fn lost_containers(
    t: &Target,
    (pod_id, handler): (&str, &str),
    containers: &[(String, String)],
) -> Vec<String> {
    let asked = ask(t, pod_id, handler).await;
    containers
        .iter()
        .filter_map(|(name, id)| {
            let why = match &asked {
                Err(e) => format!("no word from its shim: {e:#}"),
                Ok(states) => match states.iter().find(|(c, _, _)| c == id) {
                    Some((_, RestoreState::RESTORE_FAILED, reason)) => format!("failed: {reason}"),
                    Some((_, RestoreState::RESTORE_PENDING, _)) => {
                        "failed: its pages were still coming in when the wait ended".into()
                    }
                    Some(_) => return None,
                    None => "failed: its shim does not know it".into(),
                },
            };
            Some(format!("{name} ({why})"))
        })
        .collect()
}

/// The shim's answer: (container id, state, reason) for each restored container.
async fn ask(
    t: &Target,
    pod_id: &str,
    handler: &str,
) -> Result<Vec<(String, RestoreState, String)>> {
    let client = shim::checkpoint_client(&t.address, &t.namespace, pod_id, handler).await?;
    let req = RestoreStatusRequest {
        sandbox_id: pod_id.to_string(),
        wait: true,
        ..Default::default()
    };
    let ctx = ttrpc::context::with_timeout((ALL_PAGES_WITHIN_SECS * 1_000_000_000) as i64);
    let resp = client
        .restore_status(ctx, &req)
        .await
        .map_err(|e| shim::explain(e, pod_id, handler))?;
    Ok(resp
        .containers
        .into_iter()
        .map(|c| {
            let state = c.state.enum_value_or(RestoreState::RESTORE_FAILED);
            (c.container_id, state, c.reason)
        })
        .collect())
}
