//! The single-modality VAE (scVI): counts → encoder (log1p fused into the sparse first layer,
//! optional covariates) → q(z|x) = N(m, exp(lv)) → z → decoder (covariates injected) →
//! likelihood parameters → −log p(x|z) + β KL(q(z|x) || N(0, I)), averaged over cells.
//!
//! Forward and backward are explicit, layer by layer; the likelihood op returns its gradients
//! with its value, so the backward starts from them. Gradients land in one flat buffer with the
//! parameters' layout (the all-reduce unit).

use rand::SeedableRng;
use rand_xoshiro::Xoshiro256PlusPlus;
use serde::{Deserialize, Serialize};
use tessera_kernels::backend::{Backend, In, Out, Result, Tensor};
use tessera_kernels::ops::elementwise::Activation;
use tessera_kernels::ops::likelihood::Likelihood;
use tessera_kernels::ops::linear::{CountTransform, CsrRef};
use tessera_kernels::params::Layout;
use tessera_kernels::Real;

use crate::layers::{Dense, DenseActs, DenseSpec, Input, InputGrad, Mlp, MlpSpec, Mode, Slots, Weights};

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
    /// Bernoulli: logits from the decoder (binarised accessibility).
    Bernoulli,
}

impl LikelihoodKind {
    fn family(self) -> Likelihood {
        match self {
            LikelihoodKind::Nb => Likelihood::NegativeBinomial,
            LikelihoodKind::Zinb => Likelihood::ZeroInflatedNegativeBinomial,
            LikelihoodKind::Poisson => Likelihood::Poisson,
            LikelihoodKind::Gaussian => Likelihood::Gaussian,
            LikelihoodKind::Bernoulli => Likelihood::Bernoulli,
        }
    }

    fn has_dispersion(self) -> bool {
        matches!(self, LikelihoodKind::Nb | LikelihoodKind::Zinb)
    }

    fn scaled_by_library(self) -> bool {
        matches!(self, LikelihoodKind::Nb | LikelihoodKind::Zinb | LikelihoodKind::Poisson)
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

/// The architecture; defaults are scvi-tools' `SCVI` defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VaeConfig {
    pub n_hidden: usize,
    pub n_latent: usize,
    pub n_layers: usize,
    /// Encoder dropout (the decoder has none, as in scvi-tools).
    pub dropout: f32,
    pub likelihood: LikelihoodKind,
    pub dispersion: Dispersion,
    pub batch_norm: bool,
    /// Give the encoder the covariates too (scvi-tools' `encode_covariates`).
    pub encode_covariates: bool,
    /// Inject covariates into every decoder layer, not only the first.
    pub deeply_inject_covariates: bool,
}

impl Default for VaeConfig {
    fn default() -> Self {
        VaeConfig { n_hidden: 128, n_latent: 10, n_layers: 1, dropout: 0.1, likelihood: LikelihoodKind::Nb, dispersion: Dispersion::Gene, batch_norm: true, encode_covariates: false, deeply_inject_covariates: false }
    }
}

/// One minibatch as the model takes it, on the host.
#[derive(Debug, Clone, Copy)]
pub struct VaeBatch<'a, T> {
    pub counts: CsrRef<'a, T>,
    /// rows × n_cov one-hot covariates (batch first), row-major.
    pub covariates: &'a [T],
}

/// Loss terms averaged over the cells of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct LossTerms {
    /// −log p(x|z), mean over cells.
    pub reconstruction: f64,
    /// KL(q(z|x) || p(z)), mean over cells.
    pub kl: f64,
    /// reconstruction + kl_weight × kl: the minimised objective.
    pub loss: f64,
    pub cells: usize,
}

impl LossTerms {
    /// The negative ELBO (reconstruction + unweighted KL): what early stopping watches, as
    /// scvi-tools' `elbo_validation`. The weighted `loss` rises with the KL warm-up, so it would
    /// stop training while the weight is still growing.
    pub fn negative_elbo(&self) -> f64 {
        self.reconstruction + self.kl
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
    /// Gene (features) or GeneBatch (n_batch × features) log θ, or the Gaussian log-variances.
    shared: Option<usize>,
}

impl Heads {
    fn shared_slot(&self) -> usize {
        self.shared.expect("this likelihood has a shared parameter")
    }

    /// Where log θ lives: the parameter (gene), the batch one-hot times the table (gene-batch,
    /// computed per batch), or the dispersion head's output (gene-cell).
    fn log_theta<'a, S: tessera_kernels::backend::Storage>(&self, dispersion: Dispersion, p: &Weights<'a, S>, per_cell: Option<&'a Tensor<S>>, head: Option<&'a DenseActs<S>>) -> In<'a, S> {
        match dispersion {
            Dispersion::Gene => p.get(self.shared_slot()),
            Dispersion::GeneBatch => per_cell.expect("gene-batch log θ is computed per batch").input(),
            Dispersion::GeneCell => head.expect("gene-cell dispersion has a head").output().input(),
        }
    }
}

/// An scVI-style VAE over a backend.
#[derive(Debug)]
pub struct Vae<T: Real, B: Backend<T>> {
    pub config: VaeConfig,
    pub n_features: usize,
    /// Width of the one-hot covariates.
    pub n_cov: usize,
    /// Categories of the first covariate (batch): the rows of a gene-batch dispersion.
    pub n_batch: usize,
    pub layout: Layout,
    pub state_layout: Layout,
    pub values: B::Buf,
    pub grads: B::Buf,
    /// BatchNorm running statistics.
    pub state: B::Buf,
    encoder: Mlp,
    mean: Dense,
    logvar: Dense,
    decoder: Mlp,
    heads: Heads,
    backend: B,
}

/// Random-draw sites (Philox streams within a step): layers take 0.., the latent noise this.
const SITE_LATENT: u64 = 0xF_FFFF;

/// Everything the backward needs from one forward.
struct Forward<S, C> {
    csr: C,
    cov: Tensor<S>,
    batch_onehot: Option<Tensor<S>>,
    library: Tensor<S>,
    enc: Vec<DenseActs<S>>,
    mean: DenseActs<S>,
    logvar: DenseActs<S>,
    eps: Tensor<S>,
    z: Tensor<S>,
    dec: Vec<DenseActs<S>>,
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
    dm_kl: Tensor<S>,
    dlv_kl: Tensor<S>,
}

impl<T: Real, B: Backend<T>> Vae<T, B> {
    /// A freshly initialised model for `n_features` features and `n_cov` covariate columns (the
    /// first `n_batch` of them the batch one-hot).
    pub fn new(backend: B, config: VaeConfig, n_features: usize, n_batch: usize, n_cov: usize, seed: u64) -> Result<Self> {
        assert!(n_features > 0 && config.n_layers > 0 && config.n_hidden > 0 && config.n_latent > 0, "model sizes must be positive");
        assert!(n_batch <= n_cov, "the batch one-hot is part of the covariates");
        let (mut layout, mut state) = (Layout::default(), Layout::default());
        let c = &config;
        let encoder = Mlp::register(MlpSpec { d_in: n_features, n_hidden: c.n_hidden, n_layers: c.n_layers, n_cov: if c.encode_covariates { n_cov } else { 0 }, inject_every_layer: false, batch_norm: c.batch_norm, dropout: c.dropout }, "encoder", &mut layout, &mut state, 0);
        let head = |d_in, d_out| DenseSpec { d_in, d_out, n_cov: 0, batch_norm: false, act: Activation::Identity, dropout: 0.0 };
        let mean = Dense::register(head(c.n_hidden, c.n_latent), "encoder.mean", &mut layout, &mut state, 0);
        let logvar = Dense::register(head(c.n_hidden, c.n_latent), "encoder.logvar", &mut layout, &mut state, 0);
        let decoder = Mlp::register(MlpSpec { d_in: c.n_latent, n_hidden: c.n_hidden, n_layers: c.n_layers, n_cov, inject_every_layer: c.deeply_inject_covariates, batch_norm: c.batch_norm, dropout: 0.0 }, "decoder", &mut layout, &mut state, 0);
        let main = Dense::register(head(c.n_hidden, n_features), "decoder.main", &mut layout, &mut state, 0);
        let zero_inflation = (c.likelihood == LikelihoodKind::Zinb).then(|| Dense::register(head(c.n_hidden, n_features), "decoder.zero_inflation", &mut layout, &mut state, 0));
        let dispersion_head = (c.likelihood.has_dispersion() && c.dispersion == Dispersion::GeneCell).then(|| Dense::register(head(c.n_hidden, n_features), "decoder.log_theta", &mut layout, &mut state, 0));
        let shared = match (c.likelihood, c.dispersion) {
            (LikelihoodKind::Nb | LikelihoodKind::Zinb, Dispersion::Gene) => Some(layout.add("log_theta", &[n_features])),
            (LikelihoodKind::Nb | LikelihoodKind::Zinb, Dispersion::GeneBatch) => Some(layout.add("log_theta", &[n_batch.max(1), n_features])),
            (LikelihoodKind::Gaussian, _) => Some(layout.add("log_variance", &[n_features])),
            _ => None,
        };
        let heads = Heads { main, zero_inflation, dispersion_head, shared };

        // Initialise on the host (one seeded stream, registration order), then upload.
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
        let mut values = vec![T::zero(); layout.len()];
        let mut state_values = vec![T::zero(); state.len()];
        encoder.init(&layout, &state, &mut values, &mut state_values, &mut rng);
        for d in [&mean, &logvar] {
            d.init(&layout, &state, &mut values, &mut state_values, &mut rng);
        }
        decoder.init(&layout, &state, &mut values, &mut state_values, &mut rng);
        for d in [Some(&heads.main), heads.zero_inflation.as_ref(), heads.dispersion_head.as_ref()].into_iter().flatten() {
            d.init(&layout, &state, &mut values, &mut state_values, &mut rng);
        }
        // log θ and the Gaussian log-variances start at 0 (θ = 1, σ² = 1) like scvi-tools' px_r
        // (which draws N(0, 1); a constant start is as good and reproducible across backends).
        let values_buf = backend.upload(&values)?;
        let grads = backend.zeros(layout.len())?;
        let state_buf = backend.upload(&state_values)?;
        Ok(Vae { config, n_features, n_cov, n_batch, layout, state_layout: state, values: values_buf, grads, state: state_buf, encoder, mean, logvar, decoder, heads, backend })
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Loss terms of a batch and the gradients of `loss` in `self.grads` (overwritten).
    pub fn loss_and_grad(&mut self, batch: VaeBatch<'_, T>, kl_weight: f64, mode: Mode) -> Result<LossTerms> {
        let (terms, fwd) = self.forward(batch, kl_weight, mode)?;
        self.backward(fwd, mode)?;
        Ok(terms)
    }

    /// Loss terms only (validation: `Mode::Validate`).
    pub fn loss(&mut self, batch: VaeBatch<'_, T>, kl_weight: f64, mode: Mode) -> Result<LossTerms> {
        Ok(self.forward(batch, kl_weight, mode)?.0)
    }

    /// The latent means of a batch (evaluation mode: running statistics, no dropout).
    pub fn latent_mean(&mut self, batch: VaeBatch<'_, T>) -> Result<Vec<T>> {
        let (_, _, enc) = self.encode(batch, Mode::Eval)?;
        let p = Weights { layout: &self.layout, values: &self.values };
        let mut state = Slots { layout: &self.state_layout, buf: &mut self.state };
        let m = self.mean.forward(&self.backend, &p, &mut state, &Input::Dense(Mlp::output(&enc)), None, Mode::Eval)?;
        self.backend.download(m.output().input())
    }

    /// Latent means and the decoder's expression at them, in each cell's own batch: for
    /// NB/ZINB/Poisson the proportions (softmax) × `library_size` (scvi-tools'
    /// `get_normalized_expression`, with z at its posterior mean instead of one sample),
    /// Gaussian means, Bernoulli probabilities. Returns (n × latent, n × features).
    pub fn latent_and_expression(&mut self, batch: VaeBatch<'_, T>, library_size: f64) -> Result<(Vec<T>, Vec<T>)> {
        let (n, g) = (batch.counts.rows, self.n_features);
        let (_, cov, enc) = self.encode(batch, Mode::Eval)?;
        let b = &self.backend;
        let p = Weights { layout: &self.layout, values: &self.values };
        let mut state = Slots { layout: &self.state_layout, buf: &mut self.state };
        let m = self.mean.forward(b, &p, &mut state, &Input::Dense(Mlp::output(&enc)), None, Mode::Eval)?;
        let dec = self.decoder.forward(b, &p, &mut state, &Input::Dense(m.output()), Some(&cov), Mode::Eval)?;
        let main = self.heads.main.forward(b, &p, &mut state, &Input::Dense(Mlp::output(&dec)), None, Mode::Eval)?;
        let mut expression = b.tensor(n, g)?;
        match self.config.likelihood {
            kind if kind.scaled_by_library() => {
                b.softmax_forward(main.output().input(), g, expression.output())?;
                b.scale(expression.output(), T::of(library_size))?;
            }
            LikelihoodKind::Bernoulli => b.activation_forward(Activation::Sigmoid, main.output().input(), expression.output())?,
            _ => b.activation_forward(Activation::Identity, main.output().input(), expression.output())?,
        }
        Ok((b.download(m.output().input())?, b.download(expression.input())?))
    }

    /// Uploads a batch's counts and covariates and runs the encoder's hidden layers.
    #[allow(clippy::type_complexity)]
    fn encode(&mut self, batch: VaeBatch<'_, T>, mode: Mode) -> Result<(B::Csr, Tensor<B::Buf>, Vec<DenseActs<B::Buf>>)> {
        let b = &self.backend;
        let n = batch.counts.rows;
        let csr = b.upload_csr(batch.counts)?;
        let cov = Tensor { buf: b.upload(batch.covariates)?, rows: n, cols: self.n_cov };
        let p = Weights { layout: &self.layout, values: &self.values };
        let mut state = Slots { layout: &self.state_layout, buf: &mut self.state };
        let x = Input::Counts { csr: &csr, transform: CountTransform::Log1p, rows: n };
        let enc = self.encoder.forward(b, &p, &mut state, &x, self.config.encode_covariates.then_some(&cov), mode)?;
        Ok((csr, cov, enc))
    }

    #[allow(clippy::type_complexity)]
    fn forward(&mut self, batch: VaeBatch<'_, T>, kl_weight: f64, mode: Mode) -> Result<(LossTerms, Forward<B::Buf, B::Csr>)> {
        let (n, g, latent) = (batch.counts.rows, self.n_features, self.config.n_latent);
        assert_eq!(batch.counts.cols, g, "batch has {} features, the model {g}", batch.counts.cols);
        assert_eq!(batch.covariates.len(), n * self.n_cov, "covariates: {n} rows of {}", self.n_cov);
        assert!(n > 1 || !matches!(mode, Mode::Train { .. }) || !self.config.batch_norm, "BatchNorm training needs at least two cells");

        // Host-side inputs: library sizes and the dense counts the likelihood reads.
        let mut library = vec![T::zero(); n];
        let mut dense = vec![T::zero(); n * g];
        for r in 0..n {
            for k in batch.counts.indptr[r] as usize..batch.counts.indptr[r + 1] as usize {
                let v = batch.counts.data[k];
                library[r] = library[r] + v;
                dense[r * g + batch.counts.indices[k] as usize] = v;
            }
        }
        let (csr, cov, enc) = self.encode(batch, mode)?;
        let b = &self.backend;
        let x = Tensor { buf: b.upload(&dense)?, rows: n, cols: g };
        let library = Tensor { buf: b.upload(&library)?, rows: n, cols: 1 };
        // The batch block of the covariates, alone: the rows of a gene-batch dispersion table.
        let batch_onehot = if self.config.likelihood.has_dispersion() && self.config.dispersion == Dispersion::GeneBatch {
            let host: Vec<T> = batch.covariates.chunks(self.n_cov.max(1)).flat_map(|row| row[..self.n_batch].to_vec()).collect();
            Some(Tensor { buf: b.upload(&host)?, rows: n, cols: self.n_batch })
        } else {
            None
        };

        let p = Weights { layout: &self.layout, values: &self.values };
        let mut state = Slots { layout: &self.state_layout, buf: &mut self.state };
        let h = Input::Dense(Mlp::output(&enc));
        let mean = self.mean.forward(b, &p, &mut state, &h, None, mode)?;
        let logvar = self.logvar.forward(b, &p, &mut state, &h, None, mode)?;

        let mut eps = b.tensor(n, latent)?;
        if let Mode::Train { seed, step } | Mode::Validate { seed, step } = mode {
            b.normal(seed, Mode::stream(step, SITE_LATENT), eps.output())?;
        }
        let mut z = b.tensor(n, latent)?;
        b.reparameterize_forward(mean.output().input(), logvar.output().input(), eps.input(), z.output())?;

        let inv_n = 1.0 / n as f64;
        let kl_weights = b.upload(&vec![T::of(kl_weight * inv_n); n])?;
        let mut kl = b.zeros(n)?;
        let (mut dm_kl, mut dlv_kl) = (b.tensor(n, latent)?, b.tensor(n, latent)?);
        b.kl_standard_normal(mean.output().input(), logvar.output().input(), latent, Some(In::all(&kl_weights)), Out::all(&mut kl), dm_kl.output(), dlv_kl.output())?;

        let dec = self.decoder.forward(b, &p, &mut state, &Input::Dense(&z), Some(&cov), mode)?;
        let hd = Input::Dense(Mlp::output(&dec));
        let main = self.heads.main.forward(b, &p, &mut state, &hd, None, mode)?;
        let zero_inflation = self.heads.zero_inflation.as_ref().map(|d| d.forward(b, &p, &mut state, &hd, None, mode)).transpose()?;
        let dispersion = self.heads.dispersion_head.as_ref().map(|d| d.forward(b, &p, &mut state, &hd, None, mode)).transpose()?;

        let kind = self.config.likelihood;
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
                b.gemm(false, false, n, self.n_batch, g, T::one(), onehot.input(), p.get(self.heads.shared_slot()), T::zero(), t.output())?;
                Some(t)
            }
            None => None,
        };
        let theta = if kind.has_dispersion() {
            let rows = if self.config.dispersion == Dispersion::Gene { 1 } else { n };
            let mut th = b.tensor(rows, g)?;
            b.activation_forward(Activation::Exp, self.heads.log_theta(self.config.dispersion, &p, log_theta_cells.as_ref(), dispersion.as_ref()), th.output())?;
            Some(th)
        } else {
            None
        };

        let mut ll = b.zeros(n)?;
        let ll_weights = b.upload(&vec![T::of(-inv_n); n])?;
        let family = kind.family();
        let mut dparams: Vec<Tensor<B::Buf>> = (0..family.n_params()).map(|_| b.tensor(n, g)).collect::<Result<_>>()?;
        {
            let mut params: Vec<In<'_, B::Buf>> = Vec::with_capacity(3);
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
            }
            let mut outs: Vec<Out<'_, B::Buf>> = dparams.iter_mut().map(|t| t.output()).collect();
            b.likelihood(family, x.input(), g, &params, Some(In::all(&ll_weights)), Out::all(&mut ll), &mut outs)?;
        }
        let ll_host = b.download(In::all(&ll))?;
        let kl_host = b.download(In::all(&kl))?;
        let reconstruction = -ll_host.iter().map(|v| v.f64()).sum::<f64>() * inv_n;
        let kl_mean = kl_host.iter().map(|v| v.f64()).sum::<f64>() * inv_n;
        let terms = LossTerms { reconstruction, kl: kl_mean, loss: reconstruction + kl_weight * kl_mean, cells: n };
        let fwd = Forward { csr, cov, batch_onehot, library, enc, mean, logvar, eps, z, dec, main, zero_inflation, dispersion, proportions, log_theta_cells, theta, dparams, dm_kl, dlv_kl };
        Ok((terms, fwd))
    }

    fn backward(&mut self, mut f: Forward<B::Buf, B::Csr>, mode: Mode) -> Result<()> {
        // Owned, so a head's backward consumes its upstream gradient without a copy.
        let mut dparams: Vec<Option<Tensor<B::Buf>>> = std::mem::take(&mut f.dparams).into_iter().map(Some).collect();
        let mut take = |k: usize| dparams[k].take().expect("one gradient per likelihood parameter, each used once");
        let b = &self.backend;
        let (n, g, latent) = (f.z.rows, self.n_features, self.config.n_latent);
        let p = Weights { layout: &self.layout, values: &self.values };
        let mut grads = Slots { layout: &self.layout, buf: &mut self.grads };
        let hd = Input::Dense(Mlp::output(&f.dec));
        let mut dhd = b.tensor(n, self.config.n_hidden)?;
        let kind = self.config.likelihood;
        let heads = &self.heads;

        // Main head: through μ = library · softmax(s) for the count likelihoods.
        let dmain = if kind.scaled_by_library() {
            let mut drho = b.tensor(n, g)?;
            b.scale_rows(take(0).input(), f.library.input(), drho.output())?;
            let mut ds = b.tensor(n, g)?;
            b.softmax_backward(f.proportions.as_ref().expect("proportions").input(), drho.input(), g, ds.output())?;
            ds
        } else {
            take(0)
        };
        heads.main.backward(b, &p, &mut grads, &hd, None, &f.main, dmain, mode, InputGrad::Write(&mut dhd))?;

        // θ = exp(log θ): dlog θ = θ ⊙ dθ, reduced to where log θ lives.
        if let Some(theta) = &f.theta {
            let dtheta = take(1);
            let log_theta = heads.log_theta(self.config.dispersion, &p, f.log_theta_cells.as_ref(), f.dispersion.as_ref());
            match self.config.dispersion {
                Dispersion::Gene => {
                    let mut sums = b.tensor(1, g)?;
                    b.column_sums(dtheta.input(), sums.output())?;
                    b.activation_backward(Activation::Exp, log_theta, theta.input(), sums.input(), grads.get(heads.shared_slot()))?;
                }
                Dispersion::GeneBatch => {
                    let mut dlog = b.tensor(n, g)?;
                    b.activation_backward(Activation::Exp, log_theta, theta.input(), dtheta.input(), dlog.output())?;
                    let onehot = f.batch_onehot.as_ref().expect("gene-batch dispersion has the batch one-hot");
                    b.gemm(true, false, self.n_batch, n, g, T::one(), onehot.input(), dlog.input(), T::zero(), grads.get(heads.shared_slot()))?;
                }
                Dispersion::GeneCell => {
                    let mut dlog = b.tensor(n, g)?;
                    b.activation_backward(Activation::Exp, log_theta, theta.input(), dtheta.input(), dlog.output())?;
                    let head = heads.dispersion_head.as_ref().expect("gene-cell head");
                    head.backward(b, &p, &mut grads, &hd, None, f.dispersion.as_ref().expect("head acts"), dlog, mode, InputGrad::Add(&mut dhd))?;
                }
            }
        }
        if let (Some(head), Some(acts)) = (&heads.zero_inflation, &f.zero_inflation) {
            head.backward(b, &p, &mut grads, &hd, None, acts, take(2), mode, InputGrad::Add(&mut dhd))?;
        }
        if kind == LikelihoodKind::Gaussian {
            b.column_sums(take(1).input(), grads.get(heads.shared_slot()))?;
        }

        // Decoder, then the latent: dz from the decoder; dm, dlv from the reparameterisation and KL.
        let mut dz = b.tensor(n, latent)?;
        self.decoder.backward(b, &p, &mut grads, &Input::Dense(&f.z), Some(&f.cov), &f.dec, dhd, mode, InputGrad::Write(&mut dz))?;
        let (mut dm, mut dlv) = (b.tensor(n, latent)?, b.tensor(n, latent)?);
        b.reparameterize_backward(f.logvar.output().input(), f.eps.input(), dz.input(), dm.output(), dlv.output())?;
        b.axpy(T::one(), f.dm_kl.input(), dm.output())?;
        b.axpy(T::one(), f.dlv_kl.input(), dlv.output())?;

        let he = Mlp::output(&f.enc);
        let mut dhe = b.tensor(n, self.config.n_hidden)?;
        self.mean.backward(b, &p, &mut grads, &Input::Dense(he), None, &f.mean, dm, mode, InputGrad::Write(&mut dhe))?;
        self.logvar.backward(b, &p, &mut grads, &Input::Dense(he), None, &f.logvar, dlv, mode, InputGrad::Add(&mut dhe))?;
        let input = Input::Counts { csr: &f.csr, transform: CountTransform::Log1p, rows: n };
        let enc_cov = self.config.encode_covariates.then_some(&f.cov);
        self.encoder.backward(b, &p, &mut grads, &input, enc_cov, &f.enc, dhe, mode, InputGrad::Skip)
    }
}
