use super::*;
use stasis_api::layout::DigestKind;

#[derive(serde::Serialize, serde::Deserialize)]
pub(super) struct Manifest {
    pub(super) version: u32,
    pub(super) files: std::collections::BTreeMap<String, FileSum>,
}

impl Manifest {
    /// The hash its digests are made with (by its format version).
    pub(super) fn digest(&self) -> DigestKind {
        DigestKind::of_version(self.version)
    }
}

#[derive(serde::Serialize, serde::Deserialize, PartialEq)]
pub(super) struct FileSum {
    pub(super) size: u64,
    /// Of the file; of its concatenated chunk digests when it is chunked. Format versions up
    /// to 3 give `sha256`, version 4 `blake3`; an entry with the other one (or both) is
    /// refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) blake3: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) chunk_size: Option<u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(super) chunks: Vec<String>,
}

impl FileSum {
    fn new(
        size: u64,
        kind: DigestKind,
        digest: &[u8],
        chunk_size: Option<u64>,
        chunks: Vec<String>,
    ) -> FileSum {
        let digest = Some(hex::encode(digest));
        let (sha256, blake3) = match kind {
            DigestKind::Sha256 => (digest, None),
            DigestKind::Blake3 => (None, digest),
        };
        FileSum {
            size,
            sha256,
            blake3,
            chunk_size,
            chunks,
        }
    }

    /// The file's digest, as `kind: hex`, for messages.
    fn digest_text(&self) -> String {
        match (&self.blake3, &self.sha256) {
            (Some(b), None) => format!("blake3 {b}"),
            (None, Some(s)) => format!("sha256 {s}"),
            _ => "no single digest".to_string(),
        }
    }
}

/// Every regular file below `dir` (relative paths, sorted), but the manifest itself.
pub(super) fn regular_files(dir: &Path) -> Result<Vec<PathBuf>> {
    fn walk(root: &Path, at: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
        for e in std::fs::read_dir(at).with_context(|| format!("read {}", at.display()))? {
            let p = e?.path();
            let m = p.symlink_metadata()?;
            if m.is_dir() {
                walk(root, &p, out)?;
            } else if m.is_file() {
                let rel = p.strip_prefix(root).unwrap_or(&p).to_path_buf();
                if rel != Path::new(layout::MANIFEST) && rel != Path::new(layout::SIGNATURE) {
                    out.push(rel);
                }
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out)?;
    out.sort();
    Ok(out)
}

/// The sum of the file at `path` with the hash `kind`, chunk by chunk when `chunk_size` is
/// given (page images: a lazy restore checks each chunk it reads on its own).
pub(super) fn sum_of(path: &Path, chunk_size: Option<u64>, kind: DigestKind) -> Result<FileSum> {
    let mut summer = Summer::new(chunk_size, kind);
    std::io::copy(&mut files::open_nofollow(path)?, &mut summer)?;
    Ok(summer.finish())
}

/// The sum a chunked file's manifest entry must carry, made from its own chunk digests
/// (None if one is not hex): what the whole-file check compares for an image left unread.
fn sum_of_chunks(entry: &FileSum, kind: DigestKind) -> Option<FileSum> {
    let mut top = Hasher::new(kind);
    for chunk in &entry.chunks {
        top.update(&hex::decode(chunk).ok()?);
    }
    Some(FileSum::new(
        entry.size,
        kind,
        &top.take(),
        entry.chunk_size,
        entry.chunks.clone(),
    ))
}

/// One running digest of either kind.
enum Hasher {
    Sha256(sha2::Sha256),
    Blake3(Box<blake3::Hasher>),
}

impl Hasher {
    fn new(kind: DigestKind) -> Hasher {
        match kind {
            DigestKind::Sha256 => Hasher::Sha256(Default::default()),
            DigestKind::Blake3 => Hasher::Blake3(Default::default()),
        }
    }

    fn update(&mut self, bytes: &[u8]) {
        use sha2::Digest;
        match self {
            Hasher::Sha256(h) => h.update(bytes),
            Hasher::Blake3(h) => {
                h.update(bytes);
            }
        }
    }

    /// The digest so far; the hasher starts again.
    fn take(&mut self) -> Vec<u8> {
        use sha2::Digest;
        match self {
            Hasher::Sha256(h) => std::mem::take(h).finalize().to_vec(),
            Hasher::Blake3(h) => {
                let d = h.finalize().as_bytes().to_vec();
                h.reset();
                d
            }
        }
    }
}

/// A [`FileSum`] made from bytes as they pass (written into it), so a writer can sum what it
/// copies in the same pass.
pub(super) struct Summer {
    kind: DigestKind,
    chunk: Option<u64>,
    size: u64,
    /// The whole file's hasher, or the current chunk's.
    hasher: Hasher,
    /// Bytes in the current chunk.
    in_chunk: u64,
    chunks: Vec<String>,
    top: Hasher,
}

impl Summer {
    pub(super) fn new(chunk: Option<u64>, kind: DigestKind) -> Self {
        Summer {
            kind,
            chunk,
            size: 0,
            hasher: Hasher::new(kind),
            in_chunk: 0,
            chunks: Vec::new(),
            top: Hasher::new(kind),
        }
    }

    pub(super) fn size(&self) -> u64 {
        self.size
    }

    fn end_chunk(&mut self) {
        let digest = self.hasher.take();
        self.top.update(&digest);
        self.chunks.push(hex::encode(digest));
        self.in_chunk = 0;
    }

    pub(super) fn finish(mut self) -> FileSum {
        let digest = match self.chunk {
            None => self.hasher.take(),
            Some(_) => {
                if self.in_chunk > 0 {
                    self.end_chunk();
                }
                self.top.take()
            }
        };
        FileSum::new(self.size, self.kind, &digest, self.chunk, self.chunks)
    }
}

impl Write for Summer {
    fn write(&mut self, mut buf: &[u8]) -> std::io::Result<usize> {
        let n = buf.len();
        while !buf.is_empty() {
            let take = match self.chunk {
                Some(c) => buf.len().min((c - self.in_chunk) as usize),
                None => buf.len(),
            };
            self.hasher.update(&buf[..take]);
            self.in_chunk += take as u64;
            self.size += take as u64;
            buf = &buf[take..];
            if self.chunk == Some(self.in_chunk) {
                self.end_chunk();
            }
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Closes every file and directory below `dir` to group and others (owner bits kept): a
/// pod checkpoint is memory and environment, secret as a whole, and the archive's entries
/// keep these modes wherever it is unpacked.
pub fn make_private(dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for e in std::fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
        let p = e?.path();
        let m = p.symlink_metadata()?;
        if m.file_type().is_symlink() {
            continue;
        }
        let mode = m.permissions().mode() & 0o7700;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))
            .with_context(|| format!("make {} private", p.display()))?;
        if m.is_dir() {
            make_private(&p)?;
        }
    }
    Ok(())
}

/// Writes the manifest of `dir` (size and digest of every regular file) into it, 0600.
pub fn write_manifest(dir: &Path) -> Result<()> {
    let mut files = std::collections::BTreeMap::new();
    for rel in regular_files(dir)? {
        let sum = sum_of(&dir.join(&rel), chunking(&rel), WRITTEN_DIGEST)?;
        files.insert(rel.display().to_string(), sum);
    }
    let path = dir.join(layout::MANIFEST);
    let mut f = files::create_file(&path, 0o600)?;
    f.write_all(&manifest_bytes(files)?)?;
    Ok(())
}

/// The manifest listing `files`, as it is stored.
pub(super) fn manifest_bytes(
    files: std::collections::BTreeMap<String, FileSum>,
) -> Result<Vec<u8>> {
    Ok(serde_json::to_vec(&Manifest {
        version: layout::MANIFEST_VERSION,
        files,
    })?)
}

/// The digest this build writes (that of [`layout::MANIFEST_VERSION`]).
pub(super) const WRITTEN_DIGEST: DigestKind = DigestKind::Blake3;

/// Whether the file at `rel` (relative to the checkpoint's top) is summed chunk by chunk.
pub(super) fn chunking(rel: &Path) -> Option<u64> {
    layout::is_page_image(rel).then_some(layout::PAGE_CHUNK_SIZE)
}

/// Checks an unpacked archive against its manifest: the version known, every file listed
/// there with its size and digest, nothing unlisted. Names the first file that differs.
pub fn check_manifest(dir: &Path) -> Result<()> {
    check_manifest_except(dir, &read_manifest(dir)?, &Default::default())
}

pub(super) fn read_manifest(dir: &Path) -> Result<Manifest> {
    let path = dir.join(layout::MANIFEST);
    let text = std::fs::read(&path).context(
        "archive has no manifest.json (written by a stasis before archives carried one, or stripped)",
    )?;
    let manifest: Manifest =
        serde_json::from_slice(&text).context("archive manifest.json is not a manifest")?;
    if !layout::MANIFEST_VERSIONS_READ.contains(&manifest.version) {
        bail!(
            "archive format version {} is unknown (this stasisctl reads {} to {}); use a newer stasisctl",
            manifest.version,
            layout::MANIFEST_VERSIONS_READ.start(),
            layout::MANIFEST_VERSIONS_READ.end()
        );
    }
    Ok(manifest)
}

/// [`check_manifest`], but the files in `left_in_archive` (page images not unpacked, read
/// from the archive later, chunk by chunk) are only checked to be listed, with their size,
/// their chunk digests and a file digest that is theirs (of the hash the version names).
pub(super) fn check_manifest_except(
    dir: &Path,
    manifest: &Manifest,
    left_in_archive: &std::collections::BTreeMap<String, layout::PageSpan>,
) -> Result<()> {
    for (key, span) in left_in_archive {
        match manifest.files.get(key) {
            Some(want)
                if want.size == span.size
                    && want.chunks == span.chunks
                    && sum_of_chunks(want, manifest.digest()).as_ref() == Some(want) => {}
            Some(want) => bail!(
                "archive file {key} is corrupt or was changed ({} bytes; the manifest says {} bytes)",
                span.size,
                want.size
            ),
            None => bail!("archive file {key} is not in its manifest: the archive was changed"),
        }
    }
    let present = regular_files(dir)?;
    for rel in &present {
        let key = rel.display().to_string();
        let Some(want) = manifest.files.get(&key) else {
            bail!("archive file {key} is not in its manifest: the archive was changed");
        };
        if left_in_archive.contains_key(&key) {
            bail!("hostile archive: {key} twice");
        }
        if want
            .chunk_size
            .is_some_and(|c| !(4096..=1 << 30).contains(&c))
        {
            bail!("archive manifest gives {key} an impossible chunk size");
        }
        let got = sum_of(&dir.join(rel), want.chunk_size, manifest.digest())?;
        if got != *want {
            bail!(
                "archive file {key} is corrupt or was changed ({} bytes, {}; the manifest says {} bytes, {})",
                got.size,
                got.digest_text(),
                want.size,
                want.digest_text()
            );
        }
    }
    if let Some(missing) = manifest.files.keys().find(|k| {
        !left_in_archive.contains_key(*k) && !present.iter().any(|p| p.display().to_string() == **k)
    }) {
        bail!("archive file {missing} listed in the manifest is missing");
    }
    Ok(())
}

/// The largest chunk a manifest may give a page image: the shim holds one chunk per image
/// in memory while it serves pages.
pub(super) const MAX_CHUNK: u64 = 16 << 20;
