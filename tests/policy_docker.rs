//! Containment against the REAL Docker engine: a container from the agent
//! image (`CLAWKER_TEST_IMAGE`, default `clawker-agent:latest`) attached to
//! an agent network and a second one. Dry run changes nothing; `isolate`
//! moves it onto the quarantine network only (internal, its bridge guarded
//! on the host) and is a no-op success the second time; `kill` stops it
//! (then `already_stopped`). The whole proof with sessions and traffic is
//! `tests/containment_docker.rs`.
//!
//! Networks use explicit subnets in 10.222.0.0/16; everything is removed
//! by a Drop guard, even when an assertion fails.

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clawker::docker::Engine;
use clawker::docker::engine::AgentNetworks;
use clawker::events::{
    self, AgentRef, AgentUntrusted, ContainmentAction as A, ContainmentApplied,
    ContainmentOutcome as O, UntrustedReason,
};
use clawker::policy::containment::{
    Containment, ContainmentActor, ContainmentConfig, Rule, TriggerKind,
};
use clawker::runtime::ContainmentOps;
use clawker::session::control::NoSessions;
use clawker_actors::{Supervisor, SupervisorSpec};

fn image() -> String {
    std::env::var("CLAWKER_TEST_IMAGE").unwrap_or_else(|_| "clawker-agent:latest".into())
}

fn docker(args: &[&str]) -> Result<String, String> {
    let out = Command::new("docker")
        .args(args)
        .output()
        .map_err(|e| format!("docker {args:?}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(format!(
            "docker {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Removes the container, the networks it names and the host guard of the
/// quarantine bridge, whatever happens.
struct Cleanup {
    container: String,
    networks: Vec<String>,
    quarantine: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = docker(&["rm", "-f", "-v", &self.container]);
        if let Ok(id) = docker(&["network", "inspect", "-f", "{{.Id}}", &self.quarantine]) {
            let bridge = format!("br-{}", &id[..12.min(id.len())]);
            let rt = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            let _ = rt.block_on(clawker::netns::unguard_bridge(
                &bridge,
                Duration::from_secs(10),
            ));
        }
        for n in self.networks.iter().chain([&self.quarantine]) {
            let _ = docker(&["network", "rm", n]);
        }
    }
}

/// The networks of one test: agent, other, quarantine.
struct Nets {
    agent: String,
    quarantine: String,
    quarantine_subnet: String,
}

/// Creates the agent and another network and a sleeping agent container
/// on both; the quarantine network is left to `isolate` to create.
fn setup(tag: &str, octet: u8) -> (Cleanup, String, Nets) {
    docker(&["image", "inspect", &image()])
        .unwrap_or_else(|e| panic!("{e}: build it with scripts/build-agent-image.sh"));
    let pid = std::process::id();
    let agent = format!("clawker-pol-agent-{tag}-{pid}");
    let other = format!("clawker-pol-other-{tag}-{pid}");
    let quarantine = format!("clawker-pol-q-{tag}-{pid}");
    let name = format!("clawker-pol-{tag}-{pid}");
    let guard = Cleanup {
        container: name.clone(),
        networks: vec![agent.clone(), other.clone()],
        quarantine: quarantine.clone(),
    };
    let subnet = |o: u8| format!("10.222.{o}.0/24");
    docker(&["network", "create", "--subnet", &subnet(octet), &agent]).unwrap();
    docker(&["network", "create", "--subnet", &subnet(octet + 1), &other]).unwrap();
    docker(&[
        "run",
        "-d",
        "--name",
        &name,
        "--network",
        &agent,
        "--entrypoint",
        "/bin/sh",
        &image(),
        "-c",
        "sleep 60",
    ])
    .unwrap();
    docker(&["network", "connect", &other, &name]).unwrap();
    let nets = Nets {
        agent,
        quarantine,
        quarantine_subnet: subnet(octet + 2),
    };
    (guard, name, nets)
}

async fn engine(nets: &Nets) -> Arc<dyn ContainmentOps> {
    Arc::new(Engine::new(
        clawker::docker::connect().await.unwrap(),
        AgentNetworks::new(&nets.agent).with_quarantine(&nets.quarantine, &nets.quarantine_subnet),
    ))
}

fn untrusted(id: &str) -> AgentUntrusted {
    AgentUntrusted {
        agent: AgentRef::new(id, "dev", "web"),
        reason: UntrustedReason::CertThumbprintMismatch,
        detail: "test".into(),
        at: events::now(),
    }
}

fn config(dry_run: bool, actions: Vec<A>) -> ContainmentConfig {
    ContainmentConfig {
        dry_run,
        rules: vec![Rule {
            on: TriggerKind::Untrusted,
            reasons: vec![],
            count: 1,
            window_secs: 60,
            actions,
        }],
        ..ContainmentConfig::default()
    }
}

/// Starts a containment actor on a fresh bus, publishes one AgentUntrusted
/// per round and collects `n` ContainmentApplied per round; returns them
/// and the time from publish to the *last* event of each round.
async fn contain(
    cfg: ContainmentConfig,
    ops: Arc<dyn ContainmentOps>,
    id: &str,
    rounds: usize,
    n: usize,
) -> Vec<(Vec<ContainmentApplied>, Duration)> {
    let bus = events::start_bus();
    let mut applied = bus.subscribe::<ContainmentApplied>().unwrap();
    let core = Arc::new(Containment::new(cfg, ops, Arc::new(NoSessions), 7700));
    let sup = Supervisor::start(
        SupervisorSpec::new("policy").child(ContainmentActor::spec(bus.clone(), core)),
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while bus.stats().subscribers < 4 {
        assert!(Instant::now() < deadline, "containment never subscribed");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut out = Vec::new();
    for _ in 0..rounds {
        let t0 = Instant::now();
        bus.publish(untrusted(id));
        let mut evs = Vec::new();
        while evs.len() < n {
            let e = tokio::time::timeout(Duration::from_secs(30), applied.recv())
                .await
                .expect("ContainmentApplied within 30 s")
                .expect("bus open");
            evs.push((*e).clone());
        }
        out.push((evs, t0.elapsed()));
    }
    sup.shutdown();
    out
}

fn networks(name: &str) -> Vec<String> {
    let s = docker(&[
        "inspect",
        "-f",
        "{{range $k, $v := .NetworkSettings.Networks}}{{$k}} {{end}}",
        name,
    ])
    .unwrap();
    let mut v: Vec<String> = s.split_whitespace().map(str::to_owned).collect();
    v.sort();
    v
}

fn running(name: &str) -> bool {
    docker(&["inspect", "-f", "{{.State.Running}}", name]).unwrap() == "true"
}

#[test]
fn real_engine_dry_run_quarantine_and_kill() {
    let (_guard, name, nets) = setup("ladder", 41);
    let id = docker(&["inspect", "-f", "{{.Id}}", &name]).unwrap();
    assert_eq!(networks(&name).len(), 2);
    actix::System::new().block_on(async {
        let ops = engine(&nets).await;

        // Dry run: every step reported, nothing changes.
        let dry = contain(
            config(true, vec![A::Alert, A::Isolate, A::Kill]),
            ops.clone(),
            &id,
            1,
            3,
        )
        .await;
        let (evs, _) = &dry[0];
        assert!(evs.iter().all(|e| e.outcome == O::DryRun), "{evs:?}");
        assert!(evs[1].detail.contains("would move from"), "{}", evs[1].detail);
        assert_eq!(networks(&name).len(), 2, "dry run changed nothing");
        assert!(running(&name));

        // Isolate, thrice (a CP restart re-publishes AgentUntrusted).
        let iso = contain(config(false, vec![A::Isolate]), ops.clone(), &id, 3, 1).await;
        assert_eq!(iso[0].0[0].outcome, O::Applied, "{:?}", iso[0].0);
        assert_eq!(networks(&name), vec![nets.quarantine.clone()]);
        for (evs, _) in &iso[1..] {
            assert_eq!(evs[0].outcome, O::AlreadyApplied, "{evs:?}");
        }
        assert_eq!(networks(&name), vec![nets.quarantine.clone()]);
        // The quarantine network is internal and its bridge guarded.
        assert_eq!(
            docker(&["network", "inspect", "-f", "{{.Internal}}", &nets.quarantine]).unwrap(),
            "true"
        );
        let qid = docker(&["network", "inspect", "-f", "{{.Id}}", &nets.quarantine]).unwrap();
        let bridge = format!("br-{}", &qid[..12]);
        assert!(
            clawker::netns::bridge_guarded(&bridge, Duration::from_secs(10))
                .await
                .unwrap(),
            "{bridge} guarded on the host"
        );
        eprintln!(
            "AgentUntrusted -> ContainmentApplied(isolate) on the real engine: applied {:?}, already_applied {:?} / {:?}",
            iso[0].1, iso[1].1, iso[2].1
        );
        assert!(running(&name), "isolate does not stop the container");

        // Kill, twice.
        let kill = contain(config(false, vec![A::Kill]), ops.clone(), &id, 2, 1).await;
        assert_eq!(kill[0].0[0].outcome, O::Applied, "{:?}", kill[0].0);
        assert!(!running(&name));
        assert_eq!(kill[1].0[0].outcome, O::AlreadyStopped, "{:?}", kill[1].0);
        // stop on a dead container is already_stopped too; so is lock
        // (no namespace to lock).
        let stop = contain(config(false, vec![A::Stop, A::Lock]), ops.clone(), &id, 1, 2).await;
        assert_eq!(stop[0].0[0].outcome, O::AlreadyStopped);
        assert_eq!(stop[0].0[1].outcome, O::AlreadyStopped, "{:?}", stop[0].0);

        // A container that does not exist.
        let gone = contain(
            config(false, vec![A::Isolate, A::Kill]),
            ops,
            "0000deadbeef0000",
            1,
            2,
        )
        .await;
        assert!(gone[0].0.iter().all(|e| e.outcome == O::NotFound), "{:?}", gone[0].0);
    });
}

#[test]
fn real_engine_stop_stops_a_running_container() {
    let (_guard, name, nets) = setup("stop", 45);
    actix::System::new().block_on(async {
        let ops = engine(&nets).await;
        let mut cfg = config(false, vec![A::Stop]);
        cfg.stop_timeout_secs = 1; // sh ignores SIGTERM as PID 1
        let r = contain(cfg, ops, &name, 1, 1).await;
        assert_eq!(r[0].0[0].outcome, O::Applied, "{:?}", r[0].0);
        assert!(!running(&name));
    });
}
