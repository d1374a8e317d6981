//! `stasisctl pod …`: list, checkpoint and restore pods.

use std::{
    path::{Path, PathBuf},
    sync::atomic::AtomicBool,
    time::Instant,
};

use anyhow::{bail, Context, Result};
use stasis_api::{
    checkpoint::{
        CheckpointOptions, CheckpointPodRequest, ContainerInfo, FinishCheckpointRequest,
        FinishRestoreRequest, ValidateRestoreRequest,
    },
    layout::PageSource,
    RESTORE_ANNOTATION,
};

use crate::{
    archive::{self, human, Compression},
    cri::{self, api},
    guard::RestoreGuard,
    policy::{self, Policy},
    seal::{self, Opening, Sealing},
    shim,
};

/// Where stasisctl talks to containerd.
pub struct Target {
    pub address: String,
    pub namespace: String,
}

fn ttrpc_ctx(secs: u64) -> ttrpc::context::Context {
    ttrpc::context::with_timeout((secs as i64) * 1_000_000_000)
}

pub async fn ls(t: &Target) -> Result<()> {
    let mut rt = cri::connect(Path::new(&t.address)).await?;
    let pods = rt
        .list_pod_sandbox(api::ListPodSandboxRequest::default())
        .await?
        .into_inner()
        .items;
    println!(
        "{:<14} {:<20} {:<12} {:<10} {:<14} CONTAINERS",
        "POD ID", "NAME", "NAMESPACE", "STATE", "RUNTIME"
    );
    for p in pods {
        let containers = cri::pod_containers(&mut rt, &p.id).await?;
        let list: Vec<String> = containers
            .iter()
            .map(|c| {
                format!(
                    "{}({})",
                    c.metadata.as_ref().map(|m| m.name.as_str()).unwrap_or("?"),
                    cri::state_name(c.state)
                )
            })
            .collect();
        let md = p.metadata.clone().unwrap_or_default();
        let state = if p.state == api::PodSandboxState::SandboxReady as i32 {
            "READY"
        } else {
            "NOTREADY"
        };
        println!(
            "{:<14} {:<20} {:<12} {:<10} {:<14} {}",
            &p.id[..p.id.len().min(13)],
            md.name,
            md.namespace,
            state,
            if p.runtime_handler.is_empty() {
                "(default)"
            } else {
                &p.runtime_handler
            },
            list.join(", ")
        );
    }
    Ok(())
}

pub struct CheckpointArgs {
    pub pod: String,
    pub output: PathBuf,
    pub leave_running: bool,
    pub compress: Compression,
    pub containers: Vec<String>,
    pub tcp_established: bool,
    pub file_locks: bool,
    pub timeout: u32,
    /// Refuse early when the output's file system cannot hold the estimate.
    pub space_check: bool,
    /// Signing key and encryption recipients of the archive.
    pub sealing: Sealing,
    /// What becomes of the captured pod: an archive at `output`, or something else.
    pub delivery: Delivery,
    /// How long the shim holds a stopping checkpoint's pod frozen for us (default: from the
    /// space estimate).
    pub hold_secs: Option<u32>,
    /// Deliver the pod as checkpoint image REF in containerd's image store instead of an
    /// archive at `output`.
    pub image: Option<String>,
}

/// Where a captured pod goes once its files are staged, manifested and signed.
#[derive(Default)]
pub enum Delivery {
    /// Packaged into the archive file `output`.
    #[default]
    Archive,
    /// Handed to this (a migration stream), which returns the bytes it delivered. Success
    /// means the pod's data is safe elsewhere: a stopping checkpoint then stops the pod.
    Custom(Deliver),
}

/// Takes the staged directory (and a cancel flag); returns the bytes it delivered.
pub type Deliver = Box<dyn FnOnce(&Path, &AtomicBool) -> Result<u64> + Send>;

/// What CRI knows of a container, as the Checkpoint service wants it.
async fn container_info(rt: &mut cri::Runtime, c: &api::Container) -> Result<ContainerInfo> {
    let resp = rt
        .container_status(api::ContainerStatusRequest {
            container_id: c.id.clone(),
            verbose: true,
        })
        .await
        .with_context(|| format!("status of container {}", c.id))?
        .into_inner();
    let status = resp.status.clone().unwrap_or_default();
    let info: serde_json::Value = resp
        .info
        .get("info")
        .and_then(|s| serde_json::from_str(s).ok())
        .unwrap_or_default();
    // containerd's verbose info carries the CRI ContainerConfig it was created with: its
    // security settings must come back exactly, so there is no guessing it from the status.
    let config = info.get("config").with_context(|| {
        format!(
            "container {}: containerd's verbose status has no ContainerConfig",
            c.id
        )
    })?;
    let config = config_from_info(config)
        .with_context(|| format!("container {}: containerd's ContainerConfig", c.id))?;
    let config_json = serde_json::to_string(&config)?;
    let created = status.created_at;
    Ok(ContainerInfo {
        id: c.id.clone(),
        name: status
            .metadata
            .as_ref()
            .map(|m| m.name.clone())
            .unwrap_or_default(),
        config_json,
        status_json: serde_json::to_string(&status)?,
        image: status
            .image
            .as_ref()
            .map(|i| i.image.clone())
            .unwrap_or_default(),
        image_ref: status.image_ref.clone(),
        created_at: format_unix_nanos(created),
        ..Default::default()
    })
}

/// containerd marshals the CRI ContainerConfig with Go's `omitempty`: zero values are left
/// out, and the CRI types here want every field. Each missing field gets back the zero value
/// Go dropped: the first of null, "", 0, false, [], {} that its type takes.
pub fn config_from_info(value: &serde_json::Value) -> Result<api::ContainerConfig> {
    from_go_json(value)
}

/// Any CRI type from Go's `omitempty` JSON (see `config_from_info`).
pub fn from_go_json<T: serde::de::DeserializeOwned>(value: &serde_json::Value) -> Result<T> {
    use serde_json::{json, Value};
    let zeros = [
        json!(null),
        json!(""),
        json!(0),
        json!(false),
        json!([]),
        json!({}),
    ];
    let mut v = value.clone();
    let mut tried: std::collections::HashMap<String, usize> = Default::default();
    for _ in 0..10_000 {
        let err = match serde_path_to_error::deserialize::<_, T>(v.clone()) {
            Ok(c) => return Ok(c),
            Err(e) => e,
        };
        let path = err.path().to_string();
        let message = err.inner().to_string();
        if let Some(field) = message
            .strip_prefix("missing field `")
            .and_then(|r| r.split('`').next())
        {
            let full = if path == "." {
                field.to_string()
            } else {
                format!("{path}.{field}")
            };
            let Some(Value::Object(map)) = slot(&mut v, &path) else {
                bail!("{message} at {path}");
            };
            map.insert(field.to_string(), zeros[0].clone());
            tried.insert(full, 0);
        } else if let Some(i) = tried.get(&path).copied() {
            let Some(next) = zeros.get(i + 1) else {
                bail!("{message} at {path}");
            };
            let Some(place) = slot(&mut v, &path) else {
                bail!("{message} at {path}");
            };
            *place = next.clone();
            tried.insert(path, i + 1);
        } else {
            bail!("{message} at {path}");
        }
    }
    bail!("too many missing fields")
}

/// The value at a serde_path_to_error path ("." for the root, "a.b[2].c").
fn slot<'a>(v: &'a mut serde_json::Value, path: &str) -> Option<&'a mut serde_json::Value> {
    if path == "." {
        return Some(v);
    }
    let mut at = v;
    for part in path.split('.') {
        let (key, indexes) = match part.find('[') {
            Some(i) => (&part[..i], &part[i..]),
            None => (part, ""),
        };
        if !key.is_empty() {
            at = at.get_mut(key)?;
        }
        for index in indexes.split(']').filter(|s| !s.is_empty()) {
            let n: usize = index.trim_start_matches('[').parse().ok()?;
            at = at.get_mut(n)?;
        }
    }
    Some(at)
}

fn format_unix_nanos(nanos: i64) -> String {
    let secs = nanos / 1_000_000_000;
    // RFC 3339 in UTC without pulling a date crate: civil-from-days.
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (h, m, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(mo <= 2);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{m:02}:{s:02}Z")
}

/// What a pod checkpoint produced, for the printout and for `stasisctl bench`.
pub struct CheckpointOutcome {
    pub pod_name: String,
    pub pod_id: String,
    pub archive_bytes: u64,
    pub response: stasis_api::checkpoint::CheckpointPodResponse,
    pub packaging_ms: f64,
    /// Wall time of the whole command: the shim's checkpoint plus packaging.
    pub total_ms: f64,
}

pub async fn checkpoint(t: &Target, a: CheckpointArgs) -> Result<()> {
    let output = match &a.image {
        Some(reference) => format!("image {reference}"),
        None => a.output.display().to_string(),
    };
    let o = checkpoint_pod(t, a).await?;
    let resp = &o.response;
    let timings = resp.timings.clone().unwrap_or_default();
    println!(
        "pod {} ({}) checkpointed to {output} ({}, engine {})",
        o.pod_name,
        o.pod_id,
        human(o.archive_bytes),
        resp.engine
    );
    println!(
        "{:<16} {:<14} {:>12} {:>12} {:>10} {:>10}",
        "CONTAINER", "ID", "CHECKPOINT", "ROOTFS DIFF", "DUMP", "ROOTFS"
    );
    for c in &resp.containers {
        let ct = c.timings.clone().unwrap_or_default();
        println!(
            "{:<16} {:<14} {:>12} {:>12} {:>8.0}ms {:>8.0}ms{}",
            c.name,
            &c.id[..c.id.len().min(13)],
            human(c.checkpoint_bytes),
            human(c.rootfs_diff_bytes),
            ct.dump_ms,
            ct.rootfs_ms,
            if c.was_paused {
                " (was paused, still paused)"
            } else {
                ""
            }
        );
    }
    println!(
        "frozen window {:.0} ms (all containers at one instant); checkpoint {:.0} ms, packaging {:.0} ms, total {:.0} ms",
        timings.frozen_ms, timings.total_ms, o.packaging_ms, o.total_ms
    );
    Ok(())
}

/// Checkpoints a pod through its shim's Checkpoint service and writes the archive.
pub async fn checkpoint_pod(t: &Target, mut a: CheckpointArgs) -> Result<CheckpointOutcome> {
    let started = Instant::now();
    if let Some(reference) = a.image.clone() {
        if !a.sealing.recipients.is_empty() {
            bail!("--image and --encrypt-to do not go together: a checkpoint image is not encrypted (sign it with --sign-key, keep it in a private registry)");
        }
        let store = crate::image::ImageStoreClient::connect(&t.address, &t.namespace).await?;
        if store.get(&reference).await?.is_some() {
            bail!("image {reference} already exists; remove it first (`ctr -n {} images rm {reference}`) or choose another reference", t.namespace);
        }
        // Not written (the pod goes into containerd's store): names where it is staged.
        a.output = archive::private_root(Path::new(CHECKPOINT_STAGING))?.join(format!(
            "{}.{}.image",
            a.pod,
            archive::random_suffix()?
        ));
        let (address, namespace, compress) = (t.address.clone(), t.namespace.clone(), a.compress);
        let handle = tokio::runtime::Handle::current();
        a.delivery = Delivery::Custom(Box::new(move |staging: &Path, cancel: &AtomicBool| {
            let built = handle.block_on(crate::image::build_from_dir(
                &address, &namespace, staging, &reference, compress,
            ))?;
            // Interrupted meanwhile: the pod runs on, so no image of it may be left.
            if cancel.load(std::sync::atomic::Ordering::SeqCst) {
                if let Ok(store) = handle.block_on(crate::image::ImageStoreClient::connect(
                    &address, &namespace,
                )) {
                    let _ = handle.block_on(store.delete(&reference));
                }
                bail!("interrupted; image {reference} was removed again");
            }
            Ok(built)
        }));
    }
    // `--output DIR/`: the checkpoint as a directory (the unpacked layout), not an archive.
    if a.image.is_none() && a.output.to_string_lossy().ends_with('/') {
        if !a.sealing.recipients.is_empty() {
            bail!("a checkpoint directory is not encrypted: --encrypt-to wants an archive file");
        }
        let dest = PathBuf::from(a.output.to_string_lossy().trim_end_matches('/'));
        if dest.symlink_metadata().is_ok() {
            bail!("{} already exists; choose a new directory", dest.display());
        }
        a.output = dest.clone();
        a.delivery = Delivery::Custom(Box::new(move |staging: &Path, cancel: &AtomicBool| {
            let placed = archive::place_dir(staging, &dest)?;
            // Interrupted meanwhile: the pod runs on, so no checkpoint of it may be left.
            if cancel.load(std::sync::atomic::Ordering::SeqCst) {
                let _ = std::fs::remove_dir_all(&dest);
                bail!("interrupted; {} was removed again", dest.display());
            }
            Ok(placed)
        }));
    }
    let mut rt = cri::connect(Path::new(&t.address)).await?;
    let pod = cri::find_pod(&mut rt, &a.pod).await?;
    let name = pod
        .metadata
        .as_ref()
        .map(|m| m.name.clone())
        .unwrap_or_default();
    if a.output.exists() {
        bail!("{} already exists; choose a new file", a.output.display());
    }
    let parent = a
        .output
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !parent.is_dir() {
        bail!("directory {} does not exist", parent.display());
    }
    let mut containers = Vec::new();
    for c in cri::pod_containers(&mut rt, &pod.id).await? {
        let cname = c
            .metadata
            .as_ref()
            .map(|m| m.name.clone())
            .unwrap_or_default();
        let chosen = a.containers.is_empty()
            || a.containers.iter().any(|x| {
                *x == c.id || *x == cname || (x.len() >= 6 && c.id.starts_with(x.as_str()))
            });
        if chosen && c.state == api::ContainerState::ContainerRunning as i32 {
            containers.push(container_info(&mut rt, &c).await?);
        }
    }
    for wanted in &a.containers {
        if !containers
            .iter()
            .any(|c| c.id == *wanted || c.name == *wanted || c.id.starts_with(wanted.as_str()))
        {
            bail!("pod {name}: no running container {wanted:?}");
        }
    }
    if containers.is_empty() {
        bail!(
            "pod {name} ({}) has no running container to checkpoint",
            pod.id
        );
    }
    let estimate = estimate(&mut rt, &containers).await;
    let stage_in = staging_parent(parent)?;
    if a.space_check {
        check_space(&name, &estimate, &stage_in, parent)?;
    }
    let client =
        shim::checkpoint_client(&t.address, &t.namespace, &pod.id, &pod.runtime_handler).await?;
    if a.output.symlink_metadata().is_ok() {
        bail!(
            "{} already exists; choose another --output (an archive is never replaced)",
            a.output.display()
        );
    }
    // A fresh private directory: a random name, 0700, never one that already exists
    // (somebody else's, or a link).
    let staging = stage_in.join(format!(
        ".{}.stasis-{}",
        a.output.file_name().unwrap_or_default().to_string_lossy(),
        archive::random_suffix()?
    ));
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&staging)
            .with_context(|| format!("create {}", staging.display()))?;
    }
    let staging = staging.canonicalize()?;
    eprintln!(
        "checkpointing pod {name} ({}) with {} container(s){}…",
        &pod.id[..12],
        containers.len(),
        if a.leave_running {
            ", leaving it running"
        } else {
            ""
        }
    );
    let req = CheckpointPodRequest {
        sandbox_id: pod.id.clone(),
        output_path: staging.display().to_string(),
        containers,
        options: Some(CheckpointOptions {
            leave_running: a.leave_running,
            tcp_established: a.tcp_established,
            file_locks: a.file_locks,
            timeout_secs: a.timeout,
            // A stopping checkpoint keeps the pod frozen until the archive is safe; this
            // bound (time to package the estimate at a slow 20 MB/s, plus a minute) is how
            // long the shim waits for us before it lets the pod run on.
            hold_secs: if a.leave_running {
                0
            } else {
                a.hold_secs
                    .unwrap_or((60 + estimate.total() / 20_000_000).min(3600) as u32)
            },
            ..Default::default()
        })
        .into(),
        ..Default::default()
    };
    let secs = if a.timeout > 0 {
        a.timeout as u64 + 30
    } else {
        3600
    };
    let mut interrupt = Interrupt::listen()?;
    let asked = tokio::select! {
        r = client.checkpoint_pod(ttrpc_ctx(secs), &req) => r.map_err(|e| {
            shim::explain(e, &pod.id, &pod.runtime_handler)
                .context(format!("checkpoint of pod {name} failed"))
        }),
        // Dropping the call tells the shim its caller is gone: the pod is thawed and runs on.
        signal = interrupt.received() => Err(anyhow::anyhow!(
            "interrupted by {signal}: checkpoint of pod {name} abandoned, the pod runs on"
        )),
    };
    let resp = match asked {
        Ok(r) => r,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&staging);
            // The shim stops nothing before the archive is safe, whatever failed.
            return Err(if a.leave_running {
                e
            } else {
                e.context(format!("pod {name} was not stopped and runs on"))
            });
        }
    };
    let t_pack = Instant::now();
    let cancel = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let undelivered = match a.delivery {
        Delivery::Archive => "no archive was written",
        Delivery::Custom(_) => "the pod was not delivered",
    };
    let packaging = {
        let (staging, output, cancel) = (staging.clone(), a.output.clone(), cancel.clone());
        let compress = a.compress;
        let (sign, recipients) = (a.sealing.sign.clone(), a.sealing.recipients.clone());
        let handler = pod.runtime_handler.clone();
        let delivery = std::mem::take(&mut a.delivery);
        tokio::task::spawn_blocking(move || {
            record_runtime_handler(&staging, &handler)?;
            archive::make_private(&staging)?;
            archive::write_manifest(&staging)?;
            if let Some(key) = &sign {
                seal::sign_manifest(&staging, key)?;
            }
            if let Delivery::Custom(deliver) = delivery {
                return deliver(&staging, &cancel);
            }
            let written =
                archive::write_cancellable(&staging, &output, compress, &recipients, &cancel)?;
            // Read back in full before anything is stopped: a stopping checkpoint's archive
            // is the pod from now on. (One encrypted to others is checked byte for byte.)
            let checked = if recipients.is_empty() {
                archive::verify(&output, &staging)
            } else {
                archive::verify_bytes(&output, &written)
            };
            checked.inspect_err(|_| {
                let _ = std::fs::remove_file(&output);
            })?;
            Ok::<_, anyhow::Error>(written.bytes)
        })
    };
    tokio::pin!(packaging);
    let written = tokio::select! {
        r = &mut packaging => r.context("packaging worker")?,
        signal = interrupt.received() => {
            cancel.store(true, std::sync::atomic::Ordering::SeqCst);
            let _ = packaging.await;
            Err(anyhow::anyhow!("interrupted by {signal} while writing the archive; nothing was left at {}", a.output.display()))
        }
    };
    let _ = std::fs::remove_dir_all(&staging);
    let size = match written {
        Ok(size) => size,
        Err(e) if !a.leave_running => {
            let finished = client
                .finish_checkpoint(
                    ttrpc_ctx(120),
                    &FinishCheckpointRequest {
                        sandbox_id: pod.id.clone(),
                        stop: false,
                        ..Default::default()
                    },
                )
                .await;
            return Err(match finished {
                Ok(_) => e.context(format!(
                    "pod {name}: {undelivered}; the pod was not stopped and runs on"
                )),
                Err(f) => e.context(format!(
                    "pod {name}: {undelivered}; resuming the pod failed too ({}), its shim lets it run on when its hold ends",
                    shim::explain(f, &pod.id, &pod.runtime_handler)
                )),
            });
        }
        Err(e) => return Err(e),
    };
    if !a.leave_running {
        client
            .finish_checkpoint(
                ttrpc_ctx(120),
                &FinishCheckpointRequest {
                    sandbox_id: pod.id.clone(),
                    stop: true,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| {
                shim::explain(e, &pod.id, &pod.runtime_handler).context(format!(
                    "pod {name}: the archive {} is complete, but stopping the pod failed; it may still run",
                    a.output.display()
                ))
            })?;
    }
    Ok(CheckpointOutcome {
        pod_name: name,
        pod_id: pod.id.clone(),
        archive_bytes: size,
        response: resp,
        packaging_ms: t_pack.elapsed().as_secs_f64() * 1000.0,
        total_ms: started.elapsed().as_secs_f64() * 1000.0,
    })
}

/// Notes in `pod.options` which CRI runtime handler the pod ran under (the shim knows its
/// engine, not the handler's name), so a restore can default to it.
fn record_runtime_handler(staging: &Path, handler: &str) -> Result<()> {
    if handler.is_empty() {
        return Ok(());
    }
    let mut options = archive::read_pod_options(staging)?;
    options.annotations.insert(
        stasis_api::layout::RUNTIME_HANDLER_ANNOTATION.into(),
        handler.into(),
    );
    let path = staging.join(stasis_api::layout::POD_OPTIONS);
    std::fs::remove_file(&path).with_context(|| format!("replace {}", path.display()))?;
    seal::write_new_private(&path, &options.to_json())
}

/// Where the pod is staged before it is archived: beside the output when nobody but root can
/// rename things there (root's directory, not writable by others, or sticky like /tmp), else
/// in root's private `/var/lib/stasis/checkpoints` (a user who owns the output directory could
/// otherwise swap the staging directory for a link while root writes into it).
fn staging_parent(parent: &Path) -> Result<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let meta = parent
        .metadata()
        .with_context(|| format!("directory {}", parent.display()))?;
    let only_root_renames =
        meta.uid() == 0 && (meta.mode() & 0o022 == 0 || meta.mode() & 0o1000 != 0);
    if only_root_renames {
        return Ok(parent.to_path_buf());
    }
    archive::private_root(Path::new(CHECKPOINT_STAGING))
}

/// Root's private staging area for checkpoints whose output directory is not root's alone.
pub const CHECKPOINT_STAGING: &str = "/var/lib/stasis/checkpoints";

/// Refuses early when the staging or the output file system cannot hold the checkpoint.
fn check_space(name: &str, e: &SpaceEstimate, stage_in: &Path, output_dir: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let capture = e.total() / 2;
    let same = stage_in.metadata()?.dev() == output_dir.metadata()?.dev();
    let needs: Vec<(&Path, u64)> = if same {
        vec![(output_dir, 2 * capture)]
    } else {
        vec![(stage_in, capture), (output_dir, capture)]
    };
    for (dir, need) in needs {
        let free = archive::free_space(dir)?;
        if need > free {
            bail!(
                "pod {name}: the checkpoint needs ~{} on the file system of {} (memory in use {} + writable layers {}{}), it has {} free; free some space, write elsewhere, or pass --skip-space-check",
                human(need),
                dir.display(),
                human(e.memory),
                human(e.layers),
                if same { ", staged there and then archived" } else { "" },
                human(free)
            );
        }
    }
    Ok(())
}

/// What a checkpoint of some containers will need on disk, from what CRI reports.
#[derive(Default)]
struct SpaceEstimate {
    memory: u64,
    layers: u64,
}

impl SpaceEstimate {
    /// Staged uncompressed and then archived on the same file system: twice the capture.
    fn total(&self) -> u64 {
        2 * (self.memory + self.layers)
    }
}

/// Resident memory (what CRIU writes) and writable layers of the containers, per CRI stats;
/// a container CRI has no stats for counts as nothing (the check is a courtesy, the write
/// itself still fails cleanly on a full disk).
async fn estimate(rt: &mut cri::Runtime, containers: &[ContainerInfo]) -> SpaceEstimate {
    let mut e = SpaceEstimate::default();
    for c in containers {
        let Ok(stats) = rt
            .container_stats(api::ContainerStatsRequest {
                container_id: c.id.clone(),
            })
            .await
        else {
            continue;
        };
        let Some(stats) = stats.into_inner().stats else {
            continue;
        };
        if let Some(m) = stats.memory {
            let rss = m.rss_bytes.map(|v| v.value).unwrap_or_default();
            let ws = m.working_set_bytes.map(|v| v.value).unwrap_or_default();
            e.memory += if rss > 0 { rss } else { ws };
        }
        if let Some(l) = stats.writable_layer {
            e.layers += l.used_bytes.map(|v| v.value).unwrap_or_default();
        }
    }
    e
}

pub struct RestoreArgs {
    /// The archive file; for an image, its reference (for messages).
    pub archive: PathBuf,
    /// Restore checkpoint image REF (pulled when missing) instead of an archive file.
    pub image: Option<String>,
    /// How to reach the registry when the image must be pulled.
    pub registry: crate::image::RegistryAccess,
    pub name: Option<String>,
    /// CRI runtime handler for the new pod (the operator's choice); None: the one the
    /// archive records, else "stasis".
    pub runtime_handler: Option<String>,
    /// The handler a migration peer asks for: checked against the policy like the one an
    /// archive records.
    pub offered_runtime_handler: Option<String>,
    /// What the archive may ask for (node policy widened by the operator's flags).
    pub policy: Policy,
    /// Replace the contents of non-empty host volumes with the captured ones.
    pub replace_volumes: bool,
    /// Identities to decrypt the archive; a key it must be signed by.
    pub opening: Opening,
    /// Let containers run before their memory is in (served on demand, pulled in the
    /// background); stasisctl returns once every page is in.
    pub lazy: bool,
}

/// SIGINT or SIGTERM while a restore runs: noticed, so that the half-restored pod and the
/// unpacked checkpoint are removed instead of left behind.
struct Interrupt {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
}

impl Interrupt {
    fn listen() -> Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Interrupt {
            int: signal(SignalKind::interrupt()).context("listen for SIGINT")?,
            term: signal(SignalKind::terminate()).context("listen for SIGTERM")?,
        })
    }

    async fn received(&mut self) -> &'static str {
        tokio::select! {
            _ = self.int.recv() => "SIGINT",
            _ = self.term.recv() => "SIGTERM",
        }
    }
}

pub async fn restore(t: &Target, a: RestoreArgs) -> Result<String> {
    if let Some(reference) = &a.image {
        let store = crate::image::ImageStoreClient::connect(&t.address, &t.namespace).await?;
        if store.get(reference).await?.is_none() {
            eprintln!("pulling {reference}");
            crate::image::transfer(&t.address, &t.namespace, reference, &a.registry, false).await?;
        }
        if a.lazy {
            eprintln!("{reference} is an image: its pages are unpacked before the pod runs");
        }
        let restored = restore_with(t, &a, |dir| {
            let options = tokio::task::block_in_place(|| {
                crate::image::unpack_blocking(&t.address, &t.namespace, reference, dir, &a.opening)
            })?;
            Ok((options, None))
        })
        .await?;
        return restored.finish(t).await;
    }
    if a.archive.is_dir() {
        // A checkpoint directory: copied and checked like an archive; a lazy restore leaves
        // its page images where they are and reads them from there.
        let restored = restore_with(t, &a, |dir| {
            archive::copy_from_dir(&a.archive, dir, &a.opening, a.lazy)
        })
        .await?;
        return restored.finish(t).await;
    }
    // A lazy restore from an uncompressed archive leaves the page images in it: the shim
    // reads pages from there on demand, so nothing that grows with memory is unpacked.
    let leave_pages = a.lazy && archive::is_plain_tar(&a.archive)?;
    if a.lazy && !leave_pages {
        eprintln!(
            "{} is compressed or encrypted: its pages are unpacked before the pod runs (an uncompressed archive, --compress none, is restored lazily without that)",
            a.archive.display()
        );
    }
    let restored = restore_with(t, &a, |dir| {
        if leave_pages {
            let (options, source) = archive::extract_leaving_pages(&a.archive, dir, &a.opening)?;
            Ok((options, Some(source)))
        } else {
            Ok((archive::extract_with(&a.archive, dir, &a.opening)?, None))
        }
    })
    .await?;
    restored.finish(t).await
}

/// A restored pod whose restore directory may still be in use: its lazily restored
/// containers pull pages from it until [`Restored::finish`].
pub struct Restored {
    pub pod_id: String,
    lazy: bool,
    started: Instant,
    running: std::time::Duration,
    dir: PathBuf,
    files: Vec<PathBuf>,
    guard: RestoreGuard,
}

impl Restored {
    /// Waits until every page of a lazy restore is in, then removes the restore directory.
    /// An error if a container stopped before its memory was all in.
    pub async fn finish(self, t: &Target) -> Result<String> {
        let mut lost = Vec::new();
        if self.lazy {
            // The restore directory serves the lazy-pages daemons: kept until each container
            // says how its restore ended (the shim stops one whose pages could not all be
            // served: a changed archive, a failed daemon).
            for (name, status) in wait_for_lazy_pages(&self.dir).await {
                if status.starts_with("failed") {
                    lost.push(format!("{name} ({status})"));
                }
            }
        }
        if !lost.is_empty() {
            // Not the pod that was checkpointed: it goes, as after any failed restore.
            let removed = match cri::connect(Path::new(&t.address)).await {
                Ok(mut rt) => cri::remove_pod(&mut rt, &self.pod_id).await,
                Err(e) => Err(e),
            };
            remove_restore_files(&self.dir, &self.files);
            self.guard.done();
            bail!(
                "pod {}: {} stopped before all of its memory was restored (the shim's log says why); {}",
                self.pod_id,
                lost.join(", "),
                match removed {
                    Ok(()) => "the pod was removed".to_string(),
                    Err(e) => format!("removing the pod failed: {e:#}"),
                }
            );
        }
        remove_restore_files(&self.dir, &self.files);
        self.guard.done();
        if self.lazy {
            eprintln!(
                "restored: running after {:.0} ms, every page in after {:.0} ms",
                self.running.as_secs_f64() * 1000.0,
                self.started.elapsed().as_secs_f64() * 1000.0
            );
        } else {
            eprintln!("restored in {:.0} ms", self.running.as_secs_f64() * 1000.0);
        }
        Ok(self.pod_id)
    }
}

fn remove_restore_files(dir: &Path, files: &[PathBuf]) {
    let _ = std::fs::remove_dir_all(dir);
    for f in files {
        let _ = std::fs::remove_file(f);
    }
}

/// A restore whose files `unpack` puts into the fresh restore directory it is given (from an
/// archive file, or a migration stream), saying which page images it left in an archive;
/// returns once the pod runs (see [`Restored`]).
pub async fn restore_with(
    t: &Target,
    a: &RestoreArgs,
    unpack: impl FnOnce(&Path) -> Result<(archive::PodOptions, Option<PageSource>)>,
) -> Result<Restored> {
    let started = Instant::now();
    let mut interrupt = Interrupt::listen()?;
    let store = open_restore_store()?;
    // 128 random bits: nobody can guess or pre-create it.
    let restore_id = format!("{}{}", archive::random_suffix()?, archive::random_suffix()?);
    let dir = store.join(&restore_id);
    eprintln!("unpacking {} as restore {restore_id}", a.archive.display());
    // Cleans up if this process is killed outright from here on.
    let mut guard = RestoreGuard::start(&t.address, &dir)?;
    // Everything about the archive is checked before anything is created.
    let (options, page_source) = match unpack(&dir) {
        Ok(o) => o,
        Err(e) => {
            guard.done();
            return Err(e.context(format!("cannot restore {}", a.archive.display())));
        }
    };
    let options_file = store.join(format!(
        "{restore_id}{}",
        stasis_api::layout::RESTORE_OPTIONS_SUFFIX
    ));
    let mut files = vec![
        store.join(format!("{restore_id}.pod")),
        options_file.clone(),
    ];
    let restore_options = stasis_api::layout::RestoreOptions {
        lazy: a.lazy,
        page_source,
    };
    // The pod's claim token (only the pod created here carries it), beside the options.
    let token_file = store.join(format!(
        "{restore_id}{}",
        stasis_api::layout::RESTORE_TOKEN_SUFFIX
    ));
    files.push(token_file.clone());
    let token = format!("{}{}", archive::random_suffix()?, archive::random_suffix()?);
    let written = seal::write_new_private(&options_file, &serde_json::to_vec(&restore_options)?)
        .and_then(|()| seal::write_new_private(&token_file, token.as_bytes()));
    if let Err(e) = written {
        remove_restore_files(&dir, &files);
        guard.done();
        return Err(e);
    }
    let result = restore_extracted(
        t,
        a,
        (&restore_id, &dir, &token),
        &options,
        &mut interrupt,
        &mut guard,
    )
    .await;
    let running = started.elapsed();
    match result {
        Ok(pod_id) => {
            if a.lazy {
                eprintln!(
                    "running after {:.0} ms; its memory is still coming in",
                    running.as_secs_f64() * 1000.0
                );
            }
            Ok(Restored {
                pod_id,
                lazy: a.lazy,
                started,
                running,
                dir,
                files,
                guard,
            })
        }
        Err(e) => {
            remove_restore_files(&dir, &files);
            guard.done();
            Err(e)
        }
    }
}

/// Waits until every container of the restore in `dir` has said how its lazy restore ended
/// (`layout::LAZY_STATUS`), or, should a shim die before it says so, until no `criu
/// lazy-pages` daemon serves pages from below `dir` for 10 s. Returns (container, status).
async fn wait_for_lazy_pages(dir: &Path) -> Vec<(String, String)> {
    let options = archive::read_pod_options(dir).unwrap_or_default();
    let needle = dir.display().to_string();
    let mut idle_since: Option<Instant> = None;
    loop {
        let statuses: Vec<_> = options
            .containers
            .iter()
            .map(|(name, cdir)| {
                let status =
                    std::fs::read_to_string(dir.join(cdir).join(stasis_api::layout::LAZY_STATUS));
                (name.clone(), status.ok().map(|s| s.trim().to_string()))
            })
            .collect();
        if statuses.iter().all(|(_, s)| s.is_some()) {
            return statuses
                .into_iter()
                .map(|(n, s)| (n, s.unwrap_or_default()))
                .collect();
        }
        let serving = std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
            .any(|c| {
                let c = String::from_utf8_lossy(&c);
                c.contains("lazy-pages") && c.contains(&needle)
            });
        if serving {
            idle_since = None;
        } else if idle_since
            .get_or_insert_with(Instant::now)
            .elapsed()
            .as_secs()
            >= 10
        {
            return statuses
                .into_iter()
                .map(|(n, s)| {
                    (
                        n,
                        s.unwrap_or_else(|| "failed: no word from its shim".into()),
                    )
                })
                .collect();
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// The restore store (`stasis_api::layout::RESTORE_STORE`): created 0700 if missing, and
/// refused unless it is a real directory of root's closed to others (the shim checks the
/// same).
fn open_restore_store() -> Result<PathBuf> {
    archive::private_root(Path::new(stasis_api::layout::RESTORE_STORE))
}

async fn restore_extracted(
    t: &Target,
    a: &RestoreArgs,
    (restore_id, dir, token): (&str, &Path, &str),
    options: &archive::PodOptions,
    interrupt: &mut Interrupt,
    guard: &mut RestoreGuard,
) -> Result<String> {
    let dir = dir.canonicalize()?;
    // Read as containerd writes CRI types (zero values may be left out); keys the field
    // table does not know are requests no policy allows.
    let pod_json: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("pod.dump"))?)
        .context("pod.dump is not JSON")?;
    let mut unknown = policy::unknown_fields("pod", "pod.dump", "PodSandboxConfig", &pod_json);
    let mut pod: api::PodSandboxConfig =
        from_go_json(&pod_json).context("pod.dump is not a CRI PodSandboxConfig")?;
    let mut configs = Vec::new();
    for (name, cdir) in &options.containers {
        let path = dir.join(cdir).join("container-config.json");
        let text = std::fs::read(&path)
            .with_context(|| format!("container {name}: no container-config.json"))?;
        let json: serde_json::Value = serde_json::from_slice(&text)
            .with_context(|| format!("container {name}: container-config.json is not JSON"))?;
        unknown.extend(policy::unknown_fields(
            &format!("container {name}"),
            "container-config.json",
            "ContainerConfig",
            &json,
        ));
        let mut config: api::ContainerConfig = from_go_json(&json).with_context(|| {
            format!("container {name}: container-config.json is not a CRI ContainerConfig")
        })?;
        config.annotations.insert(
            RESTORE_ANNOTATION.to_string(),
            format!("{restore_id}/{cdir}"),
        );
        // The base image is the one the checkpoint was taken on (its digest), never whatever
        // its tag names today: the rootfs diff and the memory belong to that image.
        let recorded: stasis_api::layout::CheckpointedConfig = stasis_api::layout::parse_json(
            "config.dump",
            &std::fs::read(dir.join(cdir).join(stasis_api::layout::CONFIG_DUMP))?,
        )
        .with_context(|| format!("container {name}"))?;
        if !recorded.rootfs_image_ref.is_empty() {
            let image = config.image.get_or_insert_with(Default::default);
            if image.user_specified_image.is_empty() {
                image.user_specified_image = image.image.clone();
            }
            image.image = recorded.rootfs_image_ref.clone();
        }
        configs.push((name.clone(), config));
    }
    let recorded = options
        .annotations
        .get(stasis_api::layout::RUNTIME_HANDLER_ANNOTATION);
    let (handler, named_by) = match (&a.runtime_handler, &a.offered_runtime_handler, recorded) {
        (Some(h), _, _) => (h.clone(), None),
        (None, Some(h), _) => (h.clone(), Some("the migration peer")),
        (None, None, Some(h)) => {
            eprintln!("runtime handler {h} (the one the pod ran under)");
            (h.clone(), Some("the archive"))
        }
        (None, None, None) => ("stasis".to_string(), None),
    };
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
    configs.sort_by_key(|(_, c)| {
        !c.annotations
            .contains_key(stasis_api::layout::VOLUMES_ANNOTATION)
    });
    let md = pod.metadata.get_or_insert_with(Default::default);
    if let Some(n) = &a.name {
        md.name = n.clone();
    }
    md.uid = format!("{}-restored-{}", md.uid, std::process::id());
    md.attempt = 0;
    // The pod itself names the checkpoint too: a runtime that restores whole sandboxes
    // (gVisor) brings the pod back at its start, and every runtime refuses an archive of
    // another backend before any container exists.
    pod.annotations
        .insert(RESTORE_ANNOTATION.to_string(), restore_id.to_string());
    pod.annotations.insert(
        stasis_api::layout::RESTORE_TOKEN_ANNOTATION.to_string(),
        token.to_string(),
    );
    let pod_name = md.name.clone();
    check_base_images(
        &mut cri::Images::new(channel),
        &configs,
        (&a.registry, &policy),
    )
    .await?;
    let pod_id = rt
        .run_pod_sandbox(api::RunPodSandboxRequest {
            config: Some(pod.clone()),
            runtime_handler: handler.clone(),
        })
        .await
        .with_context(|| format!("create pod {pod_name} (handler {handler})"))?
        .into_inner()
        .pod_sandbox_id;
    guard.pod(&pod_id);
    let work = async {
        let client = shim::checkpoint_client(&t.address, &t.namespace, &pod_id, &handler).await?;
        let v = client
            .validate_restore(
                ttrpc_ctx(60),
                &ValidateRestoreRequest {
                    checkpoint_path: dir.display().to_string(),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| shim::explain(e, &pod_id, &handler))
            .with_context(|| format!("archive written by the {} backend", options.engine()))?;
        if v.engine != options.engine() {
            bail!(
                "archive was written by the {} backend; runtime handler {:?} uses {}",
                options.engine(),
                handler,
                v.engine
            );
        }
        for (name, config) in configs {
            policy::check_host_paths_resolve(&name, &pod.log_directory, &config)?;
            let id = rt
                .create_container(api::CreateContainerRequest {
                    pod_sandbox_id: pod_id.clone(),
                    config: Some(config),
                    sandbox_config: Some(pod.clone()),
                })
                .await
                .with_context(|| format!("create container {name}"))?
                .into_inner()
                .container_id;
            rt.start_container(api::StartContainerRequest {
                container_id: id.clone(),
            })
            .await
            .with_context(|| format!("restore container {name} ({id})"))?;
            eprintln!(
                "restored container {name} ({}), stopped until the pod is complete",
                &id[..12]
            );
        }
        // Every container is back: let them all run at one instant.
        client
            .finish_restore(
                ttrpc_ctx(60),
                &FinishRestoreRequest {
                    sandbox_id: pod_id.clone(),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| shim::explain(e, &pod_id, &handler))
            .context("resume the restored containers")?;
        Ok(())
    };
    let outcome = tokio::select! {
        r = work => r,
        signal = interrupt.received() => Err(anyhow::anyhow!("interrupted by {signal}")),
    };
    if let Err(e) = outcome {
        let _ = cri::remove_pod(&mut rt, &pod_id).await;
        return Err(e.context(format!(
            "restore of pod {pod_name} failed; the new pod was removed"
        )));
    }
    Ok(pod_id)
}

/// Every base image, by the digest its checkpoint recorded, must be on this node.
async fn check_base_images(
    images: &mut cri::Images,
    configs: &[(String, api::ContainerConfig)],
    (registry, policy): (&crate::image::RegistryAccess, &Policy),
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
            eprintln!("pulling base image {} for container {name}", spec.image);
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
fn check_volume_targets(
    dir: &Path,
    options: &archive::PodOptions,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// What containerd's verbose info holds (Go omitempty: zero values left out).
    #[test]
    fn a_config_with_omitted_zero_values_keeps_its_security_settings() {
        let go = serde_json::json!({
            "metadata": {"name": "web"},
            "image": {"image": "busybox"},
            "command": ["sh"],
            "linux": {
                "security_context": {
                    "capabilities": {"drop_capabilities": ["ALL"], "add_capabilities": ["CHOWN"]},
                    "run_as_user": {"value": 1000},
                    "readonly_rootfs": true,
                    "namespace_options": {"pid": 1}
                }
            },
            "mounts": [{"container_path": "/data", "host_path": "/var/lib/x"}]
        });
        let c = config_from_info(&go).unwrap();
        let sc = c.linux.unwrap().security_context.unwrap();
        assert_eq!(sc.capabilities.unwrap().drop_capabilities, ["ALL"]);
        assert_eq!(sc.run_as_user.unwrap().value, 1000);
        assert!(sc.readonly_rootfs);
        assert_eq!(sc.namespace_options.unwrap().pid, 1);
        assert_eq!(c.mounts[0].host_path, "/var/lib/x");
        assert!(!c.mounts[0].readonly);
        // Not a config at all: an error, never a guess.
        assert!(config_from_info(&serde_json::json!({"linux": 5})).is_err());
    }
}
