//! scVI's reconstruction term in one pass per cell: μ = library · softmax(logits) and
//! x ~ NB(μ, θ) with a per-gene θ; the log-likelihood and its gradients w.r.t. the logits and θ,
//! without the cells × genes intermediates (proportions, means, per-entry gradients, dense
//! counts) of the composition softmax → scale → NB → scale → softmax backward → column sums.
//! A row of each scratch buffer stays in L1/L2, where the composition streams ~10 full matrices.

use rayon::prelude::*;

use super::{CountTable, EPS, count_parts, gene_terms};
use crate::ops::linear::CsrRef;
use crate::real::{Real, lane_max, lane_sum};

/// Rows per block of the θ gradient: a block sums its rows in order and the blocks are added in
/// order, so the result does not depend on how many threads ran.
const ROWS_PER_BLOCK: usize = 8;

/// Per row r: `ll[r]` = Σ_f log NB(x_rf; μ_rf, θ_f) with μ_r = `library[r]` · softmax(`logits`_r),
/// x the CSR `counts` (duplicate entries of a row are summed, as in scipy's canonical form).
/// Gradients are of Σ_r `weights[r]` · ll_r: `dlogits` per entry, `dtheta` per gene (both
/// overwritten). Panics on inconsistent shapes (a programming error, not a data error).
#[allow(clippy::too_many_arguments)] // the term's inputs and its two gradients
pub fn softmax_nb<T: Real>(
    logits: &[T],
    library: &[T],
    counts: CsrRef<'_, T>,
    theta: &[T],
    weights: &[T],
    ll: &mut [T],
    dlogits: &mut [T],
    dtheta: &mut [T],
) {
    counts.check();
    let (rows, genes) = (counts.rows, counts.cols);
    assert!(
        genes > 0 && logits.len() == rows * genes && dlogits.len() == rows * genes,
        "softmax nb: logits and their gradient are {rows} rows of {genes}"
    );
    assert!(
        theta.len() == genes && dtheta.len() == genes,
        "softmax nb: one θ per gene"
    );
    assert!(
        library.len() == rows && weights.len() == rows && ll.len() == rows,
        "softmax nb: one library size, weight and value per row"
    );
    let (mut lt, mut ratio) = (vec![T::zero(); genes], vec![T::zero(); genes]);
    gene_terms(theta, &mut lt, &mut ratio);
    let shared = Shared {
        theta,
        lt: &lt,
        ratio: &ratio,
        table: CountTable::new(theta),
    };
    let blocks: Vec<Vec<T>> = dlogits
        .par_chunks_mut(ROWS_PER_BLOCK * genes)
        .zip(ll.par_chunks_mut(ROWS_PER_BLOCK))
        .enumerate()
        .map_init(
            || RowScratch::new(genes),
            |s, (block, (dlogits, ll))| {
                let mut dtheta = vec![T::zero(); genes];
                for (i, (dlogits, ll)) in dlogits.chunks_mut(genes).zip(ll.iter_mut()).enumerate() {
                    let r = block * ROWS_PER_BLOCK + i;
                    let span = counts.indptr[r] as usize..counts.indptr[r + 1] as usize;
                    let row = Row {
                        logits: &logits[r * genes..(r + 1) * genes],
                        library: library[r],
                        weight: weights[r],
                        indices: &counts.indices[span.clone()],
                        counts: &counts.data[span],
                    };
                    *ll = row.run(&shared, s, dlogits, &mut dtheta);
                }
                dtheta
            },
        )
        .collect();
    dtheta.iter_mut().for_each(|d| *d = T::zero());
    for block in &blocks {
        for (d, &v) in dtheta.iter_mut().zip(block) {
            *d = *d + v;
        }
    }
}

/// The per-gene values every row reads.
struct Shared<'a, T> {
    theta: &'a [T],
    /// ln(θ+ε)
    lt: &'a [T],
    /// θ/(θ+ε)
    ratio: &'a [T],
    table: CountTable<T>,
}

/// One cell's inputs.
struct Row<'a, T> {
    logits: &'a [T],
    library: T,
    weight: T,
    indices: &'a [u32],
    counts: &'a [T],
}

impl<T: Real> Row<'_, T> {
    /// The row's log-likelihood; writes its logit gradients and adds its θ gradients.
    fn run(
        &self,
        shared: &Shared<'_, T>,
        s: &mut RowScratch<T>,
        dlogits: &mut [T],
        dtheta: &mut [T],
    ) -> T {
        let (eps, w, n) = (T::of(EPS), self.weight, self.logits.len());
        // Every slice cut to the row's length: the dense loops have no bounds checks and vectorise.
        let (theta, lt, ratio, logits) = (
            &shared.theta[..n],
            &shared.lt[..n],
            &shared.ratio[..n],
            &self.logits[..n],
        );
        let (rho, mu, b, ltm, a, q) = (
            &mut s.rho[..n],
            &mut s.mu[..n],
            &mut s.b[..n],
            &mut s.ltm[..n],
            &mut s.a[..n],
            &mut s.q[..n],
        );
        let (dlogits, dtheta) = (&mut dlogits[..n], &mut dtheta[..n]);

        let max = lane_max(logits);
        for (p, &v) in rho.iter_mut().zip(logits) {
            *p = v - max;
        }
        T::exp_in_place(rho);
        let inv_sum = T::one() / lane_sum(rho);
        for f in 0..n {
            rho[f] = rho[f] * inv_sum;
            mu[f] = self.library * rho[f];
            b[f] = theta[f] + mu[f] + eps;
        }
        T::ln_to(b, ltm);
        // Every entry's terms at x = 0: a ← its log-likelihood, q ← w μ ∂ll/∂μ; b ← 1/(θ+μ+ε)
        // for the non-zeros.
        for f in 0..n {
            let inv = T::one() / b[f];
            b[f] = inv;
            let d = lt[f] - ltm[f];
            a[f] = theta[f] * d;
            q[f] = T::zero() - w * mu[f] * theta[f] * inv;
            dtheta[f] = dtheta[f] + w * (d + ratio[f] - theta[f] * inv);
        }

        // The non-zero counts: gathered through a dense row (duplicates summed, the row left
        // zeroed again), compacted without a branch per entry, their logarithms in two slice calls.
        for (&j, &v) in self.indices.iter().zip(self.counts) {
            s.x[j as usize] = s.x[j as usize] + v;
        }
        let mut k = 0;
        for &j in self.indices {
            let f = j as usize;
            (s.non_zero[k], s.x_nz[k]) = (f, s.x[f]);
            k += usize::from(s.x[f] != T::zero());
            s.x[f] = T::zero();
        }
        for j in 0..k {
            let (f, x) = (s.non_zero[j], s.x_nz[j]);
            s.mu_nz[j] = mu[f];
            (s.count_arg[j], s.count_add[j], s.count_dg[j]) =
                count_parts(Some(&shared.table), x, f, theta[f]);
        }
        // Per non-zero in SIMD lanes: ln(μ+ε), μ/(μ+ε) and the count terms' logarithms.
        let (mu_nz, ln_mu_nz, frac_nz) =
            (&mut s.mu_nz[..k], &mut s.ln_mu_nz[..k], &mut s.frac_nz[..k]);
        for (m, fr) in mu_nz.iter_mut().zip(frac_nz.iter_mut()) {
            *fr = *m;
            *m = *m + eps;
        }
        T::ln_to(mu_nz, ln_mu_nz);
        for (fr, &m) in frac_nz.iter_mut().zip(mu_nz.iter()) {
            *fr = *fr / m;
        }
        T::ln_to(&s.count_arg[..k], &mut s.ln_count_arg[..k]);
        for j in 0..k {
            let (f, x, inv) = (s.non_zero[j], s.x_nz[j], b[s.non_zero[j]]);
            a[f] = a[f] + x * (s.ln_mu_nz[j] - ltm[f]) + (s.ln_count_arg[j] + s.count_add[j]);
            q[f] = q[f] + w * x * (s.frac_nz[j] - mu[f] * inv);
            dtheta[f] = dtheta[f] + w * (s.count_dg[j] - x * inv);
        }

        // Through the softmax: ∂/∂s_f = q_f − ρ_f Σ q (since μ ∂/∂μ = ρ ∂/∂ρ).
        let total = lane_sum(q);
        for f in 0..n {
            dlogits[f] = q[f] - rho[f] * total;
        }
        lane_sum(a)
    }
}

/// One thread's row buffers; the compaction buffers have a spare slot for its last write.
struct RowScratch<T> {
    rho: Vec<T>,
    mu: Vec<T>,
    b: Vec<T>,
    ltm: Vec<T>,
    a: Vec<T>,
    q: Vec<T>,
    /// The row's counts, dense; all zero between rows.
    x: Vec<T>,
    non_zero: Vec<usize>,
    x_nz: Vec<T>,
    mu_nz: Vec<T>,
    ln_mu_nz: Vec<T>,
    /// μ/(μ+ε)
    frac_nz: Vec<T>,
    count_arg: Vec<T>,
    ln_count_arg: Vec<T>,
    count_add: Vec<T>,
    count_dg: Vec<T>,
}

impl<T: Real> RowScratch<T> {
    fn new(genes: usize) -> Self {
        let row = || vec![T::zero(); genes + 1];
        RowScratch {
            rho: row(),
            mu: row(),
            b: row(),
            ltm: row(),
            a: row(),
            q: row(),
            x: row(),
            non_zero: vec![0; genes + 1],
            x_nz: row(),
            mu_nz: row(),
            ln_mu_nz: row(),
            frac_nz: row(),
            count_arg: row(),
            ln_count_arg: row(),
            count_add: row(),
            count_dg: row(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{check_at, spread};
    use crate::ops::likelihood::Likelihood;

    /// A CSR of counts with zeros, ones, mid and large values, a row with a duplicate entry, an
    /// empty row, and unsorted indices.
    struct Case {
        rows: usize,
        genes: usize,
        indptr: Vec<u64>,
        indices: Vec<u32>,
        data: Vec<f64>,
    }

    impl Case {
        fn new(rows: usize, genes: usize) -> Case {
            let (mut indptr, mut indices, mut data) = (vec![0u64], Vec::new(), Vec::new());
            for r in 0..rows {
                if r != 1 {
                    for f in (0..genes).rev().filter(|f| (f * 7 + r * 3) % 5 < 2) {
                        indices.push(f as u32);
                        data.push([1.0, 3.0, 17.0, 250.0, 2.0, 1.0][(f + r) % 6]);
                    }
                }
                if r == 2 {
                    indices.push(0);
                    data.push(4.0); // gene 0 twice in this row
                }
                indptr.push(indices.len() as u64);
            }
            Case {
                rows,
                genes,
                indptr,
                indices,
                data,
            }
        }

        fn csr<'a, T>(&'a self, data: &'a [T]) -> CsrRef<'a, T> {
            CsrRef {
                rows: self.rows,
                cols: self.genes,
                indptr: &self.indptr,
                indices: &self.indices,
                data,
            }
        }

        fn dense(&self) -> Vec<f64> {
            let mut x = vec![0.0; self.rows * self.genes];
            for r in 0..self.rows {
                for k in self.indptr[r] as usize..self.indptr[r + 1] as usize {
                    x[r * self.genes + self.indices[k] as usize] += self.data[k];
                }
            }
            x
        }

        fn inputs(&self) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
            let logits = crate::gradcheck::wave(self.rows * self.genes, 1.0)
                .iter()
                .map(|v| v * 3.0)
                .collect();
            let library = (0..self.rows).map(|r| 300.0 + 900.0 * r as f64).collect();
            let theta = crate::gradcheck::wave(self.genes, 2.0)
                .iter()
                .map(|v| (v * 1.5).exp() * 2.0)
                .collect();
            let weights = (0..self.rows)
                .map(|r| if r == 3 { 0.0 } else { 0.5 + r as f64 })
                .collect();
            (logits, library, theta, weights)
        }

        fn run<T: Real>(
            &self,
            logits: &[T],
            library: &[T],
            theta: &[T],
            weights: &[T],
        ) -> (Vec<T>, Vec<T>, Vec<T>) {
            let data: Vec<T> = self.data.iter().map(|&v| T::of(v)).collect();
            let (mut ll, mut dlogits, mut dtheta) = (
                vec![T::zero(); self.rows],
                vec![T::zero(); logits.len()],
                vec![T::zero(); self.genes],
            );
            softmax_nb(
                logits,
                library,
                self.csr(&data),
                theta,
                weights,
                &mut ll,
                &mut dlogits,
                &mut dtheta,
            );
            (ll, dlogits, dtheta)
        }
    }

    #[test]
    fn gradients_match_finite_differences() {
        for (rows, genes) in [(1, 1), (5, 13), (11, 1025)] {
            let case = Case::new(rows, genes);
            let (logits, library, theta, weights) = case.inputs();
            let total = |logits: &[f64], theta: &[f64]| {
                case.run(logits, &library, theta, &weights)
                    .0
                    .iter()
                    .zip(&weights)
                    .map(|(l, w)| l * w)
                    .sum::<f64>()
            };
            let (_, dlogits, dtheta) = case.run(&logits, &library, &theta, &weights);
            check_at(
                |p| total(p, &theta),
                &logits,
                &dlogits,
                spread(logits.len(), 97),
                1e-5,
                1e-5,
            )
            .unwrap_or_else(|e| panic!("logits ({rows}x{genes}): {e}"));
            check_at(
                |p| total(&logits, p),
                &theta,
                &dtheta,
                spread(theta.len(), 97),
                1e-5,
                1e-5,
            )
            .unwrap_or_else(|e| panic!("theta ({rows}x{genes}): {e}"));
        }
    }

    /// The fused pass against the composition it replaces, in f64: softmax, scale by the
    /// library, the entry-wise NB on dense counts, and the chain rule back to the logits.
    #[test]
    fn equals_the_composition_of_softmax_and_the_nb_entries() {
        let case = Case::new(6, 301);
        let (logits, library, theta, weights) = case.inputs();
        let (ll, dlogits, dtheta) = case.run(&logits, &library, &theta, &weights);
        let x = case.dense();
        let g = case.genes;
        let mut want_dtheta = vec![0.0; g];
        for r in 0..case.rows {
            let row = &logits[r * g..(r + 1) * g];
            let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = row.iter().map(|v| (v - max).exp()).sum();
            let rho: Vec<f64> = row.iter().map(|v| (v - max).exp() / sum).collect();
            let (mut want_ll, mut q) = (0.0, vec![0.0; g]);
            for f in 0..g {
                let mu = library[r] * rho[f];
                let (l, d) = Likelihood::NegativeBinomial.entry(x[r * g + f], [mu, theta[f], 0.0]);
                want_ll += l;
                q[f] = weights[r] * mu * d[0];
                want_dtheta[f] += weights[r] * d[1];
            }
            assert!(
                (ll[r] - want_ll).abs() <= 1e-10 * want_ll.abs(),
                "row {r}: {} vs {want_ll}",
                ll[r]
            );
            let total: f64 = q.iter().sum();
            for f in 0..g {
                let want = q[f] - rho[f] * total;
                assert!(
                    (dlogits[r * g + f] - want).abs() <= 1e-10 * (1.0 + want.abs()),
                    "dlogits {r},{f}: {} vs {want}",
                    dlogits[r * g + f]
                );
            }
        }
        for f in 0..g {
            assert!(
                (dtheta[f] - want_dtheta[f]).abs() <= 1e-10 * (1.0 + want_dtheta[f].abs()),
                "dtheta {f}: {} vs {}",
                dtheta[f],
                want_dtheta[f]
            );
        }
        assert!(
            dlogits[3 * g..4 * g].iter().all(|&d| d == 0.0),
            "a zero weight masks the row's gradient"
        );
    }

    /// f32 (vectorised logarithms and exponentials, count table) against the f64 pass at the
    /// same rounded inputs.
    #[test]
    fn f32_matches_f64() {
        let case = Case::new(9, 2000);
        let (logits, library, theta, weights) = case.inputs();
        let f32s = |v: &[f64]| v.iter().map(|&a| a as f32).collect::<Vec<f32>>();
        let back = |v: &[f32]| v.iter().map(|&a| f64::from(a)).collect::<Vec<f64>>();
        let (l32, lib32, th32, w32) = (f32s(&logits), f32s(&library), f32s(&theta), f32s(&weights));
        let (ll, dlogits, dtheta) = case.run(&l32, &lib32, &th32, &w32);
        let (ll64, dlogits64, dtheta64) =
            case.run(&back(&l32), &back(&lib32), &back(&th32), &back(&w32));
        for (r, (&got, &want)) in ll.iter().zip(&ll64).enumerate() {
            assert!(
                (f64::from(got) - want).abs() <= 2e-6 * want.abs(),
                "row {r}: {got} vs {want}"
            );
        }
        let scale = dlogits64.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        for (i, (&got, &want)) in dlogits.iter().zip(&dlogits64).enumerate() {
            assert!(
                (f64::from(got) - want).abs() <= 1e-5 * scale,
                "dlogits {i}: {got} vs {want}"
            );
        }
        for (f, (&got, &want)) in dtheta.iter().zip(&dtheta64).enumerate() {
            assert!(
                (f64::from(got) - want).abs() <= 1e-4 * (1.0 + want.abs()),
                "dtheta {f}: {got} vs {want}"
            );
        }
    }
}
