//! `clawker agent run|stop|rm`: resolve the agent's confinement
//! ([`AgentDefaults`]: `[agent]` in cp.toml, then flags), mint its identity
//! for its runtime id, hand the bundle to the runtime (engine: copied into
//! the container between create and start; swarm: mounted as secrets
//! before the service scales to one), so clawkerd finds it at PID 1 start.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::defaults::{self, agent_paths, agent_user};
use crate::identity::{self, AgentName, ProjectSlug};
use crate::pki::{self, AuthMaterial};
use crate::runtime::provision::{
    AgentSpec, BootstrapBundle, BundleFile, Confinement, Provision, ProvisionError,
};

/// `[agent]` in cp.toml: how `clawker agent run` confines new agent
/// containers. Every key is optional; the defaults are the hardened ones.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentDefaults {
    /// Capabilities kept after dropping all (default: what clawkerd needs,
    /// [`defaults::AGENT_CAPS`]).
    pub caps: Vec<String>,
    pub no_new_privileges: bool,
    /// Max processes in the container; 0 = no limit.
    pub pids_limit: i64,
    /// Memory limit, e.g. `"4g"`, `"512m"`; `"0"` = no limit.
    pub memory: String,
    /// CPU limit in cores (e.g. 1.5); 0 = no limit.
    pub cpus: f64,
    /// Read-only root filesystem (writable: the `/tmp` and `/run` tmpfs,
    /// the state volume, the agent's home volume, the workspace).
    pub read_only: bool,
    /// Size of the `/tmp` tmpfs, e.g. `"512m"`.
    pub tmp_size: String,
    /// Host directory bind-mounted read-write at `/workspace`.
    pub workspace: Option<PathBuf>,
    /// Extra environment, `K=V` (`CLAWKER_*` is reserved).
    pub env: Vec<String>,
}

impl Default for AgentDefaults {
    fn default() -> Self {
        Self {
            caps: defaults::AGENT_CAPS
                .iter()
                .map(|c| (*c).to_owned())
                .collect(),
            no_new_privileges: true,
            pids_limit: 1024,
            memory: "4g".into(),
            cpus: 0.0,
            read_only: true,
            tmp_size: "512m".into(),
            workspace: None,
            env: Vec::new(),
        }
    }
}

/// Command-line overrides of [`AgentDefaults`] (`None`/empty = keep).
#[derive(Debug, Clone, Default)]
pub struct AgentOverrides {
    /// Added to the kept capabilities.
    pub cap_add: Vec<String>,
    /// Removed from the kept capabilities.
    pub cap_drop: Vec<String>,
    pub no_new_privileges: Option<bool>,
    pub pids_limit: Option<i64>,
    pub memory: Option<String>,
    pub cpus: Option<f64>,
    pub read_only: Option<bool>,
    pub tmp_size: Option<String>,
    pub workspace: Option<PathBuf>,
    /// Appended to the configured environment (later wins).
    pub env: Vec<String>,
}

/// A bad `[agent]` value or flag, in words a user can act on.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AgentConfigError {
    #[error("capability {0:?}: want a name like KILL or CAP_KILL")]
    Capability(String),
    #[error("size {0:?}: want a number with an optional k/m/g suffix, e.g. 512m")]
    Size(String),
    #[error("cpus {0}: want a non-negative number of cores")]
    Cpus(f64),
    #[error("pids limit {0}: want 0 (no limit) or more")]
    Pids(i64),
    #[error("env {0:?}: want KEY=VALUE with KEY of letters, digits and _")]
    Env(String),
    #[error("env {0:?}: CLAWKER_* variables are set by clawker")]
    ReservedEnv(String),
    #[error("workspace {path}: {detail}")]
    Workspace { path: String, detail: String },
}

/// The confinement of one container, resolved from config and flags.
#[derive(Debug, Clone, PartialEq)]
pub struct Hardening {
    pub caps: Vec<String>,
    pub no_new_privileges: bool,
    pub pids_limit: Option<i64>,
    pub memory_bytes: Option<i64>,
    pub nano_cpus: Option<i64>,
    pub read_only: bool,
    pub tmp_size_bytes: i64,
    pub workspace: Option<PathBuf>,
}

impl Default for Hardening {
    /// The hardened defaults (what [`AgentDefaults::default`] resolves
    /// to), without a workspace.
    fn default() -> Self {
        Self {
            caps: defaults::AGENT_CAPS
                .iter()
                .map(|c| (*c).to_owned())
                .collect(),
            no_new_privileges: true,
            pids_limit: Some(1024),
            memory_bytes: Some(4 << 30),
            nano_cpus: None,
            read_only: true,
            tmp_size_bytes: 512 << 20,
            workspace: None,
        }
    }
}

/// `KILL`, `cap_kill` → `KILL`.
fn capability(name: &str) -> Result<String, AgentConfigError> {
    let up = name.trim().to_ascii_uppercase();
    let bare = up.strip_prefix("CAP_").unwrap_or(&up);
    if bare.is_empty() || !bare.bytes().all(|b| b.is_ascii_uppercase() || b == b'_') {
        return Err(AgentConfigError::Capability(name.to_owned()));
    }
    Ok(bare.to_owned())
}

/// `512m` → 536870912; `0` → 0. Suffixes k, m, g (powers of 1024).
pub fn parse_size(s: &str) -> Result<i64, AgentConfigError> {
    let t = s.trim().to_ascii_lowercase();
    let (num, mult) = match t.chars().last() {
        Some('k') => (&t[..t.len() - 1], 1i64 << 10),
        Some('m') => (&t[..t.len() - 1], 1 << 20),
        Some('g') => (&t[..t.len() - 1], 1 << 30),
        Some('b') => (&t[..t.len() - 1], 1),
        _ => (t.as_str(), 1),
    };
    num.parse::<i64>()
        .ok()
        .filter(|n| *n >= 0)
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| AgentConfigError::Size(s.to_owned()))
}

/// `K=V` with a sane key that is not clawker's.
fn env_entry(kv: &str) -> Result<String, AgentConfigError> {
    let Some((k, _)) = kv.split_once('=') else {
        return Err(AgentConfigError::Env(kv.to_owned()));
    };
    let ok = k
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if !ok {
        return Err(AgentConfigError::Env(kv.to_owned()));
    }
    if k.starts_with("CLAWKER_") {
        return Err(AgentConfigError::ReservedEnv(kv.to_owned()));
    }
    Ok(kv.to_owned())
}

impl AgentDefaults {
    /// Applies `o` and checks every value: the confinement and the extra
    /// environment.
    pub fn resolve(
        &self,
        o: &AgentOverrides,
    ) -> Result<(Hardening, Vec<String>), AgentConfigError> {
        let mut caps: Vec<String> = Vec::new();
        for c in self.caps.iter().chain(&o.cap_add) {
            let c = capability(c)?;
            if !caps.contains(&c) {
                caps.push(c);
            }
        }
        for c in &o.cap_drop {
            let c = capability(c)?;
            caps.retain(|k| *k != c);
        }
        let pids = o.pids_limit.unwrap_or(self.pids_limit);
        if pids < 0 {
            return Err(AgentConfigError::Pids(pids));
        }
        let memory = parse_size(o.memory.as_deref().unwrap_or(&self.memory))?;
        let cpus = o.cpus.unwrap_or(self.cpus);
        if !cpus.is_finite() || cpus < 0.0 {
            return Err(AgentConfigError::Cpus(cpus));
        }
        let tmp = parse_size(o.tmp_size.as_deref().unwrap_or(&self.tmp_size))?;
        let env = self
            .env
            .iter()
            .chain(&o.env)
            .map(|kv| env_entry(kv))
            .collect::<Result<Vec<_>, _>>()?;
        Ok((
            Hardening {
                caps,
                no_new_privileges: o.no_new_privileges.unwrap_or(self.no_new_privileges),
                pids_limit: (pids > 0).then_some(pids),
                memory_bytes: (memory > 0).then_some(memory),
                nano_cpus: (cpus > 0.0).then(|| (cpus * 1e9).round() as i64),
                read_only: o.read_only.unwrap_or(self.read_only),
                tmp_size_bytes: tmp,
                workspace: o.workspace.clone().or_else(|| self.workspace.clone()),
            },
            env,
        ))
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct RunSpec {
    pub agent: AgentName,
    pub project: ProjectSlug,
    pub image: String,
    pub network: String,
    pub agent_port: u16,
    /// The user command; empty = the image's CMD.
    pub command: Vec<String>,
    /// Extra environment (`K=V`, already checked).
    pub env: Vec<String>,
    pub hardening: Hardening,
    /// Extra labels (tests mark their containers).
    pub extra_labels: HashMap<String, String>,
    /// Further networks to attach before start (besides clawker-net).
    pub extra_networks: Vec<String>,
    /// Mint the leaf for this container id instead of the real one (a test
    /// of the untrusted path: the cert then names another container).
    pub mint_for_container: Option<String>,
    /// Lifetime of the agent's leaf (cp.toml `agent_cert_ttl`); clawkerd
    /// renews it over its session at half its lifetime.
    pub cert_ttl: std::time::Duration,
    /// Swarm placement constraints (engine mode refuses any).
    pub placement: Vec<String>,
}

/// The container (or service) name: the canonical CN (unique per
/// project/agent).
pub fn container_name(project: &ProjectSlug, agent: &AgentName) -> String {
    identity::canonical_cn(project, agent)
}

/// The bundle clawkerd reads at [`agent_paths::BOOTSTRAP_DIR`].
pub fn bootstrap_bundle(
    leaf: &pki::CertifiedKey,
    ca_pem: &str,
    assertion: &str,
) -> BootstrapBundle {
    let file = |name: &str, data: &str| BundleFile {
        name: name.to_owned(),
        data: data.as_bytes().to_vec(),
    };
    BootstrapBundle {
        dir: agent_paths::BOOTSTRAP_DIR.to_owned(),
        files: vec![
            file(pki::bootstrap::CERT, &leaf.cert_pem),
            file(pki::bootstrap::KEY, &leaf.key_pem),
            file(pki::bootstrap::CA, ca_pem),
            file(pki::bootstrap::ASSERTION, assertion),
        ],
    }
}

/// The workspace as a bind source: an existing directory, absolute,
/// owned by the agent user (chowned if it is not: the agent must be able
/// to write it, and no capability inside the container could fix that).
fn prepare_workspace(dir: &Path) -> Result<String, AgentConfigError> {
    let err = |detail: String| AgentConfigError::Workspace {
        path: dir.display().to_string(),
        detail,
    };
    let abs = dir.canonicalize().map_err(|e| err(e.to_string()))?;
    let md = std::fs::metadata(&abs).map_err(|e| err(e.to_string()))?;
    if !md.is_dir() {
        return Err(err("not a directory".into()));
    }
    use std::os::unix::fs::MetadataExt;
    if md.uid() != agent_user::UID || md.gid() != agent_user::GID {
        std::os::unix::fs::chown(&abs, Some(agent_user::UID), Some(agent_user::GID)).map_err(
            |e| {
                err(format!(
                    "cannot hand it to the agent user {}:{}: {e}",
                    agent_user::UID,
                    agent_user::GID
                ))
            },
        )?;
    }
    abs.to_str()
        .map(str::to_owned)
        .ok_or_else(|| err("path is not UTF-8".into()))
}

/// The provisioning-level confinement for `h`.
fn confinement(h: &Hardening, workspace: Option<String>) -> Confinement {
    Confinement {
        caps: h.caps.clone(),
        no_new_privileges: h.no_new_privileges,
        pids_limit: h.pids_limit,
        memory_bytes: h.memory_bytes,
        nano_cpus: h.nano_cpus,
        read_only_rootfs: h.read_only,
        tmpfs: vec![
            // `exec` spelled out: Docker mounts a tmpfs noexec unless told
            // otherwise, and agents build and run things in /tmp.
            (
                "/tmp".into(),
                format!("rw,exec,nosuid,nodev,size={},mode=1777", h.tmp_size_bytes),
            ),
            (
                "/run".into(),
                "rw,nosuid,nodev,noexec,size=16m,mode=755".into(),
            ),
        ],
        volumes: vec![agent_paths::STATE_DIR.into(), agent_user::HOME.into()],
        binds: workspace
            .map(|w| vec![(w, agent_paths::WORKSPACE.to_owned())])
            .unwrap_or_default(),
    }
}

/// Creates, provisions and starts the agent; returns its runtime id.
pub async fn run(
    runtime: &dyn Provision,
    material: &AuthMaterial,
    spec: &RunSpec,
) -> Result<String, ProvisionError> {
    let cp_ip = runtime.cp_address(&spec.network).await?;
    let cp_addr = std::net::SocketAddr::new(cp_ip, spec.agent_port);
    let workspace = spec
        .hardening
        .workspace
        .as_deref()
        .map(prepare_workspace)
        .transpose()
        .map_err(|e| ProvisionError::InvalidSpec(e.to_string()))?;
    let mut env = vec![
        format!("CLAWKER_AGENT={}", spec.agent),
        format!("CLAWKER_PROJECT={}", spec.project),
        format!("CLAWKER_CP_AGENT_ADDR={cp_addr}"),
        format!("CLAWKER_CP_TOKEN_URL=https://{cp_addr}/oauth2/token"),
        format!("CLAWKER_BOOTSTRAP_DIR={}", agent_paths::BOOTSTRAP_DIR),
        format!("CLAWKER_LOG_FILE={}", agent_paths::LOG_FILE),
        format!("CLAWKER_READY_FILE={}", agent_paths::READY_FILE),
    ];
    env.extend(spec.env.iter().cloned());
    let container = AgentSpec {
        name: container_name(&spec.project, &spec.agent),
        agent: spec.agent.to_string(),
        project: spec.project.to_string(),
        image: spec.image.clone(),
        network: spec.network.clone(),
        command: spec.command.clone(),
        env,
        extra_labels: spec.extra_labels.clone(),
        extra_networks: spec.extra_networks.clone(),
        placement: spec.placement.clone(),
        confinement: confinement(&spec.hardening, workspace),
    };
    let bundle = |id: &str| -> Result<BootstrapBundle, String> {
        let bound = spec.mint_for_container.as_deref().unwrap_or(id);
        let ttl = time::Duration::try_from(spec.cert_ttl).map_err(|e| e.to_string())?;
        let leaf = material
            .ca
            .mint_agent_with_ttl(&spec.project, &spec.agent, bound, ttl)
            .map_err(|e| e.to_string())?;
        let assertion = crate::agent_api::assertion::mint_agent_assertion(
            &material.signing_key,
            &crate::defaults::token_audience(spec.agent_port),
        )
        .map_err(|e| e.to_string())?;
        Ok(bootstrap_bundle(&leaf, material.ca.cert_pem(), &assertion))
    };
    runtime.run(&container, &bundle).await.map_err(|e| match e {
        ProvisionError::NameTaken { name, .. } => ProvisionError::NameTaken {
            name,
            hint: format!(
                " (remove it with `clawker agent rm {}{}`)",
                spec.agent,
                if spec.project.is_empty() {
                    String::new()
                } else {
                    format!(" --project {}", spec.project)
                }
            ),
        },
        other => other,
    })
}

/// Resolves NAME (+project) to the runtime id.
pub async fn find(
    runtime: &dyn Provision,
    project: &ProjectSlug,
    agent: &AgentName,
) -> Result<String, ProvisionError> {
    runtime.find(&container_name(project, agent)).await
}

/// Stops the agent (its identity row is kept).
pub async fn stop(runtime: &dyn Provision, id: &str) -> Result<(), ProvisionError> {
    runtime.stop(id).await
}

/// Removes the agent (the CP evicts its identity row).
pub async fn remove(runtime: &dyn Provision, id: &str) -> Result<(), ProvisionError> {
    runtime.remove(id).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundle_holds_the_four_bootstrap_files_where_clawkerd_is_pointed() {
        let ca = crate::pki::Ca::generate().unwrap();
        let leaf = ca
            .mint_agent(
                &ProjectSlug::unscoped(),
                &AgentName::new("a").unwrap(),
                "ab",
            )
            .unwrap();
        let b = bootstrap_bundle(&leaf, ca.cert_pem(), "jwt");
        assert_eq!(b.dir, agent_paths::BOOTSTRAP_DIR);
        let names: Vec<&str> = b.files.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["cert.pem", "key.pem", "ca.pem", "assertion.jwt"]);
        assert_eq!(b.files[3].data, b"jwt");
        assert_eq!(b.files[0].data, leaf.cert_pem.as_bytes());
        assert_eq!(
            format!("{}/{}", agent_paths::STATE_DIR, "bootstrap"),
            agent_paths::BOOTSTRAP_DIR,
            "clawkerd is pointed where the tar lands"
        );
        assert_eq!(
            container_name(
                &ProjectSlug::new("p").unwrap(),
                &AgentName::new("a").unwrap()
            ),
            "clawker.p.a"
        );
    }

    #[test]
    fn hardened_defaults_keep_only_clawkerds_capabilities_and_limit_everything() {
        let h = Hardening::default();
        let (resolved, env) = AgentDefaults::default()
            .resolve(&AgentOverrides::default())
            .unwrap();
        assert_eq!(resolved, h, "the config defaults are the hardened defaults");
        assert!(env.is_empty());
        assert_eq!(h.caps, defaults::AGENT_CAPS);
        assert!(h.no_new_privileges && h.read_only);
        assert_eq!(h.pids_limit, Some(1024));
        assert_eq!(h.memory_bytes, Some(4 << 30));
        assert_eq!(h.nano_cpus, None);
        let c = confinement(&h, None);
        assert!(c.volumes.contains(&agent_paths::STATE_DIR.to_owned()));
        assert!(
            c.tmpfs
                .iter()
                .any(|(p, o)| p == "/tmp" && o.contains("size=536870912") && o.contains(",exec,"))
        );
        assert!(c.binds.is_empty());
    }

    #[test]
    fn config_then_flags_override_each_value() {
        let file: AgentDefaults = toml::from_str(
            r#"
            caps = ["setuid", "CAP_SETGID", "KILL", "CHOWN"]
            pids_limit = 64
            memory = "512m"
            cpus = 1.5
            env = ["A=1"]
            "#,
        )
        .unwrap();
        let o = AgentOverrides {
            cap_add: vec!["net_admin".into()],
            cap_drop: vec!["chown".into()],
            memory: Some("0".into()),
            read_only: Some(false),
            env: vec!["B=two=2".into()],
            ..AgentOverrides::default()
        };
        let (h, env) = file.resolve(&o).unwrap();
        assert_eq!(h.caps, vec!["SETUID", "SETGID", "KILL", "NET_ADMIN"]);
        assert_eq!(h.pids_limit, Some(64));
        assert_eq!(h.memory_bytes, None, "0 = no limit");
        assert_eq!(h.nano_cpus, Some(1_500_000_000));
        assert!(!h.read_only && h.no_new_privileges);
        assert_eq!(env, vec!["A=1", "B=two=2"]);
        assert!(toml::from_str::<AgentDefaults>("capz = []").is_err());
    }

    #[test]
    fn bad_values_are_refused_with_what_to_write_instead() {
        let d = AgentDefaults::default();
        let with = |o: AgentOverrides| d.resolve(&o).unwrap_err();
        assert!(matches!(
            with(AgentOverrides {
                cap_add: vec!["KILL; rm".into()],
                ..Default::default()
            }),
            AgentConfigError::Capability(_)
        ));
        assert!(matches!(
            with(AgentOverrides {
                memory: Some("lots".into()),
                ..Default::default()
            }),
            AgentConfigError::Size(_)
        ));
        assert!(matches!(
            with(AgentOverrides {
                cpus: Some(-1.0),
                ..Default::default()
            }),
            AgentConfigError::Cpus(_)
        ));
        for (kv, reserved) in [
            ("NOEQUALS", false),
            ("1X=y", false),
            ("CLAWKER_AGENT=x", true),
        ] {
            let e = with(AgentOverrides {
                env: vec![kv.into()],
                ..Default::default()
            });
            assert_eq!(
                matches!(e, AgentConfigError::ReservedEnv(_)),
                reserved,
                "{kv}: {e}"
            );
        }
        assert_eq!(parse_size("2k").unwrap(), 2048);
        assert_eq!(parse_size("7").unwrap(), 7);
        assert!(parse_size("-1m").is_err());
        assert!(parse_size("99999999999g").is_err(), "overflow is an error");
    }

    #[test]
    fn workspace_must_be_an_existing_directory() {
        let dir = tempfile::tempdir().unwrap();
        let got = prepare_workspace(dir.path()).unwrap();
        use std::os::unix::fs::MetadataExt;
        let md = std::fs::metadata(&got).unwrap();
        assert_eq!((md.uid(), md.gid()), (agent_user::UID, agent_user::GID));
        let file = dir.path().join("f");
        std::fs::write(&file, "x").unwrap();
        assert!(
            prepare_workspace(&file)
                .unwrap_err()
                .to_string()
                .contains("not a directory")
        );
        assert!(prepare_workspace(&dir.path().join("missing")).is_err());
    }
}
