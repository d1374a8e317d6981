use super::*;

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
    // Each layer is read once: bounded, unpacked and digest-checked in one pass.
    let total: u64 = layers.iter().map(|(_, d)| d.size.max(0) as u64).sum();
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
        .map(|(sub, desc)| archive::Layer {
            dir: sub.clone(),
            name: desc.digest.clone(),
            open: Box::new(move || open(desc)),
        })
        .collect();
    archive::unpack_layers(dest, opening, parts)
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
