//! The audit log: every bus event as one JSON line,
//! `{"name": …, "at": RFC 3339, "event": {…}}`, in an append-only file with
//! size-based rotation (`events.jsonl` → `.1` → `.2` …, `keep` rotated files).
//!
//! Why a dedicated writer thread: file I/O (and above all `fsync`) must
//! never run on an actor's thread. The [`AuditActor`] only formats lines and
//! hands them over a channel; the writer thread owns the file, rotates it
//! and fsyncs on rotation and on close.
//!
//! Nothing is lost on a clean shutdown: `stopped()` drains whatever is left
//! in the subscription's mailbox into the writer, then closes it and waits
//! for the final fsync. (Events still queued *inside the bus* are the
//! daemon's to flush first: `bus.flush().await` before stopping policy.)

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, mpsc};
use std::task::{Context as TaskContext, Poll};

use actix::prelude::*;
use clawker_actors::{AuditSubscription, BusError, ChildLink, ChildSpec, Event, Restart};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Audit log settings (TOML-friendly; every field has a default).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuditConfig {
    pub enabled: bool,
    /// The live file; `None` = `<state>/audit/events.jsonl`.
    pub path: Option<PathBuf>,
    /// Rotate when the live file would grow past this many bytes.
    pub max_bytes: u64,
    /// Rotated files kept (`.1` newest … `.keep` oldest).
    pub keep: usize,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            path: None,
            max_bytes: 16 * 1024 * 1024,
            keep: 5,
        }
    }
}

impl AuditConfig {
    /// The live file for a state dir.
    pub fn resolve_path(&self, state_dir: &Path) -> PathBuf {
        self.path
            .clone()
            .unwrap_or_else(|| state_dir.join("audit").join("events.jsonl"))
    }
}

/// Why the audit actor could not start.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The log file (or its directory) cannot be created or opened.
    #[error("open audit log {}: {source}", .path.display())]
    Open { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error("spawn audit writer: {0}")]
    SpawnWriter(io::Error),
}

/// One line of the audit log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub name: String,
    pub at: String,
    pub event: serde_json::Value,
}

impl AuditRecord {
    /// The record for a bus event: `at` is the event's own `at` when it
    /// has one, else the time it was logged.
    pub fn of(e: &dyn Event) -> Self {
        let event = e.to_json();
        let at = event
            .get("at")
            .and_then(|v| v.as_str())
            .map(str::to_owned)
            .unwrap_or_else(|| {
                OffsetDateTime::now_utc()
                    .format(&Rfc3339)
                    .unwrap_or_default()
            });
        Self {
            name: e.name().to_owned(),
            at,
            event,
        }
    }
}

fn rotated(path: &Path, n: usize) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

// ---------------------------------------------------------------------------
// Writer thread

/// The file side: append, rotate, fsync.
pub struct AuditWriter {
    path: PathBuf,
    max_bytes: u64,
    keep: usize,
    file: File,
    size: u64,
}

impl AuditWriter {
    pub fn open(path: &Path, max_bytes: u64, keep: usize) -> io::Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let size = file.metadata()?.len();
        Ok(Self {
            path: path.to_owned(),
            max_bytes: max_bytes.max(1),
            keep,
            file,
            size,
        })
    }

    /// Appends one line (a newline is added), rotating first if it would
    /// overflow a non-empty file.
    pub fn write_line(&mut self, line: &str) -> io::Result<()> {
        let len = line.len() as u64 + 1;
        if self.size > 0 && self.size + len > self.max_bytes {
            self.rotate()?;
        }
        let mut buf = Vec::with_capacity(line.len() + 1);
        buf.extend_from_slice(line.as_bytes());
        buf.push(b'\n');
        self.file.write_all(&buf)?;
        self.size += len;
        Ok(())
    }

    pub fn sync(&mut self) -> io::Result<()> {
        self.file.flush()?;
        self.file.sync_all()
    }

    fn rotate(&mut self) -> io::Result<()> {
        self.sync()?;
        if self.keep == 0 {
            self.file = OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(true)
                .open(&self.path)?;
        } else {
            let _ = fs::remove_file(rotated(&self.path, self.keep));
            for n in (1..self.keep).rev() {
                let from = rotated(&self.path, n);
                if from.exists() {
                    fs::rename(&from, rotated(&self.path, n + 1))?;
                }
            }
            fs::rename(&self.path, rotated(&self.path, 1))?;
            self.file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)?;
        }
        self.size = 0;
        // The renames live in the directory: make them durable too.
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty())
            && let Ok(d) = File::open(dir)
        {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

fn writer_loop(mut w: AuditWriter, rx: mpsc::Receiver<String>) {
    let mut failed_lines = 0u64;
    for l in rx {
        if let Err(e) = w.write_line(&l) {
            failed_lines += 1;
            tracing::error!(event = "audit_write_failed", path = %w.path.display(), error = %e, failed_lines, "audit line lost");
        }
    }
    // Channel closed: the actor is gone, make everything durable.
    if let Err(e) = w.sync() {
        tracing::error!(event = "audit_sync_failed", path = %w.path.display(), error = %e, "final audit fsync failed");
    }
}

// ---------------------------------------------------------------------------
// Actor

/// The subscription, shared so `stopped()` can drain what the stream did
/// not deliver yet.
struct SharedSub(Arc<Mutex<AuditSubscription>>);

impl futures::Stream for SharedSub {
    type Item = Arc<dyn Event>;
    fn poll_next(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Self::Item>> {
        match self.0.lock() {
            Ok(mut s) => Pin::new(&mut *s).poll_next(cx),
            Err(_) => Poll::Ready(None),
        }
    }
}

/// Writes every bus event to the audit log.
pub struct AuditActor {
    sub: Arc<Mutex<AuditSubscription>>,
    tx: Option<mpsc::Sender<String>>,
    writer: Option<std::thread::JoinHandle<()>>,
}

impl AuditActor {
    /// Opens the log (creating its directory) and subscribes; the actor
    /// must then be started. Errors if the file cannot be opened or the
    /// bus is closed.
    pub fn new<S: clawker_actors::BusState>(
        bus: &clawker_actors::EventBus<S>,
        path: &Path,
        max_bytes: u64,
        keep: usize,
    ) -> Result<Self, AuditError> {
        let writer =
            AuditWriter::open(path, max_bytes, keep).map_err(|source| AuditError::Open {
                path: path.to_owned(),
                source,
            })?;
        let sub = bus.subscribe_all()?;
        let (tx, rx) = mpsc::channel();
        let handle = std::thread::Builder::new()
            .name("clawker-audit".into())
            .spawn(move || writer_loop(writer, rx))
            .map_err(AuditError::SpawnWriter)?;
        Ok(Self {
            sub: Arc::new(Mutex::new(sub)),
            tx: Some(tx),
            writer: Some(handle),
        })
    }

    /// Child spec (permanent worker `audit`).
    pub fn spec(bus: crate::events::Bus, path: PathBuf, config: AuditConfig) -> ChildSpec {
        ChildSpec::worker("audit", move |link: ChildLink| {
            let actor = AuditActor::new(&bus, &path, config.max_bytes, config.keep)
                .map_err(|e| e.to_string())?;
            Ok(AuditActor::create(move |ctx| {
                link.attach(ctx);
                actor
            }))
        })
        .restart(Restart::Permanent)
    }

    fn send(&self, e: &dyn Event) {
        let line = match serde_json::to_string(&AuditRecord::of(e)) {
            Ok(l) => l,
            Err(err) => {
                tracing::error!(event = "audit_encode_failed", name = e.name(), error = %err);
                return;
            }
        };
        if let Some(tx) = &self.tx {
            let _ = tx.send(line);
        }
    }
}

impl Actor for AuditActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.add_stream(SharedSub(self.sub.clone()));
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        // Drain what was delivered to our mailbox but not yet handled.
        let pending: Vec<Arc<dyn Event>> = match self.sub.lock() {
            Ok(mut s) => {
                s.unsubscribe();
                std::iter::from_fn(|| s.try_recv()).collect()
            }
            Err(_) => Vec::new(),
        };
        for e in &pending {
            self.send(&**e);
        }
        // Closing the channel ends the writer loop, which fsyncs; joining
        // is bounded by the lines already queued.
        self.tx = None;
        if let Some(h) = self.writer.take() {
            let _ = h.join();
        }
        tracing::debug!(event = "audit_stopped", drained = pending.len());
    }
}

impl StreamHandler<Arc<dyn Event>> for AuditActor {
    fn handle(&mut self, e: Arc<dyn Event>, _: &mut Context<Self>) {
        self.send(&*e);
    }
}

// ---------------------------------------------------------------------------
// Reader

/// The last `n` records of the log, oldest first, reading rotated files
/// (`.1`, `.2`, …) as needed. Lines that do not parse (e.g. a torn final
/// line after a crash) are skipped. A missing log reads as empty.
pub fn read_last(path: &Path, n: usize) -> io::Result<Vec<AuditRecord>> {
    let mut out: Vec<AuditRecord> = Vec::new();
    if n == 0 {
        return Ok(out);
    }
    let mut files = vec![path.to_owned()];
    let mut i = 1;
    loop {
        let p = rotated(path, i);
        if !p.exists() {
            break;
        }
        files.push(p);
        i += 1;
    }
    // Newest file first; within a file take lines from the end.
    for f in files {
        let file = match File::open(&f) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let mut recs: Vec<AuditRecord> = Vec::new();
        for line in BufReader::new(file).lines() {
            let line = line?;
            if let Ok(r) = serde_json::from_str::<AuditRecord>(&line) {
                recs.push(r);
            }
        }
        let need = n - out.len();
        let take = recs.len().min(need);
        let mut chunk: Vec<AuditRecord> = recs.split_off(recs.len() - take);
        chunk.append(&mut out);
        out = chunk;
        if out.len() >= n {
            break;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(i: usize) -> String {
        serde_json::to_string(&AuditRecord {
            name: "test.event".into(),
            at: "2026-01-01T00:00:00Z".into(),
            event: serde_json::json!({ "i": i }),
        })
        .unwrap()
    }

    #[test]
    fn rotation_keeps_n_files_and_read_last_spans_them_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit").join("events.jsonl");
        let one = line(10).len() as u64 + 1;
        // Three lines per file, two rotated files kept.
        let mut w = AuditWriter::open(&path, one * 3, 2).unwrap();
        for i in 0..20 {
            w.write_line(&line(i)).unwrap();
        }
        w.sync().unwrap();
        assert!(rotated(&path, 1).exists());
        assert!(rotated(&path, 2).exists());
        assert!(!rotated(&path, 3).exists(), "only `keep` rotated files");
        for p in [path.clone(), rotated(&path, 1), rotated(&path, 2)] {
            assert!(fs::metadata(&p).unwrap().len() <= one * 3);
        }
        let idx = |recs: &[AuditRecord]| -> Vec<u64> {
            recs.iter()
                .map(|r| r.event["i"].as_u64().unwrap())
                .collect()
        };
        // 20 lines: live has 18,19; .1 has 15..17; .2 has 12..14.
        assert_eq!(idx(&read_last(&path, 4).unwrap()), vec![16, 17, 18, 19]);
        assert_eq!(
            idx(&read_last(&path, 100).unwrap()),
            (12..20).collect::<Vec<_>>()
        );
        assert!(read_last(&path, 0).unwrap().is_empty());
    }

    #[test]
    fn read_last_skips_a_torn_line_and_a_missing_log_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        assert!(read_last(&path, 5).unwrap().is_empty());
        let mut w = AuditWriter::open(&path, 1 << 20, 3).unwrap();
        w.write_line(&line(1)).unwrap();
        w.write_line(&line(2)).unwrap();
        w.sync().unwrap();
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"name\":\"torn").unwrap();
        let recs = read_last(&path, 5).unwrap();
        assert_eq!(recs.len(), 2);
        assert_eq!(recs[1].event["i"], 2);
    }

    #[test]
    fn reopening_appends_instead_of_truncating() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        let mut w = AuditWriter::open(&path, 1 << 20, 3).unwrap();
        w.write_line(&line(1)).unwrap();
        drop(w);
        let mut w = AuditWriter::open(&path, 1 << 20, 3).unwrap();
        w.write_line(&line(2)).unwrap();
        drop(w);
        assert_eq!(read_last(&path, 10).unwrap().len(), 2);
    }
}
