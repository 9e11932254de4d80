//! Registry classification of a freshly connected peer (reference
//! `cp-session.md` §7.2) and the agent-axis events per outcome (§7.3).

use crate::identity::{self, AgentName, ProjectSlug, Thumbprint};
use crate::registry::{Entry, LeafState, PendingLeaf, RegistryError};

/// What the registry says about the certificate a container presented.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Classification {
    /// Row present, thumbprint and canonical CN match.
    Match(Entry),
    /// Row present, CN matches, and the thumbprint is the row's *staged*
    /// leaf: a rotation whose confirmation never reached the CP (it
    /// crashed, or the session broke, after clawkerd took the new leaf).
    /// The caller promotes it.
    PendingMatch(Entry, PendingLeaf),
    /// No row for this container: it must Register.
    Miss,
    ThumbprintMismatch,
    CnMismatch,
    /// The registry could not answer (detail says why).
    NotQueried(String),
}

/// Read access the classifier needs; implemented by the registry handle.
pub trait RegistryLookup: Send + Sync + 'static {
    fn lookup_by_container_id(&self, container_id: &str) -> Result<Entry, RegistryError>;

    /// The container's leaf rotation state (default: never rotated, which
    /// is also what a registry without rotation support reports).
    fn leaf_state(&self, _container_id: &str) -> LeafState {
        LeafState::default()
    }
}

impl RegistryLookup for crate::registry::RegistryStore {
    fn lookup_by_container_id(&self, container_id: &str) -> Result<Entry, RegistryError> {
        crate::registry::RegistryStore::lookup_by_container_id(self, container_id)
    }

    fn leaf_state(&self, container_id: &str) -> LeafState {
        crate::registry::leaf::state(self.database(), container_id).unwrap_or_default()
    }
}

impl RegistryLookup for crate::registry::Registry {
    fn lookup_by_container_id(&self, container_id: &str) -> Result<Entry, RegistryError> {
        crate::registry::Registry::lookup_by_container_id(self, container_id).map(|e| (*e).clone())
    }

    fn leaf_state(&self, container_id: &str) -> LeafState {
        crate::registry::Registry::leaf_state(self, container_id)
    }
}

/// Checks, in the reference order: lookup error, no row, thumbprint, CN.
/// Compares are constant-time (the reference used a plain compare here).
pub fn classify(
    registry: &dyn RegistryLookup,
    container_id: &str,
    peer_cn: &str,
    peer_thumbprint: &Thumbprint,
) -> Classification {
    let entry = match registry.lookup_by_container_id(container_id) {
        Ok(e) => e,
        Err(RegistryError::UnknownAgent) => return Classification::Miss,
        Err(e) => return Classification::NotQueried(format!("registry lookup error: {e}")),
    };
    let pending = if entry.thumbprint.ct_eq(peer_thumbprint) {
        None
    } else {
        match registry.leaf_state(container_id).pending {
            Some(p) if p.thumbprint.ct_eq(peer_thumbprint) => Some(p),
            _ => return Classification::ThumbprintMismatch,
        }
    };
    let expected = match (
        ProjectSlug::new(&entry.project),
        AgentName::new(&entry.agent_name),
    ) {
        (Ok(p), Ok(a)) => identity::canonical_cn(&p, &a),
        (Err(e), _) | (_, Err(e)) => {
            return Classification::NotQueried(format!("registry row CN compose failed: {e}"));
        }
    };
    if !identity::ct_str_eq(&expected, peer_cn) {
        return Classification::CnMismatch;
    }
    match pending {
        Some(p) => Classification::PendingMatch(entry, p),
        None => Classification::Match(entry),
    }
}

/// The container id a leaf's URI SAN binds it to, if it parses.
pub fn leaf_container_id(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    let uris = san.value.general_names.iter().filter_map(|g| match g {
        x509_parser::extensions::GeneralName::URI(u) => Some(*u),
        _ => None,
    });
    identity::container_id_from_uris(uris).map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::store::NewEntry;

    struct Broken;
    impl RegistryLookup for Broken {
        fn lookup_by_container_id(&self, _: &str) -> Result<Entry, RegistryError> {
            Err(RegistryError::Corrupt {
                key: "x".into(),
                detail: "io".into(),
            })
        }
    }

    #[test]
    fn classification_follows_the_reference_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::registry::RegistryStore::open(&dir.path().join("r.redb")).unwrap();
        store
            .add(NewEntry {
                agent_name: "dev".into(),
                project: "myproj".into(),
                container_id: "c1".into(),
                thumbprint: Thumbprint([1; 32]),
                registered_at_unix: 1,
                last_seen_unix: 0,
            })
            .unwrap();
        let tp = Thumbprint([1; 32]);
        assert!(matches!(
            classify(&store, "c1", "clawker.myproj.dev", &tp),
            Classification::Match(_)
        ));
        assert_eq!(
            classify(&store, "c2", "clawker.myproj.dev", &tp),
            Classification::Miss
        );
        assert_eq!(
            classify(&store, "c1", "clawker.myproj.dev", &Thumbprint([2; 32])),
            Classification::ThumbprintMismatch
        );
        assert_eq!(
            classify(&store, "c1", "clawker.other.dev", &tp),
            Classification::CnMismatch
        );
        // A peer without a cert has an all-zero thumbprint: mismatch.
        assert_eq!(
            classify(&store, "c1", "", &Thumbprint([0; 32])),
            Classification::ThumbprintMismatch
        );
        let Classification::NotQueried(d) = classify(&Broken, "c1", "x", &tp) else {
            panic!()
        };
        assert!(d.starts_with("registry lookup error"), "{d}");
    }

    #[test]
    fn a_staged_leaf_matches_as_pending_and_a_retired_one_mismatches() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::registry::RegistryStore::open(&dir.path().join("r.redb")).unwrap();
        store
            .add(NewEntry {
                agent_name: "dev".into(),
                project: "myproj".into(),
                container_id: "c1".into(),
                thumbprint: Thumbprint([1; 32]),
                registered_at_unix: 1,
                last_seen_unix: 0,
            })
            .unwrap();
        let pending = PendingLeaf {
            thumbprint: Thumbprint([2; 32]),
            not_after_unix: 10,
            reason: "half_life".into(),
            staged_at_unix: 1,
        };
        let db = store.database();
        crate::registry::leaf::stage(db, "c1", &Thumbprint([1; 32]), pending.clone()).unwrap();
        assert!(matches!(
            classify(&store, "c1", "clawker.myproj.dev", &Thumbprint([1; 32])),
            Classification::Match(_)
        ));
        assert!(matches!(
            classify(&store, "c1", "clawker.myproj.dev", &Thumbprint([2; 32])),
            Classification::PendingMatch(_, p) if p == pending
        ));
        // The staged leaf still needs the row's CN.
        assert_eq!(
            classify(&store, "c1", "clawker.other.dev", &Thumbprint([2; 32])),
            Classification::CnMismatch
        );
        crate::registry::leaf::promote(db, "c1", &Thumbprint([2; 32]), 5).unwrap();
        assert_eq!(
            classify(&store, "c1", "clawker.myproj.dev", &Thumbprint([1; 32])),
            Classification::ThumbprintMismatch,
            "the retired leaf stops matching"
        );
        assert!(matches!(
            classify(&store, "c1", "clawker.myproj.dev", &Thumbprint([2; 32])),
            Classification::Match(_)
        ));
    }
}
