//! The stand-ins the Task API tests drive the operations with: a runtime that records its
//! calls and a sink that records the events.

use std::{
    collections::{HashMap, HashSet},
    path::Path,
    sync::{Arc, Mutex},
};

use async_trait::async_trait;
use protobuf::MessageDyn;
use tokio::sync::{watch, Notify};

use crate::{
    error::{Error, Result},
    events::EventSink,
    process::reaper::Exit,
    runtime::{
        config::Engine, CheckpointHooks, CheckpointOpts, OciRuntime, Operation, ProcessStdio,
        RuntimeState,
    },
};

/// A runtime that records what it is asked and whose processes exit when the test says.
#[derive(Default)]
pub(super) struct FakeRuntime {
    pub(super) calls: Mutex<Vec<String>>,
    pub(super) fail_create: Mutex<bool>,
    pub(super) refuse_pause_in_pod: bool,
    pub(super) exits: Mutex<HashMap<String, watch::Sender<Option<i32>>>>,
    /// When set, `start` waits for it: a long runtime call.
    pub(super) slow_start: Option<Arc<Notify>>,
    pub(super) held: Mutex<HashSet<String>>,
}

impl FakeRuntime {
    pub(super) fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }

    fn record(&self, call: String) {
        self.calls.lock().unwrap().push(call);
    }

    fn exit_channel(&self, id: &str) -> watch::Sender<Option<i32>> {
        self.exits
            .lock()
            .unwrap()
            .entry(id.to_string())
            .or_insert_with(|| watch::channel(None).0)
            .clone()
    }

    /// The container's init exits with `status`.
    pub(super) fn exit(&self, id: &str, status: i32) {
        self.exit_channel(id).send_replace(Some(status));
    }

    fn write_pid(pid_file: &Path) -> Result<()> {
        std::fs::write(pid_file, "4242").map_err(|e| Error::io("fake", "pid file", e))
    }
}

#[async_trait]
impl OciRuntime for FakeRuntime {
    fn engine(&self) -> Engine {
        Engine::Runc
    }

    async fn create(&self, id: &str, _b: &Path, _s: ProcessStdio, pid_file: &Path) -> Result<()> {
        self.record(format!("create {id}"));
        if *self.fail_create.lock().unwrap() {
            return Err(Error::Runtime {
                id: id.into(),
                step: "fake create".into(),
                message: "exec: \"/nope\": no such file".into(),
            });
        }
        Self::write_pid(pid_file)
    }

    async fn start(&self, id: &str) -> Result<()> {
        self.record(format!("start {id}"));
        if let Some(n) = &self.slow_start {
            n.notified().await;
        }
        Ok(())
    }

    async fn exec(&self, id: &str, _p: &Path, _s: ProcessStdio, _f: &Path) -> Result<()> {
        self.record(format!("exec {id}"));
        Ok(())
    }

    async fn kill(&self, id: &str, signal: u32, _all: bool) -> Result<()> {
        self.record(format!("kill {id} {signal}"));
        self.exit(id, 128 + signal as i32);
        Ok(())
    }

    async fn delete(&self, id: &str, _force: bool) -> Result<()> {
        self.record(format!("delete {id}"));
        Ok(())
    }

    async fn pause(&self, id: &str) -> Result<()> {
        self.record(format!("pause {id}"));
        Ok(())
    }

    async fn resume(&self, id: &str) -> Result<()> {
        self.record(format!("resume {id}"));
        Ok(())
    }

    async fn pids(&self, _id: &str) -> Result<Vec<u32>> {
        Ok(vec![4242])
    }

    async fn state(&self, _id: &str) -> Result<RuntimeState> {
        Ok(RuntimeState {
            status: "running".into(),
            pid: 4242,
        })
    }

    async fn update(&self, _id: &str, _r: &[u8]) -> Result<()> {
        Ok(())
    }

    async fn wait_init(&self, id: &str, pid: i32, _since: std::time::Instant) -> Exit {
        let mut rx = self.exit_channel(id).subscribe();
        let status = *rx.wait_for(|s| s.is_some()).await.unwrap();
        Exit {
            pid,
            status: status.unwrap(),
            at: time::OffsetDateTime::now_utc(),
        }
    }

    fn check_operation(&self, id: &str, op: Operation, in_pod: bool) -> Result<()> {
        if self.refuse_pause_in_pod && in_pod && op == Operation::Pause {
            return Err(Error::precondition(
                id,
                "fake cannot pause one container of a pod",
            ));
        }
        Ok(())
    }

    fn hooks(&self) -> &dyn CheckpointHooks {
        self
    }
}

#[async_trait]
impl CheckpointHooks for FakeRuntime {
    /// No CRIU here: nothing restored to check.
    fn restores_host_tasks(&self) -> bool {
        false
    }

    async fn checkpoint(&self, id: &str, _o: &CheckpointOpts) -> Result<()> {
        self.record(format!("checkpoint {id}"));
        Ok(())
    }

    async fn restore(
        &self,
        id: &str,
        _b: &Path,
        o: &CheckpointOpts,
        _s: ProcessStdio,
        pid_file: &Path,
    ) -> Result<()> {
        self.record(format!("restore {id} from {}", o.image_path.display()));
        Self::write_pid(pid_file)
    }

    fn has_image(&self, _image: &Path) -> bool {
        true
    }

    async fn hold_restored(&self, id: &str, _cgroup: &str) -> Result<bool> {
        self.held.lock().unwrap().insert(id.to_string());
        Ok(true)
    }

    async fn release_restored(&self, id: &str, _cgroup: &str) -> Result<()> {
        self.held.lock().unwrap().remove(id);
        Ok(())
    }
}

#[derive(Default)]
pub(super) struct Recorder(pub(super) Mutex<Vec<String>>);

#[async_trait]
impl EventSink for Recorder {
    async fn publish(&self, topic: &str, _event: Box<dyn MessageDyn>) {
        self.0.lock().unwrap().push(topic.to_string());
    }

    fn emit(&self, topic: &str, _event: Box<dyn MessageDyn>) {
        self.0.lock().unwrap().push(topic.to_string());
    }
}
