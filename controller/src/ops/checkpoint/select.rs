//! Which containers a checkpoint takes, and what CRI knows of each for the shim.

use anyhow::{bail, Context, Result};
use stasis_api::checkpoint::ContainerInfo;

use crate::cri::{self, api};

/// Does `wanted` (from `--container`) name the container: its id, its name, or a prefix of
/// its id long enough not to be a guess (6 characters, as `ctr` and `crictl` take them).
pub fn names(wanted: &str, id: &str, name: &str) -> bool {
    wanted == id || wanted == name || (wanted.len() >= 6 && id.starts_with(wanted))
}

/// The running containers a checkpoint of pod `pod` takes: all of them when `wanted` is
/// empty, else those it names; an error names a `wanted` that matches no running container.
/// `containers` are (id, name, running).
pub fn select<'a>(
    pod: &str,
    containers: &'a [(String, String, bool)],
    wanted: &[String],
) -> Result<Vec<&'a str>> {
    let chosen: Vec<&str> = containers
        .iter()
        .filter(|(id, name, running)| {
            *running && (wanted.is_empty() || wanted.iter().any(|w| names(w, id, name)))
        })
        .map(|(id, _, _)| id.as_str())
        .collect();
    for w in wanted {
        let found = containers
            .iter()
            .any(|(id, name, running)| *running && names(w, id, name));
        if !found {
            bail!("pod {pod}: no running container {w:?}");
        }
    }
    Ok(chosen)
}

/// What CRI knows of a container, as the Checkpoint service wants it.
pub async fn container_info(rt: &mut cri::Runtime, c: &api::Container) -> Result<ContainerInfo> {
    let resp = rt
        .container_status(api::ContainerStatusRequest {
            container_id: c.id.clone(),
            verbose: true,
        })
        .await
        .with_context(|| format!("status of container {}", c.id))?
        .into_inner();
    let status = resp.status.clone().unwrap_or_default();
    let info: serde_json::Value = resp
        .info
        .get("info")
        .and_then(|s| serde_json::from_str(s).ok())
        .unwrap_or_default();
    // containerd's verbose info carries the CRI ContainerConfig it was created with: its
    // security settings must come back exactly, so there is no guessing it from the status.
    let config = info.get("config").with_context(|| {
        format!(
            "container {}: containerd's verbose status has no ContainerConfig",
            c.id
        )
    })?;
    let config = cri::config_from_info(config)
        .with_context(|| format!("container {}: containerd's ContainerConfig", c.id))?;
    Ok(ContainerInfo {
        id: c.id.clone(),
        name: status
            .metadata
            .as_ref()
            .map(|m| m.name.clone())
            .unwrap_or_default(),
        config_json: serde_json::to_string(&config)?,
        status_json: serde_json::to_string(&status)?,
        image: status
            .image
            .as_ref()
            .map(|i| i.image.clone())
            .unwrap_or_default(),
        image_ref: status.image_ref.clone(),
        created_at: crate::display::rfc3339_from_unix_nanos(status.created_at),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod() -> Vec<(String, String, bool)> {
        vec![
            ("4f2a9c01aa".into(), "web".into(), true),
            ("4f2a9c02bb".into(), "sidecar".into(), true),
            ("77e0d1cc00".into(), "done".into(), false),
        ]
    }

    #[test]
    fn every_running_container_by_default() {
        let p = pod();
        assert_eq!(select("p", &p, &[]).unwrap(), ["4f2a9c01aa", "4f2a9c02bb"]);
    }

    #[test]
    fn containers_are_named_by_id_name_or_a_long_prefix() {
        let p = pod();
        let w = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(select("p", &p, &w(&["web"])).unwrap(), ["4f2a9c01aa"]);
        assert_eq!(
            select("p", &p, &w(&["4f2a9c02bb"])).unwrap(),
            ["4f2a9c02bb"]
        );
        assert_eq!(select("p", &p, &w(&["4f2a9c02"])).unwrap(), ["4f2a9c02bb"]);
        // A prefix of six names every container it starts.
        assert_eq!(select("p", &p, &w(&["4f2a9c"])).unwrap().len(), 2);
    }

    #[test]
    fn a_short_prefix_or_a_stopped_container_is_refused_by_name() {
        let p = pod();
        let e = select("p", &p, &["4f2a".to_string()]).unwrap_err();
        assert_eq!(e.to_string(), "pod p: no running container \"4f2a\"");
        let e = select("p", &p, &["done".to_string()]).unwrap_err();
        assert_eq!(e.to_string(), "pod p: no running container \"done\"");
        let e = select("p", &p, &["web".into(), "nope".into()]).unwrap_err();
        assert!(e.to_string().contains("\"nope\""));
    }
}
