//! Room for a checkpoint: where it is staged, and whether the disks can hold it.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use stasis_api::checkpoint::ContainerInfo;

use crate::{
    cri::{self, api},
    display::human,
    files,
};

/// Where the pod is staged before it is archived: beside the output when nobody but us (root)
/// can rename things there (our directory, not writable by others, or sticky like /tmp), else
/// in root's private `/var/lib/stasis/checkpoints` (a user who owns the output directory could
/// otherwise swap the staging directory for a link while root writes into it).
pub fn staging_parent(parent: &Path) -> Result<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let meta = parent
        .metadata()
        .with_context(|| format!("directory {}", parent.display()))?;
    let only_root_renames = meta.uid() == nix::unistd::geteuid().as_raw()
        && (meta.mode() & 0o022 == 0 || meta.mode() & 0o1000 != 0);
    if only_root_renames {
        return Ok(parent.to_path_buf());
    }
    files::private_root(Path::new(files::CHECKPOINT_STAGING))
}

/// Refuses early when the staging or the output file system cannot hold the checkpoint.
/// Staged beside its output, an archive file or an image is written in place of the staged
/// copy, each staged file removed once it is in: the file system holds the checkpoint once,
/// plus the file being copied (at most the largest container's memory and layer). A
/// checkpoint directory is the staged one renamed, a migration sends it away.
pub fn check_space(
    name: &str,
    e: &SpaceEstimate,
    stage_in: &Path,
    output_dir: &Path,
) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let capture = e.total() / 2;
    let same = stage_in.metadata()?.dev() == output_dir.metadata()?.dev();
    let needs: Vec<(&Path, u64)> = if same {
        vec![(output_dir, capture + e.largest)]
    } else {
        vec![(stage_in, capture), (output_dir, capture)]
    };
    for (dir, need) in needs {
        let free = files::free_space(dir)?;
        if need > free {
            bail!(
                "pod {name}: the checkpoint needs ~{} on the file system of {} (memory in use {} + writable layers {}{}), it has {} free; free some space, write elsewhere, or pass --skip-space-check",
                human(need),
                dir.display(),
                human(e.memory),
                human(e.layers),
                if same {
                    format!(
                        ", staged there and archived in its place, file by file: + {} for the largest container's",
                        human(e.largest)
                    )
                } else {
                    String::new()
                },
                human(free)
            );
        }
    }
    Ok(())
}

/// What a checkpoint of some containers will need on disk, from what CRI reports.
#[derive(Default)]
pub struct SpaceEstimate {
    pub memory: u64,
    pub layers: u64,
    /// The most one container holds (its memory and writable layer).
    pub largest: u64,
}

impl SpaceEstimate {
    /// Staged uncompressed and then archived on the same file system: twice the capture.
    pub fn total(&self) -> u64 {
        2 * (self.memory + self.layers)
    }
}

/// Resident memory (what CRIU writes) and writable layers of the containers, per CRI stats;
/// a container CRI has no stats for counts as nothing (the check is a courtesy, the write
/// itself still fails cleanly on a full disk).
pub async fn estimate(rt: &mut cri::Runtime, containers: &[ContainerInfo]) -> SpaceEstimate {
    let mut e = SpaceEstimate::default();
    for c in containers {
        let Ok(stats) = rt
            .container_stats(api::ContainerStatsRequest {
                container_id: c.id.clone(),
            })
            .await
        else {
            continue;
        };
        let Some(stats) = stats.into_inner().stats else {
            continue;
        };
        let mut this = 0;
        if let Some(m) = stats.memory {
            let rss = m.rss_bytes.map(|v| v.value).unwrap_or_default();
            let ws = m.working_set_bytes.map(|v| v.value).unwrap_or_default();
            let memory = if rss > 0 { rss } else { ws };
            e.memory += memory;
            this += memory;
        }
        if let Some(l) = stats.writable_layer {
            let layer = l.used_bytes.map(|v| v.value).unwrap_or_default();
            e.layers += layer;
            this += layer;
        }
        e.largest = e.largest.max(this);
    }
    e
}
