//! Serving HTTP/1.1 connections, with the limits a server on the open internet needs and
//! `axum::serve` does not set: a deadline for a request's headers (which also ends idle
//! keep-alive connections), a deadline for its body, a cap on open connections, and a drain at
//! shutdown that ends.
//!
//! A client that opens connections and sends its headers or body a byte at a time would
//! otherwise hold a connection forever, and a graceful shutdown would wait for it forever.
//!
//! The body deadline is [`TimedBody`]: a body must arrive in full within `body_timeout` of its
//! headers, except an output upload (`PUT /api/v1/worker/…`, up to gigabytes), which only has
//! to keep moving: no wait for its next bytes may last `body_timeout`. Other bodies are at most
//! `max_body_bytes` (a larger declared length is refused before a byte is read), so the one
//! deadline bounds how long any of them holds a connection. The handler that reads a body
//! turns the timeout into `408 request_timeout` ([`body_timed_out`]) and closes the connection.

use std::future::Future;
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::Router;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tracing::{debug, error, warn};

/// The connection limits (`[server]` settings).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Longest a client may take to send a request's headers, counted from the connection's
    /// start or the end of its previous response.
    pub header_timeout: Duration,
    /// Longest a request's body may take after its headers (an upload's: its longest pause).
    pub body_timeout: Duration,
    /// Connections open at once; further ones wait in the kernel's accept queue.
    pub max_connections: usize,
    /// After shutdown is asked for, how long requests in flight may finish before their
    /// connections are closed.
    pub drain: Duration,
}

/// Serves `router` on `listener` until `shutdown` resolves, then stops accepting, lets requests
/// in flight finish for at most `limits.drain`, and closes what is left. Returns when the
/// shutdown began, so the phases after it share one deadline.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) -> Instant {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    // Dropping the sender tells every connection to finish its request and close.
    let (closing_tx, closing_rx) = watch::channel(());
    let mut connections = JoinSet::new();
    let mut shutdown = pin!(shutdown);
    loop {
        // Finished connections' entries would otherwise pile up in the set.
        while connections.try_join_next().is_some() {}
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break, // the semaphore is never closed
            },
            () = &mut shutdown => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    accept_error(e).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let router = router.clone();
        let body_timeout = limits.body_timeout;
        // A plain function, not a boxed layer: the only per-request cost is reading the clock.
        let service = TowerToHyperService::new(tower::util::MapRequest::new(
            router,
            move |req: hyper::Request<Incoming>| {
                let idle_only = is_upload(&req);
                req.map(|body| TimedBody::new(body, body_timeout, idle_only))
            },
        ));
        let mut closing = closing_rx.clone();
        connections.spawn(async move {
            let _permit = permit;
            let mut builder = http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                // hyper's default (~400 KB per connection) times max_connections clients that
                // never finish their headers would be gigabytes.
                .max_buf_size(64 * 1024);
            let mut conn = pin!(builder.serve_connection(TokioIo::new(stream), service));
            tokio::select! {
                result = conn.as_mut() => {
                    if let Err(e) = result {
                        debug!(error = %e, "connection ended with an error");
                    }
                }
                _ = closing.changed() => {
                    conn.as_mut().graceful_shutdown();
                    if let Err(e) = conn.await {
                        debug!(error = %e, "connection ended with an error while draining");
                    }
                }
            }
        });
    }
    let stopping = Instant::now();
    drop(listener);
    drop(closing_tx);
    let drained = tokio::time::timeout(limits.drain, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        warn!(
            open = connections.len(),
            "connections still busy after the drain period; closing them"
        );
        connections.shutdown().await;
    }
    stopping
}

/// Errors of `accept` that concern one connection are ignored; others (out of file
/// descriptors) are logged and the loop pauses, as hyper's own server did, rather than spin.
async fn accept_error(e: std::io::Error) {
    use std::io::ErrorKind::*;
    if matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    ) {
        return;
    }
    error!(error = %e, "cannot accept connections; pausing for a second");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// Output uploads stream up to `max_upload_bytes` (gigabytes) to disk as they come, so they get
/// the pause limit rather than a deadline for the whole body.
fn is_upload(req: &hyper::Request<Incoming>) -> bool {
    req.method() == hyper::Method::PUT && req.uri().path().starts_with("/api/v1/worker/")
}

/// The body timeout, if `e` or any error under it is a body that did not arrive in time (the
/// extractors wrap the body's error in their own).
pub fn body_timed_out(e: &(dyn std::error::Error + 'static)) -> Option<Duration> {
    let mut next = Some(e);
    while let Some(e) = next {
        if let Some(TimedBodyError::TimedOut(timeout)) = e.downcast_ref::<TimedBodyError>() {
            return Some(*timeout);
        }
        next = e.source();
    }
    None
}

/// Why a [`TimedBody`] failed: its connection, or its client's slowness.
#[derive(Debug, thiserror::Error)]
pub enum TimedBodyError {
    #[error(transparent)]
    Read(hyper::Error),
    #[error("the request body did not arrive within {0:?}")]
    TimedOut(Duration),
}

/// A request body with a deadline: all of it within `timeout` of the headers, or (an upload)
/// no wait for more longer than `timeout`. The timer is made only when the body is waited on,
/// so a body that came with its headers, as most do, costs a clock read.
pub struct TimedBody {
    inner: Incoming,
    timeout: Duration,
    /// The whole body's deadline, or None for the pause limit.
    deadline: Option<tokio::time::Instant>,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Bytes came since the timer was set: a pause limit starts again at the next wait.
    moved: bool,
}

impl TimedBody {
    fn new(inner: Incoming, timeout: Duration, idle_only: bool) -> Self {
        TimedBody {
            inner,
            timeout,
            deadline: (!idle_only).then(|| tokio::time::Instant::now() + timeout),
            timer: None,
            moved: false,
        }
    }
}

impl Body for TimedBody {
    type Data = Bytes;
    type Error = TimedBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, TimedBodyError>>> {
        let this = self.get_mut();
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            this.moved = true;
            return Poll::Ready(frame.map(|f| f.map_err(TimedBodyError::Read)));
        }
        let (deadline, timeout) = (this.deadline, this.timeout);
        let due = || deadline.unwrap_or_else(|| tokio::time::Instant::now() + timeout);
        match &mut this.timer {
            Some(timer) if this.moved && this.deadline.is_none() => timer.as_mut().reset(due()),
            Some(_) => {}
            None => this.timer = Some(Box::pin(tokio::time::sleep_until(due()))),
        }
        this.moved = false;
        if let Some(timer) = &mut this.timer {
            ready!(timer.as_mut().poll(cx));
        }
        Poll::Ready(Some(Err(TimedBodyError::TimedOut(this.timeout))))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
