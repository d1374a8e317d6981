//! Small helpers every layer uses: blocking work off the async threads, and directory chores.

use std::path::Path;

pub mod mounts;

use crate::error::{Error, Result};

/// Runs blocking work (file walks, tar, freezer waits) on tokio's blocking pool so the shim's
/// two async workers keep answering State, Pids and Connect meanwhile.
pub async fn blocking<T, F>(id: &str, step: &str, f: F) -> Result<T>
where
    F: FnOnce() -> Result<T> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::other(id, step, format!("worker failed: {e}")))?
}

/// A name nobody can guess or pre-create: 64 random bits from the kernel.
pub fn random_suffix() -> std::io::Result<String> {
    stasis_api::private::random_suffix()
}

/// Bytes of every regular file below `p` (symlinks not followed).
pub fn dir_size(p: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(p) else {
        return 0;
    };
    rd.flatten()
        .map(|e| match e.path().symlink_metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) if m.is_file() => m.len(),
            _ => 0,
        })
        .sum()
}

/// Removes everything inside `dir`, keeping `dir` itself (never following symlinks).
pub fn empty_dir(dir: &Path) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            remove_any(&e.path());
        }
    }
}

/// Removes a file, link or directory tree at `p`, whichever it is.
pub fn remove_any(p: &Path) {
    let _ = match p.symlink_metadata() {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(p),
        Ok(_) => std::fs::remove_file(p),
        Err(_) => Ok(()),
    };
}

/// Flushes the whole file system holding `dir` to disk (syncfs): what a stopping checkpoint
/// needs before it ends the container whose images are there.
pub fn sync_fs(id: &str, dir: &Path) -> Result<()> {
    let d = std::fs::File::open(dir).map_err(|e| Error::io(id, "open checkpoint dir", e))?;
    nix::unistd::syncfs(&d).map_err(|e| Error::io(id, "sync checkpoint to disk", e.into()))
}

/// Where the shim keeps its own scratch directories: root's, 0700.
const PRIVATE_BASE: &str = "/run/stasis/work";

/// Removes the scratch directories of `id` that a dead shim left (`<what>-<id>-<random>`).
pub fn remove_private_dirs_of(id: &str) {
    let ours = |name: &str| {
        // Exactly `<what>-<id>-<16 hex>`: an id that is part of another's cannot match.
        name.rsplit_once('-').is_some_and(|(head, random)| {
            random.len() == 16
                && random.bytes().all(|b| b.is_ascii_hexdigit())
                && head.ends_with(&format!("-{id}"))
        })
    };
    for e in std::fs::read_dir(PRIVATE_BASE)
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        let is_dir = e.file_type().is_ok_and(|t| t.is_dir());
        if is_dir && !id.is_empty() && ours(&name) {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// A fresh scratch directory nobody else can have prepared: `<PRIVATE_BASE>/<what>-<id>-<random>`,
/// 0700, under a base that must be a real directory owned by root and closed to others (a
/// predictable path under /tmp could be pre-created or planted with symlinks by any user).
pub fn private_dir(id: &str, what: &str) -> Result<std::path::PathBuf> {
    let base = Path::new(PRIVATE_BASE);
    stasis_api::private::private_root(base).map_err(|e| match e.kind() {
        std::io::ErrorKind::PermissionDenied => Error::precondition(
            id,
            format!("{PRIVATE_BASE} must be a directory owned by root with mode 0700"),
        ),
        _ => Error::io(id, format!("create {PRIVATE_BASE}"), e),
    })?;
    let suffix = random_suffix().map_err(|e| Error::io(id, "random name", e))?;
    // The id in the name: a shim that dies leaves its scratch to `delete`.
    let dir = base.join(format!("{what}-{id}-{suffix}"));
    stasis_api::private::create_private_dir(&dir)
        .map_err(|e| Error::io(id, format!("create {}", dir.display()), e))?;
    Ok(dir)
}

/// Creates a new file for a checkpoint, 0600, never through a symlink and never over an
/// existing file: a checkpoint holds memory and environment secrets, and its directory may
/// have been handed to us by someone else.
pub fn create_private(path: &Path) -> std::io::Result<std::fs::File> {
    stasis_api::private::create_private(path)
}

/// [`create_private`] with `data` in it.
pub fn write_private(path: &Path, data: impl AsRef<[u8]>) -> std::io::Result<()> {
    stasis_api::private::write_private(path, data)
}

/// Copies a regular file into a new private file; neither side is opened through a symlink
/// (CRIU's logs and stats are copied this way: a planted link copies nothing).
pub fn copy_private(from: &Path, to: &Path) -> std::io::Result<u64> {
    let mut src = stasis_api::private::open_nofollow(from)?;
    if !src.metadata()?.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{} is not a regular file", from.display()),
        ));
    }
    std::io::copy(&mut src, &mut create_private(to)?)
}
