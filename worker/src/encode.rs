//! Encoding cells of known batches with a reference model as trained (what the atlas service's
//! `Encode` answers): latent means, and optionally labels transferred from the reference by a
//! weighted kNN. Encoders are pooled so concurrent calls neither wait on one model nor rebuild
//! one per call.

use std::sync::{Mutex, PoisonError};

use tessera_kernels::backend::{Cpu, Cuda};
use tessera_models::Vae;

use crate::collective::TrainBackend;
use crate::device::Device;
use crate::query::{Cells, QueryError, ReferenceModel};

#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error(transparent)]
    Query(#[from] QueryError),
    /// Labels were asked for, but the reference was trained without a label key.
    #[error("the reference has no labels to transfer")]
    NoReferenceLabels,
}

/// What one encode call returns.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    /// Cells x `n_latent`, row-major.
    pub latent: Vec<f32>,
    pub n_latent: usize,
    /// One reference label per cell, with its uncertainty; empty unless labels were asked for.
    pub labels: Vec<String>,
    pub uncertainty: Vec<f64>,
}

/// `$body` with a pooled model `$e` of the pool's device.
macro_rules! on_device {
    ($pool:ident, |$e:ident| $body:expr) => {
        match &$pool.encoders {
            Encoders::Cpu(pool) => $pool.pooled(Cpu, pool, |$e| $body),
            Encoders::Cuda(gpu, pool) => $pool.pooled(gpu.clone(), pool, |$e| $body),
        }
    };
}

/// A reference model with a pool of encoders (one per concurrent call, built on demand; at
/// most `max_idle` kept between calls, so a burst of calls does not hold its encoders forever)
/// on one device.
pub struct EncoderPool {
    pub model: ReferenceModel,
    encoders: Encoders,
    max_idle: usize,
}

/// The pooled encoders, on the device chosen when the pool was made.
enum Encoders {
    Cpu(Mutex<Vec<Vae<f32, Cpu>>>),
    Cuda(Cuda, Mutex<Vec<Vae<f32, Cuda>>>),
}

impl std::fmt::Debug for EncoderPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EncoderPool")
            .field("model", &self.model)
            .finish_non_exhaustive()
    }
}

impl EncoderPool {
    /// Encoders on `device` (a GPU is opened now: a missing one is an error here, not at the
    /// first call).
    pub fn on(model: ReferenceModel, device: Device) -> Result<EncoderPool, QueryError> {
        let encoders = match device {
            Device::Cpu => Encoders::Cpu(Mutex::default()),
            Device::Cuda(_) => Encoders::Cuda(device.cuda(false)?, Mutex::default()),
        };
        // One per core: more concurrent calls than cores gain nothing from a kept encoder.
        let max_idle = std::thread::available_parallelism().map_or(1, |n| n.get());
        Ok(EncoderPool {
            model,
            encoders,
            max_idle,
        })
    }

    /// Keep at most `max_idle` encoders between calls (at least one).
    pub fn with_max_idle(mut self, max_idle: usize) -> EncoderPool {
        self.max_idle = max_idle.max(1);
        self
    }

    /// Encoders kept between calls now.
    pub fn idle(&self) -> usize {
        match &self.encoders {
            Encoders::Cpu(pool) => pool.lock().unwrap_or_else(PoisonError::into_inner).len(),
            Encoders::Cuda(_, pool) => pool.lock().unwrap_or_else(PoisonError::into_inner).len(),
        }
    }

    /// Latent means of `cells` with the reference model as trained.
    pub fn latent(&self, cells: &Cells) -> Result<Vec<f32>, QueryError> {
        on_device!(self, |e| self.model.encode(e, cells))
    }

    /// Latent means of `cells` and each modality's expression at them
    /// ([`ReferenceModel::expression`]).
    pub fn expression(
        &self,
        cells: &Cells,
        library_size: f64,
    ) -> Result<(Vec<f32>, Vec<Vec<f32>>), QueryError> {
        on_device!(self, |e| self.model.expression(e, cells, library_size))
    }

    /// `n_samples` seeded draws from each cell's posterior
    /// ([`ReferenceModel::posterior_samples`]).
    pub fn posterior_samples(
        &self,
        cells: &Cells,
        n_samples: usize,
        seed: u64,
    ) -> Result<Vec<Vec<f32>>, QueryError> {
        on_device!(self, |e| self
            .model
            .posterior_samples(e, cells, n_samples, seed))
    }

    /// Each modality's expression at posterior draws, averaged or each draw's
    /// ([`ReferenceModel::expression_sampled`]).
    pub fn expression_sampled(
        &self,
        cells: &Cells,
        library_size: f64,
        n_samples: usize,
        seed: u64,
        mean: bool,
    ) -> Result<Vec<Vec<f32>>, QueryError> {
        on_device!(self, |e| self.model.expression_sampled(
            e,
            cells,
            library_size,
            n_samples,
            seed,
            mean
        ))
    }

    /// The label classifier's probabilities for `cells` ([`ReferenceModel::probabilities`]).
    pub fn probabilities(&self, cells: &Cells) -> Result<Option<Vec<f32>>, QueryError> {
        on_device!(self, |e| self.model.probabilities(e, cells))
    }

    /// `run` with a model taken from `pool` (or built) and given back.
    fn pooled<B: TrainBackend, R>(
        &self,
        device: B,
        pool: &Mutex<Vec<Vae<f32, B>>>,
        run: impl FnOnce(&mut Vae<f32, B>) -> Result<R, QueryError>,
    ) -> Result<R, QueryError> {
        let pooled = pool.lock().unwrap_or_else(PoisonError::into_inner).pop();
        let mut encoder = match pooled {
            Some(e) => e,
            None => self.model.encoder(device)?,
        };
        let result = run(&mut encoder);
        let mut idle = pool.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < self.max_idle {
            idle.push(encoder);
        }
        result
    }

    /// Latent means of `cells`, and with `transfer = Some(k)` the reference label of each cell
    /// by its `k` nearest reference cells (scArches' weighted kNN).
    pub fn encode(&self, cells: &Cells, transfer: Option<usize>) -> Result<Encoded, EncodeError> {
        let latent = self.latent(cells)?;
        let reference = &self.model.reference;
        let mut encoded = Encoded {
            latent,
            n_latent: reference.n_latent,
            labels: Vec::new(),
            uncertainty: Vec::new(),
        };
        let Some(k) = transfer else {
            return Ok(encoded);
        };
        if reference.labels.is_empty() {
            return Err(EncodeError::NoReferenceLabels);
        }
        let transferred = tessera_metrics::transfer::knn_transfer(
            &reference.latent,
            &reference.labels,
            &encoded.latent,
            reference.n_latent,
            k,
        )
        .map_err(QueryError::from)?;
        let name = |label: i32| {
            usize::try_from(label)
                .ok()
                .and_then(|c| reference.label_categories.get(c))
                .cloned()
                .unwrap_or_default()
        };
        encoded.labels = transferred.iter().map(|t| name(t.label)).collect();
        encoded.uncertainty = transferred.iter().map(|t| t.uncertainty).collect();
        Ok(encoded)
    }
}
