//! `stasisctl inspect`: what a checkpoint holds, and which of its requests this node's
//! restore policy would refuse.

use std::path::Path;

use anyhow::Result;

use super::Target;
use crate::{
    archive::{self, Summary},
    cri, image,
    policy::{self, Policy},
    seal::Opening,
};

/// The summary of the archive file or checkpoint image `arg`, each request judged by the
/// policy in `policy_file` (or the node's default).
pub async fn inspect(
    t: &Target,
    arg: &str,
    opening: &Opening,
    policy_file: Option<&Path>,
) -> Result<Summary> {
    let mut s = if image::looks_like_reference(arg) {
        image::inspect(&t.address, &t.namespace, arg).await?
    } else {
        archive::inspect_with(Path::new(arg), opening)?
    };
    let mut policy = Policy::load(policy_file)?;
    if s.requests
        .iter()
        .any(|r| r.item == policy::Item::RuntimeHandler)
    {
        // The node's stasis handlers, when its containerd answers; else none is assumed
        // allowed (pod restore asks containerd itself).
        let known = match cri::connect(Path::new(&t.address)).await {
            Ok(mut rt) => cri::stasis_handlers(&mut rt).await.unwrap_or_default(),
            Err(_) => Vec::new(),
        };
        policy.learn_runtime_handlers(known);
    }
    s.refused = s
        .requests
        .iter()
        .filter(|r| policy.refuses(r))
        .cloned()
        .collect();
    Ok(s)
}
