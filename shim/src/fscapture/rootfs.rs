//! A container's writable layer: captured from the overlay upper directory as the
//! checkpointctl/Podman/CRI-O layout has it (`rootfs-diff.tar` for what changed,
//! `deleted.files` for what was removed), and applied to a fresh rootfs on restore.

use std::{
    os::unix::fs::{FileTypeExt, MetadataExt},
    path::{Component, Path, PathBuf},
};

use crate::error::{Error, Result};

pub use stasis_api::layout::{DELETED_FILES as DELETED, ROOTFS_DIFF as DIFF_TAR};

fn is_whiteout(meta: &std::fs::Metadata) -> bool {
    meta.file_type().is_char_device() && meta.rdev() == 0
}

fn is_opaque(dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).unwrap_or_default();
    let name = c"trusted.overlay.opaque";
    let mut buf = [0u8; 4];
    // SAFETY: valid C strings and a buffer of the given length.
    let n = unsafe {
        libc::lgetxattr(
            path.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    n == 1 && buf[0] == b'y'
}

/// Writes `<dest>/rootfs-diff.tar` and `<dest>/deleted.files` from the overlay upper dir.
/// Returns the size of the tar.
pub fn capture(id: &str, upper: &Path, dest: &Path) -> Result<u64> {
    let tar_path = dest.join(DIFF_TAR);
    let file = crate::util::create_private(&tar_path)
        .map_err(|e| Error::io(id, "create rootfs-diff.tar", e))?;
    let mut tar = tar::Builder::new(std::io::BufWriter::new(file));
    tar.follow_symlinks(false);
    let mut deleted: Vec<String> = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = upper.join(&rel);
        let mut names: Vec<_> = std::fs::read_dir(&dir)
            .map_err(|e| Error::io(id, format!("read {}", dir.display()), e))?
            .flatten()
            .map(|e| e.file_name())
            .collect();
        names.sort();
        for name in names {
            let rel_path = rel.join(&name);
            let full = upper.join(&rel_path);
            let meta = std::fs::symlink_metadata(&full)
                .map_err(|e| Error::io(id, format!("stat {}", full.display()), e))?;
            let shown = format!("/{}", rel_path.display());
            if is_whiteout(&meta) {
                deleted.push(shown);
                continue;
            }
            let ft = meta.file_type();
            if ft.is_dir() {
                if is_opaque(&full) {
                    // Everything below it in the image is gone; the tar brings back what is left.
                    deleted.push(shown.clone());
                }
                tar.append_path_with_name(&full, &rel_path)
                    .map_err(|e| Error::io(id, format!("add {shown} to rootfs diff"), e))?;
                stack.push(rel_path);
            } else if ft.is_file() || ft.is_symlink() {
                tar.append_path_with_name(&full, &rel_path)
                    .map_err(|e| Error::io(id, format!("add {shown} to rootfs diff"), e))?;
            }
            // Sockets, fifos and devices in the upper dir are left out: they do not survive a
            // restore meaningfully and a restore refuses devices.
        }
    }
    tar.into_inner()
        .and_then(|mut w| std::io::Write::flush(&mut w))
        .map_err(|e| Error::io(id, "finish rootfs-diff.tar", e))?;
    let list =
        serde_json::to_vec(&deleted).map_err(|e| Error::other(id, "encode deleted.files", e))?;
    crate::util::write_private(&dest.join(DELETED), list)
        .map_err(|e| Error::io(id, "write deleted.files", e))?;
    Ok(std::fs::metadata(&tar_path).map(|m| m.len()).unwrap_or(0))
}

/// `rel` (an absolute-in-container or relative path) as a path below `root`, refusing `..`
/// and any symlink on the way (a hostile diff must not reach outside the rootfs).
fn inside(id: &str, root: &Path, rel: &str) -> Result<PathBuf> {
    let mut out = root.to_path_buf();
    let parts: Vec<_> = Path::new(rel.trim_start_matches('/'))
        .components()
        .collect();
    for (i, c) in parts.iter().enumerate() {
        match c {
            Component::Normal(p) => {
                out.push(p);
                let last = i + 1 == parts.len();
                if !last && out.is_symlink() {
                    return Err(Error::invalid(
                        id,
                        format!("path {rel:?} goes through a symlink"),
                    ));
                }
            }
            Component::CurDir => {}
            _ => {
                return Err(Error::invalid(
                    id,
                    format!("path {rel:?} leaves the root file system"),
                ))
            }
        }
    }
    if out == root {
        return Err(Error::invalid(
            id,
            format!("path {rel:?} names the root itself"),
        ));
    }
    Ok(out)
}

/// Checks `rootfs-diff.tar` and `deleted.files` in `dir` without touching anything.
pub fn validate(id: &str, dir: &Path) -> Result<()> {
    let scratch = Path::new("/nonexistent-stasis-root");
    if let Ok(text) = std::fs::read(dir.join(DELETED)) {
        let list: Vec<String> = serde_json::from_slice(&text)
            .map_err(|e| Error::invalid(id, format!("deleted.files: {e}")))?;
        for p in list {
            inside(id, scratch, &p)?;
        }
    }
    let tar_path = dir.join(DIFF_TAR);
    if !tar_path.exists() {
        return Ok(());
    }
    validate_tar(id, DIFF_TAR, &tar_path)
}

/// Checks every entry of the tar at `path` (`what` names it in errors) before anything is
/// unpacked: no absolute paths or `..`, no devices or fifos, hard links only to paths inside,
/// and no entry below a symlink the same archive creates (it could point anywhere).
pub fn validate_tar(id: &str, what: &str, path: &Path) -> Result<()> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(id, format!("open {what}"), e))?;
    // Raw headers first: a metadata record the reader below would hold whole is refused by
    // its size (the file is on disk already, so its total needs no bound here).
    {
        let mut raw = tar::Archive::new(&file);
        let entries = raw
            .entries()
            .map_err(|e| Error::invalid(id, format!("{what}: {e}")))?;
        stasis_api::tarbound::bound_entries(entries, u64::MAX)
            .map_err(|e| Error::invalid(id, format!("{what}: {e}")))?;
    }
    let file = std::fs::File::open(path).map_err(|e| Error::io(id, format!("open {what}"), e))?;
    let mut archive = tar::Archive::new(file);
    let mut links: Vec<PathBuf> = Vec::new();
    for entry in archive
        .entries()
        .map_err(|e| Error::invalid(id, format!("{what}: {e}")))?
    {
        let entry = entry.map_err(|e| Error::invalid(id, format!("{what}: {e}")))?;
        let p = check_entry(id, what, &entry)?;
        if let Some(link) = links.iter().find(|l| p.starts_with(l) && p != **l) {
            return Err(Error::invalid(
                id,
                format!(
                    "{what} entry {:?} goes through the symlink {:?} the archive creates",
                    p, link
                ),
            ));
        }
        if entry.header().entry_type() == tar::EntryType::Symlink {
            links.push(p);
        }
    }
    Ok(())
}

fn check_entry<R: std::io::Read>(id: &str, what: &str, entry: &tar::Entry<R>) -> Result<PathBuf> {
    use stasis_api::tarbound::{check_entry, EntryError, Links};
    // The one rule for tar entries; a writable layer or a volume may hold symbolic links and
    // hard links inside it.
    check_entry(entry, Links::Inside).map_err(|e| {
        let why = match e {
            EntryError::Unreadable(e) => format!("{what}: {e}"),
            EntryError::Climbs(name) | EntryError::Absolute(name) => {
                format!("{what} entry {name:?} leads outside the directory it is unpacked into")
            }
            EntryError::HardLinkOutside(name) => {
                format!("{what} hard link {name:?} points outside")
            }
            EntryError::Device(name) => {
                format!("{what} entry {name:?} is a device node, which a restore refuses")
            }
            EntryError::Kind { name, kind } => {
                format!("{what} entry {name:?} is a {kind:?}, which a restore refuses")
            }
            // Links::Inside allows every link that stays inside.
            EntryError::Link { name, .. } => format!("{what} link {name:?} is refused"),
        };
        Error::invalid(id, why)
    })
}

/// Applies deletions, then the diff, to the mounted rootfs of the restored container.
pub fn apply(id: &str, dir: &Path, rootfs: &Path) -> Result<()> {
    validate(id, dir)?;
    if let Ok(text) = std::fs::read(dir.join(DELETED)) {
        let list: Vec<String> = serde_json::from_slice(&text).unwrap_or_default();
        for p in list {
            let target = inside(id, rootfs, &p)?;
            let _ = if target.is_dir() && !target.is_symlink() {
                std::fs::remove_dir_all(&target)
            } else {
                std::fs::remove_file(&target)
            };
        }
    }
    let tar_path = dir.join(DIFF_TAR);
    if !tar_path.exists() {
        return Ok(());
    }
    let file =
        std::fs::File::open(&tar_path).map_err(|e| Error::io(id, "open rootfs-diff.tar", e))?;
    let mut archive = tar::Archive::new(file);
    archive.set_preserve_permissions(true);
    // Numeric owners first, then modes (the tar crate's order): a setuid bit only ever comes
    // back on the owner it had, never on root by default.
    archive.set_preserve_ownerships(true);
    archive.set_overwrite(true);
    archive.set_unpack_xattrs(false);
    for entry in archive
        .entries()
        .map_err(|e| Error::invalid(id, format!("rootfs-diff.tar: {e}")))?
    {
        let mut entry = entry.map_err(|e| Error::invalid(id, format!("rootfs-diff.tar: {e}")))?;
        let path = check_entry(id, DIFF_TAR, &entry)?;
        // A file that replaces a directory (or the reverse) must go first.
        let target = inside(id, rootfs, &path.display().to_string())?;
        if let Ok(meta) = std::fs::symlink_metadata(&target) {
            let is_dir_entry = entry.header().entry_type() == tar::EntryType::Directory;
            if meta.is_dir() != is_dir_entry || meta.file_type().is_symlink() {
                let _ = if meta.is_dir() {
                    std::fs::remove_dir_all(&target)
                } else {
                    std::fs::remove_file(&target)
                };
            }
        }
        // unpack_in also refuses anything resolving outside `rootfs` through symlinks.
        let ok = entry
            .unpack_in(rootfs)
            .map_err(|e| Error::io(id, format!("restore {} into the rootfs", path.display()), e))?;
        if !ok {
            return Err(Error::invalid(
                id,
                format!(
                    "rootfs-diff.tar entry {:?} leaves the root file system",
                    path
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A rootfs diff whose first record claims a 20 GiB PAX header is refused from that header,
    /// before the tar reader would hold it in memory.
    #[test]
    fn an_inner_tar_with_a_huge_pax_header_is_refused_from_its_header() {
        let dir = std::env::temp_dir().join(format!("stasis-pax-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut h = tar::Header::new_ustar();
        h.set_path("x").unwrap();
        h.set_entry_type(tar::EntryType::XHeader);
        h.set_size(20 << 30);
        h.set_cksum();
        let mut bytes = h.as_bytes().to_vec();
        bytes.extend_from_slice(&[0u8; 1024]);
        let path = dir.join("rootfs-diff.tar");
        std::fs::write(&path, bytes).unwrap();
        let err = validate_tar("c1", "rootfs-diff.tar", &path)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("PAX header record of 21474836480 bytes"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
