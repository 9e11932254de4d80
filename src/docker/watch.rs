//! The Docker events feeder (reference `cp-session.md` §11): one long-lived
//! events stream filtered to container and network events, reconnect with
//! backoff, and a reconcile on every (re)connect that publishes synthetic
//! events so subscribers converge on the engine's state even across gaps.
//!
//! The filtering logic ([`FeederState`]) is pure and unit-tested; [`run`]
//! binds it to a real engine and a publish sink.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bollard::Docker;
use bollard::models::EventMessage;
use bollard::query_parameters::{EventsOptions, ListNetworksOptions};
use clawker_actors::{Backoff, Retry};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use super::DockerError;
use super::lister::{self, AgentContainer, Scope};
use crate::defaults::labels;
use crate::events::{DockerAction, DockerEvent, DockerObject};

/// One event as the engine streams it (JSON), as the domain's
/// [`DockerEvent`]. The feeder gets the message already decoded by the
/// client library; this is the same path from raw bytes (fuzzing).
pub fn parse_event_json(json: &[u8]) -> Result<DockerEvent, serde_json::Error> {
    serde_json::from_slice::<EventMessage>(json).map(parse_message)
}

/// The engine's message as the domain's [`DockerEvent`].
fn parse_message(m: EventMessage) -> DockerEvent {
    let actor = m.actor.unwrap_or_default();
    let time_nanos = m
        .time_nano
        .or_else(|| m.time.map(|s| s.saturating_mul(1_000_000_000)))
        .unwrap_or(0);
    DockerEvent {
        typ: DockerObject::parse(&m.typ.map(|t| t.to_string()).unwrap_or_default()),
        action: DockerAction::parse(m.action.as_deref().unwrap_or_default()),
        actor_id: actor.id.unwrap_or_default(),
        attributes: actor.attributes.unwrap_or_default().into_iter().collect(),
        scope: m.scope.map(|s| s.to_string()).unwrap_or_default(),
        time_nanos,
        synthetic: false,
    }
}

/// An event made up by a reconcile.
fn synthetic(
    typ: DockerObject,
    action: DockerAction,
    id: &str,
    attributes: BTreeMap<String, String>,
) -> DockerEvent {
    DockerEvent {
        typ,
        action,
        actor_id: id.into(),
        attributes,
        scope: "local".into(),
        time_nanos: now_nanos(),
        synthetic: true,
    }
}

fn now_nanos() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// `since` as the daemon parses it: `seconds.nanoseconds`. (The reference
/// sends bare nanoseconds, which the daemon reads as seconds far in the
/// future, so its replay window never worked.)
pub fn since_param(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    format!("{}.{:09}", d.as_secs(), d.subsec_nanos())
}

/// Container actions that carry no state worth publishing.
fn is_noise(action: &DockerAction) -> bool {
    let DockerAction::Other(action) = action else {
        return false;
    };
    action.starts_with("exec_")
        || matches!(
            action.as_str(),
            "attach"
                | "detach"
                | "resize"
                | "copy"
                | "archive-path"
                | "extract-to-dir"
                | "top"
                | "commit"
                | "export"
                | "update"
                | "checkpoint"
                | "prune"
                | "push"
                | "import"
                | "save"
                | "load"
                | "mount"
                | "unmount"
        )
}

/// Decides whether a network is managed (inspects it on the engine).
pub trait NetworkProbe {
    fn is_managed(
        &self,
        network_id: &str,
    ) -> impl std::future::Future<Output = Result<bool, DockerError>> + Send;
}

impl NetworkProbe for Docker {
    async fn is_managed(&self, network_id: &str) -> Result<bool, DockerError> {
        let net = self
            .inspect_network(
                network_id,
                None::<bollard::query_parameters::InspectNetworkOptions>,
            )
            .await?;
        Ok(net
            .labels
            .and_then(|l| l.get(labels::MANAGED).cloned())
            .is_some_and(|v| v == labels::MANAGED_VALUE))
    }
}

/// What the feeder remembers between events: which containers and networks
/// are managed (rebuilt by every reconcile).
#[derive(Debug, Default)]
pub struct FeederState {
    containers: HashSet<String>,
    networks: HashSet<String>,
    needs_recheck: HashSet<String>,
}

impl FeederState {
    /// Rebuilds the managed sets from listings and returns the synthetic
    /// events that describe the current state. Removals are never
    /// synthesised: they come from the stream.
    pub fn reconcile(
        &mut self,
        containers: &[AgentContainer],
        network_ids: &[String],
    ) -> Vec<DockerEvent> {
        self.containers.clear();
        self.networks = network_ids.iter().cloned().collect();
        self.needs_recheck.clear();
        let mut out = Vec::new();
        for c in containers {
            self.containers.insert(c.id.clone());
            let action = match c.state.as_str() {
                "running" => DockerAction::Start,
                "paused" => DockerAction::Pause,
                "exited" | "dead" => DockerAction::Die,
                "removing" => DockerAction::Destroy,
                _ => continue, // created / restarting: nothing to say yet
            };
            let mut attrs: BTreeMap<String, String> = c
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            attrs.insert("name".into(), c.name.clone());
            attrs.insert("image".into(), c.image.clone());
            out.push(synthetic(DockerObject::Container, action, &c.id, attrs));
        }
        for c in containers {
            for (net_id, _) in &c.networks {
                if self.networks.contains(net_id) {
                    let attrs = BTreeMap::from([("container".to_owned(), c.id.clone())]);
                    out.push(synthetic(
                        DockerObject::Network,
                        DockerAction::Connect,
                        net_id,
                        attrs,
                    ));
                }
            }
        }
        out
    }

    /// Filters one live event; `Some` means publish it.
    pub async fn dispatch<P: NetworkProbe>(
        &mut self,
        ev: DockerEvent,
        probe: &P,
    ) -> Option<DockerEvent> {
        if is_noise(&ev.action) || ev.actor_id.is_empty() {
            return None;
        }
        match ev.typ {
            DockerObject::Container => {
                let labelled = ev.attr(labels::MANAGED) == Some(labels::MANAGED_VALUE);
                if !labelled && !self.containers.contains(&ev.actor_id) {
                    return None;
                }
                if ev.action == DockerAction::Destroy {
                    self.containers.remove(&ev.actor_id);
                } else {
                    self.containers.insert(ev.actor_id.clone());
                }
                Some(ev)
            }
            DockerObject::Network => {
                let id = ev.actor_id.clone();
                let membership =
                    matches!(ev.action, DockerAction::Connect | DockerAction::Disconnect);
                let removal = matches!(ev.action, DockerAction::Destroy | DockerAction::Remove);
                if ev.action == DockerAction::Create {
                    self.probe_network(&id, probe).await;
                } else if removal {
                    self.needs_recheck.remove(&id);
                } else if membership && self.needs_recheck.contains(&id) {
                    self.probe_network(&id, probe).await;
                }
                if !self.networks.contains(&id) {
                    return None;
                }
                if membership
                    && !ev
                        .attr("container")
                        .is_some_and(|c| self.containers.contains(c))
                {
                    return None;
                }
                if removal {
                    self.networks.remove(&id);
                }
                Some(ev)
            }
            DockerObject::Other(_) => None,
        }
    }

    async fn probe_network<P: NetworkProbe>(&mut self, id: &str, probe: &P) {
        match probe.is_managed(id).await {
            Ok(true) => {
                self.networks.insert(id.to_owned());
                self.needs_recheck.remove(id);
            }
            Ok(false) => {
                self.networks.remove(id);
                self.needs_recheck.remove(id);
            }
            Err(e) => {
                tracing::warn!(network_id = id, error = %e, "dockerevents: network inspect failed; will recheck");
                self.needs_recheck.insert(id.to_owned());
            }
        }
    }
}

/// Reconnect policy of the feeder.
#[derive(Debug, Clone, Copy)]
pub struct FeederConfig {
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// A stream that stayed up this long resets the backoff even if it ended
    /// in an error (the reference only reset on a clean EOF).
    pub healthy_after: Duration,
}

impl Default for FeederConfig {
    fn default() -> Self {
        Self {
            reconnect_min: Duration::from_secs(1),
            reconnect_max: Duration::from_secs(30),
            healthy_after: Duration::from_secs(30),
        }
    }
}

/// The feeder's reconnect rule over the shared [`Backoff`]: doubling after
/// failures, reset after a clean end or a stream that stayed healthy.
#[derive(Debug)]
pub struct ReconnectBackoff {
    healthy_after: Duration,
    retry: Retry,
}

impl ReconnectBackoff {
    pub fn new(cfg: FeederConfig) -> Self {
        Self {
            healthy_after: cfg.healthy_after,
            retry: Backoff::new(cfg.reconnect_min, cfg.reconnect_max).retry(),
        }
    }

    /// The delay before the next attempt after a failure; doubles up to max.
    pub fn after_failure(&mut self) -> Duration {
        self.retry.next_delay()
    }

    /// A stream ended after `lived`: resets when it was healthy long enough
    /// or ended cleanly, and returns the delay before reconnecting.
    pub fn after_stream(&mut self, lived: Duration, clean: bool) -> Duration {
        if clean || lived >= self.healthy_after {
            self.retry.reset();
            return self.retry.policy().initial;
        }
        self.after_failure()
    }
}

/// Lists managed containers and networks for a reconcile. Both listings are
/// attempted even if the first fails, so the error names everything wrong.
async fn list_for_reconcile(docker: &Docker) -> Result<(Vec<AgentContainer>, Vec<String>), String> {
    let containers = lister::list_managed(docker, Scope::All, None).await;
    let filters = HashMap::from([(
        "label".to_owned(),
        vec![format!("{}={}", labels::MANAGED, labels::MANAGED_VALUE)],
    )]);
    let networks = docker
        .list_networks(Some(ListNetworksOptions {
            filters: Some(filters),
        }))
        .await;
    match (containers, networks) {
        (Ok(c), Ok(n)) => Ok((c, n.into_iter().filter_map(|n| n.id).collect())),
        (c, n) => {
            let mut errs = Vec::new();
            if let Err(e) = c {
                errs.push(e.to_string());
            }
            if let Err(e) = n {
                errs.push(e.to_string());
            }
            Err(format!(
                "dockerevents: list during reconcile: {}",
                errs.join("; ")
            ))
        }
    }
}

/// How often the feeder asks a silent engine whether it answers again
/// while it waits to reconnect (and how long one ping may take).
pub const PING_INTERVAL: Duration = Duration::from_millis(250);

/// Waits up to `delay` before the next attempt, cut short as soon as
/// `ping` says the engine answers (asked every `interval`). The doubling
/// backoff only paces attempts against an engine that is down; it never
/// delays noticing that it came back: once pings succeed, retries are at
/// most `interval` apart. Returns false if `shutdown` fired.
pub async fn wait_to_retry<F, Fut>(
    delay: Duration,
    interval: Duration,
    mut ping: F,
    shutdown: &CancellationToken,
) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + delay;
    loop {
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return true;
        }
        let step = interval.min(deadline - now);
        tokio::select! {
            _ = shutdown.cancelled() => return false,
            _ = tokio::time::sleep(step) => {}
        }
        if tokio::time::timeout(interval, ping()).await == Ok(true) {
            return true;
        }
    }
}

/// Runs the feeder until `shutdown` fires. `publish` returns whether the bus
/// accepted the event (a refusal is logged, never retried: the next
/// reconcile repairs any gap).
pub async fn run(
    docker: Docker,
    cfg: FeederConfig,
    publish: impl Fn(DockerEvent) -> bool,
    on_connected: impl Fn(bool),
    shutdown: CancellationToken,
) {
    let mut backoff = ReconnectBackoff::new(cfg);
    let mut state = FeederState::default();
    let emit = |ev: DockerEvent| {
        let name = ev.name();
        let id = ev.actor_id.clone();
        if !publish(ev) {
            tracing::warn!(event = %name, ctx_id = %id, "dockerevents: publish dropped");
        }
    };
    // Since when the engine has been unreachable (None while connected).
    let mut down_since: Option<Instant> = None;
    let mut failures = 0u32;
    loop {
        if shutdown.is_cancelled() {
            return;
        }
        // Taken before listing so events during the reconcile are replayed
        // by the stream (apply is idempotent).
        let t0 = SystemTime::now();
        let delay = match list_for_reconcile(&docker).await {
            Err(e) => {
                on_connected(false);
                down_since.get_or_insert_with(Instant::now);
                failures += 1;
                let delay = backoff.after_failure();
                // Loud on the first failure, then once in a while: an
                // engine that stays down must not flood the log.
                if failures == 1 || failures.is_multiple_of(20) {
                    tracing::error!(error = %e, failures, retry_max_ms = delay.as_millis() as u64, "dockerevents: Docker engine unreachable; retrying (at once when it answers pings again)");
                } else {
                    tracing::debug!(error = %e, failures, "dockerevents: reconcile failed");
                }
                Some(delay)
            }
            Ok((containers, networks)) => {
                on_connected(true);
                if let Some(t) = down_since.take() {
                    tracing::info!(
                        down_ms = t.elapsed().as_millis() as u64,
                        failures,
                        "dockerevents: Docker engine reachable again; events stream resumed"
                    );
                }
                failures = 0;
                for ev in state.reconcile(&containers, &networks) {
                    emit(ev);
                }
                let started = Instant::now();
                let result = stream_once(&docker, &mut state, t0, &emit, &shutdown).await;
                if shutdown.is_cancelled() {
                    return;
                }
                on_connected(false);
                down_since = Some(Instant::now());
                let lived = started.elapsed();
                match result {
                    Ok(()) => {
                        tracing::info!(
                            lived_ms = lived.as_millis() as u64,
                            "dockerevents: stream ended; reconnecting"
                        );
                        Some(backoff.after_stream(lived, true))
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, lived_ms = lived.as_millis() as u64, "dockerevents: stream failed; reconnecting");
                        Some(backoff.after_stream(lived, false))
                    }
                }
            }
        };
        if let Some(d) = delay {
            let ping = || async { docker.ping().await.is_ok() };
            if !wait_to_retry(d, PING_INTERVAL, ping, &shutdown).await {
                return;
            }
        }
    }
}

async fn stream_once(
    docker: &Docker,
    state: &mut FeederState,
    since: SystemTime,
    emit: &impl Fn(DockerEvent),
    shutdown: &CancellationToken,
) -> Result<(), DockerError> {
    let filters = HashMap::from([(
        "type".to_owned(),
        vec!["container".to_owned(), "network".to_owned()],
    )]);
    let opts = EventsOptions {
        since: Some(since_param(since)),
        until: None,
        filters: Some(filters),
    };
    let mut stream = docker.events(Some(opts));
    loop {
        let next = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            n = stream.next() => n,
        };
        match next {
            None => return Ok(()),
            Some(Err(e)) => return Err(e.into()),
            Some(Ok(msg)) => {
                let ev = parse_message(msg);
                tracing::debug!(
                    event = %ev.name(),
                    id = %ev.actor_id.get(..12).unwrap_or(&ev.actor_id),
                    "docker event received"
                );
                if let Some(ev) = state.dispatch(ev, docker).await {
                    emit(ev);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn retry_wait_ends_at_the_first_ping_the_engine_answers() {
        let start = tokio::time::Instant::now();
        let back_at = Duration::from_millis(300);
        let ping = || async move { start.elapsed() >= back_at };
        let stop = CancellationToken::new();
        // The backoff had grown to 30 s while the engine was down; the
        // retry must not wait for it once the engine answers.
        let interval = Duration::from_millis(50);
        assert!(wait_to_retry(Duration::from_secs(30), interval, ping, &stop).await);
        let waited = start.elapsed();
        assert!(
            waited >= back_at && waited < Duration::from_secs(10),
            "retried {waited:?} after the start; the engine answered at {back_at:?}"
        );
    }

    #[tokio::test]
    async fn retry_wait_runs_its_course_against_a_silent_engine_and_stops_on_shutdown() {
        let interval = Duration::from_millis(20);
        let start = tokio::time::Instant::now();
        let stop = CancellationToken::new();
        let delay = Duration::from_millis(200);
        assert!(wait_to_retry(delay, interval, || async { false }, &stop).await);
        assert!(start.elapsed() >= delay);
        // A ping that hangs is cut at one interval, not waited for.
        let start = tokio::time::Instant::now();
        let hang = || std::future::pending::<bool>();
        assert!(wait_to_retry(delay, interval, hang, &stop).await);
        assert!(start.elapsed() < Duration::from_secs(5));
        stop.cancel();
        let long = Duration::from_secs(60);
        assert!(!wait_to_retry(long, interval, || async { true }, &stop).await);
    }

    struct Probe(Result<bool, ()>);
    impl NetworkProbe for Probe {
        async fn is_managed(&self, _: &str) -> Result<bool, DockerError> {
            self.0.map_err(|_| DockerError::NotFound("net".into()))
        }
    }

    fn ev(typ: &str, action: &str, id: &str, attrs: &[(&str, &str)]) -> DockerEvent {
        DockerEvent {
            typ: DockerObject::parse(typ),
            action: DockerAction::parse(action),
            actor_id: id.into(),
            attributes: attrs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            scope: "local".into(),
            time_nanos: 1,
            synthetic: false,
        }
    }

    fn container(id: &str, state: &str, nets: &[&str]) -> AgentContainer {
        AgentContainer {
            id: id.into(),
            name: format!("n-{id}"),
            state: state.into(),
            image: "img".into(),
            labels: HashMap::from([(labels::MANAGED.to_owned(), labels::MANAGED_VALUE.to_owned())]),
            networks: nets
                .iter()
                .map(|n| (n.to_string(), format!("name-{n}")))
                .collect(),
        }
    }

    #[test]
    fn since_is_seconds_dot_nanoseconds() {
        let t = UNIX_EPOCH + Duration::new(1_700_000_000, 42);
        assert_eq!(since_param(t), "1700000000.000000042");
    }

    #[test]
    fn reconcile_maps_states_to_synthetic_actions() {
        let mut s = FeederState::default();
        let evs = s.reconcile(
            &[
                container("a", "running", &["n1", "other"]),
                container("b", "exited", &[]),
                container("c", "created", &[]),
                container("d", "paused", &[]),
                container("e", "removing", &[]),
            ],
            &["n1".into()],
        );
        let names: Vec<(String, String)> =
            evs.iter().map(|e| (e.name(), e.actor_id.clone())).collect();
        assert_eq!(
            names,
            vec![
                ("docker.container.start".into(), "a".into()),
                ("docker.container.die".into(), "b".into()),
                ("docker.container.pause".into(), "d".into()),
                ("docker.container.destroy".into(), "e".into()),
                ("docker.network.connect".into(), "n1".into()),
            ]
        );
        assert!(evs.iter().all(|e| e.synthetic && e.scope == "local"));
        assert_eq!(evs[0].attr("name"), Some("n-a"));
        assert_eq!(evs[4].attr("container"), Some("a"));
    }

    #[tokio::test]
    async fn dispatch_filters_noise_unmanaged_and_empty_ids() {
        let mut s = FeederState::default();
        let p = Probe(Ok(true));
        let managed = [(labels::MANAGED, labels::MANAGED_VALUE)];
        assert!(
            s.dispatch(ev("container", "exec_start: sh", "a", &managed), &p)
                .await
                .is_none()
        );
        assert!(
            s.dispatch(ev("container", "attach", "a", &managed), &p)
                .await
                .is_none()
        );
        assert!(
            s.dispatch(ev("container", "start", "", &managed), &p)
                .await
                .is_none()
        );
        assert!(
            s.dispatch(ev("container", "start", "x", &[]), &p)
                .await
                .is_none()
        );
        assert!(
            s.dispatch(ev("container", "start", "a", &managed), &p)
                .await
                .is_some()
        );
        // Known id without labels (e.g. destroy carries few attributes) passes.
        assert!(
            s.dispatch(ev("container", "health_status: healthy", "a", &[]), &p)
                .await
                .is_some()
        );
        assert!(
            s.dispatch(ev("container", "destroy", "a", &[]), &p)
                .await
                .is_some()
        );
        assert!(
            s.dispatch(ev("container", "die", "a", &[]), &p)
                .await
                .is_none(),
            "forgotten after destroy"
        );
    }

    #[tokio::test]
    async fn dispatch_tracks_managed_networks() {
        let mut s = FeederState::default();
        s.reconcile(&[container("a", "running", &[])], &[]);
        let yes = Probe(Ok(true));
        let no = Probe(Ok(false));
        let broken = Probe(Err(()));
        assert!(
            s.dispatch(ev("network", "create", "n1", &[]), &no)
                .await
                .is_none()
        );
        assert!(
            s.dispatch(ev("network", "create", "n2", &[]), &yes)
                .await
                .is_some()
        );
        assert!(
            s.dispatch(ev("network", "connect", "n2", &[("container", "a")]), &no)
                .await
                .is_some()
        );
        assert!(
            s.dispatch(ev("network", "connect", "n2", &[("container", "zz")]), &no)
                .await
                .is_none()
        );
        // Inspect failure marks for recheck; the next connect re-inspects.
        assert!(
            s.dispatch(ev("network", "create", "n3", &[]), &broken)
                .await
                .is_none()
        );
        assert!(
            s.dispatch(ev("network", "connect", "n3", &[("container", "a")]), &yes)
                .await
                .is_some()
        );
        assert!(
            s.dispatch(ev("network", "destroy", "n2", &[]), &no)
                .await
                .is_some()
        );
        assert!(
            s.dispatch(ev("network", "connect", "n2", &[("container", "a")]), &no)
                .await
                .is_none()
        );
    }

    #[test]
    fn backoff_doubles_caps_and_resets_after_a_healthy_stream() {
        let cfg = FeederConfig {
            reconnect_min: Duration::from_secs(1),
            reconnect_max: Duration::from_secs(5),
            healthy_after: Duration::from_secs(30),
        };
        let mut b = ReconnectBackoff::new(cfg);
        let seq: Vec<u64> = (0..5).map(|_| b.after_failure().as_secs()).collect();
        assert_eq!(seq, vec![1, 2, 4, 5, 5]);
        // A short-lived stream that errored keeps growing…
        assert_eq!(b.after_stream(Duration::from_secs(2), false).as_secs(), 5);
        // …a long healthy one resets even though it ended in an error.
        assert_eq!(b.after_stream(Duration::from_secs(31), false).as_secs(), 1);
        assert_eq!(b.after_failure().as_secs(), 1);
        assert_eq!(b.after_failure().as_secs(), 2);
        assert_eq!(b.after_stream(Duration::ZERO, true).as_secs(), 1);
    }
}
