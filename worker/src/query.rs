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
use std::path::{Path, PathBuf};
use std::time::Instant;

use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};
use tessera_data::{AnnData, Column, Csr, Dataset, Loader, LoaderConfig, MiniBatch};
use tessera_kernels::backend::{Backend, Cpu, In};
use tessera_kernels::ops::linear::CsrRef;
use tessera_models::surgery::{BatchExtension, SurgeryError, Unfreeze, encoder_ranges, transfer, unfrozen_ranges};
use tessera_models::{Categories, ModalityCounts, TrainConfig, TrainError, Trainer, Vae, VaeBatch, VaeConfig};

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
}

impl From<tessera_kernels::backend::EngineError> for QueryError {
    fn from(e: tessera_kernels::backend::EngineError) -> Self {
        QueryError::Train(e.into())
    }
}

/// A query mapping job.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QueryRequest {
    /// The reference model's folder (what `tessera train` wrote to `--out`).
    pub model: PathBuf,
    /// The query store.
    pub data: String,
    /// The query's batch column (default: the reference's batch key).
    pub batch_key: Option<String>,
    /// Fine-tuning epochs over the query.
    pub epochs: usize,
    pub unfreeze: Unfreeze,
    /// Reference neighbours of the kNN label transfer.
    pub neighbours: usize,
    /// The query's embedding goes to obsm/<embedding_key>.
    pub embedding_key: String,
    /// Transferred labels go to obs/<label_key_out>, uncertainties to obs/<..>_uncertainty.
    pub label_key_out: String,
    pub overwrite: bool,
    pub seed: u64,
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
    pub embedding: String,
    pub labels: Option<String>,
    pub mean_uncertainty: Option<f64>,
    /// Share of query cells whose transferred label equals the query's own (when the query has
    /// the reference's label column).
    pub label_accuracy: Option<f64>,
    pub seconds_training: f64,
    pub seconds_mapping: f64,
}

/// What `tessera train` recorded of the run (`config.json`).
#[derive(Debug, Deserialize)]
struct RunRecord {
    modalities: Vec<(String, usize)>,
    batch_categories: Vec<String>,
    model: VaeConfig,
    train: TrainConfig,
}

fn model_error(path: &Path, reason: impl std::fmt::Display) -> QueryError {
    QueryError::Model { path: path.display().to_string(), reason: reason.to_string() }
}

/// The reference's record, tensors (by name: shape and values) and latent space.
struct ReferenceModel {
    record: RunRecord,
    tensors: HashMap<String, (Vec<usize>, Vec<f32>)>,
    reference: Reference,
}

impl ReferenceModel {
    fn load(dir: &Path) -> Result<ReferenceModel, QueryError> {
        let config = dir.join("config.json");
        let text = std::fs::read_to_string(&config).map_err(|e| model_error(&config, e))?;
        let record: RunRecord = serde_json::from_str(&text).map_err(|e| model_error(&config, e))?;
        let weights = dir.join("model.safetensors");
        let bytes = std::fs::read(&weights).map_err(|e| model_error(&weights, e))?;
        let file = SafeTensors::deserialize(&bytes).map_err(|e| model_error(&weights, e))?;
        // Parsed once; surgery then looks every tensor up by name.
        let tensors = file
            .tensors()
            .into_iter()
            .filter(|(_, t)| t.dtype() == safetensors::Dtype::F32)
            .map(|(name, t)| (name, (t.shape().to_vec(), t.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())))
            .collect();
        let reference = Reference::read(&dir.join(REFERENCE_FILE)).map_err(|e| match e {
            ReferenceError::File { path, reason } => QueryError::Model { path, reason: format!("{reason} (models trained before query mapping existed lack it: train again)") },
            ReferenceError::Data(d) => d.into(),
        })?;
        if reference.n_latent != record.model.n_latent {
            return Err(model_error(&dir.join(REFERENCE_FILE), format!("latent width {} but the model's is {}", reference.n_latent, record.model.n_latent)));
        }
        Ok(ReferenceModel { record, tensors, reference })
    }

    /// Shape and values of a named tensor (parameters and BatchNorm statistics alike).
    fn tensor(&self, name: &str) -> Option<(Vec<usize>, Vec<f32>)> {
        self.tensors.get(name).cloned()
    }
}

/// How a query minibatch becomes the reference model's input.
struct Alignment {
    /// Per reference modality: the loader's modality index (None: the query lacks it) and, per
    /// query feature, its reference column.
    modalities: Vec<(Option<usize>, Vec<Option<u32>>, usize)>,
    /// Per query batch code, its covariate column in the extended model.
    batches: Vec<usize>,
    n_cov: usize,
}

impl Alignment {
    /// The model's input for every cell of `mb`; `f` sees it as a `VaeBatch`.
    fn with<R>(&self, mb: &MiniBatch, f: impl FnOnce(VaeBatch<'_, f32>) -> R) -> R {
        let rows = mb.cells.len();
        let mut counts = Vec::with_capacity(self.modalities.len());
        for (source, columns, g) in &self.modalities {
            let mut csr = Csr { n_rows: rows, n_cols: *g, indptr: vec![0], ..Csr::default() };
            let present: Vec<bool> = match source {
                Some(m) => {
                    let modality = &mb.modalities[*m];
                    for r in 0..rows {
                        let (idx, val) = modality.counts.row(r);
                        let mut row: Vec<(u32, f32)> = idx.iter().zip(val).filter_map(|(&j, &v)| columns.get(j as usize).copied().flatten().map(|c| (c, v))).collect();
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
            counts.push((csr, present));
        }
        let mut covariates = vec![0f32; rows * self.n_cov];
        for (r, &code) in mb.batch.iter().enumerate() {
            if let Some(&column) = usize::try_from(code).ok().and_then(|c| self.batches.get(c)) {
                covariates[r * self.n_cov + column] = 1.0;
            }
        }
        let modalities: Vec<ModalityCounts<'_, f32>> = counts
            .iter()
            .map(|(c, present)| ModalityCounts { counts: CsrRef { rows, cols: c.n_cols, indptr: &c.indptr, indices: &c.indices, data: &c.data }, present: (!present.iter().all(|&p| p)).then_some(present.as_slice()) })
            .collect();
        f(VaeBatch::new(&modalities, &covariates))
    }
}

fn input(store: &str, reason: impl Into<String>) -> QueryError {
    QueryError::Input { store: store.to_string(), reason: reason.into() }
}

/// Maps the query of `req` onto its reference model and writes the embedding and transferred
/// labels into the query store. `progress` hears each stage.
pub fn map_query(req: &QueryRequest, mut progress: impl FnMut(&str)) -> Result<QueryReport, QueryError> {
    let reference = ReferenceModel::load(&req.model)?;
    let record = &reference.record;
    let dataset = Dataset::open(&req.data)?;
    let n = dataset.n_obs() as usize;
    let target: AnnData = match &dataset {
        Dataset::AnnData(a) => a.clone(),
        Dataset::MuData(m) => m.root(),
    };
    let uncertainty_key = format!("{}_uncertainty", req.label_key_out);
    let labelled = !reference.reference.labels.is_empty();
    let outputs: Vec<(&str, &str)> = std::iter::once(("obsm", req.embedding_key.as_str())).chain(labelled.then_some([("obs", req.label_key_out.as_str()), ("obs", uncertainty_key.as_str())]).into_iter().flatten()).collect();
    for (mapping, key) in &outputs {
        if !req.overwrite && target.keys(mapping)?.iter().any(|k| k == key) {
            return Err(tessera_data::DataError::Exists { store: req.data.clone(), path: target.element(&format!("{mapping}/{key}")) }.into());
        }
    }

    // The query's batches: the reference's where it knew them, new ones appended.
    let batch_key = req.batch_key.clone().or_else(|| reference.reference.batch_key.clone());
    let loader = Loader::new(&dataset, 0..n as u64, LoaderConfig { batch_size: record.train.batch_size, shuffle: true, seed: req.seed, batch_key: batch_key.clone(), ..LoaderConfig::default() })?;
    let ref_batches = &record.batch_categories;
    let (known, new): (Vec<String>, Vec<String>) = loader.batch_categories.iter().cloned().partition(|b| ref_batches.contains(b));
    let batches: Vec<usize> = loader.batch_categories.iter().map(|b| ref_batches.iter().position(|r| r == b).unwrap_or_else(|| ref_batches.len() + new.iter().position(|x| x == b).unwrap_or(0))).collect();
    if ref_batches.is_empty() && !new.is_empty() {
        return Err(input(&req.data, "the reference was trained without batches, so the query's batches have no covariate to extend: map without --batch-key"));
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
        let ref_vars = reference.reference.var_names.get(name).ok_or_else(|| model_error(&req.model.join(REFERENCE_FILE), format!("no feature names for modality {name:?}")))?;
        let position: HashMap<&str, u32> = ref_vars.iter().enumerate().map(|(i, v)| (v.as_str(), i as u32)).collect();
        let (columns, cells) = match source {
            Some(m) => {
                let query_vars = var_names(&dataset, &names[m]).map_err(|e| input(&req.data, e.to_string()))?;
                let cells = match &dataset {
                    Dataset::AnnData(_) => n,
                    Dataset::MuData(md) => md.obsmap[md.modality(&names[m])?.0].iter().filter(|&&r| r > 0).count(),
                };
                (query_vars.iter().map(|v| position.get(v.as_str()).copied()).collect::<Vec<_>>(), cells)
            }
            None => (Vec::new(), 0),
        };
        let matched = columns.iter().flatten().collect::<std::collections::HashSet<_>>().len();
        summaries.push(ModalityAlignment { name: name.clone(), reference_features: *g, matched, zero_filled: g - matched, ignored: columns.iter().filter(|c| c.is_none()).count(), cells });
        alignments.push((source, columns, *g));
    }
    if summaries.iter().all(|s| s.matched == 0 || s.cells == 0) {
        return Err(input(&req.data, format!("no feature of the reference's modalities ({}) is in the query: nothing to map", record.modalities.iter().map(|m| m.0.as_str()).collect::<Vec<_>>().join(", "))));
    }
    for s in summaries.iter().filter(|s| s.zero_filled > 0 && s.cells > 0) {
        tracing::warn!(modality = %s.name, zero_filled = s.zero_filled, of = s.reference_features, "reference features missing from the query are zero");
    }
    let n_cov = ref_batches.len() + new.len();
    let alignment = Alignment { modalities: alignments, batches, n_cov };

    // Surgery: the reference model with the new batches' rows; heads that need labels or
    // batches of the query are off during fine-tuning.
    progress("surgery");
    let config = VaeConfig { classifier_weight: 0.0, contrastive_weight: 0.0, regression_weight: 0.0, cox_weight: 0.0, adversarial_batch_weight: 0.0, ..record.model.clone() };
    let shapes: Vec<(&str, usize)> = record.modalities.iter().map(|(m, g)| (m.as_str(), *g)).collect();
    let mut model = Vae::<f32, Cpu>::new(Cpu, config, &shapes, Categories { n_batch: n_cov, n_cov, n_labels: 0 }, req.seed)?;
    let ext = BatchExtension { reference_batches: ref_batches.len(), added: new.len() };
    let weights = req.model.join("model.safetensors");
    let surgery = |e: SurgeryError| model_error(&weights, e);
    let mut values = Cpu.download(In::all(&model.values))?;
    let mut added = transfer(&model.layout, &mut values, |name| reference.tensor(name), ext).map_err(surgery)?;
    let mut state = Cpu.download(In::all(&model.state))?;
    transfer(&model.state_layout, &mut state, |name| reference.tensor(name), ext).map_err(surgery)?;
    model.values = Cpu.upload(&values)?;
    model.state = Cpu.upload(&state)?;
    added.extend(unfrozen_ranges(&model.layout, req.unfreeze));
    let kept_state = encoder_ranges(&model.state_layout);
    // scArches fine-tunes without weight decay (it would shrink the frozen-by-design zeros).
    let train = TrainConfig { weight_decay: 0.0, seed: req.seed, ..record.train.clone() };
    let mut trainer = Trainer::new(model, train)?;
    trainer.freeze_except(added.clone());
    trainer.freeze_state(kept_state)?;
    let trained_parameters = tessera_models::surgery::merge_ranges(added).iter().map(|r| r.len()).sum();

    let started = Instant::now();
    let mut final_loss = None;
    if trained_parameters > 0 {
        for epoch in 0..req.epochs {
            progress(&format!("fine-tuning epoch {}/{}", epoch + 1, req.epochs));
            let (mut sum, mut cells) = (0.0, 0usize);
            for mb in loader.epoch(epoch as u64) {
                let mb = mb?;
                if mb.cells.len() < 2 {
                    continue;
                }
                // On a pool thread, as `fit` does: the ops' parallel loops then start in place.
                let terms = crate::fit::on_pool(|| alignment.with(&mb, |batch| trainer.step(batch, epoch)))?;
                sum += terms.loss * mb.cells.len() as f64;
                cells += mb.cells.len();
            }
            final_loss = (cells > 0).then(|| sum / cells as f64);
        }
    }
    let seconds_training = started.elapsed().as_secs_f64();

    let started = Instant::now();
    progress("embedding and label transfer");
    let d = record.model.n_latent;
    let mut embedding = vec![0f32; n * d];
    for mb in loader.ordered().epoch(0) {
        let mb = mb?;
        let z = crate::fit::on_pool(|| alignment.with(&mb, |batch| trainer.model.latent_mean(batch)))?;
        for (r, &cell) in mb.cells.iter().enumerate() {
            embedding[cell as usize * d..(cell as usize + 1) * d].copy_from_slice(&z[r * d..(r + 1) * d]);
        }
    }
    target.write_obsm(&req.embedding_key, &embedding, d, req.overwrite)?;
    let (mut labels_element, mut mean_uncertainty, mut label_accuracy) = (None, None, None);
    if labelled {
        let r = &reference.reference;
        let transferred = tessera_metrics::transfer::knn_transfer(&r.latent, &r.labels, &embedding, d, req.neighbours)?;
        let codes: Vec<i32> = transferred.iter().map(|t| t.label).collect();
        let uncertainty: Vec<f64> = transferred.iter().map(|t| t.uncertainty).collect();
        mean_uncertainty = Some(uncertainty.iter().sum::<f64>() / n.max(1) as f64);
        // The query's own labels, where it has the reference's label column.
        if let Some(Column::Categorical { codes: own, categories, .. }) = r.label_key.as_deref().and_then(|k| target.obs_column(k).ok()) {
            let pairs: Vec<bool> = own.iter().zip(&codes).filter(|(o, _)| **o >= 0).map(|(&o, &c)| c >= 0 && categories[o as usize] == r.label_categories[c as usize]).collect();
            label_accuracy = (!pairs.is_empty()).then(|| pairs.iter().filter(|&&ok| ok).count() as f64 / pairs.len() as f64);
        }
        target.write_obs_column(&req.label_key_out, &Column::Categorical { codes, categories: r.label_categories.clone(), ordered: false }, req.overwrite)?;
        target.write_obs_column(&uncertainty_key, &Column::Float(uncertainty), req.overwrite)?;
        labels_element = Some(target.element(&format!("obs/{}", req.label_key_out)));
    }
    Ok(QueryReport {
        data: req.data.clone(),
        model: req.model.display().to_string(),
        n_cells: n,
        known_batches: known,
        new_batches: new,
        modalities: summaries,
        epochs: req.epochs,
        trained_parameters,
        final_loss,
        embedding: target.element(&format!("obsm/{}", req.embedding_key)),
        labels: labels_element,
        mean_uncertainty,
        label_accuracy,
        seconds_training,
        seconds_mapping: started.elapsed().as_secs_f64(),
    })
}
