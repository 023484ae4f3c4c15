//! GPU entry points of softmax, LayerNorm and BatchNorm (kernels in `norm.cu`).
#![allow(unsafe_code)] // kernel launches: argument types and lengths are checked before each

use cudarc::driver::PushKernelArg;

use super::CUDA_SOURCE;
use crate::cuda::{Gpu, Result, View, ViewMut, launch};

pub fn softmax_forward(
    gpu: &Gpu,
    x: &View<'_>,
    features: usize,
    y: &mut ViewMut<'_>,
) -> Result<()> {
    assert!(
        features > 0 && x.len() == y.len() && x.len().is_multiple_of(features),
        "softmax: shapes"
    );
    let f = gpu.function("norm", CUDA_SOURCE, "softmax_forward")?;
    let (rows, features64) = ((x.len() / features) as u64, features as u64);
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(x).arg(y).arg(&rows).arg(&features64);
    launch(b, rows as usize, "softmax_forward")
}

pub fn softmax_backward(
    gpu: &Gpu,
    y: &View<'_>,
    dy: &View<'_>,
    features: usize,
    dx: &mut ViewMut<'_>,
) -> Result<()> {
    assert!(
        features > 0
            && y.len() == dy.len()
            && dy.len() == dx.len()
            && y.len().is_multiple_of(features),
        "softmax backward: shapes"
    );
    let f = gpu.function("norm", CUDA_SOURCE, "softmax_backward")?;
    let (rows, features64) = ((y.len() / features) as u64, features as u64);
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(y).arg(dy).arg(dx).arg(&rows).arg(&features64);
    launch(b, rows as usize, "softmax_backward")
}

/// As [`super::layer_norm_forward`], on the device.
pub fn layer_norm_forward(
    gpu: &Gpu,
    x: &View<'_>,
    features: usize,
    eps: f64,
    y: &mut ViewMut<'_>,
    inv_std: &mut ViewMut<'_>,
) -> Result<()> {
    assert!(
        features > 0
            && x.len() == y.len()
            && x.len().is_multiple_of(features)
            && inv_std.len() == x.len() / features,
        "layer norm: shapes"
    );
    let rows = x.len() / features;
    let (rows64, f64_, eps) = (rows as u64, features as u64, eps as f32);
    let kernel = gpu.function("norm", CUDA_SOURCE, "layer_norm_forward")?;
    let mut b = gpu.stream().launch_builder(&kernel);
    b.arg(x)
        .arg(&rows64)
        .arg(&f64_)
        .arg(&eps)
        .arg(y)
        .arg(inv_std);
    launch(b, rows, "layer_norm_forward")
}

/// As [`super::layer_norm_backward`], on the device.
pub fn layer_norm_backward(
    gpu: &Gpu,
    y: &View<'_>,
    inv_std: &View<'_>,
    dy: &View<'_>,
    dx: &mut ViewMut<'_>,
) -> Result<()> {
    let rows = inv_std.len();
    assert!(
        rows > 0 && dy.len() == y.len() && dx.len() == y.len() && y.len().is_multiple_of(rows),
        "layer norm backward: shapes"
    );
    let (rows64, f64_) = (rows as u64, (y.len() / rows) as u64);
    let kernel = gpu.function("norm", CUDA_SOURCE, "layer_norm_backward")?;
    let mut b = gpu.stream().launch_builder(&kernel);
    b.arg(y)
        .arg(inv_std)
        .arg(dy)
        .arg(&rows64)
        .arg(&f64_)
        .arg(dx);
    launch(b, rows, "layer_norm_backward")
}

/// The running statistics of a BatchNorm layer: mean then variance (2 x features, one view, as
/// they sit in a model's state buffer).
fn split_running<'a>(running: &'a mut ViewMut<'_>, f: usize) -> (ViewMut<'a>, ViewMut<'a>) {
    assert_eq!(
        running.len(),
        2 * f,
        "batch norm: running statistics are mean then variance"
    );
    running.split_at_mut(f)
}

/// As [`super::batch_norm_train`]: batch statistics, the running statistics updated in place,
/// x̂ and 1/σ kept for the backward.
#[allow(clippy::too_many_arguments)] // mirrors the CPU signature plus the device
pub fn batch_norm_train(
    gpu: &Gpu,
    x: &View<'_>,
    gamma: &View<'_>,
    beta: &View<'_>,
    running: &mut ViewMut<'_>,
    momentum: f64,
    eps: f64,
    y: &mut ViewMut<'_>,
    xhat: &mut ViewMut<'_>,
    inv_std: &mut ViewMut<'_>,
) -> Result<()> {
    let f = gamma.len();
    assert!(
        f > 0
            && beta.len() == f
            && x.len() == y.len()
            && x.len() == xhat.len()
            && inv_std.len() == f
            && x.len().is_multiple_of(f)
            && x.len() / f > 1,
        "batch norm: shapes"
    );
    let (mut mean, mut var) = split_running(running, f);
    let (rows64, f64_, eps, momentum) =
        ((x.len() / f) as u64, f as u64, eps as f32, momentum as f32);
    let kernel = gpu.function("norm", CUDA_SOURCE, "batch_norm_forward_train")?;
    let mut b = gpu.stream().launch_builder(&kernel);
    b.arg(x)
        .arg(gamma)
        .arg(beta)
        .arg(&rows64)
        .arg(&f64_)
        .arg(&eps)
        .arg(&momentum)
        .arg(&mut mean)
        .arg(&mut var)
        .arg(y)
        .arg(xhat)
        .arg(inv_std);
    launch(b, f, "batch_norm_forward_train")
}

/// As [`super::batch_norm_eval`], `running` as in [`batch_norm_train`].
pub fn batch_norm_eval(
    gpu: &Gpu,
    x: &View<'_>,
    gamma: &View<'_>,
    beta: &View<'_>,
    running: &View<'_>,
    eps: f64,
    y: &mut ViewMut<'_>,
) -> Result<()> {
    let f = gamma.len();
    assert!(
        f > 0 && running.len() == 2 * f && x.len() == y.len() && x.len().is_multiple_of(f),
        "batch norm: shapes"
    );
    let (mean, var) = running.split_at(f);
    let (rows64, f64_, eps) = ((x.len() / f) as u64, f as u64, eps as f32);
    let kernel = gpu.function("norm", CUDA_SOURCE, "batch_norm_forward_eval")?;
    let mut b = gpu.stream().launch_builder(&kernel);
    b.arg(x)
        .arg(gamma)
        .arg(beta)
        .arg(&mean)
        .arg(&var)
        .arg(&rows64)
        .arg(&f64_)
        .arg(&eps)
        .arg(y);
    launch(b, x.len(), "batch_norm_forward_eval")
}

/// As [`super::batch_norm_backward`]; `dgamma_beta` receives dγ then dβ.
pub fn batch_norm_backward(
    gpu: &Gpu,
    xhat: &View<'_>,
    inv_std: &View<'_>,
    gamma: &View<'_>,
    dy: &View<'_>,
    dx: &mut ViewMut<'_>,
    dgamma_beta: &mut ViewMut<'_>,
) -> Result<()> {
    let f = gamma.len();
    assert!(
        f > 0
            && dy.len() == xhat.len()
            && dx.len() == dy.len()
            && inv_std.len() == f
            && dgamma_beta.len() == 2 * f
            && dy.len().is_multiple_of(f),
        "batch norm backward: shapes"
    );
    let (mut dgamma, mut dbeta) = dgamma_beta.split_at_mut(f);
    let (rows64, f64_) = ((dy.len() / f) as u64, f as u64);
    let kernel = gpu.function("norm", CUDA_SOURCE, "batch_norm_backward")?;
    let mut b = gpu.stream().launch_builder(&kernel);
    b.arg(xhat)
        .arg(inv_std)
        .arg(gamma)
        .arg(dy)
        .arg(&rows64)
        .arg(&f64_)
        .arg(dx)
        .arg(&mut dgamma)
        .arg(&mut dbeta);
    launch(b, f, "batch_norm_backward")
}
