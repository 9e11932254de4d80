//! What runs in an agent container on a session, decided from clawkerd's
//! `HelloAck` (reference `head-lifecycle.md` §1.3–1.4, §2).
//!
//! Two plans:
//! - **init**, once per container: the idempotent setup steps, the user's
//!   `post_init` hook, then `AgentInitialized` (clawkerd writes its init
//!   marker);
//! - **boot**, on every start: `docker-socket`, the user's `pre_run` hook,
//!   then `AgentReady` (clawkerd starts the user command).
//!
//! The decision table: a reconnect to a running command (CP restart,
//! network blip) runs nothing; a container restart (marker present,
//! command not started) runs boot; a fresh container runs init then boot,
//! in one start sequence. An empty `HelloAck` (a v0.8.0 clawkerd) reads as
//! "neither": the whole sequence runs, as it always did there.
//!
//! Hooks come from the CP's configuration and travel over the session as
//! the step's own script (`sh -c`, `set -e` first): no file has to be put
//! into the container, a changed hook applies at the next start of every
//! agent, and `agent run` needs no access to the CP's configuration. An
//! unconfigured hook falls back to the image's own
//! `$HOME/.clawker/{post-init,pre-run}.sh` when it exists.

use serde::Deserialize;

use crate::events::Plan;
use crate::proto::clawkerd::v1::HelloAck;

pub const STEP_TIMEOUT_DEFAULT: u32 = 30;
/// Hooks get ten minutes, like the reference's.
pub const STEP_TIMEOUT_HOOK: u32 = 600;

/// The known-hosts blob fed to the ssh step (github, gitlab, bitbucket).
pub const KNOWN_HOSTS: &str = include_str!("known_hosts.txt");

/// The user's hooks (`[hooks]` in cp.toml). Each is a shell script run as
/// the agent user in the container.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Hooks {
    /// Once per container, at the end of init (before the init marker is
    /// written, so a failed hook runs again on the next start).
    pub post_init: Option<String>,
    /// On every start, right before the user command.
    pub pre_run: Option<String>,
}

/// Which plans a session runs, from the `HelloAck` alone (trust is decided
/// elsewhere).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub init: bool,
    pub boot: bool,
    /// The command runs although init never completed (a marker that could
    /// not be written, or was removed): nothing runs, and it is reported.
    pub init_bypassed: bool,
}

/// The decision table (reference §1.3): `cmd_running` is authoritative —
/// when it is set nothing runs; init runs iff neither flag is set; boot
/// runs iff the command does not run yet.
pub fn decide(ack: &HelloAck) -> Decision {
    Decision {
        init: !ack.initialized && !ack.cmd_running,
        boot: !ack.cmd_running,
        init_bypassed: ack.cmd_running && !ack.initialized,
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepKind {
    Shell {
        /// Runs as root; otherwise as the configured agent user.
        root: bool,
        script: String,
        timeout_seconds: u32,
        stdin: &'static str,
    },
    /// Write the init marker (the last init step).
    AgentInitialized,
    /// Start the user command (the last boot step).
    AgentReady,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub plan: Plan,
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

/// Without a configured `post_init`: the image's own script, once per home
/// directory (its marker lives in `$HOME`, which may outlive the container).
const IMAGE_POST_INIT: &str = r#"POST="$HOME/.clawker/post-init.sh"
DONE="$HOME/.claude/post-initialized"
[ -x "$POST" ] || exit 0
[ -e "$DONE" ] && exit 0
"$POST" || exit $?
mkdir -p "$HOME/.claude" && touch "$DONE""#;

/// Without a configured `pre_run`: the image's own script, if any.
const IMAGE_PRE_RUN: &str = r#"PRE="$HOME/.clawker/pre-run.sh"
[ -x "$PRE" ] || exit 0
exec "$PRE""#;

/// A configured hook as a step script: `set -e`, so a failing line fails
/// the hook (the reference writes its hook files the same way).
pub fn hook_script(hook: &str) -> String {
    format!("set -e\n{}", hook.trim())
}

fn shell(
    plan: Plan,
    name: &'static str,
    root: bool,
    script: String,
    timeout_seconds: u32,
    stdin: &'static str,
) -> Step {
    Step {
        plan,
        name,
        kind: StepKind::Shell {
            root,
            script,
            timeout_seconds,
            stdin,
        },
    }
}

fn configured(hook: &Option<String>) -> Option<&str> {
    hook.as_deref().filter(|h| !h.trim().is_empty())
}

/// The init plan: order is load-bearing (`docker-socket` first so a
/// post-init hook sees the socket; `agent-initialized` last, so the marker
/// exists only when everything before it succeeded).
pub fn init_plan(hooks: &Hooks) -> Vec<Step> {
    let user = |name, script: &str, timeout| {
        shell(Plan::Init, name, false, script.to_owned(), timeout, "")
    };
    let post_init = match configured(&hooks.post_init) {
        Some(h) => hook_script(h),
        None => IMAGE_POST_INIT.to_owned(),
    };
    vec![
        shell(
            Plan::Init,
            "docker-socket",
            true,
            DOCKER_SOCKET.to_owned(),
            STEP_TIMEOUT_DEFAULT,
            "",
        ),
        user("config", CONFIG, STEP_TIMEOUT_DEFAULT),
        user("git", GIT, STEP_TIMEOUT_DEFAULT),
        user("git-credentials", GIT_CREDENTIALS, STEP_TIMEOUT_DEFAULT),
        shell(
            Plan::Init,
            "ssh",
            false,
            SSH.to_owned(),
            STEP_TIMEOUT_DEFAULT,
            KNOWN_HOSTS,
        ),
        shell(
            Plan::Init,
            "post-init",
            false,
            post_init,
            STEP_TIMEOUT_HOOK,
            "",
        ),
        Step {
            plan: Plan::Init,
            name: "agent-initialized",
            kind: StepKind::AgentInitialized,
        },
    ]
}

/// The boot plan. `after_init`: init ran just before on the same session,
/// so its `docker-socket` step is not repeated (the reference runs it
/// twice on a fresh container).
pub fn boot_plan(hooks: &Hooks, after_init: bool) -> Vec<Step> {
    let pre_run = match configured(&hooks.pre_run) {
        Some(h) => hook_script(h),
        None => IMAGE_PRE_RUN.to_owned(),
    };
    let mut steps = Vec::with_capacity(3);
    if !after_init {
        steps.push(shell(
            Plan::Boot,
            "docker-socket",
            true,
            DOCKER_SOCKET.to_owned(),
            STEP_TIMEOUT_DEFAULT,
            "",
        ));
    }
    steps.push(shell(
        Plan::Boot,
        "pre-run",
        false,
        pre_run,
        STEP_TIMEOUT_HOOK,
        "",
    ));
    steps.push(Step {
        plan: Plan::Boot,
        name: "agent-ready",
        kind: StepKind::AgentReady,
    });
    steps
}

/// The steps of one session's start sequence.
pub fn compose(decision: Decision, hooks: &Hooks) -> Vec<Step> {
    let mut steps = Vec::new();
    if decision.init {
        steps.extend(init_plan(hooks));
    }
    if decision.boot {
        steps.extend(boot_plan(hooks, decision.init));
    }
    steps
}

/// The distinct plans of a step list, in order.
pub fn plans_of(steps: &[Step]) -> Vec<Plan> {
    let mut plans: Vec<Plan> = Vec::new();
    for s in steps {
        if plans.last() != Some(&s.plan) {
            plans.push(s.plan);
        }
    }
    plans
}

/// `<plan>-<first 12 chars of the container id>-<step>-<idx>` (reference
/// §1.4), `idx` counting within the plan.
pub fn command_id(plan: Plan, container_id: &str, step: &str, idx: usize) -> String {
    let prefix = container_id.get(..12).unwrap_or(container_id);
    format!("{}-{prefix}-{step}-{idx}", plan.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ack(initialized: bool, cmd_running: bool) -> HelloAck {
        HelloAck {
            initialized,
            cmd_running,
        }
    }

    fn names(steps: &[Step]) -> Vec<String> {
        steps
            .iter()
            .map(|s| format!("{}:{}", s.plan.as_str(), s.name))
            .collect()
    }

    #[test]
    fn decision_table_follows_the_hello_ack_flags() {
        // (initialized, cmd_running) → (init, boot, bypassed)
        for ((i, c), want) in [
            ((false, false), (true, true, false)), // fresh
            ((true, false), (false, true, false)), // container restart
            ((true, true), (false, false, false)), // reconnect (CP restart, blip)
            ((false, true), (false, false, true)), // command without init
        ] {
            let d = decide(&ack(i, c));
            assert_eq!((d.init, d.boot, d.init_bypassed), want, "({i}, {c})");
        }
    }

    #[test]
    fn an_empty_hello_ack_from_a_v0_8_0_clawkerd_reads_as_fresh() {
        use prost::Message;
        // v0.8.0's HelloAck has no fields: zero bytes on the wire.
        let old = HelloAck::decode(&[][..]).unwrap();
        let d = decide(&old);
        assert!(d.init && d.boot && !d.init_bypassed);
    }

    #[test]
    fn fresh_runs_init_then_boot_without_a_second_docker_socket() {
        let steps = compose(decide(&ack(false, false)), &Hooks::default());
        assert_eq!(
            names(&steps),
            [
                "init:docker-socket",
                "init:config",
                "init:git",
                "init:git-credentials",
                "init:ssh",
                "init:post-init",
                "init:agent-initialized",
                "boot:pre-run",
                "boot:agent-ready",
            ]
        );
        assert_eq!(plans_of(&steps), [Plan::Init, Plan::Boot]);
        let roots: Vec<&str> = steps
            .iter()
            .filter(|s| matches!(s.kind, StepKind::Shell { root: true, .. }))
            .map(|s| s.name)
            .collect();
        assert_eq!(roots, ["docker-socket"]);
        assert!(matches!(
            steps[5].kind,
            StepKind::Shell {
                timeout_seconds: 600,
                ..
            }
        ));
        assert!(matches!(steps[6].kind, StepKind::AgentInitialized));
        assert!(matches!(steps[8].kind, StepKind::AgentReady));
        assert_eq!(KNOWN_HOSTS.lines().count(), 9);
        assert!(KNOWN_HOSTS.ends_with('\n'));
    }

    #[test]
    fn restart_runs_boot_only_and_a_reconnect_runs_nothing() {
        let steps = compose(decide(&ack(true, false)), &Hooks::default());
        assert_eq!(
            names(&steps),
            ["boot:docker-socket", "boot:pre-run", "boot:agent-ready"]
        );
        assert_eq!(plans_of(&steps), [Plan::Boot]);
        assert!(compose(decide(&ack(true, true)), &Hooks::default()).is_empty());
        assert!(compose(decide(&ack(false, true)), &Hooks::default()).is_empty());
    }

    #[test]
    fn hooks_become_the_post_init_and_pre_run_scripts() {
        let hooks = Hooks {
            post_init: Some("  echo once > /tmp/p\n".into()),
            pre_run: Some("exit 3".into()),
        };
        let script =
            |steps: &[Step], name: &str| match &steps.iter().find(|s| s.name == name).unwrap().kind
            {
                StepKind::Shell { script, root, .. } => {
                    assert!(!root, "hooks run as the agent user");
                    script.clone()
                }
                k => panic!("{k:?}"),
            };
        let fresh = compose(decide(&ack(false, false)), &hooks);
        assert_eq!(script(&fresh, "post-init"), "set -e\necho once > /tmp/p");
        assert_eq!(script(&fresh, "pre-run"), "set -e\nexit 3");
        let restart = compose(decide(&ack(true, false)), &hooks);
        assert!(
            restart.iter().all(|s| s.name != "post-init"),
            "post_init runs once"
        );
        assert_eq!(script(&restart, "pre-run"), "set -e\nexit 3");
        // Unset or blank hooks fall back to the image's scripts.
        let blank = Hooks {
            post_init: Some("  \n".into()),
            pre_run: None,
        };
        let fresh = compose(decide(&ack(false, false)), &blank);
        assert!(script(&fresh, "post-init").contains("$HOME/.clawker/post-init.sh"));
        assert!(script(&fresh, "pre-run").contains("$HOME/.clawker/pre-run.sh"));
    }

    #[test]
    fn command_ids_name_the_plan() {
        assert_eq!(
            command_id(Plan::Init, "c-happy-1234567890ab", "docker-socket", 0),
            "init-c-happy-1234-docker-socket-0"
        );
        assert_eq!(
            command_id(Plan::Boot, "abc", "pre-run", 1),
            "boot-abc-pre-run-1"
        );
    }

    #[test]
    fn hooks_parse_from_toml_and_refuse_unknown_keys() {
        let h: Hooks = toml::from_str("post_init = \"a\"\npre_run = \"b\"").unwrap();
        assert_eq!(h.post_init.as_deref(), Some("a"));
        assert!(toml::from_str::<Hooks>("pre_runn = \"b\"").is_err());
    }
}
