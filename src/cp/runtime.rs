//! The runtime choice (`runtime = "engine" | "swarm"` in cp.toml): the one
//! place that builds the seam's implementations. Everything the CP starts
//! afterwards (sessions, Register, containment, the feeder actor, the
//! startup reap) gets them as trait objects and never learns which.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clawker_actors::Backoff;

use super::config::{CpConfig, RuntimeKind};
use crate::defaults;
use crate::docker::engine::AgentNetworks;
use crate::docker::seam::EngineFeed;
use crate::docker::swarm::Swarm;
use crate::docker::swarm::feed::SwarmFeed;
use crate::docker::swarm::overlay::{self, KernelConfig};
use crate::docker::{self, Docker, Engine};
use crate::runtime::feed::EventFeed;
use crate::runtime::{AgentPortGuard, ContainmentOps, Inspect, Inventory};

/// The runtime, as the rest of the CP needs it.
pub struct Backend {
    pub inspect: Arc<dyn Inspect>,
    pub containment: Arc<dyn ContainmentOps>,
    pub inventory: Arc<dyn Inventory>,
    pub feed: Arc<dyn EventFeed>,
    /// The agent-port guard (engine mode; `None` in Swarm mode).
    pub port_guard: Option<Arc<dyn AgentPortGuard>>,
    /// Where the agent API listens, which is where agents reach the CP and
    /// whence the CP dials them (engine: clawker-net's gateway on the host;
    /// swarm: the CP task's own overlay address).
    pub agent_ip: IpAddr,
    /// Whether the admin API may listen beyond loopback: in Swarm mode the
    /// CP runs in a container, whose loopback the operator cannot reach.
    pub admin_beyond_loopback: bool,
    /// The engine (engine mode) or manager (swarm mode) connection.
    pub docker: Docker,
}

/// Connects to the configured runtime and prepares the agent network.
pub async fn connect(cfg: &CpConfig) -> anyhow::Result<Backend> {
    match cfg.runtime {
        RuntimeKind::Engine => engine(cfg).await,
        RuntimeKind::Swarm => swarm(cfg).await,
    }
}

async fn engine(cfg: &CpConfig) -> anyhow::Result<Backend> {
    let docker = wait_for_engine().await;
    let net = docker::network::ensure(&docker, &cfg.network, &cfg.subnet)
        .await
        .with_context(|| format!("ensuring network {}", cfg.network))?;
    tracing::info!(runtime = "engine", network = %net.name, subnet = %net.subnet, gateway = %net.gateway, "agent network ready");
    let quarantine = docker::network::ensure_quarantine(
        &docker,
        &cfg.quarantine_network,
        &cfg.quarantine_subnet,
    )
    .await
    .with_context(|| format!("ensuring network {}", cfg.quarantine_network))?;
    // The bridge is a dead end before any agent is moved onto it. Without
    // root or nft this fails; the CP still serves, and `isolate` reports
    // the same error per agent (it re-guards before every move).
    match crate::netns::guard_bridge(&quarantine.bridge, Duration::from_secs(10)).await {
        Ok(()) => tracing::info!(
            network = %quarantine.name,
            subnet = %quarantine.subnet,
            bridge = %quarantine.bridge,
            "quarantine network ready and guarded"
        ),
        Err(e) => tracing::error!(
            network = %quarantine.name,
            bridge = %quarantine.bridge,
            error = %e,
            "cannot guard the quarantine bridge on the host; isolate will fail until this is fixed"
        ),
    }
    let engine = Arc::new(Engine::new(
        docker.clone(),
        AgentNetworks::new(&cfg.network)
            .with_quarantine(&cfg.quarantine_network, &cfg.quarantine_subnet),
    ));
    Ok(Backend {
        inspect: engine.clone(),
        containment: engine.clone(),
        port_guard: Some(engine),
        inventory: Arc::new(docker.clone()),
        feed: Arc::new(EngineFeed::new(docker.clone())),
        agent_ip: net.gateway,
        admin_beyond_loopback: false,
        docker,
    })
}

/// Retry pace while the CP waits for its engine at startup.
const ENGINE_WAIT: Backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(1));

/// Connects to the Docker engine, waiting as long as it takes: a CP started
/// before its engine (socket absent, daemon down) logs a clear error and
/// keeps trying at most [`ENGINE_WAIT`]'s cap apart, then carries on with
/// its startup the moment the engine answers — no restart needed. (The
/// caller races this against SIGTERM.)
async fn wait_for_engine() -> Docker {
    let mut retry = ENGINE_WAIT.retry();
    let mut since: Option<std::time::Instant> = None;
    let mut failures = 0u32;
    loop {
        match docker::connect().await {
            Ok(d) => {
                if let Some(t) = since {
                    tracing::info!(
                        waited_ms = t.elapsed().as_millis() as u64,
                        "Docker engine reachable; control plane starting"
                    );
                }
                return d;
            }
            Err(e) => {
                since.get_or_insert_with(std::time::Instant::now);
                failures += 1;
                if failures == 1 || failures.is_multiple_of(60) {
                    tracing::error!(error = %e, failures, "cannot reach the Docker engine; the control plane waits for it (retrying every second)");
                }
                tokio::time::sleep(retry.next_delay()).await;
            }
        }
    }
}

async fn swarm(cfg: &CpConfig) -> anyhow::Result<Backend> {
    let swarm = Swarm::connect(&cfg.network)
        .await?
        .with_quarantine(&cfg.quarantine_network);
    let Some(ov) = overlay::find(&swarm, &cfg.network).await? else {
        bail!(
            "runtime = \"swarm\": the overlay {} does not exist; `clawker cp deploy` creates it with the CP service",
            cfg.network
        );
    };
    if ov.encrypted {
        overlay::check_encryption(&KernelConfig::read_running())
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("overlay {} is encrypted", ov.name))?;
    } else if cfg.swarm_encrypted {
        bail!(
            "[swarm] encrypted = true, but the overlay {} is not encrypted: remove it and deploy again (`clawker cp deploy --encrypted`)",
            ov.name
        );
    }
    // The CP dials agents at overlay addresses, which only containers on
    // the overlay can reach: it must be the task of its own service.
    let task_id = std::env::var(defaults::swarm::TASK_ID_ENV)
        .ok()
        .filter(|t| !t.is_empty() && !t.contains("{{"))
        .with_context(|| {
            format!(
                "runtime = \"swarm\" needs the CP to run as the swarm service `clawker cp deploy` creates \
                 ({} is unset): a CP outside the overlay cannot reach agent tasks",
                defaults::swarm::TASK_ID_ENV
            )
        })?;
    let task = swarm
        .task(&task_id)
        .await
        .with_context(|| format!("reading the CP's own task {task_id}"))?;
    let agent_ip = task.address_on(&cfg.network).with_context(|| {
        format!(
            "the CP's task {task_id} has no address on {} (attach the CP service to it)",
            cfg.network
        )
    })?;
    // Isolate moves agents onto the quarantine overlay; the CP must be on
    // it too, or a quarantined agent's session could not be re-dialled.
    match task.address_on(&cfg.quarantine_network) {
        Some(ip) => {
            tracing::info!(network = %cfg.quarantine_network, address = %ip, "quarantine overlay attached")
        }
        None => tracing::error!(
            network = %cfg.quarantine_network,
            "the CP's task is not on the quarantine overlay: isolate would cut the CP off; redeploy with `clawker cp deploy`"
        ),
    }
    tracing::info!(runtime = "swarm", network = %ov.name, subnet = %ov.subnet, encrypted = ov.encrypted, node = %swarm.node_id(), address = %agent_ip, "agent overlay ready");
    Ok(Backend {
        inspect: Arc::new(swarm.clone()),
        containment: Arc::new(swarm.clone()),
        inventory: Arc::new(swarm.clone()),
        feed: Arc::new(SwarmFeed::new(swarm.clone())),
        // No way into a task's network namespace (see
        // `docker::swarm::lock_unreachable`): clawkerd's port is left to its
        // mutual TLS, which refuses every peer but the CP.
        port_guard: None,
        agent_ip,
        admin_beyond_loopback: true,
        docker: swarm.docker().clone(),
    })
}
