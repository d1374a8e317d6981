//! CRI types from the JSON containerd writes of them (Go's `encoding/json`).

use anyhow::{bail, Result};

use super::api;

/// containerd marshals the CRI ContainerConfig with Go's `omitempty`: zero values are left
/// out, and the CRI types here want every field. Each missing field gets back the zero value
/// Go dropped: the first of null, "", 0, false, [], {} that its type takes.
pub fn config_from_info(value: &serde_json::Value) -> Result<api::ContainerConfig> {
    from_go_json(value)
}

/// Any CRI type from Go's `omitempty` JSON (see `config_from_info`).
pub fn from_go_json<T: serde::de::DeserializeOwned>(value: &serde_json::Value) -> Result<T> {
    use serde_json::{json, Value};
    let zeros = [
        json!(null),
        json!(""),
        json!(0),
        json!(false),
        json!([]),
        json!({}),
    ];
    let mut v = value.clone();
    let mut tried: std::collections::HashMap<String, usize> = Default::default();
    for _ in 0..10_000 {
        let err = match serde_path_to_error::deserialize::<_, T>(v.clone()) {
            Ok(c) => return Ok(c),
            Err(e) => e,
        };
        let path = err.path().to_string();
        let message = err.inner().to_string();
        if let Some(field) = message
            .strip_prefix("missing field `")
            .and_then(|r| r.split('`').next())
        {
            let full = if path == "." {
                field.to_string()
            } else {
                format!("{path}.{field}")
            };
            let Some(Value::Object(map)) = slot(&mut v, &path) else {
                bail!("{message} at {path}");
            };
            map.insert(field.to_string(), zeros[0].clone());
            tried.insert(full, 0);
        } else if let Some(i) = tried.get(&path).copied() {
            let Some(next) = zeros.get(i + 1) else {
                bail!("{message} at {path}");
            };
            let Some(place) = slot(&mut v, &path) else {
                bail!("{message} at {path}");
            };
            *place = next.clone();
            tried.insert(path, i + 1);
        } else {
            bail!("{message} at {path}");
        }
    }
    bail!("too many missing fields")
}

/// The value at a serde_path_to_error path ("." for the root, "a.b[2].c").
fn slot<'a>(v: &'a mut serde_json::Value, path: &str) -> Option<&'a mut serde_json::Value> {
    if path == "." {
        return Some(v);
    }
    let mut at = v;
    for part in path.split('.') {
        let (key, indexes) = match part.find('[') {
            Some(i) => (&part[..i], &part[i..]),
            None => (part, ""),
        };
        if !key.is_empty() {
            at = at.get_mut(key)?;
        }
        for index in indexes.split(']').filter(|s| !s.is_empty()) {
            let n: usize = index.trim_start_matches('[').parse().ok()?;
            at = at.get_mut(n)?;
        }
    }
    Some(at)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What containerd's verbose info holds (Go omitempty: zero values left out).
    #[test]
    fn a_config_with_omitted_zero_values_keeps_its_security_settings() {
        let go = serde_json::json!({
            "metadata": {"name": "web"},
            "image": {"image": "busybox"},
            "command": ["sh"],
            "linux": {
                "security_context": {
                    "capabilities": {"drop_capabilities": ["ALL"], "add_capabilities": ["CHOWN"]},
                    "run_as_user": {"value": 1000},
                    "readonly_rootfs": true,
                    "namespace_options": {"pid": 1}
                }
            },
            "mounts": [{"container_path": "/data", "host_path": "/var/lib/x"}]
        });
        let c = config_from_info(&go).unwrap();
        let sc = c.linux.unwrap().security_context.unwrap();
        assert_eq!(sc.capabilities.unwrap().drop_capabilities, ["ALL"]);
        assert_eq!(sc.run_as_user.unwrap().value, 1000);
        assert!(sc.readonly_rootfs);
        assert_eq!(sc.namespace_options.unwrap().pid, 1);
        assert_eq!(c.mounts[0].host_path, "/var/lib/x");
        assert!(!c.mounts[0].readonly);
        // Not a config at all: an error, never a guess.
        assert!(config_from_info(&serde_json::json!({"linux": 5})).is_err());
    }
}
