//! Domain events (reference `cp-session.md` §13) and the worldview they
//! project into (§14, with our fixes; see [`worldview`]).
//!
//! Every event is its own type with the reference's name string, so
//! subscribers register for exactly the events they care about. `at` is the
//! time the event happened (RFC 3339 in JSON).

pub mod docker;
pub mod worldview;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::identity::Thumbprint;

pub use docker::{DockerAction, DockerEvent, DockerObject};
pub use worldview::Worldview;

/// Common surface of every domain event: its wire name, when it happened,
/// the container it concerns (if any), and its fields as JSON.
pub trait DomainEvent: clawker_actors::Event + Serialize + Clone {
    const NAME: &'static str;
    fn at(&self) -> OffsetDateTime;
    fn container_id(&self) -> Option<&str>;
    /// Folds the event into the worldview (no-op for pure notifications).
    fn apply(&self, _view: &mut Worldview) {}
}

pub fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

/// A thumbprint as 64 lowercase hex characters.
mod hex32 {
    use serde::Deserialize;

    use crate::identity::Thumbprint;

    pub fn serialize<S: serde::Serializer>(t: &Thumbprint, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&t.to_hex())
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Thumbprint, D::Error> {
        let s = String::deserialize(d)?;
        Thumbprint::from_hex(&s)
            .ok_or_else(|| serde::de::Error::custom("thumbprint: want 64 hex characters"))
    }
}

/// A duration as (fractional) milliseconds.
mod millis {
    use std::time::Duration;

    use serde::Deserialize;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64() * 1000.0)
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let ms = f64::deserialize(d)?;
        Duration::try_from_secs_f64(ms / 1000.0).map_err(serde::de::Error::custom)
    }
}

/// Implements the bus's `Event` (name + JSON) for a domain event type.
macro_rules! bus_event {
    ($ty:ident, $name:literal) => {
        impl clawker_actors::Event for $ty {
            fn name(&self) -> &'static str {
                $name
            }
            fn to_json(&self) -> serde_json::Value {
                serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
            }
        }
    };
}

macro_rules! domain_event {
    ($ty:ident, $name:literal, container) => {
        bus_event!($ty, $name);
        impl clawker_actors::Apply<Worldview> for $ty {
            fn apply(&self, state: &mut Worldview) {
                DomainEvent::apply(self, state)
            }
        }
        impl DomainEvent for $ty {
            const NAME: &'static str = $name;
            fn at(&self) -> OffsetDateTime {
                self.at
            }
            fn container_id(&self) -> Option<&str> {
                Some(&self.agent.container_id)
            }
            fn apply(&self, view: &mut Worldview) {
                view.apply_event(self);
            }
        }
    };
    // Container-scoped, but a pure notification: no projection.
    ($ty:ident, $name:literal, notice) => {
        bus_event!($ty, $name);
        impl DomainEvent for $ty {
            const NAME: &'static str = $name;
            fn at(&self) -> OffsetDateTime {
                self.at
            }
            fn container_id(&self) -> Option<&str> {
                Some(&self.agent.container_id)
            }
        }
    };
    ($ty:ident, $name:literal, none) => {
        bus_event!($ty, $name);
        impl DomainEvent for $ty {
            const NAME: &'static str = $name;
            fn at(&self) -> OffsetDateTime {
                self.at
            }
            fn container_id(&self) -> Option<&str> {
                None
            }
        }
    };
}

/// Fields every agent-axis event carries (flattened into its JSON). Agent
/// and project come from the container's labels (the registry row is the
/// identity once it exists, but events describe what the container claims).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRef {
    pub container_id: String,
    #[serde(rename = "agent")]
    pub name: String,
    pub project: String,
}

impl AgentRef {
    pub fn new(
        container_id: impl Into<String>,
        name: impl Into<String>,
        project: impl Into<String>,
    ) -> Self {
        Self {
            container_id: container_id.into(),
            name: name.into(),
            project: project.into(),
        }
    }

    /// Only the container is known (e.g. before its labels were read).
    pub fn container(container_id: impl Into<String>) -> Self {
        Self::new(container_id, "", "")
    }
}

// ---- session axis -------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionConnecting {
    #[serde(flatten)]
    pub agent: AgentRef,
    pub address: String,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}
domain_event!(SessionConnecting, "agent.session.connecting", container);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionConnected {
    #[serde(flatten)]
    pub agent: AgentRef,
    pub address: String,
    pub attempts: u32,
    pub peer_cn: String,
    #[serde(with = "hex32")]
    pub peer_thumbprint: Thumbprint,
    /// Whether the peer's leaf chained to our CA (recorded, never enforced:
    /// the CP keeps the session either way).
    pub chain_verified: bool,
    /// The peer leaf's `notAfter` (absent when the leaf does not parse).
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub leaf_not_after: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}
domain_event!(SessionConnected, "agent.session.connected", container);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionFailed {
    #[serde(flatten)]
    pub agent: AgentRef,
    pub address: String,
    pub reason: String,
    pub attempts: u32,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}
domain_event!(SessionFailed, "agent.session.failed", container);

/// `SessionFailed.reason` vocabulary.
pub mod failed_reason {
    pub const CONTAINER_NOT_RUNNING: &str = "container_not_running";
    pub const ENDPOINT_MISSING: &str = "clawker_net_endpoint_missing";
    pub const CONNECT_TOTAL_TIMEOUT: &str = "connect_total_timeout";
    pub const INTERNAL_UNKNOWN_OUTCOME: &str = "internal_unknown_outcome";
    pub const PANIC_PREFIX: &str = "dial_goroutine_panic: ";
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionBroken {
    #[serde(flatten)]
    pub agent: AgentRef,
    pub address: String,
    pub reason: String,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}
domain_event!(SessionBroken, "agent.session.broken", container);

// ---- identity axis ------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRegistered {
    #[serde(flatten)]
    pub agent: AgentRef,
    pub ok: bool,
    pub reason: String,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}
domain_event!(AgentRegistered, "agent.registered", container);

/// Why an agent is not trusted (exact wire strings).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UntrustedReason {
    CertThumbprintMismatch,
    CertInvalid,
    CertCnMismatch,
    RegisterFailed,
    /// Ours: the leaf matches its row but expired longer ago than the
    /// configured staleness bound (`agent_cert_stale_after`).
    CertExpired,
}

impl UntrustedReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::CertThumbprintMismatch => "cert_thumbprint_mismatch",
            Self::CertInvalid => "cert_invalid",
            Self::CertCnMismatch => "cert_cn_mismatch",
            Self::RegisterFailed => "register_failed",
            Self::CertExpired => "cert_expired",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [
            Self::CertThumbprintMismatch,
            Self::CertInvalid,
            Self::CertCnMismatch,
            Self::RegisterFailed,
            Self::CertExpired,
        ]
        .into_iter()
        .find(|r| r.as_str() == s)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentUntrusted {
    #[serde(flatten)]
    pub agent: AgentRef,
    pub reason: UntrustedReason,
    pub detail: String,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}
domain_event!(AgentUntrusted, "agent.untrusted", container);

/// Ours: the session's certificate matched the agent's registry row (a
/// Match, or a successful Register). The reference publishes nothing on a
/// Match, which left `registered` false after every CP restart and made an
/// untrusted verdict sticky forever; this event fixes both.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentTrusted {
    #[serde(flatten)]
    pub agent: AgentRef,
    /// How often the trusted identity's leaf has been rotated (registry).
    #[serde(default)]
    pub rotations: u32,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}
domain_event!(AgentTrusted, "agent.trusted", container);

// ---- certificate axis ---------------------------------------------------

/// Why a leaf was rotated (exact wire strings).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RotationReason {
    /// clawkerd renewed on its own at half its leaf's lifetime.
    HalfLife,
    /// The CP asked (`RenewCert`).
    Requested,
    /// The session's leaf had expired (trusted because it otherwise matched
    /// its row, then rotated at once).
    Expired,
    /// Right after Register (or on the first trusted session of a row that
    /// never rotated), so the bootstrap leaf — whose copy outlives the
    /// container in a Swarm secret — is retired at once
    /// (`retire_bootstrap_leaf`).
    Registered,
}

impl RotationReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::HalfLife => "half_life",
            Self::Requested => "requested",
            Self::Expired => "expired",
            Self::Registered => "registered",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [
            Self::HalfLife,
            Self::Requested,
            Self::Expired,
            Self::Registered,
        ]
        .into_iter()
        .find(|r| r.as_str() == s)
    }
}

/// Ours: the agent's leaf was replaced over its open session; the old
/// thumbprint no longer matches its registry row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertRotated {
    #[serde(flatten)]
    pub agent: AgentRef,
    #[serde(with = "hex32")]
    pub old: Thumbprint,
    #[serde(with = "hex32")]
    pub new: Thumbprint,
    #[serde(with = "time::serde::rfc3339")]
    pub not_after: OffsetDateTime,
    pub reason: RotationReason,
    /// Completed rotations of this container's leaf, this one included.
    pub rotations: u32,
    /// CSR received → clawkerd's `Done` (new leaf in use), on the CP.
    #[serde(rename = "duration_ms", with = "millis")]
    pub duration: std::time::Duration,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}
domain_event!(CertRotated, "agent.cert.rotated", container);

/// Ours: a rotation attempt failed; the current leaf (and the trust it
/// earned) stays, and the attempt is retried with backoff.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertRotationFailed {
    #[serde(flatten)]
    pub agent: AgentRef,
    pub reason: RotationReason,
    /// What failed (our text; peer strings are truncated).
    pub detail: String,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}
domain_event!(CertRotationFailed, "agent.cert.rotation_failed", container);

/// Ours: one of the CP's own certificates expires soon (or has expired):
/// run `clawker ca renew`, then restart the CP.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpCertExpiring {
    /// `server certificate`, `CP client certificate`, `CLI client
    /// certificate` or `CA certificate`.
    pub cert: String,
    pub path: String,
    #[serde(with = "time::serde::rfc3339")]
    pub not_after: OffsetDateTime,
    /// Whole days left (negative: expired that long ago).
    pub days_left: i64,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}
domain_event!(CpCertExpiring, "cp.cert.expiring", none);

// ---- init axis ----------------------------------------------------------

/// Which plan a step belongs to (reference `head-lifecycle.md` §1.4): the
/// one-time `init` plan (ends by writing the container's init marker) or
/// the every-start `boot` plan (ends by starting the user command).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Plan {
    /// Events from a CP that predates the split carry no plan: their one
    /// plan was init (ending with AgentReady).
    #[default]
    Init,
    Boot,
}

impl Plan {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Init => "init",
            Self::Boot => "boot",
        }
    }
}

/// Ours: what the CP decided to run on this session, from clawkerd's
/// `HelloAck` (reference `head-lifecycle.md` §1.3) and the trust verdict.
/// Published once per session, before any step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanDecided {
    #[serde(flatten)]
    pub agent: AgentRef,
    /// The container's init marker exists (init completed once).
    pub initialized: bool,
    /// clawkerd has started the user command.
    pub cmd_running: bool,
    /// The plans that run, in order; empty when nothing runs.
    pub plans: Vec<Plan>,
    /// Why less than the full sequence runs, when it does: `""`,
    /// `cmd_running` (a reconnect: nothing runs), `init_bypassed` (the
    /// command runs but the marker is missing: nothing runs), `untrusted`
    /// (withheld from an untrusted agent).
    pub skipped: String,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}
domain_event!(PlanDecided, "agent.plan.decided", container);

/// `PlanDecided.skipped` vocabulary.
pub mod plan_skipped {
    pub const CMD_RUNNING: &str = "cmd_running";
    pub const INIT_BYPASSED: &str = "init_bypassed";
    pub const UNTRUSTED: &str = "untrusted";
}

/// Why an init step failed (exact wire strings).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InitFailureReason {
    ExitCode,
    Timeout,
    SpawnFailed,
    IoError,
    TransportError,
    ProtocolError,
    Unknown,
}

impl InitFailureReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ExitCode => "exit_code",
            Self::Timeout => "timeout",
            Self::SpawnFailed => "spawn_failed",
            Self::IoError => "io_error",
            Self::TransportError => "transport_error",
            Self::ProtocolError => "protocol_error",
            Self::Unknown => "unknown",
        }
    }
}

/// The start sequence of one session: the plans it runs (init then boot on
/// a fresh container, boot alone after a restart), as one run of steps, so
/// `agent.init.completed` always means "the user command was released".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitStarted {
    #[serde(flatten)]
    pub agent: AgentRef,
    #[serde(default)]
    pub plans: Vec<Plan>,
    pub step_count: u32,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}
domain_event!(InitStarted, "agent.init.started", container);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitStepStarted {
    #[serde(flatten)]
    pub agent: AgentRef,
    #[serde(default)]
    pub plan: Plan,
    pub step: String,
    pub step_index: u32,
    pub step_count: u32,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}
domain_event!(InitStepStarted, "agent.init.step.started", container);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitStepCompleted {
    #[serde(flatten)]
    pub agent: AgentRef,
    #[serde(default)]
    pub plan: Plan,
    pub step: String,
    pub step_index: u32,
    #[serde(rename = "duration_ms", with = "millis")]
    pub duration: std::time::Duration,
    pub exit_code: i32,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}
domain_event!(InitStepCompleted, "agent.init.step.completed", container);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitStepFailed {
    #[serde(flatten)]
    pub agent: AgentRef,
    #[serde(default)]
    pub plan: Plan,
    pub step: String,
    pub step_index: u32,
    #[serde(rename = "duration_ms", with = "millis")]
    pub duration: std::time::Duration,
    pub exit_code: i32,
    pub reason: InitFailureReason,
    pub detail: String,
    /// What the step wrote to stderr (the first 4 KiB, trimmed), for the
    /// operator (`agent run` prints it).
    #[serde(default)]
    pub output: String,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}
domain_event!(InitStepFailed, "agent.init.step.failed", container);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitCompleted {
    #[serde(flatten)]
    pub agent: AgentRef,
    #[serde(default)]
    pub plans: Vec<Plan>,
    #[serde(rename = "duration_ms", with = "millis")]
    pub duration: std::time::Duration,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}
domain_event!(InitCompleted, "agent.init.completed", container);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitFailed {
    #[serde(flatten)]
    pub agent: AgentRef,
    /// The plan of the failed step.
    #[serde(default)]
    pub plan: Plan,
    pub failed_step: String,
    pub reason: InitFailureReason,
    pub detail: String,
    /// The failed step's exit code (−1 when it did not exit: timeout,
    /// spawn failure, transport).
    #[serde(default = "no_exit_code")]
    pub exit_code: i32,
    #[serde(rename = "duration_ms", with = "millis")]
    pub duration: std::time::Duration,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}
domain_event!(InitFailed, "agent.init.failed", container);

fn no_exit_code() -> i32 {
    -1
}

/// How a container that failed an init or boot step was ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TerminatedBy {
    /// clawkerd (PID 1) exited with the step's exit code by itself.
    SelfExit,
    /// It did not within the grace period (or could not: the step did not
    /// end in an exit code), and the CP killed the container.
    CpKill,
    /// The CP's kill failed; `detail` says why. The container may live on.
    KillFailed,
}

impl TerminatedBy {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SelfExit => "self_exit",
            Self::CpKill => "cp_kill",
            Self::KillFailed => "kill_failed",
        }
    }
}

/// Ours: a container was ended because one of its init or boot steps
/// failed (unless `keep_on_init_failure`). The reference only logs this.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentTerminated {
    #[serde(flatten)]
    pub agent: AgentRef,
    pub plan: Plan,
    pub step: String,
    /// The step's exit code (the container's, on a self-exit of a step that
    /// exited 0–255).
    pub exit_code: i32,
    pub by: TerminatedBy,
    pub detail: String,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}
domain_event!(AgentTerminated, "agent.terminated", container);

// ---- policy axis --------------------------------------------------------

/// What a containment step did (exact wire strings).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ContainmentAction {
    /// Structured log line + this event; changes nothing.
    Alert,
    /// Onto the quarantine network (internal, guarded on the host), off
    /// every other network.
    Isolate,
    /// Only the CP's session passes, enforced in the container's network
    /// namespace from outside.
    Lock,
    /// `docker stop`.
    Stop,
    /// `docker kill`.
    Kill,
}

/// A restriction containment puts on an agent (and may lift again).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Restriction {
    /// On the quarantine network only (`isolate`).
    Quarantine,
    /// Egress firewalled from inside (`lock`).
    Lock,
}

impl ContainmentAction {
    /// What an applied step of this action does to the agent's
    /// restrictions: imposes (`true`) or lifts (`false`) one. `stop` and
    /// `kill` end the container instead (no session, nothing to refuse);
    /// `alert` changes nothing. A lifting action (`release`, `unlock`)
    /// maps to `Some((restriction, false))` here and every reader of
    /// [`worldview::AgentView::restrictions`] follows.
    pub fn effect(self) -> Option<(Restriction, bool)> {
        match self {
            Self::Isolate => Some((Restriction::Quarantine, true)),
            Self::Lock => Some((Restriction::Lock, true)),
            Self::Alert | Self::Stop | Self::Kill => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Alert => "alert",
            Self::Isolate => "isolate",
            Self::Lock => "lock",
            Self::Stop => "stop",
            Self::Kill => "kill",
        }
    }
}

/// How a containment step ended (exact wire strings).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ContainmentOutcome {
    /// The step changed something.
    Applied,
    /// Nothing to do: the container was already in the target state
    /// (e.g. isolate on an isolated container, lock on a locked one).
    AlreadyApplied,
    /// stop/kill on a container that is not running.
    AlreadyStopped,
    /// The step cannot work on this host or container (e.g. no `nft`, a
    /// CP that is not root, a container on the host's network); `detail`
    /// says why.
    Unsupported,
    /// The container no longer exists.
    NotFound,
    /// The step was attempted and failed; `detail` says why.
    Failed,
    /// Dry-run mode: logged and published, nothing changed.
    DryRun,
}

impl ContainmentOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Applied => "applied",
            Self::AlreadyApplied => "already_applied",
            Self::AlreadyStopped => "already_stopped",
            Self::Unsupported => "unsupported",
            Self::NotFound => "not_found",
            Self::Failed => "failed",
            Self::DryRun => "dry_run",
        }
    }
}

/// Ours: one step of a containment ladder ran (see `policy::containment`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainmentApplied {
    #[serde(flatten)]
    pub agent: AgentRef,
    /// What fired the ladder, e.g. `untrusted:cert_invalid`, `init_failed`,
    /// `session_failed_repeated`.
    pub trigger: String,
    pub action: ContainmentAction,
    pub outcome: ContainmentOutcome,
    pub detail: String,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}
domain_event!(ContainmentApplied, "policy.containment.applied", container);

// ---- operator axis ------------------------------------------------------

/// What an operator did over an agent's session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExecKind {
    /// `clawker agent exec` / `shell`.
    Exec,
    /// `clawker agent cp NAME:PATH …` (out of the container).
    CopyFrom,
    /// `clawker agent cp … NAME:PATH` (into the container).
    CopyTo,
    /// `clawker agent logs`.
    Logs,
}

impl ExecKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Exec => "exec",
            Self::CopyFrom => "copy_from",
            Self::CopyTo => "copy_to",
            Self::Logs => "logs",
        }
    }
}

/// Ours: an operator command started in an agent (admin API `Exec`, `cp`,
/// `logs`). `operator` is the SHA-256 thumbprint of the CLI certificate
/// that asked; `argv` is truncated (see `admin_api`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecStarted {
    #[serde(flatten)]
    pub agent: AgentRef,
    pub exec_id: String,
    pub kind: ExecKind,
    pub operator: String,
    pub argv: Vec<String>,
    pub user: String,
    pub tty: bool,
    /// Started past a refusal (`--force`; see `agent.exec.forced`).
    pub forced: bool,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}
domain_event!(ExecStarted, "agent.exec.started", notice);

/// Ours: an operator command ended (exit code, or why not).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecFinished {
    #[serde(flatten)]
    pub agent: AgentRef,
    pub exec_id: String,
    pub kind: ExecKind,
    pub operator: String,
    pub argv: Vec<String>,
    pub user: String,
    pub tty: bool,
    /// `None` when it did not run to its own exit (`error` says why).
    pub exit_code: Option<i32>,
    pub error: String,
    #[serde(rename = "duration_ms", with = "millis")]
    pub duration: std::time::Duration,
    /// Bytes from the operator into the agent (stdin, a copied-in tar).
    pub bytes_in: u64,
    /// Bytes from the agent to the operator (output, a copied-out tar).
    pub bytes_out: u64,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}
domain_event!(ExecFinished, "agent.exec.finished", notice);

/// Ours: an operator command refused because the agent is untrusted,
/// quarantined or locked (`reasons`, e.g. `untrusted:cert_invalid`,
/// `quarantined`, `locked`) and `--force` was not given.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRefused {
    #[serde(flatten)]
    pub agent: AgentRef,
    pub kind: ExecKind,
    pub operator: String,
    pub argv: Vec<String>,
    pub reasons: Vec<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}
domain_event!(ExecRefused, "agent.exec.refused", notice);

/// Ours: an operator forced a command past those refusal reasons.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecForced {
    #[serde(flatten)]
    pub agent: AgentRef,
    pub exec_id: String,
    pub kind: ExecKind,
    pub operator: String,
    pub argv: Vec<String>,
    pub reasons: Vec<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}
domain_event!(ExecForced, "agent.exec.forced", notice);
/// Ours: an operator lifted a containment step (`clawker agent release`
/// lifts `isolate`, `clawker agent unlock` lifts `lock`). Nothing else
/// ever lifts containment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainmentReleased {
    #[serde(flatten)]
    pub agent: AgentRef,
    /// The action lifted: `isolate` or `lock`.
    pub action: ContainmentAction,
    /// `applied`, `already_applied` (it was not in force), `not_found`,
    /// `failed`, …
    pub outcome: ContainmentOutcome,
    pub detail: String,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}
domain_event!(
    ContainmentReleased,
    "policy.containment.released",
    container
);

// ---- misc ---------------------------------------------------------------

/// The startup orphan reap failed; a pure notification (no projection).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReapDegraded {
    pub reason: String,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}
domain_event!(ReapDegraded, "agent.reap.degraded", none);

/// A Docker event, as the feeder publishes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DockerEventOccurred {
    #[serde(flatten)]
    pub event: DockerEvent,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}

impl DockerEventOccurred {
    pub fn new(event: DockerEvent) -> Self {
        let at = OffsetDateTime::from_unix_timestamp_nanos(event.time_nanos as i128)
            .unwrap_or_else(|_| now());
        Self { event, at }
    }
}

bus_event!(DockerEventOccurred, "docker.event");

impl clawker_actors::Apply<Worldview> for DockerEventOccurred {
    fn apply(&self, state: &mut Worldview) {
        DomainEvent::apply(self, state)
    }
}

impl DomainEvent for DockerEventOccurred {
    const NAME: &'static str = "docker.event";
    fn at(&self) -> OffsetDateTime {
        self.at
    }
    fn container_id(&self) -> Option<&str> {
        self.event.container_id()
    }
    fn apply(&self, view: &mut Worldview) {
        view.apply_docker(self);
    }
}

/// Declares [`Decoded`]: every domain event type, read back from its wire
/// form (name + JSON) by consumers outside the process (the CLI reading
/// `WatchEvents` or the audit log) as the same typed structs.
macro_rules! decoded {
    ($($variant:ident),* $(,)?) => {
        /// A domain event decoded from its name and JSON.
        #[derive(Debug, Clone, PartialEq)]
        pub enum Decoded {
            $($variant($variant),)*
            /// A name this build does not know (a newer CP).
            Unknown(String),
        }

        impl Decoded {
            pub fn container_id(&self) -> Option<&str> {
                match self {
                    $(Decoded::$variant(e) => DomainEvent::container_id(e),)*
                    Decoded::Unknown(_) => None,
                }
            }
        }

        /// Decodes one event; an unknown name is `Ok(Decoded::Unknown)`, a
        /// known name with malformed JSON is an error.
        pub fn decode(name: &str, json: &str) -> Result<Decoded, serde_json::Error> {
            $(if name == <$variant as DomainEvent>::NAME {
                return serde_json::from_str(json).map(Decoded::$variant);
            })*
            Ok(Decoded::Unknown(name.to_owned()))
        }
    };
}

decoded!(
    SessionConnecting,
    SessionConnected,
    SessionFailed,
    SessionBroken,
    AgentRegistered,
    AgentUntrusted,
    AgentTrusted,
    CertRotated,
    CertRotationFailed,
    CpCertExpiring,
    InitStarted,
    InitStepStarted,
    InitStepCompleted,
    InitStepFailed,
    InitCompleted,
    InitFailed,
    PlanDecided,
    AgentTerminated,
    ContainmentApplied,
    ExecStarted,
    ExecFinished,
    ExecRefused,
    ExecForced,
    ContainmentReleased,
    ReapDegraded,
    DockerEventOccurred,
);

/// Where domain events go: the bus in production, a recorder in tests.
/// Publishing never blocks; `false` means the event was dropped.
pub trait Publish: Clone + Send + Sync + 'static {
    fn publish<E: DomainEvent>(&self, event: E) -> bool;
}

/// Records every published event as (name, JSON); for tests.
#[derive(Clone, Default)]
pub struct RecordingSink {
    pub events: std::sync::Arc<std::sync::Mutex<Vec<(&'static str, serde_json::Value)>>>,
}

impl RecordingSink {
    pub fn names(&self) -> Vec<&'static str> {
        self.events
            .lock()
            .map(|e| e.iter().map(|(n, _)| *n).collect())
            .unwrap_or_default()
    }

    pub fn of(&self, name: &str) -> Vec<serde_json::Value> {
        self.events
            .lock()
            .map(|e| {
                e.iter()
                    .filter(|(n, _)| *n == name)
                    .map(|(_, j)| j.clone())
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Publish for RecordingSink {
    fn publish<E: DomainEvent>(&self, event: E) -> bool {
        if let Ok(mut e) = self.events.lock() {
            e.push((E::NAME, clawker_actors::Event::to_json(&event)));
        }
        true
    }
}

/// The CP's bus: typed events, the worldview as its projection.
pub type Bus = clawker_actors::EventBus<Worldview>;

impl Publish for Bus {
    fn publish<E: DomainEvent>(&self, event: E) -> bool {
        clawker_actors::EventBus::publish(self, event)
    }
}

/// Starts the bus on the current actix arbiter with every projecting event
/// type registered, in one place so none is forgotten.
pub fn start_bus() -> Bus {
    clawker_actors::EventBus::builder(Worldview::default())
        .project::<SessionConnecting>()
        .project::<SessionConnected>()
        .project::<SessionFailed>()
        .project::<SessionBroken>()
        .project::<AgentRegistered>()
        .project::<AgentUntrusted>()
        .project::<AgentTrusted>()
        .project::<CertRotated>()
        .project::<CertRotationFailed>()
        .project::<InitStarted>()
        .project::<InitStepStarted>()
        .project::<InitStepCompleted>()
        .project::<InitStepFailed>()
        .project::<InitCompleted>()
        .project::<InitFailed>()
        .project::<PlanDecided>()
        .project::<AgentTerminated>()
        .project::<ContainmentApplied>()
        .project::<ContainmentReleased>()
        .project::<DockerEventOccurred>()
        .start()
}
