//! Pages of a lazy restore read straight from the archive the checkpoint came in.
//!
//! A lazy restore from an uncompressed archive leaves CRIU's page images (`pages-N.img`) in
//! the archive: stasisctl unpacks sparse placeholders instead and names the byte range of
//! each image in the restore options, with the SHA-256 of every chunk from the archive's
//! manifest. Before the restore, the pages CRIU reads eagerly (those not marked lazy in the
//! pagemaps: stacks, shared memory, file mappings) are copied into the placeholders; the lazy
//! ones are served on demand to `criu lazy-pages` over a socket pair, speaking CRIU's
//! page-server protocol (`criu/page-xfer.c`). Every chunk is checked against its digest
//! before any byte of it is used, so a changed archive fails the restore instead of feeding
//! it foreign memory.

use std::{
    collections::HashMap,
    fs::File,
    io::{Read, Write},
    os::unix::{fs::FileExt, net::UnixStream},
    path::Path,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use log::{debug, info, warn};
use prost::Message;
use stasis_api::layout::{PageSource, PageSpan};

use crate::error::{Error, Result};
use chunks::CheckedSpan;

const PAGE_SIZE: u64 = 4096;
/// CRIU image magics (criu/include/magic.h): every image but the raw ones starts with the
/// common magic and then its own.
const IMG_COMMON_MAGIC: u32 = 0x5456_4319;
const PAGEMAP_MAGIC: u32 = 0x5608_4025;

/// Pagemap entry flags (criu/include/pagemap.h).
const PE_PARENT: u32 = 1 << 0;
const PE_LAZY: u32 = 1 << 1;
const PE_PRESENT: u32 = 1 << 2;

/// Page-server commands (criu/include/page-xfer.h); the upper 16 bits carry flags.
const PS_IOV_ADD_F: u32 = 6;
const PS_IOV_GET: u32 = 7;
const PS_IOV_CLOSE: u32 = 0x1023;
const PS_IOV_FORCE_CLOSE: u32 = 0x1024;
const PS_CMD_BITS: u32 = 16;

/// `pagemap_head` of CRIU's images/pagemap.proto.
#[derive(Clone, PartialEq, Message)]
struct PagemapHead {
    #[prost(uint32, required, tag = "1")]
    pages_id: u32,
}

/// `pagemap_entry` of CRIU's images/pagemap.proto.
#[derive(Clone, PartialEq, Message)]
struct PagemapEntry {
    #[prost(uint64, required, tag = "1")]
    vaddr: u64,
    #[prost(uint32, required, tag = "2")]
    nr_pages: u32,
    #[prost(bool, optional, tag = "3")]
    in_parent: Option<bool>,
    #[prost(uint32, optional, tag = "4")]
    flags: Option<u32>,
}

/// A run of pages of one pagemap whose bytes are in its pages image.
#[derive(Debug, Clone, PartialEq)]
struct Run {
    vaddr: u64,
    pages: u64,
    /// Where the run starts in the pages image.
    offset: u64,
    lazy: bool,
}

/// One pagemap image: which pages image holds its pages, and where each run is.
#[derive(Debug)]
struct Pagemap {
    pages_id: u32,
    runs: Vec<Run>,
}

/// The largest pagemap entry accepted (a real one is about 20 bytes).
const MAX_PAGEMAP_ENTRY: u32 = 4096;

/// A little-endian u32, or None at a clean end of the stream.
fn read_word(r: &mut impl Read, end_ok: bool) -> std::result::Result<Option<u32>, String> {
    let mut b = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match r.read(&mut b[got..]) {
            Ok(0) if got == 0 && end_ok => return Ok(None),
            Ok(0) => return Err("truncated".into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(Some(u32::from_le_bytes(b)))
}

/// One length-prefixed protobuf entry of a CRIU image, bounded; None at the end.
fn read_entry(r: &mut impl Read) -> std::result::Result<Option<Vec<u8>>, String> {
    let Some(len) = read_word(r, true)? else {
        return Ok(None);
    };
    if len > MAX_PAGEMAP_ENTRY {
        return Err(format!(
            "an entry of {len} bytes (at most {MAX_PAGEMAP_ENTRY})"
        ));
    }
    let mut body = vec![0u8; len as usize];
    r.read_exact(&mut body)
        .map_err(|_| "truncated entry".to_string())?;
    Ok(Some(body))
}

/// A pagemap image read as a stream: its head (which pages image), then its runs, never
/// the whole file in memory.
struct PagemapReader<R> {
    r: R,
}

impl<R: Read> PagemapReader<R> {
    /// Checks the magics and reads the head: the id of the pages image.
    fn open(mut r: R) -> std::result::Result<(u32, Self), String> {
        if read_word(&mut r, false)? != Some(IMG_COMMON_MAGIC)
            || read_word(&mut r, false)? != Some(PAGEMAP_MAGIC)
        {
            return Err("not a CRIU pagemap image".into());
        }
        let head = read_entry(&mut r)?.ok_or("no pagemap head")?;
        let head = PagemapHead::decode(head.as_slice()).map_err(|e| e.to_string())?;
        Ok((head.pages_id, PagemapReader { r }))
    }

    /// The present runs, in pages-image order; refused once they need more than
    /// `image_size` bytes of the pages image (so memory stays within what the image holds).
    fn runs(mut self, image_size: u64) -> std::result::Result<Vec<Run>, String> {
        let (mut runs, mut offset) = (Vec::new(), 0u64);
        while let Some(body) = read_entry(&mut self.r)? {
            let e = PagemapEntry::decode(body.as_slice()).map_err(|e| e.to_string())?;
            let flags = e.flags.unwrap_or(if e.in_parent.unwrap_or(false) {
                PE_PARENT
            } else {
                PE_PRESENT
            });
            if flags & PE_PRESENT == 0 {
                continue;
            }
            let pages = u64::from(e.nr_pages);
            if pages == 0 {
                return Err(format!("an empty run at {:#x}", e.vaddr));
            }
            let len = pages * PAGE_SIZE;
            if e.vaddr.checked_add(len).is_none() {
                return Err(format!(
                    "a run at {:#x} of {pages} pages wraps around",
                    e.vaddr
                ));
            }
            runs.push(Run {
                vaddr: e.vaddr,
                pages,
                offset,
                lazy: flags & PE_LAZY != 0,
            });
            offset = offset
                .checked_add(len)
                .filter(|end| *end <= image_size)
                .ok_or_else(|| {
                    format!(
                        "pages at {:#x} lie past the end of its pages image ({image_size} bytes)",
                        e.vaddr
                    )
                })?;
        }
        Ok(runs)
    }
}

#[cfg(test)]
fn parse_pagemap(bytes: &[u8]) -> std::result::Result<Pagemap, String> {
    let (pages_id, reader) = PagemapReader::open(bytes)?;
    Ok(Pagemap {
        pages_id,
        runs: reader.runs(u64::MAX)?,
    })
}

/// The page server's socket send buffer: the largest request CRIU's daemon makes (4 MiB),
/// with room for the header.
const SEND_BUFFER: usize = 5 << 20;

/// Writes every byte of `bufs` to `sock`.
fn write_all_slices(
    sock: &mut UnixStream,
    mut bufs: &mut [std::io::IoSlice<'_>],
) -> std::io::Result<()> {
    while !bufs.is_empty() {
        match sock.write_vectored(bufs) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => std::io::IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Opens `path` for reading (never through a link), once: later calls share the file.
fn open_once(
    files: &mut HashMap<std::path::PathBuf, std::sync::Arc<File>>,
    id: &str,
    path: &Path,
) -> Result<std::sync::Arc<File>> {
    if let Some(f) = files.get(path) {
        return Ok(f.clone());
    }
    let f = stasis_api::private::open_nofollow(path)
        .map_err(|e| Error::io(id, format!("open {}", path.display()), e))?;
    let f = std::sync::Arc::new(f);
    files.insert(path.to_path_buf(), f.clone());
    Ok(f)
}

/// Reads the pagemap image at `path` (file `name`), with the key and span of its pages image
/// in `source`; `None` when the source does not hold that pages image.
fn read_pagemap<'s>(
    id: &str,
    path: &Path,
    name: &str,
    rel: &Path,
    source: &'s PageSource,
) -> Result<Option<(Pagemap, String, &'s PageSpan)>> {
    // Streamed, and only as far as its pages image reaches: a hostile pagemap
    // costs no more memory than the pages it may name.
    let file = stasis_api::private::open_nofollow(path)
        .map_err(|e| Error::io(id, format!("read {name}"), e))?;
    let (pages_id, reader) = PagemapReader::open(std::io::BufReader::new(file))
        .map_err(|m| Error::invalid(id, format!("{name}: {m}")))?;
    let key = rel
        .join(format!("pages-{pages_id}.img"))
        .display()
        .to_string();
    let Some(span) = source.files.get(&key) else {
        return Ok(None);
    };
    // The chunking comes from the archive's manifest: one digest per chunk, of a real size.
    if span.chunk_size == 0 || span.chunks.len() as u64 != span.size.div_ceil(span.chunk_size) {
        return Err(Error::invalid(
            id,
            format!(
                "{key}: {} chunk digests for {} bytes in chunks of {}",
                span.chunks.len(),
                span.size,
                span.chunk_size
            ),
        ));
    }
    let map = Pagemap {
        pages_id,
        runs: reader
            .runs(span.size)
            .map_err(|m| Error::invalid(id, format!("{name}: {m}")))?,
    };
    Ok(Some((map, key, span)))
}

/// Makes the pages image `local` as a sparse file of `size` bytes, for the eager pages.
fn placeholder(id: &str, local: &Path, size: u64) -> Result<File> {
    let placeholder = crate::util::create_private(local)
        .map_err(|e| Error::io(id, format!("create {}", local.display()), e))?;
    placeholder
        .set_len(size)
        .map_err(|e| Error::io(id, format!("size {}", local.display()), e))?;
    Ok(placeholder)
}

/// Copies the eager pages of `map` (pagemap file `name`) from `span` into `placeholder`
/// (`local`), where CRIU's restore reads them; a chunk at a time. Returns the bytes copied.
fn copy_eager_pages(
    id: &str,
    span: &mut CheckedSpan,
    map: &Pagemap,
    placeholder: &File,
    local: &Path,
    name: &str,
) -> Result<u64> {
    let mut copied = 0u64;
    let step = span.bytes.span.chunk_size.max(PAGE_SIZE);
    for run in map.runs.iter().filter(|r| !r.lazy) {
        let end = run.offset + run.pages * PAGE_SIZE;
        if end > span.bytes.span.size {
            return Err(Error::invalid(
                id,
                format!(
                    "{name}: pages at {:#x} lie past the end of {}",
                    run.vaddr, span.bytes.key
                ),
            ));
        }
        let mut at = run.offset;
        while at < end {
            let mut buf = vec![0u8; (end - at).min(step) as usize];
            span.read(at, &mut buf).map_err(|m| Error::invalid(id, m))?;
            placeholder
                .write_all_at(&buf, at)
                .map_err(|e| Error::io(id, format!("write {}", local.display()), e))?;
            at += buf.len() as u64;
            copied += buf.len() as u64;
        }
    }
    Ok(copied)
}

/// What one container's page server has sent so far (RestoreStatus, the restore's events,
/// and through them progress and metrics).
#[derive(Debug, Default)]
pub struct PageCounters {
    /// Bytes of the pages CRIU asks for on demand (the lazy runs of every pagemap).
    pub total: u64,
    pub bytes: AtomicU64,
    pub requests: AtomicU64,
}

impl PageCounters {
    /// (bytes sent, of total, in requests) now.
    pub fn read(&self) -> (u64, u64, u64) {
        (
            self.bytes.load(Ordering::Relaxed),
            self.total,
            self.requests.load(Ordering::Relaxed),
        )
    }
}

/// The pages of one container's images left in an archive.
pub struct ArchivePages {
    id: String,
    /// Where the pages come from (the archive, or a checkpoint directory), for the log.
    from: String,
    /// pid → its pagemap's present runs, and the checked span of its pages image.
    tasks: HashMap<u64, (Vec<Run>, usize)>,
    spans: Vec<CheckedSpan>,
    counters: Arc<PageCounters>,
}

impl ArchivePages {
    /// Reads the pagemaps in `image` and finds the archive spans of their pages images
    /// (`rel`: the image directory below the restore directory, as the source names it);
    /// makes each pages image (absent until now, so that a shim that knows nothing of page
    /// sources fails instead of restoring zeros) as a sparse file holding the pages CRIU
    /// restores eagerly. Ok(None): the source holds none of this image's pages; an error if
    /// it holds one no pagemap here uses.
    pub fn open(
        id: &str,
        image: &Path,
        rel: &Path,
        source: &PageSource,
    ) -> Result<Option<ArchivePages>> {
        // Each file once (an archive holds every image; a checkpoint directory one each),
        // never through a link.
        let mut files: HashMap<std::path::PathBuf, std::sync::Arc<File>> = HashMap::new();
        let mut pages = ArchivePages {
            id: id.to_string(),
            from: source.archive.display().to_string(),
            tasks: HashMap::new(),
            spans: Vec::new(),
            counters: Arc::default(),
        };
        let mut by_pages_id: HashMap<u32, usize> = HashMap::new();
        let entries =
            std::fs::read_dir(image).map_err(|e| Error::io(id, "read the restore images", e))?;
        let mut placeholders: HashMap<u32, File> = HashMap::new();
        for e in entries {
            let e = e.map_err(|e| Error::io(id, "read the restore images", e))?;
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(task) = name
                .strip_prefix("pagemap-")
                .and_then(|n| n.strip_suffix(".img"))
            else {
                continue;
            };
            let Some((map, key, span)) = read_pagemap(id, &e.path(), &name, rel, source)? else {
                continue;
            };
            let local = image.join(format!("pages-{}.img", map.pages_id));
            let index = match by_pages_id.get(&map.pages_id) {
                Some(i) => *i,
                None => {
                    let file = open_once(
                        &mut files,
                        id,
                        span.file.as_deref().unwrap_or(&source.archive),
                    )?;
                    pages
                        .spans
                        .push(CheckedSpan::new(file, key.clone(), span.clone()));
                    by_pages_id.insert(map.pages_id, pages.spans.len() - 1);
                    placeholders.insert(map.pages_id, placeholder(id, &local, span.size)?);
                    pages.spans.len() - 1
                }
            };
            let placeholder = &placeholders[&map.pages_id];
            let copied = copy_eager_pages(
                id,
                &mut pages.spans[index],
                &map,
                placeholder,
                &local,
                &name,
            )?;
            debug!(
                "{id}: {name}: {copied} bytes of eager pages copied from {}",
                pages.from
            );
            // Shared memory has pagemaps of its own (pagemap-shmem-N): never lazy.
            if let Ok(pid) = task.parse::<u64>() {
                pages.tasks.insert(pid, (map.runs, index));
            }
        }
        // Every page image the source holds for this container must have been placed: one
        // left out would be missing (CRIU fails) or, worse, read as zeros.
        let prefix = format!("{}/", rel.display());
        if let Some(unused) = source
            .files
            .keys()
            .find(|k| k.starts_with(&prefix) && !pages.spans.iter().any(|s| &s.bytes.key == *k))
        {
            return Err(Error::invalid(
                id,
                format!("{unused} is in the restore's page source, but no pagemap uses it"),
            ));
        }
        let total = pages
            .tasks
            .values()
            .flat_map(|(runs, _)| runs.iter().filter(|r| r.lazy))
            .map(|r| r.pages * PAGE_SIZE)
            .sum();
        pages.counters = Arc::new(PageCounters {
            total,
            ..Default::default()
        });
        Ok((!pages.spans.is_empty()).then_some(pages))
    }

    /// The counters [`ArchivePages::serve`] keeps up to date.
    pub fn counters(&self) -> Arc<PageCounters> {
        self.counters.clone()
    }

    /// Up to `want` pages of `pid` from `vaddr` on: as many as sit together in one pages
    /// image. None when `vaddr` is not a page of its pagemap.
    fn find(&self, pid: u64, vaddr: u64, want: u64) -> Option<(usize, u64, u64)> {
        let (runs, span) = self.tasks.get(&pid)?;
        let i = runs.partition_point(|r| r.vaddr + r.pages * PAGE_SIZE <= vaddr);
        let first = runs.get(i).filter(|r| r.vaddr <= vaddr)?;
        let offset = first.offset + (vaddr - first.vaddr);
        let mut pages = (first.vaddr + first.pages * PAGE_SIZE - vaddr) / PAGE_SIZE;
        // Runs that follow on in memory follow on in the image too.
        let mut end = first.vaddr + first.pages * PAGE_SIZE;
        for r in &runs[i + 1..] {
            if pages >= want || r.vaddr != end {
                break;
            }
            pages += r.pages;
            end += r.pages * PAGE_SIZE;
        }
        Some((*span, offset, pages.min(want)))
    }

    /// Answers the daemon's request for `nr` pages at `vaddr` of task `dst`, from checked
    /// chunks (those `ahead`'s helper checked first); tells the helper what comes next.
    fn answer(
        &mut self,
        sock: &mut UnixStream,
        (nr, vaddr, dst): (u32, u64, u64),
        ahead: Option<&ahead::Ahead>,
    ) -> std::result::Result<(), String> {
        let (span, offset, pages) = self.find(dst, vaddr, u64::from(nr)).ok_or_else(|| {
            format!("task {dst} asked for pages at {vaddr:#x} its images do not hold")
        })?;
        let len = pages * PAGE_SIZE;
        let mut head = [0u8; 24];
        let cmd = (PE_PRESENT << PS_CMD_BITS) | PS_IOV_ADD_F;
        head[0..4].copy_from_slice(&cmd.to_le_bytes());
        head[4..8].copy_from_slice(&(pages as u32).to_le_bytes());
        head[8..16].copy_from_slice(&vaddr.to_le_bytes());
        head[16..24].copy_from_slice(&dst.to_le_bytes());
        let chunk_size = self.spans[span].bytes.span.chunk_size;
        let body = self.spans[span].slices(offset, len, ahead.map(|a| (a, span)))?;
        let mut reply: Vec<std::io::IoSlice> = std::iter::once(&head[..])
            .chain(body)
            .map(std::io::IoSlice::new)
            .collect();
        write_all_slices(sock, &mut reply).map_err(|e| format!("send pages: {e}"))?;
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        self.counters.bytes.fetch_add(len, Ordering::Relaxed);
        // The daemon's background transfer asks for the image in order, in requests of
        // 64 KiB growing to 4 MiB; a fault asks for a page or a few, anywhere: only the
        // former is followed.
        if let (Some(a), true) = (ahead, len >= ahead::FOLLOWED_REQUEST) {
            a.want(span, (offset + len).div_ceil(chunk_size));
        }
        Ok(())
    }

    /// Serves the lazy-pages daemon on `sock` until it says it is done or goes away.
    pub fn serve(mut self, mut sock: UnixStream) -> std::result::Result<(), String> {
        let id = self.id.clone();
        // Room for a whole answer in the socket: the write returns at once and the next
        // chunks are checked while the daemon reads it (best effort; the default is ~200 KiB).
        if nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::SndBufForce, &SEND_BUFFER)
            .is_err()
        {
            let _ = nix::sys::socket::setsockopt(
                &sock,
                nix::sys::socket::sockopt::SndBuf,
                &SEND_BUFFER,
            );
        }
        let counters = self.counters.clone();
        // Chunks are checked by a helper thread ahead of the daemon's background requests,
        // while this one answers (on two cores, checking is what bounds the transfer).
        let ahead = ahead::Ahead::start(
            &self.id,
            self.spans.iter().map(|s| s.bytes.clone()).collect(),
        );
        // Where the serving time goes: waiting for the daemon's requests, and answering them
        // (with whatever the helper had not checked yet checked here).
        let (mut waiting, mut answering) = (std::time::Duration::ZERO, std::time::Duration::ZERO);
        let serving = std::time::Instant::now();
        let result = loop {
            let mut raw = [0u8; 24];
            let t = std::time::Instant::now();
            let got = sock.read_exact(&mut raw);
            waiting += t.elapsed();
            let t = std::time::Instant::now();
            match got {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break Ok(()),
                Err(e) => break Err(format!("read a request: {e}")),
            }
            let cmd = u32::from_le_bytes(raw[0..4].try_into().unwrap());
            let nr = u32::from_le_bytes(raw[4..8].try_into().unwrap());
            let vaddr = u64::from_le_bytes(raw[8..16].try_into().unwrap());
            let dst = u64::from_le_bytes(raw[16..24].try_into().unwrap());
            match cmd & ((1 << PS_CMD_BITS) - 1) {
                PS_IOV_GET => {
                    if let Err(m) = self.answer(&mut sock, (nr, vaddr, dst), ahead.as_deref()) {
                        break Err(m);
                    }
                    answering += t.elapsed();
                }
                PS_IOV_CLOSE | PS_IOV_FORCE_CLOSE => {
                    let _ = sock.write_all(&0i32.to_le_bytes());
                    break Ok(());
                }
                other => break Err(format!("unknown page-server command {other:#x}")),
            }
        };
        match &result {
            Ok(()) => {
                let (bytes, total, requests) = counters.read();
                info!(
                    "{id}: served {requests} page requests ({bytes} of {total} lazy bytes) from {} in {:?}: {:?} waiting for requests, {:?} answering ({:?} checking pages ahead)",
                    self.from,
                    serving.elapsed(),
                    waiting,
                    answering,
                    ahead.as_ref().map(|a| a.busy_time()).unwrap_or_default()
                )
            }
            // The daemon then fails the pages it waits for: the container cannot run on
            // with memory that is missing or not its own.
            Err(m) => {
                warn!("{id}: page server: {m}; the lazily restored container cannot get its memory")
            }
        }
        result
    }
}

mod ahead;
mod chunks;
pub mod remote;
#[cfg(test)]
mod tests;
