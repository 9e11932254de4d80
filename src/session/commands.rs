//! Commands other actors run over an agent's open session (containment's
//! root commands), behind a narrow seam so they can be tested without a
//! session.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::future::BoxFuture;

use super::actor::Sessions;
use super::command::{self, MAX_CAPTURE, RunAs, RunError};

/// What a command run over a session ended with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandOutput {
    pub exit_code: i32,
    pub stderr: String,
}

/// Errors of the session seam.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionCommandError {
    #[error("no open session to the container")]
    NoSession,
    #[error("session transport: {0}")]
    Transport(String),
    #[error("clawkerd refused or failed the command: {0}")]
    Remote(String),
    #[error("no terminal response within {0:?}")]
    Timeout(Duration),
}

impl From<RunError> for SessionCommandError {
    fn from(e: RunError) -> Self {
        match e {
            RunError::Timeout(d) => SessionCommandError::Timeout(d),
            RunError::Remote { .. } => SessionCommandError::Remote(e.to_string()),
            RunError::StreamEnded => {
                SessionCommandError::Transport("stream ended before the terminal response".into())
            }
            other => SessionCommandError::Transport(other.to_string()),
        }
    }
}

/// Run a shell script inside a container over its open session.
pub trait SessionCommands: Send + Sync + 'static {
    fn run<'a>(
        &'a self,
        container_id: &'a str,
        script: &'a str,
        who: RunAs,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<CommandOutput, SessionCommandError>>;
}

/// No session access (containment without `lock`, or tests).
#[derive(Clone, Copy, Default)]
pub struct NoSessions;

impl SessionCommands for NoSessions {
    fn run<'a>(
        &'a self,
        _: &'a str,
        _: &'a str,
        _: RunAs,
        _: Duration,
    ) -> BoxFuture<'a, Result<CommandOutput, SessionCommandError>> {
        Box::pin(async { Err(SessionCommandError::NoSession) })
    }
}

/// [`SessionCommands`] over the live sessions.
#[derive(Clone)]
pub struct LiveCommands {
    sessions: Sessions,
    seq: Arc<AtomicU64>,
}

impl LiveCommands {
    pub fn new(sessions: Sessions) -> Self {
        Self {
            sessions,
            seq: Arc::default(),
        }
    }
}

impl SessionCommands for LiveCommands {
    fn run<'a>(
        &'a self,
        container_id: &'a str,
        script: &'a str,
        who: RunAs,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<CommandOutput, SessionCommandError>> {
        Box::pin(async move {
            let live = self
                .sessions
                .live(container_id)
                .await
                .ok_or(SessionCommandError::NoSession)?;
            let n = self.seq.fetch_add(1, Ordering::Relaxed);
            let prefix = container_id.get(..12).unwrap_or(container_id);
            let id = format!("contain-{prefix}-{n}");
            let secs = u32::try_from(timeout.as_secs().max(1)).unwrap_or(u32::MAX);
            let shell = command::shell(script, &who, secs, b"");
            let bound = timeout + Duration::from_secs(5);
            let done =
                command::run_to_completion(&live.mux, &id, shell, bound, MAX_CAPTURE).await?;
            Ok(CommandOutput {
                exit_code: done.exit_code,
                stderr: done.stderr.text(),
            })
        })
    }
}
