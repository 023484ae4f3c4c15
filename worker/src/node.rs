//! A worker process under a coordinator: registers, heartbeats in the background, waits in
//! `Join` for a place in a job's group, trains its parts there (`fit::train` with a ring to the
//! group's other ranks), reports each epoch, and goes back to waiting when the job ends or its
//! group is re-formed (a member was lost: the survivors resume from the last checkpoint).
//! Asked to stop (`NodeConfig::stop`, set on SIGTERM), it trains to the end of the step, which
//! rank 0 checkpoints for the whole group, then leaves the coordinator and returns.
//!
//! Training runs on the calling thread; the gRPC client and the heartbeat run on a small async
//! runtime beside it, so a long epoch never delays a heartbeat.

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tessera_proto::v1 as pb;
use tessera_proto::v1::coordinator_client::CoordinatorClient;
use tokio::runtime::Runtime;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

use crate::collective::TrainBackend;
use crate::device::Device;
use crate::fit::{FitConfig, FitOptions, Progress, train};
use crate::network::{NetworkJobError, NetworkRequest, network_rank};
use crate::parallel::{EpochEnd, EpochHooks, Placement};
use crate::records::FitError;
use crate::ring::{Ring, RingError};

#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// The coordinator's URL, e.g. `http://127.0.0.1:50051`.
    pub coordinator: String,
    /// Where this worker accepts its ring neighbour (port 0: any free port).
    pub ring_listen: SocketAddr,
    /// The host other workers reach this one at (default: the listen address's IP).
    pub advertise_host: Option<String>,
    pub cache_bytes: u64,
    /// Bounds connecting to the coordinator at start and every ring read and write.
    pub timeout: Duration,
    /// Where this worker trains a job that names no device (`JobSpec.device` empty), and which
    /// GPU it uses for one that asks for "cuda".
    pub device: Device,
    /// Leave after this many jobs (None: serve until killed).
    pub max_jobs: Option<usize>,
    /// Set when the process is asked to stop (SIGTERM): the job checkpoints after the current
    /// step, this worker tells the coordinator it is leaving, and `run` returns
    /// `Ended::Stopped`.
    pub stop: Arc<AtomicBool>,
    /// Told of every step and epoch this worker trains (a metrics endpoint).
    pub progress: Option<ProgressSink>,
}

/// Somewhere to send training progress from the training thread.
#[derive(Clone)]
pub struct ProgressSink(pub Arc<dyn Fn(&Progress<'_>) + Send + Sync>);

impl std::fmt::Debug for ProgressSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProgressSink")
    }
}

/// Why `run` returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// `max_jobs` jobs ended.
    Served,
    /// Asked to stop; the checkpoint of the step training stopped after, if it was training.
    Stopped { checkpoint: Option<String> },
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("coordinator {url}: {reason}")]
    Coordinator { url: String, reason: String },
    #[error("ring listener {addr}: {reason}")]
    Listen { addr: String, reason: String },
    #[error("starting the async runtime: {0}")]
    Runtime(std::io::Error),
}

/// What the heartbeat task and the trainer share.
#[derive(Debug, Default)]
struct Shared {
    worker_id: Mutex<String>,
    /// The generation this worker trains in (0: none).
    generation: AtomicU64,
    /// The coordinator said to stop training (group re-formed, job ended).
    interrupted: AtomicBool,
    /// The coordinator does not know this worker any more: register again.
    unknown: AtomicBool,
}

impl Shared {
    fn worker_id(&self) -> String {
        self.worker_id
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// Serves jobs until `max_jobs` have ended (or forever), or until asked to stop.
pub fn run(config: &NodeConfig) -> Result<Ended, NodeError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(NodeError::Runtime)?;
    let listener = TcpListener::bind(config.ring_listen).map_err(|e| NodeError::Listen {
        addr: config.ring_listen.to_string(),
        reason: e.to_string(),
    })?;
    let bound = listener.local_addr().map_err(|e| NodeError::Listen {
        addr: config.ring_listen.to_string(),
        reason: e.to_string(),
    })?;
    let host = config
        .advertise_host
        .clone()
        .unwrap_or_else(|| bound.ip().to_string());
    let ring_address = format!("{host}:{}", bound.port());
    let url = config.coordinator.clone();
    let coordinator_error = |reason: String| NodeError::Coordinator {
        url: url.clone(),
        reason,
    };
    let mut client = runtime
        .block_on(connect(&url, config.timeout))
        .map_err(coordinator_error)?;
    let shared = Arc::new(Shared::default());
    let (interval, heartbeat_timeout) =
        register(&runtime, &mut client, &shared, &ring_address).map_err(coordinator_error)?;
    let _heartbeat = runtime.spawn(heartbeat(client.clone(), Arc::clone(&shared), interval));
    let mut jobs = 0;
    // A coordinator gone for longer than the timeout (its launcher exited) ends the worker.
    let mut reached = Instant::now();
    while config.max_jobs.is_none_or(|m| jobs < m) {
        if config.stop.load(Ordering::SeqCst) {
            leave(&runtime, &client, &shared);
            return Ok(Ended::Stopped { checkpoint: None });
        }
        if shared.unknown.swap(false, Ordering::SeqCst) {
            register(&runtime, &mut client, &shared, &ring_address).map_err(coordinator_error)?;
        }
        let request = pb::JoinRequest {
            worker_id: shared.worker_id(),
            wait_ms: 30_000,
        };
        let joined = runtime.block_on(async {
            tokio::select! {
                joined = client.join(request) => Some(joined),
                () = stop_requested(&config.stop) => None,
            }
        });
        let Some(joined) = joined else { continue };
        let assignment = match joined {
            Ok(a) => {
                reached = Instant::now();
                a.into_inner()
            }
            Err(status) if reached.elapsed() > config.timeout => {
                return Err(coordinator_error(format!(
                    "unreachable for {:?}: {}",
                    reached.elapsed(),
                    status.message()
                )));
            }
            Err(status) => {
                tracing::warn!(code = ?status.code(), "join: {}", status.message());
                if status.code() == tonic::Code::NotFound {
                    shared.unknown.store(true, Ordering::SeqCst);
                }
                std::thread::sleep(interval);
                continue;
            }
        };
        if !assignment.assigned {
            continue;
        }
        match run_assignment(&runtime, &client, &shared, &listener, &assignment, config) {
            Ok(()) => jobs += 1,
            Err(FitError::Interrupted { epoch, step }) => tracing::info!(
                job = assignment.job_id,
                epoch,
                step,
                "group re-formed: rejoining"
            ),
            Err(FitError::Stopped {
                epoch,
                step,
                checkpoint,
                here: true,
            }) => {
                tracing::info!(
                    job = assignment.job_id,
                    epoch,
                    step,
                    checkpoint,
                    "stopped on request: leaving"
                );
                leave(&runtime, &client, &shared);
                return Ok(Ended::Stopped {
                    checkpoint: Some(checkpoint),
                });
            }
            // Another rank was asked to stop (and leaves), or a peer died or hung: wait until
            // the coordinator says the group is gone, then join the re-formed one (joining at
            // once would rejoin the broken one).
            Err(e @ (FitError::Stopped { .. } | FitError::Ring(_))) => {
                tracing::warn!(job = assignment.job_id, "{e}");
                let deadline = Instant::now() + 2 * heartbeat_timeout;
                while !shared.interrupted.load(Ordering::SeqCst) && Instant::now() < deadline {
                    std::thread::sleep(interval / 4);
                }
            }
            Err(e) => {
                // The job's own fault (data, configuration, non-finite loss): the job fails.
                tracing::error!(job = assignment.job_id, "training failed: {e}");
                let report = pb::ProgressReport {
                    worker_id: shared.worker_id(),
                    job_id: assignment.job_id.clone(),
                    generation: assignment.generation,
                    error: e.to_string(),
                    ..pb::ProgressReport::default()
                };
                if let Err(status) = runtime.block_on(client.clone().report_progress(report)) {
                    tracing::warn!("reporting the failure: {}", status.message());
                }
                jobs += 1;
            }
        }
        shared.generation.store(0, Ordering::SeqCst);
    }
    Ok(Ended::Served)
}

/// Resolves once `stop` is set.
async fn stop_requested(stop: &AtomicBool) {
    while !stop.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Tells the coordinator this worker is going, so its job regroups now rather than after the
/// heartbeat timeout. Best effort: a coordinator that does not answer learns it from silence.
fn leave(runtime: &Runtime, client: &Client, shared: &Shared) {
    let request = pb::LeaveRequest {
        worker_id: shared.worker_id(),
    };
    let mut client = client.clone();
    match runtime
        .block_on(async { tokio::time::timeout(LEAVE_TIMEOUT, client.leave(request)).await })
    {
        Ok(Ok(_)) => tracing::info!(worker = shared.worker_id(), "left the coordinator"),
        Ok(Err(status)) => tracing::warn!("leaving: {}", status.message()),
        Err(_) => tracing::warn!("leaving: no answer within {LEAVE_TIMEOUT:?}"),
    }
}

const LEAVE_TIMEOUT: Duration = Duration::from_secs(5);

/// The environment variable holding the bearer token workers, `tessera submit` and `cancel`
/// present to the coordinator, and the coordinator accepts (one shared secret: on Kubernetes,
/// a Secret in every pod's environment).
pub const TOKEN_ENV: &str = "TESSERA_COORDINATOR_TOKEN";

/// Adds `authorization: Bearer <token>` to every call when [`TOKEN_ENV`] is set.
#[derive(Clone)]
pub struct Bearer(Option<tonic::metadata::AsciiMetadataValue>);

impl Bearer {
    pub fn from_env() -> Result<Bearer, String> {
        match std::env::var(TOKEN_ENV) {
            Ok(token) if !token.trim().is_empty() => format!("Bearer {}", token.trim())
                .parse()
                .map(|v| Bearer(Some(v)))
                .map_err(|_| format!("{TOKEN_ENV}: not a valid header value (printable ASCII)")),
            _ => Ok(Bearer(None)),
        }
    }
}

impl std::fmt::Debug for Bearer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token itself.
        write!(
            f,
            "Bearer({})",
            if self.0.is_some() { "set" } else { "none" }
        )
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// A coordinator client that presents the token of [`TOKEN_ENV`], if any.
pub type Client =
    CoordinatorClient<tonic::service::interceptor::InterceptedService<Channel, Bearer>>;

/// A PEM file of the certificate authority that signed an `https://` coordinator's
/// certificate (default: the system's roots).
pub const CA_ENV: &str = "TESSERA_COORDINATOR_CA";

/// Connects to the coordinator at `url` once (TLS for an `https://` URL).
pub async fn connect_client(url: &str) -> Result<Client, String> {
    let bearer = Bearer::from_env()?;
    let mut endpoint = Channel::from_shared(url.to_string()).map_err(|e| format!("{url}: {e}"))?;
    if url.starts_with("https://") {
        endpoint = endpoint
            .tls_config(client_tls()?)
            .map_err(|e| format!("{url}: {e}"))?;
    }
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| format!("{url}: {}", with_causes(&e)))?;
    Ok(CoordinatorClient::with_interceptor(channel, bearer))
}

/// An error with its causes: tonic's own text is only "transport error", the reason (refused,
/// an untrusted certificate...) is in its sources.
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let next = c.to_string();
        // Wrappers often repeat their source's text.
        if !text.ends_with(&next) {
            text = format!("{text}: {next}");
        }
        cause = c.source();
    }
    text
}

/// The client's TLS: the CA of [`CA_ENV`], else the system's roots.
fn client_tls() -> Result<ClientTlsConfig, String> {
    // This binary's rustls has two crypto providers (object_store brings aws-lc): pick ring,
    // as the servers do. Already installed is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
    match std::env::var_os(CA_ENV) {
        Some(path) => {
            let pem = std::fs::read(&path)
                .map_err(|e| format!("{CA_ENV}={}: {e}", path.to_string_lossy()))?;
            Ok(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)))
        }
        None => Ok(ClientTlsConfig::new().with_native_roots()),
    }
}

/// Connects, retrying while the coordinator starts.
async fn connect(url: &str, timeout: Duration) -> Result<Client, String> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match connect_client(url).await {
            Ok(c) => return Ok(c),
            Err(e) if tokio::time::Instant::now() >= deadline => {
                return Err(format!("not reachable within {timeout:?}: {e}"));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Registers; returns the heartbeat interval and timeout.
fn register(
    runtime: &Runtime,
    client: &mut Client,
    shared: &Shared,
    ring_address: &str,
) -> Result<(Duration, Duration), String> {
    let hostname = std::env::var("HOSTNAME").unwrap_or_default();
    let reply = runtime
        .block_on(client.register(pb::RegisterRequest {
            ring_address: ring_address.into(),
            device: "cpu".into(),
            hostname,
        }))
        .map_err(|s| format!("register: {}", s.message()))?
        .into_inner();
    tracing::info!(worker = reply.worker_id, ring = ring_address, "registered");
    *shared
        .worker_id
        .lock()
        .unwrap_or_else(PoisonError::into_inner) = reply.worker_id;
    Ok((
        Duration::from_millis(reply.heartbeat_interval_ms.max(10)),
        Duration::from_millis(reply.heartbeat_timeout_ms),
    ))
}

async fn heartbeat(mut client: Client, shared: Arc<Shared>, interval: Duration) {
    use pb::heartbeat_reply::Directive;
    let mut every = tokio::time::interval(interval);
    loop {
        every.tick().await;
        let generation = shared.generation.load(Ordering::SeqCst);
        let request = pb::HeartbeatRequest {
            worker_id: shared.worker_id(),
            generation,
        };
        match client
            .heartbeat(request)
            .await
            .map(|r| Directive::try_from(r.into_inner().directive))
        {
            // Only about the generation it was asked about: a reply that crossed a new
            // assignment must not stop the new group.
            Ok(Ok(Directive::Rejoin | Directive::Stop))
                if shared.generation.load(Ordering::SeqCst) == generation =>
            {
                shared.interrupted.store(true, Ordering::SeqCst)
            }
            Ok(Ok(Directive::Register)) => {
                shared.unknown.store(true, Ordering::SeqCst);
                shared.interrupted.store(true, Ordering::SeqCst);
            }
            Ok(_) => {}
            Err(status) => tracing::warn!("heartbeat: {}", status.message()),
        }
    }
}

fn run_assignment(
    runtime: &Runtime,
    client: &Client,
    shared: &Arc<Shared>,
    listener: &TcpListener,
    a: &pb::Assignment,
    config: &NodeConfig,
) -> Result<(), FitError> {
    let spec = a.spec.clone().unwrap_or_default();
    let (rank, world) = (a.rank as usize, a.world_size as usize);
    tracing::info!(
        job = a.job_id,
        generation = a.generation,
        rank,
        world,
        resume_from = a.resume_from,
        "assigned"
    );
    shared.interrupted.store(false, Ordering::SeqCst);
    shared.generation.store(a.generation, Ordering::SeqCst);
    let ring = if world <= 1 {
        Ring::single()
    } else {
        let next = a
            .peers
            .get((rank + 1) % world)
            .ok_or_else(|| FitError::Config {
                file: "assignment.peers".into(),
                reason: format!("{} ring addresses for a world of {world}", a.peers.len()),
            })?;
        let addr = next
            .parse::<SocketAddr>()
            .or_else(|_| {
                std::net::ToSocketAddrs::to_socket_addrs(next.as_str())
                    .map_err(|e| e.to_string())
                    .and_then(|mut it| it.next().ok_or_else(|| "no address".into()))
            })
            .map_err(|reason| FitError::Config {
                file: "assignment.peers".into(),
                reason: format!("{next}: {reason}"),
            })?;
        Ring::connect(rank, world, a.generation, listener, addr, config.timeout)?
    };
    if !spec.network_toml.is_empty() {
        return run_network(runtime, client, shared, ring, a, &spec);
    }
    let fit_config = FitConfig::from_toml(&spec.config_toml, "JobSpec.config_toml")?;
    let parts = fit_config
        .train
        .parts
        .unwrap_or(spec.world_size.max(1) as usize);
    let non_empty = |s: &str| (!s.is_empty()).then(|| s.to_string());
    let opts = FitOptions {
        data: spec.data_url.clone(),
        modalities: spec.modalities.clone(),
        batch_key: non_empty(&spec.batch_key),
        label_key: non_empty(&spec.label_key),
        unlabeled_category: non_empty(&spec.unlabeled_category),
        covariates: crate::CovariateKeys {
            categorical: spec.categorical_covariate_keys.clone(),
            continuous: spec.continuous_covariate_keys.clone(),
        },
        config: fit_config,
        out: PathBuf::from(&spec.output_url),
        embedding_key: non_empty(&spec.embedding_key).unwrap_or_else(|| "X_tessera".into()),
        prediction_key: non_empty(&spec.prediction_key)
            .unwrap_or_else(|| crate::fit::PREDICTION_KEY.into()),
        overwrite: spec.overwrite,
        store_outputs: true,
        resume: false,
        denoised: None,
        cache_bytes: config.cache_bytes,
        device: job_device(&spec.device, config.device)?,
        init_from: non_empty(&spec.init_from),
        layer: non_empty(&spec.layer),
    };
    let hooks = Reporter {
        runtime: runtime.handle().clone(),
        client: client.clone(),
        shared: Arc::clone(shared),
        job_id: a.job_id.clone(),
        generation: a.generation,
        last_step_report: Instant::now(),
        stop: Arc::clone(&config.stop),
    };
    let resume_from = (!a.resume_from.is_empty()).then(|| PathBuf::from(&a.resume_from));
    let placed = Placed {
        parts,
        hooks: Box::new(hooks),
        resume_from,
    };
    let progress = |p: Progress<'_>| {
        if let Some(sink) = &config.progress {
            (sink.0)(&p);
        }
    };
    match opts.device {
        Device::Cpu => train_placed(&opts, tessera_kernels::backend::Cpu, ring, placed, progress),
        Device::Cuda(_) => train_placed(
            &opts,
            opts.device.cuda(opts.config.train.tf32)?,
            ring,
            placed,
            progress,
        ),
    }
}

/// What a job's rank is placed with, whatever its device.
struct Placed {
    parts: usize,
    hooks: Box<dyn EpochHooks + Send>,
    resume_from: Option<PathBuf>,
}

/// One rank of a training job on `device`: its collective over `ring` (NCCL between GPUs),
/// then `train`.
fn train_placed<B: TrainBackend>(
    opts: &FitOptions,
    device: B,
    ring: Ring,
    placed: Placed,
    progress: impl FnMut(Progress<'_>),
) -> Result<(), FitError> {
    let mut place = Placement {
        comm: device.collective(ring)?,
        device,
        parts: placed.parts,
        hooks: placed.hooks,
        checkpoint_per_epoch: true,
        resume_from: placed.resume_from,
    };
    train(opts, &mut place, progress).map(|_| ())
}

/// The device a job trains on here: the job's choice ("cpu", "cuda", "cuda:N"), a bare "cuda"
/// taking this worker's GPU; none: this worker's own.
fn job_device(spec: &str, own: Device) -> Result<Device, FitError> {
    if spec.trim().is_empty() {
        return Ok(own);
    }
    let asked: Device = spec.parse().map_err(|reason| FitError::Config {
        file: "JobSpec.device".into(),
        reason,
    })?;
    Ok(match (asked, own) {
        (Device::Cuda(None), Device::Cuda(Some(n))) => Device::Cuda(Some(n)),
        (asked, _) => asked,
    })
}

/// A network job (`JobSpec.network_toml`): this rank's rows of SNF; rank 0 also writes the
/// outputs and the report (`<output_url>/<method>.json`). One epoch, each rank counting its rows.
fn run_network(
    runtime: &Runtime,
    client: &Client,
    shared: &Arc<Shared>,
    mut ring: Ring,
    a: &pb::Assignment,
    spec: &pb::JobSpec,
) -> Result<(), FitError> {
    use tessera_network::NetworkError;
    let mut req: NetworkRequest =
        toml::from_str(&spec.network_toml).map_err(|e| FitError::Config {
            file: "JobSpec.network_toml".into(),
            reason: e.to_string(),
        })?;
    req.data.clone_from(&spec.data_url);
    let started = Instant::now();
    let (rows, report) = network_rank(&req, &mut ring).map_err(|e| match e {
        // A peer that died or hung: rejoin once the coordinator has re-formed the group.
        NetworkJobError::Network {
            problem: NetworkError::Exchange { rank, problem },
            ..
        } => FitError::Ring(RingError::Peer {
            rank,
            op: "exchanging row blocks with",
            peer: "its ring neighbours".into(),
            reason: problem,
        }),
        other => FitError::Input {
            store: "network job".into(),
            reason: other.to_string(),
        },
    })?;
    if let Some(report) = &report {
        let path = PathBuf::from(&spec.output_url).join(format!("{}.json", report.method.name()));
        let json = serde_json::to_vec_pretty(report).map_err(|e| FitError::Output {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        std::fs::create_dir_all(&spec.output_url)
            .and_then(|()| std::fs::write(&path, json))
            .map_err(|e| FitError::Output {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?;
    }
    let seconds = started.elapsed().as_secs_f64();
    tracing::info!(job = a.job_id, rows, seconds, "network rows done");
    let progress = pb::ProgressReport {
        worker_id: shared.worker_id(),
        job_id: a.job_id.clone(),
        generation: a.generation,
        cells: rows as u64,
        epoch_done: true,
        last: true,
        cells_per_second: rows as f64 / seconds.max(1e-9),
        compute_seconds: seconds,
        ..pb::ProgressReport::default()
    };
    runtime.block_on(client.clone().report_progress(progress)).map_err(|status| {
        tracing::warn!(code = ?status.code(), "coordinator refused the report: {}", status.message());
        FitError::Interrupted { epoch: 0, step: 0 }
    })?;
    // Rank 0 still clusters and writes: stay (heartbeating) until the job ends, or a worker
    // that leaves now would be counted lost and the job run again. The heartbeat sets
    // `interrupted` when the coordinator says Stop (ended) or Rejoin (re-formed).
    let deadline = Instant::now() + NETWORK_FINISH_WAIT;
    while !shared.interrupted.load(Ordering::SeqCst) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// How long a finished rank of a network job waits for rank 0's clustering and writing.
const NETWORK_FINISH_WAIT: Duration = Duration::from_secs(3600);

/// Tells the coordinator about epochs and checkpoints, and listens for its interruptions.
struct Reporter {
    runtime: tokio::runtime::Handle,
    client: Client,
    shared: Arc<Shared>,
    job_id: String,
    generation: u64,
    last_step_report: Instant,
    stop: Arc<AtomicBool>,
}

/// How often a worker tells the coordinator its progress inside an epoch.
const STEP_REPORT_EVERY: Duration = Duration::from_secs(1);

impl Reporter {
    /// A refused report (stale generation: the group was re-formed) interrupts training.
    fn refused(&self, status: &tonic::Status, epoch: usize, step: u64) -> FitError {
        tracing::warn!(code = ?status.code(), "coordinator refused a report: {}", status.message());
        FitError::Interrupted { epoch, step }
    }
}

fn terms(t: &tessera_models::LossTerms) -> pb::LossTerms {
    pb::LossTerms {
        loss: t.loss,
        reconstruction: t.reconstruction,
        kl: t.kl,
        regularization: t.regularization,
        supervised: t.supervised,
    }
}

impl EpochHooks for Reporter {
    fn interrupted(&self) -> bool {
        self.shared.interrupted.load(Ordering::SeqCst)
    }

    fn stop_requested(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    fn step_done(&mut self, epoch: usize, step: u64, cells: u64) {
        if self.last_step_report.elapsed() < STEP_REPORT_EVERY {
            return;
        }
        self.last_step_report = Instant::now();
        let report = pb::ProgressReport {
            worker_id: self.shared.worker_id(),
            job_id: self.job_id.clone(),
            generation: self.generation,
            epoch: epoch as u32,
            step,
            cells,
            ..pb::ProgressReport::default()
        };
        let mut client = self.client.clone();
        // Not awaited: live status only, training does not wait for it.
        self.runtime.spawn(async move {
            if let Err(status) = client.report_progress(report).await {
                tracing::debug!("step report: {}", status.message());
            }
        });
    }

    fn epoch_done(&mut self, end: &EpochEnd<'_>) -> Result<(), FitError> {
        self.last_step_report = Instant::now();
        let r = end.record;
        let report = pb::ProgressReport {
            worker_id: self.shared.worker_id(),
            job_id: self.job_id.clone(),
            generation: self.generation,
            epoch: end.epoch as u32,
            step: end.step,
            cells: end.cells,
            epoch_done: true,
            train: Some(terms(&r.train)),
            validation: r.validation.as_ref().map(terms),
            cells_per_second: r.cells_per_second,
            compute_seconds: end.times.compute,
            allreduce_seconds: end.times.allreduce,
            data_seconds: end.times.data,
            last: end.last,
            error: String::new(),
        };
        tracing::info!(
            epoch = end.epoch,
            cells = end.cells,
            compute_s = end.times.compute,
            allreduce_s = end.times.allreduce,
            data_s = end.times.data,
            loss = r.train.loss,
            "epoch done"
        );
        let mut client = self.client.clone();
        self.runtime
            .block_on(client.report_progress(report))
            .map(|_| ())
            .map_err(|s| self.refused(&s, end.epoch, end.step))
    }

    fn checkpoint_saved(
        &mut self,
        epochs_done: usize,
        step: u64,
        location: &std::path::Path,
    ) -> Result<(), FitError> {
        let announcement = pb::CheckpointAnnouncement {
            worker_id: self.shared.worker_id(),
            job_id: self.job_id.clone(),
            generation: self.generation,
            epochs_done: epochs_done as u32,
            step,
            location: location.display().to_string(),
        };
        let mut client = self.client.clone();
        self.runtime
            .block_on(client.announce_checkpoint(announcement))
            .map(|_| ())
            .map_err(|s| self.refused(&s, epochs_done, step))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_trains_where_it_asks_a_bare_cuda_taking_this_workers_gpu() {
        let gpu2 = Device::Cuda(Some(2));
        assert_eq!(job_device("", gpu2).unwrap(), gpu2);
        assert_eq!(job_device("", Device::Cpu).unwrap(), Device::Cpu);
        assert_eq!(job_device("cuda", gpu2).unwrap(), gpu2);
        assert_eq!(job_device("cuda", Device::Cpu).unwrap(), Device::Cuda(None));
        assert_eq!(job_device("cpu", gpu2).unwrap(), Device::Cpu);
        assert_eq!(job_device("cuda:0", gpu2).unwrap(), Device::Cuda(Some(0)));
        let e = job_device("tpu", Device::Cpu).unwrap_err().to_string();
        assert!(e.contains("JobSpec.device") && e.contains("tpu"), "{e}");
    }
}
