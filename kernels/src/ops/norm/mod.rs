//! Row softmax, LayerNorm (per row, affine) and BatchNorm (per feature over the batch, affine,
//! running statistics for evaluation; PyTorch semantics). Row-major (rows x features).

use rayon::prelude::*;

use crate::real::Real;

/// CUDA kernels of softmax, LayerNorm and BatchNorm.
pub const CUDA_SOURCE: &str = include_str!("norm.cu");

pub mod gpu;

/// y = softmax(x) over each row of `features`.
pub fn softmax_forward<T: Real>(x: &[T], features: usize, y: &mut [T]) {
    assert!(
        features > 0 && x.len() == y.len() && x.len().is_multiple_of(features),
        "softmax: shapes"
    );
    y.par_chunks_mut(features)
        .zip(x.par_chunks(features))
        .for_each(|(y, x)| {
            let max = x.iter().copied().fold(T::neg_infinity(), T::max);
            for (y, &x) in y.iter_mut().zip(x) {
                *y = x - max;
            }
            T::exp_in_place(y);
            let sum: T = y.iter().copied().sum();
            y.iter_mut().for_each(|v| *v = *v / sum);
        });
}

/// dx = y ⊙ (dy - Σ dy ⊙ y), per row.
pub fn softmax_backward<T: Real>(y: &[T], dy: &[T], features: usize, dx: &mut [T]) {
    assert!(
        y.len() == dy.len() && dy.len() == dx.len() && y.len().is_multiple_of(features),
        "softmax backward: shapes"
    );
    dx.par_chunks_mut(features)
        .zip(y.par_chunks(features).zip(dy.par_chunks(features)))
        .for_each(|(dx, (y, dy))| {
            let dot: T = y.iter().zip(dy).map(|(&a, &b)| a * b).sum();
            for i in 0..dx.len() {
                dx[i] = y[i] * (dy[i] - dot);
            }
        });
}

/// Normalised values and 1/σ per group, kept from the forward for the backward.
#[derive(Debug, Clone)]
pub struct NormCache<T> {
    pub xhat: Vec<T>,
    pub inv_std: Vec<T>,
}

/// LayerNorm without an affine map, as scvi-tools' `FCLayers` use it
/// (`elementwise_affine=False`): each row of `features` values normalised to mean 0 and
/// (biased) variance 1, y = x̂; 1/σ per row kept for the backward.
pub fn layer_norm_forward<T: Real>(
    x: &[T],
    features: usize,
    eps: f64,
    y: &mut [T],
    inv_std: &mut [T],
) {
    assert!(
        features > 0
            && x.len() == y.len()
            && x.len().is_multiple_of(features)
            && inv_std.len() == x.len() / features,
        "layer norm: shapes"
    );
    let nf = T::of(features as f64);
    y.par_chunks_mut(features)
        .zip(inv_std.par_iter_mut())
        .zip(x.par_chunks(features))
        .for_each(|((y, inv), x)| {
            let mean = x.iter().copied().sum::<T>() / nf;
            let var = x.iter().map(|&v| (v - mean) * (v - mean)).sum::<T>() / nf;
            *inv = T::one() / (var + T::of(eps)).sqrt();
            for (y, &x) in y.iter_mut().zip(x) {
                *y = (x - mean) * *inv;
            }
        });
}

/// dx per row from the forward's output y = x̂ and 1/σ: dx = (dy − mean(dy) − x̂ mean(dy ⊙ x̂)) / σ.
pub fn layer_norm_backward<T: Real>(y: &[T], inv_std: &[T], dy: &[T], dx: &mut [T]) {
    assert!(
        !inv_std.is_empty() || y.is_empty(),
        "layer norm backward: 1/σ per row"
    );
    let features = y.len() / inv_std.len().max(1);
    assert!(
        dy.len() == y.len() && dx.len() == y.len() && features * inv_std.len() == y.len(),
        "layer norm backward: shapes"
    );
    if y.is_empty() {
        return;
    }
    let nf = T::of(features as f64);
    dx.par_chunks_mut(features)
        .zip(dy.par_chunks(features).zip(y.par_chunks(features)))
        .zip(inv_std.par_iter())
        .for_each(|((dx, (dy, xhat)), &inv)| {
            let (mut mean_g, mut mean_gx) = (T::zero(), T::zero());
            for (&g, &h) in dy.iter().zip(xhat) {
                mean_g = mean_g + g;
                mean_gx = mean_gx + g * h;
            }
            mean_g = mean_g / nf;
            mean_gx = mean_gx / nf;
            for ((dx, &g), &h) in dx.iter_mut().zip(dy).zip(xhat) {
                *dx = inv * (g - mean_g - h * mean_gx);
            }
        });
}

/// BatchNorm's running statistics and settings (PyTorch: running = (1-m)·running + m·batch,
/// with the unbiased batch variance; normalisation uses the biased one).
#[derive(Debug)]
pub struct Running<'a, T> {
    pub mean: &'a mut [T],
    pub var: &'a mut [T],
    pub momentum: f64,
    pub eps: f64,
}

/// Training forward over slices (γ, β and the statistics may live in a model's flat buffers):
/// batch statistics, running statistics updated, x̂ and 1/σ kept for the backward.
#[allow(clippy::too_many_arguments)] // an op's operands, outputs and shape, as its kernel takes them
pub fn batch_norm_train<T: Real>(
    x: &[T],
    gamma: &[T],
    beta: &[T],
    running: Running<'_, T>,
    y: &mut [T],
    xhat: &mut [T],
    inv_std: &mut [T],
) {
    let f = gamma.len();
    assert!(
        f > 0
            && beta.len() == f
            && x.len() == y.len()
            && x.len() == xhat.len()
            && inv_std.len() == f
            && x.len().is_multiple_of(f),
        "batch norm: shapes"
    );
    assert!(
        running.mean.len() == f && running.var.len() == f,
        "batch norm: running statistics"
    );
    let rows = x.len() / f;
    assert!(rows != 1, "batch norm needs more than one row in training");
    if rows == 0 {
        // A modality no cell of the batch measured: nothing to normalise, statistics unchanged.
        return;
    }
    let n = T::of(rows as f64);
    let mut mean = vec![T::zero(); f];
    crate::ops::elementwise::column_sums(x, &mut mean);
    mean.iter_mut().for_each(|m| *m = *m / n);
    let centered: Vec<T> = x
        .iter()
        .enumerate()
        .map(|(i, &v)| (v - mean[i % f]) * (v - mean[i % f]))
        .collect();
    let mut var = vec![T::zero(); f];
    crate::ops::elementwise::column_sums(&centered, &mut var);
    var.iter_mut().for_each(|v| *v = *v / n);
    for (inv, &v) in inv_std.iter_mut().zip(&var) {
        *inv = T::one() / (v + T::of(running.eps)).sqrt();
    }
    let m = T::of(running.momentum);
    let unbias = T::of(rows as f64 / (rows as f64 - 1.0));
    for c in 0..f {
        running.mean[c] = (T::one() - m) * running.mean[c] + m * mean[c];
        running.var[c] = (T::one() - m) * running.var[c] + m * var[c] * unbias;
    }
    let inv_std = &*inv_std;
    xhat.par_chunks_mut(f)
        .zip(x.par_chunks(f).zip(y.par_chunks_mut(f)))
        .for_each(|(xh, (x, y))| {
            for c in 0..f {
                xh[c] = (x[c] - mean[c]) * inv_std[c];
                y[c] = gamma[c] * xh[c] + beta[c];
            }
        });
}

/// Evaluation forward: running statistics.
pub fn batch_norm_eval<T: Real>(
    x: &[T],
    gamma: &[T],
    beta: &[T],
    running_mean: &[T],
    running_var: &[T],
    eps: f64,
    y: &mut [T],
) {
    let f = gamma.len();
    assert!(
        f > 0
            && x.len() == y.len()
            && x.len().is_multiple_of(f)
            && [beta.len(), running_mean.len(), running_var.len()] == [f; 3],
        "batch norm: shapes"
    );
    y.par_chunks_mut(f).zip(x.par_chunks(f)).for_each(|(y, x)| {
        for c in 0..f {
            let inv = T::one() / (running_var[c] + T::of(eps)).sqrt();
            y[c] = gamma[c] * (x[c] - running_mean[c]) * inv + beta[c];
        }
    });
}

/// Training backward: dx, dγ, dβ from the forward's x̂ and 1/σ.
pub fn batch_norm_backward<T: Real>(
    xhat: &[T],
    inv_std: &[T],
    gamma: &[T],
    dy: &[T],
    dx: &mut [T],
    dgamma: &mut [T],
    dbeta: &mut [T],
) {
    let f = gamma.len();
    assert!(
        dy.len() == xhat.len()
            && dx.len() == dy.len()
            && inv_std.len() == f
            && dgamma.len() == f
            && dbeta.len() == f,
        "batch norm backward: shapes"
    );
    let n = T::of((dy.len() / f) as f64);
    let prod: Vec<T> = dy.iter().zip(xhat).map(|(&a, &b)| a * b).collect();
    crate::ops::elementwise::column_sums(&prod, dgamma);
    crate::ops::elementwise::column_sums(dy, dbeta);
    let (dgamma, dbeta) = (&*dgamma, &*dbeta);
    dx.par_chunks_mut(f)
        .zip(dy.par_chunks(f).zip(xhat.par_chunks(f)))
        .for_each(|(dx, (dy, xh))| {
            for c in 0..f {
                // dx = γ/σ (dy - mean(dy) - x̂ mean(dy x̂)), means over rows.
                dx[c] = gamma[c] * inv_std[c] * (dy[c] - dbeta[c] / n - xh[c] * dgamma[c] / n);
            }
        });
}

/// A standalone BatchNorm layer owning its parameters and running statistics.
#[derive(Debug, Clone)]
pub struct BatchNorm<T> {
    pub gamma: Vec<T>,
    pub beta: Vec<T>,
    pub running_mean: Vec<T>,
    pub running_var: Vec<T>,
    pub momentum: f64,
    pub eps: f64,
}

impl<T: Real> BatchNorm<T> {
    /// scvi-tools' setting: momentum 0.01, eps 1e-3.
    pub fn new(features: usize) -> Self {
        BatchNorm {
            gamma: vec![T::one(); features],
            beta: vec![T::zero(); features],
            running_mean: vec![T::zero(); features],
            running_var: vec![T::one(); features],
            momentum: 0.01,
            eps: 1e-3,
        }
    }

    /// Training forward: batch statistics, running statistics updated.
    pub fn forward_train(&mut self, x: &[T], y: &mut [T]) -> NormCache<T> {
        let f = self.gamma.len();
        let mut cache = NormCache {
            xhat: vec![T::zero(); x.len()],
            inv_std: vec![T::zero(); f],
        };
        let running = Running {
            mean: &mut self.running_mean,
            var: &mut self.running_var,
            momentum: self.momentum,
            eps: self.eps,
        };
        batch_norm_train(
            x,
            &self.gamma,
            &self.beta,
            running,
            y,
            &mut cache.xhat,
            &mut cache.inv_std,
        );
        cache
    }

    /// Evaluation forward: running statistics.
    pub fn forward_eval(&self, x: &[T], y: &mut [T]) {
        batch_norm_eval(
            x,
            &self.gamma,
            &self.beta,
            &self.running_mean,
            &self.running_var,
            self.eps,
            y,
        );
    }

    /// Training backward: dx, dγ, dβ.
    pub fn backward(
        &self,
        cache: &NormCache<T>,
        dy: &[T],
        dx: &mut [T],
        dgamma: &mut [T],
        dbeta: &mut [T],
    ) {
        batch_norm_backward(
            &cache.xhat,
            &cache.inv_std,
            &self.gamma,
            dy,
            dx,
            dgamma,
            dbeta,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{check_at, spread};

    fn values(n: usize, seed: f64) -> Vec<f64> {
        crate::gradcheck::wave(n, seed)
            .into_iter()
            .map(|v| v * 2.0)
            .collect()
    }

    fn weighted(y: &[f64], g: &[f64]) -> f64 {
        y.iter().zip(g).map(|(a, b)| a * b).sum()
    }

    #[test]
    fn softmax_rows_sum_to_one_and_gradient_checks() {
        for (rows, f) in [(1, 1), (3, 31), (2, 1025)] {
            let x = values(rows * f, 0.0);
            let g = values(rows * f, 4.0);
            let mut y = vec![0.0; rows * f];
            softmax_forward(&x, f, &mut y);
            for r in 0..rows {
                assert!((y[r * f..(r + 1) * f].iter().sum::<f64>() - 1.0).abs() < 1e-12);
            }
            let mut dx = vec![0.0; rows * f];
            softmax_backward(&y, &g, f, &mut dx);
            let loss = |x: &[f64]| {
                let mut y = vec![0.0; x.len()];
                softmax_forward(x, f, &mut y);
                weighted(&y, &g)
            };
            check_at(loss, &x, &dx, spread(x.len(), 64), 1e-6, 1e-7).unwrap();
        }
        // Large logits do not overflow.
        let mut y = [0.0f32; 2];
        softmax_forward(&[1000.0f32, 1000.0], 2, &mut y);
        assert_eq!(y, [0.5, 0.5]);
    }

    #[test]
    fn layer_norm_gradients() {
        for (rows, f) in [(1, 2), (3, 31), (2, 1025)] {
            let (x, g) = (values(rows * f, 0.0), values(rows * f, 3.0));
            let loss = |x: &[f64]| {
                let (mut y, mut inv) = (vec![0.0; x.len()], vec![0.0; rows]);
                layer_norm_forward(x, f, 1e-5, &mut y, &mut inv);
                weighted(&y, &g)
            };
            let (mut y, mut inv) = (vec![0.0; rows * f], vec![0.0; rows]);
            layer_norm_forward(&x, f, 1e-5, &mut y, &mut inv);
            let row = &y[..f];
            let mean = row.iter().sum::<f64>() / f as f64;
            let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / f as f64;
            assert!(mean.abs() < 1e-12, "mean {mean}");
            // Variance 1 up to eps's share (σ² / (σ² + eps)).
            assert!((var - 1.0).abs() < 1e-3, "variance {var}");
            let mut dx = vec![0.0; rows * f];
            layer_norm_backward(&y, &inv, &g, &mut dx);
            check_at(loss, &x, &dx, spread(x.len(), 64), 1e-5, 1e-5).unwrap();
        }
    }

    #[test]
    fn batch_norm_train_gradients_and_running_stats() {
        for (rows, f) in [(2, 1), (7, 31), (5, 1025)] {
            let (x, g) = (values(rows * f, 0.0), values(rows * f, 3.0));
            let mut bn = BatchNorm::<f64>::new(f);
            bn.gamma = values(f, 1.0);
            bn.beta = values(f, 2.0);
            let loss = |x: &[f64], gamma: &[f64], beta: &[f64]| {
                let mut b = BatchNorm {
                    gamma: gamma.to_vec(),
                    beta: beta.to_vec(),
                    ..BatchNorm::new(f)
                };
                let mut y = vec![0.0; x.len()];
                b.forward_train(x, &mut y);
                weighted(&y, &g)
            };
            let mut y = vec![0.0; rows * f];
            let cache = bn.forward_train(&x, &mut y);
            let (mut dx, mut dgamma, mut dbeta) = (vec![0.0; rows * f], vec![0.0; f], vec![0.0; f]);
            bn.backward(&cache, &g, &mut dx, &mut dgamma, &mut dbeta);
            check_at(
                |p| loss(p, &bn.gamma, &bn.beta),
                &x,
                &dx,
                spread(x.len(), 64),
                1e-5,
                1e-5,
            )
            .unwrap();
            check_at(
                |p| loss(&x, p, &bn.beta),
                &bn.gamma,
                &dgamma,
                spread(f, 64),
                1e-5,
                1e-5,
            )
            .unwrap();
            check_at(
                |p| loss(&x, &bn.gamma, p),
                &bn.beta,
                &dbeta,
                spread(f, 64),
                1e-5,
                1e-5,
            )
            .unwrap();
            // Running statistics after one step: 0.99·init + 0.01·batch (unbiased variance).
            let col0: Vec<f64> = (0..rows).map(|r| x[r * f]).collect();
            let mean = col0.iter().sum::<f64>() / rows as f64;
            let var = col0.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (rows as f64 - 1.0);
            assert!((bn.running_mean[0] - 0.01 * mean).abs() < 1e-12);
            assert!((bn.running_var[0] - (0.99 + 0.01 * var)).abs() < 1e-12);
        }
    }

    #[test]
    fn batch_norm_eval_uses_running_statistics() {
        let mut bn = BatchNorm::<f64>::new(2);
        bn.running_mean = vec![1.0, -1.0];
        bn.running_var = vec![4.0 - 1e-3, 1.0 - 1e-3];
        let mut y = [0.0; 4];
        bn.forward_eval(&[3.0, 0.0, 1.0, -1.0], &mut y);
        for (a, b) in y.iter().zip([1.0, 1.0, 0.0, 0.0]) {
            assert!((a - b).abs() < 1e-12);
        }
    }
}
