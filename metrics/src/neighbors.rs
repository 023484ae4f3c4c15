//! Exact k nearest neighbours (the cell itself included, as pynndescent returns it), sorted by
//! distance with ties broken by the smaller index, so results never depend on thread count.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use crate::distance::{Columns, scan};

#[derive(Debug, Clone, PartialEq)]
pub struct Neighbors {
    pub k: usize,
    /// Row-major `n x k`.
    pub indices: Vec<u32>,
    pub distances: Vec<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Candidate(f64, u32);

impl Eq for Candidate {}
impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Candidate {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.total_cmp(&other.0).then(self.1.cmp(&other.1))
    }
}

/// The `k` smallest entries of `row` as (index, distance), ascending (ties: smaller index).
/// The scan starts at `near` and wraps: callers pass the cell itself, whose index neighbours
/// (same label in evaluation order) are likely near, so the heap's bound tightens at once and
/// most cells cost one comparison.
pub fn nearest_in_row(row: &[f64], k: usize, near: usize) -> Vec<(u32, f64)> {
    let n = row.len();
    let k = k.min(n);
    let order = (near.min(n)..n).chain(0..near.min(n));
    let mut heap: BinaryHeap<Candidate> = BinaryHeap::with_capacity(k);
    let mut worst = f64::INFINITY;
    for j in order {
        let c = Candidate(row[j], j as u32);
        if heap.len() < k {
            heap.push(c);
        } else if row[j] <= worst
            && let Some(mut top) = heap.peek_mut()
            && c < *top
        {
            *top = c;
        } else {
            continue;
        }
        if heap.len() == k {
            worst = heap.peek().map_or(f64::INFINITY, |t| t.0);
        }
    }
    heap.into_sorted_vec()
        .into_iter()
        .map(|Candidate(d, j)| (j, d))
        .collect()
}

impl Neighbors {
    /// Exact kNN of every cell (k is capped at the number of cells).
    pub fn exact(columns: &Columns, k: usize) -> Neighbors {
        Neighbors::from_rows(
            scan(columns, |i, row| nearest_in_row(row, k, i)),
            k.min(columns.n()),
        )
    }

    /// Assembles per-cell neighbour lists (each of length `k`).
    pub fn from_rows(rows: Vec<Vec<(u32, f64)>>, k: usize) -> Neighbors {
        let mut indices = Vec::with_capacity(rows.len() * k);
        let mut distances = Vec::with_capacity(rows.len() * k);
        for row in rows {
            debug_assert_eq!(row.len(), k);
            for (j, d) in row {
                indices.push(j);
                distances.push(d);
            }
        }
        Neighbors {
            k,
            indices,
            distances,
        }
    }

    pub fn n(&self) -> usize {
        self.indices.len().checked_div(self.k).unwrap_or(0)
    }

    /// The first `k` neighbours of each cell.
    pub fn first(&self, k: usize) -> Neighbors {
        let k = k.min(self.k);
        Neighbors {
            k,
            indices: first_columns(&self.indices, self.k, k),
            distances: first_columns(&self.distances, self.k, k),
        }
    }

    pub fn row(&self, i: usize) -> (&[u32], &[f64]) {
        (
            &self.indices[i * self.k..(i + 1) * self.k],
            &self.distances[i * self.k..(i + 1) * self.k],
        )
    }
}

fn first_columns<T: Copy>(v: &[T], width: usize, k: usize) -> Vec<T> {
    v.chunks_exact(width)
        .flat_map(|r| r[..k].iter().copied())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_neighbours_sorted_with_ties_by_index() {
        let x = [0.0f32, 1.0, 3.0, -1.0, 10.0];
        let nn = Neighbors::exact(&Columns::new(&x, 5, 1), 3);
        // Cell 0: itself, then 1 and 3 both at distance 1 (index order).
        assert_eq!(nn.row(0), (&[0u32, 1, 3][..], &[0.0, 1.0, 1.0][..]));
        assert_eq!(nn.row(4).0, &[4, 2, 1]);
        let two = nn.first(2);
        assert_eq!(two.row(2), (&[2u32, 1][..], &[0.0, 2.0][..]));
        assert_eq!(two.n(), 5);
        assert_eq!(Neighbors::exact(&Columns::new(&x, 5, 1), 9).k, 5);
    }
}
