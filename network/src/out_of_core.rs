//! SNF out of core: the n x n matrices live in a store of square tiles, and only a few row
//! blocks are in memory at a time, so n is bounded by disk, not memory. The arithmetic is
//! [`crate::distributed`]'s with the ranks taken one after another: M = Σ_{other views} P is
//! row-local; since M is symmetric, rows of H = (S·M)ᵀ = M·Sᵀ come from the same rows of M;
//! a column block of H (tiles read down a column) gives rows of S·M·Sᵀ. The views' P are
//! double-buffered, so every view of an iteration reads the previous iteration's P.
//!
//! Store traffic per iteration and view: (m − 1) + 1 matrices read and 2 written
//! (n²·8 bytes each); memory: about 3 row blocks of n f64 plus the sparse S (m·n·K pairs).

use std::ops::Range;

use rayon::prelude::*;

use crate::error::NetworkError;
use crate::snf::{
    SnfParams, SparseRows, divide_by_shared, dominate_row, normalise_rows, sample_masks,
    sparse_product_rows,
};
use crate::spectral::Spectrum;
use crate::view::check_samples;

/// Square n x n f64 matrices stored as tiles of `block()` x `block()`, addressed by index.
pub trait TileStore {
    /// Rows (and columns) per tile; row blocks are read and written whole.
    fn block(&self) -> usize;
    /// Stores rows `rows` (`rows.len()` x n, row-major) of matrix `matrix`.
    fn write_rows(
        &mut self,
        matrix: usize,
        rows: Range<usize>,
        values: &[f64],
    ) -> Result<(), String>;
    /// Rows `rows` of matrix `matrix`, `rows.len()` x n.
    fn read_rows(&self, matrix: usize, rows: Range<usize>) -> Result<Vec<f64>, String>;
    /// Columns `cols` of every row of matrix `matrix`, n x `cols.len()`.
    fn read_columns(&self, matrix: usize, cols: Range<usize>) -> Result<Vec<f64>, String>;
}

/// How many n x n matrices SNF over `views` views keeps in the store.
pub fn matrices_needed(views: usize) -> usize {
    2 * views + 1
}

/// The store's row blocks of an n-row matrix.
pub fn row_blocks(n: usize, block: usize) -> Vec<Range<usize>> {
    let block = block.max(1);
    (0..n.div_ceil(block))
        .map(|b| b * block..((b + 1) * block).min(n))
        .collect()
}

fn store_error(matrix: usize, rows: &Range<usize>, problem: String) -> NetworkError {
    NetworkError::Store(format!(
        "matrix {matrix}, block {}..{}: {problem}",
        rows.start, rows.end
    ))
}

/// The store and its row blocks, with errors naming the matrix and block.
struct Tiles<'a, S: TileStore> {
    store: &'a mut S,
    blocks: Vec<Range<usize>>,
}

impl<S: TileStore> Tiles<'_, S> {
    fn write(
        &mut self,
        matrix: usize,
        rows: &Range<usize>,
        values: &[f64],
    ) -> Result<(), NetworkError> {
        self.store
            .write_rows(matrix, rows.clone(), values)
            .map_err(|e| store_error(matrix, rows, e))
    }

    fn read(&self, matrix: usize, rows: &Range<usize>, n: usize) -> Result<Vec<f64>, NetworkError> {
        let values = self
            .store
            .read_rows(matrix, rows.clone())
            .map_err(|e| store_error(matrix, rows, e))?;
        expect_len(values, rows.len() * n, matrix, rows)
    }

    fn read_columns(
        &self,
        matrix: usize,
        cols: &Range<usize>,
        n: usize,
    ) -> Result<Vec<f64>, NetworkError> {
        let values = self
            .store
            .read_columns(matrix, cols.clone())
            .map_err(|e| store_error(matrix, cols, e))?;
        expect_len(values, cols.len() * n, matrix, cols)
    }

    /// Rows `rows` of (X + Xᵀ)/2 for the stored matrix X.
    fn symmetric_rows(
        &self,
        matrix: usize,
        rows: &Range<usize>,
        n: usize,
    ) -> Result<Vec<f64>, NetworkError> {
        let mut x = self.read(matrix, rows, n)?;
        let columns = self.read_columns(matrix, rows, n)?;
        let width = rows.len();
        x.par_chunks_mut(n).enumerate().for_each(|(local, row)| {
            row.iter_mut()
                .enumerate()
                .for_each(|(c, v)| *v = 0.5 * (*v + columns[c * width + local]));
        });
        Ok(x)
    }
}

fn expect_len(
    values: Vec<f64>,
    len: usize,
    matrix: usize,
    rows: &Range<usize>,
) -> Result<Vec<f64>, NetworkError> {
    if values.len() == len {
        Ok(values)
    } else {
        Err(store_error(
            matrix,
            rows,
            format!("{} values returned, expected {len}", values.len()),
        ))
    }
}

/// Fuses `samples.len()` views over n samples with the matrices in `store` (which must hold
/// [`matrices_needed`] matrices of n x n) and returns the index of the matrix holding the
/// fused network. `samples[v]` lists the samples view v has (None: all);
/// `affinity_rows(v, rows)` gives rows `rows` of view v's affinity over all n samples
/// (`rows.len()` x n, zero where either sample is missing from the view). Equal to
/// [`crate::snf`] up to summation order.
pub fn snf_out_of_core<S: TileStore>(
    samples: &[Option<Vec<usize>>],
    n: usize,
    params: SnfParams,
    store: &mut S,
    mut affinity_rows: impl FnMut(usize, Range<usize>) -> Result<Vec<f64>, NetworkError>,
) -> Result<usize, NetworkError> {
    let m = samples.len();
    if m < 2 {
        return Err(NetworkError::TooFewViews(m));
    }
    if m > 64 {
        return Err(NetworkError::TooManyViews(m));
    }
    for (v, present) in samples.iter().enumerate() {
        check_samples(present.as_deref(), v, n)?;
        let size = present.as_ref().map_or(n, Vec::len);
        if params.k == 0 || params.k >= size {
            return Err(NetworkError::BadK {
                k: params.k,
                n: size,
            });
        }
    }
    let masks = sample_masks(samples.iter().map(Option::as_deref), n);
    let partial = samples.iter().any(Option::is_some);
    let p = |view: usize, parity: usize| 2 * view + parity;
    let h = 2 * m;
    let blocks = row_blocks(n, store.block());
    let mut tiles = Tiles { store, blocks };
    let blocks = tiles.blocks.clone();

    // P_v: affinity rows normalised (into parity 1), then symmetrised (parity 0); S_v from P_v.
    let mut s: Vec<SparseRows> = Vec::with_capacity(m);
    for (v, present) in samples.iter().enumerate() {
        for rows in &blocks {
            let mut x = affinity_rows(v, rows.clone())?;
            if x.len() != rows.len() * n {
                return Err(NetworkError::Shape {
                    view: v,
                    n,
                    found: x.len(),
                });
            }
            if let Some((at, &value)) = x
                .iter()
                .enumerate()
                .find(|&(_, &v)| !(v.is_finite() && v >= 0.0))
            {
                return Err(NetworkError::BadValue {
                    view: v,
                    row: rows.start + at / n,
                    col: at % n,
                    value,
                });
            }
            normalise_rows(&mut x, n);
            tiles.write(p(v, 1), rows, &x)?;
        }
        let mut sv: SparseRows = Vec::with_capacity(n);
        for rows in &blocks {
            let x = tiles.symmetric_rows(p(v, 1), rows, n)?;
            // K strongest among the samples the view has; a missing sample has no neighbours.
            let dominant: SparseRows = x
                .par_chunks(n)
                .zip(rows.clone())
                .map(|(row, i)| match present {
                    None => dominate_row(row, params.k),
                    Some(_) if masks[i] & (1 << v) == 0 => Vec::new(),
                    Some(list) => {
                        let local: Vec<f64> = list.iter().map(|&j| row[j]).collect();
                        dominate_row(&local, params.k)
                            .into_iter()
                            .map(|(j, w)| (list[j], w))
                            .collect()
                    }
                })
                .collect();
            sv.extend(dominant);
            tiles.write(p(v, 0), rows, &x)?;
        }
        s.push(sv);
    }

    // With missing samples each entry is divided by its pair's shared views instead.
    let scale = if partial { 1.0 } else { 1.0 / (m - 1) as f64 };
    for iteration in 0..params.t {
        let (now, next) = (iteration % 2, 1 - iteration % 2);
        for (v, sv) in s.iter().enumerate() {
            for rows in &blocks {
                let mut others = vec![0.0; rows.len() * n];
                for w in (0..m).filter(|&w| w != v) {
                    let x = tiles.read(p(w, now), rows, n)?;
                    others.par_iter_mut().zip(&x).for_each(|(o, x)| *o += x);
                }
                // Rows of (S·M)ᵀ = M·Sᵀ from the same rows of M: lanes are those rows.
                let mut half = vec![0.0; rows.len() * n];
                sparse_product_rows(sv, n, 1.0, &mut half, |slab, first, count| {
                    for r in 0..count {
                        let row = &others[(first + r) * n..(first + r + 1) * n];
                        slab.iter_mut().zip(row).for_each(|(lane, &x)| lane[r] = x);
                    }
                });
                tiles.write(h, rows, &half)?;
            }
            for rows in &blocks {
                // Columns `rows` of H (n x width) give rows `rows` of (S·H)ᵀ = S·M·Sᵀ.
                let columns = tiles.read_columns(h, rows, n)?;
                let width = rows.len();
                let mut fused = vec![0.0; width * n];
                sparse_product_rows(sv, n, scale, &mut fused, |slab, first, count| {
                    for (l, lane) in slab.iter_mut().enumerate() {
                        lane[..count].copy_from_slice(
                            &columns[l * width + first..l * width + first + count],
                        );
                    }
                });
                if partial {
                    divide_by_shared(&mut fused, n, rows.start, &masks);
                }
                for (local, i) in rows.clone().enumerate() {
                    fused[local * n + i] += params.alpha;
                }
                tiles.write(p(v, next), rows, &fused)?;
            }
        }
    }

    // The views' mean, row-normalised (into H), then (W + Wᵀ + I)/2 into a free P buffer.
    let last = params.t % 2;
    for rows in &blocks {
        let mut mean = tiles.read(p(0, last), rows, n)?;
        for v in 1..m {
            let x = tiles.read(p(v, last), rows, n)?;
            mean.par_iter_mut().zip(&x).for_each(|(a, x)| *a += x);
        }
        mean.par_iter_mut().for_each(|a| *a /= m as f64);
        normalise_rows(&mut mean, n);
        tiles.write(h, rows, &mean)?;
    }
    let network = p(0, 1 - last);
    for rows in &blocks {
        let mut w = tiles.symmetric_rows(h, rows, n)?;
        for (local, i) in rows.clone().enumerate() {
            w[local * n + i] += 0.5;
        }
        tiles.write(network, rows, &w)?;
    }
    Ok(network)
}

/// The spectrum ([`Spectrum::of`]) of the symmetric network stored as matrix `matrix`, one
/// pass over its row blocks per product.
pub fn stored_spectrum<S: TileStore>(
    store: &S,
    matrix: usize,
    n: usize,
    count: usize,
    seed: u64,
) -> Result<Spectrum, NetworkError> {
    let blocks = row_blocks(n, store.block());
    let read = |rows: &Range<usize>| -> Result<Vec<f64>, NetworkError> {
        let values = store
            .read_rows(matrix, rows.clone())
            .map_err(|e| store_error(matrix, rows, e))?;
        expect_len(values, rows.len() * n, matrix, rows)
    };
    // Row sums and products leave the diagonal out, as the normalised affinity does.
    let mut degree = Vec::with_capacity(n);
    for rows in &blocks {
        let x = read(rows)?;
        degree.extend(
            x.par_chunks(n)
                .zip(rows.clone())
                .map(|(row, i)| row.iter().sum::<f64>() - row[i])
                .collect::<Vec<f64>>(),
        );
    }
    Spectrum::of_operator(&degree, count.min(n), seed, |u: &[f64]| {
        let mut out = Vec::with_capacity(n);
        for rows in &blocks {
            let x = read(rows)?;
            out.extend(
                x.par_chunks(n)
                    .zip(rows.clone())
                    .map(|(row, i)| {
                        row.iter().zip(u).map(|(a, b)| a * b).sum::<f64>() - row[i] * u[i]
                    })
                    .collect::<Vec<f64>>(),
            );
        }
        Ok(out)
    })
}

/// Square matrices held in memory, tile layout ignored: the reference [`TileStore`] for tests.
#[derive(Debug, Clone)]
pub struct MemoryTiles {
    n: usize,
    block: usize,
    matrices: Vec<Vec<f64>>,
}

impl MemoryTiles {
    pub fn new(n: usize, block: usize, count: usize) -> MemoryTiles {
        MemoryTiles {
            n,
            block,
            matrices: vec![vec![0.0; n * n]; count],
        }
    }

    pub fn matrix(&self, index: usize) -> &[f64] {
        &self.matrices[index]
    }
}

impl TileStore for MemoryTiles {
    fn block(&self) -> usize {
        self.block
    }

    fn write_rows(
        &mut self,
        matrix: usize,
        rows: Range<usize>,
        values: &[f64],
    ) -> Result<(), String> {
        let n = self.n;
        let target = self
            .matrices
            .get_mut(matrix)
            .ok_or_else(|| format!("no matrix {matrix}"))?;
        target[rows.start * n..rows.end * n].copy_from_slice(values);
        Ok(())
    }

    fn read_rows(&self, matrix: usize, rows: Range<usize>) -> Result<Vec<f64>, String> {
        let n = self.n;
        Ok(self
            .matrices
            .get(matrix)
            .ok_or_else(|| format!("no matrix {matrix}"))?[rows.start * n..rows.end * n]
            .to_vec())
    }

    fn read_columns(&self, matrix: usize, cols: Range<usize>) -> Result<Vec<f64>, String> {
        let x = self
            .matrices
            .get(matrix)
            .ok_or_else(|| format!("no matrix {matrix}"))?;
        Ok(x.chunks(self.n)
            .flat_map(|row| row[cols.clone()].iter().copied())
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::View;

    fn affinity(n: usize, v: usize) -> Vec<f64> {
        let x: Vec<f64> = (0..n)
            .map(|i| ((i * (7 + v) % 13) as f64) + (i % 3) as f64 * 5.0)
            .collect();
        (0..n * n)
            .map(|e| (-((x[e / n] - x[e % n]).powi(2)) / (4.0 + v as f64)).exp() + 1e-3)
            .collect()
    }

    fn max_diff(a: &[f64], b: &[f64]) -> f64 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max)
    }

    #[test]
    fn tiles_fuse_to_the_in_memory_network() {
        let (n, m) = (61, 3);
        for (t, block) in [(8, 16), (7, 61), (0, 5), (3, 1)] {
            let params = SnfParams {
                k: 6,
                t,
                alpha: 1.0,
            };
            let whole = crate::snf(
                (0..m).map(|v| View::complete(affinity(n, v))).collect(),
                n,
                params,
            )
            .unwrap();
            let mut store = MemoryTiles::new(n, block, matrices_needed(m));
            let at = snf_out_of_core(&vec![None; m], n, params, &mut store, |v, rows| {
                Ok(affinity(n, v)[rows.start * n..rows.end * n].to_vec())
            })
            .unwrap();
            let diff = max_diff(store.matrix(at), &whole);
            assert!(
                diff < 1e-13,
                "t {t}, block {block}: out of core differs by {diff}"
            );
            // The spectrum read block by block is the in-memory one.
            let stored = stored_spectrum(&store, at, n, 4, 7).unwrap();
            let dense = Spectrum::of(&whole, n, 4, 7);
            assert!(
                max_diff(&stored.laplacian, &dense.laplacian) < 1e-10,
                "{:?} vs {:?}",
                stored.laplacian,
                dense.laplacian
            );
            assert_eq!(
                stored.clusters(3, 1).unwrap(),
                dense.clusters(3, 1).unwrap()
            );
        }
    }

    #[test]
    fn missing_samples_fuse_as_in_memory() {
        let (n, m) = (40, 3);
        let samples = vec![
            None,
            Some((0..n).filter(|i| i % 4 != 1).collect::<Vec<_>>()),
            Some((0..n).filter(|i| i % 5 != 2).collect::<Vec<_>>()),
        ];
        // View v's matrix over its samples, and the same placed among all n with zeros.
        let sub = |v: usize| -> Vec<f64> {
            let full = affinity(n, v);
            match &samples[v] {
                None => full,
                Some(list) => list
                    .iter()
                    .flat_map(|&i| list.iter().map(move |&j| (i, j)))
                    .map(|(i, j)| full[i * n + j])
                    .collect(),
            }
        };
        let views: Vec<View> = (0..m)
            .map(|v| View {
                samples: samples[v].clone(),
                affinity: sub(v),
            })
            .collect();
        let params = SnfParams {
            k: 5,
            t: 6,
            alpha: 1.0,
        };
        let whole = crate::snf(views.clone(), n, params).unwrap();
        let mut store = MemoryTiles::new(n, 16, matrices_needed(m));
        let at = snf_out_of_core(&samples, n, params, &mut store, |v, rows| {
            Ok(views[v].expand(sub(v), n)[rows.start * n..rows.end * n].to_vec())
        })
        .unwrap();
        let diff = max_diff(store.matrix(at), &whole);
        assert!(
            diff < 1e-13,
            "out of core with missing samples differs by {diff}"
        );
    }

    #[test]
    fn bad_inputs_and_store_failures_are_errors() {
        let n = 10;
        let params = SnfParams {
            k: 3,
            t: 2,
            alpha: 1.0,
        };
        let rows_of = |v: usize, rows: Range<usize>| {
            Ok(affinity(n, v)[rows.start * n..rows.end * n].to_vec())
        };
        let mut store = MemoryTiles::new(n, 4, matrices_needed(2));
        assert_eq!(
            snf_out_of_core(&[None], n, params, &mut store, rows_of),
            Err(NetworkError::TooFewViews(1))
        );
        assert_eq!(
            snf_out_of_core(&[None, Some(vec![0, 1, 2])], n, params, &mut store, rows_of),
            Err(NetworkError::BadK { k: 3, n: 3 })
        );
        assert!(matches!(
            snf_out_of_core(
                &[None, Some(vec![3, 2, 5, 6])],
                n,
                params,
                &mut store,
                rows_of
            ),
            Err(NetworkError::Samples { view: 1, .. })
        ));
        let short = |_: usize, rows: Range<usize>| Ok(vec![1.0; rows.len() * n - 1]);
        assert_eq!(
            snf_out_of_core(&[None, None], n, params, &mut store, short),
            Err(NetworkError::Shape {
                view: 0,
                n,
                found: 4 * n - 1
            })
        );
        let negative = |v: usize, rows: Range<usize>| {
            Ok(vec![if v == 1 { -1.0 } else { 1.0 }; rows.len() * n])
        };
        assert_eq!(
            snf_out_of_core(&[None, None], n, params, &mut store, negative),
            Err(NetworkError::BadValue {
                view: 1,
                row: 0,
                col: 0,
                value: -1.0
            })
        );
        // A store without room for every matrix fails naming the matrix and the block.
        let mut small = MemoryTiles::new(n, 4, 3);
        match snf_out_of_core(&[None, None], n, params, &mut small, rows_of) {
            Err(NetworkError::Store(problem)) => assert!(
                problem.contains("matrix 3, block 0..4") && problem.contains("no matrix 3"),
                "{problem}"
            ),
            other => panic!("expected a store error, got {other:?}"),
        }
    }
}
