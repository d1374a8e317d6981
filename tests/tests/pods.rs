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
    ensure!(
        state == cri::PodSandboxState::SandboxReady as i32,
        "pod not READY: {state}"
    );
    let info: serde_json::Value =
        serde_json::from_str(info.get("info").context("no verbose info")?)?;
    let pause_pid = info["pid"].as_u64().context("no pid in info")? as u32;
    ensure!(pause_pid > 0);

    let a = cri
        .run_container(
            &pod_id,
            &pod,
            container_config(
                "a",
                image,
                &["sh", "-c", "nc -ll -p 8080 -e echo pong-from-a"],
            ),
        )
        .await?;
    let b = cri
        .run_container(
            &pod_id,
            &pod,
            container_config("b", image, &["sleep", "100000"]),
        )
        .await?;
    ensure!(
        c.shim_pids().len() == 1,
        "expected exactly one shim for the pod, got {:?}",
        c.shim_pids()
    );

    // Shared namespaces: compare what each container sees with the pause process.
    for ns in ["ipc", "uts", "pid", "net"] {
        let na = cri
            .exec_ok(&a, &["readlink", &format!("/proc/self/ns/{ns}")])
            .await?;
        let nb = cri
            .exec_ok(&b, &["readlink", &format!("/proc/self/ns/{ns}")])
            .await?;
        ensure!(na == nb, "{ns}: a={na} b={nb}");
        ensure!(
            na == ns_of(pause_pid, ns),
            "{ns}: containers {na} vs pause {}",
            ns_of(pause_pid, ns)
        );
    }
    // localhost across containers
    let mut reply = String::new();
    for _ in 0..50 {
        if let Ok(out) = cri
            .exec_ok(&b, &["sh", "-c", "echo ping | nc -w 2 127.0.0.1 8080"])
            .await
        {
            if out.contains("pong-from-a") {
                reply = out;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ensure!(
        reply.contains("pong-from-a"),
        "b could not reach a on localhost"
    );
    // the pod IP from CNI is on eth0
    let status = cri
        .runtime
        .pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: pod_id.clone(),
            verbose: false,
        })
        .await?
        .into_inner()
        .status
        .context("pod status")?;
    let ip = status.network.context("no pod network")?.ip;
    ensure!(!ip.is_empty(), "CNI gave no IP");
    let addrs = cri.exec_ok(&a, &["ip", "addr", "show", "eth0"]).await?;
    ensure!(
        addrs.contains(&format!("inet {ip}/")),
        "eth0 lacks {ip}: {addrs}"
    );
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
    ensure!(
        pod_cg.ends_with(&format!("/{pod_id}")),
        "the pause process is in {pod_cg}, not in a cgroup of pod {pod_id}"
    );
    for id in [&a, &b] {
        // The exec'd `cat` sits in its container's cgroup (/proc/1 would be the pod's pause:
        // the PID namespace is shared).
        let cg = cri.exec_ok(id, &["cat", "/proc/self/cgroup"]).await?;
        let container_cg = cg
            .lines()
            .find(|l| l.contains(":freezer:"))
            .and_then(|l| l.rsplit(':').next())
            .with_context(|| format!("{id}: no freezer cgroup in {cg}"))?;
        ensure!(
            container_cg == format!("{pod_cg}/{id}"),
            "container {id} is in {container_cg}, not below the pod cgroup {pod_cg}"
        );
        let st = cri.container_status(id).await?;
        ensure!(
            st.state == cri::ContainerState::ContainerRunning as i32,
            "{id} not running"
        );
    }
    // And the kernel agrees: the pod cgroup holds the pause process and both containers.
    let procs_under_pod: usize =
        walk_procs(&Path::new("/sys/fs/cgroup/freezer").join(pod_cg.trim_start_matches('/')));
    ensure!(
        procs_under_pod >= 3,
        "expected pause + 2 containers under {pod_cg}, found {procs_under_pod} processes"
    );

    let list = cri
        .runtime
        .list_containers(cri::ListContainersRequest::default())
        .await?
        .into_inner();
    ensure!(
        list.containers
            .iter()
            .filter(|x| x.pod_sandbox_id == pod_id)
            .count()
            == 2
    );
    let pods = cri
        .runtime
        .list_pod_sandbox(cri::ListPodSandboxRequest::default())
        .await?
        .into_inner();
    ensure!(pods.items.iter().any(|p| p.id == pod_id));

    // `stasisctl pod ls`: the pod's row, then with one container stopped, then gone.
    let row = |out: &str| {
        out.lines()
            .find(|l| l.starts_with(&pod_id[..13]))
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
    };
    let ls = c.stasisctl_ok(&["pod", "ls"])?;
    ensure!(
        ls.lines().next().is_some_and(|h| h.starts_with("POD ID"))
            && row(&ls).as_deref()
                == Some(&*format!(
                    "{} web default READY stasis a(RUNNING), b(RUNNING)",
                    &pod_id[..13]
                )),
        "pod ls: {ls}"
    );
    cri.runtime
        .stop_container(cri::StopContainerRequest {
            container_id: b.clone(),
            timeout: 1,
        })
        .await?;
    let ls = c.stasisctl_ok(&["pod", "ls"])?;
    ensure!(
        row(&ls).is_some_and(|r| r.ends_with("a(RUNNING), b(EXITED)")),
        "pod ls with b stopped: {ls}"
    );

    cri.stop_and_remove_pod(&pod_id).await?;
    let ls = c.stasisctl_ok(&["pod", "ls"])?;
    ensure!(row(&ls).is_none(), "pod ls after the removal: {ls}");
    c.wait_for("shim exit", Duration::from_secs(15), || {
        Ok(c.shim_pids().is_empty())
    })?;
    c.finish()
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

async fn running_pod(
    c: &Containerd,
    name: &str,
    containers: &[(&str, &[&str])],
) -> Result<(
    stasis_e2e::cri::CriClient,
    String,
    cri::PodSandboxConfig,
    Vec<String>,
)> {
    let image = c.import_busybox_for_cri()?;
    let mut cri = c.cri().await?;
    let pod = pod_config(name, &c.dir.join("logs"));
    let pod_id = cri.run_pod(&pod).await?;
    let mut ids = Vec::new();
    for (cname, cmd) in containers {
        ids.push(
            cri.run_container(&pod_id, &pod, container_config(cname, image, cmd))
                .await?,
        );
    }
    Ok((cri, pod_id, pod, ids))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_survives_containerd_restart() -> Result<()> {
    let mut c = Containerd::start("pod-restart")?;
    let (_, pod_id, _, ids) = running_pod(
        &c,
        "rs",
        &[("a", &["sleep", "100000"]), ("b", &["sleep", "100000"])],
    )
    .await?;
    let shims = c.shim_pids();
    c.restart()?;
    let mut cri = c.cri().await?;
    let (state, _) = cri.pod_state(&pod_id).await?;
    ensure!(
        state == cri::PodSandboxState::SandboxReady as i32,
        "pod not READY after restart"
    );
    for id in &ids {
        let st = cri.container_status(id).await?;
        ensure!(
            st.state == cri::ContainerState::ContainerRunning as i32,
            "{id} not RUNNING after restart"
        );
        ensure!(cri.exec_ok(id, &["echo", "alive"]).await? == "alive");
    }
    ensure!(c.shim_pids() == shims, "shim replaced across restart");
    cri.stop_and_remove_pod(&pod_id).await?;
    c.wait_for("shim exit", Duration::from_secs(15), || {
        Ok(c.shim_pids().is_empty())
    })?;
    c.finish()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exits_and_a_dead_pause_process() -> Result<()> {
    let c = Containerd::start("pod-exit")?;
    let (mut cri, pod_id, _, ids) = running_pod(
        &c,
        "ex",
        &[
            ("quits", &["sh", "-c", "sleep 1; exit 7"]),
            ("stays", &["sleep", "100000"]),
        ],
    )
    .await?;
    let mut code = None;
    for _ in 0..100 {
        let st = cri.container_status(&ids[0]).await?;
        if st.state == cri::ContainerState::ContainerExited as i32 {
            code = Some(st.exit_code);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ensure!(code == Some(7), "container that quit: exit code {code:?}");
    let (state, info) = cri.pod_state(&pod_id).await?;
    ensure!(
        state == cri::PodSandboxState::SandboxReady as i32,
        "pod left READY when one container exited"
    );

    let info: serde_json::Value = serde_json::from_str(&info["info"])?;
    let pause = info["pid"].as_i64().context("pause pid")? as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pause),
        nix::sys::signal::Signal::SIGKILL,
    )?;
    let mut not_ready = false;
    for _ in 0..100 {
        if cri.pod_state(&pod_id).await?.0 == cri::PodSandboxState::SandboxNotready as i32 {
            not_ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ensure!(
        not_ready,
        "pod still READY after its pause process was killed"
    );
    cri.stop_and_remove_pod(&pod_id).await?;
    c.wait_for("shim exit", Duration::from_secs(15), || {
        Ok(c.shim_pids().is_empty())
    })?;
    c.finish()
}

/// What a running pod holds on the host, to check it is all gone after removal.
struct PodFootprint {
    pause: i32,
    netns: String,
    cgroup: String,
    socket: String,
}

fn shim_socket(c: &Containerd, id: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(format!("{}/k8s.io/{id}", c.socket().display()));
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("/run/containerd/s/{hex}")
}

impl PodFootprint {
    fn leftovers(&self) -> Vec<String> {
        let mut left = Vec::new();
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.pause)).unwrap_or_default();
        if stat.contains("containerd-shim") {
            left.push(format!("pause process {}", self.pause));
        }
        if !self.netns.is_empty() && Path::new(&self.netns).exists() {
            left.push(format!("netns {}", self.netns));
        }
        for h in ["freezer", "memory", "pids", "cpu"] {
            let p = Path::new("/sys/fs/cgroup")
                .join(h)
                .join(self.cgroup.trim_start_matches('/'));
            if p.exists() {
                left.push(format!("cgroup {}", p.display()));
            }
        }
        if Path::new(&self.socket).exists() {
            left.push(format!("socket {}", self.socket));
        }
        left
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_pods_leave_nothing_behind() -> Result<()> {
    let c = Containerd::start("pod-leaks")?;
    let image = c.import_busybox_for_cri()?;
    let mut cri = c.cri().await?;
    let mut footprints = Vec::new();
    for i in 0..10 {
        let pod = pod_config(&format!("p{i}"), &c.dir.join("logs"));
        let pod_id = cri.run_pod(&pod).await?;
        let id = cri
            .run_container(
                &pod_id,
                &pod,
                container_config("c", image, &["sleep", "100000"]),
            )
            .await?;
        ensure!(cri.exec_ok(&id, &["echo", "ok"]).await? == "ok");
        let (_, info) = cri.pod_state(&pod_id).await?;
        let info: serde_json::Value = serde_json::from_str(&info["info"])?;
        let fp = PodFootprint {
            pause: info["pid"].as_i64().context("pid")? as i32,
            netns: info["netns"].as_str().unwrap_or_default().to_string(),
            cgroup: info["cgroup"].as_str().context("cgroup")?.to_string(),
            socket: shim_socket(&c, &pod_id),
        };
        ensure!(
            fp.leftovers().len() >= 3,
            "footprint of a running pod not found: {:?}",
            fp.leftovers()
        );
        cri.stop_and_remove_pod(&pod_id).await?;
        footprints.push(fp);
    }
    c.wait_for("shims to exit", Duration::from_secs(15), || {
        Ok(c.shim_pids().is_empty())
    })?;
    let left: Vec<String> = footprints.iter().flat_map(|f| f.leftovers()).collect();
    ensure!(left.is_empty(), "left behind: {left:?}");
    let mounts = stasis_e2e::mounts_under(&c.dir);
    ensure!(mounts.is_empty(), "mounts left: {mounts:?}");
    c.finish()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_on_pods() -> Result<()> {
    use containerd_shim_protos::{sandbox_api as sb, sandbox_sync::SandboxClient, ttrpc};
    let c = Containerd::start("pod-bad")?;
    let (mut cri, pod_id, pod, _) = running_pod(&c, "bad", &[("ok", &["sleep", "100000"])]).await?;

    // A container the OCI runtime refuses: the error names it, the pod stays READY.
    let image = stasis_e2e::image::BUSYBOX_REF;
    let err = cri
        .run_container(
            &pod_id,
            &pod,
            container_config("broken", image, &["/no/such/binary"]),
        )
        .await
        .expect_err("a container with a missing binary must not start");
    let text = format!("{err:#}");
    let created: Vec<_> = cri
        .runtime
        .list_containers(cri::ListContainersRequest::default())
        .await?
        .into_inner()
        .containers
        .into_iter()
        .filter(|x| x.metadata.as_ref().map(|m| m.name.as_str()) == Some("broken"))
        .map(|x| x.id)
        .collect();
    ensure!(created.len() == 1, "broken container not listed");
    ensure!(
        text.contains(&created[0]),
        "error does not name the container {}: {text}",
        created[0]
    );
    ensure!(
        text.contains("no such file"),
        "error does not carry runc's reason: {text}"
    );
    ensure!(
        cri.pod_state(&pod_id).await?.0 == cri::PodSandboxState::SandboxReady as i32,
        "pod not READY"
    );

    // The shim's Sandbox API directly: unknown ids are NotFound; StopSandbox twice is harmless.
    // The shim runs in the sandbox bundle, where `start` left its address.
    let shim = *c.shim_pids().first().context("no shim")?;
    let bundle = std::fs::read_link(format!("/proc/{shim}/cwd"))?;
    let address = std::fs::read_to_string(bundle.join("address"))
        .with_context(|| format!("address in {}", bundle.display()))?;
    let client = SandboxClient::new(ttrpc::Client::connect(address.trim())?);
    let ctx = || ttrpc::context::with_timeout(10_000_000_000);
    let err = client
        .sandbox_status(
            ctx(),
            &sb::SandboxStatusRequest {
                sandbox_id: "nosuch".into(),
                ..Default::default()
            },
        )
        .expect_err("unknown sandbox");
    match err {
        ttrpc::Error::RpcStatus(s) => {
            ensure!(s.code() == ttrpc::Code::NOT_FOUND, "code {:?}", s.code());
            ensure!(s.message.contains("nosuch"), "{}", s.message);
        }
        other => anyhow::bail!("unexpected {other:?}"),
    }
    cri.runtime
        .stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: pod_id.clone(),
        })
        .await?;
    client.stop_sandbox(
        ctx(),
        &sb::StopSandboxRequest {
            sandbox_id: pod_id.clone(),
            ..Default::default()
        },
    )?;
    client.stop_sandbox(
        ctx(),
        &sb::StopSandboxRequest {
            sandbox_id: pod_id.clone(),
            ..Default::default()
        },
    )?;
    cri.runtime
        .remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: pod_id.clone(),
        })
        .await?;
    c.wait_for("shim exit", Duration::from_secs(15), || {
        Ok(c.shim_pids().is_empty())
    })?;
    c.finish()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_files_are_what_containers_see() -> Result<()> {
    let c = Containerd::start("pod-files")?;
    let image = c.import_busybox_for_cri()?;
    let mut cri = c.cri().await?;
    let mut pod = pod_config("files", &c.dir.join("logs"));
    pod.dns_config = Some(cri::DnsConfig {
        servers: vec!["192.0.2.53".into()],
        searches: vec!["pods.example".into()],
        options: vec!["ndots:2".into()],
    });
    let pod_id = cri.run_pod(&pod).await?;
    let mut ids = Vec::new();
    for name in ["a", "b"] {
        ids.push(
            cri.run_container(
                &pod_id,
                &pod,
                container_config(name, image, &["sleep", "100000"]),
            )
            .await?,
        );
    }
    let hosts = cri.exec_ok(&ids[0], &["cat", "/etc/hosts"]).await?;
    ensure!(
        hosts
            .lines()
            .any(|l| l.starts_with("127.0.0.1") && l.contains("localhost")),
        "/etc/hosts in the container: {hosts:?}"
    );
    let resolv = cri.exec_ok(&ids[0], &["cat", "/etc/resolv.conf"]).await?;
    for want in [
        "nameserver 192.0.2.53",
        "search pods.example",
        "options ndots:2",
    ] {
        ensure!(
            resolv.contains(want),
            "/etc/resolv.conf lacks {want:?}: {resolv:?}"
        );
    }
    let hostname = cri.exec_ok(&ids[1], &["cat", "/etc/hostname"]).await?;
    ensure!(
        hostname.trim() == "files-host",
        "/etc/hostname {hostname:?}"
    );
    // /dev/shm: a tmpfs, one per pod, shared by its containers.
    let mounts = cri.exec_ok(&ids[0], &["cat", "/proc/mounts"]).await?;
    ensure!(
        mounts
            .lines()
            .any(|l| l.split_whitespace().nth(1) == Some("/dev/shm")
                && l.split_whitespace().nth(2) == Some("tmpfs")),
        "/dev/shm is not a tmpfs: {mounts}"
    );
    cri.exec_ok(&ids[0], &["sh", "-c", "echo shared > /dev/shm/note"])
        .await?;
    let note = cri.exec_ok(&ids[1], &["cat", "/dev/shm/note"]).await?;
    ensure!(
        note.trim() == "shared",
        "the other container's /dev/shm: {note:?}"
    );
    cri.stop_and_remove_pod(&pod_id).await?;
    c.finish()
}
