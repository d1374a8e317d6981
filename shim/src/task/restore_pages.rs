//! The pages of a restore served through `criu lazy-pages`: its daemon, the watch that stops
//! a container whose pages could not all come in, and the wait of an eager restore for them.

use std::path::Path;

use log::{debug, error, info, warn};
use stasis_api::{
    checkpoint::RestoreState,
    layout::{self, RestoreOptions},
};

use crate::{
    error::{Error, Result},
    events::{pod_event, restore_event},
    process::reaper,
    runtime::{pages, CheckpointOpts},
    state::{Container, Shim, State},
    util::blocking,
};

/// An eager restore from an archive whose lazy pages come to at most this many bytes copies
/// them into the local images (checked) instead of serving them through a lazy-pages daemon:
/// the daemon's start alone took ~25 ms of a small pod's restore; 16 MiB copy in about that.
const COPY_PAGES_UP_TO: u64 = 16 << 20;

/// Starts the lazy-pages daemon when the restore options ask for a lazy restore and the
/// runtime can do one (setting `opts.lazy_pages`); `None` restores eagerly.
pub(super) async fn start_lazy_restore(
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
    // Every page in the local images: CRIU restores them itself, no daemon.
    let restore_eagerly = || {
        if pod_restore {
            shim.restores.record(id, RestoreState::RESTORE_EAGER, "");
        }
        Ok(None)
    };
    if !restore_options.lazy {
        return restore_eagerly();
    }
    if !shim.runtime.hooks().supports_lazy_restore() {
        warn!(
            "{id}: lazy restore is not available for {}; restoring eagerly",
            shim.runtime.name()
        );
        return restore_eagerly();
    }
    let rel = || {
        container
            .restore_dir
            .as_deref()
            .and_then(layout::restore_root)
            .and_then(|root| image.strip_prefix(root).ok())
            .map(Path::to_path_buf)
            .ok_or_else(|| {
                Error::invalid(
                    id,
                    format!("images {} are not in the restore store", image.display()),
                )
            })
    };
    let feed = match (
        &restore_options.remote_pages,
        &restore_options.page_source,
        container.restore_dir.as_deref(),
    ) {
        (Some(relay), _, Some(_)) => {
            let (owned, image, rel, relay) =
                (id.clone(), image.to_path_buf(), rel()?, relay.clone());
            Some(PageFeed::Remote(
                blocking(id, "read the pagemaps", move || {
                    pages::remote::RemotePages::open(&owned, &image, &rel, &relay)
                })
                .await?,
            ))
        }
        (None, Some(source), Some(_)) => {
            let (owned, image, rel, source) =
                (id.clone(), image.to_path_buf(), rel()?, source.clone());
            let eager = restore_options.pages_before_resume;
            let feed = blocking(id, "read pages from the archive", move || {
                let pages = pages::ArchivePages::open(&owned, &image, &rel, &source)?;
                match pages {
                    Some(p) if eager && p.lazy_bytes() <= COPY_PAGES_UP_TO => {
                        p.copy_lazy_pages().map(|_| None)
                    }
                    other => Ok(other),
                }
            })
            .await?;
            if feed.is_none() && eager {
                // Copied above, or never in the archive's page source.
                return restore_eagerly();
            }
            feed.map(PageFeed::Archive)
        }
        _ => None,
    };
    opts.lazy_pages = true;
    if pod_restore {
        shim.restores.record(id, RestoreState::RESTORE_PENDING, "");
        if restore_options.pages_before_resume {
            shim.restores.hold_for_pages(id);
        }
    }
    if let (Some(feed), true) = (&feed, pod_restore) {
        shim.restores.count_pages(id, feed.counters());
    }
    Ok(Some(
        start_lazy_pages(id, image, &opts.work_path, feed).await?,
    ))
}

/// Where a lazy restore's page server gets the pages: the archive's byte ranges, or the
/// migration's source (post-copy).
enum PageFeed {
    Archive(pages::ArchivePages),
    Remote(pages::remote::RemotePages),
}

impl PageFeed {
    fn counters(&self) -> std::sync::Arc<pages::PageCounters> {
        match self {
            PageFeed::Archive(p) => p.counters(),
            PageFeed::Remote(p) => p.counters(),
        }
    }

    fn serve(self, sock: std::os::unix::net::UnixStream) -> std::result::Result<(), String> {
        match self {
            PageFeed::Archive(p) => p.serve(sock),
            PageFeed::Remote(p) => p.serve(sock),
        }
    }
}

/// Watches a lazy restore's page daemon (and page server) until every page is in; a restore
/// that ends short stops the container, whose missing pages would read as zeros.
pub(super) fn watch_lazy_pages(
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
    let (events, pod_id, engine) = (
        shim.events.clone(),
        shim.pod().map(|p| p.id.clone()).unwrap_or_default(),
        shim.runtime.name().to_string(),
    );
    let report = move |state: RestoreState, reason: String| {
        let complete = state == RestoreState::RESTORE_COMPLETE;
        // Not `failed`: the pod's restore has its own outcome (running or failed).
        let phase = if complete { "pages-in" } else { "pages-failed" };
        let mut event = restore_event(
            &pod_id,
            &engine,
            phase,
            std::slice::from_ref(&id_for_report),
        );
        if let Some(o) = &outcomes {
            (event.bytes, _, event.page_requests) = o.pages_sent(&id_for_report);
        }
        if complete {
            event.pages_in_ms = start.elapsed().as_secs_f64() * 1000.0;
        } else {
            event.error = format!("{id_for_report}: {reason}");
        }
        pod_event(&events, event);
        if let Some(o) = &outcomes {
            if complete {
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

/// How long an eager restore through the page server may take to bring every page in.
pub(super) const PAGES_WITHIN: std::time::Duration = std::time::Duration::from_secs(3600);

/// An eager restore whose pages come through the page server: the held containers get every
/// page before any of them runs (the daemons push them in the background; a frozen task
/// needs no fault for that). Bounded by PAGES_WITHIN; the hold's watchdog waits as long.
/// A container that could not get them all was stopped by its page watcher: the restore
/// fails naming it.
pub(super) async fn wait_for_pages(shim: &Shim) -> Result<()> {
    let ids = shim.restores.held_for_pages();
    if ids.is_empty() {
        return Ok(());
    }
    let started = std::time::Instant::now();
    let settled = shim.restores.settled(PAGES_WITHIN).await;
    // Every page in is not enough: the container must also still be held (nothing stopped it).
    let short: Vec<String> = ids
        .iter()
        .filter_map(|id| match (settled.get(id), shim.get(id)) {
            (Some(o), _) if o.state == RestoreState::RESTORE_PENDING => Some(format!(
                "{id}: pages still coming in after {PAGES_WITHIN:?}"
            )),
            (Some(o), _) if o.state != RestoreState::RESTORE_COMPLETE => {
                Some(format!("{id}: {}", o.reason))
            }
            (None, _) | (_, Err(_)) => Some(format!("{id}: deleted before its pod resumed")),
            (Some(_), Ok(c)) if c.state() != State::Held => {
                Some(format!("{id}: {} before its pod resumed", c.state()))
            }
            _ => None,
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
    from_archive: Option<PageFeed>,
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
    let spawned = std::time::Instant::now();
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
        // The daemon listens ~7 ms after its start here (25–40 ms when CRIU and its
        // libraries must first be read from disk) and the restore waits on it: look often
        // (a 10 ms step cost every restore 5 ms on average).
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    debug!(
        "{id}: criu lazy-pages (pid {pid}) listening {:?} after its start",
        spawned.elapsed()
    );
    Ok((pid, serving))
}

/// A lazy-pages daemon's pid, and the thread serving it pages from the archive (its result
/// says whether every page asked for was served).
pub(super) type LazyPages = (
    i32,
    Option<std::thread::JoinHandle<std::result::Result<(), String>>>,
);

/// Ends a lazy-pages daemon whose restore failed (the reaper collects it).
pub(super) fn stop_lazy_pages(pid: Option<i32>) {
    if let Some(pid) = pid {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}
