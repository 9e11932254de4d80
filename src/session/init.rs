//! The init plan and its executor (reference `cp-session.md` §12).
//!
//! Seven steps run over the session after classification: six idempotent
//! shell steps, then `AgentReady`, which makes clawkerd start the user's
//! command. Unlike the reference, every step also has a CP-side wall-clock
//! bound (clawkerd's own timeout plus a grace period; a fixed bound for
//! AgentReady), so a peer that keeps the transport alive but never answers
//! cannot wedge the session forever.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::defaults::agent_user;
use crate::events::{self, AgentRef, InitFailureReason, Publish};
use crate::proto::clawkerd::v1::{self as pb, ErrorCode, command, response};

use super::command::{self as run, MAX_CAPTURE, RunAs, RunError};
use super::mux::{MuxError, SessionMux, command as cmd};

pub const STEP_TIMEOUT_DEFAULT: u32 = 30;
pub const STEP_TIMEOUT_POST_INIT: u32 = 600;

/// The known-hosts blob fed to the ssh step (github, gitlab, bitbucket).
pub const KNOWN_HOSTS: &str = include_str!("known_hosts.txt");

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepKind {
    Shell {
        /// Runs as root; otherwise as the configured agent user.
        root: bool,
        script: &'static str,
        timeout_seconds: u32,
        stdin: &'static str,
    },
    AgentReady,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub name: &'static str,
    pub kind: StepKind,
}

const DOCKER_SOCKET: &str =
    "[ -S /var/run/docker.sock ] && chgrp docker /var/run/docker.sock || true";

const CONFIG: &str = r#"INIT_DIR="$HOME/.claude-init"
CONFIG_DIR="$HOME/.claude"
[ -d "$INIT_DIR" ] || exit 0
mkdir -p "$CONFIG_DIR"
[ -e "$CONFIG_DIR/statusline.sh" ] || cp "$INIT_DIR/statusline.sh" "$CONFIG_DIR/statusline.sh" 2>/dev/null
if [ ! -s "$CONFIG_DIR/.config.json" ]; then cp "$INIT_DIR/.config.json" "$CONFIG_DIR/.config.json" 2>/dev/null; fi
if [ ! -e "$CONFIG_DIR/settings.json" ]; then
  cp "$INIT_DIR/settings.json" "$CONFIG_DIR/settings.json"
else
  if jq -s '.[0] * .[1]' "$INIT_DIR/settings.json" "$CONFIG_DIR/settings.json" > "$CONFIG_DIR/settings.json.tmp" 2>/dev/null; then
    mv "$CONFIG_DIR/settings.json.tmp" "$CONFIG_DIR/settings.json"
  else
    rm -f "$CONFIG_DIR/settings.json.tmp"
  fi
fi"#;

const GIT: &str = r#"HOST_GITCONFIG="/tmp/host-gitconfig"
[ -f "$HOST_GITCONFIG" ] || exit 0
TMP="$HOME/.gitconfig.tmp"
if awk '/^\[credential/ { skip = 1; next } /^\[/ { skip = 0 } !skip { print }' "$HOST_GITCONFIG" > "$TMP" 2>/dev/null; then
  if [ -s "$TMP" ]; then mv "$TMP" "$HOME/.gitconfig"; else rm -f "$TMP"; fi
else
  rm -f "$TMP"
fi"#;

const GIT_CREDENTIALS: &str = r#"[ -n "$CLAWKER_HOST_PROXY" ] || exit 0
[ "$CLAWKER_GIT_HTTPS" = "true" ] || exit 0
git config --global credential.helper clawker"#;

const SSH: &str = r#"mkdir -p "$HOME/.ssh" && chmod 700 "$HOME/.ssh"
KH="$HOME/.ssh/known_hosts"
touch "$KH" && chmod 600 "$KH"
while IFS= read -r line || [ -n "$line" ]; do
  [ -n "$line" ] || continue
  grep -qF -- "$line" "$KH" || printf '%s\n' "$line" >> "$KH"
done"#;

const POST_INIT: &str = r#"POST="$HOME/.clawker/post-init.sh"
DONE="$HOME/.claude/post-initialized"
[ -x "$POST" ] || exit 0
[ -e "$DONE" ] && exit 0
"$POST" || exit $?
mkdir -p "$HOME/.claude" && touch "$DONE""#;

/// The static plan. Order is load-bearing: `docker-socket` is the only
/// root step and `agent-ready` is last.
pub fn plan() -> Vec<Step> {
    let user = |name, script, timeout_seconds, stdin| Step {
        name,
        kind: StepKind::Shell {
            root: false,
            script,
            timeout_seconds,
            stdin,
        },
    };
    vec![
        Step {
            name: "docker-socket",
            kind: StepKind::Shell {
                root: true,
                script: DOCKER_SOCKET,
                timeout_seconds: STEP_TIMEOUT_DEFAULT,
                stdin: "",
            },
        },
        user("config", CONFIG, STEP_TIMEOUT_DEFAULT, ""),
        user("git", GIT, STEP_TIMEOUT_DEFAULT, ""),
        user("git-credentials", GIT_CREDENTIALS, STEP_TIMEOUT_DEFAULT, ""),
        user("ssh", SSH, STEP_TIMEOUT_DEFAULT, KNOWN_HOSTS),
        user("post-init", POST_INIT, STEP_TIMEOUT_POST_INIT, ""),
        Step {
            name: "agent-ready",
            kind: StepKind::AgentReady,
        },
    ]
}

/// `init-<first 12 chars of the container id>-<step>-<idx>`.
pub fn command_id(container_id: &str, step: &str, idx: usize) -> String {
    let prefix = container_id.get(..12).unwrap_or(container_id);
    format!("init-{prefix}-{step}-{idx}")
}

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

/// CP-side bounds and the agent user.
#[derive(Debug, Clone)]
pub struct InitConfig {
    pub user: AgentUser,
    /// Added to a shell step's own timeout before the CP gives up on it.
    pub step_grace: Duration,
    /// Bound on AgentReady (which has no clawkerd-side timeout).
    pub agent_ready_timeout: Duration,
}

impl Default for InitConfig {
    fn default() -> Self {
        Self {
            user: AgentUser::default(),
            step_grace: Duration::from_secs(10),
            agent_ready_timeout: Duration::from_secs(30),
        }
    }
}

/// A failed step, as the events describe it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepFailure {
    pub reason: InitFailureReason,
    pub detail: String,
    pub exit_code: i32,
}

impl StepFailure {
    fn transport(detail: impl Into<String>) -> Self {
        Self {
            reason: InitFailureReason::TransportError,
            detail: detail.into(),
            exit_code: -1,
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
            let shell = run::shell(script, &who, *timeout_seconds, stdin.as_bytes());
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
                })
            }
        }
        StepKind::AgentReady => agent_ready(mux, id, step, cfg.agent_ready_timeout).await,
    }
}

/// AgentReady has no clawkerd-side timeout: the CP bounds it.
async fn agent_ready(
    mux: &SessionMux,
    id: &str,
    step: &Step,
    bound: Duration,
) -> Result<(), StepFailure> {
    let mut replies = mux
        .call(cmd(id, command::Payload::AgentReady(pb::AgentReady {})))
        .await
        .map_err(|e| match e {
            MuxError::Closed => {
                StepFailure::transport(format!("send {}: session closed", step.name))
            }
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
                });
            }
            Some(response::Payload::Error(e)) => {
                return Err(RunError::Remote {
                    code: e.code(),
                    message: crate::peer_text::bound(e.message),
                }
                .into());
            }
            _ => {}
        }
    }
}

/// The outcome of a whole plan run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InitOutcome {
    Completed,
    Failed { step: String, failure: StepFailure },
}

/// Runs the plan, publishing the §12.6 event sequence. A panic inside a
/// step is contained and reported as reason `unknown`.
pub async fn run<P: Publish>(
    mux: &SessionMux,
    target: &AgentRef,
    sink: &P,
    cfg: InitConfig,
) -> InitOutcome {
    let steps = plan();
    let count = steps.len() as u32;
    let started = Instant::now();
    let t = target.clone();
    sink.publish(events::InitStarted {
        agent: t.clone(),
        step_count: count,
        at: events::now(),
    });
    tracing::info!(event = "agent_init_started", container_id = %t.container_id, "init started");
    for (i, step) in steps.iter().enumerate() {
        let step_started = Instant::now();
        sink.publish(events::InitStepStarted {
            agent: t.clone(),
            step: step.name.into(),
            step_index: i as u32,
            step_count: count,
            at: events::now(),
        });
        let id = command_id(&t.container_id, step.name, i);
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
                    })
                })
        };
        let duration = step_started.elapsed();
        match result {
            Ok(()) => {
                sink.publish(events::InitStepCompleted {
                    agent: t.clone(),
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
                    step: step.name.into(),
                    step_index: i as u32,
                    duration,
                    exit_code: f.exit_code,
                    reason: f.reason,
                    detail: f.detail.clone(),
                    at: events::now(),
                });
                sink.publish(events::InitFailed {
                    agent: t.clone(),
                    failed_step: step.name.into(),
                    reason: f.reason,
                    detail: f.detail.clone(),
                    duration: started.elapsed(),
                    at: events::now(),
                });
                tracing::error!(
                    event = "agent_init_failed",
                    container_id = %t.container_id,
                    step = step.name,
                    reason = f.reason.as_str(),
                    detail = %f.detail,
                    "init failed"
                );
                return InitOutcome::Failed {
                    step: step.name.into(),
                    failure: f,
                };
            }
        }
    }
    sink.publish(events::InitCompleted {
        agent: t.clone(),
        duration: started.elapsed(),
        at: events::now(),
    });
    InitOutcome::Completed
}

#[cfg(test)]
mod tests {
    use super::super::mux::testing::*;
    use super::*;
    use crate::events::RecordingSink;

    #[test]
    fn plan_shape_matches_the_reference() {
        let p = plan();
        let names: Vec<&str> = p.iter().map(|s| s.name).collect();
        assert_eq!(
            names,
            [
                "docker-socket",
                "config",
                "git",
                "git-credentials",
                "ssh",
                "post-init",
                "agent-ready"
            ]
        );
        let roots: Vec<&str> = p
            .iter()
            .filter(|s| matches!(s.kind, StepKind::Shell { root: true, .. }))
            .map(|s| s.name)
            .collect();
        assert_eq!(roots, ["docker-socket"]);
        assert!(matches!(p[6].kind, StepKind::AgentReady));
        assert!(matches!(
            p[5].kind,
            StepKind::Shell {
                timeout_seconds: 600,
                ..
            }
        ));
        assert_eq!(KNOWN_HOSTS.lines().count(), 9);
        assert!(KNOWN_HOSTS.ends_with('\n'));
        assert_eq!(
            command_id("c-happy-1234567890ab", "docker-socket", 0),
            "init-c-happy-1234-docker-socket-0"
        );
        assert_eq!(command_id("abc", "git", 2), "init-abc-git-2");
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
        let out = run(&mux, &target(), &sink, InitConfig::default()).await;
        assert_eq!(out, InitOutcome::Completed);
        let names = sink.names();
        assert_eq!(names.first(), Some(&"agent.init.started"));
        assert_eq!(names.last(), Some(&"agent.init.completed"));
        assert_eq!(
            names
                .iter()
                .filter(|n| **n == "agent.init.step.completed")
                .count(),
            7
        );
        assert_eq!(names.len(), 16);
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
        let out = run(&mux, &target(), &sink, InitConfig::default()).await;
        let InitOutcome::Failed { step, failure } = out else {
            panic!("expected failure")
        };
        assert_eq!(step, "git");
        assert_eq!(failure.reason, InitFailureReason::ExitCode);
        assert_eq!(failure.detail, "exit_code=7; stderr: boom");
        assert_eq!(failure.exit_code, 7);
        let failed = sink.of("agent.init.failed");
        assert_eq!(failed.len(), 1);
        assert_eq!(failed[0]["failed_step"], "git");
        assert_eq!(failed[0]["reason"], "exit_code");
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
            run(&mux, &target(), &sink, InitConfig::default()).await
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
        let InitOutcome::Failed { failure, step } =
            run(&mux, &target(), &sink, InitConfig::default()).await
        else {
            panic!()
        };
        assert_eq!(step, "docker-socket");
        assert_eq!(failure.reason, InitFailureReason::TransportError);
    }
}
