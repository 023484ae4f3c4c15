//! Single-node training of the VAE on a store: train/validation split, epochs with KL warm-up,
//! early stopping, then the embedding written back into the store and the run's records
//! (history CSV, weights as safetensors, resolved config as JSON) into the output folder.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tessera_data::{AnnData, Cells, Dataset, Holdout, Loader, LoaderConfig, MiniBatch};
use tessera_kernels::backend::Cpu;
use tessera_models::{
    Categories, LikelihoodKind, LossTerms, PendingLoss, Plateau, TrainConfig, Trainer, Vae,
    VaeConfig,
};

use crate::batch::{CovariateKeys, Covariates, ModalityRows, ModelBatch};
use crate::checkpoint::{self, FitState, WithinEpoch};
use crate::collective::{Collective, TrainBackend};
use crate::device::Device;
use crate::epoch::{EpochSteps, Stepper};
use crate::parallel::{self, EpochEnd, EpochHooks, PartStream, Placement, StepReducer, Sums};
use crate::policy;
use crate::records::{EpochRecord, FitError, StepTimes};
use crate::resident::{self, PartCells, ResidentPart};

/// The run's configuration file: `[model]` and `[train]` tables, every key optional.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FitConfig {
    pub model: VaeConfig,
    pub train: TrainConfig,
}

impl FitConfig {
    /// Parses a TOML configuration; `source` names it in errors.
    pub fn from_toml(text: &str, source: &str) -> Result<FitConfig, FitError> {
        toml::from_str(text).map_err(|e| FitError::Config {
            file: source.into(),
            reason: e.to_string(),
        })
    }
}

/// A submitted job's checks, before any worker is given it: the store at `data` opens, the
/// configuration parses. Returns the training cells of each epoch and the number of epochs.
pub fn check_job(data: &str, config_toml: &str) -> Result<(u64, u32), FitError> {
    let config = FitConfig::from_toml(config_toml, "config_toml")?;
    check_epochs(&config.train)?;
    config.model.validate().map_err(|e| FitError::Config {
        file: "config_toml [model]".into(),
        reason: e.0,
    })?;
    let n_obs = Dataset::open(data)?.n_obs();
    let tc = &config.train;
    Ok((n_obs - tc.validation_cells(n_obs), tc.epochs(n_obs) as u32))
}

/// What to train on and where results go.
#[derive(Debug, Clone)]
pub struct FitOptions {
    pub data: String,
    /// The modalities of a MuData store to model (empty: all of them).
    pub modalities: Vec<String>,
    pub batch_key: Option<String>,
    pub label_key: Option<String>,
    /// The label that marks an unlabelled cell (scANVI's `unlabeled_category`; missing values
    /// are unlabelled too).
    pub unlabeled_category: Option<String>,
    /// obs columns the model reads as covariates beside the batch.
    pub covariates: CovariateKeys,
    pub config: FitConfig,
    /// Output folder for history, weights and config (created; files in it are replaced).
    pub out: PathBuf,
    /// Key of the embedding written to the store's `obsm`.
    pub embedding_key: String,
    /// Key of the classifier's predicted labels (`obs/<key>`) and probabilities
    /// (`obsm/<key>_probabilities`), written when the classifier trains.
    pub prediction_key: String,
    /// Replace an existing `obsm/<embedding_key>` (and the other outputs).
    pub overwrite: bool,
    /// Write the embedding, expression and predictions into the store (off: only the report
    /// and the output folder have them; the store is only read).
    pub store_outputs: bool,
    /// Continue from `<out>/checkpoint` (same data and configuration; `max_epochs` may grow).
    pub resume: bool,
    /// Also write the decoders' expression at each cell's latent mean (dense, held in memory
    /// while written): one modality covering every cell → `layers/<key>` of that AnnData;
    /// several → `obsm/<key>_<modality>` at the MuData root, every cell (imputed where the cell
    /// lacks the modality).
    pub denoised: Option<Denoised>,
    /// Decoded count blocks kept in memory for later epochs, in bytes (0: every epoch reads
    /// the store).
    pub cache_bytes: u64,
    /// Where the model trains (`fit`; a job's ranks are placed by their `Placement`).
    pub device: Device,
    /// A trained model's folder to start from (scvi-tools' `SCANVI.from_scvi_model`): every
    /// tensor of the same name and shape is copied; the data's batches and features must be
    /// the model's. Heads it lacks (a new classifier) start as usual.
    pub init_from: Option<String>,
    /// Train on `layers/<name>` of each modality instead of X (it must hold counts for the
    /// count likelihoods).
    pub layer: Option<String>,
}

/// `tessera train`'s default block cache: a 10^6-cell, 2,000-gene dataset at ~400 counts per
/// cell decodes to ~3 GiB, so atlases stream and most single datasets are read once.
pub const DEFAULT_CACHE_MIB: u64 = 4096;

/// The denoised layer: its key and the library size expression is scaled to (NB/ZINB/Poisson).
#[derive(Debug, Clone)]
pub struct Denoised {
    pub key: String,
    pub library_size: f64,
}

/// A run's summary; rank 0 also writes it (without the embedding) to `<out>/report.json`, where
/// the launcher of a distributed run reads it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FitReport {
    pub history: Vec<EpochRecord>,
    pub stopped_early: bool,
    pub n_train: u64,
    pub n_validation: u64,
    /// The modelled modalities and their feature counts.
    pub modalities: Vec<(String, usize)>,
    pub batch_categories: Vec<String>,
    /// Latent means, n_obs x n_latent, in cell order (also in the store's obsm).
    #[serde(skip)]
    pub embedding: Vec<f32>,
    pub n_latent: usize,
    /// Where the embedding went: `<store>/obsm/<key>` (a MuData root's, or a modality's obsm).
    pub embedding_element: String,
    /// Where the denoised/imputed expression went.
    pub denoised_elements: Vec<String>,
    /// The denoised/imputed expression itself, per modelled modality (cells x features,
    /// row-major; also in the store), when it was asked for.
    #[serde(skip)]
    pub denoised: Vec<Vec<f32>>,
    /// Outputs an earlier run wrote into the store that this run did not rewrite (a retrain
    /// without `--denoised` or the classifier leaves them; `uns/tessera_provenance` says which
    /// run wrote each).
    #[serde(default)]
    pub stale_elements: Vec<String>,
    /// Where the classifier's predicted labels went (`obs/<key>`), and its probabilities
    /// (`obsm/<key>_probabilities`).
    pub prediction_elements: Vec<String>,
}

/// The run's summary in the output folder.
pub const REPORT_FILE: &str = "report.json";

/// The default obs column of predicted labels (and `<key>_probabilities` in obsm).
pub const PREDICTION_KEY: &str = "tessera_prediction";

/// What a minibatch carries besides counts: the model's modalities (indices into the loader's),
/// the covariate width and the supervised heads' inputs.
#[derive(Debug, Clone)]
struct Inputs {
    modalities: Vec<usize>,
    n_batch: usize,
    /// The covariates after the batch; their continuous values are the last numeric columns.
    covariates: Covariates,
    /// Regression targets: the first `n_targets` numeric obs columns.
    n_targets: usize,
    /// Survival time and event: the two numeric obs columns after them.
    survival: bool,
}

/// The covariates `keys` name, with the categories the loader found; a continuous column must
/// have a finite value for every cell (a missing one would poison every step it is in).
fn covariates_of(
    loader: &Loader,
    keys: &CovariateKeys,
    store: &str,
) -> Result<Covariates, FitError> {
    if let Some((key, missing)) = Covariates::first_incomplete(&keys.continuous, loader) {
        return Err(FitError::Input {
            store: store.into(),
            reason: format!(
                "obs/{key}: {missing} missing or infinite values; a continuous covariate needs a finite value in every cell"
            ),
        });
    }
    Ok(Covariates {
        categorical: keys
            .categorical
            .iter()
            .cloned()
            .zip(loader.categorical_categories.iter().cloned())
            .collect(),
        continuous: keys.continuous.clone(),
    })
}

/// Zero epochs would write an untrained model's embedding over the store's: refused before
/// anything is read or written.
fn check_epochs(train: &TrainConfig) -> Result<(), FitError> {
    if train.max_epochs == Some(0) {
        return Err(FitError::Config {
            file: "[train]".into(),
            reason: "max_epochs = 0 (--epochs 0): expected at least 1; no outputs were touched"
                .into(),
        });
    }
    Ok(())
}

/// The obs columns the configured heads read, once the configuration is checked
/// (`VaeConfig::validate`) and a label key is given where a head needs labels.
fn head_columns(model: &VaeConfig, label_key: Option<&str>) -> Result<Vec<String>, FitError> {
    let invalid = |reason: String| FitError::Config {
        file: "[model]".into(),
        reason,
    };
    model.validate().map_err(|e| invalid(e.0))?;
    if model.needs_labels() && label_key.is_none() {
        return Err(invalid(
            "classifier_weight and contrastive_weight need labels: \
             pass --label-key (an obs column of cell labels)"
                .into(),
        ));
    }
    Ok(model.head_columns())
}

/// `FitOptions::init_from`: the trained model at `folder` copied into `model` (a resumed run's
/// checkpoint replaces it later).
fn warm_start<B: TrainBackend>(
    folder: &str,
    model: &mut Vae<f32, B>,
    dataset: &Dataset,
    loader: &Loader,
    modalities: &[(String, usize, usize)],
) -> Result<(), FitError> {
    // The error names the folder already.
    let failed = |e: crate::query::QueryError| FitError::Input {
        store: "init_from (--init-from)".into(),
        reason: e.to_string(),
    };
    let trained = crate::query::ReferenceModel::open(folder).map_err(failed)?;
    let var_names = modalities
        .iter()
        .map(|(name, _, _)| Ok((name.clone(), crate::reference::var_names(dataset, name)?)))
        .collect::<Result<Vec<_>, crate::reference::ReferenceError>>()
        .map_err(|e| FitError::Input {
            store: dataset.store().name(),
            reason: e.to_string(),
        })?;
    let copied = trained
        .warm_start(model, &loader.batch_categories, &var_names)
        .map_err(failed)?;
    tracing::info!(
        from = folder,
        values = copied,
        "started from a trained model"
    );
    Ok(())
}

/// The loader's matrix of each modality: X, or `layers/<name>`.
pub(crate) fn matrix_of(layer: Option<&str>) -> String {
    layer.map_or_else(|| "X".to_string(), |l| format!("layers/{l}"))
}

/// Cells read for the count check: enough to catch normalised or log-transformed data, which
/// is non-integer in almost every cell, at the cost of one block read.
const COUNT_CHECK_CELLS: u64 = 1_000;

/// Warns, as scvi-tools does, when a modality modelled by a count likelihood holds values that
/// are not counts in its first cells (training goes on: the user may mean it).
fn warn_unless_counts(
    dataset: &Dataset,
    matrix: &str,
    modalities: &[(String, usize, usize)],
    specs: &[tessera_models::ModalitySpec],
) -> Result<(), FitError> {
    for ((name, _, _), spec) in modalities.iter().zip(specs) {
        if !spec.likelihood.expects_counts() {
            continue;
        }
        let adata = match dataset {
            Dataset::AnnData(a) => a.clone(),
            Dataset::MuData(m) => m.modality(name)?.1.clone(),
        };
        if let Some((cell, gene, value)) = adata.first_non_count(matrix, COUNT_CHECK_CELLS)? {
            tracing::warn!(
                element = %adata.element(matrix),
                cell = %cell,
                gene = %gene,
                value,
                likelihood = ?spec.likelihood,
                "the matrix does not look like counts (negative, non-integer or beyond 2^24 \
                 values); the count likelihoods expect unnormalised counts (--layer picks \
                 another matrix)"
            );
        }
    }
    Ok(())
}

/// Progress events for a bar or logs.
#[derive(Debug, Clone)]
pub enum Progress<'a> {
    Start { epochs: usize, cells_per_epoch: u64 },
    Batch { cells: usize, loss: &'a LossTerms },
    Epoch(&'a EpochRecord),
}

/// Trains on `opts.data` alone on `opts.device` (f32) and writes the outputs.
pub fn fit(opts: &FitOptions, progress: impl FnMut(Progress<'_>)) -> Result<FitReport, FitError> {
    fit_until(opts, std::sync::Arc::default(), progress)
}

/// `fit`, stopping after the step in which `stop` is set (`FitError::Stopped`, the step
/// checkpointed for `--resume`).
pub fn fit_until(
    opts: &FitOptions,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    progress: impl FnMut(Progress<'_>),
) -> Result<FitReport, FitError> {
    // Alone, the step still has the configured parts (default one): the model is the one a
    // job of as many parts on any number of workers trains.
    let parts = opts.config.train.parts.unwrap_or(1);
    let report = match opts.device {
        Device::Cpu => train(
            opts,
            &mut Placement::alone_until(Cpu, stop).with_parts(parts),
            progress,
        )?,
        Device::Cuda(_) => train(
            opts,
            &mut Placement::alone_until(opts.device.cuda(opts.config.train.tf32)?, stop)
                .with_parts(parts),
            progress,
        )?,
    };
    report.ok_or_else(|| FitError::Output {
        path: opts.out.display().to_string(),
        reason: "rank 0 of one wrote no outputs".into(),
    })
}

/// Trains on `opts.data` as one rank of `place` (alone: `Placement::alone_until`). Rank 0 writes the
/// checkpoints and the outputs and returns the report; the other ranks return None.
pub fn train<B: TrainBackend>(
    opts: &FitOptions,
    place: &mut Placement<B>,
    mut progress: impl FnMut(Progress<'_>),
) -> Result<Option<FitReport>, FitError> {
    let mut run = Run::prepare(opts, place)?;
    progress(Progress::Start {
        epochs: run.epochs,
        cells_per_epoch: run.n_obs,
    });
    let mut upcoming = if run.state.epochs_done < run.epochs {
        Some(run.start_epoch(run.state.epochs_done)?)
    } else {
        None
    };
    let mut resumed_within = run.state.within_epoch.take();
    let mut last_end = None;
    for epoch in run.state.epochs_done..run.epochs {
        let streams = match upcoming.take() {
            Some(s) => s,
            None => run.start_epoch(epoch)?,
        };
        let steps = run.steps(epoch, streams, resumed_within.take(), &mut progress)?;
        if epoch == 0 || run.state.n_train == 0 {
            run.state.n_train = steps.sums.cells as u64;
        }
        // The next epoch's first fetch is read while this one validates and records: otherwise
        // every epoch would open by waiting for it.
        if epoch + 1 < run.epochs {
            upcoming = Some(run.start_epoch(epoch + 1)?);
        }
        if let Some(end) = run.end_of_epoch(epoch, steps, &mut progress)? {
            last_end = Some(end);
            break;
        }
    }
    run.finish(last_end)
}

/// Where a run's checkpoints go: `<out>/checkpoint`, or for a job one folder per epoch (and per
/// stopped step), so a resume loads exactly the one the coordinator recorded, not a later one
/// it never heard of.
#[derive(Debug)]
struct Checkpoints {
    dir: PathBuf,
    per_epoch: bool,
}

impl Checkpoints {
    /// The checkpoint after `epochs_done` whole epochs.
    fn after(&self, epochs_done: usize) -> PathBuf {
        if self.per_epoch {
            self.dir.join(format!("epoch-{epochs_done:06}"))
        } else {
            self.dir.clone()
        }
    }

    /// The checkpoint of a run stopped at `step`, within epoch `epochs_done`.
    fn within(&self, epochs_done: usize, step: u64) -> PathBuf {
        if self.per_epoch {
            self.dir.join(format!("epoch-{epochs_done:06}-step-{step}"))
        } else {
            self.dir.clone()
        }
    }
}

/// How a run's last epoch ended on this rank: (epoch, training cells read, step times).
type LastEpoch = (usize, u64, StepTimes);

/// What the model cannot be built or trained on, refused by name before it is: a modality
/// without features, and (with BatchNorm, which normalises over a batch) fewer than two
/// training cells.
fn check_sizes(
    opts: &FitOptions,
    shapes: &[(&str, usize)],
    training_cells: u64,
) -> Result<(), FitError> {
    let refuse = |reason: String| {
        Err(FitError::Input {
            store: opts.data.clone(),
            reason,
        })
    };
    if let Some((name, _)) = shapes.iter().find(|(_, g)| *g == 0) {
        return refuse(format!(
            "modality {name:?} has 0 features (var is empty): nothing to model"
        ));
    }
    if opts.config.model.batch_norm && training_cells < 2 {
        return refuse(format!(
            "{training_cells} training cell(s): BatchNorm normalises over a batch and needs at \
             least 2 (train on more cells, or set batch_norm = false)"
        ));
    }
    Ok(())
}

/// One rank's training run. [`Run::prepare`] reads the data's shape, builds the model and
/// resumes; then each epoch is [`Run::steps`] (the training steps, all-reduced) and
/// [`Run::end_of_epoch`] (validation, record, [`policy`], checkpoint, reports); [`Run::finish`]
/// writes the outputs on rank 0.
struct Run<'a, B: TrainBackend> {
    opts: &'a FitOptions,
    place: &'a mut Placement<B>,
    n_obs: u64,
    epochs: usize,
    loader: Loader,
    holdout: Holdout,
    plan: OutputPlan,
    inputs: Inputs,
    denoised_keys: Vec<(&'static str, String)>,
    trainer: Trainer<f32, B>,
    checkpoints: Checkpoints,
    /// This rank's held-out cells as model batches, kept for every epoch's validation.
    validation: Vec<ModelBatch>,
    /// This rank's parts and their training cells.
    training: Vec<(usize, Loader)>,
    /// This rank's parts' counts on the device, when kept there.
    resident: Vec<ResidentPart<B>>,
    state: FitState,
    reducer: StepReducer<B>,
    /// Training steps captured to replay, kept across epochs.
    replays: B::Replays,
    stopped_early: bool,
}

impl<'a, B: TrainBackend> Run<'a, B> {
    /// Everything before the first step: the loaders of this rank's parts, the output plan
    /// (existing outputs refused now rather than after hours of training), the model, the
    /// validation batches and, when asked, the checkpoint to resume from.
    fn prepare(opts: &'a FitOptions, place: &'a mut Placement<B>) -> Result<Run<'a, B>, FitError> {
        check_epochs(&opts.config.train)?;
        let dataset = Dataset::open(&opts.data)?;
        let n_obs = dataset.n_obs();
        let tc = opts.config.train.clone();
        let mc = &opts.config.model;
        let rank = place.comm.rank();
        let mut numeric_keys = head_columns(mc, opts.label_key.as_deref())?;
        numeric_keys.extend(opts.covariates.continuous.iter().cloned());
        let loader_config = LoaderConfig {
            batch_size: tc.batch_size,
            shuffle: true,
            seed: tc.seed,
            batch_key: opts.batch_key.clone(),
            label_key: opts.label_key.clone(),
            unlabeled_category: opts.unlabeled_category.clone(),
            categorical_keys: opts.covariates.categorical.clone(),
            numeric_keys,
            cache_bytes: opts.cache_bytes,
            matrix: matrix_of(opts.layer.as_deref()),
            ..LoaderConfig::default()
        };
        let loader = Loader::new(&dataset, 0..n_obs, loader_config)?;
        // scvi-tools' split: floor(fraction · n) cells held out (here at most the cap), the
        // batches cut from the training cells alone.
        let holdout = Holdout::new(0..n_obs, tc.seed, tc.validation_cells(n_obs));
        let ranges = parallel::part_ranges(&dataset, place.parts, tc.batch_size)?;
        let my_parts: Vec<usize> = place.my_parts().collect();
        let part_loaders: Vec<(usize, Loader)> = my_parts
            .iter()
            .map(|&k| {
                Ok((
                    k,
                    loader.shard(
                        ranges[k].clone(),
                        parallel::part_batch_size(tc.batch_size, place.parts, k),
                    )?,
                ))
            })
            .collect::<Result<_, FitError>>()?;
        let plan = OutputPlan::new(
            &dataset,
            &opts.modalities,
            &loader.modality_names(),
            &opts.data,
        )?;
        // Refused now rather than after hours of training.
        let denoised_keys: Vec<(&str, String)> = match &opts.denoised {
            None => Vec::new(),
            Some(d) if plan.layer => vec![("layers", d.key.clone())],
            Some(d) => plan
                .modalities
                .iter()
                .map(|(name, _, _)| ("obsm", format!("{}_{name}", d.key)))
                .collect(),
        };
        let classify = mc.classifier_weight > 0.0;
        let prediction_keys: Vec<(&str, String)> = if classify {
            vec![
                ("obs", opts.prediction_key.clone()),
                ("obsm", format!("{}_probabilities", opts.prediction_key)),
            ]
        } else {
            Vec::new()
        };
        for (mapping, key) in std::iter::once(("obsm", opts.embedding_key.clone()))
            .chain(denoised_keys.iter().cloned())
            .chain(prediction_keys.iter().cloned())
        {
            if opts.store_outputs && !opts.overwrite && plan.target.keys(mapping)?.contains(&key) {
                return Err(tessera_data::DataError::Exists {
                    store: opts.data.clone(),
                    path: plan.target.element(&format!("{mapping}/{key}")),
                }
                .into());
            }
        }
        let shapes: Vec<(&str, usize)> = plan
            .modalities
            .iter()
            .map(|(name, _, g)| (name.as_str(), *g))
            .collect();
        check_sizes(opts, &shapes, n_obs - tc.validation_cells(n_obs))?;
        let n_batch = loader.batch_categories.len();
        let n_labels = loader.label_categories.len();
        if mc.needs_labels() && n_labels < 2 {
            return Err(FitError::Input {
                store: opts.data.clone(),
                reason: format!(
                    "obs/{}: {n_labels} label categories; the classifier and contrastive loss need at least 2",
                    opts.label_key.as_deref().unwrap_or_default()
                ),
            });
        }
        let inputs = Inputs {
            modalities: plan.modalities.iter().map(|m| m.1).collect(),
            n_batch,
            covariates: covariates_of(&loader, &opts.covariates, &opts.data)?,
            n_targets: mc.regression_keys.len() * usize::from(mc.regression_weight > 0.0),
            survival: mc.cox_weight > 0.0,
        };

        let mut model = Vae::<f32, B>::new(
            place.device.clone(),
            mc.clone(),
            &shapes,
            Categories {
                n_batch,
                n_cov: n_batch + inputs.covariates.width(),
                n_labels,
            },
            tc.seed,
        )?;
        if rank == 0 {
            let matrix = matrix_of(opts.layer.as_deref());
            warn_unless_counts(&dataset, &matrix, &plan.modalities, &model.modalities)?;
        }
        for (m, spec) in model.modalities.clone().iter().enumerate() {
            if spec.likelihood == LikelihoodKind::NbMixture {
                let rates = background_log_rates(
                    &loader,
                    inputs.modalities[m],
                    spec.n_features,
                    n_batch.max(1),
                )?;
                model.initialise_background(m, &rates)?;
            }
        }
        if let Some(folder) = &opts.init_from {
            warm_start(folder, &mut model, &dataset, &loader, &plan.modalities)?;
        }
        let mut trainer = Trainer::new(model, tc.clone())?;
        let epochs = tc.epochs(n_obs);
        let resolved = serde_json::json!({
            "data": opts.data,
            "modalities": model_shapes(&trainer.model),
            "batch_key": opts.batch_key,
            "label_key": opts.label_key,
            "n_obs": n_obs,
            "batch_categories": loader.batch_categories,
            "label_categories": loader.label_categories,
            "covariates": inputs.covariates,
            "model": opts.config.model,
            "train": opts.config.train,
            "parts": place.parts,
            "epochs": epochs,
        });
        let checkpoints = Checkpoints {
            dir: opts.out.join("checkpoint"),
            per_epoch: place.checkpoint_per_epoch,
        };
        // This rank's held-out cells stay in memory as model batches for every epoch's validation.
        let mut validation = Vec::new();
        for (_, part) in &part_loaders {
            for mb in part.ordered().with_cells(Cells::HeldOut(holdout)).epoch(0) {
                validation.push(inputs.batch(mb?));
            }
        }
        let mut state = FitState {
            epochs_done: 0,
            step: 0,
            plateau: Plateau::new(tc.lr),
            best: f64::INFINITY,
            since_best: 0,
            n_train: 0,
            history: Vec::new(),
            run: resolved.clone(),
            within_epoch: None,
        };
        let resume_from = place
            .resume_from
            .clone()
            .or_else(|| opts.resume.then(|| checkpoints.dir.clone()));
        if let Some(dir) = resume_from {
            state = checkpoint::load(&dir, &resolved, &mut trainer)?;
            tracing::info!(
                epoch = state.epochs_done,
                step = state.step,
                rank,
                "resuming from {}",
                dir.display()
            );
        }
        let training = part_loaders
            .iter()
            .map(|(k, l)| (*k, l.with_cells(Cells::Training(holdout))))
            .collect();
        let reducer = StepReducer::new(&trainer)?;
        // After the model, so that the free memory left for the counts is measured with it there.
        let parts: Vec<PartCells<'_>> = part_loaders
            .iter()
            .map(|(k, l)| (*k, ranges[*k].clone(), l))
            .collect();
        let resident = resident::keep_on_device(
            &place.device,
            tc.resident_data,
            &parts,
            &inputs.modalities,
            &opts.data,
        )?;
        Ok(Run {
            opts,
            place,
            n_obs,
            epochs,
            loader,
            holdout,
            plan,
            inputs,
            denoised_keys,
            trainer,
            checkpoints,
            validation,
            training,
            resident,
            state,
            reducer,
            replays: B::Replays::default(),
            stopped_early: false,
        })
    }

    /// The streams of epoch `epoch`'s batches, one per part of this rank.
    fn start_epoch(&self, epoch: usize) -> Result<Vec<PartStream>, FitError> {
        self.training
            .iter()
            .map(|(k, l)| PartStream::new(*k, l.epoch(epoch as u64)))
            .collect()
    }

    /// The training steps of epoch `epoch` until every part's stream ends. `within`: a resume
    /// inside this epoch. A stop request (in the step's reduction) checkpoints the step and
    /// returns `FitError::Stopped`.
    fn steps(
        &mut self,
        epoch: usize,
        streams: Vec<PartStream>,
        within: Option<WithinEpoch>,
        progress: &mut impl FnMut(Progress<'_>),
    ) -> Result<EpochSteps, FitError> {
        let inputs = &self.inputs;
        let mut stepper = Stepper {
            trainer: &mut self.trainer,
            place: self.place,
            reducer: &mut self.reducer,
            resident: &self.resident,
            store: &self.opts.data,
            replays: &mut self.replays,
        };
        let steps = stepper.epoch(
            epoch,
            streams,
            within,
            |mb| inputs.batch(mb),
            |terms| {
                progress(Progress::Batch {
                    cells: terms.cells,
                    loss: terms,
                });
                Ok::<_, FitError>(())
            },
        )?;
        let Some(here) = steps.stopped else {
            return Ok(steps);
        };
        self.state.within_epoch = Some(steps.within());
        self.state.step = self.trainer.step;
        let location = self
            .checkpoints
            .within(self.state.epochs_done, self.trainer.step);
        Err(stop_after_step(
            self.place.comm.as_mut(),
            self.place.hooks.as_mut(),
            &self.trainer,
            &self.state,
            &location,
            here,
        ))
    }

    /// The end of epoch `epoch`: validation (all-reduced), the epoch's record, the policy's
    /// decision (learning rate, early stopping, checkpoint), then the reports to the
    /// coordinator. Returns how the last epoch ended when training ends here.
    fn end_of_epoch(
        &mut self,
        epoch: usize,
        steps: EpochSteps,
        progress: &mut impl FnMut(Progress<'_>),
    ) -> Result<Option<LastEpoch>, FitError> {
        let EpochSteps {
            started,
            times,
            sums,
            seconds_before,
            my_cells,
            ..
        } = steps;
        let kl_weight = self.trainer.config.kl_weight(epoch);
        let mut pending = Vec::with_capacity(self.validation.len());
        for b in &self.validation {
            let trainer = &mut self.trainer;
            pending.push(on_pool(|| b.with(|b| trainer.validate(b, epoch)))?);
        }
        let device = self.trainer.model.backend().clone();
        let mut v = Sums::default();
        for terms in PendingLoss::resolve_all(&device, &pending)? {
            v.add(&terms);
        }
        let v = v.all_reduce(self.place.comm.as_mut())?;
        let validation_terms = (v.cells > 0).then(|| v.mean(kl_weight));
        // The epoch's wall time includes its validation pass (as scvi-tools' epochs do).
        let seconds = seconds_before + started.elapsed().as_secs_f64();
        let record = EpochRecord {
            epoch,
            kl_weight,
            lr: self.trainer.lr(),
            train: sums.mean(kl_weight),
            validation: validation_terms,
            seconds,
            cells_per_second: sums.cells as f64 / seconds.max(1e-9),
            steps: times,
        };
        progress(Progress::Epoch(&record));
        let monitored = record
            .validation
            .map_or(record.train, |v| v)
            .negative_elbo();
        self.state.history.push(record);
        let state = &mut self.state;
        let decision = policy::end_of_epoch(
            state,
            monitored,
            epoch,
            self.epochs,
            &self.opts.config.train,
        );
        if decision.lr != self.trainer.lr() {
            tracing::info!(epoch, lr = decision.lr, "learning rate reduced on plateau");
            self.trainer.set_lr(decision.lr);
        }
        if decision.stop_early {
            self.stopped_early = true;
            tracing::info!(
                epoch,
                best = state.best,
                "early stopping: no lower validation ELBO for {} epochs",
                state.since_best
            );
        }
        state.epochs_done = epoch + 1;
        state.step = self.trainer.step;
        let saved = self.place.comm.rank() == 0 && decision.checkpoint;
        if saved {
            checkpoint::save(
                &self.checkpoints.after(state.epochs_done),
                state,
                &self.trainer,
            )?;
            if self.checkpoints.per_epoch {
                // The coordinator may still resume from the previous one until this one is
                // announced; older ones are never needed again.
                let keep_from = state.epochs_done.saturating_sub(1);
                checkpoint::remove_before(&self.checkpoints.dir, keep_from)?;
            }
        }
        if decision.last {
            return Ok(Some((epoch, my_cells, times)));
        }
        let record = state.history.last().ok_or_else(|| FitError::Output {
            path: self.checkpoints.dir.display().to_string(),
            reason: "no epoch record".into(),
        })?;
        self.place.hooks.epoch_done(&EpochEnd {
            epoch,
            step: self.trainer.step,
            cells: my_cells,
            last: false,
            record,
            times,
        })?;
        // Every rank has said its epoch is done before rank 0 announces the checkpoint of it.
        self.place.comm.barrier()?;
        if saved {
            self.place.hooks.checkpoint_saved(
                state.epochs_done,
                self.trainer.step,
                &self.checkpoints.after(state.epochs_done),
            )?;
        }
        Ok(None)
    }

    /// Rank 0 writes the outputs; then the job's last epoch is reported (the job ends when every
    /// rank has said so: rank 0 does after writing the outputs).
    fn finish(mut self, last_end: Option<LastEpoch>) -> Result<Option<FitReport>, FitError> {
        let report = if self.place.comm.rank() == 0 {
            Some(write_outputs(&mut self)?)
        } else {
            None
        };
        if let (Some((epoch, cells, times)), Some(record)) = (last_end, self.state.history.last()) {
            self.place.hooks.epoch_done(&EpochEnd {
                epoch,
                step: self.trainer.step,
                cells,
                last: true,
                record,
                times,
            })?;
        }
        Ok(report)
    }
}

/// Every rank saw a stop request in the step's reduction: rank 0 checkpoints the step (state
/// carries how far into the epoch it got) and announces it, then every rank returns
/// `FitError::Stopped` together, so a rank that leaves does so after the announcement.
fn stop_after_step<B: TrainBackend>(
    comm: &mut dyn Collective<B>,
    hooks: &mut (dyn EpochHooks + Send),
    trainer: &Trainer<f32, B>,
    state: &FitState,
    location: &Path,
    here: bool,
) -> FitError {
    let mut stopped = || -> Result<(), FitError> {
        if comm.rank() == 0 {
            checkpoint::save(location, state, trainer)?;
            hooks.checkpoint_saved(state.epochs_done, trainer.step, location)?;
        }
        comm.barrier()?;
        Ok(())
    };
    match stopped() {
        Ok(()) => FitError::Stopped {
            epoch: state.epochs_done,
            step: trainer.step,
            checkpoint: location.display().to_string(),
            here,
        },
        Err(e) => e,
    }
}

/// What the trained model gives every cell, in store order, for rank 0's outputs.
struct Decoded {
    /// Latent means, cells x n_latent.
    embedding: Vec<f32>,
    /// Per modelled modality, cells x features (empty unless `FitOptions::denoised`).
    denoised: Vec<Vec<f32>>,
    /// Classifier probabilities, cells x labels (empty without a classifier).
    probabilities: Vec<f32>,
    /// The held-out cells (obs rows).
    validation_cells: Vec<u64>,
    /// Label codes per cell (empty without a label key).
    labels: Vec<i32>,
}

/// Every cell of the store through the trained model, in store order.
fn decode_all<B: TrainBackend>(run: &mut Run<'_, B>) -> Result<Decoded, FitError> {
    let Run {
        opts,
        loader,
        plan,
        inputs,
        trainer,
        holdout,
        ..
    } = run;
    let n_latent = opts.config.model.n_latent;
    let n = loader.n_cells() as usize;
    let classify = opts.config.model.classifier_weight > 0.0;
    let n_labels = loader.label_categories.len();
    let mut out = Decoded {
        embedding: vec![0f32; n * n_latent],
        denoised: if opts.denoised.is_some() {
            plan.modalities
                .iter()
                .map(|(_, _, g)| vec![0f32; n * g])
                .collect()
        } else {
            Vec::new()
        },
        probabilities: vec![0f32; if classify { n * n_labels } else { 0 }],
        validation_cells: Vec::new(),
        labels: vec![-1i32; if opts.label_key.is_some() { n } else { 0 }],
    };
    for mb in loader.ordered().epoch(0) {
        let mb = mb?;
        // The batch takes the counts; the cells and labels (one each per row) are kept here.
        let (cells, label) = (mb.cells.clone(), mb.label.clone());
        let batch = inputs.batch(mb);
        let (z, expression) = match &opts.denoised {
            Some(d) => {
                on_pool(|| batch.with(|b| trainer.model.latent_and_expression(b, d.library_size)))?
            }
            None => (
                on_pool(|| batch.with(|b| trainer.model.latent_mean(b)))?,
                Vec::new(),
            ),
        };
        let p = on_pool(|| batch.with(|b| trainer.model.predict_labels(b)))?.unwrap_or_default();
        for (r, &cell) in cells.iter().enumerate() {
            if holdout.holds(cell) {
                out.validation_cells.push(cell);
            }
            let cell = cell as usize;
            out.embedding[cell * n_latent..(cell + 1) * n_latent]
                .copy_from_slice(&z[r * n_latent..(r + 1) * n_latent]);
            if let (Some(slot), Some(&code)) = (out.labels.get_mut(cell), label.get(r)) {
                *slot = code;
            }
            if classify {
                out.probabilities[cell * n_labels..(cell + 1) * n_labels]
                    .copy_from_slice(&p[r * n_labels..(r + 1) * n_labels]);
            }
            for ((all, e), (_, _, g)) in out
                .denoised
                .iter_mut()
                .zip(&expression)
                .zip(&plan.modalities)
            {
                all[cell * g..(cell + 1) * g].copy_from_slice(&e[r * g..(r + 1) * g]);
            }
        }
    }
    Ok(out)
}

/// Where rank 0 wrote into the store, as `FitReport` names them.
#[derive(Default)]
struct StoreElements {
    embedding: String,
    denoised: Vec<String>,
    predictions: Vec<String>,
    /// Earlier runs' outputs this run did not rewrite.
    stale: Vec<String>,
}

/// The embedding, expression and predictions written into the store, with their provenance.
fn write_into_store(
    opts: &FitOptions,
    plan: &OutputPlan,
    denoised_keys: &[(&'static str, String)],
    label_categories: &[String],
    decoded: &Decoded,
) -> Result<StoreElements, FitError> {
    let n_latent = opts.config.model.n_latent;
    plan.target.write_obsm(
        &opts.embedding_key,
        &decoded.embedding,
        n_latent,
        opts.overwrite,
    )?;
    let mut elements = StoreElements {
        embedding: plan.target.element(&format!("obsm/{}", opts.embedding_key)),
        ..StoreElements::default()
    };
    for ((mapping, key), (values, (_, _, g))) in denoised_keys
        .iter()
        .zip(decoded.denoised.iter().zip(&plan.modalities))
    {
        if *mapping == "layers" {
            plan.target.write_dense_layer(key, values, opts.overwrite)?;
        } else {
            plan.target.write_obsm(key, values, *g, opts.overwrite)?;
        }
        elements
            .denoised
            .push(plan.target.element(&format!("{mapping}/{key}")));
    }
    let mut written = vec![format!("obsm/{}", opts.embedding_key)];
    written.extend(
        denoised_keys
            .iter()
            .map(|(mapping, key)| format!("{mapping}/{key}")),
    );
    if opts.config.model.classifier_weight > 0.0 {
        let n_labels = label_categories.len();
        let codes: Vec<i32> = decoded
            .probabilities
            .chunks(n_labels)
            .map(|p| {
                p.iter()
                    .enumerate()
                    .fold((0, f32::NEG_INFINITY), |best, (k, &v)| {
                        if v > best.1 { (k, v) } else { best }
                    })
                    .0 as i32
            })
            .collect();
        let column = tessera_data::Column::Categorical {
            codes,
            categories: label_categories.to_vec(),
            ordered: false,
        };
        plan.target
            .write_obs_column(&opts.prediction_key, &column, opts.overwrite)?;
        let key = format!("{}_probabilities", opts.prediction_key);
        plan.target
            .write_obsm(&key, &decoded.probabilities, n_labels, opts.overwrite)?;
        written.push(format!("obs/{}", opts.prediction_key));
        written.push(format!("obsm/{key}"));
    }
    elements.predictions = written[1 + denoised_keys.len()..]
        .iter()
        .map(|e| plan.target.element(e))
        .collect();
    let stale = crate::provenance::record(&plan.target, &written, opts)?;
    for element in &stale {
        tracing::warn!(
            element = %plan.target.element(element),
            "left from an earlier run: this run did not rewrite it (uns/tessera_provenance \
             says which run wrote it)"
        );
    }
    elements.stale = stale.iter().map(|e| plan.target.element(e)).collect();
    Ok(elements)
}

/// Rank 0's results: the embedding (and expression, predictions) of every cell written into the
/// store (unless `FitOptions::store_outputs` is off), then the run's records in the output
/// folder.
fn write_outputs<B: TrainBackend>(run: &mut Run<'_, B>) -> Result<FitReport, FitError> {
    let decoded = decode_all(run)?;
    let stopped_early = run.stopped_early;
    let Run {
        opts,
        loader,
        plan,
        trainer,
        state,
        denoised_keys,
        ..
    } = run;
    let n_latent = opts.config.model.n_latent;

    std::fs::create_dir_all(&opts.out).map_err(|e| FitError::Output {
        path: opts.out.display().to_string(),
        reason: e.to_string(),
    })?;
    write_history(&opts.out.join("history.csv"), &state.history)?;
    // Which cells validated (obs rows, 0-based), so another tool can validate on the same ones.
    write_file(
        &opts.out.join("validation_cells.csv"),
        decoded
            .validation_cells
            .iter()
            .fold(String::from("cell\n"), |csv, c| csv + &c.to_string() + "\n")
            .as_bytes(),
    )?;
    let plot = opts.out.join("loss.png");
    crate::plot::loss_plot(&state.history, &plot).map_err(|reason| FitError::Output {
        path: plot.display().to_string(),
        reason,
    })?;
    checkpoint::write_weights(&opts.out.join("model.safetensors"), trainer)?;
    let dataset = Dataset::open(&opts.data)?;
    let var_names = plan
        .modalities
        .iter()
        .map(|(name, _, _)| Ok((name.clone(), crate::reference::var_names(&dataset, name)?)))
        .collect::<Result<_, crate::reference::ReferenceError>>();
    let reference_path = opts.out.join(crate::reference::REFERENCE_FILE);
    let reference_error = |e: crate::reference::ReferenceError| FitError::Output {
        path: reference_path.display().to_string(),
        reason: e.to_string(),
    };
    let reference = crate::reference::Reference {
        latent: decoded.embedding.clone(),
        n_latent,
        labels: decoded.labels.clone(),
        label_key: opts.label_key.clone(),
        label_categories: loader.label_categories.clone(),
        batch_key: opts.batch_key.clone(),
        batch_categories: loader.batch_categories.clone(),
        var_names: var_names.map_err(reference_error)?,
    };
    reference.write(&reference_path).map_err(reference_error)?;
    write_file(
        &opts.out.join("config.json"),
        serde_json::to_string_pretty(&state.run)
            .unwrap_or_default()
            .as_bytes(),
    )?;
    // The user's store last: a run that fails before here leaves it as it was.
    let elements = if opts.store_outputs {
        write_into_store(
            opts,
            plan,
            denoised_keys,
            &loader.label_categories,
            &decoded,
        )?
    } else {
        StoreElements::default()
    };
    let Decoded {
        embedding,
        denoised,
        validation_cells,
        ..
    } = decoded;
    let report = FitReport {
        history: state.history.clone(),
        stopped_early,
        n_train: state.n_train,
        n_validation: validation_cells.len() as u64,
        modalities: model_shapes(&trainer.model),
        batch_categories: loader.batch_categories.clone(),
        embedding,
        n_latent,
        embedding_element: elements.embedding,
        denoised_elements: elements.denoised,
        denoised,
        stale_elements: elements.stale,
        prediction_elements: elements.predictions,
    };
    write_file(
        &opts.out.join(REPORT_FILE),
        serde_json::to_string_pretty(&report)
            .unwrap_or_default()
            .as_bytes(),
    )?;
    Ok(report)
}

/// Cells read to start an NB mixture's background rates.
const BACKGROUND_SAMPLE_CELLS: usize = 20_000;

/// Per batch and feature, the mean of log(1 + x) over the lower half of the measured cells'
/// counts (up to the first `BACKGROUND_SAMPLE_CELLS` cells): the background component of
/// bimodal protein counts, where totalVI starts its background prior (there from a two-component
/// Gaussian mixture). Batches without cells get the pooled value.
fn background_log_rates(
    loader: &Loader,
    modality: usize,
    features: usize,
    batches: usize,
) -> Result<Vec<f32>, FitError> {
    let mut values: Vec<Vec<Vec<f32>>> = vec![vec![Vec::new(); features]; batches + 1];
    let mut seen = 0;
    for mb in loader.epoch(0) {
        let mb = mb?;
        let counts = &mb.modalities[modality];
        for r in (0..mb.cells.len()).filter(|&r| counts.present[r]) {
            let mut row = vec![0f32; features];
            let span = counts.counts.indptr[r] as usize..counts.counts.indptr[r + 1] as usize;
            for (&c, &v) in counts.counts.indices[span.clone()]
                .iter()
                .zip(&counts.counts.data[span])
            {
                row[c as usize] = v;
            }
            let batch = usize::try_from(mb.batch[r])
                .ok()
                .filter(|&b| b < batches)
                .unwrap_or(0);
            for (g, &v) in row.iter().enumerate() {
                values[batch][g].push(v.max(0.0).ln_1p());
                values[batches][g].push(v.max(0.0).ln_1p());
            }
        }
        seen += mb.cells.len();
        if seen >= BACKGROUND_SAMPLE_CELLS {
            break;
        }
    }
    let lower_mean = |v: &mut Vec<f32>| -> Option<f32> {
        if v.is_empty() {
            return None;
        }
        v.sort_by(f32::total_cmp);
        let half = &v[..v.len().div_ceil(2)];
        Some(half.iter().sum::<f32>() / half.len() as f32)
    };
    let pooled: Vec<f32> = values[batches]
        .iter_mut()
        .map(|v| lower_mean(v).unwrap_or(0.0))
        .collect();
    Ok((0..batches)
        .flat_map(|b| {
            (0..features)
                .map(|g| lower_mean(&mut values[b][g]).unwrap_or(pooled[g]))
                .collect::<Vec<_>>()
        })
        .collect())
}

/// Runs one model call on a thread of the compute pool, so each op's parallel loop starts where
/// it is called instead of being handed to the pool and waited for (a context switch per op:
/// ~17% of a step on one core). Only the call goes to the pool, one hand-off per step: a pool
/// thread must never wait on the loader, whose decoding needs the same pool (two concurrent
/// fits, or a one-thread pool, would deadlock).
pub(crate) fn on_pool<R: Send>(call: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| call())
}

fn model_shapes<B: TrainBackend>(model: &Vae<f32, B>) -> Vec<(String, usize)> {
    model
        .modalities
        .iter()
        .map(|m| (m.name.clone(), m.n_features))
        .collect()
}

/// The modalities to model and where the outputs go.
struct OutputPlan {
    /// (name, index among the loader's modalities, features).
    modalities: Vec<(String, usize, usize)>,
    /// The AnnData whose obsm receives the embedding: the store itself, the one modality of a
    /// MuData store when it covers every cell, else the MuData root (a joint embedding).
    target: AnnData,
    /// Whether the denoised expression fits the target's layers (one modality, every cell).
    layer: bool,
}

impl OutputPlan {
    fn new(
        dataset: &Dataset,
        wanted: &[String],
        loaded: &[String],
        store: &str,
    ) -> Result<OutputPlan, FitError> {
        let index = |name: &str| {
            loaded
                .iter()
                .position(|n| n == name)
                .ok_or_else(|| FitError::Input {
                    store: store.into(),
                    reason: format!("no modality {name:?}; the store has {loaded:?}"),
                })
        };
        match dataset {
            Dataset::AnnData(a) => {
                if let Some(other) = wanted.iter().find(|w| !loaded.contains(w)) {
                    return Err(FitError::Input {
                        store: store.into(),
                        reason: format!(
                            "no modality {other:?}: an AnnData store has one matrix, X"
                        ),
                    });
                }
                Ok(OutputPlan {
                    modalities: vec![(loaded[0].clone(), 0, a.n_vars() as usize)],
                    target: a.clone(),
                    layer: true,
                })
            }
            Dataset::MuData(m) => {
                let names: Vec<String> = if wanted.is_empty() {
                    m.modalities.iter().map(|(n, _)| n.clone()).collect()
                } else {
                    wanted.to_vec()
                };
                if names.is_empty() {
                    return Err(FitError::Input {
                        store: store.into(),
                        reason: "MuData store has no modalities".into(),
                    });
                }
                let mut modalities = Vec::with_capacity(names.len());
                for name in &names {
                    let (i, adata) = m.modality(name)?;
                    modalities.push((name.clone(), index(name)?, adata.n_vars() as usize));
                    if names.len() == 1
                        && (adata.n_obs() == m.n_obs() && m.presence(i).iter().all(|&p| p))
                    {
                        return Ok(OutputPlan {
                            modalities,
                            target: adata.clone(),
                            layer: true,
                        });
                    }
                }
                Ok(OutputPlan {
                    modalities,
                    target: m.root(),
                    layer: false,
                })
            }
        }
    }
}

impl Inputs {
    /// Every cell of a training minibatch in the model's input form: every modality of the
    /// model, the batch covariates and the heads' labels and numeric targets.
    fn batch(&self, mut mb: MiniBatch) -> ModelBatch {
        let inputs = self;
        let rows: &[usize] = &(0..mb.cells.len()).collect::<Vec<_>>();
        let modalities = inputs
            .modalities
            .iter()
            .map(|&m| {
                // Every row, in order: the loader's arrays themselves (a model reads a
                // modality once).
                let modality = &mut mb.modalities[m];
                ModalityRows::new(
                    std::mem::take(&mut modality.counts),
                    std::mem::take(&mut modality.present),
                )
            })
            .collect();
        let heads = inputs.n_targets + if inputs.survival { 2 } else { 0 };
        let k = heads + inputs.covariates.continuous.len();
        let numeric = |r: usize, j: usize| mb.numeric[r * k + j];
        let continuous: Vec<f64> = rows
            .iter()
            .flat_map(|&r| (heads..k).map(move |j| numeric(r, j)))
            .collect();
        // An unknown batch (-1) leaves the row all-zero.
        let covariates = inputs.covariates.rows(
            rows.len(),
            inputs.n_batch,
            |i| usize::try_from(mb.batch[rows[i]]).ok(),
            &mb.categorical,
            &continuous,
        );
        let targets = rows
            .iter()
            .flat_map(|&r| (0..inputs.n_targets).map(move |j| numeric(r, j)))
            .collect();
        let (times, events) = if inputs.survival {
            rows.iter()
                .map(|&r| (numeric(r, heads - 2), numeric(r, heads - 1) > 0.0))
                .unzip()
        } else {
            (Vec::new(), Vec::new())
        };
        ModelBatch {
            rows: rows.len(),
            modalities,
            covariates,
            labels: Some(rows.iter().map(|&r| mb.label[r]).collect()),
            targets,
            times,
            events,
        }
    }
}

pub(crate) fn write_file(path: &Path, bytes: &[u8]) -> Result<(), FitError> {
    std::fs::write(path, bytes).map_err(|e| FitError::Output {
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

fn write_history(path: &Path, history: &[EpochRecord]) -> Result<(), FitError> {
    let terms = |t: &LossTerms| {
        [
            t.loss,
            t.reconstruction,
            t.kl,
            t.regularization,
            t.supervised,
        ]
        .map(|v| v.to_string())
    };
    let mut csv = String::from(
        "epoch,kl_weight,lr,train_loss,train_reconstruction,train_kl,train_regularization,train_supervised,validation_loss,validation_reconstruction,validation_kl,validation_regularization,validation_supervised,seconds,cells_per_second,compute_seconds,allreduce_seconds,data_seconds\n",
    );
    for r in history {
        let v = r
            .validation
            .as_ref()
            .map_or_else(|| [(); 5].map(|_| String::new()), terms);
        let t = &r.steps;
        csv.push_str(&format!(
            "{},{},{},{},{},{:.4},{:.1},{:.4},{:.4},{:.4}\n",
            r.epoch,
            r.kl_weight,
            r.lr,
            terms(&r.train).join(","),
            v.join(","),
            r.seconds,
            r.cells_per_second,
            t.compute,
            t.allreduce,
            t.data
        ));
    }
    write_file(path, csv.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_of_zero_epochs_is_refused_before_its_store_is_opened() {
        let e = check_job("/nonexistent.zarr", "[train]\nmax_epochs = 0\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("max_epochs = 0") && e.contains("expected at least 1"),
            "{e}"
        );
    }
}
