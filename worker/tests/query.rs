//! Query mapping onto a trained reference: a simulated world split by batch into a reference
//! (batches 0 and 1) and a query (batch 2, new to the reference).
#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod common;

use std::ops::ControlFlow;
use std::path::Path;

use tessera_data::{AnnData, Column, SimConfig, Store, StoreWriter, simulate};
use tessera_models::surgery::Unfreeze;
use tessera_worker::fit;
use tessera_worker::query::{
    Cells, CellsModality, Outputs, QueryError, QueryOutput, QueryRequest, QueryStage,
    ReferenceModel, map_query,
};

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

fn request(data: &str) -> QueryRequest {
    let write = Some(Outputs {
        embedding_key: "X_tessera".into(),
        label_key: "tessera_label".into(),
        overwrite: false,
    });
    QueryRequest {
        data: data.into(),
        batch_key: None,
        epochs: 20,
        unfreeze: Unfreeze::default(),
        neighbours: 30,
        write,
        seed: 0,
        device: Default::default(),
        model_out: None,
        layer: None,
    }
}

fn map(model: &Path, req: &QueryRequest) -> Result<QueryOutput, QueryError> {
    map_query(
        &ReferenceModel::open(&model.display().to_string())?,
        req,
        |_| ControlFlow::Continue(()),
    )
}

/// A reference trained on batches 0 and 1 with covariates in the encoder (scArches' setting).
fn reference(dir: &Path) -> std::path::PathBuf {
    let data = world(&dir.join("reference.zarr"), 1200, vec![0, 1]);
    let model = dir.join("model");
    let mut opts = common::options(&data, &model, 40);
    opts.batch_key = Some("batch".into());
    opts.config.model.encode_covariates = true;
    // With a label classifier: its predictions are the second label source.
    opts.config.model.classifier_weight = 1.0;
    fit(&opts, |_| {}).unwrap();
    model
}

#[test]
fn a_query_with_a_new_batch_is_mapped_and_labelled() {
    let dir = tempfile::tempdir().unwrap();
    let model = reference(dir.path());
    let query = world(&dir.path().join("query.zarr"), 500, vec![2]);
    let report = map(&model, &request(&query)).unwrap().report;
    assert_eq!(report.new_batches, ["batch2"]);
    assert!(report.known_batches.is_empty());
    assert_eq!(
        (
            report.modalities[0].matched,
            report.modalities[0].zero_filled,
            report.modalities[0].cells
        ),
        (200, 0, 500)
    );
    assert!(
        report.trained_parameters > 0 && report.final_loss.is_some_and(f64::is_finite),
        "{report:?}"
    );
    let accuracy = report.label_accuracy.unwrap();
    assert!(accuracy > 0.85, "label transfer accuracy {accuracy}");
    assert!(report.mean_uncertainty.unwrap() < 0.3, "{report:?}");
    let classifier = report.classifier_accuracy.unwrap();
    assert!(
        classifier > 0.85,
        "the reference classifier's accuracy on the query {classifier}"
    );

    let adata = AnnData::open(&query).unwrap();
    let (embedding, d) = adata.obsm("X_tessera").unwrap();
    assert_eq!((d, embedding.len()), (10, 5000));
    let Column::Categorical {
        codes, categories, ..
    } = adata.obs_column("tessera_label").unwrap()
    else {
        panic!("labels are categorical")
    };
    assert_eq!(codes.len(), 500);
    assert_eq!(categories.len(), 5);
    let Column::Float(uncertainty) = adata.obs_column("tessera_label_uncertainty").unwrap() else {
        panic!("uncertainty is a float column")
    };
    let Column::Categorical {
        codes: predicted, ..
    } = adata.obs_column("tessera_label_classifier").unwrap()
    else {
        panic!("classifier labels are categorical")
    };
    assert_eq!(predicted.len(), 500);
    assert!(uncertainty.iter().all(|u| (0.0..=1.0).contains(u)));

    // Reference and query together: the new batch mixes into the reference's cell types.
    let reference =
        tessera_worker::reference::Reference::read(&model.join("reference.safetensors")).unwrap();
    let ref_batches = match AnnData::open(&dir.path().join("reference.zarr").display().to_string())
        .unwrap()
        .obs_column("batch")
        .unwrap()
    {
        Column::Categorical { codes, .. } => codes,
        other => panic!("batch is {}", other.kind()),
    };
    let Column::Categorical {
        codes: query_types, ..
    } = adata.obs_column("cell_type").unwrap()
    else {
        panic!("cell_type is categorical")
    };
    let both = [reference.latent.clone(), embedding.clone()].concat();
    let labels: Vec<u32> = reference
        .labels
        .iter()
        .chain(&query_types)
        .map(|&c| c as u32)
        .collect();
    let batches: Vec<u32> = ref_batches
        .iter()
        .map(|&b| b as u32)
        .chain(std::iter::repeat_n(2, 500))
        .collect();
    let scores = tessera_metrics::evaluate(
        &both,
        labels.len(),
        10,
        &labels,
        &batches,
        &tessera_metrics::EvalOptions::default(),
    )
    .unwrap();
    // Measured: iLISI 0.73, batch ASW 0.94, NMI 1.0, cLISI 1.0 (scIB's normalised scores).
    assert!(
        scores.ilisi.unwrap() > 0.5 && scores.silhouette_batch.unwrap() > 0.8,
        "batch mixing {scores:?}"
    );
    assert!(
        scores.nmi > 0.9 && scores.clisi.unwrap() > 0.9,
        "cell types kept apart {scores:?}"
    );

    // Written once: a second mapping names what it would overwrite.
    let again = map(&model, &request(&query)).unwrap_err().to_string();
    assert!(
        again.contains("obsm/X_tessera") && again.contains("already exists"),
        "{again}"
    );
}

#[test]
fn bad_models_and_foreign_queries_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let query = world(&dir.path().join("query.zarr"), 100, vec![2]);
    let e = map(&dir.path().join("nowhere"), &request(&query))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("nowhere") && e.contains("no such directory"),
        "{e}"
    );
    let model = reference(dir.path());
    std::fs::remove_file(model.join("reference.safetensors")).unwrap();
    let e = map(&model, &request(&query)).unwrap_err().to_string();
    assert!(
        e.contains("reference.safetensors") && e.contains("train again"),
        "{e}"
    );
}

#[test]
fn genes_missing_from_the_query_are_zero_filled_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let model = reference(dir.path());
    let query = world(&dir.path().join("query.zarr"), 400, vec![2]);
    // The query's last 30 genes carry names the reference never saw: 30 reference genes are
    // missing from the query (zero) and 30 query genes are unknown to the reference (ignored).
    let mut names = AnnData::open(&query).unwrap().var().unwrap().index;
    names
        .iter_mut()
        .skip(170)
        .for_each(|n| *n = format!("novel-{n}"));
    let writer = StoreWriter::existing(Store::open(&query).unwrap()).unwrap();
    writer.dataframe("var", &names, &[]).unwrap();
    writer.consolidate().unwrap();
    let report = map(&model, &request(&query)).unwrap().report;
    let m = &report.modalities[0];
    assert_eq!(
        (m.reference_features, m.matched, m.zero_filled, m.ignored),
        (200, 170, 30, 30)
    );
    let accuracy = report.label_accuracy.unwrap();
    assert!(
        accuracy > 0.8,
        "label transfer accuracy with 15% of the genes missing: {accuracy}"
    );
}

#[test]
fn a_query_without_the_reference_proteins_maps_through_its_rna() {
    let dir = tempfile::tempdir().unwrap();
    let config = |cells: u64, proteins: usize, only: Vec<usize>| SimConfig {
        n_cells: cells,
        n_genes: 200,
        n_proteins: proteins,
        n_types: 5,
        n_batches: 3,
        only_batches: Some(only),
        seed: 4,
        ..SimConfig::default()
    };
    let reference_data = dir.path().join("cite.zarr").display().to_string();
    simulate(&reference_data, &config(1200, 20, vec![0, 1]), |_| {}).unwrap();
    let model = dir.path().join("model");
    let mut opts = common::options(&reference_data, &model, 40);
    opts.batch_key = Some("batch".into());
    opts.config.model.encode_covariates = true;
    // With a label classifier: its predictions are the second label source.
    opts.config.model.classifier_weight = 1.0;
    fit(&opts, |_| {}).unwrap();
    // RNA only: an AnnData; the reference's protein modality is absent in every query cell.
    let query = dir.path().join("rna.zarr").display().to_string();
    simulate(&query, &config(400, 0, vec![2]), |_| {}).unwrap();
    let report = map(&model, &request(&query)).unwrap().report;
    let names: Vec<(&str, usize, usize)> = report
        .modalities
        .iter()
        .map(|m| (m.name.as_str(), m.matched, m.cells))
        .collect();
    assert_eq!(names, [("rna", 200, 400), ("prot", 0, 0)]);
    let accuracy = report.label_accuracy.unwrap();
    assert!(
        accuracy > 0.8,
        "label transfer accuracy from RNA alone: {accuracy}"
    );
}

#[test]
fn a_cancelled_mapping_stops_and_leaves_the_store_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let model = ReferenceModel::open(&reference(dir.path()).display().to_string()).unwrap();
    let query = world(&dir.path().join("query.zarr"), 300, vec![2]);
    let mut seen = Vec::new();
    let e = map_query(&model, &request(&query), |stage| {
        seen.push(stage);
        if matches!(stage, QueryStage::FineTuning { epoch: 1, .. }) {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    })
    .unwrap_err();
    assert!(matches!(e, QueryError::Cancelled), "{e}");
    assert_eq!(seen[0], QueryStage::Surgery);
    // Progress counts cells within each epoch of 20.
    assert!(
        matches!(
            seen[1],
            QueryStage::FineTuning {
                epoch: 0,
                epochs: 20,
                n_cells: 300,
                ..
            }
        ),
        "{:?}",
        seen[1]
    );
    assert!(
        seen.contains(&QueryStage::FineTuning {
            epoch: 0,
            epochs: 20,
            cells: 300,
            n_cells: 300
        }),
        "{seen:?}"
    );
    assert!(
        !AnnData::open(&query)
            .unwrap()
            .keys("obsm")
            .unwrap()
            .contains(&"X_tessera".to_string())
    );

    // Read-only mapping: results come back, nothing is written into the store; the query
    // model is saved when asked.
    let saved = dir.path().join("query_model");
    let output = map_query(
        &model,
        &QueryRequest {
            write: None,
            model_out: Some(saved.display().to_string()),
            ..request(&query)
        },
        |_| ControlFlow::Continue(()),
    )
    .unwrap();
    assert_eq!(
        (output.embedding.len(), output.n_latent, output.labels.len()),
        (3000, 10, 300)
    );
    assert!(output.report.embedding.is_none() && output.report.labels.is_none());
    // The saved query model knows the reference's batches and the query's, and encodes the
    // query's cells where the mapping put them.
    let query_model = ReferenceModel::open(&saved.display().to_string()).unwrap();
    let summary = query_model.summary();
    let mut batches = model.summary().batches;
    batches.extend(output.report.new_batches.iter().cloned());
    assert_eq!(summary.batches, batches);
    assert_eq!(summary.reference_cells, 300);
    let worst = encoding_gap(&query_model, &query, &output.embedding);
    assert!(worst < 1e-4, "the saved query model encodes {worst} away");
    assert!(
        output.report.label_accuracy.unwrap() > 0.85,
        "{:?}",
        output.report
    );
    assert!(
        !AnnData::open(&query)
            .unwrap()
            .keys("obsm")
            .unwrap()
            .contains(&"X_tessera".to_string())
    );
}

/// The largest difference between `model`'s latent means of the first 150 cells of `data`
/// (genes by name) and `expected` (cells x 10, row-major).
fn encoding_gap(model: &ReferenceModel, data: &str, expected: &[f32]) -> f32 {
    let mut encoder = model.encoder(tessera_kernels::backend::Cpu).unwrap();
    let z = model
        .encode(&mut encoder, &reference_cells(data, true))
        .unwrap();
    z.iter()
        .zip(&expected[..1500])
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max)
}

/// The reference store's cells (first 150) as an encode request.
fn reference_cells(data: &str, names: bool) -> Cells {
    let dataset = tessera_data::Dataset::open(data).unwrap();
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
    let var_names = if names {
        AnnData::open(data).unwrap().var().unwrap().index
    } else {
        Vec::new()
    };
    let batches = mb
        .batch
        .iter()
        .map(|&b| loader.batch_categories[b as usize].clone())
        .collect();
    Cells {
        modalities: vec![CellsModality {
            name: mb.modalities[0].name.clone(),
            var_names,
            counts: mb.modalities[0].counts.clone(),
            present: Vec::new(),
        }],
        batches,
        ..Cells::default()
    }
}

/// A burst of concurrent calls leaves at most `max_idle` encoders kept (it kept one per call
/// forever), and the working-memory estimate grows with the cells and the neighbours asked for.
#[test]
fn the_encoder_pool_keeps_few_encoders_and_estimates_its_memory() {
    let dir = tempfile::tempdir().unwrap();
    let model = ReferenceModel::open(&reference(dir.path()).display().to_string()).unwrap();
    let data = dir.path().join("reference.zarr").display().to_string();
    let cells = reference_cells(&data, false);
    let small = model.encode_bytes(&cells, None);
    let parameters = model.parameter_count() as u64;
    assert!(small > parameters * 12, "{small}");
    assert!(model.encode_bytes(&cells, Some(30)) > small + 150 * 30 * 8);
    let pool = tessera_worker::encode::EncoderPool::on(model, tessera_worker::device::Device::Cpu)
        .unwrap()
        .with_max_idle(1);
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| pool.encode(&cells, Some(15)).unwrap());
        }
    });
    assert_eq!(pool.idle(), 1);
}

#[test]
fn encode_reproduces_the_reference_latent_and_refuses_what_it_cannot_encode() {
    let dir = tempfile::tempdir().unwrap();
    let model = ReferenceModel::open(&reference(dir.path()).display().to_string()).unwrap();
    let data = dir.path().join("reference.zarr").display().to_string();
    let summary = model.summary();
    assert_eq!(
        (
            summary.batches.len(),
            summary.labels.len(),
            summary.n_latent,
            summary.reference_cells
        ),
        (2, 5, 10, 1200)
    );
    let mut encoder = model.encoder(tessera_kernels::backend::Cpu).unwrap();
    for names in [false, true] {
        let z = model
            .encode(&mut encoder, &reference_cells(&data, names))
            .unwrap();
        let worst = z
            .iter()
            .zip(&model.reference.latent[..1500])
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            worst < 1e-4,
            "encode differs from the reference latent by {worst}"
        );
    }
    // Genes in another order, by name: the same latent.
    let mut shuffled = reference_cells(&data, true);
    let m = &mut shuffled.modalities[0];
    let g = m.counts.n_cols;
    let order: Vec<usize> = (0..g).rev().collect();
    m.var_names = order.iter().map(|&j| m.var_names[j].clone()).collect();
    let mut dense = vec![0f32; m.counts.n_rows * g];
    for r in 0..m.counts.n_rows {
        let (idx, val) = m.counts.row(r);
        for (&j, &v) in idx.iter().zip(val) {
            dense[r * g + (g - 1 - j as usize)] = v;
        }
    }
    m.counts = tessera_data::Csr::from_dense(m.counts.n_rows, g, &dense);
    let z = model.encode(&mut encoder, &shuffled).unwrap();
    let worst = z
        .iter()
        .zip(&model.reference.latent[..1500])
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1e-4, "reordered genes change the latent by {worst}");

    let mut unknown = reference_cells(&data, false);
    unknown.batches[3] = "batch7".into();
    let e = model
        .encode(&mut encoder, &unknown)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("\"batch7\"") && e.contains("batch0, batch1"),
        "{e}"
    );
    let mut few = reference_cells(&data, false);
    few.batches.pop();
    let e = model.encode(&mut encoder, &few).unwrap_err().to_string();
    assert!(e.contains("149 batch names for 150 cells"), "{e}");
    let mut atac = reference_cells(&data, false);
    atac.modalities[0].name = "atac".into();
    let e = model.encode(&mut encoder, &atac).unwrap_err().to_string();
    assert!(e.contains("unknown modality \"atac\""), "{e}");
    let mut narrow = reference_cells(&data, false);
    narrow.modalities[0].counts.n_cols = 150;
    let e = model.encode(&mut encoder, &narrow).unwrap_err().to_string();
    assert!(
        e.contains("150 columns and no feature names") && e.contains("200 features"),
        "{e}"
    );
}

/// A trained model's tensors written back as an imported model (what the Python package does
/// with scvi-tools' weights) embed the reference cells as the original does; tensors the model
/// lacks, misses or shapes differently are refused by name.
#[test]
fn an_imported_model_embeds_like_the_original_and_refuses_foreign_tensors() {
    use tessera_worker::imported::{NamedTensor, set_reference_latent, write_model};
    use tessera_worker::reference::{REFERENCE_FILE, Reference};
    let dir = tempfile::tempdir().unwrap();
    let trained = reference(dir.path());
    let data = dir.path().join("reference.zarr").display().to_string();
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(trained.join("config.json")).unwrap()).unwrap();
    let bytes = std::fs::read(trained.join("model.safetensors")).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let tensors: Vec<NamedTensor> = file
        .tensors()
        .into_iter()
        .map(|(name, t)| {
            let values = t
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            (name, t.shape().to_vec(), values)
        })
        .collect();
    let original = Reference::read(&trained.join(REFERENCE_FILE)).unwrap();
    let empty = Reference {
        latent: Vec::new(),
        labels: Vec::new(),
        ..original.clone()
    };
    let folder = dir.path().join("imported");
    let write = |tensors: &[NamedTensor]| {
        std::fs::create_dir_all(&folder).unwrap();
        write_model(&folder, &record, tensors, &empty).map_err(|e| e.to_string())
    };
    write(&tensors).unwrap();

    let model = ReferenceModel::open(&folder.display().to_string()).unwrap();
    let worst = encoding_gap(&model, &data, &original.latent);
    assert!(
        worst < 1e-4,
        "the imported model's latent differs by {worst}"
    );
    set_reference_latent(&folder, original.latent.clone(), original.labels.clone()).unwrap();
    assert_eq!(
        Reference::read(&folder.join(REFERENCE_FILE)).unwrap(),
        original
    );
    let e = set_reference_latent(&folder, vec![0.0; 7], Vec::new()).unwrap_err();
    assert!(e.to_string().contains("7 latent values"), "{e}");

    let mut extra = tensors.clone();
    extra.push(("decoder.px_r_decoder.w".into(), vec![2], vec![0.0, 1.0]));
    let e = write(&extra).unwrap_err();
    assert!(
        e.contains("\"decoder.px_r_decoder.w\" is not part of the model"),
        "{e}"
    );
    let missing: Vec<NamedTensor> = tensors
        .iter()
        .filter(|t| t.0 != "encoder.mean.b")
        .cloned()
        .collect();
    let e = write(&missing).unwrap_err();
    assert!(e.contains("encoder.mean.b"), "{e}");
    let mut misshapen = tensors.clone();
    let t = misshapen.iter_mut().find(|t| t.0 == "log_theta").unwrap();
    t.1 = vec![t.2.len() / 2, 2];
    let e = write(&misshapen).unwrap_err();
    assert!(e.contains("log_theta"), "{e}");
}
