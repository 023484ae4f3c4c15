//! Mapping jobs: queued in submission order, admitted when a job slot is free and their memory
//! estimate fits the server's budget, run on blocking threads, watched through a status
//! channel, cancelled between minibatches. Finished jobs keep their results (the most recent
//! `finished_kept` of them) for `QueryResults`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tessera_data::Dataset;
use tessera_proto::v1 as pb;
use tessera_worker::query::{QueryError, QueryOutput, QueryRequest, QueryStage, map_query};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};

use crate::ServeError;
use crate::registry::Loaded;

const MIB: u64 = 1 << 20;

#[derive(Debug, Clone)]
pub struct JobLimits {
    /// Jobs running at once.
    pub max_jobs: usize,
    /// The sum of running jobs' memory estimates stays below this.
    pub memory_bytes: u64,
    /// Finished jobs whose status and results are kept.
    pub finished_kept: usize,
}

/// A finished mapping: what `map_query` returned and the query's cell names.
#[derive(Debug)]
pub struct Results {
    pub output: QueryOutput,
    pub obs_names: Vec<String>,
}

#[derive(Debug)]
pub struct Job {
    pub id: String,
    status: watch::Sender<pb::QueryJobStatus>,
    cancel: AtomicBool,
    cancelled: Notify,
    results: Mutex<Option<Arc<Results>>>,
}

impl Job {
    pub fn status(&self) -> pb::QueryJobStatus {
        self.status.borrow().clone()
    }

    pub fn watch(&self) -> watch::Receiver<pb::QueryJobStatus> {
        self.status.subscribe()
    }

    pub fn results(&self) -> Option<Arc<Results>> {
        self.results
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Asks the job to stop: a queued job ends at once, a running one after its current minibatch.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::SeqCst);
        self.cancelled.notify_one();
    }

    fn update(&self, f: impl FnOnce(&mut pb::QueryJobStatus)) {
        self.status.send_modify(f);
    }

    fn finish(&self, state: pb::JobState, stage: &str, error: String) {
        self.update(|s| {
            s.set_state(state);
            s.stage = stage.to_string();
            s.error = error;
            if state == pb::JobState::Succeeded {
                s.progress = 1.0;
            }
        });
    }
}

pub fn is_terminal(state: pb::JobState) -> bool {
    matches!(
        state,
        pb::JobState::Succeeded | pb::JobState::Failed | pb::JobState::Cancelled
    )
}

/// Share of a mapping done at `stage`: fine-tuning is most of it.
fn progress(stage: &QueryStage) -> f64 {
    match *stage {
        QueryStage::Surgery => 0.02,
        QueryStage::FineTuning {
            epoch,
            epochs,
            cells,
            n_cells,
        } => {
            0.05 + 0.85 * (epoch as f64 + cells as f64 / n_cells.max(1) as f64)
                / epochs.max(1) as f64
        }
        QueryStage::Mapping => 0.92,
    }
}

/// Memory a mapping of `dataset` onto `model` needs, roughly: the loader's copy of the counts
/// (index and value per non-zero, twice while batches are cut), the embedding and labels, the
/// model's values with gradients and Adam's moments, and working space for a minibatch.
pub fn estimate_bytes(dataset: &Dataset, model: &Loaded) -> Result<u64, ServeError> {
    let nnz: u64 = match dataset {
        Dataset::AnnData(a) => a.x().map_err(|e| ServeError::Invalid(e.to_string()))?.nnz,
        Dataset::MuData(m) => m
            .modalities
            .iter()
            .map(|(_, a)| a.x().map(|x| x.nnz))
            .sum::<Result<u64, _>>()
            .map_err(|e| ServeError::Invalid(e.to_string()))?,
    };
    let n = dataset.n_obs();
    let d = model.model().reference.n_latent as u64;
    let parameters = model.model().parameter_count() as u64;
    Ok(nnz * 16 + n * (d * 4 + 64) + parameters * 4 * 6 + 64 * MIB)
}

#[derive(Debug)]
struct Table {
    jobs: HashMap<String, Arc<Job>>,
    finished: VecDeque<String>,
}

#[derive(Debug, Clone)]
pub struct Jobs {
    limits: JobLimits,
    slots: Arc<Semaphore>,
    /// In MiB.
    memory: Arc<Semaphore>,
    memory_mib: usize,
    table: Arc<Mutex<Table>>,
    next: Arc<AtomicU64>,
}

impl Jobs {
    pub fn new(limits: JobLimits) -> Jobs {
        let mib = usize::try_from(limits.memory_bytes / MIB)
            .unwrap_or(usize::MAX)
            .min(Semaphore::MAX_PERMITS);
        Jobs {
            slots: Arc::new(Semaphore::new(limits.max_jobs.max(1))),
            memory: Arc::new(Semaphore::new(mib)),
            memory_mib: mib,
            limits,
            table: Arc::new(Mutex::new(Table {
                jobs: HashMap::new(),
                finished: VecDeque::new(),
            })),
            next: Arc::new(AtomicU64::new(1)),
        }
    }

    /// Jobs known (queued, running, and the finished ones kept) by state, every state listed.
    pub fn states(&self) -> BTreeMap<&'static str, usize> {
        let mut states: BTreeMap<&'static str, usize> =
            ["queued", "running", "succeeded", "failed", "cancelled"]
                .into_iter()
                .map(|s| (s, 0))
                .collect();
        for job in self
            .table
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .jobs
            .values()
        {
            let state = match job.status().state() {
                pb::JobState::Queued | pb::JobState::Unspecified => "queued",
                pb::JobState::Running => "running",
                pb::JobState::Succeeded => "succeeded",
                pb::JobState::Failed => "failed",
                pb::JobState::Cancelled => "cancelled",
            };
            *states.entry(state).or_default() += 1;
        }
        states
    }

    /// Memory held by the running jobs' estimates.
    pub fn admitted_bytes(&self) -> u64 {
        (self
            .memory_mib
            .saturating_sub(self.memory.available_permits()) as u64)
            * MIB
    }

    pub fn budget_bytes(&self) -> u64 {
        self.memory_mib as u64 * MIB
    }

    pub fn get(&self, id: &str) -> Result<Arc<Job>, ServeError> {
        self.table
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .jobs
            .get(id)
            .cloned()
            .ok_or_else(|| {
                ServeError::NotFound(format!(
                    "no job {id:?} (finished jobs are kept for a while, then forgotten)"
                ))
            })
    }

    /// `bytes` in MiB, refused when more than the whole budget (it would wait forever).
    fn fits(&self, bytes: u64, what: &str) -> Result<u64, ServeError> {
        let mib = bytes.div_ceil(MIB);
        if bytes > self.limits.memory_bytes {
            return Err(ServeError::Exhausted(format!(
                "{what} needs about {mib} MiB, more than the server's memory budget of {} MiB",
                self.limits.memory_bytes / MIB
            )));
        }
        Ok(mib)
    }

    /// Holds `bytes` of the memory budget the jobs share (waiting in line with them) until
    /// the permit is dropped: what a synchronous call (Encode) needs while it runs.
    pub async fn reserve(
        &self,
        bytes: u64,
        what: &str,
    ) -> Result<OwnedSemaphorePermit, ServeError> {
        let mib = self.fits(bytes, what)?;
        Arc::clone(&self.memory)
            .acquire_many_owned(mib as u32)
            .await
            .map_err(|_| ServeError::Exhausted("the server is shutting down".into()))
    }

    /// Queues `req` on `model`; `estimate` bytes are held while it runs; `scratch` (an upload)
    /// is deleted when it ends.
    pub fn submit(
        &self,
        model: Arc<Loaded>,
        req: QueryRequest,
        estimate: u64,
        scratch: Option<PathBuf>,
    ) -> Result<Arc<Job>, ServeError> {
        let mib = self.fits(estimate, "the job")?;
        let id = format!("query-{}", self.next.fetch_add(1, Ordering::SeqCst));
        let status = pb::QueryJobStatus {
            job_id: id.clone(),
            state: pb::JobState::Queued as i32,
            stage: "queued".into(),
            memory_bytes: estimate,
            ..Default::default()
        };
        let job = Arc::new(Job {
            id: id.clone(),
            status: watch::channel(status).0,
            cancel: AtomicBool::new(false),
            cancelled: Notify::new(),
            results: Mutex::new(None),
        });
        self.table
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .jobs
            .insert(id.clone(), Arc::clone(&job));
        tracing::info!(job = %id, model = %model.name, data = %req.data, estimate_mib = mib, "query job queued");
        let this = self.clone();
        let running = Arc::clone(&job);
        tokio::spawn(async move {
            this.run(&running, model, req, mib as u32, scratch).await;
            this.forget_old(&running.id);
        });
        Ok(job)
    }

    /// Runs the job; its upload (`scratch`) is removed before its last status is published, so
    /// a client that saw the job end finds the upload gone.
    async fn run(
        &self,
        job: &Arc<Job>,
        model: Arc<Loaded>,
        req: QueryRequest,
        mib: u32,
        scratch: Option<PathBuf>,
    ) {
        let remove_upload = || async {
            if let Some(dir) = &scratch
                && let Err(e) = tokio::fs::remove_dir_all(dir).await
            {
                tracing::warn!(dir = %dir.display(), error = %e, "removing an upload");
            }
        };
        // FIFO: tokio's semaphores serve waiters in order, so a large job is not starved.
        let admitted = async {
            let slot = Arc::clone(&self.slots).acquire_owned().await.ok()?;
            let memory = Arc::clone(&self.memory)
                .acquire_many_owned(mib)
                .await
                .ok()?;
            Some((slot, memory))
        };
        let permits = tokio::select! {
            permits = admitted => permits,
            () = job.cancelled.notified() => None,
        };
        let Some(_permits) = permits.filter(|_| !job.cancel.load(Ordering::SeqCst)) else {
            remove_upload().await;
            job.finish(pb::JobState::Cancelled, "cancelled", String::new());
            return;
        };
        job.update(|s| {
            s.set_state(pb::JobState::Running);
            s.stage = "loading".into();
        });
        let worker = Arc::clone(job);
        let outcome = tokio::task::spawn_blocking(move || {
            let output = map_query(model.model(), &req, |stage| {
                worker.update(|s| {
                    s.stage = stage.to_string();
                    s.progress = progress(&stage);
                });
                if worker.cancel.load(Ordering::SeqCst) {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            })?;
            let obs_names = match Dataset::open(&req.data)? {
                Dataset::AnnData(a) => a.obs()?.index,
                Dataset::MuData(m) => m.obs_names,
            };
            Ok::<_, QueryError>(Results { output, obs_names })
        })
        .await;
        remove_upload().await;
        match outcome {
            Ok(Ok(results)) => {
                let report = serde_json::to_string(&results.output.report).unwrap_or_default();
                *job.results.lock().unwrap_or_else(PoisonError::into_inner) =
                    Some(Arc::new(results));
                job.update(|s| s.report_json = report);
                job.finish(pb::JobState::Succeeded, "done", String::new());
                tracing::info!(job = %job.id, "query job succeeded");
            }
            Ok(Err(QueryError::Cancelled)) => {
                job.finish(pb::JobState::Cancelled, "cancelled", String::new())
            }
            Ok(Err(e)) => {
                tracing::warn!(job = %job.id, error = %e, "query job failed");
                job.finish(pb::JobState::Failed, "failed", e.to_string());
            }
            Err(e) => job.finish(
                pb::JobState::Failed,
                "failed",
                format!("the job's thread ended abnormally: {e}"),
            ),
        }
    }

    /// Keeps the last `finished_kept` finished jobs.
    fn forget_old(&self, finished: &str) {
        let mut table = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        table.finished.push_back(finished.to_string());
        while table.finished.len() > self.limits.finished_kept {
            if let Some(old) = table.finished.pop_front() {
                table.jobs.remove(&old);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_reservation_holds_the_budget_until_dropped_and_too_much_is_refused() {
        let jobs = Jobs::new(JobLimits {
            max_jobs: 1,
            memory_bytes: 10 * MIB,
            finished_kept: 1,
        });
        let held = jobs.reserve(3 * MIB + 1, "a call").await.unwrap();
        assert_eq!(jobs.admitted_bytes(), 4 * MIB);
        drop(held);
        assert_eq!(jobs.admitted_bytes(), 0);
        let e = jobs
            .reserve(11 * MIB, "this Encode call")
            .await
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "this Encode call needs about 11 MiB, more than the server's memory budget of 10 MiB"
        );
    }
}
