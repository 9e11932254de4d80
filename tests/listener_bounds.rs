//! The bounds the agent listener enforces against a hostile agent, over
//! real TLS on loopback (loopback aliases 127.0.0.x stand in for distinct
//! agents): connection caps refused before the TLS handshake, the
//! handshake timeout, the idle timeout (bytes are not activity, requests
//! are), slowloris token requests, and the 4 MiB gRPC message cap. The
//! same accept loop serves clawkerd and the admin API (their own tests
//! cover what differs: the CP's reserved slot, streams that are never idle).

mod common;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

async fn tls_open(
    addr: SocketAddr,
    src: Option<IpAddr>,
    cfg: &Arc<rustls::ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = connect_tcp(addr, src).await?;
    let name = ServerName::try_from("clawker-controlplane").unwrap();
    let mut tls = TlsConnector::from(cfg.clone()).connect(name, tcp).await?;
    // TLS 1.3: the client can finish before the server has said anything
    // more; a refused connection shows on the first read at the latest.
    tls.flush().await?;
    Ok(tls)
}

/// Time until the server closes `r` (EOF or error), or `None` after `max`.
async fn closed_after<R: tokio::io::AsyncRead + Unpin>(
    mut r: R,
    max: Duration,
) -> Option<Duration> {
    let t0 = Instant::now();
    let mut buf = [0u8; 1024];
    tokio::time::timeout(max, async {
        while let Ok(n) = r.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    })
    .await
    .ok()
    .map(|_| t0.elapsed())
}

async fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_a_cap_are_refused_before_tls_and_other_sources_still_get_in() {
    let h = Harness::start_with(|c| {
        c.limits.max_connections_per_source = 4;
        c.limits.max_connections = 6;
    })
    .await;
    let cfg = flood::attacker_tls(h.ca.cert_pem().as_bytes(), &[b"h2"]);
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(tls_open(h.addr, None, &cfg).await.unwrap());
    }
    assert_eq!(h.api.connections.open_from(LOOPBACK), 4);
    // The same source again: reset at accept, before any TLS work.
    for _ in 0..20 {
        let refused = match tls_open(h.addr, None, &cfg).await {
            Err(_) => true,
            Ok(s) => closed_after(s, Duration::from_secs(2)).await.is_some(),
        };
        assert!(refused, "a fifth connection from one source got in");
    }
    assert_eq!(h.api.connections.open_from(LOOPBACK), 4);
    // Other agents still get in, up to the global cap.
    let b = tls_open(h.addr, Some(ip("127.0.0.2")), &cfg).await.unwrap();
    let c = tls_open(h.addr, Some(ip("127.0.0.3")), &cfg).await.unwrap();
    let refused = match tls_open(h.addr, Some(ip("127.0.0.4")), &cfg).await {
        Err(_) => true,
        Ok(s) => closed_after(s, Duration::from_secs(2)).await.is_some(),
    };
    assert!(refused, "the global cap let a seventh connection in");
    // A freed slot is usable again.
    drop(held.pop());
    wait_until("a slot frees", || h.api.connections.open() == 5).await;
    let d = tls_open(h.addr, Some(ip("127.0.0.4")), &cfg).await.unwrap();
    assert_eq!(h.api.connections.open(), 6);
    drop((b, c, d, held));
    wait_until("every slot frees", || h.api.connections.open() == 0).await;
    assert_eq!(h.api.connections.sources(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_peer_is_closed_at_the_handshake_timeout() {
    let h = Harness::start_with(|c| {
        c.limits.handshake_timeout = Duration::from_millis(500);
    })
    .await;
    let tcp = TcpStream::connect(h.addr).await.unwrap();
    let held = closed_after(tcp, Duration::from_secs(10)).await;
    let held = held.expect("a silent peer kept its connection");
    assert!(held >= Duration::from_millis(400), "{held:?}");
    wait_until("its slot frees", || h.api.connections.open() == 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_tls_connection_is_closed_and_a_request_resets_the_clock() {
    let h = Harness::start_with(|c| {
        c.limits.idle_timeout = Duration::from_millis(800);
    })
    .await;
    let cfg = flood::attacker_tls(h.ca.cert_pem().as_bytes(), &[b"h2"]);
    let s = tls_open(h.addr, None, &cfg).await.unwrap();
    let held = closed_after(s, Duration::from_secs(10))
        .await
        .expect("an idle connection was kept");
    assert!(held >= Duration::from_millis(600), "{held:?}");
    // Keep-alive HTTP/1.1: a request in flight is not idle, and after it
    // the clock starts again; the token endpoint still answers.
    let (status, body) = https_post(
        h.addr,
        h.ca.cert_pem(),
        "/oauth2/token",
        "application/x-www-form-urlencoded",
        b"grant_type=password",
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("unsupported_grant_type"))
    );
    wait_until("every slot frees", || h.api.connections.open() == 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_token_requests_never_hold_a_connection_past_their_bound() {
    let h = Harness::start_with(|c| {
        c.limits.idle_timeout = Duration::from_millis(800);
        c.body_read_timeout = Duration::from_millis(800);
    })
    .await;
    let cfg = flood::attacker_tls(h.ca.cert_pem().as_bytes(), &[b"http/1.1"]);

    // Headers, one byte every 100 ms: the request never becomes one, so
    // the connection is idle and closed at the idle timeout.
    let s = tls_open(h.addr, None, &cfg).await.unwrap();
    let (r, mut w) = tokio::io::split(s);
    let drip = tokio::spawn(async move {
        let _ = w
            .write_all(b"POST /oauth2/token HTTP/1.1\r\nHost: x\r\n")
            .await;
        for _ in 0..200 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if w.write_all(b"X").await.is_err() {
                break;
            }
        }
    });
    let held = closed_after(r, Duration::from_secs(10))
        .await
        .expect("a header trickle kept its connection");
    assert!(held < Duration::from_secs(5), "{held:?}");
    drip.abort();

    // Complete headers, then a body one byte every 100 ms: answered
    // `invalid_request` at the body bound, and the connection is closed.
    let mut s = tls_open(h.addr, None, &cfg).await.unwrap();
    s.write_all(
        b"POST /oauth2/token HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 1000\r\n\r\ngrant",
    )
    .await
    .unwrap();
    let t0 = Instant::now();
    let mut reply = Vec::new();
    let mut buf = [0u8; 1024];
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            tokio::select! {
                n = s.read(&mut buf) => match n {
                    Ok(0) | Err(_) => break,
                    Ok(n) => reply.extend_from_slice(&buf[..n]),
                },
                _ = tokio::time::sleep(Duration::from_millis(100)) => {
                    let _ = s.write_all(b"_").await;
                }
            }
        }
    })
    .await;
    assert!(read.is_ok(), "a body trickle kept its connection");
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
    assert!(
        reply.contains("timed out reading the request body"),
        "{reply}"
    );
    wait_until("every slot frees", || h.api.connections.open() == 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_message_over_4_mib_is_refused_unread() {
    let h = Harness::start().await;
    let token = h.agent_token().await;
    let leaf = h.agent("web", "dev", "abc1");
    let huge = "a".repeat(5 << 20);
    let err = h
        .register(Some(&leaf), Some(&token), "web", &huge)
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::OutOfRange, "{err:?}");
    assert!(h.registry.snapshot().is_empty());
    // The same call at a sane size goes through.
    h.register(Some(&leaf), Some(&token), "web", "dev")
        .await
        .unwrap();
}

/// One HTTP/1.1 GET on `s` (keep-alive); returns the status line and body.
async fn http_get(s: &mut TcpStream, path: &str) -> std::io::Result<(String, String)> {
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: cp\r\n\r\n").as_bytes())
        .await?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let len: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).to_string();
                let status = head.lines().next().unwrap_or_default().to_owned();
                return Ok((status, body));
            }
        }
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// The CP's loopback `/metrics` + health endpoint is plain HTTP/1.1, but
/// it runs the same accept loop: connection caps (refused with an RST),
/// and hyper's header-read timeout as its idle and slowloris bound; a
/// keep-alive client that keeps asking is served throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_endpoint_caps_connections_and_closes_idle_and_slow_ones() {
    use clawker::listen::ListenerLimits;
    use clawker::policy::health::{Readiness, serve_bounded};
    let idle = Duration::from_millis(1500);
    let metrics = clawker::policy::metrics::Metrics::new();
    let stop = tokio_util::sync::CancellationToken::new();
    let (addr, server) = serve_bounded(
        "127.0.0.1:0".parse().unwrap(),
        metrics.handle(),
        Readiness::new(),
        None,
        ListenerLimits {
            max_connections: 3,
            max_connections_per_source: 3,
            idle_timeout: idle,
            ..ListenerLimits::METRICS
        },
        stop.clone(),
    )
    .await
    .unwrap();

    // Keep-alive: one connection, several requests, past the idle bound
    // (each request head resets it).
    let mut client = TcpStream::connect(addr).await.unwrap();
    for _ in 0..4 {
        let (status, body) = http_get(&mut client, "/healthz").await.unwrap();
        assert!(status.contains("200"), "{status}");
        assert_eq!(body, "ok\n");
        tokio::time::sleep(idle / 2).await;
    }

    // Caps: with three open, a fourth is reset at once; the three still work.
    let mut second = TcpStream::connect(addr).await.unwrap();
    let third = TcpStream::connect(addr).await.unwrap();
    let t0 = Instant::now();
    let refused = match TcpStream::connect(addr).await {
        Err(_) => true,
        Ok(fourth) => closed_after(fourth, idle).await.is_some(),
    };
    assert!(refused, "a fourth connection got past a cap of 3");
    assert!(
        t0.elapsed() < idle,
        "refused at accept, not by the idle bound"
    );
    assert!(http_get(&mut second, "/healthz").await.is_ok());
    assert!(http_get(&mut client, "/metrics").await.is_ok());

    // Idle: a connection that never sends a request is closed at the bound.
    let t = closed_after(third, idle * 4)
        .await
        .expect("an idle connection was never closed");
    assert!(t >= idle / 2 && t < idle * 3, "idle close after {t:?}");

    // Slowloris: a request head trickled a byte at a time is closed at the
    // bound, however steadily the bytes come.
    drop((client, second));
    let mut slow = None;
    for _ in 0..50 {
        // The freed slots come back as the server notices the closes.
        let mut s = TcpStream::connect(addr).await.unwrap();
        if s.write_all(b"GET /metrics HTTP/1.1\r\n").await.is_ok()
            && closed_after(&mut s, Duration::from_millis(100))
                .await
                .is_none()
        {
            slow = Some(s);
            break;
        }
    }
    let mut slow = slow.expect("no slot came free after the clients left");
    let t0 = Instant::now();
    let mut cut = false;
    while t0.elapsed() < idle * 4 {
        if slow.write_all(b"X").await.is_err() {
            cut = true;
            break;
        }
        let mut byte = [0u8; 1];
        match tokio::time::timeout(Duration::from_millis(200), slow.read(&mut byte)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                cut = true;
                break;
            }
            _ => {}
        }
    }
    assert!(
        cut,
        "a trickled request head held its connection for {:?}",
        t0.elapsed()
    );
    assert!(
        t0.elapsed() < idle * 3,
        "slowloris cut after {:?}",
        t0.elapsed()
    );

    // Shutdown: the server task ends and nothing is served any more.
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("metrics server ended")
        .unwrap();
    let refused = match TcpStream::connect(addr).await {
        Err(_) => true,
        Ok(mut s) => http_get(&mut s, "/healthz").await.is_err(),
    };
    assert!(refused, "served after shutdown");
}
