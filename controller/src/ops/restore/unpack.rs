//! Where a restore comes from, and how each source is unpacked (and checked in full) into the
//! fresh restore directory before anything is created.

use std::path::{Path, PathBuf};

use anyhow::Result;
use stasis_api::layout::{self, PageSource, PodOptions};

use super::RestoreArgs;
use crate::{
    archive, files,
    image::{self, ImageStoreClient},
    ops::Target,
    progress,
    seal::Opening,
    stream::Channel,
};

/// Where a restore comes from.
pub enum Source<'a> {
    /// A pod archive file. `leave_pages`: a lazy restore from an uncompressed archive reads
    /// page images from the archive itself instead of unpacking them.
    Archive { path: PathBuf, leave_pages: bool },
    /// A checkpoint directory (`pod checkpoint --output DIR/`).
    Dir(PathBuf),
    /// A checkpoint image in containerd's store (pulled when missing).
    Image(String),
    /// A migration stream from `peer`, carrying pod `pod`.
    Stream {
        channel: &'a mut Channel,
        peer: String,
        pod: String,
    },
}

impl<'a> Source<'a> {
    /// The command line's argument: an image reference, a checkpoint directory or an archive.
    pub fn from_arg(arg: &str) -> Source<'a> {
        if image::looks_like_reference(arg) {
            Source::Image(arg.to_string())
        } else if Path::new(arg).is_dir() {
            Source::Dir(PathBuf::from(arg))
        } else {
            Source::Archive {
                path: PathBuf::from(arg),
                leave_pages: false,
            }
        }
    }

    /// How messages name it.
    pub fn label(&self) -> String {
        match self {
            Source::Archive { path, .. } | Source::Dir(path) => path.display().to_string(),
            Source::Image(reference) => reference.clone(),
            Source::Stream { peer, pod, .. } => format!("pod {pod} from {peer}"),
        }
    }

    /// Gets the source ready: an image pulled when missing; a lazy restore told what it
    /// unpacks anyway.
    pub(super) async fn prepare(self, t: &Target, a: &RestoreArgs) -> Result<Source<'a>> {
        match self {
            Source::Image(reference) => {
                let store = ImageStoreClient::connect(&t.address, &t.namespace).await?;
                if store.get(&reference).await?.is_none() {
                    progress::step("pulling", format!("pulling {reference}"));
                    image::transfer(&t.address, &t.namespace, &reference, &a.registry, false)
                        .await?;
                }
                Ok(Source::Image(reference))
            }
            Source::Archive { path, .. } => {
                // A restore from an uncompressed archive leaves the page images in it: the
                // shim reads pages from there (each chunk checked) on demand, or all of them
                // before the pod resumes for an eager restore, so nothing that grows with
                // memory is unpacked.
                let leave_pages = archive::is_plain_tar(&path)?;
                if a.lazy && !leave_pages {
                    progress::step(
                        "unpacking",
                        format!(
                            "{} is compressed or encrypted: its pages are unpacked before the pod runs (an uncompressed archive, --compress none, is restored lazily without that)",
                            path.display()
                        ),
                    );
                }
                Ok(Source::Archive { path, leave_pages })
            }
            other => Ok(other),
        }
    }

    /// Unpacks into the new directory `dir`, checking everything; says which page images it
    /// left where they are.
    pub(super) fn unpack(
        self,
        t: &Target,
        a: &RestoreArgs,
        dir: &Path,
    ) -> Result<(PodOptions, Option<PageSource>)> {
        match self {
            Source::Archive {
                path,
                leave_pages: true,
            } => {
                let (options, source) = archive::extract_leaving_pages(&path, dir, &a.opening)?;
                // No CRIU page image (a gVisor pod's, say): nothing to serve.
                Ok((options, (!source.files.is_empty()).then_some(source)))
            }
            Source::Archive { path, .. } => {
                // Read twice: its records bounded and checked, then unpacked.
                let size = std::fs::metadata(&path).map_or(0, |m| m.len());
                let _reading = progress::bytes(
                    "unpacking",
                    &format!("reading {} (checked, then unpacked)", path.display()),
                    2 * size,
                );
                Ok((archive::extract_with(&path, dir, &a.opening)?, None))
            }
            // A directory's page images stay where they are and are read from there.
            Source::Dir(path) => {
                archive::copy_from_dir(&path, dir, &a.opening, a.remote_pages.is_none())
            }
            // An uncompressed image's page images stay in containerd's store and are served
            // from there (each chunk checked), as from an uncompressed archive.
            Source::Image(reference) => tokio::task::block_in_place(|| {
                image::unpack_blocking(&t.address, &t.namespace, &reference, dir, &a.opening, true)
            }),
            Source::Stream { channel, peer, .. } => {
                // A node that names trusted signers takes only signed migrations too.
                let opening = Opening {
                    identities: Vec::new(),
                    verify: a.policy.signers()?,
                };
                let _receiving = progress::bytes("unpacking", &format!("receiving from {peer}"), 0);
                Ok((channel.receive_pod(dir, &opening, &peer)?, None))
            }
        }
    }
}

/// Writes the restore's options (lazy or not, where pages are read from) and the pod's claim
/// token (only the pod created here carries it) beside the restore directory, recording them
/// in `written` as they are made; returns the token.
pub(super) fn write_restore_files(
    store: &Path,
    restore_id: &str,
    (lazy, remote_pages): (bool, Option<PathBuf>),
    page_source: Option<PageSource>,
    written: &mut Vec<PathBuf>,
) -> Result<String> {
    let options_file = store.join(format!("{restore_id}{}", layout::RESTORE_OPTIONS_SUFFIX));
    let token_file = store.join(format!("{restore_id}{}", layout::RESTORE_TOKEN_SUFFIX));
    written.push(store.join(format!("{restore_id}.pod")));
    written.push(options_file.clone());
    written.push(token_file.clone());
    // Pages left in place are served through the shim's page server: lazily, or (eager)
    // all of them before the pod resumes.
    let options = layout::RestoreOptions {
        lazy: lazy || page_source.is_some(),
        pages_before_resume: !lazy && page_source.is_some(),
        page_source,
        remote_pages,
    };
    files::write_new_private(&options_file, &serde_json::to_vec(&options)?)?;
    let token = files::random_id()?;
    files::write_new_private(&token_file, token.as_bytes())?;
    Ok(token)
}
