//! One `ShellCommand`: spawn the stages, wire the pipes, feed stdin, drain
//! output, enforce the timeout, report exits, answer exactly once
//! (reference §6).
//!
//! Where we differ from the reference, on purpose (DESIGN §8.7):
//! - **No head-of-line blocking.** Stdin frames go into a per-command queue
//!   that a per-command writer task drains; the session's receive loop never
//!   waits on a child's pipe. `initial_stdin` is written first by the same
//!   task, so `ShellCommand{initial_stdin}` + `CloseStdin` still delivers the
//!   whole payload before EOF, without a gate.
//! - **Process groups.** Each stage leads its own process group; timeouts,
//!   `Signal` and teardown signal the whole group, so grandchildren
//!   (`sh -c 'sleep 100'`) die too.
//! - **Exits are observed independently of stdin.** A command that never
//!   gets `CloseStdin` still reports its StageExits and its terminal
//!   response once its processes are gone.
//! - **Exactly one terminal response.** Drain and stdin write failures do
//!   not produce extra `Error`s mid-stream; they turn the single terminal
//!   response into `Error{IO_ERROR}`. TIMEOUT is reported only if the
//!   timeout actually killed a running stage.
//! - **No lost tail.** Output is drained to EOF; if a background
//!   grandchild keeps a pipe open after every stage exited, we still read
//!   everything already in the pipe (non-blocking, until EAGAIN) before
//!   the terminal response.
//! - Stages started before a failing stage are killed *and reaped*.

use bytes::Bytes;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::join_all;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::control::CommandControl;
use super::flow::{Credit, StdinAcks};
use super::reaper::{ExitStatus, Reaper, Signalled};
use super::session::Outbound;
use crate::proto::clawkerd::v1::{
    self as pb, ErrorCode, PipeStage, Response, ShellCommand, response::Payload,
};

/// Bytes per output read. Large reads keep syscalls and messages per byte
/// low (the 1 GB/s target); small reads are copied into right-sized chunks.
pub const CHUNK_SIZE: usize = 128 * 1024;

/// Kernel buffer we ask for on the captured stdout pipe (best effort).
const PIPE_SIZE: i32 = 1 << 20;

/// Unread stdin a command may buffer before further frames are dropped and
/// the command ends in `IO_ERROR`. Bounded so a child that never reads
/// cannot make PID 1 grow without limit.
pub const STDIN_BUFFER_LIMIT: usize = 64 * 1024 * 1024;

/// Messages from the session to a command's stdin writer.
#[derive(Debug)]
pub enum StdinMsg {
    Data(Bytes),
    Close,
}

/// What the session keeps per running command, to route Stdin, CloseStdin
/// and Signal without ever blocking its receive loop.
pub struct Control {
    pub generation: u64,
    stdin: mpsc::UnboundedSender<StdinMsg>,
    stdin_closed: bool,
    pending_stdin: Arc<AtomicUsize>,
    problems: Arc<Problems>,
    pids: Arc<Vec<i32>>,
    cancel: CancellationToken,
    reaper: Reaper,
    credit: Option<Arc<Credit>>,
}

impl Drop for Control {
    /// Dropping the control (session teardown, or a panic unwinding the
    /// session) cancels the command, which kills its process groups.
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

impl CommandControl for Control {
    fn generation(&self) -> u64 {
        self.generation
    }

    /// Queues stdin bytes; never blocks.
    fn stdin(&mut self, id: &str, data: Bytes) {
        if self.stdin_closed {
            tracing::warn!(event = "session_stdin_after_close", command_id = id);
            return;
        }
        let pending = self.pending_stdin.fetch_add(data.len(), Ordering::AcqRel) + data.len();
        if pending > STDIN_BUFFER_LIMIT {
            self.pending_stdin.fetch_sub(data.len(), Ordering::AcqRel);
            tracing::error!(event = "session_stdin_overflow", command_id = id, pending);
            self.problems.record(format!(
                "stdin: more than {STDIN_BUFFER_LIMIT} bytes unread by the child; data dropped"
            ));
            return;
        }
        // A send error means the writer is gone (child closed its stdin):
        // the bytes could never be delivered, exactly like EPIPE.
        let _ = self.stdin.send(StdinMsg::Data(data));
    }

    /// Closes stage 0's stdin after everything queued before it. Idempotent.
    fn close_stdin(&mut self) {
        if !self.stdin_closed {
            self.stdin_closed = true;
            let _ = self.stdin.send(StdinMsg::Close);
        }
    }

    /// Sends `signo` to every stage's process group.
    fn signal(&self, id: &str, signo: i32) {
        for (i, &pid) in self.pids.iter().enumerate() {
            match self.reaper.signal_group(pid, signo) {
                Signalled::Sent => {}
                Signalled::AlreadyExited => tracing::debug!(
                    event = "session_signal_after_exit",
                    command_id = id,
                    stage_index = i,
                    signo
                ),
                Signalled::Failed(errno) => tracing::error!(
                    event = "session_signal_forward_failed",
                    command_id = id,
                    stage_index = i,
                    signo,
                    errno
                ),
            }
        }
    }

    fn grant(&self, bytes: u64) {
        if let Some(c) = &self.credit {
            c.grant(bytes);
        }
    }
}

/// The first I/O problem of a command; it becomes the terminal IO_ERROR.
#[derive(Default)]
pub(super) struct Problems(Mutex<Option<String>>);

impl Problems {
    pub(super) fn record(&self, msg: String) {
        let mut slot = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(msg);
        }
    }
    pub(super) fn take(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// A validation or spawn failure, answered with a single `Error`.
#[derive(Debug)]
pub struct Rejected {
    pub code: ErrorCode,
    pub message: String,
    /// The OS error behind a SPAWN_FAILED (ENOENT, EACCES, …), else 0.
    pub os_errno: i32,
}

impl Rejected {
    pub fn invalid(message: impl Into<String>) -> Self {
        Self {
            code: ErrorCode::InvalidRequest,
            message: message.into(),
            os_errno: 0,
        }
    }

    pub fn spawn_failed(message: impl Into<String>, os_errno: i32) -> Self {
        Self {
            code: ErrorCode::SpawnFailed,
            message: message.into(),
            os_errno,
        }
    }

    /// The single `Error` response answering the command.
    pub fn response(&self, id: &str) -> Response {
        Response {
            command_id: id.to_owned(),
            payload: Some(Payload::Error(pb::Error {
                code: self.code as i32,
                message: self.message.clone(),
                os_errno: self.os_errno,
            })),
        }
    }
}

/// Validates a ShellCommand (reference §6.1, steps 1–2).
pub fn validate(shell: &ShellCommand) -> Result<(), Rejected> {
    if shell.stages.is_empty() {
        return Err(Rejected::invalid("shell: stages must not be empty"));
    }
    if let Some(i) = shell.stages.iter().position(|s| s.argv.is_empty()) {
        return Err(Rejected::invalid(format!(
            "shell: stage[{i}] argv must not be empty"
        )));
    }
    Ok(())
}

/// No executable of that name on clawkerd's PATH (the text is Go's
/// `exec.LookPath` error, as the reference reports it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("exec: {name:?}: executable file not found in $PATH")]
pub struct ProgramNotFound {
    pub name: String,
}

/// Resolves a program name through clawkerd's own PATH (reference §6.3:
/// not the stage env's PATH). Names containing `/` are used as given.
pub fn resolve_program(name: &str, path_var: &str) -> Result<String, ProgramNotFound> {
    if name.contains('/') {
        return Ok(name.to_owned());
    }
    for dir in path_var.split(':') {
        let dir = if dir.is_empty() { "." } else { dir };
        let candidate = format!("{dir}/{name}");
        if is_executable(&candidate) {
            return Ok(candidate);
        }
    }
    Err(ProgramNotFound {
        name: name.to_owned(),
    })
}

fn is_executable(path: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// A started pipeline, before its worker runs.
pub struct Running {
    id: String,
    timeout: u32,
    pids: Arc<Vec<i32>>,
    exits: Vec<oneshot::Receiver<ExitStatus>>,
    stdout: pipe::Receiver,
    stderrs: Vec<pipe::Receiver>,
    stdin_task: tokio::task::JoinHandle<()>,
    problems: Arc<Problems>,
    cancel: CancellationToken,
    reaper: Reaper,
    started_at: Instant,
    credit: Option<Arc<Credit>>,
    #[cfg(feature = "test-hooks")]
    panic_for_tests: bool,
}

/// Everything [`spawn`] needs from its surroundings.
pub struct SpawnCtx<'a> {
    pub reaper: &'a Reaper,
    /// clawkerd's PATH at boot, for program resolution.
    pub path_var: &'a str,
    pub generation: u64,
    /// Flow control, when the CP granted credit before the command: the
    /// output credit, and where `StdinConsumed` goes.
    pub flow: Option<(Arc<Credit>, Outbound)>,
    /// Test seam: make the worker panic after `Started` (see session.rs).
    #[cfg(feature = "test-hooks")]
    pub panic_for_tests: bool,
}

fn audit_started(id: &str, i: usize, st: &PipeStage, timeout: u32) {
    tracing::info!(
        event = "shell_command_started",
        command_id = id,
        stage_index = i,
        argv = ?st.argv,
        cwd = %st.cwd,
        uid = st.uid,
        gid = st.gid,
        timeout_seconds = timeout,
        "shell command stage starting"
    );
}

pub fn audit_done(
    id: &str,
    started: Instant,
    final_exit_code: i32,
    timed_out: bool,
    outcome: &str,
) {
    tracing::info!(
        event = "shell_command_done",
        command_id = id,
        duration = started.elapsed().as_secs_f64() * 1000.0,
        final_exit_code,
        timed_out,
        outcome,
        "shell command done"
    );
}

fn owned(fd: impl Into<OwnedFd>) -> OwnedFd {
    fd.into()
}

/// Spawns every stage of `shell` (already validated). On success returns
/// the session-side [`Control`] and the worker to run; on failure, every
/// stage already started has been killed and will be reaped.
pub fn spawn(
    id: &str,
    shell: ShellCommand,
    ctx: SpawnCtx<'_>,
) -> Result<(Control, Running), Rejected> {
    let started_at = Instant::now();
    let n = shell.stages.len();
    let fail = |message: String| Rejected::spawn_failed(message, 0);
    let fail_os = |message: String, e: &io::Error| {
        Rejected::spawn_failed(message, e.raw_os_error().unwrap_or(0))
    };
    for (i, st) in shell.stages.iter().enumerate() {
        audit_started(id, i, st, shell.timeout_seconds);
    }

    let (stdin_r, stdin_w) =
        io::pipe().map_err(|e| fail_os(format!("stage[0] StdinPipe: {e}"), &e))?;
    let mut next_stdin: Option<Stdio> = Some(stdin_r.into());
    let mut pids = Vec::with_capacity(n);
    let mut exits = Vec::with_capacity(n);
    let mut stderrs = Vec::with_capacity(n);
    let mut stdout_r = None;

    // Errors carry the OS errno: SPAWN_FAILED reports it (exit 127/126).
    let result: Result<(), (String, i32)> = (|| {
        let os = |e: &io::Error| e.raw_os_error().unwrap_or(0);
        for (i, st) in shell.stages.iter().enumerate() {
            let last = i + 1 == n;
            let (out_r, out_w) = io::pipe().map_err(|e| {
                let msg = if last {
                    format!("final stage StdoutPipe: {e}")
                } else {
                    format!("stage[{i}] StdoutPipe: {e}")
                };
                (msg, os(&e))
            })?;
            let (err_r, err_w) =
                io::pipe().map_err(|e| (format!("stage[{i}] StderrPipe: {e}"), os(&e)))?;
            let program = resolve_program(&st.argv[0], ctx.path_var)
                .map_err(|e| (format!("stage[{i}] start: {e}"), libc::ENOENT))?;
            let mut cmd = Command::new(&program);
            cmd.arg0(&st.argv[0])
                .args(&st.argv[1..])
                .envs(&st.env)
                .stdin(next_stdin.take().unwrap_or_else(Stdio::null))
                .stdout(out_w)
                .stderr(err_w)
                .process_group(0);
            if !st.cwd.is_empty() {
                cmd.current_dir(&st.cwd);
            }
            if st.uid != 0 || st.gid != 0 {
                // As root, std clears the supplementary groups before
                // setgid/setuid when none are given (reference: empty list).
                cmd.uid(st.uid).gid(st.gid);
            }
            let (pid, exit) = ctx
                .reaper
                .spawn(&mut cmd)
                .map_err(|e| (format!("stage[{i}] start: {e}"), os(&e)))?;
            // `cmd` holds our copies of the child's pipe ends; drop them now
            // so EOF propagates when the children close theirs.
            drop(cmd);
            pids.push(pid);
            exits.push(exit);
            stderrs.push(err_r);
            if last {
                stdout_r = Some(out_r);
            } else {
                next_stdin = Some(out_r.into());
            }
        }
        Ok(())
    })();

    if let Err((message, errno)) = result {
        // Kill and reap what did start (the reference leaves zombies).
        for &pid in &pids {
            ctx.reaper.signal_group(pid, libc::SIGKILL);
        }
        tokio::spawn(async move {
            let _ = join_all(exits).await;
        });
        audit_done(id, started_at, -1, false, "spawn_failed");
        return Err(Rejected::spawn_failed(message, errno));
    }

    let to_rx = |fd: OwnedFd| pipe::Receiver::from_owned_fd(fd);
    let stdout_fd = match stdout_r {
        Some(r) => owned(r),
        None => return Err(fail("final stage StdoutPipe: missing".into())),
    };
    // SAFETY: fcntl on a descriptor we own; failure is harmless.
    unsafe { libc::fcntl(stdout_fd.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE) };
    let pids = Arc::new(pids);
    let reaper = ctx.reaper.clone();
    let kill_all = |pids: &[i32]| {
        for &pid in pids {
            reaper.signal_group(pid, libc::SIGKILL);
        }
    };
    let stdout = match to_rx(stdout_fd) {
        Ok(r) => r,
        Err(e) => {
            kill_all(&pids);
            return Err(fail(format!("final stage StdoutPipe: {e}")));
        }
    };
    let mut stderr_rx = Vec::with_capacity(n);
    for (i, r) in stderrs.into_iter().enumerate() {
        match to_rx(owned(r)) {
            Ok(r) => stderr_rx.push(r),
            Err(e) => {
                kill_all(&pids);
                return Err(fail(format!("stage[{i}] StderrPipe: {e}")));
            }
        }
    }
    let stdin_w = match pipe::Sender::from_owned_fd(owned(stdin_w)) {
        Ok(w) => w,
        Err(e) => {
            kill_all(&pids);
            return Err(fail(format!("stage[0] StdinPipe: {e}")));
        }
    };

    let (stdin_tx, stdin_rx) = mpsc::unbounded_channel();
    let pending = Arc::new(AtomicUsize::new(0));
    let problems = Arc::new(Problems::default());
    let (credit, acks) = match ctx.flow {
        Some((credit, out)) => (Some(credit), Some(StdinAcks::new(id, out))),
        None => (None, None),
    };
    let stdin_task = tokio::spawn(stdin_writer(
        stdin_w,
        shell.initial_stdin,
        stdin_rx,
        pending.clone(),
        problems.clone(),
        acks,
    ));
    let cancel = CancellationToken::new();
    let control = Control {
        generation: ctx.generation,
        stdin: stdin_tx,
        stdin_closed: false,
        pending_stdin: pending,
        problems: problems.clone(),
        pids: pids.clone(),
        cancel: cancel.clone(),
        reaper: ctx.reaper.clone(),
        credit: credit.clone(),
    };
    let running = Running {
        id: id.to_owned(),
        timeout: shell.timeout_seconds,
        pids,
        exits,
        stdout,
        stderrs: stderr_rx,
        stdin_task,
        problems,
        cancel,
        reaper: ctx.reaper.clone(),
        started_at,
        credit,
        #[cfg(feature = "test-hooks")]
        panic_for_tests: ctx.panic_for_tests,
    };
    Ok((control, running))
}

/// Writes `initial` and then every queued frame to stage 0's stdin, in
/// order; `Close` (or the session dropping the queue) closes the pipe.
async fn stdin_writer(
    mut w: pipe::Sender,
    initial: Bytes,
    mut rx: mpsc::UnboundedReceiver<StdinMsg>,
    pending: Arc<AtomicUsize>,
    problems: Arc<Problems>,
    mut acks: Option<StdinAcks>,
) {
    let broken = |e: &io::Error| e.kind() == io::ErrorKind::BrokenPipe;
    if !initial.is_empty()
        && let Err(e) = w.write_all(&initial).await
    {
        if !broken(&e) {
            tracing::error!(event = "session_initial_stdin_write_failed", error = %e);
            problems.record(format!("initial_stdin write failed: {e}"));
        }
        return;
    }
    while let Some(msg) = rx.recv().await {
        match msg {
            StdinMsg::Data(d) => {
                pending.fetch_sub(d.len(), Ordering::AcqRel);
                if let Err(e) = w.write_all(&d).await {
                    if !broken(&e) {
                        problems.record(format!("stdin write: {e}"));
                    }
                    return;
                }
                if let Some(a) = acks.as_mut() {
                    a.consumed(d.len(), rx.is_empty()).await;
                }
            }
            StdinMsg::Close => break,
        }
    }
    if let Some(a) = acks.as_mut() {
        a.flush().await;
    }
}

/// Which captured stream a drainer reads.
#[derive(Clone, Copy)]
enum Stream {
    Stdout,
    Stderr(u32),
}

impl Stream {
    fn response(self, id: &str, data: Vec<u8>) -> Response {
        let data = Bytes::from(data);
        let payload = match self {
            Stream::Stdout => Payload::Stdout(pb::StdoutChunk { data }),
            Stream::Stderr(stage_index) => Payload::Stderr(pb::StderrChunk { stage_index, data }),
        };
        Response {
            command_id: id.to_owned(),
            payload: Some(payload),
        }
    }

    fn error_prefix(self) -> String {
        match self {
            Stream::Stdout => "stdout drain".into(),
            Stream::Stderr(i) => format!("stderr drain stage[{i}]"),
        }
    }
}

/// Copies a chunk out of the shared read buffer: exact-size, so a 10-byte
/// read does not pin a 128 KiB allocation in the outbound queue.
fn chunk(buf: &[u8]) -> Vec<u8> {
    buf.to_vec()
}

/// Sends unless the session is tearing down (then output is dropped, as
/// the reference does). Returns false once nothing can be delivered.
pub(super) async fn emit(out: &Outbound, cancel: &CancellationToken, resp: Response) -> bool {
    tokio::select! {
        r = out.send(Ok(resp)) => r.is_ok(),
        _ = cancel.cancelled() => false,
    }
}

async fn drain(
    mut rx: pipe::Receiver,
    stream: Stream,
    id: &str,
    out: &Outbound,
    exited: &CancellationToken,
    cancel: &CancellationToken,
    credit: Option<&Credit>,
) -> Result<(), String> {
    let mut buf = vec![0u8; CHUNK_SIZE];
    let mut deliver = true;
    loop {
        // Flow-controlled: read only as much as the CP can take. While the
        // credit is zero the child's pipe fills and the child blocks.
        // (Once every stage exited, the tail is read regardless: bounded by
        // what the pipe holds.)
        let taken = match credit {
            Some(c) if deliver => tokio::select! {
                n = c.take(CHUNK_SIZE) => n,
                _ = exited.cancelled() => 0,
                _ = cancel.cancelled() => return Ok(()),
            },
            _ => 0,
        };
        let allowed = if taken > 0 { taken } else { CHUNK_SIZE };
        let give_back = |used: usize| {
            if let Some(c) = credit {
                c.give_back(taken.saturating_sub(used));
            }
        };
        let n = tokio::select! {
            biased;
            r = rx.read(&mut buf[..allowed]) => match r {
                Ok(0) => {
                    give_back(0);
                    return Ok(());
                }
                Ok(n) => {
                    give_back(n);
                    n
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                    give_back(0);
                    continue;
                }
                Err(e) => return Err(format!("{}: {e}", stream.error_prefix())),
            },
            _ = exited.cancelled() => {
                give_back(0);
                // Every stage is gone but something (a background
                // grandchild) still holds the pipe: take what is already
                // buffered, without waiting for an EOF that may never come.
                loop {
                    // SAFETY: read into our own buffer; tokio set O_NONBLOCK.
                    let r = unsafe {
                        libc::read(rx.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len())
                    };
                    if r <= 0 {
                        return Ok(());
                    }
                    let n = r as usize;
                    if deliver {
                        deliver = emit(out, cancel, stream.response(id, chunk(&buf[..n]))).await;
                    }
                }
            }
        };
        if deliver {
            deliver = emit(out, cancel, stream.response(id, chunk(&buf[..n]))).await;
        }
    }
}

impl Running {
    /// Runs the command (after the session enqueued `Started`) to its
    /// single terminal response. `finish` is called
    /// right before the terminal response is enqueued (the session removes
    /// the id there, so the CP may reuse it as soon as it sees the answer).
    /// Returns the exit code when the terminal response was a `Done` that
    /// was queued for the CP (not on a timeout, I/O error or cancellation):
    /// what `exit_on_non_zero` acts on.
    pub async fn run(
        self,
        out: Outbound,
        terminal_sent: Arc<AtomicBool>,
        finish: impl FnOnce(),
    ) -> Option<i32> {
        let Running {
            id,
            timeout,
            pids,
            exits,
            stdout,
            stderrs,
            stdin_task,
            problems,
            cancel,
            reaper,
            started_at,
            credit,
            #[cfg(feature = "test-hooks")]
            panic_for_tests,
        } = self;
        // Kills every group if this worker unwinds or is dropped early.
        let guard = KillGuard {
            pids: pids.clone(),
            reaper: reaper.clone(),
            armed: true,
        };
        // `Started` was enqueued by the session before this worker ran.
        #[cfg(feature = "test-hooks")]
        if panic_for_tests {
            panic!("test-induced panic in shell worker {id}");
        }

        let exited = CancellationToken::new();
        let waits = {
            let (id, out, cancel) = (&id, &out, &cancel);
            join_all(exits.into_iter().enumerate().map(|(i, rx)| async move {
                let status = rx.await.ok();
                let (exit_code, signo) = match status {
                    Some(s) => match (s.code(), s.signal()) {
                        (Some(c), _) => (c, 0),
                        (None, Some(sig)) => (-1, sig),
                        _ => (-1, 0),
                    },
                    None => (-1, 0),
                };
                let resp = Response {
                    command_id: id.clone(),
                    payload: Some(Payload::StageExit(pb::StageExit {
                        stage_index: i as u32,
                        exit_code,
                        signo,
                    })),
                };
                emit(out, cancel, resp).await;
                exit_code
            }))
        };
        let drains = {
            let (id, out, exited, cancel) = (&id, &out, &exited, &cancel);
            let credit = credit.as_deref();
            let mut all = vec![drain(
                stdout,
                Stream::Stdout,
                id,
                out,
                exited,
                cancel,
                credit,
            )];
            all.extend(stderrs.into_iter().enumerate().map(|(i, rx)| {
                drain(
                    rx,
                    Stream::Stderr(i as u32),
                    id,
                    out,
                    exited,
                    cancel,
                    credit,
                )
            }));
            join_all(all)
        };
        tokio::pin!(waits, drains);
        let sleep = tokio::time::sleep(Duration::from_secs(u64::from(timeout.max(1))));
        tokio::pin!(sleep);
        let (mut codes, mut drained) = (None::<Vec<i32>>, None::<Vec<Result<(), String>>>);
        let (mut timed_out, mut cancelled) = (false, false);
        let kill_all = || {
            for &pid in pids.iter() {
                reaper.signal_group(pid, libc::SIGKILL);
            }
        };
        while codes.is_none() || drained.is_none() {
            tokio::select! {
                c = &mut waits, if codes.is_none() => {
                    codes = Some(c);
                    exited.cancel();
                }
                d = &mut drains, if drained.is_none() => drained = Some(d),
                _ = &mut sleep, if timeout > 0 && codes.is_none() && !timed_out => {
                    // Only a timeout that actually kills a running stage is
                    // reported as TIMEOUT (the reference checks a flag late).
                    timed_out = true;
                    kill_all();
                }
                _ = cancel.cancelled(), if !cancelled => {
                    cancelled = true;
                    kill_all();
                }
            }
        }
        let mut guard = guard;
        guard.armed = false;
        stdin_task.abort();

        let last = codes.as_ref().and_then(|c| c.last().copied()).unwrap_or(-1);
        let drain_error = drained
            .unwrap_or_default()
            .into_iter()
            .find_map(Result::err);
        let (payload, final_code, outcome) = if timed_out {
            (
                Payload::Error(pb::Error {
                    code: ErrorCode::Timeout as i32,
                    message: format!("pipeline killed after {timeout}s timeout"),
                    os_errno: 0,
                }),
                -1,
                "timeout",
            )
        } else if let Some(msg) = drain_error.or_else(|| problems.take()) {
            (
                Payload::Error(pb::Error {
                    code: ErrorCode::IoError as i32,
                    message: msg,
                    os_errno: 0,
                }),
                -1,
                "io_error",
            )
        } else {
            (
                Payload::Done(pb::Done {
                    final_exit_code: last,
                }),
                last,
                if cancelled { "cancelled" } else { "completed" },
            )
        };
        finish();
        terminal_sent.store(true, Ordering::Release);
        let resp = Response {
            command_id: id.clone(),
            payload: Some(payload),
        };
        let is_done = matches!(resp.payload, Some(Payload::Done(_)));
        let delivered = if cancelled {
            let _ = out.try_send(Ok(resp));
            false
        } else {
            out.send(Ok(resp)).await.is_ok()
        };
        audit_done(&id, started_at, final_code, timed_out, outcome);
        (is_done && delivered).then_some(final_code)
    }
}

struct KillGuard {
    pids: Arc<Vec<i32>>,
    reaper: Reaper,
    armed: bool,
}

impl Drop for KillGuard {
    fn drop(&mut self) {
        if self.armed {
            for &pid in self.pids.iter() {
                self.reaper.signal_group(pid, libc::SIGKILL);
            }
        }
    }
}

/// Builds a single `Error` response.
pub fn error_response(id: &str, code: ErrorCode, message: impl Into<String>) -> Response {
    Response {
        command_id: id.to_owned(),
        payload: Some(Payload::Error(pb::Error {
            code: code as i32,
            message: message.into(),
            os_errno: 0,
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_messages_match_the_reference() {
        let e = validate(&ShellCommand::default()).unwrap_err();
        assert_eq!(e.message, "shell: stages must not be empty");
        let shell = ShellCommand {
            stages: vec![
                PipeStage {
                    argv: vec!["true".into()],
                    ..Default::default()
                },
                PipeStage::default(),
            ],
            ..Default::default()
        };
        let e = validate(&shell).unwrap_err();
        assert_eq!(e.message, "shell: stage[1] argv must not be empty");
    }

    #[test]
    fn program_resolution_uses_the_given_path() {
        assert_eq!(resolve_program("/x/y", "").unwrap(), "/x/y");
        assert!(resolve_program("sh", "/bin:/usr/bin").is_ok());
        let e = resolve_program("no-such-prog-xyz", "/bin").unwrap_err();
        assert_eq!(
            e.to_string(),
            "exec: \"no-such-prog-xyz\": executable file not found in $PATH"
        );
    }
}
