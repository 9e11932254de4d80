//! What other actors may ask of an agent's session, behind a narrow seam so
//! they can be tested without one: containment asks whether the current
//! session trusts the agent (release and unlock are refused otherwise) and
//! tells it when the container moved between networks.

use futures::future::BoxFuture;

use super::actor::Sessions;

/// The session side of containment.
pub trait SessionControl: Send + Sync + 'static {
    /// The current session's verdict: `None` when no session is open.
    fn trusted<'a>(&'a self, container_id: &'a str) -> BoxFuture<'a, Option<bool>>;
    /// The container moved between networks: re-establish over its new
    /// address (a no-op when there is no session or nothing changed).
    fn network_moved<'a>(&'a self, container_id: &'a str) -> BoxFuture<'a, ()>;
}

/// No sessions at all (tests, tools).
#[derive(Clone, Copy, Default)]
pub struct NoSessions;

impl SessionControl for NoSessions {
    fn trusted<'a>(&'a self, _: &'a str) -> BoxFuture<'a, Option<bool>> {
        Box::pin(async { None })
    }

    fn network_moved<'a>(&'a self, _: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async {})
    }
}

impl SessionControl for Sessions {
    fn trusted<'a>(&'a self, container_id: &'a str) -> BoxFuture<'a, Option<bool>> {
        Box::pin(async move { self.live(container_id).await.map(|l| l.trusted) })
    }

    fn network_moved<'a>(&'a self, container_id: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(Sessions::network_moved(self, container_id))
    }
}
