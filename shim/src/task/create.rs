//! Create: a container from containerd's bundle, or a container to be restored from a
//! checkpoint at Start. Every step that leaves something behind registers its undo; a failure
//! runs them in reverse, so a failed Create leaves no mount, runtime state or copier.

use std::{path::PathBuf, sync::Arc};

use containerd_shim::asynchronous::io::{IoTasks, Stdio};
use containerd_shim_protos::{
    api,
    events::task::{TaskCreate, TaskIO},
    protobuf::MessageField,
    topics,
};
use log::{debug, info, warn};
use stasis_api::layout::RESTORE_ANNOTATION;

use super::{unmount, watch};
use crate::{
    checkpoint::source,
    error::{Error, Result},
    fscapture::rootfs,
    process::stdio,
    runtime::{config::BackendConfig, images},
    spec::{ContainerSpec, CRI_SANDBOX_ID},
    state::{Container, Process, Shim, State},
    util::blocking,
};

/// What a failed Create must undo, in reverse order.
enum Undo {
    Unmount(PathBuf),
    RuntimeDelete,
    StopCopies(IoTasks),
}

struct Rollback<'a> {
    shim: &'a Shim,
    id: &'a str,
    steps: Vec<Undo>,
}

impl Rollback<'_> {
    async fn run(self) {
        for step in self.steps.into_iter().rev() {
            match step {
                Undo::Unmount(target) => unmount(&target),
                Undo::RuntimeDelete => {
                    if let Err(e) = self.shim.runtime.delete(self.id, true).await {
                        warn!("{}: undo create: {e}", self.id);
                    }
                }
                Undo::StopCopies(io) => io.abort().await,
            }
        }
    }
}

pub async fn create(shim: &Shim, req: api::CreateTaskRequest) -> Result<api::CreateTaskResponse> {
    let id = req.id.clone();
    if id.is_empty() {
        return Err(Error::invalid("<empty>", "container id is empty"));
    }
    if shim.contains(&id) {
        return Err(Error::AlreadyExists {
            kind: "container",
            id,
        });
    }
    check_runtime_options(shim, &req)?;
    let bundle = PathBuf::from(&req.bundle);
    let spec = load_spec(shim, &req, &bundle)?;
    let restore_dir = restore_dir_of(shim, &id, &spec).await?;
    let image = if !req.checkpoint.is_empty() {
        Some(PathBuf::from(&req.checkpoint))
    } else {
        restore_dir
            .as_ref()
            .map(|d| shim.runtime.hooks().restore_image(d))
    };
    if let Some(image) = &image {
        check_images(shim, &id, &spec, image).await?;
    }

    let spec = Arc::new(spec);
    // The init process is started after this instant (its pid's earlier owners do not count).
    let since = std::time::Instant::now();
    let mut rollback = Rollback {
        shim,
        id: &id,
        steps: Vec::new(),
    };
    let built = build_container(
        shim,
        &req,
        &bundle,
        spec,
        restore_dir,
        image.as_ref(),
        &mut rollback,
    )
    .await;
    let container = match built.and_then(|c| shim.insert(c.clone()).map(|_| c)) {
        Ok(c) => c,
        Err(e) => {
            warn!("{id}: create failed, cleaning up: {e}");
            rollback.run().await;
            return Err(e);
        }
    };

    if let Some(pod) = shim.pod() {
        pod.save_record(shim.ids());
    }
    let pid = container.live().init.pid;
    if image.is_none() {
        watch::oom(shim, &id, &container.cgroup_path);
        watch::exit(shim, container.clone(), String::new(), pid, since);
    }
    publish_created(shim, &req, pid).await;
    info!("{id}: created, pid {pid}");
    Ok(api::CreateTaskResponse {
        pid: pid as u32,
        ..Default::default()
    })
}

/// The bundle's spec, placed in the pod and adapted to the runtime (saved back if that
/// changed it), once it agrees with the request about the terminal.
fn load_spec(
    shim: &Shim,
    req: &api::CreateTaskRequest,
    bundle: &std::path::Path,
) -> Result<ContainerSpec> {
    let id = &req.id;
    let mut spec = ContainerSpec::load(id, bundle)?;
    place_in_pod(shim, id, &mut spec);
    shim.runtime.adapt_container_spec(&mut spec);
    spec.save_if_changed(id, bundle)?;
    if spec.terminal() != req.terminal {
        return Err(Error::invalid(
            id,
            format!(
                "config.json process.terminal is {} but the request asks for terminal={}",
                spec.terminal(),
                req.terminal
            ),
        ));
    }
    Ok(spec)
}

/// The checkpoint directory of a container restored from a pod checkpoint, checked; `None`
/// for a container that is not.
async fn restore_dir_of(shim: &Shim, id: &str, spec: &ContainerSpec) -> Result<Option<PathBuf>> {
    // A restore comes either from containerd (Task API: `checkpoint` holds CRIU images) or
    // from a pod checkpoint (CRI: an annotation names the container's checkpoint dir).
    let restore_dir = match spec.annotation(RESTORE_ANNOTATION) {
        None => None,
        Some(value) => Some(restore_source(shim, id, value)?),
    };
    refuse_unrestored_container_of_restoring_pod(shim, id, spec, restore_dir.is_some())?;
    if let Some(dir) = &restore_dir {
        // Reads the whole rootfs diff: off the async threads.
        let (owned, dir, runtime) = (id.to_string(), dir.clone(), shim.runtime.clone());
        blocking(id, "check checkpoint", move || {
            source::check_container_dir(&owned, &dir, runtime.as_ref())
        })
        .await?;
    }
    Ok(restore_dir)
}

/// Refuses checkpoint images the runtime cannot restore, or (CRIU's) that hold more than the
/// spec grants.
async fn check_images(
    shim: &Shim,
    id: &str,
    spec: &ContainerSpec,
    image: &std::path::Path,
) -> Result<()> {
    if !shim.runtime.hooks().has_image(image) {
        return Err(Error::invalid(
            id,
            format!(
                "{} holds no {} checkpoint images",
                image.display(),
                shim.runtime.name()
            ),
        ));
    }
    // CRIU's images are the archive's word: checked against the spec before CRIU reads
    // them, and before anything of the container is made.
    if shim.runtime.hooks().restores_host_tasks() && !images::test_switch_off() {
        let (owned, image, expected) = (
            id.to_string(),
            image.to_path_buf(),
            images::Expected::of(spec),
        );
        let started = std::time::Instant::now();
        blocking(id, "check the checkpoint's CRIU images", move || {
            images::check(&owned, &image, &expected)
        })
        .await?;
        info!(
            "{id}: CRIU images checked against the spec in {:?}",
            started.elapsed()
        );
    }
    Ok(())
}

/// Makes the container: its rootfs (with a restore's diff applied) and, unless it is restored
/// at Start from `image`, the runtime's container with its init. Each step that leaves
/// something registers its undo in `rollback`.
async fn build_container(
    shim: &Shim,
    req: &api::CreateTaskRequest,
    bundle: &std::path::Path,
    spec: Arc<ContainerSpec>,
    restore_dir: Option<PathBuf>,
    image: Option<&PathBuf>,
    rollback: &mut Rollback<'_>,
) -> Result<Arc<Container>> {
    let id = &req.id;
    let rootfs_mount = mount_rootfs(id, bundle, &req.rootfs)?;
    if let Some(target) = &rootfs_mount {
        rollback.steps.push(Undo::Unmount(target.clone()));
    }
    if let (Some(dir), Some(rootfs)) = (&restore_dir, &rootfs_mount) {
        let (owned, dir, rootfs) = (id.clone(), dir.clone(), rootfs.clone());
        blocking(id, "apply rootfs diff", move || {
            rootfs::apply(&owned, &dir, &rootfs)
        })
        .await?;
    }
    let stdio = Stdio::new(&req.stdin, &req.stdout, &req.stderr, req.terminal);
    let mut init = Process::new("", stdio.clone());
    // A restored task's processes come back at Start, from the images.
    let state = match image {
        Some(image) => State::Restorable {
            image: image.clone(),
        },
        None => {
            let mut prepared = stdio::prepare(id, &stdio).await?;
            rollback
                .steps
                .push(Undo::StopCopies(prepared.io.copies.clone()));
            let pid_file = bundle.join("init.pid");
            rollback.steps.push(Undo::RuntimeDelete);
            let runtime_io = prepared.take_runtime();
            shim.runtime
                .create(id, bundle, runtime_io, &pid_file)
                .await?;
            init.io = prepared.finish(id).await?;
            init.pid = stdio::read_pid(id, &pid_file)?;
            State::Created
        }
    };
    let mut c = Container::new(id.clone(), bundle.to_path_buf(), spec, state, init);
    c.rootfs_upper = req.rootfs.iter().find_map(|m| {
        m.options
            .iter()
            .find_map(|o| o.strip_prefix("upperdir=").map(PathBuf::from))
    });
    c.restore_dir = restore_dir;
    c.live().rootfs_mount = rootfs_mount;
    Ok(Arc::new(c))
}

/// Tells containerd the task exists.
async fn publish_created(shim: &Shim, req: &api::CreateTaskRequest, pid: i32) {
    shim.events
        .publish(
            topics::TASK_CREATE_EVENT_TOPIC,
            Box::new(TaskCreate {
                container_id: req.id.clone(),
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
}

/// One shim drives one runtime: a container whose handler asks for another one was routed to
/// the wrong pod.
fn check_runtime_options(shim: &Shim, req: &api::CreateTaskRequest) -> Result<()> {
    let Some(o) = req.options.as_ref() else {
        return Ok(());
    };
    debug!(
        "{}: runtime options {} ({} bytes)",
        req.id,
        o.type_url,
        o.value.len()
    );
    let wanted = BackendConfig::from_options(&req.id, &o.type_url, &o.value)?.map(|b| b.engine);
    match wanted {
        Some(wanted) if wanted != shim.runtime.engine() => Err(Error::precondition(
            &req.id,
            format!(
                "the container's runtime handler asks for {wanted}, but its pod runs on {}",
                shim.runtime.engine()
            ),
        )),
        _ => Ok(()),
    }
}

/// While a pod is being restored, a container of it without the restore annotation means
/// containerd dropped the annotation (the handler does not allow `io.stasis.*` container
/// annotations): it would start fresh and silently lose its checkpoint, so it is refused.
fn refuse_unrestored_container_of_restoring_pod(
    shim: &Shim,
    id: &str,
    spec: &ContainerSpec,
    from_checkpoint: bool,
) -> Result<()> {
    let Some(pod) = shim.pod() else {
        return Ok(());
    };
    if from_checkpoint
        || !pod.is_restoring()
        || spec.annotation(CRI_SANDBOX_ID) != Some(pod.id.as_str())
        || !spec.joins_pod()
    {
        return Ok(());
    }
    Err(Error::precondition(
        id,
        format!(
            "pod {} is being restored from a checkpoint, but this container arrived without the {RESTORE_ANNOTATION} annotation: containerd passes io.stasis.* container annotations only when the runtime handler allows them (container_annotations = [\"io.stasis.*\"]); it would have started fresh instead of from the checkpoint",
            pod.id
        ),
    ))
}

/// A container of this shim's pod goes below the pod cgroup, whatever path CRI chose.
fn place_in_pod(shim: &Shim, id: &str, spec: &mut ContainerSpec) {
    let Some(pod) = shim.pod() else {
        return;
    };
    if spec.annotation(CRI_SANDBOX_ID) != Some(pod.id.as_str()) {
        return;
    }
    if pod.holds_cgroup(&spec.cgroups_path()) {
        return;
    }
    spec.set_cgroups_path(&pod.container_cgroup(id));
}

fn mount_rootfs(
    id: &str,
    bundle: &std::path::Path,
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

/// The checkpoint directory a container's restore annotation names: in the restore store,
/// and for a container of a pod, only a restore of that same pod (a CRI client cannot point
/// a container of an ordinary pod at a restore, or at another pod's).
fn restore_source(shim: &Shim, id: &str, value: &str) -> Result<PathBuf> {
    let (restore_id, dir) = source::resolve_restore(&shim.restore_store, id, value)?;
    if let Some(pod) = shim.pod() {
        let pods = pod
            .config
            .annotations
            .get(RESTORE_ANNOTATION)
            .map(|v| v.split('/').next().unwrap_or_default().to_string());
        if pods.as_deref() != Some(restore_id.as_str()) {
            return Err(Error::precondition(
                id,
                format!(
                    "names restore {restore_id}, but its pod {} is not being restored from it",
                    pod.id
                ),
            ));
        }
    }
    Ok(dir)
}
