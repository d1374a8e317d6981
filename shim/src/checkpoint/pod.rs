//! The pod checkpoint (our Checkpoint service): every selected container of a pod captured at
//! one instant. Design notes §2: freeze the pod cgroup, freeze each container's own cgroup and
//! thaw the pod (CRIU cannot seize tasks under a frozen parent), dump all containers in
//! parallel, capture each writable layer and volume while still frozen, thaw, then write the
//! metadata. Any failure thaws everything and empties the output directory.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use async_trait::async_trait;
use containerd_shim_protos::{
    api::Status,
    ttrpc::{self, r#async::TtrpcContext},
};
use log::{info, warn};
use stasis_api::{
    checkpoint::{
        CheckpointPodRequest, CheckpointPodResponse, ContainerInfo, ContainerResult,
        FinishRestoreRequest, FinishRestoreResponse, Timings as WireTimings,
        ValidateRestoreRequest, ValidateRestoreResponse,
    },
    checkpoint_ttrpc::Checkpoint,
};
use tokio::sync::Mutex;

use super::{rootfs, volumes};
use crate::runtime::OciRuntime;
use crate::{
    cgroup::freezer::{self, Freezer},
    error::{Error, Result},
    runtime::CheckpointOpts,
    task::{Container, Tasks},
};

/// Per-container metadata of stasis, next to checkpointctl's files.
pub const STASIS_META: &str = "stasis.json";
/// The CRI ContainerConfig, for the restore.
pub const CONTAINER_CONFIG: &str = "container-config.json";

pub struct PodCheckpointService {
    pub tasks: Arc<Tasks>,
    busy: Mutex<()>,
}

impl PodCheckpointService {
    pub fn new(tasks: Arc<Tasks>) -> Self {
        PodCheckpointService {
            tasks,
            busy: Mutex::new(()),
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn dir_size(p: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(p) else {
        return 0;
    };
    rd.flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// Empties `dir` (the output directory stays, as the caller created it).
fn empty_dir(dir: &Path) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            let _ = if p.is_dir() && !p.is_symlink() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
        }
    }
}

/// A directory name safe for any container name.
fn dir_name(id: &str, name: &str) -> String {
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

struct Selected {
    id: String,
    dir: PathBuf,
    info: ContainerInfo,
    paused: bool,
    freezer: Box<dyn Freezer>,
}

impl PodCheckpointService {
    async fn checkpoint(&self, req: CheckpointPodRequest) -> Result<CheckpointPodResponse> {
        let pod = self
            .tasks
            .pod()
            .filter(|p| p.id == req.sandbox_id)
            .ok_or_else(|| Error::not_found("sandbox", &req.sandbox_id))?;
        let _busy = self.busy.try_lock().map_err(|_| {
            Error::precondition(
                &req.sandbox_id,
                "a checkpoint of this pod is already running",
            )
        })?;
        let out = PathBuf::from(&req.output_path);
        if !out.is_dir() {
            return Err(Error::precondition(
                &req.sandbox_id,
                format!("output path {} is not an existing directory", out.display()),
            ));
        }
        if std::fs::read_dir(&out)
            .map(|mut d| d.next().is_some())
            .unwrap_or(true)
        {
            return Err(Error::precondition(
                &req.sandbox_id,
                format!("output path {} is not empty", out.display()),
            ));
        }
        let opts = req.options.clone().unwrap_or_default();
        let mut infos: HashMap<String, ContainerInfo> = req
            .containers
            .iter()
            .map(|c| (c.id.clone(), c.clone()))
            .collect();
        let mut ids: Vec<String> = if req.containers.is_empty() {
            self.tasks.ids()
        } else {
            req.containers.iter().map(|c| c.id.clone()).collect()
        };
        ids.sort();
        ids.dedup();
        if ids.is_empty() {
            return Err(Error::precondition(
                &req.sandbox_id,
                "the pod has no containers to checkpoint",
            ));
        }
        // Hold every selected container for the whole capture, in a fixed order.
        let mut handles = Vec::new();
        for id in &ids {
            handles.push(self.tasks.get(id)?);
        }
        let mut guards = Vec::new();
        for h in &handles {
            guards.push(h.lock().await);
        }
        let mut selected = Vec::new();
        for c in guards.iter() {
            if !matches!(c.init.status, Status::RUNNING | Status::PAUSED) {
                return Err(Error::precondition(
                    &c.id,
                    format!("cannot checkpoint a container that is {:?}", c.init.status),
                ));
            }
            let info = infos.remove(&c.id).unwrap_or_else(|| ContainerInfo {
                id: c.id.clone(),
                ..Default::default()
            });
            let name = if info.name.is_empty() {
                c.id.clone()
            } else {
                info.name.clone()
            };
            selected.push(Selected {
                id: c.id.clone(),
                dir: out.join(dir_name(&c.id, &name)),
                info,
                paused: c.init.status == Status::PAUSED,
                freezer: freezer::for_cgroup(&c.id, &c.cgroup_path)?,
            });
        }
        let containers: Vec<&Container> = guards.iter().map(|g| &**g).collect();
        let start = Instant::now();
        let pod_freezer = freezer::for_cgroup(&pod.id, &pod.cgroup)?;
        let result = if self.tasks.runtime.checkpoints_whole_sandbox() {
            self.capture_sandbox(&pod.id, &out, &selected, &containers, &opts)
                .await
        } else {
            self.capture(pod_freezer.as_ref(), &selected, &containers, &opts, start)
                .await
        };
        let (frozen, per) = match result {
            Ok(r) => r,
            Err(e) => {
                empty_dir(&out);
                warn!("pod {}: checkpoint failed: {e}", pod.id);
                return Err(e);
            }
        };
        // Metadata and sizes: after the thaw, nothing here needs the pod still.
        let mut results = Vec::new();
        for (s, (c, t)) in selected.iter().zip(containers.iter().zip(per.iter())) {
            match write_metadata(s, c, t, opts.leave_running, self.tasks.runtime.name()) {
                Ok(r) => results.push(r),
                Err(e) => {
                    empty_dir(&out);
                    return Err(e);
                }
            }
        }
        // After the thaw: over-estimating is harmless, the restore only needs "at least".
        let last_pid = if self.tasks.runtime.checkpoints_whole_sandbox() {
            None
        } else {
            crate::sandbox::pidns::last_pid(&pod.id, pod.pid().await)
                .await
                .map_err(|e| warn!("pod {}: {e}", pod.id))
                .ok()
        };
        if let Err(e) = write_pod_files(&out, &pod, &selected, self.tasks.runtime.name(), last_pid)
        {
            empty_dir(&out);
            return Err(e);
        }
        let total = start.elapsed();
        info!(
            "pod {}: checkpoint of {} container(s) to {}: frozen {:?}, total {:?}",
            pod.id,
            results.len(),
            out.display(),
            frozen,
            total
        );
        let dump = per.iter().map(|t| t.dump).max().unwrap_or_default();
        let rootfs_time = per.iter().map(|t| t.files).max().unwrap_or_default();
        Ok(CheckpointPodResponse {
            containers: results,
            timings: Some(WireTimings {
                frozen_ms: ms(frozen),
                dump_ms: ms(dump),
                rootfs_ms: ms(rootfs_time),
                total_ms: ms(total),
                ..Default::default()
            })
            .into(),
            engine: self.tasks.runtime.name().to_string(),
            ..Default::default()
        })
    }

    /// A runtime that checkpoints its whole sandbox (runsc) stops every container of the pod
    /// at one instant by itself: one call, one image for the pod, no freezer, no CRIU. The
    /// containers' writable layers live in the sandbox's memory and are in that image; what
    /// the shim adds is each container's directory for the metadata.
    async fn capture_sandbox(
        &self,
        pod_id: &str,
        out: &Path,
        selected: &[Selected],
        containers: &[&Container],
        opts: &stasis_api::checkpoint::CheckpointOptions,
    ) -> Result<(Duration, Vec<super::Timings>)> {
        let runtime = self.tasks.runtime.clone();
        // Every live container of the sandbox is in its image, so all must be selected.
        let mut live = Vec::new();
        for id in self.tasks.ids() {
            if selected.iter().any(|s| s.id == id) {
                live.push(id);
                continue;
            }
            let c = self.tasks.get(&id)?;
            let c = c.lock().await;
            if matches!(c.init.status, Status::RUNNING | Status::PAUSED) {
                return Err(Error::precondition(
                    pod_id,
                    format!(
                        "{} saves the whole sandbox: container {id} runs too, so select every running container of the pod (or none)",
                        runtime.name()
                    ),
                ));
            }
        }
        if opts.tcp_established || opts.file_locks {
            return Err(Error::invalid(
                pod_id,
                format!(
                    "{} has no --tcp-established or --file-locks: gVisor saves sockets and locks itself",
                    runtime.name()
                ),
            ));
        }
        // gVisor saves an exec'd process with host stdio it cannot reopen at restore: such an
        // image would not restore, so refuse before taking it.
        for c in containers {
            if let Some(exec) = c.execs.iter().find(|(_, p)| p.status == Status::RUNNING) {
                return Err(Error::precondition(
                    &c.id,
                    format!(
                        "exec {} is still running; {} cannot restore a sandbox saved with exec processes, wait for them to end",
                        exec.0,
                        runtime.name()
                    ),
                ));
            }
        }
        for s in selected {
            std::fs::create_dir_all(&s.dir)
                .map_err(|e| Error::io(&s.id, "create checkpoint dir", e))?;
        }
        let copts = CheckpointOpts {
            image_path: out.join(crate::runtime::SANDBOX_IMAGE_DIR),
            // Stopping is done after the capture, container by container, as for CRIU runtimes.
            leave_running: true,
            ..Default::default()
        };
        std::fs::create_dir_all(&copts.image_path)
            .map_err(|e| Error::io(pod_id, "create sandbox image dir", e))?;
        // Volumes live on the host, outside gVisor's image: capturing them at the same
        // instant needs the whole sandbox paused around the checkpoint and the copy.
        let with_volumes = containers.iter().any(|c| volumes::wanted(&c.spec));
        let t = Instant::now();
        if with_volumes {
            runtime.pause(pod_id).await?;
        }
        let captured = self
            .checkpoint_sandbox(pod_id, &copts, opts, selected, containers, with_volumes)
            .await;
        if with_volumes {
            // Never leave the pod paused: retry, and fail the checkpoint if it stays so.
            let mut resumed = runtime.resume(pod_id).await;
            if let Err(e) = &resumed {
                warn!("pod {pod_id}: resume after checkpoint: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
                resumed = runtime.resume(pod_id).await;
            }
            if captured.is_ok() {
                resumed?;
            }
        }
        captured?;
        let frozen = t.elapsed();
        if !opts.leave_running {
            for s in selected {
                if let Err(e) = runtime.kill(&s.id, libc::SIGKILL as u32, true).await {
                    warn!("{}: stop after checkpoint: {e}", s.id);
                }
            }
        }
        Ok((
            frozen,
            containers
                .iter()
                .map(|_| super::Timings {
                    frozen,
                    dump: frozen,
                    ..Default::default()
                })
                .collect(),
        ))
    }

    /// The sandbox image, then (with the sandbox paused) the containers' named volumes into
    /// each container's `checkpoint/`.
    async fn checkpoint_sandbox(
        &self,
        pod_id: &str,
        copts: &CheckpointOpts,
        opts: &stasis_api::checkpoint::CheckpointOptions,
        selected: &[Selected],
        containers: &[&Container],
        with_volumes: bool,
    ) -> Result<()> {
        let runtime = self.tasks.runtime.clone();
        let dumped = runtime.checkpoint(pod_id, copts);
        let dumped = if opts.timeout_secs > 0 {
            tokio::time::timeout(Duration::from_secs(opts.timeout_secs as u64), dumped)
                .await
                .unwrap_or_else(|_| {
                    Err(Error::other(
                        pod_id,
                        "checkpoint",
                        format!("timed out after {} s", opts.timeout_secs),
                    ))
                })
        } else {
            dumped.await
        };
        dumped.map_err(|e| Error::Runtime {
            id: format!("pod {pod_id}"),
            step: "sandbox checkpoint".into(),
            message: e.to_string(),
        })?;
        if with_volumes {
            for (s, c) in selected.iter().zip(containers.iter()) {
                volumes::capture(&s.id, &c.spec, &s.dir.join("checkpoint"))?;
            }
        }
        Ok(())
    }

    /// The frozen part: freeze, dump, capture files, thaw. Returns the frozen window.
    async fn capture(
        &self,
        pod_freezer: &dyn Freezer,
        selected: &[Selected],
        containers: &[&Container],
        opts: &stasis_api::checkpoint::CheckpointOptions,
        start: Instant,
    ) -> Result<(Duration, Vec<super::Timings>)> {
        // One instant for the whole pod: the pod cgroup freezes every container at once.
        pod_freezer.freeze()?;
        let frozen_at = Instant::now();
        let mut froze = Vec::new();
        let mut err = None;
        for s in selected {
            if s.paused {
                continue;
            }
            match s.freezer.freeze() {
                Ok(()) => froze.push(s),
                Err(e) => {
                    err = Some(e);
                    break;
                }
            }
        }
        // CRIU cannot seize tasks below a frozen parent; the containers stay frozen by their own.
        let thawed_pod = pod_freezer.thaw();
        let thaw_all = |froze: &[&Selected]| {
            for s in froze {
                if let Err(e) = s.freezer.thaw() {
                    warn!("{}: thaw: {e}", s.id);
                }
            }
        };
        if let Some(e) = err {
            thaw_all(&froze);
            return Err(e);
        }
        if let Err(e) = thawed_pod {
            thaw_all(&froze);
            return Err(e);
        }
        let runtime = self.tasks.runtime.clone();
        let work = std::env::temp_dir().join(format!("stasis-pod-dump-{}", std::process::id()));
        let dumps = selected.iter().zip(containers.iter()).map(|(s, c)| {
            let runtime = runtime.clone();
            let copts = CheckpointOpts {
                image_path: s.dir.join("checkpoint"),
                work_path: work.join(&s.id),
                // Always dumped live under our freeze; a stopping checkpoint kills them after
                // the capture (runc would otherwise wait for frozen processes to die).
                leave_running: true,
                tcp_established: opts.tcp_established,
                file_locks: opts.file_locks,
                shell_job: c.init.stdio.terminal,
                ..Default::default()
            };
            let upper = c.rootfs_upper.clone();
            let spec = c.spec.clone();
            let id = s.id.clone();
            let dir = s.dir.clone();
            let who = if s.info.name.is_empty() {
                s.id.clone()
            } else {
                format!("container {} ({})", s.info.name, s.id)
            };
            async move {
                let t = Instant::now();
                std::fs::create_dir_all(&copts.image_path)
                    .map_err(|e| Error::io(&id, "create checkpoint dir", e))?;
                std::fs::create_dir_all(&copts.work_path)
                    .map_err(|e| Error::io(&id, "create work dir", e))?;
                runtime
                    .checkpoint(&id, &copts)
                    .await
                    .map_err(|e| Error::Runtime {
                        id: who.clone(),
                        step: "dump".into(),
                        message: e.to_string(),
                    })?;
                let dump = t.elapsed();
                let t = Instant::now();
                let id2 = id.clone();
                let dir2 = dir.clone();
                let image = copts.image_path.clone();
                tokio::task::spawn_blocking(move || -> Result<()> {
                    if let Some(upper) = upper {
                        rootfs::capture(&id2, &upper, &dir2)?;
                    }
                    volumes::capture(&id2, &spec, &image)?;
                    Ok(())
                })
                .await
                .map_err(|e| Error::other(&id, "capture files", e))??;
                for f in ["dump.log", "stats-dump"] {
                    let _ = std::fs::copy(copts.work_path.join(f), dir.join(f));
                }
                Ok::<_, Error>(super::Timings {
                    dump,
                    files: t.elapsed(),
                    ..Default::default()
                })
            }
        });
        let joined = futures::future::join_all(dumps);
        let outcome = if opts.timeout_secs > 0 {
            match tokio::time::timeout(Duration::from_secs(opts.timeout_secs as u64), joined).await
            {
                Ok(r) => r,
                Err(_) => vec![Err(Error::other(
                    &selected[0].id,
                    "checkpoint",
                    format!("timed out after {} s", opts.timeout_secs),
                ))],
            }
        } else {
            joined.await
        };
        if !opts.leave_running && outcome.iter().all(|r| r.is_ok()) {
            for s in selected {
                if let Err(e) = runtime.kill(&s.id, libc::SIGKILL as u32, true).await {
                    warn!("{}: stop after checkpoint: {e}", s.id);
                }
            }
        }
        // Thaw what we froze; a stopping dump also releases containers the user had paused,
        // as their processes are gone.
        for s in selected {
            if !s.paused || !opts.leave_running {
                if let Err(e) = s.freezer.thaw() {
                    warn!("{}: thaw: {e}", s.id);
                }
            }
        }
        let frozen = frozen_at.elapsed();
        let _ = std::fs::remove_dir_all(&work);
        let mut per = Vec::new();
        for r in outcome {
            per.push(r?);
        }
        let _ = start;
        Ok((
            frozen,
            per.into_iter()
                .map(|mut t| {
                    t.frozen = frozen;
                    t
                })
                .collect(),
        ))
    }
}

fn write_metadata(
    s: &Selected,
    c: &Container,
    t: &super::Timings,
    leave_running: bool,
    engine: &str,
) -> Result<ContainerResult> {
    let id = &s.id;
    let write = |name: &str, data: &[u8]| {
        std::fs::write(s.dir.join(name), data)
            .map_err(|e| Error::io(id, format!("write {name}"), e))
    };
    let now = time::OffsetDateTime::now_utc();
    let rfc3339 = |t: time::OffsetDateTime| {
        t.format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default()
    };
    let name = if s.info.name.is_empty() {
        id.clone()
    } else {
        s.info.name.clone()
    };
    let image = if s.info.image.is_empty() {
        c.spec
            .pointer("/annotations/io.kubernetes.cri.image-name")
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_string()
    } else {
        s.info.image.clone()
    };
    // checkpointctl's config.dump (lib/metadata.go ContainerConfig).
    let config = serde_json::json!({
        "id": id,
        "name": name,
        "rootfsImage": image,
        "rootfsImageRef": s.info.image_ref,
        "rootfsImageName": image,
        "runtime": "io.containerd.stasis.v2",
        "createdTime": if s.info.created_at.is_empty() { rfc3339(now) } else { s.info.created_at.clone() },
        "checkpointedTime": rfc3339(now),
        "restoredTime": "0001-01-01T00:00:00Z",
        "restored": false,
    });
    write(
        "config.dump",
        &serde_json::to_vec(&config).unwrap_or_default(),
    )?;
    write(
        "spec.dump",
        &serde_json::to_vec_pretty(&c.spec).unwrap_or_default(),
    )?;
    let status = if s.info.status_json.is_empty() {
        serde_json::json!({"id": id, "metadata": {"name": name}, "image": {"image": image}})
            .to_string()
    } else {
        s.info.status_json.clone()
    };
    write("status.dump", status.as_bytes())?;
    if !s.info.config_json.is_empty() {
        write(CONTAINER_CONFIG, s.info.config_json.as_bytes())?;
    }
    let checkpoint_bytes = dir_size(&s.dir.join("checkpoint"));
    let rootfs_diff_bytes = std::fs::metadata(s.dir.join(rootfs::DIFF_TAR))
        .map(|m| m.len())
        .unwrap_or(0);
    let meta = serde_json::json!({
        "engine": engine,
        "container_id": id,
        "name": name,
        "image": image,
        "checkpointed_at": rfc3339(now),
        "leave_running": leave_running,
        "was_paused": s.paused,
        "frozen_ms": ms(t.frozen),
        "dump_ms": ms(t.dump),
        "rootfs_ms": ms(t.files),
        "checkpoint_bytes": checkpoint_bytes,
        "rootfs_diff_bytes": rootfs_diff_bytes,
    });
    write(
        STASIS_META,
        &serde_json::to_vec_pretty(&meta).unwrap_or_default(),
    )?;
    Ok(ContainerResult {
        id: id.clone(),
        name,
        directory: s
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
        was_paused: s.paused,
        ..Default::default()
    })
}

fn write_pod_files(
    out: &Path,
    pod: &crate::sandbox::Pod,
    selected: &[Selected],
    engine: &str,
    last_pid: Option<u32>,
) -> Result<()> {
    let containers: serde_json::Map<String, serde_json::Value> = selected
        .iter()
        .map(|s| {
            let name = if s.info.name.is_empty() {
                s.id.clone()
            } else {
                s.info.name.clone()
            };
            let dir = s
                .dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            (name, serde_json::Value::String(dir))
        })
        .collect();
    let mut options = serde_json::json!({
        "version": 1,
        "containers": containers,
        "annotations": {
            "io.stasis.engine": engine,
            "io.stasis.sandbox-id": pod.id,
        },
    });
    if let Some(last) = last_pid {
        // Annotations are strings (checkpointctl's convention).
        options["annotations"][crate::sandbox::pidns::LAST_PID_ANNOTATION] =
            serde_json::Value::String(last.to_string());
    }
    std::fs::write(
        out.join("pod.options"),
        serde_json::to_vec_pretty(&options).unwrap_or_default(),
    )
    .map_err(|e| Error::io(&pod.id, "write pod.options", e))?;
    let dump = serde_json::to_vec_pretty(&pod.config)
        .map_err(|e| Error::other(&pod.id, "encode pod.dump", e))?;
    std::fs::write(out.join("pod.dump"), dump).map_err(|e| Error::io(&pod.id, "write pod.dump", e))
}

fn engine_mismatch(id: &str, what: &str, written_by: &str, engine: &str) -> Error {
    Error::precondition(
        id,
        format!(
            "{what} was written by the {written_by} backend; this pod runs on the {engine} backend, which cannot restore it (restore it under a runtime handler that uses {written_by})"
        ),
    )
}

/// Checks a pod checkpoint before a pod is restored from it: that this backend wrote it.
/// Returns the containers' directories named by `pod.options`.
pub fn check_pod_dir(id: &str, dir: &Path, engine: &str) -> Result<Vec<PathBuf>> {
    let text = std::fs::read(dir.join("pod.options"))
        .map_err(|e| Error::io(id, format!("read {}", dir.join("pod.options").display()), e))?;
    let options: serde_json::Value = serde_json::from_slice(&text)
        .map_err(|e| Error::invalid(id, format!("pod.options: {e}")))?;
    let written_by = options
        .pointer("/annotations/io.stasis.engine")
        .and_then(|v| v.as_str())
        .unwrap_or("runc");
    if written_by != engine {
        return Err(engine_mismatch(
            id,
            &format!("pod checkpoint {}", dir.display()),
            written_by,
            engine,
        ));
    }
    Ok(options["containers"]
        .as_object()
        .map(|m| {
            m.values()
                .filter_map(|v| v.as_str())
                .map(|d| dir.join(d))
                .collect()
        })
        .unwrap_or_default())
}

/// Checks a per-container checkpoint directory before a container is restored from it.
pub fn check_restore_dir(id: &str, dir: &Path, runtime: &dyn OciRuntime) -> Result<()> {
    let engine = runtime.name();
    if let Ok(text) = std::fs::read(dir.join(STASIS_META)) {
        let meta: serde_json::Value = serde_json::from_slice(&text)
            .map_err(|e| Error::invalid(id, format!("{STASIS_META}: {e}")))?;
        let written_by = meta["engine"].as_str().unwrap_or("runc");
        if written_by != engine {
            return Err(engine_mismatch(id, "the checkpoint", written_by, engine));
        }
    }
    let image = runtime.restore_image(dir);
    if !runtime.has_image(&image) {
        return Err(Error::invalid(
            id,
            format!("{} holds no {engine} checkpoint images", image.display()),
        ));
    }
    rootfs::validate(id, dir)
}

fn rpc<T>(r: Result<T>) -> ttrpc::Result<T> {
    r.map_err(|e| {
        warn!("{e}");
        e.into()
    })
}

#[async_trait]
impl Checkpoint for PodCheckpointService {
    async fn checkpoint_pod(
        &self,
        _ctx: &TtrpcContext,
        req: CheckpointPodRequest,
    ) -> ttrpc::Result<CheckpointPodResponse> {
        rpc(self.checkpoint(req).await)
    }

    async fn finish_restore(
        &self,
        _ctx: &TtrpcContext,
        req: FinishRestoreRequest,
    ) -> ttrpc::Result<FinishRestoreResponse> {
        if self.tasks.pod().is_none_or(|p| p.id != req.sandbox_id) {
            return rpc(Err(Error::not_found("sandbox", &req.sandbox_id)));
        }
        let ids = rpc(self.tasks.finish_restore().await)?;
        Ok(FinishRestoreResponse {
            container_ids: ids,
            ..Default::default()
        })
    }

    async fn validate_restore(
        &self,
        _ctx: &TtrpcContext,
        req: ValidateRestoreRequest,
    ) -> ttrpc::Result<ValidateRestoreResponse> {
        let path = PathBuf::from(&req.checkpoint_path);
        let runtime = self.tasks.runtime.as_ref();
        let engine = runtime.name().to_string();
        let dirs = rpc(check_pod_dir("restore", &path, &engine))?;
        for d in dirs {
            rpc(check_restore_dir("restore", &d, runtime))?;
        }
        Ok(ValidateRestoreResponse {
            engine,
            ..Default::default()
        })
    }
}
