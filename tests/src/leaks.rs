//! What a test leaves behind once its pods and containers were removed the ordinary way
//! (through CRI and containerd): it must be nothing. `Containerd::finish` runs these probes at
//! the end of every test and fails listing what is left; `tests/tests/leak_probes.rs` shows
//! each probe seeing a live pod first, so none of them can pass by looking in the wrong place.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Mutex,
    },
};

/// The containerd namespaces a test's objects live in: CRI's and the test's own.
pub fn namespaces(test_ns: &str) -> [String; 2] {
    ["k8s.io".to_string(), test_ns.to_string()]
}

/// Pod and container ids named in containerd's log: what the shim reported creating and what
/// CRI reported creating (containerd's own runc shim included), whoever asked for them.
pub fn ids_in_log(log: &str) -> BTreeSet<String> {
    let mut ids = BTreeSet::new();
    for line in log.lines() {
        for (prefix, suffix) in [
            ("msg=\"pod ", ": created"),
            ("msg=\"", ": created, pid"),
            ("returns sandbox id \\\"", "\\\""),
            ("returns container id \\\"", "\\\""),
        ] {
            let Some(i) = line.find(prefix) else { continue };
            let rest = &line[i + prefix.len()..];
            let Some(j) = rest.find(suffix) else { continue };
            let id = &rest[..j];
            if !id.is_empty() && id.len() <= 128 && !id.contains([' ', '/', '"', '\\']) {
                ids.insert(id.to_string());
            }
        }
    }
    ids
}

/// Mount points of every cgroup hierarchy (v1 controllers, the v1 named ones, the unified v2).
pub fn cgroup_roots() -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut roots: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let fstype = post.split_whitespace().next()?;
            let mount_point = pre.split_whitespace().nth(4)?;
            (fstype == "cgroup" || fstype == "cgroup2").then(|| mount_point.into())
        })
        .collect();
    roots.sort();
    roots.dedup();
    roots
}

/// Cgroups of the given ids, in every hierarchy: a pod's (`stasis/<pod>`), a container's below
/// it, and the test namespace's containers (`<ns>/<id>`).
pub fn cgroups(ids: &BTreeSet<String>, test_ns: &str) -> Vec<String> {
    let mut left = Vec::new();
    for root in cgroup_roots() {
        for id in ids {
            for dir in [root.join("stasis").join(id), root.join(test_ns).join(id)] {
                if dir.is_dir() {
                    left.push(format!("cgroup {}", dir.display()));
                }
            }
        }
    }
    left
}

/// Shim sockets containerd would connect to for the given ids.
pub fn sockets(address: &Path, ids: &BTreeSet<String>, test_ns: &str) -> Vec<String> {
    use sha2::{Digest, Sha256};
    let mut left = Vec::new();
    for ns in namespaces(test_ns) {
        for id in ids {
            let digest = Sha256::digest(format!("{}/{ns}/{id}", address.display()));
            let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
            let p = format!("/run/containerd/s/{hex}");
            if Path::new(&p).exists() {
                left.push(format!("shim socket {p} ({ns}/{id})"));
            }
        }
    }
    left
}

/// The OCI runtimes' state of the given ids (runc, crun, runsc keep it below /run/stasis).
pub fn runtime_state(ids: &BTreeSet<String>, test_ns: &str) -> Vec<String> {
    let mut left = Vec::new();
    for engine in ["runc", "crun", "runsc"] {
        for ns in namespaces(test_ns) {
            let root = Path::new("/run/stasis").join(engine).join(&ns);
            for id in ids {
                // runsc keeps `<id>` state files; runc and crun a directory.
                let found = std::fs::read_dir(&root)
                    .map(|rd| {
                        rd.flatten()
                            .any(|e| e.file_name().to_string_lossy().starts_with(id.as_str()))
                    })
                    .unwrap_or(false);
                if found {
                    left.push(format!("{engine} state of {id} in {}", root.display()));
                }
            }
        }
    }
    // The shim's scratch (a pod checkpoint's CRIU work directories) names its pod.
    for e in std::fs::read_dir("/run/stasis/work")
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        if ids.iter().any(|id| name.contains(&format!("-{id}-"))) {
            left.push(format!("shim scratch {}", e.path().display()));
        }
    }
    left
}

/// Processes this test started that still run: shims and pause processes (our copied binary
/// under `<dir>/bin`), runtime helpers working on our bundles, and any process sitting in a
/// cgroup of one of our ids.
pub fn processes(dir: &Path, ids: &BTreeSet<String>, test_ns: &str, except: &[i32]) -> Vec<String> {
    let bin = dir.join("bin");
    let mine = dir.display().to_string();
    let mut left = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return left;
    };
    for e in entries.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if except.contains(&pid) || pid == std::process::id() as i32 {
            continue;
        }
        let cmdline = std::fs::read(e.path().join("cmdline"))
            .map(|b| {
                String::from_utf8_lossy(&b)
                    .replace('\0', " ")
                    .trim()
                    .to_string()
            })
            .unwrap_or_default();
        let exe = std::fs::read_link(e.path().join("exe")).unwrap_or_default();
        // stasisctl's own helpers (a restore's watchdog, a migration listener) carry our
        // containerd's socket on their command line.
        let helper = ["runc", "runsc", "crun", "criu", "stasisctl"]
            .iter()
            .any(|h| exe.file_name().is_some_and(|n| n == *h));
        let cgroup = std::fs::read_to_string(e.path().join("cgroup")).unwrap_or_default();
        let in_our_cgroup = cgroup.lines().any(|l| {
            let path = l.splitn(3, ':').nth(2).unwrap_or("");
            ids.iter().any(|id| path.split('/').any(|part| part == id))
                || path.starts_with(&format!("/{test_ns}/"))
        });
        if exe.starts_with(&bin) || (helper && cmdline.contains(&mine)) || in_our_cgroup {
            left.push(format!("process {pid} ({cmdline})"));
        }
    }
    left
}

/// stasis's stores outside any one containerd: stasisctl's restore store and its checkpoint
/// staging directory.
pub const STORES: [&str; 2] = [
    stasis_api::layout::RESTORE_STORE,
    "/var/lib/stasis/checkpoints",
];

/// Tests of this process with a containerd alive, and what the stores held before the first.
static LIVE: AtomicUsize = AtomicUsize::new(0);
static BASELINE: Mutex<Option<BTreeSet<PathBuf>>> = Mutex::new(None);

/// Every entry of the stores now.
pub fn store_entries() -> BTreeSet<PathBuf> {
    STORES
        .iter()
        .flat_map(|s| std::fs::read_dir(s).into_iter().flatten().flatten())
        .map(|e| e.path())
        .collect()
}

/// A test's containerd started: the first of the process records the stores as they were.
pub(crate) fn enter() {
    let mut base = BASELINE.lock().unwrap_or_else(|e| e.into_inner());
    if base.is_none() {
        *base = Some(store_entries());
    }
    LIVE.fetch_add(1, Ordering::SeqCst);
}

pub(crate) fn leave() {
    LIVE.fetch_sub(1, Ordering::SeqCst);
}

/// What the stores hold that they did not before this process's first test, when the calling
/// test is the only one alive (an entry cannot be told apart from a concurrent test's restore
/// in progress; the last test of each file is always alone at its end). A claim `<id>.pod`
/// naming one of `ids` is this test's whoever else runs.
pub fn store_leftovers(ids: &BTreeSet<String>) -> Vec<String> {
    let mut left: Vec<String> = store_entries()
        .iter()
        .filter(|p| p.extension().is_some_and(|x| x == "pod"))
        .filter(|p| std::fs::read_to_string(p).is_ok_and(|pod| ids.contains(pod.trim())))
        .map(|p| format!("restore claim {} of our pod", p.display()))
        .collect();
    left.extend(
        new_store_entries()
            .into_iter()
            .flatten()
            .map(|p| format!("store entry {}", p.display())),
    );
    left
}

/// What the stores gained since this process's first test, if the caller is the only test
/// alive; `None` otherwise.
fn new_store_entries() -> Option<Vec<PathBuf>> {
    if LIVE.load(Ordering::SeqCst) != 1 {
        return None;
    }
    let base = BASELINE.lock().unwrap_or_else(|e| e.into_inner());
    let base = base.as_ref()?;
    Some(store_entries().difference(base).cloned().collect())
}

/// After a failed test, alone: what the stores gained since the process's first test goes.
pub(crate) fn remove_store_leftovers() {
    for p in new_store_entries().into_iter().flatten() {
        let _ = std::fs::remove_dir_all(&p).or_else(|_| std::fs::remove_file(&p));
    }
}
