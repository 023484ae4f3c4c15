//! Query mapping onto a trained reference: a simulated world split by batch into a reference
//! (batches 0 and 1) and a query (batch 2, new to the reference).
#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod common;

use std::path::Path;

use tessera_data::{AnnData, Column, SimConfig, simulate};
use tessera_models::surgery::Unfreeze;
use tessera_worker::fit;
use tessera_worker::query::{QueryRequest, map_query};

fn world(path: &Path, cells: u64, only: Vec<usize>) -> String {
    let path = path.display().to_string();
    simulate(&path, &SimConfig { n_cells: cells, n_genes: 200, n_types: 5, n_batches: 3, only_batches: Some(only), seed: 4, ..SimConfig::default() }, |_| {}).unwrap();
    path
}

fn request(model: &Path, data: &str) -> QueryRequest {
    QueryRequest { model: model.to_path_buf(), data: data.into(), batch_key: None, epochs: 20, unfreeze: Unfreeze::default(), neighbours: 30, embedding_key: "X_tessera".into(), label_key_out: "tessera_label".into(), overwrite: false, seed: 0 }
}

/// A reference trained on batches 0 and 1 with covariates in the encoder (scArches' setting).
fn reference(dir: &Path) -> std::path::PathBuf {
    let data = world(&dir.join("reference.zarr"), 1200, vec![0, 1]);
    let model = dir.join("model");
    let mut opts = common::options(&data, &model, 40);
    opts.batch_key = Some("batch".into());
    opts.config.model.encode_covariates = true;
    fit(&opts, |_| {}).unwrap();
    model
}

#[test]
fn a_query_with_a_new_batch_is_mapped_and_labelled() {
    let dir = tempfile::tempdir().unwrap();
    let model = reference(dir.path());
    let query = world(&dir.path().join("query.zarr"), 500, vec![2]);
    let report = map_query(&request(&model, &query), |_| {}).unwrap();
    assert_eq!(report.new_batches, ["batch2"]);
    assert!(report.known_batches.is_empty());
    assert_eq!((report.modalities[0].matched, report.modalities[0].zero_filled, report.modalities[0].cells), (200, 0, 500));
    assert!(report.trained_parameters > 0 && report.final_loss.is_some_and(f64::is_finite), "{report:?}");
    let accuracy = report.label_accuracy.unwrap();
    assert!(accuracy > 0.85, "label transfer accuracy {accuracy}");
    assert!(report.mean_uncertainty.unwrap() < 0.3, "{report:?}");

    let adata = AnnData::open(&query).unwrap();
    let (embedding, d) = adata.obsm("X_tessera").unwrap();
    assert_eq!((d, embedding.len()), (10, 5000));
    let Column::Categorical { codes, categories, .. } = adata.obs_column("tessera_label").unwrap() else { panic!("labels are categorical") };
    assert_eq!(codes.len(), 500);
    assert_eq!(categories.len(), 5);
    let Column::Float(uncertainty) = adata.obs_column("tessera_label_uncertainty").unwrap() else { panic!("uncertainty is a float column") };
    assert!(uncertainty.iter().all(|u| (0.0..=1.0).contains(u)));

    // Written once: a second mapping names what it would overwrite.
    let again = map_query(&request(&model, &query), |_| {}).unwrap_err().to_string();
    assert!(again.contains("obsm/X_tessera") && again.contains("already exists"), "{again}");
}

#[test]
fn bad_models_and_foreign_queries_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let query = world(&dir.path().join("query.zarr"), 100, vec![2]);
    let e = map_query(&request(&dir.path().join("nowhere"), &query), |_| {}).unwrap_err().to_string();
    assert!(e.contains("nowhere") && e.contains("config.json"), "{e}");
    let model = reference(dir.path());
    std::fs::remove_file(model.join("reference.safetensors")).unwrap();
    let e = map_query(&request(&model, &query), |_| {}).unwrap_err().to_string();
    assert!(e.contains("reference.safetensors") && e.contains("train again"), "{e}");
}
