//! A throwaway OCI registry on loopback: Debian's `docker-registry` (the reference
//! distribution registry) with its storage in the test's directory, started by the test and
//! stopped when dropped.

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

pub struct Registry {
    child: Child,
    /// `127.0.0.1:<port>`.
    pub host: String,
}

impl Registry {
    pub fn start(dir: &Path) -> Result<Registry> {
        Self::start_with(dir, None)
    }

    /// A registry that wants HTTP basic auth with this user and password (an htpasswd file
    /// with a bcrypt hash, the only kind the registry takes).
    pub fn start_with(dir: &Path, auth: Option<(&str, &str)>) -> Result<Registry> {
        let binary = crate::which("docker-registry").context(
            "docker-registry not found: scripts/install-deps.sh installs Debian's docker-registry",
        )?;
        // A free loopback port, released just before the registry takes it.
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let host = format!("127.0.0.1:{port}");
        let root = dir.join("registry");
        std::fs::create_dir_all(&root)?;
        let config = root.join("config.yml");
        let mut text = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {host}\n",
            root.join("data").display()
        );
        if let Some((user, password)) = auth {
            let hash =
                bcrypt::hash_with_result(password, 5)?.format_for_version(bcrypt::Version::TwoY);
            let file = root.join("htpasswd");
            std::fs::write(&file, format!("{user}:{hash}\n"))?;
            text.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: stasis-test\n    path: {}\n",
                file.display()
            ));
        }
        std::fs::write(&config, text)?;
        let log = std::fs::File::create(root.join("registry.log"))?;
        let child = Command::new(binary)
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("start docker-registry")?;
        let mut registry = Registry { child, host };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(&registry.host).is_err() {
            if let Some(status) = registry.child.try_wait()? {
                bail!(
                    "docker-registry exited ({status}): {}",
                    std::fs::read_to_string(root.join("registry.log")).unwrap_or_default()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "docker-registry did not listen on {} in 20 s",
                    registry.host
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(registry)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
