//! The control plane as a swarm service (`clawker cp deploy`): one replica,
//! pinned to the manager this handle talks to, its state on a local volume
//! of that node, attached to the agent overlay (it dials agents at their
//! task addresses and agents register at its own), with the manager's
//! engine socket mounted (its runtime is this swarm) and the admin API
//! published in host mode on the node's address (the operator's CLI cannot
//! reach the container's loopback; the admin API admits only the CLI's
//! certificate, checked in the TLS handshake).
//!
//! The state volume gets only what the CP reads: the CA certificate, the
//! CP's server and client certificates and keys, the CLI's *public* signing
//! key, and `cp.toml`. The CA key and the CLI's private keys never enter
//! the volume or the container.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use bollard::models::{
    ContainerCreateBody, EndpointPortConfig, EndpointPortConfigProtocolEnum,
    EndpointPortConfigPublishModeEnum, EndpointSpec, EndpointSpecModeEnum, HostConfig, Mount,
    MountType, NetworkAttachmentConfig, ServiceSpec, ServiceSpecMode, ServiceSpecModeReplicated,
    TaskSpec, TaskSpecContainerSpec, TaskSpecPlacement, TaskSpecRestartPolicy,
    TaskSpecRestartPolicyConditionEnum, VolumeCreateRequest,
};
use bollard::query_parameters::{
    CreateContainerOptions, RemoveContainerOptions, UploadToContainerOptions,
};

use super::overlay;
use super::{Swarm, SwarmError};
use crate::defaults::{self, labels};
use crate::docker::is_status;

/// One file for the state volume.
#[derive(Clone)]
pub struct StateFile {
    /// Relative to the state directory (`auth/tls/server.key`).
    pub path: String,
    pub data: Vec<u8>,
    pub mode: u32,
}

impl std::fmt::Debug for StateFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StateFile({}, {:o})", self.path, self.mode)
    }
}

/// What to deploy.
#[derive(Debug, Clone)]
pub struct CpDeploySpec {
    /// The CP image (FROM scratch, the static `clawker` as entrypoint).
    pub image: String,
    pub service: String,
    pub volume: String,
    /// The agent overlay (created if missing) and its subnet.
    pub network: String,
    pub subnet: String,
    pub encrypted: bool,
    /// The internal quarantine overlay (created if missing) and its
    /// subnet: `isolate` moves agents there, and the CP is attached to it
    /// too so that their sessions survive the move.
    pub quarantine_network: String,
    pub quarantine_subnet: String,
    /// Host-mode published port of the admin API on the manager's address.
    pub admin_port: u16,
    /// The manager engine's socket as its daemon sees the host
    /// (bind-mounted into the CP as `/var/run/docker.sock`).
    pub engine_socket: String,
    /// Files to put in the state volume (overwriting same-named ones).
    pub state_files: Vec<StateFile>,
    /// `RUST_LOG` for the CP (empty: its default).
    pub log_filter: String,
    /// More environment for the CP (`K=V`).
    pub env: Vec<String>,
}

/// A running CP service.
#[derive(Debug, Clone)]
pub struct DeployedCp {
    pub service_id: String,
    pub task_id: String,
    /// The CP task's overlay address (agents register there).
    pub overlay_ip: IpAddr,
    /// Where the admin API is published (manager address : admin port).
    pub admin_addr: Option<SocketAddr>,
}

/// The CP's container-internal admin listen address.
pub const ADMIN_LISTEN_PORT: u16 = 7443;
/// Where the engine socket appears inside the CP.
const SOCKET_IN_CONTAINER: &str = "/var/run/docker.sock";

/// The CP service spec.
pub fn cp_service_spec(spec: &CpDeploySpec, node_id: &str) -> ServiceSpec {
    let labels = HashMap::from([
        (labels::MANAGED.to_owned(), labels::MANAGED_VALUE.to_owned()),
        (labels::PURPOSE.to_owned(), labels::PURPOSE_CP.to_owned()),
    ]);
    let mut env = vec![
        // Swarm fills this in per task: the CP's way to its own address.
        format!("{}={{{{.Task.ID}}}}", defaults::swarm::TASK_ID_ENV),
        format!("DOCKER_HOST=unix://{SOCKET_IN_CONTAINER}"),
        "CLAWKER_LOG_FORMAT=json".to_owned(),
    ];
    if !spec.log_filter.is_empty() {
        env.push(format!("RUST_LOG={}", spec.log_filter));
    }
    env.extend(spec.env.iter().cloned());
    ServiceSpec {
        name: Some(spec.service.clone()),
        labels: Some(labels.clone()),
        mode: Some(ServiceSpecMode {
            replicated: Some(ServiceSpecModeReplicated { replicas: Some(1) }),
            ..Default::default()
        }),
        task_template: Some(TaskSpec {
            container_spec: Some(TaskSpecContainerSpec {
                image: Some(spec.image.clone()),
                labels: Some(labels),
                args: Some(
                    [
                        "--state-dir",
                        defaults::swarm::CP_STATE_DIR,
                        "--admin-addr",
                        &format!("0.0.0.0:{ADMIN_LISTEN_PORT}"),
                        "cp",
                        "serve",
                    ]
                    .map(str::to_owned)
                    .to_vec(),
                ),
                env: Some(env),
                mounts: Some(vec![
                    Mount {
                        target: Some(defaults::swarm::CP_STATE_DIR.into()),
                        source: Some(spec.volume.clone()),
                        typ: Some(MountType::VOLUME),
                        ..Default::default()
                    },
                    Mount {
                        target: Some(SOCKET_IN_CONTAINER.into()),
                        source: Some(spec.engine_socket.clone()),
                        typ: Some(MountType::BIND),
                        ..Default::default()
                    },
                ]),
                stop_grace_period: Some(Duration::from_secs(10).as_nanos() as i64),
                ..Default::default()
            }),
            networks: Some(
                [&spec.network, &spec.quarantine_network]
                    .into_iter()
                    .map(|n| NetworkAttachmentConfig {
                        target: Some(n.clone()),
                        ..Default::default()
                    })
                    .collect(),
            ),
            // The state volume is local to this node: so is the CP.
            placement: Some(TaskSpecPlacement {
                constraints: Some(vec![format!("node.id=={node_id}")]),
                ..Default::default()
            }),
            restart_policy: Some(TaskSpecRestartPolicy {
                condition: Some(TaskSpecRestartPolicyConditionEnum::ANY),
                delay: Some(Duration::from_secs(1).as_nanos() as i64),
                ..Default::default()
            }),
            ..Default::default()
        }),
        endpoint_spec: Some(EndpointSpec {
            mode: Some(EndpointSpecModeEnum::DNSRR),
            ports: Some(vec![EndpointPortConfig {
                protocol: Some(EndpointPortConfigProtocolEnum::TCP),
                target_port: Some(i64::from(ADMIN_LISTEN_PORT)),
                published_port: Some(i64::from(spec.admin_port)),
                // The routing mesh (ingress mode) needs IPVS.
                publish_mode: Some(EndpointPortConfigPublishModeEnum::HOST),
                ..Default::default()
            }]),
        }),
        ..Default::default()
    }
}

/// A tar of `files` rooted at the state directory.
pub fn state_tar(files: &[StateFile]) -> std::io::Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    let mut dirs: Vec<String> = Vec::new();
    for f in files {
        let mut parent = String::new();
        for part in f
            .path
            .split('/')
            .rev()
            .skip(1)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
        {
            parent = if parent.is_empty() {
                part.to_owned()
            } else {
                format!("{parent}/{part}")
            };
            if !dirs.contains(&parent) {
                dirs.push(parent.clone());
                let mut h = tar::Header::new_gnu();
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o700);
                h.set_size(0);
                h.set_mtime(0);
                b.append_data(&mut h, format!("{parent}/"), std::io::empty())?;
            }
        }
        let mut h = tar::Header::new_gnu();
        h.set_mode(f.mode);
        h.set_size(f.data.len() as u64);
        h.set_mtime(0);
        b.append_data(&mut h, &f.path, f.data.as_slice())?;
    }
    b.into_inner()
}

/// Writes `files` into `volume` on this node: a container of `image` is
/// created (never started) with the volume mounted, the files are
/// extracted into the mount, the container is removed.
async fn fill_volume(swarm: &Swarm, spec: &CpDeploySpec) -> Result<(), SwarmError> {
    let docker = swarm.docker();
    let vol = VolumeCreateRequest {
        name: Some(spec.volume.clone()),
        labels: Some(HashMap::from([
            (labels::MANAGED.to_owned(), labels::MANAGED_VALUE.to_owned()),
            (labels::PURPOSE.to_owned(), labels::PURPOSE_CP.to_owned()),
        ])),
        ..Default::default()
    };
    docker.create_volume(vol).await?; // idempotent for an existing volume
    let tar = state_tar(&spec.state_files)
        .map_err(|e| SwarmError::Invalid(format!("packing the CP state: {e}")))?;
    let body = ContainerCreateBody {
        image: Some(spec.image.clone()),
        host_config: Some(HostConfig {
            mounts: Some(vec![Mount {
                target: Some(defaults::swarm::CP_STATE_DIR.into()),
                source: Some(spec.volume.clone()),
                typ: Some(MountType::VOLUME),
                ..Default::default()
            }]),
            network_mode: Some("none".into()),
            ..Default::default()
        }),
        labels: Some(HashMap::from([(
            labels::MANAGED.to_owned(),
            labels::MANAGED_VALUE.to_owned(),
        )])),
        ..Default::default()
    };
    let created = docker
        .create_container(None::<CreateContainerOptions>, body)
        .await
        .map_err(|e| match e {
            bollard::errors::Error::DockerResponseServerError {
                status_code: 404,
                message,
            } => SwarmError::Invalid(format!(
                "CP image {} not found on this manager ({message}): build it with `scripts/build-cp-image.sh`",
                spec.image
            )),
            other => other.into(),
        })?;
    let upload = docker
        .upload_to_container(
            &created.id,
            Some(UploadToContainerOptions {
                path: defaults::swarm::CP_STATE_DIR.into(),
                ..Default::default()
            }),
            bollard::body_full(tar.into()),
        )
        .await;
    let removed = docker
        .remove_container(
            &created.id,
            Some(RemoveContainerOptions {
                force: true,
                ..Default::default()
            }),
        )
        .await;
    upload?;
    removed?;
    Ok(())
}

/// Deploys (or updates) the CP service and waits until its task runs.
pub async fn deploy(swarm: &Swarm, spec: &CpDeploySpec) -> Result<DeployedCp, SwarmError> {
    overlay::ensure(swarm, &spec.network, &spec.subnet, spec.encrypted, false).await?;
    overlay::ensure(
        swarm,
        &spec.quarantine_network,
        &spec.quarantine_subnet,
        spec.encrypted,
        true,
    )
    .await?;
    fill_volume(swarm, spec).await?;
    let service = cp_service_spec(spec, swarm.node_id());
    let service_id = match swarm
        .docker()
        .inspect_service(
            &spec.service,
            None::<bollard::query_parameters::InspectServiceOptions>,
        )
        .await
    {
        Ok(existing) => {
            let id = existing.id.unwrap_or_else(|| spec.service.clone());
            // Same spec = no new task; force one so the CP reads the
            // (possibly changed) state files.
            swarm
                .update_spec(&id, |s| {
                    let force = s
                        .task_template
                        .as_ref()
                        .and_then(|t| t.force_update)
                        .unwrap_or(0);
                    *s = service.clone();
                    if let Some(t) = s.task_template.as_mut() {
                        t.force_update = Some(force + 1);
                    }
                    true
                })
                .await?;
            id
        }
        Err(e) if is_status(&e, 404) => swarm
            .docker()
            .create_service(service, None)
            .await?
            .id
            .ok_or_else(|| SwarmError::Invalid("service created without an id".into()))?,
        Err(e) => return Err(e.into()),
    };
    let (task_id, overlay_ip) = wait_cp_task(swarm, &service_id, &spec.network, None).await?;
    let admin_addr = swarm
        .node_addr()
        .parse::<IpAddr>()
        .ok()
        .map(|ip| SocketAddr::new(ip, spec.admin_port));
    Ok(DeployedCp {
        service_id,
        task_id,
        overlay_ip,
        admin_addr,
    })
}

/// Replaces the CP's task (`docker service update --force`) and waits for
/// the new one: a CP restart as swarm does it.
pub async fn restart(swarm: &Swarm, service: &str) -> Result<DeployedCp, SwarmError> {
    let svc = swarm
        .docker()
        .inspect_service(
            service,
            None::<bollard::query_parameters::InspectServiceOptions>,
        )
        .await?;
    let id = svc.id.unwrap_or_else(|| service.to_owned());
    let old = swarm.current_task(&id).await?.map(|t| t.id);
    swarm
        .update_spec(&id, |s| {
            let t = s.task_template.get_or_insert_with(Default::default);
            t.force_update = Some(t.force_update.unwrap_or(0) + 1);
            true
        })
        .await?;
    let (task_id, overlay_ip) = wait_cp_task(swarm, &id, swarm.network(), old.as_deref()).await?;
    Ok(DeployedCp {
        service_id: id,
        task_id,
        overlay_ip,
        admin_addr: None,
    })
}

/// Waits for a running CP task other than `not` with an address on
/// `network`.
async fn wait_cp_task(
    swarm: &Swarm,
    service_id: &str,
    network: &str,
    not: Option<&str>,
) -> Result<(String, IpAddr), SwarmError> {
    let started = Instant::now();
    let mut last = String::from("no task yet");
    loop {
        let tasks = swarm.tasks(&[("service", &[service_id])]).await?;
        let mine: Vec<_> = tasks
            .iter()
            .filter(|t| t.service_id == service_id && Some(t.id.as_str()) != not)
            .collect();
        if let Some(t) = super::task::current(mine.iter().copied())
            && let Some(ip) = t.address_on(network)
        {
            return Ok((t.id.clone(), ip));
        }
        if let Some(t) = mine.iter().max_by_key(|t| t.state_since_nanos()) {
            last = t.problem();
        }
        if started.elapsed() > Duration::from_secs(60) {
            return Err(SwarmError::Invalid(format!(
                "the CP service has no running task after 60 s ({last})"
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> CpDeploySpec {
        CpDeploySpec {
            image: "clawker-cp:t".into(),
            service: "clawker-cp".into(),
            volume: "clawker-cp-state".into(),
            network: "clawker-overlay".into(),
            subnet: "10.241.0.0/24".into(),
            encrypted: false,
            quarantine_network: "clawker-quarantine-overlay".into(),
            quarantine_subnet: "10.241.2.0/24".into(),
            admin_port: 17443,
            engine_socket: "/run/clsw-n1.sock".into(),
            state_files: vec![],
            log_filter: String::new(),
            env: vec!["CLAWKER_RUNTIME=swarm".into()],
        }
    }

    #[test]
    fn cp_service_is_pinned_to_its_node_with_volume_socket_and_host_published_admin() {
        let s = cp_service_spec(&spec(), "node1");
        assert_eq!(s.labels.as_ref().unwrap()["dev.clawker.purpose"], "cp");
        let tt = s.task_template.unwrap();
        assert_eq!(
            tt.placement.unwrap().constraints.unwrap(),
            ["node.id==node1"]
        );
        let cs = tt.container_spec.unwrap();
        let env = cs.env.unwrap();
        assert!(
            env.contains(&"CLAWKER_SWARM_TASK_ID={{.Task.ID}}".to_owned()),
            "{env:?}"
        );
        assert!(env.contains(&"DOCKER_HOST=unix:///var/run/docker.sock".to_owned()));
        assert!(env.contains(&"CLAWKER_RUNTIME=swarm".to_owned()));
        let args = cs.args.unwrap().join(" ");
        assert_eq!(
            args,
            "--state-dir /var/lib/clawker --admin-addr 0.0.0.0:7443 cp serve"
        );
        let mounts = cs.mounts.unwrap();
        assert_eq!(mounts[0].typ, Some(MountType::VOLUME));
        assert_eq!(mounts[0].source.as_deref(), Some("clawker-cp-state"));
        assert_eq!(mounts[1].source.as_deref(), Some("/run/clsw-n1.sock"));
        let port = &s.endpoint_spec.as_ref().unwrap().ports.as_ref().unwrap()[0];
        assert_eq!(
            port.publish_mode,
            Some(EndpointPortConfigPublishModeEnum::HOST)
        );
        assert_eq!(port.published_port, Some(17443));
        assert_eq!(
            s.endpoint_spec.unwrap().mode,
            Some(EndpointSpecModeEnum::DNSRR)
        );
    }

    #[test]
    fn state_tar_creates_private_parents_once_and_keeps_modes() {
        let files = vec![
            StateFile {
                path: "auth/tls/server.key".into(),
                data: b"k".to_vec(),
                mode: 0o600,
            },
            StateFile {
                path: "auth/tls/server.pem".into(),
                data: b"c".to_vec(),
                mode: 0o644,
            },
            StateFile {
                path: "cp.toml".into(),
                data: b"runtime = \"swarm\"".to_vec(),
                mode: 0o644,
            },
        ];
        let bytes = state_tar(&files).unwrap();
        let mut ar = tar::Archive::new(bytes.as_slice());
        let entries: Vec<(String, u32)> = ar
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.path().unwrap().display().to_string(),
                    e.header().mode().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            entries,
            [
                ("auth/".into(), 0o700),
                ("auth/tls/".into(), 0o700),
                ("auth/tls/server.key".into(), 0o600),
                ("auth/tls/server.pem".into(), 0o644),
                ("cp.toml".into(), 0o644),
            ]
        );
        assert_eq!(
            format!("{:?}", files[0]),
            "StateFile(auth/tls/server.key, 600)",
            "no key material in logs"
        );
    }
}
