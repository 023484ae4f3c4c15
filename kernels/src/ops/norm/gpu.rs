//! GPU entry points of softmax, LayerNorm and BatchNorm (kernels in `norm.cu`).
#![allow(unsafe_code)] // kernel launches: argument types and lengths are checked before each

use cudarc::driver::{CudaSlice, PushKernelArg};

use super::CUDA_SOURCE;
use crate::cuda::{Gpu, Result, driver as failed, grid, launch};


pub fn softmax_forward(gpu: &Gpu, x: &CudaSlice<f32>, features: usize, y: &mut CudaSlice<f32>) -> Result<()> {
    assert!(features > 0 && x.len() == y.len() && x.len().is_multiple_of(features), "softmax: shapes");
    let f = gpu.function("norm", CUDA_SOURCE, "softmax_forward")?;
    let (rows, features64) = ((x.len() / features) as u64, features as u64);
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(x).arg(y).arg(&rows).arg(&features64);
    // SAFETY: one thread per row; x and y hold rows*features floats.
    unsafe { b.launch(grid(rows as usize)) }.map(|_| ()).map_err(failed("softmax_forward"))
}

pub fn softmax_backward(gpu: &Gpu, y: &CudaSlice<f32>, dy: &CudaSlice<f32>, features: usize, dx: &mut CudaSlice<f32>) -> Result<()> {
    assert!(y.len() == dy.len() && dy.len() == dx.len() && y.len().is_multiple_of(features), "softmax backward: shapes");
    let f = gpu.function("norm", CUDA_SOURCE, "softmax_backward")?;
    let (rows, features64) = ((y.len() / features) as u64, features as u64);
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(y).arg(dy).arg(dx).arg(&rows).arg(&features64);
    // SAFETY: as above.
    unsafe { b.launch(grid(rows as usize)) }.map(|_| ()).map_err(failed("softmax_backward"))
}


/// Device copies of what [`super::NormCache`] holds on the host.
#[derive(Debug)]
pub struct DeviceNormCache {
    pub xhat: CudaSlice<f32>,
    pub inv_std: CudaSlice<f32>,
}

/// As [`super::layer_norm_forward`], on the device.
pub fn layer_norm_forward(gpu: &Gpu, x: &CudaSlice<f32>, gamma: &CudaSlice<f32>, beta: &CudaSlice<f32>, eps: f64, y: &mut CudaSlice<f32>) -> Result<DeviceNormCache> {
    let f = gamma.len();
    assert!(f > 0 && beta.len() == f && x.len() == y.len() && x.len().is_multiple_of(f), "layer norm: shapes");
    let rows = x.len() / f;
    let cache = DeviceNormCache { xhat: gpu.zeros(x.len())?, inv_std: gpu.zeros(rows)? };
    let (rows64, f64_, eps) = (rows as u64, f as u64, eps as f32);
    {
        let kernel = gpu.function("norm", CUDA_SOURCE, "layer_norm_forward")?;
        let mut b = gpu.stream().launch_builder(&kernel);
        b.arg(x).arg(gamma).arg(beta).arg(&rows64).arg(&f64_).arg(&eps).arg(y).arg(&cache.xhat).arg(&cache.inv_std);
        launch(b, rows, "layer_norm_forward")
    }?;
    Ok(cache)
}

/// As [`super::layer_norm_backward`], on the device.
pub fn layer_norm_backward(gpu: &Gpu, cache: &DeviceNormCache, gamma: &CudaSlice<f32>, dy: &CudaSlice<f32>, dx: &mut CudaSlice<f32>, dgamma: &mut CudaSlice<f32>, dbeta: &mut CudaSlice<f32>) -> Result<()> {
    let f = gamma.len();
    let rows = dy.len() / f;
    assert!(dy.len() == cache.xhat.len() && dx.len() == dy.len() && dgamma.len() == f && dbeta.len() == f, "layer norm backward: shapes");
    let (rows64, f64_, n64) = (rows as u64, f as u64, dy.len() as u64);
    {
        let kernel = gpu.function("norm", CUDA_SOURCE, "layer_norm_backward")?;
        let mut b = gpu.stream().launch_builder(&kernel);
        b.arg(&cache.xhat).arg(&cache.inv_std).arg(gamma).arg(dy).arg(&rows64).arg(&f64_).arg(dx);
        launch(b, rows, "layer_norm_backward")
    }?;
    let prod = gpu.zeros(dy.len())?;
    {
        let kernel = gpu.function("norm", CUDA_SOURCE, "multiply")?;
        let mut b = gpu.stream().launch_builder(&kernel);
        b.arg(dy).arg(&cache.xhat).arg(&prod).arg(&n64);
        launch(b, dy.len(), "multiply")
    }?;
    crate::ops::elementwise::gpu::column_sums(gpu, &prod, dgamma)?;
    crate::ops::elementwise::gpu::column_sums(gpu, dy, dbeta)
}

/// A BatchNorm layer's tensors on the device.
#[derive(Debug)]
pub struct DeviceBatchNorm {
    pub gamma: CudaSlice<f32>,
    pub beta: CudaSlice<f32>,
    pub running_mean: CudaSlice<f32>,
    pub running_var: CudaSlice<f32>,
    pub momentum: f64,
    pub eps: f64,
}

impl DeviceBatchNorm {
    pub fn upload(gpu: &Gpu, bn: &super::BatchNorm<f32>) -> Result<DeviceBatchNorm> {
        Ok(DeviceBatchNorm { gamma: gpu.upload(&bn.gamma)?, beta: gpu.upload(&bn.beta)?, running_mean: gpu.upload(&bn.running_mean)?, running_var: gpu.upload(&bn.running_var)?, momentum: bn.momentum, eps: bn.eps })
    }

    pub fn forward_train(&mut self, gpu: &Gpu, x: &CudaSlice<f32>, y: &mut CudaSlice<f32>) -> Result<DeviceNormCache> {
        let f = self.gamma.len();
        assert!(f > 0 && x.len() == y.len() && x.len().is_multiple_of(f) && x.len() / f > 1, "batch norm: shapes");
        let cache = DeviceNormCache { xhat: gpu.zeros(x.len())?, inv_std: gpu.zeros(f)? };
        let (rows64, f64_, eps, momentum) = ((x.len() / f) as u64, f as u64, self.eps as f32, self.momentum as f32);
        {
            let kernel = gpu.function("norm", CUDA_SOURCE, "batch_norm_forward_train")?;
            let mut b = gpu.stream().launch_builder(&kernel);
            b.arg(x).arg(&self.gamma).arg(&self.beta).arg(&rows64).arg(&f64_).arg(&eps).arg(&momentum).arg(&mut self.running_mean).arg(&mut self.running_var).arg(y).arg(&cache.xhat).arg(&cache.inv_std);
            launch(b, f, "batch_norm_forward_train")
        }?;
        Ok(cache)
    }

    pub fn forward_eval(&self, gpu: &Gpu, x: &CudaSlice<f32>, y: &mut CudaSlice<f32>) -> Result<()> {
        let f = self.gamma.len();
        assert!(x.len() == y.len() && x.len().is_multiple_of(f), "batch norm: shapes");
        let (rows64, f64_, eps) = ((x.len() / f) as u64, f as u64, self.eps as f32);
        {
            let kernel = gpu.function("norm", CUDA_SOURCE, "batch_norm_forward_eval")?;
            let mut b = gpu.stream().launch_builder(&kernel);
            b.arg(x).arg(&self.gamma).arg(&self.beta).arg(&self.running_mean).arg(&self.running_var).arg(&rows64).arg(&f64_).arg(&eps).arg(y);
            launch(b, x.len(), "batch_norm_forward_eval")
        }
    }

    pub fn backward(&self, gpu: &Gpu, cache: &DeviceNormCache, dy: &CudaSlice<f32>, dx: &mut CudaSlice<f32>, dgamma: &mut CudaSlice<f32>, dbeta: &mut CudaSlice<f32>) -> Result<()> {
        let f = self.gamma.len();
        assert!(dy.len() == cache.xhat.len() && dx.len() == dy.len() && dgamma.len() == f && dbeta.len() == f, "batch norm backward: shapes");
        let (rows64, f64_) = ((dy.len() / f) as u64, f as u64);
        {
            let kernel = gpu.function("norm", CUDA_SOURCE, "batch_norm_backward")?;
            let mut b = gpu.stream().launch_builder(&kernel);
            b.arg(&cache.xhat).arg(&cache.inv_std).arg(&self.gamma).arg(dy).arg(&rows64).arg(&f64_).arg(dx).arg(dgamma).arg(dbeta);
            launch(b, f, "batch_norm_backward")
        }
    }
}
