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

/// SIGTERM and Ctrl-C (SIGINT), listened for from the moment this is made: from then on
/// they no longer end the process, `next` hears them. For a process that hands the request on
/// (`train --workers N` to its worker processes) rather than acting on it itself.
#[cfg(unix)]
pub struct Requests {
    term: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
}

#[cfg(unix)]
impl Requests {
    /// Must be called inside a tokio runtime.
    pub fn listen() -> Result<Requests> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Requests {
            term: signal(SignalKind::terminate()).context("listening for SIGTERM")?,
            interrupt: signal(SignalKind::interrupt()).context("listening for SIGINT")?,
        })
    }

    /// The next SIGTERM or SIGINT.
    pub async fn next(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.interrupt.recv() => {}
        }
    }
}

#[cfg(not(unix))]
pub struct Requests;

#[cfg(not(unix))]
impl Requests {
    pub fn listen() -> Result<Requests> {
        Ok(Requests)
    }

    /// Without Unix signals nothing arrives.
    pub async fn next(&mut self) {
        std::future::pending::<()>().await
    }
}

/// A flag set at the first Ctrl-C or SIGTERM (from a thread of its own, so it works beside
/// synchronous training); the second ends the process with `EXIT_STOPPED`.
#[cfg(unix)]
pub fn stop_flag() -> Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    let set = Arc::clone(&flag);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the signal listener")?;
    // Registered before this returns: from here on a signal no longer kills the process.
    let mut requests = {
        let _entered = runtime.enter();
        Requests::listen()?
    };
    std::thread::Builder::new()
        .name("tessera-signals".into())
        .spawn(move || {
            runtime.block_on(async {
                for first in [true, false] {
                    requests.next().await;
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
