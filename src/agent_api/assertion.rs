//! Client-assertion JWTs (RFC 7523 `private_key_jwt`), ES256 only.
//!
//! The CLI mints one single-use assertion per agent container with its
//! signing key ([`mint_agent_assertion`]); clawkerd trades it for a bearer
//! token at the CP's token endpoint, which verifies it here
//! ([`verify_es256`]) against the CLI's public JWK. The CP never holds the
//! private key.

use base64::Engine;
use rand::TryRng;
use rand::rngs::SysRng;
use serde::{Deserialize, Serialize};

use crate::pki::SigningKey;

/// Lifetime of an agent assertion (`exp − iat`).
pub const AGENT_ASSERTION_TTL_SECS: i64 = 24 * 60 * 60;
/// RFC 7523 `client_assertion_type`.
pub const JWT_BEARER_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// Largest compact JWS we parse; real assertions are ~400 bytes.
pub const MAX_ASSERTION_LEN: usize = 8 * 1024;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    #[error("assertion is not a compact JWS (header.payload.signature)")]
    Malformed,
    #[error("assertion is larger than {MAX_ASSERTION_LEN} bytes")]
    TooLarge,
    #[error("assertion {0} is not valid base64url")]
    BadBase64(&'static str),
    #[error("assertion {0} is not valid JSON: {1}")]
    BadJson(&'static str, String),
    #[error("unsupported alg {0:?}: only ES256 is accepted")]
    UnsupportedAlg(String),
    #[error("unsupported critical header parameters")]
    Critical,
    #[error("signature verification failed")]
    BadSignature,
    #[error("{0}")]
    Claims(String),
    #[error("signing failed")]
    Signing,
    #[error("system random source failed")]
    Random,
}

/// JOSE header as we read it. Unknown members are ignored, except `crit`.
#[derive(Debug, Clone, Deserialize)]
pub struct Header {
    pub alg: String,
    #[serde(default)]
    pub typ: Option<String>,
    #[serde(default)]
    pub crit: Option<serde_json::Value>,
}

/// `aud` may be one string or an array of strings (RFC 7519 §4.1.3).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Audience {
    One(String),
    Many(Vec<String>),
}

impl Audience {
    pub fn contains(&self, aud: &str) -> bool {
        match self {
            Audience::One(a) => a == aud,
            Audience::Many(v) => v.iter().any(|a| a == aud),
        }
    }
}

/// Registered claims of an assertion. Duplicate members are a parse error
/// (serde refuses them), so a payload cannot say two things at once.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<Audience>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exp: Option<i64>,
}

/// Signs `header` and `claims` (any JSON) with an ECDSA key, producing a
/// compact JWS. Tests use it to craft hostile assertions (wrong alg, other
/// curves); the minting functions below use it with the fixed header.
pub fn encode_signed(
    key: &ring::signature::EcdsaKeyPair,
    header: &serde_json::Value,
    claims: &serde_json::Value,
) -> Result<String, JwtError> {
    let input = format!(
        "{}.{}",
        B64.encode(header.to_string()),
        B64.encode(claims.to_string())
    );
    let sig = key
        .sign(&ring::rand::SystemRandom::new(), input.as_bytes())
        .map_err(|_| JwtError::Signing)?;
    Ok(format!("{input}.{}", B64.encode(sig.as_ref())))
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// A fresh `jti`: 122 random bits from the OS in UUIDv4 text form
/// (`xxxxxxxx-xxxx-4xxx-[89ab]xxx-xxxxxxxxxxxx`). The form is the
/// reference's (`identity.md` §4.2: "random UUIDv4 string"), kept for
/// whatever consumes assertions; our token endpoint accepts any string.
fn new_jti() -> Result<String, JwtError> {
    let mut b = [0u8; 16];
    SysRng
        .try_fill_bytes(&mut b)
        .map_err(|_| JwtError::Random)?;
    b[6] = (b[6] & 0x0f) | 0x40; // version 4
    b[8] = (b[8] & 0x3f) | 0x80; // RFC 4122 variant
    let h = hex::encode(b);
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    ))
}

/// An assertion for `client_id` (`iss = sub = client_id`), single audience,
/// fresh UUIDv4 `jti` ([`new_jti`]), `iat = now`, `exp = now + ttl_secs`.
pub fn mint_assertion(
    key: &SigningKey,
    client_id: &str,
    audience: &str,
    ttl_secs: i64,
) -> Result<String, JwtError> {
    if audience.is_empty() {
        return Err(JwtError::Claims("assertion: audience required".into()));
    }
    if ttl_secs <= 0 {
        return Err(JwtError::Claims(
            "assertion: exp (expiration) must be positive".into(),
        ));
    }
    let iat = now_unix();
    let claims = serde_json::json!({
        "iss": client_id,
        "sub": client_id,
        "aud": audience,
        "jti": new_jti()?,
        "iat": iat,
        "exp": iat + ttl_secs,
    });
    encode_signed(
        key.key_pair(),
        &serde_json::json!({"alg": "ES256", "typ": "JWT"}),
        &claims,
    )
}

/// The single-use agent assertion written to `assertion.jwt`:
/// `iss = sub = clawker-agent`, 24 h lifetime.
pub fn mint_agent_assertion(key: &SigningKey, audience: &str) -> Result<String, JwtError> {
    mint_assertion(
        key,
        super::scopes::CLIENT_ID_AGENT,
        audience,
        AGENT_ASSERTION_TTL_SECS,
    )
}

fn b64_part(part: &str, what: &'static str) -> Result<Vec<u8>, JwtError> {
    B64.decode(part).map_err(|_| JwtError::BadBase64(what))
}

/// Parses a compact JWS, checks the header allows only ES256, and verifies
/// the signature with the uncompressed P-256 point. Claims are returned
/// unchecked: the caller applies its own policy (issuer, audience, times).
pub fn verify_es256(jwt: &str, public_point: &[u8]) -> Result<(Header, Claims), JwtError> {
    if jwt.len() > MAX_ASSERTION_LEN {
        return Err(JwtError::TooLarge);
    }
    let mut parts = jwt.split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::Malformed);
    };
    let header: Header = serde_json::from_slice(&b64_part(h, "header")?)
        .map_err(|e| JwtError::BadJson("header", e.to_string()))?;
    // Fixed algorithm: `none`, HS*, RS*, ES384… never reach a verifier, so
    // the key's type cannot be confused with another algorithm's.
    if header.alg != "ES256" {
        return Err(JwtError::UnsupportedAlg(header.alg));
    }
    if header.crit.is_some() {
        return Err(JwtError::Critical);
    }
    let sig = b64_part(s, "signature")?;
    let signed = &jwt[..h.len() + 1 + p.len()];
    ring::signature::UnparsedPublicKey::new(
        &ring::signature::ECDSA_P256_SHA256_FIXED,
        public_point,
    )
    .verify(signed.as_bytes(), &sig)
    .map_err(|_| JwtError::BadSignature)?;
    // Only parse the payload of an authentic token.
    let claims: Claims = serde_json::from_slice(&b64_part(p, "payload")?)
        .map_err(|e| JwtError::BadJson("payload", e.to_string()))?;
    Ok((header, claims))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_assertion_has_the_reference_shape_and_verifies() {
        let key = SigningKey::generate().unwrap();
        let aud = "https://clawker-controlplane:7444/oauth2/token";
        let jwt = mint_agent_assertion(&key, aud).unwrap();
        assert_eq!(jwt.split('.').count(), 3);
        let header =
            String::from_utf8(B64.decode(jwt.split('.').next().unwrap()).unwrap()).unwrap();
        assert_eq!(header, r#"{"alg":"ES256","typ":"JWT"}"#);
        let point = key.jwk().public_point().unwrap();
        let (_, c) = verify_es256(&jwt, &point).unwrap();
        assert_eq!(c.iss.as_deref(), Some("clawker-agent"));
        assert_eq!(c.sub.as_deref(), Some("clawker-agent"));
        assert_eq!(c.aud, Some(Audience::One(aud.into())));
        assert_eq!(c.exp.unwrap() - c.iat.unwrap(), 86_400);
        let jti = c.jti.unwrap();
        assert_eq!(jti.matches('-').count(), 4);
        // UUIDv4 text: 36 chars, version nibble 4, RFC 4122 variant.
        assert_eq!(jti.len(), 36, "{jti}");
        assert_eq!(&jti[14..15], "4", "{jti}");
        assert!("89ab".contains(&jti[19..20]), "{jti}");
        assert_ne!(jwt, mint_agent_assertion(&key, aud).unwrap());
        assert!(mint_agent_assertion(&key, "").is_err());
    }

    #[test]
    fn tampered_or_foreign_assertions_fail_verification() {
        let key = SigningKey::generate().unwrap();
        let other = SigningKey::generate().unwrap();
        let point = key.jwk().public_point().unwrap();
        let jwt = mint_agent_assertion(&other, "a").unwrap();
        assert_eq!(
            verify_es256(&jwt, &point).unwrap_err(),
            JwtError::BadSignature
        );
        let jwt = mint_agent_assertion(&key, "a").unwrap();
        let mut parts: Vec<&str> = jwt.split('.').collect();
        let forged = B64.encode(br#"{"iss":"clawker-cli"}"#);
        parts[1] = &forged;
        assert_eq!(
            verify_es256(&parts.join("."), &point).unwrap_err(),
            JwtError::BadSignature
        );
        assert_eq!(
            verify_es256("a.b", &point).unwrap_err(),
            JwtError::Malformed
        );
        assert_eq!(
            verify_es256("!!.b.c", &point).unwrap_err(),
            JwtError::BadBase64("header")
        );
        assert_eq!(
            verify_es256(&"a".repeat(MAX_ASSERTION_LEN + 1), &point).unwrap_err(),
            JwtError::TooLarge
        );
    }
}
