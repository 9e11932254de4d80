//! `clawker agent run|stop|rm`: create an agent container on clawker-net,
//! mint its identity, copy the bootstrap bundle in between create and start
//! (so clawkerd finds it at PID 1 start), start it.

use std::collections::HashMap;

use crate::docker::Docker;
use crate::docker::provision::{self, AgentContainerSpec, ProvisionError};
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
    /// Lifetime of the agent's leaf (cp.toml `agent_cert_ttl`); clawkerd
    /// renews it over its session at half its lifetime.
    pub cert_ttl: std::time::Duration,
}

/// The container name: the canonical CN (unique per project/agent).
pub fn container_name(project: &ProjectSlug, agent: &AgentName) -> String {
    identity::canonical_cn(project, agent)
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
) -> Result<String, ProvisionError> {
    let gateway = provision::gateway(docker, &spec.network).await?;
    let cp_addr = format!("{gateway}:{}", spec.agent_port);
    let container = AgentContainerSpec {
        name: container_name(&spec.project, &spec.agent),
        agent: spec.agent.to_string(),
        project: spec.project.to_string(),
        image: spec.image.clone(),
        network: spec.network.clone(),
        command: spec.command.clone(),
        env: vec![
            format!("CLAWKER_AGENT={}", spec.agent),
            format!("CLAWKER_PROJECT={}", spec.project),
            format!("CLAWKER_CP_AGENT_ADDR={cp_addr}"),
            format!("CLAWKER_CP_TOKEN_URL=https://{cp_addr}/oauth2/token"),
        ],
        extra_labels: spec.extra_labels.clone(),
        extra_networks: spec.extra_networks.clone(),
    };
    let bundle = |id: &str| -> Result<Vec<u8>, String> {
        let bound = spec.mint_for_container.as_deref().unwrap_or(id);
        let ttl = time::Duration::try_from(spec.cert_ttl).map_err(|e| e.to_string())?;
        let leaf = material
            .ca
            .mint_agent_with_ttl(&spec.project, &spec.agent, bound, ttl)
            .map_err(|e| e.to_string())?;
        let assertion = crate::agent_api::assertion::mint_agent_assertion(
            &material.signing_key,
            &crate::defaults::token_audience(spec.agent_port),
        )
        .map_err(|e| e.to_string())?;
        bootstrap_tar(&leaf, material.ca.cert_pem(), &assertion).map_err(|e| e.to_string())
    };
    provision::run(docker, &container, bundle)
        .await
        .map_err(|e| match e {
            ProvisionError::NameTaken { name, .. } => ProvisionError::NameTaken {
                name,
                hint: format!(
                    " (remove it with `clawker agent rm {}{}`)",
                    spec.agent,
                    if spec.project.is_empty() {
                        String::new()
                    } else {
                        format!(" --project {}", spec.project)
                    }
                ),
            },
            other => other,
        })
}

/// Resolves NAME (+project) to the container id.
pub async fn find(
    docker: &Docker,
    project: &ProjectSlug,
    agent: &AgentName,
) -> Result<String, ProvisionError> {
    provision::find(docker, &container_name(project, agent)).await
}

pub use provision::{remove, stop};

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
