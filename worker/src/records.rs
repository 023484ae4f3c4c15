//! What every stage of training shares and reports: the training error, an epoch's record and
//! where its steps spent their time. Kept apart from `fit` so that checkpoints, the parallel
//! step and plots depend on these records, not on the training loop.

use serde::{Deserialize, Serialize};
use tessera_models::{LossTerms, TrainError};

#[derive(Debug, thiserror::Error)]
pub enum FitError {
    #[error(transparent)]
    Data(#[from] tessera_data::DataError),
    #[error(transparent)]
    Train(#[from] TrainError),
    #[error("configuration {file}: {reason}")]
    Config { file: String, reason: String },
    /// The device asked for cannot be used: what was looked for and not found.
    #[error("device {device}: {reason}")]
    Device { device: String, reason: String },
    #[error("{store}: {reason}")]
    Input { store: String, reason: String },
    #[error("writing {path}: {reason}")]
    Output { path: String, reason: String },
    #[error("checkpoint {path}: {reason}")]
    Checkpoint { path: String, reason: String },
    #[error(transparent)]
    Ring(#[from] crate::ring::RingError),
    /// The GPUs' collective failed (a lost peer, a missing library).
    #[error(transparent)]
    Nccl(#[from] crate::nccl::NcclError),
    /// The coordinator re-formed the group or ended the job: not a failure of training.
    #[error("interrupted in epoch {epoch} after step {step}: the job's group changed")]
    Interrupted { epoch: usize, step: u64 },
    /// A rank was asked to stop (SIGTERM): every rank stopped after the same step and rank 0
    /// checkpointed it. `here`: this rank was the one asked.
    #[error("stopped on request in epoch {epoch} after step {step}; checkpoint {checkpoint}")]
    Stopped {
        epoch: usize,
        step: u64,
        checkpoint: String,
        here: bool,
    },
}

impl From<tessera_kernels::backend::EngineError> for FitError {
    fn from(e: tessera_kernels::backend::EngineError) -> Self {
        FitError::Train(e.into())
    }
}

/// A GPU's error outside the engine's ops (a step's graph, its fixed buffers).
impl From<tessera_kernels::cuda::CudaError> for FitError {
    fn from(e: tessera_kernels::cuda::CudaError) -> Self {
        tessera_kernels::backend::EngineError::from(e).into()
    }
}

/// One epoch's record (losses are means over cells).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    pub epoch: usize,
    pub kl_weight: f64,
    pub lr: f64,
    pub train: LossTerms,
    pub validation: Option<LossTerms>,
    /// Wall time of the epoch: training steps and the validation pass.
    pub seconds: f64,
    pub cells_per_second: f64,
    /// Where this rank's training steps spent the epoch (rank 0's, in a distributed job).
    #[serde(default)]
    pub steps: StepTimes,
}

/// Seconds of an epoch spent computing gradients and updates, in the all-reduce, and waiting
/// for the loader.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StepTimes {
    pub compute: f64,
    pub allreduce: f64,
    pub data: f64,
}
