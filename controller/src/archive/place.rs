use super::*;

/// A restore from a checkpoint directory (what `pod checkpoint --output DIR/` writes): its
/// files are copied into `dest` (created; must not exist) with the checks of an archive:
/// only regular files and directories, nothing through a link, the layout, the signature (if
/// asked), the manifest. With `leave_pages`, page images are not copied: the returned source
/// names the directory's own files, read (chunk by chunk, checked) by a lazy restore.
pub fn copy_from_dir(
    src: &Path,
    dest: &Path,
    opening: &Opening,
    leave_pages: bool,
) -> Result<(PodOptions, Option<layout::PageSource>)> {
    let src = src
        .canonicalize()
        .with_context(|| format!("open {}", src.display()))?;
    let mut left = LeftInArchive::default();
    let options = into_new_dir(
        dest,
        |_| Ok(()),
        |room| {
            let mut room = room;
            copy_tree(
                &src,
                dest,
                Path::new(""),
                &mut room,
                leave_pages,
                &mut left.spans,
            )?;
            check_unpacked(dest, opening, &mut left)
        },
    )?;
    let source = (!left.spans.is_empty()).then_some(layout::PageSource {
        archive: src,
        files: left.spans,
    });
    Ok((options, source))
}

/// Copies the tree below `src`/`rel` into the existing `dest`/`rel`: directories 0700, files
/// with their owner bits only, new files only, nothing through a link; anything but regular
/// files and directories refused. At most `room` bytes (taken off it). With `leave_pages`,
/// page images are not copied but listed in `spans` (their bytes stay in `src`).
pub(super) fn copy_tree(
    src: &Path,
    dest: &Path,
    rel: &Path,
    room: &mut u64,
    leave_pages: bool,
    spans: &mut std::collections::BTreeMap<String, layout::PageSpan>,
) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    for e in std::fs::read_dir(src.join(rel))
        .with_context(|| format!("read {}", src.join(rel).display()))?
    {
        let e = e?;
        let rel = rel.join(e.file_name());
        let from = src.join(&rel);
        let to = dest.join(&rel);
        let m = from.symlink_metadata()?;
        if m.is_dir() {
            std::fs::DirBuilder::new().mode(0o700).create(&to)?;
            copy_tree(src, dest, &rel, room, leave_pages, spans)?;
            continue;
        }
        if !m.is_file() {
            bail!(
                "hostile checkpoint directory: {} is not a regular file or directory",
                rel.display()
            );
        }
        if leave_pages && layout::is_page_image(&rel) && m.len() > 0 {
            // Left where it is (the shim makes the local image, see
            // `extract_leaving_pages`).
            spans.insert(
                rel.display().to_string(),
                layout::PageSpan {
                    file: Some(from),
                    offset: 0,
                    size: m.len(),
                    ..Default::default()
                },
            );
            continue;
        }
        if m.len() > *room {
            bail!(
                "the pod's files need more than the {} free where they are unpacked",
                human(*room)
            );
        }
        *room -= m.len();
        let mut out = files::create_file(&to, m.permissions().mode() & 0o700)?;
        let mut input =
            files::open_nofollow(&from).with_context(|| format!("open {}", from.display()))?;
        std::io::copy(&mut input, &mut out).with_context(|| format!("copy {}", rel.display()))?;
    }
    Ok(())
}

/// Moves the staged checkpoint `staging` to `dest` (which must not exist): a rename on the
/// same file system, else a copy into a fresh name beside `dest` renamed into place, so that
/// nothing partial is ever at `dest`. Returns the bytes it holds.
pub fn place_dir(staging: &Path, dest: &Path) -> Result<u64> {
    let (_, bytes) = tree_size(staging);
    // On disk before it is there under its name (a stopping checkpoint stops the pod next).
    let synced = File::open(staging)
        .map_err(anyhow::Error::from)
        .and_then(|d| Ok(nix::unistd::syncfs(&d)?))
        .with_context(|| format!("sync {}", staging.display()));
    if let Err(e) = synced {
        return Err(explain_full_disk(e, dest));
    }
    match rename_new(staging, dest) {
        Ok(()) => {
            sync_parent(dest)?;
            return Ok(bytes);
        }
        Err(e) if dest.symlink_metadata().is_ok() => return Err(e),
        Err(_) => {}
    }
    let parent = dest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let partial = parent.join(format!(
        ".{}.stasis-{}",
        dest.file_name().unwrap_or_default().to_string_lossy(),
        files::random_suffix()?
    ));
    let copied = (|| {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new().mode(0o700).create(&partial)?;
        let mut room = u64::MAX;
        copy_tree(
            staging,
            &partial,
            Path::new(""),
            &mut room,
            false,
            &mut Default::default(),
        )?;
        // On disk before it is there under its name.
        let dir = File::open(&partial)?;
        nix::unistd::syncfs(&dir)?;
        rename_new(&partial, dest)?;
        sync_parent(dest)?;
        Ok(bytes)
    })();
    if copied.is_err() {
        let _ = std::fs::remove_dir_all(&partial);
    }
    copied.map_err(|e| explain_full_disk(e, dest))
}

/// Syncs the directory that holds `path` (its new name made durable).
fn sync_parent(path: &Path) -> Result<()> {
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    File::open(parent)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("sync {}", parent.display()))
}
