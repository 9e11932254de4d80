//! A fresh container's whole identity path on loopback, all real parts
//! except Docker: the CP session sees a Miss, sends RegisterRequired; the
//! real clawkerd coordinator exchanges its single-use assertion at the CP's
//! token endpoint and calls AgentService.Register over mTLS; the CP's
//! Register handler writes the row through the registry actor; the session
//! re-looks it up, publishes AgentRegistered{ok} and runs init. A second
//! session (CP restart) then Matches without Register.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clawker::agent_api::server::{AgentApiConfig, serve_agent_api};
use clawker::events::RecordingSink;
use clawker::pki::SigningKey;
use clawker::registry::{Registry, RegistryStore};
use clawker::runtime::ContainerFacts;
use clawker::runtime::memory::StaticInspector;
use clawker::session::dial::DialConfig;
use clawker::session::lifecycle::{
    self, ContainerResolver, ResolveError, ResolvedTarget, SessionDeps, SessionPolicy,
};
use common::{AGENT, Clawkerd, PROJECT, TestPki};
use futures::future::BoxFuture;

#[derive(Clone)]
struct OneContainer(SocketAddr);

impl ContainerResolver for OneContainer {
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

#[test]
fn fresh_container_registers_through_the_real_coordinator_then_matches_after_restart() {
    let pki = TestPki::new();
    let signing = SigningKey::generate().unwrap();
    let db = pki.dir.path().join("cp.redb");

    actix::System::new().block_on(async {
        let registry = Registry::start(RegistryStore::open(&db).unwrap()).unwrap();
        // The CP's agent listener on loopback, with the CP server cert.
        let server = pki.ca.mint_cp_server(&[]).unwrap();
        // A fixed port, so the token endpoint's accepted audience names it.
        let free = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let config = AgentApiConfig::new(
            free,
            server.cert_pem.clone(),
            server.key_pem.clone(),
            pki.ca.cert_pem().to_owned(),
            signing.jwk(),
        );
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
        let api = serve_agent_api(config, registry.clone(), inspector, std::future::pending())
            .await
            .unwrap();
        let port = api.local_addr.port();

        // The CLI's single-use assertion in the bootstrap bundle.
        let audience = format!("https://127.0.0.1:{port}/oauth2/token");
        let jwt = clawker::agent_api::assertion::mint_agent_assertion(&signing, &audience).unwrap();
        std::fs::write(pki.bootstrap_dir.join("assertion.jwt"), &jwt).unwrap();
        let clawkerd = Clawkerd::spawn_with(
            &pki,
            common::Opts {
                args: vec!["sleep".into(), "60".into()],
                env: vec![
                    ("CLAWKER_CP_AGENT_ADDR".into(), api.local_addr.to_string()),
                    ("CLAWKER_CP_TOKEN_URL".into(), audience.clone()),
                ],
                ..Default::default()
            },
        );

        let sink = RecordingSink::default();
        let mut policy = SessionPolicy::default();
        policy.init.user = pki.agent_user();
        let deps = SessionDeps {
            resolver: Arc::new(OneContainer(clawkerd.addr)),
            registry: Arc::new(registry.clone()),
            terminate: Arc::new(clawker::runtime::memory::MemoryOps::default()),
            dial: DialConfig::new(
                pki.ca.cert_pem().as_bytes(),
                pki.cp_client.cert_pem.as_bytes(),
                pki.cp_client.key_pem.as_bytes(),
            )
            .unwrap(),
            sink: sink.clone(),
            policy,
            certs: None,
        };
        let (tx, _live) = tokio::sync::watch::channel(None);
        let first = tokio::spawn(lifecycle::run(
            pki.container_id.clone(),
            deps.clone(),
            tx,
            Default::default(),
        ));
        wait_for(&sink, "agent.registered", 1).await;
        assert_eq!(
            sink.of("agent.registered")[0]["ok"],
            true,
            "{:?} {:#?}",
            sink.of("agent.registered"),
            clawkerd.logs.all()
        );
        wait_for(&sink, "agent.init.completed", 1).await;
        let names = sink.names();
        assert_eq!(
            &names[..6],
            &[
                "agent.session.connecting",
                "agent.session.connected",
                "agent.registered",
                "agent.trusted",
                "agent.plan.decided",
                "agent.init.started"
            ],
            "reference order: Connected → AgentRegistered{{ok}} → Init…"
        );
        assert_eq!(
            sink.of("agent.registered")[0]["ok"],
            true,
            "{:?}",
            sink.of("agent.registered")
        );
        let row = registry.lookup_by_container_id(&pki.container_id).unwrap();
        assert_eq!(row.thumbprint, pki.agent.thumbprint());
        assert_eq!(row.canonical_cn, "clawker.web.dev");

        // "CP restart": a new session on the same clawkerd Matches; no
        // Register, and no step runs again (the command is running).
        first.abort();
        let sink2 = RecordingSink::default();
        let deps2 = SessionDeps {
            sink: sink2.clone(),
            ..deps
        };
        let (tx, _live) = tokio::sync::watch::channel(None);
        let second = tokio::spawn(lifecycle::run(
            pki.container_id.clone(),
            deps2,
            tx,
            Default::default(),
        ));
        wait_for(&sink2, "agent.plan.decided", 1).await;
        assert!(sink2.of("agent.registered").is_empty());
        assert_eq!(sink2.of("agent.trusted").len(), 1);
        assert_eq!(sink2.of("agent.plan.decided")[0]["skipped"], "cmd_running");
        assert!(sink2.of("agent.init.started").is_empty());
        second.abort();
        // One assertion, one spent JTI, and the Register redeemed its grant.
        let spent = registry.spent_jti_count().await.unwrap();
        assert_eq!(spent, 1);
        drop(clawkerd);
    });
}
