//! Inspecting one container for the facts identity checks and dialing need.

use std::collections::HashMap;
use std::net::IpAddr;

use bollard::Docker;

use super::{DockerError, NETWORK};

/// The subset of `docker inspect` the CP acts on.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ContainerFacts {
    /// Docker's full id.
    pub id: String,
    pub name: String,
    pub labels: HashMap<String, String>,
    /// The container's address on `clawker-net` (or the network named in
    /// [`inspect_on`]), if attached.
    pub clawker_net_ip: Option<IpAddr>,
    /// Every attached network's name.
    pub networks: Vec<String>,
    pub running: bool,
}

/// Inspects `id`. A missing container is `DockerError::NotFound`; an
/// unparsable or empty IP reads as "no address".
pub async fn inspect(docker: &Docker, id: &str) -> Result<ContainerFacts, DockerError> {
    inspect_on(docker, id, NETWORK).await
}

/// [`inspect`], reading the address on network `network`.
pub async fn inspect_on(
    docker: &Docker,
    id: &str,
    network: &str,
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
    let clawker_net_ip = nets
        .get(network)
        .and_then(|ep| ep.ip_address.as_deref())
        .and_then(|ip| ip.parse().ok());
    let mut networks: Vec<String> = nets.into_keys().collect();
    networks.sort();
    Ok(ContainerFacts {
        id: resp.id.unwrap_or_else(|| id.to_owned()),
        name: resp
            .name
            .map(|n| n.trim_start_matches('/').to_owned())
            .unwrap_or_default(),
        labels,
        clawker_net_ip,
        networks,
        running: resp.state.and_then(|s| s.running).unwrap_or(false),
    })
}

/// The session's view of a container, from Docker inspect: address =
/// clawker-net IP : clawkerd port. Inspected afresh on every call (a
/// stopped container can keep a stale IP, so `running` is checked first by
/// the session).
#[derive(Clone)]
pub struct DockerResolver {
    docker: Docker,
    network: String,
    port: u16,
}

impl DockerResolver {
    pub fn new(docker: Docker, network: &str, port: u16) -> Self {
        Self {
            docker,
            network: network.to_owned(),
            port,
        }
    }
}

impl crate::session::lifecycle::ContainerResolver for DockerResolver {
    fn resolve(
        &self,
        container_id: &str,
    ) -> futures::future::BoxFuture<
        '_,
        Result<crate::session::lifecycle::ResolvedTarget, crate::session::lifecycle::ResolveError>,
    > {
        use crate::session::lifecycle::{ResolveError, ResolvedTarget};
        let id = container_id.to_owned();
        Box::pin(async move {
            match inspect_on(&self.docker, &id, &self.network).await {
                Ok(f) => Ok(ResolvedTarget {
                    agent: f
                        .labels
                        .get(super::LABEL_AGENT)
                        .cloned()
                        .unwrap_or_default(),
                    project: f
                        .labels
                        .get(super::LABEL_PROJECT)
                        .cloned()
                        .unwrap_or_default(),
                    running: f.running,
                    addr: f
                        .clawker_net_ip
                        .map(|ip| std::net::SocketAddr::new(ip, self.port)),
                }),
                Err(DockerError::NotFound(_)) => Err(ResolveError::NotFound),
                Err(e) => Err(ResolveError::Transient(e.to_string())),
            }
        })
    }
}

/// The Register handler's view of Docker (the `ContainerInspector` seam of
/// the agent API) over bollard.
#[derive(Clone)]
pub struct DockerInspector {
    docker: Docker,
    network: String,
}

impl DockerInspector {
    pub fn new(docker: Docker, network: &str) -> Self {
        Self {
            docker,
            network: network.to_owned(),
        }
    }
}

impl crate::agent_api::inspector::ContainerInspector for DockerInspector {
    async fn inspect(
        &self,
        container_id: &str,
    ) -> Result<
        crate::agent_api::inspector::ContainerFacts,
        crate::agent_api::inspector::InspectError,
    > {
        use crate::agent_api::inspector::{ContainerFacts as Facts, InspectError};
        match inspect_on(&self.docker, container_id, &self.network).await {
            Ok(f) => Ok(Facts {
                id: f.id,
                labels: f.labels,
                clawker_net_ip: f.clawker_net_ip,
                running: f.running,
            }),
            Err(DockerError::NotFound(id)) => Err(InspectError::NotFound(id)),
            Err(e) => Err(InspectError::Engine(e.to_string())),
        }
    }
}
