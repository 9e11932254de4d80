//! Running one shell command over a session until it finishes: the one
//! place that speaks the ShellCommand → Started/Stdout/Stderr/StageExit →
//! Done|Error exchange for the CP (init steps, containment, benchmarks).
//!
//! Output is captured bounded: the first [`MAX_CAPTURE`] bytes of each
//! stream are kept and the rest only counted, because every byte a peer
//! sends is untrusted and a captured stream ends up in events and logs.

use std::collections::HashMap;
use std::time::Duration;

use crate::proto::clawkerd::v1::{self as pb, ErrorCode, command, response};

use super::mux::{MuxError, SessionMux, command as cmd};

/// How much of a command's stdout and stderr the CP keeps: the bound on
/// every peer string ([`crate::peer_text`]).
pub const MAX_CAPTURE: usize = crate::peer_text::MAX_PEER_TEXT;

/// Who a command runs as inside the container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAs {
    pub uid: u32,
    pub gid: u32,
    /// Layered over clawkerd's environment (HOME and USER for the agent
    /// user: dropping privileges does not change them).
    pub env: HashMap<String, String>,
}

impl RunAs {
    /// Root, with clawkerd's environment.
    pub fn root() -> Self {
        Self {
            uid: 0,
            gid: 0,
            env: HashMap::new(),
        }
    }
}

/// A one-stage `sh -c script` command.
pub fn shell(script: &str, who: &RunAs, timeout_seconds: u32, stdin: &[u8]) -> pb::ShellCommand {
    pb::ShellCommand {
        stages: vec![pb::PipeStage {
            argv: vec!["sh".into(), "-c".into(), script.into()],
            uid: who.uid,
            gid: who.gid,
            cwd: String::new(),
            env: who.env.clone(),
        }],
        timeout_seconds,
        initial_stdin: bytes::Bytes::copy_from_slice(stdin),
        ..Default::default()
    }
}

/// A bounded capture of one output stream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capture {
    /// The first bytes, at most the capture limit.
    pub head: Vec<u8>,
    /// Every byte seen, kept or not.
    pub total: u64,
    limit: usize,
}

impl Capture {
    pub fn with_limit(limit: usize) -> Self {
        Self {
            limit,
            ..Self::default()
        }
    }

    /// Keeps what fits under the limit, counts everything.
    pub fn push(&mut self, data: &[u8]) {
        let room = self.limit.saturating_sub(self.head.len());
        self.head.extend_from_slice(&data[..room.min(data.len())]);
        self.total += data.len() as u64;
    }

    /// Bytes seen but not kept.
    pub fn truncated(&self) -> u64 {
        self.total - self.head.len() as u64
    }

    /// The kept bytes as trimmed text, bounded like every peer string
    /// (lossy decoding can grow invalid bytes threefold).
    pub fn text(&self) -> String {
        crate::peer_text::bound(String::from_utf8_lossy(&self.head).trim())
    }
}

/// A command that ran to its `Done`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finished {
    pub exit_code: i32,
    pub stdout: Capture,
    pub stderr: Capture,
}

/// A command that did not reach `Done`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RunError {
    /// The session was closed before the command was sent.
    #[error("send: session closed")]
    Closed,
    /// The id is already in flight on this session.
    #[error("{0}")]
    Route(MuxError),
    #[error("send {what}: {error}")]
    Send { what: &'static str, error: MuxError },
    /// The stream ended before the terminal response.
    #[error("stream EOF before terminal response")]
    StreamEnded,
    /// clawkerd answered with an error (timeout, spawn failure, …).
    #[error("{}: {message}", code.as_str_name())]
    Remote { code: ErrorCode, message: String },
    /// No terminal response within the CP-side bound.
    #[error("no terminal response from clawkerd within {}s (CP-side bound)", .0.as_secs())]
    Timeout(Duration),
}

/// Runs `shell` under command id `id`: sends it and `CloseStdin` (without
/// it a stage that never reads stdin would sit until its timeout; clawkerd
/// delivers `initial_stdin` first), then collects output until `Done` or
/// `Error`, giving up after `bound`.
pub async fn run_to_completion(
    mux: &SessionMux,
    id: &str,
    shell: pb::ShellCommand,
    bound: Duration,
    capture: usize,
) -> Result<Finished, RunError> {
    let mut replies = mux.route(id).map_err(|e| match e {
        MuxError::Closed => RunError::Closed,
        other => RunError::Route(other),
    })?;
    mux.send(cmd(id, command::Payload::Shell(shell)))
        .await
        .map_err(|error| RunError::Send {
            what: "command",
            error,
        })?;
    mux.send(cmd(id, command::Payload::CloseStdin(pb::CloseStdin {})))
        .await
        .map_err(|error| RunError::Send {
            what: "close_stdin",
            error,
        })?;
    let mut stdout = Capture::with_limit(capture);
    let mut stderr = Capture::with_limit(capture);
    let deadline = tokio::time::Instant::now() + bound;
    loop {
        let resp = match tokio::time::timeout_at(deadline, replies.next()).await {
            Err(_) => return Err(RunError::Timeout(bound)),
            Ok(None) => return Err(RunError::StreamEnded),
            Ok(Some(r)) => r,
        };
        match resp.payload {
            Some(response::Payload::Stdout(c)) => stdout.push(&c.data),
            Some(response::Payload::Stderr(c)) => stderr.push(&c.data),
            Some(response::Payload::Done(d)) => {
                return Ok(Finished {
                    exit_code: d.final_exit_code,
                    stdout,
                    stderr,
                });
            }
            Some(response::Payload::Error(e)) => {
                return Err(RunError::Remote {
                    code: e.code(),
                    message: crate::peer_text::bound(e.message),
                });
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::mux::testing::*;
    use super::*;

    #[tokio::test]
    async fn collects_bounded_output_until_done() {
        let (mux, mut peer) = pair();
        let task = tokio::spawn(async move {
            let first = peer.commands.recv().await.unwrap();
            assert!(matches!(first.payload, Some(command::Payload::Shell(_))));
            let second = peer.commands.recv().await.unwrap();
            assert!(matches!(
                second.payload,
                Some(command::Payload::CloseStdin(_))
            ));
            let id = first.command_id;
            for p in [
                response::Payload::Started(pb::Started {}),
                response::Payload::Stdout(pb::StdoutChunk {
                    data: vec![b'x'; 10].into(),
                }),
                response::Payload::Stderr(pb::StderrChunk {
                    stage_index: 0,
                    data: b"oops".to_vec().into(),
                }),
                response::Payload::Done(pb::Done { final_exit_code: 3 }),
            ] {
                peer.responses.send(resp(&id, p)).unwrap();
            }
            peer
        });
        let sh = shell("true", &RunAs::root(), 5, b"");
        let got = run_to_completion(&mux, "c1", sh, Duration::from_secs(5), 4)
            .await
            .unwrap();
        assert_eq!(got.exit_code, 3);
        assert_eq!((got.stdout.head.len(), got.stdout.total), (4, 10));
        assert_eq!(got.stdout.truncated(), 6);
        assert_eq!(got.stderr.text(), "oops");
        drop(task);
    }

    #[tokio::test]
    async fn error_timeout_and_eof_are_distinct() {
        let (mux, mut peer) = pair();
        let sh = || shell("true", &RunAs::root(), 5, b"");
        let run = run_to_completion(&mux, "t", sh(), Duration::from_millis(30), 16);
        assert_eq!(run.await, Err(RunError::Timeout(Duration::from_millis(30))));
        let _ = peer.commands.recv().await;
        let _ = peer.commands.recv().await;
        let answer = tokio::spawn(async move {
            let c = peer.commands.recv().await.unwrap();
            peer.responses
                .send(resp(
                    &c.command_id,
                    response::Payload::Error(pb::Error {
                        code: ErrorCode::SpawnFailed as i32,
                        message: "no sh".into(),
                        os_errno: 2,
                    }),
                ))
                .unwrap();
            peer
        });
        let got = run_to_completion(&mux, "e", sh(), Duration::from_secs(5), 16).await;
        assert_eq!(
            got.unwrap_err().to_string(),
            "ERROR_CODE_SPAWN_FAILED: no sh"
        );
        drop(answer.await.unwrap());
        mux.closed().await;
        assert_eq!(
            run_to_completion(&mux, "z", sh(), Duration::from_secs(5), 16).await,
            Err(RunError::Closed)
        );
    }
}
