//! Concurrent-connection caps, global and per source IP.
//!
//! A [`Permit`] is taken right after `accept()` — before the TLS handshake,
//! which is the expensive part and the one a silent peer holds open — and
//! released when the connection is dropped, whatever ended it. Refusing
//! costs one lock and one `close()`.
//!
//! One source may be *reserved* (clawkerd reserves the CP's address):
//! its connections are neither refused nor counted, so no number of
//! neighbours can crowd the CP out of an agent's listener. The reservation
//! decides priority only; who the peer is remains the TLS handshake's
//! business.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("listener at its connection cap ({0})")]
    GlobalCap(usize),
    #[error("source at its per-source connection cap ({0})")]
    SourceCap(usize),
}

impl Refusal {
    /// Metric label.
    pub fn as_str(&self) -> &'static str {
        match self {
            Refusal::GlobalCap(_) => "global_cap",
            Refusal::SourceCap(_) => "source_cap",
        }
    }
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    by_source: HashMap<IpAddr, usize>,
}

/// The open-connection table of one listener.
#[derive(Debug)]
pub struct ConnLimiter {
    max: usize,
    per_source: usize,
    reserved: Option<IpAddr>,
    counts: Mutex<Counts>,
}

/// One admitted connection; dropping it frees its slots.
#[derive(Debug)]
pub struct Permit {
    limiter: Option<Arc<ConnLimiter>>,
    source: IpAddr,
}

/// IPv4-mapped IPv6 and plain IPv4 are one source.
fn canonical(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

impl ConnLimiter {
    pub fn new(max: usize, per_source: usize, reserved: Option<IpAddr>) -> Arc<Self> {
        Arc::new(Self {
            max: max.max(1),
            per_source: per_source.max(1),
            reserved: reserved.map(canonical),
            counts: Mutex::new(Counts::default()),
        })
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        // Critical sections never panic; recover rather than cascade.
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A slot for one more connection from `source`, or why not.
    pub fn try_acquire(self: &Arc<Self>, source: IpAddr) -> Result<Permit, Refusal> {
        let source = canonical(source);
        if self.reserved == Some(source) {
            return Ok(Permit {
                limiter: None,
                source,
            });
        }
        let mut c = self.counts();
        if c.total >= self.max {
            return Err(Refusal::GlobalCap(self.max));
        }
        let from_source = c.by_source.entry(source).or_insert(0);
        if *from_source >= self.per_source {
            return Err(Refusal::SourceCap(self.per_source));
        }
        *from_source += 1;
        c.total += 1;
        Ok(Permit {
            limiter: Some(self.clone()),
            source,
        })
    }

    /// Connections counted now (reserved ones excluded).
    pub fn open(&self) -> usize {
        self.counts().total
    }

    /// Connections counted now from `source`.
    pub fn open_from(&self, source: IpAddr) -> usize {
        self.counts()
            .by_source
            .get(&canonical(source))
            .copied()
            .unwrap_or(0)
    }

    /// Sources with at least one connection (the table stays this small:
    /// an entry goes with its last connection).
    pub fn sources(&self) -> usize {
        self.counts().by_source.len()
    }

    fn release(&self, source: IpAddr) {
        let mut c = self.counts();
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.by_source.get_mut(&source) {
            *n -= 1;
            if *n == 0 {
                c.by_source.remove(&source);
            }
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(l) = self.limiter.take() {
            l.release(self.source);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn per_source_cap_refuses_one_source_but_not_another() {
        let l = ConnLimiter::new(10, 2, None);
        let a1 = l.try_acquire(ip("10.0.0.1")).unwrap();
        let _a2 = l.try_acquire(ip("10.0.0.1")).unwrap();
        assert_eq!(
            l.try_acquire(ip("10.0.0.1")).unwrap_err(),
            Refusal::SourceCap(2)
        );
        let _b = l.try_acquire(ip("10.0.0.2")).unwrap();
        assert_eq!((l.open(), l.open_from(ip("10.0.0.1"))), (3, 2));
        drop(a1);
        assert!(l.try_acquire(ip("10.0.0.1")).is_ok());
    }

    #[test]
    fn global_cap_refuses_everyone_until_a_slot_frees() {
        let l = ConnLimiter::new(2, 2, None);
        let a = l.try_acquire(ip("10.0.0.1")).unwrap();
        let _b = l.try_acquire(ip("10.0.0.2")).unwrap();
        assert_eq!(
            l.try_acquire(ip("10.0.0.3")).unwrap_err(),
            Refusal::GlobalCap(2)
        );
        drop(a);
        assert!(l.try_acquire(ip("10.0.0.3")).is_ok());
    }

    #[test]
    fn the_reserved_source_is_never_refused_nor_counted() {
        let l = ConnLimiter::new(1, 1, Some(ip("10.0.0.1")));
        let _x = l.try_acquire(ip("10.0.0.9")).unwrap();
        let held: Vec<_> = (0..5)
            .map(|_| l.try_acquire(ip("10.0.0.1")).unwrap())
            .collect();
        assert_eq!(l.open(), 1);
        drop(held);
        assert_eq!(l.open(), 1);
    }

    #[test]
    fn mapped_ipv4_is_the_same_source_and_entries_go_with_their_last_connection() {
        let l = ConnLimiter::new(10, 1, None);
        let p = l.try_acquire(ip("10.0.0.1")).unwrap();
        assert!(l.try_acquire(ip("::ffff:10.0.0.1")).is_err());
        assert_eq!(l.sources(), 1);
        drop(p);
        assert_eq!((l.open(), l.sources()), (0, 0));
    }
}
