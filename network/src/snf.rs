//! SNF: each view's affinity is row-normalised and symmetrised (P), its K strongest edges per
//! row kept and row-normalised (S, sparse); then t times every view takes
//! P ← S · (Σ_{other views} P) · Sᵀ / (m − 1), plus α on the diagonal; the fused network is the
//! views' mean, row-normalised, symmetrised with ½ on the diagonal. (snfpy also symmetrises P
//! each iteration; S·M·Sᵀ with M symmetric is symmetric already, so that only averages rounding.)
//!
//! S has K entries per row, so each product is two sparse-dense passes: 2·K·n² multiply-adds
//! per view and iteration instead of the dense 2·n³.

use rayon::prelude::*;
use tessera_kernels::ops::affinity::symmetrise;

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
    #[error("{k} clusters: expected 1 <= clusters <= {n} samples")]
    BadClusters { k: usize, n: usize },
}

/// A sparse row-normalised kernel: per row, (column, weight) pairs.
type SparseRows = Vec<Vec<(usize, f64)>>;

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
/// falls on the same side of every entry as numpy's does). Reorders `row`: only the two order
/// statistics around the position are selected, not the whole row sorted.
fn percentile(row: &mut [f64], q: f64) -> f64 {
    let pos = (q / 100.0).clamp(0.0, 1.0) * (row.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let (_, &mut a, above) = row.select_nth_unstable_by(lo, f64::total_cmp);
    let b = above.iter().copied().min_by(f64::total_cmp).unwrap_or(a);
    let t = pos - lo as f64;
    if t >= 0.5 { b - (b - a) * (1.0 - t) } else { a + (b - a) * t }
}

/// snfpy's `_find_dominate_set`: entries below the row's (100 − 100·K/n)th percentile are
/// dropped, the rest row-normalised.
fn dominate_set(p: &[f64], n: usize, k: usize) -> SparseRows {
    let q = 100.0 - 100.0 * k as f64 / n as f64;
    p.par_chunks(n)
        .map(|row| {
            let cut = percentile(&mut row.to_vec(), q);
            let kept: Vec<(usize, f64)> = row.iter().enumerate().filter(|&(_, &v)| v >= cut).map(|(j, &v)| (j, v)).collect();
            let s: f64 = kept.iter().map(|e| e.1).sum();
            kept.into_iter().map(|(j, v)| (j, v / s)).collect()
        })
        .collect()
}

/// Columns of X handled together: their n x BLOCK slab is gathered once (one cache line per
/// row) and stays in L2 while every row of S reads it.
const BLOCK: usize = 16;

/// out = (S · X)ᵀ · scale for sparse S and dense X (n x n), slab by slab of X's columns:
/// out[c, j] = scale · Σ_{l ∈ S_j} s_jl X[l, c]. X is read once and out written once; the
/// K·n² multiply-adds read only the slab (BLOCK-wide, vectorised). Two of these make
/// S·M·Sᵀ = (S·(S·M)ᵀ)ᵀ without a transpose or an n x n temporary beyond the first product.
fn sparse_times_dense_transposed(s: &SparseRows, x: &[f64], n: usize, scale: f64, out: &mut [f64]) {
    out.par_chunks_mut(BLOCK * n).enumerate().for_each_init(
        || vec![[0.0f64; BLOCK]; n],
        |slab, (block, out_rows)| {
            let (c0, cols) = (block * BLOCK, out_rows.len() / n);
            for (l, lane) in slab.iter_mut().enumerate() {
                lane[..cols].copy_from_slice(&x[l * n + c0..l * n + c0 + cols]);
            }
            for (j, s_j) in s.iter().enumerate() {
                let mut acc = [0.0f64; BLOCK];
                for &(l, w) in s_j {
                    let lane = &slab[l];
                    for r in 0..BLOCK {
                        acc[r] += w * lane[r];
                    }
                }
                for r in 0..cols {
                    out_rows[r * n + j] = acc[r] * scale;
                }
            }
        },
    );
}

/// Fuses the views' n x n affinity matrices (row-major, symmetric or not) into one network.
/// The views are consumed: each becomes its working matrix, so memory is m + 2 matrices.
pub fn snf(views: Vec<Vec<f64>>, n: usize, params: SnfParams) -> Result<Vec<f64>, NetworkError> {
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
        .into_iter()
        .map(|mut x| {
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
    // P_v is needed only to form M = Σ_{other views} P = total − P_v, so M overwrites it, then
    // (S·M)ᵀ goes to `half` and S·M·Sᵀ back over M: m + 2 matrices of n x n in all.
    let mut half = vec![0.0; n * n];
    for _ in 0..params.t {
        for (pv, sv) in p.iter_mut().zip(&s) {
            pv.par_iter_mut().zip(total.par_iter()).for_each(|(v, t)| *v = t - *v);
            sparse_times_dense_transposed(sv, pv, n, 1.0, &mut half);
            sparse_times_dense_transposed(sv, &half, n, 1.0 / (m - 1) as f64, pv);
            for i in 0..n {
                pv[i * n + i] += params.alpha;
            }
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
