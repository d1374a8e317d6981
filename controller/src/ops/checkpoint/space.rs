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
/// Staged beside its output, a checkpoint needs about its size once: an archive file or an
/// image frees the staged copy as it writes, a checkpoint directory is the staged one renamed,
/// a migration sends it away.
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
        // The staged copy's blocks are freed in steps: the most held twice is a step a file.
        vec![(output_dir, capture + (16 << 20))]
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
                    ", staged there and archived in its place"
                } else {
                    ""
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
        if let Some(m) = stats.memory {
            let rss = m.rss_bytes.map(|v| v.value).unwrap_or_default();
            let ws = m.working_set_bytes.map(|v| v.value).unwrap_or_default();
            e.memory += if rss > 0 { rss } else { ws };
        }
        if let Some(l) = stats.writable_layer {
            e.layers += l.used_bytes.map(|v| v.value).unwrap_or_default();
        }
    }
    e
}
