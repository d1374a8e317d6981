//! `stasisctl checkpoint ls | rm | prune`: the node's checkpoint store and the checkpoint
//! images in containerd's store.

use anyhow::Result;
use clap::Subcommand;

use super::args::{Format, StoreDir};
use crate::{
    display::human,
    ops::{
        store::{self, Stored},
        Target,
    },
};

#[derive(Subcommand)]
pub(super) enum CheckpointCommand {
    /// List stored checkpoints, newest first: archives under the store (written by `pod
    /// checkpoint --store`) and checkpoint images in containerd's store (--namespace).
    Ls {
        /// Only this pod's: NAME (in any Kubernetes namespace) or NAMESPACE/NAME.
        #[arg(long)]
        pod: Option<String>,
        #[command(flatten)]
        store: StoreDir,
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// Remove stored checkpoints, each named as `ls` shows it under WHERE (DIR/FILE, or
    /// image:REF).
    /// Every name is checked before anything is removed.
    Rm {
        #[arg(required = true)]
        locations: Vec<String>,
        #[command(flatten)]
        store: StoreDir,
    },
    /// Retire old checkpoints, per pod: all but the newest --keep-last N, and of those only
    /// the ones older than --older-than D (30m, 12h, 7d) when given. Schedule it with a
    /// systemd timer or a CronJob (docs/observability.md).
    Prune {
        /// Only this pod's: NAME (in any Kubernetes namespace) or NAMESPACE/NAME.
        #[arg(long)]
        pod: Option<String>,
        #[arg(long, value_name = "N")]
        keep_last: Option<usize>,
        #[arg(long, value_name = "D", value_parser = store::parse_age)]
        older_than: Option<std::time::Duration>,
        /// Show what would go; remove nothing.
        #[arg(long)]
        dry_run: bool,
        /// Checkpoint images in containerd's store count too (their pod and time are what
        /// their manifests say: only for images this node made or trusts).
        #[arg(long)]
        include_images: bool,
        #[command(flatten)]
        store: StoreDir,
    },
}

pub(super) async fn run(t: &Target, command: CheckpointCommand) -> Result<()> {
    match command {
        CheckpointCommand::Ls { pod, store, format } => {
            let all = store::list(t, &store.store_dir, pod.as_deref(), true).await?;
            match format {
                Format::Json => println!("{}", serde_json::to_string_pretty(&all)?),
                Format::Table => print_table(&all),
            }
            Ok(())
        }
        CheckpointCommand::Rm { locations, store } => {
            store::remove(t, &store.store_dir, &locations).await?;
            for l in locations {
                eprintln!("removed {l}");
            }
            Ok(())
        }
        CheckpointCommand::Prune {
            pod,
            keep_last,
            older_than,
            dry_run,
            include_images,
            store,
        } => {
            let gone = store::prune(
                t,
                &store.store_dir,
                pod.as_deref(),
                keep_last,
                older_than,
                dry_run,
                include_images,
            )
            .await?;
            let verb = if dry_run { "would remove" } else { "removed" };
            for s in &gone {
                println!("{verb} {}", s.location);
            }
            eprintln!("{verb} {} checkpoint(s)", gone.len());
            Ok(())
        }
    }
}

fn when(ms: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp((ms / 1000) as i64)
        .ok()
        .filter(|_| ms > 0)
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| "?".into())
}

fn print_table(all: &[Stored]) {
    println!(
        "{:<20} {:<21} {:>10} {:<7} {:<7} {:<10} WHERE",
        "POD", "CREATED", "SIZE", "ENGINE", "SIGNED", "ENCRYPTED"
    );
    let yes_no = |b: bool| if b { "yes" } else { "no" };
    for s in all {
        println!(
            "{:<20} {:<21} {:>10} {:<7} {:<7} {:<10} {}",
            store::pod_label(&s.pod_namespace, &s.pod_name).escape_debug(),
            when(s.created_ms),
            human(s.bytes),
            if s.engine.is_empty() { "?" } else { &s.engine },
            s.signed.map(yes_no).unwrap_or("?"),
            yes_no(s.encrypted),
            s.location.escape_debug()
        );
    }
}
