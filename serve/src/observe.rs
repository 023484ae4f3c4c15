//! What `tessera serve` counts: every gRPC call by method and status with its latency (a tower
//! layer around the whole server, so refused calls count too), the jobs by state, the memory
//! admitted, the models loaded. Rendered for Prometheus by [`Telemetry::render`].

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Instant;

use crate::jobs::Jobs;
use crate::registry::Registry;
use tessera_telemetry::{Exposition, Histogram};

/// Latency histograms by (method, gRPC status name).
#[derive(Debug, Default)]
pub struct CallStats {
    calls: Mutex<BTreeMap<(String, String), Histogram>>,
}

/// gRPC status codes by number, as their canonical names.
fn code_name(code: &str) -> &'static str {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    code.parse::<usize>()
        .ok()
        .and_then(|c| NAMES.get(c).copied())
        .unwrap_or("UNKNOWN")
}

impl CallStats {
    pub fn observe(&self, method: &str, code: &str, seconds: f64) {
        self.calls
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry((method.to_string(), code.to_string()))
            .or_default()
            .observe(seconds);
    }

    /// (method, code) → calls so far.
    pub fn counts(&self) -> BTreeMap<(String, String), u64> {
        self.calls
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(k, h)| (k.clone(), h.count))
            .collect()
    }
}

/// The tower layer recording each call into [`CallStats`]: method from the path, status from
/// the `grpc-status` of a trailers-only answer (a refusal), else OK (a streamed answer's final
/// status travels in trailers, after this layer has seen the response start).
#[derive(Debug, Clone)]
pub struct Observe(pub Arc<CallStats>);

impl<S> tower_layer::Layer<S> for Observe {
    type Service = Observed<S>;

    fn layer(&self, inner: S) -> Observed<S> {
        Observed {
            inner,
            stats: Arc::clone(&self.0),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Observed<S> {
    inner: S,
    stats: Arc<CallStats>,
}

type Boxed<T, E> = Pin<Box<dyn std::future::Future<Output = Result<T, E>> + Send>>;

impl<S, B, R> tower_service::Service<http::Request<B>> for Observed<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Boxed<S::Response, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let method = request
            .uri()
            .path()
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_string();
        let stats = Arc::clone(&self.stats);
        let started = Instant::now();
        let answer = self.inner.call(request);
        Box::pin(async move {
            let answer = answer.await;
            let code = match &answer {
                Ok(response) => response
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .map_or("OK", code_name),
                Err(_) => "TRANSPORT_ERROR",
            };
            stats.observe(&method, code, started.elapsed().as_secs_f64());
            answer
        })
    }
}

/// The service's state for the metrics endpoint.
#[derive(Debug, Clone)]
pub struct Telemetry {
    pub calls: Arc<CallStats>,
    pub jobs: Jobs,
    pub registry: Arc<Registry>,
}

impl Telemetry {
    pub fn render(&self) -> String {
        let mut e = Exposition::default();
        let calls = self
            .calls
            .calls
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let totals: Vec<(Vec<(&str, &str)>, f64)> = calls
            .iter()
            .map(|((m, c), h)| {
                (
                    vec![("method", m.as_str()), ("code", c.as_str())],
                    h.count as f64,
                )
            })
            .collect();
        e.family(
            "tessera_serve_requests_total",
            "gRPC calls answered, by method and status.",
            "counter",
            &totals,
        );
        // Latency by method, whatever the status.
        let mut by_method: BTreeMap<&str, Histogram> = BTreeMap::new();
        for ((m, _), h) in &calls {
            let all = by_method.entry(m.as_str()).or_default();
            for (a, b) in all.counts.iter_mut().zip(h.counts) {
                *a += b;
            }
            all.count += h.count;
            all.sum += h.sum;
        }
        let series: Vec<(Vec<(&str, &str)>, &Histogram)> = by_method
            .iter()
            .map(|(m, h)| (vec![("method", *m)], h))
            .collect();
        e.histograms(
            "tessera_serve_request_duration_seconds",
            "Time to answer a gRPC call (to the start of a streamed answer).",
            &series,
        );
        let states = self.jobs.states();
        let jobs: Vec<(Vec<(&str, &str)>, f64)> = states
            .iter()
            .map(|(s, n)| (vec![("state", *s)], *n as f64))
            .collect();
        e.family(
            "tessera_serve_jobs",
            "Mapping jobs known to this replica, by state.",
            "gauge",
            &jobs,
        );
        e.gauge(
            "tessera_serve_memory_admitted_bytes",
            "Memory estimates of the running jobs and Encode calls.",
            self.jobs.admitted_bytes() as f64,
        );
        e.gauge(
            "tessera_serve_memory_budget_bytes",
            "The memory budget of jobs and Encode calls.",
            self.jobs.budget_bytes() as f64,
        );
        e.gauge(
            "tessera_serve_models_loaded",
            "Registered models held in memory.",
            self.registry.cached().len() as f64,
        );
        e.finish()
    }
}
