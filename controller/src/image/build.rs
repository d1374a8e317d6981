use super::*;
use stasis_api::layout::PodOptions;

/// One layer to write: what is below `root` (but the top-level names in `skip`), whose path
/// from the checkpoint's top starts with `under`; and its annotations.
pub(super) struct LayerPart {
    pub(super) root: PathBuf,
    pub(super) under: PathBuf,
    pub(super) skip: Vec<std::ffi::OsString>,
    pub(super) annotations: BTreeMap<String, String>,
}

/// Builds checkpoint image `reference` from the checkpoint directory `dir` (a staged
/// checkpoint, its manifest made while the layers are written; or an unpacked archive, its
/// manifest staged and maybe signed), with layers compressed as `compression`. The files of
/// `dir` are used up. Returns the image's total size.
pub async fn build_from_dir(
    address: &str,
    namespace: &str,
    dir: &Path,
    reference: &str,
    compression: Compression,
    sealing: archive::Sealing,
) -> Result<u64> {
    let options = archive::read_pod_options(dir)?;
    let pod_dump: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join(layout::POD_DUMP))?).unwrap_or_default();
    let pod_name = pod_dump["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let pod_namespace = pod_dump["metadata"]["namespace"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let mut store = ImageStoreClient::connect(address, namespace).await?;
    if store.get(reference).await?.is_some() {
        bail!("image {reference} already exists; remove it first (`ctr -n {namespace} images rm {reference}`) or choose another reference");
    }
    let result = async {
        store.take_lease().await?;
        let (parts, base_images) = layer_parts(dir, &options, &pod_name)?;
        let (layers, diff_ids, mut total) =
            write_layers(&store, parts, compression, sealing, dir).await?;
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
        let about = ImageAbout {
            pod_name: &pod_name,
            pod_namespace: &pod_namespace,
            options: &options,
            base_images: &base_images,
            size: total,
        };
        let manifest = image_manifest(&config, layers, &about)?;
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

/// Writes the layers of `parts` into the content store, each file read once: the containers'
/// first, their files summed, then the pod's (the first part), which ends with the manifest
/// of them all. Listed in the parts' order (the pod's first, as readers expect), with their
/// diff ids and total size.
async fn write_layers(
    store: &ImageStoreClient,
    parts: Vec<LayerPart>,
    compression: Compression,
    sealing: archive::Sealing,
    dir: &Path,
) -> Result<(Vec<OciDescriptor>, Vec<String>, u64)> {
    let media = layer_media_type(compression);
    let mut sums = archive::Sums::default();
    let mut built: Vec<Option<(Descriptor, Option<String>)>> = parts.iter().map(|_| None).collect();
    let mut order: Vec<usize> = (1..parts.len()).collect();
    order.push(0);
    for i in order {
        let part = &parts[i];
        let (root, under, skip) = (part.root.clone(), part.under.clone(), part.skip.clone());
        // The pod's layer carries every sum so far and ends with the manifest.
        let last = (i == 0).then(|| {
            (
                std::mem::take(&mut sums),
                sealing.clone(),
                dir.to_path_buf(),
            )
        });
        let (d, (diff, got)) = store
            .write_blob(&media, HashMap::new(), move |sink| {
                tar_layer(sink, compression, move |tar| {
                    let mut s = archive::Sums::default();
                    archive::tar_tree(
                        &root,
                        &under,
                        &|n| skip.iter().any(|k| k == n),
                        tar,
                        &mut s,
                    )?;
                    let Some((mut all, sealing, dir)) = last else {
                        return Ok(s);
                    };
                    all.merge(s);
                    archive::finish_manifest(tar, all, &sealing, &dir)?;
                    Ok(archive::Sums::default())
                })
            })
            .await?;
        sums.merge(got);
        built[i] = Some((d, diff));
    }
    let (mut layers, mut diff_ids, mut total) = (Vec::new(), Vec::new(), 0u64);
    for (part, b) in parts.into_iter().zip(built) {
        let (d, diff) = b.context("a layer was not written")?;
        total += d.size as u64;
        diff_ids.push(diff.unwrap_or_else(|| d.digest.clone()));
        layers.push(OciDescriptor {
            media_type: d.media_type,
            digest: d.digest,
            size: d.size,
            annotations: part.annotations,
        });
    }
    Ok((layers, diff_ids, total))
}

/// The media type of every layer of a checkpoint image.
pub(super) fn layer_media_type(compression: Compression) -> String {
    match compression {
        Compression::None => LAYER_TYPE.to_string(),
        Compression::Gzip => format!("{LAYER_TYPE}+gzip"),
        Compression::Zstd => format!("{LAYER_TYPE}+zstd"),
    }
}

/// The layers of the checkpoint in `dir`: the pod's own files (everything at the top but the
/// container directories), then one per container as checkpointctl reads it; and the base
/// image each container's `config.dump` records.
pub(super) fn layer_parts(
    dir: &Path,
    options: &PodOptions,
    pod_name: &str,
) -> Result<(Vec<LayerPart>, BTreeMap<String, String>)> {
    let mut parts = vec![LayerPart {
        root: dir.to_path_buf(),
        under: PathBuf::new(),
        skip: options.containers.values().map(|d| d.into()).collect(),
        annotations: BTreeMap::from([(LAYER_PART_ANNOTATION.to_string(), "pod".to_string())]),
    }];
    let mut base_images = BTreeMap::new();
    for (name, cdir) in &options.containers {
        let cpath = dir.join(cdir);
        let recorded: Option<layout::CheckpointedConfig> =
            std::fs::read(cpath.join(layout::CONFIG_DUMP))
                .ok()
                .and_then(|b| layout::parse_json(layout::CONFIG_DUMP, &b).ok());
        if let Some(r) = &recorded {
            base_images.insert(name.clone(), r.rootfs_image_ref.clone());
        }
        parts.push(LayerPart {
            root: cpath,
            under: PathBuf::from(cdir),
            skip: Vec::new(),
            annotations: BTreeMap::from([
                (LAYER_PART_ANNOTATION.to_string(), "container".to_string()),
                (CONTAINER_DIR_ANNOTATION.to_string(), cdir.clone()),
                (CRIO_NAME_ANNOTATION.to_string(), name.clone()),
                (CRIU_NAME_ANNOTATION.to_string(), name.clone()),
                (CRIU_POD_ANNOTATION.to_string(), pod_name.to_string()),
                (CRIU_ENGINE_ANNOTATION.to_string(), "stasis".to_string()),
            ]),
        });
    }
    Ok((parts, base_images))
}

/// What the image manifest's annotations say of the pod.
pub(super) struct ImageAbout<'a> {
    pub(super) pod_name: &'a str,
    pub(super) pod_namespace: &'a str,
    pub(super) options: &'a PodOptions,
    pub(super) base_images: &'a BTreeMap<String, String>,
    /// Bytes of the layers.
    pub(super) size: u64,
}

/// The OCI manifest of a checkpoint image: its config, its layers, and the annotations that
/// mark it a pod checkpoint (stasis's own, read by `inspect` and restore).
pub(super) fn image_manifest(
    config: &Descriptor,
    layers: Vec<OciDescriptor>,
    about: &ImageAbout<'_>,
) -> Result<OciManifest> {
    let containers: Vec<String> = about.options.containers.keys().cloned().collect();
    Ok(OciManifest {
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
            (POD_NAME_ANNOTATION.to_string(), about.pod_name.to_string()),
            (
                POD_NAMESPACE_ANNOTATION.to_string(),
                about.pod_namespace.to_string(),
            ),
            (
                ENGINE_ANNOTATION.to_string(),
                about.options.engine().to_string(),
            ),
            (CONTAINERS_ANNOTATION.to_string(), containers.join(",")),
            (
                BASE_IMAGES_ANNOTATION.to_string(),
                serde_json::to_string(about.base_images)?,
            ),
            (CREATED_ANNOTATION.to_string(), now_rfc3339()),
            (SIZE_ANNOTATION.to_string(), about.size.to_string()),
        ]),
        layers,
    })
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
        Ok(_) => {
            let staged = archive::Sealing::Staged;
            build_from_dir(address, namespace, &work, reference, compression, staged).await
        }
        Err(e) => Err(e.context(format!("cannot build an image from {}", file.display()))),
    };
    let _ = std::fs::remove_dir_all(&work);
    result
}

pub(super) fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// The tar that `body` makes into `w`, compressed; returns the diff id (SHA-256 of the
/// uncompressed tar; none for an uncompressed layer, whose diff id is the blob's own digest,
/// which containerd computes as it writes it) and what `body` returned.
pub(super) fn tar_layer<T>(
    w: &mut ContentSink,
    compression: Compression,
    body: impl FnOnce(&mut tar::Builder<&mut dyn Write>) -> Result<T>,
) -> Result<(Option<String>, T)> {
    Ok(match compression {
        Compression::None => (None, tar_into(w, body)?.1),
        Compression::Gzip => {
            let enc = flate2::write::GzEncoder::new(w, flate2::Compression::fast());
            let (enc, diff, t) = tar_hashed(enc, body)?;
            enc.finish()?;
            (Some(diff), t)
        }
        Compression::Zstd => {
            let mut enc = zstd::Encoder::new(w, 3)?;
            enc.include_checksum(true)?;
            let (enc, diff, t) = tar_hashed(enc, body)?;
            enc.finish()?;
            (Some(diff), t)
        }
    })
}

/// The tar that `body` makes into `w`.
fn tar_into<W: Write, T>(
    mut w: W,
    body: impl FnOnce(&mut tar::Builder<&mut dyn Write>) -> Result<T>,
) -> Result<(W, T)> {
    let t = {
        let mut tar = tar::Builder::new(&mut w as &mut dyn Write);
        tar.follow_symlinks(false);
        // Modes as they are: page images and configs stay 0600 wherever they are unpacked.
        tar.mode(tar::HeaderMode::Complete);
        let t = body(&mut tar)?;
        tar.finish()?;
        t
    };
    w.flush()?;
    Ok((w, t))
}

/// The tar that `body` makes into `w`, hashed as it is written.
fn tar_hashed<W: Write, T>(
    w: W,
    body: impl FnOnce(&mut tar::Builder<&mut dyn Write>) -> Result<T>,
) -> Result<(W, String, T)> {
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
    let (h, t) = tar_into(
        Hashing {
            inner: w,
            hasher: sha2::Sha256::new(),
        },
        body,
    )?;
    Ok((
        h.inner,
        format!("sha256:{}", hex::encode(h.hasher.finalize())),
        t,
    ))
}

/// The manifest of checkpoint image `reference` (pulled first when missing and `pull` says
/// how), refused unless it is a stasis pod checkpoint.
pub(super) async fn checkpoint_manifest(
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

#[cfg(test)]
mod tests {
    use super::*;

    fn checkpoint(root: &Path) -> PodOptions {
        let c = root.join("abc-web");
        std::fs::create_dir_all(c.join("checkpoint")).unwrap();
        std::fs::write(
            root.join("pod.options"),
            r#"{"version":1,"containers":{"web":"abc-web"},"annotations":{"io.stasis.engine":"runc"}}"#,
        )
        .unwrap();
        std::fs::write(root.join("pod.dump"), "{}").unwrap();
        std::fs::write(root.join("manifest.json"), "{}").unwrap();
        std::fs::write(
            c.join("config.dump"),
            r#"{"id":"abc","rootfsImageRef":"reg/busybox@sha256:00"}"#,
        )
        .unwrap();
        std::fs::write(c.join("spec.dump"), "{}").unwrap();
        PodOptions::read(root).unwrap()
    }

    #[test]
    fn the_pod_and_each_container_get_a_layer_of_their_own() {
        let root = std::env::temp_dir().join(format!("stasis-image-parts-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        let options = checkpoint(&root);
        let (parts, base_images) = layer_parts(&root, &options, "web-pod").unwrap();
        assert_eq!(parts.len(), 2);
        // The container directory is not in the pod's layer.
        assert_eq!(parts[0].skip, [std::ffi::OsString::from("abc-web")]);
        assert_eq!(parts[1].under, PathBuf::from("abc-web"));
        assert_eq!(parts[0].annotations[LAYER_PART_ANNOTATION], "pod");
        let c = &parts[1];
        assert_eq!(c.root, root.join("abc-web"));
        assert_eq!(c.annotations[CONTAINER_DIR_ANNOTATION], "abc-web");
        // What CRI-O and checkpointctl look for on a container checkpoint layer.
        assert_eq!(c.annotations[CRIO_NAME_ANNOTATION], "web");
        assert_eq!(c.annotations[CRIU_POD_ANNOTATION], "web-pod");
        assert_eq!(base_images["web"], "reg/busybox@sha256:00");
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn the_manifest_marks_a_pod_checkpoint() {
        let root = std::env::temp_dir().join(format!("stasis-image-man-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        let options = checkpoint(&root);
        let config = Descriptor {
            media_type: CONFIG_TYPE.into(),
            digest: "sha256:c0".into(),
            size: 120,
            ..Default::default()
        };
        let base = BTreeMap::from([("web".to_string(), "reg/b@sha256:00".to_string())]);
        let about = ImageAbout {
            pod_name: "web-pod",
            pod_namespace: "shop",
            options: &options,
            base_images: &base,
            size: 4096,
        };
        let m = image_manifest(&config, Vec::new(), &about).unwrap();
        assert_eq!(
            (m.schema_version, m.media_type.as_str()),
            (2, MANIFEST_TYPE)
        );
        assert_eq!(m.config.digest, "sha256:c0");
        assert_eq!(
            m.annotations[CHECKPOINT_ANNOTATION],
            layout::MANIFEST_VERSION.to_string()
        );
        assert_eq!(m.annotations[POD_NAME_ANNOTATION], "web-pod");
        assert_eq!(m.annotations[ENGINE_ANNOTATION], "runc");
        assert_eq!(m.annotations[CONTAINERS_ANNOTATION], "web");
        assert_eq!(m.annotations[SIZE_ANNOTATION], "4096");
        assert_eq!(
            m.annotations[BASE_IMAGES_ANNOTATION],
            r#"{"web":"reg/b@sha256:00"}"#
        );
        assert_eq!(
            layer_media_type(Compression::Zstd),
            format!("{LAYER_TYPE}+zstd")
        );
        let _ = std::fs::remove_dir_all(&root);
    }
}
