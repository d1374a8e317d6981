use super::*;
use crate::progress::Counting;

/// Writes `dir` as an archive at `dest`, durably and atomically: into a fresh private file
/// (0600, never an existing one) beside `dest`, every error up to the end of the compressed
/// stream counted, the file synced, then renamed into place without replacing anything that
/// appeared at `dest` meanwhile, and the directory synced. A failure (a full disk above all)
/// leaves nothing at or beside `dest`.
pub fn write(dir: &Path, dest: &Path, compression: Compression) -> Result<u64> {
    write_cancellable(dir, dest, compression, &[], &AtomicBool::new(false)).map(|w| w.bytes)
}

/// What was written: its size, which file it is, and (packed from a staged checkpoint) what
/// [`check_written`] compares it with.
pub struct Written {
    pub bytes: u64,
    /// Device and inode of the file written.
    pub file: (u64, u64),
    /// An uncompressed, unencrypted tar.
    pub plain: bool,
    pub packed: Option<Packed>,
}

/// How an archive is written: compressed, encrypted to `recipients` when there are any,
/// giving up (and leaving nothing) once `cancel` is set.
pub struct Writing<'a> {
    pub compression: Compression,
    pub recipients: &'a [age::x25519::Recipient],
    pub cancel: &'a AtomicBool,
}

/// [`write`], encrypted to `recipients` when there are any, giving up (and leaving nothing)
/// once `cancel` is set. `dir` is archived as it is (its manifest too).
pub fn write_cancellable(
    dir: &Path,
    dest: &Path,
    compression: Compression,
    recipients: &[age::x25519::Recipient],
    cancel: &AtomicBool,
) -> Result<Written> {
    let how = Writing {
        compression,
        recipients,
        cancel,
    };
    write_file(dest, &how, &mut |tar| {
        tar.append_dir_all(".", dir)?;
        Ok(None)
    })
}

/// Packs the staged checkpoint `dir` into a new archive at `dest` in one pass (see
/// [`tar_consuming`]): the manifest (signed with `sign`) is made while writing, and the staged
/// files are used up.
pub fn write_consuming(
    dir: &Path,
    dest: &Path,
    how: &Writing,
    sign: Option<&ed25519_dalek::SigningKey>,
) -> Result<Written> {
    write_file(dest, how, &mut |tar| {
        tar_consuming(dir, tar, sign).map(Some)
    })
}

/// What goes into the tar stream, given its builder.
pub(super) type Body<'a> =
    &'a mut dyn FnMut(&mut tar::Builder<&mut dyn Write>) -> Result<Option<Packed>>;

fn write_file(dest: &Path, how: &Writing, body: Body) -> Result<Written> {
    use std::os::unix::fs::MetadataExt;
    let parent = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = dest
        .file_name()
        .with_context(|| format!("{} names no file", dest.display()))?
        .to_string_lossy()
        .into_owned();
    let partial = parent.join(format!(".{name}.partial-{}", files::random_suffix()?));
    let file = files::create_file(&partial, 0o600)?;
    let out = Cancellable::new(file, how.cancel);
    let started = std::time::Instant::now();
    let mut packed = None;
    let mut keep = |tar: &mut tar::Builder<&mut dyn Write>| {
        packed = body(tar)?;
        Ok(None)
    };
    let stream = if how.recipients.is_empty() {
        pack_stream(out, how.compression, &mut keep)
    } else {
        seal::encrypt(out, how.recipients)
            .and_then(|enc| pack_stream(enc, how.compression, &mut keep))
            .and_then(|enc| enc.finish().context("finish the encryption"))
    };
    let mut sum = (0, (0, 0));
    let copied = started.elapsed();
    let written = stream
        .and_then(|w| {
            let bytes = w.bytes;
            let file = w.finish()?;
            let meta = file.metadata()?;
            sum = (bytes, (meta.dev(), meta.ino()));
            file.sync_all().context("sync the archive")
        })
        .inspect(|()| {
            tracing::debug!(
                bytes = sum.0,
                write_ms = copied.as_millis() as u64,
                sync_ms = (started.elapsed() - copied).as_millis() as u64,
                "archive written and synced"
            )
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
        bytes: sum.0,
        file: sum.1,
        plain: how.compression == Compression::None && how.recipients.is_empty(),
        packed,
    })
}

/// `dir` as a plain tar stream into `w` (what a migration sends).
pub fn write_tar<W: Write>(dir: &Path, w: W) -> Result<W> {
    write_stream(dir, w, Compression::None)
}

/// The tar stream of `dir`, compressed, with the end of every layer checked.
pub(super) fn write_stream<W: Write>(dir: &Path, file: W, compression: Compression) -> Result<W> {
    pack_stream(file, compression, &mut |tar| {
        tar.append_dir_all(".", dir)?;
        Ok(None)
    })
}

/// The tar stream `body` makes, compressed, with the end of every layer checked: a
/// compressor's final block failing (ENOSPC) is an error, not a silently truncated archive.
fn pack_stream<W: Write>(file: W, compression: Compression, body: Body) -> Result<W> {
    fn tar_into<W: Write>(mut w: W, body: Body) -> Result<W> {
        {
            let mut tar = tar::Builder::new(&mut w as &mut dyn Write);
            tar.follow_symlinks(false);
            // Modes as they are: CRIU's page images and the configs with environment secrets
            // are 0600 and stay so for whoever unpacks the archive.
            tar.mode(tar::HeaderMode::Complete);
            body(&mut tar)?;
            tar.finish()?;
        }
        Ok(w)
    }
    // The tar stream before compression is counted: what a byte progress compares with
    // the staged size.
    let file = match compression {
        Compression::None => {
            let mut w = tar_into(Counting(std::io::BufWriter::new(file)), body)?.0;
            w.flush()?;
            w.into_inner().map_err(|e| e.into_error())?
        }
        Compression::Gzip => tar_into(
            Counting(flate2::write::GzEncoder::new(
                file,
                flate2::Compression::fast(),
            )),
            body,
        )?
        .0
        .finish()?,
        // The frame carries a checksum of its content, so a reader notices a corrupted frame.
        Compression::Zstd => {
            let mut enc = zstd::Encoder::new(file, 3)?;
            enc.include_checksum(true)?;
            tar_into(Counting(enc), body)?.0.finish()?
        }
    };
    Ok(file)
}

/// The archive file's writer: it fails once its flag is set (how an interrupted packaging
/// stops), and hands the bytes, in 1 MiB pieces, to a thread of its own that writes them and
/// starts the disk's writeback every few MiB. Reading, summing and framing go on meanwhile
/// (two cores), and the final fsync waits for little more than the last pieces.
pub(super) struct Cancellable<'a> {
    cancel: &'a AtomicBool,
    pub(super) bytes: u64,
    piece: Vec<u8>,
    to_writer: Option<std::sync::mpsc::SyncSender<Vec<u8>>>,
    writer: Option<std::thread::JoinHandle<std::io::Result<File>>>,
}

/// Bytes handed to the writing thread at once.
const PIECE: usize = 1 << 20;

/// Writeback is started in steps of this many bytes.
const WRITEBACK_STEP: u64 = 8 << 20;

impl<'a> Cancellable<'a> {
    pub(super) fn new(mut file: File, cancel: &'a AtomicBool) -> Self {
        let (to_writer, pieces) = std::sync::mpsc::sync_channel::<Vec<u8>>(4);
        let writer = std::thread::spawn(move || {
            let (mut written, mut started) = (0u64, 0u64);
            for piece in pieces {
                file.write_all(&piece)?;
                written += piece.len() as u64;
                if written - started >= WRITEBACK_STEP {
                    use std::os::fd::AsRawFd;
                    // SAFETY: a plain syscall on our open file; it only starts writeback (an
                    // error is left for the final fsync to report).
                    unsafe {
                        libc::sync_file_range(
                            file.as_raw_fd(),
                            started as i64,
                            (written - started) as i64,
                            libc::SYNC_FILE_RANGE_WRITE,
                        )
                    };
                    started = written;
                }
            }
            Ok(file)
        });
        Cancellable {
            cancel,
            bytes: 0,
            piece: Vec::with_capacity(PIECE),
            to_writer: Some(to_writer),
            writer: Some(writer),
        }
    }

    /// The writing thread's end: its error, or the file with every byte written to it.
    fn join(&mut self) -> std::io::Result<File> {
        self.to_writer = None;
        match self.writer.take().map(|w| w.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(std::io::Error::other(
                "the archive's writing thread panicked",
            )),
            None => Err(std::io::Error::other("the archive was finished already")),
        }
    }

    fn send(&mut self) -> std::io::Result<()> {
        let piece = std::mem::replace(&mut self.piece, Vec::with_capacity(PIECE));
        let sent = self.to_writer.as_ref().map(|tx| tx.send(piece));
        match sent {
            Some(Ok(())) => Ok(()),
            // The thread stopped: its error says why.
            _ => Err(self
                .join()
                .err()
                .unwrap_or_else(|| std::io::Error::other("the archive's writing thread stopped"))),
        }
    }

    /// Every byte written to the file: the file, to be synced.
    pub(super) fn finish(mut self) -> std::io::Result<File> {
        if !self.piece.is_empty() {
            self.send()?;
        }
        self.join()
    }
}

impl Write for Cancellable<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.cancel.load(Ordering::SeqCst) {
            // Not ErrorKind::Interrupted: `write_all` retries those forever.
            return Err(std::io::Error::other("archive writing interrupted"));
        }
        let n = buf.len().min(PIECE - self.piece.len());
        self.piece.extend_from_slice(&buf[..n]);
        self.bytes += n as u64;
        if self.piece.len() == PIECE {
            self.send()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for Cancellable<'_> {
    fn drop(&mut self) {
        // Not finished (an error or an interrupt): the thread ends with the channel; wait for
        // it, so nothing writes into the file once it is removed.
        if self.writer.is_some() {
            let _ = self.join();
        }
    }
}

/// The regular files below `dir` and their bytes (links and other entries not counted).
pub fn tree_size(dir: &Path) -> (u64, u64) {
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

/// Renames `from` to `to` unless something exists at `to` (RENAME_NOREPLACE).
pub(super) fn rename_new(from: &Path, to: &Path) -> Result<()> {
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
pub(super) fn explain_full_disk(e: anyhow::Error, dest: &Path) -> anyhow::Error {
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
