//! The VAE family over one or more modalities. Each modality has an encoder (counts → log1p
//! fused into the sparse first layer → q(z | x_m) = N(m_m, exp(lv_m))) and a decoder (z +
//! covariates → likelihood parameters → −log p(x_m | z)). The joint posterior is the product of
//! the experts with the N(0, I) prior expert (PoE), their mixture (MoE, each present expert's
//! sample decodes every present modality, mmVAE-style), or one linear head over the
//! concatenated modality features (concat). One modality is scVI: q(z|x) is its encoder.
//!
//! Missing modalities (mosaic data): each encoder and decoder runs only on the cells that
//! measured its modality, so an absent modality's data never reaches a layer, a BatchNorm
//! statistic or a loss term; the joint posterior masks the absent experts.
//!
//! Forward and backward are explicit; the likelihood op returns its gradients with its value,
//! so the backward starts from them. Gradients land in one flat buffer with the parameters'
//! layout (the all-reduce unit).

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;

use rand::SeedableRng;
use rand_xoshiro::Xoshiro256PlusPlus;
use serde::{Deserialize, Serialize};
use tessera_kernels::Real;
use tessera_kernels::backend::{Backend, In, Labels, Out, Result, Storage, Tensor};
use tessera_kernels::ops::linear::CsrRef;
use tessera_kernels::params::Layout;

use crate::heads::{HeadActs, Heads, HeadsSpec};
pub use crate::heads::{Supervision, Survival};
use crate::layers::{Buf, Mode, Slots, Weights, copy_of};
use crate::modality::{Covariates, CycleActs, Decoder, DecoderActs, Encoder, EncoderActs, Shape};
pub use crate::modality::{Dispersion, LikelihoodKind, ModalitySpec};
use crate::pending::{PendingLoss, Reduce, Share, Term};

/// How the modalities' posteriors combine into q(z | x_1..x_M).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Joint {
    /// Product of experts with the prior expert (precision-weighted; Multigrate, MIDAS, totalVI-like).
    Poe,
    /// Mixture of experts (the mean of the present experts; mmVAE / scMM).
    Moe,
    /// Concatenated modality features into one head: the joint mean (log-variance) is the sum
    /// of each present modality's head output.
    Concat,
}

/// How the posterior is pulled towards the N(0, I) prior.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Prior {
    /// KL(q(z|x) || p(z)) per cell (the ELBO).
    Kl,
    /// MMD between the batch's latent samples and draws from N(0, I) (MMD-VAE / InfoVAE):
    /// matches the aggregate posterior instead of each cell's.
    Mmd,
}

/// Per-modality overrides of the model's likelihood and dispersion.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModalityConfig {
    pub likelihood: Option<LikelihoodKind>,
    pub dispersion: Option<Dispersion>,
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
    /// Floor of the posterior variances: σ² = exp(encoder output) + var_eps (scvi-tools'
    /// `var_eps`); 0 = none.
    pub var_eps: f64,
    /// The likelihood of RNA-like modalities (accessibility defaults to Bernoulli, proteins to
    /// the NB mixture).
    pub likelihood: LikelihoodKind,
    pub dispersion: Dispersion,
    /// BatchNorm in the encoders' and decoders' hidden layers (scvi-tools' `use_batch_norm`
    /// "both"; false: "none").
    pub batch_norm: bool,
    /// LayerNorm without an affine map there too, after BatchNorm where both are on
    /// (scvi-tools' `use_layer_norm` "both"; scArches and MultiVI use it instead of BatchNorm).
    pub layer_norm: bool,
    /// Give the encoder the covariates too (scvi-tools' `encode_covariates`).
    pub encode_covariates: bool,
    /// Inject covariates into every hidden layer of the decoder, and of the encoder when it
    /// sees them, not only the first (scvi-tools' default).
    pub deeply_inject_covariates: bool,
    /// The joint posterior of several modalities.
    pub joint: Joint,
    /// Overrides by modality name (`[model.modalities.protein] likelihood = "nb"`).
    pub modalities: BTreeMap<String, ModalityConfig>,
    /// Weight of the squared MMD between the latent samples of every pair of batches
    /// (Multigrate's integration loss); 0 = off.
    pub mmd_batch_weight: f64,
    /// RBF bandwidths of every MMD term (a sum of kernels over latent distances).
    pub mmd_bandwidths: Vec<f64>,
    /// The prior-matching term: KL, or MMD to N(0, I) draws (MMD-VAE).
    pub prior: Prior,
    /// Weight of the squared MMD of `prior = "mmd"` (the KL warm-up scales it too).
    pub prior_mmd_weight: f64,
    /// Weight of the Jeffreys divergence between the posteriors of every pair of modalities a
    /// cell has (MultiVI); 0 = off.
    pub jeffreys_weight: f64,
    /// Weight of a classifier of batch from the latent samples behind gradient reversal
    /// (DAVAE/MultiVI/GLUE); 0 = off.
    pub adversarial_batch_weight: f64,
    /// λ of the gradient reversal: the encoders receive −λ × the classifier's gradient.
    pub adversarial_reversal: f64,
    /// Weight of the contrastive cosine margin loss on labels, on the latent mean (MOSA).
    pub contrastive_weight: f64,
    /// Different labels are pushed below this cosine similarity.
    pub contrastive_margin: f64,
    /// Weight of the label classifier's cross-entropy on the latent mean (cells with a label).
    pub classifier_weight: f64,
    /// Numeric obs columns predicted from the latent mean (masked squared error).
    pub regression_keys: Vec<String>,
    pub regression_weight: f64,
    /// Survival time and event (observed = true / 1) obs columns of a Cox head on the latent
    /// mean.
    pub survival_time_key: Option<String>,
    pub survival_event_key: Option<String>,
    pub cox_weight: f64,
    /// Weight of cross-modal cycle consistency (scMVP/con-AAE): each modality's expected
    /// expression at the latent samples, re-encoded by that modality's encoder, should give
    /// back the sample (squared distance of the means); several modalities only.
    pub cycle_weight: f64,
}

impl Default for VaeConfig {
    fn default() -> Self {
        VaeConfig {
            n_hidden: 128,
            n_latent: 10,
            n_layers: 1,
            dropout: 0.1,
            var_eps: 1e-4,
            likelihood: LikelihoodKind::Nb,
            dispersion: Dispersion::Gene,
            batch_norm: true,
            layer_norm: false,
            encode_covariates: false,
            deeply_inject_covariates: true,
            joint: Joint::Poe,
            modalities: BTreeMap::new(),
            mmd_batch_weight: 0.0,
            mmd_bandwidths: vec![0.5, 1.0, 2.0, 5.0, 10.0],
            prior: Prior::Kl,
            prior_mmd_weight: 100.0,
            jeffreys_weight: 0.0,
            adversarial_batch_weight: 0.0,
            adversarial_reversal: 1.0,
            contrastive_weight: 0.0,
            contrastive_margin: 0.0,
            classifier_weight: 0.0,
            regression_keys: Vec::new(),
            regression_weight: 0.0,
            survival_time_key: None,
            survival_event_key: None,
            cox_weight: 0.0,
            cycle_weight: 0.0,
        }
    }
}

/// Modality names whose data is binary accessibility by default.
const ACCESSIBILITY: [&str; 4] = ["atac", "peaks", "chromatin", "accessibility"];
/// Modality names whose data is surface-protein counts (CITE-seq ADT): totalVI's NB mixture.
const PROTEIN: [&str; 2] = ["prot", "adt"];

impl VaeConfig {
    /// The observation model of modality `name`: its override, else Bernoulli for
    /// accessibility, the NB mixture for proteins, else the model's likelihood and dispersion.
    pub fn modality(&self, name: &str, n_features: usize) -> ModalitySpec {
        let o = self.modalities.get(name).cloned().unwrap_or_default();
        let lower = name.to_ascii_lowercase();
        let default = if ACCESSIBILITY.iter().any(|a| lower.contains(a)) {
            LikelihoodKind::Bernoulli
        } else if PROTEIN.iter().any(|a| lower.contains(a)) {
            LikelihoodKind::NbMixture
        } else {
            self.likelihood
        };
        ModalitySpec {
            name: name.to_string(),
            n_features,
            likelihood: o.likelihood.unwrap_or(default),
            dispersion: o.dispersion.unwrap_or(self.dispersion),
        }
    }
}

/// One modality of a minibatch: counts for every cell of the batch (rows of absent cells are
/// ignored) and which cells were measured (`None`: all).
#[derive(Debug, Clone, Copy)]
pub struct ModalityCounts<'a, T> {
    pub counts: CsrRef<'a, T>,
    pub present: Option<&'a [bool]>,
}

/// One minibatch as the model takes it, on the host.
#[derive(Debug, Clone, Copy)]
pub struct VaeBatch<'a, T> {
    /// In the model's modality order.
    pub modalities: &'a [ModalityCounts<'a, T>],
    /// rows × n_cov one-hot covariates (batch first), row-major.
    pub covariates: &'a [T],
    /// Labels and targets of the supervised heads (absent: every cell unlabelled).
    pub supervision: Supervision<'a>,
}

/// What of a batch a stager already put on the device while the previous step computed: count
/// matrices in the model's modality order (None, or past the end: uploaded by the step), the
/// covariates (None: uploaded by each pass that reads them) and the label codes as f32 (None:
/// the classifier uploads the batch's own).
#[derive(Debug)]
pub struct OnDevice<Csr, Buf> {
    pub counts: Vec<Option<Csr>>,
    pub covariates: Option<Buf>,
    pub labels: Option<Buf>,
}

impl<Csr, Buf> Default for OnDevice<Csr, Buf> {
    fn default() -> Self {
        OnDevice {
            counts: Vec::new(),
            covariates: None,
            labels: None,
        }
    }
}

impl<'a, T> VaeBatch<'a, T> {
    /// A batch without supervision.
    pub fn new(modalities: &'a [ModalityCounts<'a, T>], covariates: &'a [T]) -> Self {
        VaeBatch {
            modalities,
            covariates,
            supervision: Supervision::default(),
        }
    }

    pub fn with_supervision(self, supervision: Supervision<'a>) -> Self {
        VaeBatch {
            supervision,
            ..self
        }
    }

    pub fn rows(&self) -> usize {
        self.modalities.first().map_or(0, |m| m.counts.rows)
    }
}

/// Loss terms averaged over the cells of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct LossTerms {
    /// −log p(x|z) summed over the measured modalities, mean over cells.
    pub reconstruction: f64,
    /// The prior-matching term: KL(q(z|x) || p(z)) mean over cells, or for an MMD prior its
    /// weighted squared MMD.
    pub kl: f64,
    /// The weighted regularisers (batch MMD, Jeffreys, adversarial, contrastive), per batch.
    #[serde(default)]
    pub regularization: f64,
    /// The weighted supervised heads' losses (classifier, regression, Cox).
    #[serde(default)]
    pub supervised: f64,
    /// reconstruction + kl_weight × kl + regularization + supervised: the minimised objective.
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

/// A VAE over one or more modalities, on a backend.
#[derive(Debug)]
pub struct Vae<T: Real, B: Backend<T>> {
    pub config: VaeConfig,
    pub modalities: Vec<ModalitySpec>,
    /// Width of the one-hot covariates.
    pub n_cov: usize,
    /// Categories of the first covariate (batch): the rows of a gene-batch dispersion.
    pub n_batch: usize,
    /// Label categories of the classifier (0: no labels).
    pub n_labels: usize,
    pub layout: Layout,
    pub state_layout: Layout,
    pub(crate) values: B::Buf,
    pub(crate) grads: B::Buf,
    /// BatchNorm running statistics.
    pub(crate) state: B::Buf,
    /// The parameter ranges being trained (sorted, disjoint; `Trainer::freeze_except`): the
    /// backward computes no weight gradient wholly outside them. None: all.
    pub trained: Option<Vec<std::ops::Range<usize>>>,
    encoders: Vec<Encoder>,
    decoders: Vec<Decoder>,
    heads: Heads,
    backend: B,
}

/// The data's categorical sizes a model is built for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Categories {
    /// Batch categories: the first `n_batch` covariate columns are the batch one-hot.
    pub n_batch: usize,
    /// Width of all one-hot covariates (batch first).
    pub n_cov: usize,
    /// Label categories (cell types) for the classifier and contrastive heads.
    pub n_labels: usize,
}

/// Random-draw sites (Philox streams within a step): layers take 0.. (modality m from m × 256),
/// the latent noise this one (and the ones below it, one per expert of a mixture).
const SITE_LATENT: u64 = 0xF_FFFF;
/// The prior draws of an MMD prior (below the mixture's expert sites, above the modalities').
const SITE_PRIOR: u64 = 0xF_FF00;
const SITES_PER_MODALITY: u64 = 256;

/// Which cells of a batch each modality measured.
struct Plan {
    n: usize,
    /// Per modality, the measured cells in ascending order.
    cells: Vec<Vec<usize>>,
    /// Per modality and cell, whether it was measured.
    present: Vec<Vec<bool>>,
    /// Per cell, how many modalities measured it.
    n_present: Vec<usize>,
}

impl Plan {
    /// `min_cells`: a modality measured in fewer cells of the batch (but some) is left out of
    /// it, as if absent: training BatchNorm needs two rows.
    fn new<T>(batch: &VaeBatch<'_, T>, min_cells: usize) -> Plan {
        let n = batch.rows();
        let mut present: Vec<Vec<bool>> = batch
            .modalities
            .iter()
            .map(|m| m.present.map_or_else(|| vec![true; n], <[bool]>::to_vec))
            .collect();
        for p in &mut present {
            if p.iter().filter(|&&x| x).count() < min_cells {
                p.iter_mut().for_each(|x| *x = false);
            }
        }
        let cells = present
            .iter()
            .map(|p| (0..n).filter(|&r| p[r]).collect())
            .collect();
        let n_present = (0..n)
            .map(|r| present.iter().filter(|p| p[r]).count())
            .collect();
        Plan {
            n,
            cells,
            present,
            n_present,
        }
    }
}

fn is_identity(codes: &[usize], n: usize) -> bool {
    codes.len() == n && codes.iter().enumerate().all(|(i, &c)| i == c)
}

/// How many times `cells` repeats `of` whole, in order (a mixture's decoder reads each
/// expert's samples of the same cells); None if it does not.
fn repeats_of(cells: &[usize], of: &[usize]) -> Option<usize> {
    if of.is_empty() || !cells.len().is_multiple_of(of.len()) {
        return None;
    }
    cells
        .chunks(of.len())
        .all(|chunk| chunk == of)
        .then_some(cells.len() / of.len())
}

/// How many times `cells` lists every cell of an `n`-cell batch in order (a mixture's samples,
/// each expert's of every cell); None if it does not.
fn repeats_every_cell(cells: &[usize], n: usize) -> Option<usize> {
    (n > 0 && cells.len().is_multiple_of(n) && cells.chunks(n).all(|c| is_identity(c, n)))
        .then(|| cells.len() / n)
}

/// Codes of rows (-1: none) as a loss reads them: from the host, or made on the device.
enum Codes<Buf> {
    Host(Vec<i32>),
    Device(Buf),
}

impl<Buf: Storage> Codes<Buf> {
    fn labels(&self) -> Labels<'_, Buf> {
        match self {
            Codes::Host(codes) => Labels::Host(codes),
            Codes::Device(codes) => Labels::Device(In::all(codes)),
        }
    }
}

/// `times` copies of `x`, one after another, made on the device.
fn tiled_buf<T: Real, B: Backend<T>>(b: &B, x: &B::Buf, times: usize) -> Result<B::Buf> {
    let n = x.len();
    let mut out = b.output_buf(times * n)?;
    for t in 0..times {
        b.copy(In::all(x), Out::part(&mut out, t * n..(t + 1) * n))?;
    }
    Ok(out)
}

/// Rows of a batch's counts and covariates: borrowed when every row is taken in order, copied
/// otherwise (a subset, or with repeats for a mixture's decoders).
enum Rows<'a, T> {
    All(CsrRef<'a, T>, &'a [T]),
    Selected {
        cols: usize,
        indptr: Vec<u64>,
        indices: Vec<u32>,
        data: Vec<T>,
        covariates: Vec<T>,
    },
}

impl<'a, T: Real> Rows<'a, T> {
    fn select(
        counts: CsrRef<'a, T>,
        covariates: &'a [T],
        n_cov: usize,
        cells: &[usize],
    ) -> Rows<'a, T> {
        if is_identity(cells, counts.rows) {
            return Rows::All(counts, covariates);
        }
        let (mut indptr, mut indices, mut data) = (vec![0u64], Vec::new(), Vec::new());
        let mut cov = Vec::with_capacity(cells.len() * n_cov);
        for &r in cells {
            let span = counts.indptr[r] as usize..counts.indptr[r + 1] as usize;
            indices.extend_from_slice(&counts.indices[span.clone()]);
            data.extend_from_slice(&counts.data[span]);
            indptr.push(data.len() as u64);
            cov.extend_from_slice(&covariates[r * n_cov..(r + 1) * n_cov]);
        }
        Rows::Selected {
            cols: counts.cols,
            indptr,
            indices,
            data,
            covariates: cov,
        }
    }

    fn counts(&self) -> CsrRef<'_, T> {
        match self {
            Rows::All(c, _) => *c,
            Rows::Selected {
                cols,
                indptr,
                indices,
                data,
                ..
            } => CsrRef {
                rows: indptr.len() - 1,
                cols: *cols,
                indptr,
                indices,
                data,
            },
        }
    }

    /// The rows' covariates on the host.
    fn host_covariates(&self) -> &[T] {
        match self {
            Rows::All(_, host) => host,
            Rows::Selected { covariates, .. } => covariates,
        }
    }

    /// The rows' covariates, with `device` (the whole batch's on the device) where these are
    /// all its rows.
    fn covariates<'b, Buf: Storage>(&'b self, device: Option<&'b Buf>) -> Covariates<'b, T, Buf> {
        Covariates {
            host: self.host_covariates(),
            device: device.filter(|_| matches!(self, Rows::All(..))),
        }
    }
}

/// The latent side of one forward.
enum Latent<S> {
    /// One joint posterior (PoE or concat) over every cell, sampled once.
    Joint {
        means: Vec<Tensor<S>>,
        logvars: Vec<Tensor<S>>,
        masks: Option<Vec<S>>,
        m: Tensor<S>,
        lv: Tensor<S>,
        eps: Tensor<S>,
        dm_kl: Tensor<S>,
        dlv_kl: Tensor<S>,
    },
    /// Each expert sampled on its own cells; `zs` stacks the samples (expert e's rows from
    /// `offsets[e]`).
    Mixture {
        eps: Vec<Tensor<S>>,
        offsets: Vec<usize>,
        dm_kl: Vec<Tensor<S>>,
        dlv_kl: Vec<Tensor<S>>,
    },
}

/// One decoder's share of a forward: which rows of the stacked latent it decoded.
struct Decoded<S> {
    codes: Vec<usize>,
    /// The gathered latent rows (None: all of `zs`, in order).
    z: Option<Tensor<S>>,
    acts: DecoderActs<S>,
}

/// Everything the backward needs from one forward.
/// The latent samples of one forward: what the backward needs of them, the samples, the rows
/// each decoder reads (codes into the samples, the decoded cell, the cell's weight), the KL.
struct Sampled<T, S> {
    latent: Latent<S>,
    zs: Tensor<S>,
    decode: Vec<(Vec<usize>, Vec<usize>, Vec<T>)>,
    kl: Term<S>,
}

struct Forward<S, C> {
    enc: Vec<EncoderActs<S, C>>,
    latent: Latent<S>,
    /// Per modality, the cells its encoder saw.
    cells: Vec<Vec<usize>>,
    /// The latent samples the decoders read.
    zs: Tensor<S>,
    dec: Vec<Decoded<S>>,
    /// The regularisers' gradient with respect to `zs`.
    dzs_regularization: Option<Tensor<S>>,
    /// Per expert (on its cells), the Jeffreys divergence's gradients w.r.t. its mean and
    /// log-variance.
    dexperts: Option<Vec<Pair<S>>>,
    heads: HeadActs<S>,
    cycle: Vec<CyclePass<S, C>>,
}

/// One modality's cycle: decoded at the latent samples, re-encoded; `dmean` is the weighted
/// gradient of the cycle loss w.r.t. the re-encoded mean (−dmean w.r.t. the samples).
struct CyclePass<S, C> {
    modality: usize,
    decoded: CycleActs<S>,
    encoded: EncoderActs<S, C>,
    dmean: Tensor<S>,
}

/// A diagonal Gaussian's (mean, log-variance) tensors, or their gradients.
type Pair<S> = (Tensor<S>, Tensor<S>);
/// A penalty's weighted value (left on the device) and its gradient with respect to the latent
/// samples.
type Penalty<S> = (Term<S>, Option<Tensor<S>>);
/// Every encoder's activations of one forward.
type Encoded<T, B> = Vec<EncoderActs<Buf<T, B>, <B as Backend<T>>::Csr>>;

fn inputs<S: tessera_kernels::backend::Storage>(ts: &[Tensor<S>]) -> Vec<In<'_, S>> {
    ts.iter().map(Tensor::input).collect()
}

/// The KL's per-row values and its gradients by the mean and log-variance: outputs the KL op
/// overwrites where it runs (`use_kl`), zeros where it does not (an MMD prior: nothing to add).
#[allow(clippy::type_complexity)] // the op's three outputs
fn kl_outputs<T: Real, B: Backend<T>>(
    b: &B,
    use_kl: bool,
    rows: usize,
    d: usize,
) -> Result<(B::Buf, Tensor<B::Buf>, Tensor<B::Buf>)> {
    if use_kl {
        Ok((
            b.output_buf(rows)?,
            b.output_tensor(rows, d)?,
            b.output_tensor(rows, d)?,
        ))
    } else {
        Ok((b.zeros(rows)?, b.tensor(rows, d)?, b.tensor(rows, d)?))
    }
}

/// 1 / (number of present experts) per cell of `n` (0 for a cell with none), from each
/// expert's cells.
fn inverse_present<T: Real, B: Backend<T>>(
    b: &B,
    cells: &[Vec<usize>],
    n: usize,
) -> Result<B::Buf> {
    let mut count = vec![0usize; n];
    cells.iter().flatten().for_each(|&r| count[r] += 1);
    b.upload_weights(
        &count
            .iter()
            .map(|&k| {
                if k == 0 {
                    T::zero()
                } else {
                    T::of(1.0 / k as f64)
                }
            })
            .collect::<Vec<T>>(),
    )
}

/// acc += x, where either may be absent.
fn add_into<T: Real, B: Backend<T>>(
    b: &B,
    acc: &mut Option<Tensor<B::Buf>>,
    x: Option<Tensor<B::Buf>>,
) -> Result<()> {
    match (acc.as_mut(), x) {
        (Some(a), Some(x)) => b.axpy(T::one(), x.input(), a.output()),
        (None, x) => {
            *acc = x;
            Ok(())
        }
        (Some(_), None) => Ok(()),
    }
}

impl<T: Real, B: Backend<T>> Vae<T, B> {
    /// A freshly initialised model for `modalities` (name, features) and the data's categories.
    pub fn new(
        backend: B,
        config: VaeConfig,
        modalities: &[(&str, usize)],
        categories: Categories,
        seed: u64,
    ) -> Result<Self> {
        let Categories {
            n_batch,
            n_cov,
            n_labels,
        } = categories;
        assert!(
            !modalities.is_empty()
                && modalities.iter().all(|m| m.1 > 0)
                && config.n_layers > 0
                && config.n_hidden > 0
                && config.n_latent > 0,
            "model sizes must be positive"
        );
        assert!(
            n_batch <= n_cov,
            "the batch one-hot is part of the covariates"
        );
        let c = &config;
        let shape = Shape {
            n_hidden: c.n_hidden,
            n_latent: c.n_latent,
            n_layers: c.n_layers,
            dropout: c.dropout,
            var_eps: c.var_eps,
            batch_norm: c.batch_norm,
            layer_norm: c.layer_norm,
            encode_covariates: c.encode_covariates,
            deeply_inject_covariates: c.deeply_inject_covariates,
            n_cov,
            n_batch,
        };
        let specs: Vec<ModalitySpec> = modalities
            .iter()
            .map(|(name, g)| c.modality(name, *g))
            .collect();
        // One modality keeps scVI's tensor names; several are prefixed with their modality.
        let prefix = |m: &ModalitySpec| {
            if specs.len() == 1 {
                String::new()
            } else {
                format!("{}.", m.name)
            }
        };
        let (mut layout, mut state) = (Layout::default(), Layout::default());
        let encoders: Vec<Encoder> = specs
            .iter()
            .enumerate()
            .map(|(i, m)| {
                Encoder::register(
                    &prefix(m),
                    m.n_features,
                    &shape,
                    &mut layout,
                    &mut state,
                    i as u64 * SITES_PER_MODALITY,
                )
            })
            .collect();
        let decoders: Vec<Decoder> = specs
            .iter()
            .enumerate()
            .map(|(i, m)| {
                Decoder::register(
                    &prefix(m),
                    m,
                    &shape,
                    &mut layout,
                    &mut state,
                    i as u64 * SITES_PER_MODALITY + SITES_PER_MODALITY / 2,
                )
            })
            .collect();
        let heads_spec = HeadsSpec {
            n_latent: c.n_latent,
            n_hidden: c.n_hidden,
            n_labels,
            n_targets: c.regression_keys.len(),
            n_batch,
            classifier_weight: c.classifier_weight,
            regression_weight: c.regression_weight,
            cox_weight: c.cox_weight,
            contrastive_weight: c.contrastive_weight,
            contrastive_margin: c.contrastive_margin,
            adversarial_weight: c.adversarial_batch_weight,
            adversarial_reversal: c.adversarial_reversal,
        };
        let heads = Heads::register(heads_spec, &mut layout, &mut state);

        // Initialise on the host (one seeded stream, registration order), then upload.
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
        let mut values = vec![T::zero(); layout.len()];
        let mut state_values = vec![T::zero(); state.len()];
        for e in &encoders {
            e.init(&layout, &state, &mut values, &mut state_values, &mut rng);
        }
        for d in &decoders {
            d.init(&layout, &state, &mut values, &mut state_values, &mut rng);
        }
        heads.init(&layout, &state, &mut values, &mut state_values, &mut rng);
        let values_buf = backend.upload(&values)?;
        let grads = backend.zeros(layout.len())?;
        let state_buf = backend.upload(&state_values)?;
        Ok(Vae {
            config,
            modalities: specs,
            n_cov,
            n_batch,
            n_labels,
            layout,
            state_layout: state,
            values: values_buf,
            grads,
            state: state_buf,
            trained: None,
            encoders,
            decoders,
            heads,
            backend,
        })
    }

    /// Starts modality `m`'s NB-mixture background rates from the data, as totalVI starts its
    /// background prior: `log_rates` is batches × features (the table's shape). False when the
    /// modality has no mixture.
    pub fn initialise_background(&mut self, m: usize, log_rates: &[T]) -> Result<bool> {
        let Some(slot) = self.decoders[m].background_slot() else {
            return Ok(false);
        };
        let range = self.layout.slots()[slot].range.clone();
        assert_eq!(
            log_rates.len(),
            range.len(),
            "one log rate per batch and feature"
        );
        let staged = self.backend.upload(log_rates)?;
        self.backend
            .copy(In::all(&staged), Out::part(&mut self.values, range))?;
        Ok(true)
    }

    /// Whether a training step reads a batch only through its counts and covariates on the
    /// device (and its labels, where `labels_on_device`: staged with it as f32 codes), its
    /// number of rows and which modalities it has: a step captured as a CUDA graph then
    /// replays for every batch of that shape (the adversary's batch codes are made there from
    /// the covariates). Terms that take values from each batch on the host (the batch MMD's
    /// groups, the regression and Cox targets, the cycle's library size) keep the step eager.
    pub fn replayable_step(&self, labels_on_device: bool) -> bool {
        let c = &self.config;
        let weights = [
            c.mmd_batch_weight,
            c.regression_weight,
            c.cox_weight,
            c.cycle_weight,
        ];
        let labelled = c.classifier_weight > 0.0 || c.contrastive_weight > 0.0;
        weights.iter().all(|&w| w == 0.0)
            && (!labelled || labels_on_device)
            && c.regression_keys.is_empty()
            && c.survival_time_key.is_none()
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The parameters, one flat buffer in `layout`'s order.
    pub fn values(&self) -> &B::Buf {
        &self.values
    }

    pub fn values_mut(&mut self) -> &mut B::Buf {
        &mut self.values
    }

    /// The last backward's gradients, in `layout`'s order.
    pub fn grads(&self) -> &B::Buf {
        &self.grads
    }

    pub fn grads_mut(&mut self) -> &mut B::Buf {
        &mut self.grads
    }

    /// BatchNorm running statistics, in `state_layout`'s order.
    pub fn state(&self) -> &B::Buf {
        &self.state
    }

    pub fn state_mut(&mut self) -> &mut B::Buf {
        &mut self.state
    }

    /// The joint rule in effect: one modality's posterior is its encoder's (no prior expert).
    fn joint(&self) -> Joint {
        if self.modalities.len() == 1 {
            Joint::Concat
        } else {
            self.config.joint
        }
    }

    /// Loss terms of a batch and the gradients of `loss` in `self.grads` (overwritten).
    pub fn loss_and_grad(
        &mut self,
        batch: VaeBatch<'_, T>,
        kl_weight: f64,
        mode: Mode,
    ) -> Result<LossTerms> {
        self.forward_backward(batch, OnDevice::default(), kl_weight, mode)?
            .resolve(&self.backend)
    }

    /// [`Vae::loss_and_grad`] with the loss terms still on the device, so that the caller
    /// reads them with what else it queued (the step's one wait), and some of the batch
    /// already on the device (`on_device`), as a stager uploads the next batch while this step
    /// computes. A modality some cells of the batch lack is uploaded here regardless (the
    /// encoder reads a subset of the rows), with those rows' covariates.
    pub(crate) fn forward_backward(
        &mut self,
        batch: VaeBatch<'_, T>,
        on_device: OnDevice<B::Csr, B::Buf>,
        kl_weight: f64,
        mode: Mode,
    ) -> Result<PendingLoss<B::Buf>> {
        let (terms, fwd) = self.forward(batch, on_device, kl_weight, mode)?;
        self.backward(fwd, mode)?;
        Ok(terms)
    }

    /// Loss terms only (validation: `Mode::Validate`).
    pub fn loss(
        &mut self,
        batch: VaeBatch<'_, T>,
        kl_weight: f64,
        mode: Mode,
    ) -> Result<LossTerms> {
        self.forward_only(batch, kl_weight, mode)?
            .resolve(&self.backend)
    }

    /// [`Vae::loss`] with the terms left on the device (read many at once by
    /// [`PendingLoss::resolve_all`]).
    pub(crate) fn forward_only(
        &mut self,
        batch: VaeBatch<'_, T>,
        kl_weight: f64,
        mode: Mode,
    ) -> Result<PendingLoss<B::Buf>> {
        Ok(self.forward(batch, OnDevice::default(), kl_weight, mode)?.0)
    }

    /// The latent means of a batch (evaluation mode: running statistics, no dropout), n × latent.
    pub fn latent_mean(&mut self, batch: VaeBatch<'_, T>) -> Result<Vec<T>> {
        let m = self.joint_mean(batch)?;
        self.backend.download(m.input())
    }

    /// The joint posterior of a batch (evaluation mode): its means and variances, n × latent
    /// each; None for a mixture of experts, whose posterior is not one Gaussian.
    pub fn latent_posterior(&mut self, batch: VaeBatch<'_, T>) -> Result<Option<(Vec<T>, Vec<T>)>> {
        if self.joint() == Joint::Moe {
            return Ok(None);
        }
        self.check_batch(&batch);
        let plan = Plan::new(&batch, 1);
        let enc = self.encode(&batch, &plan, Vec::new(), None, Mode::Eval)?;
        let (means, logvars, masks) = self.experts(&enc, &plan)?;
        let (m, lv) = self.combine(&means, &logvars, masks.as_deref(), plan.n)?;
        let b = &self.backend;
        let variances = b.download(lv.input())?.iter().map(|v| v.exp()).collect();
        Ok(Some((b.download(m.input())?, variances)))
    }

    /// Latent means and each decoder's expression at them, in each cell's own batch, for every
    /// cell (a modality a cell lacks is imputed): see `Decoder::expression`. Returns (n ×
    /// latent, per modality n × features).
    pub fn latent_and_expression(
        &mut self,
        batch: VaeBatch<'_, T>,
        library_size: f64,
    ) -> Result<(Vec<T>, Vec<Vec<T>>)> {
        let m = self.joint_mean(batch)?;
        let expressions = self.decode(&m, batch.covariates, library_size)?;
        Ok((self.backend.download(m.input())?, expressions))
    }

    /// Each decoder's expression at the latent points `z` (n × latent, e.g. posterior
    /// samples), with the covariates of `batch`'s cells: per modality n × features.
    pub fn expression_at(
        &mut self,
        z: &[T],
        batch: VaeBatch<'_, T>,
        library_size: f64,
    ) -> Result<Vec<Vec<T>>> {
        self.check_batch(&batch);
        let d = self.config.n_latent;
        assert_eq!(z.len(), batch.rows() * d, "z: {} rows of {d}", batch.rows());
        let b = &self.backend;
        let mut latent = b.output_tensor(batch.rows(), d)?;
        b.copy(In::all(&b.upload(z)?), latent.output())?;
        self.decode(&latent, batch.covariates, library_size)
    }

    /// Each decoder's expected expression at `m` (evaluation mode).
    fn decode(
        &mut self,
        m: &Tensor<Buf<T, B>>,
        covariates: &[T],
        library_size: f64,
    ) -> Result<Vec<Vec<T>>> {
        let b = &self.backend;
        let p = Weights {
            layout: &self.layout,
            values: &self.values,
        };
        let mut state = Slots::all(&self.state_layout, &mut self.state);
        self.decoders
            .iter()
            .map(|d| {
                b.download(
                    d.expression(
                        b,
                        &p,
                        &mut state,
                        m,
                        Covariates::host(covariates),
                        library_size,
                    )?
                    .input(),
                )
            })
            .collect()
    }

    fn check_batch(&self, batch: &VaeBatch<'_, T>) {
        let n = batch.rows();
        assert_eq!(
            batch.modalities.len(),
            self.modalities.len(),
            "batch has {} modalities, the model {}",
            batch.modalities.len(),
            self.modalities.len()
        );
        for (m, spec) in batch.modalities.iter().zip(&self.modalities) {
            assert_eq!(
                (m.counts.rows, m.counts.cols),
                (n, spec.n_features),
                "modality {:?}: counts shape",
                spec.name
            );
            assert!(
                m.present.is_none_or(|p| p.len() == n),
                "modality {:?}: one presence flag per cell",
                spec.name
            );
        }
        assert_eq!(
            batch.covariates.len(),
            n * self.n_cov,
            "covariates: {n} rows of {}",
            self.n_cov
        );
    }

    /// Runs each encoder on the cells that measured its modality.
    fn encode(
        &mut self,
        batch: &VaeBatch<'_, T>,
        plan: &Plan,
        mut uploaded: Vec<Option<B::Csr>>,
        covariates: Option<&B::Buf>,
        mode: Mode,
    ) -> Result<Encoded<T, B>> {
        let p = Weights {
            layout: &self.layout,
            values: &self.values,
        };
        let mut state = Slots::all(&self.state_layout, &mut self.state);
        self.encoders
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let rows = Rows::select(
                    batch.modalities[i].counts,
                    batch.covariates,
                    self.n_cov,
                    &plan.cells[i],
                );
                let on_device = uploaded.get_mut(i).and_then(Option::take);
                e.forward(
                    &self.backend,
                    &p,
                    &mut state,
                    rows.counts(),
                    on_device.filter(|_| matches!(rows, Rows::All(..))),
                    rows.covariates(covariates),
                    mode,
                )
            })
            .collect()
    }

    /// Experts' means and log-variances over every cell of the batch (zero rows where absent),
    /// and for a product of experts their 0/1 presence masks.
    #[allow(clippy::type_complexity)] // views returned together to one caller; a named type would be used once
    fn experts(
        &self,
        enc: &[EncoderActs<Buf<T, B>, B::Csr>],
        plan: &Plan,
    ) -> Result<(
        Vec<Tensor<Buf<T, B>>>,
        Vec<Tensor<Buf<T, B>>>,
        Option<Vec<Buf<T, B>>>,
    )> {
        let b = &self.backend;
        let d = self.config.n_latent;
        let expand = |x: &Tensor<Buf<T, B>>, cells: &[usize]| -> Result<Tensor<Buf<T, B>>> {
            let mut full = b.output_tensor(plan.n, d)?;
            if cells.len() == plan.n {
                b.copy(x.input(), full.output())?;
            } else {
                b.scatter_add_rows(x.input(), cells, d, full.output())?;
            }
            Ok(full)
        };
        let means = enc
            .iter()
            .zip(&plan.cells)
            .map(|(a, c)| expand(a.mean.output(), c))
            .collect::<Result<_>>()?;
        let logvars = enc
            .iter()
            .zip(&plan.cells)
            .map(|(a, c)| expand(a.logvar.output(), c))
            .collect::<Result<_>>()?;
        let masks = if self.joint() == Joint::Poe {
            Some(
                plan.present
                    .iter()
                    .map(|p| {
                        b.upload_weights(
                            &p.iter()
                                .map(|&x| if x { T::one() } else { T::zero() })
                                .collect::<Vec<T>>(),
                        )
                    })
                    .collect::<Result<_>>()?,
            )
        } else {
            None
        };
        Ok((means, logvars, masks))
    }

    /// The joint posterior's mean and log-variance from the experts (PoE or concat).
    fn combine(
        &self,
        means: &[Tensor<Buf<T, B>>],
        logvars: &[Tensor<Buf<T, B>>],
        masks: Option<&[Buf<T, B>]>,
        n: usize,
    ) -> Result<Pair<Buf<T, B>>> {
        let b = &self.backend;
        let d = self.config.n_latent;
        if let ([mean], [logvar], None) = (means, logvars, masks) {
            // One expert (scVI) is the joint: copied, not summed into zeros.
            return Ok((copy_of(b, mean)?, copy_of(b, logvar)?));
        }
        let (mut m, mut lv) = (b.tensor(n, d)?, b.tensor(n, d)?);
        match masks {
            Some(masks) => {
                let masks: Vec<In<'_, Buf<T, B>>> = masks.iter().map(In::all).collect();
                b.poe_forward(
                    &inputs(means),
                    &inputs(logvars),
                    &masks,
                    d,
                    m.output(),
                    lv.output(),
                )?;
            }
            None => {
                for (me, lve) in means.iter().zip(logvars) {
                    b.axpy(T::one(), me.input(), m.output())?;
                    b.axpy(T::one(), lve.input(), lv.output())?;
                }
            }
        }
        Ok((m, lv))
    }

    /// The posterior mean of every cell (evaluation mode). A mixture's is the mean of its
    /// present experts' means.
    fn joint_mean(&mut self, batch: VaeBatch<'_, T>) -> Result<Tensor<Buf<T, B>>> {
        self.check_batch(&batch);
        let plan = Plan::new(&batch, 1);
        let enc = self.encode(&batch, &plan, Vec::new(), None, Mode::Eval)?;
        let (means, logvars, masks) = self.experts(&enc, &plan)?;
        if self.joint() == Joint::Moe {
            return self.mixture_mean(&means, &plan);
        }
        Ok(self.combine(&means, &logvars, masks.as_deref(), plan.n)?.0)
    }

    /// A mixture's mean: the mean of each cell's present experts' means (`means` expanded to
    /// every cell, zero where absent).
    fn mixture_mean(&self, means: &[Tensor<Buf<T, B>>], plan: &Plan) -> Result<Tensor<Buf<T, B>>> {
        let b = &self.backend;
        let mut sum = b.tensor(plan.n, self.config.n_latent)?;
        for m in means {
            b.axpy(T::one(), m.input(), sum.output())?;
        }
        let mut mean = b.output_tensor(plan.n, self.config.n_latent)?;
        b.scale_rows(
            sum.input(),
            In::all(&inverse_present(b, &plan.cells, plan.n)?),
            mean.output(),
        )?;
        Ok(mean)
    }

    /// Class probabilities of the label classifier at each cell's latent mean (evaluation
    /// mode), n × labels; None when the model has no classifier.
    pub fn predict_labels(&mut self, batch: VaeBatch<'_, T>) -> Result<Option<Vec<T>>> {
        if !self.heads.has_classifier() {
            return Ok(None);
        }
        let m = self.joint_mean(batch)?;
        let b = &self.backend;
        let p = Weights {
            layout: &self.layout,
            values: &self.values,
        };
        let mut state = Slots::all(&self.state_layout, &mut self.state);
        match self.heads.predict(b, &p, &mut state, &m)? {
            Some(t) => Ok(Some(b.download(t.input())?)),
            None => Ok(None),
        }
    }

    /// The standard normal draws of one latent site (none in evaluation: the mean).
    fn noise(&self, rows: usize, site: u64, mode: Mode) -> Result<Tensor<Buf<T, B>>> {
        let (b, d) = (&self.backend, self.config.n_latent);
        match mode {
            Mode::Train { seed, step } | Mode::Validate { seed, step } => {
                // The draw writes every value.
                let mut eps = b.output_tensor(rows, d)?;
                b.normal(seed, Mode::stream(step, site), eps.output())?;
                Ok(eps)
            }
            Mode::Eval => b.tensor(rows, d),
        }
    }

    /// A mixture of experts' samples: each present expert's sample decodes every modality the
    /// cell has, a cell's terms averaged over its experts (the stratified mixture ELBO).
    fn sample_mixture(
        &self,
        enc: &[EncoderActs<Buf<T, B>, B::Csr>],
        plan: &Plan,
        kl_weight: f64,
        mode: Mode,
    ) -> Result<Sampled<T, Buf<T, B>>> {
        let b = &self.backend;
        let (n, d) = (plan.n, self.config.n_latent);
        let inv_n = 1.0 / n as f64;
        let use_kl = self.config.prior == Prior::Kl;
        let mut kl_total = Term::default();
        let offsets: Vec<usize> = plan
            .cells
            .iter()
            .scan(0, |at, c| Some(std::mem::replace(at, *at + c.len())))
            .collect();
        let total = plan.cells.iter().map(Vec::len).sum::<usize>();
        let mut zs = b.output_tensor(total, d)?;
        let (mut eps_all, mut dm_kl, mut dlv_kl) = (Vec::new(), Vec::new(), Vec::new());
        for (e, a) in enc.iter().enumerate() {
            let cells = &plan.cells[e];
            let rows = cells.len();
            let eps = self.noise(rows, SITE_LATENT - e as u64, mode)?;
            let part = offsets[e] * d..(offsets[e] + rows) * d;
            b.reparameterize_forward(
                a.mean.output().input(),
                a.logvar.output().input(),
                eps.input(),
                Out::part(&mut zs.buf, part),
            )?;
            let share: Vec<f64> = cells
                .iter()
                .map(|&r| inv_n / plan.n_present[r] as f64)
                .collect();
            let (mut kl, mut dm, mut dlv) = kl_outputs(b, use_kl, rows, d)?;
            if use_kl {
                let weights = b.kl_weights(&share, kl_weight)?;
                b.kl_standard_normal(
                    a.mean.output().input(),
                    a.logvar.output().input(),
                    d,
                    Some(In::all(&weights)),
                    Out::all(&mut kl),
                    dm.output(),
                    dlv.output(),
                )?;
                kl_total.add(Share {
                    values: kl,
                    reduce: Reduce::Dot(share),
                });
            }
            eps_all.push(eps);
            dm_kl.push(dm);
            dlv_kl.push(dlv);
        }
        let decode = (0..self.decoders.len())
            .map(|j| {
                let mut rows = (Vec::new(), Vec::new(), Vec::new());
                for (e, cells) in plan.cells.iter().enumerate() {
                    for (k, &r) in cells.iter().enumerate() {
                        if plan.present[j][r] {
                            rows.0.push(offsets[e] + k);
                            rows.1.push(r);
                            rows.2.push(T::of(inv_n / plan.n_present[r] as f64));
                        }
                    }
                }
                rows
            })
            .collect();
        Ok(Sampled {
            latent: Latent::Mixture {
                eps: eps_all,
                offsets,
                dm_kl,
                dlv_kl,
            },
            zs,
            decode,
            kl: kl_total,
        })
    }

    /// One joint posterior (PoE or concat) over every cell, sampled once.
    fn sample_joint(
        &self,
        enc: &[EncoderActs<Buf<T, B>, B::Csr>],
        plan: &Plan,
        kl_weight: f64,
        mode: Mode,
    ) -> Result<Sampled<T, Buf<T, B>>> {
        let b = &self.backend;
        let (n, d) = (plan.n, self.config.n_latent);
        let inv_n = 1.0 / n as f64;
        let use_kl = self.config.prior == Prior::Kl;
        let mut kl_total = Term::default();
        let (means, logvars, masks) = self.experts(enc, plan)?;
        let (m, lv) = self.combine(&means, &logvars, masks.as_deref(), n)?;
        let eps = self.noise(n, SITE_LATENT, mode)?;
        let mut z = b.output_tensor(n, d)?;
        b.reparameterize_forward(m.input(), lv.input(), eps.input(), z.output())?;
        let (mut kl, mut dm_kl, mut dlv_kl) = kl_outputs(b, use_kl, n, d)?;
        if use_kl {
            let weights = b.kl_weights(&vec![inv_n; n], kl_weight)?;
            b.kl_standard_normal(
                m.input(),
                lv.input(),
                d,
                Some(In::all(&weights)),
                Out::all(&mut kl),
                dm_kl.output(),
                dlv_kl.output(),
            )?;
            kl_total.add(Share {
                values: kl,
                reduce: Reduce::ScaledSum(inv_n),
            });
        }
        let decode = plan
            .cells
            .iter()
            .map(|c| (c.clone(), c.clone(), vec![T::of(inv_n); c.len()]))
            .collect();
        Ok(Sampled {
            latent: Latent::Joint {
                means,
                logvars,
                masks,
                m,
                lv,
                eps,
                dm_kl,
                dlv_kl,
            },
            zs: z,
            decode,
            kl: kl_total,
        })
    }

    #[allow(clippy::type_complexity)] // views returned together to one caller; a named type would be used once
    fn forward(
        &mut self,
        batch: VaeBatch<'_, T>,
        on_device: OnDevice<B::Csr, B::Buf>,
        kl_weight: f64,
        mode: Mode,
    ) -> Result<(PendingLoss<Buf<T, B>>, Forward<Buf<T, B>, B::Csr>)> {
        self.check_batch(&batch);
        let (covariates, labels) = (on_device.covariates, on_device.labels);
        assert!(
            covariates
                .as_ref()
                .is_none_or(|c| c.len() == batch.covariates.len()),
            "the covariates on the device are not this batch's"
        );
        let training_batch_norm = matches!(mode, Mode::Train { .. }) && self.config.batch_norm;
        let plan = Plan::new(&batch, if training_batch_norm { 2 } else { 1 });
        let (n, d) = (plan.n, self.config.n_latent);
        assert!(
            n > 1 || !matches!(mode, Mode::Train { .. }) || !self.config.batch_norm,
            "BatchNorm training needs at least two cells"
        );
        let enc = self.encode(&batch, &plan, on_device.counts, covariates.as_ref(), mode)?;
        let b = self.backend.clone();

        // The latent samples, the rows each decoder reads (codes into them, the decoded cell,
        // the cell's weight) and the KL (an MMD prior acts on the samples below instead).
        let use_kl = self.config.prior == Prior::Kl;
        let sampled = if self.joint() == Joint::Moe {
            self.sample_mixture(&enc, &plan, kl_weight, mode)?
        } else {
            self.sample_joint(&enc, &plan, kl_weight, mode)?
        };
        let Sampled {
            latent,
            zs,
            decode,
            kl: mut kl_total,
        } = sampled;

        let p = Weights {
            layout: &self.layout,
            values: &self.values,
        };
        let mut state = Slots::all(&self.state_layout, &mut self.state);
        let mut reconstruction = Term::default();
        let mut dec = Vec::with_capacity(self.decoders.len());
        for ((j, decoder), (codes, cells, weights)) in self.decoders.iter().enumerate().zip(decode)
        {
            let z = if is_identity(&codes, zs.rows) {
                None
            } else {
                let mut t = b.output_tensor(codes.len(), d)?;
                b.gather_rows(zs.input(), &codes, d, t.output())?;
                Some(t)
            };
            let rows = Rows::select(
                batch.modalities[j].counts,
                batch.covariates,
                self.n_cov,
                &cells,
            );
            // The encoder's rows, once or (a mixture's experts) repeated: its upload, tiled
            // on the device where repeated, serves the likelihood too, as do the covariates
            // on the device; nothing crosses from the host.
            let times = repeats_of(&cells, &plan.cells[j]);
            let tiled = match (times, enc[j].counts()) {
                (Some(t), Some(c)) if t > 1 => Some(b.csr_tiled(c, t)?),
                _ => None,
            };
            let uploaded = if cells == plan.cells[j] {
                enc[j].counts()
            } else {
                tiled.as_ref()
            };
            let tiled_covariates = match (times, covariates.as_ref()) {
                (Some(t), Some(all)) if t > 1 && is_identity(&plan.cells[j], n) => {
                    Some(tiled_buf(&b, all, t)?)
                }
                _ => None,
            };
            let covariates_of_rows = match &tiled_covariates {
                Some(device) => Covariates {
                    host: rows.host_covariates(),
                    device: Some(device),
                },
                None => rows.covariates(covariates.as_ref()),
            };
            let (r, acts) = decoder.forward(
                &b,
                &p,
                &mut state,
                z.as_ref().unwrap_or(&zs),
                rows.counts(),
                uploaded,
                covariates_of_rows,
                &weights,
                mode,
            )?;
            reconstruction.add(r);
            dec.push(Decoded { codes, z, acts });
        }
        // The batch of each latent sample (a mixture stacks its experts' samples).
        let sample_cells: Vec<usize> = match &latent {
            Latent::Joint { .. } => (0..n).collect(),
            Latent::Mixture { .. } => plan.cells.concat(),
        };
        // The penalties in the order the host once added them (their values stay on the
        // device where the op leaves them there).
        let mut regularization = Term::default();
        let (batch_mmd, mut dzs_regularization) =
            self.batch_mmd(&zs, &sample_cells, batch.covariates)?;
        regularization.add_term(batch_mmd);
        if !use_kl {
            let (value, dzs) = self.prior_mmd(&zs, kl_weight, mode)?;
            kl_total = value;
            add_into(&b, &mut dzs_regularization, dzs)?;
        }
        let (jeffreys, dexperts) = self.jeffreys(&enc, &plan)?;
        let (cycle_term, cycle) = self.cycle(&zs, &sample_cells, &batch, &plan, mode)?;
        regularization.add_term(cycle_term);
        regularization.add_term(jeffreys);

        // Heads: on the joint mean (a mixture's is the mean of its experts') and on the samples.
        let mean = if self.heads.read_mean() {
            Some(match &latent {
                Latent::Joint { m, .. } => copy_of(&b, m)?,
                Latent::Mixture { .. } => {
                    self.mixture_mean(&self.experts(&enc, &plan)?.0, &plan)?
                }
            })
        } else {
            None
        };
        let sample_batches =
            self.sample_batches(&batch, &sample_cells, covariates.as_ref(), plan.n)?;
        let p = Weights {
            layout: &self.layout,
            values: &self.values,
        };
        let mut state = Slots::all(&self.state_layout, &mut self.state);
        let (head_terms, heads) = self.heads.forward(
            &b,
            &p,
            &mut state,
            mean,
            (&batch.supervision, labels.as_ref()),
            &zs,
            sample_batches.labels(),
            mode,
        )?;
        regularization.add_term(head_terms.regularization);
        let supervised = head_terms.supervised;
        let terms = PendingLoss {
            reconstruction,
            kl: kl_total,
            kl_weight: AtomicU64::new(kl_weight.to_bits()),
            regularization,
            supervised,
            cells: n,
        };
        Ok((
            terms,
            Forward {
                enc,
                latent,
                cells: plan.cells,
                zs,
                dec,
                dzs_regularization,
                dexperts,
                heads,
                cycle,
            },
        ))
    }

    /// Cross-modal cycle consistency: weight × the mean over latent samples of Σ_m |μ_m(x̂_m(z))
    /// − z|², x̂_m the expected expression of modality m decoded at z and μ_m its encoder's mean
    /// (log1p space). The pass runs in the step's mode on a scratch copy of the BatchNorm
    /// statistics, so decoded inputs never enter the running statistics.
    #[allow(clippy::type_complexity)] // views returned together to one caller; a named type would be used once
    fn cycle(
        &mut self,
        zs: &Tensor<Buf<T, B>>,
        sample_cells: &[usize],
        batch: &VaeBatch<'_, T>,
        plan: &Plan,
        mode: Mode,
    ) -> Result<(Term<Buf<T, B>>, Vec<CyclePass<Buf<T, B>, B::Csr>>)> {
        let weight = self.config.cycle_weight;
        if weight == 0.0 || self.modalities.len() < 2 || zs.rows == 0 {
            return Ok((Term::default(), Vec::new()));
        }
        let b = self.backend.clone();
        let mut scratch = b.zeros(self.state_layout.len())?;
        b.copy(In::all(&self.state), Out::all(&mut scratch))?;
        let p = Weights {
            layout: &self.layout,
            values: &self.values,
        };
        let mut state = Slots::all(&self.state_layout, &mut scratch);
        let covariates: Vec<T> = sample_cells
            .iter()
            .flat_map(|&r| {
                batch.covariates[r * self.n_cov..(r + 1) * self.n_cov]
                    .iter()
                    .copied()
            })
            .collect();
        let cov = Covariates::host(&covariates);
        let scale = 2.0 * weight / zs.rows as f64;
        let (mut value, mut passes) = (Term::default(), Vec::new());
        for (m, decoder) in self.decoders.iter().enumerate() {
            if !decoder.cycles() {
                continue;
            }
            // Library-scaled expression at the mean library of the cells that measured it.
            let counts = batch.modalities[m].counts;
            let libraries: Vec<f64> = plan.cells[m]
                .iter()
                .map(|&r| {
                    counts.data[counts.indptr[r] as usize..counts.indptr[r + 1] as usize]
                        .iter()
                        .map(|v| v.f64())
                        .sum()
                })
                .collect();
            let library = if libraries.is_empty() {
                1e4
            } else {
                (libraries.iter().sum::<f64>() / libraries.len() as f64).max(1.0)
            };
            let (x, decoded) = decoder.cycle_forward(&b, &p, &mut state, zs, cov, library, mode)?;
            let encoded = self.encoders[m].forward_log1p(&b, &p, &mut state, x, cov, mode)?;
            let mut dmean = copy_of(&b, encoded.mean.output())?;
            b.axpy(T::zero() - T::one(), zs.input(), dmean.output())?;
            // The distances, kept for the value (read with the step), before the gradient's scale.
            value.add(Share {
                values: copy_of(&b, &dmean)?.buf,
                reduce: Reduce::NormSquaredTimesOver(weight, zs.rows as f64),
            });
            b.scale(dmean.output(), T::of(scale))?;
            passes.push(CyclePass {
                modality: m,
                decoded,
                encoded,
                dmean,
            });
        }
        Ok((value, passes))
    }

    /// The batch code of each latent sample's cell, as the adversary reads them (none without
    /// one). Where the samples are the batch's cells in order (once per expert of a mixture)
    /// and its covariates are on the device, made there from them (`first_positive` of the
    /// batch one-hot, tiled per expert), so a captured step takes nothing from the host; else
    /// from the host's covariates.
    fn sample_batches(
        &self,
        batch: &VaeBatch<'_, T>,
        sample_cells: &[usize],
        covariates: Option<&B::Buf>,
        n: usize,
    ) -> Result<Codes<B::Buf>> {
        if !self.heads.has_adversary() {
            return Ok(Codes::Host(Vec::new()));
        }
        let on_device = covariates.filter(|c| c.len() == n * self.n_cov);
        if let (Some(cov), Some(times)) = (on_device, repeats_every_cell(sample_cells, n)) {
            let b = &self.backend;
            let mut codes = b.output_buf(n)?;
            b.first_positive(In::all(cov), self.n_cov, self.n_batch, Out::all(&mut codes))?;
            let codes = if times == 1 {
                codes
            } else {
                tiled_buf(b, &codes, times)?
            };
            return Ok(Codes::Device(codes));
        }
        Ok(Codes::Host(
            sample_cells
                .iter()
                .map(|&r| self.batch_of(batch.covariates, r).map_or(-1, |k| k as i32))
                .collect(),
        ))
    }

    /// The batch of cell `r` from its one-hot covariates (None: no batch column set).
    fn batch_of(&self, covariates: &[T], r: usize) -> Option<usize> {
        covariates[r * self.n_cov..r * self.n_cov + self.n_batch]
            .iter()
            .position(|&v| v > T::zero())
    }

    /// An MMD prior (MMD-VAE): weight × squared MMD between the latent samples and as many
    /// N(0, I) draws, and the gradient of kl_weight × that with respect to the samples.
    fn prior_mmd(
        &self,
        zs: &Tensor<Buf<T, B>>,
        kl_weight: f64,
        mode: Mode,
    ) -> Result<Penalty<Buf<T, B>>> {
        let b = &self.backend;
        let d = self.config.n_latent;
        let mut prior = b.tensor(zs.rows, d)?;
        match mode {
            Mode::Train { seed, step } | Mode::Validate { seed, step } => {
                b.normal(seed, Mode::stream(step, SITE_PRIOR), prior.output())?
            }
            Mode::Eval => {}
        }
        let (mut dzs, mut dprior) = (b.tensor(zs.rows, d)?, b.tensor(zs.rows, d)?);
        let mut mmd = b.output_buf(1)?;
        b.mmd_rbf(
            zs.input(),
            prior.input(),
            d,
            &self.config.mmd_bandwidths,
            dzs.output(),
            dprior.output(),
            Out::all(&mut mmd),
        )?;
        // kl_weight × the prior's weight per row, the KL weight from its device cell (a
        // captured step serves every weight of a warm-up).
        let weights = b.kl_weights(&vec![self.config.prior_mmd_weight; zs.rows], kl_weight)?;
        let mut scaled = b.output_tensor(zs.rows, d)?;
        b.scale_rows(dzs.input(), In::all(&weights), scaled.output())?;
        let mut value = Term::default();
        value.add(Share {
            values: mmd,
            reduce: Reduce::ScaledSum(self.config.prior_mmd_weight),
        });
        Ok((value, Some(scaled)))
    }

    /// MultiVI's alignment of the modality posteriors: weight × the mean over cells of the
    /// Jeffreys divergences between every pair of experts a cell has, and each expert's
    /// gradients on its cells (None when off or with one modality).
    #[allow(clippy::type_complexity)] // views returned together to one caller; a named type would be used once
    fn jeffreys(
        &self,
        enc: &Encoded<T, B>,
        plan: &Plan,
    ) -> Result<(Term<Buf<T, B>>, Option<Vec<Pair<Buf<T, B>>>>)> {
        let weight = self.config.jeffreys_weight;
        if weight == 0.0 || enc.len() < 2 {
            return Ok((Term::default(), None));
        }
        let b = &self.backend;
        let d = self.config.n_latent;
        let mut grads: Vec<Pair<Buf<T, B>>> = plan
            .cells
            .iter()
            .map(|c| Ok((b.tensor(c.len(), d)?, b.tensor(c.len(), d)?)))
            .collect::<Result<_>>()?;
        // Each cell's row within each expert's rows.
        let position: Vec<Vec<usize>> = plan
            .cells
            .iter()
            .map(|c| {
                c.iter()
                    .enumerate()
                    .fold(vec![usize::MAX; plan.n], |mut at, (k, &r)| {
                        at[r] = k;
                        at
                    })
            })
            .collect();
        let gather = |x: &Tensor<Buf<T, B>>, rows: &[usize]| -> Result<Tensor<Buf<T, B>>> {
            let mut t = b.tensor(rows.len(), d)?;
            b.gather_rows(x.input(), rows, d, t.output())?;
            Ok(t)
        };
        let mut total = Term::default();
        for i in 0..enc.len() {
            for j in i + 1..enc.len() {
                let both: Vec<usize> = (0..plan.n)
                    .filter(|&r| plan.present[i][r] && plan.present[j][r])
                    .collect();
                if both.is_empty() {
                    continue;
                }
                let (rows_i, rows_j): (Vec<usize>, Vec<usize>) = both
                    .iter()
                    .map(|&r| (position[i][r], position[j][r]))
                    .unzip();
                let (m1, lv1) = (
                    gather(enc[i].mean.output(), &rows_i)?,
                    gather(enc[i].logvar.output(), &rows_i)?,
                );
                let (m2, lv2) = (
                    gather(enc[j].mean.output(), &rows_j)?,
                    gather(enc[j].logvar.output(), &rows_j)?,
                );
                let weights = b.upload_weights(&vec![T::of(weight / plan.n as f64); both.len()])?;
                let mut value = b.zeros(both.len())?;
                let mut g: Vec<Tensor<Buf<T, B>>> = (0..4)
                    .map(|_| b.tensor(both.len(), d))
                    .collect::<Result<_>>()?;
                {
                    let [g0, g1, g2, g3] = &mut g[..] else {
                        unreachable!("four gradients")
                    };
                    b.jeffreys(
                        m1.input(),
                        lv1.input(),
                        m2.input(),
                        lv2.input(),
                        d,
                        In::all(&weights),
                        Out::all(&mut value),
                        [g0.output(), g1.output(), g2.output(), g3.output()],
                    )?;
                }
                total.add(Share {
                    values: value,
                    reduce: Reduce::SumTimesOver(weight, plan.n as f64),
                });
                for (expert, rows, (dm, dlv)) in
                    [(i, &rows_i, (&g[0], &g[1])), (j, &rows_j, (&g[2], &g[3]))]
                {
                    for (source, target) in [(dm, 0), (dlv, 1)] {
                        let mut scattered = b.tensor(plan.cells[expert].len(), d)?;
                        b.scatter_add_rows(source.input(), rows, d, scattered.output())?;
                        let t = if target == 0 {
                            &mut grads[expert].0
                        } else {
                            &mut grads[expert].1
                        };
                        b.axpy(T::one(), scattered.input(), t.output())?;
                    }
                }
            }
        }
        Ok((total, Some(grads)))
    }

    /// Multigrate's integration loss: weight × Σ over pairs of batches of the squared MMD
    /// between their latent samples, and its gradient with respect to `zs` (None when off or
    /// when the batch holds fewer than two batches). `cells[i]` is the cell of sample i.
    fn batch_mmd(
        &self,
        zs: &Tensor<Buf<T, B>>,
        cells: &[usize],
        covariates: &[T],
    ) -> Result<Penalty<Buf<T, B>>> {
        let weight = self.config.mmd_batch_weight;
        if weight == 0.0 || self.n_batch < 2 {
            return Ok((Term::default(), None));
        }
        let b = &self.backend;
        let d = self.config.n_latent;
        let mut groups: Vec<Vec<usize>> = vec![Vec::new(); self.n_batch];
        for (i, &r) in cells.iter().enumerate() {
            if let Some(k) = self.batch_of(covariates, r) {
                groups[k].push(i);
            }
        }
        groups.retain(|g| !g.is_empty());
        if groups.len() < 2 {
            return Ok((Term::default(), None));
        }
        let gathered: Vec<Tensor<Buf<T, B>>> = groups
            .iter()
            .map(|g| {
                let mut t = b.tensor(g.len(), d)?;
                b.gather_rows(zs.input(), g, d, t.output())?;
                Ok(t)
            })
            .collect::<Result<_>>()?;
        let mut grads: Vec<Tensor<Buf<T, B>>> = groups
            .iter()
            .map(|g| b.tensor(g.len(), d))
            .collect::<Result<_>>()?;
        let mut total = Term::default();
        for i in 0..groups.len() {
            for j in i + 1..groups.len() {
                let (mut dx, mut dy) =
                    (b.tensor(groups[i].len(), d)?, b.tensor(groups[j].len(), d)?);
                let mut value = b.output_buf(1)?;
                b.mmd_rbf(
                    gathered[i].input(),
                    gathered[j].input(),
                    d,
                    &self.config.mmd_bandwidths,
                    dx.output(),
                    dy.output(),
                    Out::all(&mut value),
                )?;
                total.add(Share {
                    values: value,
                    reduce: Reduce::ScaledSum(1.0),
                });
                b.axpy(T::of(weight), dx.input(), grads[i].output())?;
                b.axpy(T::of(weight), dy.input(), grads[j].output())?;
            }
        }
        let mut dzs = b.tensor(zs.rows, d)?;
        for (g, grad) in groups.iter().zip(&grads) {
            let mut scattered = b.tensor(zs.rows, d)?;
            b.scatter_add_rows(grad.input(), g, d, scattered.output())?;
            b.axpy(T::one(), scattered.input(), dzs.output())?;
        }
        Ok((total.times(weight), Some(dzs)))
    }

    fn backward(&mut self, f: Forward<Buf<T, B>, B::Csr>, mode: Mode) -> Result<()> {
        let b = self.backend.clone();
        let d = self.config.n_latent;
        let p = Weights {
            layout: &self.layout,
            values: &self.values,
        };
        let mut grads = Slots {
            layout: &self.layout,
            buf: &mut self.grads,
            needed: self.trained.as_deref(),
        };
        let Forward {
            enc,
            latent,
            cells,
            zs,
            dec,
            dzs_regularization,
            dexperts,
            heads,
            cycle,
        } = f;

        // The cycle passes go through decoders and encoders that the main pass's backward then
        // overwrites (one writer per gradient): their gradients are taken first, from zero, kept
        // aside and added at the end.
        let mut dzs_cycle = None;
        let mut cycle_grads = None;
        if !cycle.is_empty() {
            b.scale(Out::all(grads.buf), T::zero())?;
            let mut dz = b.tensor(zs.rows, d)?;
            for CyclePass {
                modality,
                decoded,
                encoded,
                dmean,
            } in cycle
            {
                b.axpy(T::zero() - T::one(), dmean.input(), dz.output())?;
                let dlv = b.tensor(zs.rows, d)?;
                let dx = self.encoders[modality]
                    .backward(&b, &p, &mut grads, &encoded, dmean, dlv, mode)?
                    .expect("a log1p-space input has a gradient");
                let dz_decoder = self.decoders[modality]
                    .cycle_backward(&b, &p, &mut grads, &zs, decoded, dx, mode)?;
                b.axpy(T::one(), dz_decoder.input(), dz.output())?;
            }
            let mut kept = b.zeros(self.layout.len())?;
            b.copy(In::all(grads.buf), Out::all(&mut kept))?;
            dzs_cycle = Some(dz);
            cycle_grads = Some(kept);
        }

        // The decoders' gradients (and the regularisers' and heads'), summed into the latent
        // samples; the heads on the mean send theirs to the joint posterior's mean.
        let (dmean, dzs_heads) = self.heads.backward(&b, &p, &mut grads, &zs, heads, mode)?;
        let mut dzs = match dzs_regularization {
            Some(t) => t,
            None => b.tensor(zs.rows, d)?,
        };
        for t in [dzs_heads, dzs_cycle].into_iter().flatten() {
            b.axpy(T::one(), t.input(), dzs.output())?;
        }
        for (decoder, Decoded { codes, z, acts }) in self.decoders.iter().zip(dec) {
            let dz = decoder.backward(&b, &p, &mut grads, z.as_ref().unwrap_or(&zs), acts, mode)?;
            if z.is_none() {
                b.axpy(T::one(), dz.input(), dzs.output())?;
            } else {
                let mut scattered = b.tensor(zs.rows, d)?;
                b.scatter_add_rows(dz.input(), &codes, d, scattered.output())?;
                b.axpy(T::one(), scattered.input(), dzs.output())?;
            }
        }

        // Through the reparameterisation and KL to each expert's (mean, log-variance) on its cells.
        let n = match &latent {
            Latent::Joint { m, .. } => m.rows,
            Latent::Mixture { .. } => 0,
        };
        let expert_grads: Vec<Pair<Buf<T, B>>> = match latent {
            Latent::Joint {
                means,
                logvars,
                masks,
                m,
                lv,
                eps,
                dm_kl,
                dlv_kl,
            } => {
                // The reparameterisation's backward writes every value.
                let (mut dm, mut dlv) = (b.output_tensor(n, d)?, b.output_tensor(n, d)?);
                b.reparameterize_backward(
                    lv.input(),
                    eps.input(),
                    dzs.input(),
                    dm.output(),
                    dlv.output(),
                )?;
                b.axpy(T::one(), dm_kl.input(), dm.output())?;
                b.axpy(T::one(), dlv_kl.input(), dlv.output())?;
                if let Some(t) = &dmean {
                    b.axpy(T::one(), t.input(), dm.output())?;
                }
                let full: Vec<Pair<Buf<T, B>>> = match masks {
                    Some(masks) => {
                        let mut dms: Vec<Tensor<Buf<T, B>>> = means
                            .iter()
                            .map(|_| b.tensor(n, d))
                            .collect::<Result<_>>()?;
                        let mut dlvs: Vec<Tensor<Buf<T, B>>> = means
                            .iter()
                            .map(|_| b.tensor(n, d))
                            .collect::<Result<_>>()?;
                        {
                            let masks: Vec<In<'_, Buf<T, B>>> = masks.iter().map(In::all).collect();
                            let mut dm_outs: Vec<Out<'_, Buf<T, B>>> =
                                dms.iter_mut().map(Tensor::output).collect();
                            let mut dlv_outs: Vec<Out<'_, Buf<T, B>>> =
                                dlvs.iter_mut().map(Tensor::output).collect();
                            b.poe_backward(
                                &inputs(&means),
                                &inputs(&logvars),
                                &masks,
                                d,
                                m.input(),
                                lv.input(),
                                dm.input(),
                                dlv.input(),
                                &mut dm_outs,
                                &mut dlv_outs,
                            )?;
                        }
                        dms.into_iter().zip(dlvs).collect()
                    }
                    // Concat: every expert's head output adds into the joint, so each gets
                    // the joint's gradients; the last one takes them (one expert: no copy).
                    None => {
                        let mut each = (1..means.len())
                            .map(|_| Ok((copy_of(&b, &dm)?, copy_of(&b, &dlv)?)))
                            .collect::<Result<Vec<_>>>()?;
                        each.push((dm, dlv));
                        each
                    }
                };
                let pick = |t: Tensor<Buf<T, B>>, cells: &[usize]| -> Result<Tensor<Buf<T, B>>> {
                    if cells.len() == n {
                        return Ok(t);
                    }
                    let mut out = b.tensor(cells.len(), d)?;
                    b.gather_rows(t.input(), cells, d, out.output())?;
                    Ok(out)
                };
                full.into_iter()
                    .zip(&cells)
                    .map(|((dm, dlv), c)| Ok((pick(dm, c)?, pick(dlv, c)?)))
                    .collect::<Result<_>>()?
            }
            Latent::Mixture {
                eps,
                offsets,
                dm_kl,
                dlv_kl,
            } => {
                // The mixture's mean averages the present experts: each gets 1/k of its gradient.
                let dmean_shared = match &dmean {
                    Some(t) => {
                        let mut shared = b.tensor(t.rows, d)?;
                        b.scale_rows(
                            t.input(),
                            In::all(&inverse_present(&b, &cells, t.rows)?),
                            shared.output(),
                        )?;
                        Some(shared)
                    }
                    None => None,
                };
                enc.iter()
                    .enumerate()
                    .map(|(e, a)| {
                        let rows = a.mean.output().rows;
                        let (mut dm, mut dlv) =
                            (b.output_tensor(rows, d)?, b.output_tensor(rows, d)?);
                        let part = offsets[e] * d..(offsets[e] + rows) * d;
                        b.reparameterize_backward(
                            a.logvar.output().input(),
                            eps[e].input(),
                            In::part(&dzs.buf, part),
                            dm.output(),
                            dlv.output(),
                        )?;
                        b.axpy(T::one(), dm_kl[e].input(), dm.output())?;
                        b.axpy(T::one(), dlv_kl[e].input(), dlv.output())?;
                        if let Some(shared) = &dmean_shared {
                            let mut mine = b.tensor(rows, d)?;
                            b.gather_rows(shared.input(), &cells[e], d, mine.output())?;
                            b.axpy(T::one(), mine.input(), dm.output())?;
                        }
                        Ok((dm, dlv))
                    })
                    .collect::<Result<_>>()?
            }
        };
        let expert_grads: Vec<Pair<Buf<T, B>>> = match dexperts {
            Some(extra) => expert_grads
                .into_iter()
                .zip(extra)
                .map(|((mut dm, mut dlv), (em, elv))| {
                    b.axpy(T::one(), em.input(), dm.output())?;
                    b.axpy(T::one(), elv.input(), dlv.output())?;
                    Ok((dm, dlv))
                })
                .collect::<Result<_>>()?,
            None => expert_grads,
        };
        for ((encoder, acts), (dm, dlv)) in self.encoders.iter().zip(&enc).zip(expert_grads) {
            encoder.backward(&b, &p, &mut grads, acts, dm, dlv, mode)?;
        }
        if let Some(kept) = cycle_grads {
            b.axpy(T::one(), In::all(&kept), Out::all(grads.buf))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{repeats_every_cell, repeats_of};

    #[test]
    fn repeated_cells_are_counted_only_when_whole_and_in_order() {
        assert_eq!(repeats_of(&[1, 3, 1, 3], &[1, 3]), Some(2));
        assert_eq!(repeats_of(&[1, 3, 3, 1], &[1, 3]), None);
        assert_eq!(repeats_of(&[1, 3, 1], &[1, 3]), None);
        assert_eq!(repeats_every_cell(&[0, 1, 2], 3), Some(1));
        assert_eq!(repeats_every_cell(&[0, 1, 0, 1, 0, 1], 2), Some(3));
        assert_eq!(repeats_every_cell(&[0, 2, 0, 2], 2), None);
        assert_eq!(repeats_every_cell(&[], 0), None);
    }
}
