//! Optimiser steps over the flat parameter buffer: fused Adam/AdamW (PyTorch semantics:
//! bias-corrected moments; weight decay as an L2 term in the gradient for Adam, decoupled for
//! AdamW) and global gradient-norm clipping. Both touch each
//! element once, so they run at memory bandwidth.

use rayon::prelude::*;

use crate::real::Real;

pub const CUDA_SOURCE: &str = include_str!("optim.cu");

pub mod gpu;

/// Elements per parallel chunk; also the partition of the gradient-norm sum (same on GPU).
const GRAIN: usize = 1 << 14;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamW {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Decay the parameters apart from the moments (AdamW); false: add weight_decay · p to the
    /// gradient (PyTorch's Adam, scvi-tools' default optimiser).
    pub decoupled: bool,
}

impl Default for AdamW {
    /// scvi-tools' defaults: Adam, lr 1e-3, eps 1e-2 (sic; scvi uses a large eps), weight decay
    /// 1e-6.
    fn default() -> Self {
        AdamW {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-2,
            weight_decay: 1e-6,
            decoupled: false,
        }
    }
}

/// The per-step scalars of [`AdamW`], shared by the CPU loop and the CUDA kernel.
#[derive(Debug, Clone, Copy)]
pub struct AdamWStep {
    pub beta1: f64,
    pub beta2: f64,
    /// lr / (1 - β1^t)
    pub step_size: f64,
    /// 1 / √(1 - β2^t)
    pub inv_correction2: f64,
    pub eps: f64,
    /// 1 - lr · weight decay (AdamW), else 1
    pub decay: f64,
    /// weight decay (Adam's L2 term in the gradient), else 0
    pub l2: f64,
}

impl AdamW {
    /// Step `t`'s scalars, in PyTorch's arrangement (bias corrections folded into the step
    /// size and the denominator): one division and one square root per parameter.
    pub fn at(&self, t: u64) -> AdamWStep {
        assert!(t >= 1, "AdamW steps count from 1");
        let t = i32::try_from(t).unwrap_or(i32::MAX);
        AdamWStep {
            beta1: self.beta1,
            beta2: self.beta2,
            step_size: self.lr / (1.0 - self.beta1.powi(t)),
            inv_correction2: 1.0 / (1.0 - self.beta2.powi(t)).sqrt(),
            eps: self.eps,
            decay: if self.decoupled {
                1.0 - self.lr * self.weight_decay
            } else {
                1.0
            },
            l2: if self.decoupled {
                0.0
            } else {
                self.weight_decay
            },
        }
    }

    /// One step `t` (1-based) for every parameter: g ← g + l2·p, then
    /// p ← p·decay - lr·m̂/(√v̂ + eps) (see [`AdamWStep`]).
    pub fn step<T: Real>(&self, t: u64, params: &mut [T], grads: &[T], m: &mut [T], v: &mut [T]) {
        assert!(
            params.len() == grads.len() && grads.len() == m.len() && m.len() == v.len(),
            "AdamW: buffer lengths"
        );
        let k = self.at(t);
        let (b1, b2, step_size, inv_c2, eps, decay, l2) = (
            T::of(k.beta1),
            T::of(k.beta2),
            T::of(k.step_size),
            T::of(k.inv_correction2),
            T::of(k.eps),
            T::of(k.decay),
            T::of(k.l2),
        );
        let one = T::one();
        params
            .par_chunks_mut(GRAIN)
            .zip(m.par_chunks_mut(GRAIN).zip(v.par_chunks_mut(GRAIN)))
            .zip(grads.par_chunks(GRAIN))
            .for_each(|((p, (m, v)), g)| {
                let n = p.len();
                let (m, v, g) = (&mut m[..n], &mut v[..n], &g[..n]);
                for i in 0..n {
                    let g = g[i] + l2 * p[i];
                    m[i] = b1 * m[i] + (one - b1) * g;
                    v[i] = b2 * v[i] + (one - b2) * g * g;
                    p[i] = p[i] * decay - step_size * m[i] / (v[i].sqrt() * inv_c2 + eps);
                }
            });
    }
}

/// The global L2 norm of the gradients, accumulated in f64 over fixed-size chunks in order
/// (deterministic, and accurate for millions of parameters).
pub fn grad_norm<T: Real>(grads: &[T]) -> f64 {
    let partial: Vec<f64> = grads
        .par_chunks(GRAIN)
        .map(|c| c.iter().map(|&g| g.f64() * g.f64()).sum::<f64>())
        .collect();
    partial.iter().sum::<f64>().sqrt()
}

/// 1 if some entry is NaN or infinite, else 0: whether a step's gradients can be applied,
/// without their norm (which a GPU would have to send to the host on its own).
pub fn non_finite_flag<T: Real>(x: &[T]) -> T {
    if x.par_iter().any(|v| !v.f64().is_finite()) {
        T::one()
    } else {
        T::zero()
    }
}

/// Scales the gradients so their norm is at most `max_norm` (PyTorch's clip_grad_norm_:
/// factor max/(norm + 1e-6) when norm exceeds max). Returns the norm before clipping; a
/// non-finite norm is returned unchanged and nothing is scaled (the caller names the term).
pub fn clip_grad_norm<T: Real>(grads: &mut [T], max_norm: f64) -> f64 {
    let norm = grad_norm(grads);
    if norm.is_finite() && norm > max_norm {
        let scale = T::of(max_norm / (norm + 1e-6));
        grads.par_iter_mut().for_each(|g| *g = *g * scale);
    }
    norm
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adamw_matches_the_closed_form_of_its_first_steps() {
        let opt = AdamW {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            weight_decay: 0.01,
            decoupled: true,
        };
        let (mut p, mut m, mut v) = (vec![1.0f64, -2.0], vec![0.0; 2], vec![0.0; 2]);
        let g = [0.5, -4.0];
        opt.step(1, &mut p, &g, &mut m, &mut v);
        // Step 1: m̂ = g, v̂ = g², so the update is lr·sign(g) (up to eps) after decay.
        for (i, &start) in [1.0f64, -2.0].iter().enumerate() {
            let expect = start * (1.0 - 0.1 * 0.01) - 0.1 * g[i] / (g[i].abs() + 1e-8);
            assert!((p[i] - expect).abs() < 1e-12, "step 1, param {i}");
        }
        // Step 2 with the same gradient: moments m = g(0.9·0.1+0.1)... computed by hand.
        let before = p.clone();
        opt.step(2, &mut p, &g, &mut m, &mut v);
        for i in 0..2 {
            let m2 = 0.9 * (0.1 * g[i]) + 0.1 * g[i];
            let v2 = 0.99 * (0.01 * g[i] * g[i]) + 0.01 * g[i] * g[i];
            let (mh, vh) = (m2 / (1.0 - 0.81), v2 / (1.0 - 0.9801));
            let expect = before[i] * (1.0 - 0.001) - 0.1 * mh / (vh.sqrt() + 1e-8);
            assert!((p[i] - expect).abs() < 1e-12, "step 2, param {i}");
        }
    }

    #[test]
    fn adam_adds_the_l2_term_to_the_gradient_before_the_moments() {
        let opt = AdamW {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            weight_decay: 0.5,
            decoupled: false,
        };
        let (mut p, mut m, mut v) = (vec![1.0f64, -2.0], vec![0.0; 2], vec![0.0; 2]);
        let g = [0.5, -4.0];
        opt.step(1, &mut p, &g, &mut m, &mut v);
        for (i, &start) in [1.0f64, -2.0].iter().enumerate() {
            // g' = g + wd·p: 1.0 and -5.0; step 1 moves by lr·sign(g'), with no decay of p.
            let gl2 = g[i] + 0.5 * start;
            assert!(
                (m[i] - 0.1 * gl2).abs() < 1e-12,
                "first moment of g + wd·p, param {i}"
            );
            let expect = start - 0.1 * gl2 / (gl2.abs() + 1e-8);
            assert!((p[i] - expect).abs() < 1e-12, "step 1, param {i}");
        }
    }

    #[test]
    fn adamw_minimises_a_quadratic() {
        let opt = AdamW {
            lr: 0.05,
            eps: 1e-8,
            weight_decay: 0.0,
            ..Default::default()
        };
        let target: Vec<f32> = (0..1025).map(|i| (i as f32 * 0.1).sin()).collect();
        let (mut p, mut m, mut v) = (vec![0.0f32; 1025], vec![0.0; 1025], vec![0.0; 1025]);
        for t in 1..=400 {
            let g: Vec<f32> = p.iter().zip(&target).map(|(a, b)| 2.0 * (a - b)).collect();
            opt.step(t, &mut p, &g, &mut m, &mut v);
        }
        let err = p
            .iter()
            .zip(&target)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(err < 1e-2, "max error {err}");
    }

    #[test]
    fn clipping() {
        let mut g = vec![3.0f64, 4.0];
        assert_eq!(clip_grad_norm(&mut g, 10.0), 5.0);
        assert_eq!(g, [3.0, 4.0], "under the limit: untouched");
        let norm = clip_grad_norm(&mut g, 1.0);
        assert_eq!(norm, 5.0);
        assert!((grad_norm(&g) - 1.0).abs() < 1e-6);
        let mut bad = vec![1.0f32, f32::NAN];
        assert!(clip_grad_norm(&mut bad, 1.0).is_nan());
        assert_eq!(bad[0], 1.0, "a NaN norm scales nothing");
    }
}
