//! One Docker end-to-end test's world: a state dir with fresh auth
//! material, a CP config on its own network (explicit subnet in the range
//! the test file owns), the agent image (`CLAWKER_TEST_IMAGE`), a label on
//! every container — all removed on drop, even when the test fails.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use clawker::cp::{self, CpConfig, agent::RunSpec};
use clawker::identity::{AgentName, ProjectSlug};
use clawker::pki::AuthMaterial;

/// The image e2e tests run (`scripts/build-agent-image.sh TAG`).
pub fn test_image() -> String {
    std::env::var("CLAWKER_TEST_IMAGE").unwrap_or_else(|_| "clawker-agent:latest".into())
}

/// A free loopback port (for a CP that must come back on the same address).
pub fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

pub struct DockerEnv {
    pub label: String,
    pub networks: Vec<String>,
    pub state: tempfile::TempDir,
    pub cfg: CpConfig,
}

impl DockerEnv {
    /// `prefix`-`n` network on `subnet`; the admin API on `admin`.
    pub fn new(prefix: &str, n: u8, subnet: &str, admin: SocketAddr) -> Self {
        Self::build(prefix, n, subnet, None, admin)
    }

    /// [`DockerEnv::new`] plus this world's own quarantine network,
    /// `prefix`-`n`-q on `quarantine_subnet` (its host guard is removed on
    /// drop too).
    pub fn with_quarantine(
        prefix: &str,
        n: u8,
        subnet: &str,
        quarantine_subnet: &str,
        admin: SocketAddr,
    ) -> Self {
        Self::build(prefix, n, subnet, Some(quarantine_subnet), admin)
    }

    fn build(
        prefix: &str,
        n: u8,
        subnet: &str,
        quarantine_subnet: Option<&str>,
        admin: SocketAddr,
    ) -> Self {
        let state = tempfile::tempdir().unwrap();
        let net = format!("{prefix}-{n}");
        let quarantine = quarantine_subnet.map(|s| (format!("{prefix}-{n}-q"), s.to_owned()));
        let overrides = cp::config::Overrides {
            network: Some(net.clone()),
            subnet: Some(subnet.to_owned()),
            quarantine_network: quarantine.as_ref().map(|(q, _)| q.clone()),
            quarantine_subnet: quarantine.as_ref().map(|(_, s)| s.clone()),
            admin_addr: Some(admin),
            metrics_addr: Some("127.0.0.1:0".parse().unwrap()),
            ..Default::default()
        };
        let cfg = cp::config::resolve(
            state.path().to_owned(),
            cp::config::FileConfig::default(),
            overrides,
        )
        .unwrap();
        AuthMaterial::ensure(state.path()).unwrap();
        let env = Self {
            label: format!("{prefix}-{n}-{}", std::process::id()),
            networks: std::iter::once(net)
                .chain(quarantine.map(|(q, _)| q))
                .collect(),
            state,
            cfg,
        };
        env.cleanup();
        env
    }

    pub fn cleanup(&self) {
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
        // A quarantine network of this world carries a host nft guard on
        // its bridge: remove it with the network.
        if self.networks.contains(&self.cfg.quarantine_network) {
            let id = std::process::Command::new("docker")
                .args([
                    "network",
                    "inspect",
                    "-f",
                    "{{.Id}}",
                    &self.cfg.quarantine_network,
                ])
                .output();
            if let Ok(out) = id
                && out.status.success()
            {
                let id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
                let bridge = format!("br-{}", &id[..12.min(id.len())]);
                if let Ok(rt) = tokio::runtime::Builder::new_current_thread().build() {
                    let _ = rt.block_on(clawker::netns::unguard_bridge(
                        &bridge,
                        Duration::from_secs(10),
                    ));
                }
            }
        }
        for n in &self.networks {
            let _ = std::process::Command::new("docker")
                .args(["network", "rm", n])
                .output();
        }
    }

    pub fn spec(&self, name: &str, project: &str) -> RunSpec {
        RunSpec {
            agent: AgentName::new(name).unwrap(),
            project: ProjectSlug::new(project).unwrap(),
            image: test_image(),
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

    pub fn material(&self) -> AuthMaterial {
        AuthMaterial::load(self.state.path()).unwrap()
    }

    /// The `clawker` CLI pointed at this world's state dir and `admin`.
    pub fn cli(&self, admin: SocketAddr) -> std::process::Command {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_clawker"));
        c.arg("--state-dir")
            .arg(self.state.path())
            .arg("--admin-addr")
            .arg(admin.to_string())
            .env_remove("CLAWKER_STATE_DIR")
            .env_remove("CLAWKER_ADMIN_ADDR");
        c
    }
}

impl Drop for DockerEnv {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// Everything published on a bus, as (name, JSON), recorded from now on.
pub type Seen = std::sync::Arc<std::sync::Mutex<Vec<(String, serde_json::Value)>>>;

pub fn record(bus: &clawker::events::Bus) -> Seen {
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

/// Events named `name` about container `id`.
pub fn events_for(seen: &Seen, id: &str, name: &str) -> Vec<serde_json::Value> {
    seen.lock()
        .unwrap()
        .iter()
        .filter(|(n, j)| n == name && j["container_id"] == id)
        .map(|(_, j)| j.clone())
        .collect()
}

pub async fn wait_event(
    seen: &Seen,
    id: &str,
    name: &str,
    n: usize,
    secs: u64,
) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let got = events_for(seen, id, name);
        if got.len() >= n {
            return got;
        }
        if Instant::now() > deadline {
            let names: Vec<String> = seen
                .lock()
                .unwrap()
                .iter()
                .filter(|(_, j)| j["container_id"] == id)
                .map(|(n, _)| n.clone())
                .collect();
            panic!("timed out waiting for {n}× {name} on {id}; saw {names:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Fails (unless CLAWKER_SKIP_DOCKER=1) when no engine answers.
pub async fn docker_or_fail() -> Option<bollard::Docker> {
    match clawker::docker::connect().await {
        Ok(d) => Some(d),
        Err(e) if std::env::var("CLAWKER_SKIP_DOCKER").as_deref() == Ok("1") => {
            eprintln!("skipping (CLAWKER_SKIP_DOCKER=1): {e}");
            None
        }
        Err(e) => panic!("the Docker e2e suite needs an engine: {e}"),
    }
}
