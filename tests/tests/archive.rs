//! The pod archive from the outside: checkpointctl reads each container, stasisctl inspect
//! reads the pod, and hostile or broken archives are refused before anything is created.

use std::{path::Path, time::Duration};

use anyhow::{ensure, Context, Result};
use stasis_e2e::{
    cri::{container_config, cri, pod_config},
    Containerd,
};

/// A tar entry whose name is written byte for byte (the tar crate refuses to build hostile
/// names, which is what this test needs).
fn raw_entry(
    out: &mut tar::Builder<Vec<u8>>,
    name: &str,
    kind: tar::EntryType,
    link: Option<&str>,
    data: &[u8],
) {
    let mut h = tar::Header::new_old();
    {
        let old = h.as_old_mut();
        old.name[..name.len()].copy_from_slice(name.as_bytes());
        if let Some(l) = link {
            old.linkname[..l.len()].copy_from_slice(l.as_bytes());
        }
    }
    h.set_entry_type(kind);
    h.set_mode(0o644);
    h.set_size(data.len() as u64);
    h.set_cksum();
    out.append(&h, data).unwrap();
}

fn pod_options(dir: &str) -> Vec<u8> {
    serde_json::to_vec(
        &serde_json::json!({"version": 1, "containers": {"c": dir}, "annotations": {}}),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archives_are_readable_and_hostile_ones_refused() -> Result<()> {
    let c = Containerd::start("archive")?;
    let image = c.import_busybox_for_cri()?;
    let mut client = c.cri().await?;
    let pod = pod_config("arch", &c.dir.join("logs"));
    let pod_id = client.run_pod(&pod).await?;
    client
        .run_container(
            &pod_id,
            &pod,
            container_config(
                "web",
                image,
                &["sh", "-c", "echo hi > /hello; sleep 100000"],
            ),
        )
        .await?;
    client
        .run_container(
            &pod_id,
            &pod,
            container_config("db", image, &["sleep", "100000"]),
        )
        .await?;
    let mut written = false;
    for _ in 0..100 {
        let ids = client
            .runtime
            .list_containers(cri::ListContainersRequest::default())
            .await?
            .into_inner()
            .containers;
        let web = ids
            .iter()
            .find(|c| c.metadata.as_ref().is_some_and(|m| m.name == "web"));
        if let Some(web) = web {
            if client.exec(&web.id, &["cat", "/hello"]).await?.0 == 0 {
                written = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ensure!(written, "web never wrote /hello");
    let good = c.dir.join("good.tar.zst");
    c.stasisctl_ok(&[
        "pod",
        "checkpoint",
        "arch",
        "--leave-running",
        "--compress",
        "zstd",
        "--output",
        good.to_str().unwrap(),
    ])?;

    // inspect: table and JSON
    let table = c.stasisctl_ok(&["inspect", good.to_str().unwrap()])?;
    ensure!(
        table.contains("web") && table.contains("db") && table.contains("runc"),
        "inspect:\n{table}"
    );
    let json: serde_json::Value = serde_json::from_str(&c.stasisctl_ok(&[
        "inspect",
        "--format",
        "json",
        good.to_str().unwrap(),
    ])?)?;
    ensure!(
        json["pod_name"] == "arch" && json["containers"].as_array().map(|a| a.len()) == Some(2)
    );

    // Each per-container directory, tarred alone, is a checkpoint checkpointctl reads.
    let unpacked = c.dir.join("unpacked");
    std::fs::create_dir_all(&unpacked)?;
    // The zstd archive itself, through the zstd CLI (installed by scripts/install-deps.sh; a
    // missing CLI fails the test rather than leaving this part out).
    let out = std::process::Command::new("bash")
        .arg("-c")
        .arg(format!(
            "set -o pipefail; zstd -dc {} | tar -x -C {}",
            good.display(),
            unpacked.display()
        ))
        .output()
        .context("run zstd | tar")?;
    ensure!(
        out.status.success() && unpacked.join("pod.options").exists(),
        "the zstd archive did not unpack with the zstd CLI: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let opts: serde_json::Value =
        serde_json::from_slice(&std::fs::read(unpacked.join("pod.options"))?)?;
    for (name, dir) in opts["containers"].as_object().unwrap() {
        let one = c.dir.join(format!("{name}.tar"));
        let mut b = tar::Builder::new(std::fs::File::create(&one)?);
        b.append_dir_all(".", unpacked.join(dir.as_str().unwrap()))?;
        b.finish()?;
        for args in [vec!["show"], vec!["inspect", "--ps-tree"]] {
            let out = std::process::Command::new("checkpointctl")
                .args(&args)
                .arg(&one)
                .output()?;
            ensure!(
                out.status.success(),
                "checkpointctl {args:?} on {name}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    // Hostile and broken archives: refused with a clear error, nothing created or written.
    let pods_before = c.settled_footprint().await?;
    let canary = c.dir.join("escaped");
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "dotdot",
            {
                let mut b = tar::Builder::new(Vec::new());
                raw_entry(&mut b, "../escaped", tar::EntryType::Regular, None, b"x");
                b.into_inner()?
            },
            "'..'",
        ),
        (
            "absolute",
            {
                let mut b = tar::Builder::new(Vec::new());
                raw_entry(
                    &mut b,
                    &canary.display().to_string(),
                    tar::EntryType::Regular,
                    None,
                    b"x",
                );
                b.into_inner()?
            },
            "absolute",
        ),
        (
            "symlink",
            {
                let mut b = tar::Builder::new(Vec::new());
                raw_entry(
                    &mut b,
                    "c",
                    tar::EntryType::Symlink,
                    Some(c.dir.to_str().unwrap()),
                    b"",
                );
                raw_entry(&mut b, "c/escaped", tar::EntryType::Regular, None, b"x");
                b.into_inner()?
            },
            "link",
        ),
        (
            "device",
            {
                let mut b = tar::Builder::new(Vec::new());
                raw_entry(&mut b, "null", tar::EntryType::Char, None, b"");
                b.into_inner()?
            },
            "device",
        ),
        (
            "truncated",
            {
                let bytes = std::fs::read(&good)?;
                bytes[..bytes.len() / 2].to_vec()
            },
            "truncated or corrupt",
        ),
        (
            "missing-dir",
            {
                let mut b = tar::Builder::new(Vec::new());
                raw_entry(
                    &mut b,
                    "pod.options",
                    tar::EntryType::Regular,
                    None,
                    &pod_options("nosuchdir"),
                );
                raw_entry(&mut b, "pod.dump", tar::EntryType::Regular, None, b"{}");
                b.into_inner()?
            },
            "(nosuchdir) has no config.dump; nothing was written",
        ),
        (
            "no-pod-options",
            {
                let mut b = tar::Builder::new(Vec::new());
                raw_entry(&mut b, "pod.dump", tar::EntryType::Regular, None, b"{}");
                b.into_inner()?
            },
            "archive has no pod.options; nothing was written",
        ),
    ];
    for (name, bytes, expect) in cases {
        let path = c.dir.join(format!("hostile-{name}.tar"));
        std::fs::write(&path, bytes)?;
        let out = c.stasisctl(&["pod", "restore", path.to_str().unwrap()])?;
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(!out.status.success(), "{name}: restore succeeded");
        ensure!(
            err.contains(expect),
            "{name}: error does not say {expect:?}: {err}"
        );
        ensure!(
            !canary.exists(),
            "{name}: a file was written outside the restore directory"
        );
        let left = stasis_e2e::restore_id(&err)
            .map(|id| stasis_e2e::restore_leftovers(&id))
            .unwrap_or_default();
        ensure!(left.is_empty(), "{name}: restore left {left:?}");
    }
    c.expect_footprint(pods_before)
        .await
        .context("a hostile archive created a pod")?;
    ensure!(!Path::new("/escaped").exists());
    client.stop_and_remove_pod(&pod_id).await?;
    c.finish()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_checkpoint_of_the_same_pod_is_refused() -> Result<()> {
    let c = Containerd::start("archive-busy")?;
    let image = c.import_busybox_for_cri()?;
    let mut client = c.cri().await?;
    let pod = pod_config("busy", &c.dir.join("logs"));
    let pod_id = client.run_pod(&pod).await?;
    // Enough memory that a dump takes a while.
    let hold = "a=$(head -c 268435456 /dev/zero | tr '\\0' x); echo ready > /ready; sleep 100000";
    let id = client
        .run_container(
            &pod_id,
            &pod,
            container_config("big", image, &["sh", "-c", hold]),
        )
        .await?;
    stasis_e2e::cri::wait_ready(&mut client, &id, "/ready", Duration::from_secs(30)).await?;
    let stasisctl = stasis_e2e::built_binary("stasisctl")?;
    let run = |n: u32| {
        let out = c.dir.join(format!("busy-{n}.tar"));
        let socket = c.socket();
        let exe = stasisctl.clone();
        std::thread::spawn(move || {
            std::process::Command::new(exe)
                .arg("--address")
                .arg(socket)
                .args(["pod", "checkpoint", "busy", "--leave-running", "--output"])
                .arg(out)
                .output()
        })
    };
    // Two checkpoints of the same pod at once: the second must be refused while the first runs.
    // The second starts once the first's `runc checkpoint` of the container is seen running;
    // should the dump end before the second reaches the shim, try again.
    let mut overlapped = false;
    for attempt in 0..4u32 {
        let first = run(attempt * 2 + 1);
        let seen_until = std::time::Instant::now() + Duration::from_secs(20);
        while stasis_e2e::processes_matching(&["runc", "checkpoint", &id]).is_empty()
            && !first.is_finished()
            && std::time::Instant::now() < seen_until
        {
            std::thread::sleep(Duration::from_millis(2));
        }
        let second = run(attempt * 2 + 2);
        let (a, b) = (first.join().unwrap()?, second.join().unwrap()?);
        let errs = format!(
            "{}{}",
            String::from_utf8_lossy(&a.stderr),
            String::from_utf8_lossy(&b.stderr)
        );
        ensure!(
            a.status.success() || b.status.success(),
            "both checkpoints failed: {errs}"
        );
        if a.status.success() && b.status.success() {
            continue;
        }
        ensure!(
            errs.contains("already running") && errs.contains("FAILED_PRECONDITION"),
            "refusal not clear: {errs}"
        );
        overlapped = true;
        break;
    }
    ensure!(
        overlapped,
        "the two checkpoints never overlapped in 4 attempts"
    );
    ensure!(
        client.container_status(&id).await?.state == cri::ContainerState::ContainerRunning as i32
    );
    client.stop_and_remove_pod(&pod_id).await?;
    c.finish()
}

/// A well-formed outer archive whose inner parts are hostile: a rootfs diff escaping the root,
/// leading through a symlink it creates, or holding a device; a deletion list leaving the
/// root; volume tars with a device or an escape. Each reaches the shim's checks and is refused
/// before any container exists: no file outside, the host volume untouched, no pod left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_content_inside_a_valid_archive_is_refused() -> Result<()> {
    let c = Containerd::start("archive-inner")?;
    let image = c.import_busybox_for_cri()?;
    let mut client = c.cri().await?;
    let host_volume = c.dir.join("host-volume");
    std::fs::create_dir_all(&host_volume)?;
    std::fs::write(host_volume.join("keep.txt"), "checkpointed")?;
    let pod = pod_config("inner", &c.dir.join("logs"));
    let pod_id = client.run_pod(&pod).await?;
    let mut cfg = container_config(
        "app",
        image,
        &["sh", "-c", "echo written > /in-rootfs; sleep 100000"],
    );
    cfg.mounts.push(cri::Mount {
        container_path: "/shared".into(),
        host_path: host_volume.display().to_string(),
        ..Default::default()
    });
    cfg.annotations
        .insert("io.stasis.checkpoint.volumes".into(), "/shared".into());
    let id = client.run_container(&pod_id, &pod, cfg).await?;
    let mut written = false;
    for _ in 0..100 {
        if client.exec(&id, &["cat", "/in-rootfs"]).await?.0 == 0 {
            written = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ensure!(written, "the container never wrote its file");
    let good = c.dir.join("inner.tar");
    c.stasisctl_ok(&[
        "pod",
        "checkpoint",
        "inner",
        "--output",
        good.to_str().unwrap(),
    ])?;
    client.stop_and_remove_pod(&pod_id).await?;
    // The host copy changes after the checkpoint: a refused restore must leave it so.
    std::fs::write(host_volume.join("keep.txt"), "after the checkpoint")?;

    let base = c.dir.join("inner-unpacked");
    std::fs::create_dir_all(&base)?;
    tar::Archive::new(std::fs::File::open(&good)?).unpack(&base)?;
    let opts: serde_json::Value =
        serde_json::from_slice(&std::fs::read(base.join("pod.options"))?)?;
    let cdir = opts["containers"]["app"]
        .as_str()
        .context("pod.options names no app")?
        .to_string();
    let canary = c.dir.join("escaped");
    let tar_of = |entries: &[(&str, tar::EntryType, Option<&str>)]| -> Result<Vec<u8>> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, kind, link) in entries {
            raw_entry(&mut b, name, *kind, *link, b"x");
        }
        Ok(b.into_inner()?)
    };
    let outside = c.dir.to_str().unwrap().to_string();
    let cases: Vec<(&str, &str, Vec<u8>, &str)> = vec![
        (
            "diff-dotdot",
            "rootfs-diff.tar",
            tar_of(&[("../../escaped", tar::EntryType::Regular, None)])?,
            "leads outside",
        ),
        (
            "diff-through-symlink",
            "rootfs-diff.tar",
            tar_of(&[
                ("evil", tar::EntryType::Symlink, Some(outside.as_str())),
                ("evil/escaped", tar::EntryType::Regular, None),
            ])?,
            "goes through the symlink",
        ),
        (
            "diff-device",
            "rootfs-diff.tar",
            tar_of(&[("dev-null", tar::EntryType::Char, None)])?,
            "which a restore refuses",
        ),
        (
            "deleted-leaves-root",
            "deleted.files",
            br#"["../../escaped"]"#.to_vec(),
            "leaves the root file system",
        ),
        (
            "volume-device",
            "checkpoint/volumes/0.tar",
            tar_of(&[("null", tar::EntryType::Char, None)])?,
            "which a restore refuses",
        ),
        (
            "volume-dotdot",
            "checkpoint/volumes/0.tar",
            tar_of(&[("../escaped", tar::EntryType::Regular, None)])?,
            "leads outside",
        ),
        (
            "volume-truncated",
            "checkpoint/volumes/0.tar",
            {
                let whole = std::fs::read(base.join(&cdir).join("checkpoint/volumes/0.tar"))?;
                whole[..whole.len() / 2].to_vec()
            },
            "volume archive",
        ),
    ];
    ensure!(
        base.join(&cdir).join("checkpoint/volumes/0.tar").exists(),
        "the checkpoint holds no volume capture to tamper with"
    );
    let pods_before = c.settled_footprint().await?;
    let plain = c.import_busybox()?;
    let mut events = stasis_e2e::EventWatch::start(&c, plain)?;
    for (name, file, bytes, expect) in cases {
        let dir = c.dir.join(format!("inner-{name}"));
        let status = std::process::Command::new("cp")
            .args(["-a"])
            .arg(&base)
            .arg(&dir)
            .status()?;
        ensure!(status.success(), "copy the unpacked archive");
        std::fs::write(dir.join(&cdir).join(file), bytes)?;
        // A deliberate attacker writes a matching manifest too (only a signature would stop
        // that): what must stop these is the shim's checks of the contents.
        std::fs::remove_file(dir.join("manifest.json"))?;
        stasis_controller::archive::write_manifest(&dir)?;
        let archive = c.dir.join(format!("inner-{name}.tar"));
        let mut b = tar::Builder::new(std::fs::File::create(&archive)?);
        b.follow_symlinks(false);
        b.append_dir_all(".", &dir)?;
        b.into_inner()?;
        events.mark(&c, plain)?;
        let out = c.stasisctl(&[
            "pod",
            "restore",
            archive.to_str().unwrap(),
            "--replace-volumes",
        ])?;
        let during = events.mark(&c, plain)?;
        eprintln!("{name}: events during the refused restore: {during:#?}");
        stasis_e2e::events::expect_no_creation(&during).context(name)?;
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(!out.status.success(), "{name}: the restore succeeded");
        ensure!(
            err.contains(expect),
            "{name}: the error does not say {expect:?}: {err}"
        );
        ensure!(!canary.exists(), "{name}: a file was written outside");
        ensure!(
            std::fs::read_to_string(host_volume.join("keep.txt"))? == "after the checkpoint",
            "{name}: the host volume was changed"
        );
        c.expect_footprint(pods_before)
            .await
            .with_context(|| format!("{name}: the refused restore left a pod"))?;
    }
    // A host volume is never wiped silently: the untampered archive is refused while the
    // volume holds files, naming it, until --replace-volumes says so.
    let out = c.stasisctl(&["pod", "restore", good.to_str().unwrap()])?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success()
            && err.contains("--replace-volumes")
            && err.contains(&*host_volume.to_string_lossy()),
        "a restore over a non-empty volume without --replace-volumes: {err}"
    );
    ensure!(
        std::fs::read_to_string(host_volume.join("keep.txt"))? == "after the checkpoint",
        "the refused restore changed the host volume"
    );
    c.expect_footprint(pods_before)
        .await
        .context("the refused restore left a pod")?;
    // With it, the volume holds its checkpointed contents.
    let new_pod = c
        .stasisctl_ok(&[
            "pod",
            "restore",
            good.to_str().unwrap(),
            "--replace-volumes",
        ])?
        .trim()
        .to_string();
    ensure!(
        std::fs::read_to_string(host_volume.join("keep.txt"))? == "checkpointed",
        "the good archive did not restore the volume"
    );
    client.stop_and_remove_pod(&new_pod).await?;
    c.finish()
}
