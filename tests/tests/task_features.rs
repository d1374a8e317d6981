//! Task API features the README names, each against a real containerd and runc: grouping of
//! containers under one shim, the Task service under its v2 name, kill --all, terminal
//! resize, close-io, update, shutdown, and the pause/resume/exec events.

use std::{io::Write, path::Path, process::Stdio, time::Duration};

use anyhow::{ensure, Context, Result};
use containerd_shim_protos::{
    api,
    protobuf::Message,
    ttrpc::{self, context},
};
use stasis_e2e::{
    processes_matching, shim_connection, shim_task_client, Containerd, EventWatch, STASIS_RUNTIME,
};

fn run_detached(c: &Containerd, image: &str, id: &str, extra: &[&str], cmd: &[&str]) -> Result<()> {
    let mut args = vec!["run", "-d", "--runtime", STASIS_RUNTIME];
    args.extend(extra);
    args.extend([image, id]);
    args.extend(cmd);
    c.ctr_ok(&args)?;
    c.wait_for(&format!("{id} RUNNING"), Duration::from_secs(10), || {
        Ok(c.task_status(id)?.as_deref() == Some("RUNNING"))
    })
}

fn remove(c: &Containerd, id: &str) -> Result<()> {
    c.remove_task(id)
}

fn shims_serving(c: &Containerd, id: &str) -> Vec<i32> {
    processes_matching(&[
        "containerd-shim-stasis-v2",
        &c.socket().display().to_string(),
        &format!("-id {id} "),
    ])
}

#[test]
fn containers_of_a_group_share_one_shim() -> Result<()> {
    let c = Containerd::start("group")?;
    let image = c.import_busybox()?;
    let group = ["--annotation", "io.containerd.runc.v2.group=g1"];
    run_detached(&c, image, "g-a", &group, &["sleep", "1000"])?;
    run_detached(&c, image, "g-b", &group, &["sleep", "1000"])?;
    run_detached(&c, image, "alone", &[], &["sleep", "1000"])?;
    let all = c.shim_pids();
    let grouped = shims_serving(&c, "g1");
    ensure!(
        grouped.len() == 1,
        "group g1 served by {grouped:?} (all shims {all:?})"
    );
    ensure!(
        shims_serving(&c, "alone").len() == 1 && all.len() == 2,
        "an ungrouped container gets its own shim: {all:?}"
    );
    // Both containers answer through the one shim.
    for id in ["g-a", "g-b"] {
        let address = std::fs::read_to_string(
            c.dir
                .join("state/io.containerd.runtime.v2.task")
                .join(&c.namespace)
                .join(id)
                .join("address"),
        )?;
        ensure!(
            address.contains(&shim_socket_hash(&c, "g1")),
            "{id} talks to {address}"
        );
    }
    // The group's shim stays until its last container is gone.
    remove(&c, "g-a")?;
    ensure!(
        shims_serving(&c, "g1") == grouped,
        "the shim left with one container still there"
    );
    remove(&c, "g-b")?;
    c.wait_for("the group's shim to exit", Duration::from_secs(10), || {
        Ok(shims_serving(&c, "g1").is_empty())
    })?;
    remove(&c, "alone")?;
    c.finish()
}

fn shim_socket_hash(c: &Containerd, group: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(format!("{}/{}/{group}", c.socket().display(), c.namespace));
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn the_task_service_answers_under_its_v2_name() -> Result<()> {
    let c = Containerd::start("task-v2")?;
    let image = c.import_busybox()?;
    run_detached(&c, image, "v2", &[], &["sleep", "1000"])?;
    let client = shim_connection(&c, "v2")?;
    let mut states = Vec::new();
    for service in ["containerd.task.v2.Task", "containerd.task.v3.Task"] {
        let mut req = ttrpc::Request::new();
        req.set_service(service.into());
        req.set_method("State".into());
        req.set_timeout_nano(5_000_000_000);
        req.payload = api::StateRequest {
            id: "v2".into(),
            ..Default::default()
        }
        .write_to_bytes()?;
        let resp = client
            .request(req)
            .with_context(|| format!("{service}/State"))?;
        let st = api::StateResponse::parse_from_bytes(&resp.payload)?;
        ensure!(
            st.status.enum_value_or_default() == api::Status::RUNNING && st.pid > 0,
            "{service}: {st:?}"
        );
        states.push(st.pid);
    }
    ensure!(states[0] == states[1], "v2 and v3 disagree: {states:?}");
    remove(&c, "v2")?;
    c.finish()
}

/// The descriptors of process `pid` open for writing on a file whose name ends in `suffix`.
fn fifo_writers(pid: u32, suffix: &str) -> Vec<String> {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    fds.flatten()
        .filter(|fd| {
            std::fs::read_link(fd.path()).is_ok_and(|t| t.to_string_lossy().ends_with(suffix))
        })
        .filter(|fd| {
            // fdinfo's flags are octal: O_WRONLY (1) or O_RDWR (2) in the access bits.
            let info = std::fs::read_to_string(format!(
                "/proc/{pid}/fdinfo/{}",
                fd.file_name().to_string_lossy()
            ))
            .unwrap_or_default();
            info.lines()
                .find_map(|l| l.strip_prefix("flags:"))
                .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
                .is_some_and(|f| f & 0o3 != 0)
        })
        .map(|fd| fd.file_name().to_string_lossy().into_owned())
        .collect()
}

fn alive(pid: u32) -> bool {
    // A zombie is gone for our purpose.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

#[test]
fn kill_all_reaches_every_process_and_update_changes_limits() -> Result<()> {
    let c = Containerd::start("kill-all")?;
    let image = c.import_busybox()?;
    // PID 1 of the container is a shell that has no SIGTERM handler, so SIGTERM sent to it
    // alone does nothing (the kernel spares a namespace's init); only `--all` reaches the two
    // sleeps. The loop keeps the shell alive when they go.
    run_detached(
        &c,
        image,
        "k1",
        &[],
        &[
            "sh",
            "-c",
            "sleep 1000 & sleep 1001 & while true; do sleep 1; done",
        ],
    )?;
    let client = shim_task_client(&c, "k1")?;
    // The shell starts its two sleeps right after it runs: wait for them.
    let list = || -> Result<Vec<u32>> {
        let r = client.pids(
            context::with_timeout(5_000_000_000),
            &api::PidsRequest {
                id: "k1".into(),
                ..Default::default()
            },
        )?;
        Ok(r.processes.iter().map(|p| p.pid).collect())
    };
    let long_sleeps = |pids: &[u32]| -> Vec<u32> {
        pids.iter()
            .copied()
            .filter(|p| {
                std::fs::read(format!("/proc/{p}/cmdline"))
                    .is_ok_and(|c| c.starts_with(b"sleep\x00100"))
            })
            .collect()
    };
    let mut sleeps = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while sleeps.len() < 2 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        sleeps = long_sleeps(&list()?);
    }
    ensure!(
        sleeps.len() == 2,
        "expected two long sleeps, got {sleeps:?}"
    );
    let init = client
        .state(
            context::with_timeout(5_000_000_000),
            &api::StateRequest {
                id: "k1".into(),
                ..Default::default()
            },
        )?
        .pid;

    // update (ctr 2.1 has no `tasks update`; containerd's Update reaches the shim as this):
    // a memory limit lands in the container's cgroup.
    client.update(
        context::with_timeout(5_000_000_000),
        &api::UpdateTaskRequest {
            id: "k1".into(),
            resources: protobuf::MessageField::some(protobuf::well_known_types::any::Any {
                type_url: "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources".into(),
                value: br#"{"memory":{"limit":67108864}}"#.to_vec(),
                ..Default::default()
            }),
            ..Default::default()
        },
    )?;
    let limit_file = Path::new("/sys/fs/cgroup/memory")
        .join(c.namespace.trim_start_matches('/'))
        .join("k1/memory.limit_in_bytes");
    let limit = std::fs::read_to_string(&limit_file)
        .with_context(|| format!("read {}", limit_file.display()))?;
    ensure!(limit.trim() == "67108864", "memory limit is {limit}");

    // kill --all: the background children too, not only the init.
    c.ctr_ok(&["tasks", "kill", "--all", "-s", "TERM", "k1"])?;
    c.wait_for(
        "both long sleeps of k1 gone",
        Duration::from_secs(10),
        || Ok(sleeps.iter().all(|p| !alive(*p))),
    )?;
    ensure!(
        alive(init) && c.task_status("k1")?.as_deref() == Some("RUNNING"),
        "SIGTERM ended k1's init {init}, which has no handler for it"
    );
    remove(&c, "k1")?;
    c.finish()
}

#[test]
fn resize_reaches_the_terminal_and_close_io_ends_input() -> Result<()> {
    let c = Containerd::start("tty-io")?;
    let image = c.import_busybox()?;
    // `ctr run -t` wants a console of its own even when detached.
    detached_on_a_terminal(&c, image, "t1")?;
    let client = shim_task_client(&c, "t1")?;
    client.resize_pty(
        context::with_timeout(5_000_000_000),
        &api::ResizePtyRequest {
            id: "t1".into(),
            width: 123,
            height: 45,
            ..Default::default()
        },
    )?;
    // The container's own terminal (its init's stdin) has the new size.
    let size = c.ctr_ok(&[
        "tasks",
        "exec",
        "--exec-id",
        "size",
        "t1",
        "sh",
        "-c",
        "stty size < /proc/1/fd/0",
    ])?;
    ensure!(size.trim() == "45 123", "terminal size {size:?}");
    remove(&c, "t1")?;

    // close-io: `cat` reads the task's stdin. When its client's input ends, the shim still
    // holds the stdin fifo open (a client may attach again): only CloseIO ends the input,
    // and then cat sees EOF and exits.
    let mut child = c
        .ctr_command()
        .args([
            "run",
            "--rm",
            "--runtime",
            STASIS_RUNTIME,
            image,
            "cat1",
            "cat",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut stdin = child.stdin.take().context("stdin")?;
    let stdout = child.stdout.take().context("stdout")?;
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    stdin.write_all(b"through stdin\n")?;
    drop(stdin);
    let echoed = rx
        .recv_timeout(Duration::from_secs(15))
        .context("cat echoed nothing")?;
    ensure!(echoed == "through stdin", "cat printed {echoed:?}");
    // Once ctr has closed its end of the stdin fifo, only a writer the shim holds keeps cat
    // from seeing the end of its input.
    let ctr_pid = child.id();
    c.wait_for(
        "ctr to close cat1's stdin fifo",
        Duration::from_secs(15),
        || Ok(fifo_writers(ctr_pid, "cat1-stdin").is_empty()),
    )?;
    let shim = shims_serving(&c, "cat1");
    ensure!(shim.len() == 1, "cat1's shim: {shim:?}");
    let held = fifo_writers(shim[0] as u32, "cat1-stdin");
    ensure!(
        !held.is_empty()
            && child.try_wait()?.is_none()
            && c.task_status("cat1")?.as_deref() == Some("RUNNING"),
        "the shim holds no writer of cat1's stdin fifo ({held:?}), or cat ended before CloseIO"
    );
    shim_task_client(&c, "cat1")?.close_io(
        context::with_timeout(5_000_000_000),
        &api::CloseIORequest {
            id: "cat1".into(),
            stdin: true,
            ..Default::default()
        },
    )?;
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "cat did not see the end of its input after CloseIO"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    ensure!(status.success(), "ctr run cat: {status}");
    c.finish()
}

#[test]
fn shutdown_ends_the_shim_only_when_it_serves_nothing() -> Result<()> {
    let c = Containerd::start("shutdown")?;
    let image = c.import_busybox()?;
    run_detached(&c, image, "s1", &[], &["sleep", "1000"])?;
    let shim = shims_serving(&c, "s1");
    ensure!(shim.len() == 1, "shims: {shim:?}");
    let client = shim_task_client(&c, "s1")?;
    client.shutdown(
        context::with_timeout(5_000_000_000),
        &api::ShutdownRequest {
            id: "s1".into(),
            ..Default::default()
        },
    )?;
    // The shim still serves: an exec needs it from start to end, well past the moment a
    // shim that took the Shutdown would have gone.
    let out = c.ctr_ok(&[
        "tasks",
        "exec",
        "--exec-id",
        "after",
        "s1",
        "echo",
        "served",
    ])?;
    ensure!(
        out.trim() == "served" && shims_serving(&c, "s1") == shim,
        "Shutdown with a container still there ended the shim"
    );
    ensure!(c.task_status("s1")?.as_deref() == Some("RUNNING"));
    remove(&c, "s1")?;
    c.wait_for(
        "the shim to exit after its last container",
        Duration::from_secs(10),
        || Ok(shims_serving(&c, "s1").is_empty()),
    )?;
    c.finish()
}

#[test]
fn pause_resume_and_exec_events_reach_containerd() -> Result<()> {
    let c = Containerd::start("events-more")?;
    let image = c.import_busybox()?;
    let mut events = EventWatch::start(&c, image)?;
    let mut wait_for_event = |topic: &str, id: &str| -> Result<()> {
        events.wait(topic, id, Duration::from_secs(15)).map(drop)
    };
    run_detached(&c, image, "e1", &[], &["sleep", "1000"])?;
    c.ctr_ok(&["tasks", "pause", "e1"])?;
    wait_for_event("/tasks/paused", "e1")?;
    c.ctr_ok(&["tasks", "resume", "e1"])?;
    wait_for_event("/tasks/resumed", "e1")?;
    c.ctr_ok(&["tasks", "exec", "--exec-id", "x1", "e1", "true"])?;
    wait_for_event("/tasks/exec-added", "x1")?;
    wait_for_event("/tasks/exec-started", "x1")?;
    remove(&c, "e1")?;
    c.finish()
}

/// `ctr run -d -t … sh` with ctr's own stdio on a fresh pseudo-terminal.
fn detached_on_a_terminal(c: &Containerd, image: &str, id: &str) -> Result<()> {
    let pty = nix::pty::openpty(None, None)?;
    let slave = std::fs::File::from(pty.slave);
    let status = c
        .ctr_command()
        .args([
            "run",
            "-d",
            "-t",
            "--runtime",
            STASIS_RUNTIME,
            image,
            id,
            "sh",
        ])
        .stdin(Stdio::from(slave.try_clone()?))
        .stdout(Stdio::from(slave.try_clone()?))
        .stderr(Stdio::from(slave))
        .status()?;
    ensure!(status.success(), "ctr run -d -t: {status}");
    c.wait_for(&format!("{id} RUNNING"), Duration::from_secs(10), || {
        Ok(c.task_status(id)?.as_deref() == Some("RUNNING"))
    })
}

/// `<config dir>/runc.toml` (the test's stand-in for /etc/stasis/runc.toml) is what a shim
/// selected by its binary name runs: here a wrapper that records each call and runs runc.
#[test]
fn the_engine_settings_file_is_honoured() -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let c = Containerd::start("settings-file")?;
    let image = c.import_busybox()?;
    let calls = c.dir.join("runc-calls");
    let wrapper = c.dir.join("runc-wrapper");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\necho \"$@\" >> {}\nexec runc \"$@\"\n",
            calls.display()
        ),
    )?;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755))?;
    std::fs::create_dir_all(c.config_dir())?;
    std::fs::write(
        c.config_dir().join("runc.toml"),
        format!(
            "binary = \"{}\"\nruntime_args = [\"--debug\"]\n",
            wrapper.display()
        ),
    )?;
    run_detached(&c, image, "w1", &[], &["sleep", "1000"])?;
    let log = std::fs::read_to_string(&calls).context("the wrapper was never called")?;
    ensure!(
        log.lines()
            .any(|l| l.contains("--debug") && l.contains("create") && l.ends_with("w1")),
        "no create of w1 through the configured binary with its args:\n{log}"
    );
    remove(&c, "w1")?;
    c.finish()
}
