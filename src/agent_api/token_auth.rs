//! Authenticating one token request, the pure half of `POST
//! /oauth2/token`: the form (content type, UTF-8, no repeated parameter),
//! the grant type, the client assertion (ES256 signature, issuer, audience,
//! times, jti) and the granted scope. It reads nothing but its arguments:
//! no registry, no randomness, no clock, no I/O. The spend (JTI and token
//! written durably, the token minted) is [`super::token::TokenIssuer`]'s.
//!
//! Kept apart so the whole refusal surface can be unit-tested and fuzzed
//! (`fuzz_harness::token_body`) without a redb file or a runtime: every
//! refusal is an [`OAuthError`] whose description is bounded
//! ([`crate::peer_text::bound`]), because it may echo request input.

use std::collections::{BTreeSet, HashMap};

use super::assertion::{self, Claims, JwtError};
use super::token::{JWT_BEARER, MAX_BODY_BYTES, MAX_JTI_LEN, TokenConfig};
use crate::pki::{Jwk, PkiError};

/// An RFC 6749 §5.2 error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OAuthError {
    pub error: &'static str,
    pub description: String,
}

impl OAuthError {
    /// Descriptions may echo request input (a grant type, a client id, a
    /// parser's complaint): bounded here, once, for the reply and the log.
    pub(super) fn new(error: &'static str, description: impl Into<String>) -> Self {
        Self {
            error,
            description: crate::peer_text::bound(description),
        }
    }
    pub(super) fn invalid_request(d: impl Into<String>) -> Self {
        Self::new("invalid_request", d)
    }
    pub(super) fn invalid_client(d: impl Into<String>) -> Self {
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

/// A request whose client authenticated: what the spend needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authenticated {
    /// The assertion's issuer (= subject), a configured client.
    pub client_id: String,
    /// The assertion's id: spent once the token is recorded.
    pub jti: String,
    /// The assertion's expiry (unix seconds): the spent JTI is kept until
    /// then, plus the clock skew.
    pub exp: i64,
    /// The granted scope, space-separated (requested ∩ allowed).
    pub scope: String,
}

/// The token endpoint's policy and the client key: checks a request.
#[derive(Debug, Clone)]
pub struct ClientAuthenticator {
    config: TokenConfig,
    public_point: Vec<u8>,
}

impl ClientAuthenticator {
    /// `jwk` is the CLI's public key, shared by both clients as in the
    /// reference.
    pub fn new(config: TokenConfig, jwk: &Jwk) -> Result<Self, PkiError> {
        Ok(Self {
            public_point: jwk.public_point()?,
            config,
        })
    }

    pub fn config(&self) -> &TokenConfig {
        &self.config
    }

    /// Authenticates one request at `now` (unix seconds): `content_type`
    /// header and raw body (already capped at [`MAX_BODY_BYTES`] by the
    /// HTTP layer; a longer one is refused here too). `Ok` only for a
    /// `client_credentials` request whose assertion is signed with the
    /// client key, names a configured client and this endpoint, is within
    /// its lifetime at `now`, carries a jti, and asks for a scope the client
    /// may have.
    pub fn authenticate(
        &self,
        content_type: Option<&str>,
        body: &[u8],
        now: i64,
    ) -> Result<Authenticated, OAuthError> {
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
        Ok(Authenticated {
            client_id: client_id.to_owned(),
            jti: jti.to_owned(),
            exp,
            scope,
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

fn is_scope_token(s: &str) -> bool {
    // RFC 6749 §3.3: scope-token = 1*( %x21 / %x23-5B / %x5D-7E )
    !s.is_empty()
        && s.bytes()
            .all(|b| b == 0x21 || (0x23..=0x5b).contains(&b) || (0x5d..=0x7e).contains(&b))
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

    fn signed_request(key: &crate::pki::SigningKey, iat: i64, exp: i64) -> Vec<u8> {
        let aud = super::super::token::default_audiences(7444)[0].clone();
        let jwt = assertion::encode_signed(
            key.key_pair(),
            &serde_json::json!({"alg": "ES256", "typ": "JWT"}),
            &serde_json::json!({"iss": "clawker-agent", "sub": "clawker-agent",
                "aud": aud, "jti": "j-1", "iat": iat, "exp": exp}),
        )
        .unwrap();
        serde_urlencoded::to_string([
            ("grant_type", "client_credentials"),
            ("client_assertion_type", JWT_BEARER),
            ("client_assertion", jwt.as_str()),
        ])
        .unwrap()
        .into_bytes()
    }

    #[test]
    fn authentication_depends_only_on_the_request_and_the_given_clock() {
        let key = crate::pki::SigningKey::generate().unwrap();
        let auth = ClientAuthenticator::new(TokenConfig::for_port(7444), &key.jwk()).unwrap();
        let t0 = 1_000_000;
        let body = signed_request(&key, t0, t0 + 600);
        let ok = auth.authenticate(FORM, &body, t0).unwrap();
        assert_eq!(
            ok,
            Authenticated {
                client_id: "clawker-agent".into(),
                jti: "j-1".into(),
                exp: t0 + 600,
                scope: "agent:self:register".into(),
            }
        );
        // Same bytes, same clock: same answer (nothing is spent here).
        assert_eq!(auth.authenticate(FORM, &body, t0).unwrap(), ok);
        // Past exp + skew, and before iat − skew: refused.
        let late = auth.authenticate(FORM, &body, t0 + 600 + 61).unwrap_err();
        assert_eq!(late.description, "assertion has expired");
        let early = auth.authenticate(FORM, &body, t0 - 61).unwrap_err();
        assert_eq!(early.description, "assertion iat is in the future");
    }

    #[test]
    fn refusals_echoing_the_request_are_bounded() {
        let key = crate::pki::SigningKey::generate().unwrap();
        let auth = ClientAuthenticator::new(TokenConfig::for_port(7444), &key.jwk()).unwrap();
        let long = "x".repeat(MAX_BODY_BYTES - 20);
        let body = format!("grant_type={long}");
        let e = auth.authenticate(FORM, body.as_bytes(), 0).unwrap_err();
        assert_eq!(e.error, "unsupported_grant_type");
        assert!(e.description.len() < crate::peer_text::MAX_PEER_TEXT + 64);
        assert!(e.description.ends_with(" bytes]"), "{}", e.description);
    }

    #[test]
    fn scope_tokens_follow_rfc6749() {
        assert!(is_scope_token("agent:self:register"));
        assert!(!is_scope_token(""));
        assert!(!is_scope_token("a\"b"));
        assert!(!is_scope_token("a\\b"));
        assert!(!is_scope_token("ä"));
    }
}
