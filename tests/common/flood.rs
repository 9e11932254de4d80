//! A hostile agent's traffic, sent from inside that agent's network
//! namespace, so it carries the agent's source address exactly as real
//! traffic from the container would.
//!
//! - [`in_netns`]: a thread that joins a container's network namespace
//!   (`setns`) and runs a current-thread tokio runtime there: every socket
//!   it opens belongs to the container's namespace.
//! - [`idle_tls`], [`slowloris`], [`handshake_storm`]: reconnecting
//!   workers (each opens one connection at a time, waits until the server
//!   closes it, pauses, opens the next) until `stop`.
//! - [`FloodStats`]: what the attacker observed — how many connections the
//!   server let it complete and hold at once, how long it held them, how
//!   many were refused.

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;

/// Runs `f` on a new thread inside the network namespace of process `pid`.
pub fn in_netns<T, F, Fut>(pid: u32, f: F) -> std::thread::JoinHandle<T>
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T>,
{
    std::thread::spawn(move || {
        let ns = std::fs::File::open(format!("/proc/{pid}/ns/net")).expect("open netns");
        // SAFETY: setns on this thread only, with a namespace fd we own.
        let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(f())
    })
}

/// What the attacker saw.
#[derive(Debug, Default)]
pub struct FloodStats {
    pub attempts: AtomicU64,
    /// TLS handshake completed (the server let the connection in).
    pub established: AtomicU64,
    /// Closed, reset or timed out before the handshake completed.
    pub refused: AtomicU64,
    pub held_now: AtomicI64,
    pub held_max: AtomicI64,
    /// Established connections the server closed (not we).
    pub closed_by_server: AtomicU64,
    /// Longest time an established connection stayed open (ms).
    pub longest_hold_ms: AtomicU64,
}

impl FloodStats {
    fn hold_start(&self) {
        let now = self.held_now.fetch_add(1, Ordering::Relaxed) + 1;
        self.held_max.fetch_max(now, Ordering::Relaxed);
    }

    fn hold_end(&self, since: Instant, by_server: bool) {
        self.held_now.fetch_sub(1, Ordering::Relaxed);
        self.longest_hold_ms
            .fetch_max(since.elapsed().as_millis() as u64, Ordering::Relaxed);
        if by_server {
            self.closed_by_server.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn get(&self, f: impl Fn(&Self) -> &AtomicU64) -> u64 {
        f(self).load(Ordering::Relaxed)
    }

    pub fn summary(&self) -> String {
        format!(
            "attempts={} established={} refused={} held_max={} closed_by_server={} longest_hold={}ms",
            self.attempts.load(Ordering::Relaxed),
            self.established.load(Ordering::Relaxed),
            self.refused.load(Ordering::Relaxed),
            self.held_max.load(Ordering::Relaxed),
            self.closed_by_server.load(Ordering::Relaxed),
            self.longest_hold_ms.load(Ordering::Relaxed),
        )
    }
}

/// A TLS 1.3 client with no certificate that accepts any server
/// certificate (an attacker does not care who it floods).
pub fn attacker_tls(ca_pem: &[u8], alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let roots = Arc::new(clawker::tls::root_store("ca", ca_pem).unwrap());
    let mut cfg = rustls::ClientConfig::builder_with_provider(clawker::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(clawker::tls::PermissiveServerVerifier::new(roots))
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(cfg)
}

type Tls = tokio_rustls::client::TlsStream<TcpStream>;

async fn open(
    target: SocketAddr,
    tls: &Arc<rustls::ClientConfig>,
    stats: &FloodStats,
) -> Option<Tls> {
    stats.attempts.fetch_add(1, Ordering::Relaxed);
    let bound = Duration::from_secs(10);
    let tcp = match tokio::time::timeout(bound, TcpStream::connect(target)).await {
        Ok(Ok(t)) => t,
        _ => {
            stats.refused.fetch_add(1, Ordering::Relaxed);
            return None;
        }
    };
    let name = ServerName::try_from("clawker-controlplane").unwrap();
    match tokio::time::timeout(bound, TlsConnector::from(tls.clone()).connect(name, tcp)).await {
        Ok(Ok(s)) => {
            stats.established.fetch_add(1, Ordering::Relaxed);
            Some(s)
        }
        _ => {
            stats.refused.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// Resolves when the server closes (EOF or error); discards what it sends.
async fn until_closed<R: tokio::io::AsyncRead + Unpin>(mut r: R) {
    let mut buf = [0u8; 4096];
    while let Ok(n) = r.read(&mut buf).await {
        if n == 0 {
            break;
        }
    }
}

async fn pause(stop: &CancellationToken, d: Duration) {
    tokio::select! {
        _ = tokio::time::sleep(d) => {}
        _ = stop.cancelled() => {}
    }
}

/// `workers` reconnecting connections that complete TLS and then say
/// nothing.
pub async fn idle_tls(
    target: SocketAddr,
    workers: usize,
    tls: Arc<rustls::ClientConfig>,
    pause_after: Duration,
    stats: Arc<FloodStats>,
    stop: CancellationToken,
) {
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..workers {
        let (tls, stats, stop) = (tls.clone(), stats.clone(), stop.clone());
        set.spawn(async move {
            while !stop.is_cancelled() {
                if let Some(s) = open(target, &tls, &stats).await {
                    let t0 = Instant::now();
                    stats.hold_start();
                    let by_server = tokio::select! {
                        _ = until_closed(s) => true,
                        _ = stop.cancelled() => false,
                    };
                    stats.hold_end(t0, by_server);
                }
                pause(&stop, pause_after).await;
            }
        });
    }
    while set.join_next().await.is_some() {}
}

/// `workers` reconnecting token requests that never finish: half trickle
/// their headers, half send complete headers and trickle the body, one
/// byte every `trickle`.
pub async fn slowloris(
    target: SocketAddr,
    workers: usize,
    tls: Arc<rustls::ClientConfig>,
    trickle: Duration,
    stats: Arc<FloodStats>,
    stop: CancellationToken,
) {
    let mut set = tokio::task::JoinSet::new();
    for i in 0..workers {
        let (tls, stats, stop) = (tls.clone(), stats.clone(), stop.clone());
        let body = i % 2 == 1;
        set.spawn(async move {
            while !stop.is_cancelled() {
                if let Some(s) = open(target, &tls, &stats).await {
                    let t0 = Instant::now();
                    stats.hold_start();
                    let (r, mut w) = tokio::io::split(s);
                    let head: &[u8] = if body {
                        b"POST /oauth2/token HTTP/1.1\r\nHost: clawker-controlplane\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 100000\r\n\r\n"
                    } else {
                        b"POST /oauth2/token HTTP/1.1\r\nHost: clawker-controlplane\r\n"
                    };
                    let drip = async {
                        if w.write_all(head).await.is_err() {
                            return;
                        }
                        loop {
                            tokio::time::sleep(trickle).await;
                            let byte: &[u8] = if body { b"a" } else { b"X" };
                            if w.write_all(byte).await.is_err() || w.flush().await.is_err() {
                                return;
                            }
                        }
                    };
                    let by_server = tokio::select! {
                        _ = until_closed(r) => true,
                        _ = drip => true,
                        _ = stop.cancelled() => false,
                    };
                    stats.hold_end(t0, by_server);
                }
                pause(&stop, trickle).await;
            }
        });
    }
    while set.join_next().await.is_some() {}
}

/// `workers` reconnecting TLS handshakes without a client certificate
/// (what a neighbour can throw at another agent's clawkerd).
pub async fn handshake_storm(
    target: SocketAddr,
    workers: usize,
    tls: Arc<rustls::ClientConfig>,
    pause_after: Duration,
    stats: Arc<FloodStats>,
    stop: CancellationToken,
) {
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..workers {
        let (tls, stats, stop) = (tls.clone(), stats.clone(), stop.clone());
        set.spawn(async move {
            while !stop.is_cancelled() {
                if let Some(mut s) = open(target, &tls, &stats).await {
                    // TLS 1.3: the client finishes first; the server's
                    // verdict on the (missing) certificate comes after.
                    let t0 = Instant::now();
                    stats.hold_start();
                    let _ = s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
                    let by_server = tokio::select! {
                        _ = until_closed(s) => true,
                        _ = stop.cancelled() => false,
                    };
                    stats.hold_end(t0, by_server);
                }
                pause(&stop, pause_after).await;
            }
        });
    }
    while set.join_next().await.is_some() {}
}
