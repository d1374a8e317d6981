//! `stasisctl image build | push | pull`.

use std::path::PathBuf;

use anyhow::Result;
use clap::Subcommand;

use super::args::{conclude, opening, CompressArg, Output, RegistryArgs};
use crate::{display::human, image, ops::Target, progress};

#[derive(Subcommand)]
pub(super) enum ImageCommand {
    /// Turn pod archive FILE into checkpoint image REF in containerd's store: the pod's own
    /// files in the first layer, each container's checkpoint (as checkpointctl reads it) in a
    /// layer of its own. The archive is checked in full first.
    Build {
        archive: PathBuf,
        reference: String,
        /// Compression of the layers.
        #[arg(long, value_enum, default_value = "none")]
        compress: CompressArg,
        /// age identity file, for an encrypted archive (the image is not encrypted).
        #[arg(long, value_name = "FILE")]
        identity: Option<PathBuf>,
        /// Refuse the archive unless its manifest is signed by this Ed25519 public key (PEM);
        /// the signature goes into the image with it.
        #[arg(long, value_name = "PUB")]
        verify_key: Option<PathBuf>,
    },
    /// Push image REF from containerd's store to its registry.
    Push {
        reference: String,
        #[command(flatten)]
        registry: RegistryArgs,
        /// text: each layer's state on stderr as it changes; json: one JSON object per line
        /// on stdout (`layer` events with part, state, done, total; then the `result`).
        #[arg(long, value_enum, default_value = "text")]
        format: Output,
    },
    /// Pull image REF from its registry into containerd's store.
    Pull {
        reference: String,
        #[command(flatten)]
        registry: RegistryArgs,
        /// text: each layer's state on stderr as it changes; json: one JSON object per line
        /// on stdout (`layer` events with part, state, done, total; then the `result`).
        #[arg(long, value_enum, default_value = "text")]
        format: Output,
    },
}

/// `image push` / `image pull` with their progress and result.
async fn transfer_image(
    target: &Target,
    reference: &str,
    registry: &RegistryArgs,
    push: bool,
    format: Output,
) -> Result<()> {
    progress::start(if push { "push" } else { "pull" }, format == Output::Json);
    let r = transfer_timed(target, reference, registry, push).await;
    let fields = |ms: &f64| serde_json::json!({ "reference": reference, "total_ms": ms });
    conclude(format, r, fields, |_| {})
}

/// A push or pull, timed; a pulled image must be a pod checkpoint.
async fn transfer_timed(
    target: &Target,
    reference: &str,
    registry: &RegistryArgs,
    push: bool,
) -> Result<f64> {
    let started = std::time::Instant::now();
    image::transfer(
        &target.address,
        &target.namespace,
        reference,
        &registry.access(reference)?,
        push,
    )
    .await?;
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    if push {
        progress::step("pushed", format!("pushed {reference} in {ms:.0} ms"));
    } else {
        // Only a checkpoint image is worth having here: say at once if it is not.
        let s = image::summary(&target.address, &target.namespace, reference).await?;
        progress::step(
            "pulled",
            format!(
                "pulled {reference} (pod {}, {} container(s), {}) in {ms:.0} ms",
                s.pod_name,
                s.containers.len(),
                human(s.size)
            ),
        );
    }
    Ok(ms)
}

/// Runs an `image` command.
pub(super) async fn run(target: &Target, command: ImageCommand) -> Result<()> {
    match command {
        ImageCommand::Build {
            archive: file,
            reference,
            compress,
            identity,
            verify_key,
        } => {
            let opening = opening(identity.as_deref(), verify_key.as_deref())?;
            let started = std::time::Instant::now();
            let size = image::build_from_archive(
                &target.address,
                &target.namespace,
                &file,
                &reference,
                compress.into(),
                &opening,
            )
            .await?;
            eprintln!(
                "image {reference} ({}) built from {} in {:.0} ms",
                human(size),
                file.display(),
                started.elapsed().as_secs_f64() * 1000.0
            );
            Ok(())
        }
        ImageCommand::Push {
            reference,
            registry,
            format,
        } => transfer_image(target, &reference, &registry, true, format).await,
        ImageCommand::Pull {
            reference,
            registry,
            format,
        } => transfer_image(target, &reference, &registry, false, format).await,
    }
}
