//! Stores we write read back with the values we wrote; adding elements follows the publish
//! rules (no silent overwrite, consolidated metadata refreshed, nothing else touched).
#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod common;
use common::copy_dir;

use tessera_data::{
    AnnData, Column, Csr, DataError, Dataset, MuData, SimConfig, Store, ZarrVersion, simulate,
};

fn small(version: ZarrVersion) -> SimConfig {
    SimConfig {
        n_cells: 5000,
        n_genes: 300,
        n_types: 4,
        n_batches: 2,
        library: 800.0,
        version,
        seed: 7,
        ..Default::default()
    }
}

#[test]
fn simulated_anndata_reads_back_in_both_versions() {
    for version in [ZarrVersion::V2, ZarrVersion::V3] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sim.zarr");
        let path = path.to_str().unwrap();
        let summary = simulate(path, &small(version), |_| {}).unwrap();
        assert!(!summary.mudata);
        let adata = AnnData::open(path).unwrap();
        assert_eq!(adata.version, version);
        assert_eq!((adata.n_obs(), adata.n_vars()), (5000, 300));
        let x = adata.x().unwrap();
        let all = x.read_rows(&adata.store, 0..5000).unwrap();
        let obs = adata.obs().unwrap();
        let Some(Column::Float(n_counts)) = obs.column("n_counts") else {
            panic!("n_counts")
        };
        let sums: Vec<f64> = all.row_sums().into_iter().map(f64::from).collect();
        assert_eq!(&sums, n_counts, "obs n_counts equals the row sums of X");
        let median = {
            let mut s = sums.clone();
            s.sort_by(f64::total_cmp);
            s[2500]
        };
        assert!((300.0..2000.0).contains(&median), "median library {median}");
        let Some(Column::Categorical {
            codes, categories, ..
        }) = obs.column("batch")
        else {
            panic!("batch")
        };
        assert_eq!(categories, &["batch0", "batch1"]);
        assert!(codes.iter().all(|&c| c == 0 || c == 1));
        let (latent, d) = adata.obsm("X_true_latent").unwrap();
        assert_eq!((latent.len(), d), (5000 * 10, 10));
        // A streamed store crosses chunk boundaries: a range read equals the same rows of the whole.
        let rows: Vec<usize> = (1234..4321).collect();
        assert_eq!(
            x.read_rows(&adata.store, 1234..4321).unwrap(),
            all.select_rows(&rows)
        );
    }
}

#[test]
fn simulation_is_deterministic_for_a_seed() {
    let dir = tempfile::tempdir().unwrap();
    let read = |name: &str, seed: u64| {
        let p = dir.path().join(name);
        simulate(
            p.to_str().unwrap(),
            &SimConfig {
                seed,
                ..small(ZarrVersion::V3)
            },
            |_| {},
        )
        .unwrap();
        let a = AnnData::open(p.to_str().unwrap()).unwrap();
        a.x().unwrap().read_rows(&a.store, 0..5000).unwrap()
    };
    let (a, b, c) = (read("a.zarr", 1), read("b.zarr", 1), read("c.zarr", 2));
    assert_eq!(a, b);
    assert_ne!(a, c);
}

#[test]
fn simulated_mudata_has_mosaic_obsmap() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mu.zarr");
    let path = path.to_str().unwrap();
    let config = SimConfig {
        n_proteins: 20,
        n_peaks: 100,
        missing: 0.3,
        ..small(ZarrVersion::V3)
    };
    let summary = simulate(path, &config, |_| {}).unwrap();
    assert!(summary.mudata);
    let Dataset::MuData(mdata) = Dataset::open(path).unwrap() else {
        panic!("expected MuData")
    };
    let names: Vec<&str> = mdata.modalities.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["rna", "prot", "atac"]);
    for m in ["prot", "atac"] {
        let (i, adata) = mdata.modality(m).unwrap();
        let present = mdata.presence(i);
        let n_present = present.iter().filter(|&&p| p).count();
        assert_eq!(n_present as u64, adata.n_obs());
        let frac = 1.0 - n_present as f64 / 5000.0;
        assert!((0.25..0.35).contains(&frac), "{m} missing fraction {frac}");
        let x = adata
            .x()
            .unwrap()
            .read_rows(&adata.store, 0..adata.n_obs())
            .unwrap();
        assert!(x.row_sums().iter().all(|&s| s > 0.0) || m == "atac");
    }
    let (_, atac) = mdata.modality("atac").unwrap();
    let x = atac
        .x()
        .unwrap()
        .read_rows(&atac.store, 0..atac.n_obs())
        .unwrap();
    assert!(x.data.iter().all(|&v| v == 1.0), "ATAC is binary");
}

/// A cell's sparse row (column indices, values); None where the cell lacks the modality.
type Row = Option<(Vec<u32>, Vec<f32>)>;

/// Each non-RNA modality's rows, in global cell order, and the global batch codes.
fn modality_rows(path: &str) -> (Vec<Vec<Row>>, Vec<i32>) {
    let Dataset::MuData(mdata) = Dataset::open(path).unwrap() else {
        panic!("expected MuData")
    };
    let rows = ["prot", "atac"]
        .iter()
        .map(|m| {
            let (i, adata) = mdata.modality(m).unwrap();
            let x = adata
                .x()
                .unwrap()
                .read_rows(&adata.store, 0..adata.n_obs())
                .unwrap();
            mdata.obsmap[i]
                .iter()
                .map(|&r| {
                    (r > 0).then(|| {
                        let (j, v) = x.row(r as usize - 1);
                        (j.to_vec(), v.to_vec())
                    })
                })
                .collect()
        })
        .collect();
    let Column::Categorical { codes, .. } = mdata.root().obs_column("batch").unwrap() else {
        panic!("batch is categorical")
    };
    (rows, codes)
}

#[test]
fn missing_cells_are_the_full_stores_cells_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let full = SimConfig {
        n_cells: 1200,
        n_proteins: 20,
        n_peaks: 100,
        ..small(ZarrVersion::V3)
    };
    let holey = SimConfig {
        missing: 0.3,
        missing_batches: vec![1],
        ..full.clone()
    };
    let paths = ["full.zarr", "holey.zarr"].map(|p| dir.path().join(p).display().to_string());
    simulate(&paths[0], &full, |_| {}).unwrap();
    simulate(&paths[1], &holey, |_| {}).unwrap();
    let (truth, batches) = modality_rows(&paths[0]);
    let (kept, same_batches) = modality_rows(&paths[1]);
    assert_eq!(batches, same_batches);
    for (m, (truth, kept)) in truth.iter().zip(&kept).enumerate() {
        assert!(
            truth.iter().all(Option::is_some),
            "modality {m}: all measured"
        );
        let mut present = [0usize; 2];
        for ((t, k), &b) in truth.iter().zip(kept).zip(&batches) {
            if let Some(k) = k {
                assert_eq!(
                    Some(k),
                    t.as_ref(),
                    "a kept cell has the full store's counts"
                );
                present[b as usize] += 1;
            }
        }
        let in_batch0 = batches.iter().filter(|&&b| b == 0).count();
        let frac = present[0] as f64 / in_batch0 as f64;
        assert_eq!(present[1], 0, "modality {m}: batch 1 lacks it");
        assert!(
            (0.62..0.78).contains(&frac),
            "modality {m}: {frac} of batch 0 kept"
        );
    }
    let bad = SimConfig {
        missing_batches: vec![2],
        ..holey
    };
    let err = simulate(
        &dir.path().join("bad.zarr").display().to_string(),
        &bad,
        |_| {},
    )
    .unwrap_err();
    assert!(err.to_string().contains("missing_batches"), "{err}");
}

#[test]
fn add_obsm_and_layer_publish_without_touching_anything_else() {
    for version in [ZarrVersion::V2, ZarrVersion::V3] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.zarr");
        let path = path.to_str().unwrap();
        simulate(
            path,
            &SimConfig {
                n_cells: 300,
                n_genes: 50,
                ..small(version)
            },
            |_| {},
        )
        .unwrap();
        let adata = AnnData::open(path).unwrap();
        let before = adata.x().unwrap().read_rows(&adata.store, 0..300).unwrap();
        let emb: Vec<f32> = (0..300 * 4).map(|i| i as f32 * 0.5).collect();
        adata.write_obsm("X_tessera", &emb, 4, false).unwrap();
        let again = AnnData::open(path).unwrap();
        assert_eq!(again.obsm("X_tessera").unwrap(), (emb.clone(), 4));
        assert_eq!(
            again.x().unwrap().read_rows(&again.store, 0..300).unwrap(),
            before
        );
        // An existing key is refused without overwrite, and the old values survive.
        let err = again
            .write_obsm("X_tessera", &vec![1.0; 1200], 4, false)
            .unwrap_err();
        assert!(matches!(err, DataError::Exists { .. }), "{err}");
        assert!(
            err.to_string().contains("obsm/X_tessera") && err.to_string().contains("--overwrite")
        );
        assert_eq!(again.obsm("X_tessera").unwrap().0, emb);
        again
            .write_obsm("X_tessera", &vec![1.0; 1200], 4, true)
            .unwrap();
        assert_eq!(again.obsm("X_tessera").unwrap().0, vec![1.0; 1200]);
        // Bad values are refused before anything is written.
        let err = again
            .write_obsm("bad", &vec![f32::NAN; 1200], 4, false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("obsm/bad") && err.contains("NaN"), "{err}");
        assert!(again.obsm("bad").is_err());
        let err = again
            .write_obsm("short", &[1.0; 7], 4, false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("expected 300 x 4"), "{err}");
        // A layer.
        let doubled = Csr {
            data: before.data.iter().map(|v| v * 2.0).collect(),
            ..before.clone()
        };
        again.write_layer("doubled", &doubled, false).unwrap();
        let reread = AnnData::open(path).unwrap();
        assert_eq!(
            reread
                .layer("doubled")
                .unwrap()
                .read_rows(&reread.store, 0..300)
                .unwrap(),
            doubled
        );
        // Consolidated metadata lists the new elements, and no staging node is left.
        let store = Store::open(path).unwrap();
        let consolidated = match version {
            ZarrVersion::V3 => {
                String::from_utf8(store.get_bytes("zarr.json").unwrap().unwrap()).unwrap()
            }
            ZarrVersion::V2 => {
                String::from_utf8(store.get_bytes(".zmetadata").unwrap().unwrap()).unwrap()
            }
        };
        assert!(
            consolidated.contains("obsm/X_tessera")
                && consolidated.contains("layers/doubled/indptr")
        );
        assert!(!consolidated.contains("staging"));
        assert!(
            !dir.path()
                .join("s.zarr/obsm/.tessera-staging-X_tessera")
                .exists()
        );
    }
}

#[test]
fn add_obsm_to_a_python_written_store() {
    let fixture = common::shared_data().join("fixtures/ad013_v3.zarr");
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("copy.zarr");
    copy_dir(&fixture, &copy);
    let adata = AnnData::open(copy.to_str().unwrap()).unwrap();
    let emb: Vec<f32> = (0..500 * 3).map(|i| i as f32).collect();
    adata.write_obsm("X_tessera", &emb, 3, false).unwrap();
    let again = AnnData::open(copy.to_str().unwrap()).unwrap();
    assert_eq!(again.obsm("X_tessera").unwrap().0, emb);
    assert_eq!(again.obsm("X_pca").unwrap(), adata.obsm("X_pca").unwrap());
    let mut keys = again.keys("obsm").unwrap();
    keys.sort();
    assert_eq!(keys, ["X_pca", "X_tessera"]);
}

#[test]
fn memory_store_round_trip() {
    let url = "memory://write-test/sim.zarr";
    simulate(
        url,
        &SimConfig {
            n_cells: 200,
            n_genes: 30,
            ..small(ZarrVersion::V3)
        },
        |_| {},
    )
    .unwrap();
    let adata = AnnData::open(url).unwrap();
    assert_eq!(adata.n_obs(), 200);
    assert!(
        adata
            .x()
            .unwrap()
            .read_rows(&adata.store, 0..200)
            .unwrap()
            .nnz()
            > 0
    );
    // A second simulate into the same location refuses to overwrite.
    let err = simulate(
        url,
        &SimConfig {
            n_cells: 200,
            n_genes: 30,
            ..small(ZarrVersion::V3)
        },
        |_| {},
    )
    .unwrap_err();
    assert!(matches!(err, DataError::Occupied { .. }), "{err}");
    let _ = MuData::open(url).unwrap_err();
}

#[test]
fn disjoint_batches_of_one_world_make_a_reference_and_a_query() {
    let dir = tempfile::tempdir().unwrap();
    let store = |name: &str, only: Vec<usize>| {
        let path = dir.path().join(name).to_str().unwrap().to_string();
        simulate(
            &path,
            &SimConfig {
                n_cells: 400,
                n_genes: 50,
                n_batches: 3,
                only_batches: Some(only),
                ..small(ZarrVersion::V3)
            },
            |_| {},
        )
        .unwrap();
        AnnData::open(&path).unwrap()
    };
    let (reference, query) = (store("ref.zarr", vec![0, 1]), store("query.zarr", vec![2]));
    let batches = |a: &AnnData| match a.obs_column("batch").unwrap() {
        Column::Categorical {
            codes, categories, ..
        } => (codes, categories),
        other => panic!("batch is {}", other.kind()),
    };
    let ((ref_codes, ref_names), (query_codes, query_names)) =
        (batches(&reference), batches(&query));
    assert_eq!(
        (ref_names, query_names),
        (
            vec!["batch0".to_string(), "batch1".to_string()],
            vec!["batch2".to_string()]
        )
    );
    assert!(
        ref_codes.iter().all(|&c| c == 0 || c == 1)
            && ref_codes.contains(&0)
            && ref_codes.contains(&1)
    );
    assert!(query_codes.iter().all(|&c| c == 0));
    assert_eq!(reference.var().unwrap().index, query.var().unwrap().index);
    // Lists that are not ascending batches of the world are refused.
    let bad = simulate(
        dir.path().join("bad.zarr").to_str().unwrap(),
        &SimConfig {
            n_batches: 3,
            only_batches: Some(vec![1, 3]),
            ..small(ZarrVersion::V3)
        },
        |_| {},
    )
    .unwrap_err();
    assert!(bad.to_string().contains("only_batches"), "{bad}");
}

/// Cells per (type, batch) of a simulated store.
fn composition(adata: &AnnData, n_types: usize, n_batches: usize) -> Vec<Vec<usize>> {
    let obs = adata.obs().unwrap();
    let codes = |key: &str| match obs.column(key) {
        Some(Column::Categorical { codes, .. }) => codes.clone(),
        _ => panic!("{key} is categorical"),
    };
    let mut table = vec![vec![0; n_batches]; n_types];
    for (t, b) in codes("cell_type").into_iter().zip(codes("batch")) {
        table[t as usize][b as usize] += 1;
    }
    table
}

#[test]
fn hard_scenario_has_unbalanced_batches_missing_types_and_lineages() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hard.zarr");
    let path = path.to_str().unwrap();
    let config = SimConfig {
        n_cells: 6000,
        seed: 3,
        ..SimConfig::hard()
    };
    simulate(path, &config, |_| {}).unwrap();
    let adata = AnnData::open(path).unwrap();
    let table = composition(&adata, 12, 4);
    let per_batch: Vec<usize> = (0..4).map(|b| table.iter().map(|r| r[b]).sum()).collect();
    // Batch weights 4:3:2:1.
    assert_eq!(per_batch, [2400, 1800, 1200, 600]);
    assert_eq!(
        (table[1][3], table[4][3]),
        (0, 0),
        "types 1 and 4 absent from the last batch"
    );
    assert_eq!(
        &table[11][1..],
        &[0, 0, 0],
        "the last type lives in batch 0 only"
    );
    assert!(table[11][0] > 0);
    let present = table.iter().flatten().filter(|&&n| n > 0).count();
    assert_eq!(
        present,
        12 * 4 - 2 - 3,
        "every other (type, batch) pair has cells"
    );
    let obs = adata.obs().unwrap();
    let (
        Some(Column::Categorical {
            codes: lineage,
            categories,
            ..
        }),
        Some(Column::Categorical { codes: types, .. }),
    ) = (obs.column("lineage"), obs.column("cell_type"))
    else {
        panic!("lineage and cell_type columns")
    };
    assert_eq!(categories.len(), 4);
    let Some(Column::Categorical { codes: batch, .. }) = obs.column("batch") else {
        panic!("batch")
    };
    assert!(lineage.iter().zip(types).all(|(&l, &t)| l == t / 3));
    let x = adata.x().unwrap().read_rows(&adata.store, 0..6000).unwrap();
    let nnz_per_cell = x.data.len() as f64 / 6000.0;
    assert!(
        (500.0..800.0).contains(&nnz_per_cell),
        "{nnz_per_cell} non-zeros per cell"
    );
    // Depth differs by batch: the medians of the batches' library sizes spread over > 1.2x.
    let Some(Column::Float(n_counts)) = obs.column("n_counts") else {
        panic!("n_counts")
    };
    assert!(
        batch.windows(2).all(|w| w[0] <= w[1]),
        "cells stored grouped by batch, like a concatenation of batches"
    );
    let medians: Vec<f64> = (0..4)
        .map(|b| {
            let mut v: Vec<f64> = n_counts
                .iter()
                .zip(batch)
                .filter(|&(_, &c)| c == b)
                .map(|(&n, _)| n)
                .collect();
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        })
        .collect();
    let (lo, hi) = medians
        .iter()
        .fold((f64::MAX, 0.0f64), |(lo, hi), &m| (lo.min(m), hi.max(m)));
    assert!(hi / lo > 1.2, "batch median libraries {medians:?}");
}

#[test]
fn hard_scenario_refuses_types_outside_lineages() {
    let dir = tempfile::tempdir().unwrap();
    for (n_types, n_batches) in [(10, 4), (3, 4), (12, 1)] {
        let path = dir.path().join(format!("bad{n_types}_{n_batches}.zarr"));
        let config = SimConfig {
            n_cells: 100,
            n_types,
            n_batches,
            ..SimConfig::hard()
        };
        let err = simulate(path.to_str().unwrap(), &config, |_| {}).unwrap_err();
        assert!(
            matches!(&err, DataError::Invalid { problem, .. } if problem.contains("lineages of 3")),
            "{err}"
        );
        assert!(
            !path.exists(),
            "nothing written for a refused configuration"
        );
    }
}

/// The root's consolidated metadata (v3) as JSON.
fn root_metadata(path: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path.join("zarr.json")).unwrap()).unwrap()
}

fn lists(path: &std::path::Path, node: &str) -> bool {
    root_metadata(path)["consolidated_metadata"]["metadata"]
        .as_object()
        .unwrap()
        .contains_key(node)
}

/// States a write killed at some point leaves, and what the next write makes of them.
#[test]
fn a_write_killed_anywhere_is_finished_or_undone_by_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("s.zarr");
    let path = root.to_str().unwrap();
    let config = SimConfig {
        n_cells: 200,
        n_genes: 30,
        ..small(ZarrVersion::V3)
    };
    simulate(path, &config, |_| {}).unwrap();
    let adata = AnnData::open(path).unwrap();
    let emb: Vec<f32> = (0..200 * 3).map(|i| i as f32).collect();
    adata.write_obsm("X_tessera", &emb, 3, false).unwrap();
    assert!(lists(&root, "obsm/X_tessera"));

    // Killed after the element was switched in, before the consolidated metadata listed it:
    // Python cannot see it, tessera can. The next write lists it, then refuses to replace it.
    let mut meta = root_metadata(&root);
    meta["consolidated_metadata"]["metadata"]
        .as_object_mut()
        .unwrap()
        .retain(|k, _| !k.starts_with("obsm/X_tessera"));
    std::fs::write(root.join("zarr.json"), meta.to_string()).unwrap();
    let err = adata.write_obsm("X_tessera", &emb, 3, false).unwrap_err();
    assert!(matches!(err, DataError::Exists { .. }), "{err}");
    assert!(lists(&root, "obsm/X_tessera"), "finished: listed again");

    // Killed while the old element was erased: the consolidated metadata still lists it (a
    // reader would get fill values). The next write drops it from the listing and writes anew.
    std::fs::remove_dir_all(root.join("obsm/X_tessera")).unwrap();
    adata.write_obsm("X_tessera", &emb, 3, false).unwrap();
    assert_eq!(
        AnnData::open(path).unwrap().obsm("X_tessera").unwrap(),
        (emb.clone(), 3)
    );

    // A node the consolidation cannot read: refused before anything is published.
    std::fs::create_dir_all(root.join("uns/broken")).unwrap();
    std::fs::write(root.join("uns/broken/zarr.json"), "{not json").unwrap();
    let err = adata.write_obsm("X_other", &emb, 3, false).unwrap_err();
    assert!(err.to_string().contains("uns/broken"), "{err}");
    assert!(!root.join("obsm/X_other").exists() && !lists(&root, "obsm/X_other"));
    std::fs::remove_dir_all(root.join("uns/broken")).unwrap();
    assert!(
        !root.join(".tessera-write.lock").exists(),
        "the lock is released"
    );
}

#[test]
fn a_fifo_in_place_of_metadata_is_refused_not_waited_on() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("s.zarr");
    let config = SimConfig {
        n_cells: 50,
        n_genes: 10,
        ..small(ZarrVersion::V3)
    };
    simulate(root.to_str().unwrap(), &config, |_| {}).unwrap();
    std::fs::remove_file(root.join("obs/zarr.json")).unwrap();
    let made = std::process::Command::new("mkfifo")
        .arg(root.join("obs/zarr.json"))
        .status()
        .unwrap();
    assert!(made.success());
    let err = AnnData::open(root.to_str().unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("obs/zarr.json") && err.contains("not a regular file"),
        "{err}"
    );
}

#[test]
fn concurrent_overwrites_of_one_element_take_turns() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("s.zarr");
    let path = root.to_str().unwrap().to_string();
    let config = SimConfig {
        n_cells: 200,
        n_genes: 30,
        ..small(ZarrVersion::V3)
    };
    simulate(&path, &config, |_| {}).unwrap();
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let path = path.clone();
            std::thread::spawn(move || {
                let adata = AnnData::open(&path).unwrap();
                for _ in 0..5 {
                    adata
                        .write_obsm("X_tessera", &vec![w as f32; 200 * 2], 2, true)
                        .unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    let (values, cols) = AnnData::open(&path).unwrap().obsm("X_tessera").unwrap();
    assert_eq!(cols, 2);
    assert!(
        values.iter().all(|&v| v == values[0]),
        "one writer's values, whole"
    );
    assert!(lists(&root, "obsm/X_tessera"));
}
