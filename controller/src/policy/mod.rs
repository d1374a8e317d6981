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

mod paths;
mod request;

pub use paths::check_host_paths_resolve;
use paths::{below, dropped_protections, lexical};
pub use request::{Item, Request};

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
mod tests;
