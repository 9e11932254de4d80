//! Spent client-assertion JTIs (`spent_jtis`: jti → exp, Unix seconds).
//!
//! The table lives in the registry's redb file so that the single-use rule
//! of agent assertions survives a CP restart (the reference keeps it in
//! Hydra's memory and forgets it). Only the registry actor calls [`spend`].

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

use super::RegistryError;

pub(super) const SPENT_JTIS: TableDefinition<&str, i64> = TableDefinition::new("spent_jtis");

/// Records `jti` as spent until `exp`, durably, in one write transaction
/// that also prunes every JTI whose assertion has expired (an expired
/// assertion is refused on `exp` alone, so its JTI no longer needs a row).
///
/// Returns `false` (and writes nothing) if the JTI was already spent.
pub fn spend(db: &Database, jti: &str, exp: i64, now: i64) -> Result<bool, RegistryError> {
    let txn = db.begin_write()?;
    {
        let mut table = txn.open_table(SPENT_JTIS)?;
        if table.get(jti)?.is_some() {
            // Dropping the transaction aborts it: nothing is written.
            return Ok(false);
        }
        table.retain(|_, exp| exp >= now)?;
        table.insert(jti, exp)?;
    }
    txn.commit()?;
    Ok(true)
}

/// Number of recorded JTIs (tests and diagnostics).
pub fn count(db: &Database) -> Result<u64, RegistryError> {
    let txn = db.begin_read()?;
    let table = match txn.open_table(SPENT_JTIS) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(0),
        Err(e) => return Err(e.into()),
    };
    Ok(table.len()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_spent(db: &Database, jti: &str) -> Result<bool, RegistryError> {
        let txn = db.begin_read()?;
        let table = match txn.open_table(SPENT_JTIS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(false),
            Err(e) => return Err(e.into()),
        };
        Ok(table.get(jti)?.is_some())
    }

    #[test]
    fn a_jti_is_spent_once_and_expired_ones_are_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let store = super::super::RegistryStore::open(&dir.path().join("cp.redb")).unwrap();
        let db = store.database();
        assert!(spend(db, "a", 100, 10).unwrap());
        assert!(!spend(db, "a", 100, 10).unwrap());
        assert!(is_spent(db, "a").unwrap());
        // "a" expired at 100; spending "b" at 200 prunes it.
        assert!(spend(db, "b", 300, 200).unwrap());
        assert!(!is_spent(db, "a").unwrap());
        assert_eq!(count(db).unwrap(), 1);
    }
}
