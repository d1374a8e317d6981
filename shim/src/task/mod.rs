//! containerd's Task API: containers and their processes, run by the OCI runtime backend.

mod container;
pub mod stdio;

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
};

use async_trait::async_trait;
use containerd_shim::asynchronous::io::Stdio;
use containerd_shim_protos::{
    api::{self, Status},
    events::task::{
        TaskCheckpointed, TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO,
        TaskOOM, TaskPaused, TaskResumed, TaskStart,
    },
    protobuf::{well_known_types::empty::Empty, Message as _, MessageField},
    shim::oci::CheckpointOptions,
    shim_async::Task,
    topics, ttrpc,
    ttrpc::r#async::TtrpcContext,
};
use log::{debug, info, warn};
use protobuf::well_known_types::any::Any;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

pub use container::{timestamp, Container, Process};

use crate::sandbox::{Pod, SANDBOX_ID_ANNOTATION};

use crate::{
    cgroup, checkpoint,
    error::{Error, Result},
    events::EventSink,
    reaper,
    runtime::config::BackendConfig,
    runtime::CheckpointOpts,
    runtime::OciRuntime,
};

type Shared<T> = Arc<Mutex<T>>;

/// The state behind the Task service, shared with the Sandbox and Checkpoint services.
pub struct Tasks {
    containers: std::sync::Mutex<HashMap<String, Shared<Container>>>,
    /// The pod this shim serves, once containerd created it through the Sandbox API.
    pod: std::sync::Mutex<Option<Arc<Pod>>>,
    pub runtime: Arc<dyn OciRuntime>,
    pub events: EventSink,
    /// Cancelled when the shim should exit.
    pub shutdown: CancellationToken,
}

impl Tasks {
    pub fn new(runtime: Arc<dyn OciRuntime>, events: EventSink) -> Arc<Self> {
        Arc::new(Tasks {
            containers: Default::default(),
            pod: Default::default(),
            runtime,
            events,
            shutdown: CancellationToken::new(),
        })
    }

    pub fn get(&self, id: &str) -> Result<Shared<Container>> {
        self.containers
            .lock()
            .unwrap()
            .get(id)
            .cloned()
            .ok_or_else(|| Error::not_found("container", id))
    }

    pub fn pod(&self) -> Option<Arc<Pod>> {
        self.pod.lock().unwrap().clone()
    }

    pub fn set_pod(&self, pod: Arc<Pod>) {
        *self.pod.lock().unwrap() = Some(pod);
    }

    /// The pod, if `id` is its sandbox id.
    fn pod_named(&self, id: &str) -> Option<Arc<Pod>> {
        self.pod().filter(|p| p.id == id)
    }

    /// Kills every container's processes and waits up to `timeout` for their inits to exit.
    pub async fn kill_all(&self, timeout: std::time::Duration) {
        let containers: Vec<_> = self.containers.lock().unwrap().values().cloned().collect();
        let mut waits = Vec::new();
        for container in containers {
            let c = container.lock().await;
            if c.init.exit().is_some() || c.init.pid == 0 {
                continue;
            }
            if c.init.status == Status::PAUSED {
                let _ = self.runtime.resume(&c.id).await;
            }
            if let Err(e) = self.runtime.kill(&c.id, libc::SIGKILL as u32, true).await {
                warn!("{}: kill: {e}", c.id);
                // A container of a gVisor sandbox that cannot be signalled (created, never
                // started) ends with the sandbox itself: do not wait for it here.
                if self.runtime.checkpoints_whole_sandbox() {
                    continue;
                }
            }
            waits.push(c.init.exited.subscribe());
        }
        let all = async {
            for mut rx in waits {
                let _ = rx.wait_for(|e| e.is_some()).await;
            }
        };
        if tokio::time::timeout(timeout, all).await.is_err() {
            warn!("containers did not all exit within {timeout:?}");
        }
    }

    pub fn is_empty(&self) -> bool {
        self.containers.lock().unwrap().is_empty()
    }

    pub fn ids(&self) -> Vec<String> {
        self.containers.lock().unwrap().keys().cloned().collect()
    }

    async fn create(&self, req: api::CreateTaskRequest) -> Result<api::CreateTaskResponse> {
        let id = req.id.clone();
        if id.is_empty() {
            return Err(Error::invalid("<empty>", "container id is empty"));
        }
        if self.containers.lock().unwrap().contains_key(&id) {
            return Err(Error::AlreadyExists {
                kind: "container",
                id,
            });
        }
        if let Some(o) = req.options.as_ref() {
            debug!(
                "{id}: runtime options {} ({} bytes)",
                o.type_url,
                o.value.len()
            );
            // One shim drives one runtime: a container whose handler asks for another one was
            // routed to the wrong pod.
            let wanted = BackendConfig::from_options(&id, &o.type_url, &o.value)?.map(|b| b.engine);
            if let Some(wanted) = wanted.filter(|w| *w != self.runtime.engine()) {
                return Err(Error::precondition(
                    &id,
                    format!(
                        "the container's runtime handler asks for {wanted}, but its pod runs on {}",
                        self.runtime.engine()
                    ),
                ));
            }
        }
        let bundle = PathBuf::from(&req.bundle);
        let mut spec = read_spec(&id, &bundle)?;
        let original = spec.clone();
        self.place_in_pod(&id, &mut spec);
        self.runtime.adapt_container_spec(&mut spec);
        if spec != original {
            write_spec(&id, &bundle, &spec)?;
        }
        let cgroup_path = spec
            .pointer("/linux/cgroupsPath")
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_string();
        let terminal = spec
            .pointer("/process/terminal")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        if terminal != req.terminal {
            return Err(Error::invalid(
                &id,
                format!(
                    "config.json process.terminal is {terminal} but the request asks for terminal={}",
                    req.terminal
                ),
            ));
        }

        // A restore comes either from containerd (Task API: `checkpoint` holds CRIU images) or
        // from a pod checkpoint (CRI: an annotation names the container's checkpoint dir).
        let pod_restore_dir = spec
            .pointer("/annotations")
            .and_then(|a| a.get(stasis_api::RESTORE_ANNOTATION))
            .and_then(|v| v.as_str())
            .map(PathBuf::from);
        if let Some(dir) = &pod_restore_dir {
            checkpoint::pod::check_restore_dir(&id, dir, self.runtime.as_ref())?;
        }
        let restore_from = if !req.checkpoint.is_empty() {
            Some(PathBuf::from(&req.checkpoint))
        } else {
            pod_restore_dir
                .as_ref()
                .map(|d| self.runtime.restore_image(d))
        };
        if let Some(image) = &restore_from {
            if !self.runtime.has_image(image) {
                return Err(Error::invalid(
                    &id,
                    format!(
                        "{} holds no {} checkpoint images",
                        image.display(),
                        self.runtime.name()
                    ),
                ));
            }
        }
        let rootfs_mount = mount_rootfs(&id, &bundle, &req.rootfs)?;
        let rootfs_upper = req.rootfs.iter().find_map(|m| {
            m.options
                .iter()
                .find_map(|o| o.strip_prefix("upperdir=").map(PathBuf::from))
        });
        if let (Some(dir), Some(rootfs)) = (&pod_restore_dir, &rootfs_mount) {
            if let Err(e) = checkpoint::rootfs::apply(&id, dir, rootfs) {
                unmount(rootfs);
                return Err(e);
            }
        }
        let stdio = Stdio::new(&req.stdin, &req.stdout, &req.stderr, req.terminal);
        let mut init = Process::new("", stdio.clone());
        // A restored task's processes come back at Start, from the images.
        let created = if restore_from.is_some() {
            Ok(())
        } else {
            self.create_init(&id, &bundle, &stdio)
                .await
                .map(|(pid, io)| {
                    init.pid = pid;
                    init.io = io;
                })
        };
        if let Err(e) = created {
            warn!("{id}: create failed, cleaning up: {e}");
            let _ = self.runtime.delete(&id, true).await;
            init.io.copies.abort().await;
            if let Some(target) = &rootfs_mount {
                unmount(target);
            }
            return Err(e);
        }

        let pid = init.pid;
        let restoring = restore_from.is_some();
        if !restoring {
            self.watch_oom(&id, &cgroup_path);
        }
        let container = Arc::new(Mutex::new(Container {
            id: id.clone(),
            bundle: bundle.clone(),
            rootfs_mount,
            cgroup_path,
            init,
            execs: HashMap::new(),
            rootfs_upper,
            spec,
            resume_pending: pod_restore_dir.is_some(),
            restore_from,
        }));
        self.containers
            .lock()
            .unwrap()
            .insert(id.clone(), container.clone());
        if !restoring {
            self.watch_exit(container, id.clone(), String::new(), pid);
        }

        self.events
            .publish(
                topics::TASK_CREATE_EVENT_TOPIC,
                Box::new(TaskCreate {
                    container_id: id.clone(),
                    bundle: req.bundle.clone(),
                    rootfs: req.rootfs.clone(),
                    io: MessageField::some(TaskIO {
                        stdin: req.stdin.clone(),
                        stdout: req.stdout.clone(),
                        stderr: req.stderr.clone(),
                        terminal: req.terminal,
                        ..Default::default()
                    }),
                    checkpoint: req.checkpoint.clone(),
                    pid: pid as u32,
                    ..Default::default()
                }),
            )
            .await;
        info!("{id}: created, pid {pid}");
        Ok(api::CreateTaskResponse {
            pid: pid as u32,
            ..Default::default()
        })
    }

    /// Brings a task created from a checkpoint back: its volumes, then its processes.
    async fn restore_init(
        &self,
        container: &Shared<Container>,
        c: &mut Container,
        image: &Path,
    ) -> Result<()> {
        let id = c.id.clone();
        let start = std::time::Instant::now();
        let recorded = checkpoint::DumpRecord::read(image);
        // A pod checkpoint keeps volumes in the container's own checkpoint/ (the images may be
        // the whole sandbox's, elsewhere); a Task API checkpoint keeps them with the images.
        let volumes_dir = c
            .spec
            .pointer("/annotations")
            .and_then(|a| a.get(stasis_api::RESTORE_ANNOTATION))
            .and_then(|v| v.as_str())
            .map(|d| Path::new(d).join("checkpoint"))
            .unwrap_or_else(|| image.to_path_buf());
        checkpoint::volumes::restore(&id, &c.spec, &volumes_dir)?;
        let opts = CheckpointOpts {
            image_path: image.to_path_buf(),
            work_path: c.bundle.join("criu-restore-work"),
            shell_job: c.init.stdio.terminal,
            tcp_established: recorded.tcp_established,
            ext_unix_sk: recorded.ext_unix_sk,
            file_locks: recorded.file_locks,
            ..Default::default()
        };
        std::fs::create_dir_all(&opts.work_path)
            .map_err(|e| Error::io(&id, "create restore work dir", e))?;
        let mut prepared = stdio::prepare(&id, &c.init.stdio)?;
        let pid_file = c.bundle.join("init.pid");
        let runtime_io = prepared.take_runtime();
        if let Err(e) = self
            .runtime
            .restore(&id, &c.bundle, &opts, runtime_io, &pid_file)
            .await
        {
            prepared.io.copies.abort().await;
            let _ = self.runtime.delete(&id, true).await;
            return Err(e);
        }
        let io = prepared.finish(&id).await?;
        let pid = stdio::read_pid(&id, &pid_file)?;
        c.init.pid = pid;
        c.init.io = io;
        c.restore_from = None;
        // A runtime that restores the whole sandbox at once needs no hold.
        if c.resume_pending && self.runtime.checkpoints_whole_sandbox() {
            c.resume_pending = false;
        }
        if c.resume_pending {
            // Hold it until the whole pod is restored: a container that ran now could change
            // files another container of the pod has open, and CRIU would refuse that one.
            if let Err(e) =
                cgroup::freezer::for_cgroup(&id, &c.cgroup_path).and_then(|f| f.freeze())
            {
                warn!("{id}: cannot hold the restored container until the pod is complete: {e}");
                c.resume_pending = false;
            }
        }
        self.watch_oom(&id, &c.cgroup_path);
        self.watch_exit(container.clone(), id.clone(), String::new(), pid);
        info!(
            "{id}: restored from {} in {:?}, pid {pid}",
            image.display(),
            start.elapsed()
        );
        Ok(())
    }

    async fn checkpoint(&self, req: api::CheckpointTaskRequest) -> Result<()> {
        if self.runtime.checkpoints_whole_sandbox() && self.pod().is_some() {
            return Err(Error::precondition(
                &req.id,
                format!(
                    "{} saves a pod's sandbox as a whole, not one container of it: checkpoint the pod (stasisctl pod checkpoint)",
                    self.runtime.name()
                ),
            ));
        }
        let container = self.get(&req.id)?;
        let c = container.lock().await;
        if !matches!(c.init.status, Status::RUNNING | Status::PAUSED) {
            return Err(Error::precondition(
                &req.id,
                format!("cannot checkpoint a container that is {:?}", c.init.status),
            ));
        }
        let mut o = CheckpointOptions::default();
        if let Some(any) = req.options.as_ref() {
            if any.type_url.ends_with("CheckpointOptions") {
                o = CheckpointOptions::parse_from_bytes(&any.value)
                    .map_err(|e| Error::invalid(&req.id, format!("checkpoint options: {e}")))?;
            }
        }
        let image_path = if o.image_path.is_empty() {
            req.path.clone()
        } else {
            o.image_path.clone()
        };
        if image_path.is_empty() {
            return Err(Error::invalid(&req.id, "checkpoint without an image path"));
        }
        let work_path = if o.work_path.is_empty() {
            c.bundle.join("criu-work")
        } else {
            PathBuf::from(&o.work_path)
        };
        let opts = CheckpointOpts {
            image_path: PathBuf::from(&image_path),
            work_path,
            leave_running: !o.exit,
            tcp_established: o.open_tcp,
            ext_unix_sk: o.external_unix_sockets,
            shell_job: o.terminal || c.init.stdio.terminal,
            file_locks: o.file_locks,
            empty_ns: o.empty_namespaces.clone(),
            cgroups_mode: o.cgroups_mode.clone(),
        };
        let target = checkpoint::Target {
            id: &req.id,
            cgroup_path: &c.cgroup_path,
            spec: &c.spec,
            paused: c.init.status == Status::PAUSED,
        };
        let timings =
            checkpoint::checkpoint_container(self.runtime.as_ref(), target, &opts).await?;
        checkpoint::DumpRecord::new(&opts, &timings).write(&opts.image_path);
        drop(c);
        self.events
            .publish(
                topics::TASK_CHECKPOINTED_EVENT_TOPIC,
                Box::new(TaskCheckpointed {
                    container_id: req.id.clone(),
                    checkpoint: image_path,
                    ..Default::default()
                }),
            )
            .await;
        Ok(())
    }

    /// Thaws every container restored from a pod checkpoint and held frozen until the pod was
    /// complete. Returns their ids.
    pub async fn finish_restore(&self) -> Result<Vec<String>> {
        let containers: Vec<_> = self.containers.lock().unwrap().values().cloned().collect();
        let mut resumed = Vec::new();
        for container in containers {
            let mut c = container.lock().await;
            if !c.resume_pending || c.init.pid == 0 {
                continue;
            }
            cgroup::freezer::for_cgroup(&c.id, &c.cgroup_path)?.thaw()?;
            c.resume_pending = false;
            resumed.push(c.id.clone());
        }
        info!("resumed restored containers {resumed:?}");
        Ok(resumed)
    }

    /// A container of this shim's pod goes below the pod cgroup, whatever path CRI chose.
    fn place_in_pod(&self, id: &str, spec: &mut serde_json::Value) {
        let Some(pod) = self.pod() else {
            return;
        };
        let sandbox = spec
            .pointer(&format!(
                "/annotations/{}",
                SANDBOX_ID_ANNOTATION.replace('/', "~1")
            ))
            .and_then(|v| v.as_str());
        if sandbox != Some(pod.id.as_str()) {
            return;
        }
        let wanted = pod.container_cgroup(id);
        let current = spec.pointer("/linux/cgroupsPath").and_then(|v| v.as_str());
        if current.is_some_and(|c| c.starts_with(&format!("{}/", pod.cgroup.trim_end_matches('/'))))
        {
            return;
        }
        if let Some(linux) = spec.get_mut("linux").and_then(|l| l.as_object_mut()) {
            linux.insert("cgroupsPath".into(), serde_json::Value::String(wanted));
        }
    }

    async fn create_init(
        &self,
        id: &str,
        bundle: &Path,
        stdio: &Stdio,
    ) -> Result<(i32, stdio::ProcessIo)> {
        let mut prepared = stdio::prepare(id, stdio)?;
        let pid_file = bundle.join("init.pid");
        let runtime_io = prepared.take_runtime();
        if let Err(e) = self.runtime.create(id, bundle, runtime_io, &pid_file).await {
            prepared.io.copies.abort().await;
            return Err(e);
        }
        let io = prepared.finish(id).await?;
        let pid = stdio::read_pid(id, &pid_file)?;
        Ok((pid, io))
    }

    fn watch_oom(&self, id: &str, cgroup_path: &str) {
        let events = self.events.clone();
        let handle = tokio::runtime::Handle::current();
        let container_id = id.to_string();
        let watched = cgroup::watch_oom(id, cgroup_path, move || {
            let events = events.clone();
            let container_id = container_id.clone();
            handle.spawn(async move {
                events
                    .publish(
                        topics::TASK_OOM_EVENT_TOPIC,
                        Box::new(TaskOOM {
                            container_id,
                            ..Default::default()
                        }),
                    )
                    .await;
            });
        });
        if let Err(e) = watched {
            warn!("{id}: no OOM events: {e}");
        }
    }

    /// Waits for a process to exit, then records it, drains its output and tells containerd.
    fn watch_exit(&self, container: Shared<Container>, id: String, exec_id: String, pid: i32) {
        let events = self.events.clone();
        let runtime = self.runtime.clone();
        tokio::spawn(async move {
            let exit = if exec_id.is_empty() {
                runtime.wait_init(&id, pid).await
            } else {
                reaper::wait(pid).await
            };
            debug!("{id}/{exec_id}: pid {pid} exited with {}", exit.status);
            // Deliver all output before containerd hears of the exit.
            let io = {
                let c = container.lock().await;
                c.process(&exec_id).map(|p| p.io.copies.clone())
            };
            if let Some(io) = io {
                io.shutdown().await;
            }
            let mut c = container.lock().await;
            let Some(p) = c.process_mut(&exec_id) else {
                return;
            };
            p.status = Status::STOPPED;
            p.exited.send_replace(Some(exit));
            events
                .publish(
                    topics::TASK_EXIT_EVENT_TOPIC,
                    Box::new(TaskExit {
                        container_id: id.clone(),
                        id: if exec_id.is_empty() {
                            id.clone()
                        } else {
                            exec_id.clone()
                        },
                        pid: pid as u32,
                        exit_status: exit.status as u32,
                        exited_at: MessageField::some(timestamp(exit.at)),
                        ..Default::default()
                    }),
                )
                .await;
        });
    }

    async fn start(&self, req: api::StartRequest) -> Result<api::StartResponse> {
        let container = self.get(&req.id)?;
        let mut c = container.lock().await;
        if req.exec_id.is_empty() {
            if c.init.status != Status::CREATED {
                return Err(Error::precondition(
                    &req.id,
                    format!("cannot start a container in state {:?}", c.init.status),
                ));
            }
            if let Some(image) = c.restore_from.clone() {
                self.restore_init(&container, &mut c, &image).await?;
            } else {
                self.runtime.start(&req.id).await?;
            }
            if c.init.exit().is_none() {
                c.init.status = Status::RUNNING;
            }
            let pid = c.init.pid;
            self.events
                .publish(
                    topics::TASK_START_EVENT_TOPIC,
                    Box::new(TaskStart {
                        container_id: req.id.clone(),
                        pid: pid as u32,
                        ..Default::default()
                    }),
                )
                .await;
            info!("{}: started", req.id);
            return Ok(api::StartResponse {
                pid: pid as u32,
                ..Default::default()
            });
        }

        if c.init.status != Status::RUNNING {
            return Err(Error::precondition(
                &req.id,
                format!(
                    "cannot start exec {} in a container that is {:?}",
                    req.exec_id, c.init.status
                ),
            ));
        }
        let exec = c
            .execs
            .get(&req.exec_id)
            .ok_or_else(|| Error::not_found("exec", format!("{}/{}", req.id, req.exec_id)))?;
        if exec.status != Status::CREATED {
            return Err(Error::precondition(
                format!("{}/{}", req.id, req.exec_id),
                "exec process already started",
            ));
        }
        let spec_path = exec.spec_path.clone().unwrap_or_default();
        let mut prepared = stdio::prepare(&req.id, &exec.stdio)?;
        let pid_file = c.bundle.join(format!("{}.pid", req.exec_id));
        let runtime_io = prepared.take_runtime();
        if let Err(e) = self
            .runtime
            .exec(&req.id, &spec_path, runtime_io, &pid_file)
            .await
        {
            prepared.io.copies.abort().await;
            return Err(e);
        }
        let io = prepared.finish(&req.id).await?;
        let pid = stdio::read_pid(&req.id, &pid_file)?;
        let _ = std::fs::remove_file(&pid_file);
        let exec = c.execs.get_mut(&req.exec_id).expect("exec checked above");
        exec.pid = pid;
        exec.io = io;
        exec.status = Status::RUNNING;
        self.watch_exit(container.clone(), req.id.clone(), req.exec_id.clone(), pid);
        self.events
            .publish(
                topics::TASK_EXEC_STARTED_EVENT_TOPIC,
                Box::new(TaskExecStarted {
                    container_id: req.id.clone(),
                    exec_id: req.exec_id.clone(),
                    pid: pid as u32,
                    ..Default::default()
                }),
            )
            .await;
        Ok(api::StartResponse {
            pid: pid as u32,
            ..Default::default()
        })
    }

    async fn state(&self, req: api::StateRequest) -> Result<api::StateResponse> {
        if let Some(pod) = self.pod_named(&req.id) {
            let exit = pod.exit();
            return Ok(api::StateResponse {
                id: req.id.clone(),
                bundle: pod.bundle.display().to_string(),
                pid: pod.pid().await as u32,
                status: if exit.is_some() {
                    Status::STOPPED
                } else {
                    Status::RUNNING
                }
                .into(),
                exit_status: exit.map(|e| e.status as u32).unwrap_or_default(),
                exited_at: exit.map(|e| timestamp(e.at)).into(),
                ..Default::default()
            });
        }
        let container = self.get(&req.id)?;
        let c = container.lock().await;
        let p = c
            .process(&req.exec_id)
            .ok_or_else(|| Error::not_found("exec", format!("{}/{}", req.id, req.exec_id)))?;
        Ok(api::StateResponse {
            id: req.id.clone(),
            bundle: c.bundle.display().to_string(),
            pid: p.pid as u32,
            status: p.status.into(),
            stdin: p.stdio.stdin.clone(),
            stdout: p.stdio.stdout.clone(),
            stderr: p.stdio.stderr.clone(),
            terminal: p.stdio.terminal,
            exit_status: p.exit_status(),
            exited_at: p.exited_at().into(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        })
    }

    async fn delete(&self, req: api::DeleteRequest) -> Result<api::DeleteResponse> {
        let container = self.get(&req.id)?;
        let mut c = container.lock().await;
        if !req.exec_id.is_empty() {
            let p = c
                .execs
                .get(&req.exec_id)
                .ok_or_else(|| Error::not_found("exec", format!("{}/{}", req.id, req.exec_id)))?;
            if p.status == Status::RUNNING {
                return Err(Error::precondition(
                    format!("{}/{}", req.id, req.exec_id),
                    "cannot delete a running exec process",
                ));
            }
            let p = c.execs.remove(&req.exec_id).expect("checked above");
            p.io.copies.shutdown().await;
            if let Some(spec) = &p.spec_path {
                let _ = std::fs::remove_file(spec);
            }
            return Ok(api::DeleteResponse {
                pid: p.pid as u32,
                exit_status: p.exit_status(),
                exited_at: p.exited_at().into(),
                ..Default::default()
            });
        }
        if matches!(c.init.status, Status::RUNNING | Status::PAUSED) {
            return Err(Error::precondition(
                &req.id,
                format!(
                    "cannot delete a container that is {:?}; kill it first",
                    c.init.status
                ),
            ));
        }
        self.runtime.delete(&req.id, true).await?;
        // A container deleted while only created has no exit yet: its init was killed by the
        // forced delete above, and its watcher records that.
        c.init.io.copies.shutdown().await;
        if let Some(target) = c.rootfs_mount.take() {
            unmount(&target);
        }
        let _ = std::fs::remove_file(c.bundle.join("init.pid"));
        for p in c.execs.values() {
            p.io.copies.abort().await;
        }
        let resp = api::DeleteResponse {
            pid: c.init.pid as u32,
            exit_status: c.init.exit_status(),
            exited_at: c.init.exited_at().into(),
            ..Default::default()
        };
        drop(c);
        self.containers.lock().unwrap().remove(&req.id);
        self.events
            .publish(
                topics::TASK_DELETE_EVENT_TOPIC,
                Box::new(TaskDelete {
                    container_id: req.id.clone(),
                    pid: resp.pid,
                    exit_status: resp.exit_status,
                    exited_at: resp.exited_at.clone(),
                    id: req.id.clone(),
                    ..Default::default()
                }),
            )
            .await;
        info!("{}: deleted", req.id);
        Ok(resp)
    }

    async fn kill(&self, req: api::KillRequest) -> Result<()> {
        let container = self.get(&req.id)?;
        let c = container.lock().await;
        if req.exec_id.is_empty() {
            if c.init.status == Status::STOPPED && !req.all {
                return Err(Error::not_found(
                    "process",
                    format!("{} (already finished)", req.id),
                ));
            }
            return match self.runtime.kill(&req.id, req.signal, req.all).await {
                // The process ended between our look and runc's: nothing left to signal.
                Err(Error::Runtime { message, .. })
                    if message.contains("not running") || message.contains("no such process") =>
                {
                    Err(Error::not_found(
                        "process",
                        format!("{} (already finished)", req.id),
                    ))
                }
                other => other,
            };
        }
        let p = c
            .execs
            .get(&req.exec_id)
            .ok_or_else(|| Error::not_found("exec", format!("{}/{}", req.id, req.exec_id)))?;
        if p.status != Status::RUNNING {
            return Err(Error::not_found(
                "process",
                format!("{}/{} (not running)", req.id, req.exec_id),
            ));
        }
        let sig = nix::sys::signal::Signal::try_from(req.signal as i32)
            .map_err(|_| Error::invalid(&req.id, format!("unknown signal {}", req.signal)))?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(p.pid), sig)
            .map_err(|e| Error::io(&req.id, format!("signal exec {}", req.exec_id), e.into()))
    }

    async fn exec(&self, req: api::ExecProcessRequest) -> Result<()> {
        let container = self.get(&req.id)?;
        let mut c = container.lock().await;
        let name = format!("{}/{}", req.id, req.exec_id);
        if req.exec_id.is_empty() {
            return Err(Error::invalid(&req.id, "exec id is empty"));
        }
        if c.execs.contains_key(&req.exec_id) {
            return Err(Error::AlreadyExists {
                kind: "exec",
                id: name,
            });
        }
        if c.init.status != Status::RUNNING {
            return Err(Error::precondition(
                &name,
                format!("container is {:?}", c.init.status),
            ));
        }
        let spec = req
            .spec
            .as_ref()
            .ok_or_else(|| Error::invalid(&name, "exec without a process spec"))?;
        serde_json::from_slice::<serde_json::Value>(&spec.value)
            .map_err(|e| Error::invalid(&name, format!("process spec is not valid JSON: {e}")))?;
        let spec_path = c.bundle.join(format!("{}.process.json", req.exec_id));
        std::fs::write(&spec_path, &spec.value)
            .map_err(|e| Error::io(&name, "write exec process spec", e))?;
        let mut p = Process::new(
            &req.exec_id,
            Stdio::new(&req.stdin, &req.stdout, &req.stderr, req.terminal),
        );
        p.spec_path = Some(spec_path);
        c.execs.insert(req.exec_id.clone(), p);
        self.events
            .publish(
                topics::TASK_EXEC_ADDED_EVENT_TOPIC,
                Box::new(TaskExecAdded {
                    container_id: req.id.clone(),
                    exec_id: req.exec_id.clone(),
                    ..Default::default()
                }),
            )
            .await;
        Ok(())
    }

    async fn pause(&self, id: &str) -> Result<()> {
        if self.runtime.checkpoints_whole_sandbox() && self.pod().is_some() {
            // runsc pauses the whole sandbox kernel, not one container of it.
            return Err(Error::precondition(
                id,
                format!(
                    "{} cannot pause one container of a pod, it would pause the whole pod (containerd pauses a task before checkpointing it: to checkpoint, checkpoint the pod with stasisctl pod checkpoint)",
                    self.runtime.name()
                ),
            ));
        }
        let container = self.get(id)?;
        let mut c = container.lock().await;
        if c.init.status != Status::RUNNING {
            return Err(Error::precondition(
                id,
                format!("cannot pause a container that is {:?}", c.init.status),
            ));
        }
        self.runtime.pause(id).await?;
        c.init.status = Status::PAUSED;
        self.events
            .publish(
                topics::TASK_PAUSED_EVENT_TOPIC,
                Box::new(TaskPaused {
                    container_id: id.to_string(),
                    ..Default::default()
                }),
            )
            .await;
        Ok(())
    }

    async fn resume(&self, id: &str) -> Result<()> {
        let container = self.get(id)?;
        let mut c = container.lock().await;
        if c.init.status != Status::PAUSED {
            return Err(Error::precondition(
                id,
                format!("cannot resume a container that is {:?}", c.init.status),
            ));
        }
        self.runtime.resume(id).await?;
        c.init.status = Status::RUNNING;
        self.events
            .publish(
                topics::TASK_RESUMED_EVENT_TOPIC,
                Box::new(TaskResumed {
                    container_id: id.to_string(),
                    ..Default::default()
                }),
            )
            .await;
        Ok(())
    }

    async fn pids(&self, id: &str) -> Result<api::PidsResponse> {
        if let Some(pod) = self.pod_named(id) {
            return Ok(api::PidsResponse {
                processes: vec![api::ProcessInfo {
                    pid: pod.pid().await as u32,
                    ..Default::default()
                }],
                ..Default::default()
            });
        }
        let container = self.get(id)?;
        let exec_pids: HashMap<u32, String> = {
            let c = container.lock().await;
            c.execs
                .values()
                .map(|p| (p.pid as u32, p.exec_id.clone()))
                .collect()
        };
        let pids = self.runtime.pids(id).await?;
        let processes = pids
            .into_iter()
            .map(|pid| {
                let mut info = api::ProcessInfo {
                    pid,
                    ..Default::default()
                };
                if let Some(exec_id) = exec_pids.get(&pid) {
                    let details = containerd_shim_protos::shim::oci::ProcessDetails {
                        exec_id: exec_id.clone(),
                        ..Default::default()
                    };
                    if let Ok(any) = Any::pack(&details) {
                        info.info = MessageField::some(any);
                    }
                }
                info
            })
            .collect();
        Ok(api::PidsResponse {
            processes,
            ..Default::default()
        })
    }

    async fn wait(&self, req: api::WaitRequest) -> Result<api::WaitResponse> {
        if let Some(pod) = self.pod_named(&req.id) {
            let mut rx = pod.wait_exit();
            let exit = rx
                .wait_for(|e| e.is_some())
                .await
                .map(|e| e.expect("waited for Some"))
                .map_err(|_| Error::not_found("sandbox", &req.id))?;
            return Ok(api::WaitResponse {
                exit_status: exit.status as u32,
                exited_at: MessageField::some(timestamp(exit.at)),
                ..Default::default()
            });
        }
        let mut rx = {
            let container = self.get(&req.id)?;
            let c = container.lock().await;
            c.process(&req.exec_id)
                .ok_or_else(|| Error::not_found("exec", format!("{}/{}", req.id, req.exec_id)))?
                .exited
                .subscribe()
        };
        let exit = loop {
            if let Some(exit) = *rx.borrow_and_update() {
                break exit;
            }
            if rx.changed().await.is_err() {
                return Err(Error::not_found("process", format!("{} (deleted)", req.id)));
            }
        };
        Ok(api::WaitResponse {
            exit_status: exit.status as u32,
            exited_at: MessageField::some(timestamp(exit.at)),
            ..Default::default()
        })
    }

    async fn stats(&self, id: &str) -> Result<api::StatsResponse> {
        let container = self.get(id)?;
        let path = container.lock().await.cgroup_path.clone();
        let stats = cgroup::metrics(id, &path)?;
        Ok(api::StatsResponse {
            stats: MessageField::some(stats),
            ..Default::default()
        })
    }

    async fn update(&self, req: api::UpdateTaskRequest) -> Result<()> {
        let container = self.get(&req.id)?;
        let _c = container.lock().await;
        let resources = req
            .resources
            .as_ref()
            .ok_or_else(|| Error::invalid(&req.id, "update without resources"))?;
        self.runtime.update(&req.id, &resources.value).await
    }

    async fn resize_pty(&self, req: api::ResizePtyRequest) -> Result<()> {
        let container = self.get(&req.id)?;
        let c = container.lock().await;
        let p = c
            .process(&req.exec_id)
            .ok_or_else(|| Error::not_found("exec", format!("{}/{}", req.id, req.exec_id)))?;
        let pty =
            p.io.pty
                .as_ref()
                .ok_or_else(|| Error::precondition(&req.id, "process has no terminal"))?;
        stdio::resize(pty, req.width, req.height)
            .map_err(|e| Error::io(&req.id, "resize terminal", e))
    }

    async fn close_io(&self, req: api::CloseIORequest) -> Result<()> {
        let container = self.get(&req.id)?;
        let c = container.lock().await;
        let p = c
            .process(&req.exec_id)
            .ok_or_else(|| Error::not_found("exec", format!("{}/{}", req.id, req.exec_id)))?;
        if req.stdin {
            p.io.copies.close_input();
        }
        Ok(())
    }

    /// The pid of a container's init (or of the pod's pause process), for Connect.
    pub async fn init_pid(&self, id: &str) -> Result<u32> {
        if let Some(pod) = self.pod_named(id) {
            return Ok(pod.pid().await as u32);
        }
        Ok(self.get(id)?.lock().await.init.pid as u32)
    }
}

fn read_spec(id: &str, bundle: &Path) -> Result<serde_json::Value> {
    let path = bundle.join("config.json");
    let text =
        std::fs::read(&path).map_err(|e| Error::io(id, format!("read {}", path.display()), e))?;
    let spec: serde_json::Value = serde_json::from_slice(&text)
        .map_err(|e| Error::invalid(id, format!("{} is not valid JSON: {e}", path.display())))?;
    if !spec.is_object() || spec.get("process").is_none() || spec.get("root").is_none() {
        return Err(Error::invalid(
            id,
            format!(
                "{} is not an OCI runtime spec (needs \"process\" and \"root\")",
                path.display()
            ),
        ));
    }
    Ok(spec)
}

/// Rewrites config.json after the shim adapted it to the pod (cgroup) and the runtime.
fn write_spec(id: &str, bundle: &Path, spec: &serde_json::Value) -> Result<()> {
    let text =
        serde_json::to_vec_pretty(spec).map_err(|e| Error::other(id, "encode config.json", e))?;
    std::fs::write(bundle.join("config.json"), text)
        .map_err(|e| Error::io(id, "rewrite config.json for the pod", e))
}

fn mount_rootfs(
    id: &str,
    bundle: &Path,
    mounts: &[containerd_shim_protos::types::mount::Mount],
) -> Result<Option<PathBuf>> {
    if mounts.is_empty() {
        return Ok(None);
    }
    let target = bundle.join("rootfs");
    std::fs::create_dir_all(&target).map_err(|e| Error::io(id, "create rootfs dir", e))?;
    for m in mounts {
        let fs_type = (!m.type_.is_empty()).then_some(m.type_.as_str());
        let source = (!m.source.is_empty()).then_some(m.source.as_str());
        if let Err(e) = containerd_shim::mount::mount_rootfs(fs_type, source, &m.options, &target) {
            unmount(&target);
            return Err(Error::other(id, format!("mount rootfs {}", m.type_), e));
        }
    }
    Ok(Some(target))
}

/// Unmounts everything at `target` (a rootfs may carry several layers of mounts).
pub fn unmount(target: &Path) {
    for _ in 0..8 {
        match nix::mount::umount2(target, nix::mount::MntFlags::MNT_DETACH) {
            Ok(()) => continue,
            Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => return,
            Err(e) => {
                warn!("unmount {}: {e}", target.display());
                return;
            }
        }
    }
}

/// The Task service as containerd sees it; registered under both task API versions.
#[derive(Clone)]
pub struct TaskService {
    pub tasks: Arc<Tasks>,
}

fn rpc<T>(r: Result<T>) -> ttrpc::Result<T> {
    r.map_err(|e| {
        warn!("{e}");
        e.into()
    })
}

#[async_trait]
impl Task for TaskService {
    async fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> ttrpc::Result<api::StateResponse> {
        rpc(self.tasks.state(req).await)
    }

    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> ttrpc::Result<api::CreateTaskResponse> {
        rpc(self.tasks.create(req).await)
    }

    async fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> ttrpc::Result<api::StartResponse> {
        rpc(self.tasks.start(req).await)
    }

    async fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> ttrpc::Result<api::DeleteResponse> {
        rpc(self.tasks.delete(req).await)
    }

    async fn pids(
        &self,
        _ctx: &TtrpcContext,
        req: api::PidsRequest,
    ) -> ttrpc::Result<api::PidsResponse> {
        rpc(self.tasks.pids(&req.id).await)
    }

    async fn pause(&self, _ctx: &TtrpcContext, req: api::PauseRequest) -> ttrpc::Result<Empty> {
        rpc(self.tasks.pause(&req.id).await.map(|_| Empty::new()))
    }

    async fn resume(&self, _ctx: &TtrpcContext, req: api::ResumeRequest) -> ttrpc::Result<Empty> {
        rpc(self.tasks.resume(&req.id).await.map(|_| Empty::new()))
    }

    async fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        req: api::CheckpointTaskRequest,
    ) -> ttrpc::Result<Empty> {
        rpc(self.tasks.checkpoint(req).await.map(|_| Empty::new()))
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> ttrpc::Result<Empty> {
        rpc(self.tasks.kill(req).await.map(|_| Empty::new()))
    }

    async fn exec(
        &self,
        _ctx: &TtrpcContext,
        req: api::ExecProcessRequest,
    ) -> ttrpc::Result<Empty> {
        rpc(self.tasks.exec(req).await.map(|_| Empty::new()))
    }

    async fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> ttrpc::Result<Empty> {
        rpc(self.tasks.resize_pty(req).await.map(|_| Empty::new()))
    }

    async fn close_io(
        &self,
        _ctx: &TtrpcContext,
        req: api::CloseIORequest,
    ) -> ttrpc::Result<Empty> {
        rpc(self.tasks.close_io(req).await.map(|_| Empty::new()))
    }

    async fn update(
        &self,
        _ctx: &TtrpcContext,
        req: api::UpdateTaskRequest,
    ) -> ttrpc::Result<Empty> {
        rpc(self.tasks.update(req).await.map(|_| Empty::new()))
    }

    async fn wait(
        &self,
        _ctx: &TtrpcContext,
        req: api::WaitRequest,
    ) -> ttrpc::Result<api::WaitResponse> {
        rpc(self.tasks.wait(req).await)
    }

    async fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> ttrpc::Result<api::StatsResponse> {
        rpc(self.tasks.stats(&req.id).await)
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> ttrpc::Result<api::ConnectResponse> {
        let task_pid = rpc(self.tasks.init_pid(&req.id).await)?;
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: containerd_shim_protos::TASK_API_VERSION.to_string(),
            ..Default::default()
        })
    }

    async fn shutdown(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ShutdownRequest,
    ) -> ttrpc::Result<Empty> {
        // One shim serves a whole group: it ends only once its last container is gone.
        if self.tasks.is_empty() && self.tasks.pod().is_none() {
            info!("last container gone, shim shutting down");
            self.tasks.shutdown.cancel();
        }
        Ok(Empty::new())
    }
}
