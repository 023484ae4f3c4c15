//! `tessera bench`: the hot paths with their floors. `load`: streaming throughput of the data
//! layer, side by side with Python anndata reading the same rows of the same stores; `ops`,
//! `step`, `eval`: the engine, one training step and the metrics; `allreduce`: the CPU ring
//! all-reduce on loopback against the ring's ideal time.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use tessera_data::{Dataset, Loader, LoaderConfig, SimConfig, ZarrVersion};
use tessera_kernels::backend::{Backend, Cpu, Cuda, In, Out};
use tessera_kernels::ops::linear::MatmulPrecision;

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Engine ops at the shapes of 2,000- and 8,000-gene models: GEMM GFLOP/s and the fused
    /// likelihood's throughput, each with its floor (FLOPs, bytes), on the CPU or a GPU.
    Ops {
        #[arg(long, default_value_t = 5)]
        repeat: usize,
        #[command(flatten)]
        device: DeviceArgs,
    },
    /// One training step of the scVI-size VAE (sparse counts in, forward, backward, AdamW) on a
    /// synthetic batch, without the loader: cells/s against the GEMM floor.
    Step {
        #[arg(long, default_value_t = 2_000)]
        genes: usize,
        #[arg(long, default_value_t = 128)]
        batch: usize,
        #[arg(long, default_value_t = 128)]
        hidden: usize,
        /// Non-zero counts per cell.
        #[arg(long, default_value_t = 380)]
        nnz: usize,
        #[arg(long, default_value_t = 200)]
        steps: usize,
        /// A run configuration whose `[model]` options (regularisers, heads, likelihood) the
        /// step uses (its size stays --hidden); the batch carries labels and targets for the
        /// heads.
        #[arg(long)]
        config: Option<PathBuf>,
        #[command(flatten)]
        device: DeviceArgs,
    },
    /// `tessera eval` on a synthetic embedding: the O(n² d) distance pass (kNN + silhouettes)
    /// against its FLOP floor, and the whole evaluation, for each cell count.
    Eval {
        #[arg(long, value_delimiter = ',', default_values_t = vec![10_000usize, 30_000, 100_000])]
        cells: Vec<usize>,
        #[arg(long, default_value_t = 10)]
        dims: usize,
    },
    /// Data-parallel training as `tessera train --workers N` runs it (coordinator, N worker
    /// processes on loopback) on simulated scVI-size data: cells/s per worker count and rank
    /// 0's step time split into compute, all-reduce and data wait (epochs after the first).
    Workers {
        #[arg(long, value_delimiter = ',', default_values_t = vec![1usize, 2, 4])]
        workers: Vec<usize>,
        #[arg(long, default_value_t = 10_000)]
        cells: usize,
        #[arg(long, default_value_t = 2_000)]
        genes: usize,
        #[arg(long, default_value_t = 3)]
        epochs: usize,
    },
    /// SNF (affinities of 3 views x 200 features, then 20 fusion iterations, K = 20) at each
    /// sample count, and snfpy 0.2.2 on the same views with --python: seconds and the ratio.
    Snf {
        #[arg(long, value_delimiter = ',', default_values_t = vec![1_000usize, 5_000])]
        n: Vec<usize>,
        #[arg(long, default_value_t = 200)]
        features: usize,
        #[arg(long, default_value_t = 3)]
        views: usize,
        /// A Python with snfpy 0.2.2 (tests/python/requirements.txt) to run it side by side.
        #[arg(long)]
        python: Option<PathBuf>,
        /// Also run the whole `tessera snf` job on the same views (as obsm entries of a
        /// store) in memory and out of core with blocks of this many rows.
        #[arg(long)]
        out_of_core: Option<usize>,
    },
    /// NCCL all-reduce at world size 1 on GPU 0 (what one GPU worker pays per step) for the
    /// scVI-size and Census-size gradients; SKIPPED without a device or libnccl.
    Nccl {
        #[arg(long, value_delimiter = ',', default_values_t = vec![520_000usize, 8_700_000])]
        floats: Vec<usize>,
        #[arg(long, default_value_t = 50)]
        repeat: usize,
    },
    /// The TCP ring all-reduce among in-process ranks on loopback, for gradient buffers of
    /// the scVI-size model (~0.52M floats) and a Census-size one (8.7M): time per call, bus
    /// bandwidth, and the ideal 2(N−1)/N × bytes / (one loopback stream's bandwidth).
    Allreduce {
        #[arg(long, value_delimiter = ',', default_values_t = vec![2usize, 4])]
        world: Vec<usize>,
        /// Buffer sizes in f32 elements.
        #[arg(long, value_delimiter = ',', default_values_t = vec![520_000usize, 8_700_000])]
        floats: Vec<usize>,
        #[arg(long, default_value_t = 20)]
        repeat: usize,
    },
    /// `tessera serve`'s Encode over loopback gRPC (a model trained briefly on simulated
    /// data, features sent by name): requests/s, cells/s and latency for requests of each
    /// size with --concurrency requests in flight.
    Encode {
        /// Cells per request.
        #[arg(long, value_delimiter = ',', default_values_t = vec![1usize, 100, 1_000])]
        cells: Vec<usize>,
        #[arg(long, default_value_t = 2_000)]
        genes: usize,
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
        /// Seconds of requests per size.
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
    },
    /// Stream all of X in mini-batches from local Zarr v2 and v3 stores (generated once).
    Load {
        #[arg(long, default_value_t = 100_000)]
        cells: u64,
        #[arg(long, default_value_t = 2_000)]
        genes: usize,
        /// Median UMIs per cell of the generated data (sets nnz per cell).
        #[arg(long, default_value_t = 1_500.0)]
        library: f64,
        #[arg(long, default_value_t = 1_024)]
        batch_size: usize,
        /// Where the generated stores are kept between runs.
        #[arg(long, default_value = "target/bench-data")]
        dir: PathBuf,
        /// Python interpreter with anndata installed, to time anndata on the same stores.
        #[arg(long)]
        python: Option<PathBuf>,
        /// Benchmark these existing local AnnData stores instead of generated ones (repeatable).
        #[arg(long)]
        store: Vec<PathBuf>,
        /// Timed passes per reader; the median is reported (this machine's timings are noisy).
        #[arg(long, default_value_t = 5)]
        repeat: usize,
    },
}

/// Where a benchmark runs.
#[derive(Debug, Clone, clap::Args)]
pub struct DeviceArgs {
    /// `cpu`, `cuda` (GPU 0) or `cuda:N`.
    #[arg(long, default_value = "cpu", value_parser = parse_device)]
    device: Device,
    /// On a GPU, let cuBLAS use TF32 tensor cores for f32 GEMMs (faster, ~1e-3 relative error).
    #[arg(long, conflicts_with = "bf16")]
    tf32: bool,
    /// On a GPU, f32 GEMMs on bf16 tensor cores with f32 accumulation (PyTorch's "medium"
    /// matmul precision: twice TF32's rate, inputs rounded to within 4e-3).
    #[arg(long)]
    bf16: bool,
}

/// The CPU (None) or GPU N.
#[derive(Debug, Clone, Copy)]
struct Device(Option<usize>);

/// `cpu`, `cuda` (GPU 0) or `cuda:N`.
fn parse_device(text: &str) -> Result<Device, String> {
    match text {
        "cpu" => Ok(Device(None)),
        "cuda" => Ok(Device(Some(0))),
        _ => text
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .map(|n| Device(Some(n)))
            .ok_or_else(|| format!("expected cpu, cuda or cuda:N, not {text:?}")),
    }
}

enum Engine {
    Cpu,
    Cuda(Cuda),
}

impl DeviceArgs {
    fn open(&self) -> Result<Engine> {
        match self.device.0 {
            None if self.tf32 || self.bf16 => {
                bail!("--tf32 and --bf16 apply to --device cuda only")
            }
            None => Ok(Engine::Cpu),
            Some(ordinal) => {
                let gpu = tessera_kernels::cuda::Gpu::new(ordinal)
                    .with_context(|| format!("--device cuda:{ordinal}"))?;
                // clap refuses --tf32 with --bf16.
                let precision = if self.bf16 {
                    MatmulPrecision::Medium
                } else {
                    MatmulPrecision::tf32_or_f32(self.tf32)
                };
                say!("cuda:{ordinal}: GEMM inputs in {}", precision.describe());
                Ok(Engine::Cuda(Cuda::new(gpu.with_matmul(precision))))
            }
        }
    }
}

pub fn run(command: BenchCommand) -> Result<()> {
    match command {
        BenchCommand::Ops { repeat, device } => match device.open()? {
            Engine::Cpu => ops(&Cpu, repeat.max(1)),
            Engine::Cuda(gpu) => ops(&gpu, repeat.max(1)),
        },
        BenchCommand::Encode {
            cells,
            genes,
            concurrency,
            seconds,
        } => crate::serve::bench_encode(&cells, genes, concurrency.max(1), seconds),
        BenchCommand::Eval { cells, dims } => eval(&cells, dims),
        BenchCommand::Workers {
            workers,
            cells,
            genes,
            epochs,
        } => data_parallel(&workers, cells, genes, epochs.max(2)),
        BenchCommand::Snf {
            n,
            features,
            views,
            python,
            out_of_core,
        } => snf_side_by_side(&n, features, views.max(2), python.as_deref(), out_of_core),
        BenchCommand::Nccl { floats, repeat } => nccl(&floats, repeat.max(1)),
        BenchCommand::Allreduce {
            world,
            floats,
            repeat,
        } => allreduce(&world, &floats, repeat.max(1)),
        BenchCommand::Step {
            genes,
            batch,
            hidden,
            nnz,
            steps,
            config,
            device,
        } => {
            let shape = StepShape {
                genes,
                batch,
                hidden,
                nnz,
                steps,
            };
            match device.open()? {
                Engine::Cpu => step(Cpu, shape, config.as_deref()),
                Engine::Cuda(gpu) => {
                    step(gpu.clone(), shape, config.as_deref())?;
                    // Every step after the first of its shape should take its buffers from
                    // the cache: the driver's allocations stay at one step's worth per shape.
                    let counts = gpu.gpu().cache_counts();
                    say!(
                        "  device buffers: {} reused, {} allocated by the driver",
                        counts.reused,
                        counts.allocated
                    );
                    Ok(())
                }
            }
        }
        BenchCommand::Load {
            cells,
            genes,
            library,
            batch_size,
            dir,
            python,
            store,
            repeat,
        } => {
            let stores = if store.is_empty() {
                generated_stores(cells, genes, library, &dir)?
            } else {
                store
            };
            load(&stores, batch_size, python.as_deref(), repeat.max(1))
        }
    }
}

fn snf_side_by_side(
    sizes: &[usize],
    features: usize,
    views: usize,
    python: Option<&Path>,
    out_of_core: Option<usize>,
) -> Result<()> {
    use rand::SeedableRng;
    use rand_distr::{Distribution, Normal};
    use tessera_kernels::ops::affinity::{Metric, feature_affinity};
    let dir = std::env::temp_dir().join(format!("tessera-bench-snf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    say!("SNF: {views} views x {features} features, K = 20, t = 20 (affinities included)");
    say!(
        "{:>7} {:>10} {:>12} {:>10} {:>12} {:>8}",
        "n",
        "tessera s",
        "tessera MiB",
        "snfpy s",
        "snfpy MiB",
        "ratio"
    );
    for &n in sizes {
        // Four clusters whose centres differ in every view.
        let mut rng = rand_xoshiro::Xoshiro256PlusPlus::seed_from_u64(n as u64);
        let noise = Normal::new(0.0f64, 1.0)?;
        let data: Vec<Vec<f64>> = (0..views)
            .map(|v| {
                (0..n * features)
                    .map(|e| {
                        ((e / features) % 4) as f64 * (1.0 + v as f64) * 0.3
                            + noise.sample(&mut rng)
                    })
                    .collect()
            })
            .collect();
        // Peak memory of this size alone: Linux resets the high-water mark on request.
        let _ = std::fs::write("/proc/self/clear_refs", "5");
        let started = Instant::now();
        let affinities: Vec<Vec<f64>> = data
            .iter()
            .map(|x| feature_affinity(&mut x.clone(), n, features, Metric::SqEuclidean, 20, 0.5))
            .collect();
        tessera_network::snf(
            affinities
                .into_iter()
                .map(tessera_network::View::complete)
                .collect(),
            n,
            tessera_network::SnfParams::default(),
        )?;
        let ours = started.elapsed().as_secs_f64();
        let our_mib =
            tessera_worker::peak_memory_mib().map_or("-".to_string(), |m| format!("{m:.0}"));
        let theirs = match python {
            Some(py) => {
                let paths: Vec<PathBuf> = (0..views)
                    .map(|v| dir.join(format!("n{n}-view{v}.csv")))
                    .collect();
                for (x, path) in data.iter().zip(&paths) {
                    let csv: String = x
                        .chunks(features)
                        .map(|r| {
                            r.iter()
                                .map(|v| format!("{v:.17e}"))
                                .collect::<Vec<_>>()
                                .join(",")
                                + "\n"
                        })
                        .collect();
                    std::fs::write(path, csv)
                        .with_context(|| format!("writing {}", path.display()))?;
                }
                let script =
                    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../bench/snf_snfpy.py");
                let out = Command::new(py)
                    .arg(&script)
                    .args(&paths)
                    .output()
                    .with_context(|| format!("running {}", script.display()))?;
                if !out.status.success() {
                    bail!("snfpy at n = {n}: {}", String::from_utf8_lossy(&out.stderr));
                }
                let printed = String::from_utf8_lossy(&out.stdout).into_owned();
                let mut fields = printed.split_whitespace().map(|s| s.parse::<f64>().ok());
                fields
                    .next()
                    .flatten()
                    .map(|seconds| (seconds, fields.next().flatten()))
            }
            None => None,
        };
        let (t, mib, r) = theirs.map_or(
            ("-".to_string(), "-".to_string(), "-".to_string()),
            |(t, mib)| {
                (
                    format!("{t:.2}"),
                    mib.map_or("-".to_string(), |m| format!("{m:.0}")),
                    format!("{:.1}x", t / ours),
                )
            },
        );
        say!("{n:>7} {ours:>10.2} {our_mib:>12} {t:>10} {mib:>12} {r:>8}");
        if let Some(block) = out_of_core {
            snf_job_in_memory_and_out_of_core(&dir, n, &data, features, block)?;
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// The whole `tessera snf` job (views read from obsm, SNF, 4 clusters, top-20 network written)
/// as a child process out of core and in memory: seconds, peak MiB (from its report) and the
/// scratch store's traffic.
fn snf_job_in_memory_and_out_of_core(
    dir: &Path,
    n: usize,
    data: &[Vec<f64>],
    features: usize,
    block: usize,
) -> Result<()> {
    let store = dir.join(format!("n{n}.zarr")).display().to_string();
    tessera_data::simulate(
        &store,
        &SimConfig {
            n_cells: n as u64,
            n_genes: 20,
            ..SimConfig::default()
        },
        |_| {},
    )
    .with_context(|| format!("simulating into {store}"))?;
    let adata = tessera_data::AnnData::open(&store)?;
    for (v, x) in data.iter().enumerate() {
        adata.write_obsm(
            &format!("view{v}"),
            &x.iter().map(|&v| v as f32).collect::<Vec<f32>>(),
            features,
            false,
        )?;
    }
    let views: Vec<String> = (0..data.len()).map(|v| format!("obsm/view{v}")).collect();
    let out = dir.join(format!("n{n}-out"));
    let scratch = dir.join(format!("n{n}-scratch.zarr")).display().to_string();
    let block = block.to_string();
    let job = |key: &str, extra: &[&str]| -> Result<(f64, f64)> {
        let exe = std::env::current_exe().context("finding the tessera executable")?;
        let status = Command::new(exe)
            .args([
                "snf",
                "--data",
                &store,
                "--view",
                &views.join(","),
                "--clusters",
                "4",
                "--key",
                key,
                "--out",
            ])
            .arg(&out)
            .args(extra)
            .stdout(std::process::Stdio::null())
            .status()
            .context("running tessera snf")?;
        if !status.success() {
            bail!("tessera snf ({key}) at n = {n} failed: {status}");
        }
        let report: tessera_worker::network::NetworkReport =
            serde_json::from_slice(&std::fs::read(out.join("snf.json"))?)?;
        let seconds = report.seconds_affinities
            + report.seconds_network
            + report.seconds_clustering
            + report.seconds_write;
        Ok((seconds, report.peak_memory_mib.unwrap_or(f64::NAN)))
    };
    let (disk_s, disk_mib) = job(
        "disk",
        &["--out-of-core", "--block", &block, "--scratch", &scratch],
    )?;
    let (memory_s, memory_mib) = job("memory", &[])?;
    // Fusion traffic: per iteration and view m − 1 + 1 matrices read, 2 written; set-up and the
    // end add 5m + 4 (the clustering's passes over the network are not counted).
    let m = data.len() as f64;
    let moved = (n * n * 8) as f64 / 1e9 * (20.0 * m * (m + 2.0) + 5.0 * m + 4.0);
    say!(
        "        job in memory {memory_s:.2} s / {memory_mib:.0} MiB; out of core (block {block}) {disk_s:.2} s / {disk_mib:.0} MiB, {moved:.0} GB through the scratch store ({:.2} GB/s)",
        moved / disk_s
    );
    std::fs::remove_dir_all(&store).with_context(|| format!("removing {store}"))?;
    Ok(())
}

fn nccl(floats: &[usize], repeat: usize) -> Result<()> {
    use tessera_worker::nccl::Nccl;
    let gpu = match tessera_kernels::cuda::Gpu::new(0) {
        Ok(g) => g,
        Err(e) => {
            say!("SKIPPED: NCCL all-reduce needs a CUDA device: {e}");
            return Ok(());
        }
    };
    let nccl = match Nccl::over_ring(&gpu, &mut tessera_worker::ring::Ring::single()) {
        Ok(n) => n,
        Err(e) => {
            say!("SKIPPED: {e}");
            return Ok(());
        }
    };
    say!("NCCL all-reduce (sum, in place), world size 1 on GPU 0, median of {repeat}:");
    say!("{:>12} {:>10} {:>10}", "floats", "MB", "ms/call");
    for &n in floats {
        let mut buf = gpu.zeros(n)?;
        nccl.all_reduce_sum(&mut buf)?;
        nccl.synchronize()?;
        let mut times: Vec<f64> = (0..repeat)
            .map(|_| {
                let started = std::time::Instant::now();
                nccl.all_reduce_sum(&mut buf)?;
                nccl.synchronize()?;
                Ok(started.elapsed().as_secs_f64())
            })
            .collect::<Result<_, tessera_worker::nccl::NcclError>>()?;
        times.sort_by(f64::total_cmp);
        say!(
            "{n:>12} {:>10.1} {:>10.3}",
            n as f64 * 4e-6,
            1e3 * times[times.len() / 2]
        );
    }
    Ok(())
}

fn data_parallel(workers: &[usize], cells: usize, genes: usize, epochs: usize) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("tessera-bench-workers-{}", std::process::id()));
    let mut rows = Vec::new();
    for &n in workers {
        let store = dir.join(format!("w{n}.zarr"));
        let sim = tessera_data::SimConfig {
            n_cells: cells as u64,
            n_genes: genes,
            ..tessera_data::SimConfig::default()
        };
        tessera_data::simulate(&store.display().to_string(), &sim, |_| {})
            .with_context(|| format!("simulating into {}", store.display()))?;
        let mut config = tessera_worker::FitConfig::default();
        config.train.max_epochs = Some(epochs);
        let opts = tessera_worker::FitOptions {
            data: store.display().to_string(),
            modalities: Vec::new(),
            batch_key: Some("batch".into()),
            label_key: None,
            unlabeled_category: None,
            covariates: Default::default(),
            config,
            out: dir.join(format!("out{n}")),
            embedding_key: "X_tessera".into(),
            prediction_key: tessera_worker::fit::PREDICTION_KEY.into(),
            overwrite: false,
            store_outputs: true,
            resume: false,
            denoised: None,
            cache_bytes: tessera_worker::DEFAULT_CACHE_MIB << 20,
            device: tessera_worker::device::Device::Cpu,
            init_from: None,
            layer: None,
        };
        let report = crate::distributed::train(&opts, n)?;
        // The first epoch fills the block cache; the rest is the steady state.
        let steady = report
            .history
            .get(1..)
            .filter(|h| !h.is_empty())
            .unwrap_or(&report.history);
        if steady.is_empty() {
            bail!("{n} workers: no epoch trained");
        }
        let k = steady.len() as f64;
        let mut rates: Vec<f64> = steady.iter().map(|r| r.cells_per_second).collect();
        rates.sort_by(f64::total_cmp);
        let mean =
            |f: fn(&tessera_worker::EpochRecord) -> f64| steady.iter().map(f).sum::<f64>() / k;
        let step_count = (report.n_train as f64 / opts.config.train.batch_size as f64).ceil();
        rows.push((
            n,
            rates[rates.len() / 2],
            mean(|r| r.steps.compute),
            mean(|r| r.steps.allreduce),
            mean(|r| r.steps.data),
            mean(|r| r.seconds),
            step_count,
        ));
    }
    let _ = std::fs::remove_dir_all(&dir);
    say!(
        "data-parallel training, {cells} cells x {genes} genes (scVI size, batch 128 cut into one part per worker), {epochs} epochs; medians/means over epochs 2-{epochs}, rank 0:"
    );
    say!(
        "{:>7} {:>10} {:>10} {:>12} {:>13} {:>11} {:>14}",
        "workers",
        "cells/s",
        "epoch s",
        "compute s",
        "all-reduce s",
        "data s",
        "ms/all-reduce"
    );
    for (n, rate, compute, allreduce, data, epoch, steps) in rows {
        say!(
            "{n:>7} {rate:>10.0} {epoch:>10.2} {compute:>12.2} {allreduce:>13.2} {data:>11.3} {:>14.2}",
            1e3 * allreduce / steps
        );
    }
    Ok(())
}

/// The synthetic training step's sizes.
struct StepShape {
    genes: usize,
    batch: usize,
    hidden: usize,
    nnz: usize,
    steps: usize,
}

fn step<B: Backend<f32> + 'static>(
    backend: B,
    shape: StepShape,
    config: Option<&Path>,
) -> Result<()> {
    use tessera_kernels::ops::linear::CsrRef;
    use tessera_models::{
        Categories, ModalityCounts, Supervision, Survival, TrainConfig, Trainer, Vae, VaeBatch,
    };
    let StepShape {
        genes,
        batch,
        hidden,
        nnz,
        steps,
    } = shape;
    let (n_batch, n_labels) = (3, 8);
    let model = match config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            tessera_worker::FitConfig::from_toml(&text, &path.display().to_string())?.model
        }
        None => tessera_worker::FitConfig::default().model,
    };
    let config = tessera_models::VaeConfig {
        n_hidden: hidden,
        ..model
    };
    let (latent, layers) = (config.n_latent, config.n_layers.max(1));
    // Labels only where a head reads them: `tessera train` stages them for those alone.
    let labelled = config.classifier_weight > 0.0 || config.contrastive_weight > 0.0;
    let n_targets = config.regression_keys.len();
    let device = backend.name();
    let mut trainer = Trainer::new(
        Vae::<f32, B>::new(
            backend,
            config,
            &[("rna", genes)],
            Categories {
                n_batch,
                n_cov: n_batch,
                n_labels,
            },
            0,
        )?,
        TrainConfig::default(),
    )?;
    let nnz = nnz.min(genes);
    let (indptr, indices, data) = synthetic_counts(batch, genes, nnz);
    let covariates: Vec<f32> = (0..batch * n_batch)
        .map(|i| f32::from(u8::from(i % n_batch == (i / n_batch) % n_batch)))
        .collect();
    let modalities = [ModalityCounts {
        counts: CsrRef {
            rows: batch,
            cols: genes,
            indptr: &indptr,
            indices: &indices,
            data: &data,
        },
        present: None,
    }];
    let labels: Vec<i32> = (0..batch as i32).map(|r| r % n_labels as i32).collect();
    let targets: Vec<f64> = (0..batch * n_targets).map(|i| (i % 7) as f64).collect();
    let times: Vec<f64> = (0..batch).map(|r| (r % 13) as f64).collect();
    let events: Vec<bool> = (0..batch).map(|r| r % 3 != 0).collect();
    let supervision = Supervision {
        labels: labelled.then_some(labels.as_slice()),
        targets: Some(&targets),
        survival: Some(Survival {
            times: &times,
            events: &events,
        }),
    };
    let as_batch = || VaeBatch::new(&modalities, &covariates).with_supervision(supervision);
    for _ in 0..5 {
        trainer.step(as_batch(), 10)?;
    }
    let per_round = steps.div_ceil(5).max(1);
    let b = trainer.model.backend().clone();
    let (seconds, fastest) = step_seconds(&b, per_round, || {
        trainer.step(as_batch(), 10)?;
        Ok(())
    })?;
    // As `tessera train` runs: the counts staged by another thread (on a GPU, copied on the
    // copy stream while the step before computes), one or two steps ahead; or, with the
    // training set kept on the device, gathered there from their rows (here the batch's own
    // rows, reversed).
    let counts = modalities[0].counts;
    let transform = tessera_models::ENCODER_TRANSFORM;
    let (staged_seconds, _, _) = staged_steps(&mut trainer, as_batch, per_round, |b| {
        b.stage_csr(counts, transform)
    })?;
    let resident = std::sync::Arc::new(b.resident_csr(counts)?);
    let rows: Vec<usize> = (0..batch).rev().collect();
    let (resident_seconds, _, queueing) = staged_steps(&mut trainer, as_batch, per_round, |b| {
        b.stage_rows(&resident, &rows, transform)
    })?;
    let replayed = replayed_seconds(&mut trainer, as_batch, per_round)?;
    // Dense GEMMs of one step (forward, input and weight gradients): encoder hidden→latent
    // heads, decoder latent→hidden and hidden→genes (the big one), and with more than one
    // layer the hidden→hidden ones on both sides (the decoder's also read the covariates); the
    // sparse first layer counts its non-zeros.
    let deeper = (layers - 1) * batch * hidden * (2 * hidden + n_batch);
    let dense = 2.0
        * (batch * (latent + n_batch) * hidden
            + batch * (hidden + n_batch) * genes
            + batch * hidden * 2 * latent
            + deeper) as f64;
    let flops = 3.0 * dense + 2.0 * 2.0 * (batch * nnz * hidden) as f64;
    say!(
        "training step on {device}: {genes} genes, {layers} x {hidden} hidden, {latent} latent, batch {batch}, {nnz} nnz/cell, {} CPU threads",
        rayon::current_num_threads()
    );
    say!(
        "  {:.3} ms/step (counts uploaded in the step, each step read before the next; median of 5 rounds of {per_round}; fastest {:.3}), {:.0} cells/s; {:.3} GFLOP/step of GEMM -> {:.1} GFLOP/s effective",
        seconds * 1e3,
        fastest * 1e3,
        batch as f64 / seconds,
        flops / 1e9,
        flops / seconds / 1e9
    );
    say!(
        "  counts staged ahead by another thread, each step read while the next computes, as train runs: {:.3} ms/step, {:.0} staged cells/s",
        staged_seconds * 1e3,
        batch as f64 / staged_seconds
    );
    say!(
        "  counts kept on the device, each batch gathered from its rows: {:.3} ms/step, {:.0} resident cells/s",
        resident_seconds * 1e3,
        batch as f64 / resident_seconds
    );
    // Close to the step's time on a GPU, the host bounds the step (what a CUDA graph of the
    // step would take off it).
    say!(
        "  the host queues a resident step's forward and backward in {:.0} us (mean), {:.0}% of its time",
        queueing * 1e6,
        100.0 * queueing / resident_seconds
    );
    match replayed {
        Some(replayed) => say!(
            "  the step replayed from a CUDA graph (counts in fixed buffers, each step read before the next): {:.3} ms/step, {:.0} replayed cells/s, {:.2}x the first rate",
            replayed * 1e3,
            batch as f64 / replayed,
            seconds / replayed
        ),
        None if !trainer.model.replayable_step(true) => say!(
            "  not replayed from a CUDA graph: this model's step takes values from each batch on the host (on a GPU, `tessera train` runs it op by op)"
        ),
        None => {}
    }
    Ok(())
}

/// On a GPU, the median seconds per step of the same step replayed from a CUDA graph
/// ([`graph_step_seconds`]); None elsewhere, and for a step that takes host values per batch.
fn replayed_seconds<'a, B: Backend<f32> + 'static>(
    trainer: &mut tessera_models::Trainer<f32, B>,
    as_batch: impl Fn() -> tessera_models::VaeBatch<'a, f32> + Send,
    per_round: usize,
) -> Result<Option<f64>> {
    let any: &mut dyn std::any::Any = trainer;
    let Some(trainer) = any.downcast_mut::<tessera_models::Trainer<f32, Cuda>>() else {
        return Ok(None);
    };
    if !trainer.model.replayable_step(true) {
        return Ok(None);
    }
    graph_step_seconds(trainer, as_batch, per_round).map(Some)
}

/// Seconds per step (median of [`step_seconds`]' rounds) of the forward and backward captured
/// once as a CUDA graph and replayed, the batch copied inside it out of fixed buffers (as
/// `models/tests/cuda_parity.rs` checks bit for bit), each step's terms and gradient flag read
/// before the update: [`step_seconds`]' first rate with the host's queueing of ~90 ops replaced
/// by one graph launch.
fn graph_step_seconds<'a>(
    trainer: &mut tessera_models::Trainer<f32, Cuda>,
    as_batch: impl Fn() -> tessera_models::VaeBatch<'a, f32> + Send,
    per_round: usize,
) -> Result<f64> {
    let cuda = trainer.model.backend().clone();
    let (counts, covariates) = (as_batch().modalities[0].counts, as_batch().covariates);
    // The batch in fixed buffers, as training keeps each step shape's (`worker/src/replay.rs`).
    let staged = cuda.stage_csr(counts, tessera_models::ENCODER_TRANSFORM)?;
    let mut fixed = tessera_kernels::cuda_fixed::FixedBatch::for_batch(cuda.gpu(), &staged, 0)?
        .context("a replayed step indexes its counts on the device: no row may repeat a gene")?;
    fixed.write(cuda.gpu(), staged)?;
    let fixed_covariates = cuda.upload(covariates)?;
    let fixed_labels = label_codes(&as_batch())
        .map(|codes| cuda.upload(&codes))
        .transpose()?;
    let body = |trainer: &mut tessera_models::Trainer<f32, Cuda>| -> Result<_> {
        let gpu = cuda.gpu();
        let on_device = tessera_models::OnDevice {
            counts: vec![Some(fixed.to_device(gpu)?)],
            covariates: Some(gpu.copy_of(&fixed_covariates.slice(..))?),
            labels: fixed_labels
                .as_ref()
                .map(|l| gpu.copy_of(&l.slice(..)))
                .transpose()?,
        };
        Ok(trainer.part_terms(as_batch(), on_device, 10, 0)?)
    };
    // One eager step of these shapes first: the capture takes its buffers from the cache.
    let eager = body(trainer)?;
    let read = trainer.read_terms(&eager)?;
    drop(eager);
    trainer.apply(Some(read.finite))?;
    cuda.gpu().set_draw_step(trainer.step + 1)?;
    let (graph, captured) = cuda.gpu().capture(|| body(trainer))?;
    let gpu = cuda.gpu();
    let (seconds, _) = step_seconds(&cuda, per_round, move || {
        gpu.set_draw_step(trainer.step + 1)?;
        graph.launch()?;
        let read = trainer.read_terms(&captured)?;
        trainer.apply(Some(read.finite))?;
        Ok(())
    })?;
    Ok(seconds)
}

/// The batch's labels as the classifier reads them on the device (f32 codes), where the model
/// has a classifier: as `tessera train` stages them.
fn label_codes(batch: &tessera_models::VaeBatch<'_, f32>) -> Option<Vec<f32>> {
    batch
        .supervision
        .labels
        .map(|labels| labels.iter().map(|&l| l as f32).collect())
}

/// [`step_seconds`] of steps whose counts `stage` starts on another thread, one or two steps
/// ahead, each step's terms read while the next one computes: as the training loop runs them;
/// and the mean seconds the host took to queue a step's forward and backward.
fn staged_steps<'a, B: Backend<f32>>(
    trainer: &mut tessera_models::Trainer<f32, B>,
    as_batch: impl Fn() -> tessera_models::VaeBatch<'a, f32> + Send,
    per_round: usize,
    stage: impl Fn(&B) -> std::result::Result<B::Staged, tessera_kernels::backend::EngineError> + Send,
) -> Result<(f64, f64, f64)> {
    let b = trainer.model.backend().clone();
    let mut queue = tessera_models::Overlapped::default();
    let (mut queueing, mut queued) = (0.0, 0u32);
    let timed = std::thread::scope(|s| {
        let (send, staged) = std::sync::mpsc::sync_channel(1);
        let stager = b.clone();
        // The covariates and labels travel with the counts, as the training loop stages them.
        let (covariates, labels) = (as_batch().covariates, label_codes(&as_batch()));
        let both = move || -> std::result::Result<_, tessera_kernels::backend::EngineError> {
            let labels = labels
                .as_ref()
                .map(|l| stager.stage_values(l))
                .transpose()?;
            Ok((stage(&stager)?, stager.stage_values(covariates)?, labels))
        };
        s.spawn(move || while send.send(both()).is_ok() {});
        let (device, trainer, queue) = (&b, &mut *trainer, &mut queue);
        let (queueing, queued) = (&mut queueing, &mut queued);
        // The receiver moves to the pool thread that steps.
        step_seconds(&b, per_round, move || {
            let (csr, covariates, labels) = staged.recv()??;
            let on_device = tessera_models::OnDevice {
                counts: vec![Some(device.staged_csr(csr)?)],
                covariates: Some(device.staged_values(covariates)?),
                labels: labels.map(|l| device.staged_values(l)).transpose()?,
            };
            let started = Instant::now();
            let pending = trainer.part_terms(as_batch(), on_device, 10, 0)?;
            (*queueing, *queued) = (*queueing + started.elapsed().as_secs_f64(), *queued + 1);
            queue.push(trainer, pending)?;
            Ok(())
        })
    })?;
    queue.finish(trainer)?;
    Ok((timed.0, timed.1, queueing / f64::from(queued.max(1))))
}

/// Seconds per step, median and fastest of five timed rounds of `per_round` steps (this
/// machine's neighbours make single timings swing by ±15%). On a pool thread, as `fit` runs:
/// the ops' parallel loops start without a cross-thread hand-off.
fn step_seconds<B: Backend<f32>>(
    b: &B,
    per_round: usize,
    mut step: impl FnMut() -> Result<()> + Send,
) -> Result<(f64, f64)> {
    let mut rounds = Vec::with_capacity(5);
    for _ in 0..5 {
        let started = Instant::now();
        rayon::scope(|_| (0..per_round).try_for_each(|_| step()))?;
        b.synchronize()?;
        rounds.push(started.elapsed().as_secs_f64() / per_round as f64);
    }
    rounds.sort_by(f64::total_cmp);
    Ok((rounds[2], rounds[0]))
}

fn eval(cells: &[usize], d: usize) -> Result<()> {
    use rand::SeedableRng;
    use rand_distr::{Distribution, Normal};
    use tessera_metrics::distance::Columns;
    use tessera_metrics::neighbors::Neighbors;
    let normal = Normal::new(0.0f32, 1.0)?;
    say!(
        "{:>9} {:>4} {:>14} {:>12} {:>11} {:>14} {:>12}",
        "cells",
        "dims",
        "distance pass",
        "pairs/s",
        "GFLOP/s",
        "whole eval",
        "cells/s"
    );
    for &n in cells {
        // 12 types x 3 batches around random centres.
        let mut rng = rand_xoshiro::Xoshiro256PlusPlus::seed_from_u64(n as u64);
        let centres: Vec<f32> = (0..12 * d).map(|_| 3.0 * normal.sample(&mut rng)).collect();
        let labels: Vec<u32> = (0..n as u32).map(|i| i % 12).collect();
        let batches: Vec<u32> = (0..n as u32).map(|i| (i / 12) % 3).collect();
        let x: Vec<f32> = (0..n * d)
            .map(|p| centres[labels[p / d] as usize * d + p % d] + normal.sample(&mut rng))
            .collect();
        let started = Instant::now();
        let nn = Neighbors::exact(&Columns::new(&x, n, d), 90);
        let pass = started.elapsed().as_secs_f64();
        std::hint::black_box(nn);
        let started = Instant::now();
        let scores = tessera_metrics::evaluate(
            &x,
            n,
            d,
            &labels,
            &batches,
            &tessera_metrics::EvalOptions::default(),
        )?;
        let whole = started.elapsed().as_secs_f64();
        std::hint::black_box(scores);
        // Floor of the pass: n² pairs x d x (sub, mul, add) + the sqrt; the data (n·d·8 bytes)
        // stays in cache, so the pass is compute-bound.
        let pairs = (n as f64) * (n as f64);
        say!(
            "{n:>9} {d:>4} {:>12.2} s {:>12.3e} {:>11.1} {:>12.2} s {:>12.0}",
            pass,
            pairs / pass,
            pairs * 3.0 * d as f64 / pass / 1e9,
            whole,
            n as f64 / whole
        );
    }
    Ok(())
}

struct Row {
    store: String,
    reader: String,
    cells_per_s: f64,
    decoded_mb_s: f64,
    stored_mb_s: f64,
}

fn dir_bytes(path: &Path) -> u64 {
    std::fs::read_dir(path)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| match e.file_type() {
                    Ok(t) if t.is_dir() => dir_bytes(&e.path()),
                    _ => e.metadata().map(|m| m.len()).unwrap_or(0),
                })
                .sum()
        })
        .unwrap_or(0)
}

/// Bytes per second of one loopback TCP stream (the link each ring step uses).
fn loopback_bandwidth() -> Result<f64> {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let (block, rounds) = (vec![1u8; 1 << 22], 32);
    let sender = std::thread::spawn(move || -> std::io::Result<()> {
        let mut s = std::net::TcpStream::connect(addr)?;
        for _ in 0..rounds {
            s.write_all(&block)?;
        }
        Ok(())
    });
    let (mut r, _) = listener.accept()?;
    let mut sink = vec![0u8; 1 << 22];
    let start = Instant::now();
    for _ in 0..rounds {
        r.read_exact(&mut sink)?;
    }
    let seconds = start.elapsed().as_secs_f64();
    sender
        .join()
        .map_err(|_| anyhow::anyhow!("the loopback sender panicked"))??;
    Ok((rounds << 22) as f64 / seconds)
}

fn allreduce(worlds: &[usize], sizes: &[usize], repeat: usize) -> Result<()> {
    use tessera_worker::ring::Ring;
    let bandwidth = loopback_bandwidth()?;
    say!(
        "ring all-reduce over loopback TCP, ranks as threads of one process on {} cores; one stream: {:.2} GB/s",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        bandwidth / 1e9
    );
    say!(
        "{:>5} {:>11} {:>10} {:>10} {:>12} {:>12} {:>9}",
        "ranks",
        "floats",
        "MB",
        "ms/call",
        "algbw GB/s",
        "busbw GB/s",
        "ideal ms"
    );
    for &world in worlds.iter().filter(|&&w| w >= 2) {
        for &floats in sizes {
            let listeners: Vec<std::net::TcpListener> = (0..world)
                .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
                .collect::<std::io::Result<_>>()?;
            let addrs: Vec<std::net::SocketAddr> = listeners
                .iter()
                .map(|l| l.local_addr())
                .collect::<std::io::Result<_>>()?;
            // Each rank times its calls after a warm-up; the slowest rank's median is the ring's.
            let times: Vec<Vec<f64>> = std::thread::scope(|s| {
                let ranks: Vec<_> = listeners
                    .iter()
                    .enumerate()
                    .map(|(rank, l)| {
                        let next = addrs[(rank + 1) % world];
                        s.spawn(move || -> Result<Vec<f64>> {
                            let mut ring = Ring::connect(
                                rank,
                                world,
                                0xbe_4c,
                                l,
                                next,
                                std::time::Duration::from_secs(60),
                            )?;
                            let mut buf = vec![1.0f32; floats];
                            ring.all_reduce_sum(&mut buf)?;
                            (0..repeat)
                                .map(|_| {
                                    let start = Instant::now();
                                    ring.all_reduce_sum(&mut buf)?;
                                    Ok(start.elapsed().as_secs_f64())
                                })
                                .collect()
                        })
                    })
                    .collect();
                ranks
                    .into_iter()
                    .map(|h| h.join().map_err(|_| anyhow::anyhow!("a rank panicked"))?)
                    .collect::<Result<Vec<_>>>()
            })?;
            let seconds = times.into_iter().map(median).fold(0.0, f64::max);
            let bytes = 4.0 * floats as f64;
            let ring_factor = 2.0 * (world - 1) as f64 / world as f64;
            say!(
                "{:>5} {:>11} {:>10.1} {:>10.3} {:>12.2} {:>12.2} {:>9.3}",
                world,
                floats,
                bytes / 1e6,
                seconds * 1e3,
                bytes / seconds / 1e9,
                ring_factor * bytes / seconds / 1e9,
                ring_factor * bytes / bandwidth * 1e3
            );
        }
    }
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The default benchmark data: the same simulated cells in Zarr v2 and v3, generated once.
fn generated_stores(cells: u64, genes: usize, library: f64, dir: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut stores = Vec::new();
    for version in [ZarrVersion::V2, ZarrVersion::V3] {
        let path = dir.join(format!(
            "load_{cells}x{genes}_lib{library}_v{}.zarr",
            version.number()
        ));
        if !path.join("X").exists() {
            if path.exists() {
                bail!("{} exists but holds no X; remove it", path.display());
            }
            eprintln!("generating {} ...", path.display());
            let config = SimConfig {
                n_cells: cells,
                n_genes: genes,
                library,
                version,
                seed: 42,
                ..Default::default()
            };
            tessera_data::simulate(&path.to_string_lossy(), &config, |_| {})?;
        }
        stores.push(path);
    }
    Ok(stores)
}

fn load(stores: &[PathBuf], batch_size: usize, python: Option<&Path>, repeat: usize) -> Result<()> {
    let mut rows = Vec::new();
    let mut described = Vec::new();
    for path in stores {
        let location = path.to_string_lossy().to_string();
        let label = path
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_else(|| location.clone());
        let stored = dir_bytes(&path.join("X")) as f64;
        let dataset = Dataset::open(&location)?;
        let Dataset::AnnData(adata) = &dataset else {
            bail!("{location} is not an AnnData store")
        };
        let x = adata.x()?;
        let cells = adata.n_obs();
        described.push(format!(
            "{label}: Zarr v{}, {cells} cells x {} genes, {:.0} nnz/cell, chunks {:?}{}",
            adata.version.number(),
            adata.n_vars(),
            x.nnz as f64 / cells as f64,
            x.inner_chunk_shape.as_ref().unwrap_or(&x.chunk_shape),
            x.inner_chunk_shape
                .as_ref()
                .map(|_| format!(" in shards {:?}", x.chunk_shape))
                .unwrap_or_default()
        ));
        let decoded = (x.nnz * 8 + cells * 8) as f64; // data f32 + indices u32, indptr u64
        // Decoding every pass (the first epoch, or a store larger than the cache), then with
        // the store decoded once and kept (training's later epochs under `--cache-mib`): the
        // batches' assembly alone, what a GPU step waits on once its compute is fast.
        let readers = [
            (false, 0, "sequential"),
            (true, 0, "block-shuffled"),
            (true, u64::MAX, "block-shuffled, decoded once"),
        ];
        for (shuffle, cache_bytes, how) in readers {
            let loader = Loader::new(
                &dataset,
                0..cells,
                LoaderConfig {
                    batch_size,
                    shuffle,
                    cache_bytes,
                    ..Default::default()
                },
            )?;
            let warm = u64::from(cache_bytes > 0);
            for batch in (0..warm).flat_map(|epoch| loader.epoch(epoch)) {
                batch?;
            }
            let mut times = Vec::with_capacity(repeat);
            for epoch in warm..warm + repeat as u64 {
                let start = Instant::now();
                let mut seen = 0u64;
                for batch in loader.epoch(epoch) {
                    seen += batch?.cells.len() as u64;
                }
                times.push(start.elapsed().as_secs_f64());
                if seen != cells {
                    bail!("loader yielded {seen} cells, expected {cells}");
                }
            }
            let seconds = median(times);
            rows.push(Row {
                store: label.clone(),
                reader: format!("tessera loader ({how})"),
                cells_per_s: cells as f64 / seconds,
                decoded_mb_s: decoded / seconds / 1e6,
                stored_mb_s: stored / seconds / 1e6,
            });
        }
        if let Some(python) = python {
            let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/python/bench_load.py");
            let output = Command::new(python)
                .arg(script)
                .arg(&location)
                .arg(batch_size.to_string())
                .arg(repeat.to_string())
                .output()
                .with_context(|| format!("running {}", python.display()))?;
            if !output.status.success() {
                bail!(
                    "python benchmark failed: {}",
                    String::from_utf8_lossy(&output.stderr)
                );
            }
            let results: serde_json::Value =
                serde_json::from_slice(&output.stdout).context("python benchmark output")?;
            for (reader, seconds) in results.as_object().into_iter().flatten() {
                let seconds = seconds.as_f64().unwrap_or(f64::NAN);
                rows.push(Row {
                    store: label.clone(),
                    reader: reader.clone(),
                    cells_per_s: cells as f64 / seconds,
                    decoded_mb_s: decoded / seconds / 1e6,
                    stored_mb_s: stored / seconds / 1e6,
                });
            }
        }
    }
    say!(
        "streaming all of X in batches of {batch_size}, {} threads, median of {repeat} passes",
        rayon::current_num_threads()
    );
    for d in &described {
        say!("  {d}");
    }
    let width = rows.iter().map(|r| r.store.len()).max().unwrap_or(5).max(5);
    say!(
        "{:<width$} {:<46} {:>12} {:>14} {:>13}",
        "store",
        "reader",
        "cells/s",
        "decoded MB/s",
        "stored MB/s"
    );
    for r in &rows {
        say!(
            "{:<width$} {:<46} {:>12.0} {:>14.1} {:>13.1}",
            r.store,
            r.reader,
            r.cells_per_s,
            r.decoded_mb_s,
            r.stored_mb_s
        );
    }
    Ok(())
}

/// Median seconds of `repeat` runs of `f` (after one warm-up run).
fn time(repeat: usize, mut f: impl FnMut()) -> f64 {
    f();
    median(
        (0..repeat)
            .map(|_| {
                let start = Instant::now();
                f();
                start.elapsed().as_secs_f64()
            })
            .collect(),
    )
}

/// CSR counts 1-5 at `nnz` genes per cell spread over the genome (sorted within a row).
fn synthetic_counts(cells: usize, genes: usize, nnz: usize) -> (Vec<u64>, Vec<u32>, Vec<f32>) {
    let indptr: Vec<u64> = (0..=cells as u64).map(|r| r * nnz as u64).collect();
    let mut indices: Vec<u32> = (0..cells)
        .flat_map(|r| (0..nnz).map(move |k| ((k * genes / nnz + r * 7) % genes) as u32))
        .collect();
    for row in indices.chunks_mut(nnz) {
        row.sort_unstable();
    }
    let data: Vec<f32> = (0..cells * nnz).map(|i| (1 + i % 5) as f32).collect();
    (indptr, indices, data)
}

fn ops<B: Backend<f32>>(b: &B, repeat: usize) -> Result<()> {
    use tessera_kernels::ops::likelihood::Likelihood;
    use tessera_kernels::ops::linear::{CountTransform, CsrRef};
    let values = |n: usize| -> Vec<f32> { (0..n).map(|i| ((i as f32) * 0.618).sin()).collect() };
    let up = |v: &[f32]| b.upload(v);
    // Each timing ends when the device has finished (a no-op on the CPU).
    let timed = |f: &mut dyn FnMut() -> tessera_kernels::backend::Result<()>| -> Result<f64> {
        let mut failed = None;
        let seconds = time(repeat, || {
            if let Err(e) = f().and_then(|()| b.synchronize()) {
                failed.get_or_insert(e);
            }
        });
        failed.map_or(Ok(seconds), |e| Err(e.into()))
    };
    say!(
        "engine ops on {}, {} CPU threads, median of {repeat}",
        b.name(),
        rayon::current_num_threads()
    );
    say!(
        "{:<44} {:>10} {:>10} {:>9} {:>10} {:>10}",
        "op (shape)",
        "GFLOP",
        "MB moved",
        "ms",
        "GFLOP/s",
        "GB/s"
    );
    let row = |what: String, flops: Option<f64>, bytes: f64, seconds: f64, extra: String| {
        let (gflop, rate) = flops.map_or(("-".to_string(), "-".to_string()), |f| {
            (
                format!("{:.3}", f / 1e9),
                format!("{:.1}", f / seconds / 1e9),
            )
        });
        say!(
            "{what:<44} {gflop:>10} {:>10.1} {:>9.3} {rate:>10} {:>10.2}{extra}",
            bytes / 1e6,
            seconds * 1e3,
            bytes / seconds / 1e9
        );
    };
    let hidden = 512;
    for genes in [2_000usize, 8_000] {
        for batch in [128usize, 1_024] {
            // The decoder's output layer dominates: forward, weight gradient, input gradient.
            for (name, ta, tb, m, k, n) in [
                ("decoder fwd  h·W", false, false, batch, hidden, genes),
                ("decoder dW   hᵀ·dY", true, false, hidden, batch, genes),
                ("decoder dh   dY·Wᵀ", false, true, batch, genes, hidden),
                ("hidden fwd   h·W", false, false, batch, hidden, hidden),
            ] {
                let (a, bm, mut c) = (up(&values(m * k))?, up(&values(k * n))?, b.zeros(m * n)?);
                let seconds = timed(&mut || {
                    b.gemm(
                        ta,
                        tb,
                        m,
                        k,
                        n,
                        1.0,
                        In::all(&a),
                        In::all(&bm),
                        0.0,
                        Out::all(&mut c),
                    )
                })?;
                let flops = 2.0 * (m * k * n) as f64;
                let bytes = 4.0 * (m * k + k * n + m * n) as f64;
                row(
                    format!("{name} [{m}x{k}]·[{k}x{n}]"),
                    Some(flops),
                    bytes,
                    seconds,
                    String::new(),
                );
            }
            // The encoder's first layer on sparse counts (a fifth of the genes non-zero).
            let nnz = genes / 5;
            let (indptr, indices, data) = synthetic_counts(batch, genes, nnz);
            let counts = CsrRef {
                rows: batch,
                cols: genes,
                indptr: &indptr,
                indices: &indices,
                data: &data,
            };
            let x = b.upload_csr(counts)?;
            let (w, mut y) = (up(&values(genes * hidden))?, b.zeros(batch * hidden)?);
            let seconds = timed(&mut || {
                b.sparse_input_forward(
                    &x,
                    CountTransform::Log1p,
                    In::all(&w),
                    hidden,
                    Out::all(&mut y),
                )
            })?;
            let flops = 2.0 * (batch * nnz * hidden) as f64;
            // Each non-zero reads a weight row.
            let bytes = 4.0 * (batch * nnz * (2 + hidden) + batch * hidden) as f64;
            row(
                format!("encoder fwd  X·W [{batch}x{genes}, {nnz} nz]·[{genes}x{hidden}]"),
                Some(flops),
                bytes,
                seconds,
                String::new(),
            );
            // The backward's transposed index, built on the host for every batch on both
            // devices: per entry a log1p and a counting-sort move.
            let seconds = timed(&mut || {
                std::hint::black_box(tessera_kernels::ops::linear::transposed(
                    counts,
                    CountTransform::Log1p,
                ));
                Ok(())
            })?;
            let entries = (batch * nnz) as f64;
            row(
                format!("encoder bwd  host index [{batch}x{genes}, {nnz} nz]"),
                None,
                // Read the CSR (4 + 4 bytes per entry), write (row, value) pairs (16 bytes).
                24.0 * entries,
                seconds,
                format!("  ({:.0} M entries/s)", entries / seconds / 1e6),
            );
            // scVI's reconstruction term: per entry read the logit, write its gradient.
            let n = batch * genes;
            let logits = up(&values(n))?;
            let (library, weights) = (up(&vec![2_000.0f32; batch])?, up(&vec![-1.0f32; batch])?);
            let theta = up(&values(genes)
                .iter()
                .map(|v| (v * 1.5).exp())
                .collect::<Vec<_>>())?;
            let (mut ll, mut dlogits, mut dtheta) = (b.zeros(batch)?, b.zeros(n)?, b.zeros(genes)?);
            let seconds = timed(&mut || {
                b.softmax_nb(
                    In::all(&logits),
                    In::all(&library),
                    &x,
                    In::all(&theta),
                    In::all(&weights),
                    Out::all(&mut ll),
                    Out::all(&mut dlogits),
                    Out::all(&mut dtheta),
                )
            })?;
            row(
                format!("scVI NB term (softmax+NB) [{batch}x{genes}]"),
                None,
                8.0 * n as f64,
                seconds,
                format!("  ({:.0} M entries/s)", n as f64 / seconds / 1e6),
            );
            let x = up(&(0..n)
                .map(|i| [0.0, 0.0, 1.0, 3.0, 0.0, 17.0][i % 6])
                .collect::<Vec<f32>>())?;
            let mu = up(&values(n)
                .iter()
                .map(|v| (v * 2.0).exp())
                .collect::<Vec<_>>())?;
            let (mut dmu, mut dtheta) = (b.zeros(n)?, b.zeros(n)?);
            let seconds = timed(&mut || {
                b.likelihood(
                    Likelihood::NegativeBinomial,
                    In::all(&x),
                    genes,
                    &[In::all(&mu), In::all(&theta)],
                    None,
                    Out::all(&mut ll),
                    &mut [Out::all(&mut dmu), Out::all(&mut dtheta)],
                )
            })?;
            // Per entry: read x, mu; write dmu, dtheta (theta per gene stays in cache).
            row(
                format!("NB value+grad [{batch}x{genes}]"),
                None,
                16.0 * n as f64,
                seconds,
                format!("  ({:.0} M entries/s)", n as f64 / seconds / 1e6),
            );
        }
    }
    // A modality measured in every other cell of a 1,024-cell batch: its encoder's 512 hidden
    // units gathered from and scattered back to the batch's rows (the backward of a batch with
    // a modality missing). Per value: read one, write one; the scatter zeroes the empty rows.
    let (batch, cols) = (1_024usize, 512usize);
    let codes: Vec<usize> = (0..batch).step_by(2).collect();
    let (table, x) = (up(&values(batch * cols))?, up(&values(codes.len() * cols))?);
    let (mut gathered, mut scattered) = (b.zeros(codes.len() * cols)?, b.zeros(batch * cols)?);
    let moved = |read: usize, written: usize| 4.0 * (read + written) as f64;
    let seconds =
        timed(&mut || b.gather_rows(In::all(&table), &codes, cols, Out::all(&mut gathered)))?;
    let n = codes.len() * cols;
    row(
        format!("gather rows [{} of {batch}x{cols}]", codes.len()),
        None,
        moved(n, n),
        seconds,
        String::new(),
    );
    let seconds =
        timed(&mut || b.scatter_add_rows(In::all(&x), &codes, cols, Out::all(&mut scattered)))?;
    row(
        format!("scatter-add rows [{}x{cols} into {batch}]", codes.len()),
        None,
        moved(n, batch * cols),
        seconds,
        String::new(),
    );
    // AdamW over a Census-size scVI model's parameters (8,000 genes, 512 hidden, 2 layers):
    // about 8.7M parameters; per element it reads p, g, m, v and writes p, m, v.
    let n = 8_000 * 512 * 2 + 512 * 512 * 2;
    let opt = tessera_kernels::ops::optim::AdamW::default();
    let (mut p, g, mut m, mut v) = (up(&values(n))?, up(&values(n))?, b.zeros(n)?, b.zeros(n)?);
    let mut t = 0;
    let seconds = timed(&mut || {
        t += 1;
        b.adamw_step(
            &opt,
            t,
            Out::all(&mut p),
            In::all(&g),
            Out::all(&mut m),
            Out::all(&mut v),
            None,
        )
    })?;
    row(
        format!("AdamW step [{n} params]"),
        None,
        28.0 * n as f64,
        seconds,
        String::new(),
    );
    Ok(())
}
