//! Which OCI runtime a pod's shim drives, chosen per CRI runtime handler.
//!
//! The way that works with containerd 2.1 is the runtime type: handler `stasis-gvisor` with
//! `runtime_type = "io.containerd.stasis-gvisor.v2"` makes containerd run
//! `containerd-shim-stasis-gvisor-v2`, a link to this binary, whose name picks the backend.
//!
//! Runtime options are read too, for clients that can send them: containerd hands every shim
//! its handler's options, and for a runtime type that is not runc's own CRI wraps them as
//! `runtimeoptions.v1.Options` (TypeUrl, ConfigPath, ConfigBody). containerd 2.1.9 cannot use
//! them for pods in shim mode: any options on such a handler make every container fail in
//! containerd before the shim is called ("failed to get runtime v2 options: can't unmarshal
//! type runtimeoptions.v1.Options to output containerd.runc.v1.Options"). The form is:
//!
//! ```toml
//! [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.stasis-gvisor.options]
//!   TypeUrl = "io.stasis.v1.Backend"
//!   ConfigPath = "/etc/stasis/gvisor.toml"   # engine = "runsc", runtime_args = [...]
//! ```
//!
//! containerd 2.1 cannot put a TOML string into `ConfigBody` (a byte field: "cannot decode
//! TOML string into struct field runtimeoptions.Options.ConfigBody"), so the file is the way;
//! a body sent by other clients is read the same way.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The OCI runtimes stasis has a backend for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    #[default]
    Runc,
    Crun,
    Runsc,
}

impl Engine {
    pub const ALL: [Engine; 3] = [Engine::Runc, Engine::Crun, Engine::Runsc];

    pub fn name(self) -> &'static str {
        match self {
            Engine::Runc => "runc",
            Engine::Crun => "crun",
            Engine::Runsc => "runsc",
        }
    }

    fn from_binary(binary: &str) -> Option<Engine> {
        let base = Path::new(binary).file_name()?.to_str()?;
        Engine::ALL.into_iter().find(|e| e.name() == base)
    }
}

impl std::fmt::Display for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The backend of one shim, as its handler's options describe it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    #[serde(default)]
    pub engine: Engine,
    /// The runtime binary; default: the engine's name, looked up on PATH.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub binary: Option<PathBuf>,
    /// Extra global flags put before every subcommand (for runsc: `--platform=…`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub runtime_args: Vec<String>,
    /// How long a container restored from a pod checkpoint is held (frozen) waiting for the
    /// pod's FinishRestore before the shim gives up on the restore and stops it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_hold_secs: Option<u64>,
    /// The bound on a checkpoint whose caller sets none (containerd's Task API never does;
    /// a pod checkpoint without `--timeout`). Past it the runtime and CRIU are stopped
    /// before anything is thawed. Default: 600 s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_timeout_secs: Option<u64>,
}

impl BackendConfig {
    /// Default bound on a restore hold: long enough for big pods, short enough that a
    /// restore whose driver died does not leave frozen containers around for long.
    pub const DEFAULT_RESTORE_HOLD_SECS: u64 = 120;

    pub fn checkpoint_bound(&self) -> std::time::Duration {
        self.checkpoint_timeout_secs
            .map(std::time::Duration::from_secs)
            .unwrap_or(crate::runtime::DEFAULT_CHECKPOINT_TIMEOUT)
    }

    pub fn restore_hold(&self) -> std::time::Duration {
        std::time::Duration::from_secs(
            self.restore_hold_secs
                .unwrap_or(Self::DEFAULT_RESTORE_HOLD_SECS),
        )
    }
}

/// containerd's `runtimeoptions.v1.Options`.
#[derive(Clone, PartialEq, prost::Message)]
struct RuntimeOptions {
    #[prost(string, tag = "1")]
    type_url: String,
    #[prost(string, tag = "2")]
    config_path: String,
    #[prost(bytes = "vec", tag = "3")]
    config_body: Vec<u8>,
}

/// The one field of `containerd.runc.v1.Options` that says which runtime to run.
#[derive(Clone, PartialEq, prost::Message)]
struct RuncOptions {
    #[prost(string, tag = "6")]
    binary_name: String,
}

/// File the `start` action leaves in the pod's bundle for the shim it spawns.
pub const BUNDLE_FILE: &str = "stasis-backend.json";

impl BackendConfig {
    pub fn binary(&self) -> PathBuf {
        self.binary
            .clone()
            .unwrap_or_else(|| PathBuf::from(self.engine.name()))
    }

    /// Parses the TOML body of a handler's options.
    pub fn from_toml(id: &str, text: &str) -> Result<Self> {
        toml::from_str(text).map_err(|e| Error::invalid(id, format!("stasis runtime options: {e}")))
    }

    /// Reads the backend out of runtime options as containerd sends them (type URL + protobuf);
    /// `None` when they name none.
    pub fn from_options(id: &str, type_url: &str, value: &[u8]) -> Result<Option<Self>> {
        use prost::Message as _;
        if type_url.is_empty() && value.is_empty() {
            return Ok(None);
        }
        if type_url.ends_with("runtimeoptions.v1.Options") {
            let o = RuntimeOptions::decode(value)
                .map_err(|e| Error::invalid(id, format!("decode runtime options: {e}")))?;
            if !o.config_body.is_empty() {
                let text = String::from_utf8(o.config_body)
                    .map_err(|_| Error::invalid(id, "runtime options ConfigBody is not UTF-8"))?;
                return Self::from_toml(id, &text).map(Some);
            }
            if !o.config_path.is_empty() {
                let text = std::fs::read_to_string(&o.config_path).map_err(|e| {
                    Error::io(id, format!("read runtime options {}", o.config_path), e)
                })?;
                return Self::from_toml(id, &text).map(Some);
            }
            return Ok(None);
        }
        if type_url.ends_with("containerd.runc.v1.Options") {
            let o = RuncOptions::decode(value)
                .map_err(|e| Error::invalid(id, format!("decode runc options: {e}")))?;
            if o.binary_name.is_empty() {
                return Ok(None);
            }
            let engine = Engine::from_binary(&o.binary_name).ok_or_else(|| {
                Error::invalid(
                    id,
                    format!(
                        "BinaryName {:?} is none of runc, crun, runsc",
                        o.binary_name
                    ),
                )
            })?;
            return Ok(Some(BackendConfig {
                engine,
                binary: Some(PathBuf::from(o.binary_name)),
                ..Default::default()
            }));
        }
        Err(Error::invalid(
            id,
            format!("unknown runtime options type {type_url:?}"),
        ))
    }

    /// The backend a shim binary's own name asks for: `containerd-shim-stasis-<engine>-v2`
    /// (what containerd runs for `runtime_type = "io.containerd.stasis-<engine>.v2"`), with
    /// `gvisor` another name for runsc; plain `containerd-shim-stasis-v2` is runc.
    pub fn from_binary_name(argv0: &Path) -> Self {
        let name = argv0
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        let engine = name
            .strip_prefix("containerd-shim-stasis-")
            .and_then(|rest| rest.strip_suffix("-v2"))
            .and_then(|e| match e {
                "gvisor" => Some(Engine::Runsc),
                other => Engine::ALL.into_iter().find(|x| x.name() == other),
            })
            .unwrap_or_default();
        BackendConfig {
            engine,
            ..Default::default()
        }
    }

    /// The backend for a shim chosen by its binary name, with the settings of
    /// `<dir>/<engine>.toml` if that file exists (dir: `$STASIS_CONFIG_DIR`, else `/etc/stasis`):
    /// `binary` and `runtime_args`, the same keys as in handler options.
    pub fn for_binary_name(id: &str, argv0: &Path) -> Result<Self> {
        let dir = std::env::var_os("STASIS_CONFIG_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/etc/stasis"));
        Self::for_binary_name_in(id, argv0, &dir)
    }

    fn for_binary_name_in(id: &str, argv0: &Path, dir: &Path) -> Result<Self> {
        let engine = Self::from_binary_name(argv0).engine;
        let file = dir.join(format!("{}.toml", engine.name()));
        let text = match std::fs::read_to_string(&file) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(BackendConfig {
                    engine,
                    ..Default::default()
                })
            }
            Err(e) => return Err(Error::io(id, format!("read {}", file.display()), e)),
        };
        let mut table: toml::Table = toml::from_str(&text)
            .map_err(|e| Error::invalid(id, format!("{}: {e}", file.display())))?;
        let named = table
            .entry("engine")
            .or_insert_with(|| toml::Value::String(engine.name().into()))
            .as_str()
            .unwrap_or_default()
            .to_string();
        if named != engine.name() {
            return Err(Error::invalid(
                id,
                format!(
                    "{} sets engine {named:?}, but this shim binary runs {engine}",
                    file.display()
                ),
            ));
        }
        table
            .try_into()
            .map_err(|e| Error::invalid(id, format!("{}: {e}", file.display())))
    }

    /// Global flags for the runtime: the configured ones, else the engine's defaults. gVisor
    /// on these hosts needs the systrap platform, and its pods run without a network stack
    /// of their own (loopback only) so that a sandbox restores into any new network namespace.
    /// `--oci-seccomp`: without it runsc ignores the spec's seccomp profile (gVisor's own
    /// filters protect the host, not the pod from itself).
    pub fn args(&self) -> Vec<String> {
        if !self.runtime_args.is_empty() {
            return self.runtime_args.clone();
        }
        match self.engine {
            Engine::Runsc => vec![
                "--platform=systrap".into(),
                "--network=none".into(),
                "--oci-seccomp".into(),
            ],
            Engine::Runc | Engine::Crun => Vec::new(),
        }
    }

    pub fn save(&self, id: &str, bundle: &Path) -> Result<()> {
        let text =
            serde_json::to_vec_pretty(self).map_err(|e| Error::other(id, "encode backend", e))?;
        std::fs::write(bundle.join(BUNDLE_FILE), text)
            .map_err(|e| Error::io(id, "write the backend choice into the bundle", e))
    }

    /// The backend `start` chose for the shim serving `bundle` (runc if it chose none).
    pub fn load(id: &str, bundle: &Path) -> Result<Self> {
        match std::fs::read(bundle.join(BUNDLE_FILE)) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| Error::other(id, format!("parse {BUNDLE_FILE}"), e)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(Error::io(id, format!("read {BUNDLE_FILE}"), e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message as _;

    #[test]
    fn runtime_options_body_and_path() {
        let body = RuntimeOptions {
            type_url: "io.stasis.v1.Backend".into(),
            config_path: String::new(),
            config_body: b"engine = \"runsc\"\nruntime_args = [\"--platform=systrap\"]".to_vec(),
        };
        let c =
            BackendConfig::from_options("p", "runtimeoptions.v1.Options", &body.encode_to_vec())
                .unwrap()
                .unwrap();
        assert_eq!(c.engine, Engine::Runsc);
        assert_eq!(c.runtime_args, vec!["--platform=systrap"]);
        assert_eq!(c.binary(), PathBuf::from("runsc"));

        let dir = std::env::temp_dir().join(format!("stasis-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("crun.toml");
        std::fs::write(&file, "engine = \"crun\"\nbinary = \"/usr/bin/crun\"\n").unwrap();
        let path = RuntimeOptions {
            config_path: file.display().to_string(),
            ..Default::default()
        };
        let c = BackendConfig::from_options(
            "p",
            "type.googleapis.com/runtimeoptions.v1.Options",
            &path.encode_to_vec(),
        )
        .unwrap()
        .unwrap();
        assert_eq!(c.engine, Engine::Crun);
        c.save("p", &dir).unwrap();
        assert_eq!(BackendConfig::load("p", &dir).unwrap(), c);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bounds_come_from_the_settings_or_their_defaults() {
        let none = BackendConfig::default();
        assert_eq!(
            none.checkpoint_bound(),
            crate::runtime::DEFAULT_CHECKPOINT_TIMEOUT
        );
        assert_eq!(
            none.restore_hold().as_secs(),
            BackendConfig::DEFAULT_RESTORE_HOLD_SECS
        );
        let set: BackendConfig =
            toml::from_str("checkpoint_timeout_secs = 7\nrestore_hold_secs = 3\n").unwrap();
        assert_eq!(set.checkpoint_bound().as_secs(), 7);
        assert_eq!(set.restore_hold().as_secs(), 3);
    }

    #[test]
    fn config_file_beside_the_binary_name() {
        let dir = std::env::temp_dir().join(format!("stasis-etc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("runsc.toml"),
            "runtime_args = [\"--platform=ptrace\", \"--network=sandbox\"]\n",
        )
        .unwrap();
        std::fs::write(dir.join("crun.toml"), "engine = \"runc\"\n").unwrap();
        let by_name = |n: &str| BackendConfig::for_binary_name_in("p", Path::new(n), &dir);
        let c = by_name("containerd-shim-stasis-gvisor-v2").unwrap();
        assert_eq!(c.engine, Engine::Runsc);
        assert_eq!(c.args(), ["--platform=ptrace", "--network=sandbox"]);
        let e = by_name("containerd-shim-stasis-crun-v2")
            .unwrap_err()
            .to_string();
        assert!(e.contains("crun.toml") && e.contains("runc"), "{e}");
        // No file for the engine: its defaults (never the host's /etc/stasis, never the
        // process environment, which other tests share).
        let c = by_name("containerd-shim-stasis-v2").unwrap();
        assert_eq!(c.engine, Engine::Runc);
        assert_eq!(c.binary(), PathBuf::from("runc"));
        std::fs::write(dir.join("runc.toml"), "binary = \"/opt/runc-wrapper\"\n").unwrap();
        let c = by_name("containerd-shim-stasis-v2").unwrap();
        assert_eq!(c.binary(), PathBuf::from("/opt/runc-wrapper"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn runc_binary_name_and_errors() {
        let runc = RuncOptions {
            binary_name: "/usr/bin/crun".into(),
        };
        let c =
            BackendConfig::from_options("p", "containerd.runc.v1.Options", &runc.encode_to_vec())
                .unwrap()
                .unwrap();
        assert_eq!(c.engine, Engine::Crun);
        assert!(BackendConfig::from_options("p", "", &[]).unwrap().is_none());
        let name = |n: &str| BackendConfig::from_binary_name(Path::new(n)).engine;
        assert_eq!(name("/usr/bin/containerd-shim-stasis-v2"), Engine::Runc);
        assert_eq!(name("containerd-shim-stasis-gvisor-v2"), Engine::Runsc);
        assert_eq!(name("/x/containerd-shim-stasis-crun-v2"), Engine::Crun);
        assert_eq!(
            BackendConfig::from_binary_name(Path::new("containerd-shim-stasis-runsc-v2")).args(),
            ["--platform=systrap", "--network=none", "--oci-seccomp"]
        );
        let bad = RuntimeOptions {
            config_body: b"engine = \"kata\"".to_vec(),
            ..Default::default()
        };
        let e = BackendConfig::from_options("p", "runtimeoptions.v1.Options", &bad.encode_to_vec())
            .unwrap_err()
            .to_string();
        assert!(e.contains("kata"), "{e}");
        let e = BackendConfig::from_options("p", "foo.Options", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("foo.Options"), "{e}");
    }
}
