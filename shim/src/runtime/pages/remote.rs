//! Post-copy on the target: the lazy pages of a container come from the migration's source,
//! whose CRIU still holds the frozen tasks. The local lazy-pages daemon speaks CRIU's
//! page-server protocol to us over a socket pair; we pass each request on through stasisctl's
//! relay (a Unix socket, root's) and check every answer before the daemon gets it: the same
//! task and address, no more pages than asked for, and a whole body. The stream from the
//! source is authenticated and encrypted end to end by the migration's Noise session.

use std::{
    io::{Read, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use log::{info, warn};

use prost::Message;

use super::{
    read_entry, PageCounters, PagemapEntry, PagemapReader, PAGE_SIZE, PE_LAZY, PS_CMD_BITS,
    PS_IOV_ADD_F, PS_IOV_CLOSE, PS_IOV_FORCE_CLOSE, PS_IOV_GET,
};
use crate::error::{Error, Result};

/// The most pages one request may ask for (CRIU's daemon asks for at most 4 MiB).
const MAX_REQUEST_PAGES: u32 = 4096;
/// How long an answer from the source may take before the restore gives up on it.
const ANSWER_WITHIN: Duration = Duration::from_secs(60);

/// The pages of one container, fetched from the source on demand.
pub struct RemotePages {
    id: String,
    relay: PathBuf,
    /// The container's directory in the checkpoint: how the source finds its CRIU.
    name: String,
    counters: Arc<PageCounters>,
}

impl RemotePages {
    /// For the images in `image` (`rel`: below the restore directory, its first part the
    /// container's directory), fetched through `relay`. The total counts the lazy runs of
    /// the pagemaps (what the daemon will ask for).
    pub fn open(id: &str, image: &Path, rel: &Path, relay: &Path) -> Result<RemotePages> {
        let name = rel
            .components()
            .next()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .ok_or_else(|| Error::invalid(id, "the images are not in a container directory"))?;
        let mut total = 0u64;
        let entries =
            std::fs::read_dir(image).map_err(|e| Error::io(id, "read the restore images", e))?;
        for e in entries.flatten() {
            let file = e.file_name().to_string_lossy().into_owned();
            if !(file.starts_with("pagemap-") && file.ends_with(".img")) {
                continue;
            }
            let f = stasis_api::private::open_nofollow(&e.path())
                .map_err(|err| Error::io(id, format!("read {file}"), err))?;
            let (_, reader) = PagemapReader::open(std::io::BufReader::new(f))
                .map_err(|m| Error::invalid(id, format!("{file}: {m}")))?;
            total += lazy_bytes(reader).map_err(|m| Error::invalid(id, format!("{file}: {m}")))?;
        }
        Ok(RemotePages {
            id: id.to_string(),
            relay: relay.to_path_buf(),
            name,
            counters: Arc::new(PageCounters {
                total,
                ..Default::default()
            }),
        })
    }

    pub fn counters(&self) -> Arc<PageCounters> {
        self.counters.clone()
    }

    /// Serves the lazy-pages daemon on `daemon` from the source until it says it is done.
    pub fn serve(self, mut daemon: UnixStream) -> std::result::Result<(), String> {
        let started = std::time::Instant::now();
        let mut source = UnixStream::connect(&self.relay)
            .map_err(|e| format!("connect to the migration's relay: {e}"))?;
        source
            .set_read_timeout(Some(ANSWER_WITHIN))
            .map_err(|e| e.to_string())?;
        source
            .write_all(format!("{}\n", self.name).as_bytes())
            .map_err(|e| format!("name the container to the source: {e}"))?;
        let result = loop {
            let mut req = [0u8; 24];
            match daemon.read_exact(&mut req) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break Ok(()),
                Err(e) => break Err(format!("read a request: {e}")),
            }
            let cmd = u32::from_le_bytes(req[0..4].try_into().unwrap());
            match cmd & ((1 << PS_CMD_BITS) - 1) {
                PS_IOV_GET => {
                    if let Err(m) = self.fetch(&req, &mut source, &mut daemon) {
                        break Err(m);
                    }
                }
                PS_IOV_CLOSE | PS_IOV_FORCE_CLOSE => break close(&req, &mut source, &mut daemon),
                other => break Err(format!("unknown page-server command {other:#x}")),
            }
        };
        let (bytes, total, requests) = self.counters.read();
        match &result {
            Ok(()) => info!(
                "{}: served {requests} page requests ({bytes} of {total} lazy bytes) from the migration's source in {:?}",
                self.id,
                started.elapsed()
            ),
            Err(m) => warn!(
                "{}: pages from the migration's source: {m}; the container cannot get its memory",
                self.id
            ),
        }
        result
    }

    /// Passes one request on and its checked answer back.
    fn fetch(
        &self,
        req: &[u8; 24],
        source: &mut UnixStream,
        daemon: &mut UnixStream,
    ) -> std::result::Result<(), String> {
        let nr = u32::from_le_bytes(req[4..8].try_into().unwrap());
        if nr == 0 || nr > MAX_REQUEST_PAGES {
            return Err(format!("the daemon asked for {nr} pages at once"));
        }
        source
            .write_all(req)
            .map_err(|e| format!("ask the source for pages: {e}"))?;
        let mut head = [0u8; 24];
        source
            .read_exact(&mut head)
            .map_err(|e| format!("the source's answer: {e}"))?;
        let cmd = u32::from_le_bytes(head[0..4].try_into().unwrap());
        let got = u32::from_le_bytes(head[4..8].try_into().unwrap());
        if cmd & ((1 << PS_CMD_BITS) - 1) != PS_IOV_ADD_F
            || head[8..24] != req[8..24]
            || got == 0
            || got > nr
        {
            return Err(format!(
                "the source answered a request for {nr} pages at {:#x} with something else ({got} pages, command {cmd:#x})",
                u64::from_le_bytes(req[8..16].try_into().unwrap())
            ));
        }
        let len = u64::from(got) * PAGE_SIZE;
        let mut body = vec![0u8; len as usize];
        source
            .read_exact(&mut body)
            .map_err(|e| format!("the source's pages: {e}"))?;
        daemon
            .write_all(&head)
            .and_then(|_| daemon.write_all(&body))
            .map_err(|e| format!("send pages: {e}"))?;
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        self.counters.bytes.fetch_add(len, Ordering::Relaxed);
        Ok(())
    }
}

/// The bytes of the runs a post-copy dump left out (marked lazy, not present: their pages
/// are still in the source's memory).
fn lazy_bytes<R: Read>(mut reader: PagemapReader<R>) -> std::result::Result<u64, String> {
    let mut total = 0u64;
    while let Some(body) = read_entry(&mut reader.r)? {
        let e = PagemapEntry::decode(body.as_slice()).map_err(|e| e.to_string())?;
        if e.flags.unwrap_or(0) & PE_LAZY != 0 {
            total = total.saturating_add(u64::from(e.nr_pages) * PAGE_SIZE);
        }
    }
    Ok(total)
}

/// The daemon is done: the source's CRIU is told so (it lets go of the tasks) and its
/// status goes back to the daemon.
fn close(
    req: &[u8; 24],
    source: &mut UnixStream,
    daemon: &mut UnixStream,
) -> std::result::Result<(), String> {
    source
        .write_all(req)
        .map_err(|e| format!("tell the source the transfer is over: {e}"))?;
    let mut status = [0u8; 4];
    source
        .read_exact(&mut status)
        .map_err(|e| format!("the source's last answer: {e}"))?;
    let _ = daemon.write_all(&status);
    match i32::from_le_bytes(status) {
        0 => Ok(()),
        s => Err(format!(
            "the source's CRIU ended the transfer with status {s}"
        )),
    }
}
