//! The Docker seam of Register: what the handler needs to know about a
//! container, behind a narrow trait. The bollard implementation lives with
//! the other Docker adapters; [`StaticInspector`] is the in-memory double.

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Label naming the agent of a container.
pub const LABEL_AGENT: &str = "dev.clawker.agent";
/// Label naming the project of a container (absent for unscoped).
pub const LABEL_PROJECT: &str = "dev.clawker.project";

/// The facts Register checks about a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerFacts {
    /// Docker's canonical (64-hex) id.
    pub id: String,
    pub labels: HashMap<String, String>,
    /// The container's address on `clawker-net`, if attached.
    pub clawker_net_ip: Option<IpAddr>,
    pub running: bool,
}

impl ContainerFacts {
    /// A running agent container labelled for (project, agent) at `ip`.
    pub fn agent(id: &str, project: &str, agent: &str, ip: IpAddr) -> Self {
        let mut labels = HashMap::new();
        labels.insert(LABEL_AGENT.to_owned(), agent.to_owned());
        if !project.is_empty() {
            labels.insert(LABEL_PROJECT.to_owned(), project.to_owned());
        }
        Self {
            id: id.to_owned(),
            labels,
            clawker_net_ip: Some(ip),
            running: true,
        }
    }

    /// A label's value; an absent label reads as the empty string (so an
    /// unscoped request matches a container without a project label).
    pub fn label(&self, key: &str) -> &str {
        self.labels.get(key).map(String::as_str).unwrap_or("")
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum InspectError {
    #[error("container {0} not found")]
    NotFound(String),
    #[error("docker engine: {0}")]
    Engine(String),
    #[error("inspect timed out after {0:?}")]
    Timeout(Duration),
}

/// Looks a container up by id. Implementations must be cheap to share; the
/// Register handler calls them from a detached task with a timeout.
pub trait ContainerInspector: Send + Sync + 'static {
    fn inspect(
        &self,
        container_id: &str,
    ) -> impl Future<Output = Result<ContainerFacts, InspectError>> + Send;
}

impl<T: ContainerInspector> ContainerInspector for Arc<T> {
    fn inspect(
        &self,
        container_id: &str,
    ) -> impl Future<Output = Result<ContainerFacts, InspectError>> + Send {
        (**self).inspect(container_id)
    }
}

/// In-memory inspector for tests: a fixed table of containers, an optional
/// delay, and a log of every id asked for.
#[derive(Debug, Default)]
pub struct StaticInspector {
    containers: Mutex<HashMap<String, ContainerFacts>>,
    calls: Mutex<Vec<String>>,
    delay: Mutex<Option<Duration>>,
}

impl StaticInspector {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) a container, keyed by the id Register will ask for.
    pub fn insert(&self, lookup_id: &str, facts: ContainerFacts) {
        lock(&self.containers).insert(lookup_id.to_owned(), facts);
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
}

/// The double never panics while holding a lock, but a poisoned lock must
/// not turn into a second panic in test output.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl ContainerInspector for StaticInspector {
    async fn inspect(&self, container_id: &str) -> Result<ContainerFacts, InspectError> {
        lock(&self.calls).push(container_id.to_owned());
        let delay = *lock(&self.delay);
        if let Some(d) = delay {
            tokio::time::sleep(d).await;
        }
        lock(&self.containers)
            .get(container_id)
            .cloned()
            .ok_or_else(|| InspectError::NotFound(container_id.to_owned()))
    }
}
