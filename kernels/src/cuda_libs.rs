//! Finding the CUDA libraries on a host as it is. cudarc loads them at run time by plain names
//! (`libnvrtc.so`, `libnvrtc.so.12`, `libnccl.so`, ...), searched on the loader's path; a CUDA 13
//! host and NVIDIA's pip wheels ship `libnvrtc.so.13`, `libcublas.so.13` and `libnccl.so.2`,
//! names it never tries. `TESSERA_CUDA_LIBS` (folders, `:`-separated; a wheel's `nvidia/*/lib`)
//! names where they are: [`link_folder`] links each library found there under the plain name in
//! a private folder, and the binary restarts itself once with that folder and the given ones
//! first on `LD_LIBRARY_PATH` (the loader reads its path only at process start).

use std::path::{Path, PathBuf};

/// The variable naming the folders that hold the CUDA libraries.
pub const LIBS_VAR: &str = "TESSERA_CUDA_LIBS";

/// The plain names cudarc loads, and the file-name prefixes that provide them.
const LIBRARIES: [(&str, &str); 5] = [
    ("libcuda.so", "libcuda.so."),
    ("libnvrtc.so", "libnvrtc.so."),
    ("libcublas.so", "libcublas.so."),
    ("libcublasLt.so", "libcublasLt.so."),
    ("libnccl.so", "libnccl.so."),
];

/// The folders of `TESSERA_CUDA_LIBS`'s value (empty entries dropped).
pub fn folders(value: &str) -> Vec<PathBuf> {
    value
        .split(':')
        .filter(|s| !s.trim().is_empty())
        .map(PathBuf::from)
        .collect()
}

/// The library file in `folders` that provides `plain`: the plain name itself, else the
/// versioned file with the longest name (`libnvrtc.so.13.0.48` over `libnvrtc.so.13`).
fn provider(folders: &[PathBuf], plain: &str, prefix: &str) -> Option<PathBuf> {
    folders.iter().find_map(|dir| {
        let exact = dir.join(plain);
        if exact.is_file() {
            return Some(exact);
        }
        let entries = std::fs::read_dir(dir).ok()?;
        entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| {
                p.is_file()
                    && p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with(prefix))
            })
            .max_by_key(|p| p.as_os_str().len())
    })
}

/// Links in `into` (created, owned by this user) each library found in `folders` under its
/// plain name; returns (plain name, file linked to) for each. Links already there are replaced,
/// so the folder always reflects the latest `folders`.
pub fn link_folder(folders: &[PathBuf], into: &Path) -> std::io::Result<Vec<(String, PathBuf)>> {
    std::fs::create_dir_all(into)?;
    let mut linked = Vec::new();
    for (plain, prefix) in LIBRARIES {
        let Some(target) = provider(folders, plain, prefix) else {
            continue;
        };
        let target = std::fs::canonicalize(&target)?;
        let link = into.join(plain);
        // Made beside and renamed over: a concurrent process never sees the link missing.
        let fresh = into.join(format!(".{plain}.{}", std::process::id()));
        let _ = std::fs::remove_file(&fresh);
        std::os::unix::fs::symlink(&target, &fresh)?;
        std::fs::rename(&fresh, &link)?;
        linked.push((plain.to_string(), target));
    }
    Ok(linked)
}

/// This user's link folder for `value` (one per distinct `TESSERA_CUDA_LIBS`).
pub fn link_folder_for(value: &str) -> PathBuf {
    use std::hash::{Hash, Hasher};
    use std::os::unix::fs::MetadataExt;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    value.hash(&mut h);
    let uid = std::fs::metadata("/proc/self").map_or(0, |m| m.uid());
    let base = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    base.join(format!("tessera-cuda-libs-{uid}-{:016x}", h.finish()))
}

/// Which CUDA libraries this process can load, in one line (errors, `tessera devices`).
#[allow(unsafe_code)]
pub fn found() -> String {
    // SAFETY: each call only probes whether the shared library can be opened.
    let present = unsafe {
        [
            ("libcuda (driver)", cudarc::driver::sys::is_culib_present()),
            ("libnvrtc", cudarc::nvrtc::sys::is_culib_present()),
            ("libcublas", cudarc::cublas::sys::is_culib_present()),
            ("libnccl", cudarc::nccl::sys::is_culib_present()),
        ]
    };
    let listed: Vec<String> = present
        .iter()
        .map(|(name, ok)| format!("{name} {}", if *ok { "found" } else { "not found" }))
        .collect();
    let var = std::env::var(LIBS_VAR).unwrap_or_default();
    format!(
        "{} ({LIBS_VAR}={var:?}; LD_LIBRARY_PATH={:?})",
        listed.join(", "),
        std::env::var("LD_LIBRARY_PATH").unwrap_or_default()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versioned_libraries_are_linked_under_the_names_cudarc_loads() {
        let root = std::env::temp_dir().join(format!("tessera-libs-test-{}", std::process::id()));
        let (wheel, nccl, into) = (
            root.join("nvrtc/lib"),
            root.join("nccl/lib"),
            root.join("links"),
        );
        std::fs::create_dir_all(&wheel).unwrap();
        std::fs::create_dir_all(&nccl).unwrap();
        for f in [
            "libnvrtc.so.13",
            "libnvrtc.so.13.0.48",
            "libnvrtc-builtins.so.13.0",
        ] {
            std::fs::write(wheel.join(f), f).unwrap();
        }
        std::fs::write(nccl.join("libnccl.so.2"), "nccl").unwrap();
        let value = format!("{}::{}", wheel.display(), nccl.display());
        let dirs = folders(&value);
        assert_eq!(dirs, vec![wheel.clone(), nccl.clone()]);
        let linked = link_folder(&dirs, &into).unwrap();
        let names: Vec<&str> = linked.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["libnvrtc.so", "libnccl.so"]);
        let read = |n: &str| std::fs::read_to_string(into.join(n)).unwrap();
        assert_eq!(read("libnvrtc.so"), "libnvrtc.so.13.0.48");
        assert_eq!(read("libnccl.so"), "nccl");
        assert!(!into.join("libcublas.so").exists());
        // Again, after the wheel changed: the links follow.
        std::fs::remove_file(wheel.join("libnvrtc.so.13.0.48")).unwrap();
        link_folder(&dirs, &into).unwrap();
        assert_eq!(read("libnvrtc.so"), "libnvrtc.so.13");
        assert_ne!(link_folder_for("a"), link_folder_for("b"));
        std::fs::remove_dir_all(&root).unwrap();
    }
}
