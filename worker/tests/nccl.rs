//! NCCL on one GPU (world size 1, formed over a one-rank ring): sums of the buffer and of a view
//! of it leave it unchanged and the stream completes. Without libnccl or a device: SKIPPED, with
//! the reason.
#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use tessera_kernels::cuda::Gpu;
use tessera_worker::nccl::Nccl;
use tessera_worker::ring::Ring;

/// Says SKIPPED, unless `TESSERA_REQUIRE_DEVICE` is set (CI's run on the emulated driver).
fn skip(why: &str) {
    tessera_kernels::testing::skip("TESSERA_REQUIRE_DEVICE", why);
}

#[test]
fn world_size_one_all_reduce_is_the_identity() {
    let gpu = match Gpu::new(0) {
        Ok(gpu) => gpu,
        Err(e) => return skip(&format!("NCCL needs a CUDA device: {e}")),
    };
    let nccl = match Nccl::over_ring(&gpu, &mut Ring::single()) {
        Ok(n) => n,
        Err(e) => return skip(&e.to_string()),
    };
    let host: Vec<f32> = (0..100_003).map(|i| (i % 97) as f32 * 0.25 - 7.0).collect();
    let mut buf = gpu.upload(&host).unwrap();
    nccl.all_reduce_sum(&mut buf).unwrap();
    nccl.all_reduce_sum(&mut buf.slice_mut(10..20)).unwrap();
    nccl.synchronize().unwrap();
    assert_eq!(gpu.download(&buf).unwrap(), host);
}
