//! Every kind of broken store gets an error that names the store, the element and what was
//! expected; nothing panics. Stores are simulated (Zarr v2: plain JSON metadata and one file
//! per chunk), then broken on purpose.
#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::path::{Path, PathBuf};

use serde_json::json;
use tessera_data::{AnnData, Dataset, MuData, SimConfig, ZarrVersion, simulate};

const CELLS: u64 = 50;
const GENES: usize = 20;

fn fresh() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.zarr");
    let config = SimConfig {
        n_cells: CELLS,
        n_genes: GENES,
        n_types: 2,
        n_batches: 2,
        library: 200.0,
        version: ZarrVersion::V2,
        ..Default::default()
    };
    simulate(path.to_str().unwrap(), &config, |_| {}).unwrap();
    (dir, path)
}

/// Replaces an array by an uncompressed single-chunk v2 array holding `bytes`.
fn raw_array(store: &Path, element: &str, dtype: &str, len: usize, bytes: Vec<u8>) {
    let dir = store.join(element);
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::create_dir_all(&dir).unwrap();
    let meta = json!({"zarr_format": 2, "shape": [len], "chunks": [len.max(1)], "dtype": dtype, "compressor": null, "fill_value": 0, "order": "C", "filters": null});
    std::fs::write(dir.join(".zarray"), meta.to_string()).unwrap();
    std::fs::write(
        dir.join(".zattrs"),
        json!({"encoding-type": "array", "encoding-version": "0.2.0"}).to_string(),
    )
    .unwrap();
    std::fs::write(dir.join("0"), bytes).unwrap();
}

fn i64_bytes(v: &[i64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn read_indptr(store: &Path) -> Vec<i64> {
    let a = AnnData::open(store.to_str().unwrap()).unwrap();
    let x = a.x().unwrap();
    let all = x.read_rows(&a.store, 0..CELLS).unwrap();
    all.indptr.iter().map(|&p| p as i64).collect()
}

fn open_err(store: &Path) -> String {
    AnnData::open(store.to_str().unwrap())
        .unwrap_err()
        .to_string()
}

fn read_err(store: &Path) -> String {
    let a = AnnData::open(store.to_str().unwrap()).unwrap();
    let x = a.x().unwrap();
    x.read_rows(&a.store, 0..CELLS).unwrap_err().to_string()
}

fn assert_names(err: &str, parts: &[&str]) {
    for p in parts {
        assert!(err.contains(p), "error {err:?} should mention {p:?}");
    }
}

#[test]
fn missing_group() {
    let (_d, s) = fresh();
    std::fs::remove_dir_all(s.join("obs")).unwrap();
    assert_names(&open_err(&s), &["s.zarr", "obs", "missing dataframe group"]);
}

#[test]
fn missing_array() {
    let (_d, s) = fresh();
    std::fs::remove_dir_all(s.join("X/indices")).unwrap();
    assert_names(&open_err(&s), &["X/indices", "missing array"]);
}

#[test]
fn unknown_encoding_type() {
    let (_d, s) = fresh();
    std::fs::write(
        s.join("X/.zattrs"),
        json!({"encoding-type": "fancy_matrix", "shape": [CELLS, GENES]}).to_string(),
    )
    .unwrap();
    assert_names(
        &open_err(&s),
        &["X", "unknown encoding-type 'fancy_matrix'", "csr_matrix"],
    );
    let (_d, s) = fresh();
    std::fs::write(
        s.join(".zattrs"),
        json!({"encoding-type": "spatialdata"}).to_string(),
    )
    .unwrap();
    assert_names(
        &Dataset::open(s.to_str().unwrap()).unwrap_err().to_string(),
        &["spatialdata", "'anndata' or 'MuData'"],
    );
    assert_names(
        &MuData::open(s.to_str().unwrap()).unwrap_err().to_string(),
        &["spatialdata", "'MuData'"],
    );
}

#[test]
fn wrong_dtype() {
    let (_d, s) = fresh();
    let n = AnnData::open(s.to_str().unwrap()).unwrap().x().unwrap().nnz as usize;
    raw_array(&s, "X/indices", "<f4", n, vec![0u8; n * 4]);
    assert_names(&open_err(&s), &["X/indices", "float32", "integer"]);
    let (_d, s) = fresh();
    raw_array(
        &s,
        "X/indptr",
        "<f8",
        CELLS as usize + 1,
        vec![0u8; (CELLS as usize + 1) * 8],
    );
    assert_names(&open_err(&s), &["X/indptr", "float64", "integer"]);
}

#[test]
fn indptr_not_monotone() {
    let (_d, s) = fresh();
    let mut indptr = read_indptr(&s);
    indptr.swap(10, 11);
    raw_array(&s, "X/indptr", "<i8", indptr.len(), i64_bytes(&indptr));
    assert_names(&open_err(&s), &["X/indptr", "not monotone", "entry 11"]);
}

#[test]
fn indptr_not_ending_at_nnz() {
    let (_d, s) = fresh();
    let mut indptr = read_indptr(&s);
    let nnz = *indptr.last().unwrap();
    *indptr.last_mut().unwrap() = nnz - 1;
    raw_array(&s, "X/indptr", "<i8", indptr.len(), i64_bytes(&indptr));
    assert_names(
        &open_err(&s),
        &[
            "X/indptr",
            &format!("ends at {}", nnz - 1),
            &format!("nnz = {nnz}"),
        ],
    );
    let (_d, s) = fresh();
    let short = &read_indptr(&s)[..30];
    raw_array(&s, "X/indptr", "<i8", short.len(), i64_bytes(short));
    assert_names(&open_err(&s), &["X/indptr", "shape [30]", "expected [51]"]);
}

#[test]
fn indices_out_of_range() {
    let (_d, s) = fresh();
    let n = AnnData::open(s.to_str().unwrap()).unwrap().x().unwrap().nnz as usize;
    let mut idx = vec![0i32; n];
    idx[n / 2] = GENES as i32 + 5;
    raw_array(
        &s,
        "X/indices",
        "<i4",
        n,
        idx.iter().flat_map(|x| x.to_le_bytes()).collect(),
    );
    assert_names(
        &read_err(&s),
        &[
            "X/indices",
            &format!("index {} out of range", GENES + 5),
            &format!("< {GENES}"),
        ],
    );
}

#[test]
fn shape_mismatch_between_x_and_obs_var() {
    let (_d, s) = fresh();
    std::fs::write(s.join("X/.zattrs"), json!({"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": [CELLS, GENES + 3]}).to_string()).unwrap();
    assert_names(
        &open_err(&s),
        &[
            "X",
            &format!("shape ({CELLS}, {})", GENES + 3),
            &format!("({CELLS}, {GENES})"),
        ],
    );
    let (_d, s) = fresh();
    std::fs::write(
        s.join("X/.zattrs"),
        json!({"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": "wide"})
            .to_string(),
    )
    .unwrap();
    assert_names(&open_err(&s), &["X", "attribute 'shape'"]);
}

#[test]
fn truncated_chunk() {
    let (_d, s) = fresh();
    let chunk = s.join("X/data/0");
    let bytes = std::fs::read(&chunk).unwrap();
    std::fs::write(&chunk, &bytes[..bytes.len() / 2]).unwrap();
    assert_names(&read_err(&s), &["X/data", "truncated or corrupt chunk"]);
}

#[test]
fn corrupt_chunk() {
    let (_d, s) = fresh();
    let chunk = s.join("X/indices/0");
    let len = std::fs::read(&chunk).unwrap().len();
    std::fs::write(&chunk, vec![0xAB; len]).unwrap();
    assert_names(&read_err(&s), &["X/indices", "truncated or corrupt chunk"]);
}

#[test]
fn malformed_metadata_json() {
    let (_d, s) = fresh();
    std::fs::write(s.join("obs/.zattrs"), "{not json").unwrap();
    assert_names(&open_err(&s), &["obs/.zattrs", "malformed JSON"]);
}

#[test]
fn bad_categorical_codes() {
    let (_d, s) = fresh();
    raw_array(
        &s,
        "obs/batch/codes",
        "<i4",
        CELLS as usize,
        (0..CELLS as i32).flat_map(|x| x.to_le_bytes()).collect(),
    );
    let a = AnnData::open(s.to_str().unwrap()).unwrap();
    assert_names(
        &a.obs().unwrap_err().to_string(),
        &["obs/batch/codes", "out of range for 2 categories"],
    );
}

#[test]
fn column_length_mismatch() {
    let (_d, s) = fresh();
    raw_array(&s, "obs/n_counts", "<f8", 7, vec![0u8; 56]);
    let a = AnnData::open(s.to_str().unwrap()).unwrap();
    assert_names(
        &a.obs().unwrap_err().to_string(),
        &["obs/n_counts", "7 values", &format!("index has {CELLS}")],
    );
}

#[test]
fn not_a_store() {
    let dir = tempfile::tempdir().unwrap();
    assert_names(
        &AnnData::open(dir.path().to_str().unwrap())
            .unwrap_err()
            .to_string(),
        &["no Zarr root"],
    );
    assert_names(
        &AnnData::open("gopher://x/y.zarr").unwrap_err().to_string(),
        &["gopher", "not supported"],
    );
}

/// `convert` refuses, before writing anything, a source that is not AnnData/MuData (it wrote a
/// store `inspect` then rejected) and an output named like an HDF5 file (it wrote a Zarr
/// directory called `out.h5ad` that `anndata.read_h5ad` could not open).
#[test]
fn convert_refuses_non_anndata_and_hdf5_names() {
    let (dir, path) = fresh();
    let source = path.to_str().unwrap();
    for name in ["out.h5ad", "out.H5MU", "out.h5ad/"] {
        let out = dir.path().join(name);
        let err = tessera_data::convert(source, out.to_str().unwrap(), ZarrVersion::V3, |_| {})
            .unwrap_err()
            .to_string();
        assert_names(&err, &[name.trim_end_matches('/'), "Zarr", ".zarr"]);
        assert!(!out.exists(), "{name} was written");
    }
    // Only an obs group: not AnnData.
    std::fs::remove_dir_all(path.join("var")).unwrap();
    let out = dir.path().join("o.zarr");
    let err = tessera_data::convert(source, out.to_str().unwrap(), ZarrVersion::V3, |_| {})
        .unwrap_err()
        .to_string();
    assert_names(
        &err,
        &["s.zarr", "not AnnData", "var", "nothing was written"],
    );
    assert!(!out.exists(), "the output was written");
}

#[test]
fn values_that_are_not_counts_are_found_with_their_cell_and_gene() {
    let (_dir, path) = fresh();
    let location = path.to_str().unwrap();
    let adata = AnnData::open(location).unwrap();
    assert_eq!(adata.first_non_count("X", 1_000).unwrap(), None);
    let csr = adata
        .x()
        .unwrap()
        .read_rows(&adata.store, 0..CELLS)
        .unwrap();
    for (value, at) in [(2.5f32, 7usize), (-1.0, 0)] {
        let mut data = csr.data.clone();
        data[at] = value;
        let bytes = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        raw_array(&path, "X/data", "<f4", data.len(), bytes);
        let row = csr.indptr.iter().rposition(|&p| p as usize <= at).unwrap();
        let (cell, gene, found) = AnnData::open(location)
            .unwrap()
            .first_non_count("X", 1_000)
            .unwrap()
            .unwrap();
        assert_eq!(cell, adata.obs_names[row]);
        assert_eq!(gene, adata.var_names[csr.indices[at] as usize]);
        assert_eq!(found, value);
    }
}

/// Sets `key` of the JSON metadata file `file` (".zarray", ".zattrs") of `element`.
fn set_metadata(store: &Path, element: &str, file: &str, key: &str, value: serde_json::Value) {
    let path = store.join(element).join(file);
    let mut meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    meta[key] = value;
    std::fs::write(&path, meta.to_string()).unwrap();
}

const HUGE: u64 = 1_000_000_000_000;

#[test]
fn declared_sizes_beyond_the_stored_data_fail_fast_naming_the_array() {
    // X and its row pointers both declare 10^12 cells: refused before indptr is read.
    let (_d, s) = fresh();
    set_metadata(&s, "X", ".zattrs", "shape", json!([HUGE, GENES]));
    set_metadata(&s, "X/indptr", ".zarray", "shape", json!([HUGE + 1]));
    assert_names(
        &open_err(&s),
        &["X", "does not match obs x var", "(50, 20)"],
    );
    // Only indptr's array: its declared length is checked before it is read.
    let (_d, s) = fresh();
    set_metadata(&s, "X/indptr", ".zarray", "shape", json!([HUGE + 1]));
    assert_names(&open_err(&s), &["X/indptr", "expected [51]"]);
    // The obs names themselves (what every other size is checked against).
    let (_d, s) = fresh();
    set_metadata(&s, "obs/_index", ".zarray", "shape", json!([HUGE]));
    assert_names(&open_err(&s), &["obs/_index", "beyond the data"]);
    // A column's codes.
    let (_d, s) = fresh();
    set_metadata(&s, "obs/batch/codes", ".zarray", "shape", json!([HUGE]));
    let a = AnnData::open(s.to_str().unwrap()).unwrap();
    assert_names(
        &a.obs_column("batch").unwrap_err().to_string(),
        &["obs/batch/codes", "beyond the data"],
    );
}

#[test]
fn a_row_with_more_entries_than_genes_is_refused() {
    // Every entry of X moved into the first row: it repeats columns.
    let (_d, s) = fresh();
    let indptr = read_indptr(&s);
    let nnz = *indptr.last().unwrap();
    let mut crowded = vec![0i64; indptr.len()];
    crowded[1..].iter_mut().for_each(|p| *p = nnz);
    raw_array(&s, "X/indptr", "<i8", crowded.len(), i64_bytes(&crowded));
    assert_names(
        &open_err(&s),
        &[
            "X/indptr",
            &format!("row 0 holds {nnz} entries"),
            "20 columns",
        ],
    );
}

#[test]
fn an_obs_column_shorter_than_the_cells_is_refused_when_read_alone() {
    let (_d, s) = fresh();
    raw_array(&s, "obs/batch/codes", "<i4", 30, vec![0u8; 120]);
    let a = AnnData::open(s.to_str().unwrap()).unwrap();
    assert!(a.has_obs_column("batch").unwrap(), "there, though broken");
    assert_names(
        &a.obs_column("batch").unwrap_err().to_string(),
        &["obs/batch", "30 values", "n_obs = 50"],
    );
    let d = Dataset::open(s.to_str().unwrap()).unwrap();
    assert!(d.has_obs_column("batch").unwrap() && !d.has_obs_column("donor").unwrap());
}

fn i32_bytes(v: &[u32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

#[test]
fn unsorted_rows_are_sorted_and_a_repeated_column_is_refused() {
    let (_d, s) = fresh();
    let a = AnnData::open(s.to_str().unwrap()).unwrap();
    let x = a.x().unwrap().read_rows(&a.store, 0..CELLS).unwrap();
    let row = (0..x.n_rows).find(|&r| x.row(r).0.len() >= 2).unwrap();
    let first = x.indptr[row] as usize;
    // The row's first two entries swapped (scipy leaves such rows after some operations).
    let (mut indices, mut data) = (x.indices.clone(), x.data.clone());
    indices.swap(first, first + 1);
    data.swap(first, first + 1);
    raw_array(&s, "X/indices", "<i4", indices.len(), i32_bytes(&indices));
    raw_array(&s, "X/data", "<f4", data.len(), f32_bytes(&data));
    let a = AnnData::open(s.to_str().unwrap()).unwrap();
    assert_eq!(a.x().unwrap().read_rows(&a.store, 0..CELLS).unwrap(), x);
    // The same column twice in the row.
    indices[first + 1] = indices[first];
    raw_array(&s, "X/indices", "<i4", indices.len(), i32_bytes(&indices));
    let a = AnnData::open(s.to_str().unwrap()).unwrap();
    let err = a.x().unwrap().read_rows(&a.store, 0..CELLS).unwrap_err();
    assert_names(
        &err.to_string(),
        &[
            "X/indices",
            &format!("row {row} holds column {} twice", indices[first]),
        ],
    );
}

#[test]
fn a_missing_chunk_of_a_sparse_matrix_is_refused_not_read_as_zeros() {
    let (_d, s) = fresh();
    let chunk = std::fs::read_dir(s.join("X/indices"))
        .unwrap()
        .flatten()
        .find(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .unwrap();
    std::fs::remove_file(chunk.path()).unwrap();
    assert_names(&open_err(&s), &["X/indices", "chunk 0", "is not stored"]);
}

#[test]
fn a_count_beyond_float32_integers_is_not_a_count() {
    let (_d, s) = fresh();
    let a = AnnData::open(s.to_str().unwrap()).unwrap();
    let x = a.x().unwrap().read_rows(&a.store, 0..CELLS).unwrap();
    let mut data = x.data.clone();
    data[3] = 1e30;
    raw_array(&s, "X/data", "<f4", data.len(), f32_bytes(&data));
    let found = AnnData::open(s.to_str().unwrap())
        .unwrap()
        .first_non_count("X", 1_000)
        .unwrap()
        .unwrap();
    assert_eq!(found.2, 1e30);
}

#[test]
fn an_obsmap_mapping_two_cells_to_one_row_or_leaving_a_row_out_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.zarr");
    let config = SimConfig {
        n_cells: CELLS,
        n_genes: GENES,
        n_proteins: 5,
        missing: 0.3,
        version: ZarrVersion::V2,
        ..Default::default()
    };
    simulate(path.to_str().unwrap(), &config, |_| {}).unwrap();
    let mdata = MuData::open(path.to_str().unwrap()).unwrap();
    let (p, _) = mdata.modality("prot").unwrap();
    let map: Vec<i64> = mdata.obsmap[p].iter().map(|&m| i64::from(m)).collect();
    let present: Vec<usize> = (0..map.len()).filter(|&i| map[i] > 0).collect();
    let write = |m: &[i64]| raw_array(&path, "obsmap/prot", "<i8", m.len(), i64_bytes(m));
    let mut twice = map.clone();
    twice[present[1]] = map[present[0]];
    write(&twice);
    let err = MuData::open(path.to_str().unwrap())
        .unwrap_err()
        .to_string();
    assert_names(&err, &["obsmap/prot", "both map to row 0"]);
    let mut dropped = map.clone();
    dropped[present[0]] = 0;
    write(&dropped);
    let err = MuData::open(path.to_str().unwrap())
        .unwrap_err()
        .to_string();
    assert_names(&err, &["obsmap/prot", "(row 0) is not in the MuData's obs"]);
    write(&map);
    assert!(MuData::open(path.to_str().unwrap()).is_ok());
}

#[test]
fn convert_refuses_an_array_declaring_far_more_than_is_stored() {
    let (dir, path) = fresh();
    std::fs::create_dir_all(path.join("obsm/big")).unwrap();
    raw_array(&path, "obsm/big", "<f4", 4, vec![0u8; 16]);
    set_metadata(&path, "obsm/big", ".zarray", "shape", json!([HUGE]));
    let out = dir.path().join("o.zarr");
    let started = std::time::Instant::now();
    let err = tessera_data::convert(
        path.to_str().unwrap(),
        out.to_str().unwrap(),
        ZarrVersion::V3,
        |_| {},
    )
    .unwrap_err()
    .to_string();
    assert_names(&err, &["obsm/big", "beyond the data"]);
    assert!(started.elapsed().as_secs() < 30, "refused at once");
}
