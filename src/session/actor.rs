//! The actors of the session machinery.
//!
//! - [`SessionActor`]: one per agent container, a transient child of the
//!   `sessions` supervisor keyed by container id. It runs the
//!   [`lifecycle`](super::lifecycle) as a task and owns its lifetime: stop
//!   the actor and the task is aborted (so a stopped session publishes
//!   nothing more); a panic in the task is re-raised in the actor, which the
//!   supervisor sees as a panic exit and restarts.
//! - [`sessions_spec`]: the `sessions` supervisor whose keyed children are
//!   the session actors (and so the dedup set of dials);
//! - [`Sessions`]: the front door — dial, stop, borrow a live session.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use actix::fut::wrap_future;
use actix::prelude::*;
use clawker_actors::{
    ChildExit, ChildLink, ChildSpec, ExitReason, Restart, Strategy, Supervisor, SupervisorError,
    SupervisorHandle, SupervisorSpec,
};
use tokio::sync::watch;

use crate::events::{self, AgentRef, Bus, DomainEvent, Publish, failed_reason};

use super::classify::RegistryLookup;
use super::lifecycle::{self, LiveSession, SessionDeps};

/// Name of the supervisor whose children are the session actors.
pub const SESSIONS_SUPERVISOR: &str = "sessions";

/// The bus as one session sees it: once the session has ended (a
/// terminal `SessionFailed`, published by the lifecycle task or by the
/// actor when Docker says the container is gone), nothing more from this
/// session reaches the bus (but the `AgentTerminated` of a teardown the
/// session started). The lock is held while publishing, so exactly
/// one terminal event is published, and nothing after it.
#[derive(Clone)]
pub struct SessionSink {
    bus: Bus,
    ended: Arc<Mutex<bool>>,
}

impl SessionSink {
    fn new(bus: Bus) -> Self {
        Self {
            bus,
            ended: Arc::default(),
        }
    }

    /// Publishes `event` as this session's end unless it has ended
    /// already; returns whether it was published.
    fn end_with(&self, event: events::SessionFailed) -> bool {
        let Ok(mut ended) = self.ended.lock() else {
            return false;
        };
        if *ended {
            return false;
        }
        *ended = true;
        self.bus.publish(event)
    }
}

impl Publish for SessionSink {
    fn publish<E: DomainEvent>(&self, event: E) -> bool {
        let Ok(mut ended) = self.ended.lock() else {
            return false;
        };
        // `AgentTerminated` reports the teardown a failed start step began
        // (session::terminate, on its own task): the container's `die`
        // ends the session first, and the teardown's outcome must still
        // be told.
        if *ended && E::NAME != events::AgentTerminated::NAME {
            return false;
        }
        if E::NAME == events::SessionFailed::NAME {
            *ended = true;
        }
        Publish::publish(&self.bus, event)
    }
}

/// The session's lifecycle task, aborted when dropped. Why a guard and
/// not only `stopped()`: the task is a plain tokio task, which outlives
/// its spawner; whichever way the actor goes (stop, panic, its context
/// dropped at shutdown) the session's connection and init plan must go
/// with it, or a restarted actor's session would run beside the old one.
struct LifecycleTask(tokio::task::AbortHandle);

impl Drop for LifecycleTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

pub struct SessionActor {
    container_id: String,
    deps: SessionDeps<Bus>,
    sink: SessionSink,
    task: Option<LifecycleTask>,
    live: watch::Receiver<Option<LiveSession>>,
    /// Rung by [`NetworkMoved`]; the lifecycle task listens while holding.
    moved: Arc<tokio::sync::Notify>,
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
                let sink = SessionSink::new(deps.sink.clone());
                SessionActor {
                    container_id: id,
                    deps,
                    sink,
                    task: None,
                    live,
                    moved: Arc::default(),
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
        let deps = SessionDeps {
            resolver: self.deps.resolver.clone(),
            registry: self.deps.registry.clone(),
            terminate: self.deps.terminate.clone(),
            dial: self.deps.dial.clone(),
            sink: self.sink.clone(),
            policy: self.deps.policy.clone(),
            certs: self.deps.certs.clone(),
        };
        let handle = tokio::spawn(lifecycle::run(
            self.container_id.clone(),
            deps,
            tx,
            self.moved.clone(),
        ));
        self.task = Some(LifecycleTask(handle.abort_handle()));
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
        self.task = None;
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

/// Docker says the container is down (`die`/`stop`): the session ends at
/// once with `SessionFailed{container_not_running}` — unless the lifecycle
/// task already ended it — and the task is aborted, so no
/// `SessionBroken` or reconnect follows. The supervisor then stops the
/// actor (see [`Sessions::container_gone`]).
#[derive(Message)]
#[rtype(result = "bool")]
pub struct ContainerGone;

impl Handler<ContainerGone> for SessionActor {
    type Result = bool;
    fn handle(&mut self, _: ContainerGone, _: &mut Context<Self>) -> bool {
        let who = self
            .live
            .borrow()
            .as_ref()
            .map(|l| l.agent.clone())
            .or_else(|| {
                self.deps
                    .registry
                    .lookup_by_container_id(&self.container_id)
                    .ok()
                    .map(|e| AgentRef::new(self.container_id.as_str(), e.agent_name, e.project))
            })
            .unwrap_or_else(|| AgentRef::container(self.container_id.as_str()));
        let published = self.sink.end_with(events::SessionFailed {
            agent: who,
            address: String::new(),
            reason: failed_reason::CONTAINER_NOT_RUNNING.to_owned(),
            attempts: 0,
            at: events::now(),
        });
        self.task = None;
        if published {
            tracing::info!(event = "agentdial_session_container_gone", container_id = %self.container_id, "container down (docker event); session ended");
        }
        published
    }
}

/// The container was moved between networks (quarantine, release): the
/// session re-dials if its address changed.
#[derive(Message)]
#[rtype(result = "()")]
pub struct NetworkMoved;

impl Handler<NetworkMoved> for SessionActor {
    type Result = ();
    fn handle(&mut self, _: NetworkMoved, _: &mut Context<Self>) {
        self.moved.notify_one();
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

/// The `sessions` supervisor: one transient [`SessionActor`] per container,
/// keyed by container id. Its keys are the dedup set: a second `dial` of a
/// container whose session actor exists (running or restarting) is refused
/// as a duplicate key, and the key goes when the child ends for good. A
/// panic exit is published as `SessionFailed{dial_goroutine_panic: …}`.
pub fn sessions_spec(bus: Bus, registry: Arc<dyn RegistryLookup>) -> SupervisorSpec {
    SupervisorSpec::new(SESSIONS_SUPERVISOR)
        .strategy(Strategy::OneForOne)
        // Sessions fail independently; a burst of crashes across many
        // containers must not take the whole tree down.
        .intensity(1000, Duration::from_secs(10))
        .backoff(Duration::from_millis(100), Duration::from_secs(10))
        .on_exit(move |exit: &ChildExit| {
            let (Some(id), ExitReason::Panic(msg)) = (&exit.key, &exit.reason) else {
                return;
            };
            let who = registry
                .lookup_by_container_id(id)
                .map(|e| AgentRef::new(id.as_str(), e.agent_name, e.project))
                .unwrap_or_else(|_| AgentRef::container(id.as_str()));
            tracing::error!(event = "agentdial_panic", container_id = %id, agent = %who.name, project = %who.project, panic = %msg, "session panicked");
            bus.publish(events::SessionFailed {
                agent: who,
                address: String::new(),
                reason: format!("{}{msg}", failed_reason::PANIC_PREFIX),
                attempts: 0,
                at: events::now(),
            });
        })
}

/// How [`Sessions`] reaches the `sessions` supervisor: directly, or by name
/// through the root (in the daemon the root may restart it, so its address
/// is looked up on each call).
#[derive(Clone)]
enum SupervisorRef {
    Direct(SupervisorHandle),
    ViaRoot(Arc<OnceLock<SupervisorHandle>>),
}

/// The front door of the session machinery: dial a container, stop its
/// session, borrow its live session. Cheap to clone; holds no state of its
/// own (the supervisor's children are the state).
#[derive(Clone)]
pub struct Sessions {
    supervisor: SupervisorRef,
    deps: SessionDeps<Bus>,
}

impl Sessions {
    /// Over a `sessions` supervisor started by the caller.
    pub fn new(supervisor: SupervisorHandle, deps: SessionDeps<Bus>) -> Self {
        Self {
            supervisor: SupervisorRef::Direct(supervisor),
            deps,
        }
    }

    /// Over the `sessions` child of `root` (set once the root is started).
    pub fn via_root(root: Arc<OnceLock<SupervisorHandle>>, deps: SessionDeps<Bus>) -> Self {
        Self {
            supervisor: SupervisorRef::ViaRoot(root),
            deps,
        }
    }

    async fn supervisor(&self) -> Option<SupervisorHandle> {
        match &self.supervisor {
            SupervisorRef::Direct(h) => Some(h.clone()),
            SupervisorRef::ViaRoot(root) => {
                let root = root.get()?.clone();
                root.child::<Supervisor>(SESSIONS_SUPERVISOR)
                    .await
                    .map(SupervisorHandle::from_addr)
            }
        }
    }

    /// Starts the session of a container unless one exists. Empty ids are
    /// ignored.
    pub async fn dial(&self, container_id: &str) {
        if container_id.is_empty() {
            return;
        }
        let Some(sup) = self.supervisor().await else {
            tracing::error!(
                container_id,
                "sessions supervisor not running; dial dropped"
            );
            return;
        };
        match sup
            .add_child(SessionActor::spec(container_id, self.deps.clone()))
            .await
        {
            Ok(()) | Err(SupervisorError::DuplicateKey(_)) => {}
            Err(e) => {
                tracing::error!(container_id, error = %e, "could not start session")
            }
        }
    }

    /// Stops a container's session at once (container died or was removed):
    /// no SessionBroken, no reconnect churn.
    pub async fn stop(&self, container_id: &str) {
        if let Some(sup) = self.supervisor().await {
            sup.stop_child(container_id).await;
        }
    }

    /// The open session of a container, if connected.
    pub async fn live(&self, container_id: &str) -> Option<LiveSession> {
        let addr = self
            .supervisor()
            .await?
            .child::<SessionActor>(container_id)
            .await?;
        addr.send(GetLive).await.ok().flatten()
    }

    /// The container went down (Docker `die`/`stop`): ends its session
    /// with `SessionFailed{container_not_running}` (exactly one terminal
    /// event, whoever sees the end first) and removes the session actor,
    /// so the worldview, status and metrics stop saying "connected" at
    /// once. Returns whether this call published the terminal event.
    pub async fn container_gone(&self, container_id: &str) -> bool {
        let Some(sup) = self.supervisor().await else {
            return false;
        };
        let published = match sup.child::<SessionActor>(container_id).await {
            Some(addr) => addr.send(ContainerGone).await.unwrap_or(false),
            None => false,
        };
        sup.stop_child(container_id).await;
        published
    }

    /// Tells a container's session that the container moved between
    /// networks, so it re-establishes over the new address at once
    /// (instead of after the keepalive notices the old path is gone).
    pub async fn network_moved(&self, container_id: &str) {
        let Some(sup) = self.supervisor().await else {
            return;
        };
        if let Some(addr) = sup.child::<SessionActor>(container_id).await {
            let _ = addr.send(NetworkMoved).await;
        }
    }

    /// Container ids with a session actor (running or restarting), sorted.
    pub async fn active(&self) -> Vec<String> {
        let Some(sup) = self.supervisor().await else {
            return Vec::new();
        };
        let mut ids: Vec<String> = sup
            .tree()
            .await
            .map(|t| t.children.into_iter().filter_map(|c| c.key).collect())
            .unwrap_or_default();
        ids.sort();
        ids
    }
}

/// Starts a `sessions` supervisor on the current arbiter, standalone (tests,
/// tools). The daemon starts the same spec under its root instead.
pub fn start_standalone(deps: SessionDeps<Bus>, bus: Bus) -> (Sessions, SupervisorHandle) {
    let sup = Supervisor::start(sessions_spec(bus, deps.registry.clone()));
    (Sessions::new(sup.clone(), deps), sup)
}
