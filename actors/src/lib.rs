//! Reusable actor-model supervision on actix (placeholder doc, replaced below).

mod bus;
mod event;
mod link;
mod mailbox;
mod panic;
mod supervisor;
mod tree;

pub use bus::{
    AuditSubscription, BusActor, BusError, BusState, BusStats, DEFAULT_QUEUE_CAPACITY,
    DEFAULT_SUBSCRIBER_CAPACITY, DRAIN_BATCH, EventBus, EventBusBuilder, Filter, SubscriberStats,
    Subscription,
};
pub use event::{Apply, Event};
pub use link::{ChildLink, ExitHandle, ExitReason};
pub use panic::install_panic_hook;
pub use supervisor::{
    Backoff, ChildExit, ChildSpec, Escalation, Intensity, Restart, Strategy, Supervisor,
    SupervisorError, SupervisorHandle, SupervisorSpec,
};
pub use tree::{ChildState, NodeKind, TreeNode};
