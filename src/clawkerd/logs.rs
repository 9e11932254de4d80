//! The user command's output, kept for `clawker agent logs`.
//!
//! The user command used to inherit PID 1's stdout/stderr, which is what
//! `docker logs` shows. It still does, through a tee: unless clawkerd runs
//! on a terminal, the command writes into two pipes and one thread per pipe
//! copies every chunk to clawkerd's own stdout/stderr (so `docker logs` is
//! unchanged) and into one bounded [`OutputLog`] ring (stdout and stderr
//! interleaved in arrival order, the newest [`LOG_CAPACITY`] bytes kept).
//! Blocking threads, not tasks: a stalled log driver must stall the user
//! command exactly as before, never a runtime worker.
//!
//! On a terminal (`docker run -t`) the command keeps the terminal (a TUI
//! needs it) and nothing is captured; `Logs` then says so.
//!
//! A `Logs` command reads the ring from an offset: everything buffered
//! (or the last `tail_bytes`), then, with `follow`, new output as it
//! arrives until the CP sends `Signal`/`CloseStdin` on its id, the session
//! ends, or both pipes reached end of file. A follower that falls more
//! than the ring behind skips what was overwritten (logged).

use std::collections::VecDeque;
use std::io::{self, Read};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::control::CommandControl;
use super::flow::Credit;
use super::pipeline::{CHUNK_SIZE, emit};
use super::session::Outbound;
use crate::proto::clawkerd::v1::{self as pb, Response, response::Payload};

/// Bytes of user-command output kept for `Logs`.
pub const LOG_CAPACITY: usize = 4 * 1024 * 1024;

/// Where the output log stands; followers watch it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogMark {
    /// Offset one past the last byte ever written.
    pub end: u64,
    /// How many capture streams reached end of file.
    pub closed: u8,
}

/// The bounded ring of the user command's output.
pub struct OutputLog {
    ring: Mutex<Ring>,
    mark: watch::Sender<LogMark>,
    /// Whether output is captured at all (false on a terminal).
    captured: AtomicBool,
    capacity: usize,
}

struct Ring {
    buf: VecDeque<u8>,
    /// Offset of `buf[0]` in the whole output.
    start: u64,
}

/// Streams the tee captures (stdout and stderr).
const STREAMS: u8 = 2;

impl OutputLog {
    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(Self {
            ring: Mutex::new(Ring {
                buf: VecDeque::new(),
                start: 0,
            }),
            mark: watch::channel(LogMark::default()).0,
            captured: AtomicBool::new(false),
            capacity,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn is_captured(&self) -> bool {
        self.captured.load(Ordering::Acquire)
    }

    /// Appends one chunk, dropping the oldest bytes beyond capacity.
    pub fn append(&self, data: &[u8]) {
        let end = {
            let mut r = self.lock();
            r.buf.extend(data);
            let excess = r.buf.len().saturating_sub(self.capacity);
            if excess > 0 {
                r.buf.drain(..excess);
                r.start += excess as u64;
            }
            r.start + r.buf.len() as u64
        };
        self.mark.send_modify(|m| m.end = end);
    }

    fn close_stream(&self) {
        self.mark.send_modify(|m| m.closed += 1);
    }

    /// Whether every capture stream ended (the command and everything that
    /// inherited its output are gone).
    pub fn all_closed(&self) -> bool {
        self.mark.borrow().closed >= STREAMS
    }

    pub fn watch(&self) -> watch::Receiver<LogMark> {
        self.mark.subscribe()
    }

    /// The first offset a reader wanting the last `tail` bytes (0 = all
    /// buffered) starts at.
    pub fn start_offset(&self, tail: u64) -> u64 {
        let r = self.lock();
        let end = r.start + r.buf.len() as u64;
        if tail == 0 {
            r.start
        } else {
            end.saturating_sub(tail).max(r.start)
        }
    }

    /// Up to `max` bytes from `offset`: (the offset they start at, which is
    /// later than asked when the ring overwrote the gap; the bytes).
    pub fn read_from(&self, offset: u64, max: usize) -> (u64, Bytes) {
        let r = self.lock();
        let from = offset.max(r.start);
        let skip = (from - r.start) as usize;
        if skip >= r.buf.len() {
            return (from, Bytes::new());
        }
        let n = (r.buf.len() - skip).min(max);
        let (a, b) = r.buf.as_slices();
        let mut out = Vec::with_capacity(n);
        if skip < a.len() {
            let end = (skip + n).min(a.len());
            out.extend_from_slice(&a[skip..end]);
            out.extend_from_slice(&b[..n - (end - skip)]);
        } else {
            out.extend_from_slice(&b[skip - a.len()..skip - a.len() + n]);
        }
        (from, Bytes::from(out))
    }

    /// Starts the tee for the user command's stdout and stderr pipes
    /// (read ends): each chunk to clawkerd's fd 1 or 2, and into the ring.
    pub fn tee(self: &Arc<Self>, stdout: OwnedFd, stderr: OwnedFd) {
        self.captured.store(true, Ordering::Release);
        for (fd, sink) in [(stdout, 1), (stderr, 2)] {
            let log = self.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("clawkerd-tee-{sink}"))
                .spawn(move || tee_loop(fd, sink, &log));
            if let Err(e) = spawned {
                // Without the thread nobody drains the pipe and the user
                // command would block on a full pipe: nothing to do but
                // report it loudly (threads failing to start means the
                // container is out of resources).
                tracing::error!(event = "logs_tee_start_failed", fd = sink, error = %e);
            }
        }
    }

    /// Waits until both streams ended or `grace` passed (so the tail of
    /// the output reaches `docker logs` before PID 1 exits).
    pub async fn wait_closed(&self, grace: Duration) {
        if !self.is_captured() {
            return;
        }
        let mut rx = self.watch();
        let _ = tokio::time::timeout(grace, rx.wait_for(|m| m.closed >= STREAMS)).await;
    }
}

fn tee_loop(fd: OwnedFd, sink: i32, log: &OutputLog) {
    let mut pipe = std::fs::File::from(fd);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match pipe.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::warn!(event = "logs_tee_read_failed", fd = sink, error = %e);
                break;
            }
        };
        write_all_fd(sink, &buf[..n]);
        log.append(&buf[..n]);
    }
    drop(pipe);
    log.close_stream();
}

/// Best effort: a closed or broken console must not stop the capture.
fn write_all_fd(fd: i32, mut data: &[u8]) {
    while !data.is_empty() {
        // SAFETY: write from a live slice to one of our standard fds.
        let r = unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
        if r < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        data = &data[r as usize..];
    }
}

/// The session side of a running `Logs` command: `Signal` or `CloseStdin`
/// ends a follow.
pub struct LogsControl {
    generation: u64,
    cancel: CancellationToken,
    credit: Option<Arc<Credit>>,
}

impl Drop for LogsControl {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

impl CommandControl for LogsControl {
    fn generation(&self) -> u64 {
        self.generation
    }
    fn stdin(&mut self, id: &str, _data: Bytes) {
        tracing::debug!(event = "logs_stdin_ignored", command_id = id);
    }
    fn close_stdin(&mut self) {
        self.cancel.cancel();
    }
    fn signal(&self, _id: &str, _signo: i32) {
        self.cancel.cancel();
    }
    fn grant(&self, bytes: u64) {
        if let Some(c) = &self.credit {
            c.grant(bytes);
        }
    }
}

/// A `Logs` command, ready to run.
pub struct LogsRunning {
    id: String,
    log: Arc<OutputLog>,
    follow: bool,
    offset: u64,
    cancel: CancellationToken,
    credit: Option<Arc<Credit>>,
}

pub fn start(
    id: &str,
    req: &pb::Logs,
    log: Arc<OutputLog>,
    generation: u64,
    credit: Option<Arc<Credit>>,
) -> (LogsControl, LogsRunning) {
    let cancel = CancellationToken::new();
    let offset = log.start_offset(req.tail_bytes);
    (
        LogsControl {
            generation,
            cancel: cancel.clone(),
            credit: credit.clone(),
        },
        LogsRunning {
            id: id.to_owned(),
            log,
            follow: req.follow,
            offset,
            cancel,
            credit,
        },
    )
}

impl LogsRunning {
    /// Streams until caught up (or, following, until cancelled or the
    /// output ends), then `Done{0}`.
    pub async fn run(self, out: Outbound, terminal_sent: Arc<AtomicBool>, finish: impl FnOnce()) {
        let LogsRunning {
            id,
            log,
            follow,
            mut offset,
            cancel,
            credit,
        } = self;
        let started = Instant::now();
        let mut mark = log.watch();
        let mut delivered = 0u64;
        'outer: loop {
            loop {
                let max = match &credit {
                    Some(c) => tokio::select! {
                        n = c.take(CHUNK_SIZE) => n,
                        _ = cancel.cancelled() => break 'outer,
                    },
                    None => CHUNK_SIZE,
                };
                let (from, data) = log.read_from(offset, max);
                if let Some(c) = &credit {
                    c.give_back(max - data.len());
                }
                if from > offset {
                    tracing::warn!(event = "logs_follower_skipped", command_id = %id, bytes = from - offset);
                }
                if data.is_empty() {
                    offset = from;
                    break;
                }
                offset = from + data.len() as u64;
                delivered += data.len() as u64;
                let resp = Response {
                    command_id: id.clone(),
                    payload: Some(Payload::Stdout(pb::StdoutChunk { data })),
                };
                if !emit(&out, &cancel, resp).await {
                    break 'outer;
                }
            }
            if !follow || log.all_closed() {
                break;
            }
            tokio::select! {
                r = mark.changed() => if r.is_err() { break },
                _ = cancel.cancelled() => break,
            }
        }
        finish();
        terminal_sent.store(true, Ordering::Release);
        let done = Response {
            command_id: id.clone(),
            payload: Some(Payload::Done(pb::Done { final_exit_code: 0 })),
        };
        if cancel.is_cancelled() {
            let _ = out.try_send(Ok(done));
        } else {
            let _ = out.send(Ok(done)).await;
        }
        tracing::info!(
            event = "logs_done",
            command_id = %id,
            bytes = delivered,
            duration = started.elapsed().as_secs_f64() * 1000.0
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_keeps_the_newest_bytes_and_reads_across_the_wrap() {
        let log = OutputLog::new(8);
        log.append(b"abcdef");
        log.append(b"ghij");
        // 10 bytes written, 8 kept: "cdefghij" from offset 2.
        assert_eq!(log.start_offset(0), 2);
        assert_eq!(log.start_offset(3), 7);
        let (from, data) = log.read_from(0, 100);
        assert_eq!((from, &data[..]), (2, &b"cdefghij"[..]));
        let (from, data) = log.read_from(5, 2);
        assert_eq!((from, &data[..]), (5, &b"fg"[..]));
        let (from, data) = log.read_from(10, 4);
        assert_eq!((from, data.len()), (10, 0));
    }
}
