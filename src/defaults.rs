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
    /// Swarm mode: the CP's own service.
    pub const PURPOSE_CP: &str = "cp";
    /// Swarm mode: a secret holding one file of an agent's bootstrap bundle.
    pub const PURPOSE_BOOTSTRAP: &str = "bootstrap";
    /// Swarm mode: on a bundle secret, the id of the service it belongs to.
    pub const SERVICE: &str = "dev.clawker.service";
    /// The quarantine network (engine) or overlay (swarm).
    pub const PURPOSE_QUARANTINE: &str = "quarantine";
}

/// The bridge network the CP and every agent share.
pub const NETWORK: &str = "clawker-net";
/// Its subnet when the CP creates it (an explicit subnet, never Docker's
/// pick, so it cannot collide with a test network or the host's LAN).
pub const SUBNET: &str = "10.213.0.0/24";

/// Swarm mode: the attachable overlay the CP service and every agent
/// service share.
pub mod swarm {
    /// The overlay network.
    pub const NETWORK: &str = "clawker-overlay";
    /// Its subnet when `clawker cp deploy` creates it (explicit, like
    /// clawker-net's).
    pub const SUBNET: &str = "10.213.64.0/24";
    /// The CP's service.
    pub const CP_SERVICE: &str = "clawker-cp";
    /// The CP's state volume (on the manager it is pinned to).
    pub const CP_VOLUME: &str = "clawker-cp-state";
    /// The state directory inside the CP's container (the volume's mount).
    pub const CP_STATE_DIR: &str = "/var/lib/clawker";
    /// The CP image (`scripts/build-cp-image.sh` builds it).
    pub const CP_IMAGE: &str = "clawker-cp:latest";
    /// Env the CP service gets from swarm's templating (`{{.Task.ID}}`):
    /// how the CP finds its own task, hence its overlay address.
    pub const TASK_ID_ENV: &str = "CLAWKER_SWARM_TASK_ID";
    /// The internal overlay `isolate` moves an agent service onto (the CP
    /// service is attached to it too, so the session survives the move).
    pub const QUARANTINE_NETWORK: &str = "clawker-quarantine-overlay";
    /// Its subnet when `clawker cp deploy` creates it.
    pub const QUARANTINE_SUBNET: &str = "10.213.65.0/24";
}

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
