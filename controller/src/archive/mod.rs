//! The pod checkpoint archive: a tar (optionally zstd or gzip compressed) of the directory the
//! shim's Checkpoint service wrote. Layout (see docs/archive-format.md):
//!
//! ```text
//! pod.options                 {"version":1,"containers":{name: dir},"annotations":{…}}
//! pod.dump                    the CRI PodSandboxConfig (JSON)
//! <id>-<name>/                one per container, the layout checkpointctl reads
//!   checkpoint/               CRIU images (+ volumes/ and volumes.json when captured)
//!                             (runtimes that save whole sandboxes: one sandbox/ at the top)
//!   config.dump spec.dump status.dump rootfs-diff.tar deleted.files dump.log [stats-dump]
//!   container-config.json     the CRI ContainerConfig, for the restore
//!   stasis.json               engine, timings, sizes
//! ```
//!
//! Reading is defensive: only regular files and directories, only paths that stay inside the
//! target, and the pod.options must name directories that exist.

use std::{
    fs::File,
    io::{BufRead, BufReader, Read, Write},
    path::{Path, PathBuf},
};

use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use stasis_api::layout::{self, CheckpointedConfig, ContainerMeta};

use crate::{
    display::human,
    files,
    seal::{self, Opening},
};

mod extract;
mod layers;
mod manifest;
mod pack;
mod place;
mod read;
pub mod records;
mod summary;
mod write;

// The parts use each other's helpers through here.
#[allow(unused_imports)]
use {extract::*, layers::*, manifest::*, pack::*, place::*, read::*, summary::*, write::*};

pub use extract::{
    extract, extract_leaving_pages, extract_stream, extract_with, read_pod_options, read_untrusted,
};
pub use layers::{unpack_layers, Layer};
pub use manifest::{check_manifest, make_private, write_manifest};
pub use pack::{check_written, finish_manifest, tar_tree, Packed, Sealing, Sums};
pub use place::{copy_from_dir, place_dir};
pub use read::{is_encrypted, is_plain_tar};
pub use summary::{inspect, inspect_dir, inspect_with, ContainerSummary, Summary};
pub use write::{
    tree_size, write, write_cancellable, write_consuming, write_tar, Writing, Written,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

/// `pod.options`, parsed as the shim writes it (one type for both sides).
pub use stasis_api::layout::PodOptions;

#[cfg(test)]
mod tests;
