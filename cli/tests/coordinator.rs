//! `tessera coordinator` as a process: it reports its port, answers the gRPC health check,
//! checks submitted jobs against the real store and configuration before queueing them,
//! resumes a job after it is killed and restarted from its state folder, and shuts down on
//! SIGTERM; `tessera submit` runs a job on a standing `tessera worker`, which serves its step
//! metrics and leaves on SIGTERM.
#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod common;

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

fn start(listen: &str, state: &std::path::Path) -> Coordinator {
    start_with(listen, state, &[])
}

/// `start` with environment variables set for the coordinator.
fn start_with(listen: &str, state: &std::path::Path, envs: &[(&str, &str)]) -> Coordinator {
    start_with_args(listen, state, &[], envs)
}

/// `start_with` and further arguments to `tessera coordinator`.
fn start_with_args(
    listen: &str,
    state: &std::path::Path,
    extra: &[&str],
    envs: &[(&str, &str)],
) -> Coordinator {
    let args = [
        "coordinator",
        "--listen",
        listen,
        "--state",
        state.to_str().unwrap(),
        "--heartbeat-ms",
        "200",
        "--heartbeat-timeout-ms",
        "2000",
        "--regroup-grace-ms",
        "2000",
    ];
    let mut child = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(args)
        .args(extra)
        .env("TESSERA_LOG", "warn")
        .envs(envs.iter().copied())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("coordinator listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    Coordinator(child, addr)
}

#[tokio::test]
async fn serves_health_and_checks_jobs_against_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("s.zarr").to_string_lossy().into_owned();
    let made = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["simulate", &store, "--cells", "300", "--genes", "50"])
        .env("TESSERA_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let coordinator = start("127.0.0.1:0", &dir.path().join("state"));
    let endpoint = format!("http://{}", coordinator.1);
    let outcome = tokio::time::timeout(Duration::from_secs(60), async {
        let channel = tonic::transport::Channel::from_shared(endpoint.clone())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
        let serving = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: "tessera.v1.Coordinator".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            serving.status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        );

        let mut c = CoordinatorClient::connect(endpoint).await.unwrap();
        let spec = |data: &str, config: &str| pb::JobSpec {
            data_url: data.into(),
            config_toml: config.into(),
            world_size: 2,
            ..pb::JobSpec::default()
        };
        let missing = format!("{}/absent.zarr", dir.path().display());
        let e = c.submit_job(spec(&missing, "")).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(
            e.message().contains("absent.zarr"),
            "names the store: {}",
            e.message()
        );
        let e = c
            .submit_job(spec(&store, "[train]\nbatch_sise = 64\n"))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(
            e.message().contains("config_toml") && e.message().contains("batch_sise"),
            "names the source and the key: {}",
            e.message()
        );

        let job = c
            .submit_job(spec(&store, "[train]\nmax_epochs = 3\n"))
            .await
            .unwrap()
            .into_inner();
        let mut watch = c.watch_job(job).await.unwrap().into_inner();
        let status = watch.message().await.unwrap().unwrap();
        assert_eq!(
            status.state,
            pb::job_status::State::Queued as i32,
            "two workers wanted, none registered: {status:?}"
        );
    })
    .await;
    assert!(outcome.is_ok(), "the coordinator answered within a minute");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_shuts_the_coordinator_down_though_a_watch_stays_open() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("s.zarr").to_string_lossy().into_owned();
    common::ok(&common::tessera(&[
        "simulate", &store, "--cells", "300", "--genes", "50",
    ]));
    let mut coordinator = start("127.0.0.1:0", &dir.path().join("state"));
    let mut c = CoordinatorClient::connect(format!("http://{}", coordinator.1))
        .await
        .unwrap();
    // Two workers wanted, none there: the job waits and its watch stays open.
    let job = c
        .submit_job(pb::JobSpec {
            data_url: store,
            world_size: 2,
            ..pb::JobSpec::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut watch = c.watch_job(job).await.unwrap().into_inner();
    assert_eq!(
        watch.message().await.unwrap().unwrap().state(),
        pb::job_status::State::Queued
    );
    assert!(
        Command::new("kill")
            .args(["-TERM", &coordinator.0.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    // The open watch is cut after the 10 s drain.
    let status =
        tokio::task::block_in_place(|| exit_within(&mut coordinator.0, Duration::from_secs(30)));
    assert!(status.success(), "{status:?}");
    let end = watch.message().await;
    assert!(
        end.as_ref().is_err() || end.as_ref().is_ok_and(Option::is_none),
        "the watch ended with the coordinator: {end:?}"
    );
}

/// Waits up to `limit` for `child` to exit (killing it past that); its exit status.
fn exit_within(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let pid = child.id().to_string();
    let status = std::thread::scope(|scope| {
        let (tx, exited) = std::sync::mpsc::channel();
        scope.spawn(move || tx.send(child.wait().unwrap()));
        let status = exited.recv_timeout(limit);
        if status.is_err() {
            let _ = Command::new("kill").args(["-KILL", &pid]).status();
        }
        status
    });
    status.unwrap_or_else(|_| panic!("no exit within {limit:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submitted_job_runs_on_a_standing_worker_which_serves_its_metrics_and_leaves_on_sigterm()
{
    use tessera_telemetry::{parse, value};
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("s.zarr").to_string_lossy().into_owned();
    common::ok(&common::tessera(&[
        "simulate", &store, "--cells", "2000", "--genes", "100",
    ]));
    let coordinator = start("127.0.0.1:0", &dir.path().join("state"));
    let endpoint = format!("http://{}", coordinator.1);
    // No --max-jobs: it serves until stopped.
    let child = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args([
            "worker",
            "--coordinator",
            &endpoint,
            "--ring-listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--timeout-s",
            "60",
        ])
        .env("TESSERA_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut worker = Workers(vec![child]);
    let mut line = String::new();
    BufReader::new(worker.0[0].stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let metrics = line
        .trim()
        .strip_prefix("metrics listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();

    // `tessera submit` follows the job to its end.
    let config = dir.path().join("c.toml");
    std::fs::write(
        &config,
        "[model]\nn_hidden = 16\n[train]\nmax_epochs = 3\nbatch_size = 128\n",
    )
    .unwrap();
    let out = dir.path().join("out").display().to_string();
    let submit = |data: &str| {
        common::tessera(&[
            "submit",
            "--coordinator",
            &endpoint,
            "--data",
            data,
            "--config",
            config.to_str().unwrap(),
            "--out",
            &out,
            "--world-size",
            "1",
        ])
    };
    let printed = tokio::task::block_in_place(|| common::ok(&submit(&store)));
    assert!(
        printed.contains("job-1: submitted to")
            && printed.contains("epoch 3/3: train loss")
            && printed.contains("job-1: SUCCEEDED"),
        "{printed}"
    );
    assert!(
        std::path::Path::new(&out)
            .join("model.safetensors")
            .exists()
    );
    // What the coordinator refuses, and cancelling an unknown job, are named.
    let missing = dir.path().join("absent.zarr").display().to_string();
    let refused = tokio::task::block_in_place(|| common::failed(&submit(&missing)));
    assert!(refused.contains("absent.zarr"), "{refused}");
    let refused = tokio::task::block_in_place(|| {
        common::failed(&common::tessera(&[
            "cancel",
            "job-99",
            "--coordinator",
            &endpoint,
        ]))
    });
    assert!(refused.contains("job-99"), "{refused}");

    // The job is over and the worker waits for the next: its counters are final.
    let (head, body) = tokio::task::block_in_place(|| common::http_get(&metrics, "/metrics"));
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let samples = parse(&body).unwrap();
    let get = |name: &str, labels: &[(&str, &str)]| {
        value(&samples, name, labels).unwrap_or_else(|| panic!("no {name} {labels:?} in\n{body}"))
    };
    assert_eq!(
        (
            get("tessera_train_epochs_total", &[]),
            get("tessera_train_epochs_planned", &[])
        ),
        (3.0, 3.0)
    );
    // 2,000 cells less the 200 held out, three times.
    assert_eq!(get("tessera_train_cells_total", &[]), 5400.0);
    // At least ceil(1800 / 128) steps an epoch (a fetch's remainder may make one more).
    assert!(
        get("tessera_train_steps_total", &[]) >= 3.0 * 15.0,
        "{body}"
    );
    assert!(
        get("tessera_train_loss", &[("term", "reconstruction")]) > 0.0
            && get("tessera_train_step_seconds_total", &[("phase", "compute")]) > 0.0,
        "{body}"
    );

    // SIGTERM while idle: it leaves the coordinator and exits 143 at once.
    assert!(
        Command::new("kill")
            .args(["-TERM", &worker.0[0].id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    let status = exit_within(&mut worker.0[0], Duration::from_secs(30));
    assert_eq!(status.code(), Some(143), "{status:?}");
}

/// Worker processes, killed when dropped.
struct Workers(Vec<Child>);

impl Drop for Workers {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[tokio::test]
async fn a_killed_and_restarted_coordinator_resumes_its_job_from_the_state_folder() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("s.zarr").to_string_lossy().into_owned();
    let made = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["simulate", &store, "--cells", "12000", "--genes", "300"])
        .env("TESSERA_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let state = dir.path().join("state");
    let listen = format!(
        "127.0.0.1:{}",
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    );
    let endpoint = format!("http://{listen}");
    let mut coordinator = start(&listen, &state);
    let worker = || {
        Command::new(env!("CARGO_BIN_EXE_tessera"))
            .args([
                "worker",
                "--coordinator",
                &endpoint,
                "--ring-listen",
                "127.0.0.1:0",
                "--max-jobs",
                "1",
                "--timeout-s",
                "60",
            ])
            .env("TESSERA_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .unwrap()
    };
    let workers = Workers(vec![worker(), worker()]);
    let out = dir.path().join("out");
    let outcome = tokio::time::timeout(Duration::from_secs(240), async {
        let mut c = CoordinatorClient::connect(endpoint.clone()).await.unwrap();
        let config = "[model]\nn_hidden = 64\n\
                      [train]\nmax_epochs = 5\nkl_warmup_epochs = 3\ncheckpoint_every = 1\n";
        let spec = pb::JobSpec {
            data_url: store.clone(),
            config_toml: config.into(),
            world_size: 2,
            output_url: out.display().to_string(),
            ..pb::JobSpec::default()
        };
        let job = c.submit_job(spec).await.unwrap().into_inner();
        let mut watch = c.watch_job(job.clone()).await.unwrap().into_inner();
        while let Some(s) = watch.message().await.unwrap() {
            if s.epoch >= 2 {
                break;
            }
        }
        // SIGKILL: nothing is flushed; what the coordinator saved after each change is all.
        coordinator.0.kill().unwrap();
        coordinator.0.wait().unwrap();
        let _restarted = start(&listen, &state);
        let mut c = CoordinatorClient::connect(endpoint.clone()).await.unwrap();
        let mut watch = c.watch_job(job).await.unwrap().into_inner();
        let first = watch.message().await.unwrap().unwrap();
        assert_eq!(
            first.state(),
            pb::job_status::State::Recovering,
            "{first:?}"
        );
        let expected = "coordinator restarted; resuming from the checkpoint after epoch";
        assert!(first.message.starts_with(expected), "{}", first.message);
        let mut last = first;
        while let Some(s) = watch.message().await.unwrap() {
            last = s;
        }
        assert_eq!(last.state(), pb::job_status::State::Succeeded, "{last:?}");
        assert_eq!(last.epoch, 5);
    })
    .await;
    assert!(outcome.is_ok(), "the job ended within 4 minutes");
    let history = std::fs::read_to_string(out.join("history.csv")).unwrap();
    assert_eq!(
        history.lines().count(),
        6,
        "five epochs, each once:\n{history}"
    );
    drop(workers);
}

/// `tessera cancel job-7` at `url` with exactly `envs` of the coordinator's variables set: its
/// error output (the job is unknown, so it fails even when the call gets through).
fn cancel_job7(url: &str, envs: &[(&str, &str)]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["cancel", "job-7", "--coordinator", url])
        .env("TESSERA_LOG", "warn")
        .env_remove("TESSERA_COORDINATOR_TOKEN")
        .env_remove("TESSERA_COORDINATOR_CA")
        .envs(envs.iter().copied())
        .output()
        .unwrap();
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn with_a_token_set_the_coordinator_refuses_callers_without_it() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = start_with(
        "127.0.0.1:0",
        &dir.path().join("state"),
        &[("TESSERA_COORDINATOR_TOKEN", "s3cret")],
    );
    let url = format!("http://{}", coordinator.1);
    let cancel = |token: Option<&str>| {
        let envs: Vec<(&str, &str)> = token
            .map(|t| ("TESSERA_COORDINATOR_TOKEN", t))
            .into_iter()
            .collect();
        cancel_job7(&url, &envs)
    };
    for refused in [None, Some("guess")] {
        let e = cancel(refused);
        assert!(
            e.contains("authorization") || e.contains("token"),
            "{refused:?}: {e}"
        );
    }
    // With the token the call gets through: the job is simply unknown.
    let e = cancel(Some("s3cret"));
    assert!(e.contains("job-7") && !e.contains("authorization"), "{e}");
}

/// With --tls-cert/--tls-key the coordinator speaks only TLS: a client that trusts its CA
/// (TESSERA_COORDINATOR_CA) gets through, one that does not, or that speaks plain text, does not.
#[test]
fn with_tls_only_clients_that_trust_the_certificate_get_through() {
    let dir = tempfile::tempdir().unwrap();
    let key = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let (cert, pem_key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&cert, key.cert.pem()).unwrap();
    std::fs::write(&pem_key, key.signing_key.serialize_pem()).unwrap();
    let (cert_s, key_s) = (cert.to_str().unwrap(), pem_key.to_str().unwrap());
    let coordinator = start_with_args(
        "127.0.0.1:0",
        &dir.path().join("state"),
        &["--tls-cert", cert_s, "--tls-key", key_s],
        &[("TESSERA_COORDINATOR_TOKEN", "s3cret")],
    );
    let port = coordinator.1.rsplit(':').next().unwrap();
    let cancel = |url: &str, ca: Option<&str>| {
        let mut envs = vec![("TESSERA_COORDINATOR_TOKEN", "s3cret")];
        envs.extend(ca.map(|ca| ("TESSERA_COORDINATOR_CA", ca)));
        cancel_job7(url, &envs)
    };
    let https = format!("https://localhost:{port}");
    // Trusted: the call reaches the coordinator, which does not know the job.
    let e = cancel(&https, Some(cert_s));
    assert!(e.contains("job-7") && e.contains("unknown"), "{e}");
    // The system's roots do not know a self-signed certificate; plain text gets no answer.
    for (url, ca) in [
        (https.as_str(), None),
        (&*format!("http://127.0.0.1:{port}"), None),
    ] {
        let e = cancel(url, ca);
        assert!(!e.contains("unknown job"), "{url}: {e}");
    }
    // A missing CA file is named.
    let nowhere = dir.path().join("nowhere.pem");
    let e = cancel(&https, Some(nowhere.to_str().unwrap()));
    assert!(
        e.contains("TESSERA_COORDINATOR_CA") && e.contains("nowhere.pem"),
        "{e}"
    );
}
