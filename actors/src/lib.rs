//! Reusable actor-model machinery on [actix]: a typed event bus, an
//! OTP-style supervisor with panic containment, and supervision-tree
//! logging. The crate knows nothing about the product that uses it.
//!
//! # Modules
//!
//! * `event` — [`Event`] (anything publishable, object safe so it can be
//!   carried type-erased) and [`Apply`] (projection hook: an event mutates
//!   the bus-owned state).
//! * `mailbox` — bounded drop-oldest subscriber mailbox with a dropped
//!   counter (internal).
//! * `bus` — [`EventBus`] (cheap-clone handle: non-blocking `publish`,
//!   `subscribe`, `subscribe_all`, `snapshot`, `stats`, `close`) and the
//!   [`BusActor`] that drains the publish queue in batches, applies
//!   projections in publish order and fans out to [`Subscription`]s.
//! * `link` — [`ChildLink`] / [`ExitHandle`] / [`ExitReason`]: how a child
//!   reports its exit (normal, error, or panic detected while unwinding).
//! * `panic` — a chained panic hook that captures panic messages for
//!   [`ExitReason::Panic`].
//! * `supervisor` — [`Supervisor`] actor, [`SupervisorSpec`], [`ChildSpec`],
//!   [`Restart`], [`Strategy`], [`Backoff`], [`Intensity`],
//!   [`SupervisorHandle`] (dynamic children, lookup, stop, tree) and
//!   [`ChildExit`] notifications.
//! * `tree` — [`TreeNode`] snapshot (serde `Serialize`, [`TreeNode::render`]
//!   to an indented text tree).
//!
//! # Event bus
//!
//! ```
//! use clawker_actors::{Apply, Event, EventBus};
//!
//! #[derive(Debug)]
//! struct ContainerStarted { id: String }
//! impl Event for ContainerStarted {
//!     fn name(&self) -> &'static str { "container_started" }
//! }
//! #[derive(Clone, Default)]
//! struct World { running: Vec<String> }
//! impl Apply<World> for ContainerStarted {
//!     fn apply(&self, w: &mut World) { w.running.push(self.id.clone()); }
//! }
//!
//! actix::System::new().block_on(async {
//!     let bus = EventBus::builder(World::default())
//!         .project::<ContainerStarted>() // feeds the projection
//!         .start();
//!     let mut sub = bus.subscribe::<ContainerStarted>().unwrap(); // typed
//!     let mut audit = bus.subscribe_all().unwrap(); // every event, erased
//!     assert!(bus.publish(ContainerStarted { id: "c1".into() })); // never blocks
//!     assert_eq!(sub.recv().await.unwrap().id, "c1"); // Arc<ContainerStarted>
//!     assert_eq!(audit.recv().await.unwrap().name(), "container_started");
//!     assert_eq!(bus.snapshot().await.unwrap().running, vec!["c1"]);
//!     println!("{:?}", bus.stats());
//!     bus.close(); // ends every subscription stream
//! });
//! ```
//!
//! A subscriber actor typically does
//! `ctx.add_stream(bus.subscribe::<E>()?)` and implements
//! `StreamHandler<Arc<E>>`. A full publish queue makes `publish` return
//! `false` (counted); a slow subscriber loses its *oldest* events (counted
//! per subscriber) and never slows the others. Start the bus before the
//! supervision tree and hand clones of the handle to the children: the bus
//! actor contains filter/projection panics itself and does not need to be
//! restarted.
//!
//! # Supervision
//!
//! Every child is started by a closure that receives a [`ChildLink`] and must
//! tie it to the actor's lifetime with [`ChildLink::attach`] inside
//! `Actor::create`; that is how the supervisor learns about normal exits,
//! error exits ([`ExitHandle::fail`] then `ctx.stop()`) and panics (in
//! handlers or in `started()`), which actix alone does not report.
//!
//! ```
//! use std::time::Duration;
//! use actix::prelude::*;
//! use clawker_actors::{ChildSpec, ExitHandle, Restart, Strategy, Supervisor, SupervisorSpec};
//!
//! struct Session { exit: ExitHandle }
//! impl Actor for Session { type Context = Context<Self>; }
//!
//! fn session_spec(container_id: &str) -> ChildSpec {
//!     ChildSpec::worker("session", |link| {
//!         Ok(Session::create(|ctx| Session { exit: link.attach(ctx) }))
//!     })
//!     .key(container_id)
//!     .restart(Restart::Transient) // restarted only after error/panic
//! }
//!
//! actix::System::new().block_on(async {
//!     // The dialer: dynamic children keyed by container id; the on_exit
//!     // callback clears dedup state / publishes "session crashed" events.
//!     let dialer = SupervisorSpec::new("dialer").on_exit(|exit| {
//!         println!("{} {:?} ended: {} (restarting: {})",
//!             exit.name, exit.key, exit.reason, exit.restarting);
//!     });
//!     let root = Supervisor::start(
//!         SupervisorSpec::new("root")
//!             .strategy(Strategy::OneForOne)
//!             .intensity(5, Duration::from_secs(10)) // then escalate
//!             .backoff(Duration::from_millis(50), Duration::from_secs(5))
//!             .child(ChildSpec::supervisor(dialer))
//!             .on_escalate(|e| eprintln!("giving up: {}", e.reason))
//!             .stop_system_on_escalation(true),
//!     );
//!     let dialer = loop { // current incarnation of the nested supervisor
//!         if let Some(a) = root.child::<Supervisor>("dialer").await { break a; }
//!     };
//!     let dialer = clawker_actors::SupervisorHandle::from_addr(dialer);
//!     dialer.add_child(session_spec("c0ffee")).await.unwrap();
//!     let _addr: Option<Addr<Session>> = dialer.child("c0ffee").await;
//!     print!("{}", root.tree().await.unwrap().render());
//!     dialer.stop_child("c0ffee").await; // reported as ExitReason::Shutdown
//!     root.shutdown();
//! });
//! ```
//!
//! Restart types: [`Restart::Permanent`] (always), [`Restart::Transient`]
//! (after error/panic), [`Restart::Temporary`] (never). Strategies apply to
//! static children; dynamic children are always one-for-one. More than
//! `max_restarts` restarts within `period` makes a supervisor stop its
//! children and escalate: a nested one exits with an error (its parent's
//! policy applies), the root calls `on_escalate` and optionally stops the
//! `System`. Every decision is a `tracing` event with target
//! `clawker_actors::supervisor` and an `event` field (`child_started`,
//! `child_exited{reason}`, `child_restarted{attempt, backoff_ms}`,
//! `child_terminated`, `supervisor_escalated`).
//!
//! [actix]: https://docs.rs/actix

mod backoff;
mod bus;
mod event;
mod link;
mod mailbox;
mod panic;
mod supervisor;
mod tree;

pub use backoff::{Backoff, Retry};
pub use bus::{
    AuditSubscription, BusActor, BusError, BusState, BusStats, DEFAULT_QUEUE_CAPACITY,
    DEFAULT_SUBSCRIBER_CAPACITY, DRAIN_BATCH, EventBus, EventBusBuilder, Filter, SubscriberStats,
    Subscription,
};
pub use event::{Apply, Event};
pub use link::{ChildLink, ExitHandle, ExitReason};
pub use panic::install_panic_hook;
pub use supervisor::{
    ChildExit, ChildSpec, Escalation, Intensity, Restart, Strategy, Supervisor, SupervisorError,
    SupervisorHandle, SupervisorSpec,
};
pub use tree::{ChildState, NodeKind, TreeNode};
