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
    /// Models kept loaded in memory.
    #[arg(long, default_value_t = 4)]
    cached_models: usize,
    /// Fine-tuning epochs of jobs that do not say.
    #[arg(long, default_value_t = tessera_serve::service::DEFAULT_EPOCHS)]
    default_epochs: usize,
}

/// 3/4 of MemTotal (Linux), else 8 GiB.
fn default_memory_mib() -> u64 {
    let total_kib = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| m.lines().find_map(|l| l.strip_prefix("MemTotal:").and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())));
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
        Tokens::load(args.tokens_file.as_deref(), std::env::var(tessera_serve::access::TOKENS_ENV).ok().as_deref())?
    };
    let register = args
        .register
        .iter()
        .map(|r| r.split_once('=').map(|(n, f)| (n.to_string(), f.to_string())).with_context(|| format!("--register {r}: expected NAME=FOLDER")))
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
        jobs: JobLimits { max_jobs: args.max_jobs, memory_bytes: args.memory_budget_mib.unwrap_or_else(default_memory_mib) << 20, finished_kept: 64 },
        default_epochs: args.default_epochs,
    })
}

/// Ctrl-C or SIGTERM (what Kubernetes sends before it kills a pod).
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!("cannot listen for SIGTERM: {e}");
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
    tracing::info!("shutting down");
}

pub fn run(args: ServeArgs) -> Result<()> {
    let listen = args.listen;
    let config = config(args)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("binding {listen}"))?;
        let bound = listener.local_addr().context("reading the bound address")?;
        let registry = config.registry.clone();
        let service = tokio::task::spawn_blocking(move || tessera_serve::service(&config).map(|s| (s, config))).await.context("starting the service")?;
        let (service, config) = service.with_context(|| format!("opening the registry {registry}"))?;
        // On stdout, so a launcher that asked for port 0 learns the port.
        println!("atlas listening on {bound}");
        tessera_serve::serve(listener, service, &config, shutdown_signal()).await.context("serving")
    })
}
