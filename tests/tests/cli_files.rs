//! Files stasisctl writes that hold secrets: private keys and the shared migration key are
//! 0600 whatever the caller's umask, and an existing file is never replaced.

use std::{os::unix::fs::PermissionsExt, path::Path, process::Command};

use anyhow::{ensure, Result};

/// Runs stasisctl under umask 000 (the most permissive a caller could have).
fn stasisctl_open_umask(args: &[&str]) -> Result<std::process::Output> {
    let bin = stasis_e2e::built_binary("stasisctl")?;
    Ok(Command::new("sh")
        .arg("-c")
        .arg("umask 000; exec \"$@\"")
        .arg("sh")
        .arg(bin)
        .args(args)
        .output()?)
}

fn mode(p: &Path) -> Result<u32> {
    Ok(std::fs::symlink_metadata(p)?.permissions().mode() & 0o777)
}

#[test]
fn secret_keys_are_private_and_never_replaced() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("stasis-keys-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let cases: [(&str, Vec<&str>); 3] = [
        (
            "signing.key",
            vec!["key", "generate", "--type", "signing", "--output"],
        ),
        (
            "identity.age",
            vec!["key", "generate", "--type", "encryption", "--output"],
        ),
        ("migration.key", vec!["migrate", "keygen", "--output"]),
    ];
    for (name, args) in cases {
        let path = dir.join(name);
        let mut full = args.clone();
        let p = path.display().to_string();
        full.push(&p);
        let out = stasisctl_open_umask(&full)?;
        ensure!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        ensure!(
            mode(&path)? == 0o600,
            "{name} is {:o} under umask 000, not 0600",
            mode(&path)?
        );
        let before = std::fs::read(&path)?;
        let again = stasisctl_open_umask(&full)?;
        ensure!(
            !again.status.success() && std::fs::read(&path)? == before,
            "{name}: a second run replaced the key or did not fail: {}",
            String::from_utf8_lossy(&again.stderr)
        );
    }
    // A dangling link at the output: refused, nothing written where it points.
    let link = dir.join("link.key");
    let target = dir.join("elsewhere.key");
    std::os::unix::fs::symlink(&target, &link)?;
    let out = stasisctl_open_umask(&["migrate", "keygen", "--output", link.to_str().unwrap()])?;
    ensure!(
        !out.status.success() && !target.exists(),
        "a key was written through a symbolic link"
    );
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
