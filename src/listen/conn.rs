//! An accepted connection with its bounds attached: the cap slot it holds
//! and its idle deadline.
//!
//! Idle means *no request in flight*, not *no bytes*: a live but hostile
//! HTTP/2 peer answers keepalive PINGs forever, and a slowloris client
//! sends a header byte every few seconds. [`Activity`] counts the requests
//! in flight on the connection ([`super::in_flight`] opens and closes
//! them); once the count has been zero for `idle_timeout`, the next read
//! fails with `TimedOut` and the server drops the connection. The check
//! sits in `poll_read` because a server always has a read pending on a
//! connection it is not writing to; [`InFlight`]'s drop wakes that read so
//! the deadline is armed even when nothing arrives.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};
use tonic::transport::server::Connected;

use super::limiter::Permit;

#[derive(Debug)]
struct State {
    in_flight: usize,
    /// When the count last dropped to zero (or the connection opened).
    idle_since: Instant,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    reader: AtomicWaker,
}

/// The requests in flight on one connection. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Activity(Arc<Shared>);

impl Activity {
    fn new() -> Self {
        Self(Arc::new(Shared {
            state: Mutex::new(State {
                in_flight: 0,
                idle_since: Instant::now(),
            }),
            reader: AtomicWaker::new(),
        }))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // Critical sections never panic; recover rather than cascade.
        self.0.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks one request in flight until the returned guard drops.
    pub fn begin(&self) -> InFlight {
        self.state().in_flight += 1;
        InFlight(self.clone())
    }

    /// `Some(since)` when no request is in flight.
    fn idle_since(&self) -> Option<Instant> {
        let s = self.state();
        (s.in_flight == 0).then_some(s.idle_since)
    }
}

/// One request in flight; dropping it ends the request.
#[derive(Debug)]
pub struct InFlight(Activity);

impl Drop for InFlight {
    fn drop(&mut self) {
        let now_idle = {
            let mut s = self.0.state();
            s.in_flight = s.in_flight.saturating_sub(1);
            if s.in_flight == 0 {
                s.idle_since = Instant::now();
            }
            s.in_flight == 0
        };
        if now_idle {
            // Arm the idle deadline in the connection's pending read.
            self.0.0.reader.wake();
        }
    }
}

/// What tonic puts in each request's extensions for a [`GuardedConn`]: the
/// inner connection's info (which [`super::InFlightLayer`] unwraps again,
/// so handlers see exactly what they saw before) and the [`Activity`].
#[derive(Debug, Clone)]
pub struct ConnInfo<I> {
    pub inner: I,
    pub activity: Activity,
}

/// An accepted connection holding its cap slot, closed when idle too long.
pub struct GuardedConn<IO> {
    io: IO,
    activity: Activity,
    idle_timeout: Duration,
    idle: Pin<Box<Sleep>>,
    armed_for: Instant,
    _permit: Permit,
}

impl<IO> GuardedConn<IO> {
    /// Must be called within a tokio runtime (the deadline is a timer).
    pub(crate) fn new(io: IO, permit: Permit, idle_timeout: Duration) -> Self {
        let activity = Activity::new();
        let deadline = Instant::now() + idle_timeout;
        Self {
            io,
            activity,
            idle_timeout,
            idle: Box::pin(tokio::time::sleep_until(deadline)),
            armed_for: deadline,
            _permit: permit,
        }
    }

    /// The request counter of this connection.
    pub fn activity(&self) -> &Activity {
        &self.activity
    }

    pub fn get_ref(&self) -> &IO {
        &self.io
    }

    /// Whether the idle deadline has passed; registers `cx` for both the
    /// deadline and the end of the last request.
    fn idle_expired(&mut self, cx: &mut Context<'_>) -> bool {
        self.activity.0.reader.register(cx.waker());
        let Some(since) = self.activity.idle_since() else {
            return false;
        };
        let deadline = since + self.idle_timeout;
        if deadline != self.armed_for {
            self.idle.as_mut().reset(deadline);
            self.armed_for = deadline;
        }
        self.idle.as_mut().poll(cx).is_ready()
    }
}

impl<IO: Connected> Connected for GuardedConn<IO> {
    type ConnectInfo = ConnInfo<IO::ConnectInfo>;

    fn connect_info(&self) -> Self::ConnectInfo {
        ConnInfo {
            inner: self.io.connect_info(),
            activity: self.activity.clone(),
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for GuardedConn<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.idle_expired(cx) {
            return Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "idle timeout: no request in flight",
            )));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for GuardedConn<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::listen::ConnLimiter;
    use tokio::io::AsyncReadExt;

    fn conn(
        idle: Duration,
    ) -> (
        GuardedConn<tokio::io::DuplexStream>,
        tokio::io::DuplexStream,
    ) {
        let (a, b) = tokio::io::duplex(64);
        let permit = ConnLimiter::new(1, 1, None)
            .try_acquire("10.0.0.1".parse().unwrap())
            .unwrap();
        (GuardedConn::new(a, permit, idle), b)
    }

    // Real time, short bounds (tokio's paused clock needs a feature the
    // workspace does not enable); the checks are orderings, with slack.
    #[tokio::test]
    async fn a_connection_without_requests_times_out() {
        let (mut c, _peer) = conn(Duration::from_millis(200));
        let t0 = Instant::now();
        let mut buf = [0u8; 8];
        let e = c.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        assert!(t0.elapsed() >= Duration::from_millis(200));
    }

    #[tokio::test]
    async fn bytes_do_not_count_as_activity_but_requests_do() {
        let idle = Duration::from_millis(300);
        let (mut c, mut peer) = conn(idle);
        let act = c.activity().clone();
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 8];
            loop {
                match c.read(&mut buf).await {
                    Ok(0) => return None,
                    Ok(_) => continue,
                    Err(e) => return Some((e.kind(), Instant::now())),
                }
            }
        });
        // A trickle of bytes (a slowloris client) keeps nothing alive.
        let trickle = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for _ in 0..1000 {
                tokio::time::sleep(Duration::from_millis(20)).await;
                if peer.write_all(b"x").await.is_err() {
                    break;
                }
            }
            peer
        });
        // A request in flight from 100 ms to 1 s (three idle timeouts)
        // holds the connection open; the idle clock restarts when it ends.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let req = act.begin();
        tokio::time::sleep(Duration::from_millis(900)).await;
        assert!(!reader.is_finished(), "closed with a request in flight");
        let ended = Instant::now();
        drop(req);
        let (kind, at) = reader.await.unwrap().unwrap();
        assert_eq!(kind, std::io::ErrorKind::TimedOut);
        assert!(at - ended >= idle, "{:?}", at - ended);
        trickle.abort();
    }
}
