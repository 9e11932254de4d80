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
                            message: crate::peer_text::bound(e.message),
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
            RegisterFailure::Reported(crate::peer_text::bound(done.error))
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
