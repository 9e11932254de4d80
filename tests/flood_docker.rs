//! Listeners that survive a hostile agent, on a real Docker engine.
//!
//! A real CP process (`clawker cp serve`: its descriptors and memory are its
//! own), real agent containers from the locally built image. The attackers'
//! traffic is sent from inside the attacking agents' network namespaces
//! (`tests/common/flood.rs`), so it carries their addresses. While
//! `mallory` floods the agent listener (idle TLS connections) and
//! `victim`'s clawkerd (a handshake storm), and `eve` sends slowloris token
//! requests (from a source of its own: from mallory's, the per-source cap
//! would refuse nearly all of them while mallory's idle connections hold
//! its slots, and the test would prove nothing about the request bounds):
//!
//! - `clawker status` keeps answering;
//! - a new agent (`nova`) registers and completes init;
//! - the attacked clawkerd still accepts the CP (its session is cut and the
//!   CP reconnects);
//! - an agent (`dora`) whose dial fails for a whole connect budget (its
//!   :7700 refuses new connections; no Docker event follows) is dialed again
//!   by the redial reconciler once it is reachable.
//!
//! And the flood is refused rather than absorbed: the attacker never holds
//! more than the per-source cap, the CP counts the refusals, every
//! connection the attacker holds is closed within the idle/body bounds,
//! the CP's and clawkerd's rejection logs are rate-limited, and after the
//! flood the CP's RSS is back within 20 % of its idle size.
//!
//! This CI form is short (smaller numbers, bounds of a few seconds).
//! `scripts/flood.sh` runs it with the numbers and the default
//! bounds (`CLAWKER_FLOOD_FULL=1`) and prints the same measurements. With
//! `CLAWKER_FLOOD_BASELINE=1` (and `CLAWKER_FLOOD_CP_BIN`, an older
//! `clawker` binary; `CLAWKER_TEST_IMAGE`, its agent image) it measures a
//! build without these bounds the same way and checks nothing: the
//! "before" column.
//!
//! A missing engine is a failure, not a skip. Uses networks
//! `clawker-flood-e2e` (10.223.1.0/24) and `clawker-flood-e2e-q` (the CP's
//! quarantine network, 10.223.2.0/24); removes its containers, networks and
//! the quarantine bridge's host guard on drop.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clawker::cp::agent::RunSpec;
use clawker::identity::{AgentName, ProjectSlug};
use clawker::pki::AuthMaterial;
use common::flood::{self, FloodStats};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

const NETWORK: &str = "clawker-flood-e2e";
const SUBNET: &str = "10.223.1.0/24";
/// The CP's quarantine network (nobody is quarantined here, but `cp serve`
/// ensures it at start).
const QUARANTINE_NETWORK: &str = "clawker-flood-e2e-q";
const QUARANTINE_SUBNET: &str = "10.223.2.0/24";
const AGENT_PORT: u16 = 7444;

fn image() -> String {
    std::env::var("CLAWKER_TEST_IMAGE").unwrap_or_else(|_| "clawker-agent:latest".into())
}

/// The flood's size and the bounds the CP runs with.
struct Scale {
    full: bool,
    /// Measure an older build; assert nothing.
    baseline: bool,
    idle_workers: usize,
    slowloris_workers: usize,
    storm_workers: usize,
    /// The flood lasts at least this long.
    min_flood: Duration,
    /// Pause of an attacker worker between two connections.
    attacker_pause: Duration,
    /// cp.toml for this run.
    cp_toml: &'static str,
    /// The bounds in that cp.toml (the defaults in full mode).
    per_source_cap: i64,
    idle_timeout: Duration,
    body_timeout: Duration,
    connect_budget: Duration,
}

fn flag(name: &str) -> bool {
    std::env::var(name).as_deref() == Ok("1")
}

fn scale() -> Scale {
    let baseline = flag("CLAWKER_FLOOD_BASELINE");
    if baseline || flag("CLAWKER_FLOOD_FULL") {
        let d = clawker::listen::ListenerLimits::AGENT_API;
        Scale {
            full: true,
            baseline,
            idle_workers: 5000,
            slowloris_workers: 200,
            storm_workers: 2000,
            // `CLAWKER_FLOOD_SECS` shortens (or lengthens) the full run.
            min_flood: Duration::from_secs(
                std::env::var("CLAWKER_FLOOD_SECS")
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(60),
            ),
            attacker_pause: Duration::from_secs(1),
            // Default listener bounds; a short connect budget so the dial
            // failure happens within the run; the default redial period.
            cp_toml: if baseline {
                // An older CP knows none of these keys.
                ""
            } else {
                "[sessions]\nconnect_budget_secs = 5\n"
            },
            per_source_cap: d.max_connections_per_source as i64,
            idle_timeout: d.idle_timeout,
            body_timeout: clawker::agent_api::token::BODY_READ_TIMEOUT,
            connect_budget: Duration::from_secs(5),
        }
    } else {
        Scale {
            full: false,
            baseline: false,
            idle_workers: 300,
            slowloris_workers: 40,
            storm_workers: 200,
            min_flood: Duration::from_secs(8),
            attacker_pause: Duration::from_millis(200),
            cp_toml: "[agent_listener]\nmax_connections_per_source = 32\nhandshake_timeout_secs = 3\n\
                      idle_timeout_secs = 3\nbody_read_timeout_secs = 3\n\
                      [sessions]\nredial_interval_secs = 1\nconnect_budget_secs = 3\n",
            per_source_cap: 32,
            idle_timeout: Duration::from_secs(3),
            body_timeout: Duration::from_secs(3),
            connect_budget: Duration::from_secs(3),
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn sh(cmd: &str, args: &[&str]) -> (bool, String) {
    match Command::new(cmd).args(args).output() {
        Ok(o) => (
            o.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
        ),
        Err(e) => (false, e.to_string()),
    }
}

/// Everything the test creates, removed on drop (even on failure).
struct Env {
    label: String,
    state: tempfile::TempDir,
    cp: Option<Child>,
}

impl Env {
    fn new() -> Self {
        let state = tempfile::tempdir().unwrap();
        AuthMaterial::ensure(state.path()).unwrap();
        let env = Self {
            label: format!("flood-{}", std::process::id()),
            state,
            cp: None,
        };
        env.cleanup_docker();
        env
    }

    fn cleanup_docker(&self) {
        // Leftovers of this or a crashed earlier run of this test.
        let (_, ids) = sh(
            "docker",
            &["ps", "-aq", "--filter", "label=dev.clawker.test.flood=1"],
        );
        let ids: Vec<&str> = ids.split_whitespace().collect();
        if !ids.is_empty() {
            let mut args = vec!["rm", "-f"];
            args.extend(ids);
            sh("docker", &args);
        }
        // The quarantine bridge's host guard goes with its network.
        let (ok, id) = sh(
            "docker",
            &["network", "inspect", "-f", "{{.Id}}", QUARANTINE_NETWORK],
        );
        let id = id.trim();
        if ok && !id.is_empty() {
            let bridge = format!("br-{}", &id[..12.min(id.len())]);
            // Its own thread and runtime: this also runs on drop, inside
            // the test's runtime.
            let _ = std::thread::spawn(move || {
                if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    let _ = rt.block_on(clawker::netns::unguard_bridge(
                        &bridge,
                        Duration::from_secs(10),
                    ));
                }
            })
            .join();
        }
        sh("docker", &["network", "rm", NETWORK]);
        sh("docker", &["network", "rm", QUARANTINE_NETWORK]);
    }

    fn spec(&self, name: &str) -> RunSpec {
        RunSpec {
            agent: AgentName::new(name).unwrap(),
            project: ProjectSlug::new("flood").unwrap(),
            image: image(),
            network: NETWORK.into(),
            agent_port: AGENT_PORT,
            command: vec![],
            env: vec![],
            hardening: Default::default(),
            extra_labels: HashMap::from([
                ("dev.clawker.test".to_owned(), self.label.clone()),
                ("dev.clawker.test.flood".to_owned(), "1".to_owned()),
            ]),
            extra_networks: vec![],
            mint_for_container: None,
            cert_ttl: clawker::cp::config::DEFAULT_AGENT_CERT_TTL,
            placement: vec![],
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some(mut cp) = self.cp.take() {
            // SAFETY: kill with plain integers.
            unsafe { libc::kill(cp.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = cp.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = cp.kill();
            let _ = cp.wait();
        }
        self.cleanup_docker();
    }
}

type Seen = Arc<Mutex<Vec<(String, serde_json::Value)>>>;

fn count(seen: &Seen, id: &str, name: &str) -> usize {
    seen.lock()
        .unwrap()
        .iter()
        .filter(|(n, j)| n == name && j["container_id"] == id)
        .count()
}

fn last(seen: &Seen, id: &str, name: &str) -> Option<serde_json::Value> {
    seen.lock()
        .unwrap()
        .iter()
        .rev()
        .find(|(n, j)| n == name && j["container_id"] == id)
        .map(|(_, j)| j.clone())
}

async fn wait_for(seen: &Seen, id: &str, name: &str, n: usize, secs: u64) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while count(seen, id, name) < n {
        if Instant::now() > deadline {
            let names: Vec<String> = seen
                .lock()
                .unwrap()
                .iter()
                .filter(|(_, j)| j["container_id"] == id)
                .map(|(n, _)| n.clone())
                .collect();
            return Err(format!(
                "timed out waiting for {n}× {name} on {id}; saw {names:?}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// A step of the scenario: must succeed, except when measuring a baseline
/// (which reports what failed instead).
fn must(sc: &Scale, r: Result<(), String>, failures: &mut Vec<String>) -> bool {
    match r {
        Ok(()) => true,
        Err(e) if sc.baseline => {
            failures.push(e);
            false
        }
        Err(e) => panic!("{e}"),
    }
}

/// The CP's resident set (kB) and open descriptors.
fn cp_usage(pid: u32) -> (u64, usize) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0);
    (rss, fds)
}

/// `name{labels…} value` from the CP's Prometheus endpoint (0 if absent).
fn metric(metrics: SocketAddr, name: &str, labels: &[(&str, &str)]) -> f64 {
    let Ok(mut s) = std::net::TcpStream::connect(metrics) else {
        return 0.0;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n");
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// `clawker status` as a user runs it: (succeeded, wall time).
fn status(state: &Path, admin: SocketAddr) -> (bool, Duration) {
    let t0 = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_clawker"))
        .arg("--state-dir")
        .arg(state)
        .args(["--admin-addr", &admin.to_string(), "status"])
        .output()
        .unwrap();
    (out.status.success(), t0.elapsed())
}

fn nsenter(pid: u32, args: &[&str]) {
    let pid = pid.to_string();
    let mut all = vec!["-t", pid.as_str(), "-n"];
    all.extend_from_slice(args);
    let (ok, out) = sh("nsenter", &all);
    assert!(ok, "nsenter {args:?}: {out}");
}

/// Cuts every established connection to :7700 in a container's namespace
/// (the kernel sends an RST to the CP's side).
fn cut_sessions(pid: u32) {
    nsenter(
        pid,
        &["ss", "-K", "state", "established", "( sport = :7700 )"],
    );
}

/// clawkerd's log size in bytes (inside the container).
fn clawkerd_log_bytes(id: &str) -> u64 {
    let (_, out) = sh(
        "docker",
        &[
            "exec",
            id,
            "sh",
            "-c",
            "cat /var/lib/clawker/log/clawkerd.log* | wc -c",
        ],
    );
    out.trim().parse().unwrap_or(0)
}

fn clawkerd_log(id: &str) -> Vec<serde_json::Value> {
    let (_, out) = sh(
        "docker",
        &["exec", id, "cat", "/var/lib/clawker/log/clawkerd.log"],
    );
    out.lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn p50(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flooding_agent_is_refused_and_the_cp_keeps_serving() {
    let docker = match clawker::docker::connect().await {
        Ok(d) => d,
        Err(e) if std::env::var("CLAWKER_SKIP_DOCKER").as_deref() == Ok("1") => {
            eprintln!("skipping (CLAWKER_SKIP_DOCKER=1): {e}");
            return;
        }
        Err(e) => panic!("the Docker e2e suite needs an engine: {e}"),
    };
    let sc = scale();
    let mut env = Env::new();
    let state = env.state.path().to_owned();
    let material = AuthMaterial::load(&state).unwrap();
    let net = clawker::docker::network::ensure(&docker, NETWORK, SUBNET)
        .await
        .unwrap();

    // ---- the CP, as a process of its own ------------------------------
    let cfg_path = state.join("cp.toml");
    std::fs::write(&cfg_path, sc.cp_toml).unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let cp_log = state.join("cp.log");
    let cp_bin = std::env::var("CLAWKER_FLOOD_CP_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_clawker").to_owned());
    let cp = Command::new(cp_bin)
        .arg("--state-dir")
        .arg(&state)
        .args([
            "--admin-addr",
            &admin.to_string(),
            "cp",
            "serve",
            "--config",
        ])
        .arg(&cfg_path)
        .args(["--network", NETWORK, "--subnet", SUBNET])
        .args([
            "--quarantine-network",
            QUARANTINE_NETWORK,
            "--quarantine-subnet",
            QUARANTINE_SUBNET,
        ])
        .args([
            "--metrics-addr",
            &metrics.to_string(),
            "--log-format",
            "json",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&cp_log).unwrap())
        .spawn()
        .unwrap();
    let cp_pid = cp.id();
    env.cp = Some(cp);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !status(&state, admin).0 {
        assert!(
            Instant::now() < deadline,
            "CP did not come up: {}",
            std::fs::read_to_string(&cp_log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let client = clawker::admin_api::AdminClient::connect(&state, admin)
        .await
        .unwrap();
    let seen: Seen = Arc::default();
    {
        let mut events = client.watch_events(vec![]).await.unwrap();
        let seen = seen.clone();
        tokio::spawn(async move {
            while let Some(Ok(e)) = events.next().await {
                let json = serde_json::from_str(&e.json).unwrap_or_default();
                seen.lock().unwrap().push((e.name, json));
            }
        });
    }

    // ---- three agents: the attacker, its victim, and dora --------------
    let mut ids = HashMap::new();
    for name in ["mallory", "eve", "victim", "dora"] {
        let id = clawker::cp::agent::run(&docker, &material, &env.spec(name))
            .await
            .unwrap();
        ids.insert(name, id);
    }
    for id in ids.values() {
        wait_for(&seen, id, "agent.init.completed", 1, 60)
            .await
            .unwrap();
    }
    let mut failures = Vec::new();
    let networks = clawker::docker::engine::AgentNetworks {
        agent: NETWORK.into(),
        quarantine: QUARANTINE_NETWORK.into(),
        quarantine_subnet: QUARANTINE_SUBNET.into(),
    };
    let facts = |id: String| {
        let (docker, networks) = (docker.clone(), networks.clone());
        async move {
            clawker::docker::engine::inspect_on(&docker, &id, &networks)
                .await
                .unwrap()
        }
    };
    let mallory = facts(ids["mallory"].clone()).await;
    let eve = facts(ids["eve"].clone()).await;
    let victim = facts(ids["victim"].clone()).await;
    let dora = facts(ids["dora"].clone()).await;
    let victim_addr = SocketAddr::new(victim.ip.unwrap(), 7700);
    let agent_api = SocketAddr::new(net.gateway, AGENT_PORT);

    // Idle baseline, after the agents settled.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (idle_rss, idle_fds) = cp_usage(cp_pid);

    // ---- the flood, from mallory's and eve's network namespaces ---------
    let stop = CancellationToken::new();
    let (idle, slow, storm) = (
        Arc::new(FloodStats::default()),
        Arc::new(FloodStats::default()),
        Arc::new(FloodStats::default()),
    );
    let ca = material.ca.cert_pem().as_bytes().to_vec();
    let attacker = {
        let (stop, idle, storm) = (stop.clone(), idle.clone(), storm.clone());
        let (iw, hw, pause) = (sc.idle_workers, sc.storm_workers, sc.attacker_pause);
        let ca = ca.clone();
        flood::in_netns(mallory.pid, move || async move {
            let h2 = flood::attacker_tls(&ca, &[b"h2"]);
            tokio::join!(
                flood::idle_tls(agent_api, iw, h2.clone(), pause, idle, stop.clone()),
                flood::handshake_storm(victim_addr, hw, h2, pause, storm, stop.clone()),
            );
        })
    };
    let slow_attacker = {
        let (stop, slow) = (stop.clone(), slow.clone());
        let sw = sc.slowloris_workers;
        flood::in_netns(eve.pid, move || async move {
            let h1 = flood::attacker_tls(&ca, &[b"http/1.1"]);
            flood::slowloris(agent_api, sw, h1, Duration::from_millis(500), slow, stop).await;
        })
    };
    let flood_started = Instant::now();

    // Sample the CP while everything below runs.
    let sampling = CancellationToken::new();
    let sampler = {
        let sampling = sampling.clone();
        tokio::spawn(async move {
            let (mut max_rss, mut max_fds) = (0u64, 0usize);
            while !sampling.is_cancelled() {
                let (rss, fds) = cp_usage(cp_pid);
                max_rss = max_rss.max(rss);
                max_fds = max_fds.max(fds);
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            (max_rss, max_fds)
        })
    };
    let status_probe = {
        let (sampling, state) = (sampling.clone(), state.clone());
        tokio::task::spawn_blocking(move || {
            let mut runs = Vec::new();
            while !sampling.is_cancelled() {
                runs.push(status(&state, admin));
                std::thread::sleep(Duration::from_millis(500));
            }
            runs
        })
    };
    // Let the flood build up (and the rate limiter's first burst pass: the
    // log rate below is the sustained one).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let victim_log_before = clawkerd_log_bytes(&ids["victim"]);
    let log_window_start = Instant::now();

    // A new agent registers and completes init during the flood.
    let nova = clawker::cp::agent::run(&docker, &material, &env.spec("nova"))
        .await
        .unwrap();
    let nova_at = Instant::now();
    let r = wait_for(&seen, &nova, "agent.registered", 1, 60).await;
    if must(&sc, r, &mut failures) {
        assert_eq!(last(&seen, &nova, "agent.registered").unwrap()["ok"], true);
    }
    let r = wait_for(&seen, &nova, "agent.init.completed", 1, 60).await;
    must(&sc, r, &mut failures);
    let nova_init = nova_at.elapsed();

    // The attacked clawkerd still accepts the CP: cut the session, watch
    // the CP reconnect.
    cut_sessions(victim.pid);
    let r = wait_for(&seen, &ids["victim"], "agent.session.connected", 2, 60).await;
    must(&sc, r, &mut failures);

    // dora's :7700 refuses new connections for longer than the connect
    // budget: its session fails for good, and no Docker event follows...
    let block = [
        "iptables",
        "-I",
        "INPUT",
        "-p",
        "tcp",
        "--dport",
        "7700",
        "--syn",
        "-j",
        "REJECT",
        "--reject-with",
        "tcp-reset",
    ];
    nsenter(dora.pid, &block);
    cut_sessions(dora.pid);
    // (An older CP has a fixed 60 s budget.)
    let budget = if sc.baseline {
        60
    } else {
        sc.connect_budget.as_secs()
    };
    let r = wait_for(&seen, &ids["dora"], "agent.session.failed", 1, budget + 30).await;
    if must(&sc, r, &mut failures) {
        let failed = last(&seen, &ids["dora"], "agent.session.failed").unwrap();
        assert_eq!(failed["reason"], "connect_total_timeout", "{failed}");
    }
    let mut unblock = block;
    unblock[1] = "-D";
    nsenter(dora.pid, &unblock);
    // ...so only the reconciler can dial it again.
    let reachable_at = Instant::now();
    let r = wait_for(&seen, &ids["dora"], "agent.session.connected", 2, 60).await;
    let redialed_after = must(&sc, r, &mut failures).then(|| reachable_at.elapsed());

    // Keep the flood on for its minimum duration.
    if let Some(rest) = sc.min_flood.checked_sub(flood_started.elapsed()) {
        tokio::time::sleep(rest).await;
    }
    let flood_secs = flood_started.elapsed().as_secs_f64();
    let victim_log_during = clawkerd_log_bytes(&ids["victim"]);
    let log_window = log_window_start.elapsed().as_secs_f64();
    let held_during = (
        idle.held_now.load(Ordering::Relaxed),
        slow.held_now.load(Ordering::Relaxed),
    );
    stop.cancel();
    attacker.join().unwrap();
    slow_attacker.join().unwrap();
    sampling.cancel();
    let (max_rss, max_fds) = sampler.await.unwrap();
    let status_runs = status_probe.await.unwrap();

    // ---- after the flood ------------------------------------------------
    // Every connection the attacker held is gone once the bounds expire.
    tokio::time::sleep(sc.idle_timeout.max(sc.body_timeout) + Duration::from_secs(2)).await;
    let (after_rss, after_fds) = cp_usage(cp_pid);
    let refused_source = metric(
        metrics,
        "clawker_listener_refused_total",
        &[("listener", "agent_api"), ("reason", "source_cap")],
    );
    let cp_log = std::fs::read_to_string(&cp_log).unwrap_or_default();
    let cp_lines = |event: &str| {
        cp_log
            .lines()
            .filter(|l| l.contains(&format!("\"event\":\"{event}\"")))
            .count()
    };
    let victim_lines = clawkerd_log(&ids["victim"]);
    let suppressed: u64 = victim_lines
        .iter()
        .filter(|l| l["event"] == "log_suppressed")
        .filter_map(|l| l["suppressed"].as_u64())
        .sum();
    let rejection_lines = victim_lines
        .iter()
        .filter(|l| l["event"] == "tls_handshake_rejected" || l["event"] == "connection_refused")
        .count();
    let status_ok = status_runs.iter().filter(|(ok, _)| *ok).count();
    let status_max = status_runs
        .iter()
        .map(|(_, d)| *d)
        .max()
        .unwrap_or_default();
    let status_p50 = p50(status_runs.iter().map(|(_, d)| *d).collect());
    let log_rate = (victim_log_during.saturating_sub(victim_log_before)) as f64 / log_window;

    eprintln!(
        "flood ({}) over {flood_secs:.1}s",
        if sc.full { "full" } else { "ci" }
    );
    eprintln!(
        "  idle TLS   ({} workers): {}",
        sc.idle_workers,
        idle.summary()
    );
    eprintln!(
        "  slowloris  ({} workers): {}",
        sc.slowloris_workers,
        slow.summary()
    );
    eprintln!(
        "  clawkerd   ({} workers): {}",
        sc.storm_workers,
        storm.summary()
    );
    eprintln!(
        "  held by the attacker at the end of the flood: idle {} slowloris {}",
        held_during.0, held_during.1
    );
    eprintln!("  CP refused (source cap): {refused_source}");
    eprintln!("  CP RSS kB: idle {idle_rss}, max during {max_rss}, after {after_rss}");
    eprintln!("  CP fds: idle {idle_fds}, max during {max_fds}, after {after_fds}");
    eprintln!(
        "  clawker status: {status_ok}/{} ok, p50 {status_p50:?}, max {status_max:?}",
        status_runs.len()
    );
    eprintln!(
        "  CP log: accept_failed {}, agent_api_connection_refused {}, log_suppressed {}",
        cp_lines("accept_failed"),
        cp_lines("agent_api_connection_refused"),
        cp_lines("log_suppressed")
    );
    eprintln!(
        "  victim clawkerd log: {log_rate:.0} B/s sustained during the flood, {rejection_lines} rejection lines, {suppressed} suppressed"
    );
    let mut by_event: std::collections::BTreeMap<String, usize> = Default::default();
    for l in &victim_lines {
        *by_event
            .entry(l["event"].as_str().unwrap_or("-").to_owned())
            .or_default() += 1;
    }
    eprintln!("  victim clawkerd log lines by event: {by_event:?}");
    if let Some(l) = victim_lines
        .iter()
        .find(|l| l["event"] == "tls_handshake_rejected")
    {
        eprintln!("  a rejection line ({} B): {l}", l.to_string().len());
    }
    eprintln!("  nova registered and initialised {nova_init:?} after its start");
    eprintln!("  dora redialed {redialed_after:?} after it became reachable");
    for f in &failures {
        eprintln!("  FAILED: {f}");
    }
    if sc.baseline {
        return;
    }

    // The admin API kept answering (a user-facing check; the latency is
    // reported above; the script's full run holds it to the 1 s).
    assert!(!status_runs.is_empty());
    if sc.full {
        assert!(
            status_max <= Duration::from_secs(1),
            "clawker status took {status_max:?} during the flood"
        );
    }
    assert_eq!(
        status_ok,
        status_runs.len(),
        "clawker status failed during the flood"
    );
    // Refused, not absorbed.
    let cap = sc.per_source_cap;
    assert!(
        idle.held_max.load(Ordering::Relaxed) <= cap,
        "{}",
        idle.summary()
    );
    assert!(
        slow.held_max.load(Ordering::Relaxed) <= cap,
        "{}",
        slow.summary()
    );
    assert!(
        idle.get(|s| &s.refused) > 0,
        "no idle connection was refused: {}",
        idle.summary()
    );
    assert!(refused_source > 0.0, "the CP counted no refusals");
    // Every held connection was closed by the server within its bound.
    let slack = Duration::from_secs(5);
    for (what, s, bound) in [
        ("idle", &idle, sc.idle_timeout),
        ("slowloris", &slow, sc.idle_timeout.max(sc.body_timeout)),
    ] {
        assert!(
            s.get(|s| &s.closed_by_server) > 0,
            "{what}: {}",
            s.summary()
        );
        let longest = Duration::from_millis(s.get(|s| &s.longest_hold_ms));
        assert!(
            longest <= bound + slack,
            "{what}: held {longest:?} (bound {bound:?})"
        );
    }
    // The CP raised its descriptor limit at start (and said so); no
    // descriptor exhaustion; nothing left behind.
    assert_eq!(cp_lines("nofile_limit"), 1);
    assert_eq!(cp_lines("accept_failed"), 0);
    assert!(
        after_fds <= idle_fds + 8,
        "fds: idle {idle_fds}, after {after_fds}"
    );
    assert!(
        after_rss * 10 <= idle_rss * 12,
        "RSS did not return within 20 %: idle {idle_rss} kB, after {after_rss} kB"
    );
    // Rate-limited logs: the CP's refusal lines and the victim's rejection
    // lines stay near one a second; the rest is counted, not written.
    let per_sec_budget = (clawker::log_limit::BURST as f64 + flood_secs * 2.0) as usize;
    assert!(cp_lines("agent_api_connection_refused") <= per_sec_budget);
    assert!(
        rejection_lines <= 2 * per_sec_budget,
        "{rejection_lines} rejection lines"
    );
    // The CP guards clawkerd's port in each agent's namespace (only the
    // CP's addresses), so the storm is normally dropped before the victim's
    // clawkerd sees a byte and it logs nothing; where the guard is missing,
    // clawkerd's own rate limit must have suppressed the rejections. The
    // log-rate bound below holds either way.
    assert!(
        suppressed > 0 || rejection_lines == 0,
        "{rejection_lines} rejection lines and nothing suppressed"
    );
    assert!(
        log_rate < 2048.0,
        "victim clawkerd log grew {log_rate:.0} B/s"
    );
    // The victim never opened a session for anyone but the CP.
    let sessions: Vec<&serde_json::Value> = victim_lines
        .iter()
        .filter(|l| l["event"] == "session_started")
        .collect();
    assert!(sessions.len() >= 2, "{sessions:?}");
    assert!(
        sessions
            .iter()
            .all(|l| l["peer_cn"] == clawker::identity::CONTROL_PLANE_CN),
        "{sessions:?}"
    );
}
