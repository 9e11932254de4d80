//! Listing agent containers (`dev.clawker.managed=true`,
//! `dev.clawker.purpose=agent`).

use std::collections::HashMap;

use bollard::Docker;
use bollard::query_parameters::ListContainersOptions;

use super::DockerError;
use crate::defaults::labels;

/// What the CP needs to know about a listed agent container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentContainer {
    pub id: String,
    /// First name without its leading `/`.
    pub name: String,
    /// Docker state: `running`, `exited`, `paused`, `created`, …
    pub state: String,
    pub image: String,
    pub labels: HashMap<String, String>,
    /// (network id, network name) of every endpoint.
    pub networks: Vec<(String, String)>,
}

/// Which containers to list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Including stopped ones (the orphan reaper needs these: a stopped
    /// container keeps its identity row).
    All,
    Running,
}

/// Lists agent containers. With `purpose = None` every managed container is
/// listed (the events feeder's reconcile wants all of them).
pub async fn list_managed(
    docker: &Docker,
    scope: Scope,
    purpose: Option<&str>,
) -> Result<Vec<AgentContainer>, DockerError> {
    let mut label_filters = vec![format!("{}={}", labels::MANAGED, labels::MANAGED_VALUE)];
    if let Some(p) = purpose {
        label_filters.push(format!("{}={p}", labels::PURPOSE));
    }
    let filters = HashMap::from([("label".to_owned(), label_filters)]);
    let opts = ListContainersOptions {
        all: scope == Scope::All,
        filters: Some(filters),
        ..Default::default()
    };
    let list = docker.list_containers(Some(opts)).await?;
    Ok(list
        .into_iter()
        .filter_map(|c| {
            let id = c.id?;
            let name = c
                .names
                .and_then(|n| n.into_iter().next())
                .map(|n| n.trim_start_matches('/').to_owned())
                .unwrap_or_default();
            let state = c.state.map(|s| s.to_string()).unwrap_or_default();
            let networks = c
                .network_settings
                .and_then(|ns| ns.networks)
                .map(|nets| {
                    nets.into_iter()
                        .filter_map(|(name, ep)| Some((ep.network_id?, name)))
                        .collect()
                })
                .unwrap_or_default();
            Some(AgentContainer {
                id,
                name,
                state,
                image: c.image.unwrap_or_default(),
                labels: c.labels.unwrap_or_default(),
                networks,
            })
        })
        .collect())
}

/// Agent containers only.
pub async fn list_agents(
    docker: &Docker,
    scope: Scope,
) -> Result<Vec<AgentContainer>, DockerError> {
    list_managed(docker, scope, Some(labels::PURPOSE_AGENT)).await
}
