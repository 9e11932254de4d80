//! The containment policy (`[containment]` in cp.toml) and the mapping from
//! a trigger to its ladder of actions.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::events::{ContainmentAction, UntrustedReason};

/// What fires a rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TriggerKind {
    /// `AgentUntrusted` (optionally only for some reasons).
    Untrusted,
    /// `InitFailed`.
    InitFailed,
    /// `SessionFailed` `count` times within `window_secs` for one container.
    SessionFailed,
}

/// One rule: a trigger and the ladder it runs. TOML:
///
/// ```toml
/// [[containment.rules]]
/// on = "untrusted"
/// reasons = ["cert_thumbprint_mismatch", "cert_invalid"]   # empty = any
/// actions = ["alert", "isolate", "lock"]
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub on: TriggerKind,
    /// For `untrusted`: which reasons match (empty = every reason).
    #[serde(default)]
    pub reasons: Vec<UntrustedReason>,
    /// For `session_failed`: failures needed within the window.
    #[serde(default = "default_failures")]
    pub count: u32,
    /// For `session_failed`: the sliding window.
    #[serde(default = "default_window_secs")]
    pub window_secs: u64,
    /// Run in order; each step is reported on its own.
    pub actions: Vec<ContainmentAction>,
}

fn default_failures() -> u32 {
    5
}
fn default_window_secs() -> u64 {
    60
}

/// Containment policy. `Default` is the safe policy: every untrusted agent
/// (any reason) is alerted on and isolated; nothing else fires.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ContainmentConfig {
    /// Master switch (the actor still runs, but ignores triggers).
    pub enabled: bool,
    /// Log and publish `dry_run` outcomes, change nothing.
    pub dry_run: bool,
    /// Bound on one `lock` (entering the namespace, `nft`, conntrack flush,
    /// socket kill).
    pub lock_timeout_secs: u32,
    /// Grace period `stop` gives the container before SIGKILL.
    pub stop_timeout_secs: u32,
    pub rules: Vec<Rule>,
}

impl Default for ContainmentConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            dry_run: false,
            lock_timeout_secs: 15,
            stop_timeout_secs: 10,
            rules: vec![Rule {
                on: TriggerKind::Untrusted,
                reasons: Vec::new(),
                count: default_failures(),
                window_secs: default_window_secs(),
                actions: vec![ContainmentAction::Alert, ContainmentAction::Isolate],
            }],
        }
    }
}

/// A trigger as it happened (what the `trigger` field of the event says).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    Untrusted(UntrustedReason),
    InitFailed,
    SessionFailedRepeated { count: u32 },
}

impl std::fmt::Display for Trigger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Trigger::Untrusted(r) => write!(f, "untrusted:{}", r.as_str()),
            Trigger::InitFailed => f.write_str("init_failed"),
            Trigger::SessionFailedRepeated { count } => {
                write!(f, "session_failed_repeated:{count}")
            }
        }
    }
}

impl ContainmentConfig {
    /// The ladder a trigger runs: actions of every matching rule, in rule
    /// order, without repeats.
    pub fn ladder(&self, trigger: Trigger) -> Vec<ContainmentAction> {
        let mut out: Vec<ContainmentAction> = Vec::new();
        for rule in &self.rules {
            let hit = match (rule.on, trigger) {
                (TriggerKind::Untrusted, Trigger::Untrusted(r)) => {
                    rule.reasons.is_empty() || rule.reasons.contains(&r)
                }
                (TriggerKind::InitFailed, Trigger::InitFailed) => true,
                (TriggerKind::SessionFailed, Trigger::SessionFailedRepeated { count }) => {
                    count >= rule.count.max(1)
                }
                _ => false,
            };
            if hit {
                for a in &rule.actions {
                    if !out.contains(a) {
                        out.push(*a);
                    }
                }
            }
        }
        out
    }

    /// The smallest `session_failed` threshold and its window, if any rule
    /// listens for repeated session failures.
    pub(super) fn session_failed_threshold(&self) -> Option<(u32, Duration)> {
        self.rules
            .iter()
            .filter(|r| r.on == TriggerKind::SessionFailed && !r.actions.is_empty())
            .map(|r| (r.count.max(1), Duration::from_secs(r.window_secs.max(1))))
            .min_by_key(|(c, _)| *c)
    }
}
