//! The container-runtime seam: what the CP needs from whatever runs agent
//! containers, as narrow traits over plain types.
//!
//! Sessions, Register and containment are written against these traits;
//! `docker/` implements them twice — on one Docker engine
//! (`docker::Engine`) and on a Swarm cluster (`docker::swarm::Swarm`) — and
//! [`memory`] has in-memory doubles for tests and examples. Nothing above
//! this seam names Docker.
//!
//! The traits, by consumer:
//! - [`Inspect`]: sessions (the dial target) and Register (the facts a
//!   certificate is checked against);
//! - [`ContainmentOps`]: the containment ladder;
//! - [`Inventory`]: the startup reap and boot dial;
//! - [`feed::EventFeed`]: the events feeder actor;
//! - [`provision::Provision`]: `clawker agent run|stop|rm`.
//!
//! **What "container" means.** In engine mode a [`ContainerFacts::id`] is a
//! Docker container id. In Swarm mode it is the agent's *service* id: the
//! one id that outlives its tasks (swarm replaces a task — new container,
//! new address — on every restart, update or reschedule), so it is what
//! the leaf certificate names and what the registry row is keyed by; the
//! facts (address, running) are those of the service's current task.

pub mod feed;
pub mod memory;
pub mod provision;

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use futures::future::BoxFuture;

use crate::defaults::labels;

/// What the CP knows about one container: the one shape every consumer
/// (the session's dial target, Register's checks, containment) reads.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ContainerFacts {
    /// The runtime's canonical (64-hex) id.
    pub id: String,
    /// The container's name, without Docker's leading `/`.
    pub name: String,
    pub labels: HashMap<String, String>,
    /// The container's address on the agent network (`clawker-net`) or,
    /// while it is quarantined, on the quarantine network: where clawkerd
    /// listens and where Register's peer IP must come from.
    pub ip: Option<IpAddr>,
    /// Which network `ip` is on.
    pub ip_network: Option<NetworkRole>,
    /// The host's address on that network (the bridge gateway): where the
    /// CP's session comes from, as the container sees it.
    pub gateway: Option<IpAddr>,
    /// Every attached network's name, sorted.
    pub networks: Vec<String>,
    pub running: bool,
    /// The container's init process id on this host (0 when not running);
    /// the way into its network namespace.
    pub pid: u32,
}

/// The two networks the CP reaches agents on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetworkRole {
    /// The agent network (`clawker-net`): where trusted agents live.
    Agent,
    /// The quarantine network (`clawker-quarantine`, internal): where
    /// `isolate` puts an agent.
    Quarantine,
}

impl ContainerFacts {
    /// A running agent container labelled for (project, agent) at `ip`.
    pub fn agent(id: &str, project: &str, agent: &str, ip: IpAddr) -> Self {
        let mut labels = HashMap::new();
        labels.insert(labels::AGENT.to_owned(), agent.to_owned());
        if !project.is_empty() {
            labels.insert(labels::PROJECT.to_owned(), project.to_owned());
        }
        Self {
            id: id.to_owned(),
            labels,
            ip: Some(ip),
            ip_network: Some(NetworkRole::Agent),
            running: true,
            ..Self::default()
        }
    }

    /// A label's value; an absent label reads as the empty string (so an
    /// unscoped request matches a container without a project label).
    pub fn label(&self, key: &str) -> &str {
        self.labels.get(key).map(String::as_str).unwrap_or("")
    }

    /// The agent name its labels claim.
    pub fn agent_label(&self) -> &str {
        self.label(labels::AGENT)
    }

    /// The project its labels claim (empty = unscoped).
    pub fn project_label(&self) -> &str {
        self.label(labels::PROJECT)
    }
}

/// Why a runtime call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuntimeError {
    /// The container does not exist (an expected outcome, not a fault).
    #[error("container {0} not found")]
    NotFound(String),
    /// The operation needs a running container (e.g. its network
    /// namespace) and this one is not running.
    #[error("container {0} is not running")]
    NotRunning(String),
    /// This runtime or host cannot do it at all (no nft, the CP not root,
    /// a container sharing the host's network namespace); `.0` says why.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// The runtime did not answer in time.
    #[error("{what} timed out after {after:?}")]
    Timeout { what: &'static str, after: Duration },
    /// The runtime answered with an error, or could not be reached.
    #[error("docker: {0}")]
    Api(String),
    /// Installing or reading network rules failed.
    #[error("netfilter: {0}")]
    Netfilter(String),
}

impl RuntimeError {
    /// A fault that may pass (engine down, timeout), as opposed to a
    /// definite answer such as "no such container".
    pub fn is_transient(&self) -> bool {
        !matches!(
            self,
            RuntimeError::NotFound(_) | RuntimeError::NotRunning(_) | RuntimeError::Unsupported(_)
        )
    }
}

/// Looks a container up by id, afresh on every call (a stopped container
/// can keep a stale address, so callers check `running`).
pub trait Inspect: Send + Sync + 'static {
    fn inspect<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<ContainerFacts, RuntimeError>>;
}

/// One agent as an inventory listing sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentListing {
    /// The runtime id (see the module doc: container id or service id).
    pub id: String,
    pub running: bool,
}

/// Which agents to list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListScope {
    /// Stopped ones too (the orphan reap must not evict a stopped agent's
    /// row: it keeps its identity).
    All,
    Running,
}

/// Every agent the runtime runs, for the startup reap and the boot dial.
pub trait Inventory: Send + Sync + 'static {
    fn list_agents(
        &self,
        scope: ListScope,
    ) -> BoxFuture<'_, Result<Vec<AgentListing>, RuntimeError>>;
}

/// Result of a stop or kill.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// This call stopped it.
    Now,
    /// It was not running.
    Already,
}

/// What a containment operation did, in words for the event's `detail`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// `false`: the container was already in the target state.
    pub changed: bool,
    pub detail: String,
}

impl Change {
    pub fn applied(detail: impl Into<String>) -> Self {
        Self {
            changed: true,
            detail: detail.into(),
        }
    }

    pub fn already(detail: impl Into<String>) -> Self {
        Self {
            changed: false,
            detail: detail.into(),
        }
    }
}

/// Ending a container for good: what the session needs when an init or
/// boot step failed and clawkerd did not exit by itself (reference
/// `head-lifecycle.md` §3.2, the CP's kill backstop).
pub trait Terminate: Send + Sync + 'static {
    /// `docker kill` (SIGKILL); a container that is not running is
    /// `Stopped::Already`.
    fn kill<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Stopped, RuntimeError>>;
}

/// [`Terminate`] through a runtime's containment `kill`: the same
/// operation (engine: `docker kill`; swarm: the service scaled to zero),
/// so the CP needs no second implementation per runtime.
pub struct KillViaContainment(pub std::sync::Arc<dyn ContainmentOps>);

impl Terminate for KillViaContainment {
    fn kill<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Stopped, RuntimeError>> {
        self.0.kill(id)
    }
}

/// The runtime operations containment needs, and nothing more. Every
/// operation is idempotent: applied twice, the second reports
/// `changed: false`.
///
/// Engine mode acts on the container itself. Swarm mode acts on the
/// service through the manager's API: `quarantine`/`release` replace the
/// task template's networks (swarm replaces the task: new container, new
/// address, and the session is re-dialled there), `stop`/`kill` scale it
/// to zero; `lock`/`unlock` need the task's network namespace, which the
/// CP (a service in its own pid namespace) cannot enter: `Unsupported`,
/// with the reason (see `docker::swarm`).
pub trait ContainmentOps: Send + Sync + 'static {
    /// A container by id or name, looked up afresh.
    fn facts<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<ContainerFacts, RuntimeError>>;
    /// The name of the quarantine network (for dry-run details).
    fn quarantine_network(&self) -> String;
    /// Moves the container onto the quarantine network (internal, guarded
    /// on the host) and off every other network. A lock in force is
    /// re-pointed at the CP's address on the new network.
    fn quarantine<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Change, RuntimeError>>;
    /// The reverse: onto the agent network, off the quarantine network.
    fn release<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Change, RuntimeError>>;
    /// Locks the container's network namespace to the CP's session with
    /// clawkerd on `port` (see `netns::lock`).
    fn lock<'a>(&'a self, id: &'a str, port: u16) -> BoxFuture<'a, Result<Change, RuntimeError>>;
    /// Removes the lock.
    fn unlock<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Change, RuntimeError>>;
    /// `docker stop` with a grace period before SIGKILL.
    fn stop<'a>(
        &'a self,
        id: &'a str,
        grace: Duration,
    ) -> BoxFuture<'a, Result<Stopped, RuntimeError>>;
    /// `docker kill` (swarm: scale to zero, and kill the task's container
    /// at once where it runs on the CP's node).
    fn kill<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Stopped, RuntimeError>>;
}

/// Restricts clawkerd's port inside an agent to the CP's addresses, on
/// every start (a started container has a fresh network namespace).
/// Engine mode only: Swarm mode has no way into a task's namespace, and
/// leaves the port to clawkerd's mutual TLS.
pub trait AgentPortGuard: Send + Sync + 'static {
    fn guard_agent_port<'a>(
        &'a self,
        id: &'a str,
        port: u16,
    ) -> BoxFuture<'a, Result<Change, RuntimeError>>;
}
