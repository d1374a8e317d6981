use super::*;

/// A scratch directory of its own per test (no shared state, removed at the end).
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let p =
            std::env::temp_dir().join(format!("stasis-archive-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The layout a shim writes for a one-container pod.
fn checkpoint_dir(root: &Path) -> PathBuf {
    let dir = root.join("ckpt");
    let c = dir.join("abc-web");
    std::fs::create_dir_all(c.join("checkpoint")).unwrap();
    std::fs::write(
        dir.join("pod.options"),
        r#"{"version":1,"containers":{"web":"abc-web"},"annotations":{"io.stasis.engine":"runc"}}"#,
    )
    .unwrap();
    std::fs::write(
        dir.join("pod.dump"),
        r#"{"metadata":{"name":"web-pod","namespace":"default"}}"#,
    )
    .unwrap();
    std::fs::write(
        c.join("config.dump"),
        r#"{"id":"abc","rootfsImageName":"busybox","checkpointedTime":"2026-12-01T00:00:00Z"}"#,
    )
    .unwrap();
    std::fs::write(c.join("container-config.json"), "{}").unwrap();
    std::fs::write(
        c.join("stasis.json"),
        r#"{"engine":"runc","frozen_ms":12.5,"checkpoint_bytes":4096,"was_paused":true}"#,
    )
    .unwrap();
    std::fs::write(c.join("checkpoint/pages-1.img"), vec![7u8; 4096]).unwrap();
    dir
}

#[test]
fn written_archives_inspect_and_extract_in_every_compression() {
    let s = Scratch::new("roundtrip");
    let dir = checkpoint_dir(&s.0);
    write_manifest(&dir).unwrap();
    for (compression, name) in [
        (Compression::None, "a.tar"),
        (Compression::Gzip, "a.tar.gz"),
        (Compression::Zstd, "a.tar.zst"),
    ] {
        let dest = s.0.join(name);
        let size = write(&dir, &dest, compression).unwrap();
        assert_eq!(size, std::fs::metadata(&dest).unwrap().len());
        let sum = inspect(&dest).unwrap();
        assert_eq!(sum.pod_name, "web-pod", "{name}");
        assert_eq!(sum.engine, "runc");
        assert_eq!(sum.containers.len(), 1);
        let c = &sum.containers[0];
        assert_eq!(
            (c.name.as_str(), c.id.as_str(), c.image.as_str()),
            ("web", "abc", "busybox")
        );
        assert!(c.was_paused && c.frozen_ms == 12.5 && c.checkpoint_bytes == 4096);
        let out = s.0.join(format!("x-{name}"));
        let opts = extract(&dest, &out).unwrap();
        assert_eq!(opts.containers["web"], "abc-web");
        assert_eq!(
            std::fs::read(out.join("abc-web/checkpoint/pages-1.img")).unwrap(),
            vec![7u8; 4096]
        );
        // No temporary file left beside the archive.
        let partial: Vec<_> = std::fs::read_dir(&s.0)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().contains("partial"))
            .collect();
        assert!(partial.is_empty(), "{partial:?}");
    }
    // One changed byte after the manifest was written: refused, naming the file.
    std::fs::write(dir.join("abc-web/checkpoint/pages-1.img"), vec![8u8; 4096]).unwrap();
    let dest = s.0.join("changed.tar");
    write(&dir, &dest, Compression::None).unwrap();
    let err = extract(&dest, &s.0.join("x-changed")).unwrap_err();
    assert!(
        format!("{err:#}").contains("abc-web/checkpoint/pages-1.img is corrupt"),
        "{err:#}"
    );
    assert!(!s.0.join("x-changed").exists());
}

#[test]
fn hostile_or_incomplete_archives_are_refused_and_leave_nothing() {
    let s = Scratch::new("hostile");
    // An entry climbing out of the target, written byte for byte.
    let mut h = tar::Header::new_old();
    h.as_old_mut().name[..9].copy_from_slice(b"../escape");
    h.set_entry_type(tar::EntryType::Regular);
    h.set_size(1);
    h.set_mode(0o644);
    h.set_cksum();
    let mut b = tar::Builder::new(Vec::new());
    b.append(&h, &b"x"[..]).unwrap();
    let evil = s.0.join("evil.tar");
    std::fs::write(&evil, b.into_inner().unwrap()).unwrap();
    let out = s.0.join("out");
    let e = extract(&evil, &out).unwrap_err().to_string();
    assert!(e.contains("..") || e.contains("outside"), "{e}");
    assert!(!out.exists(), "the refused extraction left its directory");
    assert!(!s.0.join("escape").exists());

    // A pod.options naming a directory the archive lacks.
    let dir = checkpoint_dir(&s.0);
    std::fs::write(
        dir.join("pod.options"),
        r#"{"version":1,"containers":{"web":"missing"}}"#,
    )
    .unwrap();
    let bad = s.0.join("bad.tar");
    write(&dir, &bad, Compression::None).unwrap();
    let e = extract(&bad, &out).unwrap_err().to_string();
    assert!(
        e.contains("(missing) has no config.dump; nothing was written"),
        "{e}"
    );
    assert!(!out.exists());

    // A compression bomb without the structure of a checkpoint: the header pass knows,
    // before a byte is unpacked (the target is never even created).
    let bomb = s.0.join("bomb.tar.zst");
    {
        let mut b =
            tar::Builder::new(zstd::Encoder::new(File::create(&bomb).unwrap(), 19).unwrap());
        let mut h = tar::Header::new_gnu();
        h.set_size(256 << 20);
        h.set_mode(0o600);
        b.append_data(&mut h, "zeros", std::io::repeat(0).take(256 << 20))
            .unwrap();
        b.into_inner().unwrap().finish().unwrap();
    }
    assert!(std::fs::metadata(&bomb).unwrap().len() < 1 << 20);
    for e in [
        format!("{:#}", extract(&bomb, &out).unwrap_err()),
        format!("{:#}", inspect(&bomb).unwrap_err()),
    ] {
        assert!(
            e.contains("archive has no pod.options; nothing was written"),
            "{e}"
        );
    }
    assert!(!out.exists());

    // The same file twice (the second would silently replace the checked first).
    let twice = s.0.join("twice.tar");
    {
        let mut b = tar::Builder::new(File::create(&twice).unwrap());
        for _ in 0..2 {
            let mut h = tar::Header::new_gnu();
            h.set_size(2);
            b.append_data(&mut h, "./pod.dump", &b"{}"[..]).unwrap();
        }
        b.into_inner().unwrap();
    }
    let e = format!("{:#}", extract(&twice, &out).unwrap_err());
    assert!(e.contains("pod.dump is in it twice"), "{e}");
    assert!(!out.exists());

    // A version this reader does not know.
    std::fs::write(
        dir.join("pod.options"),
        r#"{"version":9,"containers":{"web":"abc-web"}}"#,
    )
    .unwrap();
    std::fs::remove_file(&bad).unwrap();
    write(&dir, &bad, Compression::None).unwrap();
    let e = format!("{:#}", inspect(&bad).unwrap_err());
    assert!(e.contains("version 9"), "{e}");
}

#[test]
fn archives_are_private_and_never_replace_a_file() {
    use std::os::unix::fs::PermissionsExt;
    let s = Scratch::new("private");
    let dir = checkpoint_dir(&s.0);
    let dest = s.0.join("a.tar.zst");
    write(&dir, &dest, Compression::Zstd).unwrap();
    let mode = std::fs::metadata(&dest).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the archive is readable by others: {mode:o}");
    // Something at the destination stays as it was, and nothing is left beside it.
    std::fs::remove_file(&dest).unwrap();
    std::fs::write(&dest, "someone else's").unwrap();
    let e = write(&dir, &dest, Compression::Zstd)
        .unwrap_err()
        .to_string();
    assert!(e.contains("already exists"), "{e}");
    assert_eq!(std::fs::read_to_string(&dest).unwrap(), "someone else's");
    let names: Vec<String> = std::fs::read_dir(&s.0)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !names.iter().any(|n| n.contains("partial")),
        "a partial file was left: {names:?}"
    );
}

/// A staged checkpoint is placed whole: renamed on one file system, copied (private, then
/// renamed) across two (/dev/shm is a tmpfs here); never over an existing directory.
#[test]
fn staged_checkpoints_are_placed_whole() {
    use std::os::unix::fs::PermissionsExt;
    let s = Scratch::new("place");
    for (i, stage_root) in [s.0.clone(), PathBuf::from("/dev/shm")].iter().enumerate() {
        let staging = stage_root.join(format!("stasis-place-test-{}-{i}", std::process::id()));
        let _ = std::fs::remove_dir_all(&staging);
        std::fs::create_dir_all(staging.join("c/checkpoint")).unwrap();
        std::fs::write(staging.join("pod.options"), b"{}").unwrap();
        std::fs::write(staging.join("c/checkpoint/pages-1.img"), vec![1u8; 5000]).unwrap();
        // As a checkpoint is staged: private throughout.
        make_private(&staging).unwrap();
        let dest = s.0.join(format!("placed-{i}"));
        assert_eq!(place_dir(&staging, &dest).unwrap(), 5002);
        assert_eq!(
            std::fs::read(dest.join("c/checkpoint/pages-1.img")).unwrap(),
            vec![1u8; 5000]
        );
        let mode = std::fs::metadata(dest.join("c"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
        let _ = std::fs::remove_dir_all(&staging);
        std::fs::create_dir_all(&staging).unwrap();
        assert!(
            place_dir(&staging, &dest).is_err(),
            "placed over {}",
            dest.display()
        );
        let _ = std::fs::remove_dir_all(&staging);
    }
}

/// A lazy restore's unpack leaves page images in an uncompressed archive: not unpacked,
/// spans pointing at the images' bytes, chunk digests from the manifest; everything else
/// unpacked and checked. A compressed archive cannot.
#[test]
fn page_images_stay_in_an_uncompressed_archive() {
    let s = Scratch::new("leave");
    let dir = checkpoint_dir(&s.0);
    let pages: Vec<u8> = (0..(2 * layout::PAGE_CHUNK_SIZE + 4096))
        .map(|i| (i % 251) as u8)
        .collect();
    std::fs::write(dir.join("abc-web/checkpoint/pages-1.img"), &pages).unwrap();
    write_manifest(&dir).unwrap();
    let plain = s.0.join("a.tar");
    write(&dir, &plain, Compression::None).unwrap();
    assert!(is_plain_tar(&plain).unwrap());
    let out = s.0.join("out");
    let (options, source) = extract_leaving_pages(&plain, &out, &Opening::default()).unwrap();
    assert_eq!(options.containers["web"], "abc-web");
    let span = &source.files["abc-web/checkpoint/pages-1.img"];
    assert_eq!((span.size, span.chunks.len()), (pages.len() as u64, 3));
    assert_eq!(span.digest, layout::DigestKind::Blake3);
    assert_eq!(
        span.chunks[2],
        blake3::hash(&pages[2 << 20..]).to_hex().to_string()
    );
    let bytes = std::fs::read(&source.archive).unwrap();
    let at = span.offset as usize;
    assert_eq!(&bytes[at..at + pages.len()], &pages[..]);
    // Left for the shim to make: absent, so an older shim fails instead of restoring zeros.
    assert!(!out.join("abc-web/checkpoint/pages-1.img").exists());
    assert!(out.join("abc-web/config.dump").is_file());
    // The eager path still reads chunked images whole and checks them.
    let whole = s.0.join("whole");
    extract(&plain, &whole).unwrap();
    assert_eq!(
        std::fs::read(whole.join("abc-web/checkpoint/pages-1.img")).unwrap(),
        pages
    );
    let zst = s.0.join("a.tar.zst");
    write(&dir, &zst, Compression::Zstd).unwrap();
    assert!(!is_plain_tar(&zst).unwrap());
}

/// Signed and encrypted archives round-trip; the wrong key, no identity, a tampered
/// signed archive and an unknown format version are refused, leaving nothing.
#[test]
fn sealed_archives_open_only_with_the_right_keys() {
    let s = Scratch::new("sealed");
    let dir = checkpoint_dir(&s.0);
    write_manifest(&dir).unwrap();
    seal::generate(seal::KeyKind::Signing, &s.0.join("sign")).unwrap();
    let key = seal::load_signing_key(&s.0.join("sign")).unwrap();
    seal::sign_manifest(&dir, &key).unwrap();
    let recipient = seal::generate(seal::KeyKind::Encryption, &s.0.join("id")).unwrap();
    seal::generate(seal::KeyKind::Encryption, &s.0.join("other")).unwrap();
    let recipients = seal::load_recipients(recipient.trim()).unwrap();
    let dest = s.0.join("a.tar.zst.age");
    let w = write_cancellable(
        &dir,
        &dest,
        Compression::Zstd,
        &recipients,
        &AtomicBool::new(false),
    )
    .unwrap();
    check_written(&dest, &w).unwrap();
    let bytes = std::fs::read(&dest).unwrap();
    assert!(
        !bytes.windows(7).any(|w| w == b"web-pod"),
        "plaintext in the archive"
    );
    let sum = inspect(&dest).unwrap();
    assert!(sum.encrypted && sum.pod_name.is_empty());
    let right = Opening {
        identities: seal::load_identities(&s.0.join("id")).unwrap(),
        verify: vec![key.verifying_key()],
    };
    let sum = inspect_with(&dest, &right).unwrap();
    assert_eq!(sum.pod_name, "web-pod");
    assert_eq!(sum.signed_by, Some(seal::fingerprint(&key.verifying_key())));
    extract_with(&dest, &s.0.join("ok"), &right).unwrap();
    let out = s.0.join("refused");
    let e = extract(&dest, &out).unwrap_err().to_string();
    assert!(e.contains("--identity"), "{e}");
    let wrong = Opening {
        identities: seal::load_identities(&s.0.join("other")).unwrap(),
        verify: Vec::new(),
    };
    let e = extract_with(&dest, &out, &wrong).unwrap_err().to_string();
    assert!(e.contains("other recipients"), "{e}");
    // Signed by another key, unsigned, or changed after signing (manifest rewritten).
    let stranger = Opening {
        identities: right.identities.clone(),
        verify: vec![ed25519_dalek::SigningKey::generate(&mut rand_core::OsRng).verifying_key()],
    };
    let e = format!("{:#}", extract_with(&dest, &out, &stranger).unwrap_err());
    assert!(e.contains("is signed by"), "{e}");
    std::fs::write(dir.join("pod.dump"), r#"{"metadata":{"name":"evil"}}"#).unwrap();
    std::fs::remove_file(dir.join(layout::MANIFEST)).unwrap();
    write_manifest(&dir).unwrap();
    let tampered = s.0.join("tampered.tar");
    write(&dir, &tampered, Compression::None).unwrap();
    let e = format!("{:#}", extract_with(&tampered, &out, &right).unwrap_err());
    assert!(e.contains("changed after it was signed"), "{e}");
    std::fs::remove_file(dir.join(layout::SIGNATURE)).unwrap();
    let unsigned = s.0.join("unsigned.tar");
    write(&dir, &unsigned, Compression::None).unwrap();
    let e = format!("{:#}", extract_with(&unsigned, &out, &right).unwrap_err());
    assert!(e.contains("not signed"), "{e}");
    // A format from the future.
    let text = std::fs::read_to_string(dir.join(layout::MANIFEST)).unwrap();
    std::fs::write(
        dir.join(layout::MANIFEST),
        text.replacen(
            &format!("\"version\":{}", layout::MANIFEST_VERSION),
            "\"version\":9",
            1,
        ),
    )
    .unwrap();
    let future = s.0.join("future.tar");
    write(&dir, &future, Compression::None).unwrap();
    let e = format!("{:#}", extract(&future, &out).unwrap_err());
    assert!(e.contains("format version 9 is unknown"), "{e}");
    assert!(!out.exists(), "a refused archive left {}", out.display());
}

/// `bytes` as an image layer unpacked at the checkpoint's top; counts how often it is
/// opened and how many bytes are read of it.
fn one_layer(
    bytes: Vec<u8>,
    reads: std::rc::Rc<std::cell::Cell<(u32, u64)>>,
) -> Vec<Layer<'static>> {
    struct Counted(
        std::io::Cursor<Vec<u8>>,
        std::rc::Rc<std::cell::Cell<(u32, u64)>>,
    );
    impl Read for Counted {
        fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
            let n = self.0.read(out)?;
            let (opens, read) = self.1.get();
            self.1.set((opens, read + n as u64));
            Ok(n)
        }
    }
    vec![Layer {
        dir: None,
        blob: None,
        name: "sha256:test".into(),
        open: Box::new(move || {
            let (opens, read) = reads.get();
            reads.set((opens + 1, read));
            Ok(Box::new(Counted(
                std::io::Cursor::new(bytes.clone()),
                reads.clone(),
            )))
        }),
    }]
}

#[test]
fn image_layers_are_read_once_and_hostile_entries_refused() {
    let s = Scratch::new("layers");
    let dir = checkpoint_dir(&s.0);
    write_manifest(&dir).unwrap();
    let bytes = write_tar(&dir, Vec::new()).unwrap();
    let reads = std::rc::Rc::new(std::cell::Cell::new((0, 0)));
    let out = s.0.join("out");
    let (opts, pages) = unpack_layers(
        &out,
        &Opening::default(),
        one_layer(bytes.clone(), reads.clone()),
    )
    .unwrap();
    assert!(pages.is_none());
    assert_eq!(opts.containers["web"], "abc-web");
    assert_eq!(
        std::fs::read(out.join("abc-web/checkpoint/pages-1.img")).unwrap(),
        vec![7u8; 4096]
    );
    assert_eq!(
        reads.get(),
        (1, bytes.len() as u64),
        "the layer is not read exactly once"
    );

    // Hostile layers: each refused, with nothing left.
    let tar_of = |entries: &[(&[u8], tar::EntryType, u64, &str)]| {
        let mut out = Vec::new();
        for (name, kind, size, link) in entries {
            let mut h = tar::Header::new_gnu();
            h.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name);
            h.set_entry_type(*kind);
            h.set_size(*size);
            h.set_mode(0o600);
            if !link.is_empty() {
                h.set_link_name(link).unwrap();
            }
            h.set_cksum();
            out.extend_from_slice(h.as_bytes());
            if *kind != tar::EntryType::GNULongName {
                out.extend(std::iter::repeat_n(b'x', *size as usize));
                out.extend(std::iter::repeat_n(0u8, (512 - *size as usize % 512) % 512));
            }
        }
        out.extend_from_slice(&[0u8; 1024]);
        out
    };
    use tar::EntryType::*;
    for (layer, why) in [
        (
            tar_of(&[(b"../escape", Regular, 1, "")]),
            "climbs out with '..'",
        ),
        (
            tar_of(&[(b"/etc/x", Regular, 1, "")]),
            "is an absolute path",
        ),
        (
            tar_of(&[(b"pod.dump", Symlink, 0, "/etc/shadow")]),
            "is a link (to \"/etc/shadow\")",
        ),
        (tar_of(&[(b"null", Char, 0, "")]), "is a device node"),
        (
            tar_of(&[(b"a", Regular, 1, ""), (b"./a", Regular, 1, "")]),
            "a is in it twice",
        ),
        (
            tar_of(&[(b"././@LongLink", GNULongName, 20 << 30, "")]),
            "a long-name record of 20.0 GiB",
        ),
    ] {
        let e = format!(
            "{:#}",
            unpack_layers(
                &out_new(&s),
                &Opening::default(),
                one_layer(layer, reads.clone())
            )
            .unwrap_err()
        );
        assert!(e.contains(why), "{why}: {e}");
        assert!(!out_new(&s).exists(), "{why}: left its directory");
        assert!(!s.0.join("escape").exists());
    }
}

fn out_new(s: &Scratch) -> PathBuf {
    s.0.join("hostile-out")
}

#[test]
fn a_plain_layer_blob_keeps_its_page_images() {
    let s = Scratch::new("blob");
    let dir = checkpoint_dir(&s.0);
    // A page image large enough to be chunked, and recognisable.
    let pages: Vec<u8> = (0..(3 << 20)).map(|i| (i % 253) as u8).collect();
    std::fs::write(dir.join("abc-web/checkpoint/pages-1.img"), &pages).unwrap();
    write_manifest(&dir).unwrap();
    let blob = s.0.join("blob.tar");
    write(&dir, &blob, Compression::None).unwrap();
    let reads = std::rc::Rc::new(std::cell::Cell::new((0, 0)));
    let mut layers = one_layer(Vec::new(), reads.clone());
    layers[0].blob = Some(blob.clone());
    let out = s.0.join("out");
    let (opts, source) = unpack_layers(&out, &Opening::default(), layers).unwrap();
    assert_eq!(opts.containers["web"], "abc-web");
    assert_eq!(reads.get().0, 0, "a layer with a blob file was streamed");
    let source = source.expect("a page source");
    let span = &source.files["abc-web/checkpoint/pages-1.img"];
    assert_eq!(span.file.as_deref(), Some(blob.as_path()));
    assert_eq!((span.size, span.chunks.len()), (3 << 20, 3));
    // The span is where the page image's bytes are in the blob; nothing of it unpacked.
    let bytes = std::fs::read(&blob).unwrap();
    let at = span.offset as usize;
    assert_eq!(&bytes[at..at + pages.len()], &pages[..]);
    assert!(!out.join("abc-web/checkpoint/pages-1.img").exists());
    assert!(out.join("abc-web/config.dump").is_file());
}

/// A staged checkpoint packed in one pass: the manifest (and signature) made from the bytes
/// written go last and open like any other archive's, eagerly or leaving the pages; a staged
/// manifest is not taken; each staged file is removed once it is in; the check of the written
/// archive refuses a file cut short or swapped.
#[test]
fn a_staged_checkpoint_is_packed_in_one_pass() {
    let s = Scratch::new("consume");
    let dir = checkpoint_dir(&s.0);
    let pages: Vec<u8> = (0..(20 * layout::PAGE_CHUNK_SIZE + 4096))
        .map(|i| (i % 253) as u8)
        .collect();
    let image = dir.join("abc-web/checkpoint/pages-1.img");
    std::fs::write(&image, &pages).unwrap();
    std::fs::write(dir.join(layout::MANIFEST), b"{\"version\":9}").unwrap();
    seal::generate(seal::KeyKind::Signing, &s.0.join("sign")).unwrap();
    let key = seal::load_signing_key(&s.0.join("sign")).unwrap();
    let dest = s.0.join("one-pass.tar");
    let how = Writing {
        compression: Compression::None,
        recipients: &[],
        cancel: &AtomicBool::new(false),
    };
    let w = write_consuming(&dir, &dest, &how, Some(&key)).unwrap();
    check_written(&dest, &w).unwrap();
    // Used up: every staged file is gone once it is in the archive.
    assert!(!image.exists(), "the staged page image is still there");
    assert!(!dir.join("pod.dump").exists());
    // The manifest and the signature are the archive's last entries.
    let mut names = Vec::new();
    for e in tar::Archive::new(File::open(&dest).unwrap())
        .entries()
        .unwrap()
    {
        names.push(e.unwrap().path().unwrap().display().to_string());
    }
    assert_eq!(
        names[names.len() - 2..],
        ["manifest.json".to_string(), "manifest.sig".to_string()]
    );
    let right = Opening {
        identities: Vec::new(),
        verify: vec![key.verifying_key()],
    };
    let out = s.0.join("eager");
    extract_with(&dest, &out, &right).unwrap();
    assert_eq!(
        std::fs::read(out.join("abc-web/checkpoint/pages-1.img")).unwrap(),
        pages
    );
    let (_, source) = extract_leaving_pages(&dest, &s.0.join("lazy"), &right).unwrap();
    let span = &source.files["abc-web/checkpoint/pages-1.img"];
    assert_eq!((span.size, span.chunks.len()), (pages.len() as u64, 21));
    assert_eq!(
        inspect(&dest).unwrap().signed_by,
        Some(seal::fingerprint(&key.verifying_key()))
    );
    // Cut short, or another file in its place: refused.
    let copy = s.0.join("copy.tar");
    std::fs::copy(&dest, &copy).unwrap();
    std::fs::rename(&copy, &dest).unwrap();
    let e = format!("{:#}", check_written(&dest, &w).unwrap_err());
    assert!(e.contains("reads back as another file"), "{e}");
    let w = write_consuming(
        &checkpoint_dir(&s.0.join("again")),
        &s.0.join("cut.tar"),
        &how,
        None,
    )
    .unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(s.0.join("cut.tar"))
        .unwrap();
    f.set_len(w.bytes / 2).unwrap();
    let e = format!("{:#}", check_written(&s.0.join("cut.tar"), &w).unwrap_err());
    assert!(
        e.contains("reads back as") && e.contains("bytes written"),
        "{e}"
    );
}

/// Archives of format version 3 (SHA-256 digests, what stasisctl wrote before version 4)
/// still read, chunked page images included; a manifest whose digests are not those of the
/// version it states is refused as changed, leaving nothing.
#[test]
fn version_3_archives_with_sha256_digests_still_read() {
    let s = Scratch::new("v3");
    let dir = checkpoint_dir(&s.0);
    let pages: Vec<u8> = (0..(layout::PAGE_CHUNK_SIZE + 4096))
        .map(|i| (i % 253) as u8)
        .collect();
    std::fs::write(dir.join("abc-web/checkpoint/pages-1.img"), &pages).unwrap();
    let mut files = std::collections::BTreeMap::new();
    for rel in regular_files(&dir).unwrap() {
        let sum = sum_of(&dir.join(&rel), chunking(&rel), layout::DigestKind::Sha256).unwrap();
        files.insert(rel.display().to_string(), sum);
    }
    let v3 = serde_json::to_string(&Manifest { version: 3, files }).unwrap();
    assert!(v3.contains("\"sha256\"") && !v3.contains("blake3"), "{v3}");
    std::fs::write(dir.join(layout::MANIFEST), &v3).unwrap();
    let archive = s.0.join("v3.tar");
    write(&dir, &archive, Compression::None).unwrap();
    let out = s.0.join("whole");
    extract(&archive, &out).unwrap();
    assert_eq!(
        std::fs::read(out.join("abc-web/checkpoint/pages-1.img")).unwrap(),
        pages
    );
    let lazy = s.0.join("lazy");
    let (_, source) = extract_leaving_pages(&archive, &lazy, &Opening::default()).unwrap();
    let span = &source.files["abc-web/checkpoint/pages-1.img"];
    assert_eq!(span.digest, layout::DigestKind::Sha256);
    // SHA-256 digests under version 4: refused.
    std::fs::write(
        dir.join(layout::MANIFEST),
        v3.replacen("\"version\":3", "\"version\":4", 1),
    )
    .unwrap();
    let relabelled = s.0.join("v4.tar");
    write(&dir, &relabelled, Compression::None).unwrap();
    let out = s.0.join("refused");
    let e = format!("{:#}", extract(&relabelled, &out).unwrap_err());
    assert!(e.contains("is corrupt or was changed"), "{e}");
    assert!(!out.exists());
}

/// A page image a lazy restore leaves in the archive is checked by its chunk digests (the
/// shim checks each chunk); its entry must still carry the file digest of its own chunks, of
/// the hash its version names: an entry with the other field is refused, as an eager restore
/// refuses it.
#[test]
fn a_page_image_left_in_the_archive_needs_its_own_digest() {
    assert_eq!(
        layout::DigestKind::of_version(layout::MANIFEST_VERSION),
        WRITTEN_DIGEST
    );
    let s = Scratch::new("leftdigest");
    let dir = checkpoint_dir(&s.0);
    write_manifest(&dir).unwrap();
    let text = std::fs::read_to_string(dir.join(layout::MANIFEST)).unwrap();
    let mut manifest: serde_json::Value = serde_json::from_str(&text).unwrap();
    let entry = &mut manifest["files"]["abc-web/checkpoint/pages-1.img"];
    let digest = entry["blake3"].take();
    entry.as_object_mut().unwrap().remove("blake3");
    entry["sha256"] = digest;
    std::fs::write(dir.join(layout::MANIFEST), manifest.to_string()).unwrap();
    let archive = s.0.join("a.tar");
    write(&dir, &archive, Compression::None).unwrap();
    let out = s.0.join("out");
    let e = format!(
        "{:#}",
        extract_leaving_pages(&archive, &out, &Opening::default()).unwrap_err()
    );
    assert!(e.contains("pages-1.img is corrupt or was changed"), "{e}");
    assert!(!out.exists());
}
