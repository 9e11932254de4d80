//! The runtime seam on one Docker engine: inspecting a container and the
//! operations containment needs.

use std::time::Duration;

use bollard::Docker;
use futures::future::BoxFuture;

use super::{DockerError, is_status};
use crate::runtime::{ContainerFacts, ContainmentOps, Inspect, RuntimeError, Stopped, Terminate};

/// One Docker engine, seen through the runtime seam. `network` is the agent
/// network whose address is a container's `ip` (clawkerd listens there and
/// Register's peer IP must come from there).
#[derive(Clone)]
pub struct Engine {
    docker: Docker,
    network: String,
}

impl Engine {
    pub fn new(docker: Docker, network: &str) -> Self {
        Self {
            docker,
            network: network.to_owned(),
        }
    }

    pub fn docker(&self) -> &Docker {
        &self.docker
    }
}

/// Inspects `id`, reading its address on `network`. A missing container is
/// `DockerError::NotFound`; an unparsable or empty IP reads as "no address".
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
    let ip = nets
        .get(network)
        .and_then(|ep| ep.ip_address.as_deref())
        .and_then(|ip| ip.parse().ok());
    let mut networks: Vec<String> = nets.into_keys().collect();
    networks.sort();
    let state = resp.state.unwrap_or_default();
    Ok(ContainerFacts {
        id: resp.id.unwrap_or_else(|| id.to_owned()),
        name: resp
            .name
            .map(|n| n.trim_start_matches('/').to_owned())
            .unwrap_or_default(),
        labels,
        ip,
        networks,
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
            inspect_on(&self.docker, id, &self.network)
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

impl ContainmentOps for Engine {
    fn networks_of<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Vec<String>, RuntimeError>> {
        Box::pin(async move { Ok(self.inspect(id).await?.networks) })
    }

    fn disconnect<'a>(
        &'a self,
        id: &'a str,
        network: &'a str,
    ) -> BoxFuture<'a, Result<(), RuntimeError>> {
        Box::pin(async move {
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
