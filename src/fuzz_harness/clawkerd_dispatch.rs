//! `clawkerd_dispatch`: clawkerd's session dispatcher
//! ([`crate::clawkerd::session::start`], the loop behind the `Session`
//! RPC, without TLS) fed an arbitrary sequence of `Command`s.
//!
//! The input is a list of frames, each `[L, body…]`: `L = 0` is a pause
//! (1 ms, so children get to run between commands), `L = 253` waits until
//! the last command sent got a terminal response, or a CSR (a renewal then
//! waits for the CP's `CertIssued`), at most [`SETTLE`] — at
//! most [`MAX_PAUSES`] of both per run, as they dominate a run's time —
//! `L = 254` ends the inbound stream with a transport error, `L = 255` is followed by a
//! little-endian u16 length, any other `L` is the body length. Each body is
//! decoded with prost as a `clawkerd.v1.Command`; a body that does not
//! decode is skipped.
//!
//! Before dispatch every program a command would run is rewritten to a
//! benign allow-list ([`BENIGN`]; an empty argv stays empty, to reach the
//! validation), its user to the current one, its environment cleared, its
//! working directory and every copy path into a per-run temporary
//! directory. Ids, stdin chunks (tar streams included), signals, close-stdin,
//! resize, flow grants, timeouts, Hello, Register (no CP configured: it
//! fails at once, no network), AgentReady (the user command is `true`),
//! RenewCert/CertIssued (a real renewer with a real leaf) stay as fuzzed.
//!
//! Invariants, checked after every run:
//! - no panic: none in the harness, and the session never reported one
//!   (no `INTERNAL` status, no "panic" in an `Error`);
//! - the session ends within [`END_BOUND`] of its input ending, and its
//!   response stream within [`END_BOUND`] of the CP hanging up;
//! - every response names an id the CP sent (or a renewal's own id), and
//!   no id gets more terminal responses (HelloAck, Done, Error,
//!   RegisterDone) than commands were sent with it;
//! - no child process is left behind: the process is a child subreaper
//!   ([`Reaper::start`] sets `PR_SET_CHILD_SUBREAPER`), so every
//!   descendant, orphans included, is our child, and `waitpid` must report
//!   none left (ECHILD) within [`END_BOUND`];
//! - nothing was written outside the temporary directory's known entries
//!   (`CopyTo` must not escape its destination).
//!
//! The harness reaps every child of the process (`waitpid(-1)`): whatever
//! runs it must not spawn children of its own (the fuzz binary and
//! `tests/fuzz_regressions.rs` do not).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use futures::StreamExt;
use prost::Message;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::clawkerd::config::Bootstrap;
use crate::clawkerd::leaf::{CurrentLeaf, Leaf};
use crate::clawkerd::lifecycle::{ExitRequest, InitMarker};
use crate::clawkerd::logs::OutputLog;
use crate::clawkerd::reaper::Reaper;
use crate::clawkerd::register::{Coordinator, RegisterConfig};
use crate::clawkerd::renew::Renewer;
use crate::clawkerd::session::{self, Shared};
use crate::clawkerd::spawn::UserCommand;
use crate::identity::{AgentName, ProjectSlug};
use crate::pki::Ca;
use crate::proto::clawkerd::v1::{
    self as pb, Command, Response, command::Payload as Cmd, response::Payload,
};

/// The only programs a fuzzed command may run.
pub const BENIGN: [&[&str]; 5] = [
    &["true"],
    &["echo", "x"],
    &["cat"],
    &["sleep", "0"],
    &["false"],
];

/// How long the session may take to end after its input ended, and the
/// response stream and the children after that (teardown's own grace is
/// 5 s).
pub const END_BOUND: Duration = Duration::from_secs(15);

/// Commands dispatched per run at most (each may start processes).
const MAX_COMMANDS: usize = 64;
/// Pipeline stages per command at most.
const MAX_STAGES: usize = 3;
/// What a pause frame waits (tokio's timer resolution).
const PAUSE: Duration = Duration::from_millis(1);
/// Longest wait of a settle frame.
pub const SETTLE: Duration = Duration::from_millis(200);
/// Pause and settle frames honoured per run; later ones are skipped.
pub const MAX_PAUSES: usize = 4;
/// clawkerd's PATH for the fuzzed commands.
const PATH: &str = "/usr/bin:/bin";
/// The temporary directory's entries; anything else escaped a copy.
const KNOWN_ENTRIES: [&str; 5] = ["src", "dst", "state", "work", "ready"];

struct Fixture {
    rt: tokio::runtime::Runtime,
    reaper: Reaper,
    ca_pem: String,
    leaf_cert: String,
    leaf_key: String,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        // clawkerd runs with SIGPIPE ignored (Rust's runtime sets SIG_IGN
        // before `main`), so writing stdin to a child that exited is EPIPE.
        // libFuzzer's C `main` leaves the default, which kills the whole
        // fuzzer on the first such write (found by the first long run).
        // SAFETY: setting a signal disposition to SIG_IGN.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_IGN);
        }
        // The user command (`AgentReady`) takes the terminal's foreground
        // when clawkerd's stdin is one; a fuzz run or a test must not steal
        // its caller's terminal, so stdin is /dev/null here.
        // SAFETY: isatty/open/dup2/close on descriptors we own; fd 0 is
        // replaced atomically by dup2.
        unsafe {
            if libc::isatty(0) == 1 {
                let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY);
                if null >= 0 {
                    libc::dup2(null, 0);
                    libc::close(null);
                }
            }
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let reaper = rt.block_on(async { Reaper::start() }).expect("reaper");
        let ca = Ca::generate().expect("ca");
        let leaf = ca
            .mint_agent(
                &ProjectSlug::new("fuzz").expect("slug"),
                &AgentName::new("dispatch").expect("name"),
                "fuzzcontainer",
            )
            .expect("leaf");
        Fixture {
            rt,
            reaper,
            ca_pem: ca.cert_pem().to_owned(),
            leaf_cert: leaf.cert_pem,
            leaf_key: leaf.key_pem,
        }
    })
}

/// One run's temporary directory (removed on drop).
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "clawker-fuzz-dispatch-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        for sub in ["src", "dst", "state", "work"] {
            std::fs::create_dir_all(dir.join(sub)).expect("scratch dir");
        }
        std::fs::write(dir.join("src/f"), b"fuzz\n").expect("scratch file");
        Self(dir)
    }

    fn path(&self, rel: &str) -> String {
        self.0.join(rel).display().to_string()
    }

    fn entries(&self) -> Vec<String> {
        std::fs::read_dir(&self.0)
            .expect("scratch dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One frame of the input.
#[derive(Debug)]
enum Frame {
    Pause,
    /// Wait for the last command's terminal response.
    Settle,
    Command(Command),
    /// The inbound stream fails (and so ends).
    TransportError,
}

fn frames(mut data: &[u8]) -> Vec<Frame> {
    let mut out = Vec::new();
    while let Some((&l, rest)) = data.split_first() {
        data = rest;
        let len = match l {
            0 => {
                out.push(Frame::Pause);
                continue;
            }
            253 => {
                out.push(Frame::Settle);
                continue;
            }
            254 => {
                out.push(Frame::TransportError);
                break;
            }
            255 => {
                let Some((n, rest)) = data.split_first_chunk::<2>() else {
                    break;
                };
                data = rest;
                u16::from_le_bytes(*n) as usize
            }
            n => n as usize,
        };
        let (body, rest) = data.split_at(len.min(data.len()));
        data = rest;
        if let Ok(cmd) = Command::decode(body) {
            out.push(Frame::Command(cmd));
        }
    }
    out
}

/// An allow-listed program named by `argv[0]` runs as listed; any other
/// argv picks one by its total length.
fn benign(argv: &[String]) -> Vec<String> {
    let Some(first) = argv.first() else {
        return Vec::new();
    };
    let pick = BENIGN
        .iter()
        .position(|b| b[0] == first)
        .unwrap_or_else(|| argv.iter().map(String::len).sum::<usize>() % BENIGN.len());
    BENIGN[pick].iter().map(|s| (*s).to_owned()).collect()
}

/// A fuzzed working directory → one under the scratch dir, a missing one,
/// or a relative one.
fn cwd(s: &Scratch, cwd: &str) -> String {
    match (cwd.is_empty(), cwd.len() % 3) {
        (true, _) => String::new(),
        (_, 0) => s.path("work"),
        (_, 1) => s.path("missing"),
        _ => "relative".into(),
    }
}

/// A fuzzed copy path → the scratch dir's `dir` (`src` or `dst`), its
/// file, a missing path, or a relative one.
fn copy_path(s: &Scratch, path: &str, dir: &str) -> String {
    if path.is_empty() {
        return String::new();
    }
    if !path.starts_with('/') {
        return "relative".into();
    }
    match path.rsplit('/').next() {
        Some("src") => return s.path("src"),
        Some("dst") => return s.path("dst"),
        Some("f") => return s.path("src/f"),
        _ => {}
    }
    match path.len() % 3 {
        0 => s.path(dir),
        1 => s.path("src/f"),
        _ => s.path("missing"),
    }
}

/// Rewrites what a command would run or touch (module doc).
fn sanitize(cmd: &mut Command, s: &Scratch) {
    // SAFETY: geteuid/getegid cannot fail.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    match &mut cmd.payload {
        Some(Cmd::Shell(sh)) => {
            sh.stages.truncate(MAX_STAGES);
            for st in &mut sh.stages {
                st.argv = benign(&st.argv);
                st.uid = uid;
                st.gid = gid;
                st.cwd = cwd(s, &st.cwd);
                st.env.clear();
            }
        }
        Some(Cmd::Pty(p)) => {
            p.argv = benign(&p.argv);
            p.uid = uid;
            p.gid = gid;
            p.cwd = cwd(s, &p.cwd);
            p.env.clear();
        }
        Some(Cmd::CopyFrom(c)) => c.path = copy_path(s, &c.path, "src"),
        Some(Cmd::CopyTo(c)) => {
            c.dest_dir = copy_path(s, &c.dest_dir, "dst");
            c.uid = uid;
            c.gid = gid;
        }
        _ => {}
    }
}

fn shared_for(f: &Fixture, s: &Scratch) -> Arc<Shared> {
    let leaf = CurrentLeaf::new(
        Leaf::from_pem(f.leaf_cert.as_bytes(), f.leaf_key.as_bytes()).expect("fixture leaf"),
    );
    let state = s.0.join("state");
    let register = Coordinator::new(RegisterConfig {
        // No CP: a RegisterRequired fails at once, without any network.
        token_url: String::new(),
        agent_addr: String::new(),
        agent: "dispatch".into(),
        project: "fuzz".into(),
        bootstrap: Bootstrap {
            cert_pem: f.leaf_cert.clone().into_bytes(),
            key_pem: f.leaf_key.clone().into_bytes(),
            ca_pem: f.ca_pem.clone().into_bytes(),
            assertion: "fuzz.assertion.unused".into(),
        },
        leaf: leaf.clone(),
    });
    let user_command = UserCommand::new(
        // Not `echo`: the user command's output is teed to our stdout.
        vec!["true".into()],
        None,
        s.0.join("ready"),
        f.reaper.clone(),
        OutputLog::new(64 * 1024),
    );
    let mut shared = Shared::new(
        f.reaper.clone(),
        register,
        user_command,
        CancellationToken::new(),
        InitMarker::in_dir(&state),
        ExitRequest::new(),
    );
    shared.path_var = PATH.into();
    let renewer = Renewer::new(leaf, f.ca_pem.as_bytes(), state).expect("renewer");
    shared.set_renewer(renewer);
    Arc::new(shared)
}

fn is_terminal(p: &Option<Payload>) -> bool {
    matches!(
        p,
        Some(
            Payload::HelloAck(_) | Payload::Done(_) | Payload::Error(_) | Payload::RegisterDone(_)
        )
    )
}

/// The target.
pub fn clawkerd_dispatch(data: &[u8]) {
    let _ = run(data);
}

/// Runs one input through a fresh session, checks the invariants (module
/// doc) and returns every response it got; `None` if no frame decoded.
pub fn run(data: &[u8]) -> Option<Vec<Response>> {
    let frames = frames(data);
    if frames.is_empty() {
        return None;
    }
    let f = fixture();
    let scratch = Scratch::new();
    let mut sent: HashMap<String, usize> = HashMap::new();
    let mut script = Vec::new();
    let mut pauses = 0;
    for frame in frames {
        match frame {
            f @ (Frame::Pause | Frame::Settle) => {
                pauses += 1;
                if pauses <= MAX_PAUSES {
                    script.push(f);
                }
            }
            Frame::Command(mut cmd) => {
                if sent.values().sum::<usize>() >= MAX_COMMANDS {
                    break;
                }
                sanitize(&mut cmd, &scratch);
                *sent.entry(cmd.command_id.clone()).or_default() += 1;
                script.push(Frame::Command(cmd));
            }
            other => script.push(other),
        }
    }
    let shared = shared_for(f, &scratch);
    let responses = f.rt.block_on(drive(shared, script));

    // Every id answered at most once per command sent with it.
    let responses: Vec<Response> = responses
        .into_iter()
        .map(|r| r.unwrap_or_else(|status| panic!("session reported {status:?}")))
        .collect();
    let mut terminals: HashMap<&str, usize> = HashMap::new();
    for r in &responses {
        let id = r.command_id.as_str();
        assert!(
            sent.contains_key(id) || id.starts_with("renew-"),
            "response for an id never sent: {r:?}"
        );
        if let Some(Payload::Error(e)) = &r.payload {
            assert!(!e.message.contains("panic"), "a task panicked: {r:?}");
        }
        if is_terminal(&r.payload) {
            let n = terminals.entry(id).or_default();
            *n += 1;
            assert!(
                *n <= sent.get(id).copied().unwrap_or(1),
                "{id:?} got {n} terminal responses for {} commands",
                sent.get(id).copied().unwrap_or(0)
            );
        }
    }
    let entries = scratch.entries();
    assert!(
        entries.iter().all(|e| KNOWN_ENTRIES.contains(&e.as_str())),
        "something was written outside the copy destination: {entries:?}"
    );
    Some(responses)
}

/// Feeds `script` to a fresh session and returns everything it answered.
async fn drive(shared: Arc<Shared>, script: Vec<Frame>) -> Vec<Result<Response, tonic::Status>> {
    let reaper = shared.reaper.clone();
    let (tx, rx) = mpsc::channel::<Result<Command, tonic::Status>>(16);
    let started = session::start(
        shared,
        tokio_stream::wrappers::ReceiverStream::new(rx),
        "fuzz".into(),
    );
    let hangup = CancellationToken::new();
    let got: Arc<Mutex<Vec<Result<Response, tonic::Status>>>> = Arc::default();
    let arrived = Arc::new(tokio::sync::Notify::new());
    let collector = {
        let (hangup, got, arrived) = (hangup.clone(), got.clone(), arrived.clone());
        let mut responses = started.responses;
        tokio::spawn(async move {
            let mut hung_up = false;
            loop {
                tokio::select! {
                    r = responses.next() => match r {
                        Some(r) => {
                            got.lock().unwrap_or_else(|p| p.into_inner()).push(r);
                            arrived.notify_waiters();
                        }
                        None => return,
                    },
                    // The CP goes away: what is queued can still be read,
                    // nothing more can be sent.
                    _ = hangup.cancelled(), if !hung_up => {
                        hung_up = true;
                        responses.close();
                    }
                }
            }
        })
    };
    let feed = async {
        // The last command sent, and how many responses had arrived then.
        let mut last: Option<(String, usize)> = None;
        for frame in script {
            match frame {
                Frame::Pause => tokio::time::sleep(PAUSE).await,
                Frame::Settle => {
                    if let Some((id, from)) = &last {
                        let answered = || {
                            got.lock().unwrap_or_else(|p| p.into_inner())[*from..]
                                .iter()
                                .any(|r| {
                                    r.as_ref().is_ok_and(|r| {
                                        r.command_id == *id
                                            && (is_terminal(&r.payload)
                                                || matches!(r.payload, Some(Payload::Csr(_))))
                                    })
                                })
                        };
                        let _ = tokio::time::timeout(SETTLE, async {
                            loop {
                                let notified = arrived.notified();
                                if answered() {
                                    return;
                                }
                                notified.await;
                            }
                        })
                        .await;
                    }
                }
                Frame::Command(cmd) => {
                    let from = got.lock().unwrap_or_else(|p| p.into_inner()).len();
                    last = Some((cmd.command_id.clone(), from));
                    if tx.send(Ok(cmd)).await.is_err() {
                        return;
                    }
                }
                Frame::TransportError => {
                    let _ = tx
                        .send(Err(tonic::Status::unavailable("fuzz: stream broke")))
                        .await;
                    return;
                }
            }
        }
    };
    // Every command is dispatched without waiting on a child, so feeding
    // is quick; a stuck receive loop shows here.
    tokio::time::timeout(END_BOUND, feed)
        .await
        .expect("the receive loop stopped taking commands");
    drop(tx);
    tokio::time::timeout(END_BOUND, started.ended)
        .await
        .expect("the session did not end after its input ended")
        .expect("session watcher");
    hangup.cancel();
    tokio::time::timeout(END_BOUND, collector)
        .await
        .expect("the response stream stayed open after the CP hung up")
        .expect("collector");
    let got = std::mem::take(&mut *got.lock().unwrap_or_else(|p| p.into_inner()));
    assert!(
        reaper.drain(END_BOUND).await,
        "child processes left behind after the session ended"
    );
    got
}

// ---- seeds ---------------------------------------------------------------

fn frame(cmd: &Command) -> Vec<u8> {
    let body = cmd.encode_to_vec();
    let mut out = if body.len() < 254 {
        vec![body.len() as u8]
    } else {
        let n = u16::try_from(body.len()).expect("seed command fits a frame");
        let [lo, hi] = n.to_le_bytes();
        vec![255, lo, hi]
    };
    out.extend(body);
    out
}

fn cmd(id: &str, payload: Cmd) -> Command {
    Command {
        command_id: id.into(),
        payload: Some(payload),
    }
}

fn argv(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| (*s).to_owned()).collect()
}

fn stage(program: &[&str]) -> pb::PipeStage {
    pb::PipeStage {
        argv: argv(program),
        ..Default::default()
    }
}

fn shell(stages: &[&[&str]], stdin: &[u8], timeout: u32) -> Cmd {
    Cmd::Shell(pb::ShellCommand {
        stages: stages.iter().map(|s| stage(s)).collect(),
        timeout_seconds: timeout,
        initial_stdin: stdin.to_vec().into(),
        ..Default::default()
    })
}

fn stdin(data: &[u8]) -> Cmd {
    Cmd::Stdin(pb::Stdin {
        data: data.to_vec().into(),
    })
}

fn signal(signo: i32) -> Cmd {
    Cmd::Signal(pb::Signal { signo })
}

/// A one-file tar stream whose entry is named `name` (written raw, so
/// `../` names are possible).
fn tar_with(name: &str) -> Vec<u8> {
    let body = b"fuzz seed\n";
    let mut h = tar::Header::new_old();
    h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
    h.set_size(body.len() as u64);
    h.set_mode(0o644);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    let mut out = h.as_bytes().to_vec();
    out.extend_from_slice(body);
    out.resize(512 + 512, 0);
    out.extend(std::iter::repeat_n(0u8, 1024));
    out
}

/// The seed corpus (`fuzz/seeds/clawkerd_dispatch/`), one scenario each:
/// (file name, input). Deterministic; `tests/fuzz_regressions.rs` checks
/// the committed files are exactly these.
pub fn seed_inputs() -> Vec<(&'static str, Vec<u8>)> {
    let pause = |n: usize| vec![0u8; n];
    let settle = || vec![253u8];
    let seq = |parts: Vec<Vec<u8>>| parts.concat();
    vec![
        (
            "shell_stdin_flow",
            seq(vec![
                frame(&cmd(
                    "c1",
                    Cmd::FlowGrant(pb::FlowGrant { output_bytes: 4096 }),
                )),
                frame(&cmd("c1", shell(&[&["cat"]], b"hello ", 0))),
                frame(&cmd("c1", stdin(b"world\n"))),
                frame(&cmd("c1", Cmd::CloseStdin(pb::CloseStdin {}))),
                settle(),
                frame(&cmd("e1", shell(&[&["echo", "x"], &["cat"]], b"", 0))),
                settle(),
                frame(&cmd("h1", Cmd::Hello(pb::Hello {}))),
            ]),
        ),
        (
            "pipeline_signals",
            seq(vec![
                frame(&cmd("p1", shell(&[&["cat"], &["cat"], &["cat"]], b"", 1))),
                frame(&cmd("p1", signal(15))),
                settle(),
                frame(&cmd("p1", signal(0))),
                frame(&cmd("nobody", signal(9))),
                frame(&cmd("p1", shell(&[&["true"]], b"", 0))),
                settle(),
                frame(&cmd("s1", shell(&[&["sleep", "0"]], b"", 0))),
                pause(1),
                frame(&cmd("s1", signal(19))),
                frame(&cmd("s1", Cmd::CloseStdin(pb::CloseStdin {}))),
            ]),
        ),
        (
            "pty_resize",
            seq(vec![
                frame(&cmd(
                    "t1",
                    Cmd::Pty(pb::PtyCommand {
                        argv: argv(&["cat"]),
                        rows: 24,
                        cols: 80,
                        term: "xterm".into(),
                        ..Default::default()
                    }),
                )),
                frame(&cmd(
                    "t1",
                    Cmd::Resize(pb::Resize {
                        rows: 30,
                        cols: 100,
                    }),
                )),
                frame(&cmd("t1", stdin(b"typed\n"))),
                pause(2),
                frame(&cmd(
                    "t1",
                    Cmd::Resize(pb::Resize {
                        rows: 0,
                        cols: 70000,
                    }),
                )),
                frame(&cmd("t1", signal(2))),
                settle(),
                frame(&cmd("t2", Cmd::Resize(pb::Resize { rows: 1, cols: 1 }))),
            ]),
        ),
        (
            "lifecycle",
            seq(vec![
                frame(&cmd("hello", Cmd::Hello(pb::Hello {}))),
                frame(&cmd(
                    "register",
                    Cmd::RegisterRequired(pb::RegisterRequired {}),
                )),
                settle(),
                frame(&cmd("ready", Cmd::AgentReady(pb::AgentReady {}))),
                settle(),
                frame(&cmd(
                    "logs",
                    Cmd::Logs(pb::Logs {
                        follow: false,
                        tail_bytes: 100,
                    }),
                )),
                settle(),
                frame(&cmd(
                    "follow",
                    Cmd::Logs(pb::Logs {
                        follow: true,
                        tail_bytes: 0,
                    }),
                )),
                frame(&cmd("init", Cmd::AgentInitialized(pb::AgentInitialized {}))),
                frame(&cmd("ready", Cmd::AgentReady(pb::AgentReady {}))),
                frame(&cmd("hello2", Cmd::Hello(pb::Hello {}))),
            ]),
        ),
        (
            "copy",
            seq(vec![
                frame(&cmd(
                    "from",
                    Cmd::CopyFrom(pb::CopyFrom {
                        path: "/src".into(),
                    }),
                )),
                settle(),
                frame(&cmd(
                    "from-file",
                    Cmd::CopyFrom(pb::CopyFrom { path: "/f".into() }),
                )),
                settle(),
                frame(&cmd(
                    "to",
                    Cmd::CopyTo(pb::CopyTo {
                        dest_dir: "/dst".into(),
                        ..Default::default()
                    }),
                )),
                frame(&cmd("to", stdin(&tar_with("hello.txt")))),
                frame(&cmd("to", Cmd::CloseStdin(pb::CloseStdin {}))),
                settle(),
                frame(&cmd(
                    "escape",
                    Cmd::CopyTo(pb::CopyTo {
                        dest_dir: "/dst".into(),
                        preserve_owner: true,
                        ..Default::default()
                    }),
                )),
                frame(&cmd("escape", stdin(&tar_with("../escaped.txt")))),
                frame(&cmd("escape", Cmd::CloseStdin(pb::CloseStdin {}))),
                settle(),
            ]),
        ),
        (
            "renew",
            seq(vec![
                frame(&cmd(
                    "rc1",
                    Cmd::RenewCert(pb::RenewCert {
                        reason: "requested".into(),
                    }),
                )),
                settle(),
                frame(&cmd(
                    "rc1",
                    Cmd::CertIssued(pb::CertIssued {
                        cert_pem: "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
                            .into(),
                        error: String::new(),
                    }),
                )),
                settle(),
                frame(&cmd(
                    "rc2",
                    Cmd::RenewCert(pb::RenewCert {
                        reason: "expired".into(),
                    }),
                )),
                settle(),
                frame(&cmd(
                    "rc2",
                    Cmd::CertIssued(pb::CertIssued {
                        cert_pem: String::new(),
                        error: "refused".into(),
                    }),
                )),
                frame(&cmd("stray", Cmd::CertIssued(pb::CertIssued::default()))),
                frame(&cmd("rc3", Cmd::RenewCert(pb::RenewCert::default()))),
            ]),
        ),
        (
            "refusals",
            seq(vec![
                frame(&Command {
                    command_id: "nopayload".into(),
                    payload: None,
                }),
                frame(&cmd("", shell(&[&["true"]], b"", 0))),
                frame(&cmd("empty", shell(&[], b"", 0))),
                frame(&cmd("emptyargv", shell(&[&[]], b"", 0))),
                frame(&cmd("nobody", stdin(b"x"))),
                frame(&cmd("nobody", Cmd::CloseStdin(pb::CloseStdin {}))),
                frame(&cmd(
                    "f1",
                    Cmd::Shell(pb::ShellCommand {
                        stages: vec![stage(&["false"])],
                        exit_on_non_zero: true,
                        print_output: true,
                        ..Default::default()
                    }),
                )),
                settle(),
                vec![254],
            ]),
        ),
    ]
}
