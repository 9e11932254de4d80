//! Running one ladder: each action in order, each idempotent, each reported
//! as one `policy.containment.applied`; and the operator's way back
//! (`release`, `unlock`), reported as `policy.containment.released`.
//!
//! Everything that touches one container — ladders and operator lifts —
//! takes that container's turn first, so they run one at a time in the
//! order they arrived.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::config::{ContainmentConfig, Trigger};
use crate::events::{
    self, AgentRef, ContainmentAction, ContainmentApplied, ContainmentOutcome, ContainmentReleased,
    Publish,
};
use crate::runtime::{Change, ContainerFacts, ContainmentOps, RuntimeError, Stopped};
use crate::session::control::SessionControl;

/// An operator lifting one containment step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lift {
    /// `clawker agent release`: back from quarantine to the agent network.
    Release,
    /// `clawker agent unlock`: remove the namespace lock.
    Unlock,
}

impl Lift {
    /// The action this lifts (the event's `action`).
    pub fn action(self) -> ContainmentAction {
        match self {
            Lift::Release => ContainmentAction::Isolate,
            Lift::Unlock => ContainmentAction::Lock,
        }
    }
}

/// Why a lift was refused before anything changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LiftError {
    #[error("no agent container {0}")]
    NotFound(String),
    #[error(
        "{0} is untrusted on its current session: lifting its containment would be undone by \
         its next session; remove it (`clawker agent rm`) or make it trusted again first"
    )]
    Untrusted(String),
    #[error(
        "{0} has no open session, so the CP cannot confirm it is trusted; retry once the \
         session is up (`clawker worldview`)"
    )]
    NoSession(String),
    #[error("looking up {container}: {source}")]
    Runtime {
        container: String,
        source: RuntimeError,
    },
}

/// Everything a ladder run needs; shared by the actor's tasks and the
/// admin API.
pub struct Containment {
    pub config: ContainmentConfig,
    pub ops: Arc<dyn ContainmentOps>,
    pub sessions: Arc<dyn SessionControl>,
    /// clawkerd's port: what `lock` keeps open to the CP.
    pub clawkerd_port: u16,
    /// One turn per container (ladders and lifts, in arrival order).
    turns: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl Containment {
    pub fn new(
        config: ContainmentConfig,
        ops: Arc<dyn ContainmentOps>,
        sessions: Arc<dyn SessionControl>,
        clawkerd_port: u16,
    ) -> Self {
        Self {
            config,
            ops,
            sessions,
            clawkerd_port,
            turns: Mutex::new(HashMap::new()),
        }
    }

    /// Waits for `id`'s turn. The map only holds containers someone is
    /// acting on (entries nobody holds are dropped on the next call).
    async fn turn(&self, id: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let m = {
            let mut turns = self.turns.lock().unwrap_or_else(|p| p.into_inner());
            turns.retain(|_, t| Arc::strong_count(t) > 1);
            turns.entry(id.to_owned()).or_default().clone()
        };
        m.lock_owned().await
    }

    /// Runs the ladder for `trigger`, publishing one event per step, and
    /// returns the events (in order).
    pub async fn run<P: Publish>(
        &self,
        target: &AgentRef,
        trigger: Trigger,
        publish: &P,
    ) -> Vec<ContainmentApplied> {
        let mut out = Vec::new();
        if !self.config.enabled {
            return out;
        }
        let _turn = self.turn(&target.container_id).await;
        for action in self.config.ladder(trigger) {
            let (outcome, detail) = self.step(&target.container_id, action).await;
            let ev = ContainmentApplied {
                agent: target.clone(),
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
                if dry {
                    return match self.ops.facts(id).await {
                        Ok(f) => (
                            O::DryRun,
                            format!(
                                "would move from [{}] to {}",
                                f.networks.join(", "),
                                self.ops.quarantine_network()
                            ),
                        ),
                        Err(e) => ops_failure(e),
                    };
                }
                match self.ops.quarantine(id).await {
                    Ok(c) => {
                        if c.changed {
                            // The session's path is gone with the old
                            // network: re-dial over the quarantine address.
                            self.sessions.network_moved(id).await;
                        }
                        change_outcome(c)
                    }
                    Err(e) => ops_failure(e),
                }
            }
            ContainmentAction::Lock => {
                if dry {
                    return (
                        O::DryRun,
                        format!(
                            "would lock the network namespace to the CP's session on :{}",
                            self.clawkerd_port
                        ),
                    );
                }
                let bound = Duration::from_secs(u64::from(self.config.lock_timeout_secs.max(1)));
                match tokio::time::timeout(bound, self.ops.lock(id, self.clawkerd_port)).await {
                    Ok(Ok(c)) => change_outcome(c),
                    Ok(Err(e)) => ops_failure(e),
                    Err(_) => (O::Failed, format!("lock did not finish within {bound:?}")),
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

    /// An operator lifts one step for `container` (id or name). Refused,
    /// with nothing changed, unless the agent's current session trusts it:
    /// an untrusted agent would be contained again by its next session
    /// (release itself makes the session re-dial). Publishes and returns
    /// one `policy.containment.released` for every attempt that got that
    /// far (`failed` included). Nothing ever lifts containment on its own.
    pub async fn lift<P: Publish>(
        &self,
        container: &str,
        lift: Lift,
        publish: &P,
    ) -> Result<ContainmentReleased, LiftError> {
        let facts: ContainerFacts = match self.ops.facts(container).await {
            Ok(f) => f,
            Err(RuntimeError::NotFound(_)) => return Err(LiftError::NotFound(container.into())),
            Err(source) => {
                return Err(LiftError::Runtime {
                    container: container.into(),
                    source,
                });
            }
        };
        let id = facts.id.clone();
        let who = AgentRef::new(id.as_str(), facts.agent_label(), facts.project_label());
        let _turn = self.turn(&id).await;
        match self.sessions.trusted(&id).await {
            Some(true) => {}
            Some(false) => return Err(LiftError::Untrusted(container.into())),
            None => return Err(LiftError::NoSession(container.into())),
        }
        let r = match lift {
            Lift::Release => self.ops.release(&id).await,
            Lift::Unlock => self.ops.unlock(&id).await,
        };
        let (outcome, detail) = match r {
            Ok(c) => {
                if lift == Lift::Release && c.changed {
                    self.sessions.network_moved(&id).await;
                }
                change_outcome(c)
            }
            Err(e) => ops_failure(e),
        };
        let ev = ContainmentReleased {
            agent: who,
            action: lift.action(),
            outcome,
            detail,
            at: events::now(),
        };
        tracing::warn!(
            event = "containment_released",
            container_id = %ev.agent.container_id,
            agent = %ev.agent.name,
            project = %ev.agent.project,
            action = ev.action.as_str(),
            outcome = ev.outcome.as_str(),
            detail = %ev.detail,
            "operator lifted a containment step"
        );
        publish.publish(ev.clone());
        Ok(ev)
    }
}

fn change_outcome(c: Change) -> (ContainmentOutcome, String) {
    let o = if c.changed {
        ContainmentOutcome::Applied
    } else {
        ContainmentOutcome::AlreadyApplied
    };
    (o, c.detail)
}

fn ops_failure(e: RuntimeError) -> (ContainmentOutcome, String) {
    use ContainmentOutcome as O;
    let o = match e {
        RuntimeError::NotFound(_) => O::NotFound,
        // No namespace to act on; a restart starts a new session, which
        // re-runs the ladder.
        RuntimeError::NotRunning(_) => O::AlreadyStopped,
        RuntimeError::Unsupported(_) => O::Unsupported,
        _ => O::Failed,
    };
    (o, e.to_string())
}

fn log_step(ev: &ContainmentApplied) {
    let fields = (
        ev.agent.container_id.as_str(),
        ev.agent.name.as_str(),
        ev.agent.project.as_str(),
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

#[cfg(test)]
mod tests {
    use futures::future::BoxFuture;

    use super::*;
    use crate::events::RecordingSink;
    use crate::events::UntrustedReason;
    use crate::policy::containment::config::{Rule, TriggerKind};
    use crate::runtime::memory::MemoryOps;
    use ContainmentAction as A;
    use ContainmentOutcome as O;

    /// A session side that answers `trusted` with a fixed verdict and
    /// records every "moved" notice.
    #[derive(Clone, Default)]
    struct FakeSessions {
        trusted: Arc<Mutex<Option<bool>>>,
        moved: Arc<Mutex<Vec<String>>>,
    }

    impl FakeSessions {
        fn set_trusted(&self, v: Option<bool>) {
            *self.trusted.lock().unwrap() = v;
        }
        fn moved(&self) -> Vec<String> {
            self.moved.lock().unwrap().clone()
        }
    }

    impl SessionControl for FakeSessions {
        fn trusted<'a>(&'a self, _: &'a str) -> BoxFuture<'a, Option<bool>> {
            let v = *self.trusted.lock().unwrap();
            Box::pin(async move { v })
        }
        fn network_moved<'a>(&'a self, id: &'a str) -> BoxFuture<'a, ()> {
            self.moved.lock().unwrap().push(id.to_owned());
            Box::pin(async {})
        }
    }

    fn target(id: &str) -> AgentRef {
        AgentRef::new(id, "dev", "web")
    }

    fn setup(
        actions: Vec<ContainmentAction>,
        dry_run: bool,
    ) -> (Containment, MemoryOps, FakeSessions) {
        let ops = MemoryOps::default();
        ops.add("c1", &["clawker-net", "bridge", "corp-lan"]);
        let sessions = FakeSessions::default();
        let config = ContainmentConfig {
            dry_run,
            rules: vec![Rule {
                on: TriggerKind::Untrusted,
                reasons: vec![],
                count: 1,
                window_secs: 1,
                actions,
            }],
            ..ContainmentConfig::default()
        };
        let c = Containment::new(
            config,
            Arc::new(ops.clone()),
            Arc::new(sessions.clone()),
            7700,
        );
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
            UntrustedReason::CertExpired,
        ] {
            assert_eq!(c.ladder(Trigger::Untrusted(r)), vec![A::Alert, A::Isolate]);
        }
        assert!(c.ladder(Trigger::InitFailed).is_empty());
        assert!(
            c.ladder(Trigger::SessionFailedRepeated { count: 100 })
                .is_empty()
        );
        assert!(!c.dry_run);
    }

    #[test]
    fn trigger_mapping_from_toml_by_reason_and_threshold() {
        let c: ContainmentConfig = toml::from_str(
            r#"
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
        // Gone with the in-container lock script and the keep-one-network
        // isolate: an old config says so instead of being half-applied.
        assert!(toml::from_str::<ContainmentConfig>("keep_network = \"x\"").is_err());
        assert!(toml::from_str::<ContainmentConfig>("lock_allow = \"10.0.0.1\"").is_err());
    }

    #[tokio::test]
    async fn isolate_quarantines_tells_the_session_once_and_is_idempotent() {
        let (c, ops, sessions) = setup(vec![A::Alert, A::Isolate], false);
        let sink = RecordingSink::default();
        let first = c.run(&target("c1"), MISMATCH, &sink).await;
        assert_eq!(
            outcomes(&first),
            vec![(A::Alert, O::Applied), (A::Isolate, O::Applied)]
        );
        assert_eq!(ops.networks("c1").unwrap(), vec![MemoryOps::QUARANTINE]);
        assert_eq!(first[1].trigger, "untrusted:cert_thumbprint_mismatch");
        assert!(
            first[1].detail.contains("clawker-net, bridge, corp-lan"),
            "{}",
            first[1].detail
        );
        assert_eq!(sessions.moved(), vec!["c1"], "the session re-dials");
        // A CP restart re-publishes AgentUntrusted: the ladder runs again
        // and isolate is a no-op success; the session is left alone.
        let calls = ops.calls().len();
        let again = c.run(&target("c1"), MISMATCH, &sink).await;
        assert_eq!(
            outcomes(&again),
            vec![(A::Alert, O::Applied), (A::Isolate, O::AlreadyApplied)]
        );
        assert_eq!(ops.calls().len(), calls);
        assert_eq!(sessions.moved().len(), 1);
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
            evs[1]
                .detail
                .contains("would move from [bridge, clawker-net, corp-lan] to clawker-quarantine"),
            "{}",
            evs[1].detail
        );
        assert!(evs[2].detail.contains(":7700"), "{}", evs[2].detail);
        assert!(ops.calls().is_empty());
        assert_eq!(ops.networks("c1").unwrap().len(), 3);
        assert_eq!(ops.running("c1"), Some(true));
        assert_eq!(ops.locked("c1"), Some(false));
        assert!(sessions.moved().is_empty());
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
    async fn lock_goes_through_the_runtime_is_idempotent_and_needs_a_running_container() {
        let (c, ops, sessions) = setup(vec![A::Lock], false);
        let sink = RecordingSink::default();
        let first = c.run(&target("c1"), MISMATCH, &sink).await;
        let again = c.run(&target("c1"), MISMATCH, &sink).await;
        assert_eq!(outcomes(&first), vec![(A::Lock, O::Applied)]);
        assert_eq!(outcomes(&again), vec![(A::Lock, O::AlreadyApplied)]);
        assert_eq!(ops.locked("c1"), Some(true));
        assert!(sessions.moved().is_empty(), "a lock moves nothing");
        ops.kill("c1").await.unwrap();
        let stopped = c.run(&target("c1"), MISMATCH, &sink).await;
        assert_eq!(outcomes(&stopped), vec![(A::Lock, O::AlreadyStopped)]);
        assert!(
            stopped[0].detail.contains("not running"),
            "{}",
            stopped[0].detail
        );
    }

    #[tokio::test]
    async fn release_and_unlock_need_a_trusting_session_and_publish_what_they_did() {
        let (c, ops, sessions) = setup(vec![A::Isolate, A::Lock], false);
        let sink = RecordingSink::default();
        c.run(&target("c1"), MISMATCH, &sink).await;
        assert_eq!(ops.locked("c1"), Some(true));
        // Refused before anything changes: untrusted, or no session.
        sessions.set_trusted(Some(false));
        assert!(matches!(
            c.lift("c1", Lift::Release, &sink).await,
            Err(LiftError::Untrusted(_))
        ));
        sessions.set_trusted(None);
        assert!(matches!(
            c.lift("c1", Lift::Unlock, &sink).await,
            Err(LiftError::NoSession(_))
        ));
        assert!(matches!(
            c.lift("nope", Lift::Release, &sink).await,
            Err(LiftError::NotFound(_))
        ));
        assert_eq!(ops.networks("c1").unwrap(), vec![MemoryOps::QUARANTINE]);
        assert!(sink.of("policy.containment.released").is_empty());
        // Trusted again: release and unlock apply, once.
        sessions.set_trusted(Some(true));
        let moved_before = sessions.moved().len();
        let r = c.lift("c1", Lift::Release, &sink).await.unwrap();
        assert_eq!((r.action, r.outcome), (A::Isolate, O::Applied));
        assert_eq!(ops.networks("c1").unwrap(), vec![MemoryOps::AGENT_NET]);
        assert_eq!(
            sessions.moved().len(),
            moved_before + 1,
            "the session re-dials"
        );
        let u = c.lift("c1", Lift::Unlock, &sink).await.unwrap();
        assert_eq!((u.action, u.outcome), (A::Lock, O::Applied));
        assert_eq!(ops.locked("c1"), Some(false));
        let again = c.lift("c1", Lift::Release, &sink).await.unwrap();
        assert_eq!(again.outcome, O::AlreadyApplied);
        let released = sink.of("policy.containment.released");
        assert_eq!(released.len(), 3);
        assert_eq!(released[0]["action"], "isolate");
        assert_eq!(released[1]["action"], "lock");
        assert_eq!(released[0]["agent"], "", "MemoryOps facts carry no labels");
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
