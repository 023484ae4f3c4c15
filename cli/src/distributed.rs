//! `tessera train --workers N`: a coordinator in this process and N `tessera worker` processes
//! on loopback, so the distributed path is what a laptop runs too. The job is submitted like
//! any other; the workers exit when it ends and are killed if this process leaves first.
//!
//! Under a launcher that sets `WORLD_SIZE`/`RANK`/`MASTER_ADDR`/`MASTER_PORT` (torchrun, a
//! Kubeflow PyTorchJob, or `PET_*` of Kubeflow Trainer), every pod runs the same
//! `tessera train ...`: rank 0 serves the coordinator on MASTER_PORT, submits the job and trains
//! as one of its workers; the other ranks are workers of MASTER_ADDR:MASTER_PORT.

#[cfg(unix)]
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use tessera_coordinator::Config;
use tessera_proto::v1 as pb;
use tessera_worker::device::Device;
use tessera_worker::fit::REPORT_FILE;
use tessera_worker::node::Ended;

use crate::metrics::TrainMetrics;
use tessera_worker::network::{NetworkReport, NetworkRequest};
use tessera_worker::{FitOptions, FitReport};

/// Heartbeats on loopback: a killed worker is noticed within 2 s and replaced or dropped after
/// 2 s more.
const LOOPBACK: Config = Config {
    heartbeat_interval_ms: 250,
    heartbeat_timeout_ms: 2_000,
    regroup_grace_ms: 2_000,
};

/// The worker processes; killed on drop unless they exited.
#[derive(Default)]
struct Workers(Vec<Child>);

impl Workers {
    /// Waits up to `limit` for every worker to exit.
    fn wait(&mut self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline && !self.exited() {
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether every worker has exited.
    fn exited(&mut self) -> bool {
        self.0
            .iter_mut()
            .all(|c| c.try_wait().is_ok_and(|s| s.is_some()))
    }
}

impl Workers {
    /// Sends SIGTERM to every worker still running: each stops after the group's current
    /// step, which rank 0 checkpoints.
    fn stop(&mut self) {
        for child in &mut self.0 {
            if child.try_wait().is_ok_and(|s| s.is_none()) {
                stop_process(child.id());
            }
        }
    }
}

#[cfg(unix)]
fn stop_process(pid: u32) {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    if let Ok(pid) = i32::try_from(pid) {
        // A worker that exited meanwhile is no error: it is stopped.
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    }
}

#[cfg(not(unix))]
fn stop_process(_pid: u32) {}

/// How long stopped workers get to finish their step and checkpoint it.
const STOP_GRACE: Duration = Duration::from_secs(120);

impl Drop for Workers {
    fn drop(&mut self) {
        for child in &mut self.0 {
            if child.try_wait().is_ok_and(|s| s.is_none()) {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }
}

pub fn absolute(path: &str) -> Result<String> {
    // URLs pass as they are; local paths are made absolute for the workers.
    if path.contains("://") {
        return Ok(path.to_string());
    }
    Ok(std::path::absolute(path)
        .with_context(|| format!("resolving {path}"))?
        .display()
        .to_string())
}

/// The launcher's environment, when it asks for more than one rank.
#[derive(Debug, Clone)]
pub struct Launch {
    pub rank: usize,
    pub world: usize,
    master_addr: String,
    master_port: u16,
}

impl Launch {
    pub fn from_env() -> Result<Option<Launch>> {
        use crate::worker::env_any;
        let number = |names: &[&str]| -> Result<Option<usize>> {
            env_any(names)
                .map(|v| {
                    v.parse::<usize>()
                        .with_context(|| format!("{}={v:?}: expected a whole number", names[1]))
                })
                .transpose()
        };
        let Some(world) = number(&["PET_NNODES", "WORLD_SIZE"])?.filter(|&w| w > 1) else {
            return Ok(None);
        };
        let rank = number(&["PET_NODE_RANK", "RANK"])?
            .ok_or_else(|| anyhow!("WORLD_SIZE={world} without RANK"))?;
        if rank >= world {
            bail!("RANK={rank} with WORLD_SIZE={world}: expected a rank below the world size");
        }
        let master_addr = env_any(&["PET_MASTER_ADDR", "MASTER_ADDR"])
            .ok_or_else(|| anyhow!("WORLD_SIZE={world} without MASTER_ADDR"))?;
        let port = env_any(&["PET_MASTER_PORT", "MASTER_PORT"]).unwrap_or_else(|| "50051".into());
        let master_port = port
            .parse()
            .with_context(|| format!("MASTER_PORT={port:?}: expected a port number"))?;
        Ok(Some(Launch {
            rank,
            world,
            master_addr,
            master_port,
        }))
    }

    /// A worker of rank 0's coordinator (ranks > 0); returns when its job ends, or stops
    /// (checkpointing the step) on SIGTERM.
    pub fn serve_as_worker(
        &self,
        cache_bytes: u64,
        device: Device,
        metrics: &Arc<TrainMetrics>,
    ) -> Result<()> {
        let coordinator = format!("http://{}:{}", self.master_addr, self.master_port);
        let config = node_config(coordinator, cache_bytes, device, metrics)?;
        let ended = tessera_worker::node::run(&config)
            .with_context(|| format!("rank {} of {}", self.rank, self.world))?;
        crate::worker::stopped(ended, " (rank 0 resumes the job from it)")
    }
}

/// A worker reachable from other pods: any free port, advertised at $POD_IP (else $HOSTNAME);
/// stops on SIGTERM, feeds `metrics`.
fn node_config(
    coordinator: String,
    cache_bytes: u64,
    device: Device,
    metrics: &Arc<TrainMetrics>,
) -> Result<tessera_worker::node::NodeConfig> {
    use crate::worker::env_any;
    Ok(tessera_worker::node::NodeConfig {
        coordinator,
        ring_listen: (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
        advertise_host: env_any(&["POD_IP", "HOSTNAME"]),
        cache_bytes,
        timeout: Duration::from_secs(120),
        max_jobs: Some(1),
        device,
        stop: crate::signals::stop_flag()?,
        progress: Some(metrics.sink()),
    })
}

/// Who trains a job started here.
enum Trainers {
    /// N `tessera worker` processes on loopback (on a bare `cuda`, worker i on GPU i).
    Local {
        n: usize,
        cache_bytes: u64,
        device: Device,
    },
    /// Rank 0 of a launcher's world: one worker in this process, the others in their pods.
    Rank0 {
        cache_bytes: u64,
        device: Device,
        metrics: Arc<TrainMetrics>,
    },
}

pub fn train(opts: &FitOptions, workers: usize) -> Result<FitReport> {
    if workers == 0 {
        bail!("--workers 0: expected at least 1");
    }
    let listen = (std::net::Ipv4Addr::LOCALHOST, 0).into();
    train_with(
        opts,
        workers,
        listen,
        Trainers::Local {
            n: workers,
            cache_bytes: opts.cache_bytes,
            device: opts.device,
        },
    )
}

/// Rank 0 under a launcher: the coordinator on MASTER_PORT, the job, and one of its workers.
pub fn train_as_rank0(
    opts: &FitOptions,
    launch: &Launch,
    metrics: &Arc<TrainMetrics>,
) -> Result<FitReport> {
    let listen = (std::net::Ipv4Addr::UNSPECIFIED, launch.master_port).into();
    train_with(
        opts,
        launch.world,
        listen,
        Trainers::Rank0 {
            cache_bytes: opts.cache_bytes,
            device: opts.device,
            metrics: Arc::clone(metrics),
        },
    )
}

/// Prints a job's statuses as they change: each new epoch with its losses, each new state.
pub struct JobView {
    id: String,
    state: pb::job_status::State,
    epoch: u32,
}

impl JobView {
    pub fn new(id: &str) -> JobView {
        JobView {
            id: id.to_string(),
            state: pb::job_status::State::Unspecified,
            epoch: 0,
        }
    }

    /// Prints what changed; the job's outcome once it has ended.
    pub fn show(&mut self, status: &pb::JobStatus) -> Option<Result<()>> {
        if status.epoch > self.epoch {
            self.epoch = status.epoch;
            let loss = |t: &Option<pb::LossTerms>| {
                t.as_ref()
                    .map_or("-".to_string(), |t| format!("{:.2}", t.loss))
            };
            say!(
                "epoch {}/{}: train loss {}, validation loss {}, {:.0} cells/s",
                self.epoch,
                status.epochs,
                loss(&status.train),
                loss(&status.validation),
                status.cells_per_second
            );
        }
        let now = status.state();
        if now != self.state {
            self.state = now;
            let why = if status.message.is_empty() {
                String::new()
            } else {
                format!(" ({})", status.message)
            };
            say!(
                "{}: {}{why}, {} workers",
                self.id,
                now.as_str_name(),
                status.workers.len()
            );
        }
        match now {
            pb::job_status::State::Succeeded => Some(Ok(())),
            pb::job_status::State::Failed | pb::job_status::State::Cancelled => Some(Err(anyhow!(
                "{} {}: {}",
                self.id,
                now.as_str_name(),
                status.message
            ))),
            _ => None,
        }
    }
}

/// A training job's spec: the configuration with `train.parts` defaulting to the world size,
/// local paths made absolute (the workers run elsewhere).
pub fn job_spec(opts: &FitOptions, world: usize) -> Result<pb::JobSpec> {
    let mut config = opts.config.clone();
    config.train.parts.get_or_insert(world);
    Ok(pb::JobSpec {
        data_url: absolute(&opts.data)?,
        config_toml: toml::to_string(&config).context("writing the configuration as TOML")?,
        world_size: world as u32,
        batch_key: opts.batch_key.clone().unwrap_or_default(),
        label_key: opts.label_key.clone().unwrap_or_default(),
        output_url: absolute(&opts.out.display().to_string())?,
        modalities: opts.modalities.clone(),
        embedding_key: opts.embedding_key.clone(),
        prediction_key: opts.prediction_key.clone(),
        overwrite: opts.overwrite,
        network_toml: String::new(),
        resume: None,
        device: opts.device.to_string(),
        layer: opts.layer.clone().unwrap_or_default(),
        categorical_covariate_keys: opts.covariates.categorical.clone(),
        continuous_covariate_keys: opts.covariates.continuous.clone(),
        unlabeled_category: opts.unlabeled_category.clone().unwrap_or_default(),
        init_from: opts
            .init_from
            .as_deref()
            .map(absolute)
            .transpose()?
            .unwrap_or_default(),
    })
}

/// `tessera snf --workers N`: SNF over row blocks on N local worker processes under an
/// in-process coordinator; rank 0 writes the outputs and `<out>/snf.json`.
pub fn network(req: &NetworkRequest, out: &Path, workers: usize) -> Result<NetworkReport> {
    if workers == 0 {
        bail!("--workers 0: expected at least 1");
    }
    let (data, out) = (absolute(&req.data)?, absolute(&out.display().to_string())?);
    std::fs::create_dir_all(&out).with_context(|| format!("creating {out}"))?;
    let request = NetworkRequest {
        data: data.clone(),
        ..req.clone()
    };
    let spec = pb::JobSpec {
        data_url: data,
        world_size: workers as u32,
        output_url: out.clone(),
        network_toml: toml::to_string(&request).context("writing the request as TOML")?,
        ..pb::JobSpec::default()
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(run_job(
        spec,
        (std::net::Ipv4Addr::LOCALHOST, 0).into(),
        Trainers::Local {
            n: workers,
            cache_bytes: 0,
            device: Device::Cpu,
        },
    ))?;
    let path = Path::new(&out).join(format!("{}.json", req.method.name()));
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// Worker `i`'s device among local workers: a bare `cuda` spreads them one per GPU.
fn local_device(device: Device, i: usize) -> Device {
    match device {
        Device::Cuda(None) => Device::Cuda(Some(i)),
        other => other,
    }
}

fn train_with(
    opts: &FitOptions,
    workers: usize,
    listen: std::net::SocketAddr,
    trainers: Trainers,
) -> Result<FitReport> {
    if opts.denoised.is_some() {
        bail!("--denoised is not supported with --workers yet: train without --workers");
    }
    let mut spec = job_spec(opts, workers)?;
    let out = spec.output_url.clone();
    std::fs::create_dir_all(&out).with_context(|| format!("creating {out}"))?;
    tessera_worker::check_job(&spec.data_url, &spec.config_toml)?;
    if opts.resume {
        // A restarted rank 0 (or a rerun) continues from the last checkpoint its job wrote;
        // the first run has none and starts from the beginning.
        let root = Path::new(&out).join("checkpoint");
        match tessera_worker::checkpoint::latest(&root)? {
            Some(c) => {
                say!(
                    "resuming from {} ({} epochs done, step {})",
                    c.location.display(),
                    c.epochs_done,
                    c.step
                );
                spec.resume = Some(pb::CheckpointRef {
                    location: c.location.display().to_string(),
                    epochs_done: c.epochs_done as u32,
                    step: c.step,
                });
            }
            None => say!(
                "no checkpoint in {}: starting from the beginning",
                root.display()
            ),
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(run_job(spec, listen, trainers))?;
    let path = Path::new(&out).join(REPORT_FILE);
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

async fn run_job(
    spec: pb::JobSpec,
    listen: std::net::SocketAddr,
    trainers: Trainers,
) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding the coordinator on {listen}"))?;
    let port = listener
        .local_addr()
        .context("reading the coordinator's address")?
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    // Local workers reach it on loopback; a launcher's ranks present the token of
    // TESSERA_COORDINATOR_TOKEN when it is set.
    let tokens = match trainers {
        Trainers::Local { .. } => tessera_serve::access::Tokens::none(),
        Trainers::Rank0 { .. } => crate::coordinator::tokens().0,
    };
    let server = tokio::spawn(crate::coordinator::serve(
        listener,
        LOOPBACK,
        None,
        None,
        None,
        crate::coordinator::Access { tokens, tls: None },
        async {
            let _ = stopped.await;
        },
    ));
    let checkpoints = Path::new(&spec.output_url).join("checkpoint");
    let mut workers = Workers::default();
    // Local workers are our children, in their own process group (a terminal's Ctrl-C reaches
    // this process alone): a stop request to us is handed on to them, once.
    let mut requests = match trainers {
        Trainers::Local { .. } => Some(crate::signals::Requests::listen()?),
        Trainers::Rank0 { .. } => None,
    };
    let mut in_process = None;
    // Rank 0's own worker says whether it served the job (true) or stopped or failed first.
    let mut rank0_ended = None;
    match trainers {
        Trainers::Local {
            n,
            cache_bytes,
            device,
        } => {
            let exe = std::env::current_exe().context("locating the tessera executable")?;
            for i in 0..n {
                let child = Command::new(&exe)
                    .args([
                        "worker",
                        "--coordinator",
                        &url,
                        "--ring-listen",
                        "127.0.0.1:0",
                        "--max-jobs",
                        "1",
                        "--timeout-s",
                        "30",
                    ])
                    .args(["--cache-mib", &(cache_bytes >> 20).to_string()])
                    .args(["--device", &local_device(device, i).to_string()])
                    .args(["--parent-pid", &std::process::id().to_string()])
                    .process_group(0)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .spawn()
                    .with_context(|| format!("starting worker {i} ({})", exe.display()))?;
                // The pids, so an operator (or a test) can see and kill a worker.
                say!("worker {i}: pid {}", child.id());
                workers.0.push(child);
            }
        }
        Trainers::Rank0 {
            cache_bytes,
            device,
            metrics,
        } => {
            let config = node_config(url.clone(), cache_bytes, device, &metrics)?;
            let (ended, ended_rx) = tokio::sync::oneshot::channel();
            rank0_ended = Some(ended_rx);
            in_process = Some(
                std::thread::Builder::new()
                    .name("tessera-worker".into())
                    .spawn(move || {
                        let result = tessera_worker::node::run(&config);
                        let _ = ended.send(matches!(result, Ok(Ended::Served)));
                        result
                    })
                    .context("starting the in-process worker")?,
            );
        }
    }
    let mut client = tessera_worker::node::connect_client(&url)
        .await
        .map_err(|e| anyhow!("connecting to the coordinator: {e}"))?;
    let job = client
        .submit_job(spec)
        .await
        .map_err(|s| anyhow!("submitting the job: {}", s.message()))?
        .into_inner();
    let mut statuses = client
        .watch_job(job.clone())
        .await
        .map_err(|s| anyhow!("watching {}: {}", job.job_id, s.message()))?
        .into_inner();
    let mut view = JobView::new(&job.job_id);
    let outcome = loop {
        let next = tokio::select! {
            message = statuses.message() => Some(message),
            served = async {
                match rank0_ended.as_mut() {
                    Some(ended) => ended.await.unwrap_or(false),
                    None => std::future::pending().await,
                }
            } => {
                rank0_ended = None;
                // Served: the job's end is on its way in the stream.
                if served { continue } else { None }
            }
            () = async {
                match requests.as_mut() {
                    Some(requests) => requests.next().await,
                    None => std::future::pending().await,
                }
            } => {
                tracing::warn!(
                    "stop requested: the workers stop after the current step, which is \
                     checkpointed (signal again to exit now)"
                );
                workers.stop();
                let deadline = Instant::now() + STOP_GRACE;
                let stopped = async {
                    while Instant::now() < deadline && !workers.exited() {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                };
                if let Some(requests) = requests.as_mut() {
                    tokio::select! {
                        () = stopped => {}
                        // A second request: leave now (the workers die with this process).
                        () = requests.next() => {
                            std::process::exit(i32::from(crate::signals::EXIT_STOPPED))
                        }
                    }
                }
                let checkpoint = tessera_worker::checkpoint::latest(&checkpoints)
                    .ok()
                    .flatten()
                    .map(|c| c.location.display().to_string());
                break Err(crate::signals::Stopped {
                    checkpoint,
                    hint: " (continue with --resume)",
                }
                .into());
            }
        };
        let Some(message) = next else {
            break Err(anyhow!(
                "{}: rank 0's worker left before the job ended",
                job.job_id
            ));
        };
        let Some(status) =
            message.map_err(|s| anyhow!("watching {}: {}", job.job_id, s.message()))?
        else {
            break Err(anyhow!(
                "{}: the coordinator ended the status stream",
                job.job_id
            ));
        };
        if let Some(ended) = view.show(&status) {
            break ended;
        }
    };
    // Our own watch must not be an open call the server waits for when it stops.
    drop((statuses, client));
    // Rank 0 reported the last epoch after writing the outputs; the workers leave on their own.
    workers.wait(Duration::from_secs(if outcome.is_ok() { 30 } else { 0 }));
    // Joined when the job succeeded (it is leaving) or it said it ended (served, stopped or
    // failed: it says so just before returning, so the join waits no longer than that).
    let rank0_said_it_ended = rank0_ended.is_none();
    let rank0 =
        match in_process.filter(|w| outcome.is_ok() || rank0_said_it_ended || w.is_finished()) {
            Some(worker) => Some(
                worker
                    .join()
                    .map_err(|_| anyhow!("the in-process worker panicked"))??,
            ),
            None => None,
        };
    let _ = stop.send(());
    server.await.context("coordinator task")??;
    if let Some(Ended::Stopped { checkpoint }) = rank0 {
        // This process held the job's coordinator: a restarted rank 0 submits the job again.
        let hint = " (the job's coordinator stopped with rank 0: \
                    run rank 0 again with --resume to continue from it)";
        return Err(crate::signals::Stopped { checkpoint, hint }.into());
    }
    outcome
}
