//! tessera-serve: reference-atlas query mapping as a gRPC service (`tessera serve`).
//!
//! - [`registry`]: trained models copied into a store under names, the recently used kept
//!   loaded;
//! - [`jobs`]: mapping jobs admitted within a job count and memory budget, watched, cancelled;
//! - [`access`]: bearer tokens and the storage prefixes requests may name;
//! - [`service`]: the `Atlas` gRPC service over them;
//! - [`observe`]: what it counts (exposed through `tessera_telemetry`, as every role's metrics).
//!
//! Invariant: this crate checks and schedules; the mapping itself (surgery, fine-tuning, label
//! transfer) is `tessera_worker::query`'s, the same code `tessera map` runs.

pub mod access;
pub mod jobs;
pub mod observe;
pub mod registry;
pub mod service;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tessera_proto::v1::atlas_server::AtlasServer;
use tonic::Status;
use tonic::transport::{Identity, Server, ServerTlsConfig};

pub use access::{AllowList, Tokens};
pub use jobs::{JobLimits, Jobs};
pub use registry::Registry;
pub use service::AtlasService;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Exists(String),
    #[error("{0}")]
    Exhausted(String),
    #[error("{0}")]
    Precondition(String),
    #[error("storage: {0}")]
    Storage(String),
    #[error("serving: {0}")]
    Transport(#[from] tonic::transport::Error),
}

impl From<ServeError> for Status {
    fn from(e: ServeError) -> Status {
        let message = e.to_string();
        match e {
            ServeError::Invalid(_) => Status::invalid_argument(message),
            ServeError::NotFound(_) => Status::not_found(message),
            ServeError::Exists(_) => Status::already_exists(message),
            ServeError::Exhausted(_) => Status::resource_exhausted(message),
            ServeError::Precondition(_) => Status::failed_precondition(message),
            ServeError::Config(_) | ServeError::Storage(_) | ServeError::Transport(_) => {
                Status::internal(message)
            }
        }
    }
}

/// Everything `tessera serve` is started with.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// The registry's store: a directory or an object-store URL.
    pub registry: String,
    /// Models registered (or replaced) at start: (name, folder); the operator's choice, not
    /// subject to the allow-list.
    pub register: Vec<(String, String)>,
    /// Models kept loaded.
    pub cached_models: usize,
    /// Uploads are written here (created when missing).
    pub scratch: PathBuf,
    pub allow_prefixes: Vec<String>,
    pub tokens: Tokens,
    /// PEM certificate chain and private key; both or neither.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// The largest request message (an Encode's counts, an upload chunk).
    pub max_request_bytes: usize,
    pub max_upload_bytes: u64,
    /// An upload no job has claimed is removed this long after it was made.
    pub upload_ttl: Duration,
    pub jobs: JobLimits,
    pub default_epochs: usize,
    /// Where models encode and mapping jobs fine-tune.
    pub device: tessera_worker::device::Device,
}

/// The service for `config` (registry opened and its start-up models registered, scratch
/// created, prefixes checked). Blocking: call it outside async code.
pub fn service(config: &ServeConfig) -> Result<AtlasService, ServeError> {
    // The cheap checks first: a bad prefix must not leave models copied into the registry.
    std::fs::create_dir_all(&config.scratch)
        .map_err(|e| ServeError::Config(format!("scratch {}: {e}", config.scratch.display())))?;
    let scratch = config
        .scratch
        .canonicalize()
        .map_err(|e| ServeError::Config(format!("scratch {}: {e}", config.scratch.display())))?;
    let allow = AllowList::new(&config.allow_prefixes)?.with_local(&scratch)?;
    let registry =
        Arc::new(Registry::open(&config.registry, config.cached_models)?.on(config.device));
    for (name, folder) in &config.register {
        registry
            .register(name, folder, true)
            .map_err(|e| ServeError::Config(format!("--register {name}={folder}: {e}")))?;
    }
    Ok(AtlasService::new(
        registry,
        Jobs::new(config.jobs.clone()),
        allow,
        scratch,
        config.max_upload_bytes,
        config.default_epochs,
    ))
}

/// Serves `atlas` (from [`service`]) and the gRPC health service on `listener` until
/// `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    atlas: AtlasService,
    config: &ServeConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let bound = listener
        .local_addr()
        .map_err(|e| ServeError::Config(e.to_string()))?;
    let calls = atlas.telemetry().calls;
    let tokens = config.tokens.clone();
    // The token is checked before the body is read; the size limits apply to the body.
    let server = tonic::service::interceptor::InterceptedService::new(
        AtlasServer::new(atlas)
            .max_decoding_message_size(config.max_request_bytes)
            .max_encoding_message_size(config.max_request_bytes),
        move |request| tokens.check(request),
    );
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<AtlasServer<AtlasService>>().await;
    let mut builder = Server::builder().layer(observe::Observe(calls));
    if let Some((cert, key)) = &config.tls {
        builder = builder.tls_config(tls_config(cert, key)?)?;
    }
    tracing::info!(listen = %bound, tls = config.tls.is_some(), registry = %config.registry, "atlas serving");
    let sweeper = tokio::spawn(service::expire_uploads_every(
        config.scratch.clone(),
        config.upload_ttl,
    ));
    let (shutdown, deadline) = drain_deadline(shutdown, DRAIN);
    let serving = builder
        .add_service(health_service)
        .add_service(server)
        // Without TCP_NODELAY small answers wait for the client's delayed ACK (~40 ms each).
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        );
    let served = tokio::select! {
        served = serving => served,
        () = deadline => Ok(()),
    };
    sweeper.abort();
    Ok(served?)
}

/// How long a server that was told to shut down waits for the calls still open.
pub const DRAIN: Duration = Duration::from_secs(10);

/// `shutdown` passed on to a server, and a future that completes `drain` after it: a server
/// stops accepting at the first and finishes open calls, but a watch stream or a long poll
/// would hold it (and the pod) open for good; at the second it is dropped with them.
pub fn drain_deadline(
    shutdown: impl Future<Output = ()>,
    drain: Duration,
) -> (impl Future<Output = ()>, impl Future<Output = ()>) {
    let (fired, mut seen) = tokio::sync::watch::channel(false);
    let signal = async move {
        shutdown.await;
        let _ = fired.send(true);
    };
    let deadline = async move {
        if seen.wait_for(|&f| f).await.is_ok() {
            tokio::time::sleep(drain).await;
            tracing::warn!("calls still open {drain:?} after the shutdown signal: closing them");
        } else {
            // The server ended by itself: nothing to cut.
            std::future::pending::<()>().await;
        }
    };
    (signal, deadline)
}

/// A server's TLS from a PEM certificate chain and key (the atlas service's and the
/// coordinator's). rustls is built with two crypto providers in this binary (object_store
/// brings aws-lc), so the process default is set to ring first.
pub fn tls_config(cert: &Path, key: &Path) -> Result<ServerTlsConfig, ServeError> {
    // Already installed (a second server in this process) is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let read = |p: &Path| {
        std::fs::read(p).map_err(|e| ServeError::Config(format!("TLS {}: {e}", p.display())))
    };
    Ok(ServerTlsConfig::new().identity(Identity::from_pem(read(cert)?, read(key)?)))
}
