//! The CPU backend: the reference ops of `crate::ops` on host vectors (rayon-parallel,
//! gemm crate), for f32 training and f64 gradient checks.

use std::sync::{Arc, OnceLock};

use super::{Backend, In, Labels, Out, Result};
use crate::Real;
use crate::ops::elementwise::{self, Activation};
use crate::ops::likelihood::{self, Likelihood};
use crate::ops::linear::{self, CountTransform, CsrRef, Gemm};
use crate::ops::optim::{self, AdamW};
use crate::ops::{dropout, gaussian, losses, norm};

#[derive(Debug, Clone, Copy, Default)]
pub struct Cpu;

/// A transform's transposed index: column pointers and (row, value) entries.
type Transposed<T> = (CountTransform, Vec<usize>, Vec<(usize, T)>);

/// A count matrix owned on the host.
#[derive(Debug, Clone)]
pub struct HostCsr<T> {
    pub rows: usize,
    pub cols: usize,
    pub indptr: Vec<u64>,
    pub indices: Vec<u32>,
    pub data: Vec<T>,
    /// The transformed values and their transposed index, made at the first use: the forward
    /// and backward of the sparse layer share one transform per batch (the GPU kernels fuse it
    /// instead).
    transformed: OnceLock<(CountTransform, Vec<T>)>,
    transposed: OnceLock<Transposed<T>>,
}

impl<T: Real> HostCsr<T> {
    pub fn new(x: CsrRef<'_, T>) -> HostCsr<T> {
        let arrays = (x.indptr.to_vec(), x.indices.to_vec(), x.data.to_vec());
        HostCsr::owned(x.rows, x.cols, arrays)
    }

    /// A matrix from its arrays: indptr, indices, data.
    fn owned(
        rows: usize,
        cols: usize,
        (indptr, indices, data): (Vec<u64>, Vec<u32>, Vec<T>),
    ) -> HostCsr<T> {
        HostCsr {
            rows,
            cols,
            indptr,
            indices,
            data,
            transformed: OnceLock::new(),
            transposed: OnceLock::new(),
        }
    }

    pub fn as_ref(&self) -> CsrRef<'_, T> {
        CsrRef {
            rows: self.rows,
            cols: self.cols,
            indptr: &self.indptr,
            indices: &self.indices,
            data: &self.data,
        }
    }

    /// The transformed values by column, made for the first transform asked for (a backward
    /// with another one reads the rows instead).
    fn transposed(&self, transform: CountTransform) -> &Transposed<T> {
        self.transposed.get_or_init(|| {
            let (col_ptr, entries) =
                linear::transposed_values(self.as_ref(), &self.values(transform));
            (transform, col_ptr, entries)
        })
    }

    /// t(X)'s non-zeros, cached for `transform` (recomputed, uncached, for another one).
    fn values(&self, transform: CountTransform) -> std::borrow::Cow<'_, [T]> {
        let (t, v) = self.transformed.get_or_init(|| {
            (
                transform,
                linear::transformed_values(self.as_ref(), transform),
            )
        });
        if *t == transform {
            std::borrow::Cow::Borrowed(v)
        } else {
            std::borrow::Cow::Owned(linear::transformed_values(self.as_ref(), transform))
        }
    }
}

/// The label codes as the reference ops read them: the host's, or f32 codes on this "device"
/// cast back into `codes` (integers by construction: the cast is exact).
fn host_labels<'a, T: Real>(labels: Labels<'a, Vec<T>>, codes: &'a mut Vec<i32>) -> &'a [i32] {
    match labels {
        Labels::Host(labels) => labels,
        Labels::Device(labels) => {
            *codes = r(&labels).iter().map(|l| l.f64() as i32).collect();
            codes
        }
    }
}

fn r<'a, T>(x: &In<'a, Vec<T>>) -> &'a [T] {
    &x.buf[x.range.clone()]
}

fn w<'a, T>(x: Out<'a, Vec<T>>) -> &'a mut [T] {
    &mut x.buf[x.range]
}

/// The experts of a product of experts as the reference op takes them (0/1 masks as booleans).
#[allow(clippy::type_complexity)] // views returned together to one caller; a named type would be used once
fn experts<'a, T: Real>(
    means: &[In<'a, Vec<T>>],
    logvars: &[In<'a, Vec<T>>],
    present: &[In<'a, Vec<T>>],
) -> (Vec<&'a [T]>, Vec<&'a [T]>, Vec<Vec<bool>>) {
    let masks = present
        .iter()
        .map(|p| r(p).iter().map(|v| *v != T::zero()).collect())
        .collect();
    (
        means.iter().map(r).collect(),
        logvars.iter().map(r).collect(),
        masks,
    )
}

impl<T: Gemm> Backend<T> for Cpu {
    type Buf = Vec<T>;
    type Csr = HostCsr<T>;
    type Staged = HostCsr<T>;
    type StagedValues = Vec<T>;
    type Resident = HostCsr<T>;
    type Download = Vec<Vec<T>>;

    fn name(&self) -> String {
        "cpu".into()
    }

    fn zeros(&self, n: usize) -> Result<Vec<T>> {
        Ok(vec![T::zero(); n])
    }

    fn upload(&self, host: &[T]) -> Result<Vec<T>> {
        Ok(host.to_vec())
    }

    fn upload_vec(&self, host: Vec<T>) -> Result<Vec<T>> {
        Ok(host)
    }

    fn download(&self, x: In<'_, Vec<T>>) -> Result<Vec<T>> {
        Ok(r(&x).to_vec())
    }

    fn start_download(&self, views: &[In<'_, Vec<T>>]) -> Result<Vec<Vec<T>>> {
        Ok(views.iter().map(|x| r(x).to_vec()).collect())
    }

    fn finish_download(&self, started: Vec<Vec<T>>) -> Result<Vec<Vec<T>>> {
        Ok(started)
    }

    fn zero(&self, y: Out<'_, Vec<T>>) -> Result<()> {
        w(y).fill(T::of(0.0));
        Ok(())
    }

    fn fill(&self, y: Out<'_, Vec<T>>, value: T) -> Result<()> {
        w(y).fill(value);
        Ok(())
    }

    fn write(&self, host: &[T], y: Out<'_, Vec<T>>) -> Result<()> {
        w(y).copy_from_slice(host);
        Ok(())
    }

    fn host_mut<'a>(&self, buf: &'a mut Vec<T>) -> Option<&'a mut [T]> {
        Some(buf)
    }

    fn copy(&self, x: In<'_, Vec<T>>, y: Out<'_, Vec<T>>) -> Result<()> {
        w(y).copy_from_slice(r(&x));
        Ok(())
    }

    fn axpy(&self, alpha: T, x: In<'_, Vec<T>>, y: Out<'_, Vec<T>>) -> Result<()> {
        elementwise::axpy(alpha, r(&x), w(y));
        Ok(())
    }

    fn scale(&self, y: Out<'_, Vec<T>>, alpha: T) -> Result<()> {
        w(y).iter_mut().for_each(|v| *v = *v * alpha);
        Ok(())
    }

    fn upload_csr(&self, x: CsrRef<'_, T>) -> Result<HostCsr<T>> {
        Ok(HostCsr::new(x))
    }

    fn stage_csr(&self, x: CsrRef<'_, T>, transform: CountTransform) -> Result<HostCsr<T>> {
        let csr = HostCsr::new(x);
        csr.transposed(transform);
        Ok(csr)
    }

    fn staged_csr(&self, x: HostCsr<T>) -> Result<HostCsr<T>> {
        Ok(x)
    }

    fn stage_values(&self, host: &[T]) -> Result<Vec<T>> {
        Ok(host.to_vec())
    }

    fn staged_values(&self, x: Vec<T>) -> Result<Vec<T>> {
        Ok(x)
    }

    fn csr_rows<'a>(&self, x: &'a HostCsr<T>) -> Option<CsrRef<'a, T>> {
        Some(x.as_ref())
    }

    fn csr_shape(&self, x: &HostCsr<T>) -> (usize, usize, usize) {
        (x.rows, x.cols, x.data.len())
    }

    fn csr_tiled(&self, x: &HostCsr<T>, times: usize) -> Result<HostCsr<T>> {
        let arrays = linear::tiled(x.as_ref(), times);
        Ok(HostCsr::owned(times * x.rows, x.cols, arrays))
    }

    fn csr_dense(&self, x: &HostCsr<T>, binary: bool, out: Out<'_, Vec<T>>) -> Result<()> {
        linear::csr_dense(x.as_ref(), binary, w(out));
        Ok(())
    }

    fn csr_row_sums(&self, x: &HostCsr<T>, out: Out<'_, Vec<T>>) -> Result<()> {
        w(out).copy_from_slice(&linear::row_sums(x.as_ref()));
        Ok(())
    }

    fn resident_csr(&self, x: CsrRef<'_, T>) -> Result<HostCsr<T>> {
        x.check_entries();
        assert!(
            !linear::repeats_a_column(x),
            "resident counts: a row names a column twice"
        );
        Ok(HostCsr::new(x))
    }

    fn stage_rows(
        &self,
        x: &Arc<HostCsr<T>>,
        rows: &[usize],
        transform: CountTransform,
    ) -> Result<HostCsr<T>> {
        let csr = HostCsr::owned(
            rows.len(),
            x.cols,
            linear::gather_rows(HostCsr::as_ref(x), rows),
        );
        csr.transposed(transform);
        Ok(csr)
    }

    fn gemm(
        &self,
        ta: bool,
        tb: bool,
        m: usize,
        k: usize,
        n: usize,
        alpha: T,
        a: In<'_, Vec<T>>,
        b: In<'_, Vec<T>>,
        beta: T,
        c: Out<'_, Vec<T>>,
    ) -> Result<()> {
        T::gemm(ta, tb, m, k, n, alpha, r(&a), r(&b), beta, w(c));
        Ok(())
    }

    fn sparse_input_forward(
        &self,
        x: &HostCsr<T>,
        transform: CountTransform,
        wt: In<'_, Vec<T>>,
        d_out: usize,
        y: Out<'_, Vec<T>>,
    ) -> Result<()> {
        linear::sparse_forward_values(x.as_ref(), &x.values(transform), r(&wt), d_out, w(y));
        Ok(())
    }

    fn sparse_input_backward(
        &self,
        x: &HostCsr<T>,
        transform: CountTransform,
        dy: In<'_, Vec<T>>,
        d_out: usize,
        dw: Out<'_, Vec<T>>,
    ) -> Result<()> {
        let (t, col_ptr, entries) = x.transposed(transform);
        if *t == transform {
            linear::sparse_backward_transposed(col_ptr, entries, r(&dy), d_out, w(dw));
        } else {
            linear::sparse_input_backward(x.as_ref(), transform, r(&dy), d_out, w(dw));
        }
        Ok(())
    }

    fn activation_forward(
        &self,
        act: Activation,
        x: In<'_, Vec<T>>,
        y: Out<'_, Vec<T>>,
    ) -> Result<()> {
        act.forward(r(&x), w(y));
        Ok(())
    }

    fn activation_backward(
        &self,
        act: Activation,
        x: In<'_, Vec<T>>,
        y: In<'_, Vec<T>>,
        dy: In<'_, Vec<T>>,
        dx: Out<'_, Vec<T>>,
    ) -> Result<()> {
        act.backward(r(&x), r(&y), r(&dy), w(dx));
        Ok(())
    }

    fn bias_add(&self, y: Out<'_, Vec<T>>, bias: In<'_, Vec<T>>) -> Result<()> {
        elementwise::bias_add_forward(w(y), r(&bias));
        Ok(())
    }

    fn column_sums(&self, m: In<'_, Vec<T>>, out: Out<'_, Vec<T>>) -> Result<()> {
        elementwise::column_sums(r(&m), w(out));
        Ok(())
    }

    fn scale_rows(&self, x: In<'_, Vec<T>>, s: In<'_, Vec<T>>, y: Out<'_, Vec<T>>) -> Result<()> {
        elementwise::scale_rows(r(&x), r(&s), w(y));
        Ok(())
    }

    fn leading_columns(
        &self,
        x: In<'_, Vec<T>>,
        cols: usize,
        k: usize,
        out: Out<'_, Vec<T>>,
    ) -> Result<()> {
        elementwise::leading_columns(r(&x), cols, k, w(out));
        Ok(())
    }

    fn first_positive(
        &self,
        x: In<'_, Vec<T>>,
        cols: usize,
        k: usize,
        out: Out<'_, Vec<T>>,
    ) -> Result<()> {
        elementwise::first_positive(r(&x), cols, k, w(out));
        Ok(())
    }

    fn gather_rows(
        &self,
        table: In<'_, Vec<T>>,
        codes: &[usize],
        cols: usize,
        out: Out<'_, Vec<T>>,
    ) -> Result<()> {
        elementwise::gather_rows(r(&table), codes, cols, w(out));
        Ok(())
    }

    fn scatter_add_rows(
        &self,
        x: In<'_, Vec<T>>,
        codes: &[usize],
        cols: usize,
        table: Out<'_, Vec<T>>,
    ) -> Result<()> {
        elementwise::scatter_add_rows(r(&x), codes, cols, w(table));
        Ok(())
    }

    fn dropout(
        &self,
        x: In<'_, Vec<T>>,
        p: f32,
        seed: u64,
        stream: u64,
        y: Out<'_, Vec<T>>,
    ) -> Result<()> {
        dropout::dropout_forward(r(&x), p, seed, stream, w(y));
        Ok(())
    }

    fn normal(&self, seed: u64, stream: u64, out: Out<'_, Vec<T>>) -> Result<()> {
        dropout::normal_fill(seed, stream, w(out));
        Ok(())
    }

    fn batch_norm_train(
        &self,
        x: In<'_, Vec<T>>,
        gamma: In<'_, Vec<T>>,
        beta: In<'_, Vec<T>>,
        running: Out<'_, Vec<T>>,
        momentum: f64,
        eps: f64,
        y: Out<'_, Vec<T>>,
        xhat: Out<'_, Vec<T>>,
        inv_std: Out<'_, Vec<T>>,
    ) -> Result<()> {
        let (mean, var) = w(running).split_at_mut(gamma.len());
        norm::batch_norm_train(
            r(&x),
            r(&gamma),
            r(&beta),
            norm::Running {
                mean,
                var,
                momentum,
                eps,
            },
            w(y),
            w(xhat),
            w(inv_std),
        );
        Ok(())
    }

    fn batch_norm_eval(
        &self,
        x: In<'_, Vec<T>>,
        gamma: In<'_, Vec<T>>,
        beta: In<'_, Vec<T>>,
        running: In<'_, Vec<T>>,
        eps: f64,
        y: Out<'_, Vec<T>>,
    ) -> Result<()> {
        let (mean, var) = r(&running).split_at(gamma.len());
        norm::batch_norm_eval(r(&x), r(&gamma), r(&beta), mean, var, eps, w(y));
        Ok(())
    }

    fn batch_norm_backward(
        &self,
        xhat: In<'_, Vec<T>>,
        inv_std: In<'_, Vec<T>>,
        gamma: In<'_, Vec<T>>,
        dy: In<'_, Vec<T>>,
        dx: Out<'_, Vec<T>>,
        dgamma_beta: Out<'_, Vec<T>>,
    ) -> Result<()> {
        let (dgamma, dbeta) = w(dgamma_beta).split_at_mut(gamma.len());
        norm::batch_norm_backward(
            r(&xhat),
            r(&inv_std),
            r(&gamma),
            r(&dy),
            w(dx),
            dgamma,
            dbeta,
        );
        Ok(())
    }

    fn layer_norm_forward(
        &self,
        x: In<'_, Vec<T>>,
        features: usize,
        eps: f64,
        y: Out<'_, Vec<T>>,
        inv_std: Out<'_, Vec<T>>,
    ) -> Result<()> {
        norm::layer_norm_forward(r(&x), features, eps, w(y), w(inv_std));
        Ok(())
    }

    fn layer_norm_backward(
        &self,
        y: In<'_, Vec<T>>,
        inv_std: In<'_, Vec<T>>,
        dy: In<'_, Vec<T>>,
        dx: Out<'_, Vec<T>>,
    ) -> Result<()> {
        norm::layer_norm_backward(r(&y), r(&inv_std), r(&dy), w(dx));
        Ok(())
    }

    fn softmax_forward(
        &self,
        x: In<'_, Vec<T>>,
        features: usize,
        y: Out<'_, Vec<T>>,
    ) -> Result<()> {
        norm::softmax_forward(r(&x), features, w(y));
        Ok(())
    }

    fn softmax_backward(
        &self,
        y: In<'_, Vec<T>>,
        dy: In<'_, Vec<T>>,
        features: usize,
        dx: Out<'_, Vec<T>>,
    ) -> Result<()> {
        norm::softmax_backward(r(&y), r(&dy), features, w(dx));
        Ok(())
    }

    fn reparameterize_forward(
        &self,
        m: In<'_, Vec<T>>,
        lv: In<'_, Vec<T>>,
        eps: In<'_, Vec<T>>,
        z: Out<'_, Vec<T>>,
    ) -> Result<()> {
        gaussian::reparameterize_forward(r(&m), r(&lv), r(&eps), w(z));
        Ok(())
    }

    fn reparameterize_backward(
        &self,
        lv: In<'_, Vec<T>>,
        eps: In<'_, Vec<T>>,
        dz: In<'_, Vec<T>>,
        dm: Out<'_, Vec<T>>,
        dlv: Out<'_, Vec<T>>,
    ) -> Result<()> {
        gaussian::reparameterize_backward(r(&lv), r(&eps), r(&dz), w(dm), w(dlv));
        Ok(())
    }

    fn kl_standard_normal(
        &self,
        m: In<'_, Vec<T>>,
        lv: In<'_, Vec<T>>,
        dim: usize,
        weights: Option<In<'_, Vec<T>>>,
        kl: Out<'_, Vec<T>>,
        dm: Out<'_, Vec<T>>,
        dlv: Out<'_, Vec<T>>,
    ) -> Result<()> {
        gaussian::kl_standard_normal(
            r(&m),
            r(&lv),
            dim,
            weights.as_ref().map(r),
            w(kl),
            w(dm),
            w(dlv),
        );
        Ok(())
    }

    fn poe_forward(
        &self,
        means: &[In<'_, Vec<T>>],
        logvars: &[In<'_, Vec<T>>],
        present: &[In<'_, Vec<T>>],
        dim: usize,
        m: Out<'_, Vec<T>>,
        lv: Out<'_, Vec<T>>,
    ) -> Result<()> {
        let (means, logvars, masks) = experts(means, logvars, present);
        let masks: Vec<&[bool]> = masks.iter().map(Vec::as_slice).collect();
        gaussian::poe_forward(&means, &logvars, &masks, dim, w(m), w(lv));
        Ok(())
    }

    fn poe_backward(
        &self,
        means: &[In<'_, Vec<T>>],
        logvars: &[In<'_, Vec<T>>],
        present: &[In<'_, Vec<T>>],
        dim: usize,
        m: In<'_, Vec<T>>,
        lv: In<'_, Vec<T>>,
        dm: In<'_, Vec<T>>,
        dlv: In<'_, Vec<T>>,
        dmeans: &mut [Out<'_, Vec<T>>],
        dlogvars: &mut [Out<'_, Vec<T>>],
    ) -> Result<()> {
        let (means, logvars, masks) = experts(means, logvars, present);
        let masks: Vec<&[bool]> = masks.iter().map(Vec::as_slice).collect();
        let mut dmeans: Vec<&mut [T]> = dmeans
            .iter_mut()
            .map(|g| &mut g.buf[g.range.clone()])
            .collect();
        let mut dlogvars: Vec<&mut [T]> = dlogvars
            .iter_mut()
            .map(|g| &mut g.buf[g.range.clone()])
            .collect();
        gaussian::poe_backward(
            &means,
            &logvars,
            &masks,
            dim,
            r(&m),
            r(&lv),
            r(&dm),
            r(&dlv),
            &mut dmeans,
            &mut dlogvars,
        );
        Ok(())
    }

    fn likelihood(
        &self,
        family: Likelihood,
        x: In<'_, Vec<T>>,
        features: usize,
        params: &[In<'_, Vec<T>>],
        weights: Option<In<'_, Vec<T>>>,
        ll: Out<'_, Vec<T>>,
        grads: &mut [Out<'_, Vec<T>>],
    ) -> Result<()> {
        let params: Vec<&[T]> = params.iter().map(r).collect();
        let mut grads: Vec<&mut [T]> = grads
            .iter_mut()
            .map(|g| &mut g.buf[g.range.clone()])
            .collect();
        family.forward_backward(
            r(&x),
            features,
            &params,
            weights.as_ref().map(r),
            w(ll),
            &mut grads,
        );
        Ok(())
    }

    fn softmax_nb(
        &self,
        logits: In<'_, Vec<T>>,
        library: In<'_, Vec<T>>,
        counts: &HostCsr<T>,
        theta: In<'_, Vec<T>>,
        weights: In<'_, Vec<T>>,
        ll: Out<'_, Vec<T>>,
        dlogits: Out<'_, Vec<T>>,
        dtheta: Out<'_, Vec<T>>,
    ) -> Result<()> {
        likelihood::softmax_nb(
            r(&logits),
            r(&library),
            counts.as_ref(),
            r(&theta),
            r(&weights),
            w(ll),
            w(dlogits),
            w(dtheta),
        );
        Ok(())
    }

    fn nb_mixture(
        &self,
        x: In<'_, Vec<T>>,
        mu_back: In<'_, Vec<T>>,
        mu_fore: In<'_, Vec<T>>,
        theta: In<'_, Vec<T>>,
        pi: In<'_, Vec<T>>,
        features: usize,
        ll: Out<'_, Vec<T>>,
        grads: [Out<'_, Vec<T>>; 4],
    ) -> Result<()> {
        let [a, b, c, d] = grads;
        crate::ops::likelihood::nb_mixture(
            r(&x),
            r(&mu_back),
            r(&mu_fore),
            r(&theta),
            r(&pi),
            features,
            w(ll),
            [w(a), w(b), w(c), w(d)],
        );
        Ok(())
    }

    #[allow(clippy::too_many_arguments)] // the op's inputs, its two gradients and its value
    fn mmd_rbf(
        &self,
        x: In<'_, Vec<T>>,
        y: In<'_, Vec<T>>,
        dim: usize,
        bandwidths: &[f64],
        dx: Out<'_, Vec<T>>,
        dy: Out<'_, Vec<T>>,
        value: Out<'_, Vec<T>>,
    ) -> Result<()> {
        assert_eq!(value.range.len(), 1, "mmd: one value");
        w(value)[0] = losses::mmd_rbf(r(&x), r(&y), dim, bandwidths, w(dx), w(dy));
        Ok(())
    }

    fn cross_entropy(
        &self,
        logits: In<'_, Vec<T>>,
        labels: Labels<'_, Vec<T>>,
        classes: usize,
        dlogits: Out<'_, Vec<T>>,
        loss: Out<'_, Vec<T>>,
    ) -> Result<()> {
        assert_eq!(loss.range.len(), 1, "cross entropy: one loss value");
        let mut codes = Vec::new();
        let labels = host_labels(labels, &mut codes);
        w(loss)[0] = losses::cross_entropy(r(&logits), labels, classes, w(dlogits)).0;
        Ok(())
    }

    fn masked_mse(
        &self,
        pred: In<'_, Vec<T>>,
        targets: &[f64],
        dpred: Out<'_, Vec<T>>,
        loss: Out<'_, Vec<T>>,
    ) -> Result<usize> {
        assert_eq!(loss.range.len(), 1, "mse: one loss value");
        let (value, observed) = losses::masked_mse(r(&pred), targets, w(dpred));
        w(loss)[0] = value;
        Ok(observed)
    }

    #[allow(clippy::too_many_arguments)] // the op's inputs, its gradient and its value
    fn cosine_margin(
        &self,
        z: In<'_, Vec<T>>,
        labels: Labels<'_, Vec<T>>,
        dim: usize,
        margin: f64,
        dz: Out<'_, Vec<T>>,
        loss: Out<'_, Vec<T>>,
    ) -> Result<()> {
        assert_eq!(loss.range.len(), 1, "cosine margin: one loss value");
        let mut codes = Vec::new();
        let labels = host_labels(labels, &mut codes);
        w(loss)[0] = losses::cosine_margin(r(&z), labels, dim, margin, w(dz));
        Ok(())
    }

    fn cox_partial_likelihood(
        &self,
        eta: In<'_, Vec<T>>,
        times: &[f64],
        events: &[bool],
        deta: Out<'_, Vec<T>>,
        loss: Out<'_, Vec<T>>,
    ) -> Result<()> {
        assert_eq!(loss.range.len(), 1, "cox: one loss value");
        w(loss)[0] = losses::cox_partial_likelihood(r(&eta), times, events, w(deta));
        Ok(())
    }

    fn jeffreys(
        &self,
        m1: In<'_, Vec<T>>,
        lv1: In<'_, Vec<T>>,
        m2: In<'_, Vec<T>>,
        lv2: In<'_, Vec<T>>,
        dim: usize,
        weights: In<'_, Vec<T>>,
        value: Out<'_, Vec<T>>,
        grads: [Out<'_, Vec<T>>; 4],
    ) -> Result<()> {
        let [a, b, c, d] = grads;
        gaussian::jeffreys(
            r(&m1),
            r(&lv1),
            r(&m2),
            r(&lv2),
            dim,
            r(&weights),
            w(value),
            [w(a), w(b), w(c), w(d)],
        );
        Ok(())
    }

    fn adamw_step(
        &self,
        opt: &AdamW,
        t: u64,
        params: Out<'_, Vec<T>>,
        grads: In<'_, Vec<T>>,
        m: Out<'_, Vec<T>>,
        v: Out<'_, Vec<T>>,
        skip: Option<In<'_, Vec<T>>>,
    ) -> Result<()> {
        if let Some(flag) = skip {
            assert_eq!(flag.len(), 1, "AdamW: one skip flag");
            if r(&flag)[0] != T::zero() {
                return Ok(());
            }
        }
        opt.step(t, w(params), r(&grads), w(m), w(v));
        Ok(())
    }

    fn grad_norm(&self, grads: In<'_, Vec<T>>) -> Result<f64> {
        Ok(optim::grad_norm(r(&grads)))
    }

    fn flag_non_finite(&self, x: In<'_, Vec<T>>, flag: Out<'_, Vec<T>>) -> Result<()> {
        let flag = w(flag);
        assert_eq!(flag.len(), 1, "flag_non_finite: one flag");
        flag[0] = optim::non_finite_flag(r(&x));
        Ok(())
    }
}
