//! The device abstraction models are written against: a buffer type, views into it, and the op
//! set, implemented once for the CPU (any `Gemm` scalar, so models gradient-check in f64) and
//! once for CUDA (f32). A model holds its parameters in one flat buffer and reaches each tensor
//! through a view ([`In`]/[`Out`] = buffer + element range), so the optimiser and the all-reduce
//! each see one buffer whatever the device.
//!
//! Ops take their outputs as views and overwrite them (never allocate), except where an
//! argument says otherwise (GEMM's `beta`). A model allocates its activations per step; on the
//! GPU those buffers come back to a cache when dropped (`crate::cuda_cache`), so a steady step
//! asks the driver for no memory.

use std::ops::Range;
use std::sync::Arc;

use crate::ops::elementwise::Activation;
use crate::ops::likelihood::Likelihood;
use crate::ops::linear::{CountTransform, CsrRef};
use crate::ops::optim::AdamW;
use crate::real::Real;

pub mod cpu;
pub mod cuda;

pub use cpu::Cpu;
pub use cuda::Cuda;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Cuda(#[from] crate::cuda::CudaError),
}

pub type Result<T> = std::result::Result<T, EngineError>;

/// A device buffer of scalars.
pub trait Storage {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<T> Storage for Vec<T> {
    fn len(&self) -> usize {
        Vec::len(self)
    }
}

/// A read-only view: elements `range` of `buf`.
#[derive(Debug)]
pub struct In<'a, S> {
    pub buf: &'a S,
    pub range: Range<usize>,
}

impl<S> Clone for In<'_, S> {
    fn clone(&self) -> Self {
        In {
            buf: self.buf,
            range: self.range.clone(),
        }
    }
}

/// A writable view: elements `range` of `buf`.
#[derive(Debug)]
pub struct Out<'a, S> {
    pub buf: &'a mut S,
    pub range: Range<usize>,
}

impl<'a, S: Storage> In<'a, S> {
    pub fn all(buf: &'a S) -> Self {
        In {
            range: 0..buf.len(),
            buf,
        }
    }

    pub fn part(buf: &'a S, range: Range<usize>) -> Self {
        assert!(
            range.end <= buf.len(),
            "view {range:?} of a buffer of {}",
            buf.len()
        );
        In { buf, range }
    }

    pub fn len(&self) -> usize {
        self.range.len()
    }

    pub fn is_empty(&self) -> bool {
        self.range.is_empty()
    }
}

impl<'a, S: Storage> Out<'a, S> {
    pub fn all(buf: &'a mut S) -> Self {
        Out {
            range: 0..buf.len(),
            buf,
        }
    }

    pub fn part(buf: &'a mut S, range: Range<usize>) -> Self {
        assert!(
            range.end <= buf.len(),
            "view {range:?} of a buffer of {}",
            buf.len()
        );
        Out { buf, range }
    }
}

/// A batch's label codes (-1 = unlabelled): the host's, or already on the device as f32 codes
/// (exact below 2^24), as a step staged with its batch or captured as a CUDA graph reads them.
#[derive(Debug, Clone)]
pub enum Labels<'a, S> {
    Host(&'a [i32]),
    Device(In<'a, S>),
}

impl<S: Storage> Labels<'_, S> {
    /// How many rows are labelled (or not).
    pub fn len(&self) -> usize {
        match self {
            Labels::Host(labels) => labels.len(),
            Labels::Device(labels) => labels.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A row-major matrix on a device: a buffer and its shape.
#[derive(Debug)]
pub struct Tensor<S> {
    pub buf: S,
    pub rows: usize,
    pub cols: usize,
}

impl<S: Storage> Tensor<S> {
    pub fn input(&self) -> In<'_, S> {
        In::all(&self.buf)
    }

    pub fn output(&mut self) -> Out<'_, S> {
        Out::all(&mut self.buf)
    }
}

/// The op set, with the CPU reference semantics of `crate::ops` (each method names the function
/// it mirrors). Shapes are asserted: a mismatch is a programming error, not a data error.
#[allow(clippy::too_many_arguments)] // an op's operands, outputs and shape, as its kernel takes them
pub trait Backend<T: Real>: std::fmt::Debug + Clone + Send + Sync {
    type Buf: Storage + Send + Sync + std::fmt::Debug;
    /// A count matrix uploaded for the sparse first layer.
    type Csr: Send + Sync;
    /// A count matrix whose upload was started by [`Backend::stage_csr`] (or whose rows
    /// [`Backend::stage_rows`] named).
    type Staged: Send;
    /// Host values on their way to the device ([`Backend::stage_values`]).
    type StagedValues: Send;
    /// A count matrix kept on the device for a whole run ([`Backend::resident_csr`]).
    type Resident: Send + Sync;
    /// Values on their way to the host ([`Backend::start_download`]).
    type Download: Send + std::fmt::Debug;

    /// "cpu" or "cuda:<ordinal>", for logs and benchmark tables.
    fn name(&self) -> String;

    /// Waits until every op queued so far has finished (a no-op where ops run synchronously):
    /// for timing; results need no wait, downloads are ordered after the ops before them.
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    fn zeros(&self, n: usize) -> Result<Self::Buf>;
    fn upload(&self, host: &[T]) -> Result<Self::Buf>;
    /// [`Backend::upload`] of a vector the caller gives up (the CPU keeps it without a copy).
    fn upload_vec(&self, host: Vec<T>) -> Result<Self::Buf> {
        self.upload(&host)
    }
    fn download(&self, x: In<'_, Self::Buf>) -> Result<Vec<T>>;
    /// The views' values, gathered into one buffer and downloaded once: a GPU waits for them
    /// once, not once per view.
    fn download_together(&self, views: &[In<'_, Self::Buf>]) -> Result<Vec<Vec<T>>> {
        let started = self.start_download(views)?;
        self.finish_download(started)
    }
    /// Starts copying the views to the host together, after the ops queued so far, without
    /// waiting for them: the host queues more work and waits in
    /// [`Backend::finish_download`] only when it needs the values (a GPU then has that work
    /// to run meanwhile). Where ops run synchronously the values are read at once.
    fn start_download(&self, views: &[In<'_, Self::Buf>]) -> Result<Self::Download>;
    /// The views of [`Backend::start_download`], each in its place.
    fn finish_download(&self, started: Self::Download) -> Result<Vec<Vec<T>>>;
    /// Zeros into a view.
    fn zero(&self, y: Out<'_, Self::Buf>) -> Result<()>;
    /// `value` into every entry of a view (on a GPU a memset of its bits: nothing copied from
    /// the host).
    fn fill(&self, y: Out<'_, Self::Buf>, value: T) -> Result<()>;
    /// [`Backend::upload`] of per-row weights: where they are one value repeated (a batch whose
    /// cells all weigh the same, as most do), a buffer filled with it on the device instead, so a
    /// GPU step copies nothing from pageable host memory for them.
    fn upload_weights(&self, host: &[T]) -> Result<Self::Buf> {
        match host.first() {
            Some(&first) if host.iter().all(|&v| v == first) => {
                let mut y = self.output_buf(host.len())?;
                self.fill(Out::all(&mut y), first)?;
                Ok(y)
            }
            _ => self.upload(host),
        }
    }
    /// A step's per-row KL weights, `kl_weight × shares[r]` (each product in f64). A GPU fills
    /// them on the device where the shares are one value repeated, reading the KL weight from
    /// a device cell (`Gpu::kl_weight_cell`), so a step captured as a CUDA graph serves every
    /// KL weight of a warm-up.
    fn kl_weights(&self, shares: &[f64], kl_weight: f64) -> Result<Self::Buf> {
        self.upload_weights(&kl_products(shares, kl_weight))
    }
    /// Host values into an existing view (a step's small control values, a staged reduction).
    fn write(&self, host: &[T], y: Out<'_, Self::Buf>) -> Result<()>;
    /// The buffer as host memory, where it is host memory (the CPU): the TCP all-reduce then
    /// works in place instead of staging through a download and an upload.
    fn host_mut<'a>(&self, _buf: &'a mut Self::Buf) -> Option<&'a mut [T]> {
        None
    }
    fn copy(&self, x: In<'_, Self::Buf>, y: Out<'_, Self::Buf>) -> Result<()>;
    /// y += alpha x (gradients of a tensor read by several consumers).
    fn axpy(&self, alpha: T, x: In<'_, Self::Buf>, y: Out<'_, Self::Buf>) -> Result<()>;
    /// y *= alpha.
    fn scale(&self, y: Out<'_, Self::Buf>, alpha: T) -> Result<()>;

    fn tensor(&self, rows: usize, cols: usize) -> Result<Tensor<Self::Buf>> {
        Ok(Tensor {
            buf: self.zeros(rows * cols)?,
            rows,
            cols,
        })
    }

    /// A buffer the next op overwrites whole (its output); what it holds until then is
    /// unspecified. The CPU zeros it; a GPU leaves out the memset, one call fewer for each
    /// activation and gradient of a step. Never for a buffer something adds into.
    fn output_buf(&self, n: usize) -> Result<Self::Buf> {
        self.zeros(n)
    }

    /// [`Backend::tensor`] by [`Backend::output_buf`]: for an op's output only.
    fn output_tensor(&self, rows: usize, cols: usize) -> Result<Tensor<Self::Buf>> {
        Ok(Tensor {
            buf: self.output_buf(rows * cols)?,
            rows,
            cols,
        })
    }

    fn upload_csr(&self, x: CsrRef<'_, T>) -> Result<Self::Csr>;
    /// Starts uploading `x` from any thread, with the transposed index the sparse layer's
    /// backward reads for `transform` (the CPU makes it on that thread; a GPU copies the matrix
    /// on a second stream from page-locked memory, so the next batch's upload overlaps this
    /// step's compute, and indexes it on the device, or copies an index made on that thread
    /// where a row repeats a gene).
    fn stage_csr(&self, x: CsrRef<'_, T>, transform: CountTransform) -> Result<Self::Staged>;
    /// The staged matrix as [`Backend::upload_csr`] gives it, ready for the ops queued after
    /// this call (they wait for its copy on the device, not on the host).
    fn staged_csr(&self, x: Self::Staged) -> Result<Self::Csr>;
    /// Starts uploading `host` (a batch's covariates) from any thread, as
    /// [`Backend::stage_csr`] does a matrix: a GPU copies it on the copy stream from
    /// page-locked memory, so the step that reads it copies nothing from pageable memory.
    fn stage_values(&self, host: &[T]) -> Result<Self::StagedValues>;
    /// The staged values in a buffer of their own, ready for the ops queued after this call.
    fn staged_values(&self, x: Self::StagedValues) -> Result<Self::Buf>;
    /// The host rows an uploaded count matrix was made from, where the backend keeps them
    /// (a GPU keeps none for a batch whose rows name each gene once, staged or gathered).
    fn csr_rows<'a>(&self, x: &'a Self::Csr) -> Option<CsrRef<'a, T>>;
    /// An uploaded count matrix's rows, columns and non-zeros.
    fn csr_shape(&self, x: &Self::Csr) -> (usize, usize, usize);
    /// `ops::linear::row_sums` of an uploaded count matrix (library sizes), one per row.
    fn csr_row_sums(&self, x: &Self::Csr, out: Out<'_, Self::Buf>) -> Result<()>;
    /// `x`'s rows `times` over, in order (`ops::linear::gather_rows` of them repeated), made
    /// where `x` is.
    fn csr_tiled(&self, x: &Self::Csr, times: usize) -> Result<Self::Csr>;
    /// `ops::linear::csr_dense`: `x` as a dense matrix (`binary`: positive values as 1), made
    /// where `x` is (on a GPU nothing crosses from the host).
    fn csr_dense(&self, x: &Self::Csr, binary: bool, out: Out<'_, Self::Buf>) -> Result<()>;

    /// Memory the device has free for data kept there for a run, in bytes; None where the
    /// device's memory is the host's (the CPU: a resident copy would only duplicate it).
    fn free_memory(&self) -> Result<Option<u64>> {
        Ok(None)
    }
    /// Keeps `x` on the device for a run. Its entries must be in range and no row may name a
    /// column twice (`ops::linear::repeats_a_column`).
    fn resident_csr(&self, x: CsrRef<'_, T>) -> Result<Self::Resident>;
    /// Starts making rows `rows` of a resident matrix (in that order) a batch, with the
    /// transposed index for `transform`, from any thread; [`Backend::staged_csr`] takes it.
    /// The same matrix as [`Backend::stage_csr`] of those rows (`ops::linear::gather_rows`),
    /// but only the row list crosses to the device.
    fn stage_rows(
        &self,
        x: &Arc<Self::Resident>,
        rows: &[usize],
        transform: CountTransform,
    ) -> Result<Self::Staged>;

    /// `ops::linear::Gemm::gemm`: C = alpha op(A) op(B) + beta C, row-major.
    fn gemm(
        &self,
        ta: bool,
        tb: bool,
        m: usize,
        k: usize,
        n: usize,
        alpha: T,
        a: In<'_, Self::Buf>,
        b: In<'_, Self::Buf>,
        beta: T,
        c: Out<'_, Self::Buf>,
    ) -> Result<()>;
    /// `ops::linear::sparse_input_forward`.
    fn sparse_input_forward(
        &self,
        x: &Self::Csr,
        transform: CountTransform,
        w: In<'_, Self::Buf>,
        d_out: usize,
        y: Out<'_, Self::Buf>,
    ) -> Result<()>;
    /// `ops::linear::sparse_input_backward` (overwrites dw).
    fn sparse_input_backward(
        &self,
        x: &Self::Csr,
        transform: CountTransform,
        dy: In<'_, Self::Buf>,
        d_out: usize,
        dw: Out<'_, Self::Buf>,
    ) -> Result<()>;

    fn activation_forward(
        &self,
        act: Activation,
        x: In<'_, Self::Buf>,
        y: Out<'_, Self::Buf>,
    ) -> Result<()>;
    fn activation_backward(
        &self,
        act: Activation,
        x: In<'_, Self::Buf>,
        y: In<'_, Self::Buf>,
        dy: In<'_, Self::Buf>,
        dx: Out<'_, Self::Buf>,
    ) -> Result<()>;
    fn bias_add(&self, y: Out<'_, Self::Buf>, bias: In<'_, Self::Buf>) -> Result<()>;
    fn column_sums(&self, m: In<'_, Self::Buf>, out: Out<'_, Self::Buf>) -> Result<()>;
    fn scale_rows(
        &self,
        x: In<'_, Self::Buf>,
        s: In<'_, Self::Buf>,
        y: Out<'_, Self::Buf>,
    ) -> Result<()>;
    /// `ops::elementwise::leading_columns`: the first `k` of `x`'s `cols` columns.
    fn leading_columns(
        &self,
        x: In<'_, Self::Buf>,
        cols: usize,
        k: usize,
        out: Out<'_, Self::Buf>,
    ) -> Result<()>;
    /// `ops::elementwise::first_positive`: per row of `x` (`cols` columns), the first of its
    /// leading `k` columns above zero as an f32 code, -1 where none is (a batch code).
    fn first_positive(
        &self,
        x: In<'_, Self::Buf>,
        cols: usize,
        k: usize,
        out: Out<'_, Self::Buf>,
    ) -> Result<()>;
    /// `ops::elementwise::gather_rows`: out[i] = table[codes[i]] (rows of `cols`).
    fn gather_rows(
        &self,
        table: In<'_, Self::Buf>,
        codes: &[usize],
        cols: usize,
        out: Out<'_, Self::Buf>,
    ) -> Result<()>;
    /// `ops::elementwise::scatter_add_rows`: table (overwritten) row c = Σ_{i: codes[i] = c} x[i].
    fn scatter_add_rows(
        &self,
        x: In<'_, Self::Buf>,
        codes: &[usize],
        cols: usize,
        table: Out<'_, Self::Buf>,
    ) -> Result<()>;
    /// `ops::dropout::dropout_forward`; the backward is the same call on dy.
    fn dropout(
        &self,
        x: In<'_, Self::Buf>,
        p: f32,
        seed: u64,
        stream: u64,
        y: Out<'_, Self::Buf>,
    ) -> Result<()>;
    /// `ops::dropout::normal_fill`.
    fn normal(&self, seed: u64, stream: u64, out: Out<'_, Self::Buf>) -> Result<()>;

    /// `ops::norm::batch_norm_train`. `running` holds the running mean then the running variance
    /// (2 x features, updated in place); one view, because both usually sit in one state buffer.
    fn batch_norm_train(
        &self,
        x: In<'_, Self::Buf>,
        gamma: In<'_, Self::Buf>,
        beta: In<'_, Self::Buf>,
        running: Out<'_, Self::Buf>,
        momentum: f64,
        eps: f64,
        y: Out<'_, Self::Buf>,
        xhat: Out<'_, Self::Buf>,
        inv_std: Out<'_, Self::Buf>,
    ) -> Result<()>;
    /// `ops::norm::batch_norm_eval`, `running` as above.
    fn batch_norm_eval(
        &self,
        x: In<'_, Self::Buf>,
        gamma: In<'_, Self::Buf>,
        beta: In<'_, Self::Buf>,
        running: In<'_, Self::Buf>,
        eps: f64,
        y: Out<'_, Self::Buf>,
    ) -> Result<()>;
    /// `ops::norm::batch_norm_backward`; `dgamma_beta` receives dγ then dβ (2 x features: one
    /// view, because both sit in the one gradient buffer).
    fn batch_norm_backward(
        &self,
        xhat: In<'_, Self::Buf>,
        inv_std: In<'_, Self::Buf>,
        gamma: In<'_, Self::Buf>,
        dy: In<'_, Self::Buf>,
        dx: Out<'_, Self::Buf>,
        dgamma_beta: Out<'_, Self::Buf>,
    ) -> Result<()>;
    /// `ops::norm::layer_norm_forward` (no affine map): rows of `features`, y = x̂, 1/σ per row.
    fn layer_norm_forward(
        &self,
        x: In<'_, Self::Buf>,
        features: usize,
        eps: f64,
        y: Out<'_, Self::Buf>,
        inv_std: Out<'_, Self::Buf>,
    ) -> Result<()>;
    /// `ops::norm::layer_norm_backward` from the forward's y and 1/σ.
    fn layer_norm_backward(
        &self,
        y: In<'_, Self::Buf>,
        inv_std: In<'_, Self::Buf>,
        dy: In<'_, Self::Buf>,
        dx: Out<'_, Self::Buf>,
    ) -> Result<()>;
    fn softmax_forward(
        &self,
        x: In<'_, Self::Buf>,
        features: usize,
        y: Out<'_, Self::Buf>,
    ) -> Result<()>;
    fn softmax_backward(
        &self,
        y: In<'_, Self::Buf>,
        dy: In<'_, Self::Buf>,
        features: usize,
        dx: Out<'_, Self::Buf>,
    ) -> Result<()>;

    fn reparameterize_forward(
        &self,
        m: In<'_, Self::Buf>,
        lv: In<'_, Self::Buf>,
        eps: In<'_, Self::Buf>,
        z: Out<'_, Self::Buf>,
    ) -> Result<()>;
    fn reparameterize_backward(
        &self,
        lv: In<'_, Self::Buf>,
        eps: In<'_, Self::Buf>,
        dz: In<'_, Self::Buf>,
        dm: Out<'_, Self::Buf>,
        dlv: Out<'_, Self::Buf>,
    ) -> Result<()>;
    /// `ops::gaussian::kl_standard_normal`: per-row KL, and gradients of Σ_r w_r KL_r
    /// (overwritten).
    fn kl_standard_normal(
        &self,
        m: In<'_, Self::Buf>,
        lv: In<'_, Self::Buf>,
        dim: usize,
        weights: Option<In<'_, Self::Buf>>,
        kl: Out<'_, Self::Buf>,
        dm: Out<'_, Self::Buf>,
        dlv: Out<'_, Self::Buf>,
    ) -> Result<()>;
    /// `ops::gaussian::poe_forward`; `present[e]` holds 1 (0) per row where expert e is
    /// present (absent).
    fn poe_forward(
        &self,
        means: &[In<'_, Self::Buf>],
        logvars: &[In<'_, Self::Buf>],
        present: &[In<'_, Self::Buf>],
        dim: usize,
        m: Out<'_, Self::Buf>,
        lv: Out<'_, Self::Buf>,
    ) -> Result<()>;
    /// `ops::gaussian::poe_backward` (overwrites every expert's gradients).
    fn poe_backward(
        &self,
        means: &[In<'_, Self::Buf>],
        logvars: &[In<'_, Self::Buf>],
        present: &[In<'_, Self::Buf>],
        dim: usize,
        m: In<'_, Self::Buf>,
        lv: In<'_, Self::Buf>,
        dm: In<'_, Self::Buf>,
        dlv: In<'_, Self::Buf>,
        dmeans: &mut [Out<'_, Self::Buf>],
        dlogvars: &mut [Out<'_, Self::Buf>],
    ) -> Result<()>;
    /// `Likelihood::forward_backward`: per-row log-likelihood and per-entry gradients.
    fn likelihood(
        &self,
        family: Likelihood,
        x: In<'_, Self::Buf>,
        features: usize,
        params: &[In<'_, Self::Buf>],
        weights: Option<In<'_, Self::Buf>>,
        ll: Out<'_, Self::Buf>,
        grads: &mut [Out<'_, Self::Buf>],
    ) -> Result<()>;

    /// `ops::likelihood::softmax_nb`: scVI's reconstruction term, μ = library · softmax(logits)
    /// and NB(counts; μ, θ) with one θ per gene; `ll` per row, gradients of Σ w ll w.r.t. the
    /// logits and θ (overwritten). `counts` are the batch's rows as uploaded for the encoder's
    /// sparse first layer ([`Backend::upload_csr`]): one upload serves both. The default
    /// composes the tested ops ([`softmax_nb_composed`]); a backend overrides it with one pass.
    fn softmax_nb(
        &self,
        logits: In<'_, Self::Buf>,
        library: In<'_, Self::Buf>,
        counts: &Self::Csr,
        theta: In<'_, Self::Buf>,
        weights: In<'_, Self::Buf>,
        ll: Out<'_, Self::Buf>,
        dlogits: Out<'_, Self::Buf>,
        dtheta: Out<'_, Self::Buf>,
    ) -> Result<()> {
        softmax_nb_composed(
            self,
            logits,
            library,
            self.csr_rows(counts)
                .expect("a backend without its own softmax_nb keeps its batches' host rows"),
            theta,
            weights,
            ll,
            dlogits,
            dtheta,
        )
    }

    /// `ops::likelihood::nb_mixture`: totalVI's protein likelihood per row and its per-entry
    /// gradients w.r.t. μ_back, μ_fore, θ and the mixing logit (unweighted; overwritten).
    fn nb_mixture(
        &self,
        x: In<'_, Self::Buf>,
        mu_back: In<'_, Self::Buf>,
        mu_fore: In<'_, Self::Buf>,
        theta: In<'_, Self::Buf>,
        pi: In<'_, Self::Buf>,
        features: usize,
        ll: Out<'_, Self::Buf>,
        grads: [Out<'_, Self::Buf>; 4],
    ) -> Result<()>;

    /// `ops::losses::mmd_rbf`: squared MMD between the rows of `x` and of `y` (sum of RBF
    /// kernels) into `value` (one entry, left on the device), and its gradients (overwritten).
    #[allow(clippy::too_many_arguments)] // the op's inputs, its two gradients and its value
    fn mmd_rbf(
        &self,
        x: In<'_, Self::Buf>,
        y: In<'_, Self::Buf>,
        dim: usize,
        bandwidths: &[f64],
        dx: Out<'_, Self::Buf>,
        dy: Out<'_, Self::Buf>,
        value: Out<'_, Self::Buf>,
    ) -> Result<()>;

    /// `ops::losses::cross_entropy`: mean softmax cross-entropy of `logits` (rows x classes)
    /// against `labels` (-1 = unlabelled, skipped; each below `classes`) into `loss` (one value,
    /// left on the device) and its gradient (overwritten).
    fn cross_entropy(
        &self,
        logits: In<'_, Self::Buf>,
        labels: Labels<'_, Self::Buf>,
        classes: usize,
        dlogits: Out<'_, Self::Buf>,
        loss: Out<'_, Self::Buf>,
    ) -> Result<()>;
    /// `ops::losses::masked_mse`: mean squared error over the non-NaN host targets into `loss`
    /// (one value, left on the device) and its gradient. Returns the observed entries.
    fn masked_mse(
        &self,
        pred: In<'_, Self::Buf>,
        targets: &[f64],
        dpred: Out<'_, Self::Buf>,
        loss: Out<'_, Self::Buf>,
    ) -> Result<usize>;
    /// `ops::losses::cosine_margin`: the contrastive cosine loss of rows of `z` on `labels`
    /// into `loss` (one value, left on the device), and its gradient.
    #[allow(clippy::too_many_arguments)] // the op's inputs, its gradient and its value
    fn cosine_margin(
        &self,
        z: In<'_, Self::Buf>,
        labels: Labels<'_, Self::Buf>,
        dim: usize,
        margin: f64,
        dz: Out<'_, Self::Buf>,
        loss: Out<'_, Self::Buf>,
    ) -> Result<()>;
    /// `ops::losses::cox_partial_likelihood`: negative Cox partial log-likelihood of risk scores
    /// into `loss` (one value, left on the device), and its gradient.
    fn cox_partial_likelihood(
        &self,
        eta: In<'_, Self::Buf>,
        times: &[f64],
        events: &[bool],
        deta: Out<'_, Self::Buf>,
        loss: Out<'_, Self::Buf>,
    ) -> Result<()>;
    /// `ops::gaussian::jeffreys`: per-row Jeffreys divergence of two diagonal Gaussians and the
    /// gradients of Σ_r w_r J_r (dm1, dlv1, dm2, dlv2; overwritten).
    fn jeffreys(
        &self,
        m1: In<'_, Self::Buf>,
        lv1: In<'_, Self::Buf>,
        m2: In<'_, Self::Buf>,
        lv2: In<'_, Self::Buf>,
        dim: usize,
        weights: In<'_, Self::Buf>,
        value: Out<'_, Self::Buf>,
        grads: [Out<'_, Self::Buf>; 4],
    ) -> Result<()>;

    /// `AdamW::step` (step `t` counts from 1); where `skip` (one value, e.g.
    /// [`Backend::flag_non_finite`]'s) is given and not 0 nothing changes, decided on the
    /// device: the host need not read it first.
    #[allow(clippy::too_many_arguments)] // the step's operands; bundling them would only rename them
    fn adamw_step(
        &self,
        opt: &AdamW,
        t: u64,
        params: Out<'_, Self::Buf>,
        grads: In<'_, Self::Buf>,
        m: Out<'_, Self::Buf>,
        v: Out<'_, Self::Buf>,
        skip: Option<In<'_, Self::Buf>>,
    ) -> Result<()>;
    /// `ops::optim::grad_norm`: the global L2 norm, accumulated in f64 in a fixed order.
    fn grad_norm(&self, grads: In<'_, Self::Buf>) -> Result<f64>;
    /// `ops::optim::non_finite_flag` into `flag` (one value): 1 if some entry of `x` is NaN
    /// or infinite, else 0; stays on the device until read with other values.
    fn flag_non_finite(&self, x: In<'_, Self::Buf>, flag: Out<'_, Self::Buf>) -> Result<()>;
}

/// [`Backend::softmax_nb`] from the separate ops: softmax, scaling by the library, the NB
/// likelihood on dense counts, then the chain rule back through both and the column sums of
/// the per-entry θ gradients.
#[allow(clippy::too_many_arguments)] // an op's operands, outputs and shape, as its kernel takes them
pub fn softmax_nb_composed<T: Real, B: Backend<T>>(
    b: &B,
    logits: In<'_, B::Buf>,
    library: In<'_, B::Buf>,
    counts: CsrRef<'_, T>,
    theta: In<'_, B::Buf>,
    weights: In<'_, B::Buf>,
    ll: Out<'_, B::Buf>,
    dlogits: Out<'_, B::Buf>,
    dtheta: Out<'_, B::Buf>,
) -> Result<()> {
    let (n, g) = (counts.rows, counts.cols);
    let x = Tensor {
        buf: b.upload_vec(counts.summed_dense())?,
        rows: n,
        cols: g,
    };
    let mut rho = b.tensor(n, g)?;
    b.softmax_forward(logits, g, rho.output())?;
    let mut mu = b.tensor(n, g)?;
    b.scale_rows(rho.input(), library.clone(), mu.output())?;
    let (mut dmu, mut dtheta_entries) = (b.tensor(n, g)?, b.tensor(n, g)?);
    b.likelihood(
        Likelihood::NegativeBinomial,
        x.input(),
        g,
        &[mu.input(), theta],
        Some(weights),
        ll,
        &mut [dmu.output(), dtheta_entries.output()],
    )?;
    let mut drho = b.tensor(n, g)?;
    b.scale_rows(dmu.input(), library, drho.output())?;
    b.softmax_backward(rho.input(), drho.input(), g, dlogits)?;
    b.column_sums(dtheta_entries.input(), dtheta)
}

/// `kl_weight × shares[r]`, each product in f64 rounded once ([`Backend::kl_weights`]).
pub(crate) fn kl_products<T: Real>(shares: &[f64], kl_weight: f64) -> Vec<T> {
    shares.iter().map(|&w| T::of(kl_weight * w)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::linear::Gemm;

    #[test]
    fn views_downloaded_together_come_back_each_in_its_place() {
        let b = Cpu;
        let x = b.upload(&[1.0f32, 2.0, 3.0, 4.0]).unwrap();
        let y = b.upload(&[5.0f32, 6.0]).unwrap();
        let got = b
            .download_together(&[In::part(&x, 1..3), In::all(&y), In::part(&x, 0..0)])
            .unwrap();
        assert_eq!(got, vec![vec![2.0, 3.0], vec![5.0, 6.0], vec![]]);
        let empty = b.download_together(&[In::part(&y, 1..1)]).unwrap();
        assert_eq!(empty, vec![Vec::<f32>::new()]);
    }

    /// The CPU's one-pass override against the composition every other backend runs, in f64
    /// (same values up to rounding) and f32.
    #[test]
    fn cpu_softmax_nb_equals_the_composition() {
        fn run<T: Gemm>(composed: bool) -> (Vec<T>, Vec<T>, Vec<T>) {
            let (rows, genes) = (7, 203);
            let (mut indptr, mut indices, mut data) = (vec![0u64], Vec::new(), Vec::new());
            for r in 0..rows {
                for f in (0..genes).filter(|f| (f * 5 + r) % 4 == 0) {
                    indices.push(f as u32);
                    data.push(T::of([1.0, 2.0, 9.0, 40.0][(f + r) % 4]));
                }
                indptr.push(indices.len() as u64);
            }
            let counts = CsrRef {
                rows,
                cols: genes,
                indptr: &indptr,
                indices: &indices,
                data: &data,
            };
            let logits: Vec<T> = crate::gradcheck::wave(rows * genes, 0.5)
                .iter()
                .map(|v| T::of(2.0 * v))
                .collect();
            let library: Vec<T> = (0..rows).map(|r| T::of(500.0 + 100.0 * r as f64)).collect();
            let theta: Vec<T> = crate::gradcheck::wave(genes, 3.0)
                .iter()
                .map(|v| T::of(v.exp() * 3.0))
                .collect();
            let weights: Vec<T> = (0..rows).map(|r| T::of(-1.0 + 0.25 * r as f64)).collect();
            let (mut ll, mut dlogits, mut dtheta) = (
                vec![T::zero(); rows],
                vec![T::zero(); rows * genes],
                vec![T::zero(); genes],
            );
            let args = (
                In::all(&logits),
                In::all(&library),
                In::all(&theta),
                In::all(&weights),
            );
            if composed {
                softmax_nb_composed(
                    &Cpu,
                    args.0,
                    args.1,
                    counts,
                    args.2,
                    args.3,
                    Out::all(&mut ll),
                    Out::all(&mut dlogits),
                    Out::all(&mut dtheta),
                )
                .unwrap();
            } else {
                Cpu.softmax_nb(
                    args.0,
                    args.1,
                    &Cpu.upload_csr(counts).unwrap(),
                    args.2,
                    args.3,
                    Out::all(&mut ll),
                    Out::all(&mut dlogits),
                    Out::all(&mut dtheta),
                )
                .unwrap();
            }
            (ll, dlogits, dtheta)
        }
        fn compare<T: Gemm>(tol: f64) {
            let (fused, composed) = (run::<T>(false), run::<T>(true));
            for (what, a, b) in [
                ("ll", &fused.0, &composed.0),
                ("dlogits", &fused.1, &composed.1),
                ("dtheta", &fused.2, &composed.2),
            ] {
                let scale = b.iter().fold(0.0f64, |m, v| m.max(v.f64().abs()));
                for (i, (x, y)) in a.iter().zip(b).enumerate() {
                    assert!(
                        (x.f64() - y.f64()).abs() <= tol * scale,
                        "{what}[{i}]: fused {x:?} vs composed {y:?}"
                    );
                }
            }
        }
        compare::<f64>(1e-12);
        compare::<f32>(2e-5);
    }
}
