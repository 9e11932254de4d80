//! Driving a Register from the CP side (reference `cp-session.md` §7.4):
//! tell clawkerd `RegisterRequired`, wait (bounded) for `RegisterDone`, then
//! confirm the row really exists.

use std::time::Duration;

use crate::proto::clawkerd::v1::{self as pb, command, response};
use crate::registry::RegistryError;

use super::classify::RegistryLookup;
use super::mux::{MuxError, SessionMux, command as cmd};

/// How long clawkerd gets to finish a Register.
pub const REGISTER_REQUIRED_TIMEOUT: Duration = Duration::from_secs(30);

pub fn command_id(container_id: &str) -> String {
    format!("register-{container_id}")
}

/// Why a Register round failed. The texts are the reference's: they go
/// verbatim into `AgentRegistered{ok:false}.reason` and
/// `AgentUntrusted{register_failed}.detail`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegisterFailure {
    #[error("send RegisterRequired: {0}")]
    Send(MuxError),
    #[error("Recv RegisterDone: stream ended")]
    StreamEnded,
    #[error("Recv RegisterDone: clawkerd rejected RegisterRequired: {code}: {message}")]
    Rejected { code: &'static str, message: String },
    #[error("RegisterDone timeout: context deadline exceeded")]
    Timeout,
    /// clawkerd's own `RegisterDone.error` (truncated; a peer string).
    #[error("{0}")]
    Reported(String),
    #[error("clawkerd reported failure")]
    ReportedWithoutReason,
    #[error("registry row missing after RegisterDone")]
    RowMissing,
    #[error("registry lookup error after RegisterDone: {0}")]
    Lookup(String),
    /// Ours: the per-session bound on Register rounds.
    #[error("register attempts exhausted ({0} rounds)")]
    Exhausted(u32),
}

impl RegisterFailure {
    /// Whether another round in the same session may succeed: the CP or
    /// the container runtime was briefly unavailable, clawkerd did not
    /// answer in time, or the registry could not be read. Identity
    /// failures (PermissionDenied, a refused assertion) and a broken
    /// session are not retried: the former would fail the same way, the
    /// latter has no session to retry on.
    ///
    /// clawkerd reports its failure as text (`RegisterDone.error`, whose
    /// formats the reference fixes, `clawkerd.md` §9.3), so the gRPC code
    /// and the token endpoint's outcome are read from it; both clawkerd
    /// generations write the same `rpc error: code = <Code> desc = …`.
    pub fn retryable(&self) -> bool {
        match self {
            Self::Timeout | Self::Lookup(_) => true,
            Self::Reported(text) => reported_is_transient(text),
            Self::Send(_)
            | Self::StreamEnded
            | Self::Rejected { .. }
            | Self::ReportedWithoutReason
            | Self::RowMissing
            | Self::Exhausted(_) => false,
        }
    }
}

/// Transient outcomes in clawkerd's `RegisterDone.error` text.
fn reported_is_transient(text: &str) -> bool {
    const TRANSIENT_CODES: [&str; 4] = [
        "code = Unavailable ",
        "code = DeadlineExceeded ",
        "code = ResourceExhausted ",
        "code = Aborted ",
    ];
    if let Some(rest) = text.strip_prefix("AgentService.Register: rpc error: ") {
        return TRANSIENT_CODES.iter().any(|c| rest.starts_with(c));
    }
    if let Some(rest) = text.strip_prefix("hydra token exchange: ") {
        // No HTTP answer at all, a body that did not arrive, or a 5xx: the
        // CP's token endpoint was not there or failed before spending.
        return rest.starts_with("post to ")
            || rest.starts_with("read response: ")
            || rest.starts_with("hydra returned 5");
    }
    text.starts_with("dial CP agent listener: ")
}

/// Runs one Register round.
pub async fn drive(
    mux: &SessionMux,
    registry: &dyn RegistryLookup,
    container_id: &str,
    timeout: Duration,
) -> Result<(), RegisterFailure> {
    let id = command_id(container_id);
    let mut replies = mux
        .call(cmd(
            &id,
            command::Payload::RegisterRequired(pb::RegisterRequired {}),
        ))
        .await
        .map_err(RegisterFailure::Send)?;
    let wait = async {
        loop {
            match replies.next().await {
                None => return Err(RegisterFailure::StreamEnded),
                Some(r) => match r.payload {
                    Some(response::Payload::RegisterDone(done)) => return Ok(done),
                    Some(response::Payload::Error(e)) => {
                        return Err(RegisterFailure::Rejected {
                            code: e.code().as_str_name(),
                            message: e.message,
                        });
                    }
                    _ => continue,
                },
            }
        }
    };
    let done = match tokio::time::timeout(timeout, wait).await {
        Err(_) => return Err(RegisterFailure::Timeout),
        Ok(r) => r?,
    };
    if !done.ok {
        return Err(if done.error.is_empty() {
            RegisterFailure::ReportedWithoutReason
        } else {
            RegisterFailure::Reported(done.error)
        });
    }
    match registry.lookup_by_container_id(container_id) {
        Ok(_) => Ok(()),
        Err(RegistryError::UnknownAgent) => Err(RegisterFailure::RowMissing),
        Err(e) => Err(RegisterFailure::Lookup(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::super::mux::testing::*;
    use super::*;
    use crate::identity::Thumbprint;
    use crate::proto::clawkerd::v1::ErrorCode;
    use crate::registry::Entry;

    struct Rows(Option<Entry>);
    impl RegistryLookup for Rows {
        fn lookup_by_container_id(&self, _: &str) -> Result<Entry, RegistryError> {
            self.0.clone().ok_or(RegistryError::UnknownAgent)
        }
    }

    fn row() -> Rows {
        Rows(Some(Entry {
            agent_name: "a".into(),
            project: String::new(),
            container_id: "abc".into(),
            thumbprint: Thumbprint([1; 32]),
            canonical_cn: "clawker.a".into(),
            registered_at_unix: 1,
            last_seen_unix: 1,
        }))
    }

    async fn answer(
        mut peer: FakePeer,
        frames: Vec<Result<pb::Response, tonic::Status>>,
    ) -> FakePeer {
        let c = peer.commands.recv().await.unwrap();
        assert_eq!(c.command_id, "register-abc");
        assert!(matches!(
            c.payload,
            Some(command::Payload::RegisterRequired(_))
        ));
        for f in frames {
            peer.responses.send(f).unwrap();
        }
        peer
    }

    #[tokio::test]
    async fn ok_with_row_succeeds_skipping_unsolicited_frames() {
        let (mux, peer) = pair();
        let h = tokio::spawn(answer(
            peer,
            vec![
                resp("other", response::Payload::Started(pb::Started {})),
                resp(
                    "register-abc",
                    response::Payload::RegisterDone(pb::RegisterDone {
                        ok: true,
                        error: String::new(),
                    }),
                ),
            ],
        ));
        assert_eq!(
            drive(&mux, &row(), "abc", REGISTER_REQUIRED_TIMEOUT).await,
            Ok(())
        );
        drop(h);
    }

    #[tokio::test]
    async fn failure_texts_match_the_reference() {
        type Frames = Vec<Result<pb::Response, tonic::Status>>;
        let cases: Vec<(Frames, Rows, &str)> = vec![
            (
                vec![resp(
                    "register-abc",
                    response::Payload::RegisterDone(pb::RegisterDone {
                        ok: false,
                        error: "token exchange failed".into(),
                    }),
                )],
                row(),
                "token exchange failed",
            ),
            (
                vec![resp(
                    "register-abc",
                    response::Payload::RegisterDone(pb::RegisterDone {
                        ok: false,
                        error: String::new(),
                    }),
                )],
                row(),
                "clawkerd reported failure",
            ),
            (
                vec![resp(
                    "register-abc",
                    response::Payload::Error(pb::Error {
                        code: ErrorCode::InvalidRequest as i32,
                        message: "missing client_assertion".into(),
                        os_errno: 0,
                    }),
                )],
                row(),
                "Recv RegisterDone: clawkerd rejected RegisterRequired: ERROR_CODE_INVALID_REQUEST: missing client_assertion",
            ),
            (
                vec![resp(
                    "register-abc",
                    response::Payload::RegisterDone(pb::RegisterDone {
                        ok: true,
                        error: String::new(),
                    }),
                )],
                Rows(None),
                "registry row missing after RegisterDone",
            ),
            (
                vec![Err(tonic::Status::unavailable("eof"))],
                row(),
                "Recv RegisterDone: stream ended",
            ),
        ];
        for (frames, rows, want) in cases {
            let (mux, peer) = pair();
            let h = tokio::spawn(answer(peer, frames));
            let got = drive(&mux, &rows, "abc", REGISTER_REQUIRED_TIMEOUT).await;
            assert_eq!(got.map_err(|e| e.to_string()), Err(want.to_owned()));
            drop(h);
        }
    }

    #[test]
    fn transient_failures_are_retried_and_identity_failures_are_not() {
        let reported = |t: &str| RegisterFailure::Reported(t.into());
        for t in [
            "AgentService.Register: rpc error: code = Unavailable desc = register: container runtime unavailable",
            "AgentService.Register: rpc error: code = DeadlineExceeded desc = context deadline exceeded",
            "hydra token exchange: post to https://10.0.0.1:7444/oauth2/token: connection refused",
            "hydra token exchange: hydra returned 500 Internal Server Error: {}",
            "hydra token exchange: read response: timeout",
            "dial CP agent listener: timeout",
        ] {
            assert!(reported(t).retryable(), "{t}");
        }
        for t in [
            "AgentService.Register: rpc error: code = PermissionDenied desc = register: identity check failed",
            "AgentService.Register: rpc error: code = Unauthenticated desc = token inactive or invalid",
            "hydra token exchange: hydra returned 400 Bad Request: {\"error\":\"invalid_grant\"}",
            "hydra token exchange: hydra returned 401 Unauthorized: {}",
            "CLAWKER_CP_TOKEN_URL unset; cannot exchange assertion",
            "something else code = Unavailable desc = x",
        ] {
            assert!(!reported(t).retryable(), "{t}");
        }
        assert!(RegisterFailure::Timeout.retryable());
        assert!(RegisterFailure::Lookup("io".into()).retryable());
        assert!(!RegisterFailure::StreamEnded.retryable());
        assert!(!RegisterFailure::RowMissing.retryable());
        assert!(!RegisterFailure::Exhausted(3).retryable());
    }

    #[tokio::test]
    async fn silence_times_out() {
        let (mux, peer) = pair();
        let h = tokio::spawn(answer(peer, vec![]));
        let got = drive(&mux, &row(), "abc", Duration::from_millis(30)).await;
        assert_eq!(
            got.map_err(|e| e.to_string()),
            Err("RegisterDone timeout: context deadline exceeded".into())
        );
        drop(h);
    }

    #[tokio::test]
    async fn closed_session_is_a_send_failure() {
        let (mux, peer) = pair();
        drop(peer);
        mux.closed().await;
        let got = drive(&mux, &row(), "abc", REGISTER_REQUIRED_TIMEOUT)
            .await
            .unwrap_err()
            .to_string();
        assert!(got.starts_with("send RegisterRequired"), "{got}");
    }
}
