//! stasisctl: checkpoint, restore, migrate and inspect whole pods.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use stasis_controller::{
    archive::{self, human, Compression},
    bench, cri, image, migrate,
    pod::{self, CheckpointArgs, RestoreArgs, Target},
    policy::{self, Policy},
    seal::{self, Opening, Sealing},
};

/// Identities and the verifying key from their files.
fn opening(
    identity: Option<&std::path::Path>,
    verify: Option<&std::path::Path>,
) -> Result<Opening> {
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

/// Checkpoint and restore whole Kubernetes pods: every container captured at one instant.
///
/// stasisctl talks to containerd's CRI and to the Checkpoint service of the pod's shim
/// (containerd-shim-stasis-v2, or any runtime serving the same service). It never runs CRIU
/// itself.
#[derive(Parser)]
#[command(name = "stasisctl", version)]
struct Cli {
    /// containerd's socket.
    #[arg(long, global = true, default_value = "/run/containerd/containerd.sock")]
    address: String,
    /// containerd namespace of the pods (CRI uses k8s.io).
    #[arg(long, global = true, default_value = "k8s.io")]
    namespace: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Pods and their containers.
    Pod {
        #[command(subcommand)]
        command: PodCommand,
    },
    /// Pod checkpoints as OCI images: build one from an archive, push it to a registry, pull
    /// it (through containerd's Transfer service; the image lives in containerd's store, in
    /// --namespace). `pod checkpoint --image REF` writes one directly; `pod restore REF` and
    /// `inspect REF` read one.
    Image {
        #[command(subcommand)]
        command: ImageCommand,
    },
    /// Compare runtime handlers on the same pod workloads: pod start, pod checkpoint, frozen
    /// window, archive size, restore, and whether restored pods stayed consistent.
    ///
    /// Each run starts a pod of N busybox containers (each keeps a counter in memory and in a
    /// file), checkpoints it live, removes it, restores it as a new pod and checks that every
    /// counter continued from the checkpoint, runs on, and that no file got ahead of memory.
    /// Handlers whose shim does not serve the stasis Checkpoint service (containerd's runc, say)
    /// are checkpointed container by container through CRI and have no restore column.
    /// Ratios are against the first handler on the same pod size.
    Bench {
        /// CRI runtime handler to measure; repeat it; the first is the baseline.
        #[arg(long = "handler", required = true)]
        handlers: Vec<String>,
        /// Pod sizes (containers per pod), comma separated.
        #[arg(long, value_delimiter = ',', default_value = "1,4")]
        containers: Vec<usize>,
        /// Runs per handler and size (medians are shown).
        #[arg(long, default_value_t = 1)]
        runs: usize,
        /// Image of the containers; needs sh, cat and sleep (busybox), already in containerd.
        #[arg(long)]
        image: String,
        /// Where archives and pod logs go while the bench runs.
        #[arg(long, default_value = "/var/lib/stasis/bench")]
        work_dir: PathBuf,
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// (internal) The watchdog a restore starts to clean up if stasisctl is killed.
    #[command(name = "__restore-guard", hide = true)]
    RestoreGuard,
    /// Receive pods from other nodes (`migrate listen`), and make the key both sides share.
    Migrate {
        #[command(subcommand)]
        command: MigrateCommand,
    },
    /// Make a key pair for signing (Ed25519) or encrypting (age X25519) archives.
    Key {
        #[command(subcommand)]
        command: KeyCommand,
    },
    /// Show what a pod checkpoint archive holds, and what it asks for.
    Inspect {
        /// The archive file, or a checkpoint image reference in containerd's store.
        archive: String,
        /// age identity file, to see inside an encrypted archive.
        #[arg(long, value_name = "FILE")]
        identity: Option<PathBuf>,
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
        /// The node's restore policy to judge the archive's requests by (as `pod restore`
        /// would without --allow flags). Default: /etc/stasis/restore-policy.json if it
        /// exists, else built-in defaults.
        #[arg(long, env = "STASIS_RESTORE_POLICY", value_name = "FILE")]
        policy: Option<PathBuf>,
    },
}

/// What a restored (or received) pod may ask for.
#[derive(clap::Args)]
struct AdmitArgs {
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
    replace_volumes: bool,
}

impl AdmitArgs {
    fn policy(&self) -> Result<Policy> {
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
struct RegistryArgs {
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
    fn access(&self, reference: &str) -> Result<image::RegistryAccess> {
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

/// `image push` / `image pull`, timed; a pulled image must be a pod checkpoint.
async fn transfer_image(
    target: &Target,
    reference: &str,
    registry: &RegistryArgs,
    push: bool,
) -> Result<()> {
    let started = std::time::Instant::now();
    image::transfer(
        &target.address,
        &target.namespace,
        reference,
        &registry.access(reference)?,
        push,
    )
    .await?;
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    if push {
        eprintln!("pushed {reference} in {ms:.0} ms");
    } else {
        // Only a checkpoint image is worth having here: say at once if it is not.
        let s = image::summary(&target.address, &target.namespace, reference).await?;
        eprintln!(
            "pulled {reference} (pod {}, {} container(s), {}) in {ms:.0} ms",
            s.pod_name,
            s.containers.len(),
            human(s.size)
        );
    }
    Ok(())
}

#[derive(Subcommand)]
enum ImageCommand {
    /// Turn pod archive FILE into checkpoint image REF in containerd's store: the pod's own
    /// files in the first layer, each container's checkpoint (as checkpointctl reads it) in a
    /// layer of its own. The archive is checked in full first.
    Build {
        archive: PathBuf,
        reference: String,
        /// Compression of the layers.
        #[arg(long, value_enum, default_value = "none")]
        compress: CompressArg,
        /// age identity file, for an encrypted archive (the image is not encrypted).
        #[arg(long, value_name = "FILE")]
        identity: Option<PathBuf>,
        /// Refuse the archive unless its manifest is signed by this Ed25519 public key (PEM);
        /// the signature goes into the image with it.
        #[arg(long, value_name = "PUB")]
        verify_key: Option<PathBuf>,
    },
    /// Push image REF from containerd's store to its registry.
    Push {
        reference: String,
        #[command(flatten)]
        registry: RegistryArgs,
    },
    /// Pull image REF from its registry into containerd's store.
    Pull {
        reference: String,
        #[command(flatten)]
        registry: RegistryArgs,
    },
}

#[derive(Subcommand)]
enum MigrateCommand {
    /// Write a new shared migration key (0600; never replaces a file). Copy it to both nodes.
    Keygen {
        #[arg(long, short)]
        output: PathBuf,
    },
    /// On the target node: receive pods sent by `pod migrate` and restore them into this
    /// node's containerd (--address). Peers must hold the same key (a Noise session: the key
    /// is proven before anything is sent, and the stream is encrypted and authenticated).
    /// Received pods pass the same restore policy as archives. Prints each new pod id.
    Listen {
        /// Address to listen on, e.g. 0.0.0.0:7443.
        #[arg(long)]
        listen: String,
        /// Shared key from `stasisctl migrate keygen` (the same file on both nodes).
        #[arg(long = "key-file", value_name = "K")]
        key_file: PathBuf,
        #[command(flatten)]
        admit: AdmitArgs,
        /// Exit after this many migrations (default: serve until stopped).
        #[arg(long, default_value_t = 0)]
        count: u32,
    },
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Write a new private key to OUTPUT (0600; never replaces a file) and its public half to
    /// OUTPUT.pub, and print the public half. Signing keys are PKCS#8/SPKI PEM; encryption
    /// identities are age files, their public half an `age1…` recipient.
    Generate {
        #[arg(long = "type", value_enum)]
        kind: KeyKindArg,
        #[arg(long, short)]
        output: PathBuf,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum KeyKindArg {
    /// Ed25519, for --sign-key / --verify-key.
    Signing,
    /// age X25519, for --encrypt-to / --identity.
    Encryption,
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Table,
    Json,
}

#[derive(Subcommand)]
enum PodCommand {
    /// List pods with their runtime, state and containers.
    Ls,
    /// Checkpoint every (or the given) running container of POD at one instant into an archive.
    Checkpoint {
        /// Pod id, unique id prefix, or pod name.
        pod: String,
        /// Archive to write (must not exist). Nothing is left there if the checkpoint fails.
        /// With a trailing slash (`DIR/`): the checkpoint as a directory (the archive's files
        /// unpacked, 0700), which `pod restore DIR` reads, lazily without copying its pages.
        #[arg(
            long,
            short,
            required_unless_present = "image",
            conflicts_with = "image"
        )]
        output: Option<PathBuf>,
        /// Write the checkpoint as OCI image REF into containerd's image store instead (push
        /// it with `stasisctl image push`); the layers are compressed as --compress says.
        #[arg(long, value_name = "REF")]
        image: Option<String>,
        /// Keep the pod running afterwards (else its containers are stopped).
        #[arg(long)]
        leave_running: bool,
        /// Compression of the archive (readers detect it).
        #[arg(long, value_enum, default_value = "none")]
        compress: CompressArg,
        /// Only these containers (id, id prefix or name); repeat for several.
        #[arg(long = "container")]
        containers: Vec<String>,
        /// Checkpoint established TCP connections.
        #[arg(long)]
        tcp_established: bool,
        /// Checkpoint file locks.
        #[arg(long)]
        file_locks: bool,
        /// Give up after this many seconds (the pod is thawed); 0 = no limit.
        #[arg(long, default_value_t = 0)]
        timeout: u32,
        /// Skip the early check that the output's file system has room for about twice the
        /// pod's resident memory plus writable layers (a full disk still fails cleanly).
        #[arg(long)]
        skip_space_check: bool,
        /// Sign the archive's manifest with this Ed25519 private key (PKCS#8 PEM, from
        /// `stasisctl key generate --type signing` or `openssl genpkey -algorithm ed25519`).
        #[arg(long, value_name = "KEY")]
        sign_key: Option<PathBuf>,
        /// Encrypt the archive (age format) to this X25519 recipient (`age1…`) or to every
        /// recipient in this file; repeatable. Only their identities can restore or inspect it.
        #[arg(long = "encrypt-to", value_name = "RECIPIENT")]
        encrypt_to: Vec<String>,
    },
    /// Move POD to the node where `stasisctl migrate listen` runs; prints the new pod id there.
    ///
    /// The pod is frozen once, captured as for a checkpoint and streamed (no archive on
    /// either node); the target restores it and lets it run; only then is the pod here
    /// stopped and removed. Any failure before that leaves it running here, and nothing on the
    /// target. The pod gets a new IP address; established TCP connections are not moved.
    Migrate {
        /// Pod id, unique id prefix, or pod name.
        pod: String,
        /// The receiver, ADDR:PORT.
        #[arg(long)]
        to: String,
        /// Shared key from `stasisctl migrate keygen` (the same file on both nodes).
        #[arg(long = "key-file", value_name = "K")]
        key_file: PathBuf,
        /// Name of the pod on the target (default: the same).
        #[arg(long)]
        name: Option<String>,
        /// Runtime handler on the target (default: the one the pod runs under here).
        #[arg(long)]
        runtime_handler: Option<String>,
        /// Give up the capture after this many seconds (the pod runs on); 0 = no limit.
        #[arg(long, default_value_t = 0)]
        timeout: u32,
        /// Let the pod run on the target before its memory is mapped: pages are served on
        /// demand from the received images and pulled in the background (runc/crun; gVisor
        /// restores eagerly).
        #[arg(long)]
        lazy: bool,
        /// Sign what is sent with this Ed25519 key (PEM), for targets whose restore policy
        /// names trusted signers.
        #[arg(long, value_name = "KEY")]
        sign_key: Option<PathBuf>,
    },
    /// Restore a pod archive as a new running pod; prints the new pod id.
    ///
    /// The archive is unpacked into the restore store (/var/lib/stasis/restores, root's,
    /// 0700) under a fresh random id, which the new pod and its containers name; the unpacked
    /// copy is removed afterwards, also when the restore fails or is interrupted.
    Restore {
        /// The archive file, or a checkpoint image reference (pulled when not in containerd's
        /// store).
        archive: String,
        #[command(flatten)]
        registry: RegistryArgs,
        /// Name of the new pod (default: the checkpointed pod's name).
        #[arg(long)]
        name: Option<String>,
        /// CRI runtime handler for the new pod (default: the one the pod ran under, as the
        /// archive records it; "stasis" for archives that record none).
        #[arg(long)]
        runtime_handler: Option<String>,
        #[command(flatten)]
        admit: AdmitArgs,
        /// Refuse the archive unless its manifest is signed by this Ed25519 public key (PEM).
        #[arg(long, value_name = "PUB")]
        verify_key: Option<PathBuf>,
        /// age identity file to decrypt an encrypted archive.
        #[arg(long, value_name = "FILE")]
        identity: Option<PathBuf>,
        /// Resume the containers before their memory is in: pages are served on demand (CRIU
        /// lazy-pages over userfaultfd) and pulled in the background; reports the time to
        /// running and to the last page. From an uncompressed archive the pages are read
        /// from the archive itself (each chunk checked against the manifest as it is read),
        /// so the time to running does not grow with memory. runc/crun only (runsc restores
        /// eagerly).
        #[arg(long)]
        lazy: bool,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum CompressArg {
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

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli).await {
        eprintln!("stasisctl: {e:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> Result<()> {
    let target = Target {
        address: cli.address,
        namespace: cli.namespace,
    };
    match cli.command {
        Command::Pod { command } => match command {
            PodCommand::Ls => pod::ls(&target).await,
            PodCommand::Migrate {
                pod,
                to,
                key_file,
                name,
                runtime_handler,
                timeout,
                lazy,
                sign_key,
            } => {
                let m = migrate::migrate(
                    &target,
                    migrate::MigrateArgs {
                        pod: pod.clone(),
                        to: to.clone(),
                        key: key_file,
                        name,
                        runtime_handler,
                        timeout,
                        lazy,
                        sign: sign_key
                            .as_deref()
                            .map(seal::load_signing_key)
                            .transpose()?,
                    },
                )
                .await?;
                eprintln!(
                    "pod {pod} moved to {to} as {}: downtime {:.0} ms (frozen here until running there), {} sent, {:.0} ms in all",
                    m.target_pod,
                    m.downtime_ms,
                    archive::human(m.bytes_sent),
                    m.total_ms
                );
                println!("{}", m.target_pod);
                Ok(())
            }
            PodCommand::Checkpoint {
                pod,
                output,
                image,
                leave_running,
                compress,
                containers,
                tcp_established,
                file_locks,
                timeout,
                skip_space_check,
                sign_key,
                encrypt_to,
            } => {
                let sealing = Sealing {
                    sign: sign_key
                        .as_deref()
                        .map(seal::load_signing_key)
                        .transpose()?,
                    recipients: encrypt_to
                        .iter()
                        .map(|r| seal::load_recipients(r))
                        .collect::<Result<Vec<_>>>()?
                        .into_iter()
                        .flatten()
                        .collect(),
                };
                pod::checkpoint(
                    &target,
                    CheckpointArgs {
                        pod,
                        output: output.unwrap_or_default(),
                        leave_running,
                        compress: compress.into(),
                        containers,
                        tcp_established,
                        file_locks,
                        timeout,
                        space_check: !skip_space_check,
                        sealing,
                        delivery: Default::default(),
                        hold_secs: None,
                        image,
                    },
                )
                .await
            }
            PodCommand::Restore {
                archive,
                registry,
                name,
                runtime_handler,
                admit,
                verify_key,
                identity,
                lazy,
            } => {
                let mut opening = opening(identity.as_deref(), verify_key.as_deref())?;
                let policy = admit.policy()?;
                // A node that names trusted signers restores nothing else.
                opening.verify.extend(policy.signers()?);
                let reference = image::looks_like_reference(&archive).then(|| archive.clone());
                let registry = registry.access(&archive)?;
                let id = pod::restore(
                    &target,
                    RestoreArgs {
                        archive: PathBuf::from(archive),
                        image: reference,
                        registry,
                        name,
                        runtime_handler,
                        offered_runtime_handler: None,
                        policy,
                        replace_volumes: admit.replace_volumes,
                        opening,
                        lazy,
                    },
                )
                .await?;
                println!("{id}");
                Ok(())
            }
        },
        Command::Bench {
            handlers,
            containers,
            runs,
            image,
            work_dir,
            format,
        } => {
            let args = bench::BenchArgs {
                handlers,
                containers,
                runs,
                image,
                work_dir,
            };
            let rows = bench::run(&target, &args).await?;
            match format {
                Format::Json => println!("{}", serde_json::to_string_pretty(&rows)?),
                Format::Table => print!("{}", bench::table(&rows)),
            }
            Ok(())
        }
        Command::RestoreGuard => stasis_controller::guard::run(&target.address).await,
        Command::Migrate { command } => match command {
            MigrateCommand::Keygen { output } => {
                migrate::keygen(&output)?;
                eprintln!(
                    "wrote {}; copy it (mode 0600) to the other node",
                    output.display()
                );
                Ok(())
            }
            MigrateCommand::Listen {
                listen,
                key_file,
                admit,
                count,
            } => {
                migrate::listen(
                    &target,
                    migrate::ListenArgs {
                        listen,
                        key: key_file,
                        policy: admit.policy()?,
                        replace_volumes: admit.replace_volumes,
                        count,
                    },
                )
                .await
            }
        },
        Command::Key {
            command: KeyCommand::Generate { kind, output },
        } => {
            let kind = match kind {
                KeyKindArg::Signing => seal::KeyKind::Signing,
                KeyKindArg::Encryption => seal::KeyKind::Encryption,
            };
            print!("{}", seal::generate(kind, &output)?);
            eprintln!(
                "private key {} (keep it secret), public {}.pub",
                output.display(),
                output.display()
            );
            Ok(())
        }
        Command::Image { command } => match command {
            ImageCommand::Build {
                archive: file,
                reference,
                compress,
                identity,
                verify_key,
            } => {
                let opening = opening(identity.as_deref(), verify_key.as_deref())?;
                let started = std::time::Instant::now();
                let size = image::build_from_archive(
                    &target.address,
                    &target.namespace,
                    &file,
                    &reference,
                    compress.into(),
                    &opening,
                )
                .await?;
                eprintln!(
                    "image {reference} ({}) built from {} in {:.0} ms",
                    human(size),
                    file.display(),
                    started.elapsed().as_secs_f64() * 1000.0
                );
                Ok(())
            }
            ImageCommand::Push {
                reference,
                registry,
            } => transfer_image(&target, &reference, &registry, true).await,
            ImageCommand::Pull {
                reference,
                registry,
            } => transfer_image(&target, &reference, &registry, false).await,
        },
        Command::Inspect {
            archive,
            identity,
            format,
            policy,
        } => {
            let mut s = if image::looks_like_reference(&archive) {
                image::inspect(&target.address, &target.namespace, &archive).await?
            } else {
                archive::inspect_with(Path::new(&archive), &opening(identity.as_deref(), None)?)?
            };
            let mut policy = Policy::load(policy.as_deref())?;
            if s.requests
                .iter()
                .any(|r| r.item == policy::Item::RuntimeHandler)
            {
                // The node's stasis handlers, when its containerd answers; else none is
                // assumed allowed (pod restore asks containerd itself).
                let known = match cri::connect(Path::new(&target.address)).await {
                    Ok(mut rt) => cri::stasis_handlers(&mut rt).await.unwrap_or_default(),
                    Err(_) => Vec::new(),
                };
                policy.learn_runtime_handlers(known);
            }
            s.refused = s
                .requests
                .iter()
                .filter(|r| policy.refuses(r))
                .cloned()
                .collect();
            match format {
                Format::Json => println!("{}", serde_json::to_string_pretty(&s)?),
                Format::Table if s.encrypted && s.pod_name.is_empty() => {
                    println!("archive   {} ({})", s.archive, human(s.archive_bytes));
                    println!("encrypted yes (age): pass --identity FILE to see the pod it holds");
                }
                Format::Table => {
                    println!("archive   {} ({})", s.archive, human(s.archive_bytes));
                    if s.encrypted {
                        println!("encrypted yes (age)");
                    }
                    match &s.signed_by {
                        Some(k) => println!(
                            "signed    by {k} (not verified here: pod restore --verify-key does)"
                        ),
                        None => println!("signed    no"),
                    }
                    println!("pod       {} (namespace {})", s.pod_name, s.pod_namespace);
                    println!("engine    {}", s.engine);
                    if s.sandbox_image_bytes > 0 {
                        println!(
                            "sandbox   {} (one image of the whole sandbox: every container's memory and files)",
                            human(s.sandbox_image_bytes)
                        );
                    }
                    println!(
                        "{:<16} {:<14} {:<32} {:>12} {:>12} {:>10}  CHECKPOINTED",
                        "CONTAINER", "ID", "IMAGE", "CHECKPOINT", "ROOTFS DIFF", "FROZEN"
                    );
                    for c in &s.containers {
                        println!(
                            "{:<16} {:<14} {:<32} {:>12} {:>12} {:>8.0}ms  {}{}",
                            c.name,
                            &c.id[..c.id.len().min(13)],
                            c.image,
                            human(c.checkpoint_bytes),
                            human(c.rootfs_diff_bytes),
                            c.frozen_ms,
                            c.checkpointed,
                            if c.was_paused { " (paused)" } else { "" }
                        );
                    }
                    if s.requests.is_empty() {
                        println!("requests  nothing beyond an ordinary pod");
                    } else {
                        println!(
                            "requests  ({} of {} refused by this node's restore policy unless allowed)",
                            s.refused.len(),
                            s.requests.len()
                        );
                        for r in &s.requests {
                            let verdict = if s.refused.contains(r) {
                                "refused"
                            } else {
                                "allowed"
                            };
                            println!("  {verdict}  {r}");
                        }
                    }
                }
            }
            Ok(())
        }
    }
}
