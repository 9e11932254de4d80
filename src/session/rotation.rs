//! Leaf rotation over the open session, CP side (DESIGN §13; modelled on
//! SPIRE's SVID rotation).
//!
//! clawkerd renews on its own at half its leaf's lifetime: it sends a
//! `CertSigningRequest` response on a fresh id `renew-<n>` (the mux hands
//! those to [`hold`]). The CP can also ask, with `RenewCert` on an id of its
//! own; clawkerd then answers on that id with the CSR (or with `Done`, when
//! a renewal of its own was already in flight and has just completed).
//! Either way, for one CSR:
//!
//! 1. the session must be trusted and the registry row must still name the
//!    session's current leaf;
//! 2. the CA (in the CP's memory) signs the CSR only for the row's canonical
//!    CN and container SAN, with the CP's profile and `agent_cert_ttl`
//!    ([`crate::pki::Ca::sign_agent_csr`]);
//! 3. the registry *stages* the new leaf, durably, before it leaves the CP;
//! 4. `CertIssued` goes out on the CSR's id; clawkerd checks it, persists
//!    key and leaf, swaps its serving and client certificate (the session
//!    stays up: TLS identities only matter at the next handshake) and
//!    answers `Done{0}` — "the new leaf is in use";
//! 5. the registry *promotes* the staged leaf: one durable write swaps the
//!    row's thumbprint and retires the old one to the history;
//!    `agent.cert.rotated` is published.
//!
//! Failures never touch the trust of the current leaf: the CP answers
//! `CertIssued{error}` (clawkerd keeps its leaf and retries with backoff),
//! publishes `agent.cert.rotation_failed`, and retries rotations it asked
//! for itself with [`clawker_actors::Backoff`]. A clawkerd that predates
//! rotation answers `RenewCert` with `Error{INVALID_REQUEST}`: rotation is
//! then unsupported for this session, and nothing else changes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clawker_actors::Backoff;
use futures::future::BoxFuture;
use time::OffsetDateTime;
use tokio::sync::mpsc;

use crate::events::{self, AgentRef, Publish, RotationReason};
use crate::identity::{self, Thumbprint};
use crate::pki::{AgentIdentity, Ca, CsrError};
use crate::proto::clawkerd::v1::{self as pb, ErrorCode, command, response};
use crate::registry::{LeafState, PendingLeaf, Promotion, Registry, RegistryError, RegistryStore};
use crate::tls::PeerInfo;

use super::classify::RegistryLookup;
use super::mux::{CommandReplies, MuxError, SessionMux, StreamEnd, clip, command as cmd};

/// Longest peer-supplied text we keep (error messages from clawkerd).
const PEER_TEXT_MAX: usize = 256;

/// Rotation policy (cp.toml: `agent_cert_ttl`, `agent_cert_stale_after`).
#[derive(Debug, Clone, Copy)]
pub struct RotationConfig {
    /// Lifetime of every leaf the CP signs (and `agent run` mints).
    pub agent_cert_ttl: Duration,
    /// How long past its `notAfter` a leaf that matches its row is still
    /// renewed on reconnect; beyond, the agent is `untrusted:cert_expired`.
    pub stale_after: Duration,
    /// Bound on each wait for clawkerd (`RenewCert` → CSR, `CertIssued` →
    /// `Done`).
    pub answer_timeout: Duration,
    /// Retries of rotations the CP asked for (e.g. for an expired leaf).
    pub retry: Backoff,
    /// Rotate right after a successful Register, so the leaf the bundle
    /// carried stops matching its row at once (`cp.toml`
    /// `retire_bootstrap_leaf`; on by default in Swarm mode, where the
    /// bundle stays in a swarm secret for the service's life).
    pub retire_bootstrap_leaf: bool,
}

impl Default for RotationConfig {
    fn default() -> Self {
        Self {
            agent_cert_ttl: Duration::from_secs(24 * 3600),
            stale_after: Duration::from_secs(30 * 86_400),
            answer_timeout: Duration::from_secs(30),
            retry: Backoff::new(Duration::from_secs(1), Duration::from_secs(300)).full_jitter(),
            retire_bootstrap_leaf: false,
        }
    }
}

/// Durable leaf writes the CP needs (the registry actor in production, the
/// store directly in tests).
pub trait LeafRows: Send + Sync + 'static {
    fn stage<'a>(
        &'a self,
        container_id: &'a str,
        current: Thumbprint,
        pending: PendingLeaf,
    ) -> BoxFuture<'a, Result<LeafState, RegistryError>>;

    fn promote<'a>(
        &'a self,
        container_id: &'a str,
        new: Thumbprint,
        now_unix: i64,
    ) -> BoxFuture<'a, Result<Promotion, RegistryError>>;
}

impl LeafRows for Registry {
    fn stage<'a>(
        &'a self,
        container_id: &'a str,
        current: Thumbprint,
        pending: PendingLeaf,
    ) -> BoxFuture<'a, Result<LeafState, RegistryError>> {
        Box::pin(self.stage_leaf(container_id, current, pending))
    }

    fn promote<'a>(
        &'a self,
        container_id: &'a str,
        new: Thumbprint,
        now_unix: i64,
    ) -> BoxFuture<'a, Result<Promotion, RegistryError>> {
        Box::pin(self.promote_leaf(container_id, new, now_unix))
    }
}

/// Tests (and tools) without the actor: the same writes on a blocking
/// thread.
impl LeafRows for RegistryStore {
    fn stage<'a>(
        &'a self,
        container_id: &'a str,
        current: Thumbprint,
        pending: PendingLeaf,
    ) -> BoxFuture<'a, Result<LeafState, RegistryError>> {
        let (store, id) = (self.clone(), container_id.to_owned());
        Box::pin(blocking(move || {
            crate::registry::leaf::stage(store.database(), &id, &current, pending)
        }))
    }

    fn promote<'a>(
        &'a self,
        container_id: &'a str,
        new: Thumbprint,
        now_unix: i64,
    ) -> BoxFuture<'a, Result<Promotion, RegistryError>> {
        let (store, id) = (self.clone(), container_id.to_owned());
        Box::pin(blocking(move || {
            crate::registry::leaf::promote(store.database(), &id, &new, now_unix)
        }))
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, RegistryError> + Send + 'static,
) -> Result<T, RegistryError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| RegistryError::Unavailable(format!("registry write task: {e}")))?
}

/// What the CP needs to rotate leaves: the CA (its key lives in the CP's
/// memory and is only used to sign here), the durable rows, the policy.
#[derive(Clone)]
pub struct CertRotation {
    pub ca: Arc<Ca>,
    pub rows: Arc<dyn LeafRows>,
    pub config: RotationConfig,
}

impl std::fmt::Debug for CertRotation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertRotation")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// How an expired leaf that matches its row is treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// Not expired.
    Valid,
    /// Expired, within the staleness bound: trust it and rotate at once.
    Renewable { expired_for: Duration },
    /// Expired longer ago than the bound: `untrusted:cert_expired`.
    Stale { expired_for: Duration },
}

/// Pure: where a leaf with `not_after_unix` stands at `now_unix`.
pub fn assess_expiry(now_unix: i64, not_after_unix: i64, stale_after: Duration) -> Expiry {
    if now_unix <= not_after_unix {
        return Expiry::Valid;
    }
    let expired_for = Duration::from_secs((now_unix - not_after_unix) as u64);
    if expired_for > stale_after {
        Expiry::Stale { expired_for }
    } else {
        Expiry::Renewable { expired_for }
    }
}

/// Why one rotation failed. The texts go back to clawkerd in `CertIssued`
/// and into `agent.cert.rotation_failed`; peer strings in them are clipped.
#[derive(Debug, thiserror::Error)]
pub enum RotationError {
    #[error("leaf rotation is not enabled on this CP")]
    Disabled,
    #[error("the session is not trusted")]
    Untrusted,
    #[error("registry row: {0}")]
    Row(String),
    #[error("CSR refused: {0}")]
    Csr(#[from] CsrError),
    #[error("{0}")]
    Registry(#[from] RegistryError),
    #[error("session closed")]
    Closed,
    #[error("clawkerd does not support leaf rotation")]
    Unsupported,
    #[error("clawkerd answered {code}: {message}")]
    Agent { code: &'static str, message: String },
    #[error("no answer from clawkerd within {0:?}")]
    Timeout(Duration),
    #[error("unexpected reply {0}")]
    Unexpected(&'static str),
}

impl From<MuxError> for RotationError {
    fn from(e: MuxError) -> Self {
        match e {
            MuxError::Closed => Self::Closed,
            MuxError::DuplicateId(_) => Self::Unexpected("command id already in flight"),
        }
    }
}

/// A completed rotation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rotated {
    pub old: Thumbprint,
    pub new: Thumbprint,
    pub not_after: OffsetDateTime,
    pub rotations: u32,
    /// CSR received → `Done` received.
    pub csr_to_done: Duration,
}

/// How a `RenewCert` ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestOutcome {
    /// Our request's CSR was signed and the new leaf is in use.
    Rotated(Rotated),
    /// clawkerd answered `Done` without a CSR: a renewal of its own was in
    /// flight and completed first (we handled that CSR on its own id).
    AlreadyRotated,
}

/// One session's rotation driver: knows the session's current leaf and
/// whether the session is trusted.
pub struct Rotator<P: Publish> {
    certs: Option<Arc<CertRotation>>,
    registry: Arc<dyn RegistryLookup>,
    sink: P,
    who: AgentRef,
    trusted: bool,
    current: Thumbprint,
    not_after_unix: Option<i64>,
    next_id: u64,
}

impl<P: Publish> Rotator<P> {
    pub fn new(
        certs: Option<Arc<CertRotation>>,
        registry: Arc<dyn RegistryLookup>,
        sink: P,
        who: AgentRef,
        trusted: bool,
        peer: &PeerInfo,
    ) -> Self {
        Self {
            certs,
            registry,
            sink,
            who,
            trusted,
            current: peer.thumbprint,
            not_after_unix: peer.not_after,
            next_id: 0,
        }
    }

    /// The thumbprint of the leaf this session uses now.
    pub fn current(&self) -> Thumbprint {
        self.current
    }

    fn retry_policy(&self) -> Backoff {
        self.certs
            .as_ref()
            .map(|c| c.config.retry)
            .unwrap_or_else(|| RotationConfig::default().retry)
    }

    fn answer_timeout(&self) -> Duration {
        self.certs
            .as_ref()
            .map(|c| c.config.answer_timeout)
            .unwrap_or_else(|| RotationConfig::default().answer_timeout)
    }

    /// The reason of a rotation clawkerd started on its own: `expired` when
    /// the session's leaf is past its `notAfter`, else `half_life`. (The
    /// CSR's own reason is a peer string; it is not trusted for events.)
    fn unsolicited_reason(&self) -> RotationReason {
        match self.not_after_unix {
            Some(na) if OffsetDateTime::now_utc().unix_timestamp() > na => RotationReason::Expired,
            _ => RotationReason::HalfLife,
        }
    }

    /// Sends `RenewCert` on a fresh id; the first reply comes through the
    /// returned replies.
    pub async fn send_request(
        &mut self,
        mux: &SessionMux,
        reason: RotationReason,
    ) -> Result<CommandReplies, RotationError> {
        self.next_id += 1;
        let id = format!("renew-cp-{}", self.next_id);
        let renew = pb::RenewCert {
            reason: reason.as_str().to_owned(),
        };
        Ok(mux
            .call(cmd(&id, command::Payload::RenewCert(renew)))
            .await?)
    }

    /// Continues a `RenewCert` with its first reply (`None`: stream ended).
    pub async fn on_request_reply(
        &mut self,
        mux: &SessionMux,
        replies: CommandReplies,
        first: Option<pb::Response>,
        reason: RotationReason,
    ) -> Result<RequestOutcome, RotationError> {
        let received = Instant::now();
        let payload = first.ok_or(RotationError::Closed)?.payload;
        match payload {
            Some(response::Payload::Csr(c)) => {
                let id = replies.id.clone();
                self.on_csr(mux, &id, &c.csr_der, Some(replies), reason, received)
                    .await
                    .map(RequestOutcome::Rotated)
            }
            Some(response::Payload::Done(d)) if d.final_exit_code == 0 => {
                Ok(RequestOutcome::AlreadyRotated)
            }
            Some(response::Payload::Error(e)) if e.code() == ErrorCode::InvalidRequest => {
                // A v0.8.0 clawkerd: "unsupported command".
                Err(RotationError::Unsupported)
            }
            Some(response::Payload::Error(e)) => Err(self.failed(
                reason,
                RotationError::Agent {
                    code: e.code().as_str_name(),
                    message: clip(&e.message, PEER_TEXT_MAX).to_owned(),
                },
            )),
            Some(_) => Err(self.failed(reason, RotationError::Unexpected("reply to RenewCert"))),
            None => Err(self.failed(reason, RotationError::Unexpected("empty reply"))),
        }
    }

    /// Asks clawkerd to rotate now and waits for the outcome (no other
    /// traffic is handled meanwhile; [`hold`] interleaves instead).
    pub async fn rotate_now(
        &mut self,
        mux: &SessionMux,
        reason: RotationReason,
    ) -> Result<RequestOutcome, RotationError> {
        let mut replies = self.send_request(mux, reason).await?;
        let wait = self.answer_timeout();
        let first = tokio::time::timeout(wait, replies.next())
            .await
            .map_err(|_| RotationError::Timeout(wait))?;
        self.on_request_reply(mux, replies, first, reason).await
    }

    /// Handles one CSR (received at `received`) on command id `id`: sign,
    /// stage, `CertIssued`, wait for `Done`, promote. `replies` is the
    /// route of a `RenewCert` we sent; for clawkerd's own CSRs the route is
    /// made here, before `CertIssued` leaves, so the `Done` cannot be lost.
    pub async fn on_csr(
        &mut self,
        mux: &SessionMux,
        id: &str,
        csr_der: &[u8],
        replies: Option<CommandReplies>,
        reason: RotationReason,
        received: Instant,
    ) -> Result<Rotated, RotationError> {
        let mut issued_sent = false;
        let result = self
            .issue(
                mux,
                id,
                csr_der,
                replies,
                reason,
                received,
                &mut issued_sent,
            )
            .await;
        match result {
            Ok(r) => {
                tracing::info!(
                    event = "agent_cert_rotated",
                    container_id = %self.who.container_id,
                    reason = reason.as_str(),
                    rotations = r.rotations,
                    csr_to_done_ms = r.csr_to_done.as_secs_f64() * 1000.0,
                    "leaf rotated"
                );
                self.sink.publish(events::CertRotated {
                    agent: self.who.clone(),
                    old: r.old,
                    new: r.new,
                    not_after: r.not_after,
                    reason,
                    rotations: r.rotations,
                    duration: r.csr_to_done,
                    at: events::now(),
                });
                Ok(r)
            }
            Err(e) => {
                if !issued_sent && !matches!(e, RotationError::Closed) {
                    // Tell clawkerd at once, so it keeps its leaf and backs
                    // off instead of waiting for its own timeout.
                    let refusal = pb::CertIssued {
                        cert_pem: String::new(),
                        error: e.to_string(),
                    };
                    let _ = mux
                        .send(cmd(id, command::Payload::CertIssued(refusal)))
                        .await;
                }
                Err(self.failed(reason, e))
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn issue(
        &mut self,
        mux: &SessionMux,
        id: &str,
        csr_der: &[u8],
        replies: Option<CommandReplies>,
        reason: RotationReason,
        received: Instant,
        issued_sent: &mut bool,
    ) -> Result<Rotated, RotationError> {
        let certs = self.certs.clone().ok_or(RotationError::Disabled)?;
        if !self.trusted {
            return Err(RotationError::Untrusted);
        }
        let container_id = self.who.container_id.clone();
        let row = self
            .registry
            .lookup_by_container_id(&container_id)
            .map_err(|e| RotationError::Row(e.to_string()))?;
        if !row.thumbprint.ct_eq(&self.current) {
            return Err(RotationError::Row(
                "the row no longer names this session's leaf".into(),
            ));
        }
        let expect = AgentIdentity {
            cn: row.canonical_cn.clone(),
            san: identity::container_san(&container_id)
                .map_err(|e| RotationError::Row(e.to_string()))?,
        };
        let ttl = time::Duration::try_from(certs.config.agent_cert_ttl)
            .map_err(|_| RotationError::Row("agent_cert_ttl out of range".into()))?;
        let now = OffsetDateTime::now_utc();
        let leaf = certs.ca.sign_agent_csr(csr_der, &expect, ttl, now)?;
        let new = leaf.thumbprint();
        certs
            .rows
            .stage(
                &container_id,
                self.current,
                PendingLeaf {
                    thumbprint: new,
                    not_after_unix: leaf.not_after.unix_timestamp(),
                    reason: reason.as_str().to_owned(),
                    staged_at_unix: now.unix_timestamp(),
                },
            )
            .await?;
        let mut replies = match replies {
            Some(r) => r,
            None => mux.route(id)?,
        };
        let issued = pb::CertIssued {
            cert_pem: leaf.cert_pem.clone(),
            error: String::new(),
        };
        mux.send(cmd(id, command::Payload::CertIssued(issued)))
            .await?;
        *issued_sent = true;
        let wait = certs.config.answer_timeout;
        let answer = tokio::time::timeout(wait, async {
            loop {
                match replies.next().await {
                    None => return Err(RotationError::Closed),
                    Some(r) => match r.payload {
                        Some(response::Payload::Done(d)) if d.final_exit_code == 0 => return Ok(()),
                        Some(response::Payload::Done(d)) => {
                            return Err(RotationError::Agent {
                                code: "DONE",
                                message: format!("exit code {}", d.final_exit_code),
                            });
                        }
                        Some(response::Payload::Error(e)) => {
                            return Err(RotationError::Agent {
                                code: e.code().as_str_name(),
                                message: clip(&e.message, PEER_TEXT_MAX).to_owned(),
                            });
                        }
                        _ => continue,
                    },
                }
            }
        })
        .await;
        match answer {
            Err(_) => return Err(RotationError::Timeout(wait)),
            Ok(r) => r?,
        }
        let csr_to_done = received.elapsed();
        let promoted = certs
            .rows
            .promote(
                &container_id,
                new,
                OffsetDateTime::now_utc().unix_timestamp(),
            )
            .await?;
        self.current = new;
        self.not_after_unix = Some(leaf.not_after.unix_timestamp());
        Ok(Rotated {
            old: promoted.old,
            new,
            not_after: leaf.not_after,
            rotations: promoted.state.rotations,
            csr_to_done,
        })
    }

    /// Publishes a failed attempt and hands the error back.
    fn failed(&self, reason: RotationReason, e: RotationError) -> RotationError {
        if matches!(e, RotationError::Closed) {
            return e;
        }
        tracing::warn!(
            event = "agent_cert_rotation_failed",
            container_id = %self.who.container_id,
            reason = reason.as_str(),
            error = %e,
            "leaf rotation failed; the current leaf stays"
        );
        self.sink.publish(events::CertRotationFailed {
            agent: self.who.clone(),
            reason,
            detail: e.to_string(),
            at: events::now(),
        });
        e
    }
}

/// The hold phase of a session: serves rotations until the stream ends.
/// `request` asks clawkerd to rotate at once (e.g. an expired leaf that was
/// trusted on reconnect), retried with backoff until a rotation happens,
/// clawkerd turns out not to support it, or the session ends.
pub async fn hold<P: Publish>(
    mut rotator: Rotator<P>,
    mux: &SessionMux,
    request: Option<RotationReason>,
) -> StreamEnd {
    let mut unsolicited = mux.take_unsolicited();
    let mut retry = rotator.retry_policy().retry();
    let mut next_request = request.map(|r| (r, tokio::time::Instant::now()));
    // A RenewCert in flight: its replies, reason and deadline.
    let mut outstanding: Option<(CommandReplies, RotationReason, tokio::time::Instant)> = None;
    loop {
        tokio::select! {
            end = mux.closed() => return end,
            Some(resp) = recv(&mut unsolicited) => {
                let received = Instant::now();
                let Some(response::Payload::Csr(c)) = resp.payload else { continue };
                let reason = rotator.unsolicited_reason();
                // Boxed: a rotation is rare, and its future (signing, the
                // registry write) would otherwise size every idle session.
                let ok = Box::pin(rotator.on_csr(mux, &resp.command_id, &c.csr_der, None, reason, received))
                    .await
                    .is_ok();
                if ok && outstanding.is_none() {
                    // Any rotation satisfies a pending request of ours.
                    next_request = None;
                    retry.reset();
                }
            }
            first = first_reply(&mut outstanding) => {
                let Some((replies, reason, _)) = outstanding.take() else { continue };
                let result = match first {
                    Some(first) => Box::pin(rotator.on_request_reply(mux, replies, first, reason)).await,
                    None => {
                        let wait = rotator.answer_timeout();
                        Err(rotator.failed(reason, RotationError::Timeout(wait)))
                    }
                };
                match result {
                    Ok(_) => retry.reset(),
                    Err(RotationError::Unsupported) => {
                        tracing::info!(
                            event = "agent_cert_rotation_unsupported",
                            container_id = %rotator.who.container_id,
                            "clawkerd predates leaf rotation; keeping its leaf and its trust"
                        );
                    }
                    Err(RotationError::Closed) => {}
                    Err(_) => {
                        next_request = Some((reason, tokio::time::Instant::now() + retry.next_delay()));
                    }
                }
            }
            _ = sleep_until(next_request.map(|(_, at)| at)), if outstanding.is_none() => {
                let Some((reason, _)) = next_request.take() else { continue };
                match Box::pin(rotator.send_request(mux, reason)).await {
                    Ok(replies) => {
                        let deadline = tokio::time::Instant::now() + rotator.answer_timeout();
                        outstanding = Some((replies, reason, deadline));
                    }
                    Err(RotationError::Closed) => {}
                    Err(e) => {
                        rotator.failed(reason, e);
                        next_request = Some((reason, tokio::time::Instant::now() + retry.next_delay()));
                    }
                }
            }
        }
    }
}

async fn recv(rx: &mut Option<mpsc::Receiver<Box<pb::Response>>>) -> Option<pb::Response> {
    match rx {
        Some(rx) => rx.recv().await.map(|r| *r),
        None => std::future::pending().await,
    }
}

/// The first reply of an outstanding `RenewCert` (inner `None`: the stream
/// ended), or `None` at its deadline.
async fn first_reply(
    outstanding: &mut Option<(CommandReplies, RotationReason, tokio::time::Instant)>,
) -> Option<Option<pb::Response>> {
    match outstanding {
        Some((replies, _, deadline)) => {
            let deadline = *deadline;
            tokio::time::timeout_at(deadline, replies.next()).await.ok()
        }
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::super::mux::testing::*;
    use super::*;
    use crate::events::RecordingSink;
    use crate::identity::{AgentName, ProjectSlug};
    use crate::registry::NewEntry;

    #[test]
    fn expiry_is_assessed_against_the_staleness_bound() {
        let day = 86_400;
        let bound = Duration::from_secs(30 * day as u64);
        assert_eq!(assess_expiry(100, 100, bound), Expiry::Valid);
        assert_eq!(assess_expiry(99, 100, bound), Expiry::Valid);
        assert_eq!(
            assess_expiry(101, 100, bound),
            Expiry::Renewable {
                expired_for: Duration::from_secs(1)
            }
        );
        assert_eq!(
            assess_expiry(100 + 30 * day, 100, bound),
            Expiry::Renewable { expired_for: bound }
        );
        assert_eq!(
            assess_expiry(101 + 30 * day, 100, bound),
            Expiry::Stale {
                expired_for: bound + Duration::from_secs(1)
            }
        );
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        store: RegistryStore,
        ca: Arc<Ca>,
        leaf: crate::pki::CertifiedKey,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let store = RegistryStore::open(&dir.path().join("r.redb")).unwrap();
        let ca = Arc::new(Ca::generate().unwrap());
        let leaf = ca
            .mint_agent(
                &ProjectSlug::new("web").unwrap(),
                &AgentName::new("dev").unwrap(),
                "abc",
            )
            .unwrap();
        store
            .add(NewEntry {
                agent_name: "dev".into(),
                project: "web".into(),
                container_id: "abc".into(),
                thumbprint: leaf.thumbprint(),
                registered_at_unix: 1,
                last_seen_unix: 0,
            })
            .unwrap();
        Fixture {
            _dir: dir,
            store,
            ca,
            leaf,
        }
    }

    fn peer(leaf: &crate::pki::CertifiedKey) -> PeerInfo {
        PeerInfo {
            cn: "clawker.web.dev".into(),
            thumbprint: leaf.thumbprint(),
            chain_verified: true,
            chain_error: None,
            expired_only: false,
            not_after: crate::tls::cert_validity(&leaf.cert_der).map(|v| v.1),
            leaf_der: leaf.cert_der.clone(),
        }
    }

    fn rotator(f: &Fixture, sink: &RecordingSink, trusted: bool) -> Rotator<RecordingSink> {
        let certs = CertRotation {
            ca: f.ca.clone(),
            rows: Arc::new(f.store.clone()),
            config: RotationConfig {
                answer_timeout: Duration::from_secs(5),
                retry: Backoff::new(Duration::from_millis(10), Duration::from_millis(50)),
                ..RotationConfig::default()
            },
        };
        Rotator::new(
            Some(Arc::new(certs)),
            Arc::new(f.store.clone()),
            sink.clone(),
            AgentRef::new("abc", "dev", "web"),
            trusted,
            &peer(&f.leaf),
        )
    }

    fn csr(cn: &str) -> Vec<u8> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = rcgen::CertificateParams::default();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name.push(rcgen::DnType::CommonName, cn);
        p.subject_alt_names = vec![rcgen::SanType::URI(
            "urn:clawker:container:abc".try_into().unwrap(),
        )];
        p.serialize_request(&key).unwrap().der().to_vec()
    }

    #[tokio::test]
    async fn an_unsolicited_csr_is_signed_staged_issued_and_promoted_on_done() {
        let f = fixture();
        let sink = RecordingSink::default();
        let (mux, mut peer) = pair();
        let mut r = rotator(&f, &sink, true);
        let old = f.leaf.thumbprint();
        let der = csr("clawker.web.dev");
        let task = {
            let mux = mux.clone();
            tokio::spawn(async move {
                let res = r
                    .on_csr(
                        &mux,
                        "renew-1",
                        &der,
                        None,
                        RotationReason::HalfLife,
                        Instant::now(),
                    )
                    .await;
                (res, r)
            })
        };
        let issued = peer.commands.recv().await.unwrap();
        assert_eq!(issued.command_id, "renew-1");
        let Some(command::Payload::CertIssued(ci)) = issued.payload else {
            panic!("{issued:?}")
        };
        assert!(ci.error.is_empty());
        // Staged, not yet promoted: the old leaf still matches.
        assert_eq!(
            f.store.lookup_by_container_id("abc").unwrap().thumbprint,
            old
        );
        peer.responses
            .send(resp(
                "renew-1",
                response::Payload::Done(pb::Done { final_exit_code: 0 }),
            ))
            .unwrap();
        let (res, r) = task.await.unwrap();
        let rotated = res.unwrap();
        assert_eq!(rotated.old, old);
        assert_eq!(rotated.rotations, 1);
        assert_eq!(r.current(), rotated.new);
        assert_eq!(
            f.store.lookup_by_container_id("abc").unwrap().thumbprint,
            rotated.new
        );
        let ev = &sink.of("agent.cert.rotated")[0];
        assert_eq!(ev["reason"], "half_life");
        assert_eq!(ev["old"], old.to_hex());
        assert_eq!(ev["rotations"], 1);
    }

    #[tokio::test]
    async fn refusals_answer_cert_issued_with_an_error_and_keep_the_leaf() {
        let f = fixture();
        let old = f.leaf.thumbprint();
        for (trusted, cn, want) in [
            (false, "clawker.web.dev", "the session is not trusted"),
            (true, "clawker.web.other", "CSR refused: CSR subject CN"),
        ] {
            let sink = RecordingSink::default();
            let (mux, mut peer) = pair();
            let mut r = rotator(&f, &sink, trusted);
            let e = r
                .on_csr(
                    &mux,
                    "renew-1",
                    &csr(cn),
                    None,
                    RotationReason::HalfLife,
                    Instant::now(),
                )
                .await
                .unwrap_err();
            assert!(e.to_string().starts_with(want), "{e}");
            let Some(command::Payload::CertIssued(ci)) =
                peer.commands.recv().await.unwrap().payload
            else {
                panic!()
            };
            assert!(
                ci.cert_pem.is_empty() && ci.error.starts_with(want),
                "{ci:?}"
            );
            assert_eq!(sink.of("agent.cert.rotation_failed").len(), 1);
            assert_eq!(
                f.store.lookup_by_container_id("abc").unwrap().thumbprint,
                old
            );
        }
    }

    #[tokio::test]
    async fn an_error_instead_of_done_leaves_the_row_on_the_old_leaf() {
        let f = fixture();
        let sink = RecordingSink::default();
        let (mux, mut peer) = pair();
        let mut r = rotator(&f, &sink, true);
        let der = csr("clawker.web.dev");
        let task = {
            let mux = mux.clone();
            tokio::spawn(async move {
                r.on_csr(
                    &mux,
                    "renew-1",
                    &der,
                    None,
                    RotationReason::HalfLife,
                    Instant::now(),
                )
                .await
            })
        };
        peer.commands.recv().await.unwrap();
        peer.responses
            .send(resp(
                "renew-1",
                response::Payload::Error(pb::Error {
                    code: ErrorCode::IoError as i32,
                    message: "persist: disk full".into(),
                    os_errno: 0,
                }),
            ))
            .unwrap();
        let e = task.await.unwrap().unwrap_err();
        assert!(e.to_string().contains("disk full"), "{e}");
        assert_eq!(
            f.store.lookup_by_container_id("abc").unwrap().thumbprint,
            f.leaf.thumbprint(),
            "never promoted"
        );
        assert!(sink.of("agent.cert.rotated").is_empty());
    }

    #[tokio::test]
    async fn an_old_clawkerd_refusing_renew_cert_is_unsupported_not_a_failure() {
        let f = fixture();
        let sink = RecordingSink::default();
        let (mux, mut peer) = pair();
        let r = rotator(&f, &sink, true);
        let hold_task = {
            let mux = mux.clone();
            tokio::spawn(async move { hold(r, &mux, Some(RotationReason::Expired)).await })
        };
        let renew = peer.commands.recv().await.unwrap();
        assert!(
            matches!(renew.payload, Some(command::Payload::RenewCert(ref rc)) if rc.reason == "expired")
        );
        peer.responses
            .send(resp(
                &renew.command_id,
                response::Payload::Error(pb::Error {
                    code: ErrorCode::InvalidRequest as i32,
                    message: "unsupported command".into(),
                    os_errno: 0,
                }),
            ))
            .unwrap();
        // No retry follows; the session is simply held.
        assert!(
            tokio::time::timeout(Duration::from_millis(300), peer.commands.recv())
                .await
                .is_err()
        );
        assert!(sink.of("agent.cert.rotation_failed").is_empty());
        drop(peer);
        assert_eq!(hold_task.await.unwrap(), StreamEnd::Eof);
    }

    #[tokio::test]
    async fn a_failed_request_is_retried_with_backoff_until_it_rotates() {
        let f = fixture();
        let sink = RecordingSink::default();
        let (mux, mut peer) = pair();
        let r = rotator(&f, &sink, true);
        let hold_task = {
            let mux = mux.clone();
            tokio::spawn(async move { hold(r, &mux, Some(RotationReason::Expired)).await })
        };
        // First attempt: clawkerd fails to make a CSR.
        let first = peer.commands.recv().await.unwrap();
        peer.responses
            .send(resp(
                &first.command_id,
                response::Payload::Error(pb::Error {
                    code: ErrorCode::IoError as i32,
                    message: "keygen".into(),
                    os_errno: 0,
                }),
            ))
            .unwrap();
        // Second attempt (after the backoff): CSR, Done.
        let second = peer.commands.recv().await.unwrap();
        assert_ne!(second.command_id, first.command_id);
        assert!(matches!(
            second.payload,
            Some(command::Payload::RenewCert(_))
        ));
        peer.responses
            .send(resp(
                &second.command_id,
                response::Payload::Csr(pb::CertSigningRequest {
                    csr_der: csr("clawker.web.dev").into(),
                    reason: "expired".into(),
                }),
            ))
            .unwrap();
        let issued = peer.commands.recv().await.unwrap();
        assert_eq!(issued.command_id, second.command_id);
        peer.responses
            .send(resp(
                &second.command_id,
                response::Payload::Done(pb::Done { final_exit_code: 0 }),
            ))
            .unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while sink.of("agent.cert.rotated").is_empty() {
            assert!(tokio::time::Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(sink.of("agent.cert.rotated")[0]["reason"], "expired");
        assert_eq!(sink.of("agent.cert.rotation_failed").len(), 1);
        drop(peer);
        assert_eq!(hold_task.await.unwrap(), StreamEnd::Eof);
    }
}
