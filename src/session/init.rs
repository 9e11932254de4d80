//! The executor of a session's start sequence (reference `cp-session.md`
//! §12, `head-lifecycle.md` §1, §3): the steps [`super::plan`] composed,
//! one after another over the session, with the `agent.init.*` events.
//!
//! Unlike the reference, every step also has a CP-side wall-clock bound
//! (clawkerd's own timeout plus a grace period; a fixed bound for the
//! control steps), so a peer that keeps the transport alive but never
//! answers cannot wedge the session forever. Shell steps carry
//! `exit_on_non_zero` (unless `keep_on_init_failure`): clawkerd ends the
//! container with a failed step's exit code.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::defaults::agent_user;
use crate::events::{self, AgentRef, InitFailureReason, Plan, Publish};
use crate::proto::clawkerd::v1::{self as pb, ErrorCode, command, response};

use super::command::{self as run, MAX_CAPTURE, RunAs, RunError};
use super::mux::{MuxError, SessionMux, command as cmd};
use super::plan::{self, Hooks, Step, StepKind};

/// The unprivileged user the shell steps run as. HOME and USER are set
/// explicitly because dropping privileges does not change them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentUser {
    pub uid: u32,
    pub gid: u32,
    pub name: String,
    pub home: String,
}

impl Default for AgentUser {
    fn default() -> Self {
        Self {
            uid: agent_user::UID,
            gid: agent_user::GID,
            name: agent_user::NAME.into(),
            home: agent_user::HOME.into(),
        }
    }
}

impl AgentUser {
    /// The identity shell steps run with.
    pub fn run_as(&self) -> RunAs {
        RunAs {
            uid: self.uid,
            gid: self.gid,
            env: HashMap::from([
                ("HOME".to_owned(), self.home.clone()),
                ("USER".to_owned(), self.name.clone()),
            ]),
        }
    }
}

/// CP-side bounds, the agent user, the user's hooks.
#[derive(Debug, Clone)]
pub struct InitConfig {
    pub user: AgentUser,
    /// Added to a shell step's own timeout before the CP gives up on it.
    pub step_grace: Duration,
    /// Bound on AgentReady and AgentInitialized (no clawkerd-side timeout).
    pub agent_ready_timeout: Duration,
    /// `post_init` / `pre_run` (cp.toml `[hooks]`).
    pub hooks: Hooks,
    /// `keep_on_init_failure`: a failed step leaves the container running
    /// (without its command) instead of ending it.
    pub keep_on_failure: bool,
}

impl Default for InitConfig {
    fn default() -> Self {
        Self {
            user: AgentUser::default(),
            step_grace: Duration::from_secs(10),
            agent_ready_timeout: Duration::from_secs(30),
            hooks: Hooks::default(),
            keep_on_failure: false,
        }
    }
}

/// A failed step, as the events describe it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepFailure {
    pub reason: InitFailureReason,
    pub detail: String,
    pub exit_code: i32,
    /// The step's stderr (bounded, trimmed); empty when it never ran.
    pub output: String,
}

impl StepFailure {
    fn transport(detail: impl Into<String>) -> Self {
        Self {
            reason: InitFailureReason::TransportError,
            detail: detail.into(),
            exit_code: -1,
            output: String::new(),
        }
    }
}

/// Maps clawkerd's error code to the init failure vocabulary.
pub fn reason_for(code: ErrorCode) -> InitFailureReason {
    match code {
        ErrorCode::Timeout => InitFailureReason::Timeout,
        ErrorCode::SpawnFailed => InitFailureReason::SpawnFailed,
        ErrorCode::IoError | ErrorCode::NotFound => InitFailureReason::IoError,
        ErrorCode::InvalidRequest | ErrorCode::UnknownCommandId => InitFailureReason::ProtocolError,
        ErrorCode::Unspecified => InitFailureReason::Unknown,
    }
}

impl From<RunError> for StepFailure {
    fn from(e: RunError) -> Self {
        let reason = match &e {
            RunError::Remote { code, .. } => reason_for(*code),
            RunError::Timeout(_) => InitFailureReason::Timeout,
            RunError::Route(_) => InitFailureReason::ProtocolError,
            RunError::Closed | RunError::Send { .. } | RunError::StreamEnded => {
                InitFailureReason::TransportError
            }
        };
        Self {
            reason,
            detail: e.to_string(),
            exit_code: -1,
            output: String::new(),
        }
    }
}

/// `exit_code=<n>`, plus `; stderr: <head>` and the truncation count.
fn exit_detail(code: i32, stderr: &run::Capture) -> String {
    let mut d = format!("exit_code={code}");
    let text = stderr.text();
    if !text.is_empty() {
        d.push_str("; stderr: ");
        d.push_str(&text);
        if stderr.truncated() > 0 {
            d.push_str(&format!(" ... [{} bytes truncated]", stderr.truncated()));
        }
    }
    d
}

/// Runs one step to its terminal response.
pub async fn run_step(
    mux: &SessionMux,
    id: &str,
    step: &Step,
    cfg: &InitConfig,
) -> Result<(), StepFailure> {
    match &step.kind {
        StepKind::Shell {
            root,
            script,
            timeout_seconds,
            stdin,
        } => {
            let who = if *root {
                RunAs::root()
            } else {
                cfg.user.run_as()
            };
            let mut shell = run::shell(script, &who, *timeout_seconds, stdin.as_bytes());
            // clawkerd ends the container with a failed step's code, after
            // the Done is on the wire (a v0.8.0 clawkerd ignores the flag).
            shell.exit_on_non_zero = !cfg.keep_on_failure;
            let bound = Duration::from_secs(u64::from(*timeout_seconds)) + cfg.step_grace;
            let done = run::run_to_completion(mux, id, shell, bound, MAX_CAPTURE)
                .await
                .map_err(|e| match e {
                    RunError::Send { what, error } => StepFailure::transport(format!(
                        "send {}{}: {error}",
                        step.name,
                        if what == "close_stdin" {
                            " close_stdin"
                        } else {
                            ""
                        }
                    )),
                    RunError::Closed => {
                        StepFailure::transport(format!("send {}: session closed", step.name))
                    }
                    other => other.into(),
                })?;
            if done.exit_code == 0 {
                Ok(())
            } else {
                Err(StepFailure {
                    reason: InitFailureReason::ExitCode,
                    detail: exit_detail(done.exit_code, &done.stderr),
                    exit_code: done.exit_code,
                    output: done.stderr.text(),
                })
            }
        }
        StepKind::AgentReady => {
            control_step(
                mux,
                id,
                step,
                command::Payload::AgentReady(pb::AgentReady {}),
                cfg.agent_ready_timeout,
            )
            .await
        }
        StepKind::AgentInitialized => {
            let r = control_step(
                mux,
                id,
                step,
                command::Payload::AgentInitialized(pb::AgentInitialized {}),
                cfg.agent_ready_timeout,
            )
            .await;
            match r {
                // A clawkerd without the marker (v0.8.0) answers every new
                // command INVALID_REQUEST. Ending its container for that
                // (the reference does) would kill every old agent; it just
                // runs init again on its next start, as it always did.
                Err(f) if f.reason == InitFailureReason::ProtocolError => {
                    tracing::warn!(
                        event = "agent_initialized_unsupported",
                        command_id = id,
                        detail = %f.detail,
                        "clawkerd has no init marker (older release); init will run again on its next start"
                    );
                    Ok(())
                }
                other => other,
            }
        }
    }
}

/// A step that is one command without a clawkerd-side timeout: the CP
/// bounds it.
async fn control_step(
    mux: &SessionMux,
    id: &str,
    step: &Step,
    payload: command::Payload,
    bound: Duration,
) -> Result<(), StepFailure> {
    let mut replies = mux.call(cmd(id, payload)).await.map_err(|e| match e {
        MuxError::Closed => StepFailure::transport(format!("send {}: session closed", step.name)),
        other => StepFailure::from(RunError::Route(other)),
    })?;
    let deadline = tokio::time::Instant::now() + bound;
    loop {
        let resp = match tokio::time::timeout_at(deadline, replies.next()).await {
            Err(_) => return Err(RunError::Timeout(bound).into()),
            Ok(None) => return Err(RunError::StreamEnded.into()),
            Ok(Some(r)) => r,
        };
        match resp.payload {
            Some(response::Payload::Done(done)) if done.final_exit_code == 0 => return Ok(()),
            Some(response::Payload::Done(done)) => {
                return Err(StepFailure {
                    reason: InitFailureReason::ExitCode,
                    detail: format!("exit_code={}", done.final_exit_code),
                    exit_code: done.final_exit_code,
                    output: String::new(),
                });
            }
            Some(response::Payload::Error(e)) => {
                return Err(RunError::Remote {
                    code: e.code(),
                    message: e.message,
                }
                .into());
            }
            _ => {}
        }
    }
}

/// The outcome of a whole start sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InitOutcome {
    Completed,
    Failed {
        plan: Plan,
        step: String,
        failure: StepFailure,
    },
}

/// Runs `steps` (from [`plan::compose`]), publishing the §12.6 event
/// sequence with each step's plan. A panic inside a step is contained and
/// reported as reason `unknown`. The first failure ends the sequence: no
/// boot step runs after a failed init step.
pub async fn run<P: Publish>(
    mux: &SessionMux,
    target: &AgentRef,
    sink: &P,
    cfg: InitConfig,
    steps: Vec<Step>,
) -> InitOutcome {
    let count = steps.len() as u32;
    let plans = plan::plans_of(&steps);
    let started = Instant::now();
    let t = target.clone();
    sink.publish(events::InitStarted {
        agent: t.clone(),
        plans: plans.clone(),
        step_count: count,
        at: events::now(),
    });
    let plan_names: Vec<&str> = plans.iter().map(|p| p.as_str()).collect();
    tracing::info!(event = "agent_init_started", container_id = %t.container_id, plans = ?plan_names, "start sequence started");
    let mut in_plan: HashMap<Plan, usize> = HashMap::new();
    for (i, step) in steps.iter().enumerate() {
        let step_started = Instant::now();
        sink.publish(events::InitStepStarted {
            agent: t.clone(),
            plan: step.plan,
            step: step.name.into(),
            step_index: i as u32,
            step_count: count,
            at: events::now(),
        });
        let idx = in_plan.entry(step.plan).or_default();
        let id = plan::command_id(step.plan, &t.container_id, step.name, *idx);
        *idx += 1;
        // Contain a panic in the step: it becomes an `unknown` failure.
        let result = {
            let mux = mux.clone();
            let step = step.clone();
            let cfg = cfg.clone();
            tokio::spawn(async move { run_step(&mux, &id, &step, &cfg).await })
                .await
                .unwrap_or_else(|join| {
                    Err(StepFailure {
                        reason: InitFailureReason::Unknown,
                        detail: format!("Executor.Run panicked: {join}"),
                        exit_code: -1,
                        output: String::new(),
                    })
                })
        };
        let duration = step_started.elapsed();
        match result {
            Ok(()) => {
                sink.publish(events::InitStepCompleted {
                    agent: t.clone(),
                    plan: step.plan,
                    step: step.name.into(),
                    step_index: i as u32,
                    duration,
                    exit_code: 0,
                    at: events::now(),
                });
            }
            Err(f) => {
                sink.publish(events::InitStepFailed {
                    agent: t.clone(),
                    plan: step.plan,
                    step: step.name.into(),
                    step_index: i as u32,
                    duration,
                    exit_code: f.exit_code,
                    reason: f.reason,
                    detail: f.detail.clone(),
                    output: f.output.clone(),
                    at: events::now(),
                });
                sink.publish(events::InitFailed {
                    agent: t.clone(),
                    plan: step.plan,
                    failed_step: step.name.into(),
                    reason: f.reason,
                    detail: f.detail.clone(),
                    exit_code: f.exit_code,
                    duration: started.elapsed(),
                    at: events::now(),
                });
                tracing::error!(
                    event = "agent_init_failed",
                    container_id = %t.container_id,
                    plan = step.plan.as_str(),
                    step = step.name,
                    reason = f.reason.as_str(),
                    detail = %f.detail,
                    "start sequence failed"
                );
                return InitOutcome::Failed {
                    plan: step.plan,
                    step: step.name.into(),
                    failure: f,
                };
            }
        }
    }
    sink.publish(events::InitCompleted {
        agent: t.clone(),
        plans,
        duration: started.elapsed(),
        at: events::now(),
    });
    InitOutcome::Completed
}

#[cfg(test)]
mod tests {
    use super::super::mux::testing::*;
    use super::super::plan::{Decision, compose};
    use super::*;
    use crate::events::RecordingSink;

    const FRESH: Decision = Decision {
        init: true,
        boot: true,
        init_bypassed: false,
    };

    fn fresh() -> Vec<Step> {
        compose(FRESH, &Hooks::default())
    }

    #[test]
    fn stderr_detail_truncates_and_reports() {
        let mut c = run::Capture::with_limit(MAX_CAPTURE);
        c.push(&[b'x'; 4000]);
        c.push(&[b'y'; 200]);
        assert_eq!(c.head.len(), 4096);
        assert_eq!(c.truncated(), 104);
        assert!(exit_detail(3, &c).starts_with("exit_code=3; stderr: xxx"));
        assert!(exit_detail(3, &c).ends_with("y ... [104 bytes truncated]"));
        assert_eq!(exit_detail(1, &run::Capture::default()), "exit_code=1");
    }

    #[test]
    fn error_codes_map_to_reasons() {
        use InitFailureReason as R;
        for (code, want) in [
            (ErrorCode::Timeout, R::Timeout),
            (ErrorCode::SpawnFailed, R::SpawnFailed),
            (ErrorCode::IoError, R::IoError),
            (ErrorCode::NotFound, R::IoError),
            (ErrorCode::InvalidRequest, R::ProtocolError),
            (ErrorCode::UnknownCommandId, R::ProtocolError),
            (ErrorCode::Unspecified, R::Unknown),
        ] {
            assert_eq!(reason_for(code), want, "{code:?}");
        }
    }

    /// Answers every step with Done{0}, except `fail_at` which gets `answer`.
    async fn scripted_peer(mut peer: FakePeer, fail_at: Option<(usize, response::Payload)>) {
        let mut idx = 0;
        while let Some(c) = peer.commands.recv().await {
            match c.payload {
                Some(command::Payload::CloseStdin(_)) => continue,
                Some(_) => {}
                None => continue,
            }
            let p = match &fail_at {
                Some((i, p)) if *i == idx => p.clone(),
                _ => response::Payload::Done(pb::Done { final_exit_code: 0 }),
            };
            let _ = peer.responses.send(resp(
                &c.command_id,
                response::Payload::Started(pb::Started {}),
            ));
            let _ = peer.responses.send(resp(&c.command_id, p));
            idx += 1;
        }
    }

    fn target() -> AgentRef {
        AgentRef::new("abcdef0123456789", "dev", "web")
    }

    #[tokio::test]
    async fn happy_plan_publishes_the_full_sequence() {
        let (mux, peer) = pair();
        tokio::spawn(scripted_peer(peer, None));
        let sink = RecordingSink::default();
        let out = run(&mux, &target(), &sink, InitConfig::default(), fresh()).await;
        assert_eq!(out, InitOutcome::Completed);
        let names = sink.names();
        assert_eq!(names.first(), Some(&"agent.init.started"));
        assert_eq!(names.last(), Some(&"agent.init.completed"));
        assert_eq!(
            names
                .iter()
                .filter(|n| **n == "agent.init.step.completed")
                .count(),
            9
        );
        assert_eq!(names.len(), 20);
        assert_eq!(
            sink.of("agent.init.started")[0]["plans"],
            serde_json::json!(["init", "boot"])
        );
        let plans: Vec<String> = sink
            .of("agent.init.step.started")
            .iter()
            .map(|e| {
                format!(
                    "{}:{}",
                    e["plan"].as_str().unwrap(),
                    e["step"].as_str().unwrap()
                )
            })
            .collect();
        assert_eq!(plans[6], "init:agent-initialized");
        assert_eq!(plans[7], "boot:pre-run");
    }

    #[tokio::test]
    async fn non_zero_exit_stops_the_plan_with_stderr_detail() {
        let (mux, mut peer) = pair();
        tokio::spawn(async move {
            while let Some(c) = peer.commands.recv().await {
                if !matches!(c.payload, Some(command::Payload::Shell(_))) {
                    continue;
                }
                let id = c.command_id.clone();
                let stderr = response::Payload::Stderr(pb::StderrChunk {
                    stage_index: 0,
                    data: b"  boom\n".to_vec().into(),
                });
                let _ = peer.responses.send(resp(&id, stderr));
                assert!(
                    matches!(&c.payload, Some(command::Payload::Shell(s)) if s.exit_on_non_zero),
                    "every shell step asks clawkerd to end the container on failure"
                );
                let done = if id.contains("-git-2") { 7 } else { 0 };
                let _ = peer.responses.send(resp(
                    &id,
                    response::Payload::Done(pb::Done {
                        final_exit_code: done,
                    }),
                ));
            }
        });
        let sink = RecordingSink::default();
        let out = run(&mux, &target(), &sink, InitConfig::default(), fresh()).await;
        let InitOutcome::Failed {
            plan,
            step,
            failure,
        } = out
        else {
            panic!("expected failure")
        };
        assert_eq!((plan, step.as_str()), (Plan::Init, "git"));
        assert_eq!(failure.reason, InitFailureReason::ExitCode);
        assert_eq!(failure.detail, "exit_code=7; stderr: boom");
        assert_eq!(failure.exit_code, 7);
        assert_eq!(failure.output, "boom");
        let failed = sink.of("agent.init.failed");
        assert_eq!(failed.len(), 1);
        assert_eq!(failed[0]["failed_step"], "git");
        assert_eq!(failed[0]["reason"], "exit_code");
        assert_eq!(failed[0]["plan"], "init");
        assert_eq!(failed[0]["exit_code"], 7);
        assert_eq!(sink.of("agent.init.step.failed")[0]["output"], "boom");
        assert!(sink.of("agent.init.completed").is_empty());
        assert_eq!(
            sink.of("agent.init.step.started").len(),
            3,
            "no step after the failure starts"
        );
    }

    #[tokio::test]
    async fn typed_error_maps_reason_and_detail() {
        let (mux, peer) = pair();
        let err = response::Payload::Error(pb::Error {
            code: ErrorCode::Timeout as i32,
            message: "killed".into(),
            os_errno: 0,
        });
        tokio::spawn(scripted_peer(peer, Some((0, err))));
        let sink = RecordingSink::default();
        let InitOutcome::Failed { failure, .. } =
            run(&mux, &target(), &sink, InitConfig::default(), fresh()).await
        else {
            panic!()
        };
        assert_eq!(failure.reason, InitFailureReason::Timeout);
        assert_eq!(failure.detail, "ERROR_CODE_TIMEOUT: killed");
    }

    #[tokio::test]
    async fn silent_peer_hits_the_cp_side_bound() {
        let (mux, peer) = pair();
        // Keep the peer alive but never answer.
        let _keep = peer;
        let sink = RecordingSink::default();
        let cfg = InitConfig {
            step_grace: Duration::from_millis(50),
            agent_ready_timeout: Duration::from_millis(50),
            ..InitConfig::default()
        };
        let step = Step {
            plan: Plan::Boot,
            name: "agent-ready",
            kind: StepKind::AgentReady,
        };
        let f = run_step(&mux, "x", &step, &cfg).await.unwrap_err();
        assert_eq!(f.reason, InitFailureReason::Timeout);
        assert!(f.detail.contains("CP-side bound"), "{}", f.detail);
        drop(sink);
    }

    #[tokio::test]
    async fn stream_end_is_a_transport_error() {
        let (mux, peer) = pair();
        drop(peer);
        let sink = RecordingSink::default();
        let InitOutcome::Failed { failure, step, .. } =
            run(&mux, &target(), &sink, InitConfig::default(), fresh()).await
        else {
            panic!()
        };
        assert_eq!(step, "docker-socket");
        assert_eq!(failure.reason, InitFailureReason::TransportError);
    }

    #[tokio::test]
    async fn an_old_clawkerd_without_the_marker_still_boots() {
        let (mux, peer) = pair();
        // A v0.8.0 clawkerd answers AgentInitialized (step 7) INVALID_REQUEST.
        let err = response::Payload::Error(pb::Error {
            code: ErrorCode::InvalidRequest as i32,
            message: "unknown payload type".into(),
            os_errno: 0,
        });
        tokio::spawn(scripted_peer(peer, Some((6, err))));
        let sink = RecordingSink::default();
        let out = run(&mux, &target(), &sink, InitConfig::default(), fresh()).await;
        assert_eq!(out, InitOutcome::Completed);
        assert_eq!(sink.of("agent.init.completed").len(), 1);
    }

    #[tokio::test]
    async fn keep_on_failure_does_not_ask_clawkerd_to_exit() {
        let (mux, mut peer) = pair();
        let seen = tokio::spawn(async move {
            let c = peer.commands.recv().await.unwrap();
            let Some(command::Payload::Shell(s)) = c.payload else {
                panic!()
            };
            s.exit_on_non_zero
        });
        let cfg = InitConfig {
            keep_on_failure: true,
            step_grace: Duration::from_millis(10),
            ..InitConfig::default()
        };
        let step = Step {
            plan: Plan::Boot,
            name: "pre-run",
            kind: StepKind::Shell {
                root: false,
                script: "true".into(),
                timeout_seconds: 0,
                stdin: "",
            },
        };
        let _ = run_step(&mux, "x", &step, &cfg).await;
        assert!(!seen.await.unwrap());
    }
}
