//! The CP side of the many-sessions measurements: the real session
//! machinery (bus, `sessions` supervisor, one SessionActor per agent, the
//! dialer) in this process, pointed at a [`LoadGen`]'s agents.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clawker::session::lifecycle::{
    ContainerResolver, ResolveError, ResolvedTarget, SessionDeps, SessionPolicy,
};

use super::loadgen::{LoadGen, agent_addr, agent_id};

struct Table(HashMap<String, SocketAddr>);

impl ContainerResolver for Table {
    fn resolve(
        &self,
        id: &str,
    ) -> futures::future::BoxFuture<'_, Result<ResolvedTarget, ResolveError>> {
        let r = self.0.get(id).map(|a| ResolvedTarget {
            agent: "a".into(),
            project: "p".into(),
            running: true,
            addr: Some(*a),
        });
        Box::pin(async move { r.ok_or(ResolveError::NotFound) })
    }
}

pub struct Cp {
    pub sessions: clawker::session::Sessions,
    _sup: clawker_actors::SupervisorHandle,
    pub bus: clawker::events::Bus,
    connected: Arc<Mutex<HashMap<String, Instant>>>,
    _dir: tempfile::TempDir,
}

impl Cp {
    /// Starts the CP's session machinery (run inside an actix System).
    /// Unknown agents stay untrusted and are not registered (no register
    /// rounds), so each session ends in the hold phase: connected, idle.
    pub fn start(lg: &LoadGen) -> Cp {
        let dir = tempfile::tempdir().unwrap();
        let table = (0..lg.n).map(|i| (agent_id(i), agent_addr(i))).collect();
        let bus = clawker::events::start_bus();
        let registry = clawker::registry::RegistryStore::open(&dir.path().join("r.redb")).unwrap();
        let deps = SessionDeps {
            resolver: Arc::new(Table(table)),
            registry: Arc::new(registry),
            terminate: Arc::new(clawker::runtime::memory::MemoryOps::default()),
            dial: clawker::session::dial::DialConfig::new(
                &lg.ca_pem,
                &lg.cp_cert_pem,
                &lg.cp_key_pem,
            )
            .unwrap(),
            sink: bus.clone(),
            policy: SessionPolicy {
                max_register_attempts: 0,
                ..SessionPolicy::default()
            },
            certs: None,
        };
        let connected: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
        let mut sub = bus
            .subscribe::<clawker::events::SessionConnected>()
            .unwrap();
        let c = connected.clone();
        actix::spawn(async move {
            while let Some(e) = sub.recv().await {
                c.lock()
                    .unwrap()
                    .insert(e.agent.container_id.clone(), Instant::now());
            }
        });
        let (sessions, sup) = clawker::session::actor::start_standalone(deps, bus.clone());
        Cp {
            sessions,
            _sup: sup,
            bus,
            connected,
            _dir: dir,
        }
    }

    pub fn connected(&self) -> usize {
        self.connected.lock().unwrap().len()
    }

    /// Dials agents `range` at once; returns when all are connected, with
    /// the time from the first dial to the last SessionConnected.
    pub async fn dial_all(&self, range: std::ops::Range<usize>) -> Duration {
        let want = self.connected() + range.len();
        let t0 = Instant::now();
        for i in range {
            self.sessions.dial(&agent_id(i)).await;
        }
        let deadline = Instant::now() + Duration::from_secs(600);
        while self.connected() < want {
            assert!(
                Instant::now() < deadline,
                "only {} of {want} connected",
                self.connected()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        t0.elapsed()
    }
}

pub fn status_kb(pid: &str, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .unwrap_or(0.0)
}

/// This process's resident set, MB.
pub fn rss_mb() -> f64 {
    status_kb("self", "VmRSS:") / 1024.0
}

/// utime + stime of this process, in clock ticks (/proc/self/stat).
pub fn cpu_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesised comm; utime and stime are 14 and 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let p = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    p(11) + p(12)
}

pub fn ticks_per_sec() -> u64 {
    // SAFETY: sysconf has no memory effects.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as u64 } else { 100 }
}
