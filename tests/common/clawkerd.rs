//! The real `clawkerd` binary as a child process, and the PKI it boots with.
//!
//! - [`TestPki`]: a fresh CA, the CP client cert, an agent leaf and a
//!   bootstrap dir (plus passwd/group files) in a tempdir.
//! - [`Clawkerd`]: the child process, listening on `127.0.0.1:0`; its JSON
//!   log lines (stderr) are captured in [`Logs`] so tests can assert audit
//!   events; the bound address is read from the `clawkerd_listener_started`
//!   line.
//! - [`pid_gone`] / [`wait_pid_gone`]: whether a process it spawned is gone.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command as Process, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clawker::identity::{AgentName, ProjectSlug};
use clawker::pki::{self, Ca, CertifiedKey, LeafSpec};
use clawker::session::init::AgentUser;
use serde_json::Value;

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

    /// clawkerd's state dir for this test (`CLAWKERD_STATE_DIR`): the init
    /// marker lives here, so a respawned clawkerd is a restarted container.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// The init marker clawkerd writes on `AgentInitialized`.
    pub fn init_marker(&self) -> PathBuf {
        self.state_dir().join("agent-initialized")
    }

    /// The agent user's home for init plans run on this host: the image
    /// has /home/claude, the test host has not (and must not be written
    /// to), so the plan's steps get a tempdir owned by `claude`. Created on
    /// first use.
    pub fn agent_home(&self) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let home = self.dir.path().join("home");
        if !home.exists() {
            std::fs::create_dir(&home).unwrap();
            std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o755)).unwrap();
            std::os::unix::fs::chown(&home, Some(CLAUDE_UID), Some(CLAUDE_UID)).unwrap();
        }
        home
    }

    /// The agent user of the CP's init plan, with [`Self::agent_home`].
    pub fn agent_user(&self) -> AgentUser {
        AgentUser {
            home: self.agent_home().display().to_string(),
            ..AgentUser::default()
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

    /// Async variant of [`Logs::wait_count`] for tokio tests.
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
            // Never the host's /var/lib/clawker: the init marker (and
            // whatever else clawkerd keeps) stays in this test's tempdir.
            .env("CLAWKERD_STATE_DIR", pki.state_dir())
            .env("CLAWKER_LOG_FILE", "-")
            // Tests count rejection lines; the ones about the rate limit
            // set their own burst.
            .env("CLAWKER_LOG_REJECT_BURST", "100000")
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

    /// Waits until clawkerd has spawned a child (the user command): a stop
    /// signal before that ends clawkerd with 1 by design.
    pub fn wait_user_command(&self, timeout: Duration) {
        let pid = self.child.id();
        let deadline = std::time::Instant::now() + timeout;
        let has_child = || {
            std::fs::read_dir(format!("/proc/{pid}/task"))
                .into_iter()
                .flatten()
                .flatten()
                .any(|t| {
                    std::fs::read_to_string(t.path().join("children"))
                        .map(|c| !c.trim().is_empty())
                        .unwrap_or(false)
                })
        };
        while !has_child() {
            assert!(std::time::Instant::now() < deadline, "no user command");
            std::thread::sleep(Duration::from_millis(5));
        }
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
