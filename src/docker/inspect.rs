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
    /// The container's address on `clawker-net`, if attached and running.
    pub clawker_net_ip: Option<IpAddr>,
    /// Every attached network's name.
    pub networks: Vec<String>,
    pub running: bool,
}

/// Inspects `id`. A missing container is `DockerError::NotFound`; an
/// unparsable or empty IP reads as "no address".
pub async fn inspect(docker: &Docker, id: &str) -> Result<ContainerFacts, DockerError> {
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
        .get(NETWORK)
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
