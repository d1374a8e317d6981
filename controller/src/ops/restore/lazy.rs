//! How a lazy restore ended, container by container.

use std::{path::Path, time::Instant};

use crate::archive;

/// Waits until every container of the restore in `dir` has said how its lazy restore ended
/// (`layout::LAZY_STATUS`), or, should a shim die before it says so, until no `criu
/// lazy-pages` daemon serves pages from below `dir` for 10 s. Returns (container, status).
pub(super) async fn wait_for_lazy_pages(dir: &Path) -> Vec<(String, String)> {
    let options = archive::read_pod_options(dir).unwrap_or_default();
    let needle = dir.display().to_string();
    let mut idle_since: Option<Instant> = None;
    loop {
        let statuses: Vec<_> = options
            .containers
            .iter()
            .map(|(name, cdir)| {
                let status =
                    std::fs::read_to_string(dir.join(cdir).join(stasis_api::layout::LAZY_STATUS));
                (name.clone(), status.ok().map(|s| s.trim().to_string()))
            })
            .collect();
        if statuses.iter().all(|(_, s)| s.is_some()) {
            return statuses
                .into_iter()
                .map(|(n, s)| (n, s.unwrap_or_default()))
                .collect();
        }
        let serving = std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
            .any(|c| {
                let c = String::from_utf8_lossy(&c);
                c.contains("lazy-pages") && c.contains(&needle)
            });
        if serving {
            idle_since = None;
        } else if idle_since
            .get_or_insert_with(Instant::now)
            .elapsed()
            .as_secs()
            >= 10
        {
            return statuses
                .into_iter()
                .map(|(n, s)| {
                    (
                        n,
                        s.unwrap_or_else(|| "failed: no word from its shim".into()),
                    )
                })
                .collect();
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
