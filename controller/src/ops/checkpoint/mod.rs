//! `stasisctl pod checkpoint`: the pod's shim freezes and captures every selected container
//! at one instant into a private staging directory; stasisctl manifests and signs it and
//! delivers it to its [`Destination`]. A stopping checkpoint keeps the pod frozen (held by
//! its shim) until the destination has it, and only then stops it; any failure before that
//! lets the pod run on and leaves nothing at the destination.

use std::{
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Instant,
};

use anyhow::{anyhow, bail, Context, Result};
use ed25519_dalek::SigningKey;
use stasis_api::checkpoint::{
    CheckpointOptions, CheckpointPodRequest, CheckpointPodResponse, ContainerInfo,
};

use stasis_api::events::PodEvent;

use super::{guard::RestoreGuard, ms, Interrupt, Target};
use crate::{archive, cri::api, display::human, events, files, progress, seal, shim};

mod destination;
mod node;
mod select;
mod space;

use node::Node;

pub use destination::{Delivered, Destination};
pub use select::{names, select};

pub struct CheckpointArgs {
    pub pod: String,
    pub destination: Destination,
    pub leave_running: bool,
    /// Only these containers (id, name or id prefix of 6 or more); all running ones if empty.
    pub containers: Vec<String>,
    pub tcp_established: bool,
    pub file_locks: bool,
    pub timeout: u32,
    /// Refuse early when the output's file system cannot hold the estimate.
    pub space_check: bool,
    /// Signs the manifest.
    pub sign: Option<SigningKey>,
    /// How long the shim holds a stopping checkpoint's pod frozen for us (default: from the
    /// space estimate).
    pub hold_secs: Option<u32>,
}

/// What a pod checkpoint produced, for the printout and for `stasisctl bench`.
pub struct CheckpointOutcome {
    pub pod_name: String,
    pub pod_id: String,
    /// Where it went, as messages name it.
    pub destination: String,
    pub delivered: Delivered,
    pub response: CheckpointPodResponse,
    pub packaging_ms: f64,
    /// Wall time of the whole command: the shim's checkpoint plus packaging.
    pub total_ms: f64,
}

/// The pod and what of it a checkpoint takes.
struct Selected {
    pod: api::PodSandbox,
    name: String,
    containers: Vec<ContainerInfo>,
}

/// Checkpoints a pod through its shim's Checkpoint service and delivers it.
#[tracing::instrument(name = "checkpoint", skip_all, fields(pod = %a.pod, pod_id = tracing::field::Empty))]
pub async fn checkpoint_pod(t: &Target, a: CheckpointArgs) -> Result<CheckpointOutcome> {
    a.destination.check_new(t).await?;
    let mut node = node::CriNode::connect(t).await?;
    checkpoint_on(&mut node, t, a).await
}

/// [`checkpoint_pod`] on `node`.
async fn checkpoint_on(
    node: &mut impl Node,
    t: &Target,
    mut a: CheckpointArgs,
) -> Result<CheckpointOutcome> {
    let started = Instant::now();
    let s = select_containers(node, &a).await?;
    tracing::Span::current().record("pod_id", tracing::field::display(&s.pod.id));
    progress::pod(&s.pod.id, &s.name);
    let (output_dir, label) = a.destination.output_dir(&a.pod)?;
    let estimate = node.estimate(&s.containers).await;
    let stage_in = space::staging_parent(&output_dir)?;
    if a.space_check {
        space::check_space(&s.name, &estimate, &stage_in, &output_dir)?;
    }
    node.connect_shim(&s.pod).await?;
    a.destination.check_new(t).await?;
    let staging = Staging::new(t, &stage_in, &label)?;
    progress::step(
        "checkpointing",
        format!(
            "checkpointing pod {} ({}) with {} container(s){}…",
            s.name,
            &s.pod.id[..12],
            s.containers.len(),
            if a.leave_running {
                ", leaving it running"
            } else {
                ""
            }
        ),
    );
    let hold = if a.leave_running {
        0
    } else {
        // A stopping checkpoint keeps the pod frozen until the archive is safe; this bound
        // (time to package the estimate at a slow 20 MB/s, plus a minute) is how long the
        // shim waits for us before it lets the pod run on.
        a.hold_secs
            .unwrap_or((60 + estimate.total() / 20_000_000).min(3600) as u32)
    };
    let mut interrupt = Interrupt::listen()?;
    let response = match ask_shim(node, &a, &s, &staging, hold, &mut interrupt).await {
        Ok(r) => r,
        Err(e) => return Err(e),
    };
    let frozen = response
        .timings
        .as_ref()
        .map(|t| t.frozen_ms)
        .unwrap_or(0.0);
    progress::step(
        "captured",
        format!(
            "captured: frozen {frozen:.0} ms; {}",
            if a.leave_running {
                "the pod runs on"
            } else {
                "the pod stays frozen until its checkpoint is safe"
            }
        ),
    );
    let t_pack = Instant::now();
    a.destination.set_page_socket(&response.page_socket);
    let destination = a.destination.describe();
    let undelivered = a.destination.undelivered();
    let delivered = package(t, a.destination, &s.pod, &staging, a.sign, &mut interrupt).await;
    drop(staging);
    let mut finish = Finish {
        node,
        pod: &s.pod,
        name: &s.name,
    };
    let delivered = match delivered {
        Ok(d) => d,
        Err(e) if !a.leave_running => return Err(finish.resume(e, undelivered).await),
        Err(e) => return Err(e),
    };
    progress::step(
        "written",
        format!("written to {destination} ({})", human(delivered.bytes)),
    );
    if !a.leave_running {
        finish.stop_delivered(&destination, &delivered).await?;
    }
    announce_written(t, &s, a.leave_running, delivered.bytes, &response, started).await;
    Ok(CheckpointOutcome {
        pod_name: s.name,
        pod_id: s.pod.id.clone(),
        destination,
        delivered,
        response,
        packaging_ms: ms(t_pack.elapsed()),
        total_ms: ms(started.elapsed()),
    })
}

/// The pod `a.pod` names and the running containers the checkpoint takes.
async fn select_containers(node: &mut impl Node, a: &CheckpointArgs) -> Result<Selected> {
    let pod = node.find_pod(&a.pod).await?;
    let name = pod
        .metadata
        .as_ref()
        .map(|m| m.name.clone())
        .unwrap_or_default();
    let all = node.containers(&pod.id).await?;
    let listed: Vec<(String, String, bool)> = all
        .iter()
        .map(|c| {
            let cname = c
                .metadata
                .as_ref()
                .map(|m| m.name.clone())
                .unwrap_or_default();
            let running = c.state == api::ContainerState::ContainerRunning as i32;
            (c.id.clone(), cname, running)
        })
        .collect();
    let chosen = select(&name, &listed, &a.containers)?;
    let mut containers = Vec::new();
    for c in all.iter().filter(|c| chosen.contains(&c.id.as_str())) {
        containers.push(node.container_info(c).await?);
    }
    if containers.is_empty() {
        bail!(
            "pod {name} ({}) has no running container to checkpoint",
            pod.id
        );
    }
    Ok(Selected {
        pod,
        name,
        containers,
    })
}

/// `/stasis/checkpoint/written` on containerd's event service: what only stasisctl knows.
async fn announce_written(
    t: &Target,
    s: &Selected,
    leave_running: bool,
    bytes: u64,
    response: &CheckpointPodResponse,
    started: Instant,
) {
    let event = PodEvent {
        sandbox_id: s.pod.id.clone(),
        pod_name: s.name.clone(),
        operation: "checkpoint".into(),
        phase: "written".into(),
        container_ids: s.containers.iter().map(|c| c.id.clone()).collect(),
        leave_running,
        bytes,
        total_ms: ms(started.elapsed()),
        engine: response.engine.clone(),
        ..Default::default()
    };
    events::publish(&t.address, &t.namespace, event).await;
}

/// A fresh private directory: a random name, 0700, never one that already exists
/// (somebody else's, or a link).
/// A checkpoint's staging directory (the pod's state, secrets included): removed on every
/// exit, and by the restore watchdog's process should stasisctl be killed.
struct Staging {
    dir: PathBuf,
    guard: Option<RestoreGuard>,
}

impl Staging {
    fn new(t: &Target, stage_in: &Path, label: &str) -> Result<Staging> {
        let dir = new_staging_dir(stage_in, label)?;
        // Not in unit tests: the watchdog is this binary again.
        let guard = match cfg!(test) {
            true => None,
            false => Some(RestoreGuard::start(&t.address, &dir).inspect_err(|_| {
                let _ = std::fs::remove_dir_all(&dir);
            })?),
        };
        Ok(Staging { dir, guard })
    }
}

impl std::ops::Deref for Staging {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
        if let Some(g) = self.guard.take() {
            g.done();
        }
    }
}

fn new_staging_dir(stage_in: &Path, label: &str) -> Result<PathBuf> {
    let staging = stage_in.join(format!(".{label}.stasis-{}", files::random_suffix()?));
    files::create_private_dir(&staging)?;
    Ok(staging.canonicalize()?)
}

/// The shim's checkpoint of the selected containers into `staging`.
async fn ask_shim(
    node: &mut impl Node,
    a: &CheckpointArgs,
    s: &Selected,
    staging: &Path,
    hold_secs: u32,
    interrupt: &mut Interrupt,
) -> Result<CheckpointPodResponse> {
    let name = &s.name;
    let req = CheckpointPodRequest {
        sandbox_id: s.pod.id.clone(),
        output_path: staging.display().to_string(),
        containers: s.containers.clone(),
        options: Some(CheckpointOptions {
            leave_running: a.leave_running,
            tcp_established: a.tcp_established,
            file_locks: a.file_locks,
            timeout_secs: a.timeout,
            hold_secs,
            post_copy: matches!(
                a.destination,
                Destination::Stream {
                    post_copy: true,
                    ..
                }
            ),
            ..Default::default()
        })
        .into(),
        ..Default::default()
    };
    let secs = if a.timeout > 0 {
        a.timeout as u64 + 30
    } else {
        3600
    };
    let asked = tokio::select! {
        r = node.checkpoint(&req, secs) => r.map_err(|e| {
            shim::explain(e, &s.pod.id, &s.pod.runtime_handler)
                .context(format!("checkpoint of pod {name} failed"))
        }),
        // Dropping the call tells the shim its caller is gone: the pod is thawed and runs on.
        signal = interrupt.received() => Err(anyhow!(
            "interrupted by {signal}: checkpoint of pod {name} abandoned, the pod runs on"
        )),
    };
    // The shim stops nothing before the archive is safe, whatever failed.
    asked.map_err(|e| {
        if a.leave_running {
            e
        } else {
            e.context(format!("pod {name} was not stopped and runs on"))
        }
    })
}

/// Manifests, signs and delivers the staged pod; an interrupt meanwhile is passed on to the
/// destination, which then leaves nothing behind.
async fn package(
    t: &Target,
    destination: Destination,
    pod: &api::PodSandbox,
    staging: &Path,
    sign: Option<SigningKey>,
    interrupt: &mut Interrupt,
) -> Result<Delivered> {
    let cancel = Arc::new(AtomicBool::new(false));
    let described = destination.describe();
    let work = async {
        let (dir, handler) = (staging.to_path_buf(), pod.runtime_handler.clone());
        // An archive file makes its manifest while it writes; the others take it staged.
        let staged_sign = (!destination.makes_manifest()).then(|| sign.clone());
        tokio::task::spawn_blocking(move || seal_staged(&dir, &handler, staged_sign))
            .await
            .context("packaging worker")??;
        let (_, total) = archive::tree_size(staging);
        let _bytes = progress::bytes("writing", &format!("writing {described}"), total);
        destination.deliver(t, staging, sign, cancel.clone()).await
    };
    tokio::pin!(work);
    tokio::select! {
        r = &mut work => r,
        signal = interrupt.received() => {
            cancel.store(true, Ordering::SeqCst);
            let _ = work.await;
            Err(anyhow!("interrupted by {signal} while writing the archive; nothing was left at {described}"))
        }
    }
}

/// Makes the staged checkpoint what a destination takes: the runtime handler recorded,
/// every file private, and, for a destination that takes it staged (`manifest` given), the
/// manifest written and (with a key) signed.
fn seal_staged(staging: &Path, handler: &str, manifest: Option<Option<SigningKey>>) -> Result<()> {
    record_runtime_handler(staging, handler)?;
    archive::make_private(staging)?;
    let Some(sign) = manifest else {
        return Ok(());
    };
    archive::write_manifest(staging)?;
    if let Some(key) = sign {
        seal::sign_manifest(staging, &key)?;
    }
    Ok(())
}

/// Notes in `pod.options` which CRI runtime handler the pod ran under (the shim knows its
/// engine, not the handler's name), so a restore can default to it.
fn record_runtime_handler(staging: &Path, handler: &str) -> Result<()> {
    if handler.is_empty() {
        return Ok(());
    }
    let mut options = archive::read_pod_options(staging)?;
    options.annotations.insert(
        stasis_api::layout::RUNTIME_HANDLER_ANNOTATION.into(),
        handler.into(),
    );
    let path = staging.join(stasis_api::layout::POD_OPTIONS);
    std::fs::remove_file(&path).with_context(|| format!("replace {}", path.display()))?;
    files::write_new_private(&path, &options.to_json())
}

/// The end of a stopping checkpoint: the pod resumed (nothing delivered) or stopped.
struct Finish<'a, N> {
    node: &'a mut N,
    pod: &'a api::PodSandbox,
    name: &'a str,
}

impl<N: Node> Finish<'_, N> {
    /// Nothing was delivered: the pod runs on.
    async fn resume(&mut self, e: anyhow::Error, undelivered: &str) -> anyhow::Error {
        let name = self.name;
        match self.node.finish(&self.pod.id, false).await {
            Ok(()) => e.context(format!(
                "pod {name}: {undelivered}; the pod was not stopped and runs on"
            )),
            Err(f) => e.context(format!(
                "pod {name}: {undelivered}; resuming the pod failed too ({}), its shim lets it run on when its hold ends",
                shim::explain(f, &self.pod.id, &self.pod.runtime_handler)
            )),
        }
    }

    /// The destination has the pod: it stops here. A migration's peer runs it already (with
    /// every page): the source is removed next whatever its shim says (a shim that died took
    /// the pod with it).
    async fn stop_delivered(&mut self, destination: &str, delivered: &Delivered) -> Result<()> {
        match self.stop(destination).await {
            Ok(()) => progress::step("stopped", format!("pod {} stopped", self.name)),
            Err(e) if delivered.peer_pod.is_some() => progress::step(
                "stopped",
                format!("pod {}: {e:#}; it is removed next", self.name),
            ),
            Err(e) => return Err(e),
        }
        Ok(())
    }

    /// The destination has the pod: it stops here.
    async fn stop(&mut self, destination: &str) -> Result<()> {
        self.node.finish(&self.pod.id, true).await.map_err(|e| {
            shim::explain(e, &self.pod.id, &self.pod.runtime_handler).context(format!(
                "pod {}: the archive {destination} is complete, but stopping the pod failed; it may still run",
                self.name
            ))
        })
    }
}

#[cfg(test)]
#[path = "checkpoint_tests.rs"]
mod tests;
