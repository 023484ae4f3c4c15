//! Sample-similarity kernels for network methods (SNF, NEMO, kernel averaging): per-feature
//! z-scores, pairwise squared Euclidean distances through one GEMM, and SNFtool's scaled
//! exponential affinity, and SNF's sparse product. CPU references; `affinity.cu` holds the CUDA
//! kernels (`gpu.rs` their launchers).
//!
//! Semantics follow snfpy 0.2.2 (`make_affinity`, `affinity_matrix`), so fused networks can be
//! compared with it entry by entry.

pub mod gpu;

use std::ops::Range;

use rayon::prelude::*;

use super::linear::Gemm;
use crate::real::Real;

pub const CUDA_SOURCE: &str = include_str!("affinity.cu");

/// Standardises each column of the row-major n x d `x` in place: mean 0, sample standard
/// deviation 1 (ddof = 1, as `scipy.stats.zscore(ddof=1)`); a constant column becomes 0.
pub fn zscore_columns<T: Real>(x: &mut [T], n: usize, d: usize) {
    assert_eq!(x.len(), n * d, "zscore_columns: x is not n x d");
    if n < 2 {
        x.iter_mut().for_each(|v| *v = T::zero());
        return;
    }
    for j in 0..d {
        let mean = (0..n).map(|i| x[i * d + j].f64()).sum::<f64>() / n as f64;
        let var = (0..n)
            .map(|i| (x[i * d + j].f64() - mean).powi(2))
            .sum::<f64>()
            / (n - 1) as f64;
        let sd = var.sqrt();
        for i in 0..n {
            let z = if sd > 0.0 {
                (x[i * d + j].f64() - mean) / sd
            } else {
                0.0
            };
            x[i * d + j] = T::of(z);
        }
    }
}

/// Rows `rows` of the squared Euclidean distances between the rows of the n x d `x`, into
/// `out` (rows.len() x n): |xi|² + |xj|² − 2 xi·xj (one GEMM), clamped at 0, exactly 0 on the
/// diagonal. A row block is what one rank of a distributed SNF holds.
pub fn sq_euclidean_rows<T: Gemm>(x: &[T], n: usize, d: usize, rows: Range<usize>, out: &mut [T]) {
    assert_eq!(x.len(), n * d, "sq_euclidean_rows: x is not n x d");
    assert!(rows.end <= n, "sq_euclidean_rows: rows {rows:?} beyond {n}");
    assert_eq!(
        out.len(),
        rows.len() * n,
        "sq_euclidean_rows: out is not rows x n"
    );
    T::gemm(
        false,
        true,
        rows.len(),
        d,
        n,
        T::of(-2.0),
        &x[rows.start * d..rows.end * d],
        x,
        T::zero(),
        out,
    );
    let norms: Vec<T> = x
        .chunks(d.max(1))
        .take(n)
        .map(|r| r.iter().fold(T::zero(), |s, &v| s + v * v))
        .collect();
    out.par_chunks_mut(n).zip(rows).for_each(|(row, i)| {
        for (j, v) in row.iter_mut().enumerate() {
            *v = if i == j {
                T::zero()
            } else {
                (*v + norms[i] + norms[j]).max(T::zero())
            };
        }
    });
}

/// out (n x n) = squared Euclidean distances between the rows of the n x d `x`, exactly
/// symmetric (the GEMM's two triangles may round differently: the upper one is kept).
pub fn sq_euclidean<T: Gemm>(x: &[T], n: usize, d: usize, out: &mut [T]) {
    distances(x, n, d, Metric::SqEuclidean, out);
}

/// A distance between samples, as scipy's `cdist` names it (snfpy's `metric`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    SqEuclidean,
    Euclidean,
    /// 1 − the cosine of the angle between the rows.
    Cosine,
    /// 1 − Pearson's correlation between the rows (the cosine of the centred rows).
    Correlation,
}

/// Rows `rows` of the n x n distances between the rows of the n x d `x` under `metric`, into
/// `out` (rows.len() x n), each by one GEMM; the diagonal is 0. A row without direction (all
/// zero for cosine, constant for correlation) is at distance 1 from every other row, where
/// scipy gives NaN.
pub fn distance_rows<T: Gemm>(
    x: &[T],
    n: usize,
    d: usize,
    rows: Range<usize>,
    metric: Metric,
    out: &mut [T],
) {
    match metric {
        Metric::SqEuclidean => sq_euclidean_rows(x, n, d, rows, out),
        Metric::Euclidean => {
            sq_euclidean_rows(x, n, d, rows, out);
            out.par_iter_mut().for_each(|v| *v = T::of(v.f64().sqrt()));
        }
        Metric::Cosine | Metric::Correlation => {
            assert_eq!(x.len(), n * d, "distance_rows: x is not n x d");
            assert_eq!(
                out.len(),
                rows.len() * n,
                "distance_rows: out is not rows x n"
            );
            let mut unit = x.to_vec();
            unit.par_chunks_mut(d.max(1)).for_each(|row| {
                let mean = if metric == Metric::Correlation {
                    row.iter().map(|v| v.f64()).sum::<f64>() / d as f64
                } else {
                    0.0
                };
                let norm = row
                    .iter()
                    .map(|v| (v.f64() - mean).powi(2))
                    .sum::<f64>()
                    .sqrt();
                row.iter_mut().for_each(|v| {
                    *v = T::of(if norm > 0.0 {
                        (v.f64() - mean) / norm
                    } else {
                        0.0
                    })
                });
            });
            let zero: Vec<bool> = unit
                .chunks(d.max(1))
                .map(|r| r.iter().all(|v| v.f64() == 0.0))
                .collect();
            T::gemm(
                false,
                true,
                rows.len(),
                d,
                n,
                T::of(1.0),
                &unit[rows.start * d..rows.end * d],
                &unit,
                T::zero(),
                out,
            );
            out.par_chunks_mut(n).zip(rows).for_each(|(row, i)| {
                for (j, v) in row.iter_mut().enumerate() {
                    *v = if i == j {
                        T::zero()
                    } else if zero[i] || zero[j] {
                        T::of(1.0)
                    } else {
                        T::of((1.0 - v.f64()).max(0.0))
                    };
                }
            });
        }
    }
}

/// The n x n distances under `metric` ([`distance_rows`] of every row), exactly symmetric.
pub fn distances<T: Gemm>(x: &[T], n: usize, d: usize, metric: Metric, out: &mut [T]) {
    distance_rows(x, n, d, 0..n, metric, out);
    for i in 0..n {
        for j in 0..i {
            out[i * n + j] = out[j * n + i];
        }
    }
}

/// The RBF (Gaussian) kernel exp(−γ ρ) of squared distances ρ, in place.
pub fn rbf<T: Real>(sq_dist: &mut [T], gamma: f64) {
    sq_dist
        .par_iter_mut()
        .for_each(|v| *v = T::of((-gamma * v.f64()).exp()));
}

/// (X + Xᵀ) / 2 of the n x n `x` in place, tile pair by tile pair (column walks would miss the
/// cache on every element).
pub fn symmetrise<T: Real>(x: &mut [T], n: usize) {
    assert_eq!(x.len(), n * n, "symmetrise: x is not n x n");
    const TILE: usize = 64;
    let half = T::of(0.5);
    for i0 in (0..n).step_by(TILE) {
        for j0 in (i0..n).step_by(TILE) {
            for i in i0..(i0 + TILE).min(n) {
                for j in j0.max(i + 1)..(j0 + TILE).min(n) {
                    let v = half * (x[i * n + j] + x[j * n + i]);
                    x[i * n + j] = v;
                    x[j * n + i] = v;
                }
            }
        }
    }
}

/// SNFtool's scaled exponential affinity (snfpy's `affinity_matrix`), turning the n x n
/// distance matrix in place into the affinity: distances symmetrised, the diagonal 0; with ρ̄ᵢ
/// the mean distance from i to its `k` nearest others, σᵢⱼ = (ρ̄ᵢ + ρ̄ⱼ + ρᵢⱼ) / 3 (plus machine
/// epsilon), W = N(ρᵢⱼ; 0, μ σᵢⱼ), symmetric.
pub fn scaled_exponential<T: Real>(dist: &mut [T], n: usize, k: usize, mu: f64) {
    assert_eq!(dist.len(), n * n, "scaled_exponential: dist is not n x n");
    symmetrise(dist, n);
    for i in 0..n {
        dist[i * n + i] = T::zero();
    }
    let near = mean_nearest(dist, n, k);
    exponential_rows(dist, n, &near, &near, mu);
}

/// A view's affinity from its n x d features, as snfpy's `make_affinity`: the features are
/// z-scored in place, then distances under `metric`, then [`scaled_exponential`] (k, mu).
pub fn feature_affinity<T: Gemm>(
    x: &mut [T],
    n: usize,
    d: usize,
    metric: Metric,
    k: usize,
    mu: f64,
) -> Vec<T> {
    zscore_columns(x, n, d);
    let mut w = vec![T::zero(); n * n];
    distances(x, n, d, metric, &mut w);
    scaled_exponential(&mut w, n, k, mu);
    w
}

/// For each row of distances (n long, its own entry 0): the mean of its `k` nearest others,
/// positions 1..=k of the sorted row as in snfpy's sort (only those k + 1 are put in order),
/// plus machine epsilon.
pub fn mean_nearest<T: Real>(dist_rows: &[T], n: usize, k: usize) -> Vec<f64> {
    let take = k.min(n.saturating_sub(1));
    dist_rows
        .par_chunks(n)
        .map(|row| {
            if take == 0 {
                return f64::EPSILON;
            }
            let mut row: Vec<f64> = row.iter().map(|v| v.f64()).collect();
            row.select_nth_unstable_by(take, f64::total_cmp);
            let nearest = &mut row[..=take];
            nearest.sort_by(f64::total_cmp);
            nearest[1..].iter().sum::<f64>() / take as f64 + f64::EPSILON
        })
        .collect()
}

/// Rows of distances turned in place into scaled exponential affinities, given the rows' own
/// [`mean_nearest`] values and every column's.
pub fn exponential_rows<T: Real>(
    dist_rows: &mut [T],
    n: usize,
    near_rows: &[f64],
    near_all: &[f64],
    mu: f64,
) {
    assert_eq!(
        dist_rows.len(),
        near_rows.len() * n,
        "exponential_rows: rows do not match their nearest means"
    );
    assert_eq!(
        near_all.len(),
        n,
        "exponential_rows: one nearest mean per column expected"
    );
    let eps = f64::EPSILON;
    let inv_sqrt_2pi = 1.0 / (2.0 * std::f64::consts::PI).sqrt();
    dist_rows
        .par_chunks_mut(n)
        .zip(near_rows)
        .for_each(|(row, &near_i)| {
            for (w, &near_j) in row.iter_mut().zip(near_all) {
                let rho = w.f64();
                let sigma = (near_i + near_j + rho) / 3.0;
                let sigma = if sigma > eps { sigma } else { 0.0 } + eps;
                let scale = mu * sigma;
                *w = T::of((-0.5 * (rho / scale).powi(2)).exp() * inv_sqrt_2pi / scale);
            }
        });
}

/// out = (S·X)ᵀ·scale for the n-row CSR S (`indptr`, `cols`, `vals`) and the dense row-major
/// n x n X: out[c][j] = scale · Σ_p vals[p]·X[cols[p]][c] over row j's entries. The plain
/// reference of SNF's fusion product (tessera-network runs a slab-blocked version of it).
pub fn sparse_times_dense_transposed(
    indptr: &[u64],
    cols: &[u32],
    vals: &[f64],
    x: &[f64],
    n: usize,
    scale: f64,
    out: &mut [f64],
) {
    assert!(
        indptr.len() == n + 1 && cols.len() == vals.len() && x.len() == n * n && out.len() == n * n,
        "sparse_times_dense_transposed: shapes"
    );
    for j in 0..n {
        for c in 0..n {
            let acc: f64 = (indptr[j] as usize..indptr[j + 1] as usize)
                .map(|p| vals[p] * x[cols[p] as usize * n + c])
                .sum();
            out[c * n + j] = scale * acc;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distances_equal_the_direct_sums() {
        let (n, d) = (7, 5);
        let x: Vec<f64> = (0..n * d)
            .map(|i| ((i * 37 % 11) as f64 - 5.0) * 0.3)
            .collect();
        let mut out = vec![0.0; n * n];
        sq_euclidean(&x, n, d, &mut out);
        for i in 0..n {
            for j in 0..n {
                let direct: f64 = (0..d).map(|c| (x[i * d + c] - x[j * d + c]).powi(2)).sum();
                assert!(
                    (out[i * n + j] - direct).abs() < 1e-12,
                    "({i},{j}): {} vs {direct}",
                    out[i * n + j]
                );
                assert_eq!(out[i * n + j], out[j * n + i]);
            }
        }
    }

    #[test]
    fn cosine_correlation_and_rbf_by_hand() {
        // Rows (1, 0, 0), (1, 1, 0), (2, 2, 2), (0, 0, 0).
        let x = [1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 2.0, 2.0, 2.0, 0.0, 0.0, 0.0];
        let mut out = [0.0; 16];
        distances(&x, 4, 3, Metric::Cosine, &mut out);
        assert!(
            (out[1] - (1.0 - 1.0 / 2f64.sqrt())).abs() < 1e-15
                && (out[2] - (1.0 - 1.0 / 3f64.sqrt())).abs() < 1e-15,
            "{out:?}"
        );
        assert_eq!(
            (out[3], out[12], out[15]),
            (1.0, 1.0, 0.0),
            "a zero row is at distance 1, itself at 0"
        );
        distances(&x, 4, 3, Metric::Correlation, &mut out);
        // (1, 0, 0) and (1, 1, 0) centred: (2, -1, -1)/3 and (1, 1, -2)/3: correlation 3/6.
        assert!((out[1] - 0.5).abs() < 1e-15, "{}", out[1]);
        assert_eq!(out[2], 1.0, "a constant row has no direction");
        distances(&x, 4, 3, Metric::Euclidean, &mut out);
        assert!((out[2] - 3.0).abs() < 1e-14, "|(1, 2, 2)| = 3: {}", out[2]);
        let mut k = [0.0, 2.0];
        rbf(&mut k, 0.5);
        assert_eq!(k, [1.0, (-1.0f64).exp()]);
    }

    #[test]
    fn zscores_have_mean_zero_and_unit_sample_deviation() {
        let (n, d) = (6, 2);
        let mut x: Vec<f64> = vec![1.0, 5.0, 2.0, 5.0, 3.0, 5.0, 4.0, 5.0, 5.0, 5.0, 9.0, 5.0];
        zscore_columns(&mut x, n, d);
        let col0: Vec<f64> = (0..n).map(|i| x[i * d]).collect();
        let mean = col0.iter().sum::<f64>() / n as f64;
        let var = col0.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
        assert!(mean.abs() < 1e-12 && (var - 1.0).abs() < 1e-12);
        assert!(
            (0..n).all(|i| x[i * d + 1] == 0.0),
            "a constant column becomes 0"
        );
    }

    #[test]
    fn affinity_matches_the_formula_by_hand() {
        // Three points on a line at 0, 1, 3: squared distances 1, 9, 4.
        let dist = [0.0, 1.0, 9.0, 1.0, 0.0, 4.0, 9.0, 4.0, 0.0];
        let mut w = dist;
        scaled_exponential(&mut w, 3, 1, 0.5);
        let eps = f64::EPSILON;
        let near = [1.0 + eps, 1.0 + eps, 4.0 + eps];
        let pdf = |x: f64, s: f64| {
            (-0.5 * (x / s).powi(2)).exp() / (s * (2.0 * std::f64::consts::PI).sqrt())
        };
        for (i, j, rho) in [(0, 1, 1.0), (0, 2, 9.0), (1, 2, 4.0), (1, 1, 0.0)] {
            let sigma = (near[i] + near[j] + rho) / 3.0 + eps;
            let expected = pdf(rho, 0.5 * sigma);
            assert!(
                (w[i * 3 + j] - expected).abs() <= 1e-14 * expected,
                "({i},{j}): {} vs {expected}",
                w[i * 3 + j]
            );
            assert_eq!(w[i * 3 + j], w[j * 3 + i]);
        }
    }
}
