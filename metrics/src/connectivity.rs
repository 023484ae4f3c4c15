//! scIB graph connectivity: for each label, the fraction of its cells in the largest strongly
//! connected component of the directed kNN graph restricted to that label; the mean over labels.

use crate::groups::Groups;
use crate::neighbors::Neighbors;

pub fn graph_connectivity(neighbors: &Neighbors, labels: &[u32]) -> f64 {
    let groups = Groups::new(labels, 0..labels.len());
    let mut local = vec![usize::MAX; labels.len()];
    let mut fractions = Vec::with_capacity(groups.len());
    for r in &groups.ranges {
        let cells = &groups.order[r.clone()];
        for (p, &c) in cells.iter().enumerate() {
            local[c] = p;
        }
        let edges: Vec<Vec<usize>> = cells
            .iter()
            .map(|&c| {
                neighbors
                    .row(c)
                    .0
                    .iter()
                    .map(|&j| j as usize)
                    .filter(|&j| labels[j] == labels[c])
                    .map(|j| local[j])
                    .collect()
            })
            .collect();
        fractions.push(largest_strong_component(&edges) as f64 / cells.len() as f64);
    }
    fractions.iter().sum::<f64>() / fractions.len() as f64
}

/// Size of the largest strongly connected component (Tarjan's algorithm, iterative so deep
/// chains cannot overflow the stack).
fn largest_strong_component(edges: &[Vec<usize>]) -> usize {
    let n = edges.len();
    const UNSEEN: usize = usize::MAX;
    let mut index = vec![UNSEEN; n];
    let mut low = vec![0usize; n];
    let mut on_stack = vec![false; n];
    let mut stack = Vec::new();
    let mut next_index = 0;
    let mut largest = 0;
    for root in 0..n {
        if index[root] != UNSEEN {
            continue;
        }
        // (node, position in its edge list)
        let mut call: Vec<(usize, usize)> = vec![(root, 0)];
        index[root] = next_index;
        low[root] = next_index;
        next_index += 1;
        stack.push(root);
        on_stack[root] = true;
        while let Some(top) = call.last_mut() {
            let v = top.0;
            if let Some(&w) = edges[v].get(top.1) {
                top.1 += 1;
                if index[w] == UNSEEN {
                    index[w] = next_index;
                    low[w] = next_index;
                    next_index += 1;
                    stack.push(w);
                    on_stack[w] = true;
                    call.push((w, 0));
                } else if on_stack[w] {
                    low[v] = low[v].min(index[w]);
                }
                continue;
            }
            call.pop();
            if let Some(&(parent, _)) = call.last() {
                low[parent] = low[parent].min(low[v]);
            }
            if low[v] == index[v] {
                let mut size = 0;
                while let Some(w) = stack.pop() {
                    on_stack[w] = false;
                    size += 1;
                    if w == v {
                        break;
                    }
                }
                largest = largest.max(size);
            }
        }
    }
    largest
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strong_components() {
        // 0 → 1 → 2 → 0 is a cycle; 3 → 0 hangs off it; 4 alone.
        let edges = vec![vec![1], vec![2], vec![0], vec![0], vec![]];
        assert_eq!(largest_strong_component(&edges), 3);
        assert_eq!(largest_strong_component(&[vec![1], vec![]]), 1);
        let chain: Vec<Vec<usize>> = (0..100_000).map(|i| vec![(i + 1) % 100_000]).collect();
        assert_eq!(largest_strong_component(&chain), 100_000);
    }

    #[test]
    fn connectivity_per_label() {
        // Label 0: cells 0,1 point at each other (one component, fraction 1).
        // Label 1: cells 2 → 3 only (components {2},{3}: fraction 1/2).
        let nn = Neighbors {
            k: 2,
            indices: vec![0, 1, 1, 0, 2, 3, 3, 0],
            distances: vec![0.0; 8],
        };
        assert_eq!(graph_connectivity(&nn, &[0, 0, 1, 1]), 0.75);
    }
}
