//! .h5ad → Zarr conversion keeps every element and value.
#![cfg(feature = "h5ad")]

use std::path::PathBuf;

use tessera_data::h5ad::convert_h5;
use tessera_data::{AnnData, DataError, ZarrVersion};

fn shared_data() -> PathBuf {
    std::env::var_os("TESSERA_SHARED_DATA").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data"))
}

#[test]
fn converted_pbmc_equals_the_zarr_written_by_anndata() {
    let reference = AnnData::open(shared_data().join("pbmc68k_counts.zarr").to_str().unwrap()).unwrap();
    for version in [ZarrVersion::V2, ZarrVersion::V3] {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("pbmc.zarr");
        let out = out.to_str().unwrap();
        let summary = convert_h5(&shared_data().join("pbmc68k_counts.h5ad"), out, version, |_| {}).unwrap();
        assert!(summary.arrays >= 10, "{summary:?}");
        let converted = AnnData::open(out).unwrap();
        assert_eq!(converted.version, version);
        assert_eq!(converted.obs_names, reference.obs_names);
        assert_eq!(converted.var_names, reference.var_names);
        let n = reference.n_obs();
        assert_eq!(converted.x().unwrap().read_rows(&converted.store, 0..n).unwrap(), reference.x().unwrap().read_rows(&reference.store, 0..n).unwrap());
        assert_eq!(converted.obs().unwrap(), reference.obs().unwrap());
        // Streaming layout: X in chunks, not one object.
        let x = converted.x().unwrap();
        assert_eq!(x.chunk_shape.len(), 1);
    }
}

#[test]
fn bad_inputs_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let not_hdf5 = dir.path().join("fake.h5ad");
    std::fs::write(&not_hdf5, b"this is not HDF5").unwrap();
    let err = convert_h5(&not_hdf5, dir.path().join("o.zarr").to_str().unwrap(), ZarrVersion::V3, |_| {}).unwrap_err().to_string();
    assert!(err.contains("fake.h5ad") && err.contains("not a readable HDF5 file"), "{err}");
    // Never over an existing store.
    let existing = shared_data().join("fixtures/ad013_v3.zarr");
    let err = convert_h5(&shared_data().join("pbmc68k_counts.h5ad"), existing.to_str().unwrap(), ZarrVersion::V3, |_| {}).unwrap_err();
    assert!(matches!(err, DataError::Exists { .. }), "{err}");
}
