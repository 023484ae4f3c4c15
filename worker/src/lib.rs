//! tessera-worker: training on a store, alone (`fit`, what `tessera train` runs) or as one rank
//! of a data-parallel job (`train` with a `parallel::Placement`; `node` runs a worker process
//! under the coordinator): each step's parts' gradients are summed over the ring
//! (`ring`; `nccl` on GPUs) between [`Trainer::gradients`] and [`Trainer::apply`].
//!
//! Invariant: the worker owns the meeting of data and models (neither knows the other); it
//! turns loader minibatches into model batches and model outputs into store elements.
//!
//! [`Trainer::gradients`]: tessera_models::Trainer::gradients
//! [`Trainer::apply`]: tessera_models::Trainer::apply

mod batch;
pub mod checkpoint;
pub mod collective;
pub mod device;
pub mod encode;
mod epoch;
pub mod eval;
pub mod fit;
pub mod imported;
pub mod nccl;
pub mod network;
pub mod node;
pub mod parallel;
pub mod plot;
mod policy;
pub mod provenance;
pub mod query;
pub mod records;
pub mod reference;
pub mod replay;
mod resident;
pub mod ring;
mod tensor_file;

pub use batch::{CovariateKeys, Covariates};
pub use eval::{EvalError, EvalRequest, Evaluation, evaluate_store, write_evaluation};
pub use fit::{
    DEFAULT_CACHE_MIB, Denoised, FitConfig, FitOptions, FitReport, check_job, fit, fit_until, train,
};
pub use records::{EpochRecord, FitError, StepTimes};

/// This process's peak resident memory so far (Linux `VmHWM`), MiB; None elsewhere.
pub fn peak_memory_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}
