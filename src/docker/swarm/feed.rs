//! The events feeder in Swarm mode.
//!
//! Engine 20.10 emits no task events, cluster events exist only on managers
//! and container events only on the node running the container. So the
//! feed polls the manager's agent services and their running tasks, and
//! turns each change of a service's *current task* into the container
//! vocabulary the dispatcher already speaks, keyed by the service id:
//!
//! | change                          | events                |
//! |---------------------------------|-----------------------|
//! | no running task → task T        | `start`               |
//! | task A → another task B         | `die`, then `start`   |
//! | task A → none (stop, exit)      | `die`                 |
//! | service gone                    | `destroy`             |
//!
//! `die` then `start` on a task replacement stops the old session at once
//! and dials the new task, instead of letting the old session churn
//! through reconnects to an address that no longer exists.
//!
//! Polling is slow while nothing happens ([`SwarmFeedConfig::idle_poll`])
//! and fast for a while after any service event, or any container event of
//! a swarm task on this manager ([`SwarmFeedConfig::busy_poll`]): those are
//! hints, never facts. The diff logic ([`SwarmFeedState`]) is pure and
//! unit-tested; [`SwarmFeed`] binds it to a manager.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bollard::query_parameters::EventsOptions;
use futures::StreamExt;
use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use super::task::{self, RawTask, ServiceView};
use super::{Swarm, SwarmError};
use crate::docker::watch::{FeederConfig, ReconnectBackoff, since_param};
use crate::events::{DockerAction, DockerEvent, DockerObject};
use crate::runtime::feed::{EventFeed, FeedSink};

/// An agent service as one poll saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    pub service: ServiceView,
    pub running: Option<RunningTask>,
}

/// A service's current task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunningTask {
    pub task_id: String,
    pub node_id: String,
    /// When it became running (Unix nanoseconds; 0 if unknown).
    pub since_nanos: i64,
}

impl RunningTask {
    fn of(t: &RawTask) -> Self {
        Self {
            task_id: t.id.clone(),
            node_id: t.node_id.clone(),
            since_nanos: t.state_since_nanos(),
        }
    }
}

/// Attribute keys the feed adds to the service labels (the same keys the
/// engine puts on a task's containers).
pub const ATTR_TASK_ID: &str = "com.docker.swarm.task.id";
pub const ATTR_NODE_ID: &str = "com.docker.swarm.node.id";

/// What the feed remembers between polls.
#[derive(Debug, Default)]
pub struct SwarmFeedState {
    known: HashMap<String, Observed>,
}

fn now_nanos() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

fn event(
    action: DockerAction,
    o: &Observed,
    task: Option<&RunningTask>,
    synthetic: bool,
) -> DockerEvent {
    let mut attributes: BTreeMap<String, String> = o
        .service
        .labels
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    attributes.insert("name".into(), o.service.name.clone());
    if let Some(t) = task {
        attributes.insert(ATTR_TASK_ID.into(), t.task_id.clone());
        attributes.insert(ATTR_NODE_ID.into(), t.node_id.clone());
    }
    // A start is dated when swarm saw the task running (what a container
    // `start` event's time is in engine mode); everything else when seen.
    let time_nanos = match (&action, task) {
        (DockerAction::Start, Some(t)) if t.since_nanos > 0 => t.since_nanos,
        _ => now_nanos(),
    };
    DockerEvent {
        typ: DockerObject::Container,
        action,
        actor_id: o.service.id.clone(),
        attributes,
        scope: "swarm".into(),
        time_nanos,
        synthetic,
    }
}

impl SwarmFeedState {
    /// Replaces what is known with `snapshot` and describes it: `start` for
    /// every service with a running task, `die` for the others (so a CP that
    /// restarted stops any stale session). Removals are not synthesised.
    pub fn reconcile(&mut self, snapshot: Vec<Observed>) -> Vec<DockerEvent> {
        self.known.clear();
        let mut out = Vec::new();
        for o in snapshot {
            let action = if o.running.is_some() {
                DockerAction::Start
            } else {
                DockerAction::Die
            };
            out.push(event(action, &o, o.running.as_ref(), true));
            self.known.insert(o.service.id.clone(), o);
        }
        out
    }

    /// The events between what was known and `snapshot` (see the module
    /// table), then remembers `snapshot`.
    pub fn observe(&mut self, snapshot: Vec<Observed>) -> Vec<DockerEvent> {
        let mut out = Vec::new();
        let mut seen = HashMap::with_capacity(snapshot.len());
        for o in snapshot {
            let before = self
                .known
                .get(&o.service.id)
                .and_then(|p| p.running.as_ref());
            let before_task = before.map(|t| t.task_id.as_str());
            let now_task = o.running.as_ref().map(|t| t.task_id.as_str());
            if before_task != now_task {
                if let Some(prev) = before {
                    out.push(event(DockerAction::Die, &o, Some(prev), false));
                }
                if let Some(t) = &o.running {
                    out.push(event(DockerAction::Start, &o, Some(t), false));
                }
            }
            seen.insert(o.service.id.clone(), o);
        }
        let mut gone: Vec<&Observed> = self
            .known
            .values()
            .filter(|o| !seen.contains_key(&o.service.id))
            .collect();
        gone.sort_by(|a, b| a.service.id.cmp(&b.service.id));
        for o in gone {
            out.push(event(DockerAction::Destroy, o, o.running.as_ref(), false));
        }
        self.known = seen;
        out
    }
}

/// Polls and reconnects of the swarm feed.
#[derive(Debug, Clone, Copy)]
pub struct SwarmFeedConfig {
    /// Between polls while nothing hints at a change.
    pub idle_poll: Duration,
    /// Between polls for [`busy_for`](Self::busy_for) after a hint.
    pub busy_poll: Duration,
    pub busy_for: Duration,
    /// Consecutive failed polls that count as a lost manager (reconnect).
    pub max_poll_failures: u32,
    pub reconnect: FeederConfig,
}

impl Default for SwarmFeedConfig {
    fn default() -> Self {
        Self {
            idle_poll: Duration::from_secs(1),
            busy_poll: Duration::from_millis(50),
            busy_for: Duration::from_secs(10),
            max_poll_failures: 3,
            reconnect: FeederConfig::default(),
        }
    }
}

/// Every agent service and its current task, in two calls.
pub async fn snapshot(swarm: &Swarm) -> Result<Vec<Observed>, SwarmError> {
    let services = swarm.agent_services().await?;
    let tasks = swarm.tasks(&[("desired-state", &["running"])]).await?;
    Ok(services
        .into_iter()
        .map(|service| {
            let running = task::current(tasks.iter().filter(|t| t.service_id == service.id))
                .map(RunningTask::of);
            Observed { service, running }
        })
        .collect())
}

/// The swarm feed, bound to a manager.
#[derive(Clone)]
pub struct SwarmFeed {
    swarm: Swarm,
    cfg: SwarmFeedConfig,
}

impl SwarmFeed {
    pub fn new(swarm: Swarm) -> Self {
        Self::with_config(swarm, SwarmFeedConfig::default())
    }

    pub fn with_config(swarm: Swarm, cfg: SwarmFeedConfig) -> Self {
        Self { swarm, cfg }
    }
}

impl EventFeed for SwarmFeed {
    fn run(&self, sink: FeedSink, shutdown: CancellationToken) -> BoxFuture<'static, ()> {
        Box::pin(run(self.swarm.clone(), self.cfg, sink, shutdown))
    }
}

/// Whether a raw engine event hints that some agent task may have changed.
fn is_hint(msg: &bollard::models::EventMessage) -> bool {
    use bollard::models::EventMessageTypeEnum as T;
    match msg.typ {
        Some(T::SERVICE) => true,
        // A swarm task's container on this manager started or ended.
        Some(T::CONTAINER) => {
            let swarm_task = msg
                .actor
                .as_ref()
                .and_then(|a| a.attributes.as_ref())
                .is_some_and(|a| a.contains_key(ATTR_TASK_ID));
            let action = msg.action.as_deref().unwrap_or("");
            swarm_task && matches!(action, "start" | "die" | "destroy" | "kill" | "oom")
        }
        _ => false,
    }
}

async fn run(swarm: Swarm, cfg: SwarmFeedConfig, sink: FeedSink, shutdown: CancellationToken) {
    let mut backoff = ReconnectBackoff::new(cfg.reconnect);
    let mut state = SwarmFeedState::default();
    loop {
        if shutdown.is_cancelled() {
            return;
        }
        let t0 = SystemTime::now();
        let delay = match snapshot(&swarm).await {
            Err(e) => {
                sink.connected(false);
                tracing::error!(error = %e, "swarm feed: reconcile failed");
                backoff.after_failure()
            }
            Ok(snap) => {
                sink.connected(true);
                for ev in state.reconcile(snap) {
                    sink.publish(ev);
                }
                let started = Instant::now();
                let result = follow(&swarm, &cfg, &mut state, &sink, t0, &shutdown).await;
                if shutdown.is_cancelled() {
                    return;
                }
                sink.connected(false);
                let lived = started.elapsed();
                match result {
                    Ok(()) => backoff.after_stream(lived, true),
                    Err(e) => {
                        tracing::warn!(error = %e, lived_ms = lived.as_millis() as u64, "swarm feed: lost the manager; reconnecting");
                        backoff.after_stream(lived, false)
                    }
                }
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// Polls (and listens for hints) until the manager is lost or shutdown.
async fn follow(
    swarm: &Swarm,
    cfg: &SwarmFeedConfig,
    state: &mut SwarmFeedState,
    sink: &FeedSink,
    since: SystemTime,
    shutdown: &CancellationToken,
) -> Result<(), SwarmError> {
    let filters = HashMap::from([(
        "type".to_owned(),
        vec!["service".to_owned(), "container".to_owned()],
    )]);
    let mut hints = swarm.docker().events(Some(EventsOptions {
        since: Some(since_param(since)),
        until: None,
        filters: Some(filters),
    }));
    // Busy right after a (re)connect: whatever happened during the gap may
    // still be settling.
    let mut busy_until = Instant::now() + cfg.busy_for;
    let mut next_poll = tokio::time::Instant::now() + cfg.busy_poll;
    let mut failures = 0u32;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            hint = hints.next() => match hint {
                None => return Ok(()),
                Some(Err(e)) => return Err(e.into()),
                Some(Ok(msg)) => {
                    // Other events do not move the next poll, so a chatty
                    // engine cannot starve polling.
                    if is_hint(&msg) {
                        busy_until = Instant::now() + cfg.busy_for;
                        next_poll = next_poll.min(tokio::time::Instant::now() + cfg.busy_poll);
                    }
                    continue;
                }
            },
            _ = tokio::time::sleep_until(next_poll) => {}
        }
        match snapshot(swarm).await {
            Ok(snap) => {
                failures = 0;
                for ev in state.observe(snap) {
                    tracing::debug!(event = %ev.name(), service = %task::short(&ev.actor_id), "swarm feed: task change");
                    sink.publish(ev);
                }
            }
            Err(e) => {
                failures += 1;
                tracing::warn!(error = %e, failures, "swarm feed: poll failed");
                if failures >= cfg.max_poll_failures {
                    return Err(e);
                }
            }
        }
        let interval = if Instant::now() < busy_until {
            cfg.busy_poll
        } else {
            cfg.idle_poll
        };
        next_poll = tokio::time::Instant::now() + interval;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::defaults::labels;

    fn obs(id: &str, task: Option<&str>) -> Observed {
        Observed {
            service: ServiceView {
                id: id.into(),
                name: format!("clawker.{id}"),
                labels: HashMap::from([(
                    labels::PURPOSE.to_owned(),
                    labels::PURPOSE_AGENT.to_owned(),
                )]),
            },
            running: task.map(|t| RunningTask {
                task_id: t.into(),
                node_id: "n1".into(),
                since_nanos: 42,
            }),
        }
    }

    fn names(evs: &[DockerEvent]) -> Vec<(String, String)> {
        evs.iter()
            .map(|e| (e.action.as_str().to_owned(), e.actor_id.clone()))
            .collect()
    }

    #[test]
    fn reconcile_says_start_for_running_and_die_for_idle_services() {
        let mut s = SwarmFeedState::default();
        let evs = s.reconcile(vec![obs("a", Some("t1")), obs("b", None)]);
        assert_eq!(
            names(&evs),
            [("start".into(), "a".into()), ("die".into(), "b".into())]
        );
        assert!(evs.iter().all(|e| e.synthetic && e.scope == "swarm"));
        assert_eq!(evs[0].container_id(), Some("a"));
        assert_eq!(evs[0].attr(labels::PURPOSE), Some("agent"));
        assert_eq!(evs[0].attr("name"), Some("clawker.a"));
        assert_eq!(evs[0].attr(ATTR_TASK_ID), Some("t1"));
        assert_eq!(evs[0].time_nanos, 42, "a start is dated when the task ran");
    }

    #[test]
    fn task_changes_become_start_die_and_destroy() {
        let mut s = SwarmFeedState::default();
        s.reconcile(vec![
            obs("a", None),
            obs("b", Some("t1")),
            obs("c", Some("t5")),
        ]);
        // Unchanged: nothing.
        assert!(
            s.observe(vec![
                obs("a", None),
                obs("b", Some("t1")),
                obs("c", Some("t5"))
            ])
            .is_empty()
        );
        // a started, b's task was replaced, c stopped.
        let evs = s.observe(vec![
            obs("a", Some("t2")),
            obs("b", Some("t3")),
            obs("c", None),
        ]);
        assert_eq!(
            names(&evs),
            [
                ("start".into(), "a".into()),
                ("die".into(), "b".into()),
                ("start".into(), "b".into()),
                ("die".into(), "c".into()),
            ]
        );
        assert!(evs.iter().all(|e| !e.synthetic));
        assert_eq!(
            evs[1].attr(ATTR_TASK_ID),
            Some("t1"),
            "die names the old task"
        );
        assert_eq!(evs[2].attr(ATTR_TASK_ID), Some("t3"));
        // b removed; a new service d appears already running.
        let evs = s.observe(vec![
            obs("a", Some("t2")),
            obs("c", None),
            obs("d", Some("t9")),
        ]);
        assert_eq!(
            names(&evs),
            [("start".into(), "d".into()), ("destroy".into(), "b".into())]
        );
        // Forgotten after destroy.
        assert!(
            s.observe(vec![
                obs("a", Some("t2")),
                obs("c", None),
                obs("d", Some("t9"))
            ])
            .is_empty()
        );
    }

    #[test]
    fn hints_are_service_events_and_swarm_task_containers_only() {
        use bollard::models::{EventActor, EventMessage, EventMessageTypeEnum as T};
        let msg = |typ, action: &str, task: bool| EventMessage {
            typ: Some(typ),
            action: Some(action.into()),
            actor: Some(EventActor {
                id: Some("x".into()),
                attributes: Some(if task {
                    HashMap::from([(ATTR_TASK_ID.to_owned(), "t".to_owned())])
                } else {
                    HashMap::new()
                }),
            }),
            ..Default::default()
        };
        assert!(is_hint(&msg(T::SERVICE, "update", false)));
        assert!(is_hint(&msg(T::CONTAINER, "start", true)));
        assert!(is_hint(&msg(T::CONTAINER, "die", true)));
        assert!(!is_hint(&msg(T::CONTAINER, "start", false)));
        assert!(!is_hint(&msg(T::CONTAINER, "exec_start: sh", true)));
        assert!(!is_hint(&msg(T::NETWORK, "connect", false)));
    }
}
