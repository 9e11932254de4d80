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

/// The token endpoint's canned answer and what it saw.
#[derive(Clone)]
struct TokenServer {
    status: u16,
    body: String,
    hits: Arc<AtomicUsize>,
    forms: Arc<Mutex<Vec<String>>>,
}

impl TokenServer {
    fn new(status: u16, body: &str) -> Self {
        Self {
            status,
            body: body.to_owned(),
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
                                let resp = http::Response::builder()
                                    .status(me.status)
                                    .header("content-type", "application/json")
                                    .body(Full::new(Bytes::from(me.body.clone())))
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

/// The in-test AgentService: accepts `Bearer tok-1` only.
#[derive(Clone, Default)]
struct Agents {
    calls: Arc<Mutex<Vec<(String, String, String)>>>,
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
        if auth != "Bearer tok-1" {
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

#[tokio::test(flavor = "multi_thread")]
async fn register_succeeds_once_and_replays_without_network() {
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
        assert_eq!(tokens.hits.load(Ordering::SeqCst), 1, "single use");
        assert_eq!(agents.calls.lock().unwrap().len(), 1);
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
                .wait_for_async("register_replay_short_circuit", 1, Duration::from_secs(5))
                .await
        );
        assert_eq!(d.logs.count("register_replay_short_circuit"), 1);
        // The assertion never appears in the log.
        assert!(!format!("{:?}", d.logs.all()).contains("test-assertion-jwt"));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn token_endpoint_refusal_is_consumed_and_cached() {
    let pki = TestPki::new();
    let tokens = TokenServer::new(403, r#"{"error":"invalid_client"}"#);
    let token_addr = tokens.start(&pki, false).await;
    let (_d, mut s) = clawkerd_with(
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
    assert_eq!(tokens.hits.load(Ordering::SeqCst), 1);
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

#[tokio::test(flavor = "multi_thread")]
async fn register_rpc_failure_is_consumed_with_the_grpc_error_text() {
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
    assert_eq!(tokens.hits.load(Ordering::SeqCst), 1);
    assert_eq!(agents.calls.lock().unwrap().len(), 1);
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
