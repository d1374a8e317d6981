//! How a lazy restore ended, container by container, as the pod's shim says through the
//! Checkpoint service's RestoreStatus; `stasisctl pod pages` asks the same.

use std::path::Path;

use anyhow::Result;
use stasis_api::checkpoint::{RestoreState, RestoreStatusRequest};

use crate::{cri, ops::Target, progress, shim};

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
    /// Pages the shim's page server sent so far, of its lazy pages' total, in requests (all
    /// 0 when CRIU reads the pages from unpacked images itself).
    pub bytes_in: u64,
    pub bytes_total: u64,
    pub page_requests: u64,
}

/// Runs `wait` (a wait for every page of the restore of pod `pod_id`: a lazy restore's end,
/// or the FinishRestore of an eager one whose pages come through the page server),
/// reporting the memory coming in meanwhile: bytes of the shims' page servers every half
/// second, or (`uncounted`, a lazy restore) one step when CRIU reads the pages from
/// unpacked images itself (it tells nobody how far it is).
pub(crate) async fn with_pages_progress<T>(
    t: &Target,
    (pod_id, handler): (&str, &str),
    wait: impl std::future::Future<Output = T>,
    uncounted: bool,
) -> T {
    let sum = |now: &[ContainerPages]| -> (u64, u64) {
        now.iter()
            .fold((0, 0), |(d, t), c| (d + c.bytes_in, t + c.bytes_total))
    };
    let (done, total) = sum(&ask(t, pod_id, handler, false).await.unwrap_or_default());
    if total == 0 {
        if uncounted {
            progress::step(
                "pages",
                "waiting for every page to be in (CRIU reads them from the unpacked images)",
            );
        }
        return wait.await;
    }
    let phase = progress::bytes_from("pages", "memory coming in", total, done);
    let poll = async {
        loop {
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            if let Ok(now) = ask(t, pod_id, handler, false).await {
                progress::set(sum(&now).0);
            }
        }
    };
    let out = tokio::select! {
        out = wait => out,
        never = poll => never,
    };
    if let Ok(now) = ask(t, pod_id, handler, false).await {
        progress::set(sum(&now).0);
    }
    drop(phase);
    out
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
            bytes_in: c.bytes_in,
            bytes_total: c.bytes_total,
            page_requests: c.page_requests,
        })
        .collect())
}
