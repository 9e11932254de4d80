//! Every supervisor decision is a structured `tracing` event.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use clawker_actors::{Supervisor, SupervisorSpec};
use common::*;
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::{Context, SubscriberExt};

type Seen = Arc<Mutex<Vec<Vec<(String, String)>>>>;

struct Capture(Seen);

struct Fields(Vec<(String, String)>);
impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.push((
            field.name().to_string(),
            format!("{value:?}").trim_matches('"').to_string(),
        ));
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Capture {
    fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
        if event.metadata().target() == "clawker_actors::supervisor" {
            let mut f = Fields(Vec::new());
            event.record(&mut f);
            self.0.lock().unwrap().push(f.0);
        }
    }
}

fn field<'a>(ev: &'a [(String, String)], name: &str) -> Option<&'a str> {
    ev.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

#[test]
fn supervisor_decisions_are_structured_tracing_events() {
    let seen: Seen = Arc::default();
    let subscriber = tracing_subscriber::registry().with(Capture(seen.clone()));
    tracing::subscriber::with_default(subscriber, || {
        run(async {
            let p = Probe::default();
            let sup = Supervisor::start(
                SupervisorSpec::new("root")
                    .backoff(Duration::from_millis(1), Duration::from_millis(10))
                    .intensity(1, Duration::from_secs(10))
                    .child(worker("w", &p)),
            );
            eventually("started", || p.starts() == 1).await;
            if let Some(a) = sup.child::<Worker>("w").await {
                let _ = a.send(Crash).await;
            }
            eventually("restarted", || p.starts() == 2).await;
            if let Some(a) = sup.child::<Worker>("w").await {
                let _ = a.send(Crash).await;
            }
            eventually("escalated", || !sup.is_alive()).await;
        })
    });
    let events = seen.lock().unwrap().clone();
    let of = |name: &str| -> Vec<Vec<(String, String)>> {
        events
            .iter()
            .filter(|e| field(e, "event") == Some(name))
            .cloned()
            .collect()
    };
    assert_eq!(of("child_started").len(), 2);
    let exited = of("child_exited");
    assert!(
        field(&exited[0], "reason")
            .is_some_and(|r| r.starts_with("panic: worker handler panicked")),
        "{exited:?}"
    );
    let restarted = of("child_restarted");
    assert_eq!(restarted.len(), 1);
    assert_eq!(field(&restarted[0], "attempt"), Some("1"));
    assert_eq!(field(&restarted[0], "backoff_ms"), Some("1"));
    assert_eq!(field(&restarted[0], "child"), Some("w"));
    let escalated = of("supervisor_escalated");
    assert_eq!(escalated.len(), 1);
    assert_eq!(field(&escalated[0], "supervisor"), Some("root"));
}
