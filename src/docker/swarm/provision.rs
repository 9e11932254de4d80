//! Agents as one-replica swarm services on the agent overlay, their
//! bootstrap bundles as swarm secrets.
//!
//! Order of `run`, and why: the leaf certificate names the agent's runtime
//! id, which in Swarm mode is the service id — known only once the service
//! exists. So the service is created with **zero** replicas, the bundle is
//! minted for its id and stored as one secret per file, and a single
//! update mounts the secrets and scales to one. Nothing runs before the
//! bundle is in place, and no task is ever replaced for it.
//!
//! **Why the bundle secrets stay for the service's life** (and are removed
//! with it, by [`remove`](Provision::remove)): every task swarm starts for
//! the service — after a restart, an update, a reschedule to another node —
//! is a fresh container that needs the leaf and its key to serve clawkerd's
//! TLS. A secret in use cannot be removed, and detaching it is a spec
//! change, which replaces the running task at once and leaves every later
//! task without a key. The secrets are the swarm counterpart of the bundle
//! files engine mode leaves in the container's filesystem for the
//! container's life. What is single-use in the bundle is the assertion, and
//! Register spends its `jti` durably before any token exists, so the copy
//! that stays behind cannot be replayed; the leaf is rotated right after
//! Register (`retire_bootstrap_leaf`, on in Swarm mode) and its thumbprint
//! retired, so the secret's key matches no row either, and a replaced task
//! boots with the rotated leaf from its named state volume
//! ([`name_state_volumes`]). Secret data never leaves the
//! manager's encrypted raft store through the API (it cannot be read
//! back); it reaches only the node that runs the task, on a tmpfs.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use base64::Engine as _;
use bollard::models::{
    EndpointSpec, EndpointSpecModeEnum, Limit, Mount, MountTmpfsOptions, MountType,
    NetworkAttachmentConfig, SecretSpec, ServiceSpec, ServiceSpecMode, ServiceSpecModeReplicated,
    TaskSpec, TaskSpecContainerSpec, TaskSpecContainerSpecFile, TaskSpecContainerSpecSecrets,
    TaskSpecPlacement, TaskSpecResources, TaskSpecRestartPolicy,
    TaskSpecRestartPolicyConditionEnum,
};
use bollard::query_parameters::ListSecretsOptions;
use futures::future::BoxFuture;
use sha2::{Digest, Sha256};

use super::task::RawTask;
use super::{Swarm, SwarmError, replicas};
use crate::defaults::labels;
use crate::docker::is_status;
use crate::runtime::provision::{
    AgentSpec, BootstrapBundle, Confinement, MintBundle, Provision, ProvisionError,
};

/// How long `run` waits for the first task to be running.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Stop grace period of an agent task (SIGTERM → SIGKILL).
const STOP_GRACE: Duration = Duration::from_secs(10);

fn swarm_error(e: SwarmError) -> ProvisionError {
    ProvisionError::Runtime(e.into())
}

fn api_error(e: bollard::errors::Error) -> ProvisionError {
    swarm_error(SwarmError::Api(e))
}

/// The service name for an agent whose container name (its canonical CN)
/// is `cn`. Swarm wants a DNS label (no dots, at most 63 characters), so
/// the dots become dashes and a digest of the CN keeps two agents apart
/// whose names would otherwise collide (`p-q`/`a` and `p`/`q-a`).
pub fn service_name(cn: &str) -> String {
    let digest = Sha256::digest(cn.as_bytes());
    let suffix = hex::encode(&digest[..4]);
    let mut base: String = cn
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect();
    base.truncate(54);
    format!("{}-{suffix}", base.trim_end_matches(['-', '_']))
}

/// The labels every agent service and its containers carry: the ones
/// Register compares with the certificate.
pub fn agent_labels(spec: &AgentSpec) -> HashMap<String, String> {
    let mut l = HashMap::from([
        (labels::MANAGED.to_owned(), labels::MANAGED_VALUE.to_owned()),
        (labels::AGENT.to_owned(), spec.agent.clone()),
        (labels::PURPOSE.to_owned(), labels::PURPOSE_AGENT.to_owned()),
    ]);
    if !spec.project.is_empty() {
        l.insert(labels::PROJECT.to_owned(), spec.project.clone());
    }
    l.extend(spec.extra_labels.clone());
    l
}

/// A tmpfs mount from engine-style options (`rw,nosuid,size=512m,mode=1777`):
/// a service spec on Engine 20.10 (API 1.41) carries only the size and the
/// mode, so the flags (`nosuid`, `nodev`, `noexec`) are dropped.
fn tmpfs_mount(target: &str, opts: &str) -> Mount {
    let mut t = MountTmpfsOptions::default();
    for o in opts.split(',') {
        if let Some(v) = o.strip_prefix("size=") {
            t.size_bytes = size_bytes(v);
        } else if let Some(v) = o.strip_prefix("mode=") {
            t.mode = i64::from_str_radix(v, 8).ok();
        }
    }
    Mount {
        target: Some(target.to_owned()),
        typ: Some(MountType::TMPFS),
        tmpfs_options: Some(t),
        ..Default::default()
    }
}

/// `16m` → 16777216 (k/m/g suffixes, powers of 1024); `None` if malformed.
fn size_bytes(v: &str) -> Option<i64> {
    let (num, shift) = match v.as_bytes().last()? {
        b'k' | b'K' => (&v[..v.len() - 1], 10),
        b'm' | b'M' => (&v[..v.len() - 1], 20),
        b'g' | b'G' => (&v[..v.len() - 1], 30),
        _ => (v, 0),
    };
    num.parse::<i64>().ok()?.checked_mul(1i64 << shift)
}

/// `c` on a task's container spec and resources. Everything maps but
/// `no_new_privileges`: Engine 20.10 service specs have no such field
/// (`Privileges.NoNewPrivileges` arrived with API 1.46), so a service's
/// tasks run without it; the capability bounding set (everything dropped
/// but what clawkerd needs) is what stops a privilege gain there.
fn confine(cs: &mut TaskSpecContainerSpec, c: &Confinement) -> TaskSpecResources {
    cs.capability_drop = Some(vec!["ALL".to_owned()]);
    cs.capability_add = Some(c.caps.iter().map(|k| format!("CAP_{k}")).collect());
    cs.read_only = Some(c.read_only_rootfs);
    let mut mounts: Vec<Mount> = c
        .volumes
        .iter()
        .map(|target| Mount {
            target: Some(target.clone()),
            typ: Some(MountType::VOLUME),
            ..Default::default()
        })
        .collect();
    mounts.extend(c.tmpfs.iter().map(|(t, o)| tmpfs_mount(t, o)));
    mounts.extend(c.binds.iter().map(|(src, target)| Mount {
        target: Some(target.clone()),
        source: Some(src.clone()),
        typ: Some(MountType::BIND),
        read_only: Some(false),
        ..Default::default()
    }));
    cs.mounts = (!mounts.is_empty()).then_some(mounts);
    TaskSpecResources {
        limits: Some(Limit {
            nano_cpus: c.nano_cpus,
            memory_bytes: c.memory_bytes,
            pids: c.pids_limit,
        }),
        ..Default::default()
    }
}

/// The service for an agent, with `replicas` tasks and no secrets yet.
pub fn agent_service_spec(spec: &AgentSpec, replicas: i64) -> ServiceSpec {
    let labels = agent_labels(spec);
    let networks = std::iter::once(&spec.network)
        .chain(&spec.extra_networks)
        .map(|n| NetworkAttachmentConfig {
            target: Some(n.clone()),
            ..Default::default()
        })
        .collect();
    let mut container = TaskSpecContainerSpec {
        image: Some(spec.image.clone()),
        labels: Some(labels.clone()),
        // Args = CMD: the image's ENTRYPOINT (clawkerd) stays PID 1.
        args: (!spec.command.is_empty()).then(|| spec.command.clone()),
        env: Some(spec.env.clone()),
        stop_grace_period: Some(STOP_GRACE.as_nanos() as i64),
        ..Default::default()
    };
    let resources = confine(&mut container, &spec.confinement);
    ServiceSpec {
        name: Some(service_name(&spec.name)),
        labels: Some(labels.clone()),
        mode: Some(ServiceSpecMode {
            replicated: Some(ServiceSpecModeReplicated {
                replicas: Some(replicas),
            }),
            ..Default::default()
        }),
        task_template: Some(TaskSpec {
            container_spec: Some(container),
            resources: Some(resources),
            networks: Some(networks),
            placement: (!spec.placement.is_empty()).then(|| TaskSpecPlacement {
                constraints: Some(spec.placement.clone()),
                ..Default::default()
            }),
            // Like a container with no restart policy: an agent whose
            // command ended stays ended (the CP sees it stop).
            restart_policy: Some(TaskSpecRestartPolicy {
                condition: Some(TaskSpecRestartPolicyConditionEnum::NONE),
                ..Default::default()
            }),
            ..Default::default()
        }),
        // No IPVS on this kernel (and nothing needs a VIP): the name
        // resolves straight to task addresses.
        endpoint_spec: Some(EndpointSpec {
            mode: Some(EndpointSpecModeEnum::DNSRR),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// One created secret and where it is mounted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountedSecret {
    pub id: String,
    pub name: String,
    pub target: String,
}

/// Secret name for one bundle file of service `service_id`.
pub fn secret_name(service_id: &str, file: &str) -> String {
    format!("clawker.{service_id}.{file}")
}

/// The named volume that holds a service's clawkerd state (`/var/lib/clawker`).
pub fn state_volume_name(service_id: &str) -> String {
    format!("clawker-state-{service_id}")
}

/// Names the service's volumes after it (the first after the service id
/// alone, any further ones with an index), instead of anonymous ones.
///
/// Why: every task swarm starts is a fresh container. With an anonymous
/// volume a replaced task lost clawkerd's state — the rotated leaf and the
/// init marker — and booted with the bundle's original leaf, whose
/// thumbprint the registry retired at the first rotation: after 12 h
/// (half the default leaf lifetime) any restart of a Swarm agent made it
/// untrusted. A named local volume survives the task on its node; a task
/// rescheduled to another node starts with an empty one (the README's
/// cluster section says what that means).
pub fn name_state_volumes(spec: &mut ServiceSpec, service_id: &str) {
    let Some(mounts) = spec
        .task_template
        .as_mut()
        .and_then(|t| t.container_spec.as_mut())
        .and_then(|c| c.mounts.as_mut())
    else {
        return;
    };
    let anonymous = mounts
        .iter_mut()
        .filter(|m| m.typ == Some(MountType::VOLUME) && m.source.is_none());
    for (i, m) in anonymous.enumerate() {
        let base = state_volume_name(service_id);
        m.source = Some(if i == 0 { base } else { format!("{base}-{i}") });
    }
}

/// Mounts `secrets` (root-owned, 0400) and sets one replica.
pub fn attach_bundle(spec: &mut ServiceSpec, secrets: &[MountedSecret]) {
    let refs = secrets
        .iter()
        .map(|s| TaskSpecContainerSpecSecrets {
            file: Some(TaskSpecContainerSpecFile {
                name: Some(s.target.clone()),
                uid: Some("0".into()),
                gid: Some("0".into()),
                mode: Some(0o400),
            }),
            secret_id: Some(s.id.clone()),
            secret_name: Some(s.name.clone()),
        })
        .collect();
    let cs = spec
        .task_template
        .get_or_insert_with(Default::default)
        .container_spec
        .get_or_insert_with(Default::default);
    cs.secrets = Some(refs);
    spec.mode = Some(ServiceSpecMode {
        replicated: Some(ServiceSpecModeReplicated { replicas: Some(1) }),
        ..Default::default()
    });
}

/// Runs `delete` until it succeeds, finds nothing (404), or `patience` runs
/// out: Docker refuses to delete a secret or volume while a task that is
/// going away still holds it, which ends within moments of the service's
/// removal.
async fn delete_while_in_use<F, Fut>(patience: Duration, mut delete: F) -> Result<(), String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), bollard::errors::Error>>,
{
    let started = Instant::now();
    loop {
        match delete().await {
            Ok(()) => return Ok(()),
            Err(e) if is_status(&e, 404) => return Ok(()),
            Err(e) if started.elapsed() < patience => {
                tracing::debug!(error = %e, "still in use; retrying");
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

impl Swarm {
    /// Creates one secret per bundle file; on failure removes those it made.
    async fn create_bundle_secrets(
        &self,
        service_id: &str,
        bundle: &BootstrapBundle,
    ) -> Result<Vec<MountedSecret>, ProvisionError> {
        let mut made = Vec::new();
        for file in &bundle.files {
            let name = secret_name(service_id, &file.name);
            let spec = SecretSpec {
                name: Some(name.clone()),
                labels: Some(HashMap::from([
                    (labels::MANAGED.to_owned(), labels::MANAGED_VALUE.to_owned()),
                    (
                        labels::PURPOSE.to_owned(),
                        labels::PURPOSE_BOOTSTRAP.to_owned(),
                    ),
                    (labels::SERVICE.to_owned(), service_id.to_owned()),
                ])),
                data: Some(base64::engine::general_purpose::STANDARD.encode(&file.data)),
                ..Default::default()
            };
            match self.docker().create_secret(spec).await {
                Ok(r) => made.push(MountedSecret {
                    id: r.id,
                    name,
                    target: bundle.path_of(file),
                }),
                Err(e) => {
                    self.remove_bundle_secrets(service_id).await;
                    return Err(api_error(e));
                }
            }
        }
        Ok(made)
    }

    /// Removes the bundle secrets of `service_id`, best effort: a secret is
    /// refused while a service still references it, which ends as soon as
    /// the service is gone, so each refusal is retried briefly.
    async fn remove_bundle_secrets(&self, service_id: &str) -> Vec<String> {
        let filters = HashMap::from([(
            "label".to_owned(),
            vec![format!("{}={service_id}", labels::SERVICE)],
        )]);
        let list = match self
            .docker()
            .list_secrets(Some(ListSecretsOptions {
                filters: Some(filters),
            }))
            .await
        {
            Ok(l) => l,
            Err(e) => return vec![format!("listing secrets: {e}")],
        };
        let mut errors = Vec::new();
        for s in list {
            let Some(id) = s.id else { continue };
            let deleted =
                delete_while_in_use(Duration::from_secs(5), || self.docker().delete_secret(&id))
                    .await;
            if let Err(e) = deleted {
                errors.push(format!("secret {id}: {e}"));
            }
        }
        errors
    }

    /// Removes the service's named state volumes from the manager's engine,
    /// retrying while the last task's container still holds them. A volume
    /// on another node stays there (the manager's API cannot reach a
    /// worker's volumes); it holds only that agent's retired state.
    async fn remove_state_volumes(&self, service_id: &str) -> Vec<String> {
        let base = state_volume_name(service_id);
        let list = match self
            .docker()
            .list_volumes(None::<bollard::query_parameters::ListVolumesOptions>)
            .await
        {
            Ok(l) => l.volumes.unwrap_or_default(),
            Err(e) => return vec![format!("listing volumes: {e}")],
        };
        let mut errors = Vec::new();
        let ours = list
            .into_iter()
            .map(|v| v.name)
            .filter(|n| n == &base || n.starts_with(&format!("{base}-")));
        for name in ours {
            let removed = delete_while_in_use(Duration::from_secs(10), || {
                self.docker().remove_volume(
                    &name,
                    None::<bollard::query_parameters::RemoveVolumeOptions>,
                )
            })
            .await;
            if let Err(e) = removed {
                errors.push(format!("volume {name}: {e}"));
            }
        }
        errors
    }

    /// Removes the service and its secrets (cleanup after a failed run, and
    /// `agent rm`).
    async fn remove_agent(&self, id: &str) -> Result<(), ProvisionError> {
        match self.docker().delete_service(id).await {
            Ok(()) => {}
            Err(e) if is_status(&e, 404) => {}
            Err(e) => return Err(api_error(e)),
        }
        let mut errors = self.remove_bundle_secrets(id).await;
        errors.extend(self.remove_state_volumes(id).await);
        if errors.is_empty() {
            Ok(())
        } else {
            Err(swarm_error(SwarmError::Invalid(format!(
                "service {id} removed, but not all of its bundle secrets: {}",
                errors.join("; ")
            ))))
        }
    }

    /// Waits until the service's first task started: it is running, or
    /// it has a container and already moved on (a command that ended at
    /// once, or containment replacing the task — what `docker start`
    /// returning means in engine mode). A task swarm could not start (no
    /// such image on the node, no node satisfying the constraints, a
    /// container that failed to start) ends the wait with swarm's words.
    async fn wait_running(&self, id: &str, timeout: Duration) -> Result<(), ProvisionError> {
        let started = Instant::now();
        let mut last = String::from("no task yet");
        loop {
            let tasks = self
                .tasks(&[("service", &[id])])
                .await
                .map_err(swarm_error)?;
            let mine: Vec<_> = tasks.iter().filter(|t| t.service_id == id).collect();
            match first_start(&mine) {
                Some(Ok(())) => return Ok(()),
                Some(Err(problem)) => return Err(ProvisionError::NotStarted(problem)),
                None => {}
            }
            if let Some(t) = mine.iter().max_by_key(|t| t.state_since_nanos()) {
                last = t.problem();
            }
            if started.elapsed() > timeout {
                return Err(ProvisionError::NotStarted(format!(
                    "no task running after {timeout:?} ({last})"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The CP service's current task address on `network`.
    pub async fn cp_task_address(&self, network: &str) -> Result<IpAddr, ProvisionError> {
        let cps = self
            .services_labelled(&[
                format!("{}={}", labels::MANAGED, labels::MANAGED_VALUE),
                format!("{}={}", labels::PURPOSE, labels::PURPOSE_CP),
            ])
            .await
            .map_err(swarm_error)?;
        for svc in &cps {
            let Some(id) = svc.id.as_deref() else {
                continue;
            };
            if let Some(t) = self.current_task(id).await.map_err(swarm_error)?
                && let Some(ip) = t.address_on(network)
            {
                return Ok(ip);
            }
        }
        Err(ProvisionError::NoControlPlane(if cps.is_empty() {
            "no control-plane service in this swarm: deploy it with `clawker cp deploy`".into()
        } else {
            format!("the control-plane service has no running task on {network}")
        }))
    }
}

impl Provision for Swarm {
    fn cp_address<'a>(&'a self, network: &'a str) -> BoxFuture<'a, Result<IpAddr, ProvisionError>> {
        Box::pin(self.cp_task_address(network))
    }

    fn run<'a>(
        &'a self,
        spec: &'a AgentSpec,
        bundle: MintBundle<'a>,
    ) -> BoxFuture<'a, Result<String, ProvisionError>> {
        Box::pin(async move {
            if self
                .network_id(&spec.network)
                .await
                .map_err(swarm_error)?
                .is_none()
            {
                return Err(ProvisionError::NetworkMissing {
                    network: spec.network.clone(),
                    advice: "deploy the control plane first (`clawker cp deploy` creates it)"
                        .into(),
                });
            }
            match self
                .docker()
                .inspect_service(
                    &service_name(&spec.name),
                    None::<bollard::query_parameters::InspectServiceOptions>,
                )
                .await
            {
                Ok(_) => {
                    return Err(ProvisionError::NameTaken {
                        name: spec.name.clone(),
                        hint: String::new(),
                    });
                }
                Err(e) if is_status(&e, 404) => {}
                Err(e) => return Err(api_error(e)),
            }
            let created = self
                .docker()
                .create_service(agent_service_spec(spec, 0), None)
                .await
                .map_err(|e| match e {
                    bollard::errors::Error::DockerResponseServerError {
                        status_code: 409, ..
                    } => ProvisionError::NameTaken {
                        name: spec.name.clone(),
                        hint: String::new(),
                    },
                    other => api_error(other),
                })?;
            let id = created.id.ok_or_else(|| {
                swarm_error(SwarmError::Invalid("service created without an id".into()))
            })?;
            let provision = async {
                let bundle = bundle(&id).map_err(ProvisionError::Bundle)?;
                let secrets = self.create_bundle_secrets(&id, &bundle).await?;
                self.update_spec(&id, |s| {
                    attach_bundle(s, &secrets);
                    name_state_volumes(s, &id);
                    true
                })
                .await
                .map_err(swarm_error)?;
                self.wait_running(&id, START_TIMEOUT).await
            };
            if let Err(e) = provision.await {
                if let Err(cleanup) = self.remove_agent(&id).await {
                    tracing::warn!(service_id = %id, error = %cleanup, "cleanup after a failed agent run");
                }
                return Err(e);
            }
            Ok(id)
        })
    }

    fn find<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<String, ProvisionError>> {
        Box::pin(async move {
            let svc = match self
                .docker()
                .inspect_service(
                    &service_name(name),
                    None::<bollard::query_parameters::InspectServiceOptions>,
                )
                .await
            {
                Ok(s) => s,
                Err(e) if is_status(&e, 404) => {
                    return Err(ProvisionError::NoSuchAgent(name.to_owned()));
                }
                Err(e) => return Err(api_error(e)),
            };
            let is_agent = svc
                .spec
                .as_ref()
                .and_then(|s| s.labels.as_ref())
                .is_some_and(|l| {
                    l.get(labels::PURPOSE).map(String::as_str) == Some(labels::PURPOSE_AGENT)
                });
            match svc.id {
                Some(id) if is_agent => Ok(id),
                _ => Err(ProvisionError::NoSuchAgent(name.to_owned())),
            }
        })
    }

    fn stop<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), ProvisionError>> {
        Box::pin(async move {
            self.scale(id, 0).await.map_err(|e| match e {
                SwarmError::NotFound(_) => ProvisionError::NoSuchAgent(id.to_owned()),
                other => swarm_error(other),
            })?;
            Ok(())
        })
    }

    fn remove<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), ProvisionError>> {
        Box::pin(self.remove_agent(id))
    }
}

/// Whether a service's tasks show that it started (`Ok`), could not start
/// (`Err` with swarm's reason), or neither yet (`None`).
pub fn first_start(tasks: &[&RawTask]) -> Option<Result<(), String>> {
    for t in tasks {
        let ran = !t.container_id().is_empty()
            && matches!(
                t.status.state.as_str(),
                "running" | "complete" | "shutdown" | "failed"
            )
            && !t.status.err.contains("starting container failed");
        if ran {
            return Some(Ok(()));
        }
    }
    tasks
        .iter()
        .find(|t| matches!(t.status.state.as_str(), "rejected" | "failed"))
        .map(|t| Err(t.problem()))
}

/// Whether a service spec has one replica and the bundle mounted (tests).
pub fn is_provisioned(spec: &ServiceSpec) -> bool {
    replicas(spec) == Some(1)
        && spec
            .task_template
            .as_ref()
            .and_then(|t| t.container_spec.as_ref())
            .and_then(|c| c.secrets.as_ref())
            .is_some_and(|s| !s.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> AgentSpec {
        AgentSpec {
            name: "clawker.p.a".into(),
            agent: "a".into(),
            project: "p".into(),
            image: "clawker-agent:t".into(),
            network: "clawker-overlay".into(),
            command: vec!["sleep".into(), "1".into()],
            env: vec!["CLAWKER_AGENT=a".into()],
            extra_labels: HashMap::from([("dev.clawker.test".into(), "x".into())]),
            extra_networks: vec!["other".into()],
            placement: vec!["node.role==worker".into()],
            confinement: Confinement {
                caps: vec!["KILL".into()],
                no_new_privileges: true,
                pids_limit: Some(64),
                memory_bytes: Some(1 << 30),
                nano_cpus: None,
                read_only_rootfs: true,
                tmpfs: vec![("/tmp".into(), "rw,nosuid,size=16m,mode=1777".into())],
                volumes: vec!["/var/lib/clawker".into()],
                binds: vec![("/srv/w".into(), "/workspace".into())],
            },
        }
    }

    #[test]
    fn state_volumes_are_named_after_the_service() {
        let mut s = agent_service_spec(&spec(), 0);
        name_state_volumes(&mut s, "svc1");
        let mounts = s
            .task_template
            .unwrap()
            .container_spec
            .unwrap()
            .mounts
            .unwrap();
        let state = mounts
            .iter()
            .find(|m| m.target.as_deref() == Some("/var/lib/clawker"))
            .unwrap();
        assert_eq!(state.source.as_deref(), Some("clawker-state-svc1"));
        // Binds and tmpfs keep what they had.
        let bind = mounts
            .iter()
            .find(|m| m.typ == Some(MountType::BIND))
            .unwrap();
        assert_eq!(bind.source.as_deref(), Some("/srv/w"));
        assert!(
            mounts
                .iter()
                .any(|m| m.typ == Some(MountType::TMPFS) && m.source.is_none())
        );
    }

    #[test]
    fn confinement_maps_onto_the_task_template() {
        let s = agent_service_spec(&spec(), 0);
        let tt = s.task_template.unwrap();
        let cs = tt.container_spec.unwrap();
        assert_eq!(cs.capability_drop.unwrap(), ["ALL"]);
        assert_eq!(cs.capability_add.unwrap(), ["CAP_KILL"]);
        assert_eq!(cs.read_only, Some(true));
        let limits = tt.resources.unwrap().limits.unwrap();
        assert_eq!(
            (limits.pids, limits.memory_bytes, limits.nano_cpus),
            (Some(64), Some(1 << 30), None)
        );
        let mounts = cs.mounts.unwrap();
        let by_target = |t: &str| {
            mounts
                .iter()
                .find(|m| m.target.as_deref() == Some(t))
                .unwrap()
        };
        assert_eq!(by_target("/var/lib/clawker").typ, Some(MountType::VOLUME));
        assert!(by_target("/var/lib/clawker").source.is_none(), "anonymous");
        let tmp = by_target("/tmp");
        assert_eq!(tmp.typ, Some(MountType::TMPFS));
        let o = tmp.tmpfs_options.clone().unwrap();
        assert_eq!((o.size_bytes, o.mode), (Some(16 << 20), Some(0o1777)));
        assert_eq!(by_target("/workspace").source.as_deref(), Some("/srv/w"));
        assert_eq!(size_bytes("512"), Some(512));
        assert_eq!(size_bytes("x"), None);
        assert_eq!(size_bytes(""), None);
    }

    #[test]
    fn agent_service_is_created_empty_labelled_on_the_overlay_without_a_vip() {
        let s = agent_service_spec(&spec(), 0);
        assert_eq!(replicas(&s), Some(0));
        let labels = s.labels.clone().unwrap();
        assert_eq!(labels["dev.clawker.agent"], "a");
        assert_eq!(labels["dev.clawker.project"], "p");
        assert_eq!(labels["dev.clawker.purpose"], "agent");
        assert_eq!(labels["dev.clawker.test"], "x");
        let tt = s.task_template.clone().unwrap();
        let cs = tt.container_spec.unwrap();
        assert_eq!(
            cs.labels.unwrap(),
            labels,
            "containers carry the same labels"
        );
        assert_eq!(cs.args.unwrap(), ["sleep", "1"]);
        assert!(cs.command.is_none(), "the ENTRYPOINT (clawkerd) stays");
        assert!(cs.secrets.is_none());
        let nets: Vec<String> = tt
            .networks
            .unwrap()
            .into_iter()
            .filter_map(|n| n.target)
            .collect();
        assert_eq!(nets, ["clawker-overlay", "other"]);
        assert_eq!(
            tt.placement.unwrap().constraints.unwrap(),
            ["node.role==worker"]
        );
        assert_eq!(
            tt.restart_policy.unwrap().condition,
            Some(TaskSpecRestartPolicyConditionEnum::NONE)
        );
        assert_eq!(
            s.endpoint_spec.unwrap().mode,
            Some(EndpointSpecModeEnum::DNSRR)
        );
        let mut unscoped = spec();
        unscoped.project.clear();
        unscoped.command.clear();
        let u = agent_service_spec(&unscoped, 0);
        assert!(!u.labels.unwrap().contains_key("dev.clawker.project"));
        assert!(
            u.task_template
                .unwrap()
                .container_spec
                .unwrap()
                .args
                .is_none()
        );
    }

    #[test]
    fn a_task_that_ran_counts_as_started_one_that_could_not_is_an_error() {
        let task = |state: &str, cid: &str, err: &str| RawTask {
            id: "t1".into(),
            status: crate::docker::swarm::task::RawStatus {
                state: state.into(),
                err: err.into(),
                container_status: Some(crate::docker::swarm::task::RawContainerStatus {
                    container_id: cid.into(),
                    pid: 0,
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let pending = task("preparing", "", "");
        assert_eq!(first_start(&[&pending]), None);
        assert_eq!(first_start(&[&task("running", "c1", "")]), Some(Ok(())));
        // Replaced at once by containment: it ran.
        assert_eq!(first_start(&[&task("shutdown", "c1", "")]), Some(Ok(())));
        let rejected = task("rejected", "", "No such image: clawker-agent:nope");
        let e = first_start(&[&pending, &rejected]).unwrap().unwrap_err();
        assert!(e.contains("No such image"), "{e}");
        let bad_start = task("failed", "c2", "starting container failed: exec: \"nope\"");
        assert!(first_start(&[&bad_start]).unwrap().is_err());
    }

    #[test]
    fn service_names_are_dns_labels_and_keep_agents_apart() {
        let valid = |n: &str| {
            n.len() <= 63
                && n.starts_with(|c: char| c.is_ascii_alphanumeric())
                && n.ends_with(|c: char| c.is_ascii_alphanumeric())
                && n.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        };
        let a = service_name("clawker.p-q.a");
        let b = service_name("clawker.p.q-a");
        assert!(a.starts_with("clawker-p-q-a-"), "{a}");
        assert_ne!(a, b);
        assert_eq!(a, service_name("clawker.p-q.a"), "deterministic");
        let long = format!("clawker.{}.{}_", "x".repeat(24), "y".repeat(23));
        for n in [a, b, service_name(&long), service_name("clawker.a")] {
            assert!(valid(&n), "{n}");
        }
        assert_eq!(
            agent_service_spec(&spec(), 0).name,
            Some(service_name("clawker.p.a"))
        );
    }

    #[test]
    fn bundle_is_mounted_root_only_and_the_service_scaled_to_one() {
        let mut s = agent_service_spec(&spec(), 0);
        assert!(!is_provisioned(&s));
        let secrets = vec![MountedSecret {
            id: "sec1".into(),
            name: secret_name("svc1", "key.pem"),
            target: "/run/clawker/bootstrap/key.pem".into(),
        }];
        attach_bundle(&mut s, &secrets);
        assert!(is_provisioned(&s));
        let refs = s
            .task_template
            .unwrap()
            .container_spec
            .unwrap()
            .secrets
            .unwrap();
        let f = refs[0].file.clone().unwrap();
        assert_eq!(f.name.as_deref(), Some("/run/clawker/bootstrap/key.pem"));
        assert_eq!(
            (f.uid.as_deref(), f.gid.as_deref(), f.mode),
            (Some("0"), Some("0"), Some(0o400))
        );
        assert_eq!(refs[0].secret_name.as_deref(), Some("clawker.svc1.key.pem"));
    }
}
