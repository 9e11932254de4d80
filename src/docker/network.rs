//! The two bridges the CP reaches agents on: `clawker-net`, shared by the
//! CP and every trusted agent, and `clawker-quarantine`, where `isolate`
//! puts an agent (`internal: true`, no inter-container traffic, guarded on
//! the host by `netns::host_guard`). Both with explicit subnets.

use std::collections::HashMap;
use std::net::IpAddr;

use bollard::Docker;
use bollard::models::{Ipam, IpamConfig, NetworkCreateRequest};

use super::{DockerError, is_status};
use crate::defaults::labels;

/// Docker's bridge driver option naming the host interface.
const BRIDGE_NAME_OPTION: &str = "com.docker.network.bridge.name";
/// Docker's bridge driver option for traffic between its containers.
const ICC_OPTION: &str = "com.docker.network.bridge.enable_icc";

/// The network as the CP needs it: its id and gateway (the host address
/// containers reach the CP on).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClawkerNet {
    pub id: String,
    pub name: String,
    pub subnet: String,
    pub gateway: IpAddr,
    /// `internal: true`: Docker forwards nothing in or out.
    pub internal: bool,
    /// The bridge interface on the host: `br-` + the first 12 hex digits
    /// of the id, unless the network names its bridge.
    pub bridge: String,
}

/// Looks the network up; `Ok(None)` when it does not exist.
pub async fn find(docker: &Docker, name: &str) -> Result<Option<ClawkerNet>, DockerError> {
    let net = match docker
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
    let cfg = net
        .ipam
        .and_then(|i| i.config)
        .and_then(|c| c.into_iter().next())
        .unwrap_or_default();
    let gateway = cfg
        .gateway
        .as_deref()
        .and_then(|g| g.parse().ok())
        .ok_or_else(|| DockerError::Invalid(format!("network {name} has no IPv4 gateway")))?;
    let id = net.id.unwrap_or_default();
    let bridge = net
        .options
        .as_ref()
        .and_then(|o| o.get(BRIDGE_NAME_OPTION).cloned())
        .unwrap_or_else(|| format!("br-{}", id.get(..12).unwrap_or(&id)));
    Ok(Some(ClawkerNet {
        id,
        name: name.to_owned(),
        subnet: cfg.subnet.unwrap_or_default(),
        gateway,
        internal: net.internal.unwrap_or(false),
        bridge,
    }))
}

/// Creates the agent bridge with an explicit subnet (and gateway = first
/// host) unless it exists; returns it either way.
pub async fn ensure(docker: &Docker, name: &str, subnet: &str) -> Result<ClawkerNet, DockerError> {
    if let Some(n) = find(docker, name).await? {
        return Ok(n);
    }
    create(docker, name, subnet, false).await
}

/// Creates the quarantine bridge unless it exists: `internal: true` (Docker
/// forwards nothing in or out) and inter-container traffic off (two
/// quarantined agents cannot talk to each other). An existing network of
/// that name that is not internal is refused: it would contain nothing.
pub async fn ensure_quarantine(
    docker: &Docker,
    name: &str,
    subnet: &str,
) -> Result<ClawkerNet, DockerError> {
    let net = match find(docker, name).await? {
        Some(n) => n,
        None => create(docker, name, subnet, true).await?,
    };
    if !net.internal {
        return Err(DockerError::Invalid(format!(
            "network {name} exists but is not internal, so it cannot quarantine anything: \
             remove it (`docker network rm {name}`) or set another quarantine_network"
        )));
    }
    Ok(net)
}

async fn create(
    docker: &Docker,
    name: &str,
    subnet: &str,
    quarantine: bool,
) -> Result<ClawkerNet, DockerError> {
    let gateway = first_host(subnet).ok_or_else(|| {
        DockerError::Invalid(format!("invalid subnet {subnet:?} (want a.b.c.d/nn)"))
    })?;
    let req = NetworkCreateRequest {
        name: name.to_owned(),
        driver: Some("bridge".into()),
        ipam: Some(Ipam {
            config: Some(vec![IpamConfig {
                subnet: Some(subnet.to_owned()),
                gateway: Some(gateway.to_string()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        internal: quarantine.then_some(true),
        options: quarantine.then(|| HashMap::from([(ICC_OPTION.to_owned(), "false".to_owned())])),
        labels: Some(HashMap::from([
            (labels::MANAGED.to_owned(), labels::MANAGED_VALUE.to_owned()),
            (
                labels::PURPOSE.to_owned(),
                if quarantine {
                    labels::PURPOSE_QUARANTINE.to_owned()
                } else {
                    labels::PURPOSE_NETWORK.to_owned()
                },
            ),
        ])),
        ..Default::default()
    };
    match docker.create_network(req).await {
        Ok(_) => {}
        // Lost a creation race with another CP/CLI: fine, it exists now.
        Err(e) if is_status(&e, 409) => {}
        Err(e) => return Err(e.into()),
    }
    find(docker, name)
        .await?
        .ok_or_else(|| DockerError::Invalid(format!("network {name} vanished after create")))
}

/// `10.77.0.0/24` → `10.77.0.1`.
pub fn first_host(subnet: &str) -> Option<IpAddr> {
    let (base, len) = subnet.split_once('/')?;
    let len: u32 = len.parse().ok()?;
    let base: std::net::Ipv4Addr = base.parse().ok()?;
    if !(8..=30).contains(&len) {
        return None;
    }
    let mask = u32::MAX << (32 - len);
    let net = u32::from(base) & mask;
    Some(IpAddr::V4((net + 1).into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_host_of_subnets() {
        assert_eq!(
            first_host("10.77.0.0/24"),
            Some("10.77.0.1".parse().unwrap())
        );
        assert_eq!(
            first_host("10.77.3.9/16"),
            Some("10.77.0.1".parse().unwrap())
        );
        assert_eq!(first_host("nope"), None);
        assert_eq!(first_host("10.0.0.0/33"), None);
        assert_eq!(first_host("10.0.0.0/x"), None);
    }
}
