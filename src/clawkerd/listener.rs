//! The :7700 listener: TLS 1.3 only, a client certificate is required, and
//! only the CP's certificate gets through — all decided inside the TLS
//! handshake, so a rejected peer never reaches a gRPC handler (reference
//! §4).
//!
//! Architecture invariant: clawkerd never runs a command for a peer that is
//! not the CP. The checks, in order, all in [`tls::PinnedClientVerifier`]:
//! 1. chain to the bootstrap CA, validity period, signature (rustls'
//!    `WebPkiClientVerifier`, which also applies webpki's EKU rule);
//! 2. leaf Subject CN equals `clawker-controlplane`, compared in constant
//!    time (another agent's leaf is signed by the same CA!);
//! 3. the leaf explicitly lists the ClientAuth EKU.
//!
//! We run our own accept loop (TCP accept → TLS handshake with a deadline
//! → hand the stream to tonic) so handshakes run concurrently, failures are
//! logged with the peer address, and slow or silent peers cannot hold the
//! accept loop.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Connected;

use super::leaf::{CurrentLeaf, LeafError};
use super::session::ClawkerdSvc;
use crate::identity::{CONTROL_PLANE_CN, Thumbprint};
use crate::proto::clawkerd::v1::clawkerd_service_server::ClawkerdServiceServer;
use crate::tls;

/// A peer gets this long to complete the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the listener's TLS config could not be built from the bootstrap
/// bundle. All are configuration errors (exit 2): the bundle in the
/// container is wrong. Texts follow the reference.
#[derive(Debug, thiserror::Error)]
pub enum ServerConfigError {
    #[error("TLS config: CA PEM did not parse")]
    CaPem,
    #[error("TLS config: client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// cert.pem and key.pem (or the persisted rotated leaf) are not a
    /// usable keypair.
    #[error("TLS config: agent leaf keypair: {0}")]
    Leaf(#[from] LeafError),
    /// rustls refused TLS 1.3 with this provider (a build problem).
    #[error("TLS config: {0}")]
    Versions(rustls::Error),
}

/// Builds the listener's TLS config: the bootstrap CA pins the client, and
/// the server certificate is whatever leaf is current at each handshake (a
/// rotation swaps it without touching open connections).
pub fn server_config(
    ca_pem: &[u8],
    leaf: &Arc<CurrentLeaf>,
) -> Result<rustls::ServerConfig, ServerConfigError> {
    let provider = tls::provider();
    let roots = tls::root_store("ca.pem", ca_pem).map_err(|_| ServerConfigError::CaPem)?;
    let verifier = tls::PinnedClientVerifier::new(roots, CONTROL_PLANE_CN, "clawkerd listener")?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(ServerConfigError::Versions)?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(leaf.resolver());
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}

/// Who is on the other end of an accepted connection, computed once per
/// connection from the verified client certificate. tonic puts it in every
/// request's extensions (via [`Connected`]).
#[derive(Debug, Clone, Default)]
pub struct PeerIdentity {
    pub cn: String,
    /// Lowercase hex SHA-256 of the leaf DER.
    pub thumbprint: String,
    pub addr: Option<SocketAddr>,
}

/// An accepted, verified TLS connection.
pub struct CpConn {
    stream: TlsStream<TcpStream>,
    peer: PeerIdentity,
}

impl CpConn {
    fn new(stream: TlsStream<TcpStream>, addr: SocketAddr) -> Self {
        let leaf = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.to_vec());
        let peer = match leaf {
            Some(der) => PeerIdentity {
                cn: tls::cert_cn(&der),
                thumbprint: Thumbprint::of_der(&der).to_hex(),
                addr: Some(addr),
            },
            None => PeerIdentity {
                addr: Some(addr),
                ..Default::default()
            },
        };
        Self { stream, peer }
    }
}

impl Connected for CpConn {
    type ConnectInfo = PeerIdentity;
    fn connect_info(&self) -> PeerIdentity {
        self.peer.clone()
    }
}

impl AsyncRead for CpConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for CpConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// A bound listener, not yet serving.
pub struct Listener {
    tcp: TcpListener,
    acceptor: TlsAcceptor,
}

impl Listener {
    /// Binds `addr`. A bind failure is transient (exit 1).
    pub async fn bind(addr: SocketAddr, cfg: rustls::ServerConfig) -> std::io::Result<Self> {
        let tcp = TcpListener::bind(addr).await?;
        Ok(Self {
            tcp,
            acceptor: TlsAcceptor::from(Arc::new(cfg)),
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.tcp.local_addr()
    }

    /// Serves sessions until `shutdown`. Returns only on a fatal server
    /// error or shutdown.
    pub async fn serve(
        self,
        svc: ClawkerdSvc,
        shutdown: CancellationToken,
    ) -> Result<(), tonic::transport::Error> {
        let Listener { tcp, acceptor } = self;
        let rx = tls::accept_loop(
            tcp,
            acceptor,
            HANDSHAKE_TIMEOUT,
            "tls_handshake_rejected",
            shutdown.clone(),
        );
        let incoming = ReceiverStream::new(rx)
            .map(|(stream, peer)| Ok::<_, std::io::Error>(CpConn::new(stream, peer)));
        tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            // Large windows: one command's stdout should not stall on
            // HTTP/2 flow control (the 1 GB/s target).
            .initial_stream_window_size(Some(8 << 20))
            .initial_connection_window_size(Some(16 << 20))
            .max_frame_size(Some(1 << 20))
            .add_service(ClawkerdServiceServer::new(svc))
            .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{Ca, LeafSpec};
    use rcgen::ExtendedKeyUsagePurpose as Eku;

    fn leaf(ca: &Ca, cn: &str, ekus: Vec<Eku>) -> Vec<u8> {
        let mut spec = LeafSpec::new(cn, time::Duration::hours(1));
        spec.ekus = ekus;
        ca.issue(&spec).unwrap().cert_der
    }

    #[test]
    fn cn_pin_and_eku_checks() {
        let ca = Ca::generate().unwrap();
        let check = |der: &[u8]| tls::check_pinned_leaf(der, CONTROL_PLANE_CN);
        assert!(check(&leaf(&ca, CONTROL_PLANE_CN, vec![Eku::ClientAuth])).is_ok());
        assert_eq!(
            check(&leaf(&ca, "evil-cn", vec![Eku::ClientAuth])),
            Err("peer CN not authorized")
        );
        let e = check(&leaf(&ca, CONTROL_PLANE_CN, vec![Eku::ServerAuth])).unwrap_err();
        assert!(e.contains("missing ClientAuth EKU"));
        let e = check(&leaf(&ca, CONTROL_PLANE_CN, vec![Eku::Any])).unwrap_err();
        assert!(e.contains("missing ClientAuth EKU"));
    }

    #[test]
    fn config_errors_use_reference_texts() {
        let e = super::super::leaf::Leaf::from_pem(b"garbage", b"garbage").unwrap_err();
        assert!(
            ServerConfigError::from(e)
                .to_string()
                .starts_with("TLS config: agent leaf keypair: ")
        );
        let ca = Ca::generate().unwrap();
        let ck = ca.mint_cp_client().unwrap();
        let leaf = CurrentLeaf::new(
            super::super::leaf::Leaf::from_pem(ck.cert_pem.as_bytes(), ck.key_pem.as_bytes())
                .unwrap(),
        );
        assert_eq!(
            server_config(b"nope", &leaf).unwrap_err().to_string(),
            "TLS config: CA PEM did not parse"
        );
        assert!(server_config(ca.cert_pem().as_bytes(), &leaf).is_ok());
    }
}
