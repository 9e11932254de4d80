//! Supervisor behaviour on a real actix System with real actors.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::prelude::*;
use clawker_actors::{
    ChildSpec, ChildState, ExitReason, Restart, Strategy, Supervisor, SupervisorError,
    SupervisorHandle, SupervisorSpec,
};
use common::*;

fn fast(name: &str) -> SupervisorSpec {
    SupervisorSpec::new(name)
        .backoff(Duration::from_millis(1), Duration::from_millis(20))
        .intensity(10, Duration::from_secs(10))
}

async fn addr_of(sup: &SupervisorHandle, key: &str) -> Addr<Worker> {
    for _ in 0..1000 {
        if let Some(a) = sup.child::<Worker>(key).await
            && a.connected()
        {
            return a;
        }
        sleep_ms(5).await;
    }
    panic!("child {key} never running");
}

#[test]
fn panicking_handler_is_restarted_under_permanent() {
    run(async {
        let p = Probe::default();
        let exits = Exits::default();
        let e = exits.clone();
        let sup = Supervisor::start(
            fast("root")
                .child(worker("w", &p))
                .on_exit(move |x| e.push(x)),
        );
        let a = addr_of(&sup, "w").await;
        assert_eq!(p.starts(), 1);
        let _ = a.send(Crash).await;
        eventually("restarted", || p.starts() == 2).await;
        let b = addr_of(&sup, "w").await;
        assert_eq!(b.send(Ping).await.ok(), Some(2), "new incarnation serves");
        let ex = exits.all();
        assert_eq!(ex.len(), 1);
        assert!(
            matches!(&ex[0].reason, ExitReason::Panic(m) if m.contains("worker handler panicked")),
            "{:?}",
            ex[0].reason
        );
        assert!(ex[0].restarting);
        let tree = sup.tree().await.unwrap();
        assert_eq!(tree.find("w").map(|n| n.restarts), Some(1));
    });
}

#[test]
fn panic_in_started_is_detected_and_restarted() {
    run(async {
        let p = Probe::default();
        let attempts = Arc::new(AtomicUsize::new(0));
        let at = attempts.clone();
        let pp = p.clone();
        // Panics in started() on the first two incarnations only.
        let spec = ChildSpec::worker("flaky", move |link| {
            let n = at.fetch_add(1, Ordering::SeqCst);
            Ok(start_worker(link, pp.clone(), n < 2))
        });
        let exits = Exits::default();
        let e = exits.clone();
        let sup = Supervisor::start(fast("root").child(spec).on_exit(move |x| e.push(x)));
        eventually("third incarnation", || p.starts() == 3).await;
        let a = addr_of(&sup, "flaky").await;
        assert_eq!(a.send(Ping).await.ok(), Some(3));
        let ex = exits.all();
        assert_eq!(ex.len(), 2);
        assert!(
            ex.iter()
                .all(|x| matches!(&x.reason, ExitReason::Panic(m) if m.contains("started()")))
        );
    });
}

#[test]
fn transient_child_exiting_cleanly_is_not_restarted() {
    run(async {
        let p = Probe::default();
        let exits = Exits::default();
        let e = exits.clone();
        let sup = Supervisor::start(
            fast("root")
                .child(worker("t", &p).restart(Restart::Transient))
                .on_exit(move |x| e.push(x)),
        );
        let a = addr_of(&sup, "t").await;
        a.do_send(Quit);
        eventually("exit reported", || exits.len() == 1).await;
        sleep_ms(30).await;
        assert_eq!(p.starts(), 1, "not restarted");
        let ex = exits.all();
        assert_eq!(ex[0].reason, ExitReason::Normal);
        assert!(!ex[0].restarting);
        let tree = sup.tree().await.unwrap();
        assert_eq!(tree.find("t").map(|n| n.state), Some(ChildState::Stopped));
    });
}

#[test]
fn transient_child_error_exit_is_restarted() {
    run(async {
        let p = Probe::default();
        let exits = Exits::default();
        let e = exits.clone();
        let sup = Supervisor::start(
            fast("root")
                .child(worker("t", &p).restart(Restart::Transient))
                .on_exit(move |x| e.push(x)),
        );
        addr_of(&sup, "t").await.do_send(Fail("disk full".into()));
        eventually("restarted", || p.starts() == 2).await;
        assert_eq!(exits.all()[0].reason, ExitReason::Error("disk full".into()));
    });
}

#[test]
fn permanent_child_exiting_cleanly_is_restarted() {
    run(async {
        let p = Probe::default();
        let sup = Supervisor::start(fast("root").child(worker("p", &p)));
        addr_of(&sup, "p").await.do_send(Quit);
        eventually("restarted", || p.starts() == 2).await;
    });
}

#[test]
fn temporary_child_is_never_restarted_even_after_panic() {
    run(async {
        let p = Probe::default();
        let exits = Exits::default();
        let e = exits.clone();
        let sup = Supervisor::start(
            fast("root")
                .child(worker("tmp", &p).restart(Restart::Temporary))
                .on_exit(move |x| e.push(x)),
        );
        let _ = addr_of(&sup, "tmp").await.send(Crash).await;
        eventually("exit reported", || exits.len() == 1).await;
        sleep_ms(30).await;
        assert_eq!(p.starts(), 1);
        let tree = sup.tree().await.unwrap();
        assert_eq!(tree.find("tmp").map(|n| n.state), Some(ChildState::Failed));
    });
}

#[test]
fn one_for_all_restarts_every_sibling() {
    run(async {
        let (a, b, c) = (Probe::default(), Probe::default(), Probe::default());
        let sup = Supervisor::start(
            fast("root")
                .strategy(Strategy::OneForAll)
                .child(worker("a", &a))
                .child(worker("b", &b))
                .child(worker("c", &c)),
        );
        let _ = addr_of(&sup, "b").await.send(Crash).await;
        eventually("all restarted", || {
            a.starts() == 2 && b.starts() == 2 && c.starts() == 2
        })
        .await;
        assert_eq!(a.stops(), 1);
        assert_eq!(c.stops(), 1);
        for k in ["a", "b", "c"] {
            assert!(addr_of(&sup, k).await.send(Ping).await.is_ok());
        }
    });
}

#[test]
fn rest_for_one_restarts_the_failed_child_and_later_siblings_only() {
    run(async {
        let (a, b, c) = (Probe::default(), Probe::default(), Probe::default());
        let sup = Supervisor::start(
            fast("root")
                .strategy(Strategy::RestForOne)
                .child(worker("a", &a))
                .child(worker("b", &b))
                .child(worker("c", &c)),
        );
        let _ = addr_of(&sup, "b").await.send(Crash).await;
        eventually("b and c restarted", || b.starts() == 2 && c.starts() == 2).await;
        sleep_ms(30).await;
        assert_eq!(a.starts(), 1, "earlier sibling untouched");
        assert_eq!(a.stops(), 0);
    });
}

#[test]
fn one_for_one_leaves_siblings_alone() {
    run(async {
        let (a, b) = (Probe::default(), Probe::default());
        let sup = Supervisor::start(fast("root").child(worker("a", &a)).child(worker("b", &b)));
        let _ = addr_of(&sup, "a").await.send(Crash).await;
        eventually("a restarted", || a.starts() == 2).await;
        assert_eq!(b.starts(), 1);
        assert_eq!(b.stops(), 0);
    });
}

#[test]
fn exceeding_restart_intensity_escalates_the_root_and_stops_children() {
    run(async {
        let p = Probe::default();
        let steady = Probe::default();
        let escalations = Arc::new(Mutex::new(Vec::new()));
        let esc = escalations.clone();
        let pp = p.clone();
        let always_panics = ChildSpec::worker("crashy", move |link| {
            Ok(start_worker(link, pp.clone(), true))
        });
        let sup = Supervisor::start(
            SupervisorSpec::new("root")
                .backoff(Duration::from_millis(1), Duration::from_millis(4))
                .intensity(2, Duration::from_secs(10))
                .child(worker("steady", &steady))
                .child(always_panics)
                .on_escalate(move |e| esc.lock().unwrap().push(e.clone())),
        );
        eventually("escalated", || !escalations.lock().unwrap().is_empty()).await;
        assert_eq!(p.starts(), 3, "initial start + 2 restarts, then give up");
        eventually("supervisor stopped", || !sup.is_alive()).await;
        eventually("children stopped", || steady.stops() == 1).await;
        let e = escalations.lock().unwrap()[0].clone();
        assert_eq!(e.supervisor, "root");
        assert!(
            e.reason.contains("restart intensity exceeded"),
            "{}",
            e.reason
        );
        assert_eq!(
            sup.add_child(worker("late", &Probe::default())).await,
            Err(SupervisorError::NotRunning)
        );
    });
}

#[test]
fn nested_supervisor_escalates_to_its_parent_which_restarts_it() {
    run(async {
        let inner_probe = Probe::default();
        let pp = inner_probe.clone();
        let crash_count = Arc::new(AtomicUsize::new(0));
        let cc = crash_count.clone();
        // Panics on its first 2 incarnations: with intensity 1 the inner
        // supervisor gives up on the second panic and escalates.
        let crashy = ChildSpec::worker("crashy", move |link| {
            let n = cc.fetch_add(1, Ordering::SeqCst);
            Ok(start_worker(link, pp.clone(), n < 2))
        });
        let inner = SupervisorSpec::new("inner")
            .backoff(Duration::from_millis(1), Duration::from_millis(2))
            .intensity(1, Duration::from_secs(10))
            .child(crashy);
        let exits = Exits::default();
        let e = exits.clone();
        let root = Supervisor::start(
            fast("root")
                .child(ChildSpec::supervisor(inner))
                .on_exit(move |x| e.push(x)),
        );
        eventually("inner escalated", || !exits.all().is_empty()).await;
        let ex = exits.all();
        assert_eq!(ex[0].name, "inner");
        assert!(
            matches!(&ex[0].reason, ExitReason::Error(m) if m.contains("escalated")),
            "{:?}",
            ex[0].reason
        );
        assert!(ex[0].restarting);
        // The restarted inner supervisor starts a fresh crashy child which
        // (third incarnation) stays up.
        eventually("fresh incarnation", || inner_probe.starts() == 3).await;
        let tree = root.tree().await.unwrap();
        let inner_node = tree.find("inner").unwrap();
        assert_eq!(inner_node.restarts, 1);
        assert_eq!(inner_node.children.len(), 1);
        assert_eq!(inner_node.children[0].name, "crashy");
    });
}

#[test]
fn dynamic_children_are_keyed_looked_up_stopped_and_reported() {
    run(async {
        let exits = Exits::default();
        let e = exits.clone();
        let dialer = Supervisor::start(fast("dialer").on_exit(move |x| e.push(x)));
        let probes: Vec<Probe> = (0..3).map(|_| Probe::default()).collect();
        for (i, p) in probes.iter().enumerate() {
            dialer
                .add_child(
                    worker("session", p)
                        .key(format!("c{i}"))
                        .restart(Restart::Transient),
                )
                .await
                .unwrap();
        }
        assert_eq!(
            dialer
                .add_child(worker("session", &Probe::default()).key("c1"))
                .await,
            Err(SupervisorError::DuplicateKey("c1".into()))
        );
        assert!(dialer.child::<Worker>("c2").await.is_some());
        assert!(dialer.child::<Worker>("nope").await.is_none());

        // Stop one: reported as Shutdown, removed, key reusable.
        assert!(dialer.stop_child("c0").await);
        assert!(!dialer.stop_child("c0").await);
        eventually("c0 exit", || exits.len() == 1).await;
        assert_eq!(exits.all()[0].key.as_deref(), Some("c0"));
        assert_eq!(exits.all()[0].reason, ExitReason::Shutdown);
        assert!(!exits.all()[0].restarting);

        // A panicking dynamic child is reported with its key and restarted.
        let _ = addr_of(&dialer, "c1").await.send(Crash).await;
        eventually("c1 restarted", || probes[1].starts() == 2).await;
        let ex = exits.all();
        assert!(ex.iter().any(|x| x.key.as_deref() == Some("c1")
            && matches!(x.reason, ExitReason::Panic(_))
            && x.restarting));

        // A clean exit of a transient dynamic child removes it.
        addr_of(&dialer, "c2").await.do_send(Quit);
        eventually("c2 exit", || {
            exits.all().iter().any(|x| x.key.as_deref() == Some("c2"))
        })
        .await;
        let tree = dialer.tree().await.unwrap();
        let keys: Vec<_> = tree.children.iter().filter_map(|c| c.key.clone()).collect();
        assert_eq!(keys, vec!["c1".to_string()]);
        dialer
            .add_child(worker("session", &Probe::default()).key("c0"))
            .await
            .unwrap();
    });
}

#[test]
fn start_function_error_counts_as_a_failure() {
    run(async {
        let tries = Arc::new(AtomicUsize::new(0));
        let t = tries.clone();
        let p = Probe::default();
        let pp = p.clone();
        let spec = ChildSpec::worker("needs-docker", move |link| {
            if t.fetch_add(1, Ordering::SeqCst) == 0 {
                return Err("docker unavailable".to_string());
            }
            Ok(start_worker(link, pp.clone(), false))
        });
        let exits = Exits::default();
        let e = exits.clone();
        let _sup = Supervisor::start(fast("root").child(spec).on_exit(move |x| e.push(x)));
        eventually("started on retry", || p.starts() == 1).await;
        assert!(
            matches!(&exits.all()[0].reason, ExitReason::Error(m) if m.contains("docker unavailable"))
        );
    });
}

#[test]
fn shutting_down_a_supervisor_stops_all_descendants() {
    run(async {
        let (a, b) = (Probe::default(), Probe::default());
        let sup = Supervisor::start(
            fast("root")
                .child(worker("a", &a))
                .child(ChildSpec::supervisor(fast("inner").child(worker("b", &b)))),
        );
        eventually("started", || a.starts() == 1 && b.starts() == 1).await;
        sup.shutdown();
        eventually("all stopped", || a.stops() == 1 && b.stops() == 1).await;
        sleep_ms(30).await;
        assert_eq!(a.starts(), 1, "no restart during shutdown");
        assert_eq!(b.starts(), 1);
    });
}

#[test]
fn tree_snapshot_serialises_and_renders_indented() {
    run(async {
        let p = Probe::default();
        let root = Supervisor::start(
            fast("root")
                .strategy(Strategy::OneForOne)
                .child(worker("bus", &p))
                .child(ChildSpec::supervisor(fast("dialer"))),
        );
        let dialer: Addr<Supervisor> = loop {
            if let Some(a) = root.child::<Supervisor>("dialer").await {
                break a;
            }
            sleep_ms(5).await;
        };
        let dialer = SupervisorHandle::from_addr(dialer);
        dialer
            .add_child(
                worker("session", &Probe::default())
                    .key("abc123")
                    .restart(Restart::Transient),
            )
            .await
            .unwrap();
        let tree = root.tree().await.unwrap();
        let text = tree.render();
        assert!(
            text.starts_with("root (supervisor one_for_one) running"),
            "{text}"
        );
        assert!(
            text.contains("├── bus (worker, permanent) running restarts=0"),
            "{text}"
        );
        assert!(
            text.contains("└── dialer (supervisor one_for_one, permanent) running"),
            "{text}"
        );
        assert!(
            text.contains("    └── session[abc123] (worker, transient) running"),
            "{text}"
        );
        let json = serde_json::to_value(&tree).unwrap();
        assert_eq!(json["children"][1]["children"][0]["key"], "abc123");
        assert_eq!(json["children"][0]["state"], "running");
        assert_eq!(json["kind"]["type"], "supervisor");
    });
}

#[test]
fn backoff_doubles_per_attempt_up_to_the_cap() {
    let b = clawker_actors::Backoff::new(Duration::from_millis(10), Duration::from_millis(50));
    assert_eq!(b.delay(1), Duration::from_millis(10));
    assert_eq!(b.delay(2), Duration::from_millis(20));
    assert_eq!(b.delay(3), Duration::from_millis(40));
    assert_eq!(b.delay(4), Duration::from_millis(50));
    assert_eq!(b.delay(200), Duration::from_millis(50));
}
