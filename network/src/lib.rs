//! tessera-network: sample networks across views (modalities): Similarity Network Fusion (Wang
//! et al. 2014, as snfpy 0.2.2 computes it), NEMO (Rappoport & Shamir 2019), spectral
//! clustering with the eigengap estimate, over per-view affinity matrices from
//! `tessera_kernels::ops::affinity`. Samples may be missing from views.
//!
//! Invariant: like `metrics`, this crate knows nothing of stores or devices: dense row-major
//! n x n matrices in, a fused matrix out.

pub mod average;
pub mod distributed;
pub mod error;
pub mod nemo;
pub mod out_of_core;
pub mod snf;
pub mod spectral;
pub mod view;

pub use average::kernel_average;
pub use error::NetworkError;
pub use nemo::nemo;
pub use snf::{SnfParams, snf};
pub use spectral::{Spectrum, laplacian_eigenvalues, rank_by_eigengap, spectral_clustering};
pub use view::View;
