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
    /// What the caller's visitor refused.
    #[error("{0}")]
    Refused(String),
}

/// Walks `entries` raw, refusing oversized metadata records, more than [`MAX_ENTRIES`]
/// entries, or entries adding up to more than `room` bytes.
pub fn bound_entries<R: Read>(entries: tar::Entries<'_, R>, room: u64) -> Result<(), BoundError> {
    bound_entries_visiting(entries, room, |_, _| Ok(()))
}

/// [`bound_entries`] that also shows `visit` each entry that is not a metadata record, with
/// its full name (from a GNU long-name record or a PAX `path` before it, each already
/// bounded, else its header), so that the caller can check the archive's structure in the
/// same pass. `visit` may read a small entry's data; an error it returns stops the walk.
pub fn bound_entries_visiting<R: Read>(
    entries: tar::Entries<'_, R>,
    room: u64,
    mut visit: impl FnMut(&[u8], &mut tar::Entry<'_, R>) -> Result<(), String>,
) -> Result<(), BoundError> {
    let corrupt = |e: std::io::Error| BoundError::Corrupt(e.to_string());
    let (mut count, mut total) = (0u64, 0u64);
    let mut long_name: Option<Vec<u8>> = None;
    let mut pax_path: Option<Vec<u8>> = None;
    for entry in entries.raw(true) {
        let mut entry = entry.map_err(corrupt)?;
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
        let kind = entry.header().entry_type();
        if kind.is_gnu_longname() {
            let mut name = Vec::new();
            entry.read_to_end(&mut name).map_err(corrupt)?;
            while name.last() == Some(&0) {
                name.pop();
            }
            long_name = Some(name);
        } else if kind.is_pax_local_extensions() {
            if let Some(extensions) = entry.pax_extensions().map_err(corrupt)? {
                for e in extensions {
                    let e = e.map_err(corrupt)?;
                    if e.key_bytes() == b"path" {
                        pax_path = Some(e.value_bytes().to_vec());
                    }
                }
            }
        } else if meta.is_none() {
            let name = match (long_name.take(), pax_path.take()) {
                (Some(n), _) | (None, Some(n)) => n,
                (None, None) => entry.header().path_bytes().into_owned(),
            };
            visit(&name, &mut entry).map_err(BoundError::Refused)?;
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

    #[test]
    fn the_visitor_sees_full_names_and_may_read_small_entries() {
        let long = format!("{}/pod.options", "d".repeat(150));
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in [(long.as_str(), &b"{}"[..]), ("short", &b"hi"[..])] {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            b.append_data(&mut h, name, data).unwrap();
        }
        // A PAX path, as other tars write long names.
        let mut pax = tar::Builder::new(Vec::new());
        pax.append_pax_extensions([("path", long.as_bytes())])
            .unwrap();
        let mut h = tar::Header::new_ustar();
        h.set_path("truncated").unwrap();
        h.set_size(1);
        h.set_cksum();
        pax.append(&h, &b"x"[..]).unwrap();
        for bytes in [b.into_inner().unwrap(), pax.into_inner().unwrap()] {
            let mut seen = Vec::new();
            let mut tar = tar::Archive::new(bytes.as_slice());
            bound_entries_visiting(tar.entries().unwrap(), u64::MAX, |name, entry| {
                let mut data = String::new();
                entry.read_to_string(&mut data).unwrap();
                seen.push((String::from_utf8_lossy(name).into_owned(), data));
                Ok(())
            })
            .unwrap();
            assert_eq!(seen[0].0, long);
        }
        let mut tar = tar::Archive::new(&[0u8; 1024][..]);
        bound_entries_visiting(tar.entries().unwrap(), 0, |_, _| Err("never".into())).unwrap();
    }
}

/// Which links a tar may hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Links {
    /// None at all: a pod checkpoint archive or image layer holds files and directories.
    Refused,
    /// Symbolic links (their targets are the container's business), and hard links to a
    /// path inside the tar: a writable layer or a volume.
    Inside,
}

/// Why an entry is refused; each side words it for its own messages.
#[derive(Debug, thiserror::Error)]
pub enum EntryError {
    #[error("an entry with an unreadable path: {0}")]
    Unreadable(std::io::Error),
    #[error("entry {0:?} climbs out with '..'")]
    Climbs(String),
    #[error("entry {0:?} is an absolute path")]
    Absolute(String),
    #[error("entry {name:?} is a link (to {target:?})")]
    Link { name: String, target: String },
    #[error("hard link {0:?} points outside")]
    HardLinkOutside(String),
    #[error("entry {0:?} is a device node")]
    Device(String),
    #[error("entry {name:?} is a {kind:?}")]
    Kind { name: String, kind: tar::EntryType },
}

/// The one rule for a tar entry stasis unpacks: its path relative, without `..` (`.`
/// components dropped, so `./a` and `a` name the same place), and a regular file, a
/// directory, or a link `links` allows. Returns the cleaned path.
pub fn check_entry<R: Read>(
    entry: &tar::Entry<'_, R>,
    links: Links,
) -> Result<std::path::PathBuf, EntryError> {
    use std::path::Component;
    let raw = entry.path().map_err(EntryError::Unreadable)?.into_owned();
    let name = raw.display().to_string();
    let mut clean = std::path::PathBuf::new();
    for c in raw.components() {
        match c {
            Component::Normal(p) => clean.push(p),
            Component::CurDir => {}
            Component::ParentDir => return Err(EntryError::Climbs(name)),
            Component::RootDir | Component::Prefix(_) => return Err(EntryError::Absolute(name)),
        }
    }
    let target = || {
        entry
            .link_name()
            .ok()
            .flatten()
            .map(|t| t.into_owned())
            .unwrap_or_default()
    };
    match (entry.header().entry_type(), links) {
        (tar::EntryType::Regular | tar::EntryType::Directory | tar::EntryType::Continuous, _) => {}
        (tar::EntryType::Symlink, Links::Inside) => {}
        (tar::EntryType::Link, Links::Inside) => {
            let t = target();
            if t.is_absolute() || t.components().any(|c| matches!(c, Component::ParentDir)) {
                return Err(EntryError::HardLinkOutside(name));
            }
        }
        (tar::EntryType::Symlink | tar::EntryType::Link, Links::Refused) => {
            let target = target().display().to_string();
            return Err(EntryError::Link { name, target });
        }
        (tar::EntryType::Char | tar::EntryType::Block, _) => return Err(EntryError::Device(name)),
        (kind, _) => return Err(EntryError::Kind { name, kind }),
    }
    Ok(clean)
}

#[cfg(test)]
mod entry_tests {
    use super::*;

    /// A one-entry tar of `kind` at `path` (written raw: the tar crate's builder refuses `..`).
    fn one(path: &str, kind: tar::EntryType, link: &str) -> Vec<u8> {
        let mut h = tar::Header::new_gnu();
        h.as_gnu_mut().unwrap().name[..path.len()].copy_from_slice(path.as_bytes());
        h.set_entry_type(kind);
        h.set_size(0);
        h.set_mode(0o600);
        if !link.is_empty() {
            h.set_link_name(link).unwrap();
        }
        h.set_cksum();
        let mut out = h.as_bytes().to_vec();
        out.extend([0u8; 1024]);
        out
    }

    fn check(path: &str, kind: tar::EntryType, link: &str, links: Links) -> Result<String, String> {
        let bytes = one(path, kind, link);
        let mut a = tar::Archive::new(&bytes[..]);
        let e = a.entries().unwrap().next().unwrap().unwrap();
        check_entry(&e, links)
            .map(|p| p.display().to_string())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn paths_stay_inside_and_lose_their_dots() {
        use tar::EntryType::Regular;
        assert_eq!(
            check("./a/./b", Regular, "", Links::Refused).unwrap(),
            "a/b"
        );
        assert_eq!(
            check("a/../../x", Regular, "", Links::Inside).unwrap_err(),
            "entry \"a/../../x\" climbs out with '..'"
        );
        assert_eq!(
            check("/etc/x", Regular, "", Links::Inside).unwrap_err(),
            "entry \"/etc/x\" is an absolute path"
        );
    }

    #[test]
    fn links_and_devices_follow_the_rule_asked_for() {
        use tar::EntryType::{Block, Char, Fifo, Link, Symlink};
        assert_eq!(
            check("l", Symlink, "/etc", Links::Refused).unwrap_err(),
            "entry \"l\" is a link (to \"/etc\")"
        );
        assert!(check("l", Symlink, "/etc", Links::Inside).is_ok());
        assert!(check("h", Link, "a/b", Links::Inside).is_ok());
        assert_eq!(
            check("h", Link, "../x", Links::Inside).unwrap_err(),
            "hard link \"h\" points outside"
        );
        assert!(check("h", Link, "a", Links::Refused).is_err());
        for kind in [Char, Block] {
            assert_eq!(
                check("d", kind, "", Links::Inside).unwrap_err(),
                "entry \"d\" is a device node"
            );
        }
        assert!(check("f", Fifo, "", Links::Inside)
            .unwrap_err()
            .contains("Fifo"));
    }
}
