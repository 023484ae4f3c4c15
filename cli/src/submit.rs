//! `tessera submit` and `tessera cancel`: training jobs for a standing coordinator (`tessera
//! coordinator` with a pool of `tessera worker`s, e.g. on Kubernetes), followed to their end
//! unless `--detach`.

use std::path::PathBuf;

use anyhow::{Context, Result, anyhow};
use tessera_proto::v1 as pb;
use tessera_worker::FitOptions;

use crate::distributed::{JobView, job_spec};

#[derive(clap::Args, Debug)]
pub struct SubmitArgs {
    /// Coordinator URL (default: http://$MASTER_ADDR:$MASTER_PORT, else http://127.0.0.1:50051).
    #[arg(long)]
    coordinator: Option<String>,
    /// Store path or URL; the coordinator and every worker read it (a local path is made
    /// absolute: it must be the same path there).
    #[arg(long)]
    data: String,
    /// TOML file with `[model]` and `[train]` tables, as for `tessera train`.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override `train.max_epochs`.
    #[arg(long)]
    epochs: Option<usize>,
    /// Override `train.seed` (initialisation, shuffling, the validation split).
    #[arg(long)]
    seed: Option<u64>,
    /// Folder rank 0 writes the checkpoints and outputs to, shared by the workers.
    #[arg(long)]
    out: PathBuf,
    /// Workers to train with: the job waits until this many are free.
    #[arg(long, default_value_t = 1)]
    world_size: usize,
    /// The MuData modalities to model, comma-separated (default: all).
    #[arg(long, value_delimiter = ',')]
    modalities: Vec<String>,
    /// obs column with the batch (default: none).
    #[arg(long)]
    batch_key: Option<String>,
    /// obs column with cell types: labels of the classifier and contrastive heads (missing
    /// values = unlabelled cells).
    #[arg(long)]
    label_key: Option<String>,
    /// The --label-key value that marks an unlabelled cell (e.g. Unknown).
    #[arg(long, value_name = "LABEL")]
    unlabeled_category: Option<String>,
    /// obsm key of the embedding written into the store.
    #[arg(long, default_value = "X_tessera")]
    embedding_key: String,
    /// obs key of the label classifier's predictions (and obsm <key>_probabilities).
    #[arg(long, default_value = tessera_worker::fit::PREDICTION_KEY)]
    prediction_key: String,
    #[command(flatten)]
    inputs: crate::train::InputArgs,
    /// Start from the model trained into this folder (as `tessera train --init-from`); every
    /// worker reads it, so it must be on storage they share (a local path is made absolute).
    #[arg(long, value_name = "DIR")]
    init_from: Option<String>,
    /// Replace existing outputs (obsm/<embedding-key>, the predictions).
    #[arg(long)]
    overwrite: bool,
    /// Print the job's id and return instead of following it to its end.
    #[arg(long)]
    detach: bool,
    /// Where the job's ranks train: cpu, cuda (each worker's GPU) or cuda:N (default: each
    /// worker's own --device).
    #[arg(long)]
    device: Option<tessera_worker::device::Device>,
}

#[derive(clap::Args, Debug)]
pub struct CancelArgs {
    /// The job, as `tessera submit` printed it (job-N).
    job: String,
    /// Coordinator URL (default as for `submit`).
    #[arg(long)]
    coordinator: Option<String>,
}

fn coordinator_url(given: Option<String>) -> String {
    given
        .or_else(crate::worker::master_url)
        .unwrap_or_else(|| "http://127.0.0.1:50051".into())
}

/// The coordinator at `url`, presenting the token of TESSERA_COORDINATOR_TOKEN when set.
async fn connect(url: &str) -> Result<tessera_worker::node::Client> {
    tessera_worker::node::connect_client(url)
        .await
        .map_err(|e| anyhow::anyhow!("connecting to the coordinator at {url}: {e}"))
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

pub fn submit(args: SubmitArgs) -> Result<()> {
    if args.world_size == 0 {
        return Err(anyhow!("--world-size 0: expected at least 1"));
    }
    let opts = FitOptions {
        data: args.data,
        modalities: args.modalities,
        batch_key: args.batch_key,
        label_key: args.label_key,
        unlabeled_category: args.unlabeled_category,
        covariates: args.inputs.covariates(),
        config: crate::train::read_config(args.config.as_deref(), args.epochs, args.seed)?,
        out: args.out,
        embedding_key: args.embedding_key,
        prediction_key: args.prediction_key,
        overwrite: args.overwrite,
        store_outputs: true,
        resume: false,
        denoised: None,
        cache_bytes: 0,
        device: args.device.unwrap_or_default(),
        init_from: args.init_from,
        layer: args.inputs.layer,
    };
    let mut spec = job_spec(&opts, args.world_size)?;
    spec.device = args.device.map(|d| d.to_string()).unwrap_or_default();
    let url = coordinator_url(args.coordinator);
    runtime()?.block_on(async {
        let mut client = connect(&url).await?;
        // The coordinator checks the store and the configuration before it queues the job.
        let job = client
            .submit_job(spec)
            .await
            .map_err(|s| anyhow!("submitting to {url}: {}", s.message()))?
            .into_inner();
        say!("{}: submitted to {url}", job.job_id);
        if args.detach {
            return Ok(());
        }
        say!(
            "following {0} (Ctrl-C stops following, not the job: `tessera cancel {0}` does)",
            job.job_id
        );
        let mut statuses = client
            .watch_job(job.clone())
            .await
            .map_err(|s| anyhow!("watching {}: {}", job.job_id, s.message()))?
            .into_inner();
        let mut view = JobView::new(&job.job_id);
        while let Some(status) = statuses
            .message()
            .await
            .map_err(|s| anyhow!("watching {}: {}", job.job_id, s.message()))?
        {
            if let Some(ended) = view.show(&status) {
                return ended;
            }
        }
        Err(anyhow!(
            "{}: the coordinator ended the status stream",
            job.job_id
        ))
    })
}

pub fn cancel(args: CancelArgs) -> Result<()> {
    let url = coordinator_url(args.coordinator);
    runtime()?.block_on(async {
        let mut client = connect(&url).await?;
        client
            .cancel_job(pb::JobHandle {
                job_id: args.job.clone(),
            })
            .await
            .map_err(|s| anyhow!("cancelling {} at {url}: {}", args.job, s.message()))?;
        say!("{}: cancelled", args.job);
        Ok(())
    })
}
