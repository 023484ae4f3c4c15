//! `tessera serve` end to end over gRPC: a reference trained on batches 0 and 1 of a simulated
//! world, queries of batch 2 mapped through the service, and the refusals.
#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use futures::StreamExt;
use tessera_data::{AnnData, SimConfig, Store, StoreWriter, simulate};
use tessera_proto::v1 as pb;
use tessera_proto::v1::atlas_client::AtlasClient;
use tessera_serve::{JobLimits, ServeConfig, Tokens};
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

const TOKEN: &str = "lab-token-1";

/// Store reads and writes block on the data layer's own runtime: off the test's async threads.
fn sync<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

fn world(path: &Path, cells: u64, only: Vec<usize>) -> String {
    let path = path.display().to_string();
    sync(|| {
        simulate(
            &path,
            &SimConfig {
                n_cells: cells,
                n_genes: 200,
                n_types: 5,
                n_batches: 3,
                only_batches: Some(only),
                seed: 4,
                ..SimConfig::default()
            },
            |_| {},
        )
        .unwrap()
    });
    path
}

/// One reference model per test binary (training is the slow part): batches 0 and 1, labels.
fn reference() -> &'static Path {
    static MODEL: OnceLock<PathBuf> = OnceLock::new();
    MODEL.get_or_init(|| {
        sync(|| {
            let dir = tempfile::tempdir().unwrap().keep();
            let data = world(&dir.join("reference.zarr"), 1200, vec![0, 1]);
            let mut config = tessera_worker::FitConfig::default();
            config.train.max_epochs = Some(40);
            config.train.kl_warmup_epochs = 20;
            config.model.encode_covariates = true;
            config.model.classifier_weight = 1.0;
            let out = dir.join("model");
            let opts = tessera_worker::FitOptions {
                data,
                modalities: Vec::new(),
                batch_key: Some("batch".into()),
                label_key: Some("cell_type".into()),
                unlabeled_category: None,
                covariates: Default::default(),
                config,
                out: out.clone(),
                embedding_key: "X_tessera".into(),
                prediction_key: tessera_worker::fit::PREDICTION_KEY.into(),
                overwrite: false,
                store_outputs: true,
                resume: false,
                denoised: None,
                cache_bytes: tessera_worker::DEFAULT_CACHE_MIB << 20,
                device: Default::default(),
                init_from: None,
                layer: None,
            };
            tessera_worker::fit(&opts, |_| {}).unwrap();
            out
        })
    })
}

struct Server {
    dir: tempfile::TempDir,
    address: String,
    telemetry: tessera_serve::observe::Telemetry,
    _shutdown: tokio::sync::oneshot::Sender<()>,
}

impl Server {
    /// The folder requests may name.
    fn allowed(&self) -> PathBuf {
        self.dir.path().join("allowed")
    }

    fn scratch(&self) -> PathBuf {
        self.dir.path().join("scratch")
    }
}

fn config(dir: &Path) -> ServeConfig {
    ServeConfig {
        registry: dir.join("registry").display().to_string(),
        register: vec![("pbmc-sim".into(), reference().display().to_string())],
        cached_models: 2,
        scratch: dir.join("scratch"),
        allow_prefixes: vec![dir.join("allowed").display().to_string()],
        tokens: Tokens::parse(TOKEN),
        tls: None,
        max_request_bytes: 4 << 20,
        max_upload_bytes: 64 << 20,
        upload_ttl: std::time::Duration::from_secs(3600),
        jobs: JobLimits {
            max_jobs: 2,
            memory_bytes: 4 << 30,
            finished_kept: 16,
        },
        default_epochs: 20,
        device: Default::default(),
    }
}

async fn start(adjust: impl FnOnce(&mut ServeConfig)) -> Server {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("allowed")).unwrap();
    let mut config = config(dir.path());
    adjust(&mut config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let service = tokio::task::spawn_blocking({
        let config = config.clone();
        move || tessera_serve::service(&config).unwrap()
    })
    .await
    .unwrap();
    let telemetry = service.telemetry();
    tokio::spawn(async move {
        tessera_serve::serve(listener, service, &config, async {
            let _ = rx.await;
        })
        .await
        .unwrap();
    });
    Server {
        dir,
        address,
        telemetry,
        _shutdown: tx,
    }
}

type Client = AtlasClient<tonic::service::interceptor::InterceptedService<Channel, Bearer>>;

#[derive(Clone)]
struct Bearer(Option<String>);

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(t) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        Ok(request)
    }
}

async fn client_with(server: &Server, token: Option<&str>) -> Client {
    let channel = Endpoint::from_shared(format!("http://{}", server.address))
        .unwrap()
        .connect()
        .await
        .unwrap();
    AtlasClient::with_interceptor(channel, Bearer(token.map(str::to_string)))
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20)
}

async fn client(server: &Server) -> Client {
    client_with(server, Some(TOKEN)).await
}

fn job(data: &str) -> pb::QueryJob {
    pb::QueryJob {
        model: "pbmc-sim".into(),
        data_url: data.into(),
        epochs: 20,
        neighbours: 30,
        write_back: Some(pb::WriteBack {
            embedding_key: "X_tessera".into(),
            label_key: "tessera_label".into(),
            overwrite: false,
        }),
        ..Default::default()
    }
}

/// Every status of a job until it ends.
async fn watch(client: &mut Client, id: &str) -> Vec<pb::QueryJobStatus> {
    let mut stream = client
        .watch_query(pb::JobRef { job_id: id.into() })
        .await
        .unwrap()
        .into_inner();
    let mut seen = Vec::new();
    while let Some(s) = stream.next().await {
        seen.push(s.unwrap());
    }
    seen
}

async fn results(client: &mut Client, id: &str) -> Vec<pb::QueryResultsChunk> {
    let mut stream = client
        .query_results(pb::JobRef { job_id: id.into() })
        .await
        .unwrap()
        .into_inner();
    let mut chunks = Vec::new();
    while let Some(c) = stream.next().await {
        chunks.push(c.unwrap());
    }
    chunks
}

fn report(status: &pb::QueryJobStatus) -> serde_json::Value {
    serde_json::from_str(&status.report_json).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_job_maps_a_new_batch_with_progress_and_results() {
    let server = start(|_| {}).await;
    let mut client = client(&server).await;
    let query = world(&server.allowed().join("query.zarr"), 500, vec![2]);
    let submitted = client.submit_query(job(&query)).await.unwrap().into_inner();
    assert!(
        submitted.state() == pb::JobState::Queued && submitted.memory_bytes > 0,
        "{submitted:?}"
    );
    let seen = watch(&mut client, &submitted.job_id).await;
    let last = seen.last().unwrap();
    assert_eq!(last.state(), pb::JobState::Succeeded, "{last:?}");
    assert_eq!(last.progress, 1.0);
    assert!(
        seen.iter()
            .any(|s| s.stage.starts_with("fine-tuning epoch")),
        "{seen:?}"
    );
    assert!(
        seen.windows(2).all(|w| w[0].progress <= w[1].progress),
        "progress goes forward"
    );
    let report = report(last);
    assert_eq!(report["new_batches"], serde_json::json!(["batch2"]));
    let accuracy = report["label_accuracy"].as_f64().unwrap();
    assert!(accuracy > 0.85, "label transfer accuracy {accuracy}");

    let samples = tessera_telemetry::parse(&server.telemetry.render()).unwrap();
    assert_eq!(
        tessera_telemetry::value(&samples, "tessera_serve_jobs", &[("state", "succeeded")]),
        Some(1.0)
    );
    assert_eq!(
        tessera_telemetry::value(&samples, "tessera_serve_models_loaded", &[]),
        Some(1.0)
    );
    assert_eq!(
        tessera_telemetry::value(&samples, "tessera_serve_memory_admitted_bytes", &[]),
        Some(0.0),
        "nothing runs now"
    );
    assert_eq!(
        tessera_telemetry::value(
            &samples,
            "tessera_serve_requests_total",
            &[("method", "SubmitQuery"), ("code", "OK")]
        ),
        Some(1.0)
    );
    let chunks = results(&mut client, &submitted.job_id).await;
    let first = &chunks[0];
    assert_eq!(
        (first.n_cells, first.n_latent, first.label_categories.len()),
        (500, 10, 5)
    );
    let embedding: Vec<f32> = chunks.iter().flat_map(|c| c.embedding.clone()).collect();
    let labels: Vec<i32> = chunks.iter().flat_map(|c| c.labels.clone()).collect();
    let names: Vec<String> = chunks.iter().flat_map(|c| c.obs_names.clone()).collect();
    assert_eq!(
        (embedding.len(), labels.len(), names.len()),
        (5000, 500, 500)
    );
    // The reference's classifier is the second label source; it mostly agrees with the kNN.
    let classified: Vec<i32> = chunks
        .iter()
        .flat_map(|c| c.classifier_labels.clone())
        .collect();
    assert_eq!(classified.len(), 500);
    let agree = classified
        .iter()
        .zip(&labels)
        .filter(|(a, b)| a == b)
        .count();
    assert!(agree > 400, "classifier and kNN agree on {agree} of 500");
    assert!(
        report["classifier_accuracy"].as_f64().unwrap() > 0.85,
        "{report}"
    );
    // Written back into the store as asked, equal to what was streamed.
    let (written, index) = sync(|| {
        let adata = AnnData::open(&query).unwrap();
        (adata.obsm("X_tessera").unwrap(), adata.obs().unwrap().index)
    });
    assert_eq!(written, (embedding, 10));
    assert_eq!(index, names);
    // Results of an unknown job, or before success, are refused by name.
    let e = client
        .query_results(pb::JobRef {
            job_id: "query-999".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert!(e.message().contains("query-999"));
    // A second job would overwrite: it fails and says what.
    let again = client.submit_query(job(&query)).await.unwrap().into_inner();
    let last = watch(&mut client, &again.job_id).await.pop().unwrap();
    assert_eq!(last.state(), pb::JobState::Failed);
    assert!(
        last.error.contains("obsm/X_tessera") && last.error.contains("already exists"),
        "{}",
        last.error
    );
    let e = client
        .query_results(pb::JobRef {
            job_id: again.job_id,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("JOB_STATE_FAILED"), "{}", e.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registry_registers_lists_describes_and_refuses() {
    let server = start(|_| {}).await;
    let mut client = client(&server).await;
    let listed = client
        .list_models(pb::ListModelsRequest {})
        .await
        .unwrap()
        .into_inner()
        .models;
    assert_eq!(listed.len(), 1);
    let m = &listed[0];
    assert_eq!(
        (
            m.name.as_str(),
            m.n_latent,
            m.reference_cells,
            m.batches.len(),
            m.labels.len()
        ),
        ("pbmc-sim", 10, 1200, 2, 5)
    );
    // An AnnData reference: its one modality is X.
    assert_eq!(
        (m.modalities[0].name.as_str(), m.modalities[0].n_features),
        ("X", 200)
    );
    assert_eq!(m.batch_key, "batch");

    // A copy under the allowed prefix registers under a second name.
    let copy = server.allowed().join("model-copy");
    std::fs::create_dir_all(&copy).unwrap();
    for f in ["config.json", "model.safetensors", "reference.safetensors"] {
        std::fs::copy(reference().join(f), copy.join(f)).unwrap();
    }
    let register = |name: &str, source: &Path, replace| pb::RegisterModelRequest {
        name: name.into(),
        source_url: source.display().to_string(),
        replace,
    };
    let info = client
        .register_model(register("second", &copy, false))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.labels.len(), 5);
    let described = client
        .describe_model(pb::DescribeModelRequest {
            name: "second".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(described.source_url, copy.display().to_string());
    assert_eq!(
        client
            .list_models(pb::ListModelsRequest {})
            .await
            .unwrap()
            .into_inner()
            .models
            .len(),
        2
    );

    let e = client
        .register_model(register("second", &copy, false))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists);
    assert!(
        client
            .register_model(register("second", &copy, true))
            .await
            .is_ok()
    );
    // The trained folder itself is outside the allowed prefix.
    let e = client
        .register_model(register("third", reference(), false))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(
        e.message().contains("source_url")
            && e.message().contains("not under an allowed storage prefix"),
        "{}",
        e.message()
    );
    let e = client
        .register_model(register("../escape", &copy, false))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("model name"), "{}", e.message());
    std::fs::remove_file(copy.join("reference.safetensors")).unwrap();
    let e = client
        .register_model(register("fourth", &copy, false))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("reference.safetensors"),
        "{}",
        e.message()
    );
    let e = client
        .describe_model(pb::DescribeModelRequest {
            name: "nothing".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert!(e.message().contains("\"nothing\""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_without_a_valid_token_are_refused() {
    let server = start(|_| {}).await;
    for token in [None, Some("lab-token-2"), Some("")] {
        let mut client = client_with(&server, token).await;
        let e = client
            .list_models(pb::ListModelsRequest {})
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{token:?}");
        let e = client.submit_query(job("/etc")).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{token:?}");
    }
    // Every call counted, refusals by their status; the text is what Prometheus parses.
    let samples = tessera_telemetry::parse(&server.telemetry.render()).unwrap();
    let refused = tessera_telemetry::value(
        &samples,
        "tessera_serve_requests_total",
        &[("method", "ListModels"), ("code", "UNAUTHENTICATED")],
    );
    assert_eq!(refused, Some(3.0), "{samples:?}");
    assert_eq!(
        tessera_telemetry::value(
            &samples,
            "tessera_serve_request_duration_seconds_count",
            &[("method", "SubmitQuery")]
        ),
        Some(3.0)
    );
    assert_eq!(
        tessera_telemetry::value(&samples, "tessera_serve_jobs", &[("state", "queued")]),
        Some(0.0)
    );
    assert_eq!(
        tessera_telemetry::value(&samples, "tessera_serve_memory_budget_bytes", &[]),
        Some((4u64 << 30) as f64)
    );
    // Health checks need no token (for load balancers and kubelets).
    let channel = Endpoint::from_shared(format!("http://{}", server.address))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let health = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        health.status(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_requests_and_forbidden_prefixes_are_refused() {
    let server = start(|c| {
        c.max_request_bytes = 256 << 10;
        c.max_upload_bytes = 1 << 20;
    })
    .await;
    let mut client = client(&server).await;
    let big = pb::EncodeModality {
        name: "X".into(),
        n_cells: 1,
        n_features: 200,
        indptr: vec![0, 100_000],
        indices: vec![0; 100_000],
        data: vec![1.0; 100_000],
        ..Default::default()
    };
    let e = client
        .encode(pb::EncodeRequest {
            model: "pbmc-sim".into(),
            modalities: vec![big],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
    assert!(
        e.message().contains("message length too large") && e.message().contains("262144"),
        "{}",
        e.message()
    );

    // An upload over the limit is refused and leaves nothing behind.
    let chunks: Vec<pb::UploadChunk> = (0..8)
        .map(|i| pb::UploadChunk {
            path: format!("X/data/{i}"),
            data: vec![0; 200 << 10],
        })
        .collect();
    let e = client
        .upload(futures::stream::iter(chunks))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("1048576 bytes"), "{}", e.message());
    assert_eq!(std::fs::read_dir(server.scratch()).unwrap().count(), 0);
    let e = client
        .upload(futures::stream::iter(vec![pb::UploadChunk {
            path: "../../outside".into(),
            data: vec![1],
        }]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("\"../../outside\""), "{}", e.message());
    assert_eq!(std::fs::read_dir(server.scratch()).unwrap().count(), 0);

    let outside = world(&server.dir.path().join("outside.zarr"), 50, vec![2]);
    for data in [
        outside.clone(),
        format!("{}/../outside.zarr", server.allowed().display()),
        "/etc".into(),
        "s3://somebody-elses-bucket/q.zarr".into(),
    ] {
        let e = client.submit_query(job(&data)).await.unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{data}");
        assert!(
            e.message().starts_with("data_url") && e.message().contains(&data),
            "{}",
            e.message()
        );
    }
    let e = client
        .submit_query(job("ftp://x/y.zarr"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = client
        .submit_query(pb::QueryJob {
            model: "nothing".into(),
            ..job(&server.allowed().display().to_string())
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = client
        .submit_query(job(&server
            .allowed()
            .join("missing.zarr")
            .display()
            .to_string()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("missing.zarr"), "{}", e.message());
    // Counts that would hold a slot (or memory) without end.
    let query = world(&server.allowed().join("bounded.zarr"), 50, vec![2]);
    for (field, asked) in [
        (
            "epochs",
            pb::QueryJob {
                epochs: 4_000_000_000,
                ..job(&query)
            },
        ),
        (
            "neighbours",
            pb::QueryJob {
                neighbours: 4_000_000_000,
                ..job(&query)
            },
        ),
    ] {
        let e = client.submit_query(asked).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{field}");
        assert!(
            e.message().starts_with(&format!("{field} = 4000000000")),
            "{}",
            e.message()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_run_within_the_slots_and_memory_budget_and_cancel() {
    // One slot: jobs run one after another, in order.
    let server = start(|c| c.jobs.max_jobs = 1).await;
    let mut client = client(&server).await;
    let queries: Vec<String> = (0..3)
        .map(|i| world(&server.allowed().join(format!("q{i}.zarr")), 300, vec![2]))
        .collect();
    let mut ids = Vec::new();
    for q in &queries {
        ids.push(
            client
                .submit_query(job(q))
                .await
                .unwrap()
                .into_inner()
                .job_id,
        );
    }
    // The third, still queued, is cancelled: it never runs.
    let cancelled = client
        .cancel_query(pb::JobRef {
            job_id: ids[2].clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        cancelled.state(),
        pb::JobState::Queued,
        "cancel answers the state it found"
    );
    // When the second runs, the first has ended (a job's slot is freed after its last status).
    let mut second = client
        .watch_query(pb::JobRef {
            job_id: ids[1].clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut first_when_second_ran = None;
    let mut last = None;
    while let Some(s) = second.next().await {
        let s = s.unwrap();
        if s.state() == pb::JobState::Running && first_when_second_ran.is_none() {
            let mut first = client
                .watch_query(pb::JobRef {
                    job_id: ids[0].clone(),
                })
                .await
                .unwrap()
                .into_inner();
            first_when_second_ran = Some(first.next().await.unwrap().unwrap().state());
        }
        last = Some(s);
    }
    assert_eq!(first_when_second_ran, Some(pb::JobState::Succeeded));
    assert_eq!(last.unwrap().state(), pb::JobState::Succeeded);
    let third = watch(&mut client, &ids[2]).await;
    assert_eq!(
        third.iter().map(|s| s.state()).collect::<Vec<_>>(),
        [pb::JobState::Cancelled]
    );
    assert!(
        !sync(|| AnnData::open(&queries[2]).unwrap().keys("obsm").unwrap())
            .contains(&"X_tessera".to_string())
    );

    // A running job is cancelled between minibatches.
    let long = client
        .submit_query(pb::QueryJob {
            epochs: 10_000,
            write_back: None,
            ..job(&queries[2])
        })
        .await
        .unwrap()
        .into_inner()
        .job_id;
    let mut stream = client
        .watch_query(pb::JobRef {
            job_id: long.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    while let Some(s) = stream.next().await {
        if s.unwrap().stage.starts_with("fine-tuning") {
            break;
        }
    }
    client
        .cancel_query(pb::JobRef {
            job_id: long.clone(),
        })
        .await
        .unwrap();
    let end = watch(&mut client, &long).await.pop().unwrap();
    assert_eq!(end.state(), pb::JobState::Cancelled, "{end:?}");
    assert!(end.progress < 0.5, "{end:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_memory_budget_admits_what_fits_and_refuses_what_never_will() {
    let server = start(|c| {
        c.jobs.max_jobs = 4;
        c.jobs.memory_bytes = 100 << 20;
    })
    .await;
    let mut client = client(&server).await;
    let query = world(&server.allowed().join("q.zarr"), 300, vec![2]);
    let first = client
        .submit_query(pb::QueryJob {
            write_back: None,
            ..job(&query)
        })
        .await
        .unwrap()
        .into_inner();
    // ~64 MiB of working space each: two never fit at once in 100 MiB.
    assert!(
        first.memory_bytes > 50 << 20 && first.memory_bytes < 100 << 20,
        "{first:?}"
    );
    let second = client
        .submit_query(pb::QueryJob {
            write_back: None,
            ..job(&query)
        })
        .await
        .unwrap()
        .into_inner();
    let seen = watch(&mut client, &second.job_id).await;
    assert_eq!(seen.last().unwrap().state(), pb::JobState::Succeeded);
    let first_then = watch(&mut client, &first.job_id).await;
    assert_eq!(first_then.last().unwrap().state(), pb::JobState::Succeeded);
    let tight = start(|c| c.jobs.memory_bytes = 32 << 20).await;
    let mut small = client_with(&tight, Some(TOKEN)).await;
    let query = world(&tight.allowed().join("q.zarr"), 300, vec![2]);
    let e = small.submit_query(job(&query)).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert!(
        e.message().contains("memory budget of 32 MiB"),
        "{}",
        e.message()
    );
}

/// Sends a local store's files as an upload.
async fn upload(client: &mut Client, store: &Path) -> pb::UploadResponse {
    let mut chunks = Vec::new();
    let mut stack = vec![store.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let relative = path.strip_prefix(store).unwrap().display().to_string();
                let bytes = std::fs::read(&path).unwrap();
                // Several chunks per file where it is large, as a client streams it.
                for part in bytes.chunks(64 << 10) {
                    chunks.push(pb::UploadChunk {
                        path: relative.clone(),
                        data: part.to_vec(),
                    });
                }
                if bytes.is_empty() {
                    chunks.push(pb::UploadChunk {
                        path: relative,
                        data: Vec::new(),
                    });
                }
            }
        }
    }
    client
        .upload(futures::stream::iter(chunks))
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_uploaded_store_with_missing_genes_is_mapped_and_removed() {
    let server = start(|_| {}).await;
    let mut client = client(&server).await;
    // Not under the allowed prefix: the client holds it and sends it.
    let query = world(&server.dir.path().join("mine.zarr"), 400, vec![2]);
    sync(|| {
        let mut names = AnnData::open(&query).unwrap().var().unwrap().index;
        names
            .iter_mut()
            .skip(170)
            .for_each(|n| *n = format!("novel-{n}"));
        let writer = StoreWriter::existing(Store::open(&query).unwrap()).unwrap();
        writer.dataframe("var", &names, &[]).unwrap();
        writer.consolidate().unwrap();
    });
    let uploaded = upload(&mut client, Path::new(&query)).await;
    assert!(uploaded.files > 10 && uploaded.bytes > 1000, "{uploaded:?}");
    let id = client
        .submit_query(pb::QueryJob {
            write_back: None,
            ..job(&uploaded.data_url)
        })
        .await
        .unwrap()
        .into_inner()
        .job_id;
    let last = watch(&mut client, &id).await.pop().unwrap();
    assert_eq!(last.state(), pb::JobState::Succeeded, "{last:?}");
    let report = report(&last);
    let m = &report["modalities"][0];
    assert_eq!(
        (
            m["matched"].as_u64(),
            m["zero_filled"].as_u64(),
            m["ignored"].as_u64()
        ),
        (Some(170), Some(30), Some(30))
    );
    assert!(report["label_accuracy"].as_f64().unwrap() > 0.8, "{report}");
    let chunks = results(&mut client, &id).await;
    assert_eq!(chunks.iter().map(|c| c.labels.len()).sum::<usize>(), 400);
    assert!(
        !Path::new(&uploaded.data_url).exists(),
        "the upload is removed when its job ends"
    );
}

/// The first 150 cells of the reference's store as an Encode request.
fn encode_request(transfer_labels: bool) -> pb::EncodeRequest {
    sync(|| encode_request_of_reference_cells(transfer_labels))
}

fn encode_request_of_reference_cells(transfer_labels: bool) -> pb::EncodeRequest {
    let data = reference()
        .parent()
        .unwrap()
        .join("reference.zarr")
        .display()
        .to_string();
    let dataset = tessera_data::Dataset::open(&data).unwrap();
    let loader = tessera_data::Loader::new(
        &dataset,
        0..150,
        tessera_data::LoaderConfig {
            batch_size: 150,
            batch_key: Some("batch".into()),
            ..Default::default()
        },
    )
    .unwrap();
    let mb = loader.ordered().epoch(0).next().unwrap().unwrap();
    let c = &mb.modalities[0].counts;
    let modality = pb::EncodeModality {
        name: "X".into(),
        var_names: Vec::new(),
        n_cells: 150,
        n_features: c.n_cols as u32,
        indptr: c.indptr.clone(),
        indices: c.indices.clone(),
        data: c.data.clone(),
    };
    let batches = mb
        .batch
        .iter()
        .map(|&b| loader.batch_categories[b as usize].clone())
        .collect();
    pb::EncodeRequest {
        model: "pbmc-sim".into(),
        modalities: vec![modality],
        batches,
        transfer_labels,
        neighbours: 30,
        covariates: Vec::new(),
    }
}

/// Encode's working memory counts against the budget the mapping jobs share (it did not).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encode_beyond_the_memory_budget_is_refused() {
    let server = start(|c| c.jobs.memory_bytes = 1 << 20).await;
    let mut client = client(&server).await;
    let e = client.encode(encode_request(true)).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert!(
        e.message().contains("this Encode call needs about")
            && e.message().contains("memory budget of 1 MiB"),
        "{}",
        e.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encode_returns_the_reference_latent_and_labels() {
    let server = start(|_| {}).await;
    let mut client = client(&server).await;
    let reference =
        tessera_worker::reference::Reference::read(&reference().join("reference.safetensors"))
            .unwrap();
    let answer = client
        .encode(encode_request(true))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            answer.n_latent,
            answer.latent.len(),
            answer.labels.len(),
            answer.uncertainty.len()
        ),
        (10, 1500, 150, 150)
    );
    let worst = answer
        .latent
        .iter()
        .zip(&reference.latent)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1e-4, "{worst}");
    let own: Vec<&str> = reference.labels[..150]
        .iter()
        .map(|&c| reference.label_categories[c as usize].as_str())
        .collect();
    let agree = own
        .iter()
        .zip(&answer.labels)
        .filter(|(a, b)| **a == b.as_str())
        .count();
    assert!(
        agree >= 140,
        "{agree} of 150 reference cells keep their label"
    );

    let mut bad = encode_request(false);
    bad.modalities[0].indices[5] = 999;
    let e = client.encode(bad).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message()
            .contains("column index 999 outside n_features = 200"),
        "{}",
        e.message()
    );
    let mut bad = encode_request(false);
    bad.modalities[0].data[0] = f32::NAN;
    assert!(
        client
            .encode(bad)
            .await
            .unwrap_err()
            .message()
            .contains("finite")
    );
    let mut bad = encode_request(false);
    bad.modalities[0].indptr.pop();
    assert!(
        client
            .encode(bad)
            .await
            .unwrap_err()
            .message()
            .contains("indptr")
    );
    let mut bad = encode_request(false);
    bad.batches[0] = "batch2".into();
    let e = client.encode(bad).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("\"batch2\"") && e.message().contains("query job"),
        "{}",
        e.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_clients_that_trust_the_certificate() {
    let key = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (cert, pem_key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&cert, key.cert.pem()).unwrap();
    std::fs::write(&pem_key, key.signing_key.serialize_pem()).unwrap();
    let server = start(|c| c.tls = Some((cert.clone(), pem_key.clone()))).await;
    let port = server.address.rsplit(':').next().unwrap();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(key.cert.pem()))
        .domain_name("localhost");
    let channel = Endpoint::from_shared(format!("https://localhost:{port}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = AtlasClient::with_interceptor(channel, Bearer(Some(TOKEN.into())));
    assert_eq!(
        client
            .list_models(pb::ListModelsRequest {})
            .await
            .unwrap()
            .into_inner()
            .models
            .len(),
        1
    );
    // Plain text to a TLS port gets no answer.
    let plain = Endpoint::from_shared(format!("http://{}", server.address))
        .unwrap()
        .timeout(Duration::from_secs(10))
        .connect()
        .await;
    if let Ok(channel) = plain {
        let mut client = AtlasClient::with_interceptor(channel, Bearer(Some(TOKEN.into())));
        assert!(client.list_models(pb::ListModelsRequest {}).await.is_err());
    }
}
