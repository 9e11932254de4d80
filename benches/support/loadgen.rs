//! A load generator that plays the clawkerd side of the Session protocol
//! for many agents at once, over real mTLS: N TCP listeners in one process
//! on N loopback addresses (127.77.x.y:7700), each with its own agent leaf
//! minted by a fresh CA, each verifying the CP's client certificate with
//! the same pinned-CN verifier clawkerd uses. It answers Hello with an
//! empty HelloAck and a ShellCommand with Started + Done{0} (it runs
//! nothing). Everything on the CP side stays real.
//!
//! It runs as a child process (the bench binary re-executed with
//! `CLAWKER_LOADGEN=<dir>`), so the CP's RSS, CPU and heap profile are the
//! CP's alone. Why a stand-in at all: N real clawkerd processes stop
//! scaling on 2 cores long before the CP does.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command as Process, Stdio};
use std::sync::Arc;

use clawker::identity::{AgentName, ProjectSlug};
use clawker::listen::ListenerLimits;
use clawker::proto::clawkerd::v1::{self as pb, command, response};
use futures::StreamExt;
use tokio::sync::mpsc;

pub const LOADGEN_ENV: &str = "CLAWKER_LOADGEN";

/// The loopback address of agent `i`.
pub fn agent_addr(i: usize) -> SocketAddr {
    SocketAddr::from(([127, 77, (i / 250) as u8, (i % 250 + 1) as u8], 7700))
}

/// Container id of agent `i`.
pub fn agent_id(i: usize) -> String {
    format!("{i:08x}")
}

/// Agents per generator process: each agent costs it two descriptors
/// (listener + connection) and the hard RLIMIT_NOFILE here is 20,000.
const AGENTS_PER_PROCESS: usize = 4000;

/// The parent's handle: the child processes and the CP-side material.
/// Dropping it kills the children.
pub struct LoadGen {
    children: Vec<Child>,
    _dir: tempfile::TempDir,
    pub ca_pem: Vec<u8>,
    pub cp_cert_pem: Vec<u8>,
    pub cp_key_pem: Vec<u8>,
    pub n: usize,
}

impl LoadGen {
    /// Starts the children (one CA for all, made here) and waits until
    /// all `n` listeners are bound.
    pub fn spawn(n: usize) -> LoadGen {
        let dir = tempfile::tempdir().unwrap();
        clawker::pki::AuthMaterial::ensure(dir.path()).unwrap();
        let paths = clawker::pki::AuthPaths::new(dir.path());
        let mut children = Vec::new();
        for start in (0..n).step_by(AGENTS_PER_PROCESS) {
            let end = (start + AGENTS_PER_PROCESS).min(n);
            let mut child = Process::new(std::env::current_exe().unwrap())
                .env(LOADGEN_ENV, dir.path())
                .env("CLAWKER_LOADGEN_RANGE", format!("{start}..{end}"))
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("spawn load generator");
            let mut out = BufReader::new(child.stdout.take().unwrap());
            let mut line = String::new();
            out.read_line(&mut line).unwrap();
            assert_eq!(line.trim(), "ready", "load generator: {line:?}");
            children.push(child);
        }
        let read = |p: PathBuf| std::fs::read(p).unwrap();
        LoadGen {
            ca_pem: read(paths.ca_cert()),
            cp_cert_pem: read(paths.cp_client_cert()),
            cp_key_pem: read(paths.cp_client_key()),
            children,
            _dir: dir,
            n,
        }
    }

    pub fn pid(&self) -> u32 {
        self.children.first().map(Child::id).unwrap_or(0)
    }

    pub fn processes(&self) -> usize {
        self.children.len()
    }
}

impl Drop for LoadGen {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// If this process is a load generator child, runs it and exits.
pub fn child_main_if_requested() {
    let Some(dir) = std::env::var_os(LOADGEN_ENV) else {
        return;
    };
    let range = std::env::var("CLAWKER_LOADGEN_RANGE").unwrap_or_default();
    let (start, end) = range.split_once("..").unwrap_or(("0", "0"));
    let range: std::ops::Range<usize> = start.parse().unwrap()..end.parse().unwrap();
    raise_fd_limit_to(2 * range.len() as u64 + 1024);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(serve(PathBuf::from(dir), range));
    std::process::exit(0);
}

/// Raises RLIMIT_NOFILE for this process to `want` (as root, past the
/// hard limit) or at least to the hard limit. The load generator needs two
/// descriptors per agent (listener + connection); the CP in this process
/// one per session (the real CP raises its own limit).
pub fn raise_fd_limit_to(want: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return;
        }
        let raised = libc::rlimit {
            rlim_cur: want.max(lim.rlim_cur),
            rlim_max: want.max(lim.rlim_max),
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) != 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

pub fn raise_fd_limit() {
    raise_fd_limit_to(0);
}

async fn serve(dir: PathBuf, range: std::ops::Range<usize>) {
    let paths = clawker::pki::AuthPaths::new(&dir);
    let read = |p: PathBuf| std::fs::read_to_string(p).unwrap();
    let ca = clawker::pki::Ca::load(&read(paths.ca_cert()), &read(paths.ca_key())).unwrap();
    let (tx, rx) = mpsc::channel(1024);
    let (project, agent) = (ProjectSlug::new("p").unwrap(), AgentName::new("a").unwrap());
    for i in range {
        let leaf = ca.mint_agent(&project, &agent, &agent_id(i)).unwrap();
        let current = clawker::clawkerd::leaf::CurrentLeaf::new(
            clawker::clawkerd::leaf::Leaf::from_pem(
                leaf.cert_pem.as_bytes(),
                leaf.key_pem.as_bytes(),
            )
            .unwrap(),
        );
        let cfg =
            clawker::clawkerd::listener::server_config(ca.cert_pem().as_bytes(), &current).unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
        let tcp = tokio::net::TcpListener::bind(agent_addr(i))
            .await
            .unwrap_or_else(|e| panic!("bind {}: {e}", agent_addr(i)));
        tokio::spawn(accept(tcp, acceptor, tx.clone()));
    }
    drop(tx);
    println!("ready");
    let _ = std::io::stdout().flush();
    // The parent closes our stdin (or dies): stop.
    tokio::task::spawn_blocking(|| {
        let mut sink = String::new();
        let _ = std::io::stdin().read_line(&mut sink);
        std::process::exit(0);
    });
    let incoming = tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok::<_, std::io::Error>);
    // The same HTTP/2 settings as clawkerd's listener (its keepalive pings
    // reach the CP too).
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(ListenerLimits::CLAWKERD.keepalive_interval))
        .http2_keepalive_timeout(Some(ListenerLimits::CLAWKERD.keepalive_timeout))
        .max_frame_size(Some(1 << 20))
        .initial_stream_window_size(Some(8 << 20))
        .initial_connection_window_size(Some(16 << 20))
        .add_service(pb::clawkerd_service_server::ClawkerdServiceServer::new(
            Fake,
        ))
        .serve_with_incoming(incoming)
        .await
        .unwrap();
}

type Tls = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;

async fn accept(
    tcp: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    tx: mpsc::Sender<Tls>,
) {
    loop {
        let Ok((sock, _)) = tcp.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            continue;
        };
        let _ = sock.set_nodelay(true);
        let (acceptor, tx) = (acceptor.clone(), tx.clone());
        tokio::spawn(async move {
            if let Ok(s) = acceptor.accept(sock).await {
                let _ = tx.send(s).await;
            }
        });
    }
}

struct Fake;

#[tonic::async_trait]
impl pb::clawkerd_service_server::ClawkerdService for Fake {
    type SessionStream =
        tokio_stream::wrappers::ReceiverStream<Result<pb::Response, tonic::Status>>;

    async fn session(
        &self,
        request: tonic::Request<tonic::Streaming<pb::Command>>,
    ) -> Result<tonic::Response<Self::SessionStream>, tonic::Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(8);
        tokio::spawn(async move {
            let reply = |id: &str, p| {
                Ok(pb::Response {
                    command_id: id.to_owned(),
                    payload: Some(p),
                })
            };
            while let Some(Ok(c)) = inbound.next().await {
                let id = c.command_id.as_str();
                let out: Vec<response::Payload> = match c.payload {
                    Some(command::Payload::Hello(_)) => {
                        vec![response::Payload::HelloAck(pb::HelloAck::default())]
                    }
                    Some(command::Payload::Shell(_)) => vec![
                        response::Payload::Started(pb::Started {}),
                        response::Payload::Done(pb::Done { final_exit_code: 0 }),
                    ],
                    _ => Vec::new(),
                };
                for p in out {
                    if tx.send(reply(id, p)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(tonic::Response::new(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        ))
    }
}
