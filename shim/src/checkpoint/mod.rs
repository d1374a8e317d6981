//! Consistent checkpoints of containers: freeze → dump (CRIU through the OCI runtime) →
//! capture the files that must match the memory → thaw. Only the frozen window needs to be
//! consistent; everything slow that can wait (packaging, metadata) happens after the thaw.

pub mod pod;
pub mod rootfs;
pub mod volumes;

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use log::info;

use crate::{
    cgroup::freezer::{self, Freezer},
    error::{Error, Result},
    runtime::{CheckpointOpts, OciRuntime},
};

/// Annotation on a container listing the bind-mount destinations (comma separated, or `*` for
/// every writable bind mount) whose contents a checkpoint captures with the memory.
pub const VOLUMES_ANNOTATION: &str = "io.stasis.checkpoint.volumes";

#[derive(Debug, Default, Clone, Copy)]
pub struct Timings {
    /// From the freeze until the thaw (zero when the container was not running).
    pub frozen: Duration,
    pub dump: Duration,
    pub files: Duration,
    pub total: Duration,
}

/// What to checkpoint: one container, described by what the shim knows of it.
pub struct Target<'a> {
    pub id: &'a str,
    pub cgroup_path: &'a str,
    pub spec: &'a serde_json::Value,
    /// The user paused it: it stays paused and is not frozen or thawed by us.
    pub paused: bool,
}

/// The CRIU options a dump used, kept with the images so the restore can match them.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct DumpRecord {
    pub tcp_established: bool,
    pub ext_unix_sk: bool,
    pub file_locks: bool,
    /// How long the container was frozen, and each step, in milliseconds.
    #[serde(default)]
    pub frozen_ms: f64,
    #[serde(default)]
    pub dump_ms: f64,
    #[serde(default)]
    pub files_ms: f64,
    #[serde(default)]
    pub total_ms: f64,
}

impl DumpRecord {
    const FILE: &'static str = "stasis-dump.json";

    pub fn write(&self, image: &Path) {
        if let Ok(text) = serde_json::to_vec(self) {
            let _ = std::fs::write(image.join(Self::FILE), text);
        }
    }

    pub fn read(image: &Path) -> Self {
        std::fs::read(image.join(Self::FILE))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }
}

impl DumpRecord {
    pub fn new(o: &CheckpointOpts, t: &Timings) -> Self {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        DumpRecord {
            tcp_established: o.tcp_established,
            ext_unix_sk: o.ext_unix_sk,
            file_locks: o.file_locks,
            frozen_ms: ms(t.frozen),
            dump_ms: ms(t.dump),
            files_ms: ms(t.files),
            total_ms: ms(t.total),
        }
    }
}

/// Lists a directory's entries, to remove exactly what a failed dump added.
fn entries(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

/// Removes what appeared in `dir` since `before` (and `dir` itself if we created it).
fn remove_partial(dir: &Path, before: &[PathBuf], created: bool) {
    if created {
        let _ = std::fs::remove_dir_all(dir);
        return;
    }
    for p in entries(dir) {
        if !before.contains(&p) {
            let _ = if p.is_dir() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
        }
    }
}

/// Checkpoints one container consistently. On failure the container is thawed (or left as
/// the user had it) and nothing new is left at `opts.image_path`.
pub async fn checkpoint_container(
    runtime: &dyn OciRuntime,
    target: Target<'_>,
    opts: &CheckpointOpts,
) -> Result<Timings> {
    let id = target.id;
    let start = Instant::now();
    let created = !opts.image_path.exists();
    std::fs::create_dir_all(&opts.image_path).map_err(|e| {
        Error::io(
            id,
            format!("create image path {}", opts.image_path.display()),
            e,
        )
    })?;
    let before = entries(&opts.image_path);
    std::fs::create_dir_all(&opts.work_path).map_err(|e| {
        Error::io(
            id,
            format!("create work path {}", opts.work_path.display()),
            e,
        )
    })?;

    // Live checkpoints of a running container hold it frozen from before the dump until its
    // files are captured. A stopping dump needs no freeze: CRIU ends the processes.
    // A runtime that saves its whole sandbox stops it by itself; its processes must not be
    // frozen under it.
    let freezer: Option<Box<dyn Freezer>> =
        if opts.leave_running && !target.paused && !runtime.checkpoints_whole_sandbox() {
            Some(freezer::for_cgroup(id, target.cgroup_path)?)
        } else {
            None
        };
    // Such a runtime's sandbox is paused instead when volumes must match the saved memory.
    let pause_sandbox = runtime.checkpoints_whole_sandbox()
        && opts.leave_running
        && !target.paused
        && volumes::wanted(target.spec);
    let frozen_at = Instant::now();
    if let Some(f) = &freezer {
        f.freeze()?;
    }
    if pause_sandbox {
        runtime.pause(id).await?;
    }
    let result = async {
        let t = Instant::now();
        runtime.checkpoint(id, opts).await?;
        let dump = t.elapsed();
        let t = Instant::now();
        volumes::capture(id, target.spec, &opts.image_path)?;
        Ok::<_, Error>((dump, t.elapsed()))
    }
    .await;
    let frozen = if let Some(f) = &freezer {
        let thawed = f.thaw();
        let window = frozen_at.elapsed();
        thawed?;
        window
    } else if pause_sandbox {
        let resumed = runtime.resume(id).await;
        let window = frozen_at.elapsed();
        resumed?;
        window
    } else {
        Duration::ZERO
    };
    let (dump, files) = match result {
        Ok(t) => t,
        Err(e) => {
            remove_partial(&opts.image_path, &before, created);
            return Err(e);
        }
    };
    // The dump log belongs with the images (checkpointctl and people read it there).
    let _ = std::fs::copy(
        opts.work_path.join("dump.log"),
        opts.image_path.join("dump.log"),
    );
    let timings = Timings {
        frozen,
        dump,
        files,
        total: start.elapsed(),
    };
    info!(
        "{id}: checkpoint to {}: frozen {:?} (dump {:?}, files {:?}), total {:?}{}",
        opts.image_path.display(),
        timings.frozen,
        timings.dump,
        timings.files,
        timings.total,
        if opts.leave_running {
            ", left running"
        } else {
            ", stopped"
        }
    );
    Ok(timings)
}
