//! NB, ZINB and Poisson: counts with mean μ = library × softmax(s) of the main head's output s.
//! NB and ZINB take θ from a per-gene or per-gene-and-batch table or a per-cell head
//! (scvi-tools' `dispersion`); ZINB adds a dropout-logit head. scVI's case (NB, per-gene θ)
//! is one fused op over the sparse rows (`Backend::softmax_nb`); the others go through the
//! dense likelihood op.

use serde::{Deserialize, Serialize};
use tessera_kernels::Real;
use tessera_kernels::backend::{Backend, In, Out, Result, Tensor};
use tessera_kernels::ops::elementwise::Activation;
use tessera_kernels::ops::likelihood::Likelihood;
use tessera_kernels::params::Layout;

use super::{
    LikelihoodKind, Rows, Site, dense_counts, head, main_backward, per_batch_gradient,
    per_batch_rows,
};
use crate::layers::{Buf, Dense, DenseActs, InputGrad, Slots};
use crate::modality::{ModalitySpec, Shape};

/// Where the NB inverse dispersion θ comes from (scvi-tools' `dispersion`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Dispersion {
    /// One θ per feature.
    Gene,
    /// One θ per feature and batch (the first covariate block is the batch).
    GeneBatch,
    /// θ per feature and cell, from a decoder head.
    GeneCell,
}

#[derive(Debug, Clone)]
pub(crate) struct Counts {
    kind: LikelihoodKind,
    dispersion: Dispersion,
    /// ZINB dropout logits.
    zero_inflation: Option<Dense>,
    /// GeneCell log θ.
    dispersion_head: Option<Dense>,
    /// Gene (features) or GeneBatch (batches × features) log θ.
    log_theta: Option<usize>,
}

/// What the backward needs from the forward.
pub(crate) struct Acts<S> {
    library: Tensor<S>,
    zero_inflation: Option<DenseActs<S>>,
    dispersion: Option<DenseActs<S>>,
    /// softmax of the main head (absent in the fused NB term, which gives the logits' gradient).
    proportions: Option<Tensor<S>>,
    /// Gene-batch log θ per cell (the other dispersions read it from where it lives).
    log_theta_cells: Option<Tensor<S>>,
    /// θ: per feature (1 × G) or per cell (n × G); None for Poisson.
    theta: Option<Tensor<S>>,
    /// Per-entry gradients of the weighted log-likelihood: μ (the fused term: the logits), θ,
    /// the dropout logits.
    dparams: Vec<Option<Tensor<S>>>,
}

impl Counts {
    pub fn register(
        prefix: &str,
        spec: &ModalitySpec,
        s: &Shape,
        layout: &mut Layout,
        state: &mut Layout,
        site: u64,
    ) -> Counts {
        let g = spec.n_features;
        let has_dispersion = matches!(spec.likelihood, LikelihoodKind::Nb | LikelihoodKind::Zinb);
        let zero_inflation = (spec.likelihood == LikelihoodKind::Zinb).then(|| {
            Dense::register(
                head(s.n_hidden, g),
                &format!("{prefix}decoder.zero_inflation"),
                layout,
                state,
                site,
            )
        });
        let dispersion_head =
            (has_dispersion && spec.dispersion == Dispersion::GeneCell).then(|| {
                Dense::register(
                    head(s.n_hidden, g),
                    &format!("{prefix}decoder.log_theta"),
                    layout,
                    state,
                    site,
                )
            });
        let log_theta = match (has_dispersion, spec.dispersion) {
            (true, Dispersion::Gene) => Some(layout.add(&format!("{prefix}log_theta"), &[g])),
            (true, Dispersion::GeneBatch) => {
                Some(layout.add(&format!("{prefix}log_theta"), &[s.n_batch.max(1), g]))
            }
            _ => None,
        };
        Counts {
            kind: spec.likelihood,
            dispersion: spec.dispersion,
            zero_inflation,
            dispersion_head,
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
        for d in [self.zero_inflation.as_ref(), self.dispersion_head.as_ref()]
            .into_iter()
            .flatten()
        {
            d.init(layout, state, values, state_values, rng);
        }
    }

    fn has_dispersion(&self) -> bool {
        self.kind != LikelihoodKind::Poisson
    }

    pub fn reads_onehot(&self) -> bool {
        self.has_dispersion() && self.dispersion == Dispersion::GeneBatch
    }

    fn log_theta_slot(&self) -> usize {
        self.log_theta
            .expect("a per-gene or per-batch θ has its table")
    }

    /// Where log θ lives: the parameter (gene), the batch one-hot times the table (gene-batch,
    /// computed per batch), or the dispersion head's output (gene-cell).
    fn log_theta<'a, T: Real, B: Backend<T>>(
        &self,
        site: &Site<'a, T, B>,
        per_cell: Option<&'a Tensor<Buf<T, B>>>,
        head: Option<&'a DenseActs<Buf<T, B>>>,
    ) -> In<'a, Buf<T, B>> {
        match self.dispersion {
            Dispersion::Gene => site.p.get(self.log_theta_slot()),
            Dispersion::GeneBatch => per_cell
                .expect("gene-batch log θ is computed per batch")
                .input(),
            Dispersion::GeneCell => head
                .expect("gene-cell dispersion has a head")
                .output()
                .input(),
        }
    }

    pub fn forward<T: Real, B: Backend<T>>(
        &self,
        site: &Site<'_, T, B>,
        state: &mut Slots<'_, Buf<T, B>>,
        main: &DenseActs<Buf<T, B>>,
        rows: &Rows<'_, T, B>,
        ll: &mut Buf<T, B>,
    ) -> Result<Acts<Buf<T, B>>> {
        let (b, p, mode) = (site.b, site.p, site.mode);
        let counts = rows.counts;
        let (n, g) = (counts.rows, counts.cols);
        // Library sizes on the host, from the sparse rows.
        let library: Vec<T> = (0..n)
            .map(|r| {
                counts.data[counts.indptr[r] as usize..counts.indptr[r + 1] as usize]
                    .iter()
                    .fold(T::zero(), |sum, &v| sum + v)
            })
            .collect();
        let library = Tensor {
            buf: b.upload_vec(library)?,
            rows: n,
            cols: 1,
        };
        let fused = self.kind == LikelihoodKind::Nb && self.dispersion == Dispersion::Gene;
        let x = if fused {
            None
        } else {
            Some(dense_counts(b, counts, false)?)
        };
        let zero_inflation = self
            .zero_inflation
            .as_ref()
            .map(|d| d.forward(b, p, state, site.h, None, mode))
            .transpose()?;
        let dispersion = self
            .dispersion_head
            .as_ref()
            .map(|d| d.forward(b, p, state, site.h, None, mode))
            .transpose()?;
        if fused {
            let mut theta = b.tensor(1, g)?;
            b.activation_forward(
                Activation::Exp,
                p.get(self.log_theta_slot()),
                theta.output(),
            )?;
            let (mut dlogits, mut dtheta) = (b.tensor(n, g)?, b.tensor(1, g)?);
            b.softmax_nb(
                main.output().input(),
                library.input(),
                counts,
                theta.input(),
                In::all(rows.negative),
                Out::all(ll),
                dlogits.output(),
                dtheta.output(),
            )?;
            return Ok(Acts {
                library,
                zero_inflation,
                dispersion,
                proportions: None,
                log_theta_cells: None,
                theta: Some(theta),
                dparams: vec![Some(dlogits), Some(dtheta)],
            });
        }
        let x = x.expect("dense counts for every unfused likelihood");
        let mut rho = b.tensor(n, g)?;
        b.softmax_forward(main.output().input(), g, rho.output())?;
        let mut mu = b.tensor(n, g)?;
        b.scale_rows(rho.input(), library.input(), mu.output())?;
        let log_theta_cells = match rows.onehot.filter(|_| self.reads_onehot()) {
            Some(onehot) => Some(per_batch_rows(b, onehot, p.get(self.log_theta_slot()), g)?),
            None => None,
        };
        let theta = if self.has_dispersion() {
            let rows = if self.dispersion == Dispersion::Gene {
                1
            } else {
                n
            };
            let mut th = b.tensor(rows, g)?;
            b.activation_forward(
                Activation::Exp,
                self.log_theta(site, log_theta_cells.as_ref(), dispersion.as_ref()),
                th.output(),
            )?;
            Some(th)
        } else {
            None
        };
        let family = match self.kind {
            LikelihoodKind::Zinb => Likelihood::ZeroInflatedNegativeBinomial,
            LikelihoodKind::Poisson => Likelihood::Poisson,
            _ => Likelihood::NegativeBinomial,
        };
        let mut dparams: Vec<Tensor<Buf<T, B>>> = (0..family.n_params())
            .map(|_| b.tensor(n, g))
            .collect::<Result<_>>()?;
        {
            let mut params: Vec<In<'_, Buf<T, B>>> = vec![mu.input()];
            if let Some(th) = &theta {
                params.push(th.input());
            }
            if let Some(zi) = &zero_inflation {
                params.push(zi.output().input());
            }
            let mut outs: Vec<Out<'_, Buf<T, B>>> =
                dparams.iter_mut().map(|t| t.output()).collect();
            b.likelihood(
                family,
                x.input(),
                g,
                &params,
                Some(In::all(rows.negative)),
                Out::all(ll),
                &mut outs,
            )?;
        }
        Ok(Acts {
            library,
            zero_inflation,
            dispersion,
            proportions: Some(rho),
            log_theta_cells,
            theta,
            dparams: dparams.into_iter().map(Some).collect(),
        })
    }

    /// The main head through μ = library · softmax(s) (the fused NB term gave the logits'
    /// gradient already), then θ = exp(log θ): dlog θ = θ ⊙ dθ, reduced to where log θ lives,
    /// then the dropout head; dL/dh accumulates in that order.
    pub fn backward<T: Real, B: Backend<T>>(
        &self,
        site: &Site<'_, T, B>,
        grads: &mut Slots<'_, Buf<T, B>>,
        main: &DenseActs<Buf<T, B>>,
        mut f: Acts<Buf<T, B>>,
        onehot: Option<&Tensor<Buf<T, B>>>,
        dh: &mut Tensor<Buf<T, B>>,
    ) -> Result<()> {
        let (b, p, mode) = (site.b, site.p, site.mode);
        let mut take = |k: usize| {
            f.dparams[k]
                .take()
                .expect("one gradient per likelihood parameter, each used once")
        };
        let (dmu, dtheta, dzi) = (take(0), self.has_dispersion().then(|| take(1)), {
            let k = if self.has_dispersion() { 2 } else { 1 };
            self.zero_inflation.as_ref().map(|_| take(k))
        });
        let (n, g) = (dmu.rows, dmu.cols);
        let dmain = if let Some(proportions) = &f.proportions {
            let mut drho = b.tensor(n, g)?;
            b.scale_rows(dmu.input(), f.library.input(), drho.output())?;
            let mut ds = b.tensor(n, g)?;
            b.softmax_backward(proportions.input(), drho.input(), g, ds.output())?;
            ds
        } else {
            dmu
        };
        main_backward(site, grads, main, dmain, dh)?;
        if let (Some(theta), Some(dtheta)) = (&f.theta, dtheta) {
            let log_theta = self.log_theta(site, f.log_theta_cells.as_ref(), f.dispersion.as_ref());
            match self.dispersion {
                Dispersion::Gene => {
                    // Per gene from the fused NB term, per entry from the other likelihoods.
                    let sums = if dtheta.rows == 1 {
                        dtheta
                    } else {
                        let mut sums = b.tensor(1, g)?;
                        b.column_sums(dtheta.input(), sums.output())?;
                        sums
                    };
                    b.activation_backward(
                        Activation::Exp,
                        log_theta,
                        theta.input(),
                        sums.input(),
                        grads.get(self.log_theta_slot()),
                    )?;
                }
                Dispersion::GeneBatch => {
                    let mut dlog = b.tensor(n, g)?;
                    b.activation_backward(
                        Activation::Exp,
                        log_theta,
                        theta.input(),
                        dtheta.input(),
                        dlog.output(),
                    )?;
                    let onehot = onehot.expect("gene-batch dispersion has the batch one-hot");
                    per_batch_gradient(b, onehot, &dlog, grads.get(self.log_theta_slot()))?;
                }
                Dispersion::GeneCell => {
                    let mut dlog = b.tensor(n, g)?;
                    b.activation_backward(
                        Activation::Exp,
                        log_theta,
                        theta.input(),
                        dtheta.input(),
                        dlog.output(),
                    )?;
                    let head = self.dispersion_head.as_ref().expect("gene-cell head");
                    head.backward(
                        b,
                        p,
                        grads,
                        site.h,
                        None,
                        f.dispersion.as_ref().expect("head acts"),
                        dlog,
                        mode,
                        InputGrad::Add(dh),
                    )?;
                }
            }
        }
        if let (Some(head), Some(acts), Some(dzi)) = (&self.zero_inflation, &f.zero_inflation, dzi)
        {
            head.backward(
                b,
                p,
                grads,
                site.h,
                None,
                acts,
                dzi,
                mode,
                InputGrad::Add(dh),
            )?;
        }
        Ok(())
    }
}
