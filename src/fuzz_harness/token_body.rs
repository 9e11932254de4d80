//! `token_body`: the token endpoint's authentication step
//! ([`ClientAuthenticator::authenticate`], the pure half of `POST
//! /oauth2/token`) fed an arbitrary body under one of a few content types,
//! with a fixed client key and a fixed clock.
//!
//! Invariants: no panic; every refusal's description is bounded (it may
//! echo request input: [`crate::peer_text::bound`]); a success only for an
//! assertion signed with [`CLI_KEY_PEM`] — which only the committed seeds
//! carry — and then with a sane grant.
//!
//! The seeds (`fuzz/seeds/token_body/`) are made by
//! `cargo run --example fuzz_seeds` ([`seed_bodies`]): ECDSA
//! signatures are randomised, so re-running it changes their bytes, not
//! their meaning (`tests/fuzz_regressions.rs` checks the meaning).

use std::sync::OnceLock;

use crate::agent_api::assertion::{JWT_BEARER_TYPE, encode_signed};
use crate::agent_api::scopes::{CLIENT_ID_AGENT, CLIENT_ID_CLI};
use crate::agent_api::token::{TokenConfig, default_audiences};
use crate::agent_api::token_auth::{Authenticated, ClientAuthenticator, OAuthError};
use crate::peer_text::MAX_PEER_TEXT;
use crate::pki::SigningKey;

/// The fixed client key of the target (a throw-away P-256 key made for
/// the fuzz seeds; it signs nothing else).
pub const CLI_KEY_PEM: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg7G2PaIgYBh51QTuU
VRBFCeO8lUp+J5cshLAXWeW919ChRANCAAQgJR7hRrsoqSMBNVlkIG2r3gnD1+sj
tk3VStE1Y+WcS2nS74bAj/BcKHDts+69CZTxYZioPf2lVnwYMjFEpGTm
-----END PRIVATE KEY-----
";

/// The target's clock (2027-01-15T08:00:00Z): the seeds' assertions are
/// valid at this instant forever.
pub const NOW: i64 = 1_800_000_000;

/// The port the target's audiences name.
const PORT: u16 = 7444;

/// The `jti`s of the correctly signed, valid seed assertions: the only
/// ones a success may carry.
pub const VALID_JTIS: [&str; 2] = ["fuzz-seed-valid-agent", "fuzz-seed-valid-cli"];

/// The first input byte picks the `Content-Type` (absent and odd ones too).
pub const CONTENT_TYPES: [Option<&str>; 8] = [
    Some("application/x-www-form-urlencoded"),
    None,
    Some("Application/X-WWW-Form-Urlencoded; charset=UTF-8"),
    Some("application/json"),
    Some(""),
    Some(" application/x-www-form-urlencoded ;;;"),
    Some("multipart/form-data; boundary=x"),
    Some("text/plain; application/x-www-form-urlencoded"),
];

/// Longest description a refusal may carry: the bound plus its marker.
pub const MAX_DESCRIPTION: usize = MAX_PEER_TEXT + 64;

fn authenticator() -> &'static ClientAuthenticator {
    static AUTH: OnceLock<ClientAuthenticator> = OnceLock::new();
    AUTH.get_or_init(|| {
        let key = SigningKey::from_pem(CLI_KEY_PEM).expect("fixed fuzz key");
        ClientAuthenticator::new(TokenConfig::for_port(PORT), &key.jwk()).expect("fixed jwk")
    })
}

/// The authentication step on one fuzz input (content-type selector, body).
pub fn authenticate(data: &[u8]) -> Option<Result<Authenticated, OAuthError>> {
    let (&sel, body) = data.split_first()?;
    let content_type = CONTENT_TYPES[sel as usize % CONTENT_TYPES.len()];
    Some(authenticator().authenticate(content_type, body, NOW))
}

/// The target.
pub fn token_body(data: &[u8]) {
    match authenticate(data) {
        None => {}
        Some(Ok(a)) => {
            assert!(
                VALID_JTIS.contains(&a.jti.as_str()),
                "authenticated an assertion the seeds never signed: {a:?}"
            );
            assert!(a.client_id == CLIENT_ID_AGENT || a.client_id == CLIENT_ID_CLI);
            assert!(a.exp > NOW - 60, "expired assertion accepted: {a:?}");
            assert!(!a.scope.is_empty());
            let allowed = &authenticator().config().clients[&a.client_id];
            assert!(
                a.scope.split(' ').all(|s| allowed.iter().any(|x| x == s)),
                "granted a scope the client may not have: {a:?}"
            );
        }
        Some(Err(e)) => {
            assert!(
                e.description.len() <= MAX_DESCRIPTION,
                "{} refusal with a {}-byte description",
                e.error,
                e.description.len()
            );
            assert!(matches!(e.status(), 400 | 401));
        }
    }
}

fn form(pairs: &[(&str, &str)]) -> Vec<u8> {
    serde_urlencoded::to_string(pairs)
        .expect("form")
        .into_bytes()
}

fn exchange(assertion: &str) -> Vec<(&'static str, String)> {
    vec![
        ("grant_type", "client_credentials".into()),
        ("client_assertion_type", JWT_BEARER_TYPE.into()),
        ("client_assertion", assertion.into()),
    ]
}

fn as_refs<'a>(v: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    v.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

/// A form with every byte of every name and value percent-encoded
/// (`%XX`), the way no client sends it.
fn percent_all(pairs: &[(&str, &str)]) -> Vec<u8> {
    let enc = |s: &str| s.bytes().map(|b| format!("%{b:02X}")).collect::<String>();
    pairs
        .iter()
        .map(|(k, v)| format!("{}={}", enc(k), enc(v)))
        .collect::<Vec<_>>()
        .join("&")
        .into_bytes()
}

/// The seed corpus: (file name, input = content-type selector + body).
pub fn seed_bodies() -> Vec<(&'static str, Vec<u8>)> {
    let key = SigningKey::from_pem(CLI_KEY_PEM).expect("fixed fuzz key");
    let aud = default_audiences(PORT)[0].clone();
    let es256 = serde_json::json!({"alg": "ES256", "typ": "JWT"});
    let sign = |header: &serde_json::Value, claims: serde_json::Value| {
        encode_signed(key.key_pair(), header, &claims).expect("sign")
    };
    let claims = |client: &str, jti: &str, iat: i64, exp: i64| serde_json::json!({"iss": client, "sub": client, "aud": aud, "jti": jti, "iat": iat, "exp": exp});
    let valid_agent = sign(
        &es256,
        claims(CLIENT_ID_AGENT, VALID_JTIS[0], NOW - 10, NOW + 3600),
    );
    let valid_cli = sign(
        &es256,
        claims(CLIENT_ID_CLI, VALID_JTIS[1], NOW - 10, NOW + 600),
    );
    let expired = sign(
        &es256,
        claims(CLIENT_ID_AGENT, "fuzz-seed-expired", NOW - 7200, NOW - 3600),
    );
    let too_long = sign(
        &es256,
        claims(CLIENT_ID_AGENT, "fuzz-seed-long", NOW, NOW + 48 * 3600),
    );
    // The signing input of an ES256 assertion with another alg: HS256, none.
    let wrong_alg = sign(
        &serde_json::json!({"alg": "HS256", "typ": "JWT"}),
        claims(CLIENT_ID_AGENT, "fuzz-seed-hs256", NOW - 10, NOW + 3600),
    );
    let alg_none = {
        let mut parts: Vec<&str> = valid_agent.split('.').collect();
        parts[0] = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0";
        parts[2] = "";
        parts.join(".")
    };
    let sel = |i: u8, body: Vec<u8>| {
        let mut v = vec![i];
        v.extend(body);
        v
    };
    let valid = exchange(&valid_agent);
    let mut scoped = exchange(&valid_cli);
    scoped.push(("scope", "admin".into()));
    scoped.push(("client_id", CLIENT_ID_CLI.into()));
    let mut replayed = exchange(&valid_agent);
    replayed.push(("client_assertion", valid_agent.clone()));
    let huge_grant = "g".repeat(12 * 1024);
    vec![
        ("valid_agent", sel(0, form(&as_refs(&valid)))),
        ("valid_cli_scoped", sel(2, form(&as_refs(&scoped)))),
        ("expired", sel(0, form(&as_refs(&exchange(&expired))))),
        ("lifetime_48h", sel(0, form(&as_refs(&exchange(&too_long))))),
        (
            "wrong_alg_hs256",
            sel(0, form(&as_refs(&exchange(&wrong_alg)))),
        ),
        ("alg_none", sel(0, form(&as_refs(&exchange(&alg_none))))),
        ("replayed_param", sel(0, form(&as_refs(&replayed)))),
        ("valid_as_json", sel(3, form(&as_refs(&valid)))),
        ("valid_no_content_type", sel(1, form(&as_refs(&valid)))),
        (
            "percent_encoded_valid",
            sel(5, percent_all(&as_refs(&valid))),
        ),
        (
            "huge_grant_type",
            sel(0, form(&[("grant_type", huge_grant.as_str())])),
        ),
        (
            "percent_heavy_16k",
            sel(
                0,
                b"scope="
                    .iter()
                    .copied()
                    .chain(b"%25%FF".repeat(2800))
                    .collect(),
            ),
        ),
    ]
}
