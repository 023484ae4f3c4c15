//! Loss sums the device computes and the host reads once per step. A forward leaves each term
//! as per-row values on the device and how the host reduces them; the step reads them all in
//! one transfer after the backward is queued, so a GPU step waits for the device once instead of
//! once per term. The host arithmetic is the one an immediate read did (same order, f64), so the
//! values keep their bits.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tessera_kernels::Real;
use tessera_kernels::backend::{Backend, In, Out, Result, Storage};
use tessera_kernels::ops::optim::grad_norm;

use crate::vae::LossTerms;

/// How the host turns one device vector into a term's share.
#[derive(Debug)]
pub(crate) enum Reduce {
    /// −Σ v_r w_r: log-likelihoods per row and the rows' weights (the loss is the negative).
    NegativeDot(Vec<f64>),
    /// Σ v_r s_r.
    Dot(Vec<f64>),
    /// (Σ v_r) × f.
    ScaledSum(f64),
    /// (Σ v_r) × a / b: a weight over a count, applied in that order.
    SumTimesOver(f64, f64),
    /// a × ‖v‖ × ‖v‖ / b, the norm as `ops::optim::grad_norm` takes it.
    NormSquaredTimesOver(f64, f64),
}

/// What multiplies each value on the device before the sum.
enum Weights<T> {
    One,
    Host(Vec<T>),
    /// The value itself: a sum of squares.
    Itself,
}

impl Reduce {
    /// The weight of each value on the device's scalar type and the factor outside the sum:
    /// the reduction is factor × Σ v_r w_r.
    fn device_form<T: Real>(&self) -> (Weights<T>, f64) {
        let on = |w: &[f64]| Weights::Host(w.iter().map(|&w| T::of(w)).collect());
        match self {
            Reduce::NegativeDot(w) => (on(w), -1.0),
            Reduce::Dot(s) => (on(s), 1.0),
            Reduce::ScaledSum(f) => (Weights::One, *f),
            Reduce::SumTimesOver(a, b) => (Weights::One, a / b),
            Reduce::NormSquaredTimesOver(a, b) => (Weights::Itself, a / b),
        }
    }

    fn apply<T: Real>(&self, values: &[T]) -> f64 {
        match self {
            Reduce::NegativeDot(w) => -values.iter().zip(w).map(|(v, w)| v.f64() * w).sum::<f64>(),
            Reduce::Dot(s) => values.iter().zip(s).map(|(v, s)| v.f64() * s).sum::<f64>(),
            Reduce::ScaledSum(f) => values.iter().map(|v| v.f64()).sum::<f64>() * f,
            Reduce::SumTimesOver(a, b) => values.iter().map(|v| v.f64()).sum::<f64>() * a / b,
            Reduce::NormSquaredTimesOver(a, b) => {
                let norm = grad_norm(values);
                a * norm * norm / b
            }
        }
    }
}

/// One share of a term: values on the device and their reduction.
#[derive(Debug)]
pub(crate) struct Share<S> {
    pub values: S,
    pub reduce: Reduce,
}

/// One addend of a term: a share still on the device, or a term of its own (summed apart first,
/// as the host summed a penalty's pairs before adding the total).
#[derive(Debug)]
enum Part<S> {
    Device(Share<S>),
    Nested(Term<S>),
}

/// A loss term: its parts added in the order they were made (from 0, in f64), then multiplied
/// by `times`; or a value the host already has (it replaces the parts).
#[derive(Debug)]
pub(crate) struct Term<S> {
    parts: Vec<Part<S>>,
    times: f64,
    known: Option<f64>,
}

impl<S> Default for Term<S> {
    fn default() -> Self {
        Term {
            parts: Vec::new(),
            times: 1.0,
            known: None,
        }
    }
}

impl<S> Term<S> {
    pub fn add(&mut self, share: Share<S>) {
        self.parts.push(Part::Device(share));
    }

    /// Adds `term`'s value, summed apart first.
    pub fn add_term(&mut self, term: Term<S>) {
        self.parts.push(Part::Nested(term));
    }

    /// The term times `factor` (applied after the parts are summed).
    pub fn times(mut self, factor: f64) -> Self {
        self.times *= factor;
        self
    }

    /// The shares still to read (none when the value is known), depth first in the order
    /// they were added, each with the product of the factors of the terms around it.
    fn shares(&self) -> Vec<(f64, &Share<S>)> {
        let mut out = Vec::new();
        self.collect_shares(1.0, &mut out);
        out
    }

    fn collect_shares<'a>(&'a self, outer: f64, out: &mut Vec<(f64, &'a Share<S>)>) {
        if self.known.is_some() {
            return;
        }
        let factor = outer * self.times;
        for part in &self.parts {
            match part {
                Part::Device(share) => out.push((factor, share)),
                Part::Nested(term) => term.collect_shares(factor, out),
            }
        }
    }

    /// What the host has of the term: its known value, or its nested terms' known values
    /// (times its factor).
    fn on_host(&self) -> f64 {
        self.known.unwrap_or_else(|| {
            self.parts.iter().fold(0.0, |acc, p| match p {
                Part::Device(_) => acc,
                Part::Nested(term) => acc + term.on_host(),
            }) * self.times
        })
    }

    /// The term's value, its shares' values taken from `at` in [`Term::shares`]' order.
    fn value<'a, T: Real + 'a>(&self, at: &mut impl Iterator<Item = &'a Vec<T>>) -> f64 {
        if let Some(known) = self.known {
            return known;
        }
        self.parts.iter().fold(0.0, |acc, p| match p {
            Part::Device(share) => {
                acc + share.reduce.apply(at.next().map_or(&[][..], Vec::as_slice))
            }
            Part::Nested(term) => acc + term.value(at),
        }) * self.times
    }
}

/// A forward's loss terms, reconstruction and KL still on the device: read by
/// [`crate::Trainer::read_terms`], or summed on the device into a data-parallel step's buffer
/// ([`PendingLoss::add_device_sums`], [`PendingLoss::host_sums`]) so that the step reads them
/// with its reduction.
#[derive(Debug)]
pub struct PendingLoss<S> {
    pub(crate) reconstruction: Term<S>,
    pub(crate) kl: Term<S>,
    /// The KL weight's bits: a step replayed from a CUDA graph shares its terms with the
    /// graph, and the replay sets the weight of its epoch ([`PendingLoss::set_kl_weight`]).
    pub(crate) kl_weight: AtomicU64,
    /// The penalties, each nested as the host summed it.
    pub(crate) regularization: Term<S>,
    /// The supervised heads' losses.
    pub(crate) supervised: Term<S>,
    pub(crate) cells: usize,
}

impl<S: Storage> PendingLoss<S> {
    /// Terms the host already has (nothing on the device).
    pub fn on_host(terms: &LossTerms, kl_weight: f64) -> Self {
        let known = |value: f64| Term {
            known: Some(value),
            ..Term::default()
        };
        PendingLoss {
            reconstruction: known(terms.reconstruction),
            kl: known(terms.kl),
            kl_weight: AtomicU64::new(kl_weight.to_bits()),
            regularization: known(terms.regularization),
            supervised: known(terms.supervised),
            cells: terms.cells,
        }
    }

    /// The KL weight the loss is formed with.
    pub fn kl_weight(&self) -> f64 {
        f64::from_bits(self.kl_weight.load(Ordering::Relaxed))
    }

    /// The KL weight of the terms a replay of the step they came from writes next (a read
    /// started before keeps the weight it started with).
    pub fn set_kl_weight(&self, kl_weight: f64) {
        self.kl_weight.store(kl_weight.to_bits(), Ordering::Relaxed);
    }

    /// Cells of the batch.
    pub fn cells(&self) -> usize {
        self.cells
    }

    /// `weight` × the terms the host already has, as [reconstruction, KL, regularization,
    /// supervised]; a term still on the device counts 0 here ([`PendingLoss::add_device_sums`]).
    pub fn host_sums(&self, weight: f64) -> [f64; 4] {
        [
            self.reconstruction.on_host() * weight,
            self.kl.on_host() * weight,
            self.regularization.on_host() * weight,
            self.supervised.on_host() * weight,
        ]
    }

    /// Queues `sums[at + k] += weight × term k` for the shares still on the device of the
    /// reconstruction (k = 0), the KL (1), the regularization (2) and the supervised heads (3),
    /// weighted and summed there in `T`: nothing is read.
    pub fn add_device_sums<T: Real, B: Backend<T, Buf = S>>(
        &self,
        b: &B,
        weight: f64,
        sums: &mut S,
        at: usize,
    ) -> Result<()> {
        let terms = [
            (0, &self.reconstruction),
            (1, &self.kl),
            (2, &self.regularization),
            (3, &self.supervised),
        ];
        for (slot, term) in terms {
            // An empty share adds nothing (and a launch over no values is refused on a GPU).
            for (outer, share) in term.shares() {
                if share.values.is_empty() {
                    continue;
                }
                let (w, factor) = share.reduce.device_form::<T>();
                let uploaded = match &w {
                    Weights::Host(w) => Some(b.upload_weights(w)?),
                    Weights::One | Weights::Itself => None,
                };
                let weights = match w {
                    Weights::One => None,
                    Weights::Host(_) => uploaded.as_ref(),
                    Weights::Itself => Some(&share.values),
                };
                let weighted = match weights {
                    Some(w) => {
                        let mut y = b.output_buf(share.values.len())?;
                        b.scale_rows(In::all(&share.values), In::all(w), Out::all(&mut y))?;
                        Some(y)
                    }
                    None => None,
                };
                let mut total = b.output_buf(1)?;
                let values = weighted.as_ref().unwrap_or(&share.values);
                b.column_sums(In::all(values), Out::all(&mut total))?;
                let slot = at + slot;
                b.axpy(
                    T::of(weight * outer * factor),
                    In::all(&total),
                    Out::part(sums, slot..slot + 1),
                )?;
            }
        }
        Ok(())
    }

    /// The terms, read in one transfer.
    pub fn resolve<T: Real, B: Backend<T, Buf = S>>(&self, b: &B) -> Result<LossTerms> {
        Ok(self.resolve_with(b, &[])?.0)
    }

    /// The terms and the values of `extra` (a step's gradient flag), read in one transfer.
    /// Reads what the buffers hold now: a step replayed from a CUDA graph rewrites them, and
    /// its terms are read again after each replay.
    pub fn resolve_with<T: Real, B: Backend<T, Buf = S>>(
        &self,
        b: &B,
        extra: &[&S],
    ) -> Result<(LossTerms, Vec<Vec<T>>)> {
        let host = b.download_together(&self.views_with(extra))?;
        Ok(self.terms_with(host, extra.len(), self.kl_weight()))
    }

    /// Starts reading the terms and the values of `extra` in one transfer, without waiting:
    /// [`ReadingLoss::finish`] waits for them. Shared: a step replayed from a CUDA graph keeps
    /// its terms' buffers with the graph, and each replay's read holds them too.
    pub fn start_read<T: Real, B: Backend<T, Buf = S>>(
        self: Arc<Self>,
        b: &B,
        extra: &[&S],
    ) -> Result<ReadingLoss<S, B::Download>> {
        let download = b.start_download(&self.views_with(extra))?;
        Ok(ReadingLoss {
            kl_weight: self.kl_weight(),
            pending: self,
            download,
            extra: extra.len(),
        })
    }

    /// The terms of many forwards (a validation pass), read in one transfer.
    pub fn resolve_all<T: Real, B: Backend<T, Buf = S>>(
        b: &B,
        all: &[PendingLoss<S>],
    ) -> Result<Vec<LossTerms>> {
        let views: Vec<In<'_, S>> = all.iter().flat_map(Self::on_device).map(In::all).collect();
        let host = b.download_together(&views)?;
        let mut at = host.iter();
        Ok(all
            .iter()
            .map(|p| p.terms_from(&mut at, p.kl_weight()))
            .collect())
    }

    /// The device values, then `extra`'s, in one list of views to read together.
    fn views_with<'a>(&'a self, extra: &[&'a S]) -> Vec<In<'a, S>> {
        self.on_device()
            .chain(extra.iter().copied())
            .map(In::all)
            .collect()
    }

    /// The terms and the `extra` values last in `host` ([`PendingLoss::views_with`]'s order).
    fn terms_with<T: Real>(
        &self,
        mut host: Vec<Vec<T>>,
        extra: usize,
        kl_weight: f64,
    ) -> (LossTerms, Vec<Vec<T>>) {
        let extra = host.split_off(host.len() - extra);
        (self.terms_from(&mut host.iter(), kl_weight), extra)
    }

    /// The device values the host reads, in the order [`PendingLoss::terms_from`] takes them.
    fn on_device(&self) -> impl Iterator<Item = &S> {
        [
            &self.reconstruction,
            &self.kl,
            &self.regularization,
            &self.supervised,
        ]
        .into_iter()
        .flat_map(|t| t.shares().into_iter().map(|(_, s)| &s.values))
    }

    /// The terms from their values on the host (taken from `at` in [`PendingLoss::on_device`]'s
    /// order), in f64: the arithmetic an immediate read did.
    fn terms_from<'a, T: Real + 'a>(
        &self,
        at: &mut impl Iterator<Item = &'a Vec<T>>,
        kl_weight: f64,
    ) -> LossTerms {
        let reconstruction = self.reconstruction.value(at);
        let kl = self.kl.value(at);
        let regularization = self.regularization.value(at);
        let supervised = self.supervised.value(at);
        LossTerms {
            reconstruction,
            kl,
            regularization,
            supervised,
            loss: reconstruction + kl_weight * kl + regularization + supervised,
            cells: self.cells,
        }
    }
}

/// A [`PendingLoss`] whose values are on their way to the host ([`PendingLoss::start_read`]).
#[derive(Debug)]
pub struct ReadingLoss<S, D> {
    pending: Arc<PendingLoss<S>>,
    /// The pending terms' KL weight when the read started.
    kl_weight: f64,
    download: D,
    extra: usize,
}

impl<S: Storage, D> ReadingLoss<S, D> {
    /// The terms and the extra values, once they have arrived.
    pub fn finish<T: Real, B: Backend<T, Buf = S, Download = D>>(
        self,
        b: &B,
    ) -> Result<(LossTerms, Vec<Vec<T>>)> {
        let host = b.finish_download(self.download)?;
        Ok(self.pending.terms_with(host, self.extra, self.kl_weight))
    }
}
