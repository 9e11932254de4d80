//! `CopyFrom`, `CopyTo` and `Logs`: bytes between the operator and an
//! agent over its session, with the same gate, audit and flow control as
//! `Exec` (see [`super::exec`]).
//!
//! `CopyTo` lands like `docker cp`: onto an existing directory, the
//! stream's top-level entry goes inside it; otherwise the path's parent
//! must exist and the entry takes the path's last name. The CP finds out
//! which by asking clawkerd for the directory first (clawkerd refuses a
//! `CopyTo` whose `dest_dir` is not a directory before it starts), then
//! tells the CLI in `CopyToReady` which name to give the top entry.

use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::access::{self, Ask, Use};
use super::service::AdminApi;
use crate::events::ExecKind;
use crate::proto::admin::v1::{self as pb, copy_to_request, copy_to_response};
use crate::proto::clawkerd::v1 as wire;
use crate::proto::clawkerd::v1::ErrorCode;
use crate::session::stream::{Ending, Output, StartError, Streamed};

const START_TIMEOUT: Duration = Duration::from_secs(10);
const START_BOUND: Duration = Duration::from_secs(15);
const TO_CLIENT: usize = 16;

fn start_status(e: StartError) -> Status {
    match e {
        StartError::Remote {
            code: ErrorCode::NotFound,
            message,
            ..
        } => Status::not_found(message),
        StartError::Remote { message, .. } => Status::invalid_argument(message),
        other => Status::unavailable(other.to_string()),
    }
}

fn ending_status(e: &Ending) -> Option<Status> {
    match e {
        Ending::Exited { code: 0, signal: 0 } => None,
        Ending::Exited { code, .. } => Some(Status::internal(format!("ended with {code}"))),
        Ending::Failed {
            code: ErrorCode::InvalidRequest,
            message,
        } => Some(Status::invalid_argument(message.clone())),
        Ending::Failed { message, .. } => Some(Status::internal(message.clone())),
        Ending::SessionLost => Some(Status::unavailable(
            "the session to the agent ended before the transfer did",
        )),
    }
}

/// Streams a command's stdout to the client as `wrap(chunk)` frames; ends
/// the stream (with an error status if the command failed) at its end.
/// A client that goes away stops the command.
async fn stream_out<T: Send + 'static>(
    mut cmd: Streamed,
    tx: mpsc::Sender<Result<T, Status>>,
    wrap: fn(Bytes) -> T,
    mut audit: Use,
) {
    let mut gone = false;
    let ending = loop {
        tokio::select! {
            out = cmd.next() => match out {
                Output::Stdout(d) | Output::Stderr(d) => {
                    let n = d.len();
                    if !gone && tx.send(Ok(wrap(d))).await.is_err() {
                        gone = true;
                        let _ = cmd.signal(libc::SIGTERM).await;
                    }
                    if !gone {
                        audit.bytes_out += n as u64;
                    }
                    let _ = cmd.ack(n).await;
                }
                Output::StdinAcked => {}
                Output::End(e) => break e,
            },
            _ = tx.closed(), if !gone => {
                gone = true;
                // Stops a follow or a copy; the loop drains to the end.
                let _ = cmd.signal(libc::SIGTERM).await;
            }
        }
    };
    let status = ending_status(&ending);
    let error = match (&status, gone) {
        (Some(s), _) => s.message().to_owned(),
        (None, true) => "client went away".to_owned(),
        (None, false) => String::new(),
    };
    audit.publish_finished(status.is_none().then_some(0), error);
    if let Some(s) = status {
        let _ = tx.send(Err(s)).await;
    }
}

fn new_use(
    api: &AdminApi,
    opened: &access::Opened,
    exec_id: &str,
    kind: ExecKind,
    operator: String,
    argv: Vec<String>,
) -> Use {
    Use {
        bus: api.bus().clone(),
        agent: opened.agent.clone(),
        exec_id: exec_id.to_owned(),
        kind,
        operator,
        argv,
        user: "root".to_owned(),
        tty: false,
        started: Instant::now(),
        bytes_in: 0,
        bytes_out: 0,
    }
}

pub type CopyFromStream = ReceiverStream<Result<pb::CopyFromResponse, Status>>;

pub(super) async fn copy_from(
    api: &AdminApi,
    req: Request<pb::CopyFromRequest>,
) -> Result<Response<CopyFromStream>, Status> {
    let operator = access::operator_of(&req);
    let req = req.into_inner();
    let target = req.target.unwrap_or_default();
    let argv = access::truncate_argv(&["cp-from".to_owned(), req.path.clone()]);
    let exec_id = api.next_exec_id("cpfrom", &target.agent);
    let opened = access::open(
        api.bus(),
        api.sessions(),
        Ask {
            kind: ExecKind::CopyFrom,
            target: &target,
            force: req.force,
            operator: &operator,
            argv: &argv,
            exec_id: &exec_id,
        },
    )
    .await?;
    let audit = new_use(api, &opened, &exec_id, ExecKind::CopyFrom, operator, argv);
    audit.publish_started(opened.forced);
    let payload = wire::command::Payload::CopyFrom(wire::CopyFrom { path: req.path });
    let cmd = match Streamed::start(&opened.live.mux, &exec_id, payload, START_BOUND).await {
        Ok(c) => c,
        Err(e) => {
            let status = start_status(e);
            audit.publish_finished(None, status.message());
            return Err(status);
        }
    };
    let (tx, rx) = mpsc::channel(TO_CLIENT);
    tokio::spawn(stream_out(
        cmd,
        tx,
        |data| pb::CopyFromResponse { data },
        audit,
    ));
    Ok(Response::new(ReceiverStream::new(rx)))
}

pub type LogsStream = ReceiverStream<Result<pb::LogsResponse, Status>>;

pub(super) async fn logs(
    api: &AdminApi,
    req: Request<pb::LogsRequest>,
) -> Result<Response<LogsStream>, Status> {
    let operator = access::operator_of(&req);
    let req = req.into_inner();
    let target = req.target.unwrap_or_default();
    let mut argv = vec!["logs".to_owned()];
    if req.follow {
        argv.push("--follow".to_owned());
    }
    let exec_id = api.next_exec_id("logs", &target.agent);
    let opened = access::open(
        api.bus(),
        api.sessions(),
        Ask {
            kind: ExecKind::Logs,
            target: &target,
            force: false,
            operator: &operator,
            argv: &argv,
            exec_id: &exec_id,
        },
    )
    .await?;
    let audit = new_use(api, &opened, &exec_id, ExecKind::Logs, operator, argv);
    audit.publish_started(false);
    let payload = wire::command::Payload::Logs(wire::Logs {
        follow: req.follow,
        tail_bytes: req.tail_bytes,
    });
    let cmd = match Streamed::start(&opened.live.mux, &exec_id, payload, START_BOUND).await {
        Ok(c) => c,
        Err(e) => {
            let status = start_status(e);
            audit.publish_finished(None, status.message());
            return Err(status);
        }
    };
    let (tx, rx) = mpsc::channel(TO_CLIENT);
    tokio::spawn(stream_out(cmd, tx, |data| pb::LogsResponse { data }, audit));
    Ok(Response::new(ReceiverStream::new(rx)))
}

pub type CopyToStream = ReceiverStream<Result<pb::CopyToResponse, Status>>;

fn copy_to_cmd(dest_dir: &str) -> wire::command::Payload {
    // Ownership as the archive records it (`docker cp -a`): the CLI packs
    // the operator's files with their numeric owners.
    wire::command::Payload::CopyTo(wire::CopyTo {
        dest_dir: dest_dir.to_owned(),
        uid: 0,
        gid: 0,
        preserve_owner: true,
    })
}

pub(super) async fn copy_to(
    api: &AdminApi,
    req: Request<Streaming<pb::CopyToRequest>>,
) -> Result<Response<CopyToStream>, Status> {
    let operator = access::operator_of(&req);
    let mut inbound = req.into_inner();
    let start = match tokio::time::timeout(START_TIMEOUT, inbound.message()).await {
        Ok(Ok(Some(pb::CopyToRequest {
            frame: Some(copy_to_request::Frame::Start(s)),
        }))) => s,
        Ok(Err(status)) => return Err(status),
        Err(_) => return Err(Status::deadline_exceeded("no CopyToStart within 10s")),
        _ => {
            return Err(Status::invalid_argument(
                "the first CopyTo frame must be CopyToStart",
            ));
        }
    };
    let dest = start.dest_path.clone();
    if !Path::new(&dest).is_absolute() {
        return Err(Status::invalid_argument(format!(
            "{dest:?}: the container path must be absolute"
        )));
    }
    let target = start.target.clone().unwrap_or_default();
    let argv = access::truncate_argv(&["cp-to".to_owned(), dest.clone()]);
    let exec_id = api.next_exec_id("cpto", &target.agent);
    let opened = access::open(
        api.bus(),
        api.sessions(),
        Ask {
            kind: ExecKind::CopyTo,
            target: &target,
            force: start.force,
            operator: &operator,
            argv: &argv,
            exec_id: &exec_id,
        },
    )
    .await?;
    let audit = new_use(api, &opened, &exec_id, ExecKind::CopyTo, operator, argv);
    audit.publish_started(opened.forced);
    let mux = &opened.live.mux;
    // An existing directory: land inside it. Otherwise: its parent, renamed.
    let (cmd, ready) = match Streamed::start(mux, &exec_id, copy_to_cmd(&dest), START_BOUND).await {
        Ok(c) => (
            c,
            pb::CopyToReady {
                dest_dir: dest.clone(),
                name: String::new(),
            },
        ),
        Err(StartError::Remote {
            code: ErrorCode::NotFound,
            ..
        }) => {
            let p = Path::new(&dest);
            let (Some(parent), Some(name)) = (p.parent(), p.file_name()) else {
                let status = Status::invalid_argument(format!("{dest:?} names no file"));
                audit.publish_finished(None, status.message());
                return Err(status);
            };
            let parent = parent.to_string_lossy().into_owned();
            let id = format!("{exec_id}-p");
            match Streamed::start(mux, &id, copy_to_cmd(&parent), START_BOUND).await {
                Ok(c) => (
                    c,
                    pb::CopyToReady {
                        dest_dir: parent,
                        name: name.to_string_lossy().into_owned(),
                    },
                ),
                Err(e) => {
                    let status = start_status(e);
                    audit.publish_finished(None, status.message());
                    return Err(status);
                }
            }
        }
        Err(e) => {
            let status = start_status(e);
            audit.publish_finished(None, status.message());
            return Err(status);
        }
    };
    let (tx, rx) = mpsc::channel(TO_CLIENT);
    let _ = tx
        .send(Ok(pb::CopyToResponse {
            frame: Some(copy_to_response::Frame::Ready(ready)),
        }))
        .await;
    tokio::spawn(stream_in(cmd, inbound, tx, audit));
    Ok(Response::new(ReceiverStream::new(rx)))
}

/// Feeds the client's data frames to clawkerd within its stdin window,
/// then reports the end.
async fn stream_in(
    mut cmd: Streamed,
    mut inbound: Streaming<pb::CopyToRequest>,
    tx: mpsc::Sender<Result<pb::CopyToResponse, Status>>,
    mut audit: Use,
) {
    let mut open = true;
    let mut gone = false;
    let ending = loop {
        tokio::select! {
            out = cmd.next() => match out {
                Output::End(e) => break e,
                Output::Stdout(d) | Output::Stderr(d) => { let _ = cmd.ack(d.len()).await; }
                Output::StdinAcked => {}
            },
            f = inbound.message(), if open && cmd.stdin_room() > 0 => match f {
                Ok(Some(pb::CopyToRequest { frame: Some(copy_to_request::Frame::Data(d)) })) => {
                    audit.bytes_in += d.len() as u64;
                    let _ = cmd.stdin(d).await;
                }
                Ok(Some(pb::CopyToRequest { frame: Some(copy_to_request::Frame::End(_)) })) | Ok(None) => {
                    open = false;
                    let _ = cmd.close_stdin().await;
                }
                Ok(Some(_)) => {}
                Err(_) => {
                    // The client went away mid-stream: a partial tar must
                    // not be taken for a whole one.
                    open = false;
                    gone = true;
                    let _ = cmd.signal(libc::SIGTERM).await;
                }
            },
        }
    };
    let status = ending_status(&ending);
    let error = match (&status, gone) {
        (Some(s), _) => s.message().to_owned(),
        (None, true) => "client went away".to_owned(),
        (None, false) => String::new(),
    };
    audit.publish_finished(status.is_none().then_some(0), error);
    let msg = match status {
        Some(s) => Err(s),
        None => Ok(pb::CopyToResponse {
            frame: Some(copy_to_response::Frame::Done(pb::CopyToDone {
                bytes: audit.bytes_in,
            })),
        }),
    };
    let _ = tx.send(msg).await;
}
