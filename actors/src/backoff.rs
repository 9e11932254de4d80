//! The one backoff policy of the workspace: exponential ceilings
//! (`initial`, ×2, … capped at `max`), either used as-is (supervisor
//! restarts, reconnect loops) or with full jitter (each delay uniform in
//! `[0, ceiling)`, so many clients retrying together spread out).

use std::time::Duration;

/// An exponential backoff policy. `Copy`, so it can sit in configs; the
/// per-retry position lives in [`Retry`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Ceiling of the first delay.
    pub initial: Duration,
    /// Upper bound of every ceiling.
    pub max: Duration,
    /// Full jitter: each delay is uniform in `[0, ceiling)`.
    pub jitter: bool,
}

impl Backoff {
    /// Deterministic doubling from `initial` up to `max`.
    pub const fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            jitter: false,
        }
    }

    /// The same ceilings, with full jitter.
    pub const fn full_jitter(mut self) -> Self {
        self.jitter = true;
        self
    }

    /// Ceiling for retry number `attempt` (1-based): `initial * 2^(attempt-1)`,
    /// capped at `max`.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u32
            .checked_shl(attempt.saturating_sub(1))
            .unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// The delay before retry number `attempt` (1-based).
    pub fn delay(&self, attempt: u32) -> Duration {
        let c = self.ceiling(attempt);
        if !self.jitter || c.is_zero() {
            return c;
        }
        let nanos = u64::try_from(c.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(rand::random_range(0..nanos))
    }

    /// A fresh position in this policy.
    pub fn retry(self) -> Retry {
        Retry {
            policy: self,
            attempt: 0,
        }
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(Duration::from_millis(10), Duration::from_secs(5))
    }
}

/// Where a retry loop stands in its [`Backoff`].
#[derive(Debug, Clone)]
pub struct Retry {
    policy: Backoff,
    attempt: u32,
}

impl Retry {
    /// The delay before the next retry; advances.
    pub fn next_delay(&mut self) -> Duration {
        self.attempt = self.attempt.saturating_add(1);
        self.policy.delay(self.attempt)
    }

    /// The ceiling the next delay will be drawn under.
    pub fn next_ceiling(&self) -> Duration {
        self.policy.ceiling(self.attempt.saturating_add(1))
    }

    /// Back to the first delay (after a success).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// Retries so far since the last reset.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    pub fn policy(&self) -> Backoff {
        self.policy
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceilings_double_to_the_cap() {
        let b = Backoff::new(Duration::from_millis(10), Duration::from_millis(50));
        let d: Vec<u64> = (1..=5).map(|a| b.delay(a).as_millis() as u64).collect();
        assert_eq!(d, vec![10, 20, 40, 50, 50]);
        assert_eq!(b.delay(400), Duration::from_millis(50));
    }

    #[test]
    fn full_jitter_stays_under_the_ceiling_and_retry_resets() {
        let mut r = Backoff::new(Duration::from_millis(500), Duration::from_secs(10))
            .full_jitter()
            .retry();
        let mut ceilings = vec![];
        for _ in 0..7 {
            let c = r.next_ceiling();
            assert!(r.next_delay() < c);
            ceilings.push(c.as_millis());
        }
        assert_eq!(ceilings, vec![500, 1000, 2000, 4000, 8000, 10000, 10000]);
        r.reset();
        assert_eq!(r.next_ceiling(), Duration::from_millis(500));
        assert_eq!(
            Backoff::new(Duration::ZERO, Duration::ZERO)
                .full_jitter()
                .delay(1),
            Duration::ZERO
        );
    }
}
