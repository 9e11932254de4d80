//! Containment: the policy actor that acts on untrusted (or failing)
//! agents.
//!
//! Why this exists at all: the CP never drops a session for identity
//! reasons (asymmetric trust, DESIGN §1), precisely so that *this* actor can
//! still reach a bad agent. The dialer publishes `AgentUntrusted`; this
//! actor maps triggers to an ordered **ladder** of actions and runs it:
//!
//! | action    | what it does                                                    |
//! |-----------|-----------------------------------------------------------------|
//! | `alert`   | structured `warn!` + event, changes nothing                     |
//! | `isolate` | disconnect from every Docker network except the kept one        |
//! | `lock`    | over the open session, as root: drop all egress except the CP   |
//! | `stop`    | `docker stop`                                                   |
//! | `kill`    | `docker kill`                                                   |
//!
//! Every step is idempotent (isolate on an isolated container is
//! `already_applied`, kill on a dead one `already_stopped`) and publishes one
//! [`ContainmentApplied`]. Idempotency is what makes containment survive a CP
//! restart without spam: every new session re-publishes `AgentUntrusted`,
//! the ladder runs again, and steps already in force report so instead of
//! acting twice.
//!
//! Side effects sit behind two narrow seams so the ladder is testable
//! without an engine or a session: [`ContainmentOps`](crate::runtime::ContainmentOps)
//! (the container runtime) and [`SessionCommands`](crate::session::commands::SessionCommands)
//! (run a root shell command over the agent's session). Ladders for one
//! container run one at a time, in trigger order; different containers are
//! contained concurrently.
//!
//! - [`config`]: the policy (`[containment]` in cp.toml) and trigger → ladder;
//! - [`ladder`]: running one ladder, step by step, and the lock script;
//! - [`actor`]: the supervised subscriber that fires ladders.

pub mod actor;
pub mod config;
pub mod ladder;

pub use actor::ContainmentActor;
pub use config::{ContainmentConfig, Rule, Trigger, TriggerKind};
pub use ladder::{Containment, LOCK_ALREADY, LOCK_SCRIPT};
