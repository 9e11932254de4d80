//! Per-method policy of the agent listener: which OAuth2 scope each
//! AgentService method needs, and whether it needs a registered identity.
//!
//! Both maps are checked against the compiled service descriptor: a key
//! that names no real method is a startup error (a renamed RPC must not
//! silently lose its policy), and tests fail if a method has no entry.
//! At runtime both interceptors fail closed on a method that is absent.

use std::collections::{BTreeSet, HashMap};

use prost::Message;

/// Scope of the admin listener.
pub const SCOPE_ADMIN: &str = "admin";
/// Scope an agent token carries: it may register itself, nothing else.
pub const SCOPE_AGENT_SELF_REGISTER: &str = "agent:self:register";
/// OAuth2 client of the CLI (admin API).
pub const CLIENT_ID_CLI: &str = "clawker-cli";
/// OAuth2 client of every agent (clawkerd's assertion).
pub const CLIENT_ID_AGENT: &str = "clawker-agent";

/// Fully qualified AgentService name.
pub const AGENT_SERVICE: &str = "clawker.agent.v1.AgentService";
/// `/clawker.agent.v1.AgentService/Register`.
pub const REGISTER_METHOD: &str = "/clawker.agent.v1.AgentService/Register";

/// Does a method need the caller to be a registered agent?
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentityDecision {
    /// The IdentityInterceptor resolves the peer in the registry and
    /// refuses unknown peers.
    Required,
    /// Skipped: Register creates the row the interceptor would look up, and
    /// does its own peer-cert/IP/label checks instead.
    OptedOut,
}

/// Method → required scope for the agent listener. An empty scope would
/// mean "public"; no agent method is public.
pub fn agent_method_scopes() -> HashMap<String, String> {
    HashMap::from([(
        REGISTER_METHOD.to_owned(),
        SCOPE_AGENT_SELF_REGISTER.to_owned(),
    )])
}

/// Method → identity decision for the agent listener. Every method gets an
/// explicit decision; an absent method is treated as `Required`.
pub fn agent_identity_policy() -> HashMap<String, IdentityDecision> {
    HashMap::from([(REGISTER_METHOD.to_owned(), IdentityDecision::OptedOut)])
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("policy map has stale key {key:?}: not a method of {service}")]
    StaleKey { service: String, key: String },
    #[error("service {0} not found in the compiled descriptor set")]
    UnknownService(String),
    #[error("compiled descriptor set does not decode: {0}")]
    Descriptor(String),
}

/// `/<service>/<method>` for every method (unary and streaming) of
/// `service`, read from the compiled [`crate::proto::FILE_DESCRIPTOR_SET`].
pub fn service_methods(service: &str) -> Result<BTreeSet<String>, PolicyError> {
    let set = prost_types::FileDescriptorSet::decode(crate::proto::FILE_DESCRIPTOR_SET)
        .map_err(|e| PolicyError::Descriptor(e.to_string()))?;
    for file in &set.file {
        for svc in &file.service {
            let full = match file.package() {
                "" => svc.name().to_owned(),
                pkg => format!("{pkg}.{}", svc.name()),
            };
            if full == service {
                return Ok(svc
                    .method
                    .iter()
                    .map(|m| format!("/{full}/{}", m.name()))
                    .collect());
            }
        }
    }
    Err(PolicyError::UnknownService(service.to_owned()))
}

/// Refuses any key of a policy map that is not a method of `service`.
pub fn check_no_stale_keys<'a>(
    service: &str,
    keys: impl IntoIterator<Item = &'a String>,
) -> Result<(), PolicyError> {
    let methods = service_methods(service)?;
    let mut stale: Vec<&String> = keys.into_iter().filter(|k| !methods.contains(*k)).collect();
    stale.sort();
    match stale.first() {
        Some(k) => Err(PolicyError::StaleKey {
            service: service.to_owned(),
            key: (*k).clone(),
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_agent_method_has_a_scope_and_no_scope_entry_is_stale() {
        let methods = service_methods(AGENT_SERVICE).unwrap();
        assert!(!methods.is_empty());
        let scopes = agent_method_scopes();
        for m in &methods {
            assert!(scopes.contains_key(m), "{m} has no scope entry");
            assert!(!scopes[m].is_empty(), "{m} must not be public");
        }
        check_no_stale_keys(AGENT_SERVICE, scopes.keys()).unwrap();
        assert_eq!(scopes.len(), methods.len());
    }

    #[test]
    fn every_agent_method_has_an_identity_decision_and_register_is_opted_out() {
        let methods = service_methods(AGENT_SERVICE).unwrap();
        let policy = agent_identity_policy();
        for m in &methods {
            assert!(policy.contains_key(m), "{m} has no identity decision");
        }
        check_no_stale_keys(AGENT_SERVICE, policy.keys()).unwrap();
        assert_eq!(policy.len(), methods.len());
        assert_eq!(policy[REGISTER_METHOD], IdentityDecision::OptedOut);
    }

    #[test]
    fn stale_keys_are_named() {
        let keys = [
            REGISTER_METHOD.to_owned(),
            "/clawker.agent.v1.AgentService/Connect".to_owned(),
        ];
        let err = check_no_stale_keys(AGENT_SERVICE, keys.iter()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "policy map has stale key \"/clawker.agent.v1.AgentService/Connect\": not a method of clawker.agent.v1.AgentService"
        );
        assert!(matches!(
            service_methods("nope.Service"),
            Err(PolicyError::UnknownService(_))
        ));
    }
}
