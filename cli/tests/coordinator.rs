//! `tessera coordinator` as a process: it reports its port, answers the gRPC health check, and
//! checks submitted jobs against the real store and configuration before queueing them.
#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tessera_proto::v1 as pb;
use tessera_proto::v1::coordinator_client::CoordinatorClient;
use tonic::Code;

/// The coordinator on an ephemeral port; killed when dropped.
struct Coordinator(Child, String);

impl Drop for Coordinator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start() -> Coordinator {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tessera")).args(["coordinator", "--listen", "127.0.0.1:0"]).env("TESSERA_LOG", "warn").stdout(Stdio::piped()).spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let addr = line.trim().strip_prefix("coordinator listening on ").unwrap_or_else(|| panic!("unexpected first line {line:?}")).to_string();
    Coordinator(child, addr)
}

#[tokio::test]
async fn serves_health_and_checks_jobs_against_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("s.zarr").to_string_lossy().into_owned();
    let made = Command::new(env!("CARGO_BIN_EXE_tessera")).args(["simulate", &store, "--cells", "300", "--genes", "50"]).env("TESSERA_LOG", "warn").output().unwrap();
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let coordinator = start();
    let endpoint = format!("http://{}", coordinator.1);
    let outcome = tokio::time::timeout(Duration::from_secs(60), async {
        let channel = tonic::transport::Channel::from_shared(endpoint.clone()).unwrap().connect().await.unwrap();
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
        let serving = health.check(tonic_health::pb::HealthCheckRequest { service: "tessera.v1.Coordinator".into() }).await.unwrap().into_inner();
        assert_eq!(serving.status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);

        let mut c = CoordinatorClient::connect(endpoint).await.unwrap();
        let spec = |data: &str, config: &str| pb::JobSpec { data_url: data.into(), config_toml: config.into(), world_size: 2, ..pb::JobSpec::default() };
        let missing = format!("{}/absent.zarr", dir.path().display());
        let e = c.submit_job(spec(&missing, "")).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().contains("absent.zarr"), "names the store: {}", e.message());
        let e = c.submit_job(spec(&store, "[train]\nbatch_sise = 64\n")).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().contains("config_toml") && e.message().contains("batch_sise"), "names the source and the key: {}", e.message());

        let job = c.submit_job(spec(&store, "[train]\nmax_epochs = 3\n")).await.unwrap().into_inner();
        let mut watch = c.watch_job(job).await.unwrap().into_inner();
        let status = watch.message().await.unwrap().unwrap();
        assert_eq!(status.state, pb::job_status::State::Queued as i32, "two workers wanted, none registered: {status:?}");
    })
    .await;
    assert!(outcome.is_ok(), "the coordinator answered within a minute");
}
