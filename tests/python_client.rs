//! The Python client package (clients/python) against `tessera serve`: a notebook user's
//! `map_query(adata, model=...)`, a store URL, Encode, and refusals; and the committed stubs
//! are what the proto generates.
#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::path::{Path, PathBuf};
use std::process::Command;

use tessera_data::{SimConfig, simulate};
use tessera_serve::{JobLimits, ServeConfig, Tokens};
use tessera_tests::python;

const TOKEN: &str = "notebook-token";

fn client_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../clients/python")
}

fn world(path: &Path, cells: u64, only: Vec<usize>) -> String {
    let path = path.display().to_string();
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
    .unwrap();
    path
}

#[test]
fn the_committed_stubs_are_what_the_proto_generates() {
    let Some(python) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let status = Command::new("bash")
        .arg(client_dir().join("generate.sh"))
        .arg(dir.path())
        .env("PYTHON", &python)
        .status()
        .unwrap();
    assert!(status.success(), "generate.sh failed");
    for file in ["__init__.py", "atlas_pb2.py", "atlas_pb2_grpc.py"] {
        let fresh = std::fs::read_to_string(dir.path().join(file)).unwrap();
        let committed =
            std::fs::read_to_string(client_dir().join("tessera_client/_proto").join(file)).unwrap();
        assert!(
            fresh == committed,
            "clients/python/tessera_client/_proto/{file} is stale: run clients/python/generate.sh"
        );
    }
}

#[test]
fn a_notebook_maps_a_query_through_the_python_client() {
    let Some(python) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let allowed = dir.path().join("allowed");
    std::fs::create_dir_all(&allowed).unwrap();
    let reference_store = world(&dir.path().join("reference.zarr"), 1200, vec![0, 1]);
    let mut config = tessera_worker::FitConfig::default();
    config.train.max_epochs = Some(40);
    config.train.kl_warmup_epochs = 20;
    config.model.encode_covariates = true;
    config.model.classifier_weight = 1.0;
    let model = dir.path().join("model");
    let opts = tessera_worker::FitOptions {
        data: reference_store.clone(),
        modalities: Vec::new(),
        batch_key: Some("batch".into()),
        label_key: Some("cell_type".into()),
        unlabeled_category: None,
        covariates: Default::default(),
        config,
        out: model.clone(),
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
    let query = world(&dir.path().join("query.zarr"), 500, vec![2]);
    let allowed_query = world(&allowed.join("query.zarr"), 400, vec![2]);

    let serve = ServeConfig {
        registry: dir.path().join("registry").display().to_string(),
        register: vec![("sim".into(), model.display().to_string())],
        cached_models: 2,
        scratch: dir.path().join("scratch"),
        allow_prefixes: vec![allowed.display().to_string()],
        tokens: Tokens::parse(TOKEN),
        tls: None,
        max_request_bytes: 64 << 20,
        max_upload_bytes: 1 << 30,
        upload_ttl: std::time::Duration::from_secs(3600),
        jobs: JobLimits {
            max_jobs: 2,
            memory_bytes: 4 << 30,
            finished_kept: 16,
        },
        default_epochs: 20,
        device: Default::default(),
    };
    let service = tessera_serve::service(&serve).unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = runtime.spawn(async move {
        tessera_serve::serve(listener, service, &serve, async {
            let _ = stopped.await;
        })
        .await
    });

    let output = Command::new(&python)
        .arg(tessera_tests::script("client_map.py"))
        .args([
            address.as_str(),
            TOKEN,
            &query,
            &reference_store,
            &allowed_query,
        ])
        .env("PYTHONPATH", client_dir())
        .output()
        .unwrap();
    let _ = stop.send(());
    runtime.block_on(server).unwrap().unwrap();
    assert!(
        output.status.success(),
        "client_map.py failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8(output.stdout).unwrap();
    let r: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(
        (r["n_obs"].as_u64(), r["n_latent"].as_u64()),
        (Some(500), Some(10)),
        "{r}"
    );
    assert!(r["accuracy"].as_f64().unwrap() > 0.85, "{r}");
    assert_eq!(r["progress_lines"], 3, "{r}");
    assert_eq!(r["progress_carriage_returns"], 0, "{r}");
    assert_eq!(r["future_warnings"], serde_json::json!([]), "{r}");
    assert!(r["url_accuracy"].as_f64().unwrap() > 0.85, "{r}");
    assert!(r["classifier_accuracy"].as_f64().unwrap() > 0.85, "{r}");
    assert_eq!(r["url_cells"].as_u64(), Some(400));
    assert!(r["encode_agreement"].as_f64().unwrap() > 0.9, "{r}");
    assert_eq!(r["encoded_shape"], serde_json::json!([300, 10]));
    for flag in [
        "uncertainty_in_range",
        "input_untouched",
        "same_cells",
        "overwrite_refused",
    ] {
        assert_eq!(r[flag], serde_json::json!(true), "{flag}: {r}");
    }
    assert_eq!(r["models"], serde_json::json!(["sim"]));
    assert_eq!(r["forbidden"], "PERMISSION_DENIED");
    assert_eq!(r["wrong_token"], "UNAUTHENTICATED");
    // Uploads are gone once their jobs ended.
    assert_eq!(
        std::fs::read_dir(dir.path().join("scratch"))
            .unwrap()
            .count(),
        0
    );
}
