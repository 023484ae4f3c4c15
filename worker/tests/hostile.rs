//! A seeded corpus of hostile stores (issue 27's probe, kept as a test): simulated stores in
//! both Zarr versions, each broken by a few seeded mutations of its metadata, chunk bytes or
//! layout, then read by every reading path (inspect, the loader, evaluation, conversion,
//! training without store outputs). Each must end with a result or an error: no panic, no
//! hang, and the store left byte for byte as it was.
#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod common;

use std::collections::BTreeMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;
use serde_json::Value;
use tessera_data::{Dataset, Loader, LoaderConfig, SimConfig, ZarrVersion};
use tessera_worker::{EvalRequest, fit_until};

/// Stores per Zarr version.
const SEEDS: u64 = 16;

/// Every file under `root` with its bytes (the store's state).
fn snapshot(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut files = BTreeMap::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            let kind = entry.file_type().unwrap();
            if kind.is_dir() {
                pending.push(path);
            } else if kind.is_file() {
                files.insert(path.clone(), std::fs::read(&path).unwrap());
            } else {
                files.insert(path, b"<not a file>".to_vec());
            }
        }
    }
    files
}

fn files(root: &Path, wanted: impl Fn(&str) -> bool) -> Vec<PathBuf> {
    snapshot(root)
        .into_keys()
        .filter(|p| p.file_name().is_some_and(|n| wanted(&n.to_string_lossy())))
        .collect()
}

fn is_metadata(name: &str) -> bool {
    matches!(name, ".zarray" | ".zattrs" | ".zgroup" | "zarr.json")
}

/// Large, negative, zero or odd replacements for a number found in metadata.
fn hostile_number(rng: &mut Xoshiro256PlusPlus) -> Value {
    let choices: [Value; 7] = [
        Value::from(1_000_000_000_000u64),
        Value::from(-7),
        Value::from(0),
        Value::from(u64::MAX),
        Value::from(1.5),
        Value::from(3),
        Value::from("12"),
    ];
    choices.choose(rng).unwrap().clone()
}

/// Changes one number, string or key somewhere in `value`.
fn mutate_json(value: &mut Value, rng: &mut Xoshiro256PlusPlus) {
    match value {
        Value::Object(map) if !map.is_empty() => {
            let keys: Vec<String> = map.keys().cloned().collect();
            let key = keys.choose(rng).unwrap().clone();
            if rng.random_bool(0.15) {
                map.remove(&key);
            } else {
                mutate_json(map.get_mut(&key).unwrap(), rng);
            }
        }
        Value::Array(items) if !items.is_empty() => {
            let i = rng.random_range(0..items.len());
            mutate_json(&mut items[i], rng);
        }
        Value::Number(_) => *value = hostile_number(rng),
        Value::String(s) => {
            let replacements = ["<f8", "int8", "|O", "bool", "csr_matrix", "", "dataframe"];
            *s = (*replacements.choose(rng).unwrap()).to_string();
        }
        other => *other = Value::Null,
    }
}

/// One seeded mutation of the store at `root`.
fn mutate(root: &Path, rng: &mut Xoshiro256PlusPlus) -> String {
    match rng.random_range(0..6) {
        0 | 1 => {
            let all = files(root, is_metadata);
            let file = all.choose(rng).unwrap();
            let text = std::fs::read_to_string(file).unwrap();
            let Ok(mut json) = serde_json::from_str::<Value>(&text) else {
                return format!("kept {}", file.display());
            };
            mutate_json(&mut json, rng);
            std::fs::write(file, json.to_string()).unwrap();
            format!("metadata of {}", file.display())
        }
        2 => {
            let chunks = files(root, |n| !is_metadata(n) && !n.starts_with('.'));
            let file = chunks.choose(rng).unwrap();
            let mut bytes = std::fs::read(file).unwrap();
            let cut = rng.random_range(0..=bytes.len());
            bytes.truncate(cut);
            std::fs::write(file, bytes).unwrap();
            format!("truncated {} at {cut}", file.display())
        }
        3 => {
            let chunks = files(root, |n| !is_metadata(n) && !n.starts_with('.'));
            let file = chunks.choose(rng).unwrap();
            let mut bytes = std::fs::read(file).unwrap();
            for _ in 0..rng.random_range(1..8) {
                if !bytes.is_empty() {
                    let i = rng.random_range(0..bytes.len());
                    bytes[i] = rng.random();
                }
            }
            std::fs::write(file, bytes).unwrap();
            format!("flipped bytes of {}", file.display())
        }
        4 => {
            let all = files(root, |_| true);
            let file = all.choose(rng).unwrap();
            std::fs::remove_file(file).unwrap();
            format!("removed {}", file.display())
        }
        _ => {
            let all = files(root, |_| true);
            let file = all.choose(rng).unwrap();
            std::fs::remove_file(file).unwrap();
            std::fs::create_dir_all(file).unwrap();
            format!("made {} a directory", file.display())
        }
    }
}

/// Runs `read` and turns a panic into the failure it is.
fn no_panic(what: &str, store: &str, read: impl FnOnce()) {
    if catch_unwind(AssertUnwindSafe(read)).is_err() {
        panic!("{what} panicked on {store}");
    }
}

/// Every reading path over the store; errors are fine, panics are not.
fn read_everything(location: &str, scratch: &Path) {
    no_panic("inspect", location, || {
        let _ = tessera_data::inspect(location);
    });
    no_panic("the loader", location, || {
        if let Ok(dataset) = Dataset::open(location) {
            let config = LoaderConfig {
                batch_size: 32,
                batch_key: Some("batch".into()),
                label_key: Some("cell_type".into()),
                ..LoaderConfig::default()
            };
            if let Ok(loader) = Loader::new(&dataset, 0..dataset.n_obs(), config) {
                for batch in loader.epoch(0) {
                    if batch.is_err() {
                        break;
                    }
                }
            }
        }
    });
    no_panic("eval", location, || {
        let _ = tessera_worker::evaluate_store(&EvalRequest {
            data: location.into(),
            modality: None,
            embedding_key: "X_true_latent".into(),
            label_key: None,
            batch_key: None,
            max_cells: None,
            options: Default::default(),
        });
    });
    no_panic("convert", location, || {
        let out = scratch.join("converted.zarr");
        let _ = std::fs::remove_dir_all(&out);
        let _ = tessera_data::convert(location, out.to_str().unwrap(), ZarrVersion::V3, |_| {});
    });
    no_panic("train", location, || {
        let mut opts = common::options(location, &scratch.join("train"), 1);
        opts.label_key = None;
        opts.store_outputs = false;
        opts.config.model.n_hidden = 8;
        opts.config.model.n_latent = 2;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let _ = fit_until(&opts, stop, |_| {});
    });
}

#[test]
fn hostile_stores_are_read_without_panics_hangs_or_changes() {
    let started = Instant::now();
    let mut corpus = 0;
    for version in [ZarrVersion::V2, ZarrVersion::V3] {
        for seed in 0..SEEDS {
            let dir = tempfile::tempdir().unwrap();
            let root = dir.path().join("s.zarr");
            let location = root.to_str().unwrap().to_string();
            let config = SimConfig {
                n_cells: 120,
                n_genes: 20,
                n_types: 3,
                n_batches: 2,
                library: 200.0,
                version,
                seed,
                ..SimConfig::default()
            };
            tessera_data::simulate(&location, &config, |_| {}).unwrap();
            let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed * 31 + version.number() as u64);
            let changes: Vec<String> = (0..rng.random_range(1..4))
                .map(|_| mutate(&root, &mut rng))
                .collect();
            let before = snapshot(&root);
            let scratch = dir.path().join("scratch");
            std::fs::create_dir_all(&scratch).unwrap();
            let one = Instant::now();
            read_everything(&location, &scratch);
            assert!(
                one.elapsed() < Duration::from_secs(60),
                "{changes:?}: reading took {:?}",
                one.elapsed()
            );
            assert!(
                snapshot(&root) == before,
                "{changes:?}: the store was modified"
            );
            corpus += 1;
        }
    }
    assert!(corpus >= 30);
    eprintln!("{corpus} hostile stores read in {:?}", started.elapsed());
}
