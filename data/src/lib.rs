//! tessera-data: single-cell multi-omics stores (AnnData/MuData on Zarr v2/v3) on any
//! object_store location, and what training needs from them: shard plans and mini-batches.
//!
//! Invariant: this crate knows nothing of models, engines or the network protocol.

pub mod anndata;
pub mod convert;
pub mod dataframe;
pub mod error;
#[cfg(feature = "h5ad")]
mod h5ad;
pub mod host;
pub mod inspect;
pub mod loader;
mod lock;
pub mod matrix;
pub mod shard;
pub mod simulate;
pub mod store;
pub mod tiles;
pub mod write;
mod zarr;

pub use anndata::{AnnData, Dataset, MuData};
pub use convert::{ConvertSummary, convert};
pub use dataframe::{Column, DataFrame};
pub use error::{DataError, Result};
pub use host::{HostArrays, HostCsr, attach_csr};
pub use inspect::{StoreSummary, inspect};
pub use loader::{
    Cells, Epoch, Holdout, Loader, LoaderConfig, MiniBatch, ModalityBatch, row_major,
};
pub use matrix::{Csr, Matrix, MatrixFormat};
pub use shard::ShardPlan;
pub use simulate::{Scenario, SimConfig, SimSummary, simulate};
pub use store::{Location, Store, ZarrVersion, forget_memory_store};
pub use tiles::TileMatrices;
pub use write::{CsrWriter, ModalityLayout, StoreWriter};
pub use zarr::Values;
