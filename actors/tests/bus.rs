//! Event bus behaviour on a real actix System.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use actix::prelude::*;
use clawker_actors::{Apply, BusError, Event, EventBus};
use common::*;

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
struct ContainerStarted {
    id: u32,
}
impl Event for ContainerStarted {
    fn name(&self) -> &'static str {
        "container_started"
    }
    fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }
}
impl Apply<World> for ContainerStarted {
    fn apply(&self, w: &mut World) {
        if self.id == 666 {
            panic!("apply exploded");
        }
        w.running.push(self.id);
    }
}

#[derive(Debug, Clone, PartialEq)]
struct ContainerStopped {
    id: u32,
}
impl Event for ContainerStopped {
    fn name(&self) -> &'static str {
        "container_stopped"
    }
}
impl Apply<World> for ContainerStopped {
    fn apply(&self, w: &mut World) {
        w.running.retain(|x| *x != self.id);
        w.stopped += 1;
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
struct World {
    running: Vec<u32>,
    stopped: u32,
}

fn world_bus() -> EventBus<World> {
    EventBus::builder(World::default())
        .project::<ContainerStarted>()
        .project::<ContainerStopped>()
        .start()
}

#[test]
fn typed_subscribers_receive_only_their_event_type() {
    run(async {
        let bus = world_bus();
        let mut started = bus.subscribe::<ContainerStarted>().unwrap();
        let mut stopped = bus.subscribe::<ContainerStopped>().unwrap();
        assert!(bus.publish(ContainerStarted { id: 1 }));
        assert!(bus.publish(ContainerStopped { id: 1 }));
        assert!(bus.publish(ContainerStarted { id: 2 }));
        bus.flush().await.unwrap();
        assert_eq!(started.recv().await.unwrap().id, 1);
        assert_eq!(started.recv().await.unwrap().id, 2);
        assert!(started.try_recv().is_none());
        assert_eq!(stopped.recv().await.unwrap().id, 1);
        assert!(stopped.try_recv().is_none());
    });
}

#[test]
fn filtered_subscription_sees_only_matching_events() {
    run(async {
        let bus = world_bus();
        let mut even = bus
            .subscribe_filtered::<ContainerStarted, _>(|e| e.id % 2 == 0)
            .unwrap();
        for id in 0..10 {
            bus.publish(ContainerStarted { id });
        }
        bus.flush().await.unwrap();
        let mut got = Vec::new();
        while let Some(e) = even.try_recv() {
            got.push(e.id);
        }
        assert_eq!(got, vec![0, 2, 4, 6, 8]);
    });
}

#[test]
fn publish_on_a_full_queue_returns_false_and_counts_the_drop() {
    run(async {
        let bus = EventBus::builder(()).queue_capacity(4).start();
        let mut sub = bus.subscribe::<ContainerStarted>().unwrap();
        // The bus actor shares this thread, so it cannot drain until we yield:
        // the 5th..10th publishes find the queue full and must not block.
        let accepted = (0..10)
            .filter(|&id| bus.publish(ContainerStarted { id }))
            .count();
        assert_eq!(accepted, 4);
        bus.flush().await.unwrap();
        let s = bus.stats();
        assert_eq!(s.published, 4);
        assert_eq!(s.dropped_queue, 6);
        let ids: Vec<u32> = std::iter::from_fn(|| sub.try_recv())
            .map(|e| e.id)
            .collect();
        assert_eq!(ids, vec![0, 1, 2, 3]);
    });
}

#[test]
fn stalled_subscriber_drops_oldest_without_slowing_the_others() {
    run(async {
        let bus = EventBus::builder(()).subscriber_capacity(8).start();
        let stalled = bus.subscribe::<ContainerStarted>().unwrap();
        let mut fast = bus.subscribe_with::<ContainerStarted>(1024, None).unwrap();
        for id in 0..100 {
            assert!(bus.publish(ContainerStarted { id }));
        }
        bus.flush().await.unwrap();
        let got: Vec<u32> = std::iter::from_fn(|| fast.try_recv())
            .map(|e| e.id)
            .collect();
        assert_eq!(
            got,
            (0..100).collect::<Vec<_>>(),
            "fast subscriber got everything"
        );
        assert_eq!(stalled.dropped(), 92);
        assert_eq!(fast.dropped(), 0);
        let s = bus.stats();
        assert_eq!(s.dropped_subscribers, 92);
        let detail = s
            .subscribers_detail
            .iter()
            .find(|d| d.id == stalled.id())
            .unwrap();
        assert_eq!(detail.dropped, 92);
        assert_eq!(detail.pending, 8);
        // The stalled subscriber keeps the newest 8.
        let mut stalled = stalled;
        let kept: Vec<u32> = std::iter::from_fn(|| stalled.try_recv())
            .map(|e| e.id)
            .collect();
        assert_eq!(kept, (92..100).collect::<Vec<_>>());
    });
}

#[test]
fn projection_applies_in_publish_order_and_snapshot_is_a_deep_copy() {
    run(async {
        let bus = world_bus();
        bus.publish(ContainerStarted { id: 1 });
        bus.publish(ContainerStarted { id: 2 });
        bus.publish(ContainerStopped { id: 1 });
        bus.publish(ContainerStarted { id: 3 });
        let mut snap = bus.snapshot().await.unwrap();
        assert_eq!(
            snap,
            World {
                running: vec![2, 3],
                stopped: 1
            }
        );
        snap.running.clear();
        assert_eq!(bus.snapshot().await.unwrap().running, vec![2, 3]);
    });
}

#[test]
fn panics_in_filters_and_projections_are_contained_and_counted() {
    run(async {
        let bus = world_bus();
        let mut picky = bus
            .subscribe_filtered::<ContainerStarted, _>(|e| {
                if e.id == 13 {
                    panic!("filter exploded");
                }
                true
            })
            .unwrap();
        let mut plain = bus.subscribe::<ContainerStarted>().unwrap();
        for id in [1, 13, 666, 2] {
            bus.publish(ContainerStarted { id });
        }
        bus.flush().await.unwrap();
        let picky_ids: Vec<u32> = std::iter::from_fn(|| picky.try_recv())
            .map(|e| e.id)
            .collect();
        assert_eq!(
            picky_ids,
            vec![1, 666, 2],
            "only the panicking event is lost"
        );
        let plain_ids: Vec<u32> = std::iter::from_fn(|| plain.try_recv())
            .map(|e| e.id)
            .collect();
        assert_eq!(plain_ids, vec![1, 13, 666, 2]);
        assert_eq!(bus.stats().panics, 2);
        assert_eq!(bus.snapshot().await.unwrap().running, vec![1, 13, 2]);
        assert!(bus.publish(ContainerStarted { id: 3 }), "bus still alive");
    });
}

#[test]
fn unsubscribe_is_idempotent_and_ends_the_stream() {
    run(async {
        let bus = world_bus();
        let mut sub = bus.subscribe::<ContainerStarted>().unwrap();
        let id = sub.id();
        assert!(sub.unsubscribe());
        assert!(!sub.unsubscribe());
        assert!(!bus.unsubscribe(id));
        assert!(sub.recv().await.is_none());
        bus.publish(ContainerStarted { id: 1 });
        bus.flush().await.unwrap();
        assert_eq!(bus.stats().subscribers, 0);
        assert_eq!(bus.stats().delivered, 0);
    });
}

#[test]
fn dropping_a_subscription_unsubscribes() {
    run(async {
        let bus = world_bus();
        let sub = bus.subscribe::<ContainerStarted>().unwrap();
        assert_eq!(bus.stats().subscribers, 1);
        drop(sub);
        assert_eq!(bus.stats().subscribers, 0);
    });
}

#[test]
fn closing_the_bus_ends_every_stream_and_rejects_new_work() {
    run(async {
        let bus = world_bus();
        let mut a = bus.subscribe::<ContainerStarted>().unwrap();
        let mut b = bus.subscribe_all().unwrap();
        let waiter = actix_rt::spawn(async move { a.recv().await.is_none() });
        sleep_ms(5).await;
        bus.close();
        bus.close();
        assert!(waiter.await.unwrap(), "pending recv ends");
        assert!(b.recv().await.is_none());
        assert!(!bus.publish(ContainerStarted { id: 1 }));
        assert_eq!(
            bus.subscribe::<ContainerStarted>().unwrap_err(),
            BusError::Closed
        );
        assert!(bus.subscribe_all().is_err());
        assert_eq!(bus.snapshot().await.unwrap_err(), BusError::Closed);
        let addr = bus.actor().unwrap();
        eventually("bus actor stopped", || !addr.connected()).await;
    });
}

#[test]
fn late_subscribers_get_no_replay() {
    run(async {
        let bus = world_bus();
        bus.publish(ContainerStarted { id: 1 });
        bus.flush().await.unwrap();
        let mut late = bus.subscribe::<ContainerStarted>().unwrap();
        bus.publish(ContainerStarted { id: 2 });
        bus.flush().await.unwrap();
        assert_eq!(late.try_recv().map(|e| e.id), Some(2));
        assert!(late.try_recv().is_none());
    });
}

#[test]
fn subscribe_all_sees_every_event_type_erased_with_name_and_json() {
    run(async {
        let bus = world_bus();
        let mut audit = bus.subscribe_all().unwrap();
        bus.publish(ContainerStarted { id: 7 });
        bus.publish(ContainerStopped { id: 7 });
        bus.flush().await.unwrap();
        let first = audit.recv().await.unwrap();
        assert_eq!(first.name(), "container_started");
        assert_eq!(first.to_json(), serde_json::json!({"id": 7}));
        assert_eq!(
            first.downcast_ref::<ContainerStarted>(),
            Some(&ContainerStarted { id: 7 })
        );
        let second = audit.recv().await.unwrap();
        assert_eq!(second.name(), "container_stopped");
        assert!(second.is::<ContainerStopped>());
        assert_eq!(second.to_json(), serde_json::Value::Null);
    });
}

#[test]
fn stats_count_subscribers_published_and_delivered() {
    run(async {
        let bus = world_bus();
        let _a = bus.subscribe::<ContainerStarted>().unwrap();
        let _b = bus.subscribe::<ContainerStarted>().unwrap();
        let _c = bus.subscribe::<ContainerStopped>().unwrap();
        let _all = bus.subscribe_all().unwrap();
        for id in 0..5 {
            bus.publish(ContainerStarted { id });
        }
        bus.publish(ContainerStopped { id: 0 });
        bus.flush().await.unwrap();
        let s = bus.stats();
        assert_eq!(s.subscribers, 4);
        assert_eq!(s.published, 6);
        // 5 starts x (2 typed + audit) + 1 stop x (1 typed + audit)
        assert_eq!(s.delivered, 17);
        assert_eq!(s.dropped_queue, 0);
        assert_eq!(s.dropped_subscribers, 0);
        assert_eq!(s.panics, 0);
        assert!(serde_json::to_value(&s).is_ok());
    });
}

/// A subscriber actor consuming its subscription with `add_stream`.
struct Counter {
    seen: Arc<AtomicUsize>,
}
impl Actor for Counter {
    type Context = Context<Self>;
}
impl StreamHandler<Arc<ContainerStarted>> for Counter {
    fn handle(&mut self, _: Arc<ContainerStarted>, _: &mut Context<Self>) {
        self.seen.fetch_add(1, Ordering::SeqCst);
    }
}

#[test]
fn subscriber_actor_consumes_its_subscription_with_add_stream() {
    run(async {
        let bus = world_bus();
        let seen = Arc::new(AtomicUsize::new(0));
        let s = seen.clone();
        let b = bus.clone();
        let addr = Counter::create(move |ctx| {
            ctx.add_stream(b.subscribe::<ContainerStarted>().expect("bus open"));
            Counter { seen: s }
        });
        for id in 0..50 {
            bus.publish(ContainerStarted { id });
        }
        eventually("all seen", || seen.load(Ordering::SeqCst) == 50).await;
        bus.close();
        // Stream end stops the actor (StreamHandler::finished default).
        eventually("subscriber actor stopped", || !addr.connected()).await;
    });
}

#[test]
fn dropping_every_bus_handle_stops_the_actor_and_ends_streams() {
    run(async {
        let bus = world_bus();
        let mut sub = bus.subscribe::<ContainerStarted>().unwrap();
        let addr = bus.actor().unwrap();
        drop(bus);
        assert!(sub.recv().await.is_none());
        eventually("bus actor stopped", || !addr.connected()).await;
    });
}

#[test]
fn bus_on_its_own_arbiter_serves_publishers_on_other_threads() {
    run(async {
        let arbiter = Arbiter::new();
        let bus = EventBus::builder(World::default())
            .project::<ContainerStarted>()
            .start_in_arbiter(&arbiter.handle());
        let mut sub = bus.subscribe::<ContainerStarted>().unwrap();
        let publishers: Vec<_> = (0..2)
            .map(|t| {
                let bus = bus.clone();
                std::thread::spawn(move || {
                    for i in 0..500 {
                        while !bus.publish(ContainerStarted { id: t * 1000 + i }) {
                            std::thread::yield_now();
                        }
                    }
                })
            })
            .collect();
        for p in publishers {
            p.join().unwrap();
        }
        let mut n = 0;
        while n < 1000 {
            sub.recv().await.unwrap();
            n += 1;
        }
        assert_eq!(bus.snapshot().await.unwrap().running.len(), 1000);
        bus.close();
        arbiter.stop();
    });
}
