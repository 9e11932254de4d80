//! Containment: the policy actor that acts on untrusted (or failing)
//! agents.
//!
//! Why this exists at all: the CP never drops a session for identity
//! reasons (asymmetric trust, DESIGN §1), precisely so that *this* actor can
//! still reach a bad agent. The dialer publishes `AgentUntrusted`; this
//! actor maps triggers to an ordered **ladder** of actions and runs it:
//!
//! | action    | what it does                                                    |
//! |-----------|-----------------------------------------------------------------|
//! | `alert`   | structured `warn!` + event, changes nothing                     |
//! | `isolate` | disconnect from every Docker network except the kept one        |
//! | `lock`    | over the open session, as root: drop all egress except the CP   |
//! | `stop`    | `docker stop`                                                   |
//! | `kill`    | `docker kill`                                                   |
//!
//! Every step is idempotent (isolate on an isolated container is
//! `already_applied`, kill on a dead one `already_stopped`) and publishes one
//! [`ContainmentApplied`]. Idempotency is what makes containment survive a CP
//! restart without spam: every new session re-publishes `AgentUntrusted`,
//! the ladder runs again, and steps already in force report so instead of
//! acting twice.
//!
//! Side effects sit behind two narrow seams so the ladder is testable
//! without an engine or a session: [`ContainmentOps`] (Docker) and
//! [`SessionCommands`] (run a root shell command over the agent's session).
//! Ladders for one container run one at a time, in trigger order; different
//! containers are contained concurrently.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::fut::wrap_future;
use actix::prelude::*;
use clawker_actors::{ChildLink, ChildSpec, Restart};
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use crate::events::{
    self, AgentUntrusted, ContainmentAction, ContainmentApplied, ContainmentOutcome, InitFailed,
    Publish, SessionFailed, UntrustedReason,
};

// ---------------------------------------------------------------------------
// Configuration

/// What fires a rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TriggerKind {
    /// `AgentUntrusted` (optionally only for some reasons).
    Untrusted,
    /// `InitFailed`.
    InitFailed,
    /// `SessionFailed` `count` times within `window_secs` for one container.
    SessionFailed,
}

/// One rule: a trigger and the ladder it runs. TOML:
///
/// ```toml
/// [[containment.rules]]
/// on = "untrusted"
/// reasons = ["cert_thumbprint_mismatch", "cert_invalid"]   # empty = any
/// actions = ["alert", "isolate", "lock"]
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub on: TriggerKind,
    /// For `untrusted`: which reasons match (empty = every reason).
    #[serde(default)]
    pub reasons: Vec<UntrustedReason>,
    /// For `session_failed`: failures needed within the window.
    #[serde(default = "default_failures")]
    pub count: u32,
    /// For `session_failed`: the sliding window.
    #[serde(default = "default_window_secs")]
    pub window_secs: u64,
    /// Run in order; each step is reported on its own.
    pub actions: Vec<ContainmentAction>,
}

fn default_failures() -> u32 {
    5
}
fn default_window_secs() -> u64 {
    60
}

/// Containment policy. `Default` is the safe policy: every untrusted agent
/// (any reason) is alerted on and isolated; nothing else fires.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ContainmentConfig {
    /// Master switch (the actor still runs, but ignores triggers).
    pub enabled: bool,
    /// Log and publish `dry_run` outcomes, change nothing.
    pub dry_run: bool,
    /// The network `isolate` keeps (the one the CP reaches clawkerd on).
    pub keep_network: String,
    /// Address (IP or CIDR) the `lock` firewall still lets the agent reach,
    /// e.g. the CP's address on `clawker-net` for the agent API. Replies on
    /// connections the CP opened (the session) are always allowed.
    pub lock_allow: Option<String>,
    /// Bound on the lock command over the session.
    pub lock_timeout_secs: u32,
    /// Grace period `stop` gives the container before SIGKILL.
    pub stop_timeout_secs: u32,
    pub rules: Vec<Rule>,
}

impl Default for ContainmentConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            dry_run: false,
            keep_network: crate::docker::NETWORK.to_owned(),
            lock_allow: None,
            lock_timeout_secs: 15,
            stop_timeout_secs: 10,
            rules: vec![Rule {
                on: TriggerKind::Untrusted,
                reasons: Vec::new(),
                count: default_failures(),
                window_secs: default_window_secs(),
                actions: vec![ContainmentAction::Alert, ContainmentAction::Isolate],
            }],
        }
    }
}

/// A trigger as it happened (what the `trigger` field of the event says).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    Untrusted(UntrustedReason),
    InitFailed,
    SessionFailedRepeated { count: u32 },
}

impl std::fmt::Display for Trigger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Trigger::Untrusted(r) => write!(f, "untrusted:{}", r.as_str()),
            Trigger::InitFailed => f.write_str("init_failed"),
            Trigger::SessionFailedRepeated { count } => {
                write!(f, "session_failed_repeated:{count}")
            }
        }
    }
}

impl ContainmentConfig {
    /// The ladder a trigger runs: actions of every matching rule, in rule
    /// order, without repeats.
    pub fn ladder(&self, trigger: Trigger) -> Vec<ContainmentAction> {
        let mut out: Vec<ContainmentAction> = Vec::new();
        for rule in &self.rules {
            let hit = match (rule.on, trigger) {
                (TriggerKind::Untrusted, Trigger::Untrusted(r)) => {
                    rule.reasons.is_empty() || rule.reasons.contains(&r)
                }
                (TriggerKind::InitFailed, Trigger::InitFailed) => true,
                (TriggerKind::SessionFailed, Trigger::SessionFailedRepeated { count }) => {
                    count >= rule.count.max(1)
                }
                _ => false,
            };
            if hit {
                for a in &rule.actions {
                    if !out.contains(a) {
                        out.push(*a);
                    }
                }
            }
        }
        out
    }

    /// The smallest `session_failed` threshold and its window, if any rule
    /// listens for repeated session failures.
    fn session_failed_threshold(&self) -> Option<(u32, Duration)> {
        self.rules
            .iter()
            .filter(|r| r.on == TriggerKind::SessionFailed && !r.actions.is_empty())
            .map(|r| (r.count.max(1), Duration::from_secs(r.window_secs.max(1))))
            .min_by_key(|(c, _)| *c)
    }
}

// ---------------------------------------------------------------------------
// Seams

/// Errors of the Docker seam.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpsError {
    #[error("container {0} not found")]
    NotFound(String),
    #[error("docker: {0}")]
    Api(String),
}

/// Result of stop/kill.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// This call stopped it.
    Now,
    /// It was not running.
    Already,
}

/// The Docker operations containment needs, and nothing more.
pub trait ContainmentOps: Send + Sync + 'static {
    /// Names of the networks the container is attached to.
    fn networks_of<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Vec<String>, OpsError>>;
    /// Disconnect; disconnecting a network it is not on is `Ok`.
    fn disconnect<'a>(
        &'a self,
        id: &'a str,
        network: &'a str,
    ) -> BoxFuture<'a, Result<(), OpsError>>;
    fn stop<'a>(&'a self, id: &'a str, grace: Duration)
    -> BoxFuture<'a, Result<Stopped, OpsError>>;
    fn kill<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Stopped, OpsError>>;
}

/// [`ContainmentOps`] on the Docker Engine API (bollard).
#[derive(Clone)]
pub struct BollardOps {
    docker: bollard::Docker,
}

impl BollardOps {
    pub fn new(docker: bollard::Docker) -> Self {
        Self { docker }
    }

    async fn running(&self, id: &str) -> Result<bool, OpsError> {
        crate::docker::inspect::inspect(&self.docker, id)
            .await
            .map(|f| f.running)
            .map_err(|e| map_docker(id, e))
    }
}

fn map_docker(id: &str, e: crate::docker::DockerError) -> OpsError {
    match e {
        crate::docker::DockerError::NotFound(_) => OpsError::NotFound(id.to_owned()),
        other => OpsError::Api(other.to_string()),
    }
}

fn map_bollard(id: &str, e: bollard::errors::Error) -> OpsError {
    map_docker(id, crate::docker::DockerError::for_container(id, e))
}

fn is_not_running(e: &bollard::errors::Error) -> bool {
    matches!(
        e,
        bollard::errors::Error::DockerResponseServerError { status_code: 409, message }
            if message.contains("not running")
    )
}

impl ContainmentOps for BollardOps {
    fn networks_of<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Vec<String>, OpsError>> {
        Box::pin(async move {
            crate::docker::inspect::inspect(&self.docker, id)
                .await
                .map(|f| f.networks)
                .map_err(|e| map_docker(id, e))
        })
    }

    fn disconnect<'a>(
        &'a self,
        id: &'a str,
        network: &'a str,
    ) -> BoxFuture<'a, Result<(), OpsError>> {
        Box::pin(async move {
            let req = bollard::models::NetworkDisconnectRequest {
                container: id.to_owned(),
                force: Some(true),
            };
            match self.docker.disconnect_network(network, req).await {
                Ok(()) => Ok(()),
                // Already gone from that network: the goal state holds.
                Err(bollard::errors::Error::DockerResponseServerError { message, .. })
                    if message.contains("is not connected") =>
                {
                    Ok(())
                }
                Err(e) => Err(map_bollard(id, e)),
            }
        })
    }

    fn stop<'a>(
        &'a self,
        id: &'a str,
        grace: Duration,
    ) -> BoxFuture<'a, Result<Stopped, OpsError>> {
        Box::pin(async move {
            // The engine answers 304 for an already stopped container, which
            // bollard reports as Ok: ask first so the outcome is honest.
            if !self.running(id).await? {
                return Ok(Stopped::Already);
            }
            let opts = bollard::query_parameters::StopContainerOptions {
                t: Some(i32::try_from(grace.as_secs()).unwrap_or(i32::MAX)),
                signal: None,
            };
            match self.docker.stop_container(id, Some(opts)).await {
                Ok(()) => Ok(Stopped::Now),
                Err(e) if is_not_running(&e) => Ok(Stopped::Already),
                Err(e) => Err(map_bollard(id, e)),
            }
        })
    }

    fn kill<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Stopped, OpsError>> {
        Box::pin(async move {
            match self.docker.kill_container(id, None).await {
                Ok(()) => Ok(Stopped::Now),
                Err(e) if is_not_running(&e) => Ok(Stopped::Already),
                Err(e) => Err(map_bollard(id, e)),
            }
        })
    }
}

/// In-memory [`ContainmentOps`] for tests and examples: containers with
/// networks and a running flag, and a log of every mutating call.
#[derive(Clone, Default)]
pub struct MemoryOps {
    state: Arc<Mutex<MemoryState>>,
}

#[derive(Default)]
struct MemoryState {
    containers: HashMap<String, (Vec<String>, bool)>,
    calls: Vec<String>,
}

impl MemoryOps {
    /// Adds a running container attached to `networks`.
    pub fn add(&self, id: &str, networks: &[&str]) {
        if let Ok(mut s) = self.state.lock() {
            s.containers.insert(
                id.to_owned(),
                (networks.iter().map(|n| (*n).to_owned()).collect(), true),
            );
        }
    }

    pub fn networks(&self, id: &str) -> Option<Vec<String>> {
        self.state
            .lock()
            .ok()
            .and_then(|s| s.containers.get(id).map(|c| c.0.clone()))
    }

    pub fn running(&self, id: &str) -> Option<bool> {
        self.state
            .lock()
            .ok()
            .and_then(|s| s.containers.get(id).map(|c| c.1))
    }

    /// Mutating calls that changed something, e.g. `disconnect c1 net-b`.
    pub fn calls(&self) -> Vec<String> {
        self.state
            .lock()
            .map(|s| s.calls.clone())
            .unwrap_or_default()
    }

    fn with<R>(
        &self,
        id: &str,
        f: impl FnOnce(&mut (Vec<String>, bool), &mut Vec<String>) -> R,
    ) -> Result<R, OpsError> {
        let mut s = self
            .state
            .lock()
            .map_err(|_| OpsError::Api("poisoned".into()))?;
        let MemoryState { containers, calls } = &mut *s;
        let c = containers
            .get_mut(id)
            .ok_or_else(|| OpsError::NotFound(id.to_owned()))?;
        Ok(f(c, calls))
    }
}

impl ContainmentOps for MemoryOps {
    fn networks_of<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Vec<String>, OpsError>> {
        let r = self.with(id, |c, _| c.0.clone());
        Box::pin(async move { r })
    }

    fn disconnect<'a>(
        &'a self,
        id: &'a str,
        network: &'a str,
    ) -> BoxFuture<'a, Result<(), OpsError>> {
        let r = self.with(id, |c, calls| {
            if let Some(pos) = c.0.iter().position(|n| n == network) {
                c.0.remove(pos);
                calls.push(format!("disconnect {id} {network}"));
            }
        });
        Box::pin(async move { r })
    }

    fn stop<'a>(&'a self, id: &'a str, _: Duration) -> BoxFuture<'a, Result<Stopped, OpsError>> {
        let r = self.with(id, |c, calls| {
            if c.1 {
                c.1 = false;
                calls.push(format!("stop {id}"));
                Stopped::Now
            } else {
                Stopped::Already
            }
        });
        Box::pin(async move { r })
    }

    fn kill<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Stopped, OpsError>> {
        let r = self.with(id, |c, calls| {
            if c.1 {
                c.1 = false;
                calls.push(format!("kill {id}"));
                Stopped::Now
            } else {
                Stopped::Already
            }
        });
        Box::pin(async move { r })
    }
}

/// What a shell command run over a session ended with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandOutput {
    pub exit_code: i32,
    pub stderr: String,
}

/// Errors of the session seam.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionCommandError {
    #[error("no open session to the container")]
    NoSession,
    #[error("session transport: {0}")]
    Transport(String),
    #[error("clawkerd refused or failed the command: {0}")]
    Remote(String),
    #[error("no terminal response within {0:?}")]
    Timeout(Duration),
}

/// Run a shell script as root inside a container over its open session.
pub trait SessionCommands: Send + Sync + 'static {
    fn run_root<'a>(
        &'a self,
        container_id: &'a str,
        script: &'a str,
        env: HashMap<String, String>,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<CommandOutput, SessionCommandError>>;
}

/// No session access (containment without `lock`, or tests).
#[derive(Clone, Copy, Default)]
pub struct NoSessions;

impl SessionCommands for NoSessions {
    fn run_root<'a>(
        &'a self,
        _: &'a str,
        _: &'a str,
        _: HashMap<String, String>,
        _: Duration,
    ) -> BoxFuture<'a, Result<CommandOutput, SessionCommandError>> {
        Box::pin(async { Err(SessionCommandError::NoSession) })
    }
}

/// [`SessionCommands`] over the dialer: `LiveSessionOf(id)` gives the
/// session's mux, and the command runs like an init step.
#[derive(Clone)]
pub struct DialerSessions {
    dialer: crate::session::actor::DialerSlot,
    seq: Arc<std::sync::atomic::AtomicU64>,
}

impl DialerSessions {
    /// Over wherever the dialer currently lives (it may be restarted).
    pub fn new(dialer: crate::session::actor::DialerSlot) -> Self {
        Self {
            dialer,
            seq: Arc::default(),
        }
    }
}

/// stderr kept from a containment command.
const MAX_STDERR: usize = 2048;

impl SessionCommands for DialerSessions {
    fn run_root<'a>(
        &'a self,
        container_id: &'a str,
        script: &'a str,
        env: HashMap<String, String>,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<CommandOutput, SessionCommandError>> {
        use crate::proto::clawkerd::v1::{self as pb, command, response};
        use crate::session::mux::command as cmd;
        Box::pin(async move {
            let dialer = self
                .dialer
                .load_full()
                .ok_or_else(|| SessionCommandError::Transport("dialer not running".into()))?;
            let live = dialer
                .send(crate::session::actor::LiveSessionOf(
                    container_id.to_owned(),
                ))
                .await
                .map_err(|e| SessionCommandError::Transport(e.to_string()))?
                .ok_or(SessionCommandError::NoSession)?;
            let n = self.seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let prefix = container_id.get(..12).unwrap_or(container_id);
            let id = format!("contain-{prefix}-{n}");
            let mux = &live.mux;
            let mut replies = mux
                .route(&id)
                .map_err(|e| SessionCommandError::Transport(e.to_string()))?;
            let shell = pb::ShellCommand {
                stages: vec![pb::PipeStage {
                    argv: vec!["sh".into(), "-c".into(), script.to_owned()],
                    uid: 0,
                    gid: 0,
                    cwd: String::new(),
                    env,
                }],
                timeout_seconds: u32::try_from(timeout.as_secs().max(1)).unwrap_or(u32::MAX),
                initial_stdin: Vec::new(),
                print_output: false,
                exit_on_non_zero: false,
            };
            let send = |p| {
                let c = cmd(&id, p);
                async move {
                    mux.send(c)
                        .await
                        .map_err(|e| SessionCommandError::Transport(e.to_string()))
                }
            };
            send(command::Payload::Shell(shell)).await?;
            send(command::Payload::CloseStdin(pb::CloseStdin {})).await?;
            let bound = timeout + Duration::from_secs(5);
            let deadline = tokio::time::Instant::now() + bound;
            let mut stderr = Vec::new();
            loop {
                let resp = match tokio::time::timeout_at(deadline, replies.next()).await {
                    Err(_) => return Err(SessionCommandError::Timeout(bound)),
                    Ok(None) => {
                        return Err(SessionCommandError::Transport(
                            "stream ended before the terminal response".into(),
                        ));
                    }
                    Ok(Some(r)) => r,
                };
                match resp.payload {
                    Some(response::Payload::Stderr(c)) => {
                        let room = MAX_STDERR.saturating_sub(stderr.len());
                        stderr.extend_from_slice(&c.data[..room.min(c.data.len())]);
                    }
                    Some(response::Payload::Done(d)) => {
                        return Ok(CommandOutput {
                            exit_code: d.final_exit_code,
                            stderr: String::from_utf8_lossy(&stderr).trim().to_owned(),
                        });
                    }
                    Some(response::Payload::Error(e)) => {
                        return Err(SessionCommandError::Remote(format!(
                            "{}: {}",
                            e.code().as_str_name(),
                            e.message
                        )));
                    }
                    _ => {}
                }
            }
        })
    }
}

// ---------------------------------------------------------------------------
// The ladder

/// Exit code of [`LOCK_SCRIPT`] when the lock is already in place.
pub const LOCK_ALREADY: i32 = 3;

/// Installs the drop-all-egress lock: loopback, replies on established
/// connections (the CP's session is one the CP opened *into* the
/// container) and `$CLAWKER_LOCK_ALLOW` (if set) stay open; everything else
/// leaving the container is dropped. iptables first, nft as a fallback.
/// Needs root *and* `CAP_NET_ADMIN`; without either it exits non-zero with
/// the tool's own error on stderr. Idempotent: exits [`LOCK_ALREADY`] when
/// the chain/table is already hooked.
pub const LOCK_SCRIPT: &str = r#"ALLOW="${CLAWKER_LOCK_ALLOW:-}"
if command -v iptables >/dev/null 2>&1; then
  if iptables -C OUTPUT -j CLAWKER-LOCK 2>/dev/null; then exit 3; fi
  iptables -N CLAWKER-LOCK 2>/dev/null || iptables -F CLAWKER-LOCK || exit $?
  iptables -A CLAWKER-LOCK -o lo -j ACCEPT || exit $?
  iptables -A CLAWKER-LOCK -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT || exit $?
  if [ -n "$ALLOW" ]; then iptables -A CLAWKER-LOCK -d "$ALLOW" -j ACCEPT || exit $?; fi
  iptables -A CLAWKER-LOCK -j DROP || exit $?
  iptables -I OUTPUT 1 -j CLAWKER-LOCK || exit $?
  exit 0
elif command -v nft >/dev/null 2>&1; then
  if nft list table inet clawker_lock >/dev/null 2>&1; then exit 3; fi
  RULES="add table inet clawker_lock
add chain inet clawker_lock out { type filter hook output priority 0; policy drop; }
add rule inet clawker_lock out oif lo accept
add rule inet clawker_lock out ct state established,related accept"
  if [ -n "$ALLOW" ]; then RULES="$RULES
add rule inet clawker_lock out ip daddr $ALLOW accept"; fi
  printf '%s\n' "$RULES" | nft -f - || exit $?
  exit 0
else
  echo "neither iptables nor nft is installed in the container" >&2
  exit 127
fi"#;

/// Everything a ladder run needs; shared by the actor's tasks.
pub struct Containment {
    pub config: ContainmentConfig,
    pub ops: Arc<dyn ContainmentOps>,
    pub sessions: Arc<dyn SessionCommands>,
}

/// Who a ladder runs against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub container_id: String,
    pub agent: String,
    pub project: String,
}

impl Containment {
    /// Runs the ladder for `trigger`, publishing one event per step, and
    /// returns the events (in order).
    pub async fn run<P: Publish>(
        &self,
        target: &Target,
        trigger: Trigger,
        publish: &P,
    ) -> Vec<ContainmentApplied> {
        let mut out = Vec::new();
        if !self.config.enabled {
            return out;
        }
        for action in self.config.ladder(trigger) {
            let (outcome, detail) = self.step(&target.container_id, action).await;
            let ev = ContainmentApplied {
                container_id: target.container_id.clone(),
                agent: target.agent.clone(),
                project: target.project.clone(),
                trigger: trigger.to_string(),
                action,
                outcome,
                detail,
                at: events::now(),
            };
            log_step(&ev);
            publish.publish(ev.clone());
            out.push(ev);
        }
        out
    }

    /// One step: (outcome, human detail).
    pub async fn step(&self, id: &str, action: ContainmentAction) -> (ContainmentOutcome, String) {
        use ContainmentOutcome as O;
        let dry = self.config.dry_run;
        match action {
            ContainmentAction::Alert => (
                if dry { O::DryRun } else { O::Applied },
                "alert raised".into(),
            ),
            ContainmentAction::Isolate => {
                let keep = &self.config.keep_network;
                let nets = match self.ops.networks_of(id).await {
                    Ok(n) => n,
                    Err(e) => return ops_failure(e),
                };
                let extra: Vec<&String> = nets.iter().filter(|n| *n != keep).collect();
                if extra.is_empty() {
                    return (
                        O::AlreadyApplied,
                        format!("attached only to [{}]", nets.join(", ")),
                    );
                }
                let list = extra
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ");
                if dry {
                    return (
                        O::DryRun,
                        format!("would disconnect from [{list}], keep {keep}"),
                    );
                }
                for net in &extra {
                    if let Err(e) = self.ops.disconnect(id, net).await {
                        let (o, d) = ops_failure(e);
                        return (o, format!("disconnect {net}: {d}"));
                    }
                }
                (
                    O::Applied,
                    format!("disconnected from [{list}], kept {keep}"),
                )
            }
            ContainmentAction::Lock => {
                if dry {
                    return (
                        O::DryRun,
                        "would install the egress lock over the session".into(),
                    );
                }
                let mut env = HashMap::new();
                if let Some(a) = &self.config.lock_allow {
                    env.insert("CLAWKER_LOCK_ALLOW".to_owned(), a.clone());
                }
                let timeout = Duration::from_secs(u64::from(self.config.lock_timeout_secs.max(1)));
                match self.sessions.run_root(id, LOCK_SCRIPT, env, timeout).await {
                    Ok(o) if o.exit_code == 0 => (O::Applied, "egress lock installed".into()),
                    Ok(o) if o.exit_code == LOCK_ALREADY => {
                        (O::AlreadyApplied, "egress lock already installed".into())
                    }
                    Ok(o) => (
                        O::Unsupported,
                        format!(
                            "lock command failed (needs root, CAP_NET_ADMIN and iptables or nft): exit_code={}; stderr: {}",
                            o.exit_code, o.stderr
                        ),
                    ),
                    Err(e @ SessionCommandError::NoSession) => (O::Unsupported, e.to_string()),
                    Err(e) => (O::Failed, e.to_string()),
                }
            }
            ContainmentAction::Stop | ContainmentAction::Kill => {
                let verb = action.as_str();
                if dry {
                    return (O::DryRun, format!("would {verb} the container"));
                }
                let grace = Duration::from_secs(u64::from(self.config.stop_timeout_secs));
                let r = if action == ContainmentAction::Stop {
                    self.ops.stop(id, grace).await
                } else {
                    self.ops.kill(id).await
                };
                match r {
                    Ok(Stopped::Now) => (O::Applied, format!("container {verb}ped")),
                    Ok(Stopped::Already) => (O::AlreadyStopped, "container was not running".into()),
                    Err(e) => ops_failure(e),
                }
            }
        }
    }
}

fn ops_failure(e: OpsError) -> (ContainmentOutcome, String) {
    match e {
        OpsError::NotFound(_) => (ContainmentOutcome::NotFound, e.to_string()),
        OpsError::Api(_) => (ContainmentOutcome::Failed, e.to_string()),
    }
}

fn log_step(ev: &ContainmentApplied) {
    let fields = (
        ev.container_id.as_str(),
        ev.agent.as_str(),
        ev.project.as_str(),
        ev.trigger.as_str(),
        ev.action.as_str(),
        ev.outcome.as_str(),
        ev.detail.as_str(),
    );
    let (container_id, agent, project, trigger, action, outcome, detail) = fields;
    match ev.outcome {
        ContainmentOutcome::Failed | ContainmentOutcome::Unsupported => tracing::error!(
            event = "containment_applied",
            container_id,
            agent,
            project,
            trigger,
            action,
            outcome,
            detail,
            "containment step did not take effect"
        ),
        _ => tracing::warn!(
            event = "containment_applied",
            container_id,
            agent,
            project,
            trigger,
            action,
            outcome,
            detail,
            "containment step"
        ),
    }
}

// ---------------------------------------------------------------------------
// The actor

/// The containment actor: subscribes to its triggers on the bus and runs
/// ladders. Runs as a supervised worker ([`ContainmentActor::spec`]).
pub struct ContainmentActor {
    core: Arc<Containment>,
    bus: crate::events::Bus,
    /// One lock per container: ladders for it run in trigger order.
    serial: HashMap<String, Arc<tokio::sync::Mutex<()>>>,
    /// Recent SessionFailed instants per container.
    failures: HashMap<String, VecDeque<Instant>>,
}

impl ContainmentActor {
    /// Child spec for the policy supervisor (permanent worker named
    /// `containment`). Each (re)start subscribes afresh.
    pub fn spec(
        bus: crate::events::Bus,
        config: ContainmentConfig,
        ops: Arc<dyn ContainmentOps>,
        sessions: Arc<dyn SessionCommands>,
    ) -> ChildSpec {
        let core = Arc::new(Containment {
            config,
            ops,
            sessions,
        });
        ChildSpec::worker("containment", move |link: ChildLink| {
            let core = core.clone();
            let bus = bus.clone();
            let subs = subscribe(&bus).map_err(|e| e.to_string())?;
            Ok(ContainmentActor::create(move |ctx| {
                link.attach(ctx);
                ctx.add_stream(subs.0);
                ctx.add_stream(subs.1);
                ctx.add_stream(subs.2);
                ContainmentActor {
                    core,
                    bus,
                    serial: HashMap::new(),
                    failures: HashMap::new(),
                }
            }))
        })
        .restart(Restart::Permanent)
    }
}

type Subs = (
    clawker_actors::Subscription<AgentUntrusted>,
    clawker_actors::Subscription<InitFailed>,
    clawker_actors::Subscription<SessionFailed>,
);

fn subscribe(bus: &crate::events::Bus) -> Result<Subs, clawker_actors::BusError> {
    Ok((bus.subscribe()?, bus.subscribe()?, bus.subscribe()?))
}

impl Actor for ContainmentActor {
    type Context = Context<Self>;
    fn started(&mut self, _: &mut Context<Self>) {
        let c = &self.core.config;
        tracing::info!(
            event = "containment_started",
            enabled = c.enabled,
            dry_run = c.dry_run,
            keep_network = %c.keep_network,
            rules = c.rules.len(),
            "containment policy active"
        );
    }
}

impl ContainmentActor {
    fn fire(&mut self, target: Target, trigger: Trigger, ctx: &mut Context<Self>) {
        if !self.core.config.enabled || self.core.config.ladder(trigger).is_empty() {
            return;
        }
        let lock = self
            .serial
            .entry(target.container_id.clone())
            .or_default()
            .clone();
        let core = self.core.clone();
        let publish = self.bus.clone();
        // ctx.spawn: the ladder belongs to this actor; a restart cancels it
        // between steps rather than leaving an orphan acting on old config.
        ctx.spawn(wrap_future(async move {
            let _turn = lock.lock().await;
            core.run(&target, trigger, &publish).await;
        }));
        // Keep the serial map small: forget locks nobody holds.
        self.serial.retain(|_, l| Arc::strong_count(l) > 1);
    }
}

impl StreamHandler<Arc<AgentUntrusted>> for ContainmentActor {
    fn handle(&mut self, e: Arc<AgentUntrusted>, ctx: &mut Context<Self>) {
        let t = Target {
            container_id: e.container_id.clone(),
            agent: e.agent.clone(),
            project: e.project.clone(),
        };
        self.fire(t, Trigger::Untrusted(e.reason), ctx);
    }
}

impl StreamHandler<Arc<InitFailed>> for ContainmentActor {
    fn handle(&mut self, e: Arc<InitFailed>, ctx: &mut Context<Self>) {
        let t = Target {
            container_id: e.container_id.clone(),
            agent: e.agent.clone(),
            project: e.project.clone(),
        };
        self.fire(t, Trigger::InitFailed, ctx);
    }
}

impl StreamHandler<Arc<SessionFailed>> for ContainmentActor {
    fn handle(&mut self, e: Arc<SessionFailed>, ctx: &mut Context<Self>) {
        let Some((count, window)) = self.core.config.session_failed_threshold() else {
            return;
        };
        let now = Instant::now();
        let q = self.failures.entry(e.container_id.clone()).or_default();
        q.push_back(now);
        while q.front().is_some_and(|t| now.duration_since(*t) > window) {
            q.pop_front();
        }
        if q.len() >= count as usize {
            let n = q.len() as u32;
            q.clear(); // the next ladder needs `count` fresh failures
            let t = Target {
                container_id: e.container_id.clone(),
                agent: e.agent.clone(),
                project: e.project.clone(),
            };
            self.fire(t, Trigger::SessionFailedRepeated { count: n }, ctx);
        }
        self.failures.retain(|_, q| !q.is_empty());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::RecordingSink;
    use ContainmentAction as A;
    use ContainmentOutcome as O;

    /// (container id, env) of every command run.
    type Seen = (String, HashMap<String, String>);

    /// Scripted session: answers every command with the next result.
    #[derive(Clone, Default)]
    struct ScriptedSessions {
        answers: Arc<Mutex<VecDeque<Result<CommandOutput, SessionCommandError>>>>,
        seen: Arc<Mutex<Vec<Seen>>>,
    }

    impl ScriptedSessions {
        fn answer(&self, r: Result<CommandOutput, SessionCommandError>) {
            self.answers.lock().unwrap().push_back(r);
        }
    }

    impl SessionCommands for ScriptedSessions {
        fn run_root<'a>(
            &'a self,
            id: &'a str,
            _: &'a str,
            env: HashMap<String, String>,
            _: Duration,
        ) -> BoxFuture<'a, Result<CommandOutput, SessionCommandError>> {
            self.seen.lock().unwrap().push((id.to_owned(), env));
            let r = self
                .answers
                .lock()
                .unwrap()
                .pop_front()
                .unwrap_or(Err(SessionCommandError::NoSession));
            Box::pin(async move { r })
        }
    }

    fn target(id: &str) -> Target {
        Target {
            container_id: id.into(),
            agent: "dev".into(),
            project: "web".into(),
        }
    }

    fn setup(
        actions: Vec<ContainmentAction>,
        dry_run: bool,
    ) -> (Containment, MemoryOps, ScriptedSessions) {
        let ops = MemoryOps::default();
        ops.add("c1", &["clawker-net", "bridge", "corp-lan"]);
        let sessions = ScriptedSessions::default();
        let config = ContainmentConfig {
            dry_run,
            lock_allow: Some("10.9.0.1".into()),
            rules: vec![Rule {
                on: TriggerKind::Untrusted,
                reasons: vec![],
                count: 1,
                window_secs: 1,
                actions,
            }],
            ..ContainmentConfig::default()
        };
        let c = Containment {
            config,
            ops: Arc::new(ops.clone()),
            sessions: Arc::new(sessions.clone()),
        };
        (c, ops, sessions)
    }

    const MISMATCH: Trigger = Trigger::Untrusted(UntrustedReason::CertThumbprintMismatch);

    fn outcomes(evs: &[ContainmentApplied]) -> Vec<(A, O)> {
        evs.iter().map(|e| (e.action, e.outcome)).collect()
    }

    #[test]
    fn default_policy_alerts_and_isolates_every_untrusted_reason_and_nothing_else() {
        let c = ContainmentConfig::default();
        for r in [
            UntrustedReason::CertThumbprintMismatch,
            UntrustedReason::CertInvalid,
            UntrustedReason::CertCnMismatch,
            UntrustedReason::RegisterFailed,
        ] {
            assert_eq!(c.ladder(Trigger::Untrusted(r)), vec![A::Alert, A::Isolate]);
        }
        assert!(c.ladder(Trigger::InitFailed).is_empty());
        assert!(
            c.ladder(Trigger::SessionFailedRepeated { count: 100 })
                .is_empty()
        );
        assert!(!c.dry_run);
        assert_eq!(c.keep_network, "clawker-net");
    }

    #[test]
    fn trigger_mapping_from_toml_by_reason_and_threshold() {
        let c: ContainmentConfig = toml::from_str(
            r#"
            keep_network = "cp-net"
            [[rules]]
            on = "untrusted"
            reasons = ["cert_invalid", "register_failed"]
            actions = ["alert", "isolate", "lock"]
            [[rules]]
            on = "untrusted"
            actions = ["alert"]
            [[rules]]
            on = "init_failed"
            actions = ["stop"]
            [[rules]]
            on = "session_failed"
            count = 3
            window_secs = 30
            actions = ["kill"]
            "#,
        )
        .unwrap();
        assert_eq!(c.keep_network, "cp-net");
        assert!(c.enabled, "defaults fill the rest");
        assert_eq!(
            c.ladder(Trigger::Untrusted(UntrustedReason::CertInvalid)),
            vec![A::Alert, A::Isolate, A::Lock],
            "matching rules merge in order, without repeats"
        );
        assert_eq!(
            c.ladder(Trigger::Untrusted(UntrustedReason::CertCnMismatch)),
            vec![A::Alert]
        );
        assert_eq!(c.ladder(Trigger::InitFailed), vec![A::Stop]);
        assert_eq!(
            c.ladder(Trigger::SessionFailedRepeated { count: 3 }),
            vec![A::Kill]
        );
        assert!(
            c.ladder(Trigger::SessionFailedRepeated { count: 2 })
                .is_empty()
        );
        assert_eq!(
            c.session_failed_threshold(),
            Some((3, Duration::from_secs(30)))
        );
        assert!(toml::from_str::<ContainmentConfig>("bogus = 1").is_err());
    }

    #[tokio::test]
    async fn isolate_keeps_only_the_kept_network_and_is_idempotent() {
        let (c, ops, _) = setup(vec![A::Alert, A::Isolate], false);
        let sink = RecordingSink::default();
        let first = c.run(&target("c1"), MISMATCH, &sink).await;
        assert_eq!(
            outcomes(&first),
            vec![(A::Alert, O::Applied), (A::Isolate, O::Applied)]
        );
        assert_eq!(ops.networks("c1").unwrap(), vec!["clawker-net"]);
        assert_eq!(first[1].trigger, "untrusted:cert_thumbprint_mismatch");
        assert!(
            first[1].detail.contains("bridge, corp-lan"),
            "{}",
            first[1].detail
        );
        // A CP restart re-publishes AgentUntrusted: the ladder runs again
        // and isolate is a no-op success, with no further Docker calls.
        let calls = ops.calls().len();
        let again = c.run(&target("c1"), MISMATCH, &sink).await;
        assert_eq!(
            outcomes(&again),
            vec![(A::Alert, O::Applied), (A::Isolate, O::AlreadyApplied)]
        );
        assert_eq!(ops.calls().len(), calls);
        let published = sink.of("policy.containment.applied");
        assert_eq!(published.len(), 4);
        assert_eq!(published[3]["outcome"], "already_applied");
        assert_eq!(published[3]["agent"], "dev");
    }

    #[tokio::test]
    async fn dry_run_changes_nothing_but_reports_every_step() {
        let (c, ops, sessions) = setup(vec![A::Alert, A::Isolate, A::Lock, A::Stop, A::Kill], true);
        let sink = RecordingSink::default();
        let evs = c.run(&target("c1"), MISMATCH, &sink).await;
        assert!(evs.iter().all(|e| e.outcome == O::DryRun), "{evs:?}");
        assert_eq!(evs.len(), 5);
        assert!(
            evs[1].detail.contains("would disconnect"),
            "{}",
            evs[1].detail
        );
        assert!(ops.calls().is_empty());
        assert_eq!(ops.networks("c1").unwrap().len(), 3);
        assert_eq!(ops.running("c1"), Some(true));
        assert!(sessions.seen.lock().unwrap().is_empty(), "no command ran");
        assert_eq!(sink.of("policy.containment.applied").len(), 5);
    }

    #[tokio::test]
    async fn stop_and_kill_are_idempotent_and_a_missing_container_is_not_found() {
        let (c, ops, _) = setup(vec![A::Kill, A::Stop], false);
        let sink = RecordingSink::default();
        let evs = c.run(&target("c1"), MISMATCH, &sink).await;
        assert_eq!(
            outcomes(&evs),
            vec![(A::Kill, O::Applied), (A::Stop, O::AlreadyStopped)]
        );
        let again = c.run(&target("c1"), MISMATCH, &sink).await;
        assert_eq!(
            outcomes(&again),
            vec![(A::Kill, O::AlreadyStopped), (A::Stop, O::AlreadyStopped)]
        );
        assert_eq!(ops.calls(), vec!["kill c1"]);
        let gone = c.run(&target("nope"), MISMATCH, &sink).await;
        assert!(gone.iter().all(|e| e.outcome == O::NotFound), "{gone:?}");
    }

    #[tokio::test]
    async fn lock_reports_applied_already_and_unsupported_with_exit_code_and_stderr() {
        let (c, _, sessions) = setup(vec![A::Lock], false);
        let sink = RecordingSink::default();
        sessions.answer(Ok(CommandOutput {
            exit_code: 0,
            stderr: String::new(),
        }));
        sessions.answer(Ok(CommandOutput {
            exit_code: LOCK_ALREADY,
            stderr: String::new(),
        }));
        sessions.answer(Ok(CommandOutput {
            exit_code: 127,
            stderr: "neither iptables nor nft is installed in the container".into(),
        }));
        sessions.answer(Err(SessionCommandError::Timeout(Duration::from_secs(1))));
        let mut got = Vec::new();
        for _ in 0..5 {
            got.extend(c.run(&target("c1"), MISMATCH, &sink).await);
        }
        assert_eq!(
            got.iter().map(|e| e.outcome).collect::<Vec<_>>(),
            vec![
                O::Applied,
                O::AlreadyApplied,
                O::Unsupported,
                O::Failed,
                O::Unsupported
            ]
        );
        assert!(got[2].detail.contains("exit_code=127"), "{}", got[2].detail);
        assert!(
            got[2].detail.contains("iptables nor nft"),
            "{}",
            got[2].detail
        );
        assert!(
            got[4].detail.contains("no open session"),
            "{}",
            got[4].detail
        );
        let seen = sessions.seen.lock().unwrap();
        assert_eq!(
            seen[0].1.get("CLAWKER_LOCK_ALLOW").map(String::as_str),
            Some("10.9.0.1")
        );
    }

    #[tokio::test]
    async fn disabled_policy_does_nothing() {
        let (mut c, ops, _) = setup(vec![A::Kill], false);
        c.config.enabled = false;
        let sink = RecordingSink::default();
        assert!(c.run(&target("c1"), MISMATCH, &sink).await.is_empty());
        assert!(ops.calls().is_empty());
        assert!(sink.names().is_empty());
    }
}
