//! Helpers shared by the `fit` integration tests: the shared real data and default options.
#![allow(dead_code, clippy::unwrap_used)] // each test crate uses its own subset; test setup

use std::path::{Path, PathBuf};

use tessera_worker::{FitConfig, FitOptions};

pub fn shared_data() -> PathBuf {
    std::env::var_os("TESSERA_SHARED_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data"))
}

/// A private copy of the PBMC store (training writes its embedding into the store), made with
/// our own converter.
pub fn pbmc_copy(dir: &Path) -> String {
    let from = shared_data().join("pbmc68k_counts.zarr");
    assert!(
        from.exists(),
        "the shared PBMC store is missing at {}",
        from.display()
    );
    let to = dir.join("pbmc.zarr").display().to_string();
    tessera_data::convert(
        &from.display().to_string(),
        &to,
        tessera_data::ZarrVersion::V3,
        |_| {},
    )
    .unwrap();
    to
}

pub fn options(data: &str, out: &Path, epochs: usize) -> FitOptions {
    let mut config = FitConfig::default();
    config.train.max_epochs = Some(epochs);
    config.train.kl_warmup_epochs = epochs / 2;
    FitOptions {
        data: data.into(),
        modalities: Vec::new(),
        batch_key: None,
        label_key: Some("cell_type".into()),
        unlabeled_category: None,
        covariates: Default::default(),
        config,
        out: out.to_path_buf(),
        embedding_key: "X_tessera".into(),
        prediction_key: tessera_worker::fit::PREDICTION_KEY.into(),
        overwrite: false,
        store_outputs: true,
        resume: false,
        denoised: None,
        cache_bytes: tessera_worker::DEFAULT_CACHE_MIB << 20,
        device: Default::default(),
        init_from: None,
        layer: None,
    }
}
