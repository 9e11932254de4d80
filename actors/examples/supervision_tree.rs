//! A small supervision tree whose children crash, with the structured
//! supervision log and the final tree printed.
//!
//! Run with: `cargo run -p clawker-actors --example supervision_tree`

use std::time::Duration;

use actix::prelude::*;
use clawker_actors::{
    ChildLink, ChildSpec, ExitHandle, Restart, Strategy, Supervisor, SupervisorHandle,
    SupervisorSpec,
};

/// A worker that can be made to crash or fail.
struct Worker {
    exit: ExitHandle,
    panic_on_start: bool,
}

impl Actor for Worker {
    type Context = Context<Self>;
    fn started(&mut self, _: &mut Context<Self>) {
        if self.panic_on_start {
            panic!("could not initialise");
        }
    }
}

#[derive(Message)]
#[rtype(result = "()")]
enum Order {
    Panic,
    Fail(&'static str),
    Quit,
}

impl Handler<Order> for Worker {
    type Result = ();
    fn handle(&mut self, o: Order, ctx: &mut Context<Self>) {
        match o {
            Order::Panic => panic!("handler bug"),
            Order::Fail(why) => {
                self.exit.fail(why);
                ctx.stop();
            }
            Order::Quit => ctx.stop(),
        }
    }
}

fn start(link: ChildLink, panic_on_start: bool) -> Result<Addr<Worker>, String> {
    Ok(Worker::create(move |ctx| Worker {
        exit: link.attach(ctx),
        panic_on_start,
    }))
}

fn worker(name: &str) -> ChildSpec {
    ChildSpec::worker(name, |link| start(link, false))
}

async fn child(sup: &SupervisorHandle, key: &str) -> Option<Addr<Worker>> {
    for _ in 0..200 {
        if let Some(a) = sup.child::<Worker>(key).await {
            return Some(a);
        }
        actix_rt::time::sleep(Duration::from_millis(5)).await;
    }
    None
}

async fn pause() {
    actix_rt::time::sleep(Duration::from_millis(150)).await;
}

fn main() {
    tracing_subscriber::fmt()
        .with_target(false)
        .with_max_level(tracing::Level::INFO)
        .init();
    // Silence the default panic printout so the structured log stays readable
    // (the crate's hook still captures the message for the exit reason).
    std::panic::set_hook(Box::new(|_| {}));

    System::new().block_on(async {
        let flaky_starts = std::sync::atomic::AtomicUsize::new(0);
        let flaky_starts = std::sync::Arc::new(flaky_starts);
        let fs = flaky_starts.clone();
        let flaky = ChildSpec::worker("docker-events", move |link| {
            // Panics in started() on its first incarnation only.
            let n = fs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            start(link, n == 0)
        });

        let dialer = SupervisorSpec::new("dialer").on_exit(|e| {
            println!(
                ">>> dialer notified: {}[{}] {} (restarting: {})",
                e.name,
                e.key.as_deref().unwrap_or(""),
                e.reason,
                e.restarting
            );
        });
        let root = Supervisor::start(
            SupervisorSpec::new("root")
                .strategy(Strategy::OneForOne)
                .backoff(Duration::from_millis(20), Duration::from_secs(1))
                .intensity(10, Duration::from_secs(10))
                .child(worker("bus"))
                .child(worker("registry"))
                .child(flaky)
                .child(ChildSpec::supervisor(dialer))
                .on_escalate(|e| println!(">>> root escalated: {}", e.reason)),
        );
        pause().await;

        let dialer = loop {
            if let Some(a) = root.child::<Supervisor>("dialer").await {
                break SupervisorHandle::from_addr(a);
            }
            actix_rt::time::sleep(Duration::from_millis(5)).await;
        };
        for id in ["c0ffee", "deadbeef", "f00d"] {
            let spec = worker("session").key(id).restart(Restart::Transient);
            if let Err(e) = dialer.add_child(spec).await {
                println!("add_child failed: {e}");
            }
        }
        pause().await;

        // A registry handler panics: restarted (permanent).
        if let Some(a) = child(&root, "registry").await {
            a.do_send(Order::Panic);
        }
        pause().await;
        // A session panics (restarted, the dialer is told), one fails with
        // an error (restarted), one ends normally (transient: not restarted).
        if let Some(a) = child(&dialer, "c0ffee").await {
            a.do_send(Order::Panic);
        }
        if let Some(a) = child(&dialer, "deadbeef").await {
            a.do_send(Order::Fail("agent connection lost"));
        }
        if let Some(a) = child(&dialer, "f00d").await {
            a.do_send(Order::Quit);
        }
        pause().await;
        // The registry crashes twice more: backoff grows.
        for _ in 0..2 {
            if let Some(a) = child(&root, "registry").await {
                a.do_send(Order::Panic);
            }
            pause().await;
        }

        match root.tree().await {
            Ok(tree) => {
                println!("\nfinal supervision tree:\n{}", tree.render());
                match serde_json::to_string(&tree) {
                    Ok(json) => println!("as JSON: {json}"),
                    Err(e) => println!("json error: {e}"),
                }
            }
            Err(e) => println!("tree unavailable: {e}"),
        }
        root.shutdown();
        pause().await;
    });
}
