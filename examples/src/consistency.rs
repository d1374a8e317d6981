//! The soaks' consistency pod: `rootfs` (a counter in memory and in its writable layer),
//! `writer` (the same in a shared volume captured with the memory), `reader` (another
//! container following the shared counter, logging it ever going backwards: the volume must
//! come from the same instant as the reader's memory), `fsync` (a counter written and synced
//! to disk every round of its loop); optionally `hog`, holding memory.

use std::path::Path;

use anyhow::Result;
use stasis_e2e::cri::{
    container_config, counter_loop, cri, pod_config, wait_counter_moving, CriClient,
};

/// Follows the writer's shared counter; the value may never go down.
const READER: &str = "m=0; while true; do v=$(cat /shared/counter 2>/dev/null); \
    if [ -n \"$v\" ]; then if [ \"$v\" -lt \"$m\" ]; then \
    echo \"reader: volume=$v after $m\" >> /violations; fi; m=$v; fi; sleep 0.005; done";

/// A counter kept in memory and in a file synced to disk after each write; the file may
/// never be ahead of memory.
const FSYNC: &str = "i=0; while true; do v=$(cat /synced 2>/dev/null || echo 0); \
    if [ \"$v\" -gt \"$i\" ]; then echo \"fsync: file=$v memory=$i\" >> /violations; fi; \
    i=$((i+1)); echo $i > /synced; sync; sleep 0.02; done";

/// The consistency containers, in the order they start.
pub const NAMES: [&str; 4] = ["rootfs", "writer", "reader", "fsync"];

/// Starts pod `name` of the consistency containers with the shared volume at `volume` (none:
/// without `writer` and `reader`), and with `hog_mib` > 0 a container `hog` touching that much
/// memory (ready once it has). Returns the pod's id.
pub async fn start_pod(
    cri: &mut CriClient,
    logs: &Path,
    image: &str,
    (name, volume): (&str, Option<&Path>),
    hog_mib: u64,
) -> Result<String> {
    let pod = pod_config(name, logs);
    let pod_id = cri.run_pod(&pod).await?;
    for name in NAMES {
        let shared = match (name, volume) {
            ("writer" | "reader", None) => continue,
            ("writer" | "reader", Some(v)) => Some(v),
            _ => None,
        };
        let script = match name {
            "rootfs" => counter_loop("/counter"),
            "writer" => counter_loop("/shared/counter"),
            "reader" => READER.to_string(),
            _ => FSYNC.to_string(),
        };
        let mut cfg = container_config(name, image, &["sh", "-c", &script]);
        if let Some(volume) = shared {
            cfg.mounts.push(cri::Mount {
                container_path: "/shared".into(),
                host_path: volume.display().to_string(),
                ..Default::default()
            });
        }
        if name == "writer" {
            cfg.annotations
                .insert("io.stasis.checkpoint.volumes".into(), "/shared".into());
        }
        let id = cri.run_container(&pod_id, &pod, cfg).await?;
        if name == "rootfs" {
            wait_counter_moving(cri, &id, "/counter").await?;
        }
    }
    if hog_mib > 0 {
        let hog = crate::memory_workload(hog_mib);
        let cfg = container_config("hog", image, &["sh", "-c", &hog]);
        let id = cri.run_container(&pod_id, &pod, cfg).await?;
        stasis_e2e::cri::wait_ready(cri, &id, "/ready", std::time::Duration::from_secs(300))
            .await?;
    }
    Ok(pod_id)
}
