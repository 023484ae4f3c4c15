//! `tessera train --workers N`: a coordinator in this process and N `tessera worker` processes
//! on loopback, so the distributed path is what a laptop runs too. The job is submitted like
//! any other; the workers exit when it ends and are killed if this process leaves first.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use tessera_coordinator::Config;
use tessera_proto::v1 as pb;
use tessera_proto::v1::coordinator_client::CoordinatorClient;
use tessera_worker::fit::REPORT_FILE;
use tessera_worker::{FitOptions, FitReport};

/// Heartbeats on loopback: a killed worker is noticed within 2 s and replaced or dropped after
/// 2 s more.
const LOOPBACK: Config = Config { heartbeat_interval_ms: 250, heartbeat_timeout_ms: 2_000, regroup_grace_ms: 2_000 };

/// The worker processes; killed on drop unless they exited.
#[derive(Default)]
struct Workers(Vec<Child>);

impl Workers {
    /// Waits up to `limit` for every worker to exit.
    fn wait(&mut self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline && !self.0.iter_mut().all(|c| c.try_wait().is_ok_and(|s| s.is_some())) {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

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

fn absolute(path: &str) -> Result<String> {
    // URLs pass as they are; local paths are made absolute for the workers.
    if path.contains("://") {
        return Ok(path.to_string());
    }
    Ok(std::path::absolute(path).with_context(|| format!("resolving {path}"))?.display().to_string())
}

pub fn train(opts: &FitOptions, workers: usize) -> Result<FitReport> {
    if workers == 0 {
        bail!("--workers 0: expected at least 1");
    }
    if opts.denoised.is_some() || opts.resume {
        bail!("--denoised and --resume are not supported with --workers yet (a distributed job resumes by itself after losing a worker): train without --workers");
    }
    let mut config = opts.config.clone();
    config.train.parts.get_or_insert(workers);
    let config_toml = toml::to_string(&config).context("writing the configuration as TOML")?;
    let (data, out) = (absolute(&opts.data)?, absolute(&opts.out.display().to_string())?);
    std::fs::create_dir_all(&out).with_context(|| format!("creating {out}"))?;
    let (_, epochs) = tessera_worker::check_job(&data, &config_toml)?;
    let spec = pb::JobSpec {
        data_url: data.clone(),
        config_toml,
        world_size: workers as u32,
        batch_key: opts.batch_key.clone().unwrap_or_default(),
        label_key: opts.label_key.clone().unwrap_or_default(),
        output_url: out.clone(),
        modalities: opts.modalities.clone(),
        embedding_key: opts.embedding_key.clone(),
        overwrite: opts.overwrite,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().context("starting the async runtime")?;
    runtime.block_on(run_job(spec, workers, epochs, opts.cache_bytes))?;
    let path = Path::new(&out).join(REPORT_FILE);
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

async fn run_job(spec: pb::JobSpec, n: usize, epochs: u32, cache_bytes: u64) -> Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.context("binding the coordinator on loopback")?;
    let url = format!("http://{}", listener.local_addr().context("reading the coordinator's address")?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(crate::coordinator::serve(listener, LOOPBACK, async {
        let _ = stopped.await;
    }));
    let exe = std::env::current_exe().context("locating the tessera executable")?;
    let mut workers = Workers::default();
    for i in 0..n {
        let child = Command::new(&exe)
            .args(["worker", "--coordinator", &url, "--ring-listen", "127.0.0.1:0", "--max-jobs", "1", "--timeout-s", "30"])
            .args(["--cache-mib", &(cache_bytes >> 20).to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("starting worker {i} ({})", exe.display()))?;
        // The pids, so an operator (or a test) can see and kill a worker.
        println!("worker {i}: pid {}", child.id());
        workers.0.push(child);
    }
    let mut client = CoordinatorClient::connect(url.clone()).await.with_context(|| format!("connecting to {url}"))?;
    let job = client.submit_job(spec).await.map_err(|s| anyhow!("submitting the job: {}", s.message()))?.into_inner();
    let mut statuses = client.watch_job(job.clone()).await.map_err(|s| anyhow!("watching {}: {}", job.job_id, s.message()))?.into_inner();
    let (mut state, mut epoch) = (pb::job_status::State::Unspecified, 0);
    let outcome = loop {
        let Some(status) = statuses.message().await.map_err(|s| anyhow!("watching {}: {}", job.job_id, s.message()))? else {
            break Err(anyhow!("{}: the coordinator ended the status stream", job.job_id));
        };
        if status.epoch > epoch {
            epoch = status.epoch;
            let loss = |t: &Option<pb::LossTerms>| t.as_ref().map_or("-".to_string(), |t| format!("{:.2}", t.loss));
            println!("epoch {epoch}/{epochs}: train loss {}, validation loss {}, {:.0} cells/s", loss(&status.train), loss(&status.validation), status.cells_per_second);
        }
        let now = status.state();
        if now != state {
            state = now;
            let why = if status.message.is_empty() { String::new() } else { format!(" ({})", status.message) };
            println!("{}: {}{why}, {} workers", job.job_id, now.as_str_name(), status.workers.len());
        }
        match now {
            pb::job_status::State::Succeeded => break Ok(()),
            pb::job_status::State::Failed | pb::job_status::State::Cancelled => break Err(anyhow!("{} {}: {}", job.job_id, now.as_str_name(), status.message)),
            _ => {}
        }
    };
    // Rank 0 reported the last epoch after writing the outputs; the workers leave on their own.
    workers.wait(Duration::from_secs(if outcome.is_ok() { 30 } else { 0 }));
    let _ = stop.send(());
    server.await.context("coordinator task")??;
    outcome
}
