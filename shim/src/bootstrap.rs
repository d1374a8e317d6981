//! containerd's shim start protocol: `start` finds or launches the group's shim and answers
//! with its address; `delete` cleans up after a shim that is gone; `serve` is the shim itself.

use std::{
    io::{Read, Write},
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use containerd_shim::Flags;
use containerd_shim_protos::{api::DeleteResponse, protobuf::Message};
use log::{error, info};

use crate::{
    events::Publisher,
    process::reaper,
    runtime::{
        self,
        config::{BackendConfig, Engine},
    },
    spec::ContainerSpec,
    state::{timestamp, Shim},
};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

pub const USAGE: &str = "\
usage: containerd-shim-stasis-v2 -namespace NS -id ID -address ADDR [-publish-binary BIN] [-debug] start|delete
       containerd-shim-stasis-v2 -info | -version

A containerd 2.x runtime shim (runtime_type \"io.containerd.stasis.v2\"). containerd runs it;
it is not meant to be started by hand. `start` prints the bootstrap answer for the shim that
serves the container's group (one per pod), `delete` removes a container whose shim is gone.";

/// Annotations that put several containers under one shim (a CRI pod, or runc's grouping).
const GROUP_ANNOTATIONS: [&str; 2] = [crate::spec::CRI_SANDBOX_ID, "io.containerd.runc.v2.group"];

/// The fd on which a freshly spawned shim finds its listening socket.
const LISTENER_FD: i32 = 3;

fn group_id(bundle: &Path, id: &str) -> String {
    // A pod's sandbox bundle has no config.json: the pod is its own group.
    let Ok(spec) = ContainerSpec::load(id, bundle) else {
        return id.to_string();
    };
    GROUP_ANNOTATIONS
        .iter()
        .find_map(|key| spec.annotation(key).filter(|g| !g.is_empty()))
        .unwrap_or(id)
        .to_string()
}

fn socket_path(address: &str) -> &str {
    address.strip_prefix("unix://").unwrap_or(address)
}

/// Which file our listening socket is. An inode number alone does not tell: on ext4 (where
/// `/run` lives on some hosts) a successor's socket, bound right after ours was unlinked, often
/// gets the same number back; its change time, to the nanosecond, differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SocketFile {
    dev: u64,
    ino: u64,
    ctime: i64,
    ctime_nsec: i64,
}

impl SocketFile {
    fn identify(path: &Path) -> Option<Self> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::symlink_metadata(path).ok()?;
        Some(Self {
            dev: m.dev(),
            ino: m.ino(),
            ctime: m.ctime(),
            ctime_nsec: m.ctime_nsec(),
        })
    }

    /// Unlinks `path` only while it is still our file and nobody listens on it: a successor
    /// that bound the same path (a container restored under the id it had) keeps its socket.
    fn remove_if_still_ours(self, path: &Path) {
        if Self::identify(path) != Some(self) {
            return;
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return;
        }
        let _ = std::fs::remove_file(path);
    }

    /// Unlinks `path` while it is still our file, although our listener is still open: from
    /// then on nobody can connect (a stopped ttrpc listener keeps its descriptor until every
    /// connection's task has ended, and meanwhile a connect still succeeds).
    fn unlink_if_still_ours(self, path: &Path) {
        if Self::identify(path) == Some(self) {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn bootstrap_answer(address: &str) -> String {
    serde_json::json!({"version": 3, "address": address, "protocol": "ttrpc"}).to_string()
}

/// containerd passes the handler's runtime options on stdin (a protobuf Any); read them, and
/// never block on a stdin that stays open.
fn drain_stdin() -> Vec<u8> {
    // SAFETY: isatty only inspects fd 0.
    if unsafe { libc::isatty(0) } == 1 {
        return Vec::new();
    }
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = std::io::stdin().read_to_end(&mut buf);
        let _ = tx.send(buf);
    });
    rx.recv_timeout(std::time::Duration::from_secs(1))
        .unwrap_or_default()
}

/// The backend the handler's options ask for, else the one this binary's name asks for.
fn backend_from_stdin(id: &str, bytes: &[u8]) -> Result<BackendConfig, BoxError> {
    // argv[0], not current_exe(): that resolves the link whose name carries the choice.
    let argv0 = std::env::args_os().next().unwrap_or_default();
    let by_name = || BackendConfig::for_binary_name(id, Path::new(&argv0));
    if bytes.is_empty() {
        return Ok(by_name()?);
    }
    let any = protobuf::well_known_types::any::Any::parse_from_bytes(bytes)
        .map_err(|e| format!("{id}: runtime options on stdin: {e}"))?;
    match BackendConfig::from_options(id, &any.type_url, &any.value)? {
        Some(b) => Ok(b),
        None => Ok(by_name()?),
    }
}

pub fn start(flags: &Flags) -> Result<(), BoxError> {
    if flags.id.is_empty() || flags.namespace.is_empty() || flags.address.is_empty() {
        return Err("start needs -id, -namespace and -address".into());
    }
    let options = drain_stdin();
    let bundle = std::env::current_dir()?;
    let group = group_id(&bundle, &flags.id);
    let address = containerd_shim::socket_address(&flags.address, &flags.namespace, &group);
    let path = PathBuf::from(socket_path(&address));

    // A shim of the same id that is still shutting down (its task was just deleted) must not
    // be reused: wait for it to go before starting a fresh one.
    if group == flags.id {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while std::os::unix::net::UnixStream::connect(&path).is_ok() {
            if std::time::Instant::now() > deadline {
                return Err(format!(
                    "a shim for {} is still running at {}",
                    flags.id,
                    path.display()
                )
                .into());
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
    // The group's shim already runs: containerd should talk to it.
    if std::os::unix::net::UnixStream::connect(&path).is_ok() {
        std::fs::write(bundle.join("address"), &address)?;
        print!("{}", bootstrap_answer(&address));
        std::io::stdout().flush()?;
        return Ok(());
    }
    // A new shim: remember the handler's backend for it (the serving process reads it back).
    let backend = backend_from_stdin(&flags.id, &options)?;
    backend.save(&flags.id, &bundle)?;
    let _ = std::fs::remove_file(&path);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // Only root may talk to the shim: the socket is 0600 from its first moment, whatever
    // umask containerd runs with.
    let old_umask = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let bound = std::os::unix::net::UnixListener::bind(&path);
    nix::sys::stat::umask(old_umask);
    let listener = bound.map_err(|e| format!("bind shim socket {}: {e}", path.display()))?;

    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.current_dir(&bundle)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .args(["-namespace", &flags.namespace, "-id", &group])
        .args(["-address", &flags.address]);
    if !flags.publish_binary.is_empty() {
        cmd.args(["-publish-binary", &flags.publish_binary]);
    }
    if flags.debug {
        cmd.arg("-debug");
    }
    cmd.arg("serve");
    let fd = listener.as_raw_fd();
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // dup2 onto itself would keep FD_CLOEXEC, so clear it by hand in that case.
            let rc = if fd == LISTENER_FD {
                libc::fcntl(fd, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, LISTENER_FD)
            };
            if rc < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|e| format!("spawn shim: {e}"))?;
    drop(listener);
    // The server is detached (setsid); it is reparented once we exit.
    std::mem::forget(child);
    std::fs::write(bundle.join("address"), &address)?;
    print!("{}", bootstrap_answer(&address));
    std::io::stdout().flush()?;
    Ok(())
}

pub fn serve(flags: &Flags) -> Result<(), BoxError> {
    // SAFETY: fd 3 was set up by `start` as our listening socket; nothing else owns it.
    let listener = unsafe {
        <std::os::unix::net::UnixListener as std::os::fd::FromRawFd>::from_raw_fd(LISTENER_FD)
    };
    // It reached us without FD_CLOEXEC; no child (pause process, runc, CRIU) may inherit it,
    // or the socket would keep accepting connections after this shim died.
    // SAFETY: fcntl on a descriptor we own.
    unsafe { libc::fcntl(LISTENER_FD, libc::F_SETFD, libc::FD_CLOEXEC) };
    let socket = listener
        .local_addr()
        .ok()
        .and_then(|a| a.as_pathname().map(Path::to_path_buf));
    // Remember which socket file is ours: a successor may have bound the same path by the
    // time we exit, and its socket must survive us.
    let socket_id = socket.as_deref().and_then(SocketFile::identify);
    // containerd gives every shim a log fifo in its bundle; without it (by hand), stderr.
    if let Err(e) = crate::logging::init(flags.debug, &flags.id) {
        eprintln!("containerd-shim-stasis-v2: logging disabled: {e}");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let our_socket = socket.clone().zip(socket_id);
    let result = rt.block_on(async move {
        reaper::start()?;
        let backend = BackendConfig::load(&flags.id, &std::env::current_dir()?)?;
        info!("shim {}: backend {}", flags.id, backend.engine);
        let runtime = runtime::build(&backend, &flags.namespace);
        let ttrpc_address = std::env::var("TTRPC_ADDRESS").ok();
        let events = Publisher::connect(ttrpc_address.as_deref(), &flags.namespace).await;
        let shim = Shim::with_bounds(runtime, events, &backend);
        listener.set_nonblocking(true)?;
        let mut server = crate::service::build(listener, shim.clone())?;
        server.start().await?;
        info!("shim {} serving (pid {})", flags.id, std::process::id());

        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = shim.shutdown.cancelled() => {}
            _ = term.recv() => {
                info!("SIGTERM: shutting down");
                // Ends a checkpoint hold at once (the pod runs on) instead of at its bound.
                shim.shutdown.cancel();
            }
        }
        // A checkpoint under way finishes (its thaw above all) before the shim exits.
        shim.work.close();
        if !shim.work.is_empty() {
            info!("waiting for {} checkpoint(s) to finish", shim.work.len());
            let bound = runtime::DEFAULT_CHECKPOINT_TIMEOUT + std::time::Duration::from_secs(30);
            let _ = tokio::time::timeout(bound, shim.work.wait()).await;
        }
        // Let the reply to Shutdown leave before the socket goes away.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        // containerd runs `delete` as soon as our connections close, and `delete` cleans up
        // after the pod only if nothing answers on this socket; the server keeps its stopped
        // listener open for as long as it waits for its connections (up to seconds), during
        // which a connect would still succeed: the pod's mounts and cgroups were then left.
        if let Some((path, ours)) = &our_socket {
            ours.unlink_if_still_ours(path);
        }
        let _ = server.shutdown().await;
        Ok::<_, BoxError>(())
    });
    // Helper commands that outlive the server (a `runsc wait` of a running container, their
    // pipe readers) must not keep the shim from exiting.
    rt.shutdown_timeout(std::time::Duration::from_secs(2));
    if let (Some(path), Some(ours)) = (socket, socket_id) {
        ours.remove_if_still_ours(&path);
    }
    if let Err(e) = &result {
        error!("shim failed: {e}");
    }
    result
}

/// Called by containerd after the shim is gone (or after a restart, per container): remove
/// what is left of `-id` only, and say how it ended. Safe to call twice.
pub fn delete(flags: &Flags) -> Result<(), BoxError> {
    let bundle = if flags.bundle.is_empty() {
        std::env::current_dir()?
    } else {
        PathBuf::from(&flags.bundle)
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // A pod whose shim died (never while a shim still answers on its socket): its containers'
    // runtime state goes with it.
    let dead_pod = (!shim_alive(flags))
        .then(|| crate::state::pod::PodRecord::load(&bundle, &flags.id))
        .flatten();
    let mut ids = vec![flags.id.clone()];
    if let Some(record) = &dead_pod {
        ids.extend(record.containers.iter().cloned());
    }
    // A pod whose shim died: first what must not wait (containerd gives this command a few
    // seconds, and a busy node may need them all): its shm mount and files, its pause
    // process, every process of its cgroups (thawed, then killed). Never while a shim still
    // answers on the pod's socket.
    let started = std::time::Instant::now();
    if dead_pod.is_some() {
        crate::sandbox::remove_after_crash(&flags.id, &bundle);
    }
    rt.block_on(async {
        reaper::start()?;
        // A container's own bundle does not say which backend ran it: ask each one that
        // keeps state in this namespace; deleting an unknown id is a no-op for all of them.
        let argv0 = std::env::args_os().next().unwrap_or_default();
        let configured = if bundle.join(runtime::config::BUNDLE_FILE).exists() {
            BackendConfig::load(&flags.id, &bundle).ok()
        } else {
            BackendConfig::for_binary_name(&flags.id, Path::new(&argv0)).ok()
        };
        for engine in Engine::ALL {
            // The shim's own settings (binary, flags) for its engine, defaults for the others.
            let backend =
                configured
                    .clone()
                    .filter(|b| b.engine == engine)
                    .unwrap_or(BackendConfig {
                        engine,
                        ..Default::default()
                    });
            if !runtime::root(engine, &flags.namespace).exists() {
                continue;
            }
            let runtime = runtime::build(&backend, &flags.namespace);
            let root = runtime::root(engine, &flags.namespace);
            for id in &ids {
                // A runtime with a directory per container never ran an id without one: skip
                // those (each needless runtime call costs time containerd does not give).
                if runtime.keeps_container_dirs() && !root.join(id).exists() {
                    continue;
                }
                if let Err(e) = runtime.delete(id, true).await {
                    eprintln!("containerd-shim-stasis-v2: {engine} delete {id}: {e}");
                }
            }
        }
        Ok::<_, BoxError>(())
    })?;
    crate::task::unmount(&bundle.join("rootfs"));
    remove_dead_socket(flags);
    if dead_pod.is_some() {
        // containerd logs this (as a warning of the clean-up) and kills the command after its
        // cleanup timeout (5 s by default): how close we came is worth seeing.
        eprintln!(
            "containerd-shim-stasis-v2: pod {}: cleaned up after its shim died, in {:?}",
            flags.id,
            started.elapsed()
        );
    }
    let resp = DeleteResponse {
        exit_status: 128 + libc::SIGKILL as u32,
        exited_at: protobuf::MessageField::some(timestamp(time::OffsetDateTime::now_utc())),
        ..Default::default()
    };
    std::io::stdout().write_all(&resp.write_to_bytes()?)?;
    std::io::stdout().flush()?;
    Ok(())
}

fn shim_alive(flags: &Flags) -> bool {
    let address = containerd_shim::socket_address(&flags.address, &flags.namespace, &flags.id);
    std::os::unix::net::UnixStream::connect(socket_path(&address)).is_ok()
}

/// The socket of a shim that died (SIGKILL) stays behind: remove it when nothing listens on
/// it any more. A live shim (a group still serving other containers) keeps its socket.
fn remove_dead_socket(flags: &Flags) {
    let address = containerd_shim::socket_address(&flags.address, &flags.namespace, &flags.id);
    let path = Path::new(socket_path(&address));
    if path.exists() && std::os::unix::net::UnixStream::connect(path).is_err() {
        let _ = std::fs::remove_file(path);
    }
}

/// `-info`: what containerd's runtime introspection asks a shim. Like runc-v2's answer, it
/// carries the OCI runtime's `features` (for the backend the options on stdin choose), which
/// is how containerd learns, e.g., that recursive read-only mounts are supported.
pub fn info() -> Result<(), BoxError> {
    use containerd_shim_protos::types::introspection::{RuntimeInfo, RuntimeVersion};
    let options = drain_stdin();
    let backend = backend_from_stdin("info", &options)?;
    let runtime = runtime::build(&backend, "info");
    let mut info = RuntimeInfo {
        name: "io.containerd.stasis.v2".to_string(),
        version: protobuf::MessageField::some(RuntimeVersion {
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        }),
        ..Default::default()
    };
    if !options.is_empty() {
        info.options = protobuf::MessageField::some(
            protobuf::well_known_types::any::Any::parse_from_bytes(&options)?,
        );
    }
    if let Some(features) = runtime.features() {
        info.features = protobuf::MessageField::some(protobuf::well_known_types::any::Any {
            type_url: "types.containerd.io/opencontainers/runtime-spec/1/features/Features"
                .to_string(),
            value: features,
            ..Default::default()
        });
    }
    std::io::stdout().write_all(&info.write_to_bytes()?)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    fn scratch() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "stasis-sock-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::create_dir(&dir).unwrap();
        dir
    }

    /// A socket bound at `<dir>/s`, identified, then closed (as a shim at its exit).
    fn closed_socket(dir: &Path) -> (PathBuf, SocketFile) {
        let path = dir.join("s");
        let ours = UnixListener::bind(&path).unwrap();
        let id = SocketFile::identify(&path).unwrap();
        drop(ours);
        (path, id)
    }

    #[test]
    fn a_successors_socket_at_the_same_path_survives_us() {
        let dir = scratch();
        let (path, id) = closed_socket(&dir);
        // The successor's start: unlink the stale file, bind afresh (maybe the same inode).
        std::fs::remove_file(&path).unwrap();
        let successor = UnixListener::bind(&path).unwrap();
        id.remove_if_still_ours(&path);
        assert!(path.exists(), "the successor's socket was removed");
        assert!(std::os::unix::net::UnixStream::connect(&path).is_ok());
        drop(successor);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn our_closed_socket_is_removed() {
        let dir = scratch();
        let (path, id) = closed_socket(&dir);
        id.remove_if_still_ours(&path);
        assert!(!path.exists(), "our stale socket was left behind");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
