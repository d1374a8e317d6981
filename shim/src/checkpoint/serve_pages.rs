//! Post-copy on the source: the held pod's pages, served by its containers' CRIU dumps,
//! reached through one Unix socket (root's, in a fresh 0700 directory) from which stasisctl
//! relays them to the target. A connection names a container's directory on its first line
//! and gets a connection to that container's CRIU page server passed back, once; the hold's
//! end ends the dumps before the containers are stopped or thawed.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use log::{info, warn};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, BufReader},
    net::UnixListener,
    task::JoinHandle,
};

use crate::{
    error::{Error, Result},
    runtime::{postcopy::LazyDump, ContainerTarget},
    util,
};

/// The longest first line a connection may send (a container's directory name).
const MAX_HELLO: u64 = 512;

/// The pages of a post-copy checkpoint's held containers, served until [`PageService::end`].
pub struct PageService {
    pod_id: String,
    dir: PathBuf,
    pub socket: PathBuf,
    dumps: Vec<LazyDump>,
    accept: JoinHandle<()>,
    relays: Arc<Mutex<Vec<JoinHandle<()>>>>,
    /// Told when a connection that took a page server closes (its holder is done or gone).
    lease_ended: Arc<tokio::sync::Notify>,
}

impl PageService {
    /// Binds the socket and serves `dumps` (one per container of `targets`).
    pub fn start(
        pod_id: &str,
        targets: &[ContainerTarget],
        dumps: Vec<LazyDump>,
    ) -> Result<PageService> {
        // Short names: a socket's path must fit in 108 bytes, and the pod id takes 64.
        let dir = util::private_dir(pod_id, "pg")?;
        let socket = dir.join("s");
        let bound = UnixListener::bind(&socket)
            .map_err(|e| Error::io(pod_id, format!("bind {}", socket.display()), e))
            .and_then(|l| Ok((l, connectors(targets, &dumps)?)));
        let (listener, by_dir) = match bound {
            Ok(b) => b,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        let relays: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let lease_ended = Arc::new(tokio::sync::Notify::new());
        let accept = tokio::spawn(serve(
            pod_id.to_string(),
            listener,
            Arc::new(Mutex::new(by_dir)),
            relays.clone(),
            lease_ended.clone(),
        ));
        info!(
            "pod {pod_id}: serving post-copy pages on {}",
            socket.display()
        );
        Ok(PageService {
            pod_id: pod_id.to_string(),
            dir,
            socket,
            dumps,
            accept,
            relays,
            lease_ended,
        })
    }

    /// Resolves once the transfer is over for someone: a dump ended unfinished, or the
    /// holder of a page server's connection (stasisctl) closed its lease. Its caller's word
    /// (FinishCheckpoint) should follow at once; if it does not, nobody will give it.
    pub fn broken(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut each: Vec<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>> = self
            .dumps
            .iter()
            .map(|d| Box::pin(d.broken()) as _)
            .collect();
        let lease = self.lease_ended.clone();
        each.push(Box::pin(async move { lease.notified().await }));
        async move {
            futures::future::select_all(each).await;
        }
    }

    /// Closes every connection and ends the dumps (CRIU lets go of the tasks, which stay
    /// frozen); returns whether every dump said its transfer finished.
    pub async fn end(self) -> bool {
        self.accept.abort();
        for r in self
            .relays
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            r.abort();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        let ended = futures::future::join_all(self.dumps.into_iter().map(LazyDump::end)).await;
        let all = ended.iter().all(|ok| *ok);
        info!(
            "pod {}: post-copy page service ended ({})",
            self.pod_id,
            if all {
                "every transfer finished"
            } else {
                "not every transfer finished"
            }
        );
        all
    }
}

type Connectors = Arc<Mutex<HashMap<String, crate::runtime::postcopy::Connector>>>;

/// Each dump's connector, by its container's directory name.
fn connectors(
    targets: &[ContainerTarget],
    dumps: &[LazyDump],
) -> Result<HashMap<String, crate::runtime::postcopy::Connector>> {
    let mut by_dir = HashMap::new();
    for d in dumps {
        let name = targets
            .iter()
            .find(|t| t.id == d.id)
            .and_then(|t| t.dir.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| Error::invalid(&d.id, "a post-copy dump of no selected container"))?;
        let connector = d
            .connector()
            .map_err(|e| Error::io(&d.id, "keep the dump's namespace", e))?;
        by_dir.insert(name, connector);
    }
    Ok(by_dir)
}

async fn serve(
    pod_id: String,
    listener: UnixListener,
    connectors: Connectors,
    relays: Arc<Mutex<Vec<JoinHandle<()>>>>,
    lease: Arc<tokio::sync::Notify>,
) {
    loop {
        let Ok((conn, _)) = listener.accept().await else {
            return;
        };
        let (pod_id, connectors, lease) = (pod_id.clone(), connectors.clone(), lease.clone());
        let relay = tokio::spawn(async move {
            if let Err(e) = relay(conn, &connectors, &lease).await {
                warn!("pod {pod_id}: post-copy pages: {e}");
            }
        });
        relays.lock().unwrap_or_else(|e| e.into_inner()).push(relay);
    }
}

/// Hands the connection to the CRIU page server a connection's first line names over to its
/// peer (SCM_RIGHTS): the pages then flow between stasisctl and CRIU directly, and go on
/// flowing should this shim die (CRIU keeps the pages in its pipes, whatever becomes of the
/// tasks).
async fn relay(
    conn: tokio::net::UnixStream,
    connectors: &Connectors,
    lease_ended: &tokio::sync::Notify,
) -> std::result::Result<(), String> {
    let mut reader = BufReader::new(conn);
    let mut hello = String::new();
    let mut limited = (&mut reader).take(MAX_HELLO);
    tokio::time::timeout(Duration::from_secs(10), limited.read_line(&mut hello))
        .await
        .map_err(|_| "no container named within 10 s".to_string())?
        .map_err(|e| format!("read the container's name: {e}"))?;
    let name = hello.trim_end_matches('\n').to_string();
    let connector = connectors
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&name)
        .ok_or_else(|| {
            format!(
                "{name:?} is no container of this checkpoint, or its pages were asked for already"
            )
        })?;
    let conn = reader.into_inner().into_std().map_err(|e| e.to_string())?;
    let sent = tokio::task::spawn_blocking(move || -> std::result::Result<_, String> {
        let tcp = connector
            .connect()
            .map_err(|e| format!("{name}: connect to CRIU's page server: {e}"))?;
        use std::os::fd::AsRawFd;
        let fds = [tcp.as_raw_fd()];
        let cmsg = [nix::sys::socket::ControlMessage::ScmRights(&fds)];
        let iov = [std::io::IoSlice::new(b"p")];
        nix::sys::socket::sendmsg::<()>(
            conn.as_raw_fd(),
            &iov,
            &cmsg,
            nix::sys::socket::MsgFlags::empty(),
            None,
        )
        .map_err(|e| format!("{name}: hand the page server's connection over: {e}"))?;
        info!("{name}: post-copy pages: CRIU's page server handed over");
        Ok(conn)
    });
    let conn = sent.await.map_err(|e| e.to_string())??;
    // The lease: stasisctl keeps this connection until the transfer is over for it.
    conn.set_nonblocking(true).map_err(|e| e.to_string())?;
    let mut conn = tokio::net::UnixStream::from_std(conn).map_err(|e| e.to_string())?;
    let mut rest = [0u8; 64];
    while !matches!(conn.read(&mut rest).await, Ok(0) | Err(_)) {}
    lease_ended.notify_one();
    Ok(())
}
