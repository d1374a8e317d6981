//! A container's CRIU images are checked against its spec before root CRIU reads them. The
//! images come from the archive, which is untrusted: they carry every task's credentials,
//! seccomp filters, namespaces, mount tree and open files, and CRIU restores what they say.
//! A restore is refused, naming the container, the task and the item, when the images ask
//! for more than a fresh container of the same (policy-checked) spec gets:
//! - image files: only names CRIU writes, with the magic of their name; never those that
//!   reach outside the container (user or network namespaces of their own, namespace files,
//!   external files, LSM policy, binfmt handlers, BPF maps, tun devices);
//! - credentials: capability sets within the spec's bounding set, no_new_privs where the spec
//!   sets it, ids the spec's user could reach, no LSM profile but the spec's, no securebits
//!   without CAP_SETPCAP;
//! - seccomp: where the spec has a filter, every task runs one that refuses at least what the
//!   spec's refuses (the images' BPF is run for every system call number, see `seccomp`);
//! - namespaces: every task in the container's own (no nested ones);
//! - mounts: only the spec's, of the spec's types, read-only where the spec says so, masked
//!   and read-only paths in place; no other proc, sysfs, cgroup, devtmpfs or device mount;
//! - files: opened on the container's own mounts, by paths that stay inside them; no device
//!   node in a tmpfs CRIU restores beyond the spec's and the runtime's defaults.
//!
//! What CRIU made of the images is checked again after the restore (`restored`).

use std::{
    collections::{HashMap, HashSet},
    io::Read,
    path::{Component, Path},
};

mod creds;
mod files;
mod mounts;

pub use mounts::mountinfo_excess;

use super::{
    criu_image::{self as img, fd_type, fstype},
    restored::{self, Bounds},
    seccomp,
};
use crate::{
    error::{Error, Result},
    spec::ContainerSpec,
};
use creds::core_excess;
use files::{file_excess, tmpfs_excess};
use mounts::{mounts_excess, Host};

/// Mount flags (linux/mount.h) as CRIU records them.
const MS_RDONLY: u32 = 1;

/// What a fresh container of the spec gets, as the image checks need it.
#[derive(Debug, Clone)]
pub struct Expected {
    pub bounds: Bounds,
    pub groups: Vec<u32>,
    pub lsm: Option<String>,
    /// (destination, type, read-only) of every spec mount.
    pub mounts: Vec<(String, String, bool)>,
    pub masked: Vec<String>,
    pub readonly: Vec<String>,
    pub devices: Vec<(u64, u64)>,
    pub seccomp: Option<seccomp::Profile>,
}

impl Expected {
    pub fn of(spec: &ContainerSpec) -> Self {
        let doc = spec.document();
        let strings = |p: &str| -> Vec<String> {
            doc.pointer(p)
                .and_then(|v| v.as_array())
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default()
        };
        let mounts = doc
            .pointer("/mounts")
            .and_then(|v| v.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|m| {
                        let dest = clean(m.get("destination")?.as_str()?);
                        let typ = m.get("type").and_then(|t| t.as_str()).unwrap_or("bind");
                        let ro = m
                            .get("options")
                            .and_then(|o| o.as_array())
                            .is_some_and(|o| o.iter().any(|x| x.as_str() == Some("ro")));
                        Some((dest, typ.to_string(), ro))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let devices = doc
            .pointer("/linux/devices")
            .and_then(|v| v.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|d| Some((d.get("major")?.as_u64()?, d.get("minor")?.as_u64()?)))
                    .collect()
            })
            .unwrap_or_default();
        let lsm = ["/process/apparmorProfile", "/process/selinuxLabel"]
            .iter()
            .find_map(|p| doc.pointer(p).and_then(|v| v.as_str()))
            .filter(|s| !s.is_empty())
            .map(str::to_string);
        Expected {
            bounds: Bounds::of(spec),
            groups: doc
                .pointer("/process/user/additionalGids")
                .and_then(|v| v.as_array())
                .map(|a| {
                    a.iter()
                        .filter_map(|g| g.as_u64().map(|g| g as u32))
                        .collect()
                })
                .unwrap_or_default(),
            lsm,
            mounts,
            masked: strings("/linux/maskedPaths")
                .iter()
                .map(|p| clean(p))
                .collect(),
            readonly: strings("/linux/readonlyPaths")
                .iter()
                .map(|p| clean(p))
                .collect(),
            devices,
            seccomp: doc
                .pointer("/linux/seccomp")
                .filter(|s| !s.is_null())
                .map(seccomp::Profile::from_spec),
        }
    }
}

/// A path without a trailing slash or `.` parts.
fn clean(p: &str) -> String {
    let parts: Vec<&str> = p
        .split('/')
        .filter(|s| !s.is_empty() && *s != ".")
        .collect();
    format!("/{}", parts.join("/"))
}

/// Whether `p` is an absolute path that no `..` can take out of where it is resolved.
fn stays_inside(p: &str) -> bool {
    p.starts_with('/')
        && Path::new(p)
            .components()
            .all(|c| !matches!(c, Component::ParentDir))
}

/// Where a container's images are: a directory, or (for the fuzz target and unit tests)
/// files held in memory.
pub trait ImageDir {
    /// Every entry's name and whether it is a regular file.
    fn entries(&self) -> std::io::Result<Vec<(String, bool)>>;
    fn open(&self, name: &str) -> std::io::Result<Box<dyn Read + '_>>;
}

struct OnDisk<'a>(&'a Path);

impl ImageDir for OnDisk<'_> {
    fn entries(&self) -> std::io::Result<Vec<(String, bool)>> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(self.0)? {
            let e = e?;
            out.push((
                e.file_name().to_string_lossy().into_owned(),
                e.file_type()?.is_file(),
            ));
        }
        Ok(out)
    }

    fn open(&self, name: &str) -> std::io::Result<Box<dyn Read + '_>> {
        Ok(Box::new(stasis_api::private::open_nofollow(
            &self.0.join(name),
        )?))
    }
}

/// Image files held in memory, by name.
pub struct InMemory(pub Vec<(String, Vec<u8>)>);

impl ImageDir for InMemory {
    fn entries(&self) -> std::io::Result<Vec<(String, bool)>> {
        Ok(self.0.iter().map(|(n, _)| (n.clone(), true)).collect())
    }

    fn open(&self, name: &str) -> std::io::Result<Box<dyn Read + '_>> {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, b)| Box::new(b.as_slice()) as Box<dyn Read + '_>)
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotFound))
    }
}

/// The image files of a container (the small ones the checks parse read whole), by name.
struct Images<'a> {
    id: &'a str,
    dir: &'a dyn ImageDir,
}

impl Images<'_> {
    fn refuse(&self, what: impl std::fmt::Display) -> Error {
        Error::invalid(
            self.id,
            format!(
                "the checkpoint's CRIU images ask for more than a fresh container of this spec gets: {what}; nothing was restored"
            ),
        )
    }

    fn open(&self, name: &str) -> Result<Box<dyn Read + '_>> {
        self.dir
            .open(name)
            .map_err(|e| Error::io(self.id, format!("open image {name}"), e))
    }

    fn read(&self, name: &str) -> Result<Vec<u8>> {
        let mut bytes = Vec::new();
        self.open(name)?
            .take(img::MAX_IMAGE + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| Error::io(self.id, format!("read image {name}"), e))?;
        if bytes.len() as u64 > img::MAX_IMAGE {
            return Err(self.refuse(format!(
                "image {name} is larger than {} MiB",
                img::MAX_IMAGE >> 20
            )));
        }
        Ok(bytes)
    }

    fn decode<M: prost::Message + Default>(&self, name: &str, magic: u32) -> Result<Vec<M>> {
        let bytes = self.read(name)?;
        img::decode_all(&bytes, magic)
            .map_err(|e| Error::invalid(self.id, format!("CRIU image {name} is corrupt: {e}")))
    }
}

/// Checks the CRIU images in `dir` against what a fresh container of `expected` gets.
pub fn check(id: &str, dir: &Path, expected: &Expected) -> Result<()> {
    check_in(id, &OnDisk(dir), expected)
}

/// The tasks (their ids in the container's PID namespace) that were stopped when they were
/// dumped. A restore leaves every task stopped until the check of what CRIU restored has
/// passed; these stay stopped after it, as they were.
pub fn stopped_at_dump(id: &str, dir: &Path) -> Result<std::collections::HashSet<u32>> {
    let images = Images {
        id,
        dir: &OnDisk(dir),
    };
    let tasks: Vec<img::PstreeEntry> = images.decode("pstree.img", img::PSTREE_MAGIC)?;
    let mut stopped = std::collections::HashSet::new();
    for task in &tasks {
        let cores: Vec<img::CoreEntry> =
            match images.decode(&format!("core-{}.img", task.pid), img::CORE_MAGIC) {
                Ok(c) => c,
                // The pre-check has read every core image: one missing here is a zombie's.
                Err(_) => continue,
            };
        if cores
            .first()
            .and_then(|c| c.tc.as_ref())
            .is_some_and(|t| t.task_state == img::TASK_STOPPED)
        {
            stopped.insert(task.pid);
        }
    }
    Ok(stopped)
}

/// [`check`] over images from any source.
pub fn check_in(id: &str, dir: &dyn ImageDir, expected: &Expected) -> Result<()> {
    let images = Images { id, dir };
    let names = list_images(&images)?;
    let root_ids = check_namespaces(&images, &names)?;
    check_tasks(&images, &names, expected, &root_ids)?;
    let mount_ids = check_mounts(&images, &names, expected)?;
    check_files(&images, &names, expected, &mount_ids)
}

/// The names of the images CRIU reads, sorted, once each is a regular file that CRIU writes,
/// not refused, with the magic of its name.
fn list_images(images: &Images) -> Result<Vec<String>> {
    let id = images.id;
    let mut names = Vec::new();
    let listed = images
        .dir
        .entries()
        .map_err(|e| Error::io(id, "list the checkpoint images", e))?;
    for (name, regular) in listed {
        if !name.ends_with(".img") {
            // CRIU opens only names of its own, all ending in .img; runc's descriptors.json,
            // logs and stasis's records are read by their own checks.
            continue;
        }
        if !regular {
            return Err(images.refuse(format!("image {name} is not a regular file")));
        }
        let Some(t) = img::image_type(&name) else {
            return Err(images.refuse(format!("{name}, an image CRIU never writes")));
        };
        if let Some(why) = t.refused {
            return Err(images.refuse(format!("image {name}: {why}")));
        }
        if let img::Kind::Proto(magic) = t.kind {
            let got = img::head_magic(&mut images.open(&name)?)
                .map_err(|e| Error::invalid(id, format!("CRIU image {name}: {e}")))?;
            if got != magic {
                return Err(Error::invalid(
                    id,
                    format!("CRIU image {name}: its magic {got:#x} is not that of its name"),
                ));
            }
        }
        names.push(name);
    }
    names.sort();
    Ok(names)
}

/// The root namespaces of the inventory, once every network and pid namespace the images
/// hold is the pod's (external).
fn check_namespaces(images: &Images, names: &[String]) -> Result<img::TaskKobjIdsEntry> {
    let id = images.id;
    let inventory: Vec<img::InventoryEntry> =
        images.decode("inventory.img", img::INVENTORY_MAGIC)?;
    let root_ids = inventory
        .first()
        .and_then(|i| i.root_ids.clone())
        .ok_or_else(|| Error::invalid(id, "CRIU image inventory.img names no root namespaces"))?;
    // Namespaces CRIU would otherwise make from the images are the pod's, passed by runc.
    for prefix in ["netns-", "pidns-"] {
        for name in names.iter().filter(|n| n.starts_with(prefix)) {
            let external = if prefix == "netns-" {
                images
                    .decode::<img::NetnsEntry>(name, img::NETNS_MAGIC)?
                    .iter()
                    .all(|e| e.ext_key.is_some())
            } else {
                images
                    .decode::<img::PidnsEntry>(name, img::PIDNS_MAGIC)?
                    .iter()
                    .all(|e| e.ext_key.is_some())
            };
            if !external {
                return Err(images.refuse(format!(
                    "{name}: a {} namespace of its own instead of the pod's",
                    if prefix == "netns-" { "network" } else { "pid" }
                )));
            }
        }
    }
    Ok(root_ids)
}

/// Every task's and thread's core image against the spec, and every task in the
/// container's own namespaces (the first task's; the root user namespace).
fn check_tasks(
    images: &Images,
    names: &[String],
    expected: &Expected,
    root_ids: &img::TaskKobjIdsEntry,
) -> Result<()> {
    let id = images.id;
    let tasks: Vec<img::PstreeEntry> = images.decode("pstree.img", img::PSTREE_MAGIC)?;
    let mut seen_ns: Option<(u32, img::TaskKobjIdsEntry)> = None;
    let filters = if names.iter().any(|n| n == "seccomp.img") {
        images
            .decode::<img::SeccompEntry>("seccomp.img", img::SECCOMP_MAGIC)?
            .into_iter()
            .flat_map(|e| e.seccomp_filters)
            .collect()
    } else {
        Vec::new()
    };
    let mut verdicts: HashMap<u32, std::result::Result<(), String>> = HashMap::new();
    for task in &tasks {
        for &tid in task.threads.iter().chain(std::iter::once(&task.pid)) {
            let name = format!("core-{tid}.img");
            if !names.contains(&name) {
                // A zombie's thread list holds no real id (CRIU does not read it back); a
                // live thread without its core image makes CRIU fail on its own.
                if tid == task.pid {
                    return Err(Error::invalid(id, format!("CRIU images lack {name}")));
                }
                continue;
            }
            let cores: Vec<img::CoreEntry> = images.decode(&name, img::CORE_MAGIC)?;
            let core = cores
                .first()
                .ok_or_else(|| Error::invalid(id, format!("CRIU image {name} is empty")))?;
            let comm = core.tc.as_ref().map(|t| t.comm.as_str()).unwrap_or("?");
            let who = format!("task {tid} ({comm})");
            let excess = core_excess(core, expected, &filters, &mut verdicts);
            if !excess.is_empty() {
                return Err(images.refuse(format!("{who}: {}", excess.join("; "))));
            }
            let ids = match &core.ids {
                Some(ids) => Some(ids.clone()),
                None if tid == task.pid => {
                    let name = format!("ids-{tid}.img");
                    if names.contains(&name) {
                        images
                            .decode::<img::TaskKobjIdsEntry>(&name, img::IDS_MAGIC)?
                            .into_iter()
                            .next()
                    } else {
                        None
                    }
                }
                None => None,
            };
            if let Some(ids) = ids {
                if ids.user_ns_id != root_ids.user_ns_id {
                    return Err(images.refuse(format!("{who}: a user namespace of its own")));
                }
                match &seen_ns {
                    None => seen_ns = Some((tid, ids)),
                    Some((first, same)) if *same != ids => {
                        return Err(images.refuse(format!(
                        "{who}: namespaces other than those of task {first}, the container's own"
                    )))
                    }
                    Some(_) => {}
                }
            }
        }
    }
    Ok(())
}

/// The one mount tree of the images against the spec's mounts; returns its mount ids.
fn check_mounts(images: &Images, names: &[String], expected: &Expected) -> Result<HashSet<i32>> {
    let mut mount_ids = HashSet::new();
    let mnt_images: Vec<&String> = names
        .iter()
        .filter(|n| n.starts_with("mountpoints-"))
        .collect();
    if mnt_images.len() > 1 {
        return Err(images.refuse("more than one mount namespace"));
    }
    for name in mnt_images {
        let mounts: Vec<img::MntEntry> = images.decode(name, img::MNTS_MAGIC)?;
        let excess = mounts_excess(&mounts, expected, &Host);
        if !excess.is_empty() {
            return Err(images.refuse(format!("{name}: {}", excess.join("; "))));
        }
        mount_ids.extend(mounts.iter().map(|m| m.mnt_id as i32));
    }
    Ok(mount_ids)
}

/// The open files of the images (on the container's mounts `mount_ids`) and the contents of
/// the tmpfs mounts CRIU restores.
fn check_files(
    images: &Images,
    names: &[String],
    expected: &Expected,
    mount_ids: &HashSet<i32>,
) -> Result<()> {
    if names.iter().any(|n| n == "files.img") {
        let files: Vec<img::FileEntry> = images.decode("files.img", img::FILES_MAGIC)?;
        for f in &files {
            if let Some(why) = file_excess(f, expected, mount_ids) {
                return Err(images.refuse(format!("files.img: {why}")));
            }
        }
    }
    if names.iter().any(|n| n == "reg-files.img") {
        let files: Vec<img::RegFileEntry> = images.decode("reg-files.img", img::REG_FILES_MAGIC)?;
        for f in files {
            let entry = img::FileEntry {
                r#type: fd_type::REG,
                id: f.id,
                reg: Some(f),
            };
            if let Some(why) = file_excess(&entry, expected, mount_ids) {
                return Err(images.refuse(format!("reg-files.img: {why}")));
            }
        }
    }
    for name in names.iter().filter(|n| n.starts_with("tmpfs-")) {
        if let Some(why) = tmpfs_excess(images.open(name)?, expected)
            .map_err(|e| Error::invalid(images.id, format!("CRIU image {name}: {e}")))?
        {
            return Err(images.refuse(format!("{name}: {why}")));
        }
    }
    Ok(())
}

/// A typical container's expectations (containerd's default capabilities, no_new_privs,
/// a seccomp profile, masked and read-only paths), for the fuzz target.
pub fn fuzz_expected() -> Expected {
    Expected {
        bounds: Bounds {
            bounding: 0xa804_25fb,
            no_new_privs: true,
            seccomp: true,
            uid: 0,
            gid: 0,
        },
        groups: vec![],
        lsm: None,
        mounts: [
            ("/proc", "proc"),
            ("/dev", "tmpfs"),
            ("/dev/pts", "devpts"),
            ("/sys", "sysfs"),
            ("/sys/fs/cgroup", "cgroup"),
            ("/etc/hosts", "bind"),
        ]
        .iter()
        .map(|(d, t)| (d.to_string(), t.to_string(), false))
        .collect(),
        masked: vec!["/proc/kcore".into(), "/proc/acpi".into()],
        readonly: vec!["/proc/sys".into()],
        devices: vec![],
        seccomp: Some(seccomp::Profile::from_spec(&serde_json::json!({
            "defaultAction": "SCMP_ACT_ERRNO",
            "syscalls": [{"names": ["read", "write", "exit_group"], "action": "SCMP_ACT_ALLOW"}]
        }))),
    }
}

/// Debug builds only: `<STASIS_CONFIG_DIR>/test-skip-image-check` turns the check off, so
/// that one end-to-end test can show the second check (`restored`) refuse on its own.
/// Release builds have no such switch.
pub fn test_switch_off() -> bool {
    cfg!(debug_assertions)
        && std::env::var_os("STASIS_CONFIG_DIR")
            .is_some_and(|d| Path::new(&d).join("test-skip-image-check").exists())
}

#[cfg(test)]
mod tests;
