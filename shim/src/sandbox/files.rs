//! The files CRI in shim mode expects the sandbox to provide: it bind-mounts hostname, hosts,
//! resolv.conf and /dev/shm into containers only if they exist where it looks.

use std::path::PathBuf;

use crate::{
    error::{Error, Result},
    state::Pod,
};

/// Creates what CRI in shim mode expects the sandbox to provide (it bind-mounts them only if
/// they exist): hostname, hosts and resolv.conf under the CRI root, and a tmpfs for /dev/shm
/// under the CRI state dir.
pub fn write_pod_files(pod: &Pod) -> Result<(Vec<PathBuf>, Option<PathBuf>)> {
    let (state, root) = pod.containerd_dirs();
    let mut files = Vec::new();
    if let Some(root) = root {
        let dir = root
            .join("io.containerd.grpc.v1.cri/sandboxes")
            .join(&pod.id);
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&pod.id, "create pod files dir", e))?;
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
            let path = dir.join(name);
            std::fs::write(&path, text)
                .map_err(|e| Error::io(&pod.id, format!("write {name}"), e))?;
            files.push(path);
        }
    }
    let shm = match state {
        Some(state) => {
            let shm = state
                .join("io.containerd.grpc.v1.cri/sandboxes")
                .join(&pod.id)
                .join("shm");
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
    Ok((files, shm))
}
