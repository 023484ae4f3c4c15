//! `tessera`: the one command-line entry point.

// Decoding allocates and frees chunk-sized buffers at a high rate; mimalloc reuses them where
// the system allocator returns them to the OS and page-faults them back in.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `println!` that carries on when stdout is closed (`tessera train ... | head`): what is
/// printed after the reader left is lost, the job is not. (`println!` panics on a broken pipe.)
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// `print!` with `say!`'s tolerance of a closed stdout.
macro_rules! say_raw {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stdout(), $($arg)*);
    }};
}

mod bench;
mod coordinator;
mod distributed;
mod eval;
mod inspect;
mod map;
mod metrics;
mod plot;
mod serve;
mod signals;
mod snf;
mod submit;
mod train;
mod worker;

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use tessera_data::{SimConfig, ZarrVersion};

#[derive(Parser, Debug)]
#[command(
    name = "tessera",
    version,
    about = "Single-cell multi-omics integration at atlas scale"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// The compute devices this process can use: the CUDA libraries found (see
    /// TESSERA_CUDA_LIBS) and each GPU with its memory.
    Devices {
        /// Print only the loader path the CUDA libraries are found on (TESSERA_CUDA_LIBS's link
        /// folder first), for programs that load them without tessera's restart.
        #[arg(long)]
        library_path: bool,
        /// Also compile every CUDA source with the NVRTC found (no GPU needed).
        #[arg(long)]
        compile: bool,
    },
    /// Summarise an AnnData/MuData Zarr store: cells, modalities, matrices, chunks, obs columns.
    Inspect {
        /// Store path or URL (file://, s3://, gs://, az://, memory://).
        store: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Write a simulated single-cell multi-omics store with ground truth.
    Simulate(SimulateArgs),
    /// Copy an AnnData/MuData store (.h5ad/.h5mu file or Zarr v2/v3 store) into a new Zarr
    /// store chunked and sharded for streaming.
    Convert {
        /// The AnnData/MuData to copy: an .h5ad or .h5mu file, or a Zarr store (path or URL).
        input: String,
        /// Where to write the Zarr store (must not exist yet).
        output: String,
        /// Zarr format of the output store.
        #[arg(long, value_enum, default_value_t = Format::V3)]
        zarr_format: Format,
    },
    /// Simulate the default demo data (if absent) and inspect it.
    Demo {
        #[arg(default_value = "tessera-demo.zarr")]
        store: String,
    },
    /// Train the VAE on a store (default: simulated demo data) and write the embedding into it.
    Train(train::TrainArgs),
    /// scIB metrics (ASW, NMI/ARI, LISI, graph connectivity, aggregate) of an obsm embedding.
    Eval(eval::EvalArgs),
    /// A UMAP picture (PNG) of an obsm embedding coloured by obs columns (cell type, batch...)
    /// side by side.
    Plot(plot::PlotArgs),
    /// Similarity Network Fusion or NEMO across views (modalities/obsm), spectral clusters,
    /// NMI/ARI against known labels; the network -> obsp, the clusters -> obs.
    Snf(snf::SnfArgs),
    /// Map a query store onto a trained reference model (surgery for its new batches,
    /// fine-tuning, kNN label transfer); embedding and labels -> the query store.
    Map(map::MapArgs),
    /// Serve reference-atlas query mapping over gRPC (model registry, mapping jobs, Encode).
    Serve(serve::ServeArgs),
    /// Serve the distributed-training coordinator (gRPC, with the gRPC health service).
    Coordinator(coordinator::CoordinatorArgs),
    /// Serve as a data-parallel training worker of a coordinator.
    Worker(worker::WorkerArgs),
    /// Submit a training job to a standing coordinator and follow it to its end.
    Submit(submit::SubmitArgs),
    /// Cancel a job of a standing coordinator.
    Cancel(submit::CancelArgs),
    /// Benchmarks of hot paths.
    Bench {
        #[command(subcommand)]
        what: bench::BenchCommand,
    },
}

#[derive(clap::Args, Debug)]
struct SimulateArgs {
    /// Where to write (must not hold a store yet).
    out: String,
    #[arg(long, default_value_t = 10_000)]
    cells: u64,
    #[arg(long, default_value_t = 2_000)]
    genes: usize,
    /// ADT-like protein features (0 = no protein modality).
    #[arg(long, default_value_t = 0)]
    proteins: usize,
    /// ATAC-like binary peaks (0 = no ATAC modality).
    #[arg(long, default_value_t = 0)]
    peaks: usize,
    /// Population structure: `standard` (balanced batches, 8 separated types) or `hard` (4
    /// lineages x 3 subtypes, unbalanced batches and compositions, batch x lineage effects).
    #[arg(long, value_enum, default_value_t = ScenarioArg::Standard)]
    scenario: ScenarioArg,
    /// Cell types (default: 8; hard: 12).
    #[arg(long)]
    types: Option<usize>,
    /// Batches (default: 3; hard: 4).
    #[arg(long)]
    batches: Option<usize>,
    #[arg(long, default_value_t = 10)]
    latent_dim: usize,
    /// Median RNA library size, UMIs per cell (default: 1,500; hard: 6,000).
    #[arg(long)]
    library: Option<f64>,
    /// Fraction of cells missing each non-RNA modality.
    #[arg(long, default_value_t = 0.0)]
    missing: f64,
    /// Batches (0-based, comma-separated) in which every cell misses each non-RNA modality
    /// (e.g. a batch without CITE-seq, as totalVI handles). Missing cells' counts are drawn and
    /// dropped: the store without missing cells (same seed) holds their ground truth.
    #[arg(long, value_delimiter = ',')]
    missing_batches: Vec<usize>,
    /// Cells from these batches only (0-based, comma-separated; the batch column lists just
    /// them): with one seed, stores of disjoint batches share their biology (reference/query).
    #[arg(long, value_delimiter = ',')]
    only_batches: Vec<usize>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, value_enum, default_value_t = Format::V3)]
    zarr_format: Format,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum ScenarioArg {
    Standard,
    Hard,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum Format {
    #[value(name = "2")]
    V2,
    #[value(name = "3")]
    V3,
}

impl From<Format> for ZarrVersion {
    fn from(f: Format) -> Self {
        match f {
            Format::V2 => ZarrVersion::V2,
            Format::V3 => ZarrVersion::V3,
        }
    }
}

/// Log lines to stderr: text (coloured only on a terminal) or, with `TESSERA_LOG_FORMAT=json`,
/// one JSON object per line. Returns whether the format is JSON; an unknown format is an error.
fn init_logging() -> Result<bool> {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let json = match std::env::var("TESSERA_LOG_FORMAT").as_deref() {
        Err(_) | Ok("" | "text") => false,
        Ok("json") => true,
        Ok(other) => anyhow::bail!("TESSERA_LOG_FORMAT={other:?}: expected \"text\" or \"json\""),
    };
    let filter = EnvFilter::try_from_env("TESSERA_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
    Ok(json)
}

pub(crate) fn progress(total: u64, unit: &str) -> ProgressBar {
    let bar = ProgressBar::new(total);
    let template = format!(
        "{{elapsed_precise}} [{{bar:30}}] {{pos}}/{{len}} {unit} ({{per_sec}}, eta {{eta}})"
    );
    bar.set_style(
        ProgressStyle::with_template(&template).unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

fn simulate(args: &SimulateArgs) -> Result<()> {
    let base = match args.scenario {
        ScenarioArg::Standard => SimConfig::default(),
        ScenarioArg::Hard => SimConfig::hard(),
    };
    let config = SimConfig {
        n_cells: args.cells,
        n_genes: args.genes,
        n_proteins: args.proteins,
        n_peaks: args.peaks,
        n_types: args.types.unwrap_or(base.n_types),
        n_batches: args.batches.unwrap_or(base.n_batches),
        latent_dim: args.latent_dim,
        library: args.library.unwrap_or(base.library),
        missing: args.missing,
        missing_batches: args.missing_batches.clone(),
        only_batches: (!args.only_batches.is_empty()).then(|| args.only_batches.clone()),
        seed: args.seed,
        version: args.zarr_format.into(),
        ..base
    };
    let bar = progress(config.n_cells, "cells");
    let start = std::time::Instant::now();
    let summary = tessera_data::simulate(&args.out, &config, |n| bar.set_position(n))
        .with_context(|| format!("simulating into {}", args.out))?;
    bar.finish_and_clear();
    let seconds = start.elapsed().as_secs_f64();
    tracing::info!(
        cells = summary.n_cells,
        seconds,
        cells_per_s = summary.n_cells as f64 / seconds,
        "simulated"
    );
    let kind = if summary.mudata { "MuData" } else { "AnnData" };
    say!(
        "wrote {kind} store {} ({} cells, {:.1} s)",
        args.out,
        summary.n_cells,
        seconds
    );
    for (name, cells, features) in &summary.modalities {
        say!("  {name}: {cells} cells x {features} features");
    }
    Ok(())
}

fn convert(input: &str, output: &str, version: ZarrVersion) -> Result<()> {
    let spinner = ProgressBar::new_spinner();
    let start = std::time::Instant::now();
    let summary = tessera_data::convert(input, output, version, |element| {
        spinner.set_message(element.to_string())
    })
    .with_context(|| format!("converting {input} into {output}"))?;
    spinner.finish_and_clear();
    let seconds = start.elapsed().as_secs_f64();
    say!(
        "wrote {output}: {} groups, {} arrays, {:.1} MB in {seconds:.1} s ({:.0} MB/s)",
        summary.groups,
        summary.arrays,
        summary.bytes as f64 / 1e6,
        summary.bytes as f64 / 1e6 / seconds
    );
    Ok(())
}

/// mimalloc's `mi_option_purge_delay` (index 15 of the bundled mimalloc's `mi_option_e`,
/// between libmimalloc-sys' `mi_option_eager_commit_delay` = 14 and `mi_option_use_numa_nodes`
/// = 16).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Training frees and reallocates the same activation sizes every step; purging them gave the
/// pages back to the OS for the next step to fault in again (zeroed 2 MiB huge pages: 7x the
/// page faults, ~7% of training time). Memory stays bounded by the peak of one step.
fn keep_freed_memory() {
    #[allow(unsafe_code)]
    // SAFETY: sets a plain integer option of the allocator; valid at any time.
    unsafe {
        libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1);
    }
}

/// `tessera devices`: what `--device` can name here.
fn devices() {
    use tessera_kernels::cuda::Gpu;
    say!("cpu: {} threads", rayon::current_num_threads());
    say!("CUDA libraries: {}", tessera_kernels::cuda_libs::found());
    let n = Gpu::count();
    if n == 0 {
        say!("no GPU (--device cuda needs the NVIDIA driver and a device)");
    }
    for ordinal in 0..n {
        match Gpu::new(ordinal).and_then(|g| g.describe()) {
            Ok(d) => say!("cuda:{ordinal}: {d}"),
            Err(e) => say!("cuda:{ordinal}: unusable: {e}"),
        }
    }
}

/// `TESSERA_CUDA_LIBS` set: restarts this process once with the CUDA libraries it names on the
/// loader's path, under the names cudarc loads (`tessera_kernels::cuda_libs`). Returns only when
/// there is nothing to do or the restart failed (then GPU work reports the missing library).
fn find_cuda_libraries() {
    use std::os::unix::process::CommandExt;
    use tessera_kernels::cuda_libs;
    const DONE: &str = "TESSERA_CUDA_LIBS_LINKED";
    let Ok(value) = std::env::var(cuda_libs::LIBS_VAR) else {
        return;
    };
    if std::env::var_os(DONE).is_some() || value.trim().is_empty() {
        return;
    }
    let folders = cuda_libs::folders(&value);
    let links = cuda_libs::link_folder_for(&value);
    if let Err(e) = cuda_libs::link_folder(&folders, &links) {
        eprintln!(
            "{}: cannot link the CUDA libraries into {}: {e}",
            cuda_libs::LIBS_VAR,
            links.display()
        );
        return;
    }
    let mut path = std::env::join_paths(std::iter::once(links).chain(folders)).unwrap_or_default();
    if let Some(old) = std::env::var_os("LD_LIBRARY_PATH").filter(|p| !p.is_empty()) {
        path.push(":");
        path.push(old);
    }
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let e = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env("LD_LIBRARY_PATH", path)
        .env(DONE, "1")
        .exec();
    eprintln!(
        "{}: restarting with the CUDA libraries failed: {e}",
        cuda_libs::LIBS_VAR
    );
}

fn main() -> std::process::ExitCode {
    find_cuda_libraries();
    keep_freed_memory();
    let json_logs = match init_logging() {
        Ok(json) => json,
        Err(e) => {
            eprintln!("Error: {e:?}");
            return std::process::ExitCode::from(2);
        }
    };
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // A log collector reading JSON lines gets the fatal error as one of them too.
            if json_logs {
                tracing::error!(error = format!("{e:?}"), "fatal");
            } else {
                eprintln!("Error: {e:?}");
            }
            // A stopped run is not a failed one: the code says SIGTERM, so a Job replaces the pod.
            std::process::ExitCode::from(if e.is::<signals::Stopped>() {
                signals::EXIT_STOPPED
            } else {
                1
            })
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Inspect { store, json } => inspect::run(&store, json),
        Command::Devices {
            library_path,
            compile,
        } => {
            if library_path {
                say!("{}", std::env::var("LD_LIBRARY_PATH").unwrap_or_default());
                return Ok(());
            }
            devices();
            if compile {
                let ((major, minor), n) = tessera_kernels::cuda::compile_all()?;
                say!("NVRTC {major}.{minor}: {n} CUDA sources compiled");
            }
            Ok(())
        }
        Command::Simulate(args) => simulate(&args),
        Command::Demo { store } => {
            if !PathBuf::from(&store).exists() {
                // The demo data: CITE-seq-like (RNA + protein), 3 batches, 20% of cells without
                // protein; every other setting is simulate's default.
                let demo = Cli::try_parse_from([
                    "tessera",
                    "simulate",
                    &store,
                    "--proteins",
                    "30",
                    "--missing",
                    "0.2",
                ])?;
                if let Command::Simulate(args) = demo.command {
                    simulate(&args)?;
                }
            }
            inspect::run(&store, false)
        }
        Command::Bench { what } => bench::run(what),
        Command::Coordinator(args) => coordinator::run(args),
        Command::Worker(args) => worker::run(args),
        Command::Submit(args) => submit::submit(args),
        Command::Cancel(args) => submit::cancel(args),
        Command::Train(args) => train::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Plot(args) => plot::run(args),
        Command::Snf(args) => snf::run(args),
        Command::Map(args) => map::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Convert {
            input,
            output,
            zarr_format,
        } => convert(&input, &output, zarr_format.into()),
    }
}
