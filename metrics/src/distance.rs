//! Exact Euclidean distances from one cell to all others, computed from differences (as
//! scib-metrics does) rather than the ‖x‖² + ‖y‖² − 2x·y expansion, whose cancellation would
//! blur the nearest neighbours. Cells are stored column-major so each coordinate's pass over
//! all cells vectorises.

use std::ops::Range;

use rayon::prelude::*;

#[derive(Debug, Clone)]
pub struct Columns {
    n: usize,
    d: usize,
    /// `values[k * n + j]`: coordinate k of cell j.
    values: Vec<f64>,
}

impl Columns {
    /// `x` is row-major `n x d`.
    pub fn new(x: &[f32], n: usize, d: usize) -> Columns {
        debug_assert_eq!(x.len(), n * d);
        let mut values = vec![0f64; n * d];
        for (j, row) in x.chunks_exact(d.max(1)).enumerate().take(n) {
            for (k, &v) in row.iter().enumerate() {
                values[k * n + j] = f64::from(v);
            }
        }
        Columns { n, d, values }
    }

    /// The rows `cells` (in that order) of a row-major `x`.
    pub fn subset(x: &[f32], d: usize, cells: &[usize]) -> Columns {
        let picked: Vec<f32> = cells
            .iter()
            .flat_map(|&c| x[c * d..(c + 1) * d].iter().copied())
            .collect();
        Columns::new(&picked, cells.len(), d)
    }

    pub fn n(&self) -> usize {
        self.n
    }

    pub fn point(&self, i: usize) -> Vec<f64> {
        (0..self.d).map(|k| self.values[k * self.n + i]).collect()
    }

    /// Distances from each cell of `queries` to every cell: row q of `out` (`queries.len() x n`)
    /// holds query `queries.start + q`. Tiled so a tile of each coordinate column is loaded once
    /// for the whole block of queries and the partial sums stay in L1.
    pub fn distances(&self, queries: Range<usize>, out: &mut [f64]) {
        let n = self.n;
        debug_assert_eq!(out.len(), queries.len() * n);
        let points: Vec<Vec<f64>> = queries.map(|i| self.point(i)).collect();
        for tile in (0..n).step_by(CELL_TILE) {
            let cells = tile..(tile + CELL_TILE).min(n);
            for q in 0..points.len() {
                out[q * n + cells.start..q * n + cells.end].fill(0.0);
            }
            for k in 0..self.d {
                let column = &self.values[k * n + cells.start..k * n + cells.end];
                for (q, point) in points.iter().enumerate() {
                    let p = point[k];
                    for (o, &v) in out[q * n + cells.start..q * n + cells.end]
                        .iter_mut()
                        .zip(column)
                    {
                        let t = v - p;
                        *o += t * t;
                    }
                }
            }
            for q in 0..points.len() {
                out[q * n + cells.start..q * n + cells.end]
                    .iter_mut()
                    .for_each(|o| *o = o.sqrt());
            }
        }
    }
}

/// Queries per block and cells per tile of [`Columns::distances`]: 8 partial-sum tiles of 256
/// f64 (16 KiB) plus a column tile fit in L1.
const QUERY_BLOCK: usize = 8;
const CELL_TILE: usize = 256;

/// `f(i, distances from cell i to every cell)` for every cell, in parallel; results in cell order.
/// One pass serves every metric that needs a cell's full distance row (silhouette, kNN), so the
/// O(n²d) work is done once.
pub fn scan<T: Send>(columns: &Columns, f: impl Fn(usize, &[f64]) -> T + Sync) -> Vec<T> {
    let n = columns.n;
    let blocks: Vec<Range<usize>> = (0..n)
        .step_by(QUERY_BLOCK)
        .map(|s| s..(s + QUERY_BLOCK).min(n))
        .collect();
    blocks
        .into_par_iter()
        .map_init(
            || vec![0f64; QUERY_BLOCK * n],
            |rows, block| {
                let rows = &mut rows[..block.len() * n];
                columns.distances(block.clone(), rows);
                block
                    .clone()
                    .zip(rows.chunks_exact(n))
                    .map(|(i, row)| f(i, row))
                    .collect::<Vec<T>>()
            },
        )
        .flat_map_iter(|results| results)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distances_match_the_definition() {
        let x = [0.0f32, 0.0, 3.0, 4.0, -1.0, 1.0];
        let c = Columns::new(&x, 3, 2);
        let mut out = [0.0; 6];
        c.distances(1..3, &mut out);
        assert_eq!(
            out,
            [
                5.0,
                0.0,
                (16.0f64 + 9.0).sqrt(),
                2f64.sqrt(),
                25f64.sqrt(),
                0.0
            ]
        );
        let s = Columns::subset(&x, 2, &[2, 0]);
        assert_eq!(s.point(0), vec![-1.0, 1.0]);
        // Rows beyond a tile and a query block, against the definition.
        let big: Vec<f32> = (0..600 * 3)
            .map(|v| ((v * 37) % 101) as f32 / 7.0)
            .collect();
        let rows = scan(&Columns::new(&big, 600, 3), |i, row| (i, row.to_vec()));
        for (i, row) in rows {
            for j in [0, 255, 256, 599] {
                let expected: f64 = (0..3)
                    .map(|k| (f64::from(big[i * 3 + k]) - f64::from(big[j * 3 + k])).powi(2))
                    .sum::<f64>()
                    .sqrt();
                assert_eq!(row[j], expected, "{i} {j}");
            }
        }
    }
}
