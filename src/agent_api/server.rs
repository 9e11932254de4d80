//! The CP's agent listener: AgentService (gRPC) and the OAuth2 token
//! endpoint on one TLS 1.3 port (default `:7444`), served with the CP's
//! server certificate.
//!
//! TLS: client certificates are *verified* against the clawker CA whenever
//! presented (a foreign or broken chain fails the handshake), but not
//! required, because clawkerd calls the token endpoint without one (wire
//! compatibility with the reference client). Every gRPC call is then
//! refused by the AuthInterceptor unless a verified client certificate is
//! present, so AgentService is mTLS-only in effect.
//!
//! Request path of a gRPC call: rustls accept loop → tonic (connect info in
//! extensions) → [`AuthLayer`] (token, scope, client pin) →
//! [`IdentityLayer`] (registry lookup unless opted out) → handler.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tonic::service::Routes;
use tower_layer::Layer;

use super::auth::{AuthLayer, TokenIntrospector};
use super::identity_interceptor::IdentityLayer;
use super::register::{INSPECT_TIMEOUT, RegisterService};
use super::scopes::{self, CLIENT_ID_AGENT, IdentityDecision, PolicyError};
use super::token::{self, TokenConfig, TokenIssuer, TokenSetupError};
use crate::pki::{self, AuthPaths, Jwk, PkiError};
use crate::proto::agent::v1::agent_service_server::AgentServiceServer;
use crate::registry::Registry;
use crate::runtime::Inspect;

/// Everything the agent listener needs. Build it with
/// [`AgentApiConfig::from_state_dir`] and adjust fields as needed.
#[derive(Clone)]
pub struct AgentApiConfig {
    /// Where to listen (`0.0.0.0:7444`, the clawker-net gateway, or
    /// `127.0.0.1:0` in tests).
    pub listen: SocketAddr,
    /// CP server certificate (PEM) presented to agents.
    pub server_cert_pem: String,
    /// Its private key (PEM, PKCS#8 or SEC1).
    pub server_key_pem: String,
    /// The clawker CA (PEM): client certificates must chain to it.
    pub ca_cert_pem: String,
    /// The CLI's public signing key: verifies client assertions.
    pub cli_jwk: Jwk,
    pub token: TokenConfig,
    /// AgentService method → scope (AuthInterceptor).
    pub method_scopes: HashMap<String, String>,
    /// AgentService method → identity decision (IdentityInterceptor).
    pub identity_policy: HashMap<String, IdentityDecision>,
    /// Validate bearer tokens elsewhere (e.g. an RFC 7662 endpoint) instead
    /// of with the embedded issuer's table. The token endpoint is still
    /// served either way.
    pub introspector: Option<Arc<dyn TokenIntrospector>>,
    /// Bound on one TLS handshake, so a silent peer cannot hold a slot.
    pub handshake_timeout: Duration,
    /// Bound on Register's Docker inspect.
    pub inspect_timeout: Duration,
}

impl std::fmt::Debug for AgentApiConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentApiConfig")
            .field("listen", &self.listen)
            .field("token", &self.token)
            .field("method_scopes", &self.method_scopes)
            .field("identity_policy", &self.identity_policy)
            .finish_non_exhaustive()
    }
}

impl AgentApiConfig {
    /// Reference policy with the given key material.
    pub fn new(
        listen: SocketAddr,
        server_cert_pem: String,
        server_key_pem: String,
        ca_cert_pem: String,
        cli_jwk: Jwk,
    ) -> Self {
        Self {
            token: TokenConfig::for_port(if listen.port() == 0 {
                crate::defaults::AGENT_PORT
            } else {
                listen.port()
            }),
            listen,
            server_cert_pem,
            server_key_pem,
            ca_cert_pem,
            cli_jwk,
            method_scopes: scopes::agent_method_scopes(),
            identity_policy: scopes::agent_identity_policy(),
            introspector: None,
            handshake_timeout: Duration::from_secs(10),
            inspect_timeout: INSPECT_TIMEOUT,
        }
    }

    /// Reads `<state>/auth/{tls/server.pem,tls/server.key,ca/ca.pem,cli/signing-jwk.json}`.
    pub fn from_state_dir(state_dir: &Path, listen: SocketAddr) -> Result<Self, AgentApiError> {
        let paths = AuthPaths::new(state_dir);
        let jwk_text = pki::read_file(&paths.signing_jwk())?;
        let cli_jwk: Jwk = serde_json::from_str(&jwk_text)
            .map_err(|e| AgentApiError::Jwk(format!("{}: {e}", paths.signing_jwk().display())))?;
        Ok(Self::new(
            listen,
            pki::read_file(&paths.server_cert())?,
            pki::read_file(&paths.server_key())?,
            pki::read_file(&paths.ca_cert())?,
            cli_jwk,
        ))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AgentApiError {
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error("CLI signing JWK: {0}")]
    Jwk(String),
    #[error("TLS configuration: {0}")]
    Tls(String),
    #[error("agent API policy: {0}")]
    Policy(#[from] PolicyError),
    #[error("token endpoint: {0}")]
    Token(#[from] TokenSetupError),
    #[error("loading issued tokens: {0}")]
    Tokens(#[from] crate::registry::RegistryError),
    #[error("bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("agent API server: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// rustls server config: TLS 1.3 only, CP server cert, client certs
/// verified against the CA when presented, ALPN h2 + http/1.1 (gRPC and
/// plain HTTPS clients of the token endpoint).
pub fn server_tls_config(config: &AgentApiConfig) -> Result<rustls::ServerConfig, AgentApiError> {
    let tls = |e: &dyn std::fmt::Display| AgentApiError::Tls(e.to_string());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(config.ca_cert_pem.as_bytes()) {
        let cert = cert.map_err(|e| tls(&format_args!("CA certificate: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| tls(&format_args!("CA certificate: {e}")))?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| tls(&e))?;
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(config.server_cert_pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| tls(&format_args!("server certificate: {e}")))?;
    if chain.is_empty() {
        return Err(tls(&"server certificate: no PEM block"));
    }
    let key = PrivateKeyDer::from_pem_slice(config.server_key_pem.as_bytes())
        .map_err(|e| tls(&format_args!("server key: {e}")))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| tls(&e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| tls(&e))?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(cfg)
}

/// A running agent listener.
#[derive(Debug)]
pub struct AgentApi {
    /// The bound address (resolves port 0).
    pub local_addr: SocketAddr,
    /// The server; resolves when `shutdown` fires and in-flight calls end.
    pub task: JoinHandle<Result<(), AgentApiError>>,
    /// The token endpoint (for diagnostics and tests).
    pub issuer: Arc<TokenIssuer>,
}

/// Binds and serves AgentService + `/oauth2/token` until `shutdown`.
/// Configuration errors (bad key material, stale policy keys, bind failure)
/// are returned before anything is served.
pub async fn serve_agent_api<F>(
    config: AgentApiConfig,
    registry: Registry,
    inspector: Arc<dyn Inspect>,
    shutdown: F,
) -> Result<AgentApi, AgentApiError>
where
    F: Future<Output = ()> + Send + 'static,
{
    let tls = Arc::new(server_tls_config(&config)?);
    let issuer = Arc::new(TokenIssuer::new(
        config.token.clone(),
        &config.cli_jwk,
        registry.clone(),
    )?);
    let reloaded = issuer.load_persisted().await?;
    if reloaded > 0 {
        tracing::info!(tokens = reloaded, "agent API: issued tokens reloaded");
    }
    let introspector: Arc<dyn TokenIntrospector> = match &config.introspector {
        Some(i) => i.clone(),
        None => issuer.tokens(),
    };
    scopes::check_no_stale_keys(scopes::AGENT_SERVICE, config.method_scopes.keys())?;
    let auth = AuthLayer::new(introspector, config.method_scopes.clone())
        .require_client_id(CLIENT_ID_AGENT);
    let identity = IdentityLayer::new(registry.reader().clone(), config.identity_policy.clone())?;
    let register =
        RegisterService::new(registry, inspector).with_inspect_timeout(config.inspect_timeout);
    let agent_service = auth.layer(identity.layer(AgentServiceServer::new(register)));

    let token_issuer = issuer.clone();
    let router = Routes::new(agent_service).into_axum_router().route(
        token::TOKEN_PATH,
        axum::routing::post(move |req: axum::extract::Request| {
            token::handle_http(token_issuer.clone(), req)
        }),
    );

    let listener =
        TcpListener::bind(config.listen)
            .await
            .map_err(|source| AgentApiError::Bind {
                addr: config.listen,
                source,
            })?;
    let local_addr = listener
        .local_addr()
        .map_err(|source| AgentApiError::Bind {
            addr: config.listen,
            source,
        })?;
    // Stopped with the server: the loop ends when tonic drops the receiver.
    let rx = crate::tls::accept_loop(
        listener,
        TlsAcceptor::from(tls),
        config.handshake_timeout,
        "agent_api_tls_rejected",
        tokio_util::sync::CancellationToken::new(),
    );
    let incoming = tokio_stream::StreamExt::map(
        tokio_stream::wrappers::ReceiverStream::new(rx),
        |(conn, _peer)| Ok::<_, std::io::Error>(conn),
    );
    tracing::info!(addr = %local_addr, "agent API listening (AgentService + /oauth2/token)");

    let server = tonic::transport::Server::builder()
        .accept_http1(true)
        .add_routes(Routes::from(router));
    let task = tokio::spawn(async move {
        server
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await
            .map_err(AgentApiError::from)
    });
    Ok(AgentApi {
        local_addr,
        task,
        issuer,
    })
}
