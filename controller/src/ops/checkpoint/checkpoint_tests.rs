//! A pod checkpoint against a fake node: which containers it asks for, and the rule that a
//! stopping checkpoint stops the pod only once its destination has it, else lets it run on.

use std::path::PathBuf;

use stasis_api::checkpoint::ContainerResult;

use super::*;

/// Where a fake node's shim fails.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Fault {
    None,
    /// CheckpointPod fails.
    Checkpoint,
    /// CheckpointPod writes a pod.options nobody can read: packaging fails.
    BadOptions,
    /// FinishCheckpoint(stop) fails.
    Stop,
}

/// A pod of three containers (one stopped) whose shim writes a small checkpoint.
struct FakeNode {
    fault: Fault,
    calls: Vec<String>,
}

impl FakeNode {
    fn new(fault: Fault) -> FakeNode {
        FakeNode {
            fault,
            calls: Vec::new(),
        }
    }
}

fn container(id: &str, name: &str, running: bool) -> api::Container {
    api::Container {
        id: id.into(),
        metadata: Some(api::ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        state: if running {
            api::ContainerState::ContainerRunning as i32
        } else {
            api::ContainerState::ContainerExited as i32
        },
        ..Default::default()
    }
}

fn status(code: ttrpc::Code, message: &str) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, message))
}

impl Node for FakeNode {
    async fn find_pod(&mut self, pod: &str) -> Result<api::PodSandbox> {
        self.calls.push(format!("find {pod}"));
        Ok(api::PodSandbox {
            id: "0123456789abcdef".into(),
            metadata: Some(api::PodSandboxMetadata {
                name: "web-pod".into(),
                ..Default::default()
            }),
            runtime_handler: "stasis".into(),
            ..Default::default()
        })
    }

    async fn containers(&mut self, _: &str) -> Result<Vec<api::Container>> {
        Ok(vec![
            container("aaaaaaaa01", "web", true),
            container("aaaaaaaa02", "sidecar", true),
            container("bbbbbbbb03", "init", false),
        ])
    }

    async fn container_info(&mut self, c: &api::Container) -> Result<ContainerInfo> {
        Ok(ContainerInfo {
            id: c.id.clone(),
            name: c.metadata.as_ref().unwrap().name.clone(),
            ..Default::default()
        })
    }

    async fn estimate(&mut self, _: &[ContainerInfo]) -> space::SpaceEstimate {
        space::SpaceEstimate::default()
    }

    async fn connect_shim(&mut self, _: &api::PodSandbox) -> Result<()> {
        Ok(())
    }

    async fn checkpoint(
        &mut self,
        req: &CheckpointPodRequest,
        _: u64,
    ) -> Result<CheckpointPodResponse, ttrpc::Error> {
        let names: Vec<&str> = req.containers.iter().map(|c| c.name.as_str()).collect();
        let leave_running = req.options.as_ref().is_some_and(|o| o.leave_running);
        self.calls.push(format!(
            "checkpoint {} leave_running={leave_running}",
            names.join(",")
        ));
        if self.fault == Fault::Checkpoint {
            return Err(status(
                ttrpc::Code::UNKNOWN,
                "dump of container web failed (fake)",
            ));
        }
        let out = Path::new(&req.output_path);
        let options = if self.fault == Fault::BadOptions {
            "not json".to_string()
        } else {
            r#"{"version":1,"containers":{"web":"aaaaaaaa01-web"},"annotations":{"io.stasis.engine":"runc"}}"#.to_string()
        };
        std::fs::write(out.join("pod.options"), options).unwrap();
        std::fs::write(out.join("pod.dump"), r#"{"metadata":{"name":"web-pod"}}"#).unwrap();
        std::fs::create_dir(out.join("aaaaaaaa01-web")).unwrap();
        std::fs::write(out.join("aaaaaaaa01-web/config.dump"), "{}").unwrap();
        std::fs::write(out.join("aaaaaaaa01-web/container-config.json"), "{}").unwrap();
        Ok(CheckpointPodResponse {
            engine: "runc".into(),
            containers: vec![ContainerResult {
                id: "aaaaaaaa01".into(),
                name: "web".into(),
                ..Default::default()
            }],
            ..Default::default()
        })
    }

    async fn finish(&mut self, pod_id: &str, stop: bool) -> Result<(), ttrpc::Error> {
        self.calls.push(format!("finish {pod_id} stop={stop}"));
        if stop && self.fault == Fault::Stop {
            return Err(status(ttrpc::Code::UNKNOWN, "kill failed (fake)"));
        }
        Ok(())
    }
}

/// A private scratch directory (0700, ours: the staging directory goes beside the output).
fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "stasis-ckpt-{name}-{}-{}",
        std::process::id(),
        crate::files::random_suffix().unwrap()
    ));
    crate::files::create_private_dir(&d).unwrap();
    d
}

fn args(out: &Path, leave_running: bool, containers: &[&str]) -> CheckpointArgs {
    CheckpointArgs {
        pod: "web-pod".into(),
        destination: Destination::Dir(out.to_path_buf()),
        leave_running,
        containers: containers.iter().map(|c| c.to_string()).collect(),
        tcp_established: false,
        file_locks: false,
        timeout: 0,
        space_check: false,
        sign: None,
        hold_secs: None,
    }
}

fn target() -> Target {
    Target {
        address: "/nonexistent/containerd.sock".into(),
        namespace: "k8s.io".into(),
    }
}

/// Runs a checkpoint into `dir/out`; the error's text, and what is left in `dir`.
async fn run(
    node: &mut FakeNode,
    dir: &Path,
    a: CheckpointArgs,
) -> (Result<CheckpointOutcome, String>, Vec<String>) {
    let r = checkpoint_on(node, &target(), a)
        .await
        .map_err(|e| format!("{e:#}"));
    let mut left: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    (r, left)
}

#[tokio::test]
async fn a_stopping_checkpoint_stops_the_pod_once_delivered() {
    let dir = scratch("stop");
    let mut node = FakeNode::new(Fault::None);
    let (r, left) = run(&mut node, &dir, args(&dir.join("out"), false, &[])).await;
    let o = r.unwrap();
    assert_eq!(o.pod_name, "web-pod");
    assert_eq!(o.destination, dir.join("out").display().to_string());
    // The stopped container is not asked for; the staging directory is gone.
    assert_eq!(
        node.calls,
        [
            "find web-pod",
            "checkpoint web,sidecar leave_running=false",
            "finish 0123456789abcdef stop=true"
        ]
    );
    assert_eq!(left, ["out"]);
    assert!(dir.join("out/manifest.json").is_file());
    assert!(dir.join("out/aaaaaaaa01-web/config.dump").is_file());
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_pod_that_was_not_delivered_runs_on() {
    let dir = scratch("resume");
    let mut node = FakeNode::new(Fault::BadOptions);
    let (r, left) = run(&mut node, &dir, args(&dir.join("out"), false, &["web"])).await;
    let e = r.err().unwrap();
    assert!(
        e.starts_with(
            "pod web-pod: the pod was not delivered; the pod was not stopped and runs on"
        ),
        "{e}"
    );
    assert_eq!(
        node.calls,
        [
            "find web-pod",
            "checkpoint web leave_running=false",
            "finish 0123456789abcdef stop=false"
        ]
    );
    assert!(left.is_empty(), "left behind: {left:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_failed_dump_leaves_nothing_and_asks_nothing_more() {
    let dir = scratch("dump");
    let mut node = FakeNode::new(Fault::Checkpoint);
    let (r, left) = run(&mut node, &dir, args(&dir.join("out"), false, &[])).await;
    let e = r.err().unwrap();
    assert!(
        e.starts_with("pod web-pod was not stopped and runs on"),
        "{e}"
    );
    assert!(e.contains("dump of container web failed (fake)"), "{e}");
    assert_eq!(node.calls.len(), 2, "{:?}", node.calls);
    assert!(left.is_empty(), "left behind: {left:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_live_checkpoint_never_asks_to_stop_or_resume() {
    let dir = scratch("live");
    let mut node = FakeNode::new(Fault::BadOptions);
    let (r, left) = run(&mut node, &dir, args(&dir.join("out"), true, &[])).await;
    assert!(r.is_err());
    assert!(
        !node.calls.iter().any(|c| c.starts_with("finish")),
        "{:?}",
        node.calls
    );
    assert!(left.is_empty(), "left behind: {left:?}");
    let mut node = FakeNode::new(Fault::None);
    let (r, _) = run(&mut node, &dir, args(&dir.join("out"), true, &[])).await;
    r.unwrap();
    assert!(
        !node.calls.iter().any(|c| c.starts_with("finish")),
        "{:?}",
        node.calls
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_failed_stop_says_the_checkpoint_is_complete() {
    let dir = scratch("stopfail");
    let mut node = FakeNode::new(Fault::Stop);
    let (r, left) = run(&mut node, &dir, args(&dir.join("out"), false, &[])).await;
    let e = r.err().unwrap();
    assert!(
        e.contains("is complete, but stopping the pod failed; it may still run"),
        "{e}"
    );
    assert_eq!(left, ["out"]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn unknown_or_stopped_containers_are_refused_before_the_shim_is_asked() {
    let dir = scratch("select");
    let mut node = FakeNode::new(Fault::None);
    let (r, _) = run(&mut node, &dir, args(&dir.join("out"), false, &["init"])).await;
    assert_eq!(
        r.err().unwrap(),
        "pod web-pod: no running container \"init\""
    );
    assert_eq!(node.calls, ["find web-pod"]);
    let _ = std::fs::remove_dir_all(&dir);
}
