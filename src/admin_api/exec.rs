//! `Exec`: a command in an agent, relayed between the operator's CLI
//! (bidirectional admin stream) and clawkerd (a streaming command on the
//! agent's session, [`crate::session::stream`]).
//!
//! Backpressure end to end: output goes into a small bounded channel that
//! tonic drains as HTTP/2 lets it reach the CLI; only what entered that
//! channel is re-granted to clawkerd, so a CLI that stops reading stops
//! the command in the container after [`OUTPUT_WINDOW`] bytes, never the
//! CP. Stdin is only read from the CLI while clawkerd's stdin window has
//! room.
//!
//! A CLI that goes away mid-command (killed, network gone) is a hangup:
//! SIGHUP to the command, SIGKILL if it is still there after
//! [`HANGUP_GRACE`]; its output is drained and dropped meanwhile.
//!
//! [`OUTPUT_WINDOW`]: crate::session::stream::OUTPUT_WINDOW

use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::access::{self, Ask, Use};
use super::service::AdminApi;
use crate::events::ExecKind;
use crate::proto::admin::v1::{self as pb, exec_request, exec_response};
use crate::proto::clawkerd::v1 as wire;
use crate::proto::clawkerd::v1::ErrorCode;
use crate::session::stream::{Ending, Output, StartError, Streamed};

/// The CLI must send `ExecStart` within this.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// clawkerd must answer a start within this.
const SPAWN_BOUND: Duration = Duration::from_secs(15);
/// SIGHUP → SIGKILL after the CLI went away.
pub const HANGUP_GRACE: Duration = Duration::from_secs(2);
/// Frames queued towards the CLI (each up to 128 KiB).
const TO_CLIENT: usize = 16;
/// Exit code when the command's own status is unknown (session lost,
/// clawkerd error) — ssh's convention for "the connection failed".
pub const EXIT_UNKNOWN: i32 = 255;

pub type ExecStream = ReceiverStream<Result<pb::ExecResponse, Status>>;

fn frame(f: exec_response::Frame) -> Result<pb::ExecResponse, Status> {
    Ok(pb::ExecResponse { frame: Some(f) })
}

/// Shell convention for a command that could not be started.
pub fn spawn_exit_code(os_errno: i32) -> i32 {
    if os_errno == libc::ENOENT { 127 } else { 126 }
}

pub(super) async fn exec(
    api: &AdminApi,
    req: Request<Streaming<pb::ExecRequest>>,
) -> Result<Response<ExecStream>, Status> {
    let operator = access::operator_of(&req);
    let mut inbound = req.into_inner();
    let start = match tokio::time::timeout(START_TIMEOUT, inbound.message()).await {
        Ok(Ok(Some(pb::ExecRequest {
            frame: Some(exec_request::Frame::Start(s)),
        }))) => s,
        Ok(Err(status)) => return Err(status),
        Err(_) => return Err(Status::deadline_exceeded("no ExecStart within 10s")),
        _ => {
            return Err(Status::invalid_argument(
                "the first Exec frame must be ExecStart",
            ));
        }
    };
    if start.argv.is_empty() || start.argv[0].is_empty() {
        return Err(Status::invalid_argument("exec: no command given"));
    }
    let target = start.target.clone().unwrap_or_default();
    let argv = access::truncate_argv(&start.argv);
    let exec_id = api.next_exec_id("exec", &target.agent);
    let opened = access::open(
        api.bus(),
        api.sessions(),
        Ask {
            kind: ExecKind::Exec,
            target: &target,
            force: start.force,
            operator: &operator,
            argv: &argv,
            exec_id: &exec_id,
        },
    )
    .await?;
    let mux = opened.live.mux.clone();
    let user = access::resolve_user(&start.user, &mux, &format!("{exec_id}-user")).await?;
    let env = user.env(&start.env);
    let payload = if start.tty {
        let size = start.size.unwrap_or_default();
        wire::command::Payload::Pty(wire::PtyCommand {
            argv: start.argv.clone(),
            uid: user.uid,
            gid: user.gid,
            cwd: start.workdir.clone(),
            env,
            rows: size.rows,
            cols: size.cols,
            term: start.term.clone(),
            timeout_seconds: 0,
        })
    } else {
        wire::command::Payload::Shell(wire::ShellCommand {
            stages: vec![wire::PipeStage {
                argv: start.argv.clone(),
                uid: user.uid,
                gid: user.gid,
                cwd: start.workdir.clone(),
                env,
            }],
            ..Default::default()
        })
    };
    let audit = Use {
        bus: api.bus().clone(),
        agent: opened.agent.clone(),
        exec_id: exec_id.clone(),
        kind: ExecKind::Exec,
        operator,
        argv,
        user: if user.name.is_empty() {
            format!("{}:{}", user.uid, user.gid)
        } else {
            user.name.clone()
        },
        tty: start.tty,
        started: Instant::now(),
        bytes_in: 0,
        bytes_out: 0,
    };
    audit.publish_started(opened.forced);
    let (tx, rx) = mpsc::channel(TO_CLIENT);
    let cmd = match Streamed::start(&mux, &exec_id, payload, SPAWN_BOUND).await {
        Ok(cmd) => cmd,
        Err(StartError::Remote {
            code: ErrorCode::SpawnFailed,
            message,
            os_errno,
        }) => {
            // docker exec's convention: 127 not found, 126 not runnable.
            let code = spawn_exit_code(os_errno);
            audit.publish_finished(Some(code), message.clone());
            let _ = tx
                .send(frame(exec_response::Frame::Exit(pb::ExecExit {
                    code,
                    error: message,
                })))
                .await;
            return Ok(Response::new(ReceiverStream::new(rx)));
        }
        Err(e) => {
            audit.publish_finished(None, e.to_string());
            return Err(match e {
                StartError::Remote { message, .. } => Status::invalid_argument(message),
                other => Status::unavailable(other.to_string()),
            });
        }
    };
    let _ = tx
        .send(frame(exec_response::Frame::Started(pb::ExecStarted {
            container_id: opened.agent.container_id.clone(),
            exec_id: exec_id.clone(),
            uid: user.uid,
            gid: user.gid,
        })))
        .await;
    tokio::spawn(relay(cmd, inbound, tx, audit, start.interactive, start.tty));
    Ok(Response::new(ReceiverStream::new(rx)))
}

/// Relays until the command ends (see the module doc).
async fn relay(
    mut cmd: Streamed,
    mut inbound: Streaming<pb::ExecRequest>,
    tx: mpsc::Sender<Result<pb::ExecResponse, Status>>,
    mut audit: Use,
    interactive: bool,
    tty: bool,
) {
    let mut stdin_open = interactive;
    // Without -i the command gets no input. Off a terminal that is an
    // immediate EOF; on one (`-t` alone, like `docker exec -t`) the
    // terminal simply stays silent — closing it would type ^D.
    if !interactive && !tty {
        let _ = cmd.close_stdin().await;
    }
    let mut inbound_open = true;
    let mut client_gone = false;
    let mut kill_at: Option<tokio::time::Instant> = None;
    let ending = loop {
        tokio::select! {
            out = cmd.next() => match out {
                Output::Stdout(d) | Output::Stderr(d) if client_gone => {
                    let _ = cmd.ack(d.len()).await;
                }
                Output::Stdout(d) => {
                    let n = d.len();
                    if tx.send(frame(exec_response::Frame::Stdout(d))).await.is_err() {
                        client_gone = true;
                        kill_at = Some(hang_up(&cmd).await);
                    }
                    audit.bytes_out += n as u64;
                    let _ = cmd.ack(n).await;
                }
                Output::Stderr(d) => {
                    let n = d.len();
                    if tx.send(frame(exec_response::Frame::Stderr(d))).await.is_err() {
                        client_gone = true;
                        kill_at = Some(hang_up(&cmd).await);
                    }
                    audit.bytes_out += n as u64;
                    let _ = cmd.ack(n).await;
                }
                Output::StdinAcked => {}
                Output::End(e) => break e,
            },
            f = inbound.message(), if inbound_open && !client_gone && cmd.stdin_room() > 0 => match f {
                Ok(Some(pb::ExecRequest { frame: Some(f) })) => match f {
                    exec_request::Frame::Stdin(d) if stdin_open => {
                        audit.bytes_in += d.len() as u64;
                        let _ = cmd.stdin(d).await;
                    }
                    exec_request::Frame::Stdin(_) => {}
                    exec_request::Frame::CloseStdin(_) => {
                        if stdin_open {
                            stdin_open = false;
                            let _ = cmd.close_stdin().await;
                        }
                    }
                    exec_request::Frame::Signal(n) if n > 0 => {
                        let _ = cmd.signal(n).await;
                    }
                    exec_request::Frame::Resize(sz) => {
                        let _ = cmd.resize(sz.rows, sz.cols).await;
                    }
                    exec_request::Frame::Signal(_) | exec_request::Frame::Start(_) => {}
                },
                Ok(Some(pb::ExecRequest { frame: None })) => {}
                // The CLI half-closed: no more input, output still wanted.
                Ok(None) => {
                    inbound_open = false;
                    if stdin_open {
                        stdin_open = false;
                        let _ = cmd.close_stdin().await;
                    }
                }
                Err(_) => {
                    inbound_open = false;
                    client_gone = true;
                    kill_at = Some(hang_up(&cmd).await);
                }
            },
            _ = tx.closed(), if !client_gone => {
                client_gone = true;
                kill_at = Some(hang_up(&cmd).await);
            }
            _ = sleep_until(kill_at) => {
                // Still running after the hangup: kill it (the loop keeps
                // draining until its terminal response).
                kill_at = None;
                let _ = cmd.signal(libc::SIGKILL).await;
            }
        }
    };
    let (code, error) = match &ending {
        Ending::Exited { .. } => (ending.shell_code().unwrap_or(EXIT_UNKNOWN), String::new()),
        Ending::Failed { code, message } => {
            (EXIT_UNKNOWN, format!("{}: {message}", code.as_str_name()))
        }
        Ending::SessionLost => (
            EXIT_UNKNOWN,
            "the session to the agent ended before the command did".to_owned(),
        ),
    };
    let exit_code = matches!(ending, Ending::Exited { .. }).then_some(code);
    let error = if client_gone && error.is_empty() {
        "client went away (hangup)".to_owned()
    } else {
        error
    };
    audit.publish_finished(exit_code, error.clone());
    let _ = tx
        .send(frame(exec_response::Frame::Exit(pb::ExecExit {
            code,
            error,
        })))
        .await;
}

/// The CLI is gone: hang the command up, as a closed terminal would;
/// returns when to kill it if it is still there.
async fn hang_up(cmd: &Streamed) -> tokio::time::Instant {
    let _ = cmd.signal(libc::SIGHUP).await;
    let _ = cmd.close_stdin().await;
    tokio::time::Instant::now() + HANGUP_GRACE
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spawn_failures_follow_the_shell_convention() {
        assert_eq!(spawn_exit_code(libc::ENOENT), 127);
        assert_eq!(spawn_exit_code(libc::EACCES), 126);
        assert_eq!(spawn_exit_code(0), 126);
    }
}
