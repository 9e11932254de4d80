//! clawker: a control plane that supervises sandboxed AI coding agents.
//!
//! Map of the crate (see `ARCHITECTURE.md` for the actor tree and flows):
//!
//! - [`identity`]: agent names, canonical CNs, the container URI SAN,
//!   certificate thumbprints, constant-time compares.
//! - [`pki`]: the CA and every certificate it mints; `clawker ca init`.
//! - [`registry`]: the durable identity registry (redb) and the registry
//!   actor that owns it (durable writes, lock-free read snapshots).
//! - [`agent_api`]: the agent listener: AgentService (Register), its auth
//!   and identity interceptors, and the embedded OAuth2 token endpoint.
//! - [`proto`]: generated gRPC code for the three wire packages.
//! - [`tls`]: rustls helpers shared by the CP and clawkerd (provider, PEM
//!   loading, the CP's record-but-never-reject server verifier).
//! - [`listen`]: what every listener does to survive a hostile peer
//!   (connection caps, handshake and idle timeouts, the fd budget).
//! - [`peer_text`]: the one bound on strings a peer sends us.
//! - [`log_limit`]: rate-limited logging of lines a peer can cause.
//! - [`admin_api`]: AdminService (ListAgents, worldview, event stream,
//!   supervision tree) on loopback for the CLI, with its client.
//! - [`cli`]: the `clawker` command line.
//! - [`clawkerd`]: the agent daemon (PID 1 in every agent container).
//! - [`archive`]: tar streams for `agent cp` (pack; unpack that never
//!   leaves its destination), shared by clawkerd and the CLI.
//! - [`netns`]: the kernel edge: nftables rules and netlink requests the
//!   CP applies inside a container's network namespace (lock, agent-port
//!   guard) and on the host (the quarantine bridge guard).
//! - [`policy`]: subscriber actors that act on bus events: containment of
//!   untrusted agents, the audit log, metrics and health endpoints.

pub mod admin_api;
pub mod agent_api;
pub mod archive;
pub mod clawkerd;
pub mod cli;
pub mod config;
pub mod cp;
pub mod defaults;
pub mod docker;
pub mod events;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzz_harness;
pub mod identity;
pub mod listen;
pub mod log_limit;
pub mod netns;
pub mod peer_text;
pub mod pki;
pub mod policy;
pub mod proto;
pub mod registry;
pub mod runtime;
pub mod session;
pub mod tls;
