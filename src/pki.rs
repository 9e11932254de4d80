//! Certificate authority and certificate minting (reference `identity.md` §3).
//!
//! One ECDSA P-256 CA signs everything: the CP's server cert (agent and admin
//! listeners), the CP's client cert (CP → clawkerd sessions, where clawkerd
//! pins CN `clawker-controlplane`), the CLI's client cert (admin API) and one
//! short-lived leaf per agent container, bound to the container by a URI SAN.
//! The CA key stays in the host state directory; it never enters a container.
//! `cp serve` loads it into its own memory to sign agents' renewal CSRs
//! ([`Ca::sign_agent_csr`]): the key is used there, never sent anywhere.
//!
//! [`AuthMaterial::ensure`] is the `clawker ca init` behaviour: every pair is
//! created only when one of its files is missing, so running it twice changes
//! nothing.

use std::fmt;
use std::fs;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::Engine;
use rand::TryRng;
use rand::rngs::SysRng;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType, SerialNumber,
};
use time::{Duration, OffsetDateTime};

use crate::identity::{self, AgentName, CONTROL_PLANE_CN, ProjectSlug, Thumbprint};

/// Errors from key material handling. Each names the file or the step.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what}: no PEM block")]
    NoPem { what: String },
    #[error("{what}: unexpected trailing data after the PEM block")]
    TrailingData { what: String },
    #[error("{what}: expected a PEM {expected} block, found {found}")]
    WrongPemLabel {
        what: String,
        expected: &'static str,
        found: String,
    },
    #[error("{what}: not an ECDSA P-256 private key: {detail}")]
    BadKey { what: String, detail: String },
    #[error("{what}: cannot parse certificate: {detail}")]
    BadCert { what: String, detail: String },
    #[error("load CA: CA cert public key is not ECDSA")]
    CaNotEcdsa,
    #[error("load CA: CA cert and CA key do not form a matching pair")]
    CaKeyMismatch,
    #[error("agent name required")]
    AgentRequired,
    #[error("container id required")]
    ContainerIdRequired,
    #[error(transparent)]
    San(#[from] identity::SanError),
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("JWK: {0}")]
    Jwk(String),
}

type Result<T> = std::result::Result<T, PkiError>;

/// A certificate and its private key, both PEM. Debug output is redacted so
/// a key never lands in a log line.
#[derive(Clone)]
pub struct CertifiedKey {
    pub cert_pem: String,
    pub key_pem: String,
    pub cert_der: Vec<u8>,
}

impl CertifiedKey {
    pub fn thumbprint(&self) -> Thumbprint {
        Thumbprint::of_der(&self.cert_der)
    }
}

impl fmt::Debug for CertifiedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CertifiedKey{<redacted>}")
    }
}

/// Everything a test or a caller may want to vary about a leaf. The named
/// constructors on [`Ca`] fill this in per the reference table; tests use it
/// directly to craft bad peers (wrong EKU, expired, foreign CN).
#[derive(Debug, Clone)]
pub struct LeafSpec {
    pub common_name: String,
    pub dns_sans: Vec<String>,
    pub ip_sans: Vec<IpAddr>,
    pub uri_sans: Vec<String>,
    pub key_usages: Vec<KeyUsagePurpose>,
    pub ekus: Vec<ExtendedKeyUsagePurpose>,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl LeafSpec {
    /// The rcgen parameters of this leaf (fresh random serial, AKI set).
    fn params(&self) -> Result<CertificateParams> {
        let mut params = CertificateParams::default();
        params.distinguished_name = subject(&self.common_name);
        params.not_before = self.not_before;
        params.not_after = self.not_after;
        params.serial_number = Some(random_serial()?);
        params.key_usages = self.key_usages.clone();
        params.extended_key_usages = self.ekus.clone();
        params.use_authority_key_identifier_extension = true;
        for dns in &self.dns_sans {
            params
                .subject_alt_names
                .push(SanType::DnsName(dns.as_str().try_into()?));
        }
        for ip in &self.ip_sans {
            params.subject_alt_names.push(SanType::IpAddress(*ip));
        }
        for uri in &self.uri_sans {
            params
                .subject_alt_names
                .push(SanType::URI(uri.as_str().try_into()?));
        }
        Ok(params)
    }

    /// A leaf valid from five minutes ago (clock skew) for `validity`.
    pub fn new(common_name: &str, validity: Duration) -> Self {
        let now = OffsetDateTime::now_utc();
        Self {
            common_name: common_name.to_owned(),
            dns_sans: Vec::new(),
            ip_sans: Vec::new(),
            uri_sans: Vec::new(),
            key_usages: vec![KeyUsagePurpose::DigitalSignature],
            ekus: Vec::new(),
            not_before: now - Duration::minutes(5),
            not_after: now + validity,
        }
    }
}

/// Leaf validity of the CP's and CLI's certificates.
pub const SERVICE_CERT_VALIDITY: Duration = Duration::days(365);
/// Default agent leaf lifetime (cp.toml `agent_cert_ttl`): a container gets
/// one at creation and renews it over its session at half its lifetime.
pub const AGENT_CERT_VALIDITY: Duration = Duration::hours(24);
/// How far a leaf's `notBefore` is backdated for clock skew: five minutes
/// (the reference), but never more than a tenth of the lifetime, so that a
/// 10-second test leaf still reaches half its lifetime 5 s after issue.
pub fn agent_backdate(ttl: Duration) -> Duration {
    (ttl / 10i32).min(Duration::minutes(5))
}
/// CA validity.
pub const CA_VALIDITY: Duration = Duration::days(5 * 365);
/// CN of the CLI's client certificate.
pub const CLI_CN: &str = "clawker-cli";

/// The certificate authority: its certificate and signing key.
pub struct Ca {
    cert_pem: String,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Ca{<redacted>}")
    }
}

fn random_serial() -> Result<SerialNumber> {
    let mut bytes = [0u8; 16];
    SysRng
        .try_fill_bytes(&mut bytes)
        .map_err(|_| PkiError::Jwk("system RNG failed".into()))?;
    // Keep the DER INTEGER positive and 128 bits wide.
    bytes[0] &= 0x7f;
    Ok(SerialNumber::from_slice(&bytes))
}

fn subject(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "clawker");
    dn.push(DnType::CommonName, cn);
    dn
}

impl Ca {
    /// A fresh CA: P-256, 5 years, path length 1, CertSign + CRLSign.
    pub fn generate() -> Result<Self> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let now = OffsetDateTime::now_utc();
        params.distinguished_name = subject("clawker CLI CA");
        params.not_before = now - Duration::minutes(5);
        params.not_after = now + CA_VALIDITY;
        params.serial_number = Some(random_serial()?);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key)?;
        let cert_pem = cert.pem();
        let key_pem = key.serialize_pem();
        Ok(Self {
            cert_pem,
            key_pem,
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads a CA, refusing a key that does not belong to the certificate.
    pub fn load(cert_pem: &str, key_pem: &str) -> Result<Self> {
        let cert_der = single_pem_block("CA cert", cert_pem, "CERTIFICATE")?;
        let key = load_p256_key("CA key", key_pem)?;
        let (_, cert) =
            x509_parser::parse_x509_certificate(&cert_der).map_err(|e| PkiError::BadCert {
                what: "CA cert".into(),
                detail: e.to_string(),
            })?;
        let spki = cert.public_key();
        if spki.algorithm.algorithm != x509_parser::oid_registry::OID_KEY_TYPE_EC_PUBLIC_KEY {
            return Err(PkiError::CaNotEcdsa);
        }
        if spki.subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(PkiError::CaKeyMismatch);
        }
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)?;
        Ok(Self {
            cert_pem: cert_pem.to_owned(),
            key_pem: key_pem.to_owned(),
            issuer,
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A second handle on the same CA (same certificate and key).
    pub fn try_clone(&self) -> Result<Self> {
        Self::load(&self.cert_pem, &self.key_pem)
    }

    /// The CA key, PEM. Only [`AuthMaterial`] writes it, to a 0600 file.
    fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// Signs a leaf described by `spec` with a fresh P-256 key.
    pub fn issue(&self, spec: &LeafSpec) -> Result<CertifiedKey> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let cert = spec.params()?.signed_by(&key, &self.issuer)?;
        Ok(CertifiedKey {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            cert_der: cert.der().to_vec(),
        })
    }

    /// CP server cert: CN `clawker-controlplane`, ServerAuth, SANs
    /// `localhost`, `clawker-controlplane`, 127.0.0.1 plus `extra_ips`.
    pub fn mint_cp_server(&self, extra_ips: &[IpAddr]) -> Result<CertifiedKey> {
        let mut spec = LeafSpec::new(CONTROL_PLANE_CN, SERVICE_CERT_VALIDITY);
        spec.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        spec.ekus = vec![ExtendedKeyUsagePurpose::ServerAuth];
        spec.dns_sans = vec!["localhost".into(), CONTROL_PLANE_CN.into()];
        spec.ip_sans = vec![IpAddr::V4(Ipv4Addr::LOCALHOST)];
        spec.ip_sans.extend(extra_ips.iter().copied());
        self.issue(&spec)
    }

    /// CP client cert: CN `clawker-controlplane`, ClientAuth only. This is
    /// the only identity clawkerd accepts a session from.
    pub fn mint_cp_client(&self) -> Result<CertifiedKey> {
        let mut spec = LeafSpec::new(CONTROL_PLANE_CN, SERVICE_CERT_VALIDITY);
        spec.ekus = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(&spec)
    }

    /// CLI client cert: CN `clawker-cli`, ClientAuth only.
    pub fn mint_cli_client(&self) -> Result<CertifiedKey> {
        let mut spec = LeafSpec::new(CLI_CN, SERVICE_CERT_VALIDITY);
        spec.ekus = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(&spec)
    }

    /// Agent leaf: canonical CN, URI SAN binding the container, ClientAuth +
    /// ServerAuth (clawkerd serves :7700 with it and dials the CP with it),
    /// valid 24 h.
    pub fn mint_agent(
        &self,
        project: &ProjectSlug,
        agent: &AgentName,
        container_id: &str,
    ) -> Result<CertifiedKey> {
        self.mint_agent_with_ttl(project, agent, container_id, AGENT_CERT_VALIDITY)
    }

    /// [`Ca::mint_agent`] with a configured lifetime (`agent_cert_ttl`).
    pub fn mint_agent_with_ttl(
        &self,
        project: &ProjectSlug,
        agent: &AgentName,
        container_id: &str,
        ttl: Duration,
    ) -> Result<CertifiedKey> {
        if container_id.is_empty() {
            return Err(PkiError::ContainerIdRequired);
        }
        let san = identity::container_san(container_id)?;
        let spec = agent_leaf_spec(
            &identity::canonical_cn(project, agent),
            &san,
            ttl,
            OffsetDateTime::now_utc(),
        );
        self.issue(&spec)
    }

    /// Signs an agent's renewal CSR (DER, PKCS#10) for exactly the identity
    /// `expect` names, valid `ttl` from `now`. The CSR only contributes its
    /// public key: it must prove possession (signature), be P-256, and ask
    /// for nothing but `CN=<expect.cn>` (optionally `O=clawker`) and the one
    /// URI SAN `expect.san`; every field of the certificate (KU, EKUs,
    /// validity, serial) is the CP's, as for a leaf minted by `agent run`.
    pub fn sign_agent_csr(
        &self,
        csr_der: &[u8],
        expect: &AgentIdentity,
        ttl: Duration,
        now: OffsetDateTime,
    ) -> std::result::Result<SignedLeaf, CsrError> {
        let key = csr::check(csr_der, expect)?;
        let spec = agent_leaf_spec(&expect.cn, &expect.san, ttl, now);
        let params = spec.params().map_err(CsrError::Sign)?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| CsrError::Sign(e.into()))?;
        Ok(SignedLeaf {
            cert_pem: cert.pem(),
            cert_der: cert.der().to_vec(),
            not_after: spec.not_after,
        })
    }
}

/// The agent leaf profile, shared by `agent run`'s minting and CSR signing:
/// canonical CN, the container SAN, DigitalSignature + KeyEncipherment,
/// ClientAuth + ServerAuth.
fn agent_leaf_spec(cn: &str, san: &str, ttl: Duration, now: OffsetDateTime) -> LeafSpec {
    LeafSpec {
        common_name: cn.to_owned(),
        dns_sans: Vec::new(),
        ip_sans: Vec::new(),
        uri_sans: vec![san.to_owned()],
        key_usages: vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ],
        ekus: vec![
            ExtendedKeyUsagePurpose::ClientAuth,
            ExtendedKeyUsagePurpose::ServerAuth,
        ],
        not_before: now - agent_backdate(ttl),
        not_after: now + ttl,
    }
}

/// The identity a renewal CSR must name: the registry row's canonical CN
/// and the container SAN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentIdentity {
    pub cn: String,
    pub san: String,
}

/// A leaf the CA signed for a CSR (the key stays with whoever made the CSR).
#[derive(Debug, Clone)]
pub struct SignedLeaf {
    pub cert_pem: String,
    pub cert_der: Vec<u8>,
    pub not_after: OffsetDateTime,
}

impl SignedLeaf {
    pub fn thumbprint(&self) -> Thumbprint {
        Thumbprint::of_der(&self.cert_der)
    }
}

/// Why a renewal CSR was refused. Texts are safe to send back to the agent
/// and to log: they never echo a peer string.
#[derive(Debug, thiserror::Error)]
pub enum CsrError {
    #[error("CSR larger than {max} bytes", max = csr::MAX_CSR_LEN)]
    TooLarge,
    #[error("CSR does not parse")]
    Parse,
    #[error("CSR has trailing data")]
    TrailingData,
    #[error("CSR signature does not verify")]
    Signature,
    #[error("CSR key is not ECDSA P-256")]
    NotP256,
    #[error("CSR subject CN is not the agent's canonical CN")]
    CnMismatch,
    #[error("CSR subject names more than CN and O=clawker")]
    ExtraSubject,
    #[error("CSR does not name exactly the agent's container SAN")]
    SanMismatch,
    #[error("CSR requests an extension or attribute other than its SAN")]
    ExtraRequest,
    #[error("signing: {0}")]
    Sign(PkiError),
}

/// PKCS#10 checks for [`Ca::sign_agent_csr`].
mod csr {
    use x509_parser::certification_request::X509CertificationRequest;
    use x509_parser::cri_attributes::ParsedCriAttribute;
    use x509_parser::extensions::{GeneralName, ParsedExtension};
    use x509_parser::oid_registry::{
        OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_X509_COMMON_NAME, OID_X509_ORGANIZATION_NAME,
    };
    use x509_parser::prelude::FromDer;

    use super::{AgentIdentity, CsrError};

    /// A P-256 CSR with one SAN is ~350 bytes; anything near this is junk.
    pub const MAX_CSR_LEN: usize = 4096;

    /// The CSR's public key (uncompressed SEC1 point), as rcgen signs it.
    pub struct CsrKey(Vec<u8>);

    impl rcgen::PublicKeyData for CsrKey {
        fn der_bytes(&self) -> &[u8] {
            &self.0
        }
        fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
            &rcgen::PKCS_ECDSA_P256_SHA256
        }
    }

    pub fn check(der: &[u8], expect: &AgentIdentity) -> Result<CsrKey, CsrError> {
        if der.len() > MAX_CSR_LEN {
            return Err(CsrError::TooLarge);
        }
        let (rest, csr) = X509CertificationRequest::from_der(der).map_err(|_| CsrError::Parse)?;
        if !rest.is_empty() {
            return Err(CsrError::TrailingData);
        }
        csr.verify_signature().map_err(|_| CsrError::Signature)?;
        let info = &csr.certification_request_info;
        let spki = &info.subject_pki;
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok());
        let point = spki.subject_public_key.data.as_ref();
        if spki.algorithm.algorithm != OID_KEY_TYPE_EC_PUBLIC_KEY
            || curve.as_ref() != Some(&OID_EC_P256)
            || point.len() != 65
            || point[0] != 4
        {
            return Err(CsrError::NotP256);
        }
        let mut cn_ok = false;
        for rdn in info.subject.iter() {
            for attr in rdn.iter() {
                let value = attr.as_str().map_err(|_| CsrError::ExtraSubject)?;
                if *attr.attr_type() == OID_X509_COMMON_NAME && !cn_ok {
                    if value != expect.cn {
                        return Err(CsrError::CnMismatch);
                    }
                    cn_ok = true;
                } else if *attr.attr_type() == OID_X509_ORGANIZATION_NAME && value == "clawker" {
                } else {
                    return Err(CsrError::ExtraSubject);
                }
            }
        }
        if !cn_ok {
            return Err(CsrError::CnMismatch);
        }
        let mut san_ok = false;
        for attr in info.iter_attributes() {
            let ParsedCriAttribute::ExtensionRequest(req) = attr.parsed_attribute() else {
                return Err(CsrError::ExtraRequest);
            };
            for ext in &req.extensions {
                let ParsedExtension::SubjectAlternativeName(san) = ext.parsed_extension() else {
                    return Err(CsrError::ExtraRequest);
                };
                if san_ok {
                    return Err(CsrError::SanMismatch);
                }
                match san.general_names.as_slice() {
                    [GeneralName::URI(u)] if *u == expect.san => san_ok = true,
                    _ => return Err(CsrError::SanMismatch),
                }
            }
        }
        if !san_ok {
            return Err(CsrError::SanMismatch);
        }
        Ok(CsrKey(point.to_vec()))
    }
}

/// Decodes exactly one PEM block with the expected label; anything but
/// whitespace after it is refused (a concatenated second key or cert is a
/// configuration mistake, not something to silently ignore).
pub fn single_pem_block(what: &str, text: &str, expected: &'static str) -> Result<Vec<u8>> {
    let Some(begin) = text.find("-----BEGIN ") else {
        return Err(PkiError::NoPem { what: what.into() });
    };
    let body = &text[begin..];
    let end_marker = body
        .find("-----END ")
        .and_then(|i| body[i + 9..].find("-----").map(|j| i + 9 + j + 5));
    let Some(end) = end_marker else {
        return Err(PkiError::NoPem { what: what.into() });
    };
    if !body[end..].trim().is_empty() {
        return Err(PkiError::TrailingData { what: what.into() });
    }
    let block = pem::parse(&body[..end]).map_err(|_| PkiError::NoPem { what: what.into() })?;
    if block.tag() != expected {
        return Err(PkiError::WrongPemLabel {
            what: what.into(),
            expected,
            found: block.tag().to_owned(),
        });
    }
    Ok(block.into_contents())
}

/// Loads a P-256 private key (PKCS#8 `PRIVATE KEY` or SEC1 `EC PRIVATE
/// KEY`), refusing any other algorithm and trailing data.
pub fn load_p256_key(what: &str, key_pem: &str) -> Result<KeyPair> {
    let Some(begin) = key_pem.find("-----BEGIN ") else {
        return Err(PkiError::NoPem { what: what.into() });
    };
    let label = key_pem[begin + 11..]
        .split("-----")
        .next()
        .unwrap_or_default()
        .to_owned();
    let expected = match label.as_str() {
        "EC PRIVATE KEY" => "EC PRIVATE KEY",
        _ => "PRIVATE KEY",
    };
    single_pem_block(what, key_pem, expected)?;
    let key = KeyPair::from_pem(key_pem).map_err(|e| PkiError::BadKey {
        what: what.into(),
        detail: e.to_string(),
    })?;
    if key.algorithm() != &PKCS_ECDSA_P256_SHA256 {
        return Err(PkiError::BadKey {
            what: what.into(),
            detail: "wrong algorithm".into(),
        });
    }
    Ok(key)
}

/// The CLI's signing key (it signs the single-use agent assertions) and its
/// public JWK, which the CP uses to verify them.
pub struct SigningKey {
    pkcs8_pem: String,
    key: ring::signature::EcdsaKeyPair,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SigningKey{<redacted>}")
    }
}

impl SigningKey {
    pub fn generate() -> Result<Self> {
        let rng = ring::rand::SystemRandom::new();
        let doc = ring::signature::EcdsaKeyPair::generate_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &rng,
        )
        .map_err(|_| PkiError::Jwk("key generation failed".into()))?;
        let pem = pem::encode(&pem::Pem::new("PRIVATE KEY", doc.as_ref().to_vec()));
        Self::from_pem(&pem)
    }

    pub fn from_pem(pem_text: &str) -> Result<Self> {
        let der = single_pem_block("signing key", pem_text, "PRIVATE KEY")?;
        let key = ring::signature::EcdsaKeyPair::from_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &der,
            &ring::rand::SystemRandom::new(),
        )
        .map_err(|e| PkiError::BadKey {
            what: "signing key".into(),
            detail: e.to_string(),
        })?;
        Ok(Self {
            pkcs8_pem: pem_text.to_owned(),
            key,
        })
    }

    pub fn pem(&self) -> &str {
        &self.pkcs8_pem
    }

    pub fn key_pair(&self) -> &ring::signature::EcdsaKeyPair {
        &self.key
    }

    /// Public JWK; `x` and `y` are always 32 bytes before encoding (RFC 7518
    /// §6.2.1.2; the reference forgets the left-padding).
    pub fn jwk(&self) -> Jwk {
        use ring::signature::KeyPair as _;
        let point = self.key.public_key().as_ref();
        // Uncompressed SEC1 point: 0x04 || X(32) || Y(32).
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        Jwk {
            kty: "EC".into(),
            crv: "P-256".into(),
            use_: "sig".into(),
            alg: "ES256".into(),
            x: b64.encode(&point[1..33]),
            y: b64.encode(&point[33..65]),
        }
    }
}

/// An EC public JWK as written to `signing-jwk.json`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Jwk {
    pub kty: String,
    pub crv: String,
    #[serde(rename = "use")]
    pub use_: String,
    pub alg: String,
    pub x: String,
    pub y: String,
}

impl Jwk {
    /// The uncompressed SEC1 point, for signature verification. Refuses any
    /// key that is not a P-256 ES256 key with 32-byte coordinates.
    pub fn public_point(&self) -> Result<Vec<u8>> {
        if self.kty != "EC" || self.crv != "P-256" || self.alg != "ES256" {
            return Err(PkiError::Jwk(format!(
                "expected an EC P-256 ES256 key, got kty={} crv={} alg={}",
                self.kty, self.crv, self.alg
            )));
        }
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let x = b64
            .decode(&self.x)
            .map_err(|e| PkiError::Jwk(format!("x: {e}")))?;
        let y = b64
            .decode(&self.y)
            .map_err(|e| PkiError::Jwk(format!("y: {e}")))?;
        if x.len() != 32 || y.len() != 32 {
            return Err(PkiError::Jwk("coordinates must be 32 bytes".into()));
        }
        let mut point = Vec::with_capacity(65);
        point.push(4);
        point.extend_from_slice(&x);
        point.extend_from_slice(&y);
        Ok(point)
    }
}

/// Paths of every piece of auth material under `<state>/auth/`.
#[derive(Debug, Clone)]
pub struct AuthPaths {
    pub root: PathBuf,
}

impl AuthPaths {
    pub fn new(state_dir: &Path) -> Self {
        Self {
            root: state_dir.join("auth"),
        }
    }
    pub fn ca_cert(&self) -> PathBuf {
        self.root.join("ca/ca.pem")
    }
    pub fn ca_key(&self) -> PathBuf {
        self.root.join("ca/ca.key")
    }
    pub fn signing_key(&self) -> PathBuf {
        self.root.join("cli/signing.key")
    }
    pub fn signing_jwk(&self) -> PathBuf {
        self.root.join("cli/signing-jwk.json")
    }
    pub fn cli_cert(&self) -> PathBuf {
        self.root.join("cli/client.pem")
    }
    pub fn cli_key(&self) -> PathBuf {
        self.root.join("cli/client.key")
    }
    pub fn server_cert(&self) -> PathBuf {
        self.root.join("tls/server.pem")
    }
    pub fn server_key(&self) -> PathBuf {
        self.root.join("tls/server.key")
    }
    pub fn cp_client_cert(&self) -> PathBuf {
        self.root.join("cp/client.pem")
    }
    pub fn cp_client_key(&self) -> PathBuf {
        self.root.join("cp/client.key")
    }
    fn dirs(&self) -> [PathBuf; 5] {
        ["", "ca", "cli", "tls", "cp"].map(|d| self.root.join(d))
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_owned(),
        source,
    }
}

pub fn read_file(path: &Path) -> Result<String> {
    fs::read_to_string(path).map_err(io_err(path))
}

/// Writes `contents` with `mode`, replacing the file atomically (temp file +
/// rename) so a crash never leaves half a key behind.
pub fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    f.write_all(contents).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode)).map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).map_err(io_err(path))
}

/// Creates `dir` (and parents) and forces mode 0700 even if it existed.
pub fn ensure_private_dir(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io_err(dir))
}

/// What `ensure` created this time (empty on an idempotent re-run).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct EnsureReport {
    pub created: Vec<&'static str>,
}

/// All auth material in a state directory.
pub struct AuthMaterial {
    pub paths: AuthPaths,
    pub ca: Ca,
    pub signing_key: SigningKey,
}

impl AuthMaterial {
    /// `clawker ca init`: dirs → CA → signing key (+JWK) → server cert →
    /// CLI client cert → CP client cert. A pair is (re)generated only if one
    /// of its files is missing; when the CA is regenerated every leaf is too,
    /// since the old leaves would no longer chain.
    pub fn ensure(state_dir: &Path) -> Result<(Self, EnsureReport)> {
        let paths = AuthPaths::new(state_dir);
        for d in paths.dirs() {
            ensure_private_dir(&d)?;
        }
        let mut report = EnsureReport::default();
        let ca_fresh = !(paths.ca_cert().exists() && paths.ca_key().exists());
        let ca = if ca_fresh {
            let ca = Ca::generate()?;
            write_file(&paths.ca_key(), ca.key_pem().as_bytes(), 0o600)?;
            write_file(&paths.ca_cert(), ca.cert_pem().as_bytes(), 0o644)?;
            report.created.push("CA certificate");
            ca
        } else {
            Ca::load(&read_file(&paths.ca_cert())?, &read_file(&paths.ca_key())?)?
        };

        let signing_key = if paths.signing_key().exists() {
            SigningKey::from_pem(&read_file(&paths.signing_key())?)?
        } else {
            let k = SigningKey::generate()?;
            write_file(&paths.signing_key(), k.pem().as_bytes(), 0o600)?;
            report.created.push("CLI signing key");
            k
        };
        if !paths.signing_jwk().exists() {
            let json = serde_json::to_string_pretty(&signing_key.jwk())
                .map_err(|e| PkiError::Jwk(e.to_string()))?;
            write_file(&paths.signing_jwk(), json.as_bytes(), 0o644)?;
            report.created.push("CLI signing JWK");
        }

        for (name, cert_path, key_path, mint) in service_leaves(&paths) {
            if ca_fresh || !(cert_path.exists() && key_path.exists()) {
                let ck = mint(&ca)?;
                write_file(&key_path, ck.key_pem.as_bytes(), 0o600)?;
                write_file(&cert_path, ck.cert_pem.as_bytes(), 0o644)?;
                report.created.push(name);
            }
        }
        Ok((
            Self {
                paths,
                ca,
                signing_key,
            },
            report,
        ))
    }

    /// `clawker ca renew`: re-issues the CP's server and client certificates
    /// and the CLI's client certificate under the existing CA (same CN and
    /// EKUs, fresh keys, a new year of validity). The CA and the signing key
    /// are kept, so every agent leaf stays valid and every clawkerd, which
    /// pins the CA and the CP's CN rather than a certificate, accepts the new
    /// CP client certificate on its next session. A running CP picks the new
    /// certificates up when it restarts.
    pub fn renew(state_dir: &Path) -> Result<Vec<Renewed>> {
        let material = Self::load(state_dir)?;
        let mut out = Vec::new();
        for (name, cert_path, key_path, mint) in service_leaves(&material.paths) {
            let ck = mint(&material.ca)?;
            // Key first: a crash in between leaves the old cert with a key
            // it does not match, which every loader reports clearly.
            write_file(&key_path, ck.key_pem.as_bytes(), 0o600)?;
            write_file(&cert_path, ck.cert_pem.as_bytes(), 0o644)?;
            out.push(Renewed {
                name,
                path: cert_path,
                not_after: cert_not_after(name, &ck.cert_pem)?,
            });
        }
        Ok(out)
    }

    /// Loads existing material without creating anything.
    pub fn load(state_dir: &Path) -> Result<Self> {
        let paths = AuthPaths::new(state_dir);
        let ca = Ca::load(&read_file(&paths.ca_cert())?, &read_file(&paths.ca_key())?)?;
        let signing_key = SigningKey::from_pem(&read_file(&paths.signing_key())?)?;
        Ok(Self {
            paths,
            ca,
            signing_key,
        })
    }
}

type Minter = fn(&Ca) -> Result<CertifiedKey>;

/// The CP's and CLI's own certificates: what `ca init` creates and `ca renew`
/// re-issues, with their files.
fn service_leaves(paths: &AuthPaths) -> [(&'static str, PathBuf, PathBuf, Minter); 3] {
    [
        (
            "server certificate",
            paths.server_cert(),
            paths.server_key(),
            |ca| ca.mint_cp_server(&[]),
        ),
        (
            "CLI client certificate",
            paths.cli_cert(),
            paths.cli_key(),
            Ca::mint_cli_client,
        ),
        (
            "CP client certificate",
            paths.cp_client_cert(),
            paths.cp_client_key(),
            Ca::mint_cp_client,
        ),
    ]
}

/// One certificate `ca renew` re-issued.
#[derive(Debug, Clone)]
pub struct Renewed {
    pub name: &'static str,
    pub path: PathBuf,
    pub not_after: OffsetDateTime,
}

/// The `notAfter` of the (first) certificate in `pem`.
pub fn cert_not_after(what: &str, pem_text: &str) -> Result<OffsetDateTime> {
    let block = pem::parse_many(pem_text)
        .ok()
        .and_then(|b| b.into_iter().find(|b| b.tag() == "CERTIFICATE"))
        .ok_or_else(|| PkiError::NoPem { what: what.into() })?;
    let (_, cert) =
        x509_parser::parse_x509_certificate(block.contents()).map_err(|e| PkiError::BadCert {
            what: what.into(),
            detail: e.to_string(),
        })?;
    Ok(cert.validity().not_after.to_datetime())
}

/// File names of the bootstrap bundle copied into an agent container at
/// `/run/clawker/bootstrap/`.
pub mod bootstrap {
    pub const CERT: &str = "cert.pem";
    pub const KEY: &str = "key.pem";
    pub const CA: &str = "ca.pem";
    pub const ASSERTION: &str = "assertion.jwt";
    /// Default location inside an agent container.
    pub const DEFAULT_DIR: &str = "/run/clawker/bootstrap";
}

/// Writes a bootstrap bundle (leaf cert, key, CA cert) into `dir` (0700;
/// key 0600). Used by `clawker ca mint-agent` and by tests.
pub fn write_bootstrap(dir: &Path, leaf: &CertifiedKey, ca_pem: &str) -> Result<()> {
    ensure_private_dir(dir)?;
    write_file(&dir.join(bootstrap::KEY), leaf.key_pem.as_bytes(), 0o600)?;
    write_file(&dir.join(bootstrap::CERT), leaf.cert_pem.as_bytes(), 0o644)?;
    write_file(&dir.join(bootstrap::CA), ca_pem.as_bytes(), 0o644)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::extensions::GeneralName;
    use x509_parser::prelude::*;

    fn parse(der: &[u8]) -> X509Certificate<'_> {
        X509Certificate::from_der(der).expect("parse").1
    }

    fn cn(c: &X509Certificate<'_>) -> String {
        c.subject()
            .iter_common_name()
            .next()
            .and_then(|a| a.as_str().ok())
            .unwrap_or_default()
            .to_owned()
    }

    fn lifetime_secs(c: &X509Certificate<'_>) -> i64 {
        c.validity().not_after.timestamp() - c.validity().not_before.timestamp()
    }

    #[test]
    fn ca_fields_match_the_reference_table() {
        let ca = Ca::generate().unwrap();
        let der = single_pem_block("ca", ca.cert_pem(), "CERTIFICATE").unwrap();
        let c = parse(&der);
        assert_eq!(cn(&c), "clawker CLI CA");
        let bc = c.basic_constraints().unwrap().unwrap().value;
        assert!(bc.ca);
        assert_eq!(bc.path_len_constraint, Some(1));
        let ku = c.key_usage().unwrap().unwrap().value;
        assert!(ku.key_cert_sign() && ku.crl_sign());
        assert_eq!(
            lifetime_secs(&c),
            (CA_VALIDITY + Duration::minutes(5)).whole_seconds()
        );
        assert_eq!(
            c.public_key().algorithm.algorithm,
            x509_parser::oid_registry::OID_KEY_TYPE_EC_PUBLIC_KEY
        );
    }

    #[test]
    fn agent_leaf_fields_match_the_reference_table() {
        let ca = Ca::generate().unwrap();
        let p = ProjectSlug::new("web").unwrap();
        let a = AgentName::new("dev").unwrap();
        let leaf = ca.mint_agent(&p, &a, "abc123").unwrap();
        let c = parse(&leaf.cert_der);
        assert_eq!(cn(&c), "clawker.web.dev");
        assert_eq!(lifetime_secs(&c), 24 * 3600 + 300);
        let eku = c.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && eku.server_auth);
        let ku = c.key_usage().unwrap().unwrap().value;
        assert!(ku.digital_signature() && ku.key_encipherment());
        let san = c.subject_alternative_name().unwrap().unwrap().value;
        let uris: Vec<&str> = san
            .general_names
            .iter()
            .filter_map(|g| match g {
                GeneralName::URI(u) => Some(*u),
                _ => None,
            })
            .collect();
        assert_eq!(uris, vec!["urn:clawker:container:abc123"]);
        assert_eq!(san.general_names.len(), 1, "URI SAN only");
        assert!(!c.is_ca());
        assert_eq!(leaf.thumbprint(), Thumbprint::of_der(&leaf.cert_der));
        assert_eq!(format!("{leaf:?}"), "CertifiedKey{<redacted>}");
    }

    #[test]
    fn agent_minting_checks_in_order() {
        let ca = Ca::generate().unwrap();
        let a = AgentName::new("dev").unwrap();
        let p = ProjectSlug::unscoped();
        assert!(matches!(
            ca.mint_agent(&p, &a, ""),
            Err(PkiError::ContainerIdRequired)
        ));
        let e = ca.mint_agent(&p, &a, "ABC").unwrap_err();
        assert_eq!(
            e.to_string(),
            "container id must be lowercase letters and digits; got \"ABC\""
        );
        let leaf = ca.mint_agent(&p, &a, "ab").unwrap();
        assert_eq!(cn(&parse(&leaf.cert_der)), "clawker.dev");
    }

    #[test]
    fn service_certs_match_the_reference_table() {
        let ca = Ca::generate().unwrap();
        let server = ca.mint_cp_server(&[]).unwrap();
        let c = parse(&server.cert_der);
        assert_eq!(cn(&c), "clawker-controlplane");
        let eku = c.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && !eku.client_auth);
        let san = c.subject_alternative_name().unwrap().unwrap().value;
        let names: Vec<String> = san
            .general_names
            .iter()
            .map(|g| match g {
                GeneralName::DNSName(d) => d.to_string(),
                GeneralName::IPAddress(ip) => format!("{ip:?}"),
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(
            names,
            vec!["localhost", "clawker-controlplane", "[127, 0, 0, 1]"]
        );
        assert_eq!(lifetime_secs(&c), 365 * 86400 + 300);

        for (ck, want_cn) in [
            (ca.mint_cp_client().unwrap(), "clawker-controlplane"),
            (ca.mint_cli_client().unwrap(), "clawker-cli"),
        ] {
            let c = parse(&ck.cert_der);
            assert_eq!(cn(&c), want_cn);
            let eku = c.extended_key_usage().unwrap().unwrap().value;
            assert!(eku.client_auth && !eku.server_auth);
            assert!(c.subject_alternative_name().unwrap().is_none());
        }
    }

    #[test]
    fn ca_load_rejects_mismatched_pair_and_trailing_garbage() {
        let a = Ca::generate().unwrap();
        let b = Ca::generate().unwrap();
        assert!(matches!(
            Ca::load(a.cert_pem(), b.key_pem()),
            Err(PkiError::CaKeyMismatch)
        ));
        let garbage = format!("{}trailing", a.key_pem());
        assert!(matches!(
            Ca::load(a.cert_pem(), &garbage),
            Err(PkiError::TrailingData { .. })
        ));
        let two_certs = format!("{}{}", a.cert_pem(), b.cert_pem());
        assert!(matches!(
            Ca::load(&two_certs, a.key_pem()),
            Err(PkiError::TrailingData { .. })
        ));
        assert!(matches!(
            Ca::load("nothing here", a.key_pem()),
            Err(PkiError::NoPem { .. })
        ));
        assert!(Ca::load(a.cert_pem(), &format!("{}\n\n", a.key_pem())).is_ok());
        // A certificate where a key belongs is a clear error, not a panic.
        assert!(matches!(
            Ca::load(a.cert_pem(), a.cert_pem()),
            Err(PkiError::WrongPemLabel { .. })
        ));
    }

    #[test]
    fn jwk_coordinates_are_32_bytes_and_round_trip() {
        for _ in 0..50 {
            let k = SigningKey::generate().unwrap();
            let jwk = k.jwk();
            assert_eq!(jwk.x.len(), 43);
            assert_eq!(jwk.y.len(), 43);
            let point = jwk.public_point().unwrap();
            use ring::signature::KeyPair as _;
            assert_eq!(point, k.key_pair().public_key().as_ref());
        }
        let mut bad = SigningKey::generate().unwrap().jwk();
        bad.crv = "P-384".into();
        assert!(bad.public_point().is_err());
    }

    #[test]
    fn ensure_is_idempotent_and_sets_modes() {
        let dir = tempfile::tempdir().unwrap();
        let (_, first) = AuthMaterial::ensure(dir.path()).unwrap();
        assert_eq!(first.created.len(), 6);
        let paths = AuthPaths::new(dir.path());
        let snapshot = |p: &AuthPaths| {
            [
                p.ca_cert(),
                p.ca_key(),
                p.signing_key(),
                p.signing_jwk(),
                p.server_cert(),
                p.cli_cert(),
                p.cp_client_cert(),
            ]
            .map(|f| fs::read(f).unwrap())
        };
        let before = snapshot(&paths);
        let (_, second) = AuthMaterial::ensure(dir.path()).unwrap();
        assert!(second.created.is_empty());
        assert_eq!(before, snapshot(&paths));
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        for key in [
            paths.ca_key(),
            paths.signing_key(),
            paths.server_key(),
            paths.cli_key(),
            paths.cp_client_key(),
        ] {
            assert_eq!(mode(&key), 0o600, "{}", key.display());
        }
        for d in paths.dirs() {
            assert_eq!(mode(&d), 0o700, "{}", d.display());
        }
        // A missing leaf is regenerated alone.
        fs::remove_file(paths.cli_key()).unwrap();
        let (_, third) = AuthMaterial::ensure(dir.path()).unwrap();
        assert_eq!(third.created, vec!["CLI client certificate"]);
        assert!(AuthMaterial::load(dir.path()).is_ok());
    }

    /// The CA as a rustls trust anchor (tests check chains like peers do).
    fn roots_of(ca: &Ca) -> rustls::RootCertStore {
        let der = single_pem_block("ca", ca.cert_pem(), "CERTIFICATE").unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(rustls::pki_types::CertificateDer::from(der))
            .unwrap();
        roots
    }

    fn ident() -> AgentIdentity {
        AgentIdentity {
            cn: "clawker.web.dev".into(),
            san: "urn:clawker:container:abc123".into(),
        }
    }

    /// A CSR as clawkerd builds it, with `edit` applied to the parameters.
    fn csr_with(
        alg: &'static rcgen::SignatureAlgorithm,
        edit: impl FnOnce(&mut CertificateParams),
    ) -> (Vec<u8>, KeyPair) {
        let key = KeyPair::generate_for(alg).unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = subject("clawker.web.dev");
        params.subject_alt_names = vec![SanType::URI(
            "urn:clawker:container:abc123".try_into().unwrap(),
        )];
        edit(&mut params);
        let csr = params.serialize_request(&key).unwrap();
        (csr.der().to_vec(), key)
    }

    fn at(unix: i64) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(unix).unwrap()
    }

    #[test]
    fn csr_for_the_rows_identity_gets_the_agent_profile_from_the_cp() {
        let ca = Ca::generate().unwrap();
        let (der, key) = csr_with(&PKCS_ECDSA_P256_SHA256, |_| {});
        let now = at(1_800_000_000);
        let leaf = ca
            .sign_agent_csr(&der, &ident(), Duration::seconds(10), now)
            .unwrap();
        let c = parse(&leaf.cert_der);
        assert_eq!(cn(&c), "clawker.web.dev");
        assert_eq!(c.validity().not_after.timestamp(), 1_800_000_010);
        assert_eq!(c.validity().not_before.timestamp(), 1_800_000_000 - 1);
        assert_eq!(leaf.not_after, at(1_800_000_010));
        let eku = c.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && eku.server_auth);
        let ku = c.key_usage().unwrap().unwrap().value;
        assert!(ku.digital_signature() && ku.key_encipherment());
        let san = c.subject_alternative_name().unwrap().unwrap().value;
        assert_eq!(san.general_names.len(), 1);
        assert!(matches!(
            san.general_names[0],
            GeneralName::URI("urn:clawker:container:abc123")
        ));
        assert_eq!(
            c.public_key().subject_public_key.data.as_ref(),
            key.public_key_raw(),
            "the agent's key, not a fresh one"
        );
        assert!(!c.is_ca());
        // It chains to the CA like any minted leaf.
        let roots = roots_of(&ca);
        let ee = rustls::pki_types::CertificateDer::from(leaf.cert_der.clone());
        let parsed = rustls::server::ParsedCertificate::try_from(&ee).unwrap();
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &roots,
            &[],
            rustls::pki_types::UnixTime::since_unix_epoch(std::time::Duration::from_secs(
                1_800_000_005,
            )),
            rustls::crypto::ring::default_provider()
                .signature_verification_algorithms
                .all,
        )
        .unwrap();
        assert_eq!(leaf.thumbprint(), Thumbprint::of_der(&leaf.cert_der));
    }

    #[test]
    fn csr_validation_refuses_anything_but_the_rows_identity_on_p256() {
        let ca = Ca::generate().unwrap();
        let now = at(1_800_000_000);
        let sign = |der: &[u8]| ca.sign_agent_csr(der, &ident(), Duration::hours(1), now);
        let uri = |u: &str| SanType::URI(u.try_into().unwrap());
        type Case = (&'static str, Vec<u8>, fn(&CsrError) -> bool);
        let cases: Vec<Case> = vec![
            (
                "wrong CN",
                csr_with(&PKCS_ECDSA_P256_SHA256, |p| {
                    p.distinguished_name = subject("clawker.web.other")
                })
                .0,
                |e| matches!(e, CsrError::CnMismatch),
            ),
            (
                "no CN",
                csr_with(&PKCS_ECDSA_P256_SHA256, |p| {
                    p.distinguished_name = DistinguishedName::new()
                })
                .0,
                |e| matches!(e, CsrError::CnMismatch),
            ),
            (
                "extra subject attribute",
                csr_with(&PKCS_ECDSA_P256_SHA256, |p| {
                    p.distinguished_name
                        .push(DnType::OrganizationalUnitName, "x")
                })
                .0,
                |e| matches!(e, CsrError::ExtraSubject),
            ),
            (
                "another container's SAN",
                csr_with(&PKCS_ECDSA_P256_SHA256, |p| {
                    p.subject_alt_names = vec![uri("urn:clawker:container:ffff")]
                })
                .0,
                |e| matches!(e, CsrError::SanMismatch),
            ),
            (
                "an extra DNS SAN",
                csr_with(&PKCS_ECDSA_P256_SHA256, |p| {
                    p.subject_alt_names
                        .push(SanType::DnsName("evil.example".try_into().unwrap()))
                })
                .0,
                |e| matches!(e, CsrError::SanMismatch),
            ),
            (
                "a second URI SAN",
                csr_with(&PKCS_ECDSA_P256_SHA256, |p| {
                    p.subject_alt_names.push(uri("urn:clawker:container:abc"))
                })
                .0,
                |e| matches!(e, CsrError::SanMismatch),
            ),
            (
                "no SAN",
                csr_with(&PKCS_ECDSA_P256_SHA256, |p| p.subject_alt_names.clear()).0,
                |e| matches!(e, CsrError::SanMismatch),
            ),
            (
                "a requested EKU",
                csr_with(&PKCS_ECDSA_P256_SHA256, |p| {
                    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::CodeSigning]
                })
                .0,
                |e| matches!(e, CsrError::ExtraRequest),
            ),
            (
                "a CA request",
                csr_with(&PKCS_ECDSA_P256_SHA256, |p| {
                    p.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained)
                })
                .0,
                |e| matches!(e, CsrError::ExtraRequest),
            ),
            (
                "a P-384 key",
                csr_with(&rcgen::PKCS_ECDSA_P384_SHA384, |_| {}).0,
                |e| matches!(e, CsrError::NotP256),
            ),
            (
                "an Ed25519 key",
                csr_with(&rcgen::PKCS_ED25519, |_| {}).0,
                |e| matches!(e, CsrError::NotP256),
            ),
            ("garbage", vec![0x30, 0x03, 1, 2, 3], |e| {
                matches!(e, CsrError::Parse)
            }),
            ("too large", vec![0u8; 5000], |e| {
                matches!(e, CsrError::TooLarge)
            }),
        ];
        for (what, der, want) in cases {
            let e = sign(&der).unwrap_err();
            assert!(want(&e), "{what}: got {e:?}");
        }
        let (good, _) = csr_with(&PKCS_ECDSA_P256_SHA256, |_| {});
        let mut trailing = good.clone();
        trailing.push(0);
        assert!(matches!(sign(&trailing), Err(CsrError::TrailingData)));
        // A flipped bit in the signature: no proof of possession.
        let mut forged = good.clone();
        let n = forged.len();
        forged[n - 2] ^= 0x01;
        assert!(matches!(
            sign(&forged),
            Err(CsrError::Signature | CsrError::Parse)
        ));
        // A CSR for another project's CN of the same container.
        let other = AgentIdentity {
            cn: "clawker.other.dev".into(),
            ..ident()
        };
        assert!(matches!(
            ca.sign_agent_csr(&good, &other, Duration::hours(1), now),
            Err(CsrError::CnMismatch)
        ));
        assert!(sign(&good).is_ok());
    }

    #[test]
    fn backdate_is_five_minutes_or_a_tenth_of_short_lifetimes() {
        assert_eq!(agent_backdate(Duration::hours(24)), Duration::minutes(5));
        assert_eq!(agent_backdate(Duration::seconds(10)), Duration::seconds(1));
        let ca = Ca::generate().unwrap();
        let leaf = ca
            .mint_agent_with_ttl(
                &ProjectSlug::new("p").unwrap(),
                &AgentName::new("a").unwrap(),
                "ab",
                Duration::seconds(10),
            )
            .unwrap();
        assert_eq!(lifetime_secs(&parse(&leaf.cert_der)), 11);
    }

    #[test]
    fn renew_reissues_service_certs_under_the_same_ca_and_keeps_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        AuthMaterial::ensure(dir.path()).unwrap();
        let paths = AuthPaths::new(dir.path());
        let kept =
            [paths.ca_cert(), paths.ca_key(), paths.signing_key()].map(|f| fs::read(f).unwrap());
        let renewed_files = [
            paths.server_cert(),
            paths.cli_cert(),
            paths.cp_client_cert(),
        ];
        let before = renewed_files.clone().map(|f| fs::read(f).unwrap());
        let renewed = AuthMaterial::renew(dir.path()).unwrap();
        assert_eq!(
            renewed.iter().map(|r| r.name).collect::<Vec<_>>(),
            vec![
                "server certificate",
                "CLI client certificate",
                "CP client certificate"
            ]
        );
        assert_eq!(
            kept,
            [paths.ca_cert(), paths.ca_key(), paths.signing_key()].map(|f| fs::read(f).unwrap())
        );
        let ca = Ca::load(
            &read_file(&paths.ca_cert()).unwrap(),
            &read_file(&paths.ca_key()).unwrap(),
        )
        .unwrap();
        let roots = roots_of(&ca);
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let algs = provider.signature_verification_algorithms.all;
        let client_verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            std::sync::Arc::new(roots.clone()),
            provider.clone(),
        )
        .build()
        .unwrap();
        for (f, old) in renewed_files.iter().zip(before) {
            let new = fs::read(f).unwrap();
            assert_ne!(new, old, "{}", f.display());
            let der =
                single_pem_block("c", std::str::from_utf8(&new).unwrap(), "CERTIFICATE").unwrap();
            let ee = rustls::pki_types::CertificateDer::from(der);
            let now = rustls::pki_types::UnixTime::now();
            // Chains to the same CA, checked as its peers check it.
            if f == &paths.server_cert() {
                let parsed = rustls::server::ParsedCertificate::try_from(&ee).unwrap();
                rustls::client::verify_server_cert_signed_by_trust_anchor(
                    &parsed,
                    &roots,
                    &[],
                    now,
                    algs,
                )
                .unwrap();
            } else {
                client_verifier.verify_client_cert(&ee, &[], now).unwrap();
            }
        }
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        for key in [paths.server_key(), paths.cli_key(), paths.cp_client_key()] {
            assert_eq!(mode(&key), 0o600);
        }
        assert!(renewed[0].not_after > OffsetDateTime::now_utc() + Duration::days(364));
        let missing = tempfile::tempdir().unwrap();
        assert!(
            AuthMaterial::renew(missing.path()).is_err(),
            "no CA: nothing to renew under"
        );
    }
}
