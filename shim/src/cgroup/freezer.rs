//! The cgroup freezer, over cgroup v1 (`freezer.state`) and v2 (`cgroup.freeze`, confirmed by
//! `frozen 1` in `cgroup.events`). Freezing is how stasis holds a container (or a whole pod)
//! still while its memory and files are captured.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use crate::error::{Error, Result};

/// How long a freeze may take before we give up and thaw again.
const FREEZE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FreezerState {
    Thawed,
    Freezing,
    Frozen,
}

/// Freezing waits for the kernel (up to FREEZE_TIMEOUT): async callers go through
/// `util::blocking`, never call these on an async worker.
pub trait Freezer: Send + Sync {
    /// Freezes every process of the cgroup and returns once the kernel says they all are.
    fn freeze(&self) -> Result<()>;
    fn thaw(&self) -> Result<()>;
    fn state(&self) -> Result<FreezerState>;
    fn path(&self) -> &Path;
}

/// The freezer of the cgroup at `cgroup_path` (a runtime-spec cgroupsPath): v1 where a freezer
/// hierarchy is mounted, else v2 under `/sys/fs/cgroup`.
pub fn for_cgroup(id: &str, cgroup_path: &str) -> Result<Box<dyn Freezer>> {
    if cgroup_path.is_empty() {
        return Err(Error::precondition(
            id,
            "container has no cgroup path to freeze",
        ));
    }
    let rel = cgroup_path.trim_start_matches('/');
    let v1 = Path::new("/sys/fs/cgroup/freezer");
    if v1.join("freezer.state").exists() || v1.join("tasks").exists() {
        return Ok(Box::new(V1Freezer::new(id, v1.join(rel))));
    }
    Ok(Box::new(V2Freezer::new(
        id,
        Path::new("/sys/fs/cgroup").join(rel),
    )))
}

/// Polls `frozen` every millisecond until it holds; past `timeout` (FREEZE_TIMEOUT but in
/// tests), `thaw` and fail.
fn wait_frozen(
    id: &str,
    dir: &Path,
    timeout: Duration,
    mut frozen: impl FnMut() -> Result<bool>,
    thaw: impl Fn(),
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !frozen()? {
        if Instant::now() > deadline {
            thaw();
            return Err(Error::other(
                id,
                "freeze",
                format!("{} did not freeze within {timeout:?}", dir.display()),
            ));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

fn read(id: &str, path: &Path) -> Result<String> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(|e| Error::io(id, format!("read {}", path.display()), e))
}

fn write(id: &str, path: &Path, value: &str) -> Result<()> {
    std::fs::write(path, value)
        .map_err(|e| Error::io(id, format!("write {value} to {}", path.display()), e))
}

pub struct V1Freezer {
    id: String,
    dir: PathBuf,
}

impl V1Freezer {
    pub fn new(id: &str, dir: PathBuf) -> Self {
        V1Freezer {
            id: id.to_string(),
            dir,
        }
    }
}

impl Freezer for V1Freezer {
    fn freeze(&self) -> Result<()> {
        let state = self.dir.join("freezer.state");
        // Writing FROZEN again nudges tasks that were forking while we froze.
        wait_frozen(
            &self.id,
            &self.dir,
            FREEZE_TIMEOUT,
            || {
                write(&self.id, &state, "FROZEN")?;
                Ok(read(&self.id, &state)? == "FROZEN")
            },
            || drop(self.thaw()),
        )
    }

    fn thaw(&self) -> Result<()> {
        write(&self.id, &self.dir.join("freezer.state"), "THAWED")
    }

    fn state(&self) -> Result<FreezerState> {
        Ok(
            match read(&self.id, &self.dir.join("freezer.state"))?.as_str() {
                "FROZEN" => FreezerState::Frozen,
                "FREEZING" => FreezerState::Freezing,
                _ => FreezerState::Thawed,
            },
        )
    }

    fn path(&self) -> &Path {
        &self.dir
    }
}

pub struct V2Freezer {
    id: String,
    dir: PathBuf,
}

impl V2Freezer {
    pub fn new(id: &str, dir: PathBuf) -> Self {
        V2Freezer {
            id: id.to_string(),
            dir,
        }
    }

    fn frozen_event(&self) -> Result<bool> {
        let events = read(&self.id, &self.dir.join("cgroup.events"))?;
        Ok(events.lines().any(|l| l.trim() == "frozen 1"))
    }
}

impl Freezer for V2Freezer {
    fn freeze(&self) -> Result<()> {
        write(&self.id, &self.dir.join("cgroup.freeze"), "1")?;
        // cgroup.freeze only asks; cgroup.events says when every task has stopped.
        wait_frozen(
            &self.id,
            &self.dir,
            FREEZE_TIMEOUT,
            || self.frozen_event(),
            || drop(self.thaw()),
        )
    }

    fn thaw(&self) -> Result<()> {
        write(&self.id, &self.dir.join("cgroup.freeze"), "0")
    }

    fn state(&self) -> Result<FreezerState> {
        let asked = read(&self.id, &self.dir.join("cgroup.freeze"))? == "1";
        Ok(match (asked, self.frozen_event()?) {
            (_, true) => FreezerState::Frozen,
            (true, false) => FreezerState::Freezing,
            _ => FreezerState::Thawed,
        })
    }

    fn path(&self) -> &Path {
        &self.dir
    }
}

#[cfg(test)]
mod tests;
