//! The CUDA backend: the op set on one GPU in f32, each method a launcher of `ops/*/gpu.rs`
//! (the kernels parity-tested against the CPU references) on a view of a device buffer. Every
//! op runs on the GPU's one stream, so they are ordered without synchronisation; a download
//! (or a loss returned to the host) waits for what came before it.

use std::sync::Arc;

use super::{Backend, In, Labels, Out, Result, Storage};
use crate::cuda::{Gpu, View, ViewMut, driver};
use crate::cuda_cache::DeviceBuf;
use crate::cuda_readback::Readback;
use crate::cuda_staging::{StagedCsr, StagedValues};
use crate::ops::elementwise::{self, Activation};
use crate::ops::likelihood::{self, Likelihood};
use crate::ops::linear::gpu::DeviceCsr;
use crate::ops::linear::resident_gpu::ResidentCsr;
use crate::ops::linear::{self, CountTransform, CsrRef};
use crate::ops::optim::{self, AdamW};
use crate::ops::{dropout, gaussian, losses, norm};

/// A batch on its way to the device: copied from the host on the copy stream, or rows of a
/// resident matrix to gather there (only the row list crosses).
#[derive(Debug)]
pub enum Staged {
    Copied(Box<StagedCsr>),
    Rows(Box<crate::cuda_staging::StagedRows>, CountTransform),
}

impl Staged {
    /// The count transform the batch's index is made for.
    pub fn transform(&self) -> CountTransform {
        match self {
            Staged::Copied(x) => x.transform(),
            Staged::Rows(_, transform) => *transform,
        }
    }
}

/// Views on their way to the host, copied together ([`Backend::start_download`]).
#[derive(Debug)]
pub struct Download {
    read: Option<Readback>,
    lengths: Vec<usize>,
}

/// One GPU as a [`Backend`] (f32).
#[derive(Debug, Clone)]
pub struct Cuda {
    gpu: Arc<Gpu>,
}

impl Cuda {
    pub fn new(gpu: Gpu) -> Cuda {
        Cuda { gpu: Arc::new(gpu) }
    }

    /// Device `ordinal`, or why there is none (no driver, no such device).
    pub fn open(ordinal: usize) -> crate::cuda::Result<Cuda> {
        Gpu::new(ordinal).map(Cuda::new)
    }

    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// `labels` as the loss kernels read them, f32 codes on the device: host labels uploaded
    /// into `kept` (an eager step's; a captured step's labels are already there).
    fn labels_on_device<'a>(
        &self,
        labels: Labels<'a, DeviceBuf>,
        kept: &'a mut Option<DeviceBuf>,
    ) -> Result<In<'a, DeviceBuf>> {
        Ok(match labels {
            Labels::Device(labels) => labels,
            Labels::Host(labels) => {
                let codes: Vec<f32> = labels.iter().map(|&l| l as f32).collect();
                In::all(kept.insert(self.gpu.upload(&codes)?))
            }
        })
    }
}

impl Storage for DeviceBuf {
    fn len(&self) -> usize {
        cudarc::driver::CudaSlice::len(self)
    }
}

fn v<'a>(x: &In<'a, DeviceBuf>) -> View<'a> {
    x.buf.slice(x.range.clone())
}

fn vm(x: Out<'_, DeviceBuf>) -> ViewMut<'_> {
    x.buf.slice_mut(x.range)
}

fn vm_ref<'a>(x: &'a mut Out<'_, DeviceBuf>) -> ViewMut<'a> {
    x.buf.slice_mut(x.range.clone())
}

impl Backend<f32> for Cuda {
    type Buf = DeviceBuf;
    type Csr = DeviceCsr;
    type Staged = Staged;
    type StagedValues = StagedValues;
    type Resident = ResidentCsr;
    type Download = Download;

    fn name(&self) -> String {
        format!("cuda:{}", self.gpu.ordinal())
    }

    fn synchronize(&self) -> Result<()> {
        Ok(self
            .gpu
            .stream()
            .synchronize()
            .map_err(driver("synchronize"))?)
    }

    fn zeros(&self, n: usize) -> Result<DeviceBuf> {
        Ok(self.gpu.zeros(n)?)
    }

    fn output_buf(&self, n: usize) -> Result<DeviceBuf> {
        Ok(self.gpu.alloc::<f32>(n)?)
    }

    fn upload(&self, host: &[f32]) -> Result<DeviceBuf> {
        Ok(self.gpu.upload(host)?)
    }

    fn download(&self, x: In<'_, DeviceBuf>) -> Result<Vec<f32>> {
        Ok(self.gpu.download(&v(&x))?)
    }

    fn start_download(&self, views: &[In<'_, DeviceBuf>]) -> Result<Download> {
        let lengths: Vec<usize> = views.iter().map(In::len).collect();
        let total: usize = lengths.iter().sum();
        if total == 0 {
            return Ok(Download {
                read: None,
                lengths,
            });
        }
        // One copy, so one event and one wait, however many views.
        let mut all = self.output_buf(total)?;
        let mut start = 0;
        for x in views {
            let end = start + x.len();
            self.copy(x.clone(), Out::part(&mut all, start..end))?;
            start = end;
        }
        Ok(Download {
            read: Some(self.gpu.start_download(&all.slice(..))?),
            lengths,
        })
    }

    fn finish_download(&self, started: Download) -> Result<Vec<Vec<f32>>> {
        let all = match started.read {
            Some(read) => self.gpu.finish_download(read)?,
            None => Vec::new(),
        };
        let mut start = 0;
        Ok(started
            .lengths
            .iter()
            .map(|n| {
                let part = all[start..start + n].to_vec();
                start += n;
                part
            })
            .collect())
    }

    fn zero(&self, y: Out<'_, DeviceBuf>) -> Result<()> {
        Ok(self
            .gpu
            .stream()
            .memset_zeros(&mut vm(y))
            .map_err(driver("zero"))?)
    }

    fn fill(&self, y: Out<'_, DeviceBuf>, value: f32) -> Result<()> {
        Ok(self.gpu.fill(&mut vm(y), value)?)
    }

    fn kl_weights(&self, shares: &[f64], kl_weight: f64) -> Result<DeviceBuf> {
        match shares.first() {
            Some(&share) if shares.iter().all(|&w| w == share) => {
                let cell = self.gpu.kl_weight_cell(kl_weight)?;
                let mut y = self.gpu.alloc::<f32>(shares.len())?;
                elementwise::gpu::fill_scaled(&self.gpu, cell, share, &mut y.slice_mut(..))?;
                Ok(y)
            }
            _ => self.upload(&super::kl_products(shares, kl_weight)),
        }
    }

    fn write(&self, host: &[f32], y: Out<'_, DeviceBuf>) -> Result<()> {
        assert_eq!(host.len(), y.range.len(), "write: lengths");
        Ok(self.gpu.write(host, &mut vm(y))?)
    }

    fn copy(&self, x: In<'_, DeviceBuf>, y: Out<'_, DeviceBuf>) -> Result<()> {
        assert_eq!(x.len(), y.range.len(), "copy: lengths");
        Ok(self
            .gpu
            .stream()
            .memcpy_dtod(&v(&x), &mut vm(y))
            .map_err(driver("copy"))?)
    }

    fn axpy(&self, alpha: f32, x: In<'_, DeviceBuf>, y: Out<'_, DeviceBuf>) -> Result<()> {
        Ok(elementwise::gpu::axpy(
            &self.gpu,
            alpha,
            &v(&x),
            &mut vm(y),
        )?)
    }

    fn scale(&self, y: Out<'_, DeviceBuf>, alpha: f32) -> Result<()> {
        Ok(elementwise::gpu::scale(&self.gpu, &mut vm(y), alpha)?)
    }

    fn upload_csr(&self, x: CsrRef<'_, f32>) -> Result<DeviceCsr> {
        Ok(DeviceCsr::upload(&self.gpu, x)?)
    }

    fn stage_csr(&self, x: CsrRef<'_, f32>, transform: CountTransform) -> Result<Staged> {
        Ok(Staged::Copied(Box::new(
            self.gpu.staging()?.stage(x, transform)?,
        )))
    }

    fn staged_csr(&self, x: Staged) -> Result<DeviceCsr> {
        Ok(match x {
            Staged::Copied(x) => x.into_device(&self.gpu)?,
            Staged::Rows(rows, transform) => rows.into_device(&self.gpu, transform)?,
        })
    }

    fn stage_values(&self, host: &[f32]) -> Result<StagedValues> {
        Ok(self.gpu.staging()?.stage_values(host)?)
    }

    fn staged_values(&self, x: StagedValues) -> Result<DeviceBuf> {
        Ok(x.into_device(&self.gpu)?)
    }

    fn csr_rows<'a>(&self, x: &'a DeviceCsr) -> Option<CsrRef<'a, f32>> {
        x.host()
    }

    fn csr_shape(&self, x: &DeviceCsr) -> (usize, usize, usize) {
        (x.rows, x.cols, x.nnz)
    }

    fn csr_tiled(&self, x: &DeviceCsr, times: usize) -> Result<DeviceCsr> {
        Ok(x.tiled(&self.gpu, times)?)
    }

    fn csr_dense(&self, x: &DeviceCsr, binary: bool, out: Out<'_, DeviceBuf>) -> Result<()> {
        Ok(linear::gpu::csr_dense(&self.gpu, x, binary, &mut vm(out))?)
    }

    fn csr_row_sums(&self, x: &DeviceCsr, out: Out<'_, DeviceBuf>) -> Result<()> {
        Ok(linear::gpu::row_sums(&self.gpu, x, &mut vm(out))?)
    }

    fn free_memory(&self) -> Result<Option<u64>> {
        Ok(Some(self.gpu.free_memory()?))
    }

    fn resident_csr(&self, x: CsrRef<'_, f32>) -> Result<ResidentCsr> {
        Ok(ResidentCsr::upload(&self.gpu, x)?)
    }

    fn stage_rows(
        &self,
        x: &Arc<ResidentCsr>,
        rows: &[usize],
        transform: CountTransform,
    ) -> Result<Staged> {
        let staged = self.gpu.staging()?.stage_rows(x, rows)?;
        Ok(Staged::Rows(Box::new(staged), transform))
    }

    fn gemm(
        &self,
        ta: bool,
        tb: bool,
        m: usize,
        k: usize,
        n: usize,
        alpha: f32,
        a: In<'_, DeviceBuf>,
        b: In<'_, DeviceBuf>,
        beta: f32,
        c: Out<'_, DeviceBuf>,
    ) -> Result<()> {
        Ok(linear::gpu::gemm(
            &self.gpu,
            ta,
            tb,
            m,
            k,
            n,
            alpha,
            &v(&a),
            &v(&b),
            beta,
            &mut vm(c),
        )?)
    }

    fn sparse_input_forward(
        &self,
        x: &DeviceCsr,
        transform: CountTransform,
        w: In<'_, DeviceBuf>,
        d_out: usize,
        y: Out<'_, DeviceBuf>,
    ) -> Result<()> {
        Ok(linear::gpu::sparse_input_forward(
            &self.gpu,
            x,
            transform,
            &v(&w),
            d_out,
            &mut vm(y),
        )?)
    }

    fn sparse_input_backward(
        &self,
        x: &DeviceCsr,
        transform: CountTransform,
        dy: In<'_, DeviceBuf>,
        d_out: usize,
        dw: Out<'_, DeviceBuf>,
    ) -> Result<()> {
        Ok(linear::gpu::sparse_input_backward(
            &self.gpu,
            x,
            transform,
            &v(&dy),
            d_out,
            &mut vm(dw),
        )?)
    }

    fn activation_forward(
        &self,
        act: Activation,
        x: In<'_, DeviceBuf>,
        y: Out<'_, DeviceBuf>,
    ) -> Result<()> {
        Ok(elementwise::gpu::activation_forward(
            &self.gpu,
            act,
            &v(&x),
            &mut vm(y),
        )?)
    }

    fn activation_backward(
        &self,
        act: Activation,
        x: In<'_, DeviceBuf>,
        y: In<'_, DeviceBuf>,
        dy: In<'_, DeviceBuf>,
        dx: Out<'_, DeviceBuf>,
    ) -> Result<()> {
        Ok(elementwise::gpu::activation_backward(
            &self.gpu,
            act,
            &v(&x),
            &v(&y),
            &v(&dy),
            &mut vm(dx),
        )?)
    }

    fn bias_add(&self, y: Out<'_, DeviceBuf>, bias: In<'_, DeviceBuf>) -> Result<()> {
        Ok(elementwise::gpu::bias_add_forward(
            &self.gpu,
            &mut vm(y),
            &v(&bias),
        )?)
    }

    fn column_sums(&self, m: In<'_, DeviceBuf>, out: Out<'_, DeviceBuf>) -> Result<()> {
        Ok(elementwise::gpu::column_sums(
            &self.gpu,
            &v(&m),
            &mut vm(out),
        )?)
    }

    fn scale_rows(
        &self,
        x: In<'_, DeviceBuf>,
        s: In<'_, DeviceBuf>,
        y: Out<'_, DeviceBuf>,
    ) -> Result<()> {
        Ok(elementwise::gpu::scale_rows(
            &self.gpu,
            &v(&x),
            &v(&s),
            &mut vm(y),
        )?)
    }

    fn leading_columns(
        &self,
        x: In<'_, DeviceBuf>,
        cols: usize,
        k: usize,
        out: Out<'_, DeviceBuf>,
    ) -> Result<()> {
        Ok(elementwise::gpu::leading_columns(
            &self.gpu,
            &v(&x),
            cols,
            k,
            &mut vm(out),
        )?)
    }

    fn first_positive(
        &self,
        x: In<'_, DeviceBuf>,
        cols: usize,
        k: usize,
        out: Out<'_, DeviceBuf>,
    ) -> Result<()> {
        Ok(elementwise::gpu::first_positive(
            &self.gpu,
            &v(&x),
            cols,
            k,
            &mut vm(out),
        )?)
    }

    fn gather_rows(
        &self,
        table: In<'_, DeviceBuf>,
        codes: &[usize],
        cols: usize,
        out: Out<'_, DeviceBuf>,
    ) -> Result<()> {
        Ok(elementwise::gpu::gather_rows(
            &self.gpu,
            &v(&table),
            codes,
            cols,
            &mut vm(out),
        )?)
    }

    fn scatter_add_rows(
        &self,
        x: In<'_, DeviceBuf>,
        codes: &[usize],
        cols: usize,
        table: Out<'_, DeviceBuf>,
    ) -> Result<()> {
        Ok(elementwise::gpu::scatter_add_rows(
            &self.gpu,
            &v(&x),
            codes,
            cols,
            &mut vm(table),
        )?)
    }

    fn dropout(
        &self,
        x: In<'_, DeviceBuf>,
        p: f32,
        seed: u64,
        stream: u64,
        y: Out<'_, DeviceBuf>,
    ) -> Result<()> {
        Ok(dropout::gpu::dropout_forward(
            &self.gpu,
            &v(&x),
            p,
            seed,
            stream,
            &mut vm(y),
        )?)
    }

    fn normal(&self, seed: u64, stream: u64, out: Out<'_, DeviceBuf>) -> Result<()> {
        Ok(dropout::gpu::normal_fill(
            &self.gpu,
            seed,
            stream,
            &mut vm(out),
        )?)
    }

    fn batch_norm_train(
        &self,
        x: In<'_, DeviceBuf>,
        gamma: In<'_, DeviceBuf>,
        beta: In<'_, DeviceBuf>,
        running: Out<'_, DeviceBuf>,
        momentum: f64,
        eps: f64,
        y: Out<'_, DeviceBuf>,
        xhat: Out<'_, DeviceBuf>,
        inv_std: Out<'_, DeviceBuf>,
    ) -> Result<()> {
        Ok(norm::gpu::batch_norm_train(
            &self.gpu,
            &v(&x),
            &v(&gamma),
            &v(&beta),
            &mut vm(running),
            momentum,
            eps,
            &mut vm(y),
            &mut vm(xhat),
            &mut vm(inv_std),
        )?)
    }

    fn batch_norm_eval(
        &self,
        x: In<'_, DeviceBuf>,
        gamma: In<'_, DeviceBuf>,
        beta: In<'_, DeviceBuf>,
        running: In<'_, DeviceBuf>,
        eps: f64,
        y: Out<'_, DeviceBuf>,
    ) -> Result<()> {
        Ok(norm::gpu::batch_norm_eval(
            &self.gpu,
            &v(&x),
            &v(&gamma),
            &v(&beta),
            &v(&running),
            eps,
            &mut vm(y),
        )?)
    }

    fn batch_norm_backward(
        &self,
        xhat: In<'_, DeviceBuf>,
        inv_std: In<'_, DeviceBuf>,
        gamma: In<'_, DeviceBuf>,
        dy: In<'_, DeviceBuf>,
        dx: Out<'_, DeviceBuf>,
        dgamma_beta: Out<'_, DeviceBuf>,
    ) -> Result<()> {
        Ok(norm::gpu::batch_norm_backward(
            &self.gpu,
            &v(&xhat),
            &v(&inv_std),
            &v(&gamma),
            &v(&dy),
            &mut vm(dx),
            &mut vm(dgamma_beta),
        )?)
    }

    fn layer_norm_forward(
        &self,
        x: In<'_, DeviceBuf>,
        features: usize,
        eps: f64,
        y: Out<'_, DeviceBuf>,
        inv_std: Out<'_, DeviceBuf>,
    ) -> Result<()> {
        Ok(norm::gpu::layer_norm_forward(
            &self.gpu,
            &v(&x),
            features,
            eps,
            &mut vm(y),
            &mut vm(inv_std),
        )?)
    }

    fn layer_norm_backward(
        &self,
        y: In<'_, DeviceBuf>,
        inv_std: In<'_, DeviceBuf>,
        dy: In<'_, DeviceBuf>,
        dx: Out<'_, DeviceBuf>,
    ) -> Result<()> {
        Ok(norm::gpu::layer_norm_backward(
            &self.gpu,
            &v(&y),
            &v(&inv_std),
            &v(&dy),
            &mut vm(dx),
        )?)
    }

    fn softmax_forward(
        &self,
        x: In<'_, DeviceBuf>,
        features: usize,
        y: Out<'_, DeviceBuf>,
    ) -> Result<()> {
        Ok(norm::gpu::softmax_forward(
            &self.gpu,
            &v(&x),
            features,
            &mut vm(y),
        )?)
    }

    fn softmax_backward(
        &self,
        y: In<'_, DeviceBuf>,
        dy: In<'_, DeviceBuf>,
        features: usize,
        dx: Out<'_, DeviceBuf>,
    ) -> Result<()> {
        Ok(norm::gpu::softmax_backward(
            &self.gpu,
            &v(&y),
            &v(&dy),
            features,
            &mut vm(dx),
        )?)
    }

    fn reparameterize_forward(
        &self,
        m: In<'_, DeviceBuf>,
        lv: In<'_, DeviceBuf>,
        eps: In<'_, DeviceBuf>,
        z: Out<'_, DeviceBuf>,
    ) -> Result<()> {
        Ok(gaussian::gpu::reparameterize_forward(
            &self.gpu,
            &v(&m),
            &v(&lv),
            &v(&eps),
            &mut vm(z),
        )?)
    }

    fn reparameterize_backward(
        &self,
        lv: In<'_, DeviceBuf>,
        eps: In<'_, DeviceBuf>,
        dz: In<'_, DeviceBuf>,
        dm: Out<'_, DeviceBuf>,
        dlv: Out<'_, DeviceBuf>,
    ) -> Result<()> {
        Ok(gaussian::gpu::reparameterize_backward(
            &self.gpu,
            &v(&lv),
            &v(&eps),
            &v(&dz),
            &mut vm(dm),
            &mut vm(dlv),
        )?)
    }

    fn kl_standard_normal(
        &self,
        m: In<'_, DeviceBuf>,
        lv: In<'_, DeviceBuf>,
        dim: usize,
        weights: Option<In<'_, DeviceBuf>>,
        kl: Out<'_, DeviceBuf>,
        dm: Out<'_, DeviceBuf>,
        dlv: Out<'_, DeviceBuf>,
    ) -> Result<()> {
        let weights = weights.as_ref().map(v);
        Ok(gaussian::gpu::kl_standard_normal(
            &self.gpu,
            &v(&m),
            &v(&lv),
            dim,
            weights.as_ref(),
            &mut vm(kl),
            &mut vm(dm),
            &mut vm(dlv),
        )?)
    }

    fn poe_forward(
        &self,
        means: &[In<'_, DeviceBuf>],
        logvars: &[In<'_, DeviceBuf>],
        present: &[In<'_, DeviceBuf>],
        dim: usize,
        m: Out<'_, DeviceBuf>,
        lv: Out<'_, DeviceBuf>,
    ) -> Result<()> {
        let experts = stack(&self.gpu, means, logvars, present, dim)?;
        Ok(gaussian::gpu::poe_forward(
            &self.gpu,
            &experts,
            &mut vm(m),
            &mut vm(lv),
        )?)
    }

    fn poe_backward(
        &self,
        means: &[In<'_, DeviceBuf>],
        logvars: &[In<'_, DeviceBuf>],
        present: &[In<'_, DeviceBuf>],
        dim: usize,
        m: In<'_, DeviceBuf>,
        lv: In<'_, DeviceBuf>,
        dm: In<'_, DeviceBuf>,
        dlv: In<'_, DeviceBuf>,
        dmeans: &mut [Out<'_, DeviceBuf>],
        dlogvars: &mut [Out<'_, DeviceBuf>],
    ) -> Result<()> {
        let experts = stack(&self.gpu, means, logvars, present, dim)?;
        let (mut dm_stack, mut dlv_stack) = (
            self.gpu.zeros(experts.means.len())?,
            self.gpu.zeros(experts.means.len())?,
        );
        gaussian::gpu::poe_backward(
            &self.gpu,
            &experts,
            &v(&m),
            &v(&lv),
            &v(&dm),
            &v(&dlv),
            &mut dm_stack,
            &mut dlv_stack,
        )?;
        let mut outs: Vec<ViewMut<'_>> = dmeans.iter_mut().map(vm_ref).collect();
        gaussian::gpu::unstack(&self.gpu, &dm_stack, &mut outs)?;
        let mut outs: Vec<ViewMut<'_>> = dlogvars.iter_mut().map(vm_ref).collect();
        Ok(gaussian::gpu::unstack(&self.gpu, &dlv_stack, &mut outs)?)
    }

    fn likelihood(
        &self,
        family: Likelihood,
        x: In<'_, DeviceBuf>,
        features: usize,
        params: &[In<'_, DeviceBuf>],
        weights: Option<In<'_, DeviceBuf>>,
        ll: Out<'_, DeviceBuf>,
        grads: &mut [Out<'_, DeviceBuf>],
    ) -> Result<()> {
        let params: Vec<View<'_>> = params.iter().map(v).collect();
        let weights = weights.as_ref().map(v);
        let mut grads: Vec<ViewMut<'_>> = grads.iter_mut().map(vm_ref).collect();
        Ok(likelihood::gpu::forward_backward(
            &self.gpu,
            family,
            &v(&x),
            features,
            &params,
            weights.as_ref(),
            &mut vm(ll),
            &mut grads,
        )?)
    }

    fn softmax_nb(
        &self,
        logits: In<'_, DeviceBuf>,
        library: In<'_, DeviceBuf>,
        counts: &DeviceCsr,
        theta: In<'_, DeviceBuf>,
        weights: In<'_, DeviceBuf>,
        ll: Out<'_, DeviceBuf>,
        dlogits: Out<'_, DeviceBuf>,
        dtheta: Out<'_, DeviceBuf>,
    ) -> Result<()> {
        Ok(likelihood::gpu::softmax_nb(
            &self.gpu,
            &v(&logits),
            &v(&library),
            counts,
            &v(&theta),
            &v(&weights),
            &mut vm(ll),
            &mut vm(dlogits),
            &mut vm(dtheta),
        )?)
    }

    fn nb_mixture(
        &self,
        x: In<'_, DeviceBuf>,
        mu_back: In<'_, DeviceBuf>,
        mu_fore: In<'_, DeviceBuf>,
        theta: In<'_, DeviceBuf>,
        pi: In<'_, DeviceBuf>,
        features: usize,
        ll: Out<'_, DeviceBuf>,
        grads: [Out<'_, DeviceBuf>; 4],
    ) -> Result<()> {
        let [mut a, mut b, mut c, mut d] = grads.map(vm);
        Ok(likelihood::gpu::nb_mixture(
            &self.gpu,
            &v(&x),
            &v(&mu_back),
            &v(&mu_fore),
            &v(&theta),
            &v(&pi),
            features,
            &mut vm(ll),
            [&mut a, &mut b, &mut c, &mut d],
        )?)
    }

    #[allow(clippy::too_many_arguments)] // the op's inputs, its two gradients and its value
    fn mmd_rbf(
        &self,
        x: In<'_, DeviceBuf>,
        y: In<'_, DeviceBuf>,
        dim: usize,
        bandwidths: &[f64],
        dx: Out<'_, DeviceBuf>,
        dy: Out<'_, DeviceBuf>,
        value: Out<'_, DeviceBuf>,
    ) -> Result<()> {
        Ok(losses::gpu::mmd_rbf(
            &self.gpu,
            &v(&x),
            &v(&y),
            dim,
            bandwidths,
            &mut vm(dx),
            &mut vm(dy),
            &mut vm(value),
        )?)
    }

    fn cross_entropy(
        &self,
        logits: In<'_, DeviceBuf>,
        labels: Labels<'_, DeviceBuf>,
        classes: usize,
        dlogits: Out<'_, DeviceBuf>,
        loss: Out<'_, DeviceBuf>,
    ) -> Result<()> {
        if let Labels::Host(labels) = &labels {
            assert!(
                labels.iter().all(|&l| l < classes as i32),
                "label out of range for {classes} classes"
            );
        }
        let mut uploaded = None;
        let labels = self.labels_on_device(labels, &mut uploaded)?;
        Ok(losses::gpu::cross_entropy(
            &self.gpu,
            &v(&logits),
            &v(&labels),
            classes,
            &mut vm(dlogits),
            &mut vm(loss),
        )?)
    }

    fn masked_mse(
        &self,
        pred: In<'_, DeviceBuf>,
        targets: &[f64],
        dpred: Out<'_, DeviceBuf>,
        loss: Out<'_, DeviceBuf>,
    ) -> Result<usize> {
        Ok(losses::gpu::masked_mse(
            &self.gpu,
            &v(&pred),
            targets,
            &mut vm(dpred),
            &mut vm(loss),
        )?)
    }

    #[allow(clippy::too_many_arguments)] // the op's inputs, its gradient and its value
    fn cosine_margin(
        &self,
        z: In<'_, DeviceBuf>,
        labels: Labels<'_, DeviceBuf>,
        dim: usize,
        margin: f64,
        dz: Out<'_, DeviceBuf>,
        loss: Out<'_, DeviceBuf>,
    ) -> Result<()> {
        let mut uploaded = None;
        let labels = self.labels_on_device(labels, &mut uploaded)?;
        Ok(losses::gpu::cosine_margin(
            &self.gpu,
            &v(&z),
            &v(&labels),
            dim,
            margin,
            &mut vm(dz),
            &mut vm(loss),
        )?)
    }

    fn cox_partial_likelihood(
        &self,
        eta: In<'_, DeviceBuf>,
        times: &[f64],
        events: &[bool],
        deta: Out<'_, DeviceBuf>,
        loss: Out<'_, DeviceBuf>,
    ) -> Result<()> {
        Ok(losses::gpu::cox_partial_likelihood(
            &self.gpu,
            &v(&eta),
            times,
            events,
            &mut vm(deta),
            &mut vm(loss),
        )?)
    }

    fn jeffreys(
        &self,
        m1: In<'_, DeviceBuf>,
        lv1: In<'_, DeviceBuf>,
        m2: In<'_, DeviceBuf>,
        lv2: In<'_, DeviceBuf>,
        dim: usize,
        weights: In<'_, DeviceBuf>,
        value: Out<'_, DeviceBuf>,
        grads: [Out<'_, DeviceBuf>; 4],
    ) -> Result<()> {
        let [mut a, mut b, mut c, mut d] = grads.map(vm);
        Ok(gaussian::gpu::jeffreys(
            &self.gpu,
            &v(&m1),
            &v(&lv1),
            &v(&m2),
            &v(&lv2),
            dim,
            &v(&weights),
            &mut vm(value),
            [&mut a, &mut b, &mut c, &mut d],
        )?)
    }

    fn adamw_step(
        &self,
        opt: &AdamW,
        t: u64,
        params: Out<'_, DeviceBuf>,
        grads: In<'_, DeviceBuf>,
        m: Out<'_, DeviceBuf>,
        v_: Out<'_, DeviceBuf>,
        skip: Option<In<'_, DeviceBuf>>,
    ) -> Result<()> {
        Ok(optim::gpu::adamw_step(
            &self.gpu,
            opt,
            t,
            &mut vm(params),
            &v(&grads),
            &mut vm(m),
            &mut vm(v_),
            skip.as_ref().map(v).as_ref(),
        )?)
    }

    fn grad_norm(&self, grads: In<'_, DeviceBuf>) -> Result<f64> {
        Ok(optim::gpu::grad_norm(&self.gpu, &v(&grads))?)
    }

    fn flag_non_finite(&self, x: In<'_, DeviceBuf>, flag: Out<'_, DeviceBuf>) -> Result<()> {
        Ok(optim::gpu::flag_non_finite(
            &self.gpu,
            &v(&x),
            &mut vm(flag),
        )?)
    }
}

/// The PoE's experts copied into the stacks the kernels read.
fn stack(
    gpu: &Gpu,
    means: &[In<'_, DeviceBuf>],
    logvars: &[In<'_, DeviceBuf>],
    present: &[In<'_, DeviceBuf>],
    dim: usize,
) -> crate::cuda::Result<gaussian::gpu::DeviceExperts> {
    fn views<'a>(xs: &[In<'a, DeviceBuf>]) -> Vec<View<'a>> {
        xs.iter().map(v).collect()
    }
    gaussian::gpu::DeviceExperts::stack(gpu, &views(means), &views(logvars), &views(present), dim)
}
