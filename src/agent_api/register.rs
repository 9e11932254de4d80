//! `AgentService.Register`: the one-time binding of a container's leaf
//! certificate to its registry row (reference `identity.md` §7).
//!
//! The container id comes only from the certificate's URI SAN, never from
//! the request. Every identity failure answers the same
//! `PermissionDenied "register: identity check failed"` so a caller cannot
//! learn which check it failed; the log line (`event=…`) carries the
//! classification for the operator.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};

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

    /// Step 9 with a row present: same thumbprint is an idempotent retry,
    /// a different one is a replay of the container id with another cert.
    fn judge_existing(
        &self,
        existing: &Entry,
        thumbprint: &Thumbprint,
        container_id: &str,
    ) -> Result<Response<Welcome>, Status> {
        if existing.thumbprint.ct_eq(thumbprint) {
            tracing::info!(
                event = "agent_register_idempotent",
                container_id,
                "register retry for an already registered container"
            );
            Ok(Response::new(Welcome {}))
        } else {
            tracing::warn!(
                event = "agent_register_thumbprint_replay",
                container_id,
                "container already registered with a different certificate"
            );
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
                tracing::warn!(event = "agent_register_no_peer", %error, "peer cert/IP unavailable");
                return Err(denied());
            }
        };

        // 4: the CN must be the canonical CN of the claimed identity; this
        // precedes the SAN and Docker so a CN mismatch never reaches Docker.
        let expected_cn = identity::canonical_cn(&project, &agent);
        if !identity::ct_str_eq(&leaf.cn, &expected_cn) {
            tracing::warn!(
                event = "agent_register_cn_mismatch",
                peer_cn = %leaf.cn,
                expected_cn = %expected_cn,
                "peer CN does not match the claimed identity"
            );
            return Err(denied());
        }

        // 5: the container the certificate is bound to.
        let Some(container_id) = leaf.container_id.clone() else {
            tracing::warn!(
                event = "agent_register_no_container_san",
                "peer certificate has no container URI SAN"
            );
            return Err(denied());
        };

        // 6: the container must exist.
        let facts = match self.inspect(&container_id).await {
            Ok(f) => f,
            Err(error) => {
                tracing::warn!(
                    event = "agent_register_container_not_found",
                    %error,
                    container_id = %container_id,
                    "container inspect failed"
                );
                return Err(denied());
            }
        };

        // 7: Docker's labels must name the same identity (exact equality;
        // an absent label reads as "").
        if facts.agent_label() != agent.as_str() || facts.project_label() != project.as_str() {
            tracing::warn!(
                event = "agent_register_label_mismatch",
                container_id = %container_id,
                "container labels do not match the claimed identity"
            );
            return Err(denied());
        }

        // 8: the call must come from the container's clawker-net address
        // (IPv4-in-IPv6 unmapped on both sides).
        let ip_ok = facts
            .ip
            .is_some_and(|ip| ip.to_canonical() == peer_ip.to_canonical());
        if !ip_ok {
            tracing::warn!(
                event = "agent_register_peer_ip_mismatch",
                container_id = %container_id,
                peer_ip = %peer_ip,
                "peer address is not the container's clawker-net address"
            );
            return Err(denied());
        }

        // 9: an existing row decides between idempotent retry and replay.
        match self.registry.lookup_by_container_id(&container_id) {
            Ok(existing) => return self.judge_existing(&existing, &leaf.thumbprint, &container_id),
            Err(RegistryError::UnknownAgent) => {}
            Err(error) => {
                tracing::warn!(
                    event = "agent_register_lookup_error",
                    %error,
                    container_id = %container_id,
                    "registry lookup failed"
                );
                return Err(Status::internal("register: lookup failed"));
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
                    return self.judge_existing(&winner, &leaf.thumbprint, &container_id);
                }
                tracing::error!(
                    event = "agent_register_add_failed",
                    error = "duplicate container id but no visible row",
                    container_id = %container_id,
                    "registry add failed"
                );
                return Err(Status::internal("register: persist failed"));
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
                return Err(Status::internal("register: persist failed"));
            }
        }

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
