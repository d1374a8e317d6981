//! The files CRI in shim mode expects the sandbox to provide: it bind-mounts hostname, hosts,
//! resolv.conf and /dev/shm into containers only if they exist where it looks.

use std::path::{Path, PathBuf};

use crate::{
    error::{Error, Result},
    state::{pod::ShmMount, Pod},
    util::mounts,
};

/// The pod's files live in its bundle, which containerd leaves alone while the shim runs;
/// CRI's paths are links to them. containerd 2.1.9 removes `<root|state>/io.containerd.grpc.v1.cri/
/// sandboxes/<id>` of a shim-mode pod when it restarts: with the files themselves there, every
/// container's /etc/hostname, /etc/hosts and /etc/resolv.conf would turn into deleted files
/// (a later checkpoint of them then fails to restore) and /dev/shm would be unmounted.
const POD_ETC: &str = "pod-etc";
const POD_SHM: &str = "pod-shm";

/// Unmounts the pod's /dev/shm wherever it is now, and removes its directory. containerd
/// renames a dead shim's bundle (`<id>` to `.<id>`) before removing it: a clean-up that came
/// after the rename found nothing at the recorded path, and the mount stayed for good in a
/// directory nobody removes. The kernel's id of the mount still finds it. Twice is harmless.
pub fn remove_shm(shm: &ShmMount) {
    crate::task::unmount(&shm.path);
    let _ = std::fs::remove_dir(&shm.path);
    let Some(id) = shm.id else { return };
    // A rename may move it between our read of the table and the unmount: look again.
    for _ in 0..3 {
        let Some(now) = mounts::table()
            .into_iter()
            .find(|m| m.id == id && m.fstype == "tmpfs" && moved_by_rename(&shm.path, &m.point))
        else {
            return;
        };
        crate::task::unmount(&now.point);
        let _ = std::fs::remove_dir(&now.point);
    }
}

/// Whether `now` is where a rename of the bundle (`<dir>/<id>` to `<dir>/.<id>`) put the
/// mount recorded at `recorded`. The kernel gives a freed mount id to the next mount at once:
/// the id alone could name another pod's /dev/shm, its place cannot.
fn moved_by_rename(recorded: &Path, now: &Path) -> bool {
    let (Some(bundle), Some(name)) = (recorded.parent(), recorded.file_name()) else {
        return false;
    };
    let (Some(dir), Some(id)) = (bundle.parent(), bundle.file_name()) else {
        return false;
    };
    let mut hidden = std::ffi::OsString::from(".");
    hidden.push(id);
    now == recorded || now == dir.join(hidden).join(name)
}

/// Creates what CRI in shim mode expects the sandbox to provide (it bind-mounts them only if
/// they exist): hostname, hosts and resolv.conf, and a tmpfs for /dev/shm, in the pod's
/// bundle, linked from where CRI looks. Returns the files and links made, and the shm mount.
pub fn write_pod_files(pod: &Pod) -> Result<(Vec<PathBuf>, Option<ShmMount>)> {
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
            let id = mounts::id_at(&shm);
            if id.is_none() {
                log::warn!(
                    "pod {}: its /dev/shm mount is not in the mount table; a clean-up after a crash finds it only at {}",
                    pod.id,
                    shm.display()
                );
            }
            Some(ShmMount { path: shm, id })
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

#[cfg(test)]
mod tests {
    use super::*;

    /// What containerd does to a dead shim's bundle before our clean-up may come: renames it.
    /// The clean-up still finds the shm mount by its id and removes it.
    #[test]
    fn a_shm_mount_moved_by_a_rename_of_its_bundle_is_still_removed() {
        if !nix::unistd::geteuid().is_root() {
            assert!(
                std::env::var_os("CI").is_none(),
                "the mount test needs root under CI"
            );
            return;
        }
        let dir = std::env::temp_dir().join(format!(
            "stasis-shm-{}-{}",
            std::process::id(),
            crate::util::random_suffix().unwrap()
        ));
        let (bundle, renamed) = (dir.join("pod"), dir.join(".pod"));
        let path = bundle.join(POD_SHM);
        std::fs::create_dir_all(&path).unwrap();
        nix::mount::mount(
            Some("shm"),
            &path,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some("size=64k"),
        )
        .unwrap();
        let shm = ShmMount {
            path: path.clone(),
            id: mounts::id_at(&path),
        };
        let id = shm.id.expect("the new mount is in the table");
        std::fs::rename(&bundle, &renamed).unwrap();
        remove_shm(&shm);
        let left: Vec<_> = mounts::table().into_iter().filter(|m| m.id == id).collect();
        let moved = renamed.join(POD_SHM);
        if !left.is_empty() {
            crate::task::unmount(&moved);
        }
        assert!(left.is_empty(), "the mount stayed: {left:?}");
        assert!(!moved.exists(), "its directory stayed");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn only_the_renamed_bundle_is_taken_for_the_recorded_place() {
        let recorded = Path::new("/s/k8s.io/abc/pod-shm");
        assert!(moved_by_rename(recorded, recorded));
        assert!(moved_by_rename(
            recorded,
            Path::new("/s/k8s.io/.abc/pod-shm")
        ));
        // Another pod's /dev/shm under a mount id the kernel gave again.
        assert!(!moved_by_rename(
            recorded,
            Path::new("/s/k8s.io/abd/pod-shm")
        ));
        assert!(!moved_by_rename(
            recorded,
            Path::new("/s/k8s.io/.abd/pod-shm")
        ));
        assert!(!moved_by_rename(
            recorded,
            Path::new("/t/k8s.io/.abc/pod-shm")
        ));
        assert!(!moved_by_rename(
            recorded,
            Path::new("/s/k8s.io/.abc/other")
        ));
    }
}
