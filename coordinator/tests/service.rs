//! The coordinator over real gRPC on loopback: a worker's life (register, join, progress,
//! checkpoint, heartbeat directives), the status stream, and every bad request answered with
//! the right status code and a message naming the field.
#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::sync::Arc;

use tessera_coordinator::{Config, Service, ValidJob};
use tessera_proto::v1 as pb;
use tessera_proto::v1::coordinator_client::CoordinatorClient;
use tonic::Code;
use tonic::transport::Channel;

/// A coordinator on an ephemeral port whose validator accepts data URLs starting "good" (1,000
/// training cells, 2 epochs) and refuses the rest the way the real one does.
async fn start() -> CoordinatorClient<Channel> {
    let validate = Arc::new(|spec: &pb::JobSpec| -> Result<ValidJob, String> {
        if !spec.data_url.starts_with("good") {
            return Err(format!(
                "data_url {}: no AnnData or MuData store there",
                spec.data_url
            ));
        }
        if spec.config_toml.contains("nonsense") {
            return Err("config_toml: unknown field `nonsense`".into());
        }
        Ok(ValidJob {
            train_cells: 1_000,
            epochs: 2,
        })
    });
    let service = Service::new(
        Config {
            heartbeat_interval_ms: 100,
            heartbeat_timeout_ms: 60_000,
            regroup_grace_ms: 1_000,
        },
        validate,
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    service.spawn_ticker();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service.server())
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    CoordinatorClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
}

fn spec(url: &str, world: u32) -> pb::JobSpec {
    pb::JobSpec {
        data_url: url.into(),
        config_toml: "[train]\nseed = 1\n".into(),
        world_size: world,
        ..pb::JobSpec::default()
    }
}

#[tokio::test]
async fn a_worker_trains_a_job_to_the_end_and_watchers_see_it() {
    let mut c = start().await;
    let job = c
        .submit_job(pb::JobSpec {
            layer: "counts".into(),
            categorical_covariate_keys: vec!["donor".into()],
            continuous_covariate_keys: vec!["pct_mito".into()],
            unlabeled_category: "Unknown".into(),
            ..spec("good.zarr", 1)
        })
        .await
        .unwrap()
        .into_inner();
    let mut watch = c.watch_job(job.clone()).await.unwrap().into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.state, pb::job_status::State::Queued as i32);

    let w = c
        .register(pb::RegisterRequest {
            ring_address: "127.0.0.1:7100".into(),
            device: "cpu".into(),
            hostname: "h".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(w.heartbeat_interval_ms, 100);
    let a = c
        .join(pb::JoinRequest {
            worker_id: w.worker_id.clone(),
            wait_ms: 5_000,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(a.assigned);
    assert_eq!(
        (a.job_id.as_str(), a.rank, a.world_size),
        (job.job_id.as_str(), 0, 1)
    );
    assert_eq!(a.peers, vec!["127.0.0.1:7100".to_string()]);
    assert_eq!(
        a.spec.as_ref().map(|s| s.data_url.as_str()),
        Some("good.zarr")
    );
    // What the model reads travels with the job to its workers.
    let given = a.spec.clone().unwrap();
    assert_eq!(
        (
            given.layer.as_str(),
            given.categorical_covariate_keys,
            given.continuous_covariate_keys,
            given.unlabeled_category.as_str()
        ),
        (
            "counts",
            vec!["donor".to_string()],
            vec!["pct_mito".to_string()],
            "Unknown"
        )
    );

    // Mid-epoch progress shows live in the status: the step and the worker's cells so far.
    let partial = pb::ProgressReport {
        worker_id: w.worker_id.clone(),
        job_id: a.job_id.clone(),
        generation: a.generation,
        epoch: 0,
        step: 3,
        cells: 384,
        ..pb::ProgressReport::default()
    };
    c.report_progress(partial).await.unwrap();
    let live = loop {
        let s = watch.message().await.unwrap().unwrap();
        if s.step == 3 {
            break s;
        }
    };
    assert_eq!(
        (live.state(), live.epoch, live.workers[0].cells_this_epoch),
        (pb::job_status::State::Running, 0, 384),
        "{live:?}"
    );

    for epoch in 0..2 {
        let report = pb::ProgressReport {
            worker_id: w.worker_id.clone(),
            job_id: a.job_id.clone(),
            generation: a.generation,
            epoch,
            step: u64::from(epoch + 1) * 8,
            cells: 1_000,
            epoch_done: true,
            ..pb::ProgressReport::default()
        };
        c.report_progress(report).await.unwrap();
        if epoch == 0 {
            let announcement = pb::CheckpointAnnouncement {
                worker_id: w.worker_id.clone(),
                job_id: a.job_id.clone(),
                generation: a.generation,
                epochs_done: 1,
                step: 8,
                location: "out/checkpoint/epoch-1".into(),
            };
            c.announce_checkpoint(announcement).await.unwrap();
        }
    }
    // The stream ends with the job.
    let mut last = first;
    while let Some(s) = watch.message().await.unwrap() {
        last = s;
    }
    assert_eq!(
        last.state,
        pb::job_status::State::Succeeded as i32,
        "{last:?}"
    );
    assert_eq!(
        (last.epoch, last.last_checkpoint.as_str()),
        (2, "out/checkpoint/epoch-1")
    );
    let hb = c
        .heartbeat(pb::HeartbeatRequest {
            worker_id: w.worker_id.clone(),
            generation: a.generation,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(hb.directive, pb::heartbeat_reply::Directive::Stop as i32);
}

#[tokio::test]
async fn join_without_a_job_times_out_unassigned() {
    let mut c = start().await;
    let w = c
        .register(pb::RegisterRequest {
            ring_address: "node-1:7000".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let a = c
        .join(pb::JoinRequest {
            worker_id: w.worker_id,
            wait_ms: 50,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!a.assigned);
}

fn expect<T: std::fmt::Debug>(
    r: Result<tonic::Response<T>, tonic::Status>,
    code: Code,
    words: &str,
) {
    let e = r.unwrap_err();
    assert_eq!(e.code(), code, "{e:?}");
    assert!(
        e.message().contains(words),
        "{:?} should mention {words:?}",
        e.message()
    );
}

#[tokio::test]
async fn bad_requests_get_the_right_codes_and_name_the_field() {
    let mut c = start().await;
    expect(
        c.submit_job(spec("s3://nowhere/x.zarr", 2)).await,
        Code::InvalidArgument,
        "data_url s3://nowhere/x.zarr",
    );
    expect(
        c.submit_job(pb::JobSpec {
            config_toml: "nonsense = 1".into(),
            ..spec("good.zarr", 1)
        })
        .await,
        Code::InvalidArgument,
        "config_toml",
    );
    expect(
        c.submit_job(spec("", 1)).await,
        Code::InvalidArgument,
        "data_url",
    );
    expect(
        c.submit_job(spec("good.zarr", 0)).await,
        Code::InvalidArgument,
        "world_size",
    );
    let resume = |location: &str, epochs_done| {
        Some(pb::CheckpointRef {
            location: location.into(),
            epochs_done,
            step: 3,
        })
    };
    expect(
        c.submit_job(pb::JobSpec {
            resume: resume("", 1),
            ..spec("good.zarr", 1)
        })
        .await,
        Code::InvalidArgument,
        "resume.location",
    );
    expect(
        c.submit_job(pb::JobSpec {
            resume: resume("ckpt/epoch-99", 99),
            ..spec("good.zarr", 1)
        })
        .await,
        Code::FailedPrecondition,
        "nothing left to train",
    );
    expect(
        c.cancel_job(pb::JobHandle {
            job_id: "job-99".into(),
        })
        .await,
        Code::NotFound,
        "unknown job 99",
    );
    expect(
        c.cancel_job(pb::JobHandle {
            job_id: "99".into(),
        })
        .await,
        Code::InvalidArgument,
        "job_id",
    );
    match c
        .watch_job(pb::JobHandle {
            job_id: "job-7".into(),
        })
        .await
    {
        Err(e) => assert_eq!(e.code(), Code::NotFound),
        Ok(_) => panic!("watching an unknown job must fail"),
    }
    expect(
        c.register(pb::RegisterRequest {
            ring_address: "no-port".into(),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "ring_address",
    );
    expect(
        c.join(pb::JoinRequest {
            worker_id: "w404".into(),
            wait_ms: 10,
        })
        .await,
        Code::NotFound,
        "unknown worker 404",
    );
    expect(
        c.heartbeat(pb::HeartbeatRequest {
            worker_id: "bob".into(),
            generation: 0,
        })
        .await,
        Code::InvalidArgument,
        "worker_id",
    );
    // A worker reporting for a generation it is not in is refused, not counted.
    let w = c
        .register(pb::RegisterRequest {
            ring_address: "127.0.0.1:7200".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let job = c
        .submit_job(spec("good.zarr", 1))
        .await
        .unwrap()
        .into_inner();
    let stale = pb::ProgressReport {
        worker_id: w.worker_id.clone(),
        job_id: job.job_id,
        generation: 42,
        epoch: 0,
        cells: 1_000,
        epoch_done: true,
        ..pb::ProgressReport::default()
    };
    expect(
        c.report_progress(stale).await,
        Code::FailedPrecondition,
        "generation 42",
    );
    // An unknown worker's heartbeat is not an error: it is told to register again.
    let hb = c
        .heartbeat(pb::HeartbeatRequest {
            worker_id: "w12345".into(),
            generation: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        hb.directive,
        pb::heartbeat_reply::Directive::Register as i32
    );
    // Oversized requests are refused before they reach the service.
    let huge = pb::JobSpec {
        config_toml: "#".repeat(2 << 20),
        ..spec("good.zarr", 1)
    };
    let e = c.submit_job(huge).await.unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
}
