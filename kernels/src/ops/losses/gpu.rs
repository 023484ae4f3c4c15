//! GPU entry points of the losses (kernels in `losses.cu`). Each loss's value is summed on the
//! device into a one-value buffer and left there, so a step reads it with its other terms.
#![allow(unsafe_code)] // kernel launches: argument types and lengths are checked before each

use cudarc::driver::PushKernelArg;

use super::CUDA_SOURCE;
use crate::cuda::{Gpu, Result, View, ViewMut, launch};
use crate::cuda_cache::DeviceBuf;
use crate::ops::elementwise::gpu::{axpy, column_sums, scale as scale_by, scale_rows};

/// loss = scale × Σ shares (one value), on the device: the shares as one column, summed in
/// order as the host summed them.
fn sum_scaled(gpu: &Gpu, shares: &DeviceBuf, scale: f32, loss: &mut ViewMut<'_>) -> Result<()> {
    column_sums(gpu, &shares.slice(..), loss)?;
    scale_by(gpu, loss, scale)
}

/// As [`super::cross_entropy`], on the device, with the labels there as f32 codes (-1:
/// unlabelled; a step captured as a CUDA graph reads them where its batch was copied): the
/// labelled rows are counted and their mean taken there too, and the loss is written into
/// `loss` (one value), not read back, so a step reads it with its other terms. A label past the
/// classes is the caller's to refuse: the labels are not read on the host.
pub fn cross_entropy(
    gpu: &Gpu,
    logits: &View<'_>,
    labels: &View<'_>,
    classes: usize,
    dlogits: &mut ViewMut<'_>,
    loss: &mut ViewMut<'_>,
) -> Result<()> {
    let rows = labels.len();
    assert!(
        classes > 0
            && logits.len() == rows * classes
            && dlogits.len() == logits.len()
            && loss.len() == 1,
        "cross entropy: shapes"
    );
    let (scale, row_loss) = (labelled_scale(gpu, labels, false)?, gpu.zeros(rows)?);
    let (rows64, classes64) = (rows as u64, classes as u64);
    let f = gpu.function("losses", CUDA_SOURCE, "cross_entropy")?;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(logits)
        .arg(labels)
        .arg(&rows64)
        .arg(&classes64)
        .arg(&scale)
        .arg(&row_loss)
        .arg(dlogits);
    launch(b, rows, "cross_entropy")?;
    sum_times(gpu, &row_loss, &scale, loss)
}

/// 1 / (the labelled rows of `labels`, f32 codes with -1 unlabelled), or with `pairs` 1 / (the
/// pairs of them), 0 with none: one value on the device, the host's f32 division of the count.
fn labelled_scale(gpu: &Gpu, labels: &View<'_>, pairs: bool) -> Result<DeviceBuf> {
    let scale = gpu.zeros(1)?;
    let (rows, pairs) = (labels.len() as u64, u32::from(pairs));
    let f = gpu.function("losses", CUDA_SOURCE, "labelled_scale")?;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(labels).arg(&rows).arg(&pairs).arg(&scale);
    // One block: the kernel sums its threads' counts.
    launch(b, 1, "labelled_scale")?;
    Ok(scale)
}

/// loss = (Σ `shares`, in order) × `scale` (a value on the device), as the host multiplies its
/// sum.
fn sum_times(
    gpu: &Gpu,
    shares: &DeviceBuf,
    scale: &DeviceBuf,
    loss: &mut ViewMut<'_>,
) -> Result<()> {
    let mut total = gpu.zeros(1)?;
    column_sums(gpu, &shares.slice(..), &mut total.slice_mut(..))?;
    scale_rows(gpu, &total.slice(..), &scale.slice(..), loss)
}

/// As [`super::masked_mse`], on the device (targets come from the host batch).
pub fn masked_mse(
    gpu: &Gpu,
    pred: &View<'_>,
    targets: &[f64],
    dpred: &mut ViewMut<'_>,
    loss: &mut ViewMut<'_>,
) -> Result<usize> {
    let n = targets.len();
    assert!(
        pred.len() == n && dpred.len() == n && loss.len() == 1,
        "mse: lengths"
    );
    let observed = targets.iter().filter(|t| !t.is_nan()).count();
    let scale = if observed > 0 {
        1.0 / observed as f32
    } else {
        0.0
    };
    let targets_d = gpu.upload(targets)?;
    let entry_loss = gpu.zeros(n)?;
    let n64 = n as u64;
    let f = gpu.function("losses", CUDA_SOURCE, "masked_mse")?;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(pred)
        .arg(&targets_d)
        .arg(&n64)
        .arg(&scale)
        .arg(&entry_loss)
        .arg(dpred);
    launch(b, n, "masked_mse")?;
    sum_scaled(gpu, &entry_loss, scale, loss)?;
    Ok(observed)
}

/// As [`super::mmd_rbf`], on the device: the value is written into `value` (one entry) there,
/// not read back, so a step reads it with its other terms.
#[allow(clippy::too_many_arguments)] // the op's inputs, its two gradients and its value
pub fn mmd_rbf(
    gpu: &Gpu,
    x: &View<'_>,
    y: &View<'_>,
    dim: usize,
    bandwidths: &[f64],
    dx: &mut ViewMut<'_>,
    dy: &mut ViewMut<'_>,
    value: &mut ViewMut<'_>,
) -> Result<()> {
    let (n, m) = (x.len() / dim, y.len() / dim);
    assert!(
        n > 0 && m > 0 && dx.len() == x.len() && dy.len() == y.len() && value.len() == 1,
        "mmd: shapes"
    );
    let bw: Vec<f32> = bandwidths.iter().map(|&b| b as f32).collect();
    let kept = gpu.constant(&bw)?;
    let bw_d: &cudarc::driver::CudaSlice<f32> = &kept;
    let f = gpu.function("losses", CUDA_SOURCE, "mmd_side")?;
    // One side's row sums into `partial`, its weighted gradient into `grad`.
    let side = |a: &View<'_>,
                b_: &View<'_>,
                na: usize,
                nb: usize,
                w: f32,
                grad: &mut ViewMut<'_>|
     -> Result<DeviceBuf> {
        let partial = gpu.zeros(na)?;
        let (na64, nb64, d64, nbw) = (na as u64, nb as u64, dim as u64, bw.len() as i32);
        let mut b = gpu.stream().launch_builder(&f);
        b.arg(a)
            .arg(b_)
            .arg(&na64)
            .arg(&nb64)
            .arg(&d64)
            .arg(bw_d)
            .arg(&nbw)
            .arg(&w)
            .arg(&partial)
            .arg(grad);
        launch(b, na, "mmd_side")?;
        Ok(partial)
    };
    let (wxx, wyy, wxy) = (
        1.0 / (n * n) as f32,
        1.0 / (m * m) as f32,
        1.0 / (n * m) as f32,
    );
    let mut cross_x = gpu.zeros(x.len())?;
    let mut cross_y = gpu.zeros(y.len())?;
    let kxx = side(x, x, n, n, wxx, dx)?;
    let kxy = side(x, y, n, m, wxy, &mut cross_x.as_view_mut())?;
    let kyy = side(y, y, m, m, wyy, dy)?;
    side(y, x, m, n, wxy, &mut cross_y.as_view_mut())?;
    // The sides' sums (in row order, as the host summed them) and the value from them.
    let mut sums = gpu.zeros(3)?;
    for (k, partial) in [&kxx, &kyy, &kxy].into_iter().enumerate() {
        column_sums(gpu, &partial.slice(..), &mut sums.slice_mut(k..k + 1))?;
    }
    let g = gpu.function("losses", CUDA_SOURCE, "mmd_value")?;
    let mut b = gpu.stream().launch_builder(&g);
    b.arg(&sums).arg(&wxx).arg(&wyy).arg(&wxy).arg(value);
    launch(b, 1, "mmd_value")?;
    // d = 2 · self-term - 2 · cross-term, as the CPU reference.
    scale_by(gpu, dx, 2.0)?;
    axpy(gpu, -2.0, &cross_x.as_view(), dx)?;
    scale_by(gpu, dy, 2.0)?;
    axpy(gpu, -2.0, &cross_y.as_view(), dy)?;
    Ok(())
}

/// As [`super::cosine_margin`], on the device, with the labels there as f32 codes (as
/// [`cross_entropy`] reads them; the labelled pairs counted there).
#[allow(clippy::too_many_arguments)] // the op's inputs, its gradient and its value
pub fn cosine_margin(
    gpu: &Gpu,
    z: &View<'_>,
    labels: &View<'_>,
    dim: usize,
    margin: f64,
    dz: &mut ViewMut<'_>,
    loss: &mut ViewMut<'_>,
) -> Result<()> {
    let n = labels.len();
    assert!(
        z.len() == n * dim && dz.len() == z.len() && loss.len() == 1,
        "cosine margin: shapes"
    );
    let scale = labelled_scale(gpu, labels, true)?;
    let (norms_d, row_loss) = (gpu.zeros(n)?, gpu.zeros(n)?);
    let (n64, d64, margin) = (n as u64, dim as u64, margin as f32);
    let norms = gpu.function("losses", CUDA_SOURCE, "row_norms")?;
    let mut b = gpu.stream().launch_builder(&norms);
    b.arg(z).arg(&n64).arg(&d64).arg(&norms_d);
    launch(b, n, "row_norms")?;
    let f = gpu.function("losses", CUDA_SOURCE, "cosine_margin")?;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(z)
        .arg(labels)
        .arg(&norms_d)
        .arg(&n64)
        .arg(&d64)
        .arg(&margin)
        .arg(&scale)
        .arg(&row_loss)
        .arg(dz);
    launch(b, n, "cosine_margin")?;
    sum_times(gpu, &row_loss, &scale, loss)
}

/// As [`super::cox_partial_likelihood`], on the device.
pub fn cox_partial_likelihood(
    gpu: &Gpu,
    eta: &View<'_>,
    times: &[f64],
    events: &[bool],
    deta: &mut ViewMut<'_>,
    loss: &mut ViewMut<'_>,
) -> Result<()> {
    let n = eta.len();
    assert!(
        times.len() == n && events.len() == n && deta.len() == n && loss.len() == 1,
        "cox: lengths"
    );
    let n_events = events.iter().filter(|&&e| e).count();
    let scale = if n_events > 0 {
        1.0 / n_events as f32
    } else {
        0.0
    };
    let ev: Vec<u8> = events.iter().map(|&e| u8::from(e)).collect();
    // Every value of these is written by the kernels below.
    let (w_d, max, t_d, e_d, risk, row_loss) = (
        gpu.alloc::<f32>(n)?,
        gpu.alloc::<f32>(1)?,
        gpu.upload(times)?,
        gpu.upload(&ev)?,
        gpu.alloc::<f32>(n)?,
        gpu.alloc::<f32>(n)?,
    );
    let n64 = n as u64;
    let weights = gpu.function("losses", CUDA_SOURCE, "cox_weights")?;
    let mut b = gpu.stream().launch_builder(&weights);
    b.arg(eta).arg(&n64).arg(&w_d).arg(&max);
    launch(b, n, "cox_weights")?;
    let f = gpu.function("losses", CUDA_SOURCE, "cox_risk_sums")?;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&w_d).arg(&t_d).arg(&e_d).arg(&n64).arg(&risk);
    launch(b, n, "cox_risk_sums")?;
    let g = gpu.function("losses", CUDA_SOURCE, "cox_gradient")?;
    let mut b = gpu.stream().launch_builder(&g);
    b.arg(&w_d)
        .arg(&t_d)
        .arg(&e_d)
        .arg(&risk)
        .arg(&n64)
        .arg(&scale)
        .arg(deta);
    launch(b, n, "cox_gradient")?;
    let h = gpu.function("losses", CUDA_SOURCE, "cox_row_loss")?;
    let mut b = gpu.stream().launch_builder(&h);
    b.arg(eta)
        .arg(&e_d)
        .arg(&risk)
        .arg(&max)
        .arg(&n64)
        .arg(&row_loss);
    launch(b, n, "cox_row_loss")?;
    sum_scaled(gpu, &row_loss, scale, loss)
}
