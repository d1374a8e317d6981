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

mod build;
mod registry;
mod store;
mod unpack;

// The parts use each other's helpers through here.
#[allow(unused_imports)]
use {build::*, registry::*, store::*, unpack::*};

pub use build::{build_from_archive, build_from_dir};
pub use registry::{transfer, RegistryAccess};
pub use store::{BlobStream, ImageStoreClient};
pub use unpack::unpack_blocking;

const MANIFEST_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";

const CONFIG_TYPE: &str = "application/vnd.oci.image.config.v1+json";

const LAYER_TYPE: &str = "application/vnd.oci.image.layer.v1.tar";

use stasis_api::layout::image_annotations::*;

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

/// What stasis records about a checkpoint image.
#[derive(Debug, Clone)]
pub struct ImageSummary {
    pub reference: String,
    pub digest: String,
    pub pod_name: String,
    pub pod_namespace: String,
    pub engine: String,
    pub containers: Vec<String>,
    pub size: u64,
    /// When it was made (RFC 3339), as its manifest says.
    pub created: String,
}

/// `stasisctl inspect REF`: the image unpacked and checked like an archive, then summarised.
pub async fn inspect(address: &str, namespace: &str, reference: &str) -> Result<archive::Summary> {
    let s = summary(address, namespace, reference).await?;
    let work = scratch_dir()?;
    let result = tokio::task::block_in_place(|| {
        unpack_blocking(
            address,
            namespace,
            reference,
            &work,
            &Default::default(),
            false,
        )
    })
    .and_then(|_| archive::inspect_dir(&work, format!("image {reference} ({})", s.digest), s.size));
    let _ = std::fs::remove_dir_all(&work);
    result
}

/// A fresh name in the private staging directory (not created).
fn scratch_dir() -> Result<PathBuf> {
    Ok(
        crate::files::private_root(Path::new(crate::files::CHECKPOINT_STAGING))?
            .join(format!(".image-{}", crate::files::random_suffix()?)),
    )
}

fn oci_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
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
        pod_namespace: a(POD_NAMESPACE_ANNOTATION),
        engine: a(ENGINE_ANNOTATION),
        containers: a(CONTAINERS_ANNOTATION)
            .split(',')
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect(),
        size: manifest.layers.iter().map(|l| l.size.max(0) as u64).sum(),
        created: a(CREATED_ANNOTATION),
    })
}

/// Every stasis pod checkpoint image in containerd's store (namespace `namespace`).
pub async fn list_checkpoints(address: &str, namespace: &str) -> Result<Vec<ImageSummary>> {
    let names = ImageStoreClient::connect(address, namespace)
        .await?
        .names()
        .await?;
    let mut found: Vec<ImageSummary> = Vec::new();
    for name in names {
        // `summary` refuses ordinary images and other engines' checkpoints, which are not
        // ours to list; one unreadable image must not hide (or stop a prune of) the others.
        if let Ok(s) = summary(address, namespace, &name).await {
            found.push(s);
        }
    }
    // containerd's CRI adds a `sha256:…` name to every image in its namespace: shown only
    // when the image has no other name.
    let named: Vec<String> = found
        .iter()
        .filter(|i| !is_alias(&i.reference))
        .map(|i| i.digest.clone())
        .collect();
    found.retain(|i| !is_alias(&i.reference) || !named.contains(&i.digest));
    Ok(found)
}

fn is_alias(name: &str) -> bool {
    name.starts_with("sha256:")
}

/// Removes checkpoint image `reference`, and CRI's `sha256:…` name of it once no other name
/// is left.
pub async fn remove_checkpoint(address: &str, namespace: &str, reference: &str) -> Result<()> {
    let store = ImageStoreClient::connect(address, namespace).await?;
    let (target, _) = checkpoint_manifest(&store, reference).await?;
    store.delete(reference).await?;
    let mut same = Vec::new();
    for name in store.names().await? {
        if store
            .get(&name)
            .await?
            .is_some_and(|d| d.digest == target.digest)
        {
            same.push(name);
        }
    }
    if same.iter().all(|n| is_alias(n)) {
        for alias in same {
            store.delete(&alias).await?;
        }
    }
    Ok(())
}
