//! The provisioning seam: what `clawker agent run|stop|rm` needs from a
//! runtime.
//!
//! The agent's identity is minted above this seam (it names the runtime id,
//! which exists only once the runtime created the agent), so
//! [`Provision::run`] asks for the [`BootstrapBundle`] through a callback
//! and delivers it the runtime's way: engine mode copies a tar into the
//! created container before starting it; Swarm mode creates the service
//! with no replicas, mounts the bundle as swarm secrets, then scales it
//! to one.

use std::collections::HashMap;
use std::net::IpAddr;

use futures::future::BoxFuture;

use super::RuntimeError;

/// An agent to create.
#[derive(Debug, Clone)]
pub struct AgentSpec {
    /// Container (engine) or service (swarm) name: unique per runtime.
    pub name: String,
    pub agent: String,
    /// Empty = unscoped (no project label).
    pub project: String,
    pub image: String,
    /// The agent network (clawkerd is dialled, and reaches the CP, there).
    pub network: String,
    /// The user command; empty = the image's CMD.
    pub command: Vec<String>,
    /// Environment, `K=V`.
    pub env: Vec<String>,
    /// Extra labels (tests mark their agents).
    pub extra_labels: HashMap<String, String>,
    /// Further networks to attach (besides the agent network).
    pub extra_networks: Vec<String>,
    /// Swarm placement constraints (`node.labels.zone==a`); engine mode
    /// refuses a non-empty list rather than ignore it.
    pub placement: Vec<String>,
    pub confinement: Confinement,
}

/// How an agent is confined, as plain values (decided above this seam:
/// `cp::agent` turns `[agent]` config and flags into these). Engine mode
/// applies every field to the container; Swarm mode maps them onto the
/// service's task template (see `docker::swarm::provision`), except
/// `no_new_privileges`, which Engine 20.10 service specs cannot express.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Confinement {
    /// Capabilities kept: every other one is dropped (`cap_drop: ALL`).
    pub caps: Vec<String>,
    pub no_new_privileges: bool,
    pub pids_limit: Option<i64>,
    pub memory_bytes: Option<i64>,
    pub nano_cpus: Option<i64>,
    pub read_only_rootfs: bool,
    /// tmpfs mounts: container path → mount options (`size=`, `mode=` and
    /// flags such as `nosuid`).
    pub tmpfs: Vec<(String, String)>,
    /// Anonymous volumes at these paths: they outlive restarts and are
    /// removed with the container.
    pub volumes: Vec<String>,
    /// Read-write bind mounts: (host path, container path).
    pub binds: Vec<(String, String)>,
}

/// One file of a bootstrap bundle.
#[derive(Clone, PartialEq, Eq)]
pub struct BundleFile {
    /// File name inside [`BootstrapBundle::dir`].
    pub name: String,
    pub data: Vec<u8>,
}

impl std::fmt::Debug for BundleFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key and the assertion are secrets: never in a log line.
        write!(f, "BundleFile({}, {} bytes)", self.name, self.data.len())
    }
}

/// The files clawkerd reads at boot (leaf, key, CA, assertion), each owned
/// by root and readable only by it, in a directory only root may enter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootstrapBundle {
    /// Absolute path inside the agent (`/run/clawker/bootstrap`).
    pub dir: String,
    pub files: Vec<BundleFile>,
}

impl BootstrapBundle {
    /// `path` of every file inside the agent.
    pub fn path_of(&self, file: &BundleFile) -> String {
        format!("{}/{}", self.dir.trim_end_matches('/'), file.name)
    }

    /// The directory the bundle directory lives in (the agent's state
    /// volume): where [`to_tar`](Self::to_tar) is unpacked.
    pub fn root(&self) -> &str {
        let dir = self.dir.trim_end_matches('/');
        match dir.rfind('/') {
            Some(0) | None => "/",
            Some(i) => &dir[..i],
        }
    }

    /// A tar to unpack at [`root`](Self::root), as the Engine API's
    /// archive upload wants it: the bundle directory (0700) with its files
    /// (0400) and an empty `log/` (0700) beside it for clawkerd's log, all
    /// owned by root.
    pub fn to_tar(&self) -> std::io::Result<Vec<u8>> {
        let mut b = tar::Builder::new(Vec::new());
        let dir = |path: &str, mode: u32, b: &mut tar::Builder<Vec<u8>>| {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Directory);
            h.set_mode(mode);
            h.set_uid(0);
            h.set_gid(0);
            h.set_size(0);
            h.set_mtime(0);
            b.append_data(&mut h, path, std::io::empty())
        };
        let full = self.dir.trim_end_matches('/');
        let rel = full
            .strip_prefix(self.root())
            .unwrap_or(full)
            .trim_start_matches('/');
        dir(&format!("{rel}/"), 0o700, &mut b)?;
        dir("log/", 0o700, &mut b)?;
        for f in &self.files {
            let mut h = tar::Header::new_gnu();
            h.set_mode(0o400);
            h.set_uid(0);
            h.set_gid(0);
            h.set_size(f.data.len() as u64);
            h.set_mtime(0);
            b.append_data(&mut h, format!("{rel}/{}", f.name), f.data.as_slice())?;
        }
        b.into_inner()
    }
}

/// Mints the bundle for a runtime id (called once the id exists).
pub type MintBundle<'a> = &'a (dyn Fn(&str) -> Result<BootstrapBundle, String> + Send + Sync);

/// Why provisioning failed, in words a user can act on.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error("network {network} is missing: {advice}")]
    NetworkMissing { network: String, advice: String },
    #[error("name taken: an agent named {name} already exists{hint}")]
    NameTaken { name: String, hint: String },
    #[error("image {image} not found ({message}): build it with `scripts/build-agent-image.sh`")]
    ImageMissing { image: String, message: String },
    #[error("no agent named {0}")]
    NoSuchAgent(String),
    #[error("preparing the bootstrap bundle: {0}")]
    Bundle(String),
    /// A value of the spec cannot be used (e.g. the workspace directory).
    #[error("{0}")]
    InvalidSpec(String),
    /// The request cannot be met by this runtime (e.g. placement
    /// constraints in engine mode).
    #[error("{0}")]
    Unsupported(String),
    /// Agents would have nowhere to register (swarm: no CP task running).
    #[error("the control plane cannot be reached by agents: {0}")]
    NoControlPlane(String),
    /// The runtime accepted the agent but could not start it.
    #[error("the agent did not start: {0}")]
    NotStarted(String),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
}

/// Creating, finding, stopping and removing agents.
pub trait Provision: Send + Sync {
    /// The address agents reach the CP's agent API on, on `network`
    /// (engine: the bridge gateway; swarm: the CP task's overlay address).
    fn cp_address<'a>(&'a self, network: &'a str) -> BoxFuture<'a, Result<IpAddr, ProvisionError>>;

    /// Creates and starts the agent; returns its runtime id. On any
    /// failure after the runtime created something, it is removed: never
    /// a half-provisioned agent left behind.
    fn run<'a>(
        &'a self,
        spec: &'a AgentSpec,
        bundle: MintBundle<'a>,
    ) -> BoxFuture<'a, Result<String, ProvisionError>>;

    /// The runtime id of the agent named `name`.
    fn find<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<String, ProvisionError>>;

    /// Stops it (its identity row is kept).
    fn stop<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), ProvisionError>>;

    /// Removes it and everything provisioned with it.
    fn remove<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), ProvisionError>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundle_tar_unpacks_in_the_state_dir_with_private_dirs_and_read_only_files() {
        let bundle = BootstrapBundle {
            dir: "/var/lib/clawker/bootstrap".into(),
            files: ["cert.pem", "key.pem", "ca.pem", "assertion.jwt"]
                .iter()
                .map(|n| BundleFile {
                    name: (*n).into(),
                    data: n.as_bytes().to_vec(),
                })
                .collect(),
        };
        assert_eq!(bundle.root(), "/var/lib/clawker");
        let bytes = bundle.to_tar().unwrap();
        let mut ar = tar::Archive::new(bytes.as_slice());
        let entries: Vec<(String, u32, u64)> = ar
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let h = e.header();
                (
                    e.path().unwrap().display().to_string(),
                    h.mode().unwrap(),
                    h.uid().unwrap(),
                )
            })
            .collect();
        assert_eq!(entries[0], ("bootstrap/".into(), 0o700, 0));
        assert_eq!(entries[1], ("log/".into(), 0o700, 0));
        for f in ["cert.pem", "key.pem", "ca.pem", "assertion.jwt"] {
            assert!(
                entries.contains(&(format!("bootstrap/{f}"), 0o400, 0)),
                "{f}: {entries:?}"
            );
        }
        assert_eq!(
            bundle.path_of(&bundle.files[0]),
            "/var/lib/clawker/bootstrap/cert.pem"
        );
        assert_eq!(
            format!("{:?}", bundle.files[1]),
            "BundleFile(key.pem, 7 bytes)"
        );
    }
}
