//! The on-disk layout of a pod checkpoint, shared by the shim (which writes it) and the
//! controller (which packages, inspects and restores it): file names, annotation keys and the
//! metadata records, each parsed in one place with one set of defaults.
//!
//! ```text
//! pod.options          PodOptions
//! pod.dump             the CRI PodSandboxConfig (JSON)
//! sandbox/             the whole-sandbox image of runtimes that save a pod at once (gVisor)
//! <id>-<name>/         one per container, the layout checkpointctl reads
//!   checkpoint/        CRIU images; volumes/ + volumes.json; stasis-dump.json (DumpRecord)
//!   config.dump        CheckpointedConfig
//!   spec.dump status.dump rootfs-diff.tar deleted.files dump.log [stats-dump]
//!   container-config.json   the CRI ContainerConfig
//!   stasis.json        ContainerMeta
//! ```

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

pub const POD_OPTIONS: &str = "pod.options";
pub const POD_DUMP: &str = "pod.dump";
/// Archive manifest at the root: `{"version":4,"files":{path:{"size":N,"blake3":hex}}}` for
/// every other regular file of the archive; a reader checks all of it before anything is
/// created (a lazy restore: page images chunk by chunk as they are read).
pub const MANIFEST: &str = "manifest.json";
/// The archive format version the manifest states. 2: `manifest.sig` may sit beside the
/// manifest (not listed in it). 3: page images carry `chunk_size` and `chunks` (a digest of
/// each chunk), and their file digest is that of the concatenated chunk digests. 4: every
/// digest is BLAKE3 (`blake3`) instead of SHA-256 (`sha256`). Readers refuse versions they
/// do not know.
pub const MANIFEST_VERSION: u32 = 4;
/// Versions this build reads (1: no signature file).
pub const MANIFEST_VERSIONS_READ: std::ops::RangeInclusive<u32> = 1..=4;

/// The hash of a manifest's digests: SHA-256 up to format version 3, BLAKE3 from version 4
/// (it hashes here at more than twice SHA-256's rate, and every page byte of a checkpoint is
/// hashed when it is written and again before a restore uses it).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DigestKind {
    #[default]
    Sha256,
    Blake3,
}

impl DigestKind {
    /// The digest a manifest of format `version` uses.
    pub fn of_version(version: u32) -> DigestKind {
        if version >= 4 {
            DigestKind::Blake3
        } else {
            DigestKind::Sha256
        }
    }

    /// The manifest field that holds a file's digest of this kind.
    pub fn field(self) -> &'static str {
        match self {
            DigestKind::Sha256 => "sha256",
            DigestKind::Blake3 => "blake3",
        }
    }
}
/// Ed25519 signature of `manifest.json` (JSON: algorithm, public_key, signature; hex).
pub const SIGNATURE: &str = "manifest.sig";
/// Where a runtime that checkpoints whole sandboxes puts the pod's one image.
pub const SANDBOX_IMAGE_DIR: &str = "sandbox";
/// A container's CRIU images (and captured volumes), inside its directory.
pub const CHECKPOINT_DIR: &str = "checkpoint";
pub const CONFIG_DUMP: &str = "config.dump";
pub const SPEC_DUMP: &str = "spec.dump";
pub const STATUS_DUMP: &str = "status.dump";
pub const ROOTFS_DIFF: &str = "rootfs-diff.tar";
pub const DELETED_FILES: &str = "deleted.files";
pub const DUMP_LOG: &str = "dump.log";
pub const STATS_DUMP: &str = "stats-dump";
/// The CRI ContainerConfig, for the restore.
pub const CONTAINER_CONFIG: &str = "container-config.json";
/// stasis's own per-container record (`ContainerMeta`).
pub const CONTAINER_META: &str = "stasis.json";
/// The CRIU options and timings of a dump, beside its images (`DumpRecord`).
pub const DUMP_RECORD: &str = "stasis-dump.json";
/// The index of captured volumes, beside the images (`Vec<CapturedVolume>`).
pub const VOLUMES_INDEX: &str = "volumes.json";
pub const VOLUMES_DIR: &str = "volumes";

/// Annotation (pod or container) that makes the shim restore from a checkpoint that root
/// prepared in the restore store: `<id>` on the pod, `<id>/<container dir>` on a container.
/// Never a path: an ordinary CRI client cannot make the shim restore what it made itself.
pub const RESTORE_ANNOTATION: &str = "io.stasis.restore-from";
/// The pod annotation carrying the restore's claim token: only the pod stasisctl created
/// holds it (it is in the root-only store, `<id>.token`), so no other CRI client can claim a
/// restore whose id it learned.
pub const RESTORE_TOKEN_ANNOTATION: &str = "io.stasis.restore-token";
/// Beside a restore `<id>` in the store: its claim token.
pub const RESTORE_TOKEN_SUFFIX: &str = ".token";
/// Where restores are prepared (unpacked archives), root's and 0700; each under a fresh
/// random id, claimed by the pod restored from it.
pub const RESTORE_STORE: &str = "/var/lib/stasis/restores";
/// Beside a restore's directory in the store: `<id>.options`, how stasisctl wants it restored
/// (JSON, `RestoreOptions`).
pub const RESTORE_OPTIONS_SUFFIX: &str = ".options";

/// How a prepared restore is to be carried out (written by stasisctl, read by the shim).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct RestoreOptions {
    /// Resume containers before their memory is in: pages are served on demand (CRIU
    /// lazy-pages over userfaultfd) and pulled in the background.
    pub lazy: bool,
    /// Page images left in the archive they came in (an uncompressed one): the unpacked
    /// files are sparse placeholders, and their pages are read from here on demand.
    pub page_source: Option<PageSource>,
    /// With `lazy`: the pod's containers resume only once every page is in (an eager
    /// restore that reads its pages through the page server instead of unpacked copies).
    pub pages_before_resume: bool,
    /// Post-copy: the lazy pages come from the migration's source through this Unix socket
    /// (stasisctl's relay, root's); a connection names the container's directory on its
    /// first line, then speaks CRIU's page-server protocol with the source's CRIU.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remote_pages: Option<PathBuf>,
}

/// Page images served from byte ranges of an archive file instead of unpacked copies.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct PageSource {
    /// The archive file (an uncompressed, unencrypted tar).
    pub archive: PathBuf,
    /// Path below the restore directory (`<container dir>/checkpoint/pages-N.img`) → where
    /// its bytes are in the archive.
    pub files: BTreeMap<String, PageSpan>,
}

/// One file's bytes inside an archive, with the digests that vouch for each chunk of it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct PageSpan {
    /// The file holding the bytes, when it is not the archive (a checkpoint directory's own
    /// page image).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
    pub offset: u64,
    pub size: u64,
    pub chunk_size: u64,
    /// The digest (hex) of each `chunk_size` piece, the last one possibly shorter.
    pub chunks: Vec<String>,
    /// Which hash made `chunks` (absent from what an older stasisctl sends: SHA-256).
    #[serde(default)]
    pub digest: DigestKind,
}

/// The chunk size of page images in the manifest: each chunk is checked on its own, so a
/// lazy restore verifies the pages it reads without reading the whole image first.
pub const PAGE_CHUNK_SIZE: u64 = 1 << 20;

/// Whether the file at `rel` (below an unpacked checkpoint) is a CRIU page image, the part
/// of a checkpoint that grows with memory and that a lazy restore can leave in the archive.
pub fn is_page_image(rel: &Path) -> bool {
    let parent_is_images = rel
        .parent()
        .and_then(|p| p.file_name())
        .is_some_and(|n| n == CHECKPOINT_DIR);
    let name = rel
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    parent_is_images && name.starts_with("pages-") && name.ends_with(".img")
}

impl RestoreOptions {
    /// The options of the restore whose container or pod directory is `dir` (below
    /// `<store>/<id>`); defaults when there are none. An options file that exists and cannot
    /// be read is an error (never silently an eager restore of images whose pages were left
    /// elsewhere).
    pub fn load_for_dir(dir: &Path) -> Result<Self, LayoutError> {
        let Some(root) = restore_root(dir) else {
            return Ok(Self::default());
        };
        let mut name = root.as_os_str().to_owned();
        name.push(RESTORE_OPTIONS_SUFFIX);
        let path = Path::new(&name);
        match std::fs::read(path) {
            Ok(bytes) => parse_json(&path.display().to_string(), &bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(source) => Err(LayoutError::Read {
                file: path.display().to_string(),
                source,
            }),
        }
    }
}

/// The restore directory (`<store>/<id>`) that `dir` is in or is.
pub fn restore_root(dir: &Path) -> Option<&Path> {
    let mut at = dir;
    while let Some(parent) = at.parent() {
        if parent == Path::new(RESTORE_STORE) {
            return Some(at);
        }
        at = parent;
    }
    None
}

/// A single plain path component: no separators, not `.`/`..`, not hidden.
pub fn is_plain_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Whether `id` has the shape of a restore id: 32 lowercase hex digits.
pub fn is_restore_id(id: &str) -> bool {
    id.len() == 32
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}
/// Container annotation listing the bind-mount destinations (comma separated, or `*` for every
/// writable bind mount) whose contents a checkpoint captures with the memory.
pub const VOLUMES_ANNOTATION: &str = "io.stasis.checkpoint.volumes";
/// `pod.options` annotation: the backend that wrote the checkpoint.
pub const ENGINE_ANNOTATION: &str = "io.stasis.engine";
/// `pod.options` annotation: the CRI runtime handler the pod ran under (what a restore or a
/// migration uses unless told otherwise).
pub const RUNTIME_HANDLER_ANNOTATION: &str = "io.stasis.runtime-handler";
/// `pod.options` annotation: the checkpointed pod's sandbox id.
pub const SANDBOX_ID_ANNOTATION: &str = "io.stasis.sandbox-id";
/// `pod.options` annotation: the last PID handed out in the pod's PID namespace.
pub const LAST_PID_ANNOTATION: &str = "io.stasis.last-pid";

/// The backend an archive that does not say is taken to come from: archives written before
/// the engine was recorded were all runc's.
pub const DEFAULT_ENGINE: &str = "runc";
pub const POD_OPTIONS_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("{file}: {source}")]
    Read {
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{file} is not valid: {message}")]
    Invalid { file: String, message: String },
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, LayoutError> {
    let file = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| LayoutError::Read {
        file: file.clone(),
        source,
    })?;
    parse_json(&file, &bytes)
}

/// Parses one of the layout's JSON records; `file` names it in the error.
pub fn parse_json<T: serde::de::DeserializeOwned>(
    file: &str,
    bytes: &[u8],
) -> Result<T, LayoutError> {
    serde_json::from_slice(bytes).map_err(|e| LayoutError::Invalid {
        file: file.to_string(),
        message: e.to_string(),
    })
}

/// `pod.options`: which containers the checkpoint holds, in which directory, and the pod-level
/// annotations (engine, sandbox id, last PID).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct PodOptions {
    pub version: u32,
    /// Container name → directory.
    pub containers: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

impl PodOptions {
    pub fn read(dir: &Path) -> Result<Self, LayoutError> {
        Self::parse(
            &std::fs::read(dir.join(POD_OPTIONS)).map_err(|source| LayoutError::Read {
                file: dir.join(POD_OPTIONS).display().to_string(),
                source,
            })?,
        )
    }

    pub fn parse(bytes: &[u8]) -> Result<Self, LayoutError> {
        let o: PodOptions = parse_json(POD_OPTIONS, bytes)?;
        if o.version != POD_OPTIONS_VERSION {
            return Err(LayoutError::Invalid {
                file: POD_OPTIONS.into(),
                message: format!("version {} is not supported", o.version),
            });
        }
        Ok(o)
    }

    pub fn engine(&self) -> &str {
        self.annotations
            .get(ENGINE_ANNOTATION)
            .map(String::as_str)
            .unwrap_or(DEFAULT_ENGINE)
    }

    pub fn last_pid(&self) -> Option<u32> {
        self.annotations.get(LAST_PID_ANNOTATION)?.parse().ok()
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("PodOptions always encodes")
    }
}

/// `stasis.json`: what stasis records about one checkpointed container.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct ContainerMeta {
    #[serde(default = "default_engine")]
    pub engine: String,
    pub container_id: String,
    pub name: String,
    pub image: String,
    pub checkpointed_at: String,
    pub leave_running: bool,
    pub was_paused: bool,
    pub frozen_ms: f64,
    pub dump_ms: f64,
    pub rootfs_ms: f64,
    pub checkpoint_bytes: u64,
    pub rootfs_diff_bytes: u64,
}

fn default_engine() -> String {
    DEFAULT_ENGINE.to_string()
}

impl ContainerMeta {
    /// The record in `container_dir`, if it has one.
    pub fn read(container_dir: &Path) -> Result<Option<Self>, LayoutError> {
        let path = container_dir.join(CONTAINER_META);
        if !path.exists() {
            return Ok(None);
        }
        read_json(&path).map(Some)
    }
}

/// `config.dump`: the container record checkpointctl reads (its `lib/metadata.go`
/// ContainerConfig), in its JSON names.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct CheckpointedConfig {
    pub id: String,
    pub name: String,
    pub rootfs_image: String,
    pub rootfs_image_ref: String,
    pub rootfs_image_name: String,
    pub runtime: String,
    pub created_time: String,
    pub checkpointed_time: String,
    pub restored_time: String,
    pub restored: bool,
}

/// `stasis-dump.json`: the CRIU options a dump used (the restore must match them) and how
/// long each step took.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct DumpRecord {
    pub tcp_established: bool,
    pub ext_unix_sk: bool,
    pub file_locks: bool,
    pub frozen_ms: f64,
    pub dump_ms: f64,
    pub files_ms: f64,
    pub total_ms: f64,
}

impl DumpRecord {
    /// The record beside `image`; an image without one was dumped with default options.
    pub fn read(image: &Path) -> Self {
        read_json(&image.join(DUMP_RECORD)).unwrap_or_default()
    }
}

/// One entry of `volumes.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CapturedVolume {
    /// Destination in the container.
    pub destination: String,
    /// Tar file, relative to the image directory.
    pub archive: String,
}

/// A pod sysctl's name in its dotted form. Kubernetes also takes the slash form
/// (`net/ipv4/conf/eth0.100/forwarding`), where a dot belongs to a component: the separators
/// swap. The shim and the restore policy read names through this one rule.
pub fn dotted_sysctl(name: &str) -> String {
    let slash_form = match (name.find('/'), name.find('.')) {
        (Some(s), Some(d)) => s < d,
        (Some(_), None) => true,
        _ => false,
    };
    if !slash_form {
        return name.to_string();
    }
    name.chars()
        .map(|c| match c {
            '/' => '.',
            '.' => '/',
            c => c,
        })
        .collect()
}

/// The annotations of a checkpoint image's manifest and layers: stasis's own, and the ones
/// CRI-O, Podman and checkpointctl read on a container checkpoint layer.
pub mod image_annotations {
    /// Manifest annotation that makes an image a stasis pod checkpoint (its value: the archive
    /// format version of the files inside).
    pub const CHECKPOINT_ANNOTATION: &str = "io.stasis.checkpoint.format";

    pub const POD_NAME_ANNOTATION: &str = "io.stasis.checkpoint.pod-name";

    /// The pod's Kubernetes namespace (CRI metadata), where it had one.
    pub const POD_NAMESPACE_ANNOTATION: &str = "io.stasis.checkpoint.pod-namespace";

    pub const ENGINE_ANNOTATION: &str = "io.stasis.checkpoint.engine";

    pub const CONTAINERS_ANNOTATION: &str = "io.stasis.checkpoint.containers";

    pub const BASE_IMAGES_ANNOTATION: &str = "io.stasis.checkpoint.base-images";

    pub const CREATED_ANNOTATION: &str = "org.opencontainers.image.created";

    pub const SIZE_ANNOTATION: &str = "io.stasis.checkpoint.size";

    /// Layer annotations: which part of the pod checkpoint the layer is.
    pub const LAYER_PART_ANNOTATION: &str = "io.stasis.checkpoint.part";

    pub const CONTAINER_DIR_ANNOTATION: &str = "io.stasis.checkpoint.container-dir";

    /// What CRI-O, Podman and checkpointctl look for on a container checkpoint.
    pub const CRIO_NAME_ANNOTATION: &str = "io.kubernetes.cri-o.annotations.checkpoint.name";

    pub const CRIU_NAME_ANNOTATION: &str = "org.criu.checkpoint.container.name";

    pub const CRIU_POD_ANNOTATION: &str = "org.criu.checkpoint.pod.name";

    pub const CRIU_ENGINE_ANNOTATION: &str = "org.criu.checkpoint.engine.name";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_options_defaults_and_versions() {
        let o = PodOptions::parse(br#"{"version":1,"containers":{"web":"abc-web"}}"#).unwrap();
        assert_eq!(o.engine(), DEFAULT_ENGINE);
        assert_eq!(o.last_pid(), None);
        let mut o2 = o.clone();
        o2.annotations
            .insert(LAST_PID_ANNOTATION.into(), "412".into());
        o2.annotations
            .insert(ENGINE_ANNOTATION.into(), "runsc".into());
        let back = PodOptions::parse(&o2.to_json()).unwrap();
        assert_eq!(back.last_pid(), Some(412));
        assert_eq!(back.engine(), "runsc");
        let err = PodOptions::parse(br#"{"version":2,"containers":{}}"#).unwrap_err();
        assert!(err.to_string().contains("version 2"), "{err}");
        assert!(PodOptions::parse(b"{").is_err());
    }

    #[test]
    fn container_meta_reads_old_records() {
        let m: ContainerMeta = parse_json("x", br#"{"container_id":"c1"}"#).unwrap();
        assert_eq!(m.engine, DEFAULT_ENGINE);
        assert_eq!(m.container_id, "c1");
        let c: CheckpointedConfig =
            parse_json("x", br#"{"id":"c1","rootfsImageName":"busybox"}"#).unwrap();
        assert_eq!(c.rootfs_image_name, "busybox");
        let text = serde_json::to_string(&c).unwrap();
        assert!(text.contains("\"rootfsImageRef\""), "{text}");
    }
}
