//! `clawker cp serve|deploy` and `clawker agent run|stop|rm|release|unlock`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};
use futures::StreamExt;

use crate::cp::config::RuntimeKind;
use crate::cp::{self, config};
use crate::identity::{AgentName, ProjectSlug};
use crate::runtime::provision::Provision;

#[derive(Debug, Subcommand)]
pub enum CpCommand {
    /// Run the control plane until SIGTERM/SIGINT.
    Serve(ServeArgs),
    /// Swarm mode: run the control plane as a one-replica swarm service on
    /// the manager DOCKER_HOST points at (state on a volume of that node).
    Deploy(DeployArgs),
}

#[derive(Debug, Args)]
pub struct DeployArgs {
    /// The CP image (`scripts/build-cp-image.sh` builds it); every node
    /// that may run it needs it.
    #[arg(long, default_value = crate::defaults::swarm::CP_IMAGE)]
    pub image: String,
    /// The attachable overlay shared by the CP and the agents (created if
    /// missing).
    #[arg(long, default_value = crate::defaults::swarm::NETWORK)]
    pub network: String,
    /// Its subnet when it has to be created.
    #[arg(long, default_value = crate::defaults::swarm::SUBNET)]
    pub subnet: String,
    /// The internal overlay `isolate` moves agents onto (created if
    /// missing; the CP is attached to it too).
    #[arg(long, default_value = crate::defaults::swarm::QUARANTINE_NETWORK)]
    pub quarantine_network: String,
    /// Its subnet when it has to be created.
    #[arg(long, default_value = crate::defaults::swarm::QUARANTINE_SUBNET)]
    pub quarantine_subnet: String,
    /// Encrypt the overlay's data path (refused on a kernel without IPsec
    /// ESP, where swarm silently drops all cross-node traffic).
    #[arg(long)]
    pub encrypted: bool,
    #[arg(long, default_value_t = crate::defaults::AGENT_PORT)]
    pub agent_port: u16,
    /// Host port on the manager the admin API is published on.
    #[arg(long, default_value_t = crate::defaults::ADMIN_ADDR.port())]
    pub admin_port: u16,
    /// The manager engine's socket on its host (mounted into the CP);
    /// default: the path in DOCKER_HOST, else /var/run/docker.sock.
    #[arg(long)]
    pub engine_socket: Option<String>,
    /// cp.toml to install as the CP's (default: <state>/cp.toml if present).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// RUST_LOG for the CP.
    #[arg(long, default_value = "info")]
    pub log_filter: String,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// TOML config file (default: <state>/cp.toml if present).
    #[arg(long, env = "CLAWKER_CONFIG")]
    pub config: Option<PathBuf>,
    /// `engine` (one Docker engine) or `swarm` (the CP is the service
    /// `cp deploy` creates).
    #[arg(long, env = "CLAWKER_RUNTIME")]
    pub runtime: Option<RuntimeKind>,
    /// Swarm mode: require an encrypted overlay.
    #[arg(long, env = "CLAWKER_SWARM_ENCRYPTED")]
    pub swarm_encrypted: Option<bool>,
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
    /// Lifetime of agent leaves signed on rotation (e.g. `24h`, `10s`);
    /// overrides cp.toml `agent_cert_ttl`.
    #[arg(long, env = "CLAWKER_AGENT_CERT_TTL", value_parser = config::parse_duration)]
    pub agent_cert_ttl: Option<Duration>,
    /// Leave a container running when an init or boot step fails (default:
    /// end it with the step's exit code).
    #[arg(long, env = "CLAWKER_KEEP_ON_INIT_FAILURE")]
    pub keep_on_init_failure: Option<bool>,
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
    #[command(flatten)]
    pub runtime: RuntimeArg,
}

/// Which runtime the agent commands talk to.
#[derive(Debug, Args)]
pub struct RuntimeArg {
    /// `engine` or `swarm` (DOCKER_HOST must then point at a manager);
    /// default: `runtime` in <state>/cp.toml, else engine.
    #[arg(long, env = "CLAWKER_RUNTIME")]
    pub runtime: Option<RuntimeKind>,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    pub name: String,
    #[arg(long, default_value = "")]
    pub project: String,
    #[arg(long, default_value = crate::defaults::AGENT_IMAGE)]
    pub image: String,
    /// The agent network (default: clawker-net; swarm: clawker-overlay).
    #[arg(long)]
    pub network: Option<String>,
    #[command(flatten)]
    pub runtime: RuntimeArg,
    /// Swarm placement constraint (repeatable), e.g. `node.role==worker`.
    #[arg(long = "constraint")]
    pub constraints: Vec<String>,
    #[arg(long, default_value_t = crate::defaults::AGENT_PORT)]
    pub agent_port: u16,
    /// The CP's TOML config: its `[agent]` section gives the defaults
    /// below, `agent_cert_ttl` the leaf's lifetime (default:
    /// <state>/cp.toml if present).
    #[arg(long, env = "CLAWKER_CONFIG")]
    pub config: Option<PathBuf>,
    /// Keep this capability too (repeatable; all others are dropped except
    /// SETUID, SETGID, KILL, CHOWN, FOWNER and DAC_READ_SEARCH, which
    /// clawkerd needs).
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
    /// Lifetime of the agent's leaf (e.g. `24h`); overrides cp.toml.
    #[arg(long, env = "CLAWKER_AGENT_CERT_TTL", value_parser = config::parse_duration)]
    pub agent_cert_ttl: Option<Duration>,
    /// The user command (after `--`); default: the image's CMD.
    #[arg(last = true)]
    pub command: Vec<String>,
}

/// The CP's config file: `--config`/`CLAWKER_CONFIG` (must exist), else
/// `<state>/cp.toml` if present.
fn load_file_config(
    state_dir: &Path,
    explicit: Option<&Path>,
) -> anyhow::Result<config::FileConfig> {
    let (path, must_exist) = match explicit {
        Some(p) => (p.to_owned(), true),
        None => (state_dir.join("cp.toml"), false),
    };
    Ok(config::FileConfig::load(&path, must_exist)?)
}

pub fn serve(state_dir: &Path, admin_addr: &str, args: ServeArgs) -> anyhow::Result<()> {
    let file = load_file_config(state_dir, args.config.as_deref())?;
    init_logging(args.log_format.as_deref().or(file.log_format.as_deref()))?;
    let admin_addr = admin_addr
        .parse()
        .with_context(|| format!("--admin-addr {admin_addr:?}"))?;
    let overrides = config::Overrides {
        runtime: args.runtime,
        swarm_encrypted: args.swarm_encrypted,
        network: args.network,
        subnet: args.subnet,
        quarantine_network: args.quarantine_network,
        quarantine_subnet: args.quarantine_subnet,
        agent_port: args.agent_port,
        admin_addr: Some(admin_addr),
        metrics_addr: args.metrics_addr,
        clawkerd_port: args.clawkerd_port,
        init_untrusted: args.init_untrusted,
        agent_cert_ttl: args.agent_cert_ttl,
        keep_on_init_failure: args.keep_on_init_failure,
    };
    let cfg = config::resolve(state_dir.to_owned(), file, overrides)?;
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

/// The runtime named by the flag/env, else by `<state>/cp.toml`.
fn runtime_kind(state_dir: &Path, arg: &RuntimeArg) -> anyhow::Result<RuntimeKind> {
    if let Some(k) = arg.runtime {
        return Ok(k);
    }
    let file = config::FileConfig::load(&state_dir.join("cp.toml"), false)?;
    Ok(file.runtime.unwrap_or_default())
}

/// The agent network by default for a runtime.
fn default_network(kind: RuntimeKind) -> &'static str {
    match kind {
        RuntimeKind::Engine => crate::defaults::NETWORK,
        RuntimeKind::Swarm => crate::defaults::swarm::NETWORK,
    }
}

/// Connects to the runtime the agent commands act on.
async fn provisioner(kind: RuntimeKind, network: &str) -> anyhow::Result<Box<dyn Provision>> {
    Ok(match kind {
        RuntimeKind::Engine => Box::new(crate::docker::connect().await?),
        RuntimeKind::Swarm => Box::new(crate::docker::swarm::Swarm::connect(network).await?),
    })
}

pub async fn agent(state_dir: &Path, admin_addr: &str, cmd: AgentCommand) -> anyhow::Result<()> {
    match cmd {
        AgentCommand::Stop(n) => {
            let (agent, project) = names(&n.name, &n.project)?;
            let kind = runtime_kind(state_dir, &n.runtime)?;
            let rt = provisioner(kind, default_network(kind)).await?;
            let id = cp::agent::find(rt.as_ref(), &project, &agent).await?;
            cp::agent::stop(rt.as_ref(), &id).await?;
            println!("stopped {}", cp::agent::container_name(&project, &agent));
        }
        AgentCommand::Rm(n) => {
            let (agent, project) = names(&n.name, &n.project)?;
            let kind = runtime_kind(state_dir, &n.runtime)?;
            let rt = provisioner(kind, default_network(kind)).await?;
            let id = cp::agent::find(rt.as_ref(), &project, &agent).await?;
            cp::agent::remove(rt.as_ref(), &id).await?;
            println!("removed {}", cp::agent::container_name(&project, &agent));
        }
        AgentCommand::Release(n) => lift(state_dir, admin_addr, &n, true).await?,
        AgentCommand::Unlock(n) => lift(state_dir, admin_addr, &n, false).await?,
        AgentCommand::Run(args) => run(state_dir, admin_addr, *args).await?,
        AgentCommand::Exec(_)
        | AgentCommand::Shell(_)
        | AgentCommand::Cp(_)
        | AgentCommand::Logs(_) => bail!("internal: operator commands are dispatched by cli::run"),
    }
    Ok(())
}

/// `clawker cp deploy`.
pub async fn deploy(state_dir: &Path, args: DeployArgs) -> anyhow::Result<()> {
    let (path, must_exist) = match &args.config {
        Some(p) => (p.clone(), true),
        None => (state_dir.join("cp.toml"), false),
    };
    let config_toml = match std::fs::read_to_string(&path) {
        Ok(t) => Some(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !must_exist => None,
        Err(e) => bail!("config {}: {e}", path.display()),
    };
    let engine_socket = args.engine_socket.clone().unwrap_or_else(|| {
        std::env::var("DOCKER_HOST")
            .ok()
            .and_then(|h| h.strip_prefix("unix://").map(str::to_owned))
            .unwrap_or_else(|| "/var/run/docker.sock".into())
    });
    let swarm = crate::docker::swarm::Swarm::connect(&args.network).await?;
    let req = cp::deploy::DeployRequest {
        image: args.image,
        network: args.network,
        subnet: args.subnet,
        quarantine_network: args.quarantine_network,
        quarantine_subnet: args.quarantine_subnet,
        encrypted: args.encrypted,
        agent_port: args.agent_port,
        admin_port: args.admin_port,
        engine_socket,
        config_toml,
        log_filter: args.log_filter,
    };
    let cp = cp::deploy::deploy(&swarm, state_dir, &req).await?;
    println!(
        "control plane running: service {} task {} at {} on {}",
        &cp.service_id[..12.min(cp.service_id.len())],
        &cp.task_id[..12.min(cp.task_id.len())],
        cp.overlay_ip,
        req.network
    );
    if let Some(a) = cp.admin_addr {
        println!("admin API: clawker --admin-addr {a} agents");
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
async fn run(state_dir: &Path, admin_addr: &str, args: RunArgs) -> anyhow::Result<()> {
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
    let file = load_file_config(state_dir, args.config.as_deref())?;
    let (hardening, env) = file
        .agent
        .clone()
        .unwrap_or_default()
        .resolve(&overrides)
        .context("agent confinement ([agent] in cp.toml, or the flags)")?;
    let cert_ttl = match args.agent_cert_ttl {
        Some(t) => config::check_agent_cert_ttl(t)?,
        None => file.agent_cert_ttl()?,
    };
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
    let kind = runtime_kind(state_dir, &args.runtime)?;
    let network = args
        .network
        .clone()
        .unwrap_or_else(|| default_network(kind).to_owned());
    let runtime = provisioner(kind, &network).await?;
    let spec = cp::agent::RunSpec {
        agent: agent.clone(),
        project: project.clone(),
        image: args.image,
        network,
        agent_port: args.agent_port,
        command: args.command,
        env,
        hardening,
        extra_labels: Default::default(),
        extra_networks: Vec::new(),
        mint_for_container: args.leaf_for_container,
        cert_ttl,
        placement: args.constraints,
    };
    let id = cp::agent::run(runtime.as_ref(), &material, &spec).await?;
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
    // The step that failed, from `agent.init.step.failed` (which precedes
    // `agent.init.failed`): its exit code and what it wrote to stderr.
    let mut failed_step: Option<crate::events::InitStepFailed> = None;
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
                Decoded::PlanDecided(e) if e.plans.is_empty() && e.skipped == crate::events::plan_skipped::CMD_RUNNING => {
                    bar.finish_with_message("already running");
                    say(format!("{name}: already running (nothing to run)"));
                    return Ok(());
                }
                Decoded::InitStarted(e) => bar.set_length(u64::from(e.step_count)),
                Decoded::InitStepStarted(e) => {
                    let msg = format!(
                        "step {}/{} {} ({})",
                        e.step_index + 1,
                        e.step_count,
                        e.step,
                        e.plan.as_str()
                    );
                    bar.set_length(u64::from(e.step_count));
                    bar.set_position(u64::from(e.step_index));
                    bar.set_message(msg.clone());
                    say(format!("{name}: {msg}"));
                }
                Decoded::InitStepFailed(e) => failed_step = Some(e),
                Decoded::InitCompleted(e) => {
                    bar.set_position(bar.length().unwrap_or(0));
                    bar.finish_with_message("ready");
                    let ms = (e.duration.as_secs_f64() * 1000.0).round();
                    say(format!("{name}: ready (init {ms} ms)"));
                    return Ok(());
                }
                Decoded::InitFailed(e) => {
                    bar.abandon_with_message(format!("{} failed", e.plan.as_str()));
                    return Err(step_failed(&e, failed_step.as_ref()));
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

/// `agent run`'s error for a failed init or boot step: the step's stderr
/// (as the CP captured it) goes to our stderr, and the process exits with
/// the step's exit code (1 when it had none, e.g. a timeout).
fn step_failed(
    e: &crate::events::InitFailed,
    step: Option<&crate::events::InitStepFailed>,
) -> anyhow::Error {
    let output = step.map(|s| s.output.as_str()).unwrap_or("");
    if !output.is_empty() {
        eprintln!(
            "--- {} step {:?} output ---",
            e.plan.as_str(),
            e.failed_step
        );
        eprintln!("{output}");
        eprintln!("---");
    }
    let code = u8::try_from(e.exit_code)
        .ok()
        .filter(|c| *c != 0)
        .unwrap_or(1);
    crate::cli::ExitWith {
        code,
        message: format!(
            "{} step {:?} failed: {} ({}); exit code {}",
            e.plan.as_str(),
            e.failed_step,
            e.reason.as_str(),
            e.detail,
            e.exit_code
        ),
    }
    .into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{AgentRef, InitFailed, InitFailureReason, InitStepFailed, Plan};

    fn failed(exit_code: i32) -> InitFailed {
        InitFailed {
            agent: AgentRef::new("c", "a", ""),
            plan: Plan::Boot,
            failed_step: "pre-run".into(),
            reason: InitFailureReason::ExitCode,
            detail: format!("exit_code={exit_code}"),
            exit_code,
            duration: Duration::from_millis(3),
            at: crate::events::now(),
        }
    }

    #[test]
    fn a_failed_step_becomes_the_exit_code() {
        let step = InitStepFailed {
            agent: AgentRef::new("c", "a", ""),
            plan: Plan::Boot,
            step: "pre-run".into(),
            step_index: 1,
            duration: Duration::from_millis(3),
            exit_code: 3,
            reason: InitFailureReason::ExitCode,
            detail: "exit_code=3".into(),
            output: "boom".into(),
            at: crate::events::now(),
        };
        let e = step_failed(&failed(3), Some(&step));
        let x = e.downcast_ref::<crate::cli::ExitWith>().unwrap();
        assert_eq!(x.code, 3);
        assert!(
            x.message
                .starts_with("boot step \"pre-run\" failed: exit_code"),
            "{}",
            x.message
        );
        for (code, want) in [(-1, 1), (0, 1), (255, 255), (300, 1)] {
            let e = step_failed(&failed(code), None);
            assert_eq!(
                e.downcast_ref::<crate::cli::ExitWith>().unwrap().code,
                want,
                "{code}"
            );
        }
    }
}
