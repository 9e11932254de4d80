//! Leaf rotation in the registry file (DESIGN §13): which leaf a container
//! is switching to, how often it rotated, and the thumbprints it retired.
//!
//! Tables (additive; redb creates them on first write, so the schema version
//! is unchanged and an older file opens as "no rotation yet"):
//! - `leaf_state`: container id → [`LeafState`] (JSON);
//! - `leaf_history`: retired thumbprint → [`RetiredLeaf`] (JSON).
//!
//! A rotation is two durable writes. [`stage`] records the leaf the CP just
//! signed as the row's *pending* leaf before the certificate leaves the CP;
//! [`promote`] makes it the row's thumbprint once clawkerd says it is in use,
//! moving the old thumbprint to the history in the same transaction (so the
//! old leaf stops matching at that instant). If anything dies in between,
//! the container comes back presenting either the old leaf (still the row's)
//! or the new one (the pending leaf, which classification accepts and
//! promotes): a crash can never strand an agent on a leaf the row does not
//! know.

use std::collections::HashMap;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};

use super::store::{AGENTS, BY_THUMBPRINT, Entry, RegistryError, read_entry, thumbprint_hex};
use crate::identity::Thumbprint;

const LEAF_STATE: TableDefinition<&str, &[u8]> = TableDefinition::new("leaf_state");
const LEAF_HISTORY: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("leaf_history");

/// Rotation state of one container's leaf.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LeafState {
    /// Completed rotations.
    pub rotations: u32,
    /// `notAfter` of the current leaf when the CP signed it (Unix seconds);
    /// 0 until the first rotation (the leaf `agent run` minted).
    pub not_after_unix: i64,
    /// A leaf the CP signed that clawkerd has not confirmed yet.
    pub pending: Option<PendingLeaf>,
}

/// A signed, not yet confirmed leaf.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PendingLeaf {
    #[serde(with = "thumbprint_hex")]
    pub thumbprint: Thumbprint,
    pub not_after_unix: i64,
    /// Why it was issued (`half_life`, `requested`, `expired`).
    pub reason: String,
    pub staged_at_unix: i64,
}

/// A thumbprint a container used before a rotation.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RetiredLeaf {
    pub container_id: String,
    pub retired_at_unix: i64,
    #[serde(with = "thumbprint_hex")]
    pub replaced_by: Thumbprint,
    pub reason: String,
}

/// What [`promote`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Promotion {
    /// The row, now carrying the new thumbprint.
    pub entry: Entry,
    pub old: Thumbprint,
    pub state: LeafState,
    /// The pending leaf's reason.
    pub reason: String,
}

fn json<T: serde::Serialize>(key: &str, v: &T) -> Result<Vec<u8>, RegistryError> {
    serde_json::to_vec(v).map_err(|e| RegistryError::Corrupt {
        key: key.to_owned(),
        detail: e.to_string(),
    })
}

fn parse<T: serde::de::DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, RegistryError> {
    serde_json::from_slice(bytes).map_err(|e| RegistryError::Corrupt {
        key: key.to_owned(),
        detail: e.to_string(),
    })
}

fn state_in(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    container_id: &str,
) -> Result<LeafState, RegistryError> {
    match table.get(container_id)? {
        Some(v) => parse(container_id, v.value()),
        None => Ok(LeafState::default()),
    }
}

/// Records `pending` as the container's staged leaf, durably. Refused unless
/// the row still names `current` (the leaf of the session that asked), and
/// unless the new thumbprint is unknown to every row and to the history.
/// A previous staged leaf is replaced (one pending leaf at a time).
pub fn stage(
    db: &Database,
    container_id: &str,
    current: &Thumbprint,
    pending: PendingLeaf,
) -> Result<LeafState, RegistryError> {
    let txn = db.begin_write()?;
    let state = {
        let agents = txn.open_table(AGENTS)?;
        let entry = read_entry(&agents, container_id)?.ok_or(RegistryError::UnknownAgent)?;
        if !entry.thumbprint.ct_eq(current) {
            return Err(RegistryError::StaleLeaf(container_id.to_owned()));
        }
        let by_thumb = txn.open_table(BY_THUMBPRINT)?;
        let history = txn.open_table(LEAF_HISTORY)?;
        if by_thumb.get(&pending.thumbprint.0)?.is_some()
            || history.get(&pending.thumbprint.0)?.is_some()
        {
            return Err(RegistryError::DuplicateThumbprint(
                pending.thumbprint.to_hex(),
            ));
        }
        let mut states = txn.open_table(LEAF_STATE)?;
        let mut state = state_in(&states, container_id)?;
        state.pending = Some(pending);
        states.insert(container_id, json(container_id, &state)?.as_slice())?;
        state
    };
    txn.commit()?;
    Ok(state)
}

/// Makes the staged leaf `new` the row's thumbprint, durably, in one
/// transaction: row, thumbprint index, history (the old thumbprint, which
/// stops matching), rotation count.
pub fn promote(
    db: &Database,
    container_id: &str,
    new: &Thumbprint,
    now_unix: i64,
) -> Result<Promotion, RegistryError> {
    let txn = db.begin_write()?;
    let promotion = {
        let mut agents = txn.open_table(AGENTS)?;
        let mut entry = read_entry(&agents, container_id)?.ok_or(RegistryError::UnknownAgent)?;
        let mut states = txn.open_table(LEAF_STATE)?;
        let mut state = state_in(&states, container_id)?;
        let pending = match state.pending.take() {
            Some(p) if p.thumbprint.ct_eq(new) => p,
            _ => return Err(RegistryError::NoPendingLeaf(container_id.to_owned())),
        };
        let old = entry.thumbprint;
        entry.thumbprint = pending.thumbprint;
        agents.insert(container_id, json(container_id, &entry)?.as_slice())?;
        let mut by_thumb = txn.open_table(BY_THUMBPRINT)?;
        by_thumb.remove(&old.0)?;
        by_thumb.insert(&pending.thumbprint.0, container_id)?;
        let mut history = txn.open_table(LEAF_HISTORY)?;
        let retired = RetiredLeaf {
            container_id: container_id.to_owned(),
            retired_at_unix: now_unix,
            replaced_by: pending.thumbprint,
            reason: pending.reason.clone(),
        };
        history.insert(&old.0, json(container_id, &retired)?.as_slice())?;
        state.rotations = state.rotations.saturating_add(1);
        state.not_after_unix = pending.not_after_unix;
        states.insert(container_id, json(container_id, &state)?.as_slice())?;
        Promotion {
            entry,
            old,
            state,
            reason: pending.reason,
        }
    };
    txn.commit()?;
    Ok(promotion)
}

/// Inside an evicting transaction: the container's rotation state and
/// retired thumbprints go with its row.
pub(super) fn forget(txn: &WriteTransaction, container_id: &str) -> Result<(), RegistryError> {
    txn.open_table(LEAF_STATE)?.remove(container_id)?;
    txn.open_table(LEAF_HISTORY)?.retain(|_, v| {
        serde_json::from_slice::<RetiredLeaf>(v).map_or(true, |r| r.container_id != container_id)
    })?;
    Ok(())
}

/// Inside an adding transaction: whether `thumbprint` was retired by a
/// rotation (a retired leaf never becomes anyone's identity again).
pub(super) fn is_retired(
    txn: &WriteTransaction,
    thumbprint: &Thumbprint,
) -> Result<bool, RegistryError> {
    Ok(txn.open_table(LEAF_HISTORY)?.get(&thumbprint.0)?.is_some())
}

/// One container's rotation state (default: never rotated).
pub fn state(db: &Database, container_id: &str) -> Result<LeafState, RegistryError> {
    let txn = db.begin_read()?;
    match txn.open_table(LEAF_STATE) {
        Ok(t) => state_in(&t, container_id),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(LeafState::default()),
        Err(e) => Err(e.into()),
    }
}

/// Every container's rotation state (the actor's index loads it at start).
pub fn all_states(db: &Database) -> Result<HashMap<String, LeafState>, RegistryError> {
    let txn = db.begin_read()?;
    let table = match txn.open_table(LEAF_STATE) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(HashMap::new()),
        Err(e) => return Err(e.into()),
    };
    let mut out = HashMap::new();
    for row in table.iter()? {
        let (k, v) = row?;
        match parse::<LeafState>(k.value(), v.value()) {
            Ok(s) => {
                out.insert(k.value().to_owned(), s);
            }
            Err(e) => {
                tracing::error!(container_id = k.value(), error = %e, "agentregistry: skipping malformed leaf state")
            }
        }
    }
    Ok(out)
}

/// The history entry of a retired thumbprint, if it is one.
pub fn retired(
    db: &Database,
    thumbprint: &Thumbprint,
) -> Result<Option<RetiredLeaf>, RegistryError> {
    let txn = db.begin_read()?;
    let table = match txn.open_table(LEAF_HISTORY) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    match table.get(&thumbprint.0)? {
        Some(v) => parse(&thumbprint.to_hex(), v.value()).map(Some),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::store::{NewEntry, RegistryStore};

    fn open() -> (tempfile::TempDir, RegistryStore) {
        let dir = tempfile::tempdir().unwrap();
        let s = RegistryStore::open(&dir.path().join("cp.redb")).unwrap();
        s.add(NewEntry {
            agent_name: "dev".into(),
            project: "web".into(),
            container_id: "c1".into(),
            thumbprint: Thumbprint([1; 32]),
            registered_at_unix: 1_700_000_000,
            last_seen_unix: 0,
        })
        .unwrap();
        (dir, s)
    }

    fn pending(seed: u8) -> PendingLeaf {
        PendingLeaf {
            thumbprint: Thumbprint([seed; 32]),
            not_after_unix: 1_700_000_100 + seed as i64,
            reason: "half_life".into(),
            staged_at_unix: 1_700_000_050,
        }
    }

    #[test]
    fn stage_then_promote_swaps_the_thumbprint_and_keeps_history() {
        let (_d, s) = open();
        let db = s.database();
        let st = stage(db, "c1", &Thumbprint([1; 32]), pending(2)).unwrap();
        assert_eq!(st.pending.as_ref().unwrap().thumbprint, Thumbprint([2; 32]));
        // Staged only: the row still names the old leaf.
        assert_eq!(
            s.lookup_by_container_id("c1").unwrap().thumbprint,
            Thumbprint([1; 32])
        );
        let p = promote(db, "c1", &Thumbprint([2; 32]), 1_700_000_060).unwrap();
        assert_eq!(p.old, Thumbprint([1; 32]));
        assert_eq!(p.entry.thumbprint, Thumbprint([2; 32]));
        assert_eq!(p.state.rotations, 1);
        assert_eq!(p.state.not_after_unix, 1_700_000_102);
        assert!(p.state.pending.is_none());
        assert_eq!(p.reason, "half_life");
        // The new leaf matches, the old one no longer does.
        assert!(s.lookup(&Thumbprint([2; 32]), "clawker.web.dev").is_ok());
        assert!(matches!(
            s.lookup(&Thumbprint([1; 32]), "clawker.web.dev"),
            Err(RegistryError::UnknownAgent)
        ));
        let r = retired(db, &Thumbprint([1; 32])).unwrap().unwrap();
        assert_eq!(r.container_id, "c1");
        assert_eq!(r.replaced_by, Thumbprint([2; 32]));
        // A second rotation counts up; both old leaves stay in the history.
        stage(db, "c1", &Thumbprint([2; 32]), pending(3)).unwrap();
        let p = promote(db, "c1", &Thumbprint([3; 32]), 1_700_000_070).unwrap();
        assert_eq!(p.state.rotations, 2);
        assert!(retired(db, &Thumbprint([2; 32])).unwrap().is_some());
        assert_eq!(all_states(db).unwrap()["c1"].rotations, 2);
    }

    #[test]
    fn stage_refuses_a_stale_session_and_known_thumbprints() {
        let (_d, s) = open();
        let db = s.database();
        assert!(matches!(
            stage(db, "c1", &Thumbprint([9; 32]), pending(2)),
            Err(RegistryError::StaleLeaf(_))
        ));
        assert!(matches!(
            stage(db, "nope", &Thumbprint([1; 32]), pending(2)),
            Err(RegistryError::UnknownAgent)
        ));
        // Its own current thumbprint, or a retired one, is not a new leaf.
        assert!(matches!(
            stage(db, "c1", &Thumbprint([1; 32]), pending(1)),
            Err(RegistryError::DuplicateThumbprint(_))
        ));
        stage(db, "c1", &Thumbprint([1; 32]), pending(2)).unwrap();
        promote(db, "c1", &Thumbprint([2; 32]), 1).unwrap();
        assert!(matches!(
            stage(db, "c1", &Thumbprint([2; 32]), pending(1)),
            Err(RegistryError::DuplicateThumbprint(_))
        ));
        // Promoting something never staged changes nothing.
        assert!(matches!(
            promote(db, "c1", &Thumbprint([7; 32]), 2),
            Err(RegistryError::NoPendingLeaf(_))
        ));
        assert_eq!(
            s.lookup_by_container_id("c1").unwrap().thumbprint,
            Thumbprint([2; 32])
        );
        // A retired thumbprint cannot be registered for another container.
        let e = s
            .add(NewEntry {
                agent_name: "dev".into(),
                project: "web".into(),
                container_id: "c2".into(),
                thumbprint: Thumbprint([1; 32]),
                registered_at_unix: 1_700_000_000,
                last_seen_unix: 0,
            })
            .unwrap_err();
        assert!(matches!(e, RegistryError::DuplicateThumbprint(_)), "{e}");
    }

    #[test]
    fn a_newer_stage_replaces_the_pending_leaf() {
        let (_d, s) = open();
        let db = s.database();
        stage(db, "c1", &Thumbprint([1; 32]), pending(2)).unwrap();
        stage(db, "c1", &Thumbprint([1; 32]), pending(3)).unwrap();
        assert!(matches!(
            promote(db, "c1", &Thumbprint([2; 32]), 1),
            Err(RegistryError::NoPendingLeaf(_))
        ));
        assert_eq!(
            promote(db, "c1", &Thumbprint([3; 32]), 1)
                .unwrap()
                .state
                .rotations,
            1
        );
    }

    #[test]
    fn evict_forgets_rotation_state_and_history() {
        let (_d, s) = open();
        let db = s.database();
        stage(db, "c1", &Thumbprint([1; 32]), pending(2)).unwrap();
        promote(db, "c1", &Thumbprint([2; 32]), 1).unwrap();
        assert!(s.evict_by_container_id("c1").unwrap());
        assert!(all_states(db).unwrap().is_empty());
        assert!(retired(db, &Thumbprint([1; 32])).unwrap().is_none());
    }
}
