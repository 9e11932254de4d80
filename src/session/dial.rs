//! One connection attempt to a clawkerd: TCP + mTLS (permissive: record the
//! peer, never reject) + Session stream + Hello/HelloAck with a timeout.
//!
//! Why permissive: the CP must keep a channel even to an agent it does not
//! trust, so containment commands can still reach it. Identity is decided
//! afterwards from what the verifier recorded (classification).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::RootCertStore;
use tokio::sync::mpsc;
use tonic::transport::Endpoint;

use crate::proto::clawkerd::v1::{self as pb, clawkerd_service_client::ClawkerdServiceClient};
use crate::proto::clawkerd::v1::{command, response};
use crate::tls::{self, PeerInfo, PermissiveServerVerifier, TlsError};

use super::mux::{MuxError, SessionMux, command as cmd, payload_name};

/// Largest gRPC message either way on a session: a hostile clawkerd cannot
/// make the CP buffer more than this per frame (clawkerd's output chunks
/// are 128 KiB).
pub const MAX_MESSAGE_BYTES: usize = 4 << 20;

/// Everything needed to dial any clawkerd; built once, shared by sessions.
#[derive(Clone)]
pub struct DialConfig {
    roots: Arc<RootCertStore>,
    client_cert_pem: Arc<Vec<u8>>,
    client_key_pem: Arc<Vec<u8>>,
    /// TCP connect + TLS handshake bound.
    pub connect_timeout: Duration,
    /// Bound on Hello → HelloAck (the reference had none).
    pub hello_timeout: Duration,
}

impl std::fmt::Debug for DialConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DialConfig")
            .field("connect_timeout", &self.connect_timeout)
            .field("hello_timeout", &self.hello_timeout)
            .finish_non_exhaustive()
    }
}

impl DialConfig {
    /// From the CA cert and the CP client cert/key (PEM). Load errors show
    /// up here, at construction, never at the first dial.
    pub fn new(
        ca_pem: &[u8],
        client_cert_pem: &[u8],
        client_key_pem: &[u8],
    ) -> Result<Self, TlsError> {
        let roots = Arc::new(tls::root_store("CA cert", ca_pem)?);
        // Validate the pair now by building a config once.
        tls::cp_dial_config(
            client_cert_pem,
            client_key_pem,
            PermissiveServerVerifier::new(roots.clone()),
        )?;
        Ok(Self {
            roots,
            client_cert_pem: Arc::new(client_cert_pem.to_vec()),
            client_key_pem: Arc::new(client_key_pem.to_vec()),
            connect_timeout: Duration::from_secs(5),
            hello_timeout: Duration::from_secs(10),
        })
    }
}

/// A live session: the mux plus what we learned about the peer. Dropping
/// it closes the connection.
pub struct Connection {
    pub mux: SessionMux,
    pub peer: PeerInfo,
    /// The HelloAck clawkerd actually sent (a v0.8.0 clawkerd sends an
    /// empty one: neither initialized nor running its command).
    pub hello: pb::HelloAck,
    // Keeps the HTTP/2 connection (and so the stream) alive.
    _client: ClawkerdServiceClient<tonic::transport::Channel>,
}

/// Why one attempt failed. For logs and retry decisions only: session
/// events carry fixed classifications, never these texts.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("client TLS config: {0}")]
    Tls(#[from] TlsError),
    #[error("connect {addr}: {detail}")]
    Connect { addr: SocketAddr, detail: String },
    #[error("connect {0}: no certificate recorded")]
    NoPeerCertificate(SocketAddr),
    #[error("open Session stream: {0}")]
    OpenStream(tonic::Status),
    #[error("send Hello: {0}")]
    SendHello(MuxError),
    #[error("expected HelloAck, got {0}")]
    UnexpectedReply(&'static str),
    #[error("recv HelloAck: {0}")]
    Closed(String),
    #[error("Hello handshake: no HelloAck within {0:?}")]
    HelloTimeout(Duration),
}

/// One attempt.
pub async fn connect(addr: SocketAddr, cfg: &DialConfig) -> Result<Connection, DialError> {
    let verifier = PermissiveServerVerifier::new(cfg.roots.clone());
    let tls_cfg = Arc::new(tls::cp_dial_config(
        &cfg.client_cert_pem,
        &cfg.client_key_pem,
        verifier.clone(),
    )?);
    let connector = tls::connector(addr, tls_cfg, cfg.connect_timeout);
    let channel = Endpoint::from_static("http://clawkerd")
        .initial_stream_window_size(Some(8 << 20))
        .initial_connection_window_size(Some(16 << 20))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true)
        .connect_with_connector(connector)
        .await
        .map_err(|e| DialError::Connect {
            addr,
            // May carry what the peer said (a GOAWAY, an alert).
            detail: crate::peer_text::bound(error_chain(&e)),
        })?;
    let mut peer = verifier.peer().ok_or(DialError::NoPeerCertificate(addr))?;
    // Both come from the peer's certificate (and a verifier's complaint
    // about it): bounded before they reach events and logs.
    peer.cn = crate::peer_text::bound(peer.cn);
    peer.chain_error = peer.chain_error.map(crate::peer_text::bound);
    let mut client = ClawkerdServiceClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let (tx, rx) = mpsc::channel::<pb::Command>(256);
    let hello = async {
        let resp = client
            .session(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .map_err(|s| {
                DialError::OpenStream(tonic::Status::new(
                    s.code(),
                    crate::peer_text::bound(s.message()),
                ))
            })?;
        let mux = SessionMux::start(tx, resp.into_inner());
        let mut replies = mux
            .call(cmd("hello", command::Payload::Hello(pb::Hello {})))
            .await
            .map_err(DialError::SendHello)?;
        match replies.next().await {
            Some(pb::Response {
                payload: Some(response::Payload::HelloAck(ack)),
                ..
            }) => Ok((mux, ack)),
            Some(r) => Err(DialError::UnexpectedReply(payload_name(&r))),
            None => Err(DialError::Closed(mux.closed().await.reason())),
        }
    };
    let (mux, hello) = tokio::time::timeout(cfg.hello_timeout, hello)
        .await
        .map_err(|_| DialError::HelloTimeout(cfg.hello_timeout))??;
    Ok(Connection {
        mux,
        peer,
        hello,
        _client: client,
    })
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}
