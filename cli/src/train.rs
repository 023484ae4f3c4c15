//! `tessera train`: argument handling, the default data, the progress bar and the summary.

use std::path::PathBuf;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use tessera_metrics::EvalOptions;
use tessera_worker::eval::{DEFAULT_LABEL_KEY, DEFAULT_MAX_CELLS, EvalRequest};
use tessera_worker::fit::Progress;
use tessera_worker::plot::{DEFAULT_PLOT_CELLS, PlotRequest};
use tessera_worker::{Denoised, FitConfig, FitError, FitOptions};

#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// AnnData/MuData Zarr store (path or URL). Default: the simulated demo MuData store
    /// `<out>/data.zarr` (RNA, protein and accessibility; 3 batches, 8 cell types; each
    /// non-RNA modality missing in 30% of cells), created on first use.
    #[arg(long)]
    data: Option<String>,
    /// TOML file with `[model]` and `[train]` tables (see README); absent keys take defaults.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Folder for history.csv, model.safetensors, config.json, checkpoint/ and the eval table.
    #[arg(long, default_value = "tessera-out")]
    out: PathBuf,
    /// The MuData modalities to model, comma-separated (default: all). Several give a joint
    /// embedding in the MuData root's obsm.
    #[arg(long, value_delimiter = ',')]
    modalities: Vec<String>,
    /// obs column with the batch (default: "batch" when the store has it).
    #[arg(long)]
    batch_key: Option<String>,
    /// obs column with cell types: the labels of the classifier and contrastive heads (missing
    /// values = unlabelled cells) and of the eval table written after training (default:
    /// cell_type when present; without one the evaluation is skipped).
    #[arg(long)]
    label_key: Option<String>,
    /// The --label-key value that marks an unlabelled cell (scANVI's `unlabeled_category`,
    /// e.g. Unknown); missing values are unlabelled too.
    #[arg(long, value_name = "LABEL")]
    unlabeled_category: Option<String>,
    /// Override `train.max_epochs`.
    #[arg(long)]
    epochs: Option<usize>,
    /// Override `train.seed` (initialisation, shuffling, the validation split).
    #[arg(long)]
    seed: Option<u64>,
    /// obsm key of the embedding written into the store.
    #[arg(long, default_value = "X_tessera")]
    embedding_key: String,
    /// obs key of the label classifier's predictions (`classifier_weight > 0`), and obsm
    /// <key>_probabilities of its class probabilities.
    #[arg(long, default_value = tessera_worker::fit::PREDICTION_KEY)]
    prediction_key: String,
    /// Replace existing outputs (obsm/<embedding-key>, the predictions, the denoised
    /// expression).
    #[arg(long)]
    overwrite: bool,
    /// Continue the run checkpointed in <out>/checkpoint (same data and config; --epochs may
    /// raise the epoch count). With --workers or under a launcher: continue the job from its
    /// furthest checkpoint if it wrote one (a restarted rank 0), else start from the beginning.
    #[arg(long)]
    resume: bool,
    /// Start from the model trained into this folder (another run's --out): every tensor of the
    /// same name and shape is copied, new heads (a classifier) start fresh. The data's batches
    /// and features must be that model's. scvi-tools' SCANVI.from_scvi_model. With --workers or
    /// a launcher every rank reads the folder.
    #[arg(long, value_name = "DIR")]
    init_from: Option<String>,
    #[command(flatten)]
    inputs: InputArgs,
    /// Also write the denoised expression (decoder mean at each cell's latent mean): one
    /// modality → layers/tessera_denoised; several → obsm/tessera_denoised_<modality> in the
    /// MuData root for every cell, imputed where the cell lacks the modality. Dense, held in
    /// memory while written.
    #[arg(long)]
    denoised: bool,
    /// Library size the denoised expression is scaled to (NB/ZINB/Poisson; scvi-tools'
    /// `library_size`; 1 gives proportions).
    #[arg(long, default_value_t = 1e4)]
    denoised_library_size: f64,
    /// MiB of decoded count blocks kept in memory for later epochs: a dataset that fits is read
    /// from the store once; a larger one keeps what fits and streams the rest (0: stream all).
    #[arg(long, default_value_t = tessera_worker::DEFAULT_CACHE_MIB)]
    cache_mib: u64,
    /// Train data-parallel in this many worker processes on this machine, under a coordinator
    /// in this process (the cluster path on one machine). Each step's batch is cut into
    /// `train.parts` parts (default: the number of workers); the result depends on the parts,
    /// not on the workers.
    #[arg(long)]
    workers: Option<usize>,
    /// Serve Prometheus metrics (GET /metrics: steps, cells, loss terms, time by phase) and a
    /// health check (GET /healthz) over plain HTTP here: alone, or each rank under a launcher
    /// (not the processes of --workers).
    #[arg(long)]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Where to train: cpu, cuda (GPU 0; with --workers N, worker i on GPU i; under a launcher,
    /// the GPU of LOCAL_RANK) or cuda:N. The CUDA libraries are loaded at run time: set
    /// TESSERA_CUDA_LIBS to the folders holding them where the loader does not find them.
    #[arg(long, env = "TESSERA_DEVICE", default_value = "cpu")]
    device: tessera_worker::device::Device,
    /// On a GPU, run the f32 GEMMs on TF32 tensor cores (`train.tf32`; faster, ~1e-3 relative
    /// error per product).
    #[arg(long)]
    tf32: bool,
    /// Write the first N training steps' loss terms to <out>/steps.csv (one process: to compare
    /// devices step by step, as bench/gpu/check.sh does).
    #[arg(long, default_value_t = 0)]
    step_log: usize,
}

/// Which matrix and obs columns the model reads besides the batch and labels (`train` and
/// `submit`).
#[derive(clap::Args, Debug)]
pub struct InputArgs {
    /// Train on layers/<NAME> of each modality instead of X (raw counts for the count
    /// likelihoods; scvi-tools' `layer`).
    #[arg(long, value_name = "NAME")]
    pub layer: Option<String>,
    /// obs columns of categorical covariates beside the batch (donor, technology...),
    /// comma-separated: each one-hot, injected where the batch is (scvi-tools'
    /// `categorical_covariate_keys`).
    #[arg(long, value_delimiter = ',', value_name = "KEYS")]
    pub categorical_covariate_keys: Vec<String>,
    /// Numeric obs columns given to the model as they are (percent mitochondrial counts...),
    /// comma-separated; every cell needs a finite value (scvi-tools'
    /// `continuous_covariate_keys`).
    #[arg(long, value_delimiter = ',', value_name = "KEYS")]
    pub continuous_covariate_keys: Vec<String>,
}

impl InputArgs {
    pub fn covariates(&self) -> tessera_worker::CovariateKeys {
        tessera_worker::CovariateKeys {
            categorical: self.categorical_covariate_keys.clone(),
            continuous: self.continuous_covariate_keys.clone(),
        }
    }
}

pub fn run(args: TrainArgs) -> Result<()> {
    let metrics = std::sync::Arc::new(crate::metrics::TrainMetrics::default());
    // Kept alive for the whole run: the metrics server's runtime.
    let _metrics_server = args
        .metrics_listen
        .map(|at| crate::metrics::serve_train(at, &metrics))
        .transpose()?;
    let launch = if args.workers.is_none() {
        crate::distributed::Launch::from_env()?
    } else {
        None
    };
    if let Some(l) = launch.as_ref().filter(|l| l.rank > 0) {
        // Rank 0 submits the job with the data and configuration; this rank only trains.
        l.serve_as_worker(args.cache_mib << 20, args.device, &metrics)?;
        say!("rank {} of {}: the job ended", l.rank, l.world);
        return Ok(());
    }
    let mut config = read_config(args.config.as_deref(), args.epochs, args.seed)?;
    config.train.tf32 |= args.tf32;
    let data = match args.data {
        Some(d) => d,
        None => default_data(&args.out)?,
    };
    let batch_key = match args.batch_key {
        Some(k) => Some(k),
        None => has_obs_column(&data, "batch").then(|| "batch".to_string()),
    };
    let label_key = args.label_key.or_else(|| {
        has_obs_column(&data, DEFAULT_LABEL_KEY).then(|| DEFAULT_LABEL_KEY.to_string())
    });
    let opts = FitOptions {
        data: data.clone(),
        modalities: args.modalities.clone(),
        batch_key: batch_key.clone(),
        label_key: label_key.clone(),
        unlabeled_category: args.unlabeled_category.clone(),
        covariates: args.inputs.covariates(),
        config,
        out: args.out.clone(),
        embedding_key: args.embedding_key.clone(),
        prediction_key: args.prediction_key.clone(),
        overwrite: args.overwrite,
        store_outputs: true,
        resume: args.resume,
        denoised: args.denoised.then(|| Denoised {
            key: "tessera_denoised".into(),
            library_size: args.denoised_library_size,
        }),
        cache_bytes: args.cache_mib << 20,
        device: args.device,
        init_from: args.init_from.clone(),
        layer: args.inputs.layer.clone(),
    };

    let report = match (args.workers, &launch) {
        (Some(n), _) => crate::distributed::train(&opts, n)
            .with_context(|| format!("training on {data} with {n} workers"))?,
        (None, Some(l)) => crate::distributed::train_as_rank0(&opts, l, &metrics)
            .with_context(|| format!("training on {data} as rank 0 of {}", l.world))?,
        (None, None) => train_alone(&opts, &metrics, args.step_log)?,
    };

    let last = report.history.last();
    let seconds: f64 = report.history.iter().map(|r| r.seconds).sum();
    let cells: usize = report.history.iter().map(|r| r.train.cells).sum();
    let modalities: Vec<String> = report
        .modalities
        .iter()
        .map(|(name, g)| format!("{name} ({g} features)"))
        .collect();
    say!(
        "trained on {data}: {} epochs{}, {} train / {} validation cells, {}, {} batches",
        report.history.len(),
        if report.stopped_early {
            " (stopped early)"
        } else {
            ""
        },
        report.n_train,
        report.n_validation,
        modalities.join(" + "),
        report.batch_categories.len()
    );
    if let Some(r) = last {
        // The loss weighs the KL by the warm-up's weight; the KL is shown as it is.
        let terms = |t: &tessera_models::LossTerms| {
            format!(
                "{:.2} (reconstruction {:.2}, KL {:.2} unweighted x weight {:.3}, regularisers {:.3}, supervised {:.3})",
                t.loss, t.reconstruction, t.kl, r.kl_weight, t.regularization, t.supervised
            )
        };
        say!(
            "  epoch {} (history.csv counts epochs from 0, as scvi-tools' history does)",
            r.epoch
        );
        say!("  final train loss {}", terms(&r.train));
        if let Some(v) = &r.validation {
            say!("  final validation loss {}", terms(v));
        }
    }
    say!(
        "  {:.0} cells/s over {:.1} s of training",
        cells as f64 / seconds.max(1e-9),
        seconds
    );
    say!(
        "  embedding ({} dims) -> {}",
        report.n_latent,
        report.embedding_element
    );
    for element in &report.denoised_elements {
        say!("  denoised expression -> {element}");
    }
    for element in &report.prediction_elements {
        say!("  predicted labels -> {element}");
    }
    say!("  history, weights, config -> {}", args.out.display());
    if !report.stale_elements.is_empty() {
        say!(
            "  left from an earlier run, not rewritten: {} (uns/tessera_provenance says which run wrote each)",
            report.stale_elements.join(", ")
        );
    }

    // The embedding sits where fit wrote it: a modality's obsm or the MuData root's.
    let modality = report
        .embedding_element
        .strip_prefix("mod/")
        .and_then(|rest| rest.split('/').next())
        .map(str::to_string);
    let color: Vec<String> = label_key.iter().chain(&batch_key).cloned().collect();
    if !color.is_empty() {
        let picture = PlotRequest {
            data: data.clone(),
            modality: modality.clone(),
            embedding_key: args.embedding_key.clone(),
            color,
            max_cells: Some(DEFAULT_PLOT_CELLS),
            seed: 0,
            out: args.out.join("embedding.png"),
            layout_key: None,
            overwrite: true,
        };
        // The model and embedding are written: a picture that cannot be drawn is a warning.
        match tessera_worker::plot::plot_store(&picture) {
            Ok(drawn) => crate::plot::say_report(&drawn),
            Err(e) => tracing::warn!(error = %e, "the embedding picture was not drawn"),
        }
    }

    if label_key.is_none() {
        say!(
            "no {DEFAULT_LABEL_KEY:?} obs column: evaluation skipped (run `tessera eval --label-key ...`)"
        );
        return Ok(());
    }
    let req = EvalRequest {
        data: data.clone(),
        modality,
        embedding_key: args.embedding_key,
        label_key,
        batch_key,
        max_cells: Some(DEFAULT_MAX_CELLS),
        options: EvalOptions::default(),
    };
    let evaluation = tessera_worker::evaluate_store(&req)
        .with_context(|| format!("evaluating the embedding in {data}"))?;
    crate::eval::report(&evaluation, &args.out)
}

/// The run's configuration: the TOML file's (or the defaults), `--epochs` overriding
/// `train.max_epochs`.
pub(crate) fn read_config(
    path: Option<&std::path::Path>,
    epochs: Option<usize>,
    seed: Option<u64>,
) -> Result<FitConfig> {
    let mut config = match path {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            FitConfig::from_toml(&text, &path.display().to_string())?
        }
        None => FitConfig::default(),
    };
    if let Some(e) = epochs {
        config.train.max_epochs = Some(e);
    }
    if let Some(s) = seed {
        config.train.seed = s;
    }
    Ok(config)
}

/// The logged steps' loss terms, one row per step.
fn write_steps(path: &std::path::Path, steps: &[tessera_models::LossTerms]) -> Result<()> {
    let mut csv = String::from("step,loss,reconstruction,kl,regularization,supervised,cells\n");
    for (i, t) in steps.iter().enumerate() {
        csv.push_str(&format!(
            "{},{},{},{},{},{},{}\n",
            i + 1,
            t.loss,
            t.reconstruction,
            t.kl,
            t.regularization,
            t.supervised,
            t.cells
        ));
    }
    std::fs::write(path, csv).with_context(|| format!("writing {}", path.display()))
}

/// Trains in this process, with a progress bar.
fn train_alone(
    opts: &FitOptions,
    metrics: &crate::metrics::TrainMetrics,
    step_log: usize,
) -> Result<tessera_worker::FitReport> {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] epoch {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let (mut epoch, mut epochs, mut cells_per_epoch) = (0usize, 0usize, 0u64);
    let mut steps = Vec::with_capacity(step_log);
    let trained = tessera_worker::fit_until(opts, crate::signals::stop_flag()?, |p| {
        metrics.observe(&p);
        match p {
            Progress::Start {
                epochs: e,
                cells_per_epoch: c,
            } => {
                (epochs, cells_per_epoch) = (e, c);
                bar.set_length(e as u64 * c);
            }
            Progress::Batch { cells, loss } => {
                if steps.len() < step_log {
                    steps.push(*loss);
                }
                bar.inc(cells as u64);
                bar.set_message(format!("{}/{epochs} loss {:.1}", epoch + 1, loss.loss));
            }
            Progress::Epoch(r) => {
                epoch = r.epoch + 1;
                // Held-out cells never pass through a training step: a finished epoch is a full one.
                bar.set_position(epoch as u64 * cells_per_epoch);
                let val = r
                    .validation
                    .map_or(String::new(), |v| format!(" validation {:.2}", v.loss));
                tracing::debug!(
                    epoch = r.epoch,
                    train = r.train.loss,
                    cells_per_s = r.cells_per_second,
                    "epoch{val}"
                );
            }
        }
    });
    bar.finish_and_clear();
    if step_log > 0 && trained.is_ok() {
        write_steps(&opts.out.join("steps.csv"), &steps)?;
    }
    match trained {
        Ok(report) => Ok(report),
        Err(FitError::Stopped { checkpoint, .. }) => Err(crate::signals::Stopped {
            checkpoint: Some(checkpoint),
            hint: " (continue with --resume)",
        }
        .into()),
        Err(e) => Err(anyhow::Error::new(e).context(format!("training on {}", opts.data))),
    }
}

/// The default demo: CITE-seq-size protein panel, a small accessibility panel, mosaic.
const DEFAULT_PROTEINS: usize = 30;
const DEFAULT_PEAKS: usize = 500;
const DEFAULT_MISSING: f64 = 0.3;

/// The simulated default store in the output folder, created if absent.
pub(crate) fn default_data(out: &std::path::Path) -> Result<String> {
    let path = out.join("data.zarr");
    let location = path.display().to_string();
    if !path.exists() {
        std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
        let config = tessera_data::SimConfig {
            n_proteins: DEFAULT_PROTEINS,
            n_peaks: DEFAULT_PEAKS,
            missing: DEFAULT_MISSING,
            ..tessera_data::SimConfig::default()
        };
        say!(
            "simulating the default data into {location} ({} cells; {} genes, {} proteins, {} peaks, each non-RNA modality missing in {:.0}% of cells; {} batches)",
            config.n_cells,
            config.n_genes,
            config.n_proteins,
            config.n_peaks,
            100.0 * config.missing,
            config.n_batches
        );
        tessera_data::simulate(&location, &config, |_| {})
            .with_context(|| format!("simulating into {location}"))?;
    }
    Ok(location)
}

/// Whether the store has the obs column (a broken one is reported when training reads it;
/// an unreadable store, by training's own open).
fn has_obs_column(data: &str, name: &str) -> bool {
    tessera_data::Dataset::open(data)
        .and_then(|d| d.has_obs_column(name))
        .unwrap_or(false)
}
