//! Serving HTTP/1.1 connections, with the limits a server on the open internet needs and
//! `axum::serve` does not set: a deadline for a request's headers (which also ends idle
//! keep-alive connections), a cap on open connections, and a drain at shutdown that ends.
//!
//! A client that opens connections and sends its headers a byte at a time would otherwise hold
//! a connection forever, and a graceful shutdown would wait for it forever.

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
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
        let service = TowerToHyperService::new(router.clone());
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
