//! Reference-atlas query mapping (scArches' architecture surgery; scvi-tools' `load_query_data`
//! then `train`): a trained model (`model.safetensors`, `config.json`, `reference.safetensors`)
//! is extended with the query's new batches, fine-tuned on the query with everything else
//! frozen, and the query's cells are embedded and labelled by a weighted kNN on the reference's
//! latent space.
//!
//! The query's features are aligned to the reference's by name: reference features the query
//! lacks are zero, query features the reference lacks are ignored; a modality the query lacks is
//! absent in every query cell (the mosaic model encodes the others).

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};
use tessera_data::{
    AnnData, Column, Csr, Dataset, Loader, LoaderConfig, MiniBatch, ModalityBatch, Store,
};
use tessera_kernels::backend::{Cpu, In};

use crate::collective::TrainBackend;
use crate::device::Device;
/// Which layers a query job fine-tunes besides the new batches' (part of [`QueryRequest`]).
pub use tessera_models::surgery::Unfreeze;
use tessera_models::surgery::{
    BatchExtension, SurgeryError, encoder_ranges, transfer, unfrozen_ranges, warm_start,
};
use tessera_models::{
    Categories, LossTerms, TrainConfig, TrainError, Trainer, Vae, VaeBatch, VaeConfig,
};

use tessera_metrics::transfer::Transferred;

use crate::batch::{Covariates, ModalityRows, ModelBatch};
use crate::epoch::Stepper;
use crate::parallel::{PartStream, Placement, StepReducer};
use crate::reference::{REFERENCE_FILE, Reference, ReferenceError, var_names};

#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error(transparent)]
    Data(#[from] tessera_data::DataError),
    #[error(transparent)]
    Train(#[from] TrainError),
    #[error("reference model {path}: {reason}")]
    Model { path: String, reason: String },
    #[error("{store}: {reason}")]
    Input { store: String, reason: String },
    #[error(transparent)]
    Metrics(#[from] tessera_metrics::MetricsError),
    #[error(transparent)]
    Fit(#[from] crate::records::FitError),
    #[error("cancelled")]
    Cancelled,
}

impl From<tessera_kernels::backend::EngineError> for QueryError {
    fn from(e: tessera_kernels::backend::EngineError) -> Self {
        QueryError::Train(e.into())
    }
}

/// A query mapping job (the reference model is loaded apart: see [`ReferenceModel::open`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QueryRequest {
    /// The query store.
    pub data: String,
    /// The query's batch column (default: the reference's batch key).
    pub batch_key: Option<String>,
    /// Read `layers/<layer>` of each query modality instead of X (its counts).
    #[serde(default)]
    pub layer: Option<String>,
    /// Fine-tuning epochs over the query.
    pub epochs: usize,
    pub unfreeze: Unfreeze,
    /// Reference neighbours of the kNN label transfer.
    pub neighbours: usize,
    /// Where the results go in the query store; None: the store is only read (the caller takes
    /// the results from [`QueryOutput`]).
    pub write: Option<Outputs>,
    pub seed: u64,
    /// Where the query model is fine-tuned and encodes.
    #[serde(default)]
    pub device: Device,
    /// Also write the fine-tuned query model into this folder: a model folder like `tessera
    /// train --out`'s, with the query's new batches added and the query's latent as its
    /// reference cells, so it loads like any trained model (scvi-tools saves a query model too).
    #[serde(default)]
    pub model_out: Option<String>,
}

/// The elements `map_query` writes into the query store.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Outputs {
    /// The query's embedding goes to obsm/<embedding_key>.
    pub embedding_key: String,
    /// Transferred labels go to obs/<label_key>, uncertainties to obs/<label_key>_uncertainty.
    pub label_key: String,
    pub overwrite: bool,
}

/// How far a mapping has gone; the caller's answer to each decides whether it goes on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum QueryStage {
    Surgery,
    /// After each fine-tuning minibatch.
    FineTuning {
        epoch: usize,
        epochs: usize,
        cells: usize,
        n_cells: usize,
    },
    Mapping,
}

impl std::fmt::Display for QueryStage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            QueryStage::Surgery => write!(f, "surgery"),
            QueryStage::FineTuning { epoch, epochs, .. } => {
                write!(f, "fine-tuning epoch {}/{epochs}", epoch + 1)
            }
            QueryStage::Mapping => write!(f, "embedding and label transfer"),
        }
    }
}

/// How one reference modality was found in the query.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModalityAlignment {
    pub name: String,
    pub reference_features: usize,
    /// Reference features the query has.
    pub matched: usize,
    /// Reference features the query lacks (zero in every query cell).
    pub zero_filled: usize,
    /// Query features the reference does not know (not used).
    pub ignored: usize,
    /// Query cells measured in this modality.
    pub cells: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QueryReport {
    pub data: String,
    pub model: String,
    pub n_cells: usize,
    /// Query batches the reference knew (their covariate rows are the reference's).
    pub known_batches: Vec<String>,
    /// Query batches added by the surgery.
    pub new_batches: Vec<String>,
    pub modalities: Vec<ModalityAlignment>,
    pub epochs: usize,
    /// Parameters fine-tuning changed (the rest stay the reference's).
    pub trained_parameters: usize,
    pub final_loss: Option<f64>,
    /// The elements written into the query store (none when it was only read).
    pub embedding: Option<String>,
    pub labels: Option<String>,
    pub mean_uncertainty: Option<f64>,
    /// Share of query cells whose transferred label equals the query's own (when the query has
    /// the reference's label column).
    pub label_accuracy: Option<f64>,
    /// The same for the reference's label classifier, when it has one.
    pub classifier_accuracy: Option<f64>,
    pub seconds_training: f64,
    pub seconds_mapping: f64,
}

/// What a mapping produced, whether or not it was written into the store.
#[derive(Debug, Clone)]
pub struct QueryOutput {
    pub report: QueryReport,
    /// Cells x `n_latent`, row-major, in the store's cell order.
    pub embedding: Vec<f32>,
    pub n_latent: usize,
    /// Per cell, the transferred label (a code into `label_categories`, -1 none) and its
    /// uncertainty; empty when the reference has no labels.
    pub labels: Vec<Transferred>,
    pub label_categories: Vec<String>,
    /// Per cell, the reference's label classifier's prediction (a code into
    /// `label_categories`); empty when the reference has no classifier.
    pub classifier_labels: Vec<i32>,
}

/// What `tessera train` recorded of the run (`config.json`).
#[derive(Debug, Deserialize)]
struct RunRecord {
    modalities: Vec<(String, usize)>,
    batch_categories: Vec<String>,
    /// Absent in models trained before covariates beside the batch existed.
    #[serde(default)]
    covariates: Covariates,
    model: VaeConfig,
    train: TrainConfig,
}

/// A trained model as a registry or `tessera map --model` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelSummary {
    /// Each modality's name and feature count, in the model's order.
    pub modalities: Vec<(String, usize)>,
    pub batch_key: Option<String>,
    pub batches: Vec<String>,
    pub label_key: Option<String>,
    pub labels: Vec<String>,
    pub n_latent: usize,
    pub reference_cells: usize,
    /// Covariates beside the batch, with their categories.
    #[serde(default)]
    pub covariates: Covariates,
}

/// Cells to embed with a reference model as it is (no surgery: their batches must be the
/// reference's).
#[derive(Debug, Clone, Default)]
pub struct Cells {
    pub modalities: Vec<CellsModality>,
    /// One reference batch name per cell (empty when the reference has no batches).
    pub batches: Vec<String>,
    /// Per categorical covariate of the reference (in its order), one category per cell.
    pub categorical: Vec<Vec<String>>,
    /// Per continuous covariate of the reference (in its order), one value per cell.
    pub continuous: Vec<Vec<f64>>,
}

#[derive(Debug, Clone)]
pub struct CellsModality {
    pub name: String,
    /// Feature names of `counts`' columns; empty: the reference's features in its order.
    pub var_names: Vec<String>,
    /// One row per cell (empty rows for the cells that lack the modality).
    pub counts: Csr,
    /// Which cells measured the modality; empty: all of them.
    pub present: Vec<bool>,
}

pub(crate) fn model_error(
    path: impl std::fmt::Display,
    reason: impl std::fmt::Display,
) -> QueryError {
    QueryError::Model {
        path: path.to_string(),
        reason: reason.to_string(),
    }
}

/// A model after surgery and the parameter ranges surgery added.
type Surgered<B> = (Vae<f32, B>, Vec<std::ops::Range<usize>>);

/// The files of a trained model's folder.
pub const MODEL_FILES: [&str; 3] = ["config.json", "model.safetensors", REFERENCE_FILE];

/// A reference model: its run record, tensors (by name: shape and values) and latent space.
pub struct ReferenceModel {
    /// Where it was read from, for messages and reports.
    pub source: String,
    record: RunRecord,
    /// `config.json` as it was read, for the query models saved from this one.
    config: serde_json::Value,
    tensors: HashMap<String, (Vec<usize>, Vec<f32>)>,
    pub reference: Reference,
}

impl std::fmt::Debug for ReferenceModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReferenceModel")
            .field("source", &self.source)
            .field("tensors", &self.tensors.len())
            .finish_non_exhaustive()
    }
}

impl ReferenceModel {
    /// Reads the model folder at `location` (a path or URL: what `tessera train --out` wrote).
    pub fn open(location: &str) -> Result<ReferenceModel, QueryError> {
        let folder = Store::folder(location).map_err(|e| model_error(location, e))?;
        let location = location.trim_end_matches('/');
        let mut files = Vec::with_capacity(MODEL_FILES.len());
        for name in MODEL_FILES {
            let path = format!("{location}/{name}");
            let missing = if name == REFERENCE_FILE {
                "missing (models trained before query mapping existed lack it: train again)"
            } else {
                "missing"
            };
            files.push(
                folder
                    .get_bytes(name)
                    .map_err(|e| model_error(&path, e))?
                    .ok_or_else(|| model_error(&path, missing))?,
            );
        }
        ReferenceModel::from_files(location, &files[0], &files[1], &files[2])
    }

    /// A model from the contents of its three files (`source` names their folder).
    pub fn from_files(
        source: &str,
        config: &[u8],
        weights: &[u8],
        reference: &[u8],
    ) -> Result<ReferenceModel, QueryError> {
        let [config_path, weights_path, reference_path] =
            MODEL_FILES.map(|f| format!("{source}/{f}"));
        let record: RunRecord =
            serde_json::from_slice(config).map_err(|e| model_error(&config_path, e))?;
        let config: serde_json::Value =
            serde_json::from_slice(config).map_err(|e| model_error(&config_path, e))?;
        let file = SafeTensors::deserialize(weights).map_err(|e| model_error(&weights_path, e))?;
        // Parsed once; surgery then looks every tensor up by name.
        let tensors = file
            .tensors()
            .into_iter()
            .filter(|(_, t)| t.dtype() == safetensors::Dtype::F32)
            .map(|(name, t)| {
                (
                    name,
                    (
                        t.shape().to_vec(),
                        t.data()
                            .chunks_exact(4)
                            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                            .collect(),
                    ),
                )
            })
            .collect();
        let reference = Reference::from_bytes(reference, &reference_path).map_err(|e| match e {
            ReferenceError::File { path, reason } => QueryError::Model {
                path,
                reason: format!(
                    "{reason} (models trained before query mapping existed lack it: train again)"
                ),
            },
            ReferenceError::Data(d) => d.into(),
        })?;
        if reference.n_latent != record.model.n_latent {
            return Err(model_error(
                &reference_path,
                format!(
                    "latent width {} but the model's is {}",
                    reference.n_latent, record.model.n_latent
                ),
            ));
        }
        for (name, _) in &record.modalities {
            if !reference.var_names.contains_key(name) {
                return Err(model_error(
                    &reference_path,
                    format!("no feature names for modality {name:?}"),
                ));
            }
        }
        Ok(ReferenceModel {
            source: source.to_string(),
            record,
            config,
            tensors,
            reference,
        })
    }

    /// Shape and values of a named tensor (parameters and BatchNorm statistics alike).
    fn tensor(&self, name: &str) -> Option<(Vec<usize>, Vec<f32>)> {
        self.tensors.get(name).cloned()
    }

    /// Every tensor by name (parameters and BatchNorm statistics), in name order: what an
    /// export to another tool renames.
    pub fn named_tensors(&self) -> Vec<(&str, &[usize], &[f32])> {
        let mut all: Vec<_> = (self.tensors.iter())
            .map(|(name, (shape, values))| (name.as_str(), shape.as_slice(), values.as_slice()))
            .collect();
        all.sort_by_key(|t| t.0);
        all
    }

    /// The covariates beside the batch the model trained with (what `Cells` must carry).
    pub fn covariates(&self) -> &Covariates {
        &self.record.covariates
    }

    /// Values in the model's tensors (parameters and BatchNorm statistics).
    pub fn parameter_count(&self) -> usize {
        self.tensors.values().map(|(_, v)| v.len()).sum()
    }

    pub fn summary(&self) -> ModelSummary {
        let r = &self.reference;
        ModelSummary {
            modalities: self.record.modalities.clone(),
            batch_key: r.batch_key.clone(),
            batches: self.record.batch_categories.clone(),
            label_key: r.label_key.clone(),
            labels: r.label_categories.clone(),
            n_latent: r.n_latent,
            reference_cells: r.n_cells(),
            covariates: self.record.covariates.clone(),
        }
    }

    /// The model with `ext`'s batches added (no batch added: the reference model itself),
    /// heads that need the query's labels off, and the parameters surgery added.
    fn build<B: TrainBackend>(
        &self,
        device: B,
        ext: BatchExtension,
        seed: u64,
    ) -> Result<Surgered<B>, QueryError> {
        let record = &self.record;
        // The label classifier stays (frozen; the query has no labels, so it adds no loss) to
        // predict the query's labels; heads that read the query's batches or targets go.
        let classifier = self.has_classifier();
        let config = VaeConfig {
            classifier_weight: if classifier {
                record.model.classifier_weight
            } else {
                0.0
            },
            contrastive_weight: 0.0,
            regression_weight: 0.0,
            cox_weight: 0.0,
            adversarial_batch_weight: 0.0,
            ..record.model.clone()
        };
        let shapes: Vec<(&str, usize)> = record
            .modalities
            .iter()
            .map(|(m, g)| (m.as_str(), *g))
            .collect();
        let n_batch = ext.reference_batches + ext.added;
        let n_labels = if classifier {
            self.reference.label_categories.len()
        } else {
            0
        };
        let mut model = Vae::<f32, B>::new(
            device.clone(),
            config,
            &shapes,
            Categories {
                n_batch,
                n_cov: n_batch + record.covariates.width(),
                n_labels,
            },
            seed,
        )?;
        let surgery =
            |e: SurgeryError| model_error(format!("{}/model.safetensors", self.source), e);
        // Surgery works on host copies; the model's buffers are replaced once.
        let mut values = device.download(In::all(model.values()))?;
        let added =
            transfer(&model.layout, &mut values, |name| self.tensor(name), ext).map_err(surgery)?;
        let mut state = device.download(In::all(model.state()))?;
        transfer(
            &model.state_layout,
            &mut state,
            |name| self.tensor(name),
            ext,
        )
        .map_err(surgery)?;
        *model.values_mut() = device.upload_vec(values)?;
        *model.state_mut() = device.upload_vec(state)?;
        Ok((model, added))
    }

    /// Starts `model` (a new model's, for the same data) from this model's tensors
    /// ([`tessera_models::surgery::warm_start`]): its batches (in order) and each modality's
    /// features (by name, in order) must be this model's. Returns the values copied.
    pub fn warm_start<B: TrainBackend>(
        &self,
        model: &mut Vae<f32, B>,
        batches: &[String],
        var_names: &[(String, Vec<String>)],
    ) -> Result<usize, QueryError> {
        let record = &self.record;
        let differs = |what: &str| {
            model_error(
                &self.source,
                format!("{what} differ from the data's: a warm start needs the same data layout"),
            )
        };
        if record.batch_categories != batches {
            return Err(differs("its batches"));
        }
        for (name, vars) in var_names {
            if self.reference.var_names.get(name) != Some(vars) {
                return Err(differs(&format!("the features of modality {name:?}")));
            }
        }
        let device = model.backend().clone();
        let failed = |e: SurgeryError| model_error(format!("{}/model.safetensors", self.source), e);
        let mut values = device.download(In::all(model.values()))?;
        let copied =
            warm_start(&model.layout, &mut values, |name| self.tensor(name)).map_err(failed)?;
        let mut state = device.download(In::all(model.state()))?;
        warm_start(&model.state_layout, &mut state, |name| self.tensor(name)).map_err(failed)?;
        *model.values_mut() = device.upload_vec(values)?;
        *model.state_mut() = device.upload_vec(state)?;
        Ok(copied)
    }

    /// Whether the reference trained a label classifier on its latent mean (its predictions
    /// are a second label source beside the kNN transfer).
    pub fn has_classifier(&self) -> bool {
        self.record.model.classifier_weight > 0.0 && self.reference.label_categories.len() >= 2
    }

    /// The reference model as trained on `device`, for [`ReferenceModel::encode`].
    pub fn encoder<B: TrainBackend>(&self, device: B) -> Result<Vae<f32, B>, QueryError> {
        Ok(self
            .build(
                device,
                BatchExtension {
                    reference_batches: self.record.batch_categories.len(),
                    added: 0,
                },
                0,
            )?
            .0)
    }

    /// Working memory of encoding `cells` and, with `neighbours`, transferring labels, roughly:
    /// the counts aligned to the model's features (index, value and a staged copy per
    /// non-zero), every modality encoder's layer outputs and their normalised copies, each
    /// expert's and the joint posterior, the neighbour lists, and a pooled encoder's own
    /// parameters (values, gradients and a spare).
    pub fn encode_bytes(&self, cells: &Cells, neighbours: Option<usize>) -> u64 {
        let n = cells.modalities.first().map_or(0, |m| m.counts.n_rows) as u64;
        let nnz: u64 = cells.modalities.iter().map(|m| m.counts.nnz() as u64).sum();
        let model = &self.record.model;
        let modalities = self.record.modalities.len() as u64;
        let hidden = (model.n_hidden * model.n_layers.max(1)) as u64 * modalities;
        let latent = self.reference.n_latent as u64 * (modalities + 1);
        let per_cell = hidden * 16 + latent * 16 + neighbours.unwrap_or(0) as u64 * 16;
        nnz * 16 + n * per_cell + self.parameter_count() as u64 * 12
    }

    /// Latent means (cells x `n_latent`) of cells whose batches the reference knows, with
    /// `model` from [`ReferenceModel::encoder`]. Features are aligned by name as in `map_query`.
    pub fn encode<B: TrainBackend>(
        &self,
        model: &mut Vae<f32, B>,
        cells: &Cells,
    ) -> Result<Vec<f32>, QueryError> {
        let (alignment, mb) = self.aligned(cells)?;
        Ok(crate::fit::on_pool(|| {
            alignment.with(&mb, |b| model.latent_mean(b))
        })?)
    }

    /// `encode`'s latent means and what each modality's decoder expects at them (cells x
    /// features, row-major, the reference's modalities and features in order; count
    /// likelihoods scaled to `library_size` per cell), decoded with each cell's batch.
    pub fn expression<B: TrainBackend>(
        &self,
        model: &mut Vae<f32, B>,
        cells: &Cells,
        library_size: f64,
    ) -> Result<(Vec<f32>, Vec<Vec<f32>>), QueryError> {
        let (alignment, mb) = self.aligned(cells)?;
        Ok(crate::fit::on_pool(|| {
            alignment.with(&mb, |b| model.latent_and_expression(b, library_size))
        })?)
    }

    /// `n_samples` draws from each cell's joint posterior (each cells x `n_latent`, row-major),
    /// seeded by `seed` (scvi-tools' `give_mean=False`); a mixture of experts is refused.
    pub fn posterior_samples<B: TrainBackend>(
        &self,
        model: &mut Vae<f32, B>,
        cells: &Cells,
        n_samples: usize,
        seed: u64,
    ) -> Result<Vec<Vec<f32>>, QueryError> {
        let (_, mean, variance) = self.posterior(model, cells)?;
        Ok(draws(&mean, &variance, n_samples, seed))
    }

    /// Each modality's expression (as [`ReferenceModel::expression`]) at `n_samples` seeded
    /// draws from each cell's posterior (scvi-tools' `n_samples`): averaged over the draws
    /// (`mean`), else every draw's, one after another (n_samples x cells x features).
    pub fn expression_sampled<B: TrainBackend>(
        &self,
        model: &mut Vae<f32, B>,
        cells: &Cells,
        library_size: f64,
        n_samples: usize,
        seed: u64,
        mean: bool,
    ) -> Result<Vec<Vec<f32>>, QueryError> {
        let (batch, centre, variance) = self.posterior(model, cells)?;
        let mut sums: Vec<Vec<f64>> = Vec::new();
        let mut all: Vec<Vec<f32>> = Vec::new();
        for z in draws(&centre, &variance, n_samples, seed) {
            let expression =
                crate::fit::on_pool(|| batch.with(|b| model.expression_at(&z, b, library_size)))?;
            if !mean {
                all.resize_with(expression.len(), Vec::new);
                all.iter_mut()
                    .zip(&expression)
                    .for_each(|(a, e)| a.extend_from_slice(e));
                continue;
            }
            sums.resize_with(expression.len(), Vec::new);
            for (sum, e) in sums.iter_mut().zip(&expression) {
                sum.resize(e.len(), 0.0);
                sum.iter_mut().zip(e).for_each(|(s, &v)| *s += f64::from(v));
            }
        }
        if !mean {
            return Ok(all);
        }
        let n = n_samples.max(1) as f64;
        Ok(sums
            .into_iter()
            .map(|s| s.into_iter().map(|v| (v / n) as f32).collect())
            .collect())
    }

    /// `cells` in the model's input form with their joint posterior's means and variances; a
    /// mixture of experts has no single Gaussian posterior and is refused.
    fn posterior<B: TrainBackend>(
        &self,
        model: &mut Vae<f32, B>,
        cells: &Cells,
    ) -> Result<(ModelBatch, Vec<f32>, Vec<f32>), QueryError> {
        let (alignment, mb) = self.aligned(cells)?;
        let batch = alignment.batch(&mb);
        let posterior = crate::fit::on_pool(|| batch.with(|b| model.latent_posterior(b)))?;
        let (mean, variance) = posterior.ok_or_else(|| {
            input(
                "encode request",
                "posterior samples of a mixture of experts (joint = \"moe\") are not supported",
            )
        })?;
        Ok((batch, mean, variance))
    }

    /// The label classifier's class probabilities for `cells` (cells x the reference's label
    /// categories, row-major); None when the model trained no classifier.
    pub fn probabilities<B: TrainBackend>(
        &self,
        model: &mut Vae<f32, B>,
        cells: &Cells,
    ) -> Result<Option<Vec<f32>>, QueryError> {
        let (alignment, mb) = self.aligned(cells)?;
        Ok(crate::fit::on_pool(|| {
            alignment.with(&mb, |b| model.predict_labels(b))
        })?)
    }

    /// `cells` as one minibatch in the reference's features and batch codes.
    fn aligned(&self, cells: &Cells) -> Result<(Alignment, MiniBatch), QueryError> {
        let request = "encode request";
        let rows = cells.modalities.first().map_or(0, |m| m.counts.n_rows);
        let refs = &self.record.batch_categories;
        let batch = if refs.is_empty() {
            if !cells.batches.is_empty() {
                return Err(input(
                    request,
                    "the reference was trained without batches: send no batch names",
                ));
            }
            vec![-1; rows]
        } else {
            if cells.batches.len() != rows {
                return Err(input(
                    request,
                    format!(
                        "{} batch names for {rows} cells (one per cell expected)",
                        cells.batches.len()
                    ),
                ));
            }
            let code = |b: &String| {
                let unknown = || {
                    let message = format!(
                        "batch {b:?} is not one of the reference's ({}); \
                         map new batches with a query job",
                        refs.join(", ")
                    );
                    input(request, message)
                };
                let position = refs.iter().position(|r| r == b);
                position.map(|p| p as i32).ok_or_else(unknown)
            };
            cells.batches.iter().map(code).collect::<Result<_, _>>()?
        };
        let mut modalities = Vec::with_capacity(cells.modalities.len());
        let mut sources = Vec::with_capacity(self.record.modalities.len());
        for given in &cells.modalities {
            let Some(g) = self
                .record
                .modalities
                .iter()
                .find(|(name, _)| *name == given.name)
                .map(|m| m.1)
            else {
                return Err(input(
                    request,
                    format!(
                        "unknown modality {:?} (the reference has {})",
                        given.name,
                        self.modality_names()
                    ),
                ));
            };
            if given.counts.n_rows != rows || given.counts.indptr.len() != rows + 1 {
                return Err(input(
                    request,
                    format!(
                        "modality {:?} has {} rows, the first modality {rows}",
                        given.name, given.counts.n_rows
                    ),
                ));
            }
            let columns = if given.var_names.is_empty() {
                if given.counts.n_cols != g {
                    return Err(input(
                        request,
                        format!(
                            "modality {:?} has {} columns and no feature names; without names the reference's {g} features are expected",
                            given.name, given.counts.n_cols
                        ),
                    ));
                }
                (0..g as u32).map(Some).collect()
            } else {
                if given.var_names.len() != given.counts.n_cols {
                    return Err(input(
                        request,
                        format!(
                            "modality {:?}: {} feature names for {} columns",
                            given.name,
                            given.var_names.len(),
                            given.counts.n_cols
                        ),
                    ));
                }
                self.columns(&given.name, &given.var_names)
            };
            let present = match given.present.len() {
                0 => vec![true; rows],
                n if n == rows => given.present.clone(),
                n => {
                    return Err(input(
                        request,
                        format!(
                            "modality {:?}: {n} presence flags for {rows} cells",
                            given.name
                        ),
                    ));
                }
            };
            let library = given.counts.row_sums();
            modalities.push(ModalityBatch {
                name: given.name.clone(),
                counts: given.counts.clone(),
                library,
                present,
            });
            sources.push((given.name.as_str(), columns));
        }
        let alignment = Alignment {
            modalities: self
                .record
                .modalities
                .iter()
                .map(
                    |(name, g)| match sources.iter().position(|(n, _)| n == name) {
                        Some(m) => (Some(m), sources[m].1.clone(), *g),
                        None => (None, Vec::new(), *g),
                    },
                )
                .collect(),
            batches: (0..refs.len()).collect(),
            n_batch: refs.len(),
            covariates: self.record.covariates.clone(),
            categories: self
                .record
                .covariates
                .categorical
                .iter()
                .map(|(_, c)| (0..c.len() as i32).collect())
                .collect(),
        };
        let (categorical, numeric) = self.covariate_values(cells, rows)?;
        let mb = MiniBatch {
            cells: (0..rows as u64).collect(),
            modalities,
            batch,
            label: vec![-1; rows],
            categorical,
            numeric,
        };
        Ok((alignment, mb))
    }

    /// The covariates of `cells` as a minibatch carries them: codes into the reference's
    /// categories (rows × categorical) and values (rows × continuous).
    fn covariate_values(
        &self,
        cells: &Cells,
        rows: usize,
    ) -> Result<(Vec<i32>, Vec<f64>), QueryError> {
        let request = "encode request";
        let ours = &self.record.covariates;
        if cells.categorical.len() != ours.categorical.len()
            || cells.continuous.len() != ours.continuous.len()
        {
            return Err(input(
                request,
                format!(
                    "{} categorical and {} continuous covariates given; the reference has {} ({}) and {} ({})",
                    cells.categorical.len(),
                    cells.continuous.len(),
                    ours.categorical.len(),
                    ours.keys().categorical.join(", "),
                    ours.continuous.len(),
                    ours.continuous.join(", ")
                ),
            ));
        }
        let mut codes = Vec::with_capacity(ours.categorical.len());
        for ((key, categories), given) in ours.categorical.iter().zip(&cells.categorical) {
            check_rows(key, given.len(), rows)?;
            let code = |v: &String| {
                categories.iter().position(|c| c == v).map(|p| p as i32).ok_or_else(|| {
                    input(
                        request,
                        format!(
                            "covariate {key}: category {v:?} is not one of the reference's ({})",
                            categories.join(", ")
                        ),
                    )
                })
            };
            codes.push(given.iter().map(code).collect::<Result<Vec<_>, _>>()?);
        }
        for (key, given) in ours.continuous.iter().zip(&cells.continuous) {
            check_rows(key, given.len(), rows)?;
            if let Some(v) = given.iter().find(|v| !v.is_finite()) {
                return Err(input(
                    request,
                    format!("covariate {key}: {v} is not a finite number"),
                ));
            }
        }
        Ok((
            tessera_data::row_major(rows, &codes),
            tessera_data::row_major(rows, &cells.continuous),
        ))
    }

    fn modality_names(&self) -> String {
        self.record
            .modalities
            .iter()
            .map(|m| m.0.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Per query feature, its column in the reference's `modality`.
    fn columns(&self, modality: &str, query_vars: &[String]) -> Vec<Option<u32>> {
        let ref_vars = self
            .reference
            .var_names
            .get(modality)
            .map(Vec::as_slice)
            .unwrap_or_default();
        let position: HashMap<&str, u32> = ref_vars
            .iter()
            .enumerate()
            .map(|(i, v)| (v.as_str(), i as u32))
            .collect();
        query_vars
            .iter()
            .map(|v| position.get(v.as_str()).copied())
            .collect()
    }
}

/// `n` draws of mean + sqrt(variance) · ε, ε ~ N(0, 1), from one seeded stream.
fn draws(mean: &[f32], variance: &[f32], n: usize, seed: u64) -> Vec<Vec<f32>> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_xoshiro::Xoshiro256PlusPlus::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            mean.iter()
                .zip(variance)
                .map(|(m, v)| {
                    let e: f32 = rng.sample(rand_distr::StandardNormal);
                    m + v.sqrt() * e
                })
                .collect()
        })
        .collect()
}

/// A covariate column of `given` values where one per cell was expected.
fn check_rows(key: &str, given: usize, rows: usize) -> Result<(), QueryError> {
    if given == rows {
        return Ok(());
    }
    Err(input(
        "encode request",
        format!("covariate {key}: {given} values for {rows} cells (one per cell expected)"),
    ))
}

/// How a query minibatch becomes the reference model's input.
#[derive(Debug)]
struct Alignment {
    /// Per reference modality: the loader's modality index (None: the query lacks it) and, per
    /// query feature, its reference column.
    modalities: Vec<(Option<usize>, Vec<Option<u32>>, usize)>,
    /// Per query batch code, its covariate column in the extended model.
    batches: Vec<usize>,
    /// The extended model's batches.
    n_batch: usize,
    /// The reference's covariates beside the batch.
    covariates: Covariates,
    /// Per categorical covariate, each query code's code in the reference's categories.
    categories: Vec<Vec<i32>>,
}

impl Alignment {
    /// The model's input for every cell of `mb`, its features and batches in the reference's
    /// order (no head's labels: a query trains none).
    fn batch(&self, mb: &MiniBatch) -> ModelBatch {
        let rows = mb.cells.len();
        let mut modalities = Vec::with_capacity(self.modalities.len());
        for (source, columns, g) in &self.modalities {
            let mut csr = Csr {
                n_rows: rows,
                n_cols: *g,
                indptr: vec![0],
                ..Csr::default()
            };
            let present: Vec<bool> = match source {
                Some(m) => {
                    let modality = &mb.modalities[*m];
                    for r in 0..rows {
                        let (idx, val) = modality.counts.row(r);
                        let mut row: Vec<(u32, f32)> = idx
                            .iter()
                            .zip(val)
                            .filter_map(|(&j, &v)| {
                                columns.get(j as usize).copied().flatten().map(|c| (c, v))
                            })
                            .collect();
                        row.sort_unstable_by_key(|e| e.0);
                        csr.indices.extend(row.iter().map(|e| e.0));
                        csr.data.extend(row.iter().map(|e| e.1));
                        csr.indptr.push(csr.indices.len() as u64);
                    }
                    modality.present.clone()
                }
                None => {
                    csr.indptr.resize(rows + 1, 0);
                    vec![false; rows]
                }
            };
            modalities.push(ModalityRows::new(csr, present));
        }
        let kc = self.categories.len();
        let codes: Vec<i32> = mb
            .categorical
            .iter()
            .enumerate()
            .map(|(i, &c)| {
                usize::try_from(c)
                    .ok()
                    .and_then(|c| self.categories[i % kc].get(c).copied())
                    .unwrap_or(-1)
            })
            .collect();
        let covariates = self.covariates.rows(
            rows,
            self.n_batch,
            |r| {
                usize::try_from(mb.batch[r])
                    .ok()
                    .and_then(|c| self.batches.get(c).copied())
            },
            &codes,
            &mb.numeric,
        );
        ModelBatch {
            rows,
            modalities,
            covariates,
            labels: None,
            targets: Vec::new(),
            times: Vec::new(),
            events: Vec::new(),
        }
    }

    /// Calls `f` with the model's view of every cell of `mb`.
    fn with<R>(&self, mb: &MiniBatch, f: impl FnOnce(VaeBatch<'_, f32>) -> R) -> R {
        self.batch(mb).with(f)
    }
}

fn input(store: &str, reason: impl Into<String>) -> QueryError {
    QueryError::Input {
        store: store.to_string(),
        reason: reason.into(),
    }
}

/// Maps the query of `req` onto `model`: the embedding and transferred labels are returned and,
/// when `req.write` says where, written into the query store. `progress` hears each stage and
/// each fine-tuning minibatch; answering `Break` cancels the job (`QueryError::Cancelled`, the
/// store untouched).
pub fn map_query(
    model: &ReferenceModel,
    req: &QueryRequest,
    progress: impl FnMut(QueryStage) -> ControlFlow<()>,
) -> Result<QueryOutput, QueryError> {
    match req.device {
        Device::Cpu => map_on(Cpu, model, req, progress),
        Device::Cuda(_) => map_on(
            req.device.cuda(model.record.train.tf32)?,
            model,
            req,
            progress,
        ),
    }
}

/// [`map_query`] on `device`.
fn map_on<B: TrainBackend>(
    device: B,
    model: &ReferenceModel,
    req: &QueryRequest,
    mut progress: impl FnMut(QueryStage) -> ControlFlow<()>,
) -> Result<QueryOutput, QueryError> {
    let mut stage = |s: QueryStage| match progress(s) {
        ControlFlow::Continue(()) => Ok(()),
        ControlFlow::Break(()) => Err(QueryError::Cancelled),
    };
    let reference = model;
    let dataset = Dataset::open(&req.data)?;
    let n = dataset.n_obs() as usize;
    let target: AnnData = match &dataset {
        Dataset::AnnData(a) => a.clone(),
        Dataset::MuData(m) => m.root(),
    };
    refuse_existing_outputs(reference, req, &target)?;
    let (loader, aligned) = align(reference, req, &dataset)?;

    stage(QueryStage::Surgery)?;
    let (mut trainer, trained_parameters) = surgery(device, reference, req, aligned.new.len())?;
    let started = Instant::now();
    let final_loss = if trained_parameters > 0 {
        fine_tune(&mut trainer, &loader, &aligned.alignment, req, &mut stage)?
    } else {
        None
    };
    let seconds_training = started.elapsed().as_secs_f64();

    let started = Instant::now();
    stage(QueryStage::Mapping)?;
    let (embedding, classifier_labels) =
        embed(reference, &mut trainer, &loader, &aligned.alignment)?;
    let r = &reference.reference;
    let d = r.n_latent;
    let labelled = !r.labels.is_empty();
    let transferred = if labelled {
        tessera_metrics::transfer::knn_transfer(
            &r.latent,
            &r.labels,
            &embedding,
            d,
            req.neighbours,
        )?
    } else {
        Vec::new()
    };
    let mean_uncertainty =
        labelled.then(|| transferred.iter().map(|t| t.uncertainty).sum::<f64>() / n.max(1) as f64);
    let (label_accuracy, classifier_accuracy) =
        agreement(reference, &target, &transferred, &classifier_labels);
    let mut output = QueryOutput {
        report: QueryReport {
            data: req.data.clone(),
            model: reference.source.clone(),
            n_cells: n,
            known_batches: aligned.known,
            new_batches: aligned.new,
            modalities: aligned.summaries,
            epochs: req.epochs,
            trained_parameters,
            final_loss,
            embedding: None,
            labels: None,
            mean_uncertainty,
            label_accuracy,
            classifier_accuracy,
            seconds_training,
            seconds_mapping: 0.0,
        },
        embedding,
        n_latent: d,
        labels: transferred,
        label_categories: r.label_categories.clone(),
        classifier_labels,
    };
    if let Some(folder) = &req.model_out {
        save_query_model(Path::new(folder), reference, req, &trainer, &output)?;
    }
    if let Some(out) = &req.write {
        (output.report.embedding, output.report.labels) =
            write_results(reference, &target, out, &output)?;
    }
    output.report.seconds_mapping = started.elapsed().as_secs_f64();
    Ok(output)
}

/// `QueryRequest::model_out`: the fine-tuned query model as a model folder (weights,
/// `config.json` with the reference's batches then the query's new ones, `reference.safetensors`
/// with the query's latent and transferred labels).
fn save_query_model<B: TrainBackend>(
    folder: &Path,
    reference: &ReferenceModel,
    req: &QueryRequest,
    trainer: &Trainer<f32, B>,
    output: &QueryOutput,
) -> Result<(), QueryError> {
    let output_error = |path: &Path, reason: String| crate::records::FitError::Output {
        path: path.display().to_string(),
        reason,
    };
    std::fs::create_dir_all(folder).map_err(|e| output_error(folder, e.to_string()))?;
    let batches: Vec<String> = reference
        .record
        .batch_categories
        .iter()
        .chain(&output.report.new_batches)
        .cloned()
        .collect();
    crate::checkpoint::write_weights(&folder.join("model.safetensors"), trainer)?;
    let mut config = reference.config.clone();
    config["batch_categories"] = serde_json::json!(batches);
    // The heads surgery switched off stay off when the folder is loaded.
    config["model"] = serde_json::to_value(&trainer.model.config)
        .map_err(|e| output_error(folder, e.to_string()))?;
    config["query_of"] = serde_json::json!({"reference": reference.source, "data": req.data});
    let config_path = folder.join("config.json");
    let text = serde_json::to_string_pretty(&config).unwrap_or_default();
    crate::fit::write_file(&config_path, text.as_bytes())?;
    let r = &reference.reference;
    let query = Reference {
        latent: output.embedding.clone(),
        n_latent: output.n_latent,
        labels: output.labels.iter().map(|t| t.label).collect(),
        label_key: r.label_key.clone(),
        label_categories: r.label_categories.clone(),
        batch_key: req.batch_key.clone().or_else(|| r.batch_key.clone()),
        batch_categories: batches,
        var_names: r.var_names.clone(),
    };
    let path = folder.join(REFERENCE_FILE);
    query
        .write(&path)
        .map_err(|e| output_error(&path, e.to_string()))?;
    Ok(())
}

/// The outputs a mapping would write, refused up front when they exist and may not be
/// replaced.
fn refuse_existing_outputs(
    reference: &ReferenceModel,
    req: &QueryRequest,
    target: &AnnData,
) -> Result<(), QueryError> {
    let labelled = !reference.reference.labels.is_empty();
    if let Some(out) = &req.write {
        let uncertainty_key = format!("{}_uncertainty", out.label_key);
        let classifier_key = format!("{}_classifier", out.label_key);
        let outputs: Vec<(&str, &str)> = std::iter::once(("obsm", out.embedding_key.as_str()))
            .chain(
                labelled
                    .then_some([
                        ("obs", out.label_key.as_str()),
                        ("obs", uncertainty_key.as_str()),
                    ])
                    .into_iter()
                    .flatten(),
            )
            .chain(
                reference
                    .has_classifier()
                    .then_some(("obs", classifier_key.as_str())),
            )
            .collect();
        for (mapping, key) in &outputs {
            if !out.overwrite && target.keys(mapping)?.iter().any(|k| k == key) {
                return Err(tessera_data::DataError::Exists {
                    store: req.data.clone(),
                    path: target.element(&format!("{mapping}/{key}")),
                }
                .into());
            }
        }
    }
    Ok(())
}

/// The query aligned to the reference: its batches (the reference's where it knew them, new
/// ones appended) and its modalities' features, by name.
#[derive(Debug)]
struct Aligned {
    alignment: Alignment,
    summaries: Vec<ModalityAlignment>,
    known: Vec<String>,
    new: Vec<String>,
}

/// The query's loader and its alignment to the reference.
fn align(
    reference: &ReferenceModel,
    req: &QueryRequest,
    dataset: &Dataset,
) -> Result<(Loader, Aligned), QueryError> {
    let record = &reference.record;
    let n = dataset.n_obs() as usize;
    // The query's batches: the reference's where it knew them, new ones appended.
    let batch_key = req
        .batch_key
        .clone()
        .or_else(|| reference.reference.batch_key.clone());
    let loader = Loader::new(
        dataset,
        0..n as u64,
        LoaderConfig {
            batch_size: record.train.batch_size,
            shuffle: true,
            seed: req.seed,
            batch_key: batch_key.clone(),
            categorical_keys: record.covariates.keys().categorical,
            numeric_keys: record.covariates.continuous.clone(),
            matrix: crate::fit::matrix_of(req.layer.as_deref()),
            ..LoaderConfig::default()
        },
    )?;
    let categories = covariate_codes(&record.covariates, &loader, &req.data)?;
    let ref_batches = &record.batch_categories;
    let (known, new): (Vec<String>, Vec<String>) = loader
        .batch_categories
        .iter()
        .cloned()
        .partition(|b| ref_batches.contains(b));
    let batches: Vec<usize> = loader
        .batch_categories
        .iter()
        .map(|b| {
            ref_batches
                .iter()
                .position(|r| r == b)
                .unwrap_or_else(|| ref_batches.len() + new.iter().position(|x| x == b).unwrap_or(0))
        })
        .collect();
    if ref_batches.is_empty() && !new.is_empty() {
        return Err(input(
            &req.data,
            "the reference was trained without batches, so the query's batches have no covariate to extend: map without --batch-key",
        ));
    }

    // The query's modalities and features, aligned by name to the reference's.
    let names = loader.modality_names();
    let mut alignments = Vec::new();
    let mut summaries = Vec::new();
    for (r, (name, g)) in record.modalities.iter().enumerate() {
        let source = match &dataset {
            Dataset::AnnData(_) => (r == 0).then_some(0),
            Dataset::MuData(_) => names.iter().position(|m| m == name),
        };
        let (columns, cells) = match source {
            Some(m) => {
                let query_vars =
                    var_names(dataset, &names[m]).map_err(|e| input(&req.data, e.to_string()))?;
                let cells = match &dataset {
                    Dataset::AnnData(_) => n,
                    Dataset::MuData(md) => md.obsmap[md.modality(&names[m])?.0]
                        .iter()
                        .filter(|&&r| r > 0)
                        .count(),
                };
                (reference.columns(name, &query_vars), cells)
            }
            None => (Vec::new(), 0),
        };
        let matched = columns
            .iter()
            .flatten()
            .collect::<std::collections::HashSet<_>>()
            .len();
        summaries.push(ModalityAlignment {
            name: name.clone(),
            reference_features: *g,
            matched,
            zero_filled: g - matched,
            ignored: columns.iter().filter(|c| c.is_none()).count(),
            cells,
        });
        alignments.push((source, columns, *g));
    }
    if summaries.iter().all(|s| s.matched == 0 || s.cells == 0) {
        return Err(input(
            &req.data,
            format!(
                "no feature of the reference's modalities ({}) is in the query: nothing to map",
                reference.modality_names()
            ),
        ));
    }
    for s in summaries
        .iter()
        .filter(|s| s.zero_filled > 0 && s.cells > 0)
    {
        tracing::warn!(modality = %s.name, zero_filled = s.zero_filled, of = s.reference_features, "reference features missing from the query are zero");
    }
    let alignment = Alignment {
        modalities: alignments,
        batches,
        n_batch: ref_batches.len() + new.len(),
        covariates: record.covariates.clone(),
        categories,
    };
    let aligned = Aligned {
        alignment,
        summaries,
        known,
        new,
    };
    Ok((loader, aligned))
}

/// Per categorical covariate of the reference, each of the query's categories' code in the
/// reference's: surgery extends the batch alone, so a covariate category the reference never saw
/// (or a missing continuous value) is refused.
fn covariate_codes(
    covariates: &Covariates,
    loader: &Loader,
    store: &str,
) -> Result<Vec<Vec<i32>>, QueryError> {
    if let Some((key, missing)) = Covariates::first_incomplete(&covariates.continuous, loader) {
        return Err(input(
            store,
            format!(
                "obs/{key}: {missing} missing or infinite values; the reference's continuous covariate needs one in every cell"
            ),
        ));
    }
    covariates
        .categorical
        .iter()
        .zip(&loader.categorical_categories)
        .map(|((key, ours), theirs)| {
            theirs
                .iter()
                .map(|c| {
                    ours.iter().position(|o| o == c).map(|p| p as i32).ok_or_else(|| {
                        input(
                            store,
                            format!(
                                "obs/{key}: category {c:?} is not one of the reference's ({}); only new batches can be added to a reference",
                                ours.join(", ")
                            ),
                        )
                    })
                })
                .collect()
        })
        .collect()
}

/// The trainer of the query model: the reference with `new_batches` more batches, everything
/// frozen but the new batches' rows (and the layers `req.unfreeze` opens); the parameters
/// fine-tuning changes.
fn surgery<B: TrainBackend>(
    device: B,
    reference: &ReferenceModel,
    req: &QueryRequest,
    new_batches: usize,
) -> Result<(Trainer<f32, B>, usize), QueryError> {
    let record = &reference.record;
    // Surgery: the reference model with the new batches' rows; heads that need labels or
    // batches of the query are off during fine-tuning.
    let (model, mut added) = reference.build(
        device,
        BatchExtension {
            reference_batches: reference.record.batch_categories.len(),
            added: new_batches,
        },
        req.seed,
    )?;
    added.extend(unfrozen_ranges(&model.layout, req.unfreeze));
    // Running statistics of the encoder (scArches) and of the label classifier stay the
    // reference's.
    let mut kept_state = encoder_ranges(&model.state_layout);
    kept_state.extend(
        model
            .state_layout
            .slots()
            .iter()
            .filter(|s| s.name.starts_with("heads."))
            .map(|s| s.range.clone()),
    );
    // scArches fine-tunes without weight decay (it would shrink the frozen-by-design zeros).
    let train = TrainConfig {
        weight_decay: 0.0,
        seed: req.seed,
        ..record.train.clone()
    };
    let mut trainer = Trainer::new(model, train)?;
    trainer.freeze_except(added.clone());
    trainer.freeze_state(kept_state)?;
    let trained_parameters = tessera_models::surgery::merge_ranges(added)
        .iter()
        .map(|r| r.len())
        .sum();
    Ok((trainer, trained_parameters))
}

/// Fine-tunes the query model for `req.epochs`: the training loop `fit` runs, alone over one
/// part (the query's whole batches; a last cell left over joins the batch before it), the
/// frozen ranges the only difference. The last epoch's mean loss.
fn fine_tune<B: TrainBackend>(
    trainer: &mut Trainer<f32, B>,
    loader: &Loader,
    alignment: &Alignment,
    req: &QueryRequest,
    stage: &mut impl FnMut(QueryStage) -> Result<(), QueryError>,
) -> Result<Option<f64>, QueryError> {
    let n_cells = loader.n_cells() as usize;
    let device = trainer.model.backend().clone();
    let mut place = Placement::alone_until(device, Arc::default());
    let mut reducer = StepReducer::new(trainer)?;
    let mut replays = B::Replays::default();
    let mut stepper = Stepper {
        trainer,
        place: &mut place,
        reducer: &mut reducer,
        resident: &[],
        store: &req.data,
        replays: &mut replays,
    };
    let mut final_loss = None;
    for epoch in 0..req.epochs {
        let (mut sum, mut cells) = (0.0, 0usize);
        let streams = vec![PartStream::new(0, loader.epoch(epoch as u64))?];
        let on_step = |terms: &LossTerms| {
            sum += terms.loss * terms.cells as f64;
            cells += terms.cells;
            stage(QueryStage::FineTuning {
                epoch,
                epochs: req.epochs,
                cells,
                n_cells,
            })
        };
        stepper.epoch(epoch, streams, None, |mb| alignment.batch(&mb), on_step)?;
        final_loss = (cells > 0).then(|| sum / cells as f64);
    }
    Ok(final_loss)
}

/// Every query cell's latent mean (cells x n_latent, in store order) and, when the reference
/// has a label classifier, its predicted label code per cell.
fn embed<B: TrainBackend>(
    reference: &ReferenceModel,
    trainer: &mut Trainer<f32, B>,
    loader: &Loader,
    alignment: &Alignment,
) -> Result<(Vec<f32>, Vec<i32>), QueryError> {
    let record = &reference.record;
    let n = loader.n_cells() as usize;
    let d = record.model.n_latent;
    let mut embedding = vec![0f32; n * d];
    let classifier = reference.has_classifier();
    let mut classifier_labels = vec![-1i32; if classifier { n } else { 0 }];
    for mb in loader.ordered().epoch(0) {
        let mb = mb?;
        let z =
            crate::fit::on_pool(|| alignment.with(&mb, |batch| trainer.model.latent_mean(batch)))?;
        for (r, &cell) in mb.cells.iter().enumerate() {
            embedding[cell as usize * d..(cell as usize + 1) * d]
                .copy_from_slice(&z[r * d..(r + 1) * d]);
        }
        if classifier
            && let Some(p) = crate::fit::on_pool(|| {
                alignment.with(&mb, |batch| trainer.model.predict_labels(batch))
            })?
        {
            let k = reference.reference.label_categories.len();
            for (row, &cell) in p.chunks_exact(k).zip(&mb.cells) {
                classifier_labels[cell as usize] = row
                    .iter()
                    .enumerate()
                    .fold((0, f32::NEG_INFINITY), |best, (c, &v)| {
                        if v > best.1 { (c, v) } else { best }
                    })
                    .0 as i32;
            }
        }
    }
    Ok((embedding, classifier_labels))
}

/// Agreement of the transferred labels and of the classifier's predictions with the query's
/// own labels, where it has the reference's label column (compared by name).
fn agreement(
    reference: &ReferenceModel,
    target: &AnnData,
    transferred: &[Transferred],
    classifier_labels: &[i32],
) -> (Option<f64>, Option<f64>) {
    let r = &reference.reference;
    let labelled = !r.labels.is_empty();
    // The query's own labels, where it has the reference's label column.
    let own = match r
        .label_key
        .as_deref()
        .filter(|_| labelled)
        .and_then(|k| target.obs_column(k).ok())
    {
        Some(Column::Categorical {
            codes, categories, ..
        }) => Some((codes, categories)),
        _ => None,
    };
    // Agreement of predicted codes with the query's own labels, compared by name.
    let accuracy = |predicted: &[i32]| {
        let (codes, categories) = own.as_ref()?;
        let pairs: Vec<bool> = codes
            .iter()
            .zip(predicted)
            .filter(|(o, _)| **o >= 0)
            .map(|(&o, &p)| p >= 0 && categories[o as usize] == r.label_categories[p as usize])
            .collect();
        (!pairs.is_empty())
            .then(|| pairs.iter().filter(|&&ok| ok).count() as f64 / pairs.len() as f64)
    };
    let label_accuracy = accuracy(&transferred.iter().map(|t| t.label).collect::<Vec<_>>());
    let classifier_accuracy = if reference.has_classifier() {
        accuracy(classifier_labels)
    } else {
        None
    };
    (label_accuracy, classifier_accuracy)
}

/// Writes the embedding, the transferred labels and their uncertainty (and the classifier's
/// labels) into the query store; the embedding's and the labels' elements.
fn write_results(
    reference: &ReferenceModel,
    target: &AnnData,
    out: &Outputs,
    output: &QueryOutput,
) -> Result<(Option<String>, Option<String>), QueryError> {
    let (embedding, d, transferred, classifier_labels) = (
        &output.embedding,
        output.n_latent,
        &output.labels,
        &output.classifier_labels,
    );
    let r = &reference.reference;
    let (labelled, classifier) = (!r.labels.is_empty(), reference.has_classifier());
    target.write_obsm(&out.embedding_key, embedding, d, out.overwrite)?;
    let embedding_element = Some(target.element(&format!("obsm/{}", out.embedding_key)));
    let mut labels_element = None;
    if labelled {
        let codes = transferred.iter().map(|t| t.label).collect();
        target.write_obs_column(
            &out.label_key,
            &Column::Categorical {
                codes,
                categories: r.label_categories.clone(),
                ordered: false,
            },
            out.overwrite,
        )?;
        target.write_obs_column(
            &format!("{}_uncertainty", out.label_key),
            &Column::Float(transferred.iter().map(|t| t.uncertainty).collect()),
            out.overwrite,
        )?;
        if classifier {
            target.write_obs_column(
                &format!("{}_classifier", out.label_key),
                &Column::Categorical {
                    codes: classifier_labels.clone(),
                    categories: r.label_categories.clone(),
                    ordered: false,
                },
                out.overwrite,
            )?;
        }
        labels_element = Some(target.element(&format!("obs/{}", out.label_key)));
    }
    Ok((embedding_element, labels_element))
}
