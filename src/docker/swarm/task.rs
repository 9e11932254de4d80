//! Swarm tasks as the manager reports them (`GET /tasks`, parsed from raw
//! JSON: bollard's model lacks the overlay addresses) and the pure rules
//! built on them: which task is a service's current one, and the
//! [`ContainerFacts`] of an agent service.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;

use serde::Deserialize;

use crate::runtime::{ContainerFacts, NetworkRole};

/// One task, with just the fields the CP reads. Unknown fields are
/// ignored; missing ones default (a malformed task is never a panic).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawTask {
    #[serde(rename = "ID", default)]
    pub id: String,
    #[serde(rename = "ServiceID", default)]
    pub service_id: String,
    #[serde(rename = "NodeID", default)]
    pub node_id: String,
    #[serde(rename = "DesiredState", default)]
    pub desired_state: String,
    #[serde(rename = "Status", default)]
    pub status: RawStatus,
    #[serde(rename = "NetworksAttachments", default)]
    pub networks_attachments: Vec<RawAttachment>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawStatus {
    /// RFC 3339 with nanoseconds: when the task entered `state`.
    #[serde(rename = "Timestamp", default)]
    pub timestamp: String,
    #[serde(rename = "State", default)]
    pub state: String,
    #[serde(rename = "Message", default)]
    pub message: String,
    #[serde(rename = "Err", default)]
    pub err: String,
    #[serde(rename = "ContainerStatus", default)]
    pub container_status: Option<RawContainerStatus>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawContainerStatus {
    #[serde(rename = "ContainerID", default)]
    pub container_id: String,
    #[serde(rename = "PID", default)]
    pub pid: i64,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawAttachment {
    #[serde(rename = "Network", default)]
    pub network: RawNetwork,
    /// CIDR notation: `10.241.0.5/24`.
    #[serde(rename = "Addresses", default)]
    pub addresses: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawNetwork {
    #[serde(rename = "ID", default)]
    pub id: String,
    #[serde(rename = "Spec", default)]
    pub spec: RawNetworkSpec,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawNetworkSpec {
    #[serde(rename = "Name", default)]
    pub name: String,
}

/// Swarm task states at or past which a task will never run (again).
const FINISHED: &[&str] = &[
    "complete", "shutdown", "failed", "rejected", "remove", "orphaned",
];

impl RawTask {
    /// Running now, and meant to be.
    pub fn is_running(&self) -> bool {
        self.desired_state == "running" && self.status.state == "running"
    }

    /// Ended for good (failed, rejected, shut down, …).
    pub fn is_finished(&self) -> bool {
        FINISHED.contains(&self.status.state.as_str())
    }

    /// The id of the container that runs it (empty before it has one).
    pub fn container_id(&self) -> &str {
        self.status
            .container_status
            .as_ref()
            .map(|c| c.container_id.as_str())
            .unwrap_or("")
    }

    /// Its address on the network named `network`, if attached.
    pub fn address_on(&self, network: &str) -> Option<IpAddr> {
        self.networks_attachments
            .iter()
            .filter(|a| a.network.spec.name == network)
            .flat_map(|a| a.addresses.iter())
            .find_map(|cidr| cidr.split('/').next()?.parse().ok())
    }

    /// Names of every attached network, sorted.
    pub fn network_names(&self) -> Vec<String> {
        let names: BTreeSet<String> = self
            .networks_attachments
            .iter()
            .map(|a| a.network.spec.name.clone())
            .filter(|n| !n.is_empty())
            .collect();
        names.into_iter().collect()
    }

    /// When it entered its current state, in Unix nanoseconds (0 when the
    /// timestamp is missing or malformed).
    pub fn state_since_nanos(&self) -> i64 {
        parse_nanos(&self.status.timestamp)
    }

    /// What went wrong, for an error message (`Err`, else `Message`).
    pub fn problem(&self) -> String {
        let s = if self.status.err.is_empty() {
            &self.status.message
        } else {
            &self.status.err
        };
        format!("task {} {}: {s}", short(&self.id), self.status.state)
    }
}

/// RFC 3339 → Unix nanoseconds; 0 on anything unparsable.
pub fn parse_nanos(ts: &str) -> i64 {
    time::OffsetDateTime::parse(ts, &time::format_description::well_known::Rfc3339)
        .ok()
        .and_then(|t| i64::try_from(t.unix_timestamp_nanos()).ok())
        .unwrap_or(0)
}

/// The first 12 characters of an id (for messages).
pub fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

/// A service's current task: the running one that entered `running` last
/// (a one-replica service has at most one, except for the moment of an
/// update).
pub fn current<'a>(tasks: impl IntoIterator<Item = &'a RawTask>) -> Option<&'a RawTask> {
    tasks
        .into_iter()
        .filter(|t| t.is_running())
        .max_by_key(|t| (t.state_since_nanos(), t.id.clone()))
}

/// Parses a task listing; a body that is not a JSON array of tasks is an
/// error (an entry with unexpected fields is not: they default).
pub fn parse_list(body: &[u8]) -> Result<Vec<RawTask>, serde_json::Error> {
    serde_json::from_slice(body)
}

/// What the CP knows about an agent service, from the manager's API.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceView {
    pub id: String,
    pub name: String,
    pub labels: HashMap<String, String>,
}

/// The facts of an agent service: its labels, and the address, networks
/// and running state of its current task. The address is the one on the
/// agent overlay or, failing that, on the quarantine overlay (a
/// quarantined agent's session runs there). `pid` is 0: the task's PID is
/// a PID on whatever node runs it, which the CP (in its own container,
/// perhaps on another machine) cannot use; `gateway` is `None`: an
/// overlay has no host side, the CP reaches it as one more task.
pub fn facts(
    service: &ServiceView,
    current: Option<&RawTask>,
    network: &str,
    quarantine: &str,
) -> ContainerFacts {
    let endpoint = current.and_then(|t| {
        [
            (network, NetworkRole::Agent),
            (quarantine, NetworkRole::Quarantine),
        ]
        .into_iter()
        .find_map(|(name, role)| Some((t.address_on(name)?, role)))
    });
    ContainerFacts {
        id: service.id.clone(),
        name: service.name.clone(),
        labels: service.labels.clone(),
        ip: endpoint.map(|e| e.0),
        ip_network: endpoint.map(|e| e.1),
        gateway: None,
        networks: current.map(RawTask::network_names).unwrap_or_default(),
        running: current.is_some_and(|t| !t.container_id().is_empty()),
        pid: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A task as `GET /v1.41/tasks` returns it (trimmed from a real answer
    /// of Engine 20.10 on this machine).
    const LIST: &str = r#"[
      {"ID":"y0nhlshyold","Version":{"Index":20},"ServiceID":"svc1","Slot":1,"NodeID":"node1",
       "Status":{"Timestamp":"2024-11-27T10:53:00.100000000Z","State":"shutdown","Message":"shutdown",
                 "ContainerStatus":{"ContainerID":"aaa","PID":0,"ExitCode":137}},
       "DesiredState":"shutdown",
       "NetworksAttachments":[{"Network":{"ID":"net1","Spec":{"Name":"clawker-overlay"}},"Addresses":["10.241.0.7/24"]}]},
      {"ID":"y0nhlshynew","Version":{"Index":31},"ServiceID":"svc1","Slot":1,"NodeID":"node2",
       "Status":{"Timestamp":"2024-11-27T10:53:05.250000000Z","State":"running","Message":"started",
                 "ContainerStatus":{"ContainerID":"bbb","PID":12869,"ExitCode":0}},
       "DesiredState":"running","SomethingNew":{"x":1},
       "NetworksAttachments":[
         {"Network":{"ID":"net2","Spec":{"Name":"other"}},"Addresses":["10.241.1.3/24"]},
         {"Network":{"ID":"net1","Spec":{"Name":"clawker-overlay"}},"Addresses":["10.241.0.8/24"]}]},
      {"ID":"pending1","ServiceID":"svc2","DesiredState":"running",
       "Status":{"Timestamp":"2024-11-27T10:53:06Z","State":"preparing"}}
    ]"#;

    #[test]
    fn parses_a_real_listing_and_picks_the_running_task() {
        let tasks = parse_list(LIST.as_bytes()).unwrap();
        assert_eq!(tasks.len(), 3);
        let cur = current(tasks.iter().filter(|t| t.service_id == "svc1")).unwrap();
        assert_eq!(cur.id, "y0nhlshynew");
        assert_eq!(cur.container_id(), "bbb");
        assert_eq!(
            cur.address_on("clawker-overlay"),
            Some("10.241.0.8".parse().unwrap())
        );
        assert_eq!(cur.address_on("nope"), None);
        assert_eq!(cur.network_names(), ["clawker-overlay", "other"]);
        assert_eq!(cur.state_since_nanos(), 1_732_704_785_250_000_000);
        assert!(tasks[0].is_finished() && !tasks[0].is_running());
        assert!(!tasks[2].is_running() && !tasks[2].is_finished());
        assert!(current(tasks.iter().filter(|t| t.service_id == "svc2")).is_none());
    }

    #[test]
    fn malformed_input_is_an_error_or_defaults_never_a_panic() {
        assert!(parse_list(b"{}").is_err());
        assert!(parse_list(b"not json").is_err());
        let t = parse_list(br#"[{"Status":{"Timestamp":"yesterday"},"NetworksAttachments":[{"Addresses":["bad/24"]}]}]"#)
            .unwrap();
        assert_eq!(t[0].state_since_nanos(), 0);
        assert_eq!(t[0].address_on(""), None);
        assert_eq!(t[0].container_id(), "");
        assert!(t[0].problem().contains("task "));
    }

    #[test]
    fn facts_are_the_service_labels_and_the_current_task() {
        let tasks = parse_list(LIST.as_bytes()).unwrap();
        let svc = ServiceView {
            id: "svc1".into(),
            name: "clawker.p.a".into(),
            labels: HashMap::from([("dev.clawker.agent".into(), "a".into())]),
        };
        let f = facts(&svc, current(&tasks), "clawker-overlay", "quarantine");
        assert_eq!(f.id, "svc1");
        assert_eq!(f.agent_label(), "a");
        assert_eq!(f.ip, Some("10.241.0.8".parse().unwrap()));
        assert_eq!(f.ip_network, Some(NetworkRole::Agent));
        assert!(f.running);
        assert_eq!(f.pid, 0);
        let idle = facts(&svc, None, "clawker-overlay", "quarantine");
        assert!(!idle.running && idle.ip.is_none() && idle.networks.is_empty());
        // Quarantined: only on the quarantine overlay, reached there.
        let q = facts(&svc, current(&tasks), "clawker-overlay-x", "other");
        assert_eq!(q.ip, Some("10.241.1.3".parse().unwrap()));
        assert_eq!(q.ip_network, Some(NetworkRole::Quarantine));
    }
}
