//! Containment that contains, proven on the REAL engine, and the hardened
//! agent container.
//!
//! The world the agent could reach, all on this machine:
//! - "inet": HTTP and a connection-holding server in a network namespace
//!   this test creates, behind a veth pair with its own address
//!   (10.252.20.2), reached through the host's routing and Docker's NAT as
//!   real egress is;
//! - "published": an HTTP server in a container on another Docker
//!   network, behind a port published on the host;
//! - "host": a listener of this process on 0.0.0.0, reached on the
//!   gateway of whichever bridge the agent is on (Linux is weak-host).
//!
//! An in-process CP (the same `cp::start` as `clawker cp serve`) runs one
//! trusted agent; synthetic `AgentUntrusted` events fire the real ladders.
//! Release and unlock go through the admin API, as the CLI does.
//!
//! Docker networks: 10.222.20–29.0/24; the namespace: 10.252.20.0/30.
//! Everything is removed on drop, even when an assertion fails. Tests run
//! one at a time (fixed names; run the binary under the Docker flock).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clawker::cp::{self, CpConfig, RunningCp, agent::RunSpec};
use clawker::events::{self, AgentRef, AgentUntrusted, UntrustedReason};
use clawker::identity::{AgentName, ProjectSlug};
use clawker::pki::AuthMaterial;
use clawker::policy::containment::{ContainmentConfig, Rule, TriggerKind};
use clawker::runtime::NetworkRole;
use clawker::session::command::{self, RunAs, RunError};

static SERIAL: Mutex<()> = Mutex::new(());

const NETNS: &str = "clawker-ct-inet";
const VETH_HOST: &str = "ct-h0";
const VETH_NS: &str = "ct-n0";
const HOST_SIDE: &str = "10.252.20.1";
const INET_IP: &str = "10.252.20.2";
const INET_HTTP: u16 = 8080;
const INET_HOLD: u16 = 9000;
const AGENT_NET: &str = "clawker-ct-net";
const QUARANTINE_NET: &str = "clawker-ct-q";
const OTHER_NET: &str = "clawker-ct-other";
const PUB_CONTAINER: &str = "clawker-ct-pub";
const LABEL: &str = "containment-docker";

fn image() -> String {
    std::env::var("CLAWKER_TEST_IMAGE").unwrap_or_else(|_| "clawker-agent:latest".into())
}

fn run(cmd: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| format!("{cmd} {args:?}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(format!(
            "{cmd} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn docker_cli(args: &[&str]) -> Result<String, String> {
    run("docker", args)
}

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

// ---- the outside world ------------------------------------------------------

/// A minimal HTTP/1.0 responder on `listener`, answering `body`.
fn serve_http(listener: TcpListener, body: &'static str) {
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut s) = conn else { continue };
            std::thread::spawn(move || {
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let mut buf = [0u8; 1024];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = write!(
                    s,
                    "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
            });
        }
    });
}

/// Accepts connections and holds them open forever (the agent's
/// "connection opened before the lock"); counts accepts.
fn serve_hold(listener: TcpListener, accepted: Arc<AtomicUsize>) {
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in listener.incoming() {
            let Ok(s) = conn else { continue };
            accepted.fetch_add(1, Ordering::SeqCst);
            held.push(s);
        }
    });
}

/// Binds listeners inside the network namespace `ns` (a socket belongs
/// to the namespace it was created in, whichever thread serves it).
fn bind_in_netns(ns: &str, addrs: Vec<SocketAddr>) -> Vec<TcpListener> {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let f = std::fs::File::open(&path).unwrap();
        // SAFETY: setns on a thread of our own that ends right after.
        assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
        addrs
            .into_iter()
            .map(|a| TcpListener::bind(a).unwrap())
            .collect()
    })
    .join()
    .unwrap()
}

/// Everything this test binary creates on the machine, removed on drop.
struct World {
    state: tempfile::TempDir,
    cfg: CpConfig,
    /// The published server's host port.
    pub_port: u16,
    /// The host listener's port.
    host_port: u16,
    hold_accepted: Arc<AtomicUsize>,
}

impl World {
    fn new(containment: ContainmentConfig) -> Self {
        docker_cli(&["image", "inspect", &image()])
            .unwrap_or_else(|e| panic!("{e}: build it with scripts/build-agent-image.sh"));
        cleanup(); // leftovers of a crashed earlier run
        // "inet": a namespace behind a veth pair, routed via the host.
        let ip = |args: &[&str]| run("ip", args).unwrap();
        ip(&["netns", "add", NETNS]);
        ip(&[
            "link", "add", VETH_HOST, "type", "veth", "peer", "name", VETH_NS,
        ]);
        ip(&["link", "set", VETH_NS, "netns", NETNS]);
        ip(&["addr", "add", &format!("{HOST_SIDE}/30"), "dev", VETH_HOST]);
        ip(&["link", "set", VETH_HOST, "up"]);
        ip(&[
            "-n",
            NETNS,
            "addr",
            "add",
            &format!("{INET_IP}/30"),
            "dev",
            VETH_NS,
        ]);
        ip(&["-n", NETNS, "link", "set", VETH_NS, "up"]);
        ip(&["-n", NETNS, "link", "set", "lo", "up"]);
        ip(&["-n", NETNS, "route", "add", "default", "via", HOST_SIDE]);
        let inet = |p: u16| SocketAddr::new(INET_IP.parse().unwrap(), p);
        let mut ls = bind_in_netns(NETNS, vec![inet(INET_HTTP), inet(INET_HOLD)]);
        let hold_accepted = Arc::new(AtomicUsize::new(0));
        serve_hold(ls.pop().unwrap(), hold_accepted.clone());
        serve_http(ls.pop().unwrap(), "inet-ok");
        // "host": a listener on every host address.
        let host = TcpListener::bind("0.0.0.0:0").unwrap();
        let host_port = host.local_addr().unwrap().port();
        serve_http(host, "host-ok");
        // "published": a container on another network, port published.
        docker_cli(&["network", "create", "--subnet", "10.222.22.0/24", OTHER_NET]).unwrap();
        docker_cli(&[
            "run",
            "-d",
            "--name",
            PUB_CONTAINER,
            "--label",
            &format!("dev.clawker.test={LABEL}"),
            "--network",
            OTHER_NET,
            "-p",
            "8080",
            "--entrypoint",
            "/bin/sh",
            &image(),
            "-c",
            "mkdir -p /www && printf published-ok > /www/index.html && exec httpd -f -p 8080 -h /www",
        ])
        .unwrap();
        let mapped = docker_cli(&["port", PUB_CONTAINER, "8080/tcp"]).unwrap();
        let pub_port = mapped
            .lines()
            .find_map(|l| l.rsplit(':').next()?.parse().ok())
            .unwrap();
        // The CP's own configuration.
        let state = tempfile::tempdir().unwrap();
        AuthMaterial::ensure(state.path()).unwrap();
        let file = cp::config::FileConfig {
            containment: Some(containment),
            ..Default::default()
        };
        let overrides = cp::config::Overrides {
            network: Some(AGENT_NET.into()),
            subnet: Some("10.222.20.0/24".into()),
            quarantine_network: Some(QUARANTINE_NET.into()),
            quarantine_subnet: Some("10.222.21.0/24".into()),
            admin_addr: Some("127.0.0.1:0".parse().unwrap()),
            metrics_addr: Some("127.0.0.1:0".parse().unwrap()),
            ..Default::default()
        };
        let cfg = cp::config::resolve(state.path().to_owned(), file, overrides).unwrap();
        Self {
            state,
            cfg,
            pub_port,
            host_port,
            hold_accepted,
        }
    }

    fn material(&self) -> AuthMaterial {
        AuthMaterial::load(self.state.path()).unwrap()
    }

    fn spec(&self, name: &str) -> RunSpec {
        RunSpec {
            agent: AgentName::new(name).unwrap(),
            project: ProjectSlug::new("ct").unwrap(),
            image: image(),
            network: AGENT_NET.into(),
            agent_port: self.cfg.agent_port,
            command: vec![],
            env: vec![],
            hardening: Default::default(),
            extra_labels: HashMap::from([("dev.clawker.test".to_owned(), LABEL.to_owned())]),
            extra_networks: vec![],
            mint_for_container: None,
            cert_ttl: self.cfg.agent_cert_ttl,
            placement: vec![],
        }
    }
}

impl Drop for World {
    fn drop(&mut self) {
        cleanup();
    }
}

/// Removes whatever the tests of this binary created (idempotent).
fn cleanup() {
    if let Ok(ids) = docker_cli(&[
        "ps",
        "-aq",
        "--filter",
        &format!("label=dev.clawker.test={LABEL}"),
    ]) {
        let ids: Vec<&str> = ids.split_whitespace().collect();
        if !ids.is_empty() {
            let mut args = vec!["rm", "-f", "-v"];
            args.extend(ids);
            let _ = docker_cli(&args);
        }
    }
    if let Ok(id) = docker_cli(&["network", "inspect", "-f", "{{.Id}}", QUARANTINE_NET]) {
        let bridge = format!("br-{}", &id[..12.min(id.len())]);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let _ = rt.block_on(clawker::netns::unguard_bridge(
            &bridge,
            Duration::from_secs(10),
        ));
    }
    for n in [AGENT_NET, QUARANTINE_NET, OTHER_NET] {
        let _ = docker_cli(&["network", "rm", n]);
    }
    let _ = run("ip", &["link", "del", VETH_HOST]);
    let _ = run("ip", &["netns", "del", NETNS]);
}

// ---- the CP side --------------------------------------------------------------

type Seen = Arc<Mutex<Vec<(String, serde_json::Value)>>>;

fn record(bus: &clawker::events::Bus) -> Seen {
    let seen: Seen = Arc::default();
    let mut sub = bus.subscribe_all().unwrap();
    let s = seen.clone();
    actix::spawn(async move {
        while let Some(e) = sub.recv().await {
            s.lock().unwrap().push((e.name().to_owned(), e.to_json()));
        }
    });
    seen
}

/// Waits until an event about `id` matches `pred`; returns it.
async fn wait_event(
    seen: &Seen,
    id: &str,
    what: &str,
    pred: impl Fn(&str, &serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some((_, j)) = seen
            .lock()
            .unwrap()
            .iter()
            .find(|(n, j)| j["container_id"] == id && pred(n, j))
        {
            return j.clone();
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// How many events about `id` match.
fn count(seen: &Seen, id: &str, pred: impl Fn(&str, &serde_json::Value) -> bool) -> usize {
    seen.lock()
        .unwrap()
        .iter()
        .filter(|(n, j)| j["container_id"] == id && pred(n, j))
        .count()
}

/// Waits for an open, trusted session to `id` over its current address on
/// `role`'s network, established after `after` events had been seen.
async fn wait_session_on(
    cp: &RunningCp,
    seen: &Seen,
    id: &str,
    role: NetworkRole,
    after: usize,
) -> clawker::session::lifecycle::LiveSession {
    wait_session(cp, seen, id, role, after, true).await
}

/// [`wait_session_on`] for a session with the given verdict.
async fn wait_session(
    cp: &RunningCp,
    seen: &Seen,
    id: &str,
    role: NetworkRole,
    after: usize,
    trusted: bool,
) -> clawker::session::lifecycle::LiveSession {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let facts = cp.inspect.inspect(id).await.unwrap();
        if facts.ip_network == Some(role) {
            let prefix = format!("{}:", facts.ip.unwrap());
            let connected = seen.lock().unwrap().iter().skip(after).any(|(n, j)| {
                n == "agent.session.connected"
                    && j["container_id"] == id
                    && j["address"]
                        .as_str()
                        .is_some_and(|a| a.starts_with(&prefix))
            });
            if connected
                && let Some(l) = cp.sessions.live(id).await
                && !l.mux.is_closed()
                && l.trusted == trusted
            {
                return l;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no trusted session over the {role:?} network"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn agent_user() -> RunAs {
    clawker::session::init::AgentUser::default().run_as()
}

static CMD_SEQ: AtomicUsize = AtomicUsize::new(0);

/// Runs `script` over the agent's session; stdout, or the error.
async fn sh(
    live: &clawker::session::lifecycle::LiveSession,
    who: &RunAs,
    script: &str,
    timeout_secs: u32,
) -> Result<(i32, String, String), RunError> {
    let id = format!("ct-{}", CMD_SEQ.fetch_add(1, Ordering::SeqCst));
    let shell = command::shell(script, who, timeout_secs, b"");
    let done = command::run_to_completion(
        &live.mux,
        &id,
        shell,
        Duration::from_secs(u64::from(timeout_secs) + 10),
        4096,
    )
    .await?;
    Ok((done.exit_code, done.stdout.text(), done.stderr.text()))
}

/// One HTTP GET per target from inside the agent, concurrently; which
/// answered with their body.
async fn reach(
    live: &clawker::session::lifecycle::LiveSession,
    targets: &[(&str, String, u16, &str)],
) -> HashMap<String, bool> {
    let mut script = String::new();
    for (name, ip, port, body) in targets {
        script.push_str(&format!(
            "( r=$(printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 2 {ip} {port} 2>/dev/null); \
             case \"$r\" in *{body}*) echo \"ok {name}\";; *) echo \"no {name}\";; esac ) &\n"
        ));
    }
    script.push_str("wait\n");
    let (code, out, err) = sh(live, &agent_user(), &script, 20).await.unwrap();
    assert_eq!(code, 0, "probe script: {err}");
    out.lines()
        .filter_map(|l| {
            let (verdict, name) = l.split_once(' ')?;
            Some((name.to_owned(), verdict == "ok"))
        })
        .collect()
}

fn untrusted(id: &str, reason: UntrustedReason) -> AgentUntrusted {
    AgentUntrusted {
        agent: AgentRef::new(id, "probe", "ct"),
        reason,
        detail: "test: synthetic".into(),
        at: events::now(),
    }
}

fn rule(reason: UntrustedReason, actions: Vec<events::ContainmentAction>) -> Rule {
    Rule {
        on: TriggerKind::Untrusted,
        reasons: vec![reason],
        count: 1,
        window_secs: 60,
        actions,
    }
}

// ---- the proof ----------------------------------------------------------------

#[test]
fn isolate_and_lock_cut_all_egress_keep_the_session_and_release_unlock_restore() {
    use events::ContainmentAction as A;
    let _g = serial();
    // cert_invalid fires isolate, cert_cn_mismatch fires lock.
    let world = World::new(ContainmentConfig {
        rules: vec![
            rule(UntrustedReason::CertInvalid, vec![A::Alert, A::Isolate]),
            rule(UntrustedReason::CertCnMismatch, vec![A::Alert, A::Lock]),
        ],
        ..ContainmentConfig::default()
    });
    actix::System::new().block_on(async {
        let docker = clawker::docker::connect().await.unwrap();
        let cp1 = cp::start(&world.cfg).await.unwrap();
        let seen = record(&cp1.bus);
        let id = cp::agent::run(&docker, &world.material(), &world.spec("probe"))
            .await
            .unwrap();
        wait_event(&seen, &id, "init completed", |n, _| {
            n == "agent.init.completed"
        })
        .await;
        let agent_gw = cp1.gateway.to_string();
        let q_gw = clawker::docker::network::find(&docker, QUARANTINE_NET)
            .await
            .unwrap()
            .unwrap()
            .gateway
            .to_string();
        let (pub_port, host_port) = (world.pub_port, world.host_port);
        let targets = [
            ("inet", INET_IP.to_owned(), INET_HTTP, "inet-ok"),
            ("published", agent_gw.clone(), pub_port, "published-ok"),
            (
                "published-via-quarantine-gw",
                q_gw.clone(),
                pub_port,
                "published-ok",
            ),
            ("host", agent_gw.clone(), host_port, "host-ok"),
            ("host-via-quarantine-gw", q_gw.clone(), host_port, "host-ok"),
        ];
        let all = |v: bool| -> HashMap<String, bool> {
            targets.iter().map(|t| (t.0.to_owned(), v)).collect()
        };
        let reachable_from_agent_net = || -> HashMap<String, bool> {
            // From clawker-net every target answers (the quarantine
            // gateway is just another host address: weak host).
            all(true)
        };

        // 1. Before containment the agent reaches everything.
        let live = wait_session_on(&cp1, &seen, &id, NetworkRole::Agent, 0).await;
        assert_eq!(reach(&live, &targets).await, reachable_from_agent_net());

        // 2. isolate: quarantined, nothing reachable, the session re-dials
        //    over the quarantine address and still runs commands.
        let mark = seen.lock().unwrap().len();
        cp1.bus
            .publish(untrusted(&id, UntrustedReason::CertInvalid));
        let applied = wait_event(&seen, &id, "isolate applied", |n, j| {
            n == "policy.containment.applied" && j["action"] == "isolate"
        })
        .await;
        assert_eq!(applied["outcome"], "applied", "{applied}");
        let live = wait_session_on(&cp1, &seen, &id, NetworkRole::Quarantine, mark).await;
        let facts = cp1.inspect.inspect(&id).await.unwrap();
        assert_eq!(facts.networks, vec![QUARANTINE_NET.to_owned()]);
        assert_eq!(reach(&live, &targets).await, all(false));
        let (code, out, _) = sh(&live, &RunAs::root(), "echo still-here", 10)
            .await
            .unwrap();
        assert_eq!((code, out.as_str()), (0, "still-here"));
        assert!(
            count(&seen, &id, |n, j| n == "agent.session.broken"
                && j["reason"]
                    == clawker::session::lifecycle::REASON_ADDRESS_MOVED)
                >= 1,
            "the session was re-established because the address moved"
        );

        // 3. release (admin API, as `clawker agent release`): back on
        //    clawker-net, everything reachable again.
        let admin =
            clawker::admin_api::AdminClient::connect(world.state.path(), cp1.admin_api_addr)
                .await
                .unwrap();
        let mark = seen.lock().unwrap().len();
        let r = admin.release_agent("probe", "ct").await.unwrap();
        assert_eq!(
            (r.container_id.as_str(), r.outcome.as_str()),
            (id.as_str(), "applied"),
            "{r:?}"
        );
        let ev = wait_event(&seen, &id, "released", |n, _| {
            n == "policy.containment.released"
        })
        .await;
        assert_eq!(ev["action"], "isolate");
        let live = wait_session_on(&cp1, &seen, &id, NetworkRole::Agent, mark).await;
        assert_eq!(reach(&live, &targets).await, reachable_from_agent_net());
        let again = admin.release_agent("probe", "ct").await.unwrap();
        assert_eq!(again.outcome, "already_applied");

        // 4. lock: a connection opened before the lock is cut, new ones to
        //    any address fail at once, the session still works.
        let holds_before = world.hold_accepted.load(Ordering::SeqCst);
        let held = {
            let live = live.clone();
            tokio::spawn(async move {
                // stdin at EOF: nc half-closes and then blocks reading a
                // connection the server never closes.
                sh(
                    &live,
                    &agent_user(),
                    &format!("nc {INET_IP} {INET_HOLD} </dev/null; echo cut"),
                    60,
                )
                .await
            })
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while world.hold_accepted.load(Ordering::SeqCst) == holds_before {
            assert!(
                Instant::now() < deadline,
                "the agent never connected to the hold server"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            !held.is_finished(),
            "the held connection is open before the lock"
        );
        cp1.bus
            .publish(untrusted(&id, UntrustedReason::CertCnMismatch));
        let locked = wait_event(&seen, &id, "lock applied", |n, j| {
            n == "policy.containment.applied" && j["action"] == "lock"
        })
        .await;
        assert_eq!(locked["outcome"], "applied", "{locked}");
        let cut = tokio::time::timeout(Duration::from_secs(20), held)
            .await
            .expect("the pre-lock connection was cut (not left to its 60 s timeout)")
            .unwrap()
            .unwrap();
        assert_eq!(cut.1, "cut", "{cut:?}");
        assert_eq!(reach(&live, &targets).await, all(false));
        let (code, out, _) = sh(&live, &RunAs::root(), "echo locked-but-here", 10)
            .await
            .unwrap();
        assert_eq!((code, out.as_str()), (0, "locked-but-here"));
        // Idempotent: the next untrusted session would re-run the ladder.
        cp1.bus
            .publish(untrusted(&id, UntrustedReason::CertCnMismatch));
        wait_event(&seen, &id, "lock already applied", |n, j| {
            n == "policy.containment.applied"
                && j["action"] == "lock"
                && j["outcome"] == "already_applied"
        })
        .await;

        // 5. unlock (admin API): everything reachable again.
        let u = admin.unlock_agent("probe", "ct").await.unwrap();
        assert_eq!(u.outcome, "applied", "{u:?}");
        assert_eq!(reach(&live, &targets).await, reachable_from_agent_net());

        // 6. clawkerd's port answers the CP only: a neighbour on clawker-net
        //    reaches a port the agent opens, but never clawkerd (no TLS
        //    byte back, no handshake in clawkerd's log).
        let agent_ip = cp1.inspect.inspect(&id).await.unwrap().ip.unwrap();
        let listener = {
            let live = live.clone();
            tokio::spawn(
                async move { sh(&live, &agent_user(), "nc -l -p 7799 </dev/null", 30).await },
            )
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        let neighbour_probe = |script: String| {
            docker_cli(&[
                "run",
                "--rm",
                "--label",
                &format!("dev.clawker.test={LABEL}"),
                "--network",
                AGENT_NET,
                "--entrypoint",
                "/bin/sh",
                &image(),
                "-c",
                &script,
            ])
            .unwrap()
        };
        let to_clawkerd =
            format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {agent_ip} 7700 | wc -c");
        let neighbour = neighbour_probe(format!(
            "echo hello-7799 | nc -w 3 {agent_ip} 7799; {to_clawkerd}"
        ));
        let got = tokio::time::timeout(Duration::from_secs(20), listener)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(
            got.1, "hello-7799",
            "the neighbour reaches the agent: {neighbour}"
        );
        assert_eq!(
            neighbour.trim(),
            "0",
            "clawkerd's port sent the neighbour nothing"
        );
        let log = clawker::defaults::agent_paths::LOG_FILE;
        // Quoted JSON keys, so the logged argv of this very command
        // (JSON-escaped) does not match.
        let rejected = format!("grep -c '\"event\":\"tls_handshake_rejected\"' {log}; true");
        let (_, n, _) = sh(&live, &RunAs::root(), &rejected, 10).await.unwrap();
        assert_eq!(n, "0", "no neighbour handshake ever reached clawkerd");
        // The guard is what stops it: without its table the same probe gets
        // clawkerd's TLS alert back and clawkerd logs the refusal.
        let pid = cp1.inspect.inspect(&id).await.unwrap().pid.to_string();
        run(
            "nsenter",
            &[
                &format!("--net=/proc/{pid}/ns/net"),
                "nft",
                "delete",
                "table",
                "inet",
                "clawker_port",
            ],
        )
        .unwrap();
        let unguarded = neighbour_probe(to_clawkerd.clone());
        assert_ne!(
            unguarded.trim(),
            "0",
            "unguarded, clawkerd answers the neighbour"
        );
        let (_, n, _) = sh(&live, &RunAs::root(), &rejected, 10).await.unwrap();
        assert_eq!(n, "1", "and logs the refused handshake");

        // Stop and kill are unchanged (tests/policy_docker.rs): the CP
        // still owns a working session at the end.
        cp::stop(cp1).await;
    });
}

#[test]
fn an_untrusted_agent_is_quarantined_and_locked_again_after_a_container_restart() {
    use events::ContainmentAction as A;
    let _g = serial();
    let world = World::new(ContainmentConfig {
        rules: vec![Rule {
            on: TriggerKind::Untrusted,
            reasons: vec![],
            count: 1,
            window_secs: 60,
            actions: vec![A::Alert, A::Isolate, A::Lock],
        }],
        ..ContainmentConfig::default()
    });
    actix::System::new().block_on(async {
        let docker = clawker::docker::connect().await.unwrap();
        let cp1 = cp::start(&world.cfg).await.unwrap();
        let seen = record(&cp1.bus);
        let mut spec = world.spec("mallory");
        spec.mint_for_container = Some("deadbeef".into()); // a leaf for another container
        let id = cp::agent::run(&docker, &world.material(), &spec)
            .await
            .unwrap();
        let targets = [
            ("inet", INET_IP.to_owned(), INET_HTTP, "inet-ok"),
            ("host", cp1.gateway.to_string(), world.host_port, "host-ok"),
        ];
        let steps = |outcome: &'static str| {
            move |n: &str, j: &serde_json::Value| {
                n == "policy.containment.applied"
                    && j["action"] == "lock"
                    && j["outcome"] == outcome
            }
        };
        wait_event(&seen, &id, "locked", steps("applied")).await;
        let live = wait_session(&cp1, &seen, &id, NetworkRole::Quarantine, 0, false).await;
        assert_eq!(
            reach(&live, &targets).await,
            HashMap::from([("inet".into(), false), ("host".into(), false)])
        );
        let locks = count(&seen, &id, steps("applied"));

        // A restart is a new network namespace: the lock is gone with the
        // old one. The new session is untrusted again, the ladder re-runs:
        // quarantine still holds, the lock is installed afresh.
        let mark = seen.lock().unwrap().len();
        docker
            .restart_container(
                &id,
                None::<bollard::query_parameters::RestartContainerOptions>,
            )
            .await
            .unwrap();
        let live = wait_session(&cp1, &seen, &id, NetworkRole::Quarantine, mark, false).await;
        let deadline = Instant::now() + Duration::from_secs(30);
        while count(&seen, &id, steps("applied")) == locks {
            assert!(
                Instant::now() < deadline,
                "lock not re-applied after the restart"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            seen.lock()
                .unwrap()
                .iter()
                .skip(mark)
                .any(|(n, j)| n == "policy.containment.applied"
                    && j["container_id"] == id
                    && j["action"] == "isolate"
                    && j["outcome"] == "already_applied"),
            "quarantine survived the restart"
        );
        let pid = cp1.inspect.inspect(&id).await.unwrap().pid.to_string();
        let table = run(
            "nsenter",
            &[
                &format!("--net=/proc/{pid}/ns/net"),
                "nft",
                "list",
                "table",
                "inet",
                "clawker_lock",
            ],
        )
        .unwrap();
        assert!(table.contains("clawker-lock v1"), "{table}");
        assert_eq!(
            reach(&live, &targets).await,
            HashMap::from([("inet".into(), false), ("host".into(), false)])
        );
        let (code, out, _) = sh(&live, &RunAs::root(), "echo contained", 10)
            .await
            .unwrap();
        assert_eq!((code, out.as_str()), (0, "contained"));
        cp::stop(cp1).await;
    });
}

// ---- the hardened container ---------------------------------------------------

/// Waits for init to end either way; `Ok` = completed, `Err(event)` = failed.
async fn init_outcome(seen: &Seen, id: &str) -> Result<(), serde_json::Value> {
    let ev = wait_event(seen, id, "init outcome", |n, _| {
        n == "agent.init.completed" || n == "agent.init.failed"
    })
    .await;
    if count(seen, id, |n, _| n == "agent.init.completed") > 0 {
        Ok(())
    } else {
        Err(ev)
    }
}

#[test]
fn hardened_agent_runs_its_init_and_its_user_cannot_regain_a_dropped_capability() {
    let _g = serial();
    let world = World::new(ContainmentConfig::default());
    let workspace = tempfile::tempdir().unwrap();
    actix::System::new().block_on(async {
        let docker = clawker::docker::connect().await.unwrap();
        let cp1 = cp::start(&world.cfg).await.unwrap();
        let seen = record(&cp1.bus);
        let mut spec = world.spec("hard");
        spec.env = vec!["FOO=bar baz".into()];
        spec.hardening.workspace = Some(workspace.path().to_owned());
        let id = cp::agent::run(&docker, &world.material(), &spec).await.unwrap();
        // The whole init plan runs with a read-only root and six caps.
        init_outcome(&seen, &id).await.unwrap();

        let host = docker_cli(&[
            "inspect",
            "-f",
            "{{json .HostConfig.CapDrop}} {{json .HostConfig.CapAdd}} {{json .HostConfig.SecurityOpt}} \
             {{.HostConfig.PidsLimit}} {{.HostConfig.Memory}} {{.HostConfig.ReadonlyRootfs}}",
            &id,
        ])
        .unwrap();
        assert_eq!(
            host,
            r#"["ALL"] ["SETUID","SETGID","KILL","CHOWN","FOWNER","DAC_READ_SEARCH"] ["no-new-privileges"] 1024 4294967296 true"#
        );

        let live = wait_session_on(&cp1, &seen, &id, NetworkRole::Agent, 0).await;
        let (code, out, err) = sh(
            &live,
            &agent_user(),
            "grep -E '^(CapInh|CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs|Seccomp):' /proc/self/status | tr -s '\\t ' ' '
             echo uid=$(id -u)
             touch /etc/x 2>/dev/null && echo rootfs-writable || echo rootfs-ro
             echo x > /tmp/t && echo tmp-ok
             touch \"$HOME/h\" && echo home-ok
             touch /workspace/from-agent && echo workspace-ok
             echo \"FOO=$FOO\"
             chown 0 /tmp/t 2>/dev/null && echo chown-ok || echo chown-eperm
             mknod /tmp/n c 1 3 2>/dev/null && echo mknod-ok || echo mknod-eperm
             ping -c1 -W1 127.0.0.1 >/dev/null 2>&1 && echo raw-ok || echo raw-eperm
             arping -c1 -w1 -I eth0 127.0.0.1 >/dev/null 2>&1 && echo packet-ok || echo packet-eperm",
            20,
        )
        .await
        .unwrap();
        assert_eq!(code, 0, "{err}");
        let lines: Vec<&str> = out.lines().map(str::trim).collect();
        for want in [
            "CapInh: 0000000000000000",
            "CapPrm: 0000000000000000",
            "CapEff: 0000000000000000",
            // The bounding set: SETUID|SETGID|KILL|FOWNER|DAC_READ_SEARCH|
            // CHOWN and nothing else, so no exec (setuid binary, file capabilities) can ever
            // grant more.
            "CapBnd: 00000000000000ed",
            "CapAmb: 0000000000000000",
            // And no exec can grant anything at all.
            "NoNewPrivs: 1",
            "uid=1001",
            "rootfs-ro",
            "tmp-ok",
            "home-ok",
            "workspace-ok",
            "FOO=bar baz",
            "chown-eperm",
            "mknod-eperm",
            "raw-eperm",
            "packet-eperm",
        ] {
            assert!(lines.contains(&want), "missing {want:?} in {lines:?}");
        }
        // Root in the container (clawkerd and its root steps) holds exactly
        // the six kept capabilities and cannot write the root either.
        let (_, root, _) = sh(
            &live,
            &RunAs::root(),
            "grep -E '^CapEff:' /proc/self/status | tr -s '\\t ' ' '; touch /etc/x 2>/dev/null && echo rootfs-writable || echo rootfs-ro",
            10,
        )
        .await
        .unwrap();
        assert_eq!(root.lines().map(str::trim).collect::<Vec<_>>(), ["CapEff: 00000000000000ed", "rootfs-ro"]);
        // The workspace is the host directory, owned by the agent user.
        use std::os::unix::fs::MetadataExt;
        let md = std::fs::metadata(workspace.path().join("from-agent")).unwrap();
        assert_eq!(md.uid(), 1001);
        cp::stop(cp1).await;
    });
}

#[test]
fn each_capability_clawkerd_keeps_is_needed() {
    let _g = serial();
    let world = World::new(ContainmentConfig::default());
    actix::System::new().block_on(async {
        let docker = clawker::docker::connect().await.unwrap();
        let cp1 = cp::start(&world.cfg).await.unwrap();
        let seen = record(&cp1.bus);
        let without = |cap: &str, name: &str| {
            let mut spec = world.spec(name);
            spec.hardening.caps.retain(|c| c != cap);
            spec
        };
        // SETUID and SETGID: without either, clawkerd cannot drop to the
        // agent user, so the first user step of init fails with EPERM.
        for (cap, name) in [("SETUID", "nosetuid"), ("SETGID", "nosetgid")] {
            let id = cp::agent::run(&docker, &world.material(), &without(cap, name))
                .await
                .unwrap();
            let failed = init_outcome(&seen, &id).await.unwrap_err();
            assert_eq!(failed["failed_step"], "config", "{cap}: {failed}");
            let detail = failed["detail"]
                .as_str()
                .unwrap_or_default()
                .to_ascii_lowercase();
            assert!(
                detail.contains("not permitted") || detail.contains("os error 1"),
                "{cap}: {failed}"
            );
        }
        // KILL: without it clawkerd cannot signal the agent user's process
        // group, so a timed-out command runs to its end instead of dying.
        let timed_out_survives = |id: String, file: &'static str| {
            let (cp, seen) = (&cp1, &seen);
            async move {
                init_outcome(seen, &id).await.unwrap();
                let live = wait_session_on(cp, seen, &id, NetworkRole::Agent, 0).await;
                let r = sh(
                    &live,
                    &agent_user(),
                    &format!("sleep 3; touch /tmp/{file}"),
                    1,
                )
                .await;
                assert!(
                    matches!(
                        r,
                        Err(RunError::Remote {
                            code: clawker::proto::clawkerd::v1::ErrorCode::Timeout,
                            ..
                        })
                    ),
                    "{r:?}"
                );
                // clawkerd answers only once the command's processes are
                // gone, so the file tells whether the kill happened.
                let (_, out, _) = sh(
                    &live,
                    &RunAs::root(),
                    &format!("test -e /tmp/{file} && echo survived || echo killed"),
                    10,
                )
                .await
                .unwrap();
                out
            }
        };
        let nokill = cp::agent::run(&docker, &world.material(), &without("KILL", "nokill"))
            .await
            .unwrap();
        assert_eq!(timed_out_survives(nokill, "a").await, "survived");
        let full = cp::agent::run(&docker, &world.material(), &world.spec("withkill"))
            .await
            .unwrap();
        assert_eq!(timed_out_survives(full, "b").await, "killed");
        // CHOWN and FOWNER: what `agent cp` does to a file it unpacks as
        // root (owner first, then mode and mtime on a file root no longer
        // owns) fails without either; DAC_READ_SEARCH: packing a file only
        // its owner may read (copying out) fails without it.
        let keep_owner = "echo x > /tmp/f && chown 1001:1001 /tmp/f && chmod 600 /tmp/f && touch -d 2020-01-01 /tmp/f && cat /tmp/f >/dev/null && echo kept";
        for (cap, name) in [
            ("CHOWN", "nochown"),
            ("FOWNER", "nofowner"),
            ("DAC_READ_SEARCH", "nodacread"),
        ] {
            let id = cp::agent::run(&docker, &world.material(), &without(cap, name))
                .await
                .unwrap();
            init_outcome(&seen, &id).await.unwrap();
            let live = wait_session_on(&cp1, &seen, &id, NetworkRole::Agent, 0).await;
            let (code, out, _) = sh(&live, &RunAs::root(), keep_owner, 10).await.unwrap();
            assert_ne!((code, out.trim()), (0, "kept"), "{cap}");
        }
        let full = cp::agent::run(&docker, &world.material(), &world.spec("withowner"))
            .await
            .unwrap();
        init_outcome(&seen, &full).await.unwrap();
        let live = wait_session_on(&cp1, &seen, &full, NetworkRole::Agent, 0).await;
        let (code, out, err) = sh(&live, &RunAs::root(), keep_owner, 10).await.unwrap();
        assert_eq!((code, out.trim()), (0, "kept"), "{err}");
        cp::stop(cp1).await;
    });
}
