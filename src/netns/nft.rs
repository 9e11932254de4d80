//! The rulesets clawker installs and the `nft` runner.
//!
//! Why the `nft` binary and not a crate: the only pure-Rust nftables crate
//! (`rustables`) is GPL-3.0 and needs libclang to build (it fails here);
//! `nftnl`/`mnl` bind C libraries; `netlink-packet-netfilter` has no
//! `reject` expression; hand-encoding nf_tables netlink is 500–800 lines of
//! byte layout where a wrong payload offset is silently accepted and then
//! matches the wrong field. `nft -f -` gives one atomic kernel transaction
//! per ruleset, readable rules, and clear errors, for ~20 ms per apply.
//!
//! Values reach a ruleset only as typed values: `IpAddr` (its `Display` is
//! digits, dots, hex and colons), `u16`, and interface names checked
//! against a strict alphabet. Nothing goes through a shell: the ruleset is
//! written to `nft -f -` on stdin, with the environment cleared.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::NetnsError;

/// The lock table (family inet) in the container's namespace.
pub const LOCK_TABLE: &str = "clawker_lock";
/// The lock's L2 table (family netdev): egress allow-list per interface.
pub const LOCK_L2_TABLE: &str = "clawker_lock_l2";
/// The agent-port guard (family inet) in the container's namespace.
pub const PORT_TABLE: &str = "clawker_port";
const LOCK_TAG: &str = "clawker-lock v1";
const PORT_TAG: &str = "clawker-port v1";

/// Who the CP is, as a container sees it, and where clawkerd listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpEndpoint {
    /// The CP's source address(es) as the container sees them: the gateway
    /// of the bridge the session runs over (a CP on the host dials from
    /// there). Canonical, deduplicated, sorted once validated.
    pub cp_ips: Vec<IpAddr>,
    /// clawkerd's port inside the container.
    pub port: u16,
}

impl CpEndpoint {
    pub fn new(cp_ips: Vec<IpAddr>, port: u16) -> Self {
        Self { cp_ips, port }
    }

    /// Canonicalises and checks the values before they go anywhere.
    pub fn validated(&self) -> Result<Self, NetnsError> {
        if self.port == 0 {
            return Err(NetnsError::Invalid("port 0".into()));
        }
        if self.cp_ips.is_empty() {
            return Err(NetnsError::Invalid("no CP address".into()));
        }
        let mut ips: Vec<IpAddr> = Vec::new();
        for ip in &self.cp_ips {
            let ip = ip.to_canonical(); // ::ffff:a.b.c.d → a.b.c.d
            if ip.is_unspecified() || ip.is_multicast() || ip.is_loopback() {
                return Err(NetnsError::Invalid(format!("unusable CP address {ip}")));
            }
            if !ips.contains(&ip) {
                ips.push(ip);
            }
        }
        ips.sort();
        Ok(Self {
            cp_ips: ips,
            port: self.port,
        })
    }

    fn ips_text(&self) -> String {
        self.cp_ips
            .iter()
            .map(IpAddr::to_string)
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// Interface names are quoted into rulesets, so only a conservative
/// alphabet is accepted (Linux itself would allow quotes).
pub fn valid_ifname(n: &str) -> bool {
    !n.is_empty()
        && n.len() < 16
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.@".contains(&b))
}

/// What a lock table says about itself (its comment).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockState {
    pub cp: CpEndpoint,
    /// Devices that got a netdev egress chain.
    pub l2_devices: Vec<String>,
}

fn lock_comment(cp: &CpEndpoint, l2: &[String]) -> String {
    format!(
        "{LOCK_TAG} cp={} port={} l2={}",
        cp.ips_text(),
        cp.port,
        l2.join(",")
    )
}

fn port_comment(cp: &CpEndpoint) -> String {
    format!("{PORT_TAG} cp={} port={}", cp.ips_text(), cp.port)
}

/// Parses `<tag> cp=a,b port=N [l2=x,y]` back; `None` if it is not ours.
fn parse_comment(tag: &str, c: &str) -> Option<LockState> {
    let rest = c.strip_prefix(tag)?;
    let (mut ips, mut port, mut l2) = (None, None, Vec::new());
    for kv in rest.split_whitespace() {
        let (k, v) = kv.split_once('=')?;
        match k {
            "cp" => {
                ips = Some(
                    v.split(',')
                        .map(|s| s.parse().ok())
                        .collect::<Option<Vec<IpAddr>>>()?,
                )
            }
            "port" => port = Some(v.parse().ok()?),
            "l2" => {
                l2 = v
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect()
            }
            _ => {}
        }
    }
    Some(LockState {
        cp: CpEndpoint {
            cp_ips: ips?,
            port: port?,
        },
        l2_devices: l2,
    })
}

fn family(ip: &IpAddr) -> &'static str {
    if ip.is_ipv4() { "ip" } else { "ip6" }
}

/// The lock: one atomic transaction that (re)creates `inet clawker_lock`
/// and, when `l2` is non-empty, `netdev clawker_lock_l2`. `table X {}` +
/// `delete table X` first makes it a replace that works whether or not the
/// table exists (nft 1.0.6 has no `destroy`).
///
/// - input: loopback and the CP's packets to clawkerd; everything else is
///   dropped (a reject here would only tell the remote peer).
/// - output: loopback and clawkerd's replies to the CP — never a SYN from
///   the port, so the agent cannot *open* a connection to the CP from it;
///   every other TCP segment gets a RST (ECONNREFUSED / ECONNRESET at
///   once), everything else an ICMP error (EPERM for UDP), not a hang.
/// - no `ct state established` accept anywhere: the rules are stateless,
///   so a connection opened before the lock is not let through, and the
///   conntrack flush cannot break the session.
/// - netdev egress: the same allow-list at L2, which also stops frames an
///   agent with CAP_NET_RAW sends on an AF_PACKET socket (they never pass
///   the inet hooks).
/// - IPv6 CP: neighbour discovery is allowed, or the session would die
///   once the neighbour entry expires.
pub fn render_lock(cp: &CpEndpoint, l2: &[String]) -> String {
    let has_v6 = cp.cp_ips.iter().any(IpAddr::is_ipv6);
    let nd = "icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert } accept";
    let p = cp.port;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "table inet {LOCK_TABLE} {{}}\ndelete table inet {LOCK_TABLE}"
    );
    let _ = writeln!(
        s,
        "table netdev {LOCK_L2_TABLE} {{}}\ndelete table netdev {LOCK_L2_TABLE}"
    );
    let _ = writeln!(
        s,
        "table inet {LOCK_TABLE} {{\n  comment \"{}\"",
        lock_comment(cp, l2)
    );
    s.push_str(
        "  chain input {\n    type filter hook input priority filter - 10; policy drop;\n    iif \"lo\" accept\n",
    );
    for ip in &cp.cp_ips {
        let _ = writeln!(s, "    {} saddr {ip} tcp dport {p} accept", family(ip));
    }
    if has_v6 {
        let _ = writeln!(s, "    {nd}");
    }
    s.push_str("  }\n");
    s.push_str(
        "  chain output {\n    type filter hook output priority filter - 10; policy drop;\n    oif \"lo\" accept\n",
    );
    for ip in &cp.cp_ips {
        let _ = writeln!(
            s,
            "    {} daddr {ip} tcp sport {p} tcp flags & (syn | ack) != syn accept",
            family(ip)
        );
    }
    if has_v6 {
        let _ = writeln!(s, "    {nd}");
    }
    s.push_str(
        "    meta l4proto tcp reject with tcp reset\n    reject with icmpx admin-prohibited\n  }\n",
    );
    s.push_str(
        "  chain forward {\n    type filter hook forward priority filter - 10; policy drop;\n  }\n}\n",
    );
    if !l2.is_empty() {
        let _ = writeln!(
            s,
            "table netdev {LOCK_L2_TABLE} {{\n  comment \"{LOCK_TAG}\""
        );
        for (i, dev) in l2.iter().enumerate() {
            let _ = writeln!(
                s,
                "  chain egress{i} {{\n    type filter hook egress device \"{dev}\" priority -500; policy drop;\n    ether type arp accept"
            );
            for ip in &cp.cp_ips {
                let _ = writeln!(
                    s,
                    "    {} daddr {ip} tcp sport {p} tcp flags & (syn | ack) != syn accept",
                    family(ip)
                );
            }
            if has_v6 {
                let _ = writeln!(s, "    {nd}");
            }
            s.push_str("  }\n");
        }
        s.push_str("}\n");
    }
    s
}

/// Removes both lock tables (idempotent, one transaction).
pub fn render_unlock() -> String {
    format!(
        "table inet {LOCK_TABLE} {{}}\ndelete table inet {LOCK_TABLE}\n\
         table netdev {LOCK_L2_TABLE} {{}}\ndelete table netdev {LOCK_L2_TABLE}\n"
    )
}

/// The agent-port guard: clawkerd's port accepts new connections only from
/// the CP's addresses; every other source is dropped in the kernel, before
/// clawkerd accepts or handshakes anything. Everything else is untouched
/// (policy accept), and the lock, when present, is stricter still.
pub fn render_port_guard(cp: &CpEndpoint) -> String {
    let p = cp.port;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "table inet {PORT_TABLE} {{}}\ndelete table inet {PORT_TABLE}"
    );
    let _ = writeln!(
        s,
        "table inet {PORT_TABLE} {{\n  comment \"{}\"",
        port_comment(cp)
    );
    s.push_str("  chain input {\n    type filter hook input priority filter - 5; policy accept;\n");
    for ip in &cp.cp_ips {
        let _ = writeln!(s, "    {} saddr {ip} tcp dport {p} accept", family(ip));
    }
    let _ = writeln!(s, "    tcp dport {p} drop\n  }}\n}}");
    s
}

/// Locates the `nft` binary (Debian package `nftables`).
pub fn find_nft() -> Result<PathBuf, NetnsError> {
    for p in [
        "/usr/sbin/nft",
        "/sbin/nft",
        "/usr/bin/nft",
        "/usr/local/sbin/nft",
    ] {
        if Path::new(p).exists() {
            return Ok(PathBuf::from(p));
        }
    }
    Err(NetnsError::Unsupported(
        "nft not found (apt-get install nftables; scripts/ensure-deps.sh does)".into(),
    ))
}

/// Output of one `nft` run.
pub struct NftOut {
    pub status: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `nft ARGS` with `stdin` on a pipe, in the calling thread's network
/// namespace (the child inherits it), bounded by `timeout`. Blocking: call
/// it on a dedicated thread.
pub fn run_nft(
    nft: &Path,
    args: &[&str],
    stdin: Option<&str>,
    timeout: Duration,
) -> Result<NftOut, NetnsError> {
    let mut child = Command::new(nft)
        .args(args)
        .env_clear()
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| NetnsError::io(format!("spawn {}", nft.display()), e))?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())
            .map_err(|e| NetnsError::io("write nft stdin", e))?;
    } // the pipe is dropped here: EOF
    let deadline = Instant::now() + timeout;
    let mut nap = Duration::from_micros(200);
    let status = loop {
        match child
            .try_wait()
            .map_err(|e| NetnsError::io("wait nft", e))?
        {
            Some(st) => break st,
            None if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(NetnsError::Timeout(timeout));
            }
            None => {
                std::thread::sleep(nap);
                nap = (nap * 2).min(Duration::from_millis(5));
            }
        }
    };
    // Outputs are tiny (a table listing, error lines): well under a pipe
    // buffer, so reading after the exit cannot deadlock.
    let (mut out, mut err) = (String::new(), String::new());
    if let Some(mut o) = child.stdout.take() {
        let _ = o.read_to_string(&mut out);
    }
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    Ok(NftOut {
        status: status.code().unwrap_or(-1),
        stdout: out,
        stderr: err,
    })
}

/// Applies a ruleset (atomically) or fails with nft's message.
pub fn apply(nft: &Path, ruleset: &str, timeout: Duration) -> Result<(), NetnsError> {
    let o = run_nft(nft, &["-f", "-"], Some(ruleset), timeout)?;
    if o.status != 0 {
        return Err(NetnsError::Nft {
            status: o.status,
            stderr: o.stderr.trim().to_owned(),
        });
    }
    Ok(())
}

/// The comment of `table inet <table>` in the current namespace:
/// `Ok(None)` when there is no such table. Text, not `-j`: nft 1.0.6's JSON
/// output omits table comments.
fn read_table_comment(
    nft: &Path,
    table: &str,
    timeout: Duration,
) -> Result<Option<String>, NetnsError> {
    let o = run_nft(nft, &["list", "table", "inet", table], None, timeout)?;
    if o.status != 0 {
        if o.stderr.contains("No such file or directory") {
            return Ok(None);
        }
        return Err(NetnsError::Nft {
            status: o.status,
            stderr: o.stderr.trim().to_owned(),
        });
    }
    Ok(Some(
        o.stdout
            .lines()
            .map(str::trim)
            .find_map(|l| {
                l.strip_prefix("comment \"")
                    .and_then(|r| r.strip_suffix('"'))
            })
            .unwrap_or_default()
            .to_owned(),
    ))
}

/// The lock in the current namespace: `Ok(None)` = not locked;
/// `Ok(Some(None))` = a `clawker_lock` table whose comment is not ours
/// (replace it).
pub fn read_lock(nft: &Path, timeout: Duration) -> Result<Option<Option<LockState>>, NetnsError> {
    Ok(read_table_comment(nft, LOCK_TABLE, timeout)?.map(|c| parse_comment(LOCK_TAG, &c)))
}

/// The port guard in the current namespace, as its comment says.
pub fn read_port_guard(
    nft: &Path,
    timeout: Duration,
) -> Result<Option<Option<CpEndpoint>>, NetnsError> {
    Ok(read_table_comment(nft, PORT_TABLE, timeout)?
        .map(|c| parse_comment(PORT_TAG, &c).map(|s| s.cp)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn lock_comment_round_trips_through_the_parser() {
        let cp = CpEndpoint::new(vec![ip("10.240.1.1"), ip("fd00::1")], 7700);
        let l2 = vec!["eth0".to_string(), "eth1".to_string()];
        let st = parse_comment(LOCK_TAG, &lock_comment(&cp, &l2)).unwrap();
        assert_eq!(
            st,
            LockState {
                cp: cp.clone(),
                l2_devices: l2
            }
        );
        let pg = parse_comment(PORT_TAG, &port_comment(&cp)).unwrap();
        assert_eq!(pg.cp, cp);
        assert!(parse_comment(LOCK_TAG, "something else").is_none());
        assert!(parse_comment(LOCK_TAG, "clawker-lock v1 cp=not-an-ip port=1").is_none());
        assert!(parse_comment(PORT_TAG, &lock_comment(&cp, &[])).is_none());
    }

    #[test]
    fn endpoint_validation_canonicalises_and_refuses_unusable_values() {
        let s = CpEndpoint::new(vec![ip("::ffff:10.240.1.1"), ip("10.240.1.1")], 7700)
            .validated()
            .unwrap();
        assert_eq!(
            s.cp_ips,
            vec![ip("10.240.1.1")],
            "mapped v4 folded, deduplicated"
        );
        for bad in ["0.0.0.0", "127.0.0.1", "::1", "224.0.0.1", "::"] {
            assert!(
                CpEndpoint::new(vec![ip(bad)], 7700).validated().is_err(),
                "{bad}"
            );
        }
        assert!(
            CpEndpoint::new(vec![ip("10.0.0.1")], 0)
                .validated()
                .is_err()
        );
        assert!(CpEndpoint::new(vec![], 7700).validated().is_err());
    }

    #[test]
    fn interface_names_outside_the_alphabet_are_refused() {
        assert!(!valid_ifname("eth0\" accept"));
        assert!(!valid_ifname(""));
        assert!(!valid_ifname("a-very-long-name-x"));
        assert!(valid_ifname("eth0") && valid_ifname("br-0123456789ab"));
    }

    #[test]
    fn lock_ruleset_allows_only_the_cp_session_and_has_no_stateful_accept() {
        let r = render_lock(
            &CpEndpoint::new(vec![ip("10.213.0.1")], 7700),
            &["eth0".into()],
        );
        assert!(
            r.contains("ip saddr 10.213.0.1 tcp dport 7700 accept"),
            "{r}"
        );
        assert!(
            r.contains("ip daddr 10.213.0.1 tcp sport 7700 tcp flags & (syn | ack) != syn accept")
        );
        assert!(r.contains("hook egress device \"eth0\""));
        assert!(r.contains("reject with tcp reset"));
        assert!(!r.contains("ct state"), "no established-accept: {r}");
        assert!(!r.contains("nd-neighbor"), "no v6 CP, no ND: {r}");
        let v6 = render_lock(&CpEndpoint::new(vec![ip("fd00:10:240:1::1")], 7700), &[]);
        assert!(v6.contains("ip6 saddr fd00:10:240:1::1 tcp dport 7700 accept"));
        assert!(v6.contains("nd-neighbor-solicit"));
        assert!(
            !v6.contains("table netdev clawker_lock_l2 {\n"),
            "no devices, no l2 table"
        );
    }

    #[test]
    fn port_guard_accepts_the_cp_addresses_then_drops_the_port() {
        let r = render_port_guard(&CpEndpoint::new(
            vec![ip("10.213.0.1"), ip("10.213.1.1")],
            7700,
        ));
        let a = r.find("ip saddr 10.213.0.1 tcp dport 7700 accept").unwrap();
        let b = r.find("ip saddr 10.213.1.1 tcp dport 7700 accept").unwrap();
        let d = r.find("tcp dport 7700 drop").unwrap();
        assert!(a < d && b < d, "{r}");
        assert!(r.contains("policy accept"), "only the port is guarded: {r}");
    }
}
