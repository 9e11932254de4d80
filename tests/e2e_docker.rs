//! End to end on a real Docker engine: an in-process CP (the same `start`
//! as `clawker cp serve`) supervising real agent containers built from the
//! locally built `clawker-agent` image.
//!
//! A missing engine is a failure, not a skip (set `CLAWKER_SKIP_DOCKER=1`
//! to skip deliberately on a machine without Docker). `scripts/test.sh`
//! installs and starts the engine and builds the image first.
//!
//! Each test uses its own network (explicit subnet), state dir and
//! container label, and removes its containers and network on drop; the
//! tests run one at a time (the engine and 2 cores are shared).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clawker::cp::{self, CpConfig, agent::RunSpec};
use clawker::identity::{AgentName, ProjectSlug};
use clawker::pki::AuthMaterial;
use clawker::runtime::NetworkRole;

static SERIAL: Mutex<()> = Mutex::new(());

fn image() -> String {
    std::env::var("CLAWKER_TEST_IMAGE").unwrap_or_else(|_| "clawker-agent:latest".into())
}

/// Docker resources of one test, removed on drop (even on failure).
struct Env {
    label: String,
    networks: Vec<String>,
    state: tempfile::TempDir,
    cfg: CpConfig,
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

impl Env {
    fn new(n: u8) -> Self {
        let state = tempfile::tempdir().unwrap();
        let net = format!("clawker-e2e-{n}");
        let quarantine = format!("clawker-e2e-{n}-q");
        let file = cp::config::FileConfig::default();
        let overrides = cp::config::Overrides {
            network: Some(net.clone()),
            subnet: Some(format!("10.214.{n}.0/24")),
            quarantine_network: Some(quarantine.clone()),
            quarantine_subnet: Some(format!("10.222.{}.0/24", 100 + n)),
            admin_addr: Some("127.0.0.1:0".parse().unwrap()),
            metrics_addr: Some("127.0.0.1:0".parse().unwrap()),
            ..Default::default()
        };
        let cfg = cp::config::resolve(state.path().to_owned(), file, overrides).unwrap();
        AuthMaterial::ensure(state.path()).unwrap();
        let env = Self {
            label: format!("e2e-{n}-{}", std::process::id()),
            networks: vec![net, quarantine],
            state,
            cfg,
        };
        env.cleanup(); // leftovers of a crashed earlier run
        env
    }

    fn cleanup(&self) {
        let ids = std::process::Command::new("docker")
            .args([
                "ps",
                "-aq",
                "--filter",
                &format!("label=dev.clawker.test={}", self.label),
            ])
            .output();
        if let Ok(out) = ids {
            let ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .map(str::to_owned)
                .collect();
            if !ids.is_empty() {
                let _ = std::process::Command::new("docker")
                    .args(["rm", "-f", "-v"])
                    .args(&ids)
                    .output();
            }
        }
        // The quarantine bridge's host guard goes with its network.
        if let Some(id) = docker_cli(&[
            "network",
            "inspect",
            "-f",
            "{{.Id}}",
            &self.cfg.quarantine_network,
        ]) {
            let bridge = format!("br-{}", &id[..12.min(id.len())]);
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread().build() {
                let _ = rt.block_on(clawker::netns::unguard_bridge(
                    &bridge,
                    Duration::from_secs(10),
                ));
            }
        }
        for n in &self.networks {
            let _ = std::process::Command::new("docker")
                .args(["network", "rm", n])
                .output();
        }
    }

    fn spec(&self, name: &str) -> RunSpec {
        RunSpec {
            agent: AgentName::new(name).unwrap(),
            project: ProjectSlug::new("e2e").unwrap(),
            image: image(),
            network: self.cfg.network.clone(),
            agent_port: self.cfg.agent_port,
            command: vec![],
            env: vec![],
            hardening: Default::default(),
            extra_labels: HashMap::from([("dev.clawker.test".to_owned(), self.label.clone())]),
            extra_networks: vec![],
            mint_for_container: None,
            cert_ttl: self.cfg.agent_cert_ttl,
            placement: vec![],
        }
    }

    fn material(&self) -> AuthMaterial {
        AuthMaterial::load(self.state.path()).unwrap()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        self.cleanup();
    }
}

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

/// Names of events about one container, in order.
fn names_for(seen: &Seen, id: &str) -> Vec<String> {
    seen.lock()
        .unwrap()
        .iter()
        .filter(|(_, j)| j["container_id"] == id)
        .map(|(n, _)| n.clone())
        .collect()
}

fn count_for(seen: &Seen, id: &str, name: &str) -> usize {
    names_for(seen, id).iter().filter(|n| *n == name).count()
}

async fn wait_for(seen: &Seen, id: &str, name: &str, n: usize, secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while count_for(seen, id, name) < n {
        if Instant::now() > deadline {
            panic!(
                "timed out waiting for {n}× {name} on {id}; saw {:?}",
                names_for(seen, id)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
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

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

#[test]
fn agent_lifecycle_register_restart_cp_restart_and_rm() {
    let _g = serial();
    let env = Env::new(1);
    actix::System::new().block_on(async {
        let Some(docker) = docker_or_fail().await else {
            return;
        };
        let cp1 = cp::start(&env.cfg).await.unwrap();
        let seen = record(&cp1.bus);
        let id = cp::agent::run(&docker, &env.material(), &env.spec("alpha"))
            .await
            .unwrap();

        // start → Connected → AgentRegistered{ok} → InitCompleted.
        wait_for(&seen, &id, "agent.init.completed", 1, 60).await;
        let names = names_for(&seen, &id);
        let pos = |n: &str| names.iter().position(|x| x == n).unwrap_or(usize::MAX);
        assert!(
            pos("agent.session.connected") < pos("agent.registered"),
            "{names:?}"
        );
        assert!(pos("agent.registered") < pos("agent.init.completed"));
        let reg = seen
            .lock()
            .unwrap()
            .iter()
            .find(|(n, j)| n == "agent.registered" && j["container_id"] == id)
            .unwrap()
            .1
            .clone();
        assert_eq!(reg["ok"], true);
        let row = cp1.registry.lookup_by_container_id(&id).unwrap();
        assert_eq!(row.canonical_cn, "clawker.e2e.alpha");

        // docker restart: re-dial, Match, no second Register.
        docker
            .restart_container(
                &id,
                None::<bollard::query_parameters::RestartContainerOptions>,
            )
            .await
            .unwrap();
        wait_for(&seen, &id, "agent.init.completed", 2, 60).await;
        assert_eq!(count_for(&seen, &id, "agent.registered"), 1);
        assert!(count_for(&seen, &id, "agent.trusted") >= 2);

        // CP restart: the boot dial finds the running agent; Match, no
        // Register, and no step runs (its command is running).
        cp::stop(cp1).await;
        let cp2 = cp::start(&env.cfg).await.unwrap();
        let seen2 = record(&cp2.bus);
        cp::boot_dial(&cp2).await;
        wait_for(&seen2, &id, "agent.plan.decided", 1, 60).await;
        let decided = seen2
            .lock()
            .unwrap()
            .iter()
            .find(|(n, j)| n == "agent.plan.decided" && j["container_id"] == id)
            .unwrap()
            .1
            .clone();
        assert_eq!(decided["plans"], serde_json::json!([]), "{decided}");
        assert_eq!(decided["skipped"], "cmd_running");
        assert_eq!(count_for(&seen2, &id, "agent.init.started"), 0);
        assert_eq!(count_for(&seen2, &id, "agent.registered"), 0);
        let view = cp2.bus.snapshot().await.unwrap();
        assert!(
            view.agents[&id].registered,
            "registered after a Match (worldview fix)"
        );

        // docker rm -f: the row is evicted, the agent leaves the worldview.
        cp::agent::remove(&docker, &id).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while cp2.registry.lookup_by_container_id(&id).is_ok() {
            assert!(Instant::now() < deadline, "row not evicted");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let view = cp2.bus.snapshot().await.unwrap();
            if !view.agents.contains_key(&id) {
                break;
            }
            assert!(Instant::now() < deadline, "agent still in worldview");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            count_for(&seen2, &id, "agent.session.broken"),
            0,
            "stopped at once, no reconnect churn"
        );
        cp::stop(cp2).await;
    });
}

#[test]
fn cert_for_another_container_is_untrusted_isolated_and_still_connected() {
    let _g = serial();
    let mut env = Env::new(2);
    let other_net = "clawker-e2e-2-other".to_owned();
    env.networks.push(other_net.clone());
    actix::System::new().block_on(async {
        let Some(docker) = docker_or_fail().await else {
            return;
        };
        let cp1 = cp::start(&env.cfg).await.unwrap();
        clawker::docker::network::ensure(&docker, &other_net, "10.214.102.0/24")
            .await
            .unwrap();
        let seen = record(&cp1.bus);
        let mut spec = env.spec("mallory");
        spec.mint_for_container = Some("deadbeef".into());
        spec.extra_networks = vec![other_net.clone()];
        let started = Instant::now();
        let id = cp::agent::run(&docker, &env.material(), &spec)
            .await
            .unwrap();

        wait_for(&seen, &id, "agent.untrusted", 1, 60).await;
        let untrusted_at = started.elapsed();
        wait_for(&seen, &id, "policy.containment.applied", 2, 30).await; // alert, isolate
        let applied_at = started.elapsed();
        let reasons: Vec<serde_json::Value> = seen
            .lock()
            .unwrap()
            .iter()
            .filter(|(n, j)| n == "agent.untrusted" && j["container_id"] == id)
            .map(|(_, j)| j["reason"].clone())
            .collect();
        assert_eq!(reasons[0], "register_failed");
        assert_eq!(
            count_for(&seen, &id, "agent.init.started"),
            0,
            "init withheld from untrusted"
        );
        // Quarantined: on the internal quarantine network only.
        let facts = cp1.inspect.inspect(&id).await.unwrap();
        assert_eq!(
            facts.networks,
            vec![env.cfg.quarantine_network.clone()],
            "moved onto the quarantine network, off every other"
        );
        assert_eq!(facts.ip_network, Some(NetworkRole::Quarantine));
        assert!(facts.running);
        // The CP re-established its session over the quarantine address
        // and still runs commands there.
        let q_addr = format!("{}:", facts.ip.unwrap());
        let deadline = Instant::now() + Duration::from_secs(20);
        let live = loop {
            if let Some(l) = cp1.sessions.live(&id).await
                && !l.mux.is_closed()
                && seen.lock().unwrap().iter().any(|(n, j)| {
                    n == "agent.session.connected"
                        && j["container_id"] == id
                        && j["address"]
                            .as_str()
                            .is_some_and(|a| a.starts_with(&q_addr))
                })
            {
                break l;
            }
            assert!(
                Instant::now() < deadline,
                "no session over the quarantine address; saw {:?}",
                names_for(&seen, &id)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(
            !live.trusted,
            "still untrusted: the CP keeps the session to contain it"
        );
        let shell = clawker::session::command::shell(
            "echo contained",
            &clawker::session::command::RunAs::root(),
            10,
            b"",
        );
        let done = clawker::session::command::run_to_completion(
            &live.mux,
            "e2e-after-isolate",
            shell,
            Duration::from_secs(15),
            4096,
        )
        .await
        .unwrap();
        assert_eq!(
            (done.exit_code, done.stdout.text().as_str()),
            (0, "contained")
        );
        // Release is refused for an agent its session does not trust.
        let refused = cp1
            .containment
            .lift(&id, clawker::policy::containment::Lift::Release, &cp1.bus)
            .await
            .unwrap_err();
        assert!(
            matches!(
                refused,
                clawker::policy::containment::LiftError::Untrusted(_)
            ),
            "{refused}"
        );
        eprintln!("untrusted after {untrusted_at:?}, containment applied after {applied_at:?}");

        // CP restart: contained again (idempotently).
        cp::stop(cp1).await;
        let cp2 = cp::start(&env.cfg).await.unwrap();
        let seen2 = record(&cp2.bus);
        cp::boot_dial(&cp2).await;
        wait_for(&seen2, &id, "policy.containment.applied", 2, 60).await;
        let outcomes: Vec<String> = seen2
            .lock()
            .unwrap()
            .iter()
            .filter(|(n, j)| n == "policy.containment.applied" && j["container_id"] == id)
            .map(|(_, j)| {
                format!(
                    "{}:{}",
                    j["action"].as_str().unwrap_or(""),
                    j["outcome"].as_str().unwrap_or("")
                )
            })
            .collect();
        assert!(
            outcomes.iter().any(|o| o == "isolate:already_applied"),
            "re-contained idempotently: {outcomes:?}"
        );
        let facts = cp2.inspect.inspect(&id).await.unwrap();
        assert_eq!(facts.networks, vec![env.cfg.quarantine_network.clone()]);
        cp::stop(cp2).await;
    });
}

#[test]
fn twenty_agents_started_at_once_all_complete_init() {
    let _g = serial();
    let env = Env::new(3);
    actix::System::new().block_on(async {
        let Some(docker) = docker_or_fail().await else {
            return;
        };
        let cp1 = cp::start(&env.cfg).await.unwrap();
        let seen = record(&cp1.bus);
        let material = Arc::new(env.material());
        let mut tasks = Vec::new();
        for i in 0..20 {
            let (docker, material, spec) =
                (docker.clone(), material.clone(), env.spec(&format!("a{i}")));
            tasks.push(tokio::spawn(async move {
                cp::agent::run(&docker, &material, &spec).await
            }));
        }
        let mut ids = Vec::new();
        for t in tasks {
            ids.push(t.await.unwrap().unwrap());
        }
        for id in &ids {
            wait_for(&seen, id, "agent.init.completed", 1, 120).await;
            assert_eq!(count_for(&seen, id, "agent.init.failed"), 0);
            assert_eq!(count_for(&seen, id, "agent.session.failed"), 0);
        }
        assert_eq!(cp1.registry.snapshot().len(), 20);
        cp::stop(cp1).await;
    });
}
