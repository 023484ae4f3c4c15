//! `tessera eval`: scIB metrics of an embedding in a store, printed and written to JSON + CSV.

use std::path::PathBuf;

use anyhow::{Context, Result};
use tessera_metrics::EvalOptions;
use tessera_worker::eval::{DEFAULT_MAX_CELLS, EvalRequest, Evaluation, format_table};

#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    /// AnnData/MuData Zarr store (path or URL). Default: the main job's `<out>/data.zarr`.
    #[arg(long)]
    data: Option<String>,
    /// obsm key of the embedding.
    #[arg(long, default_value = "X_tessera")]
    embedding_key: String,
    /// obs column of cell types (default: cell_type when present).
    #[arg(long)]
    label_key: Option<String>,
    /// obs column of batches (default: batch when present).
    #[arg(long)]
    batch_key: Option<String>,
    /// MuData modality holding the embedding (default: the first that has it).
    #[arg(long)]
    modality: Option<String>,
    /// Evaluate a seeded uniform subsample above this many cells (0 = all cells; exact
    /// neighbours and silhouettes cost O(n² d)).
    #[arg(long, default_value_t = DEFAULT_MAX_CELLS)]
    max_cells: usize,
    /// Seed of the subsample and of k-means.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Folder for eval.json and eval.csv.
    #[arg(long, default_value = "tessera-out")]
    out: PathBuf,
}

pub fn run(args: EvalArgs) -> Result<()> {
    let data = args
        .data
        .unwrap_or_else(|| args.out.join("data.zarr").display().to_string());
    let req = EvalRequest {
        data: data.clone(),
        modality: args.modality,
        embedding_key: args.embedding_key,
        label_key: args.label_key,
        batch_key: args.batch_key,
        max_cells: (args.max_cells > 0).then_some(args.max_cells),
        options: EvalOptions {
            seed: args.seed,
            ..EvalOptions::default()
        },
    };
    let evaluation =
        tessera_worker::evaluate_store(&req).with_context(|| format!("evaluating {data}"))?;
    report(&evaluation, &args.out)
}

/// Prints the table and writes the files (shared with `tessera train`).
pub fn report(evaluation: &Evaluation, out: &std::path::Path) -> Result<()> {
    let e = evaluation;
    let subsample = if e.subsampled {
        format!(" (subsample of {})", e.n_obs)
    } else {
        String::new()
    };
    let missing = if e.excluded_missing > 0 {
        format!(", {} without label/batch left out", e.excluded_missing)
    } else {
        String::new()
    };
    let batches = e.batch_key.as_deref().map_or("none".to_string(), |k| {
        format!("{k:?} ({})", e.scores.n_batches)
    });
    say!(
        "scIB metrics of {} on {} cells{subsample}{missing}: labels {:?} ({}), batches {batches}, {:.1} s",
        e.embedding,
        e.n_evaluated,
        e.label_key,
        e.scores.n_labels,
        e.seconds
    );
    say_raw!("{}", format_table(&e.scores));
    let [json, csv] = tessera_worker::write_evaluation(out, e)?;
    say!("  -> {}, {}", json.display(), csv.display());
    Ok(())
}
