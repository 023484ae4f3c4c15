//! Activations and bias add: paired forward/backward, CPU reference here, CUDA in
//! `elementwise.cu` (same formulas, parity-tested).

use rayon::prelude::*;

use crate::real::{Real, sigmoid, softplus};

/// The CUDA source of this op family; compiled by NVRTC at first use.
pub const CUDA_SOURCE: &str = include_str!("elementwise.cu");

pub mod gpu;

/// Elements per rayon task: large enough that scheduling is noise.
const GRAIN: usize = 1 << 14;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Activation {
    Identity,
    Relu,
    LeakyRelu(f32),
    Elu(f32),
    Softplus,
    Exp,
    Sigmoid,
    /// ln(1 + x), for x > -1 (expected counts into the encoders' log1p space).
    Log1p,
    /// ln(eˣ + eᵇ) = b + softplus(x − b): a log-variance floored at eᵇ (scvi-tools' posterior
    /// variance exp(·) + var_eps, carried as its logarithm).
    LogAddExp(f32),
}

impl Activation {
    /// (kind, parameter) as the CUDA kernels take them.
    pub fn code(self) -> (i32, f32) {
        match self {
            Activation::Identity => (0, 0.0),
            Activation::Relu => (1, 0.0),
            Activation::LeakyRelu(a) => (2, a),
            Activation::Elu(a) => (3, a),
            Activation::Softplus => (4, 0.0),
            Activation::Exp => (5, 0.0),
            Activation::Sigmoid => (6, 0.0),
            Activation::Log1p => (7, 0.0),
            Activation::LogAddExp(b) => (8, b),
        }
    }

    fn apply<T: Real>(self, x: T) -> T {
        let zero = T::zero();
        match self {
            Activation::Identity => x,
            Activation::Relu => x.max(zero),
            Activation::LeakyRelu(a) => {
                if x > zero {
                    x
                } else {
                    T::of(f64::from(a)) * x
                }
            }
            Activation::Elu(a) => {
                if x > zero {
                    x
                } else {
                    T::of(f64::from(a)) * x.exp_m1()
                }
            }
            Activation::Softplus => softplus(x),
            Activation::Exp => x.exp(),
            Activation::Sigmoid => sigmoid(x),
            Activation::Log1p => x.ln_1p(),
            Activation::LogAddExp(b) => {
                let b = T::of(f64::from(b));
                b + softplus(x - b)
            }
        }
    }

    /// dy/dx from the input and the output (whichever is cheaper).
    fn derivative<T: Real>(self, x: T, y: T) -> T {
        let (zero, one) = (T::zero(), T::one());
        match self {
            Activation::Identity => one,
            Activation::Relu => {
                if x > zero {
                    one
                } else {
                    zero
                }
            }
            Activation::LeakyRelu(a) => {
                if x > zero {
                    one
                } else {
                    T::of(f64::from(a))
                }
            }
            Activation::Elu(a) => {
                if x > zero {
                    one
                } else {
                    y + T::of(f64::from(a))
                }
            }
            Activation::Softplus => sigmoid(x),
            Activation::Exp => y,
            Activation::Sigmoid => y * (one - y),
            Activation::Log1p => one / (one + x),
            Activation::LogAddExp(b) => sigmoid(x - T::of(f64::from(b))),
        }
    }

    pub fn forward<T: Real>(self, x: &[T], y: &mut [T]) {
        assert_eq!(x.len(), y.len(), "activation: input and output lengths");
        y.par_chunks_mut(GRAIN)
            .zip(x.par_chunks(GRAIN))
            .for_each(|(y, x)| {
                for (y, &x) in y.iter_mut().zip(x) {
                    *y = self.apply(x);
                }
            });
    }

    /// dx = dy * f'(x), given the forward's input and output.
    pub fn backward<T: Real>(self, x: &[T], y: &[T], dy: &[T], dx: &mut [T]) {
        assert!(
            x.len() == y.len() && y.len() == dy.len() && dy.len() == dx.len(),
            "activation backward: lengths"
        );
        dx.par_chunks_mut(GRAIN).enumerate().for_each(|(c, dx)| {
            let base = c * GRAIN;
            for (i, dx) in dx.iter_mut().enumerate() {
                let k = base + i;
                *dx = dy[k] * self.derivative(x[k], y[k]);
            }
        });
    }
}

/// y[r, c] += bias[c] for a row-major (rows x cols) matrix.
pub fn bias_add_forward<T: Real>(y: &mut [T], bias: &[T]) {
    let cols = bias.len();
    assert!(
        cols > 0 && y.len().is_multiple_of(cols),
        "bias add: {} values are not rows of {cols}",
        y.len()
    );
    y.par_chunks_mut(cols).for_each(|row| {
        for (v, &b) in row.iter_mut().zip(bias) {
            *v = *v + b;
        }
    });
}

/// dbias[c] = sum over rows of dy[r, c].
pub fn bias_add_backward<T: Real>(dy: &[T], dbias: &mut [T]) {
    column_sums(dy, dbias);
}

/// out[c] = sum over rows of m[r, c], in row order (deterministic), for a row-major matrix
/// with `out.len()` columns. Also reduces per-entry gradients of shared (per-feature) parameters.
pub fn column_sums<T: Real>(m: &[T], out: &mut [T]) {
    let cols = out.len();
    assert!(
        cols > 0 && m.len().is_multiple_of(cols),
        "column sums: {} values are not rows of {cols}",
        m.len()
    );
    // Blocks of columns, each summed down the rows in row order: contiguous (vectorised) reads
    // and the same order of additions as a column-by-column sum.
    const BLOCK: usize = 256;
    out.par_chunks_mut(BLOCK).enumerate().for_each(|(b, o)| {
        let block = b * BLOCK..b * BLOCK + o.len();
        o.iter_mut().for_each(|v| *v = T::zero());
        for row in m.chunks_exact(cols) {
            for (o, &v) in o.iter_mut().zip(&row[block.clone()]) {
                *o = *o + v;
            }
        }
    });
}

/// y = factor × share in every entry, the product in f64 as the host forms per-row weights:
/// a step's KL weights (factor the KL weight, share a cell's part of the batch mean). The
/// GPU's kernel reads the factor from a device cell (`Gpu::kl_weight_cell`).
pub fn fill_scaled<T: Real>(factor: f64, share: f64, y: &mut [T]) {
    y.fill(T::of(factor * share));
}

/// y += alpha x.
pub fn axpy<T: Real>(alpha: T, x: &[T], y: &mut [T]) {
    assert_eq!(x.len(), y.len(), "axpy: lengths");
    y.par_chunks_mut(GRAIN)
        .zip(x.par_chunks(GRAIN))
        .for_each(|(y, x)| {
            for (y, &x) in y.iter_mut().zip(x) {
                *y = *y + alpha * x;
            }
        });
}

/// y[r, c] = x[r, c] · s[r] (library-size scaling of decoder proportions). Its own backward:
/// dx = scale_rows(dy, s).
pub fn scale_rows<T: Real>(x: &[T], s: &[T], y: &mut [T]) {
    assert!(
        x.len() == y.len()
            && (s.is_empty() && x.is_empty() || !s.is_empty() && x.len().is_multiple_of(s.len())),
        "scale rows: {} values are not {} rows",
        x.len(),
        s.len()
    );
    let cols = if s.is_empty() { 0 } else { x.len() / s.len() };
    if cols == 0 {
        return;
    }
    y.par_chunks_mut(cols)
        .zip(x.par_chunks(cols))
        .zip(s.par_iter())
        .for_each(|((y, x), &s)| {
            for (y, &x) in y.iter_mut().zip(x) {
                *y = x * s;
            }
        });
}

/// Concatenates row-major blocks along features: rows x (w_1 + ... + w_k). The backward is
/// [`split_columns`] of the upstream gradient.
pub fn concat_columns<T: Real>(blocks: &[(&[T], usize)], rows: usize, out: &mut [T]) {
    let width: usize = blocks.iter().map(|(_, w)| w).sum();
    assert!(
        out.len() == rows * width && blocks.iter().all(|(b, w)| b.len() == rows * w),
        "concat: shapes"
    );
    out.par_chunks_mut(width.max(1))
        .enumerate()
        .for_each(|(r, row)| {
            let mut at = 0;
            for (b, w) in blocks {
                row[at..at + w].copy_from_slice(&b[r * w..(r + 1) * w]);
                at += w;
            }
        });
}

/// Splits rows x (w_1 + ... + w_k) into its blocks (the backward of [`concat_columns`]).
pub fn split_columns<T: Real>(m: &[T], rows: usize, outs: &mut [(&mut [T], usize)]) {
    let width: usize = outs.iter().map(|(_, w)| w).sum();
    assert!(
        m.len() == rows * width && outs.iter().all(|(b, w)| b.len() == rows * w),
        "split: shapes"
    );
    for r in 0..rows {
        let mut at = r * width;
        for (b, w) in outs.iter_mut() {
            b[r * *w..(r + 1) * *w].copy_from_slice(&m[at..at + *w]);
            at += *w;
        }
    }
}

/// The first `k` of `cols` columns of a row-major matrix (the batch one-hot at the front of a
/// cell's covariates).
pub fn leading_columns<T: Real>(m: &[T], cols: usize, k: usize, out: &mut [T]) {
    assert!(
        0 < cols && k <= cols && m.len().is_multiple_of(cols) && out.len() == m.len() / cols * k,
        "leading columns: {} values of {cols} columns into {} of {k}",
        m.len(),
        out.len()
    );
    if k == 0 {
        return;
    }
    for (o, row) in out.chunks_mut(k).zip(m.chunks(cols)) {
        o.copy_from_slice(&row[..k]);
    }
}

/// Per row of a row-major matrix of `cols` columns, the first of its leading `k` columns
/// holding a value above zero, as an f32 code (-1 where none does): a cell's batch code from
/// the batch one-hot at the front of its covariates, as a batch classifier reads it.
pub fn first_positive<T: Real>(m: &[T], cols: usize, k: usize, out: &mut [T]) {
    assert!(
        k <= cols && cols > 0 && m.len().is_multiple_of(cols) && out.len() == m.len() / cols,
        "first positive: {} values of {cols} columns into {} codes",
        m.len(),
        out.len()
    );
    for (o, row) in out.iter_mut().zip(m.chunks(cols)) {
        *o = row[..k]
            .iter()
            .position(|&v| v > T::zero())
            .map_or(-T::one(), |c| T::of(c as f64));
    }
}

/// Gathers rows of a (groups x cols) table by per-row group codes (gene-batch dispersion:
/// each cell gets its batch's row).
pub fn gather_rows<T: Real>(table: &[T], codes: &[usize], cols: usize, out: &mut [T]) {
    assert!(out.len() == codes.len() * cols, "gather: shapes");
    out.par_chunks_mut(cols)
        .zip(codes.par_iter())
        .for_each(|(row, &c)| row.copy_from_slice(&table[c * cols..(c + 1) * cols]));
}

/// The backward of [`gather_rows`]: table rows accumulate the gradients of their cells, in cell
/// order (deterministic).
pub fn scatter_add_rows<T: Real>(grads: &[T], codes: &[usize], cols: usize, table_grad: &mut [T]) {
    assert!(
        grads.len() == codes.len() * cols && table_grad.len().is_multiple_of(cols),
        "scatter: shapes"
    );
    table_grad
        .par_chunks_mut(cols)
        .enumerate()
        .for_each(|(group, acc)| {
            acc.iter_mut().for_each(|v| *v = T::zero());
            for (r, _) in codes.iter().enumerate().filter(|(_, c)| **c == group) {
                for (a, &g) in acc.iter_mut().zip(&grads[r * cols..(r + 1) * cols]) {
                    *a = *a + g;
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::check;

    #[test]
    fn first_positive_codes_each_rows_first_set_leading_column() {
        // Three leading columns of four: batch 1, batch 0, none (a positive value past them
        // does not count), batch 2, and the first of two set.
        let m = [
            0.0, 1.0, 0.0, 5.0, //
            1.0, 0.0, 0.0, 0.0, //
            0.0, 0.0, 0.0, 9.0, //
            0.0, -1.0, 1.0, 0.0, //
            0.0, 1.0, 1.0, 0.0f32,
        ];
        let mut out = [0.0f32; 5];
        first_positive(&m, 4, 3, &mut out);
        assert_eq!(out, [1.0, 0.0, -1.0, 2.0, 1.0]);
        first_positive(&m, 4, 0, &mut out);
        assert_eq!(out, [-1.0; 5]);
    }

    const ALL: [Activation; 9] = [
        Activation::Identity,
        Activation::Relu,
        Activation::LeakyRelu(0.1),
        Activation::Elu(1.0),
        Activation::Softplus,
        Activation::Exp,
        Activation::Sigmoid,
        Activation::LogAddExp(-9.21),
        Activation::LogAddExp(1.5),
    ];

    /// Inputs away from the kinks of ReLU-like functions, where finite differences are exact.
    fn inputs(n: usize) -> Vec<f64> {
        (0..n)
            .map(|i| ((i as f64 * 0.7311).sin() * 3.0) + if i % 2 == 0 { 0.05 } else { -0.05 })
            .collect()
    }

    #[test]
    fn log1p_value_and_gradient() {
        let x: Vec<f64> = inputs(31).iter().map(|v| v.abs() * 2.0).collect();
        let mut y = vec![0.0; 31];
        Activation::Log1p.forward(&x, &mut y);
        assert!(y.iter().zip(&x).all(|(y, x)| (y - x.ln_1p()).abs() < 1e-15));
        let loss = |x: &[f64]| {
            let mut y = vec![0.0; x.len()];
            Activation::Log1p.forward(x, &mut y);
            y.iter()
                .enumerate()
                .map(|(i, v)| v * (1.0 + i as f64 * 0.1))
                .sum::<f64>()
        };
        let dy: Vec<f64> = (0..31).map(|i| 1.0 + i as f64 * 0.1).collect();
        let mut dx = vec![0.0; 31];
        Activation::Log1p.backward(&x, &y, &dy, &mut dx);
        check(loss, &x, &dx, 1e-6, 1e-8).unwrap();
    }

    #[test]
    fn log_add_exp_floors_the_variance_at_eps() {
        let b = 1e-4f64.ln();
        let x: [f64; 5] = [-40.0, -9.21, 0.0, 3.0, 60.0];
        let mut y = [0.0f64; 5];
        Activation::LogAddExp(b as f32).forward(&x, &mut y);
        for (&x, &y) in x.iter().zip(&y) {
            // The f32 parameter rounds b: compare with eᵇ as the op sees it.
            let expected = (x.exp() + f64::from(b as f32).exp()).ln();
            assert!(
                (y - expected).abs() < 1e-12,
                "ln(e^{x} + 1e-4) = {y}, not {expected}"
            );
        }
        assert!(
            (y[0].exp() - 1e-4).abs() < 1e-9,
            "large negative inputs give the floor"
        );
        assert_eq!(y[4], 60.0, "large inputs pass through");
    }

    #[test]
    fn activation_gradients_match_finite_differences() {
        for act in ALL {
            for n in [1, 31, 1025] {
                let x = inputs(n);
                let w: Vec<f64> = (0..n).map(|i| 1.0 + (i % 7) as f64 * 0.1).collect();
                let loss = |x: &[f64]| {
                    let mut y = vec![0.0; x.len()];
                    act.forward(x, &mut y);
                    y.iter().zip(&w).map(|(a, b)| a * b).sum::<f64>()
                };
                let mut y = vec![0.0; n];
                act.forward(&x, &mut y);
                let mut dx = vec![0.0; n];
                act.backward(&x, &y, &w, &mut dx);
                check(loss, &x, &dx, 1e-6, 1e-6).unwrap_or_else(|e| panic!("{act:?} n={n}: {e}"));
            }
        }
    }

    #[test]
    fn bias_gradient_matches_finite_differences() {
        let (rows, cols) = (5, 31);
        let dy: Vec<f64> = (0..rows * cols).map(|i| (i as f64).cos()).collect();
        let bias: Vec<f64> = (0..cols).map(|i| i as f64 * 0.01).collect();
        let loss = |b: &[f64]| {
            let mut y = vec![0.0; rows * cols];
            bias_add_forward(&mut y, b);
            y.iter().zip(&dy).map(|(a, g)| a * g).sum::<f64>()
        };
        let mut db = vec![0.0; cols];
        bias_add_backward(&dy, &mut db);
        check(loss, &bias, &db, 1e-6, 1e-8).unwrap();
    }

    #[test]
    fn concat_split_round_trip_and_gather_scatter_are_adjoint() {
        let (a, b) = (vec![1.0f64, 2.0, 3.0, 4.0], vec![5.0, 6.0]);
        let mut m = vec![0.0; 6];
        concat_columns(&[(&a, 2), (&b, 1)], 2, &mut m);
        assert_eq!(m, [1.0, 2.0, 5.0, 3.0, 4.0, 6.0]);
        let (mut a2, mut b2) = (vec![0.0; 4], vec![0.0; 2]);
        split_columns(&m, 2, &mut [(&mut a2, 2), (&mut b2, 1)]);
        assert_eq!((a2, b2), (a, b));
        // <gather(t), g> = <t, scatter(g)> for any t, g: the backward is the adjoint.
        let table = values(3 * 4, 0.0);
        let codes = [2, 0, 2, 1, 2];
        let g = values(5 * 4, 1.0);
        let mut gathered = vec![0.0; 20];
        gather_rows(&table, &codes, 4, &mut gathered);
        let mut tg = vec![0.0; 12];
        scatter_add_rows(&g, &codes, 4, &mut tg);
        let lhs: f64 = gathered.iter().zip(&g).map(|(a, b)| a * b).sum();
        let rhs: f64 = table.iter().zip(&tg).map(|(a, b)| a * b).sum();
        assert!((lhs - rhs).abs() < 1e-12);
    }

    fn values(n: usize, seed: f64) -> Vec<f64> {
        crate::gradcheck::wave(n, seed)
    }

    #[test]
    fn scale_rows_scales_each_row() {
        let mut y = [0.0f64; 6];
        scale_rows(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[2.0, -1.0], &mut y);
        assert_eq!(y, [2.0, 4.0, 6.0, -4.0, -5.0, -6.0]);
        axpy(0.5, &[2.0, 4.0, 6.0, 8.0, 10.0, 12.0], &mut y);
        assert_eq!(y, [3.0, 6.0, 9.0, 0.0, 0.0, 0.0]);
    }

    #[test]
    fn f32_matches_f64_reference() {
        let x = inputs(1025);
        let x32: Vec<f32> = x.iter().map(|&v| v as f32).collect();
        for act in ALL {
            let (mut y, mut y32) = (vec![0.0; 1025], vec![0.0f32; 1025]);
            act.forward(&x, &mut y);
            act.forward(&x32, &mut y32);
            for (a, b) in y.iter().zip(&y32) {
                assert!(
                    (a - f64::from(*b)).abs() <= 1e-6 + 1e-6 * a.abs(),
                    "{act:?}: {a} vs {b}"
                );
            }
        }
    }
}
