//! Where a checkpoint goes: an archive file, a checkpoint directory, a checkpoint image in
//! containerd's store, or a migration stream. Each checks up front that it can take the pod,
//! names its staging area, and delivers the staged, manifested pod.

use std::{
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

use anyhow::{bail, Context, Result};
use ed25519_dalek::SigningKey;

use crate::{
    archive::{self, Compression},
    files,
    image::{self, ImageStoreClient},
    ops::Target,
    stream::Channel,
};

/// Where a checkpoint goes.
pub enum Destination {
    /// An archive file that must not exist yet; encrypted to `recipients` when there are any.
    Archive {
        path: PathBuf,
        compression: Compression,
        recipients: Vec<age::x25519::Recipient>,
    },
    /// A checkpoint directory that must not exist yet (the archive's files, unpacked, 0700).
    Dir(PathBuf),
    /// A checkpoint image `reference` in containerd's image store.
    Image {
        reference: String,
        compression: Compression,
    },
    /// A migration peer (`to`) that restores the pod and answers with its new id. Post-copy:
    /// the pod's pages are not in its files; the shim serves them on `page_socket` (from its
    /// answer) and they are relayed to the peer until it has them all.
    Stream {
        channel: Box<Channel>,
        to: String,
        post_copy: bool,
        page_socket: Option<PathBuf>,
    },
}

/// What a destination took.
pub struct Delivered {
    pub bytes: u64,
    /// The pod's id on the migration peer.
    pub peer_pod: Option<String>,
    /// Post-copy: when the peer said its pod runs (its pages came after).
    pub running_at: Option<std::time::Instant>,
    /// Post-copy: the leases on the shim's page socket, dropped once the shim was told to
    /// stop the pod.
    pub leases: Vec<std::os::unix::net::UnixStream>,
}

impl Destination {
    /// The command line's choice: `--image REF`, or `--output PATH` (a trailing `/` asks for
    /// a directory).
    pub fn from_flags(
        output: Option<PathBuf>,
        image: Option<String>,
        compression: Compression,
        recipients: Vec<age::x25519::Recipient>,
    ) -> Result<Destination> {
        if let Some(reference) = image {
            if !recipients.is_empty() {
                bail!("--image and --encrypt-to do not go together: a checkpoint image is not encrypted (sign it with --sign-key, keep it in a private registry)");
            }
            return Ok(Destination::Image {
                reference,
                compression,
            });
        }
        let Some(path) = output else {
            bail!("say where the checkpoint goes: --output or --image");
        };
        let text = path.to_string_lossy();
        if text.ends_with('/') {
            if !recipients.is_empty() {
                bail!(
                    "a checkpoint directory is not encrypted: --encrypt-to wants an archive file"
                );
            }
            return Ok(Destination::Dir(PathBuf::from(text.trim_end_matches('/'))));
        }
        Ok(Destination::Archive {
            path,
            compression,
            recipients,
        })
    }

    /// How messages name it.
    pub fn describe(&self) -> String {
        match self {
            Destination::Archive { path, .. } | Destination::Dir(path) => {
                path.display().to_string()
            }
            Destination::Image { reference, .. } => format!("image {reference}"),
            Destination::Stream { to, .. } => format!("the stream to {to}"),
        }
    }

    /// What a failure leaves undone, for its message.
    pub fn undelivered(&self) -> &'static str {
        match self {
            Destination::Archive { .. } => "no archive was written",
            _ => "the pod was not delivered",
        }
    }

    /// Refuses a destination that exists already (nothing is ever replaced).
    pub async fn check_new(&self, t: &Target) -> Result<()> {
        match self {
            Destination::Archive { path, .. } if path.symlink_metadata().is_ok() => bail!(
                "{} already exists; choose another --output (an archive is never replaced)",
                path.display()
            ),
            Destination::Dir(path) if path.symlink_metadata().is_ok() => {
                bail!("{} already exists; choose a new directory", path.display())
            }
            Destination::Image { reference, .. } => {
                let store = ImageStoreClient::connect(&t.address, &t.namespace).await?;
                if store.get(reference).await?.is_some() {
                    bail!("image {reference} already exists; remove it first (`ctr -n {} images rm {reference}`) or choose another reference", t.namespace);
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// The directory the pod is written into (what the space check looks at), and the name
    /// its staging directory starts with.
    pub fn output_dir(&self, pod: &str) -> Result<(PathBuf, String)> {
        // The pod as the user named it (`NAMESPACE/NAME` too), as one plain file name part.
        let pod: String = pod
            .chars()
            .map(|c| match c {
                'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '-' | '_' => c,
                _ => '_',
            })
            .collect();
        let (path, label) = match self {
            Destination::Archive { path, .. } | Destination::Dir(path) => (
                path,
                path.file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into(),
            ),
            // Not written anywhere by name: staged in root's private staging area.
            Destination::Image { .. } => return staging_area(format!("{pod}.image")),
            Destination::Stream { .. } => return staging_area(format!("{pod}.migration")),
        };
        let parent = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        if !parent.is_dir() {
            bail!("directory {} does not exist", parent.display());
        }
        Ok((parent.to_path_buf(), label))
    }

    /// Whether the destination makes the manifest itself while it writes (an archive file or
    /// an image, packed in one pass): the staged pod then goes without one.
    pub fn makes_manifest(&self) -> bool {
        matches!(
            self,
            Destination::Archive { .. } | Destination::Image { .. }
        )
    }

    /// Hands the staged pod over (an archive signed with `sign`: the other destinations take
    /// the manifest and signature staged); an interrupt (`cancel`) meanwhile leaves nothing
    /// behind.
    pub async fn deliver(
        self,
        t: &Target,
        staging: &Path,
        sign: Option<SigningKey>,
        cancel: Arc<AtomicBool>,
    ) -> Result<Delivered> {
        let staging = staging.to_path_buf();
        let blocking = |f: Box<dyn FnOnce() -> Result<Delivered> + Send>| async move {
            tokio::task::spawn_blocking(f)
                .await
                .context("packaging worker")?
        };
        match self {
            Destination::Archive {
                path,
                compression,
                recipients,
            } => {
                blocking(Box::new(move || {
                    let how = archive::Writing {
                        compression,
                        recipients: &recipients,
                        cancel: &cancel,
                    };
                    let bytes = write_archive(&staging, &path, &how, sign.as_ref())?;
                    Ok(plain(bytes))
                }))
                .await
            }
            Destination::Dir(dest) => {
                blocking(Box::new(move || {
                    let placed = archive::place_dir(&staging, &dest)?;
                    // Interrupted meanwhile: the pod runs on, so no checkpoint of it may be left.
                    if cancel.load(Ordering::SeqCst) {
                        let _ = std::fs::remove_dir_all(&dest);
                        bail!("interrupted; {} was removed again", dest.display());
                    }
                    Ok(plain(placed))
                }))
                .await
            }
            Destination::Image {
                reference,
                compression,
            } => {
                let built = image::build_from_dir(
                    &t.address,
                    &t.namespace,
                    &staging,
                    &reference,
                    compression,
                    archive::Sealing::Made(sign.map(Box::new)),
                )
                .await?;
                // Interrupted meanwhile: the pod runs on, so no image of it may be left.
                if cancel.load(Ordering::SeqCst) {
                    if let Ok(store) = ImageStoreClient::connect(&t.address, &t.namespace).await {
                        let _ = store.delete(&reference).await;
                    }
                    bail!("interrupted; image {reference} was removed again");
                }
                Ok(plain(built))
            }
            Destination::Stream {
                mut channel,
                to,
                post_copy,
                page_socket,
            } => {
                let page_socket = match post_copy {
                    true => Some(page_socket.context("the pod's shim named no page socket")?),
                    false => None,
                };
                blocking(Box::new(move || {
                    send_stream(&mut channel, &to, &staging, page_socket)
                }))
                .await
            }
        }
    }
}

/// Sends the staged pod to a migration peer; post-copy (`page_socket`): then relays its
/// pages until the peer has them all.
fn send_stream(
    channel: &mut Channel,
    to: &str,
    staging: &Path,
    page_socket: Option<PathBuf>,
) -> Result<Delivered> {
    let Some(page_socket) = page_socket else {
        let sent = channel.send_pod(staging, to)?;
        return Ok(Delivered {
            bytes: sent.bytes,
            peer_pod: Some(sent.pod_id),
            running_at: None,
            leases: Vec::new(),
        });
    };
    let bytes = channel.send_pod_files(staging, to)?;
    let copied = channel
        .relay_source(&page_socket, to)
        .with_context(|| format!("the pod's memory did not all reach {to} (post-copy)"))?;
    Ok(Delivered {
        bytes: bytes + copied.page_bytes,
        peer_pod: Some(copied.pod_id),
        running_at: Some(copied.running_at),
        leases: copied.leases,
    })
}

impl Destination {
    /// Post-copy: where the shim serves the pages (from its answer).
    pub fn set_page_socket(&mut self, socket: &str) {
        if let Destination::Stream { page_socket, .. } = self {
            *page_socket = Some(socket).filter(|s| !s.is_empty()).map(PathBuf::from);
        }
    }
}

fn plain(bytes: u64) -> Delivered {
    Delivered {
        bytes,
        peer_pod: None,
        running_at: None,
        leases: Vec::new(),
    }
}

/// Root's private staging area, for destinations that are not a path.
fn staging_area(label: String) -> Result<(PathBuf, String)> {
    Ok((
        files::private_root(Path::new(files::CHECKPOINT_STAGING))?,
        label,
    ))
}

/// Packs the archive in one pass and checks what was written before anything is stopped: a
/// stopping checkpoint's archive is the pod from now on. The staged files are used up.
fn write_archive(
    staging: &Path,
    output: &Path,
    how: &archive::Writing,
    sign: Option<&SigningKey>,
) -> Result<u64> {
    let written = archive::write_consuming(staging, output, how, sign)?;
    archive::check_written(output, &written).inspect_err(|_| {
        let _ = std::fs::remove_file(output);
    })?;
    Ok(written.bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recipient() -> age::x25519::Recipient {
        age::x25519::Identity::generate().to_public()
    }

    #[test]
    fn flags_choose_the_destination() {
        let d = Destination::from_flags(Some("/x/a.tar".into()), None, Compression::Zstd, vec![])
            .unwrap();
        assert!(
            matches!(d, Destination::Archive { ref path, compression: Compression::Zstd, .. } if path == Path::new("/x/a.tar"))
        );
        assert_eq!(d.undelivered(), "no archive was written");
        // A trailing slash asks for a directory, named without it.
        let d = Destination::from_flags(Some("/x/dir/".into()), None, Compression::None, vec![])
            .unwrap();
        assert!(matches!(d, Destination::Dir(ref p) if p == Path::new("/x/dir")));
        assert_eq!(d.describe(), "/x/dir");
        let d = Destination::from_flags(None, Some("reg/p:1".into()), Compression::Gzip, vec![])
            .unwrap();
        assert_eq!(d.describe(), "image reg/p:1");
        assert_eq!(d.undelivered(), "the pod was not delivered");
    }

    #[test]
    fn encryption_goes_only_to_archive_files() {
        let e = Destination::from_flags(
            None,
            Some("r:1".into()),
            Compression::None,
            vec![recipient()],
        )
        .err()
        .unwrap();
        assert!(
            e.to_string()
                .contains("--image and --encrypt-to do not go together"),
            "{e}"
        );
        let e = Destination::from_flags(
            Some("d/".into()),
            None,
            Compression::None,
            vec![recipient()],
        )
        .err()
        .unwrap();
        assert!(
            e.to_string()
                .contains("a checkpoint directory is not encrypted"),
            "{e}"
        );
        assert!(Destination::from_flags(
            Some("a".into()),
            None,
            Compression::None,
            vec![recipient()]
        )
        .is_ok());
        assert!(Destination::from_flags(None, None, Compression::None, vec![]).is_err());
    }

    #[test]
    fn files_are_written_beside_an_existing_directory_only() {
        let d = Destination::from_flags(
            Some("/no/such/dir/a.tar".into()),
            None,
            Compression::None,
            vec![],
        )
        .unwrap();
        let e = d.output_dir("p").unwrap_err();
        assert_eq!(e.to_string(), "directory /no/such/dir does not exist");
        let d =
            Destination::from_flags(Some("a.tar".into()), None, Compression::None, vec![]).unwrap();
        let (dir, label) = d.output_dir("p").unwrap();
        assert_eq!((dir, label.as_str()), (PathBuf::from("."), "a.tar"));
    }
}
