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
use stasis_api::layout::{PageSource, PageSpan};

use crate::error::{Error, Result};
use chunks::CheckedSpan;
use pagemap::{read_entry, Pagemap, PagemapEntry, PagemapReader, Run, PE_LAZY, PE_PRESENT};

const PAGE_SIZE: u64 = 4096;
/// Page-server commands (criu/include/page-xfer.h); the upper 16 bits carry flags.
const PS_IOV_ADD_F: u32 = 6;
const PS_IOV_GET: u32 = 7;
const PS_IOV_CLOSE: u32 = 0x1023;
const PS_IOV_FORCE_CLOSE: u32 = 0x1024;
const PS_CMD_BITS: u32 = 16;

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

/// Copies `runs` (of pagemap file `name`) from `span` into `placeholder` (`local`), where
/// CRIU's restore reads them; a chunk at a time, each checked. Returns the bytes copied.
fn copy_runs<'r>(
    id: &str,
    span: &mut CheckedSpan,
    runs: impl Iterator<Item = &'r Run>,
    placeholder: &File,
    local: &Path,
    name: &str,
) -> Result<u64> {
    let mut copied = 0u64;
    let step = span.bytes.span.chunk_size.max(PAGE_SIZE);
    for run in runs {
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
    /// Each span's pages image in the restore directory (its path and the open file).
    locals: Vec<(std::path::PathBuf, Arc<File>)>,
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
            locals: Vec::new(),
            counters: Arc::default(),
        };
        let mut by_pages_id: HashMap<u32, usize> = HashMap::new();
        let entries =
            std::fs::read_dir(image).map_err(|e| Error::io(id, "read the restore images", e))?;
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
                    let file = Arc::new(placeholder(id, &local, span.size)?);
                    pages.locals.push((local.clone(), file));
                    pages.spans.len() - 1
                }
            };
            let placeholder = pages.locals[index].1.clone();
            let copied = copy_runs(
                id,
                &mut pages.spans[index],
                map.runs.iter().filter(|r| !r.lazy),
                &placeholder,
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

    /// Copies the lazy pages into the local pages images as well (checked like the eager
    /// ones): CRIU then restores every page itself and no lazy-pages daemon is needed, which
    /// is quicker for a small pod than starting one (~25 ms) and serving it. Returns the bytes
    /// copied.
    pub fn copy_lazy_pages(mut self) -> Result<u64> {
        let mut copied = 0;
        for (pid, (runs, index)) in &self.tasks {
            let (local, file) = &self.locals[*index];
            let name = format!("pagemap-{pid}.img");
            let lazy = runs.iter().filter(|r| r.lazy);
            copied += copy_runs(&self.id, &mut self.spans[*index], lazy, file, local, &name)?;
        }
        debug!(
            "{}: {copied} bytes of lazy pages copied from {}",
            self.id, self.from
        );
        Ok(copied)
    }

    /// Bytes of the pages served on demand (the lazy runs of every pagemap).
    pub fn lazy_bytes(&self) -> u64 {
        self.counters.total
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
mod pagemap;
pub mod remote;
#[cfg(test)]
mod tests;
