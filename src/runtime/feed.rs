//! The events feeder seam: something that follows the runtime and turns
//! what it sees into [`DockerEvent`]s for the bus, reconnecting on its own.
//!
//! Engine mode follows one engine's event stream (`docker::watch`). Swarm
//! mode has no task events to follow (Engine 20.10 emits none), so its feed
//! polls the manager's task list, using service and container events only
//! as hints to poll sooner (`docker::swarm::feed`). Both speak the same
//! container vocabulary (`start`, `die`, `destroy`, keyed by the runtime id
//! of [`super::ContainerFacts`]), so the dispatcher above them is one.

use std::sync::Arc;

use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use crate::events::DockerEvent;

/// Where a feed delivers: the bus, and a readiness flag.
#[derive(Clone)]
pub struct FeedSink {
    publish: Arc<dyn Fn(DockerEvent) -> bool + Send + Sync>,
    connected: Arc<dyn Fn(bool) + Send + Sync>,
}

impl FeedSink {
    /// `publish` returns whether the bus took the event; `connected` is
    /// told whenever the feed gains or loses the runtime.
    pub fn new(
        publish: impl Fn(DockerEvent) -> bool + Send + Sync + 'static,
        connected: impl Fn(bool) + Send + Sync + 'static,
    ) -> Self {
        Self {
            publish: Arc::new(publish),
            connected: Arc::new(connected),
        }
    }

    /// Publishes one event; a refusal is logged, never retried (the next
    /// reconcile repairs any gap).
    pub fn publish(&self, ev: DockerEvent) {
        let name = ev.name();
        let id = ev.actor_id.clone();
        if !(self.publish)(ev) {
            tracing::warn!(event = %name, ctx_id = %id, "feed: publish dropped");
        }
    }

    pub fn connected(&self, up: bool) {
        (self.connected)(up)
    }
}

/// A feed of runtime events.
pub trait EventFeed: Send + Sync + 'static {
    /// Runs until `shutdown` fires: reconcile on every (re)connect (so
    /// subscribers converge on the runtime's state across gaps), then
    /// follow. Never returns early on a runtime fault; it reconnects.
    fn run(&self, sink: FeedSink, shutdown: CancellationToken) -> BoxFuture<'static, ()>;
}
