//! `clawker cp serve` configuration: TOML file < `CLAWKER_*` env < flags.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::defaults;
use crate::listen::ListenerLimits;

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
    /// A value that parsed but is out of range or malformed (a zero cap, a
    /// negative timeout, a key in the wrong section, an unknown unit).
    #[error("{key}: {detail}")]
    Invalid { key: String, detail: String },
    /// `runtime` (or `--runtime`) names no runtime.
    #[error("runtime {0:?}: expected \"engine\" or \"swarm\"")]
    UnknownRuntime(String),
}

/// A duration in the config file: whole seconds (`86400`) or a number with
/// a unit (`"90s"`, `"15m"`, `"24h"`, `"30d"`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum DurationValue {
    Seconds(u64),
    Text(String),
}

impl DurationValue {
    pub fn parse(&self) -> Result<Duration, String> {
        match self {
            Self::Seconds(s) => Ok(Duration::from_secs(*s)),
            Self::Text(t) => parse_duration(t),
        }
    }
}

/// `"10"`, `"10s"`, `"15m"`, `"24h"`, `"30d"` → a duration.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{text:?}: expected a number of seconds or e.g. \"24h\""))?;
    let secs = match unit.trim() {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        other => {
            return Err(format!(
                "{text:?}: unknown unit {other:?} (use s, m, h or d)"
            ));
        }
    };
    n.checked_mul(secs)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{text:?}: too large"))
}

/// Bounds of `agent_cert_ttl`: a leaf must live long enough to be renewed
/// at half its life, and not so long that rotation stops mattering.
pub const AGENT_CERT_TTL_MIN: Duration = Duration::from_secs(2);
pub const AGENT_CERT_TTL_MAX: Duration = Duration::from_secs(366 * 86_400);

/// Checks a configured `agent_cert_ttl`.
pub fn check_agent_cert_ttl(ttl: Duration) -> Result<Duration, ConfigError> {
    if !(AGENT_CERT_TTL_MIN..=AGENT_CERT_TTL_MAX).contains(&ttl) {
        return Err(ConfigError::Invalid {
            key: "agent_cert_ttl".into(),
            detail: format!(
                "{}s is outside {}s..={}s",
                ttl.as_secs(),
                AGENT_CERT_TTL_MIN.as_secs(),
                AGENT_CERT_TTL_MAX.as_secs()
            ),
        });
    }
    Ok(ttl)
}

fn duration_key(
    key: &'static str,
    v: Option<&DurationValue>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    match v {
        None => Ok(default),
        Some(v) => v.parse().map_err(|detail| ConfigError::Invalid {
            key: key.into(),
            detail,
        }),
    }
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
    /// `[agent_listener]`: bounds of the agent listener.
    pub agent_listener: Option<ListenerSection>,
    /// `[admin_listener]`: bounds of the admin API.
    pub admin_listener: Option<ListenerSection>,
    /// `[sessions]`: dial budget and the redial reconciler.
    pub sessions: Option<SessionsSection>,
    /// `[swarm]`: Swarm mode.
    pub swarm: Option<SwarmFileConfig>,
    /// `[agent]`: how `clawker agent run` confines new agent containers
    /// (read by the CLI, not the daemon).
    pub agent: Option<super::agent::AgentDefaults>,
    /// Lifetime of agent leaves (minted by `agent run`, signed on
    /// rotation). Default 24 h; seconds allowed (tests).
    pub agent_cert_ttl: Option<DurationValue>,
    /// How long after its expiry a leaf that matches its row is still
    /// renewed on reconnect. Default 30 days.
    pub agent_cert_stale_after: Option<DurationValue>,
    /// Rotate every agent's leaf right after its Register, retiring the
    /// bootstrap leaf. Default: on in Swarm mode (the bundle lives on in a
    /// swarm secret), off in engine mode.
    pub retire_bootstrap_leaf: Option<bool>,
}

/// `[agent_listener]` / `[admin_listener]`: every key optional, defaults in
/// [`ListenerLimits`]. Durations are seconds (fractions allowed).
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ListenerSection {
    pub max_connections: Option<usize>,
    pub max_connections_per_source: Option<usize>,
    pub handshake_timeout_secs: Option<f64>,
    pub idle_timeout_secs: Option<f64>,
    pub keepalive_interval_secs: Option<f64>,
    pub keepalive_timeout_secs: Option<f64>,
    pub max_concurrent_streams: Option<u32>,
    /// `[agent_listener]` only: bound on one request.
    pub request_timeout_secs: Option<f64>,
    /// `[agent_listener]` only: bound on reading a token request's body.
    pub body_read_timeout_secs: Option<f64>,
}

/// `[sessions]`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SessionsSection {
    /// How often running agents without a session are dialed again.
    pub redial_interval_secs: Option<f64>,
    /// Budget of one connect cycle before `SessionFailed{connect_total_timeout}`.
    pub connect_budget_secs: Option<f64>,
}

fn secs(
    section: &str,
    key: &str,
    v: Option<f64>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    match v {
        None => Ok(default),
        Some(s) => Duration::try_from_secs_f64(s)
            .ok()
            .filter(|d| !d.is_zero())
            .ok_or_else(|| ConfigError::Invalid {
                key: format!("{section}.{key}"),
                detail: format!("{s} is not a positive number of seconds"),
            }),
    }
}

fn count<T: Copy + PartialOrd + Default + std::fmt::Display>(
    section: &str,
    key: &str,
    v: Option<T>,
    default: T,
) -> Result<T, ConfigError> {
    match v {
        None => Ok(default),
        Some(n) if n > T::default() => Ok(n),
        Some(n) => Err(ConfigError::Invalid {
            key: format!("{section}.{key}"),
            detail: format!("{n} must be at least 1"),
        }),
    }
}

impl ListenerSection {
    fn limits(&self, section: &str, d: ListenerLimits) -> Result<ListenerLimits, ConfigError> {
        Ok(ListenerLimits {
            max_connections: count(
                section,
                "max_connections",
                self.max_connections,
                d.max_connections,
            )?,
            max_connections_per_source: count(
                section,
                "max_connections_per_source",
                self.max_connections_per_source,
                d.max_connections_per_source,
            )?,
            handshake_timeout: secs(
                section,
                "handshake_timeout_secs",
                self.handshake_timeout_secs,
                d.handshake_timeout,
            )?,
            idle_timeout: secs(
                section,
                "idle_timeout_secs",
                self.idle_timeout_secs,
                d.idle_timeout,
            )?,
            keepalive_interval: secs(
                section,
                "keepalive_interval_secs",
                self.keepalive_interval_secs,
                d.keepalive_interval,
            )?,
            keepalive_timeout: secs(
                section,
                "keepalive_timeout_secs",
                self.keepalive_timeout_secs,
                d.keepalive_timeout,
            )?,
            max_concurrent_streams: count(
                section,
                "max_concurrent_streams",
                self.max_concurrent_streams,
                d.max_concurrent_streams,
            )?,
        })
    }
}

/// The agent listener's bounds, resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgentListenerConfig {
    pub limits: ListenerLimits,
    pub request_timeout: Duration,
    pub body_read_timeout: Duration,
}

impl Default for AgentListenerConfig {
    fn default() -> Self {
        Self {
            limits: ListenerLimits::AGENT_API,
            request_timeout: crate::agent_api::server::REQUEST_TIMEOUT,
            body_read_timeout: crate::agent_api::token::BODY_READ_TIMEOUT,
        }
    }
}

/// The session machinery's knobs, resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionsConfig {
    pub redial_interval: Duration,
    pub connect_budget: Duration,
}

/// Default period of the redial reconciler.
pub const REDIAL_INTERVAL: Duration = Duration::from_secs(15);

impl Default for SessionsConfig {
    fn default() -> Self {
        Self {
            redial_interval: REDIAL_INTERVAL,
            connect_budget: crate::session::lifecycle::EstablishConfig::default().total,
        }
    }
}

fn agent_listener(s: Option<ListenerSection>) -> Result<AgentListenerConfig, ConfigError> {
    let d = AgentListenerConfig::default();
    let Some(s) = s else { return Ok(d) };
    const SECTION: &str = "agent_listener";
    Ok(AgentListenerConfig {
        limits: s.limits(SECTION, d.limits)?,
        request_timeout: secs(
            SECTION,
            "request_timeout_secs",
            s.request_timeout_secs,
            d.request_timeout,
        )?,
        body_read_timeout: secs(
            SECTION,
            "body_read_timeout_secs",
            s.body_read_timeout_secs,
            d.body_read_timeout,
        )?,
    })
}

fn admin_listener(s: Option<ListenerSection>) -> Result<ListenerLimits, ConfigError> {
    let Some(s) = s else {
        return Ok(ListenerLimits::ADMIN_API);
    };
    for (key, set) in [
        ("request_timeout_secs", s.request_timeout_secs.is_some()),
        ("body_read_timeout_secs", s.body_read_timeout_secs.is_some()),
    ] {
        if set {
            return Err(ConfigError::Invalid {
                key: format!("admin_listener.{key}"),
                detail: "only [agent_listener] has this bound".into(),
            });
        }
    }
    s.limits("admin_listener", ListenerLimits::ADMIN_API)
}

fn sessions(s: Option<SessionsSection>) -> Result<SessionsConfig, ConfigError> {
    let d = SessionsConfig::default();
    let Some(s) = s else { return Ok(d) };
    Ok(SessionsConfig {
        redial_interval: secs(
            "sessions",
            "redial_interval_secs",
            s.redial_interval_secs,
            d.redial_interval,
        )?,
        connect_budget: secs(
            "sessions",
            "connect_budget_secs",
            s.connect_budget_secs,
            d.connect_budget,
        )?,
    })
}

impl FileConfig {
    /// `agent_cert_ttl` (default 24 h), checked.
    pub fn agent_cert_ttl(&self) -> Result<Duration, ConfigError> {
        check_agent_cert_ttl(duration_key(
            "agent_cert_ttl",
            self.agent_cert_ttl.as_ref(),
            DEFAULT_AGENT_CERT_TTL,
        )?)
    }
}

/// Default `agent_cert_ttl`.
pub const DEFAULT_AGENT_CERT_TTL: Duration = Duration::from_secs(24 * 3600);
/// Default `agent_cert_stale_after`.
pub const DEFAULT_AGENT_CERT_STALE_AFTER: Duration = Duration::from_secs(30 * 86_400);

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
    pub keep_on_init_failure: bool,
    pub hooks: crate::session::plan::Hooks,
    pub containment: crate::policy::containment::ContainmentConfig,
    pub audit: crate::policy::audit::AuditConfig,
    pub agent_listener: AgentListenerConfig,
    pub admin_listener: ListenerLimits,
    pub sessions: SessionsConfig,
    pub agent_cert_ttl: Duration,
    pub agent_cert_stale_after: Duration,
    /// See [`FileConfig::retire_bootstrap_leaf`].
    pub retire_bootstrap_leaf: bool,
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
    pub agent_cert_ttl: Option<Duration>,
    pub keep_on_init_failure: Option<bool>,
    pub swarm_encrypted: Option<bool>,
}

/// file < env/flags < nothing else; defaults fill the rest (the agent and
/// quarantine networks' defaults depend on the runtime).
pub fn resolve(
    state_dir: PathBuf,
    file: FileConfig,
    o: Overrides,
) -> Result<CpConfig, ConfigError> {
    let agent_cert_ttl = match o.agent_cert_ttl {
        Some(t) => check_agent_cert_ttl(t)?,
        None => file.agent_cert_ttl()?,
    };
    let agent_cert_stale_after = duration_key(
        "agent_cert_stale_after",
        file.agent_cert_stale_after.as_ref(),
        DEFAULT_AGENT_CERT_STALE_AFTER,
    )?;
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
        agent_cert_ttl,
        agent_cert_stale_after,
        retire_bootstrap_leaf: file
            .retire_bootstrap_leaf
            .unwrap_or(runtime == RuntimeKind::Swarm),
        keep_on_init_failure: o
            .keep_on_init_failure
            .or(file.keep_on_init_failure)
            .unwrap_or(false),
        hooks: file.hooks.unwrap_or_default(),
        containment: file.containment.unwrap_or_default(),
        audit: file.audit.unwrap_or_default(),
        agent_listener: agent_listener(file.agent_listener)?,
        admin_listener: admin_listener(file.admin_listener)?,
        sessions: sessions(file.sessions)?,
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
    fn listener_bounds_default_and_override_per_key() {
        let d = resolve("/s".into(), FileConfig::default(), Overrides::default()).unwrap();
        assert_eq!(d.agent_listener, AgentListenerConfig::default());
        assert_eq!(d.admin_listener, ListenerLimits::ADMIN_API);
        assert_eq!(d.sessions, SessionsConfig::default());
        let file: FileConfig = toml::from_str(
            "[agent_listener]\nmax_connections_per_source = 32\nidle_timeout_secs = 2.5\nbody_read_timeout_secs = 1\n\
             [admin_listener]\nmax_connections = 16\n[sessions]\nredial_interval_secs = 1\n",
        )
        .unwrap();
        let c = resolve("/s".into(), file, Overrides::default()).unwrap();
        assert_eq!(c.agent_listener.limits.max_connections_per_source, 32);
        assert_eq!(
            c.agent_listener.limits.idle_timeout,
            Duration::from_millis(2500)
        );
        assert_eq!(
            c.agent_listener.limits.max_connections,
            ListenerLimits::AGENT_API.max_connections
        );
        assert_eq!(c.agent_listener.body_read_timeout, Duration::from_secs(1));
        assert_eq!(c.admin_listener.max_connections, 16);
        assert_eq!(c.sessions.redial_interval, Duration::from_secs(1));
    }

    #[test]
    fn nonsensical_bounds_are_refused_with_their_key() {
        for (text, key) in [
            (
                "[agent_listener]\nmax_connections = 0",
                "agent_listener.max_connections",
            ),
            (
                "[agent_listener]\nidle_timeout_secs = -1",
                "agent_listener.idle_timeout_secs",
            ),
            (
                "[admin_listener]\nbody_read_timeout_secs = 3",
                "admin_listener.body_read_timeout_secs",
            ),
            (
                "[sessions]\nredial_interval_secs = 0",
                "sessions.redial_interval_secs",
            ),
        ] {
            let file: FileConfig = toml::from_str(text).unwrap();
            let e = resolve("/s".into(), file, Overrides::default()).unwrap_err();
            assert!(e.to_string().starts_with(&format!("{key}: ")), "{e}");
        }
    }

    #[test]
    fn cert_lifetimes_parse_with_units_or_seconds_and_are_bounded() {
        let d = resolve("/s".into(), FileConfig::default(), Overrides::default()).unwrap();
        assert_eq!(d.agent_cert_ttl, Duration::from_secs(86_400));
        assert_eq!(d.agent_cert_stale_after, Duration::from_secs(30 * 86_400));
        let file: FileConfig =
            toml::from_str("agent_cert_ttl = \"10s\"\nagent_cert_stale_after = \"2d\"").unwrap();
        let c = resolve("/s".into(), file, Overrides::default()).unwrap();
        assert_eq!(c.agent_cert_ttl, Duration::from_secs(10));
        assert_eq!(c.agent_cert_stale_after, Duration::from_secs(2 * 86_400));
        let file: FileConfig = toml::from_str("agent_cert_ttl = 3600").unwrap();
        assert_eq!(file.agent_cert_ttl().unwrap(), Duration::from_secs(3600));
        // A flag (or env) beats the file.
        let o = Overrides {
            agent_cert_ttl: Some(Duration::from_secs(60)),
            ..Overrides::default()
        };
        let file: FileConfig = toml::from_str("agent_cert_ttl = \"1h\"").unwrap();
        assert_eq!(
            resolve("/s".into(), file, o).unwrap().agent_cert_ttl,
            Duration::from_secs(60)
        );
        for (text, want) in [
            (
                "agent_cert_ttl = \"1s\"",
                "agent_cert_ttl: 1s is outside 2s..=",
            ),
            (
                "agent_cert_ttl = \"10y\"",
                "agent_cert_ttl: \"10y\": unknown unit",
            ),
            (
                "agent_cert_ttl = \"soon\"",
                "agent_cert_ttl: \"soon\": expected a number",
            ),
            (
                "agent_cert_stale_after = \"-1d\"",
                "agent_cert_stale_after: \"-1d\"",
            ),
        ] {
            let file: FileConfig = toml::from_str(text).unwrap();
            let e = resolve("/s".into(), file, Overrides::default())
                .unwrap_err()
                .to_string();
            assert!(e.starts_with(want), "{text}: {e}");
        }
        assert_eq!(parse_duration("15m").unwrap(), Duration::from_secs(900));
        assert_eq!(parse_duration(" 7 ").unwrap(), Duration::from_secs(7));
        assert!(parse_duration("99999999999999999999d").is_err());
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
