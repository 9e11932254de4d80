//! The agent's current leaf: the certificate clawkerd serves :7700 with and
//! presents to the CP's agent API. It starts as the bootstrap leaf (or a
//! rotated one persisted by an earlier run of this container), and is
//! replaced in place when a rotation completes ([`super::renew`]): new TLS
//! handshakes use the new leaf, open connections are untouched.
//!
//! Persistence: `<state dir>/leaf.pem` holds the rotated certificate and its
//! private key (file 0600, directory 0700), written atomically (temp file +
//! rename), so a container restart keeps the identity its registry row now
//! names. At boot a persisted leaf is preferred when it parses, its key
//! matches, and it chains to the bootstrap CA (at any time: an expired
//! rotated leaf is still newer than the bootstrap one; the CP decides what
//! an expired leaf is worth).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use tokio::sync::watch;

use super::config::Bootstrap;
use crate::identity::Thumbprint;
use crate::{pki, tls};

/// File name of the persisted rotated leaf in the state directory.
pub const LEAF_FILE: &str = "leaf.pem";

/// Why a leaf cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum LeafError {
    #[error("{0}")]
    Pem(#[from] tls::TlsError),
    #[error("certificate does not parse")]
    Parse,
    #[error("key: {0}")]
    Key(rustls::Error),
    #[error("does not chain to the CA: {0}")]
    Chain(rustls::Error),
    #[error("persist {}: {source}", .path.display())]
    Persist {
        path: PathBuf,
        source: pki::PkiError,
    },
}

/// One leaf: PEMs, parsed facts, and the rustls key ready to serve.
pub struct Leaf {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    pub cert_der: Vec<u8>,
    /// Validity (Unix seconds).
    pub not_before: i64,
    pub not_after: i64,
    /// Subject CN and URI SANs, which a renewal CSR repeats.
    pub cn: String,
    pub uris: Vec<String>,
    certified: Arc<rustls::sign::CertifiedKey>,
}

impl std::fmt::Debug for Leaf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leaf")
            .field("cn", &self.cn)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl Leaf {
    /// A leaf from its certificate PEM (the first `CERTIFICATE` block) and
    /// key PEM; the key must belong to the certificate.
    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<Self, LeafError> {
        let certs = tls::load_certs("cert.pem", cert_pem)?;
        let key = tls::load_key("key.pem", key_pem)?;
        let der = certs[0].to_vec();
        // Normalised PEMs (one block each), whatever file they came from.
        let key_label = match &key {
            rustls::pki_types::PrivateKeyDer::Sec1(_) => "EC PRIVATE KEY",
            rustls::pki_types::PrivateKeyDer::Pkcs1(_) => "RSA PRIVATE KEY",
            _ => "PRIVATE KEY",
        };
        let key_pem = pem::encode(&pem::Pem::new(key_label, key.secret_der().to_vec()));
        let cert_pem = pem::encode(&pem::Pem::new("CERTIFICATE", der.clone()));
        let (_, cert) = x509_parser::parse_x509_certificate(&der).map_err(|_| LeafError::Parse)?;
        let cn = tls::cert_cn(&der);
        let uris = match cert.subject_alternative_name() {
            Ok(Some(san)) => san
                .value
                .general_names
                .iter()
                .filter_map(|g| match g {
                    x509_parser::extensions::GeneralName::URI(u) => Some((*u).to_owned()),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        };
        let (not_before, not_after) = (
            cert.validity().not_before.timestamp(),
            cert.validity().not_after.timestamp(),
        );
        let certified = rustls::sign::CertifiedKey::from_der(certs, key, &tls::provider())
            .map_err(LeafError::Key)?;
        Ok(Self {
            cert_pem: cert_pem.into_bytes(),
            key_pem: key_pem.into_bytes(),
            cert_der: der,
            not_before,
            not_after,
            cn,
            uris,
            certified: Arc::new(certified),
        })
    }

    pub fn thumbprint(&self) -> Thumbprint {
        Thumbprint::of_der(&self.cert_der)
    }

    /// When this leaf is due for renewal: half its lifetime (SPIRE's rule).
    pub fn renew_at(&self) -> i64 {
        self.not_before + (self.not_after - self.not_before) / 2
    }
}

/// The leaf in use, swappable. Readers take a snapshot; the generation
/// counter tells waiters that a rotation completed.
pub struct CurrentLeaf {
    leaf: ArcSwap<Leaf>,
    generation: watch::Sender<u64>,
}

impl std::fmt::Debug for CurrentLeaf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CurrentLeaf")
            .field("leaf", &self.load())
            .field("generation", &self.generation())
            .finish()
    }
}

impl CurrentLeaf {
    pub fn new(leaf: Leaf) -> Arc<Self> {
        Arc::new(Self {
            leaf: ArcSwap::from_pointee(leaf),
            generation: watch::Sender::new(0),
        })
    }

    pub fn load(&self) -> Arc<Leaf> {
        self.leaf.load_full()
    }

    /// How many times the leaf was replaced in this process.
    pub fn generation(&self) -> u64 {
        *self.generation.borrow()
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Puts `leaf` in use: the next TLS handshake serves it, the next
    /// Register presents it.
    pub fn replace(&self, leaf: Leaf) {
        self.leaf.store(Arc::new(leaf));
        self.generation.send_modify(|g| *g += 1);
    }

    /// The listener's certificate resolver over this leaf.
    pub fn resolver(self: &Arc<Self>) -> Arc<LeafResolver> {
        Arc::new(LeafResolver(self.clone()))
    }
}

/// Serves whatever leaf is current at handshake time.
pub struct LeafResolver(Arc<CurrentLeaf>);

impl std::fmt::Debug for LeafResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LeafResolver")
    }
}

impl ResolvesServerCert for LeafResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.load().certified.clone())
    }
}

/// Where the boot leaf came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// `<state dir>/leaf.pem`, from an earlier rotation.
    Persisted,
    Bootstrap,
}

/// The leaf to boot with: the persisted rotated leaf when it is usable, else
/// the bootstrap leaf (whose errors are boot errors).
pub fn at_boot(bootstrap: &Bootstrap, state_dir: &Path) -> Result<(Leaf, Source), LeafError> {
    let path = state_dir.join(LEAF_FILE);
    match std::fs::read(&path) {
        Ok(pem) => match persisted(&pem, &bootstrap.ca_pem) {
            Ok(leaf) => return Ok((leaf, Source::Persisted)),
            Err(e) => tracing::warn!(
                event = "leaf_persisted_ignored",
                path = %path.display(),
                error = %e,
                "persisted leaf unusable; booting with the bootstrap leaf"
            ),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(event = "leaf_persisted_ignored", path = %path.display(), error = %e, "cannot read the persisted leaf")
        }
    }
    Ok((
        Leaf::from_pem(&bootstrap.cert_pem, &bootstrap.key_pem)?,
        Source::Bootstrap,
    ))
}

fn persisted(pem: &[u8], ca_pem: &[u8]) -> Result<Leaf, LeafError> {
    let leaf = Leaf::from_pem(pem, pem)?;
    let roots = tls::root_store("ca.pem", ca_pem)?;
    tls::chains_ignoring_time(&leaf.cert_der, &roots).map_err(LeafError::Chain)?;
    Ok(leaf)
}

/// Writes `leaf` (certificate, then key) to `<state dir>/leaf.pem`: the
/// directory is forced to 0700, the file is 0600 and replaced atomically.
pub fn persist(state_dir: &Path, leaf: &Leaf) -> Result<(), LeafError> {
    let path = state_dir.join(LEAF_FILE);
    let err = |source| LeafError::Persist {
        path: path.clone(),
        source,
    };
    pki::ensure_private_dir(state_dir).map_err(err)?;
    let mut body = leaf.cert_pem.clone();
    if !body.ends_with(b"\n") {
        body.push(b'\n');
    }
    body.extend_from_slice(&leaf.key_pem);
    pki::write_file(&path, &body, 0o600).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{AgentName, ProjectSlug};
    use crate::pki::{Ca, CertifiedKey};
    use std::os::unix::fs::PermissionsExt;

    fn mint(ca: &Ca) -> CertifiedKey {
        ca.mint_agent(
            &ProjectSlug::new("web").unwrap(),
            &AgentName::new("dev").unwrap(),
            "abc",
        )
        .unwrap()
    }

    fn bootstrap(ca: &Ca, leaf: &CertifiedKey) -> Bootstrap {
        Bootstrap {
            cert_pem: leaf.cert_pem.clone().into_bytes(),
            key_pem: leaf.key_pem.clone().into_bytes(),
            ca_pem: ca.cert_pem().as_bytes().to_vec(),
            assertion: String::new(),
        }
    }

    fn leaf_of(ck: &CertifiedKey) -> Leaf {
        Leaf::from_pem(ck.cert_pem.as_bytes(), ck.key_pem.as_bytes()).unwrap()
    }

    #[test]
    fn leaf_facts_and_half_life() {
        let ca = Ca::generate().unwrap();
        let ck = mint(&ca);
        let l = leaf_of(&ck);
        assert_eq!(l.cn, "clawker.web.dev");
        assert_eq!(l.uris, vec!["urn:clawker:container:abc"]);
        assert_eq!(l.thumbprint(), ck.thumbprint());
        assert_eq!(l.renew_at(), l.not_before + (24 * 3600 + 300) / 2);
        // A key that is not the certificate's is refused.
        let other = mint(&ca);
        assert!(matches!(
            Leaf::from_pem(ck.cert_pem.as_bytes(), other.key_pem.as_bytes()),
            Err(LeafError::Key(_))
        ));
    }

    #[test]
    fn boot_prefers_a_persisted_leaf_that_chains_to_the_ca() {
        let ca = Ca::generate().unwrap();
        let boot = mint(&ca);
        let b = bootstrap(&ca, &boot);
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        // Nothing persisted: the bootstrap leaf.
        let (l, src) = at_boot(&b, &state).unwrap();
        assert_eq!(
            (l.thumbprint(), src),
            (boot.thumbprint(), Source::Bootstrap)
        );
        // A rotated leaf persisted: preferred.
        let rotated = mint(&ca);
        persist(&state, &leaf_of(&rotated)).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&state), 0o700);
        assert_eq!(mode(&state.join(LEAF_FILE)), 0o600);
        let (l, src) = at_boot(&b, &state).unwrap();
        assert_eq!(
            (l.thumbprint(), src),
            (rotated.thumbprint(), Source::Persisted)
        );
        // A persisted leaf from another CA, or garbage: ignored.
        let foreign = mint(&Ca::generate().unwrap());
        persist(&state, &leaf_of(&foreign)).unwrap();
        assert_eq!(at_boot(&b, &state).unwrap().1, Source::Bootstrap);
        std::fs::write(state.join(LEAF_FILE), b"junk").unwrap();
        assert_eq!(at_boot(&b, &state).unwrap().1, Source::Bootstrap);
        // An expired persisted leaf of our CA is still preferred (newer).
        let mut spec = pki::LeafSpec::new("clawker.web.dev", time::Duration::hours(1));
        spec.not_before = time::OffsetDateTime::now_utc() - time::Duration::hours(3);
        spec.not_after = time::OffsetDateTime::now_utc() - time::Duration::hours(2);
        spec.ekus = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let expired = ca.issue(&spec).unwrap();
        persist(&state, &leaf_of(&expired)).unwrap();
        assert_eq!(at_boot(&b, &state).unwrap().1, Source::Persisted);
    }

    #[test]
    fn replacing_bumps_the_generation_and_the_resolver_follows() {
        let ca = Ca::generate().unwrap();
        let a = mint(&ca);
        let cur = CurrentLeaf::new(leaf_of(&a));
        let rx = cur.subscribe();
        assert_eq!(cur.generation(), 0);
        let b = mint(&ca);
        cur.replace(leaf_of(&b));
        assert_eq!(cur.generation(), 1);
        assert!(rx.has_changed().unwrap());
        assert_eq!(cur.load().thumbprint(), b.thumbprint());
        let served = cur.load().certified.cert[0].to_vec();
        assert_eq!(Thumbprint::of_der(&served), b.thumbprint());
    }
}
