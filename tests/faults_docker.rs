//! The fault suite's short form on the real engine (issue 15 §1): each test
//! injects one fault into a running CP + agent and checks what the CP says
//! and does afterwards. `scripts/chaos.sh` runs the long form (more agents,
//! the private-engine faults).
//!
//! Docker resources: networks on 10.225.<n>.0/24 (quarantine
//! 10.225.<100+n>.0/24), containers labelled per test; all removed on drop.
//! Run under `flock /tmp/clawker-docker.lock` with
//! `CLAWKER_TEST_IMAGE=clawker-agent:<branch>`.

use clawker::cp;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod common;

use common::docker_env::{DockerEnv, test_image};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn docker_cli(args: &[&str]) -> Option<String> {
    let out = std::process::Command::new("docker")
        .args(args)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// One test's Docker world (`clawker-fx-<n>` on 10.225.<n>.0/24, its
/// quarantine network on 10.225.<100+n>.0/24), removed on drop.
fn fault_env(n: u8) -> DockerEnv {
    DockerEnv::with_quarantine(
        "clawker-fx",
        n,
        &format!("10.225.{n}.0/24"),
        &format!("10.225.{}.0/24", 100 + n),
        "127.0.0.1:0".parse().unwrap(),
    )
}

type Seen = Arc<Mutex<Vec<(Instant, String, serde_json::Value)>>>;

fn record(bus: &clawker::events::Bus) -> Seen {
    let seen: Seen = Arc::default();
    let mut sub = bus.subscribe_all().unwrap();
    let s = seen.clone();
    actix::spawn(async move {
        while let Some(e) = sub.recv().await {
            s.lock()
                .unwrap()
                .push((Instant::now(), e.name().to_owned(), e.to_json()));
        }
    });
    seen
}

fn events(seen: &Seen, id: &str, name: &str) -> Vec<(Instant, serde_json::Value)> {
    seen.lock()
        .unwrap()
        .iter()
        .filter(|(_, n, j)| n == name && j["container_id"] == id)
        .map(|(t, _, j)| (*t, j.clone()))
        .collect()
}

fn names(seen: &Seen, id: &str) -> Vec<String> {
    seen.lock()
        .unwrap()
        .iter()
        .filter(|(_, _, j)| j["container_id"] == id)
        .map(|(_, n, _)| n.clone())
        .collect()
}

/// Waits for the `n`th `name` event about `id`; returns when it was seen.
async fn wait_for(seen: &Seen, id: &str, name: &str, n: usize, secs: u64) -> Instant {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let got = events(seen, id, name);
        if got.len() >= n {
            return got[n - 1].0;
        }
        if Instant::now() > deadline {
            panic!(
                "timed out waiting for {n}× {name} on {id}; saw {:?}",
                names(seen, id)
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn docker_or_fail() -> bollard::Docker {
    clawker::docker::connect()
        .await
        .unwrap_or_else(|e| panic!("the fault suite needs a Docker engine: {e}"))
}

/// `GET path` on the CP's metrics listener: (status, body).
fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
        return (0, String::new());
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    );
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, out)
}

/// [`http_get`] for an in-process CP (its server shares this thread).
async fn http_get_async(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        return (0, String::new());
    };
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let _ = s.write_all(req.as_bytes()).await;
    let mut out = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out)).await;
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, out)
}

/// `clawker_sessions{status="<status>"}` from `/metrics`.
async fn sessions_gauge(addr: SocketAddr, status: &str) -> Option<f64> {
    let (_, body) = http_get_async(addr, "/metrics").await;
    let key = format!("clawker_sessions{{status=\"{status}\"}}");
    body.lines()
        .find_map(|l| l.strip_prefix(&key))
        .and_then(|v| v.trim().parse().ok())
}

/// Polls `check` every 20 ms for up to `limit`; returns how long it took.
async fn within(limit: Duration, what: &str, mut check: impl AsyncFnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    loop {
        if check().await {
            return t0.elapsed();
        }
        assert!(t0.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn session_status(cp: &cp::RunningCp, id: &str) -> String {
    let view = cp.bus.snapshot().await.unwrap();
    view.agents
        .get(id)
        .map(|a| {
            serde_json::to_value(a.session_status)
                .unwrap()
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .unwrap_or_default()
}

#[test]
fn docker_kill_ends_the_session_at_once_and_a_hup_does_not() {
    let _g = serial();
    let env = fault_env(1);
    actix::System::new().block_on(async {
        let docker = docker_or_fail().await;
        let cp1 = cp::start(&env.cfg).await.unwrap();
        let seen = record(&cp1.bus);
        // A user command that survives SIGHUP (clawkerd forwards it to the
        // command's process group; a command that dies of it ends the
        // container, and that is a real `die`).
        let mut spec = env.spec("kilo", "fx");
        spec.command = ["sh", "-c", "trap 'echo hup' HUP; while true; do sleep 1; done"]
            .map(String::from)
            .to_vec();
        let id = cp::agent::run(&docker, &env.material(), &spec)
            .await
            .unwrap();
        wait_for(&seen, &id, "agent.init.completed", 1, 60).await;
        let t = Instant::now();
        while sessions_gauge(cp1.metrics_addr, "connected").await != Some(1.0) {
            if t.elapsed() > Duration::from_secs(5) {
                let (status, body) = http_get_async(cp1.metrics_addr, "/metrics").await;
                panic!("metrics never said 1 connected session: {status}\n{body}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        // A non-fatal signal is not an end (Docker reports `kill`, no `die`).
        docker_cli(&["kill", "--signal=HUP", &id]).expect("docker kill --signal=HUP");
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let after_hup = names(&seen, &id);
        assert!(
            !after_hup.iter().any(|n| n.starts_with("agent.session.f")
                || n == "agent.session.broken"),
            "a HUP ended the session: {after_hup:?}"
        );
        assert_eq!(session_status(&cp1, &id).await, "connected");
        assert!(cp1.sessions.live(&id).await.is_some(), "session still live");

        // SIGKILL: one SessionFailed{container_not_running} at once, no
        // broken/reconnect, and the worldview and metrics follow.
        let t0 = Instant::now();
        docker_cli(&["kill", &id]).expect("docker kill");
        let failed_at = wait_for(&seen, &id, "agent.session.failed", 1, 10).await;
        let event_latency = failed_at.saturating_duration_since(t0);
        let failed = events(&seen, &id, "agent.session.failed");
        assert_eq!(failed[0].1["reason"], "container_not_running");
        let view_latency = within(Duration::from_secs(2), "worldview says failed", async || {
            session_status(&cp1, &id).await == "failed"
        })
        .await;
        let metrics_latency = within(Duration::from_secs(2), "metrics say 0 connected", async || {
            sessions_gauge(cp1.metrics_addr, "connected").await == Some(0.0)
        })
        .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(events(&seen, &id, "agent.session.failed").len(), 1, "one terminal event");
        assert_eq!(events(&seen, &id, "agent.session.broken").len(), 0, "no churn");
        assert!(cp1.sessions.active().await.is_empty(), "no session actor left");
        eprintln!(
            "fault docker-kill: SessionFailed after {event_latency:?}; worldview +{view_latency:?}; metrics +{metrics_latency:?}"
        );
        cp::stop(cp1).await;
    });
}

#[test]
fn clawkerd_killed_inside_ends_the_session_without_reconnect_churn() {
    let _g = serial();
    let env = fault_env(2);
    actix::System::new().block_on(async {
        let docker = docker_or_fail().await;
        let cp1 = cp::start(&env.cfg).await.unwrap();
        let seen = record(&cp1.bus);
        let id = cp::agent::run(&docker, &env.material(), &env.spec("pid1", "fx"))
            .await
            .unwrap();
        wait_for(&seen, &id, "agent.init.completed", 1, 60).await;
        // clawkerd is PID 1: killed from the host (the container exits,
        // Docker sees only a `die`).
        let pid = docker_cli(&["inspect", "-f", "{{.State.Pid}}", &id]).unwrap();
        let pid: i32 = pid.parse().unwrap();
        assert!(pid > 0);
        unsafe { libc::kill(pid, libc::SIGKILL) };
        wait_for(&seen, &id, "agent.session.failed", 1, 10).await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let failed = events(&seen, &id, "agent.session.failed");
        assert_eq!(failed.len(), 1, "{:?}", names(&seen, &id));
        assert_eq!(failed[0].1["reason"], "container_not_running");
        assert_eq!(events(&seen, &id, "agent.session.broken").len(), 0);
        assert_eq!(
            events(&seen, &id, "agent.session.connecting").len(),
            1,
            "no re-dial"
        );
        assert_eq!(session_status(&cp1, &id).await, "failed");
        cp::stop(cp1).await;
    });
}

#[test]
fn network_disconnect_breaks_the_session_and_connect_brings_it_back() {
    let _g = serial();
    let env = fault_env(3);
    actix::System::new().block_on(async {
        let docker = docker_or_fail().await;
        let cp1 = cp::start(&env.cfg).await.unwrap();
        let seen = record(&cp1.bus);
        let id = cp::agent::run(&docker, &env.material(), &env.spec("netty", "fx"))
            .await
            .unwrap();
        wait_for(&seen, &id, "agent.init.completed", 1, 60).await;
        let net = env.cfg.network.clone();
        let ip = docker_cli(&[
            "inspect",
            "-f",
            &format!("{{{{(index .NetworkSettings.Networks \"{net}\").IPAddress}}}}"),
            &id,
        ])
        .unwrap();

        let t0 = Instant::now();
        docker_cli(&["network", "disconnect", &net, &id]).expect("disconnect");
        let broken_at = wait_for(&seen, &id, "agent.session.broken", 1, 5).await;
        let broke_after = broken_at.saturating_duration_since(t0);
        assert_eq!(session_status(&cp1, &id).await, "broken");
        // Disconnected for a while: the session waits, it does not fail.
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(events(&seen, &id, "agent.session.failed").len(), 0, "{:?}", names(&seen, &id));

        let t1 = Instant::now();
        docker_cli(&["network", "connect", "--ip", &ip, &net, &id]).expect("connect");
        let back_at = wait_for(&seen, &id, "agent.session.connected", 2, 10).await;
        let back_after = back_at.saturating_duration_since(t1);
        wait_for(&seen, &id, "agent.trusted", 2, 10).await;
        // Measured 0.7–1.05 s here (DESIGN: within a second; the number
        // goes to RELIABILITY.md). The bound only tells a re-dial by the
        // network event from none (the 5 s re-check) on a loaded machine.
        assert!(
            back_after < Duration::from_secs(4),
            "reconnected {back_after:?} after the connect (network events re-dial)"
        );
        assert_eq!(events(&seen, &id, "agent.registered").len(), 1, "Match, no second Register");
        assert_eq!(events(&seen, &id, "agent.session.failed").len(), 0);
        eprintln!(
            "fault network-disconnect: SessionBroken after {broke_after:?}; reconnected {back_after:?} after connect"
        );
        cp::stop(cp1).await;
    });
}

#[test]
fn agent_run_exits_non_zero_and_starts_nothing_when_the_cp_is_unreachable() {
    let _g = serial();
    let env = fault_env(4);
    // A port nobody listens on.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    // The network exists, so only the missing CP can stop the start.
    docker_cli(&[
        "network",
        "create",
        "--subnet",
        "10.225.4.0/24",
        &env.cfg.network,
    ])
    .expect("network create");
    let out = env
        .cli(dead)
        .args([
            "agent",
            "run",
            "ghost",
            "--project",
            "fx",
            "--image",
            &test_image(),
        ])
        .args(["--network", &env.cfg.network, "--timeout-secs", "5"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "exit 0 without confirming the agent ready: {stderr}"
    );
    assert!(
        stderr.contains("cannot reach the control plane"),
        "{stderr}"
    );
    assert_eq!(
        docker_cli(&["ps", "-aq", "--filter", "name=^clawker.fx.ghost$"]).as_deref(),
        Some(""),
        "nothing is started when the CP cannot be watched"
    );
}

/// A byte-for-byte relay from a Unix socket of ours to the engine's: the
/// test's Docker socket, which it can make vanish and reappear (socket
/// loss) without touching the engine.
struct SocketRelay {
    path: std::path::PathBuf,
    stop: Arc<std::sync::atomic::AtomicBool>,
    conns: Arc<Mutex<Vec<std::os::unix::net::UnixStream>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SocketRelay {
    fn start(path: &std::path::Path) -> Self {
        use std::os::unix::net::{UnixListener, UnixStream};
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).unwrap();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<UnixStream>>> = Arc::default();
        let (s, c) = (stop.clone(), conns.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        client.set_nonblocking(false).unwrap();
                        let Ok(engine) = UnixStream::connect("/var/run/docker.sock") else {
                            continue;
                        };
                        let mut g = c.lock().unwrap();
                        g.push(client.try_clone().unwrap());
                        g.push(engine.try_clone().unwrap());
                        drop(g);
                        for (mut from, mut to) in [
                            (client.try_clone().unwrap(), engine.try_clone().unwrap()),
                            (engine, client),
                        ] {
                            std::thread::spawn(move || {
                                let _ = std::io::copy(&mut from, &mut to);
                                let _ = to.shutdown(std::net::Shutdown::Both);
                            });
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Self {
            path: path.to_owned(),
            stop,
            conns,
            thread: Some(thread),
        }
    }

    /// The socket vanishes: no new connections, every open one cut.
    fn kill(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }
}

impl Drop for SocketRelay {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The CP's log lines (stderr), collected by a reader thread.
#[derive(Clone, Default)]
struct LogLines(Arc<Mutex<Vec<(Instant, String)>>>);

impl LogLines {
    fn follow(&self, stream: impl Read + Send + 'static) {
        let lines = self.0.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(stream).lines().map_while(Result::ok) {
                lines.lock().unwrap().push((Instant::now(), l));
            }
        });
    }

    /// When a line containing `needle` was first seen after `since`.
    fn seen_after(&self, needle: &str, since: Instant) -> Option<Instant> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .find(|(t, l)| *t >= since && l.contains(needle))
            .map(|(t, _)| *t)
    }

    fn wait(&self, needle: &str, since: Instant, limit: Duration) -> Instant {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(t) = self.seen_after(needle, since) {
                return t;
            }
            if Instant::now() > deadline {
                let all: Vec<String> = self
                    .0
                    .lock()
                    .unwrap()
                    .iter()
                    .map(|(_, l)| l.clone())
                    .collect();
                panic!(
                    "no log line with {needle:?} within {limit:?}; log:\n{}",
                    all.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn cp_waits_for_a_missing_docker_socket_and_recovers_from_losing_it() {
    let _g = serial();
    let env = fault_env(5);
    let sock_dir = tempfile::tempdir().unwrap();
    let sock = sock_dir.path().join("docker.sock");
    let metrics: SocketAddr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let admin = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut cmd = env.cli(admin);
    cmd.args(["cp", "serve"])
        .args(["--network", &env.cfg.network, "--subnet", "10.225.5.0/24"])
        .args(["--quarantine-network", &env.cfg.quarantine_network])
        .args(["--quarantine-subnet", "10.225.105.0/24"])
        .args([
            "--metrics-addr",
            &metrics.to_string(),
            "--log-format",
            "json",
        ])
        .env("DOCKER_HOST", format!("unix://{}", sock.display()))
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let log = LogLines::default();
    log.follow(child.stderr.take().unwrap());
    log.follow(child.stdout.take().unwrap());
    let mut cp = Child(child);
    let start = Instant::now();

    // No socket: a clear error, the process stays up, /healthz answers and
    // /readyz says not ready.
    log.wait(
        "cannot reach the Docker engine",
        start,
        Duration::from_secs(20),
    );
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        cp.0.try_wait().unwrap().is_none(),
        "the CP exited without an engine"
    );
    assert_eq!(http_get(metrics, "/readyz").0, 503);
    assert_eq!(http_get(metrics, "/healthz").0, 200);

    // The socket appears: startup completes without a restart.
    let back = Instant::now();
    let mut relay = SocketRelay::start(&sock);
    let up = log.wait("control plane up", back, Duration::from_secs(10));
    let startup_after = up - back;
    let t = Instant::now();
    while http_get(metrics, "/readyz").0 != 200 {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "/readyz never became ready"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // The socket is lost while running, long enough for the backoff to
    // grow (1, 2, 4 s …), then returns: the feeder notices within a ping.
    // Let the feeder's events stream (opened after its reconcile, which is
    // what /readyz reports) be established through the relay first.
    std::thread::sleep(Duration::from_secs(1));
    relay.kill();
    let lost = Instant::now();
    log.wait("stream", lost, Duration::from_secs(30));
    let t = Instant::now();
    while http_get(metrics, "/readyz").0 != 503 {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "/readyz still ready without an engine"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_secs(8));
    let returned = Instant::now();
    let _relay = SocketRelay::start(&sock);
    let resumed = log.wait(
        "Docker engine reachable again",
        returned,
        Duration::from_secs(10),
    );
    let recovery = resumed - returned;
    let t = Instant::now();
    while http_get(metrics, "/readyz").0 != 200 {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "/readyz not ready after recovery"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        recovery < Duration::from_secs(2),
        "recovery logged {recovery:?} after the engine returned"
    );
    eprintln!(
        "fault docker-socket: startup completed {startup_after:?} after the socket appeared; after an 8 s loss the feeder recovered (logged) {recovery:?} after its return"
    );
    assert!(cp.0.try_wait().unwrap().is_none(), "no CP restart");
    drop(cp);
}
