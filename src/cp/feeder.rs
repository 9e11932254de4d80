//! The events feeder as a supervised actor: it owns the task of the
//! runtime's [`EventFeed`] (engine: the Docker events stream; swarm: the
//! manager's task list) and fails — so the supervisor restarts it — if that
//! task ever ends while the actor is alive.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use actix::fut::wrap_future;
use actix::prelude::*;
use clawker_actors::{ChildLink, ChildSpec, ExitHandle};
use tokio_util::sync::CancellationToken;

use crate::events::{Bus, DockerEventOccurred};
use crate::runtime::feed::{EventFeed, FeedSink};

pub struct FeederActor {
    stop: CancellationToken,
    /// True while the events stream is connected (readiness).
    pub connected: Arc<AtomicBool>,
}

impl FeederActor {
    pub fn spec(feed: Arc<dyn EventFeed>, bus: Bus) -> ChildSpec {
        Self::spec_with(feed, bus, Arc::default())
    }

    pub fn spec_with(feed: Arc<dyn EventFeed>, bus: Bus, connected: Arc<AtomicBool>) -> ChildSpec {
        ChildSpec::worker("docker-events", move |link: ChildLink| {
            let (feed, bus, connected) = (feed.clone(), bus.clone(), connected.clone());
            Ok(FeederActor::create(move |ctx| {
                let exit: ExitHandle = link.attach(ctx);
                let stop = CancellationToken::new();
                let flag = connected.clone();
                let sink = FeedSink::new(
                    move |ev| bus.publish(DockerEventOccurred::new(ev)),
                    move |up| flag.store(up, Ordering::Relaxed),
                );
                let task = tokio::spawn(feed.run(sink, stop.clone()));
                let stopping = stop.clone();
                ctx.spawn(wrap_future::<_, Self>(task).map(
                    move |res, _act, ctx: &mut Context<Self>| {
                        if !stopping.is_cancelled() {
                            exit.fail(format!("feeder task ended: {res:?}"));
                        }
                        ctx.stop();
                    },
                ));
                FeederActor { stop, connected }
            }))
        })
    }
}

impl Actor for FeederActor {
    type Context = Context<Self>;

    fn stopped(&mut self, _: &mut Context<Self>) {
        self.stop.cancel();
        self.connected.store(false, Ordering::Relaxed);
    }
}
