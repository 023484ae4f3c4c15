//! tessera-coordinator: the control plane of distributed training.
//!
//! `state` is the whole decision logic (membership, heartbeat timeouts, job queue, group
//! formation with generations, epoch cell accounting, checkpoint bookkeeping, recovery) as a
//! pure state machine: no I/O, no clock. The gRPC service feeds it requests and the time.
//!
//! Invariant: nothing here reads data or touches a model; a worker's gradients never pass
//! through the coordinator.

pub mod state;

pub use state::{Assignment, Checkpoint, Config, Coordinator, Directive, Job, JobId, JobSpec, JobState, Millis, Progress, StateError, WorkerId};
