//! Heads on the latent space and the losses they carry, each on when its weight in
//! `VaeConfig` is positive:
//! - on the joint posterior mean: a label classifier (cross-entropy on the cells that have a
//!   label; scANVI-style predictions), regression on numeric targets (masked squared error),
//!   Cox survival (partial likelihood; OmiEmbed), and the contrastive cosine margin on labels
//!   (MOSA, no parameters);
//! - on the latent samples: an adversarial batch classifier behind gradient reversal
//!   (DAVAE/MultiVI/GLUE): its parameters minimise the cross-entropy, the encoders receive
//!   −λ times its gradient, so they learn latents the classifier cannot tell apart by batch.
//!
//! Every head that exists writes its parameter gradients on every step (zero when the batch
//! carries none of its targets), so no gradient is left from an earlier step.

use tessera_kernels::Real;
use tessera_kernels::backend::{Backend, In, Labels, Out, Result, Storage, Tensor};
use tessera_kernels::ops::elementwise::Activation;
use tessera_kernels::params::Layout;

use crate::layers::{
    Buf, Dense, DenseActs, DenseSpec, Input, InputGrad, Mlp, MlpSpec, Mode, Slots, Weights,
};
use crate::pending::{Reduce, Share, Term};

/// What a minibatch carries for the supervised heads, in its cell order (host memory).
#[derive(Debug, Clone, Copy, Default)]
pub struct Supervision<'a> {
    /// Label codes, -1 = unlabelled (classifier, contrastive loss).
    pub labels: Option<&'a [i32]>,
    /// Regression targets, rows × targets row-major; NaN = missing.
    pub targets: Option<&'a [f64]>,
    /// Survival time and whether the event was observed (false = censored); a NaN time leaves
    /// the cell out.
    pub survival: Option<Survival<'a>>,
}

#[derive(Debug, Clone, Copy)]
pub struct Survival<'a> {
    pub times: &'a [f64],
    pub events: &'a [bool],
}

/// The weights and sizes of the heads (from `VaeConfig` and the data's categories).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct HeadsSpec {
    pub n_latent: usize,
    pub n_hidden: usize,
    pub n_labels: usize,
    pub n_targets: usize,
    pub n_batch: usize,
    pub classifier_weight: f64,
    pub regression_weight: f64,
    pub cox_weight: f64,
    pub contrastive_weight: f64,
    pub contrastive_margin: f64,
    pub adversarial_weight: f64,
    pub adversarial_reversal: f64,
}

/// latent → one hidden ReLU layer → logits.
#[derive(Debug, Clone)]
struct Classifier {
    hidden: Mlp,
    logits: Dense,
}

struct ClassifierActs<S> {
    hidden: Vec<DenseActs<S>>,
    logits: DenseActs<S>,
}

/// A head's loss weighted: its gradient `d` scaled by `weight`, and weight × `loss` as a share
/// left on the device (the same f64 product an immediate read gave).
fn weighted<T: Real, B: Backend<T>>(
    b: &B,
    d: &mut Tensor<Buf<T, B>>,
    loss: Buf<T, B>,
    weight: f64,
) -> Result<Share<Buf<T, B>>> {
    b.scale(d.output(), T::of(weight))?;
    Ok(Share {
        values: loss,
        reduce: Reduce::ScaledSum(weight),
    })
}

fn linear(d_in: usize, d_out: usize) -> DenseSpec {
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

impl Classifier {
    fn register(
        name: &str,
        d_in: usize,
        n_hidden: usize,
        classes: usize,
        layout: &mut Layout,
        state: &mut Layout,
    ) -> Classifier {
        let spec = MlpSpec {
            d_in,
            n_hidden,
            n_layers: 1,
            n_cov: 0,
            inject_every_layer: false,
            batch_norm: false,
            layer_norm: false,
            dropout: 0.0,
        };
        Classifier {
            hidden: Mlp::register(spec, name, layout, state, 0),
            logits: Dense::register(
                linear(n_hidden, classes),
                &format!("{name}.logits"),
                layout,
                state,
                0,
            ),
        }
    }

    fn init<T: Real>(
        &self,
        layout: &Layout,
        state: &Layout,
        values: &mut [T],
        state_values: &mut [T],
        rng: &mut impl rand::Rng,
    ) {
        self.hidden.init(layout, state, values, state_values, rng);
        self.logits.init(layout, state, values, state_values, rng);
    }

    fn forward<T: Real, B: Backend<T>>(
        &self,
        b: &B,
        p: &Weights<'_, Buf<T, B>>,
        state: &mut Slots<'_, Buf<T, B>>,
        x: &Tensor<Buf<T, B>>,
        mode: Mode,
    ) -> Result<ClassifierActs<Buf<T, B>>> {
        let hidden = self
            .hidden
            .forward(b, p, state, &Input::Dense(x), None, mode)?;
        let logits =
            self.logits
                .forward(b, p, state, &Input::Dense(Mlp::output(&hidden)), None, mode)?;
        Ok(ClassifierActs { hidden, logits })
    }

    /// The forward on `x` scored against `labels` (-1: none) of `classes`: the activations,
    /// `weight` × the loss's gradient with respect to the logits, and weight × the loss as a
    /// share left on the device (the same f64 product an immediate read gave).
    #[allow(clippy::too_many_arguments)] // the pass's inputs, its labels and the loss's weight
    fn scored<T: Real, B: Backend<T>>(
        &self,
        b: &B,
        p: &Weights<'_, Buf<T, B>>,
        state: &mut Slots<'_, Buf<T, B>>,
        x: &Tensor<Buf<T, B>>,
        (labels, classes): (Labels<'_, Buf<T, B>>, usize),
        weight: f64,
        mode: Mode,
    ) -> Result<ScoredLoss<Buf<T, B>>> {
        let a = self.forward(b, p, state, x, mode)?;
        let (mut d, mut loss) = (b.output_tensor(x.rows, classes)?, b.output_buf(1)?);
        b.cross_entropy(
            a.logits.output().input(),
            labels,
            classes,
            d.output(),
            Out::all(&mut loss),
        )?;
        let share = weighted(b, &mut d, loss, weight)?;
        Ok(((a, d), share))
    }

    #[allow(clippy::too_many_arguments)] // the pass's inputs, saved activations and the views it writes
    fn backward<T: Real, B: Backend<T>>(
        &self,
        b: &B,
        p: &Weights<'_, Buf<T, B>>,
        grads: &mut Slots<'_, Buf<T, B>>,
        x: &Tensor<Buf<T, B>>,
        acts: &ClassifierActs<Buf<T, B>>,
        dlogits: Tensor<Buf<T, B>>,
        mode: Mode,
    ) -> Result<Tensor<Buf<T, B>>> {
        let h = Mlp::output(&acts.hidden);
        let mut dh = b.output_tensor(h.rows, h.cols)?;
        self.logits.backward(
            b,
            p,
            grads,
            &Input::Dense(h),
            None,
            &acts.logits,
            dlogits,
            mode,
            InputGrad::Write(&mut dh),
        )?;
        let mut dx = b.output_tensor(x.rows, x.cols)?;
        self.hidden.backward(
            b,
            p,
            grads,
            &Input::Dense(x),
            None,
            &acts.hidden,
            dh,
            mode,
            InputGrad::Write(&mut dx),
        )?;
        Ok(dx)
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Heads {
    spec: HeadsSpec,
    classifier: Option<Classifier>,
    regression: Option<Dense>,
    cox: Option<Dense>,
    adversary: Option<Classifier>,
}

/// A head's activations and the weighted gradient of its loss with respect to its output.
type Scored<A, S> = Option<(A, Tensor<S>)>;
/// A classifier's activations and its weighted gradient with respect to the logits.
type ScoredActs<S> = (ClassifierActs<S>, Tensor<S>);
/// Those and the weighted loss, left on the device.
type ScoredLoss<S> = (ScoredActs<S>, Share<S>);

/// What the heads' backward needs from their forward.
pub(crate) struct HeadActs<S> {
    mean: Option<Tensor<S>>,
    classifier: Scored<ClassifierActs<S>, S>,
    regression: Scored<DenseActs<S>, S>,
    cox: Scored<DenseActs<S>, S>,
    /// The contrastive loss' weighted gradient with respect to the mean.
    contrastive: Option<Tensor<S>>,
    adversary: Scored<ClassifierActs<S>, S>,
}

/// The heads' weighted loss values of one batch.
#[derive(Debug)]
pub(crate) struct HeadTerms<S> {
    /// Classifier, regression and Cox (left on the device), in that order.
    pub supervised: Term<S>,
    /// Contrastive and adversarial (left on the device), in that order.
    pub regularization: Term<S>,
}

/// What the heads' forward returns: their loss terms and what their backward needs.
pub(crate) type HeadsForward<S> = (HeadTerms<S>, HeadActs<S>);

impl Heads {
    /// Registers `heads.*` for every head whose weight is positive.
    pub fn register(spec: HeadsSpec, layout: &mut Layout, state: &mut Layout) -> Heads {
        assert!(
            spec.classifier_weight <= 0.0 && spec.contrastive_weight <= 0.0 || spec.n_labels > 0,
            "label heads need label categories"
        );
        assert!(
            spec.regression_weight <= 0.0 || spec.n_targets > 0,
            "a regression head needs targets"
        );
        let (d, h) = (spec.n_latent, spec.n_hidden);
        let classifier = (spec.classifier_weight > 0.0)
            .then(|| Classifier::register("heads.classifier", d, h, spec.n_labels, layout, state));
        let regression = (spec.regression_weight > 0.0).then(|| {
            Dense::register(
                linear(d, spec.n_targets),
                "heads.regression",
                layout,
                state,
                0,
            )
        });
        let cox = (spec.cox_weight > 0.0)
            .then(|| Dense::register(linear(d, 1), "heads.cox", layout, state, 0));
        let adversary = (spec.adversarial_weight > 0.0 && spec.n_batch > 1)
            .then(|| Classifier::register("heads.adversary", d, h, spec.n_batch, layout, state));
        Heads {
            spec,
            classifier,
            regression,
            cox,
            adversary,
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
        for c in [&self.classifier, &self.adversary].into_iter().flatten() {
            c.init(layout, state, values, state_values, rng);
        }
        for d in [&self.regression, &self.cox].into_iter().flatten() {
            d.init(layout, state, values, state_values, rng);
        }
    }

    /// Whether any head reads the joint posterior mean.
    pub fn read_mean(&self) -> bool {
        self.classifier.is_some()
            || self.regression.is_some()
            || self.cox.is_some()
            || self.spec.contrastive_weight > 0.0
    }

    pub fn has_classifier(&self) -> bool {
        self.classifier.is_some()
    }

    /// Whether the adversarial batch classifier reads the latent samples' batch codes.
    pub fn has_adversary(&self) -> bool {
        self.adversary.is_some()
    }

    /// The heads' losses: those on the joint mean `mean` (n × latent, None when no head reads
    /// it) with `sup`, the adversary on the latent samples `zs` whose batch codes are
    /// `sample_batches` (-1: unknown). The classifier and the contrastive margin read
    /// `device_labels` (the batch's labels as f32 codes, staged with it) where given, else
    /// `sup`'s.
    #[allow(clippy::too_many_arguments)] // the pass's inputs, saved activations and the views it writes
    pub fn forward<T: Real, B: Backend<T>>(
        &self,
        b: &B,
        p: &Weights<'_, Buf<T, B>>,
        state: &mut Slots<'_, Buf<T, B>>,
        mean: Option<Tensor<Buf<T, B>>>,
        (sup, device_labels): (&Supervision<'_>, Option<&Buf<T, B>>),
        zs: &Tensor<Buf<T, B>>,
        sample_batches: Labels<'_, Buf<T, B>>,
        mode: Mode,
    ) -> Result<HeadsForward<Buf<T, B>>> {
        let s = &self.spec;
        let mut terms = HeadTerms {
            supervised: Term::default(),
            regularization: Term::default(),
        };
        let mut acts = HeadActs {
            mean: None,
            classifier: None,
            regression: None,
            cox: None,
            contrastive: None,
            adversary: None,
        };
        if let Some(m) = &mean {
            let n = m.rows;
            let unlabelled = vec![-1; n];
            let labels = sup.labels.unwrap_or(&unlabelled);
            assert_eq!(labels.len(), n, "one label per cell");
            if let Some(on_device) = device_labels {
                assert_eq!(on_device.len(), n, "one label per cell on the device");
            }
            let labels = || match device_labels {
                Some(on_device) => Labels::Device(In::all(on_device)),
                None => Labels::Host(labels),
            };
            if let Some(c) = &self.classifier {
                let labels = (labels(), s.n_labels);
                let (a, loss) = c.scored(b, p, state, m, labels, s.classifier_weight, mode)?;
                terms.supervised.add(loss);
                acts.classifier = Some(a);
            }
            if let Some(r) = &self.regression {
                let a = r.forward(b, p, state, &Input::Dense(m), None, mode)?;
                let missing = vec![f64::NAN; n * s.n_targets];
                let targets = sup.targets.unwrap_or(&missing);
                assert_eq!(
                    targets.len(),
                    n * s.n_targets,
                    "regression targets: {n} rows of {}",
                    s.n_targets
                );
                let (mut d, mut loss) = (b.output_tensor(n, s.n_targets)?, b.output_buf(1)?);
                b.masked_mse(a.output().input(), targets, d.output(), Out::all(&mut loss))?;
                terms
                    .supervised
                    .add(weighted(b, &mut d, loss, s.regression_weight)?);
                acts.regression = Some((a, d));
            }
            if let Some(c) = &self.cox {
                let a = c.forward(b, p, state, &Input::Dense(m), None, mode)?;
                let (times, events) = match sup.survival {
                    // A cell without a time is never at risk and has no event.
                    Some(sv) => (
                        sv.times
                            .iter()
                            .map(|t| if t.is_nan() { f64::NEG_INFINITY } else { *t })
                            .collect(),
                        sv.times
                            .iter()
                            .zip(sv.events)
                            .map(|(t, e)| *e && !t.is_nan())
                            .collect(),
                    ),
                    None => (vec![f64::NEG_INFINITY; n], vec![false; n]),
                };
                let (mut d, mut loss) = (b.output_tensor(n, 1)?, b.output_buf(1)?);
                b.cox_partial_likelihood(
                    a.output().input(),
                    &times,
                    &events,
                    d.output(),
                    Out::all(&mut loss),
                )?;
                terms
                    .supervised
                    .add(weighted(b, &mut d, loss, s.cox_weight)?);
                acts.cox = Some((a, d));
            }
            if s.contrastive_weight > 0.0 {
                let (mut d, mut loss) = (b.output_tensor(n, s.n_latent)?, b.output_buf(1)?);
                b.cosine_margin(
                    m.input(),
                    labels(),
                    s.n_latent,
                    s.contrastive_margin,
                    d.output(),
                    Out::all(&mut loss),
                )?;
                terms
                    .regularization
                    .add(weighted(b, &mut d, loss, s.contrastive_weight)?);
                acts.contrastive = Some(d);
            }
        }
        acts.mean = mean;
        if let Some(c) = &self.adversary {
            assert_eq!(
                sample_batches.len(),
                zs.rows,
                "one batch code per latent sample"
            );
            let batches = (sample_batches, s.n_batch);
            let (a, loss) = c.scored(b, p, state, zs, batches, s.adversarial_weight, mode)?;
            terms.regularization.add(loss);
            acts.adversary = Some(a);
        }
        Ok((terms, acts))
    }

    /// Parameter gradients, and the gradients the heads send to the joint mean and (reversed)
    /// to the latent samples.
    #[allow(clippy::type_complexity)] // views returned together to one caller; a named type would be used once
    pub fn backward<T: Real, B: Backend<T>>(
        &self,
        b: &B,
        p: &Weights<'_, Buf<T, B>>,
        grads: &mut Slots<'_, Buf<T, B>>,
        zs: &Tensor<Buf<T, B>>,
        acts: HeadActs<Buf<T, B>>,
        mode: Mode,
    ) -> Result<(Option<Tensor<Buf<T, B>>>, Option<Tensor<Buf<T, B>>>)> {
        let HeadActs {
            mean,
            classifier,
            regression,
            cox,
            contrastive,
            adversary,
        } = acts;
        let dmean = match &mean {
            Some(m) => {
                let mut dm = match contrastive {
                    Some(d) => d,
                    None => b.tensor(m.rows, m.cols)?,
                };
                if let (Some(c), Some((a, d))) = (&self.classifier, classifier) {
                    let dx = c.backward(b, p, grads, m, &a, d, mode)?;
                    b.axpy(T::one(), dx.input(), dm.output())?;
                }
                for (head, scored) in [(&self.regression, regression), (&self.cox, cox)] {
                    if let (Some(h), Some((a, d))) = (head, scored) {
                        h.backward(
                            b,
                            p,
                            grads,
                            &Input::Dense(m),
                            None,
                            &a,
                            d,
                            mode,
                            InputGrad::Add(&mut dm),
                        )?;
                    }
                }
                Some(dm)
            }
            None => None,
        };
        let dzs = match (&self.adversary, adversary) {
            (Some(c), Some((a, d))) => {
                let mut dz = c.backward(b, p, grads, zs, &a, d, mode)?;
                b.scale(dz.output(), T::of(-self.spec.adversarial_reversal))?;
                Some(dz)
            }
            _ => None,
        };
        Ok((dmean, dzs))
    }

    /// Class probabilities of the classifier at `mean` (evaluation mode), n × labels.
    pub fn predict<T: Real, B: Backend<T>>(
        &self,
        b: &B,
        p: &Weights<'_, Buf<T, B>>,
        state: &mut Slots<'_, Buf<T, B>>,
        mean: &Tensor<Buf<T, B>>,
    ) -> Result<Option<Tensor<Buf<T, B>>>> {
        let Some(c) = &self.classifier else {
            return Ok(None);
        };
        let a = c.forward(b, p, state, mean, Mode::Eval)?;
        let mut probabilities = b.output_tensor(mean.rows, self.spec.n_labels)?;
        b.softmax_forward(
            a.logits.output().input(),
            self.spec.n_labels,
            probabilities.output(),
        )?;
        Ok(Some(probabilities))
    }
}
