//! Splitting cells into contiguous shards for data-parallel workers.
//!
//! A plan cuts the cell axis only at *candidate* rows (where a stored chunk begins), so each
//! shard reads whole chunks and neighbours share at most one; among the candidates it picks the
//! cuts that balance non-zeros (the work and the bytes) across shards. The cut points depend only
//! on the data; the seed decides which rank takes which shard in an epoch, so ranks see
//! different data across epochs while every plan is reproducible.

use std::ops::Range;

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_xoshiro::Xoshiro256PlusPlus;
use serde::Serialize;

use crate::error::Result;
use crate::matrix::{Matrix, MatrixFormat};
use crate::store::Store;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ShardPlan {
    /// Contiguous, disjoint cell ranges covering all cells in order.
    pub shards: Vec<Range<u64>>,
    /// Non-zeros in each shard.
    pub nnz: Vec<u64>,
}

impl ShardPlan {
    /// Plans `n_shards` shards over cells with `row_nnz` non-zeros each, cutting only at rows in
    /// `candidates` (sorted; 0 and n are implied). With fewer candidates than cuts needed, the
    /// remaining cuts fall on any row (a shard may then share a chunk with its neighbour).
    pub fn balanced(row_nnz: &[u64], candidates: &[u64], n_shards: usize) -> ShardPlan {
        let n = row_nnz.len() as u64;
        let n_shards = n_shards.clamp(1, row_nnz.len().max(1));
        let mut prefix = Vec::with_capacity(row_nnz.len() + 1);
        prefix.push(0u64);
        for &k in row_nnz {
            prefix.push(prefix.last().copied().unwrap_or(0) + k);
        }
        let total = *prefix.last().unwrap_or(&0);
        let mut points: Vec<u64> = candidates
            .iter()
            .copied()
            .filter(|&c| c > 0 && c < n)
            .collect();
        points.dedup();
        if points.len() + 1 < n_shards {
            points = (1..n).collect();
        }
        let mut cuts = vec![0u64];
        let mut from = 0usize;
        for s in 1..n_shards {
            // The cut whose cumulative nnz is nearest the target, leaving room for the shards
            // still to come and staying strictly after the previous cut.
            let target = (total as u128 * s as u128 / n_shards as u128) as u64;
            let remaining = n_shards - s;
            let last_allowed = points.len().saturating_sub(remaining);
            let prev = *cuts.last().unwrap_or(&0);
            let mut best: Option<(u64, usize)> = None;
            for (i, &p) in points.iter().enumerate().take(last_allowed + 1).skip(from) {
                if p <= prev {
                    continue;
                }
                let dist = prefix[p as usize].abs_diff(target);
                if best.is_none_or(|(d, _)| dist < d) {
                    best = Some((dist, i));
                } else if prefix[p as usize] > target {
                    break;
                }
            }
            if let Some((_, i)) = best {
                cuts.push(points[i]);
                from = i + 1;
            }
        }
        cuts.push(n);
        let shards: Vec<Range<u64>> = cuts.windows(2).map(|w| w[0]..w[1]).collect();
        let nnz = shards
            .iter()
            .map(|r| prefix[r.end as usize] - prefix[r.start as usize])
            .collect();
        ShardPlan { shards, nnz }
    }

    /// Plans shards for a stored matrix, cutting where its value chunks begin.
    pub fn for_matrix(store: &Store, matrix: &Matrix, n_shards: usize) -> Result<ShardPlan> {
        let row_nnz = matrix.row_nnz(store)?;
        // The unit a reader fetches: the inner chunk of a sharded array, else the chunk.
        let unit = matrix
            .inner_chunk_shape
            .as_ref()
            .unwrap_or(&matrix.chunk_shape);
        let chunk = unit.first().copied().unwrap_or(1).max(1);
        let candidates: Vec<u64> = match matrix.format {
            // First row whose values start in each new data chunk.
            MatrixFormat::Csr | MatrixFormat::Csc => {
                let mut out = Vec::new();
                let (mut start, mut boundary) = (0u64, chunk);
                for (r, k) in row_nnz.iter().enumerate() {
                    if start >= boundary {
                        out.push(r as u64);
                        while boundary <= start {
                            boundary += chunk;
                        }
                    }
                    start += k;
                }
                out
            }
            MatrixFormat::Dense => (1..=matrix.n_rows() / chunk).map(|k| k * chunk).collect(),
        };
        Ok(ShardPlan::balanced(&row_nnz, &candidates, n_shards))
    }

    /// Which shard each rank reads in the epoch with `seed`: a seeded permutation.
    pub fn assignment(&self, seed: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.shards.len()).collect();
        order.shuffle(&mut Xoshiro256PlusPlus::seed_from_u64(seed));
        order
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_all_cells_once_and_balance_nnz() {
        let row_nnz: Vec<u64> = (0..1000).map(|i| if i < 100 { 50 } else { 5 }).collect();
        let plan = ShardPlan::balanced(&row_nnz, &[], 4);
        assert_eq!(plan.shards.first().unwrap().start, 0);
        assert_eq!(plan.shards.last().unwrap().end, 1000);
        assert!(
            plan.shards
                .windows(2)
                .all(|w| w[0].end == w[1].start && w[0].start < w[0].end)
        );
        let total: u64 = row_nnz.iter().sum();
        assert_eq!(plan.nnz.iter().sum::<u64>(), total);
        for &k in &plan.nnz {
            assert!(k.abs_diff(total / 4) <= 50, "{:?}", plan.nnz);
        }
        // Heavy rows are first, so the first shard holds fewer cells.
        assert!(plan.shards[0].end < 250);
    }

    #[test]
    fn cuts_only_at_candidates() {
        let row_nnz = vec![10u64; 100];
        let candidates = [20, 40, 60, 80];
        let plan = ShardPlan::balanced(&row_nnz, &candidates, 3);
        assert_eq!(plan.shards, vec![0..40, 40..60, 60..100]);
        assert_eq!(plan.nnz, vec![400, 200, 400]);
        for r in &plan.shards[1..] {
            assert!(candidates.contains(&r.start), "{:?}", plan.shards);
        }
    }

    #[test]
    fn more_shards_than_rows_and_determinism() {
        let plan = ShardPlan::balanced(&[1, 1, 1], &[], 8);
        assert_eq!(plan.shards, vec![0..1, 1..2, 2..3]);
        let plan = ShardPlan::balanced(&vec![3; 64], &[16, 32, 48], 4);
        assert_eq!(plan.assignment(5), plan.assignment(5));
        let mut a = plan.assignment(5);
        a.sort_unstable();
        assert_eq!(a, vec![0, 1, 2, 3]);
    }
}
