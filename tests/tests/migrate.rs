//! Moving a running pod between two nodes: two private containerd daemons on this machine,
//! each with its own root, state, socket, CNI bridge and subnet; the stream on loopback.

use std::{path::Path, process::Stdio, time::Duration};

use anyhow::{ensure, Context, Result};
use stasis_e2e::{
    cri::{
        container_config, containers_by_name, counter_loop, cri, pod_config, pod_freezer_state,
        read_counter, violations, wait_counter_above, wait_counter_moving, CriClient,
    },
    migration::{self, Listener, Meddle},
    Containerd,
};

/// `stasisctl [--address ADDRESS] migrate listen` with `node`'s policy, for `count`
/// migrations.
fn listener_at(
    node: &Containerd,
    address: Option<&str>,
    key: &Path,
    extra: &[&str],
    count: u32,
) -> Result<Listener> {
    let cmd = match address {
        None => node.stasisctl_command()?,
        Some(a) => {
            let mut c = std::process::Command::new(stasis_e2e::built_binary("stasisctl")?);
            c.args(["--address", a]);
            c
        }
    };
    migration::listen(cmd, key, count, extra, true)
}

fn listener(node: &Containerd, key: &Path, extra: &[&str], count: u32) -> Result<Listener> {
    listener_at(node, None, key, extra, count)
}

/// Two "nodes" (private containerd daemons) with busybox imported in both, and a migration
/// key made on the first: (a, b, image, key).
fn two_nodes(name: &str) -> Result<(Containerd, Containerd, &'static str, std::path::PathBuf)> {
    let (a, b) = Containerd::start_pair(name)?;
    let image = a.import_busybox_for_cri()?;
    b.import_busybox_for_cri()?;
    let key = a.dir.join("migration.key");
    a.stasisctl_ok(&["migrate", "keygen", "--output", key.to_str().unwrap()])?;
    Ok((a, b, image, key))
}

fn migrate(
    node: &Containerd,
    pod: &str,
    to: &str,
    key: &Path,
    extra: &[&str],
) -> Result<std::process::Output> {
    Ok(node
        .stasisctl_command()?
        .args(["pod", "migrate", pod, "--to", to, "--key-file"])
        .arg(key)
        .args(extra)
        .output()?)
}

/// A two-container pod (a counter in the rootfs; one in a shared volume captured with the
/// memory) moved back and forth between two nodes, eagerly and with `--lazy` (both ways
/// each): each time every counter continues from memory, no file is ahead of memory, the
/// source pod is gone and the target is visible to CRI.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_moves_back_and_forth_between_two_nodes() -> Result<()> {
    let (a, b, image, key) = two_nodes("migrate")?;
    let vol = a.dir.join("shared-volume");
    std::fs::create_dir_all(&vol)?;
    let vol_arg = vol.display().to_string();
    let pod = pod_config("mover", &a.dir.join("logs"));
    let mut cri_a = a.cri().await?;
    let mut cri_b = b.cri().await?;
    let mut pod_id = cri_a.run_pod(&pod).await?;
    cri_a
        .run_container(
            &pod_id,
            &pod,
            container_config("rootfs", image, &["sh", "-c", &counter_loop("/counter")]),
        )
        .await?;
    let mut cfg = container_config(
        "volume",
        image,
        &["sh", "-c", &counter_loop("/shared/counter")],
    );
    cfg.mounts.push(cri::Mount {
        container_path: "/shared".into(),
        host_path: vol_arg.clone(),
        ..Default::default()
    });
    cfg.annotations
        .insert("io.stasis.checkpoint.volumes".into(), "/shared".into());
    cri_a.run_container(&pod_id, &pod, cfg).await?;
    let file = |name: &str| {
        if name == "volume" {
            "/shared/counter"
        } else {
            "/counter"
        }
    };
    for (name, id, _) in containers_by_name(&mut cri_a, &pod_id).await? {
        wait_counter_moving(&mut cri_a, &id, file(&name)).await?;
    }
    let rounds = 10;
    for round in 0..rounds {
        // Even rounds a → b, odd rounds b → a.
        let (src, dst) = if round % 2 == 0 { (&a, &b) } else { (&b, &a) };
        let (cri_src, cri_dst) = if round % 2 == 0 {
            (&mut cri_a, &mut cri_b)
        } else {
            (&mut cri_b, &mut cri_a)
        };
        let mut before = std::collections::HashMap::new();
        for (name, id, _) in containers_by_name(cri_src, &pod_id).await? {
            before.insert(name.clone(), read_counter(cri_src, &id, file(&name)).await?);
        }
        // The same host directory on both "nodes": it holds the running pod's files.
        let recv = listener(
            dst,
            &key,
            &["--allow-host-path", &vol_arg, "--replace-volumes"],
            1,
        )?;
        // Rounds 0 and 1 eager, 2 and 3 lazy, …: each direction both ways.
        let lazy: &[&str] = if round % 4 >= 2 { &["--lazy"] } else { &[] };
        let out = migrate(src, &pod_id, &recv.addr, &key, lazy)?;
        let listened = recv.child.wait_with_output()?;
        ensure!(
            out.status.success(),
            "round {round}: migrate failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        ensure!(
            listened.status.success(),
            "round {round}: the listener failed"
        );
        let new_pod = String::from_utf8_lossy(&out.stdout).trim().to_string();
        ensure!(
            String::from_utf8_lossy(&listened.stdout).trim() == new_pod,
            "round {round}: the listener restored another pod than the sender reports"
        );
        // The source is gone, the target visible to CRI, every counter continued.
        ensure!(
            containers_by_name(cri_src, &pod_id)
                .await
                .map(|l| l.is_empty())
                .unwrap_or(true),
            "round {round}: the source pod still has containers"
        );
        let restored = containers_by_name(cri_dst, &new_pod).await?;
        ensure!(restored.len() == 2, "round {round}: restored {restored:?}");
        for (name, id, state) in &restored {
            ensure!(
                *state == cri::ContainerState::ContainerRunning as i32,
                "round {round}: {name} is not running"
            );
            let now = read_counter(cri_dst, id, file(name)).await?;
            let was = before[name];
            ensure!(
                now >= was,
                "round {round}: {name} restarted or went back: {was} -> {now}"
            );
            wait_counter_above(cri_dst, id, file(name), now).await?;
            let v = violations(cri_dst, id).await?;
            ensure!(v.is_empty(), "round {round}: {name}: {v}");
        }
        pod_id = new_pod;
    }
    let last = if rounds % 2 == 0 {
        &mut cri_a
    } else {
        &mut cri_b
    };
    last.stop_and_remove_pod(&pod_id).await?;
    a.finish()?;
    b.finish()
}

/// Faults: a peer without the key is refused before anything is restored; the receiver
/// killed before the target runs, and a target whose containerd is unreachable, leave the
/// source pod running and thawed and nothing on the target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_migration_leaves_the_pod_running_where_it_was() -> Result<()> {
    let (a, b, image, key) = two_nodes("migfault")?;
    let wrong = a.dir.join("wrong.key");
    a.stasisctl_ok(&["migrate", "keygen", "--output", wrong.to_str().unwrap()])?;
    let mut cri_a = a.cri().await?;
    let pod = pod_config("stayer", &a.dir.join("logs"));
    let pod_id = cri_a.run_pod(&pod).await?;
    let id = cri_a
        .run_container(
            &pod_id,
            &pod,
            container_config("app", image, &["sh", "-c", &counter_loop("/counter")]),
        )
        .await?;
    wait_counter_moving(&mut cri_a, &id, "/counter").await?;
    let b_before = b.settled_footprint().await?;
    let still_here = |cri: &mut stasis_e2e::cri::CriClient, what: &'static str| {
        let mut cri = cri.clone();
        let (pod_id, id) = (pod_id.clone(), id.clone());
        async move {
            let state = pod_freezer_state(&pod_id, &id)?;
            ensure!(state == "THAWED", "{what}: the source container is {state}");
            let now = read_counter(&mut cri, &id, "/counter").await?;
            wait_counter_above(&mut cri, &id, "/counter", now)
                .await
                .with_context(|| format!("{what}: the source pod does not run on"))
        }
    };

    // A peer without the key.
    let mut recv = listener(&b, &key, &[], 1)?;
    let out = migrate(&a, "stayer", &recv.addr, &wrong, &[])?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success(),
        "a migration with the wrong key succeeded"
    );
    ensure!(
        err.contains("key") || err.contains("closed the connection"),
        "the wrong key is not named: {err}"
    );
    recv.log
        .recv_timeout(Duration::from_secs(10))
        .ok()
        .filter(|l| l.contains("refused"))
        .context("the listener does not say it refused the peer")?;
    let _ = recv.child.kill();
    let _ = recv.child.wait();
    still_here(&mut cri_a, "wrong key").await?;
    b.expect_footprint(b_before).await.context("wrong key")?;

    // The receiver killed while the pod is being captured for it.
    let mut recv = listener(&b, &key, &[], 1)?;
    let sender = a
        .stasisctl_command()?
        .args(["pod", "migrate", "stayer", "--to", &recv.addr, "--key-file"])
        .arg(&key)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    loop {
        let line = recv
            .log
            .recv_timeout(Duration::from_secs(30))
            .context("the listener never saw the pod coming")?;
        if line.contains("receiving pod") {
            break;
        }
    }
    let _ = recv.child.kill();
    let _ = recv.child.wait();
    let out = sender.wait_with_output()?;
    ensure!(
        !out.status.success(),
        "the migration succeeded although its receiver was killed"
    );
    eprintln!("receiver killed: {}", String::from_utf8_lossy(&out.stderr));
    still_here(&mut cri_a, "receiver killed").await?;
    b.expect_footprint(b_before)
        .await
        .context("receiver killed: the target is not clean")?;

    // The target's containerd unreachable.
    let recv = listener_at(&b, Some("/nonexistent/containerd.sock"), &key, &[], 1)?;
    let out = migrate(&a, "stayer", &recv.addr, &key, &[])?;
    let err = String::from_utf8_lossy(&out.stderr);
    let _ = recv.child.wait_with_output();
    ensure!(
        !out.status.success(),
        "a migration into no containerd succeeded"
    );
    ensure!(
        err.contains("could not restore") && err.contains("containerd"),
        "the error does not say the target's containerd failed: {err}"
    );
    still_here(&mut cri_a, "containerd unreachable").await?;
    b.expect_footprint(b_before).await?;

    // A target whose policy is narrower than the source's: its log files go to kubelet's
    // directory only, and this pod's logs are elsewhere. Refused there, before anything is
    // created, listing the item; the pod runs on here.
    let narrow = b.policy_file(
        "narrow.json",
        serde_json::json!({"log_directory_prefixes": ["/var/log/pods"]}),
    )?;
    let narrow_arg = narrow.display().to_string();
    let recv = listener(&b, &key, &["--policy", &narrow_arg], 1)?;
    let out = migrate(&a, "stayer", &recv.addr, &key, &[])?;
    let err = String::from_utf8_lossy(&out.stderr);
    let _ = recv.child.wait_with_output();
    ensure!(
        !out.status.success()
            && err.contains("container app: log file")
            && err.contains("written by containerd"),
        "a migration into a node whose policy refuses the pod's log file: {err}"
    );
    still_here(&mut cri_a, "narrow target policy").await?;
    b.expect_footprint(b_before)
        .await
        .context("narrow target policy")?;

    // The encrypted stream changed on the way (one byte flipped well past the handshake, by
    // a relay between the nodes): the target notices, restores nothing; the pod runs on.
    let recv = listener(&b, &key, &[], 1)?;
    let relay = tampering_relay(&recv.addr, 32 * 1024)?;
    let out = migrate(&a, "stayer", &relay.0, &key, &[])?;
    let err = String::from_utf8_lossy(&out.stderr);
    let _ = recv.child.wait_with_output();
    let said: Vec<String> = recv.log.try_iter().collect();
    let flipped = relay
        .1
        .join()
        .map_err(|_| anyhow::anyhow!("relay panicked"))?;
    ensure!(flipped, "the relay never reached the byte to flip");
    ensure!(
        !out.status.success(),
        "a migration whose stream was changed on the way succeeded"
    );
    eprintln!("tampered stream: sender: {err}; listener: {said:?}");
    ensure!(
        err.contains("could not restore the pod")
            && err.contains("a frame failed authentication: the stream was changed or cut"),
        "the sender is not told that the stream failed its authentication at the target: {err}"
    );
    still_here(&mut cri_a, "tampered stream").await?;
    b.expect_footprint(b_before)
        .await
        .context("tampered stream: the target is not clean")?;

    // A target whose policy names trusted signers takes only signed migrations.
    let signing = a.dir.join("sign.pem");
    a.stasisctl_ok(&[
        "key",
        "generate",
        "--type",
        "signing",
        "--output",
        signing.to_str().unwrap(),
    ])?;
    let strict = b.policy_file(
        "signed-only.json",
        serde_json::json!({"trusted_signers": a.dir.join("sign.pem.pub")}),
    )?;
    let strict_arg = strict.display().to_string();
    let recv = listener(&b, &key, &["--policy", &strict_arg], 1)?;
    let out = migrate(&a, "stayer", &recv.addr, &key, &[])?;
    let err = String::from_utf8_lossy(&out.stderr);
    let _ = recv.child.wait_with_output();
    ensure!(
        !out.status.success() && err.contains("not signed"),
        "an unsigned migration was taken by a node that requires signatures: {err}"
    );
    still_here(&mut cri_a, "unsigned").await?;
    b.expect_footprint(b_before).await?;
    let recv = listener(&b, &key, &["--policy", &strict_arg], 1)?;
    let signing_arg = signing.display().to_string();
    let out = migrate(
        &a,
        "stayer",
        &recv.addr,
        &key,
        &["--sign-key", &signing_arg],
    )?;
    let _ = recv.child.wait_with_output();
    ensure!(
        out.status.success(),
        "a signed migration was refused: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let moved = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let mut cri_b = b.cri().await?;
    cri_b.stop_and_remove_pod(&moved).await?;
    a.finish()?;
    b.finish()
}

/// A gVisor pod (one image of the whole sandbox) moves the same way, there and back (with
/// `--lazy`), and lands under the runtime handler it ran under without being told.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gvisor_pod_moves_too() -> Result<()> {
    let (a, b, image, key) = two_nodes("miggv")?;
    let mut cri_a = a.cri().await?;
    let mut cri_b = b.cri().await?;
    let pod = pod_config("gvmover", &a.dir.join("logs"));
    let pod_id = cri_a.run_pod_with(&pod, "stasis-gvisor").await?;
    let id = cri_a
        .run_container(
            &pod_id,
            &pod,
            container_config("app", image, &["sh", "-c", &counter_loop("/counter")]),
        )
        .await?;
    wait_counter_moving(&mut cri_a, &id, "/counter").await?;
    let before = read_counter(&mut cri_a, &id, "/counter").await?;
    let recv = listener(&b, &key, &[], 1)?;
    let out = migrate(&a, "gvmover", &recv.addr, &key, &[])?;
    let _ = recv.child.wait_with_output();
    ensure!(
        out.status.success(),
        "gVisor migration failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let new_pod = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let status = cri_b
        .runtime
        .pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: new_pod.clone(),
            verbose: false,
        })
        .await?
        .into_inner()
        .status
        .context("pod status")?;
    ensure!(
        status.runtime_handler == "stasis-gvisor",
        "the pod landed under {:?}",
        status.runtime_handler
    );
    let (_, new_id, _) = containers_by_name(&mut cri_b, &new_pod)
        .await?
        .first()
        .context("restored container")?
        .clone();
    let now = read_counter(&mut cri_b, &new_id, "/counter").await?;
    ensure!(now >= before, "the counter went back: {before} -> {now}");
    wait_counter_above(&mut cri_b, &new_id, "/counter", now).await?;
    ensure!(
        containers_by_name(&mut cri_a, &pod_id)
            .await
            .map(|l| l.is_empty())
            .unwrap_or(true),
        "the source pod is still there"
    );
    // And back with --lazy (this runsc has no background restore: it restores eagerly and
    // says so).
    let recv = listener(&a, &key, &[], 1)?;
    let out = migrate(&b, "gvmover", &recv.addr, &key, &["--lazy"])?;
    let _ = recv.child.wait_with_output();
    ensure!(
        out.status.success(),
        "lazy gVisor migration failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let back = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let (_, back_id, _) = containers_by_name(&mut cri_a, &back)
        .await?
        .first()
        .context("container moved back")?
        .clone();
    let again = read_counter(&mut cri_a, &back_id, "/counter").await?;
    ensure!(again >= now, "the counter went back: {now} -> {again}");
    wait_counter_above(&mut cri_a, &back_id, "/counter", again).await?;
    ensure!(
        containers_by_name(&mut cri_b, &new_pod)
            .await
            .map(|l| l.is_empty())
            .unwrap_or(true),
        "the pod is still on the second node"
    );
    cri_a.stop_and_remove_pod(&back).await?;
    a.finish()?;
    b.finish()
}

/// 512 MiB of random bytes in a process's memory arrive whole: the process's own checksum of
/// its memory is the same after the move.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_a_gib_of_memory_arrives_intact() -> Result<()> {
    let (a, b, image, key) = two_nodes("migmem")?;
    let mut cri_a = a.cri().await?;
    let mut cri_b = b.cri().await?;
    let pod = pod_config("memory", &a.dir.join("logs"));
    let pod_id = cri_a.run_pod(&pod).await?;
    let hog = stasis_e2e::cri::checksum_hog(512);
    let id = cri_a
        .run_container(
            &pod_id,
            &pod,
            container_config("hog", image, &["sh", "-c", &hog]),
        )
        .await?;
    stasis_e2e::cri::wait_ready(&mut cri_a, &id, "/ready", Duration::from_secs(120)).await?;
    let before = stasis_e2e::cri::memory_sum(&mut cri_a, &id).await?;
    let recv = listener(&b, &key, &[], 1)?;
    let out = migrate(&a, "memory", &recv.addr, &key, &[])?;
    let _ = recv.child.wait_with_output();
    ensure!(
        out.status.success(),
        "migration failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    let new_pod = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let (_, new_id, _) = containers_by_name(&mut cri_b, &new_pod)
        .await?
        .first()
        .context("restored container")?
        .clone();
    let after = stasis_e2e::cri::memory_sum(&mut cri_b, &new_id).await?;
    ensure!(
        after == before,
        "the memory changed in transit: md5 {before} -> {after}"
    );
    cri_b.stop_and_remove_pod(&new_pod).await?;
    a.finish()?;
    b.finish()
}

/// Peers without the key cannot hold the door: connections that trickle a byte every few
/// seconds (or send a huge greeting) are dropped at the handshake deadline, while a real
/// migration with the key is answered meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_peers_without_the_key_do_not_stall_the_listener() -> Result<()> {
    let (a, b, image, key) = two_nodes("migstall")?;
    let mut cri_a = a.cri().await?;
    let pod = pod_config("patient", &a.dir.join("logs"));
    let pod_id = cri_a.run_pod(&pod).await?;
    let id = cri_a
        .run_container(
            &pod_id,
            &pod,
            container_config("app", image, &["sh", "-c", &counter_loop("/counter")]),
        )
        .await?;
    wait_counter_moving(&mut cri_a, &id, "/counter").await?;
    let recv = listener(&b, &key, &[], 1)?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut trickles = Vec::new();
    for _ in 0..2 {
        let (addr, stop) = (recv.addr.clone(), stop.clone());
        trickles.push(std::thread::spawn(move || -> std::io::Result<()> {
            use std::io::Write;
            let mut s = std::net::TcpStream::connect(&addr)?;
            s.write_all(&[0, 48])?;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if s.write_all(&[0]).is_err() {
                    break; // dropped by the listener, as it should be
                }
                std::thread::sleep(Duration::from_secs(2));
            }
            Ok(())
        }));
    }
    {
        use std::io::Write;
        let mut huge = std::net::TcpStream::connect(&recv.addr)?;
        huge.write_all(&[0xff, 0xff])?;
        let _ = huge.write_all(&vec![0u8; 4096]);
    }
    std::thread::sleep(Duration::from_millis(500));
    let started = std::time::Instant::now();
    // Bounded: a listener held by the trickling peers would never answer.
    let mut sender = a
        .stasisctl_command()?
        .args([
            "pod",
            "migrate",
            "patient",
            "--to",
            &recv.addr,
            "--key-file",
        ])
        .arg(&key)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let status = loop {
        if let Some(status) = sender.try_wait()? {
            break status;
        }
        if started.elapsed() > Duration::from_secs(120) {
            let _ = sender.kill();
            let _ = sender.wait();
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            anyhow::bail!("the migration behind slow peers did not finish in 120 s");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let mut err = String::new();
    if let Some(mut e) = sender.stderr.take() {
        std::io::Read::read_to_string(&mut e, &mut err)?;
    }
    ensure!(
        status.success(),
        "the migration behind slow peers failed: {err}"
    );
    // The trickling peers keep trickling until the listener drops them at its deadline.
    let mut refused = Vec::new();
    while let Ok(l) = recv.log.recv_timeout(Duration::from_secs(20)) {
        if l.contains("refused") {
            refused.push(l);
        }
        if refused.len() >= 3 {
            break;
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    ensure!(
        refused.iter().any(|l| l.contains("handshake message"))
            && refused.iter().filter(|l| l.contains("too long")).count() >= 2,
        "the listener did not drop the slow and oversized peers: {refused:?}"
    );
    eprintln!(
        "migrated behind two trickling peers in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    for t in trickles {
        let _ = t.join();
    }
    let listened = recv.child.wait_with_output()?;
    let new_pod = String::from_utf8_lossy(&listened.stdout).trim().to_string();
    let mut cri_b = b.cri().await?;
    cri_b.stop_and_remove_pod(&new_pod).await?;
    a.finish()?;
    b.finish()
}

/// A post-copy test's pod on the source: a memory hog ("big") and a counter, with the hog's
/// own checksum of its memory and the counter's value before the move.
struct HogPod {
    id: String,
    big: String,
    counter: String,
    sum: String,
    count: u64,
}

/// Starts the pod `name` (a hog of `mib` MiB and a moving counter) on `node`.
async fn hog_pod(
    node: &Containerd,
    cri: &mut CriClient,
    image: &str,
    name: &str,
    mib: u64,
) -> Result<HogPod> {
    let hog = stasis_e2e::cri::checksum_hog(mib);
    let logs = node.dir.join("logs");
    let (id, big, counter) =
        stasis_e2e::cri::hog_and_counter_pod(cri, &logs, image, name, &hog).await?;
    wait_counter_moving(cri, &counter, "/counter").await?;
    let sum = stasis_e2e::cri::memory_sum(cri, &big).await?;
    let count = read_counter(cri, &counter, "/counter").await?;
    Ok(HogPod {
        id,
        big,
        counter,
        sum,
        count,
    })
}

/// `pod migrate POD --to ADDR --post-copy` from `node`, running (its stderr piped).
fn post_copy_sender(
    node: &Containerd,
    pod: &str,
    to: &str,
    key: &Path,
) -> Result<std::process::Child> {
    Ok(node
        .stasisctl_command()?
        .args([
            "pod",
            "migrate",
            pod,
            "--to",
            to,
            "--post-copy",
            "--key-file",
        ])
        .arg(key)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?)
}

/// After a failed post-copy (`what`): the source pod runs on thawed, its counter moving and
/// its memory as it was.
async fn source_runs_on(cri: &mut CriClient, pod: &HogPod, what: &str) -> Result<()> {
    for id in [&pod.big, &pod.counter] {
        let state = pod_freezer_state(&pod.id, id)?;
        ensure!(
            state == "THAWED",
            "{what}: the source container {id} is {state}"
        );
    }
    let now = read_counter(cri, &pod.counter, "/counter").await?;
    wait_counter_above(cri, &pod.counter, "/counter", now).await?;
    let after = stasis_e2e::cri::memory_sum(cri, &pod.big).await?;
    ensure!(
        after == pod.sum,
        "{what}: the source's memory changed: md5 {} -> {after}",
        pod.sum
    );
    Ok(())
}

/// Post-copy: a pod of a 128 MiB memory hog and a counter moves while its memory stays on
/// the source; the target runs it before the pages cross, and once every page is in the
/// hog's own checksum of its memory is what it was, the counter went on from memory, and the
/// source pod is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_moves_post_copy_with_its_memory_intact() -> Result<()> {
    let (a, b, image, key) = two_nodes("postcopy")?;
    let mut cri_a = a.cri().await?;
    let mut cri_b = b.cri().await?;
    let pod = hog_pod(&a, &mut cri_a, image, "postcopy", 128).await?;
    let recv = listener(&b, &key, &[], 1)?;
    let out = migrate(&a, &pod.id, &recv.addr, &key, &["--post-copy"])?;
    let listened = recv.child.wait_with_output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.success(), "post-copy migration failed: {err}");
    ensure!(listened.status.success(), "the listener failed");
    eprintln!("{err}");
    let new_pod = String::from_utf8_lossy(&out.stdout).trim().to_string();
    ensure!(
        String::from_utf8_lossy(&listened.stdout).trim() == new_pod,
        "the listener restored another pod than the sender reports"
    );
    ensure!(
        containers_by_name(&mut cri_a, &pod.id)
            .await
            .map(|l| l.is_empty())
            .unwrap_or(true),
        "the source pod still has containers"
    );
    let restored = containers_by_name(&mut cri_b, &new_pod).await?;
    ensure!(restored.len() == 2, "restored {restored:?}");
    for (name, id, state) in &restored {
        ensure!(
            *state == cri::ContainerState::ContainerRunning as i32,
            "{name} is not running on the target"
        );
        if name == "big" {
            let after = stasis_e2e::cri::memory_sum(&mut cri_b, id).await?;
            ensure!(
                after == pod.sum,
                "the memory changed in transit: md5 {} -> {after}",
                pod.sum
            );
        } else {
            let now = read_counter(&mut cri_b, id, "/counter").await?;
            ensure!(
                now >= pod.count,
                "the counter went back: {} -> {now}",
                pod.count
            );
            wait_counter_above(&mut cri_b, id, "/counter", now).await?;
            let v = violations(&mut cri_b, id).await?;
            ensure!(v.is_empty(), "{name}: {v}");
        }
    }
    cri_b.stop_and_remove_pod(&new_pod).await?;
    a.finish()?;
    b.finish()
}

/// Post-copy's fault: the connection cut while the pages cross (the target's pod already
/// runs). The target's pod is removed, the source pod runs on thawed with its memory as it
/// was, and nothing of the migration is left on either node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_copy_cut_mid_pages_leaves_the_pod_running_on_the_source() -> Result<()> {
    let (a, b, image, key) = two_nodes("postcut")?;
    let mut cri_a = a.cri().await?;
    let pod = hog_pod(&a, &mut cri_a, image, "postcut", 128).await?;
    let b_before = b.settled_footprint().await?;
    let recv = listener(&b, &key, &[], 1)?;
    // Cut once 32 MiB went from the source to the target: the files are far smaller, so
    // the target's pod runs and is fetching its pages.
    let (relay, cut) = cutting_relay(&recv.addr, 32 << 20)?;
    let out = migrate(&a, &pod.id, &relay, &key, &["--post-copy"])?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(cut.join().unwrap_or(false), "the relay never cut: {err}");
    ensure!(!out.status.success(), "a cut post-copy migration succeeded");
    eprintln!("cut mid-pages: {err}");
    ensure!(
        err.contains("runs on"),
        "the error does not say the pod runs on: {err}"
    );
    let _ = recv.child.wait_with_output();
    source_runs_on(&mut cri_a, &pod, "cut mid-pages").await?;
    b.expect_footprint(b_before)
        .await
        .context("the target is not clean after the cut")?;
    cri_a.stop_and_remove_pod(&pod.id).await?;
    a.finish()?;
    b.finish()
}

/// Post-copy's faults while the pages cross (the target's pod already runs): the target's
/// `migrate listen` killed, the target pod's shim killed, the source's `pod migrate` killed.
/// Each time the source pod runs on thawed with its memory as it was (without waiting for the
/// hold's bound), and the target is left as it was before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_copy_faults_on_the_target_leave_the_pod_running_on_the_source() -> Result<()> {
    let (a, b, image, key) = two_nodes("postfault")?;
    let mut cri_a = a.cri().await?;
    let pod = hog_pod(&a, &mut cri_a, image, "postfault", 256).await?;
    let b_before = b.settled_footprint().await?;
    for fault in ["listener killed", "target shim killed", "sender killed"] {
        let mut recv = listener(&b, &key, &[], 1)?;
        let mut sender = post_copy_sender(&a, &pod.id, &recv.addr, &key)?;
        // "pod <id> runs after N ms; its pages come from …": the pages are crossing now.
        let target_pod = migration::target_runs(&recv.log, Duration::from_secs(60))
            .with_context(|| format!("{fault}: the target's pod never ran"))?;
        if fault == "listener killed" {
            let _ = recv.child.kill();
        } else if fault == "sender killed" {
            // CRIU's connections close with it: the shim thaws the pod without waiting for
            // its hold's bound.
            let _ = sender.kill();
            let _ = sender.wait();
            let _ = recv.child.wait();
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            while pod_freezer_state(&pod.id, &pod.big)? != "THAWED" {
                ensure!(
                    std::time::Instant::now() < deadline,
                    "{fault}: the source pod is still frozen after 20 s"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        } else {
            let shim = migration::kill_pod_shim(&b, &target_pod);
            ensure!(shim.len() == 1, "{fault}: the target pod's shim: {shim:?}");
        }
        if fault != "sender killed" {
            let out = sender.wait_with_output()?;
            let _ = recv.child.wait();
            let err = String::from_utf8_lossy(&out.stderr);
            eprintln!("{fault}: {err}");
            ensure!(!out.status.success(), "{fault}: the migration succeeded");
            ensure!(
                err.contains("runs on"),
                "{fault}: the error does not say the pod runs on: {err}"
            );
        }
        source_runs_on(&mut cri_a, &pod, fault).await?;
        b.expect_footprint(b_before)
            .await
            .with_context(|| format!("{fault}: the target is not clean"))?;
    }
    cri_a.stop_and_remove_pod(&pod.id).await?;
    a.finish()?;
    b.finish()
}

/// Post-copy with the source's pod shim killed while the pages cross: CRIU still holds every
/// page in its pipes and the pages flow between it and stasisctl directly, so the move
/// completes: the pod runs on the target with its memory whole, and the source pod is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_copy_survives_the_source_shim_dying_mid_pages() -> Result<()> {
    let (a, b, image, key) = two_nodes("postsrc")?;
    let mut cri_a = a.cri().await?;
    let mut cri_b = b.cri().await?;
    let pod = hog_pod(&a, &mut cri_a, image, "postsrc", 256).await?;
    let recv = listener(&b, &key, &[], 1)?;
    let sender = post_copy_sender(&a, &pod.id, &recv.addr, &key)?;
    migration::target_runs(&recv.log, Duration::from_secs(60))
        .context("the target's pod never ran")?;
    let shim = migration::kill_pod_shim(&a, &pod.id);
    ensure!(shim.len() == 1, "the source pod's shim: {shim:?}");
    let out = sender.wait_with_output()?;
    let _ = recv.child.wait_with_output();
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("{err}");
    ensure!(
        out.status.success(),
        "the move failed with its source shim killed: {err}"
    );
    let new_pod = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let restored = containers_by_name(&mut cri_b, &new_pod).await?;
    let (_, new_big, _) = restored
        .iter()
        .find(|(n, _, _)| n == "big")
        .context("big on the target")?
        .clone();
    let after = stasis_e2e::cri::memory_sum(&mut cri_b, &new_big).await?;
    ensure!(
        after == pod.sum,
        "the memory changed in transit: md5 {} -> {after}",
        pod.sum
    );
    ensure!(
        cri_a.pods().await?.is_empty(),
        "the source pod is still there"
    );
    cri_b.stop_and_remove_pod(&new_pod).await?;
    a.finish()?;
    b.finish()
}

/// A TCP relay on loopback to `to` for one connection that flips the byte at offset `at` of
/// what the sender sends; returns its address and whether the flip happened.
fn tampering_relay(to: &str, at: u64) -> Result<(String, std::thread::JoinHandle<bool>)> {
    migration::meddling_relay(to, at, Meddle::Flip)
}

/// A TCP relay on loopback to `to` for one connection that cuts it both ways once the
/// sender sent `at` bytes (post-copy's pages flow from the sender); returns its address and
/// whether it cut.
fn cutting_relay(to: &str, at: u64) -> Result<(String, std::thread::JoinHandle<bool>)> {
    migration::meddling_relay(to, at, Meddle::Cut)
}
