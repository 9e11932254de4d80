//! Leaf rotation on a real Docker engine (DESIGN §13): an in-process CP
//! with 10-second agent leaves supervising one real agent container.
//!
//! - it lives 60 s through at least 4 half-life rotations over one session,
//!   its user command untouched (same PID), and `clawker worldview` shows
//!   the leaf's expiry and the rotation count;
//! - `docker restart` after its leaf expired: trusted (the leaf matches its
//!   row) and rotated at once, `reason=expired`;
//! - afterwards the retired first leaf is still `cert_thumbprint_mismatch`
//!   and a leaf from another CA still `cert_invalid`.
//!
//! Honours `CLAWKER_TEST_IMAGE`; network 10.220.1.0/24; everything it
//! creates is removed on drop. Run under the shared Docker lock:
//! `flock /tmp/clawker-docker.lock cargo test --test rotation_docker`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use clawker::cp::{self, CpConfig, agent::RunSpec};
use clawker::identity::{AgentName, ProjectSlug, Thumbprint};
use clawker::pki::{AuthMaterial, Ca, CertifiedKey};

fn image() -> String {
    std::env::var("CLAWKER_TEST_IMAGE").unwrap_or_else(|_| "clawker-agent:latest".into())
}

struct Env {
    label: String,
    network: String,
    state: tempfile::TempDir,
    cfg: CpConfig,
}

impl Env {
    fn new() -> Self {
        let state = tempfile::tempdir().unwrap();
        let network = "clawker-rot-1".to_owned();
        let file: cp::config::FileConfig = toml::from_str("agent_cert_ttl = \"10s\"").unwrap();
        let overrides = cp::config::Overrides {
            network: Some(network.clone()),
            subnet: Some("10.220.1.0/24".into()),
            admin_addr: Some("127.0.0.1:0".parse().unwrap()),
            metrics_addr: Some("127.0.0.1:0".parse().unwrap()),
            ..Default::default()
        };
        let cfg = cp::config::resolve(state.path().to_owned(), file, overrides).unwrap();
        assert_eq!(cfg.agent_cert_ttl, Duration::from_secs(10));
        AuthMaterial::ensure(state.path()).unwrap();
        let env = Self {
            label: format!("rot-{}", std::process::id()),
            network,
            state,
            cfg,
        };
        env.cleanup();
        env
    }

    fn cleanup(&self) {
        if let Ok(out) = std::process::Command::new("docker")
            .args(["ps", "-aq", "--filter"])
            .arg(format!("label=dev.clawker.test={}", self.label))
            .output()
        {
            for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = std::process::Command::new("docker")
                    .args(["rm", "-f", id])
                    .output();
            }
        }
        let _ = std::process::Command::new("docker")
            .args(["network", "rm", &self.network])
            .output();
    }

    fn spec(&self, name: &str) -> RunSpec {
        RunSpec {
            agent: AgentName::new(name).unwrap(),
            project: ProjectSlug::new("rot").unwrap(),
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
}

impl Drop for Env {
    fn drop(&mut self) {
        self.cleanup();
    }
}

type Seen = std::sync::Arc<std::sync::Mutex<Vec<(String, serde_json::Value)>>>;

fn record(bus: &clawker::events::Bus) -> Seen {
    let seen: Seen = Default::default();
    let mut sub = bus.subscribe_all().unwrap();
    let s = seen.clone();
    actix::spawn(async move {
        while let Some(e) = sub.recv().await {
            s.lock().unwrap().push((e.name().to_owned(), e.to_json()));
        }
    });
    seen
}

fn of(seen: &Seen, id: &str, name: &str) -> Vec<serde_json::Value> {
    seen.lock()
        .unwrap()
        .iter()
        .filter(|(n, j)| n == name && j["container_id"] == id)
        .map(|(_, j)| j.clone())
        .collect()
}

async fn wait_for(seen: &Seen, id: &str, name: &str, n: usize, secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while of(seen, id, name).len() < n {
        if Instant::now() > deadline {
            let names: Vec<String> = seen
                .lock()
                .unwrap()
                .iter()
                .filter(|(_, j)| j["container_id"] == id)
                .map(|(n, _)| n.clone())
                .collect();
            panic!("timed out waiting for {n}x {name}; saw {names:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Host PID of the user command (the image's `sh -c` loop).
fn user_pid(id: &str) -> String {
    let out = std::process::Command::new("docker")
        .args(["top", id, "-eo", "pid,args"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .find(|l| l.contains("while :"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("user command not found in:\n{text}"))
        .to_owned()
}

fn thumb(v: &serde_json::Value) -> Thumbprint {
    Thumbprint::from_hex(v.as_str().unwrap()).unwrap()
}

/// Spoils the persisted rotated leaf, so clawkerd's next start presents its
/// bootstrap leaf — replaced by `leaf` when given.
async fn plant_leaf(docker: &bollard::Docker, id: &str, leaf: Option<&CertifiedKey>) {
    let mut b = tar::Builder::new(Vec::new());
    // Into clawkerd's state volume: the only place an upload may go on the
    // hardened (read-only) root, and where the bootstrap bundle lives.
    let mut files = vec![("leaf.pem", b"spoiled".as_slice())];
    if let Some(leaf) = leaf {
        files.push(("bootstrap/cert.pem", leaf.cert_pem.as_bytes()));
        files.push(("bootstrap/key.pem", leaf.key_pem.as_bytes()));
    }
    for (path, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o600);
        h.set_uid(0);
        h.set_gid(0);
        h.set_size(data.len() as u64);
        h.set_mtime(0);
        b.append_data(&mut h, path, data).unwrap();
    }
    docker
        .upload_to_container(
            id,
            Some(bollard::query_parameters::UploadToContainerOptions {
                path: clawker::defaults::agent_paths::STATE_DIR.into(),
                ..Default::default()
            }),
            bollard::body_full(b.into_inner().unwrap().into()),
        )
        .await
        .unwrap();
}

async fn restart_with(
    docker: &bollard::Docker,
    seen: &Seen,
    id: &str,
    leaf: Option<&CertifiedKey>,
) -> serde_json::Value {
    let before = of(seen, id, "agent.untrusted").len();
    cp::agent::stop(docker, id).await.unwrap();
    plant_leaf(docker, id, leaf).await;
    docker
        .restart_container(
            id,
            None::<bollard::query_parameters::RestartContainerOptions>,
        )
        .await
        .unwrap();
    wait_for(seen, id, "agent.untrusted", before + 1, 60).await;
    of(seen, id, "agent.untrusted")[before].clone()
}

#[test]
fn agent_lives_through_rotations_and_an_expired_restart_while_bad_leaves_stay_untrusted() {
    let env = Env::new();
    actix::System::new().block_on(async {
        let docker = match clawker::docker::connect().await {
            Ok(d) => d,
            Err(e) if std::env::var("CLAWKER_SKIP_DOCKER").as_deref() == Ok("1") => {
                eprintln!("skipping (CLAWKER_SKIP_DOCKER=1): {e}");
                return;
            }
            Err(e) => panic!("the Docker e2e suite needs an engine: {e}"),
        };
        let material = AuthMaterial::load(env.state.path()).unwrap();
        let cp1 = cp::start(&env.cfg).await.unwrap();
        let seen = record(&cp1.bus);
        let id = cp::agent::run(&docker, &material, &env.spec("rot"))
            .await
            .unwrap();
        wait_for(&seen, &id, "agent.init.completed", 1, 60).await;
        let first = cp1.registry.lookup_by_container_id(&id).unwrap().thumbprint;
        let pid = user_pid(&id);

        // 60 s with 10 s leaves: a rotation every ~5 s, one session.
        tokio::time::sleep(Duration::from_secs(60)).await;
        let rotated = of(&seen, &id, "agent.cert.rotated");
        assert!(rotated.len() >= 4, "{} rotations", rotated.len());
        assert!(
            rotated.iter().all(|r| r["reason"] == "half_life"),
            "{rotated:?}"
        );
        assert_eq!(thumb(&rotated[0]["old"]), first);
        for w in rotated.windows(2) {
            assert_eq!(w[0]["new"], w[1]["old"], "one chain of leaves");
        }
        assert_eq!(of(&seen, &id, "agent.session.connected").len(), 1);
        assert!(of(&seen, &id, "agent.session.broken").is_empty());
        assert!(of(&seen, &id, "agent.session.failed").is_empty());
        assert!(of(&seen, &id, "agent.untrusted").is_empty());
        assert_eq!(user_pid(&id), pid, "the user command was never touched");
        let live = cp1.sessions.live(&id).await.unwrap();
        assert!(live.trusted && !live.mux.is_closed());
        // The first leaf no longer matches its row (checked for real below).
        let row = cp1.registry.lookup_by_container_id(&id).unwrap();
        assert_ne!(row.thumbprint, first);
        let mut durations: Vec<f64> = rotated
            .iter()
            .map(|r| r["duration_ms"].as_f64().unwrap())
            .collect();
        durations.sort_by(f64::total_cmp);
        eprintln!(
            "real engine: {} rotations in 60 s, CSR→Done p50 {:.2} ms, max {:.2} ms",
            durations.len(),
            durations[durations.len() / 2],
            durations[durations.len() - 1]
        );

        // `clawker worldview` shows the leaf's expiry and the count.
        // Off this thread: the CP answering it runs on this runtime.
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_clawker"))
            .arg("worldview")
            .arg("--state-dir")
            .arg(env.state.path())
            .arg("--admin-addr")
            .arg(cp1.admin_api_addr.to_string())
            .output()
            .await
            .unwrap();
        let table = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "{out:?}");
        assert!(
            table.contains("LEAF EXPIRES") && table.contains("ROTATIONS"),
            "{table}"
        );
        let line = table
            .lines()
            .find(|l| l.contains(" rot "))
            .unwrap_or_else(|| panic!("{table}"));
        let count: u32 = line.split_whitespace().last().unwrap().parse().unwrap();
        assert!(count >= 4, "{line}");
        let view = cp1.bus.snapshot().await.unwrap();
        assert!(view.agents[&id].rotations >= 4);
        assert!(view.agents[&id].leaf_not_after.is_some());

        // Stopped until its leaf expired, then `docker restart`: trusted on
        // the expired leaf (it matches its row) and rotated at once.
        // (Docker's `die` stops the session actor; nothing is published.)
        cp::agent::stop(&docker, &id).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while cp1.sessions.live(&id).await.is_some() {
            assert!(Instant::now() < deadline, "session still live after stop");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let last = of(&seen, &id, "agent.cert.rotated")
            .last()
            .cloned()
            .unwrap();
        let not_after = time::OffsetDateTime::parse(
            last["not_after"].as_str().unwrap(),
            &time::format_description::well_known::Rfc3339,
        )
        .unwrap();
        let wait = not_after - time::OffsetDateTime::now_utc() + time::Duration::seconds(1);
        if wait.is_positive() {
            tokio::time::sleep(wait.unsigned_abs()).await;
        }
        let rotations_before = of(&seen, &id, "agent.cert.rotated").len();
        docker
            .restart_container(
                &id,
                None::<bollard::query_parameters::RestartContainerOptions>,
            )
            .await
            .unwrap();
        wait_for(&seen, &id, "agent.trusted", 2, 60).await;
        wait_for(&seen, &id, "agent.cert.rotated", rotations_before + 1, 60).await;
        let connected = of(&seen, &id, "agent.session.connected");
        assert_eq!(
            connected[1]["chain_verified"], false,
            "the leaf had expired"
        );
        assert_eq!(thumb(&connected[1]["peer_thumbprint"]), thumb(&last["new"]));
        let after = &of(&seen, &id, "agent.cert.rotated")[rotations_before];
        assert_eq!(after["reason"], "expired", "{after}");
        assert_eq!(after["old"], last["new"]);
        assert!(of(&seen, &id, "agent.untrusted").is_empty());
        wait_for(&seen, &id, "agent.init.completed", 2, 60).await;
        let _ = user_pid(&id); // the user command runs again

        // Still untrusted after all of it: the retired first leaf (still in
        // the bootstrap bundle) is a thumbprint mismatch …
        let u = restart_with(&docker, &seen, &id, None).await;
        assert_eq!(u["reason"], "cert_thumbprint_mismatch", "{u}");
        let connected = of(&seen, &id, "agent.session.connected");
        assert_eq!(thumb(&connected.last().unwrap()["peer_thumbprint"]), first);
        // … and a leaf from another CA is cert_invalid.
        let (p, a) = (
            ProjectSlug::new("rot").unwrap(),
            AgentName::new("rot").unwrap(),
        );
        let foreign = Ca::generate().unwrap().mint_agent(&p, &a, &id).unwrap();
        let u = restart_with(&docker, &seen, &id, Some(&foreign)).await;
        assert_eq!(u["reason"], "cert_invalid", "{u}");
        cp::stop(cp1).await;
    });
}
