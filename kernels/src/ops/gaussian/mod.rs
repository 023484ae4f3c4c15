//! Diagonal Gaussians in the latent space: the reparameterisation z = m + σ ε, the KL
//! divergence to the standard normal prior, and the product of experts (PoE) of several
//! modality posteriors with a prior expert and a per-cell presence mask (Multigrate/MIDAS), and
//! the Jeffreys divergence between two modalities' posteriors (MultiVI).
//! Variances are carried as log-variances.

use rayon::prelude::*;

use crate::real::Real;

pub const CUDA_SOURCE: &str = include_str!("gaussian.cu");

pub mod gpu;

/// z = m + exp(lv / 2) ⊙ eps.
pub fn reparameterize_forward<T: Real>(m: &[T], lv: &[T], eps: &[T], z: &mut [T]) {
    assert!(
        m.len() == lv.len() && lv.len() == eps.len() && eps.len() == z.len(),
        "reparameterize: lengths"
    );
    let half = T::of(0.5);
    z.par_iter_mut()
        .enumerate()
        .for_each(|(i, z)| *z = m[i] + (half * lv[i]).exp() * eps[i]);
}

/// dm = dz, dlv = dz ⊙ eps ⊙ exp(lv / 2) / 2 (same eps as the forward).
pub fn reparameterize_backward<T: Real>(
    lv: &[T],
    eps: &[T],
    dz: &[T],
    dm: &mut [T],
    dlv: &mut [T],
) {
    assert!(
        lv.len() == eps.len()
            && eps.len() == dz.len()
            && dz.len() == dm.len()
            && dm.len() == dlv.len(),
        "reparameterize backward: lengths"
    );
    let half = T::of(0.5);
    dm.copy_from_slice(dz);
    dlv.par_iter_mut()
        .enumerate()
        .for_each(|(i, d)| *d = dz[i] * eps[i] * half * (half * lv[i]).exp());
}

/// KL(N(m, exp(lv)) || N(0, I)) per row of `dim` latents, and the gradients of Σ_r w_r KL_r.
pub fn kl_standard_normal<T: Real>(
    m: &[T],
    lv: &[T],
    dim: usize,
    weights: Option<&[T]>,
    kl: &mut [T],
    dm: &mut [T],
    dlv: &mut [T],
) {
    assert!(
        dim > 0
            && m.len() == lv.len()
            && m.len() == kl.len() * dim
            && dm.len() == m.len()
            && dlv.len() == m.len(),
        "kl: shapes"
    );
    let half = T::of(0.5);
    kl.par_iter_mut()
        .zip(dm.par_chunks_mut(dim).zip(dlv.par_chunks_mut(dim)))
        .enumerate()
        .for_each(|(r, (kl, (dm, dlv)))| {
            let w = weights.map_or(T::one(), |w| w[r]);
            let mut sum = T::zero();
            for k in 0..dim {
                let (mi, li) = (m[r * dim + k], lv[r * dim + k]);
                let var = li.exp();
                sum = sum + half * (var + mi * mi - T::one() - li);
                dm[k] = w * mi;
                dlv[k] = w * half * (var - T::one());
            }
            *kl = sum;
        });
}

/// Jeffreys divergence KL(p || q) + KL(q || p) between p = N(m1, exp(lv1)) and q = N(m2,
/// exp(lv2)) per row of `dim` latents (MultiVI's alignment of the modality posteriors), and the
/// gradients of Σ_r w_r J_r. Per latent: ½[e^{lv1-lv2} + e^{lv2-lv1} + δ²(e^{-lv1} + e^{-lv2}) - 2],
/// δ = m1 - m2.
#[allow(clippy::too_many_arguments)] // two Gaussians in, their four gradients out
pub fn jeffreys<T: Real>(
    m1: &[T],
    lv1: &[T],
    m2: &[T],
    lv2: &[T],
    dim: usize,
    weights: &[T],
    value: &mut [T],
    grads: [&mut [T]; 4],
) {
    let n = m1.len();
    assert!(
        dim > 0
            && [lv1.len(), m2.len(), lv2.len()].iter().all(|&l| l == n)
            && n == value.len() * dim
            && weights.len() == value.len()
            && grads.iter().all(|g| g.len() == n),
        "jeffreys: shapes"
    );
    let [dm1, dlv1, dm2, dlv2] = grads;
    let half = T::of(0.5);
    value
        .par_iter_mut()
        .zip(
            dm1.par_chunks_mut(dim)
                .zip(dlv1.par_chunks_mut(dim))
                .zip(dm2.par_chunks_mut(dim).zip(dlv2.par_chunks_mut(dim))),
        )
        .enumerate()
        .for_each(|(r, (value, ((dm1, dlv1), (dm2, dlv2))))| {
            let w = weights[r];
            let mut sum = T::zero();
            for k in 0..dim {
                let i = r * dim + k;
                let (ratio, delta) = ((lv1[i] - lv2[i]).exp(), m1[i] - m2[i]);
                let (p1, p2) = ((T::zero() - lv1[i]).exp(), (T::zero() - lv2[i]).exp());
                sum = sum
                    + half * (ratio + T::one() / ratio + delta * delta * (p1 + p2) - T::of(2.0));
                dm1[k] = w * delta * (p1 + p2);
                dm2[k] = T::zero() - dm1[k];
                dlv1[k] = w * half * (ratio - T::one() / ratio - delta * delta * p1);
                dlv2[k] = w * half * (T::one() / ratio - ratio - delta * delta * p2);
            }
            *value = sum;
        });
}

/// Product of experts: the joint posterior of E experts (each rows x dim means and
/// log-variances) and the N(0, I) prior expert, over the experts present for each cell.
/// Precision-weighted: 1/σ² = 1 + Σ_e present 1/σ_e², m = σ² Σ_e present m_e/σ_e².
/// `present[e][r]` masks expert e for cell r (a modality the cell lacks).
pub fn poe_forward<T: Real>(
    means: &[&[T]],
    logvars: &[&[T]],
    present: &[&[bool]],
    dim: usize,
    m: &mut [T],
    lv: &mut [T],
) {
    let n = m.len();
    assert!(
        means.len() == logvars.len()
            && logvars.len() == present.len()
            && lv.len() == n
            && n.is_multiple_of(dim),
        "poe: shapes"
    );
    m.par_iter_mut()
        .zip(lv.par_iter_mut())
        .enumerate()
        .for_each(|(i, (m, lv))| {
            let r = i / dim;
            let (mut precision, mut weighted) = (T::one(), T::zero());
            for e in 0..means.len() {
                if present[e][r] {
                    let p = (-logvars[e][i]).exp();
                    precision = precision + p;
                    weighted = weighted + means[e][i] * p;
                }
            }
            *m = weighted / precision;
            *lv = -precision.ln();
        });
}

/// Gradients of the PoE with respect to each expert's mean and log-variance, given the
/// gradients `dm`, `dlv` of the joint (absent experts get zero).
#[allow(clippy::too_many_arguments)] // an op's operands, outputs and shape, as its kernel takes them
pub fn poe_backward<T: Real>(
    means: &[&[T]],
    logvars: &[&[T]],
    present: &[&[bool]],
    dim: usize,
    m: &[T],
    lv: &[T],
    dm: &[T],
    dlv: &[T],
    dmeans: &mut [&mut [T]],
    dlogvars: &mut [&mut [T]],
) {
    let experts = means.len();
    assert!(
        dmeans.len() == experts && dlogvars.len() == experts,
        "poe backward: one gradient per expert"
    );
    for e in 0..experts {
        for i in 0..m.len() {
            let r = i / dim;
            if !present[e][r] {
                dmeans[e][i] = T::zero();
                dlogvars[e][i] = T::zero();
                continue;
            }
            // With P = Σ p_e (prior included), m = Σ m_e p_e / P, lv = -ln P and p_e = exp(-lv_e):
            // ∂m/∂m_e = p_e/P; ∂m/∂p_e = (m_e - m)/P; ∂lv/∂p_e = -1/P; ∂p_e/∂lv_e = -p_e.
            let p = (-logvars[e][i]).exp();
            let precision = (-lv[i]).exp();
            dmeans[e][i] = dm[i] * p / precision;
            let dp = dm[i] * (means[e][i] - m[i]) / precision - dlv[i] / precision;
            dlogvars[e][i] = -dp * p;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::check;

    fn values(n: usize, seed: f64) -> Vec<f64> {
        crate::gradcheck::wave(n, seed)
    }

    #[test]
    fn reparameterize_gradients() {
        let (m, lv, eps, g) = (
            values(31, 0.0),
            values(31, 1.0),
            values(31, 2.0),
            values(31, 3.0),
        );
        let loss = |m: &[f64], lv: &[f64]| {
            let mut z = vec![0.0; 31];
            reparameterize_forward(m, lv, &eps, &mut z);
            z.iter().zip(&g).map(|(a, b)| a * b).sum::<f64>()
        };
        let (mut dm, mut dlv) = (vec![0.0; 31], vec![0.0; 31]);
        reparameterize_backward(&lv, &eps, &g, &mut dm, &mut dlv);
        check(|p| loss(p, &lv), &m, &dm, 1e-6, 1e-8).unwrap();
        check(|p| loss(&m, p), &lv, &dlv, 1e-6, 1e-8).unwrap();
    }

    #[test]
    fn jeffreys_value_and_gradients() {
        // Equal variances: J = δ² / σ² per latent; identical Gaussians: 0.
        let (mut v, mut g) = ([0.0f64; 1], [[0.0f64; 2]; 4]);
        let [a, b, c, d] = &mut g;
        jeffreys(
            &[1.0, 0.0],
            &[0.0, 2f64.ln()],
            &[0.0, 0.0],
            &[0.0, 2f64.ln()],
            2,
            &[1.0],
            &mut v,
            [a, b, c, d],
        );
        assert!((v[0] - 1.0).abs() < 1e-15, "{}", v[0]);
        let (rows, dim) = (5, 3);
        let n = rows * dim;
        let (m1, lv1, m2, lv2) = (
            values(n, 0.0),
            values(n, 1.0),
            values(n, 2.0),
            values(n, 3.0),
        );
        let w = [1.0, 0.0, 2.0, 0.5, 1.5];
        let total = |x: [&[f64]; 4]| {
            let mut v = vec![0.0; rows];
            let mut g = vec![vec![0.0; n]; 4];
            let [a, b, c, d] = &mut g[..] else {
                unreachable!()
            };
            jeffreys(x[0], x[1], x[2], x[3], dim, &w, &mut v, [a, b, c, d]);
            (v.iter().zip(&w).map(|(v, w)| v * w).sum::<f64>(), g)
        };
        let (_, g) = total([&m1, &lv1, &m2, &lv2]);
        check(|p| total([p, &lv1, &m2, &lv2]).0, &m1, &g[0], 1e-6, 1e-8).unwrap();
        check(|p| total([&m1, p, &m2, &lv2]).0, &lv1, &g[1], 1e-6, 1e-8).unwrap();
        check(|p| total([&m1, &lv1, p, &lv2]).0, &m2, &g[2], 1e-6, 1e-8).unwrap();
        check(|p| total([&m1, &lv1, &m2, p]).0, &lv2, &g[3], 1e-6, 1e-8).unwrap();
    }

    #[test]
    fn kl_value_and_gradients() {
        // KL(N(1, e^0) || N(0,1)) = 0.5 per dimension.
        let (mut kl, mut dm, mut dlv) = ([0.0f64], [0.0f64; 2], [0.0f64; 2]);
        kl_standard_normal(
            &[1.0, 1.0],
            &[0.0, 0.0],
            2,
            None,
            &mut kl,
            &mut dm,
            &mut dlv,
        );
        assert!((kl[0] - 1.0).abs() < 1e-15);
        let (rows, dim) = (4, 10);
        let (m, lv) = (values(rows * dim, 0.0), values(rows * dim, 5.0));
        let w = [1.0, 0.0, 2.0, 0.5];
        let total = |m: &[f64], lv: &[f64]| {
            let (mut kl, mut a, mut b) = (
                vec![0.0; rows],
                vec![0.0; rows * dim],
                vec![0.0; rows * dim],
            );
            kl_standard_normal(m, lv, dim, Some(&w), &mut kl, &mut a, &mut b);
            (kl.iter().zip(&w).map(|(k, w)| k * w).sum::<f64>(), a, b)
        };
        let (_, dm, dlv) = total(&m, &lv);
        check(|p| total(p, &lv).0, &m, &dm, 1e-6, 1e-8).unwrap();
        check(|p| total(&m, p).0, &lv, &dlv, 1e-6, 1e-8).unwrap();
    }

    #[test]
    fn poe_with_missing_experts() {
        let (rows, dim) = (3, 4);
        let n = rows * dim;
        let (m1, l1, m2, l2) = (
            values(n, 0.0),
            values(n, 1.0),
            values(n, 2.0),
            values(n, 3.0),
        );
        let p1 = [true, true, false];
        let p2 = [true, false, false];
        let run = |m1: &[f64], l1: &[f64], m2: &[f64], l2: &[f64]| {
            let (mut m, mut lv) = (vec![0.0; n], vec![0.0; n]);
            poe_forward(&[m1, m2], &[l1, l2], &[&p1, &p2], dim, &mut m, &mut lv);
            (m, lv)
        };
        let (m, lv) = run(&m1, &l1, &m2, &l2);
        // A cell with no experts gets the prior; one with expert 1 only, the product of it and the prior.
        assert!(m[2 * dim..].iter().all(|&v| v == 0.0) && lv[2 * dim..].iter().all(|&v| v == 0.0));
        let p = (-l1[dim]).exp();
        assert!((m[dim] - m1[dim] * p / (1.0 + p)).abs() < 1e-15);
        let (gm, gl) = (values(n, 7.0), values(n, 8.0));
        let loss = |m1: &[f64], l1: &[f64], m2: &[f64], l2: &[f64]| {
            let (m, lv) = run(m1, l1, m2, l2);
            m.iter().zip(&gm).map(|(a, b)| a * b).sum::<f64>()
                + lv.iter().zip(&gl).map(|(a, b)| a * b).sum::<f64>()
        };
        let (mut dm1, mut dl1, mut dm2, mut dl2) =
            (vec![0.0; n], vec![0.0; n], vec![0.0; n], vec![0.0; n]);
        poe_backward(
            &[&m1, &m2],
            &[&l1, &l2],
            &[&p1, &p2],
            dim,
            &m,
            &lv,
            &gm,
            &gl,
            &mut [&mut dm1, &mut dm2],
            &mut [&mut dl1, &mut dl2],
        );
        check(|p| loss(p, &l1, &m2, &l2), &m1, &dm1, 1e-6, 1e-7).unwrap();
        check(|p| loss(&m1, p, &m2, &l2), &l1, &dl1, 1e-6, 1e-7).unwrap();
        check(|p| loss(&m1, &l1, p, &l2), &m2, &dm2, 1e-6, 1e-7).unwrap();
        check(|p| loss(&m1, &l1, &m2, p), &l2, &dl2, 1e-6, 1e-7).unwrap();
    }
}
