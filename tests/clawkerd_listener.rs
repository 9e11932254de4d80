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
