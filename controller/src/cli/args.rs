//! Flags several commands share, and how they become the library's types.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::ValueEnum;

use crate::{
    archive::Compression,
    image,
    policy::Policy,
    seal::{self, Opening},
};

/// Identities and the verifying key from their files.
pub(super) fn opening(identity: Option<&Path>, verify: Option<&Path>) -> Result<Opening> {
    Ok(Opening {
        identities: identity
            .map(seal::load_identities)
            .transpose()?
            .unwrap_or_default(),
        verify: verify
            .map(seal::load_verifying_key)
            .transpose()?
            .into_iter()
            .collect(),
    })
}

/// What a restored (or received) pod may ask for.
#[derive(clap::Args)]
pub(super) struct AdmitArgs {
    /// Accept these requests of the archive (comma separated or repeated): privileged,
    /// host-namespaces, capabilities, seccomp-unconfined, apparmor-unconfined,
    /// cgroup-parent, devices, unmasked-proc (masked/read-only path lists without the
    /// runtime's), sysctls (beyond the policy's list, by default kubelet's safe set),
    /// host-ports, selinux, seccomp-localhost (a profile file outside the policy's
    /// directories), apparmor-localhost (a loaded profile the policy does not name),
    /// mount-propagation (bidirectional), user-namespaces, log-file, runtime-handler (one
    /// the archive or a migration peer names that is not a stasis handler of this node).
    /// Without them such an archive is refused, every item listed, before anything is
    /// created. Fields this stasisctl does not know are always refused.
    #[arg(long = "allow", value_name = "ITEMS")]
    allow: Vec<String>,
    /// Also accept host-path mounts below PREFIX (repeatable); the node policy already
    /// allows kubelet's pod volume directory.
    #[arg(long = "allow-host-path", value_name = "PREFIX")]
    allow_host_paths: Vec<PathBuf>,
    /// Pull base images missing on the node from registry HOST[:PORT] (repeatable), by the
    /// digest the checkpoint recorded; without it a missing base image is refused.
    #[arg(long = "allow-registry", value_name = "HOST")]
    allow_registries: Vec<String>,
    /// The node's restore policy (JSON: allow, host_path_prefixes, cgroup_roots, sysctls,
    /// seccomp_profile_dirs, log_directory_prefixes, apparmor_profiles, runtime_handlers,
    /// base_image_registries; see SECURITY.md).
    /// Default: /etc/stasis/restore-policy.json if it exists, else built-in defaults.
    #[arg(long, env = "STASIS_RESTORE_POLICY", value_name = "FILE")]
    policy: Option<PathBuf>,
    /// Replace the contents of non-empty host volumes with the checkpointed ones (without
    /// it, captured volumes restore only into empty directories).
    #[arg(long)]
    pub(super) replace_volumes: bool,
}

impl AdmitArgs {
    pub(super) fn policy(&self) -> Result<Policy> {
        let mut policy = Policy::load(self.policy.as_deref())?;
        policy.widen(&self.allow, &self.allow_host_paths)?;
        policy
            .base_image_registries
            .extend(self.allow_registries.iter().cloned());
        Ok(policy)
    }
}

/// How to reach a registry (the flags `ctr` and nerdctl take).
#[derive(clap::Args, Clone)]
pub(super) struct RegistryArgs {
    /// Registry credentials USER:PASSWORD (else those of the registry in the docker config).
    /// With --password-stdin, USER alone: a password on the command line is visible to every
    /// user of the node (/proc/*/cmdline).
    #[arg(long, short = 'u', value_name = "USER[:PASSWORD]")]
    user: Option<String>,
    /// Read the registry password for --user from the first line of stdin.
    #[arg(long, requires = "user")]
    password_stdin: bool,
    /// docker config.json holding registry credentials (default: $DOCKER_CONFIG/config.json
    /// or ~/.docker/config.json).
    #[arg(long, value_name = "FILE")]
    docker_config: Option<PathBuf>,
    /// Talk plain HTTP to the registry (a local one); TLS otherwise.
    #[arg(long)]
    plain_http: bool,
}

impl RegistryArgs {
    /// Access to the registry of `reference` (`--user` is for that registry alone).
    pub(super) fn access(&self, reference: &str) -> Result<image::RegistryAccess> {
        Ok(image::RegistryAccess {
            user: self.credentials()?,
            user_registry: Some(reference.to_string()),
            docker_config: self.docker_config.clone(),
            plain_http: self.plain_http,
        })
    }

    /// `USER:PASSWORD`, the password read from stdin (once) with --password-stdin.
    fn credentials(&self) -> Result<Option<String>> {
        static PASSWORD: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        let Some(user) = &self.user else {
            return Ok(None);
        };
        if !self.password_stdin {
            return Ok(Some(user.clone()));
        }
        if user.contains(':') {
            bail!("--password-stdin: give --user USER alone, the password comes from stdin");
        }
        if PASSWORD.get().is_none() {
            let mut line = String::new();
            std::io::stdin()
                .read_line(&mut line)
                .context("--password-stdin: read the password")?;
            let password = line.trim_end_matches(['\r', '\n']).to_string();
            if password.is_empty() {
                bail!("--password-stdin: stdin held no password");
            }
            let _ = PASSWORD.set(password);
        }
        Ok(Some(format!(
            "{user}:{}",
            PASSWORD.get().map(String::as_str).unwrap_or("")
        )))
    }
}

/// Where the node's checkpoint store is.
#[derive(clap::Args)]
pub(super) struct StoreDir {
    /// The node's checkpoint store (root's, 0700).
    #[arg(long, env = "STASIS_STORE", default_value = crate::ops::store::DEFAULT_STORE)]
    pub store_dir: std::path::PathBuf,
}

#[derive(Clone, Copy, ValueEnum)]
pub(super) enum Format {
    Table,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
pub(super) enum CompressArg {
    None,
    Gzip,
    Zstd,
}

impl From<CompressArg> for Compression {
    fn from(c: CompressArg) -> Self {
        match c {
            CompressArg::None => Compression::None,
            CompressArg::Gzip => Compression::Gzip,
            CompressArg::Zstd => Compression::Zstd,
        }
    }
}

/// How a long command reports.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(super) enum Output {
    Text,
    Json,
}

/// Ends a command that reports progress: in JSON, its result (or error) as the last event;
/// in text, `print` shows the result.
pub(super) fn conclude<T>(
    format: Output,
    r: Result<T>,
    fields: impl FnOnce(&T) -> serde_json::Value,
    print: impl FnOnce(&T),
) -> Result<()> {
    match (&r, format) {
        (Ok(v), Output::Json) => crate::progress::result(Ok(fields(v))),
        (Err(e), Output::Json) => crate::progress::result(Err(e)),
        (Ok(v), Output::Text) => print(v),
        (Err(_), Output::Text) => {}
    }
    r.map(|_| ())
}
