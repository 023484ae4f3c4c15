//! The job's collectives behind one interface, whatever moves the bytes: the TCP ring between
//! CPU workers (`ring.rs`) and NCCL between GPUs (`nccl.rs`, the ring still carrying the small
//! host messages). A training step's reduction is one [`Collective::reduce_sum`] of the step's
//! flat device buffer; validation sums, barriers and broadcasts are host messages.

use std::sync::Arc;

use tessera_kernels::backend::{Backend, Cpu, Cuda, In, Out};
use tessera_models::{PendingLoss, Trainer};

use crate::epoch::{StagedPart, eager};
use crate::records::FitError;
use crate::replay::Replays;
use crate::ring::Ring;

/// What the ranks of a job do together. Every rank calls the same methods in the same order.
pub trait Collective<B: Backend<f32>> {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// Replaces `buf` on every rank by the sum over ranks (the same bits on every rank).
    fn reduce_sum(&mut self, device: &B, buf: Out<'_, B::Buf>) -> Result<(), FitError>;
    /// [`Collective::reduce_sum`] of host values (validation sums, control flags).
    fn reduce_sum_host(&mut self, buf: &mut [f32]) -> Result<(), FitError>;
    /// Gives every rank rank 0's `bytes` (the same length everywhere).
    fn broadcast_from_rank0(&mut self, bytes: &mut [u8]) -> Result<(), FitError>;
    /// Returns on each rank once every rank has called it.
    fn barrier(&mut self) -> Result<(), FitError> {
        self.reduce_sum_host(&mut [0.0])
    }
}

/// The TCP ring, for any device: in place where the buffer is host memory, else staged
/// through one download and one upload (a GPU job without NCCL still trains, slower).
impl<B: Backend<f32>> Collective<B> for Ring {
    fn rank(&self) -> usize {
        Ring::rank(self)
    }

    fn world(&self) -> usize {
        Ring::world(self)
    }

    fn reduce_sum(&mut self, device: &B, buf: Out<'_, B::Buf>) -> Result<(), FitError> {
        if Ring::world(self) == 1 {
            return Ok(());
        }
        let range = buf.range.clone();
        match device.host_mut(buf.buf) {
            Some(host) => Ok(self.all_reduce_sum(&mut host[range])?),
            None => staged(self, device, buf),
        }
    }

    fn reduce_sum_host(&mut self, buf: &mut [f32]) -> Result<(), FitError> {
        Ok(self.all_reduce_sum(buf)?)
    }

    fn broadcast_from_rank0(&mut self, bytes: &mut [u8]) -> Result<(), FitError> {
        Ok(Ring::broadcast_from_rank0(self, bytes)?)
    }
}

/// The ring's sum of a device view through host memory: one download, one upload.
fn staged<B: Backend<f32>>(
    ring: &mut Ring,
    device: &B,
    buf: Out<'_, B::Buf>,
) -> Result<(), FitError> {
    let mut host = device.download(In::part(buf.buf, buf.range.clone()))?;
    ring.all_reduce_sum(&mut host)?;
    device.write(&host, buf)?;
    Ok(())
}

/// A backend the worker trains on, and how its ranks reduce: chosen once at start-up (see
/// [`crate::device::Device`]).
pub trait TrainBackend: Backend<f32> + 'static {
    /// What the device keeps between steps to replay them (captured steps on a GPU).
    type Replays: Default + Send + std::fmt::Debug;

    /// The collective of this device's ranks, over the job's `ring`.
    fn collective(&self, ring: Ring) -> Result<Box<dyn Collective<Self>>, FitError>;

    /// One part's forward and backward on its staged batch (gradients in the model, terms left
    /// on the device): replayed where `replays` holds its step, else op by op.
    fn part_terms(
        trainer: &mut Trainer<f32, Self>,
        replays: &mut Self::Replays,
        input: StagedPart<'_, Self>,
        epoch: usize,
        part: usize,
    ) -> Result<Arc<PendingLoss<Self::Buf>>, FitError>;
}

impl TrainBackend for Cpu {
    /// Nothing: a CPU step has no launches to save.
    type Replays = ();

    fn collective(&self, ring: Ring) -> Result<Box<dyn Collective<Cpu>>, FitError> {
        Ok(Box::new(ring))
    }

    fn part_terms(
        trainer: &mut Trainer<f32, Cpu>,
        _: &mut (),
        input: StagedPart<'_, Cpu>,
        epoch: usize,
        part: usize,
    ) -> Result<Arc<PendingLoss<Vec<f32>>>, FitError> {
        eager(trainer, input, epoch, part)
    }
}

/// Set to 0, GPU ranks reduce over the TCP ring (staged through host memory) instead of NCCL:
/// for ranks sharing one GPU, which NCCL refuses, or a host without libnccl. Every rank of a
/// job must see the same value (launchers and `--workers` pass the environment on).
pub const NCCL_VAR: &str = "TESSERA_NCCL";

impl TrainBackend for Cuda {
    type Replays = Replays;

    fn part_terms(
        trainer: &mut Trainer<f32, Cuda>,
        replays: &mut Replays,
        input: StagedPart<'_, Cuda>,
        epoch: usize,
        part: usize,
    ) -> Result<Arc<PendingLoss<Self::Buf>>, FitError> {
        replays.part_terms(trainer, input, epoch, part)
    }

    /// NCCL between GPUs (unless `TESSERA_NCCL=0`); alone, the ring of one (every reduction a
    /// no-op, no libnccl needed).
    fn collective(&self, mut ring: Ring) -> Result<Box<dyn Collective<Cuda>>, FitError> {
        if Ring::world(&ring) == 1 {
            return Ok(Box::new(ring));
        }
        if std::env::var(NCCL_VAR).is_ok_and(|v| v.trim() == "0") {
            tracing::warn!(
                "{NCCL_VAR}=0: the GPUs' gradients go through host memory and the TCP ring"
            );
            return Ok(Box::new(ring));
        }
        let nccl = crate::nccl::Nccl::over_ring(self.gpu(), &mut ring)?;
        Ok(Box::new(crate::nccl::NcclGroup { nccl, ring }))
    }
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;
    use std::time::Duration;

    use super::*;

    /// Three ranks on loopback, each running `body` with its ring.
    fn on_three<R: Send>(body: impl Fn(usize, Ring) -> R + Sync) -> Vec<R> {
        let listeners: Vec<TcpListener> = (0..3)
            .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        let addrs: Vec<_> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
        std::thread::scope(|s| {
            let handles: Vec<_> = listeners
                .iter()
                .enumerate()
                .map(|(rank, listener)| {
                    let (body, next) = (&body, addrs[(rank + 1) % 3]);
                    s.spawn(move || {
                        let ring =
                            Ring::connect(rank, 3, 7, listener, next, Duration::from_secs(20))
                                .unwrap();
                        body(rank, ring)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    fn values(rank: usize) -> Vec<f32> {
        (0..10).map(|i| (i * (rank + 1)) as f32 / 7.0).collect()
    }

    #[test]
    fn the_ring_sums_a_view_in_place_and_staged_with_the_same_bits() {
        let results = on_three(|rank, mut ring| {
            let mut in_place = values(rank);
            Collective::<Cpu>::reduce_sum(&mut ring, &Cpu, Out::part(&mut in_place, 2..9)).unwrap();
            let mut through_host = values(rank);
            staged(&mut ring, &Cpu, Out::part(&mut through_host, 2..9)).unwrap();
            let mut flags = [rank as f32, 1.0];
            Collective::<Cpu>::reduce_sum_host(&mut ring, &mut flags).unwrap();
            let mut id = [rank as u8 + 10; 4];
            Collective::<Cpu>::broadcast_from_rank0(&mut ring, &mut id).unwrap();
            Collective::<Cpu>::barrier(&mut ring).unwrap();
            (in_place, through_host, flags, id)
        });
        for (rank, (in_place, through_host, flags, id)) in results.iter().enumerate() {
            assert_eq!(
                in_place, through_host,
                "rank {rank}: staged and in place differ"
            );
            assert_eq!(
                in_place[2..9],
                results[0].0[2..9],
                "rank {rank}: not rank 0's bits"
            );
            for (i, v) in in_place.iter().enumerate() {
                if (2..9).contains(&i) {
                    let total: f32 = (0..3).map(|r| values(r)[i]).sum();
                    assert!(
                        (v - total).abs() < 1e-5,
                        "rank {rank} [{i}]: {v} vs {total}"
                    );
                } else {
                    assert_eq!(
                        *v,
                        values(rank)[i],
                        "rank {rank} [{i}] outside the view changed"
                    );
                }
            }
            assert_eq!(flags, &[3.0, 3.0]);
            assert_eq!(id, &[10; 4], "rank 0's bytes everywhere");
        }
    }
}
