//! containerd's Sandbox API as operations: the shim owns the pod. A pod is a cgroup every
//! container lives below, a process holding the pod's namespaces (our pause process, or the
//! runtime's own sandbox root), and the files CRI bind-mounts into containers.

mod files;
pub mod pause;
pub mod sysctls;
pub mod watchdog;

use std::{path::PathBuf, sync::Arc, time::Duration};

use containerd_shim_protos::{protobuf::MessageField, sandbox_api as sb};
use k8s_cri::v1::PodSandboxConfig;
use log::{info, warn};
use prost::Message as _;
use stasis_api::layout::{PodOptions, RESTORE_ANNOTATION};

use crate::{
    cgroup,
    checkpoint::source,
    error::{Error, Result},
    process::{pidns, reaper},
    runtime::{self, PodRoot},
    state::{
        pod::{PodRecord, ShmMount},
        timestamp, Pod, Shim,
    },
    task,
};

pub const READY: &str = "SANDBOX_READY";
pub const NOT_READY: &str = "SANDBOX_NOTREADY";

fn decode_config(
    id: &str,
    options: Option<&protobuf::well_known_types::any::Any>,
) -> Result<(Vec<u8>, PodSandboxConfig)> {
    let Some(any) = options else {
        return Ok((Vec::new(), PodSandboxConfig::default()));
    };
    if !any.type_url.ends_with("PodSandboxConfig") {
        return Err(Error::invalid(
            id,
            format!(
                "sandbox options are {:?}, expected a CRI PodSandboxConfig",
                any.type_url
            ),
        ));
    }
    let config = PodSandboxConfig::decode(any.value.as_slice())
        .map_err(|e| Error::invalid(id, format!("decode PodSandboxConfig: {e}")))?;
    Ok((any.value.clone(), config))
}

pub async fn create(shim: &Shim, req: sb::CreateSandboxRequest) -> Result<()> {
    let id = req.sandbox_id.clone();
    if let Some(p) = shim.pod() {
        return if p.id == id {
            Ok(())
        } else {
            Err(Error::precondition(
                &id,
                format!("this shim already serves pod {}", p.id),
            ))
        };
    }
    let (config_bytes, config) = decode_config(&id, req.options.as_ref())?;
    let parent = config
        .linux
        .as_ref()
        .map(|l| l.cgroup_parent.clone())
        .unwrap_or_default();
    let cgroup = if parent.is_empty() {
        format!("/stasis/{id}")
    } else {
        parent
    };
    let bundle = PathBuf::from(&req.bundle_path);
    std::fs::write(bundle.join("pod-sandbox-config.pb"), &config_bytes)
        .map_err(|e| Error::io(&id, "keep the pod sandbox config", e))?;
    let pod = shim.set_pod(Pod::new(
        id.clone(),
        bundle,
        req.netns_path.clone(),
        config_bytes,
        config,
        cgroup,
    ));
    info!(
        "pod {id}: created (name {:?}, netns {:?}, cgroup {})",
        pod.name(),
        pod.netns,
        pod.cgroup
    );
    Ok(())
}

/// A pod created to be restored names its checkpoint in an annotation: an archive of another
/// backend is refused here, before anything runs; a backend that restores sandboxes whole
/// says which image it starts from.
fn restore_source(shim: &Shim, pod: &Pod) -> Result<Option<(PodOptions, Option<PathBuf>)>> {
    let Some(value) = pod.config.annotations.get(RESTORE_ANNOTATION) else {
        return Ok(None);
    };
    pod.require_own_pid_ns("a restore into it")?;
    if value.contains('/') {
        return Err(Error::precondition(
            &pod.id,
            format!("{RESTORE_ANNOTATION} {value:?} on a pod must be a restore id alone"),
        ));
    }
    let (restore_id, dir) = source::resolve_restore(&shim.restore_store, &pod.id, value)?;
    let token = pod
        .config
        .annotations
        .get(stasis_api::layout::RESTORE_TOKEN_ANNOTATION);
    source::claim_restore(
        &shim.restore_store,
        &pod.id,
        &restore_id,
        token.map(String::as_str),
    )?;
    let (options, _) = source::check_pod_dir(&pod.id, &dir, shim.runtime.name())?;
    let image = shim.runtime.hooks().pod_restore_image(&pod.id, &dir)?;
    Ok(Some((options, image)))
}

pub async fn start(shim: &Shim, id: &str) -> Result<sb::StartSandboxResponse> {
    let pod = shim.require_pod(id)?;
    {
        let mut run = pod.run();
        if run.started || run.starting {
            return Err(Error::precondition(id, "sandbox already started"));
        }
        run.starting = true;
    }
    // The pod's state is not locked while the runtime works: Status and Pids still answer.
    let since = std::time::Instant::now();
    let started = start_pod(shim, &pod).await;
    let mut run = pod.run();
    run.starting = false;
    let (pid, by_runtime, files, shm) = started?;
    let now = time::OffsetDateTime::now_utc();
    run.pid = pid;
    run.root_by_runtime = by_runtime;
    run.files = files;
    run.shm = shm;
    run.started = true;
    run.created_at = Some(now);
    drop(run);
    pod.save_record(shim.ids());
    let runtime = shim.runtime.clone();
    let watched = pod.clone();
    let pod_id = id.to_string();
    tokio::spawn(async move {
        let exit = if by_runtime {
            runtime.wait_init(&pod_id, pid, since).await
        } else {
            reaper::wait_since(pid, since).await
        };
        info!("pod {pod_id}: pause process {pid} exited ({})", exit.status);
        watched.record_exit(exit);
    });
    info!("pod {id}: started, pause pid {pid}");
    Ok(sb::StartSandboxResponse {
        pid: pid as u32,
        created_at: MessageField::some(timestamp(now)),
        ..Default::default()
    })
}

type Started = (i32, bool, Vec<PathBuf>, Option<ShmMount>);

/// The pod cgroup, the pod's files, then the process holding its namespaces. A restore
/// source is checked before anything is created; a failure after that removes what was made.
async fn start_pod(shim: &Shim, pod: &Arc<Pod>) -> Result<Started> {
    let id = pod.id.as_str();
    let own = sysctls::OwnNamespaces::of(&pod.config, &pod.netns);
    let settings = pod_sysctls(shim, pod, own).await?;
    let restore = restore_source(shim, pod)?;
    cgroup::create(id, &pod.cgroup)?;
    let (files, shm) = match files::write_pod_files(pod) {
        Ok(made) => made,
        Err(e) => {
            remove_pod_host_state(id, &pod.cgroup, None, Vec::new());
            return Err(e);
        }
    };
    match start_root(shim, pod, restore, own, &settings).await {
        Ok((pid, by_runtime)) => Ok((pid, by_runtime, files, shm)),
        Err(e) => {
            remove_pod_host_state(id, &pod.cgroup, shm, files);
            Err(e)
        }
    }
}

/// The sysctls the pod gets, checked against the namespaces it owns before anything is made.
async fn pod_sysctls(
    shim: &Shim,
    pod: &Pod,
    own: sysctls::OwnNamespaces,
) -> Result<Vec<sysctls::Setting>> {
    if !shim.runtime.applies_sysctls() {
        sysctls::refuse_any(&pod.id, &pod.config, shim.runtime.name())?;
        return Ok(Vec::new());
    }
    let defaults = if own.net {
        sysctls::CriDefaults::learn(&pod.id).await
    } else {
        sysctls::CriDefaults::default()
    };
    let wanted = sysctls::wanted(&pod.config, own, defaults);
    let settings = sysctls::plan(&pod.id, &wanted, own)?;
    if !settings.is_empty() {
        info!("pod {}: sysctls {wanted:?}", pod.id);
    }
    Ok(settings)
}

/// The process holding the pod's namespaces: the runtime's own sandbox root, or our pause.
async fn start_root(
    shim: &Shim,
    pod: &Arc<Pod>,
    restore: Option<(PodOptions, Option<PathBuf>)>,
    own: sysctls::OwnNamespaces,
    settings: &[sysctls::Setting],
) -> Result<(i32, bool)> {
    let id = pod.id.as_str();
    let root = PodRoot {
        id: id.to_string(),
        bundle: pod.bundle.clone(),
        netns: pod.netns.clone(),
        hostname: pod.config.hostname.clone(),
        cgroup: pod.cgroup.clone(),
        host_pid: pod.host_pid(),
        host_ipc: !own.ipc,
        restore_image: restore.as_ref().and_then(|(_, image)| image.clone()),
    };
    let last_pid = restore.as_ref().and_then(|(o, _)| o.last_pid());
    let own_pid = !pod.host_pid();
    let (pid, by_runtime) = match shim.runtime.start_pod(&root).await? {
        Some(pid) => (pid, true),
        None => {
            let pid = pause::spawn(
                id,
                &pod.netns,
                &pod.config.hostname,
                pause::Own {
                    ipc: own.ipc,
                    pid: own_pid,
                },
                settings,
                last_pid,
            )?;
            if let Err(e) = cgroup::add_process(id, &pod.cgroup, pid) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
                return Err(e);
            }
            (pid, false)
        }
    };
    // Our pause process's PID namespace is restored into by CRIU: new PIDs must stay above
    // the checkpointed ones (the pause process saw to it in a namespace of its own).
    if !by_runtime && !own_pid {
        if let Some(last) = last_pid {
            if let Err(e) = pidns::reserve(id, pid, last).await {
                warn!("pod {id}: cannot keep new PIDs above the restored ones: {e}");
            }
        }
    }
    if let Err(e) = watchdog::spawn(id, &pod.bundle) {
        warn!("pod {id}: no watchdog to thaw the pod should the shim die: {e}");
    }
    Ok((pid, by_runtime))
}

/// After the pod's shim died (`delete`): everything its record names goes, whatever state the
/// shim left it in (frozen cgroups are thawed before their processes are killed).
pub fn remove_after_crash(id: &str, bundle: &std::path::Path) {
    let Some(record) = PodRecord::load(bundle, id) else {
        return;
    };
    // The host mount and files first: they do not wait for any process, and containerd
    // kills this command after its cleanup timeout (5 s) and then removes the bundle, so a
    // /dev/shm mount left for the end (after slow kills: a big container dying, a CRIU dump
    // stopped) stayed mounted in the removed bundle's directory for good. Detaching it
    // changes nothing for containers still running: they hold their own bind mounts.
    remove_pod_mount_and_files(record.shm_mount(), record.files.clone());
    if record.pid > 0 {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(record.pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    // A runtime call the dead shim left running (a checkpoint's runc and CRIU above all)
    // would freeze the containers again when it ends: stop it first, with its process group.
    stop_orphaned_runtime_calls(&record.containers);
    let left = cgroup::tear_down_tree(&record.cgroup);
    if !left.is_empty() {
        warn!("pod {id}: cgroups left after the cleanup: {left:?}");
    }
    remove_pod_host_state(id, &record.cgroup, record.shm_mount(), record.files);
    // A checkpoint the dead shim had under way.
    crate::util::remove_private_dirs_of(id);
    PodRecord::remove(bundle, id);
}

/// Kills the process groups of runtime and CRIU processes working on any of `containers`
/// (their command lines name the container), and waits a moment for them to go.
pub(crate) fn stop_orphaned_runtime_calls(containers: &[String]) {
    if containers.is_empty() {
        return;
    }
    let mut killed = false;
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let program = args
            .first()
            .map(|a| a.rsplit('/').next().unwrap_or(a).to_string());
        let is_runtime = program
            .as_deref()
            .is_some_and(|p| runtime::programs().any(|r| r == p));
        // A delete is part of a clean-up (maybe a concurrent one), never what must stop.
        let deleting = args.iter().any(|a| a == "delete");
        // A post-copy dump serves pages to a target that may run the pod already: CRIU
        // keeps them in its pipes whatever becomes of the tasks, and ends on its own (the
        // transfer's end, or its `timeout`).
        let serving =
            args.iter().any(|a| a == "checkpoint") && args.iter().any(|a| a == "--lazy-pages");
        // The container id as an argument of its own (runc's last): an id inside a path
        // names a checkpoint of it, which another pod may be restoring from (a lazy
        // restore's `criu lazy-pages --images-dir …/<id>-<name>/…`) and is not ours to stop.
        if is_runtime
            && !deleting
            && !serving
            && args
                .iter()
                .skip(1)
                .any(|a| containers.iter().any(|c| a == c))
        {
            let pid = nix::unistd::Pid::from_raw(pid);
            // Its group (CRIU below it) when it leads one, or when the group's leader (the
            // dead shim) is gone: never a live process's group.
            if let Ok(group) = nix::unistd::getpgid(Some(pid)) {
                if group == pid || nix::sys::signal::kill(group, None).is_err() {
                    let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
                }
            }
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            killed = true;
        }
    }
    if killed {
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// Unmounts the pod's /dev/shm, removes its files and its cgroup (in every hierarchy).
fn remove_pod_host_state(id: &str, cgroup_path: &str, shm: Option<ShmMount>, files: Vec<PathBuf>) {
    remove_pod_mount_and_files(shm, files);
    if let Err(e) = cgroup::remove(id, cgroup_path) {
        warn!("{e}");
    }
}

/// Unmounts the pod's /dev/shm and removes its files (each at most once: twice is harmless).
fn remove_pod_mount_and_files(shm: Option<ShmMount>, files: Vec<PathBuf>) {
    if let Some(shm) = shm {
        files::remove_shm(&shm);
    }
    for f in files {
        let _ = std::fs::remove_file(&f);
        // Its directory too, once empty (ours in the bundle, CRI's we made).
        if let Some(dir) = f.parent() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

pub async fn stop(shim: &Shim, id: &str, timeout_secs: u32) -> Result<()> {
    let pod = shim.require_pod(id)?;
    let timeout = Duration::from_secs(if timeout_secs == 0 {
        10
    } else {
        timeout_secs as u64
    });
    task::kill_all(shim, timeout).await;
    let (pid, by_runtime) = {
        let run = pod.run();
        (run.pid, run.root_by_runtime)
    };
    if by_runtime {
        // The runtime's sandbox: its root container goes, and the sandbox with it.
        if let Err(e) = shim.runtime.kill(id, libc::SIGKILL as u32, true).await {
            warn!("pod {id}: kill the sandbox root: {e}");
        }
        let mut rx = pod.wait_exit();
        let _ = tokio::time::timeout(timeout, rx.wait_for(|e| e.is_some())).await;
        if let Err(e) = shim.runtime.delete(id, true).await {
            warn!("pod {id}: delete the sandbox root: {e}");
        }
    } else if pid > 0 && pod.exit().is_none() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
        let mut rx = pod.wait_exit();
        let _ = tokio::time::timeout(timeout, rx.wait_for(|e| e.is_some())).await;
    }
    info!("pod {id}: stopped");
    Ok(())
}

pub async fn status(shim: &Shim, id: &str, verbose: bool) -> Result<sb::SandboxStatusResponse> {
    let pod = shim.require_pod(id)?;
    let run = pod.run().clone();
    if run.started && pod.exit().is_none() {
        files::link_pod_files(&pod);
    }
    let exit = pod.exit();
    let state = if run.started && exit.is_none() {
        READY
    } else {
        NOT_READY
    };
    let mut resp = sb::SandboxStatusResponse {
        sandbox_id: id.to_string(),
        pid: run.pid as u32,
        state: state.to_string(),
        created_at: run.created_at.map(timestamp).into(),
        exited_at: exit.map(|e| timestamp(e.at)).into(),
        ..Default::default()
    };
    if verbose {
        let info = serde_json::json!({
            "pid": run.pid,
            "runtime": "io.containerd.stasis.v2",
            "cgroup": pod.cgroup,
            "netns": pod.netns,
            "containers": shim.ids(),
        });
        resp.info.insert("info".to_string(), info.to_string());
    }
    Ok(resp)
}

pub async fn shutdown(shim: &Shim, id: &str) -> Result<()> {
    let pod = shim.require_pod(id)?;
    stop(shim, id, 10).await?;
    let (shm, files) = {
        let mut run = pod.run();
        run.shut_down = true;
        (run.shm.take(), std::mem::take(&mut run.files))
    };
    remove_pod_host_state(id, &pod.cgroup, shm, files);
    PodRecord::remove(&pod.bundle, id);
    info!("pod {id}: shut down");
    if shim.is_empty() {
        shim.shutdown.cancel();
    }
    Ok(())
}

pub fn metrics(shim: &Shim, id: &str) -> Result<sb::SandboxMetricsResponse> {
    let pod = shim.require_pod(id)?;
    let data = cgroup::metrics(id, &pod.cgroup)?;
    let mut resp = sb::SandboxMetricsResponse::default();
    let m = resp.metrics.mut_or_insert_default();
    m.id = id.to_string();
    m.timestamp = MessageField::some(timestamp(time::OffsetDateTime::now_utc()));
    m.data = MessageField::some(data);
    Ok(resp)
}
