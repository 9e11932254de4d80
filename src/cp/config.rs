//! `clawker cp serve` configuration: TOML file < `CLAWKER_*` env < flags.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::defaults;

/// What runs the agents.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeKind {
    /// One Docker engine; the CP on its host (or a container on clawker-net).
    #[default]
    Engine,
    /// A Docker Swarm cluster; the CP a service on a manager
    /// (`clawker cp deploy`).
    Swarm,
}

impl std::str::FromStr for RuntimeKind {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        match s {
            "engine" => Ok(Self::Engine),
            "swarm" => Ok(Self::Swarm),
            other => Err(ConfigError::UnknownRuntime(other.to_owned())),
        }
    }
}

/// `[swarm]`: Swarm-mode settings.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SwarmFileConfig {
    /// Encrypt the overlay's data path (IPsec between nodes). Refused at
    /// startup on a kernel without IPsec ESP, where swarm would silently
    /// drop all cross-node traffic on the network.
    pub encrypted: Option<bool>,
}

/// A configuration problem, named after the file or value at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config {}: {source}", .path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Malformed TOML, a wrong type or an unknown key.
    #[error("config {}: {source}", .path.display())]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    /// `runtime` (or `--runtime`) names no runtime.
    #[error("runtime {0:?}: expected \"engine\" or \"swarm\"")]
    UnknownRuntime(String),
}

/// The TOML file (every key optional).
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FileConfig {
    /// `"engine"` (default) or `"swarm"`.
    pub runtime: Option<RuntimeKind>,
    /// The agent network (engine: the clawker-net bridge; swarm: the
    /// attachable overlay).
    pub network: Option<String>,
    pub subnet: Option<String>,
    /// The internal network `isolate` moves agents onto.
    pub quarantine_network: Option<String>,
    /// Its subnet when the CP creates it.
    pub quarantine_subnet: Option<String>,
    pub agent_port: Option<u16>,
    pub admin_addr: Option<SocketAddr>,
    pub metrics_addr: Option<SocketAddr>,
    pub clawkerd_port: Option<u16>,
    /// Run the init plan (and so release the user command) for untrusted
    /// agents too. Default false.
    pub init_untrusted: Option<bool>,
    pub log_format: Option<String>,
    /// `[containment]`: the containment policy (default: isolate untrusted).
    pub containment: Option<crate::policy::containment::ContainmentConfig>,
    /// `[audit]`: the audit log.
    pub audit: Option<crate::policy::audit::AuditConfig>,
    /// `[swarm]`: Swarm mode.
    pub swarm: Option<SwarmFileConfig>,
    /// `[agent]`: how `clawker agent run` confines new agent containers
    /// (read by the CLI, not the daemon).
    pub agent: Option<super::agent::AgentDefaults>,
}

impl FileConfig {
    /// Reads the file; a missing file at the default location is fine, a
    /// named file that is missing or malformed is an error.
    pub fn load(path: &Path, must_exist: bool) -> Result<Self, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !must_exist => {
                return Ok(Self::default());
            }
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })
    }
}

/// Fully resolved daemon configuration.
#[derive(Debug, Clone)]
pub struct CpConfig {
    pub state_dir: PathBuf,
    pub runtime: RuntimeKind,
    pub network: String,
    pub subnet: String,
    pub quarantine_network: String,
    pub quarantine_subnet: String,
    pub agent_port: u16,
    pub admin_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub clawkerd_port: u16,
    pub init_untrusted: bool,
    pub containment: crate::policy::containment::ContainmentConfig,
    pub audit: crate::policy::audit::AuditConfig,
    /// Swarm mode: the overlay must be (and may only be) encrypted.
    pub swarm_encrypted: bool,
}

impl CpConfig {
    pub fn registry_path(&self) -> PathBuf {
        self.state_dir.join("cp.redb")
    }
}

/// Flag/env layer (each `None` when neither flag nor env is set).
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub runtime: Option<RuntimeKind>,
    pub network: Option<String>,
    pub subnet: Option<String>,
    pub quarantine_network: Option<String>,
    pub quarantine_subnet: Option<String>,
    pub agent_port: Option<u16>,
    pub admin_addr: Option<SocketAddr>,
    pub metrics_addr: Option<SocketAddr>,
    pub clawkerd_port: Option<u16>,
    pub init_untrusted: Option<bool>,
    pub swarm_encrypted: Option<bool>,
}

/// file < env/flags < nothing else; defaults fill the rest (the agent and
/// quarantine networks' defaults depend on the runtime).
pub fn resolve(
    state_dir: PathBuf,
    file: FileConfig,
    o: Overrides,
) -> Result<CpConfig, ConfigError> {
    let runtime = o.runtime.or(file.runtime).unwrap_or_default();
    let (default_network, default_subnet, default_quarantine, default_quarantine_subnet) =
        match runtime {
            RuntimeKind::Engine => (
                defaults::NETWORK,
                defaults::SUBNET,
                defaults::QUARANTINE_NETWORK,
                defaults::QUARANTINE_SUBNET,
            ),
            RuntimeKind::Swarm => (
                defaults::swarm::NETWORK,
                defaults::swarm::SUBNET,
                defaults::swarm::QUARANTINE_NETWORK,
                defaults::swarm::QUARANTINE_SUBNET,
            ),
        };
    let file_encrypted = file.swarm.as_ref().and_then(|s| s.encrypted);
    Ok(CpConfig {
        state_dir,
        runtime,
        network: o
            .network
            .or(file.network)
            .unwrap_or_else(|| default_network.into()),
        subnet: o
            .subnet
            .or(file.subnet)
            .unwrap_or_else(|| default_subnet.into()),
        quarantine_network: o
            .quarantine_network
            .or(file.quarantine_network)
            .unwrap_or_else(|| default_quarantine.into()),
        quarantine_subnet: o
            .quarantine_subnet
            .or(file.quarantine_subnet)
            .unwrap_or_else(|| default_quarantine_subnet.into()),
        agent_port: o
            .agent_port
            .or(file.agent_port)
            .unwrap_or(defaults::AGENT_PORT),
        admin_addr: o
            .admin_addr
            .or(file.admin_addr)
            .unwrap_or(defaults::ADMIN_ADDR),
        metrics_addr: o
            .metrics_addr
            .or(file.metrics_addr)
            .unwrap_or(defaults::METRICS_ADDR),
        clawkerd_port: o
            .clawkerd_port
            .or(file.clawkerd_port)
            .unwrap_or(defaults::CLAWKERD_PORT),
        init_untrusted: o.init_untrusted.or(file.init_untrusted).unwrap_or(false),
        containment: file.containment.unwrap_or_default(),
        audit: file.audit.unwrap_or_default(),
        swarm_encrypted: o.swarm_encrypted.or(file_encrypted).unwrap_or(false),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_beat_file_beats_defaults() {
        let file: FileConfig =
            toml::from_str("network = \"n-file\"\nagent_port = 9000\nsubnet = \"10.9.0.0/24\"")
                .unwrap();
        let o = Overrides {
            agent_port: Some(9100),
            ..Overrides::default()
        };
        let c = resolve("/s".into(), file, o).unwrap();
        assert_eq!(c.network, "n-file");
        assert_eq!(c.agent_port, 9100);
        assert_eq!(c.subnet, "10.9.0.0/24");
        assert_eq!(c.admin_addr.to_string(), "127.0.0.1:7443");
        assert!(!c.init_untrusted);
        assert_eq!(
            (c.quarantine_network.as_str(), c.quarantine_subnet.as_str()),
            ("clawker-quarantine", "10.213.1.0/24")
        );
    }

    #[test]
    fn policy_sections_parse_and_default_safely() {
        let file: FileConfig =
            toml::from_str("[containment]\ndry_run = true\n[audit]\nkeep = 2").unwrap();
        let c = resolve("/s".into(), file, Overrides::default()).unwrap();
        assert!(c.containment.dry_run);
        assert_eq!(c.audit.keep, 2);
        let d = resolve("/s".into(), FileConfig::default(), Overrides::default()).unwrap();
        assert!(!d.containment.dry_run && d.containment.enabled);
    }

    #[test]
    fn swarm_runtime_defaults_to_the_overlay_and_reads_its_section() {
        let file: FileConfig =
            toml::from_str("runtime = \"swarm\"\n[swarm]\nencrypted = true").unwrap();
        let c = resolve("/s".into(), file, Overrides::default()).unwrap();
        assert_eq!(c.runtime, RuntimeKind::Swarm);
        assert_eq!(c.network, "clawker-overlay");
        assert_eq!(c.subnet, defaults::swarm::SUBNET);
        assert!(c.swarm_encrypted);
        assert_eq!(
            (c.quarantine_network.as_str(), c.quarantine_subnet.as_str()),
            (
                defaults::swarm::QUARANTINE_NETWORK,
                defaults::swarm::QUARANTINE_SUBNET
            )
        );
        let engine = resolve("/s".into(), FileConfig::default(), Overrides::default()).unwrap();
        assert_eq!(engine.runtime, RuntimeKind::Engine);
        assert_eq!(engine.network, "clawker-net");
        let flag = Overrides {
            runtime: Some("swarm".parse().unwrap()),
            swarm_encrypted: Some(false),
            ..Overrides::default()
        };
        let file: FileConfig = toml::from_str("[swarm]\nencrypted = true").unwrap();
        let c = resolve("/s".into(), file, flag).unwrap();
        assert_eq!((c.runtime, c.swarm_encrypted), (RuntimeKind::Swarm, false));
        let e = "kubernetes".parse::<RuntimeKind>().unwrap_err();
        assert!(matches!(e, ConfigError::UnknownRuntime(ref r) if r == "kubernetes"));
        assert!(e.to_string().contains("\"engine\""), "{e}");
        assert!(toml::from_str::<FileConfig>("runtime = \"k8s\"").is_err());
        assert!(toml::from_str::<FileConfig>("[swarm]\nencryted = true").is_err());
    }

    #[test]
    fn unknown_keys_and_bad_files_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "netwrok = \"x\"").unwrap();
        let e = FileConfig::load(&p, true).unwrap_err().to_string();
        assert!(e.starts_with(&format!("config {}: ", p.display())), "{e}");
        assert!(e.contains("unknown field"), "{e}");
        std::fs::write(&p, "agent_port = \"many\"").unwrap();
        assert!(FileConfig::load(&p, true).is_err());
        assert!(FileConfig::load(&dir.path().join("none.toml"), false).is_ok());
        assert!(FileConfig::load(&dir.path().join("none.toml"), true).is_err());
    }
}
