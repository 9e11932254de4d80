//! One Session stream, many concurrent commands.
//!
//! clawkerd answers every Command with Responses carrying its `command_id`.
//! The mux owns the only reader of the stream and routes each Response to
//! whoever issued that command id (Register, an init step, a containment
//! command), so there are never two receivers on one stream — the invariant
//! the reference had to guard by hand. Responses nobody waits for are
//! drained and logged, which is the "hold" phase of a session — except a
//! certificate signing request clawkerd sends on its own (a `renew-…` id),
//! which goes to whoever took [`SessionMux::take_unsolicited`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures::{Stream, StreamExt};
use tokio::sync::{mpsc, watch};

use crate::proto::clawkerd::v1::{Command, Response, command, response};

/// How the stream ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamEnd {
    /// The peer closed the stream cleanly.
    Eof,
    /// Transport or status error, with its text.
    Error(String),
}

impl StreamEnd {
    /// `SessionBroken.reason`.
    pub fn reason(&self) -> String {
        match self {
            StreamEnd::Eof => "eof".to_owned(),
            StreamEnd::Error(e) => e.clone(),
        }
    }
}

type Routes = Arc<Mutex<HashMap<String, mpsc::UnboundedSender<Response>>>>;

/// clawkerd's own renewal CSRs waiting for the session to take them. One at
/// a time is normal; a peer flooding them loses the excess (it retries).
const UNSOLICITED_QUEUE: usize = 4;
/// Longest command id accepted on an unsolicited response.
pub const MAX_UNSOLICITED_ID: usize = 64;

/// Whether an unrouted response is one the session handles: a CSR on a
/// bounded `renew-…` id (clawkerd's own renewals; see `session::rotation`).
fn is_unsolicited_csr(r: &Response) -> bool {
    matches!(r.payload, Some(response::Payload::Csr(_)))
        && r.command_id.starts_with("renew-")
        && r.command_id.len() <= MAX_UNSOLICITED_ID
}

/// At most `max` bytes of a peer string, cut on a character boundary.
pub fn clip(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Errors issuing a command on the session.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MuxError {
    #[error("session closed")]
    Closed,
    #[error("command id {0:?} already in flight")]
    DuplicateId(String),
}

/// Cheap-clone handle to a live session stream.
#[derive(Clone)]
pub struct SessionMux {
    /// Boxed: a tokio channel allocates its slots 32 at a time up front,
    /// and a `Command` is ~170 bytes — 5 KiB per idle session, against
    /// 256 bytes of pointers.
    tx: mpsc::Sender<Box<Command>>,
    routes: Routes,
    ended: watch::Receiver<Option<StreamEnd>>,
    unsolicited: Arc<Mutex<Option<mpsc::Receiver<Box<Response>>>>>,
}

impl std::fmt::Debug for SessionMux {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionMux").finish_non_exhaustive()
    }
}

/// Responses for one command id; dropping it unregisters the route.
pub struct CommandReplies {
    pub id: String,
    rx: mpsc::UnboundedReceiver<Response>,
    routes: Routes,
}

impl CommandReplies {
    /// Next response for this command, `None` once the stream has ended.
    pub async fn next(&mut self) -> Option<Response> {
        self.rx.recv().await
    }
}

impl std::fmt::Debug for CommandReplies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CommandReplies")
            .field("id", &self.id)
            .finish()
    }
}

impl Drop for CommandReplies {
    fn drop(&mut self) {
        if let Ok(mut r) = self.routes.lock() {
            r.remove(&self.id);
        }
    }
}

impl SessionMux {
    /// Starts the reader task over `responses`; `tx` feeds the request side
    /// of the stream.
    pub fn start<S>(tx: mpsc::Sender<Box<Command>>, responses: S) -> Self
    where
        S: Stream<Item = Result<Response, tonic::Status>> + Send + Unpin + 'static,
    {
        let routes: Routes = Arc::default();
        let (ended_tx, ended) = watch::channel(None);
        // Boxed: a channel allocates its first block of 32 slots up front,
        // 32 × size_of::<Response>() ≈ 2.9 KB per idle session otherwise.
        let (unsolicited_tx, unsolicited) = mpsc::channel(UNSOLICITED_QUEUE);
        tokio::spawn(read_loop(
            responses,
            routes.clone(),
            ended_tx,
            unsolicited_tx,
        ));
        Self {
            tx,
            routes,
            ended,
            unsolicited: Arc::new(Mutex::new(Some(unsolicited))),
        }
    }

    /// The queue of clawkerd's unsolicited renewal CSRs; the first caller
    /// gets it (the session's rotation driver), later callers `None`.
    pub fn take_unsolicited(&self) -> Option<mpsc::Receiver<Box<Response>>> {
        self.unsolicited.lock().ok().and_then(|mut u| u.take())
    }

    /// Registers a route for `id` and sends `cmd` (whose id must be `id`).
    pub async fn call(&self, cmd: Command) -> Result<CommandReplies, MuxError> {
        let replies = self.route(&cmd.command_id)?;
        self.send(cmd).await?;
        Ok(replies)
    }

    /// Registers a route without sending (for callers that send several
    /// frames under one id, e.g. ShellCommand then CloseStdin).
    pub fn route(&self, id: &str) -> Result<CommandReplies, MuxError> {
        if self.is_closed() {
            return Err(MuxError::Closed);
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let mut routes = self.routes.lock().map_err(|_| MuxError::Closed)?;
        if routes.contains_key(id) {
            return Err(MuxError::DuplicateId(id.to_owned()));
        }
        routes.insert(id.to_owned(), tx);
        Ok(CommandReplies {
            id: id.to_owned(),
            rx,
            routes: self.routes.clone(),
        })
    }

    /// Sends one frame.
    pub async fn send(&self, cmd: Command) -> Result<(), MuxError> {
        self.tx
            .send(Box::new(cmd))
            .await
            .map_err(|_| MuxError::Closed)
    }

    pub fn is_closed(&self) -> bool {
        self.ended.borrow().is_some()
    }

    /// Resolves when the stream has ended, with how.
    pub async fn closed(&self) -> StreamEnd {
        let mut rx = self.ended.clone();
        loop {
            if let Some(end) = rx.borrow_and_update().clone() {
                return end;
            }
            if rx.changed().await.is_err() {
                return StreamEnd::Error("session reader gone".into());
            }
        }
    }
}

async fn read_loop<S>(
    mut responses: S,
    routes: Routes,
    ended: watch::Sender<Option<StreamEnd>>,
    unsolicited: mpsc::Sender<Box<Response>>,
) where
    S: Stream<Item = Result<Response, tonic::Status>> + Unpin,
{
    let end = loop {
        match responses.next().await {
            None => break StreamEnd::Eof,
            // The status text is the peer's: bounded before it becomes
            // `SessionBroken.reason`.
            Some(Err(status)) => {
                break StreamEnd::Error(crate::peer_text::bound(status.to_string()));
            }
            Some(Ok(resp)) => {
                let route = routes
                    .lock()
                    .ok()
                    .and_then(|r| r.get(&resp.command_id).cloned());
                match route {
                    Some(tx) => {
                        let _ = tx.send(resp);
                    }
                    None if is_unsolicited_csr(&resp) => {
                        if let Err(e) = unsolicited.try_send(Box::new(resp)) {
                            let resp = e.into_inner();
                            tracing::warn!(
                                event = "agentdial_unsolicited_dropped",
                                command_id = %clip(&resp.command_id, MAX_UNSOLICITED_ID),
                                "renewal CSR dropped (queue full or nobody holding the session)"
                            );
                        }
                    }
                    None => tracing::debug!(
                        event = "agentdial_unexpected_response",
                        command_id = %clip(&resp.command_id, MAX_UNSOLICITED_ID),
                        payload = payload_name(&resp),
                        "discarding unsolicited response"
                    ),
                }
            }
        }
    };
    // Dropping every route wakes every waiter with "stream ended".
    if let Ok(mut r) = routes.lock() {
        r.clear();
    }
    let _ = ended.send(Some(end));
}

/// Short name of a Response payload, for logs and error texts.
pub fn payload_name(r: &Response) -> &'static str {
    match &r.payload {
        None => "none",
        Some(response::Payload::HelloAck(_)) => "hello_ack",
        Some(response::Payload::Started(_)) => "started",
        Some(response::Payload::Stdout(_)) => "stdout",
        Some(response::Payload::Stderr(_)) => "stderr",
        Some(response::Payload::StageExit(_)) => "stage_exit",
        Some(response::Payload::Done(_)) => "done",
        Some(response::Payload::Error(_)) => "error",
        Some(response::Payload::RegisterDone(_)) => "register_done",
        Some(response::Payload::Csr(_)) => "csr",
        Some(response::Payload::StdinConsumed(_)) => "stdin_consumed",
    }
}

/// Builds a Command.
pub fn command(id: &str, payload: command::Payload) -> Command {
    Command {
        command_id: id.to_owned(),
        payload: Some(payload),
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! An in-memory clawkerd stand-in: the test sees the Commands the CP
    //! sends and scripts the Responses.
    use super::*;

    pub struct FakePeer {
        pub commands: mpsc::Receiver<Command>,
        pub responses: mpsc::UnboundedSender<Result<Response, tonic::Status>>,
    }

    pub fn pair() -> (SessionMux, FakePeer) {
        let (tx, mut boxed) = mpsc::channel::<Box<Command>>(64);
        let (unboxed, commands) = mpsc::channel(64);
        tokio::spawn(async move {
            while let Some(c) = boxed.recv().await {
                if unboxed.send(*c).await.is_err() {
                    return;
                }
            }
        });
        let (responses, rx) = mpsc::unbounded_channel();
        let stream = tokio_stream::wrappers::UnboundedReceiverStream::new(rx);
        (
            SessionMux::start(tx, stream),
            FakePeer {
                commands,
                responses,
            },
        )
    }

    pub fn resp(id: &str, p: response::Payload) -> Result<Response, tonic::Status> {
        Ok(Response {
            command_id: id.to_owned(),
            payload: Some(p),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;
    use crate::proto::clawkerd::v1 as pb;

    #[tokio::test]
    async fn routes_by_command_id_and_drains_the_rest() {
        let (mux, mut peer) = pair();
        let mut a = mux
            .call(command("a", command::Payload::Hello(pb::Hello {})))
            .await
            .unwrap();
        let mut b = mux.route("b").unwrap();
        assert_eq!(peer.commands.recv().await.unwrap().command_id, "a");
        peer.responses
            .send(resp("zz", response::Payload::Started(pb::Started {})))
            .unwrap();
        peer.responses
            .send(resp("b", response::Payload::Started(pb::Started {})))
            .unwrap();
        peer.responses
            .send(resp(
                "a",
                response::Payload::HelloAck(pb::HelloAck::default()),
            ))
            .unwrap();
        assert_eq!(payload_name(&a.next().await.unwrap()), "hello_ack");
        assert_eq!(payload_name(&b.next().await.unwrap()), "started");
        assert_eq!(
            mux.route("b").unwrap_err(),
            MuxError::DuplicateId("b".into())
        );
        drop(b);
        assert!(mux.route("b").is_ok(), "dropping replies frees the id");
    }

    #[tokio::test]
    async fn unsolicited_renewal_csrs_reach_the_taker_and_nothing_else_does() {
        let (mux, peer) = pair();
        let mut rx = mux.take_unsolicited().unwrap();
        assert!(mux.take_unsolicited().is_none(), "one taker");
        let csr = |id: &str| {
            resp(
                id,
                response::Payload::Csr(pb::CertSigningRequest {
                    csr_der: vec![1, 2].into(),
                    reason: "half_life".into(),
                }),
            )
        };
        peer.responses.send(csr("init-1")).unwrap(); // not a renewal id
        peer.responses
            .send(csr(&format!("renew-{}", "x".repeat(80))))
            .unwrap(); // too long
        peer.responses
            .send(resp("renew-9", response::Payload::Started(pb::Started {})))
            .unwrap(); // not a CSR
        peer.responses.send(csr("renew-1")).unwrap();
        let got = rx.recv().await.unwrap();
        assert_eq!(got.command_id, "renew-1");
        assert!(rx.try_recv().is_err(), "only the renewal CSR was queued");
        assert_eq!(clip("héllo", 2), "h");
        assert_eq!(clip("abc", 10), "abc");
    }

    #[tokio::test]
    async fn stream_end_wakes_waiters_and_reports_reason() {
        let (mux, peer) = pair();
        let mut a = mux.route("a").unwrap();
        peer.responses
            .send(Err(tonic::Status::unavailable("gone")))
            .unwrap();
        assert!(a.next().await.is_none());
        let end = mux.closed().await;
        assert!(end.reason().contains("gone"), "{end:?}");
        assert_eq!(mux.route("x").unwrap_err(), MuxError::Closed);

        let (mux, peer) = pair();
        drop(peer);
        assert_eq!(mux.closed().await, StreamEnd::Eof);
    }
}
