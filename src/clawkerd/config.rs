//! Boot configuration: environment, bootstrap files, exit codes (reference
//! §2–3).
//!
//! Everything is read once at boot. A configuration problem that will not
//! fix itself on restart exits 2; anything that might (a port still in use)
//! exits 1, so an orchestrator can tell the two apart.

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::pki::bootstrap;

/// Environment variables clawkerd reads. The CP-side tooling sets these.
pub mod env {
    /// Agent short name (required, non-empty).
    pub const AGENT: &str = "CLAWKER_AGENT";
    /// Project slug (may be empty).
    pub const PROJECT: &str = "CLAWKER_PROJECT";
    /// User spec for the user command; default `claude`.
    pub const USER: &str = "CLAWKER_USER";
    /// `IP:port` of the CP's AgentService (Register).
    pub const CP_AGENT_ADDR: &str = "CLAWKER_CP_AGENT_ADDR";
    /// Full token endpoint URL, e.g. `https://10.0.0.1:7444/oauth2/token`.
    pub const CP_TOKEN_URL: &str = "CLAWKER_CP_TOKEN_URL";
    /// Legacy v0.8.0 name: a base URL to which `/oauth2/token` is appended.
    /// Used only when [`CP_TOKEN_URL`] is unset.
    pub const CP_HYDRA_URL: &str = "CLAWKER_CP_HYDRA_URL";
    /// Bootstrap dir override (tests); default `/run/clawker/bootstrap`.
    pub const BOOTSTRAP_DIR: &str = "CLAWKER_BOOTSTRAP_DIR";
    /// Listen address override; default `0.0.0.0:7700`. Port 0 is allowed;
    /// the bound address is logged (`clawkerd_listener_started`, `addr`).
    pub const LISTEN_ADDR: &str = "CLAWKER_LISTEN_ADDR";
    /// passwd/group file overrides (tests); default `/etc/passwd`, `/etc/group`.
    pub const PASSWD_FILE: &str = "CLAWKER_PASSWD_FILE";
    pub const GROUP_FILE: &str = "CLAWKER_GROUP_FILE";
    /// Ready marker override; default `/var/run/clawker/ready`.
    pub const READY_FILE: &str = "CLAWKER_READY_FILE";
    /// Log destination: a file path, or `-` for stderr. Default
    /// `/var/lib/clawker/log/clawkerd.log` (what `agent run` sets too,
    /// `defaults::agent_paths::LOG_FILE`): the state volume, writable under the
    /// hardened read-only root (and kept off the user's terminal).
    pub const LOG_FILE: &str = "CLAWKER_LOG_FILE";
    /// Size of the log file before it rotates to `<file>.1` (bytes);
    /// default 8 MiB, so at most 16 MiB of log is ever on disk.
    pub const LOG_MAX_BYTES: &str = "CLAWKER_LOG_MAX_BYTES";
    /// Lines of one rejection kind logged at once before the rate limit
    /// (1 line/s) applies; default 10.
    pub const LOG_REJECT_BURST: &str = "CLAWKER_LOG_REJECT_BURST";
    /// Seconds (fractions allowed) a connection may sit with no request in
    /// flight before the listener closes it; default 60. The CP's Session
    /// stream is a request in flight for as long as it lives.
    pub const IDLE_TIMEOUT_SECS: &str = "CLAWKER_IDLE_TIMEOUT_SECS";
    /// clawkerd's writable state directory (rotated leaf, init marker);
    /// default `/var/lib/clawker`, in the container's writable layer, so
    /// it survives `docker stop`/`start` and goes with `docker rm`.
    pub const STATE_DIR: &str = "CLAWKERD_STATE_DIR";
}

pub const DEFAULT_LISTEN_ADDR: &str = "0.0.0.0:7700";
pub const DEFAULT_USER: &str = "claude";
pub const DEFAULT_READY_FILE: &str = "/var/run/clawker/ready";
pub const DEFAULT_LOG_FILE: &str = "/var/lib/clawker/log/clawkerd.log";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/clawker";
/// The init marker's file name inside the state dir (reference
/// `head-lifecycle.md` §1.2: `/var/lib/clawker/agent-initialized`).
pub const INIT_MARKER: &str = "agent-initialized";

/// A boot failure with its exit code.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// Will not fix itself: exit 2.
    #[error("{0}")]
    Config(String),
    /// May fix itself on restart: exit 1.
    #[error("{0}")]
    Transient(String),
}

impl BootError {
    pub fn exit_code(&self) -> i32 {
        match self {
            BootError::Config(_) => 2,
            BootError::Transient(_) => 1,
        }
    }
}

/// Everything read from the environment and the command line.
#[derive(Debug, Clone)]
pub struct Config {
    pub agent: String,
    pub project: String,
    pub user_spec: String,
    pub cp_agent_addr: String,
    pub cp_token_url: String,
    pub bootstrap_dir: PathBuf,
    pub listen_addr: SocketAddr,
    pub passwd_file: PathBuf,
    pub group_file: PathBuf,
    pub ready_file: PathBuf,
    /// Writable state directory ([`env::STATE_DIR`]).
    pub state_dir: PathBuf,
    /// The user command (container CMD): clawkerd's args, minus a leading `--`.
    pub user_argv: Vec<String>,
    /// The listener's bounds ([`crate::listen::ListenerLimits::CLAWKERD`],
    /// idle timeout from [`env::IDLE_TIMEOUT_SECS`]).
    pub limits: crate::listen::ListenerLimits,
}

impl Config {
    /// The CP's address, when `CLAWKER_CP_AGENT_ADDR` is an `IP:port`: the
    /// CP dials :7700 from the same address it serves agents on (the agent
    /// network's gateway), so the listener exempts it from its caps.
    pub fn cp_ip(&self) -> Option<std::net::IpAddr> {
        self.cp_agent_addr
            .parse::<SocketAddr>()
            .ok()
            .map(|a| a.ip())
    }
}

fn var(name: &str) -> String {
    std::env::var(name).unwrap_or_default()
}

fn var_or(name: &str, default: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_owned())
}

impl Config {
    /// Reads the environment; `args` are clawkerd's arguments after argv[0].
    pub fn from_env(args: Vec<String>) -> Result<Self, BootError> {
        let agent = var(env::AGENT);
        if agent.is_empty() {
            return Err(BootError::Config(format!(
                "required env not set: {}",
                env::AGENT
            )));
        }
        let listen = var_or(env::LISTEN_ADDR, DEFAULT_LISTEN_ADDR);
        let listen_addr = listen.parse().map_err(|e| {
            BootError::Config(format!(
                "{}={listen:?}: not an IP:port: {e}",
                env::LISTEN_ADDR
            ))
        })?;
        let mut token_url = var(env::CP_TOKEN_URL);
        if token_url.is_empty() {
            let hydra = var(env::CP_HYDRA_URL);
            if !hydra.is_empty() {
                token_url = format!("{}/oauth2/token", hydra.trim_end_matches('/'));
            }
        }
        let mut limits = crate::listen::ListenerLimits::CLAWKERD;
        let idle = var(env::IDLE_TIMEOUT_SECS);
        if !idle.is_empty() {
            limits.idle_timeout = idle
                .trim()
                .parse::<f64>()
                .ok()
                .and_then(|s| std::time::Duration::try_from_secs_f64(s).ok())
                .filter(|d| !d.is_zero())
                .ok_or_else(|| {
                    BootError::Config(format!(
                        "{}={idle:?}: not a positive number of seconds",
                        env::IDLE_TIMEOUT_SECS
                    ))
                })?;
        }
        let mut user_argv = args;
        if user_argv.first().map(String::as_str) == Some("--") {
            user_argv.remove(0);
        }
        Ok(Self {
            agent,
            project: var(env::PROJECT),
            user_spec: var_or(env::USER, DEFAULT_USER),
            cp_agent_addr: var(env::CP_AGENT_ADDR),
            cp_token_url: token_url,
            bootstrap_dir: var_or(env::BOOTSTRAP_DIR, bootstrap::DEFAULT_DIR).into(),
            listen_addr,
            passwd_file: var_or(env::PASSWD_FILE, "/etc/passwd").into(),
            group_file: var_or(env::GROUP_FILE, "/etc/group").into(),
            ready_file: var_or(env::READY_FILE, DEFAULT_READY_FILE).into(),
            state_dir: var_or(env::STATE_DIR, DEFAULT_STATE_DIR).into(),
            user_argv,
            limits,
        })
    }
}

/// Why the bootstrap bundle could not be read (a boot configuration error:
/// the CP-side tooling did not upload the bundle, or uploaded it empty).
#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error("read {name}: {source}")]
    Read {
        name: &'static str,
        source: std::io::Error,
    },
    #[error("{name} is empty")]
    Empty { name: &'static str },
}

/// The bootstrap bundle, read once. The PEMs stay raw bytes; the listener
/// and the register coordinator parse them.
#[derive(Clone)]
pub struct Bootstrap {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    pub ca_pem: Vec<u8>,
    /// Whitespace-trimmed. Never logged.
    pub assertion: String,
}

impl std::fmt::Debug for Bootstrap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Bootstrap{<redacted>}")
    }
}

impl Bootstrap {
    /// Reads cert.pem, key.pem, ca.pem, assertion.jwt in that order; the
    /// first missing, unreadable or empty file wins.
    pub fn read(dir: &std::path::Path) -> Result<Self, BootstrapError> {
        let read = |name: &'static str| -> Result<Vec<u8>, BootstrapError> {
            let bytes = std::fs::read(dir.join(name))
                .map_err(|source| BootstrapError::Read { name, source })?;
            if bytes.is_empty() {
                return Err(BootstrapError::Empty { name });
            }
            Ok(bytes)
        };
        let cert_pem = read(bootstrap::CERT)?;
        let key_pem = read(bootstrap::KEY)?;
        let ca_pem = read(bootstrap::CA)?;
        let assertion = String::from_utf8_lossy(&read(bootstrap::ASSERTION)?)
            .trim()
            .to_owned();
        Ok(Self {
            cert_pem,
            key_pem,
            ca_pem,
            assertion,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_all(dir: &std::path::Path) {
        for (n, c) in [
            (bootstrap::CERT, "cert"),
            (bootstrap::KEY, "key"),
            (bootstrap::CA, "ca"),
            (bootstrap::ASSERTION, "assertion-jwt\n"),
        ] {
            std::fs::write(dir.join(n), c).unwrap();
        }
    }

    #[test]
    fn the_cp_address_is_known_only_when_it_is_an_ip() {
        let mut c = Config {
            agent: "a".into(),
            project: String::new(),
            user_spec: DEFAULT_USER.into(),
            cp_agent_addr: "10.213.0.1:7444".into(),
            cp_token_url: String::new(),
            bootstrap_dir: "/b".into(),
            listen_addr: DEFAULT_LISTEN_ADDR.parse().unwrap(),
            passwd_file: "/etc/passwd".into(),
            group_file: "/etc/group".into(),
            ready_file: DEFAULT_READY_FILE.into(),
            state_dir: DEFAULT_STATE_DIR.into(),
            user_argv: vec![],
            limits: crate::listen::ListenerLimits::CLAWKERD,
        };
        assert_eq!(c.cp_ip(), Some("10.213.0.1".parse().unwrap()));
        c.cp_agent_addr = "clawker-controlplane:7444".into();
        assert_eq!(c.cp_ip(), None);
        c.cp_agent_addr.clear();
        assert_eq!(c.cp_ip(), None);
    }

    #[test]
    fn bootstrap_reads_verbatim_and_trims_the_assertion() {
        let d = tempfile::tempdir().unwrap();
        write_all(d.path());
        let b = Bootstrap::read(d.path()).unwrap();
        assert_eq!(b.cert_pem, b"cert");
        assert_eq!(b.assertion, "assertion-jwt");
        assert_eq!(format!("{b:?}"), "Bootstrap{<redacted>}");
    }

    #[test]
    fn bootstrap_names_the_missing_or_empty_file() {
        for name in [
            bootstrap::CERT,
            bootstrap::KEY,
            bootstrap::CA,
            bootstrap::ASSERTION,
        ] {
            let d = tempfile::tempdir().unwrap();
            write_all(d.path());
            std::fs::remove_file(d.path().join(name)).unwrap();
            let e = Bootstrap::read(d.path()).unwrap_err().to_string();
            assert!(e.starts_with(&format!("read {name}: ")), "{e}");
        }
        let d = tempfile::tempdir().unwrap();
        write_all(d.path());
        std::fs::write(d.path().join(bootstrap::CERT), "").unwrap();
        assert_eq!(
            Bootstrap::read(d.path()).unwrap_err().to_string(),
            "cert.pem is empty"
        );
    }
}
