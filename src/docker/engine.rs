//! The runtime seam on one Docker engine: inspecting a container and the
//! operations containment needs. Network moves are Engine API calls; what
//! happens inside a container's network namespace (lock, agent-port guard)
//! and on the host (the quarantine bridge guard) goes through the kernel
//! edge, [`crate::netns`], which this module feeds with the container's pid
//! and the CP's addresses. Why here and not in the ladder: which pid, which
//! host and which addresses are runtime facts (a Swarm task's namespace
//! lives on its node), so the runtime implementation owns them.

use std::net::IpAddr;
use std::time::Duration;

use bollard::Docker;
use futures::future::BoxFuture;

use super::{DockerError, is_status, network};
use crate::netns::{self, CpEndpoint, Installed, NetNs, NetnsError};
use crate::runtime::{
    AgentPortGuard, Change, ContainerFacts, ContainmentOps, Inspect, NetworkRole, RuntimeError,
    Stopped, Terminate,
};

/// The networks the CP reaches agents on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentNetworks {
    /// The agent network (`clawker-net`).
    pub agent: String,
    /// The quarantine network (`clawker-quarantine`) and its subnet, used
    /// if it has to be (re)created.
    pub quarantine: String,
    pub quarantine_subnet: String,
}

impl AgentNetworks {
    /// `agent` with the default quarantine network.
    pub fn new(agent: &str) -> Self {
        Self {
            agent: agent.to_owned(),
            quarantine: crate::defaults::QUARANTINE_NETWORK.to_owned(),
            quarantine_subnet: crate::defaults::QUARANTINE_SUBNET.to_owned(),
        }
    }

    pub fn with_quarantine(mut self, name: &str, subnet: &str) -> Self {
        self.quarantine = name.to_owned();
        self.quarantine_subnet = subnet.to_owned();
        self
    }
}

/// One Docker engine, seen through the runtime seam.
#[derive(Clone)]
pub struct Engine {
    docker: Docker,
    networks: AgentNetworks,
    /// Bound on each `nft` run.
    rule_timeout: Duration,
}

impl Engine {
    pub fn new(docker: Docker, networks: AgentNetworks) -> Self {
        Self {
            docker,
            networks,
            rule_timeout: Duration::from_secs(10),
        }
    }

    pub fn docker(&self) -> &Docker {
        &self.docker
    }

    pub fn networks(&self) -> &AgentNetworks {
        &self.networks
    }

    /// Restricts clawkerd's port inside the container to the CP's
    /// addresses on the agent and the quarantine network (both, so a move
    /// between them needs no update). Rules die with the namespace: the CP
    /// calls this on every start of an agent container.
    pub async fn guard_agent_port(&self, id: &str, port: u16) -> Result<Change, RuntimeError> {
        let mut cp_ips = Vec::new();
        for net in [&self.networks.agent, &self.networks.quarantine] {
            if let Some(n) = network::find(&self.docker, net).await? {
                cp_ips.push(n.gateway);
            }
        }
        let cp = CpEndpoint::new(cp_ips, port);
        let (ns, _) = self.open_netns(id).await?;
        let installed = netns::guard_agent_port(&ns, &cp, self.rule_timeout)
            .await
            .map_err(|e| netns_error(id, e))?;
        let detail = format!("port {port} open to {} only", ips_text(&cp.cp_ips));
        Ok(match installed {
            Installed::AlreadyApplied => Change::already(detail),
            _ => Change::applied(detail),
        })
    }

    /// The container's network namespace, opened race-free: inspect, open
    /// `/proc/PID/ns/net`, inspect again; the pid must be unchanged (a pid
    /// cannot be reused while its process lives, so the fd is the
    /// container's namespace). Returns the facts of the second inspect.
    async fn open_netns(&self, id: &str) -> Result<(NetNs, ContainerFacts), RuntimeError> {
        let before = self.inspect(id).await?;
        if !before.running || before.pid == 0 {
            return Err(RuntimeError::NotRunning(id.to_owned()));
        }
        let ns = NetNs::from_pid(before.pid).map_err(|e| netns_error(id, e))?;
        let after = self.inspect(id).await?;
        if !after.running || after.pid != before.pid {
            return Err(RuntimeError::NotRunning(format!(
                "{id} (restarted while its namespace was being opened)"
            )));
        }
        Ok((ns, after))
    }

    /// After a network move, a lock in force names the old gateway (and
    /// old interfaces): re-point it at the CP's address on the current
    /// network, or the CP could not reach the agent any more. Returns a
    /// note for the event's detail.
    async fn relock_if_locked(&self, id: &str) -> Result<Option<String>, RuntimeError> {
        let (ns, facts) = match self.open_netns(id).await {
            Ok(x) => x,
            Err(RuntimeError::NotRunning(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        let state = netns::lock_state(&ns, self.rule_timeout)
            .await
            .map_err(|e| netns_error(id, e))?;
        let Some(Some(lock)) = state else {
            return Ok(None);
        };
        let Some(gateway) = facts.gateway else {
            return Ok(None);
        };
        let cp = CpEndpoint::new(vec![gateway], lock.cp.port);
        netns::lock(&ns, &cp, self.rule_timeout)
            .await
            .map_err(|e| netns_error(id, e))?;
        Ok(Some(format!("lock re-pointed at {gateway}")))
    }

    /// Leaves every network but `target` (concurrently: the first one gone
    /// is egress cut), guards `target` first if it is the quarantine
    /// network, joins it, and re-points a lock in force.
    async fn move_to(&self, id: &str, role: NetworkRole) -> Result<Change, RuntimeError> {
        let facts = self.inspect(id).await?;
        let id = facts.id.as_str();
        let target = match role {
            NetworkRole::Agent => self.networks.agent.clone(),
            NetworkRole::Quarantine => self.networks.quarantine.clone(),
        };
        let leave: Vec<&String> = facts.networks.iter().filter(|n| **n != target).collect();
        let joined = facts.networks.contains(&target);
        // Disconnect first: for quarantine, that is the moment egress ends.
        let results = futures::future::join_all(leave.iter().map(|n| self.disconnect(id, n))).await;
        results.into_iter().collect::<Result<Vec<()>, _>>()?;
        if role == NetworkRole::Quarantine {
            // The bridge must be a dead end before anything joins it. Both
            // calls are idempotent and also run when already quarantined
            // (the host table may have been flushed since).
            let q = network::ensure_quarantine(
                &self.docker,
                &self.networks.quarantine,
                &self.networks.quarantine_subnet,
            )
            .await?;
            netns::guard_bridge(&q.bridge, self.rule_timeout)
                .await
                .map_err(|e| netns_error(id, e))?;
        }
        if leave.is_empty() && joined {
            return Ok(Change::already(format!("attached only to [{target}]")));
        }
        if !joined {
            let req = bollard::models::NetworkConnectRequest {
                container: id.to_owned(),
                ..Default::default()
            };
            self.docker
                .connect_network(&target, req)
                .await
                .map_err(|e| for_container(id, e))?;
        }
        let mut detail = format!(
            "left [{}], joined {target}",
            leave
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        if let Some(note) = self.relock_if_locked(id).await? {
            detail.push_str("; ");
            detail.push_str(&note);
        }
        Ok(Change::applied(detail))
    }

    /// Disconnect; disconnecting a network it is not on is `Ok`.
    async fn disconnect(&self, id: &str, network: &str) -> Result<(), RuntimeError> {
        let req = bollard::models::NetworkDisconnectRequest {
            container: id.to_owned(),
            force: Some(true),
        };
        match self.docker.disconnect_network(network, req).await {
            Ok(()) => Ok(()),
            // Already gone from that network: the goal state holds.
            Err(bollard::errors::Error::DockerResponseServerError { message, .. })
                if message.contains("is not connected") =>
            {
                Ok(())
            }
            Err(e) => Err(for_container(id, e)),
        }
    }
}

fn ips_text(ips: &[IpAddr]) -> String {
    ips.iter()
        .map(IpAddr::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// A netns failure as the runtime seam reports it.
fn netns_error(id: &str, e: NetnsError) -> RuntimeError {
    match e {
        NetnsError::NoSuchProcess(_) => RuntimeError::NotRunning(id.to_owned()),
        e if e.is_unsupported() => RuntimeError::Unsupported(e.to_string()),
        e => RuntimeError::Netfilter(e.to_string()),
    }
}

/// Inspects `id` (or a name). The address is the one on the agent network
/// or, failing that, on the quarantine network (a quarantined agent's
/// session runs there). A missing container is `DockerError::NotFound`; an
/// unparsable or empty IP reads as "no address".
pub async fn inspect_on(
    docker: &Docker,
    id: &str,
    networks: &AgentNetworks,
) -> Result<ContainerFacts, DockerError> {
    let resp = docker
        .inspect_container(id, None)
        .await
        .map_err(|e| DockerError::for_container(id, e))?;
    let labels = resp
        .config
        .as_ref()
        .and_then(|c| c.labels.clone())
        .unwrap_or_default();
    let nets = resp
        .network_settings
        .as_ref()
        .and_then(|ns| ns.networks.clone())
        .unwrap_or_default();
    let parse = |s: &Option<String>| s.as_deref().and_then(|ip| ip.parse::<IpAddr>().ok());
    let endpoint = [
        (&networks.agent, NetworkRole::Agent),
        (&networks.quarantine, NetworkRole::Quarantine),
    ]
    .into_iter()
    .find_map(|(name, role)| {
        let ep = nets.get(name)?;
        Some((parse(&ep.ip_address)?, role, parse(&ep.gateway)))
    });
    let mut names: Vec<String> = nets.into_keys().collect();
    names.sort();
    let state = resp.state.unwrap_or_default();
    Ok(ContainerFacts {
        id: resp.id.unwrap_or_else(|| id.to_owned()),
        name: resp
            .name
            .map(|n| n.trim_start_matches('/').to_owned())
            .unwrap_or_default(),
        labels,
        ip: endpoint.map(|e| e.0),
        ip_network: endpoint.map(|e| e.1),
        gateway: endpoint.and_then(|e| e.2),
        networks: names,
        running: state.running.unwrap_or(false),
        pid: state
            .pid
            .and_then(|p| u32::try_from(p).ok())
            .unwrap_or_default(),
    })
}

impl Inspect for Engine {
    fn inspect<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<ContainerFacts, RuntimeError>> {
        Box::pin(async move {
            inspect_on(&self.docker, id, &self.networks)
                .await
                .map_err(RuntimeError::from)
        })
    }
}

fn for_container(id: &str, e: bollard::errors::Error) -> RuntimeError {
    DockerError::for_container(id, e).into()
}

/// The engine answers 409 "is not running" to stop/kill of a stopped
/// container.
fn is_not_running(e: &bollard::errors::Error) -> bool {
    matches!(
        e,
        bollard::errors::Error::DockerResponseServerError { status_code: 409, message }
            if message.contains("not running")
    )
}

impl Terminate for Engine {
    fn kill<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Stopped, RuntimeError>> {
        ContainmentOps::kill(self, id)
    }
}

impl AgentPortGuard for Engine {
    fn guard_agent_port<'a>(
        &'a self,
        id: &'a str,
        port: u16,
    ) -> BoxFuture<'a, Result<Change, RuntimeError>> {
        Box::pin(Engine::guard_agent_port(self, id, port))
    }
}

impl ContainmentOps for Engine {
    fn facts<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<ContainerFacts, RuntimeError>> {
        self.inspect(id)
    }

    fn quarantine_network(&self) -> String {
        self.networks.quarantine.clone()
    }

    fn quarantine<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Change, RuntimeError>> {
        Box::pin(self.move_to(id, NetworkRole::Quarantine))
    }

    fn release<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Change, RuntimeError>> {
        Box::pin(self.move_to(id, NetworkRole::Agent))
    }

    fn lock<'a>(&'a self, id: &'a str, port: u16) -> BoxFuture<'a, Result<Change, RuntimeError>> {
        Box::pin(async move {
            let (ns, facts) = self.open_netns(id).await?;
            let gateway = facts.gateway.ok_or_else(|| {
                RuntimeError::Unsupported(format!(
                    "container {id} has no address on {} or {}: no CP address to keep open",
                    self.networks.agent, self.networks.quarantine
                ))
            })?;
            let rep = netns::lock(
                &ns,
                &CpEndpoint::new(vec![gateway], port),
                self.rule_timeout,
            )
            .await
            .map_err(|e| netns_error(id, e))?;
            let detail = format!(
                "only {gateway} -> :{port} passes (l2 [{}]); {} connection(s) destroyed",
                rep.l2_devices.join(", "),
                rep.sockets.destroyed
            );
            Ok(match rep.installed {
                Installed::AlreadyApplied => Change::already(detail),
                Installed::Replaced => Change::applied(format!("replaced an older lock: {detail}")),
                Installed::Applied => Change::applied(detail),
            })
        })
    }

    fn unlock<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Change, RuntimeError>> {
        Box::pin(async move {
            let (ns, _) = self.open_netns(id).await?;
            let was = netns::unlock(&ns, self.rule_timeout)
                .await
                .map_err(|e| netns_error(id, e))?;
            Ok(if was {
                Change::applied("lock removed")
            } else {
                Change::already("not locked")
            })
        })
    }

    fn stop<'a>(
        &'a self,
        id: &'a str,
        grace: Duration,
    ) -> BoxFuture<'a, Result<Stopped, RuntimeError>> {
        Box::pin(async move {
            // The engine answers 304 for an already stopped container, which
            // bollard reports as Ok: ask first so the outcome is honest.
            if !self.inspect(id).await?.running {
                return Ok(Stopped::Already);
            }
            let opts = bollard::query_parameters::StopContainerOptions {
                t: Some(i32::try_from(grace.as_secs()).unwrap_or(i32::MAX)),
                signal: None,
            };
            match self.docker.stop_container(id, Some(opts)).await {
                Ok(()) => Ok(Stopped::Now),
                Err(e) if is_not_running(&e) => Ok(Stopped::Already),
                Err(e) => Err(for_container(id, e)),
            }
        })
    }

    fn kill<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Stopped, RuntimeError>> {
        Box::pin(async move {
            match self.docker.kill_container(id, None).await {
                Ok(()) => Ok(Stopped::Now),
                Err(e) if is_not_running(&e) => Ok(Stopped::Already),
                Err(e) if is_status(&e, 404) => Err(RuntimeError::NotFound(id.to_owned())),
                Err(e) => Err(for_container(id, e)),
            }
        })
    }
}
