//! `CopyFrom` and `CopyTo`: tar streams out of and into the container
//! (`clawker agent cp`). The tar work is [`crate::archive`]'s and runs on
//! a blocking thread; this module connects it to the session: output as
//! credit-gated `StdoutChunk`s, input from `Stdin` frames with
//! `StdinConsumed` acknowledgements, one terminal response.
//!
//! Both run as root (like `docker cp`). `CopyTo` extraction cannot leave
//! `dest_dir` whatever the archive or the container's file system holds
//! (see [`crate::archive`]: descriptor-relative, no symlink followed).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::control::CommandControl;
use super::flow::{Credit, StdinAcks};
use super::pipeline::{CHUNK_SIZE, Rejected, STDIN_BUFFER_LIMIT, emit};
use super::session::Outbound;
use crate::archive::{self, ArchiveError, Owner, UnpackOptions};
use crate::proto::clawkerd::v1::{self as pb, ErrorCode, Response, response::Payload};

fn not_found(what: &str, path: &str, e: &io::Error) -> Rejected {
    let code = if e.kind() == io::ErrorKind::NotFound {
        ErrorCode::NotFound
    } else {
        ErrorCode::IoError
    };
    Rejected {
        code,
        message: format!("{what}: {path}: {e}"),
        os_errno: e.raw_os_error().unwrap_or(0),
    }
}

fn absolute(what: &str, path: &str) -> Result<PathBuf, Rejected> {
    let p = Path::new(path);
    if !p.is_absolute() {
        return Err(Rejected::invalid(format!(
            "{what}: {path:?} is not an absolute path"
        )));
    }
    Ok(p.to_owned())
}

fn terminal(id: &str, result: Result<(), (ErrorCode, String)>) -> Response {
    let payload = match result {
        Ok(()) => Payload::Done(pb::Done { final_exit_code: 0 }),
        Err((code, message)) => Payload::Error(pb::Error {
            code: code as i32,
            message,
            os_errno: 0,
        }),
    };
    Response {
        command_id: id.to_owned(),
        payload: Some(payload),
    }
}

async fn send_terminal(out: &Outbound, cancelled: bool, resp: Response) {
    if cancelled {
        let _ = out.try_send(Ok(resp));
    } else {
        let _ = out.send(Ok(resp)).await;
    }
}

// ---- CopyFrom ------------------------------------------------------------

/// `Signal`/`CloseStdin` stop a running `CopyFrom`.
pub struct CopyFromControl {
    generation: u64,
    cancel: CancellationToken,
    credit: Option<Arc<Credit>>,
}

impl Drop for CopyFromControl {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

impl CommandControl for CopyFromControl {
    fn generation(&self) -> u64 {
        self.generation
    }
    fn stdin(&mut self, id: &str, _data: Bytes) {
        tracing::debug!(event = "copy_from_stdin_ignored", command_id = id);
    }
    fn close_stdin(&mut self) {}
    fn signal(&self, _id: &str, _signo: i32) {
        self.cancel.cancel();
    }
    fn grant(&self, bytes: u64) {
        if let Some(c) = &self.credit {
            c.grant(bytes);
        }
    }
}

pub struct CopyFromRunning {
    id: String,
    path: PathBuf,
    name: String,
    cancel: CancellationToken,
    credit: Option<Arc<Credit>>,
}

/// Validates a `CopyFrom` (absolute, existing path with a final name).
pub fn copy_from(
    id: &str,
    req: &pb::CopyFrom,
    generation: u64,
    credit: Option<Arc<Credit>>,
) -> Result<(CopyFromControl, CopyFromRunning), Rejected> {
    let path = absolute("copy_from", &req.path)?;
    std::fs::symlink_metadata(&path).map_err(|e| not_found("copy_from", &req.path, &e))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| Rejected::invalid(format!("copy_from: {:?} names no file", req.path)))?;
    tracing::info!(event = "copy_from_started", command_id = id, path = %req.path);
    let cancel = CancellationToken::new();
    Ok((
        CopyFromControl {
            generation,
            cancel: cancel.clone(),
            credit: credit.clone(),
        },
        CopyFromRunning {
            id: id.to_owned(),
            path,
            name,
            cancel,
            credit,
        },
    ))
}

impl CopyFromRunning {
    pub async fn run(self, out: Outbound, terminal_sent: Arc<AtomicBool>, finish: impl FnOnce()) {
        let CopyFromRunning {
            id,
            path,
            name,
            cancel,
            credit,
        } = self;
        let started = Instant::now();
        let (tx, mut rx) = mpsc::channel::<Bytes>(4);
        let packer = tokio::task::spawn_blocking(move || {
            let w = archive::ChunkWriter::new(CHUNK_SIZE, |b| {
                tx.blocking_send(b)
                    .map_err(|_| io::Error::from(io::ErrorKind::BrokenPipe))
            });
            archive::pack(&path, &name, w)
        });
        let mut sent = 0u64;
        let mut delivering = true;
        while let Some(mut chunk) = tokio::select! {
            c = rx.recv() => c,
            _ = cancel.cancelled() => None,
        } {
            while delivering && !chunk.is_empty() {
                let n = match &credit {
                    Some(c) => tokio::select! {
                        n = c.take(chunk.len()) => n,
                        _ = cancel.cancelled() => { delivering = false; break }
                    },
                    None => chunk.len(),
                };
                let piece = chunk.split_to(n);
                sent += piece.len() as u64;
                let resp = Response {
                    command_id: id.clone(),
                    payload: Some(Payload::Stdout(pb::StdoutChunk { data: piece })),
                };
                delivering = emit(&out, &cancel, resp).await;
            }
            if !delivering {
                break;
            }
        }
        // Dropping the receiver makes a still-running packer fail fast.
        drop(rx);
        let cancelled = cancel.is_cancelled();
        let result = match packer.await {
            _ if cancelled => Err((ErrorCode::IoError, "copy_from: cancelled".to_owned())),
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err((ErrorCode::IoError, format!("copy_from: {e}"))),
            Err(e) => Err((ErrorCode::IoError, format!("copy_from: packer: {e}"))),
        };
        let outcome = if result.is_ok() {
            "completed"
        } else {
            "failed"
        };
        finish();
        terminal_sent.store(true, Ordering::Release);
        send_terminal(&out, cancelled, terminal(&id, result)).await;
        tracing::info!(
            event = "copy_from_done",
            command_id = %id,
            bytes = sent,
            outcome,
            duration = started.elapsed().as_secs_f64() * 1000.0
        );
    }
}

// ---- CopyTo ----------------------------------------------------------------

/// Routes `Stdin` frames to the extracting thread.
pub struct CopyToControl {
    generation: u64,
    stdin: Option<std::sync::mpsc::Sender<Bytes>>,
    pending: Arc<AtomicUsize>,
    overflow: Arc<AtomicBool>,
    cancel: CancellationToken,
}

impl Drop for CopyToControl {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

impl CommandControl for CopyToControl {
    fn generation(&self) -> u64 {
        self.generation
    }

    fn stdin(&mut self, id: &str, data: Bytes) {
        let Some(tx) = &self.stdin else {
            tracing::warn!(event = "session_stdin_after_close", command_id = id);
            return;
        };
        let pending = self.pending.fetch_add(data.len(), Ordering::AcqRel) + data.len();
        if pending > STDIN_BUFFER_LIMIT {
            self.pending.fetch_sub(data.len(), Ordering::AcqRel);
            tracing::error!(event = "session_stdin_overflow", command_id = id, pending);
            // A tar stream with a hole is worthless: stop it.
            self.overflow.store(true, Ordering::Release);
            self.stdin = None;
            self.cancel.cancel();
            return;
        }
        let _ = tx.send(data);
    }

    /// The end of the tar stream.
    fn close_stdin(&mut self) {
        self.stdin = None;
    }

    fn signal(&self, _id: &str, _signo: i32) {
        self.cancel.cancel();
    }
}

pub struct CopyToRunning {
    id: String,
    dest: PathBuf,
    opts: UnpackOptions,
    rx: std::sync::mpsc::Receiver<Bytes>,
    pending: Arc<AtomicUsize>,
    overflow: Arc<AtomicBool>,
    cancel: CancellationToken,
    acks: Option<StdinAcks>,
}

/// Validates a `CopyTo`: `dest_dir` must be an existing directory (checked
/// before `Started`, so the CP can fall back to its parent).
pub fn copy_to(
    id: &str,
    req: &pb::CopyTo,
    generation: u64,
    acks: Option<StdinAcks>,
) -> Result<(CopyToControl, CopyToRunning), Rejected> {
    let dest = absolute("copy_to", &req.dest_dir)?;
    let meta = std::fs::metadata(&dest).map_err(|e| not_found("copy_to", &req.dest_dir, &e))?;
    if !meta.is_dir() {
        return Err(Rejected {
            code: ErrorCode::NotFound,
            message: format!("copy_to: {}: not a directory", req.dest_dir),
            os_errno: libc::ENOTDIR,
        });
    }
    let owner = if req.preserve_owner {
        Owner::Preserve
    } else {
        Owner::Fixed {
            uid: req.uid,
            gid: req.gid,
        }
    };
    tracing::info!(event = "copy_to_started", command_id = id, dest_dir = %req.dest_dir, preserve_owner = req.preserve_owner);
    let (tx, rx) = std::sync::mpsc::channel();
    let pending = Arc::new(AtomicUsize::new(0));
    let overflow = Arc::new(AtomicBool::new(false));
    let cancel = CancellationToken::new();
    Ok((
        CopyToControl {
            generation,
            stdin: Some(tx),
            pending: pending.clone(),
            overflow: overflow.clone(),
            cancel: cancel.clone(),
        },
        CopyToRunning {
            id: id.to_owned(),
            dest,
            opts: UnpackOptions {
                owner,
                rename_top: None,
                strip_setid: false,
            },
            rx,
            pending,
            overflow,
            cancel,
            acks,
        },
    ))
}

impl CopyToRunning {
    pub async fn run(self, out: Outbound, terminal_sent: Arc<AtomicBool>, finish: impl FnOnce()) {
        let CopyToRunning {
            id,
            dest,
            opts,
            rx,
            pending,
            overflow,
            cancel,
            acks,
        } = self;
        let started = Instant::now();
        let (ack_tx, mut ack_rx) = mpsc::unbounded_channel::<usize>();
        let unpacker = {
            let pending = pending.clone();
            tokio::task::spawn_blocking(move || {
                let mut reader = archive::ChunkReader::new(rx, move |n| {
                    pending.fetch_sub(n, Ordering::AcqRel);
                    let _ = ack_tx.send(n);
                });
                let stats = archive::unpack(&mut reader, &dest, &opts)?;
                // The tar reader stops at the end-of-archive marker; take
                // the padding after it too, so every byte sent is
                // acknowledged (the CP's stdin window closes at zero).
                io::copy(&mut reader, &mut io::sink()).map_err(|source| ArchiveError::Io {
                    what: "reading past the end of the archive".into(),
                    source,
                })?;
                Ok(stats)
            })
        };
        let acker = async move {
            let Some(mut acks) = acks else {
                while ack_rx.recv().await.is_some() {}
                return;
            };
            while let Some(n) = ack_rx.recv().await {
                acks.consumed(n, ack_rx.is_empty()).await;
            }
            acks.flush().await;
        };
        // Its own task: it ends when the unpacker drops its sender, which a
        // cancelled unpack only does after the control (and with it the
        // stdin sender) is gone, i.e. after `finish`.
        let acker = tokio::spawn(acker);
        let result = tokio::select! {
            r = unpacker => Some(r),
            _ = cancel.cancelled() => None,
        };
        if result.is_some() {
            // Every acknowledgement before the terminal response.
            let _ = acker.await;
        }
        let cancelled = result.is_none();
        let result = match result {
            _ if overflow.load(Ordering::Acquire) => Err((
                ErrorCode::IoError,
                format!(
                    "copy_to: more than {STDIN_BUFFER_LIMIT} bytes of tar stream queued; stopped"
                ),
            )),
            None => Err((ErrorCode::IoError, "copy_to: cancelled".to_owned())),
            Some(Ok(Ok(stats))) => {
                tracing::info!(event = "copy_to_unpacked", command_id = %id, entries = stats.entries, skipped = stats.skipped, bytes = stats.bytes);
                Ok(())
            }
            Some(Ok(Err(e @ ArchiveError::Refused { .. }))) => {
                Err((ErrorCode::InvalidRequest, format!("copy_to: {e}")))
            }
            Some(Ok(Err(e))) => Err((ErrorCode::IoError, format!("copy_to: {e}"))),
            Some(Err(e)) => Err((ErrorCode::IoError, format!("copy_to: unpacker: {e}"))),
        };
        let outcome = if result.is_ok() {
            "completed"
        } else {
            "failed"
        };
        finish();
        terminal_sent.store(true, Ordering::Release);
        send_terminal(&out, cancelled, terminal(&id, result)).await;
        tracing::info!(
            event = "copy_to_done",
            command_id = %id,
            outcome,
            duration = started.elapsed().as_secs_f64() * 1000.0
        );
    }
}
