//! Prometheus metrics: a recorder (`metrics` + `metrics-exporter-prometheus`,
//! no built-in listener: [`health::serve_metrics`](super::health) renders
//! it) and the [`MetricsActor`] that feeds it from the bus.
//!
//! | metric                                   | kind      | labels              | source                         |
//! |------------------------------------------|-----------|---------------------|--------------------------------|
//! | `clawker_sessions`                       | gauge     | `status`            | worldview snapshot             |
//! | `clawker_registrations_total`            | counter   | `result` (ok/failed)| `AgentRegistered`              |
//! | `clawker_untrusted_total`                | counter   | `reason`            | `AgentUntrusted`               |
//! | `clawker_init_step_duration_seconds`     | histogram | `step`, `result`    | `InitStepCompleted`/`Failed`   |
//! | `clawker_bus_published_total`            | counter   |                     | `bus.stats()`                  |
//! | `clawker_bus_dropped_total`              | counter   | `where` (queue/subscribers) | `bus.stats()`          |
//! | `clawker_supervisor_restarts_total`      | counter   | `supervisor`, `child` | [`record_child_exit`]        |
//! | `clawker_supervisor_child_exits_total`   | counter   | `supervisor`, `reason` | [`record_child_exit`]       |
//! | `clawker_containment_actions_total`      | counter   | `action`, `outcome` | `ContainmentApplied`           |
//! | `clawker_exec_total`                     | counter   | `kind`, `result` (ok/nonzero/failed) | `ExecFinished` |
//! | `clawker_exec_duration_seconds`          | histogram | `kind`              | `ExecFinished`                 |
//! | `clawker_exec_bytes_total`               | counter   | `kind`, `direction` (in/out) | `ExecFinished`        |
//! | `clawker_exec_refused_total`             | counter   | `kind`              | `ExecRefused`                  |
//! | `clawker_exec_forced_total`              | counter   | `kind`              | `ExecForced`                   |
//! | `clawker_cert_rotations_total`           | counter   | `reason`, `result` (ok/failed) | `CertRotated`/`CertRotationFailed` |
//! | `clawker_cert_rotation_seconds`          | histogram |                     | `CertRotated` (CSR → `Done`)   |
//!
//! Why a recorder object and not only the global one: tests (and several
//! CPs in one process) each get their own [`Metrics`], recorded into via
//! `metrics::with_local_recorder`. The daemon additionally installs it as
//! the global recorder ([`Metrics::install_global`]) so the free function
//! [`record_child_exit`] — handy in a supervisor's `on_exit` callback —
//! reaches it too.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use actix::fut::wrap_future;
use actix::prelude::*;
use clawker_actors::{
    AuditSubscription, BusError, BusStats, ChildExit, ChildLink, ChildSpec, Event, ExitReason,
    Restart,
};
use futures::Stream;
use metrics::{Key, KeyName, Metadata, Recorder, SharedString, Unit};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

use crate::events::worldview::SessionStatus;
use crate::events::{
    AgentRegistered, AgentUntrusted, Bus, CertRotated, CertRotationFailed, ContainmentApplied,
    ExecFinished, ExecForced, ExecRefused, InitStepCompleted, InitStepFailed, Worldview,
};

pub const SESSIONS: &str = "clawker_sessions";
pub const REGISTRATIONS: &str = "clawker_registrations_total";
pub const UNTRUSTED: &str = "clawker_untrusted_total";
pub const INIT_STEP_DURATION: &str = "clawker_init_step_duration_seconds";
pub const BUS_PUBLISHED: &str = "clawker_bus_published_total";
pub const BUS_DROPPED: &str = "clawker_bus_dropped_total";
pub const SUPERVISOR_RESTARTS: &str = "clawker_supervisor_restarts_total";
pub const SUPERVISOR_EXITS: &str = "clawker_supervisor_child_exits_total";
pub const CONTAINMENT_ACTIONS: &str = "clawker_containment_actions_total";
pub const EXEC_TOTAL: &str = "clawker_exec_total";
pub const EXEC_DURATION: &str = "clawker_exec_duration_seconds";
pub const EXEC_BYTES: &str = "clawker_exec_bytes_total";
pub const EXEC_REFUSED: &str = "clawker_exec_refused_total";
pub const EXEC_FORCED: &str = "clawker_exec_forced_total";
pub const CERT_ROTATIONS: &str = "clawker_cert_rotations_total";
pub const CERT_ROTATION_DURATION: &str = "clawker_cert_rotation_seconds";

/// Init steps range from milliseconds (idempotent shell steps) to minutes
/// (post-init scripts).
const STEP_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

const STATUSES: [(SessionStatus, &str); 5] = [
    (SessionStatus::Unknown, "unknown"),
    (SessionStatus::Connecting, "connecting"),
    (SessionStatus::Connected, "connected"),
    (SessionStatus::Failed, "failed"),
    (SessionStatus::Broken, "broken"),
];

/// [`Metrics::install_global`]: the process already has a global recorder
/// (a second CP in one process, as in tests; the first one keeps it). The
/// text is the `metrics` crate's own.
#[derive(Debug, thiserror::Error)]
#[error("attempted to set a recorder after the metrics system was already initialized")]
pub struct RecorderAlreadySet;

/// The CP's metrics recorder and its render handle. Cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    recorder: Arc<PrometheusRecorder>,
    handle: PrometheusHandle,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// Lets one recorder be both local (tests) and global (daemon).
struct SharedRecorder(Arc<PrometheusRecorder>);

impl Recorder for SharedRecorder {
    fn describe_counter(&self, k: KeyName, u: Option<Unit>, d: SharedString) {
        self.0.describe_counter(k, u, d)
    }
    fn describe_gauge(&self, k: KeyName, u: Option<Unit>, d: SharedString) {
        self.0.describe_gauge(k, u, d)
    }
    fn describe_histogram(&self, k: KeyName, u: Option<Unit>, d: SharedString) {
        self.0.describe_histogram(k, u, d)
    }
    fn register_counter(&self, k: &Key, m: &Metadata<'_>) -> metrics::Counter {
        self.0.register_counter(k, m)
    }
    fn register_gauge(&self, k: &Key, m: &Metadata<'_>) -> metrics::Gauge {
        self.0.register_gauge(k, m)
    }
    fn register_histogram(&self, k: &Key, m: &Metadata<'_>) -> metrics::Histogram {
        self.0.register_histogram(k, m)
    }
}

fn exit_kind(r: &ExitReason) -> &'static str {
    match r {
        ExitReason::Normal => "normal",
        ExitReason::Shutdown => "shutdown",
        ExitReason::Error(_) => "error",
        ExitReason::Panic(_) => "panic",
    }
}

fn child_exit_into_current_recorder(exit: &ChildExit) {
    metrics::counter!(SUPERVISOR_EXITS, "supervisor" => exit.supervisor.clone(), "reason" => exit_kind(&exit.reason)).increment(1);
    if exit.restarting {
        metrics::counter!(SUPERVISOR_RESTARTS, "supervisor" => exit.supervisor.clone(), "child" => exit.name.clone()).increment(1);
    }
}

/// Counts a supervisor child exit (and restart) in the *global* recorder;
/// for `SupervisorSpec::on_exit`. A no-op until
/// [`Metrics::install_global`] ran.
pub fn record_child_exit(exit: &ChildExit) {
    child_exit_into_current_recorder(exit);
}

impl Metrics {
    pub fn new() -> Self {
        let builder = PrometheusBuilder::new();
        let builder = builder
            .set_buckets_for_metric(Matcher::Full(INIT_STEP_DURATION.into()), &STEP_BUCKETS)
            .and_then(|b| {
                b.set_buckets_for_metric(Matcher::Full(EXEC_DURATION.into()), &STEP_BUCKETS)
            })
            .unwrap_or_else(|_| PrometheusBuilder::new());
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        let m = Self {
            recorder: Arc::new(recorder),
            handle,
        };
        m.with(|| {
            metrics::describe_gauge!(SESSIONS, "Agent sessions by status (worldview)");
            metrics::describe_counter!(REGISTRATIONS, "Register handshakes by result");
            metrics::describe_counter!(UNTRUSTED, "AgentUntrusted verdicts by reason");
            metrics::describe_histogram!(INIT_STEP_DURATION, Unit::Seconds, "Init step wall time");
            metrics::describe_counter!(BUS_PUBLISHED, "Events accepted by the bus");
            metrics::describe_counter!(BUS_DROPPED, "Events dropped by the bus");
            metrics::describe_counter!(SUPERVISOR_RESTARTS, "Child restarts by supervisor");
            metrics::describe_counter!(SUPERVISOR_EXITS, "Child exits by supervisor and reason");
            metrics::describe_counter!(
                CONTAINMENT_ACTIONS,
                "Containment steps by action and outcome"
            );
            metrics::describe_counter!(
                EXEC_TOTAL,
                "Operator commands in agents, by kind and result"
            );
            metrics::describe_histogram!(
                EXEC_DURATION,
                Unit::Seconds,
                "Operator command wall time"
            );
            metrics::describe_counter!(EXEC_BYTES, "Bytes moved by operator commands");
            metrics::describe_counter!(
                EXEC_REFUSED,
                "Operator commands refused (untrusted/contained agent)"
            );
            metrics::describe_counter!(EXEC_FORCED, "Operator commands forced past a refusal");
            metrics::describe_counter!(CERT_ROTATIONS, "Agent leaf rotations by reason and result");
            metrics::describe_histogram!(
                CERT_ROTATION_DURATION,
                Unit::Seconds,
                "Leaf rotation, CSR received to the new leaf in use"
            );
        });
        m
    }

    /// What `/metrics` renders.
    pub fn handle(&self) -> PrometheusHandle {
        self.handle.clone()
    }

    /// Prometheus text exposition of everything recorded so far.
    pub fn render(&self) -> String {
        self.handle.render()
    }

    /// Installs this recorder as the process-wide one (once per process).
    pub fn install_global(&self) -> Result<(), RecorderAlreadySet> {
        metrics::set_global_recorder(SharedRecorder(self.recorder.clone()))
            .map_err(|_| RecorderAlreadySet)
    }

    fn with<R>(&self, f: impl FnOnce() -> R) -> R {
        metrics::with_local_recorder(&*self.recorder, f)
    }

    /// Counts a supervisor child exit in this recorder.
    pub fn record_child_exit(&self, exit: &ChildExit) {
        self.with(|| child_exit_into_current_recorder(exit));
    }

    /// Bus counters (absolute: the bus keeps the totals).
    pub fn observe_bus(&self, s: &BusStats) {
        self.with(|| {
            metrics::counter!(BUS_PUBLISHED).absolute(s.published);
            metrics::counter!(BUS_DROPPED, "where" => "queue").absolute(s.dropped_queue);
            metrics::counter!(BUS_DROPPED, "where" => "subscribers")
                .absolute(s.dropped_subscribers);
        });
    }

    /// Session gauges from a worldview snapshot (every status, zeros too).
    pub fn observe_worldview(&self, v: &Worldview) {
        self.with(|| {
            for (status, label) in STATUSES {
                let n = v
                    .agents
                    .values()
                    .filter(|a| a.session_status == status)
                    .count();
                metrics::gauge!(SESSIONS, "status" => label).set(n as f64);
            }
        });
    }

    /// Counts one bus event (events it does not know are ignored).
    pub fn observe_event(&self, e: &dyn Event) {
        self.with(|| {
            if let Some(r) = e.downcast_ref::<AgentRegistered>() {
                let result = if r.ok { "ok" } else { "failed" };
                metrics::counter!(REGISTRATIONS, "result" => result).increment(1);
            } else if let Some(u) = e.downcast_ref::<AgentUntrusted>() {
                metrics::counter!(UNTRUSTED, "reason" => u.reason.as_str()).increment(1);
            } else if let Some(s) = e.downcast_ref::<InitStepCompleted>() {
                metrics::histogram!(INIT_STEP_DURATION, "step" => s.step.clone(), "result" => "ok")
                    .record(s.duration.as_secs_f64());
            } else if let Some(s) = e.downcast_ref::<InitStepFailed>() {
                metrics::histogram!(INIT_STEP_DURATION, "step" => s.step.clone(), "result" => "failed")
                    .record(s.duration.as_secs_f64());
            } else if let Some(r) = e.downcast_ref::<CertRotated>() {
                metrics::counter!(CERT_ROTATIONS, "reason" => r.reason.as_str(), "result" => "ok")
                    .increment(1);
                if !r.duration.is_zero() {
                    metrics::histogram!(CERT_ROTATION_DURATION).record(r.duration.as_secs_f64());
                }
            } else if let Some(r) = e.downcast_ref::<CertRotationFailed>() {
                metrics::counter!(CERT_ROTATIONS, "reason" => r.reason.as_str(), "result" => "failed")
                    .increment(1);
            } else if let Some(c) = e.downcast_ref::<ContainmentApplied>() {
                metrics::counter!(CONTAINMENT_ACTIONS, "action" => c.action.as_str(), "outcome" => c.outcome.as_str())
                    .increment(1);
            } else if let Some(x) = e.downcast_ref::<ExecFinished>() {
                let kind = x.kind.as_str();
                let result = match x.exit_code {
                    Some(0) => "ok",
                    Some(_) => "nonzero",
                    None => "failed",
                };
                metrics::counter!(EXEC_TOTAL, "kind" => kind, "result" => result).increment(1);
                metrics::histogram!(EXEC_DURATION, "kind" => kind).record(x.duration.as_secs_f64());
                metrics::counter!(EXEC_BYTES, "kind" => kind, "direction" => "in")
                    .increment(x.bytes_in);
                metrics::counter!(EXEC_BYTES, "kind" => kind, "direction" => "out")
                    .increment(x.bytes_out);
            } else if let Some(x) = e.downcast_ref::<ExecRefused>() {
                metrics::counter!(EXEC_REFUSED, "kind" => x.kind.as_str()).increment(1);
            } else if let Some(x) = e.downcast_ref::<ExecForced>() {
                metrics::counter!(EXEC_FORCED, "kind" => x.kind.as_str()).increment(1);
            }
        });
    }
}

// ---------------------------------------------------------------------------
// Actor

/// Metrics actor settings.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    pub enabled: bool,
    /// Loopback address of `/metrics`, `/healthz`, `/readyz`.
    pub listen: std::net::SocketAddr,
    /// How often the worldview gauges and bus counters are refreshed.
    pub refresh_ms: u64,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: std::net::SocketAddr::from(([127, 0, 0, 1], 7080)),
            // Sub-second: `clawker_sessions` must say what is true within
            // a second of a session ending (issue 15).
            refresh_ms: 500,
        }
    }
}

struct SharedSub(Arc<Mutex<AuditSubscription>>);

impl Stream for SharedSub {
    type Item = Arc<dyn Event>;
    fn poll_next(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Self::Item>> {
        match self.0.lock() {
            Ok(mut s) => Pin::new(&mut *s).poll_next(cx),
            Err(_) => Poll::Ready(None),
        }
    }
}

/// Feeds [`Metrics`] from the bus: counts events as they arrive, and
/// refreshes the worldview gauges and bus counters on a timer.
pub struct MetricsActor {
    metrics: Metrics,
    bus: Bus,
    sub: Arc<Mutex<AuditSubscription>>,
    refresh: Duration,
}

impl MetricsActor {
    /// Fails only if the bus is closed.
    pub fn new(bus: Bus, metrics: Metrics, refresh: Duration) -> Result<Self, BusError> {
        let sub = bus.subscribe_all()?;
        Ok(Self {
            metrics,
            bus,
            sub: Arc::new(Mutex::new(sub)),
            refresh: refresh.max(Duration::from_millis(10)),
        })
    }

    /// Child spec (permanent worker `metrics`).
    pub fn spec(bus: Bus, metrics: Metrics, config: &MetricsConfig) -> ChildSpec {
        let refresh = Duration::from_millis(config.refresh_ms);
        ChildSpec::worker("metrics", move |link: ChildLink| {
            let actor = MetricsActor::new(bus.clone(), metrics.clone(), refresh)
                .map_err(|e| e.to_string())?;
            Ok(MetricsActor::create(move |ctx| {
                link.attach(ctx);
                actor
            }))
        })
        .restart(Restart::Permanent)
    }

    fn drain(&self) {
        let pending: Vec<Arc<dyn Event>> = match self.sub.lock() {
            Ok(mut s) => std::iter::from_fn(|| s.try_recv()).collect(),
            Err(_) => Vec::new(),
        };
        for e in pending {
            self.metrics.observe_event(&*e);
        }
    }

    fn refresh_fut(&self) -> impl std::future::Future<Output = ()> + 'static {
        let bus = self.bus.clone();
        let metrics = self.metrics.clone();
        async move {
            metrics.observe_bus(&bus.stats());
            if let Ok(v) = bus.snapshot().await {
                metrics.observe_worldview(&v);
            }
        }
    }
}

impl Actor for MetricsActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.add_stream(SharedSub(self.sub.clone()));
        ctx.run_interval(self.refresh, |act, ctx| {
            ctx.spawn(wrap_future(act.refresh_fut()));
        });
        ctx.spawn(wrap_future(self.refresh_fut()));
    }
}

impl StreamHandler<Arc<dyn Event>> for MetricsActor {
    fn handle(&mut self, e: Arc<dyn Event>, _: &mut Context<Self>) {
        self.metrics.observe_event(&*e);
    }
}

/// Counts every event already delivered to the actor, then refreshes the
/// gauges and bus counters; resolves when done. After `bus.flush()`, the
/// metrics reflect everything published before it.
#[derive(Message)]
#[rtype(result = "()")]
pub struct RefreshMetrics;

impl Handler<RefreshMetrics> for MetricsActor {
    type Result = ResponseFuture<()>;
    fn handle(&mut self, _: RefreshMetrics, _: &mut Context<Self>) -> Self::Result {
        self.drain();
        Box::pin(self.refresh_fut())
    }
}

/// A child exit, for wiring `on_exit` to the actor instead of the global
/// recorder: `on_exit(move |e| addr.do_send(ChildExited(e.clone())))`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ChildExited(pub ChildExit);

impl Handler<ChildExited> for MetricsActor {
    type Result = ();
    fn handle(&mut self, ChildExited(e): ChildExited, _: &mut Context<Self>) {
        self.metrics.record_child_exit(&e);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_events_feed_the_exec_counters_and_histogram() {
        use crate::events::{AgentRef, ExecFinished, ExecForced, ExecKind, ExecRefused, now};
        let m = Metrics::new();
        let agent = AgentRef::new("c1", "dev", "p");
        let finished = |exit_code, kind| ExecFinished {
            agent: agent.clone(),
            exec_id: "x".into(),
            kind,
            operator: "ab".into(),
            argv: vec!["true".into()],
            user: "claude".into(),
            tty: false,
            exit_code,
            error: String::new(),
            duration: std::time::Duration::from_millis(3),
            bytes_in: 5,
            bytes_out: 7,
            at: now(),
        };
        m.observe_event(&finished(Some(0), ExecKind::Exec));
        m.observe_event(&finished(Some(2), ExecKind::Exec));
        m.observe_event(&finished(None, ExecKind::CopyTo));
        m.observe_event(&ExecRefused {
            agent: agent.clone(),
            kind: ExecKind::Exec,
            operator: "ab".into(),
            argv: vec![],
            reasons: vec!["locked".into()],
            at: now(),
        });
        m.observe_event(&ExecForced {
            agent,
            exec_id: "y".into(),
            kind: ExecKind::CopyFrom,
            operator: "ab".into(),
            argv: vec![],
            reasons: vec!["quarantined".into()],
            at: now(),
        });
        let text = m.render();
        for line in [
            "clawker_exec_total{kind=\"exec\",result=\"ok\"} 1",
            "clawker_exec_total{kind=\"exec\",result=\"nonzero\"} 1",
            "clawker_exec_total{kind=\"copy_to\",result=\"failed\"} 1",
            "clawker_exec_bytes_total{kind=\"exec\",direction=\"out\"} 14",
            "clawker_exec_refused_total{kind=\"exec\"} 1",
            "clawker_exec_forced_total{kind=\"copy_from\"} 1",
            "clawker_exec_duration_seconds_count{kind=\"exec\"} 2",
        ] {
            assert!(text.contains(line), "{line} missing in:\n{text}");
        }
    }

    #[test]
    fn recorder_already_set_keeps_the_metrics_crate_text() {
        assert_eq!(
            RecorderAlreadySet.to_string(),
            metrics::SetRecorderError(()).to_string()
        );
    }
}
