//! `clawker agent run|stop|rm`: create an agent container on clawker-net,
//! mint its identity, copy the bootstrap bundle in between create and start
//! (so clawkerd finds it at PID 1 start), start it.

use std::collections::HashMap;

use anyhow::{Context as _, bail};
use bollard::Docker;
use bollard::models::{ContainerCreateBody, HostConfig};
use bollard::query_parameters::{
    CreateContainerOptions, RemoveContainerOptions, StopContainerOptions, UploadToContainerOptions,
};

use crate::docker::{
    self, LABEL_AGENT, LABEL_MANAGED, LABEL_PROJECT, LABEL_PURPOSE, MANAGED_VALUE, PURPOSE_AGENT,
};
use crate::identity::{self, AgentName, ProjectSlug};
use crate::pki::{self, AuthMaterial, CertifiedKey};

/// What to run.
#[derive(Debug, Clone)]
pub struct RunSpec {
    pub agent: AgentName,
    pub project: ProjectSlug,
    pub image: String,
    pub network: String,
    pub agent_port: u16,
    /// The user command; empty = the image's CMD.
    pub command: Vec<String>,
    /// Extra labels (tests mark their containers).
    pub extra_labels: HashMap<String, String>,
    /// Further networks to attach before start (besides clawker-net).
    pub extra_networks: Vec<String>,
    /// Mint the leaf for this container id instead of the real one (a test
    /// of the untrusted path: the cert then names another container).
    pub mint_for_container: Option<String>,
}

/// The container name: the canonical CN (unique per project/agent).
pub fn container_name(project: &ProjectSlug, agent: &AgentName) -> String {
    identity::canonical_cn(project, agent)
}

/// Audience of the agent's assertion: the CP token endpoint under the TLS
/// name every client uses.
pub fn token_audience(agent_port: u16) -> String {
    format!("https://clawker-controlplane:{agent_port}/oauth2/token")
}

/// A tar with `run/clawker/bootstrap/` (0700) and its files (0400), owned
/// by root, as Docker's archive upload wants it.
pub fn bootstrap_tar(
    leaf: &CertifiedKey,
    ca_pem: &str,
    assertion: &str,
) -> std::io::Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    let dir = |path: &str, mode: u32, b: &mut tar::Builder<Vec<u8>>| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_size(0);
        h.set_mtime(0);
        b.append_data(&mut h, path, std::io::empty())
    };
    dir("run/", 0o755, &mut b)?;
    dir("run/clawker/", 0o755, &mut b)?;
    dir("run/clawker/bootstrap/", 0o700, &mut b)?;
    for (name, data) in [
        (pki::bootstrap::CERT, leaf.cert_pem.as_bytes()),
        (pki::bootstrap::KEY, leaf.key_pem.as_bytes()),
        (pki::bootstrap::CA, ca_pem.as_bytes()),
        (pki::bootstrap::ASSERTION, assertion.as_bytes()),
    ] {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o400);
        h.set_uid(0);
        h.set_gid(0);
        h.set_size(data.len() as u64);
        h.set_mtime(0);
        b.append_data(&mut h, format!("run/clawker/bootstrap/{name}"), data)?;
    }
    b.into_inner()
}

/// Creates, provisions and starts the container; returns its id.
pub async fn run(
    docker: &Docker,
    material: &AuthMaterial,
    spec: &RunSpec,
) -> anyhow::Result<String> {
    let net = docker::network::find(docker, &spec.network)
        .await?
        .with_context(|| {
            format!(
                "network {} is missing: start the control plane first (`clawker cp serve` creates it)",
                spec.network
            )
        })?;
    let name = container_name(&spec.project, &spec.agent);
    match docker.inspect_container(&name, None).await {
        Ok(_) => bail!(
            "name taken: a container named {name} already exists (remove it with `clawker agent rm {}{}`)",
            spec.agent,
            if spec.project.is_empty() {
                String::new()
            } else {
                format!(" --project {}", spec.project)
            }
        ),
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => {}
        Err(e) => return Err(e.into()),
    }
    let cp_addr = format!("{}:{}", net.gateway, spec.agent_port);
    let env = vec![
        format!("CLAWKER_AGENT={}", spec.agent),
        format!("CLAWKER_PROJECT={}", spec.project),
        format!("CLAWKER_CP_AGENT_ADDR={cp_addr}"),
        format!("CLAWKER_CP_TOKEN_URL=https://{cp_addr}/oauth2/token"),
    ];
    let mut labels = HashMap::from([
        (LABEL_MANAGED.to_owned(), MANAGED_VALUE.to_owned()),
        (LABEL_AGENT.to_owned(), spec.agent.to_string()),
        (LABEL_PURPOSE.to_owned(), PURPOSE_AGENT.to_owned()),
    ]);
    if !spec.project.is_empty() {
        labels.insert(LABEL_PROJECT.to_owned(), spec.project.to_string());
    }
    labels.extend(spec.extra_labels.clone());
    let body = ContainerCreateBody {
        image: Some(spec.image.clone()),
        cmd: (!spec.command.is_empty()).then(|| spec.command.clone()),
        env: Some(env),
        labels: Some(labels),
        host_config: Some(HostConfig {
            network_mode: Some(spec.network.clone()),
            ..Default::default()
        }),
        ..Default::default()
    };
    let created = docker
        .create_container(
            Some(CreateContainerOptions {
                name: Some(name.clone()),
                ..Default::default()
            }),
            body,
        )
        .await
        .map_err(|e| match e {
            bollard::errors::Error::DockerResponseServerError {
                status_code: 404,
                message,
            } => {
                anyhow::anyhow!(
                    "image {} not found ({message}): build it with `scripts/build-agent-image.sh`",
                    spec.image
                )
            }
            other => other.into(),
        })?;
    let id = created.id;
    let provision = async {
        let bound = spec.mint_for_container.as_deref().unwrap_or(&id);
        let leaf = material.ca.mint_agent(&spec.project, &spec.agent, bound)?;
        let assertion = crate::agent_api::assertion::mint_agent_assertion(
            &material.signing_key,
            &token_audience(spec.agent_port),
        )?;
        let tar = bootstrap_tar(&leaf, material.ca.cert_pem(), &assertion)?;
        docker
            .upload_to_container(
                &id,
                Some(UploadToContainerOptions {
                    path: "/".into(),
                    ..Default::default()
                }),
                bollard::body_full(tar.into()),
            )
            .await?;
        for net in &spec.extra_networks {
            docker
                .connect_network(
                    net,
                    bollard::models::NetworkConnectRequest {
                        container: id.clone(),
                        ..Default::default()
                    },
                )
                .await
                .with_context(|| format!("connecting to network {net}"))?;
        }
        docker.start_container(&id, None).await?;
        anyhow::Ok(())
    };
    if let Err(e) = provision.await {
        // Never leave a half-provisioned container behind.
        let _ = docker
            .remove_container(
                &id,
                Some(RemoveContainerOptions {
                    force: true,
                    ..Default::default()
                }),
            )
            .await;
        return Err(e.context(format!("provisioning {name}")));
    }
    Ok(id)
}

/// Resolves NAME (+project) to the container id.
pub async fn find(
    docker: &Docker,
    project: &ProjectSlug,
    agent: &AgentName,
) -> anyhow::Result<String> {
    let name = container_name(project, agent);
    match docker.inspect_container(&name, None).await {
        Ok(c) => Ok(c.id.unwrap_or(name)),
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => {
            bail!("no agent container named {name}")
        }
        Err(e) => Err(e.into()),
    }
}

pub async fn stop(docker: &Docker, id: &str) -> anyhow::Result<()> {
    docker
        .stop_container(
            id,
            Some(StopContainerOptions {
                t: Some(10),
                ..Default::default()
            }),
        )
        .await?;
    Ok(())
}

pub async fn remove(docker: &Docker, id: &str) -> anyhow::Result<()> {
    docker
        .remove_container(
            id,
            Some(RemoveContainerOptions {
                force: true,
                ..Default::default()
            }),
        )
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bootstrap_tar_has_private_dir_and_read_only_files() {
        let ca = crate::pki::Ca::generate().unwrap();
        let leaf = ca
            .mint_agent(
                &ProjectSlug::unscoped(),
                &AgentName::new("a").unwrap(),
                "ab",
            )
            .unwrap();
        let bytes = bootstrap_tar(&leaf, ca.cert_pem(), "jwt").unwrap();
        let mut ar = tar::Archive::new(bytes.as_slice());
        let entries: Vec<(String, u32, u64)> = ar
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let h = e.header();
                (
                    e.path().unwrap().display().to_string(),
                    h.mode().unwrap(),
                    h.uid().unwrap(),
                )
            })
            .collect();
        assert!(entries.contains(&("run/clawker/bootstrap/".into(), 0o700, 0)));
        for f in ["cert.pem", "key.pem", "ca.pem", "assertion.jwt"] {
            assert!(
                entries.contains(&(format!("run/clawker/bootstrap/{f}"), 0o400, 0)),
                "{f}: {entries:?}"
            );
        }
        assert_eq!(
            container_name(
                &ProjectSlug::new("p").unwrap(),
                &AgentName::new("a").unwrap()
            ),
            "clawker.p.a"
        );
    }
}
