//! The files CRI in shim mode expects the sandbox to provide: it bind-mounts hostname, hosts,
//! resolv.conf and /dev/shm into containers only if they exist where it looks.

use std::path::PathBuf;

use crate::{
    error::{Error, Result},
    state::Pod,
};

/// The pod's files live in its bundle, which containerd leaves alone while the shim runs;
/// CRI's paths are links to them. containerd 2.1.9 removes `<root|state>/io.containerd.grpc.v1.cri/
/// sandboxes/<id>` of a shim-mode pod when it restarts: with the files themselves there, every
/// container's /etc/hostname, /etc/hosts and /etc/resolv.conf would turn into deleted files
/// (a later checkpoint of them then fails to restore) and /dev/shm would be unmounted.
const POD_ETC: &str = "pod-etc";
const POD_SHM: &str = "pod-shm";

/// Creates what CRI in shim mode expects the sandbox to provide (it bind-mounts them only if
/// they exist): hostname, hosts and resolv.conf, and a tmpfs for /dev/shm, in the pod's
/// bundle, linked from where CRI looks. Returns the files and links made, and the shm mount.
pub fn write_pod_files(pod: &Pod) -> Result<(Vec<PathBuf>, Option<PathBuf>)> {
    let (state, root) = pod.containerd_dirs();
    let mut files = Vec::new();
    if root.is_some() {
        let etc = pod.bundle.join(POD_ETC);
        std::fs::create_dir_all(&etc).map_err(|e| Error::io(&pod.id, "create pod files dir", e))?;
        let hostname = format!("{}\n", pod.config.hostname);
        let hosts = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n".to_string();
        let resolv = match &pod.config.dns_config {
            Some(dns) if !dns.servers.is_empty() || !dns.searches.is_empty() => {
                let mut s = String::new();
                for srv in &dns.servers {
                    s.push_str(&format!("nameserver {srv}\n"));
                }
                if !dns.searches.is_empty() {
                    s.push_str(&format!("search {}\n", dns.searches.join(" ")));
                }
                if !dns.options.is_empty() {
                    s.push_str(&format!("options {}\n", dns.options.join(" ")));
                }
                s
            }
            _ => std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default(),
        };
        for (name, text) in [
            ("hostname", hostname),
            ("hosts", hosts),
            ("resolv.conf", resolv),
        ] {
            let path = etc.join(name);
            std::fs::write(&path, text)
                .map_err(|e| Error::io(&pod.id, format!("write {name}"), e))?;
            files.push(path);
        }
    }
    let shm = match state {
        Some(_) => {
            let shm = pod.bundle.join(POD_SHM);
            std::fs::create_dir_all(&shm).map_err(|e| Error::io(&pod.id, "create shm dir", e))?;
            use nix::mount::{mount, MsFlags};
            mount(
                Some("shm"),
                &shm,
                Some("tmpfs"),
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                Some("mode=1777,size=65536k"),
            )
            .map_err(|e| Error::io(&pod.id, "mount pod /dev/shm", e.into()))?;
            Some(shm)
        }
        None => None,
    };
    files.extend(link_pod_files(pod));
    Ok((files, shm))
}

/// (Re)creates CRI's links to the pod's files, where missing: at the start and whenever CRI
/// asks for the pod's status (so a containerd restart's clean-up is repaired for the
/// containers created after it). Returns the links.
pub fn link_pod_files(pod: &Pod) -> Vec<PathBuf> {
    let (state, root) = pod.containerd_dirs();
    let mut links = Vec::new();
    let mut wanted = Vec::new();
    if let Some(root) = root {
        let dir = root
            .join("io.containerd.grpc.v1.cri/sandboxes")
            .join(&pod.id);
        for name in ["hostname", "hosts", "resolv.conf"] {
            wanted.push((dir.join(name), pod.bundle.join(POD_ETC).join(name)));
        }
    }
    if let Some(state) = state {
        let dir = state
            .join("io.containerd.grpc.v1.cri/sandboxes")
            .join(&pod.id);
        wanted.push((dir.join("shm"), pod.bundle.join(POD_SHM)));
    }
    for (link, target) in wanted {
        if !target.exists() {
            continue;
        }
        if link.symlink_metadata().is_err() {
            if let Some(dir) = link.parent() {
                let _ = std::fs::create_dir_all(dir);
            }
            if let Err(e) = std::os::unix::fs::symlink(&target, &link) {
                log::warn!("pod {}: link {}: {e}", pod.id, link.display());
            }
        }
        links.push(link);
    }
    links
}
