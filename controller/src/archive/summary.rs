use super::*;

/// What `stasisctl inspect` shows of one container.
#[derive(Debug, Serialize)]
pub struct ContainerSummary {
    pub name: String,
    pub directory: String,
    pub id: String,
    pub image: String,
    pub engine: String,
    pub checkpointed: String,
    pub frozen_ms: f64,
    pub checkpoint_bytes: u64,
    pub rootfs_diff_bytes: u64,
    pub was_paused: bool,
}

#[derive(Debug, Default, Serialize)]
pub struct Summary {
    pub archive: String,
    pub archive_bytes: u64,
    /// Encrypted (age); without an identity nothing else is known.
    pub encrypted: bool,
    /// The key the archive says signed it (checked only by `pod restore --verify-key`).
    pub signed_by: Option<String>,
    pub pod_name: String,
    pub pod_namespace: String,
    pub engine: String,
    /// Size of the one image of a runtime that saves whole sandboxes (`sandbox/`), else 0.
    pub sandbox_image_bytes: u64,
    pub containers: Vec<ContainerSummary>,
    /// What the pod and container configs ask for beyond an ordinary pod (host paths included).
    pub requests: Vec<crate::policy::Request>,
    /// Those of `requests` this node's restore policy refuses (as `pod restore` would,
    /// without the operator's flags).
    pub refused: Vec<crate::policy::Request>,
}

/// Reads the metadata of an archive without unpacking the images.
pub fn inspect(path: &Path) -> Result<Summary> {
    inspect_with(path, &Opening::default())
}

/// [`inspect`]; an encrypted archive shows only that, unless `opening` can decrypt it.
pub fn inspect_with(path: &Path, opening: &Opening) -> Result<Summary> {
    let encrypted = is_encrypted(path)?;
    if encrypted && opening.identities.is_empty() {
        return Ok(Summary {
            archive: path.display().to_string(),
            archive_bytes: std::fs::metadata(path)?.len(),
            encrypted,
            ..Default::default()
        });
    }
    let file = open_archive(path)?;
    check_bounds(&file, u64::MAX, opening)?;
    let mut files: std::collections::HashMap<String, Vec<u8>> = Default::default();
    let mut sizes: std::collections::HashMap<String, u64> = Default::default();
    let mut held = 0u64;
    let mut tar = tar::Archive::new(open_file(rewound(&file)?, opening)?);
    for entry in tar.entries().context("read archive")? {
        let mut entry =
            entry.map_err(|e| anyhow::anyhow!("archive is truncated or corrupt: {e}"))?;
        let p = safe_path(&entry)?;
        let key = p.display().to_string();
        if let Some(part) = memory_part(&p) {
            *sizes.entry(part).or_default() += entry.size();
        }
        if wanted_for_summary(&p, entry.size()) {
            // Bounded memory whatever the archive holds: only the metadata files of the pod
            // and of each container directory, each small, all together bounded.
            held += entry.size();
            if held > MAX_SUMMARY_BYTES {
                bail!(
                    "hostile archive: more than {} of metadata files",
                    human(MAX_SUMMARY_BYTES)
                );
            }
            let mut buf = Vec::new();
            entry.read_to_end(&mut buf)?;
            files.insert(key, buf);
        }
    }
    summarize(
        files,
        sizes,
        path.display().to_string(),
        std::fs::metadata(path)?.len(),
        encrypted,
    )
}

/// The most of an archive's metadata files `inspect` holds at once.
pub(super) const MAX_SUMMARY_BYTES: u64 = 64 << 20;

/// The metadata kept of each file while inspecting: its contents when it is one of these,
/// where the layout puts them (the pod's at the top, a container's one level below).
pub(super) fn wanted_for_summary(p: &Path, size: u64) -> bool {
    let name = p
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let depth = p.components().count();
    let pod = matches!(
        name.as_str(),
        layout::POD_OPTIONS | layout::SIGNATURE | layout::POD_DUMP
    ) && depth == 1;
    let container = matches!(
        name.as_str(),
        layout::CONFIG_DUMP | layout::CONTAINER_META | layout::CONTAINER_CONFIG
    ) && depth == 2;
    (pod || container) && size < 4 << 20
}

/// The part of the pod's memory a file counts for (its container directory, or the sandbox).
pub(super) fn memory_part(p: &Path) -> Option<String> {
    let top = p
        .components()
        .next()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .unwrap_or_default();
    (p.components()
        .nth(1)
        .map(|c| c.as_os_str() == "checkpoint")
        .unwrap_or(false)
        || top == "sandbox")
        .then_some(top)
}

/// [`inspect`] of an unpacked (and checked) checkpoint directory, named `archive`.
pub fn inspect_dir(dir: &Path, archive: String, archive_bytes: u64) -> Result<Summary> {
    let mut files: std::collections::HashMap<String, Vec<u8>> = Default::default();
    let mut sizes: std::collections::HashMap<String, u64> = Default::default();
    for rel in regular_files(dir)? {
        let size = std::fs::symlink_metadata(dir.join(&rel))?.len();
        if let Some(part) = memory_part(&rel) {
            *sizes.entry(part).or_default() += size;
        }
        if wanted_for_summary(&rel, size) {
            files.insert(rel.display().to_string(), std::fs::read(dir.join(&rel))?);
        }
    }
    if dir.join(layout::SIGNATURE).is_file() {
        files.insert(
            layout::SIGNATURE.to_string(),
            std::fs::read(dir.join(layout::SIGNATURE))?,
        );
    }
    summarize(files, sizes, archive, archive_bytes, false)
}

pub(super) fn summarize(
    files: std::collections::HashMap<String, Vec<u8>>,
    sizes: std::collections::HashMap<String, u64>,
    archive: String,
    archive_bytes: u64,
    encrypted: bool,
) -> Result<Summary> {
    let options = PodOptions::parse(
        files
            .get(layout::POD_OPTIONS)
            .context("archive has no pod.options")?,
    )?;
    let file = |name: &str| files.get(name).map(Vec::as_slice);
    let (pod, mut unknown) =
        records::parse_pod_dump(file(layout::POD_DUMP).context("archive has no pod.dump")?)?;
    // What `pod restore` would refuse before its policy check: unknown keys, and the
    // runtime handler the archive names (checked unless the operator names one).
    if let Some(h) = options.annotations.get(layout::RUNTIME_HANDLER_ANNOTATION) {
        unknown.push(crate::policy::runtime_handler(h, "the archive"));
    }
    let mut containers = Vec::new();
    let mut configs = Vec::new();
    for (name, dir) in &options.containers {
        let (config, more) = records::parse_container_config(
            name,
            file(&format!("{dir}/{}", layout::CONTAINER_CONFIG)),
        )?;
        unknown.extend(more);
        configs.push((name.clone(), config));
        containers.push(container_summary(&files, &sizes, &options, (name, dir))?);
    }
    let signed_by = match files.get(layout::SIGNATURE) {
        Some(text) => Some(seal::fingerprint(&seal::signer(text)?)),
        None => None,
    };
    Ok(Summary {
        archive,
        archive_bytes,
        encrypted,
        signed_by,
        pod_name: pod
            .metadata
            .as_ref()
            .map(|m| m.name.clone())
            .unwrap_or_default(),
        pod_namespace: pod
            .metadata
            .as_ref()
            .map(|m| m.namespace.clone())
            .unwrap_or_default(),
        engine: options.engine().to_string(),
        sandbox_image_bytes: sizes.get("sandbox").copied().unwrap_or(0),
        containers,
        requests: {
            let mut r = crate::policy::requests(&pod, &configs);
            r.append(&mut unknown);
            r
        },
        refused: Vec::new(),
    })
}

/// One container's line of the summary: what its `config.dump` records (required, as a
/// restore requires it) and its `stasis.json` (optional: archives of other tools lack it).
fn container_summary(
    files: &std::collections::HashMap<String, Vec<u8>>,
    sizes: &std::collections::HashMap<String, u64>,
    options: &PodOptions,
    (name, dir): (&str, &str),
) -> Result<ContainerSummary> {
    let config: CheckpointedConfig = layout::parse_json(
        layout::CONFIG_DUMP,
        files
            .get(&format!("{dir}/{}", layout::CONFIG_DUMP))
            .with_context(|| format!("container {name}: no config.dump"))?,
    )
    .with_context(|| format!("container {name}"))?;
    let meta: Option<ContainerMeta> = files
        .get(&format!("{dir}/{}", layout::CONTAINER_META))
        .and_then(|b| layout::parse_json(layout::CONTAINER_META, b).ok());
    let meta_or_default = meta.clone().unwrap_or_default();
    Ok(ContainerSummary {
        name: name.to_string(),
        directory: dir.to_string(),
        id: config.id,
        image: config.rootfs_image_name,
        engine: meta
            .as_ref()
            .map(|m| m.engine.clone())
            .unwrap_or_else(|| options.engine().to_string()),
        checkpointed: config.checkpointed_time,
        frozen_ms: meta_or_default.frozen_ms,
        checkpoint_bytes: meta
            .as_ref()
            .map(|m| m.checkpoint_bytes)
            .unwrap_or_else(|| sizes.get(dir).copied().unwrap_or(0)),
        rootfs_diff_bytes: meta_or_default.rootfs_diff_bytes,
        was_paused: meta_or_default.was_paused,
    })
}
