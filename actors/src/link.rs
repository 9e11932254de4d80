//! The link between a supervised child and its supervisor.
//!
//! Why a link object and not actix's `Supervised`: with actix 0.13 a panic
//! in a handler (or in `started()`) unwinds out of the actor's task; tokio
//! catches it, the actor's `stopped()` still runs from the context's `Drop`,
//! its mailbox closes and sibling actors on the arbiter live on — but
//! nothing is told, and actix's `Supervisor` only restarts actors that stop
//! themselves. (Verified empirically, see the `actix_panic_semantics` tests.)
//!
//! So every child receives a [`ChildLink`] from its start function and keeps
//! it alive for exactly as long as the actor lives, usually by calling
//! [`ChildLink::attach`] on the actor's context (the link then lives inside
//! the context and is dropped with it). The link's `Drop` sends one exit
//! report to the supervisor:
//!
//! * dropped while the thread is unwinding ([`std::thread::panicking`]) ⇒
//!   [`ExitReason::Panic`] (tokio drops a panicked task's future *inside* its
//!   panic guard, so this holds for handler and `started()` panics alike);
//! * otherwise, if [`ExitHandle::fail`] recorded an error ⇒
//!   [`ExitReason::Error`];
//! * otherwise [`ExitReason::Normal`].
//!
//! Works for a child on any arbiter (the report is an actix message).

use std::sync::{Arc, Mutex};

use actix::fut::{ActorFutureExt, wrap_future};
use actix::prelude::*;
use serde::Serialize;
use tokio::sync::oneshot;

use crate::mailbox::lock;

/// Why a child ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", content = "detail", rename_all = "snake_case")]
pub enum ExitReason {
    /// The child stopped by itself without error.
    Normal,
    /// The supervisor stopped it (stop_child, sibling restart, escalation,
    /// supervisor shutdown).
    Shutdown,
    /// The child reported an error ([`ExitHandle::fail`]) or failed to start.
    Error(String),
    /// The child panicked (message captured by the crate's panic hook).
    Panic(String),
}

impl ExitReason {
    /// Error or panic: what `transient` children are restarted for.
    pub fn is_abnormal(&self) -> bool {
        matches!(self, ExitReason::Error(_) | ExitReason::Panic(_))
    }
}

impl std::fmt::Display for ExitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitReason::Normal => f.write_str("normal"),
            ExitReason::Shutdown => f.write_str("shutdown"),
            ExitReason::Error(e) => write!(f, "error: {e}"),
            ExitReason::Panic(p) => write!(f, "panic: {p}"),
        }
    }
}

/// Internal exit report sent by a dropped link.
pub(crate) struct ChildExited {
    pub(crate) child_id: u64,
    pub(crate) generation: u64,
    pub(crate) reason: ExitReason,
}

impl Message for ChildExited {
    type Result = ();
}

enum LinkState {
    /// Start function still running: an exit is parked, not sent.
    Unarmed,
    /// Start succeeded: exits are reported.
    Armed,
    /// Exited before the supervisor armed the link.
    ExitedEarly(ExitReason),
    /// Start failed, or the exit was already reported: stay silent.
    Done,
}

pub(crate) struct LinkShared {
    state: Mutex<LinkState>,
    error: Mutex<Option<String>>,
    report_to: Recipient<ChildExited>,
    child_id: u64,
    generation: u64,
}

impl LinkShared {
    pub(crate) fn new(
        report_to: Recipient<ChildExited>,
        child_id: u64,
        generation: u64,
    ) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(LinkState::Unarmed),
            error: Mutex::new(None),
            report_to,
            child_id,
            generation,
        })
    }

    /// Called by the supervisor after a successful start. Returns the exit
    /// reason if the child already ended while starting.
    pub(crate) fn arm(&self) -> Option<ExitReason> {
        let mut s = lock(&self.state);
        match std::mem::replace(&mut *s, LinkState::Armed) {
            LinkState::ExitedEarly(r) => {
                *s = LinkState::Done;
                Some(r)
            }
            LinkState::Done => {
                *s = LinkState::Done;
                None
            }
            LinkState::Unarmed | LinkState::Armed => None,
        }
    }

    /// Called by the supervisor after a failed start.
    pub(crate) fn disarm(&self) {
        *lock(&self.state) = LinkState::Done;
    }

    fn exited(&self, reason: ExitReason) {
        let mut s = lock(&self.state);
        match &*s {
            LinkState::Unarmed => *s = LinkState::ExitedEarly(reason),
            LinkState::Armed => {
                *s = LinkState::Done;
                drop(s);
                self.report_to.do_send(ChildExited {
                    child_id: self.child_id,
                    generation: self.generation,
                    reason,
                });
            }
            LinkState::ExitedEarly(_) | LinkState::Done => {}
        }
    }
}

/// Handed to a child's start function; must live exactly as long as the
/// child actor (see the module docs). Use [`attach`](Self::attach).
pub struct ChildLink {
    shared: Arc<LinkShared>,
    stop_rx: Option<oneshot::Receiver<()>>,
    name: String,
    key: Option<String>,
}

impl ChildLink {
    pub(crate) fn new(
        shared: Arc<LinkShared>,
        stop_rx: oneshot::Receiver<()>,
        name: String,
        key: Option<String>,
    ) -> Self {
        Self {
            shared,
            stop_rx: Some(stop_rx),
            name,
            key,
        }
    }

    /// Child name from its spec.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Child key (dynamic children), if any.
    pub fn key(&self) -> Option<&str> {
        self.key.as_deref()
    }

    /// Handle to record an error exit reason, usable after `attach`.
    pub fn exit_handle(&self) -> ExitHandle {
        ExitHandle {
            shared: self.shared.clone(),
        }
    }

    /// Bind this link to the actor's context: the supervisor's stop request
    /// calls `ctx.stop()`, and the link is dropped together with the context
    /// (normal stop or panic). Call it in the `Actor::create` closure so it
    /// is in place before `started()` runs. Returns a handle for
    /// [`ExitHandle::fail`].
    pub fn attach<A>(mut self, ctx: &mut Context<A>) -> ExitHandle
    where
        A: Actor<Context = Context<A>>,
    {
        let handle = self.exit_handle();
        if let Some(rx) = self.stop_rx.take() {
            // Resolves on an explicit stop request *and* when the supervisor
            // goes away (sender dropped): children do not outlive their
            // supervisor.
            ctx.spawn(
                wrap_future::<_, A>(async move {
                    let _ = rx.await;
                })
                .map(|(), _act, ctx: &mut Context<A>| ctx.stop()),
            );
        }
        // Keeper: owns the link until the context itself is dropped.
        ctx.spawn(wrap_future::<_, A>(async move {
            let _link = self;
            std::future::pending::<()>().await
        }));
        handle
    }
}

impl Drop for ChildLink {
    fn drop(&mut self) {
        let reason = if std::thread::panicking() {
            ExitReason::Panic(crate::panic::current_panic_message())
        } else if let Some(e) = lock(&self.shared.error).take() {
            ExitReason::Error(e)
        } else {
            ExitReason::Normal
        };
        self.shared.exited(reason);
    }
}

impl std::fmt::Debug for ChildLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChildLink")
            .field("name", &self.name)
            .field("key", &self.key)
            .finish()
    }
}

/// Records the reason a child is about to stop with.
#[derive(Clone)]
pub struct ExitHandle {
    shared: Arc<LinkShared>,
}

impl ExitHandle {
    /// Mark the coming exit as an error (then call `ctx.stop()`): the
    /// supervisor sees [`ExitReason::Error`] and restarts `transient` and
    /// `permanent` children.
    pub fn fail(&self, reason: impl Into<String>) {
        *lock(&self.shared.error) = Some(reason.into());
    }
}

impl std::fmt::Debug for ExitHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExitHandle").finish()
    }
}
