//! Helpers shared by the workspace's tests (as `gradcheck` is): how a test that needs something
//! this machine may lack — a CUDA device, NVRTC — steps aside.

/// Says `SKIPPED: {why}` on stderr, so that a run shows what did not execute; when the
/// environment variable `requirement` is set (CI's emulated-driver step sets
/// `TESSERA_REQUIRE_DEVICE`, its set-up `TESSERA_REQUIRE_NVRTC`) the skip is a failure instead.
///
/// # Panics
/// When `requirement` is set: a test that was meant to run must not pass by skipping.
pub fn skip(requirement: &str, why: &str) {
    assert!(
        std::env::var_os(requirement).is_none(),
        "{requirement} is set, yet {why}"
    );
    eprintln!("SKIPPED: {why}");
}

/// GPU 0, or None after [`skip`] says why `what` did not run (a failure where CI requires a
/// device: `TESSERA_REQUIRE_DEVICE`).
pub fn gpu_or_skip(what: &str) -> Option<crate::cuda::Gpu> {
    crate::cuda::Gpu::new(0)
        .map_err(|e| {
            skip(
                "TESSERA_REQUIRE_DEVICE",
                &format!("{what} needs a CUDA device: {e}"),
            )
        })
        .ok()
}
