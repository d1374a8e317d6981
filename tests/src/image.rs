//! Builds a minimal OCI image from the host's static busybox, so tests need no registry.

use std::{
    io::Write,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

pub const BUSYBOX_REF: &str = "docker.io/stasis/busybox:test";

fn busybox_binary() -> Result<PathBuf> {
    for p in ["/bin/busybox", "/usr/bin/busybox"] {
        let path = Path::new(p);
        if path.exists() {
            // A dynamic busybox would need libc in the image: require the static one.
            let bytes = std::fs::read(path)?;
            if has_interpreter(&bytes) {
                bail!(
                    "{p} is dynamically linked; install busybox-static (scripts/install-deps.sh)"
                );
            }
            return Ok(path.to_path_buf());
        }
    }
    bail!("busybox not found; install busybox-static (scripts/install-deps.sh)")
}

/// True when an ELF64 binary asks for a dynamic loader (has a PT_INTERP program header).
fn has_interpreter(elf: &[u8]) -> bool {
    let u16_at = |o: usize| {
        elf.get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]) as usize)
    };
    let u64_at = |o: usize| {
        elf.get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap()) as usize)
    };
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return false;
    };
    (0..phnum).any(|i| {
        let o = phoff + i * phentsize;
        elf.get(o..o + 4) == Some(&3u32.to_le_bytes()[..])
    })
}

fn sha256_hex(data: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(data);
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// The applets the tests use, linked to busybox in /bin.
const APPLETS: &[&str] = &[
    "sh", "echo", "cat", "sleep", "ls", "true", "false", "hostname", "ps", "id", "mkdir", "rm",
    "seq", "wc", "grep", "head", "tail", "touch", "readlink", "nc", "ip", "ifconfig", "env",
    "test", "[", "kill", "dd", "expr", "stat", "date", "printf", "tr", "cut", "mount", "df",
    "uname", "stty", "tty", "awk", "sed", "find", "xargs", "wget", "top", "free",
];

fn layer_tar() -> Result<Vec<u8>> {
    let busybox = std::fs::read(busybox_binary()?)?;
    let mut b = tar::Builder::new(Vec::new());
    let dir = |b: &mut tar::Builder<Vec<u8>>, name: &str, mode: u32| -> Result<()> {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(mode);
        h.set_size(0);
        h.set_mtime(0);
        b.append_data(&mut h, name, std::io::empty())?;
        Ok(())
    };
    for (d, mode) in [
        ("bin", 0o755),
        ("etc", 0o755),
        ("tmp", 0o1777),
        ("proc", 0o755),
        ("sys", 0o755),
        ("dev", 0o755),
        ("data", 0o755),
        ("root", 0o700),
        ("var", 0o755),
    ] {
        dir(&mut b, d, mode)?;
    }
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o755);
    h.set_size(busybox.len() as u64);
    h.set_mtime(0);
    b.append_data(&mut h, "bin/busybox", busybox.as_slice())?;
    for applet in APPLETS {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_mode(0o777);
        h.set_size(0);
        h.set_mtime(0);
        b.append_link(&mut h, format!("bin/{applet}"), "busybox")?;
    }
    for (name, text) in [
        (
            "etc/passwd",
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
        ),
        ("etc/group", "root:x:0:\nnogroup:x:65534:\n"),
    ] {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(text.len() as u64);
        h.set_mtime(0);
        b.append_data(&mut h, name, text.as_bytes())?;
    }
    Ok(b.into_inner()?)
}

/// The pod sandbox ("pause") image of CRI's own sandboxer, for handlers that are not stasis:
/// the same busybox, sleeping.
pub const PAUSE_REF: &str = "docker.io/stasis/pause:test";

/// Writes an OCI image archive (oci-layout tar) that `ctr images import` accepts, named `name`.
pub fn write_busybox_archive(dest: &Path, name: &str) -> Result<()> {
    write_image_archive(dest, name, &["sh"])
}

/// The busybox image with `cmd` as its command.
pub fn write_image_archive(dest: &Path, name: &str, cmd: &[&str]) -> Result<()> {
    write_image_archive_as(dest, name, cmd, "")
}

/// The busybox image with `cmd` as its command, run as `user` (`uid:gid`; empty: root) unless
/// a container asks otherwise.
pub fn write_image_archive_as(dest: &Path, name: &str, cmd: &[&str], user: &str) -> Result<()> {
    let layer = layer_tar()?;
    let layer_digest = sha256_hex(&layer);
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": cmd,
            "User": user,
            "WorkingDir": "/"
        },
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{layer_digest}")]},
        "history": [{"created_by": "stasis test harness"}]
    });
    let config = serde_json::to_vec(&config)?;
    let config_digest = sha256_hex(&config);
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": format!("sha256:{config_digest}"),
            "size": config.len()
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": format!("sha256:{layer_digest}"),
            "size": layer.len()
        }]
    });
    let manifest = serde_json::to_vec(&manifest)?;
    let manifest_digest = sha256_hex(&manifest);
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": format!("sha256:{manifest_digest}"),
            "size": manifest.len(),
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {
                "io.containerd.image.name": name,
                "org.opencontainers.image.ref.name": name.rsplit(':').next().unwrap_or("latest")
            }
        }]
    });
    let index = serde_json::to_vec(&index)?;

    let mut out = tar::Builder::new(Vec::new());
    let mut add = |path: &str, data: &[u8]| -> Result<()> {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.set_mtime(0);
        out.append_data(&mut h, path, data)?;
        Ok(())
    };
    add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    add("index.json", &index)?;
    add(&format!("blobs/sha256/{layer_digest}"), &layer)?;
    add(&format!("blobs/sha256/{config_digest}"), &config)?;
    add(&format!("blobs/sha256/{manifest_digest}"), &manifest)?;
    let data = out.into_inner()?;
    std::fs::File::create(dest)
        .and_then(|mut f| f.write_all(&data))
        .with_context(|| format!("write {}", dest.display()))?;
    Ok(())
}
