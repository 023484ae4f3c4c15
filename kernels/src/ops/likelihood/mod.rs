//! Log-likelihoods of observed data under the decoders' distributions, with the value and the
//! gradients fused in one pass (no intermediate tensors): negative binomial (mean, inverse
//! dispersion), zero-inflated NB, Poisson, Gaussian (mean, log-variance), Bernoulli (logits).
//!
//! Layout: `x` and every parameter are row-major (cells x features); a parameter given with
//! `features` entries instead is shared by all cells (per-gene dispersion). Each row's
//! log-likelihood sum is written to `ll`; gradients are of Σ_r w_r · ll_r with optional per-cell
//! weights `w` (0 masks a cell missing this modality), one gradient buffer per parameter, always
//! per entry: reduce a shared parameter's gradient with [`crate::ops::elementwise::column_sums`].
//! Also totalVI's two-component NB mixture for protein counts ([`nb_mixture`]).
//! Formulas follow scvi-tools (`log_nb_positive`, `log_zinb_positive`), eps = 1e-8 inside logs.

use rayon::prelude::*;

use crate::real::{
    CountTerms, Real, count_gamma_parts, count_gamma_terms, lane_sum, lgamma, sigmoid, softplus,
};

pub const CUDA_SOURCE: &str = include_str!("likelihood.cu");

pub mod gpu;
mod softmax_nb;

pub use softmax_nb::softmax_nb;

pub const EPS: f64 = 1e-8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Likelihood {
    /// Parameters: mean μ > 0, inverse dispersion θ > 0.
    NegativeBinomial,
    /// Parameters: μ, θ, zero-inflation logit π.
    ZeroInflatedNegativeBinomial,
    /// Parameter: rate μ > 0.
    Poisson,
    /// Parameters: mean m, log-variance v.
    Gaussian,
    /// Parameter: logit l.
    Bernoulli,
}

impl Likelihood {
    pub fn n_params(self) -> usize {
        match self {
            Likelihood::NegativeBinomial | Likelihood::Gaussian => 2,
            Likelihood::ZeroInflatedNegativeBinomial => 3,
            Likelihood::Poisson | Likelihood::Bernoulli => 1,
        }
    }

    /// The CUDA kernel's code for this family.
    pub fn code(self) -> i32 {
        match self {
            Likelihood::NegativeBinomial => 0,
            Likelihood::ZeroInflatedNegativeBinomial => 1,
            Likelihood::Poisson => 2,
            Likelihood::Gaussian => 3,
            Likelihood::Bernoulli => 4,
        }
    }

    /// One entry: log-likelihood and its gradients with respect to the parameters `p`.
    pub fn entry<T: Real>(self, x: T, p: [T; 3]) -> (T, [T; 3]) {
        let gamma_terms = |x: T, theta: T| {
            let (lg, dg) = count_gamma_terms(x.f64(), theta.f64());
            (T::of(lg), T::of(dg))
        };
        let eps = T::of(EPS);
        let (zero, one, half) = (T::zero(), T::one(), T::of(0.5));
        match self {
            Likelihood::NegativeBinomial => {
                let (mu, theta) = (p[0], p[1]);
                let (lt, ltm) = ((theta + eps).ln(), (theta + mu + eps).ln());
                let (lg, dg) = gamma_terms(x, theta);
                let ll = theta * (lt - ltm) + x * ((mu + eps).ln() - ltm) + lg;
                let dmu = x / (mu + eps) - (theta + x) / (theta + mu + eps);
                let dtheta =
                    lt - ltm + theta / (theta + eps) - (theta + x) / (theta + mu + eps) + dg;
                (ll, [dmu, dtheta, zero])
            }
            Likelihood::ZeroInflatedNegativeBinomial => {
                let (mu, theta, pi) = (p[0], p[1], p[2]);
                let (lt, ltm) = ((theta + eps).ln(), (theta + mu + eps).ln());
                let sp = softplus(-pi);
                let pt = -pi + theta * (lt - ltm);
                // d(θ(lt - ltm))/dθ and /dμ, shared by both cases.
                let dpt_theta = lt - ltm + theta / (theta + eps) - theta / (theta + mu + eps);
                let dpt_mu = -theta / (theta + mu + eps);
                if x < eps {
                    let s = sigmoid(pt);
                    (
                        softplus(pt) - sp,
                        [s * dpt_mu, s * dpt_theta, sigmoid(-pi) - s],
                    )
                } else {
                    let (lg, dg) = gamma_terms(x, theta);
                    let ll = -sp + pt + x * ((mu + eps).ln() - ltm) + lg;
                    let dmu = dpt_mu + x / (mu + eps) - x / (theta + mu + eps);
                    let dtheta = dpt_theta - x / (theta + mu + eps) + dg;
                    (ll, [dmu, dtheta, sigmoid(-pi) - one])
                }
            }
            Likelihood::Poisson => {
                let mu = p[0];
                (
                    x * (mu + eps).ln() - mu - lgamma(x + one),
                    [x / (mu + eps) - one, zero, zero],
                )
            }
            Likelihood::Gaussian => {
                let (m, v) = (p[0], p[1]);
                let inv = (-v).exp();
                let d = x - m;
                let ll = -half * (T::of((2.0 * std::f64::consts::PI).ln()) + v + d * d * inv);
                (ll, [d * inv, -half + half * d * d * inv, zero])
            }
            Likelihood::Bernoulli => {
                let l = p[0];
                (x * l - softplus(l), [x - sigmoid(l), zero, zero])
            }
        }
    }

    /// Log-likelihood per row and per-entry gradients of Σ_r w_r ll_r.
    ///
    /// `params[k]` has `x.len()` entries or `features` (shared across rows); `grads[k]` always has
    /// `x.len()`. Panics on inconsistent lengths (a programming error, not a data error).
    pub fn forward_backward<T: Real>(
        self,
        x: &[T],
        features: usize,
        params: &[&[T]],
        weights: Option<&[T]>,
        ll: &mut [T],
        grads: &mut [&mut [T]],
    ) {
        let k = self.n_params();
        assert!(
            features > 0 && x.len().is_multiple_of(features),
            "likelihood: {} values are not rows of {features}",
            x.len()
        );
        let rows = x.len() / features;
        assert_eq!(params.len(), k, "{self:?} takes {k} parameters");
        assert_eq!(grads.len(), k, "{self:?} returns {k} gradients");
        assert_eq!(ll.len(), rows, "one log-likelihood per row");
        for p in params {
            assert!(
                p.len() == x.len() || p.len() == features,
                "parameter has {} entries, expected {} or {features}",
                p.len(),
                x.len()
            );
        }
        for g in grads.iter() {
            assert_eq!(g.len(), x.len(), "gradients are per entry");
        }
        if let Some(w) = weights {
            assert_eq!(w.len(), rows, "one weight per row");
        }
        if let (Likelihood::NegativeBinomial, [mu, theta], [dmu, dtheta]) =
            (self, params, &mut *grads)
        {
            nb_rows(x, features, mu, theta, weights, ll, dmu, dtheta);
            return;
        }
        let mut per_row: Vec<Vec<&mut [T]>> = (0..rows).map(|_| Vec::with_capacity(k)).collect();
        for g in grads.iter_mut() {
            for (r, chunk) in g.chunks_mut(features).enumerate() {
                per_row[r].push(chunk);
            }
        }
        per_row
            .into_par_iter()
            .zip(ll.par_iter_mut())
            .enumerate()
            .for_each(|(r, (mut out, ll))| {
                let w = weights.map_or(T::one(), |w| w[r]);
                let mut sum = T::zero();
                for f in 0..features {
                    let i = r * features + f;
                    let mut p = [T::zero(); 3];
                    for (slot, param) in p.iter_mut().zip(params) {
                        *slot = if param.len() == features {
                            param[f]
                        } else {
                            param[i]
                        };
                    }
                    let (value, grad) = self.entry(x[i], p);
                    sum = sum + value;
                    for (g, d) in out.iter_mut().zip(grad) {
                        g[f] = w * d;
                    }
                }
                *ll = sum;
            });
    }
}

/// The negative binomial of [`Likelihood::entry`] a row at a time, arranged for SIMD (the
/// scVI hot path): the row's logarithms in slice calls, the arithmetic in one branch-free pass,
/// and ln(μ+ε) and the count terms only at the non-zero counts. A shared (per-gene) θ
/// has its ln θ and θ/(θ+ε) computed once for all rows.
#[allow(clippy::too_many_arguments)] // the likelihood's inputs and its two gradients
fn nb_rows<T: Real>(
    x: &[T],
    features: usize,
    mu: &[T],
    theta: &[T],
    weights: Option<&[T]>,
    ll: &mut [T],
    dmu: &mut [T],
    dtheta: &mut [T],
) {
    let eps = T::of(EPS);
    let shared = theta.len() == features;
    let (mut lt_shared, mut ratio_shared) = (vec![T::zero(); features], vec![T::zero(); features]);
    let table = shared.then(|| CountTable::new(theta));
    if shared {
        gene_terms(theta, &mut lt_shared, &mut ratio_shared);
    }
    ll.par_iter_mut()
        .zip(
            dmu.par_chunks_mut(features)
                .zip(dtheta.par_chunks_mut(features)),
        )
        .enumerate()
        .for_each_init(
            || NbScratch::new(features),
            |s, (r, (ll, (dmu, dtheta)))| {
                let span = r * features..(r + 1) * features;
                let (x, mu) = (&x[span.clone()], &mu[span.clone()]);
                let theta = if shared { theta } else { &theta[span] };
                let (lt, ratio): (&[T], &[T]) = if shared {
                    (&lt_shared, &ratio_shared)
                } else {
                    gene_terms(theta, &mut s.lt_row, &mut s.ratio_row);
                    (&s.lt_row, &s.ratio_row)
                };
                for ((b, &m), &t) in s.b.iter_mut().zip(mu).zip(theta) {
                    *b = t + m + eps;
                }
                T::ln_to(&s.b, &mut s.ltm);
                let w = weights.map_or(T::one(), |w| w[r]);
                // a ← each entry's terms that do not vanish at x = 0 (every entry pays these). Every
                // slice cut to the row's length, so the loop has no bounds checks and vectorises.
                let n = features;
                let (x, mu, theta, lt, ratio, b, ltm, a) = (
                    &x[..n],
                    &mu[..n],
                    &theta[..n],
                    &lt[..n],
                    &ratio[..n],
                    &s.b[..n],
                    &s.ltm[..n],
                    &mut s.a[..n],
                );
                let (dmu, dtheta) = (&mut dmu[..n], &mut dtheta[..n]);
                for f in 0..n {
                    let (xv, m, t) = (x[f], mu[f], theta[f]);
                    let inv = T::one() / b[f];
                    let d = lt[f] - ltm[f];
                    a[f] = t * d;
                    dmu[f] = w * (xv / (m + eps) - (t + xv) * inv);
                    dtheta[f] = w * (d + ratio[f] - (t + xv) * inv);
                }
                // The non-zero counts (a minority): x ln(μ+ε) - x ln(θ+μ+ε) and the count terms,
                // their logarithms taken together. The compaction is branch-free: a branch per
                // entry would mispredict at count densities.
                let mut k = 0;
                for (f, &v) in x.iter().enumerate() {
                    s.non_zero[k] = f;
                    k += usize::from(v != T::zero());
                }
                for (j, &f) in s.non_zero[..k].iter().enumerate() {
                    s.mu_nz[j] = mu[f] + eps;
                    (s.count_arg[j], s.count_add[j], s.count_dg[j]) =
                        count_parts(table.as_ref(), x[f], f, theta[f]);
                }
                T::ln_to(&s.mu_nz[..k], &mut s.ln_mu_nz[..k]);
                T::ln_to(&s.count_arg[..k], &mut s.ln_count_arg[..k]);
                for (j, &f) in s.non_zero[..k].iter().enumerate() {
                    s.a[f] = s.a[f] + x[f] * (s.ln_mu_nz[j] - s.ltm[f]);
                    s.a[f] = s.a[f] + (s.ln_count_arg[j] + s.count_add[j]);
                    dtheta[f] = dtheta[f] + w * s.count_dg[j];
                }
                *ll = lane_sum(&s.a);
            },
        );
}

/// ln(θ+ε) and θ/(θ+ε) of every θ; `ratio` holds θ+ε first, so no buffer is allocated.
fn gene_terms<T: Real>(theta: &[T], lt: &mut [T], ratio: &mut [T]) {
    let eps = T::of(EPS);
    for (r, &t) in ratio.iter_mut().zip(theta) {
        *r = t + eps;
    }
    T::ln_to(ratio, lt);
    for (r, &t) in ratio.iter_mut().zip(theta) {
        *r = t / *r;
    }
}

/// The count terms lnΓ(x+θ)−lnΓ(θ)−lnΓ(x+1) and ψ(x+θ)−ψ(θ) of a non-zero count `x` of feature
/// `f`, as (a, b, dg) with lnΓ-terms = ln a + b, so that the rows take all their logarithms in
/// one slice call: from the shared-θ table where it holds the count, else from a product of
/// ratios (its logarithm taken later) or exactly.
fn count_parts<T: Real>(table: Option<&CountTable<T>>, x: T, f: usize, theta: T) -> (T, T, T) {
    if let Some((lg, dg)) = table.and_then(|t| t.get(x, f)) {
        return (T::one(), lg, dg);
    }
    match count_gamma_parts(x.f64(), theta.f64()) {
        CountTerms::Product { ratio, dg } if T::of(ratio).is_normal() => {
            (T::of(ratio), T::zero(), T::of(dg))
        }
        CountTerms::Product { ratio, dg } => (T::one(), T::of(ratio.ln()), T::of(dg)),
        CountTerms::Exact { lg, dg } => (T::one(), T::of(lg), T::of(dg)),
    }
}

/// The count terms of [`count_gamma_terms`] for the counts 1..=[`CountTable::MAX`] of every
/// feature under a shared θ, made once per call for all rows: lnΓ(x+θ)−lnΓ(θ)−lnΓ(x+1) =
/// Σ_{k<x} ln((θ+k)/(k+1)) and ψ(x+θ)−ψ(θ) = Σ_{k<x} 1/(θ+k), as prefix sums over k. Laid
/// out count-major (entry (x-1)·features + f), so every pass runs across features in SIMD
/// lanes; a batch has more non-zero counts than the table has entries.
struct CountTable<T> {
    features: usize,
    lg: Vec<T>,
    dg: Vec<T>,
}

impl<T: Real> CountTable<T> {
    const MAX: usize = 16;

    fn new(theta: &[T]) -> Self {
        let features = theta.len();
        let (mut ratio, mut dg) = (
            vec![T::zero(); Self::MAX * features],
            vec![T::zero(); Self::MAX * features],
        );
        for k in 0..Self::MAX {
            let (kt, next) = (T::of(k as f64), T::of(k as f64 + 1.0));
            let span = k * features..(k + 1) * features;
            for ((r, d), &t) in ratio[span.clone()].iter_mut().zip(&mut dg[span]).zip(theta) {
                *r = (t + kt) / next;
                *d = T::one() / (t + kt);
            }
        }
        let mut lg = vec![T::zero(); ratio.len()];
        T::ln_to(&ratio, &mut lg);
        for k in 1..Self::MAX {
            let (done, rest) = lg.split_at_mut(k * features);
            for (l, &prev) in rest[..features].iter_mut().zip(&done[(k - 1) * features..]) {
                *l = *l + prev;
            }
            let (done, rest) = dg.split_at_mut(k * features);
            for (d, &prev) in rest[..features].iter_mut().zip(&done[(k - 1) * features..]) {
                *d = *d + prev;
            }
        }
        CountTable { features, lg, dg }
    }

    /// (lg, dg) of count `x` at feature `f`, if the table holds it.
    fn get(&self, x: T, f: usize) -> Option<(T, T)> {
        let n = x
            .to_usize()
            .filter(|&n| (1..=Self::MAX).contains(&n) && T::of(n as f64) == x)?;
        let i = (n - 1) * self.features + f;
        Some((self.lg[i], self.dg[i]))
    }
}

/// Per-thread buffers of [`nb_rows`], one row long.
struct NbScratch<T> {
    a: Vec<T>,
    b: Vec<T>,
    ltm: Vec<T>,
    lt_row: Vec<T>,
    ratio_row: Vec<T>,
    non_zero: Vec<usize>,
    mu_nz: Vec<T>,
    ln_mu_nz: Vec<T>,
    count_arg: Vec<T>,
    ln_count_arg: Vec<T>,
    count_add: Vec<T>,
    count_dg: Vec<T>,
}

impl<T: Real> NbScratch<T> {
    fn new(features: usize) -> Self {
        let row = || vec![T::zero(); features];
        NbScratch {
            a: row(),
            b: row(),
            ltm: row(),
            lt_row: row(),
            ratio_row: row(),
            non_zero: vec![0; features],
            mu_nz: row(),
            ln_mu_nz: row(),
            count_arg: row(),
            ln_count_arg: row(),
            count_add: row(),
            count_dg: row(),
        }
    }
}

/// totalVI's protein likelihood: log(σ(π) NB(x; μ_back, θ) + (1 - σ(π)) NB(x; μ_fore, θ)) per
/// entry (π = the background mixing logit), summed per row; gradients per entry w.r.t.
/// μ_back, μ_fore, θ and π.
#[allow(clippy::too_many_arguments)] // the four mixture parameters, each per entry
pub fn nb_mixture<T: Real>(
    x: &[T],
    mu_back: &[T],
    mu_fore: &[T],
    theta: &[T],
    pi: &[T],
    features: usize,
    ll: &mut [T],
    grads: [&mut [T]; 4],
) {
    let n = x.len();
    assert!(
        features > 0 && n.is_multiple_of(features) && ll.len() == n / features,
        "nb mixture: shapes"
    );
    assert!(
        [mu_back.len(), mu_fore.len(), theta.len(), pi.len()]
            .iter()
            .all(|&l| l == n)
            && grads.iter().all(|g| g.len() == n),
        "nb mixture: parameters are per entry"
    );
    let [g_back, g_fore, g_theta, g_pi] = grads;
    let nb = Likelihood::NegativeBinomial;
    let values: Vec<T> = (0..n)
        .into_par_iter()
        .zip(
            g_back
                .par_iter_mut()
                .zip(g_fore.par_iter_mut())
                .zip(g_theta.par_iter_mut().zip(g_pi.par_iter_mut())),
        )
        .map(|(i, ((gb, gf), (gt, gp)))| {
            let (a, da) = nb.entry(x[i], [mu_back[i], theta[i], T::zero()]);
            let (b, db) = nb.entry(x[i], [mu_fore[i], theta[i], T::zero()]);
            // log(σ(π)e^a + σ(-π)e^b) = logsumexp(a - softplus(-π), b - softplus(π)).
            let (la, lb) = (
                a - crate::real::softplus(-pi[i]),
                b - crate::real::softplus(pi[i]),
            );
            let top = la.max(lb);
            let (ea, eb) = ((la - top).exp(), (lb - top).exp());
            let value = top + (ea + eb).ln();
            let (ra, rb) = (ea / (ea + eb), eb / (ea + eb)); // responsibilities
            *gb = ra * da[0];
            *gf = rb * db[0];
            *gt = ra * da[1] + rb * db[1];
            // d/dπ: ra σ(-π) - rb σ(π).
            *gp = ra * crate::real::sigmoid(-pi[i]) - rb * crate::real::sigmoid(pi[i]);
            value
        })
        .collect();
    ll.par_iter_mut()
        .zip(values.par_chunks(features))
        .for_each(|(l, v)| *l = v.iter().copied().sum());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{check_at, spread};

    /// Counts with zeros, ones and large values; parameters in realistic ranges.
    fn case(rows: usize, features: usize, family: Likelihood) -> (Vec<f64>, Vec<Vec<f64>>) {
        let n = rows * features;
        let x: Vec<f64> = (0..n)
            .map(|i| match family {
                Likelihood::Gaussian => (i as f64 * 0.37).sin() * 2.0,
                Likelihood::Bernoulli => f64::from(i % 3 == 0),
                _ => [0.0, 0.0, 1.0, 3.0, 0.0, 17.0, 250.0][i % 7],
            })
            .collect();
        let params = (0..family.n_params())
            .map(|k| {
                (0..n)
                    .map(|i| {
                        let t = (i as f64 * 0.913 + k as f64).sin();
                        match (family, k) {
                            (Likelihood::Gaussian, _)
                            | (Likelihood::Bernoulli, _)
                            | (Likelihood::ZeroInflatedNegativeBinomial, 2) => t * 1.5,
                            (_, 0) => (t * 2.0).exp() * 3.0, // mean
                            _ => (t * 1.5).exp() * 2.0,      // inverse dispersion
                        }
                    })
                    .collect()
            })
            .collect();
        (x, params)
    }

    const FAMILIES: [Likelihood; 5] = [
        Likelihood::NegativeBinomial,
        Likelihood::ZeroInflatedNegativeBinomial,
        Likelihood::Poisson,
        Likelihood::Gaussian,
        Likelihood::Bernoulli,
    ];

    #[test]
    fn gradients_match_finite_differences() {
        for family in FAMILIES {
            for (rows, features) in [(1, 1), (3, 31), (2, 1025)] {
                let (x, params) = case(rows, features, family);
                let weights: Vec<f64> = (0..rows).map(|r| 0.5 + r as f64).collect();
                let n = x.len();
                let total = |params: &[Vec<f64>]| {
                    let refs: Vec<&[f64]> = params.iter().map(Vec::as_slice).collect();
                    let mut ll = vec![0.0; rows];
                    let mut g: Vec<Vec<f64>> = vec![vec![0.0; n]; params.len()];
                    let mut gm: Vec<&mut [f64]> = g.iter_mut().map(Vec::as_mut_slice).collect();
                    family.forward_backward(&x, features, &refs, Some(&weights), &mut ll, &mut gm);
                    (ll.iter().zip(&weights).map(|(l, w)| l * w).sum::<f64>(), g)
                };
                let (_, grads) = total(&params);
                for k in 0..params.len() {
                    let f = |p: &[f64]| {
                        let mut all = params.clone();
                        all[k] = p.to_vec();
                        total(&all).0
                    };
                    // The loss sums many entries, so round-off in the difference quotient is
                    // ~1e-16 * |loss| / h: a larger step keeps it below the tolerance.
                    check_at(f, &params[k], &grads[k], spread(n, 97), 1e-5, 1e-5).unwrap_or_else(
                        |e| panic!("{family:?} param {k} ({rows}x{features}): {e}"),
                    );
                }
            }
        }
    }

    /// The NB row path in f32 (vectorised logarithms, count terms at non-zeros) against the
    /// entry-wise reference in f64, with per-entry and per-gene θ.
    #[test]
    fn nb_rows_in_f32_match_the_f64_entries() {
        let (rows, features) = (5, 1027);
        let (x, params) = case(rows, features, Likelihood::NegativeBinomial);
        let weights = [1.0, 0.0, 2.5, 1.0, 0.3];
        for shared in [false, true] {
            let theta: Vec<f64> = if shared {
                params[1][..features].to_vec()
            } else {
                params[1].clone()
            };
            let f32s = |v: &[f64]| v.iter().map(|&a| a as f32).collect::<Vec<f32>>();
            let (x32, mu32, th32, w32) = (f32s(&x), f32s(&params[0]), f32s(&theta), f32s(&weights));
            let mut ll = vec![0f32; rows];
            let (mut dmu, mut dth) = (vec![0f32; x.len()], vec![0f32; x.len()]);
            Likelihood::NegativeBinomial.forward_backward(
                &x32,
                features,
                &[&mu32, &th32],
                Some(&w32),
                &mut ll,
                &mut [&mut dmu, &mut dth],
            );
            for r in 0..rows {
                let mut expected = 0.0;
                for f in 0..features {
                    let i = r * features + f;
                    // The reference at the f32-rounded inputs.
                    let t = f64::from(th32[if shared { f } else { i }]);
                    let (l, g) = Likelihood::NegativeBinomial
                        .entry(f64::from(x32[i]), [f64::from(mu32[i]), t, 0.0]);
                    expected += l;
                    for (got, want) in [(dmu[i], g[0]), (dth[i], g[1])] {
                        let want = f64::from(w32[r]) * want;
                        assert!(
                            (f64::from(got) - want).abs() <= 1e-5 * (1.0 + want.abs()),
                            "shared {shared} entry {i}: {got} vs {want}"
                        );
                    }
                }
                assert!(
                    (f64::from(ll[r]) - expected).abs() <= 2e-6 * (1.0 + expected.abs()),
                    "shared {shared} row {r}: {} vs {expected}",
                    ll[r]
                );
            }
        }
    }

    #[test]
    fn values_match_closed_forms() {
        // NB(0 | μ, θ) = (θ/(θ+μ))^θ; Poisson(2 | 3) = 9 e^-3 / 2; N(1 | 0, e^0) = φ(1).
        let (ll, _) = Likelihood::NegativeBinomial.entry(0.0f64, [3.0, 2.0, 0.0]);
        assert!((ll - 2.0 * (2.0f64 / 5.0).ln()).abs() < 1e-7);
        let (ll, _) = Likelihood::Poisson.entry(2.0f64, [3.0, 0.0, 0.0]);
        assert!((ll - (4.5f64 * (-3.0f64).exp()).ln()).abs() < 1e-7);
        let (ll, _) = Likelihood::Gaussian.entry(1.0f64, [0.0, 0.0, 0.0]);
        assert!((ll - (-0.5 - 0.5 * (2.0 * std::f64::consts::PI).ln())).abs() < 1e-12);
        // ZINB with π → -∞ (no inflation) equals NB; NB with θ → ∞ approaches Poisson.
        let (zinb, _) = Likelihood::ZeroInflatedNegativeBinomial.entry(5.0f64, [3.0, 2.0, -40.0]);
        let (nb, _) = Likelihood::NegativeBinomial.entry(5.0f64, [3.0, 2.0, 0.0]);
        assert!((zinb - nb).abs() < 1e-9);
        let (nb, _) = Likelihood::NegativeBinomial.entry(4.0f64, [3.0, 1e7, 0.0]);
        let (poisson, _) = Likelihood::Poisson.entry(4.0f64, [3.0, 0.0, 0.0]);
        assert!((nb - poisson).abs() < 1e-5);
    }

    #[test]
    fn zero_weight_masks_a_row_and_shared_parameters_broadcast() {
        let family = Likelihood::NegativeBinomial;
        let x = [0.0f64, 2.0, 5.0, 1.0];
        let mu = [1.0, 2.0, 3.0, 4.0];
        let theta_gene = [1.5, 0.5];
        let theta_entry = [1.5, 0.5, 1.5, 0.5];
        let run = |theta: &[f64], w: &[f64]| {
            let mut ll = [0.0; 2];
            let (mut dmu, mut dth) = ([0.0; 4], [0.0; 4]);
            family.forward_backward(
                &x,
                2,
                &[&mu, theta],
                Some(w),
                &mut ll,
                &mut [&mut dmu, &mut dth],
            );
            (ll, dmu, dth)
        };
        // A shared θ takes its count terms from a per-gene table (sums of logarithms), a
        // per-entry θ from products: equal up to rounding.
        let (shared, per_entry) = (
            run(&theta_gene, &[1.0, 1.0]),
            run(&theta_entry, &[1.0, 1.0]),
        );
        let close = |a: &[f64], b: &[f64]| {
            a.iter()
                .zip(b)
                .all(|(a, b)| (a - b).abs() <= 1e-12 * (1.0 + b.abs()))
        };
        assert!(
            close(&shared.0, &per_entry.0)
                && close(&shared.1, &per_entry.1)
                && close(&shared.2, &per_entry.2),
            "{shared:?} vs {per_entry:?}"
        );
        let (ll, dmu, dth) = run(&theta_gene, &[1.0, 0.0]);
        assert!(ll[1] != 0.0, "the value is still reported");
        assert_eq!(
            (&dmu[2..], &dth[2..]),
            (&[0.0, 0.0][..], &[0.0, 0.0][..]),
            "no gradient from a masked row"
        );
    }

    fn values(n: usize, seed: f64) -> Vec<f64> {
        crate::gradcheck::wave(n, seed)
            .into_iter()
            .map(|v| v * 1.5)
            .collect()
    }

    #[test]
    fn nb_mixture_gradients_and_limits() {
        let n = 12;
        let x: Vec<f64> = (0..n).map(|i| [0.0, 3.0, 40.0, 7.0][i % 4]).collect();
        let (back, fore) = (
            values(n, 0.0)
                .iter()
                .map(|v| v.exp() * 3.0)
                .collect::<Vec<_>>(),
            values(n, 3.0)
                .iter()
                .map(|v| v.exp() * 20.0)
                .collect::<Vec<_>>(),
        );
        let (theta, pi) = (
            values(n, 5.0)
                .iter()
                .map(|v| v.exp() * 5.0)
                .collect::<Vec<_>>(),
            values(n, 7.0),
        );
        let run = |b: &[f64], f: &[f64], t: &[f64], p: &[f64]| {
            let mut ll = vec![0.0; 3];
            let mut g: Vec<Vec<f64>> = vec![vec![0.0; n]; 4];
            let [g0, g1, g2, g3] = &mut g[..] else {
                unreachable!()
            };
            nb_mixture(&x, b, f, t, p, 4, &mut ll, [g0, g1, g2, g3]);
            (ll.iter().sum::<f64>(), g)
        };
        let (_, g) = run(&back, &fore, &theta, &pi);
        crate::gradcheck::check(|p| run(p, &fore, &theta, &pi).0, &back, &g[0], 1e-6, 1e-6)
            .unwrap();
        crate::gradcheck::check(|p| run(&back, p, &theta, &pi).0, &fore, &g[1], 1e-6, 1e-6)
            .unwrap();
        crate::gradcheck::check(|p| run(&back, &fore, p, &pi).0, &theta, &g[2], 1e-6, 1e-6)
            .unwrap();
        crate::gradcheck::check(|p| run(&back, &fore, &theta, p).0, &pi, &g[3], 1e-6, 1e-6)
            .unwrap();
        // π → +∞ (200 outweighs any likelihood ratio here): all background, the NB of the background mean.
        let (ll, _) = run(&back, &fore, &theta, &vec![200.0; n]);
        let mut nb_ll = vec![0.0; 3];
        let (mut a, mut b) = (vec![0.0; n], vec![0.0; n]);
        Likelihood::NegativeBinomial.forward_backward(
            &x,
            4,
            &[&back, &theta],
            None,
            &mut nb_ll,
            &mut [&mut a, &mut b],
        );
        assert!((ll - nb_ll.iter().sum::<f64>()).abs() < 1e-9);
    }
}
