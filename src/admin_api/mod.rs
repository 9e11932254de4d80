//! The admin API: `clawker.admin.v1.AdminService`, the operator's view of
//! the control plane, served on loopback to the `clawker` CLI.
//!
//! Map:
//! - [`service`]: the RPC handlers ([`AdminApi`]) over three narrow seams —
//!   an [`AgentDirectory`] (registry rows, for `ListAgents`), the event
//!   [`Bus`](crate::events::Bus) (worldview snapshot, live event stream)
//!   and a [`TreeSource`] (the supervision tree).
//! - [`server`]: the listener: our own TCP accept loop and TLS 1.3
//!   handshake (client certificate required, only the CLI's identity
//!   accepted) feeding tonic, plus `grpc.health.v1` and server reflection
//!   so `grpcurl` works.
//! - [`client`]: the CLI side: dial with the CLI client certificate,
//!   verify the CP's server certificate against the CA.
//! - [`access`], [`exec`], [`transfer`]: the operator's way into an agent
//!   (`Exec`, `CopyFrom`, `CopyTo`, `Logs`) over its session: target,
//!   trust/containment gate, user, audit events; the relays.
//! - [`watch`]: a `WatchEvents` subscription that survives CP restarts,
//!   for policy programs outside the CP.
//!
//! Who may call: only a peer presenting a certificate that chains to our CA,
//! carries the ClientAuth EKU and has Subject CN `clawker-cli`. The check
//! runs inside the TLS handshake ([`crate::tls::PinnedClientVerifier`]), so the CP's
//! own client certificate (CN `clawker-controlplane`) and agent leaves
//! (CN `clawker.<project>.<agent>`), though signed by the same CA, never
//! reach a handler. The reference additionally requires an OAuth2 `admin`
//! scope; on a loopback listener the CLI certificate is the credential.

pub mod access;
pub mod client;
pub mod exec;
pub mod server;
pub mod service;
pub mod transfer;
pub mod watch;

use std::net::SocketAddr;
use std::path::Path;

pub use client::{AdminClient, ClientError};
pub use server::{AdminServerError, serve_admin_api};
pub use service::{AdminApi, AgentDirectory, TreeSource};

use crate::pki::{self, AuthPaths};

/// The fully-qualified gRPC service name (health and reflection use it).
pub const SERVICE_NAME: &str = "clawker.admin.v1.AdminService";

/// Largest admin response (server encode, CLI decode). Requests are capped
/// at 4 MiB like every gRPC message of ours; responses get more room
/// because `GetWorldview` answers with the whole worldview in one message,
/// and with the 10,000-agent target that is more than 4 MiB. Both ends of
/// this direction are ours and trusted (the CLI certificate is pinned).
pub const MAX_RESPONSE_BYTES: usize = 64 << 20;

/// Listener configuration: the address and the PEM material it serves with.
/// Plain data, so tests can build one from freshly minted certificates.
#[derive(Clone)]
pub struct AdminConfig {
    /// Must be a loopback address unless `allow_non_loopback` is set.
    pub listen: SocketAddr,
    /// The CP server certificate chain (`<state>/auth/tls/server.pem`).
    pub server_cert_pem: Vec<u8>,
    /// Its key (`<state>/auth/tls/server.key`).
    pub server_key_pem: Vec<u8>,
    /// The CA that client certificates must chain to (`<state>/auth/ca/ca.pem`).
    pub ca_pem: Vec<u8>,
    /// Escape hatch for a CP in a container whose loopback the host cannot
    /// reach. Off by default: the admin API is an operator surface and
    /// belongs on loopback (DESIGN §2).
    pub allow_non_loopback: bool,
    /// Connection caps, handshake and idle timeouts (see [`crate::listen`]).
    pub limits: crate::listen::ListenerLimits,
}

impl std::fmt::Debug for AdminConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminConfig")
            .field("listen", &self.listen)
            .field("allow_non_loopback", &self.allow_non_loopback)
            .finish_non_exhaustive()
    }
}

impl AdminConfig {
    /// Reads the server certificate, its key and the CA from the state
    /// directory's auth material (written by `clawker ca init`).
    pub fn load(state_dir: &Path, listen: SocketAddr) -> Result<Self, AdminServerError> {
        let paths = AuthPaths::new(state_dir);
        let read = |p: std::path::PathBuf| {
            pki::read_file(&p)
                .map(String::into_bytes)
                .map_err(|e| AdminServerError::Material(format!("{e} (run `clawker ca init`)")))
        };
        Ok(Self {
            listen,
            server_cert_pem: read(paths.server_cert())?,
            server_key_pem: read(paths.server_key())?,
            ca_pem: read(paths.ca_cert())?,
            allow_non_loopback: false,
            limits: crate::listen::ListenerLimits::ADMIN_API,
        })
    }
}
