//! The images' mount tree (and a restored task's mount table) against the spec's mounts.

use std::collections::HashSet;

use super::{clean, fstype, img, stays_inside, Expected, MS_RDONLY};

/// Paths on this node, for the masked and read-only paths a fresh container has.
pub(super) trait Node {
    fn exists(&self, path: &str) -> bool;
}

pub(super) struct Host;

impl Node for Host {
    fn exists(&self, path: &str) -> bool {
        std::fs::symlink_metadata(path).is_ok()
    }
}

/// What the mount tree of the images holds beyond the spec's.
pub(super) fn mounts_excess(
    mounts: &[img::MntEntry],
    e: &Expected,
    node: &dyn Node,
) -> Vec<String> {
    let mut out = Vec::new();
    let spec_type = |dest: &str| {
        e.mounts
            .iter()
            .rev()
            .find(|(d, _, _)| d == dest)
            .map(|(_, t, ro)| (t.as_str(), *ro))
    };
    let under_cgroup = |p: &str| {
        e.mounts.iter().any(|(d, t, _)| {
            (t == "cgroup" || t == "cgroup2") && (p == d || p.starts_with(&format!("{d}/")))
        })
    };
    let ids: HashSet<u32> = mounts.iter().map(|m| m.mnt_id).collect();
    let mut roots = 0;
    for m in mounts {
        let at = &m.mountpoint;
        if !stays_inside(at) {
            out.push(format!("a mount at {at:?}"));
            continue;
        }
        let at = clean(at);
        if !ids.contains(&m.parent_mnt_id) {
            roots += 1;
            if at != "/" {
                out.push(format!("a second root mount at {at}"));
            }
            continue;
        }
        let ro = m.flags & MS_RDONLY != 0;
        // runc's tmpfs at a cgroup v1 mount point is writable (only the hierarchies below it
        // are read-only), as in a fresh container.
        let cgroup_tmpfs = m.fstype == fstype::TMPFS && under_cgroup(&at);
        let want_ro =
            !cgroup_tmpfs && (spec_type(&at).is_some_and(|(_, ro)| ro) || e.readonly.contains(&at));
        if want_ro && !ro {
            out.push(format!("{at} writable where the spec mounts it read-only"));
        }
        if let Some(key) = &m.ext_key {
            // runc maps external mounts by their destination to the spec's sources; a key
            // it does not map makes CRIU fail, one it maps is the spec's own mount.
            let key = clean(key);
            // runc masks a file by binding /dev/null over it, keyed by /dev/null.
            let mask = key == "/dev/null" && e.masked.contains(&at);
            if spec_type(&key).is_none() && !under_cgroup(&key) && !e.masked.contains(&key) && !mask
            {
                out.push(format!(
                    "an external mount {key} at {at} that the spec does not have"
                ));
            }
            continue;
        }
        let typ = type_name(m);
        let allowed = match (typ, spec_type(&at)) {
            (t, Some((s, _))) if t == s => true,
            // runc mounts a tmpfs at a cgroup v1 mount point and each hierarchy below it.
            ("tmpfs" | "cgroup" | "cgroup2", _) if under_cgroup(&at) => true,
            // Masked directories are covered with a read-only tmpfs.
            ("tmpfs", _) if e.masked.contains(&at) => ro,
            // Read-only paths are bind mounts of themselves, read-only.
            ("proc" | "sysfs", _) if e.readonly.contains(&at) || e.masked.contains(&at) => ro,
            _ => false,
        };
        if !allowed {
            out.push(format!("a {typ} mount at {at} that the spec does not have"));
        }
    }
    if roots != 1 {
        out.push(format!("{roots} root mounts"));
    }
    // A masked or read-only path the node has must be covered in the images as it is in a
    // fresh container (runc skips those the kernel does not have).
    let covered: HashSet<String> = mounts.iter().map(|m| clean(&m.mountpoint)).collect();
    for p in e.masked.iter().chain(e.readonly.iter()) {
        let in_proc_or_sys = p.starts_with("/proc/") || p.starts_with("/sys/");
        if in_proc_or_sys && node.exists(p) && !covered.contains(p) {
            out.push(format!(
                "{p} is neither masked nor read-only as the spec has it"
            ));
        }
    }
    out
}

/// The file system type of a mount of the images, as the spec names it.
fn type_name(m: &img::MntEntry) -> &str {
    match m.fstype {
        fstype::PROC => "proc",
        fstype::SYSFS => "sysfs",
        fstype::TMPFS => "tmpfs",
        fstype::DEVPTS => "devpts",
        fstype::MQUEUE => "mqueue",
        fstype::CGROUP => "cgroup",
        fstype::CGROUP2 => "cgroup2",
        fstype::DEVTMPFS => "devtmpfs",
        fstype::OVERLAYFS => "overlay",
        fstype::AUTO => m.fsname.as_deref().unwrap_or("auto"),
        _ => "an unsupported file system",
    }
}

/// What a restored task's mount table (`/proc/<pid>/mountinfo`) holds beyond the spec, by
/// the rules of the images' mount tree: bind mounts of the spec (and masks over masked
/// paths) stand for the external mounts runc maps.
pub fn mountinfo_excess(table: &str, e: &Expected) -> Vec<String> {
    let mut mounts = Vec::new();
    for line in table.lines() {
        // id parent major:minor root mountpoint options [optional…] - fstype source super
        let (head, tail) = match line.split_once(" - ") {
            Some(x) => x,
            None => continue,
        };
        let f: Vec<&str> = head.split(' ').collect();
        let t: Vec<&str> = tail.split(' ').collect();
        if f.len() < 6 || t.is_empty() {
            continue;
        }
        let unescape = |p: &str| {
            p.replace("\\040", " ")
                .replace("\\011", "\t")
                .replace("\\012", "\n")
                .replace("\\134", "\\")
        };
        let at = unescape(f[4]);
        let typ = t[0];
        let code = match typ {
            "proc" => fstype::PROC,
            "sysfs" => fstype::SYSFS,
            "tmpfs" => fstype::TMPFS,
            "devpts" => fstype::DEVPTS,
            "mqueue" => fstype::MQUEUE,
            "cgroup" => fstype::CGROUP,
            "cgroup2" => fstype::CGROUP2,
            "devtmpfs" => fstype::DEVTMPFS,
            "overlay" => fstype::OVERLAYFS,
            _ => fstype::AUTO,
        };
        let at_clean = clean(&at);
        let spec_bind = e
            .mounts
            .iter()
            .any(|(d, t, _)| *d == at_clean && (t == "bind" || t == "rbind" || t == "none"));
        let cgroup_hierarchy = code == fstype::CGROUP || code == fstype::CGROUP2;
        let external = spec_bind
            // runc masks files with /dev/null (whatever the node's /dev is) and
            // directories with a read-only tmpfs.
            || e.masked.contains(&at_clean)
            || (cgroup_hierarchy && at_clean != "/sys/fs/cgroup");
        mounts.push(img::MntEntry {
            fstype: code,
            mnt_id: f[0].parse().unwrap_or(0),
            parent_mnt_id: f[1].parse().unwrap_or(0),
            flags: if f[5].split(',').any(|o| o == "ro") {
                MS_RDONLY
            } else {
                0
            },
            root: unescape(f[3]),
            mountpoint: at,
            source: t.get(1).unwrap_or(&"").to_string(),
            fsname: Some(typ.to_string()),
            ext_key: external.then(|| at_clean.clone()),
            ..Default::default()
        });
    }
    mounts_excess(&mounts, e, &Host)
        .into_iter()
        .map(|x| format!("mount table: {x}"))
        .collect()
}
