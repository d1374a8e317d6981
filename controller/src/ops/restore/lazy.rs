//! How a lazy restore ended, container by container, as the pod's shim says through the
//! Checkpoint service's RestoreStatus; `stasisctl pod pages` asks the same.

use std::path::Path;

use anyhow::Result;
use stasis_api::checkpoint::{RestoreState, RestoreStatusRequest};

use crate::{cri, ops::Target, shim};

/// How long a lazy restore may take to bring every page in.
const ALL_PAGES_WITHIN_SECS: u64 = 3600;

/// One restored container's pages, as its shim says.
#[derive(Debug, Clone)]
pub struct ContainerPages {
    pub id: String,
    pub state: RestoreState,
    /// Why its restore failed.
    pub reason: String,
    /// A completed lazy restore: milliseconds from its start until its last page was in.
    pub pages_in_ms: u64,
}

/// Waits until the shim of pod `pod_id` says how the restore of each of `containers` (name,
/// id) ended; returns the ones that did not get all of their memory, with why. A shim that
/// cannot be asked, or does not know a container, counts as a failure: no word is no proof.
pub(crate) async fn lost_containers(
    t: &Target,
    (pod_id, handler): (&str, &str),
    containers: &[(String, String)],
) -> Vec<String> {
    let asked = ask(t, pod_id, handler, true).await;
    containers
        .iter()
        .filter_map(|(name, id)| {
            let why = match &asked {
                Err(e) => format!("no word from its shim: {e:#}"),
                Ok(states) => match states.iter().find(|c| &c.id == id) {
                    Some(c) if c.state == RestoreState::RESTORE_FAILED => {
                        format!("failed: {}", c.reason)
                    }
                    Some(c) if c.state == RestoreState::RESTORE_PENDING => {
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

/// `stasisctl pod pages`: the restored containers of pod `pod` (a name or an id) and where
/// their pages stand; with `wait`, once none is still coming in. Names come from CRI.
pub async fn pod_pages(t: &Target, pod: &str, wait: bool) -> Result<Vec<(String, ContainerPages)>> {
    let mut rt = cri::connect(Path::new(&t.address)).await?;
    let p = cri::find_pod(&mut rt, pod).await?;
    let names: Vec<(String, String)> = cri::pod_containers(&mut rt, &p.id)
        .await?
        .into_iter()
        .map(|c| {
            let name = c.metadata.map(|m| m.name).unwrap_or_default();
            (c.id, name)
        })
        .collect();
    let mut rows: Vec<_> = ask(t, &p.id, &p.runtime_handler, wait)
        .await?
        .into_iter()
        .map(|c| {
            let name = names
                .iter()
                .find(|(id, _)| *id == c.id)
                .map_or_else(|| "?".to_string(), |(_, n)| n.clone());
            (name, c)
        })
        .collect();
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(rows)
}

/// The shim's answer for each restored container.
async fn ask(t: &Target, pod_id: &str, handler: &str, wait: bool) -> Result<Vec<ContainerPages>> {
    let client = shim::checkpoint_client(&t.address, &t.namespace, pod_id, handler).await?;
    let req = RestoreStatusRequest {
        sandbox_id: pod_id.to_string(),
        wait,
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
        .map(|c| ContainerPages {
            state: c.state.enum_value_or(RestoreState::RESTORE_FAILED),
            id: c.container_id,
            reason: c.reason,
            pages_in_ms: c.pages_in_ms,
        })
        .collect())
}
