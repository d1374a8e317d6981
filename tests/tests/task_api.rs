//! The shim as a containerd runtime for ordinary containers, driven by `ctr` against a private
//! containerd 2.x. Every assertion is on a real outcome: output, exit codes, task state, the
//! cgroup freezer, leftovers on the host.

use std::{path::Path, time::Duration};

use anyhow::{ensure, Context, Result};
use stasis_e2e::{mounts_under, processes_matching, Containerd, STASIS_RUNTIME};

fn run_args<'a>(image: &'a str, id: &'a str, cmd: &[&'a str], detach: bool) -> Vec<&'a str> {
    let mut args = vec!["run", "--runtime", STASIS_RUNTIME];
    if detach {
        args.push("-d");
    } else {
        args.push("--rm");
    }
    args.extend([image, id]);
    args.extend(cmd);
    args
}

#[test]
fn run_prints_output_and_propagates_exit_code() -> Result<()> {
    let c = Containerd::start("run-exit")?;
    let image = c.import_busybox()?;
    let out = c.ctr_ok(&run_args(image, "c1", &["echo", "hello"], false))?;
    ensure!(out.trim() == "hello", "expected hello, got {out:?}");

    let out = c.ctr(&run_args(
        image,
        "c2",
        &["sh", "-c", "echo bye >&2; exit 3"],
        false,
    ))?;
    ensure!(
        out.status.code() == Some(3),
        "ctr run should exit 3, got {:?}",
        out.status
    );
    ensure!(
        String::from_utf8_lossy(&out.stderr).contains("bye"),
        "stderr not delivered"
    );
    c.finish()
}

#[test]
fn long_running_container_lifecycle() -> Result<()> {
    let c = Containerd::start("lifecycle")?;
    let image = c.import_busybox()?;
    c.ctr_ok(&run_args(image, "l1", &["sleep", "1000"], true))?;
    c.wait_for("l1 RUNNING", Duration::from_secs(10), || {
        Ok(c.task_status("l1")?.as_deref() == Some("RUNNING"))
    })?;

    // exec: output and exit code of a second process
    let out = c.ctr(&[
        "tasks",
        "exec",
        "--exec-id",
        "e1",
        "l1",
        "sh",
        "-c",
        "echo from-exec; exit 5",
    ])?;
    ensure!(
        String::from_utf8_lossy(&out.stdout).trim() == "from-exec",
        "exec output: {out:?}"
    );
    ensure!(
        out.status.code() == Some(5),
        "exec exit code: {:?}",
        out.status
    );

    // pause / resume, and the freezer agrees
    let freezer = Path::new("/sys/fs/cgroup/freezer")
        .join(&c.namespace)
        .join("l1/freezer.state");
    // On a pure cgroup v2 host the kernel's word is `frozen 1` in cgroup.events (cgroup.freeze
    // is only what was asked).
    let events = Path::new("/sys/fs/cgroup")
        .join(&c.namespace)
        .join("l1/cgroup.events");
    let frozen = || -> Result<bool> {
        if freezer.exists() {
            Ok(std::fs::read_to_string(&freezer)?.trim() == "FROZEN")
        } else {
            Ok(std::fs::read_to_string(&events)
                .context("no freezer file")?
                .lines()
                .any(|l| l.trim() == "frozen 1"))
        }
    };
    c.ctr_ok(&["tasks", "pause", "l1"])?;
    ensure!(
        c.task_status("l1")?.as_deref() == Some("PAUSED"),
        "not PAUSED after pause"
    );
    ensure!(frozen()?, "cgroup not frozen after pause");
    c.ctr_ok(&["tasks", "resume", "l1"])?;
    ensure!(
        c.task_status("l1")?.as_deref() == Some("RUNNING"),
        "not RUNNING after resume"
    );
    ensure!(!frozen()?, "cgroup still frozen after resume");

    // ps lists the init pid; metrics come from the cgroup
    let listed = c.ctr_ok(&["tasks", "ls"])?;
    let init_pid = listed
        .lines()
        .find(|l| l.starts_with("l1 "))
        .and_then(|l| l.split_whitespace().nth(1))
        .context("l1 in ctr t ls")?
        .to_string();
    let ps = c.ctr_ok(&["tasks", "ps", "l1"])?;
    ensure!(
        ps.lines()
            .any(|l| l.split_whitespace().next() == Some(init_pid.as_str())),
        "ps: {ps}"
    );
    let metrics = c.ctr_ok(&["tasks", "metrics", "l1"])?;
    let mem = metrics
        .lines()
        .find(|l| l.starts_with("memory.usage_in_bytes") || l.starts_with("memory.usage"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse::<u64>().ok())
        .with_context(|| format!("no memory usage in metrics:\n{metrics}"))?;
    ensure!(mem > 0, "memory usage is 0");
    ensure!(metrics.contains("pids.current"), "no pids in metrics");

    // kill: the exit reaches containerd
    c.ctr_ok(&["tasks", "kill", "-s", "KILL", "l1"])?;
    c.wait_for("l1 STOPPED", Duration::from_secs(10), || {
        Ok(c.task_status("l1")?.as_deref() == Some("STOPPED"))
    })?;
    let out = c.ctr(&["tasks", "delete", "l1"])?;
    ensure!(
        String::from_utf8_lossy(&out.stderr).contains("137"),
        "exit status 137 not reported on delete: {out:?}"
    );
    c.finish()
}

#[test]
fn wait_returns_the_exit_status() -> Result<()> {
    let c = Containerd::start("wait")?;
    let image = c.import_busybox()?;
    c.ctr_ok(&run_args(
        image,
        "w1",
        &["sh", "-c", "sleep 1; exit 42"],
        true,
    ))?;
    // `ctr t attach` blocks on Task.Wait and exits with the task's status.
    let out = c.ctr(&["tasks", "attach", "w1"])?;
    ensure!(
        out.status.code() == Some(42),
        "attach/wait status: {:?}",
        out.status
    );
    // attach deletes the task once it has its status; it must not be RUNNING any more.
    ensure!(c.task_status("w1")?.as_deref() != Some("RUNNING"));
    c.finish()
}

#[test]
fn terminal_works() -> Result<()> {
    let c = Containerd::start("tty")?;
    let image = c.import_busybox()?;
    let mut cmd = c.ctr_command();
    cmd.args([
        "run",
        "-t",
        "--rm",
        "--runtime",
        STASIS_RUNTIME,
        image,
        "t1",
        "sh",
    ]);
    let (out, code) = stasis_e2e::run_on_pty(
        cmd,
        b"tty; echo answer-$((40+2)); exit 7\n",
        Duration::from_secs(20),
    )?;
    ensure!(out.contains("/dev/pts/"), "no terminal in container: {out}");
    ensure!(out.contains("answer-42"), "shell did not run input: {out}");
    ensure!(code == 7, "exit code through terminal: {code}\n{out}");
    c.finish()
}

fn cgroups_of(ns: &str) -> usize {
    ["freezer", "memory", "pids", "cpu"]
        .iter()
        .map(|h| Path::new("/sys/fs/cgroup").join(h).join(ns))
        .filter_map(|p| std::fs::read_dir(p).ok())
        .map(|d| d.flatten().filter(|e| e.path().is_dir()).count())
        .sum()
}

fn fifos_under(dir: &Path) -> usize {
    fn walk(p: &Path, n: &mut usize) {
        if let Ok(rd) = std::fs::read_dir(p) {
            for e in rd.flatten() {
                let Ok(ft) = e.file_type() else { continue };
                use std::os::unix::fs::FileTypeExt;
                if ft.is_fifo() {
                    *n += 1;
                } else if ft.is_dir() {
                    walk(&e.path(), n);
                }
            }
        }
    }
    let mut n = 0;
    walk(dir, &mut n);
    n
}

fn shim_sockets(c: &Containerd, ids: &[String]) -> Vec<String> {
    ids.iter()
        .map(|id| containerd_socket(&c.socket(), &c.namespace, id))
        .filter(|p| Path::new(p).exists())
        .collect()
}

fn containerd_socket(address: &Path, ns: &str, id: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(format!("{}/{ns}/{id}", address.display()));
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("/run/containerd/s/{hex}")
}

#[test]
fn twenty_containers_leave_nothing_behind() -> Result<()> {
    let c = Containerd::start("leaks")?;
    let image = c.import_busybox()?;
    let before = (
        c.shim_pids().len(),
        mounts_under(&c.dir).len(),
        cgroups_of(&c.namespace),
        fifos_under(&c.dir),
    );
    let mut ids: Vec<String> = (0..20).map(|i| format!("leak{i}")).collect();
    let mut retried = Vec::new();
    for id in ids.clone() {
        let out = match c.ctr_ok(&run_args(
            image,
            &id,
            &["sh", "-c", "echo $HOSTNAME"],
            false,
        )) {
            Ok(out) => out,
            // runc's init occasionally dies before its first message on this loaded 2-core
            // host ("read init-p: connection reset by peer"). The failed create must still
            // leave nothing (checked below with the others); the container is run again once.
            Err(e) if format!("{e:#}").contains("init-p") => {
                eprintln!("{id}: runc create failed transiently, running it again: {e:#}");
                let again = format!("{id}-again");
                retried.push(again.clone());
                c.ctr_ok(&run_args(
                    image,
                    &again,
                    &["sh", "-c", "echo $HOSTNAME"],
                    false,
                ))?
            }
            Err(e) => return Err(e),
        };
        ensure!(!out.trim().is_empty(), "{id}: no output");
    }
    ids.extend(retried);
    // Shims exit after their container is deleted; give the last one a moment.
    c.wait_for("shims to exit", Duration::from_secs(10), || {
        Ok(c.shim_pids().len() == before.0)
    })?;
    let after = (
        c.shim_pids().len(),
        mounts_under(&c.dir).len(),
        cgroups_of(&c.namespace),
        fifos_under(&c.dir),
    );
    ensure!(
        before == after,
        "(shims, mounts, cgroups, fifos) before {before:?} after {after:?}"
    );
    let sockets = shim_sockets(&c, &ids);
    ensure!(sockets.is_empty(), "shim sockets left: {sockets:?}");
    let runc_state: Vec<_> = ids
        .iter()
        .map(|id| stasis_shim_root(&c.namespace).join(id))
        .filter(|p| p.exists())
        .collect();
    ensure!(runc_state.is_empty(), "runc state left: {runc_state:?}");
    c.finish()
}

fn stasis_shim_root(ns: &str) -> std::path::PathBuf {
    Path::new("/run/stasis/runc").join(ns)
}

#[test]
fn survives_containerd_restart() -> Result<()> {
    let mut c = Containerd::start("restart")?;
    let image = c.import_busybox()?;
    c.ctr_ok(&run_args(image, "r1", &["sleep", "1000"], true))?;
    c.wait_for("r1 RUNNING", Duration::from_secs(10), || {
        Ok(c.task_status("r1")?.as_deref() == Some("RUNNING"))
    })?;
    let shims = c.shim_pids();
    c.restart()?;
    ensure!(
        c.task_status("r1")?.as_deref() == Some("RUNNING"),
        "r1 not RUNNING after restart"
    );
    ensure!(
        c.shim_pids() == shims,
        "the shim was replaced across the restart"
    );
    let out = c.ctr_ok(&[
        "tasks",
        "exec",
        "--exec-id",
        "after",
        "r1",
        "echo",
        "still-here",
    ])?;
    ensure!(out.trim() == "still-here", "exec after restart: {out:?}");
    c.ctr_ok(&["tasks", "kill", "-s", "KILL", "r1"])?;
    c.wait_for("r1 STOPPED", Duration::from_secs(10), || {
        Ok(c.task_status("r1")?.as_deref() == Some("STOPPED"))
    })?;
    c.ctr_ok(&["tasks", "delete", "r1"])?;
    c.ctr_ok(&["containers", "delete", "r1"])?;
    c.wait_for("shim exit", Duration::from_secs(10), || {
        Ok(c.shim_pids().is_empty())
    })?;
    c.finish()
}

#[test]
fn shim_killed_is_reported_and_cleaned_up() -> Result<()> {
    let c = Containerd::start("shimkill")?;
    let image = c.import_busybox()?;
    c.ctr_ok(&run_args(image, "k1", &["sleep", "1000"], true))?;
    c.wait_for("k1 RUNNING", Duration::from_secs(10), || {
        Ok(c.task_status("k1")?.as_deref() == Some("RUNNING"))
    })?;
    let container_pids = processes_matching(&["sleep 1000"]);
    for pid in c.shim_pids() {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )?;
    }
    // containerd notices the dead shim and runs `shim delete`, which must unmount the rootfs.
    c.wait_for(
        "k1 reported stopped and cleaned up",
        Duration::from_secs(20),
        || {
            Ok(
                matches!(c.task_status("k1")?.as_deref(), None | Some("STOPPED"))
                    && mounts_under(&c.dir).is_empty()
                    && live_in_cgroup(&container_pids, "/k1").is_empty(),
            )
        },
    )?;
    let _ = c.ctr(&["tasks", "delete", "k1"]);
    c.ctr_ok(&["containers", "delete", "k1"])?;
    c.finish()
}

/// The pids of `pids` still alive (not zombies) in a cgroup whose path contains `cgroup`.
fn live_in_cgroup(pids: &[i32], cgroup: &str) -> Vec<i32> {
    pids.iter()
        .copied()
        .filter(|p| {
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
            let state = stat
                .rsplit(')')
                .next()
                .and_then(|s| s.split_whitespace().next());
            matches!(state, Some(s) if s != "Z")
        })
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/cgroup"))
                .map(|s| s.contains(cgroup))
                .unwrap_or(false)
        })
        .collect()
}

#[test]
fn bad_input_gets_clear_errors() -> Result<()> {
    use containerd_shim_protos::{api, ttrpc};
    let c = Containerd::start("badinput")?;
    let image = c.import_busybox()?;
    c.ctr_ok(&run_args(image, "b1", &["sleep", "1000"], true))?;
    let client = stasis_e2e::shim_task_client(&c, "b1")?;
    let ctx = || ttrpc::context::with_timeout(5_000_000_000);

    // Unknown task id: NotFound from the shim itself.
    let err = client
        .state(
            ctx(),
            &api::StateRequest {
                id: "nosuch".into(),
                ..Default::default()
            },
        )
        .expect_err("state of an unknown id must fail");
    match err {
        ttrpc::Error::RpcStatus(s) => {
            ensure!(s.code() == ttrpc::Code::NOT_FOUND, "code {:?}", s.code());
            ensure!(
                s.message.contains("nosuch"),
                "message does not name the id: {}",
                s.message
            );
        }
        other => anyhow::bail!("unexpected error {other:?}"),
    }

    // A bundle whose config.json is invalid: an error naming the problem, nothing left behind.
    let bundle = c.dir.join("bad-bundle");
    std::fs::create_dir_all(bundle.join("rootfs"))?;
    std::fs::write(bundle.join("config.json"), b"{ this is not json")?;
    let err = client
        .create(
            ctx(),
            &api::CreateTaskRequest {
                id: "bad1".into(),
                bundle: bundle.display().to_string(),
                ..Default::default()
            },
        )
        .expect_err("create with an invalid config.json must fail");
    let text = format!("{err:?}");
    ensure!(
        text.contains("config.json") && text.contains("not valid JSON"),
        "error: {text}"
    );
    ensure!(text.contains("INVALID_ARGUMENT"), "error code: {text}");
    ensure!(
        !stasis_shim_root(&c.namespace).join("bad1").exists(),
        "runc state left for bad1"
    );
    ensure!(
        mounts_under(&bundle).is_empty(),
        "mounts left in bad bundle"
    );
    // The shim still serves its real container.
    let st = client.state(
        ctx(),
        &api::StateRequest {
            id: "b1".into(),
            ..Default::default()
        },
    )?;
    ensure!(
        st.status.value() == api::Status::RUNNING as i32,
        "b1 state {:?}",
        st.status
    );
    c.finish()
}

#[test]
fn events_reach_containerd_including_oom() -> Result<()> {
    let c = Containerd::start("events")?;
    let image = c.import_busybox()?;
    let mut events = stasis_e2e::EventWatch::start(&c, image)?;
    // 16 MiB limit, a 64 MiB buffer: the OOM killer must act.
    let out = c.ctr(&[
        "run",
        "--rm",
        "--runtime",
        STASIS_RUNTIME,
        "--memory-limit",
        "16777216",
        image,
        "oom1",
        "dd",
        "if=/dev/zero",
        "of=/dev/null",
        "bs=64M",
        "count=1",
    ])?;
    ensure!(
        out.status.code() == Some(137),
        "OOM-killed task should exit 137: {out:?}"
    );
    events.wait("/tasks/oom", "oom1", Duration::from_secs(15))?;
    c.ctr_ok(&run_args(image, "ev1", &["true"], false))?;
    for topic in [
        "/tasks/create",
        "/tasks/start",
        "/tasks/exit",
        "/tasks/delete",
    ] {
        events.wait(topic, "ev1", Duration::from_secs(15))?;
    }
    drop(events);
    c.finish()
}
