//! `AgentService.Register`: the one-time binding of a container's leaf
//! certificate to its registry row (reference `identity.md` §7).
//!
//! The container id comes only from the certificate's URI SAN, never from
//! the request. Every identity failure answers the same
//! `PermissionDenied "register: identity check failed"` so a caller cannot
//! learn which check it failed; the log line (`event=…`) carries the
//! classification for the operator.
//!
//! A fault of the infrastructure is not an identity failure: a container
//! runtime that times out or errors, or a registry that cannot read or
//! persist, answers `UNAVAILABLE` (retryable), never `PermissionDenied`
//! (the reference answered a Docker inspect timeout with PermissionDenied,
//! which together with its spent assertion bricked the agent). Only "no such
//! container" is a definite answer and stays an identity failure.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};

use super::auth::Introspection;
use super::peer::{self, PeerLeaf};
use crate::identity::{self, AgentName, ProjectSlug, Thumbprint};
use crate::proto::agent::v1::agent_service_server::AgentService;
use crate::proto::agent::v1::{RegisterRequest, Welcome};
use crate::registry::{Entry, NewEntry, Registry, RegistryError};
use crate::runtime::{ContainerFacts, Inspect, RuntimeError};

/// How long Register waits for the Docker inspect.
pub const INSPECT_TIMEOUT: Duration = Duration::from_secs(5);

const IDENTITY_FAILED: &str = "register: identity check failed";

fn denied() -> Status {
    Status::permission_denied(IDENTITY_FAILED)
}

/// What a failed container inspect means for the caller: a container that
/// does not exist is an identity failure; anything else (timeout, engine
/// down, API error) is the runtime's fault and retryable.
pub fn inspect_failure_status(e: &RuntimeError) -> Status {
    match e {
        RuntimeError::NotFound(_) => denied(),
        // Inspect never asks for a running container or netfilter; should a
        // runtime say so anyway, it is its fault, not the agent's identity.
        RuntimeError::Timeout { .. }
        | RuntimeError::Api(_)
        | RuntimeError::NotRunning(_)
        | RuntimeError::Unsupported(_)
        | RuntimeError::Netfilter(_) => {
            Status::unavailable("register: container runtime unavailable")
        }
    }
}

/// What a failed registry write means: a thumbprint already bound to
/// another container is an identity failure; a storage or actor fault is
/// retryable. (A duplicate container id is judged against the winner's row
/// by the caller, before this is asked.)
pub fn persist_failure_status(e: &RegistryError) -> Status {
    match e {
        RegistryError::DuplicateThumbprint(_) => denied(),
        _ => Status::unavailable("register: persist failed"),
    }
}

/// The Register handler (the only AgentService method at v0.8.0).
pub struct RegisterService {
    registry: Registry,
    inspector: Arc<dyn Inspect>,
    inspect_timeout: Duration,
}

impl RegisterService {
    pub fn new(registry: Registry, inspector: Arc<dyn Inspect>) -> Self {
        Self {
            registry,
            inspector,
            inspect_timeout: INSPECT_TIMEOUT,
        }
    }

    pub fn with_inspect_timeout(mut self, timeout: Duration) -> Self {
        self.inspect_timeout = timeout;
        self
    }

    /// Inspects on a detached task: the caller hanging up (or its deadline)
    /// must not turn into a false "container not found"; our own timeout
    /// bounds the wait instead.
    async fn inspect(&self, container_id: &str) -> Result<ContainerFacts, RuntimeError> {
        let inspector = self.inspector.clone();
        let id = container_id.to_owned();
        let timeout = self.inspect_timeout;
        let task = tokio::spawn(async move {
            match tokio::time::timeout(timeout, inspector.inspect(&id)).await {
                Ok(res) => res,
                Err(_) => Err(RuntimeError::Timeout {
                    what: "container inspect",
                    after: timeout,
                }),
            }
        });
        match task.await {
            Ok(res) => res,
            Err(e) => Err(RuntimeError::Api(format!("inspect task failed: {e}"))),
        }
    }

    /// The token's grant is spent for good once a Register succeeded with
    /// it: its assertion can no longer be exchanged. A failure here only
    /// leaves the assertion exchangeable until it expires (harmless: a new
    /// token still needs this leaf to register), so it is logged, not
    /// returned — the row is committed and the caller must see success.
    async fn redeem(&self, jti: &str, container_id: &str) {
        if jti.is_empty() {
            return;
        }
        if let Err(error) = self.registry.redeem_grant(jti, unix_now()).await {
            tracing::warn!(
                event = "agent_register_redeem_failed",
                %error,
                container_id,
                "could not mark the token grant redeemed"
            );
        }
    }

    /// Step 9 with a row present: same thumbprint is an idempotent retry,
    /// a different one is a replay of the container id with another cert.
    fn judge_existing(
        &self,
        existing: &Entry,
        thumbprint: &Thumbprint,
        container_id: &str,
    ) -> Result<Response<Welcome>, Status> {
        if existing.thumbprint.ct_eq(thumbprint) {
            // A retry is legitimate but repeatable at will: rate-limited.
            if crate::log_limit::admit("agent_register_idempotent") {
                tracing::info!(
                    event = "agent_register_idempotent",
                    container_id,
                    "register retry for an already registered container"
                );
            }
            Ok(Response::new(Welcome {}))
        } else {
            if crate::log_limit::admit("agent_register_refused") {
                tracing::warn!(
                    event = "agent_register_thumbprint_replay",
                    container_id,
                    "container already registered with a different certificate"
                );
            }
            Err(denied())
        }
    }

    async fn register_checked(
        &self,
        request: Request<RegisterRequest>,
    ) -> Result<Response<Welcome>, Status> {
        // Check 0 (nil request) cannot happen: prost always decodes a message.
        let req = request.get_ref();
        // 1–2: validate the claimed identity before touching peer, Docker
        // or the registry.
        let project = ProjectSlug::new(&req.project)
            .map_err(|_| Status::invalid_argument("register: invalid project"))?;
        let agent = AgentName::new(&req.agent_name)
            .map_err(|_| Status::invalid_argument("register: invalid agent name"))?;

        // 3: the live peer: verified leaf and an IP address.
        let peer = peer::peer_leaf(request.extensions())
            .and_then(|leaf| peer::peer_addr(request.extensions()).map(|addr| (leaf, addr.ip())));
        let (leaf, peer_ip): (PeerLeaf, IpAddr) = match peer {
            Ok(p) => p,
            Err(error) => {
                if crate::log_limit::admit("agent_register_refused") {
                    tracing::warn!(event = "agent_register_no_peer", %error, "peer cert/IP unavailable");
                }
                return Err(denied());
            }
        };

        // 4: the CN must be the canonical CN of the claimed identity; this
        // precedes the SAN and Docker so a CN mismatch never reaches Docker.
        let expected_cn = identity::canonical_cn(&project, &agent);
        if !identity::ct_str_eq(&leaf.cn, &expected_cn) {
            if crate::log_limit::admit("agent_register_refused") {
                tracing::warn!(
                    event = "agent_register_cn_mismatch",
                    peer_cn = %leaf.cn,
                    expected_cn = %expected_cn,
                    "peer CN does not match the claimed identity"
                );
            }
            return Err(denied());
        }

        // 5: the container the certificate is bound to.
        let Some(container_id) = leaf.container_id.clone() else {
            if crate::log_limit::admit("agent_register_refused") {
                tracing::warn!(
                    event = "agent_register_no_container_san",
                    "peer certificate has no container URI SAN"
                );
            }
            return Err(denied());
        };

        // 6: the container must exist.
        let facts = match self.inspect(&container_id).await {
            Ok(f) => f,
            Err(error) => {
                let event = if error.is_transient() {
                    "agent_register_runtime_unavailable"
                } else {
                    "agent_register_container_not_found"
                };
                if crate::log_limit::admit("agent_register_refused") {
                    tracing::warn!(
                        event,
                        %error,
                        container_id = %container_id,
                        "container inspect failed"
                    );
                }
                return Err(inspect_failure_status(&error));
            }
        };

        // 7: Docker's labels must name the same identity (exact equality;
        // an absent label reads as "").
        if facts.agent_label() != agent.as_str() || facts.project_label() != project.as_str() {
            if crate::log_limit::admit("agent_register_refused") {
                tracing::warn!(
                    event = "agent_register_label_mismatch",
                    container_id = %container_id,
                    "container labels do not match the claimed identity"
                );
            }
            return Err(denied());
        }

        // 8: the call must come from the container's clawker-net address
        // (IPv4-in-IPv6 unmapped on both sides).
        let ip_ok = facts
            .ip
            .is_some_and(|ip| ip.to_canonical() == peer_ip.to_canonical());
        if !ip_ok {
            if crate::log_limit::admit("agent_register_refused") {
                tracing::warn!(
                    event = "agent_register_peer_ip_mismatch",
                    container_id = %container_id,
                    peer_ip = %peer_ip,
                    "peer address is not the container's clawker-net address"
                );
            }
            return Err(denied());
        }

        // 9: an existing row decides between idempotent retry and replay.
        let grant = request
            .extensions()
            .get::<Introspection>()
            .map(|i| i.jti.clone())
            .unwrap_or_default();
        match self.registry.lookup_by_container_id(&container_id) {
            Ok(existing) => {
                let r = self.judge_existing(&existing, &leaf.thumbprint, &container_id);
                if r.is_ok() {
                    self.redeem(&grant, &container_id).await;
                }
                return r;
            }
            Err(RegistryError::UnknownAgent) => {}
            Err(error) => {
                if crate::log_limit::admit("agent_register_refused") {
                    tracing::warn!(
                        event = "agent_register_lookup_error",
                        %error,
                        container_id = %container_id,
                        "registry lookup failed"
                    );
                }
                return Err(Status::unavailable("register: lookup failed"));
            }
        }

        // 10: persist. The actor serializes Adds and the store refuses a
        // second row for a container, so of two concurrent first-time
        // Registers exactly one inserts. The loser then sees the winner's
        // row and is judged like a retry: same cert → success, different
        // cert → replay. (The reference returns Internal to the loser.)
        let now = unix_now();
        let added = self
            .registry
            .add(NewEntry {
                agent_name: agent.as_str().to_owned(),
                project: project.as_str().to_owned(),
                container_id: container_id.clone(),
                thumbprint: leaf.thumbprint,
                registered_at_unix: now,
                last_seen_unix: now,
            })
            .await;
        match added {
            Ok(_) => {}
            Err(RegistryError::DuplicateContainer(_)) => {
                if let Ok(winner) = self.registry.lookup_by_container_id(&container_id) {
                    let r = self.judge_existing(&winner, &leaf.thumbprint, &container_id);
                    if r.is_ok() {
                        self.redeem(&grant, &container_id).await;
                    }
                    return r;
                }
                tracing::error!(
                    event = "agent_register_add_failed",
                    error = "duplicate container id but no visible row",
                    container_id = %container_id,
                    "registry add failed"
                );
                return Err(Status::unavailable("register: persist failed"));
            }
            Err(error) if error.is_retryable() => {
                // A full disk or an I/O error: nothing was written and the
                // registry reopens its file before the next write, so the
                // agent's retry can succeed — say so (UNAVAILABLE is the
                // retryable gRPC code), rather than a final INTERNAL.
                tracing::error!(
                    event = "agent_register_add_failed",
                    %error,
                    container_id = %container_id,
                    retryable = true,
                    "registry add failed"
                );
                return Err(Status::unavailable(
                    "register: the registry cannot persist right now (storage); retry later",
                ));
            }
            Err(error) => {
                tracing::error!(
                    event = "agent_register_add_failed",
                    %error,
                    container_id = %container_id,
                    "registry add failed"
                );
                return Err(persist_failure_status(&error));
            }
        }
        self.redeem(&grant, &container_id).await;

        // 11.
        tracing::info!(
            event = "agent_registered",
            container_id = %container_id,
            agent = %agent.as_str(),
            project = %project.as_str(),
            "agent registered (CP-driven)"
        );
        Ok(Response::new(Welcome {}))
    }
}

#[tonic::async_trait]
impl AgentService for RegisterService {
    async fn register(
        &self,
        request: Request<RegisterRequest>,
    ) -> Result<Response<Welcome>, Status> {
        self.register_checked(request).await
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtime_faults_are_retryable_and_a_missing_container_is_an_identity_failure() {
        let s = inspect_failure_status(&RuntimeError::Timeout {
            what: "container inspect",
            after: Duration::from_secs(5),
        });
        assert_eq!(s.code(), tonic::Code::Unavailable);
        assert_eq!(s.message(), "register: container runtime unavailable");
        let s = inspect_failure_status(&RuntimeError::Api("engine down".into()));
        assert_eq!(s.code(), tonic::Code::Unavailable);
        let s = inspect_failure_status(&RuntimeError::NotFound("c1".into()));
        assert_eq!(
            (s.code(), s.message()),
            (tonic::Code::PermissionDenied, IDENTITY_FAILED)
        );
    }

    #[test]
    fn registry_faults_are_retryable_and_a_bound_thumbprint_is_an_identity_failure() {
        for e in [
            RegistryError::Unavailable("actor gone".into()),
            RegistryError::Corrupt {
                key: "k".into(),
                detail: "d".into(),
            },
        ] {
            let s = persist_failure_status(&e);
            assert_eq!(
                (s.code(), s.message()),
                (tonic::Code::Unavailable, "register: persist failed"),
                "{e}"
            );
        }
        let s = persist_failure_status(&RegistryError::DuplicateThumbprint("ab".into()));
        assert_eq!(
            (s.code(), s.message()),
            (tonic::Code::PermissionDenied, IDENTITY_FAILED)
        );
    }
}
