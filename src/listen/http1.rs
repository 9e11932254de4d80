//! Plain HTTP/1.1 under the listener bounds: the CP's `/metrics`,
//! `/healthz` and `/readyz` endpoint.
//!
//! It is loopback-only and speaks no TLS, but it is still a socket. Before
//! this module it was a bare `axum::serve`, with no cap on connections and
//! no timeout: a local client could open connections until the CP ran out
//! of the file descriptors that sessions and Docker calls need, or hold
//! them open forever with half a request. Now it runs the same accept
//! loop as every other listener ([`super::accept_loop`] with
//! [`super::accept::Plain`]):
//!
//! - connection caps, refused with an RST, counted and logged rate-limited;
//! - hyper's HTTP/1 header-read timeout set to the listener's
//!   `idle_timeout`. hyper arms it whenever the connection waits for a
//!   request head, both on a fresh connection and between keep-alive
//!   requests, so it is the idle timeout and the slowloris bound in one. An
//!   idle connection, or one whose request head does not arrive complete
//!   in time, is closed;
//! - on shutdown no new connections are taken, and each open one finishes
//!   its request in flight and closes (hyper's graceful shutdown).
//!
//! Request bodies are not read: every route is a `GET`. Not bounded by
//! time: a client that stops reading a response it asked for holds its
//! slot until it goes away (the responses are small, so the kernel's
//! socket buffer usually takes all of it); the cap bounds how many such
//! clients there can be.

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::accept::{AcceptConfig, Plain, Table, accept_loop};

/// Serves `app` on `tcp` until `shutdown` fires. Returns the server task
/// (it ends once no new connections are taken) and the listener's
/// connection table.
pub fn serve(
    tcp: TcpListener,
    app: Router,
    cfg: AcceptConfig,
    shutdown: CancellationToken,
) -> (JoinHandle<()>, Table) {
    let idle = cfg.limits.idle_timeout;
    let listener = cfg.listener;
    let (mut rx, table) = accept_loop(tcp, Plain, cfg, shutdown.clone());
    let task = tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = rx.recv() => match a {
                    Some(a) => a,
                    None => return,
                },
                () = shutdown.cancelled() => return,
            };
            let peer = accepted.peer;
            let (stream, permit) = accepted.into_parts();
            let service = TowerToHyperService::new(app.clone());
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                // The slot is held for as long as the connection lives.
                let _permit = permit;
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(idle)
                    .keep_alive(true)
                    .serve_connection(TokioIo::new(stream), service);
                let mut conn = std::pin::pin!(conn);
                let result = tokio::select! {
                    r = conn.as_mut() => r,
                    () = shutdown.cancelled() => {
                        conn.as_mut().graceful_shutdown();
                        conn.await
                    }
                };
                if let Err(error) = result {
                    // Timeouts and resets are a client's doing, not ours.
                    tracing::debug!(event = "http_connection_ended", listener, %peer, %error);
                }
            });
        }
    });
    (task, table)
}
