//! `clawker cp serve` configuration: TOML file < `CLAWKER_*` env < flags.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::defaults;

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
}

/// The TOML file (every key optional).
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FileConfig {
    pub network: Option<String>,
    pub subnet: Option<String>,
    pub agent_port: Option<u16>,
    pub admin_addr: Option<SocketAddr>,
    pub metrics_addr: Option<SocketAddr>,
    pub clawkerd_port: Option<u16>,
    /// Run the init plan (and so release the user command) for untrusted
    /// agents too. Default false.
    pub init_untrusted: Option<bool>,
    /// Leave a container running (without its command) when one of its
    /// init or boot steps fails, instead of ending it with the step's exit
    /// code. Default false.
    pub keep_on_init_failure: Option<bool>,
    /// `[hooks]`: `post_init` (once per container) and `pre_run` (every
    /// start), shell scripts run as the agent user.
    pub hooks: Option<crate::session::plan::Hooks>,
    pub log_format: Option<String>,
    /// `[containment]`: the containment policy (default: isolate untrusted).
    pub containment: Option<crate::policy::containment::ContainmentConfig>,
    /// `[audit]`: the audit log.
    pub audit: Option<crate::policy::audit::AuditConfig>,
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
    pub network: String,
    pub subnet: String,
    pub agent_port: u16,
    pub admin_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub clawkerd_port: u16,
    pub init_untrusted: bool,
    pub keep_on_init_failure: bool,
    pub hooks: crate::session::plan::Hooks,
    pub containment: crate::policy::containment::ContainmentConfig,
    pub audit: crate::policy::audit::AuditConfig,
}

impl CpConfig {
    pub fn registry_path(&self) -> PathBuf {
        self.state_dir.join("cp.redb")
    }
}

/// Flag/env layer (each `None` when neither flag nor env is set).
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub network: Option<String>,
    pub subnet: Option<String>,
    pub agent_port: Option<u16>,
    pub admin_addr: Option<SocketAddr>,
    pub metrics_addr: Option<SocketAddr>,
    pub clawkerd_port: Option<u16>,
    pub init_untrusted: Option<bool>,
    pub keep_on_init_failure: Option<bool>,
}

/// file < env/flags < nothing else; defaults fill the rest.
pub fn resolve(
    state_dir: PathBuf,
    file: FileConfig,
    o: Overrides,
) -> Result<CpConfig, ConfigError> {
    Ok(CpConfig {
        state_dir,
        network: o
            .network
            .or(file.network)
            .unwrap_or_else(|| defaults::NETWORK.into()),
        subnet: o
            .subnet
            .or(file.subnet)
            .unwrap_or_else(|| defaults::SUBNET.into()),
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
        keep_on_init_failure: o
            .keep_on_init_failure
            .or(file.keep_on_init_failure)
            .unwrap_or(false),
        hooks: file.hooks.unwrap_or_default(),
        containment: file.containment.unwrap_or_default(),
        audit: file.audit.unwrap_or_default(),
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
    fn hooks_and_keep_on_init_failure_come_from_the_file() {
        let file: FileConfig = toml::from_str(
            "keep_on_init_failure = true\n[hooks]\npost_init = \"echo once\"\npre_run = \"echo every\"",
        )
        .unwrap();
        let c = resolve("/s".into(), file, Overrides::default()).unwrap();
        assert!(c.keep_on_init_failure);
        assert_eq!(c.hooks.post_init.as_deref(), Some("echo once"));
        assert_eq!(c.hooks.pre_run.as_deref(), Some("echo every"));
        let d = resolve("/s".into(), FileConfig::default(), Overrides::default()).unwrap();
        assert!(
            !d.keep_on_init_failure,
            "a failed step ends the container by default"
        );
        assert_eq!(d.hooks, crate::session::plan::Hooks::default());
        assert!(toml::from_str::<FileConfig>("[hooks]\npre_runn = \"x\"").is_err());
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
