//! The Register coordinator (reference §9): trade the bootstrap assertion
//! for a bearer token at the CP's token endpoint, then call
//! `AgentService.Register` over mTLS with the agent leaf.
//!
//! Where we differ from the reference, on purpose: it caches the *outcome*
//! of the first attempt that reached the token endpoint, forever, so one
//! transient fault after the assertion was spent (a Docker timeout in the
//! CP's Register, a CP restart) bricked the agent. We cache the *access
//! token* instead and never the outcome: every `RegisterRequired` makes a
//! real attempt, with the cached token while it is valid. A token the CP
//! does not accept (`UNAUTHENTICATED`: it restarted without it, it expired,
//! it was revoked) is dropped and the assertion exchanged again in the same
//! attempt — the CP re-issues for an assertion whose grant no Register has
//! redeemed yet (`registry::grants` on the CP side). Concurrent
//! `RegisterRequired`s (same or other sessions) share the one attempt in
//! flight, under one mutex.
//!
//! Addresses are `IP:port` (static binary, no NSS); the TLS server name is
//! always `clawker-controlplane`, whatever the IP.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::Mutex;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::config::{Bootstrap, env};
use super::leaf::CurrentLeaf;
use crate::identity::CONTROL_PLANE_CN;
use crate::proto::agent::v1::{RegisterRequest, agent_service_client::AgentServiceClient};
use crate::tls;

/// Token exchange deadline (connect + TLS + request + response).
pub const TOKEN_TIMEOUT: Duration = Duration::from_secs(10);
/// AgentService.Register deadline.
pub const REGISTER_TIMEOUT: Duration = Duration::from_secs(15);
/// Scope requested for the token.
pub const SCOPE: &str = "agent:self:register";
const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// Inputs of a register attempt.
#[derive(Debug, Clone)]
pub struct RegisterConfig {
    pub token_url: String,
    pub agent_addr: String,
    pub agent: String,
    pub project: String,
    pub bootstrap: Bootstrap,
    /// The leaf presented to AgentService: the current one, rotated or not.
    pub leaf: std::sync::Arc<CurrentLeaf>,
}

/// Why a register attempt failed. The Display is the exact
/// `RegisterDone.error` text of the reference (§9.3), word for word (the
/// CP reads retryability from it, e.g. `code = Unavailable`). Clone: the
/// outcome of an attempt is shared with concurrent callers, so foreign
/// errors are kept as their text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegisterError {
    #[error("{var} unset; cannot exchange assertion", var = env::CP_TOKEN_URL)]
    TokenUrlUnset,
    #[error("{var} unset; cannot dial AgentService", var = env::CP_AGENT_ADDR)]
    AgentAddrUnset,
    #[error("token TLS config: CA PEM did not parse")]
    TokenTlsConfig,
    #[error("hydra token exchange: {0}")]
    TokenExchange(#[from] ExchangeError),
    /// The agent leaf or key in the bootstrap bundle is unusable.
    #[error("dial TLS config: {0}")]
    DialTlsConfig(String),
    #[error("dial CP agent listener: {0}")]
    Dial(String),
    #[error("AgentService.Register: token is not a valid header value")]
    BadToken,
    /// The CP refused (or never answered) the Register call.
    #[error("AgentService.Register: rpc error: code = {code:?} desc = {message}")]
    Rpc { code: tonic::Code, message: String },
}

/// How the token exchange failed (reference §9.3 step 6).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExchangeError {
    /// No HTTP response: DNS, TCP, TLS, timeout, or a bad URL.
    #[error("post to {url}: {detail}")]
    Transport { url: String, detail: String },
    #[error("read response: {0}")]
    ReadBody(String),
    #[error("hydra returned {status}: {body}")]
    Status {
        status: http::StatusCode,
        body: String,
    },
    #[error("decode response: {0}")]
    Decode(String),
    #[error("hydra returned empty access_token")]
    EmptyToken,
    #[error("hydra returned unexpected token_type {0:?} (expected Bearer)")]
    TokenType(String),
}

/// A token is dropped this long before the CP would stop accepting it, so
/// an attempt never starts with a token that expires mid-call.
pub const TOKEN_EXPIRY_MARGIN: Duration = Duration::from_secs(30);

/// The access token the coordinator keeps between attempts.
#[derive(Clone)]
pub struct CachedToken {
    value: String,
    /// From the token response's `expires_in`; `None` when it gave none
    /// (then only the CP's `UNAUTHENTICATED` retires the token).
    expires_at: Option<Instant>,
}

impl std::fmt::Debug for CachedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedToken")
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

impl CachedToken {
    /// A token from a response received at `received` saying `expires_in`.
    pub fn new(value: String, received: Instant, expires_in: Option<u64>) -> Self {
        Self {
            value,
            expires_at: expires_in.map(|s| received + Duration::from_secs(s)),
        }
    }

    /// Worth presenting at `now` (not within [`TOKEN_EXPIRY_MARGIN`] of
    /// its expiry).
    pub fn usable(&self, now: Instant) -> bool {
        self.expires_at
            .is_none_or(|exp| now + TOKEN_EXPIRY_MARGIN < exp)
    }
}

struct State {
    token: Option<CachedToken>,
    /// The latest attempt's outcome, handed to callers that waited for it.
    last: Option<Result<(), RegisterError>>,
}

pub struct Coordinator {
    cfg: RegisterConfig,
    state: Mutex<State>,
    /// Attempts finished so far (incremented under the state lock).
    finished: AtomicU64,
}

impl Coordinator {
    pub fn new(cfg: RegisterConfig) -> Arc<Self> {
        Arc::new(Self {
            cfg,
            state: Mutex::new(State {
                token: None,
                last: None,
            }),
            finished: AtomicU64::new(0),
        })
    }

    /// Runs one register attempt, or joins the one in flight. `RegisterDone`
    /// is `{ok: true, error: ""}` for `Ok`, else `{ok: false, error: <Display>}`.
    pub async fn run(&self) -> Result<(), RegisterError> {
        let arrived = self.finished.load(Ordering::Acquire);
        let mut state = self.state.lock().await;
        if self.finished.load(Ordering::Acquire) > arrived
            && let Some(outcome) = state.last.clone()
        {
            // An attempt ran to its end while we waited for the lock: its
            // answer is as fresh as ours would be.
            tracing::info!(event = "register_joined_attempt", ok = outcome.is_ok());
            return outcome;
        }
        let outcome = self.attempt(&mut state.token).await;
        if let Err(e) = &outcome {
            tracing::warn!(
                event = "register_attempt_failed",
                token_cached = state.token.is_some(),
                error = %e
            );
        }
        state.last = Some(outcome.clone());
        self.finished.fetch_add(1, Ordering::AcqRel);
        outcome
    }

    async fn attempt(&self, token: &mut Option<CachedToken>) -> Result<(), RegisterError> {
        let c = &self.cfg;
        if c.token_url.is_empty() {
            tracing::error!(event = "register_env_missing", var = env::CP_TOKEN_URL);
            return Err(RegisterError::TokenUrlUnset);
        }
        if c.agent_addr.is_empty() {
            tracing::error!(event = "register_env_missing", var = env::CP_AGENT_ADDR);
            return Err(RegisterError::AgentAddrUnset);
        }
        let roots = match tls::root_store("ca.pem", &c.bootstrap.ca_pem) {
            Ok(r) => Arc::new(r),
            Err(_) => {
                tracing::error!(event = "token_tls_config_failed");
                return Err(RegisterError::TokenTlsConfig);
            }
        };
        let cached = token.as_ref().filter(|t| t.usable(Instant::now())).cloned();
        let (value, fresh) = match cached {
            Some(t) => {
                tracing::info!(event = "register_token_reused");
                (t.value, false)
            }
            None => {
                let t = self.fresh_token(roots.clone()).await?;
                *token = Some(t.clone());
                (t.value, true)
            }
        };
        let result = match register(c, &value, roots.clone()).await {
            // The CP does not know the token (restarted without it, expired,
            // revoked): trade the assertion again, once, and retry.
            Err(RegisterError::Rpc {
                code: tonic::Code::Unauthenticated,
                message,
            }) if !fresh => {
                tracing::warn!(event = "register_token_rejected", reason = %message);
                *token = None;
                let t = self.fresh_token(roots.clone()).await?;
                *token = Some(t.clone());
                register(c, &t.value, roots).await
            }
            other => other,
        };
        result?;
        tracing::info!(event = "register_rpc_ok");
        Ok(())
    }

    async fn fresh_token(
        &self,
        roots: Arc<rustls::RootCertStore>,
    ) -> Result<CachedToken, RegisterError> {
        let c = &self.cfg;
        tracing::info!(event = "token_exchange_attempt", url = %c.token_url);
        let received = Instant::now();
        match exchange(&c.token_url, &c.bootstrap.assertion, roots).await {
            Ok((value, expires_in)) => {
                tracing::info!(event = "token_acquired", expires_in);
                Ok(CachedToken::new(value, received, expires_in))
            }
            Err(e) => {
                let error = RegisterError::from(e);
                tracing::error!(event = "token_exchange_failed", error = %error);
                Err(error)
            }
        }
    }
}

/// A parsed `https://host:port/path` URL.
struct TokenUrl {
    host: String,
    port: u16,
    path: String,
}

fn parse_url(url: &str) -> Result<TokenUrl, String> {
    let rest = url
        .strip_prefix("https://")
        .ok_or_else(|| format!("{url:?}: only https:// URLs are supported"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => {
            (h, p.parse().map_err(|_| format!("{url:?}: bad port"))?)
        }
        _ => (authority, 443),
    };
    Ok(TokenUrl {
        host: host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned(),
        port,
        path: path.to_owned(),
    })
}

async fn resolve(host: &str, port: u16) -> std::io::Result<SocketAddr> {
    if let Ok(ip) = host.parse() {
        return Ok(SocketAddr::new(ip, port));
    }
    tokio::net::lookup_host((host, port))
        .await?
        .next()
        .ok_or_else(|| std::io::Error::other(format!("no address for {host}")))
}

/// `application/x-www-form-urlencoded` value encoding.
fn form_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

async fn tls_dial(
    addr: SocketAddr,
    cfg: rustls::ClientConfig,
) -> std::io::Result<TlsStream<TcpStream>> {
    let name = ServerName::try_from(CONTROL_PLANE_CN).map_err(std::io::Error::other)?;
    let tcp = TcpStream::connect(addr).await?;
    let _ = tcp.set_nodelay(true);
    TlsConnector::from(Arc::new(cfg)).connect(name, tcp).await
}

/// POSTs the client-credentials form and returns the access token and its
/// `expires_in` (seconds), if the response has one.
async fn exchange(
    url: &str,
    assertion: &str,
    roots: Arc<rustls::RootCertStore>,
) -> Result<(String, Option<u64>), ExchangeError> {
    let transport = |detail: String| ExchangeError::Transport {
        url: url.to_owned(),
        detail,
    };
    let u = parse_url(url).map_err(transport)?;
    let mut cfg = rustls::ClientConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| transport(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let mut pairs = [
        ("client_assertion", assertion),
        ("client_assertion_type", ASSERTION_TYPE),
        ("grant_type", "client_credentials"),
        ("scope", SCOPE),
    ];
    pairs.sort();
    let body: String = pairs
        .iter()
        .map(|(k, v)| format!("{k}={}", form_encode(v)))
        .collect::<Vec<_>>()
        .join("&");

    let send = async {
        let addr = resolve(&u.host, u.port).await.map_err(|e| e.to_string())?;
        let stream = tls_dial(addr, cfg).await.map_err(|e| e.to_string())?;
        let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
        let authority = format!("{}:{}", u.host, u.port);
        let builder = http::Request::post(if h2 {
            format!("https://{authority}{}", u.path)
        } else {
            u.path.clone()
        })
        .header(http::header::HOST, &authority)
        .header(
            http::header::CONTENT_TYPE,
            "application/x-www-form-urlencoded",
        );
        let req = builder
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        let io = TokioIo::new(stream);
        let resp = if h2 {
            let (mut tx, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            tx.send_request(req).await.map_err(|e| e.to_string())?
        } else {
            let (mut tx, conn) = hyper::client::conn::http1::handshake(io)
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            tx.send_request(req).await.map_err(|e| e.to_string())?
        };
        Ok::<_, String>(resp)
    };
    let resp = match tokio::time::timeout(TOKEN_TIMEOUT, send).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return Err(transport(e)),
        Err(_) => return Err(transport("timeout".into())),
    };
    // From here on the issuer has seen the assertion.
    let status = resp.status();
    let body = match tokio::time::timeout(
        TOKEN_TIMEOUT,
        Limited::new(resp.into_body(), 1 << 20).collect(),
    )
    .await
    {
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(e)) => return Err(ExchangeError::ReadBody(e.to_string())),
        Err(_) => return Err(ExchangeError::ReadBody("timeout".into())),
    };
    if status != http::StatusCode::OK {
        return Err(ExchangeError::Status {
            status,
            body: String::from_utf8_lossy(&body).into_owned(),
        });
    }
    #[derive(serde::Deserialize)]
    struct TokenResponse {
        #[serde(default)]
        access_token: String,
        #[serde(default)]
        token_type: String,
        #[serde(default)]
        expires_in: Option<i64>,
    }
    let tr: TokenResponse =
        serde_json::from_slice(&body).map_err(|e| ExchangeError::Decode(e.to_string()))?;
    if tr.access_token.is_empty() {
        return Err(ExchangeError::EmptyToken);
    }
    if !tr.token_type.is_empty() && !tr.token_type.eq_ignore_ascii_case("bearer") {
        return Err(ExchangeError::TokenType(tr.token_type));
    }
    let expires_in = tr.expires_in.and_then(|s| u64::try_from(s).ok());
    Ok((tr.access_token, expires_in))
}

/// Dials AgentService with the agent leaf and calls Register.
async fn register(
    c: &RegisterConfig,
    token: &str,
    roots: Arc<rustls::RootCertStore>,
) -> Result<(), RegisterError> {
    let leaf = c.leaf.load();
    let cfg = (|| {
        let certs = tls::load_certs("cert.pem", &leaf.cert_pem)?;
        let key = tls::load_key("key.pem", &leaf.key_pem)?;
        let mut cfg = rustls::ClientConfig::builder_with_provider(tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| tls::TlsError::Rustls {
                what: "versions".into(),
                detail: e.to_string(),
            })?
            .with_root_certificates(roots)
            .with_client_auth_cert(certs, key)
            .map_err(|e| tls::TlsError::Rustls {
                what: "agent leaf keypair".into(),
                detail: e.to_string(),
            })?;
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        Ok::<_, tls::TlsError>(cfg)
    })()
    .map_err(|e| {
        tracing::error!(event = "register_dial_tls_failed", error = %e);
        RegisterError::DialTlsConfig(e.to_string())
    })?;
    let addr: SocketAddr = match c.agent_addr.parse() {
        Ok(a) => a,
        Err(_) => {
            let (h, p) = c
                .agent_addr
                .rsplit_once(':')
                .and_then(|(h, p)| Some((h.to_owned(), p.parse::<u16>().ok()?)))
                .ok_or_else(|| RegisterError::Dial(format!("bad address {:?}", c.agent_addr)))?;
            resolve(&h, p)
                .await
                .map_err(|e| RegisterError::Dial(e.to_string()))?
        }
    };
    tracing::info!(event = "register_dial", addr = %addr);
    let connector = tower::service_fn(move |_uri: http::Uri| {
        let cfg = cfg.clone();
        async move { tls_dial(addr, cfg).await.map(TokioIo::new) }
    });
    let channel = tokio::time::timeout(
        REGISTER_TIMEOUT,
        tonic::transport::Endpoint::from_static("http://clawker-controlplane")
            .connect_with_connector(connector),
    )
    .await
    .map_err(|_| RegisterError::Dial("timeout".into()))
    .and_then(|r| r.map_err(|e| RegisterError::Dial(error_chain(&e))))
    .inspect_err(|e| tracing::error!(event = "register_dial_failed", error = %e))?;
    let mut client = AgentServiceClient::new(channel);
    let mut req = tonic::Request::new(RegisterRequest {
        agent_name: c.agent.clone(),
        project: c.project.clone(),
    });
    req.set_timeout(REGISTER_TIMEOUT);
    let bearer = format!("Bearer {token}")
        .parse()
        .map_err(|_| RegisterError::BadToken)?;
    req.metadata_mut().insert("authorization", bearer);
    match tokio::time::timeout(REGISTER_TIMEOUT, client.register(req)).await {
        Ok(Ok(_welcome)) => Ok(()),
        Ok(Err(s)) => {
            let e = RegisterError::Rpc {
                code: s.code(),
                message: s.message().to_owned(),
            };
            tracing::error!(event = "register_rpc_failed", error = %e);
            Err(e)
        }
        Err(_) => {
            let e = RegisterError::Rpc {
                code: tonic::Code::DeadlineExceeded,
                message: "context deadline exceeded".into(),
            };
            tracing::error!(event = "register_rpc_failed", error = %e);
            Err(e)
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_parsing() {
        let u = parse_url("https://10.0.0.1:7444/oauth2/token").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.path.as_str()),
            ("10.0.0.1", 7444, "/oauth2/token")
        );
        let u = parse_url("https://cp/x").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("cp", 443));
        assert!(parse_url("http://cp/x").is_err());
    }

    #[test]
    fn error_texts_follow_the_reference() {
        let exchange = |e: ExchangeError| RegisterError::from(e);
        let cases = [
            (
                RegisterError::TokenUrlUnset,
                "CLAWKER_CP_TOKEN_URL unset; cannot exchange assertion",
            ),
            (
                RegisterError::AgentAddrUnset,
                "CLAWKER_CP_AGENT_ADDR unset; cannot dial AgentService",
            ),
            (
                RegisterError::TokenTlsConfig,
                "token TLS config: CA PEM did not parse",
            ),
            (
                exchange(ExchangeError::Transport {
                    url: "https://cp/t".into(),
                    detail: "timeout".into(),
                }),
                "hydra token exchange: post to https://cp/t: timeout",
            ),
            (
                exchange(ExchangeError::ReadBody("timeout".into())),
                "hydra token exchange: read response: timeout",
            ),
            (
                exchange(ExchangeError::Status {
                    status: http::StatusCode::BAD_REQUEST,
                    body: "{}".into(),
                }),
                "hydra token exchange: hydra returned 400 Bad Request: {}",
            ),
            (
                exchange(ExchangeError::Decode("eof".into())),
                "hydra token exchange: decode response: eof",
            ),
            (
                exchange(ExchangeError::EmptyToken),
                "hydra token exchange: hydra returned empty access_token",
            ),
            (
                exchange(ExchangeError::TokenType("mac".into())),
                "hydra token exchange: hydra returned unexpected token_type \"mac\" (expected Bearer)",
            ),
            (
                RegisterError::DialTlsConfig("cert.pem: no certificate in PEM".into()),
                "dial TLS config: cert.pem: no certificate in PEM",
            ),
            (
                RegisterError::Dial("timeout".into()),
                "dial CP agent listener: timeout",
            ),
            (
                RegisterError::BadToken,
                "AgentService.Register: token is not a valid header value",
            ),
            (
                RegisterError::Rpc {
                    code: tonic::Code::DeadlineExceeded,
                    message: "context deadline exceeded".into(),
                },
                "AgentService.Register: rpc error: code = DeadlineExceeded desc = context deadline exceeded",
            ),
        ];
        for (e, text) in cases {
            assert_eq!(e.to_string(), text);
        }
    }

    #[test]
    fn a_cached_token_is_retired_before_it_expires() {
        let t0 = Instant::now();
        let t = CachedToken::new("tok".into(), t0, Some(3600));
        assert!(t.usable(t0));
        assert!(
            t.usable(t0 + Duration::from_secs(3600) - TOKEN_EXPIRY_MARGIN - Duration::from_secs(1))
        );
        assert!(!t.usable(t0 + Duration::from_secs(3600) - TOKEN_EXPIRY_MARGIN));
        assert!(!t.usable(t0 + Duration::from_secs(7200)));
        // Without expires_in only the CP can retire it.
        let open = CachedToken::new("tok".into(), t0, None);
        assert!(open.usable(t0 + Duration::from_secs(1_000_000)));
        assert!(
            !format!("{open:?}").contains("tok\""),
            "the token is never printed"
        );
    }

    #[test]
    fn form_encoding() {
        assert_eq!(form_encode("a b:c/d"), "a%20b%3Ac%2Fd");
        assert_eq!(form_encode("eyJ.abc-_"), "eyJ.abc-_");
    }
}
