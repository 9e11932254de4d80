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
//! request that fails any check before the JTI is spent.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use futures::future::BoxFuture;
use rand::TryRng;
use rand::rngs::SysRng;
use sha2::{Digest, Sha256};

use super::assertion::{self, Claims, JwtError};
use super::auth::{IntrospectError, Introspection, TokenIntrospector};
use super::scopes::{CLIENT_ID_AGENT, CLIENT_ID_CLI, SCOPE_ADMIN, SCOPE_AGENT_SELF_REGISTER};
use crate::pki::Jwk;
use crate::registry::Registry;
use crate::registry::grants::{IssueOutcome, IssueRequest};

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

/// An RFC 6749 §5.2 error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OAuthError {
    pub error: &'static str,
    pub description: String,
}

impl OAuthError {
    /// Descriptions may echo request input (a grant type, a client id, a
    /// parser's complaint): bounded here, once, for the reply and the log.
    fn new(error: &'static str, description: impl Into<String>) -> Self {
        Self {
            error,
            description: crate::peer_text::bound(description),
        }
    }
    fn invalid_request(d: impl Into<String>) -> Self {
        Self::new("invalid_request", d)
    }
    fn invalid_client(d: impl Into<String>) -> Self {
        Self::new("invalid_client", d)
    }

    /// 401 for a failed client authentication, 500 for our own failure,
    /// 503 for a transient one (retry later: the assertion was not spent),
    /// 400 otherwise.
    pub fn status(&self) -> u16 {
        match self.error {
            "invalid_client" => 401,
            "server_error" => 500,
            "temporarily_unavailable" => 503,
            _ => 400,
        }
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
    config: TokenConfig,
    public_point: Vec<u8>,
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
            .field("config", &self.config)
            .finish()
    }
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn is_scope_token(s: &str) -> bool {
    // RFC 6749 §3.3: scope-token = 1*( %x21 / %x23-5B / %x5D-7E )
    !s.is_empty()
        && s.bytes()
            .all(|b| b == 0x21 || (0x23..=0x5b).contains(&b) || (0x5d..=0x7e).contains(&b))
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
            public_point: jwk.public_point()?,
            config,
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

    async fn issue(
        &self,
        content_type: Option<&str>,
        body: &[u8],
    ) -> Result<TokenReply, OAuthError> {
        let now = now_unix();
        let form = parse_form(content_type, body)?;
        let param = |k: &str| form.get(k).map(String::as_str);

        match param("grant_type") {
            None => return Err(OAuthError::invalid_request("missing grant_type")),
            Some("client_credentials") => {}
            Some(other) => {
                return Err(OAuthError::new(
                    "unsupported_grant_type",
                    format!("grant_type {other:?} is not supported; use client_credentials"),
                ));
            }
        }
        let (Some(assertion_type), Some(jwt)) =
            (param("client_assertion_type"), param("client_assertion"))
        else {
            return Err(OAuthError::invalid_client(
                "client authentication required: client_assertion_type and client_assertion (private_key_jwt)",
            ));
        };
        if assertion_type != JWT_BEARER {
            return Err(OAuthError::invalid_client(format!(
                "unsupported client_assertion_type {assertion_type:?}"
            )));
        }
        // RFC 7523 §3.2 / RFC 7521 §4.2.1: any defect of the assertion
        // (shape, alg, signature) is a failed client authentication.
        let (_, claims) = assertion::verify_es256(jwt, &self.public_point)
            .map_err(|e: JwtError| OAuthError::invalid_client(format!("client_assertion: {e}")))?;
        let (client_id, exp, jti) = self.check_claims(&claims, param("client_id"), now)?;
        let scope = self.grant_scope(client_id, param("scope"))?;

        let mut raw = [0u8; 32];
        SysRng
            .try_fill_bytes(&mut raw)
            .map_err(|_| OAuthError::new("server_error", "random source failed"))?;
        let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw);
        let hash = token_hash(&token);
        let ttl = self.config.token_ttl.as_secs() as i64;

        // Everything checked: spend the JTI and record the token in one
        // durable write. Only that commit lets the token exist; a replay
        // finds the row even after a restart.
        let keep_until = exp.saturating_add(self.config.clock_skew.as_secs() as i64);
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

    /// Issuer, audience, times and jti. Returns (client_id, exp, jti).
    fn check_claims<'c>(
        &self,
        c: &'c Claims,
        client_id_param: Option<&str>,
        now: i64,
    ) -> Result<(&'c str, i64, &'c str), OAuthError> {
        let skew = self.config.clock_skew.as_secs() as i64;
        let max_life = self.config.max_assertion_lifetime.as_secs() as i64 + skew;
        let (Some(iss), Some(sub)) = (c.iss.as_deref(), c.sub.as_deref()) else {
            return Err(OAuthError::invalid_client(
                "assertion must carry iss and sub",
            ));
        };
        if iss != sub {
            return Err(OAuthError::invalid_client(
                "assertion iss and sub must both be the client id",
            ));
        }
        if let Some(p) = client_id_param
            && p != iss
        {
            return Err(OAuthError::invalid_client(
                "client_id does not match the assertion issuer",
            ));
        }
        if !self.config.clients.contains_key(iss) {
            return Err(OAuthError::invalid_client(format!(
                "unknown client {iss:?}"
            )));
        }
        let Some(aud) = &c.aud else {
            return Err(OAuthError::invalid_client("assertion must carry aud"));
        };
        if !self.config.audiences.iter().any(|a| aud.contains(a)) {
            return Err(OAuthError::invalid_client(
                "assertion aud does not name this token endpoint",
            ));
        }
        let Some(exp) = c.exp else {
            return Err(OAuthError::invalid_client("assertion must carry exp"));
        };
        if exp.saturating_add(skew) <= now {
            return Err(OAuthError::invalid_client("assertion has expired"));
        }
        // Cap the lifetime both ways, so omitting iat does not lift the cap.
        if exp.saturating_sub(now) > max_life {
            return Err(OAuthError::invalid_client(
                "assertion lifetime exceeds the maximum (24h)",
            ));
        }
        if let Some(iat) = c.iat {
            if iat > now.saturating_add(skew) {
                return Err(OAuthError::invalid_client("assertion iat is in the future"));
            }
            if exp.saturating_sub(iat) > max_life {
                return Err(OAuthError::invalid_client(
                    "assertion lifetime exceeds the maximum (24h)",
                ));
            }
        }
        if let Some(nbf) = c.nbf
            && nbf > now.saturating_add(skew)
        {
            return Err(OAuthError::invalid_client(
                "assertion is not yet valid (nbf)",
            ));
        }
        let jti = c.jti.as_deref().unwrap_or("");
        if jti.is_empty() {
            return Err(OAuthError::invalid_client("assertion must carry jti"));
        }
        if jti.len() > MAX_JTI_LEN {
            return Err(OAuthError::invalid_client("assertion jti is too long"));
        }
        Ok((iss, exp, jti))
    }

    /// RFC 6749 §3.3. An absent or empty `scope` gets the client's full
    /// allowed set (our documented default). Otherwise the grant is
    /// requested ∩ allowed, returned in the response; an empty intersection
    /// is `invalid_scope`.
    fn grant_scope(&self, client_id: &str, requested: Option<&str>) -> Result<String, OAuthError> {
        let allowed: BTreeSet<&str> = self
            .config
            .clients
            .get(client_id)
            .map(|v| v.iter().map(String::as_str).collect())
            .unwrap_or_default();
        let requested = requested.unwrap_or("");
        if requested.is_empty() {
            return Ok(allowed.into_iter().collect::<Vec<_>>().join(" "));
        }
        let mut granted = BTreeSet::new();
        for s in requested.split(' ') {
            if !is_scope_token(s) {
                return Err(OAuthError::new(
                    "invalid_scope",
                    "malformed scope parameter",
                ));
            }
            if allowed.contains(s) {
                granted.insert(s);
            }
        }
        if granted.is_empty() {
            return Err(OAuthError::new(
                "invalid_scope",
                format!("requested scope is not allowed for client {client_id:?}"),
            ));
        }
        Ok(granted.into_iter().collect::<Vec<_>>().join(" "))
    }
}

/// Content type, UTF-8, `application/x-www-form-urlencoded`, no repeated
/// parameter (RFC 6749 §3.2). Unknown parameters are ignored.
fn parse_form(
    content_type: Option<&str>,
    body: &[u8],
) -> Result<HashMap<String, String>, OAuthError> {
    let media = content_type
        .and_then(|ct| ct.split(';').next())
        .map(|m| m.trim().to_ascii_lowercase());
    if media.as_deref() != Some("application/x-www-form-urlencoded") {
        return Err(OAuthError::invalid_request(
            "content type must be application/x-www-form-urlencoded",
        ));
    }
    if body.len() > MAX_BODY_BYTES {
        return Err(OAuthError::invalid_request("request body too large"));
    }
    if std::str::from_utf8(body).is_err() {
        return Err(OAuthError::invalid_request("request body is not UTF-8"));
    }
    let pairs: Vec<(String, String)> = serde_urlencoded::from_bytes(body)
        .map_err(|e| OAuthError::invalid_request(format!("malformed form body: {e}")))?;
    let mut form = HashMap::new();
    for (k, v) in pairs {
        if k.is_empty() {
            continue;
        }
        if form.insert(k.clone(), v).is_some() {
            return Err(OAuthError::invalid_request(format!(
                "parameter {k:?} repeated"
            )));
        }
    }
    Ok(form)
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

    const FORM: Option<&str> = Some("application/x-www-form-urlencoded");

    #[test]
    fn form_parsing_refuses_bad_input() {
        assert_eq!(
            parse_form(Some("application/json"), b"a=b")
                .unwrap_err()
                .error,
            "invalid_request"
        );
        assert_eq!(
            parse_form(None, b"a=b").unwrap_err().error,
            "invalid_request"
        );
        assert!(
            parse_form(
                Some("Application/X-WWW-Form-Urlencoded; charset=UTF-8"),
                b"a=b"
            )
            .is_ok()
        );
        assert_eq!(
            parse_form(FORM, b"a=1&a=2").unwrap_err().error,
            "invalid_request"
        );
        assert_eq!(
            parse_form(FORM, &[0xff, 0xfe]).unwrap_err().error,
            "invalid_request"
        );
        assert_eq!(
            parse_form(FORM, &vec![b'a'; MAX_BODY_BYTES + 1])
                .unwrap_err()
                .description,
            "request body too large"
        );
        let f = parse_form(FORM, b"scope=a%20b&x=%3D").unwrap();
        assert_eq!(f["scope"], "a b");
        assert_eq!(f["x"], "=");
    }

    #[test]
    fn scope_tokens_follow_rfc6749() {
        assert!(is_scope_token("agent:self:register"));
        assert!(!is_scope_token(""));
        assert!(!is_scope_token("a\"b"));
        assert!(!is_scope_token("a\\b"));
        assert!(!is_scope_token("ä"));
    }

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
