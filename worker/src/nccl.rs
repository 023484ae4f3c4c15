//! GPU all-reduce through NCCL (cudarc, the library loaded at run time): the GPU counterpart of
//! `ring.rs`. Rank 0 makes the 128-byte unique id and the job's TCP ring carries it to the other
//! ranks (`Ring::broadcast_from_rank0`), so forming the group needs no extra coordinator round
//! trip; a new group (generation) makes a new communicator. The collectives run on the GPU's
//! compute stream, so they are ordered after the backward that wrote the gradients and before
//! the update that reads them, without events.
//!
//! Without libnccl or a device every constructor returns `NcclError::Unavailable`, which tests
//! and benchmarks report as SKIPPED.

use std::sync::Arc;

use cudarc::driver::CudaStream;
use cudarc::nccl::{Comm, Id, ReduceOp};
use tessera_kernels::backend::{Cuda, Out};
use tessera_kernels::cuda::Gpu;

use crate::collective::Collective;
use crate::records::FitError;
use crate::ring::{Ring, RingError};

#[derive(Debug, thiserror::Error)]
pub enum NcclError {
    #[error("NCCL unavailable: {0}")]
    Unavailable(String),
    #[error("NCCL {op}: {reason}")]
    Call { op: &'static str, reason: String },
    #[error(transparent)]
    Ring(#[from] RingError),
}

fn call(op: &'static str) -> impl Fn(cudarc::nccl::result::NcclError) -> NcclError {
    move |e| NcclError::Call {
        op,
        reason: format!("{e:?}"),
    }
}

/// Whether libnccl can be loaded (cudarc looks for `libnccl.so`; `TESSERA_CUDA_LIBS` names the
/// pip wheel's folder, see `tessera_kernels::cuda::libraries`).
#[allow(unsafe_code)]
pub fn library_present() -> bool {
    // SAFETY: only probes for the shared library.
    unsafe { cudarc::nccl::sys::is_culib_present() }
}

/// This rank's member of the job's NCCL communicator.
pub struct Nccl {
    comm: Comm,
    stream: Arc<CudaStream>,
}

impl std::fmt::Debug for Nccl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nccl")
            .field("rank", &self.comm.rank())
            .field("world", &self.comm.world_size())
            .finish()
    }
}

impl Nccl {
    /// Joins the communicator of `ring`'s ranks on `gpu`: rank 0 makes the id, the ring
    /// carries it.
    pub fn over_ring(gpu: &Gpu, ring: &mut Ring) -> Result<Nccl, NcclError> {
        if !library_present() {
            return Err(NcclError::Unavailable(
                "libnccl.so not found (set TESSERA_CUDA_LIBS to the folder of libnccl.so.2, e.g. \
                 site-packages/nvidia/nccl/lib; or TESSERA_NCCL=0 to reduce over the TCP ring)"
                    .into(),
            ));
        }
        let mut id = [0u8; 128];
        if ring.rank() == 0 {
            let made = Id::new().map_err(call("making the unique id"))?;
            id.copy_from_slice(&made.internal().map(|c| c as u8));
        }
        ring.broadcast_from_rank0(&mut id)?;
        let stream = Arc::clone(gpu.stream());
        let comm = Comm::from_rank(
            Arc::clone(&stream),
            ring.rank(),
            ring.world(),
            Id::uninit(id.map(|b| b as _)),
        )
        .map_err(call("joining the communicator"))?;
        Ok(Nccl { comm, stream })
    }

    /// Replaces `buf` on every rank by the ranks' sum, in place (queued on `stream`).
    pub fn all_reduce_sum(
        &self,
        buf: &mut impl cudarc::driver::DevicePtrMut<f32>,
    ) -> Result<(), NcclError> {
        self.comm
            .all_reduce_in_place(buf, &ReduceOp::Sum)
            .map(|_| ())
            .map_err(call("all-reduce"))
    }

    /// Waits for the queued collectives.
    pub fn synchronize(&self) -> Result<(), NcclError> {
        self.stream.synchronize().map_err(|e| NcclError::Call {
            op: "synchronize",
            reason: e.to_string(),
        })
    }
}

/// The collective of a GPU job: NCCL for the step's device buffer, the TCP ring it was formed
/// over for host messages (validation sums, barriers, broadcasts).
#[derive(Debug)]
pub struct NcclGroup {
    pub nccl: Nccl,
    pub ring: Ring,
}

impl Collective<Cuda> for NcclGroup {
    fn rank(&self) -> usize {
        self.ring.rank()
    }

    fn world(&self) -> usize {
        self.ring.world()
    }

    fn reduce_sum(
        &mut self,
        _device: &Cuda,
        buf: Out<'_, tessera_kernels::cuda_cache::DeviceBuf>,
    ) -> Result<(), FitError> {
        Ok(self
            .nccl
            .all_reduce_sum(&mut buf.buf.slice_mut(buf.range))?)
    }

    fn reduce_sum_host(&mut self, buf: &mut [f32]) -> Result<(), FitError> {
        Ok(self.ring.all_reduce_sum(buf)?)
    }

    fn broadcast_from_rank0(&mut self, bytes: &mut [u8]) -> Result<(), FitError> {
        Ok(self.ring.broadcast_from_rank0(bytes)?)
    }
}
