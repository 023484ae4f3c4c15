//! tessera-kernels: the compute engine. Every op is a paired forward/backward with a plain CPU
//! reference (generic over f32 and f64, gradient-checked in f64) and a CUDA kernel beside it
//! that is tested against that reference.
//!
//! Invariant: this crate knows nothing of stores, models or the network; it sees slices,
//! shapes and device buffers.

pub mod backend;
mod background;
pub mod cuda;
pub mod cuda_cache;
mod cuda_cell;
pub mod cuda_fixed;
pub mod cuda_graph;
pub mod cuda_libs;
pub mod cuda_readback;
pub mod cuda_staging;
pub mod gradcheck;
pub mod ops;
pub mod params;
pub mod real;
pub mod testing;

pub use real::Real;
