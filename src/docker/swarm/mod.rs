//! Swarm mode: the runtime seam on a Docker Swarm cluster, through one
//! manager's Engine API (the CP runs as a service on that manager, with its
//! socket mounted).
//!
//! - this file: [`Swarm`], the handle (bollard plus a raw client for task
//!   addresses), and the seam's read side and containment on it:
//!   `Inspect` (an agent service's labels and its current task's overlay
//!   address), `ContainmentOps` (service updates: quarantine moves the
//!   service onto the internal quarantine overlay, stop/kill scale it to
//!   zero; lock is unsupported, see [`lock_unreachable`]), `Inventory`;
//! - [`task`]: tasks parsed from raw JSON, the current-task rule, facts;
//! - [`raw`]: the raw `GET` (bollard's `Task` drops `NetworksAttachments`);
//! - [`feed`]: the events feeder (no task events on Engine 20.10: poll the
//!   task list, service and container events only hint when);
//! - [`provision`]: agent services, bundles as swarm secrets;
//! - [`overlay`]: the attachable agent overlay, and whether this kernel
//!   can encrypt it;
//! - [`deploy`]: the CP itself as a one-replica service on this manager.
//!
//! Facts of this machine that shape the module (all measured, see
//! `/work/spikes/swarm/FINDINGS.md`): no IPVS in the kernel, so services
//! use `endpoint_mode: dnsrr` and are reached at task addresses, never a
//! VIP or the ingress mesh; cluster events exist only on managers and
//! container events only on the node that runs the container; the host
//! cannot reach overlay addresses, so the CP that dials agents must itself
//! be on the overlay.

pub mod deploy;
pub mod feed;
pub mod overlay;
pub mod provision;
pub mod raw;
pub mod task;

use std::collections::HashMap;
use std::time::Duration;

use bollard::Docker;
use bollard::models::{
    NetworkAttachmentConfig, Service, ServiceSpec, ServiceSpecMode, ServiceSpecModeReplicated,
};
use bollard::query_parameters::{ListServicesOptions, UpdateServiceOptions};
use futures::future::BoxFuture;

use self::raw::{Endpoint, RawApi, RawError, filters_query};
use self::task::{RawTask, ServiceView};
use super::is_status;
use crate::defaults::labels;
use crate::runtime::{
    AgentListing, Change, ContainerFacts, ContainmentOps, Inspect, Inventory, ListScope,
    NetworkRole, RuntimeError, Stopped,
};

#[derive(Debug, thiserror::Error)]
pub enum SwarmError {
    #[error("cannot reach the Docker engine ({endpoint}): {source}")]
    Unreachable {
        endpoint: String,
        source: bollard::errors::Error,
    },
    #[error(
        "the engine at {endpoint} is not a swarm manager (swarm state {state:?}, manager: {manager}): \
         Swarm mode needs a manager's API (`docker swarm init`, or point DOCKER_HOST at a manager)"
    )]
    NotAManager {
        endpoint: String,
        state: String,
        manager: bool,
    },
    #[error("{0} not found")]
    NotFound(String),
    #[error("docker: {0}")]
    Api(#[from] bollard::errors::Error),
    #[error(transparent)]
    Raw(#[from] RawError),
    #[error("{0}")]
    Invalid(String),
}

impl From<SwarmError> for RuntimeError {
    fn from(e: SwarmError) -> Self {
        match e {
            SwarmError::NotFound(id) => RuntimeError::NotFound(id),
            other => RuntimeError::Api(other.to_string()),
        }
    }
}

/// One swarm, through one manager. Cheap to clone.
#[derive(Clone)]
pub struct Swarm {
    docker: Docker,
    raw: RawApi,
    /// The agent overlay: a task's address on it is where clawkerd listens
    /// and where Register's peer address must come from.
    network: String,
    /// The internal quarantine overlay `isolate` moves agents onto.
    quarantine: String,
    /// The manager node this handle talks to.
    node_id: String,
    /// Its address in the swarm (where host-mode published ports are).
    node_addr: String,
}

impl std::fmt::Debug for Swarm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Swarm")
            .field("network", &self.network)
            .field("quarantine", &self.quarantine)
            .field("node_id", &self.node_id)
            .finish_non_exhaustive()
    }
}

/// How many times a service update is retried when another writer bumped
/// the service's version in between.
const UPDATE_ATTEMPTS: u32 = 5;

impl Swarm {
    /// Connects to the manager at `DOCKER_HOST` (or the default socket).
    pub async fn connect(network: &str) -> Result<Self, SwarmError> {
        let host = std::env::var("DOCKER_HOST").ok();
        Self::connect_to(host.as_deref(), network).await
    }

    /// Connects to the manager at `host` (`unix:///…` or `tcp://…`), checks
    /// that it is an active manager, and negotiates the API version.
    pub async fn connect_to(host: Option<&str>, network: &str) -> Result<Self, SwarmError> {
        let endpoint = host
            .filter(|h| !h.is_empty())
            .unwrap_or("unix:///var/run/docker.sock")
            .to_owned();
        let unreachable = |source| SwarmError::Unreachable {
            endpoint: endpoint.clone(),
            source,
        };
        let raw_endpoint = Endpoint::parse(Some(&endpoint))?;
        let docker = Docker::connect_with_host(&endpoint)
            .map_err(unreachable)?
            .negotiate_version()
            .await
            .map_err(unreachable)?;
        let info = docker.info().await.map_err(unreachable)?;
        let sw = info.swarm.unwrap_or_default();
        let state = sw
            .local_node_state
            .map(|s| s.to_string())
            .unwrap_or_default();
        let manager = sw.control_available.unwrap_or(false);
        if state != "active" || !manager {
            return Err(SwarmError::NotAManager {
                endpoint,
                state,
                manager,
            });
        }
        let version = docker.client_version().to_string();
        Ok(Self {
            raw: RawApi::new(raw_endpoint, &version),
            docker,
            network: network.to_owned(),
            quarantine: crate::defaults::swarm::QUARANTINE_NETWORK.to_owned(),
            node_id: sw.node_id.unwrap_or_default(),
            node_addr: sw.node_addr.unwrap_or_default(),
        })
    }

    pub fn docker(&self) -> &Docker {
        &self.docker
    }

    /// The agent overlay's name.
    pub fn network(&self) -> &str {
        &self.network
    }

    /// The id of the manager node this handle talks to.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// That node's swarm address (host-mode published ports live there).
    pub fn node_addr(&self) -> &str {
        &self.node_addr
    }

    /// The same swarm, with `network` as the agent overlay.
    pub fn with_network(&self, network: &str) -> Self {
        Self {
            network: network.to_owned(),
            ..self.clone()
        }
    }

    /// The same swarm, with `name` as the quarantine overlay.
    pub fn with_quarantine(&self, name: &str) -> Self {
        Self {
            quarantine: name.to_owned(),
            ..self.clone()
        }
    }

    /// The quarantine overlay's name.
    pub fn quarantine(&self) -> &str {
        &self.quarantine
    }

    /// `GET /tasks` with filters (raw: with overlay addresses).
    pub async fn tasks(&self, filters: &[(&str, &[&str])]) -> Result<Vec<RawTask>, SwarmError> {
        let body = self
            .raw
            .get(&format!("/tasks{}", filters_query(filters)))
            .await?;
        task::parse_list(&body)
            .map_err(|e| SwarmError::Invalid(format!("task listing does not parse: {e}")))
    }

    /// One task (raw).
    pub async fn task(&self, id: &str) -> Result<RawTask, SwarmError> {
        let body = self
            .raw
            .get(&format!("/tasks/{}", url_segment(id)))
            .await
            .map_err(|e| {
                if e.is_not_found() {
                    SwarmError::NotFound(format!("task {id}"))
                } else {
                    e.into()
                }
            })?;
        serde_json::from_slice(&body)
            .map_err(|e| SwarmError::Invalid(format!("task {id} does not parse: {e}")))
    }

    /// The service with exactly this id (names and id prefixes, which the
    /// engine would also accept, are refused: an id from a certificate
    /// must name one service, not whatever matches it).
    pub async fn service(&self, id: &str) -> Result<Service, SwarmError> {
        let svc = match self
            .docker
            .inspect_service(id, None::<bollard::query_parameters::InspectServiceOptions>)
            .await
        {
            Ok(s) => s,
            Err(e) if is_status(&e, 404) => return Err(SwarmError::NotFound(id.to_owned())),
            Err(e) => return Err(e.into()),
        };
        if svc.id.as_deref() != Some(id) {
            return Err(SwarmError::NotFound(id.to_owned()));
        }
        Ok(svc)
    }

    /// Services carrying every `key=value` label given.
    pub async fn services_labelled(
        &self,
        label_filters: &[String],
    ) -> Result<Vec<Service>, SwarmError> {
        let filters = HashMap::from([("label".to_owned(), label_filters.to_vec())]);
        Ok(self
            .docker
            .list_services(Some(ListServicesOptions {
                filters: Some(filters),
                ..Default::default()
            }))
            .await?)
    }

    /// Every agent service.
    pub async fn agent_services(&self) -> Result<Vec<ServiceView>, SwarmError> {
        let list = self
            .services_labelled(&[
                format!("{}={}", labels::MANAGED, labels::MANAGED_VALUE),
                format!("{}={}", labels::PURPOSE, labels::PURPOSE_AGENT),
            ])
            .await?;
        Ok(list.iter().filter_map(view).collect())
    }

    /// The facts of the agent service `id`.
    pub async fn facts(&self, id: &str) -> Result<ContainerFacts, SwarmError> {
        let svc = self.service(id).await?;
        let view = view(&svc).ok_or_else(|| SwarmError::NotFound(id.to_owned()))?;
        let tasks = self.tasks(&[("service", &[id])]).await?;
        let current = task::current(tasks.iter().filter(|t| t.service_id == id));
        Ok(task::facts(&view, current, &self.network, &self.quarantine))
    }

    /// The current (running) task of service `id`, if any.
    pub async fn current_task(&self, id: &str) -> Result<Option<RawTask>, SwarmError> {
        let tasks = self.tasks(&[("service", &[id])]).await?;
        Ok(task::current(tasks.iter().filter(|t| t.service_id == id)).cloned())
    }

    /// Read-modify-write of a service's spec. `change` returns whether it
    /// changed anything (if not, nothing is sent). Retried when the
    /// version moved under us (swarm answers "update out of sequence").
    pub async fn update_spec(
        &self,
        id: &str,
        mut change: impl FnMut(&mut ServiceSpec) -> bool,
    ) -> Result<bool, SwarmError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let svc = self.service(id).await?;
            let version = svc
                .version
                .as_ref()
                .and_then(|v| v.index)
                .ok_or_else(|| SwarmError::Invalid(format!("service {id} has no version")))?;
            let mut spec = svc.spec.unwrap_or_default();
            if !change(&mut spec) {
                return Ok(false);
            }
            let opts = UpdateServiceOptions {
                version: i32::try_from(version).map_err(|_| {
                    SwarmError::Invalid(format!("service {id}: version {version} out of range"))
                })?,
                ..Default::default()
            };
            match self.docker.update_service(id, spec, opts, None).await {
                Ok(_) => return Ok(true),
                Err(e) if is_out_of_sequence(&e) && attempt < UPDATE_ATTEMPTS => {
                    tokio::time::sleep(Duration::from_millis(20 * u64::from(attempt))).await;
                }
                Err(e) if is_status(&e, 404) => return Err(SwarmError::NotFound(id.to_owned())),
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Sets the replica count; `Ok(false)` when it already was `n`.
    pub async fn scale(&self, id: &str, n: u64) -> Result<bool, SwarmError> {
        self.update_spec(id, |spec| {
            if replicas(spec) == Some(n) {
                return false;
            }
            spec.mode = Some(ServiceSpecMode {
                replicated: Some(ServiceSpecModeReplicated {
                    replicas: Some(n as i64),
                }),
                ..Default::default()
            });
            true
        })
        .await
    }

    /// The id of network `name_or_id`, `None` when it does not exist.
    pub async fn network_id(&self, name_or_id: &str) -> Result<Option<String>, SwarmError> {
        match self
            .docker
            .inspect_network(
                name_or_id,
                None::<bollard::query_parameters::InspectNetworkOptions>,
            )
            .await
        {
            Ok(n) => Ok(n.id),
            Err(e) if is_status(&e, 404) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}

/// A service's replica count (replicated mode only).
pub fn replicas(spec: &ServiceSpec) -> Option<u64> {
    spec.mode
        .as_ref()?
        .replicated
        .as_ref()?
        .replicas
        .and_then(|n| u64::try_from(n).ok())
}

/// The parts of a service the CP reads; `None` without an id.
pub fn view(svc: &Service) -> Option<ServiceView> {
    let spec = svc.spec.as_ref();
    Some(ServiceView {
        id: svc.id.clone()?,
        name: spec.and_then(|s| s.name.clone()).unwrap_or_default(),
        labels: spec.and_then(|s| s.labels.clone()).unwrap_or_default(),
    })
}

/// The engine's answer when the version given with an update is stale.
fn is_out_of_sequence(e: &bollard::errors::Error) -> bool {
    matches!(
        e,
        bollard::errors::Error::DockerResponseServerError { message, .. }
            if message.contains("out of sequence")
    )
}

/// An id as one URL path segment (ids are `[a-z0-9]`; anything else is
/// percent-encoded rather than allowed to change the path).
fn url_segment(id: &str) -> String {
    id.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.' {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

impl Inspect for Swarm {
    fn inspect<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<ContainerFacts, RuntimeError>> {
        Box::pin(async move { self.facts(id).await.map_err(RuntimeError::from) })
    }
}

impl Inventory for Swarm {
    fn list_agents(
        &self,
        scope: ListScope,
    ) -> BoxFuture<'_, Result<Vec<AgentListing>, RuntimeError>> {
        Box::pin(async move {
            let services = self.agent_services().await?;
            let tasks = self.tasks(&[("desired-state", &["running"])]).await?;
            Ok(services
                .into_iter()
                .map(|s| AgentListing {
                    running: task::current(tasks.iter().filter(|t| t.service_id == s.id)).is_some(),
                    id: s.id,
                })
                .filter(|a| scope == ListScope::All || a.running)
                .collect())
        })
    }
}

/// Why a lock cannot be installed on `task` (the CP runs on `cp_node`).
/// A lock works from outside the agent, in its network namespace; in
/// Swarm mode the CP cannot get there: on another node that namespace is
/// out of reach of the manager's API altogether, and on the CP's own node
/// the CP is itself a swarm service, in its own pid namespace (Engine
/// 20.10 service specs have no pid mode) with no `nft` in its FROM-scratch
/// image.
pub fn lock_unreachable(task: &RawTask, cp_node: &str) -> String {
    if task.node_id != cp_node {
        format!(
            "task {} runs on node {}, not on the CP's node {}: the CP cannot reach another node's network namespaces (quarantine, a service update, works on every node)",
            task::short(&task.id),
            task::short(&task.node_id),
            task::short(cp_node)
        )
    } else {
        format!(
            "task {} runs on the CP's node, but the CP is a swarm service in its own pid namespace (service specs have no pid mode on Engine 20.10) with no nft in its image: it cannot enter the task's network namespace (quarantine, a service update, still applies)",
            task::short(&task.id)
        )
    }
}

impl Swarm {
    /// Network names for ids (or names) as a service spec stores them;
    /// an unknown one stays as it is.
    async fn network_names(&self, targets: &[String]) -> Vec<String> {
        let mut names = Vec::new();
        for target in targets {
            let name = match self
                .docker
                .inspect_network(
                    target,
                    None::<bollard::query_parameters::InspectNetworkOptions>,
                )
                .await
            {
                Ok(n) => n.name.unwrap_or_else(|| target.clone()),
                Err(_) => target.clone(),
            };
            names.push(name);
        }
        names.sort();
        names
    }

    /// Replaces the task template's networks by `role`'s overlay alone. A
    /// running container cannot leave a swarm network, so this is a
    /// service update: swarm stops the task (stop-first: the moment egress
    /// ends) and starts a new one on the target overlay only, at a new
    /// address, where the session is dialled again.
    async fn move_to(&self, id: &str, role: NetworkRole) -> Result<Change, RuntimeError> {
        let target = match role {
            NetworkRole::Agent => self.network.clone(),
            NetworkRole::Quarantine => self.quarantine.clone(),
        };
        let Some(target_id) = self.network_id(&target).await? else {
            return Err(RuntimeError::Unsupported(format!(
                "the overlay {target} does not exist: `clawker cp deploy` creates it (and attaches the CP to it)"
            )));
        };
        let is_target = |t: &str| t == target_id || t == target;
        let mut left: Vec<String> = Vec::new();
        let changed = self
            .update_spec(id, |spec| {
                let nets = spec
                    .task_template
                    .get_or_insert_with(Default::default)
                    .networks
                    .get_or_insert_with(Vec::new);
                let targets: Vec<String> = nets.iter().filter_map(|n| n.target.clone()).collect();
                if targets.len() == 1 && is_target(&targets[0]) {
                    return false;
                }
                left = targets.into_iter().filter(|t| !is_target(t)).collect();
                *nets = vec![NetworkAttachmentConfig {
                    target: Some(target_id.clone()),
                    ..Default::default()
                }];
                true
            })
            .await?;
        if !changed {
            return Ok(Change::already(format!("attached only to [{target}]")));
        }
        Ok(Change::applied(format!(
            "service update: left [{}], joined {target} (swarm replaces the task)",
            self.network_names(&left).await.join(", ")
        )))
    }
}

impl ContainmentOps for Swarm {
    fn facts<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<ContainerFacts, RuntimeError>> {
        Box::pin(async move {
            let mut facts = self.facts(id).await?;
            if !facts.running {
                // No task: what the next one would join.
                let svc = self.service(id).await?;
                facts.networks = self.network_names(&spec_networks(svc.spec.as_ref())).await;
            }
            Ok(facts)
        })
    }

    fn quarantine_network(&self) -> String {
        self.quarantine.clone()
    }

    fn quarantine<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Change, RuntimeError>> {
        Box::pin(self.move_to(id, NetworkRole::Quarantine))
    }

    fn release<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Change, RuntimeError>> {
        Box::pin(self.move_to(id, NetworkRole::Agent))
    }

    fn lock<'a>(&'a self, id: &'a str, _port: u16) -> BoxFuture<'a, Result<Change, RuntimeError>> {
        Box::pin(async move {
            match self.current_task(id).await? {
                Some(t) => Err(RuntimeError::Unsupported(lock_unreachable(
                    &t,
                    &self.node_id,
                ))),
                None => {
                    self.service(id).await?;
                    Err(RuntimeError::NotRunning(id.to_owned()))
                }
            }
        })
    }

    /// Nothing to undo: Swarm mode never installs a lock.
    fn unlock<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Change, RuntimeError>> {
        Box::pin(async move {
            self.service(id).await?;
            Ok(Change::already(
                "not locked (Swarm mode cannot lock a task's network namespace)",
            ))
        })
    }

    fn stop<'a>(
        &'a self,
        id: &'a str,
        _grace: Duration,
    ) -> BoxFuture<'a, Result<Stopped, RuntimeError>> {
        Box::pin(async move {
            Ok(if self.scale(id, 0).await? {
                Stopped::Now
            } else {
                Stopped::Already
            })
        })
    }

    /// Swarm has no kill: scale to zero, and where the task runs on this
    /// manager (whose engine the CP reaches) kill its container at once.
    /// Elsewhere the task gets its stop grace period.
    fn kill<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Stopped, RuntimeError>> {
        Box::pin(async move {
            let current = self.current_task(id).await?;
            let scaled = self.scale(id, 0).await?;
            if let Some(t) = current.filter(|t| t.node_id == self.node_id) {
                let cid = t.container_id();
                if !cid.is_empty() {
                    match self
                        .docker
                        .kill_container(
                            cid,
                            None::<bollard::query_parameters::KillContainerOptions>,
                        )
                        .await
                    {
                        Ok(()) => return Ok(Stopped::Now),
                        Err(e) if is_status(&e, 404) || is_status(&e, 409) => {}
                        Err(e) => return Err(SwarmError::from(e).into()),
                    }
                }
            }
            Ok(if scaled {
                Stopped::Now
            } else {
                Stopped::Already
            })
        })
    }
}

/// The network targets of a service spec (ids once swarm stored it).
fn spec_networks(spec: Option<&ServiceSpec>) -> Vec<String> {
    spec.and_then(|s| s.task_template.as_ref())
        .and_then(|t| t.networks.as_ref())
        .map(|nets| nets.iter().filter_map(|n| n.target.clone()).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_refusal_says_which_node_and_why() {
        let t = RawTask {
            id: "taskid0123456789".into(),
            node_id: "workernode0123456".into(),
            ..Default::default()
        };
        let other = lock_unreachable(&t, "managernode01234");
        assert!(other.contains("runs on node workernode01"), "{other}");
        assert!(other.contains("CP's node managernode0"), "{other}");
        let same = lock_unreachable(&t, "workernode0123456");
        assert!(same.contains("own pid namespace"), "{same}");
    }

    #[test]
    fn ids_stay_one_path_segment() {
        assert_eq!(url_segment("y0nhlshy1234"), "y0nhlshy1234");
        assert_eq!(url_segment("../x?y"), "..%2Fx%3Fy");
    }

    #[test]
    fn replicas_and_views_read_what_is_there() {
        let mut spec = ServiceSpec::default();
        assert_eq!(replicas(&spec), None);
        spec.mode = Some(ServiceSpecMode {
            replicated: Some(ServiceSpecModeReplicated { replicas: Some(1) }),
            ..Default::default()
        });
        assert_eq!(replicas(&spec), Some(1));
        assert!(view(&Service::default()).is_none());
        let svc = Service {
            id: Some("s1".into()),
            spec: Some(ServiceSpec {
                name: Some("clawker.p.a".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(view(&svc).unwrap().name, "clawker.p.a");
    }
}
