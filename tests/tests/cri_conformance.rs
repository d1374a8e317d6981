//! What kubelet sees through CRI is what containerd's runc handler gives: pod sysctls (the
//! pod's own and CRI's defaults), the runtime's features, seccomp under gVisor, hostIPC.
//! Each behaviour is compared with a runc-handler pod in the same containerd where it can be.

use anyhow::{ensure, Context, Result};
use stasis_e2e::{
    cri::{container_config, cri, pod_config, CriClient},
    Containerd,
};

const SLEEP: &[&str] = &["sleep", "100000"];

fn with_sysctls(mut pod: cri::PodSandboxConfig, sysctls: &[(&str, &str)]) -> cri::PodSandboxConfig {
    let linux = pod.linux.get_or_insert_with(Default::default);
    for (k, v) in sysctls {
        linux.sysctls.insert(k.to_string(), v.to_string());
    }
    pod
}

/// Runs a pod under `handler` with one sleeping container; returns (pod id, container id).
async fn sleeper(
    cri: &mut CriClient,
    pod: &cri::PodSandboxConfig,
    handler: &str,
    image: &str,
) -> Result<(String, String)> {
    let pod_id = cri.run_pod_with(pod, handler).await?;
    let id = cri
        .run_container(&pod_id, pod, container_config("app", image, SLEEP))
        .await?;
    Ok((pod_id, id))
}

/// The values of `names` (dotted) as the container reads them, tabs and spaces as one space.
async fn read_sysctls(cri: &mut CriClient, id: &str, names: &[&str]) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for n in names {
        let path = format!("/proc/sys/{}", n.replace('.', "/"));
        let v = cri.exec_ok(id, &["cat", &path]).await?;
        out.push(v.split_whitespace().collect::<Vec<_>>().join(" "));
    }
    Ok(out)
}

const CRI_DEFAULTS: [&str; 2] = [
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.ping_group_range",
];

/// A pod's sysctls are set in its own namespaces (IPC and network) before its containers
/// start, the node's values stay as they were, and CRI's defaults for every pod are those a
/// runc-handler pod gets. A sysctl that is not namespaced, or that the kernel does not know,
/// fails RunPodSandbox naming it, and leaves nothing behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_sysctls_are_set_in_the_pods_namespaces() -> Result<()> {
    let c = Containerd::start("cri-sysctls")?;
    let image = c.import_busybox_for_cri()?;
    let mut cri = c.cri().await?;
    let asked = [
        ("kernel.shm_rmid_forced", "1"),
        ("kernel.msgmax", "100"),
        ("net.ipv4.ip_local_port_range", "20000 30000"),
        ("net/core/somaxconn", "1000"),
    ];
    let names = [
        "kernel.shm_rmid_forced",
        "kernel.msgmax",
        "net.ipv4.ip_local_port_range",
        "net.core.somaxconn",
    ];
    let host_before = names
        .iter()
        .map(|n| std::fs::read_to_string(format!("/proc/sys/{}", n.replace('.', "/"))))
        .collect::<std::io::Result<Vec<_>>>()?;
    let pod = with_sysctls(pod_config("sysctls", &c.dir.join("logs")), &asked);
    let (pod_id, id) = sleeper(&mut cri, &pod, "stasis", image).await?;
    let got = read_sysctls(&mut cri, &id, &names).await?;
    ensure!(
        got == ["1", "100", "20000 30000", "1000"],
        "the pod's sysctls inside its container: {got:?}"
    );
    let host_after = names
        .iter()
        .map(|n| std::fs::read_to_string(format!("/proc/sys/{}", n.replace('.', "/"))))
        .collect::<std::io::Result<Vec<_>>>()?;
    ensure!(
        host_before == host_after,
        "the node's sysctls changed: {host_before:?} → {host_after:?}"
    );

    // CRI's defaults, as a runc-handler pod in the same containerd gets them.
    let ours = read_sysctls(&mut cri, &id, &CRI_DEFAULTS).await?;
    let runc_pod = pod_config("sysctls-runc", &c.dir.join("logs"));
    let (runc_pod_id, runc_id) = sleeper(&mut cri, &runc_pod, "runc", image).await?;
    let theirs = read_sysctls(&mut cri, &runc_id, &CRI_DEFAULTS).await?;
    ensure!(
        ours == theirs && ours == ["0", "0 2147483647"],
        "CRI's default sysctls: stasis pod {ours:?}, runc pod {theirs:?}"
    );
    cri.stop_and_remove_pod(&runc_pod_id).await?;
    cri.stop_and_remove_pod(&pod_id).await?;
    let footprint = c.settled_footprint().await?;
    let swappiness = std::fs::read_to_string("/proc/sys/vm/swappiness")?;
    for (sysctl, why) in [
        (
            (
                "vm.swappiness",
                if swappiness.trim() == "10" {
                    "11"
                } else {
                    "10"
                },
            ),
            "not namespaced",
        ),
        (("kernel.hostname", "x"), "not namespaced"),
        (("net.ipv4.no_such_sysctl", "1"), "no such sysctl"),
        (
            ("net/../../kernel/modprobe", "/x"),
            "not a valid sysctl name",
        ),
    ] {
        let bad = with_sysctls(pod_config("bad-sysctl", &c.dir.join("logs")), &[sysctl]);
        let err = match cri.run_pod(&bad).await {
            Ok(id) => anyhow::bail!("a pod asking for {sysctl:?} was created: {id}"),
            Err(e) => format!("{e:#}"),
        };
        ensure!(
            err.contains(why) && err.contains("sysctl"),
            "{sysctl:?} refused without saying {why:?}: {err}"
        );
        c.expect_footprint(footprint).await?;
    }
    ensure!(
        std::fs::read_to_string("/proc/sys/vm/swappiness")? == swappiness,
        "vm.swappiness changed on the node"
    );
    c.finish()
}

/// CRI's defaults follow containerd's configuration: with `enable_unprivileged_ports` and
/// `enable_unprivileged_icmp` off, a stasis pod reads the kernel's defaults, as a runc pod does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_sysctls_follow_cris_settings() -> Result<()> {
    let c = Containerd::start_with_cri_settings(
        "cri-sysctls-off",
        "  enable_unprivileged_ports = false\n  enable_unprivileged_icmp = false",
    )?;
    let image = c.import_busybox_for_cri()?;
    let mut cri = c.cri().await?;
    let pod = pod_config("off", &c.dir.join("logs"));
    let (pod_id, id) = sleeper(&mut cri, &pod, "stasis", image).await?;
    let ours = read_sysctls(&mut cri, &id, &CRI_DEFAULTS).await?;
    let runc_pod = pod_config("off-runc", &c.dir.join("logs"));
    let (runc_pod_id, runc_id) = sleeper(&mut cri, &runc_pod, "runc", image).await?;
    let theirs = read_sysctls(&mut cri, &runc_id, &CRI_DEFAULTS).await?;
    ensure!(
        ours == theirs && ours == ["1024", "1 0"],
        "with CRI's defaults off: stasis pod {ours:?}, runc pod {theirs:?}"
    );
    cri.stop_and_remove_pod(&runc_pod_id).await?;
    cri.stop_and_remove_pod(&pod_id).await?;
    c.finish()
}

/// A restored pod gets the sysctls its `pod.dump` asks for, under the restore policy: one
/// outside the policy's list is refused by name before anything is created, and restores
/// once allowed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restored_pods_get_their_sysctls_under_the_policy() -> Result<()> {
    let c = Containerd::start("cri-sysctls-restore")?;
    let image = c.import_busybox_for_cri()?;
    let mut cri = c.cri().await?;
    let pod = with_sysctls(
        pod_config("tuned", &c.dir.join("logs")),
        &[
            ("net.ipv4.ip_local_port_range", "20000 30000"),
            ("net.core.somaxconn", "1000"),
        ],
    );
    let (pod_id, _) = sleeper(&mut cri, &pod, "stasis", image).await?;
    let archive = c.dir.join("tuned.tar");
    c.stasisctl_ok(&[
        "pod",
        "checkpoint",
        "tuned",
        "--output",
        archive.to_str().unwrap(),
    ])?;
    cri.stop_and_remove_pod(&pod_id).await.ok();
    let footprint = c.settled_footprint().await?;

    let out = c.stasisctl(&["pod", "restore", archive.to_str().unwrap(), "--name", "t1"])?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success()
            && err.contains("sysctl net.core.somaxconn=1000 [sysctls]")
            && !err.contains("ip_local_port_range"),
        "a sysctl outside the policy was not refused by name: {err}"
    );
    c.expect_footprint(footprint).await?;

    let restored = c
        .stasisctl_ok(&[
            "pod",
            "restore",
            archive.to_str().unwrap(),
            "--name",
            "t2",
            "--allow",
            "sysctls",
        ])?
        .trim()
        .to_string();
    let list = stasis_e2e::cri::containers_by_name(&mut cri, &restored).await?;
    let (_, id, _) = list.first().context("restored container")?.clone();
    let got = read_sysctls(
        &mut cri,
        &id,
        &["net.ipv4.ip_local_port_range", "net.core.somaxconn"],
    )
    .await?;
    ensure!(
        got == ["20000 30000", "1000"],
        "the restored pod's sysctls: {got:?}"
    );
    cri.stop_and_remove_pod(&restored).await?;
    c.finish()
}

/// `-info` answers with the OCI runtime's own `features` (runc's, with recursive read-only
/// mounts among its mount options), as runc-v2 does; the gVisor backend has none to give.
#[test]
fn the_shim_reports_the_runtimes_features() -> Result<()> {
    use containerd_shim_protos::{protobuf::Message, types::introspection::RuntimeInfo};
    let c = Containerd::start("cri-info")?;
    let info = |name: &str| -> Result<RuntimeInfo> {
        let out = std::process::Command::new(c.dir.join("bin").join(name))
            .arg("-info")
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .stdin(std::process::Stdio::null())
            .output()?;
        ensure!(
            out.status.success(),
            "{name} -info: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(RuntimeInfo::parse_from_bytes(&out.stdout)?)
    };
    let runc = info("containerd-shim-stasis-v2")?;
    ensure!(
        runc.name == "io.containerd.stasis.v2",
        "name {:?}",
        runc.name
    );
    ensure!(
        runc.features
            .type_url
            .ends_with("runtime-spec/1/features/Features"),
        "features type {:?}",
        runc.features.type_url
    );
    let features: serde_json::Value = serde_json::from_slice(&runc.features.value)?;
    let options = features["mountOptions"]
        .as_array()
        .context("mountOptions in runc's features")?;
    ensure!(
        options.iter().any(|o| o == "rro"),
        "runc's features offer no rro: {options:?}"
    );
    let gvisor = info("containerd-shim-stasis-gvisor-v2")?;
    ensure!(
        gvisor.features.is_none(),
        "the gVisor backend reports features it does not have"
    );
    c.finish()
}

/// runsc ignores pod sysctls: a gVisor pod asking for one is refused, not silently left
/// without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gvisor_pods_asking_for_sysctls_are_refused() -> Result<()> {
    let c = Containerd::start("cri-gvisor-sysctls")?;
    let mut cri = c.cri().await?;
    let footprint = c.settled_footprint().await?;
    let pod = with_sysctls(
        pod_config("gv-sysctl", &c.dir.join("logs")),
        &[("net.ipv4.ip_local_port_range", "20000 30000")],
    );
    let err = match cri.run_pod_with(&pod, "stasis-gvisor").await {
        Ok(id) => anyhow::bail!("a gVisor pod with sysctls was created: {id}"),
        Err(e) => format!("{e:#}"),
    };
    ensure!(
        err.contains("sysctls") && err.contains("runsc"),
        "refused without saying why: {err}"
    );
    c.expect_footprint(footprint).await?;
    c.finish()
}

/// A localhost seccomp profile forbidding mkdir holds for a container's init process under
/// runc and under gVisor (runsc applies OCI seccomp only with `--oci-seccomp`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seccomp_profiles_hold_under_runc_and_gvisor() -> Result<()> {
    let c = Containerd::start("cri-seccomp")?;
    let image = c.import_busybox_for_cri()?;
    let mut cri = c.cri().await?;
    let profile = c.dir.join("no-mkdir.json");
    std::fs::write(
        &profile,
        r#"{"defaultAction":"SCMP_ACT_ALLOW",
            "syscalls":[{"names":["mkdir","mkdirat"],"action":"SCMP_ACT_ERRNO"}]}"#,
    )?;
    for handler in ["stasis", "stasis-gvisor"] {
        let pod = pod_config(&format!("seccomp-{handler}"), &c.dir.join("logs"));
        let pod_id = cri.run_pod_with(&pod, handler).await?;
        let mut cfg = container_config(
            "app",
            image,
            &[
                "sh",
                "-c",
                "mkdir /made 2>/tmp/err; echo $? > /tmp/rc; sleep 100000",
            ],
        );
        cfg.linux
            .as_mut()
            .and_then(|l| l.security_context.as_mut())
            .context("security context")?
            .seccomp = Some(cri::SecurityProfile {
            profile_type: cri::security_profile::ProfileType::Localhost as i32,
            localhost_ref: profile.display().to_string(),
        });
        let id = cri.run_container(&pod_id, &pod, cfg).await?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let rc = loop {
            let (code, out, _) = cri.exec(&id, &["cat", "/tmp/rc"]).await?;
            if code == 0 && !out.trim().is_empty() {
                break out.trim().to_string();
            }
            ensure!(
                std::time::Instant::now() < deadline,
                "{handler}: no /tmp/rc"
            );
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        };
        let err = cri.exec_ok(&id, &["cat", "/tmp/err"]).await?;
        ensure!(
            rc != "0" && err.contains("Operation not permitted"),
            "{handler}: mkdir under a profile forbidding it: exit {rc}, {err:?}"
        );
        cri.stop_and_remove_pod(&pod_id).await?;
    }
    c.finish()
}

/// A hostIPC pod shares the node's IPC namespace (as under runc), and its IPC sysctls are
/// refused: they would change the node. A gVisor pod asking for hostIPC is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_ipc_pods_share_the_nodes_ipc_namespace() -> Result<()> {
    let c = Containerd::start("cri-hostipc")?;
    let image = c.import_busybox_for_cri()?;
    let mut cri = c.cri().await?;
    let host_ipc = |mut pod: cri::PodSandboxConfig| -> Result<cri::PodSandboxConfig> {
        pod.linux
            .as_mut()
            .and_then(|l| l.security_context.as_mut())
            .and_then(|s| s.namespace_options.as_mut())
            .context("namespace options")?
            .ipc = cri::NamespaceMode::Node as i32;
        Ok(pod)
    };
    let pod = host_ipc(pod_config("hostipc", &c.dir.join("logs")))?;
    let pod_id = cri.run_pod(&pod).await?;
    let mut cfg = container_config("app", image, SLEEP);
    cfg.linux
        .as_mut()
        .and_then(|l| l.security_context.as_mut())
        .and_then(|s| s.namespace_options.as_mut())
        .context("container namespace options")?
        .ipc = cri::NamespaceMode::Node as i32;
    let id = cri.run_container(&pod_id, &pod, cfg).await?;
    let theirs = cri.exec_ok(&id, &["readlink", "/proc/self/ns/ipc"]).await?;
    let ours = std::fs::read_link("/proc/self/ns/ipc")?;
    ensure!(
        theirs == ours.display().to_string(),
        "a hostIPC pod's container is in {theirs}, the node in {}",
        ours.display()
    );
    cri.stop_and_remove_pod(&pod_id).await?;
    let footprint = c.settled_footprint().await?;
    let bad = with_sysctls(
        host_ipc(pod_config("hostipc-sysctl", &c.dir.join("logs")))?,
        &[("kernel.msgmax", "100")],
    );
    let err = match cri.run_pod(&bad).await {
        Ok(id) => anyhow::bail!("a hostIPC pod with an IPC sysctl was created: {id}"),
        Err(e) => format!("{e:#}"),
    };
    ensure!(
        err.contains("hostIPC") && err.contains("kernel.msgmax"),
        "{err}"
    );
    c.expect_footprint(footprint).await?;
    // A gVisor sandbox has its own kernel: it cannot share the node's IPC namespace.
    let gvisor = host_ipc(pod_config("hostipc-gv", &c.dir.join("logs")))?;
    let err = match cri.run_pod_with(&gvisor, "stasis-gvisor").await {
        Ok(id) => anyhow::bail!("a hostIPC gVisor pod was created: {id}"),
        Err(e) => format!("{e:#}"),
    };
    ensure!(
        err.contains("hostIPC"),
        "the refusal does not say why: {err}"
    );
    c.expect_footprint(footprint).await?;
    c.finish()
}

/// The containers of a pod share its PID namespace (CRI's default, `NamespaceMode::Pod`), under
/// runc and under gVisor: one container sees another's processes, and PID 1 is the pod's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_of_a_pod_share_its_pid_namespace_under_runc_and_gvisor() -> Result<()> {
    let c = Containerd::start("cri-podpid")?;
    let image = c.import_busybox_for_cri()?;
    let mut cri = c.cri().await?;
    for handler in ["stasis", "stasis-gvisor"] {
        let pod = pod_config(&format!("podpid-{handler}"), &c.dir.join("logs"));
        let pod_id = cri.run_pod_with(&pod, handler).await?;
        cri.run_container(
            &pod_id,
            &pod,
            container_config("first", image, &["sleep", "100001"]),
        )
        .await?;
        let second = cri
            .run_container(&pod_id, &pod, container_config("second", image, SLEEP))
            .await?;
        let ps = cri.exec_ok(&second, &["ps", "-o", "args"]).await?;
        ensure!(
            ps.contains("sleep 100001"),
            "{handler}: the second container does not see the first's process:\n{ps}"
        );
        // PID 1 is the pod's (pause, or gVisor's root container), not the first container.
        let init = cri.exec_ok(&second, &["cat", "/proc/1/cmdline"]).await?;
        ensure!(
            !init.contains("100001") && !init.contains("100000"),
            "{handler}: a container is PID 1 of the pod: {init:?}"
        );
        cri.stop_and_remove_pod(&pod_id).await?;
    }
    c.finish()
}

/// An exec that outlives its ExecSync timeout is killed (containerd sends SIGKILL to it): under
/// gVisor the signal must reach the process in the sandbox, not only runsc's waiting process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timed_out_execs_are_gone_under_runc_and_gvisor() -> Result<()> {
    let c = Containerd::start("cri-exec-timeout")?;
    let image = c.import_busybox_for_cri()?;
    let mut cri = c.cri().await?;
    for handler in ["stasis", "stasis-gvisor"] {
        let pod = pod_config(&format!("exec-timeout-{handler}"), &c.dir.join("logs"));
        let (pod_id, id) = sleeper(&mut cri, &pod, handler, image).await?;
        let timed_out = cri
            .runtime
            .exec_sync(cri::ExecSyncRequest {
                container_id: id.clone(),
                cmd: vec!["sleep".into(), "4242".into()],
                timeout: 1,
            })
            .await;
        ensure!(
            timed_out.is_err(),
            "{handler}: an exec of 4242 s ended within 1 s"
        );
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let ps = cri.exec_ok(&id, &["ps", "-o", "args"]).await?;
            if !ps.contains("sleep 4242") {
                break;
            }
            ensure!(
                std::time::Instant::now() < deadline,
                "{handler}: the timed-out exec still runs:\n{ps}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        cri.stop_and_remove_pod(&pod_id).await?;
    }
    c.finish()
}

/// A container's processes end with its init, as under containerd's runc handler: in the pod's
/// shared PID namespace the kernel would leave a background child running (reparented to the
/// pod's PID 1), unseen by kubelet, holding the container's output open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_containers_processes_end_with_its_init_as_under_runc() -> Result<()> {
    let c = Containerd::start("cri-init-exit")?;
    let image = c.import_busybox_for_cri()?;
    let mut cri = c.cri().await?;
    for handler in ["runc", "stasis"] {
        let pod = pod_config(&format!("init-exit-{handler}"), &c.dir.join("logs"));
        let (pod_id, watcher) = sleeper(&mut cri, &pod, handler, image).await?;
        // The init (sh) ends once its file appears; its background sleep would stay.
        let short = cri
            .run_container(
                &pod_id,
                &pod,
                container_config(
                    "short",
                    image,
                    &[
                        "sh",
                        "-c",
                        "sleep 4343 & while [ ! -e /tmp/end ]; do sleep 0.1; done",
                    ],
                ),
            )
            .await?;
        // The init's own command line names the child too: only a line of its own is it.
        let child = |ps: &str| ps.lines().any(|l| l.trim() == "sleep 4343");
        let ps = cri.exec_ok(&watcher, &["ps", "-o", "args"]).await?;
        ensure!(
            child(&ps),
            "{handler}: the background child never ran:\n{ps}"
        );
        cri.exec_ok(&short, &["touch", "/tmp/end"]).await?;
        // From the moment the init is gone, the child must go with it: containerd's own exit
        // handling would end it too, but only once the shim reports the exit, which waits
        // for the output the child holds open (10 s): 5 s tells the two apart.
        let mut init_gone = None;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let ps = cri.exec_ok(&watcher, &["ps", "-o", "args"]).await?;
            let init_runs = ps.contains("while [");
            let child_runs = child(&ps);
            if !init_runs && init_gone.is_none() {
                init_gone = Some(std::time::Instant::now());
            }
            if !init_runs && !child_runs {
                break;
            }
            ensure!(
                std::time::Instant::now() < deadline
                    && init_gone.is_none_or(|t| t.elapsed() < std::time::Duration::from_secs(5)),
                "{handler}: the exited container's background child still runs:\n{ps}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        cri.stop_and_remove_pod(&pod_id).await?;
    }
    c.finish()
}
