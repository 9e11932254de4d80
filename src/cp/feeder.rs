//! The Docker events feeder as a supervised actor: it owns the feeder task
//! (see `docker::events::run`) and fails — so the supervisor restarts it —
//! if that task ever ends while the actor is alive.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use actix::fut::wrap_future;
use actix::prelude::*;
use clawker_actors::{ChildLink, ChildSpec, ExitHandle};
use tokio_util::sync::CancellationToken;

use crate::docker::watch::{self, FeederConfig};
use crate::events::{Bus, DockerEventOccurred};

pub struct FeederActor {
    stop: CancellationToken,
    /// True while the events stream is connected (readiness).
    pub connected: Arc<AtomicBool>,
}

impl FeederActor {
    pub fn spec(docker: crate::docker::Docker, bus: Bus) -> ChildSpec {
        Self::spec_with(docker, bus, Arc::default())
    }

    pub fn spec_with(
        docker: crate::docker::Docker,
        bus: Bus,
        connected: Arc<AtomicBool>,
    ) -> ChildSpec {
        ChildSpec::worker("docker-events", move |link: ChildLink| {
            let (docker, bus, connected) = (docker.clone(), bus.clone(), connected.clone());
            Ok(FeederActor::create(move |ctx| {
                let exit: ExitHandle = link.attach(ctx);
                let stop = CancellationToken::new();
                let flag = connected.clone();
                let task = tokio::spawn(watch::run(
                    docker,
                    FeederConfig::default(),
                    move |ev| bus.publish(DockerEventOccurred::new(ev)),
                    move |up| flag.store(up, Ordering::Relaxed),
                    stop.clone(),
                ));
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
