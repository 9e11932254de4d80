//! Docker events → session actions (reference `cp-session.md` §10.3–10.4):
//! dial agents on `start|restart|unpause` (and guard their agent port: a
//! started container has a fresh network namespace), end their session at
//! once on `die|stop|destroy` with `SessionFailed{container_not_running}`
//! (no broken/reconnect churn for a container that is gone, and no silent
//! stop either), evict the identity row on `destroy` only. `kill` and
//! `oom` are not an end: a `docker kill --signal=HUP` or a child process
//! killed by the OOM killer leaves the container running (a fatal one is
//! followed by `die`). A managed network `connect`/`disconnect` of a
//! container wakes its session, which re-checks its address: a session
//! whose clawker-net endpoint went away breaks at once (instead of when the
//! keepalive notices) and reconnects the moment the endpoint is back.
//!
//! A supervised actor that consumes a bus subscription, so a panic while
//! handling one event is a supervised restart, not a hand-rolled loop.

use std::sync::Arc;

use actix::prelude::*;
use clawker_actors::{ChildLink, ChildSpec};

use crate::defaults::labels;
use crate::events::{Bus, DockerAction, DockerEvent, DockerEventOccurred, DockerObject};
use crate::registry::Registry;
use crate::runtime::AgentPortGuard;
use crate::session::Sessions;

/// Installs the agent-port guard (clawkerd's port open to the CP's
/// addresses only) in a container's network namespace. Fire and forget:
/// it never delays the dial (the session is already allowed), runs its
/// `nft` on a dedicated thread, and a failure is logged (the mTLS
/// handshake still refuses every peer but the CP).
#[derive(Clone)]
pub struct PortGuard {
    pub guard: Arc<dyn AgentPortGuard>,
    pub port: u16,
}

impl PortGuard {
    pub fn spawn(&self, container_id: &str) {
        let (guard, port, id) = (self.guard.clone(), self.port, container_id.to_owned());
        tokio::spawn(async move {
            match guard.guard_agent_port(&id, port).await {
                Ok(c) => {
                    tracing::debug!(event = "agent_port_guarded", container_id = %id, changed = c.changed, detail = %c.detail)
                }
                Err(e) => {
                    tracing::warn!(event = "agent_port_guard_failed", container_id = %id, error = %e, "agent port left to the TLS handshake alone")
                }
            }
        });
    }
}

pub struct DockerDispatch {
    sessions: Sessions,
    registry: Registry,
    /// `None` where the runtime has no port guard (Swarm mode).
    port_guard: Option<PortGuard>,
}

impl DockerDispatch {
    pub fn spec(
        bus: Bus,
        sessions: Sessions,
        registry: Registry,
        port_guard: Option<PortGuard>,
    ) -> ChildSpec {
        ChildSpec::worker("docker-dispatch", move |link: ChildLink| {
            let sub = bus
                .subscribe::<DockerEventOccurred>()
                .map_err(|e| format!("subscribe docker events: {e}"))?;
            let (sessions, registry, port_guard) =
                (sessions.clone(), registry.clone(), port_guard.clone());
            Ok(DockerDispatch::create(move |ctx| {
                link.attach(ctx);
                ctx.add_stream(futures::stream::unfold(sub, |mut s| async move {
                    s.recv().await.map(|e| (e, s))
                }));
                DockerDispatch {
                    sessions,
                    registry,
                    port_guard,
                }
            }))
        })
    }
}

impl Actor for DockerDispatch {
    type Context = Context<Self>;
}

/// What a container event means for the session machinery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Dial(String),
    Stop(String),
    StopAndEvict(String),
    /// A managed network connect/disconnect of this container.
    Renetworked(String),
    Nothing,
}

/// Pure decision, unit-tested.
pub fn decide(ev: &DockerEvent) -> Action {
    if ev.typ == DockerObject::Network {
        return match (&ev.action, ev.attr("container").filter(|c| !c.is_empty())) {
            (DockerAction::Connect | DockerAction::Disconnect, Some(c)) => {
                Action::Renetworked(c.to_owned())
            }
            _ => Action::Nothing,
        };
    }
    let Some(id) = ev.container_id().filter(|id| !id.is_empty()) else {
        return Action::Nothing;
    };
    let id = id.to_owned();
    match &ev.action {
        a if a.brings_container_up() && ev.attr(labels::PURPOSE) == Some(labels::PURPOSE_AGENT) => {
            Action::Dial(id)
        }
        a if a.takes_container_down() => Action::Stop(id),
        DockerAction::Destroy => Action::StopAndEvict(id),
        _ => Action::Nothing,
    }
}

impl StreamHandler<Arc<DockerEventOccurred>> for DockerDispatch {
    fn handle(&mut self, ev: Arc<DockerEventOccurred>, ctx: &mut Context<Self>) {
        let sessions = self.sessions.clone();
        let registry = self.registry.clone();
        let port_guard = self.port_guard.clone();
        // `wait`: one event at a time, so a start and the die right after
        // it reach the sessions supervisor in that order.
        let work = async move {
            match decide(&ev.event) {
                Action::Nothing => {}
                Action::Dial(id) => {
                    if let Some(guard) = &port_guard {
                        guard.spawn(&id);
                    }
                    sessions.dial(&id).await;
                }
                Action::Stop(id) => {
                    sessions.container_gone(&id).await;
                }
                Action::Renetworked(id) => sessions.network_moved(&id).await,
                Action::StopAndEvict(id) => {
                    sessions.container_gone(&id).await;
                    if let Err(e) = registry.evict_by_container_id(&id).await {
                        tracing::warn!(container_id = %id, error = %e, "dispatch: evict failed");
                    }
                }
            }
        };
        ctx.wait(work.into_actor(self));
    }

    fn finished(&mut self, ctx: &mut Context<Self>) {
        // The bus closed: nothing more will come (shutdown).
        ctx.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(action: &str, purpose: Option<&str>) -> DockerEvent {
        DockerEvent::container(
            DockerAction::parse(action),
            "c1",
            purpose
                .map(|p| {
                    [(labels::PURPOSE.to_owned(), p.to_owned())]
                        .into_iter()
                        .collect()
                })
                .unwrap_or_default(),
        )
    }

    #[test]
    fn dispatch_rules() {
        assert_eq!(
            decide(&ev("start", Some("agent"))),
            Action::Dial("c1".into())
        );
        assert_eq!(
            decide(&ev("unpause", Some("agent"))),
            Action::Dial("c1".into())
        );
        assert_eq!(decide(&ev("start", Some("monitoring"))), Action::Nothing);
        assert_eq!(decide(&ev("start", None)), Action::Nothing);
        assert_eq!(
            decide(&ev("create", Some("agent"))),
            Action::Nothing,
            "no listener yet"
        );
        assert_eq!(decide(&ev("die", None)), Action::Stop("c1".into()));
        assert_eq!(decide(&ev("stop", None)), Action::Stop("c1".into()));
        assert_eq!(
            decide(&ev("destroy", None)),
            Action::StopAndEvict("c1".into())
        );
        // A signal is not an end: `docker kill --signal=HUP` leaves the
        // container running (a fatal signal is followed by `die`); so does
        // the OOM killer taking a child process.
        assert_eq!(decide(&ev("kill", Some("agent"))), Action::Nothing);
        assert_eq!(decide(&ev("oom", Some("agent"))), Action::Nothing);
        let net = |action: &str| DockerEvent {
            typ: DockerObject::Network,
            action: DockerAction::parse(action),
            actor_id: "n1".into(),
            attributes: [("container".to_owned(), "c1".to_owned())]
                .into_iter()
                .collect(),
            scope: "local".into(),
            time_nanos: 0,
            synthetic: false,
        };
        assert_eq!(decide(&net("disconnect")), Action::Renetworked("c1".into()));
        assert_eq!(decide(&net("connect")), Action::Renetworked("c1".into()));
        assert_eq!(decide(&net("create")), Action::Nothing);
        let mut empty = ev("start", Some("agent"));
        empty.actor_id.clear();
        assert_eq!(decide(&empty), Action::Nothing, "empty ids are ignored");
    }
}
