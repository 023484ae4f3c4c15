//! The regularisers and heads of the review's models, each returning its value and gradients:
//! softmax cross-entropy (labels -1 = unlabelled) with gradient reversal for adversarial
//! classifiers, multi-scale RBF MMD between two groups of latents, the cosine-similarity margin
//! loss on labels, the Cox partial likelihood for survival heads, and the masked mean squared
//! error of regression heads.

use rayon::prelude::*;

use crate::real::Real;

pub const CUDA_SOURCE: &str = include_str!("losses.cu");

pub mod gpu;

/// Mean cross-entropy of softmax(logits) against `labels` (rows with -1 are skipped), and its
/// gradient w.r.t. the logits. Returns (loss, number of labelled rows).
pub fn cross_entropy<T: Real>(
    logits: &[T],
    labels: &[i32],
    classes: usize,
    dlogits: &mut [T],
) -> (T, usize) {
    assert!(
        classes > 0 && logits.len() == labels.len() * classes && dlogits.len() == logits.len(),
        "cross entropy: shapes"
    );
    let labelled = labels.iter().filter(|&&l| l >= 0).count();
    let scale = if labelled > 0 {
        T::one() / T::of(labelled as f64)
    } else {
        T::zero()
    };
    let losses: Vec<T> = dlogits
        .par_chunks_mut(classes)
        .zip(logits.par_chunks(classes))
        .zip(labels.par_iter())
        .map(|((d, z), &label)| {
            if label < 0 {
                d.iter_mut().for_each(|v| *v = T::zero());
                return T::zero();
            }
            assert!(
                (label as usize) < classes,
                "label {label} out of range for {classes} classes"
            );
            let max = z.iter().copied().fold(T::neg_infinity(), T::max);
            let sum: T = z.iter().map(|&v| (v - max).exp()).sum();
            let log_sum = sum.ln() + max;
            for (k, d) in d.iter_mut().enumerate() {
                let p = (z[k] - log_sum).exp();
                *d = scale
                    * (p - if k == label as usize {
                        T::one()
                    } else {
                        T::zero()
                    });
            }
            log_sum - z[label as usize]
        })
        .collect();
    (losses.into_iter().sum::<T>() * scale, labelled)
}

/// Mean squared error of `pred` against `targets` over the entries whose target is not NaN
/// (a missing value), and its gradient (zero at missing entries). Returns (loss, observed).
pub fn masked_mse<T: Real>(pred: &[T], targets: &[f64], dpred: &mut [T]) -> (T, usize) {
    assert!(
        pred.len() == targets.len() && dpred.len() == pred.len(),
        "mse: lengths"
    );
    let observed = targets.iter().filter(|t| !t.is_nan()).count();
    let scale = if observed > 0 {
        T::one() / T::of(observed as f64)
    } else {
        T::zero()
    };
    let sum: T = dpred
        .par_iter_mut()
        .zip(pred.par_iter().zip(targets.par_iter()))
        .map(|(d, (&p, &t))| {
            if t.is_nan() {
                *d = T::zero();
                return T::zero();
            }
            let diff = p - T::of(t);
            *d = T::of(2.0) * scale * diff;
            diff * diff
        })
        .collect::<Vec<T>>()
        .into_iter()
        .sum();
    (sum * scale, observed)
}

/// Gradient reversal (Ganin & Lempitsky): identity forward; backward dx = -λ dy, so the encoder
/// learns to fool the classifier the loss trains.
pub fn gradient_reversal_backward<T: Real>(dy: &[T], lambda: f64, dx: &mut [T]) {
    let f = T::of(-lambda);
    dx.par_iter_mut()
        .zip(dy.par_iter())
        .for_each(|(dx, &dy)| *dx = f * dy);
}

/// Sum over bandwidths of exp(-|a - b|² / (2 σ²)), and d/d(|a-b|²).
fn rbf<T: Real>(d2: T, bandwidths: &[f64]) -> (T, T) {
    let (mut k, mut dk) = (T::zero(), T::zero());
    for &s in bandwidths {
        let c = T::of(-0.5 / (s * s));
        let e = (c * d2).exp();
        k = k + e;
        dk = dk + c * e;
    }
    (k, dk)
}

/// Squared MMD between samples `x` (n x dim) and `y` (m x dim) with a sum of RBF kernels
/// (biased estimator: means over all pairs), and its gradients.
pub fn mmd_rbf<T: Real>(
    x: &[T],
    y: &[T],
    dim: usize,
    bandwidths: &[f64],
    dx: &mut [T],
    dy: &mut [T],
) -> T {
    let (n, m) = (x.len() / dim, y.len() / dim);
    assert!(
        n > 0
            && m > 0
            && x.len() == n * dim
            && y.len() == m * dim
            && dx.len() == x.len()
            && dy.len() == y.len(),
        "mmd: shapes"
    );
    // One side's contribution: for each row of `a`, Σ over rows of `b` with weight w, and the
    // gradient w.r.t. that row of a (and, for the same set, symmetric).
    let side = |a: &[T], b: &[T], w: T, grad: &mut [T]| -> T {
        let parts: Vec<T> = grad
            .par_chunks_mut(dim)
            .enumerate()
            .map(|(i, g)| {
                let ai = &a[i * dim..(i + 1) * dim];
                let mut total = T::zero();
                for bj in b.chunks(dim) {
                    let d2: T = ai.iter().zip(bj).map(|(&p, &q)| (p - q) * (p - q)).sum();
                    let (k, dk) = rbf(d2, bandwidths);
                    total = total + k;
                    for t in 0..dim {
                        g[t] = g[t] + w * dk * T::of(2.0) * (ai[t] - bj[t]);
                    }
                }
                total
            })
            .collect();
        parts.into_iter().sum::<T>() * w
    };
    dx.iter_mut().for_each(|v| *v = T::zero());
    dy.iter_mut().for_each(|v| *v = T::zero());
    let (nn, mm, nm) = (
        T::of((n * n) as f64),
        T::of((m * m) as f64),
        T::of((n * m) as f64),
    );
    let two = T::of(2.0);
    // k(x,x) terms: each pair appears twice in the double sum, so the row gradient doubles.
    let kxx = side(x, x, T::one() / nn, dx);
    dx.iter_mut().for_each(|v| *v = *v * two);
    let mut gx_cross = vec![T::zero(); x.len()];
    let kxy = side(x, y, T::one() / nm, &mut gx_cross);
    let kyy = side(y, y, T::one() / mm, dy);
    dy.iter_mut().for_each(|v| *v = *v * two);
    let mut gy_cross = vec![T::zero(); y.len()];
    side(y, x, T::one() / nm, &mut gy_cross);
    for (d, g) in dx.iter_mut().zip(&gx_cross) {
        *d = *d - two * *g;
    }
    for (d, g) in dy.iter_mut().zip(&gy_cross) {
        *d = *d - two * *g;
    }
    kxx + kyy - two * kxy
}

/// Contrastive cosine loss on labels (MOSA-style), averaged over labelled pairs i < j:
/// same label → 1 - cos(z_i, z_j); different → max(0, cos(z_i, z_j) - margin).
pub fn cosine_margin<T: Real>(z: &[T], labels: &[i32], dim: usize, margin: f64, dz: &mut [T]) -> T {
    let n = labels.len();
    assert!(
        z.len() == n * dim && dz.len() == z.len(),
        "cosine margin: shapes"
    );
    let norms: Vec<T> = z
        .chunks(dim)
        .map(|r| r.iter().map(|&v| v * v).sum::<T>().sqrt().max(T::of(1e-12)))
        .collect();
    let pairs = {
        let l = labels.iter().filter(|&&l| l >= 0).count();
        l * l.saturating_sub(1) / 2
    };
    dz.iter_mut().for_each(|v| *v = T::zero());
    if pairs == 0 {
        return T::zero();
    }
    let scale = T::one() / T::of(pairs as f64);
    let margin = T::of(margin);
    let mut loss = T::zero();
    for i in 0..n {
        for j in i + 1..n {
            if labels[i] < 0 || labels[j] < 0 {
                continue;
            }
            let (zi, zj) = (&z[i * dim..(i + 1) * dim], &z[j * dim..(j + 1) * dim]);
            let dot: T = zi.iter().zip(zj).map(|(&a, &b)| a * b).sum();
            let cos = dot / (norms[i] * norms[j]);
            let (value, dcos) = if labels[i] == labels[j] {
                (T::one() - cos, -T::one())
            } else if cos > margin {
                (cos - margin, T::one())
            } else {
                (T::zero(), T::zero())
            };
            loss = loss + value;
            if dcos != T::zero() {
                // d cos / d z_i = z_j/(|z_i||z_j|) - cos z_i/|z_i|², and symmetrically.
                for t in 0..dim {
                    let gi = zj[t] / (norms[i] * norms[j]) - cos * zi[t] / (norms[i] * norms[i]);
                    let gj = zi[t] / (norms[i] * norms[j]) - cos * zj[t] / (norms[j] * norms[j]);
                    dz[i * dim + t] = dz[i * dim + t] + scale * dcos * gi;
                    dz[j * dim + t] = dz[j * dim + t] + scale * dcos * gj;
                }
            }
        }
    }
    loss * scale
}

/// Negative Cox partial log-likelihood (Breslow ties) of risk scores `eta`, with survival or
/// censoring `times` and `events` (true = the event was observed), averaged over events; and
/// its gradient.
pub fn cox_partial_likelihood<T: Real>(
    eta: &[T],
    times: &[f64],
    events: &[bool],
    deta: &mut [T],
) -> T {
    let n = eta.len();
    assert!(
        times.len() == n && events.len() == n && deta.len() == n,
        "cox: lengths"
    );
    let n_events = events.iter().filter(|&&e| e).count();
    deta.iter_mut().for_each(|v| *v = T::zero());
    if n_events == 0 {
        return T::zero();
    }
    let scale = T::one() / T::of(n_events as f64);
    let max = eta.iter().copied().fold(T::neg_infinity(), T::max);
    let w: Vec<T> = eta.iter().map(|&e| (e - max).exp()).collect();
    let mut loss = T::zero();
    for i in (0..n).filter(|&i| events[i]) {
        // Risk set: everyone still at risk at time t_i.
        let risk: Vec<usize> = (0..n).filter(|&j| times[j] >= times[i]).collect();
        let sum: T = risk.iter().map(|&j| w[j]).sum();
        loss = loss - (eta[i] - (sum.ln() + max));
        deta[i] = deta[i] - scale;
        for &j in &risk {
            deta[j] = deta[j] + scale * w[j] / sum;
        }
    }
    loss * scale
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::check;

    fn values(n: usize, seed: f64) -> Vec<f64> {
        crate::gradcheck::wave(n, seed)
            .into_iter()
            .map(|v| v * 1.5)
            .collect()
    }

    #[test]
    fn cross_entropy_value_and_gradient() {
        let labels = [2, -1, 0, 1, 2];
        let z = values(15, 0.0);
        let loss = |z: &[f64]| {
            let mut d = vec![0.0; 15];
            cross_entropy(z, &labels, 3, &mut d).0
        };
        let mut d = vec![0.0; 15];
        let (value, labelled) = cross_entropy(&z, &labels, 3, &mut d);
        assert_eq!(labelled, 4);
        assert!(
            d[3..6].iter().all(|&v| v == 0.0),
            "unlabelled row has no gradient"
        );
        // Uniform logits: loss = ln(classes).
        let mut d2 = vec![0.0; 3];
        assert!((cross_entropy(&[0.0f64; 3], &[1], 3, &mut d2).0 - 3f64.ln()).abs() < 1e-15);
        assert!(value > 0.0);
        check(loss, &z, &d, 1e-6, 1e-7).unwrap();
        let mut rev = vec![0.0; 15];
        gradient_reversal_backward(&d, 0.5, &mut rev);
        assert!(rev.iter().zip(&d).all(|(r, g)| *r == -0.5 * g));
    }

    #[test]
    fn masked_mse_skips_missing_targets() {
        let pred = values(6, 3.0);
        let targets = [1.0, f64::NAN, -0.5, 2.0, f64::NAN, 0.0];
        let mut d = vec![0.0; 6];
        let (value, observed) = masked_mse(&pred, &targets, &mut d);
        assert_eq!(observed, 4);
        let expected: f64 = [0, 2, 3, 5]
            .iter()
            .map(|&i| (pred[i] - targets[i]).powi(2))
            .sum::<f64>()
            / 4.0;
        assert!((value - expected).abs() < 1e-15);
        assert!(d[1] == 0.0 && d[4] == 0.0);
        check(
            |p| masked_mse(p, &targets, &mut [0.0; 6]).0,
            &pred,
            &d,
            1e-6,
            1e-8,
        )
        .unwrap();
    }

    #[test]
    fn mmd_is_zero_for_identical_sets_and_gradient_checks() {
        let dim = 3;
        let (x, y) = (values(5 * dim, 0.0), values(4 * dim, 9.0));
        let bw = [0.5, 1.0, 4.0];
        let (mut dx, mut dy) = (vec![0.0; x.len()], vec![0.0; y.len()]);
        let same = mmd_rbf(&x, &x, dim, &bw, &mut dx.clone(), &mut dx.clone());
        assert!(same.abs() < 1e-12);
        let value = mmd_rbf(&x, &y, dim, &bw, &mut dx, &mut dy);
        assert!(value > 0.0);
        let f = |x: &[f64], y: &[f64]| {
            mmd_rbf(
                x,
                y,
                dim,
                &bw,
                &mut vec![0.0; x.len()],
                &mut vec![0.0; y.len()],
            )
        };
        check(|p| f(p, &y), &x, &dx, 1e-6, 1e-7).unwrap();
        check(|p| f(&x, p), &y, &dy, 1e-6, 1e-7).unwrap();
    }

    #[test]
    fn cosine_margin_gradient() {
        let labels = [0, 1, 0, -1, 1, 2];
        let z = values(6 * 4, 1.0);
        let f = |z: &[f64]| cosine_margin(z, &labels, 4, 0.1, &mut vec![0.0; z.len()]);
        let mut dz = vec![0.0; z.len()];
        let value = cosine_margin(&z, &labels, 4, 0.1, &mut dz);
        assert!(value > 0.0);
        assert!(dz[12..16].iter().all(|&v| v == 0.0), "unlabelled cell");
        check(f, &z, &dz, 1e-6, 1e-7).unwrap();
    }

    #[test]
    fn cox_gradient_and_value() {
        // One event among two at risk with equal risk: loss = ln 2.
        let mut d = [0.0f64; 2];
        assert!(
            (cox_partial_likelihood(&[0.3, 0.3], &[1.0, 2.0], &[true, false], &mut d) - 2f64.ln())
                .abs()
                < 1e-15
        );
        let eta = values(7, 2.0);
        let times = [5.0, 1.0, 3.0, 3.0, 8.0, 2.0, 6.0];
        let events = [true, false, true, true, false, true, true];
        let f = |e: &[f64]| cox_partial_likelihood(e, &times, &events, &mut [0.0; 7]);
        let mut de = vec![0.0; 7];
        cox_partial_likelihood(&eta, &times, &events, &mut de);
        check(f, &eta, &de, 1e-6, 1e-7).unwrap();
    }
}
