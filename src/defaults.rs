//! Every name, label, network, port and default address clawker agrees on,
//! in one place. The CLI stamps containers with these labels, the feeder
//! filters by them and Register checks them: one copy, so the three can
//! never drift apart.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

/// Docker labels on every container and network clawker manages.
pub mod labels {
    /// `true` on everything clawker created.
    pub const MANAGED: &str = "dev.clawker.managed";
    pub const MANAGED_VALUE: &str = "true";
    /// The agent's name (Register compares it with the certificate).
    pub const AGENT: &str = "dev.clawker.agent";
    /// The agent's project; absent for an unscoped agent.
    pub const PROJECT: &str = "dev.clawker.project";
    /// What a managed object is: [`PURPOSE_AGENT`] for agent containers.
    pub const PURPOSE: &str = "dev.clawker.purpose";
    pub const PURPOSE_AGENT: &str = "agent";
    pub const PURPOSE_NETWORK: &str = "network";
    pub const PURPOSE_QUARANTINE: &str = "quarantine";
}

/// The bridge network the CP and every agent share.
pub const NETWORK: &str = "clawker-net";
/// Its subnet when the CP creates it (an explicit subnet, never Docker's
/// pick, so it cannot collide with a test network or the host's LAN).
pub const SUBNET: &str = "10.213.0.0/24";

/// The internal network `isolate` moves an agent onto.
pub const QUARANTINE_NETWORK: &str = "clawker-quarantine";
/// Its subnet when the CP creates it.
pub const QUARANTINE_SUBNET: &str = "10.213.1.0/24";

/// The port clawkerd listens on inside every agent container.
pub const CLAWKERD_PORT: u16 = 7700;
/// clawkerd's listen address inside the container.
pub const CLAWKERD_LISTEN: SocketAddr =
    SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), CLAWKERD_PORT);

/// The agent API (AgentService + token endpoint) port, on the network's
/// gateway address.
pub const AGENT_PORT: u16 = 7444;

/// The admin API (CLI only), on loopback.
pub const ADMIN_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 7443);

/// Prometheus metrics and health endpoints, on loopback.
pub const METRICS_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 7080);

/// The TLS name every client uses for the CP (its server certificate's
/// DNS SAN, and the CN of its client certificate).
pub const CP_NAME: &str = "clawker-controlplane";

/// Audience of an agent's client assertion: the CP's token endpoint under
/// the TLS name every client uses.
pub fn token_audience(agent_port: u16) -> String {
    format!("https://{CP_NAME}:{agent_port}/oauth2/token")
}

/// The unprivileged user agent images run their command as.
pub mod agent_user {
    pub const UID: u32 = 1001;
    pub const GID: u32 = 1001;
    pub const NAME: &str = "claude";
    pub const HOME: &str = "/home/claude";
}

/// Where things live inside an agent container started by `clawker agent
/// run` (its root filesystem is read-only by default).
pub mod agent_paths {
    /// clawkerd's persistent state: an anonymous volume, so it survives
    /// container restarts and goes with `clawker agent rm`. Holds
    /// `bootstrap/` (the bundle, 0700), `log/` (0700) and whatever else
    /// clawkerd must keep across restarts (init marker, rotated leaves).
    pub const STATE_DIR: &str = "/var/lib/clawker";
    /// The bootstrap bundle (`CLAWKER_BOOTSTRAP_DIR`).
    pub const BOOTSTRAP_DIR: &str = "/var/lib/clawker/bootstrap";
    /// clawkerd's log (`CLAWKER_LOG_FILE`).
    pub const LOG_FILE: &str = "/var/lib/clawker/log/clawkerd.log";
    /// The per-boot ready marker (`CLAWKER_READY_FILE`), on the `/run`
    /// tmpfs.
    pub const READY_FILE: &str = "/run/clawker/ready";
    /// Where `--workspace DIR` is bind-mounted, read-write.
    pub const WORKSPACE: &str = "/workspace";
}

/// The capabilities clawkerd needs as PID 1 and nothing more: SETUID and
/// SETGID to drop to the agent user (setgroups/setgid/setuid before exec),
/// KILL to signal process groups owned by that user (timeouts, `docker
/// stop` forwarding), CHOWN and FOWNER to keep owners, modes and mtimes
/// when `clawker agent cp` unpacks a tree into the container (root sets
/// them on files it does not own), DAC_READ_SEARCH to pack any file when
/// `agent cp` copies out (like `docker cp`, which reads from outside).
/// None survives the drop to the agent user (no ambient set,
/// no-new-privileges). `tests/containment_docker.rs` shows each one is
/// needed.
pub const AGENT_CAPS: [&str; 6] = [
    "SETUID",
    "SETGID",
    "KILL",
    "CHOWN",
    "FOWNER",
    "DAC_READ_SEARCH",
];

/// The default agent image (`scripts/build-agent-image.sh` builds it).
pub const AGENT_IMAGE: &str = "clawker-agent:latest";
