//! A custom policy subscriber: quarantine untrusted agents by *pausing*
//! their container (instead of the built-in isolate/lock/kill ladder).
//!
//! It shows the subscriber API in-process: start a bus, subscribe an actor
//! to `AgentUntrusted`, react with bollard. In the real CP the daemon
//! would add `Quarantine::spec(bus)` to its `policy` supervisor; here the
//! event is synthetic.
//!
//! ```text
//! cargo run --example quarantine_untrusted                 # synthetic id: shows the not-found path
//! cargo run --example quarantine_untrusted -- <container>  # really pauses <container>
//! ```

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use clawker::events::{self, AgentRef, AgentUntrusted, Bus, UntrustedReason};
use clawker_actors::{ChildLink, ChildSpec, Supervisor, SupervisorSpec};

/// Pauses every container reported untrusted.
struct Quarantine {
    docker: Option<bollard::Docker>,
    done: tokio::sync::mpsc::UnboundedSender<String>,
}

impl Quarantine {
    fn spec(
        bus: Bus,
        docker: Option<bollard::Docker>,
        done: tokio::sync::mpsc::UnboundedSender<String>,
    ) -> ChildSpec {
        ChildSpec::worker("quarantine", move |link: ChildLink| {
            let sub = bus
                .subscribe::<AgentUntrusted>()
                .map_err(|e| e.to_string())?;
            let docker = docker.clone();
            let done = done.clone();
            Ok(Quarantine::create(move |ctx| {
                link.attach(ctx);
                ctx.add_stream(sub);
                Quarantine { docker, done }
            }))
        })
    }
}

impl Actor for Quarantine {
    type Context = Context<Self>;
}

impl StreamHandler<Arc<AgentUntrusted>> for Quarantine {
    fn handle(&mut self, e: Arc<AgentUntrusted>, ctx: &mut Context<Self>) {
        let docker = self.docker.clone();
        let done = self.done.clone();
        // Docker calls are async: run them off the handler, never block it.
        ctx.spawn(actix::fut::wrap_future(async move {
            let id = &e.agent.container_id;
            let outcome = match docker {
                None => "docker unreachable: nothing paused".to_owned(),
                Some(d) => match d.pause_container(id).await {
                    Ok(()) => "paused".to_owned(),
                    Err(err) => format!("not paused: {err}"),
                },
            };
            let _ = done.send(format!(
                "agent {}/{} in {id} untrusted ({}): {outcome}",
                e.agent.project,
                e.agent.name,
                e.reason.as_str()
            ));
        }));
    }
}

fn main() {
    let target = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "0000000000000000synthetic".to_owned());
    actix::System::new().block_on(async move {
        let docker = match clawker::docker::connect().await {
            Ok(d) => Some(d),
            Err(e) => {
                eprintln!("{e}");
                None
            }
        };
        let bus = events::start_bus();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let sup = Supervisor::start(SupervisorSpec::new("policy").child(Quarantine::spec(
            bus.clone(),
            docker,
            tx,
        )));
        // Give the child a moment to subscribe, then play the dialer.
        while bus.stats().subscribers == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        bus.publish(AgentUntrusted {
            agent: AgentRef::new(target, "dev", "example"),
            reason: UntrustedReason::CertThumbprintMismatch,
            detail: "synthetic event from the example".into(),
            at: events::now(),
        });
        match tokio::time::timeout(Duration::from_secs(30), rx.recv()).await {
            Ok(Some(line)) => println!("{line}"),
            _ => println!("no reaction within 30 s"),
        }
        sup.shutdown();
    });
}
