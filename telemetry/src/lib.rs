//! tessera-telemetry: what every role (`train`, `worker`, `coordinator`, `serve`) exposes on its
//! `--metrics-listen` port. [`exposition`] writes and parses Prometheus text; [`http`] serves it
//! at `GET /metrics`, with `GET /healthz` for probes.
//!
//! Invariant: this crate knows no role. A role hands the server a [`Render`] closure that
//! writes its metrics at scrape time; nothing here depends on another tessera crate.

pub mod exposition;
pub mod http;

pub use exposition::{Exposition, Histogram, LATENCY_BUCKETS, Sample, parse, value};
pub use http::{Render, serve_metrics};
