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
        tar.follow_symlinks(false);
        tar.append_dir_all(".", src)
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
