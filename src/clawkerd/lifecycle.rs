//! The container's lifecycle as PID 1 keeps it: the one-time init marker
//! and the request to end the container after a failed init or boot step
//! (reference `head-lifecycle.md` §1.2, §3.1).
//!
//! - [`InitMarker`]: `<state dir>/agent-initialized`, written when the CP
//!   sends `AgentInitialized` (the init plan ran to its end), read afresh on
//!   every `Hello` (`HelloAck.initialized`). It lives in the container's
//!   writable layer: it survives `docker stop`/`start` and goes with
//!   `docker rm`, which is exactly "once per container".
//! - [`ExitRequest`]: a `ShellCommand` with `exit_on_non_zero` that ends
//!   non-zero asks the main loop to exit with that code (mirrored into
//!   0–255), after its `Done` is on the wire. The first request wins.

use std::path::{Path, PathBuf};

use tokio::sync::watch;

use super::config::INIT_MARKER;

/// The init marker file.
#[derive(Debug, Clone)]
pub struct InitMarker {
    path: PathBuf,
}

impl InitMarker {
    /// The marker inside `state_dir`.
    pub fn in_dir(state_dir: &Path) -> Self {
        Self {
            path: state_dir.join(INIT_MARKER),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether init completed in this container. Any error reading it
    /// (not only "not found") reads as "no": the worst case is that the
    /// idempotent init plan runs again.
    pub async fn exists(&self) -> bool {
        tokio::fs::metadata(&self.path).await.is_ok()
    }

    /// Writes the marker (empty, 0600; its directory 0700 if missing).
    pub async fn write(&self) -> std::io::Result<()> {
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || write_marker(&path))
            .await
            .map_err(std::io::Error::other)?
    }
}

fn write_marker(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    let f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    // Durable before Done{0}: a crash right after the CP saw the answer
    // must not make init run a second time.
    f.sync_all()
}

/// The exit code PID 1 mirrors from a failed step: 0–255 as is; anything
/// else (−1 for a stage killed by a signal) becomes 1.
pub fn mirror_exit_code(code: i32) -> i32 {
    if (0..=255).contains(&code) { code } else { 1 }
}

/// A one-shot request for the main loop to exit with a code.
#[derive(Debug, Clone)]
pub struct ExitRequest {
    tx: watch::Sender<Option<i32>>,
}

impl Default for ExitRequest {
    fn default() -> Self {
        Self::new()
    }
}

impl ExitRequest {
    pub fn new() -> Self {
        let (tx, _) = watch::channel(None);
        Self { tx }
    }

    /// Asks for exit with `code`; `false` if an earlier request won.
    pub fn request(&self, code: i32) -> bool {
        self.tx.send_if_modified(|slot| {
            if slot.is_none() {
                *slot = Some(code);
                true
            } else {
                false
            }
        })
    }

    pub fn subscribe(&self) -> watch::Receiver<Option<i32>> {
        self.tx.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_are_mirrored_into_a_byte() {
        assert_eq!(mirror_exit_code(0), 0);
        assert_eq!(mirror_exit_code(7), 7);
        assert_eq!(mirror_exit_code(255), 255);
        assert_eq!(mirror_exit_code(256), 1);
        assert_eq!(mirror_exit_code(-1), 1);
    }

    #[tokio::test]
    async fn the_first_exit_request_wins() {
        let r = ExitRequest::new();
        let mut rx = r.subscribe();
        assert!(r.request(3));
        assert!(!r.request(4));
        rx.changed().await.unwrap();
        assert_eq!(*rx.borrow(), Some(3));
    }

    #[tokio::test]
    async fn the_marker_is_written_private_and_read_back() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let m = InitMarker::in_dir(&dir.path().join("state"));
        assert!(!m.exists().await);
        m.write().await.unwrap();
        assert!(m.exists().await);
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(m.path()), 0o600);
        assert_eq!(mode(m.path().parent().unwrap()), 0o700);
        m.write().await.unwrap(); // idempotent
        // A state dir that cannot be created is an error, not a panic.
        let blocked = dir.path().join("file");
        std::fs::write(&blocked, "x").unwrap();
        assert!(InitMarker::in_dir(&blocked).write().await.is_err());
    }
}
