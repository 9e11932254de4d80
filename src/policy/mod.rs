//! Policy: the subscriber actors that act on what the bus reports.
//!
//! The session machinery holds no policy (asymmetric trust: it never drops
//! a session for identity reasons); everything that *reacts* lives here, each piece a
//! supervised child of the `policy` supervisor that talks to the rest of
//! the CP only through the bus and narrow seams:
//!
//! - [`containment`]: trigger → action ladder (alert, isolate, lock, stop,
//!   kill) for untrusted or failing agents; the runtime behind
//!   [`crate::runtime::ContainmentOps`], sessions through
//!   [`crate::session::control`]. Publishes
//!   `ContainmentApplied`.
//! - [`audit`]: every event as one JSON line in an append-only, rotated
//!   log written on a dedicated thread; [`audit::read_last`] reads it back.
//! - [`metrics`]: Prometheus recorder fed by a metrics actor (events, bus
//!   stats, worldview gauges, supervisor exits).
//! - [`health`]: the loopback HTTP endpoint: `/metrics`, `/healthz`,
//!   `/readyz` ([`health::serve_metrics`], [`health::Readiness`]).
//! - [`webhook`]: forwards selected events as JSON POSTs (used by the
//!   `webhook_forwarder` example).

pub mod audit;
pub mod containment;
pub mod health;
pub mod metrics;
pub mod webhook;
