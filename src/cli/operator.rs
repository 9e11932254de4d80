//! `clawker agent exec|shell|cp|logs`: the operator's way into an agent,
//! over the admin API (and from there the CP's session to its clawkerd).
//! Behaves like `docker exec|cp|logs`:
//!
//! - the remote exit code is the CLI's exit code (127/126 when the
//!   command could not be started, 255 when the session broke first);
//! - `-t` puts the local terminal in raw mode ([`RawMode`], restored on
//!   every way out) and follows its window size; `^C` is then a byte the
//!   remote terminal turns into SIGINT for its foreground job;
//! - signals the CLI itself receives (INT, QUIT, TERM, HUP, USR1, USR2)
//!   are forwarded to the remote command; after TERM or HUP the CLI stops
//!   waiting shortly after and returns (the terminal restored);
//! - stdin (with `-i`) is streamed, and its end is delivered as EOF.
//!
//! Stdin is read by a plain thread, not the runtime: a read blocked on a
//! terminal would otherwise hold the runtime's shutdown.

use std::collections::HashMap;
use std::io::{Read, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::Args;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::terminal::{self, RawMode};
use crate::admin_api::AdminClient;
use crate::archive::{self, Owner, UnpackOptions};
use crate::proto::admin::v1::{
    self as pb, copy_to_request, copy_to_response, exec_request, exec_response,
};

/// After SIGTERM/SIGHUP, how long the CLI waits for the remote command.
const SIGNAL_EXIT_GRACE: Duration = Duration::from_millis(500);
/// Stdin read size.
const STDIN_CHUNK: usize = 32 * 1024;
/// Tar chunk size towards the CP.
const TAR_CHUNK: usize = 128 * 1024;
/// Exit code when the command's own status is unknown.
const EXIT_UNKNOWN: i32 = 255;

#[derive(Debug, Args)]
pub struct ExecArgs {
    /// Agent name (or container id).
    pub name: String,
    #[arg(long, default_value = "")]
    pub project: String,
    /// Keep stdin open and stream it to the command.
    #[arg(short = 'i', long)]
    pub interactive: bool,
    /// Allocate a pseudo-terminal.
    #[arg(short = 't', long)]
    pub tty: bool,
    /// User name, uid or uid:gid (default: the agent user; `root` only
    /// when asked).
    #[arg(short = 'u', long)]
    pub user: Option<String>,
    /// Working directory inside the container.
    #[arg(short = 'w', long)]
    pub workdir: Option<String>,
    /// Environment variable (K=V, or K to pass this shell's value).
    #[arg(short = 'e', long = "env", value_name = "K=V")]
    pub env: Vec<String>,
    /// Exec even into an untrusted, quarantined or locked agent (recorded
    /// as agent.exec.forced).
    #[arg(long)]
    pub force: bool,
    /// The command and its arguments (after `--` when they start with `-`).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
    pub command: Vec<String>,
}

#[derive(Debug, Args)]
pub struct ShellArgs {
    pub name: String,
    #[arg(long, default_value = "")]
    pub project: String,
    #[arg(short = 'u', long)]
    pub user: Option<String>,
    #[arg(short = 'w', long)]
    pub workdir: Option<String>,
    #[arg(short = 'e', long = "env", value_name = "K=V")]
    pub env: Vec<String>,
    #[arg(long)]
    pub force: bool,
    /// The shell to run.
    #[arg(long, default_value = "/bin/sh")]
    pub shell: String,
}

#[derive(Debug, Args)]
pub struct CpArgs {
    /// `NAME:PATH` (from the agent), a local path, or `-` (a tar stream on
    /// stdin).
    pub src: String,
    /// `NAME:PATH` (into the agent), a local path, or `-` (a tar stream on
    /// stdout).
    pub dst: String,
    #[arg(long, default_value = "")]
    pub project: String,
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    pub name: String,
    #[arg(long, default_value = "")]
    pub project: String,
    /// Keep streaming new output.
    #[arg(short = 'f', long)]
    pub follow: bool,
    /// Only the last N bytes of what is buffered.
    #[arg(long, value_name = "BYTES", default_value_t = 0)]
    pub tail: u64,
}

fn target(name: &str, project: &str) -> pb::AgentTarget {
    pb::AgentTarget {
        agent: name.to_owned(),
        project: project.to_owned(),
    }
}

async fn connect(state_dir: &Path, admin_addr: &str) -> anyhow::Result<AdminClient> {
    let addr: SocketAddr = admin_addr.parse().with_context(|| {
        format!("--admin-addr / CLAWKER_ADMIN_ADDR {admin_addr:?} is not an IP:port address")
    })?;
    Ok(AdminClient::connect(state_dir, addr).await?)
}

/// `-e K=V` / `-e K` → the map.
fn parse_env(items: &[String]) -> anyhow::Result<HashMap<String, String>> {
    let mut env = HashMap::new();
    for item in items {
        match item.split_once('=') {
            Some(("", _)) => bail!("-e {item:?}: empty variable name"),
            Some((k, v)) => {
                env.insert(k.to_owned(), v.to_owned());
            }
            None => {
                if let Ok(v) = std::env::var(item) {
                    env.insert(item.clone(), v);
                }
            }
        }
    }
    Ok(env)
}

fn exec_frame(f: exec_request::Frame) -> pb::ExecRequest {
    pb::ExecRequest { frame: Some(f) }
}

/// Reads fd 0 on its own thread into `tx` (chunks, then CloseStdin).
fn pump_stdin(tx: mpsc::Sender<pb::ExecRequest>) {
    let spawned = std::thread::Builder::new()
        .name("clawker-stdin".into())
        .spawn(move || {
            let mut stdin = std::io::stdin().lock();
            let mut buf = vec![0u8; STDIN_CHUNK];
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        let f = exec_frame(exec_request::Frame::Stdin(Bytes::copy_from_slice(
                            &buf[..n],
                        )));
                        if tx.blocking_send(f).is_err() {
                            return;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
            let _ = tx.blocking_send(exec_frame(exec_request::Frame::CloseStdin(
                pb::ExecCloseStdin {},
            )));
        });
    if let Err(e) = spawned {
        eprintln!("clawker: cannot read stdin: {e}");
    }
}

/// What an exec asks for, whichever command line it came from.
pub struct ExecPlan {
    pub target: pb::AgentTarget,
    pub argv: Vec<String>,
    pub user: String,
    pub workdir: String,
    pub env: HashMap<String, String>,
    pub interactive: bool,
    pub tty: bool,
    pub force: bool,
}

pub async fn exec(state_dir: &Path, admin_addr: &str, a: ExecArgs) -> anyhow::Result<i32> {
    let plan = ExecPlan {
        target: target(&a.name, &a.project),
        argv: a.command,
        user: a.user.unwrap_or_default(),
        workdir: a.workdir.unwrap_or_default(),
        env: parse_env(&a.env)?,
        interactive: a.interactive,
        tty: a.tty,
        force: a.force,
    };
    run_exec(state_dir, admin_addr, plan).await
}

pub async fn shell(state_dir: &Path, admin_addr: &str, a: ShellArgs) -> anyhow::Result<i32> {
    let plan = ExecPlan {
        target: target(&a.name, &a.project),
        argv: vec![a.shell],
        user: a.user.unwrap_or_default(),
        workdir: a.workdir.unwrap_or_default(),
        env: parse_env(&a.env)?,
        interactive: true,
        tty: true,
        force: a.force,
    };
    run_exec(state_dir, admin_addr, plan).await
}

/// The whole exec: connect, start, relay, exit code.
pub async fn run_exec(state_dir: &Path, admin_addr: &str, plan: ExecPlan) -> anyhow::Result<i32> {
    use tokio::signal::unix::{SignalKind, signal};
    if plan.tty && plan.interactive && !terminal::is_tty(0) {
        bail!("the input device is not a TTY (drop -t, or run from a terminal)");
    }
    let client = connect(state_dir, admin_addr).await?;
    let size = plan
        .tty
        .then(|| terminal::size(1).or_else(|| terminal::size(0)))
        .flatten();
    let (tx, rx) = mpsc::channel::<pb::ExecRequest>(32);
    tx.send(exec_frame(exec_request::Frame::Start(pb::ExecStart {
        target: Some(plan.target),
        argv: plan.argv,
        user: plan.user,
        env: plan.env,
        workdir: plan.workdir,
        tty: plan.tty,
        size: size.map(|(rows, cols)| pb::TerminalSize {
            rows: rows.into(),
            cols: cols.into(),
        }),
        term: std::env::var("TERM").unwrap_or_default(),
        interactive: plan.interactive,
        force: plan.force,
    })))
    .await
    .context("queueing the start frame")?;
    let mut responses = client.exec(ReceiverStream::new(rx)).await?;

    // Raw mode only once the CP accepted (a refusal prints normally).
    let _raw = if plan.tty && plan.interactive {
        Some(RawMode::enter(0).context("putting the terminal in raw mode")?)
    } else {
        None
    };
    if plan.interactive {
        pump_stdin(tx.clone());
    }
    let mut sigs = Vec::new();
    for (kind, signo) in [
        (SignalKind::interrupt(), libc::SIGINT),
        (SignalKind::quit(), libc::SIGQUIT),
        (SignalKind::terminate(), libc::SIGTERM),
        (SignalKind::hangup(), libc::SIGHUP),
        (SignalKind::user_defined1(), libc::SIGUSR1),
        (SignalKind::user_defined2(), libc::SIGUSR2),
        (SignalKind::window_change(), libc::SIGWINCH),
    ] {
        sigs.push((signal(kind).context("installing signal handlers")?, signo));
    }
    let (sig_tx, mut sig_rx) = mpsc::unbounded_channel::<i32>();
    for (mut s, signo) in sigs {
        let sig_tx = sig_tx.clone();
        tokio::spawn(async move {
            while s.recv().await.is_some() {
                if sig_tx.send(signo).is_err() {
                    return;
                }
            }
        });
    }
    let mut stdout = tokio::io::stdout();
    let mut stderr = tokio::io::stderr();
    let mut leave_at: Option<(tokio::time::Instant, i32)> = None;
    loop {
        tokio::select! {
            r = responses.message() => match r {
                Ok(Some(pb::ExecResponse { frame: Some(f) })) => match f {
                    exec_response::Frame::Started(_) => {}
                    exec_response::Frame::Stdout(d) => {
                        stdout.write_all(&d).await?;
                        stdout.flush().await?;
                    }
                    exec_response::Frame::Stderr(d) => {
                        stderr.write_all(&d).await?;
                        stderr.flush().await?;
                    }
                    exec_response::Frame::Exit(e) => {
                        drop(_raw);
                        if !e.error.is_empty() {
                            eprintln!("clawker: {}", e.error);
                        }
                        return Ok(e.code);
                    }
                },
                Ok(Some(_)) => {}
                Ok(None) => {
                    drop(_raw);
                    eprintln!("clawker: the control plane ended the exec without an exit status");
                    return Ok(EXIT_UNKNOWN);
                }
                Err(status) => {
                    drop(_raw);
                    if status.code() == tonic::Code::FailedPrecondition
                        || status.code() == tonic::Code::NotFound
                        || status.code() == tonic::Code::InvalidArgument
                    {
                        bail!("{}", status.message());
                    }
                    eprintln!("clawker: exec broken: {} ({:?})", status.message(), status.code());
                    return Ok(EXIT_UNKNOWN);
                }
            },
            Some(signo) = sig_rx.recv() => {
                if signo == libc::SIGWINCH {
                    if plan.tty && let Some((rows, cols)) = terminal::size(1).or_else(|| terminal::size(0)) {
                        let _ = tx.send(exec_frame(exec_request::Frame::Resize(pb::TerminalSize {
                            rows: rows.into(),
                            cols: cols.into(),
                        }))).await;
                    }
                    continue;
                }
                let _ = tx.send(exec_frame(exec_request::Frame::Signal(signo))).await;
                if (signo == libc::SIGTERM || signo == libc::SIGHUP) && leave_at.is_none() {
                    leave_at = Some((tokio::time::Instant::now() + SIGNAL_EXIT_GRACE, 128 + signo));
                }
            }
            _ = async {
                match leave_at {
                    Some((t, _)) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            } => {
                // Told to go: the terminal is restored on the way out.
                return Ok(leave_at.map(|(_, code)| code).unwrap_or(EXIT_UNKNOWN));
            }
        }
    }
}

pub async fn logs(state_dir: &Path, admin_addr: &str, a: LogsArgs) -> anyhow::Result<i32> {
    let client = connect(state_dir, admin_addr).await?;
    let mut stream = client
        .logs(pb::LogsRequest {
            target: Some(target(&a.name, &a.project)),
            follow: a.follow,
            tail_bytes: a.tail,
        })
        .await?;
    let mut out = tokio::io::stdout();
    while let Some(chunk) = stream
        .message()
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
    {
        out.write_all(&chunk.data).await?;
        out.flush().await?;
    }
    Ok(0)
}

/// The next message of a server stream, its error status as the message.
async fn next<T>(s: &mut tonic::Streaming<T>) -> anyhow::Result<Option<T>> {
    s.message()
        .await
        .map_err(|st| anyhow::anyhow!("{}", st.message()))
}

/// One side of `cp`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CpEnd {
    Agent {
        name: String,
        path: String,
    },
    Local(PathBuf),
    /// `-`: a tar stream on stdin/stdout.
    Stream,
}

/// `NAME:PATH` is the agent's (as with docker cp, a local path with a
/// colon is written `./a:b`); `-` is a tar stream; anything else local.
pub fn parse_cp_end(s: &str) -> CpEnd {
    if s == "-" {
        return CpEnd::Stream;
    }
    if let Some((name, path)) = s.split_once(':')
        && !name.is_empty()
        && !name.contains('/')
    {
        return CpEnd::Agent {
            name: name.to_owned(),
            path: path.to_owned(),
        };
    }
    CpEnd::Local(PathBuf::from(s))
}

pub async fn cp(state_dir: &Path, admin_addr: &str, a: CpArgs) -> anyhow::Result<i32> {
    match (parse_cp_end(&a.src), parse_cp_end(&a.dst)) {
        (CpEnd::Agent { name, path }, dst @ (CpEnd::Local(_) | CpEnd::Stream)) => {
            let client = connect(state_dir, admin_addr).await?;
            copy_out(&client, target(&name, &a.project), path, a.force, dst).await?;
        }
        (src @ (CpEnd::Local(_) | CpEnd::Stream), CpEnd::Agent { name, path }) => {
            let client = connect(state_dir, admin_addr).await?;
            copy_in(&client, target(&name, &a.project), src, path, a.force).await?;
        }
        (CpEnd::Agent { .. }, CpEnd::Agent { .. }) => {
            bail!("copying between two agents is not supported (copy through the host)")
        }
        _ => bail!("one of SRC and DST must be NAME:PATH (an agent's path)"),
    }
    Ok(0)
}

/// Agent → host: the tar stream, unpacked safely (never outside DST,
/// symlinks never followed, setuid/setgid bits dropped) or passed to
/// stdout raw.
async fn copy_out(
    client: &AdminClient,
    target: pb::AgentTarget,
    path: String,
    force: bool,
    dst: CpEnd,
) -> anyhow::Result<()> {
    let mut stream = client
        .copy_from(pb::CopyFromRequest {
            target: Some(target),
            path,
            force,
        })
        .await?;
    let dst = match dst {
        CpEnd::Local(p) => p,
        _ => {
            let mut out = tokio::io::stdout();
            while let Some(c) = next(&mut stream).await? {
                out.write_all(&c.data).await?;
            }
            out.flush().await?;
            return Ok(());
        }
    };
    let (dir, rename) = if dst.is_dir() {
        (dst.clone(), None)
    } else {
        let parent = match dst.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
            _ => PathBuf::from("."),
        };
        if !parent.is_dir() {
            bail!("{}: no such directory", parent.display());
        }
        let name = dst
            .file_name()
            .with_context(|| format!("{}: names no file", dst.display()))?
            .to_string_lossy()
            .into_owned();
        (parent, Some(name))
    };
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let opts = UnpackOptions {
        owner: if root { Owner::Preserve } else { Owner::Caller },
        rename_top: rename,
        strip_setid: true,
    };
    let (chunks_tx, chunks_rx) = std::sync::mpsc::sync_channel::<Bytes>(8);
    let unpacker = tokio::task::spawn_blocking(move || {
        archive::unpack(archive::ChunkReader::new(chunks_rx, |_| {}), &dir, &opts)
    });
    let fed: anyhow::Result<()> = async {
        while let Some(c) = next(&mut stream).await? {
            let tx = chunks_tx.clone();
            // A full channel blocks: do it off the runtime thread.
            let sent = tokio::task::spawn_blocking(move || tx.send(c.data)).await?;
            if sent.is_err() {
                break; // the unpacker stopped (its error follows)
            }
        }
        Ok(())
    }
    .await;
    drop(chunks_tx);
    let stats = unpacker.await.context("unpacker")??;
    fed?;
    if stats.skipped > 0 {
        eprintln!("clawker: skipped {} device/FIFO entries", stats.skipped);
    }
    Ok(())
}

/// Host → agent: packs SRC (or forwards a tar from stdin) after the CP
/// said where it lands.
async fn copy_in(
    client: &AdminClient,
    target: pb::AgentTarget,
    src: CpEnd,
    path: String,
    force: bool,
) -> anyhow::Result<()> {
    let (tx, rx) = mpsc::channel::<pb::CopyToRequest>(8);
    let frame = |f| pb::CopyToRequest { frame: Some(f) };
    tx.send(frame(copy_to_request::Frame::Start(pb::CopyToStart {
        target: Some(target),
        dest_path: path,
        force,
    })))
    .await?;
    if let CpEnd::Local(p) = &src {
        std::fs::symlink_metadata(p).with_context(|| format!("{}", p.display()))?;
    }
    let mut responses = client.copy_to(ReceiverStream::new(rx)).await?;
    let ready = match next(&mut responses).await? {
        Some(pb::CopyToResponse {
            frame: Some(copy_to_response::Frame::Ready(r)),
        }) => r,
        other => bail!("the control plane answered {other:?} instead of CopyToReady"),
    };
    let producer = {
        let tx = tx.clone();
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            let send = |b: Bytes| {
                tx.blocking_send(frame(copy_to_request::Frame::Data(b)))
                    .map_err(|_| std::io::Error::from(std::io::ErrorKind::BrokenPipe))
            };
            match src {
                CpEnd::Local(p) => {
                    let name = if ready.name.is_empty() {
                        p.file_name()
                            .map(|n| n.to_string_lossy().into_owned())
                            .with_context(|| format!("{}: names no file", p.display()))?
                    } else {
                        ready.name.clone()
                    };
                    let mut w = archive::ChunkWriter::new(TAR_CHUNK, send);
                    archive::pack(&p, &name, &mut w)?;
                    w.flush()?;
                }
                _ => {
                    let mut stdin = std::io::stdin().lock();
                    let mut buf = vec![0u8; TAR_CHUNK];
                    loop {
                        let n = stdin.read(&mut buf)?;
                        if n == 0 {
                            break;
                        }
                        send(Bytes::copy_from_slice(&buf[..n]))?;
                    }
                }
            }
            tx.blocking_send(frame(copy_to_request::Frame::End(pb::CopyToEnd {})))
                .map_err(|_| anyhow::anyhow!("the control plane closed the copy"))?;
            Ok(())
        })
    };
    drop(tx);
    let done = next(&mut responses).await;
    let produced = producer.await.context("packer")?;
    match done? {
        Some(pb::CopyToResponse {
            frame: Some(copy_to_response::Frame::Done(_)),
        }) => produced,
        other => {
            produced?;
            bail!("the copy ended without confirmation ({other:?})")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cp_ends_follow_docker_cp() {
        assert_eq!(
            parse_cp_end("alpha:/tmp/x"),
            CpEnd::Agent {
                name: "alpha".into(),
                path: "/tmp/x".into()
            }
        );
        assert_eq!(parse_cp_end("./a:b"), CpEnd::Local("./a:b".into()));
        assert_eq!(parse_cp_end("/abs/a:b"), CpEnd::Local("/abs/a:b".into()));
        assert_eq!(parse_cp_end("-"), CpEnd::Stream);
        assert_eq!(parse_cp_end("plain"), CpEnd::Local("plain".into()));
    }

    #[test]
    fn env_flags_take_values_or_the_local_environment() {
        let env = parse_env(&["A=1".into(), "B=".into(), "PATH".into()]).unwrap();
        assert_eq!(env["A"], "1");
        assert_eq!(env["B"], "");
        assert!(env.contains_key("PATH"));
        assert!(parse_env(&["=x".into()]).is_err());
    }
}
