//! `tessera bench load`: streaming throughput of the data layer, side by side with Python
//! anndata reading the same rows of the same stores.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use tessera_data::{Dataset, Loader, LoaderConfig, SimConfig, ZarrVersion};

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Stream all of X in mini-batches from local Zarr v2 and v3 stores (generated once).
    Load {
        #[arg(long, default_value_t = 100_000)]
        cells: u64,
        #[arg(long, default_value_t = 2_000)]
        genes: usize,
        /// Median UMIs per cell of the generated data (sets nnz per cell).
        #[arg(long, default_value_t = 1_500.0)]
        library: f64,
        #[arg(long, default_value_t = 1_024)]
        batch_size: usize,
        /// Where the generated stores are kept between runs.
        #[arg(long, default_value = "target/bench-data")]
        dir: PathBuf,
        /// Python interpreter with anndata installed, to time anndata on the same stores.
        #[arg(long)]
        python: Option<PathBuf>,
        /// Benchmark these existing local AnnData stores instead of generated ones (repeatable).
        #[arg(long)]
        store: Vec<PathBuf>,
        /// Timed passes per reader; the median is reported (this machine's timings are noisy).
        #[arg(long, default_value_t = 5)]
        repeat: usize,
    },
}

pub fn run(command: BenchCommand) -> Result<()> {
    match command {
        BenchCommand::Load { cells, genes, library, batch_size, dir, python, store, repeat } => {
            let stores = if store.is_empty() { generated_stores(cells, genes, library, &dir)? } else { store };
            load(&stores, batch_size, python.as_deref(), repeat.max(1))
        }
    }
}

struct Row {
    store: String,
    reader: String,
    cells_per_s: f64,
    decoded_mb_s: f64,
    stored_mb_s: f64,
}

fn dir_bytes(path: &Path) -> u64 {
    std::fs::read_dir(path)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| match e.file_type() {
                    Ok(t) if t.is_dir() => dir_bytes(&e.path()),
                    _ => e.metadata().map(|m| m.len()).unwrap_or(0),
                })
                .sum()
        })
        .unwrap_or(0)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The default benchmark data: the same simulated cells in Zarr v2 and v3, generated once.
fn generated_stores(cells: u64, genes: usize, library: f64, dir: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut stores = Vec::new();
    for version in [ZarrVersion::V2, ZarrVersion::V3] {
        let path = dir.join(format!("load_{cells}x{genes}_lib{library}_v{}.zarr", version.number()));
        if !path.join("X").exists() {
            if path.exists() {
                bail!("{} exists but holds no X; remove it", path.display());
            }
            eprintln!("generating {} ...", path.display());
            let config = SimConfig { n_cells: cells, n_genes: genes, library, version, seed: 42, ..Default::default() };
            tessera_data::simulate(&path.to_string_lossy(), &config, |_| {})?;
        }
        stores.push(path);
    }
    Ok(stores)
}

fn load(stores: &[PathBuf], batch_size: usize, python: Option<&Path>, repeat: usize) -> Result<()> {
    let mut rows = Vec::new();
    let mut described = Vec::new();
    for path in stores {
        let location = path.to_string_lossy().to_string();
        let label = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| location.clone());
        let stored = dir_bytes(&path.join("X")) as f64;
        let dataset = Dataset::open(&location)?;
        let Dataset::AnnData(adata) = &dataset else { bail!("{location} is not an AnnData store") };
        let x = adata.x()?;
        let cells = adata.n_obs();
        described.push(format!("{label}: Zarr v{}, {cells} cells x {} genes, {:.0} nnz/cell, chunks {:?}{}", adata.version.number(), adata.n_vars(), x.nnz as f64 / cells as f64, x.inner_chunk_shape.as_ref().unwrap_or(&x.chunk_shape), x.inner_chunk_shape.as_ref().map(|_| format!(" in shards {:?}", x.chunk_shape)).unwrap_or_default()));
        let decoded = (x.nnz * 8 + cells * 8) as f64; // data f32 + indices u32, indptr u64
        for shuffle in [false, true] {
            let loader = Loader::new(&dataset, 0..cells, LoaderConfig { batch_size, shuffle, ..Default::default() })?;
            let mut times = Vec::with_capacity(repeat);
            for epoch in 0..repeat as u64 {
                let start = Instant::now();
                let mut seen = 0u64;
                for batch in loader.epoch(epoch) {
                    seen += batch?.cells.len() as u64;
                }
                times.push(start.elapsed().as_secs_f64());
                if seen != cells {
                    bail!("loader yielded {seen} cells, expected {cells}");
                }
            }
            let seconds = median(times);
            rows.push(Row {
                store: label.clone(),
                reader: format!("tessera loader ({})", if shuffle { "block-shuffled" } else { "sequential" }),
                cells_per_s: cells as f64 / seconds,
                decoded_mb_s: decoded / seconds / 1e6,
                stored_mb_s: stored / seconds / 1e6,
            });
        }
        if let Some(python) = python {
            let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/python/bench_load.py");
            let output = Command::new(python).arg(script).arg(&location).arg(batch_size.to_string()).arg(repeat.to_string()).output().with_context(|| format!("running {}", python.display()))?;
            if !output.status.success() {
                bail!("python benchmark failed: {}", String::from_utf8_lossy(&output.stderr));
            }
            let results: serde_json::Value = serde_json::from_slice(&output.stdout).context("python benchmark output")?;
            for (reader, seconds) in results.as_object().into_iter().flatten() {
                let seconds = seconds.as_f64().unwrap_or(f64::NAN);
                rows.push(Row {
                    store: label.clone(),
                    reader: reader.clone(),
                    cells_per_s: cells as f64 / seconds,
                    decoded_mb_s: decoded / seconds / 1e6,
                    stored_mb_s: stored / seconds / 1e6,
                });
            }
        }
    }
    println!("streaming all of X in batches of {batch_size}, {} threads, median of {repeat} passes", rayon::current_num_threads());
    for d in &described {
        println!("  {d}");
    }
    let width = rows.iter().map(|r| r.store.len()).max().unwrap_or(5).max(5);
    println!("{:<width$} {:<42} {:>12} {:>14} {:>13}", "store", "reader", "cells/s", "decoded MB/s", "stored MB/s");
    for r in &rows {
        println!("{:<width$} {:<42} {:>12.0} {:>14.1} {:>13.1}", r.store, r.reader, r.cells_per_s, r.decoded_mb_s, r.stored_mb_s);
    }
    Ok(())
}
