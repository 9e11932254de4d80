//! The agent overlay (`clawker-overlay`): attachable (the CP service and any
//! operator container can join it), swarm-scoped, with an explicit subnet;
//! and whether the kernel can encrypt it.
//!
//! **Encryption.** `--opt encrypted` makes swarm install IPsec (ESP,
//! AES-GCM) between nodes. On a kernel without ESP the engine reports
//! nothing at create or task start, installs the xfrm policy anyway, and
//! every cross-node packet on the network is dropped (measured here:
//! `Failed Adding rSA{…}: function not implemented` in the engine log, ping
//! 100 % loss). So the CP refuses an encrypted overlay on such a kernel
//! with the reason, rather than let agents on other nodes vanish. The check
//! can only see the kernel of the node the CP runs on.

use std::collections::HashMap;
use std::io::Read as _;

use bollard::models::{Ipam, IpamConfig, NetworkCreateRequest};

use super::{Swarm, SwarmError};
use crate::defaults::labels;
use crate::docker::is_status;
use crate::docker::network::first_host;

/// The overlay as the CP needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overlay {
    pub id: String,
    pub name: String,
    pub subnet: String,
    pub encrypted: bool,
}

/// Looks the overlay up; `Ok(None)` when it does not exist. An existing
/// network that is not a swarm overlay is an error (agents could not join
/// it from other nodes).
pub async fn find(swarm: &Swarm, name: &str) -> Result<Option<Overlay>, SwarmError> {
    let net = match swarm
        .docker()
        .inspect_network(
            name,
            None::<bollard::query_parameters::InspectNetworkOptions>,
        )
        .await
    {
        Ok(n) => n,
        Err(e) if is_status(&e, 404) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let driver = net.driver.clone().unwrap_or_default();
    let scope = net.scope.clone().unwrap_or_default();
    // Right after creation a manager may still report the driver empty
    // (the allocator has not filled it in yet): scope decides then.
    if scope != "swarm" || !(driver.is_empty() || driver == "overlay") {
        return Err(SwarmError::Invalid(format!(
            "network {name} exists but is a {driver} network of scope {scope}: Swarm mode needs a swarm-scoped overlay"
        )));
    }
    let subnet = net
        .ipam
        .and_then(|i| i.config)
        .and_then(|c| c.into_iter().next())
        .and_then(|c| c.subnet)
        .unwrap_or_default();
    Ok(Some(Overlay {
        id: net.id.unwrap_or_default(),
        name: name.to_owned(),
        subnet,
        encrypted: net
            .options
            .as_ref()
            .is_some_and(|o| o.contains_key("encrypted")),
    }))
}

/// Creates the overlay (attachable, explicit subnet, gateway = first host,
/// encrypted if asked and the kernel can; `internal`: no route out, for
/// the quarantine overlay) unless it exists; returns it.
pub async fn ensure(
    swarm: &Swarm,
    name: &str,
    subnet: &str,
    encrypted: bool,
    internal: bool,
) -> Result<Overlay, SwarmError> {
    if encrypted {
        check_encryption(&KernelConfig::read_running()).map_err(SwarmError::Invalid)?;
    }
    if let Some(o) = find(swarm, name).await? {
        return Ok(o);
    }
    let gateway = first_host(subnet).ok_or_else(|| {
        SwarmError::Invalid(format!("invalid subnet {subnet:?} (want a.b.c.d/nn)"))
    })?;
    let mut options = HashMap::new();
    if encrypted {
        options.insert("encrypted".to_owned(), String::new());
    }
    let req = NetworkCreateRequest {
        name: name.to_owned(),
        driver: Some("overlay".into()),
        scope: Some("swarm".into()),
        attachable: Some(true),
        internal: Some(internal),
        ipam: Some(Ipam {
            config: Some(vec![IpamConfig {
                subnet: Some(subnet.to_owned()),
                gateway: Some(gateway.to_string()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        options: Some(options),
        labels: Some(HashMap::from([
            (labels::MANAGED.to_owned(), labels::MANAGED_VALUE.to_owned()),
            (
                labels::PURPOSE.to_owned(),
                if internal {
                    labels::PURPOSE_QUARANTINE
                } else {
                    labels::PURPOSE_NETWORK
                }
                .to_owned(),
            ),
        ])),
        ..Default::default()
    };
    match swarm.docker().create_network(req).await {
        Ok(_) => {}
        Err(e) if is_status(&e, 409) => {} // lost a race: it exists now
        Err(e) => return Err(e.into()),
    }
    find(swarm, name)
        .await?
        .ok_or_else(|| SwarmError::Invalid(format!("network {name} vanished after create")))
}

/// What the kernel's build configuration says, when it can be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelConfig {
    /// `/proc/config.gz`, decompressed.
    Known(String),
    /// No readable configuration (no `CONFIG_IKCONFIG_PROC`).
    Unknown(String),
}

impl KernelConfig {
    /// The running kernel's (`/proc/config.gz`).
    pub fn read_running() -> Self {
        let mut text = String::new();
        match std::fs::File::open("/proc/config.gz") {
            Ok(f) => match flate2::read::GzDecoder::new(f).read_to_string(&mut text) {
                Ok(_) => Self::Known(text),
                Err(e) => Self::Unknown(format!("/proc/config.gz: {e}")),
            },
            Err(e) => Self::Unknown(format!("/proc/config.gz: {e}")),
        }
    }

    /// `Some(true)` for `=y`/`=m`, `Some(false)` for "is not set" or
    /// absent, `None` when the configuration is unknown.
    fn has(&self, option: &str) -> Option<bool> {
        let Self::Known(text) = self else {
            return None;
        };
        let set = text.lines().any(|l| {
            l.strip_prefix(option)
                .and_then(|rest| rest.strip_prefix('='))
                .is_some_and(|v| v == "y" || v == "m")
        });
        Some(set)
    }
}

/// `Ok` when the kernel can carry an encrypted overlay (IPsec ESP with
/// AES-GCM), else the reason. An unreadable configuration is not a
/// refusal: the check cannot know, and says so in the log.
pub fn check_encryption(kernel: &KernelConfig) -> Result<(), String> {
    let mut missing = Vec::new();
    for option in ["CONFIG_INET_ESP", "CONFIG_CRYPTO_GCM", "CONFIG_XFRM_USER"] {
        if kernel.has(option) == Some(false) {
            missing.push(option);
        }
    }
    if let KernelConfig::Unknown(why) = kernel {
        tracing::warn!(
            event = "swarm_encryption_unverified",
            reason = %why,
            "cannot read the kernel configuration; an encrypted overlay drops all cross-node traffic on a kernel without IPsec ESP"
        );
        return Ok(());
    }
    if missing.is_empty() {
        return Ok(());
    }
    Err(format!(
        "the encrypted overlay data path is unavailable on this kernel: {} not set (/proc/config.gz). \
         Swarm would install the IPsec policy anyway and silently drop every cross-node packet \
         on the network; use an unencrypted overlay (set `[swarm] encrypted = false`) or nodes \
         whose kernel has IPsec ESP and AES-GCM",
        missing.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encryption_is_refused_with_the_kernel_reason() {
        let here = KernelConfig::Known(
            "CONFIG_XFRM=y\nCONFIG_XFRM_USER=y\n# CONFIG_INET_ESP is not set\n# CONFIG_CRYPTO_GCM is not set\n"
                .into(),
        );
        let e = check_encryption(&here).unwrap_err();
        assert!(
            e.contains("CONFIG_INET_ESP, CONFIG_CRYPTO_GCM not set"),
            "{e}"
        );
        assert!(e.contains("silently drop"), "{e}");
        let capable = KernelConfig::Known(
            "CONFIG_XFRM_USER=y\nCONFIG_INET_ESP=m\nCONFIG_CRYPTO_GCM=y\n".into(),
        );
        assert!(check_encryption(&capable).is_ok());
        // CONFIG_INET_ESP_OFFLOAD=y must not read as CONFIG_INET_ESP=y.
        let lookalike = KernelConfig::Known(
            "CONFIG_XFRM_USER=y\nCONFIG_INET_ESP_OFFLOAD=y\nCONFIG_CRYPTO_GCM=y\n".into(),
        );
        assert!(check_encryption(&lookalike).is_err());
        assert!(check_encryption(&KernelConfig::Unknown("no file".into())).is_ok());
    }

    #[test]
    fn this_machines_kernel_is_read() {
        // Whatever the machine, reading never panics and yields a verdict.
        let k = KernelConfig::read_running();
        let _ = check_encryption(&k);
        if std::path::Path::new("/proc/config.gz").exists() {
            assert!(matches!(k, KernelConfig::Known(ref t) if t.contains("CONFIG_")));
        }
    }
}
