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
use tower::ServiceExt as _;

use crate::proto::clawkerd::v1 as pb;
use crate::proto::clawkerd::v1::{command, response};
use crate::tls::{self, PeerInfo, PermissiveServerVerifier, TlsError};

use super::h2::{self, H2Settings};
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
    /// HTTP/2 windows, frame size, keepalive.
    pub h2: H2Settings,
    /// Bounds dials in progress (TCP + TLS + Hello) across all sessions.
    /// When thousands of sessions dial at once (a CP restart under a big
    /// fleet), unbounded handshakes share the CPU until every one of them
    /// outlives its timeout and all retry together; bounded, they finish
    /// in turn.
    handshakes: Arc<tokio::sync::Semaphore>,
}

/// Dials in progress at once, per CP.
pub const MAX_CONCURRENT_DIALS: usize = 64;

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
            h2: H2Settings::default(),
            handshakes: Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_DIALS)),
        })
    }
}

/// A live session: the mux plus what we learned about the peer. The
/// HTTP/2 connection lives as long as the Session stream: dropping the
/// last mux handle ends the request side, and the connection closes once
/// clawkerd ends its side.
pub struct Connection {
    pub mux: SessionMux,
    pub peer: PeerInfo,
    /// The HelloAck clawkerd actually sent (a v0.8.0 clawkerd sends an
    /// empty one: neither initialized nor running its command).
    pub hello: pb::HelloAck,
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
    // The semaphore is never closed; waiting for a turn is not part of
    // the attempt's timeouts.
    let _turn = cfg.handshakes.acquire().await.ok();
    let verifier = PermissiveServerVerifier::new(cfg.roots.clone());
    let tls_cfg = Arc::new(tls::cp_dial_config(
        &cfg.client_cert_pem,
        &cfg.client_key_pem,
        verifier.clone(),
    )?);
    let connect_err = |detail: String| DialError::Connect { addr, detail };
    let io = tls::connector(addr, tls_cfg, cfg.connect_timeout)
        .oneshot(http::Uri::from_static("http://clawkerd"))
        .await
        // May carry what the peer said (a GOAWAY, an alert).
        .map_err(|e| connect_err(crate::peer_text::bound(error_chain(&e))))?
        .into_inner();
    let h2 = h2::handshake(io, &cfg.h2)
        .await
        .map_err(|e| connect_err(crate::peer_text::bound(error_chain(&e))))?;
    let mut peer = verifier.peer().ok_or(DialError::NoPeerCertificate(addr))?;
    // Both come from the peer's certificate (and a verifier's complaint
    // about it): bounded before they reach events and logs.
    peer.cn = crate::peer_text::bound(peer.cn);
    peer.chain_error = peer.chain_error.map(crate::peer_text::bound);
    let mut grpc = tonic::client::Grpc::with_origin(h2, http::Uri::from_static("http://clawkerd"))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let (tx, rx) = mpsc::channel::<Box<pb::Command>>(256);
    let hello = async {
        let resp = open_session(&mut grpc, rx).await.map_err(|s| {
            DialError::OpenStream(tonic::Status::new(
                s.code(),
                crate::peer_text::bound(s.message()),
            ))
        })?;
        let mux = SessionMux::start(tx, resp);
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
    Ok(Connection { mux, peer, hello })
}

/// The Session RPC, as the generated client makes it but with
/// [`SessionCodec`]'s buffers.
async fn open_session(
    grpc: &mut tonic::client::Grpc<h2::H2Client>,
    rx: mpsc::Receiver<Box<pb::Command>>,
) -> Result<tonic::codec::Streaming<pb::Response>, tonic::Status> {
    use futures::StreamExt as _;
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("connection not ready: {e}")))?;
    let path = http::uri::PathAndQuery::from_static("/clawker.clawkerd.v1.ClawkerdService/Session");
    let commands = tokio_stream::wrappers::ReceiverStream::new(rx).map(|c| *c);
    let req = tonic::Request::new(commands);
    Ok(grpc.streaming(req, path, SessionCodec).await?.into_inner())
}

/// Prost with small initial buffers. tonic's default allocates 8 KiB for
/// the request encoder and 8 KiB for the response decoder of every
/// stream, held for the stream's life; a session's stream lives as long
/// as the agent and is idle almost always. Both buffers grow on demand
/// when output or stdin flows.
#[derive(Debug, Clone, Copy, Default)]
struct SessionCodec;

/// Initial encode/decode buffer of a Session stream.
const SESSION_CODEC_BUFFER: usize = 512;
/// tonic's default: how much encoded data it batches before yielding.
const SESSION_CODEC_YIELD: usize = 32 * 1024;

impl tonic::codec::Codec for SessionCodec {
    type Encode = pb::Command;
    type Decode = pb::Response;
    type Encoder =
        <tonic_prost::ProstCodec<pb::Command, pb::Response> as tonic::codec::Codec>::Encoder;
    type Decoder =
        <tonic_prost::ProstCodec<pb::Command, pb::Response> as tonic::codec::Codec>::Decoder;

    fn encoder(&mut self) -> Self::Encoder {
        tonic_prost::ProstCodec::<pb::Command, pb::Response>::raw_encoder(
            tonic::codec::BufferSettings::new(SESSION_CODEC_BUFFER, SESSION_CODEC_YIELD),
        )
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstCodec::<pb::Command, pb::Response>::raw_decoder(
            tonic::codec::BufferSettings::new(SESSION_CODEC_BUFFER, SESSION_CODEC_YIELD),
        )
    }
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
