//! The accept loop: HTTP/1.1 connections served by hyper with a header-read timeout (which also
//! closes idle keep-alive connections), at most `max_connections` open at once, and shutdown
//! with a deadline. axum's own `serve` has none of these settings.

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, Response};
use axum::BoxError;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::{service_fn, Service as _};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::state::AppState;

/// Per-connection limits of the HTTP server and its shutdown deadline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// From the moment the server waits for a request (a new connection, or an idle keep-alive
    /// one after its last response) until that request's headers are complete; then the
    /// connection is closed.
    pub header_read_timeout: Duration,
    /// The whole request body must arrive within this (else 408). Responses, streamed or not,
    /// have no deadline: a long generation is never cut.
    pub body_read_timeout: Duration,
    /// Connections open at once. At the limit the server stops accepting (new connections wait
    /// in the kernel's backlog) until one closes.
    pub max_connections: usize,
    /// After the shutdown signal: how long running requests may take to finish before they are
    /// cancelled and `serve` returns.
    pub shutdown_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(60),
            max_connections: 512,
            shutdown_timeout: Duration::from_secs(30),
        }
    }
}

/// Serves until `shutdown` resolves, then drains: stops accepting, closes connections with no
/// request in progress (even one halfway through its headers), answers requests that still
/// arrive on open connections with 503, lets running ones finish until `shutdown_timeout`,
/// cancels the rest and returns.
pub async fn serve(
    state: Arc<AppState>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let limits = state.limits.connections.clone();
    let app = TowerToHyperService::new(crate::router(state.clone()));
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let (stop, stopping) = watch::channel(false);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        // A free slot first: at the limit, connections wait in the backlog, not in our fd table.
        let slot = tokio::select! {
            _ = &mut shutdown => break,
            slot = slots.clone().acquire_owned() => slot,
        };
        let Ok(slot) = slot else { break };
        let stream = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    accept_failed(e).await;
                    continue;
                }
            },
        };
        // SSE frames are small writes that must not wait for the previous one's ACK.
        let _ = stream.set_nodelay(true);
        let busy = InFlight::default();
        let conn = http.serve_connection(TokioIo::new(stream), busy.track(app.clone()));
        let stopping = stopping.clone();
        connections.spawn(async move {
            drive(conn, busy, stopping).await;
            drop(slot);
        });
        while connections.try_join_next().is_some() {}
    }
    drop(listener);
    state.draining.store(true, Ordering::Relaxed);
    tracing::info!(
        connections = connections.len(),
        deadline_s = limits.shutdown_timeout.as_secs_f64(),
        "draining: refusing new requests, finishing running ones"
    );
    let _ = stop.send(true);
    let deadline = Instant::now() + limits.shutdown_timeout;
    let drained = tokio::time::timeout_at(deadline, async {
        while connections.join_next().await.is_some() {}
        // In-flight generations hold admission permits until their response is complete.
        let _ = state.admission.acquire_many(state.limits.max_concurrent as u32).await;
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            connections = connections.len(),
            "shutdown deadline passed: cancelling the requests still running"
        );
    }
    // Aborting a connection drops its response, which cancels its generation in the engine.
    connections.shutdown().await;
    Ok(())
}

type Service = TowerToHyperService<axum::Router>;

/// Serves one connection; once `stopping`, closes it at once when no request is in progress, or
/// else after the current response (hyper's graceful shutdown: no keep-alive).
async fn drive<S>(conn: http1::Connection<TokioIo<TcpStream>, S>, busy: InFlight, mut stopping: watch::Receiver<bool>)
where
    S: hyper::service::HttpService<Incoming, ResBody = Body>,
    S::Error: Into<BoxError>,
{
    tokio::pin!(conn);
    let ended = tokio::select! {
        ended = conn.as_mut() => Some(ended),
        _ = stopping.wait_for(|s| *s) => None,
    };
    let ended = match ended {
        Some(ended) => ended,
        None if busy.is_idle() => return,
        None => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = ended {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

/// Requests of one connection whose response has not been sent whole yet.
#[derive(Clone, Default)]
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn is_idle(&self) -> bool {
        self.0.load(Ordering::Acquire) == 0
    }

    /// `app`, counting each request from its headers until its response body is dropped (sent,
    /// or abandoned with the connection).
    fn track(
        &self,
        app: Service,
    ) -> impl hyper::service::Service<
        Request<Incoming>,
        Response = Response<Body>,
        Error = Infallible,
        Future = impl Future<Output = Result<Response<Body>, Infallible>> + Send,
    > {
        let busy = self.clone();
        service_fn(move |req: Request<Incoming>| {
            let guard = Busy::enter(&busy.0);
            let response = app.call(req);
            async move {
                let response = response.await?;
                Ok(response.map(|body| {
                    Body::new(body.map_frame(move |frame| {
                        let _ = &guard;
                        frame
                    }))
                }))
            }
        })
    }
}

struct Busy(Arc<AtomicUsize>);

impl Busy {
    fn enter(count: &Arc<AtomicUsize>) -> Busy {
        count.fetch_add(1, Ordering::AcqRel);
        Busy(count.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A failed accept: a client that gave up is nothing; anything else (such as running out of file
/// descriptors) is logged and retried after a pause instead of spinning.
async fn accept_failed(e: std::io::Error) {
    use std::io::ErrorKind::*;
    if matches!(e.kind(), ConnectionAborted | ConnectionReset | ConnectionRefused) {
        return;
    }
    tracing::error!(error = %e, "accept failed; retrying in 1 s");
    tokio::time::sleep(Duration::from_secs(1)).await;
}
