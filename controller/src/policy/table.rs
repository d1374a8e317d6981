//! The allow-list itself: every field of every CRI message a restore reads from an archive
//! (`pod.dump` is a `PodSandboxConfig`, `container-config.json` a `ContainerConfig`), with
//! what the restore does with it. A key an archive carries that is not in this table is
//! refused by name before anything is created, so a field a newer CRI adds cannot slip
//! through unread. A unit test compares the table with the CRI proto the `k8s-cri` crate was
//! built from, in both directions; `fields.rs` destructures the same fields by name, so a
//! field added to the Rust types does not compile until it is read there too.

use serde_json::Value;

/// What the restore does with one field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// Given to containerd as it is: it widens nothing a fresh pod of the node could not ask
    /// for (why).
    Copied(&'static str),
    /// Turned into a request the node policy must allow (the policy items, or host-path
    /// prefixes).
    Checked(&'static str),
    /// Set or replaced by the restore itself (how).
    Replaced(&'static str),
    /// A message: its own fields are classified under its name.
    Message(&'static str),
}

/// One CRI field: the message it belongs to, its JSON key, its class.
#[derive(Clone, Copy, Debug)]
pub struct Field {
    pub message: &'static str,
    pub key: &'static str,
    pub class: Class,
}

const fn f(message: &'static str, key: &'static str, class: Class) -> Field {
    Field {
        message,
        key,
        class,
    }
}

use Class::{Checked, Copied, Message, Replaced};

const LIMITS: Class = Copied("a limit on the pod's own cgroup: only narrows");
const WINDOWS: Class = Copied("read only on Windows nodes; ignored here");
const IDENTITY: Class =
    Copied("an identity inside the pod, as a fresh pod may choose (host files are reached only through checked host paths)");

/// The messages the two roots reach, field by field.
pub const FIELDS: &[Field] = &[
    // pod.dump
    f("PodSandboxConfig", "metadata", Message("PodSandboxMetadata")),
    f("PodSandboxConfig", "hostname", Copied("the pod's own UTS namespace")),
    f("PodSandboxConfig", "log_directory", Checked("log-file (with each container's log_path)")),
    f("PodSandboxConfig", "dns_config", Message("DNSConfig")),
    f("PodSandboxConfig", "port_mappings", Message("PortMapping")),
    f("PodSandboxConfig", "labels", Copied("informational")),
    f("PodSandboxConfig", "annotations", Replaced("the restore sets its own io.stasis.* annotations; containerd passes only allowed keys to the shim")),
    f("PodSandboxConfig", "linux", Message("LinuxPodSandboxConfig")),
    f("PodSandboxConfig", "windows", Message("WindowsPodSandboxConfig")),
    f("PodSandboxMetadata", "name", Replaced("--name, or the recorded name")),
    f("PodSandboxMetadata", "uid", Replaced("a new uid derived from the recorded one")),
    f("PodSandboxMetadata", "namespace", Copied("a Kubernetes name, not a kernel namespace")),
    f("PodSandboxMetadata", "attempt", Replaced("0")),
    f("DNSConfig", "servers", Copied("written into the pod's own resolv.conf")),
    f("DNSConfig", "searches", Copied("written into the pod's own resolv.conf")),
    f("DNSConfig", "options", Copied("written into the pod's own resolv.conf")),
    f("PortMapping", "protocol", Copied("of a mapping checked by host_port")),
    f("PortMapping", "container_port", Copied("a port of the pod's own network namespace")),
    f("PortMapping", "host_port", Checked("host-ports")),
    f("PortMapping", "host_ip", Checked("host-ports (with host_port)")),
    f("LinuxPodSandboxConfig", "cgroup_parent", Checked("cgroup-parent: strictly below a policy root")),
    f("LinuxPodSandboxConfig", "security_context", Message("LinuxSandboxSecurityContext")),
    f("LinuxPodSandboxConfig", "sysctls", Checked("sysctls: the policy's list")),
    f("LinuxPodSandboxConfig", "overhead", Message("LinuxContainerResources")),
    f("LinuxPodSandboxConfig", "resources", Message("LinuxContainerResources")),
    f("LinuxSandboxSecurityContext", "namespace_options", Message("NamespaceOption")),
    f("LinuxSandboxSecurityContext", "selinux_options", Message("SELinuxOption")),
    f("LinuxSandboxSecurityContext", "run_as_user", Message("Int64Value")),
    f("LinuxSandboxSecurityContext", "run_as_group", Message("Int64Value")),
    f("LinuxSandboxSecurityContext", "readonly_rootfs", Copied("only narrows")),
    f("LinuxSandboxSecurityContext", "supplemental_groups", IDENTITY),
    f("LinuxSandboxSecurityContext", "supplemental_groups_policy", IDENTITY),
    f("LinuxSandboxSecurityContext", "privileged", Checked("privileged")),
    f("LinuxSandboxSecurityContext", "seccomp", Message("SecurityProfile")),
    f("LinuxSandboxSecurityContext", "apparmor", Message("SecurityProfile")),
    f("LinuxSandboxSecurityContext", "seccomp_profile_path", Checked("seccomp-unconfined, seccomp-localhost (deprecated form)")),
    f("WindowsPodSandboxConfig", "security_context", Message("WindowsSandboxSecurityContext")),
    f("WindowsSandboxSecurityContext", "run_as_username", WINDOWS),
    f("WindowsSandboxSecurityContext", "credential_spec", WINDOWS),
    f("WindowsSandboxSecurityContext", "host_process", WINDOWS),
    f("WindowsSandboxSecurityContext", "namespace_options", Message("WindowsNamespaceOption")),
    f("WindowsNamespaceOption", "network", WINDOWS),
    // container-config.json
    f("ContainerConfig", "metadata", Message("ContainerMetadata")),
    f("ContainerConfig", "image", Message("ImageSpec")),
    f("ContainerConfig", "command", Copied("runs inside the container")),
    f("ContainerConfig", "args", Copied("runs inside the container")),
    f("ContainerConfig", "working_dir", Copied("inside the container")),
    f("ContainerConfig", "envs", Message("KeyValue")),
    f("ContainerConfig", "mounts", Message("Mount")),
    f("ContainerConfig", "devices", Message("Device")),
    f("ContainerConfig", "labels", Copied("informational")),
    f("ContainerConfig", "annotations", Replaced("the restore sets io.stasis.restore and checks io.stasis.volumes against the archive")),
    f("ContainerConfig", "log_path", Checked("log-file: below the policy's log or host path prefixes")),
    f("ContainerConfig", "stdin", Copied("the container's own streams")),
    f("ContainerConfig", "stdin_once", Copied("the container's own streams")),
    f("ContainerConfig", "tty", Copied("the container's own streams")),
    f("ContainerConfig", "linux", Message("LinuxContainerConfig")),
    f("ContainerConfig", "windows", Message("WindowsContainerConfig")),
    f("ContainerConfig", "cdi_devices", Message("CDIDevice")),
    f("ContainerMetadata", "name", Copied("the container's name in its pod")),
    f("ContainerMetadata", "attempt", Copied("a counter")),
    f("ImageSpec", "image", Replaced("the digest config.dump records; pulled only from the policy's base_image_registries")),
    f("ImageSpec", "annotations", Copied("informational")),
    f("ImageSpec", "user_specified_image", Copied("informational")),
    f("ImageSpec", "runtime_handler", Checked("runtime-handlers (an image's handler must be one the policy allows)")),
    f("KeyValue", "key", Copied("the container's environment")),
    f("KeyValue", "value", Copied("the container's environment")),
    f("Mount", "container_path", Copied("inside the container")),
    f("Mount", "host_path", Checked("host paths: below a prefix, no link on the way")),
    f("Mount", "readonly", Copied("only narrows")),
    f("Mount", "selinux_relabel", Copied("of a host path the policy allowed")),
    f("Mount", "propagation", Checked("mount-propagation (bidirectional)")),
    f("Mount", "uid_mappings", Message("IDMapping")),
    f("Mount", "gid_mappings", Message("IDMapping")),
    f("Mount", "recursive_read_only", Copied("only narrows")),
    f("Mount", "image", Message("ImageSpec")),
    f("IDMapping", "host_id", Checked("user-namespaces")),
    f("IDMapping", "container_id", Checked("user-namespaces")),
    f("IDMapping", "length", Checked("user-namespaces")),
    f("Device", "container_path", Checked("devices")),
    f("Device", "host_path", Checked("devices")),
    f("Device", "permissions", Checked("devices")),
    f("CDIDevice", "name", Checked("devices")),
    f("LinuxContainerConfig", "resources", Message("LinuxContainerResources")),
    f("LinuxContainerConfig", "security_context", Message("LinuxContainerSecurityContext")),
    f("LinuxContainerSecurityContext", "capabilities", Message("Capability")),
    f("LinuxContainerSecurityContext", "privileged", Checked("privileged")),
    f("LinuxContainerSecurityContext", "namespace_options", Message("NamespaceOption")),
    f("LinuxContainerSecurityContext", "selinux_options", Message("SELinuxOption")),
    f("LinuxContainerSecurityContext", "run_as_user", Message("Int64Value")),
    f("LinuxContainerSecurityContext", "run_as_group", Message("Int64Value")),
    f("LinuxContainerSecurityContext", "run_as_username", IDENTITY),
    f("LinuxContainerSecurityContext", "readonly_rootfs", Copied("only narrows")),
    f("LinuxContainerSecurityContext", "supplemental_groups", IDENTITY),
    f("LinuxContainerSecurityContext", "supplemental_groups_policy", IDENTITY),
    f("LinuxContainerSecurityContext", "no_new_privs", Copied("off is what any fresh container that allows privilege escalation gets")),
    f("LinuxContainerSecurityContext", "masked_paths", Checked("unmasked-proc: must keep the runtime's")),
    f("LinuxContainerSecurityContext", "readonly_paths", Checked("unmasked-proc: must keep the runtime's")),
    f("LinuxContainerSecurityContext", "seccomp", Message("SecurityProfile")),
    f("LinuxContainerSecurityContext", "apparmor", Message("SecurityProfile")),
    f("LinuxContainerSecurityContext", "apparmor_profile", Checked("apparmor-unconfined, apparmor-localhost (deprecated form)")),
    f("LinuxContainerSecurityContext", "seccomp_profile_path", Checked("seccomp-unconfined, seccomp-localhost (deprecated form)")),
    f("Capability", "add_capabilities", Checked("capabilities: beyond the runtime's default set")),
    f("Capability", "drop_capabilities", Copied("only narrows")),
    f("Capability", "add_ambient_capabilities", Checked("capabilities: beyond the runtime's default set")),
    f("NamespaceOption", "network", Checked("host-namespaces")),
    f("NamespaceOption", "pid", Checked("host-namespaces (node, or another container's)")),
    f("NamespaceOption", "ipc", Checked("host-namespaces")),
    f("NamespaceOption", "target_id", Checked("host-namespaces (with pid TARGET)")),
    f("NamespaceOption", "userns_options", Message("UserNamespace")),
    f("UserNamespace", "mode", Checked("user-namespaces")),
    f("UserNamespace", "uids", Message("IDMapping")),
    f("UserNamespace", "gids", Message("IDMapping")),
    f("SELinuxOption", "user", Checked("selinux")),
    f("SELinuxOption", "role", Checked("selinux")),
    f("SELinuxOption", "type", Checked("selinux")),
    f("SELinuxOption", "level", Checked("selinux")),
    f("Int64Value", "value", IDENTITY),
    f("SecurityProfile", "profile_type", Checked("seccomp-unconfined, apparmor-unconfined, seccomp-localhost, apparmor-localhost")),
    f("SecurityProfile", "localhost_ref", Checked("seccomp-localhost: below the policy's profile directories; apparmor-localhost: the policy's profile names")),
    f("LinuxContainerResources", "cpu_period", LIMITS),
    f("LinuxContainerResources", "cpu_quota", LIMITS),
    f("LinuxContainerResources", "cpu_shares", LIMITS),
    f("LinuxContainerResources", "memory_limit_in_bytes", LIMITS),
    f("LinuxContainerResources", "oom_score_adj", Copied("containerd's restrict_oom_score_adj keeps it at or above its own")),
    f("LinuxContainerResources", "cpuset_cpus", LIMITS),
    f("LinuxContainerResources", "cpuset_mems", LIMITS),
    f("LinuxContainerResources", "hugepage_limits", Message("HugepageLimit")),
    f("LinuxContainerResources", "unified", LIMITS),
    f("LinuxContainerResources", "memory_swap_limit_in_bytes", LIMITS),
    f("HugepageLimit", "page_size", LIMITS),
    f("HugepageLimit", "limit", LIMITS),
    f("WindowsContainerConfig", "resources", Message("WindowsContainerResources")),
    f("WindowsContainerConfig", "security_context", Message("WindowsContainerSecurityContext")),
    f("WindowsContainerResources", "cpu_shares", WINDOWS),
    f("WindowsContainerResources", "cpu_count", WINDOWS),
    f("WindowsContainerResources", "cpu_maximum", WINDOWS),
    f("WindowsContainerResources", "memory_limit_in_bytes", WINDOWS),
    f("WindowsContainerResources", "rootfs_size_in_bytes", WINDOWS),
    f("WindowsContainerResources", "affinity_cpus", Message("WindowsCpuGroupAffinity")),
    f("WindowsCpuGroupAffinity", "cpu_mask", WINDOWS),
    f("WindowsCpuGroupAffinity", "cpu_group", WINDOWS),
    f("WindowsContainerSecurityContext", "run_as_username", WINDOWS),
    f("WindowsContainerSecurityContext", "credential_spec", WINDOWS),
    f("WindowsContainerSecurityContext", "host_process", WINDOWS),
];

/// The keys of `value` (read as `message`) that the table does not know, as paths such as
/// `linux.security_context.foo`. Values of the wrong shape are left to the typed reader.
pub fn unknown_fields(message: &str, value: &Value) -> Vec<String> {
    let mut out = Vec::new();
    walk(message, value, "", &mut out);
    out
}

fn walk(message: &str, value: &Value, at: &str, out: &mut Vec<String>) {
    match value {
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                walk(message, v, &format!("{at}[{i}]"), out);
            }
        }
        Value::Object(map) => {
            for (key, v) in map {
                let path = if at.is_empty() {
                    key.clone()
                } else {
                    format!("{at}.{key}")
                };
                match FIELDS.iter().find(|f| f.message == message && f.key == key) {
                    None => out.push(path),
                    Some(Field {
                        class: Message(inner),
                        ..
                    }) => walk(inner, v, &path, out),
                    Some(_) => {}
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message as _;
    use std::collections::{BTreeMap, BTreeSet, HashMap};

    /// The CRI proto the `k8s-cri` crate was built from (found through `cargo metadata`),
    /// compiled to descriptors with protoc, which building that crate needs anyway.
    fn cri_descriptors() -> prost_types::FileDescriptorSet {
        let meta = std::process::Command::new(env!("CARGO"))
            .args(["metadata", "--format-version", "1"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .expect("run cargo metadata");
        let meta: serde_json::Value = serde_json::from_slice(&meta.stdout).unwrap();
        let manifest = meta["packages"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "k8s-cri")
            .and_then(|p| p["manifest_path"].as_str())
            .expect("k8s-cri in cargo metadata")
            .to_string();
        let proto = std::path::Path::new(&manifest)
            .parent()
            .unwrap()
            .join("proto");
        let out = std::env::temp_dir().join(format!("stasis-cri-{}.pb", std::process::id()));
        let status = std::process::Command::new("protoc")
            .arg(format!("-I{}", proto.display()))
            .arg("--include_imports")
            .arg(format!("-o{}", out.display()))
            .arg(proto.join("v1.proto"))
            .status()
            .expect("run protoc (Debian protobuf-compiler)");
        assert!(status.success(), "protoc failed on {}", proto.display());
        let bytes = std::fs::read(&out).unwrap();
        let _ = std::fs::remove_file(&out);
        prost_types::FileDescriptorSet::decode(&bytes[..]).unwrap()
    }

    /// prost's Rust field name, which is the JSON key serde reads (`CDI_devices` →
    /// `cdi_devices`, `uidMappings` → `uid_mappings`).
    fn rust_name(proto: &str) -> String {
        let mut out = String::new();
        let mut prev_lower = false;
        for c in proto.chars() {
            if c.is_ascii_uppercase() && prev_lower {
                out.push('_');
            }
            prev_lower = c.is_ascii_lowercase() || c.is_ascii_digit();
            out.push(c.to_ascii_lowercase());
        }
        out
    }

    /// Every field reachable from the two roots, in the proto, is in the table with the same
    /// message type, and the table names nothing the proto lacks.
    #[test]
    fn the_table_classifies_exactly_the_cri_proto() {
        let set = cri_descriptors();
        let messages: HashMap<String, &prost_types::DescriptorProto> = set
            .file
            .iter()
            .flat_map(|file| {
                let pkg = file.package().to_string();
                file.message_type
                    .iter()
                    .map(move |m| (format!(".{pkg}.{}", m.name()), m))
            })
            .collect();
        // (message, key) → the message type it holds, if it is a message (maps are values).
        let mut proto: BTreeMap<(String, String), Option<String>> = BTreeMap::new();
        let mut seen = BTreeSet::new();
        let mut todo = vec![
            ".runtime.v1.PodSandboxConfig".to_string(),
            ".runtime.v1.ContainerConfig".to_string(),
        ];
        while let Some(full) = todo.pop() {
            if !seen.insert(full.clone()) {
                continue;
            }
            let d = messages[&full];
            let map_entries: BTreeSet<&str> = d
                .nested_type
                .iter()
                .filter(|n| n.options.as_ref().is_some_and(|o| o.map_entry()))
                .map(|n| n.name())
                .collect();
            for field in &d.field {
                let t = field.type_name();
                let is_map = t
                    .rsplit('.')
                    .next()
                    .is_some_and(|n| map_entries.contains(n));
                let inner = (!is_map && messages.contains_key(t)).then(|| {
                    todo.push(t.to_string());
                    t.rsplit('.').next().unwrap().to_string()
                });
                proto.insert((d.name().to_string(), rust_name(field.name())), inner);
            }
        }
        let table: BTreeMap<(String, String), Option<String>> = FIELDS
            .iter()
            .map(|f| {
                let inner = match f.class {
                    Message(m) => Some(m.to_string()),
                    _ => None,
                };
                ((f.message.to_string(), f.key.to_string()), inner)
            })
            .collect();
        assert_eq!(table.len(), FIELDS.len(), "a field is in the table twice");
        let unclassified: Vec<_> = proto.keys().filter(|k| !table.contains_key(*k)).collect();
        assert!(
            unclassified.is_empty(),
            "CRI fields the restore policy table does not classify: {unclassified:?}"
        );
        let unknown: Vec<_> = table.keys().filter(|k| !proto.contains_key(*k)).collect();
        assert!(
            unknown.is_empty(),
            "table entries CRI does not have: {unknown:?}"
        );
        for (k, inner) in &proto {
            assert_eq!(
                &table[k], inner,
                "{k:?}: the table and CRI disagree on its type"
            );
        }
    }

    #[test]
    fn unknown_keys_are_named_by_path_at_any_depth() {
        let v = serde_json::json!({
            "metadata": {"name": "p"},
            "port_mappings": [{"host_port": 1}, {"hostPortX": 2}],
            "linux": {"security_context": {"privileged": false, "new_escape": true}},
            "labels": {"anything": "goes"},
        });
        assert_eq!(
            unknown_fields("PodSandboxConfig", &v),
            [
                "linux.security_context.new_escape",
                "port_mappings[1].hostPortX"
            ]
        );
        let honest = serde_json::to_value(crate::cri::api::ContainerConfig::default()).unwrap();
        assert!(unknown_fields("ContainerConfig", &honest).is_empty());
    }
}
