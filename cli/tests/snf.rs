//! `tessera snf` as a user runs it: views from modalities and obsm, cells missing from views,
//! the network in obsp and the clusters in obs, refusals that name what is wrong.
#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod common;

use std::path::Path;

use common::{copy_dir, failed, ok, tessera};
use serde_json::Value;
use tessera_data::{AnnData, Column, MuData};

/// A 600-cell mosaic MuData (RNA for all, protein and accessibility each missing in 30%).
fn mosaic(dir: &Path) -> String {
    let store = dir.join("mosaic.zarr").display().to_string();
    ok(&tessera(&[
        "simulate",
        &store,
        "--cells",
        "600",
        "--genes",
        "300",
        "--proteins",
        "20",
        "--peaks",
        "200",
        "--batches",
        "2",
        "--missing",
        "0.3",
        "--seed",
        "3",
    ]));
    store
}

fn report(out: &Path, name: &str) -> Value {
    serde_json::from_slice(&std::fs::read(out.join(format!("{name}.json"))).unwrap()).unwrap()
}

#[test]
fn snf_over_modalities_with_missing_cells_recovers_the_cell_types() {
    let dir = tempfile::tempdir().unwrap();
    let store = mosaic(dir.path());
    let out = dir.path().join("out");
    let printed = ok(&tessera(&[
        "snf",
        "--data",
        &store,
        "--out",
        out.to_str().unwrap(),
    ]));
    let r = report(&out, "snf");
    assert_eq!(r["n_obs"], 600);
    let views = r["views"].as_array().unwrap();
    assert_eq!(
        views
            .iter()
            .map(|v| v["name"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["rna", "prot", "atac"]
    );
    assert_eq!(views[0]["samples"], 600);
    assert!(
        views[1]["samples"].as_u64().unwrap() < 500 && views[2]["samples"].as_u64().unwrap() < 500,
        "{views:?}"
    );
    // 8 simulated cell types, found by the eigengap and by the clusters.
    assert_eq!(r["clusters"], 8, "{printed}");
    assert!(
        r["nmi"].as_f64().unwrap() > 0.95 && r["ari"].as_f64().unwrap() > 0.9,
        "{printed}"
    );

    let mudata = MuData::open(&store).unwrap();
    let root = mudata.root();
    let graph = root.matrix("obsp/snf").unwrap();
    assert_eq!(graph.shape, (600, 600));
    assert_eq!(graph.nnz, 600 * 20, "top 20 entries per row");
    let rows = graph.read_rows(&root.store, 0..600).unwrap();
    // Each cell's strongest link is itself (the fused diagonal is at least one half).
    for i in [0usize, 299, 599] {
        let (cols, vals) = rows.row(i);
        let best = cols[vals
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .unwrap()
            .0];
        assert_eq!(best as usize, i);
    }
    match root.obs_column("snf_clusters").unwrap() {
        Column::Categorical {
            codes, categories, ..
        } => {
            assert_eq!(categories.len(), 8);
            assert!(codes.iter().all(|&c| (0..8).contains(&c)));
        }
        other => panic!("snf_clusters is {}", other.kind()),
    }

    // Written once: a second run names what it would overwrite; --overwrite replaces it.
    let refused = failed(&tessera(&[
        "snf",
        "--data",
        &store,
        "--out",
        out.to_str().unwrap(),
    ]));
    assert!(
        refused.contains("obsp/snf") && refused.contains("--overwrite"),
        "{refused}"
    );
    ok(&tessera(&[
        "snf",
        "--data",
        &store,
        "--out",
        out.to_str().unwrap(),
        "--overwrite",
        "--clusters",
        "4",
        "--top-k",
        "0",
    ]));
    let graph = MuData::open(&store)
        .unwrap()
        .root()
        .matrix("obsp/snf")
        .unwrap();
    assert_eq!(graph.nnz, 600 * 600, "dense with --top-k 0");
    assert_eq!(report(&out, "snf")["clusters"], 4);
}

#[test]
fn nemo_over_obsm_and_x_of_an_anndata() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("ad.zarr");
    copy_dir(&common::fixture("ad013_v3.zarr"), &store);
    let out = dir.path().join("out");
    let store = store.display().to_string();
    ok(&tessera(&[
        "snf",
        "--data",
        &store,
        "--method",
        "nemo",
        "--view",
        "X,obsm/X_pca",
        "--key",
        "nemo",
        "--clusters",
        "3",
        "--out",
        out.to_str().unwrap(),
    ]));
    let r = report(&out, "nemo");
    assert_eq!(r["method"], "nemo");
    assert_eq!(r["views"][1]["features"], 8);
    assert_eq!(r["label_key"], "cell_type");
    let nmi = r["nmi"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&nmi), "{r}");
    let adata = AnnData::open(&store).unwrap();
    assert_eq!(adata.matrix("obsp/nemo").unwrap().shape, (500, 500));
    assert!(adata.obs_column("nemo_clusters").is_ok());
}

#[test]
fn bad_views_and_parameters_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let store = mosaic(dir.path());
    let out = dir.path().join("out");
    let out = out.to_str().unwrap();
    let e = failed(&tessera(&[
        "snf",
        "--data",
        &store,
        "--out",
        out,
        "--view",
        "rna,bogus",
    ]));
    assert!(
        e.contains("mod/bogus") && e.contains("rna, prot, atac"),
        "{e}"
    );
    let e = failed(&tessera(&[
        "snf", "--data", &store, "--out", out, "--view", "X",
    ]));
    assert!(e.contains("no root X"), "{e}");
    let e = failed(&tessera(&[
        "snf", "--data", &store, "--out", out, "--view", "rna",
    ]));
    assert!(e.contains("at least 2 views"), "{e}");
    let e = failed(&tessera(&[
        "snf",
        "--data",
        &store,
        "--out",
        out,
        "--view",
        "rna,obsm/nothing",
    ]));
    assert!(e.contains("obsm/nothing"), "{e}");
    let e = failed(&tessera(&[
        "snf", "--data", &store, "--out", out, "--k", "5000",
    ]));
    assert!(e.contains("k = 5000"), "{e}");
    let e = failed(&tessera(&[
        "snf",
        "--data",
        &store,
        "--out",
        out,
        "--label-key",
        "nope",
    ]));
    assert!(e.contains("obs/nope"), "{e}");
    // Nothing was written by the refused runs.
    assert!(
        MuData::open(&store)
            .unwrap()
            .root()
            .matrix("obsp/snf")
            .is_err()
    );
}

/// The dense network written at obsp/<key> of a MuData root.
fn dense_network(store: &str, key: &str) -> Vec<f32> {
    let root = MuData::open(store).unwrap().root();
    let m = root.matrix(&format!("obsp/{key}")).unwrap();
    let csr = m.read_rows(&root.store, 0..m.shape.0).unwrap();
    let n = m.shape.1 as usize;
    let mut dense = vec![0f32; csr.n_rows * n];
    for i in 0..csr.n_rows {
        let (cols, vals) = csr.row(i);
        cols.iter()
            .zip(vals)
            .for_each(|(&j, &v)| dense[i * n + j as usize] = v);
    }
    dense
}

#[test]
fn snf_across_worker_processes_equals_one_machine() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("complete.zarr").display().to_string();
    ok(&tessera(&[
        "simulate",
        &store,
        "--cells",
        "500",
        "--genes",
        "200",
        "--proteins",
        "15",
        "--batches",
        "2",
        "--missing",
        "0",
        "--seed",
        "5",
    ]));
    let out = dir.path().join("out");
    let out = out.to_str().unwrap();
    ok(&tessera(&[
        "snf", "--data", &store, "--out", out, "--top-k", "0", "--key", "one",
    ]));
    let one = report(Path::new(out), "snf");
    let printed = ok(&tessera(&[
        "snf",
        "--data",
        &store,
        "--out",
        out,
        "--top-k",
        "0",
        "--key",
        "three",
        "--workers",
        "3",
    ]));
    assert!(printed.contains("SUCCEEDED"), "{printed}");
    let three = report(Path::new(out), "snf");
    // Row blocks change only summation order: the f32 networks written agree to the last bits.
    let (a, b) = (dense_network(&store, "one"), dense_network(&store, "three"));
    let diff = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(diff <= 1e-7, "3 workers differ from one machine by {diff}");
    assert_eq!(one["clusters"], three["clusters"]);
    assert_eq!(one["nmi"], three["nmi"]);
    let root = MuData::open(&store).unwrap().root();
    assert_eq!(
        root.obs_column("one_clusters").unwrap(),
        root.obs_column("three_clusters").unwrap()
    );

    // What the row-block path cannot do is refused up front, by name.
    let e = failed(&tessera(&[
        "snf",
        "--data",
        &store,
        "--out",
        out,
        "--method",
        "nemo",
        "--workers",
        "2",
        "--key",
        "x",
    ]));
    assert!(e.contains("only SNF"), "{e}");
    let mosaic = mosaic(dir.path());
    let e = failed(&tessera(&[
        "snf",
        "--data",
        &mosaic,
        "--out",
        out,
        "--workers",
        "2",
    ]));
    assert!(e.contains("every cell in every view"), "{e}");
}

#[test]
fn kernel_averaging_over_correlation_distances() {
    let dir = tempfile::tempdir().unwrap();
    let store = mosaic(dir.path());
    let out = dir.path().join("out");
    ok(&tessera(&[
        "snf",
        "--data",
        &store,
        "--out",
        out.to_str().unwrap(),
        "--method",
        "average",
        "--metric",
        "correlation",
        "--key",
        "avg",
        "--clusters",
        "8",
    ]));
    let r = report(&out, "average");
    assert_eq!(r["method"], "average");
    assert!(r["nmi"].as_f64().unwrap() > 0.9, "{r}");
    assert_eq!(
        MuData::open(&store)
            .unwrap()
            .root()
            .matrix("obsp/avg")
            .unwrap()
            .shape,
        (600, 600)
    );
}

#[test]
fn snf_out_of_core_equals_in_memory_with_missing_cells() {
    let dir = tempfile::tempdir().unwrap();
    let store = mosaic(dir.path());
    let out = dir.path().join("out");
    let out = out.to_str().unwrap();
    let scratch = dir.path().join("scratch.zarr");
    let scratch = scratch.to_str().unwrap();
    ok(&tessera(&[
        "snf", "--data", &store, "--out", out, "--key", "memory",
    ]));
    let memory = report(Path::new(out), "snf");
    // Blocks of 128 rows: 5 row blocks, the last one short.
    let printed = ok(&tessera(&[
        "snf",
        "--data",
        &store,
        "--out",
        out,
        "--key",
        "disk",
        "--out-of-core",
        "--block",
        "128",
        "--scratch",
        scratch,
    ]));
    let disk = report(Path::new(out), "snf");
    let (a, b) = (
        dense_network(&store, "memory"),
        dense_network(&store, "disk"),
    );
    let diff = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(diff <= 1e-7, "out of core differs from in memory by {diff}");
    assert_eq!(memory["clusters"], disk["clusters"], "{printed}");
    assert_eq!(memory["nmi"], disk["nmi"]);
    let root = MuData::open(&store).unwrap().root();
    assert_eq!(
        root.obs_column("memory_clusters").unwrap(),
        root.obs_column("disk_clusters").unwrap()
    );
    assert!(
        !Path::new(scratch).exists(),
        "the scratch store is removed after the run"
    );

    // Refused up front, by name: a dense network, other methods, workers, an existing scratch.
    let e = failed(&tessera(&[
        "snf",
        "--data",
        &store,
        "--out",
        out,
        "--key",
        "x",
        "--out-of-core",
        "--top-k",
        "0",
    ]));
    assert!(e.contains("top-k rows"), "{e}");
    let e = failed(&tessera(&[
        "snf",
        "--data",
        &store,
        "--out",
        out,
        "--key",
        "x",
        "--out-of-core",
        "--method",
        "nemo",
    ]));
    assert!(e.contains("only SNF runs out of core"), "{e}");
    let e = failed(&tessera(&[
        "snf",
        "--data",
        &store,
        "--out",
        out,
        "--key",
        "x",
        "--out-of-core",
        "--workers",
        "2",
    ]));
    assert!(e.contains("choose one"), "{e}");
    let e = failed(&tessera(&[
        "snf",
        "--data",
        &store,
        "--out",
        out,
        "--key",
        "x",
        "--out-of-core",
        "--scratch",
        &store,
    ]));
    assert!(
        e.contains("scratch location") && e.contains("not empty"),
        "{e}"
    );
    assert!(
        root.obs_column("x_clusters").is_err() && MuData::open(&store).is_ok(),
        "nothing written, the data untouched"
    );
}

#[test]
fn a_view_without_features_is_refused_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("no_genes.zarr").display().to_string();
    let writer = tessera_data::StoreWriter::create(&store, tessera_data::ZarrVersion::V3).unwrap();
    let obs: Vec<String> = (0..20).map(|i| format!("c{i}")).collect();
    writer.anndata("", &obs, &[], &[]).unwrap();
    let mut x = writer.csr("X", 0).unwrap();
    x.push(&tessera_data::Csr {
        n_rows: 20,
        n_cols: 0,
        indptr: vec![0; 21],
        ..Default::default()
    })
    .unwrap();
    x.finish().unwrap();
    writer.consolidate().unwrap();
    let pca: Vec<f32> = (0..60).map(|v| (v % 7) as f32).collect();
    AnnData::open(&store)
        .unwrap()
        .write_obsm("pca", &pca, 3, false)
        .unwrap();
    let out = dir.path().join("out");
    let e = failed(&tessera(&[
        "snf",
        "--data",
        &store,
        "--out",
        out.to_str().unwrap(),
        "--view",
        "X,obsm/pca",
    ]));
    assert!(
        e.contains("view X: 0 features") && !e.contains("panicked"),
        "{e}"
    );
}

#[test]
fn a_run_that_cannot_write_its_report_publishes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = mosaic(dir.path());
    let out = dir.path().join("out");
    std::fs::create_dir_all(out.join("snf.json")).unwrap();
    let e = failed(&tessera(&[
        "snf",
        "--data",
        &store,
        "--out",
        out.to_str().unwrap(),
    ]));
    assert!(
        e.contains("snf.json") && e.contains("is a directory"),
        "{e}"
    );
    assert!(
        MuData::open(&store)
            .unwrap()
            .root()
            .matrix("obsp/snf")
            .is_err()
    );
}
