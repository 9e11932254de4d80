//! `POST /oauth2/token` over real HTTPS on the agent listener: the happy
//! paths and every refusal, and that refusals write nothing.

mod common;

use clawker::agent_api::assertion::encode_signed;
use common::{AUDIENCE, Harness, b64, now};
use rand::TryRng;
use ring::signature::{
    ECDSA_P256_SHA256_FIXED_SIGNING, ECDSA_P384_SHA384_FIXED_SIGNING, EcdsaKeyPair,
};
use serde_json::{Value, json};

const FORM: &str = "application/x-www-form-urlencoded";

fn claims() -> Value {
    json!({
        "iss": "clawker-agent",
        "sub": "clawker-agent",
        "aud": AUDIENCE,
        "jti": random_jti(),
        "iat": now(),
        "exp": now() + 3600,
    })
}

/// A unique `jti` (the endpoint takes any string up to 256 bytes).
fn random_jti() -> String {
    let mut b = [0u8; 16];
    rand::rngs::SysRng.try_fill_bytes(&mut b).unwrap();
    hex::encode(b)
}

fn with(mut base: Value, key: &str, v: Value) -> Value {
    if v.is_null() {
        base.as_object_mut().unwrap().remove(key);
    } else {
        base[key] = v;
    }
    base
}

fn key(alg: &'static ring::signature::EcdsaSigningAlgorithm) -> EcdsaKeyPair {
    let rng = ring::rand::SystemRandom::new();
    let doc = EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
    EcdsaKeyPair::from_pkcs8(alg, doc.as_ref(), &rng).unwrap()
}

#[track_caller]
fn assert_oauth_error(reply: (u16, Value), status: u16, error: &str) {
    assert_eq!(reply.0, status, "{}", reply.1);
    assert_eq!(reply.1["error"], error, "{}", reply.1);
    assert!(reply.1["error_description"].is_string(), "{}", reply.1);
}

async fn assert_nothing_written(h: &Harness) {
    assert_eq!(h.registry.spent_jti_count().await.unwrap(), 0);
    assert!(h.api.issuer.tokens().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_endpoint_issues_a_scoped_opaque_bearer_token() {
    let h = Harness::start().await;
    let (status, body) = h
        .exchange(&h.agent_assertion(), Some("agent:self:register"))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 3600);
    assert_eq!(body["scope"], "agent:self:register");
    let token = body["access_token"].as_str().unwrap();
    // 256 bits, base64url without padding.
    assert_eq!(token.len(), 43);
    assert!(
        token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    );
    assert_eq!(h.registry.spent_jti_count().await.unwrap(), 1);
    // And it opens Register.
    let leaf = h.agent("web", "dev", "abc1");
    h.register(Some(&leaf), Some(token), "web", "dev")
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_endpoint_grants_every_allowed_scope_when_none_is_requested() {
    let h = Harness::start().await;
    let (status, body) = h.exchange(&h.agent_assertion(), None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["scope"], "agent:self:register");
    let cli = h.assertion_with(with(
        with(claims(), "iss", json!("clawker-cli")),
        "sub",
        json!("clawker-cli"),
    ));
    let (status, body) = h.exchange(&cli, Some("admin")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["scope"], "admin");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_endpoint_grants_the_intersection_of_requested_and_allowed() {
    let h = Harness::start().await;
    let (status, body) = h
        .exchange(&h.agent_assertion(), Some("admin agent:self:register"))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["scope"], "agent:self:register");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_endpoint_accepts_an_audience_array_and_the_loopback_audience() {
    let h = Harness::start().await;
    let a = h.assertion_with(with(
        claims(),
        "aud",
        json!(["https://elsewhere/token", AUDIENCE]),
    ));
    assert_eq!(h.exchange(&a, None).await.0, 200);
    let a = h.assertion_with(with(
        claims(),
        "aud",
        json!("https://127.0.0.1:7444/oauth2/token"),
    ));
    assert_eq!(h.exchange(&a, None).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_endpoint_refuses_alg_none() {
    let h = Harness::start().await;
    let jwt = format!(
        "{}.{}.",
        b64(br#"{"alg":"none","typ":"JWT"}"#),
        b64(claims().to_string().as_bytes())
    );
    assert_oauth_error(h.exchange(&jwt, None).await, 401, "invalid_client");
    assert_nothing_written(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_endpoint_refuses_hs256_keyed_with_the_public_jwk() {
    let h = Harness::start().await;
    let input = format!(
        "{}.{}",
        b64(br#"{"alg":"HS256","typ":"JWT"}"#),
        b64(claims().to_string().as_bytes())
    );
    // The classic confusion: the public key as an HMAC secret.
    let secret = serde_json::to_vec(&h.signing.jwk()).unwrap();
    let tag = ring::hmac::sign(
        &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret),
        input.as_bytes(),
    );
    let jwt = format!("{input}.{}", b64(tag.as_ref()));
    assert_oauth_error(h.exchange(&jwt, None).await, 401, "invalid_client");
    assert_nothing_written(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_endpoint_refuses_other_curves() {
    let h = Harness::start().await;
    let p384 = key(&ECDSA_P384_SHA384_FIXED_SIGNING);
    let es384 = encode_signed(&p384, &json!({"alg": "ES384", "typ": "JWT"}), &claims()).unwrap();
    assert_oauth_error(h.exchange(&es384, None).await, 401, "invalid_client");
    // A P-384 signature under an ES256 header.
    let lying = encode_signed(&p384, &json!({"alg": "ES256", "typ": "JWT"}), &claims()).unwrap();
    assert_oauth_error(h.exchange(&lying, None).await, 401, "invalid_client");
    assert_nothing_written(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_endpoint_refuses_a_bad_signature() {
    let h = Harness::start().await;
    let stranger = key(&ECDSA_P256_SHA256_FIXED_SIGNING);
    let jwt = encode_signed(&stranger, &json!({"alg": "ES256", "typ": "JWT"}), &claims()).unwrap();
    assert_oauth_error(h.exchange(&jwt, None).await, 401, "invalid_client");
    // A genuine assertion with its payload swapped.
    let good = h.agent_assertion();
    let parts: Vec<&str> = good.split('.').collect();
    let swapped = b64(with(claims(), "iss", json!("clawker-cli"))
        .to_string()
        .as_bytes());
    let forged = format!("{}.{}.{}", parts[0], swapped, parts[2]);
    assert_oauth_error(h.exchange(&forged, None).await, 401, "invalid_client");
    assert_nothing_written(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_endpoint_refuses_wrong_issuer_or_subject() {
    let h = Harness::start().await;
    for bad in [
        with(claims(), "sub", json!("clawker-cli")),
        with(claims(), "iss", json!("clawker-cli")),
        with(claims(), "iss", Value::Null),
        with(claims(), "sub", Value::Null),
    ] {
        assert_oauth_error(
            h.exchange(&h.assertion_with(bad), None).await,
            401,
            "invalid_client",
        );
    }
    assert_nothing_written(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_endpoint_refuses_unknown_clients() {
    let h = Harness::start().await;
    let bad = with(
        with(claims(), "iss", json!("mallory")),
        "sub",
        json!("mallory"),
    );
    assert_oauth_error(
        h.exchange(&h.assertion_with(bad), None).await,
        401,
        "invalid_client",
    );
    assert_nothing_written(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_endpoint_refuses_a_client_id_that_contradicts_the_assertion() {
    let h = Harness::start().await;
    let body = serde_urlencoded::to_string([
        ("grant_type", "client_credentials"),
        ("client_id", "clawker-cli"),
        (
            "client_assertion_type",
            clawker::agent_api::assertion::JWT_BEARER_TYPE,
        ),
        ("client_assertion", &h.agent_assertion()),
    ])
    .unwrap();
    assert_oauth_error(
        h.post_token(FORM, body.as_bytes()).await,
        401,
        "invalid_client",
    );
    assert_nothing_written(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_endpoint_refuses_wrong_audience() {
    let h = Harness::start().await;
    for aud in [
        json!("https://clawker-controlplane:4444/oauth2/token"),
        json!(["https://elsewhere/token"]),
        json!([]),
        Value::Null,
    ] {
        let a = h.assertion_with(with(claims(), "aud", aud));
        assert_oauth_error(h.exchange(&a, None).await, 401, "invalid_client");
    }
    assert_nothing_written(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_endpoint_refuses_expired_assertions() {
    let h = Harness::start().await;
    let old = with(
        with(claims(), "iat", json!(now() - 7200)),
        "exp",
        json!(now() - 3600),
    );
    assert_oauth_error(
        h.exchange(&h.assertion_with(old), None).await,
        401,
        "invalid_client",
    );
    let no_exp = with(claims(), "exp", Value::Null);
    assert_oauth_error(
        h.exchange(&h.assertion_with(no_exp), None).await,
        401,
        "invalid_client",
    );
    assert_nothing_written(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_endpoint_refuses_lifetimes_beyond_24_hours() {
    let h = Harness::start().await;
    let long = with(claims(), "exp", json!(now() + 25 * 3600));
    assert_oauth_error(
        h.exchange(&h.assertion_with(long), None).await,
        401,
        "invalid_client",
    );
    // Omitting iat does not lift the cap.
    let long = with(
        with(claims(), "iat", Value::Null),
        "exp",
        json!(now() + 48 * 3600),
    );
    assert_oauth_error(
        h.exchange(&h.assertion_with(long), None).await,
        401,
        "invalid_client",
    );
    // iat far in the past with a near exp: lifetime is still too long.
    let long = with(claims(), "iat", json!(now() - 30 * 3600));
    assert_oauth_error(
        h.exchange(&h.assertion_with(long), None).await,
        401,
        "invalid_client",
    );
    // Future iat.
    let future = with(claims(), "iat", json!(now() + 3600));
    assert_oauth_error(
        h.exchange(&h.assertion_with(future), None).await,
        401,
        "invalid_client",
    );
    assert_nothing_written(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_endpoint_refuses_missing_jti() {
    let h = Harness::start().await;
    for jti in [Value::Null, json!("")] {
        let a = h.assertion_with(with(claims(), "jti", jti));
        assert_oauth_error(h.exchange(&a, None).await, 401, "invalid_client");
    }
    assert_nothing_written(&h).await;
}

/// Replay protection: once a Register succeeded with one of its tokens,
/// an agent assertion is refused — by the same JWT or another one that
/// reuses its jti.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_assertion_is_refused_once_a_register_redeemed_it() {
    let h = Harness::start().await;
    let jti = "fixed-jti";
    let first = h.assertion_with(with(claims(), "jti", json!(jti)));
    let (status, body) = h.exchange(&first, None).await;
    assert_eq!(status, 200, "{body}");
    let token = body["access_token"].as_str().unwrap();
    let leaf = h.agent("web", "dev", "abc1");
    h.register(Some(&leaf), Some(token), "web", "dev")
        .await
        .unwrap();
    assert_oauth_error(h.exchange(&first, None).await, 400, "invalid_grant");
    let second = h.assertion_with(with(claims(), "jti", json!(jti)));
    assert_oauth_error(h.exchange(&second, None).await, 400, "invalid_grant");
    assert_eq!(h.registry.spent_jti_count().await.unwrap(), 1);
    // The redeemed token itself stays valid until it expires: a retried
    // Register after a lost answer is idempotent.
    h.register(Some(&leaf), Some(token), "web", "dev")
        .await
        .unwrap();
}

/// Never bricked: before any Register succeeded, the agent's assertion may
/// be exchanged again (clawkerd lost its token: container restart, lost
/// answer, expiry); the new token revokes the previous one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unredeemed_agent_assertion_gets_a_new_token_and_the_old_one_is_revoked() {
    let h = Harness::start().await;
    let a = h.agent_assertion();
    let (s1, b1) = h.exchange(&a, None).await;
    let (s2, b2) = h.exchange(&a, None).await;
    assert_eq!((s1, s2), (200, 200), "{b1} {b2}");
    let (t1, t2) = (
        b1["access_token"].as_str().unwrap(),
        b2["access_token"].as_str().unwrap(),
    );
    assert_ne!(t1, t2);
    assert_eq!(
        h.api.issuer.tokens().len(),
        1,
        "one live token per assertion"
    );
    assert_eq!(h.registry.spent_jti_count().await.unwrap(), 1);
    let leaf = h.agent("web", "dev", "abc1");
    let stale = h.register(Some(&leaf), Some(t1), "web", "dev").await;
    assert_eq!(stale.unwrap_err().code(), tonic::Code::Unauthenticated);
    h.register(Some(&leaf), Some(t2), "web", "dev")
        .await
        .unwrap();
    assert_oauth_error(h.exchange(&a, None).await, 400, "invalid_grant");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_clients_assertions_stay_strictly_single_use() {
    let h = Harness::start().await;
    let cli = h.assertion_with(with(
        with(claims(), "iss", json!("clawker-cli")),
        "sub",
        json!("clawker-cli"),
    ));
    assert_eq!(h.exchange(&cli, None).await.0, 200);
    assert_oauth_error(h.exchange(&cli, None).await, 400, "invalid_grant");
}

/// Spent JTIs *and* issued tokens are in the redb file: a token survives a
/// CP restart, a redeemed assertion stays refused, an unredeemed one can
/// still be exchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_spent_jtis_survive_a_restart() {
    let mut h = Harness::start().await;
    let leaf = h.agent("web", "dev", "abc1");
    let a = h.agent_assertion();
    let (_, body) = h.exchange(&a, None).await;
    let token = body["access_token"].as_str().unwrap().to_owned();
    h.restart().await;
    assert_eq!(h.api.issuer.tokens().len(), 1, "reloaded from the file");
    h.register(Some(&leaf), Some(&token), "web", "dev")
        .await
        .unwrap();
    h.restart().await;
    assert_oauth_error(h.exchange(&a, None).await, 400, "invalid_grant");

    let leaf2 = h.agent("web", "ops", "abc2");
    let b = h.agent_assertion();
    let (_, body) = h.exchange(&b, None).await;
    let old = body["access_token"].as_str().unwrap().to_owned();
    h.restart().await;
    let (status, body) = h.exchange(&b, None).await;
    assert_eq!(status, 200, "{body}");
    let new = body["access_token"].as_str().unwrap().to_owned();
    let revoked = h.register(Some(&leaf2), Some(&old), "web", "ops").await;
    assert_eq!(revoked.unwrap_err().code(), tonic::Code::Unauthenticated);
    h.register(Some(&leaf2), Some(&new), "web", "ops")
        .await
        .unwrap();
    // The new process issues tokens for fresh assertions.
    assert_eq!(h.exchange(&h.agent_assertion(), None).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_exchanges_of_one_assertion_leave_one_live_token() {
    let h = std::sync::Arc::new(Harness::start().await);
    let a = h.agent_assertion();
    let calls = (0..6).map(|_| {
        let (h, a) = (h.clone(), a.clone());
        tokio::spawn(async move { h.exchange(&a, None).await.0 })
    });
    let statuses: Vec<u16> = futures::future::join_all(calls)
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(
        h.api.issuer.tokens().len(),
        1,
        "each exchange revoked the last"
    );
    assert_eq!(h.registry.spent_jti_count().await.unwrap(), 1);

    // A strictly single-use client: exactly one of them wins.
    let cli = h.assertion_with(with(
        with(claims(), "iss", json!("clawker-cli")),
        "sub",
        json!("clawker-cli"),
    ));
    let calls = (0..6).map(|_| {
        let (h, a) = (h.clone(), cli.clone());
        tokio::spawn(async move { h.exchange(&a, None).await.0 })
    });
    let statuses: Vec<u16> = futures::future::join_all(calls)
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        1,
        "{statuses:?}"
    );
    assert!(statuses.iter().all(|s| *s == 200 || *s == 400));
    assert_eq!(h.api.issuer.tokens().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_endpoint_refuses_scopes_the_client_may_not_have() {
    let h = Harness::start().await;
    assert_oauth_error(
        h.exchange(&h.agent_assertion(), Some("admin")).await,
        400,
        "invalid_scope",
    );
    assert_oauth_error(
        h.exchange(&h.agent_assertion(), Some("bad\"scope")).await,
        400,
        "invalid_scope",
    );
    assert_nothing_written(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_endpoint_refuses_other_grant_types() {
    let h = Harness::start().await;
    for grant in [
        "password",
        "authorization_code",
        "urn:ietf:params:oauth:grant-type:jwt-bearer",
    ] {
        let body = serde_urlencoded::to_string([
            ("grant_type", grant),
            (
                "client_assertion_type",
                clawker::agent_api::assertion::JWT_BEARER_TYPE,
            ),
            ("client_assertion", &h.agent_assertion()),
        ])
        .unwrap();
        assert_oauth_error(
            h.post_token(FORM, body.as_bytes()).await,
            400,
            "unsupported_grant_type",
        );
    }
    let body = serde_urlencoded::to_string([("client_assertion", &h.agent_assertion())]).unwrap();
    assert_oauth_error(
        h.post_token(FORM, body.as_bytes()).await,
        400,
        "invalid_request",
    );
    assert_nothing_written(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_endpoint_requires_client_authentication() {
    let h = Harness::start().await;
    let body = "grant_type=client_credentials&scope=admin";
    assert_oauth_error(
        h.post_token(FORM, body.as_bytes()).await,
        401,
        "invalid_client",
    );
    let body = serde_urlencoded::to_string([
        ("grant_type", "client_credentials"),
        (
            "client_assertion_type",
            "urn:ietf:params:oauth:client-assertion-type:saml2-bearer",
        ),
        ("client_assertion", &h.agent_assertion()),
    ])
    .unwrap();
    assert_oauth_error(
        h.post_token(FORM, body.as_bytes()).await,
        401,
        "invalid_client",
    );
    assert_nothing_written(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_endpoint_refuses_wrong_content_type() {
    let h = Harness::start().await;
    let body = serde_urlencoded::to_string([
        ("grant_type", "client_credentials"),
        (
            "client_assertion_type",
            clawker::agent_api::assertion::JWT_BEARER_TYPE,
        ),
        ("client_assertion", &h.agent_assertion()),
    ])
    .unwrap();
    for ct in [
        "application/json",
        "text/plain",
        "multipart/form-data; boundary=x",
    ] {
        assert_oauth_error(
            h.post_token(ct, body.as_bytes()).await,
            400,
            "invalid_request",
        );
    }
    assert_nothing_written(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_endpoint_refuses_garbage_bodies() {
    let h = Harness::start().await;
    let garbage: [&[u8]; 6] = [
        b"\xff\xfe\x00\x01binary",
        b"%%%%&&&===",
        b"grant_type=client_credentials&grant_type=client_credentials",
        b"{\"grant_type\":\"client_credentials\"}",
        b"",
        b"grant_type=client_credentials&client_assertion_type=urn%3Aietf%3Aparams%3Aoauth%3Aclient-assertion-type%3Ajwt-bearer&client_assertion=not.a.jwt!",
    ];
    for body in garbage {
        let (status, json) = h.post_token(FORM, body).await;
        assert!(status == 400 || status == 401, "{status} {json}");
        assert!(json["error"].is_string(), "{json}");
    }
    // Bad base64 in each part of the assertion.
    for jwt in [
        "***.e30.sig",
        "e30.***.sig",
        "eyJhbGciOiJFUzI1NiJ9.e30.***",
        "a.b.c.d",
    ] {
        assert_oauth_error(h.exchange(jwt, None).await, 401, "invalid_client");
    }
    assert_nothing_written(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_endpoint_refuses_oversized_bodies_and_assertions() {
    let h = Harness::start().await;
    let big = vec![b'a'; 64 * 1024];
    let (status, json) = h.post_token(FORM, &big).await;
    assert_eq!(
        (status, json["error"].as_str()),
        (400, Some("invalid_request")),
        "{json}"
    );
    assert_eq!(json["error_description"], "request body too large");
    // An assertion over 8 KiB inside a body under 16 KiB.
    let padded = h.assertion_with(with(claims(), "pad", json!("x".repeat(9 * 1024))));
    assert!(padded.len() > 8 * 1024 && padded.len() < 15 * 1024);
    assert_oauth_error(h.exchange(&padded, None).await, 401, "invalid_client");
    assert_nothing_written(&h).await;
}
