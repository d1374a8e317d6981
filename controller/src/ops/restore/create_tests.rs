//! The restore's creation steps against a fake node: a failure at every step removes the new
//! pod (once it exists) and says so; nothing is removed when the restore succeeds.

use std::path::PathBuf;

use super::*;

/// The steps a fake node can be told to fail at.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Step {
    RunPod,
    Validate,
    Create(usize),
    Start(usize),
    Finish,
}

/// Records every call; fails the one it is told to.
struct FakeNode {
    fail_at: Option<Step>,
    engine: &'static str,
    calls: Vec<String>,
    created: usize,
}

impl FakeNode {
    fn failing_at(step: Option<Step>) -> FakeNode {
        FakeNode {
            fail_at: step,
            engine: "runc",
            calls: Vec::new(),
            created: 0,
        }
    }

    fn step(&mut self, step: Step, call: String) -> Result<()> {
        self.calls.push(call);
        if self.fail_at == Some(step) {
            bail!("{step:?} failed (fake)");
        }
        Ok(())
    }
}

impl Node for FakeNode {
    async fn run_pod(&mut self, _: &api::PodSandboxConfig, handler: &str) -> Result<String> {
        self.step(Step::RunPod, format!("run_pod {handler}"))?;
        Ok("pod-1".into())
    }

    async fn validate(&mut self, pod_id: &str, _: &Path) -> Result<String> {
        self.step(Step::Validate, format!("validate {pod_id}"))?;
        Ok(self.engine.into())
    }

    async fn create_container(
        &mut self,
        pod_id: &str,
        config: &api::ContainerConfig,
        _: &api::PodSandboxConfig,
    ) -> Result<String> {
        let n = self.created;
        let name = config
            .metadata
            .as_ref()
            .map(|m| m.name.clone())
            .unwrap_or_default();
        self.step(Step::Create(n), format!("create {name} in {pod_id}"))?;
        self.created += 1;
        Ok(format!("container-{n}-0123456789"))
    }

    async fn start_container(&mut self, id: &str) -> Result<()> {
        let n: usize = id.split('-').nth(1).unwrap().parse().unwrap();
        self.step(Step::Start(n), format!("start {id}"))
    }

    async fn finish_restore(&mut self, pod_id: &str) -> Result<()> {
        self.step(Step::Finish, format!("finish {pod_id}"))
    }

    async fn remove_pod(&mut self, pod_id: &str) -> Result<()> {
        self.calls.push(format!("remove {pod_id}"));
        Ok(())
    }
}

fn admitted() -> Admitted {
    let container = |name: &str| {
        (
            name.to_string(),
            api::ContainerConfig {
                metadata: Some(api::ContainerMetadata {
                    name: name.into(),
                    attempt: 0,
                }),
                ..Default::default()
            },
        )
    };
    Admitted {
        dir: PathBuf::from("/nonexistent/restore"),
        pod: api::PodSandboxConfig {
            metadata: Some(api::PodSandboxMetadata {
                name: "web-pod".into(),
                ..Default::default()
            }),
            ..Default::default()
        },
        configs: vec![container("web"), container("sidecar")],
        handler: "stasis".into(),
        engine: "runc".into(),
    }
}

async fn run(node: &mut FakeNode) -> (Result<Created>, Vec<String>) {
    let mut interrupt = Interrupt::listen().unwrap();
    let mut told = Vec::new();
    let r = create(node, admitted(), &mut interrupt, |id| {
        told.push(id.to_string())
    })
    .await;
    (r, told)
}

#[tokio::test]
async fn a_restore_that_succeeds_removes_nothing() {
    let mut node = FakeNode::failing_at(None);
    let (r, told) = run(&mut node).await;
    let created = r.unwrap();
    assert_eq!(told, ["pod-1"]);
    assert_eq!(created.pod_id, "pod-1");
    assert_eq!(
        created.containers,
        [
            ("web".to_string(), "container-0-0123456789".to_string()),
            ("sidecar".to_string(), "container-1-0123456789".to_string())
        ]
    );
    assert_eq!(
        node.calls,
        [
            "run_pod stasis",
            "validate pod-1",
            "create web in pod-1",
            "start container-0-0123456789",
            "create sidecar in pod-1",
            "start container-1-0123456789",
            "finish pod-1"
        ]
    );
}

#[tokio::test]
async fn a_failure_at_every_step_removes_the_new_pod_once() {
    for step in [
        Step::Validate,
        Step::Create(0),
        Step::Start(0),
        Step::Create(1),
        Step::Start(1),
        Step::Finish,
    ] {
        let mut node = FakeNode::failing_at(Some(step));
        let (r, told) = run(&mut node).await;
        let e = format!("{:#}", r.err().unwrap());
        assert!(
            e.starts_with("restore of pod web-pod failed; the new pod was removed"),
            "{step:?}: {e}"
        );
        assert!(
            e.contains(&format!("{step:?} failed (fake)")),
            "{step:?}: {e}"
        );
        assert_eq!(told, ["pod-1"], "{step:?}");
        // The failed step is the last thing done before the removal, which comes once.
        let n = node.calls.len();
        assert_eq!(
            node.calls[n - 1],
            "remove pod-1",
            "{step:?}: {:?}",
            node.calls
        );
        assert_eq!(
            node.calls
                .iter()
                .filter(|c| c.starts_with("remove"))
                .count(),
            1
        );
        assert!(
            !node.calls[..n - 1].iter().any(|c| c.starts_with("finish")) || step == Step::Finish
        );
    }
}

#[tokio::test]
async fn a_pod_that_was_never_made_is_not_removed() {
    let mut node = FakeNode::failing_at(Some(Step::RunPod));
    let (r, told) = run(&mut node).await;
    assert!(r.is_err());
    assert!(told.is_empty());
    assert_eq!(node.calls, ["run_pod stasis"]);
}

#[tokio::test]
async fn a_runtime_of_another_engine_is_refused_before_any_container() {
    let mut node = FakeNode::failing_at(None);
    node.engine = "runsc";
    let (r, _) = run(&mut node).await;
    let e = format!("{:#}", r.err().unwrap());
    assert!(
        e.contains(
            "archive was written by the runc backend; runtime handler \"stasis\" uses runsc"
        ),
        "{e}"
    );
    assert_eq!(
        node.calls,
        ["run_pod stasis", "validate pod-1", "remove pod-1"]
    );
}
