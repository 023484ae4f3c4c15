//! Mini-batches over a shard of cells, for training.
//!
//! Each epoch the shard is cut into blocks of `block_cells` contiguous cells; the block order is
//! shuffled with (seed, epoch), and fetches of blocks (about `fetch_bytes` decoded, at least
//! `blocks_per_fetch` blocks; a small shard is one fetch) are read together (contiguous reads:
//! few chunks, large requests), their cells (those of `LoaderConfig::cells`: all, or one side of
//! a train/validation `Holdout`) shuffled, and cut into batches. A background thread
//! reads ahead into a bounded channel of `prefetch` batches, so memory stays at about
//! `prefetch` batches plus two fetches whatever the dataset size, plus the decoded blocks kept
//! for later epochs up to `cache_bytes` (a dataset that fits is decoded once, as scvi-tools
//! holds its AnnData in memory; a larger one keeps the blocks that fit and reads the rest).

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, bounded};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_xoshiro::Xoshiro256PlusPlus;

use crate::anndata::{AnnData, Dataset};
use crate::error::{DataError, Result};
use crate::matrix::{Csr, Matrix};

#[derive(Debug, Clone)]
pub struct LoaderConfig {
    pub batch_size: usize,
    /// Contiguous cells per shuffle block.
    pub block_cells: u64,
    /// Blocks read together, at least; a fetch takes more blocks, up to about `fetch_bytes`.
    pub blocks_per_fetch: usize,
    /// Decoded bytes a fetch gathers (at least `blocks_per_fetch` blocks): its cells are
    /// shuffled together, so the larger, the closer to a shuffle of the whole shard. A shard
    /// within it is one fetch, shuffled whole as scvi-tools does. Independent of the cache, so
    /// the cache budget never changes the batches.
    pub fetch_bytes: u64,
    /// Batches buffered ahead of the consumer.
    pub prefetch: usize,
    pub shuffle: bool,
    pub seed: u64,
    /// obs column with the batch covariate; codes are -1 when absent.
    pub batch_key: Option<String>,
    /// obs column with cell labels (cell type), -1 for unlabelled cells.
    pub label_key: Option<String>,
    /// The label value that marks an unlabelled cell (scANVI's `unlabeled_category`): its
    /// cells get -1 and it is not a label category.
    pub unlabeled_category: Option<String>,
    /// Categorical obs columns carried with each batch as codes (covariates beside the batch;
    /// -1 where a cell's value is missing).
    pub categorical_keys: Vec<String>,
    /// Numeric obs columns carried with each batch (regression targets, survival time and
    /// event); missing values are NaN.
    pub numeric_keys: Vec<String>,
    /// Which matrix of each modality: "X", "raw/X" or "layers/<name>".
    pub matrix: String,
    /// Decoded blocks kept for later epochs, at most this many bytes (0: none).
    pub cache_bytes: u64,
    /// Which of the shard's cells the epochs yield; batches are cut from those cells only, so a
    /// held-out split still gives full batches.
    pub cells: Cells,
}

/// A split of cells into training and held-out cells that depends only on the cell indices and
/// the seed, not on reading order: every epoch, resumed run and worker agrees on it. The held
/// cells are exactly the ones with the smallest hashes of (cell, seed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Holdout {
    seed: u64,
    /// The largest (hash, cell) held out; None holds nothing.
    last: Option<(u64, u64)>,
}

impl Holdout {
    /// Holds out `held` of `cells` (all of them when `held` is larger).
    pub fn new(cells: Range<u64>, seed: u64, held: u64) -> Holdout {
        let n = cells.end.saturating_sub(cells.start);
        let held = held.min(n) as usize;
        if held == 0 {
            return Holdout { seed, last: None };
        }
        // Only hashes below a bound that should admit ~1.25x the held cells are kept for the
        // selection (memory in the held cells, not the shard's); the rare short draw widens it.
        let mut admitted = (1.25 * held as f64 + 64.0) / n as f64;
        loop {
            let bound = if admitted >= 1.0 {
                u64::MAX
            } else {
                (admitted * 2f64.powi(64)) as u64
            };
            let mut keys: Vec<(u64, u64)> = cells
                .clone()
                .map(|c| (cell_hash(c, seed), c))
                .filter(|&(h, _)| h <= bound)
                .collect();
            if keys.len() >= held {
                let (_, &mut last, _) = keys.select_nth_unstable(held - 1);
                return Holdout {
                    seed,
                    last: Some(last),
                };
            }
            admitted *= 2.0;
        }
    }

    pub fn holds(&self, cell: u64) -> bool {
        self.last
            .is_some_and(|last| (cell_hash(cell, self.seed), cell) <= last)
    }
}

/// SplitMix64 of (cell, seed): uniform, so the smallest hashes are a uniform sample of cells.
fn cell_hash(cell: u64, seed: u64) -> u64 {
    let mut x = cell
        .wrapping_add(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .wrapping_add(0x632B_E59B_D9B4_E019);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// The cells a loader yields.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Cells {
    #[default]
    All,
    /// The cells the holdout does not hold.
    Training(Holdout),
    /// The cells it holds.
    HeldOut(Holdout),
}

impl Cells {
    pub fn includes(&self, cell: u64) -> bool {
        match self {
            Cells::All => true,
            Cells::Training(h) => !h.holds(cell),
            Cells::HeldOut(h) => h.holds(cell),
        }
    }
}

impl Default for LoaderConfig {
    fn default() -> Self {
        LoaderConfig {
            batch_size: 128,
            block_cells: 1024,
            blocks_per_fetch: 8,
            fetch_bytes: 512 << 20,
            prefetch: 8,
            shuffle: true,
            seed: 0,
            batch_key: None,
            label_key: None,
            unlabeled_category: None,
            categorical_keys: Vec::new(),
            numeric_keys: Vec::new(),
            matrix: "X".into(),
            cache_bytes: 0,
            cells: Cells::All,
        }
    }
}

/// One modality's part of a mini-batch, rows aligned with `MiniBatch::cells`.
#[derive(Debug, Clone, PartialEq)]
pub struct ModalityBatch {
    pub name: String,
    /// Counts; a cell without this modality has an empty row.
    pub counts: Csr,
    /// Per-cell total counts (library size), 0 where absent.
    pub library: Vec<f32>,
    /// Whether each cell was measured in this modality.
    pub present: Vec<bool>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct MiniBatch {
    /// Global cell indices.
    pub cells: Vec<u64>,
    pub modalities: Vec<ModalityBatch>,
    pub batch: Vec<i32>,
    pub label: Vec<i32>,
    /// rows × `categorical_keys` codes, row-major (-1 = missing).
    pub categorical: Vec<i32>,
    /// rows × `numeric_keys` values, row-major (NaN = missing).
    pub numeric: Vec<f64>,
}

impl MiniBatch {
    /// Appends `other`'s cells (a batch of the same loader: same modalities and columns).
    pub fn append(&mut self, other: &MiniBatch) {
        self.cells.extend_from_slice(&other.cells);
        for (mine, theirs) in self.modalities.iter_mut().zip(&other.modalities) {
            mine.counts.append_rows(&theirs.counts);
            mine.library.extend_from_slice(&theirs.library);
            mine.present.extend_from_slice(&theirs.present);
        }
        self.batch.extend_from_slice(&other.batch);
        self.label.extend_from_slice(&other.label);
        self.categorical.extend_from_slice(&other.categorical);
        self.numeric.extend_from_slice(&other.numeric);
    }
}

/// A modality's matrix and, for MuData, the map from global cells to its rows.
#[derive(Debug, Clone)]
struct Source {
    name: String,
    adata: AnnData,
    matrix: Matrix,
    /// 1-based row per global cell, 0 = absent; None when every cell has a row (AnnData).
    obsmap: Option<Vec<u32>>,
}

impl Source {
    /// Reads global cells `range`, with presence.
    fn read(&self, range: Range<u64>) -> Result<(Csr, Vec<bool>)> {
        let Some(map) = &self.obsmap else {
            let csr = self.matrix.read_rows(&self.adata.store, range.clone())?;
            return Ok((csr, vec![true; (range.end - range.start) as usize]));
        };
        let rows: Vec<Option<u64>> = map[range.start as usize..range.end as usize]
            .iter()
            .map(|&m| (m > 0).then(|| u64::from(m) - 1))
            .collect();
        let present: Vec<bool> = rows.iter().map(Option::is_some).collect();
        let (lo, hi) = rows
            .iter()
            .flatten()
            .fold((u64::MAX, 0), |(lo, hi), &r| (lo.min(r), hi.max(r + 1)));
        let n_cols = self.matrix.shape.1 as usize;
        if lo >= hi {
            return Ok((
                Csr {
                    n_rows: rows.len(),
                    n_cols,
                    indptr: vec![0; rows.len() + 1],
                    ..Default::default()
                },
                present,
            ));
        }
        let span = self.matrix.read_rows(&self.adata.store, lo..hi)?;
        let mut out = Csr {
            n_rows: rows.len(),
            n_cols,
            indptr: Vec::with_capacity(rows.len() + 1),
            ..Default::default()
        };
        out.indptr.push(0);
        for row in &rows {
            if let Some(r) = row {
                let (idx, val) = span.row((r - lo) as usize);
                out.indices.extend_from_slice(idx);
                out.data.extend_from_slice(val);
            }
            out.indptr.push(out.data.len() as u64);
        }
        Ok((out, present))
    }
}

/// Streams mini-batches of one shard, epoch by epoch.
#[derive(Debug, Clone)]
pub struct Loader {
    sources: Arc<Vec<Source>>,
    batch: Arc<Vec<i32>>,
    label: Arc<Vec<i32>>,
    /// n_obs × categorical keys, row-major.
    categorical: Arc<Vec<i32>>,
    /// n_obs × numeric keys, row-major.
    numeric: Arc<Vec<f64>>,
    pub batch_categories: Vec<String>,
    pub label_categories: Vec<String>,
    /// Per categorical key, its categories (codes index them).
    pub categorical_categories: Vec<Vec<String>>,
    shard: Range<u64>,
    config: LoaderConfig,
    /// Shared by the clones that run epochs, so every epoch finds what earlier ones decoded.
    cache: Arc<BlockCache>,
}

/// Decoded blocks by (modality, first cell), within a byte budget: a block that does not fit
/// is not kept (blocks are not evicted, so a fixed set stays resident and the rest streams).
#[derive(Default)]
struct BlockCache {
    budget: u64,
    /// Bytes held, and the blocks.
    blocks: Mutex<(u64, Blocks)>,
}

/// Keyed by (modality, first cell, end): shards of one loader cut blocks at different ends.
type Blocks = HashMap<(usize, u64, u64), Arc<BlockRead>>;

impl std::fmt::Debug for BlockCache {
    /// The budget and what is held, not the cells.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockCache")
            .field("budget", &self.budget)
            .field("used", &self.used())
            .finish()
    }
}

impl BlockCache {
    fn get(&self, source: usize, cells: &Range<u64>) -> Option<Arc<BlockRead>> {
        self.blocks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .1
            .get(&(source, cells.start, cells.end))
            .cloned()
    }

    fn offer(&self, source: usize, cells: &Range<u64>, block: &Arc<BlockRead>) {
        let (csr, present) = &**block;
        let bytes =
            (csr.indices.len() * 4 + csr.data.len() * 4 + csr.indptr.len() * 8 + present.len())
                as u64;
        let mut guard = self.blocks.lock().unwrap_or_else(PoisonError::into_inner);
        let (used, map) = &mut *guard;
        let key = (source, cells.start, cells.end);
        if *used + bytes <= self.budget && !map.contains_key(&key) {
            *used += bytes;
            map.insert(key, Arc::clone(block));
        }
    }

    /// Bytes held.
    fn used(&self) -> u64 {
        self.blocks.lock().unwrap_or_else(PoisonError::into_inner).0
    }
}

impl Loader {
    /// A loader over cells `shard` of `dataset` (all modalities of a MuData store).
    pub fn new(dataset: &Dataset, shard: Range<u64>, config: LoaderConfig) -> Result<Loader> {
        let store = dataset.store();
        if shard.end > dataset.n_obs() || shard.start >= shard.end {
            return Err(DataError::Invalid {
                store: store.name(),
                path: "obs".into(),
                problem: format!(
                    "shard {}..{} is empty or outside the {} cells",
                    shard.start,
                    shard.end,
                    dataset.n_obs()
                ),
            });
        }
        if config.batch_size == 0
            || config.block_cells == 0
            || config.blocks_per_fetch == 0
            || config.prefetch == 0
        {
            return Err(DataError::Invalid {
                store: store.name(),
                path: "loader".into(),
                problem: "batch size, block size, blocks per fetch and prefetch must be positive"
                    .into(),
            });
        }
        let sources: Vec<Source> = match dataset {
            Dataset::AnnData(a) => vec![Source {
                name: "X".into(),
                adata: a.clone(),
                matrix: a.matrix(&config.matrix)?,
                obsmap: None,
            }],
            Dataset::MuData(m) => m
                .modalities
                .iter()
                .zip(&m.obsmap)
                .map(|((name, a), map)| {
                    Ok(Source {
                        name: name.clone(),
                        adata: a.clone(),
                        matrix: a.matrix(&config.matrix)?,
                        obsmap: Some(map.clone()),
                    })
                })
                .collect::<Result<_>>()?,
        };
        let obs_column = |key: &str| -> Result<crate::dataframe::Column> {
            let column = match dataset {
                Dataset::AnnData(a) => a.obs_column(key)?,
                Dataset::MuData(m) => m.obs_column(key)?,
            };
            if column.len() as u64 != dataset.n_obs() {
                return Err(DataError::Invalid {
                    store: store.name(),
                    path: format!("obs/{key}"),
                    problem: format!("{} values for {} cells", column.len(), dataset.n_obs()),
                });
            }
            Ok(column)
        };
        let codes = |key: &Option<String>| -> Result<(Vec<i32>, Vec<String>)> {
            let Some(key) = key else {
                return Ok((vec![-1; dataset.n_obs() as usize], Vec::new()));
            };
            let column = obs_column(key)?;
            column.codes().ok_or_else(|| DataError::DataType {
                store: store.name(),
                path: format!("obs/{key}"),
                found: column.kind().into(),
                expected: "a categorical, string, integer or boolean column".into(),
            })
        };
        let (batch, batch_categories) = codes(&config.batch_key)?;
        let (label, label_categories) = without_category(
            codes(&config.label_key)?,
            config.unlabeled_category.as_deref(),
        );
        let (categorical, categorical_categories): (Vec<Vec<i32>>, Vec<Vec<String>>) = config
            .categorical_keys
            .iter()
            .map(|key| codes(&Some(key.clone())))
            .collect::<Result<Vec<_>>>()?
            .into_iter()
            .unzip();
        let categorical = row_major(dataset.n_obs() as usize, &categorical);
        let columns: Vec<Vec<f64>> = config
            .numeric_keys
            .iter()
            .map(|key| {
                let column = obs_column(key)?;
                column.numbers().ok_or_else(|| DataError::DataType {
                    store: store.name(),
                    path: format!("obs/{key}"),
                    found: column.kind().into(),
                    expected: "a numeric or boolean column".into(),
                })
            })
            .collect::<Result<_>>()?;
        let numeric = row_major(dataset.n_obs() as usize, &columns);
        // Attached matrices are in memory already: a cache would only copy them.
        let in_memory = sources.iter().all(|s| s.matrix.in_memory());
        let cache = Arc::new(BlockCache {
            budget: if in_memory { 0 } else { config.cache_bytes },
            ..BlockCache::default()
        });
        Ok(Loader {
            sources: Arc::new(sources),
            batch: Arc::new(batch),
            label: Arc::new(label),
            categorical: Arc::new(categorical),
            numeric: Arc::new(numeric),
            batch_categories,
            label_categories,
            categorical_categories,
            shard,
            config,
            cache,
        })
    }

    /// Cells whose value of the numeric column `key` (one of `numeric_keys`) is NaN or
    /// infinite; 0 for a key the loader does not carry.
    pub fn numeric_missing(&self, key: &str) -> usize {
        let k = self.config.numeric_keys.len();
        let Some(j) = self.config.numeric_keys.iter().position(|n| n == key) else {
            return 0;
        };
        self.numeric
            .iter()
            .skip(j)
            .step_by(k)
            .filter(|v| !v.is_finite())
            .count()
    }

    /// This loader's cells in store order (no shuffling), sharing its decoded blocks.
    pub fn ordered(&self) -> Loader {
        Loader {
            config: LoaderConfig {
                shuffle: false,
                ..self.config.clone()
            },
            ..self.clone()
        }
    }

    /// This loader yielding `cells` of its shard, sharing its decoded blocks.
    pub fn with_cells(&self, cells: Cells) -> Loader {
        Loader {
            config: LoaderConfig {
                cells,
                ..self.config.clone()
            },
            ..self.clone()
        }
    }

    /// A loader over `cells` (within this loader's shard) cutting batches of `batch_size`,
    /// sharing its obs columns and decoded blocks: one part of a data-parallel epoch.
    pub fn shard(&self, cells: Range<u64>, batch_size: usize) -> Result<Loader> {
        if cells.start < self.shard.start
            || cells.end > self.shard.end
            || cells.start >= cells.end
            || batch_size == 0
        {
            let store = self
                .sources
                .first()
                .map(|s| s.adata.store.name())
                .unwrap_or_default();
            return Err(DataError::Invalid {
                store,
                path: "obs".into(),
                problem: format!(
                    "shard {}..{} with batches of {batch_size}: expected a non-empty part of cells {}..{} and a positive batch size",
                    cells.start, cells.end, self.shard.start, self.shard.end
                ),
            });
        }
        Ok(Loader {
            shard: cells,
            config: LoaderConfig {
                batch_size,
                ..self.config.clone()
            },
            ..self.clone()
        })
    }

    /// Bytes of decoded blocks kept for later epochs.
    pub fn cached_bytes(&self) -> u64 {
        self.cache.used()
    }

    pub fn n_cells(&self) -> u64 {
        self.shard.end - self.shard.start
    }

    pub fn modality_names(&self) -> Vec<String> {
        self.sources.iter().map(|s| s.name.clone()).collect()
    }

    /// Decoded bytes of this loader's cells, estimated from the modalities' non-zeros (exact
    /// for CSR row pointers over the shard; pro rata otherwise), as the cache counts them.
    pub fn shard_bytes(&self) -> u64 {
        let cells = self.shard.end - self.shard.start;
        let nnz: u64 = (0..self.sources.len()).map(|m| self.shard_nnz(m)).sum();
        nnz * 8 + cells * (9 * self.sources.len() as u64)
    }

    /// Modality `m`'s non-zeros in this loader's cells: exact for CSR row pointers over the
    /// shard, pro rata otherwise (a MuData modality's rows are not the global cells).
    pub fn shard_nnz(&self, m: usize) -> u64 {
        let s = &self.sources[m];
        match &s.obsmap {
            None => s.matrix.nnz_in(self.shard.clone()),
            Some(map) => {
                s.matrix.nnz * (self.shard.end - self.shard.start) / map.len().max(1) as u64
            }
        }
    }

    /// The fetches of an epoch: groups of blocks, in shuffled order when shuffling, each of about
    /// `fetch_bytes` (at least `blocks_per_fetch` blocks) and of equal size (±1 block), so no
    /// fetch is a small remainder. Large fetches mix cells from across the store however it is
    /// ordered: a store sorted by batch would otherwise give minibatches, and BatchNorm
    /// statistics, of one or two batches, and a validation ELBO that jumps between epochs.
    fn fetches(&self, epoch: u64) -> Vec<Vec<Range<u64>>> {
        let c = &self.config;
        let mut blocks: Vec<Range<u64>> = (self.shard.start..self.shard.end)
            .step_by(c.block_cells as usize)
            .map(|s| s..(s + c.block_cells).min(self.shard.end))
            .collect();
        if c.shuffle {
            blocks.shuffle(&mut Xoshiro256PlusPlus::seed_from_u64(mix(
                c.seed,
                epoch,
                u64::MAX,
            )));
        }
        let n = blocks.len();
        let block_bytes = (self.shard_bytes() / n as u64).max(1);
        let per_fetch = c
            .blocks_per_fetch
            .max(usize::try_from(c.fetch_bytes / block_bytes).unwrap_or(usize::MAX))
            .min(n);
        let fetches = n.div_ceil(per_fetch);
        (0..fetches)
            .map(|i| blocks[i * n / fetches..(i + 1) * n / fetches].to_vec())
            .collect()
    }

    /// Starts the background pipeline for `epoch` and returns its batches in order: a reader
    /// thread decodes fetch k+1 (chunks in parallel) while an assembler thread shuffles fetch k
    /// and cuts it into batches.
    pub fn epoch(&self, epoch: u64) -> Epoch {
        let (fetch_tx, fetch_rx) = bounded::<Result<Fetch>>(1);
        let (tx, rx) = bounded(self.config.prefetch);
        let reader = {
            let loader = self.clone();
            std::thread::Builder::new()
                .name("tessera-read".into())
                .spawn(move || {
                    for (i, blocks) in loader.fetches(epoch).into_iter().enumerate() {
                        let fetched = loader.read_fetch(&blocks).map(|parts| Fetch {
                            seed: mix(loader.config.seed, epoch, i as u64),
                            blocks,
                            parts,
                        });
                        let failed = fetched.is_err();
                        if fetch_tx.send(fetched).is_err() || failed {
                            return;
                        }
                    }
                })
        };
        let assembler = {
            let loader = self.clone();
            std::thread::Builder::new()
                .name("tessera-batch".into())
                .spawn(move || {
                    for fetched in fetch_rx {
                        let batches = match fetched {
                            Ok(fetch) => loader.assemble(&fetch),
                            Err(e) => {
                                let _ = tx.send(Err(e));
                                return;
                            }
                        };
                        for b in batches {
                            if tx.send(Ok(b)).is_err() {
                                return; // the consumer dropped the epoch
                            }
                        }
                    }
                })
        };
        match (reader, assembler) {
            (Ok(r), Ok(a)) => Epoch {
                rx,
                workers: vec![r, a],
            },
            (r, a) => {
                let (tx, rx) = bounded(1);
                let _ = tx.send(Err(DataError::Io {
                    context: "loader".into(),
                    reason: "cannot start loader threads".into(),
                }));
                Epoch {
                    rx,
                    workers: [r.ok(), a.ok()].into_iter().flatten().collect(),
                }
            }
        }
    }

    /// Every block of every modality, from the cache or read (blocks in parallel).
    fn read_fetch(&self, blocks: &[Range<u64>]) -> Result<Vec<Vec<Arc<BlockRead>>>> {
        use rayon::prelude::*;
        let read = |(i, s): (usize, &Source)| {
            blocks
                .par_iter()
                .map(|b| {
                    if let Some(hit) = self.cache.get(i, b) {
                        return Ok(hit);
                    }
                    let block = Arc::new(s.read(b.clone())?);
                    self.cache.offer(i, b, &block);
                    Ok(block)
                })
                .collect::<Result<Vec<_>>>()
        };
        self.sources.iter().enumerate().map(read).collect()
    }

    /// Shuffles the cells of a fetch together and cuts them into batches (in parallel).
    fn assemble(&self, fetch: &Fetch) -> Vec<MiniBatch> {
        use rayon::prelude::*;
        let blocks = &fetch.blocks;
        let cells = self.config.cells;
        let mut order: Vec<(usize, usize)> = blocks
            .iter()
            .enumerate()
            .flat_map(|(bi, b)| {
                (0..(b.end - b.start) as usize)
                    .filter(move |&r| cells.includes(b.start + r as u64))
                    .map(move |r| (bi, r))
            })
            .collect();
        if self.config.shuffle {
            order.shuffle(&mut Xoshiro256PlusPlus::seed_from_u64(fetch.seed));
        }
        order
            .par_chunks(self.config.batch_size)
            .map(|chunk| {
                let cells: Vec<u64> = chunk
                    .iter()
                    .map(|&(b, r)| blocks[b].start + r as u64)
                    .collect();
                let modalities = self
                    .sources
                    .iter()
                    .zip(&fetch.parts)
                    .map(|(source, blocks_read)| {
                        let nnz = chunk
                            .iter()
                            .map(|&(b, r)| blocks_read[b].0.row(r).0.len())
                            .sum();
                        let mut counts = Csr {
                            n_rows: chunk.len(),
                            n_cols: source.matrix.shape.1 as usize,
                            indptr: Vec::with_capacity(chunk.len() + 1),
                            indices: Vec::with_capacity(nnz),
                            data: Vec::with_capacity(nnz),
                        };
                        counts.indptr.push(0);
                        let mut present = Vec::with_capacity(chunk.len());
                        for &(b, r) in chunk {
                            let (csr, here) = &*blocks_read[b];
                            let (idx, val) = csr.row(r);
                            counts.indices.extend_from_slice(idx);
                            counts.data.extend_from_slice(val);
                            counts.indptr.push(counts.data.len() as u64);
                            present.push(here[r]);
                        }
                        ModalityBatch {
                            name: source.name.clone(),
                            library: counts.row_sums(),
                            counts,
                            present,
                        }
                    })
                    .collect();
                MiniBatch {
                    batch: cells.iter().map(|&c| self.batch[c as usize]).collect(),
                    label: cells.iter().map(|&c| self.label[c as usize]).collect(),
                    categorical: rows_of(
                        &self.categorical,
                        self.config.categorical_keys.len(),
                        &cells,
                    ),
                    numeric: rows_of(&self.numeric, self.config.numeric_keys.len(), &cells),
                    cells,
                    modalities,
                }
            })
            .collect()
    }
}

/// `codes` over `categories` with `dropped` (when it is one) taken out: its cells get -1 and the
/// later categories' codes move down by one.
fn without_category(
    (codes, categories): (Vec<i32>, Vec<String>),
    dropped: Option<&str>,
) -> (Vec<i32>, Vec<String>) {
    let Some(d) = dropped.and_then(|name| categories.iter().position(|c| c == name)) else {
        return (codes, categories);
    };
    let d = d as i32;
    let codes = codes
        .into_iter()
        .map(|c| match c.cmp(&d) {
            std::cmp::Ordering::Less => c,
            std::cmp::Ordering::Equal => -1,
            std::cmp::Ordering::Greater => c - 1,
        })
        .collect();
    let categories = categories
        .into_iter()
        .enumerate()
        .filter(|&(i, _)| i as i32 != d)
        .map(|(_, c)| c)
        .collect();
    (codes, categories)
}

/// Columns of n values each as one row-major n × columns table.
pub fn row_major<V: Copy>(n: usize, columns: &[Vec<V>]) -> Vec<V> {
    (0..n)
        .flat_map(|r| columns.iter().map(move |c| c[r]))
        .collect()
}

/// The rows of `cells` from a row-major table of `k` columns.
fn rows_of<V: Copy>(table: &[V], k: usize, cells: &[u64]) -> Vec<V> {
    cells
        .iter()
        .flat_map(|&c| table[c as usize * k..(c as usize + 1) * k].iter().copied())
        .collect()
}

/// One block of one modality: its rows and which cells were measured.
type BlockRead = (Csr, Vec<bool>);

/// Blocks read together, with their decoded rows per modality.
struct Fetch {
    seed: u64,
    blocks: Vec<Range<u64>>,
    parts: Vec<Vec<Arc<BlockRead>>>,
}

/// One epoch's batches, read ahead in the background.
#[derive(Debug)]
pub struct Epoch {
    rx: Receiver<Result<MiniBatch>>,
    workers: Vec<JoinHandle<()>>,
}

impl Iterator for Epoch {
    type Item = Result<MiniBatch>;
    fn next(&mut self) -> Option<Self::Item> {
        self.rx.recv().ok()
    }
}

impl Drop for Epoch {
    fn drop(&mut self) {
        // Dropping our receiver makes the assembler's next send fail; it exits and drops the
        // fetch channel, which stops the reader. Each finishes at most the fetch in hand.
        let (_, dead) = bounded::<Result<MiniBatch>>(0);
        drop(std::mem::replace(&mut self.rx, dead));
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}

fn mix(seed: u64, epoch: u64, i: u64) -> u64 {
    let mut x =
        seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ i.wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
    x ^= x >> 31;
    x.wrapping_mul(0xBF58_476D_1CE4_E5B9)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_unlabeled_category_becomes_missing_and_leaves_the_categories() {
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let column = (vec![0, 1, 2, -1, 1], names(&["B", "Unknown", "T"]));
        assert_eq!(
            without_category(column.clone(), Some("Unknown")),
            (vec![0, -1, 1, -1, -1], names(&["B", "T"]))
        );
        // A value the column does not have, or none: unchanged.
        assert_eq!(without_category(column.clone(), Some("NK")), column);
        assert_eq!(without_category(column.clone(), None), column);
    }
}
