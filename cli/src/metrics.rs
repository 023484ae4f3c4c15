//! `--metrics-listen`: every long-running role serves Prometheus text (`/metrics`) and a health
//! check (`/healthz`) over plain HTTP (`tessera_serve::exposition`); this module starts that
//! server and holds what `tessera train` and `tessera coordinator` count.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use anyhow::{Context, Result};
use tessera_telemetry::{Exposition, Render, serve_metrics};
use tessera_worker::node::ProgressSink;

/// Binds `at`, says where on stdout ("metrics listening on ADDR": port 0 picks one), and serves
/// until the process ends.
pub async fn spawn(at: SocketAddr, render: Render) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(at)
        .await
        .with_context(|| format!("binding the metrics port {at}"))?;
    let bound = listener
        .local_addr()
        .context("reading the metrics address")?;
    say!("metrics listening on {bound}");
    tokio::spawn(serve_metrics(listener, render, std::future::pending()));
    Ok(())
}

/// Starts the metrics server on its own small runtime (for roles without one, like training).
pub fn spawn_thread(at: SocketAddr, render: Render) -> Result<tokio::runtime::Runtime> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("starting the metrics runtime")?;
    runtime.block_on(spawn(at, render))?;
    Ok(runtime)
}

/// Serves `metrics` at `at` on a runtime of its own (kept alive by the caller).
pub fn serve_train(at: SocketAddr, metrics: &Arc<TrainMetrics>) -> Result<tokio::runtime::Runtime> {
    let observed = Arc::clone(metrics);
    spawn_thread(at, Arc::new(move || observed.render()))
}

/// What a training process has done so far: its steps as the job's (every rank's cells and
/// loss), its own time by phase.
#[derive(Debug, Default)]
pub struct TrainMetrics {
    inner: Mutex<TrainCounts>,
}

#[derive(Debug, Default, Clone)]
struct TrainCounts {
    steps: u64,
    cells: u64,
    epochs: u64,
    epochs_planned: u64,
    loss: Option<tessera_models::LossTerms>,
    validation_loss: Option<f64>,
    cells_per_second: f64,
    compute_seconds: f64,
    allreduce_seconds: f64,
    data_seconds: f64,
}

impl TrainMetrics {
    /// A worker's progress sink that feeds these metrics.
    pub fn sink(self: &Arc<Self>) -> ProgressSink {
        let observed = Arc::clone(self);
        ProgressSink(Arc::new(move |p| observed.observe(p)))
    }

    pub fn observe(&self, progress: &tessera_worker::fit::Progress<'_>) {
        use tessera_worker::fit::Progress;
        let mut c = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        match progress {
            Progress::Start { epochs, .. } => c.epochs_planned = *epochs as u64,
            Progress::Batch { cells, loss } => {
                c.steps += 1;
                c.cells += *cells as u64;
                c.loss = Some(**loss);
            }
            Progress::Epoch(r) => {
                c.epochs += 1;
                c.cells_per_second = r.cells_per_second;
                c.validation_loss = r.validation.map(|v| v.loss);
                c.compute_seconds += r.steps.compute;
                c.allreduce_seconds += r.steps.allreduce;
                c.data_seconds += r.steps.data;
            }
        }
    }

    pub fn render(&self) -> String {
        let c = self
            .inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let mut e = Exposition::default();
        e.counter(
            "tessera_train_steps_total",
            "Optimisation steps taken.",
            c.steps as f64,
        );
        e.counter(
            "tessera_train_cells_total",
            "Training cells passed through steps.",
            c.cells as f64,
        );
        e.counter(
            "tessera_train_epochs_total",
            "Epochs finished.",
            c.epochs as f64,
        );
        e.gauge(
            "tessera_train_epochs_planned",
            "Epochs the run will take at most.",
            c.epochs_planned as f64,
        );
        e.gauge(
            "tessera_train_cells_per_second",
            "Training throughput of the last epoch.",
            c.cells_per_second,
        );
        if let Some(l) = c.loss {
            let terms = [
                ("loss", l.loss),
                ("reconstruction", l.reconstruction),
                ("kl", l.kl),
                ("regularization", l.regularization),
                ("supervised", l.supervised),
            ];
            let samples: Vec<(Vec<(&str, &str)>, f64)> = terms
                .iter()
                .map(|(t, v)| (vec![("term", *t)], *v))
                .collect();
            e.family(
                "tessera_train_loss",
                "The last step's loss terms (per cell).",
                "gauge",
                &samples,
            );
        }
        if let Some(v) = c.validation_loss {
            e.gauge(
                "tessera_train_validation_loss",
                "The last epoch's validation loss (per cell).",
                v,
            );
        }
        let split = [
            ("compute", c.compute_seconds),
            ("allreduce", c.allreduce_seconds),
            ("data", c.data_seconds),
        ];
        let samples: Vec<(Vec<(&str, &str)>, f64)> = split
            .iter()
            .map(|(p, v)| (vec![("phase", *p)], *v))
            .collect();
        e.family(
            "tessera_train_step_seconds_total",
            "Time of the training steps by phase: compute, gradient all-reduce, waiting for data.",
            "counter",
            &samples,
        );
        e.finish()
    }
}

/// The coordinator's jobs by state and the training cells it has counted.
pub fn coordinator_render(snapshot: &tessera_coordinator::Snapshot) -> String {
    use tessera_coordinator::JobState;
    let states = [
        JobState::Queued,
        JobState::Starting,
        JobState::Running,
        JobState::Recovering,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
    ];
    let names: Vec<String> = states
        .iter()
        .map(|s| format!("{s:?}").to_lowercase())
        .collect();
    let samples: Vec<(Vec<(&str, &str)>, f64)> = states
        .iter()
        .zip(&names)
        .map(|(s, name)| {
            (
                vec![("state", name.as_str())],
                snapshot.jobs.iter().filter(|j| j.state == *s).count() as f64,
            )
        })
        .collect();
    let mut e = Exposition::default();
    e.family(
        "tessera_coordinator_jobs",
        "Jobs by state.",
        "gauge",
        &samples,
    );
    let epochs: usize = snapshot.jobs.iter().map(|j| j.epoch_cells.len()).sum();
    let cells: u64 = snapshot
        .jobs
        .iter()
        .flat_map(|j| j.epoch_cells.values())
        .sum();
    e.counter(
        "tessera_coordinator_epochs_total",
        "Epochs counted complete (every rank of one generation reported them).",
        epochs as f64,
    );
    e.counter(
        "tessera_coordinator_cells_total",
        "Training cells of the counted epochs.",
        cells as f64,
    );
    e.finish()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests fail loudly on purpose
    use tessera_models::LossTerms;
    use tessera_telemetry::{parse, value};
    use tessera_worker::fit::Progress;

    use super::*;

    #[test]
    fn training_progress_becomes_prometheus_samples() {
        let metrics = TrainMetrics::default();
        metrics.observe(&Progress::Start {
            epochs: 10,
            cells_per_epoch: 256,
        });
        let loss = LossTerms {
            loss: 1200.5,
            reconstruction: 1190.0,
            kl: 10.5,
            cells: 128,
            ..LossTerms::default()
        };
        for _ in 0..2 {
            metrics.observe(&Progress::Batch {
                cells: 128,
                loss: &loss,
            });
        }
        let samples = parse(&metrics.render()).unwrap();
        assert_eq!(value(&samples, "tessera_train_steps_total", &[]), Some(2.0));
        assert_eq!(
            value(&samples, "tessera_train_cells_total", &[]),
            Some(256.0)
        );
        assert_eq!(
            value(&samples, "tessera_train_epochs_planned", &[]),
            Some(10.0)
        );
        assert_eq!(
            value(&samples, "tessera_train_loss", &[("term", "kl")]),
            Some(10.5)
        );
        assert_eq!(
            value(
                &samples,
                "tessera_train_step_seconds_total",
                &[("phase", "allreduce")]
            ),
            Some(0.0)
        );
    }

    #[test]
    fn the_coordinator_reports_jobs_by_state() {
        let snapshot = tessera_coordinator::Snapshot {
            next_worker: 1,
            jobs: Vec::new(),
        };
        let samples = parse(&coordinator_render(&snapshot)).unwrap();
        assert_eq!(
            value(
                &samples,
                "tessera_coordinator_jobs",
                &[("state", "running")]
            ),
            Some(0.0)
        );
        assert_eq!(
            value(&samples, "tessera_coordinator_epochs_total", &[]),
            Some(0.0)
        );
    }
}
