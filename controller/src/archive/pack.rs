//! A staged checkpoint packed into its archive in one pass: each file's bytes are summed for
//! the manifest on their way into the archive (page images chunk by chunk), each staged file
//! removed once it is in, and the manifest made of those sums (signed when a key is given)
//! goes last. Nothing staged is read twice, and the archive's file system holds twice only
//! the file being copied.

use std::collections::BTreeMap;

use super::*;

/// What packing wrote besides the staged files: the manifest's bytes, and the size of every
/// other file (what [`check_written`] compares the written archive with).
pub struct Packed {
    pub manifest: Vec<u8>,
    pub sizes: BTreeMap<String, u64>,
}

/// Where the manifest of a packed checkpoint comes from.
#[derive(Clone)]
pub enum Sealing {
    /// The one in the directory (an unpacked archive's, maybe signed), as it is.
    Staged,
    /// Made from the bytes as they are packed, signed with the key when there is one.
    Made(Option<Box<ed25519_dalek::SigningKey>>),
}

/// The sums of the files packed so far, by their path from the checkpoint's top.
#[derive(Default)]
pub struct Sums(BTreeMap<String, FileSum>);

impl Sums {
    pub fn merge(&mut self, other: Sums) {
        self.0.extend(other.0);
    }
}

/// Tars the staged checkpoint `dir` into `tar` (sorted, directories before their contents),
/// removing each staged file once it is in, then the manifest of what it wrote and, with
/// `sign`, its signature. A manifest or signature staged in `dir` is not taken: they are made
/// anew from the bytes written.
pub(super) fn tar_consuming(
    dir: &Path,
    tar: &mut tar::Builder<&mut dyn Write>,
    sign: Option<&ed25519_dalek::SigningKey>,
) -> Result<Packed> {
    let mut root = tar::Header::new_gnu();
    root.set_metadata_in_mode(&dir.symlink_metadata()?, tar::HeaderMode::Complete);
    tar.append_data(&mut root, ".", std::io::empty())?;
    let mut sums = Sums::default();
    tar_tree(dir, Path::new(""), &|_| false, tar, &mut sums)?;
    append_manifest(tar, sums, sign)
}

/// Tars what is below `root` into `tar` under names relative to it (sorted, directories before
/// their contents), each file summed into `sums` as `under`/name (its path from the
/// checkpoint's top) and removed once copied. Names at `root`'s top that
/// `skip` says stay out, and so do the checkpoint's own manifest and signature (packing ends
/// with them: [`finish_manifest`]).
pub fn tar_tree(
    root: &Path,
    under: &Path,
    skip: &dyn Fn(&std::ffi::OsStr) -> bool,
    tar: &mut tar::Builder<&mut dyn Write>,
    sums: &mut Sums,
) -> Result<()> {
    let mut names = std::fs::read_dir(root)
        .with_context(|| format!("read {}", root.display()))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<std::io::Result<Vec<_>>>()?;
    names.retain(|n| {
        let sealed =
            under.as_os_str().is_empty() && (n == layout::MANIFEST || n == layout::SIGNATURE);
        !sealed && !skip(n)
    });
    names.sort();
    for name in names {
        walk(root, Path::new(&name), under, tar, &mut sums.0)?;
    }
    Ok(())
}

/// Ends a packed checkpoint: its manifest and signature, made from `sums` or taken from `dir`.
pub fn finish_manifest(
    tar: &mut tar::Builder<&mut dyn Write>,
    sums: Sums,
    sealing: &Sealing,
    dir: &Path,
) -> Result<()> {
    match sealing {
        Sealing::Made(sign) => append_manifest(tar, sums, sign.as_deref()).map(|_| ()),
        Sealing::Staged => {
            for name in [layout::MANIFEST, layout::SIGNATURE] {
                match std::fs::read(dir.join(name)) {
                    Ok(bytes) => append_new(tar, name, &bytes)?,
                    Err(e)
                        if e.kind() == std::io::ErrorKind::NotFound && name != layout::MANIFEST => {
                    }
                    Err(e) => {
                        return Err(e).with_context(|| format!("read {}", dir.join(name).display()))
                    }
                }
            }
            Ok(())
        }
    }
}

fn append_manifest(
    tar: &mut tar::Builder<&mut dyn Write>,
    sums: Sums,
    sign: Option<&ed25519_dalek::SigningKey>,
) -> Result<Packed> {
    let mut sizes: BTreeMap<String, u64> =
        sums.0.iter().map(|(k, v)| (k.clone(), v.size)).collect();
    let manifest = manifest_bytes(sums.0)?;
    append_new(tar, layout::MANIFEST, &manifest)?;
    if let Some(key) = sign {
        let record = seal::signature_record(&manifest, key)?;
        append_new(tar, layout::SIGNATURE, &record)?;
        sizes.insert(layout::SIGNATURE.into(), record.len() as u64);
    }
    Ok(Packed { manifest, sizes })
}

/// Tars `rel` (below `root`) and, a directory, everything below it.
fn walk(
    root: &Path,
    rel: &Path,
    under: &Path,
    tar: &mut tar::Builder<&mut dyn Write>,
    sums: &mut BTreeMap<String, FileSum>,
) -> Result<()> {
    let path = root.join(rel);
    let meta = path.symlink_metadata()?;
    let mut header = tar::Header::new_gnu();
    header.set_metadata_in_mode(&meta, tar::HeaderMode::Complete);
    if meta.is_dir() {
        tar.append_data(&mut header, rel, std::io::empty())?;
        let mut names = std::fs::read_dir(&path)
            .with_context(|| format!("read {}", path.display()))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<std::io::Result<Vec<_>>>()?;
        names.sort();
        for name in names {
            walk(root, &rel.join(name), under, tar, sums)?;
        }
    } else if meta.is_file() {
        let key = under.join(rel);
        let mut summer = Summer::new(chunking(&key), WRITTEN_DIGEST);
        // Large reads: a page image comes from the page cache in MiB, not 8 KiB.
        let file = std::io::BufReader::with_capacity(1 << 20, files::open_nofollow(&path)?);
        let mut reader = Summing {
            file,
            summer: &mut summer,
        };
        tar.append_data(&mut header, rel, (&mut reader).take(meta.len()))
            .with_context(|| format!("archive {}", path.display()))?;
        // Used up: its blocks go now. (Punching them out while reading would free them
        // sooner, but ext4 first writes a file's dirty pages to disk before it punches a hole:
        // measured here, a 256 MiB page image written back, doubling the disk's work. An
        // unlinked file's dirty pages are dropped unwritten.)
        std::fs::remove_file(&path).with_context(|| format!("remove {}", path.display()))?;
        if summer.size() != meta.len() {
            bail!(
                "{} changed while it was archived ({} bytes, {} read)",
                path.display(),
                meta.len(),
                summer.size()
            );
        }
        sums.insert(key.display().to_string(), summer.finish());
    } else {
        // The shim stages files and directories only; a reader would refuse anything else.
        bail!(
            "{} is neither a file nor a directory; a staged checkpoint holds only those",
            path.display()
        );
    }
    Ok(())
}

/// A new private file `name` at the archive's top.
fn append_new(tar: &mut tar::Builder<&mut dyn Write>, name: &str, bytes: &[u8]) -> Result<()> {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Regular);
    header.set_mode(0o600);
    header.set_size(bytes.len() as u64);
    header.set_mtime(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default(),
    );
    tar.append_data(&mut header, name, bytes)?;
    Ok(())
}

/// Reads a staged file for the archive, summing what it reads.
struct Summing<'a> {
    file: std::io::BufReader<File>,
    summer: &'a mut Summer,
}

impl Read for Summing<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.file.read(buf)?;
        self.summer.write_all(&buf[..n])?;
        Ok(n)
    }
}

/// Checks the archive a checkpoint wrote before it reports success (and, stopping, before the
/// pod is stopped): `path` opens as the very file written (same inode, no link), of exactly
/// the size written; uncompressed and unencrypted, its tar index lists every file packing
/// wrote at its size and the manifest reads back byte for byte. The bytes between are not read
/// again: the file was synced (fsync reports a write the disk did not take), and reading it
/// back now would come from the page cache the writes filled, testing nothing the sync did not.
pub fn check_written(path: &Path, w: &Written) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let ctx = || format!("read back {}", path.display());
    let file = files::open_nofollow(path).with_context(ctx)?;
    let meta = file.metadata().with_context(ctx)?;
    if (meta.dev(), meta.ino()) != w.file {
        bail!(
            "{} reads back as another file than the one written",
            path.display()
        );
    }
    if meta.len() != w.bytes {
        bail!(
            "{} reads back as {} bytes, not the {} bytes written",
            path.display(),
            meta.len(),
            w.bytes
        );
    }
    let Some(packed) = w.packed.as_ref().filter(|_| w.plain) else {
        return Ok(());
    };
    let (mut listed, mut manifest) = (0, false);
    let mut tar = tar::Archive::new(file);
    for entry in tar.entries_with_seek().with_context(ctx)? {
        let mut entry = entry.with_context(ctx)?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let name = entry.path().with_context(ctx)?.into_owned();
        let name = name
            .strip_prefix(".")
            .unwrap_or(&name)
            .display()
            .to_string();
        if name == layout::MANIFEST {
            let mut bytes = Vec::new();
            entry.read_to_end(&mut bytes).with_context(ctx)?;
            manifest = bytes == packed.manifest;
        } else if packed.sizes.get(&name) == Some(&entry.size()) {
            listed += 1;
        } else {
            bail!(
                "{} reads back with {name} of {} bytes, which was not written so",
                path.display(),
                entry.size()
            );
        }
    }
    if !manifest || listed != packed.sizes.len() {
        bail!(
            "{} reads back with {listed} of its {} files{}",
            path.display(),
            packed.sizes.len(),
            if manifest {
                ""
            } else {
                " and without the manifest written"
            }
        );
    }
    Ok(())
}
