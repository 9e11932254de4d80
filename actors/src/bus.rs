//! Typed event bus actor.
//!
//! Data path (why it looks like this): publishing must never block and must
//! sustain millions of events per second, so events do **not** travel as one
//! actix message each. [`EventBus::publish`] does a `try_send` into a bounded
//! tokio channel (full ⇒ the event is dropped and counted); the [`BusActor`]
//! consumes that channel as a stream of *batches* (up to
//! [`DRAIN_BATCH`] events per wake-up), applies the projection in publish
//! order and pushes each event into the bounded drop-oldest
//! [`Mailbox`](crate::mailbox) of every matching subscriber. Subscribers read
//! their mailbox through a [`Subscription`], an async `Stream` an actor can
//! `add_stream`.
//!
//! Routing is keyed by [`TypeId`]: a `Subscription<E>` only ever sees `E`
//! values (as `Arc<E>`, so fan-out costs one refcount increment per
//! subscriber, not a clone). An audit view can see every event type-erased
//! through [`EventBus::subscribe_all`].
//!
//! Projection state is owned by the actor and read with
//! [`EventBus::snapshot`], which travels *in band* through the same queue as
//! the events. Why not an `ArcSwap` published after every apply: in-band
//! gives read-your-writes (a snapshot requested after a publish reflects it)
//! and costs nothing on the hot path, whereas publishing a fresh copy after
//! every apply would clone the whole state per event.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::task::{Context as TaskContext, Poll};

use actix::prelude::*;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::event::{Apply, Event};
use crate::mailbox::{Mailbox, MailboxReceiver, Push};

/// Default capacity of the publish queue feeding the bus actor.
pub const DEFAULT_QUEUE_CAPACITY: usize = 65_536;
/// Default capacity of each subscriber mailbox.
pub const DEFAULT_SUBSCRIBER_CAPACITY: usize = 4_096;
/// Maximum number of queued commands the bus actor handles per wake-up.
pub const DRAIN_BATCH: usize = 1_024;

/// Errors returned by the bus.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BusError {
    /// The bus was closed (or its actor stopped).
    #[error("event bus is closed")]
    Closed,
}

/// Bounds required of the projection state.
pub trait BusState: Clone + Send + Unpin + 'static {}
impl<T: Clone + Send + Unpin + 'static> BusState for T {}

/// Filter predicate of a typed subscription.
pub type Filter<E> = Box<dyn Fn(&E) -> bool + Send + Sync>;

type Erased = Arc<dyn Event>;
type ApplyFn<S> = fn(&dyn Event, &mut S);

enum Cmd<S> {
    Event(Erased),
    Snapshot(oneshot::Sender<S>),
    Flush(oneshot::Sender<()>),
}

fn read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}
fn write<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}

// ---------------------------------------------------------------------------
// Subscriber sinks (bus side)

enum Offer {
    Delivered,
    Skipped,
    Panicked,
}

trait Sink: Send + Sync {
    fn offer(&self, ev: &Erased) -> Offer;
    fn close(&self);
    fn dropped(&self) -> u64;
    fn pending(&self) -> usize;
}

struct TypedSink<E> {
    mailbox: Arc<Mailbox<Arc<E>>>,
    filter: Option<Filter<E>>,
}

impl<E: Event> Sink for TypedSink<E> {
    fn offer(&self, ev: &Erased) -> Offer {
        if let Some(f) = &self.filter {
            let Some(e) = ev.downcast_ref::<E>() else {
                return Offer::Skipped;
            };
            // Why catch_unwind: a buggy filter must cost one event, not the
            // bus actor (which would silently end every subscription).
            match catch_unwind(AssertUnwindSafe(|| f(e))) {
                Ok(true) => {}
                Ok(false) => return Offer::Skipped,
                Err(_) => return Offer::Panicked,
            }
        }
        let any: Arc<dyn Any + Send + Sync> = ev.clone();
        let Ok(e) = any.downcast::<E>() else {
            return Offer::Skipped;
        };
        match self.mailbox.push(e) {
            Push::Closed => Offer::Skipped,
            Push::Stored | Push::StoredEvicting => Offer::Delivered,
        }
    }
    fn close(&self) {
        self.mailbox.close();
    }
    fn dropped(&self) -> u64 {
        self.mailbox.dropped()
    }
    fn pending(&self) -> usize {
        self.mailbox.pending()
    }
}

struct AllSink {
    mailbox: Arc<Mailbox<Erased>>,
}

impl Sink for AllSink {
    fn offer(&self, ev: &Erased) -> Offer {
        match self.mailbox.push(ev.clone()) {
            Push::Closed => Offer::Skipped,
            Push::Stored | Push::StoredEvicting => Offer::Delivered,
        }
    }
    fn close(&self) {
        self.mailbox.close();
    }
    fn dropped(&self) -> u64 {
        self.mailbox.dropped()
    }
    fn pending(&self) -> usize {
        self.mailbox.pending()
    }
}

struct SinkEntry {
    id: u64,
    event: &'static str,
    sink: Arc<dyn Sink>,
}

#[derive(Default)]
struct Registry {
    by_type: HashMap<TypeId, Vec<SinkEntry>>,
    all: Vec<SinkEntry>,
}

impl Registry {
    fn len(&self) -> usize {
        self.all.len() + self.by_type.values().map(Vec::len).sum::<usize>()
    }
    fn entries(&self) -> impl Iterator<Item = &SinkEntry> {
        self.by_type.values().flatten().chain(self.all.iter())
    }
}

/// State shared by bus handles, subscriptions and the bus actor.
#[derive(Default)]
struct Core {
    registry: RwLock<Registry>,
    closed: AtomicBool,
    next_id: AtomicU64,
    published: AtomicU64,
    dropped_queue: AtomicU64,
    delivered: AtomicU64,
    panics: AtomicU64,
    /// Evictions of subscribers that have since unsubscribed, so the
    /// `dropped_subscribers` total never goes backwards.
    retired_dropped: AtomicU64,
}

impl Core {
    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    fn remove(&self, id: u64) -> bool {
        let removed = {
            let mut reg = write(&self.registry);
            let mut found = None;
            for list in reg.by_type.values_mut() {
                if let Some(pos) = list.iter().position(|e| e.id == id) {
                    found = Some(list.swap_remove(pos));
                    break;
                }
            }
            if found.is_none()
                && let Some(pos) = reg.all.iter().position(|e| e.id == id)
            {
                found = Some(reg.all.swap_remove(pos));
            }
            reg.by_type.retain(|_, l| !l.is_empty());
            found
        };
        match removed {
            Some(e) => {
                e.sink.close();
                self.retired_dropped
                    .fetch_add(e.sink.dropped(), Ordering::Relaxed);
                true
            }
            None => false,
        }
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        let reg = std::mem::take(&mut *write(&self.registry));
        for e in reg.by_type.into_values().flatten().chain(reg.all) {
            e.sink.close();
            self.retired_dropped
                .fetch_add(e.sink.dropped(), Ordering::Relaxed);
        }
    }
}

// ---------------------------------------------------------------------------
// Subscription (consumer side)

/// A live subscription: an async stream of `Arc<T>`.
///
/// `T` is an [`Event`] type for [`EventBus::subscribe`], or `dyn Event` for
/// [`EventBus::subscribe_all`] (see [`AuditSubscription`]). Ends (yields
/// `None`) after [`unsubscribe`](Self::unsubscribe) or when the bus closes.
/// Dropping it unsubscribes.
pub struct Subscription<T: ?Sized + 'static> {
    id: u64,
    core: Arc<Core>,
    rx: MailboxReceiver<Arc<T>>,
}

/// A subscription to every event, type-erased (for audit logs).
pub type AuditSubscription = Subscription<dyn Event>;

impl<T: ?Sized + 'static> Subscription<T> {
    /// Subscriber id (as listed in [`BusStats::subscribers_detail`]).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Wait for the next event; `None` once unsubscribed/closed and drained.
    pub async fn recv(&mut self) -> Option<Arc<T>> {
        std::future::poll_fn(|cx| self.rx.poll_recv(cx)).await
    }

    /// Take the next event if one is pending.
    pub fn try_recv(&mut self) -> Option<Arc<T>> {
        self.rx.try_recv()
    }

    /// Events evicted from this subscriber's mailbox because it read too slowly.
    pub fn dropped(&self) -> u64 {
        self.rx.shared().dropped()
    }

    /// Stop receiving. Idempotent: returns whether this call removed it.
    pub fn unsubscribe(&self) -> bool {
        let removed = self.core.remove(self.id);
        // Closing is idempotent too; covers a bus closed concurrently.
        self.rx.shared().close();
        removed
    }

    /// Whether the subscription has been closed (unsubscribe or bus close).
    pub fn is_closed(&self) -> bool {
        self.rx.shared().is_closed()
    }
}

impl<T: ?Sized + 'static> futures_core::Stream for Subscription<T> {
    type Item = Arc<T>;
    fn poll_next(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Arc<T>>> {
        self.get_mut().rx.poll_recv(cx)
    }
}

impl<T: ?Sized + 'static> Drop for Subscription<T> {
    fn drop(&mut self) {
        self.core.remove(self.id);
    }
}

impl<T: ?Sized + 'static> std::fmt::Debug for Subscription<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("id", &self.id)
            .finish()
    }
}

// ---------------------------------------------------------------------------
// Stats

/// Per-subscriber counters.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct SubscriberStats {
    /// Subscription id.
    pub id: u64,
    /// Event type name, or `"*"` for an all-events subscription.
    pub event: &'static str,
    /// Events evicted because the subscriber was slow.
    pub dropped: u64,
    /// Events waiting in its mailbox.
    pub pending: usize,
}

/// Bus counters, see [`EventBus::stats`].
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct BusStats {
    /// Live subscriptions.
    pub subscribers: usize,
    /// Events accepted by `publish`.
    pub published: u64,
    /// Event copies pushed into subscriber mailboxes (one event fanned out
    /// to 4 subscribers counts 4), including copies later evicted.
    pub delivered: u64,
    /// Events rejected by `publish` because the queue was full.
    pub dropped_queue: u64,
    /// Events evicted from subscriber mailboxes (all subscribers, ever).
    pub dropped_subscribers: u64,
    /// Panics contained inside filters and projections.
    pub panics: u64,
    /// Per live subscriber.
    pub subscribers_detail: Vec<SubscriberStats>,
}

// ---------------------------------------------------------------------------
// The actor

/// A batch of queued commands, drained in one wake-up.
struct Batch<S>(Vec<Cmd<S>>);

impl<S: 'static> Message for Batch<S> {
    type Result = ();
}

struct BatchStream<S> {
    rx: mpsc::Receiver<Cmd<S>>,
}

impl<S> futures_core::Stream for BatchStream<S> {
    type Item = Batch<S>;
    fn poll_next(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Batch<S>>> {
        let this = self.get_mut();
        let mut buf = Vec::new();
        match this.rx.poll_recv_many(cx, &mut buf, DRAIN_BATCH) {
            Poll::Ready(0) => Poll::Ready(None),
            Poll::Ready(_) => Poll::Ready(Some(Batch(buf))),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// The actor behind an [`EventBus`]: drains the publish queue in batches,
/// applies projections, fans out to subscriber mailboxes.
pub struct BusActor<S: BusState> {
    core: Arc<Core>,
    rx: Option<mpsc::Receiver<Cmd<S>>>,
    state: S,
    projections: HashMap<TypeId, ApplyFn<S>>,
}

impl<S: BusState> Actor for BusActor<S> {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        if let Some(rx) = self.rx.take() {
            ctx.add_stream(BatchStream { rx });
        }
        tracing::debug!(target: "clawker_actors::bus", event = "bus_started");
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        // Ending every subscription stream tells subscribers the bus is gone
        // instead of leaving them waiting forever.
        self.core.close();
        tracing::debug!(target: "clawker_actors::bus", event = "bus_stopped");
    }
}

impl<S: BusState> Drop for BusActor<S> {
    fn drop(&mut self) {
        self.core.close();
    }
}

impl<S: BusState> StreamHandler<Batch<S>> for BusActor<S> {
    fn handle(&mut self, Batch(cmds): Batch<S>, ctx: &mut Context<Self>) {
        let core = self.core.clone();
        let mut delivered = 0u64;
        let mut panics = 0u64;
        let flush_counters = |delivered: &mut u64, panics: &mut u64| {
            core.delivered.fetch_add(*delivered, Ordering::Relaxed);
            core.panics.fetch_add(*panics, Ordering::Relaxed);
            *delivered = 0;
            *panics = 0;
        };
        {
            let reg = read(&core.registry);
            for cmd in cmds {
                match cmd {
                    Cmd::Event(ev) => {
                        let tid = (&*ev as &dyn Any).type_id();
                        if let Some(apply) = self.projections.get(&tid) {
                            let state = &mut self.state;
                            if catch_unwind(AssertUnwindSafe(|| apply(&*ev, state))).is_err() {
                                panics += 1;
                            }
                        }
                        let typed = reg.by_type.get(&tid).map(Vec::as_slice).unwrap_or(&[]);
                        for e in typed.iter().chain(reg.all.iter()) {
                            match e.sink.offer(&ev) {
                                Offer::Delivered => delivered += 1,
                                Offer::Panicked => panics += 1,
                                Offer::Skipped => {}
                            }
                        }
                    }
                    Cmd::Snapshot(tx) => {
                        flush_counters(&mut delivered, &mut panics);
                        let _ = tx.send(self.state.clone());
                    }
                    Cmd::Flush(tx) => {
                        flush_counters(&mut delivered, &mut panics);
                        let _ = tx.send(());
                    }
                }
            }
        }
        flush_counters(&mut delivered, &mut panics);
        if core.is_closed() {
            ctx.stop();
        }
    }
}

/// Stops the bus actor (sent by [`EventBus::close`]).
struct CloseBus;
impl Message for CloseBus {
    type Result = ();
}
impl<S: BusState> Handler<CloseBus> for BusActor<S> {
    type Result = ();
    fn handle(&mut self, _: CloseBus, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}

// ---------------------------------------------------------------------------
// Builder and handle

fn apply_erased<E: Apply<S>, S>(ev: &dyn Event, state: &mut S) {
    if let Some(e) = ev.downcast_ref::<E>() {
        e.apply(state);
    }
}

/// Configures and starts an [`EventBus`].
pub struct EventBusBuilder<S: BusState> {
    state: S,
    queue_capacity: usize,
    subscriber_capacity: usize,
    projections: HashMap<TypeId, ApplyFn<S>>,
}

impl<S: BusState> EventBusBuilder<S> {
    /// Capacity of the publish queue (events accepted but not yet fanned out).
    pub fn queue_capacity(mut self, n: usize) -> Self {
        self.queue_capacity = n.max(1);
        self
    }

    /// Default capacity of each subscriber mailbox.
    pub fn subscriber_capacity(mut self, n: usize) -> Self {
        self.subscriber_capacity = n.max(1);
        self
    }

    /// Register event type `E` as a projection input: the bus calls
    /// `E::apply(&mut state)` for every published `E`, in publish order.
    pub fn project<E: Apply<S>>(mut self) -> Self {
        self.projections
            .insert(TypeId::of::<E>(), apply_erased::<E, S> as ApplyFn<S>);
        self
    }

    fn split(self) -> (EventBus<S>, BusActor<S>) {
        let (tx, rx) = mpsc::channel(self.queue_capacity);
        let core = Arc::new(Core::default());
        let actor = BusActor {
            core: core.clone(),
            rx: Some(rx),
            state: self.state,
            projections: self.projections,
        };
        let handle = EventBus {
            core,
            tx,
            addr: None,
            subscriber_capacity: self.subscriber_capacity,
        };
        (handle, actor)
    }

    /// Start the bus actor on the current arbiter (must run inside an actix
    /// `System`).
    pub fn start(self) -> EventBus<S> {
        let (mut handle, actor) = self.split();
        handle.addr = Some(actor.start());
        handle
    }

    /// Start the bus actor on another arbiter (e.g. a dedicated thread).
    pub fn start_in_arbiter(self, arbiter: &actix::ArbiterHandle) -> EventBus<S> {
        let (mut handle, actor) = self.split();
        handle.addr = Some(BusActor::start_in_arbiter(arbiter, move |_| actor));
        handle
    }
}

/// Cheap-to-clone handle to a running bus actor.
///
/// All handles share one bus; the actor stops when [`close`](Self::close) is
/// called or when the last handle is dropped.
pub struct EventBus<S: BusState = ()> {
    core: Arc<Core>,
    tx: mpsc::Sender<Cmd<S>>,
    addr: Option<Addr<BusActor<S>>>,
    subscriber_capacity: usize,
}

impl<S: BusState> Clone for EventBus<S> {
    fn clone(&self) -> Self {
        Self {
            core: self.core.clone(),
            tx: self.tx.clone(),
            addr: self.addr.clone(),
            subscriber_capacity: self.subscriber_capacity,
        }
    }
}

impl<S: BusState> std::fmt::Debug for EventBus<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventBus")
            .field("closed", &self.core.is_closed())
            .finish()
    }
}

impl<S: BusState> EventBus<S> {
    /// Builder owning the initial projection state.
    pub fn builder(initial_state: S) -> EventBusBuilder<S> {
        EventBusBuilder {
            state: initial_state,
            queue_capacity: DEFAULT_QUEUE_CAPACITY,
            subscriber_capacity: DEFAULT_SUBSCRIBER_CAPACITY,
            projections: HashMap::new(),
        }
    }

    /// Publish an event. Never blocks: returns `true` if the event was
    /// queued, `false` if the queue was full (the event is dropped and
    /// counted in [`BusStats::dropped_queue`]) or the bus is closed.
    pub fn publish<E: Event>(&self, event: E) -> bool {
        if self.core.is_closed() {
            return false;
        }
        match self.tx.try_send(Cmd::Event(Arc::new(event))) {
            Ok(()) => {
                self.core.published.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.core.dropped_queue.fetch_add(1, Ordering::Relaxed);
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// Subscribe to events of type `E` with the default mailbox capacity.
    pub fn subscribe<E: Event>(&self) -> Result<Subscription<E>, BusError> {
        self.subscribe_with(self.subscriber_capacity, None)
    }

    /// Subscribe to events of type `E` accepted by `filter`. A panicking
    /// filter skips that event for this subscriber and is counted.
    pub fn subscribe_filtered<E, F>(&self, filter: F) -> Result<Subscription<E>, BusError>
    where
        E: Event,
        F: Fn(&E) -> bool + Send + Sync + 'static,
    {
        self.subscribe_with(self.subscriber_capacity, Some(Box::new(filter)))
    }

    /// Subscribe to `E` with an explicit mailbox capacity and optional filter.
    pub fn subscribe_with<E: Event>(
        &self,
        capacity: usize,
        filter: Option<Filter<E>>,
    ) -> Result<Subscription<E>, BusError> {
        let mailbox = Mailbox::new(capacity);
        let sink = Arc::new(TypedSink {
            mailbox: mailbox.clone(),
            filter,
        });
        let id = self.register(Some(TypeId::of::<E>()), std::any::type_name::<E>(), sink)?;
        Ok(Subscription {
            id,
            core: self.core.clone(),
            rx: MailboxReceiver::new(mailbox),
        })
    }

    /// Subscribe to every event, type-erased (`Arc<dyn Event>`: use
    /// [`Event::name`] / [`Event::to_json`] or `downcast_ref`).
    pub fn subscribe_all(&self) -> Result<AuditSubscription, BusError> {
        let mailbox = Mailbox::new(self.subscriber_capacity);
        let sink = Arc::new(AllSink {
            mailbox: mailbox.clone(),
        });
        let id = self.register(None, "*", sink)?;
        Ok(Subscription {
            id,
            core: self.core.clone(),
            rx: MailboxReceiver::new(mailbox),
        })
    }

    fn register(
        &self,
        tid: Option<TypeId>,
        event: &'static str,
        sink: Arc<dyn Sink>,
    ) -> Result<u64, BusError> {
        let mut reg = write(&self.core.registry);
        // Checked under the registry lock so a concurrent `close` (which
        // takes the same lock) cannot miss this subscriber.
        if self.core.is_closed() {
            return Err(BusError::Closed);
        }
        let id = self.core.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let entry = SinkEntry { id, event, sink };
        match tid {
            Some(t) => reg.by_type.entry(t).or_default().push(entry),
            None => reg.all.push(entry),
        }
        Ok(id)
    }

    /// Remove a subscription by id. Idempotent: `false` if already gone.
    pub fn unsubscribe(&self, id: u64) -> bool {
        self.core.remove(id)
    }

    /// Deep copy of the projection state, taken after every event published
    /// before this call (from this task) has been applied.
    pub async fn snapshot(&self) -> Result<S, BusError> {
        if self.core.is_closed() {
            return Err(BusError::Closed);
        }
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Cmd::Snapshot(tx))
            .await
            .map_err(|_| BusError::Closed)?;
        rx.await.map_err(|_| BusError::Closed)
    }

    /// Resolve once every event published before this call has been fanned
    /// out to subscriber mailboxes (and counted in [`stats`](Self::stats)).
    pub async fn flush(&self) -> Result<(), BusError> {
        if self.core.is_closed() {
            return Err(BusError::Closed);
        }
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Cmd::Flush(tx))
            .await
            .map_err(|_| BusError::Closed)?;
        rx.await.map_err(|_| BusError::Closed)
    }

    /// Close the bus: every subscription stream ends, later publishes return
    /// `false`, later subscribes fail, queued events are discarded.
    /// Idempotent.
    pub fn close(&self) {
        self.core.close();
        if let Some(addr) = &self.addr {
            addr.do_send(CloseBus);
        }
    }

    /// Whether [`close`](Self::close) was called or the actor stopped.
    pub fn is_closed(&self) -> bool {
        self.core.is_closed()
    }

    /// Address of the bus actor.
    pub fn actor(&self) -> Option<Addr<BusActor<S>>> {
        self.addr.clone()
    }

    /// Counters (see [`BusStats`]).
    pub fn stats(&self) -> BusStats {
        let c = &self.core;
        let reg = read(&c.registry);
        let subscribers_detail: Vec<SubscriberStats> = reg
            .entries()
            .map(|e| SubscriberStats {
                id: e.id,
                event: e.event,
                dropped: e.sink.dropped(),
                pending: e.sink.pending(),
            })
            .collect();
        let live_dropped: u64 = subscribers_detail.iter().map(|s| s.dropped).sum();
        BusStats {
            subscribers: reg.len(),
            published: c.published.load(Ordering::Relaxed),
            delivered: c.delivered.load(Ordering::Relaxed),
            dropped_queue: c.dropped_queue.load(Ordering::Relaxed),
            dropped_subscribers: c.retired_dropped.load(Ordering::Relaxed) + live_dropped,
            panics: c.panics.load(Ordering::Relaxed),
            subscribers_detail,
        }
    }
}
