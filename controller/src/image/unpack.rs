use super::*;

/// Unpacks checkpoint image `reference` into `dest` (created; must not exist) with the
/// checks of an archive: every blob's digest, hostile entries, the layout, the signature if
/// asked, the archive's own manifest. With `leave_pages`, an uncompressed container layer
/// whose blob containerd keeps as a file on this node leaves its page images there (their
/// chunks are checked against the manifest when served): returned as the page source. To be
/// called inside `block_in_place`.
pub fn unpack_blocking(
    address: &str,
    namespace: &str,
    reference: &str,
    dest: &Path,
    opening: &crate::seal::Opening,
    leave_pages: bool,
) -> Result<(archive::PodOptions, Option<layout::PageSource>)> {
    let handle = tokio::runtime::Handle::current();
    let store = handle.block_on(ImageStoreClient::connect(address, namespace))?;
    let (_, manifest) = handle.block_on(checkpoint_manifest(&store, reference))?;
    let blobs = match leave_pages {
        true => handle.block_on(content_blobs(&store)),
        false => None,
    };
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
    // Each layer is read once: bounded, unpacked and digest-checked in one pass; one whose
    // page images stay in its blob file is read but for them (not counted).
    let blob_of = |sub: &Option<String>, d: &Descriptor| {
        let hex = d.digest.strip_prefix("sha256:")?;
        let plain = d.media_type == LAYER_TYPE
            || d.media_type == "application/vnd.docker.image.rootfs.diff.tar";
        let ok =
            sub.is_some() && plain && hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit());
        let path = blobs.as_ref()?.join(hex);
        (ok && path.symlink_metadata().is_ok_and(|m| m.is_file())).then_some(path)
    };
    let layers: Vec<(Option<String>, Descriptor, Option<PathBuf>)> = layers
        .into_iter()
        .map(|(sub, d)| {
            let blob = blob_of(&sub, &d);
            (sub, d, blob)
        })
        .collect();
    let streamed = || layers.iter().filter(|(_, _, blob)| blob.is_none());
    let total: u64 = streamed().map(|(_, d, _)| d.size.max(0) as u64).sum();
    if leave_pages && streamed().any(|(sub, _, _)| sub.is_some()) {
        crate::progress::step(
            "unpacking",
            format!("{reference} has compressed container layers: their pages are unpacked before the pod runs (an image built with --compress none is served from containerd's store)"),
        );
    }
    let _reading = crate::progress::bytes(
        "unpacking",
        &format!("reading the layers of {reference}"),
        total,
    );
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
        .map(|(sub, desc, blob)| archive::Layer {
            blob: blob.clone(),
            dir: sub.clone(),
            name: desc.digest.clone(),
            open: Box::new(move || open(desc)),
        })
        .collect();
    archive::unpack_layers(dest, opening, parts)
}

/// Where containerd keeps its blobs (`<content root>/blobs/sha256`), as its introspection
/// service says of its content plugin; None when it does not say (pages are then unpacked).
async fn content_blobs(store: &ImageStoreClient) -> Option<PathBuf> {
    use containerd_client::services::v1::{
        introspection_client::IntrospectionClient, PluginsRequest,
    };
    let mut client = IntrospectionClient::new(store.channel.clone());
    let req = store.request(PluginsRequest {
        filters: vec!["type==io.containerd.content.v1".to_string()],
    });
    let plugins = client.plugins(req).await.ok()?.into_inner().plugins;
    let root = plugins
        .into_iter()
        .find(|p| p.r#type == "io.containerd.content.v1" && p.id == "content")?
        .exports
        .get("root")
        .map(PathBuf::from)?;
    root.is_absolute().then(|| root.join("blobs/sha256"))
}

pub(super) fn decompressing(media_type: &str, r: impl Read + 'static) -> Result<Box<dyn Read>> {
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
