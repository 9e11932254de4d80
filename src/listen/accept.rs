//! The accept loop every listener of ours runs (clawkerd, agent API, admin
//! API, and the CP's plain-HTTP metrics endpoint): TCP accept → cap check →
//! handshake with a deadline (TLS, or [`Plain`] for none), each handshake
//! on its own task, so handshakes run concurrently and a silent peer cannot
//! hold the loop.
//!
//! What a hostile peer can cause here, and what it costs us:
//! - a connection over a cap: refused at once with an RST (zero linger, so
//!   no `TIME_WAIT` piles up on our side), before any TLS work; counted in
//!   `clawker_listener_refused_total{listener,reason}`, logged rate-limited;
//! - a refused or timed-out handshake: the slot is freed, the line is
//!   logged rate-limited under the listener's `reject_event`;
//! - `accept()` failing (EMFILE when the process is out of descriptors):
//!   the loop backs off exponentially (5 ms → 1 s) instead of spinning, and
//!   logs rate-limited. The pending connection stays in the kernel's
//!   backlog until a descriptor frees up.
//!
//! Every [`log_limit`](crate::log_limit) summary is flushed from here every
//! [`FLUSH_EVERY`], so suppressed counts are reported even after a flood
//! stops.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

use super::ListenerLimits;
use super::conn::GuardedConn;
use super::limiter::{ConnLimiter, Permit};
use crate::log_limit;

/// How often the loop reports suppressed log lines.
pub const FLUSH_EVERY: Duration = Duration::from_secs(10);
/// Back-off bounds after a failed `accept()`.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(5);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// How one listener accepts.
#[derive(Debug, Clone)]
pub struct AcceptConfig {
    /// Listener name (metric label, log field): `agent_api`, `admin_api`,
    /// `clawkerd`.
    pub listener: &'static str,
    /// Log event of a refused or timed-out TLS handshake.
    pub reject_event: &'static str,
    /// Log event of a connection refused over a cap.
    pub refused_event: &'static str,
    pub limits: ListenerLimits,
    /// A source exempt from the caps (clawkerd: the CP's address).
    pub reserved: Option<IpAddr>,
}

/// What a connection goes through after the cap check and before it is
/// handed to the server: the TLS handshake, or nothing ([`Plain`]).
pub trait Handshake: Clone + Send + Sync + 'static {
    type Stream: Send + 'static;
    fn handshake(&self, sock: TcpStream) -> BoxFuture<'static, std::io::Result<Self::Stream>>;
}

impl Handshake for TlsAcceptor {
    type Stream = TlsStream<TcpStream>;
    fn handshake(&self, sock: TcpStream) -> BoxFuture<'static, std::io::Result<Self::Stream>> {
        Box::pin(self.accept(sock))
    }
}

/// No handshake: a plain TCP listener (the CP's loopback metrics endpoint)
/// still gets the caps and the refusal accounting.
#[derive(Debug, Clone, Copy)]
pub struct Plain;

impl Handshake for Plain {
    type Stream = TcpStream;
    fn handshake(&self, sock: TcpStream) -> BoxFuture<'static, std::io::Result<TcpStream>> {
        Box::pin(std::future::ready(Ok(sock)))
    }
}

/// A connection that completed its handshake, with its cap slot.
pub struct Accepted<S = TlsStream<TcpStream>> {
    pub stream: S,
    pub peer: SocketAddr,
    permit: Permit,
    idle_timeout: Duration,
}

impl<S> Accepted<S> {
    /// The stream, guarded: holds the slot and closes when idle.
    pub fn into_conn(self) -> GuardedConn<S> {
        GuardedConn::new(self.stream, self.permit, self.idle_timeout)
    }

    /// Like [`Accepted::into_conn`], over `f(stream, peer)` (clawkerd wraps
    /// the stream to expose the CP's verified identity).
    pub fn map<IO>(self, f: impl FnOnce(S, SocketAddr) -> IO) -> GuardedConn<IO> {
        GuardedConn::new(f(self.stream, self.peer), self.permit, self.idle_timeout)
    }

    /// The stream and its slot, for a server that bounds idle time itself
    /// (hyper's HTTP/1 header-read timeout, see [`super::http1`]). The
    /// slot is freed when the permit drops.
    pub fn into_parts(self) -> (S, Permit) {
        (self.stream, self.permit)
    }
}

/// The listener's connection table, for tests and diagnostics.
pub type Table = Arc<ConnLimiter>;

/// Runs the loop until `shutdown` fires or the receiver is dropped.
/// Returns the receiver of accepted connections and the listener's
/// connection table.
pub fn accept_loop<H: Handshake>(
    tcp: TcpListener,
    acceptor: H,
    cfg: AcceptConfig,
    shutdown: CancellationToken,
) -> (tokio::sync::mpsc::Receiver<Accepted<H::Stream>>, Table) {
    let (tx, rx) = tokio::sync::mpsc::channel::<Accepted<H::Stream>>(64);
    let limits = cfg.limits;
    let table = ConnLimiter::new(
        limits.max_connections,
        limits.max_connections_per_source,
        cfg.reserved,
    );
    let limiter = table.clone();
    tokio::spawn(async move {
        let mut backoff = ACCEPT_BACKOFF_MIN;
        let mut flush = tokio::time::interval(FLUSH_EVERY);
        flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let (sock, peer) = tokio::select! {
                r = tcp.accept() => match r {
                    Ok(x) => {
                        backoff = ACCEPT_BACKOFF_MIN;
                        x
                    }
                    Err(error) => {
                        metrics::counter!("clawker_listener_accept_failed_total", "listener" => cfg.listener).increment(1);
                        if log_limit::admit("accept_failed") {
                            tracing::warn!(event = "accept_failed", listener = cfg.listener, %error, retry_in_ms = backoff.as_millis() as u64);
                        }
                        tokio::select! {
                            _ = tokio::time::sleep(backoff) => {}
                            _ = shutdown.cancelled() => return,
                        }
                        backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                        continue;
                    }
                },
                _ = flush.tick() => {
                    log_limit::flush();
                    continue;
                }
                _ = shutdown.cancelled() => return,
                // The server stopped consuming connections.
                _ = tx.closed() => return,
            };
            let permit = match limiter.try_acquire(peer.ip()) {
                Ok(p) => p,
                Err(refusal) => {
                    metrics::counter!(
                        "clawker_listener_refused_total",
                        "listener" => cfg.listener,
                        "reason" => refusal.as_str()
                    )
                    .increment(1);
                    if log_limit::admit(cfg.refused_event) {
                        tracing::warn!(
                            event = cfg.refused_event,
                            listener = cfg.listener,
                            %peer,
                            reason = refusal.as_str(),
                            error = %refusal,
                            "connection refused before the handshake"
                        );
                    }
                    // RST, not FIN: the refused peer gets an immediate
                    // error and no TIME_WAIT entry stays behind.
                    let _ = sock.set_zero_linger();
                    drop(sock);
                    continue;
                }
            };
            let _ = sock.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            let (listener, reject_event) = (cfg.listener, cfg.reject_event);
            tokio::spawn(async move {
                let error =
                    match tokio::time::timeout(limits.handshake_timeout, acceptor.handshake(sock))
                        .await
                    {
                        Ok(Ok(stream)) => {
                            let _ = tx
                                .send(Accepted {
                                    stream,
                                    peer,
                                    permit,
                                    idle_timeout: limits.idle_timeout,
                                })
                                .await;
                            return;
                        }
                        Ok(Err(error)) => crate::peer_text::bound(error.to_string()),
                        Err(_) => "handshake timeout".to_owned(),
                    };
                drop(permit);
                metrics::counter!("clawker_listener_handshake_failed_total", "listener" => listener).increment(1);
                if log_limit::admit(reject_event) {
                    tracing::warn!(
                        event = reject_event,
                        listener,
                        %peer,
                        %error,
                        "peer refused in the TLS handshake"
                    );
                }
            });
        }
    });
    (rx, table)
}
