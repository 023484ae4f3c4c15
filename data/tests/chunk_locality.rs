//! Reading cells [a, b) of a CSR matrix touches only the chunks that hold them: every other
//! chunk is corrupted on disk, and the read still succeeds with the right values.
#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use tessera_data::{AnnData, SimConfig, ZarrVersion, simulate};

#[test]
fn row_range_reads_only_its_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.zarr");
    let config = SimConfig {
        n_cells: 6000,
        n_genes: 400,
        library: 1500.0,
        version: ZarrVersion::V2,
        seed: 1,
        ..Default::default()
    };
    simulate(path.to_str().unwrap(), &config, |_| {}).unwrap();
    let adata = AnnData::open(path.to_str().unwrap()).unwrap();
    let x = adata.x().unwrap();
    let chunk = x.chunk_shape[0];
    let n_chunks = x.nnz.div_ceil(chunk);
    assert!(n_chunks >= 6, "need several chunks, have {n_chunks}");
    let all = x.read_rows(&adata.store, 0..6000).unwrap();
    let rows = 2500..2600u64;
    let (first, last) = (
        all.indptr[rows.start as usize],
        all.indptr[rows.end as usize] - 1,
    );
    let needed = (first / chunk)..=(last / chunk);
    let mut corrupted = 0;
    for array in ["data", "indices"] {
        for k in 0..n_chunks {
            if !needed.contains(&k) {
                std::fs::write(path.join(format!("X/{array}/{k}")), b"garbage").unwrap();
                corrupted += 1;
            }
        }
    }
    assert!(corrupted >= 8);
    let part = x.read_rows(&adata.store, rows.clone()).unwrap();
    assert_eq!(part, all.select_rows(&(2500..2600).collect::<Vec<_>>()));
    // A read that does need a corrupted chunk fails, naming it as such.
    let err = x.read_rows(&adata.store, 0..10).unwrap_err().to_string();
    assert!(err.contains("X/") && err.contains("corrupt"), "{err}");
}
