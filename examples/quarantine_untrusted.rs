//! A policy program outside the CP: quarantine untrusted agents by
//! *pausing* their containers (on top of the CP's own containment ladder).
//!
//! It is what a user would write against a running CP:
//! - subscribes to `agent.untrusted` through the admin API's `WatchEvents`
//!   with the CLI certificate (`<state>/auth/cli`), and on every
//!   (re)connection also looks at the worldview, so an agent that turned
//!   untrusted while it was away is not missed;
//! - reconnects with jittered backoff when the CP restarts
//!   ([`EventWatch`], on `clawker_actors::Backoff`);
//! - with `--evidence`, first records what runs in the agent through the
//!   admin API's `Exec` (`ps`, forced: the agent is untrusted, so the CP
//!   records it as `agent.exec.forced`);
//! - pauses the container through the Docker Engine API.
//!
//! ```text
//! scripts/demo.sh                                  # a CP and three demo agents
//! cargo run --example quarantine_untrusted -- --evidence &
//! scripts/demo.sh impostor                         # an agent with someone else's certificate
//! ```
//!
//! State dir: `--state-dir`, else `$CLAWKER_STATE_DIR`, else the default
//! (`$XDG_DATA_HOME/clawker`), else the demo's `target/demo-state` when
//! only that one holds CLI credentials. Admin API: `--admin-addr`, else
//! `$CLAWKER_ADMIN_ADDR`, else 127.0.0.1:7443.
//!
//! `tests/exec_docker.rs` runs this very file against a real CP and engine.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clawker::admin_api::AdminClient;
use clawker::admin_api::watch::{EventWatch, WatchItem};
use clawker::events::{self, Decoded};
use clawker::proto::admin::v1 as pb;
use tokio::sync::mpsc;

/// What the program does, and where.
#[derive(Debug, Clone)]
pub struct Options {
    pub state_dir: PathBuf,
    pub admin_addr: SocketAddr,
    /// Capture `ps` in the agent (through Exec) before pausing it.
    pub evidence: bool,
}

impl Options {
    pub fn from_args() -> anyhow::Result<Self> {
        let mut args = std::env::args().skip(1);
        let mut state_dir = None;
        let mut admin_addr = std::env::var("CLAWKER_ADMIN_ADDR").ok();
        let mut evidence = false;
        while let Some(a) = args.next() {
            match a.as_str() {
                "--state-dir" => state_dir = args.next().map(PathBuf::from),
                "--admin-addr" => admin_addr = args.next(),
                "--evidence" => evidence = true,
                other => anyhow::bail!(
                    "unknown argument {other:?} (usage: [--state-dir DIR] [--admin-addr IP:PORT] [--evidence])"
                ),
            }
        }
        let state_dir = state_dir.unwrap_or_else(default_state_dir);
        let admin_addr = admin_addr
            .unwrap_or_else(|| clawker::defaults::ADMIN_ADDR.to_string())
            .parse()
            .context("--admin-addr: want IP:PORT")?;
        Ok(Self {
            state_dir,
            admin_addr,
            evidence,
        })
    }
}

/// The usual state dir, or the demo's when only it has CLI credentials.
fn default_state_dir() -> PathBuf {
    let usual = clawker::config::default_state_dir();
    let creds = |d: &PathBuf| clawker::pki::AuthPaths::new(d).cli_cert().exists();
    let demo = PathBuf::from("target/demo-state");
    if !creds(&usual) && std::env::var_os("CLAWKER_STATE_DIR").is_none() && creds(&demo) {
        eprintln!("using the demo's state dir {}", demo.display());
        return demo;
    }
    usual
}

/// Runs until the credentials are unusable; every action is reported as a
/// line on `report`.
pub async fn run(opts: Options, report: mpsc::UnboundedSender<String>) -> anyhow::Result<()> {
    let say = |line: String| {
        let _ = report.send(line);
    };
    let docker = clawker::docker::connect()
        .await
        .context("the Docker engine (to pause containers)")?;
    let mut watch = EventWatch::new(
        opts.state_dir.clone(),
        opts.admin_addr,
        vec![<events::AgentUntrusted as events::DomainEvent>::NAME.to_owned()],
    );
    let mut client: Option<AdminClient> = None;
    // Containers already handled in this run (a CP restart replays verdicts).
    let mut done: HashSet<String> = HashSet::new();
    loop {
        match watch.next().await? {
            WatchItem::Connected(c) => {
                say(format!(
                    "connected to the control plane at {}",
                    opts.admin_addr
                ));
                let c = *c;
                // Verdicts given while we were away.
                match c.worldview().await {
                    Ok(view) => {
                        let agents = view["agents"].as_object().cloned().unwrap_or_default();
                        let mut trusted = 0;
                        for (id, a) in agents {
                            if a["trust"]["trusted"].as_bool() == Some(false) {
                                let who = format!(
                                    "{}/{}",
                                    a["project"].as_str().unwrap_or(""),
                                    a["agent"].as_str().unwrap_or("")
                                );
                                let why = a["trust"]["reason"]
                                    .as_str()
                                    .unwrap_or("unknown")
                                    .to_owned();
                                quarantine(&c, &docker, &opts, &mut done, &id, &who, &why, &say)
                                    .await;
                            } else {
                                trusted += 1;
                            }
                        }
                        say(format!("watching: {trusted} trusted agent(s)"));
                    }
                    Err(e) => say(format!("worldview: {e}")),
                }
                client = Some(c);
            }
            WatchItem::Event(ev) => {
                let Ok(Decoded::AgentUntrusted(e)) = events::decode(&ev.name, &ev.json) else {
                    continue;
                };
                let Some(c) = client.as_ref() else { continue };
                let who = format!("{}/{}", e.agent.project, e.agent.name);
                quarantine(
                    c,
                    &docker,
                    &opts,
                    &mut done,
                    &e.agent.container_id,
                    &who,
                    e.reason.as_str(),
                    &say,
                )
                .await;
            }
            WatchItem::Disconnected(why) => {
                client = None;
                say(format!("control plane gone ({why}); reconnecting"));
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn quarantine(
    client: &AdminClient,
    docker: &bollard::Docker,
    opts: &Options,
    done: &mut HashSet<String>,
    id: &str,
    who: &str,
    why: &str,
    say: &impl Fn(String),
) {
    if !done.insert(id.to_owned()) {
        return;
    }
    let short = id.get(..12).unwrap_or(id);
    if opts.evidence {
        match evidence(client, id).await {
            Ok(ps) => say(format!(
                "{who} ({short}) untrusted ({why}): processes:\n{ps}"
            )),
            Err(e) => say(format!("{who} ({short}): no evidence: {e}")),
        }
    }
    let paused = docker
        .inspect_container(
            id,
            None::<bollard::query_parameters::InspectContainerOptions>,
        )
        .await
        .ok()
        .and_then(|c| c.state.and_then(|s| s.paused))
        .unwrap_or(false);
    let outcome = if paused {
        "already paused".to_owned()
    } else {
        match docker.pause_container(id).await {
            Ok(()) => "paused".to_owned(),
            Err(e) => {
                done.remove(id);
                format!("not paused: {e}")
            }
        }
    };
    say(format!("{who} ({short}) untrusted ({why}): {outcome}"));
}

/// `ps` in the agent, through the admin API's Exec (forced: it is
/// untrusted, and the CP records that).
async fn evidence(client: &AdminClient, container_id: &str) -> anyhow::Result<String> {
    let start = pb::ExecRequest {
        frame: Some(pb::exec_request::Frame::Start(pb::ExecStart {
            target: Some(pb::AgentTarget {
                agent: container_id.to_owned(),
                project: String::new(),
            }),
            argv: vec!["ps".into()],
            user: "root".into(),
            force: true,
            ..Default::default()
        })),
    };
    let mut out = client.exec(tokio_stream::iter(vec![start])).await?;
    let mut text = Vec::new();
    let read = async {
        while let Some(r) = out.message().await? {
            match r.frame {
                Some(pb::exec_response::Frame::Stdout(d)) => text.extend_from_slice(&d),
                Some(pb::exec_response::Frame::Exit(e)) if e.code != 0 => {
                    anyhow::bail!("ps exited {}: {}", e.code, e.error)
                }
                Some(pb::exec_response::Frame::Exit(_)) => break,
                _ => {}
            }
        }
        Ok(())
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .context("ps did not finish within 10s")??;
    Ok(String::from_utf8_lossy(&text).into_owned())
}

// The e2e test includes this file as a module and calls `run` itself.
#[allow(dead_code)]
fn main() -> anyhow::Result<()> {
    let opts = Options::from_args()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let printer = tokio::spawn(async move {
            while let Some(line) = rx.recv().await {
                println!("{line}");
            }
        });
        println!(
            "quarantine_untrusted: watching {} (state {})",
            opts.admin_addr,
            opts.state_dir.display()
        );
        let res = run(opts, tx).await;
        let _ = printer.await;
        res
    })
}
