//! `stasisctl pod ls | checkpoint | restore | pages | migrate`.

use std::path::PathBuf;

use anyhow::Result;
use clap::Subcommand;
use serde_json::json;

use super::args::{conclude, opening, AdmitArgs, CompressArg, Output, RegistryArgs, StoreDir};
use crate::{
    display::human,
    ops::{
        checkpoint::{self, CheckpointArgs, CheckpointOutcome, Destination},
        ls, migrate,
        restore::{self, RestoreArgs, Source},
        store::{self, Record},
        Target,
    },
    progress, seal,
};

#[derive(Subcommand)]
pub(super) enum PodCommand {
    /// List pods with their runtime, state and containers.
    Ls,
    /// Checkpoint every (or the given) running container of POD at one instant into an archive.
    Checkpoint(CheckpointFlags),
    /// Move POD to the node where `stasisctl migrate listen` runs; prints the new pod id there.
    ///
    /// The pod is frozen once, captured as for a checkpoint and streamed (no archive on
    /// either node); the target restores it and lets it run; only then is the pod here
    /// stopped and removed. Any failure before that leaves it running here, and nothing on the
    /// target. The pod gets a new IP address; established TCP connections are not moved.
    Migrate(MigrateFlags),
    /// Restore a pod archive as a new running pod; prints the new pod id.
    ///
    /// The archive is unpacked into the restore store (/var/lib/stasis/restores, root's,
    /// 0700) under a fresh random id, which the new pod and its containers name; the unpacked
    /// copy is removed afterwards, also when the restore fails or is interrupted.
    Restore(RestoreFlags),
    /// Where the memory of POD's restored containers stands: pages still coming in (a lazy
    /// restore), every page in (and after how long), restored eagerly, or failed and why.
    Pages(PagesFlags),
}

#[derive(clap::Args)]
pub(super) struct PagesFlags {
    /// Pod id, unique id prefix, or pod name.
    pod: String,
    /// Answer once no container's pages are still coming in.
    #[arg(long)]
    wait: bool,
}

#[derive(clap::Args)]
pub(super) struct CheckpointFlags {
    /// Pod id, unique id prefix, or pod name.
    pod: String,
    /// Archive to write (must not exist). Nothing is left there if the checkpoint fails.
    /// With a trailing slash (`DIR/`): the checkpoint as a directory (the archive's files
    /// unpacked, 0700), which `pod restore DIR` reads, lazily without copying its pages.
    #[arg(
        long,
        short,
        required_unless_present_any = ["image", "store"],
        conflicts_with_all = ["image", "store"]
    )]
    output: Option<PathBuf>,
    /// Write the archive into the node's checkpoint store (--store-dir) under the pod's name
    /// and the time; `stasisctl checkpoint ls | rm | prune` manage it.
    #[arg(long, conflicts_with = "image")]
    store: bool,
    #[command(flatten)]
    store_dir: StoreDir,
    /// Write the checkpoint as OCI image REF into containerd's image store instead (push
    /// it with `stasisctl image push`); the layers are compressed as --compress says.
    #[arg(long, value_name = "REF")]
    image: Option<String>,
    /// Keep the pod running afterwards (else its containers are stopped).
    #[arg(long)]
    leave_running: bool,
    /// Compression of the archive (readers detect it).
    #[arg(long, value_enum, default_value = "none")]
    compress: CompressArg,
    /// Only these containers (id, id prefix or name); repeat for several.
    #[arg(long = "container")]
    containers: Vec<String>,
    /// Checkpoint established TCP connections.
    #[arg(long)]
    tcp_established: bool,
    /// Checkpoint file locks.
    #[arg(long)]
    file_locks: bool,
    /// Give up after this many seconds (the pod is thawed); 0 = no limit.
    #[arg(long, default_value_t = 0)]
    timeout: u32,
    /// Skip the early check that the output's file system has room for about twice the
    /// pod's resident memory plus writable layers (a full disk still fails cleanly).
    #[arg(long)]
    skip_space_check: bool,
    /// Sign the archive's manifest with this Ed25519 private key (PKCS#8 PEM, from
    /// `stasisctl key generate --type signing` or `openssl genpkey -algorithm ed25519`).
    #[arg(long, value_name = "KEY")]
    sign_key: Option<PathBuf>,
    /// Encrypt the archive (age format) to this X25519 recipient (`age1…`) or to every
    /// recipient in this file; repeatable. Only their identities can restore or inspect it.
    #[arg(long = "encrypt-to", value_name = "RECIPIENT")]
    encrypt_to: Vec<String>,
    /// text: progress on stderr (live on a terminal) and the result on stdout; json: one
    /// JSON object per line on stdout (progress events, then a `result` event with
    /// `ok` and the result or `error`); see `docs/progress.md`.
    #[arg(long, value_enum, default_value = "text")]
    format: Output,
}

#[derive(clap::Args)]
pub(super) struct MigrateFlags {
    /// Pod id, unique id prefix, or pod name.
    pod: String,
    /// The receiver, ADDR:PORT.
    #[arg(long)]
    to: String,
    /// Shared key from `stasisctl migrate keygen` (the same file on both nodes).
    #[arg(long = "key-file", value_name = "K")]
    key_file: PathBuf,
    /// Name of the pod on the target (default: the same).
    #[arg(long)]
    name: Option<String>,
    /// Runtime handler on the target (default: the one the pod runs under here).
    #[arg(long)]
    runtime_handler: Option<String>,
    /// Give up the capture after this many seconds (the pod runs on); 0 = no limit.
    #[arg(long, default_value_t = 0)]
    timeout: u32,
    /// Let the pod run on the target before its memory is mapped: pages are served on
    /// demand from the received images and pulled in the background (runc/crun; gVisor
    /// restores eagerly).
    #[arg(long)]
    lazy: bool,
    /// Post-copy: only the pod's small state crosses before the target runs it; its memory
    /// pages follow on demand and in the background from the source, which stays frozen until
    /// the target has every page (any failure before that removes the target's pod and thaws
    /// the source). runc on this node, runc or crun on the target, and `fs.pipe-max-size` >=
    /// 4194304 on this one.
    #[arg(long, conflicts_with = "lazy")]
    post_copy: bool,
    /// Sign what is sent with this Ed25519 key (PEM), for targets whose restore policy
    /// names trusted signers.
    #[arg(long, value_name = "KEY")]
    sign_key: Option<PathBuf>,
    /// text: progress on stderr (live on a terminal) and the result on stdout; json: one
    /// JSON object per line on stdout (progress events, then a `result` event with
    /// `ok` and the result or `error`); see `docs/progress.md`.
    #[arg(long, value_enum, default_value = "text")]
    format: Output,
}

#[derive(clap::Args)]
pub(super) struct RestoreFlags {
    /// The archive file, or a checkpoint image reference (pulled when not in containerd's
    /// store).
    archive: String,
    #[command(flatten)]
    registry: RegistryArgs,
    /// Name of the new pod (default: the checkpointed pod's name).
    #[arg(long)]
    name: Option<String>,
    /// CRI runtime handler for the new pod (default: the one the pod ran under, as the
    /// archive records it; "stasis" for archives that record none).
    #[arg(long)]
    runtime_handler: Option<String>,
    #[command(flatten)]
    admit: AdmitArgs,
    /// Refuse the archive unless its manifest is signed by this Ed25519 public key (PEM).
    #[arg(long, value_name = "PUB")]
    verify_key: Option<PathBuf>,
    /// age identity file to decrypt an encrypted archive.
    #[arg(long, value_name = "FILE")]
    identity: Option<PathBuf>,
    /// Resume the containers before their memory is in: pages are served on demand (CRIU
    /// lazy-pages over userfaultfd) and pulled in the background; reports the time to
    /// running and to the last page. From an uncompressed archive the pages are read
    /// from the archive itself (each chunk checked against the manifest as it is read),
    /// so the time to running does not grow with memory. runc/crun only (runsc restores
    /// eagerly). Returns once the pod runs; the restore's watchdog waits for the pages and
    /// removes the pod if a container cannot get them all (`pod pages POD` follows it). The
    /// archive or directory must stay as it is until `pod pages POD --wait` returns.
    #[arg(long)]
    lazy: bool,
    /// With --lazy: return only once every page is in (a container that could not get all
    /// of its memory then fails the command, and the pod is removed).
    #[arg(long, requires = "lazy")]
    wait_pages: bool,
    /// text: progress on stderr (live on a terminal) and the result on stdout; json: one
    /// JSON object per line on stdout (progress events, then a `result` event with
    /// `ok` and the result or `error`); see `docs/progress.md`.
    #[arg(long, value_enum, default_value = "text")]
    format: Output,
}

/// Runs a `pod` command.
pub(super) async fn run(target: &Target, command: PodCommand) -> Result<()> {
    match command {
        PodCommand::Ls => {
            print_pods(&ls::ls(target).await?);
            Ok(())
        }
        PodCommand::Checkpoint(f) => checkpoint(target, f).await,
        PodCommand::Restore(f) => restore(target, f).await,
        PodCommand::Migrate(f) => migrate(target, f).await,
        PodCommand::Pages(f) => {
            print_pages(&restore::lazy::pod_pages(target, &f.pod, f.wait).await?);
            Ok(())
        }
    }
}

async fn checkpoint(target: &Target, f: CheckpointFlags) -> Result<()> {
    progress::start("checkpoint", f.format == Output::Json);
    let format = f.format;
    let r = checkpoint_with(target, f).await;
    conclude(format, r, checkpoint_fields, print_checkpoint)
}

async fn checkpoint_with(target: &Target, f: CheckpointFlags) -> Result<CheckpointOutcome> {
    let recipients: Vec<_> = f
        .encrypt_to
        .iter()
        .map(|r| seal::load_recipients(r))
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .flatten()
        .collect();
    let (encrypted, signed) = (!recipients.is_empty(), f.sign_key.is_some());
    let (output, pod_namespace) = match f.store {
        true => {
            let (path, ns) = store::new_entry(
                target,
                &f.store_dir.store_dir,
                &f.pod,
                f.compress.into(),
                encrypted,
            )
            .await?;
            (Some(path), ns)
        }
        false => (f.output, String::new()),
    };
    let stored = output.clone().filter(|_| f.store);
    let args = CheckpointArgs {
        pod: f.pod,
        destination: Destination::from_flags(output, f.image, f.compress.into(), recipients)?,
        leave_running: f.leave_running,
        containers: f.containers,
        tcp_established: f.tcp_established,
        file_locks: f.file_locks,
        timeout: f.timeout,
        space_check: !f.skip_space_check,
        sign: f
            .sign_key
            .as_deref()
            .map(seal::load_signing_key)
            .transpose()?,
        hold_secs: None,
    };
    let o = checkpoint::checkpoint_pod(target, args).await?;
    if let Some(path) = stored {
        let record = Record {
            pod_name: o.pod_name.clone(),
            pod_namespace,
            pod_id: o.pod_id.clone(),
            created_ms: store::now_ms(),
            engine: o.response.engine.clone(),
            signed,
            encrypted,
            bytes: o.delivered.bytes,
        };
        store::write_record(&path, &record)?;
    }
    Ok(o)
}

fn checkpoint_fields(o: &CheckpointOutcome) -> serde_json::Value {
    let t = o.response.timings.clone().unwrap_or_default();
    let containers: Vec<_> = o
        .response
        .containers
        .iter()
        .map(|c| {
            json!({
                "name": c.name,
                "id": c.id,
                "checkpoint_bytes": c.checkpoint_bytes,
                "rootfs_diff_bytes": c.rootfs_diff_bytes,
                "was_paused": c.was_paused,
            })
        })
        .collect();
    json!({
        "pod_id": o.pod_id,
        "pod_name": o.pod_name,
        "destination": o.destination,
        "bytes": o.delivered.bytes,
        "engine": o.response.engine,
        "frozen_ms": t.frozen_ms,
        "dump_ms": t.dump_ms,
        "packaging_ms": o.packaging_ms,
        "total_ms": o.total_ms,
        "containers": containers,
    })
}

async fn restore(target: &Target, f: RestoreFlags) -> Result<()> {
    progress::start("restore", f.format == Output::Json);
    let format = f.format;
    let r = restore_with(target, f).await;
    conclude(
        format,
        r,
        |id| json!({ "pod_id": id }),
        |id| println!("{id}"),
    )
}

async fn restore_with(target: &Target, f: RestoreFlags) -> Result<String> {
    let mut opening = opening(f.identity.as_deref(), f.verify_key.as_deref())?;
    let policy = f.admit.policy()?;
    // A node that names trusted signers restores nothing else.
    opening.verify.extend(policy.signers()?);
    let args = RestoreArgs {
        registry: f.registry.access(&f.archive)?,
        name: f.name,
        runtime_handler: f.runtime_handler,
        offered_runtime_handler: None,
        policy,
        replace_volumes: f.admit.replace_volumes,
        opening,
        lazy: f.lazy,
        wait_pages: f.wait_pages,
        remote_pages: None,
    };
    restore::restore_pod(target, &args, Source::from_arg(&f.archive)).await
}

async fn migrate(target: &Target, f: MigrateFlags) -> Result<()> {
    progress::start("migrate", f.format == Output::Json);
    let (pod, to, format) = (f.pod.clone(), f.to.clone(), f.format);
    let r = migrate::migrate(
        target,
        migrate::MigrateArgs {
            pod: f.pod,
            to: f.to,
            key: f.key_file,
            name: f.name,
            runtime_handler: f.runtime_handler,
            timeout: f.timeout,
            lazy: f.lazy,
            post_copy: f.post_copy,
            sign: f
                .sign_key
                .as_deref()
                .map(seal::load_signing_key)
                .transpose()?,
        },
    )
    .await;
    let fields = |m: &migrate::Migrated| {
        json!({
            "pod_id": m.target_pod,
            "source_pod_id": m.source_pod,
            "downtime_ms": m.downtime_ms,
            "bytes_sent": m.bytes_sent,
            "total_ms": m.total_ms,
        })
    };
    conclude(format, r, fields, |m| {
        eprintln!(
            "pod {pod} moved to {to} as {}: downtime {:.0} ms (frozen here until running there), {} sent, {:.0} ms in all",
            m.target_pod,
            m.downtime_ms,
            human(m.bytes_sent),
            m.total_ms
        );
        println!("{}", m.target_pod);
    })
}

fn print_pods(pods: &[ls::PodRow]) {
    println!(
        "{:<14} {:<20} {:<12} {:<10} {:<14} CONTAINERS",
        "POD ID", "NAME", "NAMESPACE", "STATE", "RUNTIME"
    );
    for p in pods {
        let list: Vec<String> = p
            .containers
            .iter()
            .map(|(name, state)| format!("{name}({state})"))
            .collect();
        println!(
            "{:<14} {:<20} {:<12} {:<10} {:<14} {}",
            &p.id[..p.id.len().min(13)],
            p.name,
            p.namespace,
            if p.ready { "READY" } else { "NOTREADY" },
            if p.runtime_handler.is_empty() {
                "(default)"
            } else {
                &p.runtime_handler
            },
            list.join(", ")
        );
    }
}

fn print_pages(rows: &[(String, restore::lazy::ContainerPages)]) {
    use stasis_api::checkpoint::RestoreState;
    if rows.is_empty() {
        println!("no container of this pod was restored from a checkpoint");
        return;
    }
    println!("{:<20} {:<14} PAGES", "CONTAINER", "ID");
    for (name, c) in rows {
        let served = if c.bytes_total > 0 {
            format!(
                " ({} of {} served from the checkpoint in {} requests)",
                crate::display::human(c.bytes_in),
                crate::display::human(c.bytes_total),
                c.page_requests
            )
        } else {
            String::new()
        };
        let pages = match c.state {
            RestoreState::RESTORE_PENDING => format!("coming in{served}"),
            RestoreState::RESTORE_EAGER => "all in before it ran (eager restore)".to_string(),
            RestoreState::RESTORE_COMPLETE => {
                format!(
                    "all in, {} ms after its restore began{served}",
                    c.pages_in_ms
                )
            }
            RestoreState::RESTORE_FAILED => format!("failed: {}", c.reason),
        };
        println!("{:<20} {:<14} {pages}", name, &c.id[..c.id.len().min(13)]);
    }
}

fn print_checkpoint(o: &CheckpointOutcome) {
    let resp = &o.response;
    let timings = resp.timings.clone().unwrap_or_default();
    println!(
        "pod {} ({}) checkpointed to {} ({}, engine {})",
        o.pod_name,
        o.pod_id,
        o.destination,
        human(o.delivered.bytes),
        resp.engine
    );
    println!(
        "{:<16} {:<14} {:>12} {:>12} {:>10} {:>10}",
        "CONTAINER", "ID", "CHECKPOINT", "ROOTFS DIFF", "DUMP", "ROOTFS"
    );
    for c in &resp.containers {
        let ct = c.timings.clone().unwrap_or_default();
        println!(
            "{:<16} {:<14} {:>12} {:>12} {:>8.0}ms {:>8.0}ms{}",
            c.name,
            &c.id[..c.id.len().min(13)],
            human(c.checkpoint_bytes),
            human(c.rootfs_diff_bytes),
            ct.dump_ms,
            ct.rootfs_ms,
            if c.was_paused {
                " (was paused, still paused)"
            } else {
                ""
            }
        );
    }
    println!(
        "frozen window {:.0} ms (all containers at one instant); checkpoint {:.0} ms, packaging {:.0} ms, total {:.0} ms",
        timings.frozen_ms, timings.total_ms, o.packaging_ms, o.total_ms
    );
}
