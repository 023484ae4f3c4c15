//! SNF over row blocks: rank r of W holds rows n·r/W..n·(r+1)/W of every n x n matrix, so n
//! is bounded by the group's memory, not one machine's. The sparse kernels S (K entries per
//! row) are gathered to every rank; the dense matrices never are.
//!
//! Per view and iteration: M = total − P_v is row-local; because M is symmetric, the rows of
//! (S·M)ᵀ = M·Sᵀ a rank owns come from its own rows of M; one block transpose (all-to-all) then
//! gives it the columns of (S·M)ᵀ it needs for its rows of S·M·Sᵀ. The symmetrisations at the
//! start and the end are one block transpose each. Traffic: n²·8 bytes per view and iteration
//! across the group.
//!
//! The transport is a ring (`Exchange::shift`: send to the next rank, receive from the
//! previous); the worker's TCP ring implements it, [`LocalRing`] joins threads in-process.

use std::ops::Range;
use std::sync::mpsc::{Receiver, Sender, channel};

use rayon::prelude::*;

use crate::error::NetworkError;
use crate::snf::{SnfParams, SparseRows, dominate_set, normalise_rows, sparse_product_rows};

/// A ring of ranks exchanging f64 messages.
pub trait Exchange {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// Sends `message` to the next rank and returns the previous rank's message.
    fn shift(&mut self, message: Vec<f64>) -> Result<Vec<f64>, String>;
}

/// The rows rank `rank` of `world` holds.
pub fn row_range(n: usize, world: usize, rank: usize) -> Range<usize> {
    n * rank / world..n * (rank + 1) / world
}

fn exchange_error(rank: usize, problem: String) -> NetworkError {
    NetworkError::Exchange { rank, problem }
}

/// Delivers `outgoing[q]` to rank q and returns `incoming[q]` from each rank q (store and
/// forward around the ring: W − 1 shifts).
fn all_to_all(
    ex: &mut impl Exchange,
    outgoing: Vec<Vec<f64>>,
) -> Result<Vec<Vec<f64>>, NetworkError> {
    let (rank, world) = (ex.rank(), ex.world());
    let mut incoming = vec![Vec::new(); world];
    // In transit: (destination, source, values).
    let mut transit: Vec<(usize, usize, Vec<f64>)> = Vec::new();
    for (dest, values) in outgoing.into_iter().enumerate() {
        if dest == rank {
            incoming[rank] = values
        } else {
            transit.push((dest, rank, values))
        }
    }
    for _ in 1..world {
        let mut message =
            Vec::with_capacity(1 + transit.iter().map(|t| t.2.len() + 3).sum::<usize>());
        message.push(transit.len() as f64);
        for (dest, source, values) in transit.drain(..) {
            message.extend([dest as f64, source as f64, values.len() as f64]);
            message.extend(values);
        }
        let received = ex.shift(message).map_err(|e| exchange_error(rank, e))?;
        let malformed = || exchange_error(rank, "a malformed block message arrived".into());
        let count = *received.first().ok_or_else(malformed)? as usize;
        let mut at = 1;
        for _ in 0..count {
            let header = received.get(at..at + 3).ok_or_else(malformed)?;
            let (dest, source, len) = (header[0] as usize, header[1] as usize, header[2] as usize);
            let values = received
                .get(at + 3..at + 3 + len)
                .ok_or_else(malformed)?
                .to_vec();
            at += 3 + len;
            if dest == rank {
                incoming[source] = values
            } else {
                transit.push((dest, source, values))
            }
        }
    }
    Ok(incoming)
}

/// Every rank's `mine`, concatenated in rank order.
pub fn all_gather(ex: &mut impl Exchange, mine: Vec<f64>) -> Result<Vec<f64>, NetworkError> {
    let world = ex.world();
    Ok(all_to_all(ex, vec![mine; world])?.concat())
}

/// Every rank's `mine` concatenated in rank order at rank 0 (None elsewhere).
pub fn gather_to_rank0(
    ex: &mut impl Exchange,
    mine: Vec<f64>,
) -> Result<Option<Vec<f64>>, NetworkError> {
    let world = ex.world();
    let mut outgoing = vec![Vec::new(); world];
    outgoing[0] = mine;
    let incoming = all_to_all(ex, outgoing)?;
    Ok((ex.rank() == 0).then(|| incoming.concat()))
}

/// The row block `x` (n columns) cut by the ranks' column ranges: block q = x[:, rows of q].
fn column_blocks(x: &[f64], n: usize, world: usize) -> Vec<Vec<f64>> {
    (0..world)
        .map(|q| {
            let cols = row_range(n, world, q);
            let mut block = Vec::with_capacity(x.len() / n.max(1) * cols.len());
            x.chunks(n)
                .for_each(|row| block.extend_from_slice(&row[cols.clone()]));
            block
        })
        .collect()
}

/// (X + Xᵀ)/2 of the row block `x` (rows `mine` of an n x n matrix), through one transpose.
fn symmetrise_rows(ex: &mut impl Exchange, x: &mut [f64], n: usize) -> Result<(), NetworkError> {
    let world = ex.world();
    let mine = row_range(n, world, ex.rank());
    let blocks = column_blocks(x, n, world);
    let theirs = all_to_all(ex, blocks)?;
    let width = mine.len();
    for (q, block) in theirs.iter().enumerate() {
        // block = X[rows of q, my rows] (rows of q x width): its transpose fills my columns of q.
        let cols = row_range(n, world, q);
        for (local, row) in x.chunks_mut(n).enumerate() {
            for (c_local, c) in cols.clone().enumerate() {
                row[c] = 0.5 * (row[c] + block[c_local * width + local]);
            }
        }
    }
    Ok(())
}

/// Every rank's sparse rows, gathered (S is n·K entries: small next to the dense blocks).
fn gather_sparse(ex: &mut impl Exchange, mine: SparseRows) -> Result<SparseRows, NetworkError> {
    let world = ex.world();
    let encoded: Vec<f64> = mine
        .iter()
        .flat_map(|row| {
            std::iter::once(row.len() as f64).chain(row.iter().flat_map(|&(j, w)| [j as f64, w]))
        })
        .collect();
    let parts = all_to_all(ex, vec![encoded; world])?;
    let mut rows = Vec::new();
    for part in parts {
        let mut at = 0;
        while at < part.len() {
            let len = part[at] as usize;
            let pairs = part.get(at + 1..at + 1 + 2 * len).ok_or_else(|| {
                exchange_error(ex.rank(), "a malformed sparse row arrived".into())
            })?;
            rows.push(pairs.chunks(2).map(|p| (p[0] as usize, p[1])).collect());
            at += 1 + 2 * len;
        }
    }
    Ok(rows)
}

/// This rank's rows of the fused network, from its rows (`row_range`) of every view's n x n
/// affinity; equal to [`crate::snf`] on the whole matrices up to summation order. Views must
/// cover every sample.
pub fn snf_rows(
    views: Vec<Vec<f64>>,
    n: usize,
    params: SnfParams,
    ex: &mut impl Exchange,
) -> Result<Vec<f64>, NetworkError> {
    let m = views.len();
    let (rank, world) = (ex.rank(), ex.world());
    let mine = row_range(n, world, rank);
    if m < 2 {
        return Err(NetworkError::TooFewViews(m));
    }
    if params.k == 0 || params.k >= n {
        return Err(NetworkError::BadK { k: params.k, n });
    }
    for (view, w) in views.iter().enumerate() {
        if w.len() != mine.len() * n {
            return Err(NetworkError::Shape {
                view,
                n,
                found: w.len(),
            });
        }
        if let Some((at, &value)) = w
            .iter()
            .enumerate()
            .find(|&(_, &v)| !(v.is_finite() && v >= 0.0))
        {
            return Err(NetworkError::BadValue {
                view,
                row: mine.start + at / n,
                col: at % n,
                value,
            });
        }
    }
    let mut p = Vec::with_capacity(m);
    let mut s = Vec::with_capacity(m);
    for mut x in views {
        normalise_rows(&mut x, n);
        symmetrise_rows(ex, &mut x, n)?;
        s.push(gather_sparse(ex, dominate_set(&x, n, params.k))?);
        p.push(x);
    }
    let rows = mine.len();
    let mut total = vec![0.0; rows * n];
    let sum = |p: &[Vec<f64>], total: &mut [f64]| {
        total.par_chunks_mut(n).enumerate().for_each(|(i, row)| {
            row.copy_from_slice(&p[0][i * n..(i + 1) * n]);
            for x in &p[1..] {
                row.iter_mut()
                    .zip(&x[i * n..(i + 1) * n])
                    .for_each(|(t, v)| *t += v);
            }
        })
    };
    sum(&p, &mut total);
    let mut half = vec![0.0; rows * n];
    for _ in 0..params.t {
        for (pv, sv) in p.iter_mut().zip(&s) {
            pv.par_iter_mut()
                .zip(total.par_iter())
                .for_each(|(v, t)| *v = t - *v);
            // My rows of (S·M)ᵀ from my rows of M (M symmetric): lanes are my rows.
            let m_rows: &[f64] = pv;
            sparse_product_rows(sv, n, 1.0, &mut half, |slab, first, count| {
                for r in 0..count {
                    let row = &m_rows[(first + r) * n..(first + r + 1) * n];
                    slab.iter_mut().zip(row).for_each(|(lane, &v)| lane[r] = v);
                }
            });
            // My columns of (S·M)ᵀ: from rank q, its rows x my columns (rows_q x rows).
            let blocks = column_blocks(&half, n, world);
            let columns = all_to_all(ex, blocks)?;
            sparse_product_rows(sv, n, 1.0 / (m - 1) as f64, pv, |slab, first, count| {
                for (q, block) in columns.iter().enumerate() {
                    let from = row_range(n, world, q).start;
                    for (l, row) in block.chunks(rows.max(1)).enumerate() {
                        slab[from + l][..count].copy_from_slice(&row[first..first + count]);
                    }
                }
            });
            for (local, i) in mine.clone().enumerate() {
                pv[local * n + i] += params.alpha;
            }
        }
        sum(&p, &mut total);
    }
    total.iter_mut().for_each(|v| *v /= m as f64);
    normalise_rows(&mut total, n);
    symmetrise_rows(ex, &mut total, n)?;
    for (local, i) in mine.enumerate() {
        total[local * n + i] += 0.5;
    }
    Ok(total)
}

type Message = Vec<f64>;

/// An in-process ring of `world` ranks over channels (one per thread).
#[derive(Debug)]
pub struct LocalRing {
    rank: usize,
    world: usize,
    next: Sender<Message>,
    prev: Receiver<Message>,
}

impl LocalRing {
    pub fn new(world: usize) -> Vec<LocalRing> {
        let (senders, receivers): (Vec<Sender<Message>>, Vec<Receiver<Message>>) =
            (0..world).map(|_| channel()).unzip();
        // Rank r sends on channel r + 1 and receives on channel r; only the ranks hold senders,
        // so a rank that drops out disconnects its neighbour instead of leaving it waiting.
        receivers
            .into_iter()
            .enumerate()
            .map(|(rank, prev)| LocalRing {
                rank,
                world,
                next: senders[(rank + 1) % world].clone(),
                prev,
            })
            .collect()
    }
}

impl Exchange for LocalRing {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn shift(&mut self, message: Vec<f64>) -> Result<Vec<f64>, String> {
        self.next
            .send(message)
            .map_err(|_| format!("rank {} left the ring", (self.rank + 1) % self.world))?;
        self.prev.recv().map_err(|_| {
            format!(
                "rank {} left the ring",
                (self.rank + self.world - 1) % self.world
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::View;

    fn views(n: usize, m: usize) -> Vec<Vec<f64>> {
        (0..m)
            .map(|v| {
                let x: Vec<f64> = (0..n)
                    .map(|i| ((i * (7 + v) % 13) as f64) + (i % 3) as f64 * 5.0)
                    .collect();
                (0..n * n)
                    .map(|e| (-((x[e / n] - x[e % n]).powi(2)) / (4.0 + v as f64)).exp() + 1e-3)
                    .collect()
            })
            .collect()
    }

    #[test]
    fn row_blocks_fuse_to_the_single_node_network() {
        let (n, m) = (61, 3);
        let params = SnfParams {
            k: 6,
            t: 8,
            alpha: 1.0,
        };
        let whole = crate::snf(
            views(n, m).into_iter().map(View::complete).collect(),
            n,
            params,
        )
        .unwrap();
        for world in [1, 2, 3] {
            let blocks: Vec<Vec<f64>> = std::thread::scope(|sc| {
                let handles: Vec<_> = LocalRing::new(world)
                    .into_iter()
                    .map(|mut ring| {
                        sc.spawn(move || {
                            let mine = row_range(n, world, ring.rank());
                            let rows: Vec<Vec<f64>> = views(n, m)
                                .into_iter()
                                .map(|w| w[mine.start * n..mine.end * n].to_vec())
                                .collect();
                            snf_rows(rows, n, params, &mut ring).unwrap()
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            let joined = blocks.concat();
            let diff = joined
                .iter()
                .zip(&whole)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max);
            assert!(diff < 1e-13, "{world} ranks differ from one node by {diff}");
        }
    }

    #[test]
    fn a_rank_that_leaves_is_an_error_not_a_hang() {
        let mut rings = LocalRing::new(2);
        let alone = rings.pop().unwrap();
        drop(rings);
        let mut alone = alone;
        let rows = vec![vec![1.0; 5 * 10]; 2];
        match snf_rows(
            rows,
            10,
            SnfParams {
                k: 2,
                t: 1,
                alpha: 1.0,
            },
            &mut alone,
        ) {
            Err(NetworkError::Exchange { rank: 1, problem }) => {
                assert!(problem.contains("left the ring"), "{problem}")
            }
            other => panic!("expected an exchange error, got {other:?}"),
        }
    }
}
