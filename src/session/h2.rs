//! The session's HTTP/2 client: one hyper `http2` connection per agent,
//! driven by its own task, with tonic's `Grpc` on top.
//!
//! Why not tonic's `Channel`: a `Channel` is a load-balancing, reconnecting
//! client with a tower `Buffer` in front (its own worker task and a 9 KB
//! channel block per connection). A session needs none of that — it holds
//! exactly one long-lived stream on exactly one connection and reconnects
//! itself — so the `Buffer` was pure per-session memory (see the heap
//! profile in BENCHMARKS.md, "Memory per idle session").

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};

/// HTTP/2 settings of a session connection.
#[derive(Debug, Clone, Copy)]
pub struct H2Settings {
    /// Per-stream receive window: bulk stdout must not stall on
    /// WINDOW_UPDATE round trips (the default 64 KiB window caps a stream at
    /// 64 KiB per round trip).
    pub stream_window: u32,
    pub connection_window: u32,
    /// Largest DATA frame we accept (SETTINGS_MAX_FRAME_SIZE): fewer frame
    /// headers and wakeups per MB of stdout.
    pub max_frame_size: u32,
    pub keep_alive_interval: Duration,
    pub keep_alive_timeout: Duration,
}

impl Default for H2Settings {
    fn default() -> Self {
        Self {
            stream_window: 8 << 20,
            connection_window: 16 << 20,
            max_frame_size: 1 << 20,
            // The CP is the side that must notice a silent peer (a
            // container's death arrives as a runtime event in well under a
            // second; this is for partitions): 60 s + 10 s worst case. A
            // ping costs the CP ~37 µs per session (TLS both ways, timers):
            // pings are an idle CP's whole CPU at 10,000 sessions
            // (BENCHMARKS.md).
            keep_alive_interval: Duration::from_secs(60),
            keep_alive_timeout: Duration::from_secs(10),
        }
    }
}

/// A cheap-clone handle to one HTTP/2 connection; a tower service tonic's
/// generated client runs on.
///
/// Lifetimes: the request dispatcher (hyper's task and its channel) lives
/// as long as some `H2Client` does, so a session drops its client once the
/// Session stream is open. The connection itself (hyper's connection task)
/// lives while a stream is open on it: it starts a graceful shutdown when
/// the last client and the last request body are gone, and ends when the
/// peer's side ends too.
#[derive(Clone)]
pub struct H2Client {
    send: http2::SendRequest<tonic::body::Body>,
}

/// HTTP/2 handshake over an established (TLS) stream; spawns the request
/// dispatcher, which ends when the last [`H2Client`] is dropped.
pub async fn handshake<T>(io: T, s: &H2Settings) -> Result<H2Client, hyper::Error>
where
    T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (send, conn) = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .initial_stream_window_size(s.stream_window)
        .initial_connection_window_size(s.connection_window)
        .max_frame_size(s.max_frame_size)
        .keep_alive_interval(s.keep_alive_interval)
        .keep_alive_timeout(s.keep_alive_timeout)
        .keep_alive_while_idle(true)
        .handshake(hyper_util::rt::TokioIo::new(io))
        .await?;
    tokio::spawn(async move {
        if let Err(error) = conn.await {
            tracing::debug!(event = "agentdial_h2_connection_ended", %error, "session connection ended");
        }
    });
    Ok(H2Client { send })
}

impl tower_service::Service<http::Request<tonic::body::Body>> for H2Client {
    type Response = http::Response<Incoming>;
    type Error = hyper::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.send.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        Box::pin(self.send.send_request(req))
    }
}
