//! Lifecycle rules of the Task API, driven through the operations with a fake runtime and a
//! recording event sink: no root, no containerd, no runc. Run with plain `cargo test`.

use std::{path::PathBuf, sync::Arc, time::Duration};

use containerd_shim_protos::{
    api::{self, Status},
    ttrpc::Code,
};
use stasis_api::layout::RESTORE_ANNOTATION;
use tokio::sync::Notify;

use crate::{
    error::{Error, Result},
    state::{Pod, Shim, State},
    task,
};

mod fake;

use fake::{FakeRuntime, Recorder};

struct Fixture {
    shim: Arc<Shim>,
    runtime: Arc<FakeRuntime>,
    events: Arc<Recorder>,
    dir: PathBuf,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn fixture(runtime: FakeRuntime, name: &str) -> Fixture {
    let dir = std::env::temp_dir().join(format!("stasis-lifecycle-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let runtime = Arc::new(runtime);
    let events = Arc::new(Recorder::default());
    let store = dir.join("restores");
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&store)
            .unwrap();
    }
    Fixture {
        shim: Shim::with_restore_store(runtime.clone(), events.clone(), store),
        runtime,
        events,
        dir,
    }
}

impl Fixture {
    /// A bundle with a config.json carrying `annotations`.
    fn bundle(&self, id: &str, annotations: serde_json::Value) -> PathBuf {
        let b = self.dir.join(id);
        std::fs::create_dir_all(&b).unwrap();
        let spec = serde_json::json!({
            "ociVersion": "1.1.0",
            "process": {"user": {"uid": 0, "gid": 0}, "args": ["sh"], "cwd": "/"},
            "root": {"path": "rootfs"},
            "annotations": annotations,
        });
        std::fs::write(b.join("config.json"), spec.to_string()).unwrap();
        b
    }

    async fn create(&self, id: &str, annotations: serde_json::Value) -> Result<()> {
        let bundle = self.bundle(id, annotations);
        task::create(
            &self.shim,
            api::CreateTaskRequest {
                id: id.into(),
                bundle: bundle.display().to_string(),
                ..Default::default()
            },
        )
        .await
        .map(drop)
    }

    async fn start(&self, id: &str) -> Result<u32> {
        task::start(
            &self.shim,
            api::StartRequest {
                id: id.into(),
                ..Default::default()
            },
        )
        .await
        .map(|r| r.pid)
    }

    async fn status(&self, id: &str) -> Result<Status> {
        let r = task::state(
            &self.shim,
            api::StateRequest {
                id: id.into(),
                ..Default::default()
            },
        )
        .await?;
        Ok(r.status.enum_value_or_default())
    }

    async fn wait(&self, id: &str) -> u32 {
        let r = tokio::time::timeout(
            Duration::from_secs(5),
            task::wait(
                &self.shim,
                api::WaitRequest {
                    id: id.into(),
                    ..Default::default()
                },
            ),
        )
        .await
        .expect("the exit reached Wait")
        .unwrap();
        r.exit_status
    }

    async fn delete(&self, id: &str) -> Result<api::DeleteResponse> {
        task::delete(
            &self.shim,
            api::DeleteRequest {
                id: id.into(),
                ..Default::default()
            },
        )
        .await
    }

    fn topics(&self) -> Vec<String> {
        self.events.0.lock().unwrap().clone()
    }
}

fn code(e: &Error) -> Code {
    e.code()
}

#[tokio::test]
async fn a_container_goes_through_its_life_and_tells_containerd() {
    let f = fixture(FakeRuntime::default(), "life");
    f.create("c1", serde_json::json!({})).await.unwrap();
    assert_eq!(f.status("c1").await.unwrap(), Status::CREATED);
    assert_eq!(f.start("c1").await.unwrap(), 4242);
    assert_eq!(f.status("c1").await.unwrap(), Status::RUNNING);

    task::pause(&f.shim, "c1").await.unwrap();
    assert_eq!(f.status("c1").await.unwrap(), Status::PAUSED);
    let again = task::pause(&f.shim, "c1").await.unwrap_err();
    assert_eq!(code(&again), Code::FAILED_PRECONDITION, "{again}");
    assert!(again.to_string().contains("PAUSED"), "{again}");
    let exec = task::exec(
        &f.shim,
        api::ExecProcessRequest {
            id: "c1".into(),
            exec_id: "e1".into(),
            spec: protobuf::MessageField::some(protobuf::well_known_types::any::Any {
                value: br#"{"args":["true"],"cwd":"/"}"#.to_vec(),
                ..Default::default()
            }),
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert_eq!(
        code(&exec),
        Code::FAILED_PRECONDITION,
        "no exec in a paused container"
    );
    task::resume(&f.shim, "c1").await.unwrap();
    assert_eq!(f.status("c1").await.unwrap(), Status::RUNNING);

    let running = f.delete("c1").await.unwrap_err();
    assert_eq!(code(&running), Code::FAILED_PRECONDITION, "{running}");

    task::kill(
        &f.shim,
        api::KillRequest {
            id: "c1".into(),
            signal: 9,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(f.wait("c1").await, 137);
    assert_eq!(f.status("c1").await.unwrap(), Status::STOPPED);
    let late = task::kill(
        &f.shim,
        api::KillRequest {
            id: "c1".into(),
            signal: 15,
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert_eq!(code(&late), Code::NOT_FOUND, "{late}");

    let deleted = f.delete("c1").await.unwrap();
    assert_eq!(deleted.exit_status, 137);
    let gone = f.status("c1").await.unwrap_err();
    assert_eq!(code(&gone), Code::NOT_FOUND);
    assert_eq!(
        f.topics(),
        [
            "/tasks/create",
            "/tasks/start",
            "/tasks/paused",
            "/tasks/resumed",
            "/tasks/exit",
            "/tasks/delete"
        ]
    );
}

#[tokio::test]
async fn a_failed_create_leaves_nothing_and_can_be_retried() {
    let f = fixture(FakeRuntime::default(), "rollback");
    *f.runtime.fail_create.lock().unwrap() = true;
    let e = f.create("c1", serde_json::json!({})).await.unwrap_err();
    assert!(
        e.to_string().contains("c1") && e.to_string().contains("/nope"),
        "{e}"
    );
    assert_eq!(
        f.runtime.calls(),
        ["create c1", "delete c1"],
        "the runtime state is undone"
    );
    assert!(f.shim.ids().is_empty(), "no container registered");
    assert!(
        f.topics().is_empty(),
        "no event for a container that never existed"
    );

    *f.runtime.fail_create.lock().unwrap() = false;
    f.create("c1", serde_json::json!({})).await.unwrap();
    let dup = f.create("c1", serde_json::json!({})).await.unwrap_err();
    assert_eq!(code(&dup), Code::ALREADY_EXISTS);
    assert_eq!(f.status("c1").await.unwrap(), Status::CREATED);
}

#[tokio::test]
async fn a_pod_restore_holds_containers_until_finish_restore() {
    let f = fixture(FakeRuntime::default(), "hold");
    // A path is never a restore source; an id root prepared in the store is.
    let by_path = f
        .create(
            "stray",
            serde_json::json!({ RESTORE_ANNOTATION: f.dir.display().to_string() }),
        )
        .await
        .unwrap_err();
    assert_eq!(code(&by_path), Code::FAILED_PRECONDITION);
    let restore_id = "0123456789abcdef0123456789abcdef";
    let prepared = f.shim.restore_store.join(restore_id);
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&prepared)
            .unwrap();
    }
    let ckpt = prepared.join("ckpt-web");
    std::fs::create_dir_all(ckpt.join("checkpoint")).unwrap();
    f.create(
        "web",
        serde_json::json!({ RESTORE_ANNOTATION: format!("{restore_id}/ckpt-web") }),
    )
    .await
    .unwrap();
    assert_eq!(f.status("web").await.unwrap(), Status::CREATED);
    assert!(
        !f.runtime.calls().iter().any(|c| c.starts_with("create")),
        "a restored container is not created fresh: {:?}",
        f.runtime.calls()
    );
    f.start("web").await.unwrap();
    assert!(f.runtime.calls().contains(&format!(
        "restore web from {}",
        ckpt.join("checkpoint").display()
    )));
    assert_eq!(f.shim.get("web").unwrap().state(), State::Held);
    assert_eq!(f.status("web").await.unwrap(), Status::RUNNING);
    assert!(f.runtime.held.lock().unwrap().contains("web"));
    let refused = task::pause(&f.shim, "web").await.unwrap_err();
    assert_eq!(
        code(&refused),
        Code::FAILED_PRECONDITION,
        "held: not pausable"
    );

    assert_eq!(task::finish_restore(&f.shim).await.unwrap(), ["web"]);
    assert!(f.runtime.held.lock().unwrap().is_empty(), "released");
    assert_eq!(f.shim.get("web").unwrap().state(), State::Running);
    assert!(task::finish_restore(&f.shim).await.unwrap().is_empty());

    // A Task API restore (containerd names the images) is not held.
    let bundle = f.bundle("plain", serde_json::json!({}));
    task::create(
        &f.shim,
        api::CreateTaskRequest {
            id: "plain".into(),
            bundle: bundle.display().to_string(),
            checkpoint: f.dir.join("images").display().to_string(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    f.start("plain").await.unwrap();
    assert_eq!(f.shim.get("plain").unwrap().state(), State::Running);
}

#[tokio::test]
async fn backend_refusals_leave_the_container_as_it_was() {
    let f = fixture(
        FakeRuntime {
            refuse_pause_in_pod: true,
            ..Default::default()
        },
        "refuse",
    );
    f.create("c1", serde_json::json!({})).await.unwrap();
    f.start("c1").await.unwrap();
    // Outside a pod the backend allows it.
    task::pause(&f.shim, "c1").await.unwrap();
    task::resume(&f.shim, "c1").await.unwrap();
    f.shim.set_pod(Pod::new(
        "pod1".into(),
        f.dir.clone(),
        String::new(),
        Vec::new(),
        Default::default(),
        "/stasis/pod1".into(),
    ));
    let e = task::pause(&f.shim, "c1").await.unwrap_err();
    assert!(e.to_string().contains("fake cannot pause"), "{e}");
    assert_eq!(f.status("c1").await.unwrap(), Status::RUNNING);
    assert_eq!(
        f.runtime
            .calls()
            .iter()
            .filter(|c| c.starts_with("pause"))
            .count(),
        1,
        "the refused pause never reached the runtime"
    );
}

#[tokio::test]
async fn queries_answer_while_a_runtime_call_runs() {
    let gate = Arc::new(Notify::new());
    let f = fixture(
        FakeRuntime {
            slow_start: Some(gate.clone()),
            ..Default::default()
        },
        "queries",
    );
    f.create("c1", serde_json::json!({})).await.unwrap();
    let shim = f.shim.clone();
    let starting = tokio::spawn(async move {
        task::start(
            &shim,
            api::StartRequest {
                id: "c1".into(),
                ..Default::default()
            },
        )
        .await
    });
    while !f.runtime.calls().contains(&"start c1".to_string()) {
        tokio::task::yield_now().await;
    }
    // Start is inside the runtime: State, Pids and Connect still answer at once.
    let st = tokio::time::timeout(Duration::from_secs(1), f.status("c1"))
        .await
        .expect("State did not wait for Start");
    assert_eq!(st.unwrap(), Status::CREATED);
    tokio::time::timeout(Duration::from_secs(1), task::pids(&f.shim, "c1"))
        .await
        .expect("Pids did not wait for Start")
        .unwrap();
    assert_eq!(task::connect_pid(&f.shim, "c1").await.unwrap(), 4242);
    // A second Start waits its turn and is then refused.
    gate.notify_one();
    starting.await.unwrap().unwrap();
    let twice = f.start("c1").await.unwrap_err();
    assert_eq!(code(&twice), Code::FAILED_PRECONDITION);
}

#[tokio::test]
async fn unknown_ids_are_not_found() {
    let f = fixture(FakeRuntime::default(), "unknown");
    for e in [
        f.start("nope").await.unwrap_err(),
        f.delete("nope").await.unwrap_err(),
        task::pause(&f.shim, "nope").await.unwrap_err(),
        f.status("nope").await.unwrap_err(),
    ] {
        assert_eq!(code(&e), Code::NOT_FOUND, "{e}");
        assert!(e.to_string().contains("nope"), "{e}");
    }
    let bad = f.dir.join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::write(bad.join("config.json"), "{}").unwrap();
    let e = task::create(
        &f.shim,
        api::CreateTaskRequest {
            id: "bad".into(),
            bundle: bad.display().to_string(),
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert_eq!(code(&e), Code::INVALID_ARGUMENT, "{e}");
}
