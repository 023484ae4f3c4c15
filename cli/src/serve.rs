//! `tessera serve`: reference-atlas query mapping as a gRPC service (the `Atlas` service of
//! `proto/tessera/v1/atlas.proto`) plus the gRPC health service.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use tessera_serve::{JobLimits, ServeConfig, Tokens};

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// Address to serve on (port 0: any free port, printed on stdout).
    #[arg(long, default_value = "0.0.0.0:50061")]
    listen: SocketAddr,
    /// The model registry: a directory or an object-store URL (s3://, gs://, az://).
    #[arg(long, default_value = "tessera-registry")]
    registry: String,
    /// Register (or replace) models at start: NAME=FOLDER (what `tessera train --out` wrote).
    #[arg(long = "register", value_name = "NAME=FOLDER")]
    register: Vec<String>,
    /// Storage prefixes requests may read and write (a directory, s3://bucket/prefix, ...);
    /// repeat for several. Nothing else is reachable through the service.
    #[arg(long = "allow-prefix", value_name = "PREFIX")]
    allow_prefix: Vec<String>,
    /// Where uploaded query stores are kept while their jobs run.
    #[arg(long, default_value = "tessera-scratch")]
    scratch: PathBuf,
    /// Bearer tokens, one per line (also read from TESSERA_SERVE_TOKENS, comma-separated).
    #[arg(long)]
    tokens_file: Option<PathBuf>,
    /// Accept calls without a token (a trusted network only).
    #[arg(long)]
    allow_unauthenticated: bool,
    /// TLS certificate chain (PEM); with --tls-key.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM); with --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Mapping jobs running at once (the rest queue).
    #[arg(long, default_value_t = 2)]
    max_jobs: usize,
    /// Memory the running jobs' estimates may add up to, MiB (default: 3/4 of this machine's).
    #[arg(long)]
    memory_budget_mib: Option<u64>,
    /// The largest request message (Encode counts, upload chunks), MiB.
    #[arg(long, default_value_t = 64)]
    max_request_mib: usize,
    /// The largest uploaded query store, MiB.
    #[arg(long, default_value_t = 4096)]
    max_upload_mib: u64,
    /// Seconds an upload waits for a job to use it before it is removed.
    #[arg(long, default_value_t = 3600)]
    upload_ttl_s: u64,
    /// Models kept loaded in memory.
    #[arg(long, default_value_t = 4)]
    cached_models: usize,
    /// Fine-tuning epochs of jobs that do not say.
    #[arg(long, default_value_t = tessera_serve::service::DEFAULT_EPOCHS)]
    default_epochs: usize,
    /// Serve Prometheus metrics (GET /metrics) and a health check (GET /healthz) over plain
    /// HTTP here.
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// Where models encode and mapping jobs fine-tune: cpu, cuda or cuda:N.
    #[arg(long, env = "TESSERA_DEVICE", default_value = "cpu")]
    device: tessera_worker::device::Device,
}

/// 3/4 of MemTotal (Linux), else 8 GiB.
fn default_memory_mib() -> u64 {
    let total_kib = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines().find_map(|l| {
            l.strip_prefix("MemTotal:")
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
    });
    total_kib.map_or(8192, |k| k / 1024 * 3 / 4)
}

fn config(args: ServeArgs) -> Result<ServeConfig> {
    let tokens = if args.allow_unauthenticated {
        if args.tokens_file.is_some() {
            bail!("--allow-unauthenticated and --tokens-file contradict each other");
        }
        tracing::warn!("serving without authentication: every caller is accepted");
        Tokens::none()
    } else {
        Tokens::load(
            args.tokens_file.as_deref(),
            std::env::var(tessera_serve::access::TOKENS_ENV)
                .ok()
                .as_deref(),
        )?
    };
    let register = args
        .register
        .iter()
        .map(|r| {
            r.split_once('=')
                .map(|(n, f)| (n.to_string(), f.to_string()))
                .with_context(|| format!("--register {r}: expected NAME=FOLDER"))
        })
        .collect::<Result<_>>()?;
    Ok(ServeConfig {
        registry: args.registry,
        register,
        cached_models: args.cached_models,
        scratch: args.scratch,
        allow_prefixes: args.allow_prefix,
        tokens,
        tls: args.tls_cert.zip(args.tls_key),
        max_request_bytes: args.max_request_mib << 20,
        max_upload_bytes: args.max_upload_mib << 20,
        upload_ttl: std::time::Duration::from_secs(args.upload_ttl_s),
        jobs: JobLimits {
            max_jobs: args.max_jobs,
            memory_bytes: args.memory_budget_mib.unwrap_or_else(default_memory_mib) << 20,
            finished_kept: 64,
        },
        default_epochs: args.default_epochs,
        device: args.device,
    })
}

pub fn run(args: ServeArgs) -> Result<()> {
    let (listen, metrics_listen) = (args.listen, args.metrics_listen);
    let config = config(args)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding {listen}"))?;
        let bound = listener.local_addr().context("reading the bound address")?;
        let service = tokio::task::spawn_blocking(move || {
            tessera_serve::service(&config).map(|s| (s, config))
        })
        .await
        .context("starting the service")?;
        // The error names what failed: the registry, a --register, a prefix or the scratch.
        let (service, config) = service.context("starting the service")?;
        // On stdout, so a launcher that asked for port 0 learns the port.
        say!("atlas listening on {bound}");
        if let Some(at) = metrics_listen {
            let telemetry = service.telemetry();
            crate::metrics::spawn(at, std::sync::Arc::new(move || telemetry.render())).await?;
        }
        tessera_serve::serve(listener, service, &config, crate::signals::terminated())
            .await
            .context("serving")
    })
}

/// `tessera bench encode`: see `BenchCommand::Encode`.
pub fn bench_encode(sizes: &[usize], genes: usize, concurrency: usize, seconds: f64) -> Result<()> {
    use std::time::{Duration, Instant};

    use tessera_data::{Dataset, Loader, LoaderConfig, SimConfig};
    use tessera_proto::v1 as pb;

    let dir = tempfile_dir()?;
    let data = dir.join("reference.zarr").display().to_string();
    let largest = sizes.iter().copied().max().unwrap_or(1).max(1);
    let cells = (largest as u64).max(5_000);
    say!("training a reference: {cells} simulated cells x {genes} genes, 3 batches, 5 epochs");
    tessera_data::simulate(
        &data,
        &SimConfig {
            n_cells: cells,
            n_genes: genes,
            n_batches: 3,
            ..SimConfig::default()
        },
        |_| {},
    )?;
    let model = dir.join("model");
    let mut fit = tessera_worker::FitConfig::default();
    fit.train.max_epochs = Some(5);
    let opts = tessera_worker::FitOptions {
        data: data.clone(),
        modalities: Vec::new(),
        batch_key: Some("batch".into()),
        label_key: Some("cell_type".into()),
        unlabeled_category: None,
        covariates: Default::default(),
        config: fit,
        out: model.clone(),
        embedding_key: "X_tessera".into(),
        prediction_key: tessera_worker::fit::PREDICTION_KEY.into(),
        overwrite: true,
        store_outputs: true,
        resume: false,
        denoised: None,
        cache_bytes: tessera_worker::DEFAULT_CACHE_MIB << 20,
        device: tessera_worker::device::Device::Cpu,
        init_from: None,
        layer: None,
    };
    tessera_worker::fit(&opts, |_| {})?;
    let (hidden, latent) = (128usize, 10usize);

    // The requests: the store's first cells with their batches, features named.
    let dataset = Dataset::open(&data)?;
    let loader = Loader::new(
        &dataset,
        0..largest as u64,
        LoaderConfig {
            batch_size: largest,
            batch_key: Some("batch".into()),
            ..LoaderConfig::default()
        },
    )?;
    let mb = loader
        .ordered()
        .epoch(0)
        .next()
        .context("the store has no cells")??;
    let var_names = match &dataset {
        Dataset::AnnData(a) => a.var()?.index,
        Dataset::MuData(_) => bail!("the simulated store is an AnnData"),
    };
    let counts = &mb.modalities[0].counts;
    let request = |n: usize| {
        let end = counts.indptr[n] as usize;
        pb::EncodeRequest {
            model: "bench".into(),
            modalities: vec![pb::EncodeModality {
                name: mb.modalities[0].name.clone(),
                var_names: var_names.clone(),
                n_cells: n as u32,
                n_features: counts.n_cols as u32,
                indptr: counts.indptr[..=n].to_vec(),
                indices: counts.indices[..end].to_vec(),
                data: counts.data[..end].to_vec(),
            }],
            batches: mb.batch[..n]
                .iter()
                .map(|&b| loader.batch_categories[b as usize].clone())
                .collect(),
            transfer_labels: false,
            neighbours: 0,
            covariates: Vec::new(),
        }
    };
    let nnz_per_cell = counts.nnz() as f64 / largest as f64;

    let config = ServeConfig {
        registry: dir.join("registry").display().to_string(),
        register: vec![("bench".into(), model.display().to_string())],
        cached_models: 1,
        scratch: dir.join("scratch"),
        allow_prefixes: Vec::new(),
        tokens: Tokens::none(),
        tls: None,
        max_request_bytes: 256 << 20,
        max_upload_bytes: 0,
        upload_ttl: std::time::Duration::from_secs(3600),
        jobs: JobLimits {
            max_jobs: 1,
            memory_bytes: 1 << 30,
            finished_kept: 1,
        },
        default_epochs: 1,
        device: tessera_worker::device::Device::Cpu,
    };
    let service = tessera_serve::service(&config)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let address = format!("http://{}", listener.local_addr()?);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            tessera_serve::serve(listener, service, &config, async {
                let _ = stopped.await;
            })
            .await
        });
        let channel = tonic::transport::Endpoint::from_shared(address)?
            .connect()
            .await?;
        let client = pb::atlas_client::AtlasClient::new(channel)
            .max_encoding_message_size(256 << 20)
            .max_decoding_message_size(256 << 20);
        // Loads the model into the cache, as a first request in production would.
        client.clone().encode(request(1)).await?;
        say!(
            "Encode over loopback gRPC, {concurrency} requests in flight, {nnz_per_cell:.0} \
             non-zeros per cell; floor = the encoder's FLOPs \
             (2 x nnz x {hidden} + 2 x {hidden} x {} per cell)",
            2 * latent
        );
        say!(
            "{:>10} {:>10} {:>12} {:>9} {:>9} {:>10}",
            "cells/req",
            "req/s",
            "cells/s",
            "p50 ms",
            "p99 ms",
            "GFLOP/s"
        );
        for &n in sizes {
            let req = request(n.max(1));
            let deadline = Instant::now() + Duration::from_secs_f64(seconds);
            let started = Instant::now();
            let mut tasks = Vec::new();
            for _ in 0..concurrency {
                let (mut client, req) = (client.clone(), req.clone());
                tasks.push(tokio::spawn(async move {
                    let mut latencies = Vec::new();
                    while Instant::now() < deadline {
                        let sent = Instant::now();
                        client.encode(req.clone()).await?;
                        latencies.push(sent.elapsed().as_secs_f64());
                    }
                    Ok::<_, tonic::Status>(latencies)
                }));
            }
            let mut latencies = Vec::new();
            for t in tasks {
                latencies.extend(t.await??);
            }
            let wall = started.elapsed().as_secs_f64();
            latencies.sort_by(f64::total_cmp);
            let pick = |q: f64| {
                let at =
                    ((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1));
                latencies.get(at).copied().unwrap_or(f64::NAN) * 1e3
            };
            let rate = latencies.len() as f64 / wall;
            let flops = (2.0 * nnz_per_cell * hidden as f64 + 2.0 * (hidden * 2 * latent) as f64)
                * n as f64
                * rate;
            say!(
                "{:>10} {:>10.0} {:>12.0} {:>9.2} {:>9.2} {:>10.2}",
                n,
                rate,
                rate * n as f64,
                pick(0.5),
                pick(0.99),
                flops / 1e9
            );
        }
        let _ = stop.send(());
        server.await??;
        anyhow::Ok(())
    })?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn tempfile_dir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("tessera-bench-encode-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}
