//! Pod checkpoints as OCI images. A checkpoint image is an ordinary OCI image manifest whose
//! first layer holds the pod's own files (`pod.options`, `pod.dump`, the manifest and its
//! signature, a gVisor sandbox image) and each further layer one container's checkpoint
//! directory at its root (what `checkpointctl` reads), marked with the CRI-O/checkpointctl
//! annotations; stasis's own annotations on the manifest describe the pod. Images are built
//! into containerd's content store, pushed and pulled by containerd's Transfer service
//! (registry credentials answered on a Streaming-service stream), and read back through the
//! Content service with every blob's digest checked as it is read.

use std::{
    collections::{BTreeMap, HashMap},
    io::{Read, Write},
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use containerd_client::{
    services::v1::{
        content_client::ContentClient, images_client::ImagesClient, leases_client::LeasesClient,
        streaming_client::StreamingClient, transfer_client::TransferClient, CreateImageRequest,
        DeleteImageRequest, GetImageRequest, Image, ReadContentRequest, StreamInit,
        TransferOptions, TransferRequest, WriteAction, WriteContentRequest,
    },
    to_any,
    types::{
        transfer::{
            AuthRequest, AuthResponse, AuthType, ImageStore, OciRegistry, RegistryResolver,
        },
        Descriptor,
    },
};
use prost::Message;
use serde::{Deserialize, Serialize};
use sha2::Digest;
use stasis_api::layout;
use tonic::{transport::Channel, Request};

use crate::archive::{self, Compression};

const MANIFEST_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
const CONFIG_TYPE: &str = "application/vnd.oci.image.config.v1+json";
const LAYER_TYPE: &str = "application/vnd.oci.image.layer.v1.tar";

/// Manifest annotation that makes an image a stasis pod checkpoint (its value: the archive
/// format version of the files inside).
pub const CHECKPOINT_ANNOTATION: &str = "io.stasis.checkpoint.format";
const POD_NAME_ANNOTATION: &str = "io.stasis.checkpoint.pod-name";
const ENGINE_ANNOTATION: &str = "io.stasis.checkpoint.engine";
const CONTAINERS_ANNOTATION: &str = "io.stasis.checkpoint.containers";
const BASE_IMAGES_ANNOTATION: &str = "io.stasis.checkpoint.base-images";
const CREATED_ANNOTATION: &str = "org.opencontainers.image.created";
const SIZE_ANNOTATION: &str = "io.stasis.checkpoint.size";
/// Layer annotations: which part of the pod checkpoint the layer is.
const LAYER_PART_ANNOTATION: &str = "io.stasis.checkpoint.part";
const CONTAINER_DIR_ANNOTATION: &str = "io.stasis.checkpoint.container-dir";
/// What CRI-O, Podman and checkpointctl look for on a container checkpoint.
const CRIO_NAME_ANNOTATION: &str = "io.kubernetes.cri-o.annotations.checkpoint.name";
const CRIU_NAME_ANNOTATION: &str = "org.criu.checkpoint.container.name";
const CRIU_POD_ANNOTATION: &str = "org.criu.checkpoint.pod.name";
const CRIU_ENGINE_ANNOTATION: &str = "org.criu.checkpoint.engine.name";

/// containerd garbage-collection labels: what a manifest blob keeps alive.
const GC_CONFIG_LABEL: &str = "containerd.io/gc.ref.content.config";
const GC_LAYER_LABEL: &str = "containerd.io/gc.ref.content.l.";

#[derive(Serialize, Deserialize, Clone, Debug)]
#[serde(rename_all = "camelCase")]
struct OciDescriptor {
    media_type: String,
    digest: String,
    size: i64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    annotations: BTreeMap<String, String>,
}

#[derive(Serialize, Deserialize, Debug)]
#[serde(rename_all = "camelCase")]
struct OciManifest {
    schema_version: u32,
    #[serde(default)]
    media_type: String,
    config: OciDescriptor,
    layers: Vec<OciDescriptor>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

/// Registry access: credentials (as `ctr`/nerdctl take them) and plain HTTP for a local
/// registry.
#[derive(Clone, Debug, Default)]
pub struct RegistryAccess {
    /// `USER:PASSWORD`; else the docker config's entry for the registry, if any.
    pub user: Option<String>,
    /// The registry `user` is for (that of the image the command names): never handed to
    /// another one (a base image's registry, say).
    pub user_registry: Option<String>,
    /// A docker `config.json` to take credentials from (default `~/.docker/config.json`).
    pub docker_config: Option<PathBuf>,
    pub plain_http: bool,
}

impl RegistryAccess {
    /// (user, secret) for the registry of image `reference`.
    pub fn credentials_for(&self, reference: &str) -> Result<Option<(String, String)>> {
        self.credentials(registry_host(reference))
    }

    /// (user, secret) for `host`.
    fn credentials(&self, host: &str) -> Result<Option<(String, String)>> {
        let own = self
            .user_registry
            .as_deref()
            .is_none_or(|r| registry_host(r) == host);
        if let (Some(u), true) = (&self.user, own) {
            let (user, pass) = u.split_once(':').context("--user wants USER:PASSWORD")?;
            return Ok(Some((user.to_string(), pass.to_string())));
        }
        let path = match &self.docker_config {
            Some(p) => p.clone(),
            None => match std::env::var_os("DOCKER_CONFIG") {
                Some(d) => PathBuf::from(d).join("config.json"),
                None => PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
                    .join(".docker/config.json"),
            },
        };
        let Ok(text) = std::fs::read(&path) else {
            if self.docker_config.is_some() {
                bail!("cannot read {}", path.display());
            }
            return Ok(None);
        };
        #[derive(Deserialize)]
        struct Entry {
            #[serde(default)]
            auth: String,
        }
        #[derive(Deserialize)]
        struct Config {
            #[serde(default)]
            auths: HashMap<String, Entry>,
        }
        let config: Config = serde_json::from_slice(&text)
            .with_context(|| format!("{} is not a docker config.json", path.display()))?;
        // Docker Hub's entry is keyed by its index's address.
        let wanted = |k: &str| k == host || (host == "docker.io" && k == "index.docker.io");
        let entry = config.auths.iter().find(|(k, _)| {
            let k = k
                .trim_start_matches("https://")
                .trim_start_matches("http://");
            k.split('/').next().is_some_and(wanted)
        });
        let Some((_, entry)) = entry else {
            return Ok(None);
        };
        use base64::Engine;
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(entry.auth.trim())
            .with_context(|| format!("{}: the auth of {host} is not base64", path.display()))?;
        let decoded = String::from_utf8(decoded)?;
        let (user, pass) = decoded.split_once(':').with_context(|| {
            format!(
                "{}: the auth of {host} is not USER:PASSWORD",
                path.display()
            )
        })?;
        Ok(Some((user.to_string(), pass.to_string())))
    }
}

/// The registry host of a reference (`host[:port]/repo:tag`), as containerd resolves it.
fn registry_host(reference: &str) -> &str {
    match reference.split_once('/') {
        Some((first, _)) if first.contains('.') || first.contains(':') || first == "localhost" => {
            first
        }
        _ => "docker.io",
    }
}

/// Whether `arg` reads as an image reference rather than a file: it names no existing path
/// and has the shape `host[:port]/repo[:tag|@digest]` or `repo:tag`.
pub fn looks_like_reference(arg: &str) -> bool {
    !Path::new(arg).exists()
        && !arg.starts_with('/')
        && !arg.starts_with('.')
        && !arg.ends_with(".tar")
        && (arg.contains('/') || arg.contains(':'))
        && arg
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-/:@".contains(c))
}

/// containerd's image and content services in one namespace.
pub struct ImageStoreClient {
    channel: Channel,
    namespace: String,
    lease: Option<String>,
}

impl ImageStoreClient {
    pub async fn connect(address: &str, namespace: &str) -> Result<Self> {
        Ok(ImageStoreClient {
            channel: crate::cri::channel(Path::new(address)).await?,
            namespace: namespace.to_string(),
            lease: None,
        })
    }

    fn request<T>(&self, msg: T) -> Request<T> {
        let mut req = Request::new(msg);
        let md = req.metadata_mut();
        if let Ok(v) = self.namespace.parse() {
            md.insert("containerd-namespace", v);
        }
        if let Some(lease) = &self.lease {
            if let Ok(v) = lease.parse() {
                md.insert("containerd-lease", v);
            }
        }
        req
    }

    /// A lease that keeps what is written meanwhile from containerd's garbage collector,
    /// until the image names it (and for an hour at most, should we die).
    async fn take_lease(&mut self) -> Result<()> {
        let expire = time::OffsetDateTime::now_utc() + time::Duration::hours(1);
        let expire = expire
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        let id = format!("stasis-{}", archive::random_suffix()?);
        let mut leases = LeasesClient::new(self.channel.clone());
        leases
            .create(
                self.request(containerd_client::services::v1::CreateRequest {
                    id: id.clone(),
                    labels: HashMap::from([("containerd.io/gc.expire".to_string(), expire)]),
                }),
            )
            .await
            .context("create a containerd lease")?;
        self.lease = Some(id);
        Ok(())
    }

    async fn drop_lease(&mut self) {
        if let Some(id) = self.lease.take() {
            let mut leases = LeasesClient::new(self.channel.clone());
            let _ = leases
                .delete(
                    self.request(containerd_client::services::v1::DeleteRequest {
                        id,
                        sync: false,
                    }),
                )
                .await;
        }
    }

    /// Writes `produce`'s output into the content store as one blob, in a single pass: the
    /// bytes go to containerd as they are made and are hashed on the way; the commit names
    /// the digest (and `labels`). `produce` runs on a blocking thread and returns a value
    /// (a layer's diff id) passed back with the descriptor.
    async fn write_blob<T: Send + 'static>(
        &self,
        media_type: &str,
        labels: HashMap<String, String>,
        produce: impl FnOnce(&mut ContentSink) -> Result<T> + Send + 'static,
    ) -> Result<(Descriptor, T)> {
        let (tx, rx) = tokio::sync::mpsc::channel::<WriteContentRequest>(4);
        let reference = format!(
            "stasis-{}{}",
            archive::random_suffix()?,
            archive::random_suffix()?
        );
        let ingest = reference.clone();
        let mut content = ContentClient::new(self.channel.clone());
        let producer = tokio::task::spawn_blocking(move || {
            let mut sink = ContentSink {
                tx,
                reference,
                offset: 0,
                hasher: sha2::Sha256::new(),
                buf: Vec::with_capacity(CHUNK),
            };
            let made = produce(&mut sink)?;
            let (digest, size) = sink.commit(labels)?;
            Ok::<_, anyhow::Error>((digest, size, made))
        });
        let call = content.write(self.request(tokio_stream::wrappers::ReceiverStream::new(rx)));
        let mut failure = None;
        match call.await {
            Ok(r) => {
                let mut responses = r.into_inner();
                loop {
                    match responses.message().await {
                        Ok(Some(r)) if r.action == WriteAction::Commit as i32 => break,
                        Ok(Some(_)) => {}
                        Ok(None) => break,
                        // The same bytes are there already (an identical layer): fine.
                        Err(s) if s.code() == tonic::Code::AlreadyExists => break,
                        Err(s) => {
                            failure = Some(s.message().to_string());
                            break;
                        }
                    }
                }
            }
            Err(s) => failure = Some(s.message().to_string()),
        }
        let produced = producer.await?;
        if failure.is_some() || produced.is_err() {
            // Nothing half-written stays in containerd's ingest area.
            let _ = ContentClient::new(self.channel.clone())
                .abort(self.request(containerd_client::services::v1::AbortRequest {
                    r#ref: ingest.clone(),
                }))
                .await;
        }
        if let Some(f) = failure {
            bail!("write into containerd's content store: {f}");
        }
        let (digest, size, made) = produced?;
        Ok((descriptor(media_type, &digest, size), made))
    }

    /// [`Self::write_blob`] of bytes in memory (a config, a manifest).
    async fn write_bytes(
        &self,
        bytes: Vec<u8>,
        media_type: &str,
        labels: HashMap<String, String>,
    ) -> Result<Descriptor> {
        let (d, ()) = self
            .write_blob(media_type, labels, move |sink| Ok(sink.write_all(&bytes)?))
            .await?;
        Ok(d)
    }

    /// Reads a whole (small) blob, checking its digest.
    async fn read_small(&self, desc: &Descriptor, limit: i64) -> Result<Vec<u8>> {
        if desc.size > limit {
            bail!(
                "{} is {} bytes; at most {limit} expected",
                desc.digest,
                desc.size
            );
        }
        let mut reader = self.blob(desc).await?;
        let mut out = Vec::new();
        while let Some(chunk) = reader.next_chunk().await? {
            out.extend_from_slice(&chunk);
        }
        reader.finish()?;
        Ok(out)
    }

    /// A blob's bytes as they come from containerd, hashed as they are read.
    async fn blob(&self, desc: &Descriptor) -> Result<BlobStream> {
        let mut content = ContentClient::new(self.channel.clone());
        let stream = content
            .read(self.request(ReadContentRequest {
                digest: desc.digest.clone(),
                offset: 0,
                size: 0,
            }))
            .await
            .map_err(|s| anyhow::anyhow!("read {} from containerd: {}", desc.digest, s.message()))?
            .into_inner();
        Ok(BlobStream {
            stream,
            digest: desc.digest.clone(),
            size: desc.size,
            hasher: sha2::Sha256::new(),
            read: 0,
        })
    }

    /// The image `name` (its target descriptor), or None.
    pub async fn get(&self, name: &str) -> Result<Option<Descriptor>> {
        let mut images = ImagesClient::new(self.channel.clone());
        match images
            .get(self.request(GetImageRequest {
                name: name.to_string(),
            }))
            .await
        {
            Ok(r) => Ok(r.into_inner().image.and_then(|i| i.target)),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(None),
            Err(s) => bail!("look up image {name}: {}", s.message()),
        }
    }

    pub async fn delete(&self, name: &str) -> Result<()> {
        let mut images = ImagesClient::new(self.channel.clone());
        images
            .delete(self.request(DeleteImageRequest {
                name: name.to_string(),
                sync: false,
                target: None,
            }))
            .await
            .map_err(|s| anyhow::anyhow!("remove image {name}: {}", s.message()))?;
        Ok(())
    }

    async fn create(&self, name: &str, target: Descriptor) -> Result<()> {
        let mut images = ImagesClient::new(self.channel.clone());
        let now = prost_types::Timestamp::from(std::time::SystemTime::now());
        images
            .create(self.request(CreateImageRequest {
                image: Some(Image {
                    name: name.to_string(),
                    labels: HashMap::new(),
                    target: Some(target),
                    created_at: Some(now),
                    updated_at: Some(now),
                }),
                source_date_epoch: None,
            }))
            .await
            .map_err(|s| {
                if s.code() == tonic::Code::AlreadyExists {
                    anyhow::anyhow!("image {name} already exists; remove it first (`ctr -n NS images rm {name}`) or choose another reference")
                } else {
                    anyhow::anyhow!("create image {name}: {}", s.message())
                }
            })?;
        Ok(())
    }
}

fn descriptor(media_type: &str, digest: &str, size: u64) -> Descriptor {
    Descriptor {
        media_type: media_type.to_string(),
        digest: digest.to_string(),
        size: size as i64,
        annotations: HashMap::new(),
    }
}

/// How much a content write sends at once.
const CHUNK: usize = 1 << 20;

/// The writing end of a content-store write: buffers, hashes and sends the bytes.
struct ContentSink {
    tx: tokio::sync::mpsc::Sender<WriteContentRequest>,
    reference: String,
    offset: u64,
    hasher: sha2::Sha256,
    buf: Vec<u8>,
}

impl ContentSink {
    fn send(
        &mut self,
        action: WriteAction,
        labels: HashMap<String, String>,
        expected: String,
    ) -> std::io::Result<()> {
        let data = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        let n = data.len() as u64;
        let req = WriteContentRequest {
            action: action as i32,
            r#ref: self.reference.clone(),
            total: if action == WriteAction::Commit {
                self.offset as i64
            } else {
                0
            },
            expected,
            offset: (self.offset - if action == WriteAction::Commit { 0 } else { n }) as i64,
            data,
            labels,
        };
        self.tx.blocking_send(req).map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                "containerd ended the content write",
            )
        })
    }

    /// Sends what is left and commits; returns (digest, size).
    fn commit(mut self, labels: HashMap<String, String>) -> Result<(String, u64)> {
        if !self.buf.is_empty() {
            self.send(WriteAction::Write, HashMap::new(), String::new())?;
        }
        let digest = format!(
            "sha256:{}",
            hex::encode(std::mem::take(&mut self.hasher).finalize())
        );
        self.send(WriteAction::Commit, labels, digest.clone())?;
        Ok((digest, self.offset))
    }
}

impl Write for ContentSink {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.hasher.update(data);
        self.offset += data.len() as u64;
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK {
            self.send(WriteAction::Write, HashMap::new(), String::new())?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A blob read from containerd, its digest checked once it is all read.
pub struct BlobStream {
    stream: tonic::Streaming<containerd_client::services::v1::ReadContentResponse>,
    digest: String,
    size: i64,
    hasher: sha2::Sha256,
    read: i64,
}

impl BlobStream {
    async fn next_chunk(&mut self) -> Result<Option<Vec<u8>>> {
        let msg = self
            .stream
            .message()
            .await
            .map_err(|s| anyhow::anyhow!("read {}: {}", self.digest, s.message()))?;
        Ok(msg.map(|m| {
            self.hasher.update(&m.data);
            self.read += m.data.len() as i64;
            m.data
        }))
    }

    fn finish(&mut self) -> Result<()> {
        let got = format!(
            "sha256:{}",
            hex::encode(std::mem::take(&mut self.hasher).finalize())
        );
        if got != self.digest || self.read != self.size {
            bail!(
                "blob {} is corrupt or was changed ({} bytes, {got}; the image says {} bytes): refused",
                self.digest,
                self.read,
                self.size
            );
        }
        Ok(())
    }
}

/// A blob as a blocking reader (for tar), for use inside `block_in_place`: reads past the
/// end check the digest, and a mismatch is an error of the last read.
struct BlockingBlob {
    blob: BlobStream,
    handle: tokio::runtime::Handle,
    buf: Vec<u8>,
    at: usize,
    done: bool,
}

impl Read for BlockingBlob {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.at == self.buf.len() {
            if self.done {
                return Ok(0);
            }
            match self.handle.block_on(self.blob.next_chunk()) {
                Ok(Some(chunk)) => {
                    self.buf = chunk;
                    self.at = 0;
                }
                Ok(None) => {
                    self.done = true;
                    self.blob.finish().map_err(|e| {
                        std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{e:#}"))
                    })?;
                }
                Err(e) => return Err(std::io::Error::other(format!("{e:#}"))),
            }
        }
        let n = out.len().min(self.buf.len() - self.at);
        out[..n].copy_from_slice(&self.buf[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// A layer's decompressed bytes whose end (or failure) is always its blob's end: the blob is
/// then read to its last byte and its digest checked, so a changed blob is refused as such
/// (not as whatever the decompressor or tar made of it), whatever stops reading early.
struct CheckedLayer {
    decoded: Box<dyn Read>,
    raw: std::rc::Rc<std::cell::RefCell<BlockingBlob>>,
}

/// Shares one blob between its decompressor and the [`CheckedLayer`] that checks it.
struct SharedBlob(std::rc::Rc<std::cell::RefCell<BlockingBlob>>);

impl Read for SharedBlob {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        self.0.borrow_mut().read(out)
    }
}

impl CheckedLayer {
    /// Reads the rest of the raw blob; its digest error, if any.
    fn drain(&mut self) -> std::io::Result<()> {
        std::io::copy(&mut *self.raw.borrow_mut(), &mut std::io::sink()).map(drop)
    }
}

impl Read for CheckedLayer {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        match self.decoded.read(out) {
            Ok(0) if !out.is_empty() => self.drain().map(|()| 0),
            Ok(n) => Ok(n),
            Err(e) => Err(self.drain().err().unwrap_or(e)),
        }
    }
}

/// What stasis records about a checkpoint image.
#[derive(Debug, Clone)]
pub struct ImageSummary {
    pub reference: String,
    pub digest: String,
    pub pod_name: String,
    pub engine: String,
    pub containers: Vec<String>,
    pub size: u64,
}

/// Builds checkpoint image `reference` from the checkpoint directory `dir` (a staged
/// checkpoint or an unpacked archive: its manifest already written, maybe signed), with
/// layers compressed as `compression`. Returns the image's total size.
pub async fn build_from_dir(
    address: &str,
    namespace: &str,
    dir: &Path,
    reference: &str,
    compression: Compression,
) -> Result<u64> {
    let options = archive::read_pod_options(dir)?;
    let pod_dump: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join(layout::POD_DUMP))?).unwrap_or_default();
    let pod_name = pod_dump["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let mut store = ImageStoreClient::connect(address, namespace).await?;
    if store.get(reference).await?.is_some() {
        bail!("image {reference} already exists; remove it first (`ctr -n {namespace} images rm {reference}`) or choose another reference");
    }
    let result = async {
        store.take_lease().await?;
        let media = match compression {
            Compression::None => LAYER_TYPE.to_string(),
            Compression::Gzip => format!("{LAYER_TYPE}+gzip"),
            Compression::Zstd => format!("{LAYER_TYPE}+zstd"),
        };
        // The pod's own files: everything at the top but the container directories.
        let container_dirs: Vec<&String> = options.containers.values().collect();
        let keep: Vec<PathBuf> = std::fs::read_dir(dir)?
            .flatten()
            .map(|e| e.file_name())
            .filter(|n| {
                !container_dirs
                    .iter()
                    .any(|d| std::ffi::OsStr::new(d.as_str()) == n)
            })
            .map(PathBuf::from)
            .collect();
        let mut parts = vec![(
            dir.to_path_buf(),
            keep,
            BTreeMap::from([(LAYER_PART_ANNOTATION.to_string(), "pod".to_string())]),
        )];
        let mut base_images = BTreeMap::new();
        for (name, cdir) in &options.containers {
            let cpath = dir.join(cdir);
            let entries: Vec<PathBuf> = std::fs::read_dir(&cpath)?
                .flatten()
                .map(|e| PathBuf::from(e.file_name()))
                .collect();
            let recorded: Option<layout::CheckpointedConfig> =
                std::fs::read(cpath.join(layout::CONFIG_DUMP))
                    .ok()
                    .and_then(|b| layout::parse_json(layout::CONFIG_DUMP, &b).ok());
            if let Some(r) = &recorded {
                base_images.insert(name.clone(), r.rootfs_image_ref.clone());
            }
            parts.push((
                cpath,
                entries,
                BTreeMap::from([
                    (LAYER_PART_ANNOTATION.to_string(), "container".to_string()),
                    (CONTAINER_DIR_ANNOTATION.to_string(), cdir.clone()),
                    (CRIO_NAME_ANNOTATION.to_string(), name.clone()),
                    (CRIU_NAME_ANNOTATION.to_string(), name.clone()),
                    (CRIU_POD_ANNOTATION.to_string(), pod_name.clone()),
                    (CRIU_ENGINE_ANNOTATION.to_string(), "stasis".to_string()),
                ]),
            ));
        }
        let (mut total, mut layers, mut diff_ids) = (0u64, Vec::new(), Vec::new());
        for (root, entries, annotations) in parts {
            let (d, diff) = store
                .write_blob(&media, HashMap::new(), move |sink| {
                    tar_layer(sink, &root, &entries, compression)
                })
                .await?;
            total += d.size as u64;
            diff_ids.push(diff);
            layers.push(OciDescriptor {
                media_type: d.media_type,
                digest: d.digest,
                size: d.size,
                annotations,
            });
        }
        let config = serde_json::json!({
            "created": now_rfc3339(),
            "architecture": oci_arch(),
            "os": "linux",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        });
        let config = store
            .write_bytes(serde_json::to_vec(&config)?, CONFIG_TYPE, HashMap::new())
            .await?;
        let manifest = OciManifest {
            schema_version: 2,
            media_type: MANIFEST_TYPE.to_string(),
            config: OciDescriptor {
                media_type: config.media_type.clone(),
                digest: config.digest.clone(),
                size: config.size,
                annotations: BTreeMap::new(),
            },
            annotations: BTreeMap::from([
                (
                    CHECKPOINT_ANNOTATION.to_string(),
                    layout::MANIFEST_VERSION.to_string(),
                ),
                (POD_NAME_ANNOTATION.to_string(), pod_name.clone()),
                (ENGINE_ANNOTATION.to_string(), options.engine().to_string()),
                (
                    CONTAINERS_ANNOTATION.to_string(),
                    options
                        .containers
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(","),
                ),
                (
                    BASE_IMAGES_ANNOTATION.to_string(),
                    serde_json::to_string(&base_images)?,
                ),
                (CREATED_ANNOTATION.to_string(), now_rfc3339()),
                (SIZE_ANNOTATION.to_string(), total.to_string()),
            ]),
            layers,
        };
        let mut labels = HashMap::from([(GC_CONFIG_LABEL.to_string(), config.digest.clone())]);
        for (i, l) in manifest.layers.iter().enumerate() {
            labels.insert(format!("{GC_LAYER_LABEL}{i}"), l.digest.clone());
        }
        let target = store
            .write_bytes(serde_json::to_vec(&manifest)?, MANIFEST_TYPE, labels)
            .await?;
        total += (target.size + config.size) as u64;
        store.create(reference, target).await?;
        Ok(total)
    }
    .await;
    store.drop_lease().await;
    result
}

/// Builds image `reference` from the archive `file`, checked (and unpacked) in full first.
pub async fn build_from_archive(
    address: &str,
    namespace: &str,
    file: &Path,
    reference: &str,
    compression: Compression,
    opening: &crate::seal::Opening,
) -> Result<u64> {
    let work = scratch_dir()?;
    let unpacked = tokio::task::block_in_place(|| archive::extract_with(file, &work, opening));
    let result = match unpacked {
        Ok(_) => build_from_dir(address, namespace, &work, reference, compression).await,
        Err(e) => Err(e.context(format!("cannot build an image from {}", file.display()))),
    };
    let _ = std::fs::remove_dir_all(&work);
    result
}

/// `stasisctl inspect REF`: the image unpacked and checked like an archive, then summarised.
pub async fn inspect(address: &str, namespace: &str, reference: &str) -> Result<archive::Summary> {
    let s = summary(address, namespace, reference).await?;
    let work = scratch_dir()?;
    let result = tokio::task::block_in_place(|| {
        unpack_blocking(address, namespace, reference, &work, &Default::default())
    })
    .and_then(|_| archive::inspect_dir(&work, format!("image {reference} ({})", s.digest), s.size));
    let _ = std::fs::remove_dir_all(&work);
    result
}

/// A fresh name in the private staging directory (not created).
fn scratch_dir() -> Result<PathBuf> {
    Ok(
        archive::private_root(Path::new(crate::pod::CHECKPOINT_STAGING))?
            .join(format!(".image-{}", archive::random_suffix()?)),
    )
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

fn oci_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// The tar of `entries` (names below `root`) into `w`, compressed; returns the diff id
/// (SHA-256 of the uncompressed tar).
fn tar_layer(
    w: &mut ContentSink,
    root: &Path,
    entries: &[PathBuf],
    compression: Compression,
) -> Result<String> {
    Ok(match compression {
        Compression::None => tar_entries(w, root, entries)?.1,
        Compression::Gzip => {
            let enc = flate2::write::GzEncoder::new(w, flate2::Compression::fast());
            let (enc, diff) = tar_entries(enc, root, entries)?;
            enc.finish()?;
            diff
        }
        Compression::Zstd => {
            let mut enc = zstd::Encoder::new(w, 3)?;
            enc.include_checksum(true)?;
            let (enc, diff) = tar_entries(enc, root, entries)?;
            enc.finish()?;
            diff
        }
    })
}

/// The tar of `entries` into `w`, hashed as it is written.
fn tar_entries<W: Write>(w: W, root: &Path, entries: &[PathBuf]) -> Result<(W, String)> {
    struct Hashing<W> {
        inner: W,
        hasher: sha2::Sha256,
    }
    impl<W: Write> Write for Hashing<W> {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let n = self.inner.write(buf)?;
            self.hasher.update(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            self.inner.flush()
        }
    }
    let mut tar = tar::Builder::new(Hashing {
        inner: w,
        hasher: sha2::Sha256::new(),
    });
    tar.follow_symlinks(false);
    // Modes as they are: page images and configs stay 0600 wherever they are unpacked.
    tar.mode(tar::HeaderMode::Complete);
    let mut sorted = entries.to_vec();
    sorted.sort();
    for e in &sorted {
        let path = root.join(e);
        if path.symlink_metadata()?.is_dir() {
            tar.append_dir_all(e, &path)?;
        } else {
            tar.append_path_with_name(&path, e)?;
        }
    }
    let mut h = tar.into_inner()?;
    h.flush()?;
    Ok((
        h.inner,
        format!("sha256:{}", hex::encode(h.hasher.finalize())),
    ))
}

/// The manifest of checkpoint image `reference` (pulled first when missing and `pull` says
/// how), refused unless it is a stasis pod checkpoint.
async fn checkpoint_manifest(
    store: &ImageStoreClient,
    reference: &str,
) -> Result<(Descriptor, OciManifest)> {
    let Some(target) = store.get(reference).await? else {
        bail!("image {reference} is not in containerd's image store (namespace {}); pull it first (`stasisctl image pull`)", store.namespace);
    };
    if target.media_type != MANIFEST_TYPE {
        bail!(
            "image {reference} is not a stasis pod checkpoint: its target is a {} (a checkpoint image is a single OCI manifest)",
            target.media_type
        );
    }
    let bytes = store.read_small(&target, 4 << 20).await?;
    let manifest: OciManifest = serde_json::from_slice(&bytes)
        .with_context(|| format!("image {reference}: its manifest is not an OCI image manifest"))?;
    let Some(format) = manifest.annotations.get(CHECKPOINT_ANNOTATION) else {
        bail!(
            "image {reference} is not a stasis pod checkpoint: its manifest has no {CHECKPOINT_ANNOTATION} annotation (an ordinary container image, or another engine's checkpoint)"
        );
    };
    let version: u32 = format.parse().unwrap_or(0);
    if !layout::MANIFEST_VERSIONS_READ.contains(&version) {
        bail!("image {reference}: checkpoint format {format} is unknown to this stasisctl; use a newer one");
    }
    match manifest.layers.first() {
        Some(l) if l.annotations.get(LAYER_PART_ANNOTATION).map(String::as_str) == Some("pod") => {}
        _ => bail!(
            "image {reference}: its first layer is not the pod's (no {LAYER_PART_ANNOTATION}=pod)"
        ),
    }
    Ok((target, manifest))
}

/// What `inspect REF` shows before the files are read.
pub async fn summary(address: &str, namespace: &str, reference: &str) -> Result<ImageSummary> {
    let store = ImageStoreClient::connect(address, namespace).await?;
    let (target, manifest) = checkpoint_manifest(&store, reference).await?;
    let a = |k: &str| manifest.annotations.get(k).cloned().unwrap_or_default();
    Ok(ImageSummary {
        reference: reference.to_string(),
        digest: target.digest,
        pod_name: a(POD_NAME_ANNOTATION),
        engine: a(ENGINE_ANNOTATION),
        containers: a(CONTAINERS_ANNOTATION)
            .split(',')
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect(),
        size: manifest.layers.iter().map(|l| l.size.max(0) as u64).sum(),
    })
}

/// Unpacks checkpoint image `reference` into `dest` (created; must not exist) with the
/// checks of an archive: every blob's digest, hostile entries, the layout, the signature if
/// asked, the archive's own manifest. To be called inside `block_in_place`.
pub fn unpack_blocking(
    address: &str,
    namespace: &str,
    reference: &str,
    dest: &Path,
    opening: &crate::seal::Opening,
) -> Result<archive::PodOptions> {
    let handle = tokio::runtime::Handle::current();
    let store = handle.block_on(ImageStoreClient::connect(address, namespace))?;
    let (_, manifest) = handle.block_on(checkpoint_manifest(&store, reference))?;
    let mut layers = Vec::new();
    for (i, l) in manifest.layers.iter().enumerate() {
        let sub = match l.annotations.get(LAYER_PART_ANNOTATION).map(String::as_str) {
            Some("pod") if i == 0 => None,
            Some("container") => {
                let dir = l
                    .annotations
                    .get(CONTAINER_DIR_ANNOTATION)
                    .cloned()
                    .unwrap_or_default();
                if !layout::is_plain_name(&dir) {
                    bail!("hostile image: layer {i} names container directory {dir:?}");
                }
                Some(dir)
            }
            other => bail!("image {reference}: layer {i} is of an unknown part {other:?}"),
        };
        let desc = descriptor(&l.media_type, &l.digest, l.size.max(0) as u64);
        layers.push((sub, desc));
    }
    let open = |desc: &Descriptor| -> Result<Box<dyn Read>> {
        let blob = handle.block_on(store.blob(desc))?;
        let raw = std::rc::Rc::new(std::cell::RefCell::new(BlockingBlob {
            blob,
            handle: handle.clone(),
            buf: Vec::new(),
            at: 0,
            done: false,
        }));
        let decoded = decompressing(&desc.media_type, SharedBlob(raw.clone()))?;
        Ok(Box::new(CheckedLayer { decoded, raw }))
    };
    let parts: Vec<archive::Layer> = layers
        .iter()
        .map(|(sub, desc)| archive::Layer {
            dir: sub.clone(),
            name: desc.digest.clone(),
            open: Box::new(move || open(desc)),
        })
        .collect();
    archive::unpack_layers(dest, opening, parts)
}

fn decompressing(media_type: &str, r: impl Read + 'static) -> Result<Box<dyn Read>> {
    Ok(if media_type.ends_with("+gzip") {
        // Every member to the end: the blob's digest is checked when its last byte is read.
        Box::new(flate2::read::MultiGzDecoder::new(r))
    } else if media_type.ends_with("+zstd") {
        Box::new(zstd::Decoder::new(r)?)
    } else if media_type == LAYER_TYPE
        || media_type == "application/vnd.docker.image.rootfs.diff.tar"
    {
        Box::new(r)
    } else {
        bail!("layer media type {media_type} is not one a checkpoint image uses")
    })
}

/// Answers containerd's credential requests on a Streaming-service stream until it closes.
async fn serve_credentials(
    channel: Channel,
    namespace: &str,
    stream_id: &str,
    credentials: (String, String),
) -> Result<tokio::task::JoinHandle<()>> {
    let (tx, rx) = tokio::sync::mpsc::channel::<prost_types::Any>(4);
    tx.send(to_any(&StreamInit {
        id: stream_id.to_string(),
    }))
    .await
    .ok();
    let mut req = Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    if let Ok(v) = namespace.parse() {
        req.metadata_mut().insert("containerd-namespace", v);
    }
    let mut responses = StreamingClient::new(channel)
        .stream(req)
        .await
        .map_err(|s| anyhow::anyhow!("open a credentials stream to containerd: {}", s.message()))?
        .into_inner();
    // The first message acknowledges the stream.
    responses
        .message()
        .await
        .map_err(|s| anyhow::anyhow!("credentials stream: {}", s.message()))?;
    Ok(tokio::spawn(async move {
        while let Ok(Some(any)) = responses.message().await {
            if AuthRequest::decode(any.value.as_slice()).is_err() {
                continue;
            }
            let answer = AuthResponse {
                auth_type: AuthType::Credentials as i32,
                username: credentials.0.clone(),
                secret: credentials.1.clone(),
                ..Default::default()
            };
            if tx.send(to_any(&answer)).await.is_err() {
                break;
            }
        }
    }))
}

/// Pushes (`push`) or pulls image `reference` through containerd's Transfer service.
pub async fn transfer(
    address: &str,
    namespace: &str,
    reference: &str,
    access: &RegistryAccess,
    push: bool,
) -> Result<()> {
    let channel = crate::cri::channel(Path::new(address)).await?;
    let host = registry_host(reference);
    let mut resolver = RegistryResolver {
        default_scheme: if access.plain_http { "http" } else { "https" }.to_string(),
        ..Default::default()
    };
    let mut auth_task = None;
    if let Some(creds) = access.credentials(host)? {
        let id = format!("stasis-auth-{}", archive::random_suffix()?);
        auth_task = Some(serve_credentials(channel.clone(), namespace, &id, creds).await?);
        resolver.auth_stream = id;
    }
    let registry = to_any(&OciRegistry {
        reference: reference.to_string(),
        resolver: Some(resolver),
    });
    let store = to_any(&ImageStore {
        name: reference.to_string(),
        ..Default::default()
    });
    let (source, destination) = if push {
        (store, registry)
    } else {
        (registry, store)
    };
    let mut req = Request::new(TransferRequest {
        source: Some(source),
        destination: Some(destination),
        options: Some(TransferOptions::default()),
    });
    if let Ok(v) = namespace.parse() {
        req.metadata_mut().insert("containerd-namespace", v);
    }
    let result = TransferClient::new(channel).transfer(req).await;
    if let Some(t) = auth_task {
        t.abort();
    }
    result.map_err(|s| {
        anyhow::anyhow!(
            "{} {reference}: {}",
            if push { "push" } else { "pull" },
            s.message()
        )
    })?;
    Ok(())
}
