//! The trust boundary: what a pod, a CRI client or an archive cannot get from stasis.

use std::{
    io::{Read, Write},
    time::Instant,
};

use anyhow::{ensure, Context, Result};
use stasis_e2e::{
    cri::{container_config, counter_loop, cri, pod_config, wait_counter_moving},
    Containerd,
};

/// The pod's PID 1 (stasis's pause process) gives a container nothing of the host: no
/// capabilities, a root of its own with nothing in it, /proc files closed to others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pods_pid_1_gives_nothing_of_the_host_away() -> Result<()> {
    let c = Containerd::start("trust-pause")?;
    let image = c.import_busybox_for_cri()?;
    let mut cri = c.cri().await?;
    let pod = pod_config("confined", &c.dir.join("logs"));
    let pod_id = cri.run_pod(&pod).await?;
    let id = cri
        .run_container(
            &pod_id,
            &pod,
            container_config("probe", image, &["sh", "-c", &counter_loop("/counter")]),
        )
        .await?;
    wait_counter_moving(&mut cri, &id, "/counter").await?;
    // A canary only the host's root file system has.
    let canary = c.dir.join("host-canary");
    std::fs::write(&canary, "host secret")?;
    let (_, status, _) = cri.exec(&id, &["cat", "/proc/1/status"]).await?;
    let cap_eff = status
        .lines()
        .find(|l| l.starts_with("CapEff:"))
        .context("CapEff in /proc/1/status")?;
    ensure!(
        cap_eff.split_whitespace().nth(1) == Some("0000000000000000"),
        "the pod's PID 1 has capabilities: {cap_eff}"
    );
    let (_, listing, err) = cri
        .exec(&id, &["sh", "-c", "ls -a /proc/1/root/ 2>&1; echo ."])
        .await?;
    ensure!(
        !listing.contains("etc") && !listing.contains("usr") && !listing.contains("tmp"),
        "/proc/1/root shows a file system: {listing}{err}"
    );
    let reach = format!("cat /proc/1/root{} 2>&1", canary.display());
    let (_, through, _) = cri.exec(&id, &["sh", "-c", &reach]).await?;
    ensure!(
        !through.contains("host secret"),
        "the host's canary is readable through the pod's PID 1"
    );
    let (code, entered, _) = cri
        .exec(&id, &["sh", "-c", "nsenter -t 1 -m cat /etc/hostname 2>&1"])
        .await?;
    ensure!(
        code != 0,
        "nsenter into the mount namespace of PID 1 worked: {entered}"
    );
    cri.stop_and_remove_pod(&pod_id).await?;
    c.finish()
}

/// A hostPID pod runs in the node's PID namespace, as under runc. Its processes are the node's
/// as much as the pod's, so a pod checkpoint or a Task API checkpoint of one of its containers
/// is refused, naming the pod, and the pod runs on, not frozen; a gVisor pod asking for it is
/// refused (a sandbox cannot share the node's PID namespace).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_pid_pods_run_in_the_nodes_pid_namespace_and_are_never_checkpointed() -> Result<()> {
    let c = Containerd::start("trust-hostpid")?;
    let image = c.import_busybox_for_cri()?;
    let mut cri = c.cri().await?;
    let host_pid = |mut pod: cri::PodSandboxConfig| -> Result<cri::PodSandboxConfig> {
        pod.linux
            .as_mut()
            .and_then(|l| l.security_context.as_mut())
            .and_then(|s| s.namespace_options.as_mut())
            .context("namespace options")?
            .pid = cri::NamespaceMode::Node as i32;
        Ok(pod)
    };
    let pod = host_pid(pod_config("hostpid", &c.dir.join("logs")))?;
    let pod_id = cri.run_pod(&pod).await?;
    let mut cfg = container_config("app", image, &["sh", "-c", &counter_loop("/counter")]);
    cfg.linux
        .as_mut()
        .and_then(|l| l.security_context.as_mut())
        .and_then(|s| s.namespace_options.as_mut())
        .context("container namespace options")?
        .pid = cri::NamespaceMode::Node as i32;
    let id = cri.run_container(&pod_id, &pod, cfg).await?;
    wait_counter_moving(&mut cri, &id, "/counter").await?;
    let theirs = cri.exec_ok(&id, &["readlink", "/proc/self/ns/pid"]).await?;
    let ours = std::fs::read_link("/proc/self/ns/pid")?;
    ensure!(
        theirs == ours.display().to_string(),
        "a hostPID pod's container is in {theirs}, the node in {}",
        ours.display()
    );

    let out = c.stasisctl(&[
        "pod",
        "checkpoint",
        "hostpid",
        "--leave-running",
        "--output",
        c.dir.join("hostpid.tar").to_str().unwrap(),
    ])?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && err.contains("hostPID") && err.contains(&pod_id),
        "a hostPID pod's checkpoint was not refused by name: {err}"
    );
    ensure!(
        !c.dir.join("hostpid.tar").exists(),
        "a refused checkpoint left an archive"
    );
    let task = c.ctr_k8s(&["tasks", "checkpoint", &id])?;
    let task_err = String::from_utf8_lossy(&task.stderr);
    ensure!(
        !task.status.success() && task_err.contains("hostPID"),
        "a Task API checkpoint of a hostPID pod's container was not refused: {task_err}"
    );
    ensure!(
        stasis_e2e::cri::pod_frozen_containers(&pod_id).is_empty(),
        "the refused checkpoints left containers frozen"
    );
    wait_counter_moving(&mut cri, &id, "/counter").await?;
    cri.stop_and_remove_pod(&pod_id).await?;

    let footprint = c.settled_footprint().await?;
    let gvisor = host_pid(pod_config("hostpid-gv", &c.dir.join("logs")))?;
    let err = match cri.run_pod_with(&gvisor, "stasis-gvisor").await {
        Ok(id) => anyhow::bail!("a hostPID gVisor pod was created: {id}"),
        Err(e) => format!("{e:#}"),
    };
    ensure!(
        err.contains("hostPID"),
        "the refusal does not say why: {err}"
    );
    c.expect_footprint(footprint).await?;
    c.finish()
}

/// A zstd archive of a few KiB whose header promises a huge PAX record, or entries larger
/// than the disk: refused from the headers alone, quickly and in little memory, leaving
/// nothing in the work directory. A container directory named `..` is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archive_bombs_are_refused_from_their_headers() -> Result<()> {
    let c = Containerd::start("trust-bombs")?;

    let bombs = [
        ("pax", header_bomb(tar::EntryType::XHeader, 2 << 30)?),
        (
            "longname",
            header_bomb(tar::EntryType::GNULongName, 1 << 30)?,
        ),
        // 64 TiB: more than any disk here has free.
        (
            "huge-entry",
            header_bomb(tar::EntryType::Regular, 64 << 40)?,
        ),
    ];
    for (name, bytes) in &bombs {
        let path = c.dir.join(format!("{name}.tar.zst"));
        std::fs::write(&path, bytes)?;
        ensure!(
            bytes.len() < 8192,
            "{name}: the bomb is {} bytes",
            bytes.len()
        );
        for command in ["inspect", "restore"] {
            let mut args = vec![];
            if command == "restore" {
                args.extend(["pod", "restore", path.to_str().unwrap()]);
            } else {
                args.extend(["inspect", path.to_str().unwrap()]);
            }
            let started = Instant::now();
            let (out, max_rss_kib) = stasisctl_measured(&c, &args)?;
            let took = started.elapsed();
            let err = String::from_utf8_lossy(&out.stderr);
            eprintln!("{name} {command}: {took:?}, peak {max_rss_kib} KiB: {err}");
            ensure!(!out.status.success(), "{name}: {command} accepted the bomb");
            ensure!(
                err.contains("hostile archive")
                    || err.contains("free")
                    || err.contains("truncated"),
                "{name}: {command} does not say why: {err}"
            );
            ensure!(
                max_rss_kib < 256 * 1024,
                "{name}: {command} peaked at {max_rss_kib} KiB"
            );
            ensure!(
                took.as_secs() < 20,
                "{name}: {command} took {took:?} to refuse"
            );
            let left = stasis_e2e::restore_id(&err)
                .map(|id| stasis_e2e::restore_leftovers(&id))
                .unwrap_or_default();
            ensure!(left.is_empty(), "{name}: {command} left {left:?}");
        }
    }

    // A well-formed tar of 1 GiB of zeros (a few hundred KiB compressed) that is no pod
    // checkpoint at all: the header pass knows it has no pod.options, so not a byte of the
    // GiB is written into the restore store.
    let zeros = c.dir.join("zeros.tar.zst");
    {
        let mut b = tar::Builder::new(zstd::Encoder::new(std::fs::File::create(&zeros)?, 3)?);
        let mut h = tar::Header::new_gnu();
        h.set_size(1 << 30);
        h.set_mode(0o600);
        b.append_data(&mut h, "zeros", std::io::repeat(0).take(1 << 30))?;
        b.into_inner()?.finish()?;
    }
    let (out, _) = stasisctl_measured(&c, &["pod", "restore", zeros.to_str().unwrap()])?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && err.contains("archive has no pod.options; nothing was written"),
        "a tar of zeros without pod.options: {err}"
    );
    let left = stasis_e2e::restore_id(&err)
        .map(|id| stasis_e2e::restore_leftovers(&id))
        .unwrap_or_default();
    ensure!(left.is_empty(), "the refused tar of zeros left {left:?}");

    // pod.options naming ".." as a container directory.
    let mut b = tar::Builder::new(Vec::new());
    let opts = serde_json::to_vec(&serde_json::json!({
        "version": 1, "containers": {"c": ".."}, "annotations": {}
    }))?;
    append(&mut b, "pod.options", &opts)?;
    append(&mut b, "pod.dump", b"{}")?;
    let path = c.dir.join("dotdot.tar");
    std::fs::write(&path, b.into_inner()?)?;
    let out = c.stasisctl(&["pod", "restore", path.to_str().unwrap()])?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && err.contains("not a plain directory name"),
        "a '..' container directory was not refused: {err}"
    );
    c.finish()
}

fn append(b: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8]) -> Result<()> {
    let mut h = tar::Header::new_gnu();
    h.set_size(data.len() as u64);
    h.set_mode(0o600);
    h.set_cksum();
    b.append_data(&mut h, name, data)?;
    Ok(())
}

/// A zstd stream holding one tar header of `kind` that claims `size` bytes, and a little of
/// them: the rest never comes (a reader that believed the header would try to hold or write
/// it all).
fn header_bomb(kind: tar::EntryType, size: u64) -> Result<Vec<u8>> {
    let mut h = tar::Header::new_gnu();
    h.set_path("bomb")?;
    h.set_entry_type(kind);
    h.set_mode(0o644);
    h.set_size(size);
    h.set_cksum();
    let mut enc = zstd::Encoder::new(Vec::new(), 3)?;
    enc.write_all(h.as_bytes())?;
    enc.write_all(&vec![0u8; 1 << 20])?;
    Ok(enc.finish()?)
}

/// Runs stasisctl and returns its output with its peak resident memory (KiB, from wait4).
fn stasisctl_measured(c: &Containerd, args: &[&str]) -> Result<(std::process::Output, i64)> {
    let child = c
        .stasisctl_command()?
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let pid = child.id() as i32;
    let mut stdout = child.stdout.context("stdout")?;
    let mut stderr = child.stderr.context("stderr")?;
    let reader = std::thread::spawn(move || {
        let mut err = Vec::new();
        let _ = std::io::Read::read_to_end(&mut stderr, &mut err);
        err
    });
    let mut out = Vec::new();
    std::io::Read::read_to_end(&mut stdout, &mut out)?;
    let err = reader.join().unwrap_or_default();
    let mut status = 0;
    // SAFETY: wait4 on our own child with valid out-pointers.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    ensure!(rc == pid, "wait4: {}", std::io::Error::last_os_error());
    let status = std::os::unix::process::ExitStatusExt::from_raw(status);
    Ok((
        std::process::Output {
            status,
            stdout: out,
            stderr: err,
        },
        usage.ru_maxrss,
    ))
}

/// A CRI client naming a restore in its own annotations: a path (its own directory), an id
/// nobody prepared, or, on a container of an ordinary pod, anything: refused, nothing
/// restored, nothing left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_restores_stasisctl_prepared_are_honoured() -> Result<()> {
    let c = Containerd::start("trust-restore-from")?;
    let image = c.import_busybox_for_cri()?;
    let mut cri = c.cri().await?;
    let planted = c.dir.join("planted");
    std::fs::create_dir_all(&planted)?;
    // Each refusal for its own reason (the annotation's name holds "restore" too, so the
    // words asserted are the reason's).
    for (n, value) in [
        ("must be a restore id alone", planted.display().to_string()),
        ("is not a restore id", "0123456789abcdef".to_string()),
        (
            "is not a prepared restore",
            "0123456789abcdef0123456789abcdef".to_string(),
        ),
        (
            "must be a restore id alone",
            "0123456789abcdef0123456789abcdef/../..".to_string(),
        ),
    ]
    .iter()
    .enumerate()
    {
        let mut pod = pod_config(&format!("planted{n}"), &c.dir.join("logs"));
        pod.annotations.insert(
            stasis_api::layout::RESTORE_ANNOTATION.to_string(),
            value.1.clone(),
        );
        let err = match cri.run_pod(&pod).await {
            Ok(id) => anyhow::bail!(
                "{}: a pod restoring from {:?} started: {id}",
                value.0,
                value.1
            ),
            Err(e) => format!("{e:#}"),
        };
        ensure!(
            err.contains(value.0),
            "{:?}: refused, but not because it {}: {err}",
            value.1,
            value.0
        );
    }

    // A real prepared restore whose id a CRI client learned: without the claim token that
    // only stasisctl's own pod carries, it cannot be taken (nor blocked: no claim is left).
    let source = pod_config("source", &c.dir.join("logs"));
    let source_id = cri.run_pod(&source).await?;
    cri.run_container(
        &source_id,
        &source,
        container_config("app", image, &["sh", "-c", "sleep 1000"]),
    )
    .await?;
    let prepared = c.dir.join("prepared/");
    c.stasisctl_ok(&[
        "pod",
        "checkpoint",
        "source",
        "--leave-running",
        "--output",
        prepared.to_str().unwrap(),
    ])?;
    cri.stop_and_remove_pod(&source_id).await?;
    let store = std::path::Path::new(stasis_api::layout::RESTORE_STORE);
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(store)?;
    }
    let id = format!("{:032x}", std::process::id() as u128 * 7919 + 17);
    let entry = store.join(&id);
    let copied = std::process::Command::new("cp")
        .arg("-a")
        .arg(c.dir.join("prepared"))
        .arg(&entry)
        .status()?;
    ensure!(copied.success(), "copy the prepared restore into the store");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&entry, std::fs::Permissions::from_mode(0o700))?;
    let token_file = store.join(format!("{id}{}", stasis_api::layout::RESTORE_TOKEN_SUFFIX));
    std::fs::write(&token_file, "0123456789abcdef0123456789abcdef")?;
    let outcome = claims_and_borrowers_are_refused(&c, &mut cri, image, &id).await;
    let _ = std::fs::remove_dir_all(&entry);
    let _ = std::fs::remove_file(&token_file);
    let _ = std::fs::remove_file(store.join(format!("{id}.pod")));
    outcome?;
    c.finish()
}

/// A real prepared restore `id` (its token is not the one tried): a pod without the token
/// cannot claim it, and a container of an ordinary pod cannot borrow one of its containers.
async fn claims_and_borrowers_are_refused(
    c: &Containerd,
    cri: &mut stasis_e2e::cri::CriClient,
    image: &str,
    id: &str,
) -> Result<()> {
    let store = std::path::Path::new(stasis_api::layout::RESTORE_STORE);
    let mut outcome = Ok(());
    for (n, token) in [None, Some("0123456789abcdef0123456789abcdeX")]
        .into_iter()
        .enumerate()
    {
        let mut pod = pod_config(&format!("claimer{n}"), &c.dir.join("logs"));
        pod.annotations.insert(
            stasis_api::layout::RESTORE_ANNOTATION.to_string(),
            id.to_string(),
        );
        if let Some(t) = token {
            pod.annotations.insert(
                stasis_api::layout::RESTORE_TOKEN_ANNOTATION.to_string(),
                t.to_string(),
            );
        }
        let err = match cri.run_pod(&pod).await {
            Ok(pod_id) => format!("claimed by {pod_id}"),
            Err(e) => format!("{e:#}"),
        };
        if !err.contains("claim token") || store.join(format!("{id}.pod")).exists() {
            outcome = Err(anyhow::anyhow!(
                "a pod with token {token:?} was not refused, or left a claim: {err}"
            ));
        }
    }
    outcome?;
    // A container of an ordinary pod naming a container directory of that real restore.
    let container_dir = std::fs::read_dir(store.join(id))?
        .filter_map(|e| e.ok())
        .find(|e| e.path().is_dir())
        .context("the prepared restore holds no container directory")?
        .file_name();
    let pod = pod_config("ordinary", &c.dir.join("logs"));
    let pod_id = cri.run_pod(&pod).await?;
    let mut cfg = container_config("sneaky", image, &["sh", "-c", "sleep 1000"]);
    cfg.annotations.insert(
        stasis_api::layout::RESTORE_ANNOTATION.to_string(),
        format!("{id}/{}", container_dir.to_string_lossy()),
    );
    let err = match cri.run_container(&pod_id, &pod, cfg).await {
        Ok(cid) => format!("started as {cid}"),
        Err(e) => format!("{e:#}"),
    };
    cri.stop_and_remove_pod(&pod_id).await?;
    ensure!(
        err.contains("is not being restored from it"),
        "a container of an ordinary pod borrowing restore {id} was not refused for that: {err}"
    );
    Ok(())
}

/// A container that ran with fewer capabilities comes back with exactly those: its restored
/// process and a new exec in it (the config containerd recorded travels in the archive, not a
/// guess from the status).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn security_settings_come_back_with_the_restore() -> Result<()> {
    let c = Containerd::start("trust-secctx")?;
    c.import_busybox_for_cri()?;
    // The image says uid 1000 and the container asks for 0 (CRIU cannot dump a process of
    // another uid here): a restore that dropped run_as_user/run_as_group would run as 1000.
    let image = "docker.io/stasis/busybox:uid1000";
    c.import_image_for_cri_as(image, "1000:1000")?;
    let mut cri = c.cri().await?;
    let pod = pod_config("secctx", &c.dir.join("logs"));
    let pod_id = cri.run_pod(&pod).await?;
    // A read-only root: the counter lives in a volume.
    let counter = "/state/counter";
    let state = c.dir.join("secctx-volume");
    std::fs::create_dir_all(&state)?;
    let mut cfg = container_config("lean", image, &["sh", "-c", &counter_loop(counter)]);
    cfg.mounts.push(cri::Mount {
        container_path: "/state".into(),
        host_path: state.display().to_string(),
        ..Default::default()
    });
    let sc = cfg
        .linux
        .as_mut()
        .and_then(|l| l.security_context.as_mut())
        .context("security context")?;
    sc.capabilities = Some(cri::Capability {
        drop_capabilities: vec!["ALL".into()],
        add_capabilities: vec!["CHOWN".into(), "KILL".into()],
        ..Default::default()
    });
    sc.readonly_rootfs = true;
    sc.run_as_user = Some(cri::Int64Value { value: 0 });
    sc.run_as_group = Some(cri::Int64Value { value: 0 });
    sc.supplemental_groups = vec![1234];
    sc.no_new_privs = true;
    let id = cri.run_container(&pod_id, &pod, cfg).await?;
    wait_counter_moving(&mut cri, &id, counter).await?;
    // Identity and privileges of the restored process itself and of a new exec, and what CRI
    // says the container was created with.
    let look = |cri: &mut stasis_e2e::cri::CriClient, id: String| {
        let mut cri = cri.clone();
        async move {
            let fields = "grep -E '^(Uid|Gid|Groups|CapEff|CapBnd|NoNewPrivs|Seccomp):'";
            let init = cri
                .exec_ok(
                    &id,
                    &[
                        "sh",
                        "-c",
                        &format!("{fields} /proc/$(cat {counter}.pid)/status"),
                    ],
                )
                .await?;
            let exec = cri
                .exec_ok(&id, &["sh", "-c", &format!("{fields} /proc/self/status")])
                .await?;
            let (code, _, _) = cri
                .exec(&id, &["sh", "-c", "echo x > /rootfs-write"])
                .await?;
            let info = cri
                .runtime
                .container_status(cri::ContainerStatusRequest {
                    container_id: id.clone(),
                    verbose: true,
                })
                .await?
                .into_inner()
                .info;
            let info: serde_json::Value =
                serde_json::from_str(info.get("info").context("verbose info")?)?;
            let config = stasis_controller::cri::config_from_info(&info["config"])?;
            let context = config
                .linux
                .and_then(|l| l.security_context)
                .context("no security context in CRI's config")?;
            Ok::<_, anyhow::Error>((init, exec, code != 0, format!("{context:?}")))
        }
    };
    let before = look(&mut cri, id.clone()).await?;
    ensure!(
        before.0.contains("0000000000000021")
            && before.0.contains("Uid:\t0\t")
            && before.1.contains("Gid:\t0\t")
            && before.2,
        "the original container: {before:?}"
    );
    let archive = c.dir.join("secctx.tar");
    // A stopping checkpoint: the counter's volume is a host path the archive does not hold,
    // so a pod left running would move it on past what the dumped process expects (CRIU
    // then refuses its file: "bad size").
    c.stasisctl_ok(&[
        "pod",
        "checkpoint",
        "secctx",
        "--output",
        archive.to_str().unwrap(),
    ])?;
    cri.stop_and_remove_pod(&pod_id).await?;
    let restored = c
        .stasisctl_ok(&["pod", "restore", archive.to_str().unwrap()])?
        .trim()
        .to_string();
    let list = stasis_e2e::cri::containers_by_name(&mut cri, &restored).await?;
    let (_, new_id, _) = list.first().context("restored container")?.clone();
    let after = look(&mut cri, new_id).await?;
    ensure!(
        after.0 == before.0,
        "the restored process changed:\n{}\n->\n{}",
        before.0,
        after.0
    );
    ensure!(
        after.1 == before.1,
        "a new exec changed:\n{}\n->\n{}",
        before.1,
        after.1
    );
    ensure!(after.2, "the restored root file system is writable");
    ensure!(
        after.3 == before.3,
        "CRI's security context changed:\n{}\n->\n{}",
        before.3,
        after.3
    );
    cri.stop_and_remove_pod(&restored).await?;
    c.finish()
}

/// Damage the tar format cannot see: 4 KiB inverted in the middle of a CRIU page image (the
/// tar still valid), and a truncated zstd frame. Both refused before anything is created,
/// the first naming the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_archives_are_refused_naming_the_file() -> Result<()> {
    let c = Containerd::start("trust-corrupt")?;
    let image = c.import_busybox_for_cri()?;
    let mut cri = c.cri().await?;
    let pod = pod_config("corrupt", &c.dir.join("logs"));
    let pod_id = cri.run_pod(&pod).await?;
    let id = cri
        .run_container(
            &pod_id,
            &pod,
            container_config("app", image, &["sh", "-c", &counter_loop("/counter")]),
        )
        .await?;
    wait_counter_moving(&mut cri, &id, "/counter").await?;
    for compress in ["none", "zstd"] {
        let archive = c.dir.join(format!("good-{compress}.tar"));
        c.stasisctl_ok(&[
            "pod",
            "checkpoint",
            "corrupt",
            "--leave-running",
            "--compress",
            compress,
            "--output",
            archive.to_str().unwrap(),
        ])?;
    }
    cri.stop_and_remove_pod(&pod_id).await?;
    let footprint = c.settled_footprint().await?;

    // Entry modes survive packaging: CRIU's page images are 0600 in the archive.
    let good = c.dir.join("good-none.tar");
    let mut pages = None;
    let mut tar = tar::Archive::new(std::fs::File::open(&good)?);
    for entry in tar.entries()? {
        let entry = entry?;
        let path = entry.path()?.display().to_string();
        if path.contains("/checkpoint/pages-") {
            ensure!(
                entry.header().mode()? & 0o077 == 0,
                "{path} is readable by others in the archive"
            );
            pages = Some((path, entry.raw_file_position(), entry.size()));
        }
    }
    let (pages_path, offset, size) = pages.context("no pages image in the archive")?;
    ensure!(size >= 3 * 4096, "the pages image is too small to damage");
    use std::os::unix::fs::PermissionsExt;
    ensure!(
        std::fs::metadata(&good)?.permissions().mode() & 0o777 == 0o600,
        "the archive is not 0600"
    );

    let mut bytes = std::fs::read(&good)?;
    let middle = offset as usize + (size as usize / 2 / 4096) * 4096;
    for b in &mut bytes[middle..middle + 4096] {
        *b = !*b;
    }
    let flipped = c.dir.join("flipped.tar");
    std::fs::write(&flipped, &bytes)?;
    let out = c.stasisctl(&["pod", "restore", flipped.to_str().unwrap()])?;
    let err = String::from_utf8_lossy(&out.stderr);
    let file = pages_path.trim_start_matches("./");
    ensure!(
        !out.status.success() && err.contains("corrupt") && err.contains(file),
        "a damaged page image was not refused naming {file}: {err}"
    );

    let zst = std::fs::read(c.dir.join("good-zstd.tar"))?;
    let truncated = c.dir.join("truncated.tar.zst");
    std::fs::write(&truncated, &zst[..zst.len() * 2 / 3])?;
    let out = c.stasisctl(&["pod", "restore", truncated.to_str().unwrap()])?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && (err.contains("truncated") || err.contains("corrupt")),
        "a truncated zstd archive was not refused: {err}"
    );
    c.expect_footprint(footprint)
        .await
        .context("a refused restore left a pod")?;
    c.finish()
}

/// Unpacks `src`, lets `edit` change the files, writes a matching manifest (what an attacker
/// without a signing key can do) and packs the result as `dest`.
fn rewrite_archive(
    src: &std::path::Path,
    dest: &std::path::Path,
    edit: impl FnOnce(&std::path::Path) -> Result<()>,
) -> Result<()> {
    let dir = dest.with_extension("unpacked");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    tar::Archive::new(std::fs::File::open(src)?).unpack(&dir)?;
    edit(&dir)?;
    std::fs::remove_file(dir.join("manifest.json"))?;
    stasis_controller::archive::write_manifest(&dir)?;
    let mut b = tar::Builder::new(std::fs::File::create(dest)?);
    b.follow_symlinks(false);
    b.append_dir_all(".", &dir)?;
    b.into_inner()?;
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// Edits the JSON file `name` at the root of an unpacked archive or in its one container.
fn edit_json(
    dir: &std::path::Path,
    name: &str,
    edit: impl FnOnce(&mut serde_json::Value),
) -> Result<()> {
    let path = if dir.join(name).exists() {
        dir.join(name)
    } else {
        std::fs::read_dir(dir)?
            .flatten()
            .map(|e| e.path().join(name))
            .find(|p| p.exists())
            .with_context(|| format!("no {name} in the archive"))?
    };
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)?;
    edit(&mut v);
    std::fs::write(&path, serde_json::to_vec(&v)?)?;
    Ok(())
}

/// An archive edited to ask for privileged mode, the host's `/` and the host PID namespace
/// is refused before anything is created, every item listed; `inspect` shows the requests;
/// with the items allowed by name the restore honours them (the host canary is readable, the
/// exec has every capability); an ordinary pod with a volume below an allowed prefix
/// restores with no flag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archive_requests_are_refused_unless_allowed_by_name() -> Result<()> {
    let c = Containerd::start("trust-policy")?;
    let image = c.import_busybox_for_cri()?;
    let mut cri = c.cri().await?;
    let vol = c.dir.join("volume");
    std::fs::create_dir_all(&vol)?;
    let canary = c.dir.join("host-canary");
    std::fs::write(&canary, "host secret")?;
    let pod = pod_config("asks", &c.dir.join("logs"));
    let pod_id = cri.run_pod(&pod).await?;
    let mut cfg = container_config("app", image, &["sh", "-c", &counter_loop("/counter")]);
    cfg.mounts.push(cri::Mount {
        container_path: "/data".into(),
        host_path: vol.display().to_string(),
        ..Default::default()
    });
    let id = cri.run_container(&pod_id, &pod, cfg).await?;
    wait_counter_moving(&mut cri, &id, "/counter").await?;
    let good = c.dir.join("asks.tar");
    c.stasisctl_ok(&[
        "pod",
        "checkpoint",
        "asks",
        "--leave-running",
        "--output",
        good.to_str().unwrap(),
    ])?;
    let original_image = cri.container_status(&id).await?.image_ref;
    cri.stop_and_remove_pod(&pod_id).await?;
    let footprint = c.settled_footprint().await?;

    // Ordinary: the volume lives below the node policy's prefix (the harness directory).
    let inspect = c.stasisctl_ok(&["inspect", good.to_str().unwrap()])?;
    ensure!(
        inspect.contains("requests  (0 of ")
            && inspect.contains(&format!(
                "allowed  container app: host path {}",
                vol.display()
            )),
        "inspect does not show the honest archive's requests as allowed: {inspect}"
    );
    let plain = c
        .stasisctl_ok(&["pod", "restore", good.to_str().unwrap(), "--name", "plain"])?
        .trim()
        .to_string();
    let list = stasis_e2e::cri::containers_by_name(&mut cri, &plain).await?;
    let (_, plain_id, _) = list.first().context("restored container")?.clone();
    let restored_image = cri.container_status(&plain_id).await?.image_ref;
    ensure!(
        restored_image == original_image,
        "the restored container runs image {restored_image}, the checkpoint was of {original_image}"
    );
    cri.stop_and_remove_pod(&plain).await?;

    // The base image is the recorded digest: one that is not on the node is refused.
    let foreign = c.dir.join("foreign-image.tar");
    rewrite_archive(&good, &foreign, |dir| {
        edit_json(dir, "config.dump", |v| {
            v["rootfsImageRef"] = format!("sha256:{}", "0".repeat(64)).into();
        })
    })?;
    let out = c.stasisctl(&["pod", "restore", foreign.to_str().unwrap()])?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && err.contains("not on this node") && err.contains("sha256:000"),
        "a checkpoint of an image the node lacks: {err}"
    );

    let wide = |dest: &std::path::Path, host_pid: bool| {
        rewrite_archive(&good, dest, |dir| {
            edit_json(dir, "pod.dump", |v| {
                let sc = &mut v["linux"]["security_context"];
                sc["privileged"] = true.into();
                if host_pid {
                    sc["namespace_options"]["pid"] = 2.into();
                }
            })?;
            edit_json(dir, "container-config.json", |v| {
                v["linux"]["security_context"]["privileged"] = true.into();
                v["mounts"][0]["host_path"] = "/".into();
            })
        })
    };
    let asking = c.dir.join("asking.tar");
    wide(&asking, true)?;
    let inspect = c.stasisctl_ok(&["inspect", asking.to_str().unwrap()])?;
    for want in ["pod: privileged mode", "host path / mounted at /data"] {
        ensure!(
            inspect.contains(want),
            "inspect does not show {want:?}: {inspect}"
        );
    }
    let out = c.stasisctl(&["pod", "restore", asking.to_str().unwrap()])?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "the widened archive was restored");
    for want in [
        "pod: privileged mode",
        "pod: the node's PID namespace",
        "container app: privileged mode",
        "container app: host path / mounted at /data",
        "--allow host-namespaces,privileged",
        "--allow-host-path /",
    ] {
        ensure!(
            err.contains(want),
            "the refusal does not list {want:?}: {err}"
        );
    }
    let restore_id = stasis_e2e::restore_id(&err).context("restore id")?;
    ensure!(
        stasis_e2e::restore_leftovers(&restore_id).is_empty(),
        "the refused restore left its unpacked copy"
    );
    c.expect_footprint(footprint)
        .await
        .context("the refused restore created something")?;

    // /proc protections: a masked or read-only list without the runtime's own entries would
    // replace them (leaving /proc/sys writable): refused unless allowed by name.
    let unmasked = c.dir.join("unmasked.tar");
    rewrite_archive(&good, &unmasked, |dir| {
        edit_json(dir, "container-config.json", |v| {
            let sc = &mut v["linux"]["security_context"];
            sc["masked_paths"] = serde_json::json!(["/nonexistent-masked"]);
            sc["readonly_paths"] = serde_json::json!(["/nonexistent-read-only"]);
        })
    })?;
    let out = c.stasisctl(&["pod", "restore", unmasked.to_str().unwrap(), "--name", "um"])?;
    let err = String::from_utf8_lossy(&out.stderr);
    for want in [
        "container app: /proc/acpi not masked",
        "/proc/kcore not masked",
        "/proc/sys not read-only",
        "--allow unmasked-proc",
    ] {
        ensure!(
            !out.status.success() && err.contains(want),
            "dropped /proc protections: the refusal does not list {want:?}: {err}"
        );
    }
    c.expect_footprint(footprint)
        .await
        .context("the refused restore created something")?;
    let um = c
        .stasisctl_ok(&[
            "pod",
            "restore",
            unmasked.to_str().unwrap(),
            "--name",
            "um",
            "--allow",
            "unmasked-proc",
        ])?
        .trim()
        .to_string();
    let list = stasis_e2e::cri::containers_by_name(&mut cri, &um).await?;
    let (_, um_id, _) = list.first().context("restored container")?.clone();
    let sys = cri
        .exec_ok(
            &um_id,
            &["sh", "-c", "grep ' /proc/sys ' /proc/self/mounts; echo end"],
        )
        .await?;
    ensure!(
        !sys.contains(" ro,") && !sys.contains(" ro "),
        "allowed by name, the archive's lists are not what the container got: {sys}"
    );
    cri.stop_and_remove_pod(&um).await?;

    // A pod whose cgroup would be the root of every stasis pod: refused, the policy's roots
    // are where pods go below, not pods themselves.
    let at_root = c.dir.join("at-root.tar");
    rewrite_archive(&good, &at_root, |dir| {
        edit_json(dir, "pod.dump", |v| {
            v["linux"]["cgroup_parent"] = "/stasis".into();
        })
    })?;
    let out = c.stasisctl(&["pod", "restore", at_root.to_str().unwrap()])?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && err.contains("pod: cgroup parent /stasis [cgroup-parent]"),
        "a pod at the root of all pods' cgroups was not refused: {err}"
    );
    c.expect_footprint(footprint)
        .await
        .context("the refused restore created something")?;

    // Fields the policy once did not read: a node port, an SELinux type, a seccomp profile
    // read from any node file.
    let unread = c.dir.join("unread.tar");
    rewrite_archive(&good, &unread, |dir| {
        edit_json(dir, "pod.dump", |v| {
            v["port_mappings"] = serde_json::json!([{"container_port": 80, "host_port": 8080}]);
            v["linux"]["security_context"]["selinux_options"] =
                serde_json::json!({"type": "spc_t"});
        })?;
        edit_json(dir, "container-config.json", |v| {
            v["linux"]["security_context"]["seccomp"] =
                serde_json::json!({"profile_type": 2, "localhost_ref": "/etc/shadow"});
        })
    })?;
    let out = c.stasisctl(&["pod", "restore", unread.to_str().unwrap()])?;
    let err = String::from_utf8_lossy(&out.stderr);
    for want in [
        "pod: node port 8080 to container port 80 [host-ports]",
        "pod: SELinux type spc_t [selinux]",
        "container app: seccomp profile from the node's file /etc/shadow [seccomp-localhost]",
    ] {
        ensure!(
            !out.status.success() && err.contains(want),
            "the refusal does not list {want:?}: {err}"
        );
    }
    c.expect_footprint(footprint)
        .await
        .context("the refused restore created something")?;

    // The rest of the allow-list: a loaded AppArmor profile, a runtime handler chosen by the
    // archive, a key this CRI does not know (never allowed), a base image from a registry
    // the node does not pull from.
    let rest = c.dir.join("rest.tar");
    rewrite_archive(&good, &rest, |dir| {
        edit_json(dir, "pod.options", |v| {
            v["annotations"]["io.stasis.runtime-handler"] = "runc".into();
        })?;
        edit_json(dir, "pod.dump", |v| {
            v["linux"]["sysctls"] = serde_json::json!({"kernel.msgmax": "1"});
        })?;
        edit_json(dir, "container-config.json", |v| {
            // The node's volume directory itself (every pod's volumes), shared both ways.
            v["mounts"][0]["host_path"] = c.dir.display().to_string().into();
            v["mounts"][0]["propagation"] = 2.into();
            let sc = &mut v["linux"]["security_context"];
            sc["apparmor"] = serde_json::json!({"profile_type": 2, "localhost_ref": "lax"});
            sc["future_escape"] = true.into();
        })
    })?;
    let inspect = c.stasisctl_ok(&["inspect", rest.to_str().unwrap()])?;
    let out = c.stasisctl(&["pod", "restore", rest.to_str().unwrap()])?;
    let err = String::from_utf8_lossy(&out.stderr);
    for want in [
        "container app: AppArmor profile \"lax\" loaded on the node [apparmor-localhost]",
        "pod: runtime handler runc named by the archive [runtime-handler]",
        "container app: unknown field linux.security_context.future_escape in container-config.json",
        "pod: sysctl kernel.msgmax=1 [sysctls]",
        &format!("container app: host path {} mounted at /data", c.dir.display()),
        "container app: bidirectional mount propagation at /data [mount-propagation]",
    ] {
        ensure!(
            !out.status.success() && err.contains(want),
            "the refusal does not list {want:?}: {err}"
        );
        ensure!(inspect.contains(want), "inspect does not show {want:?}: {inspect}");
    }
    // inspect judges by the same node policy (and the same containerd's handlers).
    for want in [
        "refused  pod: runtime handler runc named by the archive",
        "refused  container app: unknown field",
    ] {
        ensure!(
            inspect.contains(want),
            "inspect does not show {want:?}: {inspect}"
        );
    }
    ensure!(
        err.contains("cannot be allowed") && !err.contains("stasis named by"),
        "an unknown field is offered as allowable, or the node's own handler refused: {err}"
    );
    c.expect_footprint(footprint)
        .await
        .context("the refused restore created something")?;
    let far = c.dir.join("far-registry.tar");
    rewrite_archive(&good, &far, |dir| {
        edit_json(dir, "config.dump", |v| {
            v["rootfsImageRef"] =
                format!("evil.example:5000/busybox@sha256:{}", "0".repeat(64)).into();
        })
    })?;
    let out = c.stasisctl(&["pod", "restore", far.to_str().unwrap()])?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success()
            && err.contains("registry evil.example:5000 is not one this node's restore policy")
            && !err.contains("pulling base image"),
        "a base image from a registry the node does not name was pulled: {err}"
    );
    c.expect_footprint(footprint)
        .await
        .context("the refused restore created something")?;

    // A host path below an allowed prefix that goes through a link on the node: the prefix
    // check passes, the walk just before the container is created refuses it.
    let linked = c.dir.join("linked-volume");
    std::fs::create_dir_all(&linked)?;
    std::os::unix::fs::symlink("/", linked.join("s"))?;
    let through_link = c.dir.join("through-link.tar");
    let link_path = linked.join("s/etc");
    rewrite_archive(&good, &through_link, |dir| {
        edit_json(dir, "container-config.json", |v| {
            v["mounts"][0]["host_path"] = link_path.display().to_string().into();
        })
    })?;
    let out = c.stasisctl(&["pod", "restore", through_link.to_str().unwrap()])?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success()
            && err.contains("container app")
            && err.contains("symbolic link")
            && err.contains(&*linked.join("s").to_string_lossy()),
        "a host path through a link was not refused: {err}"
    );
    c.expect_footprint(footprint)
        .await
        .context("the refused restore left something")?;

    // containerd creates and writes a container's log file on the node: a log path that
    // climbs out of the pod's log directory is a host path like any other.
    let escaping_log = c.dir.join("escaping-log.tar");
    let planted = format!("stasis-e2e-log-{}", std::process::id());
    let climb = format!("../../../../../../../../etc/{planted}");
    rewrite_archive(&good, &escaping_log, |dir| {
        edit_json(dir, "container-config.json", |v| {
            v["log_path"] = climb.clone().into();
        })
    })?;
    let out = c.stasisctl(&["pod", "restore", escaping_log.to_str().unwrap()])?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success()
            && err.contains("written by containerd")
            && err.contains("[log-file]"),
        "a log path out of the pod's log directory was not refused: {err}"
    );
    ensure!(
        !std::path::Path::new("/etc").join(&planted).exists(),
        "the refused restore wrote /etc/{planted}"
    );
    c.expect_footprint(footprint)
        .await
        .context("the refused restore created something")?;

    // Allowed by name, the requests are honoured, not ignored. (The host PID namespace is
    // left out: the shim refuses it whatever the policy says.)
    let allowed = c.dir.join("allowed.tar");
    wide(&allowed, false)?;
    let out = c.stasisctl(&[
        "pod",
        "restore",
        allowed.to_str().unwrap(),
        "--allow",
        "privileged",
    ])?;
    ensure!(
        !out.status.success()
            && String::from_utf8_lossy(&out.stderr).contains("--allow-host-path /"),
        "the host's / was accepted without --allow-host-path"
    );
    let new_pod = c
        .stasisctl_ok(&[
            "pod",
            "restore",
            allowed.to_str().unwrap(),
            "--allow",
            "privileged",
            "--allow-host-path",
            "/",
        ])?
        .trim()
        .to_string();
    let list = stasis_e2e::cri::containers_by_name(&mut cri, &new_pod).await?;
    let (_, new_id, _) = list.first().context("restored container")?.clone();
    let seen = cri
        .exec_ok(&new_id, &["cat", &format!("/data{}", canary.display())])
        .await?;
    ensure!(
        seen == "host secret",
        "the host's / is not at /data: {seen:?}"
    );
    let caps = cri
        .exec_ok(&new_id, &["grep", "CapEff", "/proc/self/status"])
        .await?;
    ensure!(
        !caps.contains("00000000a80425fb"),
        "the privileged restore has the default capabilities: {caps}"
    );
    cri.stop_and_remove_pod(&new_pod).await?;
    the_node_policy_file_and_its_default(&c, &mut cri, &good, &vol).await?;
    c.finish()
}

/// A path of the host put aside for a test and brought back afterwards (what was there
/// before, or nothing), with the directories the test had to create.
struct HostPathAside {
    path: std::path::PathBuf,
    aside: Option<std::path::PathBuf>,
    created: Vec<std::path::PathBuf>,
}

impl HostPathAside {
    fn take(path: &std::path::Path) -> Result<Self> {
        let mut created = Vec::new();
        for dir in path.ancestors().skip(1) {
            if dir.exists() {
                break;
            }
            created.push(dir.to_path_buf());
        }
        created.reverse();
        for dir in &created {
            std::fs::create_dir(dir)?;
        }
        let aside = if path.exists() {
            let to = path.with_extension(format!("stasis-e2e-{}", std::process::id()));
            std::fs::rename(path, &to)?;
            Some(to)
        } else {
            None
        };
        Ok(Self {
            path: path.to_path_buf(),
            aside,
            created,
        })
    }
}

impl Drop for HostPathAside {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path).or_else(|_| std::fs::remove_dir_all(&self.path));
        if let Some(a) = &self.aside {
            let _ = std::fs::rename(a, &self.path);
        }
        for dir in self.created.iter().rev() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// Without STASIS_RESTORE_POLICY, a node's restore policy is /etc/stasis/restore-policy.json;
/// with no such file, the built-in one, whose only host path prefix is kubelet's pod volume
/// directory. Inspect and restore both read it.
async fn the_node_policy_file_and_its_default(
    c: &Containerd,
    cri: &mut stasis_e2e::cri::CriClient,
    good: &std::path::Path,
    vol: &std::path::Path,
) -> Result<()> {
    let file = std::path::Path::new(stasis_controller::policy::DEFAULT_POLICY_FILE);
    let _file = HostPathAside::take(file)?;
    let node = |args: &[&str]| -> Result<std::process::Output> {
        Ok(c.stasisctl_command()?
            .env_remove("STASIS_RESTORE_POLICY")
            .args(args)
            .output()?)
    };
    let good_arg = good.to_str().unwrap();
    let verdict = |out: &std::process::Output, verdict: &str, host: &std::path::Path| {
        let said = String::from_utf8_lossy(&out.stdout);
        let line = format!(
            "{verdict}  container app: host path {} mounted at /data",
            host.display()
        );
        ensure!(
            out.status.success() && said.contains(&line),
            "inspect does not say {line:?}: {said}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    };
    // No file: the harness directory is not kubelet's, so the volume is refused ...
    verdict(&node(&["inspect", good_arg])?, "refused", vol)?;
    let out = node(&["pod", "restore", good_arg, "--name", "by-default"])?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success()
            && err.contains(&format!("container app: host path {}", vol.display())),
        "the built-in policy let the harness's volume through: {err}"
    );
    // ... while one below kubelet's pod volume directory is allowed.
    let kubelet = std::path::Path::new("/var/lib/kubelet/pods")
        .join(format!("stasis-e2e-{}", std::process::id()))
        .join("volume");
    let _kubelet = HostPathAside::take(&kubelet)?;
    std::fs::create_dir(&kubelet)?;
    let moved = c.dir.join("kubelet-volume.tar");
    rewrite_archive(good, &moved, |dir| {
        edit_json(dir, "container-config.json", |v| {
            v["mounts"][0]["host_path"] = kubelet.display().to_string().into();
        })
    })?;
    verdict(
        &node(&["inspect", moved.to_str().unwrap()])?,
        "allowed",
        &kubelet,
    )?;
    // The file, once there, is the policy: this node's volume directory allowed, for
    // inspect and for a restore.
    std::fs::copy(
        c.policy_file("node-policy.json", serde_json::json!({}))?,
        file,
    )?;
    verdict(&node(&["inspect", good_arg])?, "allowed", vol)?;
    let out = node(&["pod", "restore", good_arg, "--name", "by-file"])?;
    ensure!(
        out.status.success(),
        "a restore under the node's policy file failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pod = String::from_utf8_lossy(&out.stdout).trim().to_string();
    cri.stop_and_remove_pod(&pod).await?;
    // A broken file is an error naming it, not a silent fallback to the defaults.
    std::fs::write(file, "{ not json")?;
    let out = node(&["inspect", good_arg])?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success()
            && err.contains(&format!(
                "restore policy {} is not valid",
                stasis_controller::policy::DEFAULT_POLICY_FILE
            )),
        "a broken node policy file: {err}"
    );
    Ok(())
}

/// Owners and special bits in a writable layer and a volume: files of uid 1000 and a setuid
/// busybox of uid 1000 come back owned by 1000, and nothing comes back setuid-root.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owners_and_setuid_bits_come_back_with_their_owner() -> Result<()> {
    let c = Containerd::start("trust-owners")?;
    let image = c.import_busybox_for_cri()?;
    let mut cri = c.cri().await?;
    let vol = c.dir.join("volume");
    std::fs::create_dir_all(&vol)?;
    let pod = pod_config("owners", &c.dir.join("logs"));
    let pod_id = cri.run_pod(&pod).await?;
    // CRIU cannot dump a process of uid 1000 here (no CAP_SYS_RESOURCE), so root makes the
    // files and gives them away.
    let setup = "cp /bin/busybox /suid && chown 1000:1000 /suid && chmod 4755 /suid && \
                 echo mine > /owned && chown 1000:1001 /owned && chmod 640 /owned && \
                 echo vol > /data/owned && chown 1000:1001 /data/owned && \
                 cp /bin/busybox /data/suid && chown 1000:1000 /data/suid && chmod 4755 /data/suid";
    let mut cfg = container_config(
        "app",
        image,
        &[
            "sh",
            "-c",
            &format!("{setup}; {}", counter_loop("/counter")),
        ],
    );
    cfg.mounts.push(cri::Mount {
        container_path: "/data".into(),
        host_path: vol.display().to_string(),
        ..Default::default()
    });
    cfg.annotations
        .insert("io.stasis.checkpoint.volumes".into(), "/data".into());
    let id = cri.run_container(&pod_id, &pod, cfg).await?;
    wait_counter_moving(&mut cri, &id, "/counter").await?;
    let stat = "stat -c '%n %u:%g %a' /suid /owned /data/owned /data/suid";
    let before = cri.exec_ok(&id, &["sh", "-c", stat]).await?;
    ensure!(
        before.contains("/suid 1000:1000 4755") && before.contains("/owned 1000:1001 640"),
        "set-up: {before}"
    );
    let archive = c.dir.join("owners.tar");
    c.stasisctl_ok(&[
        "pod",
        "checkpoint",
        "owners",
        "--leave-running",
        "--output",
        archive.to_str().unwrap(),
    ])?;
    cri.stop_and_remove_pod(&pod_id).await?;
    // The volume starts empty for the restore (its contents come from the archive).
    std::fs::remove_dir_all(&vol)?;
    std::fs::create_dir_all(&vol)?;
    let new_pod = c
        .stasisctl_ok(&["pod", "restore", archive.to_str().unwrap()])?
        .trim()
        .to_string();
    let list = stasis_e2e::cri::containers_by_name(&mut cri, &new_pod).await?;
    let (_, new_id, _) = list.first().context("restored container")?.clone();
    let after = cri.exec_ok(&new_id, &["sh", "-c", stat]).await?;
    ensure!(
        after == before,
        "owners or modes changed: {before:?} -> {after:?}"
    );
    let setuid_root = cri
        .exec_ok(
            &new_id,
            &[
                "sh",
                "-c",
                "find / -xdev -user 0 -perm -4000 2>/dev/null; true",
            ],
        )
        .await?;
    ensure!(
        setuid_root.is_empty(),
        "setuid-root files after the restore: {setuid_root}"
    );
    cri.stop_and_remove_pod(&new_pod).await?;
    c.finish()
}

/// Signed and encrypted pod archives, end to end: keys from `stasisctl key generate`, a
/// signed + encrypted checkpoint restores with the identity and the public key (its counter
/// continues); `inspect` without the identity says only "encrypted"; the wrong identity, an
/// unsigned archive and a signed one changed afterwards are refused before anything is
/// created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_and_encrypted_archives_round_trip() -> Result<()> {
    let c = Containerd::start("trust-sealed")?;
    let image = c.import_busybox_for_cri()?;
    let mut cri = c.cri().await?;
    let keys = c.dir.join("keys");
    std::fs::create_dir_all(&keys)?;
    let key = |kind: &str, name: &str| -> Result<String> {
        let out = keys.join(name);
        c.stasisctl_ok(&[
            "key",
            "generate",
            "--type",
            kind,
            "--output",
            out.to_str().unwrap(),
        ])
    };
    key("signing", "sign.pem")?;
    let recipient = key("encryption", "id.age")?.trim().to_string();
    key("encryption", "other.age")?;
    let path = |name: &str| keys.join(name).display().to_string();
    let pod = pod_config("sealed", &c.dir.join("logs"));
    let pod_id = cri.run_pod(&pod).await?;
    let id = cri
        .run_container(
            &pod_id,
            &pod,
            container_config("app", image, &["sh", "-c", &counter_loop("/counter")]),
        )
        .await?;
    wait_counter_moving(&mut cri, &id, "/counter").await?;
    let checkpoint = |name: &str, extra: &[&str]| -> Result<std::path::PathBuf> {
        let archive = c.dir.join(name);
        let mut args = vec![
            "pod",
            "checkpoint",
            "sealed",
            "--leave-running",
            "--compress",
            "zstd",
            "--output",
            archive.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        c.stasisctl_ok(&args)?;
        Ok(archive)
    };
    let (sign, id_file, other, public) = (
        path("sign.pem"),
        path("id.age"),
        path("other.age"),
        path("sign.pem.pub"),
    );
    let first = stasis_e2e::cri::read_counter(&mut cri, &id, "/counter").await?;
    let sealed = checkpoint(
        "sealed.tar.zst.age",
        &["--sign-key", &sign, "--encrypt-to", &recipient],
    )?;
    let signed = checkpoint("signed.tar.zst", &["--sign-key", &sign])?;
    let plain = checkpoint("plain.tar.zst", &[])?;
    cri.stop_and_remove_pod(&pod_id).await?;
    let footprint = c.settled_footprint().await?;
    let bytes = std::fs::read(&sealed)?;
    ensure!(
        !bytes.windows(6).any(|w| w == b"sealed") && bytes.starts_with(b"age-encryption.org/"),
        "the encrypted archive shows its contents"
    );

    let shown = c.stasisctl_ok(&["inspect", sealed.to_str().unwrap()])?;
    ensure!(
        shown.contains("encrypted") && !shown.contains("app"),
        "inspect without identity: {shown}"
    );
    let shown = c.stasisctl_ok(&["inspect", sealed.to_str().unwrap(), "--identity", &id_file])?;
    ensure!(
        shown.contains("sealed") && shown.contains("signed    by ed25519:"),
        "inspect with the identity: {shown}"
    );

    let refused = |args: &[&str], want: &str| -> Result<()> {
        let mut all = vec!["pod", "restore"];
        all.extend_from_slice(args);
        let out = c.stasisctl(&all)?;
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(!out.status.success(), "restore {args:?} succeeded");
        ensure!(
            err.contains(want),
            "restore {args:?} does not say {want:?}: {err}"
        );
        Ok(())
    };
    let s = sealed.to_str().unwrap();
    refused(&[s], "--identity")?;
    refused(&[s, "--identity", &other], "other recipients")?;
    refused(
        &[plain.to_str().unwrap(), "--verify-key", &public],
        "not signed",
    )?;
    let tampered = c.dir.join("tampered.tar");
    rewrite_archive(
        &{
            // rewrite_archive reads plain tar: unpack the zstd layer first.
            let raw = c.dir.join("signed.tar");
            std::fs::write(&raw, zstd::decode_all(std::fs::File::open(&signed)?)?)?;
            raw
        },
        &tampered,
        |dir| {
            edit_json(dir, "pod.dump", |v| {
                v["metadata"]["name"] = "someone-else".into();
            })
        },
    )?;
    refused(
        &[tampered.to_str().unwrap(), "--verify-key", &public],
        "changed after it was signed",
    )?;
    c.expect_footprint(footprint)
        .await
        .context("a refused restore created something")?;

    // A node whose policy names trusted signers (a directory of public keys) restores only
    // archives signed by one of them, without any flag.
    let signers = c.dir.join("trusted-signers");
    std::fs::create_dir_all(&signers)?;
    std::fs::copy(&public, signers.join("team.pub"))?;
    let strict = c.policy_file(
        "strict-policy.json",
        serde_json::json!({"trusted_signers": signers}),
    )?;
    let strict_arg = strict.display().to_string();
    refused(
        &[plain.to_str().unwrap(), "--policy", &strict_arg],
        "archive is not signed, and a signature by ed25519:",
    )?;
    c.expect_footprint(footprint)
        .await
        .context("a refused restore created something")?;
    let by_policy = c
        .stasisctl_ok(&[
            "pod",
            "restore",
            signed.to_str().unwrap(),
            "--policy",
            &strict_arg,
            "--name",
            "signed-by-policy",
        ])?
        .trim()
        .to_string();
    cri.stop_and_remove_pod(&by_policy).await?;

    let new_pod = c
        .stasisctl_ok(&[
            "pod",
            "restore",
            s,
            "--identity",
            &id_file,
            "--verify-key",
            &public,
        ])?
        .trim()
        .to_string();
    let list = stasis_e2e::cri::containers_by_name(&mut cri, &new_pod).await?;
    let (_, new_id, _) = list.first().context("restored container")?.clone();
    let now = stasis_e2e::cri::read_counter(&mut cri, &new_id, "/counter").await?;
    // Counted on from the checkpoint (a fresh start would count from 0).
    ensure!(
        now >= first,
        "the restored counter {now} is behind the checkpointed {first}"
    );
    stasis_e2e::cri::wait_counter_above(&mut cri, &new_id, "/counter", now).await?;
    cri.stop_and_remove_pod(&new_pod).await?;
    c.finish()
}

/// An unprivileged user who plants the paths older stasis versions used (the shim's
/// `/tmp/stasis-pod-dump-<pid>`, the staging directory `.<archive>.stasis-<pid>` beside the
/// output) full of symlinks to a root-only secret and to a file of root's gains nothing:
/// nothing is written through the links, nothing of the secret reaches the archive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planted_symlinks_at_old_predictable_paths_gain_nothing() -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let c = Containerd::start("trust-planted")?;
    let image = c.import_busybox_for_cri()?;
    let mut cri = c.cri().await?;
    let pod = pod_config("planted", &c.dir.join("logs"));
    let pod_id = cri.run_pod(&pod).await?;
    let id = cri
        .run_container(
            &pod_id,
            &pod,
            container_config("app", image, &["sh", "-c", &counter_loop("/counter")]),
        )
        .await?;
    wait_counter_moving(&mut cri, &id, "/counter").await?;
    // Root's secret and a file of root's the attacker would like overwritten.
    let secret_text = format!("TOPSECRET-{}", std::process::id());
    let secret = c.dir.join("secret");
    std::fs::write(&secret, &secret_text)?;
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600))?;
    let victim = c.dir.join("victim");
    std::fs::write(&victim, "unchanged")?;
    // A shared output directory, as /tmp is.
    let shared = c.dir.join("shared");
    std::fs::create_dir_all(&shared)?;
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777))?;
    let last_pid: u32 = std::fs::read_to_string("/proc/sys/kernel/ns_last_pid")?
        .trim()
        .parse()?;
    let shim_pids = stasis_e2e::processes_matching(&[
        stasis_e2e::SHIM_BINARY,
        &c.socket().display().to_string(),
    ]);
    ensure!(!shim_pids.is_empty(), "no shim process found");
    let pids: Vec<u32> = shim_pids
        .iter()
        .map(|p| *p as u32)
        .chain(last_pid + 1..last_pid + 300)
        .collect();
    let mut planted = Vec::new();
    for pid in &pids {
        planted.push(format!("/tmp/stasis-pod-dump-{pid}"));
        planted.push(format!("{}/.planted.tar.stasis-{pid}", shared.display()));
    }
    // Somebody else's paths stay theirs.
    planted.retain(|p| std::path::Path::new(p).symlink_metadata().is_err());
    let script = format!(
        "set -e\n\
         for d in \"$@\"; do mkdir -p \"$d\"\n\
           for f in dump.log pod.options pod.dump manifest.json config.dump; do ln -sf {v} \"$d/$f\"; done\n\
           ln -sf {s} \"$d/stats-dump\"\n\
         done\n",
        v = victim.display(),
        s = secret.display()
    );
    let status = std::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "sh",
            "-c",
            &script,
            "plant",
        ])
        .args(&planted)
        .status()?;
    ensure!(status.success(), "planting as nobody failed");
    let archive = shared.join("planted.tar");
    let result = c.stasisctl_ok(&[
        "pod",
        "checkpoint",
        "planted",
        "--leave-running",
        "--output",
        archive.to_str().unwrap(),
    ]);
    let cleanup = || {
        for p in &planted {
            let _ = std::fs::remove_dir_all(p);
        }
    };
    if let Err(e) = result {
        cleanup();
        return Err(e);
    }
    let bytes = std::fs::read(&archive)?;
    let leaked = bytes
        .windows(secret_text.len())
        .any(|w| w == secret_text.as_bytes());
    let victim_now = std::fs::read_to_string(&victim)?;
    let still_links = planted.iter().all(|p| {
        std::fs::read_dir(p)
            .map(|d| d.flatten().all(|e| e.path().is_symlink()))
            .unwrap_or(false)
    });
    cleanup();
    ensure!(!leaked, "the root-only secret was copied into the archive");
    ensure!(
        victim_now == "unchanged",
        "a file was written through a planted link: {victim_now:?}"
    );
    ensure!(
        still_links,
        "something was written into a planted directory"
    );
    ensure!(
        std::fs::metadata(&archive)?.permissions().mode() & 0o777 == 0o600,
        "the archive is not 0600"
    );
    // An output directory that a user owns: the pod is staged in root's private area
    // instead (the user could swap a staging directory beside the output for a link), and
    // only the archive appears there.
    let users = c.dir.join("users-dir");
    std::fs::create_dir_all(&users)?;
    std::os::unix::fs::chown(&users, Some(65534), Some(65534))?;
    let theirs = users.join("theirs.tar");
    c.stasisctl_ok(&[
        "pod",
        "checkpoint",
        "planted",
        "--leave-running",
        "--output",
        theirs.to_str().unwrap(),
    ])?;
    let names: Vec<String> = std::fs::read_dir(&users)?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    ensure!(
        names == ["theirs.tar"],
        "the user's directory holds {names:?}"
    );
    let staged: Vec<_> = std::fs::read_dir(stasis_controller::files::CHECKPOINT_STAGING)?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains("theirs.tar"))
        .collect();
    ensure!(staged.is_empty(), "staging left behind: {staged:?}");
    // The archive is whole: it restores.
    cri.stop_and_remove_pod(&pod_id).await?;
    let new_pod = c
        .stasisctl_ok(&["pod", "restore", archive.to_str().unwrap()])?
        .trim()
        .to_string();
    cri.stop_and_remove_pod(&new_pod).await?;
    c.finish()
}

/// A volume shared with a container the checkpoint does not freeze: that container keeps
/// swapping a directory of the volume for a link to a host directory while the volume is
/// captured again and again, and a link that stays in place points at a host file. Root
/// captures the volume, yet no checkpoint holds a byte of the host's files: links are
/// captured as links, never followed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volume_capture_never_follows_a_link_swapped_in() -> Result<()> {
    let c = Containerd::start("trust-capture-race")?;
    let image = c.import_busybox_for_cri()?;
    let mut cri = c.cri().await?;
    let vol = c.dir.join("shared-volume");
    let secret_dir = c.dir.join("host-secret-dir");
    std::fs::create_dir_all(&vol)?;
    std::fs::create_dir_all(&secret_dir)?;
    let secret = "host-only secret 7f3a";
    std::fs::write(secret_dir.join("f"), secret)?;
    std::fs::write(c.dir.join("host-secret-file"), secret)?;
    std::os::unix::fs::symlink(c.dir.join("host-secret-file"), vol.join("static"))?;
    let mount = || cri::Mount {
        container_path: "/shared".into(),
        host_path: vol.display().to_string(),
        ..Default::default()
    };
    let pod = pod_config("capture-race", &c.dir.join("logs"));
    let pod_id = cri.run_pod(&pod).await?;
    let mut captured = container_config("cap", image, &["sh", "-c", &counter_loop("/counter")]);
    captured.mounts.push(mount());
    captured
        .annotations
        .insert("io.stasis.checkpoint.volumes".into(), "/shared".into());
    let cap_id = cri.run_container(&pod_id, &pod, captured).await?;
    // The swapper: d is a real directory one moment, a link to the host's secret directory
    // (a path that means something only outside the container) the next.
    let swap = format!(
        "mkdir -p /shared/d.real; echo inside > /shared/d.real/f; \
         while true; do mv /shared/d.real /shared/d; mv /shared/d /shared/d.real; \
         ln -s {} /shared/d; rm /shared/d; done",
        secret_dir.display()
    );
    let mut swapper = container_config("swapper", image, &["sh", "-c", &swap]);
    swapper.mounts.push(mount());
    cri.run_container(&pod_id, &pod, swapper).await?;
    wait_counter_moving(&mut cri, &cap_id, "/counter").await?;
    let mut saw_link_d = false;
    for round in 0..8 {
        let archive = c.dir.join(format!("race-{round}.tar"));
        c.stasisctl_ok(&[
            "pod",
            "checkpoint",
            &pod_id,
            "--container",
            "cap",
            "--leave-running",
            "--output",
            archive.to_str().unwrap(),
        ])?;
        let mut outer = tar::Archive::new(std::fs::File::open(&archive)?);
        let mut found_volume = false;
        for e in outer.entries()? {
            let e = e?;
            if !e.path()?.to_string_lossy().ends_with("volumes/0.tar") {
                continue;
            }
            found_volume = true;
            let mut inner = tar::Archive::new(e);
            for v in inner.entries()? {
                let mut v = v?;
                let path = v
                    .path()?
                    .to_string_lossy()
                    .trim_start_matches("./")
                    .to_string();
                let kind = v.header().entry_type();
                let mut data = Vec::new();
                std::io::Read::read_to_end(&mut v, &mut data)?;
                ensure!(
                    !String::from_utf8_lossy(&data).contains(secret),
                    "round {round}: the capture copied a host file's content as {path}"
                );
                if path == "static" {
                    ensure!(
                        kind == tar::EntryType::Symlink,
                        "round {round}: the link 'static' was captured as {kind:?}"
                    );
                }
                if path == "d" && kind == tar::EntryType::Symlink {
                    saw_link_d = true;
                }
            }
        }
        ensure!(
            found_volume,
            "round {round}: no volume capture in the archive"
        );
        std::fs::remove_file(&archive)?;
    }
    eprintln!("the swapped link was caught mid-swap in some capture: {saw_link_d}");
    cri.stop_and_remove_pod(&pod_id).await?;
    c.finish()
}

/// One protobuf field: (number, wire type, value bytes: the varint's bytes, or a
/// length-delimited payload, or fixed bytes).
type PbField = (u64, u8, Vec<u8>);

/// A protobuf message as its fields in order. Enough to edit CRIU's images the way an
/// attacker would, without CRIU's schema.
fn pb_fields(mut b: &[u8]) -> Result<Vec<PbField>> {
    fn varint(b: &mut &[u8]) -> Result<(u64, Vec<u8>)> {
        let (mut v, mut shift, mut raw) = (0u64, 0, Vec::new());
        loop {
            let (&byte, rest) = b.split_first().context("truncated varint")?;
            *b = rest;
            raw.push(byte);
            v |= u64::from(byte & 0x7f) << shift;
            shift += 7;
            if byte & 0x80 == 0 {
                return Ok((v, raw));
            }
        }
    }
    let mut out = Vec::new();
    while !b.is_empty() {
        let (key, _) = varint(&mut b)?;
        let (number, wire) = (key >> 3, (key & 7) as u8);
        let value = match wire {
            0 => varint(&mut b)?.1,
            2 => {
                let (len, _) = varint(&mut b)?;
                let (v, rest) = b.split_at(len as usize);
                b = rest;
                v.to_vec()
            }
            1 | 5 => {
                let n = if wire == 1 { 8 } else { 4 };
                let (v, rest) = b.split_at(n);
                b = rest;
                v.to_vec()
            }
            other => anyhow::bail!("wire type {other}"),
        };
        out.push((number, wire, value));
    }
    Ok(out)
}

fn pb_varint(mut v: u64) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return out;
        }
        out.push(byte | 0x80);
    }
}

fn pb_encode(fields: &[PbField]) -> Vec<u8> {
    let mut out = Vec::new();
    for (number, wire, value) in fields {
        out.extend(pb_varint(number << 3 | u64::from(*wire)));
        if *wire == 2 {
            out.extend(pb_varint(value.len() as u64));
        }
        out.extend(value);
    }
    out
}

/// Rewrites field `number` (a message) of `fields` with `edit`.
fn pb_edit_message(
    fields: &mut [PbField],
    number: u64,
    edit: &dyn Fn(&mut Vec<PbField>),
) -> Result<()> {
    let f = fields
        .iter_mut()
        .find(|f| f.0 == number && f.1 == 2)
        .with_context(|| format!("no message field {number}"))?;
    let mut inner = pb_fields(&f.2)?;
    edit(&mut inner);
    f.2 = pb_encode(&inner);
    Ok(())
}

/// Rewrites every entry of the CRIU image at `path` with `edit(index, fields)`, and appends
/// the entries `edit_tail` returns (each a message's fields).
fn edit_image(
    path: &std::path::Path,
    edit: &mut dyn FnMut(usize, &mut Vec<PbField>) -> Result<()>,
    extra: Vec<Vec<PbField>>,
) -> Result<()> {
    let bytes = std::fs::read(path)?;
    // Two magics (CRIU's common one, then the image's), then length-prefixed entries.
    let mut out = bytes[..8].to_vec();
    let mut at = 8;
    let mut i = 0;
    let push = |out: &mut Vec<u8>, entry: Vec<u8>| {
        out.extend((entry.len() as u32).to_le_bytes());
        out.extend(entry);
    };
    while at < bytes.len() {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into()?) as usize;
        let mut fields = pb_fields(&bytes[at + 4..at + 4 + len])?;
        edit(i, &mut fields)?;
        push(&mut out, pb_encode(&fields));
        at += 4 + len;
        i += 1;
    }
    for fields in extra {
        push(&mut out, pb_encode(&fields));
    }
    std::fs::write(path, out)?;
    Ok(())
}

/// Every CRIU image of an unpacked archive whose name starts with `prefix`.
fn images_named(dir: &std::path::Path, prefix: &str) -> Result<Vec<std::path::PathBuf>> {
    Ok(walkdir(dir)?
        .into_iter()
        .filter(|p| {
            let n = p.file_name().unwrap_or_default().to_string_lossy();
            n.starts_with(prefix) && n.ends_with(".img")
        })
        .collect())
}

/// What the attacker of issue 22 did to a `core-N.img`: every capability set = root's (all
/// but CAP_SYS_RESOURCE, which root here lacks), no_new_privs off, seccomp disabled.
fn widen_core_image(path: &std::path::Path) -> Result<()> {
    // core_entry.thread_core = 5 → thread_core_entry.creds = 10 (CRIU's images/core.proto).
    edit_image(
        path,
        &mut |_, core| {
            // A zombie (a child that just exited) has no thread state to widen.
            if !core.iter().any(|f| f.0 == 5) {
                return Ok(());
            }
            pb_edit_message(core, 5, &|thread| {
                thread.retain(|f| f.0 != 11); // seccomp_mode
                thread.push((11, 0, pb_varint(0)));
                let _ = pb_edit_message(thread, 10, &|creds| {
                    // cap_inh 9, cap_prm 10, cap_eff 11, cap_bnd 12, no_new_privs 18.
                    creds.retain(|f| !matches!(f.0, 10..=12 | 18));
                    for set in 10..=12 {
                        for word in [0xfeff_ffffu64, 0x1ff] {
                            creds.push((set, 0, pb_varint(word)));
                        }
                    }
                    creds.push((18, 0, pb_varint(0)));
                });
            })
        },
        Vec::new(),
    )
}

/// One edit of the list, applied to every image it concerns.
type ImageEdit = fn(&std::path::Path) -> Result<usize>;

fn edit_all(
    dir: &std::path::Path,
    prefix: &str,
    edit: impl Fn(&std::path::Path) -> Result<()>,
) -> Result<usize> {
    let found = images_named(dir, prefix)?;
    for p in &found {
        edit(p)?;
    }
    Ok(found.len())
}

/// Edits every entry of every image named `prefix…`.
fn edit_entries(
    dir: &std::path::Path,
    prefix: &str,
    edit: impl Fn(&mut Vec<PbField>) -> Result<()>,
) -> Result<usize> {
    edit_all(dir, prefix, |p| {
        edit_image(p, &mut |_, e| edit(e), Vec::new())
    })
}

/// The list of hostile images: each edit, and what the refusal must say.
fn hostile_edits() -> Vec<(&'static str, ImageEdit, &'static [&'static str])> {
    vec![
        (
            "every capability, no seccomp, no no_new_privs",
            |dir| edit_all(dir, "core-", widen_core_image),
            &[
                "CAP_SYS_ADMIN",
                "no_new_privs off where the spec sets it",
                "seccomp mode 0 where the spec has a filter",
            ],
        ),
        (
            "a changed uid",
            |dir| {
                edit_entries(dir, "core-", |core| {
                    if !core.iter().any(|f| f.0 == 5) {
                        return Ok(());
                    }
                    pb_edit_message(core, 5, &|thread| {
                        let _ = pb_edit_message(thread, 10, &|creds| {
                            // uid 1, euid 3, suid 5, fsuid 7 (creds.proto).
                            creds.retain(|f| !matches!(f.0, 1 | 3 | 5 | 7));
                            for n in [1, 3, 5, 7] {
                                creds.push((n, 0, pb_varint(1234)));
                            }
                        });
                    })
                })
            },
            &["uids [1234, 1234, 1234, 1234] where the spec's user is 0 and nobody may change it"],
        ),
        (
            "an extra mount",
            |dir| {
                edit_all(dir, "mountpoints-", |p| {
                    // The root mount's id: the parent of /proc.
                    let mut root = 0u64;
                    edit_image(
                        p,
                        &mut |_, m| {
                            if m.iter().any(|f| f.0 == 7 && f.2 == b"/proc") {
                                let parent = m.iter().find(|f| f.0 == 4).context("parent")?;
                                root = parse_varint(&parent.2);
                            }
                            Ok(())
                        },
                        Vec::new(),
                    )?;
                    ensure!(root != 0, "no /proc mount in {}", p.display());
                    // mnt_entry: fstype 1 (PROC), mnt_id 2, root_dev 3, parent 4, flags 5,
                    // root 6, mountpoint 7, source 8, options 9 (mnt.proto).
                    let proc_mount = vec![
                        (1, 0, pb_varint(1)),
                        (2, 0, pb_varint(99_999)),
                        (3, 0, pb_varint(0)),
                        (4, 0, pb_varint(root)),
                        (5, 0, pb_varint(0)),
                        (6, 2, b"/".to_vec()),
                        (7, 2, b"/host-proc".to_vec()),
                        (8, 2, b"proc".to_vec()),
                        (9, 2, Vec::new()),
                    ];
                    edit_image(p, &mut |_, _| Ok(()), vec![proc_mount])
                })
            },
            &["a proc mount at /host-proc that the spec does not have"],
        ),
        (
            "a weaker seccomp filter",
            |dir| {
                edit_entries(dir, "seccomp", |entry| {
                    for f in entry.iter_mut().filter(|f| f.0 == 1) {
                        let mut filter = pb_fields(&f.2)?;
                        // `ret #SECCOMP_RET_ALLOW`: one BPF instruction.
                        let mut allow = 0x06u16.to_ne_bytes().to_vec();
                        allow.extend([0, 0]);
                        allow.extend(0x7fff_0000u32.to_ne_bytes());
                        filter.retain(|g| g.0 != 1);
                        filter.insert(0, (1, 2, allow));
                        f.2 = pb_encode(&filter);
                    }
                    Ok(())
                })
            },
            &["a seccomp filter weaker than the spec's: it would allow"],
        ),
        (
            "an opened host file",
            |dir| {
                edit_entries(dir, "files", |file| {
                    // file_entry.reg = 3 → reg_file_entry.name 6, mnt_id 7 (sint32).
                    if !file.iter().any(|f| f.0 == 3) {
                        return Ok(());
                    }
                    pb_edit_message(file, 3, &|reg| {
                        if reg.iter().any(|f| f.0 == 6 && f.2 == b"/bin/busybox") {
                            reg.retain(|f| !matches!(f.0, 6 | 7));
                            reg.push((6, 2, b"/etc/shadow".to_vec()));
                            // Mount 1, zigzag-encoded: never one of a container's.
                            reg.push((7, 0, pb_varint(2)));
                        }
                    })
                })
            },
            // containerd quotes the shim's message: the file name's quotes come escaped.
            &[
                "files.img: file ",
                "/etc/shadow",
                " on mount 1, not one of the container's",
            ],
        ),
    ]
}

fn parse_varint(b: &[u8]) -> u64 {
    b.iter()
        .enumerate()
        .fold(0, |v, (i, byte)| v | (u64::from(byte & 0x7f) << (7 * i)))
}

/// CRIU's images are untrusted too. A pod with seccomp (the runtime's default profile),
/// no_new_privs and without CAP_SETUID/CAP_SETGID is checkpointed; each edit of the issue's
/// list (every capability, a changed uid, an extra mount, a weaker seccomp filter, an opened
/// host file) is refused before CRIU reads the images, naming the container, the task or
/// image and the item, and leaves nothing behind. With the first check switched off (a
/// debug-build switch of this test only), the check of what CRIU restored refuses the
/// widened capabilities on its own. The honest archive restores with what it had.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn criu_images_asking_for_more_than_the_spec_are_refused() -> Result<()> {
    let c = Containerd::start("trust-criu-images")?;
    let image = c.import_busybox_for_cri()?;
    let mut cri = c.cri().await?;
    let pod = pod_config("images", &c.dir.join("logs"));
    let pod_id = cri.run_pod(&pod).await?;
    // Besides the counter, a second loop appends to a file on a host directory: a restored
    // task that ran before the check would leave a line there.
    let proof = c.dir.join("images-proof");
    std::fs::create_dir_all(&proof)?;
    let script = format!(
        "(while true; do echo x >> /proof/ran; sleep 0.005; done) & {}",
        counter_loop("/counter")
    );
    let mut cfg = container_config("app", image, &["sh", "-c", &script]);
    cfg.mounts.push(cri::Mount {
        container_path: "/proof".into(),
        host_path: proof.display().to_string(),
        ..Default::default()
    });
    let sc = cfg
        .linux
        .as_mut()
        .and_then(|l| l.security_context.as_mut())
        .context("security context")?;
    sc.capabilities = Some(cri::Capability {
        drop_capabilities: vec!["SETUID".into(), "SETGID".into()],
        ..Default::default()
    });
    sc.no_new_privs = true;
    sc.seccomp = Some(cri::SecurityProfile {
        profile_type: cri::security_profile::ProfileType::RuntimeDefault as i32,
        ..Default::default()
    });
    let id = cri.run_container(&pod_id, &pod, cfg).await?;
    wait_counter_moving(&mut cri, &id, "/counter").await?;
    let status = |cri: &mut stasis_e2e::cri::CriClient, id: String| {
        let mut cri = cri.clone();
        async move {
            // The pod shares one PID namespace (its pid 1 is the pause process): the
            // container's own process is the one writing the counter. The pattern is split
            // so that this shell's own command line does not match it.
            let script = "for p in /proc/[0-9]*; do \
                 if tr '\\0' ' ' < $p/cmdline 2>/dev/null | grep -q '/coun''ter'; then \
                 grep -E '^(CapEff|Seccomp|NoNewPrivs):' $p/status 2>/dev/null && exit; fi; done; exit 1";
            cri.exec_ok(&id, &["sh", "-c", script]).await
        }
    };
    let before = status(&mut cri, id.clone()).await?;
    ensure!(
        before.contains("Seccomp:\t2") && before.contains("NoNewPrivs:\t1"),
        "the container runs without its filter or no_new_privs: {before}"
    );
    let good = c.dir.join("images.tar");
    c.stasisctl_ok(&[
        "pod",
        "checkpoint",
        "images",
        "--leave-running",
        "--output",
        good.to_str().unwrap(),
    ])?;
    cri.stop_and_remove_pod(&pod_id).await?;
    let footprint = c.settled_footprint().await?;

    let refused = |label: &str, archive: &std::path::Path, wants: &[&str]| -> Result<()> {
        let out = c.stasisctl(&["pod", "restore", archive.to_str().unwrap()])?;
        let err = String::from_utf8_lossy(&out.stderr);
        eprintln!("{label}: {err}");
        ensure!(!out.status.success(), "{label}: restored");
        for want in wants {
            ensure!(
                err.contains(want),
                "{label}: the refusal does not say {want:?}: {err}"
            );
        }
        Ok(())
    };
    for (label, edit, wants) in hostile_edits() {
        let hostile = c.dir.join("hostile.tar");
        let mut edited = 0;
        rewrite_archive(&good, &hostile, |dir| {
            edited = edit(dir)?;
            Ok(())
        })?;
        ensure!(edited > 0, "{label}: no image to edit in the archive");
        let mut all = vec![
            "container",
            "the checkpoint's CRIU images ask for more than a fresh container of this spec gets",
            "nothing was restored",
        ];
        all.extend(wants.iter());
        refused(label, &hostile, &all)?;
        c.expect_footprint(footprint)
            .await
            .with_context(|| format!("{label}: the refused restore left something"))?;
    }

    // The second check on its own: the first switched off (debug builds only).
    let widened = c.dir.join("widened.tar");
    rewrite_archive(&good, &widened, |dir| {
        edit_all(dir, "core-", widen_core_image).map(|_| ())
    })?;
    let switch = c.config_dir().join("test-skip-image-check");
    std::fs::create_dir_all(c.config_dir())?;
    std::fs::write(&switch, "")?;
    let ran = || std::fs::metadata(proof.join("ran")).map(|m| m.len());
    let lines_before = ran()?;
    let second = refused(
        "the widened images, first check off",
        &widened,
        &[
            "restore container app",
            "with more than a fresh container of this spec gets",
            "CAP_SYS_ADMIN",
            "the container was removed",
        ],
    );
    std::fs::remove_file(&switch)?;
    second?;
    // CRIU left the tasks stopped and the check refused them: not one instruction of theirs
    // ran with what the images gave them.
    ensure!(
        ran()? == lines_before,
        "the refused tasks ran before the check: {} grew from {lines_before} to {} bytes",
        proof.join("ran").display(),
        ran()?
    );
    c.expect_footprint(footprint)
        .await
        .context("the refused restore left something")?;

    // The honest archive still restores, with the capabilities, filter and no_new_privs it
    // had.
    let new_pod = c
        .stasisctl_ok(&["pod", "restore", good.to_str().unwrap()])?
        .trim()
        .to_string();
    let list = stasis_e2e::cri::containers_by_name(&mut cri, &new_pod).await?;
    let (_, new_id, _) = list.first().context("restored container")?.clone();
    let after = status(&mut cri, new_id).await?;
    ensure!(after == before, "{before:?} came back as {after:?}");
    cri.stop_and_remove_pod(&new_pod).await?;
    c.finish()
}

/// Every file below `dir`.
fn walkdir(dir: &std::path::Path) -> Result<Vec<std::path::PathBuf>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            out.extend(walkdir(&p)?);
        } else {
            out.push(p);
        }
    }
    Ok(out)
}

/// How this containerd's gVisor sandboxes are confined on the host: for each sentry (the
/// sandbox process runsc lists), its seccomp mode, no_new_privs, capability sets and ids.
fn sentry_confinement(c: &Containerd) -> Result<Vec<String>> {
    let out = std::process::Command::new("runsc")
        .args(["--root", "/run/stasis/runsc/k8s.io", "list", "-format=json"])
        .output()?;
    let list: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let mine = c.dir.display().to_string();
    let mut seen = Vec::new();
    for s in list {
        let (Some(pid), Some(bundle)) = (s["pid"].as_i64(), s["bundle"].as_str()) else {
            continue;
        };
        if !bundle.starts_with(&mine) || pid <= 0 {
            continue;
        }
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let lines: Vec<&str> = status
            .lines()
            .filter(|l| {
                ["Uid:", "Gid:", "Cap", "NoNewPrivs:", "Seccomp:"]
                    .iter()
                    .any(|k| l.starts_with(k))
            })
            .collect();
        let entry = lines.join(" | ");
        if !seen.contains(&entry) {
            seen.push(entry);
        }
    }
    ensure!(
        !seen.is_empty(),
        "no gVisor sandbox of this test is running"
    );
    seen.sort();
    Ok(seen)
}

/// gVisor: a pod's `sandbox/checkpoint.img` is the sentry's own state, restored inside the
/// sandbox runsc starts from the spec. Whatever the image holds (here: its bytes changed in
/// the middle, manifest rewritten), the restored sandbox's host-side confinement (the
/// sentry's seccomp filter, no_new_privs, capabilities, ids) is that of a fresh sandbox of
/// the same pod: it comes from runsc and the spec, not from the image. A refused restore
/// leaves nothing behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gvisor_image_cannot_widen_the_sandbox() -> Result<()> {
    let c = Containerd::start("trust-gvisor-image")?;
    let image = c.import_busybox_for_cri()?;
    let mut cri = c.cri().await?;
    let pod = pod_config("gv", &c.dir.join("logs"));
    let pod_id = cri.run_pod_with(&pod, "stasis-gvisor").await?;
    let cfg = container_config("app", image, &["sh", "-c", &counter_loop("/counter")]);
    let id = cri.run_container(&pod_id, &pod, cfg).await?;
    wait_counter_moving(&mut cri, &id, "/counter").await?;
    let fresh = sentry_confinement(&c)?;
    ensure!(
        fresh.iter().all(|s| s.contains("Seccomp:\t2")),
        "a fresh sentry without its seccomp filter: {fresh:?}"
    );
    let archive = c.dir.join("gv.tar");
    c.stasisctl_ok(&[
        "pod",
        "checkpoint",
        "gv",
        "--leave-running",
        "--output",
        archive.to_str().unwrap(),
    ])?;
    cri.stop_and_remove_pod(&pod_id).await?;
    let footprint = c.settled_footprint().await?;

    let edited = c.dir.join("gv-edited.tar");
    let mut found = false;
    rewrite_archive(&archive, &edited, |dir| {
        for p in walkdir(dir)? {
            if p.ends_with("sandbox/checkpoint.img") {
                let mut bytes = std::fs::read(&p)?;
                let mid = bytes.len() / 2;
                let end = (mid + 4096).min(bytes.len());
                for b in &mut bytes[mid..end] {
                    *b ^= 0xa5;
                }
                std::fs::write(&p, bytes)?;
                found = true;
            }
        }
        Ok(())
    })?;
    ensure!(found, "no sandbox/checkpoint.img in the gVisor archive");
    let out = c.stasisctl(&["pod", "restore", edited.to_str().unwrap()])?;
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("edited sandbox image: {err}");
    if out.status.success() {
        let edited_pod = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let widened = sentry_confinement(&c)?;
        ensure!(
            widened == fresh,
            "the edited image's sandbox is confined as {widened:?}, a fresh one as {fresh:?}"
        );
        cri.stop_and_remove_pod(&edited_pod).await?;
    }
    c.expect_footprint(footprint)
        .await
        .context("the edited image's restore left something")?;

    let new_pod = c
        .stasisctl_ok(&["pod", "restore", archive.to_str().unwrap()])?
        .trim()
        .to_string();
    let restored = sentry_confinement(&c)?;
    ensure!(
        restored == fresh,
        "the restored sandbox is confined as {restored:?}, a fresh one as {fresh:?}"
    );
    cri.stop_and_remove_pod(&new_pod).await?;
    c.finish()
}
