//! Query mapping onto a trained reference: a simulated world split by batch into a reference
//! (batches 0 and 1) and a query (batch 2, new to the reference).
#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod common;

use std::path::Path;

use tessera_data::{AnnData, Column, SimConfig, Store, StoreWriter, simulate};
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

    // Reference and query together: the new batch mixes into the reference's cell types.
    let reference = tessera_worker::reference::Reference::read(&model.join("reference.safetensors")).unwrap();
    let ref_batches = match AnnData::open(&dir.path().join("reference.zarr").display().to_string()).unwrap().obs_column("batch").unwrap() {
        Column::Categorical { codes, .. } => codes,
        other => panic!("batch is {}", other.kind()),
    };
    let Column::Categorical { codes: query_types, .. } = adata.obs_column("cell_type").unwrap() else { panic!("cell_type is categorical") };
    let both = [reference.latent.clone(), embedding.clone()].concat();
    let labels: Vec<u32> = reference.labels.iter().chain(&query_types).map(|&c| c as u32).collect();
    let batches: Vec<u32> = ref_batches.iter().map(|&b| b as u32).chain(std::iter::repeat_n(2, 500)).collect();
    let scores = tessera_metrics::evaluate(&both, labels.len(), 10, &labels, &batches, &tessera_metrics::EvalOptions::default()).unwrap();
    // Measured: iLISI 0.73, batch ASW 0.94, NMI 1.0, cLISI 1.0 (scIB's normalised scores).
    assert!(scores.ilisi.unwrap() > 0.5 && scores.silhouette_batch.unwrap() > 0.8, "batch mixing {scores:?}");
    assert!(scores.nmi > 0.9 && scores.clisi.unwrap() > 0.9, "cell types kept apart {scores:?}");

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

#[test]
fn genes_missing_from_the_query_are_zero_filled_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let model = reference(dir.path());
    let query = world(&dir.path().join("query.zarr"), 400, vec![2]);
    // The query's last 30 genes carry names the reference never saw: 30 reference genes are
    // missing from the query (zero) and 30 query genes are unknown to the reference (ignored).
    let mut names = AnnData::open(&query).unwrap().var().unwrap().index;
    names.iter_mut().skip(170).for_each(|n| *n = format!("novel-{n}"));
    let writer = StoreWriter::existing(Store::open(&query).unwrap()).unwrap();
    writer.dataframe("var", &names, &[]).unwrap();
    writer.consolidate().unwrap();
    let report = map_query(&request(&model, &query), |_| {}).unwrap();
    let m = &report.modalities[0];
    assert_eq!((m.reference_features, m.matched, m.zero_filled, m.ignored), (200, 170, 30, 30));
    let accuracy = report.label_accuracy.unwrap();
    assert!(accuracy > 0.8, "label transfer accuracy with 15% of the genes missing: {accuracy}");
}

#[test]
fn a_query_without_the_reference_proteins_maps_through_its_rna() {
    let dir = tempfile::tempdir().unwrap();
    let config = |cells: u64, proteins: usize, only: Vec<usize>| SimConfig { n_cells: cells, n_genes: 200, n_proteins: proteins, n_types: 5, n_batches: 3, only_batches: Some(only), seed: 4, ..SimConfig::default() };
    let reference_data = dir.path().join("cite.zarr").display().to_string();
    simulate(&reference_data, &config(1200, 20, vec![0, 1]), |_| {}).unwrap();
    let model = dir.path().join("model");
    let mut opts = common::options(&reference_data, &model, 40);
    opts.batch_key = Some("batch".into());
    opts.config.model.encode_covariates = true;
    fit(&opts, |_| {}).unwrap();
    // RNA only: an AnnData; the reference's protein modality is absent in every query cell.
    let query = dir.path().join("rna.zarr").display().to_string();
    simulate(&query, &config(400, 0, vec![2]), |_| {}).unwrap();
    let report = map_query(&request(&model, &query), |_| {}).unwrap();
    let names: Vec<(&str, usize, usize)> = report.modalities.iter().map(|m| (m.name.as_str(), m.matched, m.cells)).collect();
    assert_eq!(names, [("rna", 200, 400), ("prot", 0, 0)]);
    let accuracy = report.label_accuracy.unwrap();
    assert!(accuracy > 0.8, "label transfer accuracy from RNA alone: {accuracy}");
}
