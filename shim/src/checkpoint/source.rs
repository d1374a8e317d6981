//! Checks of a checkpoint directory before anything is restored from it: that this backend
//! wrote it, that its images are there, and that its file system diff is safe to apply.

use std::path::{Path, PathBuf};

use stasis_api::layout::{ContainerMeta, PodOptions, CHECKPOINT_DIR};

use crate::{
    error::{Error, Result},
    fscapture::{rootfs, volumes},
    runtime::OciRuntime,
};

fn engine_mismatch(id: &str, what: &str, written_by: &str, engine: &str) -> Error {
    Error::precondition(
        id,
        format!(
            "{what} was written by the {written_by} backend; this pod runs on the {engine} backend, which cannot restore it (restore it under a runtime handler that uses {written_by})"
        ),
    )
}

/// Checks a pod checkpoint before a pod is restored from it: that this backend wrote it.
/// Returns its `pod.options` and the containers' directories.
pub fn check_pod_dir(id: &str, dir: &Path, engine: &str) -> Result<(PodOptions, Vec<PathBuf>)> {
    let options = PodOptions::read(dir).map_err(|e| Error::invalid(id, e.to_string()))?;
    if options.engine() != engine {
        return Err(engine_mismatch(
            id,
            &format!("pod checkpoint {}", dir.display()),
            options.engine(),
            engine,
        ));
    }
    let dirs = options.containers.values().map(|d| dir.join(d)).collect();
    Ok((options, dirs))
}

/// Checks a per-container checkpoint directory before a container is restored from it.
pub fn check_container_dir(id: &str, dir: &Path, runtime: &dyn OciRuntime) -> Result<()> {
    let engine = runtime.name();
    let meta = ContainerMeta::read(dir).map_err(|e| Error::invalid(id, e.to_string()))?;
    if let Some(meta) = meta {
        if meta.engine != engine {
            return Err(engine_mismatch(id, "the checkpoint", &meta.engine, engine));
        }
    }
    let image = runtime.restore_image(dir);
    if !runtime.has_image(&image) {
        return Err(Error::invalid(
            id,
            format!("{} holds no {engine} checkpoint images", image.display()),
        ));
    }
    rootfs::validate(id, dir)?;
    volumes::validate(id, &dir.join(CHECKPOINT_DIR)).map(drop)
}
