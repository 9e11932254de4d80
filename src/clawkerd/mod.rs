//! clawkerd: PID 1 of every agent container (reference `clawkerd.md`).
//!
//! Two jobs: serve the CP's `Session` stream on :7700 (mTLS, CP-only), and
//! be init for the user's command (spawn on `AgentReady`, forward signals,
//! reap everything, exit with the child's code).
//!
//! Map, in the order a request flows:
//! - [`config`]: environment, bootstrap files, exit codes.
//! - [`users`]: `CLAWKER_USER` → uid/gid/groups from /etc/passwd, /etc/group.
//! - [`listener`]: TLS 1.3 accept loop and the CP-only client verifier.
//! - [`session`]: one `Session` stream — receive loop, dispatch, teardown.
//! - [`control`]: what the session keeps per running command (stdin,
//!   signals, resize, flow credit routed without blocking).
//! - [`flow`]: per-command flow control (`FlowGrant`/`StdinConsumed`).
//! - [`pipeline`]: one `ShellCommand` — stages, pipes, stdin, output,
//!   timeout, the single terminal response.
//! - [`pty`]: one `PtyCommand` — a program under a pseudo-terminal.
//! - [`logs`]: the user command's output teed into a bounded ring; `Logs`.
//! - [`copy`]: `CopyFrom`/`CopyTo`, tar streams out of and into the
//!   container.
//! - [`spawn`]: the user command (`AgentReady`), privilege drop.
//! - [`reaper`]: the only code that waits for children.
//! - [`register`]: the Register coordinator (token + AgentService).
//! - [`lifecycle`]: the one-time init marker and the exit request of a
//!   failed init or boot step.
//! - [`leaf`]: the current leaf (served, presented, persisted, swapped).
//! - [`renew`]: leaf renewal at half-life and on the CP's request.
//!
//! This file is the boot sequence and the main wait loop (reference §3, §8).

pub mod config;
pub mod control;
pub mod copy;
pub mod flow;
pub mod leaf;
pub mod lifecycle;
pub mod listener;
pub mod logs;
pub mod pipeline;
pub mod pty;
pub mod reaper;
pub mod register;
pub mod renew;
pub mod session;
pub mod spawn;
pub mod users;

use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

use config::{BootError, Bootstrap, Config};
use spawn::MainState;

/// SIGTERM → SIGKILL grace for the user command on shutdown.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// How long we wait for orphans before exiting.
const ORPHAN_DRAIN: Duration = Duration::from_secs(5);
/// How long the output tee may take to pass the user command's last
/// output on after it exited (a background process may hold the pipe).
const OUTPUT_TAIL_GRACE: Duration = Duration::from_secs(1);

/// Signals forwarded to the user command's process group once it runs.
/// Not SIGPIPE (unlike the reference): clawkerd itself gets SIGPIPE whenever
/// a stage closes its stdin early, and that must not reach the user command.
/// SIGCHLD is the reaper's; program-error signals and SIGKILL/SIGSTOP are
/// never forwarded. Before the user command runs, all of these are ignored
/// except SIGTERM/SIGINT, which end clawkerd (exit 1).
const FORWARDED: [i32; 10] = [
    libc::SIGHUP,
    libc::SIGINT,
    libc::SIGQUIT,
    libc::SIGTERM,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGALRM,
    libc::SIGTSTP,
    libc::SIGCONT,
    libc::SIGWINCH,
];

/// Process entry: sets up signals and logging, runs, returns the exit code.
pub fn main() -> i32 {
    // SAFETY: setting dispositions to SIG_IGN before any thread exists.
    // Once the user command owns the terminal's foreground, terminal I/O
    // by PID 1 would otherwise stop it (reference §3 step 1).
    unsafe {
        libc::signal(libc::SIGTTIN, libc::SIG_IGN);
        libc::signal(libc::SIGTTOU, libc::SIG_IGN);
    }
    // Output chunks are ~128 KiB; glibc would serve each from a fresh mmap
    // (page faults + munmap per chunk). Keep them on the heap instead.
    // SAFETY: mallopt only adjusts allocator tunables; no threads yet.
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 8 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 32 << 20);
    }
    if let Err(e) = init_logging() {
        eprintln!("clawkerd: logger init failed: {e}");
        return 1;
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(event = "shutdown", error = %e, "clawkerd exiting with error");
            return 1;
        }
    };
    let code = rt.block_on(run(std::env::args().skip(1).collect()));
    // Do not wait for stray blocking tasks; the process is ending.
    rt.shutdown_timeout(Duration::from_millis(100));
    code
}

fn init_logging() -> std::io::Result<()> {
    use tracing_subscriber::EnvFilter;
    let dest = std::env::var(config::env::LOG_FILE)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| config::DEFAULT_LOG_FILE.to_owned());
    let filter =
        EnvFilter::try_from_env("CLAWKER_LOG_LEVEL").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_span_list(false)
        .with_env_filter(filter);
    let result = if dest == "-" {
        builder.with_writer(std::io::stderr).try_init()
    } else {
        let path = std::path::Path::new(&dest);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        builder.with_writer(std::sync::Mutex::new(file)).try_init()
    };
    result.map_err(|e| std::io::Error::other(e.to_string()))
}

/// Non-TTY progress line (reference §10, banner and final line only).
fn progress(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout(), "[info] {line}");
}

async fn run(args: Vec<String>) -> i32 {
    match boot_and_serve(args).await {
        Ok(code) => {
            tracing::info!(event = "shutdown", exit_code = code, "clawkerd exiting");
            code
        }
        Err(e) => {
            tracing::error!(event = "shutdown", error = %e, exit_code = e.exit_code(), "clawkerd exiting with error");
            e.exit_code()
        }
    }
}

async fn boot_and_serve(args: Vec<String>) -> Result<i32, BootError> {
    let cfg = Config::from_env(args)?;
    tracing::info!(
        event = "boot",
        agent = %cfg.agent,
        project = %cfg.project,
        bootstrap_dir = %cfg.bootstrap_dir.display(),
        pid = std::process::id(),
        "clawkerd starting"
    );
    progress("Starting Clawker agent...");
    let user = users::resolve(&cfg.user_spec, &cfg.passwd_file, &cfg.group_file).map_err(|e| {
        tracing::error!(event = "resolve_user_failed", user = %cfg.user_spec, error = %e);
        BootError::Config(format!("resolve user {:?}: {e}", cfg.user_spec))
    })?;
    let bootstrap = Bootstrap::read(&cfg.bootstrap_dir).map_err(|e| {
        tracing::error!(event = "bootstrap_read_failed", error = %e);
        BootError::Config(format!("read bootstrap: {e}"))
    })?;
    let listener_failed = |e: listener::ServerConfigError| {
        tracing::error!(event = "clawkerd_listener_start_failed", error = %e);
        BootError::Config(format!("start clawkerd listener: {e}"))
    };
    let (boot_leaf, source) =
        leaf::at_boot(&bootstrap, &cfg.state_dir).map_err(|e| listener_failed(e.into()))?;
    tracing::info!(
        event = "leaf_loaded",
        source = ?source,
        thumbprint = %boot_leaf.thumbprint(),
        not_after = boot_leaf.not_after,
        "agent leaf"
    );
    let current = leaf::CurrentLeaf::new(boot_leaf);
    let tls_cfg = listener::server_config(&bootstrap.ca_pem, &current).map_err(listener_failed)?;
    let renewer = renew::Renewer::new(current.clone(), &bootstrap.ca_pem, cfg.state_dir.clone())
        .map_err(|e| listener_failed(listener::ServerConfigError::Leaf(e.into())))?;
    let listener = listener::Listener::bind(cfg.listen_addr, tls_cfg)
        .await
        .map_err(|e| {
            tracing::error!(event = "clawkerd_listener_start_failed", error = %e);
            BootError::Transient(format!(
                "start clawkerd listener: bind {}: {e}",
                cfg.listen_addr
            ))
        })?;
    let local = listener
        .local_addr()
        .map_err(|e| BootError::Transient(format!("listener address: {e}")))?;
    let reaper =
        reaper::Reaper::start().map_err(|e| BootError::Transient(format!("reaper: {e}")))?;

    let coordinator = register::Coordinator::new(register::RegisterConfig {
        token_url: cfg.cp_token_url.clone(),
        agent_addr: cfg.cp_agent_addr.clone(),
        agent: cfg.agent.clone(),
        project: cfg.project.clone(),
        bootstrap,
        leaf: current.clone(),
    });
    let output = logs::OutputLog::new(logs::LOG_CAPACITY);
    let user_command = spawn::UserCommand::new(
        cfg.user_argv.clone(),
        Some(user),
        cfg.ready_file.clone(),
        reaper.clone(),
        output.clone(),
    );
    let shutdown = CancellationToken::new();
    let exit = lifecycle::ExitRequest::new();
    let shared = Arc::new(session::Shared::new(
        reaper.clone(),
        coordinator,
        user_command.clone(),
        shutdown.clone(),
        lifecycle::InitMarker::in_dir(&cfg.state_dir),
        exit.clone(),
    ));
    shared.set_renewer(renewer.clone());
    tokio::spawn(renewer.run(shutdown.clone()));

    // Signals first, so nothing arriving during startup is lost.
    let (sig_tx, mut sig_rx) = tokio::sync::mpsc::channel::<i32>(32);
    for signo in FORWARDED {
        let mut stream = signal(SignalKind::from_raw(signo))
            .map_err(|e| BootError::Transient(format!("signal {signo}: {e}")))?;
        let tx = sig_tx.clone();
        tokio::spawn(async move {
            while stream.recv().await.is_some() {
                if tx.send(signo).await.is_err() {
                    return;
                }
            }
        });
    }

    let svc = session::ClawkerdSvc::new(shared);
    let mut server = tokio::spawn(listener.serve(svc, shutdown.clone()));
    tracing::info!(event = "clawkerd_listener_started", addr = %local, "listening");
    tracing::info!(event = "daemon_idle");

    let mut main_state = user_command.watch();
    let mut exit_requests = exit.subscribe();
    // A failed `exit_on_non_zero` step: clawkerd ends with its code.
    let mut requested: Option<i32> = None;
    let mut kill_at: Option<tokio::time::Instant> = None;
    let mut server_done = false;
    let code = loop {
        let state = main_state.borrow_and_update().clone();
        match &state {
            MainState::Exited { status, .. } => {
                tracing::info!(event = "main_child_exited", exit_code = status.shell_code());
                break requested.unwrap_or(status.shell_code());
            }
            MainState::Failed(e) => {
                tracing::info!(event = "main_child_exited", error = %e);
                break 1;
            }
            _ => {}
        }
        let running = match state {
            MainState::Running { pid } => Some(pid),
            _ => None,
        };
        tokio::select! {
            Some(signo) = sig_rx.recv() => {
                let stop = signo == libc::SIGTERM || signo == libc::SIGINT;
                if stop {
                    tracing::info!(event = "shutdown_signal_received", signo);
                }
                match running {
                    // Exactly one signal per signal received (the reference
                    // sent SIGTERM twice on `docker stop`); the watchdog
                    // escalates to SIGKILL after the grace period.
                    Some(pid) => {
                        spawn::forward(&reaper, pid, signo);
                        if stop && kill_at.is_none() {
                            kill_at = Some(tokio::time::Instant::now() + SHUTDOWN_GRACE);
                        }
                    }
                    None if stop => {
                        tracing::info!(event = "shutdown_before_spawn");
                        break 1;
                    }
                    None => tracing::debug!(event = "spawn_signal_dropped_no_pgid", signo),
                }
            }
            _ = main_state.changed() => {}
            Ok(()) = exit_requests.changed(), if requested.is_none() => {
                let Some(code) = *exit_requests.borrow_and_update() else { continue };
                tracing::info!(event = "command_requested_exit", exit_code = code);
                requested = Some(code);
                match running {
                    // Not during init or boot (the command starts last),
                    // but if it runs: stop it first, then exit with `code`.
                    Some(pid) => {
                        spawn::forward(&reaper, pid, libc::SIGTERM);
                        kill_at.get_or_insert(tokio::time::Instant::now() + SHUTDOWN_GRACE);
                    }
                    None => break code,
                }
            }
            r = &mut server, if !server_done => {
                server_done = true;
                let err = match r {
                    Ok(Ok(())) => "server stopped".to_owned(),
                    Ok(Err(e)) => e.to_string(),
                    Err(e) => format!("listener task: {e}"),
                };
                tracing::error!(event = "listener_fatal_received", error = %err);
                match running {
                    Some(pid) => {
                        spawn::forward(&reaper, pid, libc::SIGTERM);
                        kill_at.get_or_insert(tokio::time::Instant::now() + SHUTDOWN_GRACE);
                    }
                    None => break 1,
                }
            }
            _ = async { if let Some(t) = kill_at { tokio::time::sleep_until(t).await } else { std::future::pending::<()>().await } } => {
                if let Some(pid) = running {
                    tracing::warn!(event = "spawn_stop_sigkill", pgid = pid);
                    spawn::forward(&reaper, pid, libc::SIGKILL);
                }
                kill_at = None;
            }
        }
    };

    // The user command's last words reach `docker logs` (and followers).
    output.wait_closed(OUTPUT_TAIL_GRACE).await;
    // Teardown (reference §8.2): stop serving and end every session (which
    // kills and reaps its commands), then drain orphans, then exit.
    tracing::info!(event = "clawkerd_listener_stopping");
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(2), &mut server).await;
    server.abort();
    tracing::info!(event = "clawkerd_listener_stopped");
    if !reaper.drain(ORPHAN_DRAIN).await {
        tracing::warn!(event = "spawn_orphan_drain_incomplete");
    }
    Ok(code)
}
