//! AgentService.Register and its interceptors over real mTLS on loopback:
//! a tonic client presenting crafted certificates, a real redb registry,
//! the in-memory container inspector.

mod common;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use clawker::agent_api::scopes::{IdentityDecision, REGISTER_METHOD};
use clawker::identity::Thumbprint;
use clawker::pki::LeafSpec;
use clawker::registry::NewEntry;
use clawker::runtime::ContainerFacts;
use common::{Harness, LOOPBACK};
use rcgen::ExtendedKeyUsagePurpose;
use tonic::Code;

const DENIED: &str = "register: identity check failed";

fn assert_status(r: Result<(), tonic::Status>, code: Code, msg: &str) {
    let s = r.expect_err("call should fail");
    assert_eq!((s.code(), s.message()), (code, msg), "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_persists_identity_from_the_certificate() {
    let h = Harness::start().await;
    let leaf = h.agent("web", "dev", "abc123");
    let token = h.agent_token().await;
    h.register(Some(&leaf), Some(&token), "web", "dev")
        .await
        .unwrap();
    let rows = h.registry.snapshot();
    assert_eq!(rows.len(), 1);
    let e = &rows[0];
    assert_eq!(e.thumbprint, Thumbprint::of_der(&leaf.cert_der));
    assert_eq!(e.container_id, "abc123");
    assert_eq!((e.project.as_str(), e.agent_name.as_str()), ("web", "dev"));
    assert_eq!(e.canonical_cn, "clawker.web.dev");
    assert_eq!(h.inspector.calls(), vec!["abc123".to_owned()]);
    // Durable: visible in the file after a restart.
    let mut h = h;
    h.restart().await;
    assert_eq!(h.registry.snapshot().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_accepts_an_unscoped_agent() {
    let h = Harness::start().await;
    let leaf = h.agent("", "solo", "abc1");
    let token = h.agent_token().await;
    h.register(Some(&leaf), Some(&token), "", "solo")
        .await
        .unwrap();
    assert_eq!(h.registry.snapshot()[0].canonical_cn, "clawker.solo");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_rejects_invalid_names_before_anything_else() {
    let h = Harness::start().await;
    let leaf = h.agent("web", "dev", "abc1");
    let token = h.agent_token().await;
    assert_status(
        h.register(Some(&leaf), Some(&token), "BAD UPPER", "dev")
            .await,
        Code::InvalidArgument,
        "register: invalid project",
    );
    assert_status(
        h.register(Some(&leaf), Some(&token), "web", "").await,
        Code::InvalidArgument,
        "register: invalid agent name",
    );
    assert_status(
        h.register(Some(&leaf), Some(&token), "web", "clawker.dev")
            .await,
        Code::InvalidArgument,
        "register: invalid agent name",
    );
    assert!(h.inspector.calls().is_empty());
    assert!(h.registry.snapshot().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_rejects_cn_mismatch_without_asking_docker() {
    let h = Harness::start().await;
    let leaf = h.agent("actual", "dev", "abc1");
    let token = h.agent_token().await;
    assert_status(
        h.register(Some(&leaf), Some(&token), "different", "dev")
            .await,
        Code::PermissionDenied,
        DENIED,
    );
    assert!(h.inspector.calls().is_empty());
    assert!(h.registry.snapshot().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_rejects_cert_without_container_san() {
    let h = Harness::start().await;
    let mut spec = LeafSpec::new("clawker.web.dev", time::Duration::hours(1));
    spec.ekus = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let leaf = h.ca.issue(&spec).unwrap();
    let token = h.agent_token().await;
    assert_status(
        h.register(Some(&leaf), Some(&token), "web", "dev").await,
        Code::PermissionDenied,
        DENIED,
    );
    assert!(h.inspector.calls().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_rejects_unknown_container() {
    let h = Harness::start().await;
    let leaf = h.agent("web", "dev", "abc1");
    h.inspector.remove("abc1");
    let token = h.agent_token().await;
    assert_status(
        h.register(Some(&leaf), Some(&token), "web", "dev").await,
        Code::PermissionDenied,
        DENIED,
    );
    assert_eq!(h.inspector.calls(), vec!["abc1".to_owned()]);
    assert!(h.registry.snapshot().is_empty());
}

/// The reference answered PermissionDenied here (this test asserted it
/// until the fix): a Docker hiccup looked like an identity failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_docker_inspect_timeout_is_unavailable_not_an_identity_failure() {
    let h = Harness::start_with(|c| c.inspect_timeout = Duration::from_millis(200)).await;
    let leaf = h.agent("web", "dev", "abc1");
    h.inspector.set_delay(Some(Duration::from_secs(3)));
    let token = h.agent_token().await;
    let started = std::time::Instant::now();
    assert_status(
        h.register(Some(&leaf), Some(&token), "web", "dev").await,
        Code::Unavailable,
        "register: container runtime unavailable",
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(h.registry.snapshot().is_empty());
    // The same token works once Docker answers again.
    h.inspector.set_delay(None);
    h.register(Some(&leaf), Some(&token), "web", "dev")
        .await
        .unwrap();
    assert_eq!(h.registry.snapshot().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_docker_api_error_and_a_registry_fault_are_unavailable() {
    let h = Harness::start().await;
    let leaf = h.agent("web", "dev", "abc1");
    let token = h.agent_token().await;
    h.inspector.fail_next(
        1,
        clawker::runtime::RuntimeError::Api("connection refused".into()),
    );
    assert_status(
        h.register(Some(&leaf), Some(&token), "web", "dev").await,
        Code::Unavailable,
        "register: container runtime unavailable",
    );
    h.registry
        .fail_next_add(clawker::registry::RegistryError::Unavailable("disk".into()));
    assert_status(
        h.register(Some(&leaf), Some(&token), "web", "dev").await,
        Code::Unavailable,
        "register: the registry cannot persist right now (storage); retry later",
    );
    assert!(h.registry.snapshot().is_empty());
    h.register(Some(&leaf), Some(&token), "web", "dev")
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_rejects_label_mismatch() {
    let h = Harness::start().await;
    let leaf = h.agent("web", "dev", "abc1");
    h.inspector.insert(
        "abc1",
        ContainerFacts::agent("abc1", "other", "dev", LOOPBACK),
    );
    let token = h.agent_token().await;
    assert_status(
        h.register(Some(&leaf), Some(&token), "web", "dev").await,
        Code::PermissionDenied,
        DENIED,
    );
    assert!(h.registry.snapshot().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_rejects_peer_ip_mismatch() {
    let h = Harness::start().await;
    let leaf = h.agent("web", "dev", "abc1");
    let token = h.agent_token().await;
    h.inspector.insert(
        "abc1",
        ContainerFacts::agent(
            "abc1",
            "web",
            "dev",
            IpAddr::V4(Ipv4Addr::new(10, 20, 0, 5)),
        ),
    );
    assert_status(
        h.register(Some(&leaf), Some(&token), "web", "dev").await,
        Code::PermissionDenied,
        DENIED,
    );
    // Not on clawker-net at all.
    let mut facts = ContainerFacts::agent("abc1", "web", "dev", LOOPBACK);
    facts.ip = None;
    h.inspector.insert("abc1", facts);
    assert_status(
        h.register(Some(&leaf), Some(&token), "web", "dev").await,
        Code::PermissionDenied,
        DENIED,
    );
    assert!(h.registry.snapshot().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_compares_ipv4_mapped_addresses_unmapped() {
    let h = Harness::start().await;
    let leaf = h.agent("web", "dev", "abc1");
    let mapped = IpAddr::V6(Ipv4Addr::LOCALHOST.to_ipv6_mapped());
    assert_ne!(mapped, IpAddr::V6(Ipv6Addr::LOCALHOST));
    h.inspector
        .insert("abc1", ContainerFacts::agent("abc1", "web", "dev", mapped));
    let token = h.agent_token().await;
    h.register(Some(&leaf), Some(&token), "web", "dev")
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_retry_with_the_same_certificate_is_idempotent() {
    let h = Harness::start().await;
    let leaf = h.agent("web", "dev", "abc1");
    let token = h.agent_token().await;
    h.register(Some(&leaf), Some(&token), "web", "dev")
        .await
        .unwrap();
    let before = h.registry.snapshot();
    h.register(Some(&leaf), Some(&token), "web", "dev")
        .await
        .unwrap();
    assert_eq!(h.registry.snapshot(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_rejects_thumbprint_replay() {
    let h = Harness::start().await;
    let first = h.agent("web", "dev", "abc1");
    let second = h.agent("web", "dev", "abc1");
    let token = h.agent_token().await;
    h.register(Some(&first), Some(&token), "web", "dev")
        .await
        .unwrap();
    assert_status(
        h.register(Some(&second), Some(&token), "web", "dev").await,
        Code::PermissionDenied,
        DENIED,
    );
    let rows = h.registry.snapshot();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].thumbprint, Thumbprint::of_der(&first.cert_der));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_registers_of_one_container_leave_one_row() {
    let h = std::sync::Arc::new(Harness::start().await);
    let token = h.agent_token().await;
    // Same certificate eight times at once: all succeed, one row.
    let leaf = h.agent("web", "dev", "abc1");
    let calls = (0..8).map(|_| {
        let (h, leaf, token) = (h.clone(), leaf.clone(), token.clone());
        tokio::spawn(async move { h.register(Some(&leaf), Some(&token), "web", "dev").await })
    });
    for r in futures::future::join_all(calls).await {
        r.unwrap().unwrap();
    }
    assert_eq!(h.registry.snapshot().len(), 1);

    // Eight different certificates for one container at once: exactly one
    // wins, every other is a replay.
    let leaves: Vec<_> = (0..8).map(|_| h.agent("web", "ops", "abc2")).collect();
    let calls = leaves.into_iter().map(|leaf| {
        let (h, token) = (h.clone(), token.clone());
        tokio::spawn(async move { h.register(Some(&leaf), Some(&token), "web", "ops").await })
    });
    let results: Vec<_> = futures::future::join_all(calls)
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 1);
    for r in results.into_iter().filter_map(|r| r.err()) {
        assert_eq!((r.code(), r.message()), (Code::PermissionDenied, DENIED));
    }
    let rows = h.registry.snapshot();
    assert_eq!(rows.iter().filter(|e| e.container_id == "abc2").count(), 1);
}

// ---- AuthInterceptor -------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_requires_a_bearer_token() {
    let h = Harness::start().await;
    let leaf = h.agent("web", "dev", "abc1");
    assert_status(
        h.register(Some(&leaf), None, "web", "dev").await,
        Code::Unauthenticated,
        "missing bearer token",
    );
    assert!(h.inspector.calls().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_rejects_non_bearer_authorization() {
    let h = Harness::start().await;
    let leaf = h.agent("web", "dev", "abc1");
    let channel = h.channel(Some(&leaf)).await.unwrap();
    let mut req = tonic::Request::new(clawker::proto::agent::v1::RegisterRequest {
        agent_name: "dev".into(),
        project: "web".into(),
    });
    req.metadata_mut()
        .insert("authorization", "Basic dXNlcjpwYXNz".parse().unwrap());
    let s = clawker::proto::agent::v1::agent_service_client::AgentServiceClient::new(channel)
        .register(req)
        .await
        .unwrap_err();
    assert_eq!(
        (s.code(), s.message()),
        (Code::Unauthenticated, "missing bearer token")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_rejects_unknown_token() {
    let h = Harness::start().await;
    let leaf = h.agent("web", "dev", "abc1");
    assert_status(
        h.register(Some(&leaf), Some("not-a-token"), "web", "dev")
            .await,
        Code::Unauthenticated,
        "token inactive or invalid",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_rejects_token_without_the_register_scope() {
    let h = Harness::start().await;
    let leaf = h.agent("web", "dev", "abc1");
    let cli = h.assertion_with(serde_json::json!({
        "iss": "clawker-cli", "sub": "clawker-cli", "aud": common::AUDIENCE,
        "jti": "cli-1", "iat": common::now(), "exp": common::now() + 30,
    }));
    let (status, body) = h.exchange(&cli, Some("admin")).await;
    assert_eq!(status, 200, "{body}");
    let admin_token = body["access_token"].as_str().unwrap();
    assert_status(
        h.register(Some(&leaf), Some(admin_token), "web", "dev")
            .await,
        Code::Unauthenticated,
        "token inactive or invalid",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_rejects_token_of_another_client_with_the_right_scope() {
    let h = Harness::start_with(|c| {
        c.token
            .clients
            .insert("clawker-other".into(), vec!["agent:self:register".into()]);
    })
    .await;
    let leaf = h.agent("web", "dev", "abc1");
    let other = h.assertion_with(serde_json::json!({
        "iss": "clawker-other", "sub": "clawker-other", "aud": common::AUDIENCE,
        "jti": "o-1", "iat": common::now(), "exp": common::now() + 30,
    }));
    let (status, body) = h.exchange(&other, None).await;
    assert_eq!(status, 200, "{body}");
    assert_status(
        h.register(Some(&leaf), body["access_token"].as_str(), "web", "dev")
            .await,
        Code::PermissionDenied,
        "token missing required scope \"agent:self:register\"",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmapped_methods_are_denied_even_with_a_good_token() {
    let h = Harness::start_with(|c| c.method_scopes.clear()).await;
    let leaf = h.agent("web", "dev", "abc1");
    let token = h.agent_token().await;
    assert_status(
        h.register(Some(&leaf), Some(&token), "web", "dev").await,
        Code::Unauthenticated,
        "unauthorized",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_without_a_client_certificate_is_refused() {
    let h = Harness::start().await;
    h.agent("web", "dev", "abc1");
    let token = h.agent_token().await;
    assert_status(
        h.register(None, Some(&token), "web", "dev").await,
        Code::Unauthenticated,
        "client certificate required",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificate_from_a_foreign_ca_fails_the_handshake() {
    let h = Harness::start().await;
    let foreign = clawker::pki::Ca::generate().unwrap();
    let leaf = foreign
        .mint_agent(
            &clawker::identity::ProjectSlug::new("web").unwrap(),
            &clawker::identity::AgentName::new("dev").unwrap(),
            "abc1",
        )
        .unwrap();
    let token = h.agent_token().await;
    let err = h
        .register(Some(&leaf), Some(&token), "web", "dev")
        .await
        .unwrap_err();
    // TLS 1.3 client auth fails after the client's view of the handshake,
    // so the refusal surfaces on the first call as a transport error (the
    // server's alert), never as an RPC the handler saw.
    // Depending on timing the client sees the alert or just the closed
    // connection.
    assert!(
        matches!(
            err.code(),
            Code::Unavailable | Code::Unknown | Code::Cancelled
        ),
        "{err:?}"
    );
    assert!(format!("{err:?}").contains("transport"), "{err:?}");
    assert!(h.inspector.calls().is_empty());
    assert!(h.registry.snapshot().is_empty());
}

// ---- IdentityInterceptor ---------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_required_methods_refuse_unregistered_peers() {
    // Register is opted out in production; flip it to exercise the
    // identity-required branch end to end.
    let h = Harness::start_with(|c| {
        c.identity_policy
            .insert(REGISTER_METHOD.into(), IdentityDecision::Required);
    })
    .await;
    let leaf = h.agent("web", "dev", "abc1");
    let token = h.agent_token().await;
    assert_status(
        h.register(Some(&leaf), Some(&token), "web", "dev").await,
        Code::PermissionDenied,
        "registration rejected",
    );
    assert!(h.inspector.calls().is_empty(), "handler must not run");

    h.registry
        .add(NewEntry {
            agent_name: "dev".into(),
            project: "web".into(),
            container_id: "abc1".into(),
            thumbprint: Thumbprint::of_der(&leaf.cert_der),
            registered_at_unix: common::now(),
            last_seen_unix: 0,
        })
        .await
        .unwrap();
    // Known peer: passes the interceptor, Register is an idempotent retry.
    h.register(Some(&leaf), Some(&token), "web", "dev")
        .await
        .unwrap();
    // A registered thumbprint presented under a different CN is unknown.
    let other = h.agent("web", "ops", "abc2");
    assert_status(
        h.register(Some(&other), Some(&token), "web", "ops").await,
        Code::PermissionDenied,
        "registration rejected",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_policy_keys_fail_startup() {
    let dir = tempfile::tempdir().unwrap();
    let ca = clawker::pki::Ca::generate().unwrap();
    let server = ca.mint_cp_server(&[]).unwrap();
    let signing = clawker::pki::SigningKey::generate().unwrap();
    let registry = clawker::registry::Registry::start(
        clawker::registry::RegistryStore::open(&dir.path().join("cp.redb")).unwrap(),
    )
    .unwrap();
    let mut config = clawker::agent_api::AgentApiConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        server.cert_pem.clone(),
        server.key_pem.clone(),
        ca.cert_pem().to_owned(),
        signing.jwk(),
    );
    config.identity_policy.insert(
        "/clawker.agent.v1.AgentService/Connect".into(),
        IdentityDecision::OptedOut,
    );
    let inspector = std::sync::Arc::new(clawker::runtime::memory::StaticInspector::new());
    let err = clawker::agent_api::serve_agent_api(
        config.clone(),
        registry.clone(),
        inspector.clone(),
        std::future::pending(),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("stale key"), "{err}");

    config.identity_policy = clawker::agent_api::scopes::agent_identity_policy();
    config
        .method_scopes
        .insert("/clawker.agent.v1.AgentService/Gone".into(), "x".into());
    let err =
        clawker::agent_api::serve_agent_api(config, registry, inspector, std::future::pending())
            .await
            .unwrap_err();
    assert!(err.to_string().contains("stale key"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_1_2_clients_are_refused() {
    use rustls_pki_types::pem::PemObject;
    let h = Harness::start().await;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(h.ca.cert_pem().as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS12])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("clawker-controlplane").unwrap();
    let res = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
        .connect(name, tcp)
        .await;
    assert!(res.is_err(), "TLS 1.2 handshake must fail");
}
