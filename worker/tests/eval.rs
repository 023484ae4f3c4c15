//! `evaluate_store` end to end on a simulated store: the ground-truth latent scores as
//! integrated, a batch-confounded copy of it scores worse on exactly the batch metrics, and bad
//! keys are refused with errors that name them.
#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use tessera_data::{AnnData, SimConfig};
use tessera_metrics::EvalOptions;
use tessera_worker::{EvalError, EvalRequest, evaluate_store, write_evaluation};

fn simulated(dir: &std::path::Path) -> String {
    let location = dir.join("sim.zarr").display().to_string();
    let config = SimConfig {
        n_cells: 900,
        n_genes: 50,
        n_types: 5,
        n_batches: 3,
        ..SimConfig::default()
    };
    tessera_data::simulate(&location, &config, |_| {}).unwrap();
    location
}

fn request(data: &str, key: &str) -> EvalRequest {
    EvalRequest {
        data: data.into(),
        modality: None,
        embedding_key: key.into(),
        label_key: None,
        batch_key: None,
        max_cells: None,
        options: EvalOptions::default(),
    }
}

#[test]
fn truth_scores_integrated_and_a_batch_shift_is_penalised() {
    let dir = tempfile::tempdir().unwrap();
    let data = simulated(dir.path());
    let adata = AnnData::open(&data).unwrap();
    let (truth, d) = adata.obsm("X_true_latent").unwrap();
    let (batches, _) = adata.obs_column("batch").unwrap().codes().unwrap();
    // The same latent with each batch moved 6 units along its own axis.
    let shifted: Vec<f32> = truth
        .chunks_exact(d)
        .zip(&batches)
        .flat_map(|(z, &b)| {
            z.iter()
                .enumerate()
                .map(move |(k, &v)| if k == b as usize { v + 6.0 } else { v })
        })
        .collect();
    adata.write_obsm("X_shifted", &shifted, d, false).unwrap();

    let truth = evaluate_store(&request(&data, "X_true_latent")).unwrap();
    assert_eq!(
        (truth.label_key.as_str(), truth.batch_key.as_deref()),
        ("cell_type", Some("batch")),
        "default keys"
    );
    assert_eq!(
        (
            truth.n_evaluated,
            truth.scores.n_labels,
            truth.scores.n_batches
        ),
        (900, 5, 3)
    );
    let s = &truth.scores;
    assert!(
        s.nmi > 0.9 && s.ari > 0.9 && s.silhouette_label > 0.7 && s.clisi.unwrap() > 0.95,
        "{s:?}"
    );
    assert!(
        s.ilisi.unwrap() > 0.7 && s.silhouette_batch.unwrap() > 0.85 && s.graph_connectivity > 0.9,
        "{s:?}"
    );

    let shifted = evaluate_store(&request(&data, "X_shifted")).unwrap().scores;
    assert!(shifted.ilisi.unwrap() < 0.2, "{shifted:?}");
    assert!(
        shifted.silhouette_batch.unwrap() < s.silhouette_batch.unwrap() - 0.1,
        "{shifted:?}"
    );
    assert!(
        shifted.total.unwrap() < s.total.unwrap() - 0.05,
        "{shifted:?} vs {s:?}"
    );

    // Without a batch column the batch metrics are undefined, not zero.
    let no_batch = evaluate_store(&EvalRequest {
        batch_key: Some("cell_type".into()),
        ..request(&data, "X_true_latent")
    })
    .unwrap();
    assert_eq!(
        no_batch.scores.silhouette_batch, None,
        "every label sits in one 'batch'"
    );

    // Records: JSON with every field, CSV in the Benchmarker's metric/type/value layout.
    let out = dir.path().join("out");
    let [json, csv] = write_evaluation(&out, &truth).unwrap();
    let parsed: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap();
    assert_eq!(parsed["scores"]["nmi"].as_f64().unwrap(), s.nmi);
    let table = std::fs::read_to_string(csv).unwrap();
    assert_eq!(table.lines().count(), 11);
    assert!(
        table.contains(&format!("Total,Aggregate score,{}", s.total.unwrap())),
        "{table}"
    );
}

#[test]
fn subsample_is_seeded_and_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let data = simulated(dir.path());
    let req = EvalRequest {
        max_cells: Some(300),
        ..request(&data, "X_true_latent")
    };
    let a = evaluate_store(&req).unwrap();
    assert!(a.subsampled);
    assert_eq!((a.n_evaluated, a.n_obs), (300, 900));
    assert_eq!(a.scores, evaluate_store(&req).unwrap().scores);
    let other = EvalRequest {
        options: EvalOptions {
            seed: 1,
            ..EvalOptions::default()
        },
        ..req
    };
    assert_ne!(a.scores, evaluate_store(&other).unwrap().scores);
}

#[test]
fn bad_keys_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let data = simulated(dir.path());
    let err = evaluate_store(&request(&data, "X_missing"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("obsm/X_missing"), "{err}");
    let err = evaluate_store(&EvalRequest {
        label_key: Some("nope".into()),
        ..request(&data, "X_true_latent")
    })
    .unwrap_err()
    .to_string();
    assert!(err.contains("obs/nope"), "{err}");
    let err = evaluate_store(&EvalRequest {
        label_key: Some("n_counts".into()),
        ..request(&data, "X_true_latent")
    })
    .unwrap_err();
    assert!(
        matches!(err, EvalError::Input { .. }) && err.to_string().contains("\"n_counts\" is float"),
        "{err}"
    );
    let err = evaluate_store(&request(
        &dir.path().join("absent.zarr").display().to_string(),
        "X",
    ))
    .unwrap_err()
    .to_string();
    assert!(err.contains("absent.zarr"), "{err}");
}

/// Replaces `obs/batch/codes` of a Zarr v2 store by an uncompressed int32 array of `codes`.
fn batch_codes(store: &std::path::Path, codes: &[i32]) {
    let dir = store.join("obs/batch/codes");
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::create_dir_all(&dir).unwrap();
    let meta = serde_json::json!({"zarr_format": 2, "shape": [codes.len()], "chunks": [codes.len()],
        "dtype": "<i4", "compressor": null, "fill_value": 0, "order": "C", "filters": null});
    std::fs::write(dir.join(".zarray"), meta.to_string()).unwrap();
    let bytes: Vec<u8> = codes.iter().flat_map(|c| c.to_le_bytes()).collect();
    std::fs::write(dir.join("0"), bytes).unwrap();
}

#[test]
fn a_broken_default_batch_column_is_an_error_not_a_missing_column() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v2.zarr");
    let config = SimConfig {
        n_cells: 300,
        n_genes: 50,
        version: tessera_data::ZarrVersion::V2,
        ..SimConfig::default()
    };
    tessera_data::simulate(path.to_str().unwrap(), &config, |_| {}).unwrap();
    let data = path.to_str().unwrap();
    // Codes for 30 of the 300 cells: named, where eval used to index past their end.
    batch_codes(&path, &[0; 30]);
    let err = evaluate_store(&request(data, "X_true_latent"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("obs/batch") && err.contains("n_obs = 300"),
        "{err}"
    );
    // Codes out of range: named, where eval used to go on with "0 batches".
    let mut codes = vec![0; 300];
    codes[7] = 99;
    codes[8] = -7;
    batch_codes(&path, &codes);
    let err = evaluate_store(&request(data, "X_true_latent"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("obs/batch/codes") && err.contains("out of range"),
        "{err}"
    );
}
