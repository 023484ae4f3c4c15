//! Values read back without waiting for them (issue 24: a step's loss terms are read while the
//! next step computes). The compute stream copies them into page-locked host memory and records
//! an event; the host waits on that event only when it needs the values, by which time the
//! device is busy with what was queued after them. The page-locked buffers are kept for reuse:
//! allocating and freeing one costs more than a small model's step.
//!
//! Event tracking is off in our contexts ([`crate::cuda::Gpu::new`]), so cudarc records nothing
//! for a page-locked slice: the copy's end is this module's own event.
#![allow(unsafe_code)] // page-locked allocations: a buffer is read only after its copy's event

use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaContext, CudaEvent, CudaStream, PinnedHostSlice, sys};

use crate::cuda::{Result, View, driver};

/// Page-locked buffers kept beyond this many are freed (a step reads one, a validation pass one
/// more).
const KEEP: usize = 4;

/// A page-locked buffer and the event that marks the end of the copy into it.
struct Lane {
    host: PinnedHostSlice<f32>,
    done: CudaEvent,
}

/// The buffers of one GPU not in use.
pub(crate) struct Readbacks {
    ctx: Arc<CudaContext>,
    free: Mutex<Vec<Lane>>,
}

/// Values on their way to the host: [`crate::cuda::Gpu::finish_download`] waits for them.
pub struct Readback {
    lane: Option<Lane>,
    len: usize,
}

impl std::fmt::Debug for Readback {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Readback({} values)", self.len)
    }
}

impl Drop for Readback {
    fn drop(&mut self) {
        // Dropped unread (an error on the way): the copy may still be writing the buffer.
        if let Some(lane) = &self.lane {
            let _ = lane.done.synchronize();
        }
    }
}

impl Readbacks {
    pub(crate) fn new(ctx: &Arc<CudaContext>) -> Readbacks {
        Readbacks {
            ctx: Arc::clone(ctx),
            free: Mutex::new(Vec::new()),
        }
    }

    /// Queues the copy of `x` to the host on `stream` and marks its end.
    pub(crate) fn start(&self, stream: &Arc<CudaStream>, x: &View<'_>) -> Result<Readback> {
        let len = x.len();
        let mut lane = self.take(len)?;
        // Into the first `len` values: cudarc copies as many bytes as the destination holds,
        // and the buffer may be larger than `x`. The slice's own event is never recorded, so
        // taking it does not wait.
        let host = &mut lane.host.as_mut_slice().map_err(driver("reading back"))?[..len];
        stream
            .memcpy_dtoh(x, host)
            .map_err(driver("reading back"))?;
        lane.done
            .record(stream)
            .map_err(driver("reading back: recording the copy"))?;
        Ok(Readback {
            lane: Some(lane),
            len,
        })
    }

    /// Waits for the copy and returns its values; the buffer goes back for reuse.
    pub(crate) fn finish(&self, mut read: Readback) -> Result<Vec<f32>> {
        let lane = read
            .lane
            .take()
            .expect("a readback is finished once (finish consumes it)");
        lane.done
            .synchronize()
            .map_err(driver("reading back: waiting for the copy"))?;
        // The slice's own event is never recorded (no event tracking), so this does not wait.
        let values = lane.host.as_slice().map_err(driver("reading back"))?[..read.len].to_vec();
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        if free.len() < KEEP {
            free.push(lane);
        }
        Ok(values)
    }

    /// The smallest free buffer of at least `len` values, or a new one.
    fn take(&self, len: usize) -> Result<Lane> {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        let fits = free
            .iter()
            .enumerate()
            .filter(|(_, l)| l.host.len() >= len)
            .min_by_key(|(_, l)| l.host.len())
            .map(|(i, _)| i);
        if let Some(i) = fits {
            return Ok(free.swap_remove(i));
        }
        drop(free);
        // Room for growth: a step's terms are the same size every step.
        let n = len.next_power_of_two().max(256);
        // SAFETY: only the copied prefix is ever read, after the copy's event. Cached (not
        // write-combined) memory: the host reads it.
        let host = unsafe { self.ctx.alloc_pinned_with_flags::<f32>(n, 0) }
            .map_err(driver("reading back: page-locked memory"))?;
        let done = self
            .ctx
            .new_event(Some(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING))
            .map_err(driver("reading back: an event"))?;
        Ok(Lane { host, done })
    }
}
