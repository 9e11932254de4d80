//! The embedded OAuth2 token endpoint: `POST /oauth2/token` with
//! `client_credentials` + RFC 7523 `private_key_jwt` client assertions,
//! ES256 only (reference `identity.md` §10 Option A, replacing Hydra).
//!
//! Single use: an assertion's `jti` is recorded in the registry's redb file
//! (through the registry actor), together with the SHA-256 and expiry of the
//! token issued for it, in one durable transaction; the token exists only
//! after that commit (`registry::grants`). If the commit fails no token is
//! minted. A token survives a CP restart (live tokens are reloaded from the
//! file at start), which the reference (Hydra with `dsn: memory`) gets
//! wrong. The token itself is opaque, 256 random bits, kept only as its
//! SHA-256.
//!
//! Register never bricks an agent: the agent client's assertion may be
//! exchanged again until a Register succeeds with one of its tokens (the
//! grant is then *redeemed*); each new token revokes the previous one. So a
//! clawkerd that lost its token (container restart, a lost HTTP answer) or
//! outlived it (the CP was down for longer than the token lifetime) gets a
//! new one as long as its assertion is valid, and after registration the
//! assertion is refused like any replay. Other clients' assertions stay
//! strictly single-use.
//!
//! Every refusal is an RFC 6749 §5.2 JSON error; nothing is written for a
//! request that fails any check before the JTI is spent. The checks are
//! [`super::token_auth`]'s (pure: form, assertion, claims, scope); this
//! module is the spend (token minted, JTI and token recorded durably) and
//! the HTTP adapter.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use futures::future::BoxFuture;
use rand::TryRng;
use rand::rngs::SysRng;
use sha2::{Digest, Sha256};

use super::auth::{IntrospectError, Introspection, TokenIntrospector};
use super::scopes::{CLIENT_ID_AGENT, CLIENT_ID_CLI, SCOPE_ADMIN, SCOPE_AGENT_SELF_REGISTER};
use crate::pki::Jwk;
use crate::registry::Registry;
use crate::registry::grants::{IssueOutcome, IssueRequest};

pub use super::token_auth::{Authenticated, ClientAuthenticator, OAuthError};

/// Path of the token endpoint on the agent listener.
pub const TOKEN_PATH: &str = "/oauth2/token";
/// Largest request body read (form-encoded; a real one is ~600 bytes).
pub const MAX_BODY_BYTES: usize = 16 * 1024;
/// Default bound on reading one request body: a client that trickles its
/// body (slowloris) is answered `invalid_request` and its request ends.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// RFC 7523 client assertion type.
pub use super::assertion::JWT_BEARER_TYPE as JWT_BEARER;
/// Longest `jti` we store.
pub const MAX_JTI_LEN: usize = 256;

/// Audiences a CP listening on `port` accepts: the name clawkerd dials and
/// the loopback form the reference pins assertions to.
pub fn default_audiences(port: u16) -> Vec<String> {
    vec![
        format!("https://{}:{port}{TOKEN_PATH}", crate::defaults::CP_NAME),
        format!("https://127.0.0.1:{port}{TOKEN_PATH}"),
    ]
}

/// Policy of the token endpoint.
#[derive(Debug, Clone)]
pub struct TokenConfig {
    /// client_id → scopes it may be granted.
    pub clients: HashMap<String, Vec<String>>,
    /// Accepted `aud` values (an assertion must name at least one).
    pub audiences: Vec<String>,
    /// Lifetime of an issued access token.
    pub token_ttl: Duration,
    /// Longest accepted assertion lifetime (`exp − iat`, and `exp − now`).
    pub max_assertion_lifetime: Duration,
    /// Clock skew tolerated on `exp`, `iat`, `nbf` and the lifetime cap.
    pub clock_skew: Duration,
}

impl TokenConfig {
    /// The reference client table (`clawker-agent` → `agent:self:register`,
    /// `clawker-cli` → `admin`), 1 h tokens, 24 h max assertions, 60 s skew.
    pub fn for_port(port: u16) -> Self {
        Self {
            clients: HashMap::from([
                (
                    CLIENT_ID_AGENT.to_owned(),
                    vec![SCOPE_AGENT_SELF_REGISTER.to_owned()],
                ),
                (CLIENT_ID_CLI.to_owned(), vec![SCOPE_ADMIN.to_owned()]),
            ]),
            audiences: default_audiences(port),
            token_ttl: Duration::from_secs(3600),
            max_assertion_lifetime: Duration::from_secs(24 * 3600),
            clock_skew: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct IssuedToken {
    client_id: String,
    scope: String,
    exp: i64,
    /// The assertion it was issued for (a successful Register redeems it).
    jti: String,
}

/// Issued tokens, keyed by SHA-256 of the token: a memory dump does not
/// yield usable bearer tokens. Also the embedded [`TokenIntrospector`].
#[derive(Debug, Default)]
pub struct TokenStore {
    tokens: Mutex<HashMap<[u8; 32], IssuedToken>>,
}

fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl TokenStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], IssuedToken>> {
        // Critical sections never panic; recover rather than cascade.
        self.tokens.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn insert(&self, hash: [u8; 32], issued: IssuedToken, now: i64) {
        let mut map = self.lock();
        map.retain(|_, t| t.exp > now);
        map.insert(hash, issued);
    }

    fn remove(&self, hash: &[u8; 32]) {
        self.lock().remove(hash);
    }

    /// Local introspection (RFC 7662 result shape): inactive when unknown,
    /// expired, or lacking `required_scope` (like Hydra given a scope).
    pub fn introspect_now(&self, token: &str, required_scope: &str, now: i64) -> Introspection {
        let map = self.lock();
        match map.get(&token_hash(token)) {
            Some(t)
                if t.exp > now
                    && (required_scope.is_empty()
                        || t.scope.split(' ').any(|s| s == required_scope)) =>
            {
                Introspection {
                    active: true,
                    scope: t.scope.clone(),
                    client_id: t.client_id.clone(),
                    sub: t.client_id.clone(),
                    exp: t.exp,
                    jti: t.jti.clone(),
                }
            }
            _ => Introspection::default(),
        }
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl TokenIntrospector for TokenStore {
    fn introspect<'a>(
        &'a self,
        token: &'a str,
        required_scope: &'a str,
    ) -> BoxFuture<'a, Result<Introspection, IntrospectError>> {
        let r = self.introspect_now(token, required_scope, now_unix());
        Box::pin(async move { Ok(r) })
    }
}

/// A finished response: status and JSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenReply {
    pub status: u16,
    pub body: serde_json::Value,
}

impl From<OAuthError> for TokenReply {
    fn from(e: OAuthError) -> Self {
        Self {
            status: e.status(),
            body: serde_json::json!({"error": e.error, "error_description": e.description}),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TokenSetupError {
    #[error("CLI signing JWK: {0}")]
    Jwk(#[from] crate::pki::PkiError),
    #[error("token endpoint needs at least one accepted audience")]
    NoAudience,
}

/// The token endpoint's logic, independent of HTTP framing.
pub struct TokenIssuer {
    auth: ClientAuthenticator,
    registry: Registry,
    tokens: Arc<TokenStore>,
    /// Serialises "durable grant write + in-memory token update", so two
    /// exchanges of one assertion cannot leave the revoked token live in
    /// memory (the writes are ordered by the registry actor, the memory
    /// updates would not be). Exchanges are rare: one per container.
    issuing: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for TokenIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenIssuer")
            .field("config", self.auth.config())
            .finish()
    }
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl TokenIssuer {
    /// `jwk` is the CLI's public key (`<state>/auth/cli/signing-jwk.json`),
    /// shared by both clients as in the reference.
    pub fn new(
        config: TokenConfig,
        jwk: &Jwk,
        registry: Registry,
    ) -> Result<Self, TokenSetupError> {
        if config.audiences.is_empty() {
            return Err(TokenSetupError::NoAudience);
        }
        Ok(Self {
            auth: ClientAuthenticator::new(config, jwk)?,
            registry,
            tokens: Arc::new(TokenStore::new()),
            issuing: tokio::sync::Mutex::new(()),
        })
    }

    /// Loads the tokens still valid from the registry file (call once at
    /// start, before serving): tokens survive a CP restart.
    pub async fn load_persisted(&self) -> Result<usize, crate::registry::RegistryError> {
        let now = now_unix();
        let live = self.registry.live_tokens(now).await?;
        let n = live.len();
        for t in live {
            self.tokens.insert(
                t.token_sha256,
                IssuedToken {
                    client_id: t.client_id,
                    scope: t.scope,
                    exp: t.exp,
                    jti: t.jti,
                },
                now,
            );
        }
        Ok(n)
    }

    /// The issued-token table, which is also the AuthInterceptor's
    /// introspector.
    pub fn tokens(&self) -> Arc<TokenStore> {
        self.tokens.clone()
    }

    /// Handles one request: `content_type` header and raw body (already
    /// capped at [`MAX_BODY_BYTES`] by the caller).
    pub async fn token(&self, content_type: Option<&str>, body: &[u8]) -> TokenReply {
        match self.issue(content_type, body).await {
            Ok(reply) => reply,
            Err(e) => {
                if crate::log_limit::admit("token_request_refused") {
                    tracing::warn!(
                        event = "token_request_refused",
                        error = e.error,
                        description = %e.description,
                        "oauth2: token request refused"
                    );
                }
                e.into()
            }
        }
    }

    /// Authenticates the request ([`ClientAuthenticator::authenticate`]),
    /// then spends it ([`Self::spend`]).
    async fn issue(
        &self,
        content_type: Option<&str>,
        body: &[u8],
    ) -> Result<TokenReply, OAuthError> {
        let now = now_unix();
        let authenticated = self.auth.authenticate(content_type, body, now)?;
        self.spend(authenticated, now).await
    }

    /// The spend: mints the token, then spends the JTI and records the
    /// token in one durable write; only that commit lets the token exist.
    async fn spend(&self, a: Authenticated, now: i64) -> Result<TokenReply, OAuthError> {
        let Authenticated {
            client_id,
            jti,
            exp,
            scope,
        } = a;
        let (client_id, jti) = (client_id.as_str(), jti.as_str());
        let mut raw = [0u8; 32];
        SysRng
            .try_fill_bytes(&mut raw)
            .map_err(|_| OAuthError::new("server_error", "random source failed"))?;
        let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw);
        let hash = token_hash(&token);
        let config = self.auth.config();
        let ttl = config.token_ttl.as_secs() as i64;

        // Everything checked: spend the JTI and record the token in one
        // durable write. Only that commit lets the token exist; a replay
        // finds the row even after a restart.
        let keep_until = exp.saturating_add(config.clock_skew.as_secs() as i64);
        let _issuing = self.issuing.lock().await;
        let outcome = self
            .registry
            .issue_token(IssueRequest {
                jti: jti.to_owned(),
                client_id: client_id.to_owned(),
                scope: scope.clone(),
                token_sha256: hash,
                token_exp: now + ttl,
                keep_until,
                reissuable: client_id == CLIENT_ID_AGENT,
                now,
            })
            .await;
        match outcome {
            Ok(IssueOutcome::Issued) => {}
            Ok(IssueOutcome::Reissued { revoked_sha256 }) => {
                self.tokens.remove(&revoked_sha256);
                tracing::info!(
                    client_id,
                    jti,
                    "oauth2: assertion exchanged again before any Register succeeded; previous token revoked"
                );
            }
            Ok(IssueOutcome::Replay) => {
                return Err(OAuthError::new(
                    "invalid_grant",
                    "client_assertion has already been used (jti replay)",
                ));
            }
            Err(e) if e.is_retryable() => {
                // Storage trouble (a full disk): nothing was spent, so the
                // same assertion may be presented again once it clears.
                tracing::error!(error = %e, "oauth2: recording spent jti failed (storage); retryable");
                return Err(OAuthError::new(
                    "temporarily_unavailable",
                    "the registry cannot record the assertion right now; retry later",
                ));
            }
            Err(e) => {
                tracing::error!(error = %e, "oauth2: recording spent jti failed");
                return Err(OAuthError::new(
                    "server_error",
                    "could not record the assertion",
                ));
            }
        }
        self.tokens.insert(
            hash,
            IssuedToken {
                client_id: client_id.to_owned(),
                scope: scope.clone(),
                exp: now + ttl,
                jti: jti.to_owned(),
            },
            now,
        );
        tracing::info!(client_id, scope = %scope, jti, "oauth2: token issued");
        Ok(TokenReply {
            status: 200,
            body: serde_json::json!({
                "access_token": token,
                "token_type": "Bearer",
                "expires_in": ttl,
                "scope": scope,
            }),
        })
    }
}

/// The axum adapter: caps the body at [`MAX_BODY_BYTES`] and its read at
/// `body_timeout`, then [`TokenIssuer::token`].
pub async fn handle_http(
    issuer: Arc<TokenIssuer>,
    req: axum::extract::Request,
    body_timeout: Duration,
) -> axum::response::Response {
    use http_body_util::BodyExt;
    let content_type = req
        .headers()
        .get(tonic::codegen::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let limited = http_body_util::Limited::new(req.into_body(), MAX_BODY_BYTES);
    let reply = match tokio::time::timeout(body_timeout, limited.collect()).await {
        Ok(Ok(collected)) => {
            issuer
                .token(content_type.as_deref(), &collected.to_bytes())
                .await
        }
        Ok(Err(e)) => {
            let too_large = e
                .downcast_ref::<http_body_util::LengthLimitError>()
                .is_some();
            OAuthError::invalid_request(if too_large {
                "request body too large".to_owned()
            } else {
                format!("reading request body: {e}")
            })
            .into()
        }
        Err(_) => {
            if crate::log_limit::admit("token_body_timeout") {
                tracing::warn!(
                    event = "token_body_timeout",
                    timeout_ms = body_timeout.as_millis() as u64,
                    "oauth2: request body not received in time; closing"
                );
            }
            let mut resp = json_response(
                OAuthError::invalid_request("timed out reading the request body").into(),
            );
            // The rest of the body may still be trickling in: do not keep
            // the connection for another request.
            resp.headers_mut().insert(
                tonic::codegen::http::header::CONNECTION,
                tonic::codegen::http::HeaderValue::from_static("close"),
            );
            return resp;
        }
    };
    json_response(reply)
}

fn json_response(reply: TokenReply) -> axum::response::Response {
    use tonic::codegen::http::{HeaderValue, StatusCode, header};
    let mut resp = axum::response::Response::new(axum::body::Body::from(reply.body.to_string()));
    *resp.status_mut() =
        StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_store_keeps_hashes_and_expires() {
        let s = TokenStore::new();
        s.insert(
            token_hash("tok"),
            IssuedToken {
                client_id: "c".into(),
                scope: "a b".into(),
                exp: 100,
                jti: "j".into(),
            },
            0,
        );
        assert_eq!(s.introspect_now("tok", "a", 50).jti, "j");
        assert!(s.introspect_now("tok", "a", 50).active);
        assert!(s.introspect_now("tok", "", 50).active);
        assert!(!s.introspect_now("tok", "c", 50).active);
        assert!(!s.introspect_now("tok", "a", 100).active);
        assert!(!s.introspect_now("other", "a", 50).active);
        assert!(s.lock().contains_key(&token_hash("tok")));
        assert_eq!(s.len(), 1);
        s.remove(&token_hash("tok"));
        assert!(!s.introspect_now("tok", "a", 50).active, "revoked");
    }
}
