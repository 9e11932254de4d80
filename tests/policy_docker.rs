//! Containment against the REAL Docker engine: a container from
//! `clawker-agent:latest` attached to a kept network and a second one.
//! Dry run changes nothing; `isolate` leaves only the kept network (and is
//! a no-op success the second time); `kill` stops it (then
//! `already_stopped`). Also measures AgentUntrusted → ContainmentApplied.
//!
//! Networks use explicit subnets in 10.231.0.0/16; everything is removed
//! by a Drop guard, even when an assertion fails.

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clawker::docker::Engine;
use clawker::events::{
    self, AgentRef, AgentUntrusted, ContainmentAction as A, ContainmentApplied,
    ContainmentOutcome as O, UntrustedReason,
};
use clawker::policy::containment::{ContainmentActor, ContainmentConfig, Rule, TriggerKind};
use clawker::runtime::ContainmentOps;
use clawker::session::commands::NoSessions;
use clawker_actors::{Supervisor, SupervisorSpec};

const IMAGE: &str = "clawker-agent:latest";

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

/// Removes the container and networks it names, whatever happens.
struct Cleanup {
    container: String,
    networks: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = docker(&["rm", "-f", &self.container]);
        for n in &self.networks {
            let _ = docker(&["network", "rm", n]);
        }
    }
}

/// Creates `keep` and `other` networks and a sleeping agent container on both.
fn setup(tag: &str, octet: u8) -> Option<(Cleanup, String, String)> {
    if docker(&["image", "inspect", IMAGE]).is_err() {
        eprintln!("skipping: {IMAGE} missing (scripts/build-agent-image.sh)");
        return None;
    }
    let pid = std::process::id();
    let keep = format!("clawker-pol-keep-{tag}-{pid}");
    let other = format!("clawker-pol-other-{tag}-{pid}");
    let name = format!("clawker-pol-{tag}-{pid}");
    let guard = Cleanup {
        container: name.clone(),
        networks: vec![keep.clone(), other.clone()],
    };
    let subnet = |o: u8| format!("10.231.{o}.0/24");
    docker(&["network", "create", "--subnet", &subnet(octet), &keep]).unwrap();
    docker(&["network", "create", "--subnet", &subnet(octet + 1), &other]).unwrap();
    docker(&[
        "run",
        "-d",
        "--name",
        &name,
        "--network",
        &keep,
        "--entrypoint",
        "/bin/sh",
        IMAGE,
        "-c",
        "sleep 60",
    ])
    .unwrap();
    docker(&["network", "connect", &other, &name]).unwrap();
    Some((guard, name, keep))
}

fn untrusted(id: &str) -> AgentUntrusted {
    AgentUntrusted {
        agent: AgentRef::new(id, "dev", "web"),
        reason: UntrustedReason::CertThumbprintMismatch,
        detail: "test".into(),
        at: events::now(),
    }
}

fn config(keep: &str, dry_run: bool, actions: Vec<A>) -> ContainmentConfig {
    ContainmentConfig {
        dry_run,
        keep_network: keep.to_owned(),
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
    let sup = Supervisor::start(SupervisorSpec::new("policy").child(ContainmentActor::spec(
        bus.clone(),
        cfg,
        ops,
        Arc::new(NoSessions),
    )));
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
fn real_engine_dry_run_isolate_and_kill() {
    let Some((_guard, name, keep)) = setup("ladder", 41) else {
        return;
    };
    let id = docker(&["inspect", "-f", "{{.Id}}", &name]).unwrap();
    assert_eq!(networks(&name).len(), 2);
    actix::System::new().block_on(async {
        let ops: Arc<dyn ContainmentOps> =
            Arc::new(Engine::new(
                clawker::docker::connect().await.unwrap(),
                clawker::defaults::NETWORK,
            ));

        // Dry run: every step reported, nothing changes.
        let dry = contain(
            config(&keep, true, vec![A::Alert, A::Isolate, A::Kill]),
            ops.clone(),
            &id,
            1,
            3,
        )
        .await;
        let (evs, _) = &dry[0];
        assert!(evs.iter().all(|e| e.outcome == O::DryRun), "{evs:?}");
        assert!(evs[1].detail.contains("would disconnect"), "{}", evs[1].detail);
        assert_eq!(networks(&name).len(), 2, "dry run changed nothing");
        assert!(running(&name));

        // Isolate, twice (a CP restart re-publishes AgentUntrusted).
        let iso = contain(config(&keep, false, vec![A::Isolate]), ops.clone(), &id, 3, 1).await;
        assert_eq!(iso[0].0[0].outcome, O::Applied, "{:?}", iso[0].0);
        assert_eq!(networks(&name), vec![keep.clone()]);
        for (evs, _) in &iso[1..] {
            assert_eq!(evs[0].outcome, O::AlreadyApplied, "{evs:?}");
        }
        assert_eq!(networks(&name), vec![keep.clone()]);
        eprintln!(
            "AgentUntrusted -> ContainmentApplied(isolate) on the real engine: applied {:?}, already_applied {:?} / {:?}",
            iso[0].1, iso[1].1, iso[2].1
        );
        assert!(running(&name), "isolate does not stop the container");

        // Kill, twice.
        let kill = contain(config(&keep, false, vec![A::Kill]), ops.clone(), &id, 2, 1).await;
        assert_eq!(kill[0].0[0].outcome, O::Applied, "{:?}", kill[0].0);
        assert!(!running(&name));
        assert_eq!(kill[1].0[0].outcome, O::AlreadyStopped, "{:?}", kill[1].0);
        // stop on a dead container is already_stopped too.
        let stop = contain(config(&keep, false, vec![A::Stop]), ops.clone(), &id, 1, 1).await;
        assert_eq!(stop[0].0[0].outcome, O::AlreadyStopped);

        // A container that does not exist.
        let gone = contain(
            config(&keep, false, vec![A::Isolate, A::Kill]),
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
    let Some((_guard, name, keep)) = setup("stop", 43) else {
        return;
    };
    actix::System::new().block_on(async {
        let ops: Arc<dyn ContainmentOps> = Arc::new(Engine::new(
            clawker::docker::connect().await.unwrap(),
            clawker::defaults::NETWORK,
        ));
        let mut cfg = config(&keep, false, vec![A::Stop]);
        cfg.stop_timeout_secs = 1; // sh ignores SIGTERM as PID 1
        let r = contain(cfg, ops, &name, 1, 1).await;
        assert_eq!(r[0].0[0].outcome, O::Applied, "{:?}", r[0].0);
        assert!(!running(&name));
    });
}
