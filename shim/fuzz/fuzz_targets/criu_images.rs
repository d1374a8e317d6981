//! The CRIU image checks over arbitrary image files: whatever the bytes, the check ends
//! (accepting or refusing), never panics, and holds bounded memory.
//!
//! Input: records of (name index: 1 byte, length: 2 bytes LE, bytes), the names from the
//! list below, which covers every image the checks parse and a few they must refuse.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stasis_shim::runtime::images::{check_in, fuzz_expected, InMemory};

const NAMES: &[&str] = &[
    "inventory.img",
    "pstree.img",
    "core-1.img",
    "core-2.img",
    "ids-1.img",
    "mountpoints-1.img",
    "files.img",
    "reg-files.img",
    "seccomp.img",
    "netns-1.img",
    "pidns-1.img",
    "tmpfs-dev-1.tar.gz.img",
    "pagemap-1.img",
    "pages-1.img",
    "userns-1.img",
    "evil.img",
];

fuzz_target!(|data: &[u8]| {
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    let mut rest = data;
    while rest.len() >= 3 {
        let name = NAMES[rest[0] as usize % NAMES.len()];
        let len = u16::from_le_bytes([rest[1], rest[2]]) as usize;
        let body = &rest[3..];
        let take = len.min(body.len());
        if !files.iter().any(|(n, _)| n == name) {
            files.push((name.to_string(), body[..take].to_vec()));
        }
        rest = &body[take..];
    }
    let _ = check_in("fuzz", &InMemory(files), &fuzz_expected());
});
