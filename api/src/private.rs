//! Files and directories that hold checkpoints, written the one way both sides write them:
//! private (0600 files, 0700 directories), under fresh random names, never through a symbolic
//! link and never over something that already exists. A checkpoint holds memory and
//! environment secrets, and the directories it passes through may be shared with other users.

use std::{
    fs::{DirBuilder, File, OpenOptions},
    io::{self, Read, Write},
    os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt},
    path::Path,
};

/// A name nobody can guess or pre-create: 64 random bits from the kernel, as hex.
pub fn random_suffix() -> io::Result<String> {
    let mut bytes = [0u8; 8];
    File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// A new file at `path`, mode `mode`: never through a link, never over an existing file.
pub fn create_file(path: &Path, mode: u32) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

/// [`create_file`] with mode 0600.
pub fn create_private(path: &Path) -> io::Result<File> {
    create_file(path, 0o600)
}

/// A new 0600 file at `path` holding `data`.
pub fn write_private(path: &Path, data: impl AsRef<[u8]>) -> io::Result<()> {
    create_private(path)?.write_all(data.as_ref())
}

/// Opens `path` for reading without following a link at its last component (a FIFO or a
/// device does not block the open either: callers check the type of what they got).
pub fn open_nofollow(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)
}

/// A new directory at `path`, 0700; an error if anything is there already (a link included).
pub fn create_private_dir(path: &Path) -> io::Result<()> {
    DirBuilder::new().mode(0o700).create(path)
}

/// A directory of the caller's (root's) that nobody else may enter, created 0700 with its
/// parents when missing; refused when it is anything else (a link, another owner, open to
/// others), so a predictable path cannot have been prepared by another user.
pub fn private_root(dir: &Path) -> io::Result<()> {
    DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    let meta = dir.symlink_metadata()?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if !meta.is_dir() || meta.uid() != euid || meta.mode() & 0o077 != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} must be a directory of uid {euid}'s with mode 0700",
                dir.display()
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn scratch(name: &str) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!(
            "stasis-private-{name}-{}-{}",
            std::process::id(),
            random_suffix().unwrap()
        ));
        DirBuilder::new().mode(0o700).create(&p).unwrap();
        p
    }

    #[test]
    fn random_names_are_fresh_hex() {
        let a = random_suffix().unwrap();
        let b = random_suffix().unwrap();
        assert_eq!(a.len(), 16);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn private_files_are_0600_and_never_replace_or_follow() {
        let d = scratch("files");
        let f = d.join("secret");
        write_private(&f, b"key").unwrap();
        assert_eq!(f.metadata().unwrap().permissions().mode() & 0o777, 0o600);
        // Never over an existing file.
        assert_eq!(
            write_private(&f, b"other").unwrap_err().kind(),
            io::ErrorKind::AlreadyExists
        );
        assert_eq!(std::fs::read(&f).unwrap(), b"key");
        // Never through a link, even a dangling one.
        let link = d.join("link");
        std::os::unix::fs::symlink(d.join("target"), &link).unwrap();
        assert!(create_private(&link).is_err());
        assert!(!d.join("target").exists());
        assert!(open_nofollow(&link).is_err());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn private_roots_refuse_links_and_open_modes() {
        let d = scratch("roots");
        let root = d.join("a/b");
        private_root(&root).unwrap();
        assert_eq!(root.metadata().unwrap().permissions().mode() & 0o777, 0o700);
        let open = d.join("open");
        DirBuilder::new().mode(0o755).create(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(private_root(&open).is_err());
        let link = d.join("link");
        std::os::unix::fs::symlink(&root, &link).unwrap();
        assert!(private_root(&link).is_err());
        assert!(create_private_dir(&root).is_err());
        let _ = std::fs::remove_dir_all(&d);
    }
}
