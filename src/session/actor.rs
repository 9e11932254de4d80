//! The actors of the session machinery.
//!
//! - [`SessionActor`]: one per agent container, a transient child of the
//!   `sessions` supervisor keyed by container id. It runs the
//!   [`lifecycle`](super::lifecycle) as a task and owns its lifetime: stop
//!   the actor and the task is aborted (so a stopped session publishes
//!   nothing more); a panic in the task is re-raised in the actor, which the
//!   supervisor sees as a panic exit and restarts.
//! - [`Dialer`]: the front door. `Dial(id)` is fire-and-forget and
//!   deduplicated by container id for the whole life of that container's
//!   session actor (restarts included); the entry is cleared when the child
//!   ends for good. A panic exit is published as
//!   `SessionFailed{dial_goroutine_panic: …}`.

use std::collections::HashSet;

use actix::fut::wrap_future;
use actix::prelude::*;
use clawker_actors::{
    ChildExit, ChildLink, ChildSpec, ExitReason, Restart, Supervisor, SupervisorHandle,
};
use tokio::sync::watch;

use crate::events::{self, Bus, failed_reason};

use super::lifecycle::{self, LiveSession, SessionDeps};

/// Where the dialer currently lives; updated when it (re)starts.
pub type DialerSlot = std::sync::Arc<arc_swap::ArcSwapOption<Addr<Dialer>>>;

/// Name of the supervisor whose children are the session actors.
pub const SESSIONS_SUPERVISOR: &str = "sessions";

pub struct SessionActor {
    container_id: String,
    deps: SessionDeps<Bus>,
    task: Option<tokio::task::AbortHandle>,
    live: watch::Receiver<Option<LiveSession>>,
}

impl SessionActor {
    /// The child spec the dialer adds for one container.
    pub fn spec(container_id: &str, deps: SessionDeps<Bus>) -> ChildSpec {
        let id = container_id.to_owned();
        ChildSpec::worker("session", move |link: ChildLink| {
            let deps = deps.clone();
            let id = id.clone();
            Ok(SessionActor::create(move |ctx| {
                link.attach(ctx);
                let (_, live) = watch::channel(None);
                SessionActor {
                    container_id: id,
                    deps,
                    task: None,
                    live,
                }
            }))
        })
        .key(container_id)
        .restart(Restart::Transient)
    }
}

impl Actor for SessionActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let (tx, rx) = watch::channel(None);
        self.live = rx;
        let handle = tokio::spawn(lifecycle::run(
            self.container_id.clone(),
            self.deps.clone(),
            tx,
        ));
        self.task = Some(handle.abort_handle());
        ctx.spawn(
            wrap_future::<_, Self>(handle).map(|res, _act, ctx: &mut Context<Self>| {
                match res {
                    Err(e) if e.is_panic() => {
                        let payload = e.into_panic();
                        let msg = payload
                            .downcast_ref::<&str>()
                            .map(|s| (*s).to_owned())
                            .or_else(|| payload.downcast_ref::<String>().cloned())
                            .unwrap_or_else(|| "non-string panic payload".to_owned());
                        // Re-raise inside the actor: the supervisor's link sees
                        // a panic exit, exactly as for a panicking handler.
                        panic!("{msg}");
                    }
                    // Terminal SessionFailed already published, or cancelled.
                    _ => ctx.stop(),
                }
            }),
        );
    }

    fn stopped(&mut self, _ctx: &mut Context<Self>) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// The open session of this actor, if connected.
#[derive(Message)]
#[rtype(result = "Option<LiveSession>")]
pub struct GetLive;

impl Handler<GetLive> for SessionActor {
    type Result = Option<LiveSession>;
    fn handle(&mut self, _: GetLive, _: &mut Context<Self>) -> Self::Result {
        self.live.borrow().clone()
    }
}

/// Test hook: makes the session actor panic (proves containment). Only
/// with the `test-hooks` feature, which only the integration tests enable.
#[cfg(feature = "test-hooks")]
#[derive(Message)]
#[rtype(result = "()")]
pub struct Crash;

#[cfg(feature = "test-hooks")]
impl Handler<Crash> for SessionActor {
    type Result = ();
    fn handle(&mut self, _: Crash, _: &mut Context<Self>) {
        panic!("session actor crash requested");
    }
}

/// How the dialer reaches the `sessions` supervisor: directly, or by name
/// through its parent (in the daemon the root starts both as siblings).
#[derive(Clone)]
pub enum SessionsRef {
    Direct(SupervisorHandle),
    ViaParent(std::sync::Arc<std::sync::OnceLock<SupervisorHandle>>),
}

impl SessionsRef {
    async fn get(&self) -> Option<SupervisorHandle> {
        match self {
            SessionsRef::Direct(h) => Some(h.clone()),
            SessionsRef::ViaParent(root) => {
                let root = root.get()?.clone();
                root.child::<Supervisor>(SESSIONS_SUPERVISOR)
                    .await
                    .map(SupervisorHandle::from_addr)
            }
        }
    }
}

/// The dialer front: dedup set + the door to the `sessions` supervisor.
pub struct Dialer {
    sessions: SessionsRef,
    deps: SessionDeps<Bus>,
    bus: Bus,
    active: HashSet<String>,
}

impl Dialer {
    pub fn new(sessions: SupervisorHandle, deps: SessionDeps<Bus>, bus: Bus) -> Self {
        Self {
            sessions: SessionsRef::Direct(sessions),
            deps,
            bus,
            active: HashSet::new(),
        }
    }

    /// A dialer that finds `sessions` as a sibling under `root`.
    pub fn via_parent(
        root: std::sync::Arc<std::sync::OnceLock<SupervisorHandle>>,
        deps: SessionDeps<Bus>,
        bus: Bus,
    ) -> Self {
        Self {
            sessions: SessionsRef::ViaParent(root),
            deps,
            bus,
            active: HashSet::new(),
        }
    }

    /// The `sessions` supervisor spec, wired so every child exit reaches
    /// the dialer whose address `dialer` will hold.
    pub fn sessions_spec(dialer: DialerSlot) -> clawker_actors::SupervisorSpec {
        clawker_actors::SupervisorSpec::new(SESSIONS_SUPERVISOR)
            .strategy(clawker_actors::Strategy::OneForOne)
            // Sessions fail independently; a burst of crashes across many
            // containers must not take the whole dialer down.
            .intensity(1000, std::time::Duration::from_secs(10))
            .backoff(
                std::time::Duration::from_millis(100),
                std::time::Duration::from_secs(10),
            )
            .on_exit(move |exit: &ChildExit| {
                if let Some(d) = dialer.load_full() {
                    d.do_send(SessionExited(exit.clone()));
                }
            })
    }
}

impl Actor for Dialer {
    type Context = Context<Self>;
}

/// Start (once) the session of a container. Fire-and-forget.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Dial(pub String);

impl Handler<Dial> for Dialer {
    type Result = ();
    fn handle(&mut self, Dial(id): Dial, ctx: &mut Context<Self>) {
        if id.is_empty() || !self.active.insert(id.clone()) {
            return; // empty id, or a session already owns this container
        }
        let sessions = self.sessions.clone();
        let spec = SessionActor::spec(&id, self.deps.clone());
        ctx.spawn(wrap_future::<_, Self>(async move {
            match sessions.get().await {
                Some(s) => s.add_child(spec).await.map_err(|e| e.to_string()),
                None => Err("sessions supervisor not running".to_owned()),
            }
        }).map(
            move |res, act: &mut Dialer, _ctx| {
                if let Err(e) = res {
                    tracing::error!(container_id = %id, error = %e, "dialer: could not start session");
                    act.active.remove(&id);
                }
            },
        ));
    }
}

/// Stop a container's session at once (container died or was removed):
/// no SessionBroken, no reconnect churn.
#[derive(Message)]
#[rtype(result = "()")]
pub struct StopSession(pub String);

impl Handler<StopSession> for Dialer {
    type Result = ();
    fn handle(&mut self, StopSession(id): StopSession, ctx: &mut Context<Self>) {
        if !self.active.contains(&id) {
            return;
        }
        let sessions = self.sessions.clone();
        ctx.spawn(wrap_future::<_, Self>(async move {
            if let Some(s) = sessions.get().await {
                s.stop_child(&id).await;
            }
        }));
    }
}

/// A session child ended (from the supervisor's exit hook).
#[derive(Message)]
#[rtype(result = "()")]
struct SessionExited(ChildExit);

impl Handler<SessionExited> for Dialer {
    type Result = ();
    fn handle(&mut self, SessionExited(exit): SessionExited, _: &mut Context<Self>) {
        let Some(id) = exit.key.clone() else { return };
        if let ExitReason::Panic(msg) = &exit.reason {
            let (agent, project) = self
                .deps
                .registry
                .lookup_by_container_id(&id)
                .map(|e| (e.agent_name, e.project))
                .unwrap_or_default();
            tracing::error!(event = "agentdial_panic", container_id = %id, %agent, %project, panic = %msg, "session panicked");
            self.bus.publish(events::SessionFailed {
                container_id: id.clone(),
                agent,
                project,
                address: String::new(),
                reason: format!("{}{msg}", failed_reason::PANIC_PREFIX),
                attempts: 0,
                at: events::now(),
            });
        }
        if !exit.restarting {
            self.active.remove(&id);
        }
    }
}

/// Container ids with a live session actor.
#[derive(Message)]
#[rtype(result = "Vec<String>")]
pub struct ActiveSessions;

impl Handler<ActiveSessions> for Dialer {
    type Result = MessageResult<ActiveSessions>;
    fn handle(&mut self, _: ActiveSessions, _: &mut Context<Self>) -> Self::Result {
        let mut v: Vec<String> = self.active.iter().cloned().collect();
        v.sort();
        MessageResult(v)
    }
}

/// The open session of a container, if any (for containment commands).
#[derive(Message)]
#[rtype(result = "Option<LiveSession>")]
pub struct LiveSessionOf(pub String);

impl Handler<LiveSessionOf> for Dialer {
    type Result = ResponseFuture<Option<LiveSession>>;
    fn handle(&mut self, LiveSessionOf(id): LiveSessionOf, _: &mut Context<Self>) -> Self::Result {
        let sessions = self.sessions.clone();
        Box::pin(async move {
            let addr = sessions.get().await?.child::<SessionActor>(&id).await?;
            addr.send(GetLive).await.ok().flatten()
        })
    }
}

/// Starts the `sessions` supervisor and the dialer front on the current
/// arbiter, standalone (tests, tools). The daemon wires the same two into
/// its root supervisor instead.
pub fn start_standalone(deps: SessionDeps<Bus>, bus: Bus) -> (Addr<Dialer>, SupervisorHandle) {
    let slot: DialerSlot = Default::default();
    let sessions = Supervisor::start(Dialer::sessions_spec(slot.clone()));
    let dialer = Dialer::new(sessions.clone(), deps, bus).start();
    slot.store(Some(std::sync::Arc::new(dialer.clone())));
    (dialer, sessions)
}
