//! Ring all-reduce between CPU workers over TCP: reduce-scatter then all-gather, each rank
//! sending 2(N−1)/N of the buffer, the bandwidth optimum for N ranks.
//!
//! The buffer is cut into N contiguous segments. In reduce-scatter step s, rank r sends segment
//! (r − s) mod N to rank r + 1 and adds segment (r − s − 1) mod N from rank r − 1 into its own;
//! after N − 1 steps rank r holds the full sum of segment (r + 1) mod N. All-gather passes the
//! finished segments on around the ring. Each segment is summed once, in ring order starting at
//! its owner, and then copied: every rank ends with the same bits, and the order is fixed by the
//! ranks alone (not by timing), so a run is reproducible.
//!
//! Sending and receiving overlap (a scoped thread sends while the caller receives): with both in
//! one thread, two ranks each blocked writing a segment larger than the socket buffers would
//! wait for each other forever. Reads and writes carry a timeout, so a peer that dies or hangs
//! fails the step with an error naming it instead of blocking the ring.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

/// Identifies a ring: a connection from another job's or generation's ring is refused.
const MAGIC: u32 = 0x7e55_e7a1;

#[derive(Debug, thiserror::Error)]
pub enum RingError {
    #[error("ring rank {rank}: {op} {peer}: {reason}")]
    Peer {
        rank: usize,
        op: &'static str,
        peer: String,
        reason: String,
    },
    #[error("ring rank {rank}: {problem}")]
    Setup { rank: usize, problem: String },
}

/// This rank's two links: to the next rank (sends) and from the previous one (receives).
#[derive(Debug)]
pub struct Ring {
    rank: usize,
    world: usize,
    /// What each link is called in errors.
    next_name: String,
    prev_name: String,
    next: Option<TcpStream>,
    prev: Option<TcpStream>,
    /// Receive buffer, reused across calls.
    incoming: Vec<f32>,
}

/// The handshake each rank sends its successor: who it is and which ring it belongs to.
fn hello(rank: usize, world: usize, ring_id: u64) -> [u8; 24] {
    let mut h = [0u8; 24];
    h[..4].copy_from_slice(&MAGIC.to_le_bytes());
    h[4..8].copy_from_slice(&(rank as u32).to_le_bytes());
    h[8..16].copy_from_slice(&(world as u64).to_le_bytes());
    h[16..].copy_from_slice(&ring_id.to_le_bytes());
    h
}

impl Ring {
    /// A one-rank ring: all-reduce is the identity.
    pub fn single() -> Ring {
        Ring {
            rank: 0,
            world: 1,
            next_name: String::new(),
            prev_name: String::new(),
            next: None,
            prev: None,
            incoming: Vec::new(),
        }
    }

    /// Joins ring `ring_id` as `rank` of `world`: connects to the next rank at `next` (retrying
    /// until `timeout` while it starts) and accepts the previous rank on `listener`, whose
    /// address that rank was given. `timeout` also bounds every later read and write.
    pub fn connect(
        rank: usize,
        world: usize,
        ring_id: u64,
        listener: &TcpListener,
        next: SocketAddr,
        timeout: Duration,
    ) -> Result<Ring, RingError> {
        if world < 2 || rank >= world {
            return Err(RingError::Setup {
                rank,
                problem: format!(
                    "rank {rank} of a ring of {world} (a ring needs 2 or more ranks; use Ring::single for one)"
                ),
            });
        }
        let prev_rank = (rank + world - 1) % world;
        let next_name = format!("rank {} at {next}", (rank + 1) % world);
        let peer_err = |op: &'static str, peer: &str, e: std::io::Error| RingError::Peer {
            rank,
            op,
            peer: peer.to_string(),
            reason: e.to_string(),
        };
        let deadline = Instant::now() + timeout;
        // Connect and accept at once: with every rank connecting first, nobody accepts.
        let (outgoing, incoming) = std::thread::scope(|s| {
            let connecting = s.spawn(|| -> Result<TcpStream, RingError> {
                let mut wait = Duration::from_millis(1);
                loop {
                    let left = deadline.saturating_duration_since(Instant::now());
                    match TcpStream::connect_timeout(&next, left.max(Duration::from_millis(1))) {
                        Ok(stream) => return Ok(stream),
                        // The next rank may not listen yet: back off and retry until the deadline.
                        Err(e) if Instant::now() + wait < deadline => {
                            tracing::debug!(rank, error = %e, "ring: {next_name} not reachable yet");
                            std::thread::sleep(wait);
                            wait = (wait * 2).min(Duration::from_millis(100));
                        }
                        Err(e) => return Err(peer_err("connecting to", &next_name, e)),
                    }
                }
            });
            let accepted = accept_before(listener, deadline)
                .map_err(|e| peer_err("accepting", &format!("rank {prev_rank}"), e));
            let outgoing = connecting.join().unwrap_or_else(|_| {
                Err(RingError::Setup {
                    rank,
                    problem: "the connecting thread panicked".into(),
                })
            });
            (outgoing, accepted)
        });
        let (mut next_stream, (mut prev_stream, prev_addr)) = (outgoing?, incoming?);
        let prev_name = format!("rank {prev_rank} at {prev_addr}");
        for stream in [&next_stream, &prev_stream] {
            stream
                .set_nodelay(true)
                .and_then(|()| stream.set_read_timeout(Some(timeout)))
                .and_then(|()| stream.set_write_timeout(Some(timeout)))
                .map_err(|e| peer_err("configuring the link to", &next_name, e))?;
        }
        next_stream
            .write_all(&hello(rank, world, ring_id))
            .map_err(|e| peer_err("greeting", &next_name, e))?;
        let mut theirs = [0u8; 24];
        prev_stream
            .read_exact(&mut theirs)
            .map_err(|e| peer_err("reading the greeting of", &prev_name, e))?;
        if theirs != hello(prev_rank, world, ring_id) {
            return Err(RingError::Setup {
                rank,
                problem: format!(
                    "{prev_name} is not rank {prev_rank} of ring {ring_id:#x} with {world} ranks"
                ),
            });
        }
        Ok(Ring {
            rank,
            world,
            next_name,
            prev_name,
            next: Some(next_stream),
            prev: Some(prev_stream),
            incoming: Vec::new(),
        })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world(&self) -> usize {
        self.world
    }

    /// Gives every rank rank 0's `bytes` (same length everywhere): passed along the ring.
    pub fn broadcast_from_rank0(&mut self, bytes: &mut [u8]) -> Result<(), RingError> {
        let (rank, last) = (self.rank, self.world - 1);
        let (Some(next), Some(prev)) = (self.next.as_mut(), self.prev.as_mut()) else {
            return Ok(());
        };
        let link_err = |op: &'static str, peer: &str, e: std::io::Error| RingError::Peer {
            rank,
            op,
            peer: peer.to_string(),
            reason: e.to_string(),
        };
        if rank > 0 {
            prev.read_exact(bytes)
                .map_err(|e| link_err("receiving from", &self.prev_name, e))?;
        }
        if rank < last {
            next.write_all(bytes)
                .map_err(|e| link_err("sending to", &self.next_name, e))?;
        }
        Ok(())
    }

    /// Replaces `buf` on every rank by the element-wise sum of all ranks' `buf` (same length on
    /// every rank, or the ring fails).
    pub fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), RingError> {
        let (n, rank) = (self.world, self.rank);
        let (Some(next), Some(prev)) = (self.next.as_mut(), self.prev.as_mut()) else {
            return Ok(());
        };
        let len = buf.len();
        let bounds = |k: usize| (k * len / n, (k + 1) * len / n);
        let widest = (0..n).map(|k| bounds(k).1 - bounds(k).0).max().unwrap_or(0);
        self.incoming.resize(widest, 0.0);
        let (next_name, prev_name) = (&self.next_name, &self.prev_name);
        let link_err = |op: &'static str, peer: &str, e: std::io::Error| RingError::Peer {
            rank,
            op,
            peer: peer.to_string(),
            reason: e.to_string(),
        };
        for phase in [Phase::ReduceScatter, Phase::AllGather] {
            for s in 0..n - 1 {
                let (send_k, recv_k) = match phase {
                    Phase::ReduceScatter => ((rank + n - s) % n, (rank + 2 * n - s - 1) % n),
                    Phase::AllGather => ((rank + 1 + n - s) % n, (rank + n - s) % n),
                };
                let (send_at, recv_at) = (bounds(send_k), bounds(recv_k));
                let incoming = &mut self.incoming[..recv_at.1 - recv_at.0];
                let outgoing = &buf[send_at.0..send_at.1];
                std::thread::scope(|sc| -> Result<(), RingError> {
                    let sending = sc.spawn(|| {
                        next.write_all(bytemuck::cast_slice(outgoing))
                            .map_err(|e| link_err("sending to", next_name, e))
                    });
                    let received = prev
                        .read_exact(bytemuck::cast_slice_mut(incoming))
                        .map_err(|e| link_err("receiving from", prev_name, e));
                    let sent = sending.join().unwrap_or_else(|_| {
                        Err(RingError::Setup {
                            rank,
                            problem: "the sending thread panicked".into(),
                        })
                    });
                    received.and(sent)
                })?;
                let own = &mut buf[recv_at.0..recv_at.1];
                match phase {
                    Phase::ReduceScatter => own
                        .iter_mut()
                        .zip(incoming.iter())
                        .for_each(|(o, &v)| *o += v),
                    Phase::AllGather => own.copy_from_slice(incoming),
                }
            }
        }
        Ok(())
    }
}

/// SNF over row blocks exchanges variable-length f64 messages around the same ring: each a
/// length (u64) and the values, sent while the previous rank's is read.
impl tessera_network::distributed::Exchange for Ring {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn shift(&mut self, message: Vec<f64>) -> Result<Vec<f64>, String> {
        let (Some(next), Some(prev)) = (self.next.as_mut(), self.prev.as_mut()) else {
            return Ok(message);
        };
        let (next_name, prev_name) = (&self.next_name, &self.prev_name);
        std::thread::scope(|sc| {
            let sending = sc.spawn(|| -> Result<(), String> {
                next.write_all(&(message.len() as u64).to_le_bytes())
                    .and_then(|()| next.write_all(bytemuck::cast_slice(&message)))
                    .map_err(|e| format!("sending to {next_name}: {e}"))
            });
            let received = (|| -> Result<Vec<f64>, String> {
                let mut len = [0u8; 8];
                prev.read_exact(&mut len)
                    .map_err(|e| format!("receiving from {prev_name}: {e}"))?;
                let len = u64::from_le_bytes(len);
                // A corrupt length must not allocate the machine away: 2^33 values is 64 GiB.
                if len > 1 << 33 {
                    return Err(format!(
                        "{prev_name} announced {len} values: not a block message"
                    ));
                }
                let mut values = vec![0.0f64; len as usize];
                prev.read_exact(bytemuck::cast_slice_mut(&mut values))
                    .map_err(|e| format!("receiving from {prev_name}: {e}"))?;
                Ok(values)
            })();
            let sent = sending
                .join()
                .unwrap_or_else(|_| Err("the sending thread panicked".into()));
            sent.and(received)
        })
    }
}

#[derive(Clone, Copy)]
enum Phase {
    ReduceScatter,
    AllGather,
}

/// Accepts one connection, giving up at `deadline`.
fn accept_before(
    listener: &TcpListener,
    deadline: Instant,
) -> std::io::Result<(TcpStream, SocketAddr)> {
    listener.set_nonblocking(true)?;
    let mut wait = Duration::from_millis(1);
    let accepted = loop {
        match listener.accept() {
            Ok(pair) => break Ok(pair),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(wait);
                wait = (wait * 2).min(Duration::from_millis(20));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                break Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no connection before the deadline",
                ));
            }
            Err(e) => break Err(e),
        }
    };
    listener.set_nonblocking(false)?;
    let (stream, addr) = accepted?;
    stream.set_nonblocking(false)?;
    Ok((stream, addr))
}
