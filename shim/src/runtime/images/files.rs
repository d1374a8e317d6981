//! Open files and tmpfs contents of the images against what the container may reach.

use std::{collections::HashSet, io::Read};

use super::{
    fd_type, img,
    restored::{CAP_NET_RAW, CAP_SYS_ADMIN},
    stays_inside, Expected,
};

/// The device nodes runc creates in every container's /dev (libcontainer's default
/// devices), as (major, minor).
const DEFAULT_DEVICES: &[(u64, u64)] = &[(1, 3), (1, 5), (1, 7), (1, 8), (1, 9), (5, 0), (5, 2)];

/// What one open file of the images reaches beyond the container.
pub(super) fn file_excess(
    f: &img::FileEntry,
    e: &Expected,
    mounts: &HashSet<i32>,
) -> Option<String> {
    let caps = e.bounds.bounding;
    match f.r#type {
        fd_type::REG => {
            let reg = f.reg.as_ref()?;
            if reg.ext == Some(true) {
                return Some(format!("file {:?} from outside the images", reg.name));
            }
            if !stays_inside(&reg.name) {
                return Some(format!("file {:?}, a path leaving its mount", reg.name));
            }
            match reg.mnt_id {
                Some(m) if mounts.contains(&m) => None,
                _ => Some(format!(
                    "file {:?} on mount {}, not one of the container's",
                    reg.name,
                    reg.mnt_id.unwrap_or(-1)
                )),
            }
        }
        fd_type::PIPE
        | fd_type::FIFO
        | fd_type::INETSK
        | fd_type::UNIXSK
        | fd_type::EVENTFD
        | fd_type::EVENTPOLL
        | fd_type::INOTIFY
        | fd_type::SIGNALFD
        | fd_type::TTY
        | fd_type::TIMERFD
        | fd_type::MEMFD
        | fd_type::PIDFD
        | fd_type::NETLINKSK => None,
        fd_type::PACKETSK if caps & CAP_NET_RAW != 0 => None,
        fd_type::FANOTIFY if caps & CAP_SYS_ADMIN != 0 => None,
        other => Some(format!(
            "an open file of type {} (a namespace, tun device, BPF map, fanotify or packet socket, or one CRIU takes from outside), which this container may not open",
            other
        )),
    }
}

/// The most a tmpfs image may unpack to.
const MAX_TMPFS: u64 = 8 << 30;

/// What a tmpfs CRIU restores from its tar (`tmpfs-*.tar.gz.img`) holds beyond the spec:
/// device nodes other than the spec's and runc's defaults. Read as a stream, bounded.
pub(super) fn tmpfs_excess(
    file: impl Read,
    e: &Expected,
) -> std::result::Result<Option<String>, String> {
    // Compressed, at most the largest image parsed; unpacked, at most what a tmpfs CRIU
    // would fill could hold (a bomb is cut off and refused as truncated).
    let gz = flate2::read::GzDecoder::new(file.take(img::MAX_IMAGE));
    let mut tar = tar::Archive::new(gz.take(MAX_TMPFS));
    for entry in tar.entries().map_err(|e| e.to_string())? {
        let entry = entry.map_err(|e| e.to_string())?;
        let kind = entry.header().entry_type();
        if kind.is_character_special() || kind.is_block_special() {
            let major = entry
                .header()
                .device_major()
                .ok()
                .flatten()
                .unwrap_or(u32::MAX);
            let minor = entry
                .header()
                .device_minor()
                .ok()
                .flatten()
                .unwrap_or(u32::MAX);
            let dev = (u64::from(major), u64::from(minor));
            if kind.is_block_special()
                || !(DEFAULT_DEVICES.contains(&dev) || e.devices.contains(&dev))
            {
                return Ok(Some(format!(
                    "device node {} ({major}:{minor}) that the spec does not have",
                    entry
                        .path()
                        .map(|p| p.display().to_string())
                        .unwrap_or_default()
                )));
            }
        }
    }
    Ok(None)
}
