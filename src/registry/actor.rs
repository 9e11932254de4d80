//! The registry actor: sole owner (and sole writer) of the redb file.
//!
//! Writes arrive as messages and are serialized by the actor. Each write is
//! committed durably on a blocking thread (redb fsyncs; that must never run
//! on an actor or async worker thread) and only *after* the commit succeeds
//! does the actor publish a new in-memory index. So a reader can never see a
//! row that a crash could take back: durable before visible.
//!
//! Reads never touch the actor or a lock: the index is an immutable
//! [`Index`] behind an [`ArcSwap`], replaced wholesale by the actor after
//! each commit. The IdentityInterceptor calls [`RegistryReader::lookup`] on
//! every per-agent RPC, so it must not queue behind a write's fsync.
//!
//! The same file holds the spent client-assertion JTIs ([`super::jti`]); the
//! token endpoint spends them through this actor too, so there is exactly
//! one writer of the file.

use std::collections::HashMap;
use std::sync::Arc;

use actix::prelude::*;
use arc_swap::ArcSwap;

use super::grants::{IssueOutcome, IssueRequest, LiveToken};
use super::leaf::{self, LeafState, PendingLeaf, Promotion};
use super::store::{Entry, NewEntry, RegistryError, RegistryStore};
use crate::identity::{self, Thumbprint};

/// Immutable read snapshot: both lookup keys point at the same entries.
#[derive(Debug, Default, Clone)]
pub struct Index {
    by_thumbprint: HashMap<[u8; 32], Arc<Entry>>,
    by_container: HashMap<String, Arc<Entry>>,
    /// Leaf rotation state by container id (absent: never rotated).
    leaf: HashMap<String, LeafState>,
}

impl Index {
    fn from_entries(entries: Vec<Entry>, leaf: HashMap<String, LeafState>) -> Self {
        let mut index = Self::default();
        for e in entries {
            index.insert(Arc::new(e));
        }
        index.leaf = leaf;
        index
    }

    /// A promoted row: its old thumbprint leaves the index.
    fn rotate(&mut self, p: &Promotion) {
        self.by_thumbprint.remove(&p.old.0);
        self.insert(Arc::new(p.entry.clone()));
        self.leaf
            .insert(p.entry.container_id.clone(), p.state.clone());
    }

    fn insert(&mut self, e: Arc<Entry>) {
        self.by_thumbprint.insert(e.thumbprint.0, e.clone());
        self.by_container.insert(e.container_id.clone(), e);
    }

    fn remove_container(&mut self, container_id: &str) {
        if let Some(e) = self.by_container.remove(container_id) {
            self.by_thumbprint.remove(&e.thumbprint.0);
        }
        self.leaf.remove(container_id);
    }
}

/// Lock-free reads of the latest committed registry state. Cheap to clone.
#[derive(Clone)]
pub struct RegistryReader {
    index: Arc<ArcSwap<Index>>,
}

impl std::fmt::Debug for RegistryReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryReader")
            .field("rows", &self.index.load().by_container.len())
            .finish()
    }
}

impl RegistryReader {
    /// The row for a presented certificate: the thumbprint must be known and
    /// `cn` must equal the stored canonical CN (constant-time compare). Every
    /// miss — unknown thumbprint or CN mismatch — is the same
    /// [`RegistryError::UnknownAgent`], so a caller cannot probe which half
    /// was wrong.
    pub fn lookup(&self, thumbprint: &Thumbprint, cn: &str) -> Result<Arc<Entry>, RegistryError> {
        let index = self.index.load();
        match index.by_thumbprint.get(&thumbprint.0) {
            Some(e) if identity::ct_str_eq(cn, &e.canonical_cn) => Ok(e.clone()),
            _ => Err(RegistryError::UnknownAgent),
        }
    }

    /// The row for a container id (exact, case-sensitive), no CN check.
    pub fn lookup_by_container_id(&self, container_id: &str) -> Result<Arc<Entry>, RegistryError> {
        if container_id.is_empty() {
            return Err(RegistryError::UnknownAgent);
        }
        self.index
            .load()
            .by_container
            .get(container_id)
            .cloned()
            .ok_or(RegistryError::UnknownAgent)
    }

    /// The container's leaf rotation state (default: never rotated).
    pub fn leaf_state(&self, container_id: &str) -> LeafState {
        self.index
            .load()
            .leaf
            .get(container_id)
            .cloned()
            .unwrap_or_default()
    }

    /// Every row, sorted by (project, agent name).
    pub fn snapshot(&self) -> Vec<Entry> {
        let index = self.index.load();
        let mut out: Vec<Entry> = index.by_container.values().map(|e| (**e).clone()).collect();
        out.sort_by(|a, b| {
            (
                a.project.as_str(),
                a.agent_name.as_str(),
                a.container_id.as_str(),
            )
                .cmp(&(
                    b.project.as_str(),
                    b.agent_name.as_str(),
                    b.container_id.as_str(),
                ))
        });
        out
    }

    pub fn len(&self) -> usize {
        self.index.load().by_container.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Adds a row (durably, then visibly).
#[derive(Debug, Message)]
#[rtype(result = "Result<Entry, RegistryError>")]
pub struct Add(pub NewEntry);

/// Deletes a container's row; `Ok(false)` when there was none.
#[derive(Debug, Message)]
#[rtype(result = "Result<bool, RegistryError>")]
pub struct Evict(pub String);

/// Records a client-assertion JTI as spent; `Ok(false)` if it already was.
#[derive(Debug, Message)]
#[rtype(result = "Result<bool, RegistryError>")]
pub struct SpendJti {
    pub jti: String,
    /// The assertion's `exp`: the row may be pruned after it.
    pub exp: i64,
    pub now: i64,
}

/// Stages a freshly signed leaf for a container (see [`super::leaf`]).
#[derive(Debug, Message)]
#[rtype(result = "Result<LeafState, RegistryError>")]
pub struct StageLeaf {
    pub container_id: String,
    /// The thumbprint of the session that asked; the row must still name it.
    pub current: Thumbprint,
    pub pending: PendingLeaf,
}

/// Makes a staged leaf the row's identity; the old thumbprint is retired.
#[derive(Debug, Message)]
#[rtype(result = "Result<Promotion, RegistryError>")]
pub struct PromoteLeaf {
    pub container_id: String,
    pub new: Thumbprint,
    pub now_unix: i64,
}

/// Number of recorded JTIs (diagnostics, tests).
#[derive(Debug, Message)]
#[rtype(result = "Result<u64, RegistryError>")]
pub struct CountSpentJtis;

/// Spends an assertion's JTI and records its token in one transaction, or
/// reissues an unredeemed grant ([`super::grants::issue`]).
#[derive(Debug, Message)]
#[rtype(result = "Result<IssueOutcome, RegistryError>")]
pub struct IssueToken(pub IssueRequest);

/// A Register succeeded with a token of this grant ([`super::grants::redeem`]).
#[derive(Debug, Message)]
#[rtype(result = "Result<bool, RegistryError>")]
pub struct RedeemGrant {
    pub jti: String,
    pub now: i64,
}

/// Every token still valid at `now` (the token endpoint loads them at start).
#[derive(Debug, Message)]
#[rtype(result = "Result<Vec<LiveToken>, RegistryError>")]
pub struct LiveTokens {
    pub now: i64,
}

/// Releases the redb file and stops the actor. Answered after the file is
/// closed, so the same path can be reopened (CP restart in one process).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Shutdown;

/// The actor. Start it with [`Registry::start`].
pub struct RegistryActor {
    store: Option<RegistryStore>,
    /// The file, for reopening it after a storage error.
    path: std::path::PathBuf,
    /// A write failed in storage (full disk, I/O error). redb then refuses
    /// every later write (`PreviousIo`) until the file is reopened, so the
    /// next write reopens it first — and reloads the index from what is
    /// really on disk — instead of failing for the life of the process.
    poisoned: bool,
    /// [`Shutdown`] was handled: writes are refused.
    closed: bool,
    index: Arc<ArcSwap<Index>>,
    /// Set when [`Registry::start`] had to create an actix system on a
    /// dedicated thread for us; that system is stopped with the actor.
    owns_system: bool,
}

impl Actor for RegistryActor {
    type Context = Context<Self>;

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        tracing::info!("agentregistry: registry actor stopped");
        if self.owns_system {
            System::current().stop();
        }
    }
}

type Reply<T> = AtomicResponse<RegistryActor, Result<T, RegistryError>>;

impl RegistryActor {
    /// Runs `op` against the store on a blocking thread, then `publish` on
    /// the actor with the result. `AtomicResponse` keeps the mailbox closed
    /// until both are done: writes are serialized and the index is always
    /// published in commit order.
    fn write<T, Op, Pub>(&mut self, op: Op, publish: Pub) -> Reply<T>
    where
        T: Send + 'static,
        Op: FnOnce(&RegistryStore) -> Result<T, RegistryError> + Send + 'static,
        Pub: FnOnce(&mut RegistryActor, &T) + 'static,
    {
        if self.closed {
            return AtomicResponse::new(Box::pin(actix::fut::ready(Err(
                RegistryError::Unavailable("registry is shut down".into()),
            ))));
        }
        // After a storage error our handle is dropped here, before the
        // reopen: writes are serialized, so it is the last one and redb's
        // file lock is free.
        if self.poisoned {
            self.store = None;
        }
        let current = self.store.clone();
        let path = self.path.clone();
        let fut = async move {
            let blocking = tokio::task::spawn_blocking(move || {
                let (store, reopened) = match current {
                    Some(s) => (s, None),
                    None => match RegistryStore::open(&path).and_then(|s| {
                        let rows = s.snapshot()?;
                        let leaf = leaf::all_states(s.database())?;
                        Ok((s, (rows, leaf)))
                    }) {
                        Ok((s, rows)) => (s.clone(), Some((s, rows))),
                        Err(e) => return (None, Err(e)),
                    },
                };
                (reopened, op(&store))
            });
            match blocking.await {
                Ok(v) => v,
                Err(e) => (
                    None,
                    Err(RegistryError::Unavailable(format!(
                        "registry write task failed: {e}"
                    ))),
                ),
            }
        };
        AtomicResponse::new(Box::pin(fut.into_actor(self).map(
            move |(reopened, res), act, _ctx| {
                if let Some((store, (rows, leaf))) = reopened {
                    tracing::info!(
                        db_path = %act.path.display(),
                        rows = rows.len(),
                        "agentregistry: reopened after a storage error; writes resume"
                    );
                    act.store = Some(store);
                    act.poisoned = false;
                    act.index.store(Arc::new(Index::from_entries(rows, leaf)));
                }
                match &res {
                    Ok(v) => publish(act, v),
                    Err(e) if e.is_retryable() => {
                        tracing::error!(error = %e, "agentregistry: write failed in storage; the file is reopened before the next write");
                        act.poisoned = true;
                    }
                    Err(_) => {}
                }
                res
            },
        )))
    }

    /// Single writer of the `ArcSwap`, so load-modify-store cannot lose an
    /// update.
    fn publish(&self, f: impl FnOnce(&mut Index)) {
        let mut next = Index::clone(&self.index.load());
        f(&mut next);
        self.index.store(Arc::new(next));
    }
}

impl Handler<Add> for RegistryActor {
    type Result = Reply<Entry>;

    fn handle(&mut self, msg: Add, _ctx: &mut Self::Context) -> Self::Result {
        self.write(
            move |s| s.add(msg.0),
            |act, e| act.publish(|idx| idx.insert(Arc::new(e.clone()))),
        )
    }
}

impl Handler<Evict> for RegistryActor {
    type Result = Reply<bool>;

    fn handle(&mut self, msg: Evict, _ctx: &mut Self::Context) -> Self::Result {
        let id = msg.0.clone();
        self.write(
            move |s| s.evict_by_container_id(&msg.0),
            move |act, removed| {
                if *removed {
                    act.publish(|idx| idx.remove_container(&id));
                }
            },
        )
    }
}

impl Handler<SpendJti> for RegistryActor {
    type Result = Reply<bool>;

    fn handle(&mut self, msg: SpendJti, _ctx: &mut Self::Context) -> Self::Result {
        self.write(
            move |s| super::jti::spend(s.database(), &msg.jti, msg.exp, msg.now),
            |_, _| {},
        )
    }
}

impl Handler<StageLeaf> for RegistryActor {
    type Result = Reply<LeafState>;

    fn handle(&mut self, msg: StageLeaf, _ctx: &mut Self::Context) -> Self::Result {
        let id = msg.container_id.clone();
        self.write(
            move |s| leaf::stage(s.database(), &msg.container_id, &msg.current, msg.pending),
            move |act, state| {
                act.publish(|idx| {
                    idx.leaf.insert(id, state.clone());
                })
            },
        )
    }
}

impl Handler<PromoteLeaf> for RegistryActor {
    type Result = Reply<Promotion>;

    fn handle(&mut self, msg: PromoteLeaf, _ctx: &mut Self::Context) -> Self::Result {
        self.write(
            move |s| leaf::promote(s.database(), &msg.container_id, &msg.new, msg.now_unix),
            |act, p| act.publish(|idx| idx.rotate(p)),
        )
    }
}

impl Handler<CountSpentJtis> for RegistryActor {
    type Result = Reply<u64>;

    fn handle(&mut self, _msg: CountSpentJtis, _ctx: &mut Self::Context) -> Self::Result {
        self.write(|s| super::jti::count(s.database()), |_, _| {})
    }
}

impl Handler<IssueToken> for RegistryActor {
    type Result = Reply<IssueOutcome>;

    fn handle(&mut self, msg: IssueToken, _ctx: &mut Self::Context) -> Self::Result {
        self.write(
            move |s| super::grants::issue(s.database(), &msg.0),
            |_, _| {},
        )
    }
}

impl Handler<RedeemGrant> for RegistryActor {
    type Result = Reply<bool>;

    fn handle(&mut self, msg: RedeemGrant, _ctx: &mut Self::Context) -> Self::Result {
        self.write(
            move |s| super::grants::redeem(s.database(), &msg.jti, msg.now),
            |_, _| {},
        )
    }
}

impl Handler<LiveTokens> for RegistryActor {
    type Result = Reply<Vec<LiveToken>>;

    fn handle(&mut self, msg: LiveTokens, _ctx: &mut Self::Context) -> Self::Result {
        self.write(
            move |s| super::grants::live_tokens(s.database(), msg.now),
            |_, _| {},
        )
    }
}

impl Handler<Shutdown> for RegistryActor {
    type Result = ();

    fn handle(&mut self, _msg: Shutdown, ctx: &mut Self::Context) {
        // No write is in flight (they are atomic), so this drops the last
        // handle on the redb file.
        self.store = None;
        self.closed = true;
        ctx.stop();
    }
}

/// Handle to the registry: async writes through the actor, sync lock-free
/// reads from the published index. Cheap to clone; share one per process.
#[derive(Clone)]
pub struct Registry {
    addr: Addr<RegistryActor>,
    reader: RegistryReader,
    /// Test seam: the next `add` fails with this error instead of writing
    /// (a CP that dies between spending a JTI and committing the row).
    #[cfg(feature = "test-hooks")]
    add_fault: Arc<std::sync::Mutex<Option<RegistryError>>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("reader", &self.reader)
            .finish()
    }
}

impl Registry {
    /// Loads every row into the index and starts the actor. On an actix
    /// arbiter thread the actor runs there (so a supervisor can own it);
    /// anywhere else (a plain tokio runtime, tests) it gets its own actix
    /// system on a dedicated thread.
    ///
    /// Reads the whole file once, synchronously: call it at startup.
    pub fn start(store: RegistryStore) -> Result<Self, RegistryError> {
        let index = Arc::new(ArcSwap::from_pointee(Index::from_entries(
            store.snapshot()?,
            leaf::all_states(store.database())?,
        )));
        let reader = RegistryReader {
            index: index.clone(),
        };
        let addr = if Arbiter::try_current().is_some() {
            RegistryActor {
                path: store.path().to_owned(),
                store: Some(store),
                poisoned: false,
                closed: false,
                index,
                owns_system: false,
            }
            .start()
        } else {
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::Builder::new()
                .name("clawker-registry".into())
                .spawn(move || {
                    let sys = System::new();
                    sys.block_on(async move {
                        let addr = RegistryActor {
                            path: store.path().to_owned(),
                            store: Some(store),
                            poisoned: false,
                            closed: false,
                            index,
                            owns_system: true,
                        }
                        .start();
                        let _ = tx.send(addr);
                    });
                    if let Err(e) = sys.run() {
                        tracing::error!(error = %e, "agentregistry: registry system failed");
                    }
                })
                .map_err(|e| RegistryError::Unavailable(format!("spawn registry thread: {e}")))?;
            rx.recv().map_err(|_| {
                RegistryError::Unavailable("registry thread exited during startup".into())
            })?
        };
        Ok(Self {
            addr,
            reader,
            #[cfg(feature = "test-hooks")]
            add_fault: Arc::default(),
        })
    }

    /// Test seam (feature `test-hooks`): the next [`Registry::add`] fails
    /// with `error` and writes nothing.
    #[cfg(feature = "test-hooks")]
    pub fn fail_next_add(&self, error: RegistryError) {
        *self.add_fault.lock().unwrap_or_else(|p| p.into_inner()) = Some(error);
    }

    pub fn reader(&self) -> &RegistryReader {
        &self.reader
    }

    pub fn addr(&self) -> &Addr<RegistryActor> {
        &self.addr
    }

    async fn ask<M>(&self, msg: M) -> Result<M::Result, RegistryError>
    where
        M: Message + Send + 'static,
        M::Result: Send,
        RegistryActor: Handler<M>,
    {
        self.addr
            .send(msg)
            .await
            .map_err(|e| RegistryError::Unavailable(format!("registry actor: {e}")))
    }

    /// Adds a row; returns once it is durable *and* visible to readers.
    /// Panics on the store's programmer-error invariants (zero thumbprint,
    /// empty container id, zero registration time) in the caller, not the
    /// actor.
    pub async fn add(&self, new: NewEntry) -> Result<Entry, RegistryError> {
        assert!(
            !new.thumbprint.is_zero(),
            "agentregistry: Add called with zero thumbprint"
        );
        assert!(
            !new.container_id.is_empty(),
            "agentregistry: Add called with empty ContainerID"
        );
        assert!(
            new.registered_at_unix != 0,
            "agentregistry: Add called with zero RegisteredAt"
        );
        #[cfg(feature = "test-hooks")]
        if let Some(e) = self
            .add_fault
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            return Err(e);
        }
        self.ask(Add(new)).await?
    }

    /// Evicts a container's row; evicting an unknown id is `Ok(false)`.
    pub async fn evict_by_container_id(&self, container_id: &str) -> Result<bool, RegistryError> {
        self.ask(Evict(container_id.to_owned())).await?
    }

    /// Records a spent assertion JTI; `Ok(false)` if it was already spent.
    pub async fn spend_jti(&self, jti: &str, exp: i64, now: i64) -> Result<bool, RegistryError> {
        self.ask(SpendJti {
            jti: jti.to_owned(),
            exp,
            now,
        })
        .await?
    }

    /// Stages a signed leaf; durable (and visible to `leaf_state`) on return.
    pub async fn stage_leaf(
        &self,
        container_id: &str,
        current: Thumbprint,
        pending: PendingLeaf,
    ) -> Result<LeafState, RegistryError> {
        self.ask(StageLeaf {
            container_id: container_id.to_owned(),
            current,
            pending,
        })
        .await?
    }

    /// Promotes a staged leaf; the new thumbprint matches (and the old one
    /// no longer does) the moment this returns.
    pub async fn promote_leaf(
        &self,
        container_id: &str,
        new: Thumbprint,
        now_unix: i64,
    ) -> Result<Promotion, RegistryError> {
        self.ask(PromoteLeaf {
            container_id: container_id.to_owned(),
            new,
            now_unix,
        })
        .await?
    }

    pub fn leaf_state(&self, container_id: &str) -> LeafState {
        self.reader.leaf_state(container_id)
    }

    pub async fn spent_jti_count(&self) -> Result<u64, RegistryError> {
        self.ask(CountSpentJtis).await?
    }

    /// Spends a JTI and records its token durably (or reissues an
    /// unredeemed grant); see [`super::grants`].
    pub async fn issue_token(&self, req: IssueRequest) -> Result<IssueOutcome, RegistryError> {
        self.ask(IssueToken(req)).await?
    }

    /// Marks a grant redeemed; `Ok(false)` if unknown or already redeemed.
    pub async fn redeem_grant(&self, jti: &str, now: i64) -> Result<bool, RegistryError> {
        self.ask(RedeemGrant {
            jti: jti.to_owned(),
            now,
        })
        .await?
    }

    /// Every issued token still valid at `now`.
    pub async fn live_tokens(&self, now: i64) -> Result<Vec<LiveToken>, RegistryError> {
        self.ask(LiveTokens { now }).await?
    }

    /// Closes the redb file and stops the actor; reads keep answering from
    /// the last published index.
    pub async fn shutdown(&self) {
        let _ = self.addr.send(Shutdown).await;
    }

    pub fn lookup(&self, thumbprint: &Thumbprint, cn: &str) -> Result<Arc<Entry>, RegistryError> {
        self.reader.lookup(thumbprint, cn)
    }

    pub fn lookup_by_container_id(&self, container_id: &str) -> Result<Arc<Entry>, RegistryError> {
        self.reader.lookup_by_container_id(container_id)
    }

    pub fn snapshot(&self) -> Vec<Entry> {
        self.reader.snapshot()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new_entry(agent: &str, id: &str, seed: u8) -> NewEntry {
        NewEntry {
            agent_name: agent.into(),
            project: "p".into(),
            container_id: id.into(),
            thumbprint: Thumbprint([seed; 32]),
            registered_at_unix: 1_700_000_000,
            last_seen_unix: 0,
        }
    }

    #[actix::test]
    async fn writes_are_visible_after_commit_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cp.redb");
        let reg = Registry::start(RegistryStore::open(&path).unwrap()).unwrap();
        let e = reg.add(new_entry("dev", "c1", 1)).await.unwrap();
        // Visible the moment `add` returns.
        assert_eq!(
            *reg.lookup(&Thumbprint([1; 32]), "clawker.p.dev").unwrap(),
            e
        );
        assert!(matches!(
            reg.lookup(&Thumbprint([1; 32]), "clawker.p.other"),
            Err(RegistryError::UnknownAgent)
        ));
        assert_eq!(reg.lookup_by_container_id("c1").unwrap().agent_name, "dev");
        reg.add(new_entry("ops", "c2", 2)).await.unwrap();
        assert!(matches!(
            reg.add(new_entry("dup", "c1", 3)).await,
            Err(RegistryError::DuplicateContainer(_))
        ));
        // A refused write publishes nothing.
        assert!(reg.lookup_by_container_id("c1").unwrap().agent_name == "dev");
        assert!(reg.evict_by_container_id("c2").await.unwrap());
        assert!(!reg.evict_by_container_id("c2").await.unwrap());
        assert!(reg.lookup(&Thumbprint([2; 32]), "clawker.p.ops").is_err());
        reg.shutdown().await;
        // Reads keep working from the last snapshot after shutdown; writes fail.
        assert_eq!(reg.snapshot().len(), 1);
        assert!(reg.add(new_entry("x", "c9", 9)).await.is_err());

        let reg = Registry::start(RegistryStore::open(&path).unwrap()).unwrap();
        assert_eq!(reg.snapshot(), vec![e]);
    }

    #[actix::test]
    async fn promotion_swaps_the_indexed_thumbprint_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cp.redb");
        let reg = Registry::start(RegistryStore::open(&path).unwrap()).unwrap();
        reg.add(new_entry("dev", "c1", 1)).await.unwrap();
        let pending = PendingLeaf {
            thumbprint: Thumbprint([2; 32]),
            not_after_unix: 1_700_000_100,
            reason: "half_life".into(),
            staged_at_unix: 1_700_000_000,
        };
        reg.stage_leaf("c1", Thumbprint([1; 32]), pending)
            .await
            .unwrap();
        assert!(reg.leaf_state("c1").pending.is_some());
        assert!(reg.lookup(&Thumbprint([1; 32]), "clawker.p.dev").is_ok());
        let p = reg
            .promote_leaf("c1", Thumbprint([2; 32]), 1_700_000_001)
            .await
            .unwrap();
        assert_eq!(p.old, Thumbprint([1; 32]));
        assert!(reg.lookup(&Thumbprint([1; 32]), "clawker.p.dev").is_err());
        assert_eq!(
            reg.lookup(&Thumbprint([2; 32]), "clawker.p.dev")
                .unwrap()
                .container_id,
            "c1"
        );
        assert_eq!(reg.leaf_state("c1").rotations, 1);
        reg.shutdown().await;
        // The index rebuilt from the file agrees.
        let reg = Registry::start(RegistryStore::open(&path).unwrap()).unwrap();
        assert_eq!(reg.leaf_state("c1").rotations, 1);
        assert_eq!(
            reg.lookup_by_container_id("c1").unwrap().thumbprint,
            Thumbprint([2; 32])
        );
        assert!(reg.evict_by_container_id("c1").await.unwrap());
        assert_eq!(reg.leaf_state("c1"), LeafState::default());
        reg.shutdown().await;
    }

    #[test]
    fn works_outside_an_actix_system() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let reg =
                Registry::start(RegistryStore::open(&dir.path().join("cp.redb")).unwrap()).unwrap();
            let adds = (1..=16u8).map(|i| {
                let reg = reg.clone();
                tokio::spawn(async move { reg.add(new_entry(&format!("a{i}"), "same", i)).await })
            });
            let results = futures::future::join_all(adds).await;
            let ok = results.iter().filter(|r| matches!(r, Ok(Ok(_)))).count();
            assert_eq!(ok, 1, "exactly one Add for one container id wins");
            assert_eq!(reg.snapshot().len(), 1);
            assert!(reg.spend_jti("j", 10, 1).await.unwrap());
            assert!(!reg.spend_jti("j", 10, 1).await.unwrap());
            reg.shutdown().await;
        });
    }
}

#[cfg(test)]
pub(crate) mod tests_support {
    use super::*;

    /// A reader over an empty index (no actor), for layer unit tests.
    pub fn empty_reader() -> RegistryReader {
        RegistryReader {
            index: Arc::new(ArcSwap::from_pointee(Index::default())),
        }
    }
}
