//! The Docker edge: every Engine API call the CP makes, on bollard. This is
//! the only module that imports bollard. It implements the runtime seam
//! (`crate::runtime`) twice.
//!
//! One engine (`runtime = "engine"`):
//! - [`engine`]: [`Engine`]: inspect, and the containment operations;
//! - [`seam`]: provisioning, inventory and the events feed on one engine,
//!   over the three modules below;
//! - [`lister`]: listing managed containers;
//! - [`network`]: `clawker-net` with an explicit subnet;
//! - [`watch`]: the events feeder (reconcile, filters, reconnect);
//! - [`provision`]: creating, provisioning, starting, stopping and
//!   removing agent containers (`clawker agent run|stop|rm`).
//!
//! A Swarm cluster (`runtime = "swarm"`):
//! - [`swarm`]: agents as services, bundles as secrets, the task-polling
//!   feed, the CP's own service.

pub mod engine;
pub mod lister;
pub mod network;
pub mod provision;
pub mod seam;
pub mod swarm;
pub mod watch;

/// The engine handle the rest of the CP passes around (opaque above this
/// module).
pub use bollard::Docker;
pub use engine::Engine;

use crate::runtime::RuntimeError;

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
    #[error("docker: {0}")]
    Invalid(String),
}

impl DockerError {
    /// Maps a bollard error on a per-container call, so a vanished container
    /// is a distinct, expected outcome rather than an API failure.
    pub fn for_container(id: &str, e: bollard::errors::Error) -> Self {
        if is_status(&e, 404) {
            DockerError::NotFound(id.to_owned())
        } else {
            DockerError::Api(e)
        }
    }
}

impl From<DockerError> for RuntimeError {
    fn from(e: DockerError) -> Self {
        match e {
            DockerError::NotFound(id) => RuntimeError::NotFound(id),
            other => RuntimeError::Api(other.to_string()),
        }
    }
}

/// Whether the engine answered with this HTTP status.
pub(crate) fn is_status(e: &bollard::errors::Error, status: u16) -> bool {
    matches!(
        e,
        bollard::errors::Error::DockerResponseServerError { status_code, .. } if *status_code == status
    )
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
