//! Work of the compute stream captured once as a CUDA graph and replayed: the host queues one
//! graph launch where it queued each op (a launch, GEMM, memset or copy costs the host a few
//! microseconds; a training step queues ~90). A replay runs the ops with the arguments and
//! buffers they were captured with, so what changes between replays must be in device memory
//! the ops read (written before the launch), and the buffers the capture took serve nothing
//! else while the graph lives (`cuda_cache`: the graph's buffers are kept apart).
//!
//! What the captured work may not do, as CUDA refuses it there: wait for the device (a read
//! back to pageable memory, a synchronize), copy from or to pageable memory, wait on another
//! stream's event, allocate or free (the cache hands out only buffers kept before: run the work
//! once before capturing it). The emulated driver refuses the same (`kernels/emu`).

use std::sync::Arc;

use cudarc::driver::CudaGraph;
use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};

use crate::cuda::{CudaError, Gpu, Result, driver};
use crate::cuda_cache::BufCache;

/// A captured sequence of the compute stream's work. Dropping it gives its buffers back to the
/// cache (in stream order: a replay still queued finishes first).
pub struct Captured {
    graph: CudaGraph,
    number: u64,
    cache: Arc<BufCache>,
}

impl std::fmt::Debug for Captured {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Captured(graph {})", self.number)
    }
}

// SAFETY: the driver's graph handles are not tied to the thread that made them (a launch binds
// the context first), and a `Captured` is used by one thread at a time: it moves to the pool
// thread that steps, as the step's other state does. Not Sync: CUDA graphs are not internally
// synchronised.
#[allow(unsafe_code)] // the Send promise above
unsafe impl Send for Captured {}

impl Captured {
    /// Queues the captured work again on the compute stream.
    pub fn launch(&self) -> Result<()> {
        self.graph.launch().map_err(driver("a graph launch"))
    }
}

impl Drop for Captured {
    fn drop(&mut self) {
        self.cache.release(self.number);
    }
}

impl Gpu {
    /// Captures what `body` queues on the compute stream, without running it: the graph to
    /// replay it and what `body` returned (buffers it made are the graph's: read them after a
    /// replay). Fails, capturing nothing, if `body` fails or did what a capture may not do.
    pub fn capture<R, E: From<CudaError>>(
        &self,
        body: impl FnOnce() -> std::result::Result<R, E>,
    ) -> std::result::Result<(Captured, R), E> {
        self.bind()?;
        let cache = self.cache();
        let number = cache.begin_capture();
        // Relaxed: other threads (the stager) may allocate and copy meanwhile.
        let mode = CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED;
        if let Err(e) = self.stream().begin_capture(mode) {
            cache.end_capture();
            cache.release(number);
            return Err(driver("beginning a capture")(e).into());
        }
        let made = body();
        let ended = self.stream().end_capture(CUgraphInstantiate_flags(0));
        cache.end_capture();
        let graph = match (made, ended) {
            (Ok(made), Ok(Some(graph))) => Ok((graph, made)),
            (Err(e), _) => Err(e),
            (Ok(_), Err(e)) => Err(driver("ending a capture")(e).into()),
            (Ok(_), Ok(None)) => Err(CudaError::Capture("nothing was captured".into()).into()),
        };
        match graph {
            Ok((graph, made)) => Ok((
                Captured {
                    graph,
                    number,
                    cache: Arc::clone(cache),
                },
                made,
            )),
            Err(e) => {
                cache.release(number);
                Err(e)
            }
        }
    }
}
