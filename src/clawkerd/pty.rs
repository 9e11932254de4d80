//! One `PtyCommand`: a program under a pseudo-terminal (operator `exec -t`,
//! `clawker agent shell`).
//!
//! The child gets a new session (`setsid`) with the pty's slave side as
//! its controlling terminal and as stdin/stdout/stderr, so job control,
//! line editing and `^C` work as on a real terminal. clawkerd keeps the
//! master side:
//! - output (stdout and stderr are one stream on a terminal) is read from
//!   the master into `StdoutChunk`s, gated by the command's flow-control
//!   credit when it has one;
//! - `Stdin` frames are written to the master by their own task (the
//!   receive loop never blocks; unread input is bounded like a pipeline's);
//! - `Signal` goes to the terminal's *foreground* process group (what a
//!   keyboard signal would reach: the command the shell is running, not
//!   the shell), `Resize` sets the window size (the kernel then sends
//!   SIGWINCH to that same group);
//! - `CloseStdin` writes the terminal's EOF character when the line
//!   discipline is canonical (what typing `^D` does); in raw mode there is
//!   no such thing as EOF on a terminal, so further input is just refused.
//!
//! The terminal response follows the leader's exit, after the output
//! already in the pty buffer was read (the same no-lost-tail rule as
//! pipelines): `StageExit{0}` then `Done`, or `Error{TIMEOUT}`.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::control::CommandControl;
use super::flow::{Credit, StdinAcks};
use super::pipeline::{
    CHUNK_SIZE, Problems, Rejected, STDIN_BUFFER_LIMIT, StdinMsg, audit_done, emit, resolve_program,
};
use super::reaper::{ExitStatus, Reaper, Signalled};
use super::session::Outbound;
use crate::proto::clawkerd::v1::{self as pb, ErrorCode, PtyCommand, Response, response::Payload};

/// Window size when the CP sends none.
const DEFAULT_ROWS: u16 = 24;
const DEFAULT_COLS: u16 = 80;

/// The session side of a running pty command.
pub struct PtyControl {
    generation: u64,
    stdin: mpsc::UnboundedSender<StdinMsg>,
    stdin_closed: bool,
    pending_stdin: Arc<AtomicUsize>,
    problems: Arc<Problems>,
    leader: i32,
    master: Arc<OwnedFd>,
    cancel: CancellationToken,
    reaper: Reaper,
    credit: Option<Arc<Credit>>,
}

impl Drop for PtyControl {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

impl CommandControl for PtyControl {
    fn generation(&self) -> u64 {
        self.generation
    }

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
                "stdin: more than {STDIN_BUFFER_LIMIT} bytes unread by the terminal; data dropped"
            ));
            return;
        }
        let _ = self.stdin.send(StdinMsg::Data(data));
    }

    fn close_stdin(&mut self) {
        if !self.stdin_closed {
            self.stdin_closed = true;
            let _ = self.stdin.send(StdinMsg::Close);
        }
    }

    /// To the terminal's foreground process group; the leader's group
    /// when there is none (or the leader is the foreground).
    fn signal(&self, id: &str, signo: i32) {
        // SAFETY: tcgetpgrp on a descriptor we own.
        let fg = unsafe { libc::tcgetpgrp(self.master.as_raw_fd()) };
        let result = if fg > 0 && fg != self.leader {
            // The foreground group belongs to a live process of this
            // terminal's session: the terminal cannot name a dead group.
            // SAFETY: kill with plain integers.
            if unsafe { libc::kill(-fg, signo) } == 0 {
                Signalled::Sent
            } else {
                Signalled::Failed(io::Error::last_os_error().raw_os_error().unwrap_or(0))
            }
        } else {
            self.reaper.signal_group(self.leader, signo)
        };
        match result {
            Signalled::Sent => {}
            Signalled::AlreadyExited => {
                tracing::debug!(event = "session_signal_after_exit", command_id = id, signo)
            }
            Signalled::Failed(errno) => tracing::error!(
                event = "session_signal_forward_failed",
                command_id = id,
                signo,
                errno
            ),
        }
    }

    fn resize(&self, _id: &str, rows: u16, cols: u16) -> Result<(), &'static str> {
        set_winsize(self.master.as_raw_fd(), rows, cols).map_err(|_| "resize: TIOCSWINSZ failed")
    }

    fn grant(&self, bytes: u64) {
        if let Some(c) = &self.credit {
            c.grant(bytes);
        }
    }
}

/// A spawned pty command, before its worker runs.
pub struct PtyRunning {
    id: String,
    timeout: u32,
    leader: i32,
    exit: oneshot::Receiver<ExitStatus>,
    master: Arc<AsyncFd<OwnedFd>>,
    control_master: Arc<OwnedFd>,
    stdin_rx: mpsc::UnboundedReceiver<StdinMsg>,
    pending_stdin: Arc<AtomicUsize>,
    problems: Arc<Problems>,
    cancel: CancellationToken,
    reaper: Reaper,
    credit: Option<Arc<Credit>>,
    acks: Option<StdinAcks>,
    started_at: Instant,
}

/// What [`spawn`] needs from the session.
pub struct PtyCtx<'a> {
    pub reaper: &'a Reaper,
    pub path_var: &'a str,
    pub generation: u64,
    pub flow: Option<(Arc<Credit>, Outbound)>,
}

fn os_err(what: &str) -> Rejected {
    let e = io::Error::last_os_error();
    Rejected::spawn_failed(format!("pty: {what}: {e}"), e.raw_os_error().unwrap_or(0))
}

fn set_winsize(fd: i32, rows: u16, cols: u16) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize from a live local.
    if unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &ws) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Opens a pty pair: (master, slave), both close-on-exec.
fn open_pty() -> Result<(OwnedFd, OwnedFd), Rejected> {
    // SAFETY: posix_openpt/grantpt/unlockpt/ptsname_r/open on descriptors
    // and buffers we own; every result is checked.
    unsafe {
        let m = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
        if m < 0 {
            return Err(os_err("posix_openpt"));
        }
        let master = OwnedFd::from_raw_fd(m);
        if libc::grantpt(m) != 0 {
            return Err(os_err("grantpt"));
        }
        if libc::unlockpt(m) != 0 {
            return Err(os_err("unlockpt"));
        }
        let mut name = [0 as libc::c_char; 128];
        if libc::ptsname_r(m, name.as_mut_ptr(), name.len()) != 0 {
            return Err(os_err("ptsname_r"));
        }
        let s = libc::open(
            CStr::from_ptr(name.as_ptr()).as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        );
        if s < 0 {
            return Err(os_err("open slave"));
        }
        Ok((master, OwnedFd::from_raw_fd(s)))
    }
}

/// Validates and spawns `cmd` under a fresh pty.
pub fn spawn(
    id: &str,
    cmd: PtyCommand,
    ctx: PtyCtx<'_>,
) -> Result<(PtyControl, PtyRunning), Rejected> {
    let started_at = Instant::now();
    if cmd.argv.is_empty() {
        return Err(Rejected::invalid("pty: argv must not be empty"));
    }
    let clamp = |v: u32, default: u16| match v {
        0 => default,
        v => u16::try_from(v).unwrap_or(u16::MAX),
    };
    let (rows, cols) = (clamp(cmd.rows, DEFAULT_ROWS), clamp(cmd.cols, DEFAULT_COLS));
    tracing::info!(
        event = "pty_command_started",
        command_id = id,
        argv = ?cmd.argv,
        cwd = %cmd.cwd,
        uid = cmd.uid,
        gid = cmd.gid,
        rows,
        cols,
        timeout_seconds = cmd.timeout_seconds,
        "pty command starting"
    );
    let program = resolve_program(&cmd.argv[0], ctx.path_var)
        .map_err(|e| Rejected::spawn_failed(format!("pty: start: {e}"), libc::ENOENT))?;
    let (master, slave) = open_pty()?;
    set_winsize(master.as_raw_fd(), rows, cols)
        .map_err(|e| Rejected::spawn_failed(format!("pty: TIOCSWINSZ: {e}"), 0))?;
    let stdio = |what: &str| {
        slave.try_clone().map(Stdio::from).map_err(|e| {
            Rejected::spawn_failed(
                format!("pty: dup {what}: {e}"),
                e.raw_os_error().unwrap_or(0),
            )
        })
    };
    let term = if cmd.term.is_empty() {
        "xterm"
    } else {
        cmd.term.as_str()
    };
    let mut c = Command::new(&program);
    c.arg0(&cmd.argv[0])
        .args(&cmd.argv[1..])
        .env("TERM", term)
        .envs(&cmd.env)
        .stdin(stdio("stdin")?)
        .stdout(stdio("stdout")?)
        .stderr(stdio("stderr")?);
    if !cmd.cwd.is_empty() {
        c.current_dir(&cmd.cwd);
    }
    if cmd.uid != 0 || cmd.gid != 0 {
        c.uid(cmd.uid).gid(cmd.gid);
    }
    // SAFETY: runs in the forked child before exec; only async-signal-safe
    // calls. setsid makes the child a session (and group) leader without a
    // terminal; TIOCSCTTY makes the slave (already its fd 0) that
    // session's controlling terminal. Not process_group(0): setsid fails
    // for a group leader.
    unsafe {
        c.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let (leader, exit) = ctx.reaper.spawn(&mut c).map_err(|e| {
        audit_done(id, started_at, -1, false, "spawn_failed");
        Rejected::spawn_failed(format!("pty: start: {e}"), e.raw_os_error().unwrap_or(0))
    })?;
    // Our copies of the slave: once the child (and its children) close
    // theirs, reading the master reports EIO, the terminal's end.
    drop(c);
    drop(slave);

    let kill = |why: String| {
        ctx.reaper.signal_group(leader, libc::SIGKILL);
        Rejected::spawn_failed(why, 0)
    };
    let control_master = Arc::new(
        master
            .try_clone()
            .map_err(|e| kill(format!("pty: dup master: {e}")))?,
    );
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        let fl = libc::fcntl(master.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(master.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
    }
    // SAFETY: an OwnedFd always reports the same open descriptor, and it
    // stays open for as long as the AsyncFd owns it.
    let registered = unsafe { AsyncFd::register(master) };
    let master = Arc::new(registered.map_err(|e| kill(format!("pty: register master: {e}")))?);
    let (stdin_tx, stdin_rx) = mpsc::unbounded_channel();
    let pending = Arc::new(AtomicUsize::new(0));
    let problems = Arc::new(Problems::default());
    let (credit, acks) = match ctx.flow {
        Some((credit, out)) => (Some(credit), Some(StdinAcks::new(id, out))),
        None => (None, None),
    };
    let cancel = CancellationToken::new();
    let control = PtyControl {
        generation: ctx.generation,
        stdin: stdin_tx,
        stdin_closed: false,
        pending_stdin: pending.clone(),
        problems: problems.clone(),
        leader,
        master: control_master.clone(),
        cancel: cancel.clone(),
        reaper: ctx.reaper.clone(),
        credit: credit.clone(),
    };
    let running = PtyRunning {
        id: id.to_owned(),
        timeout: cmd.timeout_seconds,
        leader,
        exit,
        master,
        control_master,
        stdin_rx,
        pending_stdin: pending,
        problems,
        cancel,
        reaper: ctx.reaper.clone(),
        credit,
        acks,
        started_at,
    };
    Ok((control, running))
}

/// Reads the master until EOF/EIO (the slave is closed everywhere) or,
/// once `exited` fires, until nothing more is buffered.
async fn read_output(
    master: &AsyncFd<OwnedFd>,
    id: &str,
    out: &Outbound,
    credit: Option<&Credit>,
    exited: &CancellationToken,
    cancel: &CancellationToken,
) -> Result<(), String> {
    let mut buf = vec![0u8; CHUNK_SIZE];
    let read = |buf: &mut [u8]| -> io::Result<usize> {
        // SAFETY: read into our own buffer from a descriptor we own.
        let r = unsafe { libc::read(master.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r as usize)
        }
    };
    // EIO: every slave descriptor is closed, the terminal's end of file.
    let eof = |e: &io::Error| e.raw_os_error() == Some(libc::EIO);
    loop {
        let taken = match credit {
            Some(c) => tokio::select! {
                n = c.take(CHUNK_SIZE) => n,
                _ = exited.cancelled() => 0,
                _ = cancel.cancelled() => return Ok(()),
            },
            None => 0,
        };
        let allowed = if taken > 0 { taken } else { CHUNK_SIZE };
        let give_back = |used: usize| {
            if let Some(c) = credit {
                c.give_back(taken.saturating_sub(used));
            }
        };
        let got = tokio::select! {
            biased;
            g = master.readable() => {
                let mut guard = match g {
                    Ok(g) => g,
                    Err(e) => {
                        give_back(0);
                        return Err(format!("pty read: {e}"));
                    }
                };
                match guard.try_io(|_| read(&mut buf[..allowed])) {
                    Ok(Ok(0)) => { give_back(0); return Ok(()) }
                    Ok(Ok(n)) => { give_back(n); n }
                    Ok(Err(e)) if eof(&e) => { give_back(0); return Ok(()) }
                    Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => { give_back(0); continue }
                    Ok(Err(e)) => { give_back(0); return Err(format!("pty read: {e}")) }
                    Err(_would_block) => { give_back(0); continue }
                }
            }
            _ = exited.cancelled() => {
                give_back(0);
                // The leader is gone: take what is buffered, without
                // waiting for an EOF a background process may hold off.
                loop {
                    match read(&mut buf) {
                        Ok(n) if n > 0 => {
                            let resp = stdout(id, &buf[..n]);
                            if !emit(out, cancel, resp).await {
                                return Ok(());
                            }
                        }
                        _ => return Ok(()),
                    }
                }
            }
            _ = cancel.cancelled() => { give_back(0); return Ok(()) }
        };
        if !emit(out, cancel, stdout(id, &buf[..got])).await {
            return Ok(());
        }
    }
}

fn stdout(id: &str, data: &[u8]) -> Response {
    Response {
        command_id: id.to_owned(),
        payload: Some(Payload::Stdout(pb::StdoutChunk {
            data: Bytes::copy_from_slice(data),
        })),
    }
}

/// Writes queued stdin to the master, in order.
async fn write_input(
    master: Arc<AsyncFd<OwnedFd>>,
    mut rx: mpsc::UnboundedReceiver<StdinMsg>,
    pending: Arc<AtomicUsize>,
    problems: Arc<Problems>,
    mut acks: Option<StdinAcks>,
) {
    let write = |data: &[u8]| -> io::Result<usize> {
        // SAFETY: write from a live slice to a descriptor we own.
        let r = unsafe { libc::write(master.as_raw_fd(), data.as_ptr().cast(), data.len()) };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r as usize)
        }
    };
    while let Some(msg) = rx.recv().await {
        let closing = matches!(msg, StdinMsg::Close);
        let data = match msg {
            StdinMsg::Data(d) => {
                pending.fetch_sub(d.len(), Ordering::AcqRel);
                d
            }
            StdinMsg::Close => {
                if let Some(a) = acks.as_mut() {
                    a.flush().await;
                }
                match canonical_eof(master.as_raw_fd()) {
                    Some(eof) => Bytes::copy_from_slice(&[eof]),
                    None => return,
                }
            }
        };
        let mut off = 0;
        while off < data.len() {
            let mut guard = match master.writable().await {
                Ok(g) => g,
                Err(e) => {
                    problems.record(format!("pty write: {e}"));
                    return;
                }
            };
            match guard.try_io(|_| write(&data[off..])) {
                Ok(Ok(n)) => off += n,
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                // EIO: the terminal is gone; the bytes have nowhere to go.
                Ok(Err(_)) => return,
                Err(_would_block) => {}
            }
        }
        if closing {
            return;
        }
        if let Some(a) = acks.as_mut() {
            a.consumed(data.len(), rx.is_empty()).await;
        }
    }
}

/// The EOF character if the terminal is in canonical mode.
fn canonical_eof(fd: i32) -> Option<u8> {
    // SAFETY: tcgetattr writes one termios into a zeroed local.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    if unsafe { libc::tcgetattr(fd, &mut t) } != 0 {
        return None;
    }
    (t.c_lflag & libc::ICANON != 0).then_some(t.c_cc[libc::VEOF])
}

impl PtyRunning {
    /// Runs to the single terminal response (see the module doc).
    pub async fn run(self, out: Outbound, terminal_sent: Arc<AtomicBool>, finish: impl FnOnce()) {
        let PtyRunning {
            id,
            timeout,
            leader,
            exit,
            master,
            control_master,
            stdin_rx,
            pending_stdin,
            problems,
            cancel,
            reaper,
            credit,
            acks,
            started_at,
        } = self;
        let kill_all = || {
            // SAFETY: tcgetpgrp on a descriptor we own.
            let fg = unsafe { libc::tcgetpgrp(control_master.as_raw_fd()) };
            if fg > 0 && fg != leader {
                // SAFETY: kill with plain integers.
                unsafe { libc::kill(-fg, libc::SIGKILL) };
            }
            reaper.signal_group(leader, libc::SIGKILL);
        };
        let writer = tokio::spawn(write_input(
            master.clone(),
            stdin_rx,
            pending_stdin,
            problems.clone(),
            acks,
        ));
        let exited = CancellationToken::new();
        let reader = read_output(&master, &id, &out, credit.as_deref(), &exited, &cancel);
        let wait = async {
            let status = exit.await.ok();
            exited.cancel();
            status
        };
        tokio::pin!(reader, wait);
        let sleep = tokio::time::sleep(Duration::from_secs(u64::from(timeout.max(1))));
        tokio::pin!(sleep);
        let (mut status, mut read) = (None::<Option<ExitStatus>>, None::<Result<(), String>>);
        let (mut timed_out, mut cancelled) = (false, false);
        while status.is_none() || read.is_none() {
            tokio::select! {
                s = &mut wait, if status.is_none() => status = Some(s),
                r = &mut reader, if read.is_none() => read = Some(r),
                _ = &mut sleep, if timeout > 0 && status.is_none() && !timed_out => {
                    timed_out = true;
                    kill_all();
                }
                _ = cancel.cancelled(), if !cancelled => {
                    cancelled = true;
                    kill_all();
                }
            }
        }
        writer.abort();
        let status = status.flatten();
        let (exit_code, signo) = match status {
            Some(s) => match (s.code(), s.signal()) {
                (Some(c), _) => (c, 0),
                (None, Some(sig)) => (-1, sig),
                _ => (-1, 0),
            },
            None => (-1, 0),
        };
        let mut responses = vec![Payload::StageExit(pb::StageExit {
            stage_index: 0,
            exit_code,
            signo,
        })];
        let (terminal, outcome) = if timed_out {
            (
                Payload::Error(pb::Error {
                    code: ErrorCode::Timeout as i32,
                    message: format!("pty command killed after {timeout}s timeout"),
                    os_errno: 0,
                }),
                "timeout",
            )
        } else if let Some(msg) = read.and_then(Result::err).or_else(|| problems.take()) {
            (
                Payload::Error(pb::Error {
                    code: ErrorCode::IoError as i32,
                    message: msg,
                    os_errno: 0,
                }),
                "io_error",
            )
        } else {
            (
                Payload::Done(pb::Done {
                    final_exit_code: exit_code,
                }),
                if cancelled { "cancelled" } else { "completed" },
            )
        };
        if !cancelled {
            for p in responses.drain(..) {
                let _ = out
                    .send(Ok(Response {
                        command_id: id.clone(),
                        payload: Some(p),
                    }))
                    .await;
            }
        }
        finish();
        terminal_sent.store(true, Ordering::Release);
        let resp = Response {
            command_id: id.clone(),
            payload: Some(terminal),
        };
        if cancelled {
            let _ = out.try_send(Ok(resp));
        } else {
            let _ = out.send(Ok(resp)).await;
        }
        audit_done(&id, started_at, exit_code, timed_out, outcome);
    }
}
