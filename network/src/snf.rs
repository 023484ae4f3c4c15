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

use crate::error::NetworkError;
use crate::view::View;

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
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
        SnfParams {
            k: 20,
            t: 20,
            alpha: 1.0,
        }
    }
}

/// A sparse row-normalised kernel: per row, (column, weight) pairs.
pub(crate) type SparseRows = Vec<Vec<(usize, f64)>>;

/// Each row divided by its sum (rows summing to 0 are left as they are).
pub(crate) fn normalise_rows(x: &mut [f64], n: usize) {
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
    if t >= 0.5 {
        b - (b - a) * (1.0 - t)
    } else {
        a + (b - a) * t
    }
}

/// snfpy's `_find_dominate_set` for one row: entries at or above the row's
/// (100 − 100·K/len)th percentile, row-normalised; columns are positions in `row`.
pub(crate) fn dominate_row(row: &[f64], k: usize) -> Vec<(usize, f64)> {
    let cut = percentile(
        &mut row.to_vec(),
        100.0 - 100.0 * k as f64 / row.len() as f64,
    );
    let kept: Vec<(usize, f64)> = row
        .iter()
        .enumerate()
        .filter(|&(_, &v)| v >= cut)
        .map(|(j, &v)| (j, v))
        .collect();
    let s: f64 = kept.iter().map(|e| e.1).sum();
    kept.into_iter().map(|(j, v)| (j, v / s)).collect()
}

/// [`dominate_row`] of every row of the n x n `p`.
pub(crate) fn dominate_set(p: &[f64], n: usize, k: usize) -> SparseRows {
    p.par_chunks(n).map(|row| dominate_row(row, k)).collect()
}

/// Bit v of a sample's mask: view v measured it. At most 64 views.
pub(crate) fn sample_masks<'a>(
    samples: impl Iterator<Item = Option<&'a [usize]>>,
    n: usize,
) -> Vec<u64> {
    let mut masks = vec![0u64; n];
    for (v, present) in samples.enumerate() {
        match present {
            Some(list) => list.iter().for_each(|&i| masks[i] |= 1 << v),
            None => masks.iter_mut().for_each(|m| *m |= 1 << v),
        }
    }
    masks
}

/// snfpy's `n_aff`: each entry of rows `first..` divided by the number of views sharing its
/// pair minus one (at least one).
pub(crate) fn divide_by_shared(rows: &mut [f64], n: usize, first: usize, masks: &[u64]) {
    rows.par_chunks_mut(n)
        .zip(&masks[first..])
        .for_each(|(row, &mi)| {
            row.iter_mut()
                .zip(masks)
                .for_each(|(v, &mj)| *v /= ((mi & mj).count_ones() as f64 - 1.0).max(1.0));
        });
}

/// Rows of a product computed together: their n x BLOCK slab of the dense factor is gathered
/// once and stays in L2 while every row of S reads it.
pub(crate) const BLOCK: usize = 16;

/// Rows of `out` (each n long) in groups of BLOCK: `fill(slab, first, rows)` puts the dense
/// factor's values for out rows first..first+rows into lanes 0..rows of `slab` (slab[l][r]
/// pairs with S's column l), then out[first + r][j] = scale · Σ_{l ∈ S_j} s_jl · slab[l][r].
/// The K·n² multiply-adds are BLOCK-wide vector operations on L2-resident data.
pub(crate) fn sparse_product_rows(
    s: &SparseRows,
    n: usize,
    scale: f64,
    out: &mut [f64],
    fill: impl Fn(&mut [[f64; BLOCK]], usize, usize) + Sync,
) {
    out.par_chunks_mut(BLOCK * n).enumerate().for_each_init(
        || vec![[0.0f64; BLOCK]; n],
        |slab, (block, out_rows)| {
            let rows = out_rows.len() / n;
            fill(slab, block * BLOCK, rows);
            for (j, s_j) in s.iter().enumerate() {
                let mut acc = [0.0f64; BLOCK];
                for &(l, w) in s_j {
                    let lane = &slab[l];
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

/// out = (S · X)ᵀ · scale for sparse S and dense X (n x n): out[c, j] = scale · Σ_{l ∈ S_j}
/// s_jl X[l, c], slab by slab of X's columns (one cache line per row gathered). X is read
/// once and out written once; two of these make S·M·Sᵀ = (S·(S·M)ᵀ)ᵀ without a transpose.
fn sparse_times_dense_transposed(s: &SparseRows, x: &[f64], n: usize, scale: f64, out: &mut [f64]) {
    sparse_product_rows(s, n, scale, out, |slab, c0, cols| {
        for (l, lane) in slab.iter_mut().enumerate() {
            lane[..cols].copy_from_slice(&x[l * n + c0..l * n + c0 + cols]);
        }
    });
}

/// Fuses the views into one n x n network. The views are consumed: each becomes its working
/// matrix, so memory is m + 2 matrices of n x n.
///
/// Samples missing from a view (snfpy's NaN rows) take no part in its normalisation or its K
/// neighbours, and each entry of a product is divided by the number of views sharing the pair
/// minus one, as snfpy's `n_aff`. Two deliberate differences where snfpy 0.2.2 breaks: its
/// percentile of a row containing NaN is NaN, which keeps every entry of the row instead of
/// the K strongest (here: K among the present samples); and a pair shared by one view divides
/// by zero (here: by one).
pub fn snf(views: Vec<View>, n: usize, params: SnfParams) -> Result<Vec<f64>, NetworkError> {
    let m = views.len();
    if m < 2 {
        return Err(NetworkError::TooFewViews(m));
    }
    for (index, view) in views.iter().enumerate() {
        view.validate(index, n)?;
        let s = view.size(n);
        if params.k == 0 || params.k >= s {
            return Err(NetworkError::BadK { k: params.k, n: s });
        }
    }
    let partial = views.iter().any(|v| v.samples.is_some());
    if partial && m > 64 {
        return Err(NetworkError::TooManyViews(m));
    }
    let masks = if partial {
        sample_masks(views.iter().map(|v| v.samples.as_deref()), n)
    } else {
        Vec::new()
    };
    let mut s: Vec<SparseRows> = Vec::with_capacity(m);
    let mut p: Vec<Vec<f64>> = Vec::with_capacity(m);
    for mut view in views {
        let size = view.size(n);
        let mut x = std::mem::take(&mut view.affinity);
        normalise_rows(&mut x, size);
        symmetrise(&mut x, size);
        let local = dominate_set(&x, size, params.k);
        let mut rows: SparseRows = vec![Vec::new(); n];
        for (i, row) in local.into_iter().enumerate() {
            rows[view.global(i)] = row.into_iter().map(|(j, w)| (view.global(j), w)).collect();
        }
        s.push(rows);
        p.push(view.expand(x, n));
    }
    let sum = |p: &[Vec<f64>], total: &mut [f64]| {
        total.par_chunks_mut(n).enumerate().for_each(|(i, row)| {
            row.copy_from_slice(&p[0][i * n..(i + 1) * n]);
            for x in &p[1..] {
                row.iter_mut()
                    .zip(&x[i * n..(i + 1) * n])
                    .for_each(|(t, v)| *t += v);
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
            pv.par_iter_mut()
                .zip(total.par_iter())
                .for_each(|(v, t)| *v = t - *v);
            sparse_times_dense_transposed(sv, pv, n, 1.0, &mut half);
            if partial {
                sparse_times_dense_transposed(sv, &half, n, 1.0, pv);
                divide_by_shared(pv, n, 0, &masks);
            } else {
                sparse_times_dense_transposed(sv, &half, n, 1.0 / (m - 1) as f64, pv);
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn ones(s: usize) -> Vec<f64> {
        vec![1.0; s * s]
    }

    #[test]
    fn bad_inputs_name_the_view_and_the_problem() {
        let params = SnfParams {
            k: 2,
            ..SnfParams::default()
        };
        assert_eq!(
            snf(vec![View::complete(ones(4))], 4, params),
            Err(NetworkError::TooFewViews(1))
        );
        assert_eq!(
            snf(
                vec![View::complete(ones(4)), View::complete(ones(3))],
                4,
                params
            ),
            Err(NetworkError::Shape {
                view: 1,
                n: 4,
                found: 9
            })
        );
        let mut nan = ones(4);
        nan[6] = f64::NAN;
        match snf(
            vec![View::complete(ones(4)), View::complete(nan)],
            4,
            params,
        ) {
            Err(NetworkError::BadValue {
                view: 1,
                row: 1,
                col: 2,
                value,
            }) => assert!(value.is_nan()),
            other => panic!("expected BadValue, got {other:?}"),
        }
        assert_eq!(
            snf(
                vec![View::complete(ones(4)), View::complete(ones(4))],
                4,
                SnfParams { k: 4, ..params }
            ),
            Err(NetworkError::BadK { k: 4, n: 4 })
        );
        // A partial view's K must fit the samples it has.
        assert_eq!(
            snf(
                vec![View::complete(ones(4)), View::partial(vec![0, 2], ones(2))],
                4,
                params
            ),
            Err(NetworkError::BadK { k: 2, n: 2 })
        );
        assert!(matches!(
            snf(
                vec![
                    View::complete(ones(4)),
                    View::partial(vec![0, 5, 6], ones(3))
                ],
                4,
                params
            ),
            Err(NetworkError::Samples { view: 1, .. })
        ));
    }

    #[test]
    fn slab_product_equals_the_plain_reference() {
        // 37 rows (two slabs and a short one), 5 entries per row.
        let n = 37;
        let s: SparseRows = (0..n)
            .map(|j| {
                (0..5)
                    .map(|t| ((j * 11 + t * 7) % n, 1.0 / (1.0 + t as f64)))
                    .collect()
            })
            .collect();
        let x: Vec<f64> = (0..n * n).map(|e| ((e * 31 % 17) as f64) - 8.0).collect();
        let mut fast = vec![0.0; n * n];
        sparse_times_dense_transposed(&s, &x, n, 0.25, &mut fast);
        let indptr: Vec<u64> = std::iter::once(0)
            .chain(s.iter().scan(0u64, |acc, row| {
                *acc += row.len() as u64;
                Some(*acc)
            }))
            .collect();
        let cols: Vec<u32> = s.iter().flatten().map(|e| e.0 as u32).collect();
        let vals: Vec<f64> = s.iter().flatten().map(|e| e.1).collect();
        let mut plain = vec![0.0; n * n];
        tessera_kernels::ops::affinity::sparse_times_dense_transposed(
            &indptr, &cols, &vals, &x, n, 0.25, &mut plain,
        );
        for (a, b) in fast.iter().zip(&plain) {
            assert!((a - b).abs() <= 1e-12 * (1.0 + b.abs()), "{a} vs {b}");
        }
    }

    #[test]
    fn identical_views_fuse_to_a_symmetric_row_stochastic_network() {
        let n = 12;
        let w: Vec<f64> = (0..n * n)
            .map(|e| (-(((e / n) as f64 - (e % n) as f64).powi(2)) / 8.0).exp())
            .collect();
        let fused = snf(
            vec![View::complete(w.clone()), View::complete(w)],
            n,
            SnfParams {
                k: 3,
                t: 5,
                alpha: 1.0,
            },
        )
        .unwrap();
        for i in 0..n {
            for j in 0..n {
                assert_eq!(fused[i * n + j], fused[j * n + i]);
            }
            // (W + Wᵀ + I) / 2 of a row-stochastic W: rows sum to 1 on average, the diagonal ≥ ½.
            assert!(fused[i * n + i] >= 0.5);
        }
        let total: f64 = fused.iter().sum();
        assert!(
            (total - n as f64 * 1.5).abs() < 1e-9,
            "sum of (W + Wᵀ + I)/2 is (n + n + n)/2: {total}"
        );
    }
}
