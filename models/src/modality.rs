//! One modality's halves of the VAE: the encoder (counts → hidden → q(z|x) mean and
//! log-variance) and the decoder (z + covariates → likelihood parameters → −log p(x|z)).
//! `vae.rs` joins any number of them through a joint posterior.

use serde::{Deserialize, Serialize};
use tessera_kernels::Real;
use tessera_kernels::backend::{Backend, In, Out, Result, Storage, Tensor};
use tessera_kernels::ops::elementwise::Activation;
use tessera_kernels::ops::linear::{CountTransform, CsrRef};
use tessera_kernels::params::Layout;

use crate::layers::{
    Buf, Dense, DenseActs, DenseSpec, Input, InputGrad, Mlp, MlpSpec, Mode, Slots, Weights, copy_of,
};
pub use crate::likelihood::{Dispersion, LikelihoodKind};
use crate::likelihood::{Expected, Observation, ObservationActs, Rows, Site, head};
use crate::pending::{Reduce, Share};

/// The covariate rows (n × n_cov, row-major) a pass reads: on the host, and on the device where
/// the step already holds exactly these rows there (staged with the batch).
#[derive(Debug)]
pub struct Covariates<'a, T, Buf> {
    pub host: &'a [T],
    pub device: Option<&'a Buf>,
}

// By hand: a derive would ask T and Buf to be Copy, though only references are copied.
impl<T, Buf> Clone for Covariates<'_, T, Buf> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T, Buf> Copy for Covariates<'_, T, Buf> {}

impl<'a, T: Real, Buf: Storage> Covariates<'a, T, Buf> {
    /// Rows on the host only (each pass uploads them).
    pub fn host(host: &'a [T]) -> Self {
        Covariates { host, device: None }
    }

    /// The rows in a buffer of the pass's own (it keeps them for its backward): copied on the
    /// device where the step holds them there, otherwise uploaded.
    fn to_device<B: Backend<T, Buf = Buf>>(self, b: &B) -> Result<Buf> {
        match self.device {
            Some(on_device) => {
                let mut own = b.output_buf(self.host.len())?;
                b.copy(In::all(on_device), Out::all(&mut own))?;
                Ok(own)
            }
            None => b.upload(self.host),
        }
    }
}

/// What the encoders' sparse first layer makes of raw counts (scVI's log1p): a stager that
/// uploads a batch ahead builds the backward's transposed index for it.
pub const ENCODER_TRANSFORM: CountTransform = CountTransform::Log1p;

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
    pub var_eps: f64,
    pub batch_norm: bool,
    pub layer_norm: bool,
    pub encode_covariates: bool,
    pub deeply_inject_covariates: bool,
    /// Width of the one-hot covariates; the first `n_batch` columns are the batch.
    pub n_cov: usize,
    pub n_batch: usize,
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

impl<S, C> EncoderActs<S, C> {
    /// The counts as uploaded for the sparse first layer (None: the pass read log1p values):
    /// the decoder of the same rows reads them too, so a batch's counts cross once.
    pub fn counts(&self) -> Option<&C> {
        match &self.input {
            EncoderInput::Counts(c) => Some(c),
            EncoderInput::Log1p(_) => None,
        }
    }
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
            // scvi-tools' encoder injects what it sees as its decoder does.
            inject_every_layer: s.deeply_inject_covariates,
            batch_norm: s.batch_norm,
            layer_norm: s.layer_norm,
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
        // The log-variance head outputs ln(exp(·) + var_eps): scvi-tools' floored variance.
        let floor = if s.var_eps > 0.0 {
            Activation::LogAddExp(s.var_eps.ln() as f32)
        } else {
            Activation::Identity
        };
        let logvar = Dense::register(
            DenseSpec {
                act: floor,
                ..head(s.n_hidden, s.n_latent)
            },
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
    /// `uploaded`: `counts` already on the device.
    #[allow(clippy::too_many_arguments)] // the pass's inputs, as `run` takes them
    pub fn forward<T: Real, B: Backend<T>>(
        &self,
        b: &B,
        p: &Weights<'_, Buf<T, B>>,
        state: &mut Slots<'_, Buf<T, B>>,
        counts: CsrRef<'_, T>,
        uploaded: Option<B::Csr>,
        covariates: Covariates<'_, T, Buf<T, B>>,
        mode: Mode,
    ) -> Result<EncoderActs<Buf<T, B>, B::Csr>> {
        let counts_on_device = match uploaded {
            Some(c) => {
                assert!(
                    b.csr_shape(&c) == (counts.rows, counts.cols, counts.data.len()),
                    "encoder: the uploaded counts are not this batch's"
                );
                c
            }
            None => b.upload_csr(counts)?,
        };
        self.run(
            b,
            p,
            state,
            EncoderInput::Counts(counts_on_device),
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
        covariates: Covariates<'_, T, Buf<T, B>>,
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
        covariates: Covariates<'_, T, Buf<T, B>>,
        mode: Mode,
    ) -> Result<EncoderActs<Buf<T, B>, B::Csr>> {
        let cov = if self.encode_covariates {
            Some(Tensor {
                buf: covariates.to_device(b)?,
                rows,
                cols: covariates.host.len() / rows.max(1),
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
                transform: ENCODER_TRANSFORM,
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
        let mut dh = b.output_tensor(acts.rows, h.cols)?;
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
                let mut dx = b.output_tensor(t.rows, t.cols)?;
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

/// What every pass through a decoder computes first: the covariates on the device (and the
/// batch one-hot where the likelihood reads a per-batch table), the hidden layers, the main
/// head.
pub(crate) struct Trunk<S> {
    cov: Tensor<S>,
    onehot: Option<Tensor<S>>,
    hidden: Vec<DenseActs<S>>,
    main: DenseActs<S>,
}

/// The cycle pass through a decoder: activations and its expected expression.
pub(crate) struct CycleActs<S> {
    trunk: Trunk<S>,
    expected: Expected<S>,
}

/// z + covariates → hidden layers → the main head → the likelihood's parameters
/// ([`Observation`]) of one modality.
#[derive(Debug, Clone)]
pub(crate) struct Decoder {
    spec: ModalitySpec,
    n_cov: usize,
    n_batch: usize,
    n_hidden: usize,
    hidden: Mlp,
    /// μ-proportions (softmax) for NB/ZINB/Poisson, means for Gaussian, logits for Bernoulli,
    /// the NB mixture's foreground log-scale logit.
    main: Dense,
    observation: Observation,
}

/// A decoder pass: its reconstruction share (on the device) and what its backward needs.
pub(crate) type DecoderPass<S> = (Share<S>, DecoderActs<S>);

/// Everything the decoder's backward needs from its forward.
pub(crate) struct DecoderActs<S> {
    trunk: Trunk<S>,
    observation: ObservationActs<S>,
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
                layer_norm: s.layer_norm,
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
        let observation = Observation::register(prefix, spec, s, layout, state, site);
        Decoder {
            spec: spec.clone(),
            n_cov: s.n_cov,
            n_batch: s.n_batch,
            n_hidden: s.n_hidden,
            hidden,
            main,
            observation,
        }
    }

    /// A per-feature (or per-batch) log θ starts N(0, 1) like scvi-tools' px_r; the Gaussian
    /// log-variances start at 0 (σ² = 1).
    pub fn init<T: Real>(
        &self,
        layout: &Layout,
        state: &Layout,
        values: &mut [T],
        state_values: &mut [T],
        rng: &mut impl rand::Rng,
    ) {
        self.hidden.init(layout, state, values, state_values, rng);
        self.main.init(layout, state, values, state_values, rng);
        self.observation
            .init(layout, state, values, state_values, rng);
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
        uploaded: Option<&B::Csr>,
        covariates: Covariates<'_, T, Buf<T, B>>,
        weights: &[T],
        mode: Mode,
    ) -> Result<DecoderPass<Buf<T, B>>> {
        let (n, g) = (z.rows, self.spec.n_features);
        assert_eq!(
            (counts.rows, counts.cols),
            (n, g),
            "decoder {:?}: counts shape",
            self.spec.name
        );
        assert_eq!(weights.len(), n, "one weight per decoded cell");
        let trunk = self.trunk(b, p, state, z, covariates, mode)?;
        let h = Input::Dense(Mlp::output(&trunk.hidden));
        let negative: Vec<T> = weights.iter().map(|&w| T::zero() - w).collect();
        let negative = b.upload_weights(&negative)?;
        let mut ll = b.zeros(n)?;
        let site = Site {
            b,
            p,
            h: &h,
            main: &self.main,
            mode,
        };
        let rows = Rows {
            counts,
            uploaded,
            onehot: trunk.onehot.as_ref(),
            negative: &negative,
        };
        let observation = self
            .observation
            .forward(&site, state, &trunk.main, &rows, &mut ll)?;
        // The reconstruction stays on the device until the step reads its terms together.
        let reconstruction = Share {
            values: ll,
            reduce: Reduce::NegativeDot(weights.iter().map(|w| w.f64()).collect()),
        };
        Ok((reconstruction, DecoderActs { trunk, observation }))
    }

    /// Covariates → hidden layers → the main head, at `z`.
    fn trunk<T: Real, B: Backend<T>>(
        &self,
        b: &B,
        p: &Weights<'_, Buf<T, B>>,
        state: &mut Slots<'_, Buf<T, B>>,
        z: &Tensor<Buf<T, B>>,
        covariates: Covariates<'_, T, Buf<T, B>>,
        mode: Mode,
    ) -> Result<Trunk<Buf<T, B>>> {
        let (cov, onehot) = self.covariates(b, covariates, z.rows)?;
        let hidden = self
            .hidden
            .forward(b, p, state, &Input::Dense(z), Some(&cov), mode)?;
        let main =
            self.main
                .forward(b, p, state, &Input::Dense(Mlp::output(&hidden)), None, mode)?;
        Ok(Trunk {
            cov,
            onehot,
            hidden,
            main,
        })
    }

    /// The hidden layers' backward from dL/dh (the heads' input): their parameter gradients,
    /// and dL/dz.
    #[allow(clippy::too_many_arguments)] // the pass's inputs, saved activations and the views it writes
    fn trunk_backward<T: Real, B: Backend<T>>(
        &self,
        b: &B,
        p: &Weights<'_, Buf<T, B>>,
        grads: &mut Slots<'_, Buf<T, B>>,
        z: &Tensor<Buf<T, B>>,
        trunk: &Trunk<Buf<T, B>>,
        dh: Tensor<Buf<T, B>>,
        mode: Mode,
    ) -> Result<Tensor<Buf<T, B>>> {
        let mut dz = b.output_tensor(z.rows, z.cols)?;
        self.hidden.backward(
            b,
            p,
            grads,
            &Input::Dense(z),
            Some(&trunk.cov),
            &trunk.hidden,
            dh,
            mode,
            InputGrad::Write(&mut dz),
        )?;
        Ok(dz)
    }

    /// The NB mixture's log background table (batches × features), if this decoder has one.
    pub fn background_slot(&self) -> Option<usize> {
        self.observation.background_slot()
    }

    /// The covariates on the device, and their batch block alone where the likelihood reads a
    /// per-batch table (a gene-batch dispersion, the mixture's background).
    #[allow(clippy::type_complexity)] // views returned together to one caller; a named type would be used once
    fn covariates<T: Real, B: Backend<T>>(
        &self,
        b: &B,
        covariates: Covariates<'_, T, Buf<T, B>>,
        n: usize,
    ) -> Result<(Tensor<Buf<T, B>>, Option<Tensor<Buf<T, B>>>)> {
        assert_eq!(
            covariates.host.len(),
            n * self.n_cov,
            "covariates: {n} rows of {}",
            self.n_cov
        );
        let cov = Tensor {
            buf: covariates.to_device(b)?,
            rows: n,
            cols: self.n_cov,
        };
        // Taken from the covariates on the device: nothing crosses from the host, so a step
        // captured as a CUDA graph reads each replay's batch.
        let onehot = if self.observation.reads_onehot() {
            let mut onehot = b.output_tensor(n, self.n_batch.max(1))?;
            if self.n_batch == 0 {
                // Without a batch covariate every cell is in the table's one row.
                b.fill(onehot.output(), T::one())?;
            } else {
                b.leading_columns(cov.input(), self.n_cov, self.n_batch, onehot.output())?;
            }
            Some(onehot)
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
        f: DecoderActs<Buf<T, B>>,
        mode: Mode,
    ) -> Result<Tensor<Buf<T, B>>> {
        let h = Input::Dense(Mlp::output(&f.trunk.hidden));
        let mut dh = b.tensor(z.rows, self.n_hidden)?;
        let site = Site {
            b,
            p,
            h: &h,
            main: &self.main,
            mode,
        };
        self.observation.backward(
            &site,
            grads,
            &f.trunk.main,
            f.observation,
            f.trunk.onehot.as_ref(),
            &mut dh,
        )?;
        self.trunk_backward(b, p, grads, z, &f.trunk, dh, mode)
    }

    /// Whether the cycle-consistency pass can re-encode this modality's expected expression
    /// (a Gaussian's mean has no log1p).
    pub fn cycles(&self) -> bool {
        self.observation.cycles()
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
        covariates: Covariates<'_, T, Buf<T, B>>,
        library: f64,
        mode: Mode,
    ) -> Result<(Tensor<Buf<T, B>>, CycleActs<Buf<T, B>>)> {
        assert!(
            self.cycles(),
            "decoder {:?}: no log1p expression",
            self.spec.name
        );
        let trunk = self.trunk(b, p, state, z, covariates, mode)?;
        let h = Input::Dense(Mlp::output(&trunk.hidden));
        let site = Site {
            b,
            p,
            h: &h,
            main: &self.main,
            mode,
        };
        let expected = self.observation.cycle_forward(
            &site,
            state,
            &trunk.main,
            trunk.onehot.as_ref(),
            library,
        )?;
        let out = copy_of(b, &expected.log1p)?;
        Ok((out, CycleActs { trunk, expected }))
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
        let h = Input::Dense(Mlp::output(&a.trunk.hidden));
        let mut dh = b.tensor(z.rows, self.n_hidden)?;
        let site = Site {
            b,
            p,
            h: &h,
            main: &self.main,
            mode,
        };
        self.observation.cycle_backward(
            &site,
            grads,
            &a.trunk.main,
            a.trunk.onehot.as_ref(),
            a.expected,
            dlog1p,
            &mut dh,
        )?;
        self.trunk_backward(b, p, grads, z, &a.trunk, dh, mode)
    }

    /// The decoder's expression at `z` (evaluation mode); see [`Observation::expression`].
    pub fn expression<T: Real, B: Backend<T>>(
        &self,
        b: &B,
        p: &Weights<'_, Buf<T, B>>,
        state: &mut Slots<'_, Buf<T, B>>,
        z: &Tensor<Buf<T, B>>,
        covariates: Covariates<'_, T, Buf<T, B>>,
        library_size: f64,
    ) -> Result<Tensor<Buf<T, B>>> {
        let trunk = self.trunk(b, p, state, z, covariates, Mode::Eval)?;
        let h = Input::Dense(Mlp::output(&trunk.hidden));
        let site = Site {
            b,
            p,
            h: &h,
            main: &self.main,
            mode: Mode::Eval,
        };
        self.observation.expression(
            &site,
            state,
            &trunk.main,
            trunk.onehot.as_ref(),
            library_size,
        )
    }
}
