//! A decoder's observation models, one module each: what the likelihood registers (its heads
//! besides the main one, its shared parameters), its forward (the fused value+gradient op of
//! `kernels::ops::likelihood`), its backward to the decoder's hidden layer, its expected
//! expression (denoising, imputation) and its side of the cycle-consistency pass.
//! [`Observation`] is the one place that dispatches on the kind.
//!
//! Adding a likelihood: a `LikelihoodKind` variant, a module here with those five parts, its arm
//! in each `Observation` method, its kernel family in `kernels::ops::likelihood`, and its
//! gradient check in `models/tests/vae_gradients.rs`.

mod bernoulli;
mod counts;
mod gaussian;
mod mixture;

use serde::{Deserialize, Serialize};
use tessera_kernels::Real;
use tessera_kernels::backend::{Backend, In, Out, Result, Tensor};
use tessera_kernels::ops::elementwise::Activation;
use tessera_kernels::ops::linear::CsrRef;
use tessera_kernels::params::Layout;

use crate::layers::{Buf, Dense, DenseActs, DenseSpec, Input, Mode, Slots, Weights};
use crate::modality::{ModalitySpec, Shape};

pub use counts::Dispersion;

/// The observation model of a modality.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LikelihoodKind {
    /// Negative binomial, mean = library × softmax(decoder).
    Nb,
    /// Zero-inflated NB (adds a dropout-logit head).
    Zinb,
    /// Poisson, mean = library × softmax(decoder).
    Poisson,
    /// Gaussian: mean from the decoder, one log-variance per feature.
    Gaussian,
    /// Bernoulli: logits from the decoder; counts are binarised (x > 0), as MultiVI does for
    /// accessibility.
    Bernoulli,
    /// totalVI's protein model: a mixture of a background NB (rate per batch and protein, a
    /// learned parameter) and a foreground NB at background × exp(softplus(decoder)) ≥
    /// background, mixed by a decoder logit, one θ per protein. Not library-scaled.
    #[serde(rename = "nb-mixture")]
    NbMixture,
}

impl LikelihoodKind {
    /// Whether the likelihood models raw counts (the NB family and Poisson): values that are
    /// negative or not integers are then a mistake worth a warning.
    pub fn expects_counts(self) -> bool {
        matches!(
            self,
            LikelihoodKind::Nb
                | LikelihoodKind::Zinb
                | LikelihoodKind::Poisson
                | LikelihoodKind::NbMixture
        )
    }
}

/// A head on the decoder's hidden layer (no covariates, no normalisation, identity).
pub(crate) fn head(d_in: usize, d_out: usize) -> DenseSpec {
    DenseSpec {
        d_in,
        d_out,
        n_cov: 0,
        batch_norm: false,
        layer_norm: false,
        act: Activation::Identity,
        dropout: 0.0,
    }
}

/// What every likelihood's pass reads from its decoder: the backend, the weights, the hidden
/// layer's output (every head's input), the main head (μ-proportions, means, logits or the
/// mixture's foreground scale) and the mode.
pub(crate) struct Site<'a, T: Real, B: Backend<T>> {
    pub b: &'a B,
    pub p: &'a Weights<'a, Buf<T, B>>,
    pub h: &'a Input<'a, Buf<T, B>, B::Csr>,
    pub main: &'a Dense,
    pub mode: Mode,
}

/// One forward's view of the decoded rows: their counts, the batch one-hot where the
/// likelihood reads one (rows of per-batch tables), and −w per row (the cells' weights, negated:
/// the ops write gradients of the log-likelihood, the loss is its negative).
pub(crate) struct Rows<'a, T: Real, B: Backend<T>> {
    pub counts: CsrRef<'a, T>,
    /// The same rows as the encoder uploaded them, when it read exactly these rows.
    pub uploaded: Option<&'a B::Csr>,
    pub onehot: Option<&'a Tensor<Buf<T, B>>>,
    pub negative: &'a Buf<T, B>,
}

/// The observation model of one decoder.
#[derive(Debug, Clone)]
pub(crate) enum Observation {
    /// NB, ZINB, Poisson: library-scaled counts.
    Counts(counts::Counts),
    Gaussian(gaussian::Gaussian),
    Bernoulli(bernoulli::Bernoulli),
    Mixture(mixture::Mixture),
}

/// What an observation model's backward needs from its forward.
pub(crate) enum ObservationActs<S> {
    Counts(counts::Acts<S>),
    Gaussian(gaussian::Acts<S>),
    Bernoulli(bernoulli::Acts<S>),
    Mixture(mixture::Acts<S>),
}

/// The cycle pass' expected expression x̂ (the mixture: log x̂), log(1 + x̂), and what the
/// observation model's cycle backward needs.
pub(crate) struct Expected<S> {
    pub expected: Tensor<S>,
    pub log1p: Tensor<S>,
    kept: CycleObservation<S>,
}

/// What an observation model's cycle backward needs from its cycle forward.
pub(crate) enum CycleObservation<S> {
    /// The proportions ρ = softmax(s) and the library the expression was scaled to.
    Counts {
        softmax: Tensor<S>,
        library: f64,
    },
    Bernoulli,
    Mixture(mixture::CycleActs<S>),
}

impl Observation {
    /// Registers `{prefix}decoder.*` heads and the shared parameters of `spec`'s likelihood
    /// (after the decoder's main head).
    pub fn register(
        prefix: &str,
        spec: &ModalitySpec,
        s: &Shape,
        layout: &mut Layout,
        state: &mut Layout,
        site: u64,
    ) -> Observation {
        match spec.likelihood {
            LikelihoodKind::Nb | LikelihoodKind::Zinb | LikelihoodKind::Poisson => {
                Observation::Counts(counts::Counts::register(
                    prefix, spec, s, layout, state, site,
                ))
            }
            LikelihoodKind::Gaussian => {
                Observation::Gaussian(gaussian::Gaussian::register(prefix, spec, layout))
            }
            LikelihoodKind::Bernoulli => Observation::Bernoulli(bernoulli::Bernoulli),
            LikelihoodKind::NbMixture => Observation::Mixture(mixture::Mixture::register(
                prefix, spec, s, layout, state, site,
            )),
        }
    }

    /// The likelihood's own heads (its shared parameters start at 0: θ = 1, σ² = 1).
    pub fn init<T: Real>(
        &self,
        layout: &Layout,
        state: &Layout,
        values: &mut [T],
        state_values: &mut [T],
        rng: &mut impl rand::Rng,
    ) {
        match self {
            Observation::Counts(c) => c.init(layout, state, values, state_values, rng),
            Observation::Mixture(m) => m.init(layout, state, values, state_values, rng),
            Observation::Gaussian(_) | Observation::Bernoulli(_) => {}
        }
    }

    /// Whether the likelihood reads the batch one-hot (a per-batch table).
    pub fn reads_onehot(&self) -> bool {
        match self {
            Observation::Counts(c) => c.reads_onehot(),
            Observation::Mixture(_) => true,
            Observation::Gaussian(_) | Observation::Bernoulli(_) => false,
        }
    }

    /// The NB mixture's log background table, if this is one.
    pub fn background_slot(&self) -> Option<usize> {
        match self {
            Observation::Mixture(m) => Some(m.background),
            _ => None,
        }
    }

    /// Whether the cycle pass can re-encode the expected expression (a Gaussian's mean has no
    /// log1p).
    pub fn cycles(&self) -> bool {
        !matches!(self, Observation::Gaussian(_))
    }

    /// log p(x_r | ·) per row into `ll`, and the gradients the backward needs (weighted by
    /// `rows.negative`). `main` is the main head's forward.
    pub fn forward<T: Real, B: Backend<T>>(
        &self,
        site: &Site<'_, T, B>,
        state: &mut Slots<'_, Buf<T, B>>,
        main: &DenseActs<Buf<T, B>>,
        rows: &Rows<'_, T, B>,
        ll: &mut Buf<T, B>,
    ) -> Result<ObservationActs<Buf<T, B>>> {
        Ok(match self {
            Observation::Counts(c) => {
                ObservationActs::Counts(c.forward(site, state, main, rows, ll)?)
            }
            Observation::Gaussian(g) => ObservationActs::Gaussian(g.forward(site, main, rows, ll)?),
            Observation::Bernoulli(k) => {
                ObservationActs::Bernoulli(k.forward(site, main, rows, ll)?)
            }
            Observation::Mixture(m) => {
                ObservationActs::Mixture(m.forward(site, state, main, rows, ll)?)
            }
        })
    }

    /// Writes the likelihood's parameter gradients and dL/dh into `dh` (overwritten).
    pub fn backward<T: Real, B: Backend<T>>(
        &self,
        site: &Site<'_, T, B>,
        grads: &mut Slots<'_, Buf<T, B>>,
        main: &DenseActs<Buf<T, B>>,
        acts: ObservationActs<Buf<T, B>>,
        onehot: Option<&Tensor<Buf<T, B>>>,
        dh: &mut Tensor<Buf<T, B>>,
    ) -> Result<()> {
        match (self, acts) {
            (Observation::Counts(c), ObservationActs::Counts(a)) => {
                c.backward(site, grads, main, a, onehot, dh)
            }
            (Observation::Gaussian(g), ObservationActs::Gaussian(a)) => {
                g.backward(site, grads, main, a, dh)
            }
            (Observation::Bernoulli(k), ObservationActs::Bernoulli(a)) => {
                k.backward(site, grads, main, a, dh)
            }
            (Observation::Mixture(m), ObservationActs::Mixture(a)) => {
                m.backward(site, grads, main, a, onehot, dh)
            }
            _ => unreachable!("a decoder's activations come from its own forward"),
        }
    }

    /// The expression at the main head's output (evaluation mode): NB/ZINB/Poisson proportions
    /// × `library_size` (scvi-tools' `get_normalized_expression`), Gaussian means, Bernoulli
    /// probabilities, the NB mixture's expected foreground counts σ(−π) μ_fore (totalVI's
    /// protein expression without background).
    pub fn expression<T: Real, B: Backend<T>>(
        &self,
        site: &Site<'_, T, B>,
        state: &mut Slots<'_, Buf<T, B>>,
        main: &DenseActs<Buf<T, B>>,
        onehot: Option<&Tensor<Buf<T, B>>>,
        library_size: f64,
    ) -> Result<Tensor<Buf<T, B>>> {
        let b = site.b;
        let (n, g) = (main.output().rows, main.output().cols);
        let mut expression = b.tensor(n, g)?;
        let s = main.output().input();
        match self {
            Observation::Counts(_) => {
                b.softmax_forward(s, g, expression.output())?;
                b.scale(expression.output(), T::of(library_size))?;
            }
            Observation::Bernoulli(_) => {
                b.activation_forward(Activation::Sigmoid, s, expression.output())?
            }
            Observation::Gaussian(_) => {
                b.activation_forward(Activation::Identity, s, expression.output())?
            }
            Observation::Mixture(m) => {
                let onehot = onehot.expect("the mixture reads the batch one-hot");
                return m.expression(site, state, main, onehot);
            }
        }
        Ok(expression)
    }

    /// The cycle pass' expected expression x̂ (the mixture: log x̂) and log(1 + x̂), with what
    /// its backward needs: NB/ZINB/Poisson at `library` counts per cell, Bernoulli
    /// probabilities, the NB mixture's expected foreground.
    pub fn cycle_forward<T: Real, B: Backend<T>>(
        &self,
        site: &Site<'_, T, B>,
        state: &mut Slots<'_, Buf<T, B>>,
        main: &DenseActs<Buf<T, B>>,
        onehot: Option<&Tensor<Buf<T, B>>>,
        library: f64,
    ) -> Result<Expected<Buf<T, B>>> {
        let b = site.b;
        let (n, g) = (main.output().rows, main.output().cols);
        let mut expected = b.tensor(n, g)?;
        let mut log1p = b.tensor(n, g)?;
        let kept = match self {
            Observation::Mixture(m) => {
                let onehot = onehot.expect("the mixture reads the batch one-hot");
                let foreground = m.cycle_forward(site, state, main, onehot)?;
                b.activation_forward(Activation::Softplus, foreground.log.input(), log1p.output())?;
                expected = foreground.log;
                CycleObservation::Mixture(foreground.acts)
            }
            Observation::Bernoulli(_) => {
                b.activation_forward(
                    Activation::Sigmoid,
                    main.output().input(),
                    expected.output(),
                )?;
                b.activation_forward(Activation::Log1p, expected.input(), log1p.output())?;
                CycleObservation::Bernoulli
            }
            Observation::Counts(_) => {
                let mut rho = b.tensor(n, g)?;
                b.softmax_forward(main.output().input(), g, rho.output())?;
                b.scale_rows(
                    rho.input(),
                    In::all(&b.upload_weights(&vec![T::of(library); n])?),
                    expected.output(),
                )?;
                b.activation_forward(Activation::Log1p, expected.input(), log1p.output())?;
                CycleObservation::Counts {
                    softmax: rho,
                    library,
                }
            }
            Observation::Gaussian(_) => unreachable!("a Gaussian decoder does not cycle"),
        };
        Ok(Expected {
            expected,
            log1p,
            kept,
        })
    }

    /// The cycle pass' backward from d/d log(1 + x̂) to the heads: parameter gradients, and
    /// dL/dh written into `dh`.
    #[allow(clippy::too_many_arguments)] // the pass's inputs, saved activations and the views it writes
    pub fn cycle_backward<T: Real, B: Backend<T>>(
        &self,
        site: &Site<'_, T, B>,
        grads: &mut Slots<'_, Buf<T, B>>,
        main: &DenseActs<Buf<T, B>>,
        onehot: Option<&Tensor<Buf<T, B>>>,
        e: Expected<Buf<T, B>>,
        dlog1p: Tensor<Buf<T, B>>,
        dh: &mut Tensor<Buf<T, B>>,
    ) -> Result<()> {
        let b = site.b;
        let Expected {
            expected,
            log1p,
            kept,
        } = e;
        let (n, g) = (expected.rows, expected.cols);
        // The gradient w.r.t. x̂ (for the mixture: w.r.t. log x̂).
        let mut dexpected = b.tensor(n, g)?;
        let inner = if matches!(self, Observation::Mixture(_)) {
            Activation::Softplus
        } else {
            Activation::Log1p
        };
        b.activation_backward(
            inner,
            expected.input(),
            log1p.input(),
            dlog1p.input(),
            dexpected.output(),
        )?;
        match (self, kept) {
            (Observation::Mixture(m), CycleObservation::Mixture(acts)) => {
                let onehot = onehot.expect("the mixture reads the batch one-hot");
                m.cycle_backward(site, grads, main, acts, onehot, dexpected, dh)
            }
            (Observation::Bernoulli(_), CycleObservation::Bernoulli) => {
                let mut ds = b.tensor(n, g)?;
                b.activation_backward(
                    Activation::Sigmoid,
                    main.output().input(),
                    expected.input(),
                    dexpected.input(),
                    ds.output(),
                )?;
                main_backward(site, grads, main, ds, dh)
            }
            (Observation::Counts(_), CycleObservation::Counts { softmax, library }) => {
                b.scale(dexpected.output(), T::of(library))?;
                let mut ds = b.tensor(n, g)?;
                b.softmax_backward(softmax.input(), dexpected.input(), g, ds.output())?;
                main_backward(site, grads, main, ds, dh)
            }
            _ => unreachable!("a decoder's cycle activations come from its own cycle forward"),
        }
    }
}

/// The main head's backward from `ds`, writing dL/dh.
pub(crate) fn main_backward<T: Real, B: Backend<T>>(
    site: &Site<'_, T, B>,
    grads: &mut Slots<'_, Buf<T, B>>,
    main: &DenseActs<Buf<T, B>>,
    ds: Tensor<Buf<T, B>>,
    dh: &mut Tensor<Buf<T, B>>,
) -> Result<()> {
    site.main.backward(
        site.b,
        site.p,
        grads,
        site.h,
        None,
        main,
        ds,
        site.mode,
        crate::layers::InputGrad::Write(dh),
    )
}

/// The decoded rows' counts as a dense matrix on the device (`binary`: x > 0 as 1): made there
/// from the rows the encoder uploaded where it read exactly these (nothing crosses from the
/// host, so a step captured as a CUDA graph reads each replay's batch), else on the host.
pub(crate) fn dense_counts<T: Real, B: Backend<T>>(
    b: &B,
    rows: &Rows<'_, T, B>,
    binary: bool,
) -> Result<Tensor<Buf<T, B>>> {
    let counts = rows.counts;
    let n = counts.rows * counts.cols;
    let buf = match rows.uploaded {
        Some(on_device) => {
            let mut dense = b.output_buf(n)?;
            b.csr_dense(on_device, binary, Out::all(&mut dense))?;
            dense
        }
        None => {
            let mut host = vec![T::zero(); n];
            tessera_kernels::ops::linear::csr_dense(counts, binary, &mut host);
            b.upload_vec(host)?
        }
    };
    Ok(Tensor {
        buf,
        rows: counts.rows,
        cols: counts.cols,
    })
}

/// Each row's entry of a per-batch table (batches × features): onehot × table.
pub(crate) fn per_batch_rows<T: Real, B: Backend<T>>(
    b: &B,
    onehot: &Tensor<Buf<T, B>>,
    table: In<'_, Buf<T, B>>,
    features: usize,
) -> Result<Tensor<Buf<T, B>>> {
    let n = onehot.rows;
    let mut rows = b.tensor(n, features)?;
    b.gemm(
        false,
        false,
        n,
        onehot.cols,
        features,
        T::one(),
        onehot.input(),
        table,
        T::zero(),
        rows.output(),
    )?;
    Ok(rows)
}

/// The gradient of a per-batch table read by [`per_batch_rows`]: onehotᵀ × d (overwritten).
pub(crate) fn per_batch_gradient<T: Real, B: Backend<T>>(
    b: &B,
    onehot: &Tensor<Buf<T, B>>,
    d: &Tensor<Buf<T, B>>,
    table: tessera_kernels::backend::Out<'_, Buf<T, B>>,
) -> Result<()> {
    b.gemm(
        true,
        false,
        onehot.cols,
        onehot.rows,
        d.cols,
        T::one(),
        onehot.input(),
        d.input(),
        T::zero(),
        table,
    )
}
