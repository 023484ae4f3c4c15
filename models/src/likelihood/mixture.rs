//! totalVI's protein model: a mixture of a background NB (log rate per batch and protein, a
//! learned table the worker starts from the data) and a foreground NB at background ×
//! exp(softplus(s)) ≥ background (s: the main head's output), mixed by a logit head π, one θ
//! per protein. Not library-scaled.

use tessera_kernels::Real;
use tessera_kernels::backend::{Backend, In, Out, Result, Tensor};
use tessera_kernels::ops::elementwise::Activation;
use tessera_kernels::params::Layout;

use super::{Rows, Site, dense_counts, head, main_backward, per_batch_gradient, per_batch_rows};
use crate::layers::{Buf, Dense, DenseActs, InputGrad, Slots, Weights};
use crate::modality::{ModalitySpec, Shape};

#[derive(Debug, Clone)]
pub(crate) struct Mixture {
    /// The background-component logits π.
    mixing: Dense,
    /// The log background rate (batches × features).
    pub background: usize,
    /// log θ per protein.
    log_theta: usize,
}

/// The forward values the backward needs.
pub(crate) struct Acts<S> {
    mixing: DenseActs<S>,
    log_back: Tensor<S>,
    /// softplus(s): log foreground / background.
    log_scale: Tensor<S>,
    log_fore: Tensor<S>,
    back: Tensor<S>,
    fore: Tensor<S>,
    /// θ per protein (1 × features).
    theta: Tensor<S>,
    /// Gradients of −Σ w log p w.r.t. μ_back, μ_fore, θ (per entry) and the mixing logit.
    grads: [Tensor<S>; 4],
}

/// The cycle pass' values: the mixing head and softplus(s), softplus(π).
pub(crate) struct CycleActs<S> {
    mixing: DenseActs<S>,
    softplus: (Tensor<S>, Tensor<S>),
}

/// log σ(−π) μ_fore, and the values it came from.
pub(crate) struct Foreground<S> {
    pub log: Tensor<S>,
    pub acts: CycleActs<S>,
}

impl Mixture {
    pub fn register(
        prefix: &str,
        spec: &ModalitySpec,
        s: &Shape,
        layout: &mut Layout,
        state: &mut Layout,
        site: u64,
    ) -> Mixture {
        let g = spec.n_features;
        let mixing = Dense::register(
            head(s.n_hidden, g),
            &format!("{prefix}decoder.mixing"),
            layout,
            state,
            site,
        );
        let background = layout.add(&format!("{prefix}log_background"), &[s.n_batch.max(1), g]);
        let log_theta = layout.add(&format!("{prefix}log_theta"), &[g]);
        Mixture {
            mixing,
            background,
            log_theta,
        }
    }

    pub fn init<T: Real>(
        &self,
        layout: &Layout,
        state: &Layout,
        values: &mut [T],
        state_values: &mut [T],
        rng: &mut impl rand::Rng,
    ) {
        self.mixing.init(layout, state, values, state_values, rng);
    }

    /// The background log rate of each cell's batch: onehot × log_background.
    fn log_background<T: Real, B: Backend<T>>(
        &self,
        b: &B,
        p: &Weights<'_, Buf<T, B>>,
        onehot: &Tensor<Buf<T, B>>,
    ) -> Result<Tensor<Buf<T, B>>> {
        per_batch_rows(b, onehot, p.get(self.background), self.mixing.d_out)
    }

    /// log p(x_r) per row into `ll` and the values its backward needs, gradients weighted by
    /// −w_r per row.
    pub fn forward<T: Real, B: Backend<T>>(
        &self,
        site: &Site<'_, T, B>,
        state: &mut Slots<'_, Buf<T, B>>,
        main: &DenseActs<Buf<T, B>>,
        rows: &Rows<'_, T, B>,
        ll: &mut Buf<T, B>,
    ) -> Result<Acts<Buf<T, B>>> {
        let (b, p) = (site.b, site.p);
        let x = dense_counts(b, rows, false)?;
        let s = main.output();
        let (n, g) = (s.rows, s.cols);
        let onehot = rows.onehot.expect("the mixture reads the batch one-hot");
        let log_back = self.log_background(b, p, onehot)?;
        let mut log_scale = b.output_tensor(n, g)?;
        b.activation_forward(Activation::Softplus, s.input(), log_scale.output())?;
        let mut log_fore = b.output_tensor(n, g)?;
        b.copy(log_back.input(), log_fore.output())?;
        b.axpy(T::one(), log_scale.input(), log_fore.output())?;
        let (mut back, mut fore) = (b.output_tensor(n, g)?, b.output_tensor(n, g)?);
        b.activation_forward(Activation::Exp, log_back.input(), back.output())?;
        b.activation_forward(Activation::Exp, log_fore.input(), fore.output())?;
        let mut theta = b.output_tensor(1, g)?;
        b.activation_forward(Activation::Exp, p.get(self.log_theta), theta.output())?;
        // θ in every row: added to zeros (exact), with no row codes from the host.
        let mut theta_cells = b.tensor(n, g)?;
        b.bias_add(theta_cells.output(), theta.input())?;
        let mixing = self.mixing.forward(b, p, state, site.h, None, site.mode)?;
        let mut raw: Vec<Tensor<Buf<T, B>>> = (0..4)
            .map(|_| b.output_tensor(n, g))
            .collect::<Result<_>>()?;
        {
            let [a, c, d, e] = &mut raw[..] else {
                unreachable!("four gradients")
            };
            b.nb_mixture(
                x.input(),
                back.input(),
                fore.input(),
                theta_cells.input(),
                mixing.output().input(),
                g,
                Out::all(ll),
                [a.output(), c.output(), d.output(), e.output()],
            )?;
        }
        // The op's gradients are of the unweighted log-likelihood: weight each row by −w.
        let weighted: Vec<Tensor<Buf<T, B>>> = raw
            .into_iter()
            .map(|t| {
                let mut out = b.output_tensor(n, g)?;
                b.scale_rows(t.input(), In::all(rows.negative), out.output())?;
                Ok(out)
            })
            .collect::<Result<_>>()?;
        let Ok(grads) = <[Tensor<Buf<T, B>>; 4]>::try_from(weighted) else {
            unreachable!("four gradients")
        };
        Ok(Acts {
            mixing,
            log_back,
            log_scale,
            log_fore,
            back,
            fore,
            theta,
            grads,
        })
    }

    /// The backward to the heads' input and the mixture's parameters; dL/dh written to `dh`.
    pub fn backward<T: Real, B: Backend<T>>(
        &self,
        site: &Site<'_, T, B>,
        grads: &mut Slots<'_, Buf<T, B>>,
        main: &DenseActs<Buf<T, B>>,
        m: Acts<Buf<T, B>>,
        onehot: Option<&Tensor<Buf<T, B>>>,
        dh: &mut Tensor<Buf<T, B>>,
    ) -> Result<()> {
        let (b, p) = (site.b, site.p);
        let onehot = onehot.expect("the mixture reads the batch one-hot");
        let (n, g) = (onehot.rows, self.mixing.d_out);
        let Acts {
            mixing,
            log_back,
            log_scale,
            log_fore,
            back,
            fore,
            theta,
            grads: [d_back, d_fore, d_theta, d_pi],
        } = m;
        let mut dlog_fore = b.output_tensor(n, g)?;
        b.activation_backward(
            Activation::Exp,
            log_fore.input(),
            fore.input(),
            d_fore.input(),
            dlog_fore.output(),
        )?;
        main_through_softplus(site, grads, main, &log_scale, &dlog_fore, dh)?;
        let mut dlog_back = b.output_tensor(n, g)?;
        b.activation_backward(
            Activation::Exp,
            log_back.input(),
            back.input(),
            d_back.input(),
            dlog_back.output(),
        )?;
        b.axpy(T::one(), dlog_fore.input(), dlog_back.output())?;
        per_batch_gradient(b, onehot, &dlog_back, grads.get(self.background))?;
        let mut dtheta = b.output_tensor(1, g)?;
        b.column_sums(d_theta.input(), dtheta.output())?;
        b.activation_backward(
            Activation::Exp,
            p.get(self.log_theta),
            theta.input(),
            dtheta.input(),
            grads.get(self.log_theta),
        )?;
        self.mixing.backward(
            b,
            p,
            grads,
            site.h,
            None,
            &mixing,
            d_pi,
            site.mode,
            InputGrad::Add(dh),
        )
    }

    /// log of the expected foreground σ(−π) μ_fore = log_back + softplus(s) − softplus(π),
    /// with the softplus terms the cycle backward needs.
    fn log_foreground<T: Real, B: Backend<T>>(
        &self,
        site: &Site<'_, T, B>,
        state: &mut Slots<'_, Buf<T, B>>,
        main: &DenseActs<Buf<T, B>>,
        onehot: &Tensor<Buf<T, B>>,
    ) -> Result<Foreground<Buf<T, B>>> {
        let b = site.b;
        let (n, g) = (onehot.rows, self.mixing.d_out);
        let mut lx = self.log_background(b, site.p, onehot)?;
        let (mut sp_s, mut sp_pi) = (b.output_tensor(n, g)?, b.output_tensor(n, g)?);
        b.activation_forward(Activation::Softplus, main.output().input(), sp_s.output())?;
        b.axpy(T::one(), sp_s.input(), lx.output())?;
        let pi = self
            .mixing
            .forward(b, site.p, state, site.h, None, site.mode)?;
        b.activation_forward(Activation::Softplus, pi.output().input(), sp_pi.output())?;
        b.axpy(T::zero() - T::one(), sp_pi.input(), lx.output())?;
        Ok(Foreground {
            log: lx,
            acts: CycleActs {
                mixing: pi,
                softplus: (sp_s, sp_pi),
            },
        })
    }

    /// The expected foreground counts σ(−π) μ_fore (totalVI's protein expression without
    /// background).
    pub fn expression<T: Real, B: Backend<T>>(
        &self,
        site: &Site<'_, T, B>,
        state: &mut Slots<'_, Buf<T, B>>,
        main: &DenseActs<Buf<T, B>>,
        onehot: &Tensor<Buf<T, B>>,
    ) -> Result<Tensor<Buf<T, B>>> {
        let b = site.b;
        let log_fore = self.log_foreground(site, state, main, onehot)?.log;
        let mut expression = b.output_tensor(log_fore.rows, log_fore.cols)?;
        b.activation_forward(Activation::Exp, log_fore.input(), expression.output())?;
        Ok(expression)
    }

    /// The cycle pass: log x̂ and what its backward needs.
    pub fn cycle_forward<T: Real, B: Backend<T>>(
        &self,
        site: &Site<'_, T, B>,
        state: &mut Slots<'_, Buf<T, B>>,
        main: &DenseActs<Buf<T, B>>,
        onehot: &Tensor<Buf<T, B>>,
    ) -> Result<Foreground<Buf<T, B>>> {
        self.log_foreground(site, state, main, onehot)
    }

    /// The cycle backward from d/d log x̂: the main head (written into `dh`), the mixing head
    /// (added), the background table.
    #[allow(clippy::too_many_arguments)] // the pass's inputs, saved activations and the views it writes
    pub fn cycle_backward<T: Real, B: Backend<T>>(
        &self,
        site: &Site<'_, T, B>,
        grads: &mut Slots<'_, Buf<T, B>>,
        main: &DenseActs<Buf<T, B>>,
        a: CycleActs<Buf<T, B>>,
        onehot: &Tensor<Buf<T, B>>,
        dexpected: Tensor<Buf<T, B>>,
        dh: &mut Tensor<Buf<T, B>>,
    ) -> Result<()> {
        let b = site.b;
        let (n, g) = (dexpected.rows, dexpected.cols);
        let (sp_s, sp_pi) = &a.softplus;
        main_through_softplus(site, grads, main, sp_s, &dexpected, dh)?;
        let mut dpi = b.output_tensor(n, g)?;
        b.activation_backward(
            Activation::Softplus,
            a.mixing.output().input(),
            sp_pi.input(),
            dexpected.input(),
            dpi.output(),
        )?;
        b.scale(dpi.output(), T::zero() - T::one())?;
        self.mixing.backward(
            b,
            site.p,
            grads,
            site.h,
            None,
            &a.mixing,
            dpi,
            site.mode,
            InputGrad::Add(dh),
        )?;
        per_batch_gradient(b, onehot, &dexpected, grads.get(self.background))
    }
}

/// The main head's backward through its log scale softplus(s): `d` is the gradient w.r.t.
/// softplus(s), dL/dh is written into `dh`.
fn main_through_softplus<T: Real, B: Backend<T>>(
    site: &Site<'_, T, B>,
    grads: &mut Slots<'_, Buf<T, B>>,
    main: &DenseActs<Buf<T, B>>,
    softplus: &Tensor<Buf<T, B>>,
    d: &Tensor<Buf<T, B>>,
    dh: &mut Tensor<Buf<T, B>>,
) -> Result<()> {
    let b = site.b;
    let mut ds = b.output_tensor(d.rows, d.cols)?;
    b.activation_backward(
        Activation::Softplus,
        main.output().input(),
        softplus.input(),
        d.input(),
        ds.output(),
    )?;
    main_backward(site, grads, main, ds, dh)
}
