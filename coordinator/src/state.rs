//! The coordinator as a pure state machine: every input is a method call carrying the time
//! (milliseconds on a monotonic clock the caller owns), every output a return value. No I/O,
//! no clock, no threads, so a seeded simulation can drive it through crashes, delays and
//! reordered messages and check its invariants after every event (`check`).
//!
//! Model: workers register and heartbeat; a job waits in a queue until `world_size` workers
//! wait in `join`, then gets a *group*: those workers in rank order under a new generation
//! number. Workers train and report progress; rank 0 announces checkpoints at epoch ends. A
//! worker that misses its heartbeats is removed: its job's group is dissolved (generation
//! bumped, survivors told to rejoin) and the job is re-formed from the waiting workers, with
//! fewer ranks if no replacement comes within `regroup_grace_ms`, resuming from the last
//! checkpoint. An epoch counts once all ranks of one generation report it done, with exactly
//! the job's training cells between them.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};

pub type Millis = u64;
pub type WorkerId = u64;
pub type JobId = u64;

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub heartbeat_interval_ms: Millis,
    /// A worker not heard from for this long is removed.
    pub heartbeat_timeout_ms: Millis,
    /// After losing a worker, how long a job waits for a replacement before re-forming with
    /// the survivors alone.
    pub regroup_grace_ms: Millis,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            heartbeat_interval_ms: 1_000,
            heartbeat_timeout_ms: 10_000,
            regroup_grace_ms: 5_000,
        }
    }
}

/// What a job trains; the coordinator checks the data opens and counts its cells before
/// submitting (I/O stays outside this module).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct JobSpec {
    pub data_url: String,
    pub config_toml: String,
    pub world_size: u32,
    pub batch_key: String,
    pub label_key: String,
    pub output_url: String,
    pub modalities: Vec<String>,
    pub embedding_key: String,
    /// Where the classifier's predictions go (empty: the default key).
    #[serde(default)]
    pub prediction_key: String,
    pub overwrite: bool,
    /// A network job's request (empty: training).
    #[serde(default)]
    pub network_toml: String,
    /// Where the ranks train ("cpu", "cuda", "cuda:N"; empty: each worker's own device).
    #[serde(default)]
    pub device: String,
    /// layers/<layer> instead of X (empty: X).
    #[serde(default)]
    pub layer: String,
    /// obs columns read as covariates beside the batch.
    #[serde(default)]
    pub categorical_covariate_keys: Vec<String>,
    #[serde(default)]
    pub continuous_covariate_keys: Vec<String>,
    /// The label that marks an unlabelled cell (empty: none).
    #[serde(default)]
    pub unlabeled_category: String,
    /// A trained model's folder to start from (empty: none).
    #[serde(default)]
    pub init_from: String,
    /// Training cells per epoch (the store's cells minus the held-out ones).
    pub train_cells: u64,
    pub epochs: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobState {
    Queued,
    /// Waiting for its workers to join (first time, or again after losing one).
    Starting,
    Running,
    Recovering,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn ended(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub epochs_done: u32,
    pub step: u64,
    pub location: String,
}

/// A worker's place in a group.
#[derive(Debug, Clone, PartialEq)]
pub struct Assignment {
    pub job: JobId,
    pub generation: u64,
    pub rank: u32,
    pub world_size: u32,
    /// Ring addresses in rank order.
    pub peers: Vec<String>,
    pub spec: JobSpec,
    pub resume_from: Option<Checkpoint>,
}

/// Why a worker is removed from the coordinator.
#[derive(Debug, Clone, Copy)]
enum Departure {
    /// Missed its heartbeats (crashed, killed, cut off).
    Silent,
    /// Said it was leaving.
    Left,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Directive {
    Continue,
    Rejoin,
    Stop,
    Register,
}

/// Rank 0's summary of a finished epoch: mean loss terms (loss, reconstruction, KL,
/// regularisers, supervised) and throughput, shown in the job's status.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct EpochSummary {
    pub train: [f64; 5],
    pub validation: Option<[f64; 5]>,
    pub cells_per_second: f64,
}

/// One worker's report on its part of an epoch.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Progress {
    pub job: JobId,
    pub generation: u64,
    pub epoch: u32,
    pub step: u64,
    /// Training cells this worker finished in the epoch so far.
    pub cells: u64,
    pub epoch_done: bool,
    /// Training ends with this epoch (early stopping may end it before `JobSpec::epochs`).
    pub last: bool,
    /// Training failed in a way a retry would repeat: the job fails with this reason.
    pub failure: Option<String>,
    pub summary: Option<EpochSummary>,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StateError {
    #[error("unknown worker {0}")]
    UnknownWorker(WorkerId),
    #[error("unknown job {0}")]
    UnknownJob(JobId),
    #[error("job {job}: world_size {world} (needs at least 1)")]
    BadWorldSize { job: JobId, world: u32 },
    #[error("job {job}: {reason}")]
    Stale { job: JobId, reason: String },
}

#[derive(Debug, Clone)]
struct Worker {
    ring_address: String,
    device: String,
    last_seen: Millis,
    /// Waiting in `join` for a group.
    waiting: bool,
    /// (job, generation, rank) while in a group.
    group: Option<(JobId, u64, u32)>,
    /// Training cells of its current epoch so far (the whole last epoch once it is done).
    cells: u64,
    /// Set when its group ended under it: what the next heartbeat says (Rejoin, or Stop when
    /// the job ended).
    pending: Option<Directive>,
}

/// What survives a coordinator restart (the binary keeps it in an object store): every job,
/// and where worker ids had got to (a restarted coordinator must not hand out an id a live
/// worker still holds).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub next_worker: WorkerId,
    pub jobs: Vec<JobRecord>,
}

/// Ids a restarted coordinator skips: registrations after the last saved snapshot used some.
const RESTART_ID_GAP: WorkerId = 1 << 20;

/// A job's spec, how it ended, its last checkpoint and the epochs counted up to it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: JobId,
    pub spec: JobSpec,
    pub state: JobState,
    pub message: String,
    pub generation: u64,
    pub checkpoint: Option<Checkpoint>,
    pub epoch_cells: BTreeMap<u32, u64>,
}

#[derive(Debug, Clone)]
pub struct Job {
    pub spec: JobSpec,
    pub state: JobState,
    pub generation: u64,
    /// The group's workers in rank order (empty while not running).
    pub members: Vec<WorkerId>,
    pub checkpoint: Option<Checkpoint>,
    /// Completed epochs (all ranks of one generation reported them done).
    pub epochs_done: u32,
    /// (epoch, rank) → cells, for the current generation's ranks that finished an epoch the
    /// job has not completed yet.
    done: BTreeMap<(u32, u32), u64>,
    /// Training cells counted for each completed epoch: the accounting invariant.
    pub epoch_cells: BTreeMap<u32, u64>,
    /// The group size when it was last formed (recovery may shrink it).
    pub world: u32,
    /// When the job lost a worker (recovery waits for a replacement until the grace ends).
    lost_at: Option<Millis>,
    pub message: String,
    pub step: u64,
    /// Training ends after this many epochs (a rank reported early stopping).
    ends_after: Option<u32>,
    /// Rank 0's last epoch summary.
    pub summary: Option<EpochSummary>,
}

#[derive(Debug, Clone, Default)]
pub struct Coordinator {
    config: Config,
    workers: BTreeMap<WorkerId, Worker>,
    jobs: BTreeMap<JobId, Job>,
    queue: VecDeque<JobId>,
    next_worker: WorkerId,
    next_job: JobId,
}

impl Coordinator {
    pub fn new(config: Config) -> Coordinator {
        Coordinator {
            config,
            next_worker: 1,
            next_job: 1,
            ..Coordinator::default()
        }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// What the binary persists after changes.
    pub fn snapshot(&self) -> Snapshot {
        let jobs = self
            .jobs
            .iter()
            .map(|(&id, j)| JobRecord {
                id,
                spec: j.spec.clone(),
                state: j.state,
                message: j.message.clone(),
                generation: j.generation,
                checkpoint: j.checkpoint.clone(),
                epoch_cells: j.epoch_cells.clone(),
            })
            .collect();
        Snapshot {
            next_worker: self.next_worker,
            jobs,
        }
    }

    /// A coordinator restarted from its records: ended jobs stay as they ended; the others
    /// recover from their last checkpoint with the workers that register again (as after a lost
    /// worker, a smaller group after the grace), under a generation no old link can match.
    pub fn restore(config: Config, now: Millis, snapshot: Snapshot) -> Coordinator {
        let mut c = Coordinator::new(config);
        c.next_worker = snapshot.next_worker.saturating_add(RESTART_ID_GAP);
        for r in snapshot.jobs {
            let ended = r.state.ended();
            let epochs_done = if ended {
                r.epoch_cells.len() as u32
            } else {
                r.checkpoint.as_ref().map_or(0, |k| k.epochs_done)
            };
            let epoch_cells: BTreeMap<u32, u64> = r
                .epoch_cells
                .into_iter()
                .filter(|&(e, _)| e < epochs_done)
                .collect();
            let message = if ended {
                r.message
            } else {
                format!(
                    "coordinator restarted; resuming from {}",
                    r.checkpoint
                        .as_ref()
                        .map_or("the start".to_string(), |k| format!(
                            "the checkpoint after epoch {}",
                            k.epochs_done
                        ))
                )
            };
            let world = r.spec.world_size;
            let state = if ended { r.state } else { JobState::Recovering };
            let job = Job {
                spec: r.spec,
                state,
                generation: r.generation + 1,
                members: Vec::new(),
                checkpoint: r.checkpoint,
                epochs_done,
                done: BTreeMap::new(),
                epoch_cells,
                world,
                lost_at: (!ended).then_some(now),
                message,
                step: 0,
                ends_after: None,
                summary: None,
            };
            c.next_job = c.next_job.max(r.id + 1);
            c.jobs.insert(r.id, job);
            if !ended {
                c.queue.push_back(r.id);
            }
        }
        c
    }

    pub fn register(&mut self, now: Millis, ring_address: String, device: String) -> WorkerId {
        let id = self.next_worker;
        self.next_worker += 1;
        self.workers.insert(
            id,
            Worker {
                ring_address,
                device,
                last_seen: now,
                waiting: false,
                group: None,
                cells: 0,
                pending: None,
            },
        );
        id
    }

    pub fn heartbeat(&mut self, now: Millis, worker: WorkerId, generation: u64) -> Directive {
        let Some(w) = self.workers.get_mut(&worker) else {
            return Directive::Register;
        };
        w.last_seen = now;
        if let Some(d) = w.pending.take() {
            return d;
        }
        match w.group {
            Some((job, g, _)) if g == generation => match self.jobs.get(&job).map(|j| j.state) {
                Some(s) if s.ended() => Directive::Stop,
                _ => Directive::Continue,
            },
            // Placed but not training yet (its Join's reply and this heartbeat crossed).
            Some(_) if generation == 0 => Directive::Continue,
            // It trains in a generation that is gone: rejoin.
            Some(_) => Directive::Rejoin,
            None if generation != 0 => Directive::Rejoin,
            None => Directive::Continue,
        }
    }

    /// The worker waits for a group; returns its assignment when it has one (the service calls
    /// this again after every state change until the wait ends). Leaving a group to join again
    /// counts as losing that group's place.
    pub fn join(
        &mut self,
        now: Millis,
        worker: WorkerId,
    ) -> Result<Option<Assignment>, StateError> {
        let w = self
            .workers
            .get_mut(&worker)
            .ok_or(StateError::UnknownWorker(worker))?;
        w.last_seen = now;
        if let Some((job, generation, rank)) = w.group {
            // Already placed and the group stands: the same assignment again (a retried Join).
            if self
                .jobs
                .get(&job)
                .is_some_and(|j| j.generation == generation && !j.state.ended())
            {
                return Ok(Some(self.assignment(job, rank)));
            }
            w.group = None;
        }
        self.workers
            .get_mut(&worker)
            .ok_or(StateError::UnknownWorker(worker))?
            .waiting = true;
        self.form_groups(now);
        let w = &self.workers[&worker];
        Ok(w.group.map(|(job, _, rank)| self.assignment(job, rank)))
    }

    fn assignment(&self, job: JobId, rank: u32) -> Assignment {
        let j = &self.jobs[&job];
        Assignment {
            job,
            generation: j.generation,
            rank,
            world_size: j.members.len() as u32,
            peers: j
                .members
                .iter()
                .map(|m| {
                    self.workers
                        .get(m)
                        .map(|w| w.ring_address.clone())
                        .unwrap_or_default()
                })
                .collect(),
            spec: j.spec.clone(),
            resume_from: j.checkpoint.clone(),
        }
    }

    pub fn submit(&mut self, spec: JobSpec) -> Result<JobId, StateError> {
        self.submit_from(spec, None)
    }

    /// A job that starts from `resume`, a checkpoint of an earlier run of it (whose coordinator
    /// is gone): its epochs count as done, each with the job's training cells.
    pub fn submit_from(
        &mut self,
        spec: JobSpec,
        resume: Option<Checkpoint>,
    ) -> Result<JobId, StateError> {
        let id = self.next_job;
        if spec.world_size == 0 {
            return Err(StateError::BadWorldSize { job: id, world: 0 });
        }
        let epochs_done = resume.as_ref().map_or(0, |c| c.epochs_done);
        if epochs_done >= spec.epochs && resume.is_some() {
            return Err(StateError::Stale {
                job: id,
                reason: format!(
                    "the checkpoint to resume from has {epochs_done} epochs done, the job trains {}: nothing left to train",
                    spec.epochs
                ),
            });
        }
        self.next_job += 1;
        let world = spec.world_size;
        let epoch_cells = (0..epochs_done).map(|e| (e, spec.train_cells)).collect();
        let message = resume.as_ref().map_or(String::new(), |c| {
            format!(
                "resuming from the checkpoint after epoch {} at step {}",
                c.epochs_done, c.step
            )
        });
        self.jobs.insert(
            id,
            Job {
                spec,
                state: JobState::Queued,
                generation: 0,
                members: Vec::new(),
                checkpoint: resume,
                epochs_done,
                done: BTreeMap::new(),
                epoch_cells,
                world,
                lost_at: None,
                message,
                step: 0,
                ends_after: None,
                summary: None,
            },
        );
        self.queue.push_back(id);
        Ok(id)
    }

    pub fn cancel(&mut self, job: JobId) -> Result<(), StateError> {
        let j = self.jobs.get_mut(&job).ok_or(StateError::UnknownJob(job))?;
        if !j.state.ended() {
            j.state = JobState::Cancelled;
            j.message = "cancelled".into();
            self.release(job);
        }
        Ok(())
    }

    pub fn job(&self, job: JobId) -> Result<&Job, StateError> {
        self.jobs.get(&job).ok_or(StateError::UnknownJob(job))
    }

    /// (worker, device, ms since its last heartbeat, cells of its epoch so far) of a job's
    /// group, in rank order.
    pub fn members(
        &self,
        now: Millis,
        job: JobId,
    ) -> Result<Vec<(WorkerId, String, Millis, u64)>, StateError> {
        let j = self.job(job)?;
        Ok(j.members
            .iter()
            .filter_map(|m| {
                self.workers.get(m).map(|w| {
                    (
                        *m,
                        w.device.clone(),
                        now.saturating_sub(w.last_seen),
                        w.cells,
                    )
                })
            })
            .collect())
    }

    pub fn progress(
        &mut self,
        now: Millis,
        worker: WorkerId,
        p: &Progress,
    ) -> Result<(), StateError> {
        let w = self
            .workers
            .get_mut(&worker)
            .ok_or(StateError::UnknownWorker(worker))?;
        w.last_seen = now;
        let rank = match w.group {
            Some((job, generation, rank)) if job == p.job && generation == p.generation => rank,
            _ => {
                return Err(StateError::Stale {
                    job: p.job,
                    reason: format!(
                        "worker {worker} is not in generation {} of the job",
                        p.generation
                    ),
                });
            }
        };
        w.cells = p.cells;
        let j = self
            .jobs
            .get_mut(&p.job)
            .ok_or(StateError::UnknownJob(p.job))?;
        if j.state.ended() {
            return Ok(());
        }
        if let Some(reason) = &p.failure {
            j.state = JobState::Failed;
            j.message = format!("rank {rank}: {reason}");
            self.release(p.job);
            return Ok(());
        }
        j.state = JobState::Running;
        if rank == 0 && p.summary.is_some() {
            j.summary = p.summary;
        }
        j.step = j.step.max(p.step);
        if p.epoch < j.epochs_done {
            return Err(StateError::Stale {
                job: p.job,
                reason: format!("epoch {} was already completed", p.epoch),
            });
        }
        if p.epoch_done {
            j.done.insert((p.epoch, rank), p.cells);
            if p.last {
                j.ends_after = Some(j.ends_after.map_or(p.epoch + 1, |e| e.min(p.epoch + 1)));
            }
        }
        // Ranks run in lockstep but their reports arrive in any order: a rank's report of the
        // next epoch may come before another's of this one, so completions are kept per epoch.
        let world = j.members.len() as u32;
        while let Some(cells) = (0..world)
            .map(|r| j.done.get(&(j.epochs_done, r)).copied())
            .collect::<Option<Vec<u64>>>()
        {
            let (epoch, total) = (j.epochs_done, cells.iter().sum::<u64>());
            if total != j.spec.train_cells {
                j.state = JobState::Failed;
                j.message = format!(
                    "epoch {epoch}: the ranks trained {total} cells, the epoch has {}",
                    j.spec.train_cells
                );
                self.release(p.job);
                return Ok(());
            }
            j.epoch_cells.insert(epoch, total);
            j.epochs_done = epoch + 1;
            j.done.retain(|&(e, _), _| e > epoch);
            if j.epochs_done >= j.spec.epochs || j.ends_after.is_some_and(|e| j.epochs_done >= e) {
                j.state = JobState::Succeeded;
                self.release(p.job);
                return Ok(());
            }
        }
        Ok(())
    }

    pub fn checkpoint(
        &mut self,
        now: Millis,
        worker: WorkerId,
        job: JobId,
        generation: u64,
        c: Checkpoint,
    ) -> Result<(), StateError> {
        let w = self
            .workers
            .get_mut(&worker)
            .ok_or(StateError::UnknownWorker(worker))?;
        w.last_seen = now;
        if w.group != Some((job, generation, 0)) {
            return Err(StateError::Stale {
                job,
                reason: format!("worker {worker} is not rank 0 of generation {generation}"),
            });
        }
        let j = self.jobs.get_mut(&job).ok_or(StateError::UnknownJob(job))?;
        // A checkpoint may only hold completed epochs (resuming from it must not skip cells).
        if c.epochs_done > j.epochs_done {
            return Err(StateError::Stale {
                job,
                reason: format!(
                    "checkpoint after epoch {} but only {} epochs are complete",
                    c.epochs_done, j.epochs_done
                ),
            });
        }
        // A checkpoint within an epoch (a leaving worker's step) has the epochs done before it.
        if j.checkpoint
            .as_ref()
            .is_none_or(|old| (old.epochs_done, old.step) <= (c.epochs_done, c.step))
        {
            j.checkpoint = Some(c);
        }
        Ok(())
    }

    /// Time passes: workers past their heartbeat deadline are removed, groups re-formed.
    pub fn tick(&mut self, now: Millis) {
        let timeout = self.config.heartbeat_timeout_ms;
        let dead: Vec<WorkerId> = self
            .workers
            .iter()
            .filter(|(_, w)| now.saturating_sub(w.last_seen) > timeout)
            .map(|(&id, _)| id)
            .collect();
        for id in dead {
            self.remove_worker(now, id, Departure::Silent);
        }
        self.form_groups(now);
    }

    /// The worker says it is going (its pod got SIGTERM, after rank 0 checkpointed the step):
    /// removed at once, as a silent one is after its heartbeat timeout.
    pub fn leave(&mut self, now: Millis, worker: WorkerId) -> Result<(), StateError> {
        if !self.workers.contains_key(&worker) {
            return Err(StateError::UnknownWorker(worker));
        }
        self.remove_worker(now, worker, Departure::Left);
        self.form_groups(now);
        Ok(())
    }

    fn remove_worker(&mut self, now: Millis, id: WorkerId, why: Departure) {
        let Some(w) = self.workers.remove(&id) else {
            return;
        };
        let who = match why {
            Departure::Silent => {
                tracing::warn!(worker = id, "worker removed: no heartbeat");
                format!("lost worker {id}")
            }
            Departure::Left => {
                tracing::info!(worker = id, "worker left");
                format!("worker {id} left")
            }
        };
        let Some((job, generation, _)) = w.group else {
            return;
        };
        let Some(j) = self.jobs.get_mut(&job) else {
            return;
        };
        if j.generation != generation || j.state.ended() {
            return;
        }
        // Dissolve the group: survivors rejoin and the job resumes from its last checkpoint.
        j.state = JobState::Recovering;
        j.message = format!(
            "{who}; resuming from {}",
            j.checkpoint
                .as_ref()
                .map_or("the start".to_string(), |c| format!(
                    "the checkpoint after epoch {} at step {}",
                    c.epochs_done, c.step
                ))
        );
        j.lost_at = Some(now);
        j.ends_after = None;
        j.epochs_done = j.checkpoint.as_ref().map_or(0, |c| c.epochs_done);
        j.epoch_cells.retain(|&e, _| e < j.epochs_done);
        self.release(job);
        self.queue.push_front(job);
    }

    /// Frees a job's workers (they will be told to rejoin or stop).
    fn release(&mut self, job: JobId) {
        let Some(j) = self.jobs.get_mut(&job) else {
            return;
        };
        j.generation += 1;
        j.done.clear();
        for m in std::mem::take(&mut j.members) {
            if let Some(w) = self.workers.get_mut(&m) {
                w.group = None;
                w.pending = Some(if j.state.ended() {
                    Directive::Stop
                } else {
                    Directive::Rejoin
                });
            }
        }
    }

    /// Gives queued jobs, in order, groups from the waiting workers.
    fn form_groups(&mut self, now: Millis) {
        let grace = self.config.regroup_grace_ms;
        let mut still_queued = VecDeque::new();
        while let Some(job) = self.queue.pop_front() {
            let Some(j) = self.jobs.get(&job) else {
                continue;
            };
            if j.state.ended() {
                continue;
            }
            let waiting: BTreeSet<WorkerId> = self
                .workers
                .iter()
                .filter(|(_, w)| w.waiting && w.group.is_none())
                .map(|(&id, _)| id)
                .collect();
            // A recovering job takes fewer ranks once the grace for a replacement is over.
            let wanted = match j.lost_at {
                Some(at) if now.saturating_sub(at) >= grace && !waiting.is_empty() => {
                    (waiting.len() as u32).min(j.world)
                }
                _ => j.world,
            };
            if (waiting.len() as u32) < wanted {
                still_queued.push_back(job);
                continue;
            }
            let members: Vec<WorkerId> = waiting.into_iter().take(wanted as usize).collect();
            let j = self.jobs.get_mut(&job).expect("the job was found above");
            j.generation += 1;
            j.world = wanted;
            j.lost_at = None;
            j.state = JobState::Starting;
            j.done.clear();
            j.members = members.clone();
            let generation = j.generation;
            for (rank, m) in members.iter().enumerate() {
                let w = self
                    .workers
                    .get_mut(m)
                    .expect("members are registered workers");
                w.waiting = false;
                w.pending = None;
                w.group = Some((job, generation, rank as u32));
            }
        }
        self.queue = still_queued;
    }

    /// The invariants, checked by the simulation after every event; returns what is violated.
    pub fn check(&self) -> Result<(), String> {
        let mut placed = BTreeSet::new();
        for (&id, j) in &self.jobs {
            if j.state.ended() && !j.members.is_empty() {
                return Err(format!("job {id} ended with members"));
            }
            for (rank, m) in j.members.iter().enumerate() {
                let w = self
                    .workers
                    .get(m)
                    .ok_or(format!("job {id}: member {m} is not registered"))?;
                if w.group != Some((id, j.generation, rank as u32)) {
                    return Err(format!(
                        "job {id}: member {m} thinks it is in {:?}",
                        w.group
                    ));
                }
                if !placed.insert(*m) {
                    return Err(format!("worker {m} is in two groups"));
                }
            }
            if let Some((&e, &c)) = j
                .epoch_cells
                .iter()
                .find(|&(_, &c)| c != j.spec.train_cells)
            {
                return Err(format!(
                    "job {id}: epoch {e} counted {c} cells of {}",
                    j.spec.train_cells
                ));
            }
            if j.epoch_cells.len() as u32 != j.epochs_done
                || j.epoch_cells.keys().copied().ne(0..j.epochs_done)
            {
                return Err(format!(
                    "job {id}: {} epochs done but cells counted for {:?}",
                    j.epochs_done,
                    j.epoch_cells.keys().collect::<Vec<_>>()
                ));
            }
            if j.checkpoint
                .as_ref()
                .is_some_and(|c| c.epochs_done > j.epochs_done)
            {
                return Err(format!(
                    "job {id}: checkpoint ahead of the completed epochs"
                ));
            }
        }
        for (&id, w) in &self.workers {
            if let Some((job, g, _)) = w.group
                && self
                    .jobs
                    .get(&job)
                    .is_none_or(|j| j.generation != g || !j.members.contains(&id))
            {
                return Err(format!("worker {id} points at a group that is gone"));
            }
        }
        Ok(())
    }
}
