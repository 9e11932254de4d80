//! Leaf renewal, clawkerd side (DESIGN §13; SPIRE's SVID rotation is the
//! model): a new P-256 key generated here — the private key never leaves
//! the container — a CSR sent over the CP's open session, the CP's signed
//! leaf checked, persisted, and put in use without dropping the session.
//!
//! Two triggers, one rotation at a time:
//! - [`Renewer::run`]: at half the current leaf's lifetime (or at once for
//!   a leaf already past it), on the newest open session, as an unsolicited
//!   `csr` response on a fresh id `renew-<n>`; failures retry with
//!   [`clawker_actors::Backoff`] (bounded by a quarter of the lifetime);
//! - `RenewCert` from the CP ([`Renewer::requested`]), answered on its id.
//!   If a rotation is already in flight, the request waits for it and
//!   answers `Done{0}` without a second CSR (the new leaf is in use).
//!
//! A rotation ends with exactly one terminal response on its id: `Done{0}`
//! once the new leaf is persisted and in use, else `Error` (the current leaf
//! stays in use, and so does the trust the CP gave it).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clawker_actors::Backoff;
use rcgen::{
    CertificateParams, DistinguishedName, DnType, KeyPair, PKCS_ECDSA_P256_SHA256, SanType,
};
use tokio::sync::{oneshot, watch};
use tokio_util::sync::CancellationToken;

use super::leaf::{self, CurrentLeaf, Leaf};
use super::pipeline::error_response;
use super::session::Outbound;

type WeakOutbound = tokio::sync::mpsc::WeakSender<Result<Response, tonic::Status>>;
use crate::proto::clawkerd::v1::{self as pb, ErrorCode, Response, response::Payload as Resp};
use crate::tls;

/// How long clawkerd waits for `CertIssued` after sending its CSR.
pub const ISSUE_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest CP error text kept in logs and the terminal `Error`.
const CP_TEXT_MAX: usize = 256;

/// Why one rotation failed. The current leaf stays in use.
#[derive(Debug, thiserror::Error)]
pub enum RenewError {
    #[error("build CSR: {0}")]
    Csr(#[from] rcgen::Error),
    #[error("session closed")]
    SessionClosed,
    #[error("no CertIssued within {0:?}")]
    Timeout(Duration),
    #[error("CP refused: {0}")]
    Refused(String),
    #[error("issued certificate unusable: {0}")]
    BadCert(String),
    #[error("{0}")]
    Persist(leaf::LeafError),
}

impl RenewError {
    fn code(&self) -> ErrorCode {
        match self {
            Self::Csr(_) | Self::Persist(_) | Self::SessionClosed => ErrorCode::IoError,
            Self::Timeout(_) => ErrorCode::Timeout,
            Self::Refused(_) | Self::BadCert(_) => ErrorCode::InvalidRequest,
        }
    }
}

/// Seconds from `now` until a leaf valid `[not_before, not_after]` is due
/// for renewal: half its lifetime; zero once that moment has passed.
pub fn due_in(now_unix: i64, not_before: i64, not_after: i64) -> Duration {
    let renew_at = not_before + (not_after - not_before) / 2;
    Duration::from_secs(renew_at.saturating_sub(now_unix).max(0) as u64)
}

/// The retry policy for a leaf of `lifetime`: from 1 s, capped at a quarter
/// of the lifetime (so a short leaf is retried before it expires) and at a
/// minute.
pub fn retry_policy(lifetime: Duration) -> Backoff {
    let cap = (lifetime / 4).clamp(Duration::from_secs(1), Duration::from_secs(60));
    Backoff::new(Duration::from_secs(1).min(cap), cap).full_jitter()
}

fn now_unix() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// The process-wide renewer; sessions attach to it and route `RenewCert`
/// and `CertIssued` to it.
pub struct Renewer {
    leaf: Arc<CurrentLeaf>,
    roots: Arc<rustls::RootCertStore>,
    state_dir: PathBuf,
    /// Open sessions, oldest first. Weak: the renewer must not keep a
    /// session's response stream open, nor count as one of its workers.
    sessions: Mutex<Vec<(u64, WeakOutbound)>>,
    attached: watch::Sender<u64>,
    /// Rotations waiting for their `CertIssued`, by command id.
    waiting: Mutex<HashMap<String, oneshot::Sender<pb::CertIssued>>>,
    one_at_a_time: tokio::sync::Mutex<()>,
    next_id: AtomicU64,
    next_session: AtomicU64,
}

/// A session attached to the renewer; detaches on drop.
pub struct Attached {
    renewer: Arc<Renewer>,
    key: u64,
}

impl Drop for Attached {
    fn drop(&mut self) {
        lock(&self.renewer.sessions).retain(|(k, _)| *k != self.key);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Renewer {
    pub fn new(
        leaf: Arc<CurrentLeaf>,
        ca_pem: &[u8],
        state_dir: PathBuf,
    ) -> Result<Arc<Self>, tls::TlsError> {
        Ok(Arc::new(Self {
            leaf,
            roots: Arc::new(tls::root_store("ca.pem", ca_pem)?),
            state_dir,
            sessions: Mutex::new(Vec::new()),
            attached: watch::Sender::new(0),
            waiting: Mutex::new(HashMap::new()),
            one_at_a_time: tokio::sync::Mutex::new(()),
            next_id: AtomicU64::new(1),
            next_session: AtomicU64::new(1),
        }))
    }

    pub fn leaf(&self) -> &Arc<CurrentLeaf> {
        &self.leaf
    }

    /// Makes a session available for unsolicited CSRs.
    pub fn attach(self: &Arc<Self>, out: &Outbound) -> Attached {
        let key = self.next_session.fetch_add(1, Ordering::Relaxed);
        lock(&self.sessions).push((key, out.downgrade()));
        self.attached.send_modify(|n| *n += 1);
        Attached {
            renewer: self.clone(),
            key,
        }
    }

    fn newest_session(&self) -> Option<Outbound> {
        lock(&self.sessions)
            .iter()
            .rev()
            .filter_map(|(_, o)| o.upgrade())
            .find(|o| !o.is_closed())
    }

    /// Hands `CertIssued` to the rotation waiting on `id`; `false` if none is.
    pub fn deliver(&self, id: &str, issued: pb::CertIssued) -> bool {
        match lock(&self.waiting).remove(id) {
            Some(tx) => tx.send(issued).is_ok(),
            None => false,
        }
    }

    /// `RenewCert` from the CP: rotate (or wait for the rotation in flight)
    /// and send the terminal response on `id`. `seen` is the leaf
    /// generation when the request was *received* (read in the receive
    /// loop, so a rotation completed after it coalesces with this request).
    pub async fn requested(&self, id: String, cp_reason: &str, out: Outbound, seen: u64) {
        let generation = seen;
        let _one = self.one_at_a_time.lock().await;
        if self.leaf.generation() != generation {
            tracing::info!(event = "leaf_renew_coalesced", command_id = %id, "a rotation completed while the request waited");
            let _ = out.send(Ok(done(&id))).await;
            return;
        }
        let reason = match cp_reason {
            "expired" | "requested" | "half_life" => cp_reason,
            _ => "requested",
        };
        let _ = self.rotate_and_answer(&id, reason, &out).await;
    }

    /// The half-life schedule, until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut changed = self.leaf.subscribe();
        let mut attached = self.attached.subscribe();
        // The retry position, for the leaf generation it was made for.
        let mut retry: Option<(u64, clawker_actors::Retry)> = None;
        loop {
            changed.borrow_and_update();
            let current = self.leaf.load();
            let generation = self.leaf.generation();
            let lifetime =
                Duration::from_secs((current.not_after - current.not_before).max(1) as u64);
            if retry.as_ref().is_none_or(|(g, _)| *g != generation) {
                retry = Some((generation, retry_policy(lifetime).retry()));
            }
            let Some((_, retry)) = retry.as_mut() else {
                continue;
            };
            let wait = due_in(now_unix(), current.not_before, current.not_after);
            tracing::debug!(
                event = "leaf_renew_scheduled",
                in_secs = wait.as_secs(),
                not_after = current.not_after
            );
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = changed.changed() => continue,
                _ = shutdown.cancelled() => return,
            }
            // Due: wait for the CP to be connected.
            let out = loop {
                attached.borrow_and_update();
                if let Some(out) = self.newest_session() {
                    break out;
                }
                tokio::select! {
                    _ = attached.changed() => {}
                    _ = shutdown.cancelled() => return,
                }
            };
            let one = self.one_at_a_time.lock().await;
            if self.leaf.generation() != generation {
                continue; // the CP asked meanwhile; reschedule on the new leaf
            }
            let id = format!("renew-{}", self.next_id.fetch_add(1, Ordering::Relaxed));
            let reason = if now_unix() > current.not_after {
                "expired"
            } else {
                "half_life"
            };
            let result = self.rotate_and_answer(&id, reason, &out).await;
            drop(one);
            match result {
                Ok(()) => retry.reset(),
                Err(_) => {
                    let delay = retry.next_delay();
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = shutdown.cancelled() => return,
                    }
                }
            }
        }
    }

    async fn rotate_and_answer(
        &self,
        id: &str,
        reason: &str,
        out: &Outbound,
    ) -> Result<(), RenewError> {
        let started = std::time::Instant::now();
        let result = self.rotate(id, reason, out).await;
        match &result {
            Ok(()) => {
                let l = self.leaf.load();
                tracing::info!(
                    event = "leaf_rotated",
                    command_id = %id,
                    reason,
                    thumbprint = %l.thumbprint(),
                    not_after = l.not_after,
                    duration_ms = started.elapsed().as_secs_f64() * 1000.0,
                    "new leaf in use"
                );
                let _ = out.send(Ok(done(id))).await;
            }
            Err(RenewError::SessionClosed) => {
                tracing::warn!(event = "leaf_rotation_failed", command_id = %id, reason, error = "session closed");
            }
            Err(e) => {
                tracing::warn!(event = "leaf_rotation_failed", command_id = %id, reason, error = %e, "keeping the current leaf");
                let _ = out
                    .send(Ok(error_response(id, e.code(), e.to_string())))
                    .await;
            }
        }
        result
    }

    async fn rotate(&self, id: &str, reason: &str, out: &Outbound) -> Result<(), RenewError> {
        let current = self.leaf.load();
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "clawker");
        dn.push(DnType::CommonName, current.cn.as_str());
        params.distinguished_name = dn;
        for uri in &current.uris {
            params
                .subject_alt_names
                .push(SanType::URI(uri.as_str().try_into()?));
        }
        let csr = params.serialize_request(&key)?;

        let (tx, rx) = oneshot::channel();
        lock(&self.waiting).insert(id.to_owned(), tx);
        struct Unwait<'a>(&'a Renewer, &'a str);
        impl Drop for Unwait<'_> {
            fn drop(&mut self) {
                lock(&self.0.waiting).remove(self.1);
            }
        }
        let _unwait = Unwait(self, id);
        let request = Response {
            command_id: id.to_owned(),
            payload: Some(Resp::Csr(pb::CertSigningRequest {
                csr_der: csr.der().to_vec().into(),
                reason: reason.to_owned(),
            })),
        };
        out.send(Ok(request))
            .await
            .map_err(|_| RenewError::SessionClosed)?;
        let issued = tokio::select! {
            r = tokio::time::timeout(ISSUE_TIMEOUT, rx) => match r {
                Err(_) => return Err(RenewError::Timeout(ISSUE_TIMEOUT)),
                Ok(Err(_)) => return Err(RenewError::SessionClosed),
                Ok(Ok(issued)) => issued,
            },
            _ = out.closed() => return Err(RenewError::SessionClosed),
        };
        if !issued.error.is_empty() {
            return Err(RenewError::Refused(clip(&issued.error, CP_TEXT_MAX)));
        }
        let new = self.check_issued(&current, &issued.cert_pem, &key)?;
        let state_dir = self.state_dir.clone();
        let new =
            tokio::task::spawn_blocking(move || leaf::persist(&state_dir, &new).map(|()| new))
                .await
                .map_err(|e| RenewError::BadCert(format!("persist task: {e}")))?
                .map_err(RenewError::Persist)?;
        self.leaf.replace(new);
        Ok(())
    }

    /// The issued leaf must be for our new key, name what the current leaf
    /// names, chain to our CA and be valid now, and allow both TLS roles.
    fn check_issued(
        &self,
        current: &Leaf,
        cert_pem: &str,
        key: &KeyPair,
    ) -> Result<Leaf, RenewError> {
        let bad = |s: &str| RenewError::BadCert(s.to_owned());
        if cert_pem.len() > 16 * 1024 {
            return Err(bad("certificate PEM too large"));
        }
        let new = Leaf::from_pem(cert_pem.as_bytes(), key.serialize_pem().as_bytes())
            .map_err(|e| RenewError::BadCert(e.to_string()))?;
        if new.cn != current.cn || new.uris != current.uris {
            return Err(bad("names another identity"));
        }
        tls::chains_at(
            &new.cert_der,
            &self.roots,
            rustls::pki_types::UnixTime::now(),
        )
        .map_err(|e| RenewError::BadCert(format!("chain: {e}")))?;
        let (_, cert) = x509_parser::parse_x509_certificate(&new.cert_der)
            .map_err(|_| bad("does not parse"))?;
        let both = matches!(cert.extended_key_usage(), Ok(Some(e)) if e.value.client_auth && e.value.server_auth);
        if !both {
            return Err(bad("missing the ClientAuth or ServerAuth EKU"));
        }
        Ok(new)
    }
}

/// At most `max` bytes of `s`, cut on a character boundary.
fn clip(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

fn done(id: &str) -> Response {
    Response {
        command_id: id.to_owned(),
        payload: Some(Resp::Done(pb::Done { final_exit_code: 0 })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_is_due_at_half_the_lifetime() {
        // A 10 s leaf backdated 1 s: due 4.5 s after issue (floored).
        let (nb, na) = (999, 1_010);
        assert_eq!(due_in(999, nb, na), Duration::from_secs(5));
        assert_eq!(due_in(1_003, nb, na), Duration::from_secs(1));
        assert_eq!(due_in(1_004, nb, na), Duration::ZERO);
        assert_eq!(due_in(1_020, nb, na), Duration::ZERO, "expired: at once");
        // 24 h + 5 min backdate: about 11 h 57 min after issue.
        let issued = 1_800_000_000;
        assert_eq!(
            due_in(issued, issued - 300, issued + 86_400),
            Duration::from_secs(43_050)
        );
    }

    #[test]
    fn retries_stay_well_inside_short_lifetimes() {
        let b = retry_policy(Duration::from_secs(11));
        assert_eq!(b.max, Duration::from_millis(2750));
        assert!(b.jitter);
        let b = retry_policy(Duration::from_secs(86_400));
        assert_eq!(
            (b.initial, b.max),
            (Duration::from_secs(1), Duration::from_secs(60))
        );
        let b = retry_policy(Duration::from_secs(2));
        assert_eq!(
            (b.initial, b.max),
            (Duration::from_secs(1), Duration::from_secs(1))
        );
    }
}
