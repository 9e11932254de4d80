//! Whole-system benchmark harness (run with `cargo bench --bench system`).
//!
//! Sections (select with an argument, default all):
//! - `docker`: on a real engine, one agent container under an in-process CP:
//!   ShellCommand `true` round trip over the open session vs `docker exec`
//!   of `true` in the same container through the Engine API (bollard
//!   create/start/inspect) and through the `docker` CLI; stdout throughput of
//!   500 MB the same three ways; Docker `start` event → SessionConnected and
//!   → InitCompleted over 50 container starts.
//! - `sessions`: N real clawkerd processes on loopback (N = 100, 1000):
//!   dial → SessionConnected latency and the CP's RSS with N idle sessions.
//! - `fleet`: 10,000 sessions on one CP (`CLAWKER_FLEET_N` to change N,
//!   `CLAWKER_FLEET_IDLE_SECS` the idle-CPU window, default 240 s).
//!   The agents are a load generator (`support/loadgen.rs`: one child
//!   process playing clawkerd for all N over real mTLS, one listener and
//!   one leaf per agent); the CP side is the real session machinery.
//!   Time to connect all N, CP RSS, idle CP CPU over the window (/proc/self/stat),
//!   ShellCommand `true` round trips to random sessions.
//! - `throughput`: on a real engine, one agent: the producer alone in the
//!   container (`dd bs=1M` vs busybox `head -c`, to /dev/null and into a
//!   pipe), 500 MB of stdout through one ShellCommand (and through the
//!   flow-controlled streaming path operator exec uses), 500 MB of stdin
//!   into `dd of=/dev/null`, each against `docker exec` (Engine API and
//!   CLI) in the same run, and the loopback floor (`support/floor.rs`: the
//!   same bytes over a plain TLS socket with the session's rustls configs,
//!   and over plain TCP). Docker networks 10.226.0–1.0/24.
//! - `loopback`: the `true` round trip and the session rows of
//!   `throughput` against one real clawkerd process on loopback (no
//!   container, no bridge), and the floor.
//! - `load100`: on a real engine, 100 agents started at once through the
//!   library call `clawker agent run --no-wait` makes, against one CP:
//!   start event → InitCompleted p50/p99, failures, CP RSS and CPU.
//!   `CLAWKER_LOAD_N` changes 100 (CI's short form: 10). Docker networks
//!   10.226.2–3.0/24.
//! - `startup` (not in the default set: it needs root and builds a private
//!   swarm): start → InitCompleted in engine mode (an in-process CP on the
//!   main engine) beside Swarm mode (the CP service on a one-node private
//!   swarm, `scripts/swarm-cluster/`), the same N agent starts each, one
//!   after another, in one run. "start" is the runtime's own start time
//!   (engine: the container `start` event; swarm: the moment the manager
//!   recorded the task running), so both numbers cover dial, Register and
//!   init; the `agent run` call → InitCompleted is reported too.
//! - `exec`: the operator's way in, on a real engine (image
//!   `$CLAWKER_TEST_IMAGE`, default `clawker-agent:latest`): the whole CLI
//!   process `clawker agent exec NAME -- true` against `docker exec NAME
//!   true` (50 each, interleaved, process start included); the keystroke
//!   echo round trip in a tty (`agent exec -it … cat` under a real pty,
//!   against `docker exec -it`); `cat` of a 500 MB file through both.
//! - `containment`: on a real engine, one agent that keeps connecting to
//!   an HTTP server in a network namespace behind a veth pair (real
//!   egress); `AgentUntrusted` → egress actually cut (the agent's first
//!   failed connection, timed by its own clock) for `isolate` and for
//!   `lock`, 20 runs each, and → the session re-established over the
//!   quarantine address. Docker networks 10.222.30–31.0/24, namespace
//!   10.252.30.0/30. Run under the Docker flock.
//! - `rotation`: one real clawkerd on loopback, 200 leaf rotations over
//!   one open session (`RenewCert` → CSR → sign → stage → `CertIssued` →
//!   clawkerd persists and swaps → `Done` → promote), with real redb writes:
//!   CSR received → `Done` received (the DESIGN target), and the whole
//!   `RenewCert` round trip.
//!
//! The agent image is `CLAWKER_TEST_IMAGE` (default `clawker-agent:latest`).
//!
//! Under `cargo test --all-targets` this binary is only built and exits.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::{Command as Process, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clawker::cp::{self, agent::RunSpec};
use clawker::identity::{AgentName, ProjectSlug};
use clawker::proto::clawkerd::v1 as pb;
use clawker::session::command::run_to_completion;
use clawker::session::mux::SessionMux;
use futures::StreamExt;

#[allow(dead_code)]
#[path = "../tests/common/pty.rs"]
mod pty;
#[allow(dead_code)]
#[path = "../tests/common/swarm.rs"]
mod swarm_support;

#[allow(dead_code)]
#[path = "support/fleet.rs"]
mod fleet;
#[allow(dead_code)]
#[path = "support/floor.rs"]
mod floor;
#[allow(dead_code)]
#[path = "support/loadgen.rs"]
mod loadgen;

fn main() {
    loadgen::child_main_if_requested();
    floor::child_main_if_requested();
    let args: Vec<String> = std::env::args().collect();
    if !args.iter().any(|a| a == "--bench") {
        println!(
            "system harness: run with `cargo bench --bench system [-- docker|exec|sessions|fleet|throughput|loopback|load100|containment|rotation]`"
        );
        return;
    }
    let only: Vec<&str> = args
        .iter()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .map(String::as_str)
        .collect();
    let want = |s: &str| only.is_empty() || only.contains(&s);
    if only.contains(&"startup") {
        actix::System::new().block_on(startup_section());
    }
    raise_fd_limit();
    println!("machine: {} cores, {}", num_cpus(), mem_total());
    if want("docker") {
        actix::System::new().block_on(docker_section());
    }
    if want("exec") {
        exec_section();
    }
    if want("sessions") {
        for n in [100usize, 1000] {
            actix::System::new().block_on(sessions_section(n));
        }
    }
    if want("fleet") {
        let n = std::env::var("CLAWKER_FLEET_N")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(10_000);
        actix::System::new().block_on(fleet_section(n));
    }
    if want("loopback") {
        actix::System::new().block_on(loopback_section());
    }
    if want("throughput") {
        actix::System::new().block_on(throughput_section());
    }
    if want("load100") {
        let n = std::env::var("CLAWKER_LOAD_N")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(100);
        actix::System::new().block_on(load100_section(n));
    }
    if want("containment") {
        actix::System::new().block_on(containment_section());
    }
    if want("rotation") {
        actix::System::new().block_on(rotation_section(200));
    }
}

fn image() -> String {
    std::env::var("CLAWKER_TEST_IMAGE").unwrap_or_else(|_| "clawker-agent:latest".into())
}

async fn rotation_section(n: usize) {
    use clawker::events::{AgentRef, RotationReason};
    use clawker::session::rotation::{CertRotation, RequestOutcome, RotationConfig, Rotator};
    let dir = tempfile::tempdir().unwrap();
    let ca = Arc::new(clawker::pki::Ca::generate().unwrap());
    let cp_client = ca.mint_cp_client().unwrap();
    let id = "0123456789abcdef";
    let leaf = ca
        .mint_agent(
            &ProjectSlug::new("p").unwrap(),
            &AgentName::new("a").unwrap(),
            id,
        )
        .unwrap();
    let boot = dir.path().join("boot");
    clawker::pki::write_bootstrap(&boot, &leaf, ca.cert_pem()).unwrap();
    std::fs::write(boot.join("assertion.jwt"), "x").unwrap();
    let passwd = dir.path().join("passwd");
    std::fs::write(&passwd, "root:x:0:0::/root:/bin/sh\n").unwrap();
    let group = dir.path().join("group");
    std::fs::write(&group, "root:x:0:\n").unwrap();
    let log = dir.path().join("clawkerd.log");
    let mut child = Process::new(env!("CARGO_BIN_EXE_clawkerd"))
        .args(["sleep", "600"])
        .env("CLAWKER_AGENT", "a")
        .env("CLAWKER_PROJECT", "p")
        .env("CLAWKER_USER", "root")
        .env("CLAWKER_BOOTSTRAP_DIR", &boot)
        .env("CLAWKER_LISTEN_ADDR", "127.0.0.1:0")
        .env("CLAWKER_PASSWD_FILE", &passwd)
        .env("CLAWKER_GROUP_FILE", &group)
        .env("CLAWKER_READY_FILE", dir.path().join("ready"))
        .env("CLAWKER_LOG_FILE", &log)
        .env("CLAWKERD_STATE_DIR", dir.path().join("state"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn clawkerd");
    // The bound address, from clawkerd's `clawkerd_listener_started` line.
    let deadline = Instant::now() + Duration::from_secs(10);
    let addr: SocketAddr = loop {
        let found = std::fs::read_to_string(&log).ok().and_then(|text| {
            text.lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .find(|v| v["event"] == "clawkerd_listener_started")
                .and_then(|v| v["addr"].as_str()?.parse().ok())
        });
        if let Some(a) = found {
            break a;
        }
        assert!(Instant::now() < deadline, "clawkerd not listening");
        std::thread::sleep(Duration::from_millis(5));
    };
    let registry = clawker::registry::RegistryStore::open(&dir.path().join("r.redb")).unwrap();
    registry
        .add(clawker::registry::NewEntry {
            agent_name: "a".into(),
            project: "p".into(),
            container_id: id.into(),
            thumbprint: leaf.thumbprint(),
            registered_at_unix: 1,
            last_seen_unix: 0,
        })
        .unwrap();
    let dial = clawker::session::dial::DialConfig::new(
        ca.cert_pem().as_bytes(),
        cp_client.cert_pem.as_bytes(),
        cp_client.key_pem.as_bytes(),
    )
    .unwrap();
    let conn = clawker::session::dial::connect(addr, &dial)
        .await
        .expect("session");
    let certs = CertRotation {
        ca: ca.clone(),
        rows: Arc::new(registry.clone()),
        config: RotationConfig::default(),
    };
    let mut rotator = Rotator::new(
        Some(Arc::new(certs)),
        Arc::new(registry.clone()),
        clawker::events::RecordingSink::default(),
        AgentRef::new(id, "a", "p"),
        true,
        &conn.peer,
    );
    let (mut csr_to_done, mut round_trip) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let t = Instant::now();
        match rotator
            .rotate_now(&conn.mux, RotationReason::Requested)
            .await
            .expect("rotation")
        {
            RequestOutcome::Rotated(r) => csr_to_done.push(r.csr_to_done),
            RequestOutcome::AlreadyRotated => panic!("nothing else rotates here"),
        }
        round_trip.push(t.elapsed());
    }
    assert!(!conn.mux.is_closed(), "one session throughout");
    println!("\n== leaf rotation over one open session (loopback, real clawkerd, real redb) ==");
    report(
        "CSR received → Done received (new leaf in use)",
        &mut csr_to_done,
    );
    report("RenewCert sent → Done received", &mut round_trip);
    let _ = child.kill();
    let _ = child.wait();
}

/// 1,000 sessions need more than the default 1,024 descriptors.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn num_cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

fn mem_total() -> String {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()
                .map(|l| l.split_whitespace().nth(1).unwrap_or("?").to_owned())
        })
        .map(|kb| format!("{} GiB RAM", kb.parse::<u64>().unwrap_or(0) / 1024 / 1024))
        .unwrap_or_default()
}

fn rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .unwrap_or(0.0)
        / 1024.0
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn report(name: &str, v: &mut [Duration]) {
    let (p50, p99) = (pct(v, 0.50), pct(v, 0.99));
    println!(
        "{name:<48} n={:<4} p50={:>9.3} ms  p99={:>9.3} ms",
        v.len(),
        ms(p50),
        ms(p99)
    );
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Runs one ShellCommand over the session; returns stdout bytes seen.
async fn shell(mux: &SessionMux, id: &str, argv: &[&str]) -> usize {
    let shell = pb::ShellCommand {
        stages: vec![pb::PipeStage {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }],
        timeout_seconds: 120,
        ..Default::default()
    };
    let done = run_to_completion(mux, id, shell, Duration::from_secs(130), 0)
        .await
        .expect("command");
    assert_eq!(done.exit_code, 0);
    done.stdout.total as usize
}

async fn api_exec(docker: &bollard::Docker, id: &str, argv: &[&str]) -> usize {
    use bollard::exec::{StartExecOptions, StartExecResults};
    let exec = docker
        .create_exec(
            id,
            bollard::models::ExecConfig {
                attach_stdout: Some(true),
                attach_stderr: Some(true),
                cmd: Some(argv.iter().map(|s| s.to_string()).collect()),
                ..Default::default()
            },
        )
        .await
        .expect("create_exec");
    let mut bytes = 0;
    if let StartExecResults::Attached { mut output, .. } = docker
        .start_exec(&exec.id, None::<StartExecOptions>)
        .await
        .expect("start_exec")
    {
        while let Some(chunk) = output.next().await {
            if let Ok(bollard::container::LogOutput::StdOut { message }) = chunk {
                bytes += message.len();
            }
        }
    }
    let inspect = docker.inspect_exec(&exec.id).await.expect("inspect_exec");
    assert_eq!(inspect.exit_code, Some(0));
    bytes
}

fn cli_exec(id: &str, argv: &[&str]) -> usize {
    use std::io::Read;
    let mut child = Process::new("docker")
        .arg("exec")
        .arg(id)
        .args(argv)
        .stdout(Stdio::piped())
        .spawn()
        .expect("docker exec");
    let mut out = child.stdout.take().expect("stdout");
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0;
    loop {
        match out.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => bytes += n,
        }
    }
    assert!(child.wait().expect("wait").success());
    bytes
}

async fn docker_section() {
    let docker = clawker::docker::connect().await.expect("docker engine");
    let state = tempfile::tempdir().expect("tempdir");
    clawker::pki::AuthMaterial::ensure(state.path()).expect("ca");
    let overrides = cp::config::Overrides {
        network: Some("clawker-bench".into()),
        subnet: Some("10.215.0.0/24".into()),
        quarantine_network: Some("clawker-bench-q".into()),
        quarantine_subnet: Some("10.215.1.0/24".into()),
        admin_addr: Some("127.0.0.1:0".parse().unwrap()),
        metrics_addr: Some("127.0.0.1:0".parse().unwrap()),
        ..Default::default()
    };
    let cfg = cp::config::resolve(state.path().to_owned(), Default::default(), overrides).unwrap();
    let material = clawker::pki::AuthMaterial::load(state.path()).unwrap();
    let running = cp::start(&cfg).await.expect("cp");
    let seen: Arc<Mutex<Vec<(String, serde_json::Value)>>> = Arc::default();
    {
        let mut sub = running.bus.subscribe_all().unwrap();
        let s = seen.clone();
        actix::spawn(async move {
            while let Some(e) = sub.recv().await {
                s.lock().unwrap().push((e.name().to_owned(), e.to_json()));
            }
        });
    }
    let spec = |name: &str| RunSpec {
        agent: AgentName::new(name).unwrap(),
        project: ProjectSlug::new("bench").unwrap(),
        image: image(),
        network: cfg.network.clone(),
        agent_port: cfg.agent_port,
        command: vec![],
        env: vec![],
        hardening: Default::default(),
        extra_labels: HashMap::from([("dev.clawker.test".to_owned(), "bench".to_owned())]),
        extra_networks: vec![],
        mint_for_container: None,
        cert_ttl: cp::config::DEFAULT_AGENT_CERT_TTL,
        placement: vec![],
    };
    let at_of = |name: &str, id: &str| -> Option<i128> {
        seen.lock()
            .unwrap()
            .iter()
            .find(|(n, j)| n == name && j["container_id"] == id)
            .and_then(|(_, j)| {
                let s = j["at"].as_str()?;
                time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
                    .ok()
                    .map(|t| t.unix_timestamp_nanos())
            })
    };
    let start_event_at = |id: &str| -> Option<i128> {
        seen.lock()
            .unwrap()
            .iter()
            .find(|(n, j)| {
                n == "docker.event"
                    && j["actor_id"] == id
                    && j["action"] == "start"
                    && j["synthetic"] == false
            })
            .and_then(|(_, j)| j["time_nanos"].as_i64().map(i128::from))
    };
    async fn wait<F: Fn() -> bool>(f: F) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !f() {
            assert!(Instant::now() < deadline, "timed out");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    // One container for the round trip and throughput comparisons.
    let id = cp::agent::run(&docker, &material, &spec("rt"))
        .await
        .expect("run");
    wait(|| at_of("agent.init.completed", &id).is_some()).await;
    let live = running.sessions.live(&id).await.expect("live session");
    let mux = live.mux;
    println!("\n== ShellCommand `true` round trip vs docker exec (same container) ==");
    let mut v = Vec::new();
    for i in 0..1000 {
        let t = Instant::now();
        shell(&mux, &format!("rt-{i}"), &["true"]).await;
        v.push(t.elapsed());
    }
    report("session ShellCommand `true`", &mut v);
    let mut v = Vec::new();
    for _ in 0..50 {
        let t = Instant::now();
        api_exec(&docker, &id, &["true"]).await;
        v.push(t.elapsed());
    }
    report("docker exec via Engine API (bollard)", &mut v);
    let mut v = Vec::new();
    for _ in 0..30 {
        let t = Instant::now();
        cli_exec(&id, &["true"]);
        v.push(t.elapsed());
    }
    report("docker exec via CLI", &mut v);

    println!("\n== stdout throughput, 500 MB (same container) ==");
    let argv = ["head", "-c", "524288000", "/dev/zero"];
    for (name, run) in [
        ("session ShellCommand", 0),
        ("docker exec via Engine API", 1),
        ("docker exec via CLI", 2),
    ] {
        let mut best = 0.0f64;
        for i in 0..3 {
            let t = Instant::now();
            let bytes = match run {
                0 => shell(&mux, &format!("tp-{i}"), &argv).await,
                1 => api_exec(&docker, &id, &argv).await,
                _ => cli_exec(&id, &argv),
            };
            assert_eq!(bytes, 524_288_000);
            best = best.max(bytes as f64 / t.elapsed().as_secs_f64() / 1e6);
        }
        println!("{name:<48} best of 3: {best:>8.0} MB/s");
    }

    println!("\n== Docker start event → SessionConnected / InitCompleted (50 starts) ==");
    let (mut connected, mut completed) = (Vec::new(), Vec::new());
    for i in 0..50 {
        let id = cp::agent::run(&docker, &material, &spec(&format!("s{i}")))
            .await
            .expect("run");
        wait(|| at_of("agent.init.completed", &id).is_some() && start_event_at(&id).is_some())
            .await;
        let start = start_event_at(&id).unwrap();
        let c = at_of("agent.session.connected", &id).unwrap();
        let d = at_of("agent.init.completed", &id).unwrap();
        connected.push(Duration::from_nanos((c - start).max(0) as u64));
        completed.push(Duration::from_nanos((d - start).max(0) as u64));
        cp::agent::remove(&docker, &id).await.expect("rm");
    }
    report("start event → SessionConnected", &mut connected);
    report(
        "start event → InitCompleted (init + boot, 9 steps)",
        &mut completed,
    );

    cp::agent::remove(&docker, &id).await.ok();
    let q = cfg.quarantine_network.clone();
    cp::stop(running).await;
    remove_quarantine(&q).await;
    let _ = Process::new("docker")
        .args(["network", "rm", "clawker-bench"])
        .output();
}

fn nanos_now() -> i128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0)
}

fn bench_image() -> String {
    std::env::var("CLAWKER_TEST_IMAGE").unwrap_or_else(|_| "clawker-agent:latest".into())
}

fn run_spec(name: &str, network: &str) -> RunSpec {
    RunSpec {
        agent: AgentName::new(name).unwrap(),
        project: ProjectSlug::new("bench").unwrap(),
        image: bench_image(),
        network: network.into(),
        agent_port: clawker::defaults::AGENT_PORT,
        command: vec![],
        extra_labels: HashMap::from([("dev.clawker.test".to_owned(), "bench".to_owned())]),
        extra_networks: vec![],
        env: vec![],
        hardening: Default::default(),
        mint_for_container: None,
        cert_ttl: cp::config::DEFAULT_AGENT_CERT_TTL,
        placement: vec![],
    }
}

/// (start → InitCompleted, call → InitCompleted) from event records.
fn startup_sample(
    recs: &[(String, serde_json::Value)],
    id: &str,
    call: i128,
) -> Option<(Duration, Duration)> {
    let done = recs
        .iter()
        .find(|(n, j)| n == "agent.init.completed" && j["container_id"] == id)
        .and_then(|(_, j)| swarm_support::at_nanos(j))?;
    let start = recs
        .iter()
        .find(|(n, j)| {
            n == "docker.event"
                && j["actor_id"] == id
                && j["action"] == "start"
                && j["synthetic"] == false
        })
        .and_then(|(_, j)| j["time_nanos"].as_i64().map(i128::from))?;
    let d = |from: i128| Duration::from_nanos((done - from).max(0) as u64);
    Some((d(start), d(call)))
}

async fn startup_section() {
    let n: usize = std::env::var("CLAWKER_BENCH_STARTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    println!("\n== start → InitCompleted, engine vs swarm ({n} starts each, one at a time) ==");

    // Engine mode: an in-process CP on the main engine.
    let docker = clawker::docker::connect().await.expect("docker engine");
    let state = tempfile::tempdir().expect("tempdir");
    clawker::pki::AuthMaterial::ensure(state.path()).expect("ca");
    let overrides = cp::config::Overrides {
        network: Some("clawker-bench-startup".into()),
        subnet: Some("10.241.200.0/24".into()),
        quarantine_network: Some("clawker-bench-startup-q".into()),
        quarantine_subnet: Some("10.241.201.0/24".into()),
        admin_addr: Some("127.0.0.1:0".parse().unwrap()),
        metrics_addr: Some("127.0.0.1:0".parse().unwrap()),
        ..Default::default()
    };
    let cfg = cp::config::resolve(state.path().to_owned(), Default::default(), overrides).unwrap();
    let material = clawker::pki::AuthMaterial::load(state.path()).unwrap();
    let running = cp::start(&cfg).await.expect("cp");
    let seen: Arc<Mutex<Vec<(String, serde_json::Value)>>> = Arc::default();
    {
        let mut sub = running.bus.subscribe_all().unwrap();
        let s = seen.clone();
        actix::spawn(async move {
            while let Some(e) = sub.recv().await {
                s.lock().unwrap().push((e.name().to_owned(), e.to_json()));
            }
        });
    }
    let (mut e_start, mut e_call) = (Vec::new(), Vec::new());
    for i in 0..n {
        let call = nanos_now();
        let id = cp::agent::run(
            &docker,
            &material,
            &run_spec(&format!("e{i}"), &cfg.network),
        )
        .await
        .expect("run");
        let deadline = Instant::now() + Duration::from_secs(60);
        let sample = loop {
            if let Some(s) = startup_sample(&seen.lock().unwrap(), &id, call) {
                break s;
            }
            assert!(
                Instant::now() < deadline,
                "engine agent {i}: no InitCompleted"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        e_start.push(sample.0);
        e_call.push(sample.1);
        cp::agent::remove(&docker, &id).await.expect("rm");
    }
    cp::stop(running).await;
    let _ = Process::new("docker")
        .args(["network", "rm", "clawker-bench-startup"])
        .output();
    remove_quarantine("clawker-bench-startup-q").await;

    // Swarm mode: the CP service on a one-node private swarm.
    let cluster = swarm_support::Cluster::up(1);
    let scp = swarm_support::SwarmCp::deploy(&cluster).await;
    let material = scp.material();
    let (mut s_start, mut s_call) = (Vec::new(), Vec::new());
    for i in 0..n {
        let call = nanos_now();
        let id = cp::agent::run(
            &scp.swarm,
            &material,
            &run_spec(&format!("s{i}"), swarm_support::OVERLAY),
        )
        .await
        .expect("run");
        let recs = scp
            .wait("InitCompleted", 60, |r| {
                startup_sample(r, &id, call).is_some()
            })
            .await;
        let sample = startup_sample(&recs, &id, call).unwrap();
        s_start.push(sample.0);
        s_call.push(sample.1);
        cp::agent::remove(&scp.swarm, &id).await.expect("rm");
    }
    drop(scp);
    drop(cluster);

    report("engine: start event → InitCompleted", &mut e_start);
    report("swarm:  task running → InitCompleted", &mut s_start);
    report("engine: `agent run` call → InitCompleted", &mut e_call);
    report("swarm:  `agent run` call → InitCompleted", &mut s_call);
}

/// Removes a quarantine network and its bridge's host guard.
async fn remove_quarantine(name: &str) {
    let id = Process::new("docker")
        .args(["network", "inspect", "-f", "{{.Id}}", name])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    if id.len() >= 12 {
        let _ =
            clawker::netns::unguard_bridge(&format!("br-{}", &id[..12]), Duration::from_secs(10))
                .await;
    }
    let _ = Process::new("docker")
        .args(["network", "rm", name])
        .output();
}

async fn sessions_section(n: usize) {
    use clawker::session::lifecycle::{
        ContainerResolver, ResolveError, ResolvedTarget, SessionDeps, SessionPolicy,
    };
    struct Table(HashMap<String, SocketAddr>);
    impl ContainerResolver for Table {
        fn resolve(
            &self,
            id: &str,
        ) -> futures::future::BoxFuture<'_, Result<ResolvedTarget, ResolveError>> {
            let r = self.0.get(id).map(|a| ResolvedTarget {
                agent: "a".into(),
                project: "p".into(),
                running: true,
                addr: Some(*a),
            });
            Box::pin(async move { r.ok_or(ResolveError::NotFound) })
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let ca = clawker::pki::Ca::generate().unwrap();
    let cp_client = ca.mint_cp_client().unwrap();
    let passwd = dir.path().join("passwd");
    std::fs::write(
        &passwd,
        "root:x:0:0::/root:/bin/sh\nclaude:x:1001:1001::/tmp:/bin/sh\n",
    )
    .unwrap();
    let group = dir.path().join("group");
    std::fs::write(&group, "root:x:0:\nclaude:x:1001:\n").unwrap();
    let mut children = Vec::new();
    let mut table = HashMap::new();
    for i in 0..n {
        let id = format!("{i:08x}");
        let leaf = ca
            .mint_agent(
                &ProjectSlug::new("p").unwrap(),
                &AgentName::new("a").unwrap(),
                &id,
            )
            .unwrap();
        let boot = dir.path().join(&id);
        clawker::pki::write_bootstrap(&boot, &leaf, ca.cert_pem()).unwrap();
        std::fs::write(boot.join("assertion.jwt"), "x").unwrap();
        // A distinct loopback address per agent, like distinct container IPs.
        let addr: SocketAddr = format!("127.77.{}.{}:7700", i / 250, i % 250 + 1)
            .parse()
            .unwrap();
        let child = Process::new(env!("CARGO_BIN_EXE_clawkerd"))
            .args(["sleep", "600"])
            .env("CLAWKER_AGENT", "a")
            .env("CLAWKER_PROJECT", "p")
            .env("CLAWKER_BOOTSTRAP_DIR", &boot)
            .env("CLAWKER_LISTEN_ADDR", addr.to_string())
            .env("CLAWKER_PASSWD_FILE", &passwd)
            .env("CLAWKER_GROUP_FILE", &group)
            .env("CLAWKER_READY_FILE", boot.join("ready"))
            .env("CLAWKER_LOG_FILE", boot.join("log"))
            .env("CLAWKERD_STATE_DIR", boot.join("state"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn clawkerd");
        children.push(child);
        table.insert(id, addr);
    }
    // Let every listener come up, so we measure dial latency, not spawn time.
    for addr in table.values() {
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "clawkerd {addr} not listening");
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    let rss_before = rss_mb();
    let bus = clawker::events::start_bus();
    let registry = clawker::registry::RegistryStore::open(&dir.path().join("r.redb")).unwrap();
    let policy = SessionPolicy {
        max_register_attempts: 0,
        ..SessionPolicy::default()
    };
    let deps = SessionDeps {
        resolver: Arc::new(Table(table.clone())),
        registry: Arc::new(registry),
        terminate: Arc::new(clawker::runtime::memory::MemoryOps::default()),
        dial: clawker::session::dial::DialConfig::new(
            ca.cert_pem().as_bytes(),
            cp_client.cert_pem.as_bytes(),
            cp_client.key_pem.as_bytes(),
        )
        .unwrap(),
        sink: bus.clone(),
        policy,
        certs: None,
    };
    let connected_at: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    {
        let mut sub = bus
            .subscribe::<clawker::events::SessionConnected>()
            .unwrap();
        let c = connected_at.clone();
        actix::spawn(async move {
            while let Some(e) = sub.recv().await {
                c.lock()
                    .unwrap()
                    .insert(e.agent.container_id.clone(), Instant::now());
            }
        });
    }
    let (sessions, _sup) = clawker::session::actor::start_standalone(deps, bus.clone());
    let t0 = Instant::now();
    for id in table.keys() {
        sessions.dial(id).await;
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    while connected_at.lock().unwrap().len() < n {
        assert!(
            Instant::now() < deadline,
            "only {} of {n} connected",
            connected_at.lock().unwrap().len()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let all = t0.elapsed();
    let mut lat: Vec<Duration> = connected_at
        .lock()
        .unwrap()
        .values()
        .map(|t| t.duration_since(t0))
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await; // settle: sessions idle
    println!("\n== {n} idle sessions to real clawkerd processes (loopback) ==");
    report(
        &format!("Dial → SessionConnected, {n} dialed at once"),
        &mut lat,
    );
    println!("{:<48} {:.2} s", "all connected after", all.as_secs_f64());
    println!(
        "{:<48} {:.1} MB (before dialing: {:.1} MB; {:.1} KB/session)",
        "CP process RSS",
        rss_mb(),
        rss_before,
        (rss_mb() - rss_before) * 1024.0 / n as f64
    );
    for mut c in children {
        let _ = c.kill();
        let _ = c.wait();
    }
}

// ---- a CP on the real engine, for throughput and load100 ----------------

struct EngineCp {
    docker: clawker::docker::Docker,
    _state: tempfile::TempDir,
    cfg: cp::config::CpConfig,
    material: clawker::pki::AuthMaterial,
    running: cp::RunningCp,
    seen: Arc<Mutex<Vec<(String, serde_json::Value)>>>,
}

impl EngineCp {
    /// `net`: network name prefix; `third`: the third octet of the agent
    /// subnet 10.226.third.0/24 (the quarantine network gets third+1).
    async fn start(net: &str, third: u8) -> EngineCp {
        let docker = clawker::docker::connect().await.expect("docker engine");
        let state = tempfile::tempdir().expect("tempdir");
        clawker::pki::AuthMaterial::ensure(state.path()).expect("ca");
        let overrides = cp::config::Overrides {
            network: Some(net.into()),
            subnet: Some(format!("10.226.{third}.0/24")),
            quarantine_network: Some(format!("{net}-q")),
            quarantine_subnet: Some(format!("10.226.{}.0/24", third + 1)),
            admin_addr: Some("127.0.0.1:0".parse().unwrap()),
            metrics_addr: Some("127.0.0.1:0".parse().unwrap()),
            ..Default::default()
        };
        let cfg =
            cp::config::resolve(state.path().to_owned(), Default::default(), overrides).unwrap();
        let material = clawker::pki::AuthMaterial::load(state.path()).unwrap();
        let running = cp::start(&cfg).await.expect("cp");
        let seen: Arc<Mutex<Vec<(String, serde_json::Value)>>> = Arc::default();
        let mut sub = running.bus.subscribe_all().unwrap();
        let s = seen.clone();
        actix::spawn(async move {
            while let Some(e) = sub.recv().await {
                s.lock().unwrap().push((e.name().to_owned(), e.to_json()));
            }
        });
        EngineCp {
            docker,
            _state: state,
            cfg,
            material,
            running,
            seen,
        }
    }

    fn spec(&self, project: &str, name: &str) -> RunSpec {
        RunSpec {
            agent: AgentName::new(name).unwrap(),
            project: ProjectSlug::new(project).unwrap(),
            image: image(),
            network: self.cfg.network.clone(),
            agent_port: self.cfg.agent_port,
            command: vec![],
            env: vec![],
            hardening: Default::default(),
            extra_labels: HashMap::from([("dev.clawker.test".to_owned(), "bench".to_owned())]),
            extra_networks: vec![],
            mint_for_container: None,
            cert_ttl: cp::config::DEFAULT_AGENT_CERT_TTL,
            placement: vec![],
        }
    }

    /// `at` of the first event `name` about container `id`, in ns.
    fn at_of(&self, name: &str, id: &str) -> Option<i128> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .find(|(n, j)| n == name && j["container_id"] == id)
            .and_then(|(_, j)| {
                let s = j["at"].as_str()?;
                time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
                    .ok()
                    .map(|t| t.unix_timestamp_nanos())
            })
    }

    /// The engine's own `start` event time for `id`, in ns.
    fn start_event_at(&self, id: &str) -> Option<i128> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .find(|(n, j)| {
                n == "docker.event"
                    && j["actor_id"] == id
                    && j["action"] == "start"
                    && j["synthetic"] == false
            })
            .and_then(|(_, j)| j["time_nanos"].as_i64().map(i128::from))
    }

    async fn stop(self) {
        let q = self.cfg.quarantine_network.clone();
        let net = self.cfg.network.clone();
        cp::stop(self.running).await;
        remove_quarantine(&q).await;
        let _ = Process::new("docker")
            .args(["network", "rm", &net])
            .output();
    }
}

/// Removes every container with `dev.clawker.test=bench` in `project`
/// (also what a failed run left behind).
async fn remove_project(docker: &clawker::docker::Docker, project: &str) {
    let out = sh_ok(
        "docker",
        &[
            "ps",
            "-aq",
            "--filter",
            &format!("label=dev.clawker.project={project}"),
        ],
    );
    for id in out.split_whitespace() {
        let _ = cp::agent::remove(docker, id).await;
    }
}

// ---- throughput: the real container path ---------------------------------

const TP_BYTES: u64 = 500 * 1024 * 1024;

fn mbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e6
}

async fn throughput_section() {
    let ecp = EngineCp::start("clawker-perf-tp", 0).await;
    remove_project(&ecp.docker, "perf-tp").await;
    let id = cp::agent::run(&ecp.docker, &ecp.material, &ecp.spec("perf-tp", "tp"))
        .await
        .expect("run");
    let deadline = Instant::now() + Duration::from_secs(60);
    while ecp.at_of("agent.init.completed", &id).is_none() {
        assert!(Instant::now() < deadline, "init");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mux = ecp.running.sessions.live(&id).await.expect("live").mux;
    let n = TP_BYTES.to_string();
    let count = (TP_BYTES >> 20).to_string();
    let dd = format!("dd if=/dev/zero bs=1048576 count={count}");
    let head = format!("head -c {n} /dev/zero");
    let best = |v: &[f64]| v.iter().cloned().fold(0.0, f64::max);

    println!("\n== the producer alone, in the container (500 MB, best of 3) ==");
    for (name, script) in [
        (
            "dd bs=1M > /dev/null",
            format!("{dd} of=/dev/null 2>/dev/null"),
        ),
        ("busybox head -c > /dev/null", format!("{head} > /dev/null")),
        (
            "dd bs=1M | dd bs=1M of=/dev/null",
            format!("{dd} 2>/dev/null | dd bs=1048576 of=/dev/null 2>/dev/null"),
        ),
        (
            "busybox head -c | dd bs=1M of=/dev/null",
            format!("{head} | dd bs=1048576 of=/dev/null 2>/dev/null"),
        ),
    ] {
        let mut v = Vec::new();
        for i in 0..3 {
            let t = Instant::now();
            shell(&mux, &format!("p{i}-{name}"), &["sh", "-c", &script]).await;
            v.push(mbps(TP_BYTES, t.elapsed()));
        }
        println!("{name:<48} {:>8.0} MB/s", best(&v));
    }

    println!("\n== stdout, 500 MB through one command (best of 3) ==");
    for (producer, argv) in [
        (
            "dd bs=1M",
            vec!["dd", "if=/dev/zero", "bs=1048576", count.as_str()],
        ),
        ("head -c", vec!["head", "-c", n.as_str(), "/dev/zero"]),
    ] {
        let argv: Vec<String> = argv
            .iter()
            .map(|a| {
                if *a == count {
                    format!("count={count}")
                } else {
                    a.to_string()
                }
            })
            .collect();
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        for (how, run) in [
            ("session ShellCommand", 0),
            ("session streaming (exec path, windowed)", 1),
            ("docker exec via Engine API", 2),
            ("docker exec via CLI", 3),
        ] {
            let mut v = Vec::new();
            for i in 0..3 {
                let t = Instant::now();
                let bytes = match run {
                    0 => shell(&mux, &format!("tp{i}-{how}-{producer}"), &argv).await as u64,
                    1 => streamed_stdout(&mux, &format!("ts{i}-{producer}"), &argv).await,
                    2 => api_exec(&ecp.docker, &id, &argv).await as u64,
                    // Off the CP's thread: a blocked CP answers no
                    // keepalive ping, and a slow transfer outlasts the
                    // 10 s ping timeout (the session would break).
                    _ => {
                        let (id, argv) = (
                            id.clone(),
                            argv.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
                        );
                        tokio::task::spawn_blocking(move || {
                            let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
                            cli_exec(&id, &argv) as u64
                        })
                        .await
                        .unwrap()
                    }
                };
                assert_eq!(bytes, TP_BYTES);
                v.push(mbps(bytes, t.elapsed()));
            }
            println!(
                "{:<48} {:>8.0} MB/s",
                format!("{producer}: {how}"),
                best(&v)
            );
        }
    }

    println!("\n== stdin, 500 MB into `dd bs=1M of=/dev/null` (best of 3) ==");
    let sink = ["dd", "bs=1048576", "of=/dev/null"];
    for (how, run) in [
        ("session streaming stdin (windowed)", 0),
        ("docker exec via Engine API", 1),
        ("docker exec -i via CLI", 2),
    ] {
        let mut v = Vec::new();
        for i in 0..3 {
            let t = Instant::now();
            match run {
                0 => streamed_stdin(&mux, &format!("si{i}"), &sink).await,
                1 => api_exec_stdin(&ecp.docker, &id, &sink).await,
                _ => {
                    let id = id.clone();
                    tokio::task::spawn_blocking(move || cli_exec_stdin(&id, &sink))
                        .await
                        .unwrap()
                }
            }
            v.push(mbps(TP_BYTES, t.elapsed()));
        }
        println!("{how:<48} {:>8.0} MB/s", best(&v));
    }

    floor_measurements().await;
    cp::agent::remove(&ecp.docker, &id).await.ok();
    ecp.stop().await;
}

async fn floor_measurements() {
    let best = |v: &[f64]| v.iter().cloned().fold(0.0, f64::max);
    println!("\n== loopback floor: 500 MB between two of our processes (best of 3) ==");
    let fl = floor::Floor::spawn();
    for (name, tls, dir) in [
        (
            "TLS 1.3 (session rustls configs), to CP",
            true,
            floor::Direction::ToCp,
        ),
        (
            "TLS 1.3 (session rustls configs), from CP",
            true,
            floor::Direction::FromCp,
        ),
        ("plain TCP, to CP", false, floor::Direction::ToCp),
        ("plain TCP, from CP", false, floor::Direction::FromCp),
    ] {
        let mut v = Vec::new();
        for _ in 0..3 {
            v.push(mbps(TP_BYTES, fl.run(tls, dir, TP_BYTES).await));
        }
        println!("{name:<48} {:>8.0} MB/s", best(&v));
    }
    drop(fl);
}

/// The same session measurements against one real clawkerd process on
/// loopback (no container, no bridge): what the path costs without
/// Docker's network in between.
async fn loopback_section() {
    let lg_dir = tempfile::tempdir().unwrap();
    let ca = clawker::pki::Ca::generate().unwrap();
    let cp_client = ca.mint_cp_client().unwrap();
    let leaf = ca
        .mint_agent(
            &ProjectSlug::new("p").unwrap(),
            &AgentName::new("a").unwrap(),
            "100bac",
        )
        .unwrap();
    let boot = lg_dir.path().join("boot");
    clawker::pki::write_bootstrap(&boot, &leaf, ca.cert_pem()).unwrap();
    std::fs::write(boot.join("assertion.jwt"), "x").unwrap();
    let passwd = lg_dir.path().join("passwd");
    // clawkerd resolves its agent user (`claude`) at boot and exits
    // without it.
    std::fs::write(
        &passwd,
        "root:x:0:0::/root:/bin/sh\nclaude:x:1001:1001::/tmp:/bin/sh\n",
    )
    .unwrap();
    let group = lg_dir.path().join("group");
    std::fs::write(&group, "root:x:0:\nclaude:x:1001:\n").unwrap();
    let addr: SocketAddr = "127.78.0.1:7700".parse().unwrap();
    let mut child = Process::new(env!("CARGO_BIN_EXE_clawkerd"))
        .args(["sleep", "600"])
        .env("CLAWKER_AGENT", "a")
        .env("CLAWKER_PROJECT", "p")
        .env("CLAWKER_BOOTSTRAP_DIR", &boot)
        .env("CLAWKER_LISTEN_ADDR", addr.to_string())
        .env("CLAWKER_PASSWD_FILE", &passwd)
        .env("CLAWKER_GROUP_FILE", &group)
        .env("CLAWKER_READY_FILE", boot.join("ready"))
        .env("CLAWKER_LOG_FILE", boot.join("log"))
        // Its state (the init marker) stays in the tempdir, never the
        // host's /var/lib/clawker.
        .env("CLAWKERD_STATE_DIR", lg_dir.path().join("state"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn clawkerd");
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(addr).is_err() {
        let log = || std::fs::read_to_string(boot.join("log")).unwrap_or_default();
        if let Ok(Some(status)) = child.try_wait() {
            panic!("clawkerd exited ({status}) before listening:\n{}", log());
        }
        assert!(
            Instant::now() < deadline,
            "clawkerd not listening:\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let dial = clawker::session::dial::DialConfig::new(
        ca.cert_pem().as_bytes(),
        cp_client.cert_pem.as_bytes(),
        cp_client.key_pem.as_bytes(),
    )
    .unwrap();
    let conn = clawker::session::dial::connect(addr, &dial)
        .await
        .expect("session");
    let mux = conn.mux.clone();
    let n = TP_BYTES.to_string();
    let count = format!("count={}", TP_BYTES >> 20);
    println!("\n== loopback: one real clawkerd process ==");
    for i in 0..20 {
        shell(&mux, &format!("lw{i}"), &["true"]).await;
    }
    let mut rtt = Vec::new();
    for i in 0..300 {
        let t = Instant::now();
        shell(&mux, &format!("lt{i}"), &["true"]).await;
        rtt.push(t.elapsed());
    }
    report("ShellCommand `true` round trip", &mut rtt);
    let best = |v: &[f64]| v.iter().cloned().fold(0.0, f64::max);
    println!("500 MB each, best of 3:");
    for (producer, argv) in [
        (
            "dd bs=1M",
            vec!["dd", "if=/dev/zero", "bs=1048576", count.as_str()],
        ),
        ("head -c", vec!["head", "-c", n.as_str(), "/dev/zero"]),
    ] {
        for (how, run) in [
            ("ShellCommand stdout", 0),
            ("streaming stdout (windowed)", 1),
        ] {
            let mut v = Vec::new();
            for i in 0..3 {
                let t = Instant::now();
                let bytes = if run == 0 {
                    shell(&mux, &format!("lo{i}-{how}-{producer}"), &argv).await as u64
                } else {
                    streamed_stdout(&mux, &format!("ls{i}-{producer}"), &argv).await
                };
                assert_eq!(bytes, TP_BYTES);
                v.push(mbps(bytes, t.elapsed()));
            }
            println!(
                "{:<48} {:>8.0} MB/s",
                format!("{producer}: {how}"),
                best(&v)
            );
        }
    }
    let mut v = Vec::new();
    for i in 0..3 {
        let t = Instant::now();
        streamed_stdin(
            &mux,
            &format!("lsi{i}"),
            &["dd", "bs=1048576", "of=/dev/null"],
        )
        .await;
        v.push(mbps(TP_BYTES, t.elapsed()));
    }
    println!(
        "{:<48} {:>8.0} MB/s",
        "stdin into dd of=/dev/null (windowed)",
        best(&v)
    );
    floor_measurements().await;
    drop(conn);
    let _ = child.kill();
    let _ = child.wait();
}

/// stdout through the streaming (flow-controlled) path; returns bytes.
async fn streamed_stdout(mux: &SessionMux, id: &str, argv: &[&str]) -> u64 {
    use clawker::session::stream::{Ending, Output, Streamed};
    let shell = pb::ShellCommand {
        stages: vec![pb::PipeStage {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }],
        timeout_seconds: 120,
        ..Default::default()
    };
    let mut s = Streamed::start(
        mux,
        id,
        pb::command::Payload::Shell(shell),
        Duration::from_secs(10),
    )
    .await
    .expect("start");
    s.close_stdin().await.expect("close stdin");
    let mut bytes = 0u64;
    loop {
        match s.next().await {
            Output::Stdout(b) => {
                bytes += b.len() as u64;
                s.ack(b.len()).await.expect("ack");
            }
            Output::End(Ending::Exited { code: 0, .. }) => return bytes,
            Output::End(e) => panic!("streamed: {e:?}"),
            _ => {}
        }
    }
}

/// TP_BYTES of stdin in 1 MiB frames (one shared buffer: no copy per
/// frame on our side), windowed by clawkerd's StdinConsumed.
async fn streamed_stdin(mux: &SessionMux, id: &str, argv: &[&str]) {
    use clawker::session::stream::{Ending, Output, Streamed};
    let shell = pb::ShellCommand {
        stages: vec![pb::PipeStage {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }],
        timeout_seconds: 120,
        ..Default::default()
    };
    let mut s = Streamed::start(
        mux,
        id,
        pb::command::Payload::Shell(shell),
        Duration::from_secs(10),
    )
    .await
    .expect("start");
    let frame = bytes::Bytes::from(vec![0u8; 1 << 20]);
    let mut left = TP_BYTES;
    while left > 0 {
        if s.stdin_room() >= frame.len() as u64 {
            let n = left.min(frame.len() as u64) as usize;
            s.stdin(frame.slice(..n)).await.expect("stdin");
            left -= n as u64;
        } else if let Output::End(e) = s.next().await {
            panic!("ended early: {e:?}");
        }
    }
    s.close_stdin().await.expect("close");
    loop {
        match s.next().await {
            Output::End(Ending::Exited { code: 0, .. }) => return,
            Output::End(e) => panic!("stdin: {e:?}"),
            _ => {}
        }
    }
}

async fn api_exec_stdin(docker: &bollard::Docker, id: &str, argv: &[&str]) {
    use bollard::exec::{StartExecOptions, StartExecResults};
    use tokio::io::AsyncWriteExt;
    let exec = docker
        .create_exec(
            id,
            bollard::models::ExecConfig {
                attach_stdin: Some(true),
                attach_stdout: Some(true),
                attach_stderr: Some(true),
                cmd: Some(argv.iter().map(|s| s.to_string()).collect()),
                ..Default::default()
            },
        )
        .await
        .expect("create_exec");
    if let StartExecResults::Attached {
        mut output,
        mut input,
    } = docker
        .start_exec(&exec.id, None::<StartExecOptions>)
        .await
        .expect("start_exec")
    {
        let drain = tokio::spawn(async move { while output.next().await.is_some() {} });
        let buf = vec![0u8; 1 << 20];
        let mut left = TP_BYTES as usize;
        while left > 0 {
            let n = left.min(buf.len());
            input.write_all(&buf[..n]).await.expect("stdin");
            left -= n;
        }
        input.shutdown().await.expect("close stdin");
        drop(input);
        let _ = drain.await;
    }
    let inspect = docker.inspect_exec(&exec.id).await.expect("inspect_exec");
    assert_eq!(inspect.exit_code, Some(0));
}

fn cli_exec_stdin(id: &str, argv: &[&str]) {
    use std::io::Write;
    let mut child = Process::new("docker")
        .args(["exec", "-i", id])
        .args(argv)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("docker exec");
    let mut input = child.stdin.take().expect("stdin");
    let buf = vec![0u8; 1 << 20];
    let mut left = TP_BYTES as usize;
    while left > 0 {
        let n = left.min(buf.len());
        input.write_all(&buf[..n]).expect("stdin");
        left -= n;
    }
    drop(input);
    assert!(child.wait().expect("wait").success());
}

// ---- load100: many containers starting at once ---------------------------

async fn load100_section(n: usize) {
    let ecp = EngineCp::start("clawker-perf-load", 2).await;
    remove_project(&ecp.docker, "perf-load").await;
    println!("\n== {n} agents started at once against one CP (real engine) ==");
    let (rss0, c0, t0) = (fleet::rss_mb(), fleet::cpu_ticks(), Instant::now());
    let runs = (0..n).map(|i| {
        let (docker, material, spec) = (
            ecp.docker.clone(),
            &ecp.material,
            ecp.spec("perf-load", &format!("l{i}")),
        );
        async move { cp::agent::run(&docker, material, &spec).await }
    });
    let results = futures::future::join_all(runs).await;
    let started = t0.elapsed();
    let mut ids = Vec::new();
    let mut failures = Vec::new();
    for r in results {
        match r {
            Ok(id) => ids.push(id),
            Err(e) => failures.push(format!("run: {e}")),
        }
    }
    let mut peak_rss = fleet::rss_mb();
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let pending = ids
            .iter()
            .filter(|id| {
                ecp.at_of("agent.init.completed", id).is_none()
                    && ecp.at_of("agent.init.failed", id).is_none()
            })
            .count();
        peak_rss = peak_rss.max(fleet::rss_mb());
        if pending == 0 || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let all = t0.elapsed();
    let cpu = (fleet::cpu_ticks() - c0) as f64 / fleet::ticks_per_sec() as f64;
    let mut to_init = Vec::new();
    let mut to_conn = Vec::new();
    for id in &ids {
        match (
            ecp.start_event_at(id),
            ecp.at_of("agent.session.connected", id),
            ecp.at_of("agent.init.completed", id),
        ) {
            (Some(s), Some(c), Some(d)) => {
                to_conn.push(Duration::from_nanos((c - s).max(0) as u64));
                to_init.push(Duration::from_nanos((d - s).max(0) as u64));
            }
            _ => failures.push(format!("{id}: no start/connected/init-completed event")),
        }
    }
    println!(
        "{:<48} {:.2} s (all {n} `agent run` calls returned)",
        "create+start, concurrently",
        started.as_secs_f64()
    );
    println!(
        "{:<48} {:.2} s",
        "last InitCompleted after",
        all.as_secs_f64()
    );
    if !to_init.is_empty() {
        report("start event → SessionConnected", &mut to_conn);
        report("start event → InitCompleted", &mut to_init);
    }
    println!("{:<48} {}", "failures", failures.len());
    for f in failures.iter().take(10) {
        println!("  {f}");
    }
    println!(
        "{:<48} {rss0:.1} → peak {peak_rss:.1} MB (this process: CP + harness)",
        "CP RSS"
    );
    println!(
        "{:<48} {cpu:.2} s over {:.1} s ({:.0} % of one core)",
        "CP CPU (utime+stime)",
        all.as_secs_f64(),
        cpu / all.as_secs_f64() * 100.0
    );
    // The whole CP (docker feeder, metrics, containment, audit, sessions)
    // idle with n sessions held.
    let idle = std::env::var("CLAWKER_IDLE_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30u64);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (t1, c1) = (Instant::now(), fleet::cpu_ticks());
    tokio::time::sleep(Duration::from_secs(idle)).await;
    let (secs, ticks) = (t1.elapsed().as_secs_f64(), fleet::cpu_ticks() - c1);
    println!(
        "{:<48} {:.2} % of one core ({ticks} ticks in {secs:.1} s), RSS {:.1} MB",
        format!("whole CP idle with {} sessions", ids.len()),
        ticks as f64 / fleet::ticks_per_sec() as f64 / secs * 100.0,
        fleet::rss_mb()
    );
    for id in &ids {
        let _ = cp::agent::remove(&ecp.docker, id).await;
    }
    remove_project(&ecp.docker, "perf-load").await;
    ecp.stop().await;
}

// ---- fleet: 10,000 sessions on one CP ------------------------------------

async fn fleet_section(n: usize) {
    loadgen::raise_fd_limit_to(n as u64 + 1024);
    let lg = loadgen::LoadGen::spawn(n);
    println!(
        "\n== {n} sessions on one CP (agents: load generator, pid {}, real mTLS) ==",
        lg.pid()
    );
    let rss_before = fleet::rss_mb();
    let cp = fleet::Cp::start(&lg);
    let took = cp.dial_all(0..n).await;
    println!("{:<48} {:.2} s", "all connected after", took.as_secs_f64());
    tokio::time::sleep(Duration::from_secs(3)).await; // settle: sessions idle
    let rss = fleet::rss_mb();
    println!(
        "{:<48} {rss:.1} MB (before dialing: {rss_before:.1} MB; {:.1} KB/session)",
        "CP process RSS",
        (rss - rss_before) * 1024.0 / n as f64
    );
    // How much of that is the allocator holding freed handshake memory
    // (glibc keeps freed pages of its heap resident until trimmed).
    // SAFETY: malloc_trim only returns free memory to the kernel.
    unsafe { libc::malloc_trim(0) };
    let trimmed = fleet::rss_mb();
    println!(
        "{:<48} {trimmed:.1} MB ({:.1} KB/session)",
        "  after malloc_trim(0)",
        (trimmed - rss_before) * 1024.0 / n as f64
    );
    // Long enough to hold whole keepalive periods of both sides (the CP
    // pings every 60 s, clawkerd every 120 s): a shorter window can fall
    // between pings and measure nothing.
    let window = Duration::from_secs(
        std::env::var("CLAWKER_FLEET_IDLE_SECS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(240),
    );
    let (t0, c0) = (Instant::now(), fleet::cpu_ticks());
    tokio::time::sleep(window).await;
    let (secs, ticks) = (t0.elapsed().as_secs_f64(), fleet::cpu_ticks() - c0);
    println!(
        "{:<48} {:.2} % of one core ({ticks} ticks in {secs:.1} s)",
        "idle CP CPU (utime+stime, /proc/self/stat)",
        ticks as f64 / fleet::ticks_per_sec() as f64 / secs * 100.0
    );
    // Round trips to sessions picked across the whole range.
    let mut lookup = Vec::new();
    let mut rtt = Vec::new();
    for k in 0..1000usize {
        let id = loadgen::agent_id((k * 7919) % n);
        let t = Instant::now();
        let live = cp.sessions.live(&id).await.expect("live session");
        lookup.push(t.elapsed());
        let t = Instant::now();
        shell(&live.mux, &format!("rt{k}"), &["true"]).await;
        rtt.push(t.elapsed());
    }
    report("ShellCommand `true` round trip (open session)", &mut rtt);
    report("Sessions::live(id) lookup before it", &mut lookup);
    println!("{:<48} {:.1} MB", "CP process RSS after", fleet::rss_mb());
}

// ---- exec: the operator's way in -----------------------------------------

fn exec_section() {
    let image =
        std::env::var("CLAWKER_TEST_IMAGE").unwrap_or_else(|_| "clawker-agent:latest".into());
    let runtime = || {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("runtime")
    };
    actix::System::with_tokio_rt(runtime).block_on(async move {
        let docker = clawker::docker::connect().await.expect("docker engine");
        let state = tempfile::tempdir().expect("tempdir");
        clawker::pki::AuthMaterial::ensure(state.path()).expect("ca");
        let net = "clawker-bench-exec";
        let overrides = cp::config::Overrides {
            network: Some(net.into()),
            subnet: Some("10.224.200.0/24".into()),
            admin_addr: Some("127.0.0.1:0".parse().unwrap()),
            metrics_addr: Some("127.0.0.1:0".parse().unwrap()),
            ..Default::default()
        };
        let cfg =
            cp::config::resolve(state.path().to_owned(), Default::default(), overrides).unwrap();
        let material = clawker::pki::AuthMaterial::load(state.path()).unwrap();
        let running = cp::start(&cfg).await.expect("cp");
        let mut events = running.bus.subscribe_all().unwrap();
        let spec = RunSpec {
            agent: AgentName::new("ex").unwrap(),
            project: ProjectSlug::new("bench").unwrap(),
            image: image.clone(),
            network: cfg.network.clone(),
            agent_port: cfg.agent_port,
            command: vec![],
            env: vec![],
            hardening: Default::default(),
            extra_labels: HashMap::from([("dev.clawker.test".to_owned(), "bench-exec".to_owned())]),
            extra_networks: vec![],
            mint_for_container: None,
            cert_ttl: cp::config::DEFAULT_AGENT_CERT_TTL,
            placement: vec![],
        };
        let id = cp::agent::run(&docker, &material, &spec)
            .await
            .expect("run");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let e = tokio::time::timeout(Duration::from_secs(60), events.recv())
                .await
                .expect("events")
                .expect("bus");
            if e.name() == "agent.init.completed" && e.to_json()["container_id"] == id {
                break;
            }
            assert!(Instant::now() < deadline, "init did not complete");
        }
        let admin = running.admin_api_addr.to_string();
        let state_dir = state.path().to_owned();
        let id2 = id.clone();
        tokio::task::spawn_blocking(move || exec_measurements(&state_dir, &admin, &id2, &image))
            .await
            .expect("measurements");
        cp::agent::remove(&docker, &id).await.ok();
        cp::stop(running).await;
        let _ = Process::new("docker").args(["network", "rm", net]).output();
    });
}

/// The `clawker` binary of this build (release under `cargo bench`).
fn clawker_cli(state_dir: &std::path::Path, admin: &str) -> Process {
    let mut c = Process::new(env!("CARGO_BIN_EXE_clawker"));
    c.arg("--state-dir")
        .arg(state_dir)
        .arg("--admin-addr")
        .arg(admin);
    c
}

fn exec_measurements(state_dir: &std::path::Path, admin: &str, id: &str, image: &str) {
    let clawker = |args: &[&str]| {
        let mut c = clawker_cli(state_dir, admin);
        c.args(["agent", "exec", "ex", "--project", "bench"])
            .args(args);
        c
    };
    let docker = |args: &[&str]| {
        let mut c = Process::new("docker");
        c.arg("exec").args(args);
        c
    };
    let status = |mut c: Process| {
        let st = c
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .status()
            .expect("spawn");
        assert!(st.success(), "{c:?}: {st}");
    };
    println!("\n== exec, whole CLI process, `true` (image {image}) ==");
    for _ in 0..5 {
        status(clawker(&["true"]));
        status(docker(&[id, "true"]));
    }
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for _ in 0..50 {
        let t = Instant::now();
        status(clawker(&["true"]));
        ours.push(t.elapsed());
        let t = Instant::now();
        status(docker(&[id, "true"]));
        theirs.push(t.elapsed());
    }
    let (a, b) = (pct(&mut ours, 0.5), pct(&mut theirs, 0.5));
    report("clawker agent exec NAME -- true", &mut ours);
    report("docker exec NAME true", &mut theirs);
    println!(
        "{:<48} {:.1}x faster (median)",
        "ratio",
        b.as_secs_f64() / a.as_secs_f64()
    );

    println!("\n== keystroke echo round trip in a tty (500 keys) ==");
    let mut ours = echo_round_trips(clawker(&["-it", "--", "cat"]), 500);
    report("clawker agent exec -it NAME -- cat", &mut ours);
    let mut theirs = echo_round_trips(docker(&["-it", id, "cat"]), 500);
    report("docker exec -it NAME cat", &mut theirs);

    println!("\n== cat of a 500 MB file (same container, best of 3) ==");
    status(clawker(&[
        "--",
        "sh",
        "-c",
        "head -c 524288000 /dev/zero > /tmp/big",
    ]));
    for (name, mk) in [
        ("clawker agent exec NAME -- cat /tmp/big", 0),
        ("docker exec NAME cat /tmp/big", 1),
    ] {
        let mut best = Duration::MAX;
        for _ in 0..3 {
            let mut c = if mk == 0 {
                clawker(&["--", "cat", "/tmp/big"])
            } else {
                docker(&[id, "cat", "/tmp/big"])
            };
            let t = Instant::now();
            let bytes = drain_stdout(&mut c);
            let dt = t.elapsed();
            assert_eq!(bytes, 524_288_000, "{name}");
            best = best.min(dt);
        }
        println!(
            "{name:<48} {:>7.2} s  {:>7.0} MB/s",
            best.as_secs_f64(),
            524.288 / best.as_secs_f64()
        );
    }
    status(clawker(&["--", "rm", "-f", "/tmp/big"]));
}

fn drain_stdout(c: &mut Process) -> usize {
    use std::io::Read;
    let mut child = c
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut out = child.stdout.take().expect("stdout");
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0;
    loop {
        match out.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => bytes += n,
        }
    }
    assert!(child.wait().expect("wait").success());
    bytes
}

/// Runs `cmd` (an interactive `cat` with a tty) under a real pty and times
/// each keystroke until its echo comes back through the remote terminal.
fn echo_round_trips(mut cmd: Process, keys: usize) -> Vec<Duration> {
    let pty = pty::Pty::open(24, 80).expect("pty");
    let mut child = pty.spawn(&mut cmd).expect("spawn under pty");
    // Ready when a first key echoes.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = String::new();
    while !seen.contains('#') {
        pty.write(b"#").expect("type");
        assert!(Instant::now() < deadline, "no echo: {seen:?}");
        if let Ok(b) = pty.read_some(Duration::from_millis(200)) {
            seen.push_str(&String::from_utf8_lossy(&b));
        }
    }
    // Settle: drain whatever the warm-up keys still echo.
    while let Ok(b) = pty.read_some(Duration::from_millis(300)) {
        if b.is_empty() {
            break;
        }
    }
    let mut v = Vec::with_capacity(keys);
    for i in 0..keys {
        let key = b'a' + (i % 26) as u8;
        let t = Instant::now();
        pty.write(&[key]).expect("type");
        loop {
            let b = pty.read_some(Duration::from_secs(5)).expect("read");
            assert!(!b.is_empty(), "echo lost");
            if b.contains(&key) {
                break;
            }
        }
        v.push(t.elapsed());
        // cat has a line of its own to finish now and then.
        if i % 64 == 63 {
            pty.write(b"\r").expect("type");
            while let Ok(b) = pty.read_some(Duration::from_millis(200)) {
                if b.is_empty() {
                    break;
                }
            }
        }
    }
    pty.write(b"\x04").ok(); // ^D at a line start: EOF for cat
    pty.write(b"\r\x04").ok();
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
        let _ = pty.read_some(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    v
}

// ---- containment: AgentUntrusted → egress cut --------------------------------

const CT_NETNS: &str = "clawker-bench-inet";
const CT_VETH: &str = "cb-h0";
const CT_INET: &str = "10.252.30.2";

fn sh_ok(cmd: &str, args: &[&str]) -> String {
    let out = Process::new(cmd).args(args).output().expect(cmd);
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Removes everything the section creates (also what a crashed run left).
async fn containment_teardown() {
    let ids = Process::new("docker")
        .args(["ps", "-aq", "--filter", "label=dev.clawker.test=bench-ct"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
        .unwrap_or_default();
    for id in ids.split_whitespace() {
        let _ = Process::new("docker").args(["rm", "-f", "-v", id]).output();
    }
    remove_quarantine("clawker-bench-ctq").await;
    let _ = Process::new("docker")
        .args(["network", "rm", "clawker-bench-ct"])
        .output();
    let _ = Process::new("ip").args(["link", "del", CT_VETH]).output();
    let _ = Process::new("ip").args(["netns", "del", CT_NETNS]).output();
}

/// "The internet": an HTTP server in a namespace behind a veth pair,
/// routed via the host; counts the connections it accepted.
fn containment_world() -> Arc<std::sync::atomic::AtomicUsize> {
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;
    let ip = |a: &[&str]| sh_ok("ip", a);
    ip(&["netns", "add", CT_NETNS]);
    ip(&[
        "link", "add", CT_VETH, "type", "veth", "peer", "name", "cb-n0",
    ]);
    ip(&["link", "set", "cb-n0", "netns", CT_NETNS]);
    ip(&["addr", "add", "10.252.30.1/30", "dev", CT_VETH]);
    ip(&["link", "set", CT_VETH, "up"]);
    ip(&[
        "-n",
        CT_NETNS,
        "addr",
        "add",
        "10.252.30.2/30",
        "dev",
        "cb-n0",
    ]);
    ip(&["-n", CT_NETNS, "link", "set", "cb-n0", "up"]);
    ip(&["-n", CT_NETNS, "link", "set", "lo", "up"]);
    ip(&[
        "-n",
        CT_NETNS,
        "route",
        "add",
        "default",
        "via",
        "10.252.30.1",
    ]);
    let listener = std::thread::spawn(|| {
        let f = std::fs::File::open(format!("/run/netns/{CT_NETNS}")).unwrap();
        // SAFETY: setns on a thread of our own that ends right after.
        assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
        std::net::TcpListener::bind((CT_INET, 8080)).unwrap()
    })
    .join()
    .unwrap();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let a = accepted.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut s) = conn else { continue };
            a.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            std::thread::spawn(move || {
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let mut buf = [0u8; 512];
                let _ = s.read(&mut buf);
                let _ = s.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 7\r\n\r\ninet-ok");
            });
        }
    });
    accepted
}

async fn containment_section() {
    use clawker::events::{AgentRef, AgentUntrusted, ContainmentAction as A, UntrustedReason};
    use clawker::policy::containment::{ContainmentConfig, Lift, Rule, TriggerKind};
    use clawker::runtime::NetworkRole;
    use clawker::session::command::{RunAs, shell};
    use std::sync::atomic::Ordering;

    containment_teardown().await;
    let accepted = containment_world();
    let docker = clawker::docker::connect().await.expect("docker engine");
    let state = tempfile::tempdir().expect("tempdir");
    clawker::pki::AuthMaterial::ensure(state.path()).expect("ca");
    let rule = |r, actions| Rule {
        on: TriggerKind::Untrusted,
        reasons: vec![r],
        count: 1,
        window_secs: 60,
        actions,
    };
    let file = cp::config::FileConfig {
        containment: Some(ContainmentConfig {
            rules: vec![
                rule(UntrustedReason::CertInvalid, vec![A::Alert, A::Isolate]),
                rule(UntrustedReason::CertCnMismatch, vec![A::Alert, A::Lock]),
            ],
            ..ContainmentConfig::default()
        }),
        ..Default::default()
    };
    let overrides = cp::config::Overrides {
        network: Some("clawker-bench-ct".into()),
        subnet: Some("10.222.30.0/24".into()),
        quarantine_network: Some("clawker-bench-ctq".into()),
        quarantine_subnet: Some("10.222.31.0/24".into()),
        admin_addr: Some("127.0.0.1:0".parse().unwrap()),
        metrics_addr: Some("127.0.0.1:0".parse().unwrap()),
        ..Default::default()
    };
    let cfg = cp::config::resolve(state.path().to_owned(), file, overrides).unwrap();
    let material = clawker::pki::AuthMaterial::load(state.path()).unwrap();
    let running = cp::start(&cfg).await.expect("cp");
    let seen: Arc<Mutex<Vec<(String, serde_json::Value)>>> = Arc::default();
    {
        let mut sub = running.bus.subscribe_all().unwrap();
        let s = seen.clone();
        actix::spawn(async move {
            while let Some(e) = sub.recv().await {
                s.lock().unwrap().push((e.name().to_owned(), e.to_json()));
            }
        });
    }
    let spec = RunSpec {
        agent: AgentName::new("cut").unwrap(),
        project: ProjectSlug::new("bench").unwrap(),
        image: image(),
        network: cfg.network.clone(),
        agent_port: cfg.agent_port,
        command: vec![],
        env: vec![],
        hardening: Default::default(),
        extra_labels: HashMap::from([("dev.clawker.test".to_owned(), "bench-ct".to_owned())]),
        extra_networks: vec![],
        mint_for_container: None,
        cert_ttl: cp::config::DEFAULT_AGENT_CERT_TTL,
        placement: vec![],
    };
    let id = cp::agent::run(&docker, &material, &spec)
        .await
        .expect("run");
    let rfc = |j: &serde_json::Value| {
        time::OffsetDateTime::parse(
            j["at"].as_str().unwrap_or_default(),
            &time::format_description::well_known::Rfc3339,
        )
        .map(|t| t.unix_timestamp_nanos())
        .ok()
    };
    // A trusted session over `role`'s network, connected after `mark`;
    // returns it and the SessionConnected time (ns since the epoch).
    let session_on = |role: NetworkRole, mark: usize| {
        let (running, seen, id) = (&running, &seen, &id);
        async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let f = running.inspect.inspect(id).await.unwrap();
                if f.ip_network == Some(role) {
                    let prefix = format!("{}:", f.ip.unwrap());
                    let at = seen.lock().unwrap().iter().skip(mark).find_map(|(n, j)| {
                        (n == "agent.session.connected"
                            && j["container_id"] == *id
                            && j["address"]
                                .as_str()
                                .is_some_and(|a| a.starts_with(&prefix)))
                        .then(|| rfc(j))
                        .flatten()
                    });
                    if let Some(at) = at
                        && let Some(l) = running.sessions.live(id).await
                        && l.trusted
                        && !l.mux.is_closed()
                    {
                        return (l, at);
                    }
                }
                assert!(Instant::now() < deadline, "no session on {role:?}");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };
    let mut seq = 0u32;
    let mut run_sh = |live: &clawker::session::lifecycle::LiveSession, script: &str| {
        seq += 1;
        let (mux, id) = (live.mux.clone(), format!("bench-ct-{seq}"));
        let cmd = shell(script, &RunAs::root(), 10, b"");
        async move {
            run_to_completion(&mux, &id, cmd, Duration::from_secs(20), 4096)
                .await
                .map(|d| d.stdout.text())
        }
    };
    let now_ns = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as i128
    };
    // The probe: connect again and again, noting the agent's clock
    // (adjtimex: the host's realtime clock, µs) before each attempt; the
    // note of the first attempt that fails is the cut. An attempt that was
    // mid-flight when a network vanished hangs rather than fails, so each
    // is bounded (and its start, not its end, is what counts). Detached
    // (setsid) so a session moving does not end it.
    let probe = format!(
        "rm -f /tmp/cut; setsid sh -c 'while t=$(adjtimex); printf \"GET / HTTP/1.0\\r\\n\\r\\n\" | timeout -s KILL 2 nc {CT_INET} 8080 2>/dev/null | grep -q inet-ok; do :; done; echo \"$t\" > /tmp/cut' </dev/null >/dev/null 2>&1 &"
    );
    let parse_cut = |text: &str| -> Option<i128> {
        let field = |k: &str| {
            text.lines()
                .find_map(|l| l.trim().strip_prefix(k)?.trim().parse::<i128>().ok())
        };
        Some(field("time.tv_sec:")? * 1_000_000_000 + field("time.tv_usec:")? * 1000)
    };

    wait_until(|| {
        seen.lock()
            .unwrap()
            .iter()
            .any(|(n, j)| n == "agent.init.completed" && j["container_id"] == id)
    })
    .await;
    let (mut cut_isolate, mut cut_lock, mut redial, mut period) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..40 {
        let lock = round % 2 == 1;
        let (live, _) = session_on(NetworkRole::Agent, 0).await;
        run_sh(&live, &probe).await.expect("start probe");
        // Let the probe loop run a while (and measure its period).
        let (a0, t_probe) = (accepted.load(Ordering::SeqCst), Instant::now());
        while accepted.load(Ordering::SeqCst) < a0 + 20 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        period.push(t_probe.elapsed() / 20);
        let mark = seen.lock().unwrap().len();
        let t0 = now_ns();
        running.bus.publish(AgentUntrusted {
            agent: AgentRef::new(id.as_str(), "cut", "bench"),
            reason: if lock {
                UntrustedReason::CertCnMismatch
            } else {
                UntrustedReason::CertInvalid
            },
            detail: "bench".into(),
            at: clawker::events::now(),
        });
        let live = if lock {
            live
        } else {
            let (l, at) = session_on(NetworkRole::Quarantine, mark).await;
            redial.push(Duration::from_nanos((at - t0).max(0) as u64));
            l
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        let cut_at = loop {
            let out = run_sh(&live, "cat /tmp/cut 2>/dev/null; true")
                .await
                .unwrap_or_default();
            if let Some(t) = parse_cut(&out) {
                break t;
            }
            assert!(Instant::now() < deadline, "egress never cut");
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let d = Duration::from_nanos((cut_at - t0).max(0) as u64);
        if lock {
            cut_lock.push(d)
        } else {
            cut_isolate.push(d)
        }
        let lift = if lock { Lift::Unlock } else { Lift::Release };
        let mark = seen.lock().unwrap().len();
        running
            .containment
            .lift(&id, lift, &running.bus)
            .await
            .expect("lift");
        if !lock {
            session_on(NetworkRole::Agent, mark).await;
        }
    }
    println!(
        "\n== containment: AgentUntrusted → egress cut (first failed connection, agent clock) =="
    );
    report("isolate (quarantine): egress cut", &mut cut_isolate);
    report("lock (netns nftables): egress cut", &mut cut_lock);
    report("isolate: session re-established (quarantine)", &mut redial);
    report("probe period (one connection attempt)", &mut period);

    cp::agent::remove(&docker, &id).await.ok();
    let (net, q) = (cfg.network.clone(), cfg.quarantine_network.clone());
    cp::stop(running).await;
    remove_quarantine(&q).await;
    let _ = Process::new("docker")
        .args(["network", "rm", &net])
        .output();
    containment_teardown().await;
}

async fn wait_until<F: Fn() -> bool>(f: F) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !f() {
        assert!(Instant::now() < deadline, "timed out");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
