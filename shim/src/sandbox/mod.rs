//! containerd's Sandbox API: the shim owns the pod. A pod is a cgroup that every container of
//! the pod lives below, a pause process holding the pod's namespaces, and the files CRI
//! bind-mounts into containers (hostname, hosts, resolv.conf, /dev/shm).

pub mod pause;
pub mod pidns;

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use async_trait::async_trait;
use containerd_shim_protos::{
    protobuf::MessageField,
    sandbox_api as sb,
    sandbox_async::Sandbox,
    ttrpc::{self, r#async::TtrpcContext},
    types::platform::Platform,
};
use k8s_cri::v1::PodSandboxConfig;
use log::{info, warn};
use prost::Message as _;
use tokio::sync::{watch, Mutex};

use crate::{
    cgroup,
    error::{Error, Result},
    reaper::{self, Exit},
    runtime::PodRoot,
    task::{timestamp, Tasks},
};

pub const READY: &str = "SANDBOX_READY";
pub const NOT_READY: &str = "SANDBOX_NOTREADY";

/// Annotation CRI puts on every container of a pod.
pub const SANDBOX_ID_ANNOTATION: &str = "io.kubernetes.cri.sandbox-id";

pub struct Pod {
    pub id: String,
    pub bundle: PathBuf,
    pub netns: String,
    /// The CRI PodSandboxConfig as containerd sent it (kept for the pod checkpoint).
    pub config_bytes: Vec<u8>,
    pub config: PodSandboxConfig,
    /// The pod's cgroup (cgroupfs path); containers go below it.
    pub cgroup: String,
    state: Mutex<PodState>,
    exited: watch::Sender<Option<Exit>>,
}

#[derive(Default)]
struct PodState {
    pid: i32,
    started: bool,
    created_at: Option<time::OffsetDateTime>,
    shm: Option<PathBuf>,
    files: Vec<PathBuf>,
    shut_down: bool,
    /// The runtime runs the pod's root itself (runsc), rather than our pause process.
    root_by_runtime: bool,
}

impl Pod {
    pub async fn pid(&self) -> i32 {
        self.state.lock().await.pid
    }

    pub fn exit(&self) -> Option<Exit> {
        *self.exited.borrow()
    }

    pub fn wait_exit(&self) -> watch::Receiver<Option<Exit>> {
        self.exited.subscribe()
    }

    /// containerd's state and root dirs, from the sandbox bundle
    /// `<state>/io.containerd.runtime.v2.task/<ns>/<id>` and its `work` link into `<root>`.
    fn containerd_dirs(&self) -> (Option<PathBuf>, Option<PathBuf>) {
        let up3 = |p: &Path| p.ancestors().nth(3).map(Path::to_path_buf);
        let state = up3(&self.bundle);
        let root = std::fs::read_link(self.bundle.join("work"))
            .ok()
            .and_then(|w| up3(&w));
        (state, root)
    }

    /// The cgroupsPath a container of this pod gets: below the pod cgroup.
    pub fn container_cgroup(&self, container_id: &str) -> String {
        format!("{}/{}", self.cgroup.trim_end_matches('/'), container_id)
    }
}

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

#[derive(Clone)]
pub struct SandboxService {
    pub tasks: Arc<Tasks>,
}

impl SandboxService {
    /// A pod created to be restored names its checkpoint in an annotation. Runtimes that
    /// restore whole sandboxes restore it at start; for the others the containers restore one
    /// by one. Either way an archive from another backend is refused here, before anything runs.
    fn restore_image(&self, pod: &Pod) -> Result<Option<PathBuf>> {
        let Some(dir) = pod.config.annotations.get(stasis_api::RESTORE_ANNOTATION) else {
            return Ok(None);
        };
        let dir = PathBuf::from(dir);
        let runtime = &self.tasks.runtime;
        crate::checkpoint::pod::check_pod_dir(&pod.id, &dir, runtime.name())?;
        if !runtime.checkpoints_whole_sandbox() {
            return Ok(None);
        }
        let image = dir.join(crate::runtime::SANDBOX_IMAGE_DIR);
        if !runtime.has_image(&image) {
            return Err(Error::invalid(
                &pod.id,
                format!(
                    "{} holds no {} sandbox image",
                    dir.display(),
                    runtime.name()
                ),
            ));
        }
        Ok(Some(image))
    }

    /// The last PID of the checkpointed pod's namespace, for a pod being restored.
    fn saved_last_pid(&self, pod: &Pod) -> Option<u32> {
        let dir = pod.config.annotations.get(stasis_api::RESTORE_ANNOTATION)?;
        let text = std::fs::read(Path::new(dir).join("pod.options")).ok()?;
        let options: serde_json::Value = serde_json::from_slice(&text).ok()?;
        options["annotations"][pidns::LAST_PID_ANNOTATION]
            .as_str()?
            .parse()
            .ok()
    }

    fn pod(&self, id: &str) -> Result<Arc<Pod>> {
        match self.tasks.pod() {
            Some(p) if p.id == id => Ok(p),
            _ => Err(Error::not_found("sandbox", id)),
        }
    }

    async fn create(&self, req: sb::CreateSandboxRequest) -> Result<()> {
        let id = req.sandbox_id.clone();
        if let Some(p) = self.tasks.pod() {
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
        let pod = Pod {
            id: id.clone(),
            bundle,
            netns: req.netns_path.clone(),
            config_bytes,
            config,
            cgroup,
            state: Mutex::new(PodState::default()),
            exited: watch::channel(None).0,
        };
        info!(
            "pod {id}: created (name {:?}, netns {:?}, cgroup {})",
            pod.config
                .metadata
                .as_ref()
                .map(|m| m.name.as_str())
                .unwrap_or(""),
            pod.netns,
            pod.cgroup
        );
        self.tasks.set_pod(Arc::new(pod));
        Ok(())
    }

    async fn start(&self, id: &str) -> Result<sb::StartSandboxResponse> {
        let pod = self.pod(id)?;
        let mut st = pod.state.lock().await;
        if st.started {
            return Err(Error::precondition(id, "sandbox already started"));
        }
        cgroup::create(id, &pod.cgroup)?;
        let (files, shm) = write_pod_files(&pod)?;
        st.files = files;
        st.shm = shm;
        let restore_image = self.restore_image(&pod)?;
        let runtime = self.tasks.runtime.clone();
        let root = PodRoot {
            id: id.to_string(),
            bundle: pod.bundle.clone(),
            netns: pod.netns.clone(),
            hostname: pod.config.hostname.clone(),
            cgroup: pod.cgroup.clone(),
            restore_image,
        };
        let (pid, by_runtime) = match runtime.start_pod(&root).await? {
            Some(pid) => (pid, true),
            None => {
                let pid = pause::spawn(id, &pod.netns, &pod.config.hostname)?;
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
        st.root_by_runtime = by_runtime;
        st.pid = pid;
        if !by_runtime {
            if let Some(last) = self.saved_last_pid(&pod) {
                if let Err(e) = pidns::reserve(id, pid, last).await {
                    warn!("pod {id}: cannot keep new PIDs above the restored ones: {e}");
                }
            }
        }
        st.started = true;
        let now = time::OffsetDateTime::now_utc();
        st.created_at = Some(now);
        let exited = pod.exited.clone();
        let pod_id = id.to_string();
        tokio::spawn(async move {
            let exit = if by_runtime {
                runtime.wait_init(&pod_id, pid).await
            } else {
                reaper::wait(pid).await
            };
            info!("pod {pod_id}: pause process {pid} exited ({})", exit.status);
            exited.send_replace(Some(exit));
        });
        info!("pod {id}: started, pause pid {pid}");
        Ok(sb::StartSandboxResponse {
            pid: pid as u32,
            created_at: MessageField::some(timestamp(now)),
            ..Default::default()
        })
    }

    async fn stop(&self, id: &str, timeout_secs: u32) -> Result<()> {
        let pod = self.pod(id)?;
        let timeout = std::time::Duration::from_secs(if timeout_secs == 0 {
            10
        } else {
            timeout_secs as u64
        });
        self.tasks.kill_all(timeout).await;
        let pid = pod.pid().await;
        let by_runtime = pod.state.lock().await.root_by_runtime;
        if by_runtime {
            // The runtime's sandbox: its root container goes, and the sandbox with it.
            let runtime = &self.tasks.runtime;
            if let Err(e) = runtime.kill(id, libc::SIGKILL as u32, true).await {
                warn!("pod {id}: kill the sandbox root: {e}");
            }
            let mut rx = pod.wait_exit();
            let _ = tokio::time::timeout(timeout, rx.wait_for(|e| e.is_some())).await;
            if let Err(e) = runtime.delete(id, true).await {
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

    async fn status(&self, id: &str, verbose: bool) -> Result<sb::SandboxStatusResponse> {
        let pod = self.pod(id)?;
        let st = pod.state.lock().await;
        let exit = pod.exit();
        let state = if st.started && exit.is_none() {
            READY
        } else {
            NOT_READY
        };
        let mut resp = sb::SandboxStatusResponse {
            sandbox_id: id.to_string(),
            pid: st.pid as u32,
            state: state.to_string(),
            created_at: st.created_at.map(timestamp).into(),
            exited_at: exit.map(|e| timestamp(e.at)).into(),
            ..Default::default()
        };
        if verbose {
            let info = serde_json::json!({
                "pid": st.pid,
                "runtime": "io.containerd.stasis.v2",
                "cgroup": pod.cgroup,
                "netns": pod.netns,
                "containers": self.tasks.ids(),
            });
            resp.info.insert("info".to_string(), info.to_string());
        }
        Ok(resp)
    }

    async fn shutdown(&self, id: &str) -> Result<()> {
        let pod = self.pod(id)?;
        self.stop(id, 10).await?;
        let mut st = pod.state.lock().await;
        if let Some(shm) = st.shm.take() {
            crate::task::unmount(&shm);
            let _ = std::fs::remove_dir(&shm);
        }
        for f in st.files.drain(..) {
            let _ = std::fs::remove_file(f);
        }
        if let Err(e) = cgroup::remove(id, &pod.cgroup) {
            warn!("{e}");
        }
        st.shut_down = true;
        drop(st);
        info!("pod {id}: shut down");
        if self.tasks.is_empty() {
            self.tasks.shutdown.cancel();
        }
        Ok(())
    }
}

/// Creates what CRI in shim mode expects the sandbox to provide (it bind-mounts them only if
/// they exist): hostname, hosts and resolv.conf under the CRI root, and a tmpfs for /dev/shm
/// under the CRI state dir.
fn write_pod_files(pod: &Pod) -> Result<(Vec<PathBuf>, Option<PathBuf>)> {
    let (state, root) = pod.containerd_dirs();
    let mut files = Vec::new();
    if let Some(root) = root {
        let dir = root
            .join("io.containerd.grpc.v1.cri/sandboxes")
            .join(&pod.id);
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&pod.id, "create pod files dir", e))?;
        let hostname = format!("{}\n", pod.config.hostname);
        let hosts = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n".to_string();
        let resolv = match &pod.config.dns_config {
            Some(dns) if !dns.servers.is_empty() || !dns.searches.is_empty() => {
                let mut s = String::new();
                for srv in &dns.servers {
                    s.push_str(&format!("nameserver {srv}\n"));
                }
                if !dns.searches.is_empty() {
                    s.push_str(&format!("search {}\n", dns.searches.join(" ")));
                }
                if !dns.options.is_empty() {
                    s.push_str(&format!("options {}\n", dns.options.join(" ")));
                }
                s
            }
            _ => std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default(),
        };
        for (name, text) in [
            ("hostname", hostname),
            ("hosts", hosts),
            ("resolv.conf", resolv),
        ] {
            let path = dir.join(name);
            std::fs::write(&path, text)
                .map_err(|e| Error::io(&pod.id, format!("write {name}"), e))?;
            files.push(path);
        }
    }
    let shm = match state {
        Some(state) => {
            let shm = state
                .join("io.containerd.grpc.v1.cri/sandboxes")
                .join(&pod.id)
                .join("shm");
            std::fs::create_dir_all(&shm).map_err(|e| Error::io(&pod.id, "create shm dir", e))?;
            use nix::mount::{mount, MsFlags};
            mount(
                Some("shm"),
                &shm,
                Some("tmpfs"),
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                Some("mode=1777,size=65536k"),
            )
            .map_err(|e| Error::io(&pod.id, "mount pod /dev/shm", e.into()))?;
            Some(shm)
        }
        None => None,
    };
    Ok((files, shm))
}

fn rpc<T>(r: Result<T>) -> ttrpc::Result<T> {
    r.map_err(|e| {
        warn!("{e}");
        e.into()
    })
}

#[async_trait]
impl Sandbox for SandboxService {
    async fn create_sandbox(
        &self,
        _ctx: &TtrpcContext,
        req: sb::CreateSandboxRequest,
    ) -> ttrpc::Result<sb::CreateSandboxResponse> {
        rpc(self.create(req).await.map(|_| Default::default()))
    }

    async fn start_sandbox(
        &self,
        _ctx: &TtrpcContext,
        req: sb::StartSandboxRequest,
    ) -> ttrpc::Result<sb::StartSandboxResponse> {
        rpc(self.start(&req.sandbox_id).await)
    }

    async fn platform(
        &self,
        _ctx: &TtrpcContext,
        req: sb::PlatformRequest,
    ) -> ttrpc::Result<sb::PlatformResponse> {
        rpc(self.pod(&req.sandbox_id))?;
        Ok(sb::PlatformResponse {
            platform: MessageField::some(Platform {
                os: "linux".into(),
                architecture: std::env::consts::ARCH
                    .replace("x86_64", "amd64")
                    .replace("aarch64", "arm64"),
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    async fn stop_sandbox(
        &self,
        _ctx: &TtrpcContext,
        req: sb::StopSandboxRequest,
    ) -> ttrpc::Result<sb::StopSandboxResponse> {
        rpc(self
            .stop(&req.sandbox_id, req.timeout_secs)
            .await
            .map(|_| Default::default()))
    }

    async fn wait_sandbox(
        &self,
        _ctx: &TtrpcContext,
        req: sb::WaitSandboxRequest,
    ) -> ttrpc::Result<sb::WaitSandboxResponse> {
        let pod = rpc(self.pod(&req.sandbox_id))?;
        let mut rx = pod.wait_exit();
        let exit = rx
            .wait_for(|e| e.is_some())
            .await
            .map(|e| e.expect("waited for Some"))
            .map_err(|_| ttrpc::Error::Others(format!("{}: sandbox gone", req.sandbox_id)))?;
        Ok(sb::WaitSandboxResponse {
            exit_status: exit.status as u32,
            exited_at: MessageField::some(timestamp(exit.at)),
            ..Default::default()
        })
    }

    async fn sandbox_status(
        &self,
        _ctx: &TtrpcContext,
        req: sb::SandboxStatusRequest,
    ) -> ttrpc::Result<sb::SandboxStatusResponse> {
        rpc(self.status(&req.sandbox_id, req.verbose).await)
    }

    async fn ping_sandbox(
        &self,
        _ctx: &TtrpcContext,
        req: sb::PingRequest,
    ) -> ttrpc::Result<sb::PingResponse> {
        rpc(self.pod(&req.sandbox_id))?;
        Ok(Default::default())
    }

    async fn shutdown_sandbox(
        &self,
        _ctx: &TtrpcContext,
        req: sb::ShutdownSandboxRequest,
    ) -> ttrpc::Result<sb::ShutdownSandboxResponse> {
        rpc(self
            .shutdown(&req.sandbox_id)
            .await
            .map(|_| Default::default()))
    }

    async fn sandbox_metrics(
        &self,
        _ctx: &TtrpcContext,
        req: sb::SandboxMetricsRequest,
    ) -> ttrpc::Result<sb::SandboxMetricsResponse> {
        let pod = rpc(self.pod(&req.sandbox_id))?;
        let data = rpc(cgroup::metrics(&req.sandbox_id, &pod.cgroup))?;
        let mut resp = sb::SandboxMetricsResponse::default();
        let m = resp.metrics.mut_or_insert_default();
        m.id = req.sandbox_id.clone();
        m.timestamp = MessageField::some(timestamp(time::OffsetDateTime::now_utc()));
        m.data = MessageField::some(data);
        Ok(resp)
    }
}
