//! The `clawker` command line.
//!
//! - this file: the clap definitions and [`run`], which dispatches;
//! - [`admin`]: the operator commands that talk to a running CP over the
//!   admin API (`agents`, `events`, `worldview`, `tree`, `status`);
//! - [`audit`]: reading the tail of the audit log for `events` without
//!   `--follow` (the admin API keeps no history).
//! - [`operator`]: `agent exec|shell|cp|logs` over the admin API, with
//!   [`terminal`] for raw mode and the window size.

mod admin;
pub mod audit;
mod cp;
pub mod operator;
pub mod terminal;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::identity::{AgentName, ProjectSlug};
use crate::pki;

#[derive(Debug, Parser)]
#[command(
    name = "clawker",
    version,
    about = "Control plane for sandboxed AI coding agents"
)]
pub struct Cli {
    /// State directory (auth material, registry). Default:
    /// $CLAWKER_STATE_DIR, else $XDG_DATA_HOME/clawker, else ~/.local/share/clawker.
    #[arg(long, global = true, env = "CLAWKER_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Address of the control plane's admin API (loopback). Parsed only by
    /// the commands that use it, so a bad value never breaks `ca`.
    #[arg(
        long,
        global = true,
        env = "CLAWKER_ADMIN_ADDR",
        default_value_t = crate::defaults::ADMIN_ADDR.to_string()
    )]
    pub admin_addr: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Certificate authority and certificate minting.
    #[command(subcommand)]
    Ca(CaCommand),
    /// The control plane daemon.
    #[command(subcommand)]
    Cp(cp::CpCommand),
    /// Agent containers: run, stop, rm.
    #[command(subcommand)]
    Agent(cp::AgentCommand),
    /// List registered agents (from the CP's identity registry).
    Agents {
        /// One JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show events: the last ones from the audit log, or live with --follow.
    Events {
        /// Stream live events from the running CP until interrupted.
        #[arg(long, short)]
        follow: bool,
        /// One JSON object per line ({"name","at","event"}).
        #[arg(long)]
        json: bool,
        /// Only events whose name starts with this (repeatable).
        #[arg(long = "prefix", value_name = "PREFIX")]
        prefixes: Vec<String>,
        /// How many recent events to print without --follow.
        #[arg(long, default_value_t = 50)]
        last: usize,
    },
    /// The CP's live worldview (agents, sessions, trust, init).
    Worldview {
        /// The full worldview as pretty JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// The CP's supervision tree.
    Tree {
        /// The tree as pretty JSON instead of the rendered text.
        #[arg(long)]
        json: bool,
    },
    /// Is the CP up and healthy; how many agents and sessions.
    Status,
}

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Create the CA, CP and CLI certificates and the CLI signing key.
    /// Idempotent: existing material is kept.
    Init,
    /// Re-issue the CP's server and client certificates and the CLI's
    /// client certificate under the same CA (fresh keys, one more year).
    /// Agents keep working: clawkerd pins the CA and the CP's name, not a
    /// certificate. Restart the CP afterwards to serve the new ones.
    Renew,
    /// Mint an agent leaf and write a bootstrap bundle (cert.pem, key.pem,
    /// ca.pem, and the single-use token-endpoint assertion assertion.jwt).
    MintAgent {
        #[arg(long, default_value = "")]
        project: String,
        #[arg(long)]
        agent: String,
        /// Lowercase hex Docker container id the leaf is bound to.
        #[arg(long)]
        container_id: String,
        /// Output directory (created 0700).
        #[arg(long)]
        out: PathBuf,
        /// `aud` of the agent assertion: the CP token endpoint URL as the CP
        /// is configured to accept it.
        #[arg(long, default_value_t = crate::defaults::token_audience(crate::defaults::AGENT_PORT))]
        audience: String,
    },
}

/// A command that failed with a process exit code of its own (e.g. `agent
/// run` exits with the code of the init or boot step that failed). The
/// binary prints the message and exits with `code`.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ExitWith {
    pub code: u8,
    pub message: String,
}

impl Cli {
    fn state_dir(&self) -> PathBuf {
        self.state_dir
            .clone()
            .unwrap_or_else(crate::config::default_state_dir)
    }
}

/// Runs the command; the exit code is 0 unless the command reports one
/// (`agent exec` passes the remote command's on).
pub fn run(cli: Cli) -> anyhow::Result<i32> {
    let state_dir = cli.state_dir();
    let command = match cli.command {
        Command::Ca(ca) => return run_ca(&state_dir, ca).map(|()| 0),
        Command::Cp(cp::CpCommand::Serve(args)) => {
            return cp::serve(&state_dir, &cli.admin_addr, args).map(|()| 0);
        }
        Command::Cp(cp::CpCommand::Deploy(args)) => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            return rt.block_on(cp::deploy(&state_dir, args)).map(|()| 0);
        }
        Command::Agent(
            a @ (cp::AgentCommand::Exec(_)
            | cp::AgentCommand::Shell(_)
            | cp::AgentCommand::Cp(_)
            | cp::AgentCommand::Logs(_)),
        ) => return run_operator(&state_dir, &cli.admin_addr, a),
        other => other,
    };
    // Only `events` without --follow works offline; everything else talks
    // to the CP. A small current-thread runtime is all the CLI needs.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let res = rt.block_on(async {
        match command {
            Command::Agent(a) => cp::agent(&state_dir, &cli.admin_addr, a).await,
            other => admin::run(&state_dir, &cli.admin_addr, other).await,
        }
    });
    match res {
        // `clawker events -f | head`: a closed stdout is a normal end.
        Err(e)
            if e.downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe) =>
        {
            Ok(0)
        }
        other => other.map(|()| 0),
    }
}

/// `agent exec|shell|cp|logs`: no Docker connection, nothing but the admin
/// API (the whole process is on the measured path of `agent exec`).
fn run_operator(
    state_dir: &std::path::Path,
    admin_addr: &str,
    cmd: cp::AgentCommand,
) -> anyhow::Result<i32> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let res = rt.block_on(async {
        match cmd {
            cp::AgentCommand::Exec(a) => operator::exec(state_dir, admin_addr, a).await,
            cp::AgentCommand::Shell(a) => operator::shell(state_dir, admin_addr, a).await,
            cp::AgentCommand::Cp(a) => operator::cp(state_dir, admin_addr, a).await,
            cp::AgentCommand::Logs(a) => operator::logs(state_dir, admin_addr, a).await,
            _ => anyhow::bail!("internal: not an operator command"),
        }
    });
    // Do not wait for a stdin read that may never return.
    rt.shutdown_background();
    match res {
        Err(e)
            if e.downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe) =>
        {
            Ok(0)
        }
        other => other,
    }
}

fn run_ca(state_dir: &std::path::Path, cmd: CaCommand) -> anyhow::Result<()> {
    match cmd {
        CaCommand::Init => {
            let (material, report) = pki::AuthMaterial::ensure(state_dir).with_context(|| {
                format!("initialising auth material in {}", state_dir.display())
            })?;
            if report.created.is_empty() {
                println!(
                    "auth material already present in {}",
                    material.paths.root.display()
                );
            } else {
                for item in &report.created {
                    println!("created {item}");
                }
                println!("auth material in {}", material.paths.root.display());
            }
        }
        CaCommand::Renew => {
            let renewed = pki::AuthMaterial::renew(state_dir).with_context(|| {
                format!(
                    "renewing certificates in {} (run `clawker ca init` first)",
                    state_dir.display()
                )
            })?;
            for r in &renewed {
                println!(
                    "renewed {} ({}), valid until {}",
                    r.name,
                    r.path.display(),
                    r.not_after
                        .format(&time::format_description::well_known::Rfc3339)
                        .unwrap_or_default()
                );
            }
            println!("restart the CP (`clawker cp serve`) to use the new certificates");
        }
        CaCommand::MintAgent {
            project,
            agent,
            container_id,
            out,
            audience,
        } => {
            let project = ProjectSlug::new(&project)?;
            let agent = AgentName::new(&agent)?;
            let material = pki::AuthMaterial::load(state_dir).with_context(|| {
                format!(
                    "loading auth material from {} (run `clawker ca init` first)",
                    state_dir.display()
                )
            })?;
            let leaf = material.ca.mint_agent(&project, &agent, &container_id)?;
            let assertion =
                crate::agent_api::assertion::mint_agent_assertion(&material.signing_key, &audience)
                    .context("minting the agent assertion")?;
            pki::write_bootstrap(&out, &leaf, material.ca.cert_pem())?;
            // A bearer credential until spent: private like the key.
            pki::write_file(
                &out.join(pki::bootstrap::ASSERTION),
                assertion.as_bytes(),
                0o600,
            )?;
            println!(
                "wrote bootstrap bundle for {} to {} (thumbprint {})",
                crate::identity::canonical_cn(&project, &agent),
                out.display(),
                leaf.thumbprint()
            );
        }
    }
    Ok(())
}
