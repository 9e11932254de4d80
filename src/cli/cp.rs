//! `clawker cp serve` and `clawker agent run|stop|rm|release|unlock`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};
use futures::StreamExt;

use crate::cp::{self, config};
use crate::identity::{AgentName, ProjectSlug};

#[derive(Debug, Subcommand)]
pub enum CpCommand {
    /// Run the control plane until SIGTERM/SIGINT.
    Serve(ServeArgs),
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// TOML config file (default: <state>/cp.toml if present).
    #[arg(long, env = "CLAWKER_CONFIG")]
    pub config: Option<PathBuf>,
    #[arg(long, env = "CLAWKER_NETWORK")]
    pub network: Option<String>,
    /// Subnet used when the network has to be created.
    #[arg(long, env = "CLAWKER_SUBNET")]
    pub subnet: Option<String>,
    /// The internal network `isolate` moves agents onto.
    #[arg(long, env = "CLAWKER_QUARANTINE_NETWORK")]
    pub quarantine_network: Option<String>,
    /// Its subnet when it has to be created.
    #[arg(long, env = "CLAWKER_QUARANTINE_SUBNET")]
    pub quarantine_subnet: Option<String>,
    /// AgentService + token endpoint port (on the network's gateway).
    #[arg(long, env = "CLAWKER_AGENT_PORT")]
    pub agent_port: Option<u16>,
    #[arg(long, env = "CLAWKER_METRICS_ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,
    #[arg(long, env = "CLAWKER_CLAWKERD_PORT")]
    pub clawkerd_port: Option<u16>,
    /// Run init (and so release the user command) for untrusted agents too.
    #[arg(long, env = "CLAWKER_INIT_UNTRUSTED")]
    pub init_untrusted: Option<bool>,
    /// `pretty` (default on a TTY) or `json`.
    #[arg(long, env = "CLAWKER_LOG_FORMAT")]
    pub log_format: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum AgentCommand {
    /// Create and start an agent container; show its init progress.
    Run(Box<RunArgs>),
    /// Stop an agent container (its identity row is kept).
    Stop(NameArgs),
    /// Remove an agent container (its identity row is evicted by the CP).
    Rm(NameArgs),
    /// Run a command in an agent over its session (like `docker exec`).
    Exec(super::operator::ExecArgs),
    /// An interactive shell in an agent (`exec -it NAME -- /bin/sh`).
    Shell(super::operator::ShellArgs),
    /// Copy files between the host and an agent (like `docker cp`).
    Cp(super::operator::CpArgs),
    /// The agent's user command output (like `docker logs`).
    Logs(super::operator::LogsArgs),
    /// Move a quarantined agent back to clawker-net (only an agent its
    /// current session trusts; nothing releases on its own).
    Release(NameArgs),
    /// Remove an agent's network-namespace lock (same rule as release).
    Unlock(NameArgs),
}

#[derive(Debug, Args)]
pub struct NameArgs {
    pub name: String,
    #[arg(long, default_value = "")]
    pub project: String,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    pub name: String,
    #[arg(long, default_value = "")]
    pub project: String,
    #[arg(long, default_value = crate::defaults::AGENT_IMAGE)]
    pub image: String,
    #[arg(long, default_value = crate::defaults::NETWORK)]
    pub network: String,
    #[arg(long, default_value_t = crate::defaults::AGENT_PORT)]
    pub agent_port: u16,
    /// TOML config whose `[agent]` section gives the defaults below
    /// (default: <state>/cp.toml if present).
    #[arg(long, env = "CLAWKER_CONFIG")]
    pub config: Option<PathBuf>,
    /// Keep this capability too (repeatable; all others are dropped except
    /// SETUID, SETGID and KILL, which clawkerd needs).
    #[arg(long = "cap-add", value_name = "CAP")]
    pub cap_add: Vec<String>,
    /// Drop this capability from the kept set (repeatable).
    #[arg(long = "cap-drop", value_name = "CAP")]
    pub cap_drop: Vec<String>,
    /// no-new-privileges (default true).
    #[arg(long, value_name = "BOOL")]
    pub no_new_privileges: Option<bool>,
    /// Max processes (default 1024; 0 = no limit).
    #[arg(long, value_name = "N")]
    pub pids_limit: Option<i64>,
    /// Memory limit, e.g. 512m, 4g (default 4g; 0 = no limit).
    #[arg(long, value_name = "SIZE")]
    pub memory: Option<String>,
    /// CPU limit in cores (default none).
    #[arg(long, value_name = "N")]
    pub cpus: Option<f64>,
    /// Read-only root filesystem (default true).
    #[arg(long, value_name = "BOOL")]
    pub read_only: Option<bool>,
    /// Size of the /tmp tmpfs (default 512m).
    #[arg(long, value_name = "SIZE")]
    pub tmp_size: Option<String>,
    /// Host directory bind-mounted read-write at /workspace (handed to the
    /// agent user, uid 1001).
    #[arg(long, value_name = "DIR")]
    pub workspace: Option<PathBuf>,
    /// Environment variable K=V for the agent (repeatable).
    #[arg(long = "env", short = 'e', value_name = "K=V")]
    pub env: Vec<String>,
    /// Do not wait for init; return once the container started.
    #[arg(long)]
    pub no_wait: bool,
    /// How long to wait for init.
    #[arg(long, default_value_t = 120)]
    pub timeout_secs: u64,
    /// Demos and tests only: mint the agent's certificate for this other
    /// container id, so the agent comes up untrusted (an impostor).
    #[arg(long, hide = true, value_name = "CONTAINER_ID")]
    pub leaf_for_container: Option<String>,
    /// The user command (after `--`); default: the image's CMD.
    #[arg(last = true)]
    pub command: Vec<String>,
}

pub fn serve(state_dir: &Path, admin_addr: &str, args: ServeArgs) -> anyhow::Result<()> {
    let (path, must_exist) = match &args.config {
        Some(p) => (p.clone(), true),
        None => (state_dir.join("cp.toml"), false),
    };
    let file = config::FileConfig::load(&path, must_exist).map_err(anyhow::Error::msg)?;
    init_logging(args.log_format.as_deref().or(file.log_format.as_deref()))?;
    let admin_addr = admin_addr
        .parse()
        .with_context(|| format!("--admin-addr {admin_addr:?}"))?;
    let overrides = config::Overrides {
        network: args.network,
        subnet: args.subnet,
        quarantine_network: args.quarantine_network,
        quarantine_subnet: args.quarantine_subnet,
        agent_port: args.agent_port,
        admin_addr: Some(admin_addr),
        metrics_addr: args.metrics_addr,
        clawkerd_port: args.clawkerd_port,
        init_untrusted: args.init_untrusted,
    };
    let cfg = config::resolve(state_dir.to_owned(), file, overrides).map_err(anyhow::Error::msg)?;
    cp::serve(cfg)
}

fn init_logging(format: Option<&str>) -> anyhow::Result<()> {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let json = match format {
        Some("json") => true,
        Some("pretty") => false,
        Some(other) => bail!("--log-format {other:?}: expected `pretty` or `json`"),
        None => !std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let res = if json {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
    res.map_err(|e| anyhow::anyhow!("logger: {e}"))
}

fn names(name: &str, project: &str) -> anyhow::Result<(AgentName, ProjectSlug)> {
    Ok((AgentName::new(name)?, ProjectSlug::new(project)?))
}

pub async fn agent(state_dir: &Path, admin_addr: &str, cmd: AgentCommand) -> anyhow::Result<()> {
    let docker = crate::docker::connect().await?;
    match cmd {
        AgentCommand::Stop(n) => {
            let (agent, project) = names(&n.name, &n.project)?;
            let id = cp::agent::find(&docker, &project, &agent).await?;
            cp::agent::stop(&docker, &id).await?;
            println!("stopped {}", cp::agent::container_name(&project, &agent));
        }
        AgentCommand::Rm(n) => {
            let (agent, project) = names(&n.name, &n.project)?;
            let id = cp::agent::find(&docker, &project, &agent).await?;
            cp::agent::remove(&docker, &id).await?;
            println!("removed {}", cp::agent::container_name(&project, &agent));
        }
        AgentCommand::Release(n) => lift(state_dir, admin_addr, &n, true).await?,
        AgentCommand::Unlock(n) => lift(state_dir, admin_addr, &n, false).await?,
        AgentCommand::Run(args) => run(state_dir, admin_addr, &docker, *args).await?,
        AgentCommand::Exec(_)
        | AgentCommand::Shell(_)
        | AgentCommand::Cp(_)
        | AgentCommand::Logs(_) => bail!("internal: operator commands are dispatched by cli::run"),
    }
    Ok(())
}

/// `agent release|unlock`: one admin RPC; a refused or failed lift is an
/// error (non-zero exit) with the CP's reason.
async fn lift(
    state_dir: &Path,
    admin_addr: &str,
    n: &NameArgs,
    release: bool,
) -> anyhow::Result<()> {
    let (agent, project) = names(&n.name, &n.project)?;
    let addr = admin_addr
        .parse()
        .with_context(|| format!("--admin-addr {admin_addr:?}"))?;
    let client = crate::admin_api::client::AdminClient::connect(state_dir, addr).await?;
    let (verb, outcome, detail) = if release {
        let r = client
            .release_agent(agent.as_str(), project.as_str())
            .await?;
        ("release", r.outcome, r.detail)
    } else {
        let r = client
            .unlock_agent(agent.as_str(), project.as_str())
            .await?;
        ("unlock", r.outcome, r.detail)
    };
    let name = cp::agent::container_name(&project, &agent);
    match outcome.as_str() {
        "applied" | "already_applied" => {
            println!("{verb} {name}: {outcome} ({detail})");
            Ok(())
        }
        _ => bail!("{verb} {name}: {outcome}: {detail}"),
    }
}

/// `[agent]` from the config file (`--config`, else `<state>/cp.toml`).
fn agent_defaults(
    state_dir: &Path,
    path: Option<&Path>,
) -> anyhow::Result<cp::agent::AgentDefaults> {
    let (path, must_exist) = match path {
        Some(p) => (p.to_owned(), true),
        None => (state_dir.join("cp.toml"), false),
    };
    let file = config::FileConfig::load(&path, must_exist).map_err(anyhow::Error::msg)?;
    Ok(file.agent.unwrap_or_default())
}

async fn run(
    state_dir: &Path,
    admin_addr: &str,
    docker: &crate::docker::Docker,
    args: RunArgs,
) -> anyhow::Result<()> {
    let (agent, project) = names(&args.name, &args.project)?;
    let overrides = cp::agent::AgentOverrides {
        cap_add: args.cap_add.clone(),
        cap_drop: args.cap_drop.clone(),
        no_new_privileges: args.no_new_privileges,
        pids_limit: args.pids_limit,
        memory: args.memory.clone(),
        cpus: args.cpus,
        read_only: args.read_only,
        tmp_size: args.tmp_size.clone(),
        workspace: args.workspace.clone(),
        env: args.env.clone(),
    };
    let (hardening, env) = agent_defaults(state_dir, args.config.as_deref())?
        .resolve(&overrides)
        .context("agent confinement ([agent] in cp.toml, or the flags)")?;
    let material = crate::pki::AuthMaterial::load(state_dir).with_context(|| {
        format!(
            "loading auth material from {} (run `clawker ca init` first)",
            state_dir.display()
        )
    })?;
    // Subscribe before the container exists so no event can be missed.
    // Waiting mode promises to confirm the agent ready: a CP that cannot be
    // reached is an error before anything is started (exit non-zero), not
    // a warning followed by success.
    let mut events = if args.no_wait {
        None
    } else {
        let addr = admin_addr
            .parse()
            .with_context(|| format!("--admin-addr {admin_addr:?}"))?;
        let client = crate::admin_api::client::AdminClient::connect(state_dir, addr)
            .await
            .with_context(|| {
                format!(
                    "cannot reach the control plane at {addr} to wait for init; nothing started \
                     (start `clawker cp serve`, or pass --no-wait to start without waiting)"
                )
            })?;
        let stream = client
            .watch_events(vec!["agent.".into()])
            .await
            .context("subscribing to the control plane's events; nothing started")?;
        Some((stream, client))
    };
    let spec = cp::agent::RunSpec {
        agent: agent.clone(),
        project: project.clone(),
        image: args.image,
        network: args.network,
        agent_port: args.agent_port,
        command: args.command,
        env,
        hardening,
        extra_labels: Default::default(),
        extra_networks: Vec::new(),
        mint_for_container: args.leaf_for_container,
    };
    let id = cp::agent::run(docker, &material, &spec).await?;
    let name = cp::agent::container_name(&project, &agent);
    println!("started {name} ({})", &id[..12.min(id.len())]);
    let Some((stream, _client)) = events.as_mut() else {
        return Ok(());
    };
    // A live bar on a terminal; plain lines otherwise (logs, CI, pipes).
    use std::io::IsTerminal;
    let plain = !std::io::stderr().is_terminal();
    let bar = if plain {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(0)
    };
    let say = |msg: String| {
        if plain {
            eprintln!("{msg}");
        }
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{prefix} [{bar:20}] {pos}/{len} {msg}")
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .progress_chars("=> "),
    );
    bar.set_prefix(name.clone());
    bar.set_message("connecting");
    let outcome = tokio::time::timeout(Duration::from_secs(args.timeout_secs), async {
        use crate::events::Decoded;
        while let Some(ev) = stream.next().await {
            let ev = ev.context("event stream")?;
            let decoded = crate::events::decode(&ev.name, &ev.json)
                .with_context(|| format!("malformed {} event from the CP", ev.name))?;
            if decoded.container_id() != Some(id.as_str()) {
                continue;
            }
            match decoded {
                Decoded::SessionConnected(_) => {
                    bar.set_message("session connected");
                    say(format!("{name}: session connected"));
                }
                Decoded::AgentRegistered(e) if e.ok => {
                    bar.set_message("registered");
                    say(format!("{name}: registered"));
                }
                Decoded::InitStarted(e) => bar.set_length(u64::from(e.step_count)),
                Decoded::InitStepStarted(e) => {
                    let msg = format!("step {}/{} {}", e.step_index + 1, e.step_count, e.step);
                    bar.set_length(u64::from(e.step_count));
                    bar.set_position(u64::from(e.step_index));
                    bar.set_message(msg.clone());
                    say(format!("{name}: {msg}"));
                }
                Decoded::InitCompleted(e) => {
                    bar.set_position(bar.length().unwrap_or(0));
                    bar.finish_with_message("ready");
                    let ms = (e.duration.as_secs_f64() * 1000.0).round();
                    say(format!("{name}: ready (init {ms} ms)"));
                    return Ok(());
                }
                Decoded::InitFailed(e) => {
                    bar.abandon_with_message("init failed");
                    bail!(
                        "init failed at step {:?}: {:?} ({:?})",
                        e.failed_step,
                        e.reason.as_str(),
                        e.detail
                    );
                }
                Decoded::AgentUntrusted(e) => {
                    bar.abandon_with_message("untrusted");
                    bail!(
                        "agent is untrusted: {:?} {:?} (session kept for containment; init withheld)",
                        e.reason.as_str(),
                        e.detail
                    );
                }
                Decoded::SessionFailed(e) => {
                    bar.abandon_with_message("session failed");
                    bail!("session failed: {:?}", e.reason);
                }
                _ => {}
            }
        }
        bail!("event stream ended before init finished")
    })
    .await;
    match outcome {
        Ok(r) => r,
        Err(_) => bail!(
            "init did not finish within {}s (see `clawker events`)",
            args.timeout_secs
        ),
    }
}
