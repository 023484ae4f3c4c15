//! The gRPC face of the state machine: requests are validated (a bad one gets a status naming
//! the field and what was expected), turned into state-machine calls with the time since start,
//! and answered. `Join` and `WatchJob` wait on a version counter bumped after every change; a
//! ticker drives heartbeat timeouts.

use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tessera_proto::v1 as pb;
use tessera_proto::v1::coordinator_server::{Coordinator as CoordinatorRpc, CoordinatorServer};
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::state::{
    Checkpoint, Config, Coordinator, Directive, EpochSummary, JobId, JobSpec, JobState, Millis,
    Progress, Snapshot, StateError, WorkerId,
};

/// Requests larger than this are refused (a JobSpec carries a config, not data).
pub const MAX_REQUEST_BYTES: usize = 1 << 20;
/// The longest a `Join` waits before answering `assigned = false`.
pub const MAX_JOIN_WAIT: Duration = Duration::from_secs(60);

/// Checks a submitted job before it is queued: the data opens, the configuration parses, and
/// how many cells an epoch trains. Supplied by the binary (the coordinator crate reads no data).
pub type Validate = Arc<dyn Fn(&pb::JobSpec) -> Result<ValidJob, String> + Send + Sync>;

#[derive(Debug, Clone, PartialEq)]
pub struct ValidJob {
    pub train_cells: u64,
    pub epochs: u32,
}

#[derive(Clone)]
pub struct Service {
    state: Arc<Mutex<Coordinator>>,
    started: Instant,
    changed: watch::Sender<u64>,
    validate: Validate,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("started", &self.started)
            .finish_non_exhaustive()
    }
}

impl Service {
    pub fn new(config: Config, validate: Validate) -> Service {
        Service::restored(Coordinator::new(config), validate)
    }

    /// A service over a coordinator restored from its records (`Coordinator::restore`, with
    /// the time 0: the service's clock starts now).
    pub fn restored(coordinator: Coordinator, validate: Validate) -> Service {
        Service {
            state: Arc::new(Mutex::new(coordinator)),
            started: Instant::now(),
            changed: watch::channel(0).0,
            validate,
        }
    }

    /// The state to persist after changes.
    pub fn snapshot(&self) -> Snapshot {
        self.with(Coordinator::snapshot)
    }

    /// Notified after every change of the state.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// The tonic server for this service, with the request size limit.
    pub fn server(self) -> CoordinatorServer<Service> {
        CoordinatorServer::new(self).max_decoding_message_size(MAX_REQUEST_BYTES)
    }

    /// Drives heartbeat timeouts and regrouping until the returned task is dropped or aborted.
    pub fn spawn_ticker(&self) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        let period =
            Duration::from_millis((this.with(|c| c.config().heartbeat_interval_ms) / 2).max(10));
        tokio::spawn(async move {
            let mut every = tokio::time::interval(period);
            loop {
                every.tick().await;
                this.change(|c, now| c.tick(now));
            }
        })
    }

    fn now(&self) -> Millis {
        self.started.elapsed().as_millis() as Millis
    }

    fn with<R>(&self, f: impl FnOnce(&Coordinator) -> R) -> R {
        f(&self.state.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Applies `f` to the state and wakes every waiting `Join` and `WatchJob`.
    fn change<R>(&self, f: impl FnOnce(&mut Coordinator, Millis) -> R) -> R {
        let now = self.now();
        let out = f(
            &mut self.state.lock().unwrap_or_else(PoisonError::into_inner),
            now,
        );
        self.changed.send_modify(|v| *v += 1);
        out
    }

    fn status(&self, job: JobId) -> Result<pb::JobStatus, Status> {
        let now = self.now();
        self.with(|c| {
            let j = c.job(job).map_err(status_of)?;
            let workers = c
                .members(now, job)
                .map_err(status_of)?
                .into_iter()
                .enumerate()
                .map(|(rank, (id, device, age, cells))| pb::WorkerState {
                    worker_id: worker_name(id),
                    rank: rank as u32,
                    device,
                    heartbeat_age_seconds: age as f64 / 1e3,
                    cells_this_epoch: cells,
                })
                .collect();
            Ok(pb::JobStatus {
                job_id: job_name(job),
                state: state_of(j.state) as i32,
                epoch: j.epochs_done,
                epochs: j.spec.epochs,
                step: j.step,
                generation: j.generation,
                workers,
                message: j.message.clone(),
                last_checkpoint: j
                    .checkpoint
                    .as_ref()
                    .map(|c| c.location.clone())
                    .unwrap_or_default(),
                train: j.summary.map(|s| terms_of(&s.train)),
                validation: j.summary.and_then(|s| s.validation).map(|v| terms_of(&v)),
                cells_per_second: j.summary.map_or(0.0, |s| s.cells_per_second),
            })
        })
    }
}

fn terms_of(t: &[f64; 5]) -> pb::LossTerms {
    pb::LossTerms {
        loss: t[0],
        reconstruction: t[1],
        kl: t[2],
        regularization: t[3],
        supervised: t[4],
    }
}

fn terms_from(t: &pb::LossTerms) -> [f64; 5] {
    [
        t.loss,
        t.reconstruction,
        t.kl,
        t.regularization,
        t.supervised,
    ]
}

fn worker_name(id: WorkerId) -> String {
    format!("w{id}")
}

fn job_name(id: JobId) -> String {
    format!("job-{id}")
}

/// `w<number>` → the worker id, or InvalidArgument naming the field.
fn parse_worker(field: &str, name: &str) -> Result<WorkerId, Status> {
    name.strip_prefix('w')
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| {
            Status::invalid_argument(format!(
                "{field}: expected a worker id like \"w3\" (from Register), got {name:?}"
            ))
        })
}

fn parse_job(field: &str, name: &str) -> Result<JobId, Status> {
    name.strip_prefix("job-")
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| {
            Status::invalid_argument(format!(
                "{field}: expected a job id like \"job-1\" (from SubmitJob), got {name:?}"
            ))
        })
}

fn status_of(e: StateError) -> Status {
    match e {
        StateError::UnknownWorker(_) | StateError::UnknownJob(_) => {
            Status::not_found(e.to_string())
        }
        StateError::BadWorldSize { .. } => Status::invalid_argument(e.to_string()),
        StateError::Stale { .. } => Status::failed_precondition(e.to_string()),
    }
}

fn state_of(s: JobState) -> pb::job_status::State {
    use pb::job_status::State;
    match s {
        JobState::Queued => State::Queued,
        JobState::Starting => State::Starting,
        JobState::Running => State::Running,
        JobState::Recovering => State::Recovering,
        JobState::Succeeded => State::Succeeded,
        JobState::Failed => State::Failed,
        JobState::Cancelled => State::Cancelled,
    }
}

/// Equal but for the heartbeat ages, which change with every tick.
fn same_status(a: &pb::JobStatus, b: &pb::JobStatus) -> bool {
    let ageless = |s: &pb::JobStatus| pb::JobStatus {
        workers: s
            .workers
            .iter()
            .map(|w| pb::WorkerState {
                heartbeat_age_seconds: 0.0,
                ..w.clone()
            })
            .collect(),
        ..s.clone()
    };
    ageless(a) == ageless(b)
}

type StatusStream = Pin<Box<dyn futures::Stream<Item = Result<pb::JobStatus, Status>> + Send>>;

#[tonic::async_trait]
impl CoordinatorRpc for Service {
    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterReply>, Status> {
        let r = request.into_inner();
        // host:port, port a number: what the ring's previous rank will connect to.
        let well_formed = r
            .ring_address
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
        if !well_formed {
            return Err(Status::invalid_argument(format!(
                "ring_address: expected host:port, got {:?}",
                r.ring_address
            )));
        }
        let device = if r.device.is_empty() {
            "cpu".to_string()
        } else {
            r.device
        };
        let id = self.change(|c, now| c.register(now, r.ring_address, device));
        let config = self.with(|c| c.config().clone());
        tracing::info!(worker = id, "registered");
        Ok(Response::new(pb::RegisterReply {
            worker_id: worker_name(id),
            heartbeat_interval_ms: config.heartbeat_interval_ms,
            heartbeat_timeout_ms: config.heartbeat_timeout_ms,
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatReply>, Status> {
        let r = request.into_inner();
        let worker = parse_worker("worker_id", &r.worker_id)?;
        let directive = match self.change(|c, now| c.heartbeat(now, worker, r.generation)) {
            Directive::Continue => pb::heartbeat_reply::Directive::Continue,
            Directive::Rejoin => pb::heartbeat_reply::Directive::Rejoin,
            Directive::Stop => pb::heartbeat_reply::Directive::Stop,
            Directive::Register => pb::heartbeat_reply::Directive::Register,
        };
        Ok(Response::new(pb::HeartbeatReply {
            directive: directive as i32,
        }))
    }

    async fn join(
        &self,
        request: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::Assignment>, Status> {
        let r = request.into_inner();
        let worker = parse_worker("worker_id", &r.worker_id)?;
        let deadline =
            tokio::time::Instant::now() + Duration::from_millis(r.wait_ms).min(MAX_JOIN_WAIT);
        let mut changes = self.changed.subscribe();
        loop {
            let placed = self
                .change(|c, now| c.join(now, worker))
                .map_err(status_of)?;
            // Our own change is not news; a change between the call and here is seen at the
            // ticker's next bump at the latest.
            changes.borrow_and_update();
            if let Some(a) = placed {
                let resume = a.resume_from.clone();
                return Ok(Response::new(pb::Assignment {
                    assigned: true,
                    job_id: job_name(a.job),
                    generation: a.generation,
                    rank: a.rank,
                    world_size: a.world_size,
                    peers: a.peers,
                    nccl_unique_id: Vec::new(),
                    spec: Some(pb::JobSpec {
                        data_url: a.spec.data_url,
                        config_toml: a.spec.config_toml,
                        world_size: a.spec.world_size,
                        batch_key: a.spec.batch_key,
                        label_key: a.spec.label_key,
                        output_url: a.spec.output_url,
                        modalities: a.spec.modalities,
                        embedding_key: a.spec.embedding_key,
                        prediction_key: a.spec.prediction_key,
                        overwrite: a.spec.overwrite,
                        network_toml: a.spec.network_toml,
                        resume: None,
                        device: a.spec.device,
                        layer: a.spec.layer,
                        categorical_covariate_keys: a.spec.categorical_covariate_keys,
                        continuous_covariate_keys: a.spec.continuous_covariate_keys,
                        unlabeled_category: a.spec.unlabeled_category,
                        init_from: a.spec.init_from,
                    }),
                    resume_from: resume
                        .as_ref()
                        .map(|c| c.location.clone())
                        .unwrap_or_default(),
                    start_epoch: resume.map_or(0, |c| c.epochs_done),
                }));
            }
            // Woken by any change (a worker joined, a job was submitted) or the deadline.
            if tokio::time::timeout_at(deadline, changes.changed())
                .await
                .is_err()
            {
                return Ok(Response::new(pb::Assignment {
                    assigned: false,
                    ..pb::Assignment::default()
                }));
            }
        }
    }

    async fn report_progress(
        &self,
        request: Request<pb::ProgressReport>,
    ) -> Result<Response<pb::Ack>, Status> {
        let r = request.into_inner();
        let worker = parse_worker("worker_id", &r.worker_id)?;
        let job = parse_job("job_id", &r.job_id)?;
        let summary = r.train.as_ref().map(|t| EpochSummary {
            train: terms_from(t),
            validation: r.validation.as_ref().map(terms_from),
            cells_per_second: r.cells_per_second,
        });
        let failure = (!r.error.is_empty()).then_some(r.error);
        let p = Progress {
            job,
            generation: r.generation,
            epoch: r.epoch,
            step: r.step,
            cells: r.cells,
            epoch_done: r.epoch_done,
            last: r.last,
            failure,
            summary,
        };
        self.change(|c, now| c.progress(now, worker, &p))
            .map_err(status_of)?;
        Ok(Response::new(pb::Ack {}))
    }

    async fn announce_checkpoint(
        &self,
        request: Request<pb::CheckpointAnnouncement>,
    ) -> Result<Response<pb::Ack>, Status> {
        let r = request.into_inner();
        let worker = parse_worker("worker_id", &r.worker_id)?;
        let job = parse_job("job_id", &r.job_id)?;
        if r.location.is_empty() {
            return Err(Status::invalid_argument(
                "location: expected the checkpoint's object-store location, got an empty string",
            ));
        }
        let c = Checkpoint {
            epochs_done: r.epochs_done,
            step: r.step,
            location: r.location,
        };
        self.change(|s, now| s.checkpoint(now, worker, job, r.generation, c))
            .map_err(status_of)?;
        Ok(Response::new(pb::Ack {}))
    }

    async fn leave(&self, request: Request<pb::LeaveRequest>) -> Result<Response<pb::Ack>, Status> {
        let worker = parse_worker("worker_id", &request.into_inner().worker_id)?;
        self.change(|s, now| s.leave(now, worker))
            .map_err(status_of)?;
        Ok(Response::new(pb::Ack {}))
    }

    async fn submit_job(
        &self,
        request: Request<pb::JobSpec>,
    ) -> Result<Response<pb::JobHandle>, Status> {
        let spec = request.into_inner();
        if spec.data_url.is_empty() {
            return Err(Status::invalid_argument(
                "data_url: expected a store path or URL, got an empty string",
            ));
        }
        if spec.world_size == 0 {
            return Err(Status::invalid_argument(
                "world_size: expected at least 1 worker, got 0",
            ));
        }
        // Opening the store and parsing the configuration block: off the async threads.
        let validate = Arc::clone(&self.validate);
        let checked = spec.clone();
        let valid = tokio::task::spawn_blocking(move || validate(&checked))
            .await
            .map_err(|e| Status::internal(format!("validating the job: {e}")))?
            .map_err(Status::invalid_argument)?;
        let resume = match spec.resume {
            Some(r) if r.location.is_empty() => {
                return Err(Status::invalid_argument(
                    "resume.location: expected the checkpoint's location, got an empty string",
                ));
            }
            Some(r) => Some(Checkpoint {
                epochs_done: r.epochs_done,
                step: r.step,
                location: r.location,
            }),
            None => None,
        };
        let job = JobSpec {
            data_url: spec.data_url,
            config_toml: spec.config_toml,
            world_size: spec.world_size,
            batch_key: spec.batch_key,
            label_key: spec.label_key,
            output_url: spec.output_url,
            modalities: spec.modalities,
            embedding_key: spec.embedding_key,
            prediction_key: spec.prediction_key,
            overwrite: spec.overwrite,
            network_toml: spec.network_toml,
            device: spec.device,
            layer: spec.layer,
            categorical_covariate_keys: spec.categorical_covariate_keys,
            continuous_covariate_keys: spec.continuous_covariate_keys,
            unlabeled_category: spec.unlabeled_category,
            init_from: spec.init_from,
            train_cells: valid.train_cells,
            epochs: valid.epochs,
        };
        let id = self
            .change(|c, _| c.submit_from(job, resume))
            .map_err(status_of)?;
        tracing::info!(job = id, "submitted");
        Ok(Response::new(pb::JobHandle {
            job_id: job_name(id),
        }))
    }

    type WatchJobStream = StatusStream;

    async fn watch_job(
        &self,
        request: Request<pb::JobHandle>,
    ) -> Result<Response<StatusStream>, Status> {
        let job = parse_job("job_id", &request.into_inner().job_id)?;
        let first = self.status(job)?;
        let this = self.clone();
        let mut changes = self.changed.subscribe();
        changes.borrow_and_update();
        // State: (status to send first, last status sent, change notifications).
        let stream = futures::stream::unfold(
            (Some(first), None::<pb::JobStatus>, changes),
            move |(pending, last, mut changes)| {
                let this = this.clone();
                async move {
                    if let Some(s) = pending {
                        return Some((Ok(s.clone()), (None, Some(s), changes)));
                    }
                    let ended = last.as_ref().is_some_and(|s| {
                        matches!(
                            pb::job_status::State::try_from(s.state),
                            Ok(pb::job_status::State::Succeeded
                                | pb::job_status::State::Failed
                                | pb::job_status::State::Cancelled)
                        )
                    });
                    if ended {
                        return None;
                    }
                    // The next status that differs from the last one sent.
                    loop {
                        changes.changed().await.ok()?;
                        match this.status(job) {
                            Ok(s) if last.as_ref().is_none_or(|l| !same_status(l, &s)) => {
                                return Some((Ok(s.clone()), (None, Some(s), changes)));
                            }
                            Ok(_) => {}
                            Err(e) => return Some((Err(e), (None, last, changes))),
                        }
                    }
                }
            },
        );
        Ok(Response::new(Box::pin(stream)))
    }

    async fn cancel_job(
        &self,
        request: Request<pb::JobHandle>,
    ) -> Result<Response<pb::Ack>, Status> {
        let job = parse_job("job_id", &request.into_inner().job_id)?;
        self.change(|c, _| c.cancel(job)).map_err(status_of)?;
        Ok(Response::new(pb::Ack {}))
    }
}
