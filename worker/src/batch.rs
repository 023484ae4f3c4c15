//! The one adapter from loader minibatches to the model's input: per modality the CSR rows and
//! which cells measured it, one-hot batch covariates, and what the heads read. Training,
//! validation, query fine-tuning and `Encode` all build a [`ModelBatch`] and hand the model its
//! [`ModelBatch::with`] view, so the model sees the same form whatever the caller.

use tessera_data::Csr;
use tessera_kernels::ops::linear::CsrRef;
use tessera_models::{ModalityCounts, Supervision, Survival, VaeBatch};

/// One modality's rows in the model's feature order.
#[derive(Debug)]
pub(crate) struct ModalityRows {
    pub counts: Csr,
    /// Which cells measured the modality; None when all did.
    pub present: Option<Vec<bool>>,
}

impl ModalityRows {
    /// `counts` with `present` kept only when some cell lacks the modality.
    pub fn new(counts: Csr, present: Vec<bool>) -> ModalityRows {
        let partial = !present.iter().all(|&p| p);
        ModalityRows {
            counts,
            present: partial.then_some(present),
        }
    }
}

/// Rows of a minibatch in the model's input form (host memory).
#[derive(Debug)]
pub(crate) struct ModelBatch {
    pub rows: usize,
    pub modalities: Vec<ModalityRows>,
    /// rows × covariates, row-major: a one-hot batch (all zero for an unknown batch).
    pub covariates: Vec<f32>,
    /// Label codes (-1 unlabelled); None when the caller trains no head on them.
    pub labels: Option<Vec<i32>>,
    /// rows × targets, row-major (empty without a regression head).
    pub targets: Vec<f64>,
    /// Survival times and events (empty without a Cox head).
    pub times: Vec<f64>,
    pub events: Vec<bool>,
}

/// rows × `n_cov` one-hot rows: row i has a 1 in `column(i)`'s column, if any.
pub(crate) fn one_hot(
    rows: usize,
    n_cov: usize,
    column: impl Fn(usize) -> Option<usize>,
) -> Vec<f32> {
    let mut covariates = vec![0f32; rows * n_cov];
    for r in 0..rows {
        if let Some(c) = column(r).filter(|&c| c < n_cov) {
            covariates[r * n_cov + c] = 1.0;
        }
    }
    covariates
}

impl ModelBatch {
    /// Calls `f` with the model's view of these rows.
    pub fn with<R>(&self, f: impl FnOnce(VaeBatch<'_, f32>) -> R) -> R {
        let modalities: Vec<ModalityCounts<'_, f32>> = self
            .modalities
            .iter()
            .map(|m| ModalityCounts {
                counts: CsrRef {
                    rows: self.rows,
                    cols: m.counts.n_cols,
                    indptr: &m.counts.indptr,
                    indices: &m.counts.indices,
                    data: &m.counts.data,
                },
                present: m.present.as_deref(),
            })
            .collect();
        let supervision = Supervision {
            labels: self.labels.as_deref(),
            targets: (!self.targets.is_empty()).then_some(self.targets.as_slice()),
            survival: (!self.times.is_empty()).then_some(Survival {
                times: &self.times,
                events: &self.events,
            }),
        };
        f(VaeBatch::new(&modalities, &self.covariates).with_supervision(supervision))
    }
}
