//! Register never bricks an agent, end to end on loopback with every real
//! part but Docker: the CP's agent listener (token endpoint + Register)
//! on a fixed port with a real redb file, a real clawkerd and its
//! coordinator, and the CP's session driving RegisterRequired. Faults are
//! injected through the runtime double (`StaticInspector::fail_next`) and
//! the registry's fault hook (`Registry::fail_next_add`), never by sleeping.
//!
//! Each test is one of the ways the reference bricked an agent for good: a
//! Docker timeout during Register, a CP crash between spending the
//! assertion's JTI and committing the row, a container restart that lost
//! clawkerd's token, a token that expires before the retry.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clawker::agent_api::server::{AgentApi, AgentApiConfig, serve_agent_api};
use clawker::events::RecordingSink;
use clawker::pki::{CertifiedKey, SigningKey};
use clawker::registry::{Registry, RegistryError, RegistryStore};
use clawker::runtime::memory::{MemoryOps, StaticInspector};
use clawker::runtime::{ContainerFacts, RuntimeError};
use clawker::session::dial::DialConfig;
use clawker::session::lifecycle::{
    self, ContainerResolver, ResolveError, ResolvedTarget, SessionDeps, SessionPolicy,
};
use common::{AGENT, Clawkerd, PROJECT, TestPki};
use futures::future::BoxFuture;

#[derive(Clone)]
struct At(SocketAddr);

impl ContainerResolver for At {
    fn resolve(&self, _: &str) -> BoxFuture<'_, Result<ResolvedTarget, ResolveError>> {
        let addr = self.0;
        Box::pin(async move {
            Ok(ResolvedTarget {
                agent: AGENT.into(),
                project: PROJECT.into(),
                running: true,
                addr: Some(addr),
            })
        })
    }
}

/// The CP side: agent listener + registry on one file and one port, which
/// can be stopped and started again (a CP restart).
struct Cp {
    pki: TestPki,
    signing: SigningKey,
    server: CertifiedKey,
    db: PathBuf,
    listen: SocketAddr,
    token_ttl: Duration,
    inspector: Arc<StaticInspector>,
    registry: Registry,
    api: Option<(AgentApi, tokio::sync::oneshot::Sender<()>)>,
}

impl Cp {
    async fn start(token_ttl: Duration) -> Self {
        let pki = TestPki::new();
        let signing = SigningKey::generate().unwrap();
        let server = pki.ca.mint_cp_server(&[]).unwrap();
        let db = pki.dir.path().join("cp.redb");
        let listen = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let inspector = Arc::new(StaticInspector::new());
        inspector.insert(
            &pki.container_id,
            ContainerFacts::agent(
                &pki.container_id,
                PROJECT,
                AGENT,
                "127.0.0.1".parse().unwrap(),
            ),
        );
        let registry = Registry::start(RegistryStore::open(&db).unwrap()).unwrap();
        let mut cp = Self {
            pki,
            signing,
            server,
            db,
            listen,
            token_ttl,
            inspector,
            registry,
            api: None,
        };
        cp.serve().await;
        // The CLI's single-use assertion in the bootstrap bundle.
        let jwt = clawker::agent_api::assertion::mint_agent_assertion(&cp.signing, &cp.token_url())
            .unwrap();
        std::fs::write(cp.pki.bootstrap_dir.join("assertion.jwt"), jwt).unwrap();
        cp
    }

    fn token_url(&self) -> String {
        format!("https://{}/oauth2/token", self.listen)
    }

    async fn serve(&mut self) {
        let mut config = AgentApiConfig::new(
            self.listen,
            self.server.cert_pem.clone(),
            self.server.key_pem.clone(),
            self.pki.ca.cert_pem().to_owned(),
            self.signing.jwk(),
        );
        config.token.token_ttl = self.token_ttl;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let api = serve_agent_api(
            config,
            self.registry.clone(),
            self.inspector.clone(),
            async move {
                let _ = rx.await;
            },
        )
        .await
        .unwrap();
        self.api = Some((api, tx));
    }

    /// Stops the listener and closes the redb file, then opens both again:
    /// everything the CP kept in memory is gone.
    async fn restart(&mut self) {
        if let Some((api, stop)) = self.api.take() {
            let _ = stop.send(());
            let _ = tokio::time::timeout(Duration::from_secs(5), api.task).await;
        }
        self.registry.shutdown().await;
        self.registry = Registry::start(RegistryStore::open(&self.db).unwrap()).unwrap();
        self.serve().await;
    }

    fn clawkerd(&self) -> Clawkerd {
        Clawkerd::spawn_with(
            &self.pki,
            common::Opts {
                args: vec!["sleep".into(), "60".into()],
                env: vec![
                    ("CLAWKER_CP_AGENT_ADDR".into(), self.listen.to_string()),
                    ("CLAWKER_CP_TOKEN_URL".into(), self.token_url()),
                ],
                ..Default::default()
            },
        )
    }

    fn policy(&self) -> SessionPolicy {
        let mut policy = SessionPolicy::default();
        policy.init.user = self.pki.agent_user();
        policy.register_retry_backoff = Duration::from_millis(20);
        policy.register_timeout = Duration::from_secs(20);
        policy
    }

    /// A CP session to `clawkerd`, publishing into a fresh recorder.
    fn session(
        &self,
        clawkerd: &Clawkerd,
        policy: SessionPolicy,
    ) -> (tokio::task::JoinHandle<String>, RecordingSink) {
        let sink = RecordingSink::default();
        let deps = SessionDeps {
            resolver: Arc::new(At(clawkerd.addr)),
            registry: Arc::new(self.registry.clone()),
            terminate: Arc::new(MemoryOps::default()),
            dial: DialConfig::new(
                self.pki.ca.cert_pem().as_bytes(),
                self.pki.cp_client.cert_pem.as_bytes(),
                self.pki.cp_client.key_pem.as_bytes(),
            )
            .unwrap(),
            sink: sink.clone(),
            policy,
            certs: None,
        };
        let (tx, _live) = tokio::sync::watch::channel(None);
        let task = tokio::spawn(lifecycle::run(
            self.pki.container_id.clone(),
            deps,
            tx,
            Default::default(),
        ));
        (task, sink)
    }

    fn row(&self) -> bool {
        self.registry
            .lookup_by_container_id(&self.pki.container_id)
            .is_ok()
    }
}

async fn wait_for(sink: &RecordingSink, name: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while sink.of(name).len() < n {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {name}; saw {:?}",
            sink.names()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

const LONG: Duration = Duration::from_secs(3600);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_recovers_from_a_docker_inspect_timeout_on_the_same_session() {
    let cp = Cp::start(LONG).await;
    cp.inspector.fail_next(
        1,
        RuntimeError::Timeout {
            what: "container inspect",
            after: Duration::from_secs(5),
        },
    );
    let clawkerd = cp.clawkerd();
    let (task, sink) = cp.session(&clawkerd, cp.policy());
    wait_for(&sink, "agent.init.completed", 1).await;
    let registered = sink.of("agent.registered");
    assert_eq!(registered.len(), 1, "one verdict, after the retry");
    assert_eq!(registered[0]["ok"], true, "{registered:?}");
    assert!(sink.of("agent.untrusted").is_empty());
    assert!(cp.row());
    // Two Register calls (the first hit the fault), one token.
    assert_eq!(cp.inspector.calls().len(), 2);
    assert_eq!(cp.registry.spent_jti_count().await.unwrap(), 1);
    assert_eq!(clawkerd.logs.count("token_exchange_attempt"), 1);
    assert!(clawkerd.logs.count("register_token_reused") >= 1);
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_recovers_after_a_cp_restart_between_jti_spend_and_row_commit() {
    let mut cp = Cp::start(LONG).await;
    // The CP "dies" after the token endpoint spent the JTI and before the
    // row is committed: the add fails, and this session gives up (one
    // round), leaving the agent register_failed.
    cp.registry
        .fail_next_add(RegistryError::Unavailable("CP crashed".into()));
    let clawkerd = cp.clawkerd();
    let mut policy = cp.policy();
    policy.max_register_attempts = 1;
    let (first, sink) = cp.session(&clawkerd, policy.clone());
    wait_for(&sink, "agent.untrusted", 1).await;
    assert_eq!(sink.of("agent.untrusted")[0]["reason"], "register_failed");
    assert!(
        sink.of("agent.registered")[0]["reason"]
            .as_str()
            .unwrap()
            .contains("code = Unavailable"),
        "{:?}",
        sink.of("agent.registered")
    );
    assert!(!cp.row());
    first.abort();

    cp.restart().await;
    // The next session (the restarted CP's boot dial) registers the agent
    // with the token clawkerd kept: it survived the CP restart in redb.
    let (second, sink) = cp.session(&clawkerd, policy);
    wait_for(&sink, "agent.init.completed", 1).await;
    assert_eq!(sink.of("agent.registered")[0]["ok"], true);
    assert!(cp.row());
    assert_eq!(
        clawkerd.logs.count("token_exchange_attempt"),
        1,
        "no second exchange: the persisted token was accepted"
    );
    assert!(clawkerd.logs.count("register_token_rejected") == 0);
    second.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_restart_after_a_failed_register_trades_the_spent_assertion_again() {
    let cp = Cp::start(LONG).await;
    cp.registry
        .fail_next_add(RegistryError::Unavailable("disk full".into()));
    let mut policy = cp.policy();
    policy.max_register_attempts = 1;
    let clawkerd = cp.clawkerd();
    let (first, sink) = cp.session(&clawkerd, policy.clone());
    wait_for(&sink, "agent.untrusted", 1).await;
    first.abort();
    // `docker restart`: a new clawkerd process, with the same (spent)
    // assertion and no token in memory.
    drop(clawkerd);
    let clawkerd = cp.clawkerd();
    let (second, sink) = cp.session(&clawkerd, policy);
    wait_for(&sink, "agent.init.completed", 1).await;
    assert_eq!(sink.of("agent.registered")[0]["ok"], true);
    assert_eq!(clawkerd.logs.count("token_exchange_attempt"), 1);
    assert_eq!(
        cp.registry.spent_jti_count().await.unwrap(),
        1,
        "one assertion"
    );
    second.abort();

    // Replay protection holds: registration redeemed the assertion.
    let assertion = std::fs::read_to_string(cp.pki.bootstrap_dir.join("assertion.jwt")).unwrap();
    let form = serde_urlencoded::to_string([
        ("grant_type", "client_credentials"),
        (
            "client_assertion_type",
            clawker::agent_api::assertion::JWT_BEARER_TYPE,
        ),
        ("client_assertion", assertion.trim()),
    ])
    .unwrap();
    let (status, body) = common::https_post(
        cp.listen,
        cp.pki.ca.cert_pem(),
        "/oauth2/token",
        "application/x-www-form-urlencoded",
        form.as_bytes(),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_grant"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_expiring_before_the_retry_is_replaced_by_a_re_exchange() {
    // Tokens that live 10 s: inside clawkerd's 30 s expiry margin from the
    // start, so its retry never presents the one it holds (which would
    // expire mid-call in the field) and trades the assertion again. Not
    // 1 s: the CP counts whole seconds, so a 1 s token can already be
    // refused on its first use, which is not the case this test is about.
    let cp = Cp::start(Duration::from_secs(10)).await;
    cp.inspector.fail_next(
        1,
        RuntimeError::Api("Cannot connect to the Docker daemon".into()),
    );
    let clawkerd = cp.clawkerd();
    let (task, sink) = cp.session(&clawkerd, cp.policy());
    wait_for(&sink, "agent.init.completed", 1).await;
    assert_eq!(sink.of("agent.registered")[0]["ok"], true);
    assert_eq!(
        clawkerd.logs.count("token_exchange_attempt"),
        2,
        "the expiring token was not presented; the CP re-issued for the unredeemed assertion"
    );
    assert_eq!(cp.registry.spent_jti_count().await.unwrap(), 1);
    task.abort();
}
