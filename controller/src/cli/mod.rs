//! The command line: clap's definitions and what each command prints. Everything it does
//! is the library's (`ops`, `image`, `archive`, `seal`, `bench`).

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand, ValueEnum};

use crate::{bench, ops::Target, seal, stream};

mod args;
mod image;
mod inspect;
mod observe;
mod pod;
mod store;

use args::{AdmitArgs, Format};

/// Checkpoint and restore whole Kubernetes pods: every container captured at one instant.
///
/// stasisctl talks to containerd's CRI and to the Checkpoint service of the pod's shim
/// (containerd-shim-stasis-v2, or any runtime serving the same service). It never runs CRIU
/// itself.
#[derive(Parser)]
#[command(name = "stasisctl", version)]
pub struct Cli {
    /// containerd's socket.
    #[arg(long, global = true, default_value = "/run/containerd/containerd.sock")]
    address: String,
    /// containerd namespace of the pods (CRI uses k8s.io).
    #[arg(long, global = true, default_value = "k8s.io")]
    namespace: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Pods and their containers.
    Pod {
        #[command(subcommand)]
        command: pod::PodCommand,
    },
    /// Pod checkpoints as OCI images: build one from an archive, push it to a registry, pull
    /// it (through containerd's Transfer service; the image lives in containerd's store, in
    /// --namespace). `pod checkpoint --image REF` writes one directly; `pod restore REF` and
    /// `inspect REF` read one.
    Image {
        #[command(subcommand)]
        command: image::ImageCommand,
    },
    /// Compare runtime handlers on the same pod workloads: pod start, pod checkpoint, frozen
    /// window, archive size, restore, and whether restored pods stayed consistent.
    ///
    /// Each run starts a pod of N busybox containers (each keeps a counter in memory and in a
    /// file), checkpoints it live, removes it, restores it as a new pod and checks that every
    /// counter continued from the checkpoint, runs on, and that no file got ahead of memory.
    /// Handlers whose shim does not serve the stasis Checkpoint service (containerd's runc, say)
    /// are checkpointed container by container through CRI and have no restore column.
    /// Ratios are against the first handler on the same pod size.
    Bench {
        /// CRI runtime handler to measure; repeat it; the first is the baseline.
        #[arg(long = "handler", required = true)]
        handlers: Vec<String>,
        /// Pod sizes (containers per pod), comma separated.
        #[arg(long, value_delimiter = ',', default_value = "1,4")]
        containers: Vec<usize>,
        /// Runs per handler and size (medians are shown).
        #[arg(long, default_value_t = 1)]
        runs: usize,
        /// Image of the containers; needs sh, cat and sleep (busybox), already in containerd.
        #[arg(long)]
        image: String,
        /// Where archives and pod logs go while the bench runs.
        #[arg(long, default_value = "/var/lib/stasis/bench")]
        work_dir: PathBuf,
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// (internal) The watchdog a restore starts to clean up if stasisctl is killed.
    #[command(name = "__restore-guard", hide = true)]
    RestoreGuard,
    /// Receive pods from other nodes (`migrate listen`), and make the key both sides share.
    Migrate {
        #[command(subcommand)]
        command: MigrateCommand,
    },
    /// Make a key pair for signing (Ed25519) or encrypting (age X25519) archives.
    Key {
        #[command(subcommand)]
        command: KeyCommand,
    },
    /// The node's stored checkpoints: list, remove, prune (`pod checkpoint --store` writes
    /// there).
    Checkpoint {
        #[command(subcommand)]
        command: store::CheckpointCommand,
    },
    /// Follow stasis's events on this node as they happen (pod checkpoints: started, frozen,
    /// thawed, finished or failed, written; restores: running, pages in, failed; migrations),
    /// from containerd's event service, in every namespace. `ctr events` skips them: it
    /// prints only event types compiled into ctr.
    Events {
        /// table: a line per event; json: one JSON object per line (fields: time, namespace,
        /// topic, operation, phase, pod_id, pod_name, container_ids, error, leave_running,
        /// frozen_ms, dump_ms, total_ms, bytes, downtime_ms, pages_in_ms, engine).
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
        /// Exit after this many events (default: follow until stopped).
        #[arg(long, default_value_t = 0)]
        count: u32,
    },
    /// Prometheus metrics of stasis on this node.
    Metrics {
        #[command(subcommand)]
        command: observe::MetricsCommand,
    },
    /// Show what a pod checkpoint archive holds, and what it asks for.
    Inspect {
        /// The archive file, or a checkpoint image reference in containerd's store.
        archive: String,
        /// age identity file, to see inside an encrypted archive.
        #[arg(long, value_name = "FILE")]
        identity: Option<PathBuf>,
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
        /// The node's restore policy to judge the archive's requests by (as `pod restore`
        /// would without --allow flags). Default: /etc/stasis/restore-policy.json if it
        /// exists, else built-in defaults.
        #[arg(long, env = "STASIS_RESTORE_POLICY", value_name = "FILE")]
        policy: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum MigrateCommand {
    /// Write a new shared migration key (0600; never replaces a file). Copy it to both nodes.
    Keygen {
        #[arg(long, short)]
        output: PathBuf,
    },
    /// On the target node: receive pods sent by `pod migrate` and restore them into this
    /// node's containerd (--address). Peers must hold the same key (a Noise session: the key
    /// is proven before anything is sent, and the stream is encrypted and authenticated).
    /// Received pods pass the same restore policy as archives. Prints each new pod id.
    Listen {
        /// Address to listen on, e.g. 0.0.0.0:7443.
        #[arg(long)]
        listen: String,
        /// Shared key from `stasisctl migrate keygen` (the same file on both nodes).
        #[arg(long = "key-file", value_name = "K")]
        key_file: PathBuf,
        #[command(flatten)]
        admit: AdmitArgs,
        /// Exit after this many migrations (default: serve until stopped).
        #[arg(long, default_value_t = 0)]
        count: u32,
    },
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Write a new private key to OUTPUT (0600; never replaces a file) and its public half to
    /// OUTPUT.pub, and print the public half. Signing keys are PKCS#8/SPKI PEM; encryption
    /// identities are age files, their public half an `age1…` recipient.
    Generate {
        #[arg(long = "type", value_enum)]
        kind: KeyKindArg,
        #[arg(long, short)]
        output: PathBuf,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum KeyKindArg {
    /// Ed25519, for --sign-key / --verify-key.
    Signing,
    /// age X25519, for --encrypt-to / --identity.
    Encryption,
}

/// Runs the command line's command.
pub async fn run(cli: Cli) -> Result<()> {
    let target = Target {
        address: cli.address,
        namespace: cli.namespace,
    };
    match cli.command {
        Command::Pod { command } => pod::run(&target, command).await,
        Command::Image { command } => image::run(&target, command).await,
        Command::Bench {
            handlers,
            containers,
            runs,
            image,
            work_dir,
            format,
        } => {
            let args = bench::BenchArgs {
                handlers,
                containers,
                runs,
                image,
                work_dir,
            };
            let rows = bench::run(&target, &args).await?;
            match format {
                Format::Json => println!("{}", serde_json::to_string_pretty(&rows)?),
                Format::Table => print!("{}", bench::table(&rows)),
            }
            Ok(())
        }
        Command::RestoreGuard => crate::ops::guard::run(&target.address).await,
        Command::Checkpoint { command } => store::run(&target, command).await,
        Command::Events { format, count } => observe::events(&target, format, count).await,
        Command::Metrics { command } => observe::metrics(&target, command).await,
        Command::Migrate { command } => migrate(&target, command).await,
        Command::Key {
            command: KeyCommand::Generate { kind, output },
        } => {
            let kind = match kind {
                KeyKindArg::Signing => seal::KeyKind::Signing,
                KeyKindArg::Encryption => seal::KeyKind::Encryption,
            };
            print!("{}", seal::generate(kind, &output)?);
            eprintln!(
                "private key {} (keep it secret), public {}.pub",
                output.display(),
                output.display()
            );
            Ok(())
        }
        Command::Inspect {
            archive,
            identity,
            format,
            policy,
        } => {
            inspect::run(
                &target,
                &archive,
                identity.as_deref(),
                format,
                policy.as_deref(),
            )
            .await
        }
    }
}

/// `migrate keygen` and `migrate listen`.
async fn migrate(target: &Target, command: MigrateCommand) -> Result<()> {
    match command {
        MigrateCommand::Keygen { output } => {
            stream::keygen(&output)?;
            eprintln!(
                "wrote {}; copy it (mode 0600) to the other node",
                output.display()
            );
            Ok(())
        }
        MigrateCommand::Listen {
            listen,
            key_file,
            admit,
            count,
        } => {
            crate::ops::migrate::listen(
                target,
                crate::ops::migrate::ListenArgs {
                    listen,
                    key: key_file,
                    policy: admit.policy()?,
                    replace_volumes: admit.replace_volumes,
                    count,
                },
            )
            .await
        }
    }
}
