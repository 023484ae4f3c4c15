//! Encoding cells of known batches with a reference model as trained (what the atlas service's
//! `Encode` answers): latent means, and optionally labels transferred from the reference by a
//! weighted kNN. Encoders are pooled so concurrent calls neither wait on one model nor rebuild
//! one per call.

use std::sync::{Mutex, PoisonError};

use tessera_kernels::backend::Cpu;
use tessera_models::Vae;

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

/// A reference model with a pool of encoders (one per concurrent call, built on demand, kept).
pub struct EncoderPool {
    pub model: ReferenceModel,
    encoders: Mutex<Vec<Vae<f32, Cpu>>>,
}

impl std::fmt::Debug for EncoderPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EncoderPool")
            .field("model", &self.model)
            .finish_non_exhaustive()
    }
}

impl EncoderPool {
    pub fn new(model: ReferenceModel) -> EncoderPool {
        EncoderPool {
            model,
            encoders: Mutex::new(Vec::new()),
        }
    }

    /// Latent means of `cells` with the reference model as trained.
    pub fn latent(&self, cells: &Cells) -> Result<Vec<f32>, QueryError> {
        let pooled = self
            .encoders
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        let mut encoder = match pooled {
            Some(e) => e,
            None => self.model.encoder()?,
        };
        let z = self.model.encode(&mut encoder, cells);
        self.encoders
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(encoder);
        z
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
