//! What `ctr` cannot do, through containerd's own gRPC API: create a task from a checkpoint
//! image made by `ctr tasks checkpoint` (ctr's `containers restore` only reads the images of
//! `ctr containers checkpoint`), and checkpoint a task without containerd's client library
//! pausing it first (the daemon's Tasks service passes the call straight to the shim).

use std::path::Path;

use anyhow::{Context, Result};
use containerd_client::{
    services::v1::{
        snapshots::MountsRequest, CheckpointTaskRequest, CreateRequest as CreateLeaseRequest,
        CreateTaskRequest, GetImageRequest, ReadContentRequest, StartRequest,
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
    restore_task_from_descriptor(socket, namespace, container, checkpoint, None).await
}

/// Checkpoints the running task of `container` (left running) through the daemon's Tasks
/// service, which does not pause it: the shim's own freeze is all that holds it still. The
/// CRIU images land in the content store under a lease of their own (kept: the private
/// containerd goes with the test). Returns their descriptor.
pub async fn checkpoint_task_unpaused(
    socket: &Path,
    namespace: &str,
    container: &str,
) -> Result<Descriptor> {
    let client = Client::from_path(socket)
        .await
        .context("connect to containerd")?;
    let lease = client
        .leases()
        .create(with_namespace!(
            CreateLeaseRequest {
                id: String::new(),
                labels: Default::default(),
            },
            namespace
        ))
        .await
        .context("create a lease for the checkpoint")?
        .into_inner()
        .lease
        .context("no lease")?;
    // What containerd's own client sends (file locks on), minus its pause.
    let options = containerd_shim_protos::shim::oci::CheckpointOptions {
        file_locks: true,
        ..Default::default()
    };
    let mut req = with_namespace!(
        CheckpointTaskRequest {
            container_id: container.to_string(),
            options: Some(prost_types::Any {
                type_url: "containerd.runc.v1.CheckpointOptions".into(),
                value: containerd_shim_protos::protobuf::Message::write_to_bytes(&options)?,
            }),
            ..Default::default()
        },
        namespace
    );
    req.metadata_mut()
        .insert("containerd-lease", lease.id.parse().context("lease id")?);
    let descriptors = client
        .tasks()
        .checkpoint(req)
        .await
        .with_context(|| format!("Tasks.Checkpoint of {container}"))?
        .into_inner()
        .descriptors;
    descriptors
        .into_iter()
        .find(|d| d.media_type == CRIU_CHECKPOINT_MEDIA_TYPE)
        .context("the checkpoint returned no CRIU images")
}

/// Creates and starts the task of existing container `container` from the CRIU images at
/// `checkpoint` (in the content store). Its stdin, stdout and stderr are fifos made in
/// `stdio_dir` if given (the shim holds both ends; nobody needs to read them), else none: the
/// task then holds the host's /dev/null, which CRIU cannot dump again.
pub async fn restore_task_from_descriptor(
    socket: &Path,
    namespace: &str,
    container: &str,
    checkpoint: Descriptor,
    stdio_dir: Option<&Path>,
) -> Result<u32> {
    let mut stdio = [String::new(), String::new(), String::new()];
    if let Some(dir) = stdio_dir {
        let unique = stasis_api::private::random_suffix()?;
        for (slot, name) in stdio.iter_mut().zip(["stdin", "stdout", "stderr"]) {
            let path = dir.join(format!("{container}-{unique}-{name}"));
            nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600))
                .with_context(|| format!("mkfifo {}", path.display()))?;
            *slot = path.display().to_string();
        }
    }
    let [stdin, stdout, stderr] = stdio;
    let client = Client::from_path(socket)
        .await
        .context("connect to containerd")?;
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
                stdin,
                stdout,
                stderr,
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
