//! Lazy local restore: containers run before their memory is in; CRIU's lazy-pages daemon
//! serves pages over userfaultfd and pulls the rest in the background.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use stasis_e2e::{
    cri::{
        checksum_hog, container_config, containers_by_name, counter_loop, memory_sum, pod_config,
        read_counter, violations, wait_counter_above, wait_counter_moving, wait_ready,
    },
    Containerd,
};

/// A pod with 512 MiB of random memory and a counter, checkpointed live into an uncompressed
/// archive and restored with `--lazy`: the memory's own checksum is the same, the counter
/// continues, the lazy-pages daemon did serve the restore with pages read from the archive
/// itself, and nothing of it is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lazy_restore_brings_every_page_back() -> Result<()> {
    let c = Containerd::start("lazy")?;
    let image = c.import_busybox_for_cri()?;
    let mut cri = c.cri().await?;
    let pod = pod_config("lazy", &c.dir.join("logs"));
    let pod_id = cri.run_pod(&pod).await?;
    let hog = cri
        .run_container(
            &pod_id,
            &pod,
            container_config("hog", image, &["sh", "-c", &checksum_hog(512)]),
        )
        .await?;
    let counter = cri
        .run_container(
            &pod_id,
            &pod,
            container_config("counter", image, &["sh", "-c", &counter_loop("/counter")]),
        )
        .await?;
    wait_ready(&mut cri, &hog, "/ready", Duration::from_secs(120)).await?;
    wait_counter_moving(&mut cri, &counter, "/counter").await?;
    let before = memory_sum(&mut cri, &hog).await?;
    let archive = c.dir.join("lazy.tar");
    c.stasisctl_ok(&[
        "pod",
        "checkpoint",
        "lazy",
        "--leave-running",
        "--output",
        archive.to_str().unwrap(),
    ])?;
    let counted = read_counter(&mut cri, &counter, "/counter").await?;
    cri.stop_and_remove_pod(&pod_id).await?;

    // Lazy, seen from outside: while the restore still runs, the restored hog answers an exec
    // with most of its memory not yet in, and a `criu lazy-pages` daemon is serving it.
    let mut child = c
        .stasisctl_command()?
        .args([
            "pod",
            "restore",
            archive.to_str().unwrap(),
            "--lazy",
            "--wait-pages",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let early = first_look_at_the_hog(&mut cri, &mut child).await;
    let out = child.wait_with_output()?;
    let (rss_kib, daemons) = early?;
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!(
        "first exec in the restored hog: VmRSS {rss_kib} KiB, lazy-pages daemons {daemons:?}"
    );
    ensure!(
        rss_kib < 256 << 10 && !daemons.is_empty(),
        "not lazy: the restored hog ran first with {rss_kib} KiB resident of its 512 MiB, lazy-pages daemons then: {daemons:?}"
    );
    ensure!(out.status.success(), "lazy restore failed: {err}");
    eprintln!("{err}");
    ensure!(
        err.contains("every page in after"),
        "the restore reports no time to the last page: {err}"
    );
    let new_pod = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let restored = containers_by_name(&mut cri, &new_pod).await?;
    let id_of = |name: &str| {
        restored
            .iter()
            .find(|(n, _, _)| n == name)
            .map(|(_, id, _)| id.clone())
            .with_context(|| format!("no {name} in {restored:?}"))
    };
    let (hog, counter) = (id_of("hog")?, id_of("counter")?);
    // The shim's own account, as `pod pages` shows it: both containers have every page.
    let pages = c.stasisctl_ok(&["pod", "pages", &new_pod])?;
    ensure!(
        pages.lines().filter(|l| l.contains("all in, ")).count() == 2,
        "pod pages after --wait-pages: {pages}"
    );
    // The restore was served by a lazy-pages daemon (its log is in the restore work dir).
    let log = c
        .dir
        .join("state/io.containerd.runtime.v2.task/k8s.io")
        .join(&hog)
        .join("criu-restore-work/lazy-pages.log");
    let text = std::fs::read_to_string(&log)
        .with_context(|| format!("no lazy-pages log at {}", log.display()))?;
    ensure!(!text.is_empty(), "the lazy-pages log is empty");
    // The archive is uncompressed: pages came from it, not from an unpacked copy.
    ensure!(
        c.log_tail(100_000).lines().any(|l| l.contains(&hog)
            && l.contains("page requests")
            && l.contains(archive.to_str().unwrap())),
        "the shim served no pages from the archive: {}",
        c.log_about(std::slice::from_ref(&hog), 20)
    );
    let after = memory_sum(&mut cri, &hog).await?;
    ensure!(after == before, "memory changed: md5 {before} -> {after}");
    let now = read_counter(&mut cri, &counter, "/counter").await?;
    ensure!(now >= counted, "the counter went back: {counted} -> {now}");
    wait_counter_above(&mut cri, &counter, "/counter", now).await?;
    let v = violations(&mut cri, &counter).await?;
    ensure!(v.is_empty(), "{v}");
    ensure!(
        !stasis_e2e::processes_matching(&["criu", "lazy-pages"])
            .iter()
            .any(|p| std::fs::read_to_string(format!("/proc/{p}/cmdline"))
                .map(|c| c.contains(&new_pod) || c.contains(&hog))
                .unwrap_or(false)),
        "a lazy-pages daemon is left"
    );
    cri.stop_and_remove_pod(&new_pod).await?;
    c.finish()
}

/// Polls, while the lazy restore `child` runs, for the restored pod's hog container to answer
/// an exec; returns its VmRSS (KiB) then and the `criu lazy-pages` daemons alive
/// both before and after that exec.
async fn first_look_at_the_hog(
    cri: &mut stasis_e2e::cri::CriClient,
    child: &mut std::process::Child,
) -> Result<(u64, Vec<i32>)> {
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        ensure!(
            std::time::Instant::now() < deadline,
            "no restored hog answered within 120 s"
        );
        if let Some(status) = child.try_wait()? {
            anyhow::bail!("the lazy restore ended ({status}) before its hog was seen running");
        }
        let pods = cri.pods().await?;
        for pod in pods {
            let running = containers_by_name(cri, &pod.id).await?;
            let Some((_, hog, _)) = running
                .iter()
                .find(|(n, _, state)| n == "hog" && *state == 1)
            else {
                continue;
            };
            let before = lazy_daemons();
            // Refused while the shim holds the container until its whole pod is restored.
            let Ok((0, out, _)) = cri.exec(hog, &["grep", "VmRSS", "/proc/1/status"]).await else {
                continue;
            };
            let after = lazy_daemons();
            let kib = out
                .split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
                .with_context(|| format!("VmRSS of the hog: {out:?}"))?;
            let both = before.into_iter().filter(|p| after.contains(p)).collect();
            return Ok((kib, both));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn lazy_daemons() -> Vec<i32> {
    stasis_e2e::processes_matching(&["criu", "lazy-pages"])
}

/// A byte of a page image changed inside an uncompressed archive: the lazy restore reads
/// pages from the archive and checks each chunk against the manifest, so the change is
/// caught when its chunk is needed; the container never runs on with memory that is not its
/// own, the restore fails naming what happened, and no pod is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_page_in_the_archive_stops_the_lazy_restore() -> Result<()> {
    let c = Containerd::start("lazy-tamper")?;
    let image = c.import_busybox_for_cri()?;
    let mut cri = c.cri().await?;
    let pod = pod_config("tamper", &c.dir.join("logs"));
    let pod_id = cri.run_pod(&pod).await?;
    let hog = cri
        .run_container(
            &pod_id,
            &pod,
            container_config("hog", image, &["sh", "-c", &checksum_hog(64)]),
        )
        .await?;
    wait_ready(&mut cri, &hog, "/ready", Duration::from_secs(60)).await?;
    let archive = c.dir.join("tamper.tar");
    c.stasisctl_ok(&[
        "pod",
        "checkpoint",
        "tamper",
        "--output",
        archive.to_str().unwrap(),
    ])?;
    cri.stop_and_remove_pod(&pod_id).await?;
    change_a_page(&archive, &archive)?;

    let out = c.stasisctl(&[
        "pod",
        "restore",
        archive.to_str().unwrap(),
        "--lazy",
        "--wait-pages",
    ])?;
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("{err}");
    ensure!(
        !out.status.success(),
        "a changed archive was restored: {err}"
    );
    ensure!(
        err.contains("stopped before all of its memory was restored")
            || err.contains("does not match the archive's manifest"),
        "the error does not say what happened: {err}"
    );
    let pods = cri.pods().await?;
    ensure!(
        pods.is_empty(),
        "pods left after the failed restore: {:?}",
        pods.iter().map(|p| &p.id).collect::<Vec<_>>()
    );
    // Without --wait-pages the command may return once the pod runs, before the changed
    // chunk is read; then the restore's watchdog, which waits for the pages, finds the
    // failure and removes the pod. Either way no pod is left and nothing of the restore.
    let out = c.stasisctl(&["pod", "restore", archive.to_str().unwrap(), "--lazy"])?;
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("{err}");
    if out.status.success() {
        ensure!(
            err.contains("its memory is still coming in"),
            "a returning lazy restore says nothing of its pages: {err}"
        );
    } else {
        ensure!(
            err.contains("stopped before all of its memory was restored")
                || err.contains("does not match the archive's manifest"),
            "the error does not say what happened: {err}"
        );
    }
    wait_restore_watchdogs_gone(&c).await?;
    let pods = cri.pods().await?;
    ensure!(
        pods.is_empty(),
        "the watchdog left the pod whose pages failed: {:?}",
        pods.iter().map(|p| &p.id).collect::<Vec<_>>()
    );
    c.finish()
}

/// Waits (up to 120 s) until no restore watchdog of this containerd runs: a lazy restore
/// that returned at running leaves one waiting for its pages.
async fn wait_restore_watchdogs_gone(c: &Containerd) -> Result<()> {
    let socket = c.socket().display().to_string();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let left = stasis_e2e::processes_matching(&["__restore-guard", &socket]);
        if left.is_empty() {
            return Ok(());
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "restore watchdogs still running after 120 s: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `pod checkpoint --output DIR/` writes the unpacked layout (private, with its manifest);
/// a lazy restore from that directory reads the pages from its own page images (nothing
/// copied that grows with memory) and the memory comes back whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_directory_restores_lazily_from_its_own_files() -> Result<()> {
    let c = Containerd::start("lazy-dir")?;
    let image = c.import_busybox_for_cri()?;
    let mut cri = c.cri().await?;
    let (pod_id, _, before) = hog_pod(&mut cri, &c, image, "lazydir", 128).await?;
    let dir = c.dir.join("checkpoint-dir");
    c.stasisctl_ok(&[
        "pod",
        "checkpoint",
        "lazydir",
        "--output",
        &format!("{}/", dir.display()),
    ])?;
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&dir)?.permissions().mode() & 0o777;
    ensure!(
        mode == 0o700,
        "the checkpoint directory is {mode:o}, not 0700"
    );
    ensure!(
        dir.join("manifest.json").is_file() && dir.join("pod.options").is_file(),
        "the directory lacks the archive layout"
    );
    cri.stop_and_remove_pod(&pod_id).await?;
    let out = c.stasisctl(&["pod", "restore", dir.to_str().unwrap(), "--lazy"])?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.success(),
        "lazy restore from a directory failed: {err}"
    );
    ensure!(
        err.contains("its memory is still coming in"),
        "the restore did not return at running: {err}"
    );
    let new_pod = String::from_utf8_lossy(&out.stdout).trim().to_string();
    // Returned at running: its watchdog waits for the pages; `pod pages --wait` answers
    // once they are in, with the time it took.
    let pages = c.stasisctl_ok(&["pod", "pages", &new_pod, "--wait"])?;
    ensure!(
        pages
            .lines()
            .any(|l| l.starts_with("hog ") && l.contains("all in, ")),
        "pod pages --wait: {pages}"
    );
    wait_restore_watchdogs_gone(&c).await?;
    let (_, hog, _) = containers_by_name(&mut cri, &new_pod)
        .await?
        .into_iter()
        .find(|(n, _, _)| n == "hog")
        .context("no hog restored")?;
    let after = memory_sum(&mut cri, &hog).await?;
    ensure!(after == before, "memory changed: md5 {before} -> {after}");
    ensure!(
        c.log_tail(100_000).lines().any(|l| l.contains(&hog)
            && l.contains("page requests")
            && l.contains(dir.to_str().unwrap())),
        "the shim served no pages from the directory: {}",
        c.log_about(std::slice::from_ref(&hog), 20)
    );
    cri.stop_and_remove_pod(&new_pod).await?;
    c.finish()
}

/// An eager restore (no `--lazy`) from an uncompressed archive takes its pages from the
/// archive through the shim's page server, and resumes the pod only once every page is in:
/// the hog's memory comes back whole, the shim served its pages from the archive's bytes,
/// and `pod pages` says they were all in. A changed page in a copy of the archive fails that
/// restore and leaves no pod.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_eager_restore_reads_its_pages_from_the_archive_before_the_pod_runs() -> Result<()> {
    let c = Containerd::start("eager-pages")?;
    let mut cri = c.cri().await?;
    let (archive, before) = eager_archive_of_a_hog(&c, &mut cri, "eager", 128).await?;

    let (new_pod, hog) = restore_eagerly(&c, &mut cri, &archive).await?;
    let log = served_from(&c, &hog, archive.to_str().unwrap())?;
    ensure!(
        log.lines()
            .any(|l| l.contains("every page of") && l.contains(&hog) && l.contains("resuming")),
        "the pod was not resumed after its pages: {}",
        c.log_about(std::slice::from_ref(&hog), 20)
    );
    let pages = c.stasisctl_ok(&["pod", "pages", &new_pod])?;
    ensure!(
        pages
            .lines()
            .any(|l| l.starts_with("hog ") && l.contains("all in, ")),
        "pod pages after an eager restore: {pages}"
    );
    let after = memory_sum(&mut cri, &hog).await?;
    ensure!(after == before, "memory changed: md5 {before} -> {after}");
    cri.stop_and_remove_pod(&new_pod).await?;
    c.finish()
}

/// An eager restore of a small pod (its lazy pages under the shim's 16 MiB mark) copies
/// those pages, each chunk checked, into the restore's images and lets CRIU restore them
/// itself: no lazy-pages daemon, no page requests, the memory back whole; a changed page
/// fails that restore and leaves no pod.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_pods_eager_restore_copies_its_checked_pages_without_a_daemon() -> Result<()> {
    let c = Containerd::start("eager-small")?;
    let mut cri = c.cri().await?;
    let (archive, before) = eager_archive_of_a_hog(&c, &mut cri, "small", 4).await?;

    let (new_pod, hog) = restore_eagerly(&c, &mut cri, &archive).await?;
    let after = memory_sum(&mut cri, &hog).await?;
    ensure!(after == before, "memory changed: md5 {before} -> {after}");
    // The shim's lines reach containerd's log a moment later; the pod's resume comes after
    // anything its page server would have said.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let log = loop {
        let log = c.log_tail(100_000);
        if log
            .lines()
            .any(|l| l.contains("resumed restored containers") && l.contains(&hog))
        {
            break log;
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "the pod's resume is not in the log: {}",
            c.log_about(std::slice::from_ref(&hog), 20)
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let about_hog: Vec<&str> = log.lines().filter(|l| l.contains(&hog)).collect();
    ensure!(
        about_hog
            .iter()
            .any(|l| l.contains("bytes of lazy pages copied")),
        "the hog's lazy pages were not copied: {}",
        c.log_about(std::slice::from_ref(&hog), 20)
    );
    ensure!(
        !about_hog
            .iter()
            .any(|l| l.contains("page requests") || l.contains("lazily restored page")),
        "a lazy-pages daemon served the small pod: {}",
        c.log_about(std::slice::from_ref(&hog), 20)
    );
    cri.stop_and_remove_pod(&new_pod).await?;
    c.finish()
}

/// A checkpoint image with uncompressed layers, restored lazily by reference: the hog's page
/// images are not unpacked but served from its layer's blob in containerd's content store
/// (each chunk checked against the manifest), and its memory comes back whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lazy_restore_from_an_image_reads_its_pages_from_containerds_store() -> Result<()> {
    let c = Containerd::start("image-pages")?;
    let image = c.import_busybox_for_cri()?;
    let mut cri = c.cri().await?;
    let (pod_id, _, before) = hog_pod(&mut cri, &c, image, "imaged", 64).await?;
    let reference = "localhost/ckpt/imaged:1";
    c.stasisctl_ok(&["pod", "checkpoint", "imaged", "--image", reference])?;
    cri.stop_and_remove_pod(&pod_id).await?;
    let out = c.stasisctl(&["pod", "restore", reference, "--lazy", "--wait-pages"])?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.success(),
        "lazy restore by reference failed: {err}"
    );
    let new_pod = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let hog = restored_hog(&mut cri, &new_pod).await?;
    let blobs = c
        .dir
        .join("root/io.containerd.content.v1.content/blobs/sha256/");
    served_from(&c, &hog, blobs.to_str().unwrap())?;
    let after = memory_sum(&mut cri, &hog).await?;
    ensure!(after == before, "memory changed: md5 {before} -> {after}");
    cri.stop_and_remove_pod(&new_pod).await?;
    let removed = c.ctr_k8s(&["images", "rm", "--sync", reference])?;
    ensure!(removed.status.success(), "remove the checkpoint image");
    c.finish()
}

/// Restores `archive` eagerly (no `--lazy`); the new pod's id and its hog container's.
async fn restore_eagerly(
    c: &Containerd,
    cri: &mut stasis_e2e::cri::CriClient,
    archive: &std::path::Path,
) -> Result<(String, String)> {
    let out = c.stasisctl(&["pod", "restore", archive.to_str().unwrap()])?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.success(), "eager restore failed: {err}");
    let new_pod = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let hog = restored_hog(cri, &new_pod).await?;
    Ok((new_pod, hog))
}

/// The id of the container named hog in restored pod `pod`.
async fn restored_hog(cri: &mut stasis_e2e::cri::CriClient, pod: &str) -> Result<String> {
    let (_, hog, _) = containers_by_name(cri, pod)
        .await?
        .into_iter()
        .find(|(n, _, _)| n == "hog")
        .context("no hog restored")?;
    Ok(hog)
}

/// The shim's log, once it shows the page server of container `id` done serving from a
/// file whose path holds `from` (containerd copies shim logs a moment later: up to 5 s).
fn served_from(c: &Containerd, id: &str, from: &str) -> Result<String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let log = c.log_tail(100_000);
        if log
            .lines()
            .any(|l| l.contains(id) && l.contains("page requests") && l.contains(from))
        {
            return Ok(log);
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "the shim served no pages of {id} from {from}: {}",
            c.log_about(&[id.to_string()], 20)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A pod named `name` with one container, `hog`, holding `mib` MiB of random memory; returns
/// the pod id, the hog's id and the MD5 of its memory.
async fn hog_pod(
    cri: &mut stasis_e2e::cri::CriClient,
    c: &Containerd,
    image: &str,
    name: &str,
    mib: u64,
) -> Result<(String, String, String)> {
    let pod = pod_config(name, &c.dir.join("logs"));
    let pod_id = cri.run_pod(&pod).await?;
    let hog = cri
        .run_container(
            &pod_id,
            &pod,
            container_config("hog", image, &["sh", "-c", &checksum_hog(mib)]),
        )
        .await?;
    wait_ready(cri, &hog, "/ready", Duration::from_secs(60)).await?;
    let before = memory_sum(cri, &hog).await?;
    Ok((pod_id, hog, before))
}

/// The archive of pod `name`, a hog of `mib` MiB (checkpointed, then removed), and the MD5
/// of the hog's memory; first checks that an eager restore of a copy with one of the hog's
/// pages changed is refused and leaves no pod.
async fn eager_archive_of_a_hog(
    c: &Containerd,
    cri: &mut stasis_e2e::cri::CriClient,
    name: &str,
    mib: u64,
) -> Result<(std::path::PathBuf, String)> {
    let image = c.import_busybox_for_cri()?;
    let (pod_id, _, before) = hog_pod(cri, c, image, name, mib).await?;
    let archive = c.dir.join(format!("{name}.tar"));
    c.stasisctl_ok(&[
        "pod",
        "checkpoint",
        name,
        "--output",
        archive.to_str().unwrap(),
    ])?;
    cri.stop_and_remove_pod(&pod_id).await?;
    let changed = c.dir.join("changed.tar");
    change_a_page_of(&archive, &changed, (mib << 20) / 2)?;
    let out = c.stasisctl(&["pod", "restore", changed.to_str().unwrap()])?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && err.contains("does not match the archive's manifest"),
        "an eager restore of a changed page of {name}: {err}"
    );
    ensure!(
        cri.pods().await?.is_empty(),
        "a pod is left after the refused restore"
    );
    std::fs::remove_file(&changed)?;
    Ok((archive, before))
}

/// Writes `archive` to `out` with one byte in the middle of its largest page image (the
/// hog's memory) flipped.
fn change_a_page(archive: &std::path::Path, out: &std::path::Path) -> Result<()> {
    change_a_page_of(archive, out, 32 << 20)
}

/// [`change_a_page`], the hog's page image being larger than `hog_bytes`.
fn change_a_page_of(
    archive: &std::path::Path,
    out: &std::path::Path,
    hog_bytes: u64,
) -> Result<()> {
    let (mut at, mut largest) = (0u64, 0u64);
    let mut tar = tar::Archive::new(std::fs::File::open(archive)?);
    for entry in tar.entries_with_seek()? {
        let entry = entry?;
        if entry.path()?.display().to_string().contains("/pages-") && entry.size() > largest {
            largest = entry.size();
            at = entry.raw_file_position() + entry.size() / 2;
        }
    }
    ensure!(
        largest > hog_bytes,
        "no page image of the hog's size in the archive"
    );
    let mut bytes = std::fs::read(archive)?;
    bytes[at as usize] ^= 0x55;
    std::fs::write(out, bytes)?;
    Ok(())
}
