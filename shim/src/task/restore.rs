//! Restore at Start: a task created from a checkpoint gets its volumes back, then its
//! processes from the images; a container of a pod being restored is held until the pod's
//! FinishRestore.

use std::{path::Path, sync::Arc};

use log::{error, info, warn};
use stasis_api::{
    checkpoint::RestoreState,
    layout::{self, DumpRecord, RestoreOptions, CHECKPOINT_DIR},
};

use super::watch;
use crate::{
    error::{Error, Result},
    fscapture::volumes,
    process::{reaper, stdio},
    runtime::{images, pages, restored, CheckpointOpts},
    state::{Container, Shim, State, Transition},
    util::blocking,
};

/// Brings the processes of a `Restorable` container back; returns the init pid.
pub(super) async fn restore_init(
    shim: &Shim,
    container: &Arc<Container>,
    image: &Path,
) -> Result<i32> {
    let id = container.id.clone();
    let start = std::time::Instant::now();
    let recorded = DumpRecord::read(image);
    restore_volumes(shim, container, image).await?;
    // The images' record of how they were dumped comes from the archive: only options that
    // restore the process's own state are taken from it (its TCP connections, its file
    // locks), never one that reaches outside the container.
    if recorded.ext_unix_sk {
        return Err(Error::invalid(
            &id,
            "the checkpoint asks to restore unix sockets connected outside the container (external_unix_sockets); a restore never grants that",
        ));
    }
    let stdio_cfg = container.live().init.stdio.clone();
    let mut opts = CheckpointOpts {
        image_path: image.to_path_buf(),
        work_path: container.bundle.join("criu-restore-work"),
        shell_job: stdio_cfg.terminal,
        tcp_established: recorded.tcp_established,
        file_locks: recorded.file_locks,
        ..Default::default()
    };
    std::fs::create_dir_all(&opts.work_path)
        .map_err(|e| Error::io(&id, "create restore work dir", e))?;
    let lazy = start_lazy_restore(shim, container, image, &mut opts).await?;
    let lazy_pid = lazy.as_ref().map(|l| l.0);
    let mut prepared = match stdio::prepare(&id, &stdio_cfg) {
        Ok(p) => p,
        Err(e) => {
            stop_lazy_pages(lazy_pid);
            return Err(e);
        }
    };
    let pid_file = container.bundle.join("init.pid");
    let since = std::time::Instant::now();
    let runtime_io = prepared.take_runtime();
    if let Err(e) = shim
        .runtime
        .hooks()
        .restore(&id, &container.bundle, &opts, runtime_io, &pid_file)
        .await
    {
        undo_restore(shim, &id, Undo::Restore, &mut prepared, lazy_pid).await;
        return Err(e);
    }
    let held = match check_restored(shim, container, image).await {
        Ok(held) => held,
        Err((e, undo)) => {
            undo_restore(shim, &id, undo, &mut prepared, lazy_pid).await;
            return Err(e);
        }
    };
    if let Some(lazy) = lazy {
        watch_lazy_pages(shim, container, lazy, start);
    }
    let io = prepared.finish(&id).await?;
    let pid = stdio::read_pid(&id, &pid_file)?;
    {
        let mut live = container.live();
        live.init.pid = pid;
        live.init.io = io;
    }
    container.transition(Transition::Restore { held })?;
    if held {
        watch_hold(shim, container.clone());
    }
    watch::oom(shim, &id, &container.cgroup_path);
    watch::exit(shim, container.clone(), String::new(), pid, since);
    info!(
        "{id}: restored from {} in {:?}, pid {pid}{}",
        image.display(),
        start.elapsed(),
        if held { ", held for its pod" } else { "" }
    );
    Ok(pid)
}

/// Puts the container's volumes back from its checkpoint before any of its processes is.
async fn restore_volumes(shim: &Shim, container: &Container, image: &Path) -> Result<()> {
    // A pod checkpoint keeps volumes in the container's own checkpoint/ (the images may be the
    // whole sandbox's, elsewhere); a Task API checkpoint keeps them with the images.
    let volumes_dir = container
        .restore_dir
        .as_ref()
        .map(|d| d.join(CHECKPOINT_DIR))
        .unwrap_or_else(|| image.to_path_buf());
    let (id, spec) = (container.id.clone(), container.spec.clone());
    // Containers of a pod share its volumes: each host directory is restored once.
    let pod = container.restore_dir.as_ref().and_then(|_| shim.pod());
    // A directory another container already mounts cannot be swapped under it: that
    // container would keep the old, deleted one.
    let mounted: Vec<(String, std::path::PathBuf)> = shim
        .all()
        .into_iter()
        .filter(|c| c.id != container.id)
        .flat_map(|c| {
            c.spec
                .mounts()
                .iter()
                .filter_map(|m| m.source().clone())
                .map(|s| (c.id.clone(), s))
                .collect::<Vec<_>>()
        })
        .collect();
    blocking(&id.clone(), "restore volumes", move || {
        volumes::restore(&id, &spec, &volumes_dir, |dir| {
            if !pod.as_ref().is_none_or(|p| p.claim_volume(dir)) {
                return Ok(false);
            }
            if let Some((other, _)) = mounted.iter().find(|(_, s)| s == dir) {
                return Err(Error::precondition(
                    &id,
                    format!(
                        "volume {} is mounted by container {other} already; restore the containers that capture volumes before the others that mount them",
                        dir.display()
                    ),
                ));
            }
            Ok(true)
        })
    })
    .await
}

/// Starts the lazy-pages daemon when the restore options ask for a lazy restore and the
/// runtime can do one (setting `opts.lazy_pages`); `None` restores eagerly.
async fn start_lazy_restore(
    shim: &Shim,
    container: &Container,
    image: &Path,
    opts: &mut CheckpointOpts,
) -> Result<Option<LazyPages>> {
    let id = &container.id;
    let restore_options = match container.restore_dir.as_deref() {
        Some(dir) => RestoreOptions::load_for_dir(dir)
            .map_err(|e| Error::invalid(id, format!("restore options: {e}")))?,
        None => RestoreOptions::default(),
    };
    let pod_restore = container.restore_dir.is_some();
    if !restore_options.lazy {
        if pod_restore {
            shim.restores.record(id, RestoreState::RESTORE_EAGER, "");
        }
        return Ok(None);
    }
    if !shim.runtime.hooks().supports_lazy_restore() {
        warn!(
            "{id}: lazy restore is not available for {}; restoring eagerly",
            shim.runtime.name()
        );
        if pod_restore {
            shim.restores.record(id, RestoreState::RESTORE_EAGER, "");
        }
        return Ok(None);
    }
    opts.lazy_pages = true;
    if pod_restore {
        shim.restores.record(id, RestoreState::RESTORE_PENDING, "");
        if restore_options.pages_before_resume {
            shim.restores.hold_for_pages(id);
        }
    }
    let from_archive = match (
        &restore_options.page_source,
        container.restore_dir.as_deref(),
    ) {
        (Some(source), Some(dir)) => {
            let rel = layout::restore_root(dir)
                .and_then(|root| image.strip_prefix(root).ok())
                .map(Path::to_path_buf)
                .ok_or_else(|| {
                    Error::invalid(
                        id,
                        format!("images {} are not in the restore store", image.display()),
                    )
                })?;
            let (owned, image, source) = (id.clone(), image.to_path_buf(), source.clone());
            blocking(id, "read pages from the archive", move || {
                pages::ArchivePages::open(&owned, &image, &rel, &source)
            })
            .await?
        }
        _ => None,
    };
    Ok(Some(
        start_lazy_pages(id, image, &opts.work_path, from_archive).await?,
    ))
}

/// How far a failed restore got, which says what must end before its container is deleted.
enum Undo<'a> {
    /// `runc restore` itself failed.
    Restore,
    /// Restored tasks exist: they are killed first.
    Tasks,
    /// The restored tasks are held (frozen) for the pod too, in this cgroup: killed, then
    /// thawed, as SIGKILL waits while they are frozen.
    Held(&'a str),
}

/// Removes what a restore that failed after `runc restore` left: its tasks (as `undo` says),
/// the stdio copies, the container, and the lazy-pages daemon.
async fn undo_restore(
    shim: &Shim,
    id: &str,
    undo: Undo<'_>,
    prepared: &mut stdio::PreparedIo,
    lazy_pid: Option<i32>,
) {
    if !matches!(undo, Undo::Restore) {
        let _ = shim.runtime.kill(id, libc::SIGKILL as u32, true).await;
    }
    if let Undo::Held(cgroup) = undo {
        let _ = shim.runtime.hooks().release_restored(id, cgroup).await;
    }
    prepared.io.copies.abort().await;
    let _ = shim.runtime.delete(id, true).await;
    stop_lazy_pages(lazy_pid);
}

/// Holds the restored container for its pod (when it belongs to a pod restore) and, when the
/// runtime restores host tasks, checks them against the spec before any of them runs.
/// Returns whether the container is held; a failure says how far the restore must be undone.
async fn check_restored<'a>(
    shim: &Shim,
    container: &'a Container,
    image: &Path,
) -> std::result::Result<bool, (Error, Undo<'a>)> {
    let id = &container.id;
    // The images are the archive's word: what CRIU made of them is checked against the spec
    // before any restored task runs. CRIU backends leave every task stopped; a pod's
    // container is held (frozen) too, and the check's SIGCONT takes effect at the thaw.
    let host_tasks = shim.runtime.hooks().restores_host_tasks();
    if host_tasks {
        let (owned, cgroup) = (id.clone(), container.cgroup_path.clone());
        if let Err(e) = blocking(id, "hold the restored tasks", move || {
            restored::await_stopped(&owned, &cgroup, std::time::Duration::from_secs(5))
        })
        .await
        {
            error!("{id}: {e}");
            return Err((e, Undo::Tasks));
        }
    }
    let pod_restore = container.restore_dir.is_some();
    let held = pod_restore
        && shim
            .runtime
            .hooks()
            .hold_restored(id, &container.cgroup_path)
            .await
            .unwrap_or_else(|e| {
                warn!("{id}: cannot hold the restored container until the pod is complete: {e}");
                false
            });
    if host_tasks {
        let (owned, cgroup) = (id.clone(), container.cgroup_path.clone());
        let expected = images::Expected::of(&container.spec);
        let images_dir = image.to_path_buf();
        if let Err(e) = blocking(id, "check the restored tasks", move || {
            restored::verify(&owned, &cgroup, &expected.bounds, |table| {
                images::mountinfo_excess(table, &expected)
            })?;
            let keep = images::stopped_at_dump(&owned, &images_dir)?;
            restored::continue_tasks(&owned, &cgroup, &keep)
        })
        .await
        {
            error!("{id}: {e}");
            let undo = if held {
                Undo::Held(&container.cgroup_path)
            } else {
                Undo::Tasks
            };
            return Err((e, undo));
        }
    }
    Ok(held)
}

/// Watches a lazy restore's page daemon (and page server) until every page is in; a restore
/// that ends short stops the container, whose missing pages would read as zeros.
fn watch_lazy_pages(
    shim: &Shim,
    container: &Container,
    (daemon, server): LazyPages,
    start: std::time::Instant,
) {
    let (id, runtime) = (container.id.clone(), shim.runtime.clone());
    let id_for_report = id.clone();
    // Only a pod's restore is asked how it ended (RestoreStatus).
    let outcomes = container
        .restore_dir
        .as_ref()
        .map(|_| shim.restores.clone());
    let report = move |state: RestoreState, reason: String| {
        if let Some(o) = &outcomes {
            if state == RestoreState::RESTORE_COMPLETE {
                o.complete(&id_for_report, start.elapsed());
            } else {
                o.record(&id_for_report, state, reason);
            }
        }
    };
    tokio::spawn(async move {
        let exit = reaper::wait(daemon).await;
        // The page server's own verdict counts too: a chunk that did not match its
        // digest was never served, whatever the daemon's exit status says.
        let served = match server {
            Some(h) => tokio::task::spawn_blocking(move || h.join())
                .await
                .ok()
                .and_then(|joined| joined.ok())
                .unwrap_or_else(|| Err("the page server died".to_string())),
            None => Ok(()),
        };
        if let Err(why) = &served {
            error!("{id}: page server: {why}; stopping the container");
            if let Err(e) = runtime.kill(&id, libc::SIGKILL as u32, true).await {
                warn!("{id}: stop the container: {e}");
            }
            report(
                RestoreState::RESTORE_FAILED,
                format!("{why}; container stopped"),
            );
        } else if exit.status == 0 {
            info!(
                "{id}: every lazily restored page is in, {:?} after the restore began",
                start.elapsed()
            );
            report(RestoreState::RESTORE_COMPLETE, String::new());
        } else {
            // Pages it never got would read as zeros once the daemon's userfaultfd is
            // gone: the container must not run on with memory that is not its own.
            error!("{id}: criu lazy-pages ended with status {} before every page was in (see lazy-pages.log in the restore work dir); stopping the container", exit.status);
            if let Err(e) = runtime.kill(&id, libc::SIGKILL as u32, true).await {
                warn!("{id}: stop the container: {e}");
            }
            report(
                RestoreState::RESTORE_FAILED,
                format!(
                    "criu lazy-pages ended with status {}; container stopped",
                    exit.status
                ),
            );
        }
    });
}

/// A held container is never frozen indefinitely: if its pod's FinishRestore has not come
/// within the hold bound (the restore's driver died, say), the restore is given up and the
/// container stopped, so that nothing of a half-restored pod runs or stays frozen.
fn watch_hold(shim: &Shim, container: Arc<Container>) {
    let runtime = shim.runtime.clone();
    let hold = shim.restore_hold;
    tokio::spawn(async move {
        tokio::time::sleep(hold).await;
        let _op = container.op.lock().await;
        if container.state() != State::Held {
            return;
        }
        let id = &container.id;
        warn!("{id}: FinishRestore did not come within {hold:?}; stopping the held container");
        if let Err(e) = runtime.kill(id, libc::SIGKILL as u32, true).await {
            warn!("{id}: stop the held container: {e}");
        }
        // SIGKILL reaches frozen processes only once they are thawed.
        if let Err(e) = runtime
            .hooks()
            .release_restored(id, &container.cgroup_path)
            .await
        {
            warn!("{id}: thaw the held container: {e}");
        }
    });
}

/// Lets every container held after a pod restore run. Returns their ids.
pub async fn finish_restore(shim: &Shim) -> Result<Vec<String>> {
    wait_for_pages(shim).await?;
    if let Some(pod) = shim.pod() {
        pod.restore_finished();
    }
    let mut resumed = Vec::new();
    let mut containers = shim.all();
    containers.sort_by(|a, b| a.id.cmp(&b.id));
    for c in containers {
        let _op = c.op.lock().await;
        if c.state() != State::Held {
            continue;
        }
        shim.runtime
            .hooks()
            .release_restored(&c.id, &c.cgroup_path)
            .await?;
        c.transition(Transition::Release)?;
        resumed.push(c.id.clone());
    }
    info!("resumed restored containers {resumed:?}");
    Ok(resumed)
}

/// An eager restore whose pages come through the page server: the held containers get every
/// page before any of them runs (the daemons push them in the background; a frozen task
/// needs no fault for that). Bounded by the hold, whose watchdog stops what is still held.
/// A container that could not get them all was stopped by its page watcher: the restore
/// fails naming it.
async fn wait_for_pages(shim: &Shim) -> Result<()> {
    let ids = shim.restores.take_held_for_pages();
    if ids.is_empty() {
        return Ok(());
    }
    let started = std::time::Instant::now();
    let settled = shim.restores.settled(shim.restore_hold).await;
    let short: Vec<String> = ids
        .iter()
        .filter_map(|id| match settled.get(id) {
            Some(o) if o.state == RestoreState::RESTORE_COMPLETE => None,
            Some(o) if o.state == RestoreState::RESTORE_PENDING => Some(format!(
                "{id}: pages still coming in after {:?}",
                shim.restore_hold
            )),
            Some(o) => Some(format!("{id}: {}", o.reason)),
            None => Some(format!("{id}: deleted before its pages were in")),
        })
        .collect();
    if let Some(first) = ids.first().filter(|_| !short.is_empty()) {
        return Err(Error::precondition(
            first,
            format!(
                "the restored containers did not get all of their memory: {}",
                short.join("; ")
            ),
        ));
    }
    info!(
        "every page of {ids:?} is in, {:?} after the pod's FinishRestore; resuming",
        started.elapsed()
    );
    Ok(())
}

/// Starts `criu lazy-pages` serving the memory of `image` for a restore whose CRIU work
/// directory is `work` (runc's `--work-path`: the daemon's socket lives there); returns its
/// pid once the socket is there. With `from_archive`, the daemon gets its pages from our
/// page server over a socket pair (nothing listens on the network) instead of the images.
async fn start_lazy_pages(
    id: &str,
    image: &Path,
    work: &Path,
    from_archive: Option<pages::ArchivePages>,
) -> Result<LazyPages> {
    let mut cmd = std::process::Command::new("criu");
    cmd.arg("lazy-pages")
        .arg("--images-dir")
        .arg(image)
        .arg("--work-dir")
        .arg(work)
        .args(["-o", "lazy-pages.log", "-v4"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let server = match from_archive {
        Some(pages) => {
            let (ours, theirs) = std::os::unix::net::UnixStream::pair()
                .map_err(|e| Error::io(id, "create the page server socket", e))?;
            let fd = std::os::fd::AsRawFd::as_raw_fd(&theirs);
            cmd.args(["--page-server", "--ps-socket", &fd.to_string()]);
            // SAFETY: between fork and exec; fcntl is async-signal-safe.
            unsafe {
                std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                    // The daemon's end survives the exec: clear its close-on-exec flag.
                    if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            Some((pages, ours, theirs))
        }
        None => None,
    };
    let child = cmd
        .spawn()
        .map_err(|e| Error::io(id, "start criu lazy-pages", e))?;
    let pid = child.id() as i32;
    let mut serving = None;
    if let Some((pages, ours, theirs)) = server {
        drop(theirs);
        match std::thread::Builder::new()
            .name(format!("pages-{}", &id[..id.len().min(8)]))
            .spawn(move || pages.serve(ours))
        {
            Ok(h) => serving = Some(h),
            Err(e) => {
                stop_lazy_pages(Some(pid));
                return Err(Error::io(id, "start the page server", e));
            }
        }
    }
    let socket = work.join("lazy-pages.socket");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !socket.exists() {
        if std::time::Instant::now() > deadline || !Path::new(&format!("/proc/{pid}")).exists() {
            stop_lazy_pages(Some(pid));
            return Err(Error::other(
                id,
                "start criu lazy-pages",
                format!(
                    "no {} within 10 s (see {})",
                    socket.display(),
                    work.join("lazy-pages.log").display()
                ),
            ));
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    Ok((pid, serving))
}

/// A lazy-pages daemon's pid, and the thread serving it pages from the archive (its result
/// says whether every page asked for was served).
type LazyPages = (
    i32,
    Option<std::thread::JoinHandle<std::result::Result<(), String>>>,
);

/// Ends a lazy-pages daemon whose restore failed (the reaper collects it).
fn stop_lazy_pages(pid: Option<i32>) {
    if let Some(pid) = pid {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}
