//! In-memory doubles of the runtime seam, for unit tests, integration
//! tests without an engine, and examples. Real behaviour is tested against
//! a real engine (`tests/e2e_docker.rs`, `tests/policy_docker.rs`); these
//! only let the logic above the seam be tested on its own.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::future::BoxFuture;

use super::{Change, ContainerFacts, ContainmentOps, Inspect, RuntimeError, Stopped, Terminate};

/// The doubles never panic while holding a lock, but a poisoned lock must
/// not turn into a second panic in test output.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A fixed table of containers, an optional delay, and a log of every id
/// asked for.
#[derive(Debug, Default)]
pub struct StaticInspector {
    containers: Mutex<HashMap<String, Result<ContainerFacts, RuntimeError>>>,
    calls: Mutex<Vec<String>>,
    delay: Mutex<Option<Duration>>,
    faults: Mutex<std::collections::VecDeque<RuntimeError>>,
}

impl StaticInspector {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) a container, keyed by the id callers ask for.
    pub fn insert(&self, lookup_id: &str, facts: ContainerFacts) {
        lock(&self.containers).insert(lookup_id.to_owned(), Ok(facts));
    }

    /// Makes lookups of `lookup_id` fail with `err`.
    pub fn fail(&self, lookup_id: &str, err: RuntimeError) {
        lock(&self.containers).insert(lookup_id.to_owned(), Err(err));
    }

    pub fn remove(&self, lookup_id: &str) {
        lock(&self.containers).remove(lookup_id);
    }

    /// Every inspect so far, in order.
    pub fn calls(&self) -> Vec<String> {
        lock(&self.calls).clone()
    }

    /// Makes every inspect take `delay` (timeout tests).
    pub fn set_delay(&self, delay: Option<Duration>) {
        *lock(&self.delay) = delay;
    }

    /// Makes the next `n` inspects (of any id) fail with `err`, then answer
    /// normally again: a transient runtime fault.
    pub fn fail_next(&self, n: usize, err: RuntimeError) {
        let mut q = lock(&self.faults);
        q.clear();
        q.extend(std::iter::repeat_n(err, n));
    }
}

impl Inspect for StaticInspector {
    fn inspect<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<ContainerFacts, RuntimeError>> {
        Box::pin(async move {
            lock(&self.calls).push(id.to_owned());
            let delay = *lock(&self.delay);
            if let Some(d) = delay {
                tokio::time::sleep(d).await;
            }
            if let Some(fault) = lock(&self.faults).pop_front() {
                return Err(fault);
            }
            lock(&self.containers)
                .get(id)
                .cloned()
                .unwrap_or_else(|| Err(RuntimeError::NotFound(id.to_owned())))
        })
    }
}

/// Containers with networks, a running flag and a lock flag, and a log of
/// every mutating call that changed something. Quarantine moves a
/// container onto [`MemoryOps::QUARANTINE`] only; release back onto
/// [`MemoryOps::AGENT_NET`].
#[derive(Clone, Default)]
pub struct MemoryOps {
    state: Arc<Mutex<MemoryState>>,
}

#[derive(Default)]
struct MemoryState {
    containers: HashMap<String, Container>,
    calls: Vec<String>,
}

struct Container {
    networks: Vec<String>,
    running: bool,
    locked: bool,
}

impl MemoryOps {
    pub const QUARANTINE: &'static str = "clawker-quarantine";
    pub const AGENT_NET: &'static str = "clawker-net";

    /// Adds a running, unlocked container attached to `networks`.
    pub fn add(&self, id: &str, networks: &[&str]) {
        lock(&self.state).containers.insert(
            id.to_owned(),
            Container {
                networks: networks.iter().map(|n| (*n).to_owned()).collect(),
                running: true,
                locked: false,
            },
        );
    }

    pub fn networks(&self, id: &str) -> Option<Vec<String>> {
        lock(&self.state)
            .containers
            .get(id)
            .map(|c| c.networks.clone())
    }

    pub fn running(&self, id: &str) -> Option<bool> {
        lock(&self.state).containers.get(id).map(|c| c.running)
    }

    pub fn locked(&self, id: &str) -> Option<bool> {
        lock(&self.state).containers.get(id).map(|c| c.locked)
    }

    /// Mutating calls that changed something, e.g. `quarantine c1`.
    pub fn calls(&self) -> Vec<String> {
        lock(&self.state).calls.clone()
    }

    fn with<R>(
        &self,
        id: &str,
        f: impl FnOnce(&mut Container, &mut Vec<String>) -> R,
    ) -> Result<R, RuntimeError> {
        let mut s = lock(&self.state);
        let MemoryState { containers, calls } = &mut *s;
        let c = containers
            .get_mut(id)
            .ok_or_else(|| RuntimeError::NotFound(id.to_owned()))?;
        Ok(f(c, calls))
    }

    /// Moves `id` onto `to` only; `verb` is logged when that changed it.
    fn move_to(&self, id: &str, to: &str, verb: &str) -> Result<Change, RuntimeError> {
        self.with(id, |c, calls| {
            if c.networks == [to] {
                Change::already(format!("attached only to [{to}]"))
            } else {
                let left = std::mem::replace(&mut c.networks, vec![to.to_owned()]);
                calls.push(format!("{verb} {id}"));
                Change::applied(format!("left [{}], joined {to}", left.join(", ")))
            }
        })
    }

    /// Stop and kill are the same here: the running flag goes down once.
    fn halt(&self, id: &str, verb: &str) -> Result<Stopped, RuntimeError> {
        self.with(id, |c, calls| {
            if c.running {
                c.running = false;
                c.locked = false; // a stopped container's namespace is gone
                calls.push(format!("{verb} {id}"));
                Stopped::Now
            } else {
                Stopped::Already
            }
        })
    }

    fn set_lock(&self, id: &str, on: bool) -> Result<Change, RuntimeError> {
        self.with(id, |c, calls| {
            if !c.running {
                return Err(RuntimeError::NotRunning(id.to_owned()));
            }
            if c.locked == on {
                return Ok(Change::already(if on {
                    "already locked"
                } else {
                    "not locked"
                }));
            }
            c.locked = on;
            calls.push(format!("{} {id}", if on { "lock" } else { "unlock" }));
            Ok(Change::applied(if on { "locked" } else { "unlocked" }))
        })?
    }
}

impl Terminate for MemoryOps {
    fn kill<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Stopped, RuntimeError>> {
        let r = self.halt(id, "kill");
        Box::pin(async move { r })
    }
}

impl ContainmentOps for MemoryOps {
    fn facts<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<ContainerFacts, RuntimeError>> {
        let r = self.with(id, |c, _| {
            let mut networks = c.networks.clone();
            networks.sort();
            ContainerFacts {
                id: id.to_owned(),
                networks,
                running: c.running,
                ..ContainerFacts::default()
            }
        });
        Box::pin(async move { r })
    }

    fn quarantine_network(&self) -> String {
        Self::QUARANTINE.to_owned()
    }

    fn quarantine<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Change, RuntimeError>> {
        let r = self.move_to(id, Self::QUARANTINE, "quarantine");
        Box::pin(async move { r })
    }

    fn release<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Change, RuntimeError>> {
        let r = self.move_to(id, Self::AGENT_NET, "release");
        Box::pin(async move { r })
    }

    fn lock<'a>(&'a self, id: &'a str, _: u16) -> BoxFuture<'a, Result<Change, RuntimeError>> {
        let r = self.set_lock(id, true);
        Box::pin(async move { r })
    }

    fn unlock<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Change, RuntimeError>> {
        let r = self.set_lock(id, false);
        Box::pin(async move { r })
    }

    fn stop<'a>(
        &'a self,
        id: &'a str,
        _: Duration,
    ) -> BoxFuture<'a, Result<Stopped, RuntimeError>> {
        let r = self.halt(id, "stop");
        Box::pin(async move { r })
    }

    fn kill<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Stopped, RuntimeError>> {
        let r = self.halt(id, "kill");
        Box::pin(async move { r })
    }
}
