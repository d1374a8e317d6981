//! CRIU's pagemap images read as a stream: which pages image a pagemap uses, and where each
//! of its runs of pages lies in it (bounded, checked, never the whole file in memory).

use std::io::Read;

use prost::Message;

use super::PAGE_SIZE;

/// CRIU image magics (criu/include/magic.h): every image but the raw ones starts with the
/// common magic and then its own.
pub(super) const IMG_COMMON_MAGIC: u32 = 0x5456_4319;
pub(super) const PAGEMAP_MAGIC: u32 = 0x5608_4025;

/// Pagemap entry flags (criu/include/pagemap.h).
pub(super) const PE_PARENT: u32 = 1 << 0;
pub(super) const PE_LAZY: u32 = 1 << 1;
pub(super) const PE_PRESENT: u32 = 1 << 2;

/// `pagemap_head` of CRIU's images/pagemap.proto.
#[derive(Clone, PartialEq, Message)]
pub(super) struct PagemapHead {
    #[prost(uint32, required, tag = "1")]
    pub(super) pages_id: u32,
}

/// `pagemap_entry` of CRIU's images/pagemap.proto.
#[derive(Clone, PartialEq, Message)]
pub(super) struct PagemapEntry {
    #[prost(uint64, required, tag = "1")]
    pub(super) vaddr: u64,
    #[prost(uint32, required, tag = "2")]
    pub(super) nr_pages: u32,
    #[prost(bool, optional, tag = "3")]
    pub(super) in_parent: Option<bool>,
    #[prost(uint32, optional, tag = "4")]
    pub(super) flags: Option<u32>,
}

/// A run of pages of one pagemap whose bytes are in its pages image.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Run {
    pub(super) vaddr: u64,
    pub(super) pages: u64,
    /// Where the run starts in the pages image.
    pub(super) offset: u64,
    pub(super) lazy: bool,
}

/// One pagemap image: which pages image holds its pages, and where each run is.
#[derive(Debug)]
pub(super) struct Pagemap {
    pub(super) pages_id: u32,
    pub(super) runs: Vec<Run>,
}

/// The largest pagemap entry accepted (a real one is about 20 bytes).
pub(super) const MAX_PAGEMAP_ENTRY: u32 = 4096;

/// A little-endian u32, or None at a clean end of the stream.
pub(super) fn read_word(
    r: &mut impl Read,
    end_ok: bool,
) -> std::result::Result<Option<u32>, String> {
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
pub(super) fn read_entry(r: &mut impl Read) -> std::result::Result<Option<Vec<u8>>, String> {
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
pub(super) struct PagemapReader<R> {
    pub(super) r: R,
}

impl<R: Read> PagemapReader<R> {
    /// Checks the magics and reads the head: the id of the pages image.
    pub(super) fn open(mut r: R) -> std::result::Result<(u32, Self), String> {
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
    pub(super) fn runs(mut self, image_size: u64) -> std::result::Result<Vec<Run>, String> {
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
pub(super) fn parse_pagemap(bytes: &[u8]) -> std::result::Result<Pagemap, String> {
    let (pages_id, reader) = PagemapReader::open(bytes)?;
    Ok(Pagemap {
        pages_id,
        runs: reader.runs(u64::MAX)?,
    })
}
