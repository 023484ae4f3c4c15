//! The one adapter from loader minibatches to the model's input: per modality the CSR rows and
//! which cells measured it, the covariates (batch one-hot first), and what the heads read. Training,
//! validation, query fine-tuning and `Encode` all build a [`ModelBatch`] and hand the model its
//! [`ModelBatch::with`] view, so the model sees the same form whatever the caller.

use serde::{Deserialize, Serialize};
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

    /// The counts as the model reads them (`rows` cells).
    pub fn counts_ref(&self, rows: usize) -> CsrRef<'_, f32> {
        CsrRef {
            rows,
            ..csr_ref(&self.counts)
        }
    }
}

/// A loader's count matrix as the engine reads it.
pub(crate) fn csr_ref(x: &Csr) -> CsrRef<'_, f32> {
    CsrRef {
        rows: x.n_rows,
        cols: x.n_cols,
        indptr: &x.indptr,
        indices: &x.indices,
        data: &x.data,
    }
}

/// Rows of a minibatch in the model's input form (host memory).
#[derive(Debug)]
pub(crate) struct ModelBatch {
    pub rows: usize,
    pub modalities: Vec<ModalityRows>,
    /// rows × covariates, row-major ([`Covariates::rows`]).
    pub covariates: Vec<f32>,
    /// Label codes (-1 unlabelled); None when the caller trains no head on them.
    pub labels: Option<Vec<i32>>,
    /// rows × targets, row-major (empty without a regression head).
    pub targets: Vec<f64>,
    /// Survival times and events (empty without a Cox head).
    pub times: Vec<f64>,
    pub events: Vec<bool>,
}

/// The obs columns a model reads as covariates beside the batch (scvi-tools'
/// `categorical_covariate_keys` and `continuous_covariate_keys`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CovariateKeys {
    pub categorical: Vec<String>,
    pub continuous: Vec<String>,
}

/// The covariates a model trained with besides the batch: each categorical column one-hot over
/// its categories (after the batch's columns), then each continuous column's value, as
/// scvi-tools concatenates them. Recorded with the model so that new cells get the same columns.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Covariates {
    /// Each categorical obs column and its categories, in column order.
    pub categorical: Vec<(String, Vec<String>)>,
    pub continuous: Vec<String>,
}

impl Covariates {
    /// Covariate columns after the batch's.
    pub fn width(&self) -> usize {
        self.categorical.iter().map(|(_, c)| c.len()).sum::<usize>() + self.continuous.len()
    }

    /// The first continuous covariate with cells lacking a finite value, and how many: a
    /// missing value would poison every step it is in.
    pub(crate) fn first_incomplete<'a>(
        continuous: &'a [String],
        loader: &tessera_data::Loader,
    ) -> Option<(&'a str, usize)> {
        continuous
            .iter()
            .map(|key| (key.as_str(), loader.numeric_missing(key)))
            .find(|&(_, missing)| missing > 0)
    }

    pub fn keys(&self) -> CovariateKeys {
        CovariateKeys {
            categorical: self.categorical.iter().map(|(k, _)| k.clone()).collect(),
            continuous: self.continuous.clone(),
        }
    }

    /// rows × (`n_batch` + [`Covariates::width`]) covariate rows, row-major: a one-hot of
    /// `batch(r)` (all zero for an unknown batch), each categorical column's one-hot of its code
    /// in `codes` (rows × categorical keys; -1, a missing value, leaves zeros), then the
    /// continuous values of `values` (rows × continuous keys).
    pub(crate) fn rows(
        &self,
        rows: usize,
        n_batch: usize,
        batch: impl Fn(usize) -> Option<usize>,
        codes: &[i32],
        values: &[f64],
    ) -> Vec<f32> {
        let n_cov = n_batch + self.width();
        let (kc, kv) = (self.categorical.len(), self.continuous.len());
        let mut out = vec![0f32; rows * n_cov];
        for (r, row) in out.chunks_exact_mut(n_cov.max(1)).take(rows).enumerate() {
            if let Some(c) = batch(r).filter(|&c| c < n_batch) {
                row[c] = 1.0;
            }
            let mut offset = n_batch;
            for (j, (_, categories)) in self.categorical.iter().enumerate() {
                let code = usize::try_from(codes[r * kc + j]).ok();
                if let Some(c) = code.filter(|&c| c < categories.len()) {
                    row[offset + c] = 1.0;
                }
                offset += categories.len();
            }
            for (j, v) in values[r * kv..(r + 1) * kv].iter().enumerate() {
                row[offset + j] = *v as f32;
            }
        }
        out
    }
}

impl ModelBatch {
    /// The label codes as f32 (exact: codes index the label categories), as the classifier
    /// reads them on the device; None without labels.
    pub fn label_codes(&self) -> Option<Vec<f32>> {
        self.labels
            .as_ref()
            .map(|labels| labels.iter().map(|&l| l as f32).collect())
    }

    /// Calls `f` with the model's view of these rows.
    pub fn with<R>(&self, f: impl FnOnce(VaeBatch<'_, f32>) -> R) -> R {
        let modalities: Vec<ModalityCounts<'_, f32>> = self
            .modalities
            .iter()
            .map(|m| ModalityCounts {
                counts: m.counts_ref(self.rows),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn covariate_rows_are_the_batch_then_each_categorical_one_hot_then_the_values() {
        let covariates = Covariates {
            categorical: vec![
                ("donor".into(), vec!["d0".into(), "d1".into(), "d2".into()]),
                ("tech".into(), vec!["10x".into(), "ss2".into()]),
            ],
            continuous: vec!["depth".into()],
        };
        assert_eq!(covariates.width(), 6);
        // Cell 0: batch 1, d2, ss2; cell 1: unknown batch, missing donor, 10x.
        let rows = covariates.rows(
            2,
            2,
            |r| (r == 0).then_some(1),
            &[2, 1, -1, 0],
            &[0.5, -3.0],
        );
        #[rustfmt::skip]
        assert_eq!(rows, vec![
            0.0, 1.0, /* donor */ 0.0, 0.0, 1.0, /* tech */ 0.0, 1.0, /* depth */ 0.5,
            0.0, 0.0, /* donor */ 0.0, 0.0, 0.0, /* tech */ 1.0, 0.0, /* depth */ -3.0,
        ]);
        let none = Covariates::default();
        assert_eq!(
            none.rows(2, 3, |r| Some(2 - r), &[], &[]),
            vec![0., 0., 1., 0., 1., 0.]
        );
    }
}
