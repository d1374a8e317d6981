//! Every field of the CRI configs an archive carries, in one place: each is destructured by
//! name, so a field added to CRI does not compile until it is classified here, and each is
//! either copied as is (with the reason it widens nothing), or turned into a [`Request`] the
//! node policy must allow. The classes themselves are in the field table (`table.rs`), which
//! also refuses keys this CRI version does not know.

use super::{dropped_protections, host_namespaces, profiles, selinux, Item, Request, DEFAULT_CAPS};
use crate::cri::api;
use stasis_api::layout::dotted_sysctl;

fn request(out: &mut Vec<Request>, item: Item, by: &str, what: String, path: Option<String>) {
    out.push(Request {
        item,
        by: by.to_string(),
        what,
        path,
    });
}

/// Everything the pod and container configs of an archive ask for beyond an ordinary pod.
pub fn requests(
    pod: &api::PodSandboxConfig,
    containers: &[(String, api::ContainerConfig)],
) -> Vec<Request> {
    let mut out = Vec::new();
    let api::PodSandboxConfig {
        metadata: _,    // renamed by the restore
        hostname: _,    // the pod's UTS namespace
        dns_config: _,  // written into the pod's own resolv.conf
        labels: _,      // informational
        annotations: _, // the shim reads only the restore annotation, which the restore sets
        windows: _,     // not read on Linux
        log_directory,
        port_mappings,
        linux,
    } = pod;
    for m in port_mappings {
        let api::PortMapping {
            protocol: _,
            container_port,
            host_port,
            host_ip,
        } = m;
        if *host_port != 0 {
            let ip = if host_ip.is_empty() {
                String::new()
            } else {
                format!("{host_ip}:")
            };
            request(
                &mut out,
                Item::HostPorts,
                "pod",
                format!("node port {ip}{host_port} to container port {container_port}"),
                None,
            );
        }
    }
    if let Some(linux) = linux {
        linux_pod(linux, &mut out);
    }
    for (name, c) in containers {
        container(name, log_directory, c, &mut out);
    }
    out
}

// The deprecated string fields still reach the runtime from older clients: read them too.
#[allow(deprecated)]
fn linux_pod(linux: &api::LinuxPodSandboxConfig, out: &mut Vec<Request>) {
    let api::LinuxPodSandboxConfig {
        overhead: _,  // limits
        resources: _, // limits
        cgroup_parent,
        security_context,
        sysctls,
    } = linux;
    for (name, value) in sysctls {
        let dotted = dotted_sysctl(name);
        request(
            out,
            Item::Sysctls,
            "pod",
            format!("sysctl {dotted}={value}"),
            Some(dotted),
        );
    }
    if !cgroup_parent.is_empty() {
        request(
            out,
            Item::CgroupParent,
            "pod",
            format!("cgroup parent {cgroup_parent}"),
            Some(cgroup_parent.clone()),
        );
    }
    if let Some(sc) = security_context {
        let api::LinuxSandboxSecurityContext {
            run_as_user: _,  // identities inside the pod, as a fresh pod may choose
            run_as_group: _, // (host files are reached only through checked host paths)
            supplemental_groups: _,
            supplemental_groups_policy: _,
            readonly_rootfs: _, // only narrows
            namespace_options,
            selinux_options,
            privileged,
            seccomp,
            apparmor,
            seccomp_profile_path,
        } = sc;
        if *privileged {
            request(out, Item::Privileged, "pod", "privileged mode".into(), None);
        }
        namespaces("pod", namespace_options.as_ref(), out);
        selinux("pod", selinux_options.as_ref(), out);
        profiles(
            "pod",
            (seccomp.as_ref(), seccomp_profile_path),
            (apparmor.as_ref(), ""),
            out,
        );
    }
}

/// The node's namespaces, another container's (TARGET), and user namespace mappings (the
/// node chooses those, never an archive).
fn namespaces(by: &str, ns: Option<&api::NamespaceOption>, out: &mut Vec<Request>) {
    let Some(opts) = ns else { return };
    host_namespaces(by, ns, out);
    let api::NamespaceOption {
        network: _,
        pid,
        ipc: _,
        target_id,
        userns_options,
    } = opts;
    if *pid == api::NamespaceMode::Target as i32 {
        request(
            out,
            Item::HostNamespaces,
            by,
            format!("the PID namespace of container {target_id:?}"),
            None,
        );
    }
    if let Some(u) = userns_options {
        let api::UserNamespace { mode, uids, gids } = u;
        if *mode != api::NamespaceMode::Node as i32 || !uids.is_empty() || !gids.is_empty() {
            request(
                out,
                Item::UserNamespaces,
                by,
                "a user namespace with the archive's id mappings".into(),
                None,
            );
        }
    }
}

#[allow(deprecated)]
fn container(name: &str, log_directory: &str, c: &api::ContainerConfig, out: &mut Vec<Request>) {
    let by = format!("container {name}");
    let api::ContainerConfig {
        metadata: _,
        image,
        command: _,
        args: _,
        working_dir: _,
        envs: _,
        labels: _,
        annotations: _, // the restore and volume annotations are set or checked by the restore
        stdin: _,
        stdin_once: _,
        tty: _,
        windows: _,
        log_path,
        mounts,
        devices,
        cdi_devices,
        linux,
    } = c;
    if let Some(api::ImageSpec {
        image: _, // replaced by the digest config.dump records (check_base_images)
        annotations: _,
        user_specified_image: _,
        runtime_handler,
    }) = image
    {
        if !runtime_handler.is_empty() {
            request(
                out,
                Item::RuntimeHandler,
                &by,
                format!("runtime handler {runtime_handler} for its image"),
                Some(runtime_handler.clone()),
            );
        }
    }
    // containerd creates and writes the log file on the node: it is a host path too.
    if !log_path.is_empty() {
        let file = std::path::Path::new(log_directory).join(log_path);
        request(
            out,
            Item::LogFile,
            &by,
            format!("log file {} written by containerd", file.display()),
            Some(file.display().to_string()),
        );
    }
    for m in mounts {
        mount(&by, m, out);
    }
    for d in devices {
        let api::Device {
            container_path,
            host_path,
            permissions: _,
        } = d;
        request(
            out,
            Item::Devices,
            &by,
            format!("host device {host_path} at {container_path}"),
            None,
        );
    }
    for d in cdi_devices {
        request(
            out,
            Item::Devices,
            &by,
            format!("CDI device {}", d.name),
            None,
        );
    }
    let Some(linux) = linux else { return };
    let api::LinuxContainerConfig {
        resources: _, // limits
        security_context,
    } = linux;
    if let Some(sc) = security_context {
        security_context_requests(&by, sc, out);
    }
}

/// One mount of a container: host paths, propagation to the node, id-mapped mounts.
fn mount(by: &str, m: &api::Mount, out: &mut Vec<Request>) {
    let api::Mount {
        readonly: _,
        recursive_read_only: _,
        selinux_relabel: _, // of a host path the policy allowed
        image: _,           // an image's content, read-only
        container_path,
        host_path,
        propagation,
        uid_mappings,
        gid_mappings,
    } = m;
    if !host_path.is_empty() {
        request(
            out,
            Item::HostPath,
            by,
            format!("host path {host_path} mounted at {container_path}"),
            Some(host_path.clone()),
        );
    }
    // Mounts made in the container would appear on the node.
    if *propagation == api::MountPropagation::PropagationBidirectional as i32 {
        request(
            out,
            Item::MountPropagation,
            by,
            format!("bidirectional mount propagation at {container_path}"),
            None,
        );
    }
    if !uid_mappings.is_empty() || !gid_mappings.is_empty() {
        request(
            out,
            Item::UserNamespaces,
            by,
            format!("an id-mapped mount at {container_path}"),
            None,
        );
    }
}

/// A container's Linux security context: privileges, namespaces, SELinux, masked paths,
/// capabilities, seccomp and AppArmor.
#[allow(deprecated)]
fn security_context_requests(
    by: &str,
    sc: &api::LinuxContainerSecurityContext,
    out: &mut Vec<Request>,
) {
    let api::LinuxContainerSecurityContext {
        run_as_user: _, // identities inside the container, as a fresh one may choose
        run_as_group: _,
        run_as_username: _,
        supplemental_groups: _,
        supplemental_groups_policy: _,
        readonly_rootfs: _, // only narrows
        no_new_privs: _,    // off is what a fresh container allowing escalation gets
        apparmor_profile,
        capabilities,
        privileged,
        namespace_options,
        selinux_options,
        masked_paths,
        readonly_paths,
        seccomp,
        apparmor,
        seccomp_profile_path,
    } = sc;
    if *privileged {
        request(out, Item::Privileged, by, "privileged mode".into(), None);
    }
    namespaces(by, namespace_options.as_ref(), out);
    selinux(by, selinux_options.as_ref(), out);
    let dropped = dropped_protections(masked_paths, readonly_paths);
    if !dropped.is_empty() {
        request(out, Item::UnmaskedProc, by, dropped.join(", "), None);
    }
    if let Some(caps) = capabilities {
        let api::Capability {
            drop_capabilities: _, // only narrows
            add_capabilities,
            add_ambient_capabilities,
        } = caps;
        let added: Vec<&str> = add_capabilities
            .iter()
            .chain(add_ambient_capabilities)
            .map(|c| c.trim_start_matches("CAP_"))
            .filter(|c| !DEFAULT_CAPS.contains(&c.to_ascii_uppercase().as_str()))
            .collect();
        if !added.is_empty() {
            request(
                out,
                Item::Capabilities,
                by,
                format!("added capabilities {}", added.join(", ")),
                None,
            );
        }
    }
    profiles(
        by,
        (seccomp.as_ref(), seccomp_profile_path),
        (apparmor.as_ref(), apparmor_profile),
        out,
    );
}
