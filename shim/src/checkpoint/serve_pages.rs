//! Post-copy on the source: the held pod's pages, served from its containers' CRIU dumps
//! through one Unix socket (root's, in a fresh 0700 directory) that stasisctl relays to the
//! target. A connection names a container's directory on its first line and is then joined
//! to that container's CRIU page server, once; the hold's end closes every connection and
//! ends the dumps before the containers are stopped or thawed.

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
        let listener = UnixListener::bind(&socket)
            .map_err(|e| Error::io(pod_id, format!("bind {}", socket.display()), e))?;
        let mut by_dir = HashMap::new();
        for d in &dumps {
            let name = targets
                .iter()
                .find(|t| t.id == d.id)
                .and_then(|t| t.dir.file_name())
                .map(|n| n.to_string_lossy().into_owned())
                .ok_or_else(|| {
                    Error::invalid(&d.id, "a post-copy dump of no selected container")
                })?;
            by_dir.insert(
                name,
                d.connector()
                    .map_err(|e| Error::io(&d.id, "keep the dump's namespace", e))?,
            );
        }
        let relays: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let accept = tokio::spawn(serve(
            pod_id.to_string(),
            listener,
            Arc::new(Mutex::new(by_dir)),
            relays.clone(),
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
        })
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

async fn serve(
    pod_id: String,
    listener: UnixListener,
    connectors: Connectors,
    relays: Arc<Mutex<Vec<JoinHandle<()>>>>,
) {
    loop {
        let Ok((conn, _)) = listener.accept().await else {
            return;
        };
        let (pod_id, connectors) = (pod_id.clone(), connectors.clone());
        let relay = tokio::spawn(async move {
            if let Err(e) = relay(conn, &connectors).await {
                warn!("pod {pod_id}: post-copy pages: {e}");
            }
        });
        relays.lock().unwrap_or_else(|e| e.into_inner()).push(relay);
    }
}

/// Joins one connection to the CRIU page server its first line names.
async fn relay(
    conn: tokio::net::UnixStream,
    connectors: &Connectors,
) -> std::result::Result<(), String> {
    let mut reader = BufReader::new(conn);
    let mut hello = String::new();
    let mut limited = (&mut reader).take(MAX_HELLO);
    tokio::time::timeout(Duration::from_secs(10), limited.read_line(&mut hello))
        .await
        .map_err(|_| "no container named within 10 s".to_string())?
        .map_err(|e| format!("read the container's name: {e}"))?;
    let name = hello.trim_end_matches('\n');
    let connector = connectors
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(name)
        .ok_or_else(|| {
            format!(
                "{name:?} is no container of this checkpoint, or its pages were asked for already"
            )
        })?;
    let tcp = tokio::task::spawn_blocking(move || connector.connect())
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("{name}: connect to CRIU's page server: {e}"))?;
    tcp.set_nonblocking(true).map_err(|e| e.to_string())?;
    let mut tcp = tokio::net::TcpStream::from_std(tcp).map_err(|e| e.to_string())?;
    // Bytes the reader took past the first line belong to the page server.
    let buffered = reader.buffer().to_vec();
    let mut conn = reader.into_inner();
    if !buffered.is_empty() {
        tokio::io::AsyncWriteExt::write_all(&mut tcp, &buffered)
            .await
            .map_err(|e| e.to_string())?;
    }
    let (up, down) = tokio::io::copy_bidirectional(&mut conn, &mut tcp)
        .await
        .map_err(|e| format!("{name}: relay: {e}"))?;
    info!("{name}: post-copy pages relayed: {up} bytes of requests, {down} bytes of pages");
    Ok(())
}
