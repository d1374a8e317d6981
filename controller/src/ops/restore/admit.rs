//! What a checkpoint asks for, read and judged before anything is created: the pod's and
//! each container's CRI config (as containerd writes them; unknown keys are requests no
//! policy allows), the runtime handler, host volumes, base images.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use stasis_api::{
    layout::{self, PodOptions},
    RESTORE_ANNOTATION,
};

use super::RestoreArgs;
use crate::{
    archive::records,
    cri::{self, api},
    image::RegistryAccess,
    ops::Target,
    policy::{self, Policy, Request},
    progress,
};

/// A restore that passed every check, ready to be created.
pub(super) struct Admitted {
    /// The restore directory, resolved.
    pub dir: PathBuf,
    pub pod: api::PodSandboxConfig,
    /// Each container's name and config, in the order they are created.
    pub configs: Vec<(String, api::ContainerConfig)>,
    pub handler: String,
    /// The backend that wrote the checkpoint.
    pub engine: String,
}

/// Reads the checkpoint unpacked in `dir` and checks what it asks for against the node's
/// policy; names the new pod and points it and its containers at restore `restore_id`
/// (the pod carries the claim `token`).
pub(super) async fn admit(
    t: &Target,
    a: &RestoreArgs,
    dir: &Path,
    options: &PodOptions,
    (restore_id, token): (&str, &str),
) -> Result<Admitted> {
    let dir = dir.canonicalize()?;
    let (mut pod, mut configs, mut unknown) = read_configs(&dir, options, restore_id)?;
    let (handler, named_by) = choose_handler(a, options);
    let channel = cri::channel(Path::new(&t.address)).await?;
    let mut rt = cri::Runtime::new(channel.clone());
    // The archive is untrusted: what it asks for is checked before anything is created.
    let mut requests = policy::requests(&pod, &configs);
    requests.append(&mut unknown);
    let mut policy = a.policy.clone();
    if let Some(by) = named_by {
        requests.push(policy::runtime_handler(&handler, by));
        if policy.runtime_handlers.is_none() {
            let known = cri::stasis_handlers(&mut rt).await?;
            policy.learn_runtime_handlers(known);
        }
    }
    policy.check(&requests)?;
    check_volume_targets(&dir, options, &configs, a.replace_volumes)?;
    // A container that brings back a volume swaps a new directory in for the host's: every
    // container mounting that directory must be created after that, so those come first.
    configs.sort_by_key(|(_, c)| !c.annotations.contains_key(layout::VOLUMES_ANNOTATION));
    name_pod(&mut pod, a.name.as_deref(), restore_id, token);
    check_base_images(
        &mut cri::Images::new(channel.clone()),
        &configs,
        (&a.registry, &policy),
    )
    .await?;
    Ok(Admitted {
        dir,
        pod,
        configs,
        handler,
        engine: options.engine().to_string(),
    })
}

type Configs = (
    api::PodSandboxConfig,
    Vec<(String, api::ContainerConfig)>,
    Vec<Request>,
);

/// The pod's and each container's CRI config, read as containerd writes CRI types (zero
/// values may be left out), with the keys the field table does not know; each container
/// pointed at its directory of restore `restore_id` and at the base image it was
/// checkpointed on.
fn read_configs(dir: &Path, options: &PodOptions, restore_id: &str) -> Result<Configs> {
    let (pod, mut unknown) = records::parse_pod_dump(&std::fs::read(dir.join("pod.dump"))?)?;
    let mut configs = Vec::new();
    for (name, cdir) in &options.containers {
        let path = dir.join(cdir).join("container-config.json");
        let text = std::fs::read(&path).ok();
        let (mut config, more) = records::parse_container_config(name, text.as_deref())?;
        unknown.extend(more);
        config.annotations.insert(
            RESTORE_ANNOTATION.to_string(),
            format!("{restore_id}/{cdir}"),
        );
        pin_base_image(&mut config, &dir.join(cdir))
            .with_context(|| format!("container {name}"))?;
        configs.push((name.clone(), config));
    }
    Ok((pod, configs, unknown))
}

/// The base image is the one the checkpoint was taken on (its digest), never whatever its
/// tag names today: the rootfs diff and the memory belong to that image.
fn pin_base_image(config: &mut api::ContainerConfig, container_dir: &Path) -> Result<()> {
    let recorded: layout::CheckpointedConfig = layout::parse_json(
        "config.dump",
        &std::fs::read(container_dir.join(layout::CONFIG_DUMP))?,
    )?;
    if !recorded.rootfs_image_ref.is_empty() {
        let image = config.image.get_or_insert_with(Default::default);
        if image.user_specified_image.is_empty() {
            image.user_specified_image = image.image.clone();
        }
        image.image = recorded.rootfs_image_ref.clone();
    }
    Ok(())
}

/// The runtime handler of the new pod, and who named it when the policy must judge it.
fn choose_handler(a: &RestoreArgs, options: &PodOptions) -> (String, Option<&'static str>) {
    let recorded = options.annotations.get(layout::RUNTIME_HANDLER_ANNOTATION);
    match (&a.runtime_handler, &a.offered_runtime_handler, recorded) {
        (Some(h), _, _) => (h.clone(), None),
        (None, Some(h), _) => (h.clone(), Some("the migration peer")),
        (None, None, Some(h)) => {
            progress::step(
                "admitted",
                format!("runtime handler {h} (the one the pod ran under)"),
            );
            (h.clone(), Some("the archive"))
        }
        (None, None, None) => ("stasis".to_string(), None),
    }
}

/// The new pod's name (`--name`, else the checkpointed one), a fresh uid, and the
/// annotations that point it at its restore.
fn name_pod(pod: &mut api::PodSandboxConfig, name: Option<&str>, restore_id: &str, token: &str) {
    let md = pod.metadata.get_or_insert_with(Default::default);
    if let Some(n) = name {
        md.name = n.to_string();
    }
    md.uid = format!("{}-restored-{}", md.uid, std::process::id());
    md.attempt = 0;
    // The pod itself names the checkpoint too: a runtime that restores whole sandboxes
    // (gVisor) brings the pod back at its start, and every runtime refuses an archive of
    // another backend before any container exists.
    pod.annotations
        .insert(RESTORE_ANNOTATION.to_string(), restore_id.to_string());
    pod.annotations.insert(
        layout::RESTORE_TOKEN_ANNOTATION.to_string(),
        token.to_string(),
    );
}

/// Every base image, by the digest its checkpoint recorded, must be on this node.
pub(super) async fn check_base_images(
    images: &mut cri::Images,
    configs: &[(String, api::ContainerConfig)],
    (registry, policy): (&RegistryAccess, &Policy),
) -> Result<()> {
    let mut missing = Vec::new();
    for (name, c) in configs {
        let Some(spec) = &c.image else { continue };
        let found = images
            .image_status(api::ImageStatusRequest {
                image: Some(api::ImageSpec {
                    image: spec.image.clone(),
                    ..Default::default()
                }),
                verbose: false,
            })
            .await
            .with_context(|| format!("look up the base image of container {name}"))?
            .into_inner()
            .image
            .is_some();
        if found {
            continue;
        }
        // Recorded as NAME@DIGEST: exactly that image can be pulled (never what a tag
        // names today).
        let why = if spec.image.contains('@') {
            policy.check_registry(name, &spec.image)?;
            progress::step(
                "pulling",
                format!("pulling base image {} for container {name}", spec.image),
            );
            let auth = registry
                .credentials_for(&spec.image)?
                .map(|(username, password)| api::AuthConfig {
                    username,
                    password,
                    ..Default::default()
                });
            match images
                .pull_image(api::PullImageRequest {
                    image: Some(api::ImageSpec {
                        image: spec.image.clone(),
                        ..Default::default()
                    }),
                    auth,
                    sandbox_config: None,
                })
                .await
            {
                Ok(_) => continue,
                Err(s) => format!("pulling it failed: {}", s.message()),
            }
        } else {
            "recorded without a digest, so it cannot be pulled".to_string()
        };
        missing.push(format!(
            "container {name}: {} ({}): {why}",
            spec.image, spec.user_specified_image
        ));
    }
    if !missing.is_empty() {
        bail!(
            "base images the checkpoint was taken on are not on this node:\n  - {}\nnothing was created",
            missing.join("\n  - ")
        );
    }
    Ok(())
}

/// Captured volume contents go back into empty host directories only, unless the operator
/// says `--replace-volumes`: a host directory is never wiped silently.
pub(super) fn check_volume_targets(
    dir: &Path,
    options: &PodOptions,
    configs: &[(String, api::ContainerConfig)],
    replace: bool,
) -> Result<()> {
    let mut full = Vec::new();
    for (name, config) in configs {
        let Some(cdir) = options.containers.get(name) else {
            continue;
        };
        let index = dir
            .join(cdir)
            .join(stasis_api::layout::CHECKPOINT_DIR)
            .join(stasis_api::layout::VOLUMES_INDEX);
        let Ok(text) = std::fs::read(&index) else {
            continue;
        };
        let captured: Vec<stasis_api::layout::CapturedVolume> = serde_json::from_slice(&text)
            .with_context(|| format!("container {name}: {} is not valid", index.display()))?;
        for v in captured {
            let Some(m) = config
                .mounts
                .iter()
                .find(|m| Path::new(&m.container_path) == Path::new(&v.destination))
            else {
                continue;
            };
            let host = Path::new(&m.host_path);
            let non_empty = std::fs::read_dir(host)
                .map(|mut d| d.next().is_some())
                .unwrap_or(false);
            if non_empty {
                full.push(format!(
                    "container {name}: {} (mounted at {})",
                    m.host_path, v.destination
                ));
            }
        }
    }
    if full.is_empty() || replace {
        return Ok(());
    }
    bail!(
        "the archive brings back volume contents, and these host directories are not empty:\n  - {}\nnothing was created; pass --replace-volumes to replace their contents with the checkpointed ones",
        full.join("\n  - ")
    )
}
