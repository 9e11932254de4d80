//! OTP-style supervisor actor.
//!
//! * Child specs carry a restart type ([`Restart`]); the supervisor a
//!   [`Strategy`], an exponential [`Backoff`] between restarts and a restart
//!   [`Intensity`] (at most `max_restarts` restarts within `period`). When
//!   the intensity is exceeded the supervisor stops all its children and
//!   *escalates*: a nested supervisor exits with an error (its parent then
//!   applies its own policy); the root calls `on_escalate` and optionally
//!   stops the actix `System`.
//! * Exits are detected through [`ChildLink`](crate::ChildLink) (see
//!   `link.rs` for why actix's own supervision is not enough): a normal stop,
//!   an error stop and a panic (handler or `started()`) all produce one
//!   exit report.
//! * Dynamic children ([`SupervisorHandle::add_child`]) are keyed, can be
//!   looked up and stopped, and are always supervised one-for-one. Every
//!   child exit is published to the `on_exit` callback as a [`ChildExit`].
//! * Every decision is a structured `tracing` event under the target
//!   `clawker_actors::supervisor` with an `event` field: `child_started`,
//!   `child_exited`, `child_restarted`, `child_terminated`,
//!   `supervisor_escalated`.

use std::any::Any;
use std::collections::{HashMap, VecDeque};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use serde::Serialize;
use tokio::sync::oneshot;

use crate::backoff::Backoff;
use crate::link::{ChildExited, ChildLink, ExitHandle, ExitReason, LinkShared};
use crate::tree::{ChildState, NodeKind, TreeNode};

const TARGET: &str = "clawker_actors::supervisor";

/// When a child is restarted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Restart {
    /// Always restarted.
    Permanent,
    /// Restarted only after an abnormal exit (error or panic).
    Transient,
    /// Never restarted.
    Temporary,
}

impl std::fmt::Display for Restart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Restart::Permanent => "permanent",
            Restart::Transient => "transient",
            Restart::Temporary => "temporary",
        })
    }
}

/// Which siblings are restarted with a failed static child.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Only the failed child.
    OneForOne,
    /// All static children (stopped in reverse order, started in order).
    OneForAll,
    /// The failed child and the static children started after it.
    RestForOne,
}

impl std::fmt::Display for Strategy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Strategy::OneForOne => "one_for_one",
            Strategy::OneForAll => "one_for_all",
            Strategy::RestForOne => "rest_for_one",
        })
    }
}

/// Restart intensity: more than `max_restarts` restarts within `period`
/// makes the supervisor give up and escalate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Intensity {
    /// Restarts tolerated within `period`.
    pub max_restarts: u32,
    /// Sliding window.
    pub period: Duration,
}

impl Default for Intensity {
    fn default() -> Self {
        Self {
            max_restarts: 3,
            period: Duration::from_secs(5),
        }
    }
}

type Handle = Arc<dyn Any + Send + Sync>;
type StartFn = Arc<dyn Fn(ChildLink) -> Result<Handle, String> + Send + Sync>;
type ExitCallback = Arc<dyn Fn(&ChildExit) + Send + Sync>;
type EscalationCallback = Arc<dyn Fn(&Escalation) + Send + Sync>;

#[derive(Clone, Copy)]
enum SpecKind {
    Worker,
    Supervisor(Strategy),
}

/// How to start (and restart) one child.
#[derive(Clone)]
pub struct ChildSpec {
    name: String,
    key: Option<String>,
    restart: Restart,
    kind: SpecKind,
    start: StartFn,
}

impl ChildSpec {
    /// A worker actor. `start` is called for every (re)start with a fresh
    /// [`ChildLink`] that the actor must keep alive, normally via
    /// `A::create(|ctx| { link.attach(ctx); ... })`. Returning `Err` counts
    /// as an error exit. Default restart type: permanent.
    pub fn worker<A, F>(name: impl Into<String>, start: F) -> Self
    where
        A: Actor,
        F: Fn(ChildLink) -> Result<Addr<A>, String> + Send + Sync + 'static,
    {
        Self {
            name: name.into(),
            key: None,
            restart: Restart::Permanent,
            kind: SpecKind::Worker,
            start: Arc::new(move |link| start(link).map(|a| Arc::new(a) as Handle)),
        }
    }

    /// A nested supervisor (restart type: permanent by default).
    pub fn supervisor(spec: SupervisorSpec) -> Self {
        let name = spec.name.clone();
        let strategy = spec.strategy;
        Self {
            name,
            key: None,
            restart: Restart::Permanent,
            kind: SpecKind::Supervisor(strategy),
            start: Arc::new(move |link| {
                Ok(Arc::new(Supervisor::start_linked(spec.clone(), link)) as Handle)
            }),
        }
    }

    /// Set the restart type.
    pub fn restart(mut self, restart: Restart) -> Self {
        self.restart = restart;
        self
    }

    /// Set the key (unique among the supervisor's children).
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Spec name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl std::fmt::Debug for ChildSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChildSpec")
            .field("name", &self.name)
            .field("key", &self.key)
            .field("restart", &self.restart)
            .finish()
    }
}

/// Published to `on_exit` for every child exit (static or dynamic).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChildExit {
    /// Supervisor name.
    pub supervisor: String,
    /// Child spec name.
    pub name: String,
    /// Child key, if any.
    pub key: Option<String>,
    /// Why it ended.
    pub reason: ExitReason,
    /// Whether the supervisor will restart it.
    pub restarting: bool,
}

impl Message for ChildExit {
    type Result = ();
}

/// Passed to the root's `on_escalate` callback.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Escalation {
    /// Supervisor that gave up.
    pub supervisor: String,
    /// Why.
    pub reason: String,
}

/// Supervisor configuration.
#[derive(Clone)]
pub struct SupervisorSpec {
    name: String,
    strategy: Strategy,
    intensity: Intensity,
    backoff: Backoff,
    children: Vec<ChildSpec>,
    on_exit: Option<ExitCallback>,
    on_escalate: Option<EscalationCallback>,
    stop_system_on_escalation: bool,
}

impl SupervisorSpec {
    /// One-for-one supervisor with default intensity and backoff.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            strategy: Strategy::OneForOne,
            intensity: Intensity::default(),
            backoff: Backoff::default(),
            children: Vec::new(),
            on_exit: None,
            on_escalate: None,
            stop_system_on_escalation: false,
        }
    }

    /// Restart strategy for static children.
    pub fn strategy(mut self, s: Strategy) -> Self {
        self.strategy = s;
        self
    }

    /// Restart intensity.
    pub fn intensity(mut self, max_restarts: u32, period: Duration) -> Self {
        self.intensity = Intensity {
            max_restarts,
            period,
        };
        self
    }

    /// Backoff between restarts.
    pub fn backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.backoff = Backoff::new(initial, max);
        self
    }

    /// Add a static child (started in order).
    pub fn child(mut self, spec: ChildSpec) -> Self {
        self.children.push(spec);
        self
    }

    /// Called on the supervisor's thread for every child exit. Keep it
    /// cheap: typically `recipient.do_send(exit.clone())`.
    pub fn on_exit(mut self, f: impl Fn(&ChildExit) + Send + Sync + 'static) -> Self {
        self.on_exit = Some(Arc::new(f));
        self
    }

    /// Root only: called when this supervisor escalates (a nested
    /// supervisor escalates to its parent instead).
    pub fn on_escalate(mut self, f: impl Fn(&Escalation) + Send + Sync + 'static) -> Self {
        self.on_escalate = Some(Arc::new(f));
        self
    }

    /// Root only: stop the actix `System` (exit code 1) on escalation.
    pub fn stop_system_on_escalation(mut self, yes: bool) -> Self {
        self.stop_system_on_escalation = yes;
        self
    }
}

/// Errors from supervisor requests.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SupervisorError {
    /// A child with this key already exists.
    #[error("a child with key {0:?} already exists")]
    DuplicateKey(String),
    /// The supervisor has stopped (escalated or shut down).
    #[error("supervisor is not running")]
    NotRunning,
}

struct Child {
    id: u64,
    spec: ChildSpec,
    dynamic: bool,
    generation: u64,
    handle: Option<Handle>,
    stop_tx: Option<oneshot::Sender<()>>,
    state: ChildState,
    restarts: u32,
    attempt: u32,
    started_at: Option<Instant>,
    last_exit: Option<ExitReason>,
    pending_token: u64,
}

impl Child {
    fn new(id: u64, spec: ChildSpec, dynamic: bool) -> Self {
        Self {
            id,
            spec,
            dynamic,
            generation: 0,
            handle: None,
            stop_tx: None,
            state: ChildState::Starting,
            restarts: 0,
            attempt: 0,
            started_at: None,
            last_exit: None,
            pending_token: 0,
        }
    }

    fn key_str(&self) -> &str {
        self.spec.key.as_deref().unwrap_or("")
    }
}

/// The supervisor actor. Start with [`Supervisor::start`] (root) or nest
/// with [`ChildSpec::supervisor`].
pub struct Supervisor {
    spec: SupervisorSpec,
    children: Vec<Child>,
    next_id: u64,
    restarts: VecDeque<Instant>,
    started_at: Instant,
    exit: Option<ExitHandle>,
    escalated: bool,
    stopping: bool,
    token: u64,
    /// Children the supervisor asked to stop, by (id, generation), so their
    /// later exit report is published as `Shutdown` instead of triggering
    /// a restart.
    terminating: HashMap<(u64, u64), (String, Option<String>)>,
}

impl Supervisor {
    /// Start a root supervisor on the current arbiter.
    pub fn start(spec: SupervisorSpec) -> SupervisorHandle {
        crate::panic::install_panic_hook();
        let addr = Supervisor::create(|_| Supervisor::new(spec, None));
        SupervisorHandle { addr }
    }

    fn start_linked(spec: SupervisorSpec, link: ChildLink) -> Addr<Supervisor> {
        crate::panic::install_panic_hook();
        Supervisor::create(move |ctx| {
            let exit = link.attach(ctx);
            Supervisor::new(spec, Some(exit))
        })
    }

    fn new(mut spec: SupervisorSpec, exit: Option<ExitHandle>) -> Self {
        let statics = std::mem::take(&mut spec.children);
        let children = statics
            .into_iter()
            .enumerate()
            .map(|(i, s)| Child::new(i as u64 + 1, s, false))
            .collect::<Vec<_>>();
        Self {
            next_id: children.len() as u64 + 1,
            spec,
            children,
            restarts: VecDeque::new(),
            started_at: Instant::now(),
            exit,
            escalated: false,
            stopping: false,
            token: 0,
            terminating: HashMap::new(),
        }
    }

    fn name(&self) -> &str {
        &self.spec.name
    }

    fn start_child(&mut self, idx: usize, ctx: &mut Context<Self>) {
        let recipient = ctx.address().recipient::<ChildExited>();
        let sup = self.spec.name.clone();
        let child = &mut self.children[idx];
        child.generation += 1;
        child.state = ChildState::Starting;
        child.started_at = Some(Instant::now());
        let (stop_tx, stop_rx) = oneshot::channel();
        let shared = LinkShared::new(recipient, child.id, child.generation);
        let link = ChildLink::new(
            shared.clone(),
            stop_rx,
            child.spec.name.clone(),
            child.spec.key.clone(),
        );
        let start = child.spec.start.clone();
        // Why catch_unwind: a start function runs on the supervisor's own
        // task; its panic must count as that child's failure, not kill us.
        let result = catch_unwind(AssertUnwindSafe(|| start(link)));
        let (child_id, generation) = (child.id, child.generation);
        match result {
            Ok(Ok(handle)) => {
                child.handle = Some(handle);
                child.stop_tx = Some(stop_tx);
                child.state = ChildState::Running;
                tracing::info!(
                    target: TARGET,
                    event = "child_started",
                    supervisor = %sup,
                    child = %child.spec.name,
                    key = child.key_str(),
                    generation,
                    "child_started"
                );
                if let Some(reason) = shared.arm() {
                    ctx.notify(ChildExited {
                        child_id,
                        generation,
                        reason,
                    });
                }
            }
            Ok(Err(e)) => {
                shared.disarm();
                ctx.notify(ChildExited {
                    child_id,
                    generation,
                    reason: ExitReason::Error(format!("start failed: {e}")),
                });
            }
            Err(_) => {
                shared.disarm();
                ctx.notify(ChildExited {
                    child_id,
                    generation,
                    reason: ExitReason::Panic(format!(
                        "start panicked: {}",
                        crate::panic::current_panic_message()
                    )),
                });
            }
        }
    }

    /// Ask a running child to stop; its exit report will be treated as a
    /// shutdown. Returns whether a stop request was sent.
    fn terminate(&mut self, idx: usize) -> bool {
        let sup = self.spec.name.clone();
        let c = &mut self.children[idx];
        c.handle = None;
        let sent = match c.stop_tx.take() {
            Some(tx) => {
                let _ = tx.send(());
                self.terminating.insert(
                    (c.id, c.generation),
                    (c.spec.name.clone(), c.spec.key.clone()),
                );
                tracing::info!(
                    target: TARGET,
                    event = "child_terminated",
                    supervisor = %sup,
                    child = %c.spec.name,
                    key = c.key_str(),
                    "child_terminated"
                );
                true
            }
            None => false,
        };
        // Invalidate any in-flight report or pending restart of this
        // incarnation.
        c.generation += 1;
        c.pending_token = 0;
        c.state = ChildState::Stopped;
        sent
    }

    fn notify_exit(&self, exit: ChildExit) {
        if let Some(cb) = &self.spec.on_exit {
            // A panicking callback must not take the supervisor down.
            if catch_unwind(AssertUnwindSafe(|| cb(&exit))).is_err() {
                tracing::error!(target: TARGET, supervisor = %self.spec.name, "on_exit callback panicked");
            }
        }
    }

    fn log_exit(&self, name: &str, key: Option<&str>, reason: &ExitReason, restarting: bool) {
        let key = key.unwrap_or("");
        if reason.is_abnormal() {
            tracing::warn!(target: TARGET, event = "child_exited", supervisor = %self.spec.name,
                child = %name, key, reason = %reason, restarting, "child_exited");
        } else {
            tracing::info!(target: TARGET, event = "child_exited", supervisor = %self.spec.name,
                child = %name, key, reason = %reason, restarting, "child_exited");
        }
    }

    fn handle_exit(&mut self, msg: ChildExited, ctx: &mut Context<Self>) {
        let ChildExited {
            child_id,
            generation,
            reason,
        } = msg;
        let idx = self
            .children
            .iter()
            .position(|c| c.id == child_id && c.generation == generation);
        let Some(idx) = idx else {
            // A child we stopped on purpose (or a stale incarnation).
            if let Some((name, key)) = self.terminating.remove(&(child_id, generation)) {
                let reason = if reason.is_abnormal() {
                    reason
                } else {
                    ExitReason::Shutdown
                };
                self.log_exit(&name, key.as_deref(), &reason, false);
                self.notify_exit(ChildExit {
                    supervisor: self.spec.name.clone(),
                    name,
                    key,
                    reason,
                    restarting: false,
                });
            }
            return;
        };

        let stopping = self.stopping || self.escalated;
        let c = &mut self.children[idx];
        c.handle = None;
        c.stop_tx = None;
        c.last_exit = Some(reason.clone());
        let uptime = c.started_at.map(|t| t.elapsed()).unwrap_or_default();
        let restart = !stopping
            && match c.spec.restart {
                Restart::Permanent => true,
                Restart::Transient => reason.is_abnormal(),
                Restart::Temporary => false,
            };
        let (name, key, dynamic) = (c.spec.name.clone(), c.spec.key.clone(), c.dynamic);
        if !restart {
            c.state = if reason.is_abnormal() {
                ChildState::Failed
            } else {
                ChildState::Stopped
            };
            if dynamic {
                self.children.remove(idx);
            }
        }
        self.log_exit(&name, key.as_deref(), &reason, restart);
        self.notify_exit(ChildExit {
            supervisor: self.spec.name.clone(),
            name: name.clone(),
            key,
            reason: reason.clone(),
            restarting: restart,
        });
        if !restart {
            return;
        }

        // Restart intensity: sliding window of restart instants.
        let now = Instant::now();
        let period = self.spec.intensity.period;
        while self
            .restarts
            .front()
            .is_some_and(|t| now.duration_since(*t) > period)
        {
            self.restarts.pop_front();
        }
        self.restarts.push_back(now);
        if self.restarts.len() as u32 > self.spec.intensity.max_restarts {
            let why = format!(
                "restart intensity exceeded ({} restarts in {:?}); last exit of {name}: {reason}",
                self.spec.intensity.max_restarts, period
            );
            self.escalate(why, ctx);
            return;
        }

        let c = &mut self.children[idx];
        if uptime > period {
            c.attempt = 0;
        }
        c.attempt += 1;
        let attempt = c.attempt;
        let backoff = self.spec.backoff.delay(attempt);

        let group: Vec<usize> = if dynamic {
            vec![idx]
        } else {
            let statics = self.children.iter().enumerate().filter(|(_, c)| !c.dynamic);
            match self.spec.strategy {
                Strategy::OneForOne => vec![idx],
                Strategy::OneForAll => statics.map(|(i, _)| i).collect(),
                Strategy::RestForOne => {
                    statics.filter(|(i, _)| *i >= idx).map(|(i, _)| i).collect()
                }
            }
        };
        // Stop the affected siblings in reverse start order.
        for &j in group.iter().rev() {
            if j != idx {
                self.terminate(j);
            }
        }
        self.token += 1;
        let token = self.token;
        let ids: Vec<u64> = group
            .iter()
            .map(|&j| {
                let c = &mut self.children[j];
                c.state = ChildState::Restarting;
                c.pending_token = token;
                c.id
            })
            .collect();
        ctx.run_later(backoff, move |act, ctx| {
            act.restart_group(&ids, token, attempt, backoff, ctx)
        });
    }

    fn restart_group(
        &mut self,
        ids: &[u64],
        token: u64,
        attempt: u32,
        backoff: Duration,
        ctx: &mut Context<Self>,
    ) {
        if self.stopping || self.escalated {
            return;
        }
        for id in ids {
            let Some(idx) = self.children.iter().position(|c| c.id == *id) else {
                continue;
            };
            let c = &mut self.children[idx];
            if c.state != ChildState::Restarting || c.pending_token != token {
                continue;
            }
            c.restarts += 1;
            tracing::info!(
                target: TARGET,
                event = "child_restarted",
                supervisor = %self.spec.name,
                child = %c.spec.name,
                key = c.key_str(),
                attempt,
                backoff_ms = backoff.as_millis() as u64,
                restarts = c.restarts,
                "child_restarted"
            );
            self.start_child(idx, ctx);
        }
    }

    fn escalate(&mut self, reason: String, ctx: &mut Context<Self>) {
        self.escalated = true;
        tracing::error!(
            target: TARGET,
            event = "supervisor_escalated",
            supervisor = %self.spec.name,
            reason = %reason,
            root = self.exit.is_none(),
            "supervisor_escalated"
        );
        for j in (0..self.children.len()).rev() {
            self.terminate(j);
        }
        match &self.exit {
            Some(exit) => exit.fail(format!("supervisor {} escalated: {reason}", self.spec.name)),
            None => {
                let esc = Escalation {
                    supervisor: self.spec.name.clone(),
                    reason,
                };
                if let Some(cb) = &self.spec.on_escalate
                    && catch_unwind(AssertUnwindSafe(|| cb(&esc))).is_err()
                {
                    tracing::error!(target: TARGET, "on_escalate callback panicked");
                }
                if self.spec.stop_system_on_escalation {
                    System::current().stop_with_code(1);
                }
            }
        }
        ctx.stop();
    }

    fn find(&self, key: &str) -> Option<usize> {
        self.children
            .iter()
            .position(|c| c.spec.key.as_deref() == Some(key))
            .or_else(|| {
                self.children
                    .iter()
                    .position(|c| c.spec.key.is_none() && c.spec.name == key)
            })
    }

    fn node(&self) -> TreeNode {
        TreeNode {
            name: self.spec.name.clone(),
            key: None,
            kind: NodeKind::Supervisor {
                strategy: self.spec.strategy,
            },
            restart: None,
            state: if self.escalated {
                ChildState::Failed
            } else if self.stopping {
                ChildState::Stopped
            } else {
                ChildState::Running
            },
            restarts: 0,
            uptime_ms: Some(self.started_at.elapsed().as_millis() as u64),
            last_exit: None,
            children: Vec::new(),
        }
    }
}

impl Actor for Supervisor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        // Exit reports use `do_send`, which ignores the mailbox capacity, so
        // a dying child's Drop never waits on us.
        tracing::info!(target: TARGET, event = "supervisor_started", supervisor = %self.spec.name,
            strategy = %self.spec.strategy, children = self.children.len(), "supervisor_started");
        for idx in 0..self.children.len() {
            self.start_child(idx, ctx);
        }
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        self.stopping = true;
        for j in (0..self.children.len()).rev() {
            self.terminate(j);
        }
        tracing::info!(target: TARGET, event = "supervisor_stopped", supervisor = %self.name(), "supervisor_stopped");
    }
}

impl Handler<ChildExited> for Supervisor {
    type Result = ();
    fn handle(&mut self, msg: ChildExited, ctx: &mut Context<Self>) {
        self.handle_exit(msg, ctx);
    }
}

/// Add a dynamic child.
struct AddChild(ChildSpec);
impl Message for AddChild {
    type Result = Result<(), SupervisorError>;
}
impl Handler<AddChild> for Supervisor {
    type Result = Result<(), SupervisorError>;
    fn handle(&mut self, AddChild(spec): AddChild, ctx: &mut Context<Self>) -> Self::Result {
        if self.stopping || self.escalated {
            return Err(SupervisorError::NotRunning);
        }
        if let Some(k) = &spec.key
            && self.children.iter().any(|c| c.spec.key.as_ref() == Some(k))
        {
            return Err(SupervisorError::DuplicateKey(k.clone()));
        }
        let id = self.next_id;
        self.next_id += 1;
        self.children.push(Child::new(id, spec, true));
        let idx = self.children.len() - 1;
        self.start_child(idx, ctx);
        Ok(())
    }
}

/// Stop a child by key (or name for unkeyed children).
struct StopChild(String);
impl Message for StopChild {
    type Result = bool;
}
impl Handler<StopChild> for Supervisor {
    type Result = bool;
    fn handle(&mut self, StopChild(key): StopChild, _: &mut Context<Self>) -> bool {
        let Some(idx) = self.find(&key) else {
            return false;
        };
        self.terminate(idx);
        if self.children[idx].dynamic {
            self.children.remove(idx);
        }
        true
    }
}

struct GetChild(String);
impl Message for GetChild {
    type Result = Option<Handle>;
}
impl Handler<GetChild> for Supervisor {
    type Result = Option<Handle>;
    fn handle(&mut self, GetChild(key): GetChild, _: &mut Context<Self>) -> Option<Handle> {
        self.find(&key)
            .and_then(|i| self.children[i].handle.clone())
    }
}

struct GetTree;
impl Message for GetTree {
    type Result = TreeNode;
}
impl Handler<GetTree> for Supervisor {
    type Result = ResponseFuture<TreeNode>;
    fn handle(&mut self, _: GetTree, _: &mut Context<Self>) -> Self::Result {
        let mut root = self.node();
        let parts: Vec<(TreeNode, Option<Addr<Supervisor>>)> = self
            .children
            .iter()
            .map(|c| {
                let (kind, sub) = match c.spec.kind {
                    SpecKind::Worker => (NodeKind::Worker, None),
                    SpecKind::Supervisor(strategy) => (
                        NodeKind::Supervisor { strategy },
                        c.handle
                            .as_ref()
                            .and_then(|h| h.downcast_ref::<Addr<Supervisor>>().cloned()),
                    ),
                };
                let node = TreeNode {
                    name: c.spec.name.clone(),
                    key: c.spec.key.clone(),
                    kind,
                    restart: Some(c.spec.restart),
                    state: c.state,
                    restarts: c.restarts,
                    uptime_ms: match c.state {
                        ChildState::Running => c.started_at.map(|t| t.elapsed().as_millis() as u64),
                        _ => None,
                    },
                    last_exit: c.last_exit.clone(),
                    children: Vec::new(),
                };
                (node, sub)
            })
            .collect();
        Box::pin(async move {
            for (mut node, sub) in parts {
                if let Some(addr) = sub
                    && let Ok(t) = addr.send(GetTree).await
                {
                    node.children = t.children;
                }
                root.children.push(node);
            }
            root
        })
    }
}

struct Shutdown;
impl Message for Shutdown {
    type Result = ();
}
impl Handler<Shutdown> for Supervisor {
    type Result = ();
    fn handle(&mut self, _: Shutdown, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}

/// Cheap-to-clone handle to a running supervisor.
#[derive(Clone)]
pub struct SupervisorHandle {
    addr: Addr<Supervisor>,
}

impl std::fmt::Debug for SupervisorHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SupervisorHandle")
            .field("alive", &self.addr.connected())
            .finish()
    }
}

impl SupervisorHandle {
    /// Wrap the address of a (nested) supervisor, e.g. one returned by
    /// [`SupervisorHandle::child`]`::<Supervisor>`.
    pub fn from_addr(addr: Addr<Supervisor>) -> Self {
        Self { addr }
    }

    /// The supervisor's actor address.
    pub fn addr(&self) -> &Addr<Supervisor> {
        &self.addr
    }

    /// Whether the supervisor actor is still running.
    pub fn is_alive(&self) -> bool {
        self.addr.connected()
    }

    /// Add and start a dynamic child (supervised one-for-one with its own
    /// restart type). Fails on a duplicate key. Start failures are reported
    /// asynchronously like any other exit.
    pub async fn add_child(&self, spec: ChildSpec) -> Result<(), SupervisorError> {
        self.addr
            .send(AddChild(spec))
            .await
            .map_err(|_| SupervisorError::NotRunning)?
    }

    /// Stop a child (by key, or by name for unkeyed children) without
    /// restarting it; a dynamic child is removed. Its exit is published as
    /// [`ExitReason::Shutdown`]. Returns whether it existed.
    pub async fn stop_child(&self, key: &str) -> bool {
        self.addr
            .send(StopChild(key.to_string()))
            .await
            .unwrap_or(false)
    }

    /// Address of the current incarnation of a running child (by key, or by
    /// name for unkeyed children), if it is an `A`.
    pub async fn child<A: Actor>(&self, key: &str) -> Option<Addr<A>> {
        let h = self.addr.send(GetChild(key.to_string())).await.ok()??;
        h.downcast_ref::<Addr<A>>().cloned()
    }

    /// Snapshot of the tree under this supervisor.
    pub async fn tree(&self) -> Result<TreeNode, SupervisorError> {
        self.addr
            .send(GetTree)
            .await
            .map_err(|_| SupervisorError::NotRunning)
    }

    /// Stop the supervisor and (transitively) all its children.
    pub fn shutdown(&self) {
        self.addr.do_send(Shutdown);
    }
}
