//! Shared test actors and helpers (real actors on a real actix System).
#![allow(dead_code)]

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::prelude::*;
use clawker_actors::{ChildExit, ChildLink, ChildSpec, ExitHandle};

pub fn run<F: Future>(f: F) -> F::Output {
    System::new().block_on(f)
}

/// Wait (bounded) until `cond` holds; not a performance assertion, just a
/// generous deadline so a broken implementation fails instead of hanging.
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..1000 {
        if cond() {
            return;
        }
        actix_rt::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("condition never reached: {what}");
}

pub async fn sleep_ms(ms: u64) {
    actix_rt::time::sleep(Duration::from_millis(ms)).await;
}

#[derive(Clone, Default)]
pub struct Probe {
    pub starts: Arc<AtomicUsize>,
    pub stops: Arc<AtomicUsize>,
}

impl Probe {
    pub fn starts(&self) -> usize {
        self.starts.load(Ordering::SeqCst)
    }
    pub fn stops(&self) -> usize {
        self.stops.load(Ordering::SeqCst)
    }
}

/// A worker that can be told to panic, fail, or quit.
pub struct Worker {
    pub probe: Probe,
    pub exit: ExitHandle,
    pub panic_in_started: bool,
}

impl Actor for Worker {
    type Context = Context<Self>;
    fn started(&mut self, _: &mut Context<Self>) {
        self.probe.starts.fetch_add(1, Ordering::SeqCst);
        if self.panic_in_started {
            panic!("worker panicked in started()");
        }
    }
    fn stopped(&mut self, _: &mut Context<Self>) {
        self.probe.stops.fetch_add(1, Ordering::SeqCst);
    }
}

#[derive(Message)]
#[rtype(result = "()")]
pub struct Crash;
impl Handler<Crash> for Worker {
    type Result = ();
    fn handle(&mut self, _: Crash, _: &mut Context<Self>) {
        panic!("worker handler panicked");
    }
}

#[derive(Message)]
#[rtype(result = "()")]
pub struct Fail(pub String);
impl Handler<Fail> for Worker {
    type Result = ();
    fn handle(&mut self, m: Fail, ctx: &mut Context<Self>) {
        self.exit.fail(m.0);
        ctx.stop();
    }
}

#[derive(Message)]
#[rtype(result = "()")]
pub struct Quit;
impl Handler<Quit> for Worker {
    type Result = ();
    fn handle(&mut self, _: Quit, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}

#[derive(Message)]
#[rtype(result = "usize")]
pub struct Ping;
impl Handler<Ping> for Worker {
    type Result = usize;
    fn handle(&mut self, _: Ping, _: &mut Context<Self>) -> usize {
        self.probe.starts()
    }
}

pub fn start_worker(link: ChildLink, probe: Probe, panic_in_started: bool) -> Addr<Worker> {
    Worker::create(move |ctx| {
        let exit = link.attach(ctx);
        Worker {
            probe,
            exit,
            panic_in_started,
        }
    })
}

pub fn worker(name: &str, probe: &Probe) -> ChildSpec {
    let probe = probe.clone();
    ChildSpec::worker(name, move |link| {
        Ok(start_worker(link, probe.clone(), false))
    })
}

/// Collects `ChildExit` notifications.
#[derive(Clone, Default)]
pub struct Exits(pub Arc<Mutex<Vec<ChildExit>>>);

impl Exits {
    pub fn push(&self, e: &ChildExit) {
        self.0.lock().unwrap().push(e.clone());
    }
    pub fn all(&self) -> Vec<ChildExit> {
        self.0.lock().unwrap().clone()
    }
    pub fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }
}
