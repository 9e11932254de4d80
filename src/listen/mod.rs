//! What every listener of ours does to survive a hostile peer.
//!
//! Three listeners take connections from places we do not trust: the agent
//! listener (AgentService + `/oauth2/token` on the clawker-net gateway,
//! reachable by every agent, with client certificates optional because the
//! token endpoint needs that), clawkerd's :7700 (reachable by every
//! neighbour on the network) and the admin API (loopback, but still a
//! socket). Before these bounds, one agent held 5,000 idle TLS connections
//! for a minute and, at 20,000, filled the CP's file-descriptor table. The
//! CP's plain-HTTP metrics endpoint (loopback) gets the same caps and an
//! idle/header timeout through [`http1`].
//!
//! Each listener runs [`accept::accept_loop`] with its [`ListenerLimits`]:
//!
//! - a cap on concurrent connections, global and per source IP
//!   ([`limiter`]); a connection over a cap is closed at once (RST), before
//!   any TLS work, counted, and logged rate-limited;
//! - a TLS handshake timeout;
//! - an idle timeout: a connection with no request in flight for
//!   `idle_timeout` is closed ([`conn`], tracked per request by
//!   [`in_flight`]). That also bounds a client that trickles request
//!   headers, because a request is in flight only once its headers are
//!   complete;
//! - HTTP/2 keepalive (a dead peer is noticed) and a bound on concurrent
//!   streams per connection, applied by each server's builder from the same
//!   limits.
//!
//! [`fd`] raises the CP's `RLIMIT_NOFILE` and sizes the caps below it, so
//! no listener can exhaust the descriptors Docker calls and sessions need.

pub mod accept;
pub mod conn;
pub mod fd;
pub mod http1;
pub mod in_flight;
pub mod limiter;

use std::time::Duration;

pub use accept::{AcceptConfig, Accepted, accept_loop};
pub use conn::{ConnInfo, GuardedConn};
pub use in_flight::InFlightLayer;
pub use limiter::{ConnLimiter, Refusal};

/// The bounds of one listener. Every field has a per-listener default
/// ([`ListenerLimits::AGENT_API`], [`ListenerLimits::ADMIN_API`],
/// [`ListenerLimits::CLAWKERD`]); the CP's can be set in `cp.toml`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenerLimits {
    /// Concurrent connections (handshaking or established), all sources.
    pub max_connections: usize,
    /// Concurrent connections from one source IP.
    pub max_connections_per_source: usize,
    /// A peer gets this long to complete the TLS handshake.
    pub handshake_timeout: Duration,
    /// A connection with no request in flight for this long is closed.
    pub idle_timeout: Duration,
    /// HTTP/2 PING interval, and how long to wait for its ACK.
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    /// Concurrent HTTP/2 streams on one connection.
    pub max_concurrent_streams: u32,
}

impl ListenerLimits {
    /// The agent listener: must serve a fleet (one Register and one token
    /// request per new agent, each on its own short connection), yet one
    /// agent may hold no more than a handful.
    pub const AGENT_API: Self = Self {
        max_connections: 1024,
        max_connections_per_source: 8,
        handshake_timeout: Duration::from_secs(5),
        idle_timeout: Duration::from_secs(15),
        keepalive_interval: Duration::from_secs(30),
        keepalive_timeout: Duration::from_secs(10),
        max_concurrent_streams: 16,
    };

    /// The admin API: loopback only, so every client has the same source
    /// address and the per-source cap equals the global one.
    pub const ADMIN_API: Self = Self {
        max_connections: 128,
        max_connections_per_source: 128,
        handshake_timeout: Duration::from_secs(5),
        idle_timeout: Duration::from_secs(60),
        keepalive_interval: Duration::from_secs(30),
        keepalive_timeout: Duration::from_secs(10),
        max_concurrent_streams: 64,
    };

    /// The CP's `/metrics` and health endpoint: loopback only (one source,
    /// so the per-source cap equals the global one), plain HTTP/1.1, a
    /// Prometheus scraper or two and the odd `curl`. `idle_timeout` is
    /// hyper's header-read timeout there: a request head must arrive
    /// complete within it, on a fresh connection and between keep-alive
    /// requests. The HTTP/2 and handshake fields are unused (no TLS, no
    /// HTTP/2).
    pub const METRICS: Self = Self {
        max_connections: 64,
        max_connections_per_source: 64,
        handshake_timeout: Duration::from_secs(5),
        idle_timeout: Duration::from_secs(30),
        keepalive_interval: Duration::from_secs(30),
        keepalive_timeout: Duration::from_secs(10),
        max_concurrent_streams: 1,
    };

    /// clawkerd's :7700: only the CP ever completes a handshake (it is
    /// exempt from the caps, see [`AcceptConfig::reserved`]); everyone else
    /// is refused in the handshake, so a neighbour's connection lives at
    /// most `handshake_timeout` and the caps only bound how many it can
    /// have pending.
    pub const CLAWKERD: Self = Self {
        max_connections: 64,
        max_connections_per_source: 16,
        handshake_timeout: Duration::from_secs(5),
        idle_timeout: Duration::from_secs(60),
        // Only the CP's session lives past the handshake, and the CP pings
        // it (every 60 s); clawkerd's own pings only have to end a session
        // whose CP vanished without a FIN, so they are rare — each one
        // costs the CP a wakeup per agent.
        keepalive_interval: Duration::from_secs(120),
        keepalive_timeout: Duration::from_secs(10),
        max_concurrent_streams: 64,
    };
}
