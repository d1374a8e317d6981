//! Cgroup access for the shim: container and pod statistics (and, later, the freezer).

use cgroups_rs::fs::{hierarchies, Cgroup};
use protobuf::{well_known_types::any::Any, Message};

use crate::error::{Error, Result};

/// Cgroup metrics of the cgroup at `path` (a runtime-spec cgroupsPath), in the Any form
/// containerd's `ctr t metrics` and CRI decode.
pub fn metrics(id: &str, path: &str) -> Result<Any> {
    if path.is_empty() {
        return Err(Error::precondition(id, "container has no cgroup path"));
    }
    let hierarchy = hierarchies::auto();
    let v2 = hierarchy.v2();
    let cg = Cgroup::load(hierarchy, path.trim_start_matches('/'));
    let (type_url, value) = if v2 {
        let m = containerd_shim::cgroup::collect_metrics_v2(&cg)
            .map_err(|e| Error::other(id, "collect cgroup v2 metrics", e))?;
        ("io.containerd.cgroups.v2.Metrics", m.write_to_bytes())
    } else {
        let m = containerd_shim::cgroup::collect_metrics(&cg)
            .map_err(|e| Error::other(id, "collect cgroup metrics", e))?;
        ("io.containerd.cgroups.v1.Metrics", m.write_to_bytes())
    };
    let value = value.map_err(|e| Error::other(id, "encode metrics", e))?;
    Ok(Any {
        type_url: type_url.to_string(),
        value,
        ..Default::default()
    })
}
