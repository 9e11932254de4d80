//! One-time init vs every-start boot, and a failed step ending the
//! container, on a real Docker engine with real binaries: `clawker cp
//! serve` as its own process (so it can be `kill -9`ed), `clawker agent
//! run` as its own process (so its exit code is real), agent containers
//! from the locally built image (`CLAWKER_TEST_IMAGE`, default
//! `clawker-agent:latest`).
//!
//! Run under the shared engine's lock: `flock /tmp/clawker-docker.lock
//! cargo test --test e2e_lifecycle`. Networks are 10.221.<n>.0/24; every
//! container and network a test makes is removed on drop. A missing engine
//! is a failure, not a skip (`CLAWKER_SKIP_DOCKER=1` skips deliberately).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use clawker::admin_api::client::AdminClient;
use clawker::cp::{self, agent::RunSpec};
use clawker::identity::{AgentName, ProjectSlug};
use clawker::pki::AuthMaterial;
use futures::StreamExt;
use serde_json::Value;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn image() -> String {
    std::env::var("CLAWKER_TEST_IMAGE").unwrap_or_else(|_| "clawker-agent:latest".into())
}

fn docker_cli(args: &[&str]) -> String {
    let out = Command::new("docker")
        .args(args)
        .output()
        .expect("docker CLI");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

async fn docker_or_fail() -> Option<bollard::Docker> {
    match clawker::docker::connect().await {
        Ok(d) => Some(d),
        Err(e) if std::env::var("CLAWKER_SKIP_DOCKER").as_deref() == Ok("1") => {
            eprintln!("skipping (CLAWKER_SKIP_DOCKER=1): {e}");
            None
        }
        Err(e) => panic!("the Docker e2e suite needs an engine: {e}"),
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One test's state dir, network and containers; removed on drop.
struct Env {
    label: String,
    network: String,
    subnet: String,
    state: tempfile::TempDir,
    /// Containers made outside `spec` (by the CLI), removed by name.
    names: Vec<String>,
    cps: Vec<Child>,
}

impl Env {
    fn new(n: u8) -> Self {
        let state = tempfile::tempdir().unwrap();
        AuthMaterial::ensure(state.path()).unwrap();
        let env = Self {
            label: format!("lc-{n}-{}", std::process::id()),
            network: format!("clawker-lc-{n}"),
            subnet: format!("10.221.{n}.0/24"),
            state,
            names: Vec::new(),
            cps: Vec::new(),
        };
        env.cleanup();
        env
    }

    fn cleanup(&self) {
        let mut ids: Vec<String> = docker_cli(&[
            "ps",
            "-aq",
            "--filter",
            &format!("label=dev.clawker.test={}", self.label),
        ])
        .split_whitespace()
        .map(str::to_owned)
        .collect();
        ids.extend(self.names.iter().cloned());
        if !ids.is_empty() {
            let mut args = vec!["rm", "-f"];
            args.extend(ids.iter().map(String::as_str));
            docker_cli(&args);
        }
        docker_cli(&["network", "rm", &self.network]);
    }

    fn spec(&self, name: &str) -> RunSpec {
        RunSpec {
            agent: AgentName::new(name).unwrap(),
            project: ProjectSlug::new("e2e").unwrap(),
            image: image(),
            network: self.network.clone(),
            agent_port: clawker::defaults::AGENT_PORT,
            command: vec![],
            env: vec![],
            hardening: Default::default(),
            extra_labels: HashMap::from([("dev.clawker.test".to_owned(), self.label.clone())]),
            extra_networks: vec![],
            mint_for_container: None,
            cert_ttl: clawker::cp::config::DEFAULT_AGENT_CERT_TTL,
            placement: vec![],
        }
    }

    /// `clawker cp serve` as a child process; returns its admin address
    /// once the admin API answers.
    async fn start_cp_process(&mut self, extra: &[&str]) -> (SocketAddr, AdminClient) {
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_clawker"));
        cmd.arg("--state-dir")
            .arg(self.state.path())
            .args(["--admin-addr", &admin.to_string()])
            .args(["cp", "serve", "--network", &self.network])
            .args(["--subnet", &self.subnet])
            .args(["--metrics-addr", "127.0.0.1:0", "--log-format", "json"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(if std::env::var_os("CLAWKER_TEST_ECHO").is_some() {
                Stdio::inherit()
            } else {
                Stdio::null()
            });
        self.cps.push(cmd.spawn().expect("spawn clawker cp serve"));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(c) = AdminClient::connect(self.state.path(), admin).await
                && c.health("").await.is_ok()
            {
                return (admin, c);
            }
            assert!(Instant::now() < deadline, "cp serve did not come up");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `kill -9` of the newest CP process.
    fn kill_cp_process(&mut self) {
        let mut cp = self.cps.pop().expect("a CP process");
        // SAFETY: kill with plain integers.
        unsafe { libc::kill(cp.id() as i32, libc::SIGKILL) };
        let _ = cp.wait();
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        for cp in &mut self.cps {
            let _ = cp.kill();
            let _ = cp.wait();
        }
        self.cleanup();
    }
}

/// Collects `agent.*` events about one container from a WatchEvents stream
/// (subscribed before the action, so nothing is missed).
struct Events {
    stream: tonic::Streaming<clawker::proto::admin::v1::Event>,
    seen: Vec<(String, Value)>,
}

impl Events {
    async fn watch(client: &AdminClient) -> Self {
        Self {
            stream: client.watch_events(vec!["agent.".into()]).await.unwrap(),
            seen: Vec::new(),
        }
    }

    fn of(&self, id: &str, name: &str) -> Vec<Value> {
        self.seen
            .iter()
            .filter(|(n, j)| n == name && j["container_id"] == id)
            .map(|(_, j)| j.clone())
            .collect()
    }

    async fn wait(&mut self, id: &str, name: &str, n: usize) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while self.of(id, name).len() < n {
            let ev = tokio::time::timeout_at(deadline, self.stream.next())
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "timed out waiting for {n}× {name}; saw {:?}",
                        self.seen.iter().map(|(n, _)| n).collect::<Vec<_>>()
                    )
                })
                .expect("event stream ended")
                .expect("event");
            let json: Value = serde_json::from_str(&ev.json).unwrap();
            self.seen.push((ev.name, json));
        }
    }
}

fn step_names(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| {
            format!(
                "{}:{}",
                e["plan"].as_str().unwrap_or("?"),
                e["step"].as_str().unwrap_or("?")
            )
        })
        .collect()
}

#[test]
fn docker_restart_boots_without_init_and_a_killed_cp_runs_nothing_again() {
    let _g = serial();
    let mut env = Env::new(1);
    actix::System::new().block_on(async {
        let Some(docker) = docker_or_fail().await else {
            return;
        };
        let (_, client) = env.start_cp_process(&[]).await;
        let mut events = Events::watch(&client).await;
        let material = AuthMaterial::load(env.state.path()).unwrap();
        let id = cp::agent::run(&docker, &material, &env.spec("alpha"))
            .await
            .unwrap();

        // Fresh: init then boot, in one start sequence.
        events.wait(&id, "agent.init.completed", 1).await;
        let d = &events.of(&id, "agent.plan.decided")[0];
        assert_eq!(
            (d["initialized"].as_bool(), d["cmd_running"].as_bool()),
            (Some(false), Some(false))
        );
        assert_eq!(d["plans"], serde_json::json!(["init", "boot"]));
        assert_eq!(events.of(&id, "agent.registered")[0]["ok"], true);

        // docker restart: the marker survives in the writable layer; boot
        // runs, init does not, and the command is started again.
        docker
            .restart_container(
                &id,
                None::<bollard::query_parameters::RestartContainerOptions>,
            )
            .await
            .unwrap();
        events.wait(&id, "agent.init.completed", 2).await;
        let d = &events.of(&id, "agent.plan.decided")[1];
        assert_eq!(
            (d["initialized"].as_bool(), d["cmd_running"].as_bool()),
            (Some(true), Some(false))
        );
        assert_eq!(
            events.of(&id, "agent.init.completed")[1]["plans"],
            serde_json::json!(["boot"])
        );
        let after_restart = &events.of(&id, "agent.init.step.started")[9..];
        assert_eq!(
            step_names(after_restart),
            ["boot:docker-socket", "boot:pre-run", "boot:agent-ready"]
        );
        assert_eq!(
            events.of(&id, "agent.registered").len(),
            1,
            "no second Register"
        );
        drop(events);

        // kill -9 of the CP, then a new CP: its boot dial reattaches to the
        // running command; nothing runs again, the session Matches.
        env.kill_cp_process();
        let (_, client) = env.start_cp_process(&[]).await;
        let deadline = Instant::now() + Duration::from_secs(60);
        let agent = loop {
            let view = client.worldview().await.unwrap();
            let a = view["agents"][&id].clone();
            if a["start"].is_object() && a["trust"]["at"].is_string() {
                break a;
            }
            assert!(
                Instant::now() < deadline,
                "no session after the CP restart: {view}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(agent["start"]["initialized"], true);
        assert_eq!(
            agent["start"]["cmd_running"], true,
            "the user command is running"
        );
        assert_eq!(agent["start"]["plans"], serde_json::json!([]));
        assert_eq!(agent["start"]["skipped"], "cmd_running");
        assert_eq!(agent["init"]["status"], "unknown", "no step ran on this CP");
        assert_eq!(agent["trust"]["trusted"], true);
        assert_eq!(agent["registered"], true, "Match, not Register");
        assert_eq!(agent["session_status"], "connected");
        let running = docker_cli(&["inspect", "-f", "{{.State.Running}}", &id]);
        assert_eq!(running, "true");
    });
}

#[test]
fn a_failing_pre_run_hook_ends_the_container_and_agent_run_exits_with_its_code() {
    let _g = serial();
    let mut env = Env::new(2);
    std::fs::write(
        env.state.path().join("cp.toml"),
        "[hooks]\npre_run = \"echo 'pre-run broke' >&2; exit 3\"\n",
    )
    .unwrap();
    actix::System::new().block_on(async {
        if docker_or_fail().await.is_none() {
            return;
        }
        let (admin, _client) = env.start_cp_process(&[]).await;
        env.names.push("clawker.e2e.beta".into());
        let state = env.state.path().to_owned();
        let img = image();
        let network = env.network.clone();
        let out = tokio::task::spawn_blocking(move || {
            Command::new(env!("CARGO_BIN_EXE_clawker"))
                .arg("--state-dir")
                .arg(&state)
                .args(["--admin-addr", &admin.to_string()])
                .args(["agent", "run", "beta", "--project", "e2e"])
                .args([
                    "--image",
                    &img,
                    "--network",
                    &network,
                    "--timeout-secs",
                    "60",
                ])
                .output()
                .expect("clawker agent run")
        })
        .await
        .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(3),
            "agent run exits with the hook's code: {stderr}"
        );
        assert!(
            stderr.contains("pre-run broke"),
            "the step's stderr is shown: {stderr}"
        );
        assert!(stderr.contains("boot step \"pre-run\" failed"), "{stderr}");

        // The container ended by itself with the same code.
        let deadline = Instant::now() + Duration::from_secs(30);
        while docker_cli(&["inspect", "-f", "{{.State.Running}}", "clawker.e2e.beta"]) != "false" {
            assert!(Instant::now() < deadline, "container still running");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(
            docker_cli(&["inspect", "-f", "{{.State.ExitCode}}", "clawker.e2e.beta"]),
            "3"
        );
        // And the CP says so.
        let client = AdminClient::connect(env.state.path(), admin).await.unwrap();
        let id = docker_cli(&["inspect", "-f", "{{.Id}}", "clawker.e2e.beta"]);
        let deadline = Instant::now() + Duration::from_secs(30);
        let ended = loop {
            let view = client.worldview().await.unwrap();
            let t = view["agents"][&id]["terminated"].clone();
            if t.is_object() {
                break t;
            }
            assert!(Instant::now() < deadline, "no agent.terminated: {view}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(ended["by"], "self_exit");
        assert_eq!(ended["step"], "pre-run");
        assert_eq!(ended["plan"], "boot");
        assert_eq!(ended["exit_code"], 3);
    });
}

#[test]
fn keep_on_init_failure_leaves_the_container_up_and_the_next_session_boots_again() {
    let _g = serial();
    let mut env = Env::new(3);
    std::fs::write(
        env.state.path().join("cp.toml"),
        "keep_on_init_failure = true\n[hooks]\npre_run = \"echo 'kept' >&2; exit 4\"\n",
    )
    .unwrap();
    actix::System::new().block_on(async {
        let Some(docker) = docker_or_fail().await else {
            return;
        };
        let (_, client) = env.start_cp_process(&[]).await;
        let mut events = Events::watch(&client).await;
        let material = AuthMaterial::load(env.state.path()).unwrap();
        let id = cp::agent::run(&docker, &material, &env.spec("gamma"))
            .await
            .unwrap();

        events.wait(&id, "agent.init.failed", 1).await;
        let failed = &events.of(&id, "agent.init.failed")[0];
        assert_eq!(failed["plan"], "boot");
        assert_eq!(failed["failed_step"], "pre-run");
        assert_eq!(failed["exit_code"], 4);
        let step = &events.of(&id, "agent.init.step.failed")[0];
        assert!(
            step["output"].as_str().unwrap_or("").contains("kept"),
            "{step}"
        );
        // Init completed before the boot step failed: the marker is there,
        // and PID 1 still answers (no exit_on_non_zero was sent).
        let marker = Command::new("docker")
            .args([
                "exec",
                &id,
                "test",
                "-e",
                "/var/lib/clawker/agent-initialized",
            ])
            .status()
            .unwrap();
        assert!(marker.success(), "init marker in the kept container");
        drop(events);

        // A new CP: clawkerd is alive and serving (it did not exit), the
        // command never started, so the next session runs boot again, and
        // fails again, still without ending anything.
        env.kill_cp_process();
        let (_, client) = env.start_cp_process(&[]).await;
        let deadline = Instant::now() + Duration::from_secs(60);
        let agent = loop {
            let view = client.worldview().await.unwrap();
            let a = view["agents"][&id].clone();
            if a["init"]["status"] == "failed" {
                break a;
            }
            assert!(
                Instant::now() < deadline,
                "no boot on the next session: {view}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(agent["start"]["initialized"], true);
        assert_eq!(agent["start"]["cmd_running"], false);
        assert_eq!(agent["start"]["plans"], serde_json::json!(["boot"]));
        assert_eq!(agent["init"]["plan"], "boot");
        assert_eq!(agent["init"]["step"], "pre-run");
        assert!(agent["terminated"].is_null(), "nothing ended: {agent}");
        assert_eq!(agent["session_status"], "connected");
        assert_eq!(
            docker_cli(&["inspect", "-f", "{{.State.Running}}", &id]),
            "true"
        );
    });
}
