//! Bernoulli: the main head's output is the logit of x > 0 (counts are binarised, as MultiVI
//! does for accessibility). No parameters of its own.

use tessera_kernels::Real;
use tessera_kernels::backend::{Backend, In, Out, Result, Tensor};
use tessera_kernels::ops::likelihood::Likelihood;

use super::{Rows, Site, dense_counts, main_backward};
use crate::layers::{Buf, DenseActs, Slots};

#[derive(Debug, Clone)]
pub(crate) struct Bernoulli;

/// The per-entry gradient of the weighted log-likelihood w.r.t. the logits.
pub(crate) struct Acts<S> {
    dlogits: Tensor<S>,
}

impl Bernoulli {
    pub fn forward<T: Real, B: Backend<T>>(
        &self,
        site: &Site<'_, T, B>,
        main: &DenseActs<Buf<T, B>>,
        rows: &Rows<'_, T, B>,
        ll: &mut Buf<T, B>,
    ) -> Result<Acts<Buf<T, B>>> {
        let b = site.b;
        let (n, g) = (rows.counts.rows, rows.counts.cols);
        let x = dense_counts(b, rows, true)?;
        let mut dlogits = b.output_tensor(n, g)?;
        b.likelihood(
            Likelihood::Bernoulli,
            x.input(),
            g,
            &[main.output().input()],
            Some(In::all(rows.negative)),
            Out::all(ll),
            &mut [dlogits.output()],
        )?;
        Ok(Acts { dlogits })
    }

    pub fn backward<T: Real, B: Backend<T>>(
        &self,
        site: &Site<'_, T, B>,
        grads: &mut Slots<'_, Buf<T, B>>,
        main: &DenseActs<Buf<T, B>>,
        acts: Acts<Buf<T, B>>,
        dh: &mut Tensor<Buf<T, B>>,
    ) -> Result<()> {
        main_backward(site, grads, main, acts.dlogits, dh)
    }
}
