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
        let picked: Vec<f32> = cells.iter().flat_map(|&c| x[c * d..(c + 1) * d].iter().copied()).collect();
        Columns::new(&picked, cells.len(), d)
    }

    pub fn n(&self) -> usize {
        self.n
    }

    pub fn point(&self, i: usize) -> Vec<f64> {
        (0..self.d).map(|k| self.values[k * self.n + i]).collect()
    }

    /// Distances from `point` to the cells `cells`, written to `out` (length `cells.len()`).
    pub fn distances(&self, point: &[f64], cells: Range<usize>, out: &mut [f64]) {
        debug_assert_eq!(out.len(), cells.len());
        out.fill(0.0);
        for (k, &p) in point.iter().enumerate() {
            let column = &self.values[k * self.n + cells.start..k * self.n + cells.end];
            for (o, &v) in out.iter_mut().zip(column) {
                let t = v - p;
                *o += t * t;
            }
        }
        for o in out.iter_mut() {
            *o = o.sqrt();
        }
    }
}

/// `f(i, distances from cell i to every cell)` for every cell, in parallel; results in cell order.
/// One pass serves every metric that needs a cell's full distance row (silhouette, kNN), so the
/// O(n²d) work is done once.
pub fn scan<T: Send>(columns: &Columns, f: impl Fn(usize, &[f64]) -> T + Sync) -> Vec<T> {
    let n = columns.n;
    (0..n)
        .into_par_iter()
        .map_init(
            || vec![0f64; n],
            |row, i| {
                columns.distances(&columns.point(i), 0..n, row);
                f(i, row)
            },
        )
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distances_match_the_definition() {
        let x = [0.0f32, 0.0, 3.0, 4.0, -1.0, 1.0];
        let c = Columns::new(&x, 3, 2);
        let mut out = [0.0; 3];
        c.distances(&c.point(1), 0..3, &mut out);
        assert_eq!(out, [5.0, 0.0, (16.0f64 + 9.0).sqrt()]);
        let s = Columns::subset(&x, 2, &[2, 0]);
        assert_eq!(s.point(0), vec![-1.0, 1.0]);
        let mut two = [0.0; 1];
        s.distances(&s.point(0), 1..2, &mut two);
        assert_eq!(two[0], 2f64.sqrt());
    }
}
