//! `clawker agent run|stop|rm`: mint the agent's identity for its runtime
//! id, hand the bundle to the runtime (engine: copied into the container
//! between create and start; swarm: mounted as secrets before the service
//! scales to one), so clawkerd finds it at PID 1 start.

use std::collections::HashMap;

use crate::identity::{self, AgentName, ProjectSlug};
use crate::pki::{self, AuthMaterial};
use crate::runtime::provision::{
    AgentSpec, BootstrapBundle, BundleFile, Provision, ProvisionError,
};

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
    /// Swarm placement constraints (engine mode refuses any).
    pub placement: Vec<String>,
}

/// The container (or service) name: the canonical CN (unique per
/// project/agent).
pub fn container_name(project: &ProjectSlug, agent: &AgentName) -> String {
    identity::canonical_cn(project, agent)
}

/// The bundle clawkerd reads at `/run/clawker/bootstrap/`.
pub fn bootstrap_bundle(
    leaf: &pki::CertifiedKey,
    ca_pem: &str,
    assertion: &str,
) -> BootstrapBundle {
    let file = |name: &str, data: &str| BundleFile {
        name: name.to_owned(),
        data: data.as_bytes().to_vec(),
    };
    BootstrapBundle {
        dir: pki::bootstrap::DEFAULT_DIR.to_owned(),
        files: vec![
            file(pki::bootstrap::CERT, &leaf.cert_pem),
            file(pki::bootstrap::KEY, &leaf.key_pem),
            file(pki::bootstrap::CA, ca_pem),
            file(pki::bootstrap::ASSERTION, assertion),
        ],
    }
}

/// Creates, provisions and starts the agent; returns its runtime id.
pub async fn run(
    runtime: &dyn Provision,
    material: &AuthMaterial,
    spec: &RunSpec,
) -> Result<String, ProvisionError> {
    let cp_ip = runtime.cp_address(&spec.network).await?;
    let cp_addr = std::net::SocketAddr::new(cp_ip, spec.agent_port);
    let container = AgentSpec {
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
        placement: spec.placement.clone(),
    };
    let bundle = |id: &str| -> Result<BootstrapBundle, String> {
        let bound = spec.mint_for_container.as_deref().unwrap_or(id);
        let leaf = material
            .ca
            .mint_agent(&spec.project, &spec.agent, bound)
            .map_err(|e| e.to_string())?;
        let assertion = crate::agent_api::assertion::mint_agent_assertion(
            &material.signing_key,
            &crate::defaults::token_audience(spec.agent_port),
        )
        .map_err(|e| e.to_string())?;
        Ok(bootstrap_bundle(&leaf, material.ca.cert_pem(), &assertion))
    };
    runtime.run(&container, &bundle).await.map_err(|e| match e {
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

/// Resolves NAME (+project) to the runtime id.
pub async fn find(
    runtime: &dyn Provision,
    project: &ProjectSlug,
    agent: &AgentName,
) -> Result<String, ProvisionError> {
    runtime.find(&container_name(project, agent)).await
}

/// Stops the agent (its identity row is kept).
pub async fn stop(runtime: &dyn Provision, id: &str) -> Result<(), ProvisionError> {
    runtime.stop(id).await
}

/// Removes the agent (the CP evicts its identity row).
pub async fn remove(runtime: &dyn Provision, id: &str) -> Result<(), ProvisionError> {
    runtime.remove(id).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundle_holds_the_four_bootstrap_files_in_the_default_dir() {
        let ca = crate::pki::Ca::generate().unwrap();
        let leaf = ca
            .mint_agent(
                &ProjectSlug::unscoped(),
                &AgentName::new("a").unwrap(),
                "ab",
            )
            .unwrap();
        let b = bootstrap_bundle(&leaf, ca.cert_pem(), "jwt");
        assert_eq!(b.dir, "/run/clawker/bootstrap");
        let names: Vec<&str> = b.files.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["cert.pem", "key.pem", "ca.pem", "assertion.jwt"]);
        assert_eq!(b.files[3].data, b"jwt");
        assert_eq!(b.files[0].data, leaf.cert_pem.as_bytes());
        assert_eq!(
            container_name(
                &ProjectSlug::new("p").unwrap(),
                &AgentName::new("a").unwrap()
            ),
            "clawker.p.a"
        );
    }
}
