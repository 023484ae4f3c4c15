//! Helpers shared by this crate's integration tests.
#![allow(dead_code)] // each test binary uses a subset

use std::path::{Path, PathBuf};

/// `shared/data` beside the checkout (or `TESSERA_SHARED_DATA`).
pub fn shared_data() -> PathBuf {
    std::env::var_os("TESSERA_SHARED_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data"))
}

pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target)
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}
