//! The loader yields every cell of its shard exactly once per epoch, reproducibly, with
//! counts, library sizes, covariate codes and presence masks that match the store.
#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::collections::HashSet;

use tessera_data::{
    AnnData, Cells, Dataset, Holdout, Loader, LoaderConfig, ShardPlan, SimConfig, ZarrVersion,
    simulate,
};

fn store(dir: &tempfile::TempDir, name: &str, config: SimConfig) -> String {
    let path = dir.path().join(name).to_str().unwrap().to_string();
    simulate(&path, &config, |_| {}).unwrap();
    path
}

fn config() -> SimConfig {
    SimConfig {
        n_cells: 3000,
        n_genes: 100,
        n_types: 3,
        n_batches: 2,
        library: 500.0,
        seed: 3,
        version: ZarrVersion::V3,
        ..Default::default()
    }
}

#[test]
fn every_cell_once_per_epoch_and_reproducible() {
    let dir = tempfile::tempdir().unwrap();
    let path = store(&dir, "a.zarr", config());
    let dataset = Dataset::open(&path).unwrap();
    let cfg = LoaderConfig {
        batch_size: 100,
        block_cells: 64,
        blocks_per_fetch: 3,
        prefetch: 2,
        seed: 11,
        batch_key: Some("batch".into()),
        label_key: Some("cell_type".into()),
        ..Default::default()
    };
    let loader = Loader::new(&dataset, 500..2700, cfg.clone()).unwrap();
    let adata = AnnData::open(&path).unwrap();
    let x = adata.x().unwrap().read_rows(&adata.store, 0..3000).unwrap();
    let obs = adata.obs().unwrap();
    let (batch_codes, _) = obs.column("batch").unwrap().codes().unwrap();
    let mut orders = Vec::new();
    for epoch in 0..2 {
        let mut seen = Vec::new();
        for b in loader.epoch(epoch) {
            let b = b.unwrap();
            assert!(b.cells.len() <= 100);
            let m = &b.modalities[0];
            for (i, &c) in b.cells.iter().enumerate() {
                assert_eq!(m.counts.row(i), x.row(c as usize), "counts of cell {c}");
                assert_eq!(m.library[i], x.row(c as usize).1.iter().sum::<f32>());
                assert_eq!(b.batch[i], batch_codes[c as usize]);
                assert!(m.present[i]);
                assert!(b.label[i] >= 0);
            }
            seen.extend(b.cells);
        }
        let unique: HashSet<u64> = seen.iter().copied().collect();
        assert_eq!(seen.len(), 2200, "each cell once");
        assert_eq!(unique, (500..2700).collect());
        orders.push(seen);
    }
    assert_ne!(orders[0], orders[1], "epochs are shuffled differently");
    let again: Vec<u64> = Loader::new(&dataset, 500..2700, cfg)
        .unwrap()
        .epoch(0)
        .flat_map(|b| b.unwrap().cells)
        .collect();
    assert_eq!(again, orders[0], "same seed, same order");
}

#[test]
fn unshuffled_epoch_is_in_order_and_early_drop_stops_the_reader() {
    let dir = tempfile::tempdir().unwrap();
    let path = store(&dir, "b.zarr", config());
    let dataset = Dataset::open(&path).unwrap();
    let loader = Loader::new(
        &dataset,
        0..3000,
        LoaderConfig {
            shuffle: false,
            batch_size: 256,
            prefetch: 1,
            ..Default::default()
        },
    )
    .unwrap();
    let cells: Vec<u64> = loader.epoch(0).flat_map(|b| b.unwrap().cells).collect();
    assert_eq!(cells, (0..3000).collect::<Vec<_>>());
    let mut epoch = loader.epoch(1);
    assert!(epoch.next().is_some());
    drop(epoch); // must return: the background reader is unblocked and joined
}

#[test]
fn holdout_holds_exactly_the_asked_cells_whatever_the_order() {
    let held = |h: &Holdout, cells: std::ops::Range<u64>| -> HashSet<u64> {
        cells.filter(|&c| h.holds(c)).collect()
    };
    let h = Holdout::new(100..5100, 7, 500);
    let a = held(&h, 100..5100);
    assert_eq!(a.len(), 500);
    assert!(a.iter().all(|&c| (100..5100).contains(&c)));
    // Spread over the shard, not a contiguous run: each fifth of the cells holds 100 ± 40.
    for part in 0..5u64 {
        let n = a
            .iter()
            .filter(|&&c| (100 + part * 1000..100 + (part + 1) * 1000).contains(&c))
            .count();
        assert!((60..=140).contains(&n), "fifth {part} holds {n}");
    }
    assert_eq!(
        Holdout::new(100..5100, 7, 500),
        h,
        "a function of cells and seed alone"
    );
    let other = held(&Holdout::new(100..5100, 8, 500), 100..5100);
    assert!(
        a.intersection(&other).count() < 150,
        "another seed draws other cells"
    );
    assert!(held(&Holdout::new(0..50, 1, 0), 0..50).is_empty());
    assert_eq!(
        held(&Holdout::new(0..50, 1, 80), 0..50).len(),
        50,
        "more than the shard holds all of it"
    );
    assert_eq!(held(&Holdout::new(0..50, 1, 49), 0..50).len(), 49);
}

#[test]
fn training_and_held_out_cells_split_the_shard_in_full_batches() {
    let dir = tempfile::tempdir().unwrap();
    let path = store(&dir, "h.zarr", config());
    let dataset = Dataset::open(&path).unwrap();
    let cfg = LoaderConfig {
        batch_size: 100,
        block_cells: 256,
        blocks_per_fetch: 4,
        prefetch: 2,
        seed: 5,
        fetch_bytes: 0,
        ..Default::default()
    };
    let loader = Loader::new(&dataset, 0..3000, cfg.clone()).unwrap();
    let holdout = Holdout::new(0..3000, 5, 300);
    let training = loader.with_cells(Cells::Training(holdout));
    for epoch in 0..2 {
        let batches: Vec<Vec<u64>> = training.epoch(epoch).map(|b| b.unwrap().cells).collect();
        let cells: HashSet<u64> = batches.iter().flatten().copied().collect();
        assert_eq!(
            batches.iter().map(Vec::len).sum::<usize>(),
            2700,
            "each training cell once"
        );
        assert!(cells.iter().all(|&c| !holdout.holds(c)));
        // 3000 cells in fetches of 1024: one short batch per fetch, the rest full.
        assert_eq!(
            batches.iter().filter(|b| b.len() < 100).count(),
            3,
            "epoch {epoch}: {:?}",
            batches.iter().map(Vec::len).collect::<Vec<_>>()
        );
    }
    // One fetch (the default fetch_bytes holds the whole shard): every batch full.
    let whole = Loader::new(
        &dataset,
        0..3000,
        LoaderConfig {
            fetch_bytes: LoaderConfig::default().fetch_bytes,
            ..cfg
        },
    )
    .unwrap()
    .with_cells(Cells::Training(holdout));
    let sizes: Vec<usize> = whole.epoch(0).map(|b| b.unwrap().cells.len()).collect();
    assert_eq!(sizes, vec![100; 27]);
    let held: Vec<u64> = loader
        .ordered()
        .with_cells(Cells::HeldOut(holdout))
        .epoch(0)
        .flat_map(|b| b.unwrap().cells)
        .collect();
    assert_eq!(held.len(), 300);
    assert!(
        held.windows(2).all(|w| w[0] < w[1]),
        "held-out cells in store order"
    );
    assert!(held.iter().all(|&c| holdout.holds(c)));
}

#[test]
fn mudata_batches_carry_presence_masks() {
    let dir = tempfile::tempdir().unwrap();
    let path = store(
        &dir,
        "m.zarr",
        SimConfig {
            n_proteins: 10,
            missing: 0.4,
            ..config()
        },
    );
    let Dataset::MuData(mdata) = Dataset::open(&path).unwrap() else {
        panic!()
    };
    let (p, prot) = mdata.modality("prot").unwrap();
    let present = mdata.presence(p);
    let prot_x = prot
        .x()
        .unwrap()
        .read_rows(&prot.store, 0..prot.n_obs())
        .unwrap();
    let loader = Loader::new(
        &Dataset::MuData(mdata.clone()),
        0..3000,
        LoaderConfig {
            batch_key: Some("batch".into()),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(loader.modality_names(), ["rna", "prot"]);
    let mut n = 0;
    for b in loader.epoch(0) {
        let b = b.unwrap();
        let m = &b.modalities[1];
        for (i, &c) in b.cells.iter().enumerate() {
            assert_eq!(m.present[i], present[c as usize]);
            if m.present[i] {
                let row = mdata.obsmap[p][c as usize] as usize - 1;
                assert_eq!(m.counts.row(i), prot_x.row(row));
            } else {
                assert_eq!(m.counts.row(i).0.len(), 0);
                assert_eq!(m.library[i], 0.0);
            }
            n += 1;
        }
    }
    assert_eq!(n, 3000);
}

#[test]
fn bad_loader_inputs_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = store(
        &dir,
        "c.zarr",
        SimConfig {
            n_cells: 200,
            ..config()
        },
    );
    let dataset = Dataset::open(&path).unwrap();
    let err = Loader::new(&dataset, 100..300, LoaderConfig::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("outside the 200 cells"), "{err}");
    let err = Loader::new(
        &dataset,
        0..200,
        LoaderConfig {
            batch_key: Some("nope".into()),
            ..Default::default()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("obs/nope") && err.contains("missing"), "{err}");
    let err = Loader::new(
        &dataset,
        0..200,
        LoaderConfig {
            label_key: Some("n_counts".into()),
            ..Default::default()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("obs/n_counts") && err.contains("categorical"),
        "{err}"
    );
    let err = Loader::new(
        &dataset,
        0..200,
        LoaderConfig {
            matrix: "layers/none".into(),
            ..Default::default()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("layers/none"), "{err}");
}

#[test]
fn shard_plan_over_a_stored_matrix_is_chunk_aligned() {
    let dir = tempfile::tempdir().unwrap();
    let path = store(
        &dir,
        "d.zarr",
        SimConfig {
            n_cells: 4000,
            n_genes: 400,
            library: 2000.0,
            ..config()
        },
    );
    let adata = AnnData::open(&path).unwrap();
    let x = adata.x().unwrap();
    let plan = ShardPlan::for_matrix(&adata.store, &x, 4).unwrap();
    assert_eq!(plan.shards.len(), 4);
    assert_eq!(plan.shards[0].start, 0);
    assert_eq!(plan.shards[3].end, 4000);
    let total: u64 = plan.nnz.iter().sum();
    assert_eq!(total, x.nnz);
    let chunk = x.inner_chunk_shape.clone().unwrap()[0];
    let row_nnz = x.row_nnz(&adata.store).unwrap();
    for shard in &plan.shards[1..] {
        // The cut row is the first whose values start in a new chunk.
        let start: u64 = row_nnz[..shard.start as usize].iter().sum();
        let prev_start = start - row_nnz[shard.start as usize - 1];
        assert!(
            start / chunk > prev_start / chunk || start.is_multiple_of(chunk),
            "cut at {} is not chunk-aligned",
            shard.start
        );
    }
    for &k in &plan.nnz {
        assert!(
            (k as f64 - total as f64 / 4.0).abs() <= chunk as f64,
            "{:?}",
            plan.nnz
        );
    }
}

#[test]
fn cached_blocks_give_the_same_epochs_within_the_budget() {
    let dir = tempfile::tempdir().unwrap();
    let path = store(&dir, "cache.zarr", config());
    let dataset = Dataset::open(&path).unwrap();
    let cfg = |cache_bytes| LoaderConfig {
        batch_size: 100,
        block_cells: 64,
        blocks_per_fetch: 3,
        prefetch: 2,
        seed: 5,
        batch_key: Some("batch".into()),
        cache_bytes,
        ..Default::default()
    };
    let epochs = |loader: &Loader| -> Vec<Vec<tessera_data::MiniBatch>> {
        (0..3)
            .map(|e| loader.epoch(e).map(Result::unwrap).collect())
            .collect()
    };
    let streamed = Loader::new(&dataset, 0..3000, cfg(0)).unwrap();
    let expected = epochs(&streamed);
    assert_eq!(streamed.cached_bytes(), 0, "no budget, nothing kept");

    // All of it: decoded in the first epoch, then held (every later epoch reads from memory).
    let everything = Loader::new(&dataset, 0..3000, cfg(u64::MAX)).unwrap();
    let first: Vec<_> = everything.epoch(0).map(Result::unwrap).collect();
    let held = everything.cached_bytes();
    assert!(held > 3000 * 4, "decoded blocks are held ({held} bytes)");
    assert_eq!(epochs(&everything), expected);
    assert_eq!(first, expected[0]);
    assert_eq!(everything.cached_bytes(), held, "nothing read twice");

    // A third of it: those blocks stay, the rest streams; the batches do not change.
    let part = Loader::new(&dataset, 0..3000, cfg(held / 3)).unwrap();
    assert_eq!(epochs(&part), expected);
    assert!(
        part.cached_bytes() > 0 && part.cached_bytes() <= held / 3,
        "{} of {held} bytes",
        part.cached_bytes()
    );

    // The ordered view shares the cache: store order, same rows.
    let ordered: Vec<u64> = everything
        .ordered()
        .epoch(0)
        .flat_map(|b| b.unwrap().cells)
        .collect();
    assert_eq!(ordered, (0..3000).collect::<Vec<_>>());
    assert_eq!(everything.cached_bytes(), held);
}

/// Quarters of the shard 0..3000 that a batch's cells come from.
fn quarters(cells: &[u64]) -> HashSet<u64> {
    cells.iter().map(|&c| c * 4 / 3000).collect()
}

#[test]
fn a_shard_within_fetch_bytes_is_shuffled_whole_whatever_the_store_order() {
    // Store order is the worst case of a store sorted by batch: contiguous cells are alike. A
    // small shard is one fetch, so every batch draws from all of it (scvi-tools' shuffle)...
    let dir = tempfile::tempdir().unwrap();
    let path = store(&dir, "mix.zarr", config());
    let dataset = Dataset::open(&path).unwrap();
    let cfg = |fetch_bytes| LoaderConfig {
        batch_size: 100,
        block_cells: 64,
        blocks_per_fetch: 3,
        seed: 2,
        fetch_bytes,
        ..Default::default()
    };
    let whole = Loader::new(&dataset, 0..3000, cfg(LoaderConfig::default().fetch_bytes)).unwrap();
    for b in whole.epoch(0) {
        let cells = b.unwrap().cells;
        assert_eq!(
            quarters(&cells).len(),
            4,
            "a batch from every quarter: {cells:?}"
        );
    }
    // ... while fetches of 3 blocks (192 cells) give batches from at most 3 blocks.
    let blocks = Loader::new(&dataset, 0..3000, cfg(0)).unwrap();
    for b in blocks.epoch(0) {
        let cells = b.unwrap().cells;
        let spanned: HashSet<u64> = cells.iter().map(|c| c / 64).collect();
        assert!(spanned.len() <= 3, "{} blocks in one batch", spanned.len());
    }
}

/// An integer batch column is a covariate like a categorical one (it was refused with "data
/// type int"): categories in ascending numeric order, as pandas' `astype("category")` gives,
/// missing values uncoded.
#[test]
fn integer_batch_columns_are_categories() {
    let dir = tempfile::tempdir().unwrap();
    let path = store(&dir, "i.zarr", config());
    let adata = AnnData::open(&path).unwrap();
    let (codes, _) = adata
        .obs()
        .unwrap()
        .column("batch")
        .unwrap()
        .codes()
        .unwrap();
    // Batch 0 -> 17, batch 1 -> 9 (so numeric order differs from the stored one), cell 5 missing.
    let numbers: Vec<Option<i64>> = codes
        .iter()
        .enumerate()
        .map(|(i, &c)| (i != 5).then_some(if c == 0 { 17 } else { 9 }))
        .collect();
    adata
        .write_obs_column("plate", &tessera_data::Column::Int(numbers), false)
        .unwrap();
    let dataset = Dataset::open(&path).unwrap();
    let loader = Loader::new(
        &dataset,
        0..3000,
        LoaderConfig {
            batch_key: Some("plate".into()),
            shuffle: false,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(loader.batch_categories, ["9", "17"]);
    for b in loader.epoch(0) {
        let b = b.unwrap();
        for (i, &c) in b.cells.iter().enumerate() {
            let expected = match (c, codes[c as usize]) {
                (5, _) => -1,
                (_, 0) => 1,
                _ => 0,
            };
            assert_eq!(b.batch[i], expected, "cell {c}");
        }
    }
}

/// A MuData covariate kept only in a modality's obs (mudata copies it to the root only on
/// `update()`) is found there and mapped to every cell; one found nowhere says where it looked.
#[test]
fn mudata_covariates_are_found_in_a_modalitys_obs() {
    let dir = tempfile::tempdir().unwrap();
    let path = store(
        &dir,
        "m.zarr",
        SimConfig {
            n_cells: 1000,
            n_proteins: 10,
            missing: 0.3,
            ..config()
        },
    );
    let Dataset::MuData(mdata) = Dataset::open(&path).unwrap() else {
        panic!("expected MuData")
    };
    let (p, prot) = mdata.modality("prot").unwrap();
    let n = prot.n_obs() as usize;
    let donors: Vec<Option<String>> = (0..n).map(|r| Some(format!("d{}", r % 3))).collect();
    prot.write_obs_column("donor", &tessera_data::Column::Strings(donors), false)
        .unwrap();
    let obsmap = mdata.obsmap[p].clone();
    let dataset = Dataset::open(&path).unwrap();
    let loader = |key: &str| {
        Loader::new(
            &dataset,
            0..1000,
            LoaderConfig {
                batch_key: Some(key.into()),
                shuffle: false,
                ..Default::default()
            },
        )
    };
    let with_donor = loader("donor").unwrap();
    assert_eq!(with_donor.batch_categories, ["d0", "d1", "d2"]);
    let mut absent = 0;
    for b in with_donor.epoch(0) {
        let b = b.unwrap();
        for (i, &c) in b.cells.iter().enumerate() {
            let expected = match obsmap[c as usize] {
                0 => -1,
                r => ((r - 1) % 3) as i32,
            };
            absent += usize::from(expected < 0);
            assert_eq!(b.batch[i], expected, "cell {c}");
        }
    }
    assert!(
        absent > 200,
        "cells without protein have no donor ({absent})"
    );
    let err = loader("plate").unwrap_err().to_string();
    assert!(
        err.contains("obs/plate") && err.contains("mod/{rna,prot}/obs"),
        "{err}"
    );
}

/// The index and value arrays of a matrix "owned elsewhere" (here: by the test).
struct Arrays(Vec<i32>, Vec<f32>);

impl tessera_data::HostArrays for Arrays {
    fn len(&self) -> usize {
        self.1.len()
    }
    fn entries(&self, span: std::ops::Range<usize>) -> Result<(Vec<i32>, Vec<f32>), String> {
        Ok((self.0[span.clone()].to_vec(), self.1[span].to_vec()))
    }
    fn in_memory(&self) -> bool {
        true
    }
}

#[test]
fn an_attached_matrix_gives_the_stored_batches_without_a_copy_or_cache() {
    let dir = tempfile::tempdir().unwrap();
    let path = store(&dir, "stored.zarr", config());
    let adata = AnnData::open(&path).unwrap();
    let x = adata.x().unwrap().read_rows(&adata.store, 0..3000).unwrap();
    // The same cells and columns in memory, X attached instead of written.
    let location = "memory://loader-attached/data.zarr";
    let writer = tessera_data::StoreWriter::create(location, ZarrVersion::V3).unwrap();
    let obs = adata.obs().unwrap();
    let batch = obs.column("batch").unwrap().clone();
    writer
        .anndata(
            "",
            &adata.obs_names,
            &[("batch".into(), batch)],
            &adata.var_names,
        )
        .unwrap();
    writer.consolidate().unwrap();
    let arrays = Arrays(
        x.indices.iter().map(|&j| j as i32).collect(),
        x.data.clone(),
    );
    let indptr = x.indptr.iter().map(|&p| p as i64).collect();
    let host = tessera_data::HostCsr::new(indptr, 100, std::sync::Arc::new(arrays)).unwrap();
    tessera_data::attach_csr(location, "X", host).unwrap();

    let cfg = LoaderConfig {
        batch_size: 100,
        block_cells: 64,
        blocks_per_fetch: 3,
        seed: 5,
        batch_key: Some("batch".into()),
        cache_bytes: u64::MAX,
        ..Default::default()
    };
    let epochs = |loader: &Loader| -> Vec<Vec<tessera_data::MiniBatch>> {
        (0..2)
            .map(|e| loader.epoch(e).map(Result::unwrap).collect())
            .collect()
    };
    let stored = Loader::new(&Dataset::open(&path).unwrap(), 0..3000, cfg.clone()).unwrap();
    let attached = Loader::new(&Dataset::open(location).unwrap(), 0..3000, cfg).unwrap();
    assert_eq!(epochs(&attached), epochs(&stored));
    assert!(stored.cached_bytes() > 0);
    assert_eq!(
        attached.cached_bytes(),
        0,
        "attached rows are not cached again"
    );
    let memory = AnnData::open(location).unwrap();
    assert!(memory.x().unwrap().in_memory());
    assert!(!memory.has_element("X").unwrap(), "nothing stored under X");

    tessera_data::forget_memory_store("loader-attached");
    assert!(
        Dataset::open(location).is_err(),
        "the store and its matrix are gone"
    );
}
