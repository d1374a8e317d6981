//! Pod sysctls: what `PodSandboxConfig.linux.sysctls` asks for, plus what containerd's CRI
//! gives every pod with a network namespace of its own (`enable_unprivileged_ports`,
//! `enable_unprivileged_icmp`). They are written in the pod's namespaces by the pause launcher,
//! before any container starts. Only sysctls the kernel keeps per namespace, and only for a
//! namespace the pod owns, are accepted: anything else would change the node.

use std::collections::BTreeMap;

use k8s_cri::v1::{NamespaceMode, PodSandboxConfig};

use crate::error::{Error, Result};

/// The namespaces a pod has of its own (not the node's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OwnNamespaces {
    pub net: bool,
    pub ipc: bool,
}

impl OwnNamespaces {
    pub fn of(config: &PodSandboxConfig, netns: &str) -> Self {
        let ns = config
            .linux
            .as_ref()
            .and_then(|l| l.security_context.as_ref())
            .and_then(|s| s.namespace_options.as_ref());
        let mode = |m: Option<i32>| m.unwrap_or_default();
        OwnNamespaces {
            net: !netns.is_empty() && mode(ns.map(|n| n.network)) != NamespaceMode::Node as i32,
            ipc: mode(ns.map(|n| n.ipc)) != NamespaceMode::Node as i32,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    Net,
    Ipc,
    Uts,
}

/// The kernel's per-namespace sysctls (the same set runc accepts): the System V IPC limits
/// and POSIX queues of the IPC namespace, everything under net, and the NIS domain name.
fn scope(name: &str) -> Option<Scope> {
    const IPC: &[&str] = &[
        "kernel.msgmax",
        "kernel.msgmnb",
        "kernel.msgmni",
        "kernel.sem",
        "kernel.shmall",
        "kernel.shmmax",
        "kernel.shmmni",
        "kernel.shm_rmid_forced",
    ];
    if IPC.contains(&name) || name.starts_with("fs.mqueue.") {
        Some(Scope::Ipc)
    } else if name.starts_with("net.") {
        Some(Scope::Net)
    } else if name == "kernel.domainname" {
        Some(Scope::Uts)
    } else {
        None
    }
}

use stasis_api::layout::dotted_sysctl as dotted;

/// The file under /proc/sys for a dotted name, or None when a component could leave the
/// sysctl tree (empty, `.`, `..`) or the name holds something no sysctl has.
fn proc_path(dotted: &str) -> Option<String> {
    let parts: Vec<String> = dotted.split('.').map(|p| p.replace('/', ".")).collect();
    let bad = |p: &String| {
        p.is_empty()
            || p == "."
            || p == ".."
            || !p
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '@' | ':'))
    };
    if parts.len() < 2 || parts.iter().any(bad) {
        return None;
    }
    Some(format!("/proc/sys/{}", parts.join("/")))
}

/// One sysctl to write: where, what, and its name for errors.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Setting {
    pub name: String,
    pub path: String,
    pub value: String,
}

/// What containerd's CRI gives every pod that has a network namespace of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CriDefaults {
    pub unprivileged_ports: bool,
    pub unprivileged_icmp: bool,
}

impl Default for CriDefaults {
    /// containerd 2.x's own defaults, used when its configuration cannot be read.
    fn default() -> Self {
        CriDefaults {
            unprivileged_ports: true,
            unprivileged_icmp: true,
        }
    }
}

impl CriDefaults {
    /// Reads `enableUnprivilegedPorts`/`enableUnprivilegedICMP` from the `config` that CRI's
    /// verbose Status reports (JSON of containerd's CRI runtime configuration).
    pub fn from_status_config(json: &str) -> Option<Self> {
        let v: serde_json::Value = serde_json::from_str(json).ok()?;
        let flag = |k: &str| v.get(k).and_then(|b| b.as_bool());
        let defaults = CriDefaults::default();
        if flag("enableUnprivilegedPorts").is_none() && flag("enableUnprivilegedICMP").is_none() {
            return None;
        }
        Some(CriDefaults {
            unprivileged_ports: flag("enableUnprivilegedPorts")
                .unwrap_or(defaults.unprivileged_ports),
            unprivileged_icmp: flag("enableUnprivilegedICMP").unwrap_or(defaults.unprivileged_icmp),
        })
    }

    /// Asks containerd (its gRPC socket, which serves CRI) how its CRI is configured. A shim
    /// in sandbox mode is never told, so it asks the way `crictl info` does.
    pub async fn learn(pod: &str) -> Self {
        let Ok(address) = std::env::var("GRPC_ADDRESS") else {
            log::warn!(
                "pod {pod}: GRPC_ADDRESS unset, containerd's CRI defaults assumed for sysctls"
            );
            return Self::default();
        };
        match tokio::time::timeout(std::time::Duration::from_secs(5), cri_config(&address)).await
        {
            Ok(Ok(json)) => Self::from_status_config(&json).unwrap_or_else(|| {
                log::warn!("pod {pod}: CRI status has no unprivileged port/ICMP settings, defaults assumed");
                Self::default()
            }),
            Ok(Err(e)) => {
                log::warn!("pod {pod}: cannot read CRI's configuration ({e}), defaults assumed");
                Self::default()
            }
            Err(_) => {
                log::warn!("pod {pod}: CRI status did not answer in 5 s, defaults assumed");
                Self::default()
            }
        }
    }
}

async fn cri_config(address: &str) -> std::result::Result<String, String> {
    use hyper_util::rt::TokioIo;
    use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
    let path = address.trim_start_matches("unix://").to_string();
    let channel = tonic::transport::Endpoint::try_from("http://[::]:50051")
        .map_err(|e| e.to_string())?
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await
        .map_err(|e| e.to_string())?;
    let status = RuntimeServiceClient::new(channel)
        .status(k8s_cri::v1::StatusRequest { verbose: true })
        .await
        .map_err(|e| e.message().to_string())?
        .into_inner();
    status
        .info
        .get("config")
        .cloned()
        .ok_or_else(|| "no \"config\" in the verbose status".to_string())
}

/// The sysctls a pod gets: CRI's defaults for a pod with its own network namespace, then what
/// the pod asks for (which wins, as in containerd's own sandboxes).
pub fn wanted(
    config: &PodSandboxConfig,
    own: OwnNamespaces,
    defaults: CriDefaults,
) -> BTreeMap<String, String> {
    let mut all = BTreeMap::new();
    if own.net {
        if defaults.unprivileged_ports {
            all.insert("net.ipv4.ip_unprivileged_port_start".into(), "0".into());
        }
        if defaults.unprivileged_icmp {
            all.insert("net.ipv4.ping_group_range".into(), "0 2147483647".into());
        }
    }
    if let Some(linux) = &config.linux {
        for (k, v) in &linux.sysctls {
            all.insert(dotted(k), v.clone());
        }
    }
    all
}

/// Checks every sysctl against the namespaces the pod owns; the first refused one fails the
/// pod, naming it (as runc's create does).
pub fn plan(
    pod: &str,
    wanted: &BTreeMap<String, String>,
    own: OwnNamespaces,
) -> Result<Vec<Setting>> {
    let mut out = Vec::new();
    for (name, value) in wanted {
        let refuse = |why: &str| Error::invalid(pod, format!("sysctl {name}={value:?}: {why}"));
        let path = proc_path(name).ok_or_else(|| refuse("not a valid sysctl name"))?;
        match scope(name) {
            None => return Err(refuse("not namespaced: it would change the node")),
            Some(Scope::Net) if !own.net => {
                return Err(refuse(
                    "a network sysctl, but the pod uses the node's network namespace",
                ))
            }
            Some(Scope::Ipc) if !own.ipc => {
                return Err(refuse(
                    "an IPC sysctl, but the pod uses the node's IPC namespace (hostIPC)",
                ))
            }
            _ => {}
        }
        if value.contains(['\n', '\0']) {
            return Err(refuse("the value holds a newline or NUL"));
        }
        out.push(Setting {
            name: name.clone(),
            path,
            value: value.clone(),
        });
    }
    Ok(out)
}

/// Refuses any sysctl at all: for a runtime that does not apply them, saying yes would
/// silently give the pod the kernel's defaults.
pub fn refuse_any(pod: &str, config: &PodSandboxConfig, runtime: &str) -> Result<()> {
    let asked: Vec<&String> = config
        .linux
        .as_ref()
        .map(|l| l.sysctls.keys().collect())
        .unwrap_or_default();
    if asked.is_empty() {
        return Ok(());
    }
    Err(Error::invalid(
        pod,
        format!("the pod asks for sysctls {asked:?}, which the {runtime} runtime does not apply"),
    ))
}

/// Writes each setting, in the calling process's namespaces (the pause launcher's).
pub fn apply(settings: &[Setting]) -> std::result::Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    for s in settings {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&s.path);
        let mut file = match file {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(format!(
                    "sysctl {}: the kernel has no such sysctl in the pod's namespaces",
                    s.name
                ))
            }
            Err(e) => return Err(format!("sysctl {}: open {}: {e}", s.name, s.path)),
        };
        file.write_all(s.value.as_bytes())
            .map_err(|e| format!("sysctl {}={:?}: {e}", s.name, s.value))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const OWN: OwnNamespaces = OwnNamespaces {
        net: true,
        ipc: true,
    };

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn namespaced_sysctls_are_planned_with_their_proc_files() {
        let plan = plan(
            "p",
            &map(&[
                ("kernel.shm_rmid_forced", "1"),
                ("net.ipv4.ip_local_port_range", "20000 30000"),
            ]),
            OWN,
        )
        .unwrap();
        assert_eq!(plan[0].path, "/proc/sys/kernel/shm_rmid_forced");
        assert_eq!(plan[1].path, "/proc/sys/net/ipv4/ip_local_port_range");
    }

    #[test]
    fn slash_names_keep_dots_inside_components() {
        let name = dotted("net/ipv4/conf/eth0.100/forwarding");
        assert_eq!(name, "net.ipv4.conf.eth0/100.forwarding");
        assert_eq!(
            proc_path(&name).unwrap(),
            "/proc/sys/net/ipv4/conf/eth0.100/forwarding"
        );
    }

    #[test]
    fn node_wide_and_escaping_sysctls_are_refused() {
        for name in ["kernel.hostname", "vm.overcommit_memory", "kernel.modprobe"] {
            let e = plan("p", &map(&[(name, "1")]), OWN)
                .unwrap_err()
                .to_string();
            assert!(e.contains("not namespaced") && e.contains(name), "{e}");
        }
        for name in ["net/../../kernel/modprobe", "net..x", "net.ipv4.a b"] {
            let e = plan("p", &map(&[(&dotted(name), "1")]), OWN).unwrap_err();
            assert!(
                e.to_string().contains("not a valid sysctl name"),
                "{name}: {e}"
            );
        }
    }

    #[test]
    fn sysctls_of_the_nodes_namespaces_are_refused() {
        let host_ipc = OwnNamespaces {
            net: true,
            ipc: false,
        };
        let e = plan("p", &map(&[("kernel.msgmax", "100")]), host_ipc).unwrap_err();
        assert!(e.to_string().contains("hostIPC"), "{e}");
        let host_net = OwnNamespaces {
            net: false,
            ipc: true,
        };
        let e = plan("p", &map(&[("net.core.somaxconn", "100")]), host_net).unwrap_err();
        assert!(e.to_string().contains("node's network namespace"), "{e}");
    }

    #[test]
    fn cri_defaults_come_first_and_the_pod_wins() {
        let mut linux = k8s_cri::v1::LinuxPodSandboxConfig::default();
        linux
            .sysctls
            .insert("net.ipv4.ip_unprivileged_port_start".into(), "80".into());
        let config = PodSandboxConfig {
            linux: Some(linux),
            ..Default::default()
        };
        let all = wanted(&config, OWN, CriDefaults::default());
        assert_eq!(all["net.ipv4.ip_unprivileged_port_start"], "80");
        assert_eq!(all["net.ipv4.ping_group_range"], "0 2147483647");
        let off = CriDefaults {
            unprivileged_ports: false,
            unprivileged_icmp: false,
        };
        assert_eq!(wanted(&PodSandboxConfig::default(), OWN, off).len(), 0);
        let no_net = OwnNamespaces {
            net: false,
            ipc: true,
        };
        assert!(wanted(&PodSandboxConfig::default(), no_net, CriDefaults::default()).is_empty());
    }

    #[test]
    fn cri_status_config_is_read() {
        let d = CriDefaults::from_status_config(
            r#"{"enableUnprivilegedPorts":false,"enableUnprivilegedICMP":true,"x":1}"#,
        )
        .unwrap();
        assert!(!d.unprivileged_ports && d.unprivileged_icmp);
        assert!(CriDefaults::from_status_config("{}").is_none());
    }
}
