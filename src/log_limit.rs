//! Rate-limited logging for lines a peer can cause at will.
//!
//! A refused TLS handshake, a connection over a cap, a bad token request:
//! each is worth a log line, but a hostile neighbour can cause thousands a
//! second, and one line per event turns a connection flood into a disk
//! flood (the issue that introduced this measured 210 KB/s of clawkerd log
//! from 2,000 reconnecting connections). So every such line goes through a
//! token bucket per event kind: a burst of [`BURST`] lines, then
//! [`PER_SEC`] a second. What the bucket drops is counted, and the count is
//! reported in one summary line per kind (`event = "log_suppressed"`) when
//! a listener's periodic [`flush`] runs (every 10 s), so nothing is
//! silently lost. The summary is not written when the kind may log again:
//! under a sustained flood that nearly doubles the line rate (measured in
//! the CI flood: 20 summary lines next to 36 rejection lines in 8 s; with
//! flush-only summaries, 2). The full flood (`scripts/flood.sh`) grows the
//! attacked clawkerd's log by ~0.7 KB/s.
//!
//! Kinds are `&'static str` event names, so the table is bounded by the
//! code, not by what peers send.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Lines a kind may log at once after a quiet period.
pub const BURST: u32 = 10;
/// Sustained lines per second per kind.
pub const PER_SEC: u32 = 1;

/// A token bucket per event kind, with suppressed counts.
#[derive(Debug)]
pub struct LogLimiter {
    burst: f64,
    per_sec: f64,
    buckets: Mutex<HashMap<&'static str, Bucket>>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    refilled: Instant,
    suppressed: u64,
    /// When the first of the `suppressed` lines was dropped.
    suppressed_since: Option<Instant>,
}

/// What a caller should do with one line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Log it; `suppressed` lines of this kind were dropped since the last
    /// flush (still pending: the next flush reports them).
    Log { suppressed: u64 },
    /// Drop it (counted).
    Suppress,
}

/// One kind's dropped lines, reported by a flush.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Suppressed {
    pub kind: &'static str,
    pub count: u64,
    pub over: Duration,
}

impl LogLimiter {
    pub fn new(burst: u32, per_sec: u32) -> Self {
        Self {
            burst: f64::from(burst.max(1)),
            per_sec: f64::from(per_sec),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    fn buckets(&self) -> std::sync::MutexGuard<'_, HashMap<&'static str, Bucket>> {
        // Critical sections never panic; recover rather than cascade.
        self.buckets.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The verdict for one line of `kind` at `now` (injectable clock).
    pub fn admit_at(&self, kind: &'static str, now: Instant) -> Verdict {
        let mut buckets = self.buckets();
        let b = buckets.entry(kind).or_insert(Bucket {
            tokens: self.burst,
            refilled: now,
            suppressed: 0,
            suppressed_since: None,
        });
        let elapsed = now.saturating_duration_since(b.refilled).as_secs_f64();
        b.tokens = (b.tokens + elapsed * self.per_sec).min(self.burst);
        b.refilled = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Verdict::Log {
                suppressed: b.suppressed,
            }
        } else {
            b.suppressed += 1;
            b.suppressed_since.get_or_insert(now);
            Verdict::Suppress
        }
    }

    /// Takes every kind's suppressed count (those with any), for a summary.
    pub fn take_suppressed_at(&self, now: Instant) -> Vec<Suppressed> {
        let mut out: Vec<Suppressed> = self
            .buckets()
            .iter_mut()
            .filter(|(_, b)| b.suppressed > 0)
            .map(|(kind, b)| {
                let over = b
                    .suppressed_since
                    .take()
                    .map(|t| now.saturating_duration_since(t))
                    .unwrap_or_default();
                Suppressed {
                    kind,
                    count: std::mem::take(&mut b.suppressed),
                    over,
                }
            })
            .collect();
        out.sort_by_key(|s| s.kind);
        out
    }

    /// Whether to log one line of `kind` now (what was suppressed is
    /// reported by the next [`LogLimiter::flush`]).
    pub fn admit(&self, kind: &'static str) -> bool {
        matches!(self.admit_at(kind, Instant::now()), Verdict::Log { .. })
    }

    /// Logs one summary line per kind with suppressed lines, and resets
    /// their counts.
    pub fn flush(&self) {
        for s in self.take_suppressed_at(Instant::now()) {
            summary(s.kind, s.count, s.over);
        }
    }
}

fn summary(kind: &'static str, suppressed: u64, over: Duration) {
    tracing::warn!(
        event = "log_suppressed",
        kind,
        suppressed,
        over_ms = over.as_millis() as u64,
        "similar lines suppressed by the log rate limit"
    );
}

static REJECTIONS: OnceLock<LogLimiter> = OnceLock::new();

/// Sets the process-wide limiter's rates; only before its first use (a
/// daemon's boot). Returns whether they were applied.
pub fn configure(burst: u32, per_sec: u32) -> bool {
    REJECTIONS.set(LogLimiter::new(burst, per_sec)).is_ok()
}

/// The process-wide limiter for rejection lines (listeners, the token
/// endpoint, the auth layers): [`BURST`] / [`PER_SEC`] unless configured.
pub fn rejections() -> &'static LogLimiter {
    REJECTIONS.get_or_init(|| LogLimiter::new(BURST, PER_SEC))
}

/// `rejections().admit(kind)`.
pub fn admit(kind: &'static str) -> bool {
    rejections().admit(kind)
}

/// `rejections().flush()`; listeners call it periodically.
pub fn flush() {
    rejections().flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_passes_then_one_line_per_refill() {
        let l = LogLimiter::new(3, 1);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(l.admit_at("k", t0), Verdict::Log { suppressed: 0 });
        }
        for _ in 0..100 {
            assert_eq!(l.admit_at("k", t0), Verdict::Suppress);
        }
        // Half a token later: still nothing.
        let t = t0 + Duration::from_millis(500);
        assert_eq!(l.admit_at("k", t), Verdict::Suppress);
        // A full token: one line; the dropped count stays pending for the
        // next flush.
        let t = t0 + Duration::from_millis(1000);
        assert_eq!(l.admit_at("k", t), Verdict::Log { suppressed: 101 });
        assert_eq!(l.admit_at("k", t), Verdict::Suppress);
        let flushed = l.take_suppressed_at(t);
        assert_eq!(flushed.len(), 1);
        assert_eq!(flushed[0].count, 102);
    }

    #[test]
    fn kinds_have_their_own_buckets() {
        let l = LogLimiter::new(1, 1);
        let t0 = Instant::now();
        assert_eq!(l.admit_at("a", t0), Verdict::Log { suppressed: 0 });
        assert_eq!(l.admit_at("a", t0), Verdict::Suppress);
        assert_eq!(l.admit_at("b", t0), Verdict::Log { suppressed: 0 });
    }

    #[test]
    fn flush_reports_and_resets_suppressed_counts() {
        let l = LogLimiter::new(1, 1);
        let t0 = Instant::now();
        l.admit_at("a", t0);
        for _ in 0..5 {
            l.admit_at("a", t0 + Duration::from_millis(100));
        }
        let got = l.take_suppressed_at(t0 + Duration::from_millis(600));
        assert_eq!(
            got,
            vec![Suppressed {
                kind: "a",
                count: 5,
                over: Duration::from_millis(500)
            }]
        );
        assert!(l.take_suppressed_at(t0 + Duration::from_secs(1)).is_empty());
        // The next admitted line reports nothing already flushed.
        assert_eq!(
            l.admit_at("a", t0 + Duration::from_secs(5)),
            Verdict::Log { suppressed: 0 }
        );
    }

    #[test]
    fn sustained_flood_logs_at_the_refill_rate() {
        let l = LogLimiter::new(BURST, PER_SEC);
        let t0 = Instant::now();
        let mut logged = 0;
        // 2,000 events a second for 60 s.
        for i in 0..120_000u64 {
            let t = t0 + Duration::from_micros(i * 500);
            if matches!(l.admit_at("flood", t), Verdict::Log { .. }) {
                logged += 1;
            }
        }
        assert!(
            (60..=BURST as usize + 61).contains(&logged),
            "logged {logged}"
        );
    }
}
