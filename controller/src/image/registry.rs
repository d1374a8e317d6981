use super::*;

/// Registry access: credentials (as `ctr`/nerdctl take them) and plain HTTP for a local
/// registry.
#[derive(Clone, Debug, Default)]
pub struct RegistryAccess {
    /// `USER:PASSWORD`; else the docker config's entry for the registry, if any.
    pub user: Option<String>,
    /// The registry `user` is for (that of the image the command names): never handed to
    /// another one (a base image's registry, say).
    pub user_registry: Option<String>,
    /// A docker `config.json` to take credentials from (default `~/.docker/config.json`).
    pub docker_config: Option<PathBuf>,
    pub plain_http: bool,
}

impl RegistryAccess {
    /// (user, secret) for the registry of image `reference`.
    pub fn credentials_for(&self, reference: &str) -> Result<Option<(String, String)>> {
        self.credentials(registry_host(reference))
    }

    /// (user, secret) for `host`.
    pub(super) fn credentials(&self, host: &str) -> Result<Option<(String, String)>> {
        let own = self
            .user_registry
            .as_deref()
            .is_none_or(|r| registry_host(r) == host);
        if let (Some(u), true) = (&self.user, own) {
            let (user, pass) = u.split_once(':').context("--user wants USER:PASSWORD")?;
            return Ok(Some((user.to_string(), pass.to_string())));
        }
        let path = match &self.docker_config {
            Some(p) => p.clone(),
            None => match std::env::var_os("DOCKER_CONFIG") {
                Some(d) => PathBuf::from(d).join("config.json"),
                None => PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
                    .join(".docker/config.json"),
            },
        };
        let Ok(text) = std::fs::read(&path) else {
            if self.docker_config.is_some() {
                bail!("cannot read {}", path.display());
            }
            return Ok(None);
        };
        #[derive(Deserialize)]
        struct Entry {
            #[serde(default)]
            auth: String,
        }
        #[derive(Deserialize)]
        struct Config {
            #[serde(default)]
            auths: HashMap<String, Entry>,
        }
        let config: Config = serde_json::from_slice(&text)
            .with_context(|| format!("{} is not a docker config.json", path.display()))?;
        // Docker Hub's entry is keyed by its index's address.
        let wanted = |k: &str| k == host || (host == "docker.io" && k == "index.docker.io");
        let entry = config.auths.iter().find(|(k, _)| {
            let k = k
                .trim_start_matches("https://")
                .trim_start_matches("http://");
            k.split('/').next().is_some_and(wanted)
        });
        let Some((_, entry)) = entry else {
            return Ok(None);
        };
        use base64::Engine;
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(entry.auth.trim())
            .with_context(|| format!("{}: the auth of {host} is not base64", path.display()))?;
        let decoded = String::from_utf8(decoded)?;
        let (user, pass) = decoded.split_once(':').with_context(|| {
            format!(
                "{}: the auth of {host} is not USER:PASSWORD",
                path.display()
            )
        })?;
        Ok(Some((user.to_string(), pass.to_string())))
    }
}

/// The registry host of a reference (`host[:port]/repo:tag`), as containerd resolves it.
pub(super) fn registry_host(reference: &str) -> &str {
    match reference.split_once('/') {
        Some((first, _)) if first.contains('.') || first.contains(':') || first == "localhost" => {
            first
        }
        _ => "docker.io",
    }
}

/// Answers containerd's credential requests on a Streaming-service stream until it closes.
pub(super) async fn serve_credentials(
    channel: Channel,
    namespace: &str,
    stream_id: &str,
    credentials: (String, String),
) -> Result<tokio::task::JoinHandle<()>> {
    let (tx, mut responses) = open_stream(channel, namespace, stream_id, "credentials").await?;
    Ok(tokio::spawn(async move {
        while let Ok(Some(any)) = responses.message().await {
            if AuthRequest::decode(any.value.as_slice()).is_err() {
                continue;
            }
            let answer = AuthResponse {
                auth_type: AuthType::Credentials as i32,
                username: credentials.0.clone(),
                secret: credentials.1.clone(),
                ..Default::default()
            };
            if tx.send(to_any(&answer)).await.is_err() {
                break;
            }
        }
    }))
}

/// Opens a Streaming-service stream `stream_id` for containerd to send to; the messages as
/// they come, until it closes.
async fn open_stream(
    channel: Channel,
    namespace: &str,
    stream_id: &str,
    what: &str,
) -> Result<(
    tokio::sync::mpsc::Sender<prost_types::Any>,
    tonic::Streaming<prost_types::Any>,
)> {
    let (tx, rx) = tokio::sync::mpsc::channel::<prost_types::Any>(4);
    tx.send(to_any(&StreamInit {
        id: stream_id.to_string(),
    }))
    .await
    .ok();
    let mut req = Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    if let Ok(v) = namespace.parse() {
        req.metadata_mut().insert("containerd-namespace", v);
    }
    let mut responses = StreamingClient::new(channel)
        .stream(req)
        .await
        .map_err(|s| anyhow::anyhow!("open a {what} stream to containerd: {}", s.message()))?
        .into_inner();
    // The first message acknowledges the stream.
    responses
        .message()
        .await
        .map_err(|s| anyhow::anyhow!("{what} stream: {}", s.message()))?;
    Ok((tx, responses))
}

/// Reports containerd's progress of a transfer, layer by layer, until the stream closes: a
/// line when a layer's state changes (waiting, downloading, complete, …), its bytes in JSON.
async fn report_progress(
    channel: Channel,
    namespace: &str,
    stream_id: &str,
) -> Result<tokio::task::JoinHandle<()>> {
    let (tx, mut responses) = open_stream(channel, namespace, stream_id, "progress").await?;
    Ok(tokio::spawn(async move {
        // The sender must live as long as the stream.
        let _tx = tx;
        let mut states: HashMap<String, String> = HashMap::new();
        while let Ok(Some(any)) = responses.message().await {
            let Ok(p) = containerd_client::types::transfer::Progress::decode(any.value.as_slice())
            else {
                continue;
            };
            let changed = states.get(&p.name) != Some(&p.event);
            if changed || crate::progress::is_json() {
                states.insert(p.name.clone(), p.event.clone());
                crate::progress::part(
                    "layer",
                    &p.name,
                    &p.event,
                    p.progress.max(0) as u64,
                    p.total.max(0) as u64,
                );
            }
        }
    }))
}

/// Pushes (`push`) or pulls image `reference` through containerd's Transfer service.
pub async fn transfer(
    address: &str,
    namespace: &str,
    reference: &str,
    access: &RegistryAccess,
    push: bool,
) -> Result<()> {
    let channel = crate::cri::channel(Path::new(address)).await?;
    let host = registry_host(reference);
    let mut resolver = RegistryResolver {
        default_scheme: if access.plain_http { "http" } else { "https" }.to_string(),
        ..Default::default()
    };
    let mut auth_task = None;
    if let Some(creds) = access.credentials(host)? {
        let id = format!("stasis-auth-{}", crate::files::random_suffix()?);
        auth_task = Some(serve_credentials(channel.clone(), namespace, &id, creds).await?);
        resolver.auth_stream = id;
    }
    let registry = to_any(&OciRegistry {
        reference: reference.to_string(),
        resolver: Some(resolver),
    });
    let store = to_any(&ImageStore {
        name: reference.to_string(),
        ..Default::default()
    });
    let (source, destination) = if push {
        (store, registry)
    } else {
        (registry, store)
    };
    let progress_id = format!("stasis-progress-{}", crate::files::random_suffix()?);
    let progress = report_progress(channel.clone(), namespace, &progress_id).await?;
    let mut req = Request::new(TransferRequest {
        source: Some(source),
        destination: Some(destination),
        options: Some(TransferOptions {
            progress_stream: progress_id,
        }),
    });
    if let Ok(v) = namespace.parse() {
        req.metadata_mut().insert("containerd-namespace", v);
    }
    let result = TransferClient::new(channel).transfer(req).await;
    if let Some(t) = auth_task {
        t.abort();
    }
    // containerd closes the progress stream when the transfer ends; its last lines come
    // before the result.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), progress).await;
    result.map_err(|s| {
        anyhow::anyhow!(
            "{} {reference}: {}",
            if push { "push" } else { "pull" },
            s.message()
        )
    })?;
    Ok(())
}
