//! tessera-telemetry: what every role (`train`, `worker`, `coordinator`, `serve`) exposes on its
//! `--metrics-listen` port. [`exposition`] writes and parses Prometheus text; [`http`] serves it
//! at `GET /metrics`, with `GET /healthz` for probes.
//!
//! Why our own writer rather than `prometheus-client`: every role's values are read at scrape
//! time from state it already keeps (the coordinator's snapshot, the job table, atomics), which
//! `prometheus-client` takes only through hand-written `Collector`s of constant metrics, no
//! shorter than these writer calls; and its encoder emits OpenMetrics (`# EOF`, counter families
//! named without `_total`, another content type), which would change what existing scrapers,
//! dashboards and our tests read. The writer is small and its output is checked by a strict
//! parser.
//!
//! Invariant: this crate knows no role. A role hands the server a [`Render`] closure that
//! writes its metrics at scrape time; nothing here depends on another tessera crate.

pub mod exposition;
pub mod http;

pub use exposition::{Exposition, Histogram, LATENCY_BUCKETS, Sample, parse, value};
pub use http::{Render, serve_metrics};
