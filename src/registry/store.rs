//! redb-backed identity rows.
//!
//! Tables (all in one file):
//! - `agents`: container id → [`Entry`] (JSON), the primary rows;
//! - `agents_by_thumbprint`: thumbprint → container id, a unique index;
//! - `meta`: `schema_version` → u64, with forward migrations;
//! - `leaf_state`, `leaf_history`: leaf rotation ([`super::leaf`]).
//!
//! Every write is its own durable (fsync'd) transaction, so a row is visible
//! to readers only after it is on disk, and a `kill -9` at any moment loses
//! no committed row. Both uniqueness rules (one row per container id, one
//! row per thumbprint) are checked inside the write transaction: a collision
//! is an error, never an overwrite.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::identity::{self, AgentName, ProjectSlug, Thumbprint};

pub(super) const AGENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("agents");
pub(super) const BY_THUMBPRINT: TableDefinition<&[u8; 32], &str> =
    TableDefinition::new("agents_by_thumbprint");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const SCHEMA_KEY: &str = "schema_version";

/// Schema version this build writes. Bump it and append to [`MIGRATIONS`]
/// when the layout changes; older files are migrated forward on open.
pub const SCHEMA_VERSION: u64 = 1;

/// A forward migration from version `i + 1` to `i + 2` (index `i`), run in
/// the same transaction that records the new version.
type Migration = fn(&redb::WriteTransaction) -> Result<(), redb::Error>;
const MIGRATIONS: &[Migration] = &[];

/// One registered agent container.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Entry {
    pub agent_name: String,
    /// Empty for the unscoped project.
    pub project: String,
    pub container_id: String,
    #[serde(with = "thumbprint_hex")]
    pub thumbprint: Thumbprint,
    /// `clawker[.<project>].<agent>`, computed at Add.
    pub canonical_cn: String,
    pub registered_at_unix: i64,
    pub last_seen_unix: i64,
}

pub(super) mod thumbprint_hex {
    use crate::identity::Thumbprint;
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(t: &Thumbprint, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&t.to_hex())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Thumbprint, D::Error> {
        let s = String::deserialize(d)?;
        Thumbprint::from_hex(&s).ok_or_else(|| {
            D::Error::custom(format!("agentregistry: malformed thumbprint_hex {s:?}"))
        })
    }
}

/// A new row as callers describe it; the store computes the canonical CN.
#[derive(Debug, Clone)]
pub struct NewEntry {
    pub agent_name: String,
    pub project: String,
    pub container_id: String,
    pub thumbprint: Thumbprint,
    pub registered_at_unix: i64,
    /// Zero means "same as registered_at".
    pub last_seen_unix: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// No row, or the thumbprint matched but the CN did not: deliberately
    /// indistinguishable.
    #[error("agentregistry: unknown agent")]
    UnknownAgent,
    #[error("agentregistry: invalid project: {0}")]
    InvalidProject(identity::NameError),
    #[error("agentregistry: invalid agent name: {0}")]
    InvalidAgentName(identity::NameError),
    #[error("agentregistry: persist entry: container id {0:?} is already registered")]
    DuplicateContainer(String),
    #[error("agentregistry: persist entry: thumbprint {0} is already registered")]
    DuplicateThumbprint(String),
    #[error("agentregistry: open called with empty dbPath")]
    EmptyPath,
    #[error("agentregistry: parent dir {0} missing")]
    ParentMissing(PathBuf),
    #[error(
        "agentregistry: {path} has schema version {found}, newer than this build's {SCHEMA_VERSION}; upgrade clawker"
    )]
    SchemaTooNew { path: PathBuf, found: u64 },
    #[error("agentregistry: corrupt row for {key:?}: {detail}")]
    Corrupt { key: String, detail: String },
    #[error("agentregistry: storage: {0}")]
    Storage(#[from] redb::Error),
    /// The registry actor is gone or shut down.
    #[error("agentregistry: unavailable: {0}")]
    Unavailable(String),
    /// A rotation for a session whose leaf is no longer the row's.
    #[error("agentregistry: rotate {0}: the row no longer names this session's leaf")]
    StaleLeaf(String),
    /// A promotion of a leaf that was never staged (or was replaced).
    #[error("agentregistry: rotate {0}: no staged leaf with that thumbprint")]
    NoPendingLeaf(String),
}

impl RegistryError {
    /// The operation may succeed if retried later (storage trouble — a
    /// full disk, an I/O error — or the actor unavailable), as opposed to
    /// a verdict about the input (unknown agent, duplicate, bad name).
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Storage(_) | Self::Unavailable(_))
    }
}

macro_rules! storage_from {
    ($($t:ty),*) => {$(
        impl From<$t> for RegistryError {
            fn from(e: $t) -> Self { RegistryError::Storage(e.into()) }
        }
    )*};
}
storage_from!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// The redb file. Cheap to clone (shares one `Database`); all methods block
/// on disk I/O, so async callers run them on a blocking thread.
#[derive(Clone)]
pub struct RegistryStore {
    db: Arc<Database>,
    path: PathBuf,
}

impl std::fmt::Debug for RegistryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryStore")
            .field("path", &self.path)
            .finish()
    }
}

impl RegistryStore {
    /// Opens (or creates) the file, creating tables and migrating forward.
    /// The parent directory must exist: a missing state dir is a
    /// configuration error we report rather than paper over.
    pub fn open(path: &Path) -> Result<Self, RegistryError> {
        if path.as_os_str().is_empty() {
            return Err(RegistryError::EmptyPath);
        }
        let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
        if let Some(parent) = parent
            && !parent.is_dir()
        {
            return Err(RegistryError::ParentMissing(parent.to_owned()));
        }
        let db = Database::create(path)?;
        let store = Self {
            db: Arc::new(db),
            path: path.to_owned(),
        };
        store.ensure_schema()?;
        let rows = store.snapshot()?.len();
        tracing::info!(db_path = %path.display(), rows, "agentregistry: registry opened");
        Ok(store)
    }

    fn ensure_schema(&self) -> Result<(), RegistryError> {
        let txn = self.db.begin_write()?;
        {
            let mut meta = txn.open_table(META)?;
            let found = meta.get(SCHEMA_KEY)?.map(|v| v.value());
            match found {
                Some(v) if v > SCHEMA_VERSION => {
                    return Err(RegistryError::SchemaTooNew {
                        path: self.path.clone(),
                        found: v,
                    });
                }
                Some(v) => {
                    for (i, migrate) in MIGRATIONS.iter().enumerate().skip((v - 1) as usize) {
                        tracing::warn!(from = i + 1, to = i + 2, "agentregistry: migrating schema");
                        migrate(&txn)?;
                    }
                }
                None => {}
            }
            meta.insert(SCHEMA_KEY, SCHEMA_VERSION)?;
            txn.open_table(AGENTS)?;
            txn.open_table(BY_THUMBPRINT)?;
        }
        txn.commit()?;
        Ok(())
    }

    /// The shared database, for sibling tables that must commit in the same
    /// file (e.g. spent assertion JTIs).
    pub fn database(&self) -> &Arc<Database> {
        &self.db
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Adds a row, durably. Zero thumbprint, empty container id and zero
    /// registration time are programmer errors and panic; invalid names are
    /// returned errors; a duplicate container id or thumbprint is an error,
    /// never an overwrite.
    pub fn add(&self, new: NewEntry) -> Result<Entry, RegistryError> {
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
        let project = ProjectSlug::new(&new.project).map_err(RegistryError::InvalidProject)?;
        let agent = AgentName::new(&new.agent_name).map_err(RegistryError::InvalidAgentName)?;
        let entry = Entry {
            canonical_cn: identity::canonical_cn(&project, &agent),
            agent_name: new.agent_name,
            project: new.project,
            container_id: new.container_id,
            thumbprint: new.thumbprint,
            registered_at_unix: new.registered_at_unix,
            last_seen_unix: if new.last_seen_unix == 0 {
                new.registered_at_unix
            } else {
                new.last_seen_unix
            },
        };
        let bytes = serde_json::to_vec(&entry).map_err(|e| RegistryError::Corrupt {
            key: entry.container_id.clone(),
            detail: e.to_string(),
        })?;
        let txn = self.db.begin_write()?;
        {
            let mut agents = txn.open_table(AGENTS)?;
            let mut by_thumb = txn.open_table(BY_THUMBPRINT)?;
            if agents.get(entry.container_id.as_str())?.is_some() {
                return Err(RegistryError::DuplicateContainer(entry.container_id));
            }
            if by_thumb.get(&entry.thumbprint.0)?.is_some()
                || super::leaf::is_retired(&txn, &entry.thumbprint)?
            {
                return Err(RegistryError::DuplicateThumbprint(
                    entry.thumbprint.to_hex(),
                ));
            }
            agents.insert(entry.container_id.as_str(), bytes.as_slice())?;
            by_thumb.insert(&entry.thumbprint.0, entry.container_id.as_str())?;
        }
        txn.commit()?;
        tracing::info!(
            agent = %entry.agent_name,
            project = %entry.project,
            container_id = %entry.container_id,
            "agentregistry: agent registered"
        );
        Ok(entry)
    }

    /// The row for a presented certificate: thumbprint must exist and the
    /// presented CN must equal the stored canonical CN (constant time). Every
    /// miss is the same `UnknownAgent`.
    pub fn lookup(&self, thumbprint: &Thumbprint, cn: &str) -> Result<Entry, RegistryError> {
        let txn = self.db.begin_read()?;
        let by_thumb = txn.open_table(BY_THUMBPRINT)?;
        let Some(id) = by_thumb.get(&thumbprint.0)? else {
            return Err(RegistryError::UnknownAgent);
        };
        let agents = txn.open_table(AGENTS)?;
        let entry = read_entry(&agents, id.value())?.ok_or(RegistryError::UnknownAgent)?;
        if !identity::ct_str_eq(cn, &entry.canonical_cn) {
            return Err(RegistryError::UnknownAgent);
        }
        Ok(entry)
    }

    /// The row for a container id (exact, case-sensitive), without a CN
    /// check: callers compare thumbprint and CN themselves.
    pub fn lookup_by_container_id(&self, container_id: &str) -> Result<Entry, RegistryError> {
        if container_id.is_empty() {
            return Err(RegistryError::UnknownAgent);
        }
        let txn = self.db.begin_read()?;
        let agents = txn.open_table(AGENTS)?;
        read_entry(&agents, container_id)?.ok_or(RegistryError::UnknownAgent)
    }

    /// Deletes the container's row; evicting an unknown id is not an error.
    /// Returns whether a row was removed.
    pub fn evict_by_container_id(&self, container_id: &str) -> Result<bool, RegistryError> {
        if container_id.is_empty() {
            return Ok(false);
        }
        let txn = self.db.begin_write()?;
        let removed = {
            let mut agents = txn.open_table(AGENTS)?;
            let mut by_thumb = txn.open_table(BY_THUMBPRINT)?;
            let old = agents.remove(container_id)?.map(|v| v.value().to_vec());
            match old {
                Some(bytes) => {
                    // Remove the index entry even if the row is unreadable,
                    // so a corrupt row can always be evicted.
                    if let Ok(e) = serde_json::from_slice::<Entry>(&bytes) {
                        by_thumb.remove(&e.thumbprint.0)?;
                    } else {
                        by_thumb.retain(|_, id| id != container_id)?;
                    }
                    true
                }
                None => false,
            }
        };
        if removed {
            super::leaf::forget(&txn, container_id)?;
        }
        txn.commit()?;
        if removed {
            tracing::info!(rows = 1, container_id, "agentregistry: agent evicted");
        }
        Ok(removed)
    }

    /// Every row, sorted by (project, agent name). A malformed row is
    /// skipped with an error log rather than hiding every other row.
    pub fn snapshot(&self) -> Result<Vec<Entry>, RegistryError> {
        let txn = self.db.begin_read()?;
        let agents = txn.open_table(AGENTS)?;
        let mut out = Vec::new();
        for row in agents.iter()? {
            let (k, v) = row?;
            match serde_json::from_slice::<Entry>(v.value()) {
                Ok(e) => out.push(e),
                Err(e) => tracing::error!(
                    container_id = k.value(),
                    error = %e,
                    "agentregistry: skipping malformed row in Snapshot"
                ),
            }
        }
        out.sort_by(|a, b| {
            (a.project.as_str(), a.agent_name.as_str())
                .cmp(&(b.project.as_str(), b.agent_name.as_str()))
        });
        Ok(out)
    }
}

pub(super) fn read_entry(
    agents: &impl ReadableTable<&'static str, &'static [u8]>,
    container_id: &str,
) -> Result<Option<Entry>, RegistryError> {
    let Some(v) = agents.get(container_id)? else {
        return Ok(None);
    };
    serde_json::from_slice(v.value())
        .map(Some)
        .map_err(|e| RegistryError::Corrupt {
            key: container_id.to_owned(),
            detail: e.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    impl RegistryStore {
        /// Schema version recorded in the file.
        fn schema_version(&self) -> Result<u64, RegistryError> {
            let txn = self.db.begin_read()?;
            let meta = txn.open_table(META)?;
            Ok(meta.get(SCHEMA_KEY)?.map(|v| v.value()).unwrap_or(0))
        }
    }

    fn new_entry(agent: &str, project: &str, id: &str, seed: u8) -> NewEntry {
        NewEntry {
            agent_name: agent.into(),
            project: project.into(),
            container_id: id.into(),
            thumbprint: Thumbprint([seed; 32]),
            registered_at_unix: 1_700_000_000,
            last_seen_unix: 0,
        }
    }

    fn open_temp() -> (tempfile::TempDir, RegistryStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = RegistryStore::open(&dir.path().join("cp.redb")).unwrap();
        (dir, store)
    }

    #[test]
    fn add_then_lookup_checks_cn() {
        let (_d, s) = open_temp();
        let e = s.add(new_entry("dev", "web", "abc", 1)).unwrap();
        assert_eq!(e.canonical_cn, "clawker.web.dev");
        assert_eq!(e.last_seen_unix, e.registered_at_unix);
        assert_eq!(
            s.lookup(&Thumbprint([1; 32]), "clawker.web.dev").unwrap(),
            e
        );
        assert!(matches!(
            s.lookup(&Thumbprint([1; 32]), "clawker.web.other"),
            Err(RegistryError::UnknownAgent)
        ));
        assert!(matches!(
            s.lookup(&Thumbprint([1; 32]), ""),
            Err(RegistryError::UnknownAgent)
        ));
        assert!(matches!(
            s.lookup(&Thumbprint([2; 32]), "clawker.web.dev"),
            Err(RegistryError::UnknownAgent)
        ));
        assert_eq!(s.lookup_by_container_id("abc").unwrap(), e);
        assert!(matches!(
            s.lookup_by_container_id(""),
            Err(RegistryError::UnknownAgent)
        ));
        assert!(matches!(
            s.lookup_by_container_id("ABC"),
            Err(RegistryError::UnknownAgent)
        ));
    }

    #[test]
    fn collisions_are_errors_not_overwrites() {
        let (_d, s) = open_temp();
        s.add(new_entry("a", "", "c1", 1)).unwrap();
        assert!(matches!(
            s.add(new_entry("b", "", "c1", 2)),
            Err(RegistryError::DuplicateContainer(_))
        ));
        assert!(matches!(
            s.add(new_entry("b", "", "c2", 1)),
            Err(RegistryError::DuplicateThumbprint(_))
        ));
        let rows = s.snapshot().unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].agent_name, "a");
    }

    #[test]
    fn invalid_names_are_errors_and_persist_nothing() {
        let (_d, s) = open_temp();
        let e = s.add(new_entry("", "web", "c1", 1)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "agentregistry: invalid agent name: agent name required"
        );
        let e = s.add(new_entry("dev", "BAD UPPER", "c1", 1)).unwrap_err();
        assert!(
            e.to_string().starts_with("agentregistry: invalid project:"),
            "{e}"
        );
        assert!(s.snapshot().unwrap().is_empty());
    }

    #[test]
    #[should_panic(expected = "zero thumbprint")]
    fn add_panics_on_zero_thumbprint() {
        let (_d, s) = open_temp();
        let _ = s.add(new_entry("a", "", "c1", 0));
    }

    #[test]
    #[should_panic(expected = "empty ContainerID")]
    fn add_panics_on_empty_container_id() {
        let (_d, s) = open_temp();
        let _ = s.add(new_entry("a", "", "", 1));
    }

    #[test]
    fn evict_removes_row_and_index() {
        let (_d, s) = open_temp();
        s.add(new_entry("a", "", "c1", 1)).unwrap();
        assert!(s.evict_by_container_id("c1").unwrap());
        assert!(!s.evict_by_container_id("c1").unwrap());
        assert!(!s.evict_by_container_id("").unwrap());
        assert!(s.lookup(&Thumbprint([1; 32]), "clawker.a").is_err());
        // The thumbprint is free again.
        s.add(new_entry("a", "", "c2", 1)).unwrap();
    }

    #[test]
    fn snapshot_is_sorted_by_project_then_agent() {
        let (_d, s) = open_temp();
        s.add(new_entry("zed", "b", "c1", 1)).unwrap();
        s.add(new_entry("amy", "b", "c2", 2)).unwrap();
        s.add(new_entry("bob", "", "c3", 3)).unwrap();
        s.add(new_entry("Zed", "a", "c4", 4)).unwrap();
        let order: Vec<(String, String)> = s
            .snapshot()
            .unwrap()
            .into_iter()
            .map(|e| (e.project, e.agent_name))
            .collect();
        assert_eq!(
            order,
            vec![
                ("".into(), "bob".into()),
                ("a".into(), "Zed".into()),
                ("b".into(), "amy".into()),
                ("b".into(), "zed".into()),
            ]
        );
    }

    #[test]
    fn reopen_finds_every_committed_row() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cp.redb");
        {
            let s = RegistryStore::open(&path).unwrap();
            for i in 1..=50u8 {
                s.add(new_entry(&format!("a{i}"), "p", &format!("c{i}"), i))
                    .unwrap();
            }
            s.evict_by_container_id("c7").unwrap();
        }
        let s = RegistryStore::open(&path).unwrap();
        assert_eq!(s.snapshot().unwrap().len(), 49);
        assert_eq!(s.schema_version().unwrap(), SCHEMA_VERSION);
        assert_eq!(
            s.lookup(&Thumbprint([9; 32]), "clawker.p.a9")
                .unwrap()
                .container_id,
            "c9"
        );
    }

    #[test]
    fn open_refuses_missing_parent_and_newer_schema() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            RegistryStore::open(&dir.path().join("nope/cp.redb")),
            Err(RegistryError::ParentMissing(_))
        ));
        assert!(matches!(
            RegistryStore::open(Path::new("")),
            Err(RegistryError::EmptyPath)
        ));
        let path = dir.path().join("cp.redb");
        {
            let s = RegistryStore::open(&path).unwrap();
            let txn = s.db.begin_write().unwrap();
            txn.open_table(META)
                .unwrap()
                .insert(SCHEMA_KEY, SCHEMA_VERSION + 1)
                .unwrap();
            txn.commit().unwrap();
        }
        let err = RegistryStore::open(&path).unwrap_err();
        assert!(matches!(err, RegistryError::SchemaTooNew { .. }), "{err}");
    }

    #[test]
    fn garbage_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cp.redb");
        std::fs::write(&path, b"this is not a redb file at all, just text").unwrap();
        let err = RegistryStore::open(&path).unwrap_err();
        assert!(
            err.to_string().starts_with("agentregistry: storage:"),
            "{err}"
        );
    }
}
