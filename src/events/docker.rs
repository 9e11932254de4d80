//! Docker's events as the domain sees them: a typed object kind and action
//! (so the dispatcher, the worldview and the feeder match enum variants, not
//! strings), the actor id and attributes. The feeder in `docker/` parses
//! the engine's messages into this type; nothing here knows the Engine API.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What kind of object an event is about (Docker's `Type`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum DockerObject {
    Container,
    Network,
    /// Any other type, verbatim (`image`, `volume`, `service`, …).
    Other(String),
}

impl DockerObject {
    pub fn parse(s: &str) -> Self {
        match s {
            "container" => Self::Container,
            "network" => Self::Network,
            other => Self::Other(other.to_owned()),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            Self::Container => "container",
            Self::Network => "network",
            Self::Other(s) => s,
        }
    }
}

/// What happened (Docker's `Action`). The variants are the actions the CP
/// acts on; everything else is kept verbatim in [`DockerAction::Other`]
/// (e.g. `health_status: healthy`, `exec_start: sh -c …`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum DockerAction {
    Create,
    Start,
    Restart,
    Pause,
    Unpause,
    Die,
    Stop,
    Kill,
    Oom,
    Destroy,
    Rename,
    /// Network: a container joined.
    Connect,
    /// Network: a container left.
    Disconnect,
    /// Network: removed (older engines say `destroy`).
    Remove,
    Other(String),
}

impl DockerAction {
    pub fn parse(s: &str) -> Self {
        match s {
            "create" => Self::Create,
            "start" => Self::Start,
            "restart" => Self::Restart,
            "pause" => Self::Pause,
            "unpause" => Self::Unpause,
            "die" => Self::Die,
            "stop" => Self::Stop,
            "kill" => Self::Kill,
            "oom" => Self::Oom,
            "destroy" => Self::Destroy,
            "rename" => Self::Rename,
            "connect" => Self::Connect,
            "disconnect" => Self::Disconnect,
            "remove" => Self::Remove,
            other => Self::Other(other.to_owned()),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            Self::Create => "create",
            Self::Start => "start",
            Self::Restart => "restart",
            Self::Pause => "pause",
            Self::Unpause => "unpause",
            Self::Die => "die",
            Self::Stop => "stop",
            Self::Kill => "kill",
            Self::Oom => "oom",
            Self::Destroy => "destroy",
            Self::Rename => "rename",
            Self::Connect => "connect",
            Self::Disconnect => "disconnect",
            Self::Remove => "remove",
            Self::Other(s) => s,
        }
    }

    /// A container (re)started or resumed: time to dial it.
    pub fn brings_container_up(&self) -> bool {
        matches!(self, Self::Start | Self::Restart | Self::Unpause)
    }

    /// A container went down. Not `kill` (a signal such as SIGHUP need not end anything; a fatal
    /// one is followed by `die`) nor `oom` (the OOM killer may take a child
    /// and leave the container running).
    pub fn takes_container_down(&self) -> bool {
        matches!(self, Self::Die | Self::Stop)
    }
}

macro_rules! string_serde {
    ($ty:ident) => {
        impl Serialize for $ty {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Ok(Self::parse(&s))
            }
        }
    };
}
string_serde!(DockerObject);
string_serde!(DockerAction);

/// A Docker event as the bus carries it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DockerEvent {
    #[serde(rename = "type")]
    pub typ: DockerObject,
    pub action: DockerAction,
    pub actor_id: String,
    pub attributes: BTreeMap<String, String>,
    pub scope: String,
    /// Nanoseconds since the Unix epoch.
    pub time_nanos: i64,
    /// True for events made up by a reconcile rather than read off the stream.
    pub synthetic: bool,
}

impl DockerEvent {
    /// `docker.<type>.<action>`, e.g. `docker.container.start`.
    pub fn name(&self) -> String {
        format!("docker.{}.{}", self.typ.as_str(), self.action.as_str())
    }

    pub fn attr(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }

    /// The container this event is about, if it is a container event.
    pub fn container_id(&self) -> Option<&str> {
        (self.typ == DockerObject::Container).then_some(self.actor_id.as_str())
    }

    /// A container event, for tests and reconciles.
    pub fn container(action: DockerAction, id: &str, attributes: BTreeMap<String, String>) -> Self {
        Self {
            typ: DockerObject::Container,
            action,
            actor_id: id.to_owned(),
            attributes,
            scope: "local".into(),
            time_nanos: 0,
            synthetic: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actions_round_trip_and_unknown_ones_are_kept_verbatim() {
        for s in [
            "create",
            "start",
            "restart",
            "pause",
            "unpause",
            "die",
            "stop",
            "kill",
            "oom",
            "destroy",
            "rename",
            "connect",
            "disconnect",
            "remove",
            "health_status: healthy",
        ] {
            assert_eq!(DockerAction::parse(s).as_str(), s);
        }
        assert_eq!(
            DockerAction::parse("exec_start: sh"),
            DockerAction::Other("exec_start: sh".into())
        );
        assert_eq!(DockerObject::parse("volume").as_str(), "volume");
    }

    #[test]
    fn json_is_the_engine_vocabulary() {
        let ev = DockerEvent::container(DockerAction::Start, "c1", BTreeMap::new());
        let j = serde_json::to_value(&ev).unwrap();
        assert_eq!(j["type"], "container");
        assert_eq!(j["action"], "start");
        let back: DockerEvent = serde_json::from_value(j).unwrap();
        assert_eq!(back, ev);
        assert_eq!(ev.name(), "docker.container.start");
    }
}
