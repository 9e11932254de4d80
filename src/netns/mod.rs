//! The kernel edge: network rules the CP installs from outside a container
//! (in its network namespace) and on the host, with no capability inside
//! the container. It knows nothing of Docker: it takes a namespace opened
//! from a pid, typed addresses and ports, and bridge names; the runtime
//! (`docker::Engine`) decides which container, which pid, which addresses.
//!
//! - [`ns`]: [`NetNs`], entering a namespace on a fresh `std::thread`
//!   (never a tokio worker or an actor thread: `setns` moves the calling
//!   thread), and [`on_own_thread`] for blocking host-side work;
//! - [`nft`]: the rulesets (lock, agent-port guard) and the `nft` runner;
//! - [`netlink`]: conntrack flush and `SOCK_DESTROY` of live TCP sockets;
//! - [`host_guard`]: the host table that makes the quarantine bridge a
//!   dead end except for replies on connections the host opened.
//!
//! What each operation guarantees:
//! - [`lock`]: inside the namespace, only the CP's session (CP address →
//!   clawkerd's port, and clawkerd's replies) and loopback pass, IPv4 and
//!   IPv6; every other TCP attempt is refused at once; the namespace's
//!   conntrack table is flushed and every TCP connection but the session is
//!   destroyed, so connections opened before the lock die too. Idempotent:
//!   the table's comment records what it allows, and an identical lock is
//!   left alone (the flush and the kill still run: a previous CP may have
//!   died between the steps).
//! - [`guard_agent_port`]: clawkerd's port accepts new connections from the
//!   CP's addresses only (other sources are dropped before clawkerd sees a
//!   byte); nothing else changes.
//! - [`guard_bridge`]: see [`host_guard`].
//!
//! Rules in a container's namespace die with it: a restarted container
//! starts unlocked and unguarded, so callers re-apply on every start (the
//! containment ladder re-runs on every untrusted session; the CP guards
//! the agent port on every start).

pub mod host_guard;
pub mod netlink;
pub mod nft;
pub mod ns;

use std::time::Duration;

pub use netlink::KillReport;
pub use nft::{CpEndpoint, LockState};
pub use ns::{NetNs, on_own_thread};

/// Why a netns or nft operation failed.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("process {0} not found (the container stopped?)")]
    NoSuchProcess(u32),
    #[error("pid {0} shares the CP's network namespace (--network host?): refusing to touch it")]
    HostNamespace(u32),
    #[error("setns landed in an unexpected namespace")]
    SetnsMismatch,
    #[error("the netns worker thread ended without an answer")]
    WorkerGone,
    #[error("invalid rule input: {0}")]
    Invalid(String),
    #[error("unsupported on this host: {0}")]
    Unsupported(String),
    #[error("nft did not finish within {0:?}")]
    Timeout(Duration),
    #[error("nft exited {status}: {stderr}")]
    Nft { status: i32, stderr: String },
    #[error("netlink: {0}")]
    Netlink(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

impl NetnsError {
    fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        NetnsError::Io {
            what: what.into(),
            source,
        }
    }

    /// A host or container that cannot do this at all (no nft, no root,
    /// a host-network container), as opposed to a fault.
    pub fn is_unsupported(&self) -> bool {
        matches!(
            self,
            NetnsError::Unsupported(_) | NetnsError::HostNamespace(_)
        )
    }
}

/// What a rule install found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Installed {
    /// Nothing was there; it is now.
    Applied,
    /// Rules with other values were replaced atomically (no open window).
    Replaced,
    /// The same rules were already in force (left untouched).
    AlreadyApplied,
}

/// What [`lock`] did.
#[derive(Debug, Clone)]
pub struct LockReport {
    pub installed: Installed,
    /// Interfaces that got an L2 egress chain.
    pub l2_devices: Vec<String>,
    pub sockets: KillReport,
}

/// Locks the namespace down to the CP's session (see the module doc).
pub async fn lock(
    ns: &NetNs,
    cp: &CpEndpoint,
    timeout: Duration,
) -> Result<LockReport, NetnsError> {
    let cp = cp.validated()?;
    let nft = nft::find_nft()?;
    ns.run(move || {
        let l2: Vec<String> = NetNs::interfaces_here()?
            .into_iter()
            .filter(|n| n != "lo" && nft::valid_ifname(n))
            .collect();
        let want = LockState {
            cp: cp.clone(),
            l2_devices: l2.clone(),
        };
        let installed = match nft::read_lock(&nft, timeout)? {
            Some(Some(st)) if st == want => Installed::AlreadyApplied,
            Some(_) => Installed::Replaced,
            None => Installed::Applied,
        };
        if installed != Installed::AlreadyApplied {
            nft::apply(&nft, &nft::render_lock(&cp, &l2), timeout)?;
        }
        // Cheap, and also run when already applied: a previous CP may have
        // died between installing the rules and killing the sockets.
        netlink::flush_conntrack_here()?;
        let keep = cp.clone();
        let sockets = netlink::kill_tcp_sockets_here(move |s| {
            s.local.1 == keep.port && keep.cp_ips.contains(&s.remote.0)
        })?;
        Ok(LockReport {
            installed,
            l2_devices: l2,
            sockets,
        })
    })
    .await
}

/// Removes the lock; `true` if there was one. Idempotent.
pub async fn unlock(ns: &NetNs, timeout: Duration) -> Result<bool, NetnsError> {
    let nft = nft::find_nft()?;
    ns.run(move || {
        let was = nft::read_lock(&nft, timeout)?.is_some();
        if was {
            nft::apply(&nft, &nft::render_unlock(), timeout)?;
        }
        Ok(was)
    })
    .await
}

/// The lock in force: `None` = not locked; `Some(None)` = a lock table
/// whose comment is not ours.
pub async fn lock_state(
    ns: &NetNs,
    timeout: Duration,
) -> Result<Option<Option<LockState>>, NetnsError> {
    let nft = nft::find_nft()?;
    ns.run(move || nft::read_lock(&nft, timeout)).await
}

/// Restricts clawkerd's port to the CP's addresses (see the module doc).
pub async fn guard_agent_port(
    ns: &NetNs,
    cp: &CpEndpoint,
    timeout: Duration,
) -> Result<Installed, NetnsError> {
    let cp = cp.validated()?;
    let nft = nft::find_nft()?;
    ns.run(move || {
        let installed = match nft::read_port_guard(&nft, timeout)? {
            Some(Some(have)) if have == cp => return Ok(Installed::AlreadyApplied),
            Some(_) => Installed::Replaced,
            None => Installed::Applied,
        };
        nft::apply(&nft, &nft::render_port_guard(&cp), timeout)?;
        Ok(installed)
    })
    .await
}

/// Guards a quarantine bridge on the host (idempotent; see [`host_guard`]).
pub async fn guard_bridge(bridge: &str, timeout: Duration) -> Result<(), NetnsError> {
    let nft = nft::find_nft()?;
    let bridge = bridge.to_owned();
    on_own_thread(move || host_guard::guard(&nft, &bridge, timeout)).await
}

/// Stops guarding a bridge (idempotent): for a quarantine network that is
/// being removed.
pub async fn unguard_bridge(bridge: &str, timeout: Duration) -> Result<(), NetnsError> {
    let nft = nft::find_nft()?;
    let bridge = bridge.to_owned();
    on_own_thread(move || host_guard::unguard(&nft, &bridge, timeout)).await
}

/// Is the bridge guarded?
pub async fn bridge_guarded(bridge: &str, timeout: Duration) -> Result<bool, NetnsError> {
    let nft = nft::find_nft()?;
    let bridge = bridge.to_owned();
    on_own_thread(move || host_guard::is_guarded(&nft, &bridge, timeout)).await
}
