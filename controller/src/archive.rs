//! The pod checkpoint archive: a tar (optionally zstd or gzip compressed) of the directory the
//! shim's Checkpoint service wrote. Layout (see docs/archive-format.md):
//!
//! ```text
//! pod.options                 {"version":1,"containers":{name: dir},"annotations":{…}}
//! pod.dump                    the CRI PodSandboxConfig (JSON)
//! <id>-<name>/                one per container, the layout checkpointctl reads
//!   checkpoint/               CRIU images (+ volumes/ and volumes.json when captured)
//!                             (runtimes that save whole sandboxes: one sandbox/ at the top)
//!   config.dump spec.dump status.dump rootfs-diff.tar deleted.files dump.log [stats-dump]
//!   container-config.json     the CRI ContainerConfig, for the restore
//!   stasis.json               engine, timings, sizes
//! ```
//!
//! Reading is defensive: only regular files and directories, only paths that stay inside the
//! target, and the pod.options must name directories that exist.

use std::{
    fs::File,
    io::{BufRead, BufReader, Read, Write},
    os::unix::fs::OpenOptionsExt,
    path::{Component, Path, PathBuf},
};

use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use stasis_api::layout::{self, CheckpointedConfig, ContainerMeta};

use crate::seal::{self, Opening};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

/// A name nobody can guess or pre-create: 64 random bits from the kernel.
pub fn random_suffix() -> Result<String> {
    let mut bytes = [0u8; 8];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("read /dev/urandom")?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// A directory of root's that only root may enter (created 0700 if missing); refused when it
/// is anything else (a link, another owner, open to others).
pub fn private_root(dir: &Path) -> Result<PathBuf> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("create {}", dir.display()))?;
    let meta = dir.symlink_metadata()?;
    if !meta.is_dir() || meta.uid() != nix::unistd::geteuid().as_raw() || meta.mode() & 0o077 != 0 {
        bail!(
            "{} must be a directory of root's with mode 0700",
            dir.display()
        );
    }
    Ok(dir.to_path_buf())
}

/// Writes `dir` as an archive at `dest`, durably and atomically: into a fresh private file
/// (0600, never an existing one) beside `dest`, every error up to the end of the compressed
/// stream counted, the file synced, then renamed into place without replacing anything that
/// appeared at `dest` meanwhile, and the directory synced. A failure (a full disk above all)
/// leaves nothing at or beside `dest`.
pub fn write(dir: &Path, dest: &Path, compression: Compression) -> Result<u64> {
    write_cancellable(dir, dest, compression, &[], &AtomicBool::new(false)).map(|w| w.bytes)
}

/// What was written: its size and the SHA-256 of the file's bytes (what a read-back of an
/// archive encrypted to others can be checked against).
pub struct Written {
    pub bytes: u64,
    pub sha256: [u8; 32],
}

/// [`write`], encrypted to `recipients` when there are any, giving up (and leaving nothing)
/// once `cancel` is set.
pub fn write_cancellable(
    dir: &Path,
    dest: &Path,
    compression: Compression,
    recipients: &[age::x25519::Recipient],
    cancel: &AtomicBool,
) -> Result<Written> {
    let parent = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = dest
        .file_name()
        .with_context(|| format!("{} names no file", dest.display()))?
        .to_string_lossy()
        .into_owned();
    let partial = parent.join(format!(".{name}.partial-{}", random_suffix()?));
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&partial)
        .with_context(|| format!("create {}", partial.display()))?;
    let out = Cancellable {
        inner: file,
        cancel,
        hasher: sha2::Sha256::default(),
        bytes: 0,
    };
    let stream = if recipients.is_empty() {
        write_stream(dir, out, compression)
    } else {
        seal::encrypt(out, recipients)
            .and_then(|enc| write_stream(dir, enc, compression))
            .and_then(|enc| enc.finish().context("finish the encryption"))
    };
    let mut sum = ([0u8; 32], 0);
    let written = stream
        .and_then(|w| {
            use sha2::Digest;
            sum = (w.hasher.finalize().into(), w.bytes);
            w.inner.sync_all().context("sync the archive")
        })
        .and_then(|()| rename_new(&partial, dest))
        .and_then(|()| {
            File::open(&parent)
                .and_then(|d| d.sync_all())
                .with_context(|| format!("sync {}", parent.display()))
        });
    if let Err(e) = written {
        let _ = std::fs::remove_file(&partial);
        return Err(explain_full_disk(e, dest));
    }
    Ok(Written {
        bytes: sum.1,
        sha256: sum.0,
    })
}

/// Reads the file at `path` back and checks it holds exactly what was written.
pub fn verify_bytes(path: &Path, written: &Written) -> Result<()> {
    use sha2::Digest;
    let mut hasher = sha2::Sha256::new();
    let n = std::io::copy(
        &mut File::open(path).with_context(|| format!("read back {}", path.display()))?,
        &mut hasher,
    )
    .with_context(|| format!("read back {}", path.display()))?;
    let sum: [u8; 32] = hasher.finalize().into();
    if n != written.bytes || sum != written.sha256 {
        bail!(
            "{} reads back as {n} bytes that differ from the {} bytes written",
            path.display(),
            written.bytes
        );
    }
    Ok(())
}

/// `dir` as a plain tar stream into `w` (what a migration sends).
pub fn write_tar<W: Write>(dir: &Path, w: W) -> Result<W> {
    write_stream(dir, w, Compression::None)
}

/// The tar stream of `dir`, compressed, with the end of every layer checked: a compressor's
/// final block failing (ENOSPC) is an error, not a silently truncated archive.
fn write_stream<W: Write>(dir: &Path, file: W, compression: Compression) -> Result<W> {
    fn tar_into<W: Write>(dir: &Path, w: W) -> Result<W> {
        let mut tar = tar::Builder::new(w);
        tar.follow_symlinks(false);
        // Modes as they are: CRIU's page images and the configs with environment secrets
        // are 0600 and stay so for whoever unpacks the archive.
        tar.mode(tar::HeaderMode::Complete);
        // Directory entries first (checkpointctl wants one for checkpoint/).
        tar.append_dir_all(".", dir)?;
        Ok(tar.into_inner()?)
    }
    let file = match compression {
        Compression::None => {
            let mut w = tar_into(dir, std::io::BufWriter::new(file))?;
            w.flush()?;
            w.into_inner().map_err(|e| e.into_error())?
        }
        Compression::Gzip => tar_into(
            dir,
            flate2::write::GzEncoder::new(file, flate2::Compression::fast()),
        )?
        .finish()?,
        // The frame carries a checksum of its content, so a reader notices a corrupted frame.
        Compression::Zstd => {
            let mut enc = zstd::Encoder::new(file, 3)?;
            enc.include_checksum(true)?;
            tar_into(dir, enc)?.finish()?
        }
    };
    Ok(file)
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Manifest {
    version: u32,
    files: std::collections::BTreeMap<String, FileSum>,
}

#[derive(serde::Serialize, serde::Deserialize, PartialEq)]
struct FileSum {
    size: u64,
    /// Of the file; of its concatenated chunk digests when it is chunked.
    sha256: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    chunk_size: Option<u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    chunks: Vec<String>,
}

/// Every regular file below `dir` (relative paths, sorted), but the manifest itself.
fn regular_files(dir: &Path) -> Result<Vec<PathBuf>> {
    fn walk(root: &Path, at: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
        for e in std::fs::read_dir(at).with_context(|| format!("read {}", at.display()))? {
            let p = e?.path();
            let m = p.symlink_metadata()?;
            if m.is_dir() {
                walk(root, &p, out)?;
            } else if m.is_file() {
                let rel = p.strip_prefix(root).unwrap_or(&p).to_path_buf();
                if rel != Path::new(layout::MANIFEST) && rel != Path::new(layout::SIGNATURE) {
                    out.push(rel);
                }
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out)?;
    out.sort();
    Ok(out)
}

/// The sum of the file at `path`, chunk by chunk when `chunk_size` is given (page images:
/// a lazy restore checks each chunk it reads on its own).
fn sum_of(path: &Path, chunk_size: Option<u64>) -> Result<FileSum> {
    use sha2::Digest;
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .with_context(|| format!("open {}", path.display()))?;
    let Some(chunk) = chunk_size else {
        let mut hasher = sha2::Sha256::new();
        let size = std::io::copy(&mut f, &mut hasher)?;
        return Ok(FileSum {
            size,
            sha256: hex::encode(hasher.finalize()),
            chunk_size: None,
            chunks: Vec::new(),
        });
    };
    let (mut size, mut chunks, mut top) = (0u64, Vec::new(), sha2::Sha256::new());
    loop {
        let mut hasher = sha2::Sha256::new();
        let n = std::io::copy(&mut (&mut f).take(chunk), &mut hasher)?;
        if n == 0 {
            break;
        }
        size += n;
        let digest = hasher.finalize();
        top.update(digest);
        chunks.push(hex::encode(digest));
    }
    Ok(FileSum {
        size,
        sha256: hex::encode(top.finalize()),
        chunk_size: Some(chunk),
        chunks,
    })
}

/// Closes every file and directory below `dir` to group and others (owner bits kept): a
/// pod checkpoint is memory and environment, secret as a whole, and the archive's entries
/// keep these modes wherever it is unpacked.
pub fn make_private(dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for e in std::fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
        let p = e?.path();
        let m = p.symlink_metadata()?;
        if m.file_type().is_symlink() {
            continue;
        }
        let mode = m.permissions().mode() & 0o7700;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))
            .with_context(|| format!("make {} private", p.display()))?;
        if m.is_dir() {
            make_private(&p)?;
        }
    }
    Ok(())
}

/// Writes the manifest of `dir` (size and SHA-256 of every regular file) into it, 0600.
pub fn write_manifest(dir: &Path) -> Result<()> {
    let mut files = std::collections::BTreeMap::new();
    for rel in regular_files(dir)? {
        let chunked = layout::is_page_image(&rel).then_some(layout::PAGE_CHUNK_SIZE);
        files.insert(rel.display().to_string(), sum_of(&dir.join(&rel), chunked)?);
    }
    let manifest = Manifest {
        version: layout::MANIFEST_VERSION,
        files,
    };
    let path = dir.join(layout::MANIFEST);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .with_context(|| format!("create {}", path.display()))?;
    f.write_all(&serde_json::to_vec(&manifest)?)?;
    Ok(())
}

/// Checks an unpacked archive against its manifest: the version known, every file listed
/// there with its size and SHA-256, nothing unlisted. Names the first file that differs.
pub fn check_manifest(dir: &Path) -> Result<()> {
    check_manifest_except(dir, &read_manifest(dir)?, &Default::default())
}

fn read_manifest(dir: &Path) -> Result<Manifest> {
    let path = dir.join(layout::MANIFEST);
    let text = std::fs::read(&path).context(
        "archive has no manifest.json (written by a stasis before archives carried one, or stripped)",
    )?;
    let manifest: Manifest =
        serde_json::from_slice(&text).context("archive manifest.json is not a manifest")?;
    if !layout::MANIFEST_VERSIONS_READ.contains(&manifest.version) {
        bail!(
            "archive format version {} is unknown (this stasisctl reads {} to {}); use a newer stasisctl",
            manifest.version,
            layout::MANIFEST_VERSIONS_READ.start(),
            layout::MANIFEST_VERSIONS_READ.end()
        );
    }
    Ok(manifest)
}

/// [`check_manifest`], but the files in `left_in_archive` (page images not unpacked, read
/// from the archive later, chunk by chunk) are only checked to be listed, with their size
/// and chunk digests.
fn check_manifest_except(
    dir: &Path,
    manifest: &Manifest,
    left_in_archive: &std::collections::BTreeMap<String, layout::PageSpan>,
) -> Result<()> {
    for (key, span) in left_in_archive {
        match manifest.files.get(key) {
            Some(want) if want.size == span.size && want.chunks == span.chunks => {}
            Some(want) => bail!(
                "archive file {key} is corrupt or was changed ({} bytes; the manifest says {} bytes)",
                span.size,
                want.size
            ),
            None => bail!("archive file {key} is not in its manifest: the archive was changed"),
        }
    }
    let present = regular_files(dir)?;
    for rel in &present {
        let key = rel.display().to_string();
        let Some(want) = manifest.files.get(&key) else {
            bail!("archive file {key} is not in its manifest: the archive was changed");
        };
        if left_in_archive.contains_key(&key) {
            bail!("hostile archive: {key} twice");
        }
        if want
            .chunk_size
            .is_some_and(|c| !(4096..=1 << 30).contains(&c))
        {
            bail!("archive manifest gives {key} an impossible chunk size");
        }
        let got = sum_of(&dir.join(rel), want.chunk_size)?;
        if got != *want {
            bail!(
                "archive file {key} is corrupt or was changed ({} bytes, sha256 {}; the manifest says {} bytes, sha256 {})",
                got.size,
                got.sha256,
                want.size,
                want.sha256
            );
        }
    }
    if let Some(missing) = manifest.files.keys().find(|k| {
        !left_in_archive.contains_key(*k) && !present.iter().any(|p| p.display().to_string() == **k)
    }) {
        bail!("archive file {missing} listed in the manifest is missing");
    }
    Ok(())
}

/// A writer that fails once its flag is set (how an interrupted packaging stops), hashing
/// what it passes on.
struct Cancellable<'a, W> {
    inner: W,
    cancel: &'a AtomicBool,
    hasher: sha2::Sha256,
    bytes: u64,
}

impl<W: Write> Write for Cancellable<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.cancel.load(Ordering::SeqCst) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::Interrupted,
                "archive writing interrupted",
            ));
        }
        let n = self.inner.write(buf)?;
        sha2::Digest::update(&mut self.hasher, &buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// The regular files below `dir` and their bytes (links and other entries not counted).
fn tree_size(dir: &Path) -> (u64, u64) {
    let (mut files, mut bytes) = (0, 0);
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        match e.path().symlink_metadata() {
            Ok(m) if m.is_dir() => {
                let (f, b) = tree_size(&e.path());
                files += f;
                bytes += b;
            }
            Ok(m) if m.is_file() => {
                files += 1;
                bytes += m.len();
            }
            _ => {}
        }
    }
    (files, bytes)
}

/// Reads the archive at `path` back in full (every compressed frame's checksum included) and
/// checks it holds exactly the regular files and bytes of `dir`, the directory it was made
/// from.
pub fn verify(path: &Path, dir: &Path) -> Result<()> {
    let (want_files, want_bytes) = tree_size(dir);
    let (mut files, mut bytes) = (0u64, 0u64);
    let mut tar = tar::Archive::new(open(path, &Opening::default())?);
    for entry in tar
        .entries()
        .with_context(|| format!("read back {}", path.display()))?
    {
        let mut entry = entry.with_context(|| format!("read back {}", path.display()))?;
        if entry.header().entry_type().is_file() {
            files += 1;
            bytes += std::io::copy(&mut entry, &mut std::io::sink())
                .with_context(|| format!("read back {}", path.display()))?;
        }
    }
    if (files, bytes) != (want_files, want_bytes) {
        bail!(
            "{} reads back as {files} files, {bytes} bytes; {want_files} files, {want_bytes} bytes were written",
            path.display()
        );
    }
    Ok(())
}

/// Renames `from` to `to` unless something exists at `to` (RENAME_NOREPLACE).
fn rename_new(from: &Path, to: &Path) -> Result<()> {
    use nix::fcntl::{renameat2, RenameFlags, AT_FDCWD};
    renameat2(AT_FDCWD, from, AT_FDCWD, to, RenameFlags::RENAME_NOREPLACE).map_err(|e| {
        if e == nix::errno::Errno::EEXIST {
            anyhow::anyhow!("{} already exists; it was not replaced", to.display())
        } else {
            anyhow::anyhow!("move the archive to {}: {e}", to.display())
        }
    })
}

/// A full disk said plainly, with where.
fn explain_full_disk(e: anyhow::Error, dest: &Path) -> anyhow::Error {
    let full = e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.raw_os_error() == Some(libc::ENOSPC))
    });
    if full {
        e.context(format!(
            "no space left on the file system of {}; nothing was left there",
            dest.display()
        ))
    } else {
        e
    }
}

/// The tar stream of an archive: decrypted (age) when it is encrypted, then decompressed as
/// its first bytes say.
fn open(path: &Path, opening: &Opening) -> Result<Box<dyn Read>> {
    open_file(open_archive(path)?, opening)
}

/// The archive file, opened once for both passes over it (the header pass and the unpack
/// read the same open file description: a file swapped in at `path` between them is never
/// read).
fn open_archive(path: &Path) -> Result<File> {
    File::open(path).with_context(|| format!("open archive {}", path.display()))
}

/// `file` from its start again, for the next pass (the same open file description).
fn rewound(file: &File) -> Result<File> {
    let again = file.try_clone().context("reopen the archive")?;
    std::io::Seek::seek(&mut &again, std::io::SeekFrom::Start(0)).context("rewind the archive")?;
    Ok(again)
}

/// [`open`] of a file already open.
fn open_file(file: File, opening: &Opening) -> Result<Box<dyn Read>> {
    let mut file = BufReader::new(file);
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

/// The entry's path inside the archive, if it is one we accept.
fn safe_path(entry: &tar::Entry<impl Read>) -> Result<PathBuf> {
    let raw = entry
        .path()
        .context("archive entry with an unreadable path")?
        .into_owned();
    let shown = raw.display().to_string();
    let clean = clean_name(&raw, &shown)?;
    check_kind(&shown, entry)?;
    Ok(clean)
}

/// `raw` (shown as `shown`) as a path inside the archive; refused when it climbs out with
/// `..` or is absolute.
fn clean_name(raw: &Path, shown: &str) -> Result<PathBuf> {
    let mut clean = PathBuf::new();
    for c in raw.components() {
        match c {
            Component::Normal(p) => clean.push(p),
            Component::CurDir => {}
            Component::ParentDir => bail!("hostile archive: entry {shown:?} climbs out with '..'"),
            Component::RootDir | Component::Prefix(_) => {
                bail!("hostile archive: entry {shown:?} is an absolute path")
            }
        }
    }
    Ok(clean)
}

/// Only regular files and directories: a pod checkpoint has nothing else.
fn check_kind(shown: &str, entry: &tar::Entry<impl Read>) -> Result<()> {
    match entry.header().entry_type() {
        tar::EntryType::Regular | tar::EntryType::Directory | tar::EntryType::Continuous => Ok(()),
        tar::EntryType::Symlink | tar::EntryType::Link => {
            let target = entry
                .link_name()
                .ok()
                .flatten()
                .map(|t| t.display().to_string())
                .unwrap_or_default();
            bail!("hostile archive: entry {shown:?} is a link (to {target:?}); a pod checkpoint has none")
        }
        tar::EntryType::Char | tar::EntryType::Block => {
            bail!("hostile archive: entry {shown:?} is a device node")
        }
        other => bail!("unsupported archive entry {shown:?} of type {other:?}"),
    }
}

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
        // and whether it has the structure of a pod checkpoint at all.
        |room| check_bounds(&file, room, opening),
        |_| {
            open_file(rewound(&file)?, opening)
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
    let dest = scratch.join(format!("unpack-{}", random_suffix()?));
    let unpacked = extract_stream(bytes, &dest, &Opening::default());
    let _ = std::fs::remove_dir_all(&dest);
    unpacked
}

/// Runs `check(room)` (room: free bytes where `dest` goes), creates `dest` (0700; it must
/// not exist) and runs `unpack(room)`; on any error `dest` is removed again.
fn into_new_dir(
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
    let room = free_space(parent)?;
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
fn unpack_checked(
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
fn unpack_entries(stream: impl Read, dest: &Path, room: &mut u64) -> Result<()> {
    let mut tar = tar_reader(stream);
    unpack_each(
        tar.entries().context("read archive")?,
        dest,
        room,
        |_, _| Ok(false),
    )
}

/// A tar reader that unpacks modes as they are and no extended attributes.
fn tar_reader<R: Read>(r: R) -> tar::Archive<R> {
    let mut tar = tar::Archive::new(r);
    tar.set_preserve_permissions(true);
    tar.set_unpack_xattrs(false);
    tar
}

/// Unpacks `entries` into the existing `dest`, refusing hostile entries and more than `room`
/// bytes (what is unpacked is taken off it). `divert` sees each checked entry first and may
/// take it over (returns true), in which case it is neither unpacked nor counted.
fn unpack_each<R: Read>(
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
            anyhow::anyhow!("archive is truncated or corrupt at {}: {e}", path.display())
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

/// One tar stream of a layered checkpoint (an image): unpacked at the checkpoint's top, or
/// into the plain-named directory `dir` below it. `open` gives its bytes; it is read twice.
pub struct Layer<'a> {
    pub dir: Option<String>,
    /// How errors name it (its digest).
    pub name: String,
    pub open: Box<dyn Fn() -> Result<Box<dyn Read>> + 'a>,
}

/// Unpacks the layers of a checkpoint image into `dest` (created; must not exist) with the
/// checks of [`extract_with`]. Each layer is read through once first, its records bounded and
/// (by its reader) its digest checked, before anything of it is written; on any error `dest`
/// is removed again.
pub fn unpack_layers(dest: &Path, opening: &Opening, layers: Vec<Layer<'_>>) -> Result<PodOptions> {
    into_new_dir(
        dest,
        |_| Ok(()),
        |room| {
            for l in &layers {
                let mut tar = tar::Archive::new((l.open)()?);
                let bounded = bound_entries(tar.entries().context("read layer")?, room);
                // Read to its end whatever tar made of it: a blob that does not match its
                // digest is refused as such, not as the garbage it decompresses to.
                let mut rest = tar.into_inner();
                std::io::copy(&mut rest, &mut std::io::sink())
                    .with_context(|| format!("layer {}", l.name))?;
                bounded.with_context(|| format!("layer {}", l.name))?;
            }
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
                let mut reader = (l.open)()?;
                unpack_entries(&mut reader, &target, &mut left)
                    .with_context(|| format!("layer {}", l.name))?;
                std::io::copy(&mut reader, &mut std::io::sink())
                    .with_context(|| format!("layer {}", l.name))?;
            }
            check_unpacked(dest, opening, &mut LeftInArchive::default())
        },
    )
}

/// What an unpacked archive must be, checked after unpacking: its layout, the signature (if
/// asked) and the manifest (the files in `left_in_archive` by their chunk digests only).
fn check_unpacked(dest: &Path, opening: &Opening, left: &mut LeftInArchive) -> Result<PodOptions> {
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
        // The shim's word on how a lazy restore ended lives there: an archive may not bring
        // its own.
        if d.join(layout::LAZY_STATUS).symlink_metadata().is_ok() {
            bail!(
                "hostile archive: container {name:?} ({dir}) brings a {}",
                layout::LAZY_STATUS
            );
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
struct LeftInArchive {
    archive: PathBuf,
    spans: std::collections::BTreeMap<String, layout::PageSpan>,
}

impl LeftInArchive {
    /// Takes each image's chunk digests from the (checked) manifest; an image the manifest
    /// gives no chunks (an archive of an older stasis) is unpacked after all, and checked
    /// whole like every other file.
    fn settle(&mut self, dest: &Path, manifest: &Manifest) -> Result<()> {
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
                }
                _ => unchunked.push(key.clone()),
            }
        }
        for key in unchunked {
            let span = self.spans.remove(&key).expect("listed above");
            let source = span.file.as_ref().unwrap_or(&self.archive);
            let mut from = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(source)
                .with_context(|| format!("open {}", source.display()))?;
            std::io::Seek::seek(&mut from, std::io::SeekFrom::Start(span.offset))?;
            let mut to = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(dest.join(&key))
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

/// The largest chunk a manifest may give a page image: the shim holds one chunk per image
/// in memory while it serves pages.
const MAX_CHUNK: u64 = 16 << 20;

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
fn copy_tree(
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
        let mut out = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(m.permissions().mode() & 0o700)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&to)
            .with_context(|| format!("create {}", to.display()))?;
        let mut input = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&from)
            .with_context(|| format!("open {}", from.display()))?;
        std::io::copy(&mut input, &mut out).with_context(|| format!("copy {}", rel.display()))?;
    }
    Ok(())
}

/// Moves the staged checkpoint `staging` to `dest` (which must not exist): a rename on the
/// same file system, else a copy into a fresh name beside `dest` renamed into place, so that
/// nothing partial is ever at `dest`. Returns the bytes it holds.
pub fn place_dir(staging: &Path, dest: &Path) -> Result<u64> {
    let (_, bytes) = tree_size(staging);
    match rename_new(staging, dest) {
        Ok(()) => return Ok(bytes),
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
        random_suffix()?
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
        Ok(bytes)
    })();
    if copied.is_err() {
        let _ = std::fs::remove_dir_all(&partial);
    }
    copied.map_err(|e| explain_full_disk(e, dest))
}

/// `pod.options`, parsed as the shim writes it (one type for both sides).
pub use stasis_api::layout::PodOptions;

/// Reads `pod.options` from an unpacked archive, saying plainly when it is missing.
/// Bytes free for an unprivileged writer on the file system of `dir`.
// The statvfs field types differ between targets: the conversions are not useless everywhere.
#[allow(clippy::useless_conversion)]
pub fn free_space(dir: &Path) -> Result<u64> {
    let st = nix::sys::statvfs::statvfs(dir)
        .with_context(|| format!("free space of {}", dir.display()))?;
    Ok(u64::from(st.blocks_available()) * u64::from(st.fragment_size()))
}

/// A first pass over the raw headers: every metadata record small, the entry count bounded,
/// and the unpacked total within `room` (the free space where it is unpacked). Data is
/// skipped, not stored, so a compression bomb costs time, not memory or disk.
fn check_bounds(archive: &File, room: u64, opening: &Opening) -> Result<()> {
    let mut tar = tar::Archive::new(open_file(rewound(archive)?, opening)?);
    header_pass(tar.entries().context("read archive")?, room)?.check()
}

/// [`check_bounds`] over entries already opened (a seekable reader skips the file data).
fn bound_entries<R: Read>(entries: tar::Entries<'_, R>, room: u64) -> Result<()> {
    stasis_api::tarbound::bound_entries(entries, room).map_err(bound_error)
}

/// The largest `pod.options` read in the header pass (real ones are a few hundred bytes).
const MAX_POD_OPTIONS: u64 = 1 << 20;

/// What the header pass saw of an archive: its entry names and its `pod.options`.
#[derive(Default)]
struct Outline {
    names: std::collections::HashSet<String>,
    pod_options: Option<Vec<u8>>,
}

/// The bounded first pass ([`stasis_api::tarbound`]) that also notes every entry's name and
/// reads `pod.options`, refusing hostile names and a file given twice.
fn header_pass<R: Read>(entries: tar::Entries<'_, R>, room: u64) -> Result<Outline> {
    let mut outline = Outline::default();
    stasis_api::tarbound::bound_entries_visiting(entries, room, |raw, entry| {
        let shown = String::from_utf8_lossy(raw).into_owned();
        let name = clean_name(Path::new(&shown), &shown)
            .map_err(|e| e.to_string())?
            .display()
            .to_string();
        check_kind(&shown, entry).map_err(|e| e.to_string())?;
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
    fn check(&self) -> Result<()> {
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
            if self
                .names
                .contains(&format!("{dir}/{}", layout::LAZY_STATUS))
            {
                bail!(
                    "hostile archive: container {name:?} ({dir}) brings a {}; {nothing}",
                    layout::LAZY_STATUS
                );
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

fn bound_error(e: stasis_api::tarbound::BoundError) -> anyhow::Error {
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

pub fn read_pod_options(dir: &Path) -> Result<PodOptions> {
    if !dir.join(layout::POD_OPTIONS).exists() {
        bail!("archive has no pod.options");
    }
    Ok(PodOptions::read(dir)?)
}

/// What `stasisctl inspect` shows of one container.
#[derive(Debug, Serialize)]
pub struct ContainerSummary {
    pub name: String,
    pub directory: String,
    pub id: String,
    pub image: String,
    pub engine: String,
    pub checkpointed: String,
    pub frozen_ms: f64,
    pub checkpoint_bytes: u64,
    pub rootfs_diff_bytes: u64,
    pub was_paused: bool,
}

#[derive(Debug, Default, Serialize)]
pub struct Summary {
    pub archive: String,
    pub archive_bytes: u64,
    /// Encrypted (age); without an identity nothing else is known.
    pub encrypted: bool,
    /// The key the archive says signed it (checked only by `pod restore --verify-key`).
    pub signed_by: Option<String>,
    pub pod_name: String,
    pub pod_namespace: String,
    pub engine: String,
    /// Size of the one image of a runtime that saves whole sandboxes (`sandbox/`), else 0.
    pub sandbox_image_bytes: u64,
    pub containers: Vec<ContainerSummary>,
    /// What the pod and container configs ask for beyond an ordinary pod (host paths included).
    pub requests: Vec<crate::policy::Request>,
    /// Those of `requests` this node's restore policy refuses (as `pod restore` would,
    /// without the operator's flags).
    pub refused: Vec<crate::policy::Request>,
}

/// Reads the metadata of an archive without unpacking the images.
pub fn inspect(path: &Path) -> Result<Summary> {
    inspect_with(path, &Opening::default())
}

/// [`inspect`]; an encrypted archive shows only that, unless `opening` can decrypt it.
pub fn inspect_with(path: &Path, opening: &Opening) -> Result<Summary> {
    let encrypted = is_encrypted(path)?;
    if encrypted && opening.identities.is_empty() {
        return Ok(Summary {
            archive: path.display().to_string(),
            archive_bytes: std::fs::metadata(path)?.len(),
            encrypted,
            ..Default::default()
        });
    }
    let file = open_archive(path)?;
    check_bounds(&file, u64::MAX, opening)?;
    let mut files: std::collections::HashMap<String, Vec<u8>> = Default::default();
    let mut sizes: std::collections::HashMap<String, u64> = Default::default();
    let mut held = 0u64;
    let mut tar = tar::Archive::new(open_file(rewound(&file)?, opening)?);
    for entry in tar.entries().context("read archive")? {
        let mut entry =
            entry.map_err(|e| anyhow::anyhow!("archive is truncated or corrupt: {e}"))?;
        let p = safe_path(&entry)?;
        let key = p.display().to_string();
        if let Some(part) = memory_part(&p) {
            *sizes.entry(part).or_default() += entry.size();
        }
        if wanted_for_summary(&p, entry.size()) {
            // Bounded memory whatever the archive holds: only the metadata files of the pod
            // and of each container directory, each small, all together bounded.
            held += entry.size();
            if held > MAX_SUMMARY_BYTES {
                bail!(
                    "hostile archive: more than {} of metadata files",
                    human(MAX_SUMMARY_BYTES)
                );
            }
            let mut buf = Vec::new();
            entry.read_to_end(&mut buf)?;
            files.insert(key, buf);
        }
    }
    summarize(
        files,
        sizes,
        path.display().to_string(),
        std::fs::metadata(path)?.len(),
        encrypted,
    )
}

/// The most of an archive's metadata files `inspect` holds at once.
const MAX_SUMMARY_BYTES: u64 = 64 << 20;

/// The metadata kept of each file while inspecting: its contents when it is one of these,
/// where the layout puts them (the pod's at the top, a container's one level below).
fn wanted_for_summary(p: &Path, size: u64) -> bool {
    let name = p
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let depth = p.components().count();
    let pod = matches!(
        name.as_str(),
        layout::POD_OPTIONS | layout::SIGNATURE | layout::POD_DUMP
    ) && depth == 1;
    let container = matches!(
        name.as_str(),
        layout::CONFIG_DUMP | layout::CONTAINER_META | layout::CONTAINER_CONFIG
    ) && depth == 2;
    (pod || container) && size < 4 << 20
}

/// The part of the pod's memory a file counts for (its container directory, or the sandbox).
fn memory_part(p: &Path) -> Option<String> {
    let top = p
        .components()
        .next()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .unwrap_or_default();
    (p.components()
        .nth(1)
        .map(|c| c.as_os_str() == "checkpoint")
        .unwrap_or(false)
        || top == "sandbox")
        .then_some(top)
}

/// [`inspect`] of an unpacked (and checked) checkpoint directory, named `archive`.
pub fn inspect_dir(dir: &Path, archive: String, archive_bytes: u64) -> Result<Summary> {
    let mut files: std::collections::HashMap<String, Vec<u8>> = Default::default();
    let mut sizes: std::collections::HashMap<String, u64> = Default::default();
    for rel in regular_files(dir)? {
        let size = std::fs::symlink_metadata(dir.join(&rel))?.len();
        if let Some(part) = memory_part(&rel) {
            *sizes.entry(part).or_default() += size;
        }
        if wanted_for_summary(&rel, size) {
            files.insert(rel.display().to_string(), std::fs::read(dir.join(&rel))?);
        }
    }
    if dir.join(layout::SIGNATURE).is_file() {
        files.insert(
            layout::SIGNATURE.to_string(),
            std::fs::read(dir.join(layout::SIGNATURE))?,
        );
    }
    summarize(files, sizes, archive, archive_bytes, false)
}

fn summarize(
    files: std::collections::HashMap<String, Vec<u8>>,
    sizes: std::collections::HashMap<String, u64>,
    archive: String,
    archive_bytes: u64,
    encrypted: bool,
) -> Result<Summary> {
    let options = PodOptions::parse(
        files
            .get(layout::POD_OPTIONS)
            .context("archive has no pod.options")?,
    )?;
    let pod: serde_json::Value = files
        .get(layout::POD_DUMP)
        .and_then(|b| serde_json::from_slice(b).ok())
        .unwrap_or_default();
    let mut containers = Vec::new();
    let mut configs = Vec::new();
    // What `pod restore` would refuse before its policy check: unknown keys, and the
    // runtime handler the archive names (checked unless the operator names one).
    let mut unknown =
        crate::policy::unknown_fields("pod", layout::POD_DUMP, "PodSandboxConfig", &pod);
    if let Some(h) = options.annotations.get(layout::RUNTIME_HANDLER_ANNOTATION) {
        unknown.push(crate::policy::runtime_handler(h, "the archive"));
    }
    for (name, dir) in &options.containers {
        let json = files
            .get(&format!("{dir}/{}", layout::CONTAINER_CONFIG))
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(b).ok());
        if let Some(v) = &json {
            unknown.extend(crate::policy::unknown_fields(
                &format!("container {name}"),
                layout::CONTAINER_CONFIG,
                "ContainerConfig",
                v,
            ));
        }
        if let Some(c) =
            json.and_then(|v| crate::pod::from_go_json::<crate::cri::api::ContainerConfig>(&v).ok())
        {
            configs.push((name.clone(), c));
        }
        let config: CheckpointedConfig = files
            .get(&format!("{dir}/{}", layout::CONFIG_DUMP))
            .and_then(|b| layout::parse_json(layout::CONFIG_DUMP, b).ok())
            .unwrap_or_default();
        let meta: Option<ContainerMeta> = files
            .get(&format!("{dir}/{}", layout::CONTAINER_META))
            .and_then(|b| layout::parse_json(layout::CONTAINER_META, b).ok());
        let meta_or_default = meta.clone().unwrap_or_default();
        containers.push(ContainerSummary {
            name: name.clone(),
            directory: dir.clone(),
            id: config.id,
            image: config.rootfs_image_name,
            engine: meta
                .as_ref()
                .map(|m| m.engine.clone())
                .unwrap_or_else(|| options.engine().to_string()),
            checkpointed: config.checkpointed_time,
            frozen_ms: meta_or_default.frozen_ms,
            checkpoint_bytes: meta
                .as_ref()
                .map(|m| m.checkpoint_bytes)
                .unwrap_or_else(|| sizes.get(dir).copied().unwrap_or(0)),
            rootfs_diff_bytes: meta_or_default.rootfs_diff_bytes,
            was_paused: meta_or_default.was_paused,
        });
    }
    let signed_by = match files.get(layout::SIGNATURE) {
        Some(text) => Some(seal::fingerprint(&seal::signer(text)?)),
        None => None,
    };
    Ok(Summary {
        archive,
        archive_bytes,
        encrypted,
        signed_by,
        pod_name: pod
            .pointer("/metadata/name")
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_string(),
        pod_namespace: pod
            .pointer("/metadata/namespace")
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_string(),
        engine: options.engine().to_string(),
        sandbox_image_bytes: sizes.get("sandbox").copied().unwrap_or(0),
        containers,
        requests: {
            let mut r = crate::policy::requests(
                &crate::pod::from_go_json(&pod).unwrap_or_default(),
                &configs,
            );
            r.append(&mut unknown);
            r
        },
        refused: Vec::new(),
    })
}

pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scratch directory of its own per test (no shared state, removed at the end).
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Self {
            let p = std::env::temp_dir()
                .join(format!("stasis-archive-test-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            Scratch(p)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// The layout a shim writes for a one-container pod.
    fn checkpoint_dir(root: &Path) -> PathBuf {
        let dir = root.join("ckpt");
        let c = dir.join("abc-web");
        std::fs::create_dir_all(c.join("checkpoint")).unwrap();
        std::fs::write(
            dir.join("pod.options"),
            r#"{"version":1,"containers":{"web":"abc-web"},"annotations":{"io.stasis.engine":"runc"}}"#,
        )
        .unwrap();
        std::fs::write(
            dir.join("pod.dump"),
            r#"{"metadata":{"name":"web-pod","namespace":"default"}}"#,
        )
        .unwrap();
        std::fs::write(
            c.join("config.dump"),
            r#"{"id":"abc","rootfsImageName":"busybox","checkpointedTime":"2026-12-01T00:00:00Z"}"#,
        )
        .unwrap();
        std::fs::write(c.join("container-config.json"), "{}").unwrap();
        std::fs::write(
            c.join("stasis.json"),
            r#"{"engine":"runc","frozen_ms":12.5,"checkpoint_bytes":4096,"was_paused":true}"#,
        )
        .unwrap();
        std::fs::write(c.join("checkpoint/pages-1.img"), vec![7u8; 4096]).unwrap();
        dir
    }

    #[test]
    fn written_archives_inspect_and_extract_in_every_compression() {
        let s = Scratch::new("roundtrip");
        let dir = checkpoint_dir(&s.0);
        write_manifest(&dir).unwrap();
        for (compression, name) in [
            (Compression::None, "a.tar"),
            (Compression::Gzip, "a.tar.gz"),
            (Compression::Zstd, "a.tar.zst"),
        ] {
            let dest = s.0.join(name);
            let size = write(&dir, &dest, compression).unwrap();
            assert_eq!(size, std::fs::metadata(&dest).unwrap().len());
            let sum = inspect(&dest).unwrap();
            assert_eq!(sum.pod_name, "web-pod", "{name}");
            assert_eq!(sum.engine, "runc");
            assert_eq!(sum.containers.len(), 1);
            let c = &sum.containers[0];
            assert_eq!(
                (c.name.as_str(), c.id.as_str(), c.image.as_str()),
                ("web", "abc", "busybox")
            );
            assert!(c.was_paused && c.frozen_ms == 12.5 && c.checkpoint_bytes == 4096);
            let out = s.0.join(format!("x-{name}"));
            let opts = extract(&dest, &out).unwrap();
            assert_eq!(opts.containers["web"], "abc-web");
            assert_eq!(
                std::fs::read(out.join("abc-web/checkpoint/pages-1.img")).unwrap(),
                vec![7u8; 4096]
            );
            // No temporary file left beside the archive.
            let partial: Vec<_> = std::fs::read_dir(&s.0)
                .unwrap()
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().contains("partial"))
                .collect();
            assert!(partial.is_empty(), "{partial:?}");
        }
        // One changed byte after the manifest was written: refused, naming the file.
        std::fs::write(dir.join("abc-web/checkpoint/pages-1.img"), vec![8u8; 4096]).unwrap();
        let dest = s.0.join("changed.tar");
        write(&dir, &dest, Compression::None).unwrap();
        let err = extract(&dest, &s.0.join("x-changed")).unwrap_err();
        assert!(
            format!("{err:#}").contains("abc-web/checkpoint/pages-1.img is corrupt"),
            "{err:#}"
        );
        assert!(!s.0.join("x-changed").exists());
    }

    #[test]
    fn hostile_or_incomplete_archives_are_refused_and_leave_nothing() {
        let s = Scratch::new("hostile");
        // An entry climbing out of the target, written byte for byte.
        let mut h = tar::Header::new_old();
        h.as_old_mut().name[..9].copy_from_slice(b"../escape");
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(1);
        h.set_mode(0o644);
        h.set_cksum();
        let mut b = tar::Builder::new(Vec::new());
        b.append(&h, &b"x"[..]).unwrap();
        let evil = s.0.join("evil.tar");
        std::fs::write(&evil, b.into_inner().unwrap()).unwrap();
        let out = s.0.join("out");
        let e = extract(&evil, &out).unwrap_err().to_string();
        assert!(e.contains("..") || e.contains("outside"), "{e}");
        assert!(!out.exists(), "the refused extraction left its directory");
        assert!(!s.0.join("escape").exists());

        // A pod.options naming a directory the archive lacks.
        let dir = checkpoint_dir(&s.0);
        std::fs::write(
            dir.join("pod.options"),
            r#"{"version":1,"containers":{"web":"missing"}}"#,
        )
        .unwrap();
        let bad = s.0.join("bad.tar");
        write(&dir, &bad, Compression::None).unwrap();
        let e = extract(&bad, &out).unwrap_err().to_string();
        assert!(
            e.contains("(missing) has no config.dump; nothing was written"),
            "{e}"
        );
        assert!(!out.exists());

        // A compression bomb without the structure of a checkpoint: the header pass knows,
        // before a byte is unpacked (the target is never even created).
        let bomb = s.0.join("bomb.tar.zst");
        {
            let mut b =
                tar::Builder::new(zstd::Encoder::new(File::create(&bomb).unwrap(), 19).unwrap());
            let mut h = tar::Header::new_gnu();
            h.set_size(256 << 20);
            h.set_mode(0o600);
            b.append_data(&mut h, "zeros", std::io::repeat(0).take(256 << 20))
                .unwrap();
            b.into_inner().unwrap().finish().unwrap();
        }
        assert!(std::fs::metadata(&bomb).unwrap().len() < 1 << 20);
        for e in [
            format!("{:#}", extract(&bomb, &out).unwrap_err()),
            format!("{:#}", inspect(&bomb).unwrap_err()),
        ] {
            assert!(
                e.contains("archive has no pod.options; nothing was written"),
                "{e}"
            );
        }
        assert!(!out.exists());

        // The same file twice (the second would silently replace the checked first).
        let twice = s.0.join("twice.tar");
        {
            let mut b = tar::Builder::new(File::create(&twice).unwrap());
            for _ in 0..2 {
                let mut h = tar::Header::new_gnu();
                h.set_size(2);
                b.append_data(&mut h, "./pod.dump", &b"{}"[..]).unwrap();
            }
            b.into_inner().unwrap();
        }
        let e = format!("{:#}", extract(&twice, &out).unwrap_err());
        assert!(e.contains("pod.dump is in it twice"), "{e}");
        assert!(!out.exists());

        // A version this reader does not know.
        std::fs::write(
            dir.join("pod.options"),
            r#"{"version":9,"containers":{"web":"abc-web"}}"#,
        )
        .unwrap();
        std::fs::remove_file(&bad).unwrap();
        write(&dir, &bad, Compression::None).unwrap();
        let e = format!("{:#}", inspect(&bad).unwrap_err());
        assert!(e.contains("version 9"), "{e}");
    }

    #[test]
    fn archives_are_private_and_never_replace_a_file() {
        use std::os::unix::fs::PermissionsExt;
        let s = Scratch::new("private");
        let dir = checkpoint_dir(&s.0);
        let dest = s.0.join("a.tar.zst");
        write(&dir, &dest, Compression::Zstd).unwrap();
        let mode = std::fs::metadata(&dest).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "the archive is readable by others: {mode:o}");
        // Something at the destination stays as it was, and nothing is left beside it.
        std::fs::remove_file(&dest).unwrap();
        std::fs::write(&dest, "someone else's").unwrap();
        let e = write(&dir, &dest, Compression::Zstd)
            .unwrap_err()
            .to_string();
        assert!(e.contains("already exists"), "{e}");
        assert_eq!(std::fs::read_to_string(&dest).unwrap(), "someone else's");
        let names: Vec<String> = std::fs::read_dir(&s.0)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            !names.iter().any(|n| n.contains("partial")),
            "a partial file was left: {names:?}"
        );
    }

    /// A staged checkpoint is placed whole: renamed on one file system, copied (private, then
    /// renamed) across two (/dev/shm is a tmpfs here); never over an existing directory.
    #[test]
    fn staged_checkpoints_are_placed_whole() {
        use std::os::unix::fs::PermissionsExt;
        let s = Scratch::new("place");
        for (i, stage_root) in [s.0.clone(), PathBuf::from("/dev/shm")].iter().enumerate() {
            let staging = stage_root.join(format!("stasis-place-test-{}-{i}", std::process::id()));
            let _ = std::fs::remove_dir_all(&staging);
            std::fs::create_dir_all(staging.join("c/checkpoint")).unwrap();
            std::fs::write(staging.join("pod.options"), b"{}").unwrap();
            std::fs::write(staging.join("c/checkpoint/pages-1.img"), vec![1u8; 5000]).unwrap();
            // As a checkpoint is staged: private throughout.
            make_private(&staging).unwrap();
            let dest = s.0.join(format!("placed-{i}"));
            assert_eq!(place_dir(&staging, &dest).unwrap(), 5002);
            assert_eq!(
                std::fs::read(dest.join("c/checkpoint/pages-1.img")).unwrap(),
                vec![1u8; 5000]
            );
            let mode = std::fs::metadata(dest.join("c"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o700);
            let _ = std::fs::remove_dir_all(&staging);
            std::fs::create_dir_all(&staging).unwrap();
            assert!(
                place_dir(&staging, &dest).is_err(),
                "placed over {}",
                dest.display()
            );
            let _ = std::fs::remove_dir_all(&staging);
        }
    }

    /// A lazy restore's unpack leaves page images in an uncompressed archive: not unpacked,
    /// spans pointing at the images' bytes, chunk digests from the manifest; everything else
    /// unpacked and checked. A compressed archive cannot.
    #[test]
    fn page_images_stay_in_an_uncompressed_archive() {
        let s = Scratch::new("leave");
        let dir = checkpoint_dir(&s.0);
        let pages: Vec<u8> = (0..(2 * layout::PAGE_CHUNK_SIZE + 4096))
            .map(|i| (i % 251) as u8)
            .collect();
        std::fs::write(dir.join("abc-web/checkpoint/pages-1.img"), &pages).unwrap();
        write_manifest(&dir).unwrap();
        let plain = s.0.join("a.tar");
        write(&dir, &plain, Compression::None).unwrap();
        assert!(is_plain_tar(&plain).unwrap());
        let out = s.0.join("out");
        let (options, source) = extract_leaving_pages(&plain, &out, &Opening::default()).unwrap();
        assert_eq!(options.containers["web"], "abc-web");
        let span = &source.files["abc-web/checkpoint/pages-1.img"];
        assert_eq!((span.size, span.chunks.len()), (pages.len() as u64, 3));
        let bytes = std::fs::read(&source.archive).unwrap();
        let at = span.offset as usize;
        assert_eq!(&bytes[at..at + pages.len()], &pages[..]);
        // Left for the shim to make: absent, so an older shim fails instead of restoring zeros.
        assert!(!out.join("abc-web/checkpoint/pages-1.img").exists());
        assert!(out.join("abc-web/config.dump").is_file());
        // The eager path still reads chunked images whole and checks them.
        let whole = s.0.join("whole");
        extract(&plain, &whole).unwrap();
        assert_eq!(
            std::fs::read(whole.join("abc-web/checkpoint/pages-1.img")).unwrap(),
            pages
        );
        let zst = s.0.join("a.tar.zst");
        write(&dir, &zst, Compression::Zstd).unwrap();
        assert!(!is_plain_tar(&zst).unwrap());
    }

    /// Signed and encrypted archives round-trip; the wrong key, no identity, a tampered
    /// signed archive and an unknown format version are refused, leaving nothing.
    #[test]
    fn sealed_archives_open_only_with_the_right_keys() {
        let s = Scratch::new("sealed");
        let dir = checkpoint_dir(&s.0);
        write_manifest(&dir).unwrap();
        seal::generate(seal::KeyKind::Signing, &s.0.join("sign")).unwrap();
        let key = seal::load_signing_key(&s.0.join("sign")).unwrap();
        seal::sign_manifest(&dir, &key).unwrap();
        let recipient = seal::generate(seal::KeyKind::Encryption, &s.0.join("id")).unwrap();
        seal::generate(seal::KeyKind::Encryption, &s.0.join("other")).unwrap();
        let recipients = seal::load_recipients(recipient.trim()).unwrap();
        let dest = s.0.join("a.tar.zst.age");
        let w = write_cancellable(
            &dir,
            &dest,
            Compression::Zstd,
            &recipients,
            &AtomicBool::new(false),
        )
        .unwrap();
        verify_bytes(&dest, &w).unwrap();
        let bytes = std::fs::read(&dest).unwrap();
        assert!(
            !bytes.windows(7).any(|w| w == b"web-pod"),
            "plaintext in the archive"
        );
        let sum = inspect(&dest).unwrap();
        assert!(sum.encrypted && sum.pod_name.is_empty());
        let right = Opening {
            identities: seal::load_identities(&s.0.join("id")).unwrap(),
            verify: vec![key.verifying_key()],
        };
        let sum = inspect_with(&dest, &right).unwrap();
        assert_eq!(sum.pod_name, "web-pod");
        assert_eq!(sum.signed_by, Some(seal::fingerprint(&key.verifying_key())));
        extract_with(&dest, &s.0.join("ok"), &right).unwrap();
        let out = s.0.join("refused");
        let e = extract(&dest, &out).unwrap_err().to_string();
        assert!(e.contains("--identity"), "{e}");
        let wrong = Opening {
            identities: seal::load_identities(&s.0.join("other")).unwrap(),
            verify: Vec::new(),
        };
        let e = extract_with(&dest, &out, &wrong).unwrap_err().to_string();
        assert!(e.contains("other recipients"), "{e}");
        // Signed by another key, unsigned, or changed after signing (manifest rewritten).
        let stranger = Opening {
            identities: right.identities.clone(),
            verify: vec![ed25519_dalek::SigningKey::generate(&mut rand_core::OsRng).verifying_key()],
        };
        let e = format!("{:#}", extract_with(&dest, &out, &stranger).unwrap_err());
        assert!(e.contains("is signed by"), "{e}");
        std::fs::write(dir.join("pod.dump"), r#"{"metadata":{"name":"evil"}}"#).unwrap();
        std::fs::remove_file(dir.join(layout::MANIFEST)).unwrap();
        write_manifest(&dir).unwrap();
        let tampered = s.0.join("tampered.tar");
        write(&dir, &tampered, Compression::None).unwrap();
        let e = format!("{:#}", extract_with(&tampered, &out, &right).unwrap_err());
        assert!(e.contains("changed after it was signed"), "{e}");
        std::fs::remove_file(dir.join(layout::SIGNATURE)).unwrap();
        let unsigned = s.0.join("unsigned.tar");
        write(&dir, &unsigned, Compression::None).unwrap();
        let e = format!("{:#}", extract_with(&unsigned, &out, &right).unwrap_err());
        assert!(e.contains("not signed"), "{e}");
        // A format from the future.
        let text = std::fs::read_to_string(dir.join(layout::MANIFEST)).unwrap();
        std::fs::write(
            dir.join(layout::MANIFEST),
            text.replacen("\"version\":3", "\"version\":9", 1),
        )
        .unwrap();
        let future = s.0.join("future.tar");
        write(&dir, &future, Compression::None).unwrap();
        let e = format!("{:#}", extract(&future, &out).unwrap_err());
        assert!(e.contains("format version 9 is unknown"), "{e}");
        assert!(!out.exists(), "a refused archive left {}", out.display());
    }

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(3 << 30), "3.0 GiB");
    }
}
