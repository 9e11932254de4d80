//! The supervised subscriber that fires ladders: one per trigger event,
//! serialised per container.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use actix::fut::wrap_future;
use actix::prelude::*;
use clawker_actors::{ChildLink, ChildSpec, Restart};

use super::config::Trigger;
use super::ladder::Containment;
use crate::events::{AgentRef, AgentUntrusted, InitFailed, SessionFailed};

/// The containment actor: subscribes to its triggers on the bus and runs
/// ladders. Runs as a supervised worker ([`ContainmentActor::spec`]).
pub struct ContainmentActor {
    core: Arc<Containment>,
    bus: crate::events::Bus,
    /// Recent SessionFailed instants per container.
    failures: HashMap<String, VecDeque<Instant>>,
}

impl ContainmentActor {
    /// Child spec for the policy supervisor (permanent worker named
    /// `containment`). Each (re)start subscribes afresh; `core` outlives
    /// restarts (the admin API shares it for release and unlock).
    pub fn spec(bus: crate::events::Bus, core: Arc<Containment>) -> ChildSpec {
        ChildSpec::worker("containment", move |link: ChildLink| {
            let core = core.clone();
            let bus = bus.clone();
            let subs = subscribe(&bus).map_err(|e| e.to_string())?;
            Ok(ContainmentActor::create(move |ctx| {
                link.attach(ctx);
                ctx.add_stream(subs.0);
                ctx.add_stream(subs.1);
                ctx.add_stream(subs.2);
                ContainmentActor {
                    core,
                    bus,
                    failures: HashMap::new(),
                }
            }))
        })
        .restart(Restart::Permanent)
    }
}

type Subs = (
    clawker_actors::Subscription<AgentUntrusted>,
    clawker_actors::Subscription<InitFailed>,
    clawker_actors::Subscription<SessionFailed>,
);

fn subscribe(bus: &crate::events::Bus) -> Result<Subs, clawker_actors::BusError> {
    Ok((bus.subscribe()?, bus.subscribe()?, bus.subscribe()?))
}

impl Actor for ContainmentActor {
    type Context = Context<Self>;
    fn started(&mut self, _: &mut Context<Self>) {
        let c = &self.core.config;
        tracing::info!(
            event = "containment_started",
            enabled = c.enabled,
            dry_run = c.dry_run,
            quarantine_network = %self.core.ops.quarantine_network(),
            rules = c.rules.len(),
            "containment policy active"
        );
    }
}

impl ContainmentActor {
    fn fire(&mut self, target: AgentRef, trigger: Trigger, ctx: &mut Context<Self>) {
        if !self.core.config.enabled || self.core.config.ladder(trigger).is_empty() {
            return;
        }
        let core = self.core.clone();
        let publish = self.bus.clone();
        // ctx.spawn: the ladder belongs to this actor; a restart cancels it
        // between steps rather than leaving an orphan acting on old config.
        // The core serialises ladders per container (in trigger order).
        ctx.spawn(wrap_future(async move {
            core.run(&target, trigger, &publish).await;
        }));
    }
}

impl StreamHandler<Arc<AgentUntrusted>> for ContainmentActor {
    fn handle(&mut self, e: Arc<AgentUntrusted>, ctx: &mut Context<Self>) {
        let t = e.agent.clone();
        self.fire(t, Trigger::Untrusted(e.reason), ctx);
    }
}

impl StreamHandler<Arc<InitFailed>> for ContainmentActor {
    fn handle(&mut self, e: Arc<InitFailed>, ctx: &mut Context<Self>) {
        let t = e.agent.clone();
        self.fire(t, Trigger::InitFailed, ctx);
    }
}

impl StreamHandler<Arc<SessionFailed>> for ContainmentActor {
    fn handle(&mut self, e: Arc<SessionFailed>, ctx: &mut Context<Self>) {
        let Some((count, window)) = self.core.config.session_failed_threshold() else {
            return;
        };
        let now = Instant::now();
        let q = self
            .failures
            .entry(e.agent.container_id.clone())
            .or_default();
        q.push_back(now);
        while q.front().is_some_and(|t| now.duration_since(*t) > window) {
            q.pop_front();
        }
        if q.len() >= count as usize {
            let n = q.len() as u32;
            q.clear(); // the next ladder needs `count` fresh failures
            let t = e.agent.clone();
            self.fire(t, Trigger::SessionFailedRepeated { count: n }, ctx);
        }
        self.failures.retain(|_, q| !q.is_empty());
    }
}
