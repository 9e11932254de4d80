//! One `Session` stream: the receive loop, command dispatch, the response
//! queue, teardown (reference §5).
//!
//! Shape: tonic calls [`ClawkerdSvc::session`], which hands the inbound
//! stream to [`start`]: it spawns the receive loop as its own task and
//! returns the receiving half of a bounded response queue as the response
//! stream. [`start`] takes any stream of commands, not only tonic's, so the
//! dispatcher can be driven without a TLS connection (the
//! `clawkerd_dispatch` fuzz target does). Every producer (the loop, each
//! command worker, the register task) holds a clone of the sending half; the
//! bounded queue is the backpressure from a slow CP down to the children's
//! pipes.
//!
//! Panic containment: the loop runs in its own tokio task, watched by a
//! second task. A panic ends that task only (tokio catches it); the watcher
//! logs it, tells the CP with a gRPC `INTERNAL` status, and the per-command
//! controls dropped by the unwinding kill their process groups. PID 1 and
//! other sessions carry on.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Status, Streaming};

use super::control::CommandControl;
use super::flow::{self, Credit, StdinAcks};
use super::lifecycle::{ExitRequest, InitMarker, mirror_exit_code};
use super::listener::PeerIdentity;
use super::pipeline::{self, Rejected, SpawnCtx, error_response};
use super::reaper::Reaper;
use super::register::Coordinator;
use super::renew::{Attached, Renewer};
use super::spawn::{ReadyOutcome, UserCommand};
use super::{copy, logs, pty};
use crate::proto::clawkerd::v1::{
    self as pb, Command, ErrorCode, Response, clawkerd_service_server::ClawkerdService,
    command::Payload as Cmd, response::Payload as Resp,
};

/// The sending half of a session's response queue.
pub type Outbound = mpsc::Sender<Result<Response, Status>>;

/// Depth of the per-session response queue (reference: 64).
pub const OUTBOUND_QUEUE: usize = 64;

/// How long teardown waits for killed commands to be reaped and answer.
const TEARDOWN_GRACE: Duration = Duration::from_secs(5);

/// `FlowGrant`s waiting for their command (sent before it). Bounded: a
/// grant for an id that never starts must not grow the session.
const MAX_PENDING_GRANTS: usize = 64;
/// How long an `exit_on_non_zero` exit waits for the session's queued
/// responses (its `Done` first of all) to be taken by the stream.
const EXIT_FLUSH: Duration = Duration::from_secs(2);

/// Waits until every response queued on `out` was taken by the stream, at
/// most `bound`.
async fn flush(out: &Outbound, bound: Duration) {
    let deadline = Instant::now() + bound;
    while out.capacity() < out.max_capacity() {
        if Instant::now() > deadline {
            tracing::warn!(event = "session_sender_drain_timeout");
            return;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Test seams, read once at boot from the environment. They only ever
/// cause a panic inside one session or one command worker — exactly what
/// the containment tests need to prove harmless. Compiled only with the
/// `test-hooks` feature (which only the integration tests enable), so a
/// release clawkerd has neither the variables nor the panics.
#[cfg(feature = "test-hooks")]
#[derive(Debug, Default, Clone)]
pub struct TestHooks {
    /// `CLAWKERD_TEST_PANIC_SESSION_ON`: a `Hello` with this command id
    /// panics the receive loop.
    pub panic_session_on: Option<String>,
    /// `CLAWKERD_TEST_PANIC_WORKER_ON`: a `ShellCommand` with this id panics
    /// its worker right after `Started`.
    pub panic_worker_on: Option<String>,
}

#[cfg(feature = "test-hooks")]
impl TestHooks {
    pub fn from_env() -> Self {
        let get = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        Self {
            panic_session_on: get("CLAWKERD_TEST_PANIC_SESSION_ON"),
            panic_worker_on: get("CLAWKERD_TEST_PANIC_WORKER_ON"),
        }
    }
}

/// State shared by every session of the process.
pub struct Shared {
    pub reaper: Reaper,
    /// clawkerd's PATH at boot; stage programs resolve through it.
    pub path_var: String,
    pub register: Arc<Coordinator>,
    pub user_command: Arc<UserCommand>,
    /// Cancelled when clawkerd shuts down: every session tears down.
    pub shutdown: CancellationToken,
    /// The one-time init marker (`HelloAck.initialized`, `AgentInitialized`).
    pub marker: InitMarker,
    /// A failed `exit_on_non_zero` command asks the main loop to exit here.
    pub exit: ExitRequest,
    #[cfg(feature = "test-hooks")]
    pub hooks: TestHooks,
    generation: AtomicU64,
    /// Leaf renewal; set once at boot (absent: `RenewCert` is refused).
    renewer: std::sync::OnceLock<Arc<Renewer>>,
}

impl Shared {
    pub fn new(
        reaper: Reaper,
        register: Arc<Coordinator>,
        user_command: Arc<UserCommand>,
        shutdown: CancellationToken,
        marker: InitMarker,
        exit: ExitRequest,
    ) -> Self {
        Self {
            reaper,
            path_var: std::env::var("PATH")
                .unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into()),
            register,
            user_command,
            shutdown,
            marker,
            exit,
            #[cfg(feature = "test-hooks")]
            hooks: TestHooks::from_env(),
            generation: AtomicU64::new(1),
            renewer: std::sync::OnceLock::new(),
        }
    }

    /// Installs the leaf renewer (once, at boot).
    pub fn set_renewer(&self, renewer: Arc<Renewer>) {
        let _ = self.renewer.set(renewer);
    }
}

/// The tonic service.
#[derive(Clone)]
pub struct ClawkerdSvc {
    shared: Arc<Shared>,
}

impl ClawkerdSvc {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

/// Running commands of one session, by id. Shared with the workers so they
/// can remove themselves right before their terminal response.
type Commands = Arc<Mutex<HashMap<String, Box<dyn CommandControl>>>>;

fn lock(c: &Commands) -> std::sync::MutexGuard<'_, HashMap<String, Box<dyn CommandControl>>> {
    c.lock().unwrap_or_else(|p| p.into_inner())
}

fn peer_identity<T>(req: &Request<T>) -> (String, String) {
    req.extensions()
        .get::<PeerIdentity>()
        .map(|p| (p.cn.clone(), p.thumbprint.clone()))
        .unwrap_or_default()
}

#[tonic::async_trait]
impl ClawkerdService for ClawkerdSvc {
    type SessionStream = ReceiverStream<Result<Response, Status>>;

    async fn session(
        &self,
        request: Request<Streaming<Command>>,
    ) -> Result<tonic::Response<Self::SessionStream>, Status> {
        let (peer_cn, peer_thumbprint) = peer_identity(&request);
        tracing::info!(
            event = "session_started",
            peer_cn = %peer_cn,
            peer_thumbprint = %peer_thumbprint,
            "session started"
        );
        // The handle is not needed here: tonic ends the call when the
        // response stream ends.
        let started = start(self.shared.clone(), request.into_inner(), peer_cn);
        Ok(tonic::Response::new(started.responses))
    }
}

/// A started session.
pub struct Started {
    /// Every response of the session, in order. It ends once the session
    /// and every worker, register or renewal task holding a sender are done.
    pub responses: ReceiverStream<Result<Response, Status>>,
    /// Completes when the receive loop has ended and torn down (its
    /// commands killed and, within the teardown grace, reaped), or
    /// panicked (then an `INTERNAL` status was queued).
    pub ended: tokio::task::JoinHandle<()>,
}

/// Runs one session over `inbound`: dispatches each command until the
/// stream ends, fails, or clawkerd shuts down; then tears down. Must be
/// called on a tokio runtime.
pub fn start<S>(shared: Arc<Shared>, inbound: S, peer_cn: String) -> Started
where
    S: futures::Stream<Item = Result<Command, Status>> + Send + 'static,
{
    let started = Instant::now();
    let (tx, rx) = mpsc::channel(OUTBOUND_QUEUE);
    let session = Session {
        out: tx.clone(),
        commands: Arc::new(Mutex::new(HashMap::new())),
        grants: Mutex::new(HashMap::new()),
        _renewal: shared.renewer.get().map(|r| r.attach(&tx)),
        shared,
    };
    let driver = tokio::spawn(session.run(Box::pin(inbound)));
    let ended = tokio::spawn(async move {
        if let Err(e) = driver.await
            && e.is_panic()
        {
            let panic = panic_text(e.into_panic());
            tracing::error!(event = "task_panic", task = "session", panic = %panic);
            eprintln!("clawkerd: task_panic task=session panic={panic}");
            let _ = tx.try_send(Err(Status::internal("clawkerd: session panicked")));
        }
        tracing::info!(
            event = "session_ended",
            peer_cn = %peer_cn,
            duration = started.elapsed().as_secs_f64() * 1000.0,
            "session ended"
        );
    });
    Started {
        responses: ReceiverStream::new(rx),
        ended,
    }
}

/// Renders a panic payload.
pub fn panic_text(p: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "<non-string panic>".into()
    }
}

struct Session {
    shared: Arc<Shared>,
    out: Outbound,
    commands: Commands,
    /// Output credit granted to ids that have not started yet.
    grants: Mutex<HashMap<String, u64>>,
    /// This session is where unsolicited renewal CSRs may go while it lives.
    _renewal: Option<Attached>,
}

impl Drop for Session {
    /// Runs on normal teardown and while unwinding from a panic: dropping
    /// every control cancels its command (workers keep their own handle on
    /// the map, so it would not be dropped with the session otherwise).
    fn drop(&mut self) {
        let controls: Vec<Box<dyn CommandControl>> =
            lock(&self.commands).drain().map(|(_, c)| c).collect();
        drop(controls);
    }
}

impl Session {
    async fn run<S>(self, mut inbound: std::pin::Pin<Box<S>>)
    where
        S: futures::Stream<Item = Result<Command, Status>> + Send,
    {
        use futures::StreamExt;
        loop {
            let msg = tokio::select! {
                m = inbound.next() => m.transpose(),
                _ = self.shared.shutdown.cancelled() => {
                    tracing::info!(event = "session_recv_teardown", reason = "shutdown");
                    break;
                }
            };
            match msg {
                Ok(Some(cmd)) => self.dispatch(cmd).await,
                Ok(None) => {
                    tracing::info!(event = "session_eof");
                    break;
                }
                Err(status) => {
                    tracing::info!(event = "session_recv_failed", error = %status);
                    break;
                }
            }
        }
        self.teardown().await;
    }

    /// Cancels and waits for every running command: killed, reaped, and
    /// its worker finished, so nothing outlives the session.
    async fn teardown(&self) {
        let controls: Vec<Box<dyn CommandControl>> =
            lock(&self.commands).drain().map(|(_, c)| c).collect();
        if controls.is_empty() {
            return;
        }
        // Dropping a control cancels its worker, which kills the groups.
        drop(controls);
        let deadline = Instant::now() + TEARDOWN_GRACE;
        // Workers hold clones of `out`; when they are all done only ours
        // (and the watcher's) remain.
        while self.out.strong_count() > 2 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn send(&self, resp: Response) {
        let _ = self.out.send(Ok(resp)).await;
    }

    async fn dispatch(&self, cmd: Command) {
        let id = cmd.command_id;
        let Some(payload) = cmd.payload else {
            tracing::warn!(event = "session_unknown_payload", command_id = %id, payload_type = "unset");
            self.send(error_response(
                &id,
                ErrorCode::InvalidRequest,
                "unknown payload type <nil>",
            ))
            .await;
            return;
        };
        if let Cmd::Hello(_) = payload {
            #[cfg(feature = "test-hooks")]
            if self.shared.hooks.panic_session_on.as_deref() == Some(id.as_str()) {
                panic!("test-induced panic in session for {id}");
            }
            // Read afresh on every Hello (never cached): the CP decides from
            // these which plans run (init once, boot every start, nothing
            // on a mere reconnect).
            let ack = pb::HelloAck {
                initialized: self.shared.marker.exists().await,
                cmd_running: self.shared.user_command.spawned(),
            };
            tracing::info!(
                event = "hello_ack",
                initialized = ack.initialized,
                cmd_running = ack.cmd_running
            );
            self.send(Response {
                command_id: id,
                payload: Some(Resp::HelloAck(ack)),
            })
            .await;
            return;
        }
        if id.is_empty() {
            self.send(error_response(
                &id,
                ErrorCode::InvalidRequest,
                "command_id required",
            ))
            .await;
            return;
        }
        match payload {
            Cmd::Hello(_) => {}
            Cmd::Shell(shell) => self.shell(id, shell).await,
            Cmd::Stdin(s) => {
                let found = lock(&self.commands)
                    .get_mut(&id)
                    .map(|c| c.stdin(&id, s.data))
                    .is_some();
                if !found {
                    self.send(error_response(
                        &id,
                        ErrorCode::UnknownCommandId,
                        "stdin: no running command with that id",
                    ))
                    .await;
                }
            }
            Cmd::CloseStdin(_) => {
                let found = lock(&self.commands)
                    .get_mut(&id)
                    .map(|c| c.close_stdin())
                    .is_some();
                if !found {
                    self.send(error_response(
                        &id,
                        ErrorCode::UnknownCommandId,
                        "close_stdin: no running command with that id",
                    ))
                    .await;
                }
            }
            Cmd::Signal(sig) => {
                if sig.signo <= 0 {
                    self.send(error_response(
                        &id,
                        ErrorCode::InvalidRequest,
                        "signal: signo must be a positive integer",
                    ))
                    .await;
                    return;
                }
                let found = lock(&self.commands)
                    .get(&id)
                    .map(|c| c.signal(&id, sig.signo))
                    .is_some();
                if !found {
                    self.send(error_response(
                        &id,
                        ErrorCode::UnknownCommandId,
                        "signal: no running command with that id",
                    ))
                    .await;
                }
            }
            Cmd::RegisterRequired(_) => {
                let coordinator = self.shared.register.clone();
                let out = self.out.clone();
                // Own task: the receive loop stays responsive for the up to
                // 25 s a register attempt may take; a panic inside still
                // yields exactly one RegisterDone.
                tokio::spawn(async move {
                    let task = tokio::spawn(async move { coordinator.run().await });
                    let (ok, error) = match task.await {
                        Ok(Ok(())) => (true, String::new()),
                        Ok(Err(e)) => (false, e.to_string()),
                        Err(e) => {
                            let msg = if e.is_panic() {
                                panic_text(e.into_panic())
                            } else {
                                "cancelled".into()
                            };
                            tracing::error!(event = "register_panic", command_id = %id, panic = %msg);
                            (false, format!("register panic: {msg}"))
                        }
                    };
                    let _ = out
                        .send(Ok(Response {
                            command_id: id,
                            payload: Some(Resp::RegisterDone(pb::RegisterDone { ok, error })),
                        }))
                        .await;
                });
            }
            Cmd::AgentReady(_) => {
                let uc = self.shared.user_command.clone();
                let mut failure = None;
                let resp = match tokio::spawn(async move { uc.run().await }).await {
                    Ok(Ok(outcome)) => {
                        let event = match outcome {
                            ReadyOutcome::Spawned => "agent_ready_spawned",
                            ReadyOutcome::AlreadySpawned => "agent_ready_already_spawned",
                        };
                        tracing::info!(event, command_id = %id);
                        Response {
                            command_id: id,
                            payload: Some(Resp::Done(pb::Done { final_exit_code: 0 })),
                        }
                    }
                    Ok(Err(e)) => {
                        tracing::error!(event = "agent_ready_spawn_failed", command_id = %id, error = %e);
                        let resp = error_response(
                            &id,
                            ErrorCode::IoError,
                            format!("agent_ready: spawn: {e}"),
                        );
                        failure = Some(e);
                        resp
                    }
                    Err(e) => {
                        let msg = if e.is_panic() {
                            panic_text(e.into_panic())
                        } else {
                            "cancelled".into()
                        };
                        tracing::error!(event = "agent_ready_panic", command_id = %id, panic = %msg);
                        error_response(
                            &id,
                            ErrorCode::IoError,
                            format!("agent_ready: panic: {msg}"),
                        )
                    }
                };
                self.send(resp).await;
                if let Some(e) = failure {
                    self.shared.user_command.publish_failure(e);
                }
            }
            Cmd::Pty(p) => self.pty(id, p).await,
            Cmd::Resize(r) => {
                let rows = u16::try_from(r.rows).unwrap_or(u16::MAX);
                let cols = u16::try_from(r.cols).unwrap_or(u16::MAX);
                let result = lock(&self.commands)
                    .get(&id)
                    .map(|c| c.resize(&id, rows, cols));
                match result {
                    Some(Ok(())) => {}
                    Some(Err(msg)) => {
                        self.send(error_response(&id, ErrorCode::InvalidRequest, msg))
                            .await
                    }
                    None => {
                        self.send(error_response(
                            &id,
                            ErrorCode::UnknownCommandId,
                            "resize: no running command with that id",
                        ))
                        .await
                    }
                }
            }
            Cmd::Logs(l) => self.logs(id, l).await,
            Cmd::CopyFrom(c) => self.copy_from(id, c).await,
            Cmd::CopyTo(c) => self.copy_to(id, c).await,
            Cmd::FlowGrant(g) => self.flow_grant(id, g.output_bytes).await,
            Cmd::RenewCert(r) => match self.shared.renewer.get() {
                // Own task: a rotation waits for the CP's CertIssued, which
                // this receive loop must stay free to deliver.
                Some(renewer) => {
                    let (renewer, out) = (renewer.clone(), self.out.clone());
                    let seen = renewer.leaf().generation();
                    tokio::spawn(async move { renewer.requested(id, &r.reason, out, seen).await });
                }
                None => {
                    self.send(error_response(
                        &id,
                        ErrorCode::InvalidRequest,
                        "unsupported command",
                    ))
                    .await;
                }
            },
            Cmd::CertIssued(issued) => {
                let delivered = self
                    .shared
                    .renewer
                    .get()
                    .is_some_and(|r| r.deliver(&id, issued));
                if !delivered {
                    self.send(error_response(
                        &id,
                        ErrorCode::UnknownCommandId,
                        "cert_issued: no renewal waiting on that id",
                    ))
                    .await;
                }
            }
            Cmd::AgentInitialized(_) => {
                // A failed write is tolerated (reference §1.2): init simply
                // runs again on the next start, which is idempotent.
                match self.shared.marker.write().await {
                    Ok(()) => tracing::info!(
                        event = "agent_initialized",
                        command_id = %id,
                        path = %self.shared.marker.path().display()
                    ),
                    Err(e) => tracing::warn!(
                        event = "agent_initialized_marker_write_failed",
                        command_id = %id,
                        path = %self.shared.marker.path().display(),
                        error = %e
                    ),
                }
                self.send(Response {
                    command_id: id,
                    payload: Some(Resp::Done(pb::Done { final_exit_code: 0 })),
                })
                .await;
            }
        }
    }

    async fn reject(&self, id: &str, r: Rejected) {
        self.send(r.response(id)).await;
    }

    /// Refuses an id that is already running; true if it is free.
    async fn id_free(&self, id: &str, what: &str) -> bool {
        if lock(&self.commands).contains_key(id) {
            self.send(error_response(
                id,
                ErrorCode::InvalidRequest,
                format!("{what}: command_id already in use"),
            ))
            .await;
            return false;
        }
        true
    }

    fn next_generation(&self) -> u64 {
        self.shared.generation.fetch_add(1, Ordering::Relaxed)
    }

    /// The output credit granted to `id` before it started, if any: the
    /// command is flow-controlled exactly when there is one.
    fn take_grant(&self, id: &str) -> Option<Arc<Credit>> {
        let mut grants = self.grants.lock().unwrap_or_else(|p| p.into_inner());
        grants.remove(id).map(Credit::new)
    }

    async fn flow_grant(&self, id: String, bytes: u64) {
        if let Some(c) = lock(&self.commands).get(&id) {
            c.grant(bytes);
            return;
        }
        let full = {
            let mut grants = self.grants.lock().unwrap_or_else(|p| p.into_inner());
            if grants.len() >= MAX_PENDING_GRANTS && !grants.contains_key(&id) {
                true
            } else {
                *grants.entry(id.clone()).or_default() += bytes;
                false
            }
        };
        if full {
            self.send(error_response(
                &id,
                ErrorCode::InvalidRequest,
                format!(
                    "flow_grant: more than {MAX_PENDING_GRANTS} grants waiting for their commands"
                ),
            ))
            .await;
        }
    }

    /// Registers a started command and enqueues, in order, the flow
    /// control acceptance (if it was granted credit) and `Started` — both
    /// before its worker exists, so they precede every other response.
    async fn begin(&self, id: &str, control: Box<dyn CommandControl>, flow_controlled: bool) {
        lock(&self.commands).insert(id.to_owned(), control);
        if flow_controlled {
            self.send(flow::consumed(id, 0)).await;
        }
        self.send(Response {
            command_id: id.to_owned(),
            payload: Some(Resp::Started(pb::Started {})),
        })
        .await;
    }

    /// What a worker calls right before its terminal response: the id is
    /// free again (unless a newer command already took it).
    fn remover(&self, id: &str, generation: u64) -> impl FnOnce() + Send + 'static {
        let (commands, id) = (self.commands.clone(), id.to_owned());
        move || {
            let mut cmds = lock(&commands);
            if cmds.get(&id).is_some_and(|c| c.generation() == generation) {
                cmds.remove(&id);
            }
        }
    }

    /// Runs a command's worker and contains its panic: the command is
    /// removed (its control's drop kills what it started) and, unless the
    /// worker already answered, the CP gets one `Error{IO_ERROR}`.
    fn supervise<F>(&self, id: String, generation: u64, task: &'static str, worker: F)
    where
        F: FnOnce(Outbound, Arc<AtomicBool>) -> tokio::task::JoinHandle<()>,
    {
        let terminal_sent = Arc::new(AtomicBool::new(false));
        let handle = worker(self.out.clone(), terminal_sent.clone());
        let out = self.out.clone();
        let commands = self.commands.clone();
        tokio::spawn(async move {
            let Err(e) = handle.await else { return };
            let panic = if e.is_panic() {
                panic_text(e.into_panic())
            } else {
                "cancelled".into()
            };
            tracing::error!(event = "task_panic", task, command_id = %id, panic = %panic);
            eprintln!("clawkerd: task_panic task={task} panic={panic}");
            {
                let mut cmds = lock(&commands);
                if cmds.get(&id).is_some_and(|c| c.generation() == generation) {
                    // Dropping the control cancels; the worker's kill guard
                    // already killed the groups while unwinding.
                    cmds.remove(&id);
                }
            }
            if !terminal_sent.load(Ordering::Acquire) {
                let _ = out
                    .send(Ok(error_response(
                        &id,
                        ErrorCode::IoError,
                        format!("{task}: worker panicked: {panic}"),
                    )))
                    .await;
            }
            pipeline::audit_done(&id, Instant::now(), -1, false, "incomplete");
        });
    }

    async fn shell(&self, id: String, shell: pb::ShellCommand) {
        let exit_on_non_zero = shell.exit_on_non_zero;
        let credit = self.take_grant(&id);
        if let Err(r) = pipeline::validate(&shell) {
            return self.reject(&id, r).await;
        }
        if !self.id_free(&id, "shell").await {
            return;
        }
        let generation = self.next_generation();
        let ctx = SpawnCtx {
            reaper: &self.shared.reaper,
            path_var: &self.shared.path_var,
            generation,
            flow: credit.clone().map(|c| (c, self.out.clone())),
            #[cfg(feature = "test-hooks")]
            panic_for_tests: self.shared.hooks.panic_worker_on.as_deref() == Some(id.as_str()),
        };
        let (control, running) = match pipeline::spawn(&id, shell, ctx) {
            Ok(x) => x,
            Err(r) => return self.reject(&id, r).await,
        };
        self.begin(&id, Box::new(control), credit.is_some()).await;
        let finish = self.remover(&id, generation);
        let (shared, command_id) = (self.shared.clone(), id.clone());
        self.supervise(id, generation, "shell_command_worker", |out, sent| {
            tokio::spawn(async move {
                let code = running.run(out.clone(), sent, finish).await;
                // A failed init or boot step ends the container with its
                // code (reference head-lifecycle §3.2).
                if let Some(code) = code.filter(|c| exit_on_non_zero && *c != 0) {
                    let mirrored = mirror_exit_code(code);
                    tracing::info!(
                        event = "command_exit_on_non_zero",
                        command_id = %command_id,
                        final_exit_code = code,
                        mirrored_exit_code = mirrored
                    );
                    // The Done is queued; let the stream take everything
                    // queued before the main loop starts tearing down.
                    flush(&out, EXIT_FLUSH).await;
                    shared.exit.request(mirrored);
                }
            })
        });
    }

    async fn pty(&self, id: String, cmd: pb::PtyCommand) {
        let credit = self.take_grant(&id);
        if !self.id_free(&id, "pty").await {
            return;
        }
        let generation = self.next_generation();
        let ctx = pty::PtyCtx {
            reaper: &self.shared.reaper,
            path_var: &self.shared.path_var,
            generation,
            flow: credit.clone().map(|c| (c, self.out.clone())),
        };
        let (control, running) = match pty::spawn(&id, cmd, ctx) {
            Ok(x) => x,
            Err(r) => return self.reject(&id, r).await,
        };
        self.begin(&id, Box::new(control), credit.is_some()).await;
        let finish = self.remover(&id, generation);
        self.supervise(id, generation, "pty_command_worker", |out, sent| {
            tokio::spawn(running.run(out, sent, finish))
        });
    }

    async fn logs(&self, id: String, req: pb::Logs) {
        let credit = self.take_grant(&id);
        let output = self.shared.user_command.output().clone();
        if !output.is_captured() {
            return self
                .send(error_response(
                    &id,
                    ErrorCode::NotFound,
                    "logs: the user command writes to a terminal; its output is not captured (see docker logs)",
                ))
                .await;
        }
        if !self.id_free(&id, "logs").await {
            return;
        }
        let generation = self.next_generation();
        let (control, running) = logs::start(&id, &req, output, generation, credit.clone());
        self.begin(&id, Box::new(control), credit.is_some()).await;
        let finish = self.remover(&id, generation);
        self.supervise(id, generation, "logs_worker", |out, sent| {
            tokio::spawn(running.run(out, sent, finish))
        });
    }

    async fn copy_from(&self, id: String, req: pb::CopyFrom) {
        let credit = self.take_grant(&id);
        if !self.id_free(&id, "copy_from").await {
            return;
        }
        let generation = self.next_generation();
        let (control, running) = match copy::copy_from(&id, &req, generation, credit.clone()) {
            Ok(x) => x,
            Err(r) => return self.reject(&id, r).await,
        };
        self.begin(&id, Box::new(control), credit.is_some()).await;
        let finish = self.remover(&id, generation);
        self.supervise(id, generation, "copy_from_worker", |out, sent| {
            tokio::spawn(running.run(out, sent, finish))
        });
    }

    async fn copy_to(&self, id: String, req: pb::CopyTo) {
        let credit = self.take_grant(&id);
        if !self.id_free(&id, "copy_to").await {
            return;
        }
        let generation = self.next_generation();
        let acks = credit
            .as_ref()
            .map(|_| StdinAcks::new(&id, self.out.clone()));
        let (control, running) = match copy::copy_to(&id, &req, generation, acks) {
            Ok(x) => x,
            Err(r) => return self.reject(&id, r).await,
        };
        self.begin(&id, Box::new(control), credit.is_some()).await;
        let finish = self.remover(&id, generation);
        self.supervise(id, generation, "copy_to_worker", |out, sent| {
            tokio::spawn(running.run(out, sent, finish))
        });
    }
}
