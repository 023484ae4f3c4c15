//! tessera-coordinator: the control plane of distributed training.
//!
//! `state` is the whole decision logic (membership, heartbeat timeouts, job queue, group
//! formation with generations, epoch cell accounting, checkpoint bookkeeping, recovery) as a
//! pure state machine: no I/O, no clock. `service` is the gRPC face (tonic): it validates
//! requests, feeds them to the state machine with the time, and answers.
//!
//! Invariant: nothing here reads data or touches a model; a worker's gradients never pass
//! through the coordinator.

pub mod service;
pub mod state;

pub use service::{Service, ValidJob, Validate};
pub use state::{
    Assignment, Checkpoint, Config, Coordinator, Directive, EpochSummary, Job, JobId, JobRecord,
    JobSpec, JobState, Millis, Progress, Snapshot, StateError, WorkerId,
};
