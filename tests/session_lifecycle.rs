//! The CP session lifecycle against real clawkerd processes on loopback:
//! real mTLS, real Session streams, a real redb registry; only the Docker
//! inspect is a test double (a static resolver).

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clawker::events::RecordingSink;
use clawker::registry::RegistryStore;
use clawker::registry::store::NewEntry;
use clawker::runtime::memory::MemoryOps;
use clawker::session::dial::DialConfig;
use clawker::session::lifecycle::{
    self, ContainerResolver, LiveSession, ResolveError, ResolvedTarget, SessionDeps, SessionPolicy,
};
use clawker::session::plan::Hooks;
use common::{AGENT, Clawkerd, PROJECT, TestPki};
use futures::future::BoxFuture;
use tokio::sync::watch;

/// Maps container ids to targets; a test flips them to simulate Docker.
/// A target bound to a process ([`StaticResolver::follow`]) is running
/// exactly as long as that clawkerd lives, like a container and its PID 1.
#[derive(Clone, Default)]
struct StaticResolver {
    targets: Arc<Mutex<HashMap<String, Result<ResolvedTarget, ResolveError>>>>,
    pids: Arc<Mutex<HashMap<String, i32>>>,
}

impl StaticResolver {
    fn set(&self, id: &str, t: Result<ResolvedTarget, ResolveError>) {
        self.targets.lock().unwrap().insert(id.to_owned(), t);
    }

    fn follow(&self, id: &str, d: &Clawkerd) {
        self.set(id, running(d.addr));
        self.pids
            .lock()
            .unwrap()
            .insert(id.to_owned(), d.child.id() as i32);
    }
}

impl ContainerResolver for StaticResolver {
    fn resolve(&self, id: &str) -> BoxFuture<'_, Result<ResolvedTarget, ResolveError>> {
        let mut r = self
            .targets
            .lock()
            .unwrap()
            .get(id)
            .cloned()
            .unwrap_or(Err(ResolveError::NotFound));
        if let (Some(pid), Ok(t)) = (self.pids.lock().unwrap().get(id), r.as_mut()) {
            t.running = !common::pid_gone(*pid);
        }
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

struct Harness {
    pki: TestPki,
    resolver: StaticResolver,
    registry: RegistryStore,
    sink: RecordingSink,
    policy: SessionPolicy,
    /// The runtime double the CP kills through.
    runtime: MemoryOps,
}

impl Harness {
    fn new() -> Self {
        let pki = TestPki::new();
        let registry = RegistryStore::open(&pki.dir.path().join("cp.redb")).unwrap();
        let mut policy = SessionPolicy::default();
        policy.init.user = pki.agent_user();
        policy.register_timeout = Duration::from_secs(3);
        let runtime = MemoryOps::default();
        runtime.add(&pki.container_id, &["clawker-net"]);
        Self {
            pki,
            resolver: StaticResolver::default(),
            registry,
            sink: RecordingSink::default(),
            policy,
            runtime,
        }
    }

    fn deps(&self) -> SessionDeps<RecordingSink> {
        SessionDeps {
            resolver: Arc::new(self.resolver.clone()),
            registry: Arc::new(self.registry.clone()),
            terminate: Arc::new(self.runtime.clone()),
            dial: DialConfig::new(
                self.pki.ca.cert_pem().as_bytes(),
                self.pki.cp_client.cert_pem.as_bytes(),
                self.pki.cp_client.key_pem.as_bytes(),
            )
            .unwrap(),
            sink: self.sink.clone(),
            policy: self.policy.clone(),
            certs: None,
        }
    }

    fn register_row(&self, thumbprint: clawker::identity::Thumbprint, project: &str) {
        self.registry
            .add(NewEntry {
                agent_name: AGENT.into(),
                project: project.into(),
                container_id: self.pki.container_id.clone(),
                thumbprint,
                registered_at_unix: 1_700_000_000,
                last_seen_unix: 0,
            })
            .unwrap();
    }

    fn start(
        &self,
    ) -> (
        tokio::task::JoinHandle<String>,
        watch::Receiver<Option<LiveSession>>,
    ) {
        let (tx, rx) = watch::channel(None);
        let task = tokio::spawn(lifecycle::run(
            self.pki.container_id.clone(),
            self.deps(),
            tx,
            Default::default(),
        ));
        (task, rx)
    }

    async fn wait_for(&self, name: &str, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.sink.of(name).len() < n {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {name}; saw {:?}",
                self.sink.names()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// A clawkerd whose user command is a long sleep (AgentReady needs one).
fn agent(pki: &TestPki, listen: Option<String>) -> Clawkerd {
    let mut opts = common::Opts {
        args: vec!["sleep".into(), "60".into()],
        ..Default::default()
    };
    if let Some(l) = listen {
        opts.env.push(("CLAWKER_LISTEN_ADDR".into(), l));
    }
    Clawkerd::spawn_with(pki, opts)
}

/// A fresh container: the decision, then init (7 steps) and boot (2: its
/// docker-socket already ran in init) as one start sequence.
const FRESH_OK: [&str; 21] = [
    "agent.plan.decided",
    "agent.init.started",
    "agent.init.step.started",
    "agent.init.step.completed",
    "agent.init.step.started",
    "agent.init.step.completed",
    "agent.init.step.started",
    "agent.init.step.completed",
    "agent.init.step.started",
    "agent.init.step.completed",
    "agent.init.step.started",
    "agent.init.step.completed",
    "agent.init.step.started",
    "agent.init.step.completed",
    "agent.init.step.started",
    "agent.init.step.completed",
    "agent.init.step.started",
    "agent.init.step.completed",
    "agent.init.step.started",
    "agent.init.step.completed",
    "agent.init.completed",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registered_agent_matches_runs_init_and_is_held() {
    let h = Harness::new();
    h.register_row(h.pki.agent.thumbprint(), PROJECT);
    let clawkerd = agent(&h.pki, None);
    h.resolver.set(&h.pki.container_id, running(clawkerd.addr));
    let (task, live) = h.start();
    h.wait_for("agent.init.completed", 1).await;
    let names = h.sink.names();
    let mut want = vec![
        "agent.session.connecting",
        "agent.session.connected",
        "agent.trusted",
    ];
    want.extend(FRESH_OK);
    assert_eq!(names, want, "no Register on a Match");
    let decided = &h.sink.of("agent.plan.decided")[0];
    assert_eq!(decided["plans"], serde_json::json!(["init", "boot"]));
    assert_eq!(
        (
            decided["initialized"].clone(),
            decided["cmd_running"].clone()
        ),
        (false.into(), false.into())
    );
    assert!(
        h.pki.init_marker().exists(),
        "agent-initialized wrote the marker"
    );
    let connected = &h.sink.of("agent.session.connected")[0];
    assert_eq!(connected["peer_cn"], "clawker.web.dev");
    assert_eq!(
        connected["peer_thumbprint"],
        h.pki.agent.thumbprint().to_hex()
    );
    assert_eq!(connected["chain_verified"], true);
    assert!(live.borrow().as_ref().is_some_and(|l| l.trusted));
    // The ssh step really ran as uid 1001 in the agent's home.
    let kh =
        std::fs::read_to_string(format!("{}/.ssh/known_hosts", h.policy.init.user.home)).unwrap();
    assert_eq!(kh.lines().count(), 9);
    assert!(!task.is_finished(), "session is held open");
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thumbprint_mismatch_is_untrusted_keeps_the_session_and_withholds_init() {
    let h = Harness::new();
    h.register_row(clawker::identity::Thumbprint([9; 32]), PROJECT);
    let clawkerd = agent(&h.pki, None);
    h.resolver.set(&h.pki.container_id, running(clawkerd.addr));
    let (task, live) = h.start();
    h.wait_for("agent.untrusted", 1).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        h.sink.names(),
        vec![
            "agent.session.connecting",
            "agent.session.connected",
            "agent.untrusted",
            "agent.plan.decided",
        ]
    );
    assert_eq!(h.sink.of("agent.plan.decided")[0]["skipped"], "untrusted");
    assert_eq!(
        h.sink.of("agent.plan.decided")[0]["plans"],
        serde_json::json!([])
    );
    assert_eq!(
        h.sink.of("agent.untrusted")[0]["reason"],
        "cert_thumbprint_mismatch"
    );
    let l = live.borrow().clone().expect("session still up");
    assert!(!l.trusted);
    assert!(!l.mux.is_closed());
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cn_mismatch_is_untrusted() {
    let h = Harness::new();
    // Same thumbprint, but the row says another project: CN differs.
    h.register_row(h.pki.agent.thumbprint(), "other");
    let clawkerd = agent(&h.pki, None);
    h.resolver.set(&h.pki.container_id, running(clawkerd.addr));
    let (task, _live) = h.start();
    h.wait_for("agent.untrusted", 1).await;
    assert_eq!(
        h.sink.of("agent.untrusted")[0]["reason"],
        "cert_cn_mismatch"
    );
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn miss_without_a_cp_register_endpoint_fails_register_boundedly() {
    let mut h = Harness::new();
    h.policy.max_register_attempts = 1;
    let clawkerd = agent(&h.pki, None);
    h.resolver.set(&h.pki.container_id, running(clawkerd.addr));
    let (task, _live) = h.start();
    h.wait_for("agent.untrusted", 1).await;
    let reg = &h.sink.of("agent.registered")[0];
    assert_eq!(reg["ok"], false);
    assert!(!reg["reason"].as_str().unwrap().is_empty());
    assert_eq!(h.sink.of("agent.untrusted")[0]["reason"], "register_failed");
    assert!(h.sink.of("agent.init.started").is_empty(), "init withheld");
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_end_with_a_stopped_container_fails_quietly_without_broken_churn() {
    let h = Harness::new();
    h.register_row(h.pki.agent.thumbprint(), PROJECT);
    let clawkerd = agent(&h.pki, None);
    h.resolver.set(&h.pki.container_id, running(clawkerd.addr));
    let (task, _live) = h.start();
    h.wait_for("agent.init.completed", 1).await;
    // "docker stop": the container is no longer running, clawkerd dies.
    h.resolver.set(
        &h.pki.container_id,
        Ok(ResolvedTarget {
            running: false,
            ..ResolvedTarget::default()
        }),
    );
    drop(clawkerd);
    let reason = tokio::time::timeout(Duration::from_secs(20), task)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reason, "container_not_running");
    // No SessionBroken and no reconnect churn for a container that is gone.
    let names = h.sink.names();
    assert_eq!(names.last(), Some(&"agent.session.failed"));
    assert!(h.sink.of("agent.session.broken").is_empty(), "{names:?}");
    assert_eq!(h.sink.of("agent.session.connecting").len(), 1);
    let failed = &h.sink.of("agent.session.failed")[0];
    assert_eq!(failed["reason"], "container_not_running");
    assert_eq!(failed["agent"], AGENT, "identity kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_reconnects_with_match_and_no_second_register() {
    let h = Harness::new();
    h.register_row(h.pki.agent.thumbprint(), PROJECT);
    let clawkerd = agent(&h.pki, None);
    h.resolver.set(&h.pki.container_id, running(clawkerd.addr));
    let (task, _live) = h.start();
    h.wait_for("agent.init.completed", 1).await;
    let port = clawkerd.addr.port();
    drop(clawkerd);
    // Same container comes back on the same address.
    let again = agent(&h.pki, Some(format!("127.0.0.1:{port}")));
    assert_eq!(again.addr.port(), port);
    h.wait_for("agent.init.completed", 2).await;
    assert_eq!(h.sink.of("agent.session.broken").len(), 1);
    assert_eq!(h.sink.of("agent.trusted").len(), 2);
    assert!(h.sink.of("agent.registered").is_empty());
    // The restarted container (marker kept, command not started) boots
    // only: no init step runs again.
    let second = &h.sink.of("agent.plan.decided")[1];
    assert_eq!(
        (
            second["initialized"].as_bool(),
            second["cmd_running"].as_bool()
        ),
        (Some(true), Some(false))
    );
    assert_eq!(
        h.sink.of("agent.init.completed")[1]["plans"],
        serde_json::json!(["boot"])
    );
    let boot_steps: Vec<String> = h.sink.of("agent.init.step.started")[9..]
        .iter()
        .map(|e| {
            format!(
                "{}:{}",
                e["plan"].as_str().unwrap(),
                e["step"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        boot_steps,
        ["boot:docker-socket", "boot:pre-run", "boot:agent-ready"]
    );
    task.abort();
}

/// A CP restart (or a network blip) finds the command running: nothing
/// runs again, the session just Matches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_to_a_running_command_runs_no_step() {
    let h = Harness::new();
    h.register_row(h.pki.agent.thumbprint(), PROJECT);
    let clawkerd = agent(&h.pki, None);
    h.resolver.set(&h.pki.container_id, running(clawkerd.addr));
    let (first, _live) = h.start();
    h.wait_for("agent.init.completed", 1).await;
    first.abort(); // the CP goes away; clawkerd and its command stay
    let (second, _live) = h.start();
    h.wait_for("agent.plan.decided", 2).await;
    let d = &h.sink.of("agent.plan.decided")[1];
    assert_eq!(
        (d["initialized"].as_bool(), d["cmd_running"].as_bool()),
        (Some(true), Some(true))
    );
    assert_eq!(d["plans"], serde_json::json!([]));
    assert_eq!(d["skipped"], "cmd_running");
    assert_eq!(
        h.sink.of("agent.init.started").len(),
        1,
        "no second sequence"
    );
    assert_eq!(h.sink.of("agent.trusted").len(), 2);
    second.abort();
}

fn failing_pre_run(h: &mut Harness) {
    h.policy.init.hooks = Hooks {
        post_init: Some("echo post-init-ran > \"$HOME/post-init\"".into()),
        pre_run: Some("echo 'pre-run broke' >&2\nexit 3".into()),
    };
}

/// A failed boot step ends the container with the step's exit code:
/// clawkerd exits by itself right after the Done (no CP kill needed), and
/// an event says which step ended it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_pre_run_hook_ends_clawkerd_with_its_exit_code() {
    let mut h = Harness::new();
    failing_pre_run(&mut h);
    h.register_row(h.pki.agent.thumbprint(), PROJECT);
    let mut clawkerd = agent(&h.pki, None);
    h.resolver.follow(&h.pki.container_id, &clawkerd);
    let (task, _live) = h.start();
    h.wait_for("agent.terminated", 1).await;
    let failed = &h.sink.of("agent.init.failed")[0];
    assert_eq!(
        (failed["plan"].as_str(), failed["failed_step"].as_str()),
        (Some("boot"), Some("pre-run"))
    );
    assert_eq!(failed["exit_code"], 3);
    let step = &h.sink.of("agent.init.step.failed")[0];
    assert_eq!(step["output"], "pre-run broke");
    let ended = &h.sink.of("agent.terminated")[0];
    assert_eq!(ended["by"], "self_exit");
    assert_eq!(ended["step"], "pre-run");
    assert_eq!(ended["exit_code"], 3);
    assert_eq!(clawkerd.wait_exit(Duration::from_secs(10)), Some(3));
    assert!(
        h.runtime.calls().is_empty(),
        "nothing killed: {:?}",
        h.runtime.calls()
    );
    // post_init ran (before pre_run), and init completed: its marker is set.
    let home = &h.policy.init.user.home;
    assert!(std::path::Path::new(&format!("{home}/post-init")).exists());
    assert!(h.pki.init_marker().exists());
    assert!(
        h.sink.of("agent.init.completed").is_empty(),
        "the command was never released"
    );
    task.abort();
}

/// `keep_on_init_failure`: the step fails, the container (and the session)
/// live on without the user command, for inspection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_on_init_failure_keeps_the_container() {
    let mut h = Harness::new();
    failing_pre_run(&mut h);
    h.policy.init.keep_on_failure = true;
    h.register_row(h.pki.agent.thumbprint(), PROJECT);
    let mut clawkerd = agent(&h.pki, None);
    h.resolver.follow(&h.pki.container_id, &clawkerd);
    let (task, live) = h.start();
    h.wait_for("agent.init.failed", 1).await;
    // The session still runs commands: clawkerd did not exit.
    let mux = live.borrow().clone().expect("session up").mux;
    let done = clawker::session::command::run_to_completion(
        &mux,
        "probe",
        clawker::session::command::shell("true", &clawker::session::command::RunAs::root(), 5, b""),
        Duration::from_secs(5),
        64,
    )
    .await
    .unwrap();
    assert_eq!(done.exit_code, 0);
    assert!(clawkerd.is_running());
    assert!(h.sink.of("agent.terminated").is_empty());
    task.abort();
}

/// A clawkerd that does not end its container (here: its "container" is
/// still reported running after PID 1 exited) is killed by the CP through
/// the runtime seam once the grace elapses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cp_kills_a_container_that_does_not_end_itself() {
    let mut h = Harness::new();
    failing_pre_run(&mut h);
    h.policy.terminate_grace = Duration::from_millis(200);
    h.register_row(h.pki.agent.thumbprint(), PROJECT);
    let clawkerd = agent(&h.pki, None);
    h.resolver.set(&h.pki.container_id, running(clawkerd.addr));
    let (task, _live) = h.start();
    h.wait_for("agent.terminated", 1).await;
    assert_eq!(h.sink.of("agent.terminated")[0]["by"], "cp_kill");
    assert_eq!(h.runtime.calls(), [format!("kill {}", h.pki.container_id)]);
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_listening_fails_with_connect_total_timeout() {
    let mut h = Harness::new();
    h.policy.establish.total = Duration::from_millis(600);
    h.policy.establish.fast_window = Duration::from_millis(100);
    h.policy.establish.initial_backoff = Duration::from_millis(50);
    // A port nothing listens on.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    h.resolver.set(&h.pki.container_id, running(addr));
    let (task, _live) = h.start();
    let reason = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reason, "connect_total_timeout");
    let failed = &h.sink.of("agent.session.failed")[0];
    assert!(failed["attempts"].as_u64().unwrap() > 3);
    assert_eq!(failed["address"], addr.to_string());
    assert_eq!(
        h.sink.names(),
        vec!["agent.session.connecting", "agent.session.failed"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_clawker_net_endpoint_is_terminal() {
    let h = Harness::new();
    h.resolver.set(
        &h.pki.container_id,
        Ok(ResolvedTarget {
            agent: AGENT.into(),
            project: PROJECT.into(),
            running: true,
            addr: None,
        }),
    );
    let (task, _live) = h.start();
    let reason = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reason, "clawker_net_endpoint_missing");
    assert_eq!(h.sink.of("agent.session.failed")[0]["agent"], AGENT);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_connect_follows_clawkerd_within_milliseconds() {
    let h = Harness::new();
    h.register_row(h.pki.agent.thumbprint(), PROJECT);
    // Reserve a port, start the session first, then clawkerd on that port.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    h.resolver.set(&h.pki.container_id, running(addr));
    let (task, _live) = h.start();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let clawkerd = agent(&h.pki, Some(addr.to_string()));
    h.wait_for("agent.session.connected", 1).await;
    let connected = &h.sink.of("agent.session.connected")[0];
    // Many fast attempts, not the reference's handful of jittered ones.
    assert!(connected["attempts"].as_u64().unwrap() > 10, "{connected}");
    drop(clawkerd);
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaf_from_another_ca_is_cert_invalid_and_the_session_is_kept() {
    let h = Harness::new();
    // clawkerd serves a leaf signed by a foreign CA (it still trusts ours
    // for the CP's client certificate).
    let foreign = clawker::pki::Ca::generate().unwrap();
    let leaf = foreign
        .mint_agent(
            &clawker::identity::ProjectSlug::new(PROJECT).unwrap(),
            &clawker::identity::AgentName::new(AGENT).unwrap(),
            &h.pki.container_id,
        )
        .unwrap();
    std::fs::write(h.pki.bootstrap_dir.join("cert.pem"), &leaf.cert_pem).unwrap();
    std::fs::write(h.pki.bootstrap_dir.join("key.pem"), &leaf.key_pem).unwrap();
    let clawkerd = agent(&h.pki, None);
    h.resolver.set(&h.pki.container_id, running(clawkerd.addr));
    let (task, live) = h.start();
    h.wait_for("agent.untrusted", 1).await;
    assert_eq!(
        h.sink.of("agent.session.connected")[0]["chain_verified"],
        false
    );
    let u = &h.sink.of("agent.untrusted")[0];
    assert_eq!(u["reason"], "cert_invalid");
    assert!(
        u["detail"].as_str().unwrap().starts_with("chain verify:"),
        "{u}"
    );
    assert!(h.sink.of("agent.init.started").is_empty());
    assert!(
        live.borrow().as_ref().is_some_and(|l| !l.mux.is_closed()),
        "session kept"
    );
    task.abort();
}
