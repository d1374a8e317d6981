//! The freezers against a cgroup directory of our own: a temporary directory holding the
//! files the kernel would, and for v2 a stand-in kernel thread that answers `cgroup.freeze`
//! in `cgroup.events` the way the kernel does once every task has stopped. They need no root
//! and no cgroup hierarchy; the real kernel's freezing is exercised by the end-to-end tests
//! (and, as root, by the real-kernel tests at the end).

use std::{
    cell::Cell,
    process::{Child, Command},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
};

use super::*;

/// A directory standing in for one cgroup, removed when dropped.
struct FakeCgroup {
    dir: PathBuf,
}

impl FakeCgroup {
    fn new(name: &str, files: &[(&str, &str)]) -> FakeCgroup {
        let dir =
            std::env::temp_dir().join(format!("stasis-fake-cgroup-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for (file, text) in files {
            std::fs::write(dir.join(file), text).unwrap();
        }
        FakeCgroup { dir }
    }

    fn read(&self, file: &str) -> String {
        std::fs::read_to_string(self.dir.join(file)).unwrap()
    }
}

impl Drop for FakeCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The v2 kernel's side of a fake cgroup: `frozen 1` in `cgroup.events` once `delay` has
/// passed since `cgroup.freeze` asked for it, `frozen 0` as soon as it no longer does.
/// With `delay` None it never freezes (a task that does not stop).
struct FakeKernel {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeKernel {
    fn start(dir: &Path, delay: Option<Duration>) -> FakeKernel {
        let stop = Arc::new(AtomicBool::new(false));
        let (dir, stopping) = (dir.to_path_buf(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut asked_at: Option<Instant> = None;
            while !stopping.load(Ordering::Relaxed) {
                let asked = std::fs::read_to_string(dir.join("cgroup.freeze"))
                    .is_ok_and(|s| s.trim() == "1");
                asked_at = match (asked, asked_at) {
                    (true, None) => Some(Instant::now()),
                    (true, at) => at,
                    (false, _) => None,
                };
                let frozen = asked_at.zip(delay).is_some_and(|(at, d)| at.elapsed() >= d);
                // Replaced whole (written beside, renamed), as a reader never sees half a file.
                let next = dir.join("cgroup.events.next");
                std::fs::write(&next, format!("populated 1\nfrozen {}\n", frozen as u8)).unwrap();
                std::fs::rename(&next, dir.join("cgroup.events")).unwrap();
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        FakeKernel {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for FakeKernel {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn v2_cgroup(name: &str) -> FakeCgroup {
    FakeCgroup::new(
        name,
        &[
            ("cgroup.freeze", "0\n"),
            ("cgroup.events", "populated 1\nfrozen 0\n"),
        ],
    )
}

#[test]
fn v2_freeze_returns_once_the_kernel_says_frozen() {
    let cg = v2_cgroup("v2-freeze");
    let _kernel = FakeKernel::start(&cg.dir, Some(Duration::from_millis(50)));
    let f = V2Freezer::new("c", cg.dir.clone());
    assert_eq!(f.path(), cg.dir);
    assert_eq!(f.state().unwrap(), FreezerState::Thawed);
    let started = Instant::now();
    f.freeze().unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(50),
        "freeze returned before the kernel said frozen"
    );
    assert_eq!(cg.read("cgroup.freeze"), "1");
    assert_eq!(f.state().unwrap(), FreezerState::Frozen);
    f.thaw().unwrap();
    assert_eq!(cg.read("cgroup.freeze"), "0");
    let deadline = Instant::now() + Duration::from_secs(5);
    while f.state().unwrap() != FreezerState::Thawed {
        assert!(Instant::now() < deadline, "the fake kernel never thawed");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn v2_state_is_freezing_while_asked_but_not_yet_frozen() {
    let cg = FakeCgroup::new(
        "v2-freezing",
        &[
            ("cgroup.freeze", "1\n"),
            ("cgroup.events", "populated 1\nfrozen 0\n"),
        ],
    );
    let f = V2Freezer::new("c", cg.dir.clone());
    assert_eq!(f.state().unwrap(), FreezerState::Freezing);
    // The kernel's word counts, whatever was asked.
    std::fs::write(cg.dir.join("cgroup.freeze"), "0").unwrap();
    std::fs::write(cg.dir.join("cgroup.events"), "populated 0\nfrozen 1\n").unwrap();
    assert_eq!(f.state().unwrap(), FreezerState::Frozen);
}

#[test]
fn v1_freezer_writes_and_reads_freezer_state() {
    let cg = FakeCgroup::new("v1", &[("freezer.state", "THAWED\n")]);
    let f = V1Freezer::new("c", cg.dir.clone());
    assert_eq!(f.state().unwrap(), FreezerState::Thawed);
    f.freeze().unwrap();
    assert_eq!(cg.read("freezer.state"), "FROZEN");
    assert_eq!(f.state().unwrap(), FreezerState::Frozen);
    std::fs::write(cg.dir.join("freezer.state"), "FREEZING\n").unwrap();
    assert_eq!(f.state().unwrap(), FreezerState::Freezing);
    f.thaw().unwrap();
    assert_eq!(cg.read("freezer.state"), "THAWED");
    assert_eq!(f.state().unwrap(), FreezerState::Thawed);
}

#[test]
fn a_freeze_that_never_completes_is_thawed_and_named() {
    let dir = Path::new("/sys/fs/cgroup/pod/c");
    let thawed = Cell::new(false);
    let polls = Cell::new(0);
    let e = wait_frozen(
        "c",
        dir,
        Duration::from_millis(30),
        || {
            polls.set(polls.get() + 1);
            Ok(false)
        },
        || thawed.set(true),
    )
    .unwrap_err()
    .to_string();
    assert!(thawed.get(), "a failed freeze must thaw");
    assert!(polls.get() > 1, "the kernel was asked only once");
    assert!(
        e.contains("/sys/fs/cgroup/pod/c did not freeze within 30ms"),
        "{e}"
    );
}

#[test]
fn v2_freeze_past_its_bound_thaws_the_cgroup() {
    let cg = v2_cgroup("v2-stuck");
    let _kernel = FakeKernel::start(&cg.dir, None);
    let f = V2Freezer::new("c", cg.dir.clone());
    let e = wait_frozen(
        "c",
        &cg.dir,
        Duration::from_millis(30),
        || {
            write("c", &cg.dir.join("cgroup.freeze"), "1")?;
            f.frozen_event()
        },
        || drop(f.thaw()),
    );
    assert!(e.is_err());
    assert_eq!(cg.read("cgroup.freeze"), "0", "left asking for a freeze");
}

#[test]
fn errors_name_the_cgroup_file() {
    let gone = std::env::temp_dir().join(format!("stasis-no-cgroup-{}", std::process::id()));
    let e = V2Freezer::new("c", gone.clone())
        .state()
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&format!("{}", gone.join("cgroup.freeze").display())),
        "{e}"
    );
    let e = V1Freezer::new("c", gone.clone())
        .thaw()
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&format!(
            "write THAWED to {}",
            gone.join("freezer.state").display()
        )),
        "{e}"
    );
    let e = for_cgroup("c", "").err().unwrap().to_string();
    assert!(e.contains("container has no cgroup path to freeze"), "{e}");
}

/// A process that appends to a file every few milliseconds, in a fresh cgroup of `root`.
struct Ticker {
    child: Child,
    out: PathBuf,
    cgroup: PathBuf,
}

impl Ticker {
    fn start(root: &Path, name: &str) -> Option<Ticker> {
        if !root.exists() || nix::unistd::geteuid().as_raw() != 0 {
            return None;
        }
        let cgroup = root.join(format!("stasis-freezer-test-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&cgroup).ok()?;
        let out = std::env::temp_dir().join(format!("stasis-ticker-{name}-{}", std::process::id()));
        let child = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "while true; do echo x >> {}; sleep 0.01; done",
                out.display()
            ))
            .spawn()
            .ok()?;
        std::fs::write(cgroup.join("cgroup.procs"), child.id().to_string()).ok()?;
        Some(Ticker { child, out, cgroup })
    }

    fn ticks(&self) -> usize {
        std::fs::read_to_string(&self.out)
            .map(|s| s.lines().count())
            .unwrap_or(0)
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.out);
        for _ in 0..50 {
            if std::fs::remove_dir(&self.cgroup).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn exercise(freezer: &dyn Freezer, t: &Ticker) {
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(freezer.state().unwrap(), FreezerState::Thawed);
    freezer.freeze().unwrap();
    assert_eq!(freezer.state().unwrap(), FreezerState::Frozen);
    let frozen_at = t.ticks();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(t.ticks(), frozen_at, "a frozen process kept running");
    freezer.thaw().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert!(t.ticks() > frozen_at, "a thawed process did not resume");
    assert_eq!(freezer.state().unwrap(), FreezerState::Thawed);
}

/// The real kernel: needs root and the v1 freezer hierarchy this project's machines have.
#[test]
fn v1_freezer_stops_and_resumes_a_process() {
    if !as_root() {
        return;
    }
    let root = Path::new("/sys/fs/cgroup/freezer");
    let t = Ticker::start(root, "v1").expect("create a v1 freezer cgroup (needs root)");
    let f = V1Freezer::new("test", t.cgroup.clone());
    exercise(&f, &t);
}

/// The real kernel's cgroup v2: on a hybrid host it lives at /sys/fs/cgroup/unified; a pure
/// v2 host has it at /sys/fs/cgroup.
#[test]
fn v2_freezer_stops_and_resumes_a_process() {
    if !as_root() {
        return;
    }
    let root = [
        Path::new("/sys/fs/cgroup/unified"),
        Path::new("/sys/fs/cgroup"),
    ]
    .into_iter()
    .find(|p| p.join("cgroup.controllers").exists())
    .expect("no cgroup v2 hierarchy mounted");
    let t = Ticker::start(root, "v2").expect("create a v2 cgroup (needs root)");
    let f = V2Freezer::new("test", t.cgroup.clone());
    exercise(&f, &t);
}

/// The real-kernel tests need root (CI runs every test as root). As another user they pass
/// without a kernel cgroup, so that a developer's plain `cargo test` works; under `CI` a
/// missing root is a failure.
fn as_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "the real-kernel freezer tests need root under CI"
    );
    false
}
