use super::*;

/// The archive file, opened once for both passes over it (the header pass and the unpack
/// read the same open file description: a file swapped in at `path` between them is never
/// read).
pub(super) fn open_archive(path: &Path) -> Result<File> {
    File::open(path).with_context(|| format!("open archive {}", path.display()))
}

/// `file` from its start again, for the next pass (the same open file description).
pub(super) fn rewound(file: &File) -> Result<File> {
    let again = file.try_clone().context("reopen the archive")?;
    std::io::Seek::seek(&mut &again, std::io::SeekFrom::Start(0)).context("rewind the archive")?;
    Ok(again)
}

/// The tar stream of an open archive file: decrypted (age) when it is encrypted, then
/// decompressed as its first bytes say.
pub(super) fn open_file(file: File, opening: &Opening) -> Result<Box<dyn Read>> {
    open_stream(file, opening)
}

/// [`open_file`] whose raw bytes read count as the running progress phase's (a restore's
/// unpacking).
pub(super) fn open_counted(file: File, opening: &Opening) -> Result<Box<dyn Read>> {
    open_stream(crate::progress::CountingRead(file), opening)
}

fn open_stream<R: Read + 'static>(raw: R, opening: &Opening) -> Result<Box<dyn Read>> {
    let mut file = BufReader::new(raw);
    let plain: Box<dyn Read> = if seal::is_encrypted(file.fill_buf()?) {
        seal::decrypt(file, opening)?
    } else {
        Box::new(file)
    };
    let mut plain = BufReader::new(plain);
    let head = plain.fill_buf()?;
    Ok(match head {
        [0x1f, 0x8b, ..] => Box::new(flate2::read::GzDecoder::new(plain)),
        [0x28, 0xb5, 0x2f, 0xfd, ..] => Box::new(zstd::Decoder::with_buffer(plain)?),
        _ => Box::new(plain),
    })
}

/// Whether the archive at `path` is encrypted.
pub fn is_encrypted(path: &Path) -> Result<bool> {
    let mut file = BufReader::new(
        File::open(path).with_context(|| format!("open archive {}", path.display()))?,
    );
    Ok(seal::is_encrypted(file.fill_buf()?))
}

/// An entry's path, checked by the one rule for tar entries (`stasis_api::tarbound`): a pod
/// checkpoint holds only files and directories below its root.
pub(super) fn safe_path(entry: &tar::Entry<impl Read>) -> Result<PathBuf> {
    use stasis_api::tarbound::{check_entry, EntryError, Links};
    check_entry(entry, Links::Refused).map_err(|e| match e {
        EntryError::Unreadable(e) => {
            anyhow::Error::from(e).context("archive entry with an unreadable path")
        }
        EntryError::Kind { name, kind } => {
            anyhow::anyhow!("unsupported archive entry {name:?} of type {kind:?}")
        }
        EntryError::Link { name, target } => anyhow::anyhow!(
            "hostile archive: entry {name:?} is a link (to {target:?}); a pod checkpoint has none"
        ),
        other => anyhow::anyhow!("hostile archive: {other}"),
    })
}

/// A tar reader that unpacks modes as they are and no extended attributes.
pub(super) fn tar_reader<R: Read>(r: R) -> tar::Archive<R> {
    let mut tar = tar::Archive::new(r);
    tar.set_preserve_permissions(true);
    tar.set_unpack_xattrs(false);
    tar
}

/// Whether pages can be read straight from the archive at `path`: an uncompressed,
/// unencrypted tar.
pub fn is_plain_tar(path: &Path) -> Result<bool> {
    let mut file = BufReader::new(
        File::open(path).with_context(|| format!("open archive {}", path.display()))?,
    );
    let head = file.fill_buf()?;
    Ok(!seal::is_encrypted(head)
        && !head.starts_with(&[0x1f, 0x8b])
        && !head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]))
}

/// A first pass over the raw headers: every metadata record small, the entry count bounded,
/// and the unpacked total within `room` (the free space where it is unpacked). Data is
/// skipped, not stored, so a compression bomb costs time, not memory or disk.
pub(super) fn check_bounds(archive: &File, room: u64, opening: &Opening) -> Result<()> {
    let mut tar = tar::Archive::new(open_file(rewound(archive)?, opening)?);
    header_pass(tar.entries().context("read archive")?, room)?.check()
}

/// The largest `pod.options` read in the header pass (real ones are a few hundred bytes).
pub(super) const MAX_POD_OPTIONS: u64 = 1 << 20;

/// What the header pass saw of an archive: its entry names and its `pod.options`.
#[derive(Default)]
pub(super) struct Outline {
    pub(super) names: std::collections::HashSet<String>,
    pub(super) pod_options: Option<Vec<u8>>,
}

/// The bounded first pass ([`stasis_api::tarbound`]) that also notes every entry's name and
/// reads `pod.options`, refusing hostile names and a file given twice.
pub(super) fn header_pass<R: Read>(entries: tar::Entries<'_, R>, room: u64) -> Result<Outline> {
    let mut outline = Outline::default();
    stasis_api::tarbound::bound_entries_visiting(entries, room, |_, entry| {
        let name = safe_path(entry)
            .map_err(|e| format!("{e:#}"))?
            .display()
            .to_string();
        let is_file = entry.header().entry_type().is_file();
        if is_file && name == layout::POD_OPTIONS {
            if entry.size() > MAX_POD_OPTIONS {
                return Err(format!(
                    "hostile archive: a pod.options of {} (at most {} accepted)",
                    human(entry.size()),
                    human(MAX_POD_OPTIONS)
                ));
            }
            let mut bytes = Vec::new();
            entry
                .read_to_end(&mut bytes)
                .map_err(|e| format!("archive is truncated or corrupt: {e}"))?;
            outline.pod_options = Some(bytes);
        }
        if !outline.names.insert(name.clone()) && is_file {
            return Err(format!("hostile archive: {name} is in it twice"));
        }
        Ok(())
    })
    .map_err(bound_error)?;
    Ok(outline)
}

impl Outline {
    /// The structure of a pod checkpoint, from the names alone: refused before a byte is
    /// written (the unpacked copy is checked again, with the manifest, after).
    pub(super) fn check(&self) -> Result<()> {
        let nothing = "nothing was written";
        let bytes = self
            .pod_options
            .as_ref()
            .with_context(|| format!("archive has no pod.options; {nothing}"))?;
        let options = PodOptions::parse(bytes)?;
        for (name, dir) in &options.containers {
            if !layout::is_plain_name(dir) {
                bail!("hostile archive: pod.options names container {name:?} in directory {dir:?}, which is not a plain directory name; {nothing}");
            }
            for file in [layout::CONFIG_DUMP, layout::CONTAINER_CONFIG] {
                if !self.names.contains(&format!("{dir}/{file}")) {
                    bail!("container {name:?} ({dir}) has no {file}; {nothing}");
                }
            }
        }
        for file in [layout::POD_DUMP, layout::MANIFEST] {
            if !self.names.contains(file) {
                bail!("archive has no {file}; {nothing}");
            }
        }
        Ok(())
    }
}

pub(super) fn bound_error(e: stasis_api::tarbound::BoundError) -> anyhow::Error {
    use stasis_api::tarbound::{self, BoundError};
    match e {
        BoundError::Refused(why) => anyhow::anyhow!(why),
        BoundError::Corrupt(why) => anyhow::anyhow!("archive is truncated or corrupt: {why}"),
        BoundError::MetaRecord { kind, size } => anyhow::anyhow!(
            "hostile archive: a {kind} record of {} (at most {} accepted)",
            human(size),
            human(tarbound::MAX_META_RECORD)
        ),
        BoundError::TooManyEntries => anyhow::anyhow!(
            "hostile archive: more than {} entries",
            tarbound::MAX_ENTRIES
        ),
        BoundError::TooBig { total, room } => anyhow::anyhow!(
            "the archive unpacks to more than {} and only {} are free where it is unpacked; nothing was written",
            human(total),
            human(room)
        ),
    }
}
