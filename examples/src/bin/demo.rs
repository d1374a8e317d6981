//! The stasis demo, on a private containerd it starts and removes itself: a two-container pod
//! run through containerd's CRI with the `stasis` runtime handler (`sandboxer = "shim"`),
//! checkpointed live with `stasisctl`, removed, restored as a new pod, and shown continuing
//! from its memory state.
//!
//!     sudo scripts/demo.sh [--handler stasis-gvisor]

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
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("demo [--handler stasis|stasis-gvisor|stasis-crun]: runs a two-container pod through the stasis shim on a private containerd, checkpoints it live and restores it (needs root)");
        return Ok(());
    }
    let handler = stasis_examples::flag(&args, "--handler").unwrap_or_else(|| "stasis".into());
    let handler = handler.as_str();
    step("starting a private containerd (own root, state, sockets and CNI network under /tmp/stasis-e2e)");
    let c = Containerd::start("demo")?;
    println!("containerd at {}", c.socket().display());
    step("building a busybox image and importing it for CRI");
    let image = c.import_busybox_for_cri()?;
    println!("{image}");

    let mut cri = c.cri().await?;
    step(&format!("RunPodSandbox with runtime handler {handler:?}"));
    let pod = pod_config("demo", &c.dir.join("logs"));
    let mut pod_id = cri.run_pod_with(&pod, handler).await?;
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

    step("ExecSync in each: the pod's hostname, and the processes the reader can see");
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
    let (_, ip, _) = cri
        .exec(&reader, &["sh", "-c", "ip -4 addr show eth0 | grep inet"])
        .await?;
    println!(
        "pod IP on eth0: {}",
        if ip.trim().is_empty() {
            "none (a gVisor pod here has loopback only)"
        } else {
            ip.trim()
        }
    );

    step("stasisctl pod checkpoint demo --leave-running: every container frozen at one instant");
    let archive = c.dir.join("demo-pod.tar.zst");
    let before = cri.exec_ok(&counter, &["cat", "/tmp/count"]).await?;
    let out = c.stasisctl_ok(&[
        "pod",
        "checkpoint",
        "demo",
        "--leave-running",
        "--compress",
        "zstd",
        "--output",
        archive.to_str().unwrap(),
    ])?;
    print!("{out}");
    println!("counter was at about {before} when checkpointed");

    step("stasisctl inspect");
    print!(
        "{}",
        c.stasisctl_ok(&["inspect", archive.to_str().unwrap()])?
    );

    step("removing the original pod");
    cri.stop_and_remove_pod(&pod_id).await?;
    println!("pod {} removed", &pod_id[..12]);

    step("stasisctl pod restore: a new pod, its containers restored from memory");
    let new_pod = c
        .stasisctl_ok(&[
            "pod",
            "restore",
            archive.to_str().unwrap(),
            "--name",
            "demo-restored",
            "--runtime-handler",
            handler,
        ])?
        .trim()
        .to_string();
    println!("new pod {new_pod}");
    let list = cri
        .runtime
        .list_containers(stasis_e2e::cri::cri::ListContainersRequest {
            filter: Some(stasis_e2e::cri::cri::ContainerFilter {
                pod_sandbox_id: new_pod.clone(),
                ..Default::default()
            }),
        })
        .await?
        .into_inner()
        .containers;
    for ctr in &list {
        let name = ctr
            .metadata
            .as_ref()
            .map(|m| m.name.clone())
            .unwrap_or_default();
        let state = if ctr.state == 1 {
            "RUNNING"
        } else {
            "not running"
        };
        println!("  {name:<8} {} {state}", &ctr.id[..12]);
        if name == "counter" {
            tokio::time::sleep(Duration::from_millis(300)).await;
            // The counter rewrites the file with `>`: a read can fall between the truncation
            // and the write.
            let mut after = String::new();
            for _ in 0..10 {
                after = cri.exec_ok(&ctr.id, &["cat", "/tmp/count"]).await?;
                if !after.trim().is_empty() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            println!("  counter continues from its memory: {before} at checkpoint -> {after} now (a fresh start would be near 0)");
        }
    }
    pod_id = new_pod;

    step("StopPodSandbox + RemovePodSandbox");
    cri.stop_and_remove_pod(&pod_id).await?;
    c.wait_for("the shim to exit", Duration::from_secs(15), || {
        Ok(c.shim_pids().is_empty())
    })?;
    println!("done: pod removed, its shim has exited");
    Ok(())
}
