//! A model's parameters in one contiguous buffer, and its gradients in another of the same
//! layout, so the optimiser and the all-reduce each make one pass (or a few fixed buckets) over
//! all of them.

use std::ops::Range;

#[derive(Debug, Clone, PartialEq)]
pub struct Slot {
    pub name: String,
    pub shape: Vec<usize>,
    pub range: Range<usize>,
}

/// Named tensors laid out back to back, in registration order (the same on every rank).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Layout {
    slots: Vec<Slot>,
    len: usize,
}

impl Layout {
    /// Adds a tensor; returns its index. Names must be unique.
    pub fn add(&mut self, name: &str, shape: &[usize]) -> usize {
        assert!(
            self.slots.iter().all(|s| s.name != name),
            "parameter {name} registered twice"
        );
        let n: usize = shape.iter().product();
        self.slots.push(Slot {
            name: name.into(),
            shape: shape.to_vec(),
            range: self.len..self.len + n,
        });
        self.len += n;
        self.slots.len() - 1
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn slots(&self) -> &[Slot] {
        &self.slots
    }

    pub fn slot(&self, name: &str) -> Option<&Slot> {
        self.slots.iter().find(|s| s.name == name)
    }

    /// Contiguous buckets of about `bucket` elements, split only between tensors, in layout
    /// order: the fixed all-reduce units.
    pub fn buckets(&self, bucket: usize) -> Vec<Range<usize>> {
        let mut out: Vec<Range<usize>> = Vec::new();
        for s in &self.slots {
            match out.last_mut() {
                Some(last) if last.end - last.start < bucket => last.end = s.range.end,
                _ => out.push(s.range.clone()),
            }
        }
        out
    }
}

/// Values, gradients and the optimiser's moments, all with one layout.
#[derive(Debug, Clone)]
pub struct Params<T> {
    pub layout: Layout,
    pub values: Vec<T>,
    pub grads: Vec<T>,
}

impl<T: Copy + Default> Params<T> {
    pub fn new(layout: Layout) -> Self {
        let n = layout.len();
        Params {
            layout,
            values: vec![T::default(); n],
            grads: vec![T::default(); n],
        }
    }

    pub fn value(&self, index: usize) -> &[T] {
        &self.values[self.layout.slots[index].range.clone()]
    }

    pub fn value_mut(&mut self, index: usize) -> &mut [T] {
        let r = self.layout.slots[index].range.clone();
        &mut self.values[r]
    }

    /// A tensor's values and its gradient buffer together (forward reads one, backward writes
    /// the other).
    pub fn value_and_grad_mut(&mut self, index: usize) -> (&[T], &mut [T]) {
        let r = self.layout.slots[index].range.clone();
        (&self.values[r.clone()], &mut self.grads[r])
    }

    pub fn zero_grads(&mut self) {
        self.grads.iter_mut().for_each(|g| *g = T::default());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_contiguous_and_bucketed_between_tensors() {
        let mut layout = Layout::default();
        let w = layout.add("enc.w", &[100, 8]);
        let b = layout.add("enc.b", &[8]);
        let d = layout.add("dec.w", &[8, 100]);
        assert_eq!(layout.len(), 1608);
        assert_eq!(layout.slot("enc.b").unwrap().range, 800..808);
        assert_eq!(layout.buckets(900), vec![0..1608]);
        assert_eq!(layout.buckets(500), vec![0..800, 800..1608]);
        let mut p = Params::<f32>::new(layout);
        p.value_mut(b).copy_from_slice(&[1.0; 8]);
        let (v, g) = p.value_and_grad_mut(b);
        g.copy_from_slice(v);
        assert_eq!(&p.grads[800..808], &[1.0; 8]);
        assert_eq!((p.value(w).len(), p.value(d).len()), (800, 800));
        p.zero_grads();
        assert!(p.grads.iter().all(|&g| g == 0.0));
    }

    #[test]
    #[should_panic(expected = "registered twice")]
    fn duplicate_names_are_refused() {
        let mut layout = Layout::default();
        layout.add("w", &[2]);
        layout.add("w", &[3]);
    }
}
