use super::*;

/// Extracts `archive` into `dest` (created; must not exist), checking every entry first.
/// On any error `dest` is removed again: nothing is left anywhere.
pub fn extract(archive: &Path, dest: &Path) -> Result<PodOptions> {
    extract_with(archive, dest, &Opening::default())
}

/// [`extract`], decrypting with `opening`'s identities and, when it names a key, refusing an
/// archive not signed by it.
pub fn extract_with(archive: &Path, dest: &Path, opening: &Opening) -> Result<PodOptions> {
    let file = open_archive(archive)?;
    into_new_dir(
        dest,
        // Before anything is unpacked or held in memory: what the archive would ask for,
        // and whether it has the structure of a pod checkpoint at all. Both passes are the
        // restore's unpacking progress.
        |room| {
            let mut tar = tar::Archive::new(open_counted(rewound(&file)?, opening)?);
            header_pass(tar.entries().context("read archive")?, room)?.check()
        },
        |_| {
            open_counted(rewound(&file)?, opening)
                .and_then(|r| unpack_checked(r, dest, u64::MAX, opening))
        },
    )
}

/// Unpacks a tar stream that comes from a peer (a migration) into `dest` (created; must not
/// exist), with the checks of [`extract`]; the headers cannot be looked at first, so the
/// total is bounded while unpacking, by the free space.
pub fn extract_stream(stream: impl Read, dest: &Path, opening: &Opening) -> Result<PodOptions> {
    into_new_dir(
        dest,
        |_| Ok(()),
        |room| unpack_checked(stream, dest, room, opening),
    )
}

/// Reads an uncompressed archive held in memory as a restore does: the header pass and its
/// structure check, then (when they pass) the checked unpack into a fresh directory below
/// `scratch`, removed again. For the fuzz target.
pub fn read_untrusted(bytes: &[u8], scratch: &Path) -> Result<PodOptions> {
    let mut tar = tar::Archive::new(bytes);
    header_pass(tar.entries().context("read archive")?, 1 << 30)?.check()?;
    let dest = scratch.join(format!("unpack-{}", files::random_suffix()?));
    let unpacked = extract_stream(bytes, &dest, &Opening::default());
    let _ = std::fs::remove_dir_all(&dest);
    unpacked
}

/// Runs `check(room)` (room: free bytes where `dest` goes), creates `dest` (0700; it must
/// not exist) and runs `unpack(room)`; on any error `dest` is removed again.
pub(super) fn into_new_dir(
    dest: &Path,
    check: impl FnOnce(u64) -> Result<()>,
    unpack: impl FnOnce(u64) -> Result<PodOptions>,
) -> Result<PodOptions> {
    if dest.exists() {
        bail!("{} already exists", dest.display());
    }
    let parent = dest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let room = files::free_space(parent)?;
    check(room)?;
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(dest)
            .with_context(|| format!("create {}", dest.display()))?;
    }
    let result = unpack(room);
    if result.is_err() {
        let _ = std::fs::remove_dir_all(dest);
    }
    result
}

/// Unpacks into the existing `dest`, refusing hostile entries and more than `room` bytes,
/// then checks the layout, the signature (if asked) and the manifest.
pub(super) fn unpack_checked(
    stream: impl Read,
    dest: &Path,
    room: u64,
    opening: &Opening,
) -> Result<PodOptions> {
    let mut left = room;
    unpack_entries(stream, dest, &mut left)?;
    check_unpacked(dest, opening, &mut LeftInArchive::default())
}

/// Unpacks a tar stream into the existing `dest`, refusing hostile entries and more than
/// `room` bytes (what is unpacked is taken off it).
pub(super) fn unpack_entries(stream: impl Read, dest: &Path, room: &mut u64) -> Result<()> {
    let mut tar = tar_reader(stream);
    unpack_each(
        tar.entries().context("read archive")?,
        dest,
        room,
        |_, _| Ok(false),
    )
}

/// Unpacks `entries` into the existing `dest`, refusing hostile entries and more than `room`
/// bytes (what is unpacked is taken off it). `divert` sees each checked entry first and may
/// take it over (returns true), in which case it is neither unpacked nor counted.
pub(super) fn unpack_each<R: Read>(
    entries: tar::Entries<'_, R>,
    dest: &Path,
    room: &mut u64,
    mut divert: impl FnMut(&Path, &tar::Entry<'_, R>) -> Result<bool>,
) -> Result<()> {
    for entry in entries {
        let mut entry =
            entry.map_err(|e| anyhow::anyhow!("archive is truncated or corrupt: {e}"))?;
        let path = safe_path(&entry)?;
        if path.as_os_str().is_empty() || divert(&path, &entry)? {
            continue;
        }
        if entry.size() > *room {
            bail!(
                "the pod's files need more than the {} free where they are unpacked",
                human(*room)
            );
        }
        *room -= entry.size();
        let inside = entry.unpack_in(dest).map_err(|e| {
            // tar's error names the file; why it failed (a stream frame failing its
            // authentication, a short read) is its source.
            let why = std::error::Error::source(&e)
                .map(|s| format!(" ({s})"))
                .unwrap_or_default();
            anyhow::anyhow!(
                "archive is truncated or corrupt at {}: {e}{why}",
                path.display()
            )
        })?;
        if !inside {
            bail!(
                "hostile archive: entry {} would land outside the target",
                path.display()
            );
        }
    }
    Ok(())
}

/// What an unpacked archive must be, checked after unpacking: its layout, the signature (if
/// asked) and the manifest (the files in `left_in_archive` by their chunk digests only).
pub(super) fn check_unpacked(
    dest: &Path,
    opening: &Opening,
    left: &mut LeftInArchive,
) -> Result<PodOptions> {
    let options = read_pod_options(dest)?;
    for (name, dir) in &options.containers {
        if !layout::is_plain_name(dir) {
            bail!("hostile archive: pod.options names container {name:?} in directory {dir:?}, which is not a plain directory name");
        }
        let d = dest.join(dir);
        if !d.is_dir() {
            bail!("pod.options names container {name:?} in directory {dir:?}, which the archive does not contain");
        }
        // Which images a container needs is the runtime's business (CRIU images in
        // checkpoint/, or one sandbox image for the pod): the shim checks them in
        // ValidateRestore. Here: the metadata every backend writes.
        if !d.join("config.dump").is_file() || !d.join("container-config.json").is_file() {
            bail!("container {name:?} ({dir}) has no config.dump or container-config.json");
        }
    }
    if !dest.join("pod.dump").is_file() {
        bail!("archive has no pod.dump");
    }
    // Last: what it says about each file is worth checking only once the layout is sane.
    // The signature first: a signed manifest vouches for every file it lists.
    if !opening.verify.is_empty() {
        seal::check_signature(dest, &opening.verify)?;
    }
    let manifest = read_manifest(dest)?;
    left.settle(dest, &manifest)?;
    check_manifest_except(dest, &manifest, &left.spans)?;
    Ok(options)
}

/// Page images a lazy restore leaves in the archive (not unpacked: the shim makes them).
#[derive(Default)]
pub(super) struct LeftInArchive {
    pub(super) archive: PathBuf,
    pub(super) spans: std::collections::BTreeMap<String, layout::PageSpan>,
}

impl LeftInArchive {
    /// Takes each image's chunk digests from the (checked) manifest; an image the manifest
    /// gives no chunks (an archive of an older stasis) is unpacked after all, and checked
    /// whole like every other file.
    pub(super) fn settle(&mut self, dest: &Path, manifest: &Manifest) -> Result<()> {
        let mut unchunked = Vec::new();
        for (key, span) in self.spans.iter_mut() {
            match manifest.files.get(key) {
                Some(FileSum {
                    chunk_size: Some(c),
                    chunks,
                    size,
                    ..
                }) if *size == span.size
                    && (4096..=MAX_CHUNK).contains(c)
                    && chunks.len() as u64 == size.div_ceil(*c) =>
                {
                    span.chunk_size = *c;
                    span.chunks = chunks.clone();
                    span.digest = manifest.digest();
                }
                _ => unchunked.push(key.clone()),
            }
        }
        for key in unchunked {
            let span = self.spans.remove(&key).expect("listed above");
            let source = span.file.as_ref().unwrap_or(&self.archive);
            let mut from = files::open_nofollow(source)?;
            std::io::Seek::seek(&mut from, std::io::SeekFrom::Start(span.offset))?;
            let mut to = files::create_file(&dest.join(&key), 0o600)
                .with_context(|| format!("unpack {key}"))?;
            let n = std::io::copy(&mut from.take(span.size), &mut to)
                .with_context(|| format!("unpack {key}"))?;
            if n != span.size {
                bail!("archive is truncated at {key}");
            }
        }
        Ok(())
    }
}

/// [`extract_with`] for a lazy restore from an uncompressed archive: everything is unpacked
/// and checked but the page images, which stay in the archive; returns where their bytes
/// are and the digests of their chunks, for the shim to serve pages from. Nothing grows
/// with the pod's memory here.
pub fn extract_leaving_pages(
    archive: &Path,
    dest: &Path,
    opening: &Opening,
) -> Result<(PodOptions, layout::PageSource)> {
    let archive = archive
        .canonicalize()
        .with_context(|| format!("open archive {}", archive.display()))?;
    let mut left = LeftInArchive {
        archive: archive.clone(),
        ..Default::default()
    };
    let file = open_archive(&archive)?;
    let options = into_new_dir(
        dest,
        |_| {
            let mut tar = tar::Archive::new(rewound(&file)?);
            header_pass(tar.entries_with_seek().context("read archive")?, u64::MAX)?.check()
        },
        |room| {
            let mut tar = tar_reader(rewound(&file)?);
            let mut left_room = room;
            let spans = &mut left.spans;
            unpack_each(
                tar.entries_with_seek().context("read archive")?,
                dest,
                &mut left_room,
                |path, entry| {
                    let key = path.display().to_string();
                    if spans.contains_key(&key) {
                        bail!("hostile archive: {key} twice");
                    }
                    if !(entry.header().entry_type().is_file()
                        && layout::is_page_image(path)
                        && entry.size() > 0)
                    {
                        return Ok(false);
                    }
                    // Not even a placeholder: the shim makes it, so that a shim that knows
                    // nothing of page sources fails on the missing image instead of
                    // restoring zeros.
                    spans.insert(
                        key,
                        layout::PageSpan {
                            offset: entry.raw_file_position(),
                            size: entry.size(),
                            ..Default::default()
                        },
                    );
                    Ok(true)
                },
            )?;
            check_unpacked(dest, opening, &mut left)
        },
    )?;
    Ok((
        options,
        layout::PageSource {
            archive,
            files: left.spans,
        },
    ))
}

/// Reads `pod.options` from an unpacked archive, saying plainly when it is missing.
pub fn read_pod_options(dir: &Path) -> Result<PodOptions> {
    if !dir.join(layout::POD_OPTIONS).exists() {
        bail!("archive has no pod.options");
    }
    Ok(PodOptions::read(dir)?)
}
