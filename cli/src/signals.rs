//! Stop requests: SIGTERM (what Kubernetes sends a pod before it kills it) and Ctrl-C. Servers
//! shut down on the first; training takes it as a request to checkpoint after the current step
//! and exit with `EXIT_STOPPED`, and a second signal exits at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result};

/// 128 + SIGTERM: how a process ended by SIGTERM reports, so a Kubernetes Job's pod failure
/// policy can tell a stopped rank (to be replaced) from a failed one.
pub const EXIT_STOPPED: u8 = 143;

/// Training stopped on request after checkpointing; `main` exits with `EXIT_STOPPED`.
#[derive(Debug)]
pub struct Stopped {
    pub checkpoint: Option<String>,
    /// How to continue, e.g. " (continue with --resume)".
    pub hint: &'static str,
}

impl std::fmt::Display for Stopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "stopped on request (SIGTERM or Ctrl-C)")?;
        match &self.checkpoint {
            Some(c) => write!(f, "; the last step is checkpointed in {c}{}", self.hint),
            None => Ok(()),
        }
    }
}

impl std::error::Error for Stopped {}

/// Resolves at the first Ctrl-C or SIGTERM.
pub async fn terminated() {
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => t,
                Err(e) => {
                    tracing::warn!("cannot listen for SIGTERM: {e}");
                    let _ = tokio::signal::ctrl_c().await;
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
    tracing::info!("stop requested");
}

/// A flag set at the first Ctrl-C or SIGTERM (from a thread of its own, so it works beside
/// synchronous training); the second ends the process with `EXIT_STOPPED`.
#[cfg(unix)]
pub fn stop_flag() -> Result<Arc<AtomicBool>> {
    use tokio::signal::unix::{SignalKind, signal};
    let flag = Arc::new(AtomicBool::new(false));
    let set = Arc::clone(&flag);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the signal listener")?;
    // Registered before this returns: from here on a signal no longer kills the process.
    let (mut term, mut interrupt) = {
        let _entered = runtime.enter();
        (
            signal(SignalKind::terminate()).context("listening for SIGTERM")?,
            signal(SignalKind::interrupt()).context("listening for SIGINT")?,
        )
    };
    std::thread::Builder::new()
        .name("tessera-signals".into())
        .spawn(move || {
            runtime.block_on(async {
                for first in [true, false] {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = interrupt.recv() => {}
                    }
                    if first {
                        set.store(true, Ordering::SeqCst);
                        tracing::warn!(
                            "stop requested: stopping after the current step, \
                             which is checkpointed (signal again to exit now)"
                        );
                    }
                }
                std::process::exit(i32::from(EXIT_STOPPED));
            });
        })
        .context("starting the signal listener")?;
    Ok(flag)
}

/// Without Unix signals no one sets the flag.
#[cfg(not(unix))]
pub fn stop_flag() -> Result<Arc<AtomicBool>> {
    Ok(Arc::new(AtomicBool::new(false)))
}
