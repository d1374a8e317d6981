//! Cgroup access for the shim: the freezer, statistics, OOM events and the pod cgroup.

pub mod freezer;

use cgroups_rs::fs::{hierarchies, Cgroup};
use protobuf::{well_known_types::any::Any, Message};

use crate::error::{Error, Result};

/// Cgroup metrics of the cgroup at `path` (a runtime-spec cgroupsPath), in the Any form
/// containerd's `ctr t metrics` and CRI decode.
pub fn metrics(id: &str, path: &str) -> Result<Any> {
    if path.is_empty() {
        return Err(Error::precondition(id, "container has no cgroup path"));
    }
    let hierarchy = hierarchies::auto();
    let v2 = hierarchy.v2();
    let cg = Cgroup::load(hierarchy, path.trim_start_matches('/'));
    let (type_url, value) = if v2 {
        let m = containerd_shim::cgroup::collect_metrics_v2(&cg)
            .map_err(|e| Error::other(id, "collect cgroup v2 metrics", e))?;
        ("io.containerd.cgroups.v2.Metrics", m.write_to_bytes())
    } else {
        let m = containerd_shim::cgroup::collect_metrics(&cg)
            .map_err(|e| Error::other(id, "collect cgroup metrics", e))?;
        ("io.containerd.cgroups.v1.Metrics", m.write_to_bytes())
    };
    let value = value.map_err(|e| Error::other(id, "encode metrics", e))?;
    Ok(Any {
        type_url: type_url.to_string(),
        value,
        ..Default::default()
    })
}

/// Calls `on_oom` each time the kernel's OOM killer acts in the memory cgroup at `path`
/// (cgroup v1: an eventfd registered on `memory.oom_control`). Ends when the cgroup goes away.
/// On cgroup v2 or without a memory cgroup this does nothing.
pub fn watch_oom(id: &str, path: &str, on_oom: impl Fn() + Send + 'static) -> Result<()> {
    use std::{io::Read, os::fd::AsRawFd};
    let dir = std::path::Path::new("/sys/fs/cgroup/memory").join(path.trim_start_matches('/'));
    let control = dir.join("memory.oom_control");
    if path.is_empty() || !control.exists() {
        return Ok(());
    }
    let oom =
        std::fs::File::open(&control).map_err(|e| Error::io(id, "open memory.oom_control", e))?;
    let efd = nix::sys::eventfd::EventFd::from_value_and_flags(
        0,
        nix::sys::eventfd::EfdFlags::EFD_CLOEXEC,
    )
    .map_err(|e| Error::io(id, "create eventfd", e.into()))?;
    std::fs::write(
        dir.join("cgroup.event_control"),
        format!("{} {}", efd.as_raw_fd(), oom.as_raw_fd()),
    )
    .map_err(|e| Error::io(id, "register OOM notification", e))?;
    let id = id.to_string();
    std::thread::Builder::new()
        .name(format!("oom-{id}"))
        .spawn(move || {
            let _oom = oom;
            let mut file = std::fs::File::from(std::os::fd::OwnedFd::from(efd));
            let mut buf = [0u8; 8];
            // The eventfd also fires when the cgroup is removed: only report while it exists.
            while file.read_exact(&mut buf).is_ok() {
                if !control.exists() {
                    break;
                }
                log::info!("{id}: OOM event");
                on_oom();
            }
        })
        .map_err(|e| Error::io("oom watcher", "spawn thread", e))?;
    Ok(())
}

/// Creates the cgroup at `path` in every hierarchy (the pod cgroup).
pub fn create(id: &str, path: &str) -> Result<()> {
    cgroups_rs::fs::Cgroup::new(hierarchies::auto(), path.trim_start_matches('/'))
        .map(drop)
        .map_err(|e| Error::other(id, format!("create cgroup {path}"), e))
}

/// Moves process `pid` into the cgroup at `path`.
pub fn add_process(id: &str, path: &str, pid: i32) -> Result<()> {
    let cg = Cgroup::load(hierarchies::auto(), path.trim_start_matches('/'));
    cg.add_task_by_tgid(cgroups_rs::CgroupPid::from(pid as u64))
        .map_err(|e| Error::other(id, format!("move pid {pid} into cgroup {path}"), e))
}

/// Removes the cgroup at `path` (its children must be gone already) from every hierarchy it
/// exists in. On a hybrid host the runtime also creates it in the unified v2 tree, which
/// cgroups-rs's v1 view does not know; left there it would outlive the pod.
pub fn remove(id: &str, path: &str) -> Result<()> {
    let cg = Cgroup::load(hierarchies::auto(), path.trim_start_matches('/'));
    let removed = cg
        .delete()
        .map_err(|e| Error::other(id, format!("remove cgroup {path}"), e));
    for root in mounted_roots() {
        let dir = root.join(path.trim_start_matches('/'));
        if dir.is_dir() {
            if let Err(e) = std::fs::remove_dir(&dir) {
                log::warn!("{id}: remove cgroup {}: {e}", dir.display());
            }
        }
    }
    removed
}

/// After a shim died: every cgroup at and below `path`, in every hierarchy, is thawed, its
/// processes are killed, and the directories are removed bottom-up. Returns what could not be
/// removed.
pub fn tear_down_tree(path: &str) -> Vec<std::path::PathBuf> {
    let rel = path.trim_start_matches('/');
    if rel.is_empty() {
        return Vec::new();
    }
    let dirs: Vec<std::path::PathBuf> = mounted_roots()
        .into_iter()
        .map(|root| root.join(rel))
        .filter(|d| d.is_dir())
        .collect();
    let mut all = Vec::new();
    for d in &dirs {
        collect_tree(d, &mut all);
    }
    // Thaw first: a frozen process cannot die.
    thaw_dirs(&all);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let mut alive = 0;
        for d in &all {
            let procs = std::fs::read_to_string(d.join("cgroup.procs")).unwrap_or_default();
            for pid in procs.lines().filter_map(|p| p.trim().parse::<i32>().ok()) {
                alive += 1;
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        if alive == 0 || std::time::Instant::now() > deadline {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // Deepest first (collect_tree lists parents before children).
    let mut left = Vec::new();
    for d in all.iter().rev() {
        let mut removed = false;
        for _ in 0..50 {
            if std::fs::remove_dir(d).is_ok() || !d.exists() {
                removed = true;
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        if !removed {
            left.push(d.clone());
        }
    }
    left
}

/// Thaws every cgroup at and below `path`, in every hierarchy; returns how many were frozen.
pub fn thaw_tree(path: &str) -> usize {
    let rel = path.trim_start_matches('/');
    if rel.is_empty() {
        return 0;
    }
    let mut all = Vec::new();
    for root in mounted_roots() {
        let d = root.join(rel);
        if d.is_dir() {
            collect_tree(&d, &mut all);
        }
    }
    thaw_dirs(&all)
}

/// Thaws each of `dirs` (v1 freezer.state, v2 cgroup.freeze); returns how many were frozen.
fn thaw_dirs(dirs: &[std::path::PathBuf]) -> usize {
    let mut frozen = 0;
    for d in dirs {
        let v1 = std::fs::read_to_string(d.join("freezer.state")).unwrap_or_default();
        let v2 = std::fs::read_to_string(d.join("cgroup.freeze")).unwrap_or_default();
        if v1.trim() == "FROZEN" || v1.trim() == "FREEZING" || v2.trim() == "1" {
            frozen += 1;
        }
        let _ = std::fs::write(d.join("freezer.state"), "THAWED");
        let _ = std::fs::write(d.join("cgroup.freeze"), "0");
    }
    frozen
}

fn collect_tree(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
    out.push(dir.to_path_buf());
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                collect_tree(&e.path(), out);
            }
        }
    }
}

/// Mount points of every cgroup hierarchy (v1 controllers and named ones, the unified tree).
fn mounted_roots() -> Vec<std::path::PathBuf> {
    crate::util::mounts::table()
        .into_iter()
        .filter(|m| m.fstype == "cgroup" || m.fstype == "cgroup2")
        .map(|m| m.point)
        .collect()
}
