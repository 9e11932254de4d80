//! Agent identity primitives: short names, canonical CNs, the container URI
//! SAN and certificate thumbprints (reference `identity.md` §2–3).
//!
//! An agent's identity is the pair (project, agent). Neither half may contain
//! a dot, which is what makes the canonical CN `clawker[.<project>].<agent>`
//! an injective mapping: no two valid pairs share a CN.

use std::fmt;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Longest short name, in bytes: `clawker.` + 24 + `.` + 24 = 57 ≤ the
/// 64-byte X.509 CN limit.
pub const SHORT_NAME_MAX: usize = 24;

/// Prefix of every canonical agent CN.
pub const CN_PREFIX: &str = "clawker.";

/// CN of both CP certificates and the TLS server name every client uses.
pub const CONTROL_PLANE_CN: &str = crate::defaults::CP_NAME;

/// Prefix of the URI SAN that binds an agent leaf to one container.
pub const CONTAINER_SAN_PREFIX: &str = "urn:clawker:container:";

/// Why a name was refused. The texts match clawker v0.8.0 so operators and
/// tests can grep for them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("agent name required")]
    AgentRequired,
    #[error("{role} {input:?}: too long (max 24 chars)")]
    TooLong { role: &'static str, input: String },
    #[error(
        "{role} {input:?}: must be the user-typed short name, not the canonical \"clawker....\" form"
    )]
    Canonical { role: &'static str, input: String },
    #[error(
        "{role} {input:?}: must match [a-zA-Z0-9][a-zA-Z0-9_-]* (no dots, no spaces, alphanumeric start)"
    )]
    Pattern { role: &'static str, input: String },
}

/// Validates a short name (agent name or project slug). First failure wins,
/// in the reference order: length, canonical prefix, character pattern.
fn validate_short_name(role: &'static str, s: &str) -> Result<(), NameError> {
    if s.len() > SHORT_NAME_MAX {
        return Err(NameError::TooLong {
            role,
            input: s.to_owned(),
        });
    }
    if s.starts_with(CN_PREFIX) {
        return Err(NameError::Canonical {
            role,
            input: s.to_owned(),
        });
    }
    let mut bytes = s.bytes();
    let first_ok = bytes.next().is_some_and(|b| b.is_ascii_alphanumeric());
    let rest_ok = bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if !(first_ok && rest_ok) {
        return Err(NameError::Pattern {
            role,
            input: s.to_owned(),
        });
    }
    Ok(())
}

/// A validated, non-empty agent short name.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AgentName(String);

impl AgentName {
    pub fn new(s: &str) -> Result<Self, NameError> {
        if s.is_empty() {
            return Err(NameError::AgentRequired);
        }
        validate_short_name("agent name", s)?;
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A validated project slug; the empty slug means "unscoped".
#[derive(Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProjectSlug(String);

impl ProjectSlug {
    pub fn new(s: &str) -> Result<Self, NameError> {
        if !s.is_empty() {
            validate_short_name("project slug", s)?;
        }
        Ok(Self(s.to_owned()))
    }

    /// The unscoped project.
    pub fn unscoped() -> Self {
        Self::default()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

macro_rules! display_as_str {
    ($($t:ty),*) => {$(
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&self.0, f)
            }
        }
    )*};
}
display_as_str!(AgentName, ProjectSlug);

/// `clawker.<agent>` for an unscoped project, else `clawker.<project>.<agent>`.
pub fn canonical_cn(project: &ProjectSlug, agent: &AgentName) -> String {
    if project.is_empty() {
        format!("{CN_PREFIX}{agent}")
    } else {
        format!("{CN_PREFIX}{project}.{agent}")
    }
}

/// Why a container id cannot be bound into a SAN.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SanError {
    #[error("container id must be lowercase letters and digits; got {0:?}")]
    NotLowercaseAlphanumeric(String),
}

/// Builds `urn:clawker:container:<id>`; the id must be non-empty lowercase
/// ASCII letters and digits: a Docker container id (hex, any length, as ids
/// and their short forms are) or, in Swarm mode, a service id (25
/// characters of `[a-z0-9]`).
pub fn container_san(container_id: &str) -> Result<String, SanError> {
    let ok = !container_id.is_empty()
        && container_id
            .bytes()
            .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase());
    if !ok {
        return Err(SanError::NotLowercaseAlphanumeric(container_id.to_owned()));
    }
    Ok(format!("{CONTAINER_SAN_PREFIX}{container_id}"))
}

/// Reads the container id back from URI SANs: the first URI that starts with
/// the prefix and is strictly longer than it wins. Like the reference, the
/// remainder is not re-validated here; callers compare it with what Docker
/// says, which is the check that matters.
pub fn container_id_from_uris<'a>(uris: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    uris.into_iter().find_map(|u| {
        u.strip_prefix(CONTAINER_SAN_PREFIX)
            .filter(|rest| !rest.is_empty())
    })
}

/// SHA-256 of a certificate's DER encoding: the key of every identity row.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Thumbprint(pub [u8; 32]);

impl Thumbprint {
    pub fn of_der(der: &[u8]) -> Self {
        Self(Sha256::digest(der).into())
    }

    pub fn is_zero(&self) -> bool {
        self.0 == [0u8; 32]
    }

    /// Lowercase hex, 64 characters.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses exactly 64 hex characters.
    pub fn from_hex(s: &str) -> Option<Self> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).ok()?;
        Some(Self(out))
    }

    /// Constant-time equality, for comparisons against a presented cert.
    pub fn ct_eq(&self, other: &Thumbprint) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl fmt::Debug for Thumbprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Thumbprint({})", self.to_hex())
    }
}

impl fmt::Display for Thumbprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// Constant-time string equality. Lengths are not secret (CN lengths are
/// public), so an early length mismatch is fine.
pub fn ct_str_eq(a: &str, b: &str) -> bool {
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn name_checks_run_in_reference_order() {
        let long_canonical = format!("clawker.{}", "a".repeat(30));
        assert!(matches!(
            AgentName::new(&long_canonical),
            Err(NameError::TooLong { .. })
        ));
        let e = AgentName::new("clawker.x").unwrap_err();
        assert!(e.to_string().contains("canonical"), "{e}");
        let e = AgentName::new("a.b").unwrap_err();
        assert!(e.to_string().contains("must match"), "{e}");
        assert!(e.to_string().starts_with("agent name \"a.b\""), "{e}");
        let e = ProjectSlug::new("BAD UPPER").unwrap_err();
        assert!(e.to_string().starts_with("project slug"), "{e}");
        assert_eq!(
            AgentName::new("").unwrap_err().to_string(),
            "agent name required"
        );
    }

    #[test]
    fn boundary_names() {
        assert!(AgentName::new(&"a".repeat(24)).is_ok());
        assert!(AgentName::new(&"a".repeat(25)).is_err());
        assert!(AgentName::new("clawker").is_ok(), "bare word is valid");
        assert!(AgentName::new("-x").is_err());
        assert!(AgentName::new("_x").is_err());
        assert!(AgentName::new("x-_9Z").is_ok());
        assert!(AgentName::new("é").is_err());
        assert!(ProjectSlug::new("").unwrap().is_empty());
    }

    #[test]
    fn canonical_cn_two_and_three_segments() {
        let a = AgentName::new("dev").unwrap();
        assert_eq!(canonical_cn(&ProjectSlug::unscoped(), &a), "clawker.dev");
        let p = ProjectSlug::new("web").unwrap();
        assert_eq!(canonical_cn(&p, &a), "clawker.web.dev");
    }

    #[test]
    fn san_takes_container_and_service_ids_and_rejects_the_rest() {
        assert!(container_san("abc111").is_ok());
        // A swarm service id.
        assert!(container_san("y0nhlshy4x2k9fq0vwkz3m1ab").is_ok());
        for bad in ["", "ABC", "ab cd", "ab:cd", "ab/cd", "é"] {
            assert!(container_san(bad).is_err(), "{bad}");
        }
        assert_eq!(
            container_san("G").unwrap_err().to_string(),
            "container id must be lowercase letters and digits; got \"G\""
        );
    }

    #[test]
    fn san_reader_takes_first_non_empty_match() {
        let uris = [
            "https://x",
            "urn:clawker:container:",
            "urn:clawker:container:ab",
            "urn:clawker:container:cd",
        ];
        assert_eq!(container_id_from_uris(uris), Some("ab"));
        assert_eq!(container_id_from_uris(["urn:other:1"]), None);
    }

    #[test]
    fn thumbprint_hex_round_trip() {
        let t = Thumbprint::of_der(b"hello");
        assert_eq!(
            t.to_hex(),
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        assert_eq!(Thumbprint::from_hex(&t.to_hex()), Some(t));
        assert_eq!(Thumbprint::from_hex("abc"), None);
        assert!(t.ct_eq(&t));
        assert!(!t.ct_eq(&Thumbprint([0; 32])));
        assert!(ct_str_eq("clawker.a", "clawker.a"));
        assert!(!ct_str_eq("clawker.a", "clawker.b"));
        assert!(!ct_str_eq("clawker.a", "clawker.ab"));
    }

    fn short_name() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9][a-zA-Z0-9_-]{0,23}"
            .prop_filter("not canonical", |s| !s.starts_with("clawker."))
    }

    proptest! {
        #[test]
        fn distinct_pairs_have_distinct_cns(
            p1 in proptest::option::of(short_name()), a1 in short_name(),
            p2 in proptest::option::of(short_name()), a2 in short_name(),
        ) {
            let p1 = ProjectSlug::new(p1.as_deref().unwrap_or("")).unwrap();
            let p2 = ProjectSlug::new(p2.as_deref().unwrap_or("")).unwrap();
            let a1 = AgentName::new(&a1).unwrap();
            let a2 = AgentName::new(&a2).unwrap();
            let same_pair = p1 == p2 && a1 == a2;
            prop_assert_eq!(canonical_cn(&p1, &a1) == canonical_cn(&p2, &a2), same_pair);
            prop_assert!(canonical_cn(&p1, &a1).len() <= 64);
        }

        #[test]
        fn san_round_trips(id in "[0-9a-f]{1,64}") {
            let san = container_san(&id).unwrap();
            prop_assert_eq!(container_id_from_uris([san.as_str()]), Some(id.as_str()));
        }

        #[test]
        fn invalid_input_never_panics(s in any::<String>()) {
            let _ = AgentName::new(&s);
            let _ = ProjectSlug::new(&s);
            let _ = container_san(&s);
            let _ = Thumbprint::from_hex(&s);
            let _ = container_id_from_uris([s.as_str()]);
        }
    }
}
