//! What an operator sees of stasis on a node: its events on containerd's event service
//! (`stasisctl events`) and the Prometheus endpoint (`stasisctl metrics serve`) that counts
//! them, checked against a real pod checkpoint, a failed one and a restore.

use std::{
    collections::HashMap,
    io::{BufRead, Read, Write},
    process::{Child, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;
use stasis_e2e::{
    cri::{counter_pod, counter_pod_in, hog_and_counter_pod},
    Containerd,
};

/// A child process killed when the test ends, however it ends.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `stasisctl events --format json`, its lines as they come.
fn follow_events(c: &Containerd) -> Result<(Killed, mpsc::Receiver<Value>)> {
    let mut child = c
        .stasisctl_command()?
        .args(["events", "--format", "json"])
        .stdout(Stdio::piped())
        .spawn()?;
    let stdout = child.stdout.take().context("events stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let Ok(v) = serde_json::from_str::<Value>(&line) else {
                eprintln!("not JSON from stasisctl events: {line}");
                continue;
            };
            if tx.send(v).is_err() {
                break;
            }
        }
    });
    Ok((Killed(child), rx))
}

/// Every event that arrives within `wait` after the last, until one has `phase` for `pod_id`.
fn events_until(rx: &mpsc::Receiver<Value>, pod_id: &str, phase: &str) -> Result<Vec<Value>> {
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let v = rx
            .recv_timeout(left)
            .with_context(|| format!("no {phase} event of pod {pod_id}; saw {seen:#?}"))?;
        let done = v["pod_id"] == pod_id && v["phase"] == phase;
        seen.push(v);
        if done {
            return Ok(seen);
        }
    }
}

/// The samples of `/metrics` at `addr`, by their full name with labels.
fn scrape(addr: &str) -> Result<HashMap<String, f64>> {
    let mut conn = std::net::TcpStream::connect(addr)?;
    write!(
        conn,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    conn.read_to_string(&mut text)?;
    ensure!(text.starts_with("HTTP/1.1 200"), "scrape: {text}");
    let mut samples = HashMap::new();
    for line in text.lines().filter(|l| l.starts_with("stasis_")) {
        if let Some((name, value)) = line.rsplit_once(' ') {
            samples.insert(name.to_string(), value.parse()?);
        }
    }
    Ok(samples)
}

fn sample(s: &HashMap<String, f64>, name: &str) -> f64 {
    s.get(name).copied().unwrap_or(0.0)
}

const FINISHED: &str = r#"stasis_checkpoints_total{result="finished",engine="runc"}"#;
const FAILED: &str = r#"stasis_checkpoints_total{result="failed",engine="runc"}"#;
const RESTORED: &str = r#"stasis_restores_total{result="running",engine="runc"}"#;
const FROZEN: &str = "stasis_checkpoint_frozen_seconds_count";
const WRITTEN: &str = "stasis_checkpoint_archive_bytes_count";
const PAGES_IN: &str = "stasis_restore_pages_in_seconds_count";
const SERVED: &str = "stasis_restore_pages_served_bytes_total";
const REQUESTS: &str = "stasis_restore_page_requests_total";

/// Waits until `/metrics` shows every sample of `want` at least at its value.
fn scrape_until(addr: &str, want: &[(&str, f64)]) -> Result<HashMap<String, f64>> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = scrape(addr);
        if let Ok(s) = &s {
            if want.iter().all(|(name, v)| sample(s, name) >= *v) {
                return Ok(s.clone());
            }
        }
        if Instant::now() > deadline {
            bail!("/metrics never showed {want:?}: {s:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_checkpoint_shows_in_events_and_metrics() -> Result<()> {
    let c = Containerd::start("observe")?;
    let image = c.import_busybox_for_cri()?;
    let mut cri = c.cri().await?;
    let (pod_id, counter) = counter_pod(&mut cri, &c.dir.join("logs"), image, "observed").await?;

    let (events, rx) = follow_events(&c)?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let addr = format!("127.0.0.1:{port}");
    let metrics = Killed(
        c.stasisctl_command()?
            .args(["metrics", "serve", "--listen", &addr])
            .spawn()?,
    );
    // Both follow containerd's events from some moment on: checkpoints until each has seen
    // one whole (no fixed wait).
    let checkpoint = |dir: &str| {
        let out = c.dir.join(dir);
        c.stasisctl_ok(&[
            "pod",
            "checkpoint",
            "observed",
            "--leave-running",
            "--output",
            out.to_str().unwrap(),
        ])
    };
    let mut warm = 0;
    loop {
        warm += 1;
        ensure!(warm <= 10, "the event followers never saw a checkpoint");
        checkpoint(&format!("warm-{warm}.tar"))?;
        let whole = events_until(&rx, &pod_id, "written").is_ok();
        if whole && scrape_until(&addr, &[(WRITTEN, 1.0)]).is_ok() {
            break;
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    while rx.try_recv().is_ok() {}
    let before = scrape(&addr)?;

    // A live checkpoint: its phases in order, with what they measured.
    checkpoint("observed.tar")?;
    let seen = events_until(&rx, &pod_id, "written")?;
    let phases: Vec<&str> = seen
        .iter()
        .filter(|v| v["pod_id"] == pod_id.as_str())
        .map(|v| v["phase"].as_str().unwrap_or_default())
        .collect();
    ensure!(
        phases == ["started", "frozen", "thawed", "finished", "written"],
        "checkpoint events: {seen:#?}"
    );
    let finished = &seen[3];
    ensure!(
        finished["topic"] == "/stasis/checkpoint/finished"
            && finished["namespace"] == "k8s.io"
            && finished["container_ids"] == serde_json::json!([counter])
            && finished["frozen_ms"].as_f64() > Some(0.0)
            && finished["engine"] == "runc"
            && finished["leave_running"] == true,
        "finished: {finished}"
    );
    let size = std::fs::metadata(c.dir.join("observed.tar"))?.len();
    ensure!(
        seen[4]["bytes"] == size && seen[4]["pod_name"] == "observed",
        "written: {} (the archive has {size} bytes)",
        seen[4]
    );

    // A failed one (the output's file system is full): one event, with the reason.
    let small = c.dir.join("small");
    std::fs::create_dir_all(&small)?;
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"])
        .arg(&small)
        .status()?;
    ensure!(mounted.success(), "mount a 64 KiB tmpfs");
    let out = c.stasisctl(&[
        "pod",
        "checkpoint",
        "observed",
        "--leave-running",
        "--skip-space-check",
        "--output",
        small.join("full.tar").to_str().unwrap(),
    ]);
    let _ = std::process::Command::new("umount").arg(&small).status();
    ensure!(!out?.status.success(), "a checkpoint onto 64 KiB succeeded");
    let seen = events_until(&rx, &pod_id, "failed")?;
    let failed = seen.last().unwrap();
    // The shim's log lines of the failed operation carry the pod, the operation and the
    // container (logfmt, as containerd relays them).
    let log = c.log_tail(4000);
    let failure = log.lines().find(|l| {
        l.contains("level=warn")
            && l.contains(&format!("pod=\"{pod_id}\""))
            && l.contains("op=\"pod-checkpoint\"")
            && l.contains("dump failed")
    });
    ensure!(
        failure.is_some(),
        "no log line of the failed checkpoint with its pod and operation:\n{}",
        log.lines()
            .filter(|l| l.contains("dump failed"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    ensure!(
        failed["error"]
            .as_str()
            .is_some_and(|e| e.contains("dump failed") && e.contains(&counter)),
        "failed: {failed}"
    );

    // A lazy restore: the new pod runs. From an uncompressed archive, its pages come through
    // the shim's page server, which counts what it sends. (An eager restore of a pod this
    // small copies its pages in, checked, without a page server.)
    let archive = c.dir.join("observed.tar");
    let restored = c
        .stasisctl_ok(&[
            "pod",
            "restore",
            archive.to_str().unwrap(),
            "--name",
            "back",
            "--lazy",
            "--wait-pages",
        ])?
        .trim()
        .to_string();
    let mut seen = events_until(&rx, &restored, "running")?;
    ensure!(
        seen.last().unwrap()["operation"] == "restore",
        "restore events: {seen:#?}"
    );
    let is_pages_in = |v: &Value| v["pod_id"] == restored.as_str() && v["phase"] == "pages-in";
    // Whether the last page comes in before or after the pod is said to run is a race.
    if !seen.iter().any(is_pages_in) {
        seen.extend(events_until(&rx, &restored, "pages-in")?);
    }
    let pages_in = seen
        .iter()
        .find(|v| is_pages_in(v))
        .with_context(|| format!("no pages-in event: {seen:#?}"))?;
    let (served, requests) = (
        pages_in["bytes"].as_u64().unwrap_or(0),
        pages_in["page_requests"].as_u64().unwrap_or(0),
    );
    ensure!(
        served >= 4096 && served % 4096 == 0 && requests > 0,
        "pages-in: {pages_in}"
    );

    // The endpoint counted exactly these.
    let after = scrape_until(
        &addr,
        &[
            (FINISHED, sample(&before, FINISHED) + 1.0),
            (FAILED, sample(&before, FAILED) + 1.0),
            (RESTORED, sample(&before, RESTORED) + 1.0),
            (PAGES_IN, sample(&before, PAGES_IN) + 1.0),
        ],
    )?;
    for (name, more) in [
        (FINISHED, 1.0),
        (FAILED, 1.0),
        (RESTORED, 1.0),
        (FROZEN, 1.0),
        (WRITTEN, 1.0),
        (PAGES_IN, 1.0),
        (SERVED, served as f64),
        (REQUESTS, requests as f64),
    ] {
        ensure!(
            sample(&after, name) == sample(&before, name) + more,
            "{name}: {} before, {} after",
            sample(&before, name),
            sample(&after, name)
        );
    }

    // A stopping checkpoint asked of the shim with no hold (a caller that will not finish
    // it): the shim stops the pod once its output is synced, and says so after `finished`.
    let out = c.dir.join("stopping");
    std::fs::create_dir(&out)?;
    let client = stasis_controller::shim::checkpoint_client(
        &c.socket().display().to_string(),
        "k8s.io",
        &restored,
        "stasis",
    )
    .await?;
    let req = stasis_api::checkpoint::CheckpointPodRequest {
        sandbox_id: restored.clone(),
        output_path: out.display().to_string(),
        options: Some(stasis_api::checkpoint::CheckpointOptions {
            leave_running: false,
            hold_secs: 0,
            ..Default::default()
        })
        .into(),
        ..Default::default()
    };
    client
        .checkpoint_pod(ttrpc::context::with_timeout(120_000_000_000), &req)
        .await?;
    let seen = events_until(&rx, &restored, "stopped")?;
    let phases: Vec<&str> = seen
        .iter()
        .filter(|v| v["pod_id"] == restored.as_str() && v["operation"] == "checkpoint")
        .map(|v| v["phase"].as_str().unwrap_or_default())
        .collect();
    ensure!(
        phases.first() == Some(&"started") && phases.ends_with(&["finished", "stopped"]),
        "stopping checkpoint events: {phases:?}"
    );

    drop((events, metrics));
    cri.stop_and_remove_pod(&restored).await?;
    cri.stop_and_remove_pod(&pod_id).await?;
    c.finish()
}

/// `stasisctl … --format json`: every stdout line one JSON object.
fn json_lines(stdout: &[u8]) -> Result<Vec<Value>> {
    String::from_utf8_lossy(stdout)
        .lines()
        .map(|l| serde_json::from_str(l).with_context(|| format!("not a JSON line: {l}")))
        .collect()
}

/// Progress events: time never runs back, a phase's byte count never shrinks, and the last
/// line is the one result.
fn check_progress(lines: &[Value]) -> Result<()> {
    let mut elapsed = 0.0;
    let mut done: HashMap<String, u64> = HashMap::new();
    for (i, v) in lines.iter().enumerate() {
        let e = v["elapsed_ms"].as_f64().context("elapsed_ms")?;
        ensure!(e >= elapsed, "time ran back at line {i}: {lines:#?}");
        elapsed = e;
        if let Some(d) = v["done"].as_u64() {
            let before = done.entry(v["phase"].to_string()).or_default();
            ensure!(d >= *before, "bytes shrank at line {i}: {lines:#?}");
            *before = d;
        }
        let last = i + 1 == lines.len();
        ensure!(
            (v["phase"] == "result") == last,
            "the result is not the one last line: {lines:#?}"
        );
    }
    Ok(())
}

/// `pod restore … --format json` of the 128 MiB pod's uncompressed `archive`, lazily waiting
/// for its pages and eagerly: the memory coming in is counted up to all of it (what the
/// shims' page servers sent); eagerly from a zstd copy, the archive's bytes read (checked,
/// then unpacked) are counted. Every restored pod is removed again.
async fn restores_report_unpacking_and_pages(
    c: &Containerd,
    cri: &mut stasis_e2e::cri::CriClient,
    archive: &std::path::Path,
) -> Result<()> {
    let restore = |from: &std::path::Path, name: &str, extra: &[&str]| -> Result<Vec<Value>> {
        let mut args = vec!["pod", "restore", from.to_str().unwrap(), "--name", name];
        args.extend(extra);
        args.extend(["--format", "json"]);
        let out = c.stasisctl(&args)?;
        ensure!(
            out.status.success(),
            "restore {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let lines = json_lines(&out.stdout)?;
        check_progress(&lines)?;
        Ok(lines)
    };
    // Lazily (pages counted after the pod runs), then eagerly (pages counted before it runs:
    // the page server fills the held containers).
    for (name, extra) in [
        ("progress-lazy", &["--lazy", "--wait-pages"][..]),
        ("progress-paged", &[][..]),
    ] {
        let lines = restore(archive, name, extra)?;
        let last = last_count(&lines, "pages")?;
        let running = lines.iter().position(|v| v["phase"] == "running");
        let first_pages = lines.iter().position(|v| v["phase"] == "pages");
        let in_order = match extra.is_empty() {
            true => running.is_none() && first_pages.is_some(),
            false => running.is_some() && running < first_pages,
        };
        ensure!(
            last["total"].as_u64() > Some(120 << 20) && last["done"] == last["total"] && in_order,
            "{name} progress: {lines:#?}"
        );
        cri.stop_and_remove_pod(&restored_pod(&lines)?).await?;
    }

    let zst = c.dir.join("progress.tar.zst");
    c.stasisctl_ok(&[
        "pod",
        "checkpoint",
        "progress",
        "--leave-running",
        "--compress",
        "zstd",
        "--output",
        zst.to_str().unwrap(),
    ])?;
    let size = std::fs::metadata(&zst)?.len();
    let lines = restore(&zst, "progress-eager", &[])?;
    let last = last_count(&lines, "unpacking")?;
    ensure!(
        last["total"].as_u64() == Some(2 * size)
            && last["done"].as_u64() >= Some(size)
            && last["done"].as_u64() <= Some(2 * size),
        "eager restore progress ({size} bytes archive): {lines:#?}"
    );
    cri.stop_and_remove_pod(&restored_pod(&lines)?).await?;
    Ok(())
}

/// The last byte count of `phase` among progress `lines`.
fn last_count<'a>(lines: &'a [Value], phase: &str) -> Result<&'a Value> {
    lines
        .iter()
        .rfind(|v| v["phase"] == phase && v["done"].is_u64())
        .with_context(|| format!("no {phase} progress: {lines:#?}"))
}

/// The restored pod a restore's `result` line names.
fn restored_pod(lines: &[Value]) -> Result<String> {
    let result = lines.last().context("no result")?;
    Ok(result["pod_id"].as_str().context("pod_id")?.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_progress_is_json_lines_and_ctrl_c_leaves_the_pod_running() -> Result<()> {
    let c = Containerd::start("progress")?;
    let image = c.import_busybox_for_cri()?;
    let mut cri = c.cri().await?;
    // Random memory: gzip cannot make short work of it, so the writing lasts.
    let hog = stasis_e2e::cri::checksum_hog(128);
    let (pod_id, _, counter) =
        hog_and_counter_pod(&mut cri, &c.dir.join("logs"), image, "progress", &hog).await?;

    // A checkpoint reported as JSON lines, in order, ending with its result; stasisctl's log
    // (asked for on stderr) names the operation and the pod on every line of it.
    let archive = c.dir.join("progress.tar");
    let out = c
        .stasisctl_command()?
        .env("STASIS_LOG", "debug")
        .args([
            "pod",
            "checkpoint",
            "progress",
            "--leave-running",
            "--format",
            "json",
            "--output",
            archive.to_str().unwrap(),
        ])
        .output()?;
    let log = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.success(), "{log}");
    ensure!(
        log.lines().any(|l| l.contains("DEBUG")
            && l.contains(&format!("checkpoint{{pod=progress pod_id={pod_id}}}"))
            && l.contains("phase=\"checkpointing\"")),
        "no log line of the checkpoint with its pod:\n{log}"
    );
    eprintln!("{}", String::from_utf8_lossy(&out.stdout));
    let lines = json_lines(&out.stdout)?;
    check_progress(&lines)?;
    let phases: Vec<&str> = lines
        .iter()
        .map(|v| v["phase"].as_str().unwrap_or_default())
        .collect();
    let mut order = phases.clone();
    order.dedup();
    ensure!(
        order == ["checkpointing", "captured", "writing", "written", "result"],
        "phases: {phases:?}"
    );
    let size = std::fs::metadata(&archive)?.len();
    let writing: Vec<&Value> = lines.iter().filter(|v| v["phase"] == "writing").collect();
    let last_writing = writing.last().unwrap();
    // The total is the staged files' size; the tar adds its headers (well under 2% here).
    let (done, total) = (
        last_writing["done"].as_u64().unwrap_or(0),
        last_writing["total"].as_u64().unwrap_or(0),
    );
    ensure!(
        total > 128 << 20 && done >= total && done <= total + total / 50,
        "the writing did not end at its total: {writing:#?}"
    );
    let result = lines.last().unwrap();
    ensure!(
        result["ok"] == true
            && result["bytes"] == size
            && result["pod_id"] == pod_id.as_str()
            && result["containers"].as_array().map(Vec::len) == Some(2)
            && result["frozen_ms"].as_f64() > Some(0.0),
        "result: {result} (the archive has {size} bytes)"
    );

    restores_report_unpacking_and_pages(&c, &mut cri, &archive).await?;

    // Ctrl-C while the archive is being written: the pod runs on, nothing is left there.
    let cut = c.dir.join("cut.tar.gz");
    let mut child = c
        .stasisctl_command()?
        .args([
            "pod",
            "checkpoint",
            "progress",
            "--leave-running",
            "--compress",
            "gzip",
            "--format",
            "json",
            "--output",
            cut.to_str().unwrap(),
        ])
        .stdout(Stdio::piped())
        .spawn()?;
    let mut reader = std::io::BufReader::new(child.stdout.take().context("stdout")?);
    let mut seen = Vec::new();
    loop {
        let mut line = String::new();
        ensure!(
            reader.read_line(&mut line)? > 0,
            "no writing phase before the end: {seen:#?}"
        );
        let v: Value = serde_json::from_str(&line)?;
        let writing = v["phase"] == "writing";
        seen.push(v);
        if writing {
            break;
        }
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )?;
    let mut rest = Vec::new();
    reader.read_to_end(&mut rest)?;
    let status = child.wait()?;
    seen.extend(json_lines(&rest)?);
    check_progress(&seen)?;
    let result = seen.last().unwrap();
    ensure!(
        !status.success()
            && result["ok"] == false
            && result["error"]
                .as_str()
                .is_some_and(|e| e.contains("interrupted by SIGINT")),
        "after SIGINT: {status}, {result}"
    );
    let left: Vec<_> = std::fs::read_dir(&c.dir)?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("cut.tar"))
        .collect();
    ensure!(left.is_empty(), "left after SIGINT: {left:?}");
    ensure!(
        stasis_e2e::cri::pod_frozen_containers(&pod_id).is_empty(),
        "frozen after SIGINT: {:?}",
        stasis_e2e::cri::pod_frozen_containers(&pod_id)
    );
    let before = stasis_e2e::cri::read_counter(&mut cri, &counter, "/counter").await?;
    stasis_e2e::cri::wait_counter_above(&mut cri, &counter, "/counter", before).await?;

    // An unknown pod: one result line, naming it.
    let out = c.stasisctl(&[
        "pod",
        "checkpoint",
        "no-such-pod",
        "--format",
        "json",
        "--output",
        c.dir.join("none.tar").to_str().unwrap(),
    ])?;
    let lines = json_lines(&out.stdout)?;
    ensure!(
        !out.status.success()
            && lines.len() == 1
            && lines[0]["ok"] == false
            && lines[0]["error"]
                .as_str()
                .is_some_and(|e| e.contains("\"no-such-pod\" not found")),
        "unknown pod: {lines:#?}"
    );
    cri.stop_and_remove_pod(&pod_id).await?;
    c.finish()
}

/// `checkpoint ls --format json` of the test's store.
fn stored(c: &Containerd, store: &str, extra: &[&str]) -> Result<Vec<Value>> {
    let mut args = vec!["checkpoint", "ls", "--format", "json", "--store-dir", store];
    args.extend(extra);
    Ok(serde_json::from_str::<Vec<Value>>(&c.stasisctl_ok(&args)?)?)
}

fn locations(list: &[Value]) -> Vec<String> {
    list.iter()
        .map(|v| v["location"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_store_lists_removes_and_prunes() -> Result<()> {
    let c = Containerd::start("store")?;
    let image = c.import_busybox_for_cri()?;
    let mut cri = c.cri().await?;
    let mut pods = Vec::new();
    for name in ["web", "db"] {
        pods.push(
            counter_pod(&mut cri, &c.dir.join("logs"), image, name)
                .await?
                .0,
        );
    }
    // A pod of the same name in another Kubernetes namespace: a pod of its own to the store.
    pods.push(
        counter_pod_in(&mut cri, &c.dir.join("logs"), image, "shop", "web")
            .await?
            .0,
    );
    let store = c.dir.join("store");
    let store_s = store.to_str().unwrap();
    let checkpoint = |pod: &str, extra: &[&str]| {
        let mut args = vec!["pod", "checkpoint", pod, "--leave-running"];
        args.extend(extra);
        c.stasisctl_ok(&args)
    };
    // Oldest first: an archive of shop/web, an image of default/web, then three archives of
    // default/web, two of db (one of them compressed and signed).
    checkpoint("shop/web", &["--store", "--store-dir", store_s])?;
    checkpoint("default/web", &["--image", "localhost/ckpt/web:1"])?;
    for _ in 0..3 {
        checkpoint("default/web", &["--store", "--store-dir", store_s])?;
    }
    let key = c.dir.join("sign.pem");
    c.stasisctl_ok(&[
        "key",
        "generate",
        "--type",
        "signing",
        "-o",
        key.to_str().unwrap(),
    ])?;
    checkpoint("db", &["--store", "--store-dir", store_s])?;
    checkpoint(
        "db",
        &[
            "--store",
            "--store-dir",
            store_s,
            "--compress",
            "zstd",
            "--sign-key",
            key.to_str().unwrap(),
        ],
    )?;

    let all = stored(&c, store_s, &[])?;
    ensure!(all.len() == 7, "ls: {all:#?}");
    // Newest first, each as the store holds it.
    let times: Vec<u64> = all
        .iter()
        .map(|v| v["created_ms"].as_u64().unwrap_or(0))
        .collect();
    ensure!(
        times.windows(2).all(|w| w[0] >= w[1]),
        "not newest first: {all:#?}"
    );
    for v in &all {
        let loc = v["location"].as_str().unwrap_or_default();
        if let Some(reference) = loc.strip_prefix("image:") {
            ensure!(
                reference == "localhost/ckpt/web:1"
                    && v["pod_name"] == "web"
                    && v["pod_namespace"] == "default"
                    && v["engine"] == "runc",
                "image entry: {v}"
            );
            continue;
        }
        let path = store.join(loc);
        let meta = std::fs::symlink_metadata(&path)?;
        ensure!(
            v["bytes"] == meta.len()
                && v["engine"] == "runc"
                && loc.starts_with(&format!(
                    "{}_{}/",
                    v["pod_namespace"].as_str().unwrap_or("?"),
                    v["pod_name"].as_str().unwrap_or("?")
                )),
            "store entry: {v}"
        );
        use std::os::unix::fs::PermissionsExt;
        ensure!(
            meta.permissions().mode() & 0o077 == 0,
            "{loc} is not private"
        );
    }
    let db = stored(&c, store_s, &["--pod", "db"])?;
    ensure!(
        db.len() == 2
            && db[0]["signed"] == true
            && db[0]["location"]
                .as_str()
                .is_some_and(|l| l.ends_with(".tar.zst"))
            && db[1]["signed"] == false,
        "db: {db:#?}"
    );

    // rm: a hostile name changes nothing; a real one goes with its record.
    for bad in [
        "../store/web",
        "/etc/passwd",
        "web/../db",
        "image:no/such:1",
    ] {
        let out = c.stasisctl(&["checkpoint", "rm", "--store-dir", store_s, bad])?;
        ensure!(!out.status.success(), "rm {bad} succeeded");
    }
    ensure!(
        stored(&c, store_s, &[])?.len() == 7,
        "a refused rm removed something"
    );
    // A name alone is that name in every namespace; NAMESPACE/NAME one pod.
    let shop = stored(&c, store_s, &["--pod", "shop/web"])?;
    ensure!(
        shop.len() == 1
            && shop[0]["pod_namespace"] == "shop"
            && stored(&c, store_s, &["--pod", "web"])?.len() == 5,
        "shop/web: {shop:#?}"
    );
    let oldest_db = db[1]["location"].as_str().unwrap().to_string();
    // A good name beside a bad one: refused as a whole, the good one kept.
    let out = c.stasisctl(&[
        "checkpoint",
        "rm",
        "--store-dir",
        store_s,
        &oldest_db,
        "image:no/such:1",
    ])?;
    ensure!(
        !out.status.success() && store.join(&oldest_db).exists(),
        "rm of a good and a bad name removed the good one"
    );
    c.stasisctl_ok(&["checkpoint", "rm", "--store-dir", store_s, &oldest_db])?;
    ensure!(
        !store.join(&oldest_db).exists() && !store.join(format!("{oldest_db}.json")).exists(),
        "rm left {oldest_db}"
    );

    // prune: nothing is older than an hour; keep the newest two of default/web: the oldest
    // archive and the image go, shop/web's one stays.
    let out = c.stasisctl_ok(&[
        "checkpoint",
        "prune",
        "--store-dir",
        store_s,
        "--older-than",
        "1h",
    ])?;
    ensure!(out.trim().is_empty(), "pruned fresh checkpoints: {out}");
    let web = stored(&c, store_s, &["--pod", "default/web"])?;
    let dry = c.stasisctl_ok(&[
        "checkpoint",
        "prune",
        "--store-dir",
        store_s,
        "--pod",
        "web",
        "--keep-last",
        "2",
        "--include-images",
        "--dry-run",
    ])?;
    ensure!(
        stored(&c, store_s, &["--pod", "default/web"])?.len() == 4,
        "a dry run removed: {dry}"
    );
    c.stasisctl_ok(&[
        "checkpoint",
        "prune",
        "--store-dir",
        store_s,
        "--pod",
        "web",
        "--keep-last",
        "2",
        "--include-images",
    ])?;
    let left = stored(&c, store_s, &[])?;
    ensure!(
        // db's were taken last, shop/web's first: newest first.
        locations(&left)
            == [
                locations(&db)[..1].to_vec(),
                locations(&web)[..2].to_vec(),
                locations(&shop),
            ]
            .concat(),
        "after prune: {:?} (web was {:?})",
        locations(&left),
        locations(&web)
    );
    ensure!(
        c.ctr_k8s(&["images", "ls", "-q"])
            .map(|o| !String::from_utf8_lossy(&o.stdout).contains("localhost/ckpt/web:1"))?,
        "the pruned image is still in containerd"
    );
    // What is left restores.
    let newest = store.join(left[1]["location"].as_str().unwrap());
    let restored = c
        .stasisctl_ok(&[
            "pod",
            "restore",
            newest.to_str().unwrap(),
            "--name",
            "web-back",
        ])?
        .trim()
        .to_string();
    cri.stop_and_remove_pod(&restored).await?;
    for p in pods {
        cri.stop_and_remove_pod(&p).await?;
    }
    c.finish()
}
