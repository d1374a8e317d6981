//! `stasisctl pod ls`: pods with their runtime, state and containers.

use std::path::Path;

use anyhow::Result;

use super::Target;
use crate::cri::{self, api};

/// One pod as `pod ls` shows it.
pub struct PodRow {
    pub id: String,
    pub name: String,
    pub namespace: String,
    pub ready: bool,
    /// The CRI runtime handler; empty for containerd's default.
    pub runtime_handler: String,
    /// Each container's name and CRI state name.
    pub containers: Vec<(String, &'static str)>,
}

/// Every pod CRI knows, with its containers and their states.
pub async fn ls(t: &Target) -> Result<Vec<PodRow>> {
    let mut rt = cri::connect(Path::new(&t.address)).await?;
    let pods = rt
        .list_pod_sandbox(api::ListPodSandboxRequest::default())
        .await?
        .into_inner()
        .items;
    let mut rows = Vec::new();
    for p in pods {
        // CRI lists containers in no fixed order; sorted by name, the column reads the same each time.
        let mut containers: Vec<(String, &'static str)> = cri::pod_containers(&mut rt, &p.id)
            .await?
            .iter()
            .map(|c| {
                let name = c.metadata.as_ref().map(|m| m.name.as_str()).unwrap_or("?");
                (name.to_string(), cri::state_name(c.state))
            })
            .collect();
        containers.sort();
        let md = p.metadata.clone().unwrap_or_default();
        rows.push(PodRow {
            ready: p.state == api::PodSandboxState::SandboxReady as i32,
            id: p.id,
            name: md.name,
            namespace: md.namespace,
            runtime_handler: p.runtime_handler,
            containers,
        });
    }
    Ok(rows)
}
