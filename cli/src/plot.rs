//! `tessera plot`: a UMAP picture of an embedding in a store, coloured by obs columns side by
//! side (by default cell type and batch), as PNG.

use std::path::PathBuf;

use anyhow::{Context, Result};
use tessera_worker::plot::{DEFAULT_PLOT_CELLS, PlotReport, PlotRequest};

#[derive(clap::Args, Debug)]
pub struct PlotArgs {
    /// AnnData/MuData Zarr store (path or URL). Default: the main job's `tessera-out/data.zarr`.
    #[arg(long)]
    data: Option<String>,
    /// obsm key of the embedding.
    #[arg(long, default_value = "X_tessera")]
    embedding_key: String,
    /// obs column to colour by, one panel each (repeat the flag; default: cell_type and batch,
    /// where present).
    #[arg(long)]
    color: Vec<String>,
    /// MuData modality holding the embedding (default: the root, else the first that has it).
    #[arg(long)]
    modality: Option<String>,
    /// Lay out a seeded uniform subsample above this many cells (0 = all; neighbours are exact,
    /// O(n² d)).
    #[arg(long, default_value_t = DEFAULT_PLOT_CELLS)]
    max_cells: usize,
    /// Seed of the subsample, the layout and the drawing order.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The PNG to write.
    #[arg(long, default_value = "tessera-out/embedding.png")]
    out: PathBuf,
    /// Also store the 2-D layout of every cell as obsm/<KEY> (scanpy's `sc.pl.umap` reads
    /// X_umap); needs every cell laid out (--max-cells 0 or fewer cells than it).
    #[arg(long, value_name = "KEY")]
    obsm_key: Option<String>,
    /// Replace an existing picture at --out, or layout at obsm/<KEY>.
    #[arg(long)]
    overwrite: bool,
}

pub fn run(args: PlotArgs) -> Result<()> {
    let data = args.data.unwrap_or_else(|| {
        args.out
            .parent()
            .unwrap_or(std::path::Path::new("."))
            .join("data.zarr")
            .display()
            .to_string()
    });
    let req = PlotRequest {
        data: data.clone(),
        modality: args.modality,
        embedding_key: args.embedding_key,
        color: args.color,
        max_cells: (args.max_cells > 0).then_some(args.max_cells),
        seed: args.seed,
        out: args.out,
        layout_key: args.obsm_key,
        overwrite: args.overwrite,
    };
    let report =
        tessera_worker::plot::plot_store(&req).with_context(|| format!("plotting {data}"))?;
    say_report(&report);
    Ok(())
}

/// One line naming the picture (shared with `tessera train`).
pub fn say_report(report: &PlotReport) {
    let cells = if report.n_drawn < report.n_obs {
        format!("{} of {} cells", report.n_drawn, report.n_obs)
    } else {
        format!("{} cells", report.n_obs)
    };
    say!(
        "UMAP of {} ({cells}) coloured by {} -> {} ({:.1} s)",
        report.embedding,
        report.color.join(", "),
        report.path.display(),
        report.seconds
    );
    if let Some(element) = &report.layout_element {
        say!("  layout -> {element}");
    }
}
