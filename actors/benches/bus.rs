//! Publish → delivery throughput of the event bus.
//!
//! One publisher (the bench thread) publishes `iters` events; the bus actor
//! and the reading subscribers run on one actix arbiter thread; an iteration
//! ends when every *reading* subscriber has received every event. Throughput
//! is reported in delivered events (events × reading subscribers).
//! The `*_plus_stalled` cases add one subscriber that never reads, to show
//! the others do not collapse (its mailbox just evicts its oldest events).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use clawker_actors::{Event, EventBus, Subscription};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

#[derive(Clone)]
struct Tick(#[allow(dead_code)] u64);
impl Event for Tick {
    fn name(&self) -> &'static str {
        "tick"
    }
}

struct Done {
    finished: Mutex<usize>,
    cv: Condvar,
}

struct Harness {
    bus: EventBus<()>,
    target: Arc<AtomicU64>,
    done: Arc<Done>,
    readers: usize,
    published: u64,
    _stalled: Option<Subscription<Tick>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Harness {
    fn new(readers: usize, stalled: bool) -> Self {
        let target = Arc::new(AtomicU64::new(u64::MAX));
        let done = Arc::new(Done {
            finished: Mutex::new(0),
            cv: Condvar::new(),
        });
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (t, d) = (target.clone(), done.clone());
        let thread = std::thread::spawn(move || {
            actix_rt::System::new().block_on(async move {
                let bus = EventBus::builder(()).start();
                for _ in 0..readers {
                    let mut sub = bus.subscribe::<Tick>().expect("open bus");
                    let (t, d) = (t.clone(), d.clone());
                    actix_rt::spawn(async move {
                        // Received + evicted: an overloaded reader may lose
                        // events (drop-oldest), which must not hang the bench.
                        let mut n = 0u64;
                        let mut signalled = 0u64;
                        while sub.recv().await.is_some() {
                            n += 1;
                            let target = t.load(Ordering::Relaxed);
                            if target != signalled && n + sub.dropped() >= target {
                                signalled = target;
                                *d.finished.lock().unwrap() += 1;
                                d.cv.notify_all();
                            }
                        }
                    });
                }
                let stalled = stalled.then(|| bus.subscribe::<Tick>().expect("open bus"));
                tx.send((bus.clone(), stalled)).expect("bench alive");
                let _ = stop_rx.await;
                bus.close();
            });
        });
        let (bus, stalled) = rx.recv().expect("bus started");
        Self {
            bus,
            target,
            done,
            readers,
            published: 0,
            _stalled: stalled,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    fn run(&mut self, iters: u64) -> Duration {
        *self.done.finished.lock().unwrap() = 0;
        self.target.store(self.published + iters, Ordering::Relaxed);
        let start = Instant::now();
        for i in 0..iters {
            while !self.bus.publish(Tick(i)) {
                std::thread::yield_now();
            }
        }
        self.published += iters;
        let mut f = self.done.finished.lock().unwrap();
        while *f < self.readers {
            f = self.done.cv.wait(f).unwrap();
        }
        start.elapsed()
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn fanout(c: &mut Criterion) {
    let mut g = c.benchmark_group("bus_publish_to_delivery");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    for (readers, stalled) in [(1, false), (4, false), (16, false), (4, true), (16, true)] {
        let name = if stalled {
            format!("{readers}_subscribers_plus_stalled")
        } else {
            format!("{readers}_subscribers")
        };
        let mut h = Harness::new(readers, stalled);
        g.throughput(Throughput::Elements(readers as u64));
        g.bench_function(name, |b| b.iter_custom(|iters| h.run(iters)));
        let s = h.bus.stats();
        eprintln!(
            "  stats: published={} delivered={} dropped_queue={} dropped_subscribers={}",
            s.published, s.delivered, s.dropped_queue, s.dropped_subscribers
        );
    }
    g.finish();
}

criterion_group!(benches, fanout);
criterion_main!(benches);
