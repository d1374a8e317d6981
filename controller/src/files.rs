//! stasisctl's private files and directories, through `stasis_api::private` (the rules the
//! shim follows too), with errors that name the path.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use stasis_api::private;

/// Root's private staging area for checkpoints whose output directory is not root's alone.
pub const CHECKPOINT_STAGING: &str = "/var/lib/stasis/checkpoints";

/// A name nobody can guess or pre-create: 64 random bits from the kernel.
pub fn random_suffix() -> Result<String> {
    private::random_suffix().context("read /dev/urandom")
}

/// 128 random bits: an id nobody can guess (restore ids, claim tokens).
pub fn random_id() -> Result<String> {
    Ok(format!("{}{}", random_suffix()?, random_suffix()?))
}

/// A directory of root's that only root may enter (created 0700 if missing); refused when it
/// is anything else (a link, another owner, open to others).
pub fn private_root(dir: &Path) -> Result<PathBuf> {
    match private::private_root(dir) {
        Ok(()) => Ok(dir.to_path_buf()),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => anyhow::bail!(
            "{} must be a directory of root's with mode 0700",
            dir.display()
        ),
        Err(e) => Err(e).with_context(|| format!("create {}", dir.display())),
    }
}

/// A new directory, 0700, that did not exist (never a link or somebody else's).
pub fn create_private_dir(dir: &Path) -> Result<()> {
    private::create_private_dir(dir).with_context(|| format!("create {}", dir.display()))
}

/// A new file at `path` with `mode`, never through a link, never over a file.
pub fn create_file(path: &Path, mode: u32) -> Result<std::fs::File> {
    private::create_file(path, mode)
        .with_context(|| format!("create {} (it must not exist)", path.display()))
}

/// Writes `data` to a new file at `path` (0600, never through a link, never over a file).
pub fn write_new_private(path: &Path, data: &[u8]) -> Result<()> {
    use std::io::Write;
    create_file(path, 0o600)?
        .write_all(data)
        .with_context(|| format!("write {}", path.display()))
}

/// Bytes free for an unprivileged writer on the file system of `dir`.
// The statvfs field types differ between targets: the conversions are not useless everywhere.
#[allow(clippy::useless_conversion)]
pub fn free_space(dir: &Path) -> Result<u64> {
    let st = nix::sys::statvfs::statvfs(dir)
        .with_context(|| format!("free space of {}", dir.display()))?;
    Ok(u64::from(st.blocks_available()) * u64::from(st.fragment_size()))
}

/// Opens `path` for reading, never through a link at its last component.
pub fn open_nofollow(path: &Path) -> Result<std::fs::File> {
    private::open_nofollow(path).with_context(|| format!("open {}", path.display()))
}
