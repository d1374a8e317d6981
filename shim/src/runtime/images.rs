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
    os::unix::fs::OpenOptionsExt,
    path::{Component, Path},
};

use super::{
    criu_image::{self as img, fd_type, fstype},
    restored::{cap_names, Bounds, CAP_NET_RAW, CAP_SETPCAP, CAP_SYS_ADMIN},
    seccomp,
};
use crate::{
    error::{Error, Result},
    spec::ContainerSpec,
};

/// Mount flags (linux/mount.h) as CRIU records them.
const MS_RDONLY: u32 = 1;

/// The device nodes runc creates in every container's /dev (libcontainer's default
/// devices), as (major, minor).
const DEFAULT_DEVICES: &[(u64, u64)] = &[(1, 3), (1, 5), (1, 7), (1, 8), (1, 9), (5, 0), (5, 2)];

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
        Ok(Box::new(
            std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
                .open(self.0.join(name))?,
        ))
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
    let mut names = Vec::new();
    let listed = dir
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

    if names.iter().any(|n| n == "files.img") {
        let files: Vec<img::FileEntry> = images.decode("files.img", img::FILES_MAGIC)?;
        for f in &files {
            if let Some(why) = file_excess(f, expected, &mount_ids) {
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
            if let Some(why) = file_excess(&entry, expected, &mount_ids) {
                return Err(images.refuse(format!("reg-files.img: {why}")));
            }
        }
    }
    for name in names.iter().filter(|n| n.starts_with("tmpfs-")) {
        if let Some(why) = tmpfs_excess(images.open(name)?, expected)
            .map_err(|e| Error::invalid(id, format!("CRIU image {name}: {e}")))?
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

/// What one task's core image asks for beyond `expected`.
fn core_excess(
    core: &img::CoreEntry,
    expected: &Expected,
    filters: &[img::SeccompFilter],
    verdicts: &mut HashMap<u32, std::result::Result<(), String>>,
) -> Vec<String> {
    let mut out = Vec::new();
    let b = &expected.bounds;
    // A zombie is restored only to be reaped; a helper runs CRIU's code alone, and both
    // carry no thread state.
    if core.tc.as_ref().is_some_and(|t| {
        matches!(
            t.task_state,
            img::TASK_DEAD | img::TASK_ZOMBIE | img::TASK_HELPER
        )
    }) && core.thread_core.is_none()
    {
        return out;
    }
    let Some(thread) = &core.thread_core else {
        return vec!["no thread state".into()];
    };
    match &thread.creds {
        None => out.push("no credentials".into()),
        Some(c) => {
            let mut excess: Vec<(u64, Vec<&str>)> = Vec::new();
            for (set, words) in [
                ("inheritable", &c.cap_inh),
                ("permitted", &c.cap_prm),
                ("effective", &c.cap_eff),
                ("bounding", &c.cap_bnd),
                ("ambient", &c.cap_amb),
            ] {
                let extra = img::cap_mask(words) & !b.bounding;
                if extra != 0 {
                    match excess.iter_mut().find(|(m, _)| *m == extra) {
                        Some((_, sets)) => sets.push(set),
                        None => excess.push((extra, vec![set])),
                    }
                }
            }
            for (extra, sets) in excess {
                out.push(format!(
                    "{} capabilities {} beyond the spec's",
                    sets.join(", "),
                    cap_names(extra)
                ));
            }
            if b.no_new_privs && c.no_new_privs != Some(1) {
                out.push("no_new_privs off where the spec sets it".into());
            }
            if c.secbits != 0 && b.bounding & CAP_SETPCAP == 0 {
                out.push(format!("securebits {:#x} without CAP_SETPCAP", c.secbits));
            }
            // Identity: without a way to change it (no_new_privs, and no CAP_SETUID or
            // CAP_SETGID), every id is the spec's user.
            if b.uid_fixed() {
                let ids = [c.uid, c.euid, c.suid, c.fsuid];
                if ids.iter().any(|u| *u != b.uid) {
                    out.push(format!(
                        "uids {ids:?} where the spec's user is {} and nobody may change it",
                        b.uid
                    ));
                }
            }
            if b.gid_fixed() {
                let ids = [c.gid, c.egid, c.sgid, c.fsgid];
                if ids.iter().any(|g| *g != b.gid) {
                    out.push(format!(
                        "gids {ids:?} where the spec's group is {} and nobody may change it",
                        b.gid
                    ));
                }
                let extra: Vec<u32> = c
                    .groups
                    .iter()
                    .copied()
                    .filter(|g| *g != b.gid && !expected.groups.contains(g))
                    .collect();
                if !extra.is_empty() {
                    out.push(format!("supplementary groups {extra:?} beyond the spec's"));
                }
            }
            if let Some(p) = c.lsm_profile.as_deref().filter(|p| !p.is_empty()) {
                let mine = expected.lsm.as_deref().unwrap_or("");
                // AppArmor reports the mode after the name: "name (enforce)".
                let name = p.split(" (").next().unwrap_or(p);
                if name != mine && p != mine {
                    out.push(format!("LSM profile {p:?} where the spec has {mine:?}"));
                }
            }
            if c.lsm_sockcreate.as_deref().is_some_and(|s| !s.is_empty()) {
                out.push("an LSM socket-creation label".into());
            }
            if c.apparmor_data.as_ref().is_some_and(|d| !d.is_empty()) {
                out.push("AppArmor policy to load".into());
            }
        }
    }
    let mode = thread
        .seccomp_mode
        .or(core.tc.as_ref().and_then(|t| t.old_seccomp_mode))
        .unwrap_or(0);
    let filter = thread
        .seccomp_filter
        .or(core.tc.as_ref().and_then(|t| t.old_seccomp_filter));
    if let Some(profile) = &expected.seccomp {
        if mode != 2 {
            out.push(format!("seccomp mode {mode} where the spec has a filter"));
        } else {
            let index = filter.unwrap_or(u32::MAX);
            let verdict = verdicts
                .entry(index)
                .or_insert_with(|| seccomp::chain_refuses_what(filters, index, profile));
            if let Err(why) = verdict {
                out.push(format!("a seccomp filter weaker than the spec's: {why}"));
            }
        }
    }
    out
}

/// Paths on this node, for the masked and read-only paths a fresh container has.
trait Node {
    fn exists(&self, path: &str) -> bool;
}

struct Host;

impl Node for Host {
    fn exists(&self, path: &str) -> bool {
        std::fs::symlink_metadata(path).is_ok()
    }
}

/// What the mount tree of the images holds beyond the spec's.
fn mounts_excess(mounts: &[img::MntEntry], e: &Expected, node: &dyn Node) -> Vec<String> {
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
        let typ = match m.fstype {
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
        };
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

/// What one open file of the images reaches beyond the container.
fn file_excess(f: &img::FileEntry, e: &Expected, mounts: &HashSet<i32>) -> Option<String> {
    let caps = e.bounds.bounding;
    match f.r#type {
        fd_type::REG => {
            let reg = f.reg.as_ref()?;
            if reg.ext == Some(true) {
                return Some(format!("file {:?} from outside the images", reg.name));
            }
            if !stays_inside(&reg.name) {
                return Some(format!("file {:?}, a path leaving its mount", reg.name));
            }
            match reg.mnt_id {
                Some(m) if mounts.contains(&m) => None,
                _ => Some(format!(
                    "file {:?} on mount {}, not one of the container's",
                    reg.name,
                    reg.mnt_id.unwrap_or(-1)
                )),
            }
        }
        fd_type::PIPE
        | fd_type::FIFO
        | fd_type::INETSK
        | fd_type::UNIXSK
        | fd_type::EVENTFD
        | fd_type::EVENTPOLL
        | fd_type::INOTIFY
        | fd_type::SIGNALFD
        | fd_type::TTY
        | fd_type::TIMERFD
        | fd_type::MEMFD
        | fd_type::PIDFD
        | fd_type::NETLINKSK => None,
        fd_type::PACKETSK if caps & CAP_NET_RAW != 0 => None,
        fd_type::FANOTIFY if caps & CAP_SYS_ADMIN != 0 => None,
        other => Some(format!(
            "an open file of type {} (a namespace, tun device, BPF map, fanotify or packet socket, or one CRIU takes from outside), which this container may not open",
            other
        )),
    }
}

/// The most a tmpfs image may unpack to.
const MAX_TMPFS: u64 = 8 << 30;

/// What a tmpfs CRIU restores from its tar (`tmpfs-*.tar.gz.img`) holds beyond the spec:
/// device nodes other than the spec's and runc's defaults. Read as a stream, bounded.
fn tmpfs_excess(file: impl Read, e: &Expected) -> std::result::Result<Option<String>, String> {
    // Compressed, at most the largest image parsed; unpacked, at most what a tmpfs CRIU
    // would fill could hold (a bomb is cut off and refused as truncated).
    let gz = flate2::read::GzDecoder::new(file.take(img::MAX_IMAGE));
    let mut tar = tar::Archive::new(gz.take(MAX_TMPFS));
    for entry in tar.entries().map_err(|e| e.to_string())? {
        let entry = entry.map_err(|e| e.to_string())?;
        let kind = entry.header().entry_type();
        if kind.is_character_special() || kind.is_block_special() {
            let major = entry
                .header()
                .device_major()
                .ok()
                .flatten()
                .unwrap_or(u32::MAX);
            let minor = entry
                .header()
                .device_minor()
                .ok()
                .flatten()
                .unwrap_or(u32::MAX);
            let dev = (u64::from(major), u64::from(minor));
            if kind.is_block_special()
                || !(DEFAULT_DEVICES.contains(&dev) || e.devices.contains(&dev))
            {
                return Ok(Some(format!(
                    "device node {} ({major}:{minor}) that the spec does not have",
                    entry
                        .path()
                        .map(|p| p.display().to_string())
                        .unwrap_or_default()
                )));
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests;
