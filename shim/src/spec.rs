//! A container's OCI runtime spec (`config.json`), read through `oci-spec`'s types. The shim
//! adapts a few fields (cgroup path, namespace paths); those edits are applied to the typed
//! spec and, for writing, to the document containerd wrote, so fields `oci-spec` does not
//! model are never lost.

use std::path::{Path, PathBuf};

use oci_spec::runtime::{Mount, Spec};

use crate::error::{Error, Result};

/// CRI's annotation naming a container's pod.
pub const CRI_SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
/// CRI's annotation saying whether a bundle is a pod's sandbox or one of its containers.
pub const CRI_CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
/// CRI's annotation with the container's image name.
pub const CRI_IMAGE_NAME: &str = "io.kubernetes.cri.image-name";

#[derive(Debug, Clone, PartialEq)]
pub struct ContainerSpec {
    typed: Spec,
    raw: serde_json::Value,
    changed: bool,
}

impl ContainerSpec {
    /// Parses `config.json` text; `origin` names it in errors.
    pub fn parse(id: &str, origin: &str, bytes: &[u8]) -> Result<Self> {
        let raw: serde_json::Value = serde_json::from_slice(bytes)
            .map_err(|e| Error::invalid(id, format!("{origin} is not valid JSON: {e}")))?;
        if !raw.is_object() || raw.get("process").is_none() || raw.get("root").is_none() {
            return Err(Error::invalid(
                id,
                format!("{origin} is not an OCI runtime spec (needs \"process\" and \"root\")"),
            ));
        }
        // From the bytes, like `raw`: one deserializer instantiation for the large Spec type
        // (from_value would add a second copy of that code to the binary).
        let typed: Spec = serde_json::from_slice(bytes)
            .map_err(|e| Error::invalid(id, format!("{origin} is not an OCI runtime spec: {e}")))?;
        Ok(ContainerSpec {
            typed,
            raw,
            changed: false,
        })
    }

    /// Reads `<bundle>/config.json`.
    pub fn load(id: &str, bundle: &Path) -> Result<Self> {
        let path = bundle.join("config.json");
        let bytes = std::fs::read(&path)
            .map_err(|e| Error::io(id, format!("read {}", path.display()), e))?;
        Self::parse(id, &path.display().to_string(), &bytes)
    }

    /// Writes the spec back to `<bundle>/config.json` if the shim changed it.
    pub fn save_if_changed(&mut self, id: &str, bundle: &Path) -> Result<()> {
        if !self.changed {
            return Ok(());
        }
        let text = serde_json::to_vec_pretty(&self.raw)
            .map_err(|e| Error::other(id, "encode config.json", e))?;
        std::fs::write(bundle.join("config.json"), text)
            .map_err(|e| Error::io(id, "rewrite config.json for the pod", e))?;
        self.changed = false;
        Ok(())
    }

    pub fn typed(&self) -> &Spec {
        &self.typed
    }

    /// The document as containerd wrote it (plus the shim's edits), for `spec.dump`.
    pub fn document(&self) -> &serde_json::Value {
        &self.raw
    }

    pub fn annotation(&self, key: &str) -> Option<&str> {
        self.typed
            .annotations()
            .as_ref()
            .and_then(|a| a.get(key))
            .map(String::as_str)
    }

    pub fn terminal(&self) -> bool {
        self.typed
            .process()
            .as_ref()
            .and_then(|p| p.terminal())
            .unwrap_or(false)
    }

    pub fn cgroups_path(&self) -> String {
        self.typed
            .linux()
            .as_ref()
            .and_then(|l| l.cgroups_path().as_ref())
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    }

    pub fn mounts(&self) -> &[Mount] {
        self.typed.mounts().as_deref().unwrap_or_default()
    }

    /// Whether this bundle is a container joining a pod (CRI's container-type annotation).
    pub fn joins_pod(&self) -> bool {
        self.annotation(CRI_CONTAINER_TYPE) == Some("container")
    }

    /// Whether the container's processes live in a PID namespace it does not own (the pod's,
    /// joined by path, or its runtime's): the end of its init then ends none of them.
    pub fn shares_pid_namespace(&self) -> bool {
        let namespaces = self.raw["linux"]["namespaces"].as_array();
        let pid = namespaces.and_then(|ns| ns.iter().find(|n| n["type"] == "pid"));
        pid.is_none_or(|n| n["path"].as_str().is_some_and(|p| !p.is_empty()))
    }

    pub fn set_cgroups_path(&mut self, path: &str) {
        if let Some(linux) = self.typed.linux_mut() {
            linux.set_cgroups_path(Some(PathBuf::from(path)));
        }
        if let Some(linux) = self.raw.get_mut("linux").and_then(|l| l.as_object_mut()) {
            linux.insert("cgroupsPath".into(), serde_json::Value::String(path.into()));
            self.changed = true;
        }
    }

    /// Removes the namespace of type `typ` ("pid") if the spec joins an existing one (has a
    /// path): the container then stays in its runtime's own namespace of that type.
    pub fn leave_joined_namespace(&mut self, typ: &str) {
        let Ok(kind) = oci_spec::runtime::LinuxNamespaceType::try_from(typ) else {
            return;
        };
        if let Some(ns) = self
            .typed
            .linux_mut()
            .as_mut()
            .and_then(|l| l.namespaces_mut().as_mut())
        {
            ns.retain(|n| !(n.typ() == kind && n.path().is_some()));
        }
        if let Some(ns) = self
            .raw
            .pointer_mut("/linux/namespaces")
            .and_then(|n| n.as_array_mut())
        {
            let before = ns.len();
            ns.retain(|n| !(n["type"] == typ && n.get("path").is_some()));
            if ns.len() != before {
                self.changed = true;
            }
        }
    }

    /// Drops the host paths of every namespace but those of the types in `keep` ("pid"): the
    /// container gets fresh ones (or, under a runtime with its own kernel, the sandbox's).
    pub fn clear_namespace_paths(&mut self, keep: &[&str]) {
        let kept = |typ: &str| keep.contains(&typ);
        if let Some(ns) = self
            .typed
            .linux_mut()
            .as_mut()
            .and_then(|l| l.namespaces_mut().as_mut())
        {
            for n in ns.iter_mut() {
                let typ = keep.iter().find(|k| {
                    oci_spec::runtime::LinuxNamespaceType::try_from(**k).ok() == Some(n.typ())
                });
                if typ.is_none() {
                    n.set_path(None);
                }
            }
        }
        if let Some(ns) = self
            .raw
            .pointer_mut("/linux/namespaces")
            .and_then(|n| n.as_array_mut())
        {
            for n in ns.iter_mut() {
                if let Some(o) = n.as_object_mut() {
                    if o.get("type").and_then(|t| t.as_str()).is_some_and(kept) {
                        continue;
                    }
                    if o.remove("path").is_some() {
                        self.changed = true;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"{
        "ociVersion": "1.1.0",
        "process": {"user": {"uid": 0, "gid": 0}, "args": ["sh"], "cwd": "/", "terminal": true},
        "root": {"path": "rootfs"},
        "mounts": [{"destination": "/data", "type": "bind", "source": "/tmp", "options": ["rbind"]}],
        "annotations": {"io.kubernetes.cri.container-type": "container", "x-unknown": "kept"},
        "linux": {"cgroupsPath": "/kubepods/c1",
                  "namespaces": [{"type": "pid", "path": "/proc/9/ns/pid"}, {"type": "mount"},
                                 {"type": "ipc", "path": "/proc/9/ns/ipc"}],
                  "someFutureField": {"a": 1}}
    }"#;

    #[test]
    fn a_pid_namespace_joined_by_path_is_shared() {
        let spec = |ns: &str| {
            let doc = format!(
                r#"{{"ociVersion":"1.2.0","process":{{"cwd":"/","args":["sh"],"user":{{"uid":0,"gid":0}}}},"root":{{"path":"rootfs"}},"linux":{{"namespaces":{ns}}}}}"#
            );
            ContainerSpec::parse("c", "test", doc.as_bytes()).unwrap()
        };
        assert!(
            spec(r#"[{"type":"pid","path":"/proc/9/ns/pid"},{"type":"mount"}]"#)
                .shares_pid_namespace()
        );
        assert!(spec(r#"[{"type":"mount"}]"#).shares_pid_namespace());
        assert!(!spec(r#"[{"type":"pid"},{"type":"mount"}]"#).shares_pid_namespace());
        assert!(!spec(r#"[{"type":"pid","path":""}]"#).shares_pid_namespace());
    }

    #[test]
    fn typed_reads_and_edits_keep_unknown_fields() {
        let mut s = ContainerSpec::parse("c1", "config.json", CONFIG.as_bytes()).unwrap();
        assert!(s.terminal());
        assert!(s.joins_pod());
        assert_eq!(s.cgroups_path(), "/kubepods/c1");
        assert_eq!(s.mounts().len(), 1);
        s.set_cgroups_path("/stasis/pod/c1");
        s.clear_namespace_paths(&["pid"]);
        assert_eq!(s.cgroups_path(), "/stasis/pod/c1");
        let doc = s.document();
        assert_eq!(doc["linux"]["someFutureField"]["a"], 1);
        assert_eq!(doc["linux"]["cgroupsPath"], "/stasis/pod/c1");
        assert_eq!(doc["linux"]["namespaces"][0]["path"], "/proc/9/ns/pid");
        assert!(doc["linux"]["namespaces"][2].get("path").is_none());
        assert!(s.changed);
    }

    #[test]
    fn refuses_what_is_not_a_spec() {
        let e = ContainerSpec::parse("c1", "b/config.json", b"{}").unwrap_err();
        assert!(e.to_string().contains("b/config.json"), "{e}");
        assert!(ContainerSpec::parse("c1", "x", b"not json").is_err());
    }
}
