//! Ending a container whose init or boot step failed (reference
//! `head-lifecycle.md` §3.2, `KillAfterGrace`), with an event that says so.
//!
//! A shell step that exits non-zero carries `exit_on_non_zero`, so clawkerd
//! (PID 1) exits with the step's code right after its `Done`: the container
//! ends by itself and its exit status is the step's. The CP waits up to a
//! grace period for that and kills the container (through the runtime
//! seam) if it is still running. A failure that is not an exit code
//! (timeout, spawn failure, protocol error) leaves clawkerd up, so the CP
//! kills at once instead of waiting the grace out (the reference waits).
//! A failed `AgentReady` (the user command could not start) makes clawkerd
//! exit 1 by itself.
//!
//! This runs on its own task, not the session's: the container's `die`
//! stops the session actor (aborting its task), and that must not abort the
//! teardown it caused — nor lose the event.

use std::sync::Arc;
use std::time::Duration;

use crate::events::{self, AgentRef, InitFailureReason, Plan, Publish, TerminatedBy};
use crate::runtime::{RuntimeError, Stopped, Terminate};

use super::init::StepFailure;
use super::lifecycle::{ContainerResolver, ResolveError};

/// How long clawkerd gets to exit by itself (reference: 15 s).
pub const DEFAULT_GRACE: Duration = Duration::from_secs(15);
/// How often the container's state is asked while waiting.
pub const POLL: Duration = Duration::from_millis(50);

/// The failed step that ends a container.
#[derive(Debug, Clone)]
pub struct Termination {
    pub agent: AgentRef,
    pub plan: Plan,
    pub step: String,
    pub failure: StepFailure,
}

impl Termination {
    /// Whether clawkerd will exit by itself: a non-zero exit code of a
    /// step that carried `exit_on_non_zero`, or a failed `AgentReady`.
    pub fn expects_self_exit(&self) -> bool {
        match self.failure.reason {
            InitFailureReason::ExitCode => true,
            InitFailureReason::IoError => self.step == "agent-ready",
            _ => false,
        }
    }
}

/// Waits for the self-exit (up to `grace`), kills otherwise, publishes
/// `agent.terminated`. Returns how it ended.
pub async fn end_container<P: Publish>(
    t: Termination,
    resolver: Arc<dyn ContainerResolver>,
    runtime: Arc<dyn Terminate>,
    sink: P,
    grace: Duration,
) -> TerminatedBy {
    let id = t.agent.container_id.clone();
    let (by, detail) = if t.expects_self_exit() && wait_stopped(&*resolver, &id, grace).await {
        tracing::info!(event = "agent_cmd_container_self_exit", container_id = %id, step = %t.step);
        (TerminatedBy::SelfExit, String::new())
    } else {
        if t.expects_self_exit() {
            tracing::warn!(event = "agent_cmd_self_exit_grace_elapsed", container_id = %id, grace_ms = grace.as_millis() as u64);
        }
        match runtime.kill(&id).await {
            Ok(Stopped::Now) => (TerminatedBy::CpKill, String::new()),
            // It stopped between our last look and the kill.
            Ok(Stopped::Already) | Err(RuntimeError::NotFound(_)) => {
                (TerminatedBy::SelfExit, String::new())
            }
            Err(e) => {
                tracing::error!(event = "agent_cmd_kill_failed", container_id = %id, error = %e);
                (TerminatedBy::KillFailed, e.to_string())
            }
        }
    };
    tracing::warn!(
        event = "agent_terminated",
        container_id = %id,
        plan = t.plan.as_str(),
        step = %t.step,
        exit_code = t.failure.exit_code,
        by = by.as_str(),
        "container ended: a start step failed"
    );
    sink.publish(events::AgentTerminated {
        agent: t.agent,
        plan: t.plan,
        step: t.step,
        exit_code: t.failure.exit_code,
        by,
        detail,
        at: events::now(),
    });
    by
}

/// Polls until the container is not running (or gone), at most `grace`.
async fn wait_stopped(resolver: &dyn ContainerResolver, id: &str, grace: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + grace;
    loop {
        match resolver.resolve(id).await {
            Ok(t) if !t.running => return true,
            Err(ResolveError::NotFound) => return true,
            _ => {}
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::RecordingSink;
    use crate::runtime::memory::MemoryOps;
    use crate::session::lifecycle::ResolvedTarget;
    use futures::future::BoxFuture;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// Reports "running" for the first `running_for` asks, then stopped.
    struct Flips {
        asked: AtomicU32,
        running_for: u32,
    }

    impl ContainerResolver for Flips {
        fn resolve(&self, _: &str) -> BoxFuture<'_, Result<ResolvedTarget, ResolveError>> {
            let n = self.asked.fetch_add(1, Ordering::SeqCst);
            let running = n < self.running_for;
            Box::pin(async move {
                Ok(ResolvedTarget {
                    running,
                    ..ResolvedTarget::default()
                })
            })
        }
    }

    fn failed(reason: InitFailureReason, step: &str, exit_code: i32) -> Termination {
        Termination {
            agent: AgentRef::new("c1", "dev", "web"),
            plan: Plan::Boot,
            step: step.into(),
            failure: StepFailure {
                reason,
                detail: String::new(),
                exit_code,
                output: String::new(),
            },
        }
    }

    fn setup(running_for: u32) -> (Arc<Flips>, MemoryOps, RecordingSink) {
        let ops = MemoryOps::default();
        ops.add("c1", &["clawker-net"]);
        (
            Arc::new(Flips {
                asked: AtomicU32::new(0),
                running_for,
            }),
            ops,
            RecordingSink::default(),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn a_self_exit_within_the_grace_is_reported_and_nothing_is_killed() {
        let (resolver, ops, sink) = setup(3);
        let by = end_container(
            failed(InitFailureReason::ExitCode, "pre-run", 3),
            resolver.clone(),
            Arc::new(ops.clone()),
            sink.clone(),
            DEFAULT_GRACE,
        )
        .await;
        assert_eq!(by, TerminatedBy::SelfExit);
        assert!(ops.calls().is_empty(), "{:?}", ops.calls());
        let e = &sink.of("agent.terminated")[0];
        assert_eq!(e["by"], "self_exit");
        assert_eq!(e["step"], "pre-run");
        assert_eq!(e["plan"], "boot");
        assert_eq!(e["exit_code"], 3);
    }

    #[tokio::test(start_paused = true)]
    async fn the_cp_kills_when_the_grace_elapses() {
        let (resolver, ops, sink) = setup(u32::MAX);
        let started = tokio::time::Instant::now();
        let by = end_container(
            failed(InitFailureReason::ExitCode, "post-init", 9),
            resolver.clone(),
            Arc::new(ops.clone()),
            sink.clone(),
            DEFAULT_GRACE,
        )
        .await;
        assert_eq!(by, TerminatedBy::CpKill);
        assert_eq!(ops.calls(), ["kill c1"]);
        // Paused clock: the grace is waited out exactly, not slept for real.
        assert!(started.elapsed() >= DEFAULT_GRACE);
        assert!(started.elapsed() < DEFAULT_GRACE + Duration::from_secs(1));
        assert_eq!(sink.of("agent.terminated")[0]["by"], "cp_kill");
    }

    #[tokio::test(start_paused = true)]
    async fn a_failure_without_an_exit_code_is_killed_at_once() {
        let (resolver, ops, sink) = setup(u32::MAX);
        let started = tokio::time::Instant::now();
        let by = end_container(
            failed(InitFailureReason::Timeout, "pre-run", -1),
            resolver.clone(),
            Arc::new(ops.clone()),
            sink,
            DEFAULT_GRACE,
        )
        .await;
        assert_eq!(by, TerminatedBy::CpKill);
        assert_eq!(
            started.elapsed(),
            Duration::ZERO,
            "no grace for a step that cannot self-exit"
        );
        assert_eq!(resolver.asked.load(Ordering::SeqCst), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_kill_is_reported_not_hidden() {
        let (resolver, _, sink) = setup(u32::MAX);
        // The runtime does not know the container id → NotFound is a stop;
        // an API error is a failed kill.
        struct Broken;
        impl Terminate for Broken {
            fn kill<'a>(&'a self, _: &'a str) -> BoxFuture<'a, Result<Stopped, RuntimeError>> {
                Box::pin(async { Err(RuntimeError::Api("engine down".into())) })
            }
        }
        let by = end_container(
            failed(InitFailureReason::SpawnFailed, "pre-run", -1),
            resolver,
            Arc::new(Broken),
            sink.clone(),
            DEFAULT_GRACE,
        )
        .await;
        assert_eq!(by, TerminatedBy::KillFailed);
        assert_eq!(
            sink.of("agent.terminated")[0]["detail"],
            "docker: engine down"
        );
    }

    #[test]
    fn only_exit_codes_and_a_failed_agent_ready_self_exit() {
        assert!(failed(InitFailureReason::ExitCode, "git", 1).expects_self_exit());
        assert!(failed(InitFailureReason::IoError, "agent-ready", -1).expects_self_exit());
        assert!(!failed(InitFailureReason::IoError, "pre-run", -1).expects_self_exit());
        assert!(!failed(InitFailureReason::Timeout, "pre-run", -1).expects_self_exit());
        assert!(
            !failed(InitFailureReason::ProtocolError, "agent-initialized", -1).expects_self_exit()
        );
    }
}
