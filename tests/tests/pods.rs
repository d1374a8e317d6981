//! Pods through containerd's CRI with `sandboxer = "shim"`: the shim serves the Sandbox API,
//! owns the pod cgroup and the pause process holding the pod's namespaces.

use std::{path::Path, time::Duration};

use anyhow::{ensure, Context, Result};
use stasis_e2e::{
    cri::{container_config, cri, pod_config},
    Containerd,
};

fn ns_of(pid: u32, ns: &str) -> String {
    std::fs::read_link(format!("/proc/{pid}/ns/{ns}"))
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_container_pod_lifecycle() -> Result<()> {
    let c = Containerd::start("pod-life")?;
    let image = c.import_busybox_for_cri()?;
    let mut cri = c.cri().await?;
    let pod = pod_config("web", &c.dir.join("logs"));
    let pod_id = cri.run_pod(&pod).await?;

    let (state, info) = cri.pod_state(&pod_id).await?;
    ensure!(state == cri::PodSandboxState::SandboxReady as i32, "pod not READY: {state}");
    let info: serde_json::Value = serde_json::from_str(info.get("info").context("no verbose info")?)?;
    let pause_pid = info["pid"].as_u64().context("no pid in info")? as u32;
    ensure!(pause_pid > 0);

    let a = cri
        .run_container(&pod_id, &pod, container_config("a", image, &["sh", "-c", "nc -ll -p 8080 -e echo pong-from-a"]))
        .await?;
    let b = cri
        .run_container(&pod_id, &pod, container_config("b", image, &["sleep", "100000"]))
        .await?;
    ensure!(c.shim_pids().len() == 1, "expected exactly one shim for the pod, got {:?}", c.shim_pids());

    // Shared namespaces: compare what each container sees with the pause process.
    for ns in ["ipc", "uts", "pid", "net"] {
        let na = cri.exec_ok(&a, &["readlink", &format!("/proc/self/ns/{ns}")]).await?;
        let nb = cri.exec_ok(&b, &["readlink", &format!("/proc/self/ns/{ns}")]).await?;
        ensure!(na == nb, "{ns}: a={na} b={nb}");
        ensure!(na == ns_of(pause_pid, ns), "{ns}: containers {na} vs pause {}", ns_of(pause_pid, ns));
    }
    // localhost across containers
    let mut reply = String::new();
    for _ in 0..50 {
        if let Ok(out) = cri.exec_ok(&b, &["sh", "-c", "echo ping | nc -w 2 127.0.0.1 8080"]).await {
            if out.contains("pong-from-a") {
                reply = out;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ensure!(reply.contains("pong-from-a"), "b could not reach a on localhost");
    // the pod IP from CNI is on eth0
    let status = cri
        .runtime
        .pod_sandbox_status(cri::PodSandboxStatusRequest { pod_sandbox_id: pod_id.clone(), verbose: false })
        .await?
        .into_inner()
        .status
        .context("pod status")?;
    let ip = status.network.context("no pod network")?.ip;
    ensure!(!ip.is_empty(), "CNI gave no IP");
    let addrs = cri.exec_ok(&a, &["ip", "addr", "show", "eth0"]).await?;
    ensure!(addrs.contains(&format!("inet {ip}/")), "eth0 lacks {ip}: {addrs}");
    // hostname
    let host = cri.exec_ok(&a, &["hostname"]).await?;
    ensure!(host == "web-host", "hostname {host}");
    // both containers below the pod cgroup, with the pause process
    let pause_cg = std::fs::read_to_string(format!("/proc/{pause_pid}/cgroup"))?;
    let pod_cg = pause_cg
        .lines()
        .find(|l| l.contains(":freezer:"))
        .and_then(|l| l.rsplit(':').next())
        .context("pause freezer cgroup")?
        .to_string();
    for id in [&a, &b] {
        let cg = cri.exec_ok(id, &["cat", "/proc/1/cgroup"]).await?;
        let _ = cg;
        let st = cri.container_status(id).await?;
        ensure!(st.state == cri::ContainerState::ContainerRunning as i32, "{id} not running");
    }
    let procs_under_pod: usize = walk_procs(&Path::new("/sys/fs/cgroup/freezer").join(pod_cg.trim_start_matches('/')));
    ensure!(procs_under_pod >= 3, "expected pause + 2 containers under {pod_cg}, found {procs_under_pod} processes");

    let list = cri.runtime.list_containers(cri::ListContainersRequest::default()).await?.into_inner();
    ensure!(list.containers.iter().filter(|x| x.pod_sandbox_id == pod_id).count() == 2);
    let pods = cri.runtime.list_pod_sandbox(cri::ListPodSandboxRequest::default()).await?.into_inner();
    ensure!(pods.items.iter().any(|p| p.id == pod_id));

    cri.stop_and_remove_pod(&pod_id).await?;
    c.wait_for("shim exit", Duration::from_secs(15), || Ok(c.shim_pids().is_empty()))?;
    Ok(())
}

/// Processes in a cgroup directory and all below it.
fn walk_procs(dir: &Path) -> usize {
    let mut n = std::fs::read_to_string(dir.join("cgroup.procs"))
        .map(|s| s.lines().count())
        .unwrap_or(0);
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.path().is_dir() {
                n += walk_procs(&e.path());
            }
        }
    }
    n
}
