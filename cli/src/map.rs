//! `tessera map`: a query store mapped onto a trained reference model (scArches surgery,
//! fine-tuning of the new batches' parameters, weighted kNN label transfer); the embedding and
//! labels go into the query store, the report to `<out>/map.json`.

use std::ops::ControlFlow;
use std::path::PathBuf;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use tessera_models::surgery::Unfreeze;
use tessera_worker::query::{Outputs, QueryRequest, ReferenceModel, map_query};

#[derive(clap::Args, Debug)]
pub struct MapArgs {
    /// The reference model's folder (`tessera train --out`; path or URL): config.json,
    /// model.safetensors, reference.safetensors.
    #[arg(long)]
    model: String,
    /// The query AnnData/MuData Zarr store (path or URL).
    #[arg(long)]
    data: String,
    /// The query's batch column (default: the reference's batch key).
    #[arg(long)]
    batch_key: Option<String>,
    /// Read layers/<NAME> of the query instead of X (its raw counts).
    #[arg(long, value_name = "NAME")]
    layer: Option<String>,
    /// Fine-tuning epochs over the query.
    #[arg(long, default_value_t = 100)]
    epochs: usize,
    /// Also fine-tune each modality's first encoder layer.
    #[arg(long)]
    unfreeze_encoder_input: bool,
    /// Also fine-tune each modality's first decoder layer.
    #[arg(long)]
    unfreeze_decoder_input: bool,
    /// Reference neighbours of the label transfer (scArches: 50).
    #[arg(long, default_value_t = 50)]
    neighbours: usize,
    #[arg(long, default_value = "X_tessera")]
    embedding_key: String,
    /// Transferred labels -> obs/<key>, their uncertainty -> obs/<key>_uncertainty.
    #[arg(long, default_value = "tessera_label")]
    key: String,
    /// Replace existing outputs in the query store.
    #[arg(long)]
    overwrite: bool,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Folder for the report (map.json).
    #[arg(long, default_value = "tessera-out")]
    out: PathBuf,
    /// Also save the fine-tuned query model here (a model folder, loadable as any trained
    /// model: the reference's batches and the query's; the query's cells as its reference).
    /// A folder holding a model is refused unless --overwrite.
    #[arg(long, value_name = "DIR")]
    save_model: Option<PathBuf>,
    /// Where the query model is fine-tuned: cpu, cuda or cuda:N.
    #[arg(long, env = "TESSERA_DEVICE", default_value = "cpu")]
    device: tessera_worker::device::Device,
}

pub fn run(args: MapArgs) -> Result<()> {
    if let Some(dir) = &args.save_model {
        let existing = dir.join("model.safetensors");
        if existing.exists() && !args.overwrite {
            anyhow::bail!(
                "--save-model {}: a model is already there ({}); pass --overwrite to replace it",
                dir.display(),
                existing.display()
            );
        }
    }
    let model = ReferenceModel::open(&args.model)?;
    let req = QueryRequest {
        data: args.data.clone(),
        batch_key: args.batch_key,
        layer: args.layer,
        epochs: args.epochs,
        unfreeze: Unfreeze {
            encoder_input: args.unfreeze_encoder_input,
            decoder_input: args.unfreeze_decoder_input,
        },
        neighbours: args.neighbours,
        write: Some(Outputs {
            embedding_key: args.embedding_key,
            label_key: args.key,
            overwrite: args.overwrite,
        }),
        seed: args.seed,
        device: args.device,
        model_out: args.save_model.as_ref().map(|d| d.display().to_string()),
    };
    let bar = ProgressBar::new_spinner().with_style(ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {msg}",
    )?);
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    let output = map_query(&model, &req, |stage| {
        bar.set_message(stage.to_string());
        ControlFlow::Continue(())
    })
    .with_context(|| format!("mapping {} onto {}", args.data, args.model));
    bar.finish_and_clear();
    let report = output?.report;
    say!(
        "mapped {} cells of {} onto {}",
        report.n_cells,
        report.data,
        report.model
    );
    say!(
        "  batches: {} new ({}), {} known",
        report.new_batches.len(),
        report.new_batches.join(", "),
        report.known_batches.len()
    );
    for m in &report.modalities {
        say!(
            "  {}: {} of {} reference features found ({} zero-filled, {} query features unused), {} cells",
            m.name,
            m.matched,
            m.reference_features,
            m.zero_filled,
            m.ignored,
            m.cells
        );
    }
    say!(
        "  fine-tuned {} parameters for {} epochs in {:.1} s (final loss {})",
        report.trained_parameters,
        report.epochs,
        report.seconds_training,
        report.final_loss.map_or("-".into(), |l| format!("{l:.2}"))
    );
    if let Some(labels) = &report.labels {
        let accuracy = report.label_accuracy.map_or(String::new(), |a| {
            format!(", agreement with the query's own labels {a:.4}")
        });
        say!(
            "  labels -> {labels} (mean uncertainty {:.4}{accuracy})",
            report.mean_uncertainty.unwrap_or(f64::NAN)
        );
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let json = args.out.join("map.json");
    std::fs::write(&json, serde_json::to_vec_pretty(&report)?)
        .with_context(|| format!("writing {}", json.display()))?;
    say!(
        "  -> {}, {}",
        report.embedding.as_deref().unwrap_or_default(),
        json.display()
    );
    Ok(())
}
