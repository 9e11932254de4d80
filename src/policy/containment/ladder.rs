//! Running one ladder: each action in order, each idempotent, each reported
//! as one `policy.containment.applied`.

use std::sync::Arc;
use std::time::Duration;

use super::config::{ContainmentConfig, Trigger};
use crate::events::{
    self, AgentRef, ContainmentAction, ContainmentApplied, ContainmentOutcome, Publish,
};
use crate::runtime::{ContainmentOps, RuntimeError, Stopped};
use crate::session::command::RunAs;
use crate::session::commands::{SessionCommandError, SessionCommands};

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

impl Containment {
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
                let mut who = RunAs::root();
                if let Some(a) = &self.config.lock_allow {
                    who.env.insert("CLAWKER_LOCK_ALLOW".to_owned(), a.clone());
                }
                let timeout = Duration::from_secs(u64::from(self.config.lock_timeout_secs.max(1)));
                match self.sessions.run(id, LOCK_SCRIPT, who, timeout).await {
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

fn ops_failure(e: RuntimeError) -> (ContainmentOutcome, String) {
    match e {
        RuntimeError::NotFound(_) => (ContainmentOutcome::NotFound, e.to_string()),
        _ => (ContainmentOutcome::Failed, e.to_string()),
    }
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
    use std::collections::{HashMap, VecDeque};
    use std::sync::Mutex;

    use futures::future::BoxFuture;

    use super::*;
    use crate::events::RecordingSink;
    use crate::events::UntrustedReason;
    use crate::policy::containment::config::{Rule, TriggerKind};
    use crate::runtime::memory::MemoryOps;
    use crate::session::commands::CommandOutput;
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
        fn run<'a>(
            &'a self,
            id: &'a str,
            _: &'a str,
            who: RunAs,
            _: Duration,
        ) -> BoxFuture<'a, Result<CommandOutput, SessionCommandError>> {
            self.seen.lock().unwrap().push((id.to_owned(), who.env));
            let r = self
                .answers
                .lock()
                .unwrap()
                .pop_front()
                .unwrap_or(Err(SessionCommandError::NoSession));
            Box::pin(async move { r })
        }
    }

    fn target(id: &str) -> AgentRef {
        AgentRef::new(id, "dev", "web")
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
