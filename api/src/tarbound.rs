//! The first pass every tar stasis reads gets before anything trusts it: the raw headers
//! only, so a hostile metadata record (a PAX header or GNU long name the tar reader would
//! hold in memory whole) is refused by its size, the entry count is bounded, and the data of
//! regular entries is skipped, never stored. One rule for the outer archive, the tars inside
//! it (rootfs diffs, volumes) and image layers.

use std::io::Read;

/// Largest PAX header or GNU long name/link record accepted (real ones are a few hundred
/// bytes).
pub const MAX_META_RECORD: u64 = 64 * 1024;
/// Most entries a tar may have (a pod checkpoint has tens to thousands).
pub const MAX_ENTRIES: u64 = 1_000_000;

#[derive(Debug, thiserror::Error)]
pub enum BoundError {
    #[error("truncated or corrupt: {0}")]
    Corrupt(String),
    /// `kind` is "PAX header" or "long-name".
    #[error("a {kind} record of {size} bytes (at most {MAX_META_RECORD} accepted)")]
    MetaRecord { kind: &'static str, size: u64 },
    #[error("more than {MAX_ENTRIES} entries")]
    TooManyEntries,
    #[error("it unpacks to more than {total} bytes, {room} are free")]
    TooBig { total: u64, room: u64 },
}

/// Walks `entries` raw, refusing oversized metadata records, more than [`MAX_ENTRIES`]
/// entries, or entries adding up to more than `room` bytes.
pub fn bound_entries<R: Read>(entries: tar::Entries<'_, R>, room: u64) -> Result<(), BoundError> {
    let (mut count, mut total) = (0u64, 0u64);
    for entry in entries.raw(true) {
        let entry = entry.map_err(|e| BoundError::Corrupt(e.to_string()))?;
        let header = entry.header();
        let size = header.entry_size().unwrap_or(u64::MAX);
        let kind = header.entry_type();
        let meta = if kind.is_gnu_longname() || kind.is_gnu_longlink() {
            Some("long-name")
        } else if kind.is_pax_local_extensions() || kind.is_pax_global_extensions() {
            Some("PAX header")
        } else {
            None
        };
        if let Some(kind) = meta {
            if size > MAX_META_RECORD {
                return Err(BoundError::MetaRecord { kind, size });
            }
        }
        count += 1;
        total = total.saturating_add(size);
        if count > MAX_ENTRIES {
            return Err(BoundError::TooManyEntries);
        }
        if total > room {
            return Err(BoundError::TooBig { total, room });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tar whose first record claims `size` bytes of `kind` (and holds none of them).
    fn bomb(kind: tar::EntryType, size: u64) -> Vec<u8> {
        let mut h = tar::Header::new_ustar();
        h.set_path("x").unwrap();
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_cksum();
        let mut out = h.as_bytes().to_vec();
        out.extend_from_slice(&[0u8; 1024]);
        out
    }

    #[test]
    fn oversized_metadata_records_are_refused_from_their_header() {
        for kind in [tar::EntryType::XHeader, tar::EntryType::GNULongName] {
            let bytes = bomb(kind, 20 << 30);
            let mut tar = tar::Archive::new(bytes.as_slice());
            let err = bound_entries(tar.entries().unwrap(), u64::MAX).unwrap_err();
            assert!(
                matches!(err, BoundError::MetaRecord { size, .. } if size == 20 << 30),
                "{err}"
            );
        }
        let mut ok = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(5);
        ok.append_data(&mut h, "a", &b"hello"[..]).unwrap();
        let bytes = ok.into_inner().unwrap();
        bound_entries(tar::Archive::new(bytes.as_slice()).entries().unwrap(), 100).unwrap();
        let err = bound_entries(tar::Archive::new(bytes.as_slice()).entries().unwrap(), 4);
        assert!(matches!(err, Err(BoundError::TooBig { .. })));
    }
}
