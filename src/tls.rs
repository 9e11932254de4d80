//! Shared rustls helpers: the one crypto provider we use (ring), PEM loading
//! with errors that name the file, and the CP's deliberately permissive
//! verifier for dialing clawkerd.
//!
//! Why a permissive verifier exists at all: the trust model is asymmetric
//! (DESIGN §1). clawkerd is strict — only the CP may open a session — but the
//! CP must keep a channel even to an agent whose certificate it does not
//! trust, because that channel is how it contains a bad agent (reference
//! `cp-session.md` §6.3). So the CP's client verifier records what it saw
//! (peer CN, SHA-256 thumbprint, whether the chain verified against our CA)
//! and never fails the handshake; the identity decision is made afterwards,
//! from the recorded [`PeerInfo`].

use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::identity::Thumbprint;

/// Errors building TLS material. Each names what was being loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{what}: no certificate in PEM")]
    NoCert { what: String },
    #[error("{what}: no private key in PEM")]
    NoKey { what: String },
    #[error("{what}: bad PEM: {detail}")]
    BadPem { what: String, detail: String },
    #[error("{what}: {detail}")]
    Rustls { what: String, detail: String },
}

/// The process-wide crypto provider: ring, as everywhere in clawker.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Every `CERTIFICATE` block in `pem`, in order. Other blocks are skipped;
/// no certificate at all is an error.
pub fn load_certs(what: &str, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let blocks = pem::parse_many(pem).map_err(|e| TlsError::BadPem {
        what: what.into(),
        detail: e.to_string(),
    })?;
    let certs: Vec<_> = blocks
        .into_iter()
        .filter(|b| b.tag() == "CERTIFICATE")
        .map(|b| CertificateDer::from(b.into_contents()))
        .collect();
    if certs.is_empty() {
        return Err(TlsError::NoCert { what: what.into() });
    }
    Ok(certs)
}

/// The first private key block (PKCS#8, SEC1 or PKCS#1) in `pem`.
pub fn load_key(what: &str, pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    let blocks = pem::parse_many(pem).map_err(|e| TlsError::BadPem {
        what: what.into(),
        detail: e.to_string(),
    })?;
    for b in blocks {
        let key = match b.tag() {
            "PRIVATE KEY" => PrivateKeyDer::Pkcs8(b.into_contents().into()),
            "EC PRIVATE KEY" => PrivateKeyDer::Sec1(b.into_contents().into()),
            "RSA PRIVATE KEY" => PrivateKeyDer::Pkcs1(b.into_contents().into()),
            _ => continue,
        };
        return Ok(key);
    }
    Err(TlsError::NoKey { what: what.into() })
}

/// A root store holding every certificate of `ca_pem` that parses as a
/// trust anchor; none → error.
pub fn root_store(what: &str, ca_pem: &[u8]) -> Result<RootCertStore, TlsError> {
    let certs = load_certs(what, ca_pem)?;
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(TlsError::NoCert { what: what.into() });
    }
    Ok(roots)
}

/// The Subject CN of a DER certificate, or `""` when it has none or does not
/// parse (callers compare it; an empty CN never matches anything).
pub fn cert_cn(der: &[u8]) -> String {
    x509_parser::parse_x509_certificate(der)
        .ok()
        .and_then(|(_, c)| {
            c.subject()
                .iter_common_name()
                .next()
                .and_then(|a| a.as_str().ok())
                .map(str::to_owned)
        })
        .unwrap_or_default()
}

/// What the CP learned about a clawkerd's server certificate during the
/// handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    /// Subject CN of the leaf (`""` if absent or unparseable).
    pub cn: String,
    /// SHA-256 of the leaf DER.
    pub thumbprint: Thumbprint,
    /// Whether the presented chain verified against the CA (signature,
    /// validity period; the server name is *not* checked because agent
    /// leaves carry only a URI SAN).
    pub chain_verified: bool,
    /// Why the chain did not verify, when it did not.
    pub chain_error: Option<String>,
    /// The chain failed *only* because the leaf has expired: checked again
    /// at the leaf's own `notAfter`, it chains to our CA (so it is ours, not
    /// another CA's, and otherwise well-formed). The CP may then trust and
    /// re-issue it (DESIGN §13).
    pub expired_only: bool,
    /// The leaf's `notAfter` (Unix seconds), when the leaf parses.
    pub not_after: Option<i64>,
    /// The leaf DER itself, for SAN extraction by the caller.
    pub leaf_der: Vec<u8>,
}

/// A `ServerCertVerifier` that records and never rejects (see module doc).
///
/// Use one instance per dial: the recorded [`PeerInfo`] belongs to the last
/// handshake that ran through this verifier. Handshake *signatures* are still
/// checked properly (they prove the peer holds the key of the certificate it
/// presented, which is what makes the recorded thumbprint meaningful).
#[derive(Debug)]
pub struct PermissiveServerVerifier {
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
    seen: Mutex<Option<PeerInfo>>,
}

impl PermissiveServerVerifier {
    pub fn new(roots: Arc<RootCertStore>) -> Arc<Self> {
        Arc::new(Self {
            roots,
            provider: provider(),
            seen: Mutex::new(None),
        })
    }

    /// The peer of the last handshake, if one reached certificate checking.
    pub fn peer(&self) -> Option<PeerInfo> {
        self.seen.lock().ok().and_then(|g| g.clone())
    }

    fn inspect(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> PeerInfo {
        let algs = self.provider.signature_verification_algorithms.all;
        let chain = verify_chain(end_entity, intermediates, &self.roots, now, algs);
        let not_after = cert_validity(end_entity).map(|(_, na)| na);
        let expired_only = match (&chain, not_after) {
            (Err(e), Some(na)) if is_expiry(e) && na >= 0 => {
                let at = UnixTime::since_unix_epoch(std::time::Duration::from_secs(na as u64));
                verify_chain(end_entity, intermediates, &self.roots, at, algs).is_ok()
            }
            _ => false,
        };
        PeerInfo {
            cn: cert_cn(end_entity),
            thumbprint: Thumbprint::of_der(end_entity),
            chain_verified: chain.is_ok(),
            chain_error: chain.err().map(|e| e.to_string()),
            expired_only,
            not_after,
            leaf_der: end_entity.to_vec(),
        }
    }
}

/// WebPKI chain verification of a server leaf against `roots` at `now`.
fn verify_chain(
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    roots: &RootCertStore,
    now: UnixTime,
    algs: &[&'static dyn rustls::pki_types::SignatureVerificationAlgorithm],
) -> Result<(), rustls::Error> {
    let parsed = ParsedCertificate::try_from(end_entity)?;
    rustls::client::verify_server_cert_signed_by_trust_anchor(
        &parsed,
        roots,
        intermediates,
        now,
        algs,
    )
}

fn is_expiry(e: &rustls::Error) -> bool {
    matches!(
        e,
        rustls::Error::InvalidCertificate(
            rustls::CertificateError::Expired | rustls::CertificateError::ExpiredContext { .. }
        )
    )
}

/// `(notBefore, notAfter)` of a DER certificate in Unix seconds, if it parses.
pub fn cert_validity(der: &[u8]) -> Option<(i64, i64)> {
    let (_, c) = x509_parser::parse_x509_certificate(der).ok()?;
    Some((
        c.validity().not_before.timestamp(),
        c.validity().not_after.timestamp(),
    ))
}

/// Whether a server leaf chains to `roots` regardless of the clock: checked
/// at a moment inside its own validity period (its `notAfter`). clawkerd
/// uses it to accept its persisted, possibly expired, rotated leaf at boot;
/// anything from another CA, or malformed, still fails.
pub fn chains_ignoring_time(der: &[u8], roots: &RootCertStore) -> Result<(), rustls::Error> {
    let (_, not_after) = cert_validity(der).ok_or(rustls::Error::InvalidCertificate(
        rustls::CertificateError::BadEncoding,
    ))?;
    let at = UnixTime::since_unix_epoch(std::time::Duration::from_secs(not_after.max(0) as u64));
    chains_at(der, roots, at)
}

/// Whether a server leaf chains to `roots` and is valid at `now`.
pub fn chains_at(der: &[u8], roots: &RootCertStore, now: UnixTime) -> Result<(), rustls::Error> {
    verify_chain(
        &CertificateDer::from(der),
        &[],
        roots,
        now,
        provider().signature_verification_algorithms.all,
    )
}

impl ServerCertVerifier for PermissiveServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let info = self.inspect(end_entity, intermediates, now);
        if let Ok(mut slot) = self.seen.lock() {
            *slot = Some(info);
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A TLS 1.3 client config for dialing clawkerd as the CP: presents the CP
/// client certificate, records the server's identity via `verifier`,
/// negotiates ALPN `h2` (gRPC).
pub fn cp_dial_config(
    client_cert_pem: &[u8],
    client_key_pem: &[u8],
    verifier: Arc<PermissiveServerVerifier>,
) -> Result<rustls::ClientConfig, TlsError> {
    let certs = load_certs("CP client cert", client_cert_pem)?;
    let key = load_key("CP client key", client_key_pem)?;
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Rustls {
            what: "CP dial config".into(),
            detail: e.to_string(),
        })?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(certs, key)
        .map_err(|e| TlsError::Rustls {
            what: "CP client keypair".into(),
            detail: e.to_string(),
        })?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{AgentName, ProjectSlug};
    use crate::pki::Ca;

    #[test]
    fn permissive_verifier_records_but_never_rejects() {
        let ca = Ca::generate().unwrap();
        let other = Ca::generate().unwrap();
        let roots = Arc::new(root_store("ca", ca.cert_pem().as_bytes()).unwrap());
        let v = PermissiveServerVerifier::new(roots);
        let name = ServerName::try_from("clawker-controlplane").unwrap();
        let p = ProjectSlug::new("p").unwrap();
        let a = AgentName::new("a").unwrap();
        for (issuer, want_ok) in [(&ca, true), (&other, false)] {
            let leaf = issuer.mint_agent(&p, &a, "abc").unwrap();
            let der = CertificateDer::from(leaf.cert_der.clone());
            assert!(
                v.verify_server_cert(&der, &[], &name, &[], UnixTime::now())
                    .is_ok()
            );
            let info = v.peer().unwrap();
            assert_eq!(info.cn, "clawker.p.a");
            assert_eq!(info.thumbprint, leaf.thumbprint());
            assert_eq!(info.chain_verified, want_ok, "{:?}", info.chain_error);
        }
        // Garbage bytes are recorded as unverified, not a panic.
        let junk = CertificateDer::from(vec![1u8, 2, 3]);
        assert!(
            v.verify_server_cert(&junk, &[], &name, &[], UnixTime::now())
                .is_ok()
        );
        assert!(!v.peer().unwrap().chain_verified);
    }

    #[test]
    fn expired_leaf_of_our_ca_is_recorded_as_expired_only() {
        use crate::pki::LeafSpec;
        let ca = Ca::generate().unwrap();
        let other = Ca::generate().unwrap();
        let roots = Arc::new(root_store("ca", ca.cert_pem().as_bytes()).unwrap());
        let v = PermissiveServerVerifier::new(roots.clone());
        let name = ServerName::try_from("clawker-controlplane").unwrap();
        let expired = |issuer: &Ca| {
            let mut spec = LeafSpec::new("clawker.p.a", time::Duration::hours(1));
            spec.not_before = time::OffsetDateTime::now_utc() - time::Duration::hours(3);
            spec.not_after = time::OffsetDateTime::now_utc() - time::Duration::hours(2);
            spec.ekus = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
            issuer.issue(&spec).unwrap()
        };
        let see = |der: &[u8]| {
            let der = CertificateDer::from(der.to_vec());
            v.verify_server_cert(&der, &[], &name, &[], UnixTime::now())
                .unwrap();
            v.peer().unwrap()
        };
        let ours = expired(&ca);
        let info = see(&ours.cert_der);
        assert!(!info.chain_verified);
        assert!(info.expired_only, "{:?}", info.chain_error);
        assert_eq!(
            info.not_after,
            Some(cert_validity(&ours.cert_der).unwrap().1)
        );
        assert!(chains_ignoring_time(&ours.cert_der, &roots).is_ok());
        // Expired *and* from another CA: not "expired only".
        let theirs = expired(&other);
        let info = see(&theirs.cert_der);
        assert!(!info.chain_verified && !info.expired_only);
        assert!(chains_ignoring_time(&theirs.cert_der, &roots).is_err());
        // A valid leaf: verified, not expired.
        let p = ProjectSlug::new("p").unwrap();
        let a = AgentName::new("a").unwrap();
        let fresh = ca.mint_agent(&p, &a, "ab").unwrap();
        let info = see(&fresh.cert_der);
        assert!(info.chain_verified && !info.expired_only);
        assert!(chains_ignoring_time(b"junk", &roots).is_err());
    }

    #[test]
    fn pem_loading_errors_name_the_file() {
        let e = load_certs("ca.pem", b"garbage").unwrap_err();
        assert!(e.to_string().starts_with("ca.pem"), "{e}");
        let e = load_key("key.pem", b"").unwrap_err();
        assert_eq!(e.to_string(), "key.pem: no private key in PEM");
    }
}

/// Why a [`PinnedClientVerifier`] refused a leaf.
#[derive(Debug, thiserror::Error)]
#[error("{label}: {why}")]
struct PinRejected {
    label: &'static str,
    why: &'static str,
}

/// The pin on an already chain-verified client leaf: its Subject CN equals
/// `expected_cn` (constant time: every agent leaf is signed by the same CA,
/// so the chain alone proves nothing about *who*), and it explicitly lists
/// the ClientAuth EKU.
pub fn check_pinned_leaf(der: &[u8], expected_cn: &str) -> Result<(), &'static str> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|_| "peer certificate does not parse")?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|a| a.as_str().ok())
        .unwrap_or_default();
    if !crate::identity::ct_str_eq(cn, expected_cn) {
        return Err("peer CN not authorized");
    }
    let client_auth = matches!(cert.extended_key_usage(), Ok(Some(eku)) if eku.value.client_auth);
    if !client_auth {
        return Err("peer cert missing ClientAuth EKU");
    }
    Ok(())
}

/// A client-certificate verifier for listeners that admit exactly one
/// identity (clawkerd admits only the CP, the admin API only the CLI):
/// rustls' WebPKI chain check (CA, validity, signature, webpki's EKU rule),
/// then [`check_pinned_leaf`] — all inside the handshake, so a refused peer
/// never reaches a handler.
#[derive(Debug)]
pub struct PinnedClientVerifier {
    inner: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    cn: &'static str,
    /// Prefix of rejection messages (which listener refused).
    label: &'static str,
}

impl PinnedClientVerifier {
    pub fn new(
        roots: RootCertStore,
        cn: &'static str,
        label: &'static str,
    ) -> Result<Arc<Self>, rustls::server::VerifierBuilderError> {
        let inner = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider(),
        )
        .build()?;
        Ok(Arc::new(Self { inner, cn, label }))
    }
}

impl rustls::server::danger::ClientCertVerifier for PinnedClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        check_pinned_leaf(end_entity, self.cn).map_err(|why| {
            rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
                Arc::new(PinRejected {
                    label: self.label,
                    why,
                }),
            )))
        })?;
        Ok(rustls::server::danger::ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A TLS connection accepted by [`accept_loop`], with the TCP peer address.
pub type Accepted = (
    tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    std::net::SocketAddr,
);

/// The accept loop every listener of ours runs (clawkerd, agent API, admin
/// API): TCP accept → TLS handshake with a deadline, each handshake on its
/// own task, so handshakes run concurrently, a silent peer cannot hold the
/// loop, and every refused peer is logged (`reject_event`) with its address.
/// Ends when `shutdown` fires or the receiver is dropped.
pub fn accept_loop(
    tcp: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    handshake_timeout: std::time::Duration,
    reject_event: &'static str,
    shutdown: tokio_util::sync::CancellationToken,
) -> tokio::sync::mpsc::Receiver<Accepted> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Accepted>(64);
    tokio::spawn(async move {
        loop {
            let (sock, peer) = tokio::select! {
                r = tcp.accept() => match r {
                    Ok(x) => x,
                    Err(error) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(event = "accept_failed", %error);
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = shutdown.cancelled() => return,
                // The server stopped consuming connections.
                _ = tx.closed() => return,
            };
            let _ = sock.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(handshake_timeout, acceptor.accept(sock)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send((stream, peer)).await;
                    }
                    Ok(Err(error)) => tracing::warn!(
                        event = reject_event,
                        %peer,
                        %error,
                        "peer refused in the TLS handshake"
                    ),
                    Err(_) => tracing::warn!(
                        event = reject_event,
                        %peer,
                        error = "handshake timeout",
                        "peer refused in the TLS handshake"
                    ),
                }
            });
        }
    });
    rx
}

/// A tonic connector that dials `addr` over TCP and runs a TLS handshake
/// with `cfg` under the name every client uses (`clawker-controlplane`;
/// the server name is not checked against agent leaves, which carry only a
/// URI SAN), bounded by `timeout`. Shared by the CP's session dialer and the
/// CLI's admin client.
pub fn connector(
    addr: std::net::SocketAddr,
    cfg: Arc<rustls::ClientConfig>,
    timeout: std::time::Duration,
) -> impl tower::Service<
    http::Uri,
    Response = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
    Error = std::io::Error,
    Future = impl Future<
        Output = std::io::Result<
            hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
        >,
    > + Send,
> + Clone {
    tower::service_fn(move |_uri: http::Uri| {
        let cfg = cfg.clone();
        async move {
            let io = async {
                let tcp = tokio::net::TcpStream::connect(addr).await?;
                tcp.set_nodelay(true)?;
                let name = ServerName::try_from(crate::identity::CONTROL_PLANE_CN)
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
                tokio_rustls::TlsConnector::from(cfg)
                    .connect(name, tcp)
                    .await
            };
            let tls = tokio::time::timeout(timeout, io).await.map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timeout")
            })??;
            Ok(hyper_util::rt::TokioIo::new(tls))
        }
    })
}
