//! The AdminService handlers.
//!
//! Each RPC reads through one narrow seam, so the service knows nothing of
//! how the registry, bus or supervisor are hosted:
//! - `ListAgents` → [`AgentDirectory::snapshot`] (reference `identity.md`
//!   §9.5: re-sorted by (project, agent), thumbprint lowercase hex, times in
//!   Unix seconds; never fails — a directory that cannot be read yields an
//!   empty list and an error log);
//! - `GetWorldview` → [`Bus::snapshot`] as JSON;
//! - `WatchEvents` → a fresh [`Bus::subscribe_all`] per call, filtered by
//!   name prefix (see [`EventStream`] for what happens to slow clients and
//!   when the client goes away);
//! - `GetSupervisionTree` → [`TreeSource::tree`], as JSON plus the
//!   indented text rendering;
//! - `Exec`, `CopyFrom`, `CopyTo`, `Logs` → an agent's live session
//!   ([`LiveSessions`]), gated and audited ([`super::access`]), relayed in
//!   [`super::exec`] and [`super::transfer`].
//! - `ReleaseAgent`, `UnlockAgent` → [`Containment::lift`] (the containment
//!   core the policy actor also runs its ladders on, so a lift waits for a
//!   ladder running on the same container), publishing on the bus.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use clawker_actors::{AuditSubscription, SupervisorError, SupervisorHandle, TreeNode};
use futures::future::BoxFuture;
use futures::{Future, Stream};
use time::OffsetDateTime;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::{Request, Response, Status};

use super::access::LiveSessions;
use super::exec::ExecStream;
use super::transfer::{CopyFromStream, CopyToStream, LogsStream};
use crate::events::Bus;
use crate::identity::{self, AgentName, ProjectSlug};
use crate::policy::containment::{Containment, Lift, LiftError};
use crate::proto::admin::v1 as pb;
use crate::proto::admin::v1::admin_service_server::{AdminService, AdminServiceServer};
use crate::registry::{Entry, RegistryStore};

/// Read access to the identity registry's rows, for `ListAgents`.
///
/// A seam rather than a concrete type: today the [`RegistryStore`] itself,
/// later the registry actor's lock-free reader. `snapshot` must not fail:
/// an implementation logs read errors and returns what it has (or nothing).
/// It may block briefly (a redb read transaction); the service calls it on
/// a blocking thread.
pub trait AgentDirectory: Send + Sync + 'static {
    fn snapshot(&self) -> Vec<Entry>;
}

impl AgentDirectory for RegistryStore {
    fn snapshot(&self) -> Vec<Entry> {
        match RegistryStore::snapshot(self) {
            Ok(rows) => rows,
            Err(e) => {
                tracing::error!(
                    event = "admin_list_agents_failed",
                    error = %e,
                    "registry snapshot failed; ListAgents returns an empty list"
                );
                Vec::new()
            }
        }
    }
}

/// Where `GetSupervisionTree` gets the tree from: the root supervisor in
/// the daemon ([`SupervisorHandle`] implements it), anything in tests. An
/// error (the supervisor stopped) is answered `UNAVAILABLE` with its text.
pub trait TreeSource: Send + Sync + 'static {
    fn tree(&self) -> BoxFuture<'_, Result<TreeNode, SupervisorError>>;
}

impl AgentDirectory for crate::registry::RegistryReader {
    fn snapshot(&self) -> Vec<Entry> {
        crate::registry::RegistryReader::snapshot(self)
    }
}

impl TreeSource for SupervisorHandle {
    fn tree(&self) -> BoxFuture<'_, Result<TreeNode, SupervisorError>> {
        Box::pin(SupervisorHandle::tree(self))
    }
}

/// The AdminService implementation. Cheap to clone.
#[derive(Clone)]
pub struct AdminApi {
    agents: Arc<dyn AgentDirectory>,
    bus: Bus,
    tree: Arc<dyn TreeSource>,
    /// Release and unlock act through it; `None` answers UNIMPLEMENTED.
    containment: Option<Arc<Containment>>,
    /// Ends every open `WatchEvents` stream when cancelled. tonic's
    /// graceful shutdown waits for in-flight streams, and an event stream
    /// never finishes on its own, so without this a shutdown would hang.
    stop_streams: CancellationToken,
    /// The agents' sessions, for the operator RPCs (none: they answer
    /// UNAVAILABLE).
    sessions: Option<Arc<dyn LiveSessions>>,
    /// Numbers operator command ids (unique per CP process; the session
    /// only needs them unique among its own in-flight commands).
    seq: Arc<AtomicU64>,
}

impl std::fmt::Debug for AdminApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminApi").finish_non_exhaustive()
    }
}

impl AdminApi {
    pub fn new(agents: Arc<dyn AgentDirectory>, bus: Bus, tree: Arc<dyn TreeSource>) -> Self {
        Self {
            agents,
            bus,
            tree,
            containment: None,
            stop_streams: CancellationToken::new(),
            sessions: None,
            seq: Arc::default(),
        }
    }

    /// Gives the operator RPCs (`Exec`, `CopyFrom`, `CopyTo`, `Logs`) the
    /// agents' sessions.
    pub fn with_sessions(mut self, sessions: Arc<dyn LiveSessions>) -> Self {
        self.sessions = Some(sessions);
        self
    }

    pub(super) fn bus(&self) -> &Bus {
        &self.bus
    }

    pub(super) fn sessions(&self) -> Option<&Arc<dyn LiveSessions>> {
        self.sessions.as_ref()
    }

    /// `<kind>-<target, cut>-<n>`: readable in clawkerd's logs.
    pub(super) fn next_exec_id(&self, kind: &str, target: &str) -> String {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let t: String = target
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
            .take(24)
            .collect();
        format!("{kind}-{t}-{n}")
    }

    /// Enables `ReleaseAgent` and `UnlockAgent`.
    pub fn with_containment(mut self, core: Arc<Containment>) -> Self {
        self.containment = Some(core);
        self
    }

    /// Shared body of ReleaseAgent and UnlockAgent.
    async fn lift(
        &self,
        agent: &str,
        project: &str,
        lift: Lift,
    ) -> Result<(String, String, String), Status> {
        let Some(core) = &self.containment else {
            return Err(Status::unimplemented(
                "containment is not running in this control plane",
            ));
        };
        let agent = AgentName::new(agent).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let project =
            ProjectSlug::new(project).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let name = identity::canonical_cn(&project, &agent);
        match core.lift(&name, lift, &self.bus).await {
            Ok(ev) => Ok((
                ev.agent.container_id,
                ev.outcome.as_str().to_owned(),
                ev.detail,
            )),
            Err(e @ LiftError::NotFound(_)) => Err(Status::not_found(e.to_string())),
            Err(e @ (LiftError::Untrusted(_) | LiftError::NoSession(_))) => {
                Err(Status::failed_precondition(e.to_string()))
            }
            Err(e @ LiftError::Runtime { .. }) => Err(Status::unavailable(e.to_string())),
        }
    }

    /// Open `WatchEvents` streams end when `token` is cancelled
    /// ([`serve_admin_api`](super::serve_admin_api) passes its shutdown
    /// token).
    pub fn with_stream_shutdown(mut self, token: CancellationToken) -> Self {
        self.stop_streams = token;
        self
    }

    /// The tonic service wrapping this implementation.
    pub fn into_server(self) -> AdminServiceServer<Self> {
        AdminServiceServer::new(self)
    }
}

/// `Entry` → wire `Agent`, sorted by (project, agent name) (§9.5).
pub fn list_agents_result(mut rows: Vec<Entry>) -> pb::ListAgentsResult {
    rows.sort_by(|a, b| {
        (a.project.as_str(), a.agent_name.as_str())
            .cmp(&(b.project.as_str(), b.agent_name.as_str()))
    });
    pb::ListAgentsResult {
        agents: rows
            .into_iter()
            .map(|e| pb::Agent {
                agent_name: e.agent_name,
                container_id: e.container_id,
                cert_thumbprint: e.thumbprint.to_hex(),
                registered_at_unix: e.registered_at_unix,
                last_seen_unix: e.last_seen_unix,
                project: e.project,
            })
            .collect(),
    }
}

#[tonic::async_trait]
impl AdminService for AdminApi {
    async fn list_agents(
        &self,
        _req: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResult>, Status> {
        let agents = self.agents.clone();
        // The directory may block on disk; keep it off the runtime threads.
        let rows = tokio::task::spawn_blocking(move || agents.snapshot())
            .await
            .unwrap_or_else(|e| {
                tracing::error!(event = "admin_list_agents_failed", error = %e);
                Vec::new()
            });
        Ok(Response::new(list_agents_result(rows)))
    }

    async fn get_worldview(
        &self,
        _req: Request<pb::GetWorldviewRequest>,
    ) -> Result<Response<pb::GetWorldviewResult>, Status> {
        let view = self
            .bus
            .snapshot()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let json = serde_json::to_string(&view)
            .map_err(|e| Status::internal(format!("serialising the worldview: {e}")))?;
        Ok(Response::new(pb::GetWorldviewResult { json }))
    }

    type WatchEventsStream = EventStream;

    async fn watch_events(
        &self,
        req: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let sub = self
            .bus
            .subscribe_all()
            .map_err(|e| Status::unavailable(e.to_string()))?;
        tracing::debug!(event = "admin_watch_started", subscriber = sub.id());
        Ok(Response::new(EventStream::new(
            sub,
            req.into_inner().name_prefixes,
            self.stop_streams.clone(),
        )))
    }

    async fn get_supervision_tree(
        &self,
        _req: Request<pb::GetSupervisionTreeRequest>,
    ) -> Result<Response<pb::GetSupervisionTreeResult>, Status> {
        let tree = self
            .tree
            .tree()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let json = serde_json::to_string(&tree)
            .map_err(|e| Status::internal(format!("serialising the tree: {e}")))?;
        Ok(Response::new(pb::GetSupervisionTreeResult {
            json,
            rendered: tree.render(),
        }))
    }

    type ExecStream = ExecStream;

    async fn exec(
        &self,
        req: Request<tonic::Streaming<pb::ExecRequest>>,
    ) -> Result<Response<ExecStream>, Status> {
        super::exec::exec(self, req).await
    }

    type CopyFromStream = CopyFromStream;

    async fn copy_from(
        &self,
        req: Request<pb::CopyFromRequest>,
    ) -> Result<Response<CopyFromStream>, Status> {
        super::transfer::copy_from(self, req).await
    }

    type CopyToStream = CopyToStream;

    async fn copy_to(
        &self,
        req: Request<tonic::Streaming<pb::CopyToRequest>>,
    ) -> Result<Response<CopyToStream>, Status> {
        super::transfer::copy_to(self, req).await
    }

    type LogsStream = LogsStream;

    async fn logs(&self, req: Request<pb::LogsRequest>) -> Result<Response<LogsStream>, Status> {
        super::transfer::logs(self, req).await
    }

    async fn release_agent(
        &self,
        req: Request<pb::ReleaseAgentRequest>,
    ) -> Result<Response<pb::ReleaseAgentResult>, Status> {
        let r = req.into_inner();
        let (container_id, outcome, detail) =
            self.lift(&r.agent_name, &r.project, Lift::Release).await?;
        Ok(Response::new(pb::ReleaseAgentResult {
            container_id,
            outcome,
            detail,
        }))
    }

    async fn unlock_agent(
        &self,
        req: Request<pb::UnlockAgentRequest>,
    ) -> Result<Response<pb::UnlockAgentResult>, Status> {
        let r = req.into_inner();
        let (container_id, outcome, detail) =
            self.lift(&r.agent_name, &r.project, Lift::Unlock).await?;
        Ok(Response::new(pb::UnlockAgentResult {
            container_id,
            outcome,
            detail,
        }))
    }
}

/// The `WatchEvents` response stream: one bus subscription, filtered by
/// name prefix.
///
/// - Only events published *after* the call subscribed are seen (the bus
///   keeps no history; `clawker events` without `--follow` reads the audit
///   log instead).
/// - A client that reads too slowly does not slow the bus: its mailbox
///   drops the oldest events (drop-oldest, bounded by the bus's subscriber
///   capacity) and the dropped events are simply missing from the stream.
///   The count is logged when the stream ends.
/// - When the client goes away (cancel, disconnect), tonic drops this
///   stream, which drops the [`AuditSubscription`], which unsubscribes.
/// - It ends when the bus closes or when the server shuts down.
pub struct EventStream {
    sub: AuditSubscription,
    prefixes: Vec<String>,
    stop: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl EventStream {
    pub fn new(sub: AuditSubscription, prefixes: Vec<String>, stop: CancellationToken) -> Self {
        let prefixes = prefixes.into_iter().filter(|p| !p.is_empty()).collect();
        Self {
            sub,
            prefixes,
            stop: Box::pin(stop.cancelled_owned()),
        }
    }

    fn wanted(&self, name: &str) -> bool {
        self.prefixes.is_empty() || self.prefixes.iter().any(|p| name.starts_with(p.as_str()))
    }
}

impl Drop for EventStream {
    fn drop(&mut self) {
        let dropped = self.sub.dropped();
        tracing::debug!(
            event = "admin_watch_ended",
            subscriber = self.sub.id(),
            dropped,
        );
    }
}

impl Stream for EventStream {
    type Item = Result<pb::Event, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.stop.as_mut().poll(cx).is_ready() {
            return Poll::Ready(None);
        }
        loop {
            match Pin::new(&mut this.sub).poll_next(cx) {
                Poll::Ready(Some(ev)) => {
                    if !this.wanted(ev.name()) {
                        continue;
                    }
                    return Poll::Ready(Some(Ok(wire_event(ev.name(), ev.to_json()))));
                }
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// A bus event on the wire. The time is the event's own `at` (every domain
/// event carries one); an event without a parseable `at` gets the time it
/// was streamed.
pub fn wire_event(name: &str, json: serde_json::Value) -> pb::Event {
    let at = json
        .get("at")
        .and_then(|v| v.as_str())
        .and_then(|s| OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(OffsetDateTime::now_utc);
    pb::Event {
        name: name.to_owned(),
        time_unix_nanos: i64::try_from(at.unix_timestamp_nanos()).unwrap_or(i64::MAX),
        json: json.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Thumbprint;

    fn entry(project: &str, agent: &str, cid: &str) -> Entry {
        Entry {
            agent_name: agent.into(),
            project: project.into(),
            container_id: cid.into(),
            thumbprint: Thumbprint([0xab; 32]),
            canonical_cn: String::new(),
            registered_at_unix: 1_700_000_000,
            last_seen_unix: 1_700_000_100,
        }
    }

    #[test]
    fn list_agents_sorts_by_project_then_agent_and_maps_fields() {
        let res = list_agents_result(vec![
            entry("web", "b", "c1"),
            entry("", "z", "c2"),
            entry("web", "a", "c3"),
            entry("api", "x", "c4"),
        ]);
        let keys: Vec<_> = res
            .agents
            .iter()
            .map(|a| (a.project.as_str(), a.agent_name.as_str()))
            .collect();
        assert_eq!(keys, [("", "z"), ("api", "x"), ("web", "a"), ("web", "b")]);
        let a = &res.agents[2];
        assert_eq!(a.container_id, "c3");
        assert_eq!(a.cert_thumbprint, "ab".repeat(32));
        assert_eq!(
            (a.registered_at_unix, a.last_seen_unix),
            (1_700_000_000, 1_700_000_100)
        );
        assert!(list_agents_result(vec![]).agents.is_empty());
    }

    #[test]
    fn wire_event_takes_time_from_at_and_falls_back_to_now() {
        let e = wire_event(
            "agent.trusted",
            serde_json::json!({"at": "2024-01-02T03:04:05.5Z", "container_id": "c"}),
        );
        assert_eq!(e.time_unix_nanos, 1_704_164_645_500_000_000);
        assert_eq!(e.name, "agent.trusted");
        let v: serde_json::Value = serde_json::from_str(&e.json).unwrap();
        assert_eq!(v["container_id"], "c");
        let before = OffsetDateTime::now_utc().unix_timestamp_nanos() as i64;
        let e = wire_event("x", serde_json::json!({"at": "garbage"}));
        assert!(e.time_unix_nanos >= before);
    }
}
