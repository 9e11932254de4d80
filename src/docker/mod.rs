//! Docker adapters on bollard: connecting with actionable errors, listing
//! and inspecting agent containers, and the events feeder.
//!
//! Everything here talks to the Engine API; the rest of the CP sees only the
//! narrow types defined here (`AgentContainer`, `ContainerFacts`,
//! `DockerEvent`), so tests can feed them without an engine.

pub mod events;
pub mod inspect;
pub mod lister;
pub mod network;

use bollard::Docker;

/// Label marking every container and network clawker manages.
pub const LABEL_MANAGED: &str = "dev.clawker.managed";
pub const MANAGED_VALUE: &str = "true";
pub const LABEL_PROJECT: &str = "dev.clawker.project";
pub const LABEL_AGENT: &str = "dev.clawker.agent";
pub const LABEL_PURPOSE: &str = "dev.clawker.purpose";
pub const PURPOSE_AGENT: &str = "agent";
/// The bridge network CP and agents share.
pub const NETWORK: &str = "clawker-net";
/// The port clawkerd listens on inside every agent container.
pub const CLAWKERD_PORT: u16 = 7700;

#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    #[error(
        "cannot reach the Docker engine ({endpoint}): {source}. Is dockerd running? \
         Start it with `scripts/ensure-deps.sh` (or `dockerd &`), or point DOCKER_HOST at a running engine"
    )]
    Unreachable {
        endpoint: String,
        source: bollard::errors::Error,
    },
    #[error("container {0} not found")]
    NotFound(String),
    #[error("docker: {0}")]
    Api(#[from] bollard::errors::Error),
}

impl DockerError {
    /// Maps a bollard error on a per-container call, so a vanished container
    /// is a distinct, expected outcome rather than an API failure.
    pub fn for_container(id: &str, e: bollard::errors::Error) -> Self {
        match e {
            bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            } => DockerError::NotFound(id.to_owned()),
            other => DockerError::Api(other),
        }
    }
}

fn endpoint_description() -> String {
    std::env::var("DOCKER_HOST")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unix:///var/run/docker.sock".to_owned())
}

/// Connects (honouring `DOCKER_HOST`), negotiates the API version (Debian's
/// docker.io speaks 1.41+) and pings, so a dead engine is reported here with
/// advice instead of on the first real call.
pub async fn connect() -> Result<Docker, DockerError> {
    let endpoint = endpoint_description();
    let unreachable = |source| DockerError::Unreachable {
        endpoint: endpoint.clone(),
        source,
    };
    let docker = Docker::connect_with_defaults().map_err(unreachable)?;
    let docker = docker.negotiate_version().await.map_err(unreachable)?;
    docker.ping().await.map_err(unreachable)?;
    Ok(docker)
}
