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
    /// The container's address on the agent network (`clawker-net`), if
    /// attached: where clawkerd listens and where Register's peer IP must
    /// come from.
    pub ip: Option<IpAddr>,
    /// Every attached network's name, sorted.
    pub networks: Vec<String>,
    pub running: bool,
    /// The container's init process id on this host (0 when not running);
    /// the way into its network namespace.
    pub pid: u32,
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
    /// The runtime did not answer in time.
    #[error("{what} timed out after {after:?}")]
    Timeout { what: &'static str, after: Duration },
    /// The runtime answered with an error, or could not be reached.
    #[error("docker: {0}")]
    Api(String),
}

impl RuntimeError {
    /// A fault that may pass (engine down, timeout), as opposed to a
    /// definite answer such as "no such container".
    pub fn is_transient(&self) -> bool {
        !matches!(self, RuntimeError::NotFound(_))
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

/// The runtime operations containment needs, and nothing more.
///
/// Engine mode acts on the container itself. Swarm mode acts on the
/// service (the CP reaches only the manager's API): `disconnect` drops the
/// network from the service's task template and `stop`/`kill` scale it to
/// zero, so swarm replaces or removes the task — the agent's next task has
/// a new container and address, and its session is re-dialled there.
pub trait ContainmentOps: Send + Sync + 'static {
    /// Names of the networks the container is attached to.
    fn networks_of<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Vec<String>, RuntimeError>>;
    /// Disconnect; disconnecting a network it is not on is `Ok`.
    fn disconnect<'a>(
        &'a self,
        id: &'a str,
        network: &'a str,
    ) -> BoxFuture<'a, Result<(), RuntimeError>>;
    /// Stop with a grace period before SIGKILL (`docker stop`; swarm:
    /// scale to zero, the task's own stop grace period applies).
    fn stop<'a>(
        &'a self,
        id: &'a str,
        grace: Duration,
    ) -> BoxFuture<'a, Result<Stopped, RuntimeError>>;
    /// `docker kill` (swarm: scale to zero with no stop grace period).
    fn kill<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Stopped, RuntimeError>>;
}
