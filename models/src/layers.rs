//! Fully connected layers as scvi-tools' `FCLayers` builds them: Linear (with one-hot
//! covariates concatenated to the input, written as a second GEMM into the same output) →
//! BatchNorm → activation → dropout. Each layer keeps the slots of its tensors in the model's
//! parameter and state layouts; forward returns the activations the backward needs.

use rand::Rng;
use tessera_kernels::Real;
use tessera_kernels::backend::{Backend, In, Out, Result, Tensor};
use tessera_kernels::ops::elementwise::Activation;
use tessera_kernels::ops::linear::CountTransform;
use tessera_kernels::params::Layout;

pub type Buf<T, B> = <B as Backend<T>>::Buf;

/// The model's buffers as a layer sees them.
#[derive(Debug)]
pub struct Weights<'a, S> {
    pub layout: &'a Layout,
    pub values: &'a S,
}

impl<'a, S: tessera_kernels::backend::Storage> Weights<'a, S> {
    pub fn get(&self, slot: usize) -> In<'a, S> {
        In::part(self.values, self.layout.slots()[slot].range.clone())
    }
}

/// Two consecutive slots as one range (BatchNorm's γ then β, or running mean then variance).
fn pair_range(layout: &Layout, first: usize) -> std::ops::Range<usize> {
    let slots = layout.slots();
    slots[first].range.start..slots[first + 1].range.end
}

/// A writable buffer with the model's layout (gradients, or the BatchNorm state).
#[derive(Debug)]
pub struct Slots<'a, S> {
    pub layout: &'a Layout,
    pub buf: &'a mut S,
    /// Gradients only: the ranges anyone reads (query fine-tuning trains a few rows); a slot
    /// outside them may be skipped and keeps a stale value. None: every slot.
    pub needed: Option<&'a [std::ops::Range<usize>]>,
}

impl<'a, S: tessera_kernels::backend::Storage> Slots<'a, S> {
    /// Every slot of `buf`.
    pub fn all(layout: &'a Layout, buf: &'a mut S) -> Self {
        Slots {
            layout,
            buf,
            needed: None,
        }
    }

    /// Whether anyone reads `slot` (weight gradients of frozen layers are not computed).
    pub fn needed(&self, slot: usize) -> bool {
        let range = &self.layout.slots()[slot].range;
        self.needed.is_none_or(|needed| {
            needed
                .iter()
                .any(|r| r.start < range.end && range.start < r.end)
        })
    }

    /// Two consecutive slots, read-only.
    pub fn read_pair(&self, first: usize) -> In<'_, S> {
        In::part(self.buf, pair_range(self.layout, first))
    }

    pub fn get(&mut self, slot: usize) -> Out<'_, S> {
        Out::part(self.buf, self.layout.slots()[slot].range.clone())
    }

    pub fn pair(&mut self, first: usize) -> Out<'_, S> {
        Out::part(self.buf, pair_range(self.layout, first))
    }
}

/// A new tensor holding a copy of `t`.
pub(crate) fn copy_of<T: Real, B: Backend<T>>(
    b: &B,
    t: &Tensor<Buf<T, B>>,
) -> Result<Tensor<Buf<T, B>>> {
    let mut out = b.output_tensor(t.rows, t.cols)?;
    b.copy(t.input(), out.output())?;
    Ok(out)
}

/// Training draws dropout masks and latent noise from (seed, step) and updates BatchNorm's
/// running statistics; validation samples the latent like training but uses the running
/// statistics and no dropout (scvi-tools' validation ELBO); evaluation is deterministic (the
/// latent mean).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    Train { seed: u64, step: u64 },
    Validate { seed: u64, step: u64 },
    Eval,
}

impl Mode {
    /// The Philox stream of one random draw site in one step: the step in the high bits, the
    /// site below, so no two draws of a run share a stream.
    pub fn stream(step: u64, site: u64) -> u64 {
        (step << 20) | site
    }
}

/// What a layer reads: activations, or raw counts through the fused sparse first layer.
#[derive(Debug)]
pub enum Input<'a, S, C> {
    Dense(&'a Tensor<S>),
    Counts {
        csr: &'a C,
        transform: CountTransform,
        rows: usize,
    },
}

impl<S: tessera_kernels::backend::Storage, C> Input<'_, S, C> {
    pub fn rows(&self) -> usize {
        match self {
            Input::Dense(t) => t.rows,
            Input::Counts { rows, .. } => *rows,
        }
    }
}

#[derive(Debug, Clone)]
struct BatchNormSlots {
    /// γ, then β at `gamma + 1` (consecutive in the parameter layout).
    gamma: usize,
    /// Running mean, then running variance at `mean + 1` (consecutive in the state layout).
    mean: usize,
}

/// One layer: y = dropout(act(ln(bn(x W + c Wc + b)))), each of BatchNorm and LayerNorm
/// where asked for (scvi-tools' `FCLayers` order).
#[derive(Debug, Clone)]
pub struct Dense {
    pub d_in: usize,
    pub d_out: usize,
    /// Width of the one-hot covariates injected here (0: none).
    pub n_cov: usize,
    w: usize,
    wc: Option<usize>,
    b: usize,
    bn: Option<BatchNormSlots>,
    /// LayerNorm without an affine map (no parameters).
    layer_norm: bool,
    act: Activation,
    dropout: f32,
    /// The layer's random-draw site (dropout stream).
    site: u64,
}

/// What a backward does with the gradient of its input: several layers reading one tensor
/// (the encoder's mean and variance heads) add into one gradient.
#[derive(Debug)]
pub enum InputGrad<'a, S> {
    Skip,
    Write(&'a mut Tensor<S>),
    Add(&'a mut Tensor<S>),
}

/// Activations kept from the forward for the backward.
#[derive(Debug)]
pub struct DenseActs<S> {
    pre: Tensor<S>,
    normed: Option<Tensor<S>>,
    /// x̂ and 1/σ of a training-mode BatchNorm.
    bn_cache: Option<(Tensor<S>, S)>,
    /// 1/σ per row of the LayerNorm (its output, x̂, is `normed`).
    ln_inv_std: Option<S>,
    act: Option<Tensor<S>>,
    dropped: Option<Tensor<S>>,
}

impl<S> DenseActs<S> {
    pub fn output(&self) -> &Tensor<S> {
        self.dropped
            .as_ref()
            .or(self.act.as_ref())
            .or(self.normed.as_ref())
            .unwrap_or(&self.pre)
    }

    fn act_input(&self) -> &Tensor<S> {
        self.normed.as_ref().unwrap_or(&self.pre)
    }
}

/// The options of one layer.
#[derive(Debug, Clone, Copy)]
pub struct DenseSpec {
    pub d_in: usize,
    pub d_out: usize,
    pub n_cov: usize,
    pub batch_norm: bool,
    pub layer_norm: bool,
    pub act: Activation,
    pub dropout: f32,
}

/// BatchNorm as scvi-tools configures it.
const BN_MOMENTUM: f64 = 0.01;
const BN_EPS: f64 = 1e-3;
/// PyTorch's `nn.LayerNorm` default.
const LN_EPS: f64 = 1e-5;

impl Dense {
    /// Registers the layer's tensors under `name` (`name.w`, `name.wc`, `name.b`, `name.bn_*`).
    pub fn register(
        spec: DenseSpec,
        name: &str,
        params: &mut Layout,
        state: &mut Layout,
        site: u64,
    ) -> Dense {
        let w = params.add(&format!("{name}.w"), &[spec.d_in, spec.d_out]);
        let wc =
            (spec.n_cov > 0).then(|| params.add(&format!("{name}.wc"), &[spec.n_cov, spec.d_out]));
        let b = params.add(&format!("{name}.b"), &[spec.d_out]);
        let bn = spec.batch_norm.then(|| {
            let gamma = params.add(&format!("{name}.bn_gamma"), &[spec.d_out]);
            params.add(&format!("{name}.bn_beta"), &[spec.d_out]);
            let mean = state.add(&format!("{name}.bn_running_mean"), &[spec.d_out]);
            state.add(&format!("{name}.bn_running_var"), &[spec.d_out]);
            BatchNormSlots { gamma, mean }
        });
        Dense {
            d_in: spec.d_in,
            d_out: spec.d_out,
            n_cov: spec.n_cov,
            w,
            wc,
            b,
            bn,
            layer_norm: spec.layer_norm,
            act: spec.act,
            dropout: spec.dropout,
            site,
        }
    }

    /// PyTorch's `nn.Linear` initialisation (U(±1/√fan_in) for weights and bias, the covariate
    /// columns counting towards fan_in), BatchNorm γ = 1, β = 0, running var 1.
    pub fn init<T: Real>(
        &self,
        layout: &Layout,
        state: &Layout,
        values: &mut [T],
        state_values: &mut [T],
        rng: &mut impl Rng,
    ) {
        let bound = 1.0 / ((self.d_in + self.n_cov) as f64).sqrt();
        for slot in [Some(self.w), self.wc, Some(self.b)].into_iter().flatten() {
            for v in &mut values[layout.slots()[slot].range.clone()] {
                *v = T::of(rng.random_range(-bound..bound));
            }
        }
        if let Some(bn) = &self.bn {
            values[layout.slots()[bn.gamma].range.clone()]
                .iter_mut()
                .for_each(|v| *v = T::one());
            values[layout.slots()[bn.gamma + 1].range.clone()]
                .iter_mut()
                .for_each(|v| *v = T::zero());
            state_values[state.slots()[bn.mean].range.clone()]
                .iter_mut()
                .for_each(|v| *v = T::zero());
            state_values[state.slots()[bn.mean + 1].range.clone()]
                .iter_mut()
                .for_each(|v| *v = T::one());
        }
    }

    pub fn forward<T: Real, B: Backend<T>>(
        &self,
        b: &B,
        p: &Weights<'_, Buf<T, B>>,
        state: &mut Slots<'_, Buf<T, B>>,
        x: &Input<'_, Buf<T, B>, B::Csr>,
        cov: Option<&Tensor<Buf<T, B>>>,
        mode: Mode,
    ) -> Result<DenseActs<Buf<T, B>>> {
        let n = x.rows();
        let mut pre = b.output_tensor(n, self.d_out)?;
        match x {
            Input::Dense(t) => {
                assert_eq!((t.rows, t.cols), (n, self.d_in), "dense layer input shape");
                b.gemm(
                    false,
                    false,
                    n,
                    self.d_in,
                    self.d_out,
                    T::one(),
                    t.input(),
                    p.get(self.w),
                    T::zero(),
                    pre.output(),
                )?;
            }
            Input::Counts { csr, transform, .. } => {
                b.sparse_input_forward(csr, *transform, p.get(self.w), self.d_out, pre.output())?
            }
        }
        if let Some(wc) = self.wc {
            let c = cov.expect("a layer with covariate weights needs the covariates");
            b.gemm(
                false,
                false,
                n,
                self.n_cov,
                self.d_out,
                T::one(),
                c.input(),
                p.get(wc),
                T::one(),
                pre.output(),
            )?;
        }
        b.bias_add(pre.output(), p.get(self.b))?;
        let mut acts = DenseActs {
            pre,
            normed: None,
            bn_cache: None,
            ln_inv_std: None,
            act: None,
            dropped: None,
        };
        if let Some(bn) = &self.bn {
            let mut y = b.output_tensor(n, self.d_out)?;
            if let Mode::Train { .. } = mode {
                let mut xhat = b.output_tensor(n, self.d_out)?;
                let mut inv_std = b.output_buf(self.d_out)?;
                b.batch_norm_train(
                    acts.pre.input(),
                    p.get(bn.gamma),
                    p.get(bn.gamma + 1),
                    state.pair(bn.mean),
                    BN_MOMENTUM,
                    BN_EPS,
                    y.output(),
                    xhat.output(),
                    Out::all(&mut inv_std),
                )?;
                acts.bn_cache = Some((xhat, inv_std));
            } else {
                b.batch_norm_eval(
                    acts.pre.input(),
                    p.get(bn.gamma),
                    p.get(bn.gamma + 1),
                    state.read_pair(bn.mean),
                    BN_EPS,
                    y.output(),
                )?;
            }
            acts.normed = Some(y);
        }
        if self.layer_norm {
            let (mut y, mut inv_std) = (b.output_tensor(n, self.d_out)?, b.output_buf(n)?);
            b.layer_norm_forward(
                acts.act_input().input(),
                self.d_out,
                LN_EPS,
                y.output(),
                Out::all(&mut inv_std),
            )?;
            (acts.normed, acts.ln_inv_std) = (Some(y), Some(inv_std));
        }
        if self.act != Activation::Identity {
            let mut y = b.output_tensor(n, self.d_out)?;
            b.activation_forward(self.act, acts.act_input().input(), y.output())?;
            acts.act = Some(y);
        }
        if let (Mode::Train { seed, step }, true) = (mode, self.dropout > 0.0) {
            let mut y = b.output_tensor(n, self.d_out)?;
            b.dropout(
                acts.output().input(),
                self.dropout,
                seed,
                Mode::stream(step, self.site),
                y.output(),
            )?;
            acts.dropped = Some(y);
        }
        Ok(acts)
    }

    /// Writes this layer's parameter gradients, and dL/dx as `dx` asks.
    #[allow(clippy::too_many_arguments)] // the pass's inputs, saved activations and the views it writes
    pub fn backward<T: Real, B: Backend<T>>(
        &self,
        b: &B,
        p: &Weights<'_, Buf<T, B>>,
        grads: &mut Slots<'_, Buf<T, B>>,
        x: &Input<'_, Buf<T, B>, B::Csr>,
        cov: Option<&Tensor<Buf<T, B>>>,
        acts: &DenseActs<Buf<T, B>>,
        dy: Tensor<Buf<T, B>>,
        mode: Mode,
        dx: InputGrad<'_, Buf<T, B>>,
    ) -> Result<()> {
        let n = x.rows();
        let mut d = dy;
        if let (Mode::Train { seed, step }, true) = (mode, acts.dropped.is_some()) {
            let mut dd = b.output_tensor(n, self.d_out)?;
            b.dropout(
                d.input(),
                self.dropout,
                seed,
                Mode::stream(step, self.site),
                dd.output(),
            )?;
            d = dd;
        }
        if let Some(y) = &acts.act {
            let mut dd = b.output_tensor(n, self.d_out)?;
            b.activation_backward(
                self.act,
                acts.act_input().input(),
                y.input(),
                d.input(),
                dd.output(),
            )?;
            d = dd;
        }
        if let (Some(y), Some(inv_std)) = (&acts.normed, &acts.ln_inv_std) {
            let mut dd = b.output_tensor(n, self.d_out)?;
            b.layer_norm_backward(y.input(), In::all(inv_std), d.input(), dd.output())?;
            d = dd;
        }
        if let (Some(bn), Some((xhat, inv_std))) = (&self.bn, &acts.bn_cache) {
            let mut dd = b.output_tensor(n, self.d_out)?;
            b.batch_norm_backward(
                xhat.input(),
                In::all(inv_std),
                p.get(bn.gamma),
                d.input(),
                dd.output(),
                grads.pair(bn.gamma),
            )?;
            d = dd;
        }
        // A frozen layer's weight gradient is nobody's: only its input gradient is needed.
        if grads.needed(self.w) {
            match x {
                Input::Dense(t) => b.gemm(
                    true,
                    false,
                    self.d_in,
                    n,
                    self.d_out,
                    T::one(),
                    t.input(),
                    d.input(),
                    T::zero(),
                    grads.get(self.w),
                )?,
                Input::Counts { csr, transform, .. } => b.sparse_input_backward(
                    csr,
                    *transform,
                    d.input(),
                    self.d_out,
                    grads.get(self.w),
                )?,
            }
        }
        if let Some(wc) = self.wc.filter(|&wc| grads.needed(wc)) {
            let c = cov.expect("a layer with covariate weights needs the covariates");
            b.gemm(
                true,
                false,
                self.n_cov,
                n,
                self.d_out,
                T::one(),
                c.input(),
                d.input(),
                T::zero(),
                grads.get(wc),
            )?;
        }
        if grads.needed(self.b) {
            b.column_sums(d.input(), grads.get(self.b))?;
        }
        let (target, beta) = match dx {
            InputGrad::Skip => return Ok(()),
            InputGrad::Write(t) => (t, T::zero()),
            InputGrad::Add(t) => (t, T::one()),
        };
        assert_eq!(
            (target.rows, target.cols),
            (n, self.d_in),
            "input gradient shape"
        );
        b.gemm(
            false,
            true,
            n,
            self.d_out,
            self.d_in,
            T::one(),
            d.input(),
            p.get(self.w),
            beta,
            target.output(),
        )
    }
}

/// scvi-tools' `FCLayers`: `n_layers` layers of `n_hidden`, covariates injected into the first
/// layer (or every layer), BatchNorm and/or LayerNorm, ReLU, dropout.
#[derive(Debug, Clone)]
pub struct Mlp {
    pub layers: Vec<Dense>,
}

#[derive(Debug, Clone, Copy)]
pub struct MlpSpec {
    pub d_in: usize,
    pub n_hidden: usize,
    pub n_layers: usize,
    pub n_cov: usize,
    pub inject_every_layer: bool,
    pub batch_norm: bool,
    pub layer_norm: bool,
    pub dropout: f32,
}

impl Mlp {
    /// Registers the layers `name.0`, `name.1`, ...; their dropout sites are `site`, `site+1`, ...
    pub fn register(
        spec: MlpSpec,
        name: &str,
        params: &mut Layout,
        state: &mut Layout,
        site: u64,
    ) -> Mlp {
        let layers = (0..spec.n_layers)
            .map(|i| {
                let layer = DenseSpec {
                    d_in: if i == 0 { spec.d_in } else { spec.n_hidden },
                    d_out: spec.n_hidden,
                    n_cov: if i == 0 || spec.inject_every_layer {
                        spec.n_cov
                    } else {
                        0
                    },
                    batch_norm: spec.batch_norm,
                    layer_norm: spec.layer_norm,
                    act: Activation::Relu,
                    dropout: spec.dropout,
                };
                Dense::register(
                    layer,
                    &format!("{name}.{i}"),
                    params,
                    state,
                    site + i as u64,
                )
            })
            .collect();
        Mlp { layers }
    }

    pub fn init<T: Real>(
        &self,
        layout: &Layout,
        state: &Layout,
        values: &mut [T],
        state_values: &mut [T],
        rng: &mut impl Rng,
    ) {
        for l in &self.layers {
            l.init(layout, state, values, state_values, rng);
        }
    }

    pub fn forward<T: Real, B: Backend<T>>(
        &self,
        b: &B,
        p: &Weights<'_, Buf<T, B>>,
        state: &mut Slots<'_, Buf<T, B>>,
        x: &Input<'_, Buf<T, B>, B::Csr>,
        cov: Option<&Tensor<Buf<T, B>>>,
        mode: Mode,
    ) -> Result<Vec<DenseActs<Buf<T, B>>>> {
        let mut acts: Vec<DenseActs<Buf<T, B>>> = Vec::with_capacity(self.layers.len());
        for (i, layer) in self.layers.iter().enumerate() {
            let a = match acts.last() {
                None => layer.forward(b, p, state, x, cov, mode)?,
                Some(prev) => {
                    layer.forward(b, p, state, &Input::Dense(prev.output()), cov, mode)?
                }
            };
            debug_assert_eq!(a.output().cols, self.layers[i].d_out);
            acts.push(a);
        }
        Ok(acts)
    }

    /// The output: the last layer's activations (the input itself for zero layers is not
    /// supported: every model has at least one hidden layer).
    pub fn output<S>(acts: &[DenseActs<S>]) -> &Tensor<S> {
        acts.last().expect("an MLP has at least one layer").output()
    }

    #[allow(clippy::too_many_arguments)] // the pass's inputs, saved activations and the views it writes
    pub fn backward<T: Real, B: Backend<T>>(
        &self,
        b: &B,
        p: &Weights<'_, Buf<T, B>>,
        grads: &mut Slots<'_, Buf<T, B>>,
        x: &Input<'_, Buf<T, B>, B::Csr>,
        cov: Option<&Tensor<Buf<T, B>>>,
        acts: &[DenseActs<Buf<T, B>>],
        dy: Tensor<Buf<T, B>>,
        mode: Mode,
        dx: InputGrad<'_, Buf<T, B>>,
    ) -> Result<()> {
        let mut d = dy;
        for i in (1..self.layers.len()).rev() {
            let input = acts[i - 1].output();
            let mut dprev = b.output_tensor(input.rows, input.cols)?;
            self.layers[i].backward(
                b,
                p,
                grads,
                &Input::Dense(input),
                cov,
                &acts[i],
                d,
                mode,
                InputGrad::Write(&mut dprev),
            )?;
            d = dprev;
        }
        self.layers[0].backward(b, p, grads, x, cov, &acts[0], d, mode, dx)
    }
}
