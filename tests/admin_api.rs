//! The admin API over real mTLS on loopback, with a real actix System, the
//! real event bus, a real redb registry and a real supervisor — and the
//! `clawker` binary talking to it the way an operator would.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use clawker::admin_api::{
    self, AdminApi, AdminClient, AdminConfig, ClientError, SERVICE_NAME, serve_admin_api,
};
use clawker::events::{self, AgentRef, Bus};
use clawker::identity::{AgentName, ProjectSlug, Thumbprint};
use clawker::pki::{AuthMaterial, AuthPaths, Ca, CertifiedKey};
use clawker::registry::RegistryStore;
use clawker::registry::store::NewEntry;
use clawker_actors::{
    ChildLink, ChildSpec, ExitHandle, Supervisor, SupervisorHandle, SupervisorSpec,
};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;
use tonic::transport::Endpoint;
use tonic_health::pb::health_check_response::ServingStatus;

/// An actor that does nothing but live under the supervisor.
struct Idle {
    _exit: Option<ExitHandle>,
}

impl Actor for Idle {
    type Context = Context<Self>;
}

fn idle(link: ChildLink) -> Result<Addr<Idle>, String> {
    Ok(Idle::create(move |ctx| Idle {
        _exit: Some(link.attach(ctx)),
    }))
}

/// A running CP slice: state dir with auth material, registry, bus,
/// supervisor and the admin API on an ephemeral loopback port.
struct Cp {
    _dir: tempfile::TempDir,
    state: PathBuf,
    addr: SocketAddr,
    bus: Bus,
    store: RegistryStore,
    sup: SupervisorHandle,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), admin_api::AdminServerError>>,
}

impl Cp {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        AuthMaterial::ensure(&state).unwrap();
        let store = RegistryStore::open(&state.join("registry.redb")).unwrap();
        let bus = events::start_bus();
        let sup = Supervisor::start(
            SupervisorSpec::new("clawker-cp")
                .child(ChildSpec::worker("bus-probe", idle))
                .child(ChildSpec::worker("admin-api", idle)),
        );
        let api = AdminApi::new(Arc::new(store.clone()), bus.clone(), Arc::new(sup.clone()));
        let config = AdminConfig::load(&state, "127.0.0.1:0".parse().unwrap()).unwrap();
        let shutdown = CancellationToken::new();
        let (addr, task) = serve_admin_api(config, api, shutdown.clone())
            .await
            .unwrap();
        Self {
            _dir: dir,
            state,
            addr,
            bus,
            store,
            sup,
            shutdown,
            task,
        }
    }

    fn paths(&self) -> AuthPaths {
        AuthPaths::new(&self.state)
    }

    fn read(&self, p: PathBuf) -> Vec<u8> {
        std::fs::read(p).unwrap()
    }

    async fn client(&self) -> AdminClient {
        AdminClient::connect(&self.state, self.addr).await.unwrap()
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("server stops after shutdown")
            .unwrap()
            .unwrap();
        self.sup.shutdown();
    }
}

fn run<F: Future<Output = ()>>(f: impl FnOnce() -> F) {
    actix::System::new().block_on(f());
}

fn thumb(b: u8) -> Thumbprint {
    Thumbprint([b; 32])
}

#[test]
fn list_agents_maps_registry_rows_sorted_by_project_then_agent() {
    run(|| async {
        let cp = Cp::start().await;
        assert!(cp.client().await.list_agents().await.unwrap().is_empty());
        for (project, agent, cid, t, at) in [
            ("web", "zed", "c3", 3, 1_700_000_300),
            ("", "solo", "c1", 1, 1_700_000_100),
            ("api", "bob", "c4", 4, 1_700_000_400),
            ("web", "amy", "c2", 2, 1_700_000_200),
        ] {
            cp.store
                .add(NewEntry {
                    agent_name: agent.into(),
                    project: project.into(),
                    container_id: cid.into(),
                    thumbprint: thumb(t),
                    registered_at_unix: at,
                    last_seen_unix: at + 5,
                })
                .unwrap();
        }
        let agents = cp.client().await.list_agents().await.unwrap();
        let keys: Vec<_> = agents
            .iter()
            .map(|a| {
                (
                    a.project.as_str(),
                    a.agent_name.as_str(),
                    a.container_id.as_str(),
                )
            })
            .collect();
        assert_eq!(
            keys,
            [
                ("", "solo", "c1"),
                ("api", "bob", "c4"),
                ("web", "amy", "c2"),
                ("web", "zed", "c3")
            ]
        );
        let amy = &agents[2];
        assert_eq!(amy.cert_thumbprint, "02".repeat(32));
        assert_eq!(amy.registered_at_unix, 1_700_000_200);
        assert_eq!(amy.last_seen_unix, 1_700_000_205);
        cp.stop().await;
    });
}

fn connecting(cid: &str) -> events::SessionConnecting {
    events::SessionConnecting {
        agent: AgentRef::new(cid, "dev", "web"),
        address: "10.0.0.2:7700".into(),
        at: events::now(),
    }
}

fn trusted(cid: &str) -> events::AgentTrusted {
    events::AgentTrusted {
        agent: AgentRef::new(cid, "dev", "web"),
        rotations: 0,
        at: events::now(),
    }
}

#[test]
fn get_worldview_reflects_published_events() {
    run(|| async {
        let cp = Cp::start().await;
        let client = cp.client().await;
        let before = client.worldview().await.unwrap();
        assert_eq!(before["agents"], serde_json::json!({}));
        assert!(cp.bus.publish(connecting("c1")));
        assert!(cp.bus.publish(trusted("c1")));
        // The server's snapshot travels in band after our publishes.
        let view = client.worldview().await.unwrap();
        let a = &view["agents"]["c1"];
        assert_eq!(a["session_status"], "connecting");
        assert_eq!(a["agent"], "dev");
        assert_eq!(a["registered"], true);
        assert_eq!(a["address"], "10.0.0.2:7700");
        cp.stop().await;
    });
}

async fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[test]
fn watch_events_streams_later_events_filtered_by_prefix_and_unsubscribes_on_drop() {
    run(|| async {
        let cp = Cp::start().await;
        let client = cp.client().await;
        // Published before anyone watches: never seen (no history).
        cp.bus.publish(connecting("early"));
        cp.bus.flush().await.unwrap();
        let base = cp.bus.stats().subscribers;

        let mut filtered = client
            .watch_events(vec!["agent.session.".into()])
            .await
            .unwrap();
        let mut all = client.watch_events(vec![]).await.unwrap();
        assert_eq!(cp.bus.stats().subscribers, base + 2);

        cp.bus.publish(trusted("c1"));
        cp.bus.publish(connecting("c1"));

        let first = tokio::time::timeout(Duration::from_secs(10), filtered.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(first.name, "agent.session.connecting");
        let json: Value = serde_json::from_str(&first.json).unwrap();
        assert_eq!(json["container_id"], "c1");
        assert_eq!(json["address"], "10.0.0.2:7700");
        let now = time::OffsetDateTime::now_utc().unix_timestamp_nanos() as i64;
        assert!(first.time_unix_nanos > 0 && first.time_unix_nanos <= now);

        let mut names = Vec::new();
        for _ in 0..2 {
            let ev = tokio::time::timeout(Duration::from_secs(10), all.message())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            names.push(ev.name);
        }
        assert_eq!(names, ["agent.trusted", "agent.session.connecting"]);

        // The client goes away: the server drops both subscriptions.
        drop(filtered);
        drop(all);
        let bus = cp.bus.clone();
        wait_until("subscriptions dropped", || bus.stats().subscribers == base).await;
        cp.stop().await;
    });
}

#[test]
fn get_supervision_tree_returns_json_and_rendering() {
    run(|| async {
        let cp = Cp::start().await;
        let tree = cp.client().await.tree().await.unwrap();
        let json: Value = serde_json::from_str(&tree.json).unwrap();
        assert_eq!(json["name"], "clawker-cp");
        let children: Vec<_> = json["children"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(children, ["bus-probe", "admin-api"]);
        assert!(
            tree.rendered.starts_with("clawker-cp (supervisor"),
            "{}",
            tree.rendered
        );
        assert!(
            tree.rendered.contains("└── admin-api (worker"),
            "{}",
            tree.rendered
        );
        cp.stop().await;
    });
}

#[test]
fn health_reports_serving_for_the_server_and_admin_service() {
    run(|| async {
        let cp = Cp::start().await;
        let client = cp.client().await;
        assert_eq!(client.health("").await.unwrap(), ServingStatus::Serving);
        assert_eq!(
            client.health(SERVICE_NAME).await.unwrap(),
            ServingStatus::Serving
        );
        let unknown = client.health("no.such.Service").await.unwrap_err();
        assert!(
            matches!(&unknown, ClientError::Rpc { status, .. } if status.code() == tonic::Code::NotFound),
            "{unknown}"
        );
        cp.stop().await;
    });
}

#[test]
fn reflection_lists_the_admin_service() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    run(|| async {
        let cp = Cp::start().await;
        let channel = dial(
            cp.addr,
            &cp.read(cp.paths().ca_cert()),
            Some((
                cp.read(cp.paths().cli_cert()),
                cp.read(cp.paths().cli_key()),
            )),
        )
        .await
        .unwrap();
        let mut refl = ServerReflectionClient::new(channel);
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut resp = refl
            .server_reflection_info(tokio_stream::iter(vec![req]))
            .await
            .unwrap()
            .into_inner();
        let msg = resp.message().await.unwrap().unwrap();
        let Some(MessageResponse::ListServicesResponse(list)) = msg.message_response else {
            panic!("unexpected reflection reply: {msg:?}");
        };
        let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
        assert!(names.contains(&SERVICE_NAME), "{names:?}");
        assert!(names.contains(&"grpc.health.v1.Health"), "{names:?}");
        cp.stop().await;
    });
}

/// A raw channel with arbitrary client credentials (the server is verified
/// against `ca_pem` as the CLI does).
async fn dial(
    addr: SocketAddr,
    ca_pem: &[u8],
    client: Option<(Vec<u8>, Vec<u8>)>,
) -> Result<tonic::transport::Channel, String> {
    let roots = clawker::tls::root_store("ca", ca_pem).unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(clawker::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots);
    let mut cfg = match client {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                clawker::tls::load_certs("cert", &cert).unwrap(),
                clawker::tls::load_key("key", &key).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let cfg = Arc::new(cfg);
    let connector = tower::service_fn(move |_uri: http::Uri| {
        let cfg = cfg.clone();
        async move {
            let tcp = TcpStream::connect(addr).await?;
            let name = ServerName::try_from("clawker-controlplane").unwrap();
            let tls = TlsConnector::from(cfg).connect(name, tcp).await?;
            Ok::<_, std::io::Error>(TokioIo::new(tls))
        }
    });
    Endpoint::from_static("http://clawker-controlplane")
        .connect_timeout(Duration::from_secs(5))
        .connect_with_connector(connector)
        .await
        .map_err(|e| format!("{e:?}"))
}

/// Whether `ListAgents` succeeds with these credentials. With TLS 1.3 the
/// client learns of a rejected certificate only after its side of the
/// handshake, so a refusal shows up either at connect or at the first call.
async fn list_agents_with(
    addr: SocketAddr,
    ca_pem: &[u8],
    client: Option<(Vec<u8>, Vec<u8>)>,
) -> Result<usize, String> {
    let channel = dial(addr, ca_pem, client).await?;
    let mut c = clawker::proto::admin::v1::admin_service_client::AdminServiceClient::new(channel);
    c.list_agents(clawker::proto::admin::v1::ListAgentsRequest {})
        .await
        .map(|r| r.into_inner().agents.len())
        .map_err(|s| s.to_string())
}

fn pair(k: &CertifiedKey) -> Option<(Vec<u8>, Vec<u8>)> {
    Some((
        k.cert_pem.clone().into_bytes(),
        k.key_pem.clone().into_bytes(),
    ))
}

#[test]
fn only_the_cli_certificate_gets_through() {
    run(|| async {
        let cp = Cp::start().await;
        let paths = cp.paths();
        let ca_pem = cp.read(paths.ca_cert());
        let ca = Ca::load(
            &String::from_utf8(ca_pem.clone()).unwrap(),
            &String::from_utf8(cp.read(paths.ca_key())).unwrap(),
        )
        .unwrap();

        // Positive control: the CLI's own certificate.
        let cli = Some((cp.read(paths.cli_cert()), cp.read(paths.cli_key())));
        assert_eq!(list_agents_with(cp.addr, &ca_pem, cli).await, Ok(0));

        let agent_leaf = ca
            .mint_agent(
                &ProjectSlug::new("web").unwrap(),
                &AgentName::new("dev").unwrap(),
                "0123456789abcdef",
            )
            .unwrap();
        let other_ca_cli = Ca::generate().unwrap().mint_cli_client().unwrap();
        type Identity = Option<(Vec<u8>, Vec<u8>)>;
        let cases: Vec<(&str, Identity)> = vec![
            ("no client certificate", None),
            (
                "the CP's own client certificate",
                Some((
                    cp.read(paths.cp_client_cert()),
                    cp.read(paths.cp_client_key()),
                )),
            ),
            ("an agent leaf", pair(&agent_leaf)),
            ("a CLI certificate from another CA", pair(&other_ca_cli)),
        ];
        for (what, creds) in cases {
            let r = list_agents_with(cp.addr, &ca_pem, creds).await;
            // Refused by the server inside the TLS handshake, not by a handler.
            let err = r.expect_err(what);
            assert!(err.contains("received fatal alert"), "{what}: {err}");
        }
        // The server is still fine afterwards.
        assert!(cp.client().await.list_agents().await.is_ok());
        cp.stop().await;
    });
}

#[test]
fn the_client_rejects_a_server_from_another_ca() {
    run(|| async {
        let cp = Cp::start().await;
        // A state dir whose CA did not sign the running server's cert.
        let other = tempfile::tempdir().unwrap();
        AuthMaterial::ensure(other.path()).unwrap();
        let err = AdminClient::connect(other.path(), cp.addr)
            .await
            .unwrap_err();
        assert!(matches!(err, ClientError::Connect { .. }), "{err}");
        cp.stop().await;
    });
}

// ---- the CLI binary ----------------------------------------------------

fn clawker(state: &Path, addr: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_clawker"))
        .arg("--state-dir")
        .arg(state)
        .arg("--admin-addr")
        .arg(addr)
        .args(args)
        .env_remove("CLAWKER_STATE_DIR")
        .env_remove("CLAWKER_ADMIN_ADDR")
        .output()
        .expect("run clawker")
}

/// Runs the CLI off the actix thread (the server lives on it).
async fn clawker_async(state: &Path, addr: SocketAddr, args: &[&str]) -> std::process::Output {
    let state = state.to_owned();
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        clawker(&state, &addr.to_string(), &args)
    })
    .await
    .unwrap()
}

fn stdout(o: &std::process::Output) -> String {
    assert!(
        o.status.success(),
        "clawker failed: {}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn cli_agents_tree_status_and_worldview_against_a_running_cp() {
    run(|| async {
        let cp = Cp::start().await;
        cp.store
            .add(NewEntry {
                agent_name: "dev".into(),
                project: "web".into(),
                container_id: "0123456789abcdef0123".into(),
                thumbprint: thumb(0xab),
                registered_at_unix: 1_704_067_200,
                last_seen_unix: 0,
            })
            .unwrap();
        cp.bus.publish(connecting("0123456789abcdef0123"));
        cp.bus.flush().await.unwrap();

        let out = stdout(&clawker_async(&cp.state, cp.addr, &["agents", "--json"]).await);
        let rows: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(rows[0]["agent_name"], "dev");
        assert_eq!(rows[0]["project"], "web");
        assert_eq!(rows[0]["cert_thumbprint"], "ab".repeat(32));
        assert_eq!(rows[0]["registered_at_unix"], 1_704_067_200);

        let table = stdout(&clawker_async(&cp.state, cp.addr, &["agents"]).await);
        assert!(table.starts_with("PROJECT"), "{table}");
        assert!(
            table.contains("web      dev    0123456789ab  abababababababab  2024-01-01T00:00:00Z"),
            "{table}"
        );

        let tree = stdout(&clawker_async(&cp.state, cp.addr, &["tree"]).await);
        assert!(tree.starts_with("clawker-cp (supervisor"), "{tree}");
        assert!(tree.contains("admin-api"), "{tree}");

        let status = stdout(&clawker_async(&cp.state, cp.addr, &["status"]).await);
        assert!(
            status.contains(&format!("reachable at {}", cp.addr)),
            "{status}"
        );
        assert!(status.contains("SERVING"), "{status}");
        assert!(status.contains("1 registered"), "{status}");
        assert!(status.contains("connecting=1"), "{status}");

        let view = stdout(&clawker_async(&cp.state, cp.addr, &["worldview"]).await);
        assert!(view.contains("0123456789ab"), "{view}");
        assert!(view.contains("connecting"), "{view}");
        let json = stdout(&clawker_async(&cp.state, cp.addr, &["worldview", "--json"]).await);
        let v: Value = serde_json::from_str(&json).unwrap();
        assert_eq!(
            v["agents"]["0123456789abcdef0123"]["session_status"],
            "connecting"
        );
        cp.stop().await;
    });
}

#[test]
fn cli_events_follow_streams_live_events() {
    run(|| async {
        let cp = Cp::start().await;
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_clawker"))
            .arg("--state-dir")
            .arg(&cp.state)
            .arg("--admin-addr")
            .arg(cp.addr.to_string())
            .args(["events", "--follow", "--json", "--prefix", "agent.session."])
            .env_remove("CLAWKER_STATE_DIR")
            .env_remove("CLAWKER_ADMIN_ADDR")
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let base = cp.bus.stats().subscribers;
        let bus = cp.bus.clone();
        wait_until("the CLI subscribed", || bus.stats().subscribers > base).await;
        cp.bus.publish(trusted("c9"));
        cp.bus.publish(connecting("c9"));
        let stdout = child.stdout.take().unwrap();
        let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
        let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["name"], "agent.session.connecting");
        assert_eq!(v["event"]["container_id"], "c9");
        assert!(v["at"].as_str().unwrap().ends_with('Z'), "{line}");
        child.kill().await.unwrap();
        wait_until("the CLI's subscription dropped", || {
            bus.stats().subscribers == base
        })
        .await;
        cp.stop().await;
    });
}

#[test]
fn cli_events_without_follow_reads_the_audit_log_tail() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path();
    std::fs::create_dir_all(state.join("audit")).unwrap();
    let mut log = String::new();
    for i in 0..5 {
        log.push_str(&format!(
            "{{\"name\":\"agent.session.connected\",\"at\":\"2024-01-01T00:00:0{i}Z\",\
             \"event\":{{\"container_id\":\"abcdef0123456789\",\"attempts\":{i}}}}}\n"
        ));
        log.push_str("{\"name\":\"docker.event\",\"at\":\"2024-01-01T00:00:09Z\",\"event\":{}}\n");
    }
    std::fs::write(state.join("audit/events.jsonl"), log).unwrap();
    // No CP needed (and none listening on this address).
    let out = stdout(&clawker(
        state,
        "127.0.0.1:1",
        &["events", "--last", "2", "--prefix", "agent.session."],
    ));
    assert_eq!(
        out,
        "2024-01-01T00:00:03Z agent.session.connected abcdef012345 attempts=3\n\
         2024-01-01T00:00:04Z agent.session.connected abcdef012345 attempts=4\n"
    );
    let out = stdout(&clawker(
        state,
        "127.0.0.1:1",
        &["events", "--json", "--last", "1"],
    ));
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["name"], "docker.event");
}

#[test]
fn cli_says_the_cp_is_not_running_when_nothing_listens() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    AuthMaterial::ensure(&state).unwrap();
    // A port that was just free.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    for cmd in [&["agents"][..], &["status"], &["tree"], &["events", "-f"]] {
        let o = clawker(&state, &addr, cmd);
        assert!(!o.status.success(), "{cmd:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains(&format!(
                "cannot reach the control plane at {addr}: is `clawker cp serve` running?"
            )),
            "{cmd:?}: {err}"
        );
    }
    // Missing credentials say what to run.
    let empty = dir.path().join("empty");
    let o = clawker(&empty, &addr, &["agents"]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("clawker ca init"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = clawker(&state, "not-an-address", &["agents"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("not an IP:port"));
}

#[test]
fn shutdown_ends_open_watch_streams_and_stops_the_server() {
    run(|| async {
        let cp = Cp::start().await;
        let client = cp.client().await;
        let mut stream = client.watch_events(vec![]).await.unwrap();
        cp.shutdown.cancel();
        // The stream ends (cleanly or with an error), it does not hang.
        let end = tokio::time::timeout(Duration::from_secs(10), stream.message()).await;
        assert!(!matches!(end, Ok(Ok(Some(_)))), "{end:?}");
        cp.stop().await;
    });
}
