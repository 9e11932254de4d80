//! What the TLS layer tells us about the caller: the verified leaf (its
//! thumbprint, CN and container URI SAN) and the remote address.
//!
//! tonic (feature `tls-connect-info`) puts a `TlsConnectInfo<TcpConnectInfo>`
//! into every request's extensions when it is served from our rustls
//! accept loop; both the tower layers (on `http::Request`) and the handler
//! (on `tonic::Request`) read it from there.

use std::net::SocketAddr;

use tonic::codegen::http::Extensions;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::identity::{self, Thumbprint};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerError {
    #[error("no TLS connection info")]
    NoTlsInfo,
    #[error("peer presented no client certificate")]
    NoCertificate,
    #[error("peer certificate does not parse: {0}")]
    BadCertificate(String),
    #[error("peer address unavailable")]
    NoAddress,
}

/// The caller's leaf certificate, as far as identity checks care.
#[derive(Debug, Clone)]
pub struct PeerLeaf {
    /// SHA-256 of the leaf DER.
    pub thumbprint: Thumbprint,
    /// Subject CN; empty if the certificate has none.
    pub cn: String,
    /// The id in the first `urn:clawker:container:<id>` URI SAN.
    pub container_id: Option<String>,
}

impl PeerLeaf {
    pub fn parse(der: &[u8]) -> Result<Self, PeerError> {
        let (_, cert) = X509Certificate::from_der(der)
            .map_err(|e| PeerError::BadCertificate(crate::peer_text::bound(e.to_string())))?;
        let cn = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|a| a.as_str().ok())
            .unwrap_or_default()
            .to_owned();
        let mut uris = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                if let GeneralName::URI(u) = name {
                    uris.push(*u);
                }
            }
        }
        // CN and SAN are the peer's strings: bounded at decode.
        Ok(Self {
            thumbprint: Thumbprint::of_der(der),
            cn: crate::peer_text::bound(cn),
            container_id: identity::container_id_from_uris(uris).map(crate::peer_text::bound),
        })
    }
}

fn tls_info(ext: &Extensions) -> Result<&TlsConnectInfo<TcpConnectInfo>, PeerError> {
    ext.get::<TlsConnectInfo<TcpConnectInfo>>()
        .ok_or(PeerError::NoTlsInfo)
}

/// The verified client leaf (first certificate of the chain rustls checked).
pub fn peer_leaf(ext: &Extensions) -> Result<PeerLeaf, PeerError> {
    let certs = tls_info(ext)?
        .peer_certs()
        .ok_or(PeerError::NoCertificate)?;
    let leaf = certs.first().ok_or(PeerError::NoCertificate)?;
    PeerLeaf::parse(leaf.as_ref())
}

/// Whether the connection presented (and rustls verified) a client cert.
pub fn has_client_cert(ext: &Extensions) -> bool {
    tls_info(ext)
        .ok()
        .and_then(|i| i.peer_certs())
        .is_some_and(|c| !c.is_empty())
}

/// The peer's socket address.
pub fn peer_addr(ext: &Extensions) -> Result<SocketAddr, PeerError> {
    tls_info(ext)?
        .get_ref()
        .remote_addr()
        .ok_or(PeerError::NoAddress)
}
