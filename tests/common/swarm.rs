//! A private Docker Swarm for the Swarm-mode tests, and the CP running on it
//! as a service.
//!
//! [`Cluster`] runs `scripts/swarm-cluster/up.sh N` (private dockerds, each
//! in its own network namespace, never the main engine; addresses in
//! 10.241.0.0/16) with the test images copied into every node, and
//! `down.sh` on drop, even after a failure. One cluster at a time per
//! machine: [`Cluster::up`] holds a lock file for its whole life (the
//! scripts' addresses are fixed).
//!
//! [`SwarmCp`] deploys the CP service and reads what it did from its audit
//! log on the state volume (through the archive API of the CP's current
//! container): the complete, ordered event record, across CP restarts,
//! which a live event stream would miss while the CP restarts.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use clawker::cp::deploy::{DeployRequest, deploy};
use clawker::docker::swarm::Swarm;
use clawker::docker::swarm::deploy::DeployedCp;
use futures::StreamExt;

/// The agent image (built from this tree).
pub fn agent_image() -> String {
    std::env::var("CLAWKER_TEST_IMAGE").unwrap_or_else(|_| "clawker-agent:latest".into())
}

/// The CP image (`scripts/build-cp-image.sh`).
pub fn cp_image() -> String {
    std::env::var("CLAWKER_TEST_CP_IMAGE").unwrap_or_else(|_| "clawker-cp:latest".into())
}

/// The agent overlay of the tests and its subnet (inside 10.241.0.0/16).
pub const OVERLAY: &str = "clawker-overlay";
pub const OVERLAY_SUBNET: &str = "10.241.0.0/24";
pub const QUARANTINE_OVERLAY: &str = "clawker-quarantine-overlay";
pub const QUARANTINE_SUBNET: &str = "10.241.2.0/24";
/// Host port of the CP's admin API on the manager's address.
pub const ADMIN_PORT: u16 = 17443;

fn scripts() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/swarm-cluster")
}

/// A private swarm of `nodes` engines; torn down on drop.
pub struct Cluster {
    pub env: HashMap<String, String>,
    _lock: File,
}

impl Cluster {
    /// Brings the swarm up (n1 the manager, the others workers) with the
    /// agent and CP images on every node.
    pub fn up(nodes: u8) -> Self {
        let lock =
            File::create("/run/clsw.test.lock").expect("lock file (the swarm tests run as root)");
        // SAFETY: flock on an fd we own; blocks until the previous cluster
        // of any test binary is gone.
        let rc = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) };
        assert_eq!(rc, 0, "flock /run/clsw.test.lock");
        // Leftovers of a run that was killed before its drop.
        Self::down();
        let started = Instant::now();
        let out = Command::new(scripts().join("up.sh"))
            .arg(nodes.to_string())
            .env("CLSW_IMAGES", format!("{} {}", agent_image(), cp_image()))
            .output()
            .expect("running up.sh");
        assert!(
            out.status.success(),
            "up.sh failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let env = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.strip_prefix("export "))
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.trim_matches('\'').to_owned()))
            .collect();
        eprintln!("swarm of {nodes} up in {:?}", started.elapsed());
        Self { env, _lock: lock }
    }

    fn down() {
        let out = Command::new(scripts().join("down.sh")).output();
        if let Ok(o) = out
            && !o.status.success()
        {
            eprintln!("down.sh: {}", String::from_utf8_lossy(&o.stderr));
        }
    }

    /// The manager's socket path.
    pub fn manager_sock(&self) -> String {
        self.env["CLSW_MANAGER_SOCK"].clone()
    }

    /// The engine socket of node `i` (1-based).
    pub fn node_sock(&self, i: usize) -> String {
        self.env["CLSW_NODE_SOCKS"]
            .split_whitespace()
            .nth(i - 1)
            .expect("node exists")
            .to_owned()
    }

    pub async fn manager(&self) -> Swarm {
        Swarm::connect_to(Some(&format!("unix://{}", self.manager_sock())), OVERLAY)
            .await
            .expect("manager")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let t = Instant::now();
        Self::down();
        eprintln!("swarm down in {:?}", t.elapsed());
    }
}

/// One audit record: (event name, event JSON).
pub type Record = (String, serde_json::Value);

/// The CP service on a cluster.
pub struct SwarmCp {
    pub swarm: Swarm,
    pub deployed: DeployedCp,
    pub state: tempfile::TempDir,
}

impl SwarmCp {
    /// `clawker ca init` into a fresh state dir, then `clawker cp deploy`.
    pub async fn deploy(cluster: &Cluster) -> Self {
        Self::deploy_with(cluster, None).await
    }

    /// [`SwarmCp::deploy`] with a `cp.toml` for the CP service.
    pub async fn deploy_with(cluster: &Cluster, config_toml: Option<&str>) -> Self {
        let state = tempfile::tempdir().unwrap();
        clawker::pki::AuthMaterial::ensure(state.path()).unwrap();
        let swarm = cluster.manager().await;
        let req = DeployRequest {
            image: cp_image(),
            network: OVERLAY.into(),
            subnet: OVERLAY_SUBNET.into(),
            quarantine_network: QUARANTINE_OVERLAY.into(),
            quarantine_subnet: QUARANTINE_SUBNET.into(),
            encrypted: false,
            agent_port: clawker::defaults::AGENT_PORT,
            admin_port: ADMIN_PORT,
            engine_socket: cluster.manager_sock(),
            config_toml: config_toml.map(str::to_owned),
            log_filter: "info,clawker=debug".into(),
        };
        let t = Instant::now();
        let deployed = deploy(&swarm, state.path(), &req).await.expect("cp deploy");
        eprintln!(
            "CP service running in {:?} at {} (task {})",
            t.elapsed(),
            deployed.overlay_ip,
            deployed.task_id
        );
        Self {
            swarm,
            deployed,
            state,
        }
    }

    pub fn material(&self) -> clawker::pki::AuthMaterial {
        clawker::pki::AuthMaterial::load(self.state.path()).unwrap()
    }

    /// Every audit record so far (empty while the CP has none yet).
    pub async fn records(&self) -> Vec<Record> {
        let Ok(Some(task)) = self.swarm.current_task(&self.deployed.service_id).await else {
            return Vec::new();
        };
        let cid = task.container_id().to_owned();
        if cid.is_empty() {
            return Vec::new();
        }
        let mut stream = self.swarm.docker().download_from_container(
            &cid,
            Some(bollard::query_parameters::DownloadFromContainerOptions {
                path: "/var/lib/clawker/audit/events.jsonl".into(),
            }),
        );
        let mut tar = Vec::new();
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(b) => tar.extend_from_slice(&b),
                Err(_) => return Vec::new(),
            }
        }
        let mut text = String::new();
        let mut ar = tar::Archive::new(tar.as_slice());
        if let Ok(mut entries) = ar.entries()
            && let Some(Ok(mut e)) = entries.next()
        {
            use std::io::Read;
            let _ = e.read_to_string(&mut text);
        }
        text.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .map(|v| {
                (
                    v["name"].as_str().unwrap_or("").to_owned(),
                    v["event"].clone(),
                )
            })
            .collect()
    }

    /// Waits until `pred` holds for the records; returns them.
    pub async fn wait(
        &self,
        what: &str,
        secs: u64,
        pred: impl Fn(&[Record]) -> bool,
    ) -> Vec<Record> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let recs = self.records().await;
            if pred(&recs) {
                return recs;
            }
            if Instant::now() > deadline {
                let tail: Vec<String> = recs
                    .iter()
                    .rev()
                    .take(40)
                    .rev()
                    .map(|(n, j)| format!("{n} {}", j["container_id"].as_str().unwrap_or("")))
                    .collect();
                panic!(
                    "timed out after {secs}s waiting for {what}; last records:\n{}",
                    tail.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Names of the records about runtime id `id`, in order.
pub fn names_for(recs: &[Record], id: &str) -> Vec<String> {
    recs.iter()
        .filter(|(_, j)| j["container_id"] == id)
        .map(|(n, _)| n.clone())
        .collect()
}

pub fn count_for(recs: &[Record], id: &str, name: &str) -> usize {
    names_for(recs, id).iter().filter(|n| *n == name).count()
}

/// Event `at` (RFC 3339) as Unix nanoseconds.
pub fn at_nanos(j: &serde_json::Value) -> Option<i128> {
    time::OffsetDateTime::parse(
        j["at"].as_str()?,
        &time::format_description::well_known::Rfc3339,
    )
    .ok()
    .map(|t| t.unix_timestamp_nanos())
}
