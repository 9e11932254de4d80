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
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "engine" => Ok(Self::Engine),
            "swarm" => Ok(Self::Swarm),
            other => Err(format!(
                "runtime {other:?}: expected \"engine\" or \"swarm\""
            )),
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
}

impl FileConfig {
    /// Reads the file; a missing file at the default location is fine, a
    /// named file that is missing or malformed is an error.
    pub fn load(path: &Path, must_exist: bool) -> Result<Self, String> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !must_exist => {
                return Ok(Self::default());
            }
            Err(e) => return Err(format!("config {}: {e}", path.display())),
        };
        toml::from_str(&text).map_err(|e| format!("config {}: {e}", path.display()))
    }
}

/// Fully resolved daemon configuration.
#[derive(Debug, Clone)]
pub struct CpConfig {
    pub state_dir: PathBuf,
    pub runtime: RuntimeKind,
    pub network: String,
    pub subnet: String,
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
    pub agent_port: Option<u16>,
    pub admin_addr: Option<SocketAddr>,
    pub metrics_addr: Option<SocketAddr>,
    pub clawkerd_port: Option<u16>,
    pub init_untrusted: Option<bool>,
    pub swarm_encrypted: Option<bool>,
}

/// file < env/flags < nothing else; defaults fill the rest (the agent
/// network's defaults depend on the runtime).
pub fn resolve(state_dir: PathBuf, file: FileConfig, o: Overrides) -> Result<CpConfig, String> {
    let runtime = o.runtime.or(file.runtime).unwrap_or_default();
    let (default_network, default_subnet) = match runtime {
        RuntimeKind::Engine => (defaults::NETWORK, defaults::SUBNET),
        RuntimeKind::Swarm => (defaults::swarm::NETWORK, defaults::swarm::SUBNET),
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
        assert!(
            "kubernetes"
                .parse::<RuntimeKind>()
                .unwrap_err()
                .contains("engine")
        );
        assert!(toml::from_str::<FileConfig>("runtime = \"k8s\"").is_err());
        assert!(toml::from_str::<FileConfig>("[swarm]\nencryted = true").is_err());
    }

    #[test]
    fn unknown_keys_and_bad_files_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "netwrok = \"x\"").unwrap();
        let e = FileConfig::load(&p, true).unwrap_err();
        assert!(e.contains("unknown field"), "{e}");
        std::fs::write(&p, "agent_port = \"many\"").unwrap();
        assert!(FileConfig::load(&p, true).is_err());
        assert!(FileConfig::load(&dir.path().join("none.toml"), false).is_ok());
        assert!(FileConfig::load(&dir.path().join("none.toml"), true).is_err());
    }
}
