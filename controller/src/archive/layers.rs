//! A checkpoint image's layers, each read once: its headers bounded, its entries checked
//! and written, and (by its reader) its blob's digest checked at its end, in one pass. An
//! uncompressed layer whose blob is a file on this node (containerd's content store) leaves
//! its page images there instead, for the shim to serve from, each chunk checked against the
//! manifest, as from an uncompressed archive.

use super::*;

/// One tar stream of a layered checkpoint (an image): unpacked at the checkpoint's top, or
/// into the plain-named directory `dir` below it. `open` gives its bytes, read once.
pub struct Layer<'a> {
    pub dir: Option<String>,
    /// How errors name it (its digest).
    pub name: String,
    pub open: Box<dyn Fn() -> Result<Box<dyn Read>> + 'a>,
    /// The blob as a plain tar file on this node (in containerd's content store, which
    /// checked its digest when it took it in): its page images are left there.
    pub blob: Option<PathBuf>,
}

/// Unpacks the layers of a checkpoint image into `dest` (created; must not exist) with the
/// checks of [`extract_with`], reading each layer once: every header is bounded as an
/// archive's first pass bounds it and every entry checked before a byte of it is written;
/// the layer is then read to its end, so that its reader checks its digest. On any error
/// (a changed blob above all) `dest` is removed again: nothing is left. A layer with a
/// `blob` file keeps its page images there: returned as the restore's page source.
pub fn unpack_layers(
    dest: &Path,
    opening: &Opening,
    layers: Vec<Layer<'_>>,
) -> Result<(PodOptions, Option<layout::PageSource>)> {
    let mut kept = LeftInArchive::default();
    let options = into_new_dir(
        dest,
        |_| Ok(()),
        |room| {
            let mut left = room;
            for l in &layers {
                let target = match &l.dir {
                    Some(d) if layout::is_plain_name(d) => {
                        let t = dest.join(d);
                        use std::os::unix::fs::DirBuilderExt;
                        std::fs::DirBuilder::new()
                            .mode(0o700)
                            .create(&t)
                            .with_context(|| format!("hostile image: layer {} unpacks into {d}, which exists already", l.name))?;
                        t
                    }
                    Some(d) => bail!("hostile image: layer {} names directory {d:?}", l.name),
                    None => dest.to_path_buf(),
                };
                if let Some(blob) = &l.blob {
                    leave_pages(blob, l.dir.as_deref(), &target, &mut left, &mut kept)
                        .with_context(|| format!("layer {}", l.name))?;
                    continue;
                }
                let mut reader = (l.open)()?;
                let unpacked = unpack_bounded(&mut reader, &target, &mut left);
                // To the blob's end whatever tar made of it: a blob that does not match its
                // digest is refused as such, not as the garbage it decompresses to.
                std::io::copy(&mut reader, &mut std::io::sink())
                    .with_context(|| format!("layer {}", l.name))?;
                unpacked.with_context(|| format!("layer {}", l.name))?;
            }
            check_unpacked(dest, opening, &mut kept)
        },
    )?;
    let source = (!kept.spans.is_empty()).then(|| layout::PageSource {
        archive: kept.archive.clone(),
        files: std::mem::take(&mut kept.spans),
    });
    Ok((options, source))
}

/// Unpacks the plain tar file `blob` (a layer unpacked into `dir` of the checkpoint, or at
/// its top) into `target` but for its page images, whose bytes stay in the blob: their spans
/// go into `kept` (their chunk digests come from the manifest once it is checked). Only the
/// headers and the other files are read; the page data is skipped.
fn leave_pages(
    blob: &Path,
    dir: Option<&str>,
    target: &Path,
    room: &mut u64,
    kept: &mut LeftInArchive,
) -> Result<()> {
    let file = files::open_nofollow(blob)?;
    if kept.archive.as_os_str().is_empty() {
        kept.archive = blob.to_path_buf();
    }
    let mut tar = tar::Archive::new(&file);
    // Page images are bounded by their own chunks, not by the free space: they are not
    // written here.
    let entries = tar.entries_with_seek().context("read layer")?;
    unpack_walk(entries, target, room, u64::MAX, |rel, entry| {
        let key = dir.map_or_else(|| rel.to_path_buf(), |d| Path::new(d).join(rel));
        if !(entry.header().entry_type().is_file()
            && layout::is_page_image(&key)
            && entry.size() > 0)
        {
            return Ok(false);
        }
        let k = key.display().to_string();
        if kept.spans.contains_key(&k) {
            return Err(format!("hostile archive: {k} is in it twice"));
        }
        let span = layout::PageSpan {
            file: Some(blob.to_path_buf()),
            offset: entry.raw_file_position(),
            size: entry.size(),
            ..Default::default()
        };
        kept.spans.insert(k, span);
        Ok(true)
    })
}

/// Unpacks one tar stream into the existing `dest`, checking as it goes what a first pass
/// would have: metadata records small, the entry count and the total within `room` (what is
/// unpacked is taken off it), and every entry a file or directory below `dest` (no link, no
/// device, no `..`, no absolute path, no file twice), refused before its data is written.
pub(super) fn unpack_bounded(stream: impl Read, dest: &Path, room: &mut u64) -> Result<()> {
    let mut tar = tar::Archive::new(stream);
    let bound = *room;
    let entries = tar.entries().context("read archive")?;
    unpack_walk(entries, dest, room, bound, |_, _| Ok(false))
}

/// Walks `entries` raw, their headers bounded by [`stasis_api::tarbound`] (the declared
/// total by `bound`), and writes each checked entry below `target`, but those `keep` takes
/// over (it sees the entry's path below `target`); what is written is taken off `room`.
fn unpack_walk<R: Read>(
    entries: tar::Entries<'_, R>,
    target: &Path,
    room: &mut u64,
    bound: u64,
    mut keep: impl FnMut(&Path, &tar::Entry<'_, R>) -> std::result::Result<bool, String>,
) -> Result<()> {
    let mut used = 0u64;
    stasis_api::tarbound::bound_entries_visiting(entries, bound, |name, entry| {
        let Some(rel) = clean_name(name).map_err(|e| format!("{e:#}"))? else {
            return Ok(());
        };
        if keep(&rel, entry)? {
            return Ok(());
        }
        used += entry.size();
        if used > *room {
            return Err(format!(
                "the pod's files need more than the {} free where they are unpacked",
                human(*room)
            ));
        }
        write_entry(&rel, entry, target).map_err(|e| format!("{e:#}"))
    })
    .map_err(bound_error)?;
    *room = room.saturating_sub(used);
    Ok(())
}

/// A tar name (the full one: from a long-name or PAX record where there was one) as a path
/// below the target: relative, `.` dropped, no `..`. None for the target itself.
fn clean_name(name: &[u8]) -> Result<Option<PathBuf>> {
    use std::{os::unix::ffi::OsStrExt, path::Component};
    let raw = Path::new(std::ffi::OsStr::from_bytes(name));
    let mut clean = PathBuf::new();
    for c in raw.components() {
        match c {
            Component::Normal(p) => clean.push(p),
            Component::CurDir => {}
            Component::ParentDir => bail!("hostile archive: entry {raw:?} climbs out with '..'"),
            Component::RootDir | Component::Prefix(_) => {
                bail!("hostile archive: entry {raw:?} is an absolute path")
            }
        }
    }
    Ok((!clean.as_os_str().is_empty()).then_some(clean))
}

/// Writes one checked entry at `rel` below `dest`: a directory (one that is there already is
/// kept), or a new file that nothing was at before, opened without following a link (none is
/// ever made here), with the entry's permission bits.
fn write_entry<R: Read>(rel: &Path, entry: &mut tar::Entry<'_, R>, dest: &Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let at = dest.join(rel);
    let mode = entry.header().mode().unwrap_or(0o600) & 0o777;
    let parents = |p: &Path| {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(p)
            .with_context(|| format!("create {}", p.display()))
    };
    match entry.header().entry_type() {
        tar::EntryType::Directory => {
            let is_dir = at.symlink_metadata().map(|m| m.is_dir());
            if !matches!(is_dir, Ok(true)) {
                if let Some(p) = at.parent() {
                    parents(p)?;
                }
                std::fs::DirBuilder::new()
                    .mode(mode | 0o700)
                    .create(&at)
                    .with_context(|| {
                        format!("hostile archive: {} is in it twice", rel.display())
                    })?;
            }
        }
        tar::EntryType::Regular | tar::EntryType::Continuous => {
            if let Some(p) = at.parent() {
                parents(p)?;
            }
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&at)
                .map_err(|e| match e.kind() {
                    std::io::ErrorKind::AlreadyExists => {
                        anyhow::anyhow!("hostile archive: {} is in it twice", rel.display())
                    }
                    _ => anyhow::Error::from(e).context(format!("create {}", at.display())),
                })?;
            std::io::copy(entry, &mut file).map_err(|e| {
                anyhow::anyhow!("archive is truncated or corrupt at {}: {e}", rel.display())
            })?;
        }
        tar::EntryType::Symlink | tar::EntryType::Link => {
            let target = entry
                .link_name()
                .ok()
                .flatten()
                .map(|t| t.display().to_string())
                .unwrap_or_default();
            bail!(
                "hostile archive: entry {:?} is a link (to {target:?}); a pod checkpoint has none",
                rel.display().to_string()
            )
        }
        tar::EntryType::Char | tar::EntryType::Block => {
            bail!(
                "hostile archive: entry {:?} is a device node",
                rel.display().to_string()
            )
        }
        kind => bail!(
            "unsupported archive entry {:?} of type {kind:?}",
            rel.display().to_string()
        ),
    }
    Ok(())
}
