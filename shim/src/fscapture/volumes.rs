//! Contents of bind-mounted volumes, captured with the memory so that a restore sees files that
//! match it. Which volumes: the container annotation `io.stasis.checkpoint.volumes`.

use std::path::{Component, Path};

use stasis_api::layout::{CapturedVolume as Captured, VOLUMES_ANNOTATION, VOLUMES_DIR as DIR};

pub use stasis_api::layout::VOLUMES_INDEX as INDEX;

use crate::{
    error::{Error, Result},
    spec::ContainerSpec,
};

/// The writable bind mounts of `spec` that the annotation asks to capture: (destination, source).
fn selected(spec: &ContainerSpec) -> Vec<(String, String)> {
    let Some(wanted) = spec.annotation(VOLUMES_ANNOTATION) else {
        return Vec::new();
    };
    let wanted: Vec<&str> = wanted
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    spec.mounts()
        .iter()
        .filter_map(|m| {
            let dest = m.destination().display().to_string();
            let src = m.source().as_ref()?.display().to_string();
            let options: &[String] = m.options().as_deref().unwrap_or_default();
            let bind =
                m.typ().as_deref() == Some("bind") || options.iter().any(|o| o.contains("bind"));
            let ro = options.iter().any(|o| o == "ro");
            let chosen = wanted.contains(&"*") || wanted.contains(&dest.as_str());
            (bind && !ro && chosen && Path::new(&src).is_dir()).then_some((dest, src))
        })
        .collect()
}

/// Whether the container asks for any volume to be captured.
pub fn wanted(spec: &ContainerSpec) -> bool {
    !selected(spec).is_empty()
}

/// Tars the selected volumes into `<image>/volumes/` and writes the index. Runs while frozen.
pub fn capture(id: &str, spec: &ContainerSpec, image: &Path) -> Result<Vec<Captured>> {
    let volumes = selected(spec);
    if volumes.is_empty() {
        return Ok(Vec::new());
    }
    let dir = image.join(DIR);
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(id, "create volumes dir", e))?;
    let mut captured = Vec::new();
    for (n, (dest, src)) in volumes.iter().enumerate() {
        let archive = format!("{DIR}/{n}.tar");
        let file = crate::util::create_private(&image.join(&archive))
            .map_err(|e| Error::io(id, format!("create {archive}"), e))?;
        let mut tar = tar::Builder::new(std::io::BufWriter::new(file));
        capture_tree(&mut tar, Path::new(src))
            .and_then(|_| tar.into_inner().map(drop))
            .map_err(|e| Error::io(id, format!("capture volume {dest} ({src})"), e))?;
        captured.push(Captured {
            destination: dest.clone(),
            archive,
        });
    }
    let index = serde_json::to_vec_pretty(&captured)
        .map_err(|e| Error::other(id, "encode volume index", e))?;
    crate::util::write_private(&image.join(INDEX), index)
        .map_err(|e| Error::io(id, "write volume index", e))?;
    Ok(captured)
}

/// Tars the tree at `root` as `.`: every entry is opened from its parent directory's
/// descriptor without following links (O_NOFOLLOW) and described from the descriptor it was
/// read through, so an entry swapped for a link while the capture runs (a volume may be shared
/// with containers that are not frozen) is captured as that link, never followed out of the
/// volume. Sockets, FIFOs and devices are left out.
fn capture_tree<W: std::io::Write>(tar: &mut tar::Builder<W>, root: &Path) -> std::io::Result<()> {
    use nix::fcntl::{open, OFlag};
    use nix::sys::stat::Mode;
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let fd = open(root, flags, Mode::empty()).map_err(std::io::Error::from)?;
    append_dir(tar, fd, Path::new("."))
}

fn append_dir<W: std::io::Write>(
    tar: &mut tar::Builder<W>,
    fd: std::os::fd::OwnedFd,
    at: &Path,
) -> std::io::Result<()> {
    use nix::fcntl::{openat, readlinkat, AtFlags, OFlag};
    use nix::sys::stat::{fstatat, Mode, SFlag};
    let dir = std::fs::File::from(fd);
    let mut header = tar::Header::new_gnu();
    header.set_metadata(&dir.metadata()?);
    header.set_entry_type(tar::EntryType::Directory);
    tar.append_data(&mut header, at, std::io::empty())?;
    let names: Vec<std::ffi::OsString> = {
        let dup = dir.try_clone()?;
        let mut d = nix::dir::Dir::from_fd(dup.into()).map_err(std::io::Error::from)?;
        d.iter()
            .filter_map(|e| e.ok())
            .map(|e| {
                use std::os::unix::ffi::OsStrExt;
                std::ffi::OsStr::from_bytes(e.file_name().to_bytes()).to_os_string()
            })
            .filter(|n| n != "." && n != "..")
            .collect()
    };
    for name in names {
        let path = at.join(&name);
        let st = match fstatat(&dir, name.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            // Removed meanwhile: nothing to capture.
            Err(nix::Error::ENOENT) => continue,
            Err(e) => return Err(e.into()),
        };
        let kind = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
        let open_flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        if kind == SFlag::S_IFDIR {
            match openat(
                &dir,
                name.as_os_str(),
                open_flags | OFlag::O_DIRECTORY,
                Mode::empty(),
            ) {
                Ok(child) => append_dir(tar, child, &path)?,
                // Swapped for a link (ELOOP/ENOTDIR) or removed: captured as what it is now,
                // on the next run; never followed.
                Err(nix::Error::ELOOP | nix::Error::ENOTDIR | nix::Error::ENOENT) => {}
                Err(e) => return Err(e.into()),
            }
        } else if kind == SFlag::S_IFREG {
            let file = match openat(
                &dir,
                name.as_os_str(),
                open_flags | OFlag::O_NONBLOCK,
                Mode::empty(),
            ) {
                Ok(f) => std::fs::File::from(f),
                Err(nix::Error::ELOOP | nix::Error::ENOENT) => continue,
                Err(e) => return Err(e.into()),
            };
            let meta = file.metadata()?;
            if !meta.is_file() {
                continue;
            }
            let mut header = tar::Header::new_gnu();
            header.set_metadata(&meta);
            // Exactly the size read from the descriptor, even if the file grows meanwhile.
            tar.append_data(&mut header, &path, std::io::Read::take(&file, meta.len()))?;
        } else if kind == SFlag::S_IFLNK {
            let target = match readlinkat(&dir, name.as_os_str()) {
                Ok(t) => t,
                Err(nix::Error::ENOENT | nix::Error::EINVAL) => continue,
                Err(e) => return Err(e.into()),
            };
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(tar::EntryType::Symlink);
            header.set_size(0);
            header.set_mode(st.st_mode & 0o7777);
            header.set_uid(st.st_uid.into());
            header.set_gid(st.st_gid.into());
            header.set_mtime(st.st_mtime.max(0) as u64);
            tar.append_link(&mut header, &path, &target)?;
        }
    }
    Ok(())
}

/// Checks the captured volumes beside `image` before anything is restored: a sane index and
/// archives that pass the same entry checks as a rootfs diff (no devices, no escapes, no links
/// leading out). Returns the index (empty when nothing was captured).
pub fn validate(id: &str, image: &Path) -> Result<Vec<Captured>> {
    let index = image.join(INDEX);
    if !index.exists() {
        return Ok(Vec::new());
    }
    let text = std::fs::read(&index).map_err(|e| Error::io(id, "read volume index", e))?;
    let captured: Vec<Captured> = serde_json::from_slice(&text)
        .map_err(|e| Error::invalid(id, format!("volume index: {e}")))?;
    for c in &captured {
        if Path::new(&c.archive)
            .components()
            .any(|p| !matches!(p, Component::Normal(_)))
        {
            return Err(Error::invalid(
                id,
                format!("volume archive path {:?} leaves the checkpoint", c.archive),
            ));
        }
        super::rootfs::validate_tar(
            id,
            &format!("volume archive {} ({})", c.archive, c.destination),
            &image.join(&c.archive),
        )?;
    }
    Ok(captured)
}

/// Puts captured volume contents back into the new container's volumes (matched by
/// destination). Every archive is checked before any volume is touched, and a volume's host
/// copy is replaced only once its checkpointed contents are completely unpacked beside it
/// (then swapped in with one atomic exchange). `claim` says whether this host directory is
/// still to be restored (a volume shared by several containers of a pod is restored once).
pub fn restore(
    id: &str,
    spec: &ContainerSpec,
    image: &Path,
    mut claim: impl FnMut(&Path) -> Result<bool>,
) -> Result<()> {
    for c in validate(id, image)? {
        let Some(src) = spec.mounts().iter().find_map(|m| {
            (m.destination() == Path::new(&c.destination))
                .then(|| m.source().as_ref().map(|s| s.display().to_string()))?
        }) else {
            return Err(Error::precondition(
                id,
                format!(
                    "checkpoint has volume {} but the container mounts nothing there",
                    c.destination
                ),
            ));
        };
        let target = Path::new(&src);
        if !claim(target)? {
            continue;
        }
        replace_with_archive(id, &image.join(&c.archive), target, &c.destination)?;
    }
    Ok(())
}

/// Unpacks `archive` beside `target`, then swaps the result in for `target` (RENAME_EXCHANGE)
/// and removes the old contents. Where the exchange is impossible (`target` is a mount
/// point), the old entries are removed and the new ones moved in, still only after the whole
/// archive was unpacked.
fn replace_with_archive(id: &str, archive: &Path, target: &Path, dest: &str) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let parent = target
        .parent()
        .ok_or_else(|| Error::invalid(id, format!("volume {dest}: no parent directory")))?;
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let suffix = crate::util::random_suffix().map_err(|e| Error::io(id, "random name", e))?;
    let staging = parent.join(format!(".{name}.stasis-restore-{suffix}"));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&staging)
        .map_err(|e| Error::io(id, format!("create {}", staging.display()), e))?;
    let unpacked = (|| -> Result<()> {
        let file = std::fs::File::open(archive)
            .map_err(|e| Error::io(id, format!("open {}", archive.display()), e))?;
        let mut tar = tar::Archive::new(file);
        tar.set_preserve_permissions(true);
        // Numeric owners first, then modes (the tar crate's order): a setuid bit only ever comes
        // back on the owner it had, never on root by default.
        tar.set_preserve_ownerships(true);
        tar.set_overwrite(true);
        for entry in tar
            .entries()
            .map_err(|e| Error::io(id, "read volume archive", e))?
        {
            let mut entry = entry.map_err(|e| Error::io(id, "read volume archive", e))?;
            // unpack_in refuses entries that would land outside the staging directory.
            let inside = entry
                .unpack_in(&staging)
                .map_err(|e| Error::io(id, format!("restore volume {dest}"), e))?;
            if !inside {
                return Err(Error::invalid(
                    id,
                    format!("volume archive of {dest} has an entry outside the volume"),
                ));
            }
        }
        // The volume directory keeps the mode it had (the archive's `.` may have set another).
        if let Ok(meta) = std::fs::metadata(target) {
            let _ = std::fs::set_permissions(
                &staging,
                std::fs::Permissions::from_mode(meta.permissions().mode()),
            );
        }
        Ok(())
    })();
    if let Err(e) = unpacked {
        crate::util::remove_any(&staging);
        return Err(e);
    }
    use nix::fcntl::{renameat2, RenameFlags, AT_FDCWD};
    match renameat2(
        AT_FDCWD,
        &staging,
        AT_FDCWD,
        target,
        RenameFlags::RENAME_EXCHANGE,
    ) {
        // `staging` now holds the old contents.
        Ok(()) => crate::util::remove_any(&staging),
        Err(_) => {
            crate::util::empty_dir(target);
            let entries = std::fs::read_dir(&staging)
                .map_err(|e| Error::io(id, format!("read {}", staging.display()), e))?;
            for e in entries.flatten() {
                std::fs::rename(e.path(), target.join(e.file_name()))
                    .map_err(|err| Error::io(id, format!("move into volume {dest}"), err))?;
            }
            let _ = std::fs::remove_dir(&staging);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_are_captured_as_links_and_never_followed() {
        let d = std::env::temp_dir().join(format!("stasis-vol-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        let vol = d.join("vol");
        std::fs::create_dir_all(vol.join("sub")).unwrap();
        std::fs::write(vol.join("a.txt"), "hello").unwrap();
        std::fs::write(vol.join("sub/b.txt"), "inner").unwrap();
        std::fs::write(d.join("outside"), "host secret").unwrap();
        std::os::unix::fs::symlink(d.join("outside"), vol.join("s")).unwrap();
        std::os::unix::fs::symlink("..", vol.join("up")).unwrap();
        let mut bytes = Vec::new();
        {
            let mut tar = tar::Builder::new(&mut bytes);
            capture_tree(&mut tar, &vol).unwrap();
            tar.finish().unwrap();
        }
        let mut seen = std::collections::BTreeMap::new();
        for e in tar::Archive::new(bytes.as_slice()).entries().unwrap() {
            let mut e = e.unwrap();
            let path = e.path().unwrap().display().to_string();
            let what = match e.header().entry_type() {
                tar::EntryType::Symlink => {
                    format!("-> {}", e.link_name().unwrap().unwrap().display())
                }
                tar::EntryType::Directory => "dir".to_string(),
                _ => {
                    let mut s = String::new();
                    std::io::Read::read_to_string(&mut e, &mut s).unwrap();
                    s
                }
            };
            seen.insert(path.trim_start_matches("./").to_string(), what);
        }
        assert_eq!(seen["a.txt"], "hello");
        assert_eq!(seen["sub/b.txt"], "inner");
        assert_eq!(seen["s"], format!("-> {}", d.join("outside").display()));
        assert_eq!(seen["up"], "-> ..");
        assert!(
            !seen.values().any(|v| v.contains("host secret")),
            "{seen:?}"
        );
        // A volume that is itself a link is refused, not followed.
        std::os::unix::fs::symlink(&vol, d.join("vol-link")).unwrap();
        let mut tar = tar::Builder::new(Vec::new());
        assert!(capture_tree(&mut tar, &d.join("vol-link")).is_err());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
