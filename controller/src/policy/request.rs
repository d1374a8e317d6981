use super::*;

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
