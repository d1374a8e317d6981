//! The stasis demo, on a private containerd it starts and removes itself: a two-container pod
//! run through containerd's CRI with the `stasis` runtime handler (`sandboxer = "shim"`), so
//! the stasis shim owns the pod: its cgroup, its pause process and its namespaces.
//!
//!     sudo scripts/demo.sh

use std::time::Duration;

use anyhow::{Context, Result};
use stasis_e2e::{
    cri::{container_config, pod_config},
    Containerd,
};

fn step(what: &str) {
    println!("\n==> {what}");
}

#[tokio::main]
async fn main() -> Result<()> {
    if std::env::args().any(|a| a == "--help" || a == "-h") {
        println!("demo: runs a two-container pod through the stasis shim on a private containerd (needs root)");
        return Ok(());
    }
    step("starting a private containerd (own root, state, sockets and CNI network under /tmp/stasis-e2e)");
    let c = Containerd::start("demo")?;
    println!("containerd at {}", c.socket().display());
    step("building a busybox image and importing it for CRI");
    let image = c.import_busybox_for_cri()?;
    println!("{image}");

    let mut cri = c.cri().await?;
    step("RunPodSandbox with runtime handler \"stasis\"");
    let pod = pod_config("demo", &c.dir.join("logs"));
    let pod_id = cri.run_pod(&pod).await?;
    let (_, info) = cri.pod_state(&pod_id).await?;
    let info: serde_json::Value = serde_json::from_str(info.get("info").context("verbose info")?)?;
    println!("pod {pod_id}");
    println!(
        "  pause pid {}, cgroup {}, netns {}",
        info["pid"], info["cgroup"], info["netns"]
    );
    println!("  shim processes serving it: {:?}", c.shim_pids());

    step("two containers: a counter, and a reader");
    let counter = cri
        .run_container(
            &pod_id,
            &pod,
            container_config(
                "counter",
                image,
                &[
                    "sh",
                    "-c",
                    "i=0; while true; do i=$((i+1)); echo $i > /tmp/count; sleep 0.1; done",
                ],
            ),
        )
        .await?;
    let reader = cri
        .run_container(
            &pod_id,
            &pod,
            container_config("reader", image, &["sleep", "100000"]),
        )
        .await?;
    println!("counter {counter}\nreader  {reader}");
    tokio::time::sleep(Duration::from_secs(1)).await;

    step("ExecSync in each: same hostname, one PID namespace for the whole pod");
    println!(
        "counter: hostname = {}",
        cri.exec_ok(&counter, &["hostname"]).await?
    );
    println!(
        "reader:  hostname = {}",
        cri.exec_ok(&reader, &["hostname"]).await?
    );
    println!(
        "reader sees the pod's processes:\n{}",
        cri.exec_ok(&reader, &["ps", "-o", "pid,args"]).await?
    );
    println!(
        "counter's /tmp/count = {}",
        cri.exec_ok(&counter, &["cat", "/tmp/count"]).await?
    );
    println!(
        "pod IP on eth0: {}",
        cri.exec_ok(&reader, &["sh", "-c", "ip -4 addr show eth0 | grep inet"])
            .await?
    );

    step("StopPodSandbox + RemovePodSandbox");
    cri.stop_and_remove_pod(&pod_id).await?;
    c.wait_for("the shim to exit", Duration::from_secs(15), || {
        Ok(c.shim_pids().is_empty())
    })?;
    println!("done: pod removed, its shim has exited");
    Ok(())
}
