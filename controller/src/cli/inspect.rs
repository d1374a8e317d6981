//! `stasisctl inspect`: prints what `ops::inspect` found.

use std::path::Path;

use anyhow::Result;

use super::args::{opening, Format};
use crate::{
    archive::Summary,
    display::human,
    ops::{self, Target},
};

/// Runs `inspect`.
pub(super) async fn run(
    target: &Target,
    archive: &str,
    identity: Option<&Path>,
    format: Format,
    policy: Option<&Path>,
) -> Result<()> {
    let s = ops::inspect::inspect(target, archive, &opening(identity, None)?, policy).await?;
    match format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&s)?),
        Format::Table => print_summary(&s),
    }
    Ok(())
}

fn print_summary(s: &Summary) {
    if s.encrypted && s.pod_name.is_empty() {
        println!("archive   {} ({})", s.archive, human(s.archive_bytes));
        println!("encrypted yes (age): pass --identity FILE to see the pod it holds");
        return;
    }
    println!("archive   {} ({})", s.archive, human(s.archive_bytes));
    if s.encrypted {
        println!("encrypted yes (age)");
    }
    match &s.signed_by {
        Some(k) => println!("signed    by {k} (not verified here: pod restore --verify-key does)"),
        None => println!("signed    no"),
    }
    println!("pod       {} (namespace {})", s.pod_name, s.pod_namespace);
    println!("engine    {}", s.engine);
    if s.sandbox_image_bytes > 0 {
        println!(
            "sandbox   {} (one image of the whole sandbox: every container's memory and files)",
            human(s.sandbox_image_bytes)
        );
    }
    println!(
        "{:<16} {:<14} {:<32} {:>12} {:>12} {:>10}  CHECKPOINTED",
        "CONTAINER", "ID", "IMAGE", "CHECKPOINT", "ROOTFS DIFF", "FROZEN"
    );
    for c in &s.containers {
        println!(
            "{:<16} {:<14} {:<32} {:>12} {:>12} {:>8.0}ms  {}{}",
            c.name,
            &c.id[..c.id.len().min(13)],
            c.image,
            human(c.checkpoint_bytes),
            human(c.rootfs_diff_bytes),
            c.frozen_ms,
            c.checkpointed,
            if c.was_paused { " (paused)" } else { "" }
        );
    }
    if s.requests.is_empty() {
        println!("requests  nothing beyond an ordinary pod");
    } else {
        println!(
            "requests  ({} of {} refused by this node's restore policy unless allowed)",
            s.refused.len(),
            s.requests.len()
        );
        for r in &s.requests {
            let verdict = if s.refused.contains(r) {
                "refused"
            } else {
                "allowed"
            };
            println!("  {verdict}  {r}");
        }
    }
}
