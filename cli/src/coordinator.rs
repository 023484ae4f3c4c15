//! `tessera coordinator`: serves the Coordinator gRPC service and the gRPC health service.
//! Submitted jobs are checked here (the store opens, the configuration parses) before they
//! queue. `tessera train --workers N` serves the same in-process.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use tessera_coordinator::{Config, Service, ValidJob};
use tessera_proto::v1 as pb;

#[derive(clap::Args, Debug)]
pub struct CoordinatorArgs {
    /// Address to serve on.
    #[arg(long, default_value = "0.0.0.0:50051")]
    listen: SocketAddr,
    /// How often workers heartbeat.
    #[arg(long, default_value_t = 1_000)]
    heartbeat_ms: u64,
    /// A worker silent for this long is removed from its job.
    #[arg(long, default_value_t = 10_000)]
    heartbeat_timeout_ms: u64,
    /// After losing a worker, how long a job waits for a replacement before continuing with
    /// the survivors.
    #[arg(long, default_value_t = 30_000)]
    regroup_grace_ms: u64,
}

/// The checks of a submitted job, with the error a user sees.
fn check(spec: &pb::JobSpec) -> Result<ValidJob, String> {
    let (train_cells, epochs) = tessera_worker::check_job(&spec.data_url, &spec.config_toml).map_err(|e| e.to_string())?;
    Ok(ValidJob { train_cells, epochs })
}

/// Serves the coordinator and health services on `listener` until `shutdown` completes.
pub async fn serve(listener: tokio::net::TcpListener, config: Config, shutdown: impl Future<Output = ()>) -> Result<()> {
    let bound = listener.local_addr().context("reading the bound address")?;
    let service = Service::new(config, Arc::new(check));
    let _ticker = service.spawn_ticker();
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<tessera_proto::v1::coordinator_server::CoordinatorServer<Service>>().await;
    tracing::info!(listen = %bound, "coordinator serving");
    tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(service.server())
        .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(listener), shutdown)
        .await
        .with_context(|| format!("serving on {bound}"))
}

pub fn run(args: CoordinatorArgs) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")?;
    runtime.block_on(async move {
        let config = Config { heartbeat_interval_ms: args.heartbeat_ms, heartbeat_timeout_ms: args.heartbeat_timeout_ms, regroup_grace_ms: args.regroup_grace_ms };
        let listener = tokio::net::TcpListener::bind(args.listen).await.with_context(|| format!("binding {}", args.listen))?;
        let bound = listener.local_addr().context("reading the bound address")?;
        // On stdout, so a launcher that asked for port 0 learns the port.
        println!("coordinator listening on {bound}");
        serve(listener, config, async {
            let _ = tokio::signal::ctrl_c().await;
            tracing::info!("shutting down");
        })
        .await
    })
}
