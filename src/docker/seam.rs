//! The rest of the runtime seam on one Docker engine, over the modules that
//! do the work: [`Provision`] over [`provision`](super::provision),
//! [`Inventory`] over [`lister`](super::lister), and [`EngineFeed`] over
//! [`watch`](super::watch). ([`Engine`](super::Engine) has `Inspect` and
//! `ContainmentOps`.)

use std::net::IpAddr;

use bollard::Docker;
use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use super::lister::{self, Scope};
use super::provision::{self, AgentContainerSpec};
use super::watch::{self, FeederConfig};
use crate::runtime::feed::{EventFeed, FeedSink};
use crate::runtime::provision::{AgentSpec, MintBundle, Provision, ProvisionError};
use crate::runtime::{AgentListing, Inventory, ListScope, RuntimeError};

/// The edge's own provisioning error, as the seam reports it.
fn seam_error(e: provision::ProvisionError) -> ProvisionError {
    use provision::ProvisionError as E;
    match e {
        E::NetworkMissing(network) => ProvisionError::NetworkMissing {
            network,
            advice: "start the control plane first (`clawker cp serve` creates it)".into(),
        },
        E::NameTaken { name, hint } => ProvisionError::NameTaken { name, hint },
        E::ImageMissing { image, message } => ProvisionError::ImageMissing { image, message },
        E::NoSuchAgent(name) => ProvisionError::NoSuchAgent(name),
        E::Bundle(m) => ProvisionError::Bundle(m),
        E::InvalidSpec(m) => ProvisionError::InvalidSpec(m),
        E::Connect { network, source } => ProvisionError::Runtime(RuntimeError::Api(format!(
            "connecting to network {network}: {source}"
        ))),
        E::Docker(d) => ProvisionError::Runtime(d.into()),
    }
}

impl Provision for Docker {
    fn cp_address<'a>(&'a self, network: &'a str) -> BoxFuture<'a, Result<IpAddr, ProvisionError>> {
        Box::pin(async move { provision::gateway(self, network).await.map_err(seam_error) })
    }

    fn run<'a>(
        &'a self,
        spec: &'a AgentSpec,
        bundle: MintBundle<'a>,
    ) -> BoxFuture<'a, Result<String, ProvisionError>> {
        Box::pin(async move {
            if !spec.placement.is_empty() {
                return Err(ProvisionError::Unsupported(format!(
                    "placement constraints {:?} need `runtime = \"swarm\"`: one engine has nowhere else to place an agent",
                    spec.placement
                )));
            }
            let container = AgentContainerSpec {
                name: spec.name.clone(),
                agent: spec.agent.clone(),
                project: spec.project.clone(),
                image: spec.image.clone(),
                network: spec.network.clone(),
                command: spec.command.clone(),
                env: spec.env.clone(),
                extra_labels: spec.extra_labels.clone(),
                extra_networks: spec.extra_networks.clone(),
                bundle_dir: crate::defaults::agent_paths::STATE_DIR.to_owned(),
                confinement: spec.confinement.clone(),
            };
            provision::run(self, &container, |id| {
                let b = bundle(id)?;
                if b.root() != container.bundle_dir {
                    return Err(format!(
                        "bundle directory {} is not in the state volume {}",
                        b.dir, container.bundle_dir
                    ));
                }
                b.to_tar().map_err(|e| e.to_string())
            })
            .await
            .map_err(seam_error)
        })
    }

    fn find<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<String, ProvisionError>> {
        Box::pin(async move { provision::find(self, name).await.map_err(seam_error) })
    }

    fn stop<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), ProvisionError>> {
        Box::pin(async move { provision::stop(self, id).await.map_err(seam_error) })
    }

    fn remove<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), ProvisionError>> {
        Box::pin(async move { provision::remove(self, id).await.map_err(seam_error) })
    }
}

impl Inventory for Docker {
    fn list_agents(
        &self,
        scope: ListScope,
    ) -> BoxFuture<'_, Result<Vec<AgentListing>, RuntimeError>> {
        Box::pin(async move {
            let scope = match scope {
                ListScope::All => Scope::All,
                ListScope::Running => Scope::Running,
            };
            Ok(lister::list_agents(self, scope)
                .await
                .map_err(RuntimeError::from)?
                .into_iter()
                .map(|c| AgentListing {
                    running: c.state == "running",
                    id: c.id,
                })
                .collect())
        })
    }
}

/// The engine's events stream as an [`EventFeed`].
#[derive(Clone)]
pub struct EngineFeed {
    docker: Docker,
    cfg: FeederConfig,
}

impl EngineFeed {
    pub fn new(docker: Docker) -> Self {
        Self {
            docker,
            cfg: FeederConfig::default(),
        }
    }
}

impl EventFeed for EngineFeed {
    fn run(&self, sink: FeedSink, shutdown: CancellationToken) -> BoxFuture<'static, ()> {
        let (docker, cfg) = (self.docker.clone(), self.cfg);
        let connected = sink.clone();
        Box::pin(watch::run(
            docker,
            cfg,
            move |ev| {
                sink.publish(ev);
                true
            },
            move |up| connected.connected(up),
            shutdown,
        ))
    }
}
