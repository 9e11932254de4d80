//! Empirical checks of actix 0.13 panic behaviour that the supervisor design
//! relies on (see `link.rs`).

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use actix::prelude::*;
use common::{run, sleep_ms};

struct DropFlag {
    dropped: Arc<AtomicUsize>,
    during_panic: Arc<AtomicBool>,
}
impl Drop for DropFlag {
    fn drop(&mut self) {
        self.during_panic
            .store(std::thread::panicking(), Ordering::SeqCst);
        self.dropped.fetch_add(1, Ordering::SeqCst);
    }
}

struct Plain {
    _flag: DropFlag,
    stopped: Arc<AtomicBool>,
}
impl Actor for Plain {
    type Context = Context<Self>;
    fn stopped(&mut self, _: &mut Context<Self>) {
        self.stopped.store(true, Ordering::SeqCst);
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct Boom;
impl Handler<Boom> for Plain {
    type Result = ();
    fn handle(&mut self, _: Boom, _: &mut Context<Self>) {
        panic!("boom");
    }
}

#[derive(Message)]
#[rtype(result = "u8")]
struct Hello;
impl Handler<Hello> for Plain {
    type Result = u8;
    fn handle(&mut self, _: Hello, _: &mut Context<Self>) -> u8 {
        7
    }
}

fn plain() -> (Plain, Arc<AtomicUsize>, Arc<AtomicBool>, Arc<AtomicBool>) {
    let dropped = Arc::new(AtomicUsize::new(0));
    let during = Arc::new(AtomicBool::new(false));
    let stopped = Arc::new(AtomicBool::new(false));
    (
        Plain {
            _flag: DropFlag {
                dropped: dropped.clone(),
                during_panic: during.clone(),
            },
            stopped: stopped.clone(),
        },
        dropped,
        during,
        stopped,
    )
}

#[test]
fn handler_panic_ends_only_that_actor_and_drops_it_while_unwinding() {
    run(async {
        let (a, dropped, during_panic, stopped) = plain();
        let (b, ..) = plain();
        let a = a.start();
        let b = b.start();
        let _ = a.send(Boom).await;
        sleep_ms(20).await;
        assert!(!a.connected(), "panicked actor's mailbox is closed");
        assert_eq!(dropped.load(Ordering::SeqCst), 1, "actor state dropped");
        assert!(
            during_panic.load(Ordering::SeqCst),
            "state is dropped during unwinding, so Drop can detect the panic"
        );
        assert!(stopped.load(Ordering::SeqCst), "stopped() still runs");
        assert_eq!(b.send(Hello).await.ok(), Some(7), "sibling lives on");
    });
}

#[test]
fn actix_supervisor_does_not_restart_a_panicked_actor() {
    struct Sup {
        restarts: Arc<AtomicUsize>,
    }
    impl Actor for Sup {
        type Context = Context<Self>;
    }
    impl Supervised for Sup {
        fn restarting(&mut self, _: &mut Context<Self>) {
            self.restarts.fetch_add(1, Ordering::SeqCst);
        }
    }
    impl Handler<Boom> for Sup {
        type Result = ();
        fn handle(&mut self, _: Boom, _: &mut Context<Self>) {
            panic!("boom");
        }
    }
    run(async {
        let restarts = Arc::new(AtomicUsize::new(0));
        let r = restarts.clone();
        let addr = actix::Supervisor::start(move |_| Sup { restarts: r });
        let _ = addr.send(Boom).await;
        sleep_ms(20).await;
        assert_eq!(restarts.load(Ordering::SeqCst), 0);
        assert!(!addr.connected());
    });
}
