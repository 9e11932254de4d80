//! Docker events → session actions (reference `cp-session.md` §10.3–10.4):
//! dial agents on `start|restart|unpause`, stop their session at once on
//! `die|stop|kill|oom|destroy` (no broken/reconnect churn for a container
//! that is gone), evict the identity row on `destroy` only.
//!
//! A supervised actor that consumes a bus subscription, so a panic while
//! handling one event is a supervised restart, not a hand-rolled loop.

use std::sync::Arc;

use actix::prelude::*;
use clawker_actors::{ChildLink, ChildSpec};

use crate::docker::{LABEL_PURPOSE, PURPOSE_AGENT};
use crate::events::{Bus, DockerEventOccurred};
use crate::registry::Registry;
use crate::session::actor::{Dial, StopSession};

pub use crate::session::actor::DialerSlot;

pub struct DockerDispatch {
    dialer: DialerSlot,
    registry: Registry,
}

impl DockerDispatch {
    pub fn spec(bus: Bus, dialer: DialerSlot, registry: Registry) -> ChildSpec {
        ChildSpec::worker("docker-dispatch", move |link: ChildLink| {
            let sub = bus
                .subscribe::<DockerEventOccurred>()
                .map_err(|e| format!("subscribe docker events: {e}"))?;
            let (dialer, registry) = (dialer.clone(), registry.clone());
            Ok(DockerDispatch::create(move |ctx| {
                link.attach(ctx);
                ctx.add_stream(futures::stream::unfold(sub, |mut s| async move {
                    s.recv().await.map(|e| (e, s))
                }));
                DockerDispatch { dialer, registry }
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
    Nothing,
}

/// Pure decision, unit-tested.
pub fn decide(ev: &crate::docker::events::DockerEvent) -> Action {
    if ev.typ != "container" || ev.actor_id.is_empty() {
        return Action::Nothing;
    }
    let id = ev.actor_id.clone();
    match ev.action.as_str() {
        "start" | "restart" | "unpause" if ev.attr(LABEL_PURPOSE) == Some(PURPOSE_AGENT) => {
            Action::Dial(id)
        }
        "die" | "stop" | "kill" | "oom" => Action::Stop(id),
        "destroy" => Action::StopAndEvict(id),
        _ => Action::Nothing,
    }
}

impl StreamHandler<Arc<DockerEventOccurred>> for DockerDispatch {
    fn handle(&mut self, ev: Arc<DockerEventOccurred>, _ctx: &mut Context<Self>) {
        let action = decide(&ev.event);
        let dialer = self.dialer.load_full();
        match action {
            Action::Nothing => {}
            Action::Dial(id) => match dialer {
                Some(d) => d.do_send(Dial(id)),
                None => {
                    tracing::warn!(container_id = %id, "dispatch: dialer not running; dial dropped")
                }
            },
            Action::Stop(id) => {
                if let Some(d) = dialer {
                    d.do_send(StopSession(id));
                }
            }
            Action::StopAndEvict(id) => {
                if let Some(d) = dialer {
                    d.do_send(StopSession(id.clone()));
                }
                let registry = self.registry.clone();
                actix::spawn(async move {
                    if let Err(e) = registry.evict_by_container_id(&id).await {
                        tracing::warn!(container_id = %id, error = %e, "dispatch: evict failed");
                    }
                });
            }
        }
    }

    fn finished(&mut self, ctx: &mut Context<Self>) {
        // The bus closed: nothing more will come (shutdown).
        ctx.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::docker::events::DockerEvent;

    fn ev(action: &str, purpose: Option<&str>) -> DockerEvent {
        DockerEvent {
            typ: "container".into(),
            action: action.into(),
            actor_id: "c1".into(),
            attributes: purpose
                .map(|p| {
                    [(LABEL_PURPOSE.to_owned(), p.to_owned())]
                        .into_iter()
                        .collect()
                })
                .unwrap_or_default(),
            scope: "local".into(),
            time_nanos: 0,
            synthetic: false,
        }
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
        assert_eq!(decide(&ev("oom", None)), Action::Stop("c1".into()));
        assert_eq!(
            decide(&ev("destroy", None)),
            Action::StopAndEvict("c1".into())
        );
        let mut empty = ev("start", Some("agent"));
        empty.actor_id.clear();
        assert_eq!(decide(&empty), Action::Nothing, "empty ids are ignored");
    }
}
