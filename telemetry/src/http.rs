//! The plain-HTTP server behind `--metrics-listen`: `GET /metrics` (the text a closure renders
//! at scrape time) and `GET /healthz`; anything else gets 404.
//!
//! Plain HTTP on its own port, so scrapers and kubelet probes reach it even when the gRPC port
//! speaks TLS only. hyper parses the requests; each connection carries one request and is closed
//! after the answer; a client that sends no complete head within [`HEADER_TIMEOUT`] is dropped
//! (a slow or stuck client cannot hold a connection), and a connection lives at most
//! [`CONNECTION_TIMEOUT`] whatever it does.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};

/// What a role exposes: its metrics rendered at scrape time.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// How long a client may take to send a request's head.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest a connection is kept, idle or not (scrapes take milliseconds).
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(60);
/// The largest request head read (a scrape's is a few hundred bytes).
const MAX_HEAD_BYTES: usize = 16 * 1024;

const EXPOSITION: &str = "text/plain; version=0.0.4; charset=utf-8";
const TEXT: &str = "text/plain; charset=utf-8";

/// The answer to one request.
fn respond(request: &Request<Incoming>, render: &Render) -> Response<Full<Bytes>> {
    let (status, kind, body) = match (request.method(), request.uri().path()) {
        (&Method::GET, "/metrics") => (StatusCode::OK, EXPOSITION, render()),
        (&Method::GET, "/healthz") => (StatusCode::OK, TEXT, "ok\n".to_string()),
        _ => (
            StatusCode::NOT_FOUND,
            TEXT,
            "not found: GET /metrics or /healthz\n".to_string(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(kind),
    );
    response
}

/// Serves `/metrics` and `/healthz` on `listener` until `shutdown` completes.
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    render: Render,
    shutdown: impl Future<Output = ()>,
) {
    serve_with(listener, render, shutdown, HEADER_TIMEOUT).await;
}

/// [`serve_metrics`] with its header timeout as an argument (the tests shorten it).
async fn serve_with(
    listener: tokio::net::TcpListener,
    render: Render,
    shutdown: impl Future<Output = ()>,
    header_timeout: Duration,
) {
    let mut builder = http1::Builder::new();
    // One request per connection, closed after the answer (a scrape every few seconds gains
    // nothing from keep-alive, and a closed connection cannot idle).
    builder
        .keep_alive(false)
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .max_buf_size(MAX_HEAD_BYTES);
    let builder = Arc::new(builder);
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics listener");
                    continue;
                }
            },
            () = &mut shutdown => return,
        };
        let (render, builder) = (Arc::clone(&render), Arc::clone(&builder));
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<Incoming>| {
                let response = respond(&request, &render);
                async move { Ok::<_, Infallible>(response) }
            });
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            match tokio::time::timeout(CONNECTION_TIMEOUT, connection).await {
                Ok(Err(e)) => tracing::debug!(error = %e, "metrics connection"),
                Err(_) => tracing::debug!("metrics connection closed after its time limit"),
                Ok(Ok(())) => {}
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use super::*;

    /// A server on a loopback port; its address and the sender that stops it.
    async fn start(
        header_timeout: Duration,
    ) -> (std::net::SocketAddr, tokio::sync::oneshot::Sender<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let at = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let render: Render = Arc::new(|| "# HELP up Up.\n# TYPE up gauge\nup 1\n".to_string());
        tokio::spawn(serve_with(
            listener,
            render,
            async {
                let _ = stopped.await;
            },
            header_timeout,
        ));
        (at, stop)
    }

    /// Sends `request` and reads until the server closes the connection (a server that closes
    /// early may cut the write or reset the read: what arrived is the answer).
    async fn exchange(at: std::net::SocketAddr, request: &[u8]) -> String {
        let mut stream = TcpStream::connect(at).await.unwrap();
        let _ = stream.write_all(request).await;
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer).await;
        String::from_utf8_lossy(&answer).into_owned()
    }

    #[tokio::test]
    async fn metrics_health_and_unknown_paths_answer_as_documented() {
        let (at, _stop) = start(HEADER_TIMEOUT).await;
        let head_end = "Host: x\r\n\r\n";
        let metrics = exchange(
            at,
            format!("GET /metrics HTTP/1.1\r\n{head_end}").as_bytes(),
        )
        .await;
        assert!(metrics.starts_with("HTTP/1.1 200 OK\r\n"), "{metrics}");
        assert!(metrics.contains(EXPOSITION), "{metrics}");
        assert!(
            metrics.ends_with("\r\n\r\n# HELP up Up.\n# TYPE up gauge\nup 1\n"),
            "{metrics}"
        );
        let health = exchange(
            at,
            format!("GET /healthz HTTP/1.1\r\n{head_end}").as_bytes(),
        )
        .await;
        assert!(health.starts_with("HTTP/1.1 200 OK\r\n") && health.ends_with("\r\n\r\nok\n"));
        let other = exchange(at, format!("GET /other HTTP/1.1\r\n{head_end}").as_bytes()).await;
        assert!(other.starts_with("HTTP/1.1 404 Not Found\r\n"), "{other}");
        let post = exchange(
            at,
            format!("POST /metrics HTTP/1.1\r\n{head_end}").as_bytes(),
        )
        .await;
        assert!(post.starts_with("HTTP/1.1 404 Not Found\r\n"), "{post}");
    }

    #[tokio::test]
    async fn a_client_that_never_finishes_its_head_is_dropped() {
        let (at, _stop) = start(Duration::from_millis(200)).await;
        // Half a head, then silence: the server closes the connection (the read ends) instead
        // of holding it open; a request timeout answer may come first.
        let answer = tokio::time::timeout(
            Duration::from_secs(20),
            exchange(at, b"GET /metrics HTTP/1.1\r\nHost: x\r\n"),
        )
        .await
        .expect("the server dropped the stalled client");
        assert!(!answer.contains("up 1"), "{answer}");
    }

    #[tokio::test]
    async fn an_oversized_head_is_refused() {
        let (at, _stop) = start(HEADER_TIMEOUT).await;
        let long = "x".repeat(2 * MAX_HEAD_BYTES);
        let answer = exchange(
            at,
            format!("GET /metrics HTTP/1.1\r\nX-Long: {long}\r\n\r\n").as_bytes(),
        )
        .await;
        assert!(!answer.contains("up 1"), "{answer}");
        assert!(
            answer.is_empty() || answer.starts_with("HTTP/1.1 431"),
            "{answer}"
        );
    }
}
