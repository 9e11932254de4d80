//! Shared helpers for tests that talk to a real `clawkerd` process over
//! real mTLS on loopback. The CP session tests reuse them.
//!
//! - [`TestPki`]: a fresh CA, the CP client cert, an agent leaf and a
//!   bootstrap dir (plus passwd/group files) in a tempdir.
//! - [`Clawkerd`]: the real binary as a child process, listening on
//!   `127.0.0.1:0`; its JSON log lines (stderr) are captured so tests can
//!   assert audit events; the bound address is read from the
//!   `clawkerd_listener_started` line.
//! - [`CpClient`] / [`Session`]: a CP-side client that dials like the CP
//!   does (TLS 1.3, CP client cert, [`PermissiveServerVerifier`]) and opens
//!   `Session` streams; [`Session::run`] collects one command's responses.
//! - Command builders: [`hello`], [`shell`], [`stdin`], [`close_stdin`],
//!   [`signal`], [`stage`], …

#![allow(dead_code)]

use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command as Process, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clawker::identity::{AgentName, ProjectSlug};
use clawker::pki::{self, Ca, CertifiedKey, LeafSpec};
use clawker::proto::clawkerd::v1::{
    self as pb, Command, PipeStage, Response, ShellCommand,
    clawkerd_service_client::ClawkerdServiceClient, command::Payload as Cmd,
    response::Payload as Resp,
};
use clawker::tls::{self, PeerInfo, PermissiveServerVerifier};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use serde_json::Value;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::TlsConnector;
use tonic::Streaming;
use tonic::transport::{Channel, Endpoint};

pub const AGENT: &str = "dev";
pub const PROJECT: &str = "web";
/// uid/gid of `claude` in the test passwd file.
pub const CLAUDE_UID: u32 = 1001;

/// CA, CP client cert, agent leaf and a bootstrap dir in a tempdir.
pub struct TestPki {
    pub dir: tempfile::TempDir,
    pub ca: Ca,
    pub cp_client: CertifiedKey,
    pub agent: CertifiedKey,
    pub container_id: String,
    pub bootstrap_dir: PathBuf,
    pub passwd: PathBuf,
    pub group: PathBuf,
    /// World-writable scratch dir (the user command runs as uid 1001).
    pub scratch: PathBuf,
}

impl TestPki {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = Ca::generate().expect("ca");
        let cp_client = ca.mint_cp_client().expect("cp client");
        let container_id = "0123456789abcdef".to_owned();
        let agent = ca
            .mint_agent(
                &ProjectSlug::new(PROJECT).unwrap(),
                &AgentName::new(AGENT).unwrap(),
                &container_id,
            )
            .expect("agent leaf");
        let bootstrap_dir = dir.path().join("bootstrap");
        pki::write_bootstrap(&bootstrap_dir, &agent, ca.cert_pem()).expect("bootstrap");
        std::fs::write(
            bootstrap_dir.join(pki::bootstrap::ASSERTION),
            "test-assertion-jwt\n",
        )
        .unwrap();
        let passwd = dir.path().join("passwd");
        std::fs::write(
            &passwd,
            "root:x:0:0:root:/root:/bin/sh\nclaude:x:1001:1001::/home/claude:/bin/sh\nnobody:x:65534:65534::/nonexistent:/bin/false\n",
        )
        .unwrap();
        let group = dir.path().join("group");
        std::fs::write(&group, "root:x:0:\nclaude:x:1001:\nwheel:x:10:claude\n").unwrap();
        let scratch = dir.path().join("scratch");
        std::fs::create_dir(&scratch).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&scratch, std::fs::Permissions::from_mode(0o777)).unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        Self {
            dir,
            ca,
            cp_client,
            agent,
            container_id,
            bootstrap_dir,
            passwd,
            group,
            scratch,
        }
    }

    /// A leaf signed by this CA from an arbitrary spec (bad-peer tests).
    pub fn issue(&self, spec: &LeafSpec) -> CertifiedKey {
        self.ca.issue(spec).expect("issue")
    }
}

/// Captured clawkerd log lines (parsed JSON; non-JSON lines as `{"raw":…}`).
#[derive(Clone, Default)]
pub struct Logs(Arc<Mutex<Vec<Value>>>);

impl Logs {
    pub fn all(&self) -> Vec<Value> {
        self.0.lock().unwrap().clone()
    }

    /// Every line whose `event` field equals `name`.
    pub fn events(&self, name: &str) -> Vec<Value> {
        self.all()
            .into_iter()
            .filter(|v| v.get("event").and_then(Value::as_str) == Some(name))
            .collect()
    }

    pub fn count(&self, name: &str) -> usize {
        self.events(name).len()
    }

    /// Waits (blocking) up to `timeout` for an event.
    pub fn wait_for(&self, name: &str, timeout: Duration) -> Option<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = self.events(name).into_iter().next() {
                return Some(v);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Async variant of [`Logs::wait_for`] for tokio tests.
    /// Blocking: waits until at least `count` lines named `name` arrived
    /// (clawkerd's log lines reach us asynchronously, via a reader thread).
    pub fn wait_count(&self, name: &str, count: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.count(name) < count {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }

    pub async fn wait_for_async(&self, name: &str, count: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.count(name) >= count {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.count(name) >= count
    }
}

/// Options for [`Clawkerd::spawn_with`].
#[derive(Default, Clone)]
pub struct Opts {
    /// Extra environment (overrides the defaults below).
    pub env: Vec<(String, String)>,
    /// The user command (clawkerd's arguments).
    pub args: Vec<String>,
    /// Do not wait for the listener (boot-failure tests).
    pub no_wait: bool,
}

/// A running clawkerd child process. Killed (SIGKILL) on drop.
pub struct Clawkerd {
    pub child: Child,
    pub addr: SocketAddr,
    pub logs: Logs,
    pub stdout: Arc<Mutex<String>>,
}

impl Clawkerd {
    pub fn spawn(pki: &TestPki) -> Self {
        Self::spawn_with(pki, Opts::default())
    }

    pub fn spawn_with(pki: &TestPki, opts: Opts) -> Self {
        let mut cmd = Process::new(env!("CARGO_BIN_EXE_clawkerd"));
        cmd.args(&opts.args)
            .env("CLAWKER_AGENT", AGENT)
            .env("CLAWKER_PROJECT", PROJECT)
            .env("CLAWKER_BOOTSTRAP_DIR", &pki.bootstrap_dir)
            .env("CLAWKER_LISTEN_ADDR", "127.0.0.1:0")
            .env("CLAWKER_PASSWD_FILE", &pki.passwd)
            .env("CLAWKER_GROUP_FILE", &pki.group)
            .env("CLAWKER_READY_FILE", pki.scratch.join("ready"))
            .env("CLAWKER_LOG_FILE", "-")
            .env_remove("CLAWKER_USER")
            .env_remove("CLAWKER_CP_TOKEN_URL")
            .env_remove("CLAWKER_CP_HYDRA_URL")
            .env_remove("CLAWKER_CP_AGENT_ADDR")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in &opts.env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn clawkerd");
        let logs = Logs::default();
        let stderr = child.stderr.take().expect("stderr");
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let v = serde_json::from_str(&line)
                    .unwrap_or_else(|_| serde_json::json!({ "raw": line }));
                if std::env::var_os("CLAWKERD_TEST_ECHO").is_some() {
                    eprintln!("clawkerd: {line}");
                }
                sink.0.lock().unwrap().push(v);
            }
        });
        let stdout_buf = Arc::new(Mutex::new(String::new()));
        let out = child.stdout.take().expect("stdout");
        let sink = stdout_buf.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        let mut me = Self {
            child,
            addr: "0.0.0.0:0".parse().unwrap(),
            logs,
            stdout: stdout_buf,
        };
        if !opts.no_wait {
            let started = me
                .logs
                .wait_for("clawkerd_listener_started", Duration::from_secs(10))
                .unwrap_or_else(|| panic!("clawkerd did not start: {:#?}", me.logs.all()));
            me.addr = started["addr"].as_str().unwrap().parse().unwrap();
        }
        me
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill with plain integers.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// Waits (blocking) for the process to exit; returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                return st.code();
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Clawkerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

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

    /// Dials with an arbitrary TLS config (bad-peer tests).
    pub async fn connect_with(
        addr: SocketAddr,
        cfg: rustls::ClientConfig,
        verifier: Arc<PermissiveServerVerifier>,
    ) -> Result<Self, String> {
        let cfg = Arc::new(cfg);
        let connector = tower::service_fn(move |_uri: http::Uri| {
            let cfg = cfg.clone();
            async move {
                let tcp = TcpStream::connect(addr).await?;
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

/// Whether a pid is gone (or a zombie about to be reaped).
pub fn pid_gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(s) => s
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

/// Polls until `pid` is gone.
pub async fn wait_pid_gone(pid: i32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if pid_gone(pid) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    pid_gone(pid)
}

/// Writes `contents` to `path` (helper for scripts).
pub fn write(path: &Path, contents: &str) {
    std::fs::write(path, contents).unwrap();
}
