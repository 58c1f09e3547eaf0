//! Serving the router over TCP with the limits a public server needs.
//!
//! `axum::serve` sets no header timeout, no idle timeout and no connection cap, so a stranger
//! can hold hundreds of connections open with a slow header or a silent partial body. This loop
//! (hyper's connection builder, as axum's own "serve with hyper" example does) adds:
//! - a **connection cap**: past it, new connections are closed at once (counted, logged once a
//!   minute at most), so the process keeps its file descriptors and memory;
//! - a **header deadline**: a request head must arrive within [`ServeConfig::header_timeout`];
//! - an **idle deadline**: a connection with no request in flight and no bytes moving for
//!   [`ServeConfig::idle_timeout`] is closed (a long streamed answer is not idle);
//! - the **body deadline** lives in the router (each piece of a body within a bound);
//! - a **graceful drain** on shutdown: stop accepting, let in-flight requests finish (at most
//!   [`ServeConfig::drain`]), then return.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use bytes::Bytes;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// The server's connection limits.
#[derive(Debug, Clone, Copy)]
pub struct ServeConfig {
    /// Connections open at once; more are closed on accept.
    pub max_connections: usize,
    /// Longest a request head may take to arrive.
    pub header_timeout: Duration,
    /// Longest a connection may sit with nothing in flight and nothing moving.
    pub idle_timeout: Duration,
    /// Longest to wait for in-flight requests at shutdown.
    pub drain: Duration,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            drain: Duration::from_secs(30),
        }
    }
}

/// What a connection is doing: requests in flight and when bytes last moved.
struct Activity {
    started: Instant,
    last_io_ms: AtomicU64,
    in_flight: AtomicUsize,
}

impl Activity {
    fn new() -> Self {
        Self { started: Instant::now(), last_io_ms: AtomicU64::new(0), in_flight: AtomicUsize::new(0) }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_io_ms.store(ms, Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return Duration::ZERO;
        }
        let last = Duration::from_millis(self.last_io_ms.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(last)
    }
}

/// A request in flight on a connection, until its answer's body ends.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn new(a: &Arc<Activity>) -> Self {
        a.in_flight.fetch_add(1, Ordering::AcqRel);
        Self(a.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.0.touch();
    }
}

/// An answer's body that keeps its request counted in flight until it ends.
struct Tracked {
    inner: Body,
    _in_flight: InFlight,
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A socket that notes when bytes move.
struct Watched<T> {
    inner: T,
    activity: Arc<Activity>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Serves `app` on `listener` until `shutdown` resolves, then drains.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    config: ServeConfig,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let slots = Arc::new(Semaphore::new(config.max_connections.max(1)));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(config.header_timeout)
        // heads up to 1 MiB reach the router, which answers past MAX_HEADER_BYTES with JSON
        .max_buf_size(1 << 20)
        .keep_alive(true);
    builder.http2().timer(TokioTimer::new()).keep_alive_interval(Some(Duration::from_secs(30)));
    let mut refused = 0u64;
    let mut refused_logged = Instant::now().checked_sub(Duration::from_secs(60)).unwrap_or_else(Instant::now);
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((s, _)) => s,
                Err(e) => {
                    // out of descriptors and the like: back off instead of spinning
                    tracing::warn!("accepting a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            refused += 1;
            if refused_logged.elapsed() >= Duration::from_secs(60) {
                tracing::warn!(
                    max = config.max_connections,
                    refused,
                    "at the connection cap: closing new connections"
                );
                refused_logged = Instant::now();
            }
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let activity = Arc::new(Activity::new());
        let io = TokioIo::new(Watched { inner: stream, activity: activity.clone() });
        let (svc, act) = (app.clone(), activity.clone());
        let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
            let in_flight = InFlight::new(&act);
            let svc = svc.clone();
            async move {
                let resp = tower::ServiceExt::oneshot(svc, req.map(Body::new)).await;
                resp.map(|r| r.map(|b| Body::new(Tracked { inner: b, _in_flight: in_flight })))
            }
        });
        let conn = graceful.watch(builder.serve_connection(io, service).into_owned());
        let idle = config.idle_timeout;
        tokio::spawn(async move {
            let _slot = slot;
            tokio::pin!(conn);
            loop {
                tokio::select! {
                    _ = conn.as_mut() => break,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {
                        if activity.idle_for() > idle {
                            // dropping the connection closes the socket
                            break;
                        }
                    }
                }
            }
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(config.drain) => {
            tracing::warn!(drain_secs = config.drain.as_secs(), "requests still in flight after the drain deadline; stopping anyway");
        }
    }
    Ok(())
}
