//! The user command (the container's CMD): spawned once on `AgentReady`,
//! with its own process group, the terminal's foreground when there is one,
//! and a privilege drop to the resolved user (reference §7).
//!
//! Single shot: the first `run` spawns; every later or concurrent call
//! waits for that attempt and reports "already spawned" (→ `Done{0}`), or
//! the same error if the first attempt failed (never a false `Done{0}`).
//! The main loop watches [`MainState`] to forward signals and to exit with
//! the child's code.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;

use tokio::sync::{Mutex, watch};

use super::logs::OutputLog;
use super::pipeline::{ProgramNotFound, resolve_program};
use super::reaper::{ExitStatus, Reaper};
use super::users::ResolvedUser;

/// Lifecycle of the user command, as the main loop sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MainState {
    NotSpawned,
    Running { pid: i32 },
    Exited { pid: i32, status: ExitStatus },
    Failed(SpawnError),
}

/// Why the user command could not be started (`AgentReady` answers
/// `IO_ERROR` with it and clawkerd exits 1). Clone: the first attempt's
/// outcome is replayed to every later `AgentReady`, so OS errors are kept
/// as their text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpawnError {
    #[error("clawkerd: empty argv; container CMD is required")]
    EmptyArgv,
    /// The argv was routed to `claude` (reference §7.3) and there is none.
    #[error("clawkerd: lookup \"claude\": {0}")]
    NoClaude(ProgramNotFound),
    #[error("clawkerd: spawn {program:?}: {detail}")]
    Spawn { program: String, detail: String },
}

/// What a successful `AgentReady` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadyOutcome {
    Spawned,
    AlreadySpawned,
}

/// The user command and its single-shot spawn state.
pub struct UserCommand {
    argv: Vec<String>,
    user: Option<ResolvedUser>,
    ready_file: PathBuf,
    reaper: Reaper,
    path_var: String,
    attempt: Mutex<Option<Result<(), SpawnError>>>,
    state: watch::Sender<MainState>,
    /// Where the command's output is teed for `Logs` (see [`super::logs`]).
    output: Arc<OutputLog>,
}

impl UserCommand {
    pub fn new(
        argv: Vec<String>,
        user: Option<ResolvedUser>,
        ready_file: PathBuf,
        reaper: Reaper,
        output: Arc<OutputLog>,
    ) -> Arc<Self> {
        let (state, _) = watch::channel(MainState::NotSpawned);
        Arc::new(Self {
            argv,
            user,
            ready_file,
            reaper,
            path_var: std::env::var("PATH").unwrap_or_default(),
            attempt: Mutex::new(None),
            state,
            output,
        })
    }

    /// The captured output of the command.
    pub fn output(&self) -> &Arc<OutputLog> {
        &self.output
    }

    pub fn watch(&self) -> watch::Receiver<MainState> {
        self.state.subscribe()
    }

    /// Whether this process has started the user command (`HelloAck`'s
    /// `cmd_running`): true from the spawn on, also after the command
    /// exited (clawkerd exits right after it anyway).
    pub fn spawned(&self) -> bool {
        matches!(
            *self.state.borrow(),
            MainState::Running { .. } | MainState::Exited { .. }
        )
    }

    /// `AgentReady`: spawn once (see module doc).
    pub async fn run(&self) -> Result<ReadyOutcome, SpawnError> {
        let mut attempt = self.attempt.lock().await;
        if let Some(prev) = attempt.as_ref() {
            return prev.clone().map(|()| ReadyOutcome::AlreadySpawned);
        }
        let result = self.spawn_once();
        *attempt = Some(result.clone());
        result.map(|()| ReadyOutcome::Spawned)
    }

    /// Tells the main loop the spawn failed, so clawkerd exits 1. Called by
    /// the session *after* it enqueued the `Error{IO_ERROR}` answer, so the
    /// answer is not lost in the teardown race the reference has.
    pub fn publish_failure(&self, error: SpawnError) {
        self.state.send_replace(MainState::Failed(error));
    }

    fn spawn_once(&self) -> Result<(), SpawnError> {
        if self.argv.is_empty() {
            return Err(SpawnError::EmptyArgv);
        }
        let (argv, program) = route_argv(&self.argv, &self.path_var)?;
        let interactive = stdin_is_tty();
        let mut cmd = Command::new(&program);
        cmd.arg0(&argv[0]).args(&argv[1..]).process_group(0);
        // Off a terminal, tee the output (docker logs + the Logs ring); on
        // one, the command keeps the terminal and nothing is captured.
        let tee = if interactive {
            None
        } else {
            let spawn_err = |e: std::io::Error| SpawnError::Spawn {
                program: program.clone(),
                detail: format!("output pipe: {e}"),
            };
            let (out_r, out_w) = std::io::pipe().map_err(spawn_err)?;
            let (err_r, err_w) = std::io::pipe().map_err(spawn_err)?;
            cmd.stdout(out_w).stderr(err_w);
            Some((out_r, err_r))
        };
        if let Some(u) = &self.user {
            for (k, v) in user_env(u) {
                cmd.env(k, v);
            }
        }
        let user = self.user.clone();
        let groups: Vec<libc::gid_t> = user.as_ref().map(|u| u.groups.clone()).unwrap_or_default();
        // SAFETY: the closure runs in the forked child before exec and only
        // makes async-signal-safe libc calls on pre-built data.
        unsafe {
            cmd.pre_exec(move || {
                if interactive {
                    // Our group (already set by process_group) becomes the
                    // terminal's foreground group. SIGTTOU is ignored by
                    // clawkerd since boot, so this cannot stop us.
                    libc::tcsetpgrp(0, libc::getpid());
                }
                if let Some(u) = &user
                    && (libc::setgroups(groups.len(), groups.as_ptr()) != 0
                        || libc::setgid(u.gid) != 0
                        || libc::setuid(u.uid) != 0)
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let (pid, exit) = self.reaper.spawn(&mut cmd).map_err(|e| SpawnError::Spawn {
            program: program.clone(),
            detail: e.to_string(),
        })?;
        // Our copies of the write ends go, so the tee sees EOF once the
        // command and everything it started are gone.
        drop(cmd);
        if let Some((out_r, err_r)) = tee {
            self.output.tee(out_r.into(), err_r.into());
        }
        tracing::info!(
            event = "spawn_started",
            pid,
            pgid = pid,
            argv = ?argv,
            uid = self.user.as_ref().map(|u| u.uid),
            gid = self.user.as_ref().map(|u| u.gid),
            "user command started"
        );
        self.state.send_replace(MainState::Running { pid });
        touch_ready(&self.ready_file);
        let state = self.state.clone();
        tokio::spawn(async move {
            // The sender lives in the reaper table until the child is
            // reaped; a dropped sender would mean the table was torn down.
            let status = exit.await.unwrap_or(ExitStatus(1 << 8));
            tracing::info!(
                event = "spawn_main_reaped",
                pid,
                signaled = status.signal().is_some(),
                exit_status = status.shell_code()
            );
            state.send_replace(MainState::Exited { pid, status });
        });
        Ok(())
    }
}

/// Reference §7.3 step 2–3: an argv that starts with `-` or names no
/// executable is routed to `claude` (`docker run img --help` → `claude
/// --help`).
fn route_argv(argv: &[String], path_var: &str) -> Result<(Vec<String>, String), SpawnError> {
    let first = &argv[0];
    if !first.starts_with('-')
        && let Ok(p) = resolve_program(first, path_var)
        && (first.contains('/') || std::path::Path::new(&p).exists())
    {
        return Ok((argv.to_vec(), p));
    }
    let mut routed = vec!["claude".to_owned()];
    routed.extend(argv.iter().cloned());
    if !first.starts_with('-') {
        tracing::warn!(event = "spawn_argv_routed_to_claude", orig_argv0 = %first, routed_argv = ?routed);
    }
    let p = resolve_program("claude", path_var).map_err(SpawnError::NoClaude)?;
    Ok((routed, p))
}

/// HOME/USER/LOGNAME for the dropped-privilege child.
fn user_env(u: &ResolvedUser) -> Vec<(&'static str, String)> {
    let mut env = Vec::new();
    if !u.home.is_empty() {
        env.push(("HOME", u.home.clone()));
    }
    if !u.name.is_empty() {
        env.push(("USER", u.name.clone()));
        env.push(("LOGNAME", u.name.clone()));
    }
    env
}

fn stdin_is_tty() -> bool {
    let mut pgrp: libc::pid_t = 0;
    // SAFETY: TIOCGPGRP writes one pid_t into `pgrp`.
    unsafe { libc::ioctl(0, libc::TIOCGPGRP, &mut pgrp) == 0 }
}

fn touch_ready(path: &std::path::Path) {
    use std::os::unix::fs::OpenOptionsExt;
    // The marker's directory may be on a fresh tmpfs (`/run` in a
    // read-only agent container).
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let r = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o644)
        .open(path);
    if let Err(e) = r {
        tracing::error!(event = "spawn_ready_file_touch_failed", path = %path.display(), error = %e);
    }
}

/// Sends `sig` to the user command's process group (signal forwarding).
pub fn forward(reaper: &Reaper, pid: i32, sig: i32) {
    match reaper.signal_group(pid, sig) {
        super::reaper::Signalled::Failed(errno) => {
            tracing::warn!(
                event = "spawn_signal_forward_failed",
                pgid = pid,
                signo = sig,
                errno
            )
        }
        _ => tracing::debug!(event = "spawn_signal_forwarded", pgid = pid, signo = sig),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argv_routing() {
        let path = "/usr/bin:/bin";
        let (a, _) = route_argv(&["sh".into(), "-c".into()], path).unwrap();
        assert_eq!(a, vec!["sh", "-c"]);
        // No `claude` on this PATH: routing fails with the lookup error.
        let e = route_argv(&["--help".into()], path).unwrap_err();
        assert_eq!(
            e.to_string(),
            "clawkerd: lookup \"claude\": exec: \"claude\": executable file not found in $PATH"
        );
    }

    #[test]
    fn user_env_overrides() {
        let u = ResolvedUser {
            name: "claude".into(),
            uid: 1000,
            gid: 1000,
            groups: vec![],
            home: "/home/claude".into(),
        };
        let env = user_env(&u);
        assert!(env.contains(&("HOME", "/home/claude".into())));
        assert!(env.contains(&("LOGNAME", "claude".into())));
    }
}
