//! The node's checkpoint store: `pod checkpoint --store` writes archives under
//! `<store>/<pod name>/<UTC time>-<random>.tar…` with a small record beside each
//! (`….json`: pod, time, engine, signed, encrypted, size), and `checkpoint ls | rm | prune`
//! list and retire them together with the checkpoint images in containerd's store. The store
//! is root's (0700); names come from the pod's name only through an allow-list of characters.

use std::{
    path::{Component, Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::Target;
use crate::{archive::Compression, cri, files, image};

/// The default store.
pub const DEFAULT_STORE: &str = "/var/lib/stasis/store";

/// What the record beside a stored archive says.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Record {
    pub pod_name: String,
    /// The pod's Kubernetes namespace (CRI metadata); empty when it had none.
    #[serde(default)]
    pub pod_namespace: String,
    pub pod_id: String,
    /// Milliseconds since the epoch.
    pub created_ms: u64,
    pub engine: String,
    pub signed: bool,
    pub encrypted: bool,
    pub bytes: u64,
}

/// One checkpoint the store or containerd holds.
#[derive(Debug, Clone, Serialize)]
pub struct Stored {
    pub pod_name: String,
    /// The pod's Kubernetes namespace, where known.
    pub pod_namespace: String,
    /// Milliseconds since the epoch (0: unknown).
    pub created_ms: u64,
    pub bytes: u64,
    pub engine: String,
    /// None: not known without reading it whole (images).
    pub signed: Option<bool>,
    pub encrypted: bool,
    /// `POD/FILE` under the store, or `image:REF`.
    pub location: String,
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

/// A pod's directory in the store: `<namespace>_<name>` (`_` is in neither a Kubernetes
/// namespace nor a pod name, so pods of one name in two namespaces never share a directory),
/// or `<name>` for a pod without a namespace. A part that is not letters, digits, `.`, `-`
/// (or is only dots) makes it the pod id instead.
fn dir_name(pod_namespace: &str, pod_name: &str, pod_id: &str) -> String {
    let plain = |s: &str| {
        !s.is_empty()
            && s.len() <= 128
            && s.chars().any(|c| c != '.')
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-'))
    };
    match (pod_namespace, pod_name) {
        ("", name) if plain(name) => name.to_string(),
        (ns, name) if plain(ns) && plain(name) => format!("{ns}_{name}"),
        _ => pod_id.to_string(),
    }
}

/// How listings name a pod: `namespace/name`, or the name alone.
pub fn pod_label(pod_namespace: &str, pod_name: &str) -> String {
    match pod_namespace {
        "" => pod_name.to_string(),
        ns => format!("{ns}/{pod_name}"),
    }
}

/// A fresh archive path in the store for pod `pod` (resolved through CRI), its directories
/// created private. Returns the path and the pod's namespace.
pub async fn new_entry(
    t: &Target,
    store: &Path,
    pod: &str,
    compression: Compression,
    encrypted: bool,
) -> Result<(PathBuf, String)> {
    let mut rt = cri::connect(Path::new(&t.address)).await?;
    let found = cri::find_pod(&mut rt, pod).await?;
    let (namespace, name) = found
        .metadata
        .map(|m| (m.namespace, m.name))
        .unwrap_or_default();
    let dir = store.join(dir_name(&namespace, &name, &found.id));
    private_store(store)?;
    match std::fs::symlink_metadata(&dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => bail!("{} is not a directory", dir.display()),
        Err(_) => files::create_private_dir(&dir)?,
    }
    let stamp = time::OffsetDateTime::now_utc()
        .format(time::macros::format_description!(
            "[year][month][day]T[hour][minute][second]Z"
        ))
        .context("format the time")?;
    let ext = match compression {
        Compression::None => "tar",
        Compression::Gzip => "tar.gz",
        Compression::Zstd => "tar.zst",
    };
    let file = format!(
        "{stamp}-{}.{ext}{}",
        &files::random_suffix()?[..8],
        if encrypted { ".age" } else { "" }
    );
    Ok((dir.join(file), namespace))
}

/// The store must be root's and closed to others (created so when missing): nobody else may
/// swap its directories for links between our checks and our writes or removals.
fn private_store(store: &Path) -> Result<()> {
    stasis_api::private::private_root(store)
        .with_context(|| format!("checkpoint store {}", store.display()))
}

fn record_path(archive: &Path) -> PathBuf {
    let mut p = archive.as_os_str().to_owned();
    p.push(".json");
    PathBuf::from(p)
}

/// Writes the record of a stored archive (0600, never over an existing file).
pub fn write_record(archive: &Path, record: &Record) -> Result<()> {
    files::write_new_private(&record_path(archive), &serde_json::to_vec_pretty(record)?)
}

/// The stored archives (and, with `images`, the checkpoint images in containerd's store),
/// newest first; only pod `pod`'s when given.
pub async fn list(
    t: &Target,
    store: &Path,
    pod: Option<&str>,
    images: bool,
) -> Result<Vec<Stored>> {
    private_store(store)?;
    let mut all = list_files(store)?;
    let listed = match images {
        true => image::list_checkpoints(&t.address, &t.namespace).await?,
        false => Vec::new(),
    };
    for i in listed {
        all.push(Stored {
            pod_name: i.pod_name,
            pod_namespace: i.pod_namespace,
            created_ms: parse_rfc3339(&i.created),
            bytes: i.size,
            engine: i.engine,
            signed: None,
            encrypted: false,
            location: format!("image:{}", i.reference),
        });
    }
    // A pod is named `NAME` (in any namespace) or `NAMESPACE/NAME`.
    all.retain(|s| {
        pod.is_none_or(|p| s.pod_name == p || pod_label(&s.pod_namespace, &s.pod_name) == p)
    });
    all.sort_by(|a, b| {
        b.created_ms
            .cmp(&a.created_ms)
            .then(a.location.cmp(&b.location))
    });
    Ok(all)
}

fn parse_rfc3339(s: &str) -> u64 {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map(|t| (t.unix_timestamp_nanos() / 1_000_000).max(0) as u64)
        .unwrap_or(0)
}

/// `<store>/<pod>/<archive>` entries; links and other odd entries are skipped, never
/// followed.
fn list_files(store: &Path) -> Result<Vec<Stored>> {
    let mut found = Vec::new();
    let Ok(pods) = std::fs::read_dir(store) else {
        return Ok(found);
    };
    for pod_dir in pods.flatten() {
        if !pod_dir.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let pod = pod_dir.file_name().to_string_lossy().into_owned();
        for e in std::fs::read_dir(pod_dir.path())?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Ok(meta) = e.path().symlink_metadata() else {
                continue;
            };
            if !meta.is_file() || name.ends_with(".json") || name.starts_with('.') {
                continue;
            }
            let record: Option<Record> = std::fs::read(record_path(&e.path()))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
            let mtime = meta
                .modified()
                .ok()
                .and_then(|m| m.duration_since(UNIX_EPOCH).ok())
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0);
            let r = record.unwrap_or_else(|| Record {
                pod_name: pod.clone(),
                created_ms: mtime,
                encrypted: name.ends_with(".age"),
                ..Default::default()
            });
            found.push(Stored {
                pod_name: r.pod_name,
                pod_namespace: r.pod_namespace,
                created_ms: r.created_ms,
                bytes: meta.len(),
                engine: r.engine,
                signed: Some(r.signed),
                encrypted: r.encrypted,
                location: format!("{pod}/{name}"),
            });
        }
    }
    Ok(found)
}

/// Removes stored checkpoints by location (`POD/FILE` as `ls` shows it, or `image:REF`).
/// Every location is checked before anything is removed.
pub async fn remove(t: &Target, store: &Path, locations: &[String]) -> Result<()> {
    private_store(store)?;
    let mut resolved = Vec::new();
    for l in locations {
        let r = resolve(store, l)?;
        if r.is_none() {
            // An image name is checked before anything is removed, like a file's.
            let reference = l.trim_start_matches("image:");
            let images = image::ImageStoreClient::connect(&t.address, &t.namespace).await?;
            if images.get(reference).await?.is_none() {
                bail!("{l:?}: no such image in containerd's store");
            }
        }
        resolved.push(r);
    }
    for (l, r) in locations.iter().zip(resolved) {
        match r {
            Some(path) => {
                std::fs::remove_file(&path).with_context(|| format!("remove {l}"))?;
                let _ = std::fs::remove_file(record_path(&path));
            }
            None => {
                let reference = l.trim_start_matches("image:");
                image::remove_checkpoint(&t.address, &t.namespace, reference).await?;
            }
        }
    }
    Ok(())
}

/// The file a location names (None for an image), refused unless it is exactly
/// `<store>/<pod>/<file>`, a regular file, reached through no link.
fn resolve(store: &Path, location: &str) -> Result<Option<PathBuf>> {
    if location.starts_with("image:") {
        return Ok(None);
    }
    let rel = Path::new(location);
    let parts: Vec<_> = rel.components().collect();
    if parts.len() != 2 || !parts.iter().all(|c| matches!(c, Component::Normal(_))) {
        bail!("{location:?} is not a stored checkpoint: give POD/FILE as `stasisctl checkpoint ls` shows it, or image:REF");
    }
    let dir = store.join(parts[0]);
    let path = store.join(rel);
    let dir_ok = dir.symlink_metadata().is_ok_and(|m| m.is_dir());
    let file_ok = path.symlink_metadata().is_ok_and(|m| m.is_file());
    if !dir_ok || !file_ok || location.ends_with(".json") {
        bail!(
            "{location:?}: no such checkpoint in the store {}",
            store.display()
        );
    }
    Ok(Some(path))
}

/// Which checkpoints a retention rule retires: per pod, all but the newest `keep_last`, and
/// of those only the ones older than `older_than` (when given).
pub fn to_prune(
    all: &[Stored],
    keep_last: Option<usize>,
    older_than: Option<Duration>,
    now_ms: u64,
) -> Vec<Stored> {
    // Per pod: one name in two namespaces is two pods.
    let mut by_pod: std::collections::BTreeMap<(&str, &str), Vec<&Stored>> = Default::default();
    for s in all {
        by_pod
            .entry((&s.pod_namespace, &s.pod_name))
            .or_default()
            .push(s);
    }
    let mut out = Vec::new();
    for (_, mut list) in by_pod {
        list.sort_by(|a, b| {
            b.created_ms
                .cmp(&a.created_ms)
                .then(a.location.cmp(&b.location))
        });
        for s in list.into_iter().skip(keep_last.unwrap_or(0)) {
            let age = u64::try_from(d_ms(older_than)).unwrap_or(u64::MAX);
            let old = older_than.is_none() || s.created_ms.saturating_add(age) < now_ms;
            if old {
                out.push(s.clone());
            }
        }
    }
    out
}

fn d_ms(d: Option<Duration>) -> u128 {
    d.map(|d| d.as_millis()).unwrap_or(0)
}

/// Applies a retention rule; returns what was (or, dry, would be) removed. Checkpoint
/// images take part only with `images`: their pod names and times are what their manifests
/// say, and anybody who can pull an image can make one say anything.
pub async fn prune(
    t: &Target,
    store: &Path,
    pod: Option<&str>,
    keep_last: Option<usize>,
    older_than: Option<Duration>,
    dry_run: bool,
    images: bool,
) -> Result<Vec<Stored>> {
    if keep_last.is_none() && older_than.is_none() {
        bail!("prune needs --keep-last N, --older-than D, or both");
    }
    let all = list(t, store, pod, images).await?;
    let gone = to_prune(&all, keep_last, older_than, now_ms());
    if !dry_run {
        let locations: Vec<String> = gone.iter().map(|s| s.location.clone()).collect();
        remove(t, store, &locations).await?;
    }
    Ok(gone)
}

/// `30s`, `15m`, `12h`, `7d`.
pub fn parse_age(s: &str) -> Result<Duration> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .with_context(|| format!("{s:?}: a number and a unit (s, m, h, d), e.g. 7d"))?;
    let per = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => bail!("{s:?}: the unit must be s, m, h or d"),
    };
    let secs = n
        .checked_mul(per)
        .filter(|s| *s < 100 * 365 * 86400)
        .with_context(|| format!("{s:?}: more than a hundred years"))?;
    Ok(Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(pod: &str, created: u64) -> Stored {
        let (ns, name) = pod.split_once('_').unwrap_or(("", pod));
        Stored {
            pod_name: name.into(),
            pod_namespace: ns.into(),
            created_ms: created * 1000,
            bytes: 1,
            engine: "runc".into(),
            signed: Some(false),
            encrypted: false,
            location: format!("{pod}/{created}.tar"),
        }
    }

    #[test]
    fn retention_keeps_the_newest_per_pod_and_honours_age() {
        let all = vec![
            stored("web", 100),
            stored("web", 300),
            stored("web", 200),
            stored("db", 50),
            stored("shop_web", 10),
        ];
        let names = |v: Vec<Stored>| v.into_iter().map(|s| s.location).collect::<Vec<_>>();
        assert_eq!(
            names(to_prune(&all, Some(1), None, 1_000_000)),
            ["web/200.tar", "web/100.tar"],
            "shop/web is a pod of its own: its one checkpoint stays"
        );
        // Older than 850 s at 1000: created before 150.
        assert_eq!(
            names(to_prune(
                &all,
                None,
                Some(Duration::from_secs(850)),
                1_000_000
            )),
            ["db/50.tar", "web/100.tar", "shop_web/10.tar"]
        );
        assert_eq!(
            names(to_prune(
                &all,
                Some(1),
                Some(Duration::from_secs(850)),
                1_000_000
            )),
            ["web/100.tar"]
        );
    }

    #[test]
    fn only_plain_store_entries_resolve() {
        let dir = std::env::temp_dir().join(format!("stasis-store-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("web")).unwrap();
        std::fs::write(dir.join("web/a.tar"), b"x").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", dir.join("web/link.tar")).unwrap();
        assert!(resolve(&dir, "web/a.tar").unwrap().is_some());
        assert!(resolve(&dir, "image:reg/x:1").unwrap().is_none());
        for bad in [
            "../etc/passwd",
            "/etc/passwd",
            "web/../../x",
            "web",
            "web/link.tar",
            "web/a.tar.json",
            "web/none.tar",
        ] {
            assert!(resolve(&dir, bad).is_err(), "{bad} resolved");
        }
        assert_eq!(dir_name("", "web-1.a", "id"), "web-1.a");
        assert_eq!(dir_name("shop", "web-1.a", "id"), "shop_web-1.a");
        for odd in ["..", "a/b", "", "x\ny", "a_b"] {
            assert_eq!(dir_name("", odd, "id"), "id");
            assert_eq!(
                dir_name(odd, "web", "id"),
                if odd.is_empty() { "web" } else { "id" }
            );
        }
        assert_eq!(parse_age("7d").unwrap(), Duration::from_secs(7 * 86400));
        assert!(parse_age("7").is_err() && parse_age("d").is_err());
        assert!(parse_age("999999999999999999d").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
