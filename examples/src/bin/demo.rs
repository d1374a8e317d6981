//! The stasis demo, on a private containerd it starts and removes itself: a container run
//! through `io.containerd.stasis.v2`, exec'd into, paused and resumed.
//!
//!     sudo scripts/demo.sh

use std::time::Duration;

use anyhow::Result;
use stasis_e2e::{Containerd, STASIS_RUNTIME};

fn step(what: &str) {
    println!("\n==> {what}");
}

fn main() -> Result<()> {
    if std::env::args().any(|a| a == "--help" || a == "-h") {
        println!(
            "demo: runs a container through the stasis shim on a private containerd (needs root)"
        );
        return Ok(());
    }
    step("starting a private containerd (its own root, state and sockets under /tmp/stasis-e2e)");
    let c = Containerd::start("demo")?;
    println!("containerd at {}", c.socket().display());
    step("building a busybox image and importing it");
    let image = c.import_busybox()?;
    println!("{image}");

    step(&format!(
        "ctr run --rm --runtime {STASIS_RUNTIME} {image} hello echo hello from stasis"
    ));
    print!(
        "{}",
        c.ctr_ok(&[
            "run",
            "--rm",
            "--runtime",
            STASIS_RUNTIME,
            image,
            "hello",
            "echo",
            "hello from stasis"
        ])?
    );

    step("a long-running counter container");
    c.ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        STASIS_RUNTIME,
        image,
        "counter",
        "sh",
        "-c",
        "i=0; while true; do i=$((i+1)); echo $i > /tmp/count; sleep 0.1; done",
    ])?;
    std::thread::sleep(Duration::from_secs(1));
    print!("{}", c.ctr_ok(&["tasks", "ls"])?);
    step("exec into it: cat /tmp/count");
    print!(
        "{}",
        c.ctr_ok(&[
            "tasks",
            "exec",
            "--exec-id",
            "peek",
            "counter",
            "cat",
            "/tmp/count"
        ])?
    );

    step("pause: the cgroup freezer stops the counter");
    c.ctr_ok(&["tasks", "pause", "counter"])?;
    let a = c.ctr_ok(&["tasks", "ls"])?;
    print!("{a}");
    std::thread::sleep(Duration::from_secs(1));
    c.ctr_ok(&["tasks", "resume", "counter"])?;
    step("resumed");
    std::thread::sleep(Duration::from_millis(500));
    print!(
        "{}",
        c.ctr_ok(&[
            "tasks",
            "exec",
            "--exec-id",
            "peek2",
            "counter",
            "cat",
            "/tmp/count"
        ])?
    );

    step("metrics from the container's cgroup");
    for line in c.ctr_ok(&["tasks", "metrics", "counter"])?.lines().take(6) {
        println!("{line}");
    }
    step("kill and clean up");
    c.ctr_ok(&["tasks", "kill", "-s", "KILL", "counter"])?;
    std::thread::sleep(Duration::from_millis(300));
    let _ = c.ctr(&["tasks", "delete", "counter"]);
    c.ctr_ok(&["containers", "delete", "counter"])?;
    c.wait_for("the shim to exit", Duration::from_secs(10), || {
        Ok(c.shim_pids().is_empty())
    })?;
    println!("done: the container is gone and its shim has exited");
    Ok(())
}
