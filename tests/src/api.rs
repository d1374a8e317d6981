//! What `ctr` cannot do, through containerd's own gRPC API: create a task from a checkpoint
//! image made by `ctr tasks checkpoint` (ctr's `containers restore` only reads the images of
//! `ctr containers checkpoint`).

use std::path::Path;

use anyhow::{Context, Result};
use containerd_client::{
    services::v1::{
        snapshots::MountsRequest, CreateTaskRequest, GetImageRequest, ReadContentRequest,
        StartRequest,
    },
    types::Descriptor,
    with_namespace, Client,
};
use tonic::Request;

const CRIU_CHECKPOINT_MEDIA_TYPE: &str =
    "application/vnd.containerd.container.criu.checkpoint.criu.tar";

/// Creates and starts the task of existing container `container` from checkpoint image `image_ref`.
pub async fn restore_task_from_checkpoint(
    socket: &Path,
    namespace: &str,
    container: &str,
    image_ref: &str,
) -> Result<u32> {
    let client = Client::from_path(socket)
        .await
        .context("connect to containerd")?;
    let image = client
        .images()
        .get(with_namespace!(
            GetImageRequest {
                name: image_ref.to_string()
            },
            namespace
        ))
        .await
        .with_context(|| format!("get image {image_ref}"))?
        .into_inner()
        .image
        .context("no image")?;
    let index = image.target.context("image has no target")?;
    let mut stream = client
        .content()
        .read(with_namespace!(
            ReadContentRequest {
                digest: index.digest.clone(),
                offset: 0,
                size: 0
            },
            namespace
        ))
        .await
        .context("read checkpoint index")?
        .into_inner();
    let mut data = Vec::new();
    while let Some(chunk) = stream.message().await? {
        data.extend_from_slice(&chunk.data);
    }
    let index: serde_json::Value =
        serde_json::from_slice(&data).context("parse checkpoint index")?;
    let criu = index["manifests"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["mediaType"] == CRIU_CHECKPOINT_MEDIA_TYPE)
        .context("checkpoint index has no CRIU images")?;
    let checkpoint = Descriptor {
        media_type: CRIU_CHECKPOINT_MEDIA_TYPE.to_string(),
        digest: criu["digest"].as_str().unwrap_or_default().to_string(),
        size: criu["size"].as_i64().unwrap_or_default(),
        annotations: Default::default(),
    };
    let mounts = client
        .snapshots()
        .mounts(with_namespace!(
            MountsRequest {
                snapshotter: "overlayfs".into(),
                key: container.to_string()
            },
            namespace
        ))
        .await
        .context("rootfs mounts")?
        .into_inner()
        .mounts;
    let created = client
        .tasks()
        .create(with_namespace!(
            CreateTaskRequest {
                container_id: container.to_string(),
                rootfs: mounts,
                checkpoint: Some(checkpoint),
                ..Default::default()
            },
            namespace
        ))
        .await
        .context("create task from checkpoint")?
        .into_inner();
    client
        .tasks()
        .start(with_namespace!(
            StartRequest {
                container_id: container.to_string(),
                ..Default::default()
            },
            namespace
        ))
        .await
        .context("start restored task")?;
    Ok(created.pid)
}
