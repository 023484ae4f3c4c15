//! .h5ad → Zarr conversion keeps every element and value.
#![cfg(feature = "h5ad")]
#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod common;
use common::shared_data;

use tessera_data::{AnnData, DataError, ZarrVersion, convert};

#[test]
fn converted_pbmc_equals_the_zarr_written_by_anndata() {
    let reference =
        AnnData::open(shared_data().join("pbmc68k_counts.zarr").to_str().unwrap()).unwrap();
    for version in [ZarrVersion::V2, ZarrVersion::V3] {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("pbmc.zarr");
        let out = out.to_str().unwrap();
        let summary = convert(
            shared_data().join("pbmc68k_counts.h5ad").to_str().unwrap(),
            out,
            version,
            |_| {},
        )
        .unwrap();
        assert!(summary.arrays >= 10, "{summary:?}");
        let converted = AnnData::open(out).unwrap();
        assert_eq!(converted.version, version);
        assert_eq!(converted.obs_names, reference.obs_names);
        assert_eq!(converted.var_names, reference.var_names);
        let n = reference.n_obs();
        assert_eq!(
            converted
                .x()
                .unwrap()
                .read_rows(&converted.store, 0..n)
                .unwrap(),
            reference
                .x()
                .unwrap()
                .read_rows(&reference.store, 0..n)
                .unwrap()
        );
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
    let err = convert(
        not_hdf5.to_str().unwrap(),
        dir.path().join("o.zarr").to_str().unwrap(),
        ZarrVersion::V3,
        |_| {},
    )
    .unwrap_err()
    .to_string();
    // Not HDF5 (no signature), so it is taken for a Zarr store, which it is not either.
    assert!(
        err.contains("fake.h5ad") && err.contains("no such directory"),
        "{err}"
    );
    let mut truncated = std::fs::read(shared_data().join("pbmc68k_counts.h5ad")).unwrap();
    truncated.truncate(4096);
    let cut = dir.path().join("cut.h5ad");
    std::fs::write(&cut, truncated).unwrap();
    let err = convert(
        cut.to_str().unwrap(),
        dir.path().join("c.zarr").to_str().unwrap(),
        ZarrVersion::V3,
        |_| {},
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("cut.h5ad"), "{err}");
    // Never over an existing store.
    let existing = shared_data().join("fixtures/ad013_v3.zarr");
    let err = convert(
        shared_data().join("pbmc68k_counts.h5ad").to_str().unwrap(),
        existing.to_str().unwrap(),
        ZarrVersion::V3,
        |_| {},
    )
    .unwrap_err();
    assert!(matches!(err, DataError::Occupied { .. }), "{err}");
}

#[test]
fn zarr_to_zarr_rechunks_for_streaming() {
    // anndata writes small stores as one chunk (shard) per array; conversion re-chunks them and
    // keeps every value, across Zarr versions in both directions.
    for (input, version) in [
        ("fixtures/ad013_v3.zarr", ZarrVersion::V2),
        ("fixtures/ad013_v2_csc.zarr", ZarrVersion::V3),
        ("pbmc68k_counts.zarr", ZarrVersion::V3),
    ] {
        let source = AnnData::open(shared_data().join(input).to_str().unwrap()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out.zarr");
        convert(
            shared_data().join(input).to_str().unwrap(),
            out.to_str().unwrap(),
            version,
            |_| {},
        )
        .unwrap();
        let converted = AnnData::open(out.to_str().unwrap()).unwrap();
        assert_eq!(converted.version, version);
        let n = source.n_obs();
        let (a, b) = (source.x().unwrap(), converted.x().unwrap());
        assert_eq!(a.format, b.format, "{input}");
        assert_eq!(
            a.read_rows(&source.store, 0..n).unwrap(),
            b.read_rows(&converted.store, 0..n).unwrap(),
            "{input}"
        );
        assert_eq!(source.obs().unwrap(), converted.obs().unwrap(), "{input}");
        assert_eq!(source.var().unwrap(), converted.var().unwrap(), "{input}");
        for key in source.keys("obsm").unwrap() {
            assert_eq!(
                source.obsm(&key).unwrap(),
                converted.obsm(&key).unwrap(),
                "{input} obsm/{key}"
            );
        }
        assert_eq!(
            source.keys("layers").unwrap(),
            converted.keys("layers").unwrap()
        );
    }
}
