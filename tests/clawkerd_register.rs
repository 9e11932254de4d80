//! RegisterRequired → token exchange → AgentService.Register, against an
//! in-test HTTPS token endpoint and an in-test tonic AgentService, both on
//! loopback with the CP server certificate.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use clawker::proto::agent::v1::{
    RegisterRequest, Welcome,
    agent_service_server::{AgentService, AgentServiceServer},
};
use clawker::proto::clawkerd::v1::response::Payload as Resp;
use clawker::tls;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// The token endpoint's canned answer(s) and what it saw.
#[derive(Clone)]
struct TokenServer {
    status: u16,
    body: String,
    /// Answers for the first hits, before `body` (status 200).
    first: Arc<Mutex<std::collections::VecDeque<String>>>,
    hits: Arc<AtomicUsize>,
    forms: Arc<Mutex<Vec<String>>>,
}

impl TokenServer {
    fn new(status: u16, body: &str) -> Self {
        Self {
            status,
            body: body.to_owned(),
            first: Arc::default(),
            hits: Arc::default(),
            forms: Arc::default(),
        }
    }

    /// Serves HTTPS on loopback; `h2` picks the ALPN protocol offered.
    async fn start(&self, pki: &TestPki, h2: bool) -> SocketAddr {
        let server = pki.ca.mint_cp_server(&[]).unwrap();
        let mut cfg = rustls::ServerConfig::builder_with_provider(tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                tls::load_certs("c", server.cert_pem.as_bytes()).unwrap(),
                tls::load_key("k", server.key_pem.as_bytes()).unwrap(),
            )
            .unwrap();
        cfg.alpn_protocols = vec![if h2 {
            b"h2".to_vec()
        } else {
            b"http/1.1".to_vec()
        }];
        let acceptor = TlsAcceptor::from(Arc::new(cfg));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                let me = me.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(sock).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(
                        move |req: http::Request<hyper::body::Incoming>| {
                            let me = me.clone();
                            async move {
                                me.hits.fetch_add(1, Ordering::SeqCst);
                                let ct = req
                                    .headers()
                                    .get(http::header::CONTENT_TYPE)
                                    .and_then(|v| v.to_str().ok())
                                    .unwrap_or_default()
                                    .to_owned();
                                let path = req.uri().path().to_owned();
                                let body = req.into_body().collect().await.unwrap().to_bytes();
                                me.forms.lock().unwrap().push(format!(
                                    "{path} {ct} {}",
                                    String::from_utf8_lossy(&body)
                                ));
                                let (status, body) = match me.first.lock().unwrap().pop_front() {
                                    Some(b) => (200, b),
                                    None => (me.status, me.body.clone()),
                                };
                                let resp = http::Response::builder()
                                    .status(status)
                                    .header("content-type", "application/json")
                                    .body(Full::new(Bytes::from(body)))
                                    .unwrap();
                                Ok::<_, Infallible>(resp)
                            }
                        },
                    );
                    let io = TokioIo::new(tls);
                    if h2 {
                        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .serve_connection(io, svc)
                            .await;
                    } else {
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(io, svc)
                            .await;
                    }
                });
            }
        });
        addr
    }
}

/// The in-test AgentService: accepts `Bearer tok-1` only, unless a
/// scripted answer is queued (`script`), which is used first.
#[derive(Clone, Default)]
struct Agents {
    calls: Arc<Mutex<Vec<(String, String, String)>>>,
    script: Arc<Mutex<std::collections::VecDeque<tonic::Status>>>,
    /// Tokens accepted besides `tok-1`.
    also_accept: Arc<Mutex<Vec<String>>>,
}

#[tonic::async_trait]
impl AgentService for Agents {
    async fn register(
        &self,
        request: tonic::Request<RegisterRequest>,
    ) -> Result<tonic::Response<Welcome>, tonic::Status> {
        let auth = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let req = request.into_inner();
        self.calls
            .lock()
            .unwrap()
            .push((auth.clone(), req.agent_name, req.project));
        if let Some(status) = self.script.lock().unwrap().pop_front() {
            return Err(status);
        }
        let extra = self
            .also_accept
            .lock()
            .unwrap()
            .iter()
            .any(|t| auth == format!("Bearer {t}"));
        if auth != "Bearer tok-1" && !extra {
            return Err(tonic::Status::permission_denied("bad token"));
        }
        Ok(tonic::Response::new(Welcome {}))
    }
}

/// Serves AgentService over mTLS (client cert chained to the CA required).
async fn start_agent_service(pki: &TestPki, agents: Agents) -> SocketAddr {
    let server = pki.ca.mint_cp_server(&[]).unwrap();
    let roots = Arc::new(tls::root_store("ca", pki.ca.cert_pem().as_bytes()).unwrap());
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots, tls::provider())
            .build()
            .unwrap();
    let mut cfg = rustls::ServerConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            tls::load_certs("c", server.cert_pem.as_bytes()).unwrap(),
            tls::load_key("k", server.key_pem.as_bytes()).unwrap(),
        )
        .unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(cfg));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<_>>(8);
    tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(sock).await {
                    let _ = tx.send(Ok(tls)).await;
                }
            });
        }
    });
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AgentServiceServer::new(agents))
            .serve_with_incoming(tokio_stream::wrappers::ReceiverStream::new(rx)),
    );
    addr
}

async fn register_once(s: &mut Session, id: &str) -> (bool, String) {
    s.send(register_required(id)).await;
    let r = s.next_for(id, Duration::from_secs(30)).await.unwrap();
    match r.payload {
        Some(Resp::RegisterDone(d)) => (d.ok, d.error),
        other => panic!("expected RegisterDone, got {other:?}"),
    }
}

async fn clawkerd_with(
    pki: &TestPki,
    token_url: Option<String>,
    agent_addr: Option<String>,
) -> (Clawkerd, Session) {
    let mut env = Vec::new();
    if let Some(u) = token_url {
        env.push(("CLAWKER_CP_TOKEN_URL".to_owned(), u));
    }
    if let Some(a) = agent_addr {
        env.push(("CLAWKER_CP_AGENT_ADDR".to_owned(), a));
    }
    let d = Clawkerd::spawn_with(
        pki,
        Opts {
            env,
            ..Default::default()
        },
    );
    let mut c = CpClient::connect(d.addr, pki).await.unwrap();
    let s = c.open_session().await.unwrap();
    // Keep the client alive for the session's lifetime.
    std::mem::forget(c);
    (d, s)
}

const GOOD: &str = r#"{"access_token":"tok-1","token_type":"bearer","expires_in":300,"scope":"agent:self:register"}"#;

/// The reference short-circuited a repeat with the cached outcome; we keep
/// the token, not the outcome, so a repeat is a real (idempotent) call.
#[tokio::test(flavor = "multi_thread")]
async fn register_succeeds_and_a_repeat_reuses_the_cached_token() {
    for h2 in [false, true] {
        let pki = TestPki::new();
        let tokens = TokenServer::new(200, GOOD);
        let token_addr = tokens.start(&pki, h2).await;
        let agents = Agents::default();
        let agent_addr = start_agent_service(&pki, agents.clone()).await;
        let (d, mut s) = clawkerd_with(
            &pki,
            Some(format!("https://{token_addr}/oauth2/token")),
            Some(agent_addr.to_string()),
        )
        .await;
        assert_eq!(
            register_once(&mut s, "r1").await,
            (true, String::new()),
            "h2={h2}"
        );
        assert_eq!(register_once(&mut s, "r2").await, (true, String::new()));
        assert_eq!(tokens.hits.load(Ordering::SeqCst), 1, "one exchange");
        assert_eq!(
            agents.calls.lock().unwrap().len(),
            2,
            "a real call each time"
        );
        let (auth, agent, project) = agents.calls.lock().unwrap()[0].clone();
        assert_eq!(auth, "Bearer tok-1");
        assert_eq!((agent.as_str(), project.as_str()), (AGENT, PROJECT));
        let form = tokens.forms.lock().unwrap()[0].clone();
        assert_eq!(
            form,
            "/oauth2/token application/x-www-form-urlencoded \
             client_assertion=test-assertion-jwt&\
             client_assertion_type=urn%3Aietf%3Aparams%3Aoauth%3Aclient-assertion-type%3Ajwt-bearer&\
             grant_type=client_credentials&scope=agent%3Aself%3Aregister"
        );
        assert!(
            d.logs
                .wait_for_async("register_token_reused", 1, Duration::from_secs(5))
                .await
        );
        // The assertion never appears in the log.
        assert!(!format!("{:?}", d.logs.all()).contains("test-assertion-jwt"));
    }
}

/// The reference cached this failure forever; a later RegisterRequired
/// now asks the token endpoint again (which may have recovered).
#[tokio::test(flavor = "multi_thread")]
async fn token_endpoint_refusal_is_reported_and_asked_again_next_time() {
    let pki = TestPki::new();
    let tokens = TokenServer::new(403, r#"{"error":"invalid_client"}"#);
    let token_addr = tokens.start(&pki, false).await;
    let (d, mut s) = clawkerd_with(
        &pki,
        Some(format!("https://{token_addr}/oauth2/token")),
        Some("127.0.0.1:9".into()),
    )
    .await;
    let first = register_once(&mut s, "r1").await;
    assert_eq!(
        first,
        (
            false,
            r#"hydra token exchange: hydra returned 403 Forbidden: {"error":"invalid_client"}"#
                .to_owned()
        )
    );
    assert_eq!(register_once(&mut s, "r2").await, first);
    assert_eq!(tokens.hits.load(Ordering::SeqCst), 2, "nothing cached");
    assert_eq!(d.logs.count("register_replay_short_circuit"), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_token_responses_have_reference_texts() {
    for (body, want) in [
        (
            r#"{"token_type":"Bearer"}"#,
            "hydra token exchange: hydra returned empty access_token",
        ),
        (
            r#"{"access_token":"x","token_type":"Mac"}"#,
            r#"hydra token exchange: hydra returned unexpected token_type "Mac" (expected Bearer)"#,
        ),
    ] {
        let pki = TestPki::new();
        let tokens = TokenServer::new(200, body);
        let token_addr = tokens.start(&pki, false).await;
        let (_d, mut s) = clawkerd_with(
            &pki,
            Some(format!("https://{token_addr}/oauth2/token")),
            Some("127.0.0.1:9".into()),
        )
        .await;
        assert_eq!(register_once(&mut s, "r").await, (false, want.to_owned()));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn unconsumed_failures_are_retried() {
    let pki = TestPki::new();
    // No env at all.
    let (_d, mut s) = clawkerd_with(&pki, None, None).await;
    assert_eq!(
        register_once(&mut s, "r").await,
        (
            false,
            "CLAWKER_CP_TOKEN_URL unset; cannot exchange assertion".to_owned()
        )
    );
    let (_d, mut s) =
        clawkerd_with(&pki, Some("https://127.0.0.1:9/oauth2/token".into()), None).await;
    assert_eq!(
        register_once(&mut s, "r").await,
        (
            false,
            "CLAWKER_CP_AGENT_ADDR unset; cannot dial AgentService".to_owned()
        )
    );
    // Nothing listening: transport failure, not consumed → retried.
    let closed = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let (d, mut s) = clawkerd_with(
        &pki,
        Some(format!("https://{closed}/oauth2/token")),
        Some("127.0.0.1:9".into()),
    )
    .await;
    let (ok, err) = register_once(&mut s, "r1").await;
    assert!(!ok);
    assert!(
        err.starts_with(&format!(
            "hydra token exchange: post to https://{closed}/oauth2/token: "
        )),
        "{err}"
    );
    let _ = register_once(&mut s, "r2").await;
    assert!(
        d.logs
            .wait_for_async("token_exchange_attempt", 2, Duration::from_secs(5))
            .await
    );
    assert_eq!(d.logs.count("token_exchange_attempt"), 2, "retried");
    assert_eq!(d.logs.count("register_replay_short_circuit"), 0);
}

/// The reference cached this outcome forever after spending the
/// assertion: one failed Register (a Docker timeout on the CP) bricked the
/// agent. Now the token is kept and the next round calls Register again.
#[tokio::test(flavor = "multi_thread")]
async fn register_rpc_failure_keeps_the_token_and_the_next_round_calls_again() {
    let pki = TestPki::new();
    let tokens = TokenServer::new(200, r#"{"access_token":"wrong","token_type":"Bearer"}"#);
    let token_addr = tokens.start(&pki, false).await;
    let agents = Agents::default();
    let agent_addr = start_agent_service(&pki, agents.clone()).await;
    let (_d, mut s) = clawkerd_with(
        &pki,
        Some(format!("https://{token_addr}/oauth2/token")),
        Some(agent_addr.to_string()),
    )
    .await;
    let first = register_once(&mut s, "r1").await;
    assert_eq!(
        first,
        (
            false,
            "AgentService.Register: rpc error: code = PermissionDenied desc = bad token".to_owned()
        )
    );
    assert_eq!(register_once(&mut s, "r2").await, first);
    assert_eq!(tokens.hits.load(Ordering::SeqCst), 1, "the token was kept");
    assert_eq!(agents.calls.lock().unwrap().len(), 2, "and used again");
    // The CP recovers (here: starts accepting the token): the next round
    // succeeds without a new exchange.
    agents.also_accept.lock().unwrap().push("wrong".into());
    assert_eq!(register_once(&mut s, "r3").await, (true, String::new()));
    assert_eq!(tokens.hits.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unavailable_cp_is_retried_with_the_same_token() {
    let pki = TestPki::new();
    let tokens = TokenServer::new(200, GOOD);
    let token_addr = tokens.start(&pki, false).await;
    let agents = Agents::default();
    agents
        .script
        .lock()
        .unwrap()
        .push_back(tonic::Status::unavailable(
            "register: container runtime unavailable",
        ));
    let agent_addr = start_agent_service(&pki, agents.clone()).await;
    let (_d, mut s) = clawkerd_with(
        &pki,
        Some(format!("https://{token_addr}/oauth2/token")),
        Some(agent_addr.to_string()),
    )
    .await;
    assert_eq!(
        register_once(&mut s, "r1").await,
        (
            false,
            "AgentService.Register: rpc error: code = Unavailable desc = register: container runtime unavailable"
                .to_owned()
        )
    );
    assert_eq!(register_once(&mut s, "r2").await, (true, String::new()));
    assert_eq!(tokens.hits.load(Ordering::SeqCst), 1);
    let calls = agents.calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 2);
    assert!(calls.iter().all(|(auth, _, _)| auth == "Bearer tok-1"));
}

/// A CP that no longer knows the token (restarted without it, or it
/// expired, or it was revoked) answers UNAUTHENTICATED: clawkerd drops the
/// token and trades its assertion again within the same round.
#[tokio::test(flavor = "multi_thread")]
async fn a_rejected_token_is_dropped_and_the_assertion_exchanged_again() {
    let pki = TestPki::new();
    let tokens = TokenServer::new(200, GOOD);
    tokens
        .first
        .lock()
        .unwrap()
        .push_back(r#"{"access_token":"tok-0","token_type":"Bearer","expires_in":3600}"#.into());
    let token_addr = tokens.start(&pki, false).await;
    let agents = Agents::default();
    {
        let mut script = agents.script.lock().unwrap();
        script.push_back(tonic::Status::unavailable("cp going down"));
        script.push_back(tonic::Status::unauthenticated("token inactive or invalid"));
    }
    let agent_addr = start_agent_service(&pki, agents.clone()).await;
    let (d, mut s) = clawkerd_with(
        &pki,
        Some(format!("https://{token_addr}/oauth2/token")),
        Some(agent_addr.to_string()),
    )
    .await;
    let (ok, _) = register_once(&mut s, "r1").await;
    assert!(!ok);
    assert_eq!(register_once(&mut s, "r2").await, (true, String::new()));
    assert_eq!(tokens.hits.load(Ordering::SeqCst), 2, "exchanged again");
    let auths: Vec<String> = agents
        .calls
        .lock()
        .unwrap()
        .iter()
        .map(|c| c.0.clone())
        .collect();
    assert_eq!(auths, ["Bearer tok-0", "Bearer tok-0", "Bearer tok-1"]);
    assert!(
        d.logs
            .wait_for_async("register_token_rejected", 1, Duration::from_secs(5))
            .await
    );
}

/// A token the response said expires within the safety margin is never
/// presented: the next round exchanges the assertion again.
#[tokio::test(flavor = "multi_thread")]
async fn a_token_about_to_expire_is_not_presented() {
    let pki = TestPki::new();
    let tokens = TokenServer::new(
        200,
        r#"{"access_token":"tok-1","token_type":"Bearer","expires_in":5}"#,
    );
    let token_addr = tokens.start(&pki, false).await;
    let agents = Agents::default();
    agents
        .script
        .lock()
        .unwrap()
        .push_back(tonic::Status::unavailable("busy"));
    let agent_addr = start_agent_service(&pki, agents.clone()).await;
    let (_d, mut s) = clawkerd_with(
        &pki,
        Some(format!("https://{token_addr}/oauth2/token")),
        Some(agent_addr.to_string()),
    )
    .await;
    let (ok, _) = register_once(&mut s, "r1").await;
    assert!(!ok);
    assert_eq!(register_once(&mut s, "r2").await, (true, String::new()));
    assert_eq!(tokens.hits.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_register_required_runs_one_exchange() {
    let pki = TestPki::new();
    let tokens = TokenServer::new(500, "oops");
    let token_addr = tokens.start(&pki, false).await;
    let (_d, mut s) = clawkerd_with(
        &pki,
        Some(format!("https://{token_addr}/oauth2/token")),
        Some("127.0.0.1:9".into()),
    )
    .await;
    for i in 0..16 {
        s.send(register_required(&format!("c{i}"))).await;
    }
    let mut outcomes = Vec::new();
    for i in 0..16 {
        let r = s
            .next_for(&format!("c{i}"), Duration::from_secs(30))
            .await
            .unwrap();
        let Some(Resp::RegisterDone(d)) = r.payload else {
            panic!()
        };
        outcomes.push((d.ok, d.error));
    }
    assert!(outcomes.windows(2).all(|w| w[0] == w[1]));
    assert_eq!(tokens.hits.load(Ordering::SeqCst), 1);
}
