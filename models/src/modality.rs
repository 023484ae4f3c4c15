//! One modality's halves of the VAE: the encoder (counts → hidden → q(z|x) mean and
//! log-variance) and the decoder (z + covariates → likelihood parameters → −log p(x|z)).
//! `vae.rs` joins any number of them through a joint posterior.

use serde::{Deserialize, Serialize};
use tessera_kernels::Real;
use tessera_kernels::backend::{Backend, In, Out, Result, Storage, Tensor};
use tessera_kernels::ops::elementwise::Activation;
use tessera_kernels::ops::likelihood::Likelihood;
use tessera_kernels::ops::linear::{CountTransform, CsrRef};
use tessera_kernels::params::Layout;

use crate::layers::{
    Buf, Dense, DenseActs, DenseSpec, Input, InputGrad, Mlp, MlpSpec, Mode, Slots, Weights, copy_of,
};

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
    /// The fused likelihood op's family (None: the NB mixture, its own op).
    fn family(self) -> Option<Likelihood> {
        match self {
            LikelihoodKind::Nb => Some(Likelihood::NegativeBinomial),
            LikelihoodKind::Zinb => Some(Likelihood::ZeroInflatedNegativeBinomial),
            LikelihoodKind::Poisson => Some(Likelihood::Poisson),
            LikelihoodKind::Gaussian => Some(Likelihood::Gaussian),
            LikelihoodKind::Bernoulli => Some(Likelihood::Bernoulli),
            LikelihoodKind::NbMixture => None,
        }
    }

    fn has_dispersion(self) -> bool {
        matches!(self, LikelihoodKind::Nb | LikelihoodKind::Zinb)
    }

    fn scaled_by_library(self) -> bool {
        matches!(
            self,
            LikelihoodKind::Nb | LikelihoodKind::Zinb | LikelihoodKind::Poisson
        )
    }
}

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

/// One modality as the model sees it: its name, width and observation model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModalitySpec {
    pub name: String,
    pub n_features: usize,
    pub likelihood: LikelihoodKind,
    pub dispersion: Dispersion,
}

/// The sizes shared by every modality's encoder and decoder.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Shape {
    pub n_hidden: usize,
    pub n_latent: usize,
    pub n_layers: usize,
    pub dropout: f32,
    pub batch_norm: bool,
    pub encode_covariates: bool,
    pub deeply_inject_covariates: bool,
    /// Width of the one-hot covariates; the first `n_batch` columns are the batch.
    pub n_cov: usize,
    pub n_batch: usize,
}

fn head(d_in: usize, d_out: usize) -> DenseSpec {
    DenseSpec {
        d_in,
        d_out,
        n_cov: 0,
        batch_norm: false,
        act: Activation::Identity,
        dropout: 0.0,
    }
}

/// Counts → log1p → hidden layers → (mean, log-variance) of q(z | this modality).
#[derive(Debug, Clone)]
pub(crate) struct Encoder {
    hidden: Mlp,
    mean: Dense,
    logvar: Dense,
    encode_covariates: bool,
}

/// What an encoder read: counts (log1p fused into the sparse layer), or values already in that
/// log1p space (decoded expression, in the cycle-consistency pass).
enum EncoderInput<S, C> {
    Counts(C),
    Log1p(Tensor<S>),
}

pub(crate) struct EncoderActs<S, C> {
    input: EncoderInput<S, C>,
    rows: usize,
    cov: Option<Tensor<S>>,
    hidden: Vec<DenseActs<S>>,
    pub mean: DenseActs<S>,
    pub logvar: DenseActs<S>,
}

impl Encoder {
    /// Registers `{prefix}encoder.*`; dropout draws from sites `site..`.
    pub fn register(
        prefix: &str,
        n_features: usize,
        s: &Shape,
        layout: &mut Layout,
        state: &mut Layout,
        site: u64,
    ) -> Encoder {
        let spec = MlpSpec {
            d_in: n_features,
            n_hidden: s.n_hidden,
            n_layers: s.n_layers,
            n_cov: if s.encode_covariates { s.n_cov } else { 0 },
            inject_every_layer: false,
            batch_norm: s.batch_norm,
            dropout: s.dropout,
        };
        let hidden = Mlp::register(spec, &format!("{prefix}encoder"), layout, state, site);
        let mean = Dense::register(
            head(s.n_hidden, s.n_latent),
            &format!("{prefix}encoder.mean"),
            layout,
            state,
            site,
        );
        let logvar = Dense::register(
            head(s.n_hidden, s.n_latent),
            &format!("{prefix}encoder.logvar"),
            layout,
            state,
            site,
        );
        Encoder {
            hidden,
            mean,
            logvar,
            encode_covariates: s.encode_covariates,
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
        self.hidden.init(layout, state, values, state_values, rng);
        self.mean.init(layout, state, values, state_values, rng);
        self.logvar.init(layout, state, values, state_values, rng);
    }

    /// q(z | x) for the cells of `counts`; `covariates` holds their rows (n × n_cov).
    pub fn forward<T: Real, B: Backend<T>>(
        &self,
        b: &B,
        p: &Weights<'_, Buf<T, B>>,
        state: &mut Slots<'_, Buf<T, B>>,
        counts: CsrRef<'_, T>,
        covariates: &[T],
        mode: Mode,
    ) -> Result<EncoderActs<Buf<T, B>, B::Csr>> {
        self.run(
            b,
            p,
            state,
            EncoderInput::Counts(b.upload_csr(counts)?),
            counts.rows,
            covariates,
            mode,
        )
    }

    /// q(z | x) from values already in log1p space (rows × features).
    pub fn forward_log1p<T: Real, B: Backend<T>>(
        &self,
        b: &B,
        p: &Weights<'_, Buf<T, B>>,
        state: &mut Slots<'_, Buf<T, B>>,
        x: Tensor<Buf<T, B>>,
        covariates: &[T],
        mode: Mode,
    ) -> Result<EncoderActs<Buf<T, B>, B::Csr>> {
        let rows = x.rows;
        self.run(b, p, state, EncoderInput::Log1p(x), rows, covariates, mode)
    }

    #[allow(clippy::too_many_arguments)] // the pass's inputs, saved activations and the views it writes
    fn run<T: Real, B: Backend<T>>(
        &self,
        b: &B,
        p: &Weights<'_, Buf<T, B>>,
        state: &mut Slots<'_, Buf<T, B>>,
        input: EncoderInput<Buf<T, B>, B::Csr>,
        rows: usize,
        covariates: &[T],
        mode: Mode,
    ) -> Result<EncoderActs<Buf<T, B>, B::Csr>> {
        let cov = if self.encode_covariates {
            Some(Tensor {
                buf: b.upload(covariates)?,
                rows,
                cols: covariates.len() / rows.max(1),
            })
        } else {
            None
        };
        let hidden = self.hidden.forward(
            b,
            p,
            state,
            &Self::layer_input(&input, rows),
            cov.as_ref(),
            mode,
        )?;
        let h = Input::Dense(Mlp::output(&hidden));
        let mean = self.mean.forward(b, p, state, &h, None, mode)?;
        let logvar = self.logvar.forward(b, p, state, &h, None, mode)?;
        Ok(EncoderActs {
            input,
            rows,
            cov,
            hidden,
            mean,
            logvar,
        })
    }

    fn layer_input<S, C>(input: &EncoderInput<S, C>, rows: usize) -> Input<'_, S, C> {
        match input {
            EncoderInput::Counts(csr) => Input::Counts {
                csr,
                transform: CountTransform::Log1p,
                rows,
            },
            EncoderInput::Log1p(x) => Input::Dense(x),
        }
    }

    /// Parameter gradients from the gradients of the posterior's mean and log-variance; for a
    /// log1p-space input, also its gradient.
    #[allow(clippy::too_many_arguments)] // the pass's inputs, saved activations and the views it writes
    pub fn backward<T: Real, B: Backend<T>>(
        &self,
        b: &B,
        p: &Weights<'_, Buf<T, B>>,
        grads: &mut Slots<'_, Buf<T, B>>,
        acts: &EncoderActs<Buf<T, B>, B::Csr>,
        dm: Tensor<Buf<T, B>>,
        dlv: Tensor<Buf<T, B>>,
        mode: Mode,
    ) -> Result<Option<Tensor<Buf<T, B>>>> {
        let h = Mlp::output(&acts.hidden);
        let mut dh = b.tensor(acts.rows, h.cols)?;
        self.mean.backward(
            b,
            p,
            grads,
            &Input::Dense(h),
            None,
            &acts.mean,
            dm,
            mode,
            InputGrad::Write(&mut dh),
        )?;
        self.logvar.backward(
            b,
            p,
            grads,
            &Input::Dense(h),
            None,
            &acts.logvar,
            dlv,
            mode,
            InputGrad::Add(&mut dh),
        )?;
        let x = Self::layer_input(&acts.input, acts.rows);
        match &acts.input {
            EncoderInput::Counts(_) => self
                .hidden
                .backward(
                    b,
                    p,
                    grads,
                    &x,
                    acts.cov.as_ref(),
                    &acts.hidden,
                    dh,
                    mode,
                    InputGrad::Skip,
                )
                .map(|()| None),
            EncoderInput::Log1p(t) => {
                let mut dx = b.tensor(t.rows, t.cols)?;
                self.hidden.backward(
                    b,
                    p,
                    grads,
                    &x,
                    acts.cov.as_ref(),
                    &acts.hidden,
                    dh,
                    mode,
                    InputGrad::Write(&mut dx),
                )?;
                Ok(Some(dx))
            }
        }
    }
}

/// Decoder heads and their parameters, by likelihood.
#[derive(Debug, Clone)]
struct Heads {
    /// μ-proportions (softmax) for NB/ZINB/Poisson, means for Gaussian, logits for Bernoulli.
    main: Dense,
    /// ZINB dropout logits.
    zero_inflation: Option<Dense>,
    /// GeneCell log θ.
    dispersion_head: Option<Dense>,
    /// Gene (features) or GeneBatch (n_batch × features) log θ, or the Gaussian log-variances
    /// (the NB mixture: its per-protein log θ).
    shared: Option<usize>,
    /// NB mixture: the background-component logits and the log background rate (batch ×
    /// features).
    mixing: Option<Dense>,
    background: Option<usize>,
}

impl Heads {
    fn shared_slot(&self) -> usize {
        self.shared.expect("this likelihood has a shared parameter")
    }

    /// Where log θ lives: the parameter (gene), the batch one-hot times the table (gene-batch,
    /// computed per batch), or the dispersion head's output (gene-cell).
    fn log_theta<'a, S: Storage>(
        &self,
        dispersion: Dispersion,
        p: &Weights<'a, S>,
        per_cell: Option<&'a Tensor<S>>,
        head: Option<&'a DenseActs<S>>,
    ) -> In<'a, S> {
        match dispersion {
            Dispersion::Gene => p.get(self.shared_slot()),
            Dispersion::GeneBatch => per_cell
                .expect("gene-batch log θ is computed per batch")
                .input(),
            Dispersion::GeneCell => head
                .expect("gene-cell dispersion has a head")
                .output()
                .input(),
        }
    }
}

/// The cycle pass through a decoder: activations and its expected expression.
pub(crate) struct CycleActs<S> {
    cov: Tensor<S>,
    onehot: Option<Tensor<S>>,
    hidden: Vec<DenseActs<S>>,
    main: DenseActs<S>,
    mixing: Option<DenseActs<S>>,
    /// ρ = softmax(s) of library-scaled expression.
    softmax: Option<Tensor<S>>,
    /// The mixture's softplus(s) and softplus(π).
    softplus: Option<(Tensor<S>, Tensor<S>)>,
    /// x̂ (the mixture: log x̂).
    expected: Tensor<S>,
    log1p: Tensor<S>,
    library: f64,
}

/// z + covariates → hidden layers → likelihood parameters of one modality.
#[derive(Debug, Clone)]
pub(crate) struct Decoder {
    spec: ModalitySpec,
    n_cov: usize,
    n_batch: usize,
    n_hidden: usize,
    hidden: Mlp,
    heads: Heads,
}

/// Everything the decoder's backward needs from its forward.
pub(crate) struct DecoderActs<S> {
    cov: Tensor<S>,
    batch_onehot: Option<Tensor<S>>,
    library: Tensor<S>,
    hidden: Vec<DenseActs<S>>,
    main: DenseActs<S>,
    zero_inflation: Option<DenseActs<S>>,
    dispersion: Option<DenseActs<S>>,
    /// softmax of the main head (library-scaled likelihoods).
    proportions: Option<Tensor<S>>,
    /// Gene-batch log θ per cell (the other dispersions read it from where it lives).
    log_theta_cells: Option<Tensor<S>>,
    /// θ: per feature (1 × G) or per cell (n × G).
    theta: Option<Tensor<S>>,
    /// Per-entry gradients of the weighted log-likelihood, one per likelihood parameter.
    dparams: Vec<Tensor<S>>,
    mixture: Option<MixtureActs<S>>,
}

/// The NB mixture's forward values (the main head's output is the foreground's log-scale
/// logit s).
pub(crate) struct MixtureActs<S> {
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

impl Decoder {
    /// Registers `{prefix}decoder.*` and the shared likelihood parameters.
    pub fn register(
        prefix: &str,
        spec: &ModalitySpec,
        s: &Shape,
        layout: &mut Layout,
        state: &mut Layout,
        site: u64,
    ) -> Decoder {
        let g = spec.n_features;
        let hidden = Mlp::register(
            MlpSpec {
                d_in: s.n_latent,
                n_hidden: s.n_hidden,
                n_layers: s.n_layers,
                n_cov: s.n_cov,
                inject_every_layer: s.deeply_inject_covariates,
                batch_norm: s.batch_norm,
                dropout: 0.0,
            },
            &format!("{prefix}decoder"),
            layout,
            state,
            site,
        );
        let main = Dense::register(
            head(s.n_hidden, g),
            &format!("{prefix}decoder.main"),
            layout,
            state,
            site,
        );
        let zero_inflation = (spec.likelihood == LikelihoodKind::Zinb).then(|| {
            Dense::register(
                head(s.n_hidden, g),
                &format!("{prefix}decoder.zero_inflation"),
                layout,
                state,
                site,
            )
        });
        let dispersion_head = (spec.likelihood.has_dispersion()
            && spec.dispersion == Dispersion::GeneCell)
            .then(|| {
                Dense::register(
                    head(s.n_hidden, g),
                    &format!("{prefix}decoder.log_theta"),
                    layout,
                    state,
                    site,
                )
            });
        let mixture = spec.likelihood == LikelihoodKind::NbMixture;
        let mixing = mixture.then(|| {
            Dense::register(
                head(s.n_hidden, g),
                &format!("{prefix}decoder.mixing"),
                layout,
                state,
                site,
            )
        });
        let background =
            mixture.then(|| layout.add(&format!("{prefix}log_background"), &[s.n_batch.max(1), g]));
        let shared = match (spec.likelihood, spec.dispersion) {
            (LikelihoodKind::Nb | LikelihoodKind::Zinb, Dispersion::Gene)
            | (LikelihoodKind::NbMixture, _) => {
                Some(layout.add(&format!("{prefix}log_theta"), &[g]))
            }
            (LikelihoodKind::Nb | LikelihoodKind::Zinb, Dispersion::GeneBatch) => {
                Some(layout.add(&format!("{prefix}log_theta"), &[s.n_batch.max(1), g]))
            }
            (LikelihoodKind::Gaussian, _) => {
                Some(layout.add(&format!("{prefix}log_variance"), &[g]))
            }
            _ => None,
        };
        Decoder {
            spec: spec.clone(),
            n_cov: s.n_cov,
            n_batch: s.n_batch,
            n_hidden: s.n_hidden,
            hidden,
            heads: Heads {
                main,
                zero_inflation,
                dispersion_head,
                shared,
                mixing,
                background,
            },
        }
    }

    /// log θ and the Gaussian log-variances start at 0 (θ = 1, σ² = 1) like scvi-tools' px_r
    /// (which draws N(0, 1); a constant start is as good and reproducible across backends).
    pub fn init<T: Real>(
        &self,
        layout: &Layout,
        state: &Layout,
        values: &mut [T],
        state_values: &mut [T],
        rng: &mut impl rand::Rng,
    ) {
        self.hidden.init(layout, state, values, state_values, rng);
        for d in [
            Some(&self.heads.main),
            self.heads.zero_inflation.as_ref(),
            self.heads.dispersion_head.as_ref(),
            self.heads.mixing.as_ref(),
        ]
        .into_iter()
        .flatten()
        {
            d.init(layout, state, values, state_values, rng);
        }
    }

    /// −Σ_r w_r log p(x_r | z_r) and the activations the backward needs. `counts` and
    /// `covariates` hold the rows of `z`; `weights` (one per row) weight each cell's term.
    #[allow(clippy::too_many_arguments)] // the pass's inputs, saved activations and the views it writes
    pub fn forward<T: Real, B: Backend<T>>(
        &self,
        b: &B,
        p: &Weights<'_, Buf<T, B>>,
        state: &mut Slots<'_, Buf<T, B>>,
        z: &Tensor<Buf<T, B>>,
        counts: CsrRef<'_, T>,
        covariates: &[T],
        weights: &[T],
        mode: Mode,
    ) -> Result<(f64, DecoderActs<Buf<T, B>>)> {
        let (n, g, kind) = (z.rows, self.spec.n_features, self.spec.likelihood);
        assert_eq!(
            (counts.rows, counts.cols),
            (n, g),
            "decoder {:?}: counts shape",
            self.spec.name
        );
        assert_eq!(weights.len(), n, "one weight per decoded cell");

        // Host-side inputs: library sizes and, except for scVI's fused term (which reads the
        // sparse rows), the dense counts the likelihood reads.
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
        let fused = kind == LikelihoodKind::Nb && self.spec.dispersion == Dispersion::Gene;
        let x = if fused {
            None
        } else {
            let mut dense = counts.summed_dense();
            if kind == LikelihoodKind::Bernoulli {
                dense
                    .iter_mut()
                    .filter(|v| **v > T::zero())
                    .for_each(|v| *v = T::one());
            }
            Some(Tensor {
                buf: b.upload_vec(dense)?,
                rows: n,
                cols: g,
            })
        };
        let (cov, batch_onehot) = self.covariates(b, covariates, n)?;

        let hidden = self
            .hidden
            .forward(b, p, state, &Input::Dense(z), Some(&cov), mode)?;
        let h = Input::Dense(Mlp::output(&hidden));
        let main = self.heads.main.forward(b, p, state, &h, None, mode)?;
        let zero_inflation = self
            .heads
            .zero_inflation
            .as_ref()
            .map(|d| d.forward(b, p, state, &h, None, mode))
            .transpose()?;
        let dispersion = self
            .heads
            .dispersion_head
            .as_ref()
            .map(|d| d.forward(b, p, state, &h, None, mode))
            .transpose()?;
        let negative: Vec<T> = weights.iter().map(|&w| T::zero() - w).collect();
        let ll_weights = b.upload(&negative)?;
        let mut ll = b.zeros(n)?;
        let reconstruction = |ll: &Buf<T, B>| -> Result<f64> {
            Ok(-b
                .download(In::all(ll))?
                .iter()
                .zip(weights)
                .map(|(l, w)| l.f64() * w.f64())
                .sum::<f64>())
        };
        if kind == LikelihoodKind::NbMixture {
            let x = x.as_ref().expect("dense counts for the NB mixture");
            let mixture = self.mixture_forward(
                b,
                p,
                state,
                &h,
                main.output(),
                x,
                batch_onehot.as_ref(),
                &ll_weights,
                &mut ll,
                mode,
            )?;
            let reconstruction = reconstruction(&ll)?;
            let acts = DecoderActs {
                cov,
                batch_onehot,
                library,
                hidden,
                main,
                zero_inflation,
                dispersion,
                proportions: None,
                log_theta_cells: None,
                theta: None,
                dparams: Vec::new(),
                mixture: Some(mixture),
            };
            return Ok((reconstruction, acts));
        }
        if fused {
            let mut theta = b.tensor(1, g)?;
            b.activation_forward(
                Activation::Exp,
                p.get(self.heads.shared_slot()),
                theta.output(),
            )?;
            let (mut dlogits, mut dtheta) = (b.tensor(n, g)?, b.tensor(1, g)?);
            b.softmax_nb(
                main.output().input(),
                library.input(),
                counts,
                theta.input(),
                In::all(&ll_weights),
                Out::all(&mut ll),
                dlogits.output(),
                dtheta.output(),
            )?;
            let reconstruction = reconstruction(&ll)?;
            let acts = DecoderActs {
                cov,
                batch_onehot,
                library,
                hidden,
                main,
                zero_inflation,
                dispersion,
                proportions: None,
                log_theta_cells: None,
                theta: Some(theta),
                dparams: vec![dlogits, dtheta],
                mixture: None,
            };
            return Ok((reconstruction, acts));
        }
        let x = x.expect("dense counts for every unfused likelihood");

        let (proportions, mu) = if kind.scaled_by_library() {
            let mut rho = b.tensor(n, g)?;
            b.softmax_forward(main.output().input(), g, rho.output())?;
            let mut mu = b.tensor(n, g)?;
            b.scale_rows(rho.input(), library.input(), mu.output())?;
            (Some(rho), Some(mu))
        } else {
            (None, None)
        };
        let log_theta_cells = match &batch_onehot {
            Some(onehot) => {
                let mut t = b.tensor(n, g)?;
                b.gemm(
                    false,
                    false,
                    n,
                    onehot.cols,
                    g,
                    T::one(),
                    onehot.input(),
                    p.get(self.heads.shared_slot()),
                    T::zero(),
                    t.output(),
                )?;
                Some(t)
            }
            None => None,
        };
        let theta = if kind.has_dispersion() {
            let rows = if self.spec.dispersion == Dispersion::Gene {
                1
            } else {
                n
            };
            let mut th = b.tensor(rows, g)?;
            b.activation_forward(
                Activation::Exp,
                self.heads.log_theta(
                    self.spec.dispersion,
                    p,
                    log_theta_cells.as_ref(),
                    dispersion.as_ref(),
                ),
                th.output(),
            )?;
            Some(th)
        } else {
            None
        };

        let family = kind.family().expect("a fused likelihood family");
        let mut dparams: Vec<Tensor<Buf<T, B>>> = (0..family.n_params())
            .map(|_| b.tensor(n, g))
            .collect::<Result<_>>()?;
        {
            let mut params: Vec<In<'_, Buf<T, B>>> = Vec::with_capacity(3);
            match kind {
                LikelihoodKind::Nb | LikelihoodKind::Zinb | LikelihoodKind::Poisson => {
                    params.push(mu.as_ref().expect("library-scaled mean").input());
                    if let Some(th) = &theta {
                        params.push(th.input());
                    }
                    if let Some(zi) = &zero_inflation {
                        params.push(zi.output().input());
                    }
                }
                LikelihoodKind::Gaussian => {
                    params.push(main.output().input());
                    params.push(p.get(self.heads.shared_slot()));
                }
                LikelihoodKind::Bernoulli => params.push(main.output().input()),
                LikelihoodKind::NbMixture => unreachable!("the NB mixture returned above"),
            }
            let mut outs: Vec<Out<'_, Buf<T, B>>> =
                dparams.iter_mut().map(|t| t.output()).collect();
            b.likelihood(
                family,
                x.input(),
                g,
                &params,
                Some(In::all(&ll_weights)),
                Out::all(&mut ll),
                &mut outs,
            )?;
        }
        let reconstruction = reconstruction(&ll)?;
        let acts = DecoderActs {
            cov,
            batch_onehot,
            library,
            hidden,
            main,
            zero_inflation,
            dispersion,
            proportions,
            log_theta_cells,
            theta,
            dparams,
            mixture: None,
        };
        Ok((reconstruction, acts))
    }

    /// The NB mixture's log background table (batches × features), if this decoder has one.
    pub fn background_slot(&self) -> Option<usize> {
        self.heads.background
    }

    /// The background log rate of each cell's batch: onehot × log_background.
    fn log_background<T: Real, B: Backend<T>>(
        &self,
        b: &B,
        p: &Weights<'_, Buf<T, B>>,
        onehot: &Tensor<Buf<T, B>>,
    ) -> Result<Tensor<Buf<T, B>>> {
        let (n, g) = (onehot.rows, self.spec.n_features);
        let mut log_back = b.tensor(n, g)?;
        b.gemm(
            false,
            false,
            n,
            onehot.cols,
            g,
            T::one(),
            onehot.input(),
            p.get(self.heads.background.expect("the mixture's background")),
            T::zero(),
            log_back.output(),
        )?;
        Ok(log_back)
    }

    /// totalVI's NB mixture: log p(x_r) per row into `ll` and the values its backward needs,
    /// gradients weighted by `negative` (−w_r per row); `s` is the main head's output (the
    /// foreground's log-scale logit).
    #[allow(clippy::too_many_arguments)] // the pass's inputs, saved activations and the views it writes
    fn mixture_forward<T: Real, B: Backend<T>>(
        &self,
        b: &B,
        p: &Weights<'_, Buf<T, B>>,
        state: &mut Slots<'_, Buf<T, B>>,
        h: &Input<'_, Buf<T, B>, B::Csr>,
        s: &Tensor<Buf<T, B>>,
        x: &Tensor<Buf<T, B>>,
        onehot: Option<&Tensor<Buf<T, B>>>,
        negative: &Buf<T, B>,
        ll: &mut Buf<T, B>,
        mode: Mode,
    ) -> Result<MixtureActs<Buf<T, B>>> {
        let (n, g) = (s.rows, self.spec.n_features);
        let log_back =
            self.log_background(b, p, onehot.expect("the mixture reads the batch one-hot"))?;
        let mut log_scale = b.tensor(n, g)?;
        b.activation_forward(Activation::Softplus, s.input(), log_scale.output())?;
        let mut log_fore = b.tensor(n, g)?;
        b.copy(log_back.input(), log_fore.output())?;
        b.axpy(T::one(), log_scale.input(), log_fore.output())?;
        let (mut back, mut fore) = (b.tensor(n, g)?, b.tensor(n, g)?);
        b.activation_forward(Activation::Exp, log_back.input(), back.output())?;
        b.activation_forward(Activation::Exp, log_fore.input(), fore.output())?;
        let mut theta = b.tensor(1, g)?;
        b.activation_forward(
            Activation::Exp,
            p.get(self.heads.shared_slot()),
            theta.output(),
        )?;
        let mut theta_cells = b.tensor(n, g)?;
        b.gather_rows(theta.input(), &vec![0; n], g, theta_cells.output())?;
        let mixing = self
            .heads
            .mixing
            .as_ref()
            .expect("the mixture's mixing head")
            .forward(b, p, state, h, None, mode)?;
        let mut raw: Vec<Tensor<Buf<T, B>>> =
            (0..4).map(|_| b.tensor(n, g)).collect::<Result<_>>()?;
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
                let mut out = b.tensor(n, g)?;
                b.scale_rows(t.input(), In::all(negative), out.output())?;
                Ok(out)
            })
            .collect::<Result<_>>()?;
        let Ok(grads) = <[Tensor<Buf<T, B>>; 4]>::try_from(weighted) else {
            unreachable!("four gradients")
        };
        Ok(MixtureActs {
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

    /// The NB mixture's backward to its head inputs and parameters; dL/dh is written to `dh`.
    #[allow(clippy::too_many_arguments)] // the pass's inputs, saved activations and the views it writes
    fn mixture_backward<T: Real, B: Backend<T>>(
        &self,
        b: &B,
        p: &Weights<'_, Buf<T, B>>,
        grads: &mut Slots<'_, Buf<T, B>>,
        h: &Input<'_, Buf<T, B>, B::Csr>,
        main: &DenseActs<Buf<T, B>>,
        onehot: &Tensor<Buf<T, B>>,
        m: MixtureActs<Buf<T, B>>,
        mode: Mode,
        dh: &mut Tensor<Buf<T, B>>,
    ) -> Result<()> {
        let (n, g) = (onehot.rows, self.spec.n_features);
        let MixtureActs {
            mixing,
            log_back,
            log_scale,
            log_fore,
            back,
            fore,
            theta,
            grads: [d_back, d_fore, d_theta, d_pi],
        } = m;
        let mut dlog_fore = b.tensor(n, g)?;
        b.activation_backward(
            Activation::Exp,
            log_fore.input(),
            fore.input(),
            d_fore.input(),
            dlog_fore.output(),
        )?;
        let mut ds = b.tensor(n, g)?;
        b.activation_backward(
            Activation::Softplus,
            main.output().input(),
            log_scale.input(),
            dlog_fore.input(),
            ds.output(),
        )?;
        self.heads
            .main
            .backward(b, p, grads, h, None, main, ds, mode, InputGrad::Write(dh))?;
        let mut dlog_back = b.tensor(n, g)?;
        b.activation_backward(
            Activation::Exp,
            log_back.input(),
            back.input(),
            d_back.input(),
            dlog_back.output(),
        )?;
        b.axpy(T::one(), dlog_fore.input(), dlog_back.output())?;
        b.gemm(
            true,
            false,
            onehot.cols,
            n,
            g,
            T::one(),
            onehot.input(),
            dlog_back.input(),
            T::zero(),
            grads.get(self.heads.background.expect("the mixture's background")),
        )?;
        let mut dtheta = b.tensor(1, g)?;
        b.column_sums(d_theta.input(), dtheta.output())?;
        b.activation_backward(
            Activation::Exp,
            p.get(self.heads.shared_slot()),
            theta.input(),
            dtheta.input(),
            grads.get(self.heads.shared_slot()),
        )?;
        self.heads
            .mixing
            .as_ref()
            .expect("the mixture's mixing head")
            .backward(
                b,
                p,
                grads,
                h,
                None,
                &mixing,
                d_pi,
                mode,
                InputGrad::Add(dh),
            )
    }

    /// The covariates on the device, and their batch block alone where a gene-batch
    /// dispersion reads it (the rows of its table).
    #[allow(clippy::type_complexity)] // views returned together to one caller; a named type would be used once
    fn covariates<T: Real, B: Backend<T>>(
        &self,
        b: &B,
        covariates: &[T],
        n: usize,
    ) -> Result<(Tensor<Buf<T, B>>, Option<Tensor<Buf<T, B>>>)> {
        assert_eq!(
            covariates.len(),
            n * self.n_cov,
            "covariates: {n} rows of {}",
            self.n_cov
        );
        let cov = Tensor {
            buf: b.upload(covariates)?,
            rows: n,
            cols: self.n_cov,
        };
        let per_batch = self.spec.likelihood.has_dispersion()
            && self.spec.dispersion == Dispersion::GeneBatch
            || self.spec.likelihood == LikelihoodKind::NbMixture;
        let onehot = if per_batch {
            // Without a batch covariate every cell is in the table's one row.
            let host: Vec<T> = if self.n_batch == 0 {
                vec![T::one(); n]
            } else {
                covariates
                    .chunks(self.n_cov.max(1))
                    .flat_map(|row| row[..self.n_batch].to_vec())
                    .collect()
            };
            Some(Tensor {
                buf: b.upload(&host)?,
                rows: n,
                cols: self.n_batch.max(1),
            })
        } else {
            None
        };
        Ok((cov, onehot))
    }

    /// Parameter gradients, and the gradient of the loss with respect to `z`.
    pub fn backward<T: Real, B: Backend<T>>(
        &self,
        b: &B,
        p: &Weights<'_, Buf<T, B>>,
        grads: &mut Slots<'_, Buf<T, B>>,
        z: &Tensor<Buf<T, B>>,
        mut f: DecoderActs<Buf<T, B>>,
        mode: Mode,
    ) -> Result<Tensor<Buf<T, B>>> {
        // Owned, so a head's backward consumes its upstream gradient without a copy.
        let mut dparams: Vec<Option<Tensor<Buf<T, B>>>> = std::mem::take(&mut f.dparams)
            .into_iter()
            .map(Some)
            .collect();
        let mut take = |k: usize| {
            dparams[k]
                .take()
                .expect("one gradient per likelihood parameter, each used once")
        };
        let (n, g, kind) = (z.rows, self.spec.n_features, self.spec.likelihood);
        let hd = Input::Dense(Mlp::output(&f.hidden));
        let mut dhd = b.tensor(n, self.n_hidden)?;
        let heads = &self.heads;
        if let Some(mixture) = f.mixture.take() {
            let onehot = f
                .batch_onehot
                .as_ref()
                .expect("the mixture reads the batch one-hot");
            self.mixture_backward(b, p, grads, &hd, &f.main, onehot, mixture, mode, &mut dhd)?;
            let mut dz = b.tensor(n, z.cols)?;
            self.hidden.backward(
                b,
                p,
                grads,
                &Input::Dense(z),
                Some(&f.cov),
                &f.hidden,
                dhd,
                mode,
                InputGrad::Write(&mut dz),
            )?;
            return Ok(dz);
        }

        // Main head: through μ = library · softmax(s) for the count likelihoods (the fused NB
        // term gave the logits' gradient already).
        let dmain = if let Some(proportions) = &f.proportions {
            let mut drho = b.tensor(n, g)?;
            b.scale_rows(take(0).input(), f.library.input(), drho.output())?;
            let mut ds = b.tensor(n, g)?;
            b.softmax_backward(proportions.input(), drho.input(), g, ds.output())?;
            ds
        } else {
            take(0)
        };
        heads.main.backward(
            b,
            p,
            grads,
            &hd,
            None,
            &f.main,
            dmain,
            mode,
            InputGrad::Write(&mut dhd),
        )?;

        // θ = exp(log θ): dlog θ = θ ⊙ dθ, reduced to where log θ lives.
        if let Some(theta) = &f.theta {
            let dtheta = take(1);
            let log_theta = heads.log_theta(
                self.spec.dispersion,
                p,
                f.log_theta_cells.as_ref(),
                f.dispersion.as_ref(),
            );
            match self.spec.dispersion {
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
                        grads.get(heads.shared_slot()),
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
                    let onehot = f
                        .batch_onehot
                        .as_ref()
                        .expect("gene-batch dispersion has the batch one-hot");
                    b.gemm(
                        true,
                        false,
                        onehot.cols,
                        n,
                        g,
                        T::one(),
                        onehot.input(),
                        dlog.input(),
                        T::zero(),
                        grads.get(heads.shared_slot()),
                    )?;
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
                    let head = heads.dispersion_head.as_ref().expect("gene-cell head");
                    head.backward(
                        b,
                        p,
                        grads,
                        &hd,
                        None,
                        f.dispersion.as_ref().expect("head acts"),
                        dlog,
                        mode,
                        InputGrad::Add(&mut dhd),
                    )?;
                }
            }
        }
        if let (Some(head), Some(acts)) = (&heads.zero_inflation, &f.zero_inflation) {
            head.backward(
                b,
                p,
                grads,
                &hd,
                None,
                acts,
                take(2),
                mode,
                InputGrad::Add(&mut dhd),
            )?;
        }
        if kind == LikelihoodKind::Gaussian {
            b.column_sums(take(1).input(), grads.get(heads.shared_slot()))?;
        }

        let mut dz = b.tensor(n, z.cols)?;
        self.hidden.backward(
            b,
            p,
            grads,
            &Input::Dense(z),
            Some(&f.cov),
            &f.hidden,
            dhd,
            mode,
            InputGrad::Write(&mut dz),
        )?;
        Ok(dz)
    }

    /// Whether the cycle-consistency pass can re-encode this modality's expected expression
    /// (a Gaussian's mean has no log1p).
    pub fn cycles(&self) -> bool {
        self.spec.likelihood != LikelihoodKind::Gaussian
    }

    /// The expected expression at `z`, as log(1 + x̂) (the encoder's input space), with what
    /// its backward needs: NB/ZINB/Poisson at `library` counts per cell, Bernoulli
    /// probabilities, the NB mixture's expected foreground.
    #[allow(clippy::too_many_arguments, clippy::type_complexity)] // the pass's inputs, saved activations and the views it writes
    pub fn cycle_forward<T: Real, B: Backend<T>>(
        &self,
        b: &B,
        p: &Weights<'_, Buf<T, B>>,
        state: &mut Slots<'_, Buf<T, B>>,
        z: &Tensor<Buf<T, B>>,
        covariates: &[T],
        library: f64,
        mode: Mode,
    ) -> Result<(Tensor<Buf<T, B>>, CycleActs<Buf<T, B>>)> {
        let (n, g, kind) = (z.rows, self.spec.n_features, self.spec.likelihood);
        assert!(
            self.cycles(),
            "decoder {:?}: no log1p expression",
            self.spec.name
        );
        let (cov, onehot) = self.covariates(b, covariates, n)?;
        let hidden = self
            .hidden
            .forward(b, p, state, &Input::Dense(z), Some(&cov), mode)?;
        let h = Input::Dense(Mlp::output(&hidden));
        let main = self.heads.main.forward(b, p, state, &h, None, mode)?;
        let (mut mixing, mut softmax, mut softplus) = (None, None, None);
        let mut expected = b.tensor(n, g)?;
        let mut log1p = b.tensor(n, g)?;
        match kind {
            LikelihoodKind::NbMixture => {
                // log x̂ = log_back + softplus(s) − softplus(π); log(1 + x̂) = softplus(log x̂).
                let mut lx = self.log_background(
                    b,
                    p,
                    onehot
                        .as_ref()
                        .expect("the mixture reads the batch one-hot"),
                )?;
                let (mut sp_s, mut sp_pi) = (b.tensor(n, g)?, b.tensor(n, g)?);
                b.activation_forward(Activation::Softplus, main.output().input(), sp_s.output())?;
                b.axpy(T::one(), sp_s.input(), lx.output())?;
                let pi = self
                    .heads
                    .mixing
                    .as_ref()
                    .expect("the mixture's mixing head")
                    .forward(b, p, state, &h, None, mode)?;
                b.activation_forward(Activation::Softplus, pi.output().input(), sp_pi.output())?;
                b.axpy(T::zero() - T::one(), sp_pi.input(), lx.output())?;
                b.activation_forward(Activation::Softplus, lx.input(), log1p.output())?;
                expected = lx;
                mixing = Some(pi);
                softplus = Some((sp_s, sp_pi));
            }
            LikelihoodKind::Bernoulli => {
                b.activation_forward(
                    Activation::Sigmoid,
                    main.output().input(),
                    expected.output(),
                )?;
                b.activation_forward(Activation::Log1p, expected.input(), log1p.output())?;
            }
            _ => {
                let mut rho = b.tensor(n, g)?;
                b.softmax_forward(main.output().input(), g, rho.output())?;
                b.scale_rows(
                    rho.input(),
                    In::all(&b.upload(&vec![T::of(library); n])?),
                    expected.output(),
                )?;
                b.activation_forward(Activation::Log1p, expected.input(), log1p.output())?;
                softmax = Some(rho);
            }
        }
        let out = copy_of(b, &log1p)?;
        Ok((
            out,
            CycleActs {
                cov,
                onehot,
                hidden,
                main,
                mixing,
                softmax,
                softplus,
                expected,
                log1p,
                library,
            },
        ))
    }

    /// The cycle pass' gradients: parameters (overwritten), and d/dz from d/d log(1 + x̂).
    #[allow(clippy::too_many_arguments)] // the pass's inputs, saved activations and the views it writes
    pub fn cycle_backward<T: Real, B: Backend<T>>(
        &self,
        b: &B,
        p: &Weights<'_, Buf<T, B>>,
        grads: &mut Slots<'_, Buf<T, B>>,
        z: &Tensor<Buf<T, B>>,
        a: CycleActs<Buf<T, B>>,
        dlog1p: Tensor<Buf<T, B>>,
        mode: Mode,
    ) -> Result<Tensor<Buf<T, B>>> {
        let (n, g) = (z.rows, self.spec.n_features);
        let h = Input::Dense(Mlp::output(&a.hidden));
        let mut dh = b.tensor(n, self.n_hidden)?;
        // The gradient w.r.t. x̂ (for the mixture: w.r.t. log x̂).
        let mut dexpected = b.tensor(n, g)?;
        let inner = if self.spec.likelihood == LikelihoodKind::NbMixture {
            Activation::Softplus
        } else {
            Activation::Log1p
        };
        b.activation_backward(
            inner,
            a.expected.input(),
            a.log1p.input(),
            dlog1p.input(),
            dexpected.output(),
        )?;
        match self.spec.likelihood {
            LikelihoodKind::NbMixture => {
                let (sp_s, sp_pi) = a
                    .softplus
                    .as_ref()
                    .expect("the mixture keeps its softplus terms");
                let mut ds = b.tensor(n, g)?;
                b.activation_backward(
                    Activation::Softplus,
                    a.main.output().input(),
                    sp_s.input(),
                    dexpected.input(),
                    ds.output(),
                )?;
                self.heads.main.backward(
                    b,
                    p,
                    grads,
                    &h,
                    None,
                    &a.main,
                    ds,
                    mode,
                    InputGrad::Write(&mut dh),
                )?;
                let mixing = a.mixing.as_ref().expect("the mixture's mixing head");
                let mut dpi = b.tensor(n, g)?;
                b.activation_backward(
                    Activation::Softplus,
                    mixing.output().input(),
                    sp_pi.input(),
                    dexpected.input(),
                    dpi.output(),
                )?;
                b.scale(dpi.output(), T::zero() - T::one())?;
                self.heads
                    .mixing
                    .as_ref()
                    .expect("the mixture's mixing head")
                    .backward(
                        b,
                        p,
                        grads,
                        &h,
                        None,
                        mixing,
                        dpi,
                        mode,
                        InputGrad::Add(&mut dh),
                    )?;
                let onehot = a
                    .onehot
                    .as_ref()
                    .expect("the mixture reads the batch one-hot");
                b.gemm(
                    true,
                    false,
                    onehot.cols,
                    n,
                    g,
                    T::one(),
                    onehot.input(),
                    dexpected.input(),
                    T::zero(),
                    grads.get(self.heads.background.expect("the mixture's background")),
                )?;
            }
            LikelihoodKind::Bernoulli => {
                let mut ds = b.tensor(n, g)?;
                b.activation_backward(
                    Activation::Sigmoid,
                    a.main.output().input(),
                    a.expected.input(),
                    dexpected.input(),
                    ds.output(),
                )?;
                self.heads.main.backward(
                    b,
                    p,
                    grads,
                    &h,
                    None,
                    &a.main,
                    ds,
                    mode,
                    InputGrad::Write(&mut dh),
                )?;
            }
            _ => {
                b.scale(dexpected.output(), T::of(a.library))?;
                let mut ds = b.tensor(n, g)?;
                b.softmax_backward(
                    a.softmax
                        .as_ref()
                        .expect("library-scaled expression keeps its softmax")
                        .input(),
                    dexpected.input(),
                    g,
                    ds.output(),
                )?;
                self.heads.main.backward(
                    b,
                    p,
                    grads,
                    &h,
                    None,
                    &a.main,
                    ds,
                    mode,
                    InputGrad::Write(&mut dh),
                )?;
            }
        }
        let mut dz = b.tensor(n, z.cols)?;
        self.hidden.backward(
            b,
            p,
            grads,
            &Input::Dense(z),
            Some(&a.cov),
            &a.hidden,
            dh,
            mode,
            InputGrad::Write(&mut dz),
        )?;
        Ok(dz)
    }

    /// The decoder's expression at `z` (evaluation mode): for NB/ZINB/Poisson the proportions
    /// × `library_size` (scvi-tools' `get_normalized_expression`), Gaussian means, Bernoulli
    /// probabilities, the NB mixture's expected foreground counts σ(−π) μ_fore (totalVI's
    /// protein expression without background).
    pub fn expression<T: Real, B: Backend<T>>(
        &self,
        b: &B,
        p: &Weights<'_, Buf<T, B>>,
        state: &mut Slots<'_, Buf<T, B>>,
        z: &Tensor<Buf<T, B>>,
        covariates: &[T],
        library_size: f64,
    ) -> Result<Tensor<Buf<T, B>>> {
        let (n, g) = (z.rows, self.spec.n_features);
        let (cov, onehot) = self.covariates(b, covariates, n)?;
        let hidden = self
            .hidden
            .forward(b, p, state, &Input::Dense(z), Some(&cov), Mode::Eval)?;
        let h = Input::Dense(Mlp::output(&hidden));
        let main = self.heads.main.forward(b, p, state, &h, None, Mode::Eval)?;
        let mut expression = b.tensor(n, g)?;
        if let (Some(mixing), Some(onehot)) = (&self.heads.mixing, &onehot) {
            // log(σ(−π) μ_fore) = log_back + softplus(s) − softplus(π).
            let mut log_fore = self.log_background(b, p, onehot)?;
            let mut term = b.tensor(n, g)?;
            b.activation_forward(Activation::Softplus, main.output().input(), term.output())?;
            b.axpy(T::one(), term.input(), log_fore.output())?;
            let pi = mixing.forward(b, p, state, &h, None, Mode::Eval)?;
            b.activation_forward(Activation::Softplus, pi.output().input(), term.output())?;
            b.axpy(T::zero() - T::one(), term.input(), log_fore.output())?;
            b.activation_forward(Activation::Exp, log_fore.input(), expression.output())?;
            return Ok(expression);
        }
        match self.spec.likelihood {
            kind if kind.scaled_by_library() => {
                b.softmax_forward(main.output().input(), g, expression.output())?;
                b.scale(expression.output(), T::of(library_size))?;
            }
            LikelihoodKind::Bernoulli => b.activation_forward(
                Activation::Sigmoid,
                main.output().input(),
                expression.output(),
            )?,
            _ => b.activation_forward(
                Activation::Identity,
                main.output().input(),
                expression.output(),
            )?,
        }
        Ok(expression)
    }
}
