//! Swarm mode end to end: the CP as a swarm service (the static `clawker`
//! in its FROM-scratch image), real agent services from the locally built
//! agent image, on a private swarm the test creates and tears down
//! (`scripts/swarm-cluster/`: private dockerds in their own network
//! namespaces; the main engine is only read, to copy the images).
//!
//! Needs root, the main engine with the images `CLAWKER_TEST_IMAGE`
//! (agent) and `CLAWKER_TEST_CP_IMAGE` (CP), iproute2 and util-linux;
//! `CLAWKER_SKIP_DOCKER=1` skips deliberately, anything else missing fails.
//! What the CP did is read from its audit log (see `common::swarm`).

mod common;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use clawker::cp::{self, agent::RunSpec};
use clawker::docker::swarm::Swarm;
use clawker::docker::swarm::deploy as cp_service;
use clawker::identity::{AgentName, ProjectSlug};
use clawker::runtime::{ContainmentOps, NetworkRole, RuntimeError};
use common::swarm::{
    Cluster, OVERLAY, QUARANTINE_OVERLAY, Record, SwarmCp, agent_image, count_for, names_for,
};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn skip() -> bool {
    if std::env::var("CLAWKER_SKIP_DOCKER").as_deref() == Ok("1") {
        eprintln!("skipping (CLAWKER_SKIP_DOCKER=1)");
        return true;
    }
    false
}

fn spec(name: &str) -> RunSpec {
    RunSpec {
        agent: AgentName::new(name).unwrap(),
        project: ProjectSlug::new("e2e").unwrap(),
        image: agent_image(),
        network: OVERLAY.into(),
        agent_port: clawker::defaults::AGENT_PORT,
        command: vec![],
        env: vec![],
        // The hardened defaults, mapped onto the task template.
        hardening: Default::default(),
        extra_labels: HashMap::from([("dev.clawker.test".to_owned(), "swarm".to_owned())]),
        extra_networks: vec![],
        mint_for_container: None,
        cert_ttl: clawker::cp::config::DEFAULT_AGENT_CERT_TTL,
        placement: vec![],
    }
}

/// `docker service update --force`: swarm's restart of an agent (a new
/// task: new container, new address, same service id).
async fn force_update(swarm: &Swarm, id: &str) -> String {
    let before = swarm.current_task(id).await.unwrap().map(|t| t.id);
    swarm
        .update_spec(id, |s| {
            let t = s.task_template.get_or_insert_with(Default::default);
            t.force_update = Some(t.force_update.unwrap_or(0) + 1);
            true
        })
        .await
        .unwrap();
    let deadline = Instant::now() + std::time::Duration::from_secs(60);
    loop {
        if let Some(t) = swarm.current_task(id).await.unwrap()
            && Some(&t.id) != before.as_ref()
        {
            return t.id;
        }
        assert!(Instant::now() < deadline, "no new task for {id}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// The `clawker` CLI against the swarm CP: the admin API published on the
/// manager, and the manager's engine for `agent run|stop|rm`.
async fn cli(cp: &SwarmCp, cluster: &Cluster, args: &[&str]) -> std::process::Output {
    let admin = cp
        .deployed
        .admin_addr
        .expect("published admin API")
        .to_string();
    tokio::process::Command::new(env!("CARGO_BIN_EXE_clawker"))
        .arg("--state-dir")
        .arg(cp.state.path())
        .args(["--admin-addr", &admin])
        .args(args)
        .env("DOCKER_HOST", format!("unix://{}", cluster.manager_sock()))
        .env("CLAWKER_RUNTIME", "swarm")
        .output()
        .await
        .expect("clawker runs")
}

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn record_of<'a>(recs: &'a [Record], name: &str, id: &str) -> &'a serde_json::Value {
    &recs
        .iter()
        .find(|(n, j)| n == name && j["container_id"] == id)
        .unwrap_or_else(|| panic!("no {name} for {id}"))
        .1
}

#[test]
fn swarm_single_node_register_init_restart_quarantine_cp_restart_and_cli() {
    let _g = serial();
    if skip() {
        return;
    }
    let cluster = Cluster::up(1);
    actix::System::new().block_on(async {
        // Short leaves, so the agent rotates before its task is replaced:
        // a day-two agent, whose first leaf the registry already retired.
        let cp = SwarmCp::deploy_with(&cluster, Some("agent_cert_ttl = 20\n")).await;
        let swarm = &cp.swarm;
        let material = cp.material();

        // --- Register and init: the service id is the agent's identity.
        let t0 = Instant::now();
        let alpha = RunSpec {
            cert_ttl: std::time::Duration::from_secs(20),
            ..spec("alpha")
        };
        let id = cp::agent::run(swarm, &material, &alpha).await.unwrap();
        let recs = cp
            .wait("alpha init", 90, |r| {
                count_for(r, &id, "agent.init.completed") == 1
            })
            .await;
        eprintln!("alpha: run → InitCompleted seen in {:?}", t0.elapsed());
        let names = names_for(&recs, &id);
        let pos = |n: &str| names.iter().position(|x| x == n).unwrap_or(usize::MAX);
        assert!(
            pos("agent.session.connected") < pos("agent.registered")
                && pos("agent.registered") < pos("agent.init.completed"),
            "{names:?}"
        );
        assert_eq!(record_of(&recs, "agent.registered", &id)["ok"], true);
        let facts = swarm.facts(&id).await.unwrap();
        let task = swarm.current_task(&id).await.unwrap().unwrap();
        assert!(facts.running);
        assert_eq!(facts.agent_label(), "alpha");
        assert_eq!(facts.project_label(), "e2e");
        let ip = facts.ip.expect("overlay address");
        assert!(ip.to_string().starts_with("10.241.0."), "{ip}");
        // The CP dialled the task at its overlay address.
        let connected = record_of(&recs, "agent.session.connected", &id);
        assert_eq!(connected["address"], format!("{ip}:7700"));
        assert_eq!(connected["peer_cn"], "clawker.e2e.alpha");
        // The admin API, published on the manager, lists the row under the
        // service id.
        let admin = clawker::admin_api::AdminClient::connect(
            cp.state.path(),
            cp.deployed.admin_addr.expect("published admin API"),
        )
        .await
        .expect("admin API on the manager's address");
        let rows = admin.list_agents().await.unwrap();
        assert!(
            rows.iter()
                .any(|r| r.container_id == id && r.agent_name == "alpha" && r.project == "e2e"),
            "{rows:?}"
        );
        // The same through the CLI.
        let ls = cli(&cp, &cluster, &["agents", "--json"]).await;
        assert!(ls.status.success(), "{}", text(&ls));
        assert!(text(&ls).contains(&id), "{}", text(&ls));
        let status = cli(&cp, &cluster, &["status"]).await;
        assert!(status.status.success(), "{}", text(&status));

        // --- Rotation, then restart (a new task: new container, new
        // address): the rotated leaf lives on the service's named state
        // volume, so the new task presents it — the bundle's first leaf is
        // retired — and Matches on the same service id with no second
        // Register; the init marker is there too, so only boot runs.
        let recs = cp
            .wait("alpha rotated", 60, |r| {
                count_for(r, &id, "agent.cert.rotated") >= 1
            })
            .await;
        // The first rotation comes right after Register (Swarm mode retires
        // the bootstrap leaf, whose copy stays in the bundle secret): the
        // leaf the first session presented no longer matches.
        let rotated = record_of(&recs, "agent.cert.rotated", &id);
        assert_eq!(rotated["reason"], "registered", "{rotated}");
        assert_eq!(rotated["old"], connected["peer_thumbprint"], "{rotated}");
        let retired = rotated["old"].clone();
        let new_task = force_update(swarm, &id).await;
        assert_ne!(new_task, task.id);
        let recs = cp
            .wait("alpha init after restart", 90, |r| {
                count_for(r, &id, "agent.init.completed") == 2
            })
            .await;
        assert_eq!(count_for(&recs, &id, "agent.registered"), 1);
        assert!(count_for(&recs, &id, "agent.trusted") >= 2);
        assert_eq!(count_for(&recs, &id, "agent.untrusted"), 0);
        let boot = recs
            .iter()
            .filter(|(n, j)| n == "agent.init.completed" && j["container_id"] == id)
            .nth(1)
            .unwrap();
        assert_eq!(boot.1["plans"], serde_json::json!(["boot"]), "{}", boot.1);
        let reconnected = recs
            .iter()
            .filter(|(n, j)| n == "agent.session.connected" && j["container_id"] == id)
            .nth(1)
            .unwrap();
        assert_ne!(
            reconnected.1["peer_thumbprint"], retired,
            "new task presents a rotated leaf"
        );

        // --- Containment, with the agent started by the CLI (`agent run`
        // waits on the CP's events and fails with the reason): a leaf bound
        // to another id fails Register; the agent is untrusted, gets no
        // init, and is quarantined (its service moved onto the internal
        // quarantine overlay; swarm replaces the task).
        let run = cli(
            &cp,
            &cluster,
            &[
                "agent",
                "run",
                "mallory",
                "--project",
                "e2e",
                "--image",
                &agent_image(),
                "--leaf-for-container",
                "deadbeef",
                "--timeout-secs",
                "90",
            ],
        )
        .await;
        assert!(!run.status.success(), "{}", text(&run));
        assert!(text(&run).contains("agent is untrusted"), "{}", text(&run));
        let mid = swarm
            .agent_services()
            .await
            .unwrap()
            .into_iter()
            .find(|s| s.labels.get("dev.clawker.agent").map(String::as_str) == Some("mallory"))
            .expect("mallory's service")
            .id;
        let recs = cp
            .wait("mallory contained", 90, |r| {
                r.iter().any(|(n, j)| {
                    n == "policy.containment.applied"
                        && j["container_id"] == mid
                        && j["action"] == "isolate"
                })
            })
            .await;
        assert_eq!(
            record_of(&recs, "agent.untrusted", &mid)["reason"],
            "register_failed"
        );
        assert_eq!(count_for(&recs, &mid, "agent.init.started"), 0);
        let isolate = recs
            .iter()
            .find(|(n, j)| {
                n == "policy.containment.applied"
                    && j["container_id"] == mid
                    && j["action"] == "isolate"
            })
            .unwrap();
        assert_eq!(isolate.1["outcome"], "applied", "{:?}", isolate.1);
        let deadline = Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let f = swarm
                .with_quarantine(QUARANTINE_OVERLAY)
                .facts(&mid)
                .await
                .unwrap();
            if f.running && f.networks == [QUARANTINE_OVERLAY] {
                assert_eq!(f.ip_network, Some(NetworkRole::Quarantine));
                assert!(f.ip.unwrap().to_string().starts_with("10.241.2."), "{f:?}");
                break;
            }
            assert!(Instant::now() < deadline, "not quarantined: {f:?}");
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        // A lock needs the task's network namespace, which the CP (a service
        // in its own pid namespace) cannot enter: unsupported, with why.
        let ops = swarm.with_quarantine(QUARANTINE_OVERLAY);
        match ContainmentOps::lock(&ops, &mid, 7700).await {
            Err(RuntimeError::Unsupported(why)) => {
                assert!(why.contains("own pid namespace"), "{why}")
            }
            other => panic!("lock in Swarm mode: {other:?}"),
        }
        assert!(!ContainmentOps::unlock(&ops, &mid).await.unwrap().changed);
        assert!(
            !ContainmentOps::quarantine(&ops, &mid)
                .await
                .unwrap()
                .changed,
            "quarantine is idempotent"
        );
        // The replacement task is dialled again, and stays untrusted.
        cp.wait("mallory re-dialled", 60, |r| {
            count_for(r, &mid, "agent.session.connected") >= 2
                && count_for(r, &mid, "agent.untrusted") >= 2
        })
        .await;

        // --- CP restart (a new CP task, same volume): every agent is found
        // again, alpha Matches without Register, mallory stays contained.
        let mark = cp.records().await.len();
        let t = Instant::now();
        let restarted = cp_service::restart(swarm, &cp.deployed.service_id)
            .await
            .unwrap();
        assert_ne!(restarted.task_id, cp.deployed.task_id);
        // alpha's command runs, so the new CP's session decides to run
        // nothing (DESIGN §13: a reconnect is not a start).
        let recs = cp
            .wait("alpha trusted after CP restart", 90, |r| {
                r.len() > mark
                    && count_for(&r[mark..], &id, "agent.trusted") >= 1
                    && count_for(&r[mark..], &id, "agent.plan.decided") >= 1
            })
            .await;
        eprintln!("CP restart → alpha trusted in {:?}", t.elapsed());
        let after = &recs[mark..];
        let plan = record_of(after, "agent.plan.decided", &id);
        assert_eq!(plan["skipped"], "cmd_running", "{plan}");
        assert_eq!(plan["plans"], serde_json::json!([]), "{plan}");
        assert_eq!(
            count_for(after, &id, "agent.init.started"),
            0,
            "a CP restart runs no step: {:?}",
            names_for(after, &id)
        );
        assert_eq!(
            count_for(after, &id, "agent.registered"),
            0,
            "no Register after a CP restart"
        );
        cp.wait("mallory contained again", 60, |r| {
            r.len() > mark
                && r[mark..]
                    .iter()
                    .any(|(n, j)| n == "policy.containment.applied" && j["container_id"] == mid)
        })
        .await;

        // --- rm (the CLI): service, secrets and state volume gone, the row
        // evicted.
        let rm = cli(&cp, &cluster, &["agent", "rm", "alpha", "--project", "e2e"]).await;
        assert!(rm.status.success(), "{}", text(&rm));
        let admin = clawker::admin_api::AdminClient::connect(
            cp.state.path(),
            cp.deployed.admin_addr.unwrap(),
        )
        .await
        .unwrap();
        let deadline = Instant::now() + std::time::Duration::from_secs(30);
        while admin
            .list_agents()
            .await
            .unwrap()
            .iter()
            .any(|r| r.container_id == id)
        {
            assert!(Instant::now() < deadline, "row not evicted");
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        let secrets = swarm
            .docker()
            .list_secrets(Some(bollard::query_parameters::ListSecretsOptions {
                filters: Some(HashMap::from([(
                    "label".to_owned(),
                    vec![format!("dev.clawker.service={id}")],
                )])),
            }))
            .await
            .unwrap();
        assert!(secrets.is_empty(), "bundle secrets left: {secrets:?}");
        let volumes = swarm
            .docker()
            .list_volumes(None::<bollard::query_parameters::ListVolumesOptions>)
            .await
            .unwrap()
            .volumes
            .unwrap_or_default();
        assert!(
            !volumes
                .iter()
                .any(|v| v.name == format!("clawker-state-{id}")),
            "state volume left"
        );
        cp::agent::remove(swarm, &mid).await.unwrap();
    });
}

#[test]
fn swarm_agent_on_a_worker_node_is_supervised_end_to_end() {
    let _g = serial();
    if skip() {
        return;
    }
    let cluster = Cluster::up(2);
    actix::System::new().block_on(async {
        let cp = SwarmCp::deploy(&cluster).await;
        let swarm = &cp.swarm;
        let worker = Swarm::connect_to(Some(&format!("unix://{}", cluster.node_sock(2))), OVERLAY)
            .await
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(worker.contains("not a swarm manager"), "{worker}");
        let worker_node = {
            let nodes = swarm
                .docker()
                .list_nodes(None::<bollard::query_parameters::ListNodesOptions>)
                .await
                .unwrap();
            nodes
                .into_iter()
                .find(|n| {
                    n.spec
                        .as_ref()
                        .and_then(|s| s.labels.as_ref())
                        .and_then(|l| l.get("clsw.node"))
                        .map(String::as_str)
                        == Some("n2")
                })
                .and_then(|n| n.id)
                .expect("node n2")
        };
        assert_ne!(worker_node, swarm.node_id());

        let mut s = spec("beta");
        s.placement = vec!["node.labels.clsw.node==n2".into()];
        let id = cp::agent::run(swarm, &cp.material(), &s).await.unwrap();
        let task = swarm.current_task(&id).await.unwrap().unwrap();
        assert_eq!(task.node_id, worker_node, "scheduled on the worker");
        // Across nodes: dialled over VXLAN, Register from the worker's task
        // address checked against the manager's view of the task, init.
        let recs = cp
            .wait("beta init on the worker", 90, |r| {
                count_for(r, &id, "agent.init.completed") == 1
            })
            .await;
        assert_eq!(record_of(&recs, "agent.registered", &id)["ok"], true);
        assert_eq!(count_for(&recs, &id, "agent.untrusted"), 0);
        let ip = swarm.facts(&id).await.unwrap().ip.unwrap();
        assert_eq!(
            record_of(&recs, "agent.session.connected", &id)["address"],
            format!("{ip}:7700")
        );

        // No lock on another node's task, said with which node.
        match ContainmentOps::lock(swarm, &id, 7700).await {
            Err(RuntimeError::Unsupported(why)) => {
                assert!(why.contains("not on the CP's node"), "{why}")
            }
            other => panic!("lock on a worker's task: {other:?}"),
        }

        // Stop (scale to zero): the feed says `die`, the session is stopped
        // with its task — no SessionBroken, no reconnect churn.
        cp::agent::stop(swarm, &id).await.unwrap();
        let died = |r: &[Record]| {
            r.iter()
                .any(|(n, j)| n == "docker.event" && j["actor_id"] == id && j["action"] == "die")
        };
        cp.wait("beta's task died", 60, died).await;
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        let recs = cp.records().await;
        assert_eq!(
            count_for(&recs, &id, "agent.session.broken"),
            0,
            "{:?}",
            names_for(&recs, &id)
        );
        assert!(!swarm.facts(&id).await.unwrap().running);
        cp::agent::remove(swarm, &id).await.unwrap();
    });
}
