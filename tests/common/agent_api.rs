//! A real agent listener (AgentService + `POST /oauth2/token`) on loopback
//! with a real redb file ([`Harness`]), plus clients that talk to it the way
//! clawkerd and the CLI do (mTLS gRPC, HTTPS form posts), and helpers to
//! craft hostile certificates and assertions.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use clawker::agent_api::assertion;
use clawker::agent_api::server::{AgentApi, AgentApiConfig, serve_agent_api};
use clawker::identity::{AgentName, ProjectSlug};
use clawker::pki::{Ca, CertifiedKey, SigningKey};
use clawker::proto::agent::v1::RegisterRequest;
use clawker::proto::agent::v1::agent_service_client::AgentServiceClient;
use clawker::registry::{Registry, RegistryStore};
use clawker::runtime::ContainerFacts;
use clawker::runtime::memory::StaticInspector;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

pub const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
/// The audience the harness's assertions name (accepted by default config).
pub const AUDIENCE: &str = "https://clawker-controlplane:7444/oauth2/token";

pub struct Harness {
    pub dir: tempfile::TempDir,
    pub db_path: PathBuf,
    pub ca: Ca,
    pub signing: SigningKey,
    pub server: CertifiedKey,
    pub registry: Registry,
    pub inspector: Arc<StaticInspector>,
    pub api: AgentApi,
    pub addr: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    tweak: Arc<dyn Fn(&mut AgentApiConfig) + Send + Sync>,
}

impl Harness {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl Fn(&mut AgentApiConfig) + Send + Sync + 'static) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let db_path = dir.path().join("cp.redb");
        let ca = Ca::generate().unwrap();
        let signing = SigningKey::generate().unwrap();
        let server = ca.mint_cp_server(&[]).unwrap();
        let registry = Registry::start(RegistryStore::open(&db_path).unwrap()).unwrap();
        let inspector = Arc::new(StaticInspector::new());
        let tweak: Arc<dyn Fn(&mut AgentApiConfig) + Send + Sync> = Arc::new(tweak);
        let (api, shutdown) = serve(
            &ca,
            &signing,
            &server,
            registry.clone(),
            inspector.clone(),
            &*tweak,
        )
        .await;
        Self {
            addr: api.local_addr,
            dir,
            db_path,
            ca,
            signing,
            server,
            registry,
            inspector,
            api,
            shutdown: Some(shutdown),
            tweak,
        }
    }

    /// Stops the listener and the registry actor (closing the redb file),
    /// then starts both again on the same file: a CP restart.
    pub async fn restart(&mut self) {
        self.stop().await;
        self.registry = Registry::start(RegistryStore::open(&self.db_path).unwrap()).unwrap();
        let (api, shutdown) = serve(
            &self.ca,
            &self.signing,
            &self.server,
            self.registry.clone(),
            self.inspector.clone(),
            &*self.tweak,
        )
        .await;
        self.addr = api.local_addr;
        self.api = api;
        self.shutdown = Some(shutdown);
    }

    pub async fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let task = std::mem::replace(&mut self.api.task, tokio::spawn(async { Ok(()) }));
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), task).await;
        self.registry.shutdown().await;
    }

    /// Mints an agent leaf and tells the inspector about its container
    /// (labels matching, clawker-net IP = loopback).
    pub fn agent(&self, project: &str, agent: &str, container_id: &str) -> CertifiedKey {
        let leaf = self
            .ca
            .mint_agent(
                &ProjectSlug::new(project).unwrap(),
                &AgentName::new(agent).unwrap(),
                container_id,
            )
            .unwrap();
        self.inspector.insert(
            container_id,
            ContainerFacts::agent(container_id, project, agent, LOOPBACK),
        );
        leaf
    }

    pub async fn channel(
        &self,
        leaf: Option<&CertifiedKey>,
    ) -> Result<Channel, tonic::transport::Error> {
        channel_to(self.addr, self.ca.cert_pem(), leaf).await
    }

    /// `Register` as clawkerd calls it.
    pub async fn register(
        &self,
        leaf: Option<&CertifiedKey>,
        token: Option<&str>,
        project: &str,
        agent: &str,
    ) -> Result<(), tonic::Status> {
        let channel = self
            .channel(leaf)
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        let mut req = tonic::Request::new(RegisterRequest {
            agent_name: agent.into(),
            project: project.into(),
        });
        if let Some(t) = token {
            req.metadata_mut()
                .insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        AgentServiceClient::new(channel)
            .register(req)
            .await
            .map(|_| ())
    }

    /// A fresh agent assertion signed with the CLI key.
    pub fn agent_assertion(&self) -> String {
        assertion::mint_agent_assertion(&self.signing, AUDIENCE).unwrap()
    }

    /// A signed assertion with arbitrary claims.
    pub fn assertion_with(&self, claims: serde_json::Value) -> String {
        assertion::encode_signed(
            self.signing.key_pair(),
            &serde_json::json!({"alg": "ES256", "typ": "JWT"}),
            &claims,
        )
        .unwrap()
    }

    /// POSTs a form to `/oauth2/token` over HTTPS (no client cert, like
    /// clawkerd). Returns (status, JSON body).
    pub async fn post_token(&self, content_type: &str, body: &[u8]) -> (u16, serde_json::Value) {
        https_post(
            self.addr,
            self.ca.cert_pem(),
            "/oauth2/token",
            content_type,
            body,
        )
        .await
    }

    /// The standard token request for `assertion` and `scope`.
    pub async fn exchange(&self, assertion: &str, scope: Option<&str>) -> (u16, serde_json::Value) {
        let mut form = vec![
            ("grant_type", "client_credentials"),
            ("client_assertion_type", assertion::JWT_BEARER_TYPE),
            ("client_assertion", assertion),
        ];
        if let Some(s) = scope {
            form.push(("scope", s));
        }
        let body = serde_urlencoded::to_string(&form).unwrap();
        self.post_token("application/x-www-form-urlencoded", body.as_bytes())
            .await
    }

    /// A valid agent bearer token.
    pub async fn agent_token(&self) -> String {
        let (status, body) = self
            .exchange(&self.agent_assertion(), Some("agent:self:register"))
            .await;
        assert_eq!(status, 200, "{body}");
        body["access_token"].as_str().unwrap().to_owned()
    }
}

async fn serve(
    ca: &Ca,
    signing: &SigningKey,
    server: &CertifiedKey,
    registry: Registry,
    inspector: Arc<StaticInspector>,
    tweak: &(dyn Fn(&mut AgentApiConfig) + Send + Sync),
) -> (AgentApi, tokio::sync::oneshot::Sender<()>) {
    let mut config = AgentApiConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        server.cert_pem.clone(),
        server.key_pem.clone(),
        ca.cert_pem().to_owned(),
        signing.jwk(),
    );
    // Every harness client is 127.0.0.1, one "source": tests that are not
    // about the per-source cap get the global one (they tweak it back).
    config.limits.max_connections_per_source = config.limits.max_connections;
    tweak(&mut config);
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let api = serve_agent_api(config, registry, inspector, async move {
        let _ = rx.await;
    })
    .await
    .unwrap();
    (api, tx)
}

pub async fn channel_to(
    addr: SocketAddr,
    ca_pem: &str,
    leaf: Option<&CertifiedKey>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name("clawker-controlplane");
    if let Some(leaf) = leaf {
        tls = tls.identity(Identity::from_pem(&leaf.cert_pem, &leaf.key_pem));
    }
    Endpoint::from_shared(format!("https://{addr}"))?
        .tls_config(tls)?
        .connect()
        .await
}

fn client_tls(ca_pem: &str) -> tokio_rustls::TlsConnector {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

/// A minimal HTTP/1.1 client, so tests can send exactly the bytes they want
/// (wrong content types, garbage, oversized bodies).
pub async fn https_post(
    addr: SocketAddr,
    ca_pem: &str,
    path: &str,
    content_type: &str,
    body: &[u8],
) -> (u16, serde_json::Value) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("clawker-controlplane").unwrap();
    let mut tls = client_tls(ca_pem).connect(name, tcp).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: clawker-controlplane\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    tls.write_all(head.as_bytes()).await.unwrap();
    // The server may answer (and close) before reading an oversized body.
    let _ = tls.write_all(body).await;
    let _ = tls.flush().await;
    let mut raw = Vec::new();
    let _ = tls.read_to_end(&mut raw).await;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status: u16 = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {text:?}"));
    let (headers, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    if status != 405 {
        assert!(
            headers
                .to_ascii_lowercase()
                .contains("content-type: application/json"),
            "{headers}"
        );
    }
    let json = serde_json::from_str(body).unwrap_or(serde_json::Value::Null);
    (status, json)
}
