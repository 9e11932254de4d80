//! Two small hand-written netlink requests that `nft` cannot make, run in
//! the *calling thread's* network namespace (call them inside
//! [`NetNs::run`](super::NetNs::run)):
//!
//! - conntrack flush: `NETLINK_NETFILTER`, `IPCTNL_MSG_CT_DELETE` with an
//!   `nfgenmsg` of family `AF_UNSPEC`, version 0 and no attributes, which
//!   flushes the namespace's whole table, IPv4 and IPv6 (`conntrack -F`).
//! - socket kill: `NETLINK_SOCK_DIAG`, dump TCP sockets and `SOCK_DESTROY`
//!   each one except the kept session (`ss -K`). The owner gets
//!   `ECONNABORTED` at once, even when blocked in `read()` on an idle
//!   connection — which no firewall rule can do. Needs
//!   `CONFIG_INET_DIAG_DESTROY` (Debian's kernels have it); without it the
//!   kernel answers `EOPNOTSUPP` → [`NetnsError::Unsupported`].
//!
//! Fixed formats, about 0.3 ms (flush) and 0.6 ms (kill) per call.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::NetnsError;

const NLMSG_HDRLEN: usize = 16;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;

const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;

// TCP states (include/net/tcp_states.h).
const TCP_ESTABLISHED: u32 = 1;
const TCP_SYN_SENT: u32 = 2;
const TCP_SYN_RECV: u32 = 3;
const TCP_FIN_WAIT1: u32 = 4;
const TCP_FIN_WAIT2: u32 = 5;
const TCP_CLOSE_WAIT: u32 = 8;
const TCP_LAST_ACK: u32 = 9;
const TCP_CLOSING: u32 = 11;
/// Every state with a live peer. Not LISTEN (clawkerd's listener and
/// Docker's embedded DNS stay), not TIME_WAIT/CLOSE.
const KILL_STATES: u32 = 1 << TCP_ESTABLISHED
    | 1 << TCP_SYN_SENT
    | 1 << TCP_SYN_RECV
    | 1 << TCP_FIN_WAIT1
    | 1 << TCP_FIN_WAIT2
    | 1 << TCP_CLOSE_WAIT
    | 1 << TCP_LAST_ACK
    | 1 << TCP_CLOSING;

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(off..off + 2)?.try_into().ok()?))
}

struct Nl {
    fd: OwnedFd,
    seq: u32,
}

impl Nl {
    fn open(proto: i32) -> Result<Self, NetnsError> {
        // SAFETY: plain socket(2); the fd is owned right away.
        let raw =
            unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, proto) };
        if raw < 0 {
            return Err(NetnsError::io(
                "netlink socket",
                std::io::Error::last_os_error(),
            ));
        }
        // SAFETY: `raw` is a fresh, valid fd nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // Bounded receive: a kernel that never answers must not hang a
        // containment step.
        let tv = libc::timeval {
            tv_sec: 5,
            tv_usec: 0,
        };
        // SAFETY: setsockopt with a valid timeval of the stated size.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as u32,
            );
        }
        Ok(Self { fd, seq: 1 })
    }

    fn send(&mut self, ty: u16, flags: u16, payload: &[u8]) -> Result<u32, NetnsError> {
        self.seq += 1;
        let len = NLMSG_HDRLEN + payload.len();
        let mut m = Vec::with_capacity(len);
        m.extend_from_slice(&(len as u32).to_ne_bytes());
        m.extend_from_slice(&ty.to_ne_bytes());
        m.extend_from_slice(&flags.to_ne_bytes());
        m.extend_from_slice(&self.seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_pid: kernel assigns
        m.extend_from_slice(payload);
        // SAFETY: an all-zero sockaddr_nl is valid (the kernel address).
        let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        sa.nl_family = libc::AF_NETLINK as u16;
        // SAFETY: buffer and sockaddr are valid for the given lengths.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                m.as_ptr() as *const libc::c_void,
                m.len(),
                0,
                &sa as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if n < 0 {
            return Err(NetnsError::io(
                "netlink send",
                std::io::Error::last_os_error(),
            ));
        }
        Ok(self.seq)
    }

    /// Reads messages for `seq` until its ACK / NLMSG_DONE, calling `on_msg`
    /// for each data message. Returns the errno of an NLMSG_ERROR (0 = ack).
    fn recv_until_done(
        &mut self,
        seq: u32,
        mut on_msg: impl FnMut(u16, &[u8]),
    ) -> Result<i32, NetnsError> {
        let truncated = || NetnsError::Netlink("truncated netlink message".into());
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            // SAFETY: buf is valid for its length.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr() as *mut libc::c_void,
                    buf.len(),
                    0,
                )
            };
            if n < 0 {
                return Err(NetnsError::io(
                    "netlink recv",
                    std::io::Error::last_os_error(),
                ));
            }
            let n = n as usize;
            let mut off = 0usize;
            while off + NLMSG_HDRLEN <= n {
                let len = u32_at(&buf, off).ok_or_else(truncated)? as usize;
                let ty = u16_at(&buf, off + 4).ok_or_else(truncated)?;
                let mseq = u32_at(&buf, off + 8).ok_or_else(truncated)?;
                if len < NLMSG_HDRLEN || off + len > n {
                    return Err(truncated());
                }
                let body = &buf[off + NLMSG_HDRLEN..off + len];
                if mseq == seq {
                    match ty {
                        NLMSG_ERROR => {
                            let e = u32_at(body, 0).ok_or_else(truncated)? as i32;
                            return Ok(-e);
                        }
                        NLMSG_DONE => return Ok(0),
                        _ => on_msg(ty, body),
                    }
                }
                off += (len + 3) & !3;
            }
        }
    }
}

/// Flushes the conntrack table of the current network namespace (IPv4 and
/// IPv6). Only ever called inside a container's namespace: the host's
/// table is never flushed (the host guard's `ct direction` depends on it).
pub fn flush_conntrack_here() -> Result<(), NetnsError> {
    let mut nl = Nl::open(libc::NETLINK_NETFILTER)?;
    // struct nfgenmsg { u8 family = AF_UNSPEC; u8 version = 0; be16 res_id = 0 }
    let payload = [libc::AF_UNSPEC as u8, 0, 0, 0];
    let seq = nl.send(
        NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_DELETE,
        NLM_F_REQUEST | NLM_F_ACK,
        &payload,
    )?;
    match nl.recv_until_done(seq, |_, _| {})? {
        0 => Ok(()),
        e => Err(NetnsError::io(
            "ctnetlink flush",
            std::io::Error::from_raw_os_error(e),
        )),
    }
}

/// One TCP socket as sock_diag reports it (addresses as seen in the netns).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpSock {
    pub family: u8,
    pub local: (IpAddr, u16),
    pub remote: (IpAddr, u16),
    /// `inet_diag_sockid` verbatim (SOCK_DESTROY needs ports, addresses,
    /// interface and cookie exactly as dumped).
    raw_id: [u8; 48],
}

fn parse_addr(family: u8, b: &[u8]) -> Option<IpAddr> {
    if family == libc::AF_INET as u8 {
        let a: [u8; 4] = b.get(..4)?.try_into().ok()?;
        Some(IpAddr::V4(Ipv4Addr::from(a)))
    } else {
        let a: [u8; 16] = b.get(..16)?.try_into().ok()?;
        // v4-mapped (a dual-stack socket talking IPv4) → report as IPv4.
        Some(IpAddr::V6(Ipv6Addr::from(a)).to_canonical())
    }
}

fn diag_req(family: u8, states: u32, id: &[u8; 48]) -> Vec<u8> {
    // struct inet_diag_req_v2 { u8 family, protocol, ext, pad; u32 states; inet_diag_sockid id; }
    let mut p = vec![family, libc::IPPROTO_TCP as u8, 0, 0];
    p.extend_from_slice(&states.to_ne_bytes());
    p.extend_from_slice(id);
    p
}

fn parse_sock(body: &[u8]) -> Option<TcpSock> {
    // struct inet_diag_msg { u8 family, state, timer, retrans; inet_diag_sockid id; ... }
    let family = *body.first()?;
    let raw_id: [u8; 48] = body.get(4..52)?.try_into().ok()?;
    let sport = u16::from_be_bytes([raw_id[0], raw_id[1]]);
    let dport = u16::from_be_bytes([raw_id[2], raw_id[3]]);
    Some(TcpSock {
        family,
        local: (parse_addr(family, &raw_id[4..20])?, sport),
        remote: (parse_addr(family, &raw_id[20..36])?, dport),
        raw_id,
    })
}

/// Lists TCP sockets (IPv4 and IPv6) with a live peer in the current netns.
pub fn tcp_sockets_here() -> Result<Vec<TcpSock>, NetnsError> {
    let mut nl = Nl::open(libc::NETLINK_SOCK_DIAG)?;
    let mut out = Vec::new();
    for fam in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        let seq = nl.send(
            SOCK_DIAG_BY_FAMILY,
            NLM_F_REQUEST | NLM_F_DUMP,
            &diag_req(fam, KILL_STATES, &[0; 48]),
        )?;
        let e = nl.recv_until_done(seq, |ty, body| {
            if ty == SOCK_DIAG_BY_FAMILY
                && let Some(s) = parse_sock(body)
            {
                out.push(s);
            }
        })?;
        if e != 0 {
            return Err(NetnsError::io(
                "sock_diag dump",
                std::io::Error::from_raw_os_error(e),
            ));
        }
    }
    Ok(out)
}

/// What [`kill_tcp_sockets_here`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct KillReport {
    pub destroyed: usize,
    pub kept: usize,
    /// Sockets that vanished between dump and destroy (ENOENT): harmless.
    pub gone: usize,
}

/// `SOCK_DESTROY`s every TCP socket with a live peer in the current netns
/// except those `keep` returns true for (the CP's session).
pub fn kill_tcp_sockets_here(keep: impl Fn(&TcpSock) -> bool) -> Result<KillReport, NetnsError> {
    let socks = tcp_sockets_here()?;
    let mut nl = Nl::open(libc::NETLINK_SOCK_DIAG)?;
    let mut r = KillReport::default();
    for s in socks {
        if keep(&s) {
            r.kept += 1;
            continue;
        }
        let seq = nl.send(
            SOCK_DESTROY,
            NLM_F_REQUEST | NLM_F_ACK,
            &diag_req(s.family, KILL_STATES, &s.raw_id),
        )?;
        match nl.recv_until_done(seq, |_, _| {})? {
            0 => r.destroyed += 1,
            libc::ENOENT => r.gone += 1,
            libc::EOPNOTSUPP => {
                return Err(NetnsError::Unsupported(
                    "SOCK_DESTROY (kernel without CONFIG_INET_DIAG_DESTROY)".into(),
                ));
            }
            e => {
                return Err(NetnsError::io(
                    "SOCK_DESTROY",
                    std::io::Error::from_raw_os_error(e),
                ));
            }
        }
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sock_diag_messages_parse_and_truncated_ones_are_skipped() {
        let mut body = vec![libc::AF_INET as u8, 1, 0, 0];
        let mut id = [0u8; 48];
        id[0..2].copy_from_slice(&7700u16.to_be_bytes());
        id[2..4].copy_from_slice(&40000u16.to_be_bytes());
        id[4..8].copy_from_slice(&[10, 213, 0, 2]);
        id[20..24].copy_from_slice(&[10, 213, 0, 1]);
        body.extend_from_slice(&id);
        let s = parse_sock(&body).unwrap();
        assert_eq!(s.local, ("10.213.0.2".parse().unwrap(), 7700));
        assert_eq!(s.remote, ("10.213.0.1".parse().unwrap(), 40000));
        assert!(parse_sock(&body[..30]).is_none());
        assert!(parse_sock(&[]).is_none());
    }
}
