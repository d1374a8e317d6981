use super::*;

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

pub(super) fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// The tar of `entries` (names below `root`) into `w`, compressed; returns the diff id
/// (SHA-256 of the uncompressed tar).
pub(super) fn tar_layer(
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
pub(super) fn tar_entries<W: Write>(w: W, root: &Path, entries: &[PathBuf]) -> Result<(W, String)> {
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
