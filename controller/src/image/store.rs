use super::*;

/// containerd's image and content services in one namespace.
pub struct ImageStoreClient {
    pub(super) channel: Channel,
    pub(super) namespace: String,
    pub(super) lease: Option<String>,
}

impl ImageStoreClient {
    pub async fn connect(address: &str, namespace: &str) -> Result<Self> {
        Ok(ImageStoreClient {
            channel: crate::cri::channel(Path::new(address)).await?,
            namespace: namespace.to_string(),
            lease: None,
        })
    }

    pub(super) fn request<T>(&self, msg: T) -> Request<T> {
        let mut req = Request::new(msg);
        let md = req.metadata_mut();
        if let Ok(v) = self.namespace.parse() {
            md.insert("containerd-namespace", v);
        }
        if let Some(lease) = &self.lease {
            if let Ok(v) = lease.parse() {
                md.insert("containerd-lease", v);
            }
        }
        req
    }

    /// A lease that keeps what is written meanwhile from containerd's garbage collector,
    /// until the image names it (and for an hour at most, should we die).
    pub(super) async fn take_lease(&mut self) -> Result<()> {
        let expire = time::OffsetDateTime::now_utc() + time::Duration::hours(1);
        let expire = expire
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        let id = format!("stasis-{}", crate::files::random_suffix()?);
        let mut leases = LeasesClient::new(self.channel.clone());
        leases
            .create(
                self.request(containerd_client::services::v1::CreateRequest {
                    id: id.clone(),
                    labels: HashMap::from([("containerd.io/gc.expire".to_string(), expire)]),
                }),
            )
            .await
            .context("create a containerd lease")?;
        self.lease = Some(id);
        Ok(())
    }

    pub(super) async fn drop_lease(&mut self) {
        if let Some(id) = self.lease.take() {
            let mut leases = LeasesClient::new(self.channel.clone());
            let _ = leases
                .delete(
                    self.request(containerd_client::services::v1::DeleteRequest {
                        id,
                        sync: false,
                    }),
                )
                .await;
        }
    }

    /// Writes `produce`'s output into the content store as one blob, in a single pass: the
    /// bytes go to containerd as they are made; containerd hashes them as it writes them
    /// and its commit answers with the digest (hashing them here too cost a second pass over
    /// every page on a 2-core node). `produce` runs on a blocking thread and returns a value
    /// (a layer's diff id) passed back with the descriptor.
    pub(super) async fn write_blob<T: Send + 'static>(
        &self,
        media_type: &str,
        labels: HashMap<String, String>,
        produce: impl FnOnce(&mut ContentSink) -> Result<T> + Send + 'static,
    ) -> Result<(Descriptor, T)> {
        let (tx, rx) = tokio::sync::mpsc::channel::<WriteContentRequest>(4);
        let reference = format!(
            "stasis-{}{}",
            crate::files::random_suffix()?,
            crate::files::random_suffix()?
        );
        let ingest = reference.clone();
        let mut content = ContentClient::new(self.channel.clone());
        let started = std::time::Instant::now();
        let producer = tokio::task::spawn_blocking(move || {
            let mut sink = ContentSink {
                tx,
                reference,
                offset: 0,
                buf: Vec::with_capacity(CHUNK),
            };
            let made = produce(&mut sink)?;
            let size = sink.commit(labels)?;
            Ok::<_, anyhow::Error>((size, made, started.elapsed()))
        });
        let call = content.write(self.request(tokio_stream::wrappers::ReceiverStream::new(rx)));
        let (mut failure, mut committed, mut existing) = (None, None, None);
        match call.await {
            Ok(r) => {
                let mut responses = r.into_inner();
                loop {
                    match responses.message().await {
                        Ok(Some(r)) if r.action == WriteAction::Commit as i32 => {
                            committed = Some(r.digest);
                            break;
                        }
                        Ok(Some(_)) => {}
                        Ok(None) => break,
                        // The same bytes are there already (an identical layer): fine, and
                        // the refusal names their digest.
                        Err(s) if s.code() == tonic::Code::AlreadyExists => {
                            existing = Some(s.message().to_string());
                            break;
                        }
                        Err(s) => {
                            failure = Some(s.message().to_string());
                            break;
                        }
                    }
                }
            }
            Err(s) => failure = Some(s.message().to_string()),
        }
        let produced = producer.await?;
        if failure.is_some() || produced.is_err() {
            // Nothing half-written stays in containerd's ingest area.
            let _ = ContentClient::new(self.channel.clone())
                .abort(self.request(containerd_client::services::v1::AbortRequest {
                    r#ref: ingest.clone(),
                }))
                .await;
        }
        if let Some(f) = failure {
            bail!("write into containerd's content store: {f}");
        }
        let (size, made, sent) = produced?;
        tracing::debug!(
            bytes = size,
            sent_ms = sent.as_millis() as u64,
            committed_ms = (started.elapsed() - sent).as_millis() as u64,
            "blob written into containerd's content store"
        );
        let digest = match (committed, existing) {
            (Some(d), _) if !d.is_empty() => d,
            (_, Some(refusal)) => self.existing_blob(&refusal, size).await?,
            _ => bail!("containerd ended the content write without committing it"),
        };
        Ok((descriptor(media_type, &digest, size), made))
    }

    /// The blob containerd refused to write again because it holds it already: the digest
    /// its refusal names ("content sha256:…: already exists"), confirmed by its own record
    /// of a blob of that digest and of `size` bytes.
    async fn existing_blob(&self, refusal: &str, size: u64) -> Result<String> {
        let digest = named_digest(refusal)
            .with_context(|| format!("containerd refused the content write: {refusal}"))?;
        let info = ContentClient::new(self.channel.clone())
            .info(self.request(containerd_client::services::v1::InfoRequest {
                digest: digest.clone(),
            }))
            .await
            .map_err(|s| anyhow::anyhow!("look up {digest} in containerd: {}", s.message()))?
            .into_inner()
            .info
            .with_context(|| format!("containerd has no record of {digest}"))?;
        if info.size as u64 != size {
            bail!(
                "containerd says {digest} exists already, but with {} bytes, not {size}",
                info.size
            );
        }
        Ok(digest)
    }

    /// [`Self::write_blob`] of bytes in memory (a config, a manifest).
    pub(super) async fn write_bytes(
        &self,
        bytes: Vec<u8>,
        media_type: &str,
        labels: HashMap<String, String>,
    ) -> Result<Descriptor> {
        let (d, ()) = self
            .write_blob(media_type, labels, move |sink| Ok(sink.write_all(&bytes)?))
            .await?;
        Ok(d)
    }

    /// Reads a whole (small) blob, checking its digest.
    pub(super) async fn read_small(&self, desc: &Descriptor, limit: i64) -> Result<Vec<u8>> {
        if desc.size > limit {
            bail!(
                "{} is {} bytes; at most {limit} expected",
                desc.digest,
                desc.size
            );
        }
        let mut reader = self.blob(desc).await?;
        let mut out = Vec::new();
        while let Some(chunk) = reader.next_chunk().await? {
            out.extend_from_slice(&chunk);
        }
        reader.finish()?;
        Ok(out)
    }

    /// A blob's bytes as they come from containerd, hashed as they are read.
    pub(super) async fn blob(&self, desc: &Descriptor) -> Result<BlobStream> {
        let mut content = ContentClient::new(self.channel.clone());
        let stream = content
            .read(self.request(ReadContentRequest {
                digest: desc.digest.clone(),
                offset: 0,
                size: 0,
            }))
            .await
            .map_err(|s| anyhow::anyhow!("read {} from containerd: {}", desc.digest, s.message()))?
            .into_inner();
        Ok(BlobStream {
            stream,
            digest: desc.digest.clone(),
            size: desc.size,
            hasher: sha2::Sha256::new(),
            read: 0,
        })
    }

    /// The image `name` (its target descriptor), or None.
    pub async fn get(&self, name: &str) -> Result<Option<Descriptor>> {
        let mut images = ImagesClient::new(self.channel.clone());
        match images
            .get(self.request(GetImageRequest {
                name: name.to_string(),
            }))
            .await
        {
            Ok(r) => Ok(r.into_inner().image.and_then(|i| i.target)),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(None),
            Err(s) => bail!("look up image {name}: {}", s.message()),
        }
    }

    /// The names of every image in the namespace.
    pub async fn names(&self) -> Result<Vec<String>> {
        let mut images = ImagesClient::new(self.channel.clone());
        let listed = images
            .list(
                self.request(containerd_client::services::v1::ListImagesRequest {
                    filters: Vec::new(),
                }),
            )
            .await
            .map_err(|s| anyhow::anyhow!("list images: {}", s.message()))?;
        Ok(listed
            .into_inner()
            .images
            .into_iter()
            .map(|i| i.name)
            .collect())
    }

    pub async fn delete(&self, name: &str) -> Result<()> {
        let mut images = ImagesClient::new(self.channel.clone());
        images
            .delete(self.request(DeleteImageRequest {
                name: name.to_string(),
                sync: false,
                target: None,
            }))
            .await
            .map_err(|s| anyhow::anyhow!("remove image {name}: {}", s.message()))?;
        Ok(())
    }

    pub(super) async fn create(&self, name: &str, target: Descriptor) -> Result<()> {
        let mut images = ImagesClient::new(self.channel.clone());
        let now = prost_types::Timestamp::from(std::time::SystemTime::now());
        images
            .create(self.request(CreateImageRequest {
                image: Some(Image {
                    name: name.to_string(),
                    labels: HashMap::new(),
                    target: Some(target),
                    created_at: Some(now),
                    updated_at: Some(now),
                }),
                source_date_epoch: None,
            }))
            .await
            .map_err(|s| {
                if s.code() == tonic::Code::AlreadyExists {
                    anyhow::anyhow!("image {name} already exists; remove it first (`ctr -n NS images rm {name}`) or choose another reference")
                } else {
                    anyhow::anyhow!("create image {name}: {}", s.message())
                }
            })?;
        Ok(())
    }
}

pub(super) fn descriptor(media_type: &str, digest: &str, size: u64) -> Descriptor {
    Descriptor {
        media_type: media_type.to_string(),
        digest: digest.to_string(),
        size: size as i64,
        annotations: HashMap::new(),
    }
}

/// The first well-formed `sha256:<64 lowercase hex>` digest that `text` names.
fn named_digest(text: &str) -> Option<String> {
    text.match_indices("sha256:").find_map(|(i, _)| {
        let hex = text.get(i + 7..i + 71)?;
        let well_formed = hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        (well_formed && !text[i + 71..].starts_with(|c: char| c.is_ascii_hexdigit()))
            .then(|| text[i..i + 71].to_string())
    })
}

/// How much a content write sends at once.
pub(super) const CHUNK: usize = 1 << 20;

/// The writing end of a content-store write: buffers, hashes and sends the bytes.
pub(super) struct ContentSink {
    pub(super) tx: tokio::sync::mpsc::Sender<WriteContentRequest>,
    pub(super) reference: String,
    pub(super) offset: u64,
    pub(super) buf: Vec<u8>,
}

impl ContentSink {
    pub(super) fn send(
        &mut self,
        action: WriteAction,
        labels: HashMap<String, String>,
        expected: String,
    ) -> std::io::Result<()> {
        let data = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        let n = data.len() as u64;
        let req = WriteContentRequest {
            action: action as i32,
            r#ref: self.reference.clone(),
            total: if action == WriteAction::Commit {
                self.offset as i64
            } else {
                0
            },
            expected,
            offset: (self.offset - if action == WriteAction::Commit { 0 } else { n }) as i64,
            data,
            labels,
        };
        self.tx.blocking_send(req).map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                "containerd ended the content write",
            )
        })
    }

    /// Sends what is left and commits (containerd names the digest); returns the size.
    pub(super) fn commit(mut self, labels: HashMap<String, String>) -> Result<u64> {
        if !self.buf.is_empty() {
            self.send(WriteAction::Write, HashMap::new(), String::new())?;
        }
        self.send(WriteAction::Commit, labels, String::new())?;
        Ok(self.offset)
    }
}

impl Write for ContentSink {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.offset += data.len() as u64;
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK {
            self.send(WriteAction::Write, HashMap::new(), String::new())?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A blob read from containerd, its digest checked once it is all read.
pub struct BlobStream {
    pub(super) stream: tonic::Streaming<containerd_client::services::v1::ReadContentResponse>,
    pub(super) digest: String,
    pub(super) size: i64,
    pub(super) hasher: sha2::Sha256,
    pub(super) read: i64,
}

impl BlobStream {
    pub(super) async fn next_chunk(&mut self) -> Result<Option<Vec<u8>>> {
        let msg = self
            .stream
            .message()
            .await
            .map_err(|s| anyhow::anyhow!("read {}: {}", self.digest, s.message()))?;
        Ok(msg.map(|m| {
            self.hasher.update(&m.data);
            self.read += m.data.len() as i64;
            m.data
        }))
    }

    pub(super) fn finish(&mut self) -> Result<()> {
        let got = format!(
            "sha256:{}",
            hex::encode(std::mem::take(&mut self.hasher).finalize())
        );
        if got != self.digest || self.read != self.size {
            bail!(
                "blob {} is corrupt or was changed ({} bytes, {got}; the image says {} bytes): refused",
                self.digest,
                self.read,
                self.size
            );
        }
        Ok(())
    }
}

/// A blob as a blocking reader (for tar), for use inside `block_in_place`: reads past the
/// end check the digest, and a mismatch is an error of the last read.
pub(super) struct BlockingBlob {
    pub(super) blob: BlobStream,
    pub(super) handle: tokio::runtime::Handle,
    pub(super) buf: Vec<u8>,
    pub(super) at: usize,
    pub(super) done: bool,
}

impl Read for BlockingBlob {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.at == self.buf.len() {
            if self.done {
                return Ok(0);
            }
            match self.handle.block_on(self.blob.next_chunk()) {
                Ok(Some(chunk)) => {
                    crate::progress::count(chunk.len() as u64);
                    self.buf = chunk;
                    self.at = 0;
                }
                Ok(None) => {
                    self.done = true;
                    self.blob.finish().map_err(|e| {
                        std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{e:#}"))
                    })?;
                }
                Err(e) => return Err(std::io::Error::other(format!("{e:#}"))),
            }
        }
        let n = out.len().min(self.buf.len() - self.at);
        out[..n].copy_from_slice(&self.buf[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// A layer's decompressed bytes whose end (or failure) is always its blob's end: the blob is
/// then read to its last byte and its digest checked, so a changed blob is refused as such
/// (not as whatever the decompressor or tar made of it), whatever stops reading early.
pub(super) struct CheckedLayer {
    pub(super) decoded: Box<dyn Read>,
    pub(super) raw: std::rc::Rc<std::cell::RefCell<BlockingBlob>>,
}

/// Shares one blob between its decompressor and the [`CheckedLayer`] that checks it.
pub(super) struct SharedBlob(pub(super) std::rc::Rc<std::cell::RefCell<BlockingBlob>>);

impl Read for SharedBlob {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        self.0.borrow_mut().read(out)
    }
}

impl CheckedLayer {
    /// Reads the rest of the raw blob; its digest error, if any.
    pub(super) fn drain(&mut self) -> std::io::Result<()> {
        std::io::copy(&mut *self.raw.borrow_mut(), &mut std::io::sink()).map(drop)
    }
}

impl Read for CheckedLayer {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        match self.decoded.read(out) {
            Ok(0) if !out.is_empty() => self.drain().map(|()| 0),
            Ok(n) => Ok(n),
            Err(e) => Err(self.drain().err().unwrap_or(e)),
        }
    }
}

#[cfg(test)]
mod digest_tests {
    use super::named_digest;

    #[test]
    fn a_refusal_names_the_digest_it_holds() {
        let d = format!("sha256:{}", "ab".repeat(32));
        assert_eq!(
            named_digest(&format!("content {d}: already exists")),
            Some(d.clone())
        );
        // Too short, too long, or not hex: not a digest.
        assert_eq!(named_digest("content sha256:abc: already exists"), None);
        assert_eq!(named_digest(&format!("content {d}0: already exists")), None);
        assert_eq!(
            named_digest(&format!("sha256:{} exists", "zz".repeat(32))),
            None
        );
        assert_eq!(named_digest(&format!("x sha256:{}", "AB".repeat(32))), None);
    }
}
