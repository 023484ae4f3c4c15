//! `tessera map` as a user runs it: train a reference, map a query with a new batch onto it.
#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod common;

use std::path::Path;

use common::{copy_dir, http_get, ok, tessera};

fn path(dir: &Path, name: &str) -> String {
    dir.join(name).display().to_string()
}

#[test]
fn map_a_query_onto_a_trained_reference() {
    let dir = tempfile::tempdir().unwrap();
    let (reference, query, model, out) = (
        path(dir.path(), "ref.zarr"),
        path(dir.path(), "query.zarr"),
        path(dir.path(), "model"),
        path(dir.path(), "out"),
    );
    ok(&tessera(&[
        "simulate",
        &reference,
        "--cells",
        "800",
        "--genes",
        "150",
        "--types",
        "4",
        "--batches",
        "3",
        "--only-batches",
        "0,1",
        "--seed",
        "2",
    ]));
    ok(&tessera(&[
        "simulate",
        &query,
        "--cells",
        "300",
        "--genes",
        "150",
        "--types",
        "4",
        "--batches",
        "3",
        "--only-batches",
        "2",
        "--seed",
        "2",
    ]));
    ok(&tessera(&[
        "train",
        "--data",
        &reference,
        "--batch-key",
        "batch",
        "--label-key",
        "cell_type",
        "--epochs",
        "30",
        "--out",
        &model,
    ]));
    let printed = ok(&tessera(&[
        "map",
        "--model",
        &model,
        "--data",
        &query,
        "--epochs",
        "10",
        "--neighbours",
        "20",
        "--out",
        &out,
        "--save-model",
        &path(dir.path(), "query_model"),
    ]));
    assert!(
        printed.contains("1 new (batch2)") && printed.contains("150 of 150 reference features"),
        "{printed}"
    );
    // The saved query model is a model folder; another mapping will not replace it unasked.
    assert!(
        Path::new(&path(dir.path(), "query_model"))
            .join("model.safetensors")
            .exists()
    );
    let again = tessera(&[
        "map",
        "--model",
        &model,
        "--data",
        &query,
        "--out",
        &out,
        "--save-model",
        &path(dir.path(), "query_model"),
    ]);
    let e = String::from_utf8_lossy(&again.stderr);
    assert!(
        !again.status.success() && e.contains("pass --overwrite"),
        "{e}"
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(Path::new(&out).join("map.json")).unwrap()).unwrap();
    assert!(
        report["label_accuracy"].as_f64().unwrap() > 0.85,
        "{report}"
    );
    // A store whose genes the reference never saw cannot be mapped, and says so.
    // (A private copy: a mapping writes into its query store.)
    let foreign = path(dir.path(), "foreign.zarr");
    copy_dir(&common::fixture("ad013_v3.zarr"), Path::new(&foreign));
    let refused = tessera(&[
        "map",
        "--model",
        &model,
        "--data",
        &foreign,
        "--batch-key",
        "cell_type",
        "--out",
        &out,
    ]);
    assert!(!refused.status.success());
    let e = String::from_utf8_lossy(&refused.stderr);
    assert!(
        e.contains("no feature of the reference's modalities"),
        "{e}"
    );
}

/// `tessera serve` on an ephemeral port; killed when dropped.
struct Served(std::process::Child);

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_maps_a_query_submitted_over_grpc() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    use tessera_proto::v1 as pb;

    let dir = tempfile::tempdir().unwrap();
    let allowed = dir.path().join("allowed");
    std::fs::create_dir_all(&allowed).unwrap();
    let (reference, query, model) = (
        path(dir.path(), "ref.zarr"),
        path(&allowed, "query.zarr"),
        path(dir.path(), "model"),
    );
    tokio::task::block_in_place(|| {
        ok(&tessera(&[
            "simulate",
            &reference,
            "--cells",
            "800",
            "--genes",
            "150",
            "--types",
            "4",
            "--batches",
            "3",
            "--only-batches",
            "0,1",
            "--seed",
            "2",
        ]));
        ok(&tessera(&[
            "simulate",
            &query,
            "--cells",
            "300",
            "--genes",
            "150",
            "--types",
            "4",
            "--batches",
            "3",
            "--only-batches",
            "2",
            "--seed",
            "2",
        ]));
        ok(&tessera(&[
            "train",
            "--data",
            &reference,
            "--batch-key",
            "batch",
            "--label-key",
            "cell_type",
            "--epochs",
            "30",
            "--out",
            &model,
        ]));
    });
    // Without tokens it refuses to start, and says how to give them.
    let registry = path(dir.path(), "registry");
    let e = common::failed(&tessera(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--registry",
        &registry,
    ]));
    assert!(
        e.contains("no bearer tokens") && e.contains("TESSERA_SERVE_TOKENS"),
        "{e}"
    );

    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "# the lab's token\nsecret-1\n").unwrap();
    let register = format!("sim={model}");
    let serving = |prefix: &'_ str| {
        let tokens = tokens.to_str().unwrap();
        let args = [
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--registry",
            &registry,
            "--register",
            &register,
            "--allow-prefix",
            prefix,
            "--tokens-file",
            tokens,
        ];
        args.map(str::to_string).to_vec()
    };
    // A prefix that does not exist is named, and nothing was copied into the registry first.
    let absent = path(dir.path(), "no-such-dir");
    let refused: Vec<String> = serving(&absent);
    let refused: Vec<&str> = refused.iter().map(String::as_str).collect();
    let e = common::failed(&tessera(&refused));
    assert!(
        e.contains(&format!("--allow-prefix {absent}")) && !e.contains("opening the registry"),
        "{e}"
    );
    assert!(
        !std::path::Path::new(&registry).join("sim").exists(),
        "the model was registered before the prefix was checked"
    );
    let mut args = serving(allowed.to_str().unwrap());
    args.extend(
        [
            "--scratch",
            &path(dir.path(), "scratch"),
            "--max-jobs",
            "1",
            "--metrics-listen",
            "127.0.0.1:0",
        ]
        .map(str::to_string),
    );
    let mut child = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(args)
        .env("TESSERA_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let address = line
        .trim()
        .strip_prefix("atlas listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    line.clear();
    stdout.read_line(&mut line).unwrap();
    let metrics = line
        .trim()
        .strip_prefix("metrics listening on ")
        .unwrap_or_else(|| panic!("unexpected second line {line:?}"))
        .to_string();
    let _served = Served(child);

    let channel = tonic::transport::Channel::from_shared(format!("http://{address}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let token: tonic::metadata::MetadataValue<_> = "Bearer secret-1".parse().unwrap();
    let mut client = pb::atlas_client::AtlasClient::with_interceptor(
        channel,
        move |mut r: tonic::Request<()>| {
            r.metadata_mut().insert("authorization", token.clone());
            Ok(r)
        },
    );
    let models = client
        .list_models(pb::ListModelsRequest {})
        .await
        .unwrap()
        .into_inner()
        .models;
    assert_eq!(
        models.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(),
        ["sim"]
    );
    let job = pb::QueryJob {
        model: "sim".into(),
        data_url: query.clone(),
        epochs: 10,
        neighbours: 20,
        write_back: Some(pb::WriteBack {
            embedding_key: "X_tessera".into(),
            label_key: "tessera_label".into(),
            overwrite: false,
        }),
        ..Default::default()
    };
    let id = client.submit_query(job).await.unwrap().into_inner().job_id;
    let mut statuses = client
        .watch_query(pb::JobRef { job_id: id })
        .await
        .unwrap()
        .into_inner();
    let mut last = None;
    while let Some(s) = statuses.message().await.unwrap() {
        last = Some(s);
    }
    let last = last.unwrap();
    assert_eq!(last.state(), pb::JobState::Succeeded, "{last:?}");
    let report: serde_json::Value = serde_json::from_str(&last.report_json).unwrap();
    assert!(
        report["label_accuracy"].as_f64().unwrap() > 0.85,
        "{report}"
    );
    let printed = tokio::task::block_in_place(|| ok(&tessera(&["inspect", &query])));
    assert!(
        printed.contains("X_tessera") && printed.contains("tessera_label"),
        "{printed}"
    );

    // The metrics port: plain HTTP, well-formed Prometheus text, a health check, 404 otherwise.
    let (head, body) = http_get(&metrics, "/metrics");
    assert!(
        head.starts_with("HTTP/1.1 200") && head.contains("text/plain; version=0.0.4"),
        "{head}"
    );
    let samples = tessera_telemetry::parse(&body).unwrap();
    assert_eq!(
        tessera_telemetry::value(&samples, "tessera_serve_jobs", &[("state", "succeeded")]),
        Some(1.0),
        "{body}"
    );
    assert_eq!(
        tessera_telemetry::value(
            &samples,
            "tessera_serve_requests_total",
            &[("method", "SubmitQuery"), ("code", "OK")]
        ),
        Some(1.0),
        "{body}"
    );
    let (head, body) = http_get(&metrics, "/healthz");
    assert!(
        head.starts_with("HTTP/1.1 200") && body == "ok\n",
        "{head}{body}"
    );
    assert!(http_get(&metrics, "/other").0.starts_with("HTTP/1.1 404"));
}
