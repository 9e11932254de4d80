//! `clawker cp deploy`: the CP as a swarm service on the manager
//! `DOCKER_HOST` points at (Swarm mode). This module decides *what* goes
//! into the service — which auth files, which settings —; the edge
//! (`docker::swarm::deploy`) creates it.

use std::path::Path;

use crate::defaults;
use crate::docker::swarm::Swarm;
use crate::docker::swarm::deploy::{self, CpDeploySpec, DeployedCp, StateFile};
use crate::pki::AuthPaths;

/// What the operator asks for.
#[derive(Debug, Clone)]
pub struct DeployRequest {
    pub image: String,
    pub network: String,
    pub subnet: String,
    /// The internal quarantine overlay and its subnet.
    pub quarantine_network: String,
    pub quarantine_subnet: String,
    pub encrypted: bool,
    pub agent_port: u16,
    pub admin_port: u16,
    /// The manager engine's socket on its host (bind-mounted into the CP).
    pub engine_socket: String,
    /// An operator cp.toml to install as the CP's (containment, audit, …);
    /// the runtime keys are set from this request either way.
    pub config_toml: Option<String>,
    /// `RUST_LOG` for the CP.
    pub log_filter: String,
}

#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error("reading {path}: {source} (run `clawker ca init` first)")]
    Material {
        path: String,
        source: std::io::Error,
    },
    #[error("cp.toml: {0}")]
    Config(String),
    #[error(transparent)]
    Swarm(#[from] crate::docker::swarm::SwarmError),
}

/// The auth files the CP reads, and nothing else: the CA certificate, the
/// CP's server and client identities, the CLI's public signing key. The
/// CA key and the CLI's private keys stay on the operator's machine.
pub fn cp_auth_files(state_dir: &Path) -> Result<Vec<StateFile>, DeployError> {
    let p = AuthPaths::new(state_dir);
    let entries = [
        (p.ca_cert(), 0o644),
        (p.server_cert(), 0o644),
        (p.server_key(), 0o600),
        (p.cp_client_cert(), 0o644),
        (p.cp_client_key(), 0o600),
        (p.signing_jwk(), 0o644),
    ];
    entries
        .into_iter()
        .map(|(path, mode)| {
            let data = std::fs::read(&path).map_err(|source| DeployError::Material {
                path: path.display().to_string(),
                source,
            })?;
            let rel = path
                .strip_prefix(state_dir)
                .map(|r| r.display().to_string())
                .unwrap_or_else(|_| path.display().to_string());
            Ok(StateFile {
                path: rel,
                data,
                mode,
            })
        })
        .collect()
}

/// Deploys (or updates) the CP service; returns where it runs.
pub async fn deploy(
    swarm: &Swarm,
    state_dir: &Path,
    req: &DeployRequest,
) -> Result<DeployedCp, DeployError> {
    let mut files = cp_auth_files(state_dir)?;
    let toml = req.config_toml.clone().unwrap_or_default();
    // Refuse a file `cp serve` would refuse, now rather than in a crash
    // loop of the service.
    toml::from_str::<super::config::FileConfig>(&toml)
        .map_err(|e| DeployError::Config(e.to_string()))?;
    files.push(StateFile {
        path: "cp.toml".into(),
        data: toml.into_bytes(),
        mode: 0o644,
    });
    let spec = CpDeploySpec {
        image: req.image.clone(),
        service: defaults::swarm::CP_SERVICE.into(),
        volume: defaults::swarm::CP_VOLUME.into(),
        network: req.network.clone(),
        subnet: req.subnet.clone(),
        encrypted: req.encrypted,
        quarantine_network: req.quarantine_network.clone(),
        quarantine_subnet: req.quarantine_subnet.clone(),
        admin_port: req.admin_port,
        engine_socket: req.engine_socket.clone(),
        state_files: files,
        log_filter: req.log_filter.clone(),
        // The runtime keys as env (they beat cp.toml): the CP cannot end up
        // on another network than the one it was attached to.
        env: vec![
            "CLAWKER_RUNTIME=swarm".into(),
            format!("CLAWKER_NETWORK={}", req.network),
            format!("CLAWKER_SUBNET={}", req.subnet),
            format!("CLAWKER_QUARANTINE_NETWORK={}", req.quarantine_network),
            format!("CLAWKER_QUARANTINE_SUBNET={}", req.quarantine_subnet),
            format!("CLAWKER_AGENT_PORT={}", req.agent_port),
            format!("CLAWKER_SWARM_ENCRYPTED={}", req.encrypted),
        ],
    };
    Ok(deploy::deploy(&swarm.with_network(&req.network), &spec).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_cp_subset_of_the_auth_material_goes() {
        let dir = tempfile::tempdir().unwrap();
        crate::pki::AuthMaterial::ensure(dir.path()).unwrap();
        let files = cp_auth_files(dir.path()).unwrap();
        let paths: Vec<&str> = files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "auth/ca/ca.pem",
                "auth/tls/server.pem",
                "auth/tls/server.key",
                "auth/cp/client.pem",
                "auth/cp/client.key",
                "auth/cli/signing-jwk.json",
            ]
        );
        assert!(
            !paths
                .iter()
                .any(|p| p.ends_with("ca.key") || p.ends_with("signing.key"))
        );
        let empty = tempfile::tempdir().unwrap();
        let e = cp_auth_files(empty.path()).unwrap_err();
        assert!(e.to_string().contains("clawker ca init"), "{e}");
    }
}
