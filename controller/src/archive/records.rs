//! The CRI records of a checkpoint (`pod.dump`, each `container-config.json`), parsed the
//! one way `inspect` and restore both read them: as containerd writes CRI types (zero values
//! may be left out), a record that does not parse being an error, never a default, and the
//! keys the policy's field table does not know kept as requests no policy allows.

use anyhow::{Context, Result};

use crate::{
    cri::{self, api},
    policy::{self, Request},
};

/// The pod's sandbox config from `pod.dump`, with its unknown keys as requests.
pub fn parse_pod_dump(bytes: &[u8]) -> Result<(api::PodSandboxConfig, Vec<Request>)> {
    let json: serde_json::Value = serde_json::from_slice(bytes).context("pod.dump is not JSON")?;
    let unknown = policy::unknown_fields("pod", "pod.dump", "PodSandboxConfig", &json);
    let pod = cri::from_go_json(&json).context("pod.dump is not a CRI PodSandboxConfig")?;
    Ok((pod, unknown))
}

/// Container `name`'s CRI config from its `container-config.json` (None: the file is
/// missing), with its unknown keys as requests.
pub fn parse_container_config(
    name: &str,
    bytes: Option<&[u8]>,
) -> Result<(api::ContainerConfig, Vec<Request>)> {
    let bytes = bytes.with_context(|| format!("container {name}: no container-config.json"))?;
    let json: serde_json::Value = serde_json::from_slice(bytes)
        .with_context(|| format!("container {name}: container-config.json is not JSON"))?;
    let unknown = policy::unknown_fields(
        &format!("container {name}"),
        "container-config.json",
        "ContainerConfig",
        &json,
    );
    let config = cri::from_go_json(&json).with_context(|| {
        format!("container {name}: container-config.json is not a CRI ContainerConfig")
    })?;
    Ok((config, unknown))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_that_do_not_parse_are_errors_naming_the_file() {
        let e = parse_pod_dump(b"{not json").unwrap_err();
        assert_eq!(e.to_string(), "pod.dump is not JSON");
        let e = parse_pod_dump(br#"{"metadata": 5}"#).unwrap_err();
        assert_eq!(e.to_string(), "pod.dump is not a CRI PodSandboxConfig");
        let e = parse_container_config("web", None).unwrap_err();
        assert_eq!(e.to_string(), "container web: no container-config.json");
        let e = parse_container_config("web", Some(br#"{"linux": 5}"#)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "container web: container-config.json is not a CRI ContainerConfig"
        );
    }

    #[test]
    fn unknown_keys_come_back_as_requests() {
        let (pod, unknown) =
            parse_pod_dump(br#"{"metadata":{"name":"p"},"future_field":1}"#).unwrap();
        assert_eq!(pod.metadata.unwrap().name, "p");
        assert_eq!(unknown.len(), 1, "{unknown:?}");
        let (c, unknown) =
            parse_container_config("web", Some(br#"{"metadata":{"name":"web"}}"#)).unwrap();
        assert_eq!(c.metadata.unwrap().name, "web");
        assert!(unknown.is_empty());
    }
}
