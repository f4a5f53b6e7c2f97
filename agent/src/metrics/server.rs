//! The metrics port: `GET /metrics`, `/healthz`, `/readyz` over HTTP/1.1, nothing else.

use std::convert::Infallible;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{ALLOW, CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{MetricsSnapshot, render};
use crate::blocking;

/// Most connections served at once; more are closed on accept. Scrapers and probes need few.
pub const MAX_CONNECTIONS: usize = 64;
/// How long a client may take to send a request's headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a snapshot may take before the scrape gets a 500.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long in-flight requests may finish after shutdown.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How often accept errors are logged at most.
const ACCEPT_LOG_EVERY: Duration = Duration::from_secs(60);
/// Pause after an accept error (out of file descriptors, say), so the loop does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

const TEXT: &str = "text/plain; charset=utf-8";

struct State {
    snapshot: Arc<dyn Fn() -> MetricsSnapshot + Send + Sync>,
    ready: watch::Receiver<bool>,
}

/// Serves the metrics port on `listener` until `shutdown`, then lets in-flight requests finish
/// for a few seconds.
///
/// `snapshot` may block (it reads the ledger): it runs on the blocking pool. `/readyz` answers 200
/// while `ready` holds `true`.
pub async fn serve(
    listener: TcpListener,
    snapshot: Arc<dyn Fn() -> MetricsSnapshot + Send + Sync>,
    ready: watch::Receiver<bool>,
    shutdown: CancellationToken,
) {
    let state = Arc::new(State { snapshot, ready });
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut conns = JoinSet::new();
    let mut last_accept_log: Option<Instant> = None;
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "metrics port listening");
    }
    loop {
        let accepted = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                let now = Instant::now();
                if last_accept_log.is_none_or(|t| now.duration_since(t) >= ACCEPT_LOG_EVERY) {
                    tracing::warn!(error = %e, "metrics port: accept failed");
                    last_accept_log = Some(now);
                }
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                continue;
            }
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            tracing::debug!("metrics port: too many connections, one closed");
            continue;
        };
        let state = Arc::clone(&state);
        let shutdown = shutdown.clone();
        conns.spawn(async move {
            let _slot = slot;
            let service = service_fn(move |req| handle(req, Arc::clone(&state)));
            let mut conn = pin!(
                http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_READ_TIMEOUT)
                    .serve_connection(TokioIo::new(stream), service)
            );
            let done = tokio::select! {
                done = conn.as_mut() => done,
                _ = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = done {
                tracing::debug!(error = %e, "metrics connection ended");
            }
        });
    }
    drop(listener);
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::debug!("metrics port: connections still open after the drain timeout, closed");
    }
}

fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

async fn handle(
    req: Request<Incoming>,
    state: Arc<State>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path();
    if !matches!(path, "/metrics" | "/healthz" | "/readyz") {
        return Ok(respond(StatusCode::NOT_FOUND, TEXT, "not found\n"));
    }
    if req.method() != Method::GET {
        let mut response = respond(StatusCode::METHOD_NOT_ALLOWED, TEXT, "method not allowed\n");
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET"));
        return Ok(response);
    }
    Ok(match path {
        "/metrics" => {
            let snapshot = Arc::clone(&state.snapshot);
            match blocking::run("metrics snapshot", SNAPSHOT_TIMEOUT, move || {
                render(&snapshot())
            })
            .await
            {
                Ok(text) => respond(StatusCode::OK, super::CONTENT_TYPE, text),
                Err(e) => {
                    tracing::warn!(error = %e, "metrics snapshot failed");
                    respond(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        TEXT,
                        "metrics unavailable\n",
                    )
                }
            }
        }
        "/readyz" if *state.ready.borrow() => respond(StatusCode::OK, TEXT, "ready\n"),
        "/readyz" => respond(
            StatusCode::SERVICE_UNAVAILABLE,
            TEXT,
            "not ready: the agent is starting or shutting down\n",
        ),
        _ => respond(StatusCode::OK, TEXT, "ok\n"),
    })
}
