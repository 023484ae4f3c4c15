//! `tessera map` as a user runs it: train a reference, map a query with a new batch onto it.
#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod common;

use std::path::Path;

use common::{copy_dir, ok, tessera};

fn path(dir: &Path, name: &str) -> String {
    dir.join(name).display().to_string()
}

#[test]
fn map_a_query_onto_a_trained_reference() {
    let dir = tempfile::tempdir().unwrap();
    let (reference, query, model, out) = (path(dir.path(), "ref.zarr"), path(dir.path(), "query.zarr"), path(dir.path(), "model"), path(dir.path(), "out"));
    ok(&tessera(&["simulate", &reference, "--cells", "800", "--genes", "150", "--types", "4", "--batches", "3", "--only-batches", "0,1", "--seed", "2"]));
    ok(&tessera(&["simulate", &query, "--cells", "300", "--genes", "150", "--types", "4", "--batches", "3", "--only-batches", "2", "--seed", "2"]));
    ok(&tessera(&["train", "--data", &reference, "--batch-key", "batch", "--label-key", "cell_type", "--epochs", "30", "--out", &model]));
    let printed = ok(&tessera(&["map", "--model", &model, "--data", &query, "--epochs", "10", "--neighbours", "20", "--out", &out]));
    assert!(printed.contains("1 new (batch2)") && printed.contains("150 of 150 reference features"), "{printed}");
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(Path::new(&out).join("map.json")).unwrap()).unwrap();
    assert!(report["label_accuracy"].as_f64().unwrap() > 0.85, "{report}");
    // A store whose genes the reference never saw cannot be mapped, and says so.
    // (A private copy: a mapping writes into its query store.)
    let foreign = path(dir.path(), "foreign.zarr");
    copy_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/fixtures/ad013_v3.zarr"), Path::new(&foreign));
    let refused = tessera(&["map", "--model", &model, "--data", &foreign, "--batch-key", "cell_type", "--out", &out]);
    assert!(!refused.status.success());
    let e = String::from_utf8_lossy(&refused.stderr);
    assert!(e.contains("no feature of the reference's modalities"), "{e}");
}
