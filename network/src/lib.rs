//! tessera-network: Similarity Network Fusion (Wang et al. 2014, as snfpy 0.2.2 computes it)
//! over per-view affinity matrices from `tessera_kernels::ops::affinity`.
//!
//! Invariant: like `metrics`, this crate knows nothing of stores or devices: dense row-major
//! n x n matrices in, a fused matrix out.

pub mod snf;
pub mod spectral;

pub use snf::{NetworkError, SnfParams, snf};
pub use spectral::{laplacian_eigenvalues, rank_by_eigengap, spectral_clustering};
