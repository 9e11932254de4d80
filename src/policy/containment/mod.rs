//! Containment: the policy actor that acts on untrusted (or failing)
//! agents.
//!
//! Why this exists at all: the CP never drops a session for identity
//! reasons (asymmetric trust, DESIGN §1), precisely so that *this* actor can
//! still reach a bad agent. The dialer publishes `AgentUntrusted`; this
//! actor maps triggers to an ordered **ladder** of actions and runs it:
//!
//! | action    | what it does                                                     |
//! |-----------|------------------------------------------------------------------|
//! | `alert`   | structured `warn!` + event, changes nothing                      |
//! | `isolate` | onto the quarantine network (internal, host-guarded), off all others; the session re-dials there |
//! | `lock`    | from outside, in the container's network namespace: only the CP's session passes, conntrack flushed, other TCP connections destroyed |
//! | `stop`    | `docker stop`                                                    |
//! | `kill`    | `docker kill`                                                    |
//!
//! Every step is idempotent (isolate on an isolated container is
//! `already_applied`, kill on a dead one `already_stopped`) and publishes one
//! [`ContainmentApplied`](crate::events::ContainmentApplied). Idempotency is
//! what makes containment survive a CP restart and a container restart
//! without spam: every new session re-publishes `AgentUntrusted`, the
//! ladder runs again, steps still in force report so, and a lock lost with
//! the old network namespace is installed again.
//!
//! Nothing lifts containment on its own: `clawker agent release|unlock`
//! (the admin API → [`Containment::lift`]) does, for an agent its current
//! session trusts, publishing `policy.containment.released`.
//!
//! Side effects sit behind two narrow seams so the ladder is testable
//! without an engine or a session: [`ContainmentOps`](crate::runtime::ContainmentOps)
//! (the container runtime, which also owns the namespace rules) and
//! [`SessionControl`](crate::session::control::SessionControl) (trust
//! verdict, "the container moved"). Ladders and lifts for one container run
//! one at a time, in arrival order; different containers are contained
//! concurrently.
//!
//! - [`config`]: the policy (`[containment]` in cp.toml) and trigger → ladder;
//! - [`ladder`]: [`Containment`]: running one ladder step by step, and
//!   lifting a step;
//! - [`actor`]: the supervised subscriber that fires ladders.

pub mod actor;
pub mod config;
pub mod ladder;

pub use actor::ContainmentActor;
pub use config::{ContainmentConfig, Rule, Trigger, TriggerKind};
pub use ladder::{Containment, Lift, LiftError};
