//! The archive reader over arbitrary bytes, as `pod restore` reads an uncompressed archive:
//! the header pass, then (when it passes) the checked unpack into a fresh directory, removed
//! again. Whatever the bytes: an answer, no panic, nothing written outside the directory.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let scratch = std::env::temp_dir().join("stasis-fuzz-archive");
    let _ = std::fs::create_dir_all(&scratch);
    let _ = stasis_controller::archive::read_untrusted(data, &scratch);
});
