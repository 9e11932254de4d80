//! Token grants (`token_grants`: jti → [`Grant`] as JSON): the bearer token
//! the token endpoint issued for a client assertion, written in the same
//! write transaction that spends the assertion's JTI.
//!
//! Why a grant and not only a spent JTI: an agent's Register must never be
//! bricked by a fault between "assertion spent" and "row committed" (a CP
//! crash, a Docker timeout, a lost HTTP response, a container restart that
//! wipes clawkerd's memory). So:
//!
//! - the token's SHA-256 and expiry are durable with the spent JTI, and the
//!   CP reloads live tokens on start ([`live_tokens`]): a token clawkerd
//!   holds survives a CP restart;
//! - a *reissuable* grant (the agent client's) whose assertion is presented
//!   again before any Register succeeded with it gets a fresh token, and
//!   the previous token is revoked ([`issue`]): clawkerd, having lost or
//!   outlived its token, can always get a new one while its assertion is
//!   valid;
//! - the first Register that succeeds with one of its tokens **redeems**
//!   the grant ([`redeem`]); from then on the assertion is refused like any
//!   replay. Replay protection is kept: at most one live token per
//!   assertion, none after redemption, and the JTI row outlives the
//!   assertion's own `exp`.
//!
//! Additive: a file written by an older build simply has no such table
//! (read paths treat that as empty; the first write creates it), so the
//! registry's schema version is unchanged. A spent JTI without a grant row
//! (spent by an older build) is never reissued.

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::RegistryError;
use super::jti::SPENT_JTIS;

const GRANTS: TableDefinition<&str, &[u8]> = TableDefinition::new("token_grants");

/// One grant: what the token endpoint issued for one assertion.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    pub client_id: String,
    pub scope: String,
    /// SHA-256 of the live bearer token, hex.
    pub token_sha256: String,
    /// Unix seconds after which the token is no longer accepted.
    pub token_exp: i64,
    /// Unix seconds after which the grant (and its JTI) may be pruned: the
    /// assertion's `exp` plus skew, when the assertion itself is refused.
    pub keep_until: i64,
    /// Whether a later exchange of the same assertion may get a new token
    /// (until redeemed).
    pub reissuable: bool,
    /// Set by the first successful Register with one of its tokens.
    pub redeemed_at: Option<i64>,
    /// How many times the token was replaced.
    pub reissued: u32,
}

/// A token to issue for an assertion that passed every check.
#[derive(Debug, Clone)]
pub struct IssueRequest {
    pub jti: String,
    pub client_id: String,
    pub scope: String,
    pub token_sha256: [u8; 32],
    pub token_exp: i64,
    pub keep_until: i64,
    pub reissuable: bool,
    pub now: i64,
}

/// What [`issue`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IssueOutcome {
    /// First use of the assertion: JTI spent and grant written.
    Issued,
    /// A reissuable, unredeemed grant got a new token; the old one is revoked.
    Reissued { revoked_sha256: [u8; 32] },
    /// The JTI is spent and the grant is redeemed, not reissuable, of another
    /// client, or missing: a replay. Nothing was written.
    Replay,
}

/// A token that is still valid, as the token endpoint keeps it in memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveToken {
    pub token_sha256: [u8; 32],
    pub jti: String,
    pub client_id: String,
    pub scope: String,
    pub exp: i64,
}

fn decode(jti: &str, bytes: &[u8]) -> Result<Grant, RegistryError> {
    serde_json::from_slice(bytes).map_err(|e| RegistryError::Corrupt {
        key: format!("token_grants/{jti}"),
        detail: e.to_string(),
    })
}

fn encode(g: &Grant) -> Vec<u8> {
    // A struct of strings and integers always serialises.
    serde_json::to_vec(g).unwrap_or_default()
}

fn sha_from_hex(s: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out).ok()?;
    Some(out)
}

/// Spends the JTI and records its token in one durable transaction, or
/// reissues an unredeemed reissuable grant (see the module doc). Expired
/// JTIs and grants are pruned in the same transaction.
pub fn issue(db: &Database, req: &IssueRequest) -> Result<IssueOutcome, RegistryError> {
    let txn = db.begin_write()?;
    let outcome = {
        let mut spent = txn.open_table(SPENT_JTIS)?;
        let mut grants = txn.open_table(GRANTS)?;
        if spent.get(req.jti.as_str())?.is_some() {
            let existing = match grants.get(req.jti.as_str())? {
                Some(v) => Some(decode(&req.jti, v.value())?),
                None => None,
            };
            let Some(mut g) = existing.filter(|g| {
                g.reissuable && g.redeemed_at.is_none() && g.client_id == req.client_id
            }) else {
                // Dropping the transaction aborts it: nothing is written.
                return Ok(IssueOutcome::Replay);
            };
            let revoked_sha256 = sha_from_hex(&g.token_sha256).unwrap_or([0; 32]);
            g.token_sha256 = hex::encode(req.token_sha256);
            g.token_exp = req.token_exp;
            g.scope = req.scope.clone();
            g.reissued = g.reissued.saturating_add(1);
            grants.insert(req.jti.as_str(), encode(&g).as_slice())?;
            IssueOutcome::Reissued { revoked_sha256 }
        } else {
            let now = req.now;
            spent.retain(|_, exp| exp >= now)?;
            grants.retain(|_, v| {
                serde_json::from_slice::<Grant>(v)
                    .map(|g| g.keep_until >= now)
                    .unwrap_or(false)
            })?;
            spent.insert(req.jti.as_str(), req.keep_until)?;
            let g = Grant {
                client_id: req.client_id.clone(),
                scope: req.scope.clone(),
                token_sha256: hex::encode(req.token_sha256),
                token_exp: req.token_exp,
                keep_until: req.keep_until,
                reissuable: req.reissuable,
                redeemed_at: None,
                reissued: 0,
            };
            grants.insert(req.jti.as_str(), encode(&g).as_slice())?;
            IssueOutcome::Issued
        }
    };
    txn.commit()?;
    Ok(outcome)
}

/// Marks the grant redeemed (a Register succeeded with its token). The
/// token stays valid until it expires (a retried Register after a lost
/// answer is then still idempotent); the assertion can no longer be
/// exchanged. `Ok(false)` when there is no such grant or it already was.
pub fn redeem(db: &Database, jti: &str, now: i64) -> Result<bool, RegistryError> {
    let txn = db.begin_write()?;
    {
        let mut grants = txn.open_table(GRANTS)?;
        let existing = match grants.get(jti)? {
            Some(v) => decode(jti, v.value())?,
            None => return Ok(false),
        };
        if existing.redeemed_at.is_some() {
            return Ok(false);
        }
        let g = Grant {
            redeemed_at: Some(now),
            ..existing
        };
        grants.insert(jti, encode(&g).as_slice())?;
    }
    txn.commit()?;
    Ok(true)
}

/// Every token not yet expired at `now` (loaded by the token endpoint at
/// start). Rows that do not decode are skipped with a log line: a corrupt
/// grant must not keep the CP from starting, and its token is simply gone.
pub fn live_tokens(db: &Database, now: i64) -> Result<Vec<LiveToken>, RegistryError> {
    let txn = db.begin_read()?;
    let table = match txn.open_table(GRANTS) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    let mut out = Vec::new();
    for row in table.iter()? {
        let (k, v) = row?;
        let jti = k.value().to_owned();
        let g = match decode(&jti, v.value()) {
            Ok(g) => g,
            Err(e) => {
                tracing::warn!(error = %e, "agentregistry: skipping undecodable token grant");
                continue;
            }
        };
        if g.token_exp <= now {
            continue;
        }
        let Some(token_sha256) = sha_from_hex(&g.token_sha256) else {
            continue;
        };
        out.push(LiveToken {
            token_sha256,
            jti,
            client_id: g.client_id,
            scope: g.scope,
            exp: g.token_exp,
        });
    }
    Ok(out)
}

/// The grant for a JTI (tests and diagnostics).
pub fn get(db: &Database, jti: &str) -> Result<Option<Grant>, RegistryError> {
    let txn = db.begin_read()?;
    let table = match txn.open_table(GRANTS) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    match table.get(jti)? {
        Some(v) => decode(jti, v.value()).map(Some),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(jti: &str, token: u8, reissuable: bool, now: i64) -> IssueRequest {
        IssueRequest {
            jti: jti.into(),
            client_id: "clawker-agent".into(),
            scope: "agent:self:register".into(),
            token_sha256: [token; 32],
            token_exp: now + 3600,
            keep_until: now + 86_400,
            reissuable,
            now,
        }
    }

    fn open() -> (tempfile::TempDir, super::super::RegistryStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = super::super::RegistryStore::open(&dir.path().join("cp.redb")).unwrap();
        (dir, store)
    }

    #[test]
    fn first_use_spends_the_jti_and_records_the_token_durably() {
        let (dir, store) = open();
        let db = store.database();
        assert_eq!(
            issue(db, &req("a", 1, true, 100)).unwrap(),
            IssueOutcome::Issued
        );
        assert_eq!(super::super::jti::count(db).unwrap(), 1);
        drop(store);
        let store = super::super::RegistryStore::open(&dir.path().join("cp.redb")).unwrap();
        let live = live_tokens(store.database(), 100).unwrap();
        assert_eq!(live.len(), 1);
        assert_eq!(live[0].token_sha256, [1; 32]);
        assert_eq!(live[0].jti, "a");
        assert_eq!(live[0].exp, 3700);
        assert!(
            live_tokens(store.database(), 3700).unwrap().is_empty(),
            "expired"
        );
    }

    #[test]
    fn an_unredeemed_reissuable_grant_gets_a_new_token_and_revokes_the_old() {
        let (_dir, store) = open();
        let db = store.database();
        issue(db, &req("a", 1, true, 100)).unwrap();
        assert_eq!(
            issue(db, &req("a", 2, true, 200)).unwrap(),
            IssueOutcome::Reissued {
                revoked_sha256: [1; 32]
            }
        );
        let live = live_tokens(db, 200).unwrap();
        assert_eq!(live.len(), 1, "one live token per assertion");
        assert_eq!(live[0].token_sha256, [2; 32]);
        assert_eq!(get(db, "a").unwrap().unwrap().reissued, 1);
        assert_eq!(super::super::jti::count(db).unwrap(), 1);
    }

    #[test]
    fn a_redeemed_or_strict_grant_is_a_replay_and_writes_nothing() {
        let (_dir, store) = open();
        let db = store.database();
        issue(db, &req("a", 1, true, 100)).unwrap();
        assert!(redeem(db, "a", 150).unwrap());
        assert!(!redeem(db, "a", 151).unwrap(), "once");
        assert!(!redeem(db, "none", 151).unwrap());
        assert_eq!(
            issue(db, &req("a", 2, true, 200)).unwrap(),
            IssueOutcome::Replay
        );
        // The redeemed grant's token stays valid until it expires.
        assert_eq!(live_tokens(db, 200).unwrap()[0].token_sha256, [1; 32]);

        issue(db, &req("strict", 3, false, 100)).unwrap();
        assert_eq!(
            issue(db, &req("strict", 4, false, 100)).unwrap(),
            IssueOutcome::Replay
        );
        // Another client presenting the same jti never takes the grant over.
        issue(db, &req("c", 5, true, 100)).unwrap();
        let mut other = req("c", 6, true, 100);
        other.client_id = "clawker-cli".into();
        assert_eq!(issue(db, &other).unwrap(), IssueOutcome::Replay);
    }

    #[test]
    fn a_jti_spent_by_an_older_build_is_never_reissued() {
        let (_dir, store) = open();
        let db = store.database();
        assert!(super::super::jti::spend(db, "old", 10_000, 100).unwrap());
        assert_eq!(
            issue(db, &req("old", 1, true, 100)).unwrap(),
            IssueOutcome::Replay
        );
        assert!(live_tokens(db, 100).unwrap().is_empty());
    }

    #[test]
    fn expired_grants_are_pruned_with_their_jtis() {
        let (_dir, store) = open();
        let db = store.database();
        issue(db, &req("a", 1, true, 100)).unwrap(); // keep_until 86_500
        issue(db, &req("b", 2, true, 90_000)).unwrap();
        assert!(get(db, "a").unwrap().is_none());
        assert!(get(db, "b").unwrap().is_some());
        assert_eq!(super::super::jti::count(db).unwrap(), 1);
    }
}
