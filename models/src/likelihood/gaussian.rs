//! Gaussian: the main head's output is the mean, one log-variance per feature (a shared
//! parameter starting at 0, σ² = 1).

use tessera_kernels::Real;
use tessera_kernels::backend::{Backend, In, Out, Result, Tensor};
use tessera_kernels::ops::likelihood::Likelihood;
use tessera_kernels::params::Layout;

use super::{Rows, Site, dense_counts, main_backward};
use crate::layers::{Buf, DenseActs, Slots};
use crate::modality::ModalitySpec;

#[derive(Debug, Clone)]
pub(crate) struct Gaussian {
    log_variance: usize,
}

/// The per-entry gradients of the weighted log-likelihood: mean, log-variance.
pub(crate) struct Acts<S> {
    dmean: Tensor<S>,
    dlog_variance: Tensor<S>,
}

impl Gaussian {
    pub fn register(prefix: &str, spec: &ModalitySpec, layout: &mut Layout) -> Gaussian {
        Gaussian {
            log_variance: layout.add(&format!("{prefix}log_variance"), &[spec.n_features]),
        }
    }

    pub fn forward<T: Real, B: Backend<T>>(
        &self,
        site: &Site<'_, T, B>,
        main: &DenseActs<Buf<T, B>>,
        rows: &Rows<'_, T, B>,
        ll: &mut Buf<T, B>,
    ) -> Result<Acts<Buf<T, B>>> {
        let b = site.b;
        let (n, g) = (rows.counts.rows, rows.counts.cols);
        let x = dense_counts(b, rows, false)?;
        let (mut dmean, mut dlog_variance) = (b.output_tensor(n, g)?, b.output_tensor(n, g)?);
        let params = [main.output().input(), site.p.get(self.log_variance)];
        b.likelihood(
            Likelihood::Gaussian,
            x.input(),
            g,
            &params,
            Some(In::all(rows.negative)),
            Out::all(ll),
            &mut [dmean.output(), dlog_variance.output()],
        )?;
        Ok(Acts {
            dmean,
            dlog_variance,
        })
    }

    pub fn backward<T: Real, B: Backend<T>>(
        &self,
        site: &Site<'_, T, B>,
        grads: &mut Slots<'_, Buf<T, B>>,
        main: &DenseActs<Buf<T, B>>,
        acts: Acts<Buf<T, B>>,
        dh: &mut Tensor<Buf<T, B>>,
    ) -> Result<()> {
        main_backward(site, grads, main, acts.dmean, dh)?;
        site.b
            .column_sums(acts.dlog_variance.input(), grads.get(self.log_variance))
    }
}
