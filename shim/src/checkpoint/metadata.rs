//! The metadata a pod checkpoint writes after the thaw: per container checkpointctl's files
//! (`config.dump`, `spec.dump`, `status.dump`), the CRI config and stasis's `stasis.json`;
//! for the pod `pod.options` and `pod.dump`. Types and names come from `stasis_api::layout`.

use std::{path::Path, time::Duration};

use stasis_api::{
    checkpoint::{ContainerInfo, ContainerResult, Timings as WireTimings},
    layout::{
        CheckpointedConfig, ContainerMeta, PodOptions, CHECKPOINT_DIR, CONFIG_DUMP,
        CONTAINER_CONFIG, CONTAINER_META, ENGINE_ANNOTATION, LAST_PID_ANNOTATION, POD_DUMP,
        POD_OPTIONS, POD_OPTIONS_VERSION, ROOTFS_DIFF, SANDBOX_ID_ANNOTATION, SPEC_DUMP,
        STATUS_DUMP,
    },
};

use crate::{
    error::{Error, Result},
    runtime::{ContainerTarget, Timings},
    spec::CRI_IMAGE_NAME,
    state::Pod,
    util::dir_size,
};

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn rfc3339(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// The container's name as the caller gave it, else its id.
pub fn name_of(target_id: &str, info: &ContainerInfo) -> String {
    if info.name.is_empty() {
        target_id.to_string()
    } else {
        info.name.clone()
    }
}

/// A directory name safe for any container name.
pub fn dir_name(id: &str, name: &str) -> String {
    let clean: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if clean.is_empty() {
        id.to_string()
    } else {
        format!("{id}-{clean}")
    }
}

/// One container's files; returns what the Checkpoint service reports of it.
pub fn write_container(
    c: &ContainerTarget,
    info: &ContainerInfo,
    t: &Timings,
    leave_running: bool,
    engine: &str,
) -> Result<ContainerResult> {
    let id = &c.id;
    let write = |name: &str, data: &[u8]| {
        crate::util::write_private(&c.dir.join(name), data)
            .map_err(|e| Error::io(id, format!("write {name}"), e))
    };
    let now = rfc3339(time::OffsetDateTime::now_utc());
    let name = name_of(id, info);
    let image = if info.image.is_empty() {
        c.spec
            .annotation(CRI_IMAGE_NAME)
            .unwrap_or_default()
            .to_string()
    } else {
        info.image.clone()
    };
    let config = checkpointed_config(id, &name, &image, info, &now);
    write(
        CONFIG_DUMP,
        &serde_json::to_vec(&config).unwrap_or_default(),
    )?;
    write(
        SPEC_DUMP,
        &serde_json::to_vec_pretty(c.spec.document()).unwrap_or_default(),
    )?;
    let status = if info.status_json.is_empty() {
        serde_json::json!({"id": id, "metadata": {"name": name}, "image": {"image": image}})
            .to_string()
    } else {
        info.status_json.clone()
    };
    write(STATUS_DUMP, status.as_bytes())?;
    if !info.config_json.is_empty() {
        write(CONTAINER_CONFIG, info.config_json.as_bytes())?;
    }
    let checkpoint_bytes = dir_size(&c.dir.join(CHECKPOINT_DIR));
    let rootfs_diff_bytes = std::fs::metadata(c.dir.join(ROOTFS_DIFF))
        .map(|m| m.len())
        .unwrap_or(0);
    let meta = ContainerMeta {
        engine: engine.to_string(),
        container_id: id.clone(),
        name: name.clone(),
        image,
        checkpointed_at: now,
        leave_running,
        was_paused: c.paused,
        frozen_ms: ms(t.frozen),
        dump_ms: ms(t.dump),
        rootfs_ms: ms(t.files),
        checkpoint_bytes,
        rootfs_diff_bytes,
    };
    write(
        CONTAINER_META,
        &serde_json::to_vec_pretty(&meta).unwrap_or_default(),
    )?;
    Ok(ContainerResult {
        id: id.clone(),
        name,
        directory: c
            .dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        timings: Some(WireTimings {
            frozen_ms: ms(t.frozen),
            dump_ms: ms(t.dump),
            rootfs_ms: ms(t.files),
            total_ms: ms(t.dump + t.files),
            ..Default::default()
        })
        .into(),
        checkpoint_bytes,
        rootfs_diff_bytes,
        was_paused: c.paused,
        ..Default::default()
    })
}

/// The container's `config.dump`, as CRI's checkpoint tools read it.
fn checkpointed_config(
    id: &str,
    name: &str,
    image: &str,
    info: &ContainerInfo,
    now: &str,
) -> CheckpointedConfig {
    CheckpointedConfig {
        id: id.to_string(),
        name: name.to_string(),
        rootfs_image: image.to_string(),
        rootfs_image_ref: info.image_ref.clone(),
        rootfs_image_name: image.to_string(),
        runtime: "io.containerd.stasis.v2".into(),
        created_time: if info.created_at.is_empty() {
            now.to_string()
        } else {
            info.created_at.clone()
        },
        checkpointed_time: now.to_string(),
        restored_time: "0001-01-01T00:00:00Z".into(),
        restored: false,
    }
}

/// `pod.options` and `pod.dump`.
pub fn write_pod(
    out: &Path,
    pod: &Pod,
    containers: &[(String, &ContainerTarget)],
    engine: &str,
    last_pid: Option<u32>,
) -> Result<()> {
    let mut options = PodOptions {
        version: POD_OPTIONS_VERSION,
        ..Default::default()
    };
    for (name, c) in containers {
        let dir = c
            .dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        options.containers.insert(name.clone(), dir);
    }
    options
        .annotations
        .insert(ENGINE_ANNOTATION.into(), engine.into());
    options
        .annotations
        .insert(SANDBOX_ID_ANNOTATION.into(), pod.id.clone());
    if let Some(last) = last_pid {
        // Annotations are strings (checkpointctl's convention).
        options
            .annotations
            .insert(LAST_PID_ANNOTATION.into(), last.to_string());
    }
    crate::util::write_private(&out.join(POD_OPTIONS), options.to_json())
        .map_err(|e| Error::io(&pod.id, "write pod.options", e))?;
    let dump = serde_json::to_vec_pretty(&pod.config)
        .map_err(|e| Error::other(&pod.id, "encode pod.dump", e))?;
    crate::util::write_private(&out.join(POD_DUMP), dump)
        .map_err(|e| Error::io(&pod.id, "write pod.dump", e))
}
