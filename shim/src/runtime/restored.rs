//! What CRIU restored is checked against the container's spec. CRIU's images carry each
//! task's credentials, capabilities, no_new_privs and seccomp mode, and root CRIU restores
//! whatever they say; the images come from the archive, which is untrusted. Right after the
//! restore (a pod's container already held frozen), every restored thread's
//! `/proc/<tid>/status` is compared with what a fresh process of the same spec could hold; a
//! task over its bounds fails the restore and the container is removed.

use crate::{
    cgroup::freezer,
    error::{Error, Result},
    spec::ContainerSpec,
};

/// Capability names by number (linux/capability.h): the kernel's ABI.
const CAPS: &[&str] = &[
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];
pub const CAP_SETGID: u64 = 1 << 6;
pub const CAP_SETUID: u64 = 1 << 7;
pub const CAP_SETPCAP: u64 = 1 << 8;
pub const CAP_NET_RAW: u64 = 1 << 13;
pub const CAP_SYS_ADMIN: u64 = 1 << 21;

pub fn cap_names(mask: u64) -> String {
    (0..64)
        .filter(|b| mask & (1u64 << b) != 0)
        .map(|b| {
            CAPS.get(b)
                .map(|n| format!("CAP_{n}"))
                .unwrap_or(format!("capability {b}"))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The most a task of the spec may hold.
#[derive(Debug, Clone, PartialEq)]
pub struct Bounds {
    /// The spec's bounding set: no set of a task of the container can exceed it (a setuid
    /// program can reach it, so it is the bound for every set).
    pub bounding: u64,
    pub no_new_privs: bool,
    pub seccomp: bool,
    /// The spec's user: with no_new_privs and without CAP_SETUID/CAP_SETGID in the bounding
    /// set, nobody in the container can become anybody else.
    pub uid: u32,
    pub gid: u32,
}

impl Bounds {
    pub fn of(spec: &ContainerSpec) -> Self {
        let doc = spec.document();
        let bounding = doc
            .pointer("/process/capabilities/bounding")
            .and_then(|v| v.as_array())
            .map(|names| {
                names
                    .iter()
                    .filter_map(|n| n.as_str())
                    .filter_map(|n| {
                        let n = n.trim_start_matches("CAP_");
                        CAPS.iter().position(|c| c.eq_ignore_ascii_case(n))
                    })
                    .fold(0u64, |m, b| m | (1 << b))
            })
            .unwrap_or(0);
        let number = |p: &str| doc.pointer(p).and_then(|v| v.as_u64()).unwrap_or(0) as u32;
        Bounds {
            bounding,
            no_new_privs: doc
                .pointer("/process/noNewPrivileges")
                .and_then(|v| v.as_bool())
                .unwrap_or(false),
            seccomp: doc.pointer("/linux/seccomp").is_some_and(|s| !s.is_null()),
            uid: number("/process/user/uid"),
            gid: number("/process/user/gid"),
        }
    }

    /// Whether nobody in the container can change uid: no_new_privs keeps setuid programs
    /// from doing it, and CAP_SETUID is not in the bounding set.
    pub fn uid_fixed(&self) -> bool {
        self.no_new_privs && self.bounding & CAP_SETUID == 0
    }

    pub fn gid_fixed(&self) -> bool {
        self.no_new_privs && self.bounding & CAP_SETGID == 0
    }

    /// What `status` (a `/proc/<tid>/status`) holds beyond these bounds, one item each.
    pub fn excess(&self, status: &str) -> Vec<String> {
        let field = |name: &str| status_field(status, name);
        let mut out = Vec::new();
        // Sets with the same excess are named together.
        let mut excess: Vec<(u64, Vec<&str>)> = Vec::new();
        for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
            match field(set).and_then(|v| u64::from_str_radix(v, 16).ok()) {
                Some(mask) if mask & !self.bounding != 0 => {
                    let extra = mask & !self.bounding;
                    match excess.iter_mut().find(|(m, _)| *m == extra) {
                        Some((_, sets)) => sets.push(set),
                        None => excess.push((extra, vec![set])),
                    }
                }
                Some(_) => {}
                None => out.push(format!("no readable {set}")),
            }
        }
        for (extra, sets) in excess {
            out.push(format!(
                "{} {} {} beyond the spec's bounding set",
                sets.join(", "),
                if sets.len() == 1 { "has" } else { "have" },
                cap_names(extra)
            ));
        }
        if self.no_new_privs && field("NoNewPrivs") != Some("1") {
            out.push("no_new_privs is off; the spec sets it".into());
        }
        if self.seccomp && field("Seccomp") != Some("2") {
            out.push(format!(
                "seccomp mode {} where the spec has a filter",
                field("Seccomp").unwrap_or("?")
            ));
        }
        let fixed = |name: &str, want: u32, fixed: bool| {
            if !fixed {
                return None;
            }
            let ids = field(name)?;
            (!ids.split_whitespace().all(|v| v == want.to_string())).then(|| {
                format!("{name} {ids} where the spec's user has {want} and nobody may change it")
            })
        };
        out.extend(fixed("Uid", self.uid, self.uid_fixed()));
        out.extend(fixed("Gid", self.gid, self.gid_fixed()));
        out
    }
}

/// The value of field `name` (without its colon) of a `/proc/<tid>/status` text, trimmed.
fn status_field<'a>(status: &'a str, name: &str) -> Option<&'a str> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .map(str::trim)
}

/// The threads of the container's cgroup.
fn threads(id: &str, cgroup_path: &str) -> Result<Vec<i32>> {
    let f = freezer::for_cgroup(id, cgroup_path)?;
    let dir = f.path();
    let read = |names: &[&str]| -> Result<Vec<i32>> {
        for n in names {
            match std::fs::read_to_string(dir.join(n)) {
                Ok(text) => {
                    return Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io(id, format!("read {}/{n}", dir.display()), e)),
            }
        }
        Err(Error::other(
            id,
            "list the restored tasks",
            format!("{} lists no tasks", dir.display()),
        ))
    };
    read(&["tasks", "cgroup.threads"])
}

/// A task's state letter from its `/proc/<tid>/status` (`None` once it is gone).
fn task_state(tid: i32) -> Option<char> {
    let status = std::fs::read_to_string(format!("/proc/{tid}/status")).ok()?;
    status_field(&status, "State").and_then(|v| v.chars().next())
}

/// Waits until every task CRIU restored is stopped (CRIU's leave-stopped: each task gets
/// SIGSTOP before CRIU lets it go, and stops before it returns to its own code). A task
/// still running after `timeout` means the restore did not hold it: refused, as anything
/// that ran before the check could have used what it should not hold.
pub fn await_stopped(id: &str, cgroup_path: &str, timeout: std::time::Duration) -> Result<()> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let running: Vec<(i32, char)> = threads(id, cgroup_path)?
            .into_iter()
            .filter_map(|tid| task_state(tid).map(|s| (tid, s)))
            // T: stopped, t: traced, Z/X: exited.
            .filter(|(_, s)| !matches!(s, 'T' | 't' | 'Z' | 'X'))
            .collect();
        if running.is_empty() {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            let (tid, state) = running[0];
            return Err(Error::other(
                id,
                "hold the restored tasks for their check",
                format!(
                    "task {tid} is in state {state} after {timeout:?}: CRIU did not leave it stopped; the container was removed"
                ),
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

/// Lets the restored tasks run once they passed the check: SIGCONT to each process of the
/// container's cgroup, except those that were stopped when they were dumped (`keep`, ids in
/// the container's PID namespace), which stay stopped as they were. A frozen container
/// takes the signal and runs once it is thawed.
pub fn continue_tasks(
    id: &str,
    cgroup_path: &str,
    keep: &std::collections::HashSet<u32>,
) -> Result<()> {
    for tid in threads(id, cgroup_path)? {
        let Ok(status) = std::fs::read_to_string(format!("/proc/{tid}/status")) else {
            continue;
        };
        let field = |name: &str| status_field(&status, name).unwrap_or("");
        if field("Tgid") != tid.to_string() {
            // A thread: the signal to its process continues it.
            continue;
        }
        let inner = field("NSpid")
            .split_whitespace()
            .last()
            .and_then(|p| p.parse::<u32>().ok());
        if inner.is_some_and(|p| keep.contains(&p)) {
            continue;
        }
        match nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(tid),
            nix::sys::signal::Signal::SIGCONT,
        ) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
            Err(e) => {
                return Err(Error::io(
                    id,
                    format!("continue restored task {tid}"),
                    std::io::Error::from(e),
                ))
            }
        }
    }
    Ok(())
}

/// Checks every thread CRIU restored into the container's cgroup against `bounds`. An error
/// names the task and everything it holds too much of.
/// `mounts` judges a restored task's `/proc/<pid>/mountinfo` (the container's mount
/// namespace, all of its tasks share it) and names what it holds beyond the spec.
pub fn verify(
    id: &str,
    cgroup_path: &str,
    bounds: &Bounds,
    mounts: impl Fn(&str) -> Vec<String>,
) -> Result<()> {
    let threads = threads(id, cgroup_path)?;
    if threads.is_empty() {
        return Err(Error::other(
            id,
            "check the restored tasks",
            "no task was restored into the container's cgroup",
        ));
    }
    for tid in &threads {
        let status = match std::fs::read_to_string(format!("/proc/{tid}/status")) {
            Ok(s) => s,
            // Gone already (it exited): nothing of it can run.
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::io(id, format!("read /proc/{tid}/status"), e)),
        };
        let mut excess = bounds.excess(&status);
        if *tid == threads[0] {
            match std::fs::read_to_string(format!("/proc/{tid}/mountinfo")) {
                Ok(table) => excess.extend(mounts(&table)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io(id, format!("read /proc/{tid}/mountinfo"), e)),
            }
        }
        if !excess.is_empty() {
            let name = status_field(&status, "Name").unwrap_or("?");
            return Err(Error::invalid(
                id,
                format!(
                    "the checkpoint's images restored task {tid} ({name}) with more than a fresh container of this spec gets: {}; the container was removed",
                    excess.join("; ")
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bounds() -> Bounds {
        Bounds {
            bounding: 0xa804_25fb,
            no_new_privs: true,
            seccomp: true,
            uid: 1000,
            gid: 1000,
        }
    }

    fn status(caps: u64, nnp: u8, seccomp: u8, uid: u32) -> String {
        format!(
            "Name:\tsh\nState:\tT (stopped)\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\nGid:\t1000\t1000\t1000\t1000\n\
             CapInh:\t0000000000000000\nCapPrm:\t{caps:016x}\nCapEff:\t{caps:016x}\n\
             CapBnd:\t{caps:016x}\nCapAmb:\t0000000000000000\nNoNewPrivs:\t{nnp}\nSeccomp:\t{seccomp}\n"
        )
    }

    #[test]
    fn a_task_within_its_spec_passes_and_every_excess_is_named() {
        let b = bounds();
        assert!(b.excess(&status(0xa804_25fb, 1, 2, 1000)).is_empty());
        assert!(b.excess(&status(0, 1, 2, 1000)).is_empty());
        let all = b.excess(&status(0x1ff_feff_ffff, 0, 0, 0)).join("; ");
        for want in [
            "CapPrm, CapEff, CapBnd have CAP_DAC_READ_SEARCH",
            "CAP_SYS_ADMIN",
            "CAP_SYS_MODULE",
            "no_new_privs is off",
            "seccomp mode 0",
        ] {
            assert!(all.contains(want), "{want}: {all}");
        }
        // With CAP_SETUID in the bounding set the container may change its uid itself;
        // without it (and with no_new_privs) nobody in it may.
        assert!(!all.contains("Uid"), "{all}");
        let fixed = Bounds {
            bounding: 0xa804_25fb & !(CAP_SETUID | CAP_SETGID),
            ..bounds()
        };
        let ids = fixed.excess(&status(0, 1, 2, 0)).join("; ");
        assert!(
            ids.contains("Uid 0\t0\t0\t0 where the spec's user has 1000"),
            "{ids}"
        );
        // Without no_new_privs a setuid program may change the uid: not an excess.
        let lax = Bounds {
            no_new_privs: false,
            ..bounds()
        };
        assert!(lax.excess(&status(0xa804_25fb, 0, 2, 0)).is_empty());
    }

    #[test]
    fn status_fields_are_found_by_their_whole_name() {
        let s = "Tgid:\t42\nNSpid:\t42\t7\nState:\tT (stopped)\n";
        assert_eq!(status_field(s, "Tgid"), Some("42"));
        assert_eq!(status_field(s, "NSpid"), Some("42\t7"));
        assert_eq!(status_field(s, "State"), Some("T (stopped)"));
        // "NSpid" is not a "Pid" field, nor a prefix of one.
        assert_eq!(status_field(s, "Pid"), None);
        assert_eq!(status_field(s, "NS"), None);
    }

    #[test]
    fn bounds_come_from_the_spec() {
        let spec = ContainerSpec::parse(
            "c",
            "test",
            serde_json::json!({
                "ociVersion": "1.0.2",
                "root": {"path": "rootfs"},
                "process": {"cwd": "/", "user": {"uid": 7, "gid": 8}, "noNewPrivileges": true,
                            "capabilities": {"bounding": ["CAP_CHOWN", "CAP_KILL"]}},
                "linux": {"seccomp": {"defaultAction": "SCMP_ACT_ERRNO"}}
            })
            .to_string()
            .as_bytes(),
        )
        .unwrap();
        assert_eq!(
            Bounds::of(&spec),
            Bounds {
                bounding: 1 | 1 << 5,
                no_new_privs: true,
                seccomp: true,
                uid: 7,
                gid: 8,
            }
        );
    }
}
