//! NB, ZINB and Poisson: counts with mean μ = library × softmax(s) of the main head's output s.
//! NB and ZINB take θ from a per-gene or per-gene-and-batch table or a per-cell head
//! (scvi-tools' `dispersion`); ZINB adds a dropout-logit head. scVI's case (NB, per-gene θ)
//! is one fused op over the sparse rows (`Backend::softmax_nb`); the others go through the
//! dense likelihood op.

use rand_distr::{Distribution, StandardNormal};
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
use crate::layers::{Buf, Dense, DenseActs, InputGrad, Slots, Weights};
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
    /// ZINB dropout logits.
    zero_inflation: Option<Dense>,
    /// Where log θ lives (None: Poisson).
    theta: Option<Theta>,
}

/// Where log θ lives.
#[derive(Debug, Clone)]
enum Theta {
    /// A table of one log θ per feature.
    Gene(usize),
    /// A table of batches × features, read per cell through the batch one-hot.
    GeneBatch(usize),
    /// A head on the hidden layer: log θ per cell and feature.
    GeneCell(Dense),
}

/// log θ as one forward read it.
enum LogTheta<S> {
    Gene(usize),
    /// The table's slot and each cell's row of it.
    GeneBatch(usize, Tensor<S>),
    GeneCell(DenseActs<S>),
}

impl<S: tessera_kernels::backend::Storage> LogTheta<S> {
    fn input<'a>(&'a self, p: &Weights<'a, S>) -> In<'a, S> {
        match self {
            LogTheta::Gene(slot) => p.get(*slot),
            LogTheta::GeneBatch(_, cells) => cells.input(),
            LogTheta::GeneCell(acts) => acts.output().input(),
        }
    }
}

/// What the backward needs from the forward.
pub(crate) struct Acts<S> {
    library: Tensor<S>,
    zero_inflation: Option<DenseActs<S>>,
    /// softmax of the main head (absent in the fused NB term, which gives the logits' gradient).
    proportions: Option<Tensor<S>>,
    /// θ (per feature 1 × G, or per cell n × G) and where its log came from; None for Poisson.
    theta: Option<(Tensor<S>, LogTheta<S>)>,
    /// Per-entry gradients of the weighted log-likelihood: μ (the fused term: the logits), θ,
    /// the dropout logits.
    dmu: Tensor<S>,
    dtheta: Option<Tensor<S>>,
    dzero_inflation: Option<Tensor<S>>,
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
        let zero_inflation = (spec.likelihood == LikelihoodKind::Zinb).then(|| {
            Dense::register(
                head(s.n_hidden, g),
                &format!("{prefix}decoder.zero_inflation"),
                layout,
                state,
                site,
            )
        });
        let name = format!("{prefix}log_theta");
        let theta = (spec.likelihood != LikelihoodKind::Poisson).then(|| match spec.dispersion {
            Dispersion::GeneCell => Theta::GeneCell(Dense::register(
                head(s.n_hidden, g),
                &format!("{prefix}decoder.log_theta"),
                layout,
                state,
                site,
            )),
            Dispersion::Gene => Theta::Gene(layout.add(&name, &[g])),
            Dispersion::GeneBatch => Theta::GeneBatch(layout.add(&name, &[s.n_batch.max(1), g])),
        });
        Counts {
            kind: spec.likelihood,
            zero_inflation,
            theta,
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
        let head = match &self.theta {
            Some(Theta::GeneCell(head)) => Some(head),
            Some(Theta::Gene(slot) | Theta::GeneBatch(slot)) => {
                // scvi-tools' px_r: log θ ~ N(0, 1).
                for v in &mut values[layout.slots()[*slot].range.clone()] {
                    *v = T::of(StandardNormal.sample(rng));
                }
                None
            }
            None => None,
        };
        for d in [self.zero_inflation.as_ref(), head].into_iter().flatten() {
            d.init(layout, state, values, state_values, rng);
        }
    }

    pub fn reads_onehot(&self) -> bool {
        matches!(self.theta, Some(Theta::GeneBatch(_)))
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
        // Library sizes from the sparse rows: on the device where they are there already (a
        // host pass over a Census-size batch would take ~2 ms of the step), else on the host.
        let library = match rows.uploaded {
            Some(on_device) => {
                let mut library = b.output_tensor(n, 1)?;
                b.csr_row_sums(on_device, library.output())?;
                library
            }
            None => Tensor {
                buf: b.upload_vec(tessera_kernels::ops::linear::row_sums(counts))?,
                rows: n,
                cols: 1,
            },
        };
        let zero_inflation = self
            .zero_inflation
            .as_ref()
            .map(|d| d.forward(b, p, state, site.h, None, mode))
            .transpose()?;
        let log_theta = match &self.theta {
            None => None,
            Some(Theta::Gene(slot)) => Some(LogTheta::Gene(*slot)),
            Some(Theta::GeneBatch(slot)) => {
                let onehot = rows
                    .onehot
                    .expect("gene-batch dispersion reads the batch one-hot");
                let cells = per_batch_rows(b, onehot, p.get(*slot), g)?;
                Some(LogTheta::GeneBatch(*slot, cells))
            }
            Some(Theta::GeneCell(head)) => Some(LogTheta::GeneCell(
                head.forward(b, p, state, site.h, None, mode)?,
            )),
        };
        if let (LikelihoodKind::Nb, Some(LogTheta::Gene(slot))) = (self.kind, &log_theta) {
            // scVI: one fused pass over the sparse rows.
            let mut theta = b.output_tensor(1, g)?;
            b.activation_forward(Activation::Exp, p.get(*slot), theta.output())?;
            let (mut dlogits, mut dtheta) = (b.output_tensor(n, g)?, b.output_tensor(1, g)?);
            let uploaded_here;
            let uploaded = match rows.uploaded {
                Some(c) => c,
                None => {
                    uploaded_here = b.upload_csr(counts)?;
                    &uploaded_here
                }
            };
            b.softmax_nb(
                main.output().input(),
                library.input(),
                uploaded,
                theta.input(),
                In::all(rows.negative),
                Out::all(ll),
                dlogits.output(),
                dtheta.output(),
            )?;
            return Ok(Acts {
                library,
                zero_inflation,
                proportions: None,
                theta: log_theta.map(|l| (theta, l)),
                dmu: dlogits,
                dtheta: Some(dtheta),
                dzero_inflation: None,
            });
        }
        let x = dense_counts(b, rows, false)?;
        let mut rho = b.output_tensor(n, g)?;
        b.softmax_forward(main.output().input(), g, rho.output())?;
        let mut mu = b.output_tensor(n, g)?;
        b.scale_rows(rho.input(), library.input(), mu.output())?;
        let theta = match log_theta {
            Some(log) => {
                let rows = if matches!(log, LogTheta::Gene(_)) {
                    1
                } else {
                    n
                };
                let mut th = b.output_tensor(rows, g)?;
                b.activation_forward(Activation::Exp, log.input(p), th.output())?;
                Some((th, log))
            }
            None => None,
        };
        let family = match self.kind {
            LikelihoodKind::Zinb => Likelihood::ZeroInflatedNegativeBinomial,
            LikelihoodKind::Poisson => Likelihood::Poisson,
            _ => Likelihood::NegativeBinomial,
        };
        // The family's parameters in its order: μ, then θ and the dropout logits where it has them.
        let mut dmu = b.output_tensor(n, g)?;
        let mut dtheta = theta.as_ref().map(|_| b.output_tensor(n, g)).transpose()?;
        let mut dzero_inflation = zero_inflation
            .as_ref()
            .map(|_| b.output_tensor(n, g))
            .transpose()?;
        {
            let mut params: Vec<In<'_, Buf<T, B>>> = vec![mu.input()];
            let mut outs: Vec<Out<'_, Buf<T, B>>> = vec![dmu.output()];
            if let (Some((th, _)), Some(d)) = (&theta, &mut dtheta) {
                params.push(th.input());
                outs.push(d.output());
            }
            if let (Some(zi), Some(d)) = (&zero_inflation, &mut dzero_inflation) {
                params.push(zi.output().input());
                outs.push(d.output());
            }
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
            proportions: Some(rho),
            theta,
            dmu,
            dtheta,
            dzero_inflation,
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
        f: Acts<Buf<T, B>>,
        onehot: Option<&Tensor<Buf<T, B>>>,
        dh: &mut Tensor<Buf<T, B>>,
    ) -> Result<()> {
        let (b, p, mode) = (site.b, site.p, site.mode);
        let (n, g) = (f.dmu.rows, f.dmu.cols);
        let dmain = if let Some(proportions) = &f.proportions {
            let mut drho = b.output_tensor(n, g)?;
            b.scale_rows(f.dmu.input(), f.library.input(), drho.output())?;
            let mut ds = b.output_tensor(n, g)?;
            b.softmax_backward(proportions.input(), drho.input(), g, ds.output())?;
            ds
        } else {
            f.dmu
        };
        main_backward(site, grads, main, dmain, dh)?;
        if let (Some((theta, log)), Some(dtheta)) = (&f.theta, f.dtheta) {
            let log_theta = log.input(p);
            // dlog θ = θ ⊙ dθ per entry (where log θ is per batch or per cell).
            let per_entry = || -> Result<Tensor<Buf<T, B>>> {
                let mut dlog = b.tensor(n, g)?;
                b.activation_backward(
                    Activation::Exp,
                    log_theta.clone(),
                    theta.input(),
                    dtheta.input(),
                    dlog.output(),
                )?;
                Ok(dlog)
            };
            match log {
                LogTheta::Gene(slot) => {
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
                        grads.get(*slot),
                    )?;
                }
                LogTheta::GeneBatch(slot, _) => {
                    let dlog = per_entry()?;
                    let onehot = onehot.expect("gene-batch dispersion reads the batch one-hot");
                    per_batch_gradient(b, onehot, &dlog, grads.get(*slot))?;
                }
                LogTheta::GeneCell(acts) => {
                    let dlog = per_entry()?;
                    if let Some(Theta::GeneCell(head)) = &self.theta {
                        head.backward(
                            b,
                            p,
                            grads,
                            site.h,
                            None,
                            acts,
                            dlog,
                            mode,
                            InputGrad::Add(dh),
                        )?;
                    }
                }
            }
        }
        if let (Some(head), Some(acts), Some(dzi)) =
            (&self.zero_inflation, &f.zero_inflation, f.dzero_inflation)
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
