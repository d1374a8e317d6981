//! What a restore may ask for: an archive is untrusted, so whatever its `pod.dump` and
//! `container-config.json` request beyond an ordinary pod (about Kubernetes' "baseline" pod
//! security level) is refused unless the node's policy or the operator allows it by name.
//!
//! Items: `privileged`, `host-namespaces` (network, PID, IPC of the node), `capabilities`
//! (added beyond the runtime's default set), `seccomp-unconfined`, `apparmor-unconfined`,
//! `cgroup-parent` (outside the node's pod cgroup roots), `devices` (host devices),
//! `unmasked-proc` (masked or read-only path lists that leave out the runtime's), `sysctls`
//! (pod sysctls outside the policy's list: by default the set kubelet calls safe), and host
//! paths, governed by prefixes since every real pod has some (emptyDir and hostPath volumes).
//! What each CRI field is to the restore is in one table (`table.rs`); a field it does not
//! know is refused.

use std::{
    collections::BTreeSet,
    fmt,
    path::{Component, Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::cri::api;

mod fields;
mod table;
pub use fields::requests;
pub use table::{Class, Field, FIELDS};

/// The node policy file read by default.
pub const DEFAULT_POLICY_FILE: &str = "/etc/stasis/restore-policy.json";

/// Capabilities containerd and runc give every container: adding one of these widens nothing.
const DEFAULT_CAPS: &[&str] = &[
    "CHOWN",
    "DAC_OVERRIDE",
    "FSETID",
    "FOWNER",
    "MKNOD",
    "NET_RAW",
    "SETGID",
    "SETUID",
    "SETFCAP",
    "SETPCAP",
    "NET_BIND_SERVICE",
    "SYS_CHROOT",
    "KILL",
    "AUDIT_WRITE",
];

/// What containerd masks and makes read-only in every container unless CRI names its own
/// lists. A non-empty CRI list replaces these (measured: one harmless path in each list leaves
/// `/proc/sys` writable and `/proc/kcore` readable), so a list that keeps the protections must
/// hold all of them; an empty list keeps the runtime's.
const DEFAULT_MASKED_PATHS: &[&str] = &[
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];
const DEFAULT_READONLY_PATHS: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// The runtime's protections a non-empty list leaves out, as "/proc/sys not read-only".
fn dropped_protections(masked: &[String], readonly: &[String]) -> Vec<String> {
    let missing = |list: &[String], defaults: &[&'static str], how: &str| -> Vec<String> {
        if list.is_empty() {
            return Vec::new();
        }
        defaults
            .iter()
            .filter(|d| !list.iter().any(|p| lexical(Path::new(p)) == Path::new(d)))
            .map(|d| format!("{d} {how}"))
            .collect()
    };
    let mut out = missing(masked, DEFAULT_MASKED_PATHS, "not masked");
    out.extend(missing(readonly, DEFAULT_READONLY_PATHS, "not read-only"));
    out
}

/// The kinds of request an `--allow` names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Item {
    Privileged,
    HostNamespaces,
    Capabilities,
    SeccompUnconfined,
    ApparmorUnconfined,
    CgroupParent,
    Devices,
    /// /proc and /sys protections (masked and read-only paths) weaker than the runtime's.
    UnmaskedProc,
    /// Pod sysctls beyond the policy's `sysctls` list.
    Sysctls,
    /// Ports of the node (`host_port` in a port mapping).
    HostPorts,
    /// SELinux options (a type such as `spc_t` can mean unconfined).
    Selinux,
    /// Seccomp profiles read from a node file outside the policy's profile directories.
    SeccompLocalhost,
    /// Bidirectional mount propagation (the container's mounts reach the node).
    MountPropagation,
    /// User namespaces or id-mapped mounts with the archive's mappings.
    UserNamespaces,
    /// A container log file (containerd creates and writes it on the node) outside the
    /// policy's log and host path prefixes.
    LogFile,
    /// AppArmor profiles loaded on the node, by name, beyond the policy's
    /// `apparmor_profiles`.
    ApparmorLocalhost,
    /// A runtime handler named by the archive or a migration peer (not by the operator)
    /// outside the policy's `runtime_handlers` (default: the node's stasis handlers).
    RuntimeHandler,
    /// Governed by prefixes, not by name.
    #[serde(skip)]
    HostPath,
    /// A key the field table does not know: never allowed.
    #[serde(skip)]
    UnknownField,
}

impl Item {
    pub const NAMES: &'static [(&'static str, Item)] = &[
        ("privileged", Item::Privileged),
        ("host-namespaces", Item::HostNamespaces),
        ("capabilities", Item::Capabilities),
        ("seccomp-unconfined", Item::SeccompUnconfined),
        ("apparmor-unconfined", Item::ApparmorUnconfined),
        ("cgroup-parent", Item::CgroupParent),
        ("devices", Item::Devices),
        ("unmasked-proc", Item::UnmaskedProc),
        ("sysctls", Item::Sysctls),
        ("host-ports", Item::HostPorts),
        ("selinux", Item::Selinux),
        ("seccomp-localhost", Item::SeccompLocalhost),
        ("mount-propagation", Item::MountPropagation),
        ("user-namespaces", Item::UserNamespaces),
        ("log-file", Item::LogFile),
        ("apparmor-localhost", Item::ApparmorLocalhost),
        ("runtime-handler", Item::RuntimeHandler),
    ];

    pub fn name(self) -> &'static str {
        Item::NAMES
            .iter()
            .find(|(_, i)| *i == self)
            .map(|(n, _)| *n)
            .unwrap_or(match self {
                Item::UnknownField => "unknown-field",
                _ => "host-path",
            })
    }

    pub fn parse(s: &str) -> Result<Item> {
        Item::NAMES
            .iter()
            .find(|(n, _)| *n == s)
            .map(|(_, i)| *i)
            .with_context(|| {
                format!(
                    "unknown --allow item {s:?}; known: {} (host paths: --allow-host-path PREFIX)",
                    Item::NAMES
                        .iter()
                        .map(|(n, _)| *n)
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })
    }
}

/// One thing an archive asks for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Request {
    pub item: Item,
    /// `pod` or `container NAME`.
    pub by: String,
    /// What exactly, e.g. "host PID namespace", "/ mounted at /host".
    pub what: String,
    /// A host path, for host-path requests (checked against prefixes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

impl fmt::Display for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {} [{}]", self.by, self.what, self.item.name())
    }
}

/// The node's policy (a JSON file), widened by the operator's flags.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Items allowed on this node without a flag.
    #[serde(default)]
    pub allow: BTreeSet<Item>,
    /// Host paths below these prefixes may be mounted (default: kubelet's pod volumes).
    #[serde(default = "default_host_paths")]
    pub host_path_prefixes: Vec<PathBuf>,
    /// Cgroup parents below these are accepted (default: `/kubepods` and stasis's own root).
    #[serde(default = "default_cgroup_roots")]
    pub cgroup_roots: Vec<PathBuf>,
    /// Pod sysctls a restore may set: names, or prefixes ending in `*` (default: the sysctls
    /// kubelet allows without `--allowed-unsafe-sysctls`).
    #[serde(default = "default_sysctls")]
    pub sysctls: Vec<String>,
    /// Localhost seccomp profiles below these directories are accepted (default: kubelet's).
    #[serde(default = "default_seccomp_dirs")]
    pub seccomp_profile_dirs: Vec<PathBuf>,
    /// Container log files may be written below these (default: kubelet's `/var/log/pods`).
    #[serde(default = "default_log_dirs")]
    pub log_directory_prefixes: Vec<PathBuf>,
    /// AppArmor profiles (loaded on the node) a container may name (default: none).
    #[serde(default)]
    pub apparmor_profiles: Vec<String>,
    /// Runtime handlers an archive or a migration peer may choose (default: the handlers
    /// containerd runs with stasis, asked of containerd at restore time). The operator's
    /// `--runtime-handler` is the operator's choice and is not checked.
    #[serde(default)]
    pub runtime_handlers: Option<Vec<String>>,
    /// Registry hosts (`host[:port]`) base images missing on the node may be pulled from,
    /// by the digest the checkpoint recorded (default: none; `--allow-registry` adds one).
    #[serde(default)]
    pub base_image_registries: Vec<String>,
    /// Ed25519 public keys (a PEM file, or a directory of them) one of which must have
    /// signed every archive, checkpoint image and migration this node restores (default:
    /// none, signatures are checked only when `--verify-key` asks).
    #[serde(default)]
    pub trusted_signers: Option<PathBuf>,
    /// `--allow-host-path` prefixes: the operator names exactly what may be mounted, the
    /// prefix itself included (the node's prefixes are directories pods' volumes live below).
    #[serde(skip)]
    pub operator_host_paths: Vec<PathBuf>,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            allow: BTreeSet::new(),
            host_path_prefixes: default_host_paths(),
            cgroup_roots: default_cgroup_roots(),
            sysctls: default_sysctls(),
            seccomp_profile_dirs: default_seccomp_dirs(),
            log_directory_prefixes: default_log_dirs(),
            apparmor_profiles: Vec::new(),
            runtime_handlers: None,
            base_image_registries: Vec::new(),
            trusted_signers: None,
            operator_host_paths: Vec::new(),
        }
    }
}

fn default_log_dirs() -> Vec<PathBuf> {
    vec![PathBuf::from("/var/log/pods")]
}

fn default_seccomp_dirs() -> Vec<PathBuf> {
    vec![PathBuf::from("/var/lib/kubelet/seccomp")]
}

fn default_sysctls() -> Vec<String> {
    [
        "kernel.shm_rmid_forced",
        "net.ipv4.ip_local_port_range",
        "net.ipv4.ip_unprivileged_port_start",
        "net.ipv4.ping_group_range",
        "net.ipv4.tcp_syncookies",
        "net.ipv4.ip_local_reserved_ports",
        "net.ipv4.tcp_keepalive_time",
        "net.ipv4.tcp_fin_timeout",
        "net.ipv4.tcp_keepalive_intvl",
        "net.ipv4.tcp_keepalive_probes",
        "net.ipv4.tcp_rmem",
        "net.ipv4.tcp_wmem",
    ]
    .map(String::from)
    .to_vec()
}

fn default_host_paths() -> Vec<PathBuf> {
    vec![PathBuf::from("/var/lib/kubelet/pods")]
}

fn default_cgroup_roots() -> Vec<PathBuf> {
    vec![PathBuf::from("/kubepods"), PathBuf::from("/stasis")]
}

impl Policy {
    /// The node policy: `path` if given (it must exist), else the default file if present,
    /// else the built-in defaults.
    pub fn load(path: Option<&Path>) -> Result<Policy> {
        let (file, must) = match path {
            Some(p) => (p, true),
            None => (Path::new(DEFAULT_POLICY_FILE), false),
        };
        match std::fs::read(file) {
            Ok(text) => {
                let de = &mut serde_json::Deserializer::from_slice(&text);
                let mut p: Policy = serde_path_to_error::deserialize(de)
                    .with_context(|| format!("restore policy {} is not valid", file.display()))?;
                for prefix in p
                    .host_path_prefixes
                    .iter()
                    .chain(&p.cgroup_roots)
                    .chain(&p.seccomp_profile_dirs)
                    .chain(&p.log_directory_prefixes)
                {
                    if !prefix.is_absolute() {
                        bail!(
                            "restore policy {}: {} is not an absolute path",
                            file.display(),
                            prefix.display()
                        );
                    }
                }
                p.host_path_prefixes
                    .iter_mut()
                    .for_each(|x| *x = lexical(x));
                Ok(p)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !must => Ok(Policy::default()),
            Err(e) => Err(e).with_context(|| format!("read restore policy {}", file.display())),
        }
    }

    /// Adds the operator's `--allow` items and `--allow-host-path` prefixes.
    pub fn widen(&mut self, items: &[String], host_paths: &[PathBuf]) -> Result<()> {
        for s in items.iter().flat_map(|s| s.split(',')) {
            let s = s.trim();
            if !s.is_empty() {
                self.allow.insert(Item::parse(s)?);
            }
        }
        for p in host_paths {
            if !p.is_absolute() {
                bail!("--allow-host-path {}: not an absolute path", p.display());
            }
            self.operator_host_paths.push(lexical(p));
        }
        Ok(())
    }

    fn allows(&self, r: &Request) -> bool {
        if self.allow.contains(&r.item) {
            return true;
        }
        match (r.item, &r.path) {
            // Strictly below: kubelet's directory of all pods is no pod's volume.
            (Item::HostPath, Some(p)) => {
                let p = lexical(Path::new(p));
                below(&p, &self.host_path_prefixes)
                    || self.operator_host_paths.iter().any(|x| p.starts_with(x))
            }
            (Item::LogFile, Some(p)) => {
                let p = lexical(Path::new(p));
                below(&p, &self.host_path_prefixes)
                    || below(&p, &self.log_directory_prefixes)
                    || self.operator_host_paths.iter().any(|x| p.starts_with(x))
            }
            // Strictly below a root: a pod whose cgroup is a root itself would hold every pod
            // below it (a checkpoint of it would freeze them all).
            (Item::CgroupParent, Some(p)) => {
                let p = lexical(Path::new(p));
                self.cgroup_roots
                    .iter()
                    .any(|x| p.starts_with(x) && p != lexical(x))
            }
            // Strictly below: the directory itself is no profile.
            (Item::SeccompLocalhost, Some(p)) => {
                let p = lexical(Path::new(p));
                self.seccomp_profile_dirs
                    .iter()
                    .any(|d| p.starts_with(lexical(d)) && p != lexical(d))
            }
            (Item::ApparmorLocalhost, Some(name)) => self.apparmor_profiles.contains(name),
            (Item::RuntimeHandler, Some(h)) => self
                .runtime_handlers
                .as_ref()
                .is_some_and(|list| list.contains(h)),
            (Item::Sysctls, Some(name)) => {
                self.sysctls
                    .iter()
                    .any(|allowed| match allowed.strip_suffix('*') {
                        Some(prefix) => name.starts_with(prefix),
                        None => name == allowed,
                    })
            }
            _ => false,
        }
    }

    /// Whether `r` is refused under this policy.
    pub fn refuses(&self, r: &Request) -> bool {
        !self.allows(r)
    }

    /// Refuses, listing every item, whatever `requests` holds that the policy does not allow.
    pub fn check(&self, requests: &[Request]) -> Result<()> {
        let refused: Vec<&Request> = requests.iter().filter(|r| !self.allows(r)).collect();
        if refused.is_empty() {
            return Ok(());
        }
        let mut msg = format!(
            "the archive asks for {} thing{} this node's restore policy does not allow:",
            refused.len(),
            if refused.len() == 1 { "" } else { "s" }
        );
        for r in &refused {
            msg.push_str(&format!("\n  - {r}"));
        }
        let by_path = |r: &&&Request| matches!(r.item, Item::HostPath | Item::LogFile);
        let items: BTreeSet<&str> = refused
            .iter()
            .filter(|r| !by_path(r) && r.item != Item::UnknownField)
            .map(|r| r.item.name())
            .collect();
        if refused.iter().any(|r| r.item == Item::UnknownField) {
            msg.push_str(
                "\nnothing was created. Fields this stasisctl does not know cannot be allowed: \
                 restore with a stasisctl that knows them, or remove them from the archive.",
            );
            bail!(msg)
        }
        msg.push_str("\nnothing was created. If you trust this archive, allow them by name:");
        if !items.is_empty() {
            msg.push_str(&format!(
                " --allow {}",
                items.into_iter().collect::<Vec<_>>().join(",")
            ));
        }
        for r in refused.iter().filter(by_path) {
            if let Some(p) = &r.path {
                msg.push_str(&format!(" --allow-host-path {p}"));
            }
        }
        bail!(msg)
    }
}

/// Refuses a host path of container `name` that goes through a symbolic link on the node:
/// the prefix check reads the path as written, containerd would follow the link anywhere. Run
/// right before the container is created, once the volumes restored before it are in place.
/// Components that do not exist yet end the walk (containerd creates them as directories).
pub fn check_host_paths_resolve(
    name: &str,
    log_directory: &str,
    config: &api::ContainerConfig,
) -> Result<()> {
    let log_file = (!config.log_path.is_empty()).then(|| {
        Path::new(log_directory)
            .join(&config.log_path)
            .display()
            .to_string()
    });
    let host_paths = config
        .mounts
        .iter()
        .map(|m| m.host_path.clone())
        .filter(|p| !p.is_empty())
        .chain(log_file);
    for host_path in host_paths {
        let path = lexical(Path::new(&host_path));
        let mut walked = PathBuf::from("/");
        for c in path.components().skip(1) {
            walked.push(c);
            match std::fs::symlink_metadata(&walked) {
                Ok(meta) if meta.file_type().is_symlink() => {
                    let target = std::fs::read_link(&walked)
                        .map(|t| t.display().to_string())
                        .unwrap_or_default();
                    bail!(
                        "container {name}: host path {host_path} goes through the symbolic link {} (to {target}) on this node; a link can point anywhere, so it is refused, nothing of the container was created",
                        walked.display()
                    );
                }
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("container {name}: check host path {host_path}"))
                }
            }
        }
    }
    Ok(())
}

/// `p` (lexical) lies strictly below one of `prefixes`.
fn below(p: &Path, prefixes: &[PathBuf]) -> bool {
    prefixes
        .iter()
        .any(|x| p.starts_with(lexical(x)) && p != lexical(x))
}

/// `a/./b/../c` → `a/c` without touching the file system (the path is the archive's, not ours).
fn lexical(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

const NODE: i32 = api::NamespaceMode::Node as i32;
const UNCONFINED: i32 = api::security_profile::ProfileType::Unconfined as i32;
const LOCALHOST: i32 = api::security_profile::ProfileType::Localhost as i32;

fn selinux(by: &str, options: Option<&api::SeLinuxOption>, out: &mut Vec<Request>) {
    let Some(o) = options else { return };
    let set: Vec<String> = [
        ("user", &o.user),
        ("role", &o.role),
        ("type", &o.r#type),
        ("level", &o.level),
    ]
    .iter()
    .filter(|(_, v)| !v.is_empty())
    .map(|(k, v)| format!("{k} {v}"))
    .collect();
    if !set.is_empty() {
        out.push(Request {
            item: Item::Selinux,
            by: by.to_string(),
            what: format!("SELinux {}", set.join(", ")),
            path: None,
        });
    }
}

fn host_namespaces(by: &str, ns: Option<&api::NamespaceOption>, out: &mut Vec<Request>) {
    let Some(ns) = ns else { return };
    for (mode, name) in [(ns.network, "network"), (ns.pid, "PID"), (ns.ipc, "IPC")] {
        if mode == NODE {
            out.push(Request {
                item: Item::HostNamespaces,
                by: by.to_string(),
                what: format!("the node's {name} namespace"),
                path: None,
            });
        }
    }
}

fn profiles(
    by: &str,
    seccomp: (Option<&api::SecurityProfile>, &str),
    apparmor: (Option<&api::SecurityProfile>, &str),
    out: &mut Vec<Request>,
) {
    let unconfined = |(p, legacy): (Option<&api::SecurityProfile>, &str)| {
        p.map(|p| p.profile_type == UNCONFINED).unwrap_or(false) || legacy == "unconfined"
    };
    if unconfined(seccomp) {
        out.push(Request {
            item: Item::SeccompUnconfined,
            by: by.to_string(),
            what: "no seccomp filter (unconfined)".into(),
            path: None,
        });
    }
    let localhost = match seccomp {
        (Some(p), _) if p.profile_type == LOCALHOST => Some(p.localhost_ref.clone()),
        (_, legacy) => legacy
            .strip_prefix("localhost/")
            .map(|p| format!("/{}", p.trim_start_matches('/'))),
    };
    if let Some(file) = localhost {
        out.push(Request {
            item: Item::SeccompLocalhost,
            by: by.to_string(),
            what: format!("seccomp profile from the node's file {file}"),
            path: Some(file),
        });
    }
    if unconfined(apparmor) {
        out.push(Request {
            item: Item::ApparmorUnconfined,
            by: by.to_string(),
            what: "no AppArmor profile (unconfined)".into(),
            path: None,
        });
    }
    let loaded = match apparmor {
        (Some(p), _) if p.profile_type == LOCALHOST => Some(p.localhost_ref.clone()),
        (_, legacy) => legacy.strip_prefix("localhost/").map(str::to_string),
    };
    if let Some(name) = loaded {
        out.push(Request {
            item: Item::ApparmorLocalhost,
            by: by.to_string(),
            what: format!("AppArmor profile {name:?} loaded on the node"),
            path: Some(name),
        });
    }
}

/// Keys of `value` (the archive's `file`, read as CRI `message`) that the field table does
/// not know, as requests no policy allows.
pub fn unknown_fields(
    by: &str,
    file: &str,
    message: &str,
    value: &serde_json::Value,
) -> Vec<Request> {
    table::unknown_fields(message, value)
        .into_iter()
        .map(|key| Request {
            item: Item::UnknownField,
            by: by.to_string(),
            what: format!("unknown field {key} in {file}"),
            path: None,
        })
        .collect()
}

/// The runtime handler a restore will use, when it was not the operator's choice.
pub fn runtime_handler(handler: &str, named_by: &str) -> Request {
    Request {
        item: Item::RuntimeHandler,
        by: "pod".into(),
        what: format!("runtime handler {handler} named by {named_by}"),
        path: Some(handler.to_string()),
    }
}

/// The registry host of an image reference (`host[:port]/repo@digest`), as docker reads it:
/// the first component when it has a dot, a colon or is `localhost`; else Docker Hub.
pub fn registry_host(reference: &str) -> &str {
    match reference.split_once('/') {
        Some((first, _)) if first.contains(['.', ':']) || first == "localhost" => first,
        _ => "docker.io",
    }
}

impl Policy {
    /// The keys one of which must have signed what this node restores (empty: none required).
    pub fn signers(&self) -> Result<Vec<ed25519_dalek::VerifyingKey>> {
        match &self.trusted_signers {
            Some(p) => crate::seal::load_verifying_keys(p),
            None => Ok(Vec::new()),
        }
    }

    /// Fills `runtime_handlers` from containerd when the policy file left it unset.
    pub fn learn_runtime_handlers(&mut self, node_handlers: Vec<String>) {
        self.runtime_handlers.get_or_insert(node_handlers);
    }

    /// Refuses to pull a base image from a registry the policy does not name.
    pub fn check_registry(&self, container: &str, reference: &str) -> Result<()> {
        let host = registry_host(reference);
        if self.base_image_registries.iter().any(|r| r == host) {
            return Ok(());
        }
        bail!(
            "container {container}: its base image {reference} is not on this node, and registry \
             {host} is not one this node's restore policy pulls base images from \
             (base_image_registries); nothing was created. Pull the image yourself, or allow \
             the registry with --allow-registry {host}"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(json: serde_json::Value) -> api::PodSandboxConfig {
        crate::cri::from_go_json(&json).unwrap()
    }

    fn container(json: serde_json::Value) -> api::ContainerConfig {
        crate::cri::from_go_json(&json).unwrap()
    }

    fn defaults() -> Policy {
        assert!(Policy::load(Some(Path::new("/nonexistent"))).is_err());
        Policy::default()
    }

    #[test]
    fn an_ordinary_pod_asks_for_nothing_refused() {
        let p = pod(serde_json::json!({"metadata": {"name": "web"}}));
        let c = container(serde_json::json!({
            "metadata": {"name": "app"},
            "mounts": [{"container_path": "/data",
                        "host_path": "/var/lib/kubelet/pods/u1/volumes/kubernetes.io~empty-dir/d"}],
            "linux": {"security_context": {"capabilities": {"add_capabilities": ["CHOWN"]}}}
        }));
        let reqs = requests(&p, &[("app".into(), c)]);
        defaults().check(&reqs).unwrap();
    }

    #[test]
    fn host_ports_selinux_and_node_seccomp_files_are_requests() {
        let p = pod(serde_json::json!({
            "port_mappings": [{"container_port": 80, "host_port": 8080},
                              {"container_port": 81}],
            "linux": {"security_context": {"selinux_options": {"type": "spc_t"}}}
        }));
        let c = container(serde_json::json!({
            "metadata": {"name": "app"},
            "linux": {"security_context": {
                "seccomp": {"profile_type": 2, "localhost_ref": "/etc/shadow"}}}
        }));
        let ok = container(serde_json::json!({
            "metadata": {"name": "ok"},
            "linux": {"security_context": {
                "seccomp": {"profile_type": 2,
                            "localhost_ref": "/var/lib/kubelet/seccomp/audit.json"}}}
        }));
        let reqs = requests(&p, &[("app".into(), c), ("ok".into(), ok)]);
        let err = defaults().check(&reqs).unwrap_err().to_string();
        for want in [
            "pod: node port 8080 to container port 80 [host-ports]",
            "pod: SELinux type spc_t [selinux]",
            "container app: seccomp profile from the node's file /etc/shadow [seccomp-localhost]",
        ] {
            assert!(err.contains(want), "{want}: {err}");
        }
        assert!(
            !err.contains("container ok") && !err.contains("port 81"),
            "{err}"
        );
        let legacy = container(serde_json::json!({
            "metadata": {"name": "old"},
            "linux": {"security_context": {"seccomp_profile_path": "localhost//etc/passwd"}}
        }));
        let err = defaults()
            .check(&requests(
                &pod(serde_json::json!({})),
                &[("old".into(), legacy)],
            ))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/etc/passwd [seccomp-localhost]"), "{err}");
    }

    #[test]
    fn apparmor_profiles_handlers_unknown_fields_and_registries_are_allow_listed() {
        let c = container(serde_json::json!({
            "metadata": {"name": "app"},
            "image": {"image": "x", "runtime_handler": "runc"},
            "linux": {"security_context": {
                "apparmor": {"profile_type": 2, "localhost_ref": "unconfined-ish"}}}
        }));
        let legacy = container(serde_json::json!({
            "linux": {"security_context": {"apparmor_profile": "localhost/old-style"}}
        }));
        let mut reqs = requests(
            &pod(serde_json::json!({})),
            &[("app".into(), c), ("old".into(), legacy)],
        );
        reqs.push(runtime_handler("stasis-privileged", "the archive"));
        reqs.extend(unknown_fields(
            "container app",
            "container-config.json",
            "ContainerConfig",
            &serde_json::json!({"linux": {"security_context": {"future_escape": true}}}),
        ));
        let mut p = defaults();
        p.learn_runtime_handlers(vec!["stasis".into()]);
        let err = p.check(&reqs).unwrap_err().to_string();
        for want in [
            "container app: AppArmor profile \"unconfined-ish\" loaded on the node [apparmor-localhost]",
            "container old: AppArmor profile \"old-style\" loaded on the node [apparmor-localhost]",
            "container app: runtime handler runc for its image [runtime-handler]",
            "pod: runtime handler stasis-privileged named by the archive [runtime-handler]",
            "container app: unknown field linux.security_context.future_escape in container-config.json [unknown-field]",
            "cannot be allowed",
        ] {
            assert!(err.contains(want), "{want}: {err}");
        }
        // Named by the policy, all but the unknown field pass; no flag allows that one.
        p.apparmor_profiles = vec!["unconfined-ish".into(), "old-style".into()];
        p.runtime_handlers = Some(vec!["runc".into(), "stasis-privileged".into()]);
        p.widen(&["runtime-handler,apparmor-localhost".into()], &[])
            .unwrap();
        let err = p.check(&reqs).unwrap_err().to_string();
        assert!(
            err.contains("1 thing") && err.contains("future_escape"),
            "{err}"
        );
        reqs.pop();
        p.check(&reqs).unwrap();

        assert_eq!(
            registry_host("127.0.0.1:5000/busybox@sha256:0"),
            "127.0.0.1:5000"
        );
        assert_eq!(registry_host("localhost/busybox@sha256:0"), "localhost");
        assert_eq!(registry_host("library/busybox@sha256:0"), "docker.io");
        assert_eq!(registry_host("busybox@sha256:0"), "docker.io");
        let mut p = defaults();
        let err = p
            .check_registry("app", "evil.example:5000/x@sha256:0")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("container app") && err.contains("--allow-registry evil.example:5000"),
            "{err}"
        );
        p.base_image_registries.push("evil.example:5000".into());
        p.check_registry("app", "evil.example:5000/x@sha256:0")
            .unwrap();
    }

    #[test]
    fn host_paths_through_links_are_refused_where_they_resolve() {
        let d = std::env::temp_dir().join(format!("stasis-links-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("vol")).unwrap();
        std::os::unix::fs::symlink("/", d.join("vol/s")).unwrap();
        let mount = |host: &Path| {
            container(serde_json::json!({
                "metadata": {"name": "b"},
                "mounts": [{"container_path": "/host", "host_path": host.display().to_string()}]
            }))
        };
        check_host_paths_resolve("b", "", &mount(&d.join("vol"))).unwrap();
        check_host_paths_resolve("b", "", &mount(&d.join("vol/not-yet/x"))).unwrap();
        let mut logged = mount(&d.join("vol"));
        logged.log_path = "s/etc/cron.d/x".into();
        let err = check_host_paths_resolve("b", &d.join("vol").display().to_string(), &logged)
            .unwrap_err()
            .to_string();
        assert!(err.contains("symbolic link"), "{err}");
        let err = check_host_paths_resolve("b", "", &mount(&d.join("vol/s/etc")))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("container b") && err.contains("symbolic link") && err.contains("(to /)"),
            "{err}"
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn host_paths_are_strictly_below_a_prefix_and_propagation_is_asked_for() {
        let c = container(serde_json::json!({
            "metadata": {"name": "app"},
            "mounts": [{"container_path": "/pods", "host_path": "/var/lib/kubelet/pods"},
                       {"container_path": "/v", "propagation": 2,
                        "host_path": "/var/lib/kubelet/pods/u1/volumes/kubernetes.io~empty-dir/v"}]
        }));
        let err = defaults()
            .check(&requests(&pod(serde_json::json!({})), &[("app".into(), c)]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("host path /var/lib/kubelet/pods mounted at /pods"),
            "{err}"
        );
        assert!(
            !err.contains("u1/volumes/kubernetes.io~empty-dir/v mounted"),
            "{err}"
        );
        assert!(
            err.contains("bidirectional mount propagation at /v [mount-propagation]"),
            "{err}"
        );
    }

    #[test]
    fn log_files_user_namespaces_and_other_containers_namespaces_are_requests() {
        let p = pod(serde_json::json!({
            "log_directory": "/var/log/pods/default_web_u1",
            "linux": {"security_context": {"namespace_options": {
                "userns_options": {"mode": 0, "uids": [{"host_id": 0, "container_id": 0, "length": 1}]}}}}
        }));
        let ok = container(serde_json::json!({"metadata": {"name": "ok"}, "log_path": "ok/0.log"}));
        let bad = container(serde_json::json!({
            "metadata": {"name": "bad"},
            "log_path": "../../../../etc/cron.d/x",
            "linux": {"security_context": {"namespace_options": {"pid": 3, "target_id": "other"}}},
            "mounts": [{"container_path": "/m", "host_path": "/var/lib/kubelet/pods/u1/volumes/v",
                        "uid_mappings": [{"host_id": 0, "container_id": 0, "length": 1}]}]
        }));
        let reqs = requests(&p, &[("ok".into(), ok), ("bad".into(), bad)]);
        let err = defaults().check(&reqs).unwrap_err().to_string();
        for want in [
            "pod: a user namespace with the archive's id mappings [user-namespaces]",
            "container bad: log file /var/log/pods/default_web_u1/../../../../etc/cron.d/x written by containerd",
            "--allow-host-path /var/log/pods/default_web_u1/../../../../etc/cron.d/x",
            "container bad: the PID namespace of container \"other\" [host-namespaces]",
            "container bad: an id-mapped mount at /m [user-namespaces]",
        ] {
            assert!(err.contains(want), "{want}: {err}");
        }
        assert!(!err.contains("container ok"), "{err}");
    }

    #[test]
    fn a_cgroup_parent_must_be_strictly_below_a_root() {
        let at = |parent: &str| {
            let p = pod(serde_json::json!({"linux": {"cgroup_parent": parent}}));
            defaults().check(&requests(&p, &[]))
        };
        at("/kubepods/burstable/pod1234").unwrap();
        at("/stasis/restored-pod").unwrap();
        for root in [
            "/stasis",
            "/kubepods",
            "/stasis/",
            "/stasis/x/..",
            "/system.slice",
        ] {
            let err = at(root).unwrap_err().to_string();
            assert!(
                err.contains("cgroup parent") && err.contains("[cgroup-parent]"),
                "{root}: {err}"
            );
        }
    }

    #[test]
    fn masked_and_read_only_paths_may_only_add_protection() {
        let with = |masked: &[&str], readonly: &[&str]| {
            let c = container(serde_json::json!({
                "metadata": {"name": "app"},
                "linux": {"security_context": {"masked_paths": masked, "readonly_paths": readonly}}
            }));
            requests(&pod(serde_json::json!({})), &[("app".into(), c)])
        };
        assert!(with(&[], &[]).is_empty(), "empty lists keep the runtime's");
        let mut more: Vec<&str> = DEFAULT_MASKED_PATHS.to_vec();
        more.push("/proc/extra");
        assert!(with(&more, DEFAULT_READONLY_PATHS).is_empty());
        let weaker = with(&["/nonexistent"], &["/nonexistent"]);
        let err = defaults().check(&weaker).unwrap_err().to_string();
        assert!(
            err.contains("container app: /proc/acpi not masked"),
            "{err}"
        );
        assert!(
            err.contains("/proc/kcore not masked") && err.contains("/proc/sys not read-only"),
            "{err}"
        );
        assert!(err.contains("--allow unmasked-proc"), "{err}");
        let mut allowed = defaults();
        allowed.widen(&["unmasked-proc".into()], &[]).unwrap();
        allowed.check(&weaker).unwrap();
    }

    #[test]
    fn sysctls_outside_the_list_are_refused_by_name() {
        let p = pod(serde_json::json!({"linux": {"sysctls": {
            "net.ipv4.ip_local_port_range": "20000 30000",
            "net/core/somaxconn": "1000",
            "kernel.msgmax": "100"
        }}}));
        let reqs = requests(&p, &[]);
        let err = defaults().check(&reqs).unwrap_err().to_string();
        assert!(
            err.contains("pod: sysctl net.core.somaxconn=1000 [sysctls]"),
            "{err}"
        );
        assert!(
            err.contains("pod: sysctl kernel.msgmax=100 [sysctls]"),
            "{err}"
        );
        assert!(!err.contains("ip_local_port_range"), "{err}");
        assert!(err.contains("--allow sysctls"), "{err}");
        let mut wider = defaults();
        wider.sysctls.push("net.core.*".into());
        wider.sysctls.push("kernel.msgmax".into());
        wider.check(&reqs).unwrap();
        let mut by_flag = defaults();
        by_flag.widen(&["sysctls".into()], &[]).unwrap();
        by_flag.check(&reqs).unwrap();
    }

    #[test]
    fn every_widening_item_is_listed_and_flags_allow_them() {
        let p = pod(serde_json::json!({
            "linux": {"cgroup_parent": "/system.slice",
                      "security_context": {"privileged": true,
                                           "namespace_options": {"pid": 2, "network": 2}}}
        }));
        let c = container(serde_json::json!({
            "metadata": {"name": "app"},
            "mounts": [{"container_path": "/host", "host_path": "/"},
                       {"container_path": "/x", "host_path": "/var/lib/kubelet/pods/../../../etc"}],
            "devices": [{"container_path": "/dev/sda", "host_path": "/dev/sda"}],
            "linux": {"security_context": {
                "privileged": true,
                "capabilities": {"add_capabilities": ["SYS_ADMIN", "CHOWN"]},
                "seccomp": {"profile_type": 1},
                "apparmor_profile": "unconfined"}}
        }));
        let reqs = requests(&p, &[("app".into(), c)]);
        let err = defaults().check(&reqs).unwrap_err().to_string();
        for want in [
            "pod: privileged mode",
            "pod: the node's PID namespace",
            "pod: the node's network namespace",
            "pod: cgroup parent /system.slice",
            "container app: privileged mode",
            "added capabilities SYS_ADMIN",
            "no seccomp filter",
            "no AppArmor profile",
            "host path / mounted at /host",
            "host path /var/lib/kubelet/pods/../../../etc",
            "host device /dev/sda",
            "--allow-host-path /",
        ] {
            assert!(err.contains(want), "{want:?} missing in:\n{err}");
        }
        assert!(!err.contains("CHOWN"), "{err}");
        let mut p = defaults();
        p.widen(
            &["privileged,host-namespaces".into(), "capabilities".into()],
            &[PathBuf::from("/")],
        )
        .unwrap();
        let err = p.check(&reqs).unwrap_err().to_string();
        assert!(!err.contains("privileged mode"), "{err}");
        assert!(!err.contains("host path"), "{err}");
        assert!(err.contains("cgroup parent"), "{err}");
        p.widen(
            &["cgroup-parent,devices,seccomp-unconfined,apparmor-unconfined".into()],
            &[],
        )
        .unwrap();
        p.check(&reqs).unwrap();
        assert!(p.widen(&["everything".into()], &[]).is_err());
    }

    #[test]
    fn a_policy_file_is_strict() {
        let dir = std::env::temp_dir().join(format!("stasis-policy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("p.json");
        std::fs::write(
            &f,
            r#"{"allow": ["devices"], "host_path_prefixes": ["/srv/volumes"]}"#,
        )
        .unwrap();
        let p = Policy::load(Some(&f)).unwrap();
        assert!(p.allow.contains(&Item::Devices));
        assert_eq!(p.cgroup_roots, default_cgroup_roots());
        std::fs::write(&f, r#"{"alow": []}"#).unwrap();
        assert!(Policy::load(Some(&f)).is_err());
        std::fs::write(&f, r#"{"host_path_prefixes": ["srv"]}"#).unwrap();
        assert!(Policy::load(Some(&f)).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
