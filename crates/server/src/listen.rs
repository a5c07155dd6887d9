//! Accepting connections, with the limits `axum::serve` cannot set: a cap
//! on open connections and hyper's header-read timeout (which also closes
//! a keep-alive connection idle that long), so neither a slowloris client
//! trickling headers nor a crowd of idle sockets can hold the server. The
//! body must arrive within the body timeout (read by `api::RawBody`), and a
//! client that stops reading is disconnected after the write timeout.
//!
//! The loop is ours because axum gives no access to hyper's connection
//! builder; everything in it is hyper's and hyper-util's own machinery.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio_io_timeout::TimeoutStream;

/// What a connection may take.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    /// Connections open at once; one more is closed as it arrives.
    pub(crate) max_connections: usize,
    /// A request's headers must arrive within this long, and an idle
    /// keep-alive connection is closed after it.
    pub(crate) header_timeout: Duration,
    /// A write the client does not take (it stopped reading) fails after
    /// this long: the connection closes, its request is aborted.
    pub(crate) write_timeout: Duration,
}

/// Serves `app` until `stop` turns true; then stops accepting, lets the
/// open connections finish their requests, and returns.
pub(crate) async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let graceful = GracefulShutdown::new();
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true);
    let mut stopping = std::pin::pin!(async move {
        let _ = stop.wait_for(|s| *s).await;
    });
    loop {
        let (tcp, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: wait a little
                    // instead of spinning on the error.
                    tracing::warn!("cannot accept a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut stopping => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            // At the cap: closed at once (the client sees the connection
            // reset and may retry), never queued behind the others.
            tracing::warn!(
                max = limits.max_connections,
                "connection refused: too many open connections"
            );
            drop(tcp);
            continue;
        };
        // Streamed tokens are small writes: without TCP_NODELAY, Nagle's
        // algorithm holds each behind the previous one's (delayed) ACK.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::warn!("cannot set TCP_NODELAY: {e}");
        }
        // A client that stops reading would leave hyper waiting to write
        // forever, holding the connection, the request and what it buffered.
        let mut io = TimeoutStream::new(tcp);
        io.set_write_timeout(Some(limits.write_timeout));
        let conn = builder.serve_connection(
            TokioIo::new(Box::pin(io)),
            TowerToHyperService::new(app.clone()),
        );
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            // Errors here are the client's (reset, timeout): nothing to do.
            let _ = conn.await;
            drop(slot);
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}
