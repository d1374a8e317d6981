use prost::Message;

use super::pagemap::*;
use super::*;

fn image(entries: &[(u64, u32, u32)]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&IMG_COMMON_MAGIC.to_le_bytes());
    out.extend_from_slice(&PAGEMAP_MAGIC.to_le_bytes());
    let head = PagemapHead { pages_id: 3 }.encode_to_vec();
    out.extend_from_slice(&(head.len() as u32).to_le_bytes());
    out.extend_from_slice(&head);
    for &(vaddr, nr_pages, flags) in entries {
        let e = PagemapEntry {
            vaddr,
            nr_pages,
            in_parent: None,
            flags: Some(flags),
        }
        .encode_to_vec();
        out.extend_from_slice(&(e.len() as u32).to_le_bytes());
        out.extend_from_slice(&e);
    }
    out
}

#[test]
fn pagemaps_give_each_run_its_place_in_the_pages_image() {
    let map = parse_pagemap(&image(&[
        (0x1000, 2, PE_PRESENT),
        (0x8000, 1, PE_PARENT),
        (0x10000, 4, PE_PRESENT | PE_LAZY),
    ]))
    .unwrap();
    assert_eq!(map.pages_id, 3);
    assert_eq!(
        map.runs,
        vec![
            Run {
                vaddr: 0x1000,
                pages: 2,
                offset: 0,
                lazy: false
            },
            Run {
                vaddr: 0x10000,
                pages: 4,
                offset: 2 * PAGE_SIZE,
                lazy: true
            },
        ]
    );
    assert!(parse_pagemap(b"not an image").is_err());
    let mut cut = image(&[(0x1000, 2, PE_PRESENT)]);
    cut.truncate(cut.len() - 1);
    assert!(parse_pagemap(&cut).is_err());
    // Bounded: by what the pages image holds, and entry by entry.
    let two_pages = image(&[(0x1000, 2, PE_PRESENT)]);
    let (_, reader) = PagemapReader::open(two_pages.as_slice()).unwrap();
    let err = reader.runs(PAGE_SIZE).unwrap_err();
    assert!(err.contains("past the end"), "{err}");
    let mut huge = image(&[]);
    huge.extend_from_slice(&(1u32 << 30).to_le_bytes());
    let err = parse_pagemap(&huge).unwrap_err();
    assert!(err.contains("an entry of 1073741824 bytes"), "{err}");
    assert!(parse_pagemap(&image(&[(0x1000, 0, PE_PRESENT)])).is_err());
}

/// Writes `archive`: 100 bytes of something else, then an image of 3 pages (page n filled
/// with n + 1); returns the image's bytes and the archive's.
fn three_page_archive(archive: &Path) -> (Vec<u8>, Vec<u8>) {
    let image_bytes: Vec<u8> = (0..3 * PAGE_SIZE)
        .map(|i| (i / PAGE_SIZE) as u8 + 1)
        .collect();
    let mut file = vec![7u8; 100];
    file.extend_from_slice(&image_bytes);
    std::fs::write(archive, &file).unwrap();
    (image_bytes, file)
}

#[test]
fn requests_are_served_from_checked_chunks() {
    let archive = std::env::temp_dir().join(format!("stasis-pages-test-{}", std::process::id()));
    let (image_bytes, mut file) = three_page_archive(&archive);
    let chunk_size = 2 * PAGE_SIZE;
    let chunks = image_bytes
        .chunks(chunk_size as usize)
        .map(|c| blake3::hash(c).to_hex().to_string())
        .collect();
    let span = PageSpan {
        file: None,
        offset: 100,
        size: 3 * PAGE_SIZE,
        chunk_size,
        chunks,
        digest: stasis_api::layout::DigestKind::Blake3,
    };
    let mut checked = CheckedSpan::new(
        std::sync::Arc::new(File::open(&archive).unwrap()),
        "c/checkpoint/pages-3.img".into(),
        span.clone(),
    );
    let mut buf = vec![0u8; (2 * PAGE_SIZE) as usize];
    checked.read(PAGE_SIZE, &mut buf).unwrap();
    assert!(buf[..PAGE_SIZE as usize].iter().all(|b| *b == 2));
    assert!(buf[PAGE_SIZE as usize..].iter().all(|b| *b == 3));
    // Checked ahead by the helper thread: the chunk it checked is handed over as it was
    // checked, even if the archive changes afterwards.
    let helper = ahead::Ahead::start("c", vec![checked.bytes.clone()]).unwrap();
    helper.want(0, 1);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let early = loop {
        if let Some(b) = helper.take(0, 1) {
            break b;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "chunk 1 never checked ahead"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    };
    assert_eq!(early.len(), PAGE_SIZE as usize);
    assert!(early.iter().all(|b| *b == 3));
    // Taken once; nothing past the image's end is wanted.
    assert!(helper.take(0, 1).is_none());
    helper.want(0, 2);
    std::thread::sleep(std::time::Duration::from_millis(20));
    assert!(helper.take(0, 2).is_none());
    drop(helper);
    let mut ahead = CheckedSpan::new(
        checked.bytes.archive.clone(),
        checked.bytes.key.clone(),
        span.clone(),
    );
    let slices = ahead.slices(PAGE_SIZE, 2 * PAGE_SIZE, None).unwrap();
    assert_eq!(
        slices.iter().map(|s| s.len()).collect::<Vec<_>>(),
        vec![4096, 4096]
    );
    assert!(slices[1].iter().all(|b| *b == 3));
    // A changed byte in the archive: the chunk holding it is refused.
    file[100 + 2 * PAGE_SIZE as usize + 5] ^= 1;
    std::fs::write(&archive, &file).unwrap();
    let mut changed = CheckedSpan::new(
        std::sync::Arc::new(File::open(&archive).unwrap()),
        checked.bytes.key.clone(),
        checked.bytes.span.clone(),
    );
    let mut one = vec![0u8; PAGE_SIZE as usize];
    changed.read(0, &mut one).unwrap();
    // What was checked before the change is what is sent.
    let mut kept = vec![0u8; PAGE_SIZE as usize];
    ahead.read(2 * PAGE_SIZE, &mut kept).unwrap();
    assert!(kept.iter().all(|b| *b == 3));
    assert!(changed
        .read(2 * PAGE_SIZE, &mut one)
        .unwrap_err()
        .contains("was changed"));
    std::fs::remove_file(&archive).unwrap();

    let pages = ArchivePages {
        id: "c".into(),
        from: String::new(),
        tasks: HashMap::from([(
            9,
            (
                vec![
                    Run {
                        vaddr: 0x1000,
                        pages: 1,
                        offset: 0,
                        lazy: true,
                    },
                    Run {
                        vaddr: 0x2000,
                        pages: 2,
                        offset: PAGE_SIZE,
                        lazy: true,
                    },
                ],
                0,
            ),
        )]),
        spans: vec![],
        locals: vec![],
        counters: Default::default(),
    };
    assert_eq!(pages.find(9, 0x1000, 16), Some((0, 0, 3)));
    assert_eq!(pages.find(9, 0x2000, 1), Some((0, PAGE_SIZE, 1)));
    assert_eq!(pages.find(9, 0x5000, 1), None);
    assert_eq!(pages.find(8, 0x1000, 1), None);
}

#[test]
fn a_small_pods_lazy_pages_are_copied_checked_into_its_images() {
    let dir = std::env::temp_dir().join(format!("stasis-copy-lazy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let archive = dir.join("archive");
    // Page 0 is eager (copied already), pages 1 and 2 lazy.
    let (image_bytes, file) = three_page_archive(&archive);
    let span = PageSpan {
        file: None,
        offset: 100,
        size: 3 * PAGE_SIZE,
        chunk_size: PAGE_SIZE,
        chunks: image_bytes
            .chunks(PAGE_SIZE as usize)
            .map(|c| blake3::hash(c).to_hex().to_string())
            .collect(),
        digest: stasis_api::layout::DigestKind::Blake3,
    };
    let run = |vaddr, pages, offset, lazy| Run {
        vaddr,
        pages,
        offset,
        lazy,
    };
    let runs = vec![run(0x1000, 1, 0, false), run(0x2000, 2, PAGE_SIZE, true)];
    let pages = |archive_bytes: &[u8]| {
        std::fs::write(&archive, archive_bytes).unwrap();
        let local = dir.join("pages-1.img");
        let _ = std::fs::remove_file(&local);
        let placeholder = placeholder("c", &local, 3 * PAGE_SIZE).unwrap();
        let pages = ArchivePages {
            id: "c".into(),
            from: String::new(),
            tasks: HashMap::from([(9, (runs.clone(), 0))]),
            spans: vec![CheckedSpan::new(
                Arc::new(File::open(&archive).unwrap()),
                "c/checkpoint/pages-1.img".into(),
                span.clone(),
            )],
            locals: vec![(local.clone(), Arc::new(placeholder))],
            counters: Default::default(),
        };
        (pages, local)
    };
    let (whole, local) = pages(&file);
    assert_eq!(whole.copy_lazy_pages().unwrap(), 2 * PAGE_SIZE);
    let copied = std::fs::read(&local).unwrap();
    // The eager page was not this call's to copy: it stays a hole (zeros) here.
    assert!(copied[..PAGE_SIZE as usize].iter().all(|b| *b == 0));
    assert_eq!(
        &copied[PAGE_SIZE as usize..],
        &image_bytes[PAGE_SIZE as usize..]
    );
    // A changed byte in a lazy page: the copy fails naming it, instead of CRIU restoring it.
    let mut changed = file.clone();
    changed[100 + 2 * PAGE_SIZE as usize + 9] ^= 1;
    let (bad, _) = pages(&changed);
    let err = bad.copy_lazy_pages().unwrap_err().to_string();
    assert!(err.contains("was changed"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn chunks_are_checked_with_the_hash_their_manifest_names() {
    use stasis_api::layout::DigestKind;
    // Format versions up to 3: SHA-256; from 4: BLAKE3 (known answers for "abc").
    assert_eq!(
        chunks::chunk_digest(DigestKind::Sha256, b"abc"),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
    assert_eq!(
        chunks::chunk_digest(DigestKind::Blake3, b"abc"),
        "6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85"
    );
}

mod remote_feed {
    use super::*;
    use remote::RemotePages;
    use std::os::unix::net::UnixListener;

    /// A fresh directory, removed when dropped.
    struct Scratch(std::path::PathBuf);

    impl Scratch {
        fn new(tag: &str) -> Scratch {
            let d =
                std::env::temp_dir().join(format!("stasis-remote-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&d);
            std::fs::create_dir_all(&d).unwrap();
            Scratch(d)
        }

        fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A source that answers the first request with `answer(request)` and the close with 0.
    fn source(dir: &Path, answer: fn(&[u8; 24]) -> Vec<u8>) -> std::thread::JoinHandle<String> {
        let listener = UnixListener::bind(dir.join("relay")).unwrap();
        std::thread::spawn(move || {
            let (mut c, _) = listener.accept().unwrap();
            let mut name = Vec::new();
            let mut b = [0u8; 1];
            while c.read_exact(&mut b).is_ok() && b[0] != b'\n' {
                name.push(b[0]);
            }
            let mut req = [0u8; 24];
            while c.read_exact(&mut req).is_ok() {
                let cmd = u32::from_le_bytes(req[0..4].try_into().unwrap());
                if cmd == PS_IOV_CLOSE {
                    let _ = c.write_all(&0i32.to_le_bytes());
                    break;
                }
                if c.write_all(&answer(&req)).is_err() {
                    break;
                }
            }
            String::from_utf8(name).unwrap()
        })
    }

    fn request(cmd: u32, nr: u32, vaddr: u64, dst: u64) -> [u8; 24] {
        let mut r = [0u8; 24];
        r[0..4].copy_from_slice(&cmd.to_le_bytes());
        r[4..8].copy_from_slice(&nr.to_le_bytes());
        r[8..16].copy_from_slice(&vaddr.to_le_bytes());
        r[16..24].copy_from_slice(&dst.to_le_bytes());
        r
    }

    fn pages(req: &[u8; 24], vaddr_shift: u64) -> Vec<u8> {
        let nr = u32::from_le_bytes(req[4..8].try_into().unwrap());
        let vaddr = u64::from_le_bytes(req[8..16].try_into().unwrap()) + vaddr_shift;
        let dst = u64::from_le_bytes(req[16..24].try_into().unwrap());
        let mut out = request((PE_PRESENT << PS_CMD_BITS) | PS_IOV_ADD_F, nr, vaddr, dst).to_vec();
        out.extend(std::iter::repeat_n(0x5a, nr as usize * PAGE_SIZE as usize));
        out
    }

    /// The container's images: one pagemap whose lazy runs (not present) total 3 pages.
    fn images(dir: &Path) -> std::path::PathBuf {
        let img = dir.join("web-1/checkpoint");
        std::fs::create_dir_all(&img).unwrap();
        std::fs::write(
            img.join("pagemap-1.img"),
            image(&[(0x1000, 1, PE_PRESENT), (0x4000, 3, PE_LAZY)]),
        )
        .unwrap();
        img
    }

    fn open_feed(dir: &Scratch, img: &Path) -> RemotePages {
        RemotePages::open(
            "c",
            img,
            Path::new("web-1/checkpoint"),
            &dir.path().join("relay"),
        )
        .unwrap()
    }

    #[test]
    fn answers_from_the_source_pass_to_the_daemon_and_count() {
        let dir = Scratch::new("passes");
        let img = images(dir.path());
        let fake = source(dir.path(), |r| pages(r, 0));
        let feed = open_feed(&dir, &img);
        let counters = feed.counters();
        assert_eq!(counters.total, 3 * PAGE_SIZE);
        let (mut daemon, ours) = UnixStream::pair().unwrap();
        let served = std::thread::spawn(move || feed.serve(ours));
        daemon
            .write_all(&request(PS_IOV_GET, 2, 0x4000, 1))
            .unwrap();
        let mut head = [0u8; 24];
        daemon.read_exact(&mut head).unwrap();
        let mut body = vec![0u8; 2 * PAGE_SIZE as usize];
        daemon.read_exact(&mut body).unwrap();
        assert!(body.iter().all(|b| *b == 0x5a));
        daemon.write_all(&request(PS_IOV_CLOSE, 0, 0, 0)).unwrap();
        let mut status = [0u8; 4];
        daemon.read_exact(&mut status).unwrap();
        assert_eq!(served.join().unwrap(), Ok(()));
        assert_eq!(fake.join().unwrap(), "web-1");
        assert_eq!(counters.read(), (2 * PAGE_SIZE, 3 * PAGE_SIZE, 1));
    }

    #[test]
    fn an_answer_for_other_pages_is_refused_before_the_daemon_sees_it() {
        let dir = Scratch::new("refused");
        let img = images(dir.path());
        let _fake = source(dir.path(), |r| pages(r, PAGE_SIZE));
        let feed = open_feed(&dir, &img);
        let (mut daemon, ours) = UnixStream::pair().unwrap();
        let served = std::thread::spawn(move || feed.serve(ours));
        daemon
            .write_all(&request(PS_IOV_GET, 1, 0x4000, 1))
            .unwrap();
        let err = served.join().unwrap().unwrap_err();
        assert!(err.contains("with something else"), "{err}");
        // Nothing reached the daemon: its socket ends without a byte.
        let mut rest = Vec::new();
        daemon.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
    }
}
