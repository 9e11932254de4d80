//! In-memory doubles of the runtime seam, for unit tests, integration
//! tests without an engine, and examples. Real behaviour is tested against
//! a real engine (`tests/e2e_docker.rs`, `tests/policy_docker.rs`); these
//! only let the logic above the seam be tested on its own.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::future::BoxFuture;

use super::{ContainerFacts, ContainmentOps, Inspect, RuntimeError, Stopped, Terminate};

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

/// Containers with networks and a running flag, and a log of every
/// mutating call that changed something.
#[derive(Clone, Default)]
pub struct MemoryOps {
    state: Arc<Mutex<MemoryState>>,
}

#[derive(Default)]
struct MemoryState {
    containers: HashMap<String, (Vec<String>, bool)>,
    calls: Vec<String>,
}

impl MemoryOps {
    /// Adds a running container attached to `networks`.
    pub fn add(&self, id: &str, networks: &[&str]) {
        lock(&self.state).containers.insert(
            id.to_owned(),
            (networks.iter().map(|n| (*n).to_owned()).collect(), true),
        );
    }

    pub fn networks(&self, id: &str) -> Option<Vec<String>> {
        lock(&self.state).containers.get(id).map(|c| c.0.clone())
    }

    pub fn running(&self, id: &str) -> Option<bool> {
        lock(&self.state).containers.get(id).map(|c| c.1)
    }

    /// Mutating calls that changed something, e.g. `disconnect c1 net-b`.
    pub fn calls(&self) -> Vec<String> {
        lock(&self.state).calls.clone()
    }

    fn with<R>(
        &self,
        id: &str,
        f: impl FnOnce(&mut (Vec<String>, bool), &mut Vec<String>) -> R,
    ) -> Result<R, RuntimeError> {
        let mut s = lock(&self.state);
        let MemoryState { containers, calls } = &mut *s;
        let c = containers
            .get_mut(id)
            .ok_or_else(|| RuntimeError::NotFound(id.to_owned()))?;
        Ok(f(c, calls))
    }

    /// Stop and kill are the same here: the running flag goes down once.
    fn halt(&self, id: &str, verb: &str) -> Result<Stopped, RuntimeError> {
        self.with(id, |c, calls| {
            if c.1 {
                c.1 = false;
                calls.push(format!("{verb} {id}"));
                Stopped::Now
            } else {
                Stopped::Already
            }
        })
    }
}

impl Terminate for MemoryOps {
    fn kill<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Stopped, RuntimeError>> {
        let r = self.halt(id, "kill");
        Box::pin(async move { r })
    }
}

impl ContainmentOps for MemoryOps {
    fn networks_of<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Vec<String>, RuntimeError>> {
        let r = self.with(id, |c, _| c.0.clone());
        Box::pin(async move { r })
    }

    fn disconnect<'a>(
        &'a self,
        id: &'a str,
        network: &'a str,
    ) -> BoxFuture<'a, Result<(), RuntimeError>> {
        let r = self.with(id, |c, calls| {
            if let Some(pos) = c.0.iter().position(|n| n == network) {
                c.0.remove(pos);
                calls.push(format!("disconnect {id} {network}"));
            }
        });
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
