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
        let file = std::fs::File::create(image.join(&archive))
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
    std::fs::write(image.join(INDEX), index).map_err(|e| Error::io(id, "write volume index", e))?;
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
/// destination), replacing what they held. Every archive is checked before any volume is
/// touched.
pub fn restore(id: &str, spec: &ContainerSpec, image: &Path) -> Result<()> {
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
        // Replace the contents, keep the directory (it is the bind-mount source).
        for e in std::fs::read_dir(target)
            .map_err(|e| Error::io(id, format!("read volume {src}"), e))?
            .flatten()
        {
            let p = e.path();
            let _ = if p.is_dir() && !p.is_symlink() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
        }
        let file = std::fs::File::open(image.join(&c.archive))
            .map_err(|e| Error::io(id, format!("open {}", c.archive), e))?;
        let mut archive = tar::Archive::new(file);
        archive.set_preserve_permissions(true);
        archive.set_overwrite(true);
        for entry in archive
            .entries()
            .map_err(|e| Error::io(id, "read volume archive", e))?
        {
            let mut entry = entry.map_err(|e| Error::io(id, "read volume archive", e))?;
            // unpack_in refuses entries that would land outside `target`.
            let inside = entry
                .unpack_in(target)
                .map_err(|e| Error::io(id, format!("restore volume {}", c.destination), e))?;
            if !inside {
                return Err(Error::invalid(
                    id,
                    format!(
                        "volume archive {} has an entry outside the volume",
                        c.archive
                    ),
                ));
            }
        }
    }
    Ok(())
}
