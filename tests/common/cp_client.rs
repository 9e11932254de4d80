//! The CP side of a clawkerd connection: a client that dials like the CP
//! does (TLS 1.3, CP client cert, [`PermissiveServerVerifier`]) and opens
//! `Session` streams; [`Session::run`] collects one command's responses
//! into an [`Outcome`]. Also the command builders ([`hello`], [`shell`],
//! [`stdin`], [`close_stdin`], [`signal`], [`stage`], …).

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clawker::pki::CertifiedKey;
use clawker::proto::clawkerd::v1::{
    self as pb, Command, PipeStage, Response, ShellCommand,
    clawkerd_service_client::ClawkerdServiceClient, command::Payload as Cmd,
    response::Payload as Resp,
};
use clawker::tls::{self, PeerInfo, PermissiveServerVerifier};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::TlsConnector;
use tonic::Streaming;
use tonic::transport::{Channel, Endpoint};

use super::TestPki;

/// A TLS client config for probing clawkerd: optional client identity,
/// chosen protocol versions, ALPN h2, permissive server verification.
pub fn client_config(
    ca_pem: &str,
    identity: Option<&CertifiedKey>,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> (rustls::ClientConfig, Arc<PermissiveServerVerifier>) {
    let roots = Arc::new(tls::root_store("ca", ca_pem.as_bytes()).unwrap());
    let verifier = PermissiveServerVerifier::new(roots);
    let builder = rustls::ClientConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(versions)
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone());
    let mut cfg = match identity {
        Some(id) => builder
            .with_client_auth_cert(
                tls::load_certs("cert", id.cert_pem.as_bytes()).unwrap(),
                tls::load_key("key", id.key_pem.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    (cfg, verifier)
}

/// A TCP connection to `addr`, from `src` when given (bind before
/// connect: loopback aliases stand in for distinct peers).
pub async fn connect_tcp(
    addr: SocketAddr,
    src: Option<std::net::IpAddr>,
) -> std::io::Result<TcpStream> {
    match src {
        None => TcpStream::connect(addr).await,
        Some(ip) => {
            let sock = tokio::net::TcpSocket::new_v4()?;
            sock.bind(SocketAddr::new(ip, 0))?;
            sock.connect(addr).await
        }
    }
}

/// The CP side of a clawkerd connection.
pub struct CpClient {
    client: ClawkerdServiceClient<Channel>,
    verifier: Arc<PermissiveServerVerifier>,
}

impl CpClient {
    /// Dials as the CP (CP client cert, TLS 1.3).
    pub async fn connect(addr: SocketAddr, pki: &TestPki) -> Result<Self, String> {
        let (cfg, verifier) = client_config(
            pki.ca.cert_pem(),
            Some(&pki.cp_client),
            &[&rustls::version::TLS13],
        );
        Self::connect_with(addr, cfg, verifier).await
    }

    /// Dials as the CP from source address `src` (a loopback alias), as
    /// the real CP dials from its network's gateway.
    pub async fn connect_from(
        addr: SocketAddr,
        src: std::net::IpAddr,
        pki: &TestPki,
    ) -> Result<Self, String> {
        let (cfg, verifier) = client_config(
            pki.ca.cert_pem(),
            Some(&pki.cp_client),
            &[&rustls::version::TLS13],
        );
        Self::dial(addr, Some(src), cfg, verifier).await
    }

    /// Dials with an arbitrary TLS config (bad-peer tests).
    pub async fn connect_with(
        addr: SocketAddr,
        cfg: rustls::ClientConfig,
        verifier: Arc<PermissiveServerVerifier>,
    ) -> Result<Self, String> {
        Self::dial(addr, None, cfg, verifier).await
    }

    async fn dial(
        addr: SocketAddr,
        src: Option<std::net::IpAddr>,
        cfg: rustls::ClientConfig,
        verifier: Arc<PermissiveServerVerifier>,
    ) -> Result<Self, String> {
        let cfg = Arc::new(cfg);
        let connector = tower::service_fn(move |_uri: http::Uri| {
            let cfg = cfg.clone();
            async move {
                let tcp = connect_tcp(addr, src).await?;
                tcp.set_nodelay(true)?;
                let name = ServerName::try_from("clawker-controlplane").unwrap();
                let tls = TlsConnector::from(cfg).connect(name, tcp).await?;
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        });
        let channel = Endpoint::from_static("http://clawkerd.test")
            .initial_stream_window_size(Some(8 << 20))
            .initial_connection_window_size(Some(16 << 20))
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(5))
            .connect_with_connector(connector)
            .await
            .map_err(|e| format!("{e:?}"))?;
        Ok(Self {
            client: ClawkerdServiceClient::new(channel),
            verifier,
        })
    }

    /// What the permissive verifier recorded about clawkerd's certificate.
    pub fn peer(&self) -> Option<PeerInfo> {
        self.verifier.peer()
    }

    /// Opens a `Session` stream.
    pub async fn open_session(&mut self) -> Result<Session, tonic::Status> {
        let (tx, rx) = mpsc::channel::<Command>(1024);
        let inbound = tokio_stream::wrappers::ReceiverStream::new(rx);
        let resp = self.client.session(inbound).await?;
        Ok(Session {
            tx: Some(tx),
            rx: resp.into_inner(),
            pending: HashMap::new(),
        })
    }
}

/// One open `Session`: send Commands, read Responses.
pub struct Session {
    tx: Option<mpsc::Sender<Command>>,
    rx: Streaming<Response>,
    /// Responses read while waiting for another id.
    pending: HashMap<String, VecDeque<Response>>,
}

/// Default wait for one response.
pub const RECV_TIMEOUT: Duration = Duration::from_secs(15);

impl Session {
    pub async fn send(&self, cmd: Command) {
        if let Some(tx) = &self.tx {
            tx.send(cmd).await.expect("session send");
        }
    }

    /// Half-closes the CP's send side (clawkerd then tears the session down).
    pub fn close_send(&mut self) {
        self.tx = None;
    }

    /// Next response from the wire (any id), or the stream's end / error.
    pub async fn next_raw(&mut self, timeout: Duration) -> Result<Option<Response>, String> {
        match tokio::time::timeout(timeout, self.rx.message()).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(s)) => Err(format!("{:?}: {}", s.code(), s.message())),
            Err(_) => Err("timeout".into()),
        }
    }

    /// Next response for `id`, buffering other ids' responses.
    pub async fn next_for(&mut self, id: &str, timeout: Duration) -> Result<Response, String> {
        if let Some(r) = self.pending.get_mut(id).and_then(VecDeque::pop_front) {
            return Ok(r);
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_raw(left).await? {
                Some(r) if r.command_id == id => return Ok(r),
                Some(r) => self
                    .pending
                    .entry(r.command_id.clone())
                    .or_default()
                    .push_back(r),
                None => return Err("stream ended".into()),
            }
        }
    }

    /// Every response for `id` up to and including its terminal one
    /// (Done, Error, RegisterDone, HelloAck).
    pub async fn collect(&mut self, id: &str, timeout: Duration) -> Result<Vec<Response>, String> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let r = self
                .next_for(id, left)
                .await
                .map_err(|e| format!("{e} after {out:?}"))?;
            let terminal = is_terminal(&r);
            out.push(r);
            if terminal {
                return Ok(out);
            }
        }
    }

    /// Runs one ShellCommand (sending CloseStdin right after, as the CP
    /// does) and returns its outcome.
    pub async fn run(&mut self, id: &str, cmd: ShellCommand) -> Outcome {
        self.send(shell(id, cmd)).await;
        self.send(close_stdin(id)).await;
        let responses = self
            .collect(id, Duration::from_secs(60))
            .await
            .expect("collect");
        Outcome::from(responses)
    }

    /// Sends one command (no stdin) and collects its outcome.
    pub async fn run_cmd(&mut self, id: &str, payload: Cmd) -> Outcome {
        self.send(cmd(id, payload)).await;
        let responses = self
            .collect(id, Duration::from_secs(60))
            .await
            .expect("collect");
        Outcome::from(responses)
    }

    /// Asserts that nothing arrives for `id` within `wait`.
    pub async fn expect_silence(&mut self, id: &str, wait: Duration) {
        if let Ok(r) = self.next_for(id, wait).await {
            panic!("unexpected response for {id}: {r:?}");
        }
    }
}

pub fn is_terminal(r: &Response) -> bool {
    matches!(
        r.payload,
        Some(Resp::Done(_) | Resp::Error(_) | Resp::RegisterDone(_) | Resp::HelloAck(_))
    )
}

/// A finished command, decoded.
#[derive(Debug, Default)]
pub struct Outcome {
    pub responses: Vec<Response>,
    pub stdout: Vec<u8>,
    pub stderr: HashMap<u32, Vec<u8>>,
    /// (stage_index, exit_code, signo) in arrival order.
    pub exits: Vec<(u32, i32, i32)>,
    pub done: Option<i32>,
    pub error: Option<pb::Error>,
}

impl From<Vec<Response>> for Outcome {
    fn from(responses: Vec<Response>) -> Self {
        let mut o = Outcome::default();
        for r in &responses {
            match &r.payload {
                Some(Resp::Stdout(c)) => o.stdout.extend(&c.data),
                Some(Resp::Stderr(c)) => o.stderr.entry(c.stage_index).or_default().extend(&c.data),
                Some(Resp::StageExit(e)) => o.exits.push((e.stage_index, e.exit_code, e.signo)),
                Some(Resp::Done(d)) => o.done = Some(d.final_exit_code),
                Some(Resp::Error(e)) => o.error = Some(e.clone()),
                _ => {}
            }
        }
        o.responses = responses;
        o
    }
}

impl Outcome {
    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// Asserts the reference order: Started first, exactly one terminal, last.
    pub fn assert_well_formed(&self) {
        assert!(
            matches!(
                self.responses.first().and_then(|r| r.payload.as_ref()),
                Some(Resp::Started(_))
            ),
            "first response must be Started: {:?}",
            self.responses
        );
        let terminals = self.responses.iter().filter(|r| is_terminal(r)).count();
        assert_eq!(terminals, 1, "exactly one terminal: {:?}", self.responses);
        assert!(is_terminal(self.responses.last().unwrap()));
    }
}

// ---- command builders ----------------------------------------------------

pub fn cmd(id: &str, payload: Cmd) -> Command {
    Command {
        command_id: id.to_owned(),
        payload: Some(payload),
    }
}

pub fn hello(id: &str) -> Command {
    cmd(id, Cmd::Hello(pb::Hello {}))
}

pub fn shell(id: &str, sc: ShellCommand) -> Command {
    cmd(id, Cmd::Shell(sc))
}

pub fn stdin(id: &str, data: &[u8]) -> Command {
    cmd(
        id,
        Cmd::Stdin(pb::Stdin {
            data: data.to_vec().into(),
        }),
    )
}

pub fn close_stdin(id: &str) -> Command {
    cmd(id, Cmd::CloseStdin(pb::CloseStdin {}))
}

pub fn signal(id: &str, signo: i32) -> Command {
    cmd(id, Cmd::Signal(pb::Signal { signo }))
}

pub fn agent_ready(id: &str) -> Command {
    cmd(id, Cmd::AgentReady(pb::AgentReady {}))
}

pub fn register_required(id: &str) -> Command {
    cmd(id, Cmd::RegisterRequired(pb::RegisterRequired {}))
}

/// One pipeline stage running as root.
pub fn stage(argv: &[&str]) -> PipeStage {
    PipeStage {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// `sh -c <script>` as a single-stage command.
pub fn sh(script: &str) -> ShellCommand {
    pipeline(vec![stage(&["/bin/sh", "-c", script])])
}

pub fn pipeline(stages: Vec<PipeStage>) -> ShellCommand {
    ShellCommand {
        stages,
        ..Default::default()
    }
}
