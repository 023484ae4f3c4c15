//! Stores written by Python anndata 0.13 / mudata 0.4 (shared/data/fixtures, with truth.json
//! holding the values they contain) read back exactly.
#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod common;
use common::shared_data;

use serde_json::Value;
use tessera_data::{AnnData, Column, Dataset, MatrixFormat, MuData, ZarrVersion};

fn fixture(name: &str) -> String {
    shared_data()
        .join("fixtures")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

fn truth() -> Value {
    let text =
        std::fs::read_to_string(shared_data().join("fixtures/truth.json")).expect("truth.json");
    serde_json::from_str(&text).expect("truth.json parses")
}

fn check_x_against_truth(adata: &AnnData, format: MatrixFormat) {
    let t = truth();
    let x = adata.x().unwrap();
    assert_eq!(x.format, format);
    assert_eq!(adata.n_obs(), t["n_obs"].as_u64().unwrap());
    assert_eq!(adata.n_vars(), t["n_vars"].as_u64().unwrap());
    let all = x.read_rows(&adata.store, 0..adata.n_obs()).unwrap();
    assert_eq!(all.nnz() as u64, t["nnz"].as_u64().unwrap());
    let total: f64 = all.data.iter().map(|&v| f64::from(v)).sum();
    assert_eq!(total, t["x_sum"].as_f64().unwrap());
    let expected: Vec<f32> = t["row_sums_first10"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    assert_eq!(&all.row_sums()[..10], &expected[..]);
    // A middle range equals the same rows of the full read.
    let part = x.read_rows(&adata.store, 123..321).unwrap();
    let rows: Vec<usize> = (123..321).collect();
    assert_eq!(part, all.select_rows(&rows));
}

fn check_obs_against_truth(adata: &AnnData) {
    let t = truth();
    let obs = adata.obs().unwrap();
    assert_eq!(obs.index[..3], ["c0", "c1", "c2"]);
    let names: Vec<&str> = obs.columns.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "batch",
            "cell_type",
            "donor",
            "n_counts",
            "n_genes",
            "keep",
            "age"
        ]
    );
    let counts = |col: &str| -> Vec<(String, usize)> {
        let mut c = obs.column(col).unwrap().value_counts().unwrap();
        c.sort();
        c
    };
    let expect = |key: &str| -> Vec<(String, usize)> {
        let mut c: Vec<(String, usize)> = t[key]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_u64().unwrap() as usize))
            .collect();
        c.sort();
        c
    };
    assert_eq!(counts("batch"), expect("batch_counts"));
    assert_eq!(counts("cell_type"), expect("cell_type_counts"));
    assert_eq!(
        obs.column("cell_type").unwrap().missing() as u64,
        t["cell_type_missing"].as_u64().unwrap()
    );
    let age = obs.column("age").unwrap();
    assert!(
        matches!(age, Column::Int(_)),
        "age is a nullable integer: {}",
        age.kind()
    );
    assert_eq!(age.missing() as u64, t["age_missing"].as_u64().unwrap());
    match obs.column("n_counts").unwrap() {
        Column::Float(v) => {
            let first: Vec<f64> = t["row_sums_first10"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect();
            assert_eq!(&v[..10], &first[..]);
        }
        other => panic!("n_counts should be float, got {}", other.kind()),
    }
    assert!(matches!(obs.column("keep").unwrap(), Column::Bool(_)));
    assert!(matches!(obs.column("n_genes").unwrap(), Column::Int(_)));
    let var = adata.var().unwrap();
    assert_eq!(var.index[199], "g199");
    assert!(matches!(
        var.column("highly_variable").unwrap(),
        Column::Bool(_)
    ));
}

#[test]
fn anndata_013_zarr_v3_sharded_csr() {
    let adata = AnnData::open(&fixture("ad013_v3.zarr")).unwrap();
    assert_eq!(adata.version, ZarrVersion::V3);
    check_x_against_truth(&adata, MatrixFormat::Csr);
    check_obs_against_truth(&adata);
    let x = adata.x().unwrap();
    assert!(
        x.inner_chunk_shape.is_some(),
        "anndata 0.13 writes sharded arrays"
    );
    let (pca, k) = adata.obsm("X_pca").unwrap();
    assert_eq!((pca.len(), k), (500 * 8, 8));
    assert_eq!(adata.keys("layers").unwrap(), ["counts"]);
    let counts = adata.layer("counts").unwrap();
    assert_eq!(counts.dtype, "int32");
    let layer = counts.read_rows(&adata.store, 0..500).unwrap();
    assert_eq!(
        layer,
        x.read_rows(&adata.store, 0..500).unwrap(),
        "layer holds X as int32"
    );
}

#[test]
fn anndata_013_dense_x() {
    let adata = AnnData::open(&fixture("ad013_v3_dense.zarr")).unwrap();
    check_x_against_truth(&adata, MatrixFormat::Dense);
}

#[test]
fn anndata_013_zarr_v2_csc() {
    let adata = AnnData::open(&fixture("ad013_v2_csc.zarr")).unwrap();
    assert_eq!(adata.version, ZarrVersion::V2);
    check_x_against_truth(&adata, MatrixFormat::Csc);
    check_obs_against_truth(&adata);
}

#[test]
fn mudata_with_missing_modality() {
    let t = truth();
    let mdata = MuData::open(&fixture("mu013_v3.zarr")).unwrap();
    assert_eq!(mdata.n_obs(), 500);
    let names: Vec<&str> = mdata.modalities.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["rna", "prot"]);
    let (p, prot) = mdata.modality("prot").unwrap();
    assert_eq!(prot.n_obs(), t["mudata"]["prot_cells"].as_u64().unwrap());
    assert_eq!(
        prot.n_vars(),
        t["mudata"]["prot_features"].as_u64().unwrap()
    );
    let present = mdata.presence(p);
    assert_eq!(present.iter().filter(|&&b| b).count(), 380);
    // obsmap is 1-based: the first present cells map to prot rows 1, 2, ... and carry the
    // names truth.json lists.
    let first: Vec<String> = mdata
        .obs_names
        .iter()
        .zip(&present)
        .filter(|(_, p)| **p)
        .map(|(n, _)| n.clone())
        .take(5)
        .collect();
    let expected: Vec<String> = t["mudata"]["prot_first_cells"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert_eq!(first, expected);
    assert_eq!(prot.obs_names[..5], expected[..]);
    let err = mdata.modality("atac").unwrap_err().to_string();
    assert!(
        err.contains("mod/atac") && err.contains("rna, prot"),
        "{err}"
    );
    assert!(matches!(
        Dataset::open(&fixture("mu013_v3.zarr")).unwrap(),
        Dataset::MuData(_)
    ));
}

#[test]
fn real_pbmc_counts() {
    let path = shared_data().join("pbmc68k_counts.zarr");
    let adata = AnnData::open(path.to_str().unwrap()).unwrap();
    assert_eq!((adata.n_obs(), adata.n_vars()), (700, 765));
    let ct = adata.obs_column("cell_type").unwrap();
    let counts = ct.value_counts().unwrap();
    assert_eq!(counts.len(), 10);
    assert!(
        counts.contains(&("Dendritic".to_string(), 240)),
        "{counts:?}"
    );
    let x = adata.x().unwrap().read_rows(&adata.store, 0..700).unwrap();
    assert!(
        x.data.iter().all(|v| v.fract() == 0.0 && *v > 0.0),
        "integer UMI counts"
    );
}
