//! The one place that reaps children: a SIGCHLD-driven `waitpid(-1)` loop
//! that dispatches each exit status to whoever registered that pid.
//!
//! Why one reaper for everything: as PID 1, clawkerd inherits every orphan
//! in the container and must reap them, which needs `waitpid(-1)`. But
//! `waitpid(-1)` also collects the statuses of children someone else is
//! waiting for (shell stages, the user command) — the classic PID-1 race
//! that made the reference use two reaper phases. We sidestep it: nobody
//! else ever waits. Children are spawned with `std::process` *through*
//! [`Reaper::spawn`], which registers the pid in a table under the same lock
//! that guards `waitpid`, so a child that exits instantly cannot be reaped
//! before it is registered. `tokio::process` is never used (its own
//! SIGCHLD reaper would race ours).
//!
//! The same lock makes group signals safe: [`Reaper::signal_group`] only
//! signals a pid that is still in the table, i.e. not yet reaped, so its
//! process-group id cannot have been recycled for an unrelated process.
//!
//! Outside PID 1 (tests, development) clawkerd makes itself a child
//! subreaper, so orphans behave exactly as in a container.

use std::collections::HashMap;
use std::io;
use std::process::Command;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::oneshot;

/// A child's wait status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitStatus(pub i32);

impl ExitStatus {
    /// Exit status if the child exited normally.
    pub fn code(self) -> Option<i32> {
        libc::WIFEXITED(self.0).then(|| libc::WEXITSTATUS(self.0))
    }

    /// Signal number if the child was killed by a signal.
    pub fn signal(self) -> Option<i32> {
        libc::WIFSIGNALED(self.0).then(|| libc::WTERMSIG(self.0))
    }

    /// Shell convention: the exit status, or 128+signal, else 1.
    pub fn shell_code(self) -> i32 {
        match (self.code(), self.signal()) {
            (Some(c), _) => c,
            (None, Some(s)) => 128 + s,
            _ => 1,
        }
    }
}

type Table = HashMap<i32, oneshot::Sender<ExitStatus>>;

/// Handle to the process-wide reaper. Cheap to clone.
#[derive(Clone)]
pub struct Reaper {
    table: Arc<Mutex<Table>>,
}

/// Result of [`Reaper::signal_group`].
#[derive(Debug, PartialEq, Eq)]
pub enum Signalled {
    Sent,
    /// The leader was already reaped; nothing was signalled.
    AlreadyExited,
    /// `kill` failed (e.g. an invalid signal number).
    Failed(i32),
}

impl Reaper {
    /// Starts the reaper task on the current tokio runtime.
    pub fn start() -> io::Result<Self> {
        // SAFETY: prctl with PR_SET_CHILD_SUBREAPER takes an integer flag
        // and touches no memory of ours.
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        let mut sigchld = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child())?;
        let reaper = Self {
            table: Arc::new(Mutex::new(HashMap::new())),
        };
        let r = reaper.clone();
        tokio::spawn(async move {
            // A tick as belt and braces: SIGCHLDs coalesce, and the loop
            // below reaps everything that is ready each time it runs.
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tokio::select! {
                    _ = sigchld.recv() => {}
                    _ = tick.tick() => {}
                }
                r.reap_ready();
            }
        });
        Ok(reaper)
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        // A poisoned table is still a valid table (every operation on it is
        // a single insert/remove), so recover rather than crash PID 1.
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Spawns `cmd` and registers its pid before any reap can see it.
    pub fn spawn(&self, cmd: &mut Command) -> io::Result<(i32, oneshot::Receiver<ExitStatus>)> {
        let mut table = self.lock();
        let child = cmd.spawn()?;
        let pid = child.id() as i32;
        // Dropping a std Child neither waits nor kills; we own the waiting.
        drop(child);
        let (tx, rx) = oneshot::channel();
        table.insert(pid, tx);
        Ok((pid, rx))
    }

    /// Reaps every child that has exited. Returns `false` once the process
    /// has no children left at all (ECHILD).
    pub fn reap_ready(&self) -> bool {
        let mut table = self.lock();
        loop {
            let mut status = 0;
            // SAFETY: waitpid writes only to `status`, a live local.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid > 0 {
                match table.remove(&pid) {
                    Some(tx) => {
                        let _ = tx.send(ExitStatus(status));
                    }
                    None => tracing::debug!(
                        event = "spawn_orphan_reaped",
                        pid,
                        exit_status = ExitStatus(status).shell_code()
                    ),
                }
                continue;
            }
            if pid == 0 {
                return true;
            }
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::ECHILD) => return false,
                _ => {
                    tracing::error!(event = "spawn_wait4_orphan_failed", error = %err);
                    return true;
                }
            }
        }
    }

    /// Sends `sig` to the process group led by `pid`, if `pid` has not been
    /// reaped yet (see module doc for why that check matters).
    pub fn signal_group(&self, pid: i32, sig: i32) -> Signalled {
        let table = self.lock();
        if !table.contains_key(&pid) {
            return Signalled::AlreadyExited;
        }
        // SAFETY: kill takes plain integers.
        let rc = unsafe { libc::kill(-pid, sig) };
        drop(table);
        if rc == 0 {
            return Signalled::Sent;
        }
        match io::Error::last_os_error().raw_os_error() {
            Some(libc::ESRCH) => Signalled::AlreadyExited,
            other => Signalled::Failed(other.unwrap_or(0)),
        }
    }

    /// Waits until no child is left or `grace` elapses (orphan drain before
    /// exit). Returns whether every child was reaped.
    pub async fn drain(&self, grace: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + grace;
        loop {
            if !self.reap_ready() {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_status_mapping() {
        // Raw wait statuses: exit(7) = 7<<8; killed by SIGTERM = 15.
        assert_eq!(ExitStatus(7 << 8).shell_code(), 7);
        assert_eq!(ExitStatus(7 << 8).code(), Some(7));
        assert_eq!(ExitStatus(15).signal(), Some(15));
        assert_eq!(ExitStatus(15).shell_code(), 143);
        assert_eq!(ExitStatus(9).shell_code(), 137);
    }
}
