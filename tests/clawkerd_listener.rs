//! The :7700 listener accepts only the CP. Every bad peer is refused in
//! the TLS handshake: no `session_started`, no handler, nothing run.

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use clawker::identity::{AgentName, CONTROL_PLANE_CN, ProjectSlug};
use clawker::pki::{Ca, CertifiedKey, LeafSpec};
use common::*;
use rcgen::ExtendedKeyUsagePurpose as Eku;

/// Tries to get a HelloAck through a connection made with `identity` and
/// `versions`; returns the failure text if refused.
async fn probe(
    d: &Clawkerd,
    ca_pem: &str,
    identity: Option<&CertifiedKey>,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Result<(), String> {
    let (cfg, verifier) = client_config(ca_pem, identity, versions);
    let mut c = CpClient::connect_with(d.addr, cfg, verifier).await?;
    let mut s = c.open_session().await.map_err(|e| format!("{e:?}"))?;
    s.send(hello("probe")).await;
    s.next_for("probe", Duration::from_secs(5))
        .await
        .map(|_| ())
}

type Versions = &'static [&'static rustls::SupportedProtocolVersion];
const TLS13: Versions = &[&rustls::version::TLS13];
const TLS12: Versions = &[&rustls::version::TLS12];
/// (name, client identity, TLS versions, expected rejection reason).
type Case<'a> = (&'a str, Option<&'a CertifiedKey>, Versions, Option<&'a str>);

fn cp_spec() -> LeafSpec {
    let mut spec = LeafSpec::new(CONTROL_PLANE_CN, time::Duration::hours(1));
    spec.ekus = vec![Eku::ClientAuth];
    spec
}

#[tokio::test(flavor = "multi_thread")]
async fn only_the_cp_certificate_opens_a_session() {
    let pki = TestPki::new();
    let d = Clawkerd::spawn(&pki);
    let ca = pki.ca.cert_pem().to_owned();
    let (tls13, tls12) = (TLS13, TLS12);

    let foreign_ca = Ca::generate().unwrap();
    let foreign = foreign_ca.issue(&cp_spec()).unwrap();
    let other_agent = pki
        .ca
        .mint_agent(
            &ProjectSlug::new("p").unwrap(),
            &AgentName::new("a").unwrap(),
            "abcdef",
        )
        .unwrap();
    let mut server_only = cp_spec();
    server_only.ekus = vec![Eku::ServerAuth];
    let server_only = pki.issue(&server_only);
    let mut expired = cp_spec();
    expired.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(2);
    expired.not_after = time::OffsetDateTime::now_utc() - time::Duration::days(1);
    let expired = pki.issue(&expired);
    let mut no_eku = cp_spec();
    no_eku.ekus = vec![];
    let no_eku = pki.issue(&no_eku);

    let cases: Vec<Case<'_>> = vec![
        ("no client cert", None, tls13, None),
        ("cert from another CA", Some(&foreign), tls13, None),
        (
            "another agent's leaf (CN clawker.p.a)",
            Some(&other_agent),
            tls13,
            Some("peer CN not authorized"),
        ),
        ("ServerAuth-only EKU", Some(&server_only), tls13, None),
        (
            "no EKU extension",
            Some(&no_eku),
            tls13,
            Some("missing ClientAuth EKU"),
        ),
        ("expired cert", Some(&expired), tls13, None),
        ("TLS 1.2 only", Some(&pki.cp_client), tls12, None),
    ];
    for (name, identity, versions, reason) in cases {
        // A probe may cause more than one handshake (client retries), so
        // look at every rejection logged since this probe started rather
        // than at the last line.
        let before = d.logs.count("tls_handshake_rejected");
        let r = probe(&d, &ca, identity, versions).await;
        assert!(r.is_err(), "{name}: must be refused");
        assert!(
            d.logs
                .wait_for_async("tls_handshake_rejected", before + 1, Duration::from_secs(5))
                .await,
            "{name}: no handshake rejection logged"
        );
        if let Some(reason) = reason {
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            loop {
                let new = d.logs.events("tls_handshake_rejected").split_off(before);
                if new
                    .iter()
                    .any(|l| l["error"].as_str().unwrap_or_default().contains(reason))
                {
                    break;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "{name}: no rejection with {reason:?}: {new:?}"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        assert_eq!(d.logs.count("session_started"), 0, "{name}: a handler ran");
    }

    // Plain TCP: the connection is closed; no HTTP/gRPC answer comes back.
    let before = d.logs.count("tls_handshake_rejected");
    let mut tcp = std::net::TcpStream::connect(d.addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut buf = Vec::new();
    let _ = tcp.read_to_end(&mut buf);
    assert!(
        buf.is_empty() || buf[0] == 0x15,
        "only a TLS alert may come back, got {buf:?}"
    );
    assert!(
        d.logs
            .wait_for_async("tls_handshake_rejected", before + 1, Duration::from_secs(5))
            .await
    );

    // After all that, the CP still gets in.
    probe(&d, &ca, Some(&pki.cp_client), tls13)
        .await
        .expect("CP accepted");
    assert!(
        d.logs
            .wait_for_async("session_started", 1, Duration::from_secs(5))
            .await
    );
    assert_eq!(d.logs.count("session_started"), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_silent_peer_does_not_block_the_accept_loop() {
    let pki = TestPki::new();
    let d = Clawkerd::spawn(&pki);
    // Open connections that never speak TLS.
    let idle: Vec<_> = (0..8)
        .map(|_| std::net::TcpStream::connect(d.addr).unwrap())
        .collect();
    let mut c = CpClient::connect(d.addr, &pki).await.unwrap();
    let mut s = c.open_session().await.unwrap();
    s.send(hello("h")).await;
    s.next_for("h", Duration::from_secs(2)).await.unwrap();
    drop(idle);
}

/// Raw TCP connections from `src` that never speak TLS; returns the ones
/// still open after a moment and how many the listener reset at once.
async fn silent_from(
    addr: std::net::SocketAddr,
    src: std::net::IpAddr,
    n: usize,
) -> (Vec<tokio::net::TcpStream>, usize) {
    let mut conns = Vec::new();
    let mut refused = 0;
    for _ in 0..n {
        match connect_tcp(addr, Some(src)).await {
            Ok(s) => conns.push(s),
            Err(_) => refused += 1,
        }
    }
    // A refused connection is reset right after accept.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut open = Vec::new();
    for s in conns {
        let mut b = [0u8; 1];
        match s.try_read(&mut b) {
            // Still waiting for our ClientHello: held.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => open.push(s),
            // Reset or closed: refused over a cap.
            _ => refused += 1,
        }
    }
    (open, refused)
}

#[tokio::test(flavor = "multi_thread")]
async fn neighbours_over_their_caps_are_refused_and_the_cp_still_gets_in() {
    let pki = TestPki::new();
    // The CP's address (its agent listener) is 127.0.0.2: exempt from the
    // caps. Three rejection lines per kind before the rate limit.
    let d = Clawkerd::spawn_with(
        &pki,
        Opts {
            env: vec![
                ("CLAWKER_CP_AGENT_ADDR".into(), "127.0.0.2:7444".into()),
                ("CLAWKER_LOG_REJECT_BURST".into(), "3".into()),
            ],
            ..Opts::default()
        },
    );
    let limits = clawker::listen::ListenerLimits::CLAWKERD;
    let per_source = limits.max_connections_per_source;
    // One neighbour: held up to its per-source cap, the rest reset.
    let (held_a, refused) =
        silent_from(d.addr, "127.0.0.1".parse().unwrap(), per_source + 20).await;
    assert_eq!((held_a.len(), refused), (per_source, 20));
    // Neighbours together fill the global cap...
    let mut held = vec![held_a];
    let sources = limits.max_connections / per_source;
    for i in 1..sources {
        let src = format!("127.0.0.{}", 10 + i).parse().unwrap();
        let (h, _) = silent_from(d.addr, src, per_source).await;
        held.push(h);
    }
    assert_eq!(
        held.iter().map(Vec::len).sum::<usize>(),
        limits.max_connections
    );
    let (late, refused) = silent_from(d.addr, "127.0.0.99".parse().unwrap(), 3).await;
    assert_eq!((late.len(), refused), (0, 3), "over the global cap");
    // ...and the CP still opens a session.
    let mut c = CpClient::connect_from(d.addr, "127.0.0.2".parse().unwrap(), &pki)
        .await
        .expect("CP refused");
    let mut s = c.open_session().await.unwrap();
    s.send(hello("cp")).await;
    s.next_for("cp", Duration::from_secs(5)).await.unwrap();

    // Rate-limited: at most the burst of refusal lines for 23+ refusals;
    // the rest is reported as a count by the accept loop's periodic flush.
    assert!(
        d.logs
            .wait_for_async("connection_refused", 3, Duration::from_secs(5))
            .await
    );
    assert_eq!(d.logs.count("connection_refused"), 3);
    let flush = clawker::listen::accept::FLUSH_EVERY + Duration::from_secs(3);
    assert!(d.logs.wait_for_async("log_suppressed", 1, flush).await);
    let summary = d.logs.events("log_suppressed").remove(0);
    assert_eq!(summary["kind"], "connection_refused");
    assert!(summary["suppressed"].as_u64().unwrap() >= 20, "{summary}");
    drop(held);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_log_file_rotates_at_its_size_cap() {
    use std::io::Write as _;
    let pki = TestPki::new();
    let log = pki.scratch.join("clawkerd.log");
    let d = Clawkerd::spawn_with(
        &pki,
        Opts {
            env: vec![
                ("CLAWKER_LOG_FILE".into(), log.display().to_string()),
                ("CLAWKER_LOG_MAX_BYTES".into(), "4096".into()),
            ],
            no_wait: true,
            ..Opts::default()
        },
    );
    // The listener's address is in the file this time.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let addr: std::net::SocketAddr = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(a) = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["event"] == "clawkerd_listener_started")
            .and_then(|v| v["addr"].as_str().map(str::to_owned))
        {
            break a.parse().unwrap();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no listener line in {log:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    // 300 refused handshakes, one line each (the burst is lifted here).
    for _ in 0..300 {
        let mut tcp = std::net::TcpStream::connect(addr).unwrap();
        let _ = tcp.write_all(b"GET / HTTP/1.1\r\n\r\n");
        let mut buf = Vec::new();
        let _ = std::io::Read::read_to_end(&mut tcp, &mut buf);
    }
    std::thread::sleep(Duration::from_millis(200));
    let size = |p: &std::path::Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let rotated = pki.scratch.join("clawkerd.log.1");
    assert!(size(&rotated) > 0, "never rotated");
    assert!(
        size(&log) <= 4096 && size(&rotated) <= 4096,
        "{} {}",
        size(&log),
        size(&rotated)
    );
    let last = std::fs::read_to_string(&rotated).unwrap();
    assert!(
        last.lines()
            .all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok()),
        "a line was split across the rotation"
    );
    drop(d);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_quiet_cp_session_outlives_the_idle_timeout() {
    let pki = TestPki::new();
    let d = Clawkerd::spawn_with(
        &pki,
        Opts {
            env: vec![("CLAWKER_IDLE_TIMEOUT_SECS".into(), "0.3".into())],
            ..Opts::default()
        },
    );
    let mut c = CpClient::connect(d.addr, &pki).await.unwrap();
    let mut s = c.open_session().await.unwrap();
    s.send(hello("before")).await;
    s.next_for("before", Duration::from_secs(5)).await.unwrap();
    // Ten idle timeouts without a frame: the Session stream is a request
    // in flight, so the connection is not idle.
    tokio::time::sleep(Duration::from_secs(3)).await;
    s.send(hello("after")).await;
    s.next_for("after", Duration::from_secs(5))
        .await
        .expect("the quiet session was cut");
    assert_eq!(d.logs.count("session_started"), 1);
}

#[test]
fn a_bad_idle_timeout_is_a_boot_configuration_error() {
    let pki = TestPki::new();
    let mut d = Clawkerd::spawn_with(
        &pki,
        Opts {
            env: vec![("CLAWKER_IDLE_TIMEOUT_SECS".into(), "soon".into())],
            no_wait: true,
            ..Opts::default()
        },
    );
    assert_eq!(d.wait_exit(Duration::from_secs(10)), Some(2));
}
