//! `tessera snf`: a cell network across views (SNF or NEMO), its spectral clusters and their
//! agreement with known labels; the network and clusters go into the store, the report to JSON.

use std::path::PathBuf;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use tessera_network::SnfParams;
use tessera_worker::network::{
    Distance, Method, NetworkRequest, OutOfCore, ViewSpec, network_store,
};

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum MethodArg {
    /// Similarity Network Fusion (Wang et al. 2014; snfpy 0.2.2's arithmetic).
    Snf,
    /// NEMO (Rappoport & Shamir 2019): kNN relative similarities averaged over shared views.
    Nemo,
    /// Kernel averaging: the unweighted mean of the views' affinities.
    Average,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum MetricArg {
    Sqeuclidean,
    Euclidean,
    Cosine,
    Correlation,
}

#[derive(clap::Args, Debug)]
pub struct SnfArgs {
    /// AnnData/MuData Zarr store (path or URL). Default: the main job's `<out>/data.zarr`
    /// (simulated on first use, as `tessera train` does).
    #[arg(long)]
    data: Option<String>,
    /// A view: `rna` (a MuData modality's X), `X` (an AnnData's X), `obsm/KEY` (the root's
    /// obsm) or `rna:obsm/KEY`. Repeat or comma-separate; default: every modality's X. Cells
    /// without the modality (or with NaN in the obsm row) are missing from that view.
    #[arg(long = "view", value_delimiter = ',')]
    views: Vec<String>,
    #[arg(long, value_enum, default_value_t = MethodArg::Snf)]
    method: MethodArg,
    /// Neighbours: SNF's K (also the affinity's); NEMO's k (default: a view's cells / 6).
    #[arg(long)]
    k: Option<usize>,
    /// SNF fusion iterations.
    #[arg(long, default_value_t = 20)]
    t: usize,
    /// Width of the scaled exponential kernel (snfpy's mu).
    #[arg(long, default_value_t = 0.5)]
    mu: f64,
    /// Distance under each view's affinity (snfpy's metric, after per-feature z-scores).
    #[arg(long, value_enum, default_value_t = MetricArg::Sqeuclidean)]
    metric: MetricArg,
    /// Use counts in X as they are (default: scaled to 10^4 per cell and log1p'd, as
    /// scanpy's normalize_total + log1p; obsm entries are always used as they are).
    #[arg(long)]
    raw_counts: bool,
    /// Number of clusters (default: the best by snfpy's eigengap among 2..=15).
    #[arg(long)]
    clusters: Option<usize>,
    /// obs column of true labels for NMI/ARI (default: cell_type when present).
    #[arg(long)]
    label_key: Option<String>,
    /// The network goes to obsp/<key>, the clusters to obs/<key>_clusters.
    #[arg(long, default_value = "snf")]
    key: String,
    /// Entries kept per row of the network written to obsp (sparse); 0 writes it dense.
    #[arg(long, default_value_t = 20)]
    top_k: usize,
    /// Replace an existing obsp/<key> and obs/<key>_clusters.
    #[arg(long)]
    overwrite: bool,
    /// Seed of the Lanczos start vector and of k-means.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// SNF over row blocks on this many local worker processes (a coordinator in this
    /// process; each worker holds 1/N of every n x n matrix). Every cell must be in every view.
    #[arg(long)]
    workers: Option<usize>,
    /// SNF with the n x n matrices on disk (2·views + 1 of them, n²·8 bytes each) instead of
    /// in memory: about 3 blocks of rows are held at a time, so n is bounded by disk. Writes
    /// the network as top-k rows.
    #[arg(long)]
    out_of_core: bool,
    /// Scratch Zarr store (path or URL) for --out-of-core; must not exist; removed afterwards.
    /// Default: <out>/snf-scratch.zarr.
    #[arg(long)]
    scratch: Option<String>,
    /// Rows per block (and tile side) for --out-of-core: memory is about 3·block·n·8 bytes.
    #[arg(long, default_value_t = 1024)]
    block: usize,
    /// Folder for the report (<method>.json) and, by default, the data.
    #[arg(long, default_value = "tessera-out")]
    out: PathBuf,
}

pub fn run(args: SnfArgs) -> Result<()> {
    let data = match args.data {
        Some(d) => d,
        None => crate::train::default_data(&args.out)?,
    };
    let method = match args.method {
        MethodArg::Snf => Method::Snf,
        MethodArg::Nemo => Method::Nemo,
        MethodArg::Average => Method::Average,
    };
    let name = method.name();
    let metric = match args.metric {
        MetricArg::Sqeuclidean => Distance::SqEuclidean,
        MetricArg::Euclidean => Distance::Euclidean,
        MetricArg::Cosine => Distance::Cosine,
        MetricArg::Correlation => Distance::Correlation,
    };
    let req = NetworkRequest {
        data: data.clone(),
        views: args.views.iter().map(|v| ViewSpec::parse(v)).collect(),
        method,
        snf: SnfParams {
            k: args.k.unwrap_or(SnfParams::default().k),
            t: args.t,
            ..SnfParams::default()
        },
        nemo_k: args.k,
        mu: args.mu,
        metric,
        log_normalise: !args.raw_counts,
        clusters: args.clusters,
        candidates: (2..=15).collect(),
        label_key: args.label_key,
        key: args.key,
        top_k: (args.top_k > 0).then_some(args.top_k),
        overwrite: args.overwrite,
        seed: args.seed,
        out_of_core: args.out_of_core.then(|| OutOfCore {
            scratch: args
                .scratch
                .unwrap_or_else(|| args.out.join("snf-scratch.zarr").display().to_string()),
            block: args.block,
        }),
    };
    if req.out_of_core.is_some() && args.workers.is_some() {
        anyhow::bail!(
            "--out-of-core runs on one machine; --workers splits the matrices across workers instead: choose one"
        );
    }
    // The report folder is checked before the job writes into the store, so a run that
    // cannot write its report fails before publishing anything.
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let json = args.out.join(format!("{name}.json"));
    if json.is_dir() {
        anyhow::bail!(
            "{} is a directory: the report cannot be written there",
            json.display()
        );
    }
    let report = match args.workers {
        Some(workers) => crate::distributed::network(&req, &args.out, workers)
            .with_context(|| format!("{name} on {data} across {workers} workers"))?,
        None => {
            let bar = ProgressBar::new_spinner().with_style(ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {msg}",
            )?);
            bar.enable_steady_tick(std::time::Duration::from_millis(200));
            let report = network_store(&req, |stage| bar.set_message(stage.to_string()))
                .with_context(|| format!("{name} on {data}"));
            bar.finish_and_clear();
            report?
        }
    };
    let views: Vec<String> = report
        .views
        .iter()
        .map(|v| format!("{} ({} cells x {} features)", v.name, v.samples, v.features))
        .collect();
    say!(
        "{} over {} cells from {}: {}",
        name.to_uppercase(),
        report.n_obs,
        report.store,
        views.join(", ")
    );
    let ranking: Vec<String> = report
        .eigengap
        .iter()
        .take(3)
        .map(|(c, g)| format!("{c} ({g:.3})"))
        .collect();
    say!(
        "  {} clusters (eigengap best: {})",
        report.clusters,
        ranking.join(", ")
    );
    if let (Some(key), Some(nmi), Some(ari)) = (&report.label_key, report.nmi, report.ari) {
        say!("  against obs/{key}: NMI {nmi:.4}, ARI {ari:.4}");
    }
    let peak = report
        .peak_memory_mib
        .map_or(String::new(), |m| format!("; peak memory {m:.0} MiB"));
    say!(
        "  seconds: affinities {:.2}, network {:.2}, clustering {:.2}, writing {:.2}{peak}",
        report.seconds_affinities,
        report.seconds_network,
        report.seconds_clustering,
        report.seconds_write
    );
    std::fs::write(&json, serde_json::to_vec_pretty(&report)?)
        .with_context(|| format!("writing {}", json.display()))?;
    say!(
        "  -> {} ({} entries), {}, {}",
        report.network,
        report.network_entries,
        report.cluster_column,
        json.display()
    );
    Ok(())
}
