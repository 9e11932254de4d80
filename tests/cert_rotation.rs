//! Leaf rotation and expired leaves (DESIGN §13) against real clawkerd
//! processes on loopback: real mTLS, real Session streams, a real redb
//! registry, the CP's session lifecycle with a real CA; only the Docker
//! inspect is a static resolver. Leaves live seconds here.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clawker::events::RecordingSink;
use clawker::identity::{AgentName, ProjectSlug, Thumbprint};
use clawker::pki::{self, Ca, CertifiedKey, LeafSpec};
use clawker::registry::RegistryStore;
use clawker::registry::store::NewEntry;
use clawker::session::classify::{self, Classification};
use clawker::session::dial::DialConfig;
use clawker::session::lifecycle::{
    self, ContainerResolver, LiveSession, ResolveError, ResolvedTarget, SessionDeps, SessionPolicy,
};
use clawker::session::rotation::{CertRotation, RotationConfig};
use common::{AGENT, Clawkerd, PROJECT, TestPki};
use futures::future::BoxFuture;
use rcgen::ExtendedKeyUsagePurpose as Eku;
use tokio::sync::watch;

#[derive(Clone, Default)]
struct StaticResolver(Arc<Mutex<HashMap<String, Result<ResolvedTarget, ResolveError>>>>);

impl StaticResolver {
    fn set(&self, id: &str, t: Result<ResolvedTarget, ResolveError>) {
        self.0.lock().unwrap().insert(id.to_owned(), t);
    }
}

impl ContainerResolver for StaticResolver {
    fn resolve(&self, id: &str) -> BoxFuture<'_, Result<ResolvedTarget, ResolveError>> {
        let r = self
            .0
            .lock()
            .unwrap()
            .get(id)
            .cloned()
            .unwrap_or(Err(ResolveError::NotFound));
        Box::pin(async move { r })
    }
}

fn running(addr: SocketAddr) -> Result<ResolvedTarget, ResolveError> {
    Ok(ResolvedTarget {
        agent: AGENT.into(),
        project: PROJECT.into(),
        running: true,
        addr: Some(addr),
    })
}

fn ident() -> (ProjectSlug, AgentName) {
    (
        ProjectSlug::new(PROJECT).unwrap(),
        AgentName::new(AGENT).unwrap(),
    )
}

/// An agent leaf (canonical CN, container SAN, both EKUs) valid over
/// `[now + from, now + to]` seconds.
fn leaf_between(ca: &Ca, container_id: &str, from: i64, to: i64) -> CertifiedKey {
    let now = time::OffsetDateTime::now_utc();
    let mut spec = LeafSpec::new("clawker.web.dev", time::Duration::hours(1));
    spec.not_before = now + time::Duration::seconds(from);
    spec.not_after = now + time::Duration::seconds(to);
    spec.uri_sans = vec![format!("urn:clawker:container:{container_id}")];
    spec.key_usages = vec![
        rcgen::KeyUsagePurpose::DigitalSignature,
        rcgen::KeyUsagePurpose::KeyEncipherment,
    ];
    spec.ekus = vec![Eku::ClientAuth, Eku::ServerAuth];
    ca.issue(&spec).unwrap()
}

struct Harness {
    pki: TestPki,
    /// The CA the CP signs with (the bootstrap's, unless a test swaps it).
    ca: Arc<Ca>,
    resolver: StaticResolver,
    registry: RegistryStore,
    sink: RecordingSink,
    policy: SessionPolicy,
    rotation: RotationConfig,
}

impl Harness {
    fn new() -> Self {
        let pki = TestPki::new();
        let registry = RegistryStore::open(&pki.dir.path().join("cp.redb")).unwrap();
        let mut policy = SessionPolicy::default();
        policy.init.user = pki.agent_user();
        policy.register_timeout = Duration::from_secs(3);
        policy.max_register_attempts = 0;
        let ca = Arc::new(pki.ca.try_clone().unwrap());
        Self {
            ca,
            pki,
            resolver: StaticResolver::default(),
            registry,
            sink: RecordingSink::default(),
            policy,
            rotation: RotationConfig {
                agent_cert_ttl: Duration::from_secs(3600),
                answer_timeout: Duration::from_secs(10),
                ..RotationConfig::default()
            },
        }
    }

    /// Replaces the bootstrap leaf with `leaf` (cert.pem + key.pem).
    fn bootstrap_with(&self, leaf: &CertifiedKey) {
        std::fs::write(self.pki.bootstrap_dir.join("cert.pem"), &leaf.cert_pem).unwrap();
        std::fs::write(self.pki.bootstrap_dir.join("key.pem"), &leaf.key_pem).unwrap();
    }

    fn register_row(&self, thumbprint: Thumbprint) {
        self.registry
            .add(NewEntry {
                agent_name: AGENT.into(),
                project: PROJECT.into(),
                container_id: self.pki.container_id.clone(),
                thumbprint,
                registered_at_unix: 1_700_000_000,
                last_seen_unix: 0,
            })
            .unwrap();
    }

    fn dial(&self, client: &CertifiedKey) -> DialConfig {
        DialConfig::new(
            self.pki.ca.cert_pem().as_bytes(),
            client.cert_pem.as_bytes(),
            client.key_pem.as_bytes(),
        )
        .unwrap()
    }

    fn deps(&self, sink: &RecordingSink, client: &CertifiedKey) -> SessionDeps<RecordingSink> {
        SessionDeps {
            resolver: Arc::new(self.resolver.clone()),
            registry: Arc::new(self.registry.clone()),
            terminate: Arc::new(clawker::runtime::memory::MemoryOps::default()),
            dial: self.dial(client),
            sink: sink.clone(),
            policy: self.policy.clone(),
            certs: Some(Arc::new(CertRotation {
                ca: self.ca.clone(),
                rows: Arc::new(self.registry.clone()),
                config: self.rotation,
            })),
        }
    }

    fn start(
        &self,
    ) -> (
        tokio::task::JoinHandle<String>,
        watch::Receiver<Option<LiveSession>>,
    ) {
        self.start_with(&self.sink, &self.pki.cp_client)
    }

    fn start_with(
        &self,
        sink: &RecordingSink,
        client: &CertifiedKey,
    ) -> (
        tokio::task::JoinHandle<String>,
        watch::Receiver<Option<LiveSession>>,
    ) {
        let (tx, rx) = watch::channel(None);
        let task = tokio::spawn(lifecycle::run(
            self.pki.container_id.clone(),
            self.deps(sink, client),
            tx,
            Default::default(),
        ));
        (task, rx)
    }

    fn classify(&self, thumbprint: &Thumbprint) -> Classification {
        classify::classify(
            &self.registry,
            &self.pki.container_id,
            "clawker.web.dev",
            thumbprint,
        )
    }

    fn state_dir(&self) -> std::path::PathBuf {
        self.pki.state_dir()
    }
}

async fn wait_for(sink: &RecordingSink, name: &str, n: usize, secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while sink.of(name).len() < n {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {n}x {name}; saw {:?}",
            sink.names()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn hex_of(v: &serde_json::Value) -> Thumbprint {
    Thumbprint::from_hex(v.as_str().unwrap()).unwrap()
}

/// The leaf clawkerd serves to a new TLS handshake (no Session stream is
/// opened, so the probe never becomes the session clawkerd renews on).
async fn served_thumbprint(h: &Harness, addr: SocketAddr) -> Thumbprint {
    let roots = Arc::new(clawker::tls::root_store("ca", h.pki.ca.cert_pem().as_bytes()).unwrap());
    let verifier = clawker::tls::PermissiveServerVerifier::new(roots);
    let cfg = clawker::tls::cp_dial_config(
        h.pki.cp_client.cert_pem.as_bytes(),
        h.pki.cp_client.key_pem.as_bytes(),
        verifier.clone(),
    )
    .unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("clawker-controlplane").unwrap();
    let _tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .unwrap();
    verifier.peer().unwrap().thumbprint
}

fn agent(pki: &TestPki, listen: Option<String>) -> Clawkerd {
    let mut opts = common::Opts {
        args: vec!["sleep".into(), "120".into()],
        ..Default::default()
    };
    if let Some(l) = listen {
        opts.env.push(("CLAWKER_LISTEN_ADDR".into(), l));
    }
    Clawkerd::spawn_with(pki, opts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_life_rotation_keeps_the_session_and_retires_the_old_thumbprint() {
    let mut h = Harness::new();
    // 4-second leaves, from `agent run` and from every rotation.
    h.rotation.agent_cert_ttl = Duration::from_secs(4);
    let (p, a) = ident();
    let first =
        h.ca.mint_agent_with_ttl(&p, &a, &h.pki.container_id, time::Duration::seconds(4))
            .unwrap();
    h.bootstrap_with(&first);
    h.register_row(first.thumbprint());
    let clawkerd = agent(&h.pki, None);
    h.resolver.set(&h.pki.container_id, running(clawkerd.addr));
    let (task, live) = h.start();
    wait_for(&h.sink, "agent.cert.rotated", 2, 30).await;

    let rotated = h.sink.of("agent.cert.rotated");
    assert_eq!(rotated[0]["old"], first.thumbprint().to_hex());
    assert_eq!(rotated[0]["new"], rotated[1]["old"], "a chain of rotations");
    for (i, r) in rotated.iter().take(2).enumerate() {
        assert_eq!(r["reason"], "half_life", "{r}");
        assert_eq!(r["rotations"], i as u64 + 1);
        assert!(r["duration_ms"].as_f64().unwrap() > 0.0);
    }
    // One session throughout: never broken, never re-dialed.
    assert_eq!(h.sink.of("agent.session.connected").len(), 1);
    assert!(h.sink.of("agent.session.broken").is_empty());
    assert!(h.sink.of("agent.session.failed").is_empty());
    assert!(
        live.borrow()
            .as_ref()
            .is_some_and(|l| l.trusted && !l.mux.is_closed())
    );
    assert_eq!(clawkerd.logs.count("session_started"), 1);
    assert_eq!(
        clawkerd.logs.count("agent_ready_spawned"),
        1,
        "user command untouched"
    );

    // The first leaf is retired: it no longer matches its row.
    assert_eq!(
        h.classify(&first.thumbprint()),
        Classification::ThumbprintMismatch
    );
    let retired =
        clawker::registry::leaf::retired(h.registry.database(), &first.thumbprint()).unwrap();
    assert_eq!(
        retired.unwrap().replaced_by,
        hex_of(&rotated[0]["new"]),
        "kept in the history"
    );
    let row = h
        .registry
        .lookup_by_container_id(&h.pki.container_id)
        .unwrap();
    assert!(matches!(
        h.classify(&row.thumbprint),
        Classification::Match(_)
    ));
    // clawkerd serves a rotated leaf to new handshakes and persisted it.
    let served = served_thumbprint(&h, clawkerd.addr).await;
    let known: Vec<Thumbprint> = h
        .sink
        .of("agent.cert.rotated")
        .iter()
        .map(|r| hex_of(&r["new"]))
        .collect();
    assert!(
        known.contains(&served) || served != first.thumbprint(),
        "{served}"
    );
    let file = h.state_dir().join("leaf.pem");
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&file), 0o600);
    assert_eq!(mode(&h.state_dir()), 0o700);
    let persisted = clawker::tls::load_certs("leaf", &std::fs::read(&file).unwrap()).unwrap();
    assert_ne!(Thumbprint::of_der(&persisted[0]), first.thumbprint());
    assert!(clawkerd.logs.count("leaf_rotated") >= 2);
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_after_rotation_matches_with_the_new_thumbprint() {
    let h = Harness::new();
    // A 4 s bootstrap leaf renews once into a 1 h leaf, then stays.
    let (p, a) = ident();
    let first =
        h.ca.mint_agent_with_ttl(&p, &a, &h.pki.container_id, time::Duration::seconds(4))
            .unwrap();
    h.bootstrap_with(&first);
    h.register_row(first.thumbprint());
    let clawkerd = agent(&h.pki, None);
    h.resolver.set(&h.pki.container_id, running(clawkerd.addr));
    let (task, _live) = h.start();
    wait_for(&h.sink, "agent.cert.rotated", 1, 30).await;
    wait_for(&h.sink, "agent.init.completed", 1, 30).await;
    let new = hex_of(&h.sink.of("agent.cert.rotated")[0]["new"]);

    // The container restarts: a new clawkerd process, same state dir and
    // address. It boots with the persisted rotated leaf and Matches.
    let port = clawkerd.addr.port();
    drop(clawkerd);
    let again = agent(&h.pki, Some(format!("127.0.0.1:{port}")));
    assert!(
        again
            .logs
            .wait_for("leaf_loaded", Duration::from_secs(5))
            .unwrap()["source"]
            .as_str()
            .unwrap()
            .contains("Persisted")
    );
    wait_for(&h.sink, "agent.trusted", 2, 30).await;
    let connected = h.sink.of("agent.session.connected");
    assert_eq!(connected.len(), 2);
    assert_eq!(hex_of(&connected[1]["peer_thumbprint"]), new);
    assert_eq!(connected[1]["chain_verified"], true);
    assert!(h.sink.of("agent.untrusted").is_empty());
    assert!(h.sink.of("agent.registered").is_empty(), "no Register");
    assert_eq!(h.sink.of("agent.trusted")[1]["rotations"], 1);
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_leaf_that_matches_its_row_is_trusted_and_rotated_at_once() {
    let h = Harness::new();
    let expired = leaf_between(&h.ca, &h.pki.container_id, -7200, -3600);
    h.bootstrap_with(&expired);
    h.register_row(expired.thumbprint());
    let clawkerd = agent(&h.pki, None);
    h.resolver.set(&h.pki.container_id, running(clawkerd.addr));
    let (task, _live) = h.start();
    wait_for(&h.sink, "agent.cert.rotated", 1, 30).await;
    wait_for(&h.sink, "agent.init.completed", 1, 30).await;
    let connected = &h.sink.of("agent.session.connected")[0];
    assert_eq!(connected["chain_verified"], false);
    assert!(
        h.sink.of("agent.untrusted").is_empty(),
        "{:?}",
        h.sink.names()
    );
    assert_eq!(h.sink.of("agent.trusted").len(), 1);
    let r = &h.sink.of("agent.cert.rotated")[0];
    assert_eq!(r["reason"], "expired");
    assert_eq!(r["old"], expired.thumbprint().to_hex());
    let row = h
        .registry
        .lookup_by_container_id(&h.pki.container_id)
        .unwrap();
    assert_eq!(row.thumbprint, hex_of(&r["new"]));
    assert_eq!(
        h.classify(&expired.thumbprint()),
        Classification::ThumbprintMismatch
    );
    // The new leaf is valid for the configured lifetime.
    let not_after = time::OffsetDateTime::parse(
        r["not_after"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    let left = not_after - time::OffsetDateTime::now_utc();
    assert!(left > time::Duration::minutes(55) && left <= time::Duration::hours(1));
    assert_eq!(served_thumbprint(&h, clawkerd.addr).await, row.thumbprint);
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_that_never_rotated_has_its_bootstrap_leaf_retired_on_its_next_session() {
    // The CP died between Register and the retiring rotation: the row still
    // names the bootstrap leaf. With retire_bootstrap_leaf the next trusted
    // session rotates it away at once; a second session does not again.
    let mut h = Harness::new();
    h.rotation.retire_bootstrap_leaf = true;
    let (p, a) = ident();
    let bootstrap = h.ca.mint_agent(&p, &a, &h.pki.container_id).unwrap();
    h.bootstrap_with(&bootstrap);
    h.register_row(bootstrap.thumbprint());
    let clawkerd = agent(&h.pki, None);
    h.resolver.set(&h.pki.container_id, running(clawkerd.addr));
    let (task, _live) = h.start();
    wait_for(&h.sink, "agent.cert.rotated", 1, 30).await;
    let r = &h.sink.of("agent.cert.rotated")[0];
    assert_eq!(r["reason"], "registered");
    assert_eq!(r["old"], bootstrap.thumbprint().to_hex());
    assert_eq!(
        h.classify(&bootstrap.thumbprint()),
        Classification::ThumbprintMismatch
    );
    task.abort();
    let _ = task.await;

    let sink = RecordingSink::default();
    let (again, _live) = h.start_with(&sink, &h.pki.cp_client);
    wait_for(&sink, "agent.init.completed", 1, 30).await;
    assert!(
        sink.of("agent.cert.rotated").is_empty(),
        "{:?}",
        sink.names()
    );
    assert!(sink.of("agent.untrusted").is_empty(), "{:?}", sink.names());
    again.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaf_expired_past_the_staleness_bound_is_cert_expired() {
    let mut h = Harness::new();
    h.rotation.stale_after = Duration::from_secs(3600);
    let stale = leaf_between(&h.ca, &h.pki.container_id, -3 * 3600, -2 * 3600);
    h.bootstrap_with(&stale);
    h.register_row(stale.thumbprint());
    let clawkerd = agent(&h.pki, None);
    h.resolver.set(&h.pki.container_id, running(clawkerd.addr));
    let (task, live) = h.start();
    wait_for(&h.sink, "agent.untrusted", 1, 30).await;
    let u = &h.sink.of("agent.untrusted")[0];
    assert_eq!(u["reason"], "cert_expired");
    assert!(
        u["detail"].as_str().unwrap().contains("staleness bound"),
        "{u}"
    );
    // clawkerd asks to renew on its own (its leaf is past half-life); the
    // CP refuses an untrusted session.
    wait_for(&h.sink, "agent.cert.rotation_failed", 1, 30).await;
    assert!(
        h.sink.of("agent.cert.rotation_failed")[0]["detail"]
            .as_str()
            .unwrap()
            .contains("not trusted")
    );
    assert!(h.sink.of("agent.cert.rotated").is_empty());
    assert!(h.sink.of("agent.init.started").is_empty(), "init withheld");
    assert!(
        live.borrow()
            .as_ref()
            .is_some_and(|l| !l.trusted && !l.mux.is_closed())
    );
    assert_eq!(
        h.registry
            .lookup_by_container_id(&h.pki.container_id)
            .unwrap()
            .thumbprint,
        stale.thumbprint()
    );
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_leaf_from_another_ca_or_with_another_thumbprint_stays_untrusted() {
    // Another CA: cert_invalid, as before rotation existed.
    let h = Harness::new();
    let foreign = Ca::generate().unwrap();
    let leaf = leaf_between(&foreign, &h.pki.container_id, -7200, -3600);
    h.bootstrap_with(&leaf);
    h.register_row(leaf.thumbprint());
    let clawkerd = agent(&h.pki, None);
    h.resolver.set(&h.pki.container_id, running(clawkerd.addr));
    let (task, _live) = h.start();
    wait_for(&h.sink, "agent.untrusted", 1, 30).await;
    let u = &h.sink.of("agent.untrusted")[0];
    assert_eq!(u["reason"], "cert_invalid");
    assert!(
        u["detail"].as_str().unwrap().starts_with("chain verify:"),
        "{u}"
    );
    task.abort();
    drop(clawkerd);

    // Ours, expired, but not the row's leaf: thumbprint mismatch.
    let h = Harness::new();
    let leaf = leaf_between(&h.ca, &h.pki.container_id, -7200, -3600);
    h.bootstrap_with(&leaf);
    h.register_row(h.pki.agent.thumbprint());
    let clawkerd = agent(&h.pki, None);
    h.resolver.set(&h.pki.container_id, running(clawkerd.addr));
    let (task, _live) = h.start();
    wait_for(&h.sink, "agent.untrusted", 1, 30).await;
    assert_eq!(
        h.sink.of("agent.untrusted")[0]["reason"],
        "cert_thumbprint_mismatch"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(h.sink.of("agent.cert.rotated").is_empty());
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewed_cp_certificates_are_accepted_by_a_clawkerd_that_never_restarted() {
    let h = Harness::new();
    // The CP's state dir, with its own CA; the agent is bootstrapped from it.
    let state = tempfile::tempdir().unwrap();
    pki::AuthMaterial::ensure(state.path()).unwrap();
    let material = pki::AuthMaterial::load(state.path()).unwrap();
    let (p, a) = ident();
    let leaf = material.ca.mint_agent(&p, &a, &h.pki.container_id).unwrap();
    h.bootstrap_with(&leaf);
    std::fs::write(h.pki.bootstrap_dir.join("ca.pem"), material.ca.cert_pem()).unwrap();
    h.register_row(leaf.thumbprint());
    let paths = pki::AuthPaths::new(state.path());
    let cp_client = |paths: &pki::AuthPaths| -> CertifiedKey {
        let cert_pem = std::fs::read_to_string(paths.cp_client_cert()).unwrap();
        let der = pki::single_pem_block("c", &cert_pem, "CERTIFICATE").unwrap();
        CertifiedKey {
            cert_pem,
            key_pem: std::fs::read_to_string(paths.cp_client_key()).unwrap(),
            cert_der: der,
        }
    };
    let dial_as = |client: &CertifiedKey| {
        let mut deps = h.deps(&RecordingSink::default(), client);
        deps.dial = DialConfig::new(
            material.ca.cert_pem().as_bytes(),
            client.cert_pem.as_bytes(),
            client.key_pem.as_bytes(),
        )
        .unwrap();
        deps
    };
    let clawkerd = agent(&h.pki, None);
    h.resolver.set(&h.pki.container_id, running(clawkerd.addr));

    let before = cp_client(&paths);
    let sink1 = RecordingSink::default();
    let deps = SessionDeps {
        sink: sink1.clone(),
        ..dial_as(&before)
    };
    let (tx, _l) = watch::channel(None);
    let cp1 = tokio::spawn(lifecycle::run(
        h.pki.container_id.clone(),
        deps,
        tx,
        Default::default(),
    ));
    wait_for(&sink1, "agent.trusted", 1, 30).await;

    // `clawker ca renew`, then the CP restarts with the renewed certificate.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_clawker"))
        .args(["ca", "renew", "--state-dir"])
        .arg(state.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("renewed CP client certificate"), "{stdout}");
    let after = cp_client(&paths);
    assert_ne!(after.thumbprint(), before.thumbprint());
    cp1.abort();
    let sink2 = RecordingSink::default();
    let deps = SessionDeps {
        sink: sink2.clone(),
        ..dial_as(&after)
    };
    let (tx, _l) = watch::channel(None);
    let cp2 = tokio::spawn(lifecycle::run(
        h.pki.container_id.clone(),
        deps,
        tx,
        Default::default(),
    ));
    wait_for(&sink2, "agent.trusted", 1, 30).await;
    assert!(sink2.of("agent.untrusted").is_empty());
    // The same clawkerd process accepted both CP client certificates.
    assert!(
        clawkerd
            .logs
            .wait_count("session_started", 2, Duration::from_secs(5))
    );
    let peers: Vec<String> = clawkerd
        .logs
        .events("session_started")
        .iter()
        .map(|l| l["peer_thumbprint"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(peers[0], before.thumbprint().to_hex());
    assert_eq!(peers[1], after.thumbprint().to_hex());
    cp2.abort();
}
