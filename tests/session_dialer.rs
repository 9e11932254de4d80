//! The dialer and session actors on a real actix System, with real clawkerd
//! processes: dedup, stop, panic containment, and the worldview the bus
//! projects from what happened.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clawker::events::{self, Bus, worldview::SessionStatus};
use clawker::registry::RegistryStore;
use clawker::registry::store::NewEntry;
use clawker::session::actor::{self, Crash, SessionActor};
use clawker::session::dial::DialConfig;
use clawker::session::lifecycle::{
    ContainerResolver, ResolveError, ResolvedTarget, SessionDeps, SessionPolicy,
};
use common::{AGENT, Clawkerd, PROJECT, TestPki};
use futures::future::BoxFuture;

#[derive(Clone, Default)]
struct StaticResolver(Arc<Mutex<HashMap<String, Result<ResolvedTarget, ResolveError>>>>);

impl ContainerResolver for StaticResolver {
    fn resolve(&self, id: &str) -> BoxFuture<'_, Result<ResolvedTarget, ResolveError>> {
        let r = self
            .0
            .lock()
            .unwrap()
            .get(id)
            .cloned()
            .unwrap_or(Err(ResolveError::NotFound));
        Box::pin(async move { r })
    }
}

fn running(addr: SocketAddr) -> Result<ResolvedTarget, ResolveError> {
    Ok(ResolvedTarget {
        agent: AGENT.into(),
        project: PROJECT.into(),
        running: true,
        addr: Some(addr),
    })
}

/// Collects event names from the bus (all events, in order).
fn record(bus: &Bus) -> Seen {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut sub = bus.subscribe_all().unwrap();
    let s = seen.clone();
    actix::spawn(async move {
        while let Some(e) = sub.recv().await {
            s.lock().unwrap().push((e.name().to_owned(), e.to_json()));
        }
    });
    seen
}

fn count(seen: &Seen, name: &str) -> usize {
    seen.lock()
        .unwrap()
        .iter()
        .filter(|(n, _)| n == name)
        .count()
}

type Seen = Arc<Mutex<Vec<(String, serde_json::Value)>>>;

/// Polls `f` for up to 20 s; on timeout the failure lists every event seen
/// so far, so a CI failure says what happened instead of only what did not.
async fn wait_until(what: &str, seen: &Seen, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        if Instant::now() >= deadline {
            let events: Vec<String> = seen
                .lock()
                .unwrap()
                .iter()
                .map(|(n, j)| format!("{n} {j}"))
                .collect();
            panic!(
                "timed out waiting for {what}; events so far:\n{}",
                events.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

struct Setup {
    pki: TestPki,
    resolver: StaticResolver,
    deps: SessionDeps<Bus>,
}

fn setup(bus: &Bus, register: bool) -> Setup {
    let pki = TestPki::new();
    let registry = RegistryStore::open(&pki.dir.path().join("cp.redb")).unwrap();
    if register {
        registry
            .add(NewEntry {
                agent_name: AGENT.into(),
                project: PROJECT.into(),
                container_id: pki.container_id.clone(),
                thumbprint: pki.agent.thumbprint(),
                registered_at_unix: 1_700_000_000,
                last_seen_unix: 0,
            })
            .unwrap();
    }
    let resolver = StaticResolver::default();
    // A trusted agent runs the init plan; its steps run on this host, so
    // the agent user's home is a tempdir (a failing step would end
    // clawkerd, and with it every later session of the test).
    let mut policy = SessionPolicy::default();
    policy.init.user = pki.agent_user();
    let deps = SessionDeps {
        resolver: Arc::new(resolver.clone()),
        registry: Arc::new(registry),
        terminate: Arc::new(clawker::runtime::memory::MemoryOps::default()),
        dial: DialConfig::new(
            pki.ca.cert_pem().as_bytes(),
            pki.cp_client.cert_pem.as_bytes(),
            pki.cp_client.key_pem.as_bytes(),
        )
        .unwrap(),
        sink: bus.clone(),
        policy,
        certs: None,
    };
    Setup {
        pki,
        resolver,
        deps,
    }
}

#[test]
fn concurrent_dials_for_one_container_start_one_session() {
    actix::System::new().block_on(async {
        let bus = events::start_bus();
        let seen = record(&bus);
        let s = setup(&bus, false);
        // Container not running: each session ends at once with one failure.
        s.resolver.0.lock().unwrap().insert(
            s.pki.container_id.clone(),
            Ok(ResolvedTarget {
                running: false,
                ..Default::default()
            }),
        );
        let (front, _sessions) = actor::start_standalone(s.deps.clone(), bus.clone());
        futures::future::join_all((0..10).map(|_| front.dial(&s.pki.container_id))).await;
        wait_until("first SessionFailed", &seen, || {
            count(&seen, "agent.session.failed") == 1
        })
        .await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(count(&seen, "agent.session.failed"), 1, "deduplicated");
        // The entry is cleared when the child ends: a new Dial dials afresh.
        let mut cleared = false;
        for _ in 0..100 {
            if front.active().await.is_empty() {
                cleared = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(cleared);
        front.dial(&s.pki.container_id).await;
        wait_until("second SessionFailed", &seen, || {
            count(&seen, "agent.session.failed") == 2
        })
        .await;
        // Empty ids are ignored (the reference dialed them).
        let mut empty = false;
        for _ in 0..100 {
            if front.active().await.is_empty() {
                empty = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(empty);
        front.dial("").await;
        assert!(front.active().await.is_empty());
    });
}

#[test]
fn a_panicking_session_is_contained_published_and_restarted() {
    actix::System::new().block_on(async {
        let bus = events::start_bus();
        let seen = record(&bus);
        let s = setup(&bus, true);
        let clawkerd = Clawkerd::spawn_with(
            &s.pki,
            common::Opts {
                args: vec!["sleep".into(), "60".into()],
                ..Default::default()
            },
        );
        s.resolver
            .0
            .lock()
            .unwrap()
            .insert(s.pki.container_id.clone(), running(clawkerd.addr));
        let (front, sessions) = actor::start_standalone(s.deps.clone(), bus.clone());
        front.dial(&s.pki.container_id).await;
        wait_until("connected", &seen, || {
            count(&seen, "agent.session.connected") == 1
        })
        .await;
        let child = sessions
            .child::<SessionActor>(&s.pki.container_id)
            .await
            .expect("child");
        child.do_send(Crash);
        wait_until("panic published", &seen, || {
            seen.lock().unwrap().iter().any(|(n, j)| {
                n == "agent.session.failed"
                    && j["reason"]
                        .as_str()
                        .unwrap_or("")
                        .starts_with("dial_goroutine_panic: ")
            })
        })
        .await;
        // Transient child: restarted, re-dials, and the dedup entry stays.
        wait_until("reconnected", &seen, || {
            count(&seen, "agent.session.connected") == 2
        })
        .await;
        assert_eq!(front.active().await, vec![s.pki.container_id.clone()]);
        // The panicked actor's session went with it: clawkerd saw the first
        // stream end, and only the restarted actor's session is open (a
        // detached lifecycle task would hold the old one, and run its init
        // plan beside the new session's).
        let deadline = Instant::now() + Duration::from_secs(10);
        while clawkerd.logs.events("session_ended").is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(clawkerd.logs.events("session_started").len(), 2);
        assert_eq!(
            clawkerd.logs.events("session_ended").len(),
            1,
            "the first session ends when its actor panics"
        );
        let tree = sessions.tree().await.unwrap();
        let rendered = tree.render();
        assert!(rendered.contains("session"), "{rendered}");
        drop(clawkerd);
    });
}

#[test]
fn stopping_a_session_publishes_no_broken_event_and_worldview_follows() {
    actix::System::new().block_on(async {
        let bus = events::start_bus();
        let seen = record(&bus);
        let s = setup(&bus, true);
        let clawkerd = Clawkerd::spawn_with(
            &s.pki,
            common::Opts {
                args: vec!["sleep".into(), "60".into()],
                ..Default::default()
            },
        );
        s.resolver
            .0
            .lock()
            .unwrap()
            .insert(s.pki.container_id.clone(), running(clawkerd.addr));
        let (front, _sessions) = actor::start_standalone(s.deps.clone(), bus.clone());
        front.dial(&s.pki.container_id).await;
        wait_until("trusted", &seen, || count(&seen, "agent.trusted") == 1).await;
        let view = bus.snapshot().await.unwrap();
        let a = &view.agents[&s.pki.container_id];
        assert_eq!(a.session_status, SessionStatus::Connected);
        assert!(a.registered, "registered after a Match");
        assert!(a.trust.trusted);
        assert_eq!(a.agent, AGENT);

        front.stop(&s.pki.container_id).await;
        let mut gone = false;
        for _ in 0..200 {
            if front.active().await.is_empty() {
                gone = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(gone, "session stopped");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(count(&seen, "agent.session.broken"), 0);
        assert_eq!(count(&seen, "agent.session.failed"), 0);
        drop(clawkerd);
    });
}
