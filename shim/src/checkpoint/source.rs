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
    let image = runtime.hooks().restore_image(dir);
    if !runtime.hooks().has_image(&image) {
        return Err(Error::invalid(
            id,
            format!("{} holds no {engine} checkpoint images", image.display()),
        ));
    }
    rootfs::validate(id, dir)?;
    volumes::validate(id, &dir.join(CHECKPOINT_DIR)).map(drop)
}

/// A directory only we can have made: a real directory (not a link), owned by the shim's
/// own user (root), closed to everybody else.
fn check_private(id: &str, dir: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let meta = dir
        .symlink_metadata()
        .map_err(|e| Error::precondition(id, format!("restore source {}: {e}", dir.display())))?;
    if !meta.is_dir() || meta.uid() != nix::unistd::geteuid().as_raw() || meta.mode() & 0o077 != 0 {
        return Err(Error::precondition(
            id,
            format!(
                "restore source {} is not a private directory of root's (0700): restores are prepared by stasisctl only",
                dir.display()
            ),
        ));
    }
    Ok(())
}

/// Resolves a restore annotation to a directory of the restore `store`: `<id>` (a pod) or
/// `<id>/<container dir>` (a container). Returns the id and the directory. A path, anything
/// but a well-formed id and a plain directory name, an unknown id, or a store that is not
/// root's alone are refused: only root prepares restores.
pub fn resolve_restore(store: &Path, owner: &str, value: &str) -> Result<(String, PathBuf)> {
    let refuse = |why: &str| {
        Error::precondition(
            owner,
            format!(
                "{} {value:?} {why}: it names a restore prepared by stasisctl (an id, never a path)",
                stasis_api::layout::RESTORE_ANNOTATION
            ),
        )
    };
    let (id, sub) = match value.split_once('/') {
        Some((id, sub)) => (id, Some(sub)),
        None => (value, None),
    };
    if !stasis_api::layout::is_restore_id(id) {
        return Err(refuse("is not a restore id"));
    }
    if sub.is_some_and(|s| !stasis_api::layout::is_plain_name(s)) {
        return Err(refuse("names no plain container directory"));
    }
    check_private(owner, store)?;
    let dir = store.join(id);
    check_private(owner, &dir).map_err(|_| refuse("is not a prepared restore"))?;
    let dir = match sub {
        Some(sub) => {
            let d = dir.join(sub);
            match d.symlink_metadata() {
                Ok(m) if m.is_dir() => d,
                _ => return Err(refuse("names no container of that restore")),
            }
        }
        None => dir,
    };
    Ok((id.to_string(), dir))
}

/// Marks restore `id` as used by pod `pod` (a file `<id>.pod` beside it, made exclusively):
/// a second pod naming the same restore is refused. The pod must hold the restore's token
/// (`<id>.token`, written by stasisctl into the root-only store): knowing the id is not
/// enough to claim it.
pub fn claim_restore(store: &Path, pod: &str, id: &str, token: Option<&str>) -> Result<()> {
    use std::io::Write;
    let expected = stasis_api::private::open_nofollow(
        &store.join(format!("{id}{}", stasis_api::layout::RESTORE_TOKEN_SUFFIX)),
    )
    .and_then(|mut f| {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut f, &mut s).map(|_| s)
    })
    .unwrap_or_default();
    let given = token.unwrap_or_default();
    // Compared in full whatever differs first: the token's bytes are not to be guessed one
    // at a time.
    let same = expected.len() == given.len()
        && !expected.is_empty()
        && expected
            .bytes()
            .zip(given.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
    if !same {
        return Err(Error::precondition(
            pod,
            format!(
                "the pod does not hold the claim token of restore {id} ({}): only the pod stasisctl creates for a restore may take it",
                stasis_api::layout::RESTORE_TOKEN_ANNOTATION
            ),
        ));
    }
    let claim = store.join(format!("{id}.pod"));
    match crate::util::create_private(&claim) {
        Ok(mut f) => f
            .write_all(pod.as_bytes())
            .map_err(|e| Error::io(pod, "claim the restore", e)),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let owner = std::fs::read_to_string(&claim).unwrap_or_default();
            if owner == pod {
                Ok(())
            } else {
                Err(Error::precondition(
                    pod,
                    format!("restore {id} is used by pod {owner} already"),
                ))
            }
        }
        Err(e) => Err(Error::io(pod, "claim the restore", e)),
    }
}
