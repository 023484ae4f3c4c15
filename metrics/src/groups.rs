//! Categorical codes regrouped so each category's cells are one contiguous range (what
//! pandas.Categorical + bincount give scib-metrics, without the scattered adds).

use std::ops::Range;

#[derive(Debug, Clone)]
pub struct Groups {
    /// Cells in category order (stable within a category).
    pub order: Vec<usize>,
    /// Per present category (in code order), its range of `order`.
    pub ranges: Vec<Range<usize>>,
    /// Per position in `order`, the index of its range.
    pub group_of: Vec<usize>,
}

impl Groups {
    /// Groups the cells `cells` by `codes[cell]`; absent categories get no range.
    pub fn new(codes: &[u32], cells: impl IntoIterator<Item = usize>) -> Groups {
        let mut order: Vec<usize> = cells.into_iter().collect();
        order.sort_by_key(|&c| codes[c]);
        let mut ranges: Vec<Range<usize>> = Vec::new();
        let mut group_of = Vec::with_capacity(order.len());
        for (p, &c) in order.iter().enumerate() {
            match ranges.last_mut() {
                Some(r) if codes[order[r.start]] == codes[c] => r.end = p + 1,
                _ => ranges.push(p..p + 1),
            }
            group_of.push(ranges.len() - 1);
        }
        Groups {
            order,
            ranges,
            group_of,
        }
    }

    /// How many distinct categories `codes` holds.
    pub fn count(codes: &[u32]) -> usize {
        let mut seen = codes.to_vec();
        seen.sort_unstable();
        seen.dedup();
        seen.len()
    }

    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contiguous_ranges_in_code_order() {
        let g = Groups::new(&[2, 0, 2, 5, 0], 0..5);
        assert_eq!(g.order, vec![1, 4, 0, 2, 3]);
        assert_eq!(g.ranges, vec![0..2, 2..4, 4..5]);
        assert_eq!(g.group_of, vec![0, 0, 1, 1, 2]);
        let sub = Groups::new(&[2, 0, 2, 5, 0], [3, 0]);
        assert_eq!(sub.order, vec![0, 3]);
        assert_eq!(sub.len(), 2);
    }
}
