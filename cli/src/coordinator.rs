//! `tessera coordinator`: serves the Coordinator gRPC service and the gRPC health service.
//! Submitted jobs are checked here (the store opens, the configuration parses) before they
//! queue. `tessera train --workers N` serves the same in-process.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use tessera_coordinator::{Config, Coordinator, Service, Snapshot, ValidJob};
use tessera_data::Store;
use tessera_proto::v1 as pb;
use tessera_serve::access::Tokens;
use tessera_worker::node::TOKEN_ENV;

#[derive(clap::Args, Debug)]
pub struct CoordinatorArgs {
    /// Address to serve on. Loopback by default: serve on a wider address with a token
    /// (TESSERA_COORDINATOR_TOKEN), TLS (--tls-cert/--tls-key) and a network policy that keeps
    /// strangers out (deploy/k8s has one).
    #[arg(long, default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    /// How often workers heartbeat.
    #[arg(long, default_value_t = 1_000)]
    heartbeat_ms: u64,
    /// A worker silent for this long is removed from its job.
    #[arg(long, default_value_t = 10_000)]
    heartbeat_timeout_ms: u64,
    /// After losing a worker, how long a job waits for a replacement before continuing with
    /// the survivors.
    #[arg(long, default_value_t = 30_000)]
    regroup_grace_ms: u64,
    /// Where the coordinator keeps its jobs (spec, outcome, last checkpoint) so that a restart
    /// resumes them: a directory or an object-store URL (s3://, gs://, az://).
    #[arg(long, default_value = "tessera-coordinator-state")]
    state: String,
    /// Serve Prometheus metrics (GET /metrics) and a health check (GET /healthz) over plain
    /// HTTP here.
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// Serve TLS with this certificate chain (PEM). Workers and submitters then use an
    /// https:// URL and trust its CA (a PEM file in TESSERA_COORDINATOR_CA, else the system's
    /// roots).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The TLS certificate's private key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

/// Who may call the coordinator: bearer tokens (none: everyone), over TLS when configured.
pub struct Access {
    pub tokens: Tokens,
    pub tls: Option<tonic::transport::ServerTlsConfig>,
}

/// The key of the persisted state under `--state`.
const STATE_KEY: &str = "coordinator.json";

/// The checks of a submitted job, with the error a user sees.
fn check(spec: &pb::JobSpec) -> Result<ValidJob, String> {
    if !spec.device.is_empty() {
        spec.device
            .parse::<tessera_worker::device::Device>()
            .map_err(|e| format!("JobSpec.device: {e}"))?;
    }
    if !spec.network_toml.is_empty() {
        // One pass over the cells, each rank counting its rows.
        let cells = tessera_worker::network::check_network_job(&spec.data_url, &spec.network_toml)?;
        return Ok(ValidJob {
            train_cells: cells,
            epochs: 1,
        });
    }
    let (train_cells, epochs) =
        tessera_worker::check_job(&spec.data_url, &spec.config_toml).map_err(|e| e.to_string())?;
    Ok(ValidJob {
        train_cells,
        epochs,
    })
}

/// Serves the coordinator and health services on `listener` until `shutdown` completes, from
/// `state` (a persisted snapshot: jobs resume) or empty; `persist` keeps the state there.
pub async fn serve(
    listener: tokio::net::TcpListener,
    config: Config,
    state: Option<Snapshot>,
    persist: Option<Store>,
    metrics: Option<SocketAddr>,
    access: Access,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let Access { tokens, tls } = access;
    let bound = listener.local_addr().context("reading the bound address")?;
    // Without a saved state, worker ids start from the clock: workers of an earlier coordinator
    // on this address (a restarted rank 0's) must not find their old ids handed to others.
    let snapshot = state.unwrap_or_else(|| Snapshot {
        next_worker: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        jobs: Vec::new(),
    });
    let service = Service::restored(Coordinator::restore(config, 0, snapshot), Arc::new(check));
    if let Some(at) = metrics {
        let observed = service.clone();
        crate::metrics::spawn(
            at,
            Arc::new(move || crate::metrics::coordinator_render(&observed.snapshot())),
        )
        .await?;
    }
    let _ticker = service.spawn_ticker();
    let _persister = persist.map(|store| tokio::spawn(persist_changes(service.clone(), store)));
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<tessera_proto::v1::coordinator_server::CoordinatorServer<Service>>()
        .await;
    tracing::info!(listen = %bound, tls = tls.is_some(), "coordinator serving");
    // Workers long-poll Join and users watch jobs: open calls get DRAIN after the signal.
    let (shutdown, deadline) = tessera_serve::drain_deadline(shutdown, tessera_serve::DRAIN);
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls).context("configuring TLS")?;
    }
    let serving = builder
        .add_service(health_service)
        // The token is checked before a request's body is read.
        .add_service(tonic::service::interceptor::InterceptedService::new(
            service.server(),
            move |request| tokens.check(request),
        ))
        // Without TCP_NODELAY small answers wait for the peer's delayed ACK (~40 ms each).
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        );
    tokio::select! {
        served = serving => served.with_context(|| format!("serving on {bound}")),
        () = deadline => Ok(()),
    }
}

/// Writes the snapshot after every change that alters it (the latest one wins; writes are
/// never concurrent). A failed write is logged and retried at the next change.
async fn persist_changes(service: Service, store: Store) {
    let mut changes = service.changes();
    let mut saved = None;
    while changes.changed().await.is_ok() {
        let snapshot = service.snapshot();
        if saved.as_ref() == Some(&snapshot) {
            continue;
        }
        let bytes = match serde_json::to_vec_pretty(&snapshot) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!("serialising the coordinator state: {e}");
                continue;
            }
        };
        let target = store.clone();
        // The data layer is synchronous (it drives object_store on its own runtime).
        match tokio::task::spawn_blocking(move || target.set_bytes(STATE_KEY, bytes)).await {
            Ok(Ok(())) => saved = Some(snapshot),
            Ok(Err(e)) => tracing::error!("saving the coordinator state: {e}"),
            Err(e) => tracing::error!("saving the coordinator state: {e}"),
        }
    }
}

/// The persisted snapshot under `location`, if any; a corrupt one is an error naming it.
fn load_state(location: &str) -> Result<(Store, Option<Snapshot>)> {
    let store = Store::connect(location)
        .with_context(|| format!("opening the coordinator state at {location}"))?;
    let Some(bytes) = store
        .get_bytes(STATE_KEY)
        .with_context(|| format!("reading {location}/{STATE_KEY}"))?
    else {
        return Ok((store, None));
    };
    let snapshot = serde_json::from_slice(&bytes)
        .with_context(|| format!("{location}/{STATE_KEY}: not a coordinator state"))?;
    Ok((store, Some(snapshot)))
}

/// The bearer tokens the coordinator accepts: the one of [`TOKEN_ENV`] (what workers, `submit`
/// and `cancel` present), or every caller when it is not set; and whether it is set.
pub fn tokens() -> (Tokens, bool) {
    match std::env::var(TOKEN_ENV) {
        Ok(token) if !token.trim().is_empty() => (Tokens::parse(token.trim()), true),
        _ => (Tokens::none(), false),
    }
}

pub fn run(args: CoordinatorArgs) -> Result<()> {
    let (store, state) = load_state(&args.state)?;
    if let Some(s) = &state {
        let open = s.jobs.iter().filter(|j| !j.state.ended()).count();
        tracing::info!(
            state = args.state,
            jobs = s.jobs.len(),
            resuming = open,
            "restored"
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let config = Config {
            heartbeat_interval_ms: args.heartbeat_ms,
            heartbeat_timeout_ms: args.heartbeat_timeout_ms,
            regroup_grace_ms: args.regroup_grace_ms,
        };
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("binding {}", args.listen))?;
        let bound = listener.local_addr().context("reading the bound address")?;
        let tls = match args.tls_cert.zip(args.tls_key) {
            Some((cert, key)) => Some(tessera_serve::tls_config(&cert, &key)?),
            None => None,
        };
        let (tokens, authenticated) = tokens();
        if !authenticated && !bound.ip().is_loopback() {
            tracing::warn!(
                listen = %bound,
                "the coordinator accepts every caller ({TOKEN_ENV} is not set): anyone who \
                 reaches this address can submit or cancel jobs; set it, and keep the \
                 coordinator behind a network policy (deploy/k8s/base/network-policy.yaml)"
            );
        }
        // On stdout, so a launcher that asked for port 0 learns the port.
        say!("coordinator listening on {bound}");
        serve(
            listener,
            config,
            state,
            Some(store),
            args.metrics_listen,
            Access { tokens, tls },
            crate::signals::terminated(),
        )
        .await
    })
}
