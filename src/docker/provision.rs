//! Agent containers on the engine: create one with the clawker labels on the
//! agent network and its [`Confinement`] (capabilities, limits, read-only
//! root, mounts), copy its bootstrap bundle in between create and start (so
//! clawkerd finds it as PID 1), start it; find, stop and remove one by name
//! (with its anonymous volumes).
//!
//! What goes into the bundle (certificates, the assertion) is decided above
//! this module: [`run`] asks for it through a callback once the container id
//! exists, because the leaf names that id.

use std::collections::HashMap;

use bollard::Docker;
use bollard::models::{ContainerCreateBody, HostConfig, Mount, MountType, NetworkConnectRequest};
use bollard::query_parameters::{
    CreateContainerOptions, RemoveContainerOptions, StopContainerOptions, UploadToContainerOptions,
};

use super::{DockerError, is_status, network};
use crate::defaults::labels;
pub use crate::runtime::provision::Confinement;

/// An agent container to create.
#[derive(Debug, Clone)]
pub struct AgentContainerSpec {
    /// Container name (unique per engine).
    pub name: String,
    pub agent: String,
    /// Empty = unscoped (no project label).
    pub project: String,
    pub image: String,
    /// The agent network (its gateway is where clawkerd reaches the CP).
    pub network: String,
    /// The user command; empty = the image's CMD.
    pub command: Vec<String>,
    /// Environment, `K=V`.
    pub env: Vec<String>,
    /// Extra labels (tests mark their containers).
    pub extra_labels: HashMap<String, String>,
    /// Further networks to attach before start (besides the agent network).
    pub extra_networks: Vec<String>,
    /// Where the bootstrap tar is unpacked: a path on one of
    /// `confinement.volumes` (a read-only root takes no upload).
    pub bundle_dir: String,
    pub confinement: Confinement,
}

/// The container's host config: confined by `c`, on `network`.
fn host_config(c: &Confinement, network: &str) -> HostConfig {
    let mut mounts: Vec<Mount> = c
        .volumes
        .iter()
        .map(|target| Mount {
            target: Some(target.clone()),
            typ: Some(MountType::VOLUME),
            ..Default::default()
        })
        .collect();
    mounts.extend(c.binds.iter().map(|(src, target)| Mount {
        target: Some(target.clone()),
        source: Some(src.clone()),
        typ: Some(MountType::BIND),
        read_only: Some(false),
        ..Default::default()
    }));
    HostConfig {
        network_mode: Some(network.to_owned()),
        cap_drop: Some(vec!["ALL".to_owned()]),
        cap_add: Some(c.caps.clone()),
        security_opt: c
            .no_new_privileges
            .then(|| vec!["no-new-privileges".to_owned()]),
        pids_limit: c.pids_limit,
        memory: c.memory_bytes,
        nano_cpus: c.nano_cpus,
        readonly_rootfs: Some(c.read_only_rootfs),
        tmpfs: (!c.tmpfs.is_empty()).then(|| c.tmpfs.iter().cloned().collect()),
        mounts: (!mounts.is_empty()).then_some(mounts),
        ..Default::default()
    }
}

/// Why provisioning failed, in words a user can act on.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error(
        "network {0} is missing: start the control plane first (`clawker cp serve` creates it)"
    )]
    NetworkMissing(String),
    #[error("name taken: a container named {name} already exists{hint}")]
    NameTaken { name: String, hint: String },
    #[error("image {image} not found ({message}): build it with `scripts/build-agent-image.sh`")]
    ImageMissing { image: String, message: String },
    #[error("no agent container named {0}")]
    NoSuchAgent(String),
    #[error("preparing the bootstrap bundle: {0}")]
    Bundle(String),
    #[error("{0}")]
    InvalidSpec(String),
    #[error("connecting to network {network}: {source}")]
    Connect {
        network: String,
        source: bollard::errors::Error,
    },
    #[error(transparent)]
    Docker(#[from] DockerError),
}

impl From<bollard::errors::Error> for ProvisionError {
    fn from(e: bollard::errors::Error) -> Self {
        ProvisionError::Docker(DockerError::Api(e))
    }
}

/// The agent network's gateway: the address containers reach the CP on.
pub async fn gateway(docker: &Docker, net: &str) -> Result<std::net::IpAddr, ProvisionError> {
    network::find(docker, net)
        .await?
        .map(|n| n.gateway)
        .ok_or_else(|| ProvisionError::NetworkMissing(net.to_owned()))
}

/// Creates the container, uploads the tar `bundle(id)` returns at
/// `spec.bundle_dir`,
/// attaches the extra networks and starts it; returns its id. On any
/// failure after create the container is removed: never a half-provisioned
/// container left behind.
pub async fn run<F>(
    docker: &Docker,
    spec: &AgentContainerSpec,
    bundle: F,
) -> Result<String, ProvisionError>
where
    F: FnOnce(&str) -> Result<Vec<u8>, String>,
{
    if network::find(docker, &spec.network).await?.is_none() {
        return Err(ProvisionError::NetworkMissing(spec.network.clone()));
    }
    match docker.inspect_container(&spec.name, None).await {
        Ok(_) => {
            return Err(ProvisionError::NameTaken {
                name: spec.name.clone(),
                hint: String::new(),
            });
        }
        Err(e) if is_status(&e, 404) => {}
        Err(e) => return Err(e.into()),
    }
    let mut labels = HashMap::from([
        (labels::MANAGED.to_owned(), labels::MANAGED_VALUE.to_owned()),
        (labels::AGENT.to_owned(), spec.agent.clone()),
        (labels::PURPOSE.to_owned(), labels::PURPOSE_AGENT.to_owned()),
    ]);
    if !spec.project.is_empty() {
        labels.insert(labels::PROJECT.to_owned(), spec.project.clone());
    }
    labels.extend(spec.extra_labels.clone());
    let body = ContainerCreateBody {
        image: Some(spec.image.clone()),
        cmd: (!spec.command.is_empty()).then(|| spec.command.clone()),
        env: Some(spec.env.clone()),
        labels: Some(labels),
        host_config: Some(host_config(&spec.confinement, &spec.network)),
        ..Default::default()
    };
    let created = docker
        .create_container(
            Some(CreateContainerOptions {
                name: Some(spec.name.clone()),
                ..Default::default()
            }),
            body,
        )
        .await
        .map_err(|e| match e {
            bollard::errors::Error::DockerResponseServerError {
                status_code: 404,
                message,
            } => ProvisionError::ImageMissing {
                image: spec.image.clone(),
                message,
            },
            other => other.into(),
        })?;
    let id = created.id;
    let provision = async {
        let tar = bundle(&id).map_err(ProvisionError::Bundle)?;
        docker
            .upload_to_container(
                &id,
                Some(UploadToContainerOptions {
                    path: spec.bundle_dir.clone(),
                    ..Default::default()
                }),
                bollard::body_full(tar.into()),
            )
            .await?;
        for net in &spec.extra_networks {
            docker
                .connect_network(
                    net,
                    NetworkConnectRequest {
                        container: id.clone(),
                        ..Default::default()
                    },
                )
                .await
                .map_err(|source| ProvisionError::Connect {
                    network: net.clone(),
                    source,
                })?;
        }
        docker.start_container(&id, None).await?;
        Ok::<_, ProvisionError>(())
    };
    if let Err(e) = provision.await {
        let _ = remove(docker, &id).await;
        return Err(e);
    }
    Ok(id)
}

/// The id of the container named `name`.
pub async fn find(docker: &Docker, name: &str) -> Result<String, ProvisionError> {
    match docker.inspect_container(name, None).await {
        Ok(c) => Ok(c.id.unwrap_or_else(|| name.to_owned())),
        Err(e) if is_status(&e, 404) => Err(ProvisionError::NoSuchAgent(name.to_owned())),
        Err(e) => Err(e.into()),
    }
}

/// `docker stop` with a 10 s grace period.
pub async fn stop(docker: &Docker, id: &str) -> Result<(), ProvisionError> {
    docker
        .stop_container(
            id,
            Some(StopContainerOptions {
                t: Some(10),
                ..Default::default()
            }),
        )
        .await
        .map_err(|e| DockerError::for_container(id, e))?;
    Ok(())
}

/// `docker rm -f -v`: the container and its anonymous volumes (the state
/// dir and the agent's home).
pub async fn remove(docker: &Docker, id: &str) -> Result<(), ProvisionError> {
    docker
        .remove_container(
            id,
            Some(RemoveContainerOptions {
                force: true,
                v: true,
                ..Default::default()
            }),
        )
        .await
        .map_err(|e| DockerError::for_container(id, e))?;
    Ok(())
}
