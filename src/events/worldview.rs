//! The worldview: the CP's live picture of containers and agents, built by
//! folding events in publish order (reference `cp-session.md` §14). The bus
//! owns the one instance; everyone else sees deep-copied snapshots.
//!
//! Our fixes to the reference projection:
//! - `registered` becomes true on a Match (via [`AgentTrusted`]), not only
//!   after a fresh Register, so it survives CP restarts;
//! - trust is re-evaluated on every session: the latest verdict is current,
//!   earlier ones stay in `trust_history`; a new session (connecting or
//!   connected) starts *pending* — not trusted until this session's own
//!   trust decision (`AgentTrusted`) — so an agent is never shown trusted
//!   on the strength of an earlier session, or of none;
//! - an agent leaves the worldview when its container is destroyed;
//! - a failure event never blanks identity fields it does not know.

use std::collections::BTreeMap;

use serde::Serialize;
use time::OffsetDateTime;

use super::*;

/// How many past trust verdicts an agent keeps.
pub const TRUST_HISTORY: usize = 8;
/// How many containment steps an agent keeps (newest last).
pub const CONTAINMENT_HISTORY: usize = 16;

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Worldview {
    pub containers: BTreeMap<String, ContainerView>,
    pub agents: BTreeMap<String, AgentView>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_updated_at: Option<OffsetDateTime>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ContainerStatus {
    #[default]
    Unknown,
    Running,
    Stopped,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ContainerView {
    pub id: String,
    pub name: String,
    pub status: ContainerStatus,
    pub labels: BTreeMap<String, String>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub updated_at: Option<OffsetDateTime>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionStatus {
    #[default]
    Unknown,
    Connecting,
    Connected,
    Failed,
    Broken,
}

/// One trust verdict. `at: None` means no decision yet in the current
/// session (pending: not trusted).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Trust {
    pub trusted: bool,
    pub reason: Option<UntrustedReason>,
    pub detail: String,
    #[serde(with = "time::serde::rfc3339::option")]
    pub at: Option<OffsetDateTime>,
}

impl Trust {
    /// No trust decision yet in the current session: not trusted.
    pub fn pending() -> Self {
        Self {
            trusted: false,
            reason: None,
            detail: PENDING_DETAIL.to_owned(),
            at: None,
        }
    }

    /// True while the current session has not decided yet.
    pub fn is_pending(&self) -> bool {
        !self.trusted && self.at.is_none()
    }
}

/// `Trust.detail` of a session that has not decided yet.
pub const PENDING_DETAIL: &str = "no trust decision in the current session yet";

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum InitStatus {
    #[default]
    Unknown,
    Running,
    Completed,
    Failed,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct InitView {
    pub status: InitStatus,
    /// The plans of the latest start sequence (`[init, boot]` on a fresh
    /// container, `[boot]` after a restart).
    pub plans: Vec<Plan>,
    /// The plan of the current (or failed) step.
    pub plan: Option<Plan>,
    pub step: String,
    pub step_index: u32,
    pub step_count: u32,
    #[serde(with = "time::serde::rfc3339::option")]
    pub started_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub completed_at: Option<OffsetDateTime>,
    pub last_error: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AgentView {
    pub container_id: String,
    pub agent: String,
    pub project: String,
    pub address: String,
    pub session_status: SessionStatus,
    pub registered: bool,
    pub trust: Trust,
    /// Earlier verdicts, oldest first (bounded by [`TRUST_HISTORY`]).
    pub trust_history: Vec<Trust>,
    pub thumbprint: String,
    pub chain_verified: bool,
    /// `notAfter` of the leaf in use (from the session, then each rotation).
    #[serde(with = "time::serde::rfc3339::option")]
    pub leaf_not_after: Option<OffsetDateTime>,
    /// Completed rotations of the agent's leaf (durable, from the registry).
    pub rotations: u32,
    pub attempts: u32,
    /// Session-axis error.
    pub last_error: String,
    #[serde(with = "time::serde::rfc3339::option")]
    pub updated_at: Option<OffsetDateTime>,
    pub init: InitView,
    /// Containment steps applied to this agent, oldest first (bounded by
    /// [`CONTAINMENT_HISTORY`]).
    pub containment: Vec<ContainmentRecord>,
    /// What the latest session found and decided to run.
    pub start: Option<StartView>,
    /// Set when the container was ended because a step failed.
    pub terminated: Option<TerminationView>,
}

/// The latest [`PlanDecided`], as the worldview keeps it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StartView {
    pub initialized: bool,
    pub cmd_running: bool,
    pub plans: Vec<Plan>,
    pub skipped: String,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}

/// The latest [`AgentTerminated`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TerminationView {
    pub plan: Plan,
    pub step: String,
    pub exit_code: i32,
    pub by: TerminatedBy,
    pub detail: String,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}

/// One containment step, as the worldview keeps it (an operator's release
/// or unlock is a record with trigger [`RELEASED_TRIGGER`]).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ContainmentRecord {
    pub trigger: String,
    pub action: ContainmentAction,
    pub outcome: ContainmentOutcome,
    pub detail: String,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}

/// Restrictions in effect on an agent, from its containment records.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Restrictions {
    pub quarantined: bool,
    pub locked: bool,
}

impl AgentView {
    /// Which restrictions are in effect: the records in order, each
    /// applied (or already applied) step imposing or lifting one as
    /// [`ContainmentAction::effect`] says. Failed, unsupported and dry-run
    /// steps change nothing.
    pub fn restrictions(&self) -> Restrictions {
        let mut r = Restrictions::default();
        for rec in &self.containment {
            if !matches!(
                rec.outcome,
                ContainmentOutcome::Applied | ContainmentOutcome::AlreadyApplied
            ) {
                continue;
            }
            match rec.action.effect() {
                Some((Restriction::Quarantine, on)) => r.quarantined = on,
                Some((Restriction::Lock, on)) => r.locked = on,
                None => {}
            }
        }
        r
    }

    fn new(container_id: &str) -> Self {
        Self {
            container_id: container_id.to_owned(),
            agent: String::new(),
            project: String::new(),
            address: String::new(),
            session_status: SessionStatus::Unknown,
            registered: false,
            trust: Trust::pending(),
            trust_history: Vec::new(),
            thumbprint: String::new(),
            chain_verified: false,
            leaf_not_after: None,
            rotations: 0,
            attempts: 0,
            last_error: String::new(),
            updated_at: None,
            init: InitView::default(),
            containment: Vec::new(),
            start: None,
            terminated: None,
        }
    }

    /// Overwrites identity fields only with known values: an event that
    /// does not know the agent's name must not erase it.
    fn set_identity(&mut self, who: &AgentRef, address: Option<&str>) {
        if !who.name.is_empty() {
            self.agent = who.name.clone();
        }
        if !who.project.is_empty() {
            self.project = who.project.clone();
        }
        if let Some(a) = address.filter(|a| !a.is_empty()) {
            self.address = a.to_owned();
        }
    }

    /// A new session begins: its trust is undecided until this session's
    /// own verdict arrives (the previous verdict moves to the history).
    fn begin_session(&mut self) {
        if self.trust.at.is_some() {
            self.set_trust(Trust::pending());
        }
    }

    fn set_trust(&mut self, new: Trust) {
        let old = std::mem::replace(&mut self.trust, new);
        if old.at.is_some() {
            self.trust_history.push(old);
            if self.trust_history.len() > TRUST_HISTORY {
                self.trust_history.remove(0);
            }
        }
    }
}

/// Folds one event type into the worldview.
pub trait Project {
    fn project(&self, view: &mut Worldview);
}

impl Worldview {
    /// Applies a container-scoped domain event and stamps `last_updated_at`.
    pub fn apply_event<E: DomainEvent + Project>(&mut self, e: &E) {
        e.project(self);
        self.last_updated_at = Some(e.at());
    }

    pub(super) fn apply_docker(&mut self, e: &DockerEventOccurred) {
        e.project(self);
        if e.event.typ == DockerObject::Container {
            self.last_updated_at = Some(e.at);
        }
    }

    fn agent(&mut self, container_id: &str) -> &mut AgentView {
        self.agents
            .entry(container_id.to_owned())
            .or_insert_with(|| AgentView::new(container_id))
    }
}

impl Project for SessionConnecting {
    fn project(&self, v: &mut Worldview) {
        let a = v.agent(&self.agent.container_id);
        a.set_identity(&self.agent, Some(&self.address));
        a.begin_session();
        a.session_status = SessionStatus::Connecting;
        a.last_error.clear();
        a.updated_at = Some(self.at);
    }
}

impl Project for SessionConnected {
    fn project(&self, v: &mut Worldview) {
        let a = v.agent(&self.agent.container_id);
        a.set_identity(&self.agent, Some(&self.address));
        a.begin_session();
        a.session_status = SessionStatus::Connected;
        a.attempts = self.attempts;
        a.thumbprint = self.peer_thumbprint.to_hex();
        a.chain_verified = self.chain_verified;
        a.leaf_not_after = self.leaf_not_after;
        a.last_error.clear();
        a.updated_at = Some(self.at);
    }
}

impl Project for SessionFailed {
    fn project(&self, v: &mut Worldview) {
        let a = v.agent(&self.agent.container_id);
        a.set_identity(&self.agent, Some(&self.address));
        a.session_status = SessionStatus::Failed;
        a.attempts = self.attempts;
        a.last_error = self.reason.clone();
        a.updated_at = Some(self.at);
    }
}

impl Project for SessionBroken {
    fn project(&self, v: &mut Worldview) {
        let a = v.agent(&self.agent.container_id);
        a.set_identity(&self.agent, Some(&self.address));
        a.session_status = SessionStatus::Broken;
        a.last_error = self.reason.clone();
        a.updated_at = Some(self.at);
    }
}

impl Project for AgentRegistered {
    fn project(&self, v: &mut Worldview) {
        let a = v.agent(&self.agent.container_id);
        a.set_identity(&self.agent, None);
        a.registered = self.ok;
        if !self.ok {
            a.last_error = self.reason.clone();
        }
        a.updated_at = Some(self.at);
    }
}

impl Project for AgentUntrusted {
    fn project(&self, v: &mut Worldview) {
        let a = v.agent(&self.agent.container_id);
        a.set_identity(&self.agent, None);
        a.set_trust(Trust {
            trusted: false,
            reason: Some(self.reason),
            detail: self.detail.clone(),
            at: Some(self.at),
        });
        a.updated_at = Some(self.at);
    }
}

impl Project for AgentTrusted {
    fn project(&self, v: &mut Worldview) {
        let a = v.agent(&self.agent.container_id);
        a.set_identity(&self.agent, None);
        a.registered = true;
        a.rotations = a.rotations.max(self.rotations);
        a.set_trust(Trust {
            trusted: true,
            reason: None,
            detail: String::new(),
            at: Some(self.at),
        });
        a.updated_at = Some(self.at);
    }
}

impl Project for CertRotated {
    fn project(&self, v: &mut Worldview) {
        let a = v.agent(&self.agent.container_id);
        a.set_identity(&self.agent, None);
        a.thumbprint = self.new.to_hex();
        a.leaf_not_after = Some(self.not_after);
        a.rotations = self.rotations;
        a.updated_at = Some(self.at);
    }
}

impl Project for CertRotationFailed {
    fn project(&self, v: &mut Worldview) {
        v.agent(&self.agent.container_id).updated_at = Some(self.at);
    }
}

impl Project for InitStarted {
    fn project(&self, v: &mut Worldview) {
        let a = v.agent(&self.agent.container_id);
        a.set_identity(&self.agent, None);
        a.init = InitView {
            status: InitStatus::Running,
            plans: self.plans.clone(),
            step_count: self.step_count,
            started_at: Some(self.at),
            ..InitView::default()
        };
        a.updated_at = Some(self.at);
    }
}

impl Project for InitStepStarted {
    fn project(&self, v: &mut Worldview) {
        let a = v.agent(&self.agent.container_id);
        a.set_identity(&self.agent, None);
        let max = a.init.step_count.saturating_sub(1);
        a.init.step_index = if a.init.step_count > 0 {
            self.step_index.min(max)
        } else {
            self.step_index
        };
        a.init.step = self.step.clone();
        a.init.plan = Some(self.plan);
        a.updated_at = Some(self.at);
    }
}

impl Project for InitStepCompleted {
    fn project(&self, v: &mut Worldview) {
        v.agent(&self.agent.container_id).updated_at = Some(self.at);
    }
}

impl Project for InitStepFailed {
    fn project(&self, v: &mut Worldview) {
        let a = v.agent(&self.agent.container_id);
        a.init.last_error = self.detail.clone();
        a.updated_at = Some(self.at);
    }
}

fn floor_at(init: &InitView, at: OffsetDateTime) -> OffsetDateTime {
    match init.started_at {
        Some(s) if s > at => s,
        _ => at,
    }
}

impl Project for InitCompleted {
    fn project(&self, v: &mut Worldview) {
        let a = v.agent(&self.agent.container_id);
        let at = floor_at(&a.init, self.at);
        a.init.status = InitStatus::Completed;
        a.init.completed_at = Some(at);
        a.init.last_error.clear();
        a.updated_at = Some(self.at);
    }
}

impl Project for InitFailed {
    fn project(&self, v: &mut Worldview) {
        let a = v.agent(&self.agent.container_id);
        let at = floor_at(&a.init, self.at);
        a.init.status = InitStatus::Failed;
        a.init.plan = Some(self.plan);
        a.init.completed_at = Some(at);
        a.init.last_error = self.detail.clone();
        a.updated_at = Some(self.at);
    }
}

impl Project for PlanDecided {
    fn project(&self, v: &mut Worldview) {
        let a = v.agent(&self.agent.container_id);
        a.set_identity(&self.agent, None);
        a.start = Some(StartView {
            initialized: self.initialized,
            cmd_running: self.cmd_running,
            plans: self.plans.clone(),
            skipped: self.skipped.clone(),
            at: self.at,
        });
        a.updated_at = Some(self.at);
    }
}

impl Project for AgentTerminated {
    fn project(&self, v: &mut Worldview) {
        let a = v.agent(&self.agent.container_id);
        a.set_identity(&self.agent, None);
        a.terminated = Some(TerminationView {
            plan: self.plan,
            step: self.step.clone(),
            exit_code: self.exit_code,
            by: self.by,
            detail: self.detail.clone(),
            at: self.at,
        });
        a.updated_at = Some(self.at);
    }
}

impl Project for ContainmentApplied {
    fn project(&self, v: &mut Worldview) {
        let a = v.agent(&self.agent.container_id);
        a.set_identity(&self.agent, None);
        a.containment.push(ContainmentRecord {
            trigger: self.trigger.clone(),
            action: self.action,
            outcome: self.outcome,
            detail: self.detail.clone(),
            at: self.at,
        });
        if a.containment.len() > CONTAINMENT_HISTORY {
            let excess = a.containment.len() - CONTAINMENT_HISTORY;
            a.containment.drain(..excess);
        }
        a.updated_at = Some(self.at);
    }
}

/// The `trigger` of a [`ContainmentRecord`] for an operator's lift.
pub const RELEASED_TRIGGER: &str = "released_by_operator";

impl Project for ContainmentReleased {
    fn project(&self, v: &mut Worldview) {
        let a = v.agent(&self.agent.container_id);
        a.set_identity(&self.agent, None);
        a.containment.push(ContainmentRecord {
            trigger: RELEASED_TRIGGER.to_owned(),
            action: self.action,
            outcome: self.outcome,
            detail: self.detail.clone(),
            at: self.at,
        });
        if a.containment.len() > CONTAINMENT_HISTORY {
            let excess = a.containment.len() - CONTAINMENT_HISTORY;
            a.containment.drain(..excess);
        }
        a.updated_at = Some(self.at);
    }
}

/// Engine attributes that are not labels.
const ENGINE_ATTRS: [&str; 6] = [
    "image",
    "name",
    "exitCode",
    "signal",
    "oldName",
    "execDuration",
];

impl Project for DockerEventOccurred {
    fn project(&self, v: &mut Worldview) {
        let e = &self.event;
        let Some(id) = e.container_id().map(str::to_owned) else {
            return;
        };
        match &e.action {
            a if a.brings_container_up() => {
                let c = v.containers.entry(id.clone()).or_default();
                c.id = id;
                if let Some(n) = e.attr("name").filter(|n| !n.is_empty()) {
                    c.name = n.to_owned();
                }
                c.status = ContainerStatus::Running;
                c.labels = e
                    .attributes
                    .iter()
                    .filter(|(k, _)| !ENGINE_ATTRS.contains(&k.as_str()))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                c.updated_at = Some(self.at);
            }
            a if a.takes_container_down() => {
                let c = v.containers.entry(id.clone()).or_default();
                c.id = id;
                c.status = ContainerStatus::Stopped;
                c.updated_at = Some(self.at);
            }
            DockerAction::Destroy => {
                v.containers.remove(&id);
                // Ours: a destroyed container's agent is gone for good.
                v.agents.remove(&id);
            }
            DockerAction::Rename => {
                let c = v.containers.entry(id.clone()).or_default();
                c.id = id;
                c.name = e.attr("name").unwrap_or_default().to_owned();
                c.updated_at = Some(self.at);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clawker_actors::Event as _;

    fn t(s: i64) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_700_000_000 + s).unwrap()
    }

    fn connected(id: &str, at: i64) -> SessionConnected {
        SessionConnected {
            agent: AgentRef::new(id, "dev", "web"),
            address: "10.0.0.2:7700".into(),
            attempts: 1,
            peer_cn: "clawker.web.dev".into(),
            peer_thumbprint: Thumbprint([7; 32]),
            chain_verified: true,
            leaf_not_after: Some(t(at + 86_400)),
            at: t(at),
        }
    }

    #[test]
    fn failure_event_never_blanks_identity() {
        let mut v = Worldview::default();
        v.apply_event(&connected("c1", 0));
        v.apply_event(&SessionFailed {
            agent: AgentRef::new("c1", String::new(), String::new()),
            address: String::new(),
            reason: failed_reason::CONTAINER_NOT_RUNNING.into(),
            attempts: 3,
            at: t(1),
        });
        let a = &v.agents["c1"];
        assert_eq!((a.agent.as_str(), a.project.as_str()), ("dev", "web"));
        assert_eq!(a.address, "10.0.0.2:7700");
        assert_eq!(a.session_status, SessionStatus::Failed);
        assert_eq!(a.last_error, "container_not_running");
        assert_eq!(v.last_updated_at, Some(t(1)));
    }

    #[test]
    fn match_sets_registered_and_trust_is_re_evaluated_per_session() {
        let mut v = Worldview::default();
        v.apply_event(&connected("c1", 0));
        v.apply_event(&AgentUntrusted {
            agent: AgentRef::new("c1", "dev", "web"),
            reason: UntrustedReason::CertThumbprintMismatch,
            detail: String::new(),
            at: t(1),
        });
        assert!(!v.agents["c1"].trust.trusted);
        assert!(!v.agents["c1"].registered);
        // A later session matches.
        v.apply_event(&AgentTrusted {
            agent: AgentRef::new("c1", "dev", "web"),
            rotations: 0,
            at: t(2),
        });
        let a = &v.agents["c1"];
        assert!(a.registered);
        assert!(a.trust.trusted);
        assert_eq!(a.trust_history.len(), 1);
        assert_eq!(
            a.trust_history[0].reason,
            Some(UntrustedReason::CertThumbprintMismatch)
        );
    }

    #[test]
    fn an_agent_that_never_connected_is_not_trusted() {
        let mut v = Worldview::default();
        // Only a failure seen: no session, no verdict.
        v.apply_event(&SessionFailed {
            agent: AgentRef::container("c1"),
            address: String::new(),
            reason: failed_reason::ENDPOINT_MISSING.into(),
            attempts: 1,
            at: t(0),
        });
        let a = &v.agents["c1"];
        assert!(!a.trust.trusted, "no trust decision was ever made");
        assert!(a.trust.is_pending());
        assert!(!a.registered);
    }

    #[test]
    fn a_new_session_is_pending_until_its_own_trust_decision() {
        let mut v = Worldview::default();
        v.apply_event(&connected("c1", 0));
        assert!(v.agents["c1"].trust.is_pending(), "connected, not decided");
        v.apply_event(&AgentTrusted {
            agent: AgentRef::new("c1", "dev", "web"),
            rotations: 0,
            at: t(1),
        });
        assert!(v.agents["c1"].trust.trusted);
        // The session breaks; the next one reconnects: the old verdict is
        // history, the new session is not trusted until it decides.
        v.apply_event(&SessionBroken {
            agent: AgentRef::new("c1", "dev", "web"),
            address: String::new(),
            reason: "stream reset".into(),
            at: t(2),
        });
        v.apply_event(&SessionConnecting {
            agent: AgentRef::new("c1", "dev", "web"),
            address: "10.0.0.2:7700".into(),
            at: t(3),
        });
        let a = &v.agents["c1"];
        assert!(
            !a.trust.trusted,
            "an earlier session's verdict must not carry over"
        );
        assert_eq!(a.trust_history.len(), 1);
        assert!(a.trust_history[0].trusted);
        v.apply_event(&connected("c1", 4));
        assert_eq!(
            v.agents["c1"].trust_history.len(),
            1,
            "pending is not history"
        );
        v.apply_event(&AgentTrusted {
            agent: AgentRef::new("c1", "dev", "web"),
            rotations: 0,
            at: t(5),
        });
        assert!(v.agents["c1"].trust.trusted);
    }

    #[test]
    fn rotation_updates_leaf_expiry_thumbprint_and_count() {
        let mut v = Worldview::default();
        v.apply_event(&connected("c1", 0));
        assert_eq!(v.agents["c1"].leaf_not_after, Some(t(86_400)));
        v.apply_event(&AgentTrusted {
            agent: AgentRef::new("c1", "dev", "web"),
            rotations: 3,
            at: t(1),
        });
        assert_eq!(
            v.agents["c1"].rotations, 3,
            "durable count after a CP restart"
        );
        v.apply_event(&CertRotated {
            agent: AgentRef::new("c1", String::new(), String::new()),
            old: Thumbprint([7; 32]),
            new: Thumbprint([8; 32]),
            not_after: t(100),
            reason: RotationReason::HalfLife,
            rotations: 4,
            duration: std::time::Duration::from_millis(3),
            at: t(50),
        });
        let a = &v.agents["c1"];
        assert_eq!(a.rotations, 4);
        assert_eq!(a.leaf_not_after, Some(t(100)));
        assert_eq!(a.thumbprint, Thumbprint([8; 32]).to_hex());
        assert_eq!(a.agent, "dev", "identity kept");
        let j = serde_json::to_value(&v).unwrap();
        assert_eq!(j["agents"]["c1"]["leaf_not_after"], "2023-11-14T22:15:00Z");
        assert_eq!(j["agents"]["c1"]["rotations"], 4);
    }

    #[test]
    fn destroy_removes_container_and_agent() {
        let mut v = Worldview::default();
        let start = DockerEvent::container(
            DockerAction::Start,
            "c1",
            [
                ("name", "alpha"),
                ("image", "img"),
                ("dev.clawker.agent", "dev"),
            ]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        );
        DomainEvent::apply(&DockerEventOccurred::new(start.clone()), &mut v);
        assert_eq!(v.containers["c1"].name, "alpha");
        assert_eq!(
            v.containers["c1"].labels.keys().collect::<Vec<_>>(),
            vec!["dev.clawker.agent"]
        );
        v.apply_event(&connected("c1", 0));
        let mut stop = start.clone();
        stop.action = DockerAction::Die;
        DomainEvent::apply(&DockerEventOccurred::new(stop), &mut v);
        assert_eq!(v.containers["c1"].status, ContainerStatus::Stopped);
        assert!(v.agents.contains_key("c1"), "stop keeps the agent");
        let mut destroy = start;
        destroy.action = DockerAction::Destroy;
        DomainEvent::apply(&DockerEventOccurred::new(destroy), &mut v);
        assert!(v.containers.is_empty());
        assert!(v.agents.is_empty());
    }

    #[test]
    fn init_projection_tracks_steps_and_outcome() {
        let mut v = Worldview::default();
        let r = |s: &str| AgentRef {
            container_id: s.into(),
            ..AgentRef::default()
        };
        let id = r("c1").container_id;
        v.apply_event(&InitStarted {
            agent: AgentRef::new(id.clone(), "dev", String::new()),
            plans: vec![Plan::Init, Plan::Boot],
            step_count: 7,
            at: t(10),
        });
        v.apply_event(&InitStepStarted {
            agent: AgentRef::new(id.clone(), String::new(), String::new()),
            plan: Plan::Init,
            step: "ssh".into(),
            step_index: 99,
            step_count: 7,
            at: t(11),
        });
        assert_eq!(v.agents["c1"].init.step_index, 6, "clamped to step_count-1");
        v.apply_event(&InitFailed {
            agent: AgentRef::new(id.clone(), String::new(), String::new()),
            plan: Plan::Init,
            failed_step: "ssh".into(),
            reason: InitFailureReason::Timeout,
            detail: "ERROR_CODE_TIMEOUT: x".into(),
            exit_code: -1,
            duration: std::time::Duration::from_secs(1),
            at: t(5), // earlier than start: floored
        });
        let init = &v.agents["c1"].init;
        assert_eq!(init.status, InitStatus::Failed);
        assert_eq!(init.plans, vec![Plan::Init, Plan::Boot]);
        assert_eq!(init.plan, Some(Plan::Init));
        assert_eq!(init.completed_at, Some(t(10)));
        assert_eq!(init.step, "ssh");
        assert_eq!(v.agents["c1"].agent, "dev");
    }

    #[test]
    fn plan_decision_and_termination_are_projected() {
        let mut v = Worldview::default();
        v.apply_event(&connected("c1", 0));
        v.apply_event(&PlanDecided {
            agent: AgentRef::new("c1", String::new(), String::new()),
            initialized: true,
            cmd_running: true,
            plans: vec![],
            skipped: plan_skipped::CMD_RUNNING.into(),
            at: t(1),
        });
        let start = v.agents["c1"].start.clone().unwrap();
        assert!(start.initialized && start.cmd_running && start.plans.is_empty());
        assert_eq!(start.skipped, "cmd_running");
        v.apply_event(&AgentTerminated {
            agent: AgentRef::new("c1", String::new(), String::new()),
            plan: Plan::Boot,
            step: "pre-run".into(),
            exit_code: 3,
            by: TerminatedBy::SelfExit,
            detail: String::new(),
            at: t(2),
        });
        let j = serde_json::to_value(&v).unwrap();
        let term = &j["agents"]["c1"]["terminated"];
        assert_eq!(term["plan"], "boot");
        assert_eq!(term["by"], "self_exit");
        assert_eq!(term["exit_code"], 3);
        assert_eq!(j["agents"]["c1"]["agent"], "dev", "identity kept");
    }

    #[test]
    fn events_without_a_plan_decode_as_the_legacy_init_plan() {
        let legacy = r#"{"container_id":"c","agent":"a","project":"","step":"git","step_index":2,"step_count":7,"at":"2023-11-14T22:13:20Z"}"#;
        let Decoded::InitStepStarted(e) = decode("agent.init.step.started", legacy).unwrap() else {
            panic!()
        };
        assert_eq!(e.plan, Plan::Init);
        let legacy = r#"{"container_id":"c","agent":"a","project":"","failed_step":"git","reason":"exit_code","detail":"x","duration_ms":1.0,"at":"2023-11-14T22:13:20Z"}"#;
        let Decoded::InitFailed(e) = decode("agent.init.failed", legacy).unwrap() else {
            panic!()
        };
        assert_eq!((e.plan, e.exit_code), (Plan::Init, -1));
    }

    #[test]
    fn containment_is_projected_bounded_and_visible_in_json() {
        let mut v = Worldview::default();
        v.apply_event(&connected("c1", 0));
        for i in 0..(CONTAINMENT_HISTORY as i64 + 4) {
            v.apply_event(&ContainmentApplied {
                agent: AgentRef::new("c1", String::new(), String::new()),
                trigger: "untrusted:cert_invalid".into(),
                action: ContainmentAction::Isolate,
                outcome: if i == 0 {
                    ContainmentOutcome::Applied
                } else {
                    ContainmentOutcome::AlreadyApplied
                },
                detail: format!("#{i}"),
                at: t(i + 1),
            });
        }
        let a = &v.agents["c1"];
        assert_eq!(a.containment.len(), CONTAINMENT_HISTORY);
        assert_eq!(a.containment[0].detail, "#4", "oldest dropped first");
        assert_eq!(a.agent, "dev", "identity kept");
        let j = serde_json::to_value(&v).unwrap();
        let rec = &j["agents"]["c1"]["containment"][0];
        assert_eq!(rec["action"], "isolate");
        assert_eq!(rec["outcome"], "already_applied");
        assert_eq!(ContainmentApplied::NAME, "policy.containment.applied");
    }

    #[test]
    fn events_serialise_with_reference_names() {
        let e = connected("c1", 0);
        assert_eq!(SessionConnected::NAME, "agent.session.connected");
        let j = e.to_json();
        assert_eq!(j["peer_thumbprint"], Thumbprint([7; 32]).to_hex());
        assert_eq!(j["chain_verified"], true);
        assert_eq!(j["at"], "2023-11-14T22:13:20Z");
        let u = AgentUntrusted {
            agent: AgentRef::new("c", String::new(), String::new()),
            reason: UntrustedReason::CertCnMismatch,
            detail: String::new(),
            at: t(0),
        };
        assert_eq!(u.to_json()["reason"], "cert_cn_mismatch");
        assert_eq!(
            UntrustedReason::parse("register_failed"),
            Some(UntrustedReason::RegisterFailed)
        );
    }
}
