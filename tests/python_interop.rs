//! Interop with Python anndata 0.12 / mudata 0.3 (the newest that run on Python 3.11): stores
//! they write read exactly, and what we write they read back with our values.
#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use serde_json::Value;
use tessera_data::{
    AnnData, Column, Csr, Dataset, MatrixFormat, MuData, SimConfig, ZarrVersion, simulate,
};
use tessera_tests::{copy_dir, python, run_python, shared_data};

fn counts(c: &Column) -> Vec<(String, usize)> {
    let mut v = c.value_counts().unwrap();
    v.sort();
    v
}

fn expect_counts(t: &Value) -> Vec<(String, usize)> {
    let mut v: Vec<(String, usize)> = t
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, n)| (k.clone(), n.as_u64().unwrap() as usize))
        .collect();
    v.sort();
    v
}

#[test]
fn anndata_012_stores_read_exactly() {
    let Some(py) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap();
    run_python(&py, "make_fixtures_012.py", &[out]);
    let truth: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("truth.json")).unwrap())
            .unwrap();
    let row_sums: Vec<f32> = truth["row_sums"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    for (name, version, format) in [
        ("ad012_v2_csr", ZarrVersion::V2, MatrixFormat::Csr),
        ("ad012_v2_dense", ZarrVersion::V2, MatrixFormat::Dense),
        ("ad012_v2_csc", ZarrVersion::V2, MatrixFormat::Csc),
        ("ad012_v3_csr", ZarrVersion::V3, MatrixFormat::Csr),
        ("ad012_v3_dense", ZarrVersion::V3, MatrixFormat::Dense),
        ("ad012_v3_csc", ZarrVersion::V3, MatrixFormat::Csc),
    ] {
        let a =
            AnnData::open(&format!("{out}/{name}.zarr")).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(a.version, version, "{name}");
        let x = a.x().unwrap();
        assert_eq!(x.format, format, "{name}");
        let all = x.read_rows(&a.store, 0..a.n_obs()).unwrap();
        assert_eq!(all.nnz() as u64, truth["nnz"].as_u64().unwrap(), "{name}");
        assert_eq!(all.row_sums(), row_sums, "{name}");
        let obs = a.obs().unwrap();
        assert_eq!(
            counts(obs.column("batch").unwrap()),
            expect_counts(&truth["batch_counts"]),
            "{name}"
        );
        assert_eq!(obs.column("cell_type").unwrap().missing(), 5);
        assert!(
            matches!(
                obs.column("donor").unwrap(),
                Column::Strings(_) | Column::Categorical { .. }
            ),
            "{name}"
        );
        assert_eq!(
            counts(obs.column("donor").unwrap()),
            expect_counts(&truth["donor_counts"]),
            "{name}"
        );
        let Some(Column::Float(score)) = obs.column("score") else {
            panic!("{name}: score")
        };
        assert_eq!(score[0], truth["score_first"].as_f64().unwrap());
        let Some(Column::Int(count)) = obs.column("count") else {
            panic!("{name}: count")
        };
        assert_eq!(
            count.iter().flatten().sum::<i64>(),
            truth["count_sum"].as_i64().unwrap()
        );
        let Some(Column::Bool(flag)) = obs.column("flag") else {
            panic!("{name}: flag")
        };
        assert_eq!(
            flag.iter().filter(|f| **f == Some(true)).count() as u64,
            truth["flag_true"].as_u64().unwrap()
        );
        let (pca, k) = a.obsm("X_pca").unwrap();
        let first: Vec<f32> = truth["pca_first_row"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        assert_eq!((&pca[..k], k), (&first[..], 5));
        let (raw, raw_vars) = a.raw_x().unwrap().expect("raw/X");
        assert_eq!(raw_vars.len(), 40);
        assert_eq!(
            raw.read_rows(&a.store, 0..a.n_obs()).unwrap().row_sums(),
            row_sums
        );
        assert_eq!(
            a.layer("counts")
                .unwrap()
                .read_rows(&a.store, 0..a.n_obs())
                .unwrap()
                .row_sums(),
            row_sums
        );
    }
    let expected: Vec<u64> = truth["prot_present"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    let check_mudata = |location: &str| {
        let m = MuData::open(location).unwrap_or_else(|e| panic!("{location}: {e}"));
        let (p, prot) = m.modality("prot").unwrap();
        assert_eq!(prot.n_obs(), 200);
        let present: Vec<u64> = m
            .presence(p)
            .iter()
            .enumerate()
            .filter(|(_, b)| **b)
            .map(|(i, _)| i as u64)
            .collect();
        assert_eq!(present, expected, "{location}");
    };
    check_mudata(&format!("{out}/mu012_v2.zarr"));
    // The HDF5 files of the same objects convert to stores with the same contents.
    let h5ad = format!("{out}/ad012_converted.zarr");
    tessera_data::convert(
        dir.path().join("ad012.h5ad").to_str().unwrap(),
        &h5ad,
        ZarrVersion::V3,
        |_| {},
    )
    .unwrap();
    let (converted, original) = (
        AnnData::open(&h5ad).unwrap(),
        AnnData::open(&format!("{out}/ad012_v2_csr.zarr")).unwrap(),
    );
    assert_eq!(
        converted
            .x()
            .unwrap()
            .read_rows(&converted.store, 0..300)
            .unwrap(),
        original
            .x()
            .unwrap()
            .read_rows(&original.store, 0..300)
            .unwrap()
    );
    assert_eq!(converted.obs().unwrap(), original.obs().unwrap());
    assert_eq!(
        converted.obsm("X_pca").unwrap(),
        original.obsm("X_pca").unwrap()
    );
    assert_eq!(
        converted.raw_x().unwrap().unwrap().1,
        original.raw_x().unwrap().unwrap().1
    );
    let h5mu = format!("{out}/mu012_converted.zarr");
    tessera_data::convert(
        dir.path().join("mu012.h5mu").to_str().unwrap(),
        &h5mu,
        ZarrVersion::V2,
        |_| {},
    )
    .unwrap();
    check_mudata(&h5mu);
    // And Python reads the converted stores.
    let report: Value =
        serde_json::from_str(&run_python(&py, "check_written.py", &[&h5ad, &h5mu])).unwrap();
    assert_eq!(
        report[h5ad.as_str()]["x_sum"].as_f64().unwrap(),
        truth["x_sum"].as_f64().unwrap()
    );
    assert_eq!(
        report[h5mu.as_str()]["mods"]["prot"],
        serde_json::json!([200, 7])
    );
}

#[test]
fn python_reads_what_we_write() {
    let Some(py) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut stores = Vec::new();
    for version in [ZarrVersion::V2, ZarrVersion::V3] {
        let path = dir
            .path()
            .join(format!("sim_v{}.zarr", version.number()))
            .to_str()
            .unwrap()
            .to_string();
        simulate(
            &path,
            &SimConfig {
                n_cells: 700,
                n_genes: 60,
                n_batches: 3,
                version,
                seed: 5,
                ..Default::default()
            },
            |_| {},
        )
        .unwrap();
        stores.push(path);
    }
    let copied = dir.path().join("ad013_copy.zarr");
    copy_dir(&shared_data().join("fixtures/ad013_v3.zarr"), &copied);
    stores.push(copied.to_str().unwrap().to_string());
    let mut expected = Vec::new();
    for path in &stores {
        let a = AnnData::open(path).unwrap();
        let n = a.n_obs() as usize;
        let emb: Vec<f32> = (0..n * 3).map(|i| (i as f32) * 0.25 - 7.0).collect();
        a.write_obsm("X_tessera", &emb, 3, false).unwrap();
        let x = a.x().unwrap().read_rows(&a.store, 0..a.n_obs()).unwrap();
        let doubled = Csr {
            data: x.data.iter().map(|v| v * 2.0).collect(),
            ..x.clone()
        };
        a.write_layer("tessera_denoised", &doubled, false).unwrap();
        expected.push((
            emb,
            x.data.iter().map(|&v| f64::from(v)).sum::<f64>(),
            x.nnz(),
        ));
    }
    let mu = dir.path().join("mu.zarr").to_str().unwrap().to_string();
    simulate(
        &mu,
        &SimConfig {
            n_cells: 400,
            n_genes: 30,
            n_proteins: 6,
            n_peaks: 25,
            missing: 0.25,
            seed: 9,
            ..Default::default()
        },
        |_| {},
    )
    .unwrap();
    let mut args: Vec<&str> = stores.iter().map(String::as_str).collect();
    args.push(&mu);
    let report: Value = serde_json::from_str(&run_python(&py, "check_written.py", &args)).unwrap();
    for (path, (emb, x_sum, nnz)) in stores.iter().zip(&expected) {
        let r = &report[path.as_str()];
        let got: Vec<f32> = r["obsm"]["X_tessera"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(&got, emb, "{path}: obsm/X_tessera as Python reads it");
        assert_eq!(
            r["obsm_shapes"]["X_tessera"],
            serde_json::json!([emb.len() / 3, 3])
        );
        assert_eq!(r["x_sum"].as_f64().unwrap(), *x_sum, "{path}");
        assert_eq!(r["nnz"].as_u64().unwrap(), *nnz as u64, "{path}");
        assert_eq!(
            r["layers"]["tessera_denoised"].as_f64().unwrap(),
            2.0 * x_sum,
            "{path}"
        );
    }
    // The copy of the anndata 0.13 store keeps what Python wrote there.
    let copy = &report[stores[2].as_str()];
    assert!(copy["obsm"]["X_pca"].is_array() && copy["layers"]["counts"].is_number());
    // Our simulated AnnData obs as pandas sees them.
    assert_eq!(report[stores[0].as_str()]["obs"]["batch"], "category");
    assert_eq!(report[stores[1].as_str()]["obs"]["n_counts"], "float64");
    // MuData: modalities and obsmap as mudata reads them equal ours.
    let Dataset::MuData(m) = Dataset::open(&mu).unwrap() else {
        panic!()
    };
    let r = &report[mu.as_str()];
    assert_eq!(r["kind"], "MuData");
    // Every element carries its encoding: mudata reads the store without OldFormatWarnings.
    assert_eq!(
        r["format_warnings"],
        serde_json::json!([]),
        "{}",
        r["format_warnings"]
    );
    for (i, (name, a)) in m.modalities.iter().enumerate() {
        assert_eq!(
            r["mods"][name.as_str()],
            serde_json::json!([a.n_obs(), a.n_vars()])
        );
        let map: Vec<u32> = r["obsmap"][name.as_str()]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(map, m.obsmap[i], "obsmap/{name}");
    }
}
