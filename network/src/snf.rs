//! SNF: each view's affinity is row-normalised and symmetrised (P), its K strongest edges per
//! row kept and row-normalised (S, sparse); then t times every view takes
//! P ← S · (Σ_{other views} P) · Sᵀ / (m − 1), plus α on the diagonal, symmetrised; the fused
//! network is the views' mean, row-normalised, symmetrised with ½ on the diagonal.
//!
//! S has K entries per row, so each product is two sparse-dense passes: 2·K·n² multiply-adds
//! per view and iteration instead of the dense 2·n³.

use rayon::prelude::*;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SnfParams {
    /// Neighbours kept per sample in the sparse kernel S.
    pub k: usize,
    /// Fusion iterations.
    pub t: usize,
    /// Added to the diagonal after each iteration.
    pub alpha: f64,
}

impl Default for SnfParams {
    fn default() -> Self {
        SnfParams { k: 20, t: 20, alpha: 1.0 }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum NetworkError {
    #[error("view {view}: {found} values for {n} x {n} samples")]
    Shape { view: usize, n: usize, found: usize },
    #[error("SNF needs at least 2 views, got {0}")]
    TooFewViews(usize),
    #[error("view {view}: entry ({row}, {col}) is {value}: affinities must be finite and >= 0")]
    BadValue { view: usize, row: usize, col: usize, value: f64 },
    #[error("k = {k}: expected 1 <= k < {n} samples")]
    BadK { k: usize, n: usize },
}

/// A sparse row-normalised kernel: per row, (column, weight) pairs.
type SparseRows = Vec<Vec<(usize, f64)>>;

/// (X + Xᵀ) / 2 in place (through a tiled transpose: walking columns directly misses the cache
/// on every element).
fn symmetrise(x: &mut [f64], n: usize) {
    let t = transpose(x, n);
    x.par_iter_mut().zip(t.par_iter()).for_each(|(v, &w)| *v = 0.5 * (*v + w));
}

/// The transpose of the n x n `x`, in cache-sized tiles.
fn transpose(x: &[f64], n: usize) -> Vec<f64> {
    const TILE: usize = 64;
    let mut out = vec![0.0; n * n];
    out.par_chunks_mut(TILE * n).enumerate().for_each(|(tile_row, block)| {
        let rows = tile_row * TILE..((tile_row + 1) * TILE).min(n);
        for c0 in (0..n).step_by(TILE) {
            for i in rows.clone() {
                for j in c0..(c0 + TILE).min(n) {
                    block[(i - rows.start) * n + j] = x[j * n + i];
                }
            }
        }
    });
    out
}

/// Each row divided by its sum (rows summing to 0 are left as they are).
fn normalise_rows(x: &mut [f64], n: usize) {
    x.par_chunks_mut(n).for_each(|row| {
        let s: f64 = row.iter().sum();
        if s != 0.0 {
            row.iter_mut().for_each(|v| *v /= s);
        }
    });
}

/// numpy's `percentile(row, q)` with linear interpolation (its two-sided lerp, so the cut
/// falls on the same side of every entry as numpy's does).
fn percentile(sorted: &[f64], q: f64) -> f64 {
    let pos = (q / 100.0).clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = (lo + 1).min(sorted.len() - 1);
    let t = pos - lo as f64;
    let (a, b) = (sorted[lo], sorted[hi]);
    if t >= 0.5 { b - (b - a) * (1.0 - t) } else { a + (b - a) * t }
}

/// snfpy's `_find_dominate_set`: entries below the row's (100 − 100·K/n)th percentile are
/// dropped, the rest row-normalised.
fn dominate_set(p: &[f64], n: usize, k: usize) -> SparseRows {
    let q = 100.0 - 100.0 * k as f64 / n as f64;
    p.par_chunks(n)
        .map(|row| {
            let mut sorted = row.to_vec();
            sorted.sort_by(f64::total_cmp);
            let cut = percentile(&sorted, q);
            let kept: Vec<(usize, f64)> = row.iter().enumerate().filter(|&(_, &v)| v >= cut).map(|(j, &v)| (j, v)).collect();
            let s: f64 = kept.iter().map(|e| e.1).sum();
            kept.into_iter().map(|(j, v)| (j, v / s)).collect()
        })
        .collect()
}

/// Rows fused per block: the block's rows of S·M are kept interleaved (n x BLOCK) so the second
/// product is BLOCK-wide vector multiply-adds instead of scalar gathers.
const BLOCK: usize = 8;

/// S · M · Sᵀ / divisor for sparse S and dense M (n x n), row block by row block: each block's
/// rows of S·M live only in a thread-local buffer, so the one n x n write is the result.
/// Per row: K·n multiply-adds for S·M (K rows of M streamed) and K·n for the product with Sᵀ.
fn sandwich_into(s: &SparseRows, m: &[f64], n: usize, divisor: f64, out: &mut [f64]) {
    let scale = 1.0 / divisor;
    out.par_chunks_mut(BLOCK * n).enumerate().for_each_init(
        || (vec![0.0; n], vec![[0.0f64; BLOCK]; n]),
        |(row, interleaved), (block, out_rows)| {
            let rows = out_rows.len() / n;
            for r in 0..rows {
                row.iter_mut().for_each(|v| *v = 0.0);
                for &(k, w) in &s[block * BLOCK + r] {
                    row.iter_mut().zip(&m[k * n..(k + 1) * n]).for_each(|(o, &v)| *o += w * v);
                }
                interleaved.iter_mut().zip(row.iter()).for_each(|(lane, &v)| lane[r] = v);
            }
            for (j, s_j) in s.iter().enumerate() {
                let mut acc = [0.0f64; BLOCK];
                for &(l, w) in s_j {
                    let lane = &interleaved[l];
                    for r in 0..BLOCK {
                        acc[r] += w * lane[r];
                    }
                }
                for r in 0..rows {
                    out_rows[r * n + j] = acc[r] * scale;
                }
            }
        },
    );
}

/// Fuses the views' n x n affinity matrices (row-major, symmetric or not) into one network.
pub fn snf(views: &[Vec<f64>], n: usize, params: SnfParams) -> Result<Vec<f64>, NetworkError> {
    let m = views.len();
    if m < 2 {
        return Err(NetworkError::TooFewViews(m));
    }
    if params.k == 0 || params.k >= n {
        return Err(NetworkError::BadK { k: params.k, n });
    }
    for (view, w) in views.iter().enumerate() {
        if w.len() != n * n {
            return Err(NetworkError::Shape { view, n, found: w.len() });
        }
        if let Some((at, &value)) = w.iter().enumerate().find(|&(_, &v)| !(v.is_finite() && v >= 0.0)) {
            return Err(NetworkError::BadValue { view, row: at / n, col: at % n, value });
        }
    }
    let mut p: Vec<Vec<f64>> = views
        .iter()
        .map(|w| {
            let mut x = w.clone();
            normalise_rows(&mut x, n);
            symmetrise(&mut x, n);
            x
        })
        .collect();
    let s: Vec<SparseRows> = p.iter().map(|x| dominate_set(x, n, params.k)).collect();
    let sum = |p: &[Vec<f64>], total: &mut [f64]| {
        total.par_chunks_mut(n).enumerate().for_each(|(i, row)| {
            row.copy_from_slice(&p[0][i * n..(i + 1) * n]);
            for x in &p[1..] {
                row.iter_mut().zip(&x[i * n..(i + 1) * n]).for_each(|(t, v)| *t += v);
            }
        })
    };
    let mut total = vec![0.0; n * n];
    sum(&p, &mut total);
    // P_v is needed only to form Σ_{other views} P = total − P_v, so that difference overwrites
    // it and the new P_v goes to `spare`: m + 2 matrices of n x n in all.
    let mut spare = vec![0.0; n * n];
    for _ in 0..params.t {
        for (pv, sv) in p.iter_mut().zip(&s) {
            pv.par_iter_mut().zip(total.par_iter()).for_each(|(v, t)| *v = t - *v);
            sandwich_into(sv, pv, n, (m - 1) as f64, &mut spare);
            for i in 0..n {
                spare[i * n + i] += params.alpha;
            }
            std::mem::swap(pv, &mut spare);
        }
        sum(&p, &mut total);
    }
    let mut w: Vec<f64> = total.into_iter().map(|v| v / m as f64).collect();
    normalise_rows(&mut w, n);
    // (W + Wᵀ + I) / 2.
    symmetrise(&mut w, n);
    for i in 0..n {
        w[i * n + i] += 0.5;
    }
    Ok(w)
}
