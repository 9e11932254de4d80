//! A streaming command over a session: the CP side of operator `exec`,
//! `cp` and `logs`, where output and input flow for as long as the command
//! runs (init steps and containment use [`super::command`] instead).
//!
//! **Flow control.** The mux routes each command's responses through an
//! unbounded per-command channel, and one Session stream carries every
//! command, so HTTP/2 cannot slow one command without stalling all of
//! them. A streaming command therefore opts into clawkerd's per-command
//! credit ([`OUTPUT_WINDOW`] bytes, `FlowGrant` before the command): at
//! most the window of output is ever in flight or queued on the CP, and
//! the caller re-grants only what it has passed on ([`Streamed::ack`]) —
//! so a slow reader at the end (the CLI over the admin API) slows the
//! child in the container, and nothing else. Stdin the other way: at most
//! [`STDIN_WINDOW`] bytes unacknowledged by clawkerd's `StdinConsumed`
//! ([`Streamed::stdin_room`]), well under clawkerd's own stdin buffer.
//!
//! A clawkerd that predates flow control answers the grant with
//! `Error{INVALID_REQUEST, "unknown payload type …"}` before `Started`;
//! the command then runs unwindowed (output bounded only by how fast the
//! caller reads — the old behaviour).

use std::time::Duration;

use bytes::Bytes;

use crate::proto::clawkerd::v1::{self as pb, ErrorCode, command, response};

use super::mux::{CommandReplies, MuxError, SessionMux, command as cmd};

/// Output credit per command: enough to keep a local 1 GB/s stream busy
/// across one scheduling round trip, small enough to bound CP memory.
pub const OUTPUT_WINDOW: u64 = 4 << 20;
/// Credit is topped up in steps of this much (fewer grant frames).
const GRANT_STEP: u64 = OUTPUT_WINDOW / 4;
/// Stdin bytes the CP lets sit unacknowledged in clawkerd.
pub const STDIN_WINDOW: u64 = 4 << 20;

/// Why a streaming command did not start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StartError {
    #[error("the session to the agent is closed")]
    Closed,
    #[error("{0}")]
    Route(MuxError),
    /// clawkerd refused or could not start it.
    #[error("{message}")]
    Remote {
        code: ErrorCode,
        message: String,
        os_errno: i32,
    },
    #[error("clawkerd did not answer within {0:?}")]
    Timeout(Duration),
}

/// How a streaming command ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// It ran to its own end: the exit status (`Done`), and the signal
    /// that killed its last stage, if one did.
    Exited { code: i32, signal: i32 },
    /// clawkerd answered with an error (timeout, I/O error, a refused tar
    /// entry, …).
    Failed { code: ErrorCode, message: String },
    /// The session ended first.
    SessionLost,
}

impl Ending {
    /// Shell convention: the code, 128+signal when killed by one.
    pub fn shell_code(&self) -> Option<i32> {
        match self {
            Ending::Exited { signal, .. } if *signal > 0 => Some(128 + signal),
            Ending::Exited { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// One step of a streaming command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    Stdout(Bytes),
    Stderr(Bytes),
    /// clawkerd consumed stdin: [`Streamed::stdin_room`] grew.
    StdinAcked,
    /// The terminal response (nothing follows).
    End(Ending),
}

/// A started streaming command (see the module doc).
#[derive(Debug)]
pub struct Streamed {
    id: String,
    mux: SessionMux,
    replies: CommandReplies,
    flow: bool,
    to_grant: u64,
    stdin_unacked: u64,
    last_signal: i32,
    ended: bool,
}

impl Streamed {
    /// Sends the grant and `payload` under `id`, and waits (up to
    /// `bound`) for `Started`.
    pub async fn start(
        mux: &SessionMux,
        id: &str,
        payload: command::Payload,
        bound: Duration,
    ) -> Result<Self, StartError> {
        let replies = mux.route(id).map_err(|e| match e {
            MuxError::Closed => StartError::Closed,
            other => StartError::Route(other),
        })?;
        let send = |c| async move { mux.send(c).await.map_err(|_| StartError::Closed) };
        send(cmd(
            id,
            command::Payload::FlowGrant(pb::FlowGrant {
                output_bytes: OUTPUT_WINDOW,
            }),
        ))
        .await?;
        send(cmd(id, payload)).await?;
        let mut s = Self {
            id: id.to_owned(),
            mux: mux.clone(),
            replies,
            flow: false,
            to_grant: 0,
            stdin_unacked: 0,
            last_signal: 0,
            ended: false,
        };
        let deadline = tokio::time::Instant::now() + bound;
        loop {
            let resp = match tokio::time::timeout_at(deadline, s.replies.next()).await {
                Err(_) => return Err(StartError::Timeout(bound)),
                Ok(None) => return Err(StartError::Closed),
                Ok(Some(r)) => r,
            };
            match resp.payload {
                Some(response::Payload::StdinConsumed(_)) => s.flow = true,
                Some(response::Payload::Started(_)) => return Ok(s),
                Some(response::Payload::Error(e))
                    if !s.flow
                        && e.code() == ErrorCode::InvalidRequest
                        && e.message.starts_with("unknown payload type") =>
                {
                    // A clawkerd without flow control refused the grant;
                    // the command itself follows.
                    tracing::debug!(command_id = %id, "peer has no flow control; unwindowed");
                }
                Some(response::Payload::Error(e)) => {
                    return Err(StartError::Remote {
                        code: e.code(),
                        message: e.message,
                        os_errno: e.os_errno,
                    });
                }
                _ => {}
            }
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Whether clawkerd accepted flow control for this command.
    pub fn flow_controlled(&self) -> bool {
        self.flow
    }

    /// The next output, stdin acknowledgement or the end. Cancel-safe.
    pub async fn next(&mut self) -> Output {
        if self.ended {
            return Output::End(Ending::SessionLost);
        }
        loop {
            let Some(resp) = self.replies.next().await else {
                self.ended = true;
                return Output::End(Ending::SessionLost);
            };
            match resp.payload {
                Some(response::Payload::Stdout(c)) => return Output::Stdout(c.data),
                Some(response::Payload::Stderr(c)) => return Output::Stderr(c.data),
                Some(response::Payload::StdinConsumed(c)) => {
                    self.stdin_unacked = self.stdin_unacked.saturating_sub(c.bytes);
                    return Output::StdinAcked;
                }
                Some(response::Payload::StageExit(e)) => self.last_signal = e.signo,
                Some(response::Payload::Done(d)) => {
                    self.ended = true;
                    return Output::End(Ending::Exited {
                        code: d.final_exit_code,
                        signal: self.last_signal,
                    });
                }
                Some(response::Payload::Error(e)) => {
                    self.ended = true;
                    return Output::End(Ending::Failed {
                        code: e.code(),
                        message: e.message,
                    });
                }
                _ => {}
            }
        }
    }

    /// The caller passed `n` output bytes on: clawkerd may send them again.
    pub async fn ack(&mut self, n: usize) -> Result<(), MuxError> {
        if !self.flow || self.ended {
            return Ok(());
        }
        self.to_grant += n as u64;
        if self.to_grant >= GRANT_STEP {
            let bytes = std::mem::take(&mut self.to_grant);
            self.frame(command::Payload::FlowGrant(pb::FlowGrant {
                output_bytes: bytes,
            }))
            .await?;
        }
        Ok(())
    }

    /// Stdin bytes that may be sent now without overrunning clawkerd.
    pub fn stdin_room(&self) -> u64 {
        if self.flow {
            STDIN_WINDOW.saturating_sub(self.stdin_unacked)
        } else {
            u64::MAX
        }
    }

    pub async fn stdin(&mut self, data: Bytes) -> Result<(), MuxError> {
        if self.flow {
            self.stdin_unacked += data.len() as u64;
        }
        self.frame(command::Payload::Stdin(pb::Stdin { data }))
            .await
    }

    pub async fn close_stdin(&self) -> Result<(), MuxError> {
        self.frame(command::Payload::CloseStdin(pb::CloseStdin {}))
            .await
    }

    pub async fn signal(&self, signo: i32) -> Result<(), MuxError> {
        self.frame(command::Payload::Signal(pb::Signal { signo }))
            .await
    }

    pub async fn resize(&self, rows: u32, cols: u32) -> Result<(), MuxError> {
        self.frame(command::Payload::Resize(pb::Resize { rows, cols }))
            .await
    }

    async fn frame(&self, payload: command::Payload) -> Result<(), MuxError> {
        self.mux.send(cmd(&self.id, payload)).await
    }
}

#[cfg(test)]
mod tests {
    use super::super::mux::testing::*;
    use super::*;

    fn shell() -> command::Payload {
        command::Payload::Shell(pb::ShellCommand::default())
    }

    #[tokio::test]
    async fn grants_before_the_command_and_tops_up_as_output_is_passed_on() {
        let (mux, mut peer) = pair();
        let peer_task = tokio::spawn(async move {
            let grant = peer.commands.recv().await.unwrap();
            assert!(matches!(
                grant.payload,
                Some(command::Payload::FlowGrant(pb::FlowGrant { output_bytes })) if output_bytes == OUTPUT_WINDOW
            ));
            let sh = peer.commands.recv().await.unwrap();
            assert!(matches!(sh.payload, Some(command::Payload::Shell(_))));
            let id = sh.command_id;
            for p in [
                response::Payload::StdinConsumed(pb::StdinConsumed { bytes: 0 }),
                response::Payload::Started(pb::Started {}),
                response::Payload::Stdout(pb::StdoutChunk {
                    data: vec![1u8; GRANT_STEP as usize].into(),
                }),
            ] {
                peer.responses.send(resp(&id, p)).unwrap();
            }
            // The top-up arrives once the caller passed the bytes on.
            let topup = peer.commands.recv().await.unwrap();
            assert!(matches!(
                topup.payload,
                Some(command::Payload::FlowGrant(pb::FlowGrant { output_bytes })) if output_bytes == GRANT_STEP
            ));
            for p in [
                response::Payload::StageExit(pb::StageExit {
                    stage_index: 0,
                    exit_code: -1,
                    signo: 15,
                }),
                response::Payload::Done(pb::Done {
                    final_exit_code: -1,
                }),
            ] {
                peer.responses.send(resp(&id, p)).unwrap();
            }
            peer
        });
        let mut s = Streamed::start(&mux, "x1", shell(), Duration::from_secs(5))
            .await
            .unwrap();
        assert!(s.flow_controlled());
        assert_eq!(s.stdin_room(), STDIN_WINDOW);
        let Output::Stdout(d) = s.next().await else {
            panic!("stdout expected")
        };
        s.ack(d.len()).await.unwrap();
        let end = s.next().await;
        assert_eq!(
            end,
            Output::End(Ending::Exited {
                code: -1,
                signal: 15
            })
        );
        if let Output::End(e) = end {
            assert_eq!(e.shell_code(), Some(143));
        }
        drop(peer_task.await.unwrap());
    }

    #[tokio::test]
    async fn a_peer_without_flow_control_runs_unwindowed_and_errors_stay_errors() {
        let (mux, mut peer) = pair();
        let peer_task = tokio::spawn(async move {
            let grant = peer.commands.recv().await.unwrap();
            let id = grant.command_id;
            let _ = peer.commands.recv().await.unwrap();
            for p in [
                response::Payload::Error(pb::Error {
                    code: ErrorCode::InvalidRequest as i32,
                    message: "unknown payload type <nil>".into(),
                    os_errno: 0,
                }),
                response::Payload::Started(pb::Started {}),
            ] {
                peer.responses.send(resp(&id, p)).unwrap();
            }
            let g2 = peer.commands.recv().await.unwrap();
            let _ = peer.commands.recv().await.unwrap();
            peer.responses
                .send(resp(
                    &g2.command_id,
                    response::Payload::Error(pb::Error {
                        code: ErrorCode::SpawnFailed as i32,
                        message: "exec: \"nope\": executable file not found in $PATH".into(),
                        os_errno: libc::ENOENT,
                    }),
                ))
                .unwrap();
            peer
        });
        let s = Streamed::start(&mux, "old", shell(), Duration::from_secs(5))
            .await
            .unwrap();
        assert!(!s.flow_controlled());
        assert_eq!(s.stdin_room(), u64::MAX);
        let e = Streamed::start(&mux, "bad", shell(), Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(
            e,
            StartError::Remote { code: ErrorCode::SpawnFailed, os_errno, .. } if os_errno == libc::ENOENT
        ));
        drop(peer_task.await.unwrap());
    }
}
