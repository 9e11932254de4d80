//! The `clawker` command line.

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
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Certificate authority and certificate minting.
    #[command(subcommand)]
    Ca(CaCommand),
}

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Create the CA, CP and CLI certificates and the CLI signing key.
    /// Idempotent: existing material is kept.
    Init,
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
        #[arg(long, default_value = DEFAULT_ASSERTION_AUDIENCE)]
        audience: String,
    },
}

/// The token endpoint as clawkerd reaches it on clawker-net.
pub const DEFAULT_ASSERTION_AUDIENCE: &str = "https://clawker-controlplane:7444/oauth2/token";

impl Cli {
    fn state_dir(&self) -> PathBuf {
        self.state_dir
            .clone()
            .unwrap_or_else(crate::config::default_state_dir)
    }
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    let state_dir = cli.state_dir();
    match cli.command {
        Command::Ca(CaCommand::Init) => {
            let (material, report) = pki::AuthMaterial::ensure(&state_dir).with_context(|| {
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
        Command::Ca(CaCommand::MintAgent {
            project,
            agent,
            container_id,
            out,
            audience,
        }) => {
            let project = ProjectSlug::new(&project)?;
            let agent = AgentName::new(&agent)?;
            let material = pki::AuthMaterial::load(&state_dir).with_context(|| {
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
