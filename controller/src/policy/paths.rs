use super::*;

/// What containerd masks and makes read-only in every container unless CRI names its own
/// lists. A non-empty CRI list replaces these (measured: one harmless path in each list leaves
/// `/proc/sys` writable and `/proc/kcore` readable), so a list that keeps the protections must
/// hold all of them; an empty list keeps the runtime's.
pub(super) const DEFAULT_MASKED_PATHS: &[&str] = &[
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

pub(super) const DEFAULT_READONLY_PATHS: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// The runtime's protections a non-empty list leaves out, as "/proc/sys not read-only".
pub(super) fn dropped_protections(masked: &[String], readonly: &[String]) -> Vec<String> {
    let missing = |list: &[String], defaults: &[&'static str], how: &str| -> Vec<String> {
        if list.is_empty() {
            return Vec::new();
        }
        defaults
            .iter()
            .filter(|d| !list.iter().any(|p| lexical(Path::new(p)) == Path::new(d)))
            .map(|d| format!("{d} {how}"))
            .collect()
    };
    let mut out = missing(masked, DEFAULT_MASKED_PATHS, "not masked");
    out.extend(missing(readonly, DEFAULT_READONLY_PATHS, "not read-only"));
    out
}

/// Refuses a host path of container `name` that goes through a symbolic link on the node:
/// the prefix check reads the path as written, containerd would follow the link anywhere. Run
/// right before the container is created, once the volumes restored before it are in place.
/// Components that do not exist yet end the walk (containerd creates them as directories).
pub fn check_host_paths_resolve(
    name: &str,
    log_directory: &str,
    config: &api::ContainerConfig,
) -> Result<()> {
    let log_file = (!config.log_path.is_empty()).then(|| {
        Path::new(log_directory)
            .join(&config.log_path)
            .display()
            .to_string()
    });
    let host_paths = config
        .mounts
        .iter()
        .map(|m| m.host_path.clone())
        .filter(|p| !p.is_empty())
        .chain(log_file);
    for host_path in host_paths {
        let path = lexical(Path::new(&host_path));
        let mut walked = PathBuf::from("/");
        for c in path.components().skip(1) {
            walked.push(c);
            match std::fs::symlink_metadata(&walked) {
                Ok(meta) if meta.file_type().is_symlink() => {
                    let target = std::fs::read_link(&walked)
                        .map(|t| t.display().to_string())
                        .unwrap_or_default();
                    bail!(
                        "container {name}: host path {host_path} goes through the symbolic link {} (to {target}) on this node; a link can point anywhere, so it is refused, nothing of the container was created",
                        walked.display()
                    );
                }
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("container {name}: check host path {host_path}"))
                }
            }
        }
    }
    Ok(())
}

/// `p` (lexical) lies strictly below one of `prefixes`.
pub(super) fn below(p: &Path, prefixes: &[PathBuf]) -> bool {
    prefixes
        .iter()
        .any(|x| p.starts_with(lexical(x)) && p != lexical(x))
}

/// `a/./b/../c` → `a/c` without touching the file system (the path is the archive's, not ours).
pub(super) fn lexical(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}
