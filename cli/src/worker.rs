//! `tessera worker`: one data-parallel worker under a coordinator (see `tessera_worker::node`).
//! Drops into PyTorch-style launchers: the coordinator defaults to `MASTER_ADDR:MASTER_PORT`
//! (or Kubeflow Trainer's `PET_MASTER_ADDR`/`PET_MASTER_PORT`).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use tessera_worker::node::{self, NodeConfig};

#[derive(clap::Args, Debug)]
pub struct WorkerArgs {
    /// Coordinator URL (default: http://$MASTER_ADDR:$MASTER_PORT, or the PET_ variants, else
    /// http://127.0.0.1:50051).
    #[arg(long)]
    coordinator: Option<String>,
    /// Where to accept the ring neighbour's connection (port 0: any free port).
    #[arg(long, default_value = "0.0.0.0:0")]
    ring_listen: SocketAddr,
    /// Host the other workers reach this one at (default: $POD_IP, else the listen address,
    /// else $HOSTNAME).
    #[arg(long)]
    advertise_host: Option<String>,
    /// MiB of decoded count blocks kept in memory for later epochs.
    #[arg(long, default_value_t = tessera_worker::DEFAULT_CACHE_MIB)]
    cache_mib: u64,
    /// Seconds to wait for the coordinator and for each ring transfer.
    #[arg(long, default_value_t = 60)]
    timeout_s: u64,
    /// Exit after this many jobs (default: serve until stopped).
    #[arg(long)]
    max_jobs: Option<usize>,
    /// Serve Prometheus metrics (GET /metrics: this worker's steps, cells, loss terms, time by
    /// phase) and a health check (GET /healthz) over plain HTTP here.
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// Where this worker trains jobs that name no device, and the GPU it uses for jobs that ask
    /// for "cuda": cpu, cuda (the GPU of LOCAL_RANK, else 0) or cuda:N.
    #[arg(long, env = "TESSERA_DEVICE", default_value = "cpu")]
    device: tessera_worker::device::Device,
    /// Exit when the process with this pid (the `train --workers N` that started this worker)
    /// ends, however it ends.
    #[arg(long, hide = true)]
    parent_pid: Option<u32>,
}

/// The first of `names` set in the environment.
pub fn env_any(names: &[&str]) -> Option<String> {
    names
        .iter()
        .find_map(|n| std::env::var(n).ok().filter(|v| !v.is_empty()))
}

/// http://MASTER_ADDR:MASTER_PORT from the launcher's environment.
pub fn master_url() -> Option<String> {
    let addr = env_any(&["PET_MASTER_ADDR", "MASTER_ADDR"])?;
    let port = env_any(&["PET_MASTER_PORT", "MASTER_PORT"]).unwrap_or_else(|| "50051".into());
    Some(format!("http://{addr}:{port}"))
}

/// Asks the kernel to kill this process when its parent dies (a SIGKILLed `train --workers N`
/// took the job's coordinator with it), then checks the parent is still `parent`: had it died
/// before the request, nothing would ever arrive.
#[cfg(target_os = "linux")]
fn die_with_parent(parent: u32) -> Result<()> {
    use nix::sys::signal::Signal;
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).context("asking to die with the parent")?;
    let now = nix::unistd::getppid().as_raw();
    if u32::try_from(now).ok() != Some(parent) {
        anyhow::bail!("the process that started this worker ({parent}) has already ended");
    }
    Ok(())
}

#[cfg(not(target_os = "linux"))]
fn die_with_parent(_parent: u32) -> Result<()> {
    Ok(())
}

pub fn run(args: WorkerArgs) -> Result<()> {
    if let Some(parent) = args.parent_pid {
        die_with_parent(parent)?;
    }
    let coordinator = args
        .coordinator
        .or_else(master_url)
        .unwrap_or_else(|| "http://127.0.0.1:50051".into());
    let advertise_host = args
        .advertise_host
        .or_else(|| env_any(&["POD_IP"]))
        .or_else(|| {
            args.ring_listen
                .ip()
                .is_unspecified()
                .then(|| env_any(&["HOSTNAME"]))
                .flatten()
        });
    let metrics = std::sync::Arc::new(crate::metrics::TrainMetrics::default());
    // Kept alive for the whole run: the metrics server's runtime.
    let _metrics_server = args
        .metrics_listen
        .map(|at| crate::metrics::serve_train(at, &metrics))
        .transpose()?;
    let config = NodeConfig {
        coordinator: coordinator.clone(),
        ring_listen: args.ring_listen,
        advertise_host,
        cache_bytes: args.cache_mib << 20,
        timeout: Duration::from_secs(args.timeout_s),
        max_jobs: args.max_jobs,
        device: args.device,
        stop: crate::signals::stop_flag()?,
        progress: Some(metrics.sink()),
    };
    let ended = node::run(&config).with_context(|| format!("worker of {coordinator}"))?;
    stopped(ended, " (the coordinator resumes the job from it)")
}

/// `Ended::Stopped` as the error `main` exits 143 for.
pub fn stopped(ended: node::Ended, hint: &'static str) -> Result<()> {
    match ended {
        node::Ended::Served => Ok(()),
        node::Ended::Stopped { checkpoint } => {
            Err(crate::signals::Stopped { checkpoint, hint }.into())
        }
    }
}
