//! The host-namespace guard of the quarantine bridge.
//!
//! Docker's `internal: true` stops *forwarding* out of a network, but not
//! the host's INPUT path: a container on an internal network still reaches
//! every host service listening on `0.0.0.0`/`[::]`, on its bridge's
//! gateway and on any other host address (Linux is weak-host). This table
//! closes that: traffic entering the host (input) or crossing it (forward)
//! from a guarded bridge is refused, except packets that answer a
//! connection the host opened (`ct direction reply`: the CP's session to
//! clawkerd) and IPv6 neighbour discovery. A connection the container
//! opened is refused even if it already existed.
//!
//! One table `inet clawker_host` with a set of bridge names; adding or
//! removing a bridge is one idempotent, atomic transaction that never
//! touches Docker's tables (a drop in any base chain is final whatever the
//! priority, so Docker's accepts cannot override it). The host's conntrack
//! table is never flushed: the reply rule depends on it.

use std::path::Path;
use std::time::Duration;

use super::NetnsError;
use super::nft::{apply, run_nft, valid_ifname};

/// The host table.
pub const HOST_TABLE: &str = "clawker_host";

/// Idempotent skeleton: `add` of an existing table, set or chain is a no-op,
/// and `flush chain` before re-adding the rules means re-running never
/// duplicates them.
fn skeleton() -> String {
    format!(
        "add table inet {t}
add set inet {t} quarantined {{ type ifname; }}
add chain inet {t} quarantine
add chain inet {t} input {{ type filter hook input priority filter - 10; policy accept; }}
add chain inet {t} forward {{ type filter hook forward priority filter - 10; policy accept; }}
flush chain inet {t} input
flush chain inet {t} forward
flush chain inet {t} quarantine
add rule inet {t} input iifname @quarantined jump quarantine
add rule inet {t} forward iifname @quarantined jump quarantine
add rule inet {t} quarantine ct state established,related ct direction reply accept
add rule inet {t} quarantine icmpv6 type {{ nd-neighbor-solicit, nd-neighbor-advert }} accept
add rule inet {t} quarantine meta l4proto tcp reject with tcp reset
add rule inet {t} quarantine reject with icmpx admin-prohibited
",
        t = HOST_TABLE
    )
}

fn checked(bridge: &str) -> Result<(), NetnsError> {
    if valid_ifname(bridge) {
        Ok(())
    } else {
        Err(NetnsError::Invalid(format!("bad bridge name {bridge:?}")))
    }
}

pub fn render_guard(bridge: &str) -> String {
    format!(
        "{}add element inet {HOST_TABLE} quarantined {{ \"{bridge}\" }}\n",
        skeleton()
    )
}

/// Guards `bridge` (blocking; run on a dedicated thread).
pub fn guard(nft: &Path, bridge: &str, timeout: Duration) -> Result<(), NetnsError> {
    checked(bridge)?;
    apply(nft, &render_guard(bridge), timeout)
}

/// Stops guarding `bridge`; a no-op if it was not guarded (add then delete
/// in one transaction, since deleting a missing element fails).
pub fn unguard(nft: &Path, bridge: &str, timeout: Duration) -> Result<(), NetnsError> {
    checked(bridge)?;
    let s = format!(
        "{}add element inet {HOST_TABLE} quarantined {{ \"{bridge}\" }}\n\
         delete element inet {HOST_TABLE} quarantined {{ \"{bridge}\" }}\n",
        skeleton()
    );
    apply(nft, &s, timeout)
}

/// Is `bridge` guarded right now?
pub fn is_guarded(nft: &Path, bridge: &str, timeout: Duration) -> Result<bool, NetnsError> {
    checked(bridge)?;
    let o = run_nft(
        nft,
        &["list", "set", "inet", HOST_TABLE, "quarantined"],
        None,
        timeout,
    )?;
    if o.status != 0 {
        return Ok(false);
    }
    Ok(o.stdout.contains(&format!("\"{bridge}\"")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guard_refuses_replies_only_on_connections_the_host_did_not_open() {
        let r = render_guard("br-0123456789ab");
        assert!(r.contains("input iifname @quarantined jump quarantine"));
        assert!(r.contains("forward iifname @quarantined jump quarantine"));
        assert!(r.contains("ct state established,related ct direction reply accept"));
        assert!(r.ends_with("quarantined { \"br-0123456789ab\" }\n"), "{r}");
        assert!(!r.contains("flush ruleset"));
        assert!(checked("br-x\" accept").is_err());
    }
}
